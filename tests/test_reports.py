"""genrec_dist.reports on hand-made data: the PNGs decode to pictures of the right size that show the data given
(lines in every panel, bars as tall as the utilisation), the markdown names the right items and hits."""

from __future__ import annotations

import numpy as np
import pytest

from genrec_dist import reports

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Matplotlib's first two line colours (C0, C1) and the bar colour of the utilisation chart, as RGB.
C0, C1, BAR = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E), (0x4C, 0x72, 0xB0)


def _read_png(path) -> np.ndarray:
    """The picture as an (H, W, 3) uint8 array; fails unless the file is a PNG that decodes."""
    from PIL import Image

    with open(path, "rb") as fh:
        assert fh.read(8) == PNG_SIGNATURE, f"{path} is not a PNG"
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def _mask(img: np.ndarray, rgb, tol: int = 12) -> np.ndarray:
    """Pixels within ``tol`` of ``rgb`` on every channel (anti-aliased edges fall outside)."""
    return (np.abs(img.astype(int) - np.asarray(rgb)) <= tol).all(-1)


def _assert_not_blank(img: np.ndarray) -> None:
    assert img.std() > 10, "the picture is one flat colour"
    assert (img.min(-1) < 128).mean() > 0.005, "almost no dark pixels: no axes, ticks or text drawn"


def test_curves_png(tmp_path):
    history = [{"step": s, "train/loss": 5.0 / s, "train/lr": 1e-3, "train/samples_per_s": 100.0} for s in (1, 5, 10)]
    history += [{"step": 10, "valid/recall@10": 0.2, "valid/ndcg@10": 0.1}]
    out = reports.plot_curves(history, str(tmp_path / "sub" / "curves.png"))
    assert out.endswith("curves.png")
    img = _read_png(tmp_path / "sub" / "curves.png")
    assert img.shape == (360, 1500, 3)  # three panels (loss, lr, validation), 5 x 3.6 in each at 100 dpi
    _assert_not_blank(img)
    loss, lr, valid = np.array_split(img, 3, axis=1)
    # Every panel draws its series: C0 is the first line of each panel, C1 the second (ndcg beside recall).
    for name, panel in (("loss", loss), ("lr", lr), ("validation", valid)):
        assert _mask(panel, C0).sum() > 20, f"no data line in the {name} panel"
    assert _mask(valid, C1).sum() > 10 and _mask(loss, C1).sum() == 0  # samples_per_s is left off the loss panel
    # The loss falls (5 -> 1 -> 0.5): its line's pixels on the left of the panel sit higher than those on the right.
    rows, cols = np.nonzero(_mask(loss, C0))
    left, right = rows[cols < np.median(cols)], rows[cols > np.median(cols)]
    assert left.mean() < right.mean()


def test_curves_png_from_empty_history(tmp_path):
    reports.plot_curves([], str(tmp_path / "c.png"))  # a run resumed at its last step logs nothing: still a file
    img = _read_png(tmp_path / "c.png")
    assert img.shape == (360, 500, 3)  # one panel, "no metrics logged"
    _assert_not_blank(img)
    assert _mask(img, C0).sum() == 0  # and no line in it


def test_codebook_utilisation_png(tmp_path):
    stats = {"collision_rate": 0.1, "levels": [
        {"level": 0, "k": 8, "used": 8, "utilisation": 1.0, "inertia": 12.5},
        {"level": 1, "k": 8, "used": 5, "utilisation": 0.625, "inertia": 3.1},
        {"level": 2, "codebook_size": 4, "used": 2, "utilisation": 0.5}]}  # import method: no inertia
    reports.plot_codebook_utilisation(stats, str(tmp_path / "u.png"))
    img = _read_png(tmp_path / "u.png")
    assert img.shape == (360, 780, 3)  # (1.6 x 3 levels + 3) x 3.6 in at 100 dpi
    _assert_not_blank(img)
    # One bar per level, its height in pixels proportional to the level's utilisation.
    bar = _mask(img, BAR, tol=4)
    cols = np.flatnonzero(bar.sum(0) > 0)
    groups = np.split(cols, np.flatnonzero(np.diff(cols) > 1) + 1)
    heights = np.array([bar[:, g].sum(0).max() for g in groups])
    assert len(groups) == 3 and heights[0] > 100, heights
    assert heights / heights[0] == pytest.approx([1.0, 0.625, 0.5], abs=0.02)
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
