"""Our semantic IDs beside the peer indexes of the same dataset: collisions and codebook use per level.

    python -m benchmarks.codes_report --config configs/beauty.yaml [--sids DIR] [--peers DIR] [--out F]
        [--variant NAME=DIR ...] [--merge]

Reads our codes (``--sids``, default the config's ``sids/<tokenize.method>``; a de-duplication level the tokenizer
appended is left out, so every row compares the learned levels only) and every peer index
``<--peers>/*/<prepare.name>.index.json.gz`` (default ``<prepare.input_dir>/indexes``, the LC-Rec/LETTER layout
whose keys are LC-Rec item indexes: line k of ``meta_<name>.json.gz`` is key ``k``). Per code set: items sharing
their full code with another item (count and rate), the largest such group, and per level the codes used of K, the
perplexity share ``exp(H)/K`` (1.0 = every code equally often) and the largest codeword's share of items. Prints a table and writes
``benchmarks/results/codes_<dataset>.json``.

``--variant NAME=DIR`` adds a row NAME for another semantic-ID directory of ours (e.g. ``tokenize.collision_free``,
``tokenize.balance``), with its settings and, for collision-free codes, how far the recoded items moved: mean
distance to their reconstruction before and after, and the mean increase (from its ``stats.json``). ``--merge``
computes only the variant rows and adds them to the rows already in the output file (the others kept as they are).
"""

import argparse
import glob
import gzip
import json
import os

import numpy as np
import polars as pl

from benchmarks._jobs import REPO, write_result


def perplexity_share(column: np.ndarray, k: int) -> float:
    """exp(entropy of the code distribution) / K: the share of the codebook in effective use."""
    _, counts = np.unique(column, return_counts=True)
    p = counts / counts.sum()
    return float(np.exp(-(p * np.log(p)).sum()) / k)


def describe(codes: np.ndarray, sizes: list[int]) -> dict:
    """``codes`` (N, L) of real items, learned levels only."""
    from genrec_dist.data.semantic_ids import code_stats

    stats = code_stats(codes, sizes)
    for lv, col in zip(stats["levels"], codes.T):
        lv["perplexity_share"] = perplexity_share(col, lv["codebook_size"])
        lv["max_share"] = float(np.unique(col, return_counts=True)[1].max() / len(col))  # the largest codeword
    return stats


def lcrec_keys(cfg, items: pl.DataFrame) -> pl.DataFrame:
    """``items`` with ``item`` replaced by its LC-Rec index key: for an amazon2014 dataset the ASIN's line in
    ``meta_<name>.json.gz``; an lcrec dataset's keys already are."""
    if cfg.prepare.source != "amazon2014":
        return items
    path = os.path.join(REPO, cfg.prepare.input_dir, f"meta_{cfg.prepare.name}.json.gz")
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        line_of = {json.loads(line)["asin"]: str(i) for i, line in enumerate(fh)}
    return items.with_columns(pl.col("item").replace_strict(line_of).alias("item"))


def variant(path: str, storage_cfg) -> dict:
    """A row for one of our semantic-ID directories: its code stats, settings, and the collision-free distances."""
    from genrec_dist import storage
    from genrec_dist.data.semantic_ids import STATS_FILE, read_semantic_ids

    sids = read_semantic_ids(path, storage_cfg)
    learned = sids.num_levels - (1 if sids.has_dedup_level else 0)
    row = describe(sids.codes[1:, :learned], sids.codebook_sizes[:learned])
    tc = sids.manifest.get("config", {}).get("tokenize", {})
    row["settings"] = {k: tc.get(k) for k in ("method", "levels", "codebook_size", "collision_free", "balance",
                                              "dedup")}
    row["dedup_level"] = sids.has_dedup_level
    stats = json.loads(storage.read_bytes(storage.join(path, STATS_FILE), storage_cfg))
    row["reconstruction_rel"] = stats.get("reconstruction_rel")
    if "collision_free" in stats:
        row["collision_free"] = stats["collision_free"]
    return row


def table(rows: dict) -> str:
    levels = max(len(r["levels"]) for r in rows.values())
    head = ("| codes | items in collision | collision rate | max items / code | "
            + " | ".join(f"L{i + 1} used (perplexity share)" for i in range(levels))
            + " | items recoded (mean distance before -> after) |")
    lines = [head, "|---|---|---|---|" + "---|" * levels + "---|"]
    for name, r in rows.items():
        per = [f"{lv['used']}/{lv['codebook_size']} ({lv['perplexity_share']:.2f})" for lv in r["levels"]]
        cf = r.get("collision_free")
        moved = (f"{cf['items_recoded']:,} ({cf['mean_distance_before']:.3f} -> {cf['mean_distance_after']:.3f}, "
                 f"+{cf['mean_distance_increase']:.3f})" if cf else "-")
        lines.append(f"| {name} | {r['items_in_collision']:,} | {r['collision_rate']:.4f} | "
                     f"{r['max_items_per_code']} | " + " | ".join(per) + f" | {moved} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--config", default="configs/beauty.yaml")
    parser.add_argument("--sids", help="our semantic-ID directory (default: the config's)")
    parser.add_argument("--peers", help="folder of peer index variants (default: <prepare.input_dir>/indexes)")
    parser.add_argument("--out", help="default benchmarks/results/codes_<dataset>.json")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=DIR",
                        help="another semantic-ID directory of ours, reported as row NAME (repeatable)")
    parser.add_argument("--merge", action="store_true",
                        help="only the --variant rows, added to the rows already in the output file")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from genrec_dist.config import load_config
    from genrec_dist.data.dataset import Dataset
    from genrec_dist.data.semantic_ids import read_lcrec_index, read_semantic_ids

    os.chdir(REPO)  # the config's relative paths are relative to the repository root
    cfg = load_config(args.config, args.overrides)
    out = args.out or os.path.join(REPO, "benchmarks", "results", f"codes_{cfg.name}.json")
    variants = dict(v.split("=", 1) for v in args.variant)
    items = lcrec_keys(cfg, Dataset.open(cfg.dataset_dir, cfg.storage).items(["item_id", "item"]))
    if args.merge:
        with open(out) as fh:
            result = json.load(fh)
        rows = result["rows"]
    else:
        sids_dir = args.sids or cfg.semantic_ids_dir
        ours = read_semantic_ids(sids_dir, cfg.storage)
        learned = ours.num_levels - (1 if ours.has_dedup_level else 0)
        rows = {f"ours ({ours.manifest.get('method', cfg.tokenize.method)}, {sids_dir})":
                describe(ours.codes[1:, :learned], ours.codebook_sizes[:learned])}
        peers = args.peers or os.path.join(cfg.prepare.input_dir, "indexes")
        for path in sorted(glob.glob(os.path.join(peers, "*", f"{cfg.prepare.name}.index.json*"))):
            peer = read_lcrec_index(path, items, cfg.storage, [cfg.tokenize.codebook_size] * cfg.tokenize.levels)
            rows[f"peer {os.path.basename(os.path.dirname(path))}"] = describe(peer.codes[1:], peer.codebook_sizes)
        result = {"config": args.config, "sids": sids_dir, "peers": peers, "rows": rows}
    for name, path in variants.items():
        rows[name] = variant(path, cfg.storage)
    print(f"Semantic IDs on {cfg.name}: {len(items):,} items, learned levels only\n{table(rows)}", flush=True)
    write_result(out, result)

if __name__ == "__main__":
    main()
