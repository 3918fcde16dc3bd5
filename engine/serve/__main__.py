"""python -m engine.serve: the HTTP video API (docs/serving.md), a thin layer over :mod:`engine.serve.app`.

    python -m engine.serve --model default                      # http://127.0.0.1:8000/
    CMD_SERVE_API_KEY=... python -m engine.serve --host 0.0.0.0  # off loopback: an API key is required

Every setting is checked before the server starts (bad input: one line, exit code 2). SIGTERM or Ctrl-C stops
it gracefully: it stops accepting, lets the running batch finish (at most --shutdown-grace seconds, then
re-queues it) and exits; queued jobs stay in the store for the next start.
"""

import ipaddress
import os
import sys

from engine.cli import Parser, run_main

API_KEY_ENV = "CMD_SERVE_API_KEY"


def default_store() -> str:
    """The job store's default folder: ``<cache root>/serve`` (``$CMD_CACHE`` or ``~/.cache/cmd-engine``)."""
    from engine.artefacts import cache_root

    return os.path.join(cache_root(), "serve")


def build_parser() -> Parser:
    p = Parser(prog="python -m engine.serve", description="Serve a CMD model over HTTP (OpenAI-style video jobs).")
    p.add_argument("--model", default="default", help="'default' (shipped weights), a model folder, or random:<config>")
    p.add_argument("--backend", default="eager", help="eager, compile, cudagraph, onnxruntime or tensorrt")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N; several, comma-separated: one worker each")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of torch (default: torch's; 1 is fastest on a shared or busy CPU)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (off loopback needs an API key)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--store", default=None, help="folder of the job database and the videos (default: "
                   "$CMD_CACHE/serve or ~/.cache/cmd-engine/serve)")
    p.add_argument("--max-batch", type=int, default=8, help="jobs per pipeline call at most")
    p.add_argument("--max-wait-ms", type=float, default=50.0, help="how long a batch waits for companions")
    p.add_argument("--max-queue", type=int, default=256, help="unfinished jobs at most; beyond: 429")
    p.add_argument("--ttl", type=float, default=24 * 3600.0, help="seconds a finished video is kept")
    p.add_argument("--api-key", default=None, help=f"required as 'Authorization: Bearer KEY' (or set ${API_KEY_ENV}, "
                   "which other users cannot read from the process list)")
    p.add_argument("--max-body-mb", type=float, default=16.0, help="request body limit (MB)")
    p.add_argument("--max-prompt-chars", type=int, default=2000)
    p.add_argument("--max-image-mb", type=float, default=8.0, help="uploaded image limit (MB)")
    p.add_argument("--max-image-pixels", type=int, default=4096 * 4096, help="uploaded image limit (width x height)")
    p.add_argument("--shutdown-grace", type=float, default=30.0,
                   help="seconds a running batch may finish at shutdown before it is re-queued")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def settings_from(args):
    """Parsed flags -> :class:`engine.serve.app.ServeSettings`; a one-line ValueError for a bad value."""
    from engine.serve.app import ServeSettings
    from engine.serve.params import Limits

    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    if not is_loopback(args.host) and not api_key:
        raise ValueError(f"--host {args.host} is not a loopback address: serving off this machine needs an API key "
                         f"(--api-key or ${API_KEY_ENV})")
    if api_key is not None and len(api_key) < 16:
        raise ValueError(f"the API key is too short: {len(api_key)} characters, at least 16")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be between 1 and 65535, got {args.port}")
    for flag, value in (("--max-batch", args.max_batch), ("--max-queue", args.max_queue),
                        ("--max-prompt-chars", args.max_prompt_chars), ("--max-image-pixels", args.max_image_pixels)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    for flag, value in (("--max-wait-ms", args.max_wait_ms), ("--ttl", args.ttl), ("--max-body-mb", args.max_body_mb),
                        ("--max-image-mb", args.max_image_mb), ("--shutdown-grace", args.shutdown_grace)):
        if not (value >= 0 and value < float("inf")):
            raise ValueError(f"{flag} must be a finite number >= 0, got {value:g}")
    limits = Limits(body_bytes=int(args.max_body_mb * (1 << 20)), prompt_chars=args.max_prompt_chars,
                    image_bytes=int(args.max_image_mb * (1 << 20)), image_pixels=args.max_image_pixels)
    return ServeSettings(store=args.store or default_store(), model=args.model, backend=args.backend,
                         devices=[d.strip() for d in args.device.split(",") if d.strip()], dtype=args.dtype,
                         max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                         ttl_s=args.ttl, api_key=api_key, limits=limits, shutdown_grace_s=args.shutdown_grace)


def main(argv=None) -> int:
    def body():
        args = build_parser().parse_args(argv)
        settings = settings_from(args)
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"--threads must be >= 1, got {args.threads}")
            import torch

            torch.set_num_threads(args.threads)
        import uvicorn

        from engine.serve.app import Server, create_app

        server = Server(settings)  # the model spec, backend, devices and store checked (and locked) here
        app = create_app(server)
        # uvicorn handles SIGTERM and Ctrl-C: it stops accepting, ends open requests, then the app's lifespan
        # stops the workers (engine.serve.app.create_app).
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                    timeout_graceful_shutdown=max(1, int(args.shutdown_grace)))
        return 0

    return run_main(body, interrupted="interrupted")


if __name__ == "__main__":
    sys.exit(main())
