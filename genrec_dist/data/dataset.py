"""The prepared-dataset format every later stage reads.

A dataset directory (local or ``s3://``) holds::

    items.parquet               item_id:int32 (1..N, 0 is padding), item:str (source id), title:str, text:str, ...
    sequences/part-00000.parquet  user_id:int32 (1..U), user:str (source id), items:list<int32> (chronological,
                                  the *whole* k-cored sequence), timestamps:list<int64> (null when the source has none)
    manifest.json               schema_version, source files + sha256, counts, split rule, shard list, config

Shards are partitioned by a stable hash of ``user_id`` so each rank/worker can read only its own shards
(:func:`shards_for`). The leave-one-out split is a rule over ``items`` (:func:`split_user`), not stored
copies: test target = last item, validation target = second to last, training = the rest (TIGER §4.1,
UNGER §4.1.1), every history cut to the last ``max_history`` items (20 in the papers).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import polars as pl

from genrec_dist import storage

SCHEMA_VERSION = 1
ITEMS_FILE = "items.parquet"
SEQUENCES_DIR = "sequences"
# The sequence shards' columns as MLflow types (the docstring's format): a dataset input's schema.
SEQUENCES_SCHEMA = {"user_id": "integer", "user": "string", "items": "array<integer>", "timestamps": "array<long>"}
MANIFEST_TAG = "genrec.dataset_manifest_sha256"  # the tag every job's MLflow run carries (Dataset.tags)
PAD = 0


def shard_of(user_id: pl.Expr | np.ndarray, num_shards: int):
    """Stable shard of a user id (Knuth's multiplicative hash), the same in every process and version."""
    if isinstance(user_id, pl.Expr):
        return ((user_id.cast(pl.UInt64) * 2654435761) % (2**32)) % num_shards
    return ((np.asarray(user_id, dtype=np.uint64) * np.uint64(2654435761)) % np.uint64(2**32)) % np.uint64(num_shards)


def shards_for(files: Sequence[str], rank: int, world_size: int) -> list[str]:
    """The shard files rank ``rank`` of ``world_size`` reads: round-robin, every file read by exactly one rank.

    With more ranks than files some ranks get none; callers that need data on every rank split rows instead.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    return [f for i, f in enumerate(sorted(files)) if i % world_size == rank]


def write_dataset(
    path: str,
    items: pl.DataFrame,
    sequences: pl.DataFrame,
    manifest: dict[str, Any],
    num_shards: int,
    storage_cfg: Any = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Commit a dataset atomically (files first, manifest last). Returns the manifest written."""
    seq = sequences.with_columns(shard_of(pl.col("user_id"), num_shards).alias("_shard")).sort("user_id")
    return write_shards(path, items, lambda s: seq.filter(pl.col("_shard") == s).drop("_shard"), manifest,
                        num_shards, storage_cfg, overwrite)


def write_shards(
    path: str,
    items: pl.DataFrame,
    shard: Callable[[int], pl.DataFrame],
    manifest: dict[str, Any],
    num_shards: int,
    storage_cfg: Any = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """:func:`write_dataset` with the sequences given one shard at a time: ``shard(s)`` returns the users of shard
    ``s`` (``shard_of``) sorted by ``user_id``, so a writer never holds more than one shard."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    shard_names = []
    with storage.commit_dir(path, storage_cfg, overwrite=overwrite) as out:
        # Prepare hands items sorted already: sorting again would copy the largest table (its text) once more.
        out.write_parquet(ITEMS_FILE, items if items["item_id"].is_sorted() else items.sort("item_id"))
        for s in range(num_shards):
            name = f"{SEQUENCES_DIR}/part-{s:05d}.parquet"
            out.write_parquet(name, shard(s))
            shard_names.append(name)
        out.manifest = {
            "schema_version": SCHEMA_VERSION,
            **manifest,
            "files": {"items": ITEMS_FILE, "sequences": shard_names},
        }
    return out.manifest


@dataclass
class Dataset:
    """A committed dataset; refuses a directory without a manifest or of another schema version."""

    path: str
    manifest: dict[str, Any]
    storage_cfg: Any = None

    @classmethod
    def open(cls, path: str, storage_cfg: Any = None) -> "Dataset":
        manifest = storage.require_manifest(path, storage_cfg)
        version = manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            raise storage.StorageError(
                f"{path}/manifest.json: schema_version {version!r}, this genrec-dist reads {SCHEMA_VERSION}; "
                f"prepare the dataset again"
            )
        return cls(path, manifest, storage_cfg)

    @property
    def num_items(self) -> int:
        return int(self.manifest["counts"]["items"])

    @property
    def num_users(self) -> int:
        return int(self.manifest["counts"]["users"])

    @property
    def max_history(self) -> int:
        return int(self.manifest["split"]["max_history"])

    def tags(self) -> dict[str, str]:
        """MLflow tags naming this exact dataset, the same in every job's run (prepare, tokenize, train, evaluate):
        its path and the sha256 of its ``manifest.json`` bytes (what ``sha256sum manifest.json`` prints)."""
        raw = storage.read_bytes(storage.join(self.path, storage.MANIFEST), self.storage_cfg)
        return {"genrec.dataset_path": self.path, MANIFEST_TAG: hashlib.sha256(raw).hexdigest()}

    def input_spec(self) -> dict[str, Any]:
        """This dataset as an MLflow dataset input (``tracker.log_input(**spec, context=...)``): its name, path,
        digest (the sha256 of ``manifest.json``, as in :meth:`tags`), the schema of its sequences, and its counts."""
        return {"name": str(self.manifest.get("name") or self.path.rstrip("/").rsplit("/", 1)[-1]),
                "source": self.path, "digest": self.tags()[MANIFEST_TAG], "schema": SEQUENCES_SCHEMA,
                "profile": {k: self.manifest["counts"][k] for k in ("users", "items", "interactions")
                            if k in self.manifest.get("counts", {})}}

    @property
    def fingerprint(self) -> str:
        """sha1 of the manifest as canonical JSON: names this exact prepared dataset (counts, split, files)."""
        return hashlib.sha1(json.dumps(self.manifest, sort_keys=True).encode()).hexdigest()

    @property
    def shard_files(self) -> list[str]:
        return [storage.join(self.path, name) for name in self.manifest["files"]["sequences"]]

    def items(self, columns: list[str] | None = None) -> pl.DataFrame:
        return storage.read_parquet(storage.join(self.path, ITEMS_FILE), self.storage_cfg, columns)

    def sequences(self, shard_files: Sequence[str] | None = None) -> pl.DataFrame:
        files = self.shard_files if shard_files is None else list(shard_files)
        frames = [storage.read_parquet(f, self.storage_cfg) for f in files]
        if not frames:
            return pl.DataFrame(schema={"user_id": pl.Int32, "user": pl.Utf8, "items": pl.List(pl.Int32),
                                        "timestamps": pl.List(pl.Int64)})
        return pl.concat(frames).sort("user_id")


def split_user(items: Sequence[int], max_history: int) -> dict[str, Any]:
    """Leave-one-out for one user's chronological item list (at least 3 items).

    ``train`` is the training sequence (every prefix predicts its next item); ``valid``/``test`` are
    ``(history, target)`` with the history cut to the last ``max_history`` items.
    """
    if len(items) < 3:
        raise ValueError(f"leave-one-out needs at least 3 items, got {len(items)}")
    items = list(items)
    return {
        "train": items[:-2],
        "valid": (items[:-2][-max_history:], items[-2]),
        "test": (items[:-1][-max_history:], items[-1]),
    }
