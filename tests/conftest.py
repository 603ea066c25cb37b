"""Shared fixtures."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Test problems are tiny: one thread is faster, and does not oversubscribe a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
