"""genrec_dist.reports on hand-made data: the PNGs are real images, the markdown names the right items and hits."""

from __future__ import annotations

import numpy as np
import pytest

from genrec_dist import reports

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(8)
    return head == PNG_SIGNATURE and path.stat().st_size > 1000


def test_curves_png(tmp_path):
    history = [{"step": s, "train/loss": 5.0 / s, "train/lr": 1e-3, "train/samples_per_s": 100.0} for s in (1, 5, 10)]
    history += [{"step": 10, "valid/recall@10": 0.2, "valid/ndcg@10": 0.1}]
    out = reports.plot_curves(history, str(tmp_path / "sub" / "curves.png"))
    assert _is_png(tmp_path / "sub" / "curves.png") and out.endswith("curves.png")


def test_curves_png_from_empty_history(tmp_path):
    reports.plot_curves([], str(tmp_path / "c.png"))  # a run resumed at its last step logs nothing: still a file
    assert _is_png(tmp_path / "c.png")


def test_codebook_utilisation_png(tmp_path):
    stats = {"collision_rate": 0.1, "levels": [
        {"level": 0, "k": 8, "used": 8, "utilisation": 1.0, "inertia": 12.5},
        {"level": 1, "k": 8, "used": 5, "utilisation": 0.625, "inertia": 3.1},
        {"level": 2, "codebook_size": 4, "used": 2, "utilisation": 0.5}]}  # import method: no inertia
    reports.plot_codebook_utilisation(stats, str(tmp_path / "u.png"))
    assert _is_png(tmp_path / "u.png")
    with pytest.raises(ValueError, match="levels"):
        reports.plot_codebook_utilisation({"collision_rate": 0.0}, str(tmp_path / "x.png"))


def test_metrics_table_reuses_format_results():
    row = {"recall@10": 0.25, "ndcg@10": 0.125, "users": 40, "users_per_s": 10.0, "latency_ms_per_user": 1.0}
    md = reports.metrics_table({"sasrec": row, "most-popular": {**row, "recall@10": 0.05}}, [10], "test split")
    lines = md.splitlines()
    assert lines[0] == "# test split"
    assert any(line.startswith("| sasrec | 0.2500 | 0.1250 |") for line in lines)
    assert any(line.startswith("| most-popular | 0.0500 |") for line in lines)


def test_example_recommendations_marks_hits_with_titles_and_sid_paths():
    titles = {1: "Red Lipstick", 2: "Blue Mascara", 3: "Green Soap", 4: "Night Cream", 5: "Sun Block"}
    codes = np.array([[0, 0], [1, 7], [1, 3], [2, 5], [4, 0], [6, 6]])  # (num_items + 1, L); row 0 = padding
    history = np.array([[0, 0, 1, 2], [1, 2, 3, 4]])  # left-padded
    target = np.array([3, 5])
    ranked = np.array([[4, 3, 0], [1, 2, 4]])  # user 1 hits at rank 2; user 2 misses
    md = reports.example_recommendations(history, target, ranked, titles, codes, last=3)
    user1, user2 = md.split("## user 2")
    assert "## user 1: HIT at rank 2" in user1 and user2.startswith(": miss")
    assert "target: 3 Green Soap `<2-5>`" in user1
    assert "2. **HIT** 3 Green Soap `<2-5>`" in user1 and "1. 4 Night Cream `<4-0>`" in user1
    assert "- 1 Red Lipstick `<1-7>`" in user1 and "- 0 " not in user1  # padding is not history
    assert "**HIT**" not in user2 and "- 1 Red Lipstick" not in user2  # only the last 3 history items
    assert "target: 5 Sun Block `<6-6>`" in user2
    plain = reports.example_recommendations(history, target, ranked, titles)  # SASRec: no semantic IDs
    assert "`<" not in plain and "2. **HIT** 3 Green Soap" in plain
