"""The one exception type for bad user input.

Its message is a single line that names the offending file (or argument) and the rule broken;
the CLI prints it without a traceback and exits with code 2.
"""

from __future__ import annotations

from pathlib import Path


class TumorsegInputError(ValueError):
    """Bad input: a one-line message naming the file and the rule broken."""

    def __init__(self, where: str | Path | None, rule: str):
        self.where = str(where) if where is not None else None
        self.rule = rule
        message = f"{self.where}: {rule}" if self.where else rule
        super().__init__(" ".join(message.split()))  # always one line


class Interrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint (exit code 130)."""


def one_line(exc: BaseException) -> str:
    """`exc` as one line for a per-case report: a TumorsegInputError's own message; any other
    exception (out of memory, a bug) prefixed with its type, e.g. "MemoryError" or
    "RuntimeError: boom"."""
    if isinstance(exc, TumorsegInputError):
        return str(exc)
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
