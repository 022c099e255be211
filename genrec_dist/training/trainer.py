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
7. the end (rank 0): :func:`finish`, a short list of named calls (validation choices kept in the export, test
   evaluation, metrics.json, MLflow artifacts and the registered model, reports).
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
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as tdist

from genrec_dist import reports, storage
from genrec_dist.config import model_history
from genrec_dist.data import examples
from genrec_dist.data.dataset import Dataset
from genrec_dist.evaluation.evaluate import evaluate_model
from genrec_dist.evaluation.split import REPORT_USERS, SplitBatches, choose_on_valid, evaluate_split, log_reports
from genrec_dist.models import build_model, needs_semantic_ids, recommend_kwargs, trains_every_position
from genrec_dist.runs.checkpoint import CheckpointStore, latest_complete, tag_of
from genrec_dist.runs.export import Export, model_meta, open_export, semantic_id_files, write_model
from genrec_dist.runs.rundir import RunDir
from genrec_dist.training.dist import RankLostError, RankWatch, init_process_group, world_from_env
from genrec_dist.training.ds_config import client_optimizer, deepspeed_config, micro_batch


def train_worker(cfg: Any, tracking: Callable, run: RunDir | None = None) -> dict[str, Any] | None:
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
    init_process_group(use_cuda, tc.collective_timeout_s)  # reuses a process group a launcher made (Ray Train)
    rank, ws, main = world.rank, world.world_size, world.is_main
    watch = RankWatch.gather(rank, ws)  # who every rank is, to name one that is lost

    def log0(msg: str) -> None:
        if main:
            print(msg, flush=True)

    sync = device if use_cuda else torch.device("cpu")  # where collectives of small tensors run

    # ----- 2. the run ---------------------------------------------------------------------------------------
    decided = [(run or RunDir.resolve(cfg)) if main else None]  # read once, resume checked
    tdist.broadcast_object_list(decided, src=0)
    run = decided[0]
    store = CheckpointStore(run.checkpoints, run.staging, rank, node_leader=world.local_rank == 0,
                            barrier=tdist.barrier, storage_cfg=cfg.storage, world_size=ws)
    dataset = Dataset.open(cfg.dataset_dir, cfg.storage)
    H = model_history(tc.model, getattr(cfg.model, tc.model).max_history, dataset)  # SASRec 50, SID models 20
    tracker = tracking(cfg, "train", rank, run_name=run.name,
                       extra_tags={**dataset.tags(), "genrec.run_dir": run.path, "genrec.model": tc.model},
                       run_id=run.meta.get("mlflow_run_id"), spool_dir=run.path)
    inputs = _start_run(run, cfg, tracker, dataset) if main else {}
    log0(f"run {run.name} ({'resuming' if run.resuming else 'new'}) in {run.path}; world {ws}; device {device}")

    # ----- 3. data ------------------------------------------------------------------------------------------
    data = _Data.plan(cfg, dataset, H, rank, ws)
    log0(data.summary)

    # ----- 4. model + DeepSpeed -------------------------------------------------------------------------------
    sids, sids_dir = _codes(cfg, tracker, dataset, inputs, main and not run.resuming)
    sids_files = semantic_id_files(sids_dir, cfg.storage) if sids_dir and main else None  # what every export carries
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (ZeRO-3 partitions each rank's copy)
    model = build_model(tc.model, cfg.model, dataset.num_items, sids)
    rec_kwargs = recommend_kwargs(model, cfg.evaluate.beam_width, cfg.evaluate.score_block)  # how validation ranks
    n_params = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
    validates = bool(data.eval_every or tc.eval_every_s)
    # the plain copy validation loads weights into; none without validation (one item table less at 1M items)
    eval_model = copy.deepcopy(model).to(device).eval() if validates else None
    ds_cfg = deepspeed_config(dataclasses.replace(tc, warmup_steps=data.warmup), ws, use_cuda, data.total_steps)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=client_optimizer(tc, model.parameters(), use_cuda),
        model_parameters=model.parameters(), config=ds_cfg)
    torch.manual_seed(cfg.seed + 1000 * (rank + 1))  # dropout streams differ per rank
    if main and not run.resuming:
        tracker.log_params({"world_size": ws, "micro_batch": data.micro_batch, "steps_per_epoch": data.spe,
                            "total_steps": data.total_steps, "num_parameters": n_params,
                            "deepspeed_config": json.dumps(ds_cfg, sort_keys=True)})

    # ----- 5. resume ----------------------------------------------------------------------------------------
    state = _Progress.resume(store, engine, run, log0)

    # ----- 6. the loop --------------------------------------------------------------------------------------
    engine.train()
    batches = examples.iterate(data.train, data.batch_plan, state.cursor, data.spe)
    clock, step0, meter = _TrainClock(state.trained_s), state.step, _Meter(tc.batch_size)
    valid_at = clock.seconds()  # training seconds at the last validation (train.eval_every_s)
    with _naming_lost_ranks(watch, cfg, run, state):  # a failed collective: one error naming the lost rank
        while state.step < data.total_steps and state.stopped_by == "max_steps":
            _, micro = next(batches)
            parts, grad_norm = _train_step(engine, micro, device)
            state.step += 1
            meter.tick()
            state.cursor = state.cursor.advance(data.spe)
            over_budget, eval_due = _budget_flags(tc, clock.seconds(), valid_at, sync)
            last = state.step == data.total_steps or over_budget
            if state.step % tc.log_every == 0 or state.step == 1 or last:
                metrics = meter.metrics(_allreduce_means(parts, torch.device("cpu")), scheduler, engine, grad_norm,
                                        state.cursor.epoch, _peak_memory_mb(device), clock.seconds())
                tracker.log(metrics, state.step)
                state.history.append({"step": state.step, **metrics})
                log0(f"step {state.step}/{data.total_steps} loss {metrics['train/loss']:.5f} lr "
                     f"{metrics['train/lr']:.2e} {metrics['train/samples_per_s']:.0f} samples/s")
            if validates and ((data.eval_every and state.step % data.eval_every == 0) or eval_due or last):
                with clock.paused():
                    vm, weights = _validate(engine, eval_model, data.valid, cfg, device, sync, rec_kwargs)
                    if state.improves(vm[tc.early_stop_metric]) and main:
                        _export(cfg, run, weights, dataset.num_items, sids_dir, sids_files, state.step, vm)
                del weights  # a whole copy of the weights; the next validation makes its own
                tracker.log({f"valid/{k}": v for k, v in vm.items()} | {"valid/best": state.best}, state.step)
                valid_at = clock.seconds()
                state.history.append({"step": state.step, "elapsed_s": valid_at,
                                      **{f"valid/{k}": v for k, v in vm.items()}})
                log0(f"valid step {state.step}: {tc.early_stop_metric} {vm[tc.early_stop_metric]:.5f} (best "
                     f"{state.best:.5f} at step {state.best_step})")
                if tc.patience and state.bad_evals >= tc.patience:
                    log0(f"early stop: no better {tc.early_stop_metric} in {state.bad_evals} validations")
                    state.stopped_by = "patience"
            if over_budget and state.stopped_by == "max_steps":
                log0(f"budget: {tc.budget_s:.0f} s of training crossed at step {state.step}")
                state.stopped_by = "budget"
            if (tc.checkpoint_every and state.step % tc.checkpoint_every == 0 and state.step < data.total_steps
                    and state.stopped_by == "max_steps"):
                with clock.paused():
                    store.save(engine, state.step, state.to_checkpoint(run.name, clock.seconds()),
                               tc.keep_checkpoints)
                log0(f"checkpoint saved: step {state.step} -> {run.checkpoints}/{tag_of(state.step)}")
        if state.best_step == 0:  # never validated: the final weights are the export
            weights = consolidated_state_dict(engine)
            if main:
                _export(cfg, run, weights, dataset.num_items, sids_dir, sids_files, state.step, {})
                state.best_step = state.step
            del weights
        tdist.barrier()
    # The end reads the best model back from its export: what training held goes first (weights, gradients and
    # optimizer moments in the engine, the validation copy, the shuffle window), so rank 0's peak is the larger of
    # the loop's and the evaluation's, not their sum.
    engine.destroy()
    engine = model = eval_model = scheduler = batches = micro = None
    gc.collect()

    # ----- 7. the end: test evaluation on rank 0 ------------------------------------------------------------
    if not main:
        return None
    summary = finish(cfg, dataset, run, tracker, state.history, state.best_step, state.best, device,
                     {"steps": state.step, "stopped_by": state.stopped_by, "budget_s": tc.budget_s,
                      "train_s": clock.seconds(), "paused_s": clock.paused_s, "history_length": H,
                      "threads": torch.get_num_threads(), "warmup_steps": data.warmup, "steps_per_epoch": data.spe,
                      "samples_per_s": tc.batch_size * (state.step - step0)
                      / max(clock.seconds() - state.trained_s, 1e-9)})
    tracker.close("FINISHED")
    return summary


