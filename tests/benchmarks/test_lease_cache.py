"""benchmarks/lease_cache.py: Triton's own file cache, logging each kernel lookup as a hit or a miss.

A real compile (for sm_90, with the ptxas the Triton wheel carries; no GPU needed) in two fresh processes:
the first misses and compiles, the second finds it. Runs in subprocesses because tests/conftest.py puts
this process's Triton in interpreter mode, which compiles nothing."""

import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = textwrap.dedent("""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    @triton.jit
    def _lease_probe_kernel(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * SCALE, mask=offs < n)

    src = ASTSource(_lease_probe_kernel, {"x_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}, {"BLOCK": 64})
    print(triton.compile(src, target=GPUTarget("cuda", 90, 32)).hash)
""")


def compile_probe(tmp_path, stage, scale):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "cache"), TRITON_CACHE_MANAGER="benchmarks.lease_cache:CountingCacheManager",
               CMD_LEASE_CACHE_LOG=str(tmp_path / "cache.log"), CMD_LEASE_STAGE=stage, PYTHONPATH=str(ROOT))
    script = tmp_path / f"probe_{stage}.py"
    script.write_text(PROBE.replace("SCALE", scale))  # a fresh constant: a kernel no earlier run has cached
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.split()[-1]


def test_first_lookup_misses_and_compiles_the_second_hits(tmp_path):
    scale = f"{1 + uuid.uuid4().int % 1000}.0"
    first = compile_probe(tmp_path, "one", scale)
    second = compile_probe(tmp_path, "two", scale)
    assert first == second
    lines = [line.split("\t") for line in (tmp_path / "cache.log").read_text().splitlines()]
    entries = sorted(e for e in os.listdir(tmp_path / "cache") if (tmp_path / "cache" / e).is_dir())
    assert [line[:3] for line in lines] == [["one", "miss", "_lease_probe_kernel"], ["two", "hit", "_lease_probe_kernel"]]
    assert lines[0][3] == lines[1][3] and lines[0][3] in entries  # the cache entry (folder) of the kernel


def test_without_a_log_path_it_is_the_plain_file_cache(tmp_path, monkeypatch):
    from benchmarks.lease_cache import CountingCacheManager

    monkeypatch.delenv("CMD_LEASE_CACHE_LOG", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "c"))
    manager = CountingCacheManager("ABC")
    assert manager.get_group("k.json") is None
    manager.put_group("k.json", {"k.json": manager.put(b"{}", "k.json")})
    assert set(manager.get_group("k.json")) == {"k.json"}
    assert sorted(p.name for p in (tmp_path / "c" / "ABC").iterdir() if p.is_file()) == ["__grp__k.json", "k.json"]
