"""Artifacts a person would rather look at than read: curves, codebook utilisation, metrics table, examples.

Pure: plain data in (dicts, lists, numpy arrays), files or strings out; the caller logs them (the tracker).
Matplotlib runs with the Agg backend, so no display is needed.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


# Training scalars that say nothing about learning (throughput, memory, epoch counter) are left off the curves.
_SKIP = ("samples_per_s", "peak_mem_mb", "epoch", "elapsed_s")


def plot_curves(history: Sequence[Mapping[str, Any]], path: str) -> str:
    """Training and validation curves from the per-step history (``{"step": s, "train/loss": ..., "valid/..": ..}``
    rows, as the trainer keeps them). One panel each: training losses, learning rate, validation metrics."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for row in history:
        for key, value in row.items():
            if key == "step" or not isinstance(value, (int, float)) or key.split("/")[-1] in _SKIP:
                continue
            xs, ys = series.setdefault(key, ([], []))
            xs.append(int(row["step"]))
            ys.append(float(value))
    panels = [
        ("training loss", [k for k in series if k.startswith("train/") and k not in ("train/lr", "train/grad_norm")]),
        ("learning rate", [k for k in series if k == "train/lr"]),
        ("validation", [k for k in series if k.startswith("valid/") and ("recall" in k or "ndcg" in k)]),
    ]
    panels = [(title, keys) for title, keys in panels if keys] or [("no metrics logged", [])]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for key in keys:
            xs, ys = series[key]
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        if keys:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_codebook_utilisation(stats: Mapping[str, Any], path: str) -> str:
    """Bar chart of the share of each k-means level's codes in use (tokenize's ``stats.json``), with ``used/K``
    and the inertia written on the bars and the collision rate of full codes in the title."""
    levels = list(stats.get("levels", []))
    if not levels:
        raise ValueError("stats: no 'levels' to plot (expected tokenize's stats.json)")
    names = [f"level {lv.get('level', i)}" for i, lv in enumerate(levels)]
    util = [float(lv.get("utilisation", 0.0)) for lv in levels]
    fig, ax = plt.subplots(figsize=(1.6 * len(levels) + 3, 3.6))
    bars = ax.bar(names, util, color="#4c72b0")
    for bar, lv in zip(bars, levels):
        k = lv.get("k", lv.get("codebook_size", "?"))
        label = f"{lv.get('used', '?')}/{k}"
        if "inertia" in lv:
            label += f"\ninertia {float(lv['inertia']):.3g}"
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), label, ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, 1.25)
    ax.set_ylabel("codes used / codebook size")
    title = "codebook utilisation per level"
    if "collision_rate" in stats:
        title += f" (collision rate {float(stats['collision_rate']):.3f})"
    ax.set_title(title)
    return _save(fig, path)


def metrics_table(results: Mapping[str, Mapping[str, float]], ks: Sequence[int], title: str = "") -> str:
    """The evaluation table (model rows vs most-popular) as markdown, with an optional heading."""
    table = format_results(results, ks)
    return f"# {title}\n\n{table}\n" if title else table + "\n"


def example_recommendations(history: np.ndarray, target: np.ndarray, ranked: np.ndarray,
                            titles: Mapping[int, str], codes: np.ndarray | None = None, last: int = 5,
                            title: str = "Example recommendations") -> str:
    """Markdown: per user, the last ``last`` history items, the target and the ranked recommendations, each with
    its title and semantic-ID path (``codes`` (num_items + 1, L) when the model has them); hits are marked.

    ``history`` (N, T) item ids left-padded with 0; ``target`` (N,); ``ranked`` (N, k) (0 = no item).
    """
    history, target, ranked = np.asarray(history), np.asarray(target), np.asarray(ranked)

    def item(i: int) -> str:
        sid = "" if codes is None else " `<" + "-".join(str(int(c)) for c in codes[i]) + ">`"
        return f"{int(i)} {titles.get(int(i), '?')}{sid}"

    lines = [f"# {title}", ""]
    for u in range(len(target)):
        hist = [int(i) for i in history[u] if i != 0][-last:]
        recs = [int(i) for i in ranked[u] if i != 0]
        hit = int(target[u]) in recs
        lines += [f"## user {u + 1}: {'HIT at rank ' + str(recs.index(int(target[u])) + 1) if hit else 'miss'}",
                  "", f"history (last {len(hist)}, oldest first):", ""]
        lines += [f"- {item(i)}" for i in hist]
        lines += ["", f"target: {item(int(target[u]))}", "", "recommended:", ""]
        lines += [f"{r}. {'**HIT** ' if i == int(target[u]) else ''}{item(i)}" for r, i in enumerate(recs, 1)]
        lines.append("")
    return "\n".join(lines)


def write_text(text: str, path: str) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    return path


def _save(fig: Any, path: str) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def format_results(results: Mapping[str, Mapping[str, float]], ks: Sequence[int] = (5, 10, 20)) -> str:
    """A markdown table: one row per model name, Recall@k / NDCG@k columns, then users/s and ms/user. Metrics of
    an inference mode (``"<mode>/recall@10"``, CAR's fast and slow) get their own row ``<name> <mode>``."""
    ks = sorted(set(int(k) for k in ks))
    metrics = [f"{m}@{k}" for k in ks for m in ("recall", "ndcg")]
    head = ["model", *(m.replace("recall", "R").replace("ndcg", "N") for m in metrics), "users", "users/s", "ms/user"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows: dict[str, Mapping[str, float]] = {}
    for name, row in results.items():
        rows[name] = row
        for mode in dict.fromkeys(k.split("/", 1)[0] for k in row if "/" in k):
            rows[f"{name} {mode}"] = {k.split("/", 1)[1]: v for k, v in row.items() if k.startswith(mode + "/")}
    for name, row in rows.items():
        cells = [name, *(f"{row[m]:.4f}" if m in row else "-" for m in metrics),
                 f"{int(row.get('users', 0))}", f"{row.get('users_per_s', 0.0):.1f}",
                 f"{row.get('latency_ms_per_user', 0.0):.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
