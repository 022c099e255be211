"""Stage 5: batch top-k recommendations of a trained run for a table of users, on Ray Data.

    python jobs/recommend.py --run <MLflow run id | run name | run dir> [k=50] [exclude_seen=true]
        [users=s3://bucket/users/] [output=...] [num_workers=4] [model.car.inference=slow] [beam_width=50]
    ray job submit --address http://<head>:8265 --working-dir . -- python jobs/recommend.py --run <abs run dir> ...
Without --config the run's own saved config is used (as jobs/evaluate.py --run), the overrides on top. Output:
Parquet shards of user, items[k], scores[k] + manifest.json at recommend.output (default <run dir>/recommendations).
"""

import _entry  # noqa: F401  (first: takes jobs/ off the import path)

from genrec_dist import cli
from genrec_dist.ray_recommend import run_recommend
from genrec_dist.tracking import make_tracker


def job() -> None:
    args = cli.job_parser("recommend", __doc__.strip().splitlines()[0], run=True).parse_intermixed_args()
    cfg, run_dir = cli.load_run_job_config(args, "recommend")
    summary = run_recommend(cfg, run_dir, args.overrides, tracking=make_tracker)
    print(f"recommendations: {summary['output']} ({summary['users']} users, {summary['users_per_s']:.0f} users/s; "
          f"MLflow run {summary['mlflow_run_id']})", flush=True)


if __name__ == "__main__":
    cli.main(job)