# ----------------------------------------------------------------------------------------------------------------
# the steps' parts
# ----------------------------------------------------------------------------------------------------------------

def _start_run(run: RunDir, cfg: Any, tracker: Any, dataset: Dataset) -> dict[str, str]:
    """Rank 0: the run's files (config.yaml for a new run, run.json) and, for a new run, its config and dataset in
    MLflow; returns what it trains on (:meth:`RunDir.start`)."""
    inputs = run.start(cfg, tracker.run_id)
    if not run.resuming:
        tracker.log_config(cfg)
        tracker.log_input(**dataset.input_spec(), context="training")
    return inputs


def _codes(cfg: Any, tracker: Any, dataset: Dataset, inputs: dict[str, str], log_them: bool) -> tuple[Any, Any]:
    """``(semantic IDs, their dir)`` of a SID model (``(None, None)`` otherwise); with ``log_them`` (rank 0 of a new
    run) the codes are an MLflow input of the run and their stats an artifact."""
    if not needs_semantic_ids(cfg.train.model):
        return None, None
    from genrec_dist.data.semantic_ids import CODES_SCHEMA, read_semantic_ids

    sids_dir = cfg.semantic_ids_dir
    sids = read_semantic_ids(sids_dir, cfg.storage)
    if log_them and "semantic_ids_sha256" in inputs:
        name = f"{dataset.input_spec()['name']}-sids-{os.path.basename(sids_dir.rstrip('/'))}"
        profile = {"items": int(sids.codes.shape[0]) - 1, "codebook_sizes": [int(k) for k in sids.codebook_sizes]}
        tracker.log_input(name, sids_dir, inputs["semantic_ids_sha256"], "training", CODES_SCHEMA, profile)
        stats = storage.join(sids_dir, "stats.json")
        if storage.exists(stats, cfg.storage):
            tracker.log_text(storage.read_bytes(stats, cfg.storage).decode(), "semantic_ids/stats.json")
    return sids, sids_dir


