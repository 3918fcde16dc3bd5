"""ONNX export of every network (default model and tiny latent-mode model): checker, declared names
and dynamic axes, standard ops only (Triton ops as their reference decomposition), TensorRT parser
compatibility, onnxruntime parity in fp32 and fp16, external data, atomic output, the CLI's errors."""

import json
import logging
import os

import onnx
import pytest
import torch

from engine.artefacts import read_manifest
from engine.networks import ShapeBucket, networks_for
from export.__main__ import main
from export.check import TOLERANCE, check_export, format_table
from export.onnx_export import export_model, export_network
from export.trt_compat import check_model


def _graph_dims(value):
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


@pytest.mark.parametrize("which", ["default_export", "tiny_latent_export"])
def test_graphs_are_valid_named_standard_and_tensorrt_parsable(which, request):
    out, manifest = request.getfixturevalue(which)
    cfg_networks = {n.name: n for n in networks_for(_config(manifest))}
    assert set(manifest["networks"]) == set(cfg_networks)  # every network of the model
    for name, entry in manifest["networks"].items():
        path = os.path.join(out, entry["file"])
        onnx.checker.check_model(path, full_check=True)
        model = onnx.load(path)
        assert model.opset_import[0].version >= 17
        net = cfg_networks[name]
        assert [v.name for v in model.graph.input] == net.input_names
        assert [v.name for v in model.graph.output] == net.output_names
        for value in model.graph.input:
            dims = _graph_dims(value)
            assert dims[0] == "batch", (name, value.name, dims)
            for axis, symbol in net.dynamic_axes()[value.name].items():
                assert dims[axis] == symbol, (name, value.name, dims)
        # standard ONNX only: the Triton custom ops went out as their PyTorch references
        assert all(n.domain in ("", "ai.onnx") for n in model.graph.node), name
        assert check_model(model) == [], name
        assert entry["ops"] and all("::" not in op for op in entry["ops"])


def _config(manifest):
    from engine.configs import CMDConfig

    return CMDConfig.from_dict(manifest["config"])


def test_default_model_parity_fp32(default_model, default_export):
    model, text_encoder, _ = default_model
    rows = check_export(default_export[0], model, text_encoder)
    print(format_table(rows))
    assert {r.network for r in rows} == {"text_encoder", "content_unet", "motion_dit", "ae_decoder"}
    assert all(r.status == "ok" for r in rows), format_table(rows)
    assert {r.batch for r in rows if r.network == "content_unet"} == {1, 8}  # away from the traced batch 2


def test_tiny_latent_parity_fp32_in_every_bucket(tiny_latent, tiny_latent_export):
    model, text_encoder = tiny_latent
    rows = check_export(tiny_latent_export[0], model, text_encoder)
    print(format_table(rows))
    assert all(r.status == "ok" for r in rows), format_table(rows)
    # both buckets ran through the same DiT graph (dynamic frames); bucket-independent networks once
    assert {r.bucket for r in rows if r.network == "motion_dit"} == {"4x32x32", "2x32x32"}
    assert {r.bucket for r in rows if r.network == "vae_decoder"} == {"4x32x32"}
    graph = onnx.load(os.path.join(tiny_latent_export[0], "motion_dit.onnx"))
    assert _graph_dims(graph.graph.input[0]) == ["batch", 4, "frames", 16]


def test_fp16_parity(default_model, tiny_latent, fp16_exports):
    default_dir, tiny_dir = fp16_exports
    rows = check_export(default_dir, default_model[0]) + check_export(tiny_dir, tiny_latent[0])
    print(format_table(rows))
    assert {r.network for r in rows} == {"motion_dit", "vae_decoder"}
    assert all(r.precision == "float16" and r.tolerance == TOLERANCE["float16"] for r in rows)
    assert all(r.status == "ok" for r in rows), format_table(rows)
    graph = onnx.load(os.path.join(default_dir, "motion_dit.onnx"))
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16


def _tamper(src: str, dst: str, network: str) -> None:
    """Copy an export folder and zero a few weights of one graph."""
    import shutil

    shutil.copytree(src, dst)
    path = os.path.join(dst, f"{network}.onnx")
    graph = onnx.load(path)
    biggest = max(graph.graph.initializer, key=lambda t: len(t.raw_data))
    raw = bytearray(biggest.raw_data)
    raw[:64] = bytes(64)
    biggest.raw_data = bytes(raw)
    onnx.save(graph, path)


