"""Tokenization speed and quality, side by side in one run, on one machine.

    python -m benchmarks.tokenize [--embed-items 1000] [--mixture-n 100000] [--dim 384] [--k 256] [--iters 10]
                                  [--seed 0] [--out benchmarks/results/tokenize.json] [--embeddings DIR]

1. Embedding items/s with 1 and 2 Ray Data workers (MiniLM, offline) on the first ``--embed-items`` Scientific
   item texts (the same texts for both rows), then all Scientific texts with 2 workers for the k-means rows.
2. One level of k-means, exactly ``--iters`` Lloyd steps (tol 0), same K and seed, on the Scientific embeddings and
   on a random Gaussian mixture (``--mixture-n`` x ``--dim``, 2K components): ours in-process (numpy reference),
   ours on Ray with 1 and 2 actors, faiss ``Kmeans`` and scikit-learn ``KMeans`` (lloyd, n_init 1). Each row: time,
   inertia (sum of squared distances to the nearest centroid, computed the same way for every method), and both as
   a ratio to faiss. Seeding differs by library (ours: k-means++ on a sample; faiss: random rows; sklearn:
   k-means++), so inertia ratios compare whole procedures, not identical trajectories.

Skips the Scientific rows when ``../shared/data/scientific`` is absent. ``--embeddings DIR`` (the ``embeddings/``
folder of an earlier tokenize run on Scientific) runs the k-means part alone: no embedding, and the embedding rows
of the existing ``--out`` JSON are kept.
"""

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np

from benchmarks._jobs import write_result

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCIENTIFIC = os.path.join(os.path.dirname(REPO), "shared", "data", "scientific")


