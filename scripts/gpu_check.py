"""One GPU check: every GPU measurement the project still owes, in one command that writes one JSON.

    bash scripts/gpu_check.sh [--dry] [--out F] [--data F.npz] [--slice-min M]

The device machine has torch (and transformers, sentence-transformers) but not ray, deepspeed, polars or mlflow, and
at most 64 MiB travel with a call, so this runs torch-only on the library's pure core (models, metrics) and says in
the JSON which checks it skipped and why:

1. ``env``: torch, the device, bf16 support, the measured matmul rate (fp32 and bf16), the physical limit the
   training rows are read against;
2. ``train``: training steps of every model at the papers' sizes (the configs' defaults) on a Beauty-size catalog
   (12,101 items, 4 x 256 codes), batch 256, under bf16 autocast on CUDA: samples/s, ms/step, peak memory;
3. ``ranking``: the full-catalog top-k of every model (what evaluation and ``jobs/recommend.py`` call): users/s;
4. ``nccl``: a one-rank NCCL all-reduce through torch.distributed; ZeRO-2/3 themselves need deepspeed (skipped when
   it is not importable);
5. ``slice``: with ``--data`` (made here by ``--export``, ~2 MB: Beauty's sequences and our codes), SASRec and CAR
   at paper size trained for ``--slice-min`` minutes each in bf16 on every position, tested (valid/test N@10, both
   protocols).

``--dry`` shrinks everything to seconds on a CPU (CI runs it, so the script cannot rot before a GPU is lent).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo: genrec_dist

from genrec_dist.evaluation.evaluate import evaluate_model  # noqa: E402  (torch + numpy only)
from genrec_dist.models import ModelConfig, build_model  # noqa: E402
from genrec_dist.serve_request import left_pad  # noqa: E402  (pure: the models' input layout)

MODELS = ("sasrec", "car", "tiger", "unger")


@dataclass
class Codes:
    """The semantic-ID value the models read (``genrec_dist.data.semantic_ids.SemanticIds``, whose module needs
    polars to read and write tables): codes (N+1, L), row 0 padding."""

    codes: np.ndarray
    codebook_sizes: list[int]
    manifest: dict = field(default_factory=dict)
    item_embeddings: np.ndarray | None = None

    @property
    def num_items(self) -> int:
        return int(self.codes.shape[0]) - 1

    @property
    def has_dedup_level(self) -> bool:
        return bool(self.manifest.get("dedup", False))


def random_codes(n: int, levels: int, k: int, seed: int = 0, dim: int = 0) -> Codes:
    rng = np.random.default_rng(seed)
    codes = np.concatenate([np.zeros((1, levels), np.int64), rng.integers(0, k, (n, levels))])
    emb = rng.normal(size=(n + 1, dim)).astype(np.float32) if dim else None
    return Codes(codes, [k] * levels, item_embeddings=emb)


def sizes(dry: bool) -> ModelConfig:
    """The configs' paper sizes, or toy ones for ``--dry``."""
    cfg = ModelConfig()
    if dry:
        for name, section in (("sasrec", cfg.sasrec), ("car", cfg.car), ("tiger", cfg.tiger), ("unger", cfg.unger)):
            for key, value in {"d_model": 16, "n_heads": 2, "d_ff": 32, "n_layers": 1, "encoder_layers": 1,
                               "decoder_layers": 1, "head_dim": 8, "beam_width": 5}.items():
                if hasattr(section, key):
                    setattr(section, key, value)
    return cfg


def timed(fn, device: torch.device, repeat: int) -> float:
    """Seconds per call of ``fn`` (synchronised on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeat


def env_check(device: torch.device, dry: bool) -> dict:
    n = 256 if dry else 8192
    out = {"torch": torch.__version__, "device": str(device),
           "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "bf16": bool(device.type == "cuda" and torch.cuda.is_bf16_supported())}
    for dtype in (torch.float32, torch.bfloat16):
        if dtype == torch.bfloat16 and not out["bf16"] and device.type == "cuda":
            continue
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        s = timed(lambda: a @ b, device, 3 if dry else 20)
        out[f"matmul_tflops_{str(dtype).split('.')[-1]}"] = 2 * n ** 3 / s / 1e12
    return out


def batch_for(model_name: str, cfg: ModelConfig, num_items: int, batch: int, device: torch.device,
              gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random left-padded histories of the model's own length (a quarter of them short) and targets."""
    h = int(getattr(cfg, model_name).max_history)
    history = torch.randint(1, num_items + 1, (batch, h), generator=gen)
    lengths = torch.randint(1, h + 1, (batch,), generator=gen)
    history[torch.arange(h)[None, :] < (h - lengths)[:, None]] = 0
    return history.to(device), torch.randint(1, num_items + 1, (batch,), generator=gen).to(device)


