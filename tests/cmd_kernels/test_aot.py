"""kernels.aot, the ahead-of-time compile check (no GPU needed), and the launch-config policy it checks.

The compile check runs in subprocesses with TRITON_INTERPRET unset (tests/conftest.py sets it for this
process, and Triton reads it when the kernels are decorated): ``--quick`` compiles the CMD_AUTOTUNE=off
config of every kernel at every config's shapes for sm_80 and sm_90 and fills a Triton cache, which a
probe then reads through the engine's real launch path (tests/cmd_kernels/aot_jit_probe.py)."""

import base64
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import triton

from cmd_kernels import aot
from cmd_kernels._triton import AUTOTUNE_MODES, KNOWN_TARGETS, Target, autotune_mode, config_key
from cmd_kernels.ops import content_frame, decoder_fusion as fusion, motion_attention as attention

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.aot  # CPU-side compile checks: the GPU lease skips them (-m "not aot")


def _compiled_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_CACHE_DIR", "CMD_AUTOTUNE")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def _run(*args, timeout=600, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env or _compiled_env(), capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """``python -m cmd_kernels.aot --quick`` (two processes, as CI runs it), its JSON and its filled cache."""
    folder = tmp_path_factory.mktemp("aot")
    report, cache = folder / "quick.json", folder / "cache"
    proc = _run("-m", "cmd_kernels.aot", "--quick", "--jobs", "2", "--json", str(report), "--fill-cache", str(cache))
    assert report.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(report.read_text()), cache


def test_quick_check_passes(quick):
    proc, report, _ = quick
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert report["summary"]["failed"] == 0 and report["summary"]["problems"] == 0
    assert all(r["ok"] and not r["problems"] for r in report["rows"])


def test_quick_check_covers_every_kernel_shape_class_and_arch(quick):
    _, report, _ = quick
    got = {(r["kernel"], r["config"], r["arch"], r["dtype"]) for r in report["rows"]}
    want = {(k, c, a, d) for k in aot.KERNELS for c in ("default", "ucf101-64", "sd21-512x1024") for a in (80, 90)
            for d in aot.DEFAULT_DTYPES.get(k, ("bfloat16",))}
    assert got == want
    assert len(report["rows"]) == len(want)  # one config each


def test_no_inference_config_spills_or_overflows_shared_memory(quick):
    _, report, _ = quick
    for r in report["rows"]:
        assert r["regs"] is not None and r["regs"] <= 255
        if r["inference"]:
            assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert r["shared"] <= KNOWN_TARGETS[r["arch"]].max_shared_mem, r


def test_attention_uses_tensor_cores_and_a_vector_pipeline(quick):
    _, report, _ = quick
    rows = [r for r in report["rows"] if r["kernel"] == "motion_attention_fwd"]
    for r in rows:
        if r["dtype"] == "float32":
            assert r["mma"] is None  # IEEE fp32 dots run on the FMA units, as designed
            continue
        assert r["mma"] == ("wgmma" if r["arch"] == 90 else "mma.sync"), r
        assert r["sass"]["HGMMA" if r["arch"] == 90 else "HMMA"] > 0
        # every config's head dim (32, 64, 72) is a multiple of 8: 16-byte rows, pipelined K/V loads
        assert r["heuristics"]["ALIGN"] == 8
        assert r["vec128_loop"] and r["loop_cp_async"].get("16", 0) > 0, r
        assert r["sass"]["LDGSTS_128"] > 0
    # The paper's head dim 72 (DiT-XL/2): strides of 72 elements are not multiples of 16, so only the
    # alignment hint gives 16-byte cp.async copies and no scalar loads of K and V in the main loop.
    d72 = [r for r in rows if r["shape"].endswith("d72") and r["dtype"] != "float32"]
    assert len(d72) == 4
    for r in d72:
        assert "16" not in r["loop_loads"] and r["loop_cp_async"]["16"] > 0, r


def test_attention_shared_memory_estimate_matches_the_compiles(quick):
    """The pruning's estimate is what Triton allocates (fp16/bf16) or at most 512 B above (fp32)."""
    _, report, _ = quick
    for r in (r for r in report["rows"] if r["kernel"] == "motion_attention_fwd"):
        config = triton.Config({k: r["launch"][k] for k in ("BLOCK_M", "BLOCK_N")}, num_warps=r["launch"]["num_warps"],
                               num_stages=r["launch"]["num_stages"])
        estimate = attention._attn_smem(config, _attention_args(int(r["shape"].rsplit("d", 1)[1]),
                                                                fp32=r["dtype"] == "float32"), r["arch"])
        assert 0 <= estimate - r["shared"] <= (512 if r["dtype"] == "float32" else 0), (r, estimate)


