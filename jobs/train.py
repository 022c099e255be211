"""Stage 3: train a recommender with DeepSpeed ZeRO; evaluates the best model on the test split at the end.

    python jobs/train.py --config configs/synthetic.yaml [model=sasrec] [zero_stage=2] [key=value ...]
    deepspeed --num_gpus 2 jobs/train.py --config ...                 # one node, 2 ranks (CPU ranks without GPUs)
    deepspeed --hostfile cluster/hostfile jobs/train.py --config ...   # several nodes (cluster/README.md)
    python jobs/train.py --config ... launcher=ray num_workers=4      # Ray Train workers (ray job submit -- ...)
    python jobs/train.py --config ... --resume [RUN]                 # continue a killed run (default: the latest)
"""

import _entry  # noqa: F401  (first: takes jobs/ off the import path)

from genrec_dist import cli
from genrec_dist.tracking import make_tracker
from genrec_dist.training import run_training
from genrec_dist.training.dist import is_rank_zero


def job() -> None:
    parser = cli.job_parser("train", __doc__.strip().splitlines()[0])
    parser.add_argument("--resume", nargs="?", const="latest", default=None,
                        help="continue a run from its newest complete checkpoint (a run name/dir; default: latest)")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher; ignored "
                        "(the rank comes from the environment)")
    args = parser.parse_intermixed_args()
    if args.resume is not None:
        args.overrides.append(f"train.resume={args.resume}")
    cfg = cli.load_job_config(args, "train", quiet=not is_rank_zero())
    # each rank's tracker (MLflow on rank 0, else a null one) is made by make_tracker once the run is known
    summary = run_training(cfg, tracking=make_tracker)
    if summary:
        print(f"run {summary['run_name']}: {summary['run_dir']} (MLflow run {summary['mlflow_run_id']})", flush=True)


if __name__ == "__main__":
    cli.main(job)
