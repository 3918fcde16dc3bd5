"""python -m benchmarks.adapter_switch: what an adapter switch costs on each backend, side by side.

    python -m benchmarks.adapter_switch --model default --lora cyan [--onnx] [--json]

Per backend, on one pipeline: the time to load the adapter, to change its weight and to unload it (each
followed by the first network call that sees it, so a backend's lazy work is counted), against what the
switch avoids (eager: nothing; compile: compiling the network again; onnxruntime: exporting the graphs
again). For compile it counts the graphs dynamo made (``torch._dynamo.utils.counters``) before and after the
switches: no new graph means no recompilation. Measured on the motion DiT's step (one call) so that compile
times stay short on a CPU.
"""

import argparse
import json
import sys
import tempfile
import time
from typing import Dict, List, Optional

import torch

from engine.cli import Parser, add_lora_argument, run_main


def _step_inputs(cfg, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    motion = torch.randn(2, *cfg.motion_shape(cfg.num_frames), generator=g)
    content = torch.randn(2, cfg.channels, cfg.height, cfg.width, generator=g)
    text = torch.randn(2, cfg.text_encoder.hidden_size, generator=g)
    return motion, torch.tensor([999, 10]), content, text


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure_switches(pipe, adapter: str) -> Dict[str, float]:
    """Seconds for load / reweight / unload, each with the next DiT step."""
    inputs = _step_inputs(pipe.config)

    def step():
        with torch.no_grad():
            pipe.backend.dit_step(*inputs)

    out = {"step_s": _timed(step)}
    out["load_s"] = _timed(lambda: (pipe.load_lora_weights(adapter, adapter_name="a"), step()))
    out["reweight_s"] = _timed(lambda: (pipe.set_adapters("a", 0.5), step()))
    out["unload_s"] = _timed(lambda: (pipe.unload_lora_weights(), step()))
    out["step_after_s"] = _timed(step)
    return out


def bench(model: str, adapter: str, onnx: bool) -> Dict[str, dict]:
    from torch._dynamo.utils import counters

    from engine.adapters import check_lora_args
    from engine.pipeline import CMDPipeline

    path = check_lora_args([adapter])[0][0].path
    pipe = CMDPipeline.from_pretrained(model)
    results = {"eager": measure_switches(pipe, path)}
    pipe.set_backend("compile")
    inputs = _step_inputs(pipe.config)
    with torch.no_grad():
        compile_s = _timed(lambda: pipe.backend.dit_step(*inputs))
    graphs = counters["stats"]["unique_graphs"]
    results["compile"] = dict(measure_switches(pipe, path), first_call_with_compile_s=compile_s,
                              new_graphs_after_switches=counters["stats"]["unique_graphs"] - graphs)
    if onnx:
        from export.onnx_export import export_model

        with tempfile.TemporaryDirectory() as tmp:
            pipe.set_backend("eager")
            export_s = _timed(lambda: export_model(pipe.model, tmp, pipe.text_encoder, "float32"))
            pipe.set_backend("onnxruntime", onnx_dir=tmp)
            results["onnxruntime"] = dict(measure_switches(pipe, path), export_all_graphs_s=export_s)
    return results


def main(argv: Optional[List[str]] = None) -> int:
    def body():
        p = Parser(prog="python -m benchmarks.adapter_switch", description=__doc__.split("\n")[0])
        p.add_argument("--model", default="default")
        add_lora_argument(p)
        p.add_argument("--onnx", action="store_true", help="also onnxruntime (exports the graphs once, timed)")
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--json", action="store_true")
        args = p.parse_args(argv)
        if len(args.lora) != 1:
            raise ValueError("give one --lora NAME_OR_PATH")
        torch.set_num_threads(args.threads)
        results = bench(args.model, args.lora[0], args.onnx)
        for backend, row in results.items():
            print(backend + ": " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in row.items()))
        if args.json:
            print(json.dumps({"model": args.model, "lora": args.lora[0], "torch": torch.__version__,
                              "threads": args.threads, "results": results}))

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
