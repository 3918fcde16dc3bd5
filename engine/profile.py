"""python -m engine.profile: where the time goes in one generation.

    python -m engine.profile [--model random:default] [--backend eager] [--out-dir profile] [--nsys]

After ``--warmup`` untimed calls, one call runs under ``torch.profiler``; the tool writes
``OUT/trace.json`` (Chrome trace format: open it in chrome://tracing or https://ui.perfetto.dev; the
pipeline's stage and per-step ranges appear as annotations) and ``OUT/ops.txt`` (the top operators),
prints a per-stage table, and prints the Nsight Systems command for a full timeline with the NVTX
ranges. ``--nsys`` is the mode that command uses: no torch.profiler, and the measured call wrapped in
``cudaProfilerStart/Stop`` so that nsys records the steady state only.
"""

import contextlib
import os
import shlex
import sys
import threading
from typing import Iterator

from engine.atomic import atomic_path, output_lock, write_text
from engine.bench import TIMED_STAGES, add_run_args, call_kwargs, resolve_run
from engine.cli import Int, Parser, run_main


def nsys_command(argv) -> str:
    """The nsys line that records this run's NVTX ranges, CUDA kernels and API calls, steady state only."""
    args = [a for a in argv if a != "--nsys"]
    return ("nsys profile --trace=cuda,nvtx,osrt,cublas,cudnn --capture-range=cudaProfilerApi "
            "--capture-range-end=stop --cuda-graph-trace=node --force-overwrite=true -o cmd-timeline "
            "python -m engine.profile --nsys " + " ".join(shlex.quote(a) for a in args))


def _stage_table(timings) -> str:
    total = timings.get("total", sum(timings.values()))
    rows = [f"{'stage':<10}{'ms':>12}{'share':>9}"]
    for stage in TIMED_STAGES:
        if stage in timings:
            rows.append(f"{stage:<10}{timings[stage] * 1e3:>12.2f}{timings[stage] / total:>9.1%}")
    rows.append(f"{'total':<10}{total * 1e3:>12.2f}{1:>9.0%}")
    return "\n".join(rows)


@contextlib.contextmanager
def _without_stderr_lines(prefix: bytes) -> Iterator[None]:
    """Drop the lines starting with ``prefix`` that anything (native code included) writes to file descriptor 2
    inside the block; every other line passes through. torch.profiler's Kineto writes "USDT:... profiler_start"
    and "profiler_stop" there from C++, whatever KINETO_LOG_LEVEL says: tracing-probe markers, not a message
    for a user, so no Python logging setting can hide them."""
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump():
        with os.fdopen(read_end, "rb") as lines:
            for line in lines:
                if not line.startswith(prefix):
                    os.write(saved, line)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last write end closes: the pump reads to its end and stops
        thread.join()
        os.close(saved)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = Parser(prog="python -m engine.profile", description=__doc__.split("\n\n")[0])
    add_run_args(parser)
    parser.add_argument("--backend", default="eager")
    parser.add_argument("--warmup", type=Int(0), default=1, help="untimed calls first (compile, capture)")
    parser.add_argument("--out-dir", default="profile", help="where trace.json and ops.txt go")
    parser.add_argument("--row-limit", type=Int(), default=25, help="operators in the table")
    parser.add_argument("--nsys", action="store_true", help="run under nsys: no torch.profiler, "
                        "cudaProfilerStart/Stop around the measured call")
    return run_main(lambda: _profile(parser.parse_args(argv), argv))


def _profile(args, argv) -> int:
    spec, device, dtype, req = resolve_run(args)
    from engine.backends import check_backend_ready
    from engine.video_io import check_output_dir

    check_backend_ready(args.backend, device, dtype)  # before the output folder and any weights

    if not args.nsys:
        check_output_dir(args.out_dir)
    import torch

    from engine.pipeline import CMDPipeline

    pipe = CMDPipeline.from_pretrained(spec, device=device, dtype=dtype, backend=args.backend)
    from engine.adapters import load_lora_args

    load_lora_args(pipe, args.loras)
    pipe.check_backend(req, args.batch)
    call = call_kwargs(args, req)
    for _ in range(args.warmup):
        pipe.run(**call)
    cuda = device.type == "cuda"
    if args.nsys:
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.profiler.start()
        result = pipe.run(**call)
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.profiler.stop()
    else:
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        with _without_stderr_lines(b"USDT:"), torch.profiler.profile(activities=activities) as prof:
            result = pipe.run(**call)
        trace = os.path.join(args.out_dir, "trace.json")
        sort = "self_device_time_total" if cuda else "self_cpu_time_total"
        ops = prof.key_averages().table(sort_by=sort, row_limit=args.row_limit)
        with output_lock(args.out_dir, "--out-dir"):  # the trace and its table from one run, not two
            os.makedirs(args.out_dir, exist_ok=True)
            with atomic_path(trace, suffix=".json") as tmp:
                prof.export_chrome_trace(tmp)
            write_text(os.path.join(args.out_dir, "ops.txt"), ops)
    print(f"profile: {args.model}, backend {args.backend}, {device} ({str(dtype).replace('torch.', '')}), "
          f"batch {args.batch}")
    print(_stage_table(result.timings))
    if not args.nsys:
        print(f"wrote {trace} (Chrome trace) and {os.path.join(args.out_dir, 'ops.txt')} (top operators)")
    print("full timeline with NVTX ranges (on a CUDA machine with Nsight Systems):")
    print("  " + nsys_command(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
