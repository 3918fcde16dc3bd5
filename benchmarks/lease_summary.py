"""The GPU lease's results (``benchmarks/gpu_lease.sh``): stage outputs merged, and one table of figures
beside their targets.

    python -m benchmarks.lease_summary collect --work WORK --out OUT   # after every stage
    python -m benchmarks.lease_summary note FILE KEY=VALUE ...         # add keys to a stage's JSON

``collect`` reads what the stages left in ``WORK`` and (re)writes four files in ``OUT``, each replaced
whole (written beside, then renamed), so a lease cut short still returns every stage that ended:

- ``summary.md``: the table (stage, figure, measured, target, met), under a line with device and versions;
- ``lease.json``: every stage (status, exit code, seconds, time limit, commands, parsed result, Triton
  cache lookups) and the table's rows: the raw figures to commit under ``benchmarks/results/``;
- ``lease.log``: the stages' logs, one after the other (each cut to its last 400 KB);
- ``raw.tar.gz``: the stages' own output files (paper_scale's JSON, table and plot, cmd_kernels.bench's JSON,
  pytest's JUnit XML, the logs), for whoever needs more than the merged JSON.

The device tool returns at most 8 files from a run: four it is.

``WORK`` holds ``stages.tsv`` (one line per stage that ended, written by the script: name, kind, status,
exit code, seconds, time limit, CMD_AUTOTUNE), ``logs/<stage>.log`` (the commands a stage ran are its
lines that start with ``$ ``), ``results/`` (``<stage>.json`` or ``<stage>.xml``, and ``env.json``) and
``cache.log`` (Triton cache lookups, ``benchmarks/lease_cache.py``). Kinds: ``setup``, ``env``, ``pytest``,
``paper_scale``, ``kernel_bench``.
"""

import ast
import io
import json
import re
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Optional

if __package__ in (None, ""):  # run as a file: the repository root holds the benchmarks package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.targets import KERNEL_TARGETS, PAPER_TARGETS, check_paper, meets  # noqa: E402
from engine.atomic import write_bytes, write_json, write_text  # noqa: E402
from engine.cli import Int, Parser, run_main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT_FILES = ("summary.md", "lease.json", "lease.log", "raw.tar.gz")
LOG_TAIL = 400_000  # bytes of each stage's log kept in lease.log
RAW_MAX_FILE = 8 << 20  # files larger than this stay out of raw.tar.gz (the device tool returns <= 16 MiB)
TSV_FIELDS = ("name", "kind", "status", "rc", "seconds", "limit_s", "autotune")

PAPER_LABELS = {
    "latency_s": "latency per video, best backend, batch 1 (image VAE decode excluded)",
    "speedup_vs_eager": "speedup over eager, same run",
    "speedup_vs_baseline": "speedup over the UNet3D baseline loop, same run",
    "peak_gb_batch1": "peak memory reserved, batch 1",
    "peak_gb_batch4": "peak memory reserved, batch 4",
}
PAPER_UNITS = {"latency_s": " s", "speedup_vs_eager": "x", "speedup_vs_baseline": "x", "peak_gb_batch1": " GB",
               "peak_gb_batch4": " GB"}


# ------------------------------------------------------------------------------------------ reading

def read_stages(work: Path) -> List[dict]:
    """The stages that ended, in order, from ``stages.tsv``."""
    path = work / "stages.tsv"
    if not path.is_file():
        return []
    stages = []
    for line in path.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) != len(TSV_FIELDS):
            continue
        s = dict(zip(TSV_FIELDS, parts))
        for key in ("rc", "seconds", "limit_s"):
            s[key] = int(s[key]) if re.fullmatch(r"-?\d+", s[key]) else None
        stages.append(s)
    return stages


def _json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def stage_commands(log: Path) -> List[str]:
    """The commands a stage ran: its log's lines that start with ``$ ``."""
    if not log.is_file():
        return []
    with open(log, errors="replace") as f:
        return [line[2:].rstrip("\n") for line in f if line.startswith("$ ")]


