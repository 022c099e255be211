"""Every model under the same compute: a wall-clock training budget per model (``--mode budget``), or each model
trained until validation stops improving (``--mode converged``); the best model on validation tested.

    python -m benchmarks.leaderboard --config configs/beauty.yaml --budget-min 30 [--threads 2]
        [--mode budget|converged] [--cap-min 90] [--patience 10] [--parallel 2] [--protocol seen-filtered|full]
        [--warmup-epochs E] [--models sasrec,car,tiger,unger] [--sizes auto|cpu|paper] [--valid-every-min M]
        [--prefix leaderboard] [--seeds 42,7,11] [--out F] [--sasrec k=v ...] [--car k=v ...] [--tiger k=v ...] [--unger k=v ...]
        [--stage1 k=v ...] [key=value ...]

**Converged mode** validates once an epoch (``train.eval_every_epochs=1``), stops a model after ``--patience``
validations without a better NDCG@10, and caps each model at ``--cap-min`` training minutes (a row stopped by the
cap says ``stopped by: budget``: not converged). ``--parallel 2`` trains two models at a time (one thread each with
``--threads 1``). Checkpoints every 500 steps, so a board cut off resumes its unfinished run where it stopped.

**Protocols.** Every model validates and is tested under ``--protocol`` (``seen-filtered``: the user's already-seen
items are removed from the ranking, eSASRec's benchmark protocol; ``full``: the whole catalog ranked, the papers'
protocol; default: seen-filtered in converged mode, full in budget mode), and its exported model is then tested
under the other protocol too (``jobs/evaluate.py``): both tables are printed and kept in the JSON.

**Seeds.** ``--seeds 42,7,11`` trains every model once per seed (runs ``<prefix>-<model>-s<seed>``, seed by seed).
A row then holds the mean test metrics over the seeds and each seed's beside them (``per_seed``); CAR's inference
rule is chosen on its mean validation, and ``car_vs_sasrec`` gives the ratio of the means and each seed's
(``ratio_per_seed``). The curve, steps and minutes shown are the first seed's. One converged run of a small model
can move test NDCG@10 by several percent with its seed alone, more than the gaps a board is read for.

Each model is one real ``jobs/train.py`` run with ``train.budget_s`` = the budget: the loop stops after the step that
crosses it (training seconds: validations and checkpoints are not counted, so a beam-search model is not charged for
its slower validation), validates there, and the best model on validation is evaluated on the test split exactly as
at the end of any run. Validation runs every ``--valid-every-min`` training minutes (default budget / 6, so every
model gets about six points on the curve). Every run gets the same threads (``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``
= ``--threads``, recorded with torch's own count in each row).

Rows: SASRec (full softmax over items, its paper's 50-item history), CAR fast and CAR slow (one trained model, two
inference rules; the slow weight chosen on validation), TIGER, and UNGER. UNGER's Stage I (``jobs/tokenize.py``,
method unger, on our codes' text embeddings) runs first and its training seconds (DIN + CKA) count in UNGER's budget:
Stage II gets the budget less those, and UNGER's curve starts at Stage I's minutes. Text embedding and k-means are
tokenization and count in no model's budget. CAR and UNGER read ``configs/<dataset>/{car,unger}.yaml`` when present
(their tuned warm-up and Stage I settings) and SASRec ``configs/<dataset>/sasrec.yaml`` (eSASRec's every-position
sampled-softmax recipe), the others the ``--config`` file. SASRec, CAR and TIGER share the
dataset config's semantic IDs (our own codes); a missing dataset or codes are made first (prepare, tokenize).

Sizes: ``paper`` runs every model at its config's sizes (the papers'); ``cpu`` shrinks CAR and TIGER to what trains
usefully on a few cores (README's small CAR: d 64, 2 layers; TIGER at UNGER's size) and decodes beams of 20;
``auto`` = paper when CUDA is present, else cpu.

Report: test R/N@5/10/20, parameters, samples/s, steps done, and the training minutes each model needed to reach
SASRec's best validation NDCG@10 (the one its tested model has); one picture of validation NDCG@10 against training
minutes, every model on one axis. Prints the table, writes ``benchmarks/results/leaderboard_<dataset>.json`` and the
PNG beside it, and logs one MLflow parent run (picture, table and JSON as artifacts) with a child run per row. A
finished run of the same name is read back, not trained again (``benchmarks/_jobs.py``).
"""

