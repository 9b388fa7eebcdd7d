"""Settings shared by every test."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

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


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--no-routing-noise",
        action="store_true",
        help="run nn.MultiheadAttention unchanged (by default the suite makes an unfrozen one round "
        "differently from a frozen one, as PyTorch's CPU kernels do on some processors)",
    )


@pytest.fixture(autouse=True, scope="session")
def routing_noise(request: pytest.FixtureRequest):
    """Every machine rounds unfrozen attention differently from frozen attention, as some do.

    On some CPUs (AMD EPYC, for one) PyTorch computes a frozen ``nn.MultiheadAttention`` through
    another kernel than an unfrozen one, and the outputs differ in the last bits (about 1e-6 for the
    tiny test models). A test comparing the two bitwise passes on the machine it was written on
    and fails there. This fixture scales the output of every ``nn.MultiheadAttention`` whose
    parameters require grad by ``1 + 2**-20``, so that such a test fails on every machine, while
    like-with-like comparisons (both frozen, or both unfrozen) are unaffected. Processes a test
    starts (scripts, torchrun workers) run unpatched.
    """
    if request.config.getoption("--no-routing-noise"):
        yield
        return
    original = nn.MultiheadAttention.forward

    def forward(self: nn.MultiheadAttention, *args, **kwargs):
        output = original(self, *args, **kwargs)
        if not any(param.requires_grad for param in self.parameters()):
            return output
        attended, *rest = output
        return (attended * (1 + 2.0**-20), *rest)

    nn.MultiheadAttention.forward = forward
    try:
        yield
    finally:
        nn.MultiheadAttention.forward = original
