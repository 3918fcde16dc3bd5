"""Export and graph folders (issue 25.7): every CLI checks its outputs before work (engine.atomic.check_output,
the one rule), and a graph backend verifies the files it will run against the hashes the export manifest (or
plans.json) holds, before any network runs: a truncated, edited or swapped graph is one line naming the file."""

import os
import shutil

import pytest

from engine.artefacts import check_files, graph_files, plan_files


@pytest.fixture
def no_sessions(monkeypatch):
    """onnxruntime refuses to open any graph: a test passes only if nothing was opened."""
    import onnxruntime

    def refuse(*args, **kwargs):
        raise AssertionError("a graph was opened")

    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)


def _tamper_truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def _tamper_edit(path):
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))


def _tamper_swap(path):
    folder = os.path.dirname(path)
    other = "motion_dit.onnx" if not path.endswith("motion_dit.onnx") else "ae_decoder.onnx"
    shutil.copy(os.path.join(folder, other), path)


@pytest.mark.parametrize("graph", ["ae_decoder.onnx", "text_encoder.onnx"])
@pytest.mark.parametrize("tamper", [_tamper_truncate, _tamper_edit, _tamper_swap], ids=["truncated", "edited", "swapped"])
def test_a_changed_graph_is_refused_before_any_network_runs(default_model, default_export, tmp_path, no_sessions,
                                                            graph, tamper):
    from engine.backends.onnxruntime import OnnxRuntimeBackend

    model, _, _ = default_model
    folder = str(tmp_path / "graphs")
    shutil.copytree(default_export[0], folder)
    tamper(os.path.join(folder, graph))
    with pytest.raises(ValueError) as info:
        OnnxRuntimeBackend(model, onnx_dir=folder)
    message = str(info.value)
    assert "\n" not in message and graph in message and repr(folder) in message, message
    assert "export" in message  # what to do about it


def test_an_intact_export_passes_and_a_manifest_without_hashes_is_refused(default_model, default_export, tmp_path):
    import json

    from engine.backends.onnxruntime import OnnxRuntimeBackend

    model, _, _ = default_model
    OnnxRuntimeBackend(model, onnx_dir=default_export[0])  # no error: the files are the manifest's
    folder = str(tmp_path / "graphs")
    shutil.copytree(default_export[0], folder)
    with open(os.path.join(folder, "manifest.json")) as f:
        manifest = json.load(f)
    del manifest["networks"]["motion_dit"]["onnx_sha256"]
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    with pytest.raises(ValueError, match="no sha256 for motion_dit's motion_dit.onnx"):
        OnnxRuntimeBackend(model, onnx_dir=folder)


def test_plan_files_are_checked_by_the_same_rule(tmp_path):
    """TensorRT cannot be installed here: the plan side of the rule (plans.json's plan_sha256) runs on files."""
    from engine.artefacts import file_hash

    (tmp_path / "unet-abc.plan").write_bytes(b"plan bytes" * 100)
    plans = {"networks": {"content_unet": {"plan": "unet-abc.plan",
                                           "plan_sha256": file_hash(str(tmp_path / "unet-abc.plan"))}}}
    check_files(str(tmp_path), plan_files(plans), "the plans", "build again")
    (tmp_path / "unet-abc.plan").write_bytes(b"plan bytes" * 50)
    with pytest.raises(ValueError, match=r"^the plans: unet-abc.plan changed since it was written .*; build again$"):
        check_files(str(tmp_path), plan_files(plans), "the plans", "build again")
    os.remove(tmp_path / "unet-abc.plan")
    with pytest.raises(ValueError, match="lack unet-abc.plan"):
        check_files(str(tmp_path), plan_files(plans), "the plans", "build again")
    del plans["networks"]["content_unet"]["plan_sha256"]
    (tmp_path / "unet-abc.plan").write_bytes(b"x")
    with pytest.raises(ValueError, match="no sha256"):
        check_files(str(tmp_path), plan_files(plans), "the plans", "build again")
    assert graph_files({"networks": {"a": {"file": "a.onnx", "external_data": "a.onnx.data", "onnx_sha256": "f"}}}) \
        == {"a": (["a.onnx", "a.onnx.data"], "f")}


# -- outputs checked before work, by every CLI that writes ----------------------------------------------

def _bad_outputs(tmp_path):
    """(module, argv, flag) of each writing CLI with an output below a file (no user can write there, root
    included) and an otherwise valid command."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    bad = str(blocker / "out")
    model = "random:" + os.path.join(os.path.dirname(__file__), "..", "engine", "tiny_config.json")
    onnx = str(tmp_path / "onnx")
    os.makedirs(onnx)
    with open(os.path.join(onnx, "manifest.json"), "w") as f:
        f.write('{"format": 1, "model": {"spec": "%s"}, "networks": {}}' % model)
    return [
        ("export.__main__", ["onnx", "--model", model, "--out", bad], "--out"),
        ("export.__main__", ["check", "--onnx", onnx, "--json", bad + ".json"], "--json"),
        ("export.__main__", ["tensorrt", "--onnx", onnx, "--out", bad], "--out"),
        ("trainer.text_cache", ["--num-clips", "2", "--out", bad + ".safetensors"], "--out"),
        ("engine.run", ["--prompt", "x", "--model", model, "--out", bad + ".npy"], "--out"),
        ("engine.profile", ["--model", model, "--out-dir", bad], "--out-dir"),
        ("trainer.train", ["--stage", "autoencoder", "--data", "synthetic", "--out", bad], "--out"),
    ]


def test_every_cli_refuses_an_output_it_cannot_write_before_any_model_loads(tmp_path, monkeypatch, capsys):
    import importlib

    import engine.pipeline
    import export.onnx_export

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(export.onnx_export, "load_model", refuse)
    monkeypatch.setattr(engine.pipeline.CMDPipeline, "from_pretrained", classmethod(refuse))
    for module, argv, flag in _bad_outputs(tmp_path):
        before = sorted(os.listdir(tmp_path))
        capsys.readouterr()
        code = importlib.import_module(module).main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith(f"error: {flag} ") and "\n" not in err, (module, argv, err)
        assert "blocker" in err and "not a writable folder" in err, (module, err)
        assert sorted(os.listdir(tmp_path)) == before, module


def test_compose_refuses_its_output_before_loading(tmp_path, monkeypatch):
    from engine.models import CMDModel
    from engine.pipeline import CMDPipeline
    from trainer.compose import compose

    good = str(tmp_path / "m")
    CMDPipeline.from_pretrained("random:" + os.path.join(os.path.dirname(__file__), "..", "engine",
                                                         "tiny_config.json")).model.save_pretrained(good)
    (tmp_path / "blocker").write_text("x")

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(CMDModel, "from_pretrained", classmethod(refuse))
    with pytest.raises(ValueError, match=r"--out .*blocker/new' cannot be written"):
        compose(good, good, good, str(tmp_path / "blocker" / "new"))
