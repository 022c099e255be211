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
    "car": {1: 7.15505, 10: 6.933621, 20: 6.409102, 30: 5.90505},
    "tiger": {1: 2.406905, 10: 2.32376, 20: 2.187489, 30: 2.162946},
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
