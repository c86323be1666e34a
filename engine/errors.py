"""Error classes that separate the user's mistakes from the engine's bugs.

A :class:`UserError` is something the user can fix (a config key, a missing file, missing
weights). The command line prints it as one line and exits with code 2, never a traceback.
"""

from __future__ import annotations

import difflib
import sys
from typing import Callable, Iterable, List


class UserError(Exception):
    """A mistake in the user's input; shown as one line, exit code 2."""

    exit_code = 2


class ConfigError(UserError):
    """Unknown key, wrong type, impossible value or missing required input."""


class InputError(UserError):
    """A bad input file (missing, corrupt, wrong size, unusable background)."""


class RegistryError(UserError):
    """Unknown or doubly registered plugin name."""


class RunAborted(Exception):
    """The run stopped on purpose (e.g. repeated NaN losses); checkpoints are kept."""

    exit_code = 3


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest choice, or ``""`` when none is close."""
    choices = [str(c) for c in choices]
    close = difflib.get_close_matches(str(word), choices, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def run_cli(run: Callable[[List[str]], int], argv: List[str]) -> int:
    """Run a command-line entry point: user errors and deliberate aborts become one line on
    stderr and their exit code, never a traceback (running out of memory is a user error:
    exit 2); Ctrl-C outside a trainer exits with 130."""
    try:
        return run(argv)
    except UserError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return exc.exit_code
    except RunAborted as exc:
        print(f"aborted: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        # the reader went away (``... --dry-run | head``): stop quietly, as Unix tools do;
        # stdout goes to devnull so the interpreter's final flush cannot fail again
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:   # running out of memory is the user's to fix, not a bug
        if not (isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"):
            raise
        first = " ".join(str(exc).split())[:160]
        print(f"error: out of memory{f' ({first})' if first else ''}; lower the sizes "
              "(resolutions, samples, views) or use a larger device (python -m engine.run "
              "recipe=NAME --estimate predicts a run's peak)", file=sys.stderr)
        return UserError.exit_code
    except KeyboardInterrupt:
        print("interrupted (no checkpoint written since the last one; finished work is kept)",
              file=sys.stderr)
        return 130
