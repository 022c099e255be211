"""Stage 1: raw interactions + item text -> a sharded Parquet dataset (local or s3://).

    python jobs/prepare.py --config configs/beauty.yaml [prepare.overwrite=true] [key=value ...]
"""

import os
import sys

sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

from genrec_dist import cli  # noqa: E402
from genrec_dist.data.dataset import Dataset  # noqa: E402
from genrec_dist.data.prepare import run_prepare, summary_table  # noqa: E402
from genrec_dist.tracking import make_tracker  # noqa: E402


def job() -> None:
    cfg = cli.load_job_config(cli.job_parser("prepare", __doc__.strip().splitlines()[0]).parse_intermixed_args(),
                              "prepare")
    # The pipeline's first MLflow run, started before the work (an unreachable server ends the job before anything is
    # written): counts as metrics, the summary and manifest as artifacts, the dataset's tags once it is committed.
    tracker = make_tracker(cfg, "prepare", extra_tags={"genrec.dataset_path": cfg.dataset_dir})
    try:
        summary = run_prepare(cfg)
    except BaseException:
        tracker.close("FAILED")
        raise
    table = summary_table(summary)
    print(table, flush=True)
    dataset = Dataset.open(cfg.dataset_dir, cfg.storage)
    tracker.set_tags(dataset.tags())
    tracker.log_input(**dataset.input_spec(), context="output")  # what it made (MLflow has no dataset outputs)
    tracker.log_config(cfg)
    tracker.log({k: summary[k] for k in ("users", "items", "interactions", "density")})
    tracker.log_text(table + "\n", "summary.txt")
    tracker.close()


if __name__ == "__main__":
    cli.main(job)
