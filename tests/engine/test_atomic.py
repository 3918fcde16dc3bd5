"""engine.atomic, the one home of crash-safe writes: a failure at any point leaves the old file or folder as it
was and no temporary file beside it; durable writes fsync the data before the rename and the folder after."""

import json
import os

import pytest

from engine import atomic


def _entries(folder):
    return sorted(os.listdir(folder))


def _fill(folder, files):
    for rel, data in files.items():
        os.makedirs(os.path.dirname(os.path.join(folder, rel)), exist_ok=True)
        with open(os.path.join(folder, rel), "wb") as f:
            f.write(data)


def _read_tree(folder):
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


# ------------------------------------------------------------------------------------------ files

def test_write_bytes_text_json_replace_whole_files(tmp_path):
    path = str(tmp_path / "sub" / "out.bin")  # the folder is made
    data = os.urandom(1000)
    atomic.write_bytes(path, data)
    assert open(path, "rb").read() == data and oct(os.stat(path).st_mode & 0o777) == oct(0o644)
    text = os.urandom(50).hex() + " é"
    atomic.write_text(path, text)
    assert open(path, encoding="utf-8").read() == text
    payload = {"a": [1, 2.5, None], "b": os.urandom(8).hex()}
    atomic.write_json(path, payload, indent=1)
    raw = open(path).read()
    assert json.loads(raw) == payload and raw.endswith("\n") and "\n " in raw
    assert _entries(tmp_path / "sub") == ["out.bin"]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_failure_mid_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, error):
    path = str(tmp_path / "out.bin")
    old = os.urandom(4096)
    atomic.write_bytes(path, old)
    with pytest.raises(error):
        with atomic.atomic_path(path, suffix=".bin") as tmp:
            with open(tmp, "wb") as f:
                f.write(os.urandom(100))  # half of the new content, then the writer dies
            raise error("interrupted")
    assert open(path, "rb").read() == old
    assert _entries(tmp_path) == ["out.bin"]


def test_json_that_cannot_be_written_touches_nothing(tmp_path):
    path = str(tmp_path / "r.json")
    atomic.write_json(path, {"ok": 1})
    with pytest.raises(TypeError):
        atomic.write_json(path, {"bad": object()})
    assert json.load(open(path)) == {"ok": 1} and _entries(tmp_path) == ["r.json"]


def _record_fsyncs(monkeypatch):
    """Log fsyncs (by path) and renames in the order they happen."""
    events = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fsync(fd):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", os.path.realpath(dst)))
        return real_replace(src, dst)

    def rename(src, dst):
        events.append(("rename", os.path.realpath(dst)))
        return real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "rename", rename)
    return events


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names fsynced files through /proc")
def test_durable_file_write_fsyncs_the_file_then_the_folder(tmp_path, monkeypatch):
    path = os.path.realpath(str(tmp_path / "out.bin"))
    events = _record_fsyncs(monkeypatch)
    atomic.write_bytes(path, os.urandom(64), durable=True)
    assert [e[0] for e in events] == ["fsync", "rename", "fsync"]
    assert os.path.dirname(events[0][1]) == str(os.path.realpath(tmp_path))  # the temp file beside it
    assert events[1] == ("rename", path) and events[2] == ("fsync", os.path.dirname(path))
    events.clear()
    atomic.write_bytes(path, os.urandom(64))  # not durable: no fsync
    assert [e[0] for e in events] == ["rename"]


# ---------------------------------------------------------------------------------------- folders

def test_atomic_dir_replaces_a_folder_whole(tmp_path):
    path = str(tmp_path / "model")
    first = {"a.bin": os.urandom(300), "sub/b.json": os.urandom(20)}
    with atomic.atomic_dir(path) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path) and os.path.basename(tmp).startswith(".tmp-model-")
        _fill(tmp, first)
    assert _read_tree(path) == first and oct(os.stat(path).st_mode & 0o777) == oct(0o755)
    second = {"c.bin": os.urandom(500)}
    with atomic.atomic_dir(path) as tmp:
        _fill(tmp, second)
    assert _read_tree(path) == second  # nothing of the old folder is left in it
    assert _entries(tmp_path) == ["model"]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_failure_mid_fill_keeps_the_old_folder_and_leaves_no_temp(tmp_path, error):
    path = str(tmp_path / "ckpt")
    old = {"w.safetensors": os.urandom(2048), "state.json": b'{"step": 3}'}
    with atomic.atomic_dir(path) as tmp:
        _fill(tmp, old)
    with pytest.raises(error):
        with atomic.atomic_dir(path) as tmp:
            _fill(tmp, {"w.safetensors": os.urandom(100)})
            raise error("crashed mid-save")
    assert _read_tree(path) == old
    assert _entries(tmp_path) == ["ckpt"]


def test_a_failed_final_rename_puts_the_old_folder_back(tmp_path, monkeypatch):
    path = str(tmp_path / "out")
    old = {"x": os.urandom(64)}
    with atomic.atomic_dir(path) as tmp:
        _fill(tmp, old)
    real_rename = os.rename

    def rename(src, dst):
        if os.path.basename(src).startswith(".tmp-out-"):  # the new folder's rename into place fails
            raise OSError(28, "No space left on device")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="No space"):
        with atomic.atomic_dir(path) as tmp:
            _fill(tmp, {"y": os.urandom(64)})
    assert _read_tree(path) == old and _entries(tmp_path) == ["out"]


def test_atomic_dir_refuses_a_file_before_any_work(tmp_path):
    path = tmp_path / "taken"
    path.write_bytes(b"keep")
    with pytest.raises(ValueError, match="not a folder.*taken"):
        with atomic.atomic_dir(str(path)):
            raise AssertionError("the block must not run")
    assert path.read_bytes() == b"keep" and _entries(tmp_path) == ["taken"]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names fsynced files through /proc")
def test_durable_folder_fsyncs_every_file_before_the_rename_and_the_parent_after(tmp_path, monkeypatch):
    path = os.path.realpath(str(tmp_path / "export"))
    events = _record_fsyncs(monkeypatch)
    with atomic.atomic_dir(path) as tmp:
        _fill(tmp, {"a.onnx": os.urandom(100), "d/b.bin": os.urandom(10)})
    rename = events.index(("rename", path))
    before = {os.path.relpath(p, os.path.dirname(path)).split(os.sep, 1)[-1]
              for kind, p in events[:rename] if kind == "fsync"}
    assert {"a.onnx", "d/b.bin", "d"} <= before  # every file and folder written, inside the temp folder
    assert events[rename + 1:] == [("fsync", os.path.dirname(path))]


def test_check_output_refuses_the_wrong_kind_or_an_unwritable_place_before_any_work(tmp_path):
    from engine.atomic import check_output

    a_file, a_folder = tmp_path / "report.json", tmp_path / "results"
    a_file.write_text("{}")
    a_folder.mkdir()
    assert check_output(str(a_file)) == str(a_file)  # an existing file is replaced
    assert check_output(str(a_folder / "new" / "deeper.json")) == str(a_folder / "new" / "deeper.json")
    assert check_output(str(a_folder), folder=True) == str(a_folder)
    with pytest.raises(ValueError, match=r"^--out is a folder, got .*report\.json', which is a file$"):
        check_output(str(a_file), folder=True)
    with pytest.raises(ValueError, match=r"^--json is a file, got .*results', which is a folder$"):
        check_output(str(a_folder), flag="--json")
    with pytest.raises(ValueError, match=r"cannot be written: .*report\.json' is not a writable folder"):
        check_output(str(a_file / "below.json"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "results"]  # nothing created