_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)")


def parse_junit(path: Path) -> Optional[dict]:
    """Counts and failures from pytest's JUnit XML (``--junitxml``); None when missing or unreadable."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures, seconds = [], 0.0
    for suite in ([root] if root.tag == "testsuite" else root.iter("testsuite")):
        seconds += float(suite.get("time", 0) or 0)
    for case in root.iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "errors"
                message = (child.get("message") or child.text or "").strip().splitlines()
                failures.append({"test": test_id, "kind": child.tag, "message": (message[0] if message else "")[:300]})
                break
            if child.tag == "skipped":
                outcome = "skipped"
        counts[outcome] += 1
    return dict(counts, seconds=round(seconds, 1), failures=failures, source="junit")


def parse_pytest_log(path: Path) -> Optional[dict]:
    """Counts from the last summary line of a pytest log (when no JUnit XML was written, e.g. a stage cut by
    its time limit before pytest wrote it); None when there is none."""
    if not path.is_file():
        return None
    lines = [ln for ln in path.read_text(errors="replace").splitlines()
             if _COUNT.search(ln) and re.search(r" in [\d.]+s", ln)]
    if not lines:
        return None
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    for n, word in _COUNT.findall(lines[-1]):
        key = "errors" if word.startswith("error") else word
        if key in counts:
            counts[key] += int(n)
    return dict(counts, failures=[], source="log")


def salvage_results(log: Path) -> List[dict]:
    """The ``[result] {...}`` lines paper_scale.py prints as each measurement ends (for a run cut short)."""
    if not log.is_file():
        return []
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("[result] "):
            try:
                out.append(json.loads(line[len("[result] "):]))
            except ValueError:
                pass
    return out


def stage_result(work: Path, stage: dict) -> Optional[dict]:
    """A stage's parsed output: its JSON, or for pytest stages the JUnit counts (or the log's)."""
    name, kind = stage["name"], stage["kind"]
    results, log = work / "results", work / "logs" / f"{name}.log"
    if kind == "pytest":
        return parse_junit(results / f"{name}.xml") or parse_pytest_log(log)
    data = _json(results / f"{name}.json")
    if data is None and kind == "paper_scale":
        partial = salvage_results(log)
        return {"partial": partial} if partial else None
    return data


def read_cache_log(path: Path) -> List[dict]:
    """The Triton cache lookups logged by ``benchmarks/lease_cache.py`` (stage, result, kernel, entry)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) == 4:
            rows.append(dict(zip(("stage", "result", "kernel", "entry"), parts)))
    return rows


def our_kernel_names(root: Path = ROOT) -> List[str]:
    """The Triton kernels of ``cmd_kernels/`` (the op modules in ``cmd_kernels/ops/``): module-level functions decorated
    with ``triton.jit`` (read from the source, so this works without importing torch or triton)."""
    names = []
    for path in sorted((root / "cmd_kernels").rglob("*.py")):  # cmd_kernels/ops/<op>.py
        try:
            tree = ast.parse(path.read_text())
        except (OSError, SyntaxError):
            continue
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and any(
                    (isinstance(d, ast.Attribute) and d.attr == "jit")
                    or (isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute) and d.func.attr == "jit")
                    for d in node.decorator_list):
                names.append(node.name)
    return names


def cache_lookups(work: Path, ours: List[str]) -> Dict[str, dict]:
    """Per stage: Triton cache lookups of our kernels and of others (inductor's), split into hits of the
    cache prepared before the stages (``results/carried-entries.txt``: carried from the CPU machine, or filled
    in setup), hits of an entry a stage made earlier in this run, and misses (a compile on this machine), with
    the names of our kernels that compiled."""
    carried_path = work / "results" / "carried-entries.txt"
    carried = set(carried_path.read_text().split()) if carried_path.is_file() else set()
    out: Dict[str, dict] = {}
    for row in read_cache_log(work / "cache.log"):
        s = out.setdefault(row["stage"], {
            "ours": {"hit_carried": 0, "hit_run": 0, "miss": 0}, "other": {"hit_carried": 0, "hit_run": 0, "miss": 0},
            "compiled_ours": []})
        side = "ours" if row["kernel"] in ours else "other"
        if row["result"] == "miss":
            s[side]["miss"] += 1
            if side == "ours" and row["kernel"] not in s["compiled_ours"]:
                s["compiled_ours"].append(row["kernel"])
        else:
            s[side]["hit_carried" if row["entry"] in carried else "hit_run"] += 1
    return out


