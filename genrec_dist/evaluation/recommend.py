"""Top-k recommendations with scores for a batch of users: the plain callable :class:`Recommender` that
``jobs/recommend.py`` maps over a users table (on Ray Data, :mod:`genrec_dist.ray_recommend`), also usable alone::

    rec = Recommender("outputs/synthetic/runs/car-...", k=10)
    rec({"user": np.array(["u1"]), "history": np.array([np.array([3, 17, 42])], dtype=object)})
    # -> {"user": ["u1"], "items": (1, 10) int64, "scores": (1, 10) float32}

Every model ranks in its own inference mode: CAR fast or slow (its exported ``inference``/``slow_weight``, or the
``inference`` overrides), TIGER / UNGER / CAR-AR by constrained beam search (``beam_width``), SASRec by its logits.
Scores are the model's ranking score of each item: CAR and SASRec the item's log-probability / logit, beam models
the beam's log-probability; best first, item 0 and score -inf where fewer than k items exist.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch

from genrec_dist.errors import ConfigError, GenrecError
from genrec_dist.evaluation.evaluate import seen_mask
from genrec_dist.models import recommend_kwargs
from genrec_dist.runs.export import load_exported
from genrec_dist.serve_request import left_pad

NEG_INF = float("-inf")


class RecommendInputError(GenrecError, ValueError):
    """A users-table row the model cannot read: the message names the file, the user and the field."""


def check_histories(users: Any, histories: Any, num_items: int, paths: Any = None) -> None:
    """Every history is a non-empty list of item ids 1..num_items; else :class:`RecommendInputError` naming the
    file (``paths``, one per row, when known), the user and the item."""
    for row, h in enumerate(histories):
        where = f"{paths[row]}: " if paths is not None else ""
        user = users[row].item() if isinstance(users[row], np.generic) else users[row]
        if h is None or len(h) == 0:
            raise RecommendInputError(f"{where}user {user!r}: 'history' is empty (nothing to recommend from)")
        ids = np.asarray(list(h))
        if ids.dtype.kind not in "iu":
            raise RecommendInputError(f"{where}user {user!r}: 'history' must be a list of integer item ids, got "
                                      f"{list(h)[:5]!r}")
        bad = (ids < 1) | (ids > num_items)
        if bad.any():
            raise RecommendInputError(f"{where}user {user!r}: 'history' item {int(ids[bad][0])} is not an item id "
                                      f"of the model (1..{num_items})")


def recommend_batch(model: torch.nn.Module, histories: Any, k: int, max_history: int, exclude_seen: bool = False,
                    device: torch.device | str = "cpu", **inference: Any) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` items (B, k) int64 and scores (B, k) float32 for ``histories`` (item-id arrays, oldest first).

    The model reads each user's last ``max_history`` items, left-padded to that fixed width (so a user's list does
    not depend on the other users of its batch). ``exclude_seen`` drops every item of the user's whole history: the
    model is asked for k + (distinct items seen) and the seen ones are filtered out, so exactly k remain whenever the
    catalog has them (for beam models the beam widens to that many; a wider beam may reorder the tail)."""
    history = left_pad(histories, max_history).to(device)
    extra = max((len(np.unique(np.asarray(h))) for h in histories), default=0) if exclude_seen else 0
    fetch = min(k + extra, model.num_items)
    accepted = inspect.signature(model.topk).parameters
    with torch.no_grad():
        items, scores = model.topk(history, fetch, **{n: v for n, v in inference.items()
                                                      if n in accepted and v is not None})
    items, scores = items.cpu().numpy().astype(np.int64), scores.float().cpu().numpy()
    if exclude_seen:  # the whole history, not only the model's last max_history items
        seen = left_pad(histories, max((len(h) for h in histories), default=1))
        keep = ~seen_mask(torch.from_numpy(items), seen).numpy()
        order = np.argsort(~keep, axis=1, kind="stable")  # kept items first, rank order kept
        items, scores = np.take_along_axis(items, order, 1), np.take_along_axis(scores, order, 1)
        scores[~np.take_along_axis(keep, order, 1)] = NEG_INF
        items[~np.take_along_axis(keep, order, 1)] = 0
    out_items, out_scores = np.zeros((len(histories), k), np.int64), np.full((len(histories), k), NEG_INF, np.float32)
    n = min(k, items.shape[1])
    out_items[:, :n], out_scores[:, :n] = items[:, :n], scores[:, :n]
    return out_items, out_scores


class Recommender:
    """A Ray Data UDF (and a plain callable): loads a run's exported model once, then maps batches
    ``{"user", "history"[, "path"]} -> {"user", "items" (B, k), "scores" (B, k)}``.

    ``inference``: overrides of the exported model's inference-time fields (``{"inference": "slow"}`` for CAR);
    ``beam_width`` > 0 replaces a beam model's own width; ``device``: ``auto`` takes a GPU when this process sees one;
    ``threads`` > 0 sets torch's CPU threads (the CPUs the actor reserved).
    """

    def __init__(self, run_dir: str, k: int, exclude_seen: bool = False, storage_cfg: Any = None,
                 inference: dict[str, Any] | None = None, beam_width: int = 0, device: str = "auto",
                 threads: int = 0):
        if k < 1:
            raise ConfigError(f"recommend.k must be >= 1, got {k}")
        if threads > 0:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")
        self.model, self.meta = load_exported(run_dir, storage_cfg, inference)
        self.model.to(self.device)
        self.k, self.exclude_seen = k, exclude_seen
        self.max_history = int(self.model.cfg.max_history)
        self.kwargs = recommend_kwargs(self.model, beam_width)  # the one beam-width rule

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        users, histories = batch["user"], batch["history"]
        check_histories(users, histories, self.model.num_items, batch.get("path"))
        items, scores = recommend_batch(self.model, histories, self.k, self.max_history, self.exclude_seen,
                                        self.device, **self.kwargs)
        return {"user": np.asarray(users), "items": items, "scores": scores}
