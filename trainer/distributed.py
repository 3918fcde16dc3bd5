"""One process or many under ``torchrun``, for the trainer: the process-group helpers live in
``engine.distributed`` (``engine.run`` shards its prompts with the same ones); this module adds what only
training needs.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them the trainer runs as a single process and
every helper is a no-op. Backend: nccl on CUDA, gloo on CPU.
"""

import torch
import torch.distributed as dist

from engine.distributed import (  # noqa: F401  (the names the trainer has always imported from here)
    DistInfo, barrier, finish, gather_objects, init_distributed)


def mean_across_ranks(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean of a tensor over all ranks (for logging; the gradients are averaged by DDP)."""
    if not info.enabled:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / info.world_size
