"""benchmarks/scale.py --merge: a rerun of some stages keeps the other rows of the JSON and recomputes the growth."""

from __future__ import annotations

import json

from benchmarks.scale import exponents, merged


def _row(scale, stage, seconds, measured=None):
    return {"scale": scale, "stage": stage, "rc": 0, "seconds": seconds, **({"measured": measured} if measured else {})}


def test_merge_keeps_rows_not_remeasured_and_replaces_the_others(tmp_path):
    out = tmp_path / "scale.json"
    old = [_row(1.0, "prepare", 5.0), _row(1.0, "train-car", 50.0), _row(10.0, "prepare", 20.0),
           _row(10.0, "train-car", 100.0), _row(None, "minilm", 40.0)]
    out.write_text(json.dumps({"rows": old, "growth": []}))
    new = [_row(1.0, "train-car", 30.0, "now"), _row(10.0, "train-car", 300.0, "now")]
    rows = merged(str(out), new)
    assert [(r["scale"], r["stage"], r["seconds"]) for r in rows] == [
        (1.0, "prepare", 5.0), (1.0, "train-car", 30.0), (10.0, "prepare", 20.0), (10.0, "train-car", 300.0),
        (None, "minilm", 40.0)]
    growth = {g["stage"]: round(g["time_exponent"], 3) for g in exponents(rows)}
    assert growth == {"prepare": 0.602, "train-car": 1.0}  # log10(20/5), log10(300/30): the new rows' growth
    assert merged(str(tmp_path / "none.json"), new) == new
