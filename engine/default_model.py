"""Where models come from: the shipped default weights, a model folder, or random weights.

A model spec (``--model`` on the command line, ``CMDPipeline.from_pretrained(spec)``) is one of

- ``default`` (or nothing): the shipped weights in ``engine/weights/default/``, a CMDModel folder;
- a path to a folder written by ``CMDModel.save_pretrained``;
- ``random:<config>``: random weights for a named config or a config JSON file, with a random-weight
  text encoder (:mod:`engine.random_text`); for benchmarks and tests, e.g. ``random:ucf101-64``.
"""

import os
from dataclasses import dataclass
from typing import Optional

from engine.configs import CMDConfig, load_config
from engine.model_folder import CONFIG_FILE, check_model_folder

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
DEFAULT_MODEL_DIR = os.path.join(WEIGHTS_DIR, "default")
RANDOM_PREFIX = "random:"


@dataclass
class ModelSpec:
    """A resolved spec: ``path`` (a model folder) or ``random_config`` (random weights)."""

    path: Optional[str] = None
    random_config: Optional[str] = None

    @property
    def is_random(self) -> bool:
        return self.random_config is not None

    def load_config(self) -> CMDConfig:
        """The model's config alone (cheap: no weights), for validating a request first."""
        if self.is_random:
            return load_config(self.random_config)
        return load_config(os.path.join(self.path, CONFIG_FILE))


def default_model_dir() -> str:
    """The shipped default model folder; a clear ValueError where this install has none."""
    if not os.path.isfile(os.path.join(DEFAULT_MODEL_DIR, CONFIG_FILE)):
        raise ValueError(f"no default weights yet: {DEFAULT_MODEL_DIR} holds no model in this install; "
                         "pass --model DIR (a CMD model folder) or --model random:default")
    return DEFAULT_MODEL_DIR


def resolve_model(spec: Optional[str] = None) -> ModelSpec:
    """``default`` / None, a model folder, or ``random:<config>`` -> :class:`ModelSpec`. A one-line
    ValueError for an unknown config, or a folder that is missing, not a model folder or lacks a file its
    networks need (:func:`engine.model_folder.check_model_folder`): every CLI's ``--model`` comes here
    before any weights load."""
    if spec is None or spec == "default":
        path = default_model_dir()
        check_model_folder(path)
        return ModelSpec(path=path)
    if spec.startswith(RANDOM_PREFIX):
        name = spec[len(RANDOM_PREFIX):]
        load_config(name)  # a ValueError naming the config if it is unknown
        return ModelSpec(random_config=name)
    check_model_folder(spec)
    return ModelSpec(path=spec)
