"""Autotune keys carry a bucketed grid size: a launch config tuned at one batch does not serve all."""

import torch

from cmd_kernels._triton import GRID_BUCKET, grid_bucket
from cmd_kernels.aot import named_args
from cmd_kernels.ops import content_frame, motion_attention as attention


def test_grid_bucket_is_the_next_power_of_two():
    assert [grid_bucket(n) for n in (0, 1, 2, 3, 4, 5, 8, 9, 100)] == [1, 1, 2, 4, 4, 8, 8, 16, 128]


def _meta(*shape):
    return torch.empty(shape, device="meta")


def test_content_frame_and_attention_keys_hold_the_batch_bucket():
    for kernel in (content_frame._content_frame_fwd_kernel, content_frame._content_frame_bwd_kernel,
                   attention._attention_fwd_kernel):
        assert GRID_BUCKET in kernel.key
    seen = {}
    for batch in (1, 2, 3, 4, 5, 8):
        frames = _meta(batch, 4, 3, 8, 8)
        fwd = named_args(content_frame._forward_launch(frames, frames)[0])
        bwd = named_args(content_frame._backward_launch(_meta(batch, 3, 8, 8), frames, frames)[0])
        q = _meta(batch, 16, 64, 72)
        att = named_args(attention._forward_launch(q, q, q, 72 ** -0.5)[0])
        assert fwd[GRID_BUCKET] == bwd[GRID_BUCKET] == grid_bucket(batch)
        assert att[GRID_BUCKET] == grid_bucket(batch * 16)
        key = tuple(fwd[k] for k in content_frame._content_frame_fwd_kernel.key)
        seen.setdefault(key, []).append(batch)
    # batches in one bucket share a key (tuned once); other buckets get their own
    assert sorted(seen.values()) == [[1], [2], [3, 4], [5, 8]]
