"""The engine's one rule for the notices of the libraries it loads weights with (diffusers, transformers).

Loading a model prints, by default, a notice per network when ``accelerate`` is not installed ("Cannot
initialize model with low cpu memory usage ...") and a "Loading weights" progress bar: neither says anything
to a user of the engine, from the CLI or from Python. :func:`quiet_loading` hides them while the engine
loads, and only then: the libraries' settings are restored afterwards, and nothing is hidden when the user
asked for the library's logging (its verbosity at INFO or DEBUG, through ``diffusers.utils.logging.
set_verbosity_info()`` / ``transformers.utils.logging.set_verbosity_info()`` or the ``DIFFUSERS_VERBOSITY``
/ ``TRANSFORMERS_VERBOSITY`` environment variables). Errors are never hidden.
"""

import importlib
import logging
from contextlib import contextmanager
from typing import Iterator

LIBRARIES = ("diffusers", "transformers")


@contextmanager
def quiet_loading(*libraries: str) -> Iterator[None]:
    """While inside, the named libraries (default: diffusers and transformers; each is imported if it is not
    yet) log errors only and show no progress bars, unless their verbosity was set to INFO or DEBUG. Works
    as a decorator too. ValueError for a library not in :data:`LIBRARIES`."""
    restore = []
    for name in libraries or LIBRARIES:
        if name not in LIBRARIES:
            raise ValueError(f"unknown library {name!r}; choose from {', '.join(LIBRARIES)}")
        try:
            log = importlib.import_module(f"{name}.utils.logging")
        except ImportError:  # not installed: it cannot speak either
            continue
        verbosity = log.get_verbosity()
        if verbosity < logging.WARNING:  # the user asked for this library's logging
            continue
        restore.append((log, verbosity, log.is_progress_bar_enabled()))
        log.set_verbosity(logging.ERROR)
        log.disable_progress_bar()
    try:
        yield
    finally:
        for log, verbosity, bars in restore:
            log.set_verbosity(verbosity)
            if bars:
                log.enable_progress_bar()
