"""The GPU lease's first stages (``benchmarks/gpu_lease.sh``): what the machine is, what it can do now.

    python -m benchmarks.lease_env env --json FILE          # stage a: device, driver, versions, ceilings
    python -m benchmarks.lease_env requirements DIST ...    # are DIST's requirements met here? (JSON)

``env`` measures the two ceilings the kernels are set against, in this run: on CUDA with
:func:`cmd_kernels.measure.ceilings` (a 1 GiB device copy, read + write, and an 8192^3 bf16 matmul, both timed as
CUDA-graph replays); on a CPU (the lease's dry run) a small wall-clock copy and float32 matmul, labelled as
such, which say nothing about a GPU.
"""

import os
import re
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional

from engine.atomic import write_json
from engine.cli import Parser, run_main


def _run(cmd: List[str], timeout: float = 20) -> Optional[str]:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def nvidia_smi() -> Optional[Dict[str, str]]:
    """Driver version and the card as nvidia-smi reports them (None where there is no nvidia-smi)."""
    if shutil.which("nvidia-smi") is None:
        return None
    fields = ("name", "driver_version", "memory.total", "clocks.max.sm", "clocks.max.mem", "power.limit")
    out = _run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"])
    if not out:
        return None
    values = [v.strip() for v in out.splitlines()[0].split(",")]
    return dict(zip(fields, values))


def environment() -> dict:
    """Device, driver, versions and the ceilings measured now (stage a of the lease):
    :func:`cmd_kernels.measure.environment` with the lease's settings (``CMD_AUTOTUNE``, ``TRITON_CACHE_DIR``,
    ``TRITON_INTERPRET``), the card's properties and nvidia-smi's driver on CUDA, and
    :func:`cmd_kernels.measure.ceilings`."""
    import torch

    from cmd_kernels import measure

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    env = dict(measure.environment(device), cmd_autotune=os.environ.get("CMD_AUTOTUNE"),
               triton_cache_dir=os.environ.get("TRITON_CACHE_DIR"), triton_interpret=os.environ.get("TRITON_INTERPRET"))
    if cuda:
        props = torch.cuda.get_device_properties(0)
        env.update(capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                   memory_gb=round(props.total_memory / 1e9, 1), nvidia_smi=nvidia_smi())
        env["driver"] = (env["nvidia_smi"] or {}).get("driver_version")
        method = ("cmd_kernels.measure.ceilings: 1 GiB device copy (read + write) and 8192^3 bf16 matmul, "
                  "CUDA-graph replays")
    else:
        env.update(capability=None, sms=None, memory_gb=None, nvidia_smi=None, driver=None)
        method = ("cmd_kernels.measure.ceilings on a CPU: 64 MiB float32 copy and 512^3 float32 matmul, best wall "
                  "clock (dry run; says nothing about a GPU)")
    start = time.perf_counter()
    env["ceilings"] = dict(measure.ceilings(device), method=method)
    env["ceilings"]["seconds"] = round(time.perf_counter() - start, 2)
    return env


_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def requirements(dists: List[str]) -> dict:
    """For each installed distribution in ``dists``: each requirement in its metadata that applies here
    (markers evaluated, extras left out), the version installed and whether it satisfies it. A
    distribution that is not installed is reported as such. ``ok`` is True when everything is met."""
    from importlib import metadata

    from packaging.requirements import Requirement

    out, ok = {}, True
    for dist in dists:
        try:
            reqs = metadata.requires(dist) or []
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = {"installed": None, "requirements": []}
            ok = False
            continue
        rows = []
        for text in reqs:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue  # an extra's requirement, or one for another Python or platform
            try:
                have = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                have = None
            met = have is not None and req.specifier.contains(have, prereleases=True)
            ok &= met
            rows.append({"requirement": str(req), "installed": have, "met": met})
        out[dist] = {"installed": version, "requirements": rows}
    return {"ok": ok, "distributions": out}


def main(argv=None) -> int:
    p = Parser(prog="python -m benchmarks.lease_env", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("env", help="device, driver, versions and the ceilings measured now")
    e.add_argument("--json", required=True)
    r = sub.add_parser("requirements", help="check that installed distributions have their requirements met")
    r.add_argument("dists", nargs="+")
    r.add_argument("--json", default=None)
    return run_main(lambda: _command(p.parse_args(argv)))


def _command(args) -> int:
    if args.cmd == "env":
        env = environment()
        write_json(args.json, env, indent=1)
        c = env["ceilings"]
        print(f"{env['device']}; driver {env['driver']}; torch {env['torch']} (CUDA {env['cuda']}), Triton "
              f"{env['triton']}, Python {env['python']}; copy {c['copy_gbps']:.0f} GB/s, matmul "
              f"{c['matmul_tflops']:.3g} TFLOP/s")
        return 0
    report = requirements(args.dists)
    if args.json:
        write_json(args.json, report, indent=1)
    for dist, d in report["distributions"].items():
        missing = [row["requirement"] for row in d["requirements"] if not row["met"]]
        print(f"{dist} {d['installed']}: " + ("not installed" if d["installed"] is None else
                                              "requirements met" if not missing else "UNMET " + ", ".join(missing)))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
