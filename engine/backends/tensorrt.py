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

from engine.artefacts import (BUILD_PLANS, PLAN_DIR_ENV, PRECISIONS, check_files, check_plans_runnable,
                              check_weights, gpu_identity, plan_files, plan_networks, read_plans)
from engine.backends import register_backend
from engine.backends.graph import GraphBackend
from engine.backends.graph_weights import GraphWeights
from engine.networks import Network, NetworkCall, check_calls

# The TensorRT majors this engine builds and runs plans with (setup.py's "tensorrt" extra says the same).
TENSORRT_RANGE = (10, 11)


def install_hint(cuda_version: Optional[str] = None) -> str:
    """How to install a supported TensorRT whose CUDA major matches torch's (``torch.version.cuda``): a
    ``tensorrt-cu12`` beside a CUDA 13 torch loads a second CUDA runtime, or fails to."""
    cuda_version = torch.version.cuda if cuda_version is None else cuda_version
    lo, hi = TENSORRT_RANGE
    if not cuda_version:
        return (f"on a Linux machine with an NVIDIA GPU and a CUDA build of torch, pip install 'tensorrt-cuNN>={lo},"
                f"<{hi + 1}' with NN torch's CUDA major (torch.version.cuda), or use the NGC container "
                "nvcr.io/nvidia/tensorrt")
    major = cuda_version.split(".")[0]
    return (f"pip install 'tensorrt-cu{major}>={lo},<{hi + 1}' (this torch is built for CUDA {cuda_version}), "
            "or use the NGC container nvcr.io/nvidia/tensorrt")


def missing_message(cuda_version: Optional[str] = None) -> str:
    return (f"TensorRT is not importable here: {install_hint(cuda_version)}; the ONNX side (python -m export "
            "onnx/check, backend onnxruntime) works without it")


def tensorrt_major(version: str) -> int:
    """The major version of a TensorRT version string; a one-line ValueError outside :data:`TENSORRT_RANGE`."""
    try:
        major = int(str(version).split(".")[0])
    except ValueError:
        raise ValueError(f"cannot read the TensorRT version {version!r}") from None
    lo, hi = TENSORRT_RANGE
    if not lo <= major <= hi:
        raise ValueError(f"TensorRT {version} is not supported: this engine builds and runs plans with TensorRT "
                         f"{lo}.x to {hi}.x ({install_hint()})")
    return major


def import_tensorrt():
    """The ``tensorrt`` module (a supported version), or a ValueError saying what is missing and how to get it."""
    try:
        import tensorrt
    except ImportError as e:
        raise ValueError(f"{missing_message()} ({e})") from None
    tensorrt_major(tensorrt.__version__)
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
    """Static buffers, an execution context bound to them, and maybe a captured CUDA graph, of one
    (profile, batch)."""

    def __init__(self, profile: int, inputs: Dict[str, torch.Tensor], outputs: Dict[str, torch.Tensor]):
        self.profile = profile
        self.inputs = inputs
        self.outputs = outputs
        self.context = None
        self.graph: Optional[torch.cuda.CUDAGraph] = None


