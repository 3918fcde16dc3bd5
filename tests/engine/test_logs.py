"""Issue 13.9: loading a model from Python is as quiet as the CLI (no accelerate notice per network, no weight
loading bars) unless the user asked for the libraries' logging; the libraries' settings survive a load."""

import importlib.util
import os
import subprocess
import sys

import diffusers.utils.logging as dlog
import pytest
import transformers.utils.logging as tlog

from engine.pipeline import CMDPipeline
from engine.run import main as run_main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _settings():
    return (dlog.get_verbosity(), tlog.get_verbosity(), dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled())


# The libraries whose loggers the engine must keep quiet.
LIBRARIES = ("diffusers", "transformers")


def test_a_fresh_python_loading_the_default_model_prints_nothing():
    code = ("from engine.pipeline import CMDPipeline\n"
            "pipe = CMDPipeline.from_pretrained('default')\n"
            "print('loaded', type(pipe).__name__)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY")}
    env.update(PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "loaded CMDPipeline\n" and done.stderr == "", (done.stdout, done.stderr)


def test_from_pretrained_logs_nothing_and_restores_the_libraries_settings(capsys, log_records):
    before = _settings()
    capsys.readouterr()
    with log_records(*LIBRARIES) as records:
        CMDPipeline.from_pretrained("default")
    out, err = capsys.readouterr()
    assert records.messages == [] and out == "" and err == "", (records.messages, out, err)
    assert _settings() == before


@pytest.mark.skipif(importlib.util.find_spec("accelerate") is not None,
                    reason="with accelerate installed diffusers has no notice to print")
def test_logging_asked_for_is_shown(log_records):
    verbosity = dlog.get_verbosity()
    dlog.set_verbosity_info()
    try:
        with log_records(*LIBRARIES) as records:
            CMDPipeline.from_pretrained("default")
    finally:
        dlog.set_verbosity(verbosity)
    assert any("accelerate" in m for m in records.messages), records.messages


def test_the_cli_is_as_quiet(tmp_path, capsys, log_records):
    """The CLI uses the same loaders (no global silencing of its own): with --quiet it prints its report only."""
    before = _settings()
    capsys.readouterr()
    with log_records(*LIBRARIES) as records:
        code = run_main(["--prompt", "a red circle moving right", "--steps", "1", "--motion-steps", "1", "--quiet",
                         "--out", str(tmp_path / "v.npy")])
    out, err = capsys.readouterr()
    assert code == 0 and err == "" and records.messages == [], (err, records.messages)
    assert out.startswith("wrote ") and out.count("\n") == 2, out  # "wrote ..." and the timings line
    assert _settings() == before
