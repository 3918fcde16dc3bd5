"""One writer at a time for an output (engine.atomic.output_lock): a second writer refuses in one line, a
holder killed with SIGKILL leaves nothing locked, and the commands that fill folders take the lock."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from engine.atomic import OutputBusy, lock_file, output_lock

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HOLDER = textwrap.dedent("""
    import sys, time
    from engine.atomic import output_lock
    with output_lock(sys.argv[1]):
        print("held", flush=True)
        time.sleep(600)
""")


@pytest.fixture
def holder():
    """Start a process that holds the lock of a path; yields a function path -> Popen (killed at the end)."""
    procs = []

    def start(path):
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True,
                                cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_second_writer_refuses_naming_the_holder(tmp_path, holder):
    out = tmp_path / "run"
    proc = holder(out)
    with pytest.raises(OutputBusy) as e:
        with output_lock(str(out)):
            pass
    message = str(e.value)
    assert "\n" not in message and repr(str(out)) in message and f"pid {proc.pid}" in message
    assert isinstance(e.value, ValueError)  # bad input for engine.cli.run_main: one line, exit 2
    assert not out.exists()  # the lock lives beside the output; the refusal created nothing


def test_a_killed_holder_leaves_nothing_locked(tmp_path, holder):
    out = tmp_path / "export"
    proc = holder(out)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert os.path.exists(lock_file(str(out)))  # a crash leaves the file, but not the lock
    with output_lock(str(out)) as lock:
        assert open(lock).read() == f"pid {os.getpid()} on {os.uname().nodename}"
    assert not os.path.exists(lock_file(str(out)))


def test_released_lock_is_removed_and_taken_again(tmp_path):
    out = str(tmp_path / "a" / "out.json")
    with output_lock(out):
        with pytest.raises(OutputBusy):  # the same process's second writer too
            with output_lock(out):
                pass
    assert os.listdir(tmp_path / "a") == []
    with output_lock(out):
        pass


def test_lock_is_released_on_error(tmp_path):
    out = str(tmp_path / "out")
    with pytest.raises(RuntimeError):
        with output_lock(out):
            raise RuntimeError("boom")
    with output_lock(out):
        pass


def test_export_into_a_folder_being_written_refuses(tmp_path, holder):
    from engine.configs import load_config
    from engine.models import CMDModel
    from export.onnx_export import export_model

    out = tmp_path / "onnx"
    holder(out)
    with pytest.raises(OutputBusy, match="--out"):
        export_model(CMDModel.from_config(load_config("default")), str(out), None, names=["ae_decoder"])
    assert not out.exists()


def test_compose_and_calibration_writes_refuse_while_held(tmp_path, holder):
    from engine.calibrate_cache import write_cache_data

    model = tmp_path / "model"
    model.mkdir()
    (model / "cmd_config.json").write_text("{}")
    holder(model)
    with pytest.raises(OutputBusy, match="--model"):
        write_cache_data(str(model), {"schedules": {}})
    assert (model / "cmd_config.json").read_text() == "{}"


def test_cli_refuses_a_held_run_folder_in_one_line(tmp_path, holder):
    out = tmp_path / "run"
    holder(out)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "trainer.train", "--stage", "autoencoder", "--out", str(out),
                           "--steps", "1"], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1"), timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "is being written by another process" in lines[0], lines
    assert not out.exists()
    assert time.perf_counter() - t0 < 120
