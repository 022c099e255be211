"""The error a bad input file ends in: it names the file and, where there is one, the line."""

from __future__ import annotations

from genrec_dist.errors import GenrecError


class InputError(GenrecError, ValueError):
    """A raw input that cannot be read: ``path``, ``line`` (1-based, or None) and the reason.

    ``str(err)`` is one line, ``"<path>:<line>: <reason>"``, fit to print as a job's error.
    """

    def __init__(self, path: str, reason: str, line: int | None = None):
        self.path = str(path)
        self.line = line
        self.reason = reason
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {reason}")
