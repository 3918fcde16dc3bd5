"""kernels.bench --ceilings: ceilings measured earlier on the same device (the GPU lease's env stage)."""

import json

import pytest

from cmd_kernels import bench


def test_read_ceilings_top_level_or_nested(tmp_path):
    for payload in ({"copy_gbps": 4300.5, "matmul_tflops": 788}, {"ceilings": {"copy_gbps": 4300.5, "matmul_tflops": 788}}):
        path = tmp_path / "c.json"
        path.write_text(json.dumps(payload))
        assert bench.read_ceilings(str(path)) == {"copy_gbps": 4300.5, "matmul_tflops": 788.0}


@pytest.mark.parametrize("payload, message", [
    ({"copy_gbps": 4300.0}, "no positive 'matmul_tflops'"),
    ({"ceilings": {"copy_gbps": 0, "matmul_tflops": 1.0}}, "no positive 'copy_gbps' (got 0)"),
    ({"copy_gbps": "fast", "matmul_tflops": 1.0}, "no positive 'copy_gbps'"),
    ([1, 2], "no positive 'copy_gbps'"),
    (None, "cannot read"),
])
def test_bad_ceilings_file_is_one_line_naming_it(tmp_path, capsys, payload, message):
    path = tmp_path / "bad.json"
    if payload is not None:
        path.write_text(json.dumps(payload))
    with pytest.raises(SystemExit) as e:
        bench.main(["--configs", "default", "--ceilings", str(path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in err and str(path) in err


def test_rotation_copies_take_the_working_set_past_l2():
    """Rows whose inputs fit in L2 are timed on rotated copies (more than 2 x L2 between two uses of one),
    or marked L2-resident where the copies would not fit the budget."""
    from cmd_kernels.bench import rotating, rotation_copies

    l2 = 50 * 2 ** 20  # an H100's
    assert rotation_copies(10 * 2 ** 20, None) == (1, False)  # no GPU: nothing to rotate
    assert rotation_copies(200 * 2 ** 20, l2) == (1, False)  # past 2 x L2 already
    copies, resident = rotation_copies(10 * 2 ** 20, l2)
    assert not resident and (copies - 1) * 10 * 2 ** 20 >= 2 * l2 and (copies - 2) * 10 * 2 ** 20 < 2 * l2
    assert rotation_copies(2 ** 20, l2, budget=16 * 2 ** 20) == (16, True)  # budget-capped: marked
    assert rotation_copies(1, l2)[1] is True  # MAX_COPIES caps a tiny one
    seen = []
    call = rotating(lambda a: seen.append(a), [(0,), (1,), (2,)])
    for _ in range(7):
        call()
    assert seen == [0, 1, 2, 0, 1, 2, 0]


def test_kernel_bench_rows_on_rotated_copies(monkeypatch):
    """The timing pass's plumbing on a CPU (interpreted kernels, tiny shapes, a counting stand-in for the
    GPU timer): every row, each call on the next input copy, the rotation recorded in the row."""
    import torch

    from cmd_kernels import bench

    used = []

    def fake_time_ms(fn):
        for _ in range(3):
            fn()
        return 1.0

    monkeypatch.setattr(bench, "time_ms", fake_time_ms)
    monkeypatch.setattr(bench, "l2_bytes", lambda device: 4096)  # a small "L2": the tiny inputs rotate
    real = bench.rotating
    monkeypatch.setattr(bench, "rotating", lambda fn, copies: used.append(len(copies)) or real(fn, copies))
    shapes = bench.Shapes("tiny", (1, 2, 3, 4, 4), (1, 2, 2, 2, 8), (1, 2, 16, 8), (1, 16, 16))
    rows = bench.benchmark(shapes, torch.float32, "cpu", {"copy_gbps": 1.0, "matmul_tflops": 1.0},
                           compile_baselines=False)
    assert [r["name"] for r in rows] == ["content_frame", "content_frame_backward", "decoder_fusion",
                                         "decoder_fusion_backward", "motion_attention", "modulated_layernorm",
                                         "dit_attention_half"]
    for r in rows:
        assert r["median_ms"] == 1.0 and r["l2_bytes"] == 4096 and r["rotated_copies"] > 1
        assert r["speedup_vs_eager"] == 1.0
    assert all(n > 1 for n in used)
    attention = rows[4]
    assert "sdpa_math_ms" in attention and "speedup_vs_sdpa_best" in attention
