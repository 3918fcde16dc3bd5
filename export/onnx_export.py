"""ONNX export of every network of a CMD model (declared in :mod:`engine.networks`).

Per network: ``torch.onnx.export(dynamo=True)`` of the network's wrapper module with its declared
names and dynamic axes (the batch as a named ``Dim``; axes that change across shape buckets as
``Dim.AUTO`` so that torch infers how they relate, e.g. the motion latent's H'+W' to the content
frame's H and W), then onnxscript's optimizer (constant folding, dead-code and identity removal),
dynamic dims renamed to the declared symbols, weights inline or, past 2 GB, in one external-data file
beside the graph, and ``onnx.checker`` with full shape inference on the file. Triton ops export as
their PyTorch reference (``cmd_kernels._dispatch.exporting()``); the result holds standard ONNX ops only.

Output folder (written to a temporary sibling and renamed into place)::

    manifest.json          model, config, precision, opset, buckets, and per network its file, hashes,
                           declaration (names, axes, dynamic axes, profiles) and operator counts
    text_encoder.onnx  content_unet.onnx  motion_dit.onnx  ae_decoder.onnx  [vae_decoder.onnx]
    tokenizer/             the text encoder's tokenizer (Hugging Face), when it has files
"""

import copy
import logging
import os
import re
import time
import warnings
from collections import Counter
from contextlib import contextmanager
from typing import Callable, Dict, Optional, Sequence

import torch

from engine.atomic import atomic_dir, output_lock, write_json
from engine.configs import CMDConfig
from engine.geometry import check_served
from engine.artefacts import (FORMAT_VERSION, MANIFEST, PRECISIONS, file_hash, tokenizer_entry, weights_hash,
                              weights_hashes)
from engine.networks import DEFAULT_MAX_BATCH, Network, ShapeBucket, networks_for

DEFAULT_OPSET = 18
# torch 2.13's exporter writes opset-18 forms (Split with num_outputs) into opset-17 graphs, which the
# checker rejects: 18 is the oldest that works. 24: the newest onnxruntime 1.32 and TensorRT 10.15 read.
MIN_OPSET = 18
MAX_OPSET = 24
EXTERNAL_DATA_BYTES = 2 * 1024 ** 3 - 128 * 1024 ** 2  # protobuf caps a message at 2 GiB: keep room for the graph


def parse_precision(precision) -> torch.dtype:
    if isinstance(precision, torch.dtype) and precision in PRECISIONS.values():
        return precision
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


def precision_name(dtype: torch.dtype) -> str:
    return next(k for k, v in PRECISIONS.items() if v == dtype)


def check_opset(opset: int) -> int:
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset must be an integer from {MIN_OPSET} to {MAX_OPSET}, got {opset!r}")
    return opset


def _dynamic_shapes(network: Network) -> Dict[str, Dict[int, object]]:
    """torch.export dynamic shapes: one shared named Dim for the batch (equal across inputs by
    construction), Dim.AUTO for bucket axes (their relations, such as N = H/p + W/p, are inferred)."""
    from torch.export import Dim

    lo, _, hi = network.batch_range()
    batch = Dim("batch", min=lo, max=hi)
    shapes = {}
    for spec in network.inputs:
        axes = network.dynamic_axes()[spec.name]
        shapes[spec.name] = {i: (batch if name == "batch" else Dim.AUTO) for i, name in axes.items()}
    return shapes


def _export_batch(network: Network) -> int:
    """The batch the export traces with: never 1 when the batch is dynamic (torch specialises size-1
    dims), so the opt batch or 2."""
    lo, opt, hi = network.batch_range()
    return lo if hi == lo else min(hi, max(opt, 2))


_SYMBOL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _rename_dims(model, network: Network) -> None:
    """Give the graph's symbolic dims the declared names ("batch", "height", ...) and check that
    every declared dynamic axis stayed dynamic (the export may specialise an axis it cannot vary).
    ``model``: the exported ``onnx_ir.Model``."""
    import onnx_ir as ir

    graph = model.graph
    dynamic = network.dynamic_axes()
    rename: Dict[str, str] = {}
    for value in list(graph.inputs) + list(graph.outputs):
        for axis, symbol in dynamic.get(value.name, {}).items():
            dim = value.shape[axis]
            if not isinstance(dim, ir.SymbolicDim) or dim.value is None:
                raise RuntimeError(f"{network.name}: the export fixed axis {axis} ({symbol}) of {value.name!r} to "
                                   f"{dim}; this network cannot serve buckets that differ in {symbol}")
            if _SYMBOL.fullmatch(dim.value) and dim.value not in rename:
                rename[dim.value] = symbol

    def sub(text: str) -> str:
        return _SYMBOL.sub(lambda m: rename.get(m.group(0), m.group(0)), text)

    values = list(graph.inputs) + list(graph.outputs) + [v for node in graph.all_nodes() for v in node.outputs]
    for value in values:
        if value.shape is None:
            continue
        dims = [ir.SymbolicDim(sub(d.value)) if isinstance(d, ir.SymbolicDim) and d.value else d for d in value.shape]
        value.shape = ir.Shape(dims)


