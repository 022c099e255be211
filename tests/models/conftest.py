import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Toy models are faster on one thread; intra-op threads on the shared 2-core box mostly wait on each other."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)
