"""``python -m genrec_dist.tracking replay <spool> [--uri URI]``: deliver what a run kept while the tracking
server was unreachable."""

from __future__ import annotations

import argparse
import sys

from genrec_dist.tracking.base import TrackingError
from genrec_dist.tracking.outbox import replay


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m genrec_dist.tracking",
                                     description="Tracking items kept while the MLflow server was unreachable.")
    sub = parser.add_subparsers(dest="command", required=True)
    rp = sub.add_parser("replay", help="log a spool's undelivered items to its MLflow run, then remove the spool")
    rp.add_argument("spool", nargs="+", help="tracking_spool-<run id>.jsonl (in the run dir)")
    rp.add_argument("--uri", default=None, help="the tracking server (default: the one the spool was written for)")
    args = parser.parse_args(argv)
    for path in args.spool:
        try:
            n, run_id, uri = replay(path, args.uri)
        except (TrackingError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(1)
        print(f"{path}: {n} items delivered to run {run_id} at {uri}; spool removed", flush=True)


if __name__ == "__main__":
    main()
