"""A backend's own needs (exported graphs or plans, TensorRT, a CUDA device) are checked before any model
loads: engine.backends.check_backend_ready, used by CMDPipeline.from_pretrained and by every CLI that takes
--backend / --backends (engine.run, engine.bench latency|memory|cache, engine.profile)."""

import importlib
import os
import subprocess
import sys

import pytest
import torch

from engine.backends import check_backend_ready

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "tests", "engine", "tiny_config.json")
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(a saved tiny model folder, its model)."""
    from engine.pipeline import CMDPipeline

    path = str(tmp_path_factory.mktemp("models") / "tiny")
    model = CMDPipeline.from_pretrained("random:" + TINY).model
    model.save_pretrained(path)
    return path, model


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    """No export anywhere: an empty $CMD_CACHE, no $CMD_ONNX_DIR / $CMD_TRT_DIR."""
    monkeypatch.setenv("CMD_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CMD_ONNX_DIR", raising=False)
    monkeypatch.delenv("CMD_TRT_DIR", raising=False)
    return tmp_path / "cache"


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any model load (from a folder or from a config) fails the test."""
    from engine.models import CMDModel

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the backend's check")

    monkeypatch.setattr(CMDModel, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(CMDModel, "from_config", classmethod(refuse))


def _tensorrt_needle() -> str:
    # Here TensorRT is missing (it says how to get it) or, where it imports, the CPU device is refused.
    return "backend 'tensorrt' needs a CUDA device" if HAS_TENSORRT else "TensorRT is not importable here"


def test_onnxruntime_needs_graphs_before_the_model_loads(tiny, empty_cache, tmp_path, monkeypatch, no_model_loads):
    from engine.pipeline import CMDPipeline

    folder, _ = tiny
    where = repr(str(empty_cache / "onnx"))
    for check in (lambda: check_backend_ready("onnxruntime", "cpu", torch.float32),
                  lambda: CMDPipeline.from_pretrained(folder, backend="onnxruntime")):
        with pytest.raises(ValueError, match=r"no ONNX graphs under .*python -m export onnx.*CMD_ONNX_DIR") as info:
            check()
        assert where in str(info.value) and "\n" not in str(info.value)
    # A folder named by the option or by $CMD_ONNX_DIR must be an export folder: named in the error.
    missing = str(tmp_path / f"graphs-{os.getpid()}")
    with pytest.raises(ValueError, match=f"not an ONNX export folder .*{missing}"):
        CMDPipeline.from_pretrained(folder, backend="onnxruntime", backend_options={"onnx_dir": missing})
    monkeypatch.setenv("CMD_ONNX_DIR", missing)
    with pytest.raises(ValueError, match=f"not an ONNX export folder .*{missing}"):
        CMDPipeline.from_pretrained(folder, backend="onnxruntime")


def test_with_an_export_the_weights_decide_after_loading(tiny, empty_cache):
    """An export in the cache passes the check; which export holds this model's graphs (and whether it has
    every graph a request needs) is for the loaded model, as before."""
    from engine.artefacts import default_export_dir
    from engine.pipeline import CMDPipeline
    from export.onnx_export import export_model

    folder, model = tiny
    out = default_export_dir(model, "float32")
    assert out.startswith(str(empty_cache))
    export_model(model, out, None, "float32", names=["ae_decoder"])
    check_backend_ready("onnxruntime", "cpu", torch.float32)
    with pytest.raises(ValueError, match=f"the graphs in '{out}' lack the content_unet, motion_dit graph"):
        CMDPipeline.from_pretrained(folder, backend="onnxruntime")


def test_tensorrt_and_cudagraph_needs_before_the_model_loads(tiny, empty_cache, no_model_loads):
    from engine.pipeline import CMDPipeline

    with pytest.raises(ValueError, match=_tensorrt_needle()):
        CMDPipeline.from_pretrained(tiny[0], backend="tensorrt")
    with pytest.raises(ValueError, match="backend 'cudagraph' needs a CUDA device, got 'cpu'"):
        CMDPipeline.from_pretrained(tiny[0], backend="cudagraph")
    if HAS_TENSORRT and torch.cuda.is_available():
        with pytest.raises(ValueError, match="backend 'tensorrt' needs plans: build them with"):
            check_backend_ready("tensorrt", "cuda", torch.float16)


def _clis(folder, backend, tmp):
    return [
        ("engine.run", ["--prompt", "x", "--model", folder, "--backend", backend, "--out", os.path.join(tmp, "v.npy")]),
        ("engine.bench", ["latency", "--model", folder, "--device", "cpu", "--backends", f"eager,{backend}"]),
        ("engine.bench", ["memory", "--model", folder, "--device", "cpu", "--backends", backend]),
        ("engine.bench", ["cache", "--model", folder, "--device", "cpu", "--backend", backend, "--settings", "none"]),
        ("engine.profile", ["--model", folder, "--device", "cpu", "--backend", backend,
                            "--out-dir", os.path.join(tmp, "profile")]),
    ]


# ids other than the names: a test keyword "tensorrt" is the marker that skips where TensorRT is missing
@pytest.mark.parametrize("backend", ["onnxruntime", "tensorrt"], ids=["ort", "trt"])
def test_every_cli_checks_its_backends_before_loading(tiny, empty_cache, tmp_path, capsys, no_model_loads, backend):
    needle = "no ONNX graphs under" if backend == "onnxruntime" else _tensorrt_needle()
    work = tmp_path / "work"
    work.mkdir()
    for module, argv in _clis(tiny[0], backend, str(work)):
        main = importlib.import_module(module).main
        assert main(argv) == 2, (module, argv)
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (module, lines)
        assert os.listdir(work) == [], (module, os.listdir(work))  # no output, not even its folder


def test_real_process_onnxruntime_without_graphs(tiny, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               CMD_CACHE=str(tmp_path / "cache"))
    env.pop("CMD_ONNX_DIR", None)
    proc = subprocess.run([sys.executable, "-m", "engine.run", "--prompt", "a red circle", "--model", tiny[0],
                           "--backend", "onnxruntime", "--out", str(tmp_path / "v.mp4")],
                          capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == (f"error: no ONNX graphs under {str(tmp_path / 'cache' / 'onnx')!r}: build them with "
                           "`python -m export onnx --model MODEL`, or name an export folder with $CMD_ONNX_DIR "
                           "(backend option onnx_dir)\n")
    assert os.listdir(tmp_path) == []  # no video, no cache folder


def test_the_check_comes_before_the_networks_are_even_imported(tiny, tmp_path):
    """engine.run refuses onnxruntime without graphs before importing diffusers and the networks (seconds of
    imports: engine.models loads its submodules on first use, engine.networks the VAE's on use)."""
    code = ("import sys; from engine.run import main; "
            f"code = main(['--prompt', 'x', '--model', {tiny[0]!r}, '--backend', 'onnxruntime', '--out', 'v.npy']); "
            "print(code, sorted(m for m in ('diffusers', 'transformers', 'engine.models.bundle') if m in sys.modules))")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               CMD_CACHE=str(tmp_path / "cache"))
    env.pop("CMD_ONNX_DIR", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=str(tmp_path),
                          timeout=300)
    assert proc.stdout.strip() == "2 []", (proc.stdout, proc.stderr)
    assert proc.stderr.startswith("error: no ONNX graphs under") and proc.stderr.count("\n") == 1
