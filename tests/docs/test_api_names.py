"""The API pages (mkdocs.yml: ``filters: public``, ``members_order: [__all__, source]``) show a
module's ``__all__``, in that order, and nothing else of it: every name listed must exist and
carry a docstring, or the page would show a hole."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTED = sorted({line.split()[1] for page in (ROOT / "docs" / "api").glob("*.md")
                     for line in page.read_text(encoding="utf-8").splitlines() if line.startswith("::: ")})


def documented_modules() -> list[str]:
    modules = []
    for name in DOCUMENTED:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue  # a class or function of a module (harma.integrations.peft.HarmaTuner)
        modules.append(module.__name__)
    return modules


@pytest.mark.parametrize("name", documented_modules())
def test_every_name_a_page_lists_exists_and_has_a_docstring(name: str):
    module = importlib.import_module(name)
    for public in getattr(module, "__all__", []):
        assert hasattr(module, public), f"{name}.__all__ names {public!r}, which does not exist"
        obj = getattr(module, public)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert (obj.__doc__ or "").strip(), f"{name}.{public} has no docstring for its API page"


def test_the_core_pages_list_public_functions_only():
    import harma.named_adapters

    assert harma.named_adapters.__all__[0] == "set_adapter"
    assert "adapter_registry" not in harma.named_adapters.__all__
