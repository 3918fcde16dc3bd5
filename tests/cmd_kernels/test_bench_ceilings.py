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
