"""The command-line plumbing every CLI of the engine, export and trainer shares: one parser class, one way
to report bad input, one set of exit codes, and the range rules of every number a request or a command line takes.

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

Numbers: :func:`check_int`, :func:`check_number` and :func:`check_seed` are the range rules (a one-line
ValueError naming the value); :func:`Int`, :func:`Number` and :data:`Seed` are the same rules as argparse
``type=`` converters, so a bad number is refused while the flags are parsed, before anything loads or is
written. This module needs only the standard library, so that checks run before the heavy imports.
"""

import argparse
import math
import numbers
import sys
import traceback
from typing import Callable, List, NoReturn, Optional, Tuple

#: What counts as bad input: reported as one line, exit code 2.
BAD_INPUT: Tuple[type, ...] = (ValueError, FileNotFoundError)
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


#: What a torch generator's ``manual_seed`` accepts (negative seeds stand for seed + 2**64).
SEED_MIN, SEED_MAX = -(2 ** 63), 2 ** 64 - 1
#: The trainer also seeds numpy's global generator (``np.random.seed``), which takes 0 to 2**32 - 1.
TRAIN_SEED_MAX = 2 ** 32 - 1


def check_int(name: str, value, low: Optional[int] = None, high: Optional[int] = None, why: str = "") -> int:
    """``value`` as an int when it is a whole number (an int, a numpy integer, or an integral float such as 3.0)
    in [low, high] (None: unbounded); a one-line ValueError naming ``name`` and the value otherwise. ``why``
    is appended to the bound in the message (e.g. " (the model's training timesteps)")."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if not isinstance(value, numbers.Integral):
        if not math.isfinite(value) or value != int(value):
            raise ValueError(f"{name} must be a whole number, got {value!r}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be a whole number {_bounds(low, high)}{why}, got {value}")
    return value


def check_number(name: str, value, low: Optional[float] = None, high: Optional[float] = None,
                 above: Optional[float] = None) -> float:
    """``value`` as a float when it is a finite real number in [low, high] and, with ``above``, > above; a
    one-line ValueError naming ``name`` and the value otherwise (NaN and infinities included)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    bad = (not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high)
           or (above is not None and value <= above))
    if bad:
        bound = f"> {above:g}" if above is not None and low is None and high is None else _bounds(low, high)
        if above is not None and (low is not None or high is not None):
            bound = f"> {above:g} and {bound}"
        raise ValueError(f"{name} must be a finite number{' ' + bound if bound else ''}, got {value:g}")
    return value


def check_seed(name: str, value, count: int = 1, low: int = SEED_MIN) -> int:
    """A seed that a torch generator takes (``low``, default :data:`SEED_MIN`, to :data:`SEED_MAX`), and so
    are the ``count`` seeds ``value`` .. ``value + count - 1`` derived from it (one per prompt, video or
    clip); a one-line ValueError naming ``name`` otherwise. ``low=0`` where numpy seeds from it too."""
    high = SEED_MAX - (count - 1)
    why = f" (it seeds {count} videos: {name} + 0 .. {count - 1})" if count > 1 else " (a torch generator's range)"
    return check_int(name, value, low, high, why)


def _bounds(low, high) -> str:
    if low is not None and high is not None:
        return f"between {low:g} and {high:g}" if isinstance(low, float) or isinstance(high, float) \
            else f"between {low} and {high}"
    if low is not None:
        return f">= {low:g}" if isinstance(low, float) else f">= {low}"
    if high is not None:
        return f"<= {high:g}" if isinstance(high, float) else f"<= {high}"
    return ""


def _parse_real(text: str):
    """An int when the text is one (exact, however large), else a float (nan and inf included)."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def _arg_type(rule: Callable, label: str) -> Callable[[str], object]:
    def convert(text: str):
        try:
            value = _parse_real(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {label}, got {text!r}") from None
        try:
            return rule(value)
        except ValueError as e:  # the rule's message without its name: argparse puts the flag in front
            raise argparse.ArgumentTypeError(str(e).split(" ", 1)[1]) from None

    convert.__name__ = label
    return convert


def Int(low: Optional[int] = 1, high: Optional[int] = None) -> Callable[[str], int]:
    """argparse ``type=``: a whole number in [low, high] (:func:`check_int`; default >= 1, a count)."""
    return _arg_type(lambda v: check_int("value", v, low, high), "a whole number")


def Number(low: Optional[float] = None, high: Optional[float] = None,
           above: Optional[float] = None) -> Callable[[str], float]:
    """argparse ``type=``: a finite number in [low, high], > above (:func:`check_number`)."""
    return _arg_type(lambda v: check_number("value", v, low, high, above), "a number")


#: argparse ``type=`` of a seed (:func:`check_seed`; the seeds derived from it are checked where their count is known).
Seed = _arg_type(lambda v: check_seed("value", v), "a whole number")
#: A seed that numpy's generators take as well (>= 0): the evaluation's and the benchmarks' data draws.
DataSeed = _arg_type(lambda v: check_seed("value", v, low=0), "a whole number")


class UsageError(ValueError):
    """Bad command-line input (argparse's own errors among them): one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse whose errors are raised as :class:`UsageError` (a ValueError) instead of printing the usage and
    exiting, so that :func:`run_main` reports them as every other bad value: one line, exit code 2.
    Sub-parsers (``add_subparsers``) are of this class too. ``--help`` prints and exits 0 as usual."""

    def error(self, message):
        # "argument --seed: must be ..." (a type= rule of this module) reads as the rules' own "--seed must be ..."
        flag, sep, rest = message.partition(": must be ")
        if sep and flag.startswith("argument "):
            message = f"{flag[len('argument '):].split('/')[0]} must be {rest}"
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
    """(line number from 1, prompt) for each line of a UTF-8 text file that is neither blank nor a comment
    (its first non-blank character ``#``), stripped (a byte-order mark and CRLF line ends as editors write
    them: :func:`engine.text_files.read_lines`). ValueError naming the file (and the line, for bytes that are
    not UTF-8) when it is missing, unreadable or holds no prompt."""
    from engine.text_files import read_lines

    prompts = [(n, line) for n, line in read_lines(path, "prompts file") if not line.startswith("#")]
    if not prompts:
        raise ValueError(f"no prompts in {path!r}")
    return prompts


LORA_HELP = ("an adapter file or the name of a shipped one (engine/weights/adapters/), with an optional weight "
             "after a colon (cyan:0.5); repeatable, all active at once (engine.adapters); default: none")


def add_lora_argument(parser) -> None:
    """``--lora NAME_OR_PATH[:SCALE]``, repeatable (engine.run, engine.bench, engine.profile, trainer.evaluate);
    :func:`engine.adapters.check_lora_args` checks the values, :func:`engine.adapters.load_lora_args` loads."""
    parser.add_argument("--lora", action="append", default=[], metavar="NAME_OR_PATH[:SCALE]", help=LORA_HELP)
