"""The evaluate job's loop (``jobs/evaluate.py``): a trained run's exported model on one split, its metrics written
as JSON next to the run (``eval-<split>[-seen-filtered].json``) and logged to a new MLflow run beside the training
run's.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Sequence

import torch

from genrec_dist import storage
from genrec_dist.reports import format_results
from genrec_dist.config import to_dict
from genrec_dist.evaluation.split import REPORT_USERS, evaluate_split, log_reports, split_batches
from genrec_dist.runs.export import inference_overrides, open_export, read_meta
from genrec_dist.runs.rundir import open_run_dataset, read_run


def evaluate_run(cfg: Any, run_dir: str, overrides: Sequence[str] = (), *, tracking: Callable) -> dict[str, Any]:
    """Evaluate the run in ``run_dir`` (found by :func:`genrec_dist.runs.find.resolve_run`) on ``cfg.evaluate.split``; ``overrides`` (the command line's) may change the exported
    model's inference-time fields (``model.car.slow_weight=0.1``), nothing else of it. ``tracking`` (the job's, e.g.
    ``genrec_dist.tracking.make_tracker``) makes the evaluation's tracker once the results are in."""
    info = read_run(run_dir, cfg.storage) or {}
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu")
    meta = read_meta(storage.join(run_dir, "model"), cfg.storage)
    inference = inference_overrides(cfg, overrides, meta["model"], run_dir, meta["model_config"][meta["model"]])
    export = open_export(run_dir, cfg.storage, inference)
    model, meta = export.model.to(device), export.meta
    dataset = open_run_dataset(cfg, info)
    split = cfg.evaluate.split
    batches = split_batches(model, dataset, cfg, split)
    results = evaluate_split(model, dataset, cfg, batches, device)
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
    log_reports(tracker, model, dataset, cfg, results, meta["model"], export.sids and export.sids.codes,
                batches.first(REPORT_USERS), device, f"{split} split, {meta['model']} of step {meta.get('step')}")
    tracker.close()
    table = format_results({meta["model"]: results["model"], "most-popular": results["most_popular"]},
                           cfg.evaluate.ks)
    changed = "".join(f", {k}={v}" for k, v in inference.items())
    return {**out, "metrics_path": metrics_path, "mlflow_run_id": tracker.run_id,
            "table": f"# {split} split, {meta['model']} of step {meta.get('step')}{changed}\n{table}"}
