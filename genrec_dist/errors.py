"""The one base class of user-facing errors. A job (through :func:`genrec_dist.cli.main`) prints a
:class:`GenrecError` as one line and exits; any other exception is a bug and keeps its traceback.

Each error type lives next to the code that raises it (``storage.StorageError``, ``data.errors.InputError``,
``tracking.TrackingError``, ``runs.rundir.RunConfigError``, ...) and subclasses :class:`GenrecError`. Types that
were ``ValueError``/``RuntimeError`` before keep that base too, so callers that caught them still do.
"""

from __future__ import annotations


class GenrecError(Exception):
    """Bad input, configuration or environment, told to the user in one line (the message names what to fix)."""

    exit_code = 1


class ConfigError(GenrecError, ValueError):
    """A config file, override or setting that does not fit; the message names the source and the key."""

    exit_code = 2