@dataclass
class _Data:
    """This rank's training and validation examples and the schedule they give (the same on every rank)."""

    train: Any
    valid: Any
    kind: str  # windows | prefixes
    micro_batch: int
    spe: int  # steps per epoch
    total_steps: int
    eval_every: int
    warmup: int
    batch_plan: Any
    summary: str  # what rank 0 prints

    @classmethod
    def plan(cls, cfg: Any, dataset: Dataset, H: int, rank: int, ws: int) -> _Data:
        tc = cfg.train
        mb = micro_batch(tc, ws)
        kind = tc.examples if tc.examples != "auto" else (
            "windows" if trains_every_position(tc.model, cfg.model) else "prefixes")
        # streamed chunk by chunk: a rank holds one shuffle window of examples, never all of them
        train = examples.ExampleSource(examples.rank_chunks(dataset, rank, ws, tc.data_split, tc.chunk_rows), H,
                                       "train", kind, cfg.storage)
        # validation: every user on exactly one rank (in global mode too), each rank scores its share
        valid = examples.ExampleSource(examples.rank_chunks(dataset, rank, ws, "shards", tc.chunk_rows), H, "valid",
                                       storage_cfg=cfg.storage, seen=cfg.evaluate.filter_seen)
        usable = torch.tensor([len(train) // ws if tc.data_split == "global" else len(train)])
        tdist.all_reduce(usable, op=tdist.ReduceOp.MIN)
        spe = examples.steps_per_epoch([int(usable)], mb * tc.grad_accum)
        total = tc.max_steps if tc.max_steps > 0 else max(1, tc.epochs) * spe
        eval_every = tc.eval_every or (max(1, round(spe * tc.eval_every_epochs)) if tc.eval_every_epochs else 0)
        warmup = round(spe * tc.warmup_epochs) if tc.warmup_epochs else tc.warmup_steps
        plan = examples.BatchPlan(train.sizes, mb, tc.grad_accum, ws, rank, cfg.seed, tc.data_split,
                                  tc.shuffle_buffer)
        summary = (f"data: {len(train)} training examples ({kind}) in {len(train.sizes)} chunks on rank 0, micro "
                   f"batch {mb} x grad_accum {tc.grad_accum} x world {ws} = {tc.batch_size}; {spe} steps/epoch; "
                   f"{total} steps")
        return cls(train, valid, kind, mb, spe, total, eval_every, warmup, plan, summary)


@dataclass
class _Progress:
    """Where the run stands: step, data cursor, early-stopping state, the logged rows; a checkpoint's state."""

    step: int = 0
    cursor: Any = dataclasses.field(default_factory=examples.Cursor)
    best: float = float("-inf")
    best_step: int = 0
    bad_evals: int = 0
    history: list = dataclasses.field(default_factory=list)  # every logged row since step 1 (history.json)
    trained_s: float = 0.0  # training seconds before this process (a resumed run keeps counting its budget)
    stopped_by: str = "max_steps"

    @classmethod
    def resume(cls, store: CheckpointStore, engine: Any, run: RunDir, log0: Callable) -> _Progress:
        """The newest complete checkpoint's state loaded into ``engine`` (weights, optimizer, lr schedule, RNG
        states), or a fresh start."""
        if run.latest_step is None:
            if run.resuming:
                log0(f"no complete checkpoint under {run.checkpoints}: starting {run.name} from step 0")
            return cls()
        s = store.load(engine, run.latest_step)
        out = cls(int(s["step"]), examples.Cursor.from_dict(s["cursor"]), float(s["best"]), int(s["best_step"]),
                  int(s["bad_evals"]), list(s.get("history", [])), float(s.get("train_s", 0.0)))
        log0(f"resumed from {run.checkpoints}/{tag_of(out.step)} (epoch {out.cursor.epoch}, step "
             f"{out.cursor.step})")
        return out

    def improves(self, value: float) -> bool:
        """Record a validation value; whether it is the best so far (patience counts the others)."""
        if value > self.best:
            self.best, self.best_step, self.bad_evals = value, self.step, 0
            return True
        self.bad_evals += 1
        return False

    def to_checkpoint(self, run_name: str, train_s: float) -> dict[str, Any]:
        return {"step": self.step, "cursor": self.cursor.to_dict(), "best": self.best, "best_step": self.best_step,
                "bad_evals": self.bad_evals, "run_name": run_name, "history": self.history, "train_s": train_s}


@contextlib.contextmanager
def _naming_lost_ranks(watch: RankWatch, cfg: Any, run: RunDir, state: _Progress):
    """A collective that lost its peer (a rank's process or its whole node is gone: gloo's "Connection closed by
    peer", or train.collective_timeout_s passed) ends the job with one line: which rank, after which step, and how to
    go on from the newest complete checkpoint (cluster/README.md, "When a node dies")."""
    try:
        yield
    except Exception as exc:
        if len(watch.table) <= 1 or not watch.is_loss(exc):
            raise
        latest = latest_complete(run.checkpoints, cfg.storage)
        then = (f"the newest complete checkpoint is step {latest} ({run.checkpoints}): continue with the ranks that "
                f"are left by jobs/train.py --resume {run.name} (same config)" if latest is not None else
                f"it has no complete checkpoint (train.checkpoint_every={cfg.train.checkpoint_every}): start it again")
        said = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RankLostError(f"training lost {watch.lost(exc)} after step {state.step} of run {run.name} ({said}); "
                            f"{then}") from exc


def _export(cfg: Any, run: RunDir, weights: dict[str, torch.Tensor], num_items: int, sids_dir: str | None,
            sids_files: dict[str, bytes] | None, step: int, metrics: dict[str, float]) -> None:
    """Rank 0: commit ``weights`` as the run's export (:mod:`genrec_dist.runs.export`), with the codes it reads."""
    meta = model_meta(cfg.train.model, cfg.model, num_items, sids_dir, step, metrics)
    write_model(storage.join(run.path, "model"), weights, meta, cfg.storage, sids_files)


def _train_step(engine: Any, micro: list, device: torch.device) -> tuple[dict[str, float], float | None]:
    """One optimizer step over its micro batches: ``(mean of each scalar output, grad norm of a stage-0 engine)``."""
    parts: dict[str, float] = {}
    grad_norm = None
    for i, mbatch in enumerate(micro):
        out = engine(torch.from_numpy(mbatch.history).to(device), torch.from_numpy(mbatch.target).to(device))
        engine.backward(out["loss"])
        if i == len(micro) - 1 and engine.zero_optimization_stage() == 0:
            grad_norm = _grad_norm(engine.module)  # ZeRO reports its own; stage 0 does not
        engine.step()  # DeepSpeed updates on the accumulation boundary only
        for k, v in out.items():
            if torch.is_tensor(v) and v.dim() == 0:
                parts[k] = parts.get(k, 0.0) + float(v.detach()) / len(micro)
    return parts, grad_norm


def _validate(engine: Any, eval_model: torch.nn.Module, valid: Any, cfg: Any, device: torch.device,
              sync: torch.device, rec_kwargs: dict[str, Any]) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """All ranks: consolidated weights into the plain copy, each rank scores its users, sums all-reduced. Returns
    the metrics and the weights (what an export writes)."""
    weights = consolidated_state_dict(engine)
    eval_model.load_state_dict(weights)
    batches = (tuple(torch.from_numpy(a) for a in batch)  # (history, target[, seen]), read chunk by chunk
               for batch in examples.stream_batches(valid, cfg.evaluate.batch_size))
    m = evaluate_model(eval_model, batches, cfg.evaluate.ks, device, **rec_kwargs)
    return _allreduce_means(m, sync), weights


def consolidated_state_dict(engine: Any) -> dict[str, torch.Tensor]:
    """A full fp32 CPU copy of the engine's model weights, on every rank. A collective under ZeRO-3
    (``deepspeed.zero.GatheredParameters`` gathers the full tensors on every rank for the copy)."""
    module = engine.module
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}


class _Meter:
    """The logged training row: the step's means, lr, grad norm, samples/s since the last row, epoch, memory."""

    def __init__(self, batch_size: int):
        self.batch_size, self.t_last, self.steps = batch_size, time.perf_counter(), 0

    def metrics(self, means: dict[str, float], scheduler: Any, engine: Any, grad_norm: float | None, epoch: int,
                peak_mb: float, elapsed_s: float) -> dict[str, float]:
        now = time.perf_counter()
        out = {f"train/{k}": v for k, v in means.items()}
        out["train/lr"] = float(scheduler.get_last_lr()[0])
        gn = engine.get_global_grad_norm() if grad_norm is None else grad_norm
        if gn is not None:
            out["train/grad_norm"] = float(gn)
        out["train/samples_per_s"] = self.batch_size * self.steps / max(now - self.t_last, 1e-9)
        out["train/epoch"] = epoch
        out["train/peak_mem_mb"] = peak_mb
        out["train/elapsed_s"] = elapsed_s
        self.t_last, self.steps = now, 0
        return out

    def tick(self) -> None:
        self.steps += 1


# ----------------------------------------------------------------------------------------------------------------
# 7. the end (rank 0)
# ----------------------------------------------------------------------------------------------------------------

def finish(cfg: Any, dataset: Dataset, run: RunDir, tracker: Any, history_log: list,
           best_step: int, best: float, device: torch.device, loop: dict[str, Any] | None = None) -> dict[str, Any]:
    """Rank 0, once training has ended: test metrics of the exported model and of most-popular, metrics.json,
    MLflow artifacts and model, the table. ``loop``: how the loop ran (steps, what stopped it, seconds, samples/s),
    kept in metrics.json."""
    export = open_export(run.path, cfg.storage)
    model = export.model.to(device)
    chosen = keep_validation_choices(export, dataset, cfg, tracker, best_step, device)
    # the history the model trained with (checked against this dataset when the run started)
    batches = SplitBatches(dataset, cfg, cfg.evaluate.split, int(model.cfg.max_history))
    results = {**evaluate_split(model, dataset, cfg, batches, device), "split": cfg.evaluate.split,
               "best_step": best_step, "best_valid": best, "run_name": run.name, "chosen_on_valid": chosen,
               **({"loop": loop} if loop else {})}
    first = batches.first(REPORT_USERS)
    record_results(cfg, run, tracker, results, history_log, model, first[0][:2], best_step)
    title = f"{cfg.evaluate.split} split, best model of step {best_step}"
    log_reports(tracker, model, dataset, cfg, results, cfg.train.model, export.sids and export.sids.codes, first,
                device, title)
    table = reports.format_results({cfg.train.model: results["model"], "most-popular": results["most_popular"]},
                                   cfg.evaluate.ks)
    print(f"\n# {title}\n{table}", flush=True)
    return {"run_name": run.name, "run_dir": run.path, "mlflow_run_id": tracker.run_id, **results}


def keep_validation_choices(export: Export, dataset: Dataset, cfg: Any, tracker: Any, step: int,
                            device: torch.device) -> dict[str, dict[str, Any]]:
    """The model's validation choices (CAR's ``slow_weight``, :func:`choose_on_valid`), written into its export so
    every later job ranks the same way, and logged."""
    chosen = choose_on_valid(export.model, dataset, cfg, device)
    if not chosen:
        return chosen
    export.keep_choices(chosen, cfg.storage)
    tracker.log({f"valid/{k}_chosen": float(c["chosen"]) for k, c in chosen.items()}
                | {f"valid/{k}_{v}/{c['metric']}": m for k, c in chosen.items() for v, m in c["valid"].items()}, step)
    for k, c in chosen.items():
        print(f"{k} chosen on the validation split: {c['chosen']} ({c['metric']} "
              + ", ".join(f"{v}: {m:.5f}" for v, m in c["valid"].items()) + ")", flush=True)
    return chosen


def record_results(cfg: Any, run: RunDir, tracker: Any, results: dict[str, Any], history_log: list,
                   model: torch.nn.Module, example: torch.Tensor, step: int) -> None:
    """The run's results: ``metrics.json`` and ``history.json`` in the run dir; in MLflow the test metrics, the run's
    files, its export (as artifacts and as a registered MLflow model, :mod:`genrec_dist.serving`; ``example``: the
    histories of its input example) and the curves."""
    files = {"metrics.json": (json.dumps(results, indent=2, sort_keys=True) + "\n").encode(),
             "history.json": json.dumps(history_log).encode()}
    for name, data in files.items():
        storage.write_bytes(storage.join(run.path, name), data, cfg.storage)
    split = cfg.evaluate.split
    tracker.log({f"{split}/{k}": v for k, v in results["model"].items()}
                | {f"{split}_most_popular/{k}": v for k, v in results["most_popular"].items()}, step)
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in {**files, "run.json": run.record}.items():
            with open(os.path.join(tmp, name), "wb") as fh:
                fh.write(data)
            tracker.log_artifact(os.path.join(tmp, name))
        fs, model_path = storage.filesystem(storage.join(run.path, "model"), cfg.storage)
        if storage.is_remote(run.path):
            fs.get(model_path, os.path.join(tmp, "model"), recursive=True)
            model_path = os.path.join(tmp, "model")
        tracker.log_artifact(model_path, "model")
        if tracker.run_id is not None:
            from genrec_dist import serving

            examples = [[int(i) for i in h if i] for h in example.tolist()]
            tracker.log_model(serving.save_model(model_path, os.path.join(tmp, "mlflow-model"), examples, model),
                              serving.registered_name(cfg.name, cfg.train.model), step=step)
        tracker.log_artifact(reports.plot_curves(history_log, os.path.join(tmp, "curves.png")), "reports")


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
