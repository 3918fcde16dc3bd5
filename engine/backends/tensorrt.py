"""``tensorrt``: the networks as TensorRT engines from the plans of ``python -m export tensorrt``.

A plan folder holds one plan per network (one optimisation profile per shape bucket) and
``plans.json``, which records what they were built from and for: the ONNX export's manifest (the
network declarations), the weights' hash, the precision, the GPU and the TensorRT version. Plans run
only where they were built: another GPU, compute capability or TensorRT version is refused with the
command that rebuilds them.

Runtime: one CUDA stream for all networks (they run one after another); per (profile, batch) the
input and output buffers are allocated once and their addresses bound once, so a call is: copy the
inputs into the static buffers, enqueue, hand back the output buffers (valid until the next call of
that network, as the backend contract allows). ``cuda_graph=True`` captures each enqueue in a CUDA
graph on first use and replays it afterwards (the enqueue's own launch overhead disappears).

TensorRT cannot be installed on every machine: importing this module works anywhere, and using it
without TensorRT raises a ValueError that says what is missing and how to get it.
"""

import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from engine.artefacts import (BUILD_PLANS, PLAN_DIR_ENV, PRECISIONS, check_plans_runnable, check_weights,
                              gpu_identity, plan_networks, read_plans)
from engine.backends import register_backend
from engine.backends.graph import GraphBackend
from engine.backends.graph_weights import GraphWeights
from engine.networks import Network, NetworkCall, check_calls

MISSING = ("TensorRT is not importable here: install NVIDIA's wheel on a Linux machine with an NVIDIA GPU and "
           "driver (pip install tensorrt, which pulls the tensorrt-cu12 libraries from pypi.nvidia.com) or use "
           "the NGC container nvcr.io/nvidia/tensorrt; the ONNX side (python -m export onnx/check, backend "
           "onnxruntime) works without it")


def import_tensorrt():
    """The ``tensorrt`` module, or a ValueError saying what is missing and how to get it."""
    try:
        import tensorrt
    except ImportError as e:
        raise ValueError(f"{MISSING} ({e})") from None
    return tensorrt


def check_plan_calls(plans: Dict, calls: Sequence[NetworkCall], plan_dir: str) -> None:
    """A one-line ValueError, before anything runs, for a network call the plans cannot run: no plan for
    the network, a size outside its profiles or a batch beyond them (needs no TensorRT)."""
    check_calls(plan_networks(plans), calls, f"the plans in {plan_dir!r}")


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32,
             trt.DataType.INT64: torch.int64, trt.DataType.BOOL: torch.bool, trt.DataType.INT8: torch.int8,
             trt.DataType.UINT8: torch.uint8}
    if hasattr(trt.DataType, "BF16"):
        table[trt.DataType.BF16] = torch.bfloat16
    if dtype not in table:
        raise ValueError(f"unsupported TensorRT I/O type {dtype}")
    return table[dtype]


class _Slot:
    """Static buffers (and maybe a captured CUDA graph) of one (profile, batch)."""

    def __init__(self, profile: int, inputs: Dict[str, torch.Tensor], outputs: List[torch.Tensor]):
        self.profile = profile
        self.inputs = inputs
        self.outputs = outputs
        self.graph: Optional[torch.cuda.CUDAGraph] = None


class TrtNetwork:
    """One plan: its engine, one execution context, and static buffers per (profile, batch)."""

    def __init__(self, plan_path: str, network: Network, device: torch.device, stream: torch.cuda.Stream,
                 cuda_graph: bool = False):
        trt = import_tensorrt()
        self.trt = trt
        self.network = network
        self.device = device
        self.stream = stream
        self.cuda_graph = cuda_graph
        self.logger = trt.Logger(trt.Logger.WARNING)
        with open(plan_path, "rb") as f:
            self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise ValueError(f"TensorRT could not load {plan_path!r} (built for another GPU or TensorRT version?); "
                             "rebuild it with python -m export tensorrt")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        expected = set(network.input_names + network.output_names)
        if set(names) != expected:
            raise ValueError(f"plan {plan_path!r} has tensors {sorted(names)}, the declaration {sorted(expected)}")
        self.slots: Dict[Tuple[int, int], _Slot] = {}
        self.active: Optional[Tuple[int, int]] = None

    def _slot(self, shapes: Dict[str, Tuple[int, ...]]) -> Tuple[Tuple[int, int], _Slot]:
        profile = self.network.find_profile(shapes)  # a clear error for shapes outside every profile
        batch = shapes[self.network.input_names[0]][0]
        key = (profile, batch)
        if key not in self.slots:
            bucket = self.network.buckets[profile]
            inputs = {n: torch.empty(s, dtype=self.dtypes[n], device=self.device)
                      for n, s in self.network.input_shapes(bucket, batch).items()}
            outputs = [torch.empty(s, dtype=self.dtypes[n], device=self.device)
                       for n, s in self.network.output_shapes(bucket, batch).items()]
            self.slots[key] = _Slot(profile, inputs, outputs)
        return key, self.slots[key]

    def _bind(self, key: Tuple[int, int], slot: _Slot) -> None:
        """Select the slot's profile, shapes and addresses (only when another slot ran last)."""
        if self.active == key:
            return
        handle = self.stream.cuda_stream
        self.context.set_optimization_profile_async(slot.profile, handle)
        for name, t in slot.inputs.items():
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        for name, t in zip(self.network.output_names, slot.outputs):
            self.context.set_tensor_address(name, t.data_ptr())
        self.active = key

    def __call__(self, *tensors: torch.Tensor) -> List[torch.Tensor]:
        names = self.network.input_names
        shapes = {n: tuple(t.shape) for n, t in zip(names, tensors)}
        key, slot = self._slot(shapes)
        for name, t in zip(names, tensors):
            slot.inputs[name].copy_(t)  # on the caller's stream, into the static buffer
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            self._bind(key, slot)
            if not self.cuda_graph:
                self._enqueue()
            elif slot.graph is None:
                self._enqueue()  # first run outside capture: TensorRT allocates and initialises lazily
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=self.stream):
                    self._enqueue()
                slot.graph = graph
                graph.replay()
            else:
                slot.graph.replay()
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return slot.outputs

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to run {self.network.name} (see its log above)")