# Per-node metadata torch writes that only describes the exporting process: Python stack traces (with
# the exporting machine's paths) and FX node dumps. Module scopes ("namespace") stay: profilers show them.
_TRACE_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node")


def _strip_trace_metadata(model) -> None:
    for node in model.graph.all_nodes():
        for key in _TRACE_METADATA:
            node.metadata_props.pop(key, None)


def op_counts(proto) -> Dict[str, int]:
    """``{"domain::op" or "op": count}`` over the graph, its subgraphs and its local functions."""
    counts: Counter = Counter()

    def visit(nodes):
        for node in nodes:
            counts[f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type] += 1
            for attr in node.attribute:
                if attr.g is not None and attr.g.node:
                    visit(attr.g.node)
                for g in attr.graphs:
                    visit(g.node)

    visit(proto.graph.node)
    for fn in proto.functions:
        visit(fn.node)
    return dict(sorted(counts.items()))


# Notices an export logs that tell a user of the graphs nothing, by logger: the lines they start with. These
# records only are dropped, on the logger that emits them, while an export runs; every other message of those
# loggers (and of torch.onnx) still shows.
# - torch.onnx's exporter builds its operator registry on every export and, where torchvision is not installed,
#   logs one warning per torchvision op it has a translation for ("torchvision is not installed. Skipping
#   torchvision::nms", roi_align, roi_pool, deform_conv2d): four lines per network. The CMD networks call no
#   torchvision op (without torchvision they could not).
# - onnxscript's constant folding tries ONNX's reference implementation on nodes whose inputs are constants
#   and logs "Evaluation failed: cannot reshape array ..." where it cannot (a Reshape of a shape that is
#   symbolic until run time): the node is kept as it is, the graph is whole (onnx.checker and the parity checks
#   run on it), so the line alarms without cause.
_REGISTRY_LOGGER = "torch.onnx._internal.exporter._registration"
_FOLDING_LOGGER = "onnxscript.optimizer._constant_folding"
QUIET_NOTICES = {_REGISTRY_LOGGER: "torchvision is not installed. Skipping ", _FOLDING_LOGGER: "Evaluation failed: "}


class _PrefixFilter(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


@contextmanager
def _no_export_notices():
    added = [(logging.getLogger(name), _PrefixFilter(prefix)) for name, prefix in QUIET_NOTICES.items()]
    for logger, notice_filter in added:
        logger.addFilter(notice_filter)
    try:
        yield
    finally:
        for logger, notice_filter in added:
            logger.removeFilter(notice_filter)


def export_network(network: Network, model, out_dir: str, precision="float32", opset: int = DEFAULT_OPSET,
                   text_encoder=None, external_data: Optional[bool] = None) -> Dict:
    """Export one network into ``out_dir/<name>.onnx`` (+ ``<name>.onnx.data`` when the weights near
    2 GB, or when ``external_data`` is True); return its manifest entry. The model is not modified
    (a copy is cast for reduced precisions)."""
    import onnx
    import onnx_ir as ir

    dtype = parse_precision(precision)
    check_opset(opset)
    module = network.module(model, text_encoder).eval()
    source_hash = weights_hash(module)
    if dtype != torch.float32 or any(p.dtype != torch.float32 for p in module.parameters()):
        module = copy.deepcopy(module).to(dtype)
    device = next(module.parameters()).device
    args = network.sample_inputs(batch=_export_batch(network), dtype=dtype, device=device)

    start = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings(), _no_export_notices():
        # torch.export is chatty about things that do not concern a user of the graph
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, tuple(args.values()), dynamo=True, opset_version=opset,
                                    input_names=network.input_names, output_names=network.output_names,
                                    dynamic_shapes=_dynamic_shapes(network), optimize=False, verbose=False)
        program.optimize()  # onnxscript: constant folding, dead code and redundant-op removal
    export_s = time.perf_counter() - start

    _rename_dims(program.model, network)
    _strip_trace_metadata(program.model)
    graph = program.model.graph
    names_in, names_out = [v.name for v in graph.inputs], [v.name for v in graph.outputs]
    if names_in != network.input_names or names_out != network.output_names:
        raise RuntimeError(f"{network.name}: exported graph has inputs {names_in} / outputs {names_out}, "
                           f"declared {network.input_names} / {network.output_names}")
    weight_bytes = sum(t.const_value.nbytes for t in graph.initializers.values() if t.const_value is not None)
    external = weight_bytes >= EXTERNAL_DATA_BYTES if external_data is None else bool(external_data)
    path = os.path.join(out_dir, f"{network.name}.onnx")
    data_name = f"{network.name}.onnx.data"
    ir.save(program.model, path, external_data=data_name if external else None)
    onnx.checker.check_model(path, full_check=True)  # by path: works past 2 GB
    proto = onnx.load(path, load_external_data=False)

    files = [os.path.basename(path)] + ([data_name] if external else [])
    return {
        "file": files[0],
        "external_data": data_name if external else None,
        "bytes": sum(os.path.getsize(os.path.join(out_dir, f)) for f in files),
        "onnx_sha256": file_hash(*(os.path.join(out_dir, f) for f in files)),
        "weights_sha256": source_hash,
        "precision": precision_name(dtype),
        "opset": opset,
        "export_seconds": round(export_s, 2),
        "ops": op_counts(proto),
        **network.to_dict(),
    }


