"""The per-worker training function: one process of a run, whichever launcher started it.

``train_worker(cfg)`` runs the same way as the only process (``python jobs/train.py``), as one rank of a
``deepspeed`` launch (one node or ``--hostfile``), or inside a Ray Train worker (``train.launcher=ray``): the
launcher only decides the environment it reads (:mod:`genrec_dist.training.dist`). Top to bottom:

1. who am I (rank, world), device, process group (gloo on CPU, NCCL on GPU);
2. the run: new or resumed (``train.resume``), its directory, MLflow run (rank 0 only);
3. data: this rank's examples, streamed (:mod:`genrec_dist.data.examples`) and the epoch length shared by every rank;
4. model (same seed on every rank) wrapped by ``deepspeed.initialize`` (config: :mod:`ds_config`);
5. resume: weights, optimizer, lr schedule, RNG states and data cursor from the newest complete checkpoint;
6. the loop: forward/backward/step per micro batch, metrics every ``log_every`` steps, validation every
   ``eval_every`` steps (all ranks, each on its share of users, sums all-reduced) with early stopping on NDCG@10,
   the best model exported as one consolidated artifact, checkpoints every ``checkpoint_every`` steps;
7. the end (rank 0): test evaluation of the best model and of the most-popular baseline, metrics.json, MLflow.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import json
import os
import tempfile
import time
from typing import Any, Callable

import torch
import torch.distributed as tdist

from genrec_dist import reports, storage
from genrec_dist.data import examples as D
from genrec_dist.data.dataset import Dataset
from genrec_dist.evaluation.evaluate import evaluate_model, format_results
from genrec_dist.models import build_model, needs_semantic_ids, trains_every_position
from genrec_dist.training import checkpoint as ckpt
from genrec_dist.training import runs
from genrec_dist.training.dist import init_process_group, world_from_env
from genrec_dist.training.ds_config import client_optimizer, deepspeed_config, micro_batch
from genrec_dist.evaluation.run import (SplitBatches, choose_on_valid, evaluate_split, load_exported, log_reports,
                                       model_history, recommend_kwargs)
from genrec_dist.training.export import (consolidated_state_dict, model_meta, model_semantic_ids, semantic_id_files,
                                         write_model)


def train_worker(cfg: Any, tracking: Callable, run: runs.RunDir | None = None) -> dict[str, Any] | None:
    """Train ``cfg.train.model`` as this process's rank. Returns the run summary on rank 0, None elsewhere.
    ``tracking`` (the job's, e.g. ``genrec_dist.tracking.make_tracker``) makes this rank's tracker once the run is
    known (MLflow on rank 0, a null tracker elsewhere). ``run``: the run a launcher resolved already (the Ray
    driver); else rank 0 resolves it from ``cfg``."""
    import deepspeed

    tc = cfg.train
    # ----- 1. who am I ------------------------------------------------------------------------------------------
    world = world_from_env()
    use_cuda = tc.device == "cuda" or (tc.device == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{world.local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    # Reuses a process group a launcher made already (Ray Train), else creates it from the env variables.
    init_process_group(use_cuda)
    rank, ws, main = world.rank, world.world_size, world.is_main

    def log0(msg: str) -> None:
        if main:
            print(msg, flush=True)

    # ----- 2. the run ---------------------------------------------------------------------------------------
    decided = [(run or runs.RunDir.resolve(cfg)) if main else None]  # read once, resume checked
    tdist.broadcast_object_list(decided, src=0)
    run = decided[0]
    run_name, resuming, run_dir, ckpt_root = run.name, run.resuming, run.path, run.checkpoints
    store = ckpt.CheckpointStore(ckpt_root, run.staging, rank,
                                 node_leader=world.local_rank == 0, barrier=tdist.barrier, storage_cfg=cfg.storage)
    resume_step = run.latest_step

    dataset = Dataset.open(cfg.dataset_dir, cfg.storage)
    H = model_history(cfg, tc.model, dataset)  # the model's own history length (SASRec 50, the SID models 20)
    tracker = tracking(cfg, "train", rank, run_name=run_name,
                           extra_tags={**dataset.tags(), "genrec.run_dir": run_dir, "genrec.model": tc.model},
                           run_id=run.meta.get("mlflow_run_id"), spool_dir=run_dir)
    inputs: dict[str, str] = {}
    if main:
        inputs = run.start(cfg, tracker.run_id)  # config.yaml (a new run) and run.json
        if not resuming:
            tracker.log_config(cfg)
            tracker.log_input(**dataset.input_spec(), context="training")
    log0(f"run {run_name} ({'resuming' if resuming else 'new'}) in {run_dir}; world {ws}; device {device}")

    # ----- 3. data ------------------------------------------------------------------------------------------
    examples = tc.examples if tc.examples != "auto" else (
        "windows" if trains_every_position(tc.model, cfg.model) else "prefixes")
    # streamed chunk by chunk: a rank holds one shuffle window of examples, never all of them
    train_src = D.ExampleSource(D.rank_chunks(dataset, rank, ws, tc.data_split, tc.chunk_rows), H, "train",
                                examples, cfg.storage)
    # validation: every user on exactly one rank (in global mode too), each rank scores its share
    valid_src = D.ExampleSource(D.rank_chunks(dataset, rank, ws, "shards", tc.chunk_rows), H, "valid",
                                storage_cfg=cfg.storage, seen=cfg.evaluate.filter_seen)
    mb = micro_batch(tc, ws)
    usable = torch.tensor([len(train_src) // ws if tc.data_split == "global" else len(train_src)])
    tdist.all_reduce(usable, op=tdist.ReduceOp.MIN)
    spe = D.steps_per_epoch([int(usable)], mb * tc.grad_accum)
    total_steps = tc.max_steps if tc.max_steps > 0 else max(1, tc.epochs) * spe
    eval_every = tc.eval_every or (max(1, round(spe * tc.eval_every_epochs)) if tc.eval_every_epochs else 0)
    warmup = round(spe * tc.warmup_epochs) if tc.warmup_epochs else tc.warmup_steps
    plan = D.BatchPlan(train_src.sizes, mb, tc.grad_accum, ws, rank, cfg.seed, tc.data_split, tc.shuffle_buffer)
    log0(f"data: {len(train_src)} training examples ({examples}) in {len(train_src.sizes)} chunks on rank 0, "
         f"micro batch {mb} x grad_accum {tc.grad_accum} x world {ws} = {tc.batch_size}; {spe} steps/epoch; "
         f"{total_steps} steps")

    # ----- 4. model + DeepSpeed -------------------------------------------------------------------------------
    sids, sids_dir = None, None
    if needs_semantic_ids(tc.model):
        from genrec_dist.data.semantic_ids import read_semantic_ids

        sids_dir = cfg.semantic_ids_dir
        sids = read_semantic_ids(sids_dir, cfg.storage)
    # the codes every export of this run carries (read once, now: the ones this model trains on)
    sids_files = semantic_id_files(sids_dir, cfg.storage) if sids_dir and main else None
    if sids is not None and main and not resuming and "semantic_ids_sha256" in inputs:  # the codes: an input too
        from genrec_dist.data.semantic_ids import CODES_SCHEMA

        name = f"{dataset.input_spec()['name']}-sids-{os.path.basename(sids_dir.rstrip('/'))}"
        profile = {"items": int(sids.codes.shape[0]) - 1, "codebook_sizes": [int(k) for k in sids.codebook_sizes]}
        tracker.log_input(name, sids_dir, inputs["semantic_ids_sha256"], "training", CODES_SCHEMA, profile)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (ZeRO-3 partitions each rank's copy)
    model = build_model(tc.model, cfg.model, dataset.num_items, sids)
    n_params = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
    validates = bool(eval_every or tc.eval_every_s)
    # the plain copy validation loads weights into; none without validation (one item table less at 1M items)
    eval_model = copy.deepcopy(model).to(device).eval() if validates else None
    ds_cfg = deepspeed_config(dataclasses.replace(tc, warmup_steps=warmup), ws, use_cuda, total_steps)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=client_optimizer(tc, model.parameters(), use_cuda),
        model_parameters=model.parameters(), config=ds_cfg)
    torch.manual_seed(cfg.seed + 1000 * (rank + 1))  # dropout streams differ per rank
    if main and not resuming:
        tracker.log_params({"world_size": ws, "micro_batch": mb, "steps_per_epoch": spe, "total_steps": total_steps,
                            "num_parameters": n_params, "deepspeed_config": json.dumps(ds_cfg, sort_keys=True)})
        if sids_dir:
            stats = storage.join(sids_dir, "stats.json")
            if storage.exists(stats, cfg.storage):
                tracker.log_text(storage.read_bytes(stats, cfg.storage).decode(), "semantic_ids/stats.json")

    # ----- 5. resume ----------------------------------------------------------------------------------------
    step, cursor, best, best_step, bad_evals = 0, D.Cursor(), float("-inf"), 0, 0
    trained_s = 0.0  # training seconds before this process (a resumed run keeps counting its budget)
    history_log: list[dict[str, Any]] = []  # every logged row since step 1: history.json and the curves
    if resume_step is not None:
        state = store.load(engine, resume_step)
        step, cursor = int(state["step"]), D.Cursor.from_dict(state["cursor"])
        best, best_step, bad_evals = float(state["best"]), int(state["best_step"]), int(state["bad_evals"])
        history_log = list(state.get("history", []))
        trained_s = float(state.get("train_s", 0.0))
        log0(f"resumed from {ckpt_root}/{ckpt.tag_of(step)} (epoch {cursor.epoch}, step {cursor.step})")
    elif resuming:
        log0(f"no complete checkpoint under {ckpt_root}: starting {run_name} from step 0")

    rec_kwargs = recommend_kwargs(model, cfg.evaluate.beam_width, cfg.evaluate.score_block)

    def validate() -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """All ranks: consolidated weights into the plain copy, each rank scores its users, sums all-reduced."""
        state = consolidated_state_dict(engine)
        eval_model.load_state_dict(state)
        batches = (tuple(torch.from_numpy(a) for a in batch)  # (history, target[, seen]), read chunk by chunk
                   for batch in D.stream_batches(valid_src, tc.eval_batch_size))
        m = evaluate_model(eval_model, batches, cfg.evaluate.ks, device, **rec_kwargs)
        return _allreduce_means(m, device if use_cuda else torch.device("cpu")), state

    # ----- 6. the loop --------------------------------------------------------------------------------------
    engine.train()
    batches = D.iterate(train_src, plan, cursor, spe)
    t_last, steps_since = time.perf_counter(), 0
    clock, step0, stopped_by, CPU = _TrainClock(trained_s), step, "max_steps", torch.device("cpu")
    valid_at = clock.seconds()  # training seconds at the last validation (train.eval_every_s)
    stop = False
    while step < total_steps and not stop:
        _, micro = next(batches)
        parts: dict[str, float] = {}
        grad_norm = None
        for i, mbatch in enumerate(micro):
            history = torch.from_numpy(mbatch.history).to(device)  # (mb, H)
            target = torch.from_numpy(mbatch.target).to(device)  # (mb,)
            out = engine(history, target)
            engine.backward(out["loss"])
            if i == len(micro) - 1 and engine.zero_optimization_stage() == 0:
                grad_norm = _grad_norm(engine.module)  # ZeRO reports its own; stage 0 does not
            engine.step()  # DeepSpeed updates on the accumulation boundary only
            for k, v in out.items():
                if torch.is_tensor(v) and v.dim() == 0:
                    parts[k] = parts.get(k, 0.0) + float(v.detach()) / len(micro)
        step += 1
        steps_since += 1
        cursor = cursor.advance(spe)
        over_budget, eval_due = _budget_flags(tc, clock.seconds(), valid_at, device if use_cuda else CPU)
        last = step == total_steps or over_budget

        if step % tc.log_every == 0 or step == 1 or last:
            means = _allreduce_means(parts, torch.device("cpu"))
            now = time.perf_counter()
            metrics = {f"train/{k}": v for k, v in means.items()}
            metrics["train/lr"] = float(scheduler.get_last_lr()[0])
            gn = engine.get_global_grad_norm() if grad_norm is None else grad_norm
            if gn is not None:
                metrics["train/grad_norm"] = float(gn)
            metrics["train/samples_per_s"] = tc.batch_size * steps_since / max(now - t_last, 1e-9)
            metrics["train/epoch"] = cursor.epoch
            metrics["train/peak_mem_mb"] = _peak_memory_mb(device)
            metrics["train/elapsed_s"] = clock.seconds()
            t_last, steps_since = now, 0
            tracker.log(metrics, step)
            history_log.append({"step": step, **metrics})
            log0(f"step {step}/{total_steps} loss {metrics['train/loss']:.5f} lr {metrics['train/lr']:.2e} "
                 f"{metrics['train/samples_per_s']:.0f} samples/s")

        if validates and ((eval_every and step % eval_every == 0) or eval_due or last):
            with clock.paused():
                vm, state = validate()
            value = vm[tc.early_stop_metric]
            if value > best:
                best, best_step, bad_evals = value, step, 0
                if main:
                    with clock.paused():
                        write_model(storage.join(run_dir, "model"), state,
                                    model_meta(tc.model, cfg.model, dataset.num_items, sids_dir, step, vm),
                                    cfg.storage, sids_files)
            else:
                bad_evals += 1
            del state  # a whole copy of the weights; the next validation makes its own
            tracker.log({f"valid/{k}": v for k, v in vm.items()} | {"valid/best": best}, step)
            valid_at = clock.seconds()
            history_log.append({"step": step, "elapsed_s": valid_at,
                                **{f"valid/{k}": v for k, v in vm.items()}})
            log0(f"valid step {step}: {tc.early_stop_metric} {value:.5f} (best {best:.5f} at step {best_step})")
            if tc.patience and bad_evals >= tc.patience:
                log0(f"early stop: no better {tc.early_stop_metric} in {bad_evals} validations")
                stop, stopped_by = True, "patience"
        if over_budget and not stop:
            log0(f"budget: {tc.budget_s:.0f} s of training crossed at step {step}")
            stop, stopped_by = True, "budget"

        if tc.checkpoint_every and step % tc.checkpoint_every == 0 and step < total_steps and not stop:
            with clock.paused():
                store.save(engine, step, {"step": step, "cursor": cursor.to_dict(), "best": best,
                                          "best_step": best_step, "bad_evals": bad_evals, "run_name": run_name,
                                          "history": history_log, "train_s": clock.seconds()}, tc.keep_checkpoints)
            log0(f"checkpoint saved: step {step} -> {ckpt_root}/{ckpt.tag_of(step)}")

    if best_step == 0:  # never validated: the final weights are the export
        state = consolidated_state_dict(engine)
        if main:
            write_model(storage.join(run_dir, "model"), state,
                        model_meta(tc.model, cfg.model, dataset.num_items, sids_dir, step, {}), cfg.storage,
                        sids_files)
            best_step = step
        del state
    tdist.barrier()
    # The end reads the best model back from its export: what training held goes first (weights, gradients and
    # optimizer moments in the engine, the validation copy, the shuffle window), so rank 0's peak is the larger of
    # the loop's and the evaluation's, not their sum.
    engine.destroy()
    # (the last micro batches are views into the window; rebinding works whether or not the loop ran)
    engine = model = eval_model = scheduler = batches = micro = mbatch = history = target = out = None
    gc.collect()

    # ----- 7. the end: test evaluation on rank 0 ------------------------------------------------------------
    if not main:
        return None
    summary = finish(cfg, dataset, run_name, run_dir, tracker, history_log, best_step, best, device,
                     {"steps": step, "stopped_by": stopped_by, "budget_s": tc.budget_s, "train_s": clock.seconds(),
                      "paused_s": clock.paused_s, "history_length": H, "threads": torch.get_num_threads(),
                      "warmup_steps": warmup, "steps_per_epoch": spe,
                      "samples_per_s": tc.batch_size * (step - step0) / max(clock.seconds() - trained_s, 1e-9)})
    tracker.close("FINISHED")
    return summary


def finish(cfg: Any, dataset: Dataset, run_name: str, run_dir: str, tracker: Any, history_log: list,
           best_step: int, best: float, device: torch.device, loop: dict[str, Any] | None = None) -> dict[str, Any]:
    """Rank 0: test metrics of the exported model and of most-popular, metrics.json, MLflow artifacts, table.
    ``loop``: how the loop ran (steps, what stopped it, seconds, samples/s), kept in metrics.json."""
    tc = cfg.train
    model, meta = load_exported(run_dir, cfg.storage)
    model.to(device)
    model_dir = storage.join(run_dir, "model")
    sids_dir = model_semantic_ids(model_dir, meta, cfg.storage)
    chosen = choose_on_valid(model, dataset, cfg, device)
    if chosen:  # kept in the export, so jobs/evaluate.py ranks the same way
        meta["model_config"][tc.model].update({k: c["chosen"] for k, c in chosen.items()})
        write_model(model_dir, {k: v.detach().cpu() for k, v in model.state_dict().items()},
                    {**meta, "chosen_on_valid": chosen}, cfg.storage,
                    semantic_id_files(sids_dir, cfg.storage) if sids_dir else None)
        tracker.log({f"valid/{k}_chosen": float(c["chosen"]) for k, c in chosen.items()}
                    | {f"valid/{k}_{v}/{c['metric']}": m for k, c in chosen.items() for v, m in c["valid"].items()},
                    best_step)
        for k, c in chosen.items():
            print(f"{k} chosen on the validation split: {c['chosen']} ({c['metric']} "
                  + ", ".join(f"{v}: {m:.5f}" for v, m in c["valid"].items()) + ")", flush=True)
    results = evaluate_split(model, dataset, cfg, cfg.evaluate.split, device)
    results = {"model": results["model"], "most_popular": results["most_popular"],
               "split": cfg.evaluate.split, "best_step": best_step, "best_valid": best, "run_name": run_name,
               "chosen_on_valid": chosen, **({"loop": loop} if loop else {})}
    storage.write_bytes(storage.join(run_dir, "metrics.json"),
                        (json.dumps(results, indent=2, sort_keys=True) + "\n").encode(), cfg.storage)
    storage.write_bytes(storage.join(run_dir, "history.json"), json.dumps(history_log).encode(), cfg.storage)
    split = cfg.evaluate.split
    tracker.log({f"{split}/{k}": v for k, v in results["model"].items()}
                | {f"{split}_most_popular/{k}": v for k, v in results["most_popular"].items()}, best_step)
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("metrics.json", "history.json", "run.json"):
            with open(os.path.join(tmp, name), "wb") as fh:
                fh.write(storage.read_bytes(storage.join(run_dir, name), cfg.storage))
            tracker.log_artifact(os.path.join(tmp, name))
        fs, model_path = storage.filesystem(storage.join(run_dir, "model"), cfg.storage)
        if storage.is_remote(run_dir):
            fs.get(model_path, os.path.join(tmp, "model"), recursive=True)
            model_path = os.path.join(tmp, "model")
        tracker.log_artifact(model_path, "model")
        if tracker.run_id is not None:  # the export as an MLflow model, registered (genrec_dist/serving.py)
            from genrec_dist import serving

            # the input example: the first two users' histories (read from the first chunk, not every sequence)
            history = next(iter(SplitBatches(dataset, cfg, split, int(model.cfg.max_history), 2)))[0]
            examples = [[int(i) for i in h if i] for h in history.tolist()]
            tracker.log_model(serving.save_model(model_path, os.path.join(tmp, "mlflow-model"), examples, model),
                              serving.registered_name(cfg.name, tc.model), step=best_step)
        tracker.log_artifact(reports.plot_curves(history_log, os.path.join(tmp, "curves.png")), "reports")
    log_reports(tracker, model, dataset, cfg, results, tc.model, sids_dir, device,
                f"{split} split, best model of step {best_step}")
    table = format_results({tc.model: results["model"], "most-popular": results["most_popular"]},
                           cfg.evaluate.ks)
    print(f"\n# {split} split, best model of step {best_step}\n{table}", flush=True)
    return {"run_name": run_name, "run_dir": run_dir, "mlflow_run_id": tracker.run_id, **results}


class _TrainClock:
    """Training seconds of the loop: wall time less validations and checkpoints (:meth:`paused` around them), so a
    budget measures the model's training, not how often the harness validates it."""

    def __init__(self, before: float = 0.0):
        self.before, self.start, self.paused_s = before, time.perf_counter(), 0.0

    def seconds(self) -> float:
        return self.before + time.perf_counter() - self.start - self.paused_s

    @contextlib.contextmanager
    def paused(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - t0


def _budget_flags(tc: Any, trained: float, valid_at: float, device: torch.device) -> tuple[bool, bool]:
    """``(over train.budget_s, validation due by train.eval_every_s)`` at ``trained`` training seconds, as rank 0's
    clock says (broadcast, so every rank stops and validates at the same step); no collective when neither is set."""
    if not tc.budget_s and not tc.eval_every_s:
        return False, False
    flags = torch.tensor([float(bool(tc.budget_s) and trained >= tc.budget_s),
                          float(bool(tc.eval_every_s) and trained - valid_at >= tc.eval_every_s)], device=device)
    tdist.broadcast(flags, src=0)
    return bool(flags[0]), bool(flags[1])


def _peak_memory_mb(device: torch.device) -> float:
    """Peak memory of the busiest rank: allocated GPU memory, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        import resource

        mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    peak = torch.tensor([mb], dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    tdist.all_reduce(peak, op=tdist.ReduceOp.MAX)
    return float(peak)


def _grad_norm(module: torch.nn.Module) -> float:
    """Global L2 norm of the (already all-reduced, unclipped) gradients of a stage-0 engine's module."""
    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


def _allreduce_means(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Mean of each value over ranks (one all-reduce). Validation means are weighted by each rank's ``users``."""
    keys = sorted(values)
    if "users" in values:  # evaluation: weight each rank's means by its user count, sum the counts
        users = values["users"]
        vec = torch.tensor([values[k] * users if k != "users" else users for k in keys], dtype=torch.float64,
                           device=device)
        tdist.all_reduce(vec)
        total = float(vec[keys.index("users")])
        return {k: (float(v) if k == "users" else float(v) / max(total, 1.0)) for k, v in zip(keys, vec)}
    vec = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    tdist.all_reduce(vec)
    return {k: float(v) / tdist.get_world_size() for k, v in zip(keys, vec)}
