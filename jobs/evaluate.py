"""Stage 4: evaluate an exported model (leave-one-out over the full catalog) and the most-popular baseline.

    python jobs/evaluate.py --config configs/synthetic.yaml --run <MLflow run id | run name | run dir> [split=valid]
        [model.car.slow_weight=0.5 ...]   # inference-time fields of the exported model (models/config.py)
    python jobs/evaluate.py --run <run dir> [overrides]   # no --config: the run's own saved config.yaml
"""

import os
import sys

sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

from genrec_dist.cli import fail, job_parser, load_job_config  # noqa: E402
from genrec_dist.config import ConfigError, to_yaml  # noqa: E402
from genrec_dist.storage import StorageError  # noqa: E402
from genrec_dist.tracking import TrackingError  # noqa: E402
from genrec_dist.evaluation.run import evaluate_run, run_own_config  # noqa: E402


def main() -> None:
    parser = job_parser("evaluate", __doc__.strip().splitlines()[0])
    parser.add_argument("--run", required=True,
                        help="MLflow run id of a training run, a run name or a run dir; without --config the run's "
                             "own saved config (config.yaml in its run dir) is used, the overrides on top")
    args = parser.parse_intermixed_args()
    cfg = load_job_config(args, "evaluate", quiet=args.config is None)
    run = args.run
    try:
        if args.config is None:
            try:
                cfg, run, source = run_own_config(cfg, args.run, args.overrides)
            except ConfigError as exc:
                fail(f"config error: {exc} (pass --config to evaluate with another config)", code=2)
            print(f"# resolved config (evaluate), from {source or 'the defaults (the run saved no config)'}\n"
                  f"{to_yaml(cfg)}", flush=True)
        summary = evaluate_run(cfg, run, args.overrides)
    except (StorageError, FileNotFoundError, ValueError, TrackingError) as exc:
        fail(str(exc).splitlines()[0])
    print(summary["table"], flush=True)
    print(f"metrics: {summary['metrics_path']} (MLflow run {summary['mlflow_run_id']})", flush=True)


if __name__ == "__main__":
    main()
