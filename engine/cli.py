"""The command-line plumbing every CLI of the engine, export and trainer shares: one parser class, one way
to report bad input, one set of exit codes.

    from engine.cli import Parser, run_main

    def main(argv=None) -> int:
        def body():
            args = Parser(prog="python -m engine.thing").parse_args(argv)
            ...                      # raise ValueError("--flag must be ..., got ...") for bad input
            return 0
        return run_main(body)

Exit codes: 0 success; 1 a check or a job failed (the CLI's own result); 2 bad input, reported as one line
``error: ...`` on stderr (argparse's own errors too, without the usage dump); 130 Ctrl-C, reported as one
line. Library log noise while weights load is silenced by the loaders themselves (``engine.logs.quiet_loading``,
one rule for the CLI and for Python), so a CLI needs nothing for it. ``cmd_kernels.bench`` keeps its own plain
argparse: cmd_kernels may not import engine.
"""

import argparse
import sys
import traceback
from typing import Callable, List, NoReturn, Optional, Tuple

#: What counts as bad input: reported as one line, exit code 2.
BAD_INPUT: Tuple[type, ...] = (ValueError, FileNotFoundError)
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class UsageError(ValueError):
    """Bad command-line input (argparse's own errors among them): one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse whose errors are raised as :class:`UsageError` (a ValueError) instead of printing the usage and
    exiting, so that :func:`run_main` reports them as every other bad value: one line, exit code 2.
    Sub-parsers (``add_subparsers``) are of this class too. ``--help`` prints and exits 0 as usual."""

    def error(self, message):
        raise UsageError(message)


def one_line(error: BaseException) -> str:
    """An exception's message on one line (its lines joined with '; '), or its type's name when empty."""
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


def print_error(error) -> None:
    """``error: <message on one line>`` on stderr."""
    message = one_line(error) if isinstance(error, BaseException) else one_line(ValueError(error))
    print(f"error: {message}", file=sys.stderr, flush=True)


def fail(message: str) -> NoReturn:
    """Bad input outside :func:`run_main` (e.g. a ``parse_args`` function of a script): one line on stderr,
    then ``SystemExit(2)``."""
    print_error(message)
    raise SystemExit(EXIT_BAD_INPUT)


def parse_or_exit(parser: argparse.ArgumentParser, argv: Optional[List[str]] = None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, bad flags reported by :func:`fail` (one line, ``SystemExit(2)``)."""
    try:
        return parser.parse_args(argv)
    except BAD_INPUT as e:
        fail(one_line(e))


def run_main(body: Callable[[], Optional[int]], *, interrupted: str = "interrupted", speak: bool = True,
             crash_code: Optional[int] = None) -> int:
    """Run a CLI's ``body`` and turn how it ended into an exit code: its return value (None: 0); bad input
    (:data:`BAD_INPUT`) -> ``error: <one line>`` on stderr and 2; Ctrl-C -> ``error: <interrupted>`` and 130.
    ``speak=False`` keeps stderr quiet (a torchrun rank other than 0 finds the same error). Any other
    exception propagates, unless ``crash_code`` is given: then its traceback is printed and that code returned
    (a torchrun rank must still leave its process group)."""
    try:
        code = body()
        return 0 if code is None else code
    except BAD_INPUT as e:
        if speak:
            print_error(e)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        if speak:
            print_error(interrupted)
        return EXIT_INTERRUPTED
    except Exception:  # noqa: BLE001 -- only with crash_code: report it and let the caller clean up
        if crash_code is None:
            raise
        traceback.print_exc()
        return crash_code


def run_ranks(body: Callable[[Callable], Optional[int]], **kwargs) -> int:
    """:func:`run_main` for a CLI that may run under torchrun. ``body(joined)`` passes the
    ``engine.distributed.DistInfo`` of the group it joins through ``joined(info)`` (which returns it); however
    the body ends, a rank that joined then leaves the group with the exit code (``engine.distributed.finish``:
    under torchrun the worker ends at once). ``kwargs``: those of :func:`run_main`."""
    infos = []

    def joined(info):
        infos.append(info)
        return info

    code = run_main(lambda: body(joined), **kwargs)
    if infos:
        from engine.distributed import finish

        finish(infos[-1], code)
    return code


def read_prompts(path: str) -> List[Tuple[int, str]]:
    """(line number from 1, prompt) for each non-blank line of a UTF-8 text file (stripped). ValueError naming
    the file when it is missing, unreadable or holds no prompt."""
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [(n, line.strip()) for n, line in enumerate(f, 1) if line.strip()]
    except FileNotFoundError:
        raise ValueError(f"prompts file not found: {path!r}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read prompts file {path!r}: {e}") from None
    if not prompts:
        raise ValueError(f"no prompts in {path!r}")
    return prompts


LORA_HELP = ("an adapter file or the name of a shipped one (engine/weights/adapters/), with an optional weight "
             "after a colon (cyan:0.5); repeatable, all active at once (engine.adapters)")


def add_lora_argument(parser) -> None:
    """``--lora NAME_OR_PATH[:SCALE]``, repeatable (engine.run, engine.bench, engine.profile, trainer.evaluate);
    :func:`engine.adapters.check_lora_args` checks the values, :func:`engine.adapters.load_lora_args` loads."""
    parser.add_argument("--lora", action="append", default=[], metavar="NAME_OR_PATH[:SCALE]", help=LORA_HELP)