# ------------------------------------------------------------------------------------------ the table

def _fmt(v, digits=3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _row(stage: str, figure: str, measured: str, target: str = "-", met=None) -> dict:
    """One table row; ``met``: True, False, None (no target) or a string (why it cannot be judged)."""
    return {"stage": stage, "figure": figure, "measured": measured, "target": target, "met": met}


def last_line(log: Path) -> Optional[str]:
    """The last non-empty line of a log (what a failed command said last), at most 200 characters."""
    if not log.is_file():
        return None
    lines = [ln.strip() for ln in _tail(log, 4096).splitlines() if ln.strip()]
    return lines[-1][:200] if lines else None


def status_row(s: dict) -> dict:
    how = {"ok": "ok", "failed": f"FAILED (exit {s['rc']})", "timed out": "TIMED OUT",
           "skipped": "not run: no time left",
           "blocked": "not run: setup failed (carried wheels or the engine's requirements)"}.get(s["status"], s["status"])
    not_run = s["status"] in ("skipped", "blocked")
    measured = how if not_run else f"{how} in {s['seconds']} s (limit {s['limit_s']} s)"
    if s["status"] in ("failed", "timed out") and s.get("last_line"):
        measured += f"; its log ends: {s['last_line']}"
    met = None if not_run else s["status"] == "ok"  # stages run in priority order: the last may not fit
    return _row(s["name"], "stage", measured, "ends ok within its limit", met)


def rows_setup(name: str, r: Optional[dict]) -> List[dict]:
    if not r:
        return [_row(name, "setup", "no record")]
    rows = []
    wheels = r.get("wheels")
    installed = ", ".join(wheels) if isinstance(wheels, list) and wheels else _fmt(wheels)
    if r.get("wheels_rc") is None:
        rows.append(_row(name, "wheels installed (carried from .lease/wheels)", installed))
    else:
        rows.append(_row(name, "wheels installed (carried from .lease/wheels)", f"{installed}; pip exit {r['wheels_rc']}",
                         "pip exit 0", r["wheels_rc"] == 0))
    req = r.get("requirements") or {}
    if req:
        unmet = [f"{d}: {row['requirement']}" for d, v in req.get("distributions", {}).items()
                 for row in v.get("requirements", []) if not row["met"]]
        missing = [d for d, v in req.get("distributions", {}).items() if v.get("installed") is None]
        rows.append(_row(name, "their requirements, against this machine's packages",
                         "all met" if req.get("ok") else "UNMET: " + "; ".join(missing + unmet), "all met",
                         bool(req.get("ok"))))
    cache = r.get("cache_check")
    fits = r.get("cache_fits")
    rows.append(_row(name, "Triton cache carried from the CPU machine (cmd_kernels.aot --use-cache)",
                     f"{r.get('carried_entries', 0)} entries; {_fmt(cache)}", "fits this Triton and GPU",
                     fits if isinstance(fits, bool) else "n/a"))
    if r.get("fill_rc") is not None:
        rows.append(_row(name, "fallback: cache filled on this machine (cmd_kernels.aot --fill-cache, parallel)",
                         f"exit {r['fill_rc']} in {_fmt(r.get('fill_seconds'))} s, {r.get('entries_after_fill', '?')} "
                         "entries", "exit 0", r["fill_rc"] == 0))
    return rows


def rows_env(name: str, env: Optional[dict]) -> List[dict]:
    if not env:
        return [_row(name, "environment", "no record")]
    smi = env.get("nvidia_smi") or {}
    device = env["device"]
    if env.get("capability"):
        device += f" (sm_{env['capability'].replace('.', '')}, {env.get('sms')} SMs, {env.get('memory_gb')} GB)"
    rows = [_row(name, "device, driver", f"{device}; driver {_fmt(env.get('driver'))}"
                 + (f"; max clocks SM {smi.get('clocks.max.sm')}, memory {smi.get('clocks.max.mem')}" if smi else "")),
            _row(name, "versions", f"torch {env['torch']} (CUDA {_fmt(env.get('cuda'))}), Triton {env.get('triton')}, "
                 f"Python {env['python']}, numpy {env.get('numpy')}, diffusers {env.get('diffusers')}")]
    c = env.get("ceilings") or {}
    if c:
        rows.append(_row(name, "copy bandwidth now (read + write)", f"{c['copy_gbps']:.4g} GB/s"))
        rows.append(_row(name, "matmul rate now" + (" (bf16)" if env.get("device_type") == "cuda" else " (fp32, CPU)"),
                         f"{c['matmul_tflops']:.4g} TFLOP/s"))
    return rows


def rows_pytest(name: str, r: Optional[dict], label: str) -> List[dict]:
    if not r:
        return [_row(name, label, "no result (no JUnit XML, no summary line)", "0 failed", False)]
    ran = r["passed"] + r["failed"] + r["errors"]
    measured = f"{r['passed']} passed, {r['failed']} failed, {r['errors']} errors, {r['skipped']} skipped"
    if r["failures"]:
        measured += "; first: " + ", ".join(f["test"].split("::")[-1] for f in r["failures"][:3])
    met = (r["failed"] + r["errors"] == 0) if ran else "n/a: no test ran here"
    return [_row(name, label, measured, "0 failed, 0 errors", met)]


def rows_paper_scale(name: str, r: Optional[dict], cuda: bool) -> List[dict]:
    if not r:
        return [_row(name, "paper-scale run", "no result")]
    if "partial" in r:
        return [_row(name, "measurements that ended before the cut", json.dumps(p)) for p in r["partial"]]
    rows = []
    settings = r.get("settings", {})
    cfg = r.get("config", {})
    rows.append(_row(name, "run", f"{cfg.get('name')} {cfg.get('num_frames')}x{cfg.get('height')}x{cfg.get('width')}, "
                     f"{settings.get('dtype')}, {settings.get('steps')} + {settings.get('motion_steps')} steps, "
                     f"CFG {settings.get('guidance')}, batches {settings.get('batch_sizes')}, median of "
                     f"{settings.get('repeats')}"))
    checks = check_paper(r)
    for key, c in checks.items():
        if c["measured"] is None:
            continue
        rule, target = PAPER_TARGETS[key]
        met = c["met"] if cuda else "n/a: targets are for a GPU"
        label = PAPER_LABELS[key].replace("best backend", f"best backend ({r.get('best_backend')})")
        rows.append(_row(name, label, f"{_fmt(c['measured'], 4)}{PAPER_UNITS[key]}", f"{rule} {target:g}{PAPER_UNITS[key]}",
                         met))
    for run in r.get("runs", []):
        s = run["stages_s"]
        rows.append(_row(name, f"{run['backend']}, batch {run['batch']}: seconds per stage",
                         " / ".join(f"{k} {_fmt(s.get(k))}" for k in ("text", "content", "motion", "decode"))
                         + f"; total {_fmt(run['latency_s'], 4)} s; peak reserved {_fmt(run.get('peak_reserved_gb'))} GB"))
    for backend, c in (r.get("vs_eager_output") or {}).items():
        rows.append(_row(name, f"output of {backend} vs eager (same seed and inputs)",
                         "identical" if c["identical"] else f"PSNR {_fmt(c['psnr_db'])} dB, max |diff| "
                         f"{_fmt(c['max_abs_diff'])}"))
    for run in (r.get("baseline") or {}).get("runs", []):
        rows.append(_row(name, f"UNet3D baseline loop ({r['baseline'].get('size')}), {run['frames']} frames, batch 1",
                         f"{_fmt(run['latency_s'], 4)} s; peak reserved {_fmt(run.get('peak_reserved_gb'))} GB"))
    if r.get("vae_decode"):
        rows.append(_row(name, "image VAE decode (apart, in no total)", f"{_fmt(r['vae_decode']['latency_s'])} s"))
    for run in r.get("scaling", []):
        rows.append(_row(name, f"{run['frames']} frames ({r.get('scaling_backend')}, batch 1)",
                         f"{_fmt(run['latency_s'], 4)} s; peak reserved {_fmt(run.get('peak_reserved_gb'))} GB"))
    return rows


def rows_kernel_bench(name: str, r: Optional[dict]) -> List[dict]:
    if not r:
        return [_row(name, "kernel benchmark", "no result")]
    rows = []
    checks = [x for x in r.get("rows", []) if "ok" in x]
    if checks:
        bad = [f"{x['name']} {x['pass']} {x['dtype']}" for x in checks if not x["ok"]]
        dtypes = sorted({x["dtype"] for x in checks})
        rows.append(_row(name, f"correctness at the benchmark shapes ({', '.join(dtypes)}), vs fp64",
                         f"{len(checks) - len(bad)}/{len(checks)} within tolerance" + (": BAD " + ", ".join(bad) if bad else ""),
                         "all", not bad))
    ceil = next((x for x in r.get("rows", []) if x.get("name") == "ceilings"), None)
    timings = [x for x in r.get("rows", []) if "median_ms" in x]
    if not timings:
        rows.append(_row(name, "kernel timings", "none: timings need a GPU"))
        return rows
    for x in timings:
        parts = [f"{x['median_ms'] * 1e3:.1f} us"]
        if x.get("pct_bw") is not None:
            parts.append(f"{x['pct_bw']:.1f}% of {ceil['copy_gbps']:.0f} GB/s" if ceil else f"{x['pct_bw']:.1f}% bw")
        if x.get("pct_peak") is not None:
            parts.append(f"{x['tflops']:.0f} TFLOP/s = {x['pct_peak']:.1f}% of the matmul rate")
        if x.get("speedup_vs_eager") is not None:
            parts.append(f"x{x['speedup_vs_eager']:.2f} vs eager")
        sdpa = {k[:-3]: v for k, v in x.items() if k.startswith("sdpa_") and k.endswith("_ms") and k != "sdpa_best_ms"}
        if sdpa:
            parts.append("SDPA " + ", ".join(f"{k[5:]} {'-' if v is None else f'{v * 1e3:.1f} us'}" for k, v in sdpa.items()))
        if x.get("speedup_vs_sdpa_best") is not None:
            parts.append(f"x{x['speedup_vs_sdpa_best']:.2f} vs the best SDPA")
        if x.get("l2_resident"):
            parts.append("L2-RESIDENT: the inputs fit in L2 even rotated, so % of DRAM bandwidth is overstated")
        elif (x.get("rotated_copies") or 1) > 1:
            parts.append(f"inputs rotated over {x['rotated_copies']} copies (past L2)")
        target, met = "-", None
        if x["name"] in KERNEL_TARGETS:
            field, rule, goal = KERNEL_TARGETS[x["name"]]
            unit = "%" if field == "pct_bw" else "x"
            what = {"pct_bw": " of bandwidth", "speedup_vs_sdpa_best": " the best SDPA",
                    "speedup_vs_eager": " the eager block"}[field]
            target, met = f"{rule} {goal:g}{unit}{what}", meets(x.get(field), rule, goal)
            if field == "pct_bw" and x.get("l2_resident"):
                met = None  # an L2 figure cannot meet a DRAM target
        rows.append(_row(name, f"{x['name']} {tuple(x['shape'])} {x['dtype']}", "; ".join(parts), target, met))
    return rows


def rows_cache(stages: List[dict], lookups: Dict[str, dict], setup: Optional[dict], dry_run: bool) -> List[dict]:
    carried_fits = bool(setup and setup.get("cache_fits"))
    rows = []
    total = {"hit_carried": 0, "hit_run": 0, "miss": 0}
    compiled = []
    for s in stages:
        c = lookups.get(s["name"])
        if not c:
            continue
        o, other = c["ours"], c["other"]
        for k in total:
            total[k] += o[k]
        compiled += [k for k in c["compiled_ours"] if k not in compiled]
        rows.append(_row("triton cache", f"{s['name']}: lookups of our kernels",
                         f"{o['hit_carried']} hits of the prepared cache, {o['hit_run']} hits of this run's compiles, "
                         f"{o['miss']} "
                         f"compiled here" + (f" ({', '.join(c['compiled_ours'])})" if c["compiled_ours"] else "")
                         + (f"; other kernels (inductor): {other['hit_carried'] + other['hit_run']} hits, "
                            f"{other['miss']} compiled" if sum(other.values()) else "")))
    if dry_run:
        rows.append(_row("triton cache", "our kernels compiled on this machine",
                         f"{total['miss']} (dry run: interpreted kernels compile nothing)", "0", "n/a: dry run"))
    else:
        rows.append(_row("triton cache", "our kernels compiled on this machine, all stages",
                         f"{total['miss']} of {sum(total.values())} lookups"
                         + (f" ({', '.join(compiled)})" if compiled else ""),
                         "0 (the carried cache holds them)", (total["miss"] == 0) if carried_fits
                         else "n/a: no fitting carried cache"))
    return rows


def build(work: Path, dry_run: bool, command: str, budget_s: Optional[int], elapsed_s: Optional[int]) -> dict:
    """Everything ``collect`` writes, as one dict: stages with their results, cache lookups, table rows."""
    stages = read_stages(work)
    ours = our_kernel_names()
    lookups = cache_lookups(work, ours)
    env = _json(work / "results" / "env.json")
    cuda = bool(env and env.get("device_type") == "cuda")
    setup = None
    rows = []
    for s in stages:
        s["commands"] = stage_commands(work / "logs" / f"{s['name']}.log")
        s["result"] = stage_result(work, s)
        s["cache"] = lookups.get(s["name"])
        s["last_line"] = last_line(work / "logs" / f"{s['name']}.log")
        rows.append(status_row(s))
        r, kind, name = s["result"], s["kind"], s["name"]
        if s["status"] == "skipped":
            continue
        if kind == "setup":
            setup = r
            rows += rows_setup(name, r)
        elif kind == "env":
            rows += rows_env(name, r)
        elif kind == "pytest":
            label = {"kernel_tests": "kernel tests, natively (all dtypes, bf16 included)",
                     "engine_tests": "engine gpu tests (cudagraph vs eager, no host sync in loops)"}.get(name, "tests")
            if dry_run:
                label += " [dry run: interpreted subset]" if name == "kernel_tests" else " [dry run]"
            rows += rows_pytest(name, r, label)
        elif kind == "paper_scale":
            rows += rows_paper_scale(name, r, cuda)
        elif kind == "kernel_bench":
            rows += rows_kernel_bench(name, r)
    rows += rows_cache(stages, lookups, setup, dry_run)
    return {"mode": "dry-run" if dry_run else "gpu", "command": command, "budget_s": budget_s, "elapsed_s": elapsed_s,
            "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "environment": env,
            "our_kernels": ours, "stages": stages, "rows": rows}


def _met(v) -> str:
    if v is True:
        return "yes"
    if v is False:
        return "**NO**"
    return "-" if v is None else str(v)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def format_summary(report: dict) -> str:
    env = report.get("environment") or {}
    head = (f"{env.get('device', 'device unknown')}; driver {_fmt(env.get('driver'))}; torch {env.get('torch')} "
            f"(CUDA {_fmt(env.get('cuda'))}), Triton {env.get('triton')}, Python {env.get('python')}; git "
            f"{(env.get('git_rev') or '?')[:10]}")
    lines = [f"# GPU lease summary ({report['mode']})", "", head,
             f"`{report['command']}`; {report['utc']}; {_fmt(report.get('elapsed_s'))} s of a "
             f"{_fmt(report.get('budget_s'))} s budget; CMD_AUTOTUNE per stage: "
             + ", ".join(f"{s['name']} {s['autotune']}" for s in report["stages"] if s["autotune"] != "-"),
             "", "| stage | figure | measured | target | met |", "|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {_cell(r['stage'])} | {_cell(r['figure'])} | {_cell(r['measured'])} | {_cell(r['target'])} "
                     f"| {_cell(_met(r['met']))} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ writing

def _tail(path: Path, limit: int) -> str:
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size > limit:
            f.seek(size - limit)
        text = f.read().decode(errors="replace")
    return (f"[... first {size - limit} bytes left out ...]\n" if size > limit else "") + text


def collect(work: Path, out: Path, dry_run: bool = False, command: str = "bash benchmarks/gpu_lease.sh OUT",
            budget_s: Optional[int] = None, elapsed_s: Optional[int] = None) -> dict:
    """Write ``summary.md``, ``lease.json``, ``lease.log`` and ``raw.tar.gz`` into ``out`` from ``work``."""
    out.mkdir(parents=True, exist_ok=True)
    report = build(work, dry_run, command, budget_s, elapsed_s)
    logs = []
    for s in report["stages"]:
        path = work / "logs" / f"{s['name']}.log"
        if path.is_file():
            logs.append(f"===== {s['name']}: {s['status']} (exit {s['rc']}, {s['seconds']} s of {s['limit_s']} s) "
                        f"=====\n{_tail(path, LOG_TAIL)}\n")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for sub in ("results", "logs"):
            folder = work / sub
            if folder.is_dir():
                for path in sorted(folder.iterdir()):
                    if path.is_file() and path.stat().st_size <= RAW_MAX_FILE:
                        tar.add(path, arcname=f"{sub}/{path.name}")
        for extra in ("stages.tsv", "cache.log"):
            if (work / extra).is_file():
                tar.add(work / extra, arcname=extra)
    write_bytes(str(out / "raw.tar.gz"), buf.getvalue())
    write_text(str(out / "lease.log"), "".join(logs))
    write_text(str(out / "lease.json"), json.dumps(report, indent=1, default=str) + "\n")
    write_text(str(out / "summary.md"), format_summary(report))
    return report


def note(path: Path, pairs: List[str]) -> None:
    """Add ``KEY=VALUE`` pairs to the JSON object in ``path`` (created if missing); a VALUE that parses as
    JSON is stored as such, anything else as a string."""
    data = _json(path) or {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"note: expected KEY=VALUE, got {pair!r}")
        try:
            data[key] = json.loads(value)
        except ValueError:
            data[key] = value
    write_json(str(path), data, indent=1)


def main(argv=None) -> int:
    p = Parser(prog="python -m benchmarks.lease_summary", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect", help="merge the stages' outputs in WORK into OUT")
    c.add_argument("--work", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--dry-run", action="store_true")
    c.add_argument("--command", default="bash benchmarks/gpu_lease.sh OUT")
    c.add_argument("--budget-s", type=Int(0), default=None)
    c.add_argument("--elapsed-s", type=Int(0), default=None)
    n = sub.add_parser("note", help="add KEY=VALUE pairs to a JSON file")
    n.add_argument("file")
    n.add_argument("pairs", nargs="+")

    def body() -> int:
        args = p.parse_args(argv)
        if args.cmd == "note":
            note(Path(args.file), args.pairs)
        else:
            collect(Path(args.work), Path(args.out), args.dry_run, args.command, args.budget_s, args.elapsed_s)
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
