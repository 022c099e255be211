"""Scoring a model: the leave-one-out metrics (:func:`recall_ndcg`), the evaluation loop that ranks the full
catalog for each user with ``model.recommend`` and scores the targets (:func:`evaluate_model`), and the
most-popular baseline every learned model must beat (:class:`MostPopular`).

Callable without a trainer: ``evaluate_model(model, batches, ks=(5, 10, 20))`` with any iterable of
``(history (B, T), target (B,))`` tensors.

Metrics (TIGER §4.1, UNGER §4.1.1): with a single relevant item per user, Recall@k is a hit indicator (= HR@k) and
NDCG@k = 1 / log2(rank + 1) for a 1-based rank <= k (the ideal DCG is 1), else 0.
"""

from __future__ import annotations

import itertools
import time
from typing import Any, Iterable, Literal, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def evaluate_model(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    ks: Sequence[int] = (5, 10, 20),
    device: str | torch.device | None = None,
    **recommend_kwargs: Any,
) -> dict[str, float]:
    """Leave-one-out Recall@k / NDCG@k over all users of ``batches`` plus speed.

    Returns ``recall@k``, ``ndcg@k`` (means over users), ``users``, ``users_per_s`` (users / total recommend time),
    ``latency_ms_per_user`` (mean over batches of batch wall time / batch size) with ``_p50`` / ``_p95``.
    ``recommend_kwargs`` go to ``model.recommend`` (e.g. ``beam_width=100`` for TIGER). A batch may carry a third
    tensor, the user's seen items (B, S) (``evaluate.filter_seen``): they are removed from the ranking before scoring
    (the protocol of eSASRec's benchmark, RecTools ``filter_viewed``). The model's train/eval mode is restored
    afterwards.
    """
    return evaluate_variants(model, batches, ks, device, {"": recommend_kwargs})[""]


def evaluate_variants(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    ks: Sequence[int],
    device: str | torch.device | None,
    variants: Mapping[str, Mapping[str, Any]],
) -> dict[str, dict[str, float]]:
    """:func:`evaluate_model` of several inference settings in one pass over ``batches``: ``{name: metrics}`` for
    ``variants`` ``{name: recommend kwargs}``. A model with ``topk_many`` (CAR) ranks every setting of a batch in one
    call, sharing what they have in common; any other model is called once per setting. The speed fields of a
    several-setting pass time all of them together."""
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    if device is None:
        device = next(itertools.chain((p.device for p in model.parameters()), (b.device for b in model.buffers())),
                      torch.device("cpu"))
    device = torch.device(device)
    names, settings = list(variants), [dict(v) for v in variants.values()]
    together = len(settings) > 1 and hasattr(model, "topk_many")
    was_training = model.training
    model.eval()
    sums = [{f"{m}@{k}": 0.0 for k in ks for m in ("recall", "ndcg")} for _ in names]
    users, total_s, per_user_ms = 0, 0.0, []
    try:
        for batch in batches:
            history, target = batch[0].to(device), batch[1].to(device)
            seen = batch[2].to(device) if len(batch) > 2 else None  # filter_seen: every item before the target
            if history.shape[0] == 0:
                continue
            # with a seen filter, rank k + (most items any user of the batch has seen), then drop the seen ones
            fetch = ks[-1] if seen is None else min(ks[-1] + int((seen != 0).sum(1).max()), model.num_items)
            _sync(device)
            start = time.perf_counter()
            if together:
                ranked = [items for items, _ in model.topk_many(history, fetch, settings, scores=False)]
            else:
                ranked = [model.recommend(history, fetch, **kw) for kw in settings]
            if seen is not None:
                ranked = [drop_seen(r, seen, ks[-1]) for r in ranked]
            _sync(device)
            elapsed = time.perf_counter() - start
            for j, r in enumerate(ranked):
                for name, value in recall_ndcg(r, target, ks, reduce="sum").items():
                    sums[j][name] += value
            users += history.shape[0]
            total_s += elapsed
            per_user_ms.append(1000.0 * elapsed / history.shape[0])
    finally:
        model.train(was_training)
    lat = np.asarray(per_user_ms) if per_user_ms else np.zeros(1)
    speed = {
        "users": float(users),
        "users_per_s": users / total_s if total_s > 0 else 0.0,
        "latency_ms_per_user": float(lat.mean()),
        "latency_ms_per_user_p50": float(np.percentile(lat, 50)),
        "latency_ms_per_user_p95": float(np.percentile(lat, 95)),
    }
    return {name: {m: v / max(users, 1) for m, v in sums[j].items()} | speed for j, name in enumerate(names)}


def seen_mask(ranked: torch.Tensor, seen: torch.Tensor, block: int = 64) -> torch.Tensor:
    """(B, F) bool: which items of each row of ``ranked`` (B, F) are among the row's ``seen`` (B, S) items (0 =
    padding, never seen). ``seen`` is compared ``block`` columns at a time, so memory is (B, F, block) whatever the
    history length. Evaluation's seen filter and batch recommendations' ``exclude_seen`` both read it."""
    hit = torch.zeros_like(ranked, dtype=torch.bool)
    for lo in range(0, seen.shape[1], block):
        part = seen[:, lo:lo + block]  # (B, s)
        hit |= ((ranked[:, :, None] == part[:, None, :]) & (part[:, None, :] != 0)).any(-1)
    return hit


