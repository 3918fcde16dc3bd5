"""``cudagraph``: the content-UNet step and the motion-DiT step replayed as captured CUDA graphs.

One graph per shape bucket (network, batch bucket, input shapes, dtypes), captured on first use:
inputs are copied into static buffers, the step is warmed up on a side stream (cuDNN/cuBLAS
heuristics, Triton autotuning and lazy allocations happen there, not in the graph), then captured
into a memory pool shared by all graphs of the backend (they never run concurrently). Graphs are
cached for the life of the backend, so later pipeline calls of the same shapes replay at once.

The CFG batch (conditional and unconditional halves) is one input of one graph. With
``device_scheduler = True`` the pipeline runs the scheduler as device tables, so a denoising loop
enqueues copies, replays and a few elementwise ops and never waits on the host.

Caveats (as with every graph engine): captured graphs read the parameter *storage* they saw at
capture; after replacing parameters call :meth:`reset`. The AE decoder runs once per video and
stays eager.
"""

from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple, Union

import torch

from engine.backends import register_backend
from engine.backends.base import Backend
from engine.backends.eager import EagerBackend


BUCKET_MODES = ("pow2", "exact")


@dataclass
class _Captured:
    graph: "torch.cuda.CUDAGraph"
    inputs: List[torch.Tensor]  # static input buffers, batch = bucket size
    output: torch.Tensor  # static output buffer


@register_backend("cudagraph")
class CUDAGraphBackend(EagerBackend):
    """``warmup_iters``: eager runs before each capture; ``batch_buckets``: the batch sizes a batch is
    padded up to, so fewer graphs serve more batch sizes: ``"pow2"`` (the default: the next power of two,
    so batches 1, 2, 3-4, 5-8, ... take one graph each, and a guidance interval's B and 2B stay unpadded
    at B = 1, 2, 4), a sequence of sizes (e.g. ``(2, 4, 8, 16)``; a larger batch is its own bucket), or
    ``"exact"`` (every batch size its own graph: no padded work, more captures)."""

    device_scheduler = True
    cache_modes = ("static",)  # whole captured graphs: the static schedule picks which to replay
    network_parts = Backend.network_parts  # no pieces: the dynamic mode decides on the host

    def __init__(self, model, device=None, dtype=None, warmup_iters: int = 3,
                 batch_buckets: Union[str, Sequence[int]] = "pow2"):
        super().__init__(model, device, dtype)
        self.check_ready(self.device, self.dtype)
        if warmup_iters < 1:
            raise ValueError(f"warmup_iters must be >= 1 before a capture, got {warmup_iters}")
        self.warmup_iters = warmup_iters
        self.batch_buckets = self._check_buckets(batch_buckets)
        self.captures = 0  # how many graphs were captured (tests check the cache with it)
        self.reset()

    @classmethod
    def check_ready(cls, device, dtype, **options) -> None:
        """A CUDA device that torch can use."""
        if torch.device(device).type != "cuda" or not torch.cuda.is_available():
            raise ValueError(f"backend 'cudagraph' needs a CUDA device, got {str(torch.device(device))!r}")

    def reset(self) -> None:
        self._graphs: Dict[Tuple, _Captured] = {}
        self._pool = None

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def unet_step(self, sample, timestep, states):
        return self._replay("unet", super().unet_step, (sample, timestep, states))

    def dit_step(self, motion, timestep, content, text):
        return self._replay("dit", super().dit_step, (motion, timestep, content, text))

    @staticmethod
    def _check_buckets(batch_buckets) -> Union[str, Tuple[int, ...]]:
        if isinstance(batch_buckets, str):
            if batch_buckets not in BUCKET_MODES:
                raise ValueError(f"batch_buckets must be one of {', '.join(BUCKET_MODES)} or batch sizes, "
                                 f"got {batch_buckets!r}")
            return batch_buckets
        sizes = tuple(sorted(batch_buckets))
        if not sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sizes):
            raise ValueError(f"batch_buckets must be positive batch sizes, got {batch_buckets!r}")
        return sizes

    def _bucket(self, n: int) -> int:
        if self.batch_buckets == "exact":
            return n
        if self.batch_buckets == "pow2":
            return 1 << (n - 1).bit_length()
        for size in self.batch_buckets:
            if size >= n:
                return size
        return n  # larger than every bucket: its own graph

    @torch.no_grad()
    def _replay(self, kind: str, fn: Callable, inputs: Tuple[torch.Tensor, ...]) -> torch.Tensor:
        n = inputs[0].shape[0]
        bucket = self._bucket(n)
        key = (kind, bucket) + tuple((tuple(x.shape[1:]), x.dtype) for x in inputs)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(fn, inputs, bucket)
        for buf, x in zip(entry.inputs, inputs):
            buf[:n].copy_(x, non_blocking=True)
        entry.graph.replay()
        return entry.output[:n]

    def _capture(self, fn: Callable, inputs: Tuple[torch.Tensor, ...], bucket: int) -> _Captured:
        with torch.cuda.device(self.device):
            # Pad rows repeat real inputs, so padded samples stay finite and cost only compute.
            static = [self._padded(x, bucket) for x in inputs]
            stream = torch.cuda.current_stream()
            side = torch.cuda.Stream()
            side.wait_stream(stream)
            with torch.cuda.stream(side):
                for _ in range(self.warmup_iters):
                    fn(*static)
            stream.wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                output = fn(*static)
        self.captures += 1
        return _Captured(graph, static, output)

    @staticmethod
    def _padded(x: torch.Tensor, bucket: int) -> torch.Tensor:
        n = x.shape[0]
        index = torch.arange(bucket, device=x.device) % n
        return x.index_select(0, index).contiguous()
