"""How a failed MLflow request reads: :func:`rejected` (a retry cannot help) or an outage, and :func:`short`, its
message cut to one log line. Shared by the outbox, the run's start and the model items, so none imports another."""

from __future__ import annotations


def rejected(exc: Exception) -> bool:
    """The server answered no (4xx other than 429), or the item itself is broken: a retry cannot help. Anything
    else (connection refused, timeout, 5xx) counts as an outage."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        code = exc.get_http_status_code()
        return 400 <= code < 500 and code != 429
    code = getattr(getattr(exc, "response", None), "status_code", None)  # requests.HTTPError (artifact uploads)
    if isinstance(code, int):
        return 400 <= code < 500 and code != 429
    return isinstance(exc, (FileNotFoundError, ValueError, TypeError, KeyError))


def short(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 240 else text[:237] + "..."
