"""Kernel benchmark: ``python -m cmd_kernels.bench [--configs default,ucf101-64,sd21-512x1024] [--json PATH]``.

On a GPU, in one run: the ceilings (device-copy bandwidth, a large bf16 matmul), a correctness pass
at the benchmark shapes, then for every kernel at each config's shapes the median time (CUDA-graph
replays, so launch overhead does not hide kernel time), GB/s and % of the measured bandwidth
(attention: TFLOP/s and % of the measured matmul peak), and the speedup over the eager reference,
``torch.compile(reference)`` and, for attention, every SDPA backend; plus the attention half of a
DiT block (prologue + qkv + attention + proj) against the same block on eager PyTorch ops.
On a CPU it runs the correctness pass (kernels in the Triton interpreter) and says that timings need a
GPU. Results are JSON rows with device, torch and Triton versions and the git revision.

Shapes come from the config files (``engine/configs/*.json``, read as data: this package does not
import ``engine``): the autoencoder ops at the stage-1 training batch, the DiT ops at batch 2 (one
video with classifier-free guidance).
"""

import argparse
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from cmd_kernels.measure import ceilings, environment, time_ms  # noqa: F401 -- ceilings: cmd_kernels.bench.ceilings
from cmd_kernels.testing import (TOL, attention_fp64, attention_inputs, content_frame_inputs, decoder_fusion_inputs,
                             modulated_layernorm_inputs, rel_err, within_tolerance)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, "engine", "configs")
