"""Time ``run_prepare`` and measure its peak memory on real and synthetic data; print a table, write JSON.

    python -m benchmarks.prepare [--cases beauty,scientific,amazon-raw,synthetic-10x]
                                 [--out benchmarks/results/prepare.json]

Each case runs in a fresh subprocess so its peak RSS (``ru_maxrss``) is its own; ``rss_base`` is the RSS after
imports, before prepare. Cases:

* ``beauty``, ``scientific``: the LC-Rec copies in ``../shared/data`` (skipped when absent).
* ``amazon-raw``: Beauty's interactions rewritten in the Amazon 2014 raw layout (JSON-lines reviews and a
  dict-literal meta file with one line per item), to time those parsers at the papers' size.
* ``synthetic-10x``: the synthetic generator at 10x Beauty (220k users, 120k items, ~2M interactions).
"""

import argparse
import gzip
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

from benchmarks._jobs import write_result

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared", "data")
CASES = ["beauty", "scientific", "amazon-raw", "synthetic-10x"]


def overrides(case: str, work: str) -> tuple[str, list[str]]:
    if case in ("beauty", "scientific"):
        return f"{case}.yaml", [f"prepare.input_dir={os.path.join(SHARED, case)}"]
    if case == "amazon-raw":
        raw = os.path.join(work, "raw")
        write_amazon_raw(os.path.join(SHARED, "beauty", "Beauty.inter.json.gz"), raw)
        return "beauty.yaml", ["prepare.source=amazon2014", f"prepare.input_dir={raw}", "prepare.name=Beauty"]
    if case == "synthetic-10x":
        return "synthetic.yaml", ["prepare.synthetic.num_users=220000", "prepare.synthetic.num_items=120000",
                                  "prepare.synthetic.num_categories=24", "prepare.num_shards=8"]
    raise SystemExit(f"unknown case {case!r} (known: {', '.join(CASES)})")


def write_amazon_raw(inter_path: str, folder: str) -> None:
    """Beauty's sequences as reviews_Beauty_5.json.gz (a day apart) + meta_Beauty.json.gz (Python literals)."""
    os.makedirs(folder, exist_ok=True)
    with gzip.open(inter_path, "rt") as fh:
        inter = json.load(fh)
    items = set()
    with gzip.open(os.path.join(folder, "reviews_Beauty_5.json.gz"), "wt") as fh:
        for user, seq in inter.items():
            for k, item in enumerate(seq):
                items.add(item)
                fh.write(json.dumps({"reviewerID": f"A{user}", "asin": f"B{item:09d}", "reviewerName": "x",
                                     "helpful": [0, 0], "reviewText": "Nice product, would buy again. " * 8,
                                     "overall": 5.0, "summary": "ok", "unixReviewTime": 1_300_000_000 + 86_400 * k,
                                     "reviewTime": "03 13, 2011"}) + "\n")
    with gzip.open(os.path.join(folder, "meta_Beauty.json.gz"), "wt") as fh:
        for item in sorted(items):
            fh.write(repr({"asin": f"B{item:09d}", "title": f"Product {item} cream", "price": 9.99,
                           "related": {"also_bought": [f"B{(item + j) % 12101:09d}" for j in range(20)]},
                           "salesRank": {"Beauty": item}, "brand": "Acme",
                           "categories": [["Beauty", "Skin Care", "Face"]],
                           "description": "A gentle face cream for daily use. " * 6}) + "\n")


def child(case: str, work: str) -> None:
    """Run one case in this process and print its result as one JSON line."""
    from genrec_dist.config import load_config
    from genrec_dist.data.prepare import run_prepare

    config, extra = overrides(case, work)
    cfg = load_config(os.path.join(REPO, "configs", config), [f"workdir={work}", *extra])
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    s = run_prepare(cfg)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"case": case, "users": s["users"], "items": s["items"], "interactions": s["interactions"],
                      "seconds": seconds, "read_s": s["seconds"]["read"], "clean_s": s["seconds"]["clean"],
                      "write_s": s["seconds"]["write"], "rss_base_mib": base / 1024, "rss_peak_mib": peak / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "prepare.json"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.work)
    results = []
    for case in args.cases.split(","):
        if case != "synthetic-10x" and not os.path.isdir(SHARED):
            print(f"skip {case}: {SHARED} is absent")
            continue
        load = os.getloadavg()[0]  # the machine may be shared: a busy one inflates every time below
        with tempfile.TemporaryDirectory() as work:
            proc = subprocess.run([sys.executable, "-m", "benchmarks.prepare", "--child", case, "--work", work],
                                  cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{case} failed:\n{proc.stderr[-3000:]}")
        results.append({**json.loads(proc.stdout.strip().splitlines()[-1]), "load_avg_1m": load})
    head = f"{'case':<14}{'users':>9}{'items':>9}{'inter.':>11}{'seconds':>9}{'read':>7}{'clean':>7}{'write':>7}" \
           f"{'RSS base':>10}{'RSS peak':>10}{'load':>6}"
    print(head)
    for r in results:
        print(f"{r['case']:<14}{r['users']:>9,}{r['items']:>9,}{r['interactions']:>11,}{r['seconds']:>9.2f}"
              f"{r['read_s']:>7.2f}{r['clean_s']:>7.2f}{r['write_s']:>7.2f}"
              f"{r['rss_base_mib']:>7.0f}MiB{r['rss_peak_mib']:>7.0f}MiB{r['load_avg_1m']:>6.1f}")
    write_result(args.out, {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                            "results": results})


if __name__ == "__main__":
    main()