import argparse
import json
import os
import sys
import tempfile
import textwrap

from benchmarks._jobs import REPO, run, train_once, write_result

MODELS = ("sasrec", "car", "tiger", "unger")
LABELS = {"sasrec": "SASRec (full softmax)", "car_fast": "CAR fast", "car_slow": "CAR slow", "tiger": "TIGER",
          "unger": "UNGER (Stage I + II)"}
PROTOCOLS = {"seen-filtered": True, "full": False}  # --protocol -> evaluate.filter_seen
KEYS = ["recall@5", "ndcg@5", "recall@10", "ndcg@10", "recall@20", "ndcg@20"]
# Optimizer settings of a model's own paper where the dataset config carries another model's (the configs' train
# section is TIGER/UNGER's: 2000 warm-up steps, UNGER Table 4, which would spend much of a short budget warming up).
PAPER_TRAIN = {
    # SASRec §IV-B (implementation details): Adam, lr 0.001, batch 128, no warm-up
    "sasrec": ["train.batch_size=128", "train.lr=0.001", "train.warmup_steps=0"],
}
# What trains usefully on a few CPU cores within minutes; the papers' sizes (the configs') need a GPU.
CPU_SIZES = {
    # README's small CAR row (Beauty): d 64, 2 layers, batch 128. Minutes of CPU give CAR ~1,000 steps, so it is
    # under-trained, not over-fitted: no dropout (its Bernoulli masks, mostly over the attention probabilities, were
    # 40% of a one-thread step: 1.09 s -> 0.65 s), and 100 warm-up steps, not the configs' 360 (3.9 epochs, a third
    # of the budget). Chosen on validation against the configs' dropout 0.1 / 360 (docs/leaderboard.md).
    "car": ["model.car.d_model=64", "model.car.n_heads=4", "model.car.n_layers=2", "model.car.d_ff=256",
            "train.batch_size=128"],
    # TIGER at UNGER's Stage II size (UNGER Table 4: d 96, 6 heads, d_ff 256, 1 + 4 layers), beam 20 on CPU
    "tiger": ["model.tiger.d_model=96", "model.tiger.n_heads=6", "model.tiger.head_dim=16", "model.tiger.d_ff=256",
              "model.tiger.encoder_layers=1", "model.tiger.decoder_layers=4", "evaluate.beam_width=20"],
    "unger": ["evaluate.beam_width=20"],
    "sasrec": [],
}
# A short CPU budget (budget mode, cpu sizes) under-trains rather than over-fits: no dropout and a short warm-up. A
# converged board keeps the configs' regularisation and warm-up, since every model then trains until it over-fits.
CPU_BUDGET_ONLY = {
    "car": ["model.car.dropout=0.0", "train.warmup_steps=100"],
    "tiger": ["model.tiger.dropout=0.0"],
}
# A converged board trains CAR at the size and with the recipe of the SASRec it is compared with (eSASRec §4.1,
# configs/<dataset>/sasrec.yaml: one block, one head, d 64, d_ff 64, dropout 0.2, Adam betas (0.9, 0.98), no
# warm-up; the chunk layout keeps its own 20-item history). Chosen on Beauty's validation N@10 (seen-filtered, one
# thread, 6 epochs of patience; docs/results.md): 0.0731 (fast; slow, w 0.1: 0.0745) against 0.0698 for 1 block of 4 heads
# with d_ff 256, 0.0622 for 2 such blocks with that recipe (stopped at 3,300 steps, rising 0.001 an epoch), and 0.0665
# (cut off by its 60-minute cap) for 2 blocks with the configs' dropout 0.1, 360 warm-up steps and beta2 0.999;
# SASRec's own best is 0.0704.
CPU_CONVERGED_ONLY = {
    "car": ["model.car.n_layers=1", "model.car.n_heads=1", "model.car.d_ff=64", "model.car.dropout=0.2",
            "train.adam_beta2=0.98", "train.warmup_steps=0"],
}


def model_config(config: str, model: str) -> str:
    """``configs/<dataset>/<model>.yaml`` beside ``configs/<dataset>.yaml`` when it exists, else the dataset's."""
    stem = os.path.splitext(config)[0]
    own = os.path.join(stem, f"{model}.yaml")
    return own if model in ("car", "unger", "sasrec") and os.path.exists(os.path.join(REPO, own)) else config


