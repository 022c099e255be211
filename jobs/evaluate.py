"""Stage 4: evaluate an exported model (leave-one-out over the full catalog) and the most-popular baseline.

    python jobs/evaluate.py --config configs/synthetic.yaml --run <MLflow run id | run name | run dir> [split=valid]
        [model.car.slow_weight=0.5 ...]   # inference-time fields of the exported model (models/config.py)
    python jobs/evaluate.py --run <run dir> [overrides]   # no --config: the run's own saved config.yaml
"""

import _entry  # noqa: F401  (first: takes jobs/ off the import path)

from genrec_dist import cli
from genrec_dist.evaluation.job import evaluate_run
from genrec_dist.tracking import make_tracker


def job() -> None:
    args = cli.job_parser("evaluate", __doc__.strip().splitlines()[0], run=True).parse_intermixed_args()
    cfg, run_dir = cli.load_run_job_config(args, "evaluate")
    summary = evaluate_run(cfg, run_dir, args.overrides, tracking=make_tracker)
    print(summary["table"], flush=True)
    print(f"metrics: {summary['metrics_path']} (MLflow run {summary['mlflow_run_id']})", flush=True)


if __name__ == "__main__":
    cli.main(job)
