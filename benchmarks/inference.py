"""Inference speed of CAR (fast, slow) against beam search (TIGER, and CAR's own AR ablation) at several beam widths,
and the ``recommend`` row: users/s of the batch job (``jobs/recommend.py``) for a trained run on 1 and 2 workers.

    python -m benchmarks.inference [--config configs/synthetic.yaml] [--widths 10,20,50,100] [--users 1024]
                                   [--batch-size 256] [--threads 1] [--repeats 3] [--train-steps 0] [--sids DIR]
                                   [--recommend-run RUN] [--recommend-workers 1,2] [--recommend-only]
                                   [--out benchmarks/results/inference.json] [key=value ...]
    python -m benchmarks.inference --recommend-run <Beauty CAR run dir> --recommend-only   # the recommend row only
                                                                      # (-> benchmarks/results/inference_recommend.json)

Same hardware, same process, same users: the test split of the config's dataset (prepared into a temp dir when
``--dataset`` is not given; the synthetic catalog by default), each model built from the config's ``model.*``
section (``key=value`` overrides apply, e.g. ``model.car.n_layers=2``). Every row is
:func:`genrec_dist.evaluation.evaluate.evaluate_model` (users/s = users / total ``recommend`` time; ms/user = mean
over batches of batch time / batch size) after one untimed warm-up batch, the median of ``--repeats`` rounds. The
KV cache column is what a beam search holds at its end (keys, values and masks of every layer; KB per user, for the
first batch): the history prefilled once per user for CAR's AR ablation, the encoder's projected memory once per user
for TIGER, plus each beam's own decoded tokens.

Models are **untrained** by default (``--train-steps 0``): the cost of a forward pass or of a trie-constrained beam
does not depend on the weights, so speed needs no training; recall columns are shown only with ``--train-steps``.
Without ``--sids``, semantic IDs are random codes (``tokenize.levels`` x ``tokenize.codebook_size``, seeded; TIGER
gets the de-duplication level appended as the tokenizer does, CAR reads the codes without it): their meaning does
not change the cost either. CAR's rows are measured at every width too (CAR ignores it), to show they stay flat.

``recommend`` (with ``--recommend-run``, a trained run: dir, name or MLflow id, read with its own saved config):
the batch job's pipeline (:func:`genrec_dist.ray_recommend.run_recommend`, on a local Ray of this machine) over
every user of the run's dataset, top ``--k``, in the model's exported inference mode, once per worker count. Its
users/s is the job's own: from the start of the pipeline (the actors starting and loading the model included) to
the last shard written, as the job prints and logs it.
"""

import argparse
import copy
import json
import os
import platform
import tempfile
import time

import numpy as np
import torch

from benchmarks._jobs import write_result
from genrec_dist.config import load_config, model_history, to_dict
from genrec_dist.data.dataset import Dataset
from genrec_dist.data.examples import Examples, eval_batches, eval_examples, train_examples
from genrec_dist.data.semantic_ids import SemanticIds, read_semantic_ids
from genrec_dist.evaluation.evaluate import evaluate_model
from genrec_dist.models import build_model
from genrec_dist.models.blocks import TransformerStack
from tokenization.kmeans import dedup_level

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _portable(args: dict) -> dict:
    """Arguments as recorded in the JSON: paths relative to the repo, so results carry no machine's layout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return {k: os.path.relpath(v, root) if isinstance(v, str) and os.path.isabs(v) else v for k, v in args.items()}


def random_sids(num_items: int, levels: int, k: int, seed: int) -> tuple[SemanticIds, SemanticIds]:
    """(CAR's codes without de-dup, TIGER's with the de-dup level appended), seeded."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, k, size=(num_items, levels))
    extra, size = dedup_level(codes)
    pad = np.zeros((1, levels + 1), dtype=np.int64)
    car = SemanticIds(np.concatenate([pad[:, :levels], codes]), [k] * levels, {"dedup": False})
    tiger = SemanticIds(np.concatenate([pad, np.concatenate([codes, extra[:, None]], 1)]), [k] * levels + [size],
                        {"dedup": True})
    return car, tiger


