"""Evaluate a training run's exported model on a split (``jobs/evaluate.py``; also the end of training).

One process, every user of the split, the full catalog: the model's metrics next to the most-popular baseline
fitted on every training sequence (``items[:-2]``), written as JSON next to the run and logged to MLflow.
"""

from __future__ import annotations

import inspect
import json
from typing import Any, Callable, Sequence

import numpy as np
import polars as pl
import torch

from genrec_dist import reports, storage
from genrec_dist.config import ConfigError, config_from_dict, section_from_dict, to_dict
from genrec_dist.config import model_history as check_history  # (the name model_history is this module's)
from genrec_dist.data import examples as D
from genrec_dist.data.dataset import Dataset
from genrec_dist.evaluation.evaluate import evaluate_model, evaluate_variants, format_results
from genrec_dist.evaluation.popular import MostPopular
from genrec_dist.models import ModelConfig, build_model, inference_fields
from genrec_dist.tracking import default_uri, run_tags
from genrec_dist.training import runs
from genrec_dist.training.export import model_semantic_ids, read_meta, read_model


def recommend_kwargs(model: torch.nn.Module, beam_width: int, score_block: int | None = None) -> dict[str, Any]:
    """``beam_width`` for models whose ``recommend`` takes it (beam search) when the evaluation sets one (> 0),
    ``block`` for models that rank the catalog block-wise when ``score_block`` is set; otherwise nothing, so the
    model uses its own configured width and the default block."""
    params = inspect.signature(model.recommend).parameters
    out: dict[str, Any] = {"beam_width": beam_width} if beam_width > 0 and "beam_width" in params else {}
    if "block" in params and score_block is not None:
        out["block"] = score_block if score_block > 0 else max(1, getattr(model, "num_items", 1))
    return out