@register_backend("tensorrt")
class TensorRTBackend(GraphBackend):
    """Options: ``plan_dir`` (a folder from ``python -m export tensorrt``; default ``$CMD_TRT_DIR``),
    ``cuda_graph`` (capture each enqueue), ``verify_weights`` (check the plans' weights hash). The text
    encoder stays the pipeline's (PyTorch)."""

    device_scheduler = True  # the loop stays on the device: no host syncs between enqueues
    outputs_reused = True  # engines hand back their static output buffers

    def __init__(self, model, device=None, dtype=None, plan_dir: Optional[str] = None, cuda_graph: bool = False,
                 verify_weights: bool = True):
        super().__init__(model, device, dtype)
        plan_dir, self.plans = self._plans(self.device, plan_dir)
        self.cuda_graph = cuda_graph
        self.graph_weights = GraphWeights()  # adapters: the initializers overridden, per graph
        self.refits = 0
        self.stream = torch.cuda.Stream(self.device)
        self.attach(plan_dir, plan_networks(self.plans), "plans")  # the networks that have a plan
        if verify_weights:
            check_weights(self.plans["weights_sha256"], model, self.source, "export and build again")

    @staticmethod
    def _plans(device: torch.device, plan_dir: Optional[str]):
        """TensorRT, a CUDA device, and a plan folder (``plan_dir``, else ``$CMD_TRT_DIR``) built for this GPU
        and TensorRT version: ``(plan_dir, its plans.json)``, or a one-line ValueError."""
        trt = import_tensorrt()
        if device.type != "cuda":
            raise ValueError(f"backend 'tensorrt' needs a CUDA device, got {device}")
        plan_dir = plan_dir or os.environ.get(PLAN_DIR_ENV)
        if not plan_dir:
            raise ValueError(f"backend 'tensorrt' needs plans: build them with {BUILD_PLANS}, then pass plan_dir=DIR "
                             f"(or set {PLAN_DIR_ENV})")
        plans = read_plans(plan_dir)
        check_plans_runnable(plans, trt.__version__, gpu_identity(device), plan_dir)
        return plan_dir, plans

    @classmethod
    def check_ready(cls, device, dtype, plan_dir: Optional[str] = None, **options) -> None:
        """TensorRT importable, a CUDA device, plans (``plan_dir`` or ``$CMD_TRT_DIR``) built for this GPU and
        TensorRT version; whether they hold this model's weights is checked when it has loaded."""
        cls._plans(torch.device(device), plan_dir)

    @property
    def plan_dir(self) -> str:
        return self.folder

    def open(self, name: str) -> TrtNetwork:
        path = os.path.join(self.folder, self.plans["networks"][name]["plan"])
        net = TrtNetwork(path, self.networks[name], self.device, self.stream, self.cuda_graph)
        overrides = self.graph_weights.overrides.get(name)
        if overrides:  # adapters loaded before this plan opened
            self._refit(net, overrides)
        return net

    def update_weights(self, changed) -> None:
        """Adapters: refit the open engines whose weights changed (``trt.Refitter``, TensorRT 10.x); plans
        opened later are refitted when they open. Needs refittable plans (``python -m export tensorrt
        --refit``): a one-line ValueError otherwise."""
        if changed and not self.plans.get("options", {}).get("refit"):
            raise ValueError(f"the plans in {self.folder!r} are not refittable: build them with python -m export "
                             "tensorrt --refit to switch adapters without a rebuild")
        onnx_dir = self.plans["onnx_dir"]
        manifest = self.plans["onnx_manifest"]["networks"]
        updates = self.graph_weights.update(
            changed, lambda g: os.path.join(onnx_dir, manifest[g]["file"]) if g in manifest else None,
            lambda g: PRECISIONS[manifest[g]["precision"]])
        for graph, values in updates.items():
            if graph in self._sessions:
                self._refit(self._sessions[graph], values)

    def _refit(self, net: "TrtNetwork", values) -> None:
        """Set the named weights (ONNX initializer names, which TensorRT's ONNX parser keeps) and refit."""
        trt = net.trt
        refitter = trt.Refitter(net.engine, net.logger)
        for name, value in values.items():
            if not refitter.set_named_weights(name, trt.Weights(value)):
                raise ValueError(f"TensorRT refused new weights for {name!r} (not refittable in this plan)")
        torch.cuda.current_stream(self.device).synchronize()
        if not refitter.refit_cuda_engine():
            raise RuntimeError("TensorRT could not refit the engine (see its log)")
        self.refits += 1
        for slot in net.slots.values():  # captured graphs hold the old weights' launch: capture again
            slot.graph = None