def first_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """Training minutes of the first validation at or above ``target`` (``None`` when none is)."""
    return next((m for m, v in curve if v >= target), None)


def curve_of(history: list[dict], offset_min: float = 0.0) -> list[tuple[float, float]]:
    """``(training minutes, validation NDCG@10)`` of every validation of a run's history."""
    return [(offset_min + row["elapsed_s"] / 60, row["valid/ndcg@10"]) for row in history
            if "valid/ndcg@10" in row and "elapsed_s" in row]


def table_lines(rows: dict, protocol: str | None = None) -> list[str]:
    """One row per model: its test metrics (under ``protocol`` when given, else the main protocol's)."""
    head = ("| model | " + " | ".join(k.replace("recall", "R").replace("ndcg", "N") for k in KEYS)
            + " | params | samples/s | steps | stopped by | train min | min to SASRec's valid N@10 |")
    lines = [head, "|---|" + "---|" * (len(KEYS) + 6)]
    for name, r in rows.items():
        reach = "-" if r["minutes_to_sasrec"] is None else f"{r['minutes_to_sasrec']:.2f}"
        warm = "" if r.get("out_of_warmup", True) else " (in warm-up)"
        lines.append(f"| {r.get('label') or LABELS.get(name, name)} | "
                     + " | ".join(f"{(r['test_protocols'][protocol] if protocol else r['test'])[k]:.4f}"
                                  for k in KEYS)
                     + f" | {r['parameters']:,} | {r['samples_per_s']:.0f} | {r['steps']}{warm} | {r['stopped_by']} | "
                       f"{r['train_minutes']:.2f} | {reach} |")
    return lines


