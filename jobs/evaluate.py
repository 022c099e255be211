"""Stage 4: evaluate an exported model (leave-one-out over the full catalog) and the most-popular baseline.

    python jobs/evaluate.py --config configs/synthetic.yaml --run <MLflow run id | run name | run dir> [split=valid]
        [model.car.slow_weight=0.5 ...]   # inference-time fields of the exported model (models/config.py)
    python jobs/evaluate.py --run <run dir> [overrides]   # no --config: the run's own saved config.yaml
"""

import os
import sys

sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

from genrec_dist import cli  # noqa: E402
from genrec_dist.config import to_yaml  # noqa: E402
from genrec_dist.evaluation.run import evaluate_run, run_own_config  # noqa: E402
from genrec_dist.tracking import make_tracker  # noqa: E402


def job() -> None:
    parser = cli.job_parser("evaluate", __doc__.strip().splitlines()[0])
    parser.add_argument("--run", required=True,
                        help="MLflow run id of a training run, a run name or a run dir; without --config the run's "
                             "own saved config (config.yaml in its run dir) is used, the overrides on top")
    args = parser.parse_intermixed_args()
    cfg = cli.load_job_config(args, "evaluate", quiet=args.config is None)
    run = args.run
    if args.config is None:
        cfg, run, source = run_own_config(cfg, args.run, args.overrides)
        print(f"# resolved config (evaluate), from {source or 'the defaults (the run saved no config)'}\n"
              f"{to_yaml(cfg)}", flush=True)
    summary = evaluate_run(cfg, run, args.overrides, tracking=make_tracker)
    print(summary["table"], flush=True)
    print(f"metrics: {summary['metrics_path']} (MLflow run {summary['mlflow_run_id']})", flush=True)


if __name__ == "__main__":
    cli.main(job)
