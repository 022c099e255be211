"""Stage 5: online top-k recommendations over HTTP on Ray Serve (replicas, dynamic batching), the pyfunc's JSON.

    python jobs/serve.py --run <run dir | run name | MLflow run id | models:/name/version> [serve.num_replicas=2]
        [serve.port=8000] [serve.max_batch_size=64] [serve.batch_wait_timeout_s=0.002] [model.car.inference=slow]
    ray job submit --address http://<head>:8265 --working-dir . -- python jobs/serve.py --run <abs run dir>
        serve.host=0.0.0.0 serve.num_replicas=4 [serve.blocking=false]   # the app stays up after the job ends
Without --config the run's own saved config is used (as jobs/evaluate.py --run), the overrides on top; a models:/
URI is looked up in tracking.uri (or MLFLOW_TRACKING_URI). Ctrl-C or SIGTERM stops it (a local Ray goes with
the job; an application on a cluster is deleted). serve.haproxy=true: Ray Serve's HAProxy ingress (docs/serving.md).
"""

import _entry  # noqa: F401  (first: takes jobs/ off the import path)

import signal
import sys
import time

from genrec_dist import cli
from genrec_dist.config import load_config
from genrec_dist.ray_serve import resolve, start


def job() -> None:
    args = cli.job_parser("serve", __doc__.strip().splitlines()[0], run=(
        "a run dir, run name or MLflow run id of a training run, or an MLflow model URI (models:/<name>/<version>); "
        "without --config a run's own saved config is used")).parse_intermixed_args()
    cfg = load_config(args.config, args.overrides, default_section="serve")
    cfg, source = resolve(cfg, args.run, args.overrides, own_config=args.config is None)
    url, local = start(cfg, source, args.overrides)
    print(f"serving: POST {url}  (GET {url[:-len('/invocations')]}/ping, /ready)", flush=True)
    if not cfg.serve.blocking:
        return
    for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C; ray job stop, kill
        signal.signal(sig, lambda *_: sys.exit(0))
    try:
        while True:  # short sleeps: a signal that Ray's threads took is handled within a second
            time.sleep(1)
    except SystemExit:
        if not local:  # (a local Ray, the app with it, ends with this process)
            from ray import serve

            serve.delete(cfg.serve.app_name, _blocking=False)  # the controller removes it; nothing to wait for
        print(f"serve: application {cfg.serve.app_name!r} stopped", flush=True)


if __name__ == "__main__":
    cli.main(job)
