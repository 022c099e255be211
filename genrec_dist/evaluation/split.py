"""One split of a prepared dataset, scored: the batches every user of it gives, a model's metrics on it next to the
most-popular baseline fitted on every training sequence (``items[:-2]``), the validation choices of a model (CAR's
``slow_weight``), and the markdown reports. Read by the evaluate job (:mod:`genrec_dist.evaluation.job`) and by the
end of training; one process, every user of the split, the full catalog.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
import torch

from genrec_dist import reports
from genrec_dist.config import model_history
from genrec_dist.data import examples
from genrec_dist.data.dataset import Dataset
from genrec_dist.evaluation.evaluate import MostPopular, evaluate_model, evaluate_variants
from genrec_dist.models import model_name, recommend_kwargs


def _history(model: torch.nn.Module, dataset: Dataset) -> int:
    """An exported model's own history length (its saved config), checked against ``dataset``."""
    return model_history(model_name(model), int(model.cfg.max_history), dataset)


class SplitBatches:
    """Evaluation batches of ``split`` for every user of ``dataset``, each history cut to ``history`` items (the
    model's own ``max_history``), read chunk by chunk each time they are iterated (one chunk and one batch in memory,
    whatever the number of users)."""

    def __init__(self, dataset: Dataset, cfg: Any, split: str, history: int, batch_size: int | None = None):
        self.chunks = examples.plan_chunks(sorted(dataset.shard_files), cfg.train.chunk_rows, dataset.storage_cfg)
        self.source = examples.ExampleSource(self.chunks, history, split, storage_cfg=dataset.storage_cfg,
                                             seen=cfg.evaluate.filter_seen)
        self.batch_size = batch_size or cfg.evaluate.batch_size
        self.max_users = cfg.evaluate.max_users  # 0 = every user

    def __iter__(self):
        left = self.max_users or None  # users still to yield; None = no limit
        for batch in examples.stream_batches(self.source, self.batch_size):  # (history, target[, seen])
            if left is not None:
                batch = tuple(a[:left] for a in batch)
                left -= len(batch[0])
            yield tuple(torch.from_numpy(a) for a in batch)
            if left == 0:  # stop before the next chunk is read
                return


    def first(self, users: int) -> tuple[torch.Tensor, ...]:
        """The first batch of ``users`` users of the split (the reports' examples, MLflow's input example)."""
        users = min(users, self.max_users) if self.max_users else users
        return tuple(torch.from_numpy(a) for a in next(iter(examples.stream_batches(self.source, users))))


def train_sequences(chunks: list, storage_cfg: Any = None) -> Any:
    """Every user's training sequence ``items[:-2]`` (users with at least 3 items) of a split's ``chunks``
    (:attr:`SplitBatches.chunks`), read chunk by chunk."""
    for chunk in chunks:
        yield from (s[:-2] for s in examples.read_chunk(chunk, storage_cfg)["items"].to_list() if len(s) >= 3)


def choose_on_valid(model: torch.nn.Module, dataset: Dataset, cfg: Any,
                    device: torch.device) -> dict[str, dict[str, Any]]:
    """Set each of the model's ``validation_choices`` (CAR: ``slow_weight``) to its best candidate on the validation
    split by ``train.early_stop_metric`` (the first candidate on ties), in ``model.cfg``.

    Returns ``{field: {"chosen": value, "metric": name, "valid": {str(candidate): metric value}}}``; ``{}`` when the
    model has nothing to choose."""
    choices = getattr(model, "validation_choices", {})
    if not choices:
        return {}
    batches = SplitBatches(dataset, cfg, "valid", _history(model, dataset))
    metric = cfg.train.early_stop_metric
    chosen: dict[str, dict[str, Any]] = {}
    for name, (mode, candidates) in choices.items():  # every candidate in one pass (the field is a recommend kwarg)
        found = evaluate_variants(model, batches, cfg.evaluate.ks, device,
                                  {str(v): {"inference": mode, name: v} for v in candidates})
        scores = [found[str(v)][metric] for v in candidates]
        best = candidates[int(np.argmax(scores))]
        setattr(model.cfg, name, best)
        chosen[name] = {"chosen": best, "metric": metric, "valid": {str(v): s for v, s in zip(candidates, scores)}}
    return chosen


def split_batches(model: torch.nn.Module, dataset: Dataset, cfg: Any, split: str) -> SplitBatches:
    """:class:`SplitBatches` of ``split``, each history cut to the model's own history length."""
    return SplitBatches(dataset, cfg, split, _history(model, dataset))


def evaluate_split(model: torch.nn.Module, dataset: Dataset, cfg: Any, split: str | SplitBatches,
                   device: torch.device) -> dict[str, dict[str, float]]:
    """``model`` and most-popular on ``split`` (a split's name, or its :func:`split_batches`) for every user of
    ``dataset``."""
    batches = split if isinstance(split, SplitBatches) else split_batches(model, dataset, cfg, split)
    kwargs = recommend_kwargs(model, cfg.evaluate.beam_width, cfg.evaluate.score_block)
    model_m = evaluate_model(model, batches, cfg.evaluate.ks, device, **kwargs)
    configured = dict(model_m)
    for mode in getattr(model, "inference_modes", ()):  # CAR: fast and slow, logged separately as "<mode>/<metric>"
        # the configured mode is the pass above: not ranked again
        mode_m = configured if mode == model.cfg.inference else evaluate_model(
            model, batches, cfg.evaluate.ks, device, **kwargs, inference=mode)
        model_m.update({f"{mode}/{k}": v for k, v in mode_m.items()})
    pop = MostPopular.fit(train_sequences(batches.chunks, dataset.storage_cfg), dataset.num_items)
    pop_m = evaluate_model(pop, batches, cfg.evaluate.ks, torch.device("cpu"))
    return {"model": model_m, "most_popular": pop_m}


REPORT_USERS = 5  # users shown in the example recommendations


def log_reports(tracker: Any, model: torch.nn.Module, dataset: Dataset, cfg: Any, results: dict, name: str,
                codes: np.ndarray | None, first: tuple[torch.Tensor, ...], device: torch.device, title: str) -> None:
    """Log the metrics table and example recommendations for ``first`` (:meth:`SplitBatches.first`: the first
    users' histories and targets) as markdown; ``codes``: the model's semantic IDs, shown beside each item."""
    ks = cfg.evaluate.ks
    history, target = first[:2]
    with torch.no_grad():
        kwargs = recommend_kwargs(model, cfg.evaluate.beam_width, cfg.evaluate.score_block)
        ranked = model.recommend(history.to(device), max(ks), **kwargs).cpu().numpy()  # (N, k)
    shown = np.unique(np.concatenate([history.numpy().ravel(), target.numpy(), ranked.ravel()]))
    items = dataset.items(["item_id", "title"]).filter(pl.col("item_id").is_in(shown.tolist()))  # not every title
    titles = dict(zip(items["item_id"].to_list(), items["title"].to_list()))
    tracker.log_text(reports.example_recommendations(history.numpy(), target.numpy(), ranked, titles, codes,
                                                     title=f"{title}: example recommendations"),
                     "reports/examples.md")
    tracker.log_text(reports.metrics_table({name: results["model"], "most-popular": results["most_popular"]}, ks,
                                           title), "reports/metrics.md")
