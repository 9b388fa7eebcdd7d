"""Helpers of the archive search tests (a module of its own, not conftest: the processes that
the multi-process tests spawn import the test modules, and there ``conftest`` would be the
suite's root conftest)."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import harma
from harma.search.cli import main

REPO = Path(__file__).resolve().parents[2]
ADAPTER_LAYOUT = harma.HarmaConfig(bottleneck=16, heads=2, mini_bottleneck=8, mini_heads=2)


@dataclass
class Archive:
    root: Path
    images: Path
    config: Path
    backbone: Path
    adapters: Path
    other_adapters: Path

    def model_args(self, adapters: Path | None | str = "default") -> list[str]:
        args = ["--model", "tiny", "--model_config", str(self.config), "--pretrained", str(self.backbone)]
        chosen = self.adapters if adapters == "default" else adapters
        return args + (["--adapters", str(chosen)] if chosen is not None else [])


def write_images(folder: Path, count: int, seed: int = 0) -> None:
    """``count`` PNG images in two class folders, each with a distinct colour and stripes."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        target = folder / ("fields" if i % 2 else "roofs")
        target.mkdir(parents=True, exist_ok=True)
        pixels = np.zeros((36, 44, 3), dtype=np.uint8) + rng.integers(0, 255, 3, dtype=np.uint8)
        pixels[:: 2 + i % 5] = rng.integers(0, 255, 3, dtype=np.uint8)
        Image.fromarray(pixels).save(target / f"img{i:03d}.png")


def adapter_file(model: torch.nn.Module, path: Path, seed: int) -> Path:
    harma.inject_harma_adapters(model, ADAPTER_LAYOUT)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in harma.adapter_parameters(model):
            param.add_(torch.randn(param.shape, generator=generator) * 0.2)
    harma.save_adapters(model, path)
    harma.remove_harma_adapters(model)
    return path


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch at one thread inside. The suite's ``one_thread`` fixture is function-scoped, so
    session and module fixtures (``built_index``) ran at the default count, while the indexes
    compared with theirs bitwise are built at one thread (in tests, in subprocesses with
    ``OMP_NUM_THREADS=1``, by ranks): PyTorch may route another thread count differently."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_search(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m harma.search ARGS`` run in this process at one thread (the same code as the
    command line, without a new interpreter's start-up): its exit status and what it printed."""
    stdout, stderr = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), one_thread():
        try:
            main(list(args))
        except SystemExit as error:
            code = error.code if isinstance(error.code, int) else 1
    result = subprocess.CompletedProcess(args, code, stdout.getvalue(), stderr.getvalue())
    if check and code != 0:
        raise AssertionError(f"exit {code}\n{result.stdout}\n{result.stderr}")
    return result


def run_search_process(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m harma.search ARGS`` in a fresh process, with this tree first on the path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "harma.search", *args], capture_output=True, text=True,
                            env=env, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result
