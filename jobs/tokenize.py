"""Tokenize: item text -> embeddings (Ray Data) -> distributed residual k-means (Ray actors) -> semantic IDs.

    python jobs/tokenize.py --config configs/scientific.yaml                 # starts a local Ray
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/tokenize.py --config configs/beauty.yaml \\
        workdir=/shared/genrec/beauty          # a Ray job runs in a copy of --working-dir: absolute or s3:// outputs
    python jobs/tokenize.py --config configs/scientific.yaml method=import \\
        index_path=<an LC-Rec/LETTER Name.index.json[.gz]>     # bring a peer pipeline's codes (configs/beauty.yaml does)
"""
import _entry  # noqa: F401  (first: takes jobs/ off the import path)

from genrec_dist import cli
from genrec_dist.tracking import make_tracker


def job() -> None:
    cfg = cli.load_job_config(cli.job_parser("tokenize", __doc__.splitlines()[0]).parse_intermixed_args(), "tokenize")
    from tokenization.pipeline import run_tokenize

    summary = run_tokenize(cfg, log=lambda msg: print(msg, flush=True), tracking=make_tracker)
    st = summary["stats"]
    recon = f"  reconstruction rel {st['reconstruction_rel']:.4f}" if "reconstruction_rel" in st else ""
    print(f"done: {summary['num_items']} items -> {summary['path']}  codebook sizes {summary['codebook_sizes']}  "
          f"collision rate {st.get('collision_rate', 0.0):.4f}{recon}  mlflow run {summary['run_id']}", flush=True)


if __name__ == "__main__":
    cli.main(job)
