"""The ``train:``, ``evaluate:``, ``recommend:`` and ``serve:`` sections.

Paper defaults, cited where set: Adam, lr 1e-3, batch 256, linear warm-up over 2000 steps from lr 1e-7, weight decay
1e-7 (UNGER Table 4, the same values as EAGER's released ``train_rec.py``; TIGER §4 trains with batch 256).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from genrec_dist.models import ModelName

# Field metadata read by genrec_dist/config.py: a job's flag (``--model car``), a location a job writes (must be
# absolute under a Ray job's working_dir), a field that does not identify a run (``--resume`` may change it).
SHORTHAND = {"shorthand": True}
OUTPUT = {"output": True}
INPUT = {"input": True}  # a location a job reads (a relative one is refused under ray job submit --working-dir)
NOT_RUN = {"identifies_run": False}

@dataclass
class TrainConfig:
    """How one training run is launched, batched, optimised, validated, checkpointed and exported."""

    model: ModelName = field(default="tiger", metadata=SHORTHAND)  # a registered model (genrec_dist.models)
    # local: this process is the whole world (world 1) or one rank started by `deepspeed`/`torchrun`;
    # ray: the job starts a Ray Train TorchTrainer whose workers each run the same per-worker function.
    launcher: Literal["local", "ray"] = "local"
    num_workers: int = 2                 # Ray Train workers (launcher=ray)
    ray_address: str = ""                # ray.init address for launcher=ray; "" = RAY_ADDRESS or a new local Ray
    device: Literal["auto", "cpu", "cuda"] = "auto"

    # ----- DeepSpeed (turned into its config dict by genrec_dist/training/ds_config.py) -----
    zero_stage: int = 0                  # 0, 1, 2 or 3
    # A collective that waits longer than this for a rank fails the job, naming the rank (a node whose link went
    # down sends no error; torch waits 30 minutes by default). Longer than any one rank's work alone (an export).
    collective_timeout_s: float = 600.0
    # Global batch = micro batch x grad_accum x world size; the micro batch is derived from it, so the same
    # config gives the same optimisation at any world size. Papers: 256 (TIGER §4, UNGER Table 4).
    batch_size: int = 256
    grad_accum: int = 1
    grad_clip: float = 1.0               # max global grad norm; 0 = off (not given by the papers)
    optimizer: Literal["adam", "adamw"] = "adam"   # "Adam" in TIGER §4 / UNGER Table 4
    lr: float = 1e-3                     # UNGER Table 4
    # Adam's second-moment decay (betas = (0.9, adam_beta2)): 0.999 is Adam's default; 0.98 is eSASRec's
    # (Tikhonovich et al., RecSys 2025; the Transformer's, Vaswani et al. 2017 §5.3)
    adam_beta2: float = 0.999
    warmup_steps: int = 2000             # UNGER Table 4 (linear, from warmup_min_lr)
    warmup_min_lr: float = 1e-7          # UNGER Table 4
    # > 0: the warm-up lasts this many epochs instead of warmup_steps (a step count means more or fewer epochs on
    # another dataset or batch size; a short budget must not end inside the warm-up)
    warmup_epochs: float = 0.0
    weight_decay: float = 1e-7           # UNGER Table 4
    # warmup: constant lr after warm-up (UNGER Table 4); warmup_decay: then linear decay to 0 at the last step.
    lr_schedule: Literal["warmup", "warmup_decay"] = "warmup"

    # ----- length -----
    max_steps: int = 1000                # optimizer steps; 0 = run `epochs` epochs
    epochs: int = 0
    # Wall-clock training budget (seconds; 0 = none): the loop stops after the step that crosses it, validates there
    # as at the last step, and the best model on validation is tested as usual. Counts training only (validations
    # and checkpoints are paused), so every model gets the same compute whatever the validation cadence or decoder
    # (benchmarks/leaderboard.py).
    budget_s: float = 0.0

    # ----- data -----
    # shards: each rank reads only its own shard files (rows split by rank when ranks > shards), shuffled per rank.
    # global: every rank reads every shard and takes its slice of one global batch order, so a global batch is the
    #         same examples at any world size (loss curves comparable step by step; small data and tests).
    data_split: Literal["shards", "global"] = "shards"
    # prefixes: every prefix of a training sequence is an example (TIGER §4.1's protocol: each next item once as the
    #           target of its own history). windows: non-overlapping windows of H items, for models whose loss reads
    #           every position (CAR with all_positions): the same transitions, each once, in ~1/mean-length the steps.
    # auto: windows for such models, else prefixes.
    examples: Literal["auto", "prefixes", "windows"] = "auto"
    # Examples stream from the Parquet shards in chunks of at most chunk_rows users; an epoch's order shuffles the
    # chunks, then the examples within windows of at most shuffle_buffer examples (genrec_dist/data/examples.py).
    # A window of H = 20 int64 histories costs ~170 B per example: 1M examples ~ 170 MB, the data memory of a rank.
    chunk_rows: int = 4096
    shuffle_buffer: int = 1_000_000

    # ----- validation, early stopping, checkpoints -----
    eval_every: int = 200                # steps between validations (NDCG@10 on the validation split); 0 = never
    # Also validate once this many training seconds passed since the last validation (0 = steps only), so a model
    # under a wall-clock budget gets several validations whatever its speed.
    eval_every_s: float = 0.0
    # Validate every this many epochs when eval_every is 0 (1.0 = once an epoch, whatever the dataset's size: what
    # eSASRec's benchmark does, Tikhonovich et al., RecSys 2025); 0 = by steps only.
    eval_every_epochs: float = 0.0
    early_stop_metric: str = "ndcg@10"
    patience: int = 5                    # validations without improvement before stopping; 0 = never stop early
    log_every: int = 10                  # steps between logged training metrics
    checkpoint_every: int = 500          # steps between checkpoints; 0 = never
    checkpoint_dir: str = field(default="", metadata=OUTPUT)  # "" = <run dir>/checkpoints; may be s3://...
    keep_checkpoints: int = 2            # complete checkpoints kept (older ones deleted)
    # "" = <model>-<UTC time>; the run dir is <runs dir>/<run name>
    run_name: str = field(default="", metadata=NOT_RUN)
    # "" = a new run; "latest" = the newest run of this model under the runs dir; else a run name or run dir.
    resume: str = field(default="", metadata=NOT_RUN)


@dataclass
class EvaluateConfig:
    """Leave-one-out evaluation of an exported model over the full catalog."""

    ks: list[int] = field(default_factory=lambda: [5, 10, 20])   # Recall/NDCG@{5,10,20} (TIGER §4.1, UNGER §4.1)
    # Constrained beam-search width for TIGER/UNGER/CAR-AR (the rule: genrec_dist.models.recommend_kwargs): 0 = the
    # model's own ``model.<name>.beam_width`` (UNGER Table 4: 100); > 0 replaces it. Validation during training
    # reads this section too (beam width, batch_size: users per model call, score_block).
    beam_width: int = 0
    batch_size: int = 256
    split: Literal["test", "valid"] = "test"
    # Full-catalog ranking scores this many items at a time with a running top-k merge, so memory is one
    # (batch_size, score_block) float32 matrix (256 x 65536 = 64 MiB) whatever the catalog size; 0 = one block.
    score_block: int = 65536
    # Evaluate only the first max_users users of the split, in the dataset's user order (ids are given in the order
    # of the raw user keys, unrelated to activity): a bounded check of a very large dataset. 0 = every user, as the
    # papers report; a partial evaluation says so in its output ("users").
    max_users: int = 0
    # Remove each user's already-seen items (every item before the target, not only the last max_history) from the
    # ranking, on validation and test. Off: the papers' protocol (TIGER §4.1, UNGER, CAR rank the full catalog). On:
    # eSASRec's benchmark protocol (Tikhonovich et al., RecSys 2025; RecTools filter_viewed=True). Every table says
    # which protocol it used; compare a published number only with the same protocol.
    filter_seen: bool = False


@dataclass
class RecommendConfig:
    """Batch top-k recommendations of an exported model for a table of users (``jobs/recommend.py``)."""

    k: int = 10
    # Off by default: the shipped lists are then exactly what evaluation scored (leave-one-out ranks the full catalog,
    # the history included) and what the served model returns; on for catalogs where a repeat is never wanted.
    exclude_seen: bool = False
    # "" = the run's prepared dataset, history = each user's whole sequence (recommends the item after the last one);
    # else a Parquet file or folder of ``user, history`` rows (history: list of item ids, oldest first), or s3://.
    users: str = field(default="", metadata=INPUT)
    # "" = <run dir>/recommendations; Parquet shards + manifest.json, or s3://
    output: str = field(default="", metadata=OUTPUT)
    overwrite: bool = False
    batch_size: int = 1024               # users per model call
    num_workers: int = 2                 # Ray actors, each loading the model once (one GPU each when the cluster has)
    # CPUs each actor reserves (and its torch threads); 0 = share the cluster's CPUs but one among the actors, at most
    # a node's worth: one CPU stays free for the read and write tasks (all-CPU actors would leave them none: a hang).
    cpus_per_worker: float = 0.0
    device: Literal["auto", "cpu", "cuda"] = "auto"   # auto: a GPU per actor when the Ray cluster has GPUs
    # Beam width for TIGER/UNGER/CAR-AR, by evaluate.beam_width's rule (genrec_dist.models.recommend_kwargs).
    beam_width: int = 0
    ray_address: str = ""                # "" = RAY_ADDRESS (set by ray job submit) or a new local Ray
    # Times the whole pipeline runs again after a node of the cluster was lost under it (every user again, into the
    # same staged output: shards are named by their users, so nothing is duplicated); 0 = fail at the first loss.
    node_retries: int = 2


@dataclass
class ServeConfig:
    """Online top-k recommendations of an exported model over HTTP on Ray Serve (``jobs/serve.py``): replicas that
    each load the model once, concurrent requests batched into one model call (``@serve.batch``)."""

    host: str = "127.0.0.1"              # where Ray Serve's HTTP proxy listens: 0.0.0.0 for other machines
    port: int = 8000
    app_name: str = "genrec"             # the Serve application (serve status, serve shutdown)
    route_prefix: str = "/"              # /invocations, /ping and /ready under it
    num_replicas: int = 1                # copies of the model, spread over the cluster's nodes by Ray
    # > num_replicas: Ray Serve autoscales between num_replicas and this many, aiming at one full batch waiting on
    # each replica (target_ongoing_requests = max_batch_size); 0 = a fixed num_replicas.
    max_replicas: int = 0
    cpus_per_replica: float = 1.0        # reserved per replica; its torch threads are this, rounded down (at least 1)
    gpus_per_replica: float = 0.0        # > 0: the replica ranks on a GPU (fractions share one)
    # Dynamic batching: concurrent requests wait up to batch_wait_timeout_s for others, and up to max_batch_size users
    # go through the model in one call (a request of several users counts them all; requests whose k or
    # inference settings differ are ranked in separate calls). A request of more users is ranked alone at once.
    max_batch_size: int = 64
    batch_wait_timeout_s: float = 0.002
    # Requests one replica takes at once (Ray Serve's default is 5): at least max_batch_size, or batches never fill.
    max_ongoing_requests: int = 256
    # true: a Ray that jobs/serve.py starts itself (no ray_address, no RAY_ADDRESS) runs Ray Serve's HAProxy ingress:
    # HAProxy forwards HTTP straight to the replicas instead of through Serve's Python proxy actor (Ray Serve 2.60's
    # RAY_SERVE_ENABLE_HA_PROXY and RAY_SERVE_ENABLE_DIRECT_INGRESS feature flags, set for that Ray's processes). Much
    # faster on a small box, but experimental in Ray: one such server per machine (fixed /tmp/haproxy-serve paths).
    # On a cluster the flags are the cluster's: set both =1 in the environment of `ray start` on every node.
    haproxy: bool = False
    access_log: bool = False             # a log line per request from each replica (CPU a busy server can use better)
    blocking: bool = True                # jobs/serve.py waits (Ctrl-C / SIGTERM removes the app); false: deploy, exit
    ray_address: str = ""                # "" = RAY_ADDRESS (set by ray job submit) or a new local Ray