def brief_train(model: torch.nn.Module, examples: Examples, steps: int, batch: int, lr: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        idx = rng.integers(0, len(examples), batch)
        loss = model(torch.from_numpy(examples.history[idx]), torch.from_numpy(examples.target[idx]))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def measure(model, batches, k: int, **kwargs) -> dict:
    model.eval()
    with torch.no_grad():
        model.recommend(batches[0][0], k, **kwargs)  # warm-up (allocator, first-call overheads)
    return evaluate_model(model, batches, ks=(k,), device="cpu", **kwargs)


def kv_cache_kb_per_user(model, history: torch.Tensor, k: int, **kwargs) -> float | None:
    """KB per user of the KV caches one ``recommend`` call holds at its end; None for a model that keeps none."""
    caches = []
    stacks = [m for m in model.modules() if isinstance(m, TransformerStack)]
    for stack in stacks:  # catch every cache the stacks hand out (an instance attribute shadows the method)
        stack.new_cache = lambda make=stack.new_cache: caches.append(make()) or caches[-1]
    try:
        with torch.no_grad():
            model.recommend(history, k, **kwargs)
    finally:
        for stack in stacks:
            del stack.new_cache
    return sum(c.nbytes for c in caches) / history.shape[0] / 1024 if caches else None


def recommend_rows(run: str, workers: list[int], k: int, batch_size: int, out_dir: str) -> list[dict]:
    """One row per worker count: users/s of the batch recommendation job for ``run`` (outputs under ``out_dir``)."""
    from genrec_dist.ray_recommend import run_recommend
    from genrec_dist.tracking import NullTracker
    from genrec_dist.runs.find import run_own_config

    rows = []
    for n in workers:
        overrides = [f"k={k}", f"num_workers={n}", f"batch_size={batch_size}", f"output={out_dir}/recommend-{n}"]
        cfg, run_dir, _ = run_own_config(load_config(None, overrides, "recommend"), run, overrides, "recommend")
        s = run_recommend(cfg, run_dir, overrides, tracking=lambda *a, **k: NullTracker())
        meta = json.loads(open(os.path.join(s["output"], "manifest.json")).read())
        rows.append({"model": f"recommend {meta['model']}", "workers": n, "users": s["users"],
                     "users_per_s": s["users_per_s"], "seconds": s["seconds"], "k": k, "batch_size": batch_size,
                     "inference": meta["inference_overrides"] or "exported"})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--config", default=os.path.join(REPO, "configs", "synthetic.yaml"))
    ap.add_argument("--dataset", default="", help="a prepared dataset dir (default: prepare the config's into tmp)")
    ap.add_argument("--sids", default="", help="a committed semantic-ID dir (default: random codes)")
    ap.add_argument("--widths", default="10,20,50,100")
    ap.add_argument("--users", type=int, default=1024, help="test users timed (first N of the split)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--k", type=int, default=10, help="items recommended per user")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on a shared machine)")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds over all rows; the median is reported")
    ap.add_argument("--train-steps", type=int, default=0, help="brief training per model (0: untrained)")
    ap.add_argument("--recommend-run", default="", help="a trained run (dir, name or MLflow id) for the recommend "
                    "row: users/s of jobs/recommend.py over its dataset's users")
    ap.add_argument("--recommend-workers", default="1,2", help="worker counts of the recommend row")
    ap.add_argument("--recommend-only", action="store_true", help="only the recommend row (needs --recommend-run)")
    ap.add_argument("--out", default="", help="result JSON (default: benchmarks/results/inference.json; with "
                    "--recommend-only inference_recommend.json)")
    ap.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = ap.parse_args()
    if args.recommend_only:
        if not args.recommend_run:
            raise SystemExit("--recommend-only needs --recommend-run")
        with tempfile.TemporaryDirectory() as tmp:
            rec = recommend_rows(args.recommend_run, [int(w) for w in args.recommend_workers.split(",")], args.k,
                                 args.batch_size, tmp)
        table = recommend_table(rec)
        print(f"\n# batch recommendations of {args.recommend_run}, k={args.k}\n{table}")
        out = args.out or os.path.join(REPO, "benchmarks", "results", "inference_recommend.json")
        write_result(out, {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "env": _env("cuda" if torch.cuda.is_available() else "cpu"), "recommend": rec,
                           "args": _portable(vars(args)), "table": table})
        return
    torch.set_num_threads(args.threads)
    widths = [int(w) for w in args.widths.split(",")]
    if min(widths) < args.k:
        raise SystemExit(f"--k {args.k} must not exceed the smallest beam width {min(widths)}")

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(args.config, [f"workdir={tmp}", *args.overrides])
        if args.dataset:
            cfg.paths.dataset = args.dataset
        else:
            from genrec_dist.data.prepare import run_prepare

            run_prepare(cfg)
        dataset = Dataset.open(cfg.dataset_dir, cfg.storage)
        seqs = dataset.sequences()
        # CAR and TIGER share one history length here (both model.<name>.max_history default to 20)
        hist = model_history("car", cfg.model.car.max_history, dataset)
        model_history("tiger", cfg.model.tiger.max_history, dataset)
        test = eval_examples(seqs, hist, "test")
        test = test.take(np.arange(min(args.users, len(test))))
        batches = [(torch.from_numpy(h), torch.from_numpy(t)) for h, t in eval_batches(test, args.batch_size)]
        train = train_examples(seqs, hist) if args.train_steps else None
        n = dataset.num_items
        if args.sids:
            car_sids = tiger_sids = read_semantic_ids(args.sids, cfg.storage)  # CAR drops a de-dup level itself
            codes_desc = f"{args.sids} ({tiger_sids.num_levels} levels {tiger_sids.codebook_sizes})"
        else:
            car_sids, tiger_sids = random_sids(n, cfg.tokenize.levels, cfg.tokenize.codebook_size, cfg.seed)
            codes_desc = f"random {cfg.tokenize.levels} x {cfg.tokenize.codebook_size} (+ de-dup level for TIGER)"

        ar_cfg = copy.deepcopy(cfg.model)
        ar_cfg.car.mode = "ar"
        torch.manual_seed(cfg.seed)
        models = {"car": build_model("car", cfg.model, n, car_sids),
                  "car-ar": build_model("car", ar_cfg, n, car_sids),
                  "tiger": build_model("tiger", cfg.model, n, tiger_sids)}
        if train is not None:
            for name, m in models.items():
                brief_train(m, train, args.train_steps, 256, cfg.train.lr, cfg.seed)

        cases = [(label, name, width, {**kw, "beam_width": width}) for width in widths
                 for label, name, kw in (("CAR fast", "car", {"inference": "fast"}),
                                         ("CAR slow", "car", {"inference": "slow"}),
                                         ("CAR AR beam", "car-ar", {}), ("TIGER beam", "tiger", {}))]
        # Rounds over all cases (not all repeats of one case in a row), median per case: a burst of load from
        # another process then hits every row alike instead of one.
        runs: dict[int, list[dict]] = {i: [] for i in range(len(cases))}
        for rnd in range(args.repeats):
            for i, (label, name, width, kwargs) in enumerate(cases):
                m = measure(models[name], batches, args.k, **kwargs)
                runs[i].append(m)
                print(f"  round {rnd + 1}/{args.repeats} {label:12s} width {width:4d}: {m['users_per_s']:9.1f} "
                      f"users/s {m['latency_ms_per_user']:8.3f} ms/user", flush=True)
        rows = []
        for i, (label, name, width, kwargs) in enumerate(cases):
            med = {key: float(np.median([m[key] for m in runs[i]]))
                   for key in ("users_per_s", "latency_ms_per_user", "latency_ms_per_user_p95")}
            m = runs[i][0]
            cache_kb = kv_cache_kb_per_user(models[name], batches[0][0], args.k, **kwargs)
            rows.append({"model": label, "beam_width": width, "users": int(m["users"]), **med,
                         "kv_cache_kb_per_user": cache_kb,
                         "users_per_s_rounds": [m2["users_per_s"] for m2 in runs[i]],
                         f"recall@{args.k}": m[f"recall@{args.k}"], f"ndcg@{args.k}": m[f"ndcg@{args.k}"]})
        rec = recommend_rows(args.recommend_run, [int(w) for w in args.recommend_workers.split(",")], args.k,
                             args.batch_size, tmp) if args.recommend_run else []

    fast = {r["beam_width"]: r["users_per_s"] for r in rows if r["model"] == "CAR fast"}
    head = ["model", "beam width", "users/s", "ms/user", "ms/user p95", "CAR fast speed-up", "KV cache KB/user"]
    if args.train_steps:
        head += [f"R@{args.k}", f"N@{args.k}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], str(r["beam_width"]), f"{r['users_per_s']:.1f}", f"{r['latency_ms_per_user']:.3f}",
                 f"{r['latency_ms_per_user_p95']:.3f}", f"{fast[r['beam_width']] / r['users_per_s']:.1f}x",
                 "-" if r["kv_cache_kb_per_user"] is None else f"{r['kv_cache_kb_per_user']:.0f}"]
        if args.train_steps:
            cells += [f"{r[f'recall@{args.k}']:.4f}", f"{r[f'ndcg@{args.k}']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    if rec:
        table += f"\n\n# batch recommendations (jobs/recommend.py) of {args.recommend_run}\n{recommend_table(rec)}"
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    env = _env()
    print(f"\n# inference speed, {len(test)} test users of {os.path.basename(args.config)} ({n} items), batch "
          f"{args.batch_size}, k={args.k}, codes: {codes_desc}; "
          f"{'untrained' if not args.train_steps else f'{args.train_steps} training steps'}; params {params}; "
          f"{env['processor']} x{env['torch_threads']} threads\n{table}")
    out = args.out or os.path.join(REPO, "benchmarks", "results", "inference.json")
    write_result(out, {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "env": env, "rows": rows,
                       "args": _portable(vars(args)), "num_items": n, "codes": codes_desc, "parameters": params,
                       "model_config": to_dict(cfg.model), "recommend": rec, "table": table})


def _env(device: str = "cpu") -> dict:
    """The machine; ``device``: where the rows ran (the model rows on CPU; the recommend row on a GPU if one)."""
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "device": device}


def recommend_table(rows: list[dict]) -> str:
    lines = ["| model | workers | users | users/s | seconds |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['workers']} | {r['users']} | {r['users_per_s']:.1f} | {r['seconds']:.1f} |"
              for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
