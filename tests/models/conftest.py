import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every model test runs on one thread (fixture ``one_thread`` in tests/conftest.py)."""


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)
