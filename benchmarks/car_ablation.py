"""CAR's ablation table (CAR, arXiv 2506.23643, ablation and SID-depth studies): CAR fast and slow, the AR ablation,
w/o fusion, w/o think, SID depth, and TIGER from the same pipeline (same dataset, same semantic IDs), test
Recall/NDCG@5/10/20 side by side.
JSON in benchmarks/results/car_ablation_<dataset>.json (``--out`` names another).

    python -m benchmarks.car_ablation --config configs/scientific/car.yaml [--tiger-config configs/scientific.yaml]
        [--rows car,ar,no_fusion,no_think,depth1,depth2,depth3,tiger] [--ranks 1] [--prefix car-ablation] [--out F]
        [--car key=value ...] [--ar key=value ...] [--tiger key=value ...] [key=value ...]

Each row is one real ``jobs/train.py`` run (``deepspeed --num_gpus <ranks>`` when ranks > 1) whose best model on
the validation split is evaluated on the test split at the end of training. Trailing ``key=value`` overrides go to
every row (``workdir=...``, ``train.max_steps=...``); ``--car`` / ``--tiger`` overrides to that model's rows only
(sizes for a CPU budget); ``--ar`` overrides to the AR row only, after ``--car`` (its validation decodes with beam
search, so a CPU budget validates it less often). TIGER runs from ``--tiger-config`` (default
``configs/<dataset>.yaml``), since CAR's configs count warm-up and validation in CAR's training windows. A row whose
run already finished is read, not trained again, once its saved config is checked against the row's command (a
stale run under the same name ends the script, naming the fields that differ); an interrupted one continues
(``--resume``), so the table picks up where it stopped. In MLflow the table is one parent run (``--prefix`` and the
dataset name it; the rows' metrics and the table beside) with each row's training run as its child.

    car        CAR as configured (fast and slow inference; slow_weight chosen on validation)
    ar         model.car.mode=ar: token-level autoregression over the same chunks + beam search (evaluate.beam_width)
    no_fusion  model.car.fusion=none  ("w/o F")
    no_think   model.car.alpha=0      ("w/o T")
    depth<k>   model.car.levels=k     (SID depth k; the car row is the full depth)
    tiger      train.model=tiger      (beam search, evaluate.beam_width)
"""

import argparse
import os

from benchmarks._jobs import REPO, finish_table, table_run, train_launcher, train_once, write_result

ROWS = {"car": [], "ar": ["model.car.mode=ar"], "no_fusion": ["model.car.fusion=none"],
        "no_think": ["model.car.alpha=0"]}
LABELS = {"car": "CAR", "ar": "AR", "no_fusion": "CAR w/o F", "no_think": "CAR w/o T", "tiger": "TIGER"}
KEYS = ["recall@5", "ndcg@5", "recall@10", "ndcg@10", "recall@20", "ndcg@20"]


def row_overrides(row: str) -> list[str]:
    if row in ROWS:
        return ROWS[row]
    if row.startswith("depth") and row[5:].isdigit():
        return [f"model.car.levels={int(row[5:])}"]
    raise SystemExit(f"--rows: unknown row {row!r} (car, ar, no_fusion, no_think, depth<k>, tiger)")


