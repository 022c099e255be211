"""Golden losses of the whole trainer: the session's tiny CAR and TIGER runs (tests/conftest.py ``car_run`` and
``tiger_run``: ``python jobs/train.py``, one rank, a real DeepSpeed engine at ZeRO 0, the streamed data path, length
groups, dropout on) log the training loss at steps 1, 10, 20 and 30; they are pinned to what the code gave when they
were recorded. Speed work on the data path, the step or the engine that changes what is learned fails here. Re-record
only for an intended change:

    python -m pytest tests/training/test_golden_trainer.py -s   (prints the values to paste)
"""

from __future__ import annotations

import json
import os

import pytest

GOLDEN = {
    "car": {1: 7.157474, 10: 6.926864, 20: 6.404552, 30: 5.907537},
    "tiger": {1: 2.397129, 10: 2.327673, 20: 2.197541, 30: 2.131187},
}


def _losses(run_dir: str) -> dict[int, float]:
    with open(os.path.join(run_dir, "history.json")) as fh:
        return {row["step"]: round(row["train/loss"], 6) for row in json.load(fh) if "train/loss" in row}


@pytest.mark.parametrize("which", sorted(GOLDEN))
def test_trainer_losses_are_pinned(which, request):
    got = _losses(request.getfixturevalue(f"{which}_run"))
    print(f'    "{which}": {got},')
    assert sorted(got) == [1, 10, 20, 30]
    assert got == pytest.approx(GOLDEN[which], abs=2e-4), got