def test_check_catches_wrong_graphs(default_model, default_export, tmp_path):
    """A graph from other weights is refused; a tampered graph fails its parity rows."""
    model, text_encoder, _ = default_model
    with pytest.raises(ValueError, match="other weights"):
        check_export(default_export[0], torch.nn.Linear(2, 2), text_encoder)
    _tamper(default_export[0], str(tmp_path / "tampered"), "ae_decoder")
    rows = check_export(str(tmp_path / "tampered"), model, text_encoder, names=["ae_decoder"])
    assert rows and all(r.status == "FAIL" for r in rows)


def test_manifest_records_what_runtimes_need(default_model, default_export):
    from engine.artefacts import weights_hash

    model, text_encoder, spec = default_model
    out, manifest = default_export
    assert read_manifest(out) == json.loads(json.dumps(manifest))
    assert manifest["model"]["spec"] == spec
    assert manifest["model"]["weights_sha256"]["float32"] == weights_hash(model)
    assert manifest["buckets"] == ["16x32x32", "16x64x64"] and manifest["precision"] == "float32"  # its sizes
    tok = manifest["text_encoder"]
    assert tok["max_length"] == model.config.text_encoder.max_length
    if tok["kind"] == "huggingface":
        assert os.path.isfile(os.path.join(out, tok["path"], "tokenizer_config.json"))
    else:
        assert tok["kind"] == "hash" and tok["vocab_size"] > 0
    profiles = manifest["networks"]["content_unet"]["profiles"]
    assert [p["bucket"] for p in profiles] == ["16x32x32", "16x64x64"]
    assert all(p["max"]["sample"][0] == 2 * manifest["max_batch"] for p in profiles)


def test_external_data_and_dynamic_height_width(make_tiny_latent_config, tiny_latent, tmp_path):
    """Weights go to <name>.onnx.data when asked (automatically near 2 GB); checker and onnxruntime read
    the pair by path. Buckets of different sizes give one graph with dynamic height and width."""
    from engine.backends.onnxruntime import OrtNetwork

    model, _ = tiny_latent
    cfg = make_tiny_latent_config([(4, 32, 32), (4, 64, 32), (4, 32, 64)])
    net = networks_for(cfg, names=["ae_decoder"])[0]
    entry = export_network(net, model, str(tmp_path), external_data=True)
    assert entry["external_data"] == "ae_decoder.onnx.data"
    onnx.checker.check_model(str(tmp_path / "ae_decoder.onnx"), full_check=True)
    graph = onnx.load(str(tmp_path / "ae_decoder.onnx"), load_external_data=False)
    big = [t for t in graph.graph.initializer if len(t.dims) and int(torch.tensor(list(t.dims)).prod()) >= 256]
    assert big and all(t.data_location == onnx.TensorProto.EXTERNAL for t in big)
    assert _graph_dims(graph.graph.input[0]) == ["batch", 4, "height", "width"]
    assert _graph_dims(graph.graph.input[1]) == ["batch", 4, 4, "motion_len"]
    session = OrtNetwork(str(tmp_path), net, entry)
    for bucket in net.buckets:
        inputs = net.sample_inputs(bucket, batch=3)
        with torch.no_grad():
            ref = model.autoencoder.decode(*inputs.values())
        torch.testing.assert_close(session(*inputs.values())[0], ref, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="fit no shape bucket"):  # a clear error, not onnxruntime's
        session(*net.sample_inputs(ShapeBucket(4, 64, 64), batch=1).values())


def test_failed_export_leaves_nothing(tiny_latent, tmp_path, monkeypatch):
    import export.onnx_export as onnx_export

    model, text_encoder = tiny_latent
    calls = []

    def fail_second(network, model, out_dir, *args, **kwargs):
        calls.append(network.name)
        if len(calls) == 2:
            raise RuntimeError("boom")
        open(os.path.join(out_dir, f"{network.name}.onnx"), "wb").close()  # a first graph was written
        return {"file": f"{network.name}.onnx", "bytes": 0, "ops": {}, "export_seconds": 0.0}

    monkeypatch.setattr(onnx_export, "export_network", fail_second)
    with pytest.raises(RuntimeError, match="boom"):
        export_model(model, str(tmp_path / "out"), text_encoder)
    assert os.listdir(tmp_path) == []  # neither the folder nor a temporary sibling