def export_model(model, out_dir: str, text_encoder=None, precision="float32", opset: int = DEFAULT_OPSET,
                 names: Optional[Sequence[str]] = None, buckets: Optional[Sequence[ShapeBucket]] = None,
                 max_batch: int = DEFAULT_MAX_BATCH, model_spec: Optional[str] = None,
                 external_data: Optional[bool] = None, log: Optional[Callable[[str], None]] = None) -> Dict:
    """Export the networks of ``model`` (a :class:`engine.models.CMDModel`) into ``out_dir``.

    ``names``: a subset of networks (default: all; the text encoder needs ``text_encoder``).
    ``buckets``: shape buckets, a subset of the sizes the model serves (default: all of them). ``model_spec``: how to load the model again
    (recorded for ``python -m export check``). ``external_data``: force weights into (True) or out of
    (False) a separate file; default by size. Returns the manifest."""
    dtype = parse_precision(precision)
    check_opset(opset)
    cfg: CMDConfig = model.config
    for bucket in buckets or ():
        check_served(cfg, bucket, "graphs are built for served sizes only; declare a size in the config's 'sizes' "
                                  "once the model is evaluated there")
    nets = networks_for(cfg, buckets, max_batch, names)
    if text_encoder is None:
        if names is not None and "text_encoder" in names:
            raise ValueError("exporting the text_encoder network needs a text encoder")
        nets = [n for n in nets if n.name != "text_encoder"]
    if not nets:
        raise ValueError("nothing to export: no networks selected")
    log = log or (lambda msg: None)
    manifest = {
        "format": FORMAT_VERSION,
        "model": {"spec": model_spec, "name": cfg.name, "weights_sha256": weights_hashes(model)},
        "config": cfg.to_dict(),
        "precision": precision_name(dtype),
        "opset": opset,
        "max_batch": max_batch,
        "buckets": [str(b) for b in nets[0].buckets],
        "versions": _versions(),
        "networks": {},
    }
    # One exporter at a time into out_dir (another one refuses: OutputBusy), and the folder replaced whole.
    with output_lock(out_dir, "--out"), atomic_dir(out_dir) as tmp:
        if text_encoder is not None and any(n.name == "text_encoder" for n in nets):
            manifest["text_encoder"] = tokenizer_entry(text_encoder, tmp)
        for net in nets:
            log(f"exporting {net.name} ({precision_name(dtype)}, opset {opset}, buckets "
                f"{', '.join(map(str, net.buckets))}, dynamic {', '.join(net.dynamic_symbols())})")
            entry = export_network(net, model, tmp, dtype, opset, text_encoder, external_data)
            manifest["networks"][net.name] = entry
            log(f"  {entry['file']}: {entry['bytes'] / 2 ** 20:.1f} MiB, {sum(entry['ops'].values())} nodes, "
                f"{entry['export_seconds']:.1f} s")
        write_json(os.path.join(tmp, MANIFEST), manifest)
    return manifest


def _versions() -> Dict[str, str]:
    import onnx
    import onnxscript

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxscript": onnxscript.__version__}


def load_model(spec: str, device="cpu"):
    """(model, text encoder) for a model spec exactly as the engine loads it (so the hashes match):
    ``default``, a model folder or ``random:<config>``; see :mod:`engine.default_model`."""
    from engine.pipeline import CMDPipeline

    pipe = CMDPipeline.from_pretrained(spec, device=device, dtype="float32")
    return pipe.model, pipe.text_encoder