def plot(rows: dict, path: str, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in rows.items():
        if name == "car_slow":  # the same training as CAR fast (validation ranks with the fast rule)
            continue
        xs, ys = zip(*r["curve"]) if r["curve"] else ((), ())
        label = r.get("label") or LABELS.get(name, name)
        ax.plot(xs, ys, marker="o", markersize=3, label=label.replace("CAR fast", "CAR"))
    ax.set_xlabel("training minutes (validation not counted)")
    ax.set_ylabel("validation NDCG@10")
    ax.set_title(textwrap.fill(title, 100), fontsize=8)  # a converged board's title is two lines
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def log_mlflow(cfg, title: str, rows: dict, settings: dict, files: list[str]) -> str | None:
    """One parent run (settings, picture, table, JSON) with a child run per row; returns the parent's id."""
    if not cfg.tracking.enabled:
        return None
    import mlflow

    from genrec_dist.tracking import default_uri
    from genrec_dist.tracking.mlflow_client import _metric_key  # the trainer's naming: "recall@10" -> "recall_at_10"

    mlflow.set_tracking_uri(default_uri(cfg))
    mlflow.set_experiment(cfg.tracking.experiment)
    with mlflow.start_run(run_name=f"leaderboard-{cfg.name}",
                          tags={"genrec.job": "leaderboard", "genrec.dataset": cfg.name}) as parent:
        mlflow.log_params({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in settings.items()})
        for name, r in rows.items():
            tags = {"genrec.train_run": r["run_name"], "genrec.train_run_id": str(r["mlflow_run_id"])}
            with mlflow.start_run(run_name=r.get("label") or LABELS.get(name, name), nested=True, tags=tags):
                mlflow.log_params({"model": name, "parameters": r["parameters"], "steps": r["steps"],
                                   "stopped_by": r["stopped_by"], "threads": r["threads"]})
                mlflow.log_metrics({_metric_key(f"test/{k}"): v for k, v in r["test"].items()}
                                   | {"samples_per_s": r["samples_per_s"], "train_minutes": r["train_minutes"]}
                                   | ({"minutes_to_sasrec": r["minutes_to_sasrec"]}
                                      if r["minutes_to_sasrec"] is not None else {}))
                for minutes, value in r["curve"]:  # step = training seconds
                    mlflow.log_metric(_metric_key("valid/ndcg@10"), value, step=int(round(minutes * 60)))
        for f in files:
            mlflow.log_artifact(f)
        return parent.info.run_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--config", default="configs/beauty.yaml")
    parser.add_argument("--mode", choices=("budget", "converged"), default="budget")
    parser.add_argument("--budget-min", type=float, default=30.0, help="budget mode: training minutes per model")
    parser.add_argument("--cap-min", type=float, default=90.0, help="converged mode: at most this many minutes")
    parser.add_argument("--patience", type=int, default=10, help="converged mode: validations (epochs) without a "
                                                                 "better NDCG@10 before a model stops")
    parser.add_argument("--parallel", type=int, default=1, help="models trained at a time")
    parser.add_argument("--protocol", choices=tuple(PROTOCOLS), default=None,
                        help="validation and main test protocol (default: seen-filtered when converged, else full)")
    parser.add_argument("--warmup-epochs", type=float, default=None,
                        help="every model's warm-up in epochs (train.warmup_epochs), instead of its config's steps")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads of every run")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--sizes", choices=("auto", "cpu", "paper"), default="auto")
    parser.add_argument("--valid-every-min", type=float, default=None, help="budget mode; default: budget / 6")
    parser.add_argument("--prefix", default="leaderboard", help="run names are <prefix>-<model>")
    parser.add_argument("--seeds", default=None,
                        help="comma-separated seeds: every model trained once per seed (runs <prefix>-<model>-s<seed>); "
                             "rows hold the mean test metrics, the per-seed ones beside them")
    parser.add_argument("--out", help="default benchmarks/results/leaderboard_<dataset>.json (the PNG beside it)")
    for m in (*MODELS, "stage1"):
        parser.add_argument(f"--{m}", nargs="*", default=[], metavar="KEY=VALUE",
                            help=f"overrides of the {m} run only" if m != "stage1" else "overrides of UNGER Stage I")
    parser.add_argument("overrides", nargs="*", help="overrides of every run")
    args = parser.parse_intermixed_args()
    models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        raise SystemExit(f"--models: unknown {unknown} (choose from {', '.join(MODELS)})")
    protocol = args.protocol or ("seen-filtered" if args.mode == "converged" else "full")
    other = next(p for p in PROTOCOLS if p != protocol)

    import torch

    from genrec_dist.config import load_config
    from genrec_dist.runs.export import load_exported

    os.chdir(REPO)  # configs' relative paths are relative to the repository root, as for the jobs
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    sizes = args.sizes if args.sizes != "auto" else ("paper" if torch.cuda.is_available() else "cpu")
    budget_s = (args.cap_min if args.mode == "converged" else args.budget_min) * 60
    valid_s = round((args.valid_every_min * 60) if args.valid_every_min else budget_s / 6, 1)
    cfg = load_config(args.config, args.overrides)
    py = sys.executable

    # inputs every row shares: the dataset and our codes
    if not os.path.exists(os.path.join(cfg.dataset_dir, "manifest.json")):
        run([py, "jobs/prepare.py", "--config", args.config, *args.overrides])
    if {"car", "tiger"} & set(models) and not os.path.exists(os.path.join(cfg.semantic_ids_dir, "manifest.json")):
        run([py, "jobs/tokenize.py", "--config", args.config, *args.overrides])

    if args.mode == "converged":  # validation once an epoch, patience, a cap; checkpoints so a cut-off board resumes
        common = [f"train.budget_s={budget_s}", "train.max_steps=1000000000", "train.eval_every=0",
                  "train.eval_every_s=0", "train.eval_every_epochs=1", f"train.patience={args.patience}",
                  "train.checkpoint_every=500", "train.keep_checkpoints=1", "train.log_every=50"]
    else:
        common = [f"train.budget_s={budget_s}", "train.max_steps=1000000000", "train.eval_every=0",
                  f"train.eval_every_s={valid_s}", "train.patience=0", "train.checkpoint_every=0",
                  "train.log_every=50"]
    common += [f"evaluate.filter_seen={str(PROTOCOLS[protocol]).lower()}"]
    if args.warmup_epochs is not None:
        common += [f"train.warmup_epochs={args.warmup_epochs}"]

    seeds = [int(x) for x in args.seeds.split(",") if x] if args.seeds else [None]

    def train_row(model: str, seed: int | None = None) -> tuple[dict, dict]:
        """Train (or read back) one model's run; its rows (CAR: fast and slow) and most-popular's test metrics."""
        config, extra, offset_s, stage1 = model_config(args.config, model), [], 0.0, None
        if model == "unger":  # Stage I first; its seconds count in UNGER's budget
            sids = f"{cfg.workdir}/sids/{args.prefix}-unger"
            extra = [f"paths.semantic_ids={sids}"]
            if not os.path.exists(os.path.join(sids, "manifest.json")):
                emb = os.path.join(cfg.semantic_ids_dir, "embeddings")  # our codes' text embeddings, reused
                reuse = [f"tokenize.embeddings_path={emb}"] if os.path.exists(emb) else []
                run([py, "jobs/tokenize.py", "--config", config, "tokenize.method=unger",
                     "tokenize.unger.modality_share=false", *reuse, *args.overrides, *extra, *args.stage1])
            # Stage I's training seconds (DIN + CKA, tokenization/unger.py run_stage1): the text embedding and the
            # k-means are tokenization, which no SID model's budget counts
            with open(os.path.join(sids, "stats.json")) as fh:
                offset_s = stage1 = float(json.load(fh)["unger.seconds"])
            if offset_s >= budget_s * 0.9:
                raise SystemExit(f"UNGER Stage I took {offset_s / 60:.1f} min of the {budget_s / 60:g} min budget: "
                                 "lower tokenize.unger.steps (--stage1 tokenize.unger.steps=N)")
        cmd = [py, "jobs/train.py", "--config", config, f"train.model={model}", *PAPER_TRAIN.get(model, []),
               *args.overrides, *CPU_SIZES[model] * (sizes == "cpu"),
               *CPU_BUDGET_ONLY.get(model, []) * (sizes == "cpu" and args.mode == "budget"),
               *CPU_CONVERGED_ONLY.get(model, []) * (sizes == "cpu" and args.mode == "converged"), *common, *extra,
               *([f"train.budget_s={budget_s - offset_s}"] if offset_s else []), *getattr(args, model),
               *([f"seed={seed}"] if seed is not None else [])]
        res = train_once(cmd, cfg.runs_dir, f"{args.prefix}-{model}" + (f"-s{seed}" if seed is not None else ""))
        run_dir = res.get("run_dir") or os.path.join(cfg.runs_dir, res["run_name"])
        with open(os.path.join(run_dir, "history.json")) as fh:
            history = json.load(fh)
        exported, meta = load_exported(run_dir)
        again = evaluate_other(py, run_dir, other)  # the same exported model under the other protocol
        loop = res.get("loop", {})
        warmup = loop.get("warmup_steps")
        base = {"run_name": res["run_name"], "run_dir": run_dir, "best_step": res["best_step"],
                "best_valid_ndcg@10": res["best_valid"], "export_step": meta.get("step"),
                "parameters": sum(p.numel() for p in exported.parameters()), "steps": loop.get("steps"),
                "stopped_by": loop.get("stopped_by"), "budget_s": loop.get("budget_s"),
                "train_minutes": (loop.get("train_s", 0.0) + offset_s) / 60, "stage1_s": stage1,
                "samples_per_s": loop.get("samples_per_s", 0.0), "threads": loop.get("threads"),
                "history_length": loop.get("history_length"), "mlflow_run_id": _train_run_id(run_dir),
                "warmup_steps": warmup, "out_of_warmup": warmup is None or (loop.get("steps") or 0) > warmup,
                "steps_per_epoch": loop.get("steps_per_epoch"),
                "curve": curve_of(history, offset_s / 60), "config": config, "command": cmd[1:]}
        m, o = res["model"], again["model"]
        rows = {}
        if model == "car":
            chosen = (res.get("chosen_on_valid") or {}).get("slow_weight", {})
            w = chosen.get("chosen")
            for rule in ("fast", "slow"):
                rows[f"car_{rule}"] = {**base, "test": {k: m[f"{rule}/{k}"] for k in KEYS},
                                       "test_protocols": {protocol: {k: m[f"{rule}/{k}"] for k in KEYS},
                                                          other: {k: o[f"{rule}/{k}"] for k in KEYS}}}
            rows["car_fast"]["valid_metric"] = res["best_valid"]
            rows["car_slow"].update(slow_weight=w, valid_metric=chosen.get("valid", {}).get(str(w)))
        else:
            label = None
            if model == "sasrec":  # its loss and positions, as trained
                sc = meta["model_config"]["sasrec"]
                loss = sc.get("loss", "auto")
                if loss == "auto":
                    loss = "softmax" if int(meta["num_items"]) <= sc.get("full_softmax_max_items", 1 << 62) \
                        else "sampled"
                label = (f"SASRec ({'full' if loss == 'softmax' else 'sampled'} softmax"
                         + (", every position)" if sc.get("all_positions") else ")"))
            rows[model] = {**base, "label": label, "test": {k: m[k] for k in KEYS},
                           "test_protocols": {protocol: {k: m[k] for k in KEYS}, other: {k: o[k] for k in KEYS}}}
        pop = {protocol: res["most_popular"], other: again["most_popular"]}
        return rows, pop

    from concurrent.futures import ThreadPoolExecutor

    jobs = [(m, seed) for seed in seeds for m in models]  # seed by seed: a board cut off has whole seeds done
    with ThreadPoolExecutor(max(1, args.parallel)) as pool:  # each row is subprocesses: threads only wait on them
        done = list(pool.map(lambda job: train_row(*job), jobs))
    rows, pop = seed_means([row for row, _ in done], [p for _, p in done], seeds)

    target = rows["sasrec"]["best_valid_ndcg@10"] if "sasrec" in rows else None
    for r in rows.values():
        r["minutes_to_sasrec"] = first_reach(r["curve"], target) if target is not None else None
    cars = {p: car_vs_sasrec(rows, p) for p in (protocol, other)}
    car = cars[protocol]
    what = (f"until validation stops improving ({args.patience} epochs of patience, cap {args.cap_min:g} min)"
            if args.mode == "converged" else f"{args.budget_min:g} training min per model")
    title = f"{cfg.name}: {what}, {args.threads} threads, sizes {sizes} (test split, best model on validation)"
    lines = [title]
    for p in (protocol, other):
        lines += [f"\n## {p} protocol" + (" (validation and early stopping)" if p == protocol else ""),
                  *table_lines(rows, p), "| most-popular | " + " | ".join(f"{pop[p][k]:.4f}" for k in KEYS) + " |" + " |" * 6]
        if cars[p]:
            c = cars[p]
            lines.append(f"CAR's inference rule chosen on validation: {c['rule']} (valid "
                         + ", ".join(f"{r} {v:.5f}" for r, v in c["valid"].items())
                         + f"); test NDCG@10 {c['test_ndcg@10']:.4f} = {c['ratio'] or 0:.3f} x SASRec's "
                           f"{c['sasrec_test_ndcg@10']:.4f}"
                         + (f" (means over seeds {seeds}; per seed: "
                            + ", ".join(f"{r:.3f}" for r in c["ratio_per_seed"]) + ")" if c.get("ratio_per_seed")
                            else ""))
    print("\n".join(lines), flush=True)
    out = args.out or os.path.join(REPO, "benchmarks", "results", f"leaderboard_{cfg.name}.json")
    png = plot(rows, os.path.splitext(out)[0] + ".png", title)
    settings = {"config": args.config, "mode": args.mode, "threads": args.threads, "sizes": sizes,
                "models": models, "prefix": args.prefix, "protocol": protocol, "parallel": args.parallel,
                **({"seeds": seeds} if seeds != [None] else {}),
                **({"cap_min": args.cap_min, "patience_epochs": args.patience} if args.mode == "converged" else
                   {"budget_min": args.budget_min, "valid_every_min": valid_s / 60}),
                "warmup_epochs": args.warmup_epochs, "overrides": args.overrides, "cuda": torch.cuda.is_available(),
                "unger_stage1": "training seconds counted in UNGER's budget (Stage II gets the rest; its curve starts "
                                "after Stage I); embedding and k-means not counted"}
    result = {**settings, "sasrec_best_valid_ndcg@10": target, "rows": rows, "most_popular": pop[protocol],
              "most_popular_protocols": pop,
              "plot": os.path.basename(png),  # beside the JSON (no machine's absolute path in a shared result)
              "car_vs_sasrec": car, "car_vs_sasrec_protocols": cars}
    write_result(out, result)
    with tempfile.TemporaryDirectory() as tmp:
        table = os.path.join(tmp, "leaderboard.md")
        with open(table, "w") as fh:
            fh.write("\n".join(lines) + "\n")
        parent = log_mlflow(cfg, title, rows, settings, [png, table, out])
    if parent:
        result["mlflow_parent_run_id"] = parent
        write_result(out, result)