class SlotContexts:
    """Execution contexts for the slots of one engine: one context (with its own device memory) per slot,
    bound once to the slot's profile, shapes and buffer addresses, so a CUDA graph captured for a slot
    replays against exactly the state it was captured with, whatever other slots ran in between (a
    guidance interval's batch B then 2B, a smaller last batch, two buckets).

    Without CUDA graphs (``per_slot=False``) one context serves every slot and is rebound when the slot
    changes (one activation memory instead of one per slot). Where TensorRT refuses a second context the
    slot's profile (one profile per context in some
    versions), the slot shares that profile's first context instead; then binding the shared context to
    another slot drops the graphs captured on it, and the next call of those slots re-captures.
    Needs only the engine's context API, no CUDA (the runtime passes the stream handle)."""

    def __init__(self, engine, stream_handle: int, per_slot: bool = True):
        self.engine = engine
        self.stream_handle = stream_handle
        self.per_slot = per_slot  # False (no CUDA graphs): one context for all slots, rebound on a change
        self.bound: Dict[int, tuple] = {}  # id(context) -> the slot key it is bound to
        self.by_profile: Dict[int, object] = {}  # profile -> the first context that took it
        self.slots: Dict[tuple, _Slot] = {}

    def bind(self, key: tuple, slot: _Slot) -> None:
        """Give ``slot`` a context bound to its profile, shapes and addresses (only when another slot holds
        it, or on first use); rebinding a shared context invalidates the graphs captured on it."""
        self.slots[key] = slot
        if slot.context is None:
            slot.context = self._context_for(slot.profile)
        context = slot.context
        if self.bound.get(id(context)) == key:
            return
        for other in self.slots.values():
            if other.context is context:
                other.graph = None  # captured against the context's former binding
        if id(context) in self.bound:  # a shared context bound to another slot: select again, then rebind
            self._select_profile(context, slot.profile)
        for name, t in slot.inputs.items():
            if not context.set_input_shape(name, tuple(t.shape)):
                raise RuntimeError(f"TensorRT refused the shape {tuple(t.shape)} for input {name!r}")
            context.set_tensor_address(name, t.data_ptr())
        for name, t in slot.outputs.items():
            context.set_tensor_address(name, t.data_ptr())
        self.bound[id(context)] = key

    def _context_for(self, profile: int):
        if not self.per_slot and self.by_profile:  # nothing captured: one context (one device memory) serves all
            return next(iter(self.by_profile.values()))
        context = self.engine.create_execution_context()
        if context is not None and self._try_profile(context, profile):
            self.by_profile.setdefault(profile, context)
            return context
        if profile in self.by_profile:  # TensorRT lets one context at a time use a profile: share it
            return self.by_profile[profile]
        raise RuntimeError(f"TensorRT could not create an execution context for optimisation profile {profile} "
                           "(out of device memory?)")

    def _try_profile(self, context, profile: int) -> bool:
        return bool(context.set_optimization_profile_async(profile, self.stream_handle))

    def _select_profile(self, context, profile: int) -> None:
        if not self._try_profile(context, profile):
            raise RuntimeError(f"TensorRT refused optimisation profile {profile} for an execution context")


class TrtNetwork:
    """One plan: its engine, and per (profile, batch) static buffers and an execution context bound to them
    (:class:`SlotContexts`), and with ``cuda_graph`` a CUDA graph of the slot's enqueue."""

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
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        expected = set(network.input_names + network.output_names)
        if set(names) != expected:
            raise ValueError(f"plan {plan_path!r} has tensors {sorted(names)}, the declaration {sorted(expected)}")
        # Per-slot contexts only where graphs are captured: each holds its own activation memory.
        self.contexts = SlotContexts(self.engine, stream.cuda_stream, per_slot=cuda_graph)
        self.slots: Dict[Tuple[int, int], _Slot] = {}

    def _slot(self, shapes: Dict[str, Tuple[int, ...]]) -> Tuple[Tuple[int, int], _Slot]:
        profile = self.network.find_profile(shapes)  # a clear error for shapes outside every profile
        batch = shapes[self.network.input_names[0]][0]
        key = (profile, batch)
        if key not in self.slots:
            bucket = self.network.buckets[profile]
            inputs = {n: torch.empty(s, dtype=self.dtypes[n], device=self.device)
                      for n, s in self.network.input_shapes(bucket, batch).items()}
            outputs = {n: torch.empty(s, dtype=self.dtypes[n], device=self.device)
                       for n, s in self.network.output_shapes(bucket, batch).items()}
            self.slots[key] = _Slot(profile, inputs, outputs)
        return key, self.slots[key]

    def __call__(self, *tensors: torch.Tensor) -> List[torch.Tensor]:
        names = self.network.input_names
        shapes = {n: tuple(t.shape) for n, t in zip(names, tensors)}
        key, slot = self._slot(shapes)
        for name, t in zip(names, tensors):
            slot.inputs[name].copy_(t)  # on the caller's stream, into the static buffer
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            self.contexts.bind(key, slot)
            if not self.cuda_graph:
                self._enqueue(slot)
            elif slot.graph is None:
                self._enqueue(slot)  # first run outside capture: TensorRT allocates and initialises lazily
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=self.stream):
                    self._enqueue(slot)
                slot.graph = graph
                graph.replay()
            else:
                slot.graph.replay()
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return list(slot.outputs.values())

    def _enqueue(self, slot: _Slot) -> None:
        if not slot.context.execute_async_v3(self.stream.cuda_stream):
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
        check_files(plan_dir, plan_files(self.plans), self.source, f"build them again: {BUILD_PLANS}")
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
        """Adapters: refit the open engines whose weights changed (``trt.Refitter``, TensorRT 10.x and 11.x); plans
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
