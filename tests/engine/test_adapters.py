"""Adapters (engine/adapters.py): the file format and its checks, the pipeline's diffusers-style methods, the
byte-identical base (no adapter, weight 0, after unloading), and the CLI's --lora."""

import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from engine.adapters import (PREFIX, AdapterError, NetworkLora, check_lora_args, network_hash, parse_lora_spec,
                             read_adapter, save_adapter)
from engine.pipeline import CMDPipeline

TINY = "random:" + os.path.join(os.path.dirname(__file__), "tiny_config.json")
CALL = dict(num_inference_steps=2, motion_steps=2, output_type="np", progress=False)


def random_lora(net, network, rank=2, modules=None, seed=0, scale=0.5):
    """A LoRA of random A and B for the first linear layers of ``net`` (made here, not trained: the format's
    test; trainer/lora.py's tests train real ones)."""
    g = torch.Generator().manual_seed(seed)
    linear = [(n, m) for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)]
    layers = {}
    for name, m in linear[:3] if modules is None else [(n, m) for n, m in linear if n in modules]:
        out_f, in_f = m.weight.shape
        layers[name] = (torch.randn(rank, in_f, generator=g) * scale, torch.randn(out_f, rank, generator=g) * scale)
    return NetworkLora(network, rank, float(rank), [n.rsplit(".", 1)[-1] for n in layers], network_hash(net), layers)


@pytest.fixture
def pipe(fast_cpu):
    return CMDPipeline.from_pretrained(TINY)


@pytest.fixture
def adapter_file(tmp_path, pipe):
    path = str(tmp_path / "both.safetensors")
    parts = [random_lora(pipe.model.content_unet, "content_unet"), random_lora(pipe.model.motion_dit, "motion_dit"),
             random_lora(pipe.model.autoencoder, "autoencoder", modules={"output_head", "content_embed"})]
    save_adapter(path, parts, data="test", steps=7)
    return path


def frames(pipe, seed=0):
    return pipe("a red circle moving right", generator=seed, **CALL).frames


def weights(pipe):
    return {k: v.clone() for k, v in pipe.model.state_dict().items()}


