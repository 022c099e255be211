"""A run's exported model: one consolidated artifact, written and loaded back with its inference settings.

An exported model is a committed directory (``storage.commit_dir``, manifest last)::

    model.pt        torch.save of a plain fp32 state_dict (loads with torch.load(weights_only=True))
    model.json      what rebuilds it: model name, the model config section, num_items, the semantic-ID dir it was
                    trained on (where the codes came from), step, validation metrics
    semantic_ids/   SID models: the model's own copy of those codes (manifest, table, stats, UNGER's item
                    embeddings), so the export alone rebuilds it, also from MLflow, and a later ``tokenize`` with
                    ``overwrite=true`` cannot change the codes an old model is evaluated with
    manifest.json

The weights come from the trainer (``genrec_dist.training.trainer.consolidated_state_dict``, a collective under
ZeRO-3); :func:`load_exported` rebuilds the model from the export alone, with its own saved model config.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch

from genrec_dist import storage
from genrec_dist.config import ConfigError, section_from_dict
from genrec_dist.models import ModelConfig, build_model, inference_fields

MODEL_FILE = "model.pt"
META_FILE = "model.json"
SIDS_DIR = "semantic_ids"


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


@dataclass
class Export:
    """A run's exported model as loaded once (:func:`open_export`): the rebuilt model, its ``model.json``, its folder
    and the semantic IDs it reads (``None`` for a model without codes), so the end of training reads the export, and
    its codes, one time."""

    path: str
    model: torch.nn.Module
    meta: dict[str, Any]
    sids_dir: str | None = None
    sids: Any = None  # genrec_dist.data.semantic_ids.SemanticIds

    def keep_choices(self, chosen: dict[str, dict[str, Any]], storage_cfg: Any = None) -> None:
        """Commit the export again with the model's validation choices (``{field: {"chosen": value, ...}}``, CAR's
        ``slow_weight``) in its saved model config, so every later job ranks the way validation chose."""
        self.meta["model_config"][self.meta["model"]].update({k: c["chosen"] for k, c in chosen.items()})
        self.meta["chosen_on_valid"] = chosen
        write_model(self.path, {k: v.detach().cpu() for k, v in self.model.state_dict().items()}, self.meta,
                    storage_cfg, semantic_id_files(self.sids_dir, storage_cfg) if self.sids_dir else None)


def open_export(run_dir: str, storage_cfg: Any = None, inference: dict[str, Any] | None = None) -> Export:
    """The exported model of a run, rebuilt from its own saved model config (not today's YAML); ``inference``
    replaces inference-time fields of that config (:func:`inference_overrides`)."""
    path = storage.join(run_dir, "model")
    state, meta = read_model(path, storage_cfg)
    sids = None
    sids_dir = model_semantic_ids(path, meta, storage_cfg)
    if sids_dir:
        from genrec_dist.data.semantic_ids import read_semantic_ids

        sids = read_semantic_ids(sids_dir, storage_cfg)
    model_cfg = section_from_dict(ModelConfig, meta["model_config"], f"{run_dir}/model/model.json", "model")
    for key, value in (inference or {}).items():
        setattr(getattr(model_cfg, meta["model"]), key, value)
    model = build_model(meta["model"], model_cfg, int(meta["num_items"]), sids)
    model.load_state_dict(state)
    return Export(path, model.eval(), meta, sids_dir, sids)


def load_exported(run_dir: str, storage_cfg: Any = None,
                  inference: dict[str, Any] | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """``(model, model.json)`` of a run's export (:func:`open_export`)."""
    export = open_export(run_dir, storage_cfg, inference)
    return export.model, export.meta


def inference_overrides(cfg: Any, overrides: Sequence[str], model: str, run_dir: str,
                        exported: dict[str, Any]) -> dict[str, Any]:
    """The command line's ``model.<model>.<field>=value`` overrides as ``{field: parsed value}``. Inference-time
    fields (``INFERENCE`` in the model config's field metadata) may change for a trained model; another field may
    be given only with the value the model was trained with (so the same overrides can go to every job, as
    scripts/demo.sh does), else it is an error naming it. Other models' sections do not concern this run."""
    allowed = inference_fields(model)
    out: dict[str, Any] = {}
    for item in overrides:
        parts = item.split("=", 1)[0].strip().split(".")
        if len(parts) != 3 or parts[0] != "model" or parts[1] != model:
            continue
        value = getattr(getattr(cfg.model, model), parts[2])
        if parts[2] in allowed:
            out[parts[2]] = value
        elif exported.get(parts[2]) != value:
            raise ConfigError(f"model.{model}.{parts[2]}={value}: {run_dir} was trained with {exported.get(parts[2])} "
                             f"and its weights fix it; a trained model can change only "
                             f"{', '.join(f'model.{model}.{f}' for f in allowed) or 'nothing of it'}")
    return out
