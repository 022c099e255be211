"""The semantic-ID table every SID model reads: item_id -> L discrete codes.

A committed semantic-ID directory (local or ``s3://``, written atomically, manifest last) holds::

    semantic_ids.parquet   item_id:int32 (1..N), codes:list<int32> (length L, code l in [0, codebook_sizes[l]))
    stats.json             per-level utilisation, collision rate of full codes (+ whatever the tokenizer adds)
    codebooks.npz          centroids per level (when the tokenizer has them; optional)
    manifest.json          schema_version, num_items, num_levels, codebook_sizes, dedup, source, files, ...

In memory it is :class:`SemanticIds` with ``codes`` indexed by item_id (row 0 = the padding item, all zeros).

The LC-Rec / LETTER interchange format ``<Name>.index.json[.gz]`` maps a source item key to code tokens,
``{"0": ["<a_171>", "<b_42>", "<c_207>", "<d_0>"], ...}`` (letter = level, number = code);
:func:`read_lcrec_index` / :func:`write_lcrec_index` convert between the two through ``items.item``.

Pure module: numpy/polars and :mod:`genrec_dist.storage` only.
"""

from __future__ import annotations

import gzip
import io
import json
import re
from dataclasses import dataclass, field
from typing import Any, Collection

import numpy as np
import polars as pl

from genrec_dist import storage
from genrec_dist.errors import GenrecError

SCHEMA_VERSION = 1
SIDS_FILE = "semantic_ids.parquet"
STATS_FILE = "stats.json"
# The table's columns as MLflow types (the docstring's format): the codes as a training run's dataset input.
CODES_SCHEMA = {"item_id": "integer", "codes": "array<integer>"}
CODEBOOKS_FILE = "codebooks.npz"
_TOKEN = re.compile(r"^<([a-z])_(\d+)>$")


class SemanticIdError(GenrecError, ValueError):
    """Codes or an index file that do not fit the format; the message names the file / item / level."""


@dataclass
class SemanticIds:
    codes: np.ndarray  # (num_items + 1, L) int64; row 0 = padding item (all zeros); row i = item_id i
    codebook_sizes: list[int]  # K per level, length L (the de-dup level included when present)
    manifest: dict = field(default_factory=dict)
    # (num_items + 1, D) float32 per-item vectors the tokenizer saved next to the codes (UNGER's integrated
    # embeddings, the IKD targets); None when manifest["item_embeddings"] names no file.
    item_embeddings: np.ndarray | None = None

    @property
    def num_items(self) -> int:
        return int(self.codes.shape[0]) - 1

    @property
    def num_levels(self) -> int:
        return int(self.codes.shape[1])

    @property
    def has_dedup_level(self) -> bool:
        """True when the last level is a de-duplication index (appended, not learned)."""
        return bool(self.manifest.get("dedup", False))

    def collisions(self) -> int:
        """Items that share their full code with at least one other item."""
        return code_stats(self.codes[1:], self.codebook_sizes)["items_in_collision"]


def code_stats(codes: np.ndarray, codebook_sizes: list[int]) -> dict[str, Any]:
    """Utilisation per level and collisions of full codes, for ``codes`` (N, L) of real items (no padding row)."""
    codes = np.asarray(codes)
    n = int(codes.shape[0])
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    group = counts[np.asarray(inverse).reshape(-1)]  # (N,) size of each item's full-code group
    in_collision = int((group > 1).sum())
    return {
        "num_items": n,
        "unique_codes": int(len(counts)),
        "items_in_collision": in_collision,
        "collision_rate": in_collision / n if n else 0.0,
        "max_items_per_code": int(counts.max()) if n else 0,
        "levels": [
            {"codebook_size": int(k), "used": int(len(np.unique(codes[:, l]))),
             "utilisation": len(np.unique(codes[:, l])) / k}
            for l, k in enumerate(codebook_sizes)
        ],
    }


def _validate(item_ids: np.ndarray, codes: np.ndarray, codebook_sizes: list[int], where: str) -> None:
    if codes.ndim != 2:
        raise SemanticIdError(f"{where}: codes must be 2-D (items, levels), got shape {codes.shape}")
    if item_ids.shape != (codes.shape[0],):
        raise SemanticIdError(f"{where}: {item_ids.shape[0]} item ids for {codes.shape[0]} code rows")
    if len(codebook_sizes) != codes.shape[1]:
        raise SemanticIdError(f"{where}: {len(codebook_sizes)} codebook sizes for {codes.shape[1]} levels")
    n = codes.shape[0]
    if n and not np.array_equal(np.sort(item_ids), np.arange(1, n + 1)):
        raise SemanticIdError(f"{where}: item ids must be exactly 1..{n} (0 is padding), each once")
    for l, k in enumerate(codebook_sizes):
        col = codes[:, l]
        bad = np.flatnonzero((col < 0) | (col >= k))
        if len(bad):
            i = bad[0]
            raise SemanticIdError(f"{where}: item {int(item_ids[i])} level {l}: code {int(col[i])} is outside "
                                  f"[0, {k})")


