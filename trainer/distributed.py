"""One process or many under ``torchrun``: process-group setup, rank helpers and a clean exit.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them the trainer runs as a single process and
every helper here is a no-op. Backend: nccl on CUDA, gloo on CPU.
"""

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: Optional[str] = None) -> DistInfo:
    """Join the process group when launched by torchrun and pick this rank's device.
    ``device``: "cpu", "cuda" or None (CUDA when available)."""
    if device not in (None, "cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    use_cuda = torch.cuda.is_available() if device is None else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(rank, world_size, local_rank, dev)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def mean_across_ranks(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean of a tensor over all ranks (for logging; the gradients are averaged by DDP)."""
    if not info.enabled:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / info.world_size


def broadcast_object(obj, info: DistInfo):
    """Rank 0's ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard(items: Sequence[T], info: DistInfo) -> List[T]:
    """This rank's share of ``items`` (round robin), e.g. the prompts it generates for evaluation."""
    return list(items[info.rank::info.world_size])


def gather_objects(items: List[T], info: DistInfo) -> List[T]:
    """Every rank's list concatenated in rank order (on every rank)."""
    if not info.enabled:
        return list(items)
    out: List[Optional[List[T]]] = [None] * info.world_size
    dist.all_gather_object(out, items)
    return [x for part in out for x in part]


def finish(info: DistInfo, code: int = 0) -> None:
    """Leave the process group; under torchrun end the worker at once with ``os._exit``: a gloo rank
    sometimes aborts during interpreter teardown after backward (DESIGN 8), which would fail the run."""
    if dist.is_initialized():
        dist.destroy_process_group()
    if info.enabled:
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