def test_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    assert main(["onnx", "--model", "random:default", "--precision", "float64"]) == 2
    assert "float64" in capsys.readouterr().err
    assert main(["onnx", "--model", "random:no-such-config"]) == 2
    assert "no-such-config" in capsys.readouterr().err
    assert main(["onnx", "--model", "random:default", "--opset", "12"]) == 2
    assert "opset" in capsys.readouterr().err
    assert main(["onnx", "--model", "random:default", "--bucket", "16x32"]) == 2
    assert "16x32" in capsys.readouterr().err
    assert main(["check", "--onnx", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "missing" in err and len(err.strip().splitlines()) == 1
    assert main(["tensorrt", "--onnx", str(tmp_path), "--precision", "int4"]) == 2
    assert "int4" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_cli_check_table_and_exit_codes(default_model, default_export, tmp_path, capsys):
    """`python -m export check` loads the model named by --model (here a saved folder of the session's
    model), prints the table, exits 0 on parity and 1 when a graph is off."""
    model, _, _ = default_model
    folder = str(tmp_path / "model")
    model.save_pretrained(folder)
    report = str(tmp_path / "rows.json")
    assert main(["check", "--onnx", default_export[0], "--model", folder, "--network", "ae_decoder",
                 "--json", report]) == 0
    out = capsys.readouterr().out
    assert "ae_decoder" in out and "max rel" in out and "4/4 within tolerance" in out  # 2 batches x 2 sizes
    assert [r["status"] for r in json.load(open(report))] == ["ok"] * 4
    _tamper(default_export[0], str(tmp_path / "tampered"), "ae_decoder")
    assert main(["check", "--onnx", str(tmp_path / "tampered"), "--model", folder, "--network", "ae_decoder"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_cli_export_to_the_cache_where_the_backend_looks(tmp_path, monkeypatch, capsys):
    """`python -m export onnx` without --out writes under $CMD_CACHE/onnx, where the onnxruntime
    backend finds graphs of exactly these weights."""
    from engine.artefacts import find_export
    from export.onnx_export import load_model

    monkeypatch.setenv("CMD_CACHE", str(tmp_path))
    assert main(["onnx", "--model", "random:default", "--network", "ae_decoder"]) == 0
    out = capsys.readouterr().out
    (folder,) = os.listdir(tmp_path / "onnx")
    assert folder.startswith("default-") and folder.endswith("-float32") and str(tmp_path) in out
    model, _ = load_model("random:default")  # the same seeded random weights
    assert find_export(model) == str(tmp_path / "onnx" / folder)
    with torch.no_grad():
        model.autoencoder.output_head.bias.add_(1.0)
    assert find_export(model) is None  # other weights: not these graphs


@pytest.mark.parametrize("logger_name", ["torch.onnx._internal.exporter._registration",
                                         "onnxscript.optimizer._constant_folding"])
def test_export_notices_are_dropped_and_nothing_else(tiny_latent, tmp_path, log_records, logger_name):
    """Exporting logs "torchvision is not installed. Skipping torchvision::<op>" per torchvision op (four
    lines per network) where torchvision is missing, and onnxscript's constant folding "Evaluation failed:
    cannot reshape array ..." for nodes it leaves unfolded; the export drops those records and only those."""
    from export import onnx_export

    prefix = onnx_export.QUIET_NOTICES[logger_name]
    logger = logging.getLogger(logger_name)
    with log_records(logger_name) as seen:
        token = f"{os.getpid()}-{torch.randint(10**6, ()).item()}"
        with onnx_export._no_export_notices():
            logger.warning(prefix + "%s", f"op{token}")
            logger.warning("something else %s", token)
        logger.warning(prefix + "%s", f"after-{token}")  # outside an export: kept
        assert seen.messages == [f"something else {token}", f"{prefix}after-{token}"]
        seen.messages.clear()
        model, text_encoder = tiny_latent
        export_model(model, str(tmp_path / "graphs"), text_encoder, names=["ae_decoder"])
        assert not [m for m in seen.messages if m.startswith(prefix)], seen.messages


def test_cli_export_prints_no_torchvision_notices(tmp_path):
    """`python -m export onnx` in a real process: stdout has its progress lines, stderr stays empty (torch's
    exporter logs to stderr through its own handler)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    tiny = os.path.join(root, "tests", "engine", "tiny_config.json")
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "export", "onnx", "--model", f"random:{tiny}", "--network",
                           "ae_decoder", "--out", str(tmp_path / "graphs")], capture_output=True, text=True, env=env,
                          cwd=str(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote 1 graph(s)" in proc.stdout and proc.stderr == "", proc.stderr[-3000:]
