"""Shared test fixtures."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """One torch thread for the test, restored after it.  Tiny tensors gain nothing from a
    second intra-op thread and stall on its synchronisation on a busy 2-core machine; the
    runtime's actors also compute with one thread, so references match them bit for bit."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
