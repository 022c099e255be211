"""Stage 5: batch top-k recommendations of a trained run for a table of users, on Ray Data.

    python jobs/recommend.py --run <MLflow run id | run name | run dir> [k=50] [exclude_seen=true]
        [users=s3://bucket/users/] [output=...] [num_workers=4] [model.car.inference=slow] [beam_width=50]
    ray job submit --address http://<head>:8265 --working-dir . -- python jobs/recommend.py --run <abs run dir> ...
Without --config the run's own saved config is used (as jobs/evaluate.py --run), the overrides on top. Output:
Parquet shards of user, items[k], scores[k] + manifest.json at recommend.output (default <run dir>/recommendations).
"""

import os
import sys

sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

from genrec_dist import cli  # noqa: E402
from genrec_dist.config import load_config  # noqa: E402
from genrec_dist.evaluation.run import find_run_dir, run_own_config  # noqa: E402
from genrec_dist.ray_recommend import check_paths, make_recommend_tracker, run_recommend  # noqa: E402


def job() -> None:
    parser = cli.job_parser("recommend", __doc__.strip().splitlines()[0])
    parser.add_argument("--run", required=True,
                        help="MLflow run id of a training run, a run name or a run dir; without --config the run's "
                             "own saved config (config.yaml in its run dir) is used, the overrides on top")
    args = parser.parse_intermixed_args()
    cfg = load_config(args.config, args.overrides, default_section="recommend")
    if args.config is None:  # the defaults only locate the run; its saved config (absolute paths) is used
        cfg, run_dir, _ = run_own_config(cfg, args.run, args.overrides, "recommend")
    else:
        run_dir = find_run_dir(cfg, args.run)
    cli.check_ray_job_paths(cfg)
    check_paths(cfg, run_dir)
    summary = run_recommend(cfg, run_dir, args.overrides, make_recommend_tracker(cfg, run_dir))
    print(f"recommendations: {summary['output']} ({summary['users']} users, {summary['users_per_s']:.0f} users/s; "
          f"MLflow run {summary['mlflow_run_id']})", flush=True)


if __name__ == "__main__":
    cli.main(job)