CONFIGS = ("default", "ucf101-64", "sd21-512x1024")
# (depth, hidden, heads) per DiT size: a copy of engine.configs.DIT_SIZES (kernels may not import
# engine); tests/cmd_kernels/test_kernels_in_models.py checks that the two agree.
DIT_SIZES = {"tiny": (4, 128, 4), "S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


@dataclass
class Shapes:
    config: str
    content_frame: Tuple[int, int, int, int, int]  # (B, L, C, H, W)
    decoder_fusion: Tuple[int, int, int, int, int]  # (B, L, H', W', C')
    attention: Tuple[int, int, int, int]  # (B, heads, N, head_dim)
    modulated_layernorm: Tuple[int, int, int]  # (B, N, hidden)


def config_shapes(name: str, ae_batch: Optional[int] = None, dit_batch: int = 2) -> Shapes:
    """The kernels' shapes in a config: AE ops at ``ae_batch`` (default: its stage-1 training batch),
    DiT ops at ``dit_batch``."""
    path = name if os.path.isfile(name) else os.path.join(CONFIG_DIR, f"{name}.json")
    if not os.path.isfile(path):
        raise ValueError(f"unknown config {name!r}: no file {path}")
    with open(path) as f:
        cfg = json.load(f)
    ae, dit = cfg["autoencoder"], cfg["motion_dit"]
    b = ae_batch or cfg.get("train", {}).get("autoencoder", {}).get("batch_size", 8)
    frames, channels = cfg["num_frames"], cfg["channels"]
    h, w = cfg["height"] // cfg.get("vae_scale", 1), cfg["width"] // cfg.get("vae_scale", 1)
    p = ae["patch_size"]
    hp, wp = h // p, w // p
    depth, hidden, heads = DIT_SIZES[dit["size"]]
    hidden, heads = dit.get("hidden_size") or hidden, dit.get("num_heads") or heads
    pd, pc = dit["patch_size"], dit["content_patch_size"]
    tokens = (frames // pd) * ((hp + wp) // pd) + (h // pc) * (w // pc)  # [z ; content frame]
    return Shapes(cfg.get("name", name), (b, frames, channels, h, w), (b, frames, hp, wp, ae["hidden_size"]),
                  (dit_batch, heads, tokens, hidden // heads), (dit_batch, tokens, hidden))


# ------------------------------------------------------------------------------------- correctness

def _grads(fn, inputs, grads):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(list(outs), list(grads))
    return [t.grad for t in leaves]


def correctness(shapes: Shapes, dtype: torch.dtype, device: torch.device, frames_cap: Optional[int] = None,
                batch_cap: Optional[int] = None) -> List[dict]:
    """Relative Frobenius error of each kernel (forward, and backward where it has one) against an fp64
    reference at these shapes; in bf16 also PyTorch's own error, which the kernel must stay within 2x of."""
    import cmd_kernels
    from cmd_kernels.ops.content_frame import content_frame_reference
    from cmd_kernels.ops.decoder_fusion import decoder_fusion_reference
    from cmd_kernels.ops.modulated_layernorm import modulated_layernorm_reference

    def cap(shape, frames_axis=None):
        s = list(shape)
        if batch_cap:
            s[0] = min(s[0], batch_cap)
        if frames_cap and frames_axis is not None:
            s[frames_axis] = min(s[frames_axis], frames_cap)
        return tuple(s)

    # (name, shape, inputs, op, fp64 reference, PyTorch's own op in the low dtype, has a backward)
    cases = [
        ("content_frame", cap(shapes.content_frame), content_frame_inputs, cmd_kernels.content_frame,
         content_frame_reference, content_frame_reference, True),
        ("decoder_fusion", cap(shapes.decoder_fusion, 1), decoder_fusion_inputs, cmd_kernels.decoder_fusion,
         decoder_fusion_reference, decoder_fusion_reference, True),
        ("motion_attention", cap(shapes.attention), attention_inputs, cmd_kernels.motion_attention,
         attention_fp64, F.scaled_dot_product_attention, False),
        ("modulated_layernorm", cap(shapes.modulated_layernorm), modulated_layernorm_inputs, cmd_kernels.modulated_layernorm,
         modulated_layernorm_reference, modulated_layernorm_reference, True),
    ]
    rows = []
    for name, shape, make, op, ref_fn, eager_fn, has_bwd in cases:
        inputs = make(shape, dtype, device)
        triton_fn = lambda *a, _op=op: _op(*a, impl="triton")  # noqa: E731
        outs = triton_fn(*inputs)
        refs = ref_fn(*(t.double() for t in inputs))
        eager = eager_fn(*inputs)
        outs, refs, eager = [x if isinstance(x, tuple) else (x,) for x in (outs, refs, eager)]
        errs = [rel_err(o, r) for o, r in zip(outs, refs)]
        torch_errs = [rel_err(e, r) for e, r in zip(eager, refs)]
        rows.append(_check_row(name, shapes.config, shape, dtype, "forward", errs, torch_errs))
        if has_bwd:
            g = torch.Generator().manual_seed(4)
            gs = [torch.randn(o.shape, generator=g).to(device, dtype) for o in outs]
            got = _grads(triton_fn, inputs, gs)
            want = _grads(ref_fn, [t.double() for t in inputs], [x.double() for x in gs])
            torch_got = _grads(eager_fn, inputs, gs)
            rows.append(_check_row(name, shapes.config, shape, dtype, "backward",
                                   [rel_err(a, b) for a, b in zip(got, want)],
                                   [rel_err(a, b) for a, b in zip(torch_got, want)]))
    return rows


def _check_row(name, config, shape, dtype, pass_, errs, torch_errs) -> dict:
    err, torch_err = max(errs), max(torch_errs)
    ok = within_tolerance(err, dtype, torch_err)
    return {"name": name, "pass": pass_, "config": config, "shape": list(shape), "dtype": str(dtype).split(".")[-1],
            "rel_err": err, "torch_rel_err": torch_err, "tol": TOL[dtype], "ok": ok}


# ------------------------------------------------------------------------------------------ timing

def read_ceilings(path: str) -> Dict[str, float]:
    """Ceilings measured earlier (e.g. by the GPU lease's environment stage, with :func:`ceilings`): a JSON
    file holding ``copy_gbps`` and ``matmul_tflops``, at its top level or under ``"ceilings"``. Raises
    ValueError naming the file when it is missing, unreadable, or lacks a positive value."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--ceilings: cannot read {path!r}: {e}") from None
    data = data.get("ceilings", data) if isinstance(data, dict) else {}
    out = {}
    for key in ("copy_gbps", "matmul_tflops"):
        value = data.get(key) if isinstance(data, dict) else None
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            raise ValueError(f"--ceilings: {path!r} has no positive {key!r} (got {value!r})")
        out[key] = float(value)
    return out


def _compiled(fn):
    try:
        return torch.compile(fn)
    except Exception:  # no compiler here: the row says so
        return None


def _maybe_time(fn) -> Optional[float]:
    if fn is None:
        return None
    try:
        return time_ms(fn)
    except Exception as e:  # e.g. an SDPA backend that does not take this head dim
        print(f"    (skipped: {type(e).__name__}: {str(e).splitlines()[0][:100]})", file=sys.stderr)
        return None


def _row(name, config, shape, dtype, ms, ceil, *, nbytes=None, flops=None, baselines=None) -> dict:
    row = {"name": name, "config": config, "shape": list(shape), "dtype": str(dtype).split(".")[-1], "impl": "triton",
           "median_ms": ms, "gbps": None, "pct_bw": None, "tflops": None, "pct_peak": None}
    if nbytes is not None:
        row["gbps"] = nbytes / ms / 1e6
        row["pct_bw"] = 100 * row["gbps"] / ceil["copy_gbps"]
    if flops is not None:
        row["tflops"] = flops / ms / 1e9
        row["pct_peak"] = 100 * row["tflops"] / ceil["matmul_tflops"]
    for key, base_ms in (baselines or {}).items():
        row[f"{key}_ms"] = base_ms
        row[f"speedup_vs_{key}"] = None if base_ms is None else base_ms / ms
    return row


# Rotation through input copies: a working set that fits in L2 would be timed at L2 bandwidth against a
# DRAM ceiling. Copies are cycled until more than twice the L2 is touched between two uses of one copy,
# within ROTATION_BUDGET bytes; a row that cannot get there says so (l2_resident).
ROTATION_BUDGET = 2 ** 30
MAX_COPIES = 64


def l2_bytes(device) -> Optional[int]:
    """The GPU's L2 cache size in bytes; None off CUDA (or where torch does not report it)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", None) or None


def rotation_copies(working_set: int, l2: Optional[int], budget: int = ROTATION_BUDGET) -> Tuple[int, bool]:
    """(copies to cycle through, whether the row stays L2-resident anyway) for a call that touches
    ``working_set`` bytes: enough copies that the others' bytes between two uses of one exceed 2 x L2."""
    if not l2 or working_set <= 0:
        return 1, False
    needed = 1 if working_set >= 2 * l2 else -(-2 * l2 // working_set) + 1
    affordable = max(1, min(MAX_COPIES, budget // working_set))
    copies = min(needed, affordable)
    return copies, copies < needed


def rotating(fn, copies: List[tuple]):
    """A call of ``fn`` on the next input copy at each call (cycled; a CUDA graph capturing n calls
    captures them on n successive copies)."""
    state = {"i": 0}

    def call():
        args = copies[state["i"] % len(copies)]
        state["i"] += 1
        return fn(*args)

    return call


class KernelBench:
    """The timing rows of one config's shapes in one dtype: each kernel against its eager reference,
    ``torch.compile(reference)`` and (attention) every SDPA backend, on rotated input copies."""

    def __init__(self, shapes: Shapes, dtype, device, ceil, compile_baselines: bool = True):
        self.shapes, self.dtype, self.device, self.ceil = shapes, dtype, torch.device(device), ceil
        self.compile_baselines = compile_baselines
        self.size = torch.tensor([], dtype=dtype).element_size()
        self.l2 = l2_bytes(self.device)
        self.rows: List[dict] = []

    def run(self) -> List[dict]:
        self.content_frame()
        self.decoder_fusion()
        self.motion_attention()
        self.modulated_layernorm()
        self.dit_attention_half()
        return self.rows

    def timed(self, name, shape, kernel, reference, inputs, nbytes=None, flops=None, extra=None):
        """Time ``kernel(*inputs)`` and its baselines (``reference``, its compile, ``extra``: label ->
        callable on the inputs) on the same rotated input copies; append the row and print it."""
        working = nbytes or sum(t.numel() * t.element_size() for t in inputs if torch.is_tensor(t))
        n, resident = rotation_copies(working, self.l2)
        copies = [tuple(inputs)] + [tuple(t.clone() if torch.is_tensor(t) else t for t in inputs) for _ in range(n - 1)]
        baselines = {"eager": _maybe_time(rotating(reference, copies))}
        if self.compile_baselines:
            compiled = _compiled(reference)
            baselines["compile"] = _maybe_time(None if compiled is None else rotating(compiled, copies))
        for label, fn in (extra or {}).items():
            baselines[label] = _maybe_time(rotating(fn, copies))
        if extra:
            best = [baselines[k] for k in extra if baselines[k] is not None]
            baselines["sdpa_best"] = min(best) if best else None
        ms = time_ms(rotating(kernel, copies))
        row = _row(name, self.shapes.config, shape, self.dtype, ms, self.ceil, nbytes=nbytes, flops=flops,
                   baselines=baselines)
        row.update(rotated_copies=n, l2_resident=resident, l2_bytes=self.l2)
        self.rows.append(row)
        _print_row(row, shape, ms, nbytes)

    def content_frame(self):
        """Forward: read frames + logits once, write one frame. Backward: read frames, logits, grad; write
        both gradients."""
        import cmd_kernels
        from cmd_kernels.ops.content_frame import (_launch_backward, content_frame_backward_reference,
                                                   content_frame_reference)

        s = self.shapes.content_frame
        inputs = content_frame_inputs(s, self.dtype, self.device)
        numel = torch.Size(s).numel()
        self.timed("content_frame", s, lambda f, x: cmd_kernels.content_frame(f, x, impl="triton"),
                   content_frame_reference, inputs, nbytes=(2 * numel + numel // s[1]) * self.size)
        grad = torch.randn(s[:1] + s[2:], device=self.device, dtype=self.dtype)
        self.timed("content_frame_backward", s, lambda f, x, g: _launch_backward(g, f, x),
                   lambda f, x, g: content_frame_backward_reference(g, f, x), (*inputs, grad),
                   nbytes=(4 * numel + numel // s[1]) * self.size)

    def decoder_fusion(self):
        """Write the cube and its normalised copy; the planes are small."""
        import cmd_kernels
        from cmd_kernels.ops.decoder_fusion import _launch_backward, decoder_fusion_backward_reference, \
            decoder_fusion_reference

        s = self.shapes.decoder_fusion
        inputs = decoder_fusion_inputs(s, self.dtype, self.device)
        cube, planes = torch.Size(s).numel(), sum(t.numel() for t in inputs)
        self.timed("decoder_fusion", s, lambda *a: cmd_kernels.decoder_fusion(*a, impl="triton"),
                   decoder_fusion_reference, inputs, nbytes=(2 * cube + planes) * self.size)
        grads = tuple(torch.randn(s, device=self.device, dtype=self.dtype) for _ in range(2))
        self.timed("decoder_fusion_backward", s, lambda gc, gn, *a: _launch_backward(gc, gn, *a, 1e-5),
                   lambda gc, gn, *a: decoder_fusion_backward_reference(gc, gn, *a, 1e-5), (*grads, *inputs),
                   nbytes=(2 * cube + 2 * planes) * self.size)

    def motion_attention(self):
        """Against every SDPA backend (the best of them is ``sdpa_best``)."""
        import cmd_kernels
        from torch.nn.attention import SDPBackend, sdpa_kernel

        s = self.shapes.attention
        b, heads, n, d = s
        extra = {}
        for label, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION),
                               ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION),
                               ("sdpa_cudnn", getattr(SDPBackend, "CUDNN_ATTENTION", None)),
                               ("sdpa_math", SDPBackend.MATH)):
            if backend is not None:
                extra[label] = _sdpa_with(backend, sdpa_kernel)
        self.timed("motion_attention", s, lambda q, k, v: cmd_kernels.motion_attention(q, k, v, impl="triton"),
                   F.scaled_dot_product_attention, attention_inputs(s, self.dtype, self.device),
                   flops=4 * b * heads * n * n * d, extra=extra)

    def modulated_layernorm(self):
        """Read x, write y."""
        import cmd_kernels
        from cmd_kernels.ops.modulated_layernorm import modulated_layernorm_reference

        s = self.shapes.modulated_layernorm
        self.timed("modulated_layernorm", s, lambda *a: cmd_kernels.modulated_layernorm(*a, impl="triton"),
                   modulated_layernorm_reference, modulated_layernorm_inputs(s, self.dtype, self.device),
                   nbytes=2 * torch.Size(s).numel() * self.size)

    def dit_attention_half(self):
        """The attention half of a DiT block: prologue + qkv + attention + proj, ours against eager ops."""
        import cmd_kernels

        s = self.shapes.modulated_layernorm
        bsz, n, hidden = s
        heads = self.shapes.attention[1]
        qkv_proj = torch.nn.Linear(hidden, 3 * hidden, device=self.device, dtype=self.dtype)
        out_proj = torch.nn.Linear(hidden, hidden, device=self.device, dtype=self.dtype)

        def block(x, shift, scale, impl):
            h = cmd_kernels.modulated_layernorm(x, shift, scale, impl=impl)
            q, k, v = qkv_proj(h).reshape(bsz, n, 3, heads, hidden // heads).permute(2, 0, 3, 1, 4)
            return out_proj(cmd_kernels.motion_attention(q, k, v, impl=impl).transpose(1, 2).reshape(bsz, n, hidden))

        with torch.no_grad():
            self.timed("dit_attention_half", s, lambda *a: block(*a, "triton"), lambda *a: block(*a, "reference"),
                       modulated_layernorm_inputs(s, self.dtype, self.device),
                       flops=4 * bsz * heads * n * n * (hidden // heads) + 2 * bsz * n * hidden * 4 * hidden)


def _sdpa_with(backend, sdpa_kernel):
    def sdpa(q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v)
    return sdpa


def _print_row(row: dict, shape, ms: float, nbytes) -> None:
    speedups = [f"x{v:.2f} vs {k[len('speedup_vs_'):]}" for k, v in row.items() if k.startswith("speedup_vs_") and v]
    rate = f"{row['pct_bw']:5.1f}% bw" if nbytes else f"{row['pct_peak']:5.1f}% peak"
    l2 = " (L2-resident: % of DRAM bandwidth overstated)" if row["l2_resident"] else ""
    print(f"  {row['name']:24s} {str(tuple(shape)):24s} {ms * 1e3:9.1f} us {rate}  " + "  ".join(speedups) + l2,
          flush=True)


def benchmark(shapes: Shapes, dtype, device, ceil, compile_baselines: bool = True) -> List[dict]:
    """Timing rows of every kernel at ``shapes`` in ``dtype`` (needs a GPU): see :class:`KernelBench`."""
    return KernelBench(shapes, dtype, device, ceil, compile_baselines).run()


# -------------------------------------------------------------------------------------------- main

def _write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-").replace("--", "-")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cmd_kernels.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated config names or JSON files")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--ae-batch", type=int, default=None, help="batch of the AE ops (default: training batch)")
    parser.add_argument("--dit-batch", type=int, default=2,
                        help="batch of the DiT ops (default: 2, one video with CFG)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile(reference) baselines")
    parser.add_argument("--json", default=None, help="output file (default benchmarks/results/kernels-<device>.json)")
    parser.add_argument("--ceilings", default=None, metavar="JSON",
                        help="take the ceilings (copy_gbps, matmul_tflops; top level or under 'ceilings') from this "
                             "file, measured earlier on the same device, instead of measuring them here")
    args = parser.parse_args(argv)
    if args.json is not None and os.path.isdir(args.json):  # before the run (kernels cannot import engine.atomic)
        parser.error(f"--json is a file, got {args.json!r}, which is a folder")

    cuda = torch.cuda.is_available()
    from cmd_kernels._triton import INTERPRETED

    if not cuda and not INTERPRETED:
        # The kernels must be built for the interpreter before kernels is imported: start again with it.
        env = dict(os.environ, TRITON_INTERPRET="1")
        args_again = argv if argv is not None else sys.argv[1:]
        os.execve(sys.executable, [sys.executable, "-m", "cmd_kernels.bench", *args_again], env)
    for bad in (b for b in (args.ae_batch, args.dit_batch) if b is not None and b < 1):
        parser.error(f"batch sizes must be >= 1, got {bad}")
    try:
        all_shapes = [config_shapes(c.strip(), args.ae_batch, args.dit_batch)
                      for c in args.configs.split(",") if c.strip()]
    except (ValueError, KeyError, json.JSONDecodeError) as e:
        parser.error(str(e))

    given_ceilings = None
    if args.ceilings:
        try:
            given_ceilings = read_ceilings(args.ceilings)
        except ValueError as e:
            parser.error(str(e))

    device = torch.device("cuda" if cuda else "cpu")
    env = environment(device)
    dtype = getattr(torch, args.dtype)
    rows: List[dict] = []
    print(f"device {env['device']}, torch {env['torch']}, triton {env['triton']}, git {env['git_rev']}")
    if cuda:
        ceil = given_ceilings or ceilings(device)
        if given_ceilings:
            print(f"ceilings from {args.ceilings} (measured earlier on this device)")
        print(f"ceilings: copy {ceil['copy_gbps']:.0f} GB/s, bf16 matmul {ceil['matmul_tflops']:.0f} TFLOP/s")
        rows.append({"name": "ceilings", **ceil})
        for shapes in all_shapes:
            print(f"[{shapes.config}] correctness ({args.dtype}, fp32)")
            for dt in dict.fromkeys([dtype, torch.float32]):
                rows += correctness(shapes, dt, device, batch_cap=2)
            print(f"[{shapes.config}] timings ({args.dtype})")
            rows += benchmark(shapes, dtype, device, ceil, compile_baselines=not args.no_compile)
    else:
        print("no GPU: timings need a GPU. Running the correctness pass in the Triton interpreter instead "
              "(batch 1, decoder fusion on 2 frames; float32 and float16, bf16 needs a GPU)")
        for shapes in all_shapes:
            for dt in (torch.float32, torch.float16):  # the interpreter's bf16 is broken: GPU only
                rows += correctness(shapes, dt, device, frames_cap=2, batch_cap=1)
    for r in (r for r in rows if "ok" in r):
        print(f"  {'ok ' if r['ok'] else 'BAD'} {r['config']:14s} {r['name']:20s} {r['pass']:8s} {r['dtype']:8s} "
              f"rel err {r['rel_err']:.2e} (torch {r['torch_rel_err']:.2e}, tol {r['tol']:.0e})")
    for r in rows:
        r.update({k: v for k, v in env.items() if k not in r})
    path = args.json or os.path.join(ROOT, "benchmarks", "results", f"kernels-{_slug(env['device'])}.json")
    _write_json(path, {"environment": env, "rows": rows})
    print(f"wrote {len(rows)} rows to {path}")
    return 0 if all(r.get("ok", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
