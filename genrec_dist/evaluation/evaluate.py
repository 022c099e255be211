"""The evaluation loop: rank the full catalog for each user with ``model.recommend`` and score the targets.

Callable without a trainer: ``evaluate_model(model, batches, ks=(5, 10, 20))`` with any iterable of
``(history (B, T), target (B,))`` tensors.
"""

from __future__ import annotations

import itertools
import time
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from genrec_dist.evaluation.metrics import recall_ndcg


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


def drop_seen(ranked: torch.Tensor, seen: torch.Tensor, k: int, block: int = 64) -> torch.Tensor:
    """The first ``k`` items of each row of ``ranked`` (B, F) that are not in the row's ``seen`` (B, S) items (0 =
    padding), in rank order; 0 where fewer than k remain. ``seen`` is compared ``block`` columns at a time, so memory
    is (B, F, block) whatever the history length."""
    hit = torch.zeros_like(ranked, dtype=torch.bool)
    for lo in range(0, seen.shape[1], block):
        part = seen[:, lo:lo + block]  # (B, s)
        hit |= ((ranked[:, :, None] == part[:, None, :]) & (part[:, None, :] != 0)).any(-1)
    order = torch.sort(hit.to(torch.int8), dim=1, stable=True).indices  # unseen first, rank order kept
    out = torch.gather(ranked.masked_fill(hit, 0), 1, order)[:, :k]
    if out.shape[1] < k:
        out = torch.cat([out, out.new_zeros(out.shape[0], k - out.shape[1])], dim=1)
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