def evaluate_other(py: str, run_dir: str, protocol: str) -> dict:
    """The run's exported model tested under ``protocol`` (``jobs/evaluate.py`` with the run's own config); its
    ``eval-test[-seen-filtered].json``, read back when it is there already."""
    path = os.path.join(run_dir, "eval-test-seen-filtered.json" if PROTOCOLS[protocol] else "eval-test.json")
    if not os.path.exists(path):
        run([py, "jobs/evaluate.py", "--run", run_dir, f"evaluate.filter_seen={str(PROTOCOLS[protocol]).lower()}",
             "evaluate.split=test"])
    with open(path) as fh:
        return json.load(fh)


def car_vs_sasrec(rows: dict, protocol: str | None = None) -> dict | None:
    """CAR's inference rule (fast, or slow with its chosen weight) picked on validation, as a user deploying the
    trained model would pick it, and its test NDCG@10 over full-softmax SASRec's; ``None`` without both models.
    Validation scores are ``train.early_stop_metric`` (NDCG@10 by default) of the same exported model."""
    if not {"car_fast", "car_slow", "sasrec"} <= set(rows):
        return None
    valid = {rule: rows[f"car_{rule}"]["valid_metric"] for rule in ("fast", "slow")
             if rows[f"car_{rule}"].get("valid_metric") is not None}
    if not valid:
        return None
    rule = max(valid, key=lambda r: (valid[r], r == "fast"))  # fast on a tie: the cheaper rule
    test = (lambda r: r["test"]) if protocol is None else (lambda r: r["test_protocols"][protocol])
    ours, base = test(rows[f"car_{rule}"])["ndcg@10"], test(rows["sasrec"])["ndcg@10"]
    out = {"rule": rule, "valid": valid, "test_ndcg@10": ours, "sasrec_test_ndcg@10": base,
           "ratio": ours / base if base > 0 else None, **({"protocol": protocol} if protocol else {})}
    if "per_seed" in rows["sasrec"]:  # several seeds: the means above (one rule, chosen on the mean validation)
        p = protocol or next(iter(rows["sasrec"]["test_protocols"]))
        pairs = zip(rows[f"car_{rule}"]["per_seed"], rows["sasrec"]["per_seed"])
        out["ratio_per_seed"] = [c["test_protocols"][p]["ndcg@10"] / s["test_protocols"][p]["ndcg@10"]
                                 for c, s in pairs]
    return out


