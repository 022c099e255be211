"""UNGER ablation table (UNGER Tables 6-8): code source x IKD, Recall/NDCG@10/20 and the modality shares, next to
the paper's Beauty numbers. JSON in benchmarks/results/unger_ablation_<name>.json.

    python -m benchmarks.unger_ablation --config configs/scientific/unger.yaml [--stage1-steps 20000]
        [--steps 20000] [--ranks 1] [--rows semantic,collab,concat,cka,unger] [--integrated adapted] [key=value ...]

Runs the real jobs as subprocesses: prepare (when the dataset is missing), tokenize once per code source the rows
need (``tokenize.unger.source`` unified / semantic / collab / concat, in ``<workdir>/sids/unger-<source>``, the
unified codes in ``unger-unified-<reading>``; the text embeddings of the first run are reused, and collab / concat
reuse the DIN-only model a unified run trained for its modality share, ``tokenize.unger.reference_path``), then train
+ test evaluation per row (``jobs/train.py``; ``deepspeed --num_gpus <ranks>`` when ranks > 1). Finished code
sources and rows are read back, not redone, and an interrupted row continues, so the script can be stopped and
started again, and two invocations with disjoint ``--rows`` can share a machine once the codes exist; delete a
directory to redo it. In MLflow the table is one parent run with each row's training run as its child.

``--integrated collab|adapted|mean`` is the unified rows' reading of Stage I's integrated embedding
(``tokenize.unger.integrated``, default the config's): their runs are ``unger-ablation-<row>-<reading>`` and the JSON
``unger_ablation_<name>-<reading>.json``. Once one unified run saved its trained Stage I model, the other readings
read it back (``tokenize.unger.stage1_path``) instead of training it again.

    semantic only / collaborative only / concat ("\\")  -> model.unger.ikd_weight=0  (Table 7, Table 8 col. 1)
    CKA only                                          -> unified codes, ikd_weight=0 (Table 8)
    CKA + IKD (UNGER)                                 -> unified codes, ikd_weight=1 (Tables 3, 7, 8)
"""

import argparse
import json
import os
import sys

from benchmarks._jobs import REPO, finish_table, table_run, train_launcher, train_once, write_result
from benchmarks._jobs import run as _run

PAPER = {  # UNGER Tables 7 and 8, Beauty: R@10, R@20, N@10, N@20
    "semantic": (0.0791, 0.1077, 0.0462, 0.0535), "collab": (0.0744, 0.0997, 0.0469, 0.0532),
    "concat": (0.0759, 0.1071, 0.0452, 0.0530), "cka": (0.0827, 0.1122, 0.0509, 0.0583),
    "unger": (0.0939, 0.1289, 0.0559, 0.0646),
}
ROWS = [("semantic", "semantic", 0.0), ("collab", "collab", 0.0), ("concat", "concat", 0.0),
        ("cka", "unified", 0.0), ("unger", "unified", 1.0)]


def _manifest(path: str) -> dict:
    with open(os.path.join(path, "manifest.json")) as fh:
        return json.load(fh)


def sids_dir(sids_root: str, source: str, integrated: str) -> str:
    """Where a source's codes live: ``unger-<source>``, and ``unger-unified-<reading>`` for the unified ones."""
    return os.path.join(sids_root, f"unger-{source}" + (f"-{integrated}" if source == "unified" else ""))


def saved_model(sids_root: str, key: str, stage1_steps: int) -> str:
    """A unified run's dir whose manifest saved a Stage I model under ``key`` (``din_reference``: the DIN-only
    model; ``stage1_model``: the CKA-trained one) trained for ``stage1_steps`` steps, or ""."""
    for name in sorted(os.listdir(sids_root)) if os.path.isdir(sids_root) else []:
        path = os.path.join(sids_root, name)
        if name.startswith("unger-unified") and os.path.exists(os.path.join(path, "manifest.json")):
            saved = _manifest(path).get(key)
            if saved and saved["settings"].get("steps") == stage1_steps:
                return path
    return ""