def build(name: str, cfg: ModelConfig, codes: Codes, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(name, cfg, codes.num_items, None if name == "sasrec" else codes).to(device)


def train_check(device: torch.device, dry: bool, amp: bool) -> dict:
    num_items, batch = (200, 16) if dry else (12_101, 256)
    warm, steps = (1, 2) if dry else (5, 30)
    codes = random_codes(num_items, 4, 8 if dry else 256, dim=8 if dry else 384)
    cfg, gen, rows = sizes(dry), torch.Generator().manual_seed(0), {}
    for name in MODELS:
        model = build(name, cfg, codes, device).train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        data = [batch_for(name, cfg, num_items, batch, device, gen) for _ in range(4)]
        state = {"i": 0}

        def step():
            history, target = data[state["i"] % len(data)]
            state["i"] += 1
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = model(history, target)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        timed(step, device, warm)
        s = timed(step, device, steps)
        rows[name] = {"samples_per_s": batch / s, "ms_per_step": 1000 * s, "batch": batch, "amp_bf16": amp,
                      "parameters": sum(p.numel() for p in model.parameters()),
                      "peak_mem_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
                      else None}
        print(f"train {name}: {rows[name]['samples_per_s']:.0f} samples/s", flush=True)
    return rows


def ranking_check(device: torch.device, dry: bool) -> dict:
    num_items, batch = (200, 16) if dry else (12_101, 256)
    codes = random_codes(num_items, 4, 8 if dry else 256, dim=8 if dry else 384)
    cfg, gen, rows = sizes(dry), torch.Generator().manual_seed(1), {}
    for name in MODELS:
        model = build(name, cfg, codes, device).eval()
        history, _ = batch_for(name, cfg, num_items, batch, device, gen)
        with torch.no_grad():
            s = timed(lambda: model.topk(history, 20), device, 1 if dry else 3)
        rows[name] = {"users_per_s": batch / s, "k": 20, "batch": batch}
        print(f"ranking {name}: {rows[name]['users_per_s']:.0f} users/s", flush=True)
    return rows


def nccl_check(device: torch.device) -> dict:
    out: dict = {}
    if device.type != "cuda":
        out["nccl"] = {"skipped": "no CUDA device"}
    else:
        import tempfile

        import torch.distributed as dist

        with tempfile.NamedTemporaryFile() as store:
            dist.init_process_group("nccl", init_method=f"file://{store.name}", rank=0, world_size=1)
            x = torch.ones(1 << 20, device=device)
            dist.all_reduce(x)
            out["nccl"] = {"all_reduce_ok": bool(x[0].item() == 1.0)}
            dist.destroy_process_group()
    try:
        import deepspeed  # noqa: F401

        out["zero"] = {"skipped": "deepspeed is importable: run tests/training with -m gpu for ZeRO-2/3 on NCCL"}
    except ImportError:
        out["zero"] = {"skipped": "deepspeed is not installed on this machine (ZeRO-2/3 on NCCL stay unchecked)"}
    return out


# ------------------------------------------------------------------------------------------------------------------
# the paper-size slice on real data (--export here, --data there)
# ------------------------------------------------------------------------------------------------------------------

def export(config: str, out: str, overrides: list[str]) -> None:
    """Write a prepared dataset's sequences and its semantic IDs to one .npz that can travel (needs polars: run it
    where the project is installed)."""
    from genrec_dist.config import load_config
    from genrec_dist.data.dataset import Dataset
    from genrec_dist.data.semantic_ids import read_semantic_ids

    cfg = load_config(config, overrides)
    ds = Dataset.open(cfg.dataset_dir, cfg.storage)
    seqs = ds.sequences()["items"].to_list()
    sids = read_semantic_ids(cfg.semantic_ids_dir, cfg.storage)
    lengths = np.array([len(s) for s in seqs], np.int64)
    np.savez_compressed(out, items=np.concatenate([np.asarray(s, np.int64) for s in seqs]), lengths=lengths,
                        codes=sids.codes, codebook_sizes=np.array(sids.codebook_sizes),
                        dedup=np.array(sids.has_dedup_level), num_items=np.array(ds.num_items))
    print(f"wrote {out}: {len(seqs)} users, {ds.num_items} items", flush=True)


def slice_check(data: str, device: torch.device, minutes: float, amp: bool, dry: bool) -> dict:
    z = np.load(data)
    seqs = np.split(z["items"], np.cumsum(z["lengths"])[:-1])
    seqs = [s for s in seqs if len(s) >= 3][:512 if dry else None]  # --dry: the first 512 users, toy sizes
    codes = Codes(z["codes"], [int(k) for k in z["codebook_sizes"]], {"dedup": bool(z["dedup"])})
    num_items, cfg, rows = int(z["num_items"]), sizes(dry), {}
    cfg.sasrec.loss, cfg.sasrec.n_layers, cfg.sasrec.dropout = "sampled", 1, 0.2  # configs/beauty/sasrec.yaml
    cfg.sasrec.negatives, cfg.sasrec.num_negatives = "position", 256
    for name in ("sasrec", "car"):
        h = int(getattr(cfg, name).max_history)
        windows, targets = [], []  # non-overlapping windows of the training sequences (every position trains)
        for s in seqs:
            train = s[:-2]
            for end in range(len(train) - 1, 0, -h):
                windows.append(train[max(0, end - h):end])
                targets.append(train[end])
        hist, tgt = left_pad(windows, h), torch.tensor(targets)
        model = build(name, cfg, codes, device).train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.98))
        gen, steps, t0 = torch.Generator().manual_seed(0), 0, time.perf_counter()
        while time.perf_counter() - t0 < minutes * 60:
            for idx in torch.randperm(len(tgt), generator=gen).split(128):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    loss = model(hist[idx].to(device), tgt[idx].to(device))["loss"]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                steps += 1
                if time.perf_counter() - t0 >= minutes * 60:
                    break
        train_s = time.perf_counter() - t0
        row = {"steps": steps, "train_s": train_s, "epochs": steps * 128 / len(tgt)}
        for split, drop in (("valid", 2), ("test", 1)):
            before = [s[:-drop] for s in seqs]
            target = torch.tensor([int(s[-drop]) for s in seqs])
            batches = [(left_pad(before[i:i + 512], h), target[i:i + 512],
                        left_pad(before[i:i + 512], max(len(b) for b in before[i:i + 512])))
                       for i in range(0, len(seqs), 512)]
            for protocol, keep in (("full", 2), ("seen_filtered", 3)):
                m = evaluate_model(model, [b[:keep] for b in batches], (10,), device)
                row[f"{split}_{protocol}_ndcg@10"] = m["ndcg@10"]
        rows[name] = row
        print(f"slice {name}: {row}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="toy sizes on whatever device there is (seconds)")
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--data", help="an --export .npz for the paper-size slice")
    parser.add_argument("--slice-min", type=float, default=2.0, help="training minutes per model of the slice")
    parser.add_argument("--export", metavar="CONFIG", help="write --data from a prepared dataset and its codes, exit")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of --export's config")
    args = parser.parse_args()
    if args.export:
        return export(args.export, args.data or "slice.npz", args.overrides)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = device.type == "cuda" and torch.cuda.is_bf16_supported()
    t0 = time.perf_counter()
    result = {"dry": args.dry, "env": env_check(device, args.dry), "train": train_check(device, args.dry, amp),
              "ranking": ranking_check(device, args.dry), **nccl_check(device)}
    if args.data:
        result["slice"] = slice_check(args.data, device, 0.05 if args.dry else args.slice_min, amp, args.dry)
    else:
        result["slice"] = {"skipped": "no --data (make it with --export on a machine with the project installed)"}
    result["seconds"] = time.perf_counter() - t0
    with open(args.out + ".tmp", "w") as fh:
        json.dump(result, fh, indent=2, sort_keys=True)
    os.replace(args.out + ".tmp", args.out)
    print(f"wrote {args.out} in {result['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