def seed_means(row_sets: list[dict], pops: list[dict], seeds: list) -> tuple[dict, dict]:
    """One row per model over ``seeds`` (``row_sets``/``pops``: every (seed, model) job's rows and most-popular, seed
    by seed): the first seed's row (its curve, steps, run) with ``test``, ``test_protocols`` and ``valid_metric`` the
    means over seeds, and ``per_seed``: each seed's run, validation and test metrics. One seed: its rows as they are."""
    if seeds == [None]:
        rows: dict[str, dict] = {}
        for r in row_sets:
            rows.update(r)
        return rows, pops[0]
    by_name: dict[str, list[dict]] = {}
    for r in row_sets:
        for name, row in r.items():
            by_name.setdefault(name, []).append(row)
    rows = {}
    for name, runs in by_name.items():
        mean = lambda values: sum(values) / len(values)  # noqa: E731
        row = dict(runs[0])
        row["test"] = {k: mean([r["test"][k] for r in runs]) for k in KEYS}
        row["test_protocols"] = {p: {k: mean([r["test_protocols"][p][k] for r in runs]) for k in KEYS}
                                 for p in runs[0]["test_protocols"]}
        if all(r.get("valid_metric") is not None for r in runs):
            row["valid_metric"] = mean([r["valid_metric"] for r in runs])
        row["best_valid_ndcg@10"] = mean([r["best_valid_ndcg@10"] for r in runs])
        row["per_seed"] = [{"seed": s, "run_name": r["run_name"], "best_valid_ndcg@10": r["best_valid_ndcg@10"],
                            "valid_metric": r.get("valid_metric"), "steps": r["steps"], "stopped_by": r["stopped_by"],
                            "train_minutes": r["train_minutes"], "test_protocols": r["test_protocols"]}
                           for s, r in zip(seeds, runs)]
        rows[name] = row
    pop = pops[0]  # most-popular does not depend on the seed
    return rows, pop


def _train_run_id(run_dir: str) -> str | None:
    """The MLflow run id the training job recorded in its ``run.json``."""
    try:
        with open(os.path.join(run_dir, "run.json")) as fh:
            return json.load(fh).get("mlflow_run_id")
    except OSError:
        return None


if __name__ == "__main__":
    main()