def _portable(args: dict) -> dict:
    """Arguments as recorded in the JSON: paths relative to the repo, so results carry no machine's layout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return {k: os.path.relpath(v, root) if isinstance(v, str) and os.path.isabs(v) else v for k, v in args.items()}


def inertia(x: np.ndarray, c: np.ndarray) -> float:
    x, c = np.asarray(x, np.float64), np.asarray(c, np.float64)
    total = 0.0
    c_sq = (c * c).sum(1)
    for s in range(0, len(x), 32768):
        xb = x[s:s + 32768]
        d = (xb * xb).sum(1)[:, None] - 2.0 * xb @ c.T + c_sq[None]
        total += float(np.maximum(d.min(1), 0).sum())
    return total


def scientific_items():
    from genrec_dist.config import load_config
    from genrec_dist.data.dataset import Dataset
    from genrec_dist.data.prepare import run_prepare

    root = tempfile.mkdtemp(prefix="bench-tokenize-")
    cfg = load_config(os.path.join(REPO, "configs", "scientific.yaml"),
                      [f"workdir={root}", f"prepare.input_dir={SCIENTIFIC}"])
    run_prepare(cfg)
    return Dataset.open(cfg.dataset_dir).items(["item_id", "text"])


def embed_rows(items, n):
    from tokenization.ray_embed import embed_items

    rows = []
    sub = items.head(n)
    for workers in (1, 2):
        _, _, info = embed_items(sub, num_workers=workers, batch_size=64)
        rows.append({"workers": workers, "items": sub.height, "seconds": info["seconds"],
                     "items_per_s": info["items_per_s"]})
        print(f"  embed {sub.height} items, {workers} worker(s): {info['items_per_s']:.1f} items/s", flush=True)
    return rows


def kmeans_rows(name, x, k, iters, seed):
    import faiss
    from sklearn.cluster import KMeans

    from tokenization.kmeans import KMeansParams, kmeans_local
    from tokenization.ray_kmeans import ray_residual_kmeans

    x32 = np.ascontiguousarray(x, dtype=np.float32)
    params = KMeansParams(k=k, max_iters=iters, tol=0.0, seed=seed)
    runs = []

    def timed(method, fn):
        t = time.perf_counter()
        centroids = fn()
        sec = time.perf_counter() - t
        runs.append({"data": name, "n": len(x), "dim": x.shape[1], "k": k, "iters": iters, "method": method,
                     "seconds": sec, "inertia": inertia(x32, centroids)})
        print(f"  {name}: {method:<18} {sec:8.2f} s  inertia {runs[-1]['inertia']:.6g}", flush=True)

    def faiss_run():
        km = faiss.Kmeans(x.shape[1], k, niter=iters, seed=seed, max_points_per_centroid=1 << 30, verbose=False)
        km.train(x32)
        return km.centroids

    def sklearn_run():
        return KMeans(n_clusters=k, max_iter=iters, n_init=1, tol=0.0, random_state=seed,
                      algorithm="lloyd").fit(x32).cluster_centers_

    timed("faiss", faiss_run)
    timed("sklearn", sklearn_run)
    timed("ours numpy", lambda: kmeans_local(x32, 1, params).codebooks[0])
    for w in (1, 2):
        timed(f"ours ray x{w}", lambda w=w: ray_residual_kmeans(x32, 1, params, num_workers=w).codebooks[0])
    base = next(r for r in runs if r["method"] == "faiss")
    for r in runs:
        r["time_vs_faiss"] = r["seconds"] / base["seconds"]
        r["inertia_vs_faiss"] = r["inertia"] / base["inertia"]
    return runs


def mixture(n, d, k, seed):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(2 * k, d)).astype(np.float32)
    scale = rng.uniform(0.2, 0.6, size=2 * k).astype(np.float32)
    comp = rng.integers(0, 2 * k, size=n)
    return centers[comp] + rng.normal(size=(n, d)).astype(np.float32) * scale[comp, None]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--embed-items", type=int, default=1000)
    ap.add_argument("--mixture-n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--k", type=int, default=256)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-scientific", action="store_true", help="only the random-mixture rows")
    ap.add_argument("--embeddings", default="", help="Scientific embeddings/ folder of an earlier tokenize run: "
                    "k-means rows only, the embedding rows of --out are kept")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "tokenize.json"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray

    from genrec_dist.ray_runtime import ensure_ray

    ensure_ray()
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "ray_cpus": ray.cluster_resources().get("CPU"), "gpus": ray.cluster_resources().get("GPU", 0)},
              "args": _portable(vars(args)), "embedding": [], "kmeans": []}
    if args.embeddings and not args.no_scientific:
        from tokenization.embedding_store import read_embeddings

        if os.path.exists(args.out):
            with open(args.out) as fh:
                result["embedding"] = json.load(fh).get("embedding", [])
        _, emb = read_embeddings(args.embeddings)
        print(f"k-means on the Scientific embeddings of {args.embeddings}")
        result["kmeans"] += kmeans_rows("scientific", emb, args.k, args.iters, args.seed)
    elif os.path.isdir(SCIENTIFIC) and not args.no_scientific:
        from tokenization.ray_embed import embed_items

        items = scientific_items()
        print(f"embedding (Scientific, first {min(args.embed_items, items.height)} of {items.height} texts)")
        result["embedding"] = embed_rows(items, args.embed_items)
        _, emb, info = embed_items(items, num_workers=2, batch_size=64)
        result["embedding"].append({"workers": 2, "items": items.height, "seconds": info["seconds"],
                                    "items_per_s": info["items_per_s"]})
        print(f"  embed all {items.height} items, 2 workers: {info['items_per_s']:.1f} items/s")
        print("k-means on the Scientific embeddings")
        result["kmeans"] += kmeans_rows("scientific", emb, args.k, args.iters, args.seed)
    print(f"k-means on a {args.mixture_n} x {args.dim} Gaussian mixture")
    result["kmeans"] += kmeans_rows("mixture", mixture(args.mixture_n, args.dim, args.k, args.seed), args.k,
                                    args.iters, args.seed)

    print("\n| embedding | workers | items | items/s |\n|---|---|---|---|")
    for r in result["embedding"]:
        print(f"| MiniLM CPU | {r['workers']} | {r['items']} | {r['items_per_s']:.1f} |")
    print("\n| data | N x D | K | iters | method | seconds | time / faiss | inertia / faiss |\n|---|---|---|---|---|---|---|---|")
    for r in result["kmeans"]:
        print(f"| {r['data']} | {r['n']} x {r['dim']} | {r['k']} | {r['iters']} | {r['method']} | {r['seconds']:.2f} "
              f"| {r['time_vs_faiss']:.2f} | {r['inertia_vs_faiss']:.4f} |")
    write_result(args.out, result)


if __name__ == "__main__":
    main()
