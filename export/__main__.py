"""python -m export onnx|check|tensorrt: the export workflow on the command line.

    python -m export onnx --model MODEL [--out DIR] [--precision float32|float16] [--opset N]
        [--network NAME ...] [--bucket FxHxW ...] [--max-batch N] [--external-data auto|always|never]
    python -m export check --onnx DIR [DIR ...] [--model MODEL] [--network NAME ...] [--json PATH]
    python -m export tensorrt --onnx DIR --out DIR [--precision fp16|bf16|fp32] [--fp8]   # precision: the export's
        [--timing-cache PATH] [--workspace-gb N] [--network NAME ...] [--force] [--check-only]

MODEL: ``default`` (the shipped weights), a CMD model folder, or ``random:<config>``. Exit codes:
0 success, 1 a check failed (parity or parser compatibility) or a build failed, 2 bad input.
"""

import argparse
import os
import sys
from typing import List, Optional

from engine.atomic import check_output
from engine.cli import Int, Number, Parser, run_main


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m export", description="ONNX export, checks, TensorRT plans")
    sub = parser.add_subparsers(dest="command", required=True)

    onnx = sub.add_parser("onnx", help="export every network of a model to ONNX")
    onnx.add_argument("--model", default="default", help="default, a model folder, or random:<config>")
    onnx.add_argument("--out", help="output folder (default: <cache>/onnx/<config>-<weights hash>-<precision>)")
    onnx.add_argument("--precision", default="float32", help="float32 or float16")
    onnx.add_argument("--opset", type=Int(), default=None, help="ONNX opset (18..24, default 18)")
    onnx.add_argument("--network", action="append", help="only this network (repeatable)")
    onnx.add_argument("--bucket", action="append", help="shape bucket FRAMESxHEIGHTxWIDTH, one of the sizes the "
                                                        "model serves (repeatable; default: all of them)")
    onnx.add_argument("--max-batch", type=Int(), default=None, help="videos per call the graphs serve (default 4)")
    onnx.add_argument("--external-data", default="auto", choices=("auto", "always", "never"),
                      help="weights in a separate .onnx.data file: past 2 GB (auto), always or never")

    check = sub.add_parser("check", help="run exported graphs in onnxruntime against PyTorch")
    check.add_argument("--onnx", nargs="+", required=True, help="export folder(s), e.g. a float32 and a float16 one")
    check.add_argument("--model", help="the model they came from (default: the one their manifest names)")
    check.add_argument("--network", action="append", help="only this network (repeatable)")
    check.add_argument("--json", help="also write the rows to this JSON file")

    trt = sub.add_parser("tensorrt", help="build TensorRT plans from an export folder")
    trt.add_argument("--onnx", required=True, help="an export folder (python -m export onnx)")
    trt.add_argument("--out", help="plan folder (the plan cache); required unless --check-only")
    trt.add_argument("--precision", default=None,
                     help="fp16, bf16 or fp32: must be the export's (plans are strongly typed); default: the export's")
    trt.add_argument("--fp8", action="store_true", help="FP8 from the graphs' FP8 Q/DQ nodes (compute capability 8.9+)")
    trt.add_argument("--timing-cache", help="timing cache file (default: OUT/timing-<TensorRT>-<GPU>-sm<CC>.cache)")
    trt.add_argument("--workspace-gb", type=Number(above=0.0), default=None,
                     help="builder workspace limit in GiB (default 8)")
    trt.add_argument("--network", action="append", help="only this network (repeatable)")
    trt.add_argument("--force", action="store_true", help="rebuild even where the plan cache has the plan")
    trt.add_argument("--refit", action="store_true",
                     help="refittable plans: adapters (--lora) refit their weights instead of a rebuild")
    trt.add_argument("--check-only", action="store_true",
                     help="only check the graphs against TensorRT's ONNX operator table (no TensorRT needed)")
    return parser