def tokenize_source(py: str, base: list[str], sids_root: str, source: str, stage1_steps: int, emb_dir: str,
                    reference: str, integrated: str) -> str:
    """The source's codes (:func:`sids_dir`), tokenized unless a finished run is there (refused if it holds another
    source or reading). ``emb_dir``: text embeddings to reuse; ``reference``: a unified run's dir whose DIN-only model
    to reuse; ``integrated``: the unified source's reading of the integrated embedding."""
    out = sids_dir(sids_root, source, integrated)
    if os.path.exists(os.path.join(out, "manifest.json")):
        got = _manifest(out)
        got = (got.get("unger_source"), got.get("unger_integrated", "collab") if source == "unified" else None)
        want = (source, integrated if source == "unified" else None)
        if got != want:
            raise SystemExit(f"{out} holds (source, integrated) {got!r} codes, not {want!r}; move it away")
        print(f"reusing the {source} codes in {out} (delete it to tokenize again)", flush=True)
        return out
    over = [f"tokenize.unger.source={source}", f"tokenize.unger.steps={stage1_steps}", f"paths.semantic_ids={out}",
            "tokenize.overwrite=true"]
    over += [f"tokenize.embeddings_path={emb_dir}"] if emb_dir else []
    over += [f"tokenize.unger.reference_path={reference}"] if reference and source != "semantic" else []
    if source == "unified":
        over += [f"tokenize.unger.integrated={integrated}"]
        stage1 = saved_model(sids_root, "stage1_model", stage1_steps)
        over += [f"tokenize.unger.stage1_path={stage1}"] if stage1 else []
    _run([py, "jobs/tokenize.py", *base, *over])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--config", default="configs/scientific/unger.yaml")
    parser.add_argument("--stage1-steps", type=int, default=20000)
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--ranks", type=int, default=1)
    parser.add_argument("--rows", default=",".join(r for r, _, _ in ROWS))
    parser.add_argument("--integrated", choices=["collab", "adapted", "mean"],
                        help="the unified rows' reading of the integrated embedding (default: the config's "
                             "tokenize.unger.integrated)")
    parser.add_argument("--out", help="the JSON (default benchmarks/results/unger_ablation_<dataset>-<reading>.json)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from genrec_dist.config import load_config

    known = {r: (src, ikd) for r, src, ikd in ROWS}
    rows = [r for r in args.rows.split(",") if r]
    for r in rows:
        if r not in known:
            raise SystemExit(f"--rows: unknown row {r!r} ({', '.join(known)})")
    cfg = load_config(os.path.join(REPO, args.config), args.overrides)
    base = ["--config", args.config, *args.overrides]
    py = sys.executable
    if not os.path.exists(os.path.join(cfg.dataset_dir, "manifest.json")):
        _run([py, "jobs/prepare.py", *base])
    sids_root = os.path.join(cfg.workdir, "sids")
    # unified first: it trains the DIN-only model that collab and concat reuse (and the references of Table 6)
    sources = [s for s in ("unified", "semantic", "collab", "concat")
               if any(known[r][0] == s for r in rows)]
    integrated = args.integrated or cfg.tokenize.unger.integrated
    # a DIN-only model saved by any unified run is reused (collab, concat, and the unified run's Table 6 reference)
    reference = saved_model(sids_root, "din_reference", args.stage1_steps)
    unified = os.path.join(sids_dir(sids_root, "unified", integrated), "manifest.json")
    if any(s in sources for s in ("collab", "concat")) and "unified" not in sources and os.path.exists(unified):
        sources.insert(0, "unified")  # read back for its modality shares
    emb_dir, shares = (os.path.join(reference, "embeddings") if reference else ""), {}
    for source in sources:
        out = tokenize_source(py, base, sids_root, source, args.stage1_steps, emb_dir, reference, integrated)
        emb_dir = emb_dir or os.path.join(out, "embeddings")
        if source == "unified" and not reference:
            reference = out if _manifest(out).get("din_reference") else ""
        with open(os.path.join(out, "stats.json")) as fh:
            stats = json.load(fh)
        for key, name in (("unger.modality_share", source), ("unger.modality_share_concat", "concat")):
            if f"{key}.share_semantic" in stats:
                shares[name] = (stats[f"{key}.share_semantic"], stats[f"{key}.share_collab"])
    results = {}
    parent = table_run(cfg, "unger_ablation", f"unger-ablation ({cfg.name}, {integrated})",
                       {"config": args.config, "rows": ",".join(rows), "overrides": " ".join(args.overrides),
                        "stage1_steps": args.stage1_steps, "steps": args.steps, "integrated": integrated})
    try:
        for row in rows:
            source, ikd = known[row]
            run = f"unger-ablation-{row}" + (f"-{integrated}" if source == "unified" else "")
            results[row] = train_once([*train_launcher(args.ranks), "jobs/train.py", *base, "train.model=unger",
                                       f"model.unger.ikd_weight={ikd}",
                                       f"paths.semantic_ids={sids_dir(sids_root, source, integrated)}",
                                       f"max_steps={args.steps}"], cfg.runs_dir, run, parent)
    except BaseException:
        parent.close("FAILED")
        raise
    keys = ["recall@10", "recall@20", "ndcg@10", "ndcg@20"]
    lines = [f"UNGER ablation on {cfg.name} ({args.config}; Stage I {args.stage1_steps} steps, Stage II {args.steps}, "
             f"integrated embedding: {integrated})",
             "| row | " + " | ".join(keys) + " | paper (Beauty) R@10 / R@20 / N@10 / N@20 |",
             "|---|" + "---|" * (len(keys) + 1)]
    for row in rows:
        m = results[row]["model"]
        lines.append(f"| {row} | " + " | ".join(f"{m[k]:.4f}" for k in keys) + " | "
                     + " / ".join(f"{v:.4f}" for v in PAPER[row]) + " |")
    pop = results[rows[-1]]["most_popular"]
    lines.append("| most-popular | " + " | ".join(f"{pop[k]:.4f}" for k in keys) + " | |")
    lines.append("\nmodality share (semantic / collaborative); paper Table 6: concat 97.33% / 2.67%, UNGER 59.89% / "
                 "40.11%")
    lines += [f"- {name}: {s:.2%} / {c:.2%}" for name, (s, c) in shares.items()]
    print("\n".join(lines))
    finish_table(parent, results, lines)
    default = os.path.join(REPO, "benchmarks", "results", f"unger_ablation_{cfg.name}-{integrated}.json")
    write_result(args.out or default,
                 {"config": args.config, "overrides": args.overrides, "stage1_steps": args.stage1_steps,
                  "steps": args.steps, "ranks": args.ranks, "integrated": integrated, "results": results,
                  "modality_share": shares})


if __name__ == "__main__":
    main()
