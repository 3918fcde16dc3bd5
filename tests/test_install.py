"""The install guard (issue 23): no import name of ours is also another distribution's, and Hugging Face's
``kernels`` (which transformers >= 5.25 requires) works in one process with our engine.

transformers 5.25 made Hugging Face's ``kernels`` a dependency; our kernels package was then also called
``kernels``, so from the repository root ours shadowed theirs (diffusers' imports failed) and from anywhere
else theirs shadowed ours, and ``pip install .`` wrote both into one ``site-packages/kernels/``. These tests
run in the installed environment (CI: ``pip install -c constraints.txt ".[all]"``, which holds Hugging Face's
``kernels``) and fail on a tree that has the collision.
"""

import importlib.metadata as metadata
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DIST = "cmd-engine"
#: Our top-level import names (setup.py's packages). `engine`, `export` and `trainer` are the mission's layout;
#: README "Import names" says why they stay and why the kernels package is `cmd_kernels`.
TOP_LEVEL = {"cmd_kernels", "engine", "export", "trainer"}
#: Folders Python puts on sys.path while running our code: the repository root (`python -m`, pytest's
#: pythonpath), the folders of scripts run by path, and pytest's test folders (rootdir conftest, no __init__).
SCRIPT_FOLDERS = ["benchmarks", "tests", *sorted(str(d.relative_to(ROOT)) for d in (ROOT / "tests").rglob("*")
                                                  if d.is_dir() and not d.name.startswith((".", "__")))]


def _installed():
    try:
        return metadata.distribution(DIST)
    except metadata.PackageNotFoundError:
        pytest.fail(f"{DIST} is not installed in this environment: pip install -c constraints.txt -e '.[all]'")


def _providers() -> dict:
    """Top-level import name -> the set of installed distributions that provide it."""
    return {name: set(dists) for name, dists in metadata.packages_distributions().items()}


def test_our_import_names_are_ours_alone():
    _installed()
    providers = _providers()
    ours = {name for name, dists in providers.items() if DIST in dists}
    shared = {name: sorted(providers[name] - {DIST}) for name in ours if providers[name] - {DIST}}
    assert not shared, f"top-level import names also installed by other distributions: {shared}"
    assert ours == TOP_LEVEL, f"{DIST} installs top-level names {sorted(ours)}, expected {sorted(TOP_LEVEL)}"


def test_our_import_names_are_not_standard_library_names():
    clash = sorted(TOP_LEVEL & set(sys.stdlib_module_names))
    assert not clash, f"top-level names that shadow the standard library: {clash}"


def test_folders_on_sys_path_shadow_no_installed_or_standard_module():
    """A module or package in a folder that Python puts on sys.path shadows any module of the same name
    (`kernels/` at the repository root did). Checks the repository root and the script and test folders
    against the standard library and every installed distribution's top-level names."""
    taken = set(sys.stdlib_module_names) | {n for n, dists in _providers().items() if dists - {DIST}}
    clashes = []
    for folder in [".", *SCRIPT_FOLDERS]:
        for entry in (ROOT / folder).iterdir():
            name = entry.stem if entry.suffix == ".py" else entry.name
            is_module = entry.suffix == ".py" or (entry.is_dir() and any(entry.glob("*.py")))
            if is_module and name in taken and name != "conftest":
                clashes.append(f"{folder}/{entry.name}")
    assert not clashes, f"these shadow a standard-library or installed module of the same name: {clashes}"


def test_each_of_our_names_resolves_to_our_code():
    """Nothing earlier on sys.path (a stray folder, another distribution's files) takes one of our names."""
    for name in sorted(TOP_LEVEL):
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin, f"{name} is not importable"
        assert Path(spec.origin).parent.name == name and (Path(spec.origin).parent / "__init__.py").is_file(), \
            f"{name} resolves to {spec.origin}"


COEXIST = textwrap.dedent("""
    import sys
    from kernels import CUDAProperties, get_kernel  # Hugging Face's kernel hub
    import transformers.integrations.hub_kernels
    from diffusers import AutoencoderKL  # failed while ours shadowed theirs
    import kernels, cmd_kernels
    assert callable(get_kernel) and CUDAProperties and AutoencoderKL
    assert cmd_kernels.motion_attention and cmd_kernels.content_frame and cmd_kernels.decoder_fusion
    assert kernels.__file__ != cmd_kernels.__file__, kernels.__file__
    from engine.run import main
    sys.exit(main(["--prompt", "a red circle moving right", "--steps", "2", "--motion-steps", "2",
                   "--out", sys.argv[1]]))
""")


@pytest.mark.parametrize("where", ["repository root", "another folder"])
def test_hugging_face_kernels_and_our_engine_in_one_process(where, tmp_path):
    """The README's first command, with Hugging Face's `kernels` and transformers' hub-kernel integration
    imported first, in one process: from the repository root (ours used to shadow theirs) and from another
    folder (theirs used to shadow ours)."""
    try:
        metadata.distribution("kernels")
    except metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels is not installed (pip install '.[test]' installs it)")
    _installed()
    cwd = ROOT if where == "repository root" else tmp_path
    out = tmp_path / "red.npy"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)  # the kernels' references on the CPU, as a user's first run
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-c", COEXIST, str(out)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.is_file()