def _cmd_onnx(args) -> int:
    from engine.artefacts import cache_root, default_export_dir
    from engine.networks import ShapeBucket
    from export.onnx_export import DEFAULT_OPSET, check_opset, export_model, load_model, parse_precision

    parse_precision(args.precision)
    opset = check_opset(DEFAULT_OPSET if args.opset is None else args.opset)
    buckets = [ShapeBucket.parse(b) for b in args.bucket] if args.bucket else None
    if args.out:  # the output before the model loads (the default one's name needs the weights: its cache)
        check_output(args.out, folder=True)
    else:
        check_output(os.path.join(cache_root(), "onnx"), folder=True, flag="the export cache ($CMD_CACHE/onnx)")
    model, text_encoder = load_model(args.model)
    out = args.out or default_export_dir(model, args.precision)
    external = {"auto": None, "always": True, "never": False}[args.external_data]
    manifest = export_model(model, out, text_encoder, args.precision, opset, args.network, buckets,
                            args.max_batch or 4, args.model, external, log=print)
    print(f"wrote {len(manifest['networks'])} graph(s) to {out}")
    return 0


def _cmd_check(args) -> int:
    from engine.artefacts import read_manifest
    from engine.default_model import resolve_model
    from export.check import check_export, format_table, rows_to_json
    from export.onnx_export import load_model

    manifests = [read_manifest(d) for d in args.onnx]  # fail on a bad folder before loading anything
    if args.json:
        check_output(args.json, flag="--json")
    specs = []
    for folder, manifest in zip(args.onnx, manifests):
        spec = args.model or manifest["model"].get("spec")
        if not spec:
            raise ValueError(f"{folder!r} does not say which model it came from: pass --model")
        resolve_model(spec)  # and on a bad model (an incomplete folder, an unknown config)
        specs.append(spec)
    loaded = {}
    rows = []
    for folder, spec in zip(args.onnx, specs):
        if spec not in loaded:
            loaded[spec] = load_model(spec)
        model, text_encoder = loaded[spec]
        rows += check_export(folder, model, text_encoder, names=args.network)
    print(format_table(rows))
    if args.json:
        from engine.atomic import write_json

        write_json(args.json, rows_to_json(rows))
    failed = [r for r in rows if r.status == "FAIL"]
    unverified = [r for r in rows if r.status == "zero"]
    if unverified:
        print(f"warning: {len(unverified)} row(s) compared all-zero references: nothing verified there "
              "(zero-initialised output layers of an untrained model)", file=sys.stderr)
    print(f"{len(rows) - len(failed)}/{len(rows)} within tolerance")
    return 1 if failed else 0


def _cmd_tensorrt(args) -> int:
    from export.tensorrt_build import DEFAULT_WORKSPACE_GB, PRECISIONS, build_plans, check_graphs

    if args.precision is not None and args.precision not in PRECISIONS:
        raise ValueError(f"unknown --precision {args.precision!r}; choose from {', '.join(PRECISIONS)}")
    if not args.check_only and not args.out:
        raise ValueError("--out DIR is required (the plan folder), unless --check-only")
    if args.out and not args.check_only:
        check_output(args.out, folder=True)
    if args.timing_cache:
        check_output(args.timing_cache, flag="--timing-cache")
    problems = check_graphs(args.onnx, args.network)
    for name, found in problems.items():
        status = "ok" if not found else f"{len(found)} problem(s)"
        print(f"{name}: TensorRT ONNX parser compatibility {status}")
        for p in found:
            print(f"  {p}")
    if any(problems.values()):
        return 1
    if args.check_only:
        return 0
    build_plans(args.onnx, args.out, args.precision, args.fp8, args.timing_cache,
                args.workspace_gb or DEFAULT_WORKSPACE_GB, args.network, force=args.force, refit=args.refit)
    print(f"plans in {args.out}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    def body() -> int:
        args = _parser().parse_args(argv)
        return {"onnx": _cmd_onnx, "check": _cmd_check, "tensorrt": _cmd_tensorrt}[args.command](args)

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