def test_filled_cache_holds_the_keys_the_jit_computes(quick, tmp_path):
    """The engine's networks, launched through the real launchers and the JIT under a stand-in sm_90
    driver, find every kernel in the cache that --quick --fill-cache filled, moved to another folder."""
    proc, report, cache = quick
    moved = tmp_path / "moved-cache"
    shutil.copytree(cache, moved)
    use = _run("-m", "cmd_kernels.aot", "--use-cache", str(moved))
    assert use.returncode == 0, use.stdout + use.stderr
    assert "key matches this Triton" in use.stdout
    before = sorted(os.listdir(moved))
    env = dict(_compiled_env(), TRITON_CACHE_DIR=str(moved))
    probe = _run(str(ROOT / "tests" / "cmd_kernels" / "aot_jit_probe.py"), env=env)
    assert probe.returncode == 0, probe.stdout[-3000:] + probe.stderr[-3000:]
    result = json.loads(probe.stdout.strip().splitlines()[-1])
    compiles = result["compiles"]
    # the autotuner's pruning hook (CMD_AUTOTUNE=full) gives the candidates cmd_kernels.aot compiles
    assert set(result["pruning"]) == {"_content_frame_fwd_kernel", "_content_frame_bwd_kernel",
                                      "_attention_fwd_kernel", "_decoder_fusion_fwd_kernel"}
    assert all(p["same_as_candidates"] and p["pruned"] > 1 for p in result["pruning"].values()), result["pruning"]
    names = {c["kernel"] for c in compiles}
    assert names == {"_content_frame_fwd_kernel", "_content_frame_bwd_kernel", "_attention_fwd_kernel",
                     "_modln_fwd_kernel", "_modln_bwd_kernel", "_decoder_fusion_fwd_kernel",
                     "_decoder_fusion_bwd_kernel"}
    assert all(c["cache_hit"] for c in compiles), [c for c in compiles if not c["cache_hit"]]
    filled = {r["hash"] for r in report["rows"] if r["config"] == "default" and r["arch"] == 90}
    assert {c["hash"] for c in compiles} <= filled
    assert sorted(os.listdir(moved)) == before  # nothing compiled into the cache


def test_fp32_attention_space_does_not_spill(tmp_path):
    """Every fp32 attention config the autotuner may pick, at the paper's head dim 72 (where the tiles of
    the fp16/bf16 space spill), compiles without spills for sm_80 and sm_90."""
    proc = _run("-m", "cmd_kernels.aot", "--kernel", "motion_attention_fwd", "--dtype", "float32", "--config",
                "sd21-512x1024", "--autotune", "full", "--jobs", "2", "--json", str(tmp_path / "fp32.json"))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "fp32.json").read_text())
    assert len(report["rows"]) == 2 * len(attention._ATTN_FP32)
    for r in report["rows"]:
        assert r["ok"] and r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["kept"], r


def test_use_cache_refuses_a_cache_of_another_triton_key(quick, tmp_path):
    _, _, cache = quick
    moved = tmp_path / "other"
    shutil.copytree(cache, moved)
    manifest = json.loads((moved / aot.MANIFEST).read_text())
    manifest["triton_key_sha256"] = "0" * 64
    (moved / aot.MANIFEST).write_text(json.dumps(manifest))
    ok, message = aot.use_cache(str(moved))
    assert not ok and "another build of Triton" in message
    ok, message = aot.use_cache(str(tmp_path))
    assert not ok and aot.MANIFEST in message


def test_relocate_cache_points_index_files_at_their_folder(tmp_path):
    entry = tmp_path / "ABC"
    entry.mkdir()
    (entry / "k.cubin").write_bytes(b"\0")
    (entry / "__grp__k.json").write_text(json.dumps({"child_paths": {"k.cubin": "/elsewhere/ABC/k.cubin"}}))
    assert aot.relocate_cache(str(tmp_path)) == 1
    assert json.loads((entry / "__grp__k.json").read_text()) == {"child_paths": {"k.cubin": str(entry / "k.cubin")}}


def _fake_wheel(path: Path, version: str, lib_digest: bytes, tamper: str = "") -> Path:
    """A wheel of the installed Triton's files as its RECORD lists them, with another libtriton.so."""
    dist = importlib.metadata.distribution("triton")
    lines = []
    for line in dist.read_text("RECORD").splitlines():
        name, digest, size = line.rsplit(",", 2)
        if name == "triton/_C/libtriton.so":
            digest = "sha256=" + base64.urlsafe_b64encode(lib_digest).decode().rstrip("=")
        if name == tamper:
            digest = "sha256=" + base64.urlsafe_b64encode(b"\1" * 32).decode().rstrip("=")
        lines.append(f"{name},{digest},{size}")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"triton-{version}.dist-info/RECORD", "\n".join(lines))
        z.writestr(f"triton-{version}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: triton\nVersion: {version}\n")
    return path


