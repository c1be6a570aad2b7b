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