def test_file_round_trip_follows_the_peft_key_convention(adapter_file):
    from safetensors import safe_open

    with safe_open(adapter_file, framework="pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    assert all(k.split(".")[0] in PREFIX.values() and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert any(k.startswith("unet.") for k in keys) and any(k.startswith("transformer.") for k in keys)
    assert meta["format"] == "cmd-lora" and meta["steps"] == "7" and meta["data"] == "test"
    adapter = read_adapter(adapter_file)
    assert set(adapter.networks) == {"content_unet", "motion_dit", "autoencoder"}
    assert adapter.networks["motion_dit"].rank == 2 and len(adapter.networks["content_unet"].layers) == 3


def test_base_outputs_are_byte_identical_without_at_zero_and_after_unloading(pipe, adapter_file):
    base, base_weights = frames(pipe), weights(pipe)
    name = pipe.load_lora_weights(adapter_file)
    assert name == "both" and pipe.get_active_adapters() == ["both"]
    adapted = frames(pipe)
    assert not np.array_equal(adapted, base)
    pipe.set_adapters("both", 0.0)
    assert np.array_equal(frames(pipe), base)
    pipe.set_adapters(["both"], [1.0])
    assert np.array_equal(frames(pipe), adapted)  # switching back gives the same video again
    pipe.unload_lora_weights()
    assert np.array_equal(frames(pipe), base)
    after = weights(pipe)
    assert all(torch.equal(after[k], base_weights[k]) for k in base_weights)


def test_scale_is_linear_in_the_weights(pipe, adapter_file):
    base = weights(pipe)
    pipe.load_lora_weights(adapter_file, adapter_name="a")
    full = weights(pipe)
    pipe.set_adapters("a", 0.5)
    half = weights(pipe)
    key = "content_unet." + next(iter(read_adapter(adapter_file).networks["content_unet"].layers)) + ".weight"
    torch.testing.assert_close(half[key] - base[key], (full[key] - base[key]) / 2, rtol=1e-4, atol=1e-6)


def test_weights_are_rewritten_in_place(pipe, adapter_file):
    """Same storage before and after a switch: compiled code and captured CUDA graphs see the new values."""
    ptrs = {n: p.data_ptr() for n, p in pipe.model.named_parameters()}
    pipe.load_lora_weights(adapter_file)
    pipe.set_adapters("both", 0.3)
    pipe.unload_lora_weights()
    assert ptrs == {n: p.data_ptr() for n, p in pipe.model.named_parameters()}


def test_fuse_survives_unloading_until_unfused(pipe, adapter_file):
    base = frames(pipe)
    pipe.load_lora_weights(adapter_file)
    adapted = frames(pipe)
    pipe.fuse_lora(lora_scale=1.0)
    assert pipe.get_active_adapters() == []
    np.testing.assert_allclose(frames(pipe), adapted, atol=1e-6)
    pipe.unload_lora_weights()
    np.testing.assert_allclose(frames(pipe), adapted, atol=1e-6)  # fused weights stay (a merged model)
    pipe.unfuse_lora()
    assert np.array_equal(frames(pipe), base)


def test_two_adapters_mix(pipe, tmp_path):
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    save_adapter(a, [random_lora(pipe.model.motion_dit, "motion_dit", seed=1)])
    save_adapter(b, [random_lora(pipe.model.motion_dit, "motion_dit", seed=2)])
    base = weights(pipe)
    pipe.load_lora_weights(a)
    wa = weights(pipe)
    pipe.unload_lora_weights()
    pipe.load_lora_weights(b)
    wb = weights(pipe)
    pipe.load_lora_weights(a)
    pipe.set_adapters(["a", "b"], [1.0, 1.0])
    both = weights(pipe)
    for k in base:
        torch.testing.assert_close(both[k] - base[k], (wa[k] - base[k]) + (wb[k] - base[k]), rtol=1e-4, atol=1e-5)


def test_an_adapter_for_another_base_is_one_line(pipe, tmp_path):
    other = CMDPipeline.from_pretrained(TINY)
    with torch.no_grad():
        other.model.motion_dit.final_linear.weight.add_(1.0)
    path = str(tmp_path / "other.safetensors")
    save_adapter(path, [random_lora(other.model.motion_dit, "motion_dit")])
    before = weights(pipe)
    with pytest.raises(AdapterError, match="trained on another motion_dit .base weight hash") as e:
        pipe.load_lora_weights(path)
    assert "\n" not in str(e.value)
    assert all(torch.equal(v, before[k]) for k, v in weights(pipe).items())
    assert pipe.get_active_adapters() == []


def test_a_layer_of_another_shape_is_named(pipe, tmp_path):
    part = random_lora(pipe.model.motion_dit, "motion_dit")
    module = sorted(part.layers)[0]
    a, b = part.layers[module]
    part.layers[module] = (torch.zeros(2, a.shape[1] + 1), b)
    path = str(tmp_path / "shape.safetensors")
    save_adapter(path, [part])
    with pytest.raises(AdapterError, match=f"transformer.{module} adapts a"):
        pipe.load_lora_weights(path)


def test_a_missing_layer_is_named(pipe, tmp_path):
    part = random_lora(pipe.model.motion_dit, "motion_dit")
    part.layers["no_such.layer"] = next(iter(part.layers.values()))
    path = str(tmp_path / "missing.safetensors")
    save_adapter(path, [part])
    with pytest.raises(AdapterError, match="transformer.no_such.layer: no such layer"):
        pipe.load_lora_weights(path)


def test_files_that_are_not_adapters(tmp_path):
    plain = str(tmp_path / "plain.safetensors")
    save_file({"w": torch.zeros(2)}, plain)
    text = tmp_path / "text.safetensors"
    text.write_text("hello")
    for path, needle in ((plain, "is not a CMD adapter"), (str(text), "is not a safetensors file"),
                         (str(tmp_path / "none.safetensors"), "no such file")):
        with pytest.raises(AdapterError, match=needle):
            read_adapter(path)
    with pytest.raises(AdapterError, match="no shipped adapter of that name"):
        check_lora_args(["no-such-adapter"])


def test_lora_spec_scale():
    assert parse_lora_spec("cyan") == ("cyan", 1.0)
    assert parse_lora_spec("cyan:0.5") == ("cyan", 0.5)
    assert parse_lora_spec("/a/b.safetensors:2") == ("/a/b.safetensors", 2.0)
    with pytest.raises(ValueError, match="must be a number"):
        parse_lora_spec("cyan:half")


def test_run_cli_with_lora_and_its_bad_input(tmp_path, adapter_file, capsys, fast_cpu):
    from engine.run import main

    base_out, out = tmp_path / "base.npy", tmp_path / "lora.npy"
    common = ["--model", TINY, "--prompt", "a red circle moving right", "--steps", "2", "--motion-steps", "2",
              "--quiet"]
    assert main(common + ["--out", str(base_out)]) == 0
    assert main(common + ["--out", str(out), "--lora", adapter_file + ":0"]) == 0
    assert np.array_equal(np.load(base_out), np.load(out))  # weight 0: the base model's video
    assert main(common + ["--out", str(out), "--lora", adapter_file]) == 0
    assert not np.array_equal(np.load(base_out), np.load(out))
    bad = tmp_path / "bad.npy"
    for value, needle in ((adapter_file + ":x", "must be a number"), (str(tmp_path / "no.safetensors"), "no such file")):
        capsys.readouterr()
        assert main(common + ["--out", str(bad), "--lora", value]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
        assert not bad.exists()


def test_join_puts_networks_of_several_files_in_one(pipe, tmp_path):
    from engine.adapters import join_adapters

    a, b, out = (str(tmp_path / f"{n}.safetensors") for n in ("a", "b", "ab"))
    save_adapter(a, [random_lora(pipe.model.content_unet, "content_unet")], steps=3)
    save_adapter(b, [random_lora(pipe.model.autoencoder, "autoencoder", modules={"output_head"})], steps=4)
    joined = join_adapters([a, b], out)
    assert set(joined.networks) == {"content_unet", "autoencoder"}
    assert joined.steps == "content_unet:3,autoencoder:4"
    with pytest.raises(AdapterError, match="both adapt the content_unet"):
        join_adapters([a, out], str(tmp_path / "bad.safetensors"))
    assert not (tmp_path / "bad.safetensors").exists()


def test_compile_backend_switches_without_recompiling(pipe, tmp_path):
    """torch.compile sees the parameters as graph inputs: an adapter loaded, rescaled or unloaded after
    compilation changes the next call's output without a new graph, and the output is eager's with the same
    adapter. (The motion DiT alone: compiling on a shared 2-core CPU is slow.)"""
    from torch._dynamo.utils import counters

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a random DiT's adaLN-Zero output layers are zero: its output would not move
        for p in pipe.model.motion_dit.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    adapter_file = str(tmp_path / "both.safetensors")
    save_adapter(adapter_file, [random_lora(pipe.model.motion_dit, "motion_dit")])
    cfg = pipe.config
    motion = torch.randn(2, *cfg.motion_shape(cfg.num_frames), generator=g)
    content = torch.randn(2, cfg.channels, cfg.height, cfg.width, generator=g)
    t, text = torch.tensor([999, 10]), torch.randn(2, cfg.text_encoder.hidden_size, generator=g)

    def step():
        with torch.no_grad():
            return pipe.backend.dit_step(motion, t, content, text)

    eager_base = step()
    pipe.load_lora_weights(adapter_file)
    eager_adapted = step()
    pipe.unload_lora_weights()
    pipe.set_backend("compile")
    torch.testing.assert_close(step(), eager_base, atol=1e-5, rtol=1e-4)  # compiles here
    graphs = counters["stats"]["unique_graphs"]
    pipe.load_lora_weights(adapter_file)
    torch.testing.assert_close(step(), eager_adapted, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(step(), eager_base, atol=1e-4)
    pipe.set_adapters("both", 0.0)
    torch.testing.assert_close(step(), eager_base, atol=1e-5, rtol=1e-4)
    pipe.unload_lora_weights()
    torch.testing.assert_close(step(), eager_base, atol=1e-5, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] == graphs  # no recompilation


@pytest.mark.gpu
def test_cudagraph_backend_sees_adapters_after_capture(tmp_path):
    """Captured graphs read the parameters' storage, which the adapters rewrite in place: a switch after
    capture takes effect on the next replay, with no new capture."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pipe = CMDPipeline.from_pretrained(TINY, device="cuda", dtype="float32")
    path = str(tmp_path / "a.safetensors")
    save_adapter(path, [random_lora(pipe.model.content_unet, "content_unet"),
                        random_lora(pipe.model.motion_dit, "motion_dit")])
    base = frames(pipe)
    pipe.load_lora_weights(path)
    adapted = frames(pipe)
    pipe.unload_lora_weights()
    pipe.set_backend("cudagraph")
    np.testing.assert_allclose(frames(pipe), base, atol=1e-4)
    captures = pipe.backend.captures
    pipe.load_lora_weights(path)
    np.testing.assert_allclose(frames(pipe), adapted, atol=1e-4)
    pipe.set_adapters("a", 0.0)
    np.testing.assert_allclose(frames(pipe), base, atol=1e-4)
    pipe.unload_lora_weights()
    np.testing.assert_allclose(frames(pipe), base, atol=1e-4)
    assert pipe.backend.captures == captures


def test_shipped_adapters_load_by_name_into_the_default_model():
    from engine.adapters import shipped_adapters

    assert {"cyan", "diagonal"} <= set(shipped_adapters())
    pipe = CMDPipeline.from_pretrained("default")
    before = weights(pipe)
    loaded = [pipe.load_lora_weights(name) for name in ("cyan", "diagonal")]
    assert loaded == ["cyan", "diagonal"] and pipe.get_active_adapters() == loaded
    assert os.path.getsize(read_adapter(os.path.join(os.path.dirname(__file__), "..", "..", "engine", "weights",
                                                     "adapters", "cyan.safetensors")).path) < 1_000_000
    pipe.unload_lora_weights()
    assert all(torch.equal(v, before[k]) for k, v in weights(pipe).items())


def test_scale_bakes_a_weight_into_the_alphas(pipe, tmp_path):
    """scale_adapter(x, f): weight 1 of the new file gives what weight f of the old one gave; the layers are
    the same, the metadata says what changed; bad factors are one-line errors that write nothing."""
    from engine.adapters import join_adapters, read_adapter, scale_adapter
    from trainer.lora import main

    a, out = str(tmp_path / "a.safetensors"), str(tmp_path / "a15.safetensors")
    save_adapter(a, [random_lora(pipe.model.motion_dit, "motion_dit")], steps=7)
    scaled = scale_adapter(a, 1.5, out)
    before = read_adapter(a).networks["motion_dit"]
    after = scaled.networks["motion_dit"]
    assert after.alpha == before.alpha * 1.5 and after.rank == before.rank and scaled.steps == "7"
    assert all(torch.equal(x, y) for k in before.layers for x, y in zip(before.layers[k], after.layers[k]))
    assert scaled.scaled == f"x1.5 (motion_dit alpha {before.alpha:g} -> {before.alpha * 1.5:g})"
    pipe.load_lora_weights(a, adapter_name="old")
    pipe.set_adapters("old", 1.5)
    old = [p.detach().clone() for p in pipe.model.motion_dit.parameters()]
    pipe.unload_lora_weights()
    pipe.load_lora_weights(out, adapter_name="new")
    new = list(pipe.model.motion_dit.parameters())
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(old, new))
    pipe.unload_lora_weights()
    for factor in ("0", "-1", "nan"):
        bad = tmp_path / f"bad{factor}.safetensors"
        assert main(["scale", a, "--factor", factor, "--out", str(bad)]) == 2 and not bad.exists()
    with pytest.raises(AdapterError, match="finite number > 0"):
        scale_adapter(a, float("inf"), str(tmp_path / "inf.safetensors"))
    assert main(["scale", a, "--factor", "2", "--out", str(tmp_path / "a2.safetensors")]) == 0
    assert read_adapter(str(tmp_path / "a2.safetensors")).networks["motion_dit"].alpha == before.alpha * 2
    # Joined with another network's part, the scaled part keeps its alpha and its note.
    b = str(tmp_path / "b.safetensors")
    save_adapter(b, [random_lora(pipe.model.autoencoder, "autoencoder", modules={"output_head"})], steps=4)
    joined = join_adapters([out, b], str(tmp_path / "joined.safetensors"))
    assert joined.networks["motion_dit"].alpha == after.alpha and joined.scaled == scaled.scaled