def test_triton_key_from_wheel_swaps_only_the_libtriton_digest(tmp_path):
    from triton.runtime.cache import triton_key

    other = hashlib.sha256(b"another build of libtriton").digest()
    key = aot.triton_key_from_wheel(str(_fake_wheel(tmp_path / "t.whl", triton.__version__, other)))
    with open(Path(triton.__file__).parent / "_C" / "libtriton.so", "rb") as f:
        here = hashlib.sha256(f.read()).hexdigest()
    assert key == triton_key().replace(here, other.hex()) and key != triton_key()
    with pytest.raises(ValueError, match="is Triton 0.0.1"):
        aot.triton_key_from_wheel(str(_fake_wheel(tmp_path / "v.whl", "0.0.1", other)))
    with pytest.raises(ValueError, match="runtime/cache.py differs"):
        aot.triton_key_from_wheel(str(_fake_wheel(tmp_path / "p.whl", triton.__version__, other,
                                                  tamper="triton/runtime/cache.py")))
    with pytest.raises(ValueError, match="not a readable Triton wheel"):
        aot.triton_key_from_wheel(str(tmp_path / "missing.whl"))


def test_bad_arguments_exit_2_before_any_work(capsys, tmp_path):
    for args, says in ((["--arch", "75"], "'75'"), (["--config", "no-such-config"], "no-such-config"),
                       (["--jobs", "0"], "got 0"), (["--triton-key-from", "x.whl"], "--fill-cache"),
                       (["--fill-cache", str(tmp_path), "--triton-key-from", str(tmp_path / "no.whl")], "no.whl"),
                       (["--use-cache", str(tmp_path / "none")], "none")):
        with pytest.raises(SystemExit) as exit_:
            aot.main(args)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "error:" in err and says in err, (args, err)
    assert os.listdir(tmp_path) == []


# -------------------------------------------------------------------------- launch-config policy

def test_autotune_mode_reads_cmd_autotune(monkeypatch):
    monkeypatch.delenv("CMD_AUTOTUNE", raising=False)
    assert autotune_mode() == "full"
    for mode in AUTOTUNE_MODES:
        monkeypatch.setenv("CMD_AUTOTUNE", mode.upper())
        assert autotune_mode() == mode
    monkeypatch.setenv("CMD_AUTOTUNE", "fastest")
    with pytest.raises(ValueError, match="'fastest'"):
        autotune_mode()


def _attention_args(head_dim, fp32=False):
    d1, d2, tail = attention._head_split(head_dim)
    return {"D1": d1, "D2": d2, "TAIL": tail, "IS_FP32": fp32, "HEAD_DIM": head_dim}


def test_modes_draw_from_one_space_and_off_is_one_config():
    """fast and off pick from the full space (a cache filled with full covers them); off is one config."""
    for kernel, args in ((attention._attention_fwd_kernel, _attention_args(72)),
                         (attention._attention_fwd_kernel, _attention_args(72, fp32=True)),
                         (content_frame._content_frame_fwd_kernel, {}), (content_frame._content_frame_bwd_kernel, {}),
                         (fusion._decoder_fusion_fwd_kernel, {})):
        for target in KNOWN_TARGETS.values():
            full = {config_key(c) for c in kernel.candidates(args, "full", target)}
            assert {config_key(c) for c in kernel.candidates(args, "fast", target)} <= full
            off = kernel.candidates(args, "off", target)
            assert len(off) == 1 and config_key(off[0]) in full
            assert {config_key(c) for c in kernel.configs} >= full


def test_shared_memory_pruning_before_compile():
    """Configs whose K/V pipeline cannot fit the target's shared memory are not candidates; the off
    config falls back to a smaller tile on a small target."""
    small = Target(86, 65536, 84)  # a GPU with 64 KB of shared memory per block
    args = _attention_args(128)
    kernel = attention._attention_fwd_kernel
    full = kernel.candidates(args, "full", KNOWN_TARGETS[90])
    fits_small = kernel.candidates(args, "full", small)
    assert 0 < len(fits_small) < len(full) < len(kernel.space(args, "full"))  # H100: 228 KB, not all fit either
    assert all(attention._attn_smem(c, args, 86) <= small.max_shared_mem for c in fits_small)
    assert all(attention._attn_smem(c, args, 90) <= KNOWN_TARGETS[90].max_shared_mem for c in full)
    off_big = kernel.candidates(args, "off", KNOWN_TARGETS[90])[0]
    off_small = kernel.candidates(args, "off", small)[0]
    assert (off_big.kwargs, off_big.num_warps, off_big.num_stages) == ({"BLOCK_M": 128, "BLOCK_N": 64}, 8, 3)
    assert attention._attn_smem(off_small, args, 86) <= small.max_shared_mem < attention._attn_smem(off_big, args, 86)
    with pytest.raises(RuntimeError, match="no launch config fits"):
        attention._attention_fwd_kernel.candidates(args, "full", Target(70, 1024, 80))


def test_dropped_fusion_config():
    assert not any(c.kwargs["BLOCK_T"] == 32 and c.num_warps == 2 for c in fusion._FWD_CONFIGS)
