"""UNGER Stage I driver (``tokenize.method=unger``): text embeddings + training sequences -> the embeddings that
residual k-means turns into unified codes, plus the §4.3 modality-share measure.

:func:`run_stage1` is called by :func:`tokenization.pipeline.run_tokenize` between embedding and quantisation. The
model (DIN + AdaLN adapter + Eq. 3-5) is :mod:`tokenization.unger_stage1`; this module owns the compact
training loop, the ablation sources of UNGER Table 7 (``tokenize.unger.source``) and Eq. 18-19.

Why a compact single-process loop and not the DeepSpeed trainer: Stage I is a ~(N x 96) embedding table plus two
small MLPs trained on sampled softmax (EAGER: minutes on one GPU). It runs inside the tokenize job (a Ray job), on
the GPU of the process when there is one; data parallelism would only add a process-group launch to a job that is
dominated by embedding the catalog.

Saved next to the codes (for Stage II's IKD, :mod:`genrec_dist.models.unger`): ``integrated_embeddings.npy``
(N+1, D) float32, row i = item i (row 0 zeros), named by ``manifest["item_embeddings"]``. A run that trains the
DIN-only model (sources collab and concat, and unified's modality-share reference) also saves its item embeddings,
``din_reference.npy``, with the settings that determine them in ``manifest["din_reference"]``; a later run given
``tokenize.unger.reference_path`` reuses them instead of training the same DIN again (Table 7 needs it four times).
A unified run also saves its CKA-trained model's two item tables, ``stage1_collab.npy`` (the DIN item embeddings)
and ``stage1_adapted.npy`` (MAL of the text embeddings), settings in ``manifest["stage1_model"]``; a later unified
run given ``tokenize.unger.stage1_path`` reads them back, so every ``integrated`` reading can be quantised from one
trained Stage I.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch

from genrec_dist import storage
from genrec_dist.data import examples
from genrec_dist.errors import ConfigError
from tokenization.unger_stage1 import DINStage1, integrate

ITEM_EMBEDDINGS_FILE = "integrated_embeddings.npy"
REFERENCE_FILE = "din_reference.npy"
STAGE1_FILES = {"collab": "stage1_collab.npy", "adapted": "stage1_adapted.npy"}  # the CKA model's item tables
Log = Callable[[str], None]


@dataclass
class Stage1Result:
    embeddings: np.ndarray  # (N, D) float32, rows = items 1..N: what k-means quantises
    stats: dict = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------------------------

def din_batches(cfg: Any, dataset: Any, max_history: int) -> tuple[int, Iterable[examples.Examples]]:
    """Stage I's training examples (every prefix of each training sequence -> its next item) and their endless stream
    of shuffled ``tokenize.unger.batch_size`` batches, read as training reads its own: from the dataset's shards in
    chunks of ``train.chunk_rows`` users, shuffled within windows of ``train.shuffle_buffer`` examples
    (genrec_dist/data/examples.py), so memory follows those settings and not the catalog. An epoch drops the rows
    that do not fill a batch."""
    tc, bs = cfg.train, int(cfg.tokenize.unger.batch_size)
    source = examples.ExampleSource(examples.rank_chunks(dataset, 0, 1, "global", tc.chunk_rows), max_history, "train",
                             storage_cfg=cfg.storage)
    n = len(source)
    if n < bs:
        raise ConfigError(f"tokenize.unger.batch_size={bs}: the dataset {dataset.path} has only {n} training "
                          f"examples for UNGER Stage I (lower the batch size)")
    plan = examples.BatchPlan(source.sizes, bs, 1, 1, 0, cfg.seed, "global", tc.shuffle_buffer)
    steps = examples.steps_per_epoch([n], bs)
    return n, (micro for _, (micro,) in examples.iterate(source, plan, examples.Cursor(), steps))


def train_din(model: DINStage1, batches: Iterable[examples.Examples], steps: int, lr: float, weight_decay: float,
              device: torch.device, log: Log | None = None, log_every: int = 500) -> dict[str, float]:
    """Adam (amsgrad, as EAGER's train_din.py) over ``steps`` of ``batches``; returns the mean loss parts of the
    last ``log_every`` steps. The fused kernel: the default loop makes parameter-sized temporaries each step, and
    the item table has N rows (about 430 MB each at 1.1M items, d 96)."""
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay, amsgrad=True, fused=True)
    window: dict[str, list[float]] = {}
    for step, batch in zip(range(1, steps + 1), batches):
        out = model(torch.from_numpy(batch.history).to(device), torch.from_numpy(batch.target).to(device))
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        for k, v in out.items():
            window.setdefault(k, []).append(float(v.detach()))
        if step % log_every == 0 or step == steps:
            means = {k: float(np.mean(v)) for k, v in window.items()}
            if log:
                log(f"unger stage I step {step}/{steps}: " + " ".join(f"{k} {v:.4f}" for k, v in sorted(means.items())))
            if step < steps:
                window = {}
    model.eval()
    return {k: float(np.mean(v)) for k, v in window.items()}


# ----------------------------------------------------------------------------------------------------------------
# ablation sources and the modality share
# ----------------------------------------------------------------------------------------------------------------

def l2_normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def pca(x: np.ndarray, dim: int) -> np.ndarray:
    """Rows of ``x`` (N, D) projected on their first ``dim`` principal components (N, dim)."""
    x = np.asarray(x, dtype=np.float64)
    xc = x - x.mean(0, keepdims=True)
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    return (xc @ vt[:dim].T).astype(np.float32)


def concat_embeddings(semantic: np.ndarray, collab: np.ndarray) -> np.ndarray:
    """UNGER §4.3 concatenation baseline: PCA of the semantic embeddings to the collaborative size, both
    L2-normalised per item, concatenated -> (N, 2 D_c)."""
    return np.concatenate([l2_normalise(pca(semantic, collab.shape[1])), l2_normalise(collab)], axis=1)


def _similarity_logp(x: np.ndarray, temperature: float) -> np.ndarray:
    """Per item, the log-distribution over the other items of softmax(cos / t): (M, M), diagonal excluded."""
    xn = torch.from_numpy(l2_normalise(np.asarray(x, dtype=np.float64)))
    s = xn @ xn.T / temperature
    s.fill_diagonal_(float("-inf"))
    return torch.log_softmax(s, dim=1).numpy()


def modality_share(final: np.ndarray, semantic: np.ndarray, collab: np.ndarray, sample: int = 2048, seed: int = 0,
                   temperature: float = 0.1) -> dict[str, float]:
    """UNGER §4.3, Eq. 18-19 (our reading; the equations are not in our copy of the text): how much the final
    embeddings' geometry resembles each modality's.

    The three matrices may have different widths, so each is compared through the distribution it induces over
    items: for item i, ``P_X(i) = softmax_j(cos(x_i, x_j) / t)`` over a seeded sample of items (j != i). Then
    ``KL_m = mean_i KL(P_final(i) || P_m(i))`` (Eq. 18) and the relative similarity of modality m is the share of
    its inverse divergence, ``(1 / KL_m) / (1 / KL_sem + 1 / KL_col)`` (Eq. 19). Shares sum to 1."""
    n = final.shape[0]
    rows = np.sort(np.random.default_rng([seed, 18]).choice(n, size=min(sample, n), replace=False))
    off = ~np.eye(len(rows), dtype=bool)  # an item is not its own neighbour (-inf log-prob on the diagonal)
    p_f = np.where(off, _similarity_logp(final[rows], temperature), 0.0)
    out = {}
    for name, ref in (("semantic", semantic), ("collab", collab)):
        p_m = np.where(off, _similarity_logp(ref[rows], temperature), 0.0)
        out[f"kl_{name}"] = float((np.exp(p_f) * (p_f - p_m) * off).sum(1).mean())
    inv_s, inv_c = 1.0 / max(out["kl_semantic"], 1e-12), 1.0 / max(out["kl_collab"], 1e-12)
    out["share_semantic"] = inv_s / (inv_s + inv_c)
    out["share_collab"] = inv_c / (inv_s + inv_c)
    return out


# ----------------------------------------------------------------------------------------------------------------
# the stage
# ----------------------------------------------------------------------------------------------------------------

def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def stage1_history(cfg: Any, dataset: Any) -> int:
    """Stage I's DIN reads the histories Stage II will (``model.unger.max_history``, 20: UNGER §4.1.1), checked
    against what the dataset keeps."""
    from genrec_dist.config import model_history

    return model_history("unger", int(cfg.model.unger.max_history), dataset)


def din_settings(cfg: Any, dataset: Any, semantic_dim: int, device: torch.device) -> dict[str, Any]:
    """Everything the DIN-only model's embeddings depend on: its hyper-parameters, the seed, the training data (the
    dataset manifest's hash) and what changes its random stream (the width of the unused adapter, the device type)."""
    uc = cfg.tokenize.unger
    keys = ("dim", "num_negatives", "next_weight", "steps", "batch_size", "lr", "weight_decay")
    return {**{k: getattr(uc, k) for k in keys}, "seed": cfg.seed, "semantic_dim": int(semantic_dim),
            # the batch order (din_batches)
            "chunk_rows": int(cfg.train.chunk_rows), "shuffle_buffer": int(cfg.train.shuffle_buffer),
            "device": device.type, "num_items": int(dataset.num_items), "max_history": stage1_history(cfg, dataset),
            "dataset": dataset.fingerprint}


def stage1_settings(cfg: Any, dataset: Any, semantic_dim: int, device: torch.device) -> dict[str, Any]:
    """:func:`din_settings` plus what the CKA term adds (Eq. 3, 5): everything the unified model's tables depend on.
    ``integrated`` is not among them: it only reads the trained tables."""
    uc = cfg.tokenize.unger
    return {**din_settings(cfg, dataset, semantic_dim, device), "cka_weight": uc.cka_weight,
            "temperature": uc.temperature, "similarity": uc.similarity}


def _read_saved(option: str, path: str, key: str, missing: str, want: dict[str, Any], storage_cfg: Any
                ) -> dict[str, np.ndarray]:
    """The tables (N+1, D) an earlier unger run at ``path`` saved under ``manifest[key]``, refused, naming each
    differing field, unless saved with the settings ``want``."""
    where = f"tokenize.unger.{option}={path}"
    manifest = storage.require_manifest(path, storage_cfg)
    saved = manifest.get(key)
    if not saved:
        raise ConfigError(f"{where}: {missing}")
    diff = [f"{k}: {saved['settings'].get(k)!r} there, {v!r} here" for k, v in want.items()
            if saved["settings"].get(k) != v]
    if diff:
        raise ConfigError(f"{where}: that model was trained with other settings, so it is not this run's ("
                         + "; ".join(diff) + ")")
    files = saved["files"] if "files" in saved else {"collab": saved["file"]}
    out = {}
    for name, file in files.items():
        emb = np.load(io.BytesIO(storage.read_bytes(storage.join(path, file), storage_cfg)))
        if emb.shape != (want["num_items"] + 1, want["dim"]):
            raise ValueError(f"{path}/{file}: shape {emb.shape}, need {(want['num_items'] + 1, want['dim'])}")
        out[name] = emb
    return out


def read_reference(path: str, want: dict[str, Any], storage_cfg: Any = None) -> np.ndarray:
    """The DIN-only embeddings (N+1, D) saved by the unger run at ``path``, refused unless saved with ``want``."""
    return _read_saved("reference_path", path, "din_reference", "that run saved no DIN-only model (it was "
                       "source=semantic, or unified with modality_share=false)", want, storage_cfg)["collab"]


def read_stage1(path: str, want: dict[str, Any], storage_cfg: Any = None) -> dict[str, np.ndarray]:
    """The CKA-trained model's ``collab`` and ``adapted`` tables saved by the unified run at ``path``."""
    return _read_saved("stage1_path", path, "stage1_model", "that run saved no CKA-trained Stage I model (only "
                       "source=unified runs do)", want, storage_cfg)


def _npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(x, dtype=np.float32))
    return buf.getvalue()


