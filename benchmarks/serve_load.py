"""Load test of the HTTP server (``python -m engine.serve``) on 127.0.0.1, bounded: it stops by itself.

    python -m benchmarks.serve_load --out benchmarks/results/serve_load.json

Three phases, each on a fresh server and store, with the same requests (prompt i, seed i):

1. ``sequential``: the requests one at a time through the server (each waits for the previous video);
2. ``concurrent``: ``--clients`` concurrent clients share the requests: throughput against (1) is the batching
   gain; p50/p95 latency (create to completed, as a client sees it); errors;
3. ``kill``: as (2), but the server is killed (``kill -9``) once ``--kill-after`` videos are done, and restarted
   on the same store; clients retry with the same ``Idempotency-Key``. Every accepted job must complete, and
   the store must hold exactly one job per request (no duplicates).

Writes the raw JSON (``--out``) and prints a table. The machine's load average is recorded before and after
(the CPU may be shared). :class:`ServerProcess` (start, wait ready, kill) is also what the server tests use.
"""

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

from engine.cli import Parser, fail

TERMINAL = ("completed", "failed", "cancelled")
POLL_GROWTH, POLL_MAX_S = 1.25, 1.0  # a client's status polls: from --poll seconds apart, growing to 1 s


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m engine.serve`` in a subprocess on 127.0.0.1: ``start()``, ``wait_ready()``, ``kill()`` (-9),
    ``terminate()`` (SIGTERM); its output goes to ``log``. The Triton interpreter is left off (the CPU runs the
    kernels' references), whatever the caller's environment says."""

    def __init__(self, store: str, args: List[str], port: Optional[int] = None, log: Optional[str] = None,
                 env: Optional[Dict[str, str]] = None):
        self.store, self.args = store, list(args)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log or os.path.join(store + ".log")
        self.env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        self.env.update({"HF_HUB_OFFLINE": "1", **(env or {})})
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "ServerProcess":
        cmd = [sys.executable, "-m", "engine.serve", "--store", self.store, "--port", str(self.port), *self.args]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        return self

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Until /readyz answers 200; RuntimeError (with the log's tail) if the process ends or time runs out."""
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}: {self.tail()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the server was not ready in {timeout:g} s: {self.tail()}")

    def tail(self, lines: int = 20) -> str:
        with open(self.log, errors="replace") as f:
            return "".join(f.readlines()[-lines:])

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def terminate(self, timeout: float = 120.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


# --------------------------------------------------------------------------------------------- clients
class Client:
    """One simulated user: create a job (retrying with its Idempotency-Key through errors, 429 and 503), then
    poll it until it is finished."""

    def __init__(self, http, url: str, poll_s: float):
        self.http, self.url, self.poll_s = http, url, poll_s
        self.retries = 0

    async def _call(self, method: str, path: str, deadline: float, **kwargs):
        import httpx

        while True:
            try:
                r = await self.http.request(method, self.url + path, **kwargs)
                if r.status_code not in (429, 503):
                    return r
                wait = float(r.headers.get("Retry-After", "1"))
            except httpx.TransportError:  # the server is down (killed, restarting)
                wait = 0.5
            self.retries += 1
            if time.monotonic() + wait > deadline:
                raise TimeoutError(f"{method} {path}: no answer before the deadline")
            await asyncio.sleep(wait)

    async def run(self, i: int, body: Dict, deadline: float) -> Dict:
        started = time.monotonic()
        key = f"load-{i}-{body['seed']}"
        r = await self._call("POST", "/v1/videos", deadline, json=body, headers={"Idempotency-Key": key})
        if r.status_code != 200:
            return {"request": i, "error": f"create: {r.status_code} {r.text[:200]}"}
        job = r.json()
        poll = self.poll_s
        while job["status"] not in TERMINAL:
            await asyncio.sleep(poll)
            poll = min(POLL_MAX_S, poll * POLL_GROWTH)  # back off, as a client of a long job should
            r = await self._call("GET", f"/v1/videos/{job['id']}", deadline)
            if r.status_code != 200:
                return {"request": i, "id": job["id"], "error": f"get: {r.status_code} {r.text[:200]}"}
            job = r.json()
        out = {"request": i, "id": job["id"], "status": job["status"], "latency_s": time.monotonic() - started,
               "batch_size": job["timings"].get("batch_size"), "retries": self.retries}
        if job["status"] != "completed":
            out["error"] = f"{job['status']}: {job['error']}"
        return out


async def drive(url: str, bodies: List[Dict], clients: int, timeout_s: float, poll_s: float,
                on_done=None) -> List[Dict]:
    """``clients`` concurrent clients take the requests in order; each result as :meth:`Client.run`'s."""
    import httpx

    queue = asyncio.Queue()
    for i, body in enumerate(bodies):
        queue.put_nowait((i, body))
    results: List[Dict] = []
    deadline = time.monotonic() + timeout_s

    async def user(http):
        client = Client(http, url, poll_s)
        while not queue.empty():
            i, body = queue.get_nowait()
            try:
                result = await client.run(i, body, deadline)
            except TimeoutError as e:
                result = {"request": i, "error": str(e)}
            results.append(result)
            if on_done is not None:
                await on_done(results)

    async with httpx.AsyncClient(timeout=30) as http:
        await asyncio.gather(*(user(http) for _ in range(clients)))
    return sorted(results, key=lambda r: r["request"])


def summary(results: List[Dict], wall_s: float) -> Dict:
    done = [r for r in results if r.get("status") == "completed"]
    lat = sorted(r["latency_s"] for r in done)
    q = statistics.quantiles(lat, n=20, method="inclusive") if len(lat) > 1 else lat * 19
    sizes = [r["batch_size"] for r in done if r.get("batch_size")]
    return {"requests": len(results), "completed": len(done), "errors": sum("error" in r for r in results),
            "wall_s": wall_s, "videos_per_s": len(done) / wall_s if wall_s > 0 else None,
            "latency_p50_s": statistics.median(lat) if lat else None, "latency_p95_s": q[18] if lat else None,
            "mean_batch_size": statistics.mean(sizes) if sizes else None,
            "client_retries": sum(r.get("retries", 0) for r in results)}


def store_jobs(store: str) -> List[Dict]:
    import sqlite3

    db = sqlite3.connect(os.path.join(store, "jobs.sqlite3"))
    rows = db.execute("SELECT id, status, idempotency_key, attempts FROM jobs").fetchall()
    db.close()
    return [dict(zip(("id", "status", "idempotency_key", "attempts"), r)) for r in rows]


# --------------------------------------------------------------------------------------------- phases
def phase(name: str, args, bodies: List[Dict], clients: int, root: str, kill_after: Optional[int] = None) -> Dict:
    store = os.path.join(root, name)
    server = ServerProcess(store, args.server_args).start()
    server.wait_ready(args.timeout)
    kills = []

    async def maybe_kill(results):
        nonlocal server
        done = sum(r.get("status") == "completed" for r in results)
        if kill_after is not None and not kills and done >= kill_after:
            jobs = store_jobs(store)
            kills.append({"after_completed": done, "jobs_in_store": len(jobs),
                          "unfinished": sum(j["status"] in ("queued", "in_progress") for j in jobs)})
            server.kill()  # kill -9 in the middle of the load
            restart = time.monotonic()
            server = ServerProcess(store, args.server_args, port=server.port, log=server.log).start()
            await asyncio.get_running_loop().run_in_executor(None, server.wait_ready, args.timeout)
            kills[-1]["restart_s"] = time.monotonic() - restart

    started = time.monotonic()
    results = asyncio.run(drive(server.url, bodies, clients, args.timeout, args.poll, maybe_kill))
    wall = time.monotonic() - started
    code = server.terminate()
    out = {"clients": clients, **summary(results, wall), "server_exit_code_on_sigterm": code, "kills": kills}
    jobs = store_jobs(store)
    ids = [r.get("id") for r in results if r.get("id")]
    out["store"] = {"jobs": len(jobs), "distinct_client_ids": len(set(ids)),
                    "completed": sum(j["status"] == "completed" for j in jobs),
                    "distinct_idempotency_keys": len({j["idempotency_key"] for j in jobs}),
                    "jobs_run_twice": sum(j["attempts"] > 1 for j in jobs)}
    out["errors_detail"] = [r for r in results if "error" in r][:10]
    return out


def load_average() -> List[float]:
    return list(os.getloadavg())


def table(report: Dict) -> str:
    rows = ["| phase | clients | videos | errors | wall (s) | videos/s | p50 (s) | p95 (s) | mean batch |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name in ("sequential", "concurrent", "kill"):
        p = report["phases"].get(name)
        if p:
            rows.append(f"| {name} | {p['clients']} | {p['completed']}/{p['requests']} | {p['errors']} | "
                        f"{p['wall_s']:.1f} | {p['videos_per_s']:.3f} | {p['latency_p50_s']:.2f} | "
                        f"{p['latency_p95_s']:.2f} | {p['mean_batch_size']:.2f} |")
    return "\n".join(rows)


def check(report: Dict) -> List[str]:
    """What the load test demands; the failures, as lines."""
    bad = []
    for name, p in report["phases"].items():
        if p["errors"] or p["completed"] != p["requests"]:
            bad.append(f"{name}: {p['errors']} errors, {p['completed']} of {p['requests']} completed")
        if p["store"]["jobs"] != p["requests"] or p["store"]["distinct_client_ids"] != p["requests"]:
            bad.append(f"{name}: {p['store']['jobs']} jobs in the store for {p['requests']} requests")
    if "kill" in report["phases"] and not report["phases"]["kill"]["kills"]:
        bad.append("kill: the server was never killed (too few videos before --kill-after?)")
    return bad


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m benchmarks.serve_load", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--steps", type=int, default=None, help="denoising steps of both loops (default: the model's)")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-wait-ms", type=float, default=100.0)
    p.add_argument("--kill-after", type=int, default=None, help="videos done before the kill (default: a quarter)")
    p.add_argument("--phases", default="sequential,concurrent,kill")
    p.add_argument("--threads", type=int, default=1, help="the server's torch CPU threads")
    p.add_argument("--poll", type=float, default=0.1,
                   help=f"seconds before a client's first status poll (then x{POLL_GROWTH} each, at most {POLL_MAX_S} s)")
    p.add_argument("--timeout", type=float, default=3600.0, help="each phase ends after this many seconds")
    p.add_argument("--out", default=None, help="raw JSON results")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    phases = [x for x in args.phases.split(",") if x]
    if any(x not in ("sequential", "concurrent", "kill") for x in phases):
        fail(f"--phases: choose from sequential, concurrent, kill; got {args.phases!r}")
    if args.requests < 1 or args.clients < 1:
        fail("--requests and --clients must be >= 1")
    args.server_args = ["--model", args.model, "--max-batch", str(args.max_batch),
                        "--max-wait-ms", str(args.max_wait_ms), "--max-queue", str(max(256, args.requests)),
                        "--log-level", "warning", "--threads", str(args.threads)]
    steps = {} if args.steps is None else {"steps": args.steps, "motion_steps": args.steps}
    prompts = ["a red circle moving right", "a blue square moving down", "a green circle moving left",
               "a yellow square moving up"]
    bodies = [{"prompt": prompts[i % len(prompts)], "seed": i, **steps} for i in range(args.requests)]
    kill_after = args.kill_after if args.kill_after is not None else max(1, args.requests // 4)
    report = {"command": "python -m benchmarks.serve_load " + " ".join(argv if argv is not None else sys.argv[1:]),
              "cpus": os.cpu_count(), "load_average_before": load_average(), "requests": args.requests,
              "clients": args.clients, "steps": args.steps, "server_args": args.server_args, "phases": {},
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with tempfile.TemporaryDirectory(prefix="serve-load-") as root:
        for name in phases:
            clients = 1 if name == "sequential" else args.clients
            report["phases"][name] = phase(name, args, bodies, clients, root,
                                           kill_after if name == "kill" else None)
            print(f"{name}: {json.dumps({k: v for k, v in report['phases'][name].items() if k != 'errors_detail'})}",
                  flush=True)
    report["load_average_after"] = load_average()
    if "sequential" in report["phases"] and "concurrent" in report["phases"]:
        report["batching_gain"] = (report["phases"]["concurrent"]["videos_per_s"]
                                   / report["phases"]["sequential"]["videos_per_s"])
    report["failures"] = check(report)
    if args.out:
        from engine.atomic import write_json

        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        write_json(args.out, report)
    print(table(report))
    if "batching_gain" in report:
        print(f"batching gain (concurrent / sequential videos per second): {report['batching_gain']:.2f}x")
    print(f"load average before {report['load_average_before']}, after {report['load_average_after']} "
          f"({report['cpus']} CPUs)")
    for line in report["failures"]:
        print(f"FAILED: {line}", file=sys.stderr)
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
