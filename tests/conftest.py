"""Settings shared by every test."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# Tests in subfolders (laid out like the package) import the shared helpers (tiny_models,
# processes) by their bare names.
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(autouse=True)
def one_thread():
    """Tests use tiny models, which gain nothing from several threads; on a shared machine,
    OpenMP threads competing with other processes make them many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
