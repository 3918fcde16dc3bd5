"""Peak GPU memory that counts what CUDA graphs hold: the same measure for every backend.

``torch.cuda.max_memory_allocated`` leaves out the activations a captured CUDA graph keeps in its private
memory pool (they are reserved for the graph, not allocated by live tensors), so a cudagraph backend
would look lighter than eager. Reserved memory counts the graph pools' segments with everything else, so
the figure reported (and judged against the memory targets) is the peak **reserved** memory, for every
backend alike; a memory snapshot (``torch.cuda.memory._snapshot()``) splits what is reserved now into the
default pool and the graph pools (:func:`snapshot_pools`).
"""

from typing import Dict, Optional

import torch

GB = 1e9
BASIS = "peak reserved (caching allocator, CUDA-graph pools included)"  # what every table's memory column is


def snapshot_pools(snapshot: Dict, device_index: Optional[int] = None) -> Dict[str, int]:
    """Bytes per pool in a ``torch.cuda.memory._snapshot()`` dict: ``reserved`` and ``allocated`` in all
    segments, and ``graph_pools_reserved`` / ``graph_pools_allocated`` in the segments of private pools (a
    ``segment_pool_id`` other than (0, 0): CUDA graphs' pools), of one device where ``device_index`` is
    given. A ValueError for a dict without ``segments``."""
    if not isinstance(snapshot, dict) or not isinstance(snapshot.get("segments"), list):
        raise ValueError("not a CUDA memory snapshot: expected a dict with a 'segments' list "
                         "(torch.cuda.memory._snapshot())")
    out = {"reserved": 0, "allocated": 0, "graph_pools_reserved": 0, "graph_pools_allocated": 0}
    for segment in snapshot["segments"]:
        if device_index is not None and segment.get("device", device_index) != device_index:
            continue
        total, allocated = int(segment["total_size"]), _allocated(segment)
        out["reserved"] += total
        out["allocated"] += allocated
        if tuple(segment.get("segment_pool_id") or (0, 0)) != (0, 0):
            out["graph_pools_reserved"] += total
            out["graph_pools_allocated"] += allocated
    return out


def _allocated(segment: Dict) -> int:
    """A segment's allocated bytes: its ``allocated_size``, or the sum of its active blocks."""
    if "allocated_size" in segment:
        return int(segment["allocated_size"])
    return sum(int(b["size"]) for b in segment.get("blocks", []) if b.get("state") == "active_allocated")


def reset_peak(device: torch.device) -> None:
    """Start a peak measurement (no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> Dict[str, Optional[float]]:
    """Since :func:`reset_peak`, in GB (1e9 bytes): ``peak_reserved_gb`` (the figure to judge, CUDA-graph
    pools included), ``peak_allocated_gb`` (live tensors only: graphs' activations left out) and, from a
    snapshot now, ``graph_pools_gb`` (what CUDA graphs' private pools reserve). None values off CUDA."""
    if device.type != "cuda":
        return {"peak_reserved_gb": None, "peak_allocated_gb": None, "graph_pools_gb": None}
    torch.cuda.synchronize(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    pools = snapshot_pools(torch.cuda.memory._snapshot(device), index)
    return {"peak_reserved_gb": round(torch.cuda.max_memory_reserved(device) / GB, 3),
            "peak_allocated_gb": round(torch.cuda.max_memory_allocated(device) / GB, 3),
            "graph_pools_gb": round(pools["graph_pools_reserved"] / GB, 3)}
