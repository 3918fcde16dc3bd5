"""Peak memory that counts CUDA graphs' pools: the snapshot parser on a dict in the format of
torch.cuda.memory._snapshot() (recorded fields: segments with total/allocated sizes, pool ids, blocks)."""

import pytest
import torch

from engine.memory import peak_memory, snapshot_pools

MB = 2 ** 20


def _segment(device, total, blocks, pool=(0, 0), with_allocated=True):
    seg = {"device": device, "address": 0x7F0000000000, "total_size": total, "stream": 0,
           "segment_type": "large" if total > MB else "small", "segment_pool_id": pool,
           "active_size": sum(b["size"] for b in blocks if b["state"] != "inactive"), "blocks": blocks}
    if with_allocated:
        seg["allocated_size"] = sum(b["size"] for b in blocks if b["state"] == "active_allocated")
    return seg


def _block(size, state):
    return {"size": size, "requested_size": size, "address": 0x7F0000000000, "state": state, "frames": []}


SNAPSHOT = {
    "segments": [
        # the default pool: weights and free cached blocks
        _segment(0, 20 * MB, [_block(12 * MB, "active_allocated"), _block(8 * MB, "inactive")]),
        _segment(0, 2 * MB, [_block(2 * MB, "active_allocated")]),
        # a CUDA graph's private pool: its activations, free between replays, still reserved
        _segment(0, 64 * MB, [_block(4 * MB, "active_allocated"), _block(60 * MB, "inactive")], pool=(1, 3)),
        _segment(0, 2 * MB, [_block(1 * MB, "active_awaiting_free"), _block(1 * MB, "active_allocated")],
                 pool=(1, 3), with_allocated=False),
        # another device's segment
        _segment(1, 32 * MB, [_block(32 * MB, "active_allocated")]),
    ],
    "device_traces": [[], []],
}


def test_snapshot_pools_split_default_and_graph_pools():
    one = snapshot_pools(SNAPSHOT, device_index=0)
    assert one == {"reserved": 88 * MB, "allocated": 19 * MB, "graph_pools_reserved": 66 * MB,
                   "graph_pools_allocated": 5 * MB}
    both = snapshot_pools(SNAPSHOT)
    assert both["reserved"] == 120 * MB and both["graph_pools_reserved"] == 66 * MB
    # the graph pool holds 66 MB that allocated memory (5 MB) leaves out: reserved is the figure to judge
    assert one["reserved"] - one["allocated"] >= one["graph_pools_reserved"] - one["graph_pools_allocated"]


@pytest.mark.parametrize("bad", [None, [], {}, {"segments": None}])
def test_not_a_snapshot_is_refused(bad):
    with pytest.raises(ValueError, match="not a CUDA memory snapshot"):
        snapshot_pools(bad)


def test_peak_memory_off_cuda_is_none():
    assert peak_memory(torch.device("cpu")) == {"peak_reserved_gb": None, "peak_allocated_gb": None,
                                                "graph_pools_gb": None}


@pytest.mark.gpu
def test_cuda_graph_pool_counts_in_reserved_not_allocated():
    """A captured graph's activations: reserved (and the snapshot's graph pools) count them."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from engine.memory import reset_peak

    device = torch.device("cuda")
    x = torch.randn(1024, 1024, device=device)
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        y = (x @ x).relu() @ x
    reset_peak(device)
    graph.replay()
    peak = peak_memory(device)
    assert peak["graph_pools_gb"] > 0 and peak["peak_reserved_gb"] >= peak["peak_allocated_gb"]
    assert snapshot_pools(torch.cuda.memory._snapshot())["graph_pools_reserved"] >= 4 * 2 ** 20
    del y