def drop_seen(ranked: torch.Tensor, seen: torch.Tensor, k: int, block: int = 64) -> torch.Tensor:
    """The first ``k`` items of each row of ``ranked`` (B, F) that are not in the row's ``seen`` (B, S) items (0 =
    padding), in rank order; 0 where fewer than k remain (:func:`seen_mask`)."""
    hit = seen_mask(ranked, seen, block)
    order = torch.sort(hit.to(torch.int8), dim=1, stable=True).indices  # unseen first, rank order kept
    out = torch.gather(ranked.masked_fill(hit, 0), 1, order)[:, :k]
    if out.shape[1] < k:
        out = torch.cat([out, out.new_zeros(out.shape[0], k - out.shape[1])], dim=1)
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------------------------
# the metrics
# --------------------------------------------------------------------------------------------------------------

def recall_ndcg(
    ranked: torch.Tensor,
    target: torch.Tensor,
    ks: Sequence[int],
    reduce: Literal["mean", "sum", "none"] = "mean",
) -> dict[str, float | torch.Tensor]:
    """``ranked`` (B, K) item ids best first (0 = empty slot, never a hit), ``target`` (B,) -> ``{"recall@k",
    "ndcg@k"}`` for every k in ``ks``: the mean over users (``reduce="mean"``), the sum (to add up over batches), or
    per-user tensors (B,) (``"none"``)."""
    if ranked.dim() != 2 or target.dim() != 1 or ranked.shape[0] != target.shape[0]:
        raise ValueError(f"expected ranked (B, K) and target (B,), got {tuple(ranked.shape)} and {tuple(target.shape)}")
    if any(k < 1 or k > ranked.shape[1] for k in ks):
        raise ValueError(f"every k in {list(ks)} must be in 1..{ranked.shape[1]} (the length of the ranked lists)")
    hit = (ranked == target[:, None].to(ranked.device)) & (ranked != 0)  # (B, K)
    found = hit.any(dim=1)
    rank = hit.float().argmax(dim=1)  # (B,) 0-based position of the first hit (0 when none; masked by `found`)
    gain = 1.0 / torch.log2(rank.double() + 2.0)
    out: dict[str, float | torch.Tensor] = {}
    for k in ks:
        within = found & (rank < k)
        for name, value in (("recall", within.double()), ("ndcg", within.double() * gain)):
            if reduce == "none":
                out[f"{name}@{k}"] = value
            elif reduce == "sum":
                out[f"{name}@{k}"] = float(value.sum())
            else:
                out[f"{name}@{k}"] = float(value.mean()) if len(value) else 0.0
    return out


# --------------------------------------------------------------------------------------------------------------
# the most-popular baseline
# --------------------------------------------------------------------------------------------------------------

class MostPopular(nn.Module):
    """Same API as the models: ``topk(history (B, T), k) -> (items (B, k), counts (B, k))`` and ``recommend`` (its
    items); ties broken by lower id."""

    def __init__(self, counts: np.ndarray | torch.Tensor):
        super().__init__()
        counts = torch.as_tensor(np.asarray(counts), dtype=torch.float64)  # (N+1,), index 0 = padding
        if counts.dim() != 1 or counts.shape[0] < 1:
            raise ValueError(f"counts must be 1-D (num_items + 1,), got shape {tuple(counts.shape)}")
        counts = counts.clone()
        counts[0] = -1.0  # padding is never recommended
        # Stable order: descending count, then ascending item id.
        order = torch.from_numpy(np.lexsort((np.arange(len(counts)), -counts.numpy())).copy())
        self.num_items = int(counts.shape[0]) - 1
        self.register_buffer("ranking", order[: self.num_items])  # (N,) best first
        self.register_buffer("counts", counts)  # (N+1,) the score topk() reports

    @classmethod
    def fit(cls, sequences: Iterable[Sequence[int]], num_items: int) -> "MostPopular":
        """Count item occurrences over training sequences (lists of item ids 1..num_items)."""
        counts = np.zeros(num_items + 1, dtype=np.int64)
        for seq in sequences:
            ids = np.asarray(seq, dtype=np.int64)
            if len(ids) and (ids.min() < 0 or ids.max() > num_items):
                raise ValueError(f"item id outside 0..{num_items} in a training sequence: {ids.min()}..{ids.max()}")
            np.add.at(counts, ids, 1)
        counts[0] = 0
        return cls(counts)

    def forward(self, history: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": torch.zeros((), device=self.ranking.device)}  # nothing to train

    @torch.no_grad()
    def topk(self, history: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k most popular items (B, k) and their training counts as scores (B, k); 0 / -inf past the catalog."""
        top = self.ranking[:k]
        scores = self.counts[top].float()
        if top.shape[0] < k:
            top = F.pad(top, (0, k - top.shape[0]))
            scores = F.pad(scores, (0, k - scores.shape[0]), value=float("-inf"))
        b = history.shape[0]
        return (top[None, :].expand(b, k).to(history.device), scores[None, :].expand(b, k).to(history.device))

    @torch.no_grad()
    def recommend(self, history: torch.Tensor, k: int) -> torch.Tensor:
        return self.topk(history, k)[0]
