"""``python -m export check``: every exported graph in onnxruntime against the PyTorch network.

For each network, shape bucket and batch (the smallest and largest of its range, so the dynamic
batch is exercised away from the traced one), fresh random inputs go through the PyTorch module
in float32 (the kernels' PyTorch references, which is what export traces) and through the graph in its
own precision (inputs cast as the runtime casts them).
Errors are relative to the reference's largest magnitude: max |onnx - torch| / max |torch|.
"""

import math
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

import torch

from cmd_kernels import force_impl
from engine.artefacts import EXPORT_AGAIN, check_weights, networks_from_manifest, read_manifest
from engine.backends.onnxruntime import OrtNetwork

# Tolerated relative error per graph precision. fp32: reordered sums only. fp16: 11-bit mantissas
# through a few dozen layers (inputs are rounded to fp16 too).
TOLERANCE = {"float32": 1e-4, "float16": 1e-2}


@dataclass
class CheckRow:
    network: str
    precision: str
    bucket: str
    batch: int
    output: str
    max_abs: float
    max_rel: float
    tolerance: float
    status: str  # "ok", "FAIL", or "zero" (the reference is all zeros: nothing was verified)
    note: str = ""


def _compare(got: torch.Tensor, ref: torch.Tensor):
    if tuple(got.shape) != tuple(ref.shape):
        return math.nan, math.nan, f"shape {tuple(got.shape)} != {tuple(ref.shape)}"
    got, ref = got.double(), ref.double()
    max_abs = (got - ref).abs().max().item()
    scale = ref.abs().max().item()
    return max_abs, (max_abs / scale if scale > 0 else math.inf), ""


def check_export(onnx_dir: str, model, text_encoder=None, providers: Optional[Sequence] = None,
                 names: Optional[Sequence[str]] = None, seed: int = 0) -> List[CheckRow]:
    """Compare the graphs of ``onnx_dir`` with ``model`` (float32, the weights they were exported from)
    and ``text_encoder``; one row per network, bucket, batch and output."""
    manifest = read_manifest(onnx_dir)
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise ValueError("check needs the model in float32 (the reference)")
    check_weights(manifest["model"]["weights_sha256"], model, f"the graphs in {onnx_dir!r}", EXPORT_AGAIN)
    networks = networks_from_manifest(manifest)
    if names:
        unknown = [n for n in names if n not in networks]
        if unknown:
            raise ValueError(f"{onnx_dir!r} has no {unknown[0]} graph; it has {', '.join(networks)}")
    precision = manifest["precision"]
    tolerance = TOLERANCE[precision]
    gen = torch.Generator().manual_seed(seed)
    rows: List[CheckRow] = []
    for name, net in networks.items():
        if names and name not in names:
            continue
        if name == "text_encoder" and text_encoder is None:
            raise ValueError(f"{onnx_dir!r} holds a text_encoder graph: checking it needs the text encoder")
        session = OrtNetwork(onnx_dir, net, manifest["networks"][name], "cpu", providers)
        module = net.module(model, text_encoder).eval()
        lo, _, hi = net.batch_range()
        distinct = {}  # buckets that give a network the same input shapes (the text encoder's) run once
        for bucket in net.buckets:
            distinct.setdefault(tuple(net.input_shapes(bucket, 1).values()), bucket)
        for bucket in distinct.values():
            for batch in sorted({lo, hi}):
                inputs = list(net.sample_inputs(bucket, batch, torch.float32, generator=gen).values())
                with torch.no_grad(), force_impl("reference"):  # the spec the graphs were exported from
                    ref = module(*inputs)
                ref = ref if isinstance(ref, (tuple, list)) else (ref,)
                got = session(*inputs)
                for spec, r, g in zip(net.outputs, ref, got):
                    max_abs, max_rel, note = _compare(g, r)
                    if note:
                        status = "FAIL"
                    elif max_rel == math.inf and max_abs == 0:
                        status, note = "zero", "reference is all zeros (untrained zero-initialised output layer?)"
                    else:
                        status = "ok" if max_rel <= tolerance else "FAIL"
                    rows.append(CheckRow(name, precision, str(bucket), batch, spec.name, max_abs, max_rel,
                                         tolerance, status, note))
    return rows


def format_table(rows: List[CheckRow]) -> str:
    header = ("network", "precision", "bucket", "batch", "output", "max abs", "max rel", "tol", "status")
    lines = [(r.network, r.precision, r.bucket, str(r.batch), r.output, f"{r.max_abs:.2e}", f"{r.max_rel:.2e}",
              f"{r.tolerance:.0e}", r.status + (f" ({r.note})" if r.note else "")) for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*line) for line in lines]
    return "\n".join(line.rstrip() for line in out)


def rows_to_json(rows: List[CheckRow]) -> List[Dict]:
    return [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(r).items()}
            for r in rows]
