"""One online request to a served model and its answer, the same whichever server runs it: the MLflow pyfunc
(:mod:`genrec_dist.serving`, ``mlflow models serve``) and the Ray Serve application (:mod:`genrec_dist.ray_serve`,
``jobs/serve.py``)::

    request   {"dataframe_records": [{"user": "A1", "history": [12, 7, 93]}, ...], "params": {"k": 10}}
    response  {"predictions": [{"user": "A1", "items": [...], "scores": [...]}, ...]}   best first

A request that is not a list of known item ids, or asks for a ``k`` or an inference setting the model does not have,
is a :class:`RequestError` (HTTP 400) with a one-line message naming the row and the value. Pure torch/numpy: the
servers turn the error into their own 400.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch

from genrec_dist.errors import GenrecError

DEFAULT_K = 10
FORMATS = ("dataframe_records", "dataframe_split")


class RequestError(GenrecError, ValueError):
    """A request the model cannot answer (HTTP 400): the message says which row or setting, and why."""


def inference_params(model: torch.nn.Module) -> dict[str, Any]:
    """The inference settings a request may change, with the model's exported values as defaults (CAR:
    ``inference`` fast/slow; beam-search models: ``beam_width``)."""
    accepted = inspect.signature(model.recommend).parameters
    out: dict[str, Any] = {}
    if "inference" in accepted and getattr(model, "inference_modes", ()):
        out["inference"] = str(model.cfg.inference)
    if "beam_width" in accepted and getattr(model.cfg, "beam_width", None):
        out["beam_width"] = int(model.cfg.beam_width)
    return out


def check_params(params: Any, defaults: dict[str, Any], model: torch.nn.Module, num_items: int,
                 strict: bool = True) -> tuple[int, dict[str, Any]]:
    """``(k, inference settings)`` of a request's ``params`` over ``defaults`` (``{"k": ..., **inference_params}``);
    a :class:`RequestError` for a bad value. ``strict``: an unknown param is an error too (the MLflow scoring server
    drops unknown params with a warning in its log; a setting silently ignored is worse than a 400)."""
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise RequestError(f"'params' must be a mapping of settings, got {type(params).__name__}")
    unknown = sorted(set(params) - set(defaults))
    if strict and unknown:
        raise RequestError(f"unknown param {unknown[0]!r} (this model takes {', '.join(sorted(defaults))})")
    p = {**defaults, **{k: v for k, v in params.items() if v is not None and k in defaults}}
    k = p.pop("k")
    if isinstance(k, float) and k.is_integer():
        k = int(k)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= int(k) <= num_items:
        raise RequestError(f"'k' must be an integer in 1..{num_items}, got {k!r}")
    modes = getattr(model, "inference_modes", ())
    if "inference" in p and p["inference"] not in modes:
        raise RequestError(f"'inference' must be one of {', '.join(modes)}, got {p['inference']!r}")
    if "beam_width" in p:
        width = p["beam_width"]
        if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or int(width) < 1:
            raise RequestError(f"'beam_width' must be an integer of at least 1, got {width!r}")
        p["beam_width"] = int(width)
    return int(k), p


def check_history(h: Any, row: int, num_items: int) -> np.ndarray:
    """Row ``row``'s history as int64 item ids, or a :class:`RequestError` naming the row: anything that is not a
    non-empty list of integer item ids 1..num_items."""
    if h is None or isinstance(h, (str, bytes, dict)) or not hasattr(h, "__len__"):
        raise RequestError(f"row {row}: 'history' must be a list of item ids, got {type(h).__name__} {str(h)[:80]!r}")
    try:
        ids = np.asarray(list(h))
    except (TypeError, ValueError):
        raise RequestError(f"row {row}: 'history' must be a list of item ids") from None
    if ids.size == 0:
        raise RequestError(f"row {row}: 'history' is empty (at least one item id)")
    if ids.ndim != 1 or (ids.dtype.kind not in "iu"
                         and not (ids.dtype.kind == "f" and np.all(np.isfinite(ids)) and np.all(np.mod(ids, 1) == 0))):
        raise RequestError(f"row {row}: 'history' must be integer item ids, got {str(list(h))[:80]}")
    ids = ids.astype(np.int64)
    bad = ids[(ids < 1) | (ids > num_items)]
    if bad.size:
        raise RequestError(f"row {row}: unknown item id {int(bad[0])} (this model's catalog is 1..{num_items})")
    return ids


def records(body: Any) -> list[dict[str, Any]]:
    """The rows of a request body (decoded JSON) as ``[{"user"?, "history"}, ...]``: ``dataframe_records`` (a list of
    row objects) or ``dataframe_split`` (``{"columns": [...], "data": [[...], ...]}``), as the MLflow scoring server
    reads them."""
    if not isinstance(body, dict):
        raise RequestError(f"the request must be a JSON object with one of {', '.join(FORMATS)}, got "
                           f"{type(body).__name__}")
    found = [f for f in FORMATS if f in body]
    if len(found) != 1:
        raise RequestError(f"the request must have exactly one of {', '.join(FORMATS)} (and optionally 'params'), "
                           f"got keys {sorted(body)}")
    data = body[found[0]]
    if found[0] == "dataframe_split":
        if not isinstance(data, dict) or not isinstance(data.get("columns"), list) \
                or not isinstance(data.get("data"), list):
            raise RequestError("'dataframe_split' must be {\"columns\": [...], \"data\": [[...], ...]}")
        cols = data["columns"]
        rows = []
        for i, values in enumerate(data["data"]):
            if not isinstance(values, list) or len(values) != len(cols):
                raise RequestError(f"row {i}: 'dataframe_split' rows must be lists of {len(cols)} values")
            rows.append(dict(zip(cols, values)))
    else:
        rows = data
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise RequestError("'dataframe_records' must be a list of row objects ({\"user\": ..., \"history\": [...]})")
    if not rows:
        raise RequestError("the request has no rows")
    if any("history" not in r for r in rows):
        columns = sorted({c for r in rows for c in r})
        raise RequestError(f"the input needs a 'history' column (a list of item ids per row), got columns {columns}")
    return rows


def left_pad(histories: Any, width: int) -> torch.Tensor:
    """(B, width) int64: each history's (item ids, oldest first) last ``width`` items, left-padded with 0 (the layout
    the models read, most recent last; a fixed width, so a row's answer never depends on the other rows batched with
    it). Online serving, batch recommendations and the GPU check all pad with this."""
    out = np.zeros((len(histories), width), dtype=np.int64)
    for row, h in enumerate(histories):
        h = np.asarray(h, dtype=np.int64)[-width:]
        if len(h):
            out[row, width - len(h):] = h
    return torch.from_numpy(out)


def rank(model: torch.nn.Module, history: torch.Tensor, k: int, params: dict[str, Any]
         ) -> list[tuple[list[int], list[float]]]:
    """``(items, scores)`` per row of ``history`` (B, T): the model's own top ``k`` under ``params``, best first;
    a beam search that found fewer than ``k`` items gives fewer (no 0 padding)."""
    with torch.no_grad():
        items, scores = model.topk(history, k, **params)
    items, scores = items.cpu().numpy(), scores.float().cpu().numpy()
    keep = items != 0
    return [(r[m].tolist(), s[m].astype(float).tolist()) for r, s, m in zip(items, scores, keep)]


def predictions(users: list[Any] | None, ranked: list[tuple[list[int], list[float]]]) -> dict[str, Any]:
    """The response body: ``{"predictions": [{"user"?, "items", "scores"}, ...]}``; ``user`` when the request's rows
    had one (a row without one gets "")."""
    if users is None:
        return {"predictions": [{"items": i, "scores": s} for i, s in ranked]}
    return {"predictions": [{"user": "" if u is None or u != u else str(u), "items": i, "scores": s}
                            for u, (i, s) in zip(users, ranked)]}