def write_semantic_ids(
    path: str,
    item_ids: np.ndarray,
    codes: np.ndarray,
    codebook_sizes: list[int],
    extra_manifest: dict | None = None,
    storage_cfg: Any = None,
    overwrite: bool = False,
    extra_files: dict[str, bytes] | None = None,
    extra_paths: dict[str, str] | None = None,
    move_extra_paths: Collection[str] = (),
) -> dict:
    """Commit a semantic-ID directory atomically; returns the manifest written.

    ``item_ids`` (N,) must be a permutation of 1..N and ``codes`` (N, L) its codes. ``extra_files`` (name ->
    bytes, e.g. ``codebooks.npz``, ``stats.json``) are written alongside; without a ``stats.json`` there the
    basic :func:`code_stats` are written as it. ``extra_manifest`` keys (``source``, ``dedup``, ...) are merged
    into the manifest. ``extra_paths`` (name -> path of a file written elsewhere, e.g. embedding shards written by
    Ray workers) are copied in (those named in ``move_extra_paths`` moved) without being read into this process.
    """
    item_ids = np.asarray(item_ids, dtype=np.int64)
    codes = np.asarray(codes, dtype=np.int64)
    codebook_sizes = [int(k) for k in codebook_sizes]
    _validate(item_ids, codes, codebook_sizes, path)
    order = np.argsort(item_ids, kind="stable")
    table = pl.DataFrame({
        "item_id": pl.Series(item_ids[order], dtype=pl.Int32),
        "codes": pl.Series(codes[order].astype(np.int32)).cast(pl.List(pl.Int32)),  # no Python list per item
    })
    stats = code_stats(codes, codebook_sizes)
    files = dict(extra_files or {})
    with storage.commit_dir(path, storage_cfg, overwrite=overwrite) as out:
        out.write_parquet(SIDS_FILE, table)
        if STATS_FILE not in files:
            out.write_json(STATS_FILE, stats)
        for name, data in files.items():
            out.write_bytes(name, data)
        for name, src in (extra_paths or {}).items():
            out.adopt(name, src, move=name in move_extra_paths)
        out.manifest = {
            "schema_version": SCHEMA_VERSION,
            "num_items": int(codes.shape[0]),
            "num_levels": int(codes.shape[1]),
            "codebook_sizes": codebook_sizes,
            "dedup": False,
            "unique_codes": stats["unique_codes"],
            "collision_rate": stats["collision_rate"],
            **(extra_manifest or {}),
            "files": sorted({SIDS_FILE, STATS_FILE, *files, *(extra_paths or {})}),
        }
    return out.manifest


def read_semantic_ids(path: str, storage_cfg: Any = None) -> SemanticIds:
    """Read a committed semantic-ID directory (refused without a manifest) into :class:`SemanticIds`."""
    manifest = storage.require_manifest(path, storage_cfg)
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise SemanticIdError(f"{path}/manifest.json: schema_version {version!r}, this genrec-dist reads "
                              f"{SCHEMA_VERSION}; run the tokenize job again")
    table = storage.read_parquet(storage.join(path, SIDS_FILE), storage_cfg)
    sizes = [int(k) for k in manifest["codebook_sizes"]]
    n, num_levels = int(manifest["num_items"]), len(sizes)
    if table.height != n:
        raise SemanticIdError(f"{path}/{SIDS_FILE}: {table.height} rows, manifest says {n} items")
    item_ids = table["item_id"].to_numpy().astype(np.int64)
    flat = table["codes"].explode().to_numpy()
    if flat.shape[0] != n * num_levels:
        raise SemanticIdError(f"{path}/{SIDS_FILE}: every code list must have {num_levels} entries")
    body = flat.astype(np.int64).reshape(n, num_levels)
    _validate(item_ids, body, sizes, f"{path}/{SIDS_FILE}")
    codes = np.zeros((n + 1, num_levels), dtype=np.int64)
    codes[item_ids] = body
    emb = None
    if manifest.get("item_embeddings"):  # UNGER: tokenization/unger.py writes it (an .npy file)
        emb = np.load(io.BytesIO(storage.read_bytes(storage.join(path, manifest["item_embeddings"]), storage_cfg)))
        if emb.shape[0] != n + 1:
            raise SemanticIdError(f"{path}/{manifest['item_embeddings']}: {emb.shape[0]} rows, need {n + 1}")
    return SemanticIds(codes=codes, codebook_sizes=sizes, manifest=manifest, item_embeddings=emb)


# ----------------------------------------------------------------------------------------------------------------
# LC-Rec / LETTER <Name>.index.json[.gz]
# ----------------------------------------------------------------------------------------------------------------

def _load_json(path: str, storage_cfg: Any) -> Any:
    raw = storage.read_bytes(path, storage_cfg)
    if raw[:2] == b"\x1f\x8b":  # gzip magic: the shared data ships .json.gz
        raw = gzip.decompress(raw)
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SemanticIdError(f"{path}: not valid JSON: {exc}") from None