def run_stage1(cfg: Any, dataset: Any, semantic: np.ndarray, log: Log = print) -> Stage1Result:
    """Stage I for ``cfg.tokenize.unger`` on ``semantic`` (N+1, D) float32, row i = item i's text embedding, row 0
    zeros (what ``embedding_store.read_rows(..., lead=1)`` reads; used in place, never copied): returns the
    embeddings to quantise (rows = items 1..N), stats, the integrated-embedding file and the manifest keys pointing
    at it."""
    uc = cfg.tokenize.unger
    t0 = time.time()
    n = dataset.num_items
    if semantic.ndim != 2 or semantic.shape[0] != n + 1 or semantic.dtype != np.float32:
        raise ValueError(f"UNGER Stage I: text embeddings {semantic.dtype} {semantic.shape}, need float32 "
                         f"(num_items + 1 = {n + 1}, D) with row 0 the padding")
    sem = semantic  # row = item id
    stats: dict[str, Any] = {"source": uc.source}
    device = _device(uc.device)

    def din(cka_weight: float) -> DINStage1:
        num_examples, batches = din_batches(cfg, dataset, stage1_history(cfg, dataset))
        torch.manual_seed(cfg.seed)
        model = DINStage1(n, torch.from_numpy(sem), uc.dim, num_negatives=uc.num_negatives,
                          temperature=uc.temperature, similarity=uc.similarity, next_weight=uc.next_weight,
                          cka_weight=cka_weight)
        log(f"unger stage I: DIN (cka_weight {cka_weight}) on {num_examples} training examples, {uc.steps} steps, "
            f"device {device}")
        final = train_din(model, batches, uc.steps, uc.lr, uc.weight_decay, device, log, uc.log_every)
        stats.update({f"{'din' if cka_weight == 0 else 'stage1'}.{k}": v for k, v in final.items()})
        return model

    settings = din_settings(cfg, dataset, sem.shape[1], device)
    cka_settings = stage1_settings(cfg, dataset, sem.shape[1], device)
    files: dict[str, bytes] = {}
    manifest: dict[str, Any] = {}

    reused = None  # read before any training, so a mismatched reference fails in seconds, not after Stage I
    if uc.reference_path and (uc.source in ("collab", "concat") or (uc.source == "unified" and uc.modality_share)):
        reused = read_reference(uc.reference_path, settings, cfg.storage)
    tables = None
    if uc.stage1_path:
        if uc.source != "unified":
            raise ConfigError(f"tokenize.unger.stage1_path: only source=unified reads a Stage I model, not "
                             f"{uc.source!r}")
        tables = read_stage1(uc.stage1_path, cka_settings, cfg.storage)

    def reference() -> np.ndarray:
        """The DIN-only item embeddings: read from ``reference_path``, or trained here and saved."""
        if reused is not None:
            log(f"unger stage I: DIN-only model reused from {uc.reference_path}")
            stats["din_reference"] = uc.reference_path
            return reused
        emb = din(0.0).embeddings("collab").cpu().numpy()
        files[REFERENCE_FILE] = _npy(emb)
        manifest["din_reference"] = {"file": REFERENCE_FILE, "settings": settings}
        return emb

    collab = None
    if uc.source == "semantic":
        full = sem
    elif uc.source == "unified":
        if tables is not None:
            log(f"unger stage I: CKA-trained model reused from {uc.stage1_path}")
            stats["stage1_model"] = uc.stage1_path
        else:
            model = din(uc.cka_weight)
            tables = {k: model.embeddings(k).cpu().numpy() for k in STAGE1_FILES}
            files.update({STAGE1_FILES[k]: _npy(v) for k, v in tables.items()})
            manifest["stage1_model"] = {"files": STAGE1_FILES, "settings": cka_settings}
        full = integrate(*(torch.from_numpy(tables[k]) for k in ("collab", "adapted")), uc.integrated).numpy()
        if uc.modality_share:
            collab = reference()
    else:  # collab, concat: DIN alone
        collab = reference()
        full = collab if uc.source == "collab" else np.concatenate(
            [np.zeros((1, 2 * uc.dim), np.float32), concat_embeddings(sem[1:], collab[1:])])
    full = np.asarray(full, dtype=np.float32)
    full[0] = 0.0
    if uc.modality_share and uc.source in ("unified", "concat"):
        # Table 6 compares both fusions against the same references, so a unified run reports concat's share too.
        finals = {uc.source: full[1:]}
        if uc.source == "unified":
            finals["concat"] = concat_embeddings(sem[1:], collab[1:])
        for name, final in finals.items():
            share = modality_share(final, sem[1:], collab[1:], uc.share_sample, cfg.seed)
            stats["modality_share" if name == uc.source else f"modality_share_{name}"] = share
            log(f"unger modality share ({name}): semantic {share['share_semantic']:.2%}, "
                f"collaborative {share['share_collab']:.2%} (UNGER Table 6: concat 97.33/2.67, UNGER 59.89/40.11)")
    stats["dim"] = int(full.shape[1])
    stats["seconds"] = time.time() - t0
    return Stage1Result(
        embeddings=full[1:],
        stats=stats,
        files={ITEM_EMBEDDINGS_FILE: _npy(full), **files},
        manifest={"item_embeddings": ITEM_EMBEDDINGS_FILE, "unger_source": uc.source, "item_embeddings_dim":
                  int(full.shape[1]), **({"unger_integrated": uc.integrated} if uc.source == "unified" else {}),
                  **manifest},
    )


def flat_metrics(stats: dict) -> dict[str, float]:
    """``unger.*`` numbers for MLflow (losses, modality shares)."""
    out = {}
    for k, v in stats.items():
        if isinstance(v, dict):
            out.update({f"unger.{k}.{kk}": float(vv) for kk, vv in v.items() if isinstance(vv, (int, float))})
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"unger.{k}"] = float(v)
    return out
