"""CMD engine: models, configs, pipeline, backends and the command-line tools."""

from engine.cpu import set_wait_policy

set_wait_policy()  # before torch loads OpenMP (engine/cpu.py): a busy machine's cores are not spun on
