"""Training code for CMD video diffusion: data sets, attribute metrics, training loops."""

import engine  # noqa: F401  -- before any torch import: the OpenMP wait policy (engine/cpu.py) must precede it