def read_lcrec_index(
    index_path: str,
    items: pl.DataFrame,
    storage_cfg: Any = None,
    codebook_sizes: list[int] | None = None,
) -> SemanticIds:
    """Import an LC-Rec/LETTER index: source item key -> ``["<a_171>", "<b_42>", ...]``.

    Keys are matched to ``items.item`` (the source id, compared as strings) and rows land at ``items.item_id``.
    Every dataset item needs an entry (else an error naming the first missing keys); index entries for items not
    in the dataset (dropped by k-core) are ignored and counted in ``manifest["ignored_index_keys"]``.
    ``codebook_sizes`` default: the largest code seen per level + 1.
    """
    data = _load_json(index_path, storage_cfg)
    if not isinstance(data, dict):
        raise SemanticIdError(f"{index_path}: expected a JSON object item -> list of code tokens")
    keys = items["item"].cast(pl.Utf8).to_list()
    ids = items["item_id"].to_numpy().astype(np.int64)
    missing = [k for k in keys if k not in data]
    if missing:
        raise SemanticIdError(f"{index_path}: {len(missing)} dataset items have no entry, e.g. "
                              f"{missing[:5]} (is this the index of the same dataset?)")
    num_levels = None
    body = np.zeros((len(keys), 0), dtype=np.int64)
    for row, key in enumerate(keys):
        tokens = data[key]
        if not isinstance(tokens, list) or not tokens:
            raise SemanticIdError(f"{index_path}: item {key!r}: expected a non-empty list of tokens, got {tokens!r}")
        if num_levels is None:
            num_levels = len(tokens)
            body = np.zeros((len(keys), num_levels), dtype=np.int64)
        if len(tokens) != num_levels:
            raise SemanticIdError(f"{index_path}: item {key!r} has {len(tokens)} tokens, others {num_levels}")
        for level, tok in enumerate(tokens):
            m = _TOKEN.match(str(tok))
            if m is None or m.group(1) != chr(ord("a") + level):
                raise SemanticIdError(f"{index_path}: item {key!r} level {level}: token {tok!r} is not "
                                      f"'<{chr(ord('a') + level)}_N>'")
            body[row, level] = int(m.group(2))
    num_levels = num_levels or 0
    if codebook_sizes is None:
        codebook_sizes = [int(body[:, l].max()) + 1 if len(keys) else 1 for l in range(num_levels)]
    codebook_sizes = [int(k) for k in codebook_sizes]
    _validate(ids, body, codebook_sizes, index_path)
    codes = np.zeros((len(keys) + 1, num_levels), dtype=np.int64)
    codes[ids] = body
    stats = code_stats(body, codebook_sizes)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "num_items": len(keys),
        "num_levels": num_levels,
        "codebook_sizes": codebook_sizes,
        # An imported index may or may not end in a de-dup level; it is unique when no two items share a code.
        "dedup": False,
        "source": "lcrec-index",
        "index_path": str(index_path),
        "ignored_index_keys": len(set(data) - set(keys)),
        "unique_codes": stats["unique_codes"],
        "collision_rate": stats["collision_rate"],
    }
    return SemanticIds(codes=codes, codebook_sizes=codebook_sizes, manifest=manifest)


def write_lcrec_index(sids: SemanticIds, items: pl.DataFrame, path: str, storage_cfg: Any = None) -> None:
    """Export as an LC-Rec/LETTER index keyed by ``items.item``; gzip'd when ``path`` ends in ``.gz``."""
    if sids.num_levels > 26:
        raise SemanticIdError(f"{path}: the index format has letters a..z for levels, got {sids.num_levels} levels")
    letters = [chr(ord("a") + l) for l in range(sids.num_levels)]
    ordered = items.select("item_id", pl.col("item").cast(pl.Utf8)).sort("item_id")
    # The text json.dumps({key: [tokens]}) gives, built in slices of items: a million-item catalog never holds a
    # Python dict / list per item (several hundred MB), only the output bytes.
    if ordered["item"].n_unique() < ordered.height:  # json.dumps of a dict would keep only the last one
        raise SemanticIdError(f"{path}: item keys repeat; the index needs one entry per item")
    parts = []
    for start in range(0, ordered.height, 65536):
        chunk = ordered.slice(start, 65536)
        ids = chunk["item_id"].to_numpy()
        bad = np.flatnonzero((ids < 1) | (ids > sids.num_items))
        if len(bad):
            i = int(bad[0])
            raise SemanticIdError(f"{path}: item_id {int(ids[i])} ({chunk['item'][i]!r}) has no semantic ID "
                                  f"(table has 1..{sids.num_items})")
        codes = sids.codes[ids]
        keys = chunk["item"].to_list()
        parts.append(", ".join(
            f"{json.dumps(k)}: [" + ", ".join(f'"<{letters[l]}_{int(c)}>"' for l, c in enumerate(row)) + "]"
            for k, row in zip(keys, codes.tolist())).encode("utf-8"))
    data = b"{" + b", ".join(p for p in parts if p) + b"}"
    del parts
    if str(path).endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    storage.write_bytes(path, data, storage_cfg)
