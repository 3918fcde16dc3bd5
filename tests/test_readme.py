"""The README's Python example runs as written, on the CPU (its shell commands are what CI and
tests/engine/test_default_weights.py run)."""

import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs_on_the_cpu():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 1, f"expected one Python example in README.md, found {len(blocks)}"
    scope = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)  # noqa: S102 (our own README)
    frames = np.asarray(scope["out"].frames)
    assert frames.shape == (1, 16, 32, 32, 3) and frames.dtype == np.float32
    assert 0.0 <= frames.min() and frames.max() <= 1.0 and frames.std() > 0.01
