"""Settings shared by every test."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Tests use tiny models, which gain nothing from several threads; on a shared machine,
    OpenMP threads competing with other processes make them many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
