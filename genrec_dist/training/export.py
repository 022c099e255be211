"""One consolidated model artifact from a DeepSpeed engine (any ZeRO stage), and loading it back.

An exported model is a committed directory (``storage.commit_dir``, manifest last)::

    model.pt        torch.save of a plain fp32 state_dict (loads with torch.load(weights_only=True))
    model.json      what rebuilds it: model name, the model config section, num_items, the semantic-ID dir it was
                    trained on (where the codes came from), step, validation metrics
    semantic_ids/   SID models: the model's own copy of those codes (manifest, table, stats, UNGER's item
                    embeddings), so the export alone rebuilds it, also from MLflow, and a later ``tokenize`` with
                    ``overwrite=true`` cannot change the codes an old model is evaluated with
    manifest.json

Under ZeRO-3 every rank holds only a slice of each parameter; ``deepspeed.zero.GatheredParameters`` gathers the full
tensors on every rank for the copy (all ranks must call :func:`consolidated_state_dict` together).
"""

from __future__ import annotations

import io
from dataclasses import asdict
from typing import Any

import torch

from genrec_dist import storage

MODEL_FILE = "model.pt"
META_FILE = "model.json"
SIDS_DIR = "semantic_ids"


def consolidated_state_dict(engine: Any) -> dict[str, torch.Tensor]:
    """A full fp32 CPU copy of the engine's model weights, on every rank. A collective under ZeRO-3."""
    module = engine.module
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}


def write_model(path: str, state: dict[str, torch.Tensor], meta: dict[str, Any], storage_cfg: Any = None,
                sids_files: dict[str, bytes] | None = None) -> None:
    """Commit an exported model to ``path`` (replacing an older export there); ``sids_files``
    (:func:`semantic_id_files`) go to its ``semantic_ids/``."""
    buf = io.BytesIO()
    torch.save(state, buf)
    with storage.commit_dir(path, storage_cfg, overwrite=True) as out:
        out.write_bytes(MODEL_FILE, buf.getvalue())
        out.write_json(META_FILE, meta)
        for name, data in (sids_files or {}).items():
            out.write_bytes(f"{SIDS_DIR}/{name}", data)
        out.manifest = {"kind": "genrec-dist model", "model": meta.get("model"), "step": meta.get("step"),
                        **({"semantic_ids": SIDS_DIR} if sids_files else {})}


def semantic_id_files(sids_dir: str, storage_cfg: Any = None) -> dict[str, bytes]:
    """What an export keeps of a committed semantic-ID dir: the files :func:`read_semantic_ids` reads (manifest,
    table, UNGER's item embeddings) and the stats; not the embeddings shards, codebooks or LC-Rec index."""
    from genrec_dist.data.semantic_ids import SIDS_FILE, STATS_FILE

    manifest = storage.require_manifest(sids_dir, storage_cfg)
    names = [storage.MANIFEST, SIDS_FILE, STATS_FILE, *([manifest["item_embeddings"]]
                                                        if manifest.get("item_embeddings") else [])]
    return {name: storage.read_bytes(storage.join(sids_dir, name), storage_cfg) for name in names
            if name != STATS_FILE or storage.exists(storage.join(sids_dir, name), storage_cfg)}


def model_semantic_ids(path: str, meta: dict[str, Any], storage_cfg: Any = None) -> str | None:
    """The semantic-ID dir the exported model at ``path`` reads: its own copy, or (an export from before models kept
    one) the dir it was trained on; ``None`` for a model without codes."""
    own = storage.join(path, SIDS_DIR)
    if storage.exists(storage.join(own, storage.MANIFEST), storage_cfg):
        return own
    return meta.get("semantic_ids")


def read_model(path: str, storage_cfg: Any = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state_dict, meta)`` of an exported model; the weights load with ``weights_only=True``."""
    storage.require_manifest(path, storage_cfg)
    weights = storage.join(path, MODEL_FILE)
    if storage.is_remote(weights):
        state = torch.load(io.BytesIO(storage.read_bytes(weights, storage_cfg)), weights_only=True, map_location="cpu")
    else:  # memory-mapped: the tensors are the file's pages, not a read buffer plus a copy of it
        state = torch.load(storage.filesystem(weights)[1], weights_only=True, map_location="cpu", mmap=True)
    return state, storage.read_json(storage.join(path, META_FILE), storage_cfg)


def read_meta(path: str, storage_cfg: Any = None) -> dict[str, Any]:
    """``model.json`` of an exported model alone (what it is, without loading the weights)."""
    storage.require_manifest(path, storage_cfg)
    return storage.read_json(storage.join(path, META_FILE), storage_cfg)


def model_meta(name: str, model_cfg: Any, num_items: int, sids_dir: str | None, step: int,
               metrics: dict[str, float]) -> dict[str, Any]:
    return {"model": name, "model_config": asdict(model_cfg), "num_items": num_items, "semantic_ids": sids_dir,
            "step": step, "valid_metrics": metrics}
