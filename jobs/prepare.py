"""Stage 1: raw interactions + item text -> a sharded Parquet dataset (local or s3://).

    python jobs/prepare.py --config configs/beauty.yaml [prepare.overwrite=true] [key=value ...]
"""

import _entry  # noqa: F401  (first: takes jobs/ off the import path)

from genrec_dist import cli
from genrec_dist.data.prepare import run_prepare, summary_table
from genrec_dist.tracking import make_tracker


def job() -> None:
    cfg = cli.load_job_config(cli.job_parser("prepare", __doc__.strip().splitlines()[0]).parse_intermixed_args(),
                              "prepare")
    summary = run_prepare(cfg, tracking=make_tracker)
    print(summary_table(summary), flush=True)
    print(f"dataset: {cfg.dataset_dir} (MLflow run {summary['mlflow_run_id']})", flush=True)


if __name__ == "__main__":
    cli.main(job)