def table_lines(results: dict, beam: dict) -> list[str]:
    """One line per inference of each row (CAR rows: fast and slow), then most-popular."""
    head = "| row | steps (best) | " + " | ".join(k.replace("recall", "R").replace("ndcg", "N") for k in KEYS) + " |"
    lines = [head, "|---|---|" + "---|" * len(KEYS)]
    for row, res in results.items():
        m, label = res["model"], LABELS.get(row, f"CAR depth {row[5:]}" if row.startswith("depth") else row)
        variants = [("", m)]
        if "fast/recall@10" in m:  # CAR: fast and slow from the same model
            w = (res.get("chosen_on_valid") or {}).get("slow_weight", {}).get("chosen")
            variants = [(" fast", {k: m[f"fast/{k}"] for k in KEYS}),
                        (f" slow (w={w})" if w is not None else " slow", {k: m[f"slow/{k}"] for k in KEYS})]
        elif row in beam:
            label += f" (beam {beam[row]})"
        for suffix, vals in variants:
            lines.append(f"| {label}{suffix} | {res.get('best_step')} | " + " | ".join(f"{vals[k]:.4f}" for k in KEYS)
                         + " |")
    pop = next(iter(results.values()))["most_popular"]
    lines.append("| most-popular | | " + " | ".join(f"{pop[k]:.4f}" for k in KEYS) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--config", default="configs/scientific/car.yaml")
    parser.add_argument("--tiger-config", default=None, help="default: configs/<dataset name>.yaml")
    parser.add_argument("--rows", default="car,ar,no_fusion,no_think,depth1,depth2,depth3,tiger")
    parser.add_argument("--ranks", type=int, default=1)
    parser.add_argument("--prefix", default="car-ablation", help="run names are <prefix>-<row>")
    parser.add_argument("--out", help="the JSON (default benchmarks/results/car_ablation_<dataset>.json; give "
                                      "another for a subset of rows or another budget, so the whole table stays)")
    parser.add_argument("--car", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of the CAR rows only")
    parser.add_argument("--ar", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides of the AR row only (after --car)")
    parser.add_argument("--tiger", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of the TIGER row only")
    parser.add_argument("overrides", nargs="*", help="overrides of every row")
    args = parser.parse_intermixed_args()

    from genrec_dist.config import load_config

    cfg = load_config(os.path.join(REPO, args.config), args.overrides)
    tiger_config = args.tiger_config or os.path.join("configs", f"{cfg.name}.yaml")
    rows = [r for r in args.rows.split(",") if r]
    if "tiger" in rows:  # "from the same pipeline": TIGER must read CAR's semantic IDs and dataset
        tcfg = load_config(os.path.join(REPO, tiger_config), args.overrides + ["train.model=tiger", *args.tiger])
        for what in ("semantic_ids_dir", "dataset_dir"):
            if getattr(tcfg, what) != getattr(cfg, what):
                raise SystemExit(f"{tiger_config} reads {what} {getattr(tcfg, what)}, {args.config} reads "
                                 f"{getattr(cfg, what)}: pass the same paths to both (e.g. paths.semantic_ids=...)")
    results, beam = {}, {}
    parent = table_run(cfg, "car_ablation", f"{args.prefix} ({cfg.name})",
                       {"config": args.config, "tiger_config": tiger_config, "rows": ",".join(rows),
                        "overrides": " ".join(args.overrides), "car_overrides": " ".join(args.car),
                        "ar_overrides": " ".join(args.ar), "tiger_overrides": " ".join(args.tiger)})
    try:
        for row in rows:
            name = f"{args.prefix}-{row}"
            if row == "tiger":
                config, extra = tiger_config, ["train.model=tiger", *args.tiger]
                beam[row] = load_config(os.path.join(REPO, config), args.overrides + extra).evaluate.beam_width
            else:
                config, extra = args.config, [*row_overrides(row), *args.car, *(args.ar if row == "ar" else [])]
                if row == "ar":
                    beam[row] = load_config(os.path.join(REPO, config), args.overrides + extra).evaluate.beam_width
            results[row] = train_once([*train_launcher(args.ranks), "jobs/train.py", "--config", config,
                                       *args.overrides, *extra], cfg.runs_dir, name, parent)
    except BaseException:
        parent.close("FAILED")
        raise
    title = f"CAR table on {cfg.name} ({args.config}; test split, best model on validation)"
    lines = [title, *table_lines(results, beam)]
    print("\n".join(lines), flush=True)
    finish_table(parent, results, lines)
    write_result(args.out or os.path.join(REPO, "benchmarks", "results", f"car_ablation_{cfg.name}.json"),
                 {"config": args.config, "tiger_config": tiger_config, "overrides": args.overrides,
                  "car_overrides": args.car, "ar_overrides": args.ar, "tiger_overrides": args.tiger,
                  "rows": rows, "prefix": args.prefix, "results": results})


if __name__ == "__main__":
    main()