def load_exported(run_dir: str, storage_cfg: Any = None,
                  inference: dict[str, Any] | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The exported model of a run, rebuilt from its own saved model config (not today's YAML); ``inference``
    replaces inference-time fields of that config (:func:`inference_overrides`)."""
    state, meta = read_model(storage.join(run_dir, "model"), storage_cfg)
    sids = None
    sids_dir = model_semantic_ids(storage.join(run_dir, "model"), meta, storage_cfg)
    if sids_dir:
        from genrec_dist.data.semantic_ids import read_semantic_ids

        sids = read_semantic_ids(sids_dir, storage_cfg)
    model_cfg = section_from_dict(ModelConfig, meta["model_config"], f"{run_dir}/model/model.json", "model")
    for key, value in (inference or {}).items():
        setattr(getattr(model_cfg, meta["model"]), key, value)
    model = build_model(meta["model"], model_cfg, int(meta["num_items"]), sids)
    model.load_state_dict(state)
    return model.eval(), meta


def inference_overrides(cfg: Any, overrides: Sequence[str], model: str, run_dir: str,
                        exported: dict[str, Any]) -> dict[str, Any]:
    """The command line's ``model.<model>.<field>=value`` overrides as ``{field: parsed value}``. Inference-time
    fields (``INFERENCE`` in the model config's field metadata) may change for a trained model; another field may
    be given only with the value the model was trained with (so the same overrides can go to every job, as
    scripts/demo.sh does), else it is an error naming it. Other models' sections do not concern this run."""
    allowed = inference_fields(model)
    out: dict[str, Any] = {}
    for item in overrides:
        parts = item.split("=", 1)[0].strip().split(".")
        if len(parts) != 3 or parts[0] != "model" or parts[1] != model:
            continue
        value = getattr(getattr(cfg.model, model), parts[2])
        if parts[2] in allowed:
            out[parts[2]] = value
        elif exported.get(parts[2]) != value:
            raise ConfigError(f"model.{model}.{parts[2]}={value}: {run_dir} was trained with {exported.get(parts[2])} "
                             f"and its weights fix it; evaluate can change only "
                             f"{', '.join(f'model.{model}.{f}' for f in allowed) or 'nothing of it'}")
    return out


def model_history(cfg: Any, model: str, dataset: Dataset) -> int:
    """The history length model ``model`` is configured for (``model.<model>.max_history``), checked against what
    ``dataset`` keeps (a config error naming both when the model asks for more)."""
    return check_history(f"model.{model}.max_history", int(getattr(cfg.model, model).max_history), dataset)


def _history(model: torch.nn.Module, dataset: Dataset) -> int:
    """An exported model's own history length (its saved config), checked against ``dataset``."""
    return check_history(f"model.{type(model).__name__.lower()}.max_history", int(model.cfg.max_history), dataset)


class SplitBatches:
    """Evaluation batches of ``split`` for every user of ``dataset``, each history cut to ``history`` items (the
    model's own ``max_history``), read chunk by chunk each time they are iterated (one chunk and one batch in memory,
    whatever the number of users)."""

    def __init__(self, dataset: Dataset, cfg: Any, split: str, history: int, batch_size: int | None = None):
        chunks = D.plan_chunks(sorted(dataset.shard_files), cfg.train.chunk_rows, dataset.storage_cfg)
        self.source = D.ExampleSource(chunks, history, split, storage_cfg=dataset.storage_cfg,
                                      seen=cfg.evaluate.filter_seen)
        self.batch_size = batch_size or cfg.evaluate.batch_size
        self.max_users = cfg.evaluate.max_users  # 0 = every user

    def __iter__(self):
        left = self.max_users or None  # users still to yield; None = no limit
        for batch in D.stream_batches(self.source, self.batch_size):  # (history, target[, seen])
            if left is not None:
                batch = tuple(a[:left] for a in batch)
                left -= len(batch[0])
            yield tuple(torch.from_numpy(a) for a in batch)
            if left == 0:  # stop before the next chunk is read
                return


def train_sequences(dataset: Dataset, chunk_rows: int) -> Any:
    """Every user's training sequence ``items[:-2]`` (users with at least 3 items), read chunk by chunk."""
    for chunk in D.plan_chunks(sorted(dataset.shard_files), chunk_rows, dataset.storage_cfg):
        yield from (s[:-2] for s in D.read_chunk(chunk, dataset.storage_cfg)["items"].to_list() if len(s) >= 3)


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


def evaluate_split(model: torch.nn.Module, dataset: Dataset, cfg: Any, split: str,
                   device: torch.device) -> dict[str, dict[str, float]]:
    """``model`` and most-popular on ``split`` for every user of ``dataset``."""
    batches = SplitBatches(dataset, cfg, split, _history(model, dataset))
    kwargs = recommend_kwargs(model, cfg.evaluate.beam_width, cfg.evaluate.score_block)
    model_m = evaluate_model(model, batches, cfg.evaluate.ks, device, **kwargs)
    configured = dict(model_m)
    for mode in getattr(model, "inference_modes", ()):  # CAR: fast and slow, logged separately as "<mode>/<metric>"
        # the configured mode is the pass above: not ranked again
        mode_m = configured if mode == model.cfg.inference else evaluate_model(
            model, batches, cfg.evaluate.ks, device, **kwargs, inference=mode)
        model_m.update({f"{mode}/{k}": v for k, v in mode_m.items()})
    pop = MostPopular.fit(train_sequences(dataset, cfg.train.chunk_rows), dataset.num_items)
    pop_m = evaluate_model(pop, batches, cfg.evaluate.ks, torch.device("cpu"))
    return {"model": model_m, "most_popular": pop_m}


def log_reports(tracker: Any, model: torch.nn.Module, dataset: Dataset, cfg: Any, results: dict, name: str,
                sids_dir: str | None, device: torch.device, title: str, users: int = 5) -> None:
    """Log the metrics table and example recommendations for the first ``users`` users of the split (markdown)."""
    split, ks = cfg.evaluate.split, cfg.evaluate.ks
    tracker.log_text(reports.metrics_table({name: results["model"], "most-popular": results["most_popular"]}, ks,
                                           title), "reports/metrics.md")
    history, target = next(iter(SplitBatches(dataset, cfg, split, _history(model, dataset), users)))[:2]  # first
    with torch.no_grad():
        kwargs = recommend_kwargs(model, cfg.evaluate.beam_width, cfg.evaluate.score_block)
        ranked = model.recommend(history.to(device), max(ks), **kwargs).cpu().numpy()  # (N, k)
    shown = np.unique(np.concatenate([history.numpy().ravel(), target.numpy(), ranked.ravel()]))
    items = dataset.items(["item_id", "title"]).filter(pl.col("item_id").is_in(shown.tolist()))  # not every title
    titles = dict(zip(items["item_id"].to_list(), items["title"].to_list()))
    codes = None
    if sids_dir:
        from genrec_dist.data.semantic_ids import read_semantic_ids

        codes = read_semantic_ids(sids_dir, cfg.storage).codes
    tracker.log_text(reports.example_recommendations(history.numpy(), target.numpy(), ranked, titles, codes,
                                                     title=f"{title}: example recommendations"),
                     "reports/examples.md")


def find_run_dir(cfg: Any, run: str) -> str:
    """A run dir from a run dir path, a run name under the runs dir, or the MLflow run id of a training run."""
    for candidate in (run, runs.run_dir(cfg, run)):
        if runs.read_run(candidate, cfg.storage) is not None:
            return candidate
    try:
        tags = run_tags(cfg, run)
    except KeyError:
        raise runs.RunNotFoundError(f"--run {run}: not a run dir, not a run under {cfg.runs_dir}, not an MLflow run id "
                                f"in {default_uri(cfg)} (a name or id is looked up with the config's workdir and "
                                "tracking.uri: pass the run's --config, or workdir=...)") from None
    if "genrec.run_dir" not in tags:
        raise runs.RunNotFoundError(f"--run {run}: MLflow run has no 'genrec.run_dir' tag (not a training run)")
    return tags["genrec.run_dir"]


def run_own_config(cfg: Any, run: str, overrides: Sequence[str] = (),
                   section: str = "evaluate") -> tuple[Any, str, str | None]:
    """``jobs/evaluate.py --run`` without ``--config``: ``(config, run dir, source)`` where the config is the one the
    run saved when it started (``config.yaml``) with the command's ``overrides`` on top, so the evaluation logs to the
    training run's MLflow store and uses its ``evaluate.*`` settings; ``cfg`` (defaults + overrides, which located
    the run) and source ``None`` for a run from before runs saved their config. ``section``: the job whose bare
    override keys these are (``jobs/recommend.py``: ``k=50`` is ``recommend.k``)."""
    run_dir = find_run_dir(cfg, run)
    source = storage.join(run_dir, runs.CONFIG_FILE)
    try:
        saved = runs.read_run_config(run_dir, cfg.storage)
        if saved is None:
            return cfg, run_dir, None
        return config_from_dict(saved, source, list(overrides), section), run_dir, source
    except ConfigError as exc:
        raise ConfigError(f"{exc} (pass --config to evaluate with another config)") from None


def evaluate_run(cfg: Any, run: str, overrides: Sequence[str] = (), *, tracking: Callable) -> dict[str, Any]:
    """Evaluate run ``run`` on ``cfg.evaluate.split``; ``overrides`` (the command line's) may change the exported
    model's inference-time fields (``model.car.slow_weight=0.1``), nothing else of it. ``tracking`` (the job's, e.g.
    ``genrec_dist.tracking.make_tracker``) makes the evaluation's tracker once the results are in."""
    run_dir = find_run_dir(cfg, run)
    info = runs.read_run(run_dir, cfg.storage) or {}
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu")
    meta = read_meta(storage.join(run_dir, "model"), cfg.storage)
    inference = inference_overrides(cfg, overrides, meta["model"], run_dir, meta["model_config"][meta["model"]])
    model, meta = load_exported(run_dir, cfg.storage, inference)
    model.to(device)
    dataset = Dataset.open(info.get("dataset") or cfg.dataset_dir, cfg.storage)
    split = cfg.evaluate.split
    results = evaluate_split(model, dataset, cfg, split, device)
    out = {**results, "split": split, "run_dir": run_dir, "model_step": meta.get("step"), "model_name": meta["model"],
           "inference_overrides": inference, "config": to_dict(cfg)}
    metrics_path = storage.join(run_dir, f"eval-{split}{'-seen-filtered' if cfg.evaluate.filter_seen else ''}.json")
    storage.write_bytes(metrics_path, (json.dumps(out, indent=2, sort_keys=True) + "\n").encode(), cfg.storage)
    tracker = tracking(cfg, "evaluate", 0, run_name=f"{info.get('run_name', meta['model'])}-evaluate",
                           extra_tags={**dataset.tags(), "genrec.train_run_id": str(info.get("mlflow_run_id")),
                                       "genrec.run_dir": run_dir, "genrec.model": meta["model"]},
                           spool_dir=run_dir)
    tracker.log_config(cfg)
    tracker.log_input(**dataset.input_spec(), context="evaluation")
    tracker.log({f"{split}/{k}": v for k, v in results["model"].items()}
                | {f"{split}_most_popular/{k}": v for k, v in results["most_popular"].items()})
    tracker.log_text(json.dumps(out, indent=2, sort_keys=True), f"eval-{split}.json")
    log_reports(tracker, model, dataset, cfg, results, meta["model"],
                model_semantic_ids(storage.join(run_dir, "model"), meta, cfg.storage), device,
                f"{split} split, {meta['model']} of step {meta.get('step')}")
    tracker.close()
    table = format_results({meta["model"]: results["model"], "most-popular": results["most_popular"]},
                           cfg.evaluate.ks)
    changed = "".join(f", {k}={v}" for k, v in inference.items())
    return {**out, "metrics_path": metrics_path, "mlflow_run_id": tracker.run_id,
            "table": f"# {split} split, {meta['model']} of step {meta.get('step')}{changed}\n{table}"}
