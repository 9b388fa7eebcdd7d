"""Loading the repository's scripts (``benchmarks/``, ``examples/``) as modules, for tests."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_repo_script(relative_path: str, *, cached: bool = True) -> ModuleType:
    """The script at ``relative_path`` of the repository as a module. ``cached``: executed once
    and kept in ``sys.modules`` (dataclasses look their module up there); otherwise executed
    afresh on every call."""
    name = "harma_script_" + re.sub(r"\W", "_", relative_path.removesuffix(".py"))
    if cached and name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / relative_path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    if cached:
        sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
