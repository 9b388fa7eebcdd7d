"""The Python blocks of README.md and of every docs page run as tests (Sybil).

Each page's blocks run in order in one namespace of their own, offline, with the working
directory a fresh temporary folder (files a block writes are gone afterwards) and one torch
thread. A block that needs what cannot exist offline (a download, a GPU, real data) is preceded
in the Markdown by ``<!-- skip: next "needs ..." -->`` and reported as skipped with that reason.
tests/docs/test_snippet_markup.py checks that every such comment sits right before a Python
block. Only ``python`` blocks run; signature listings and shell commands use other tags.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import torch

try:
    from sybil import Sybil
    from sybil.parsers.markdown import PythonCodeBlockParser, SkipParser
except ImportError:  # an environment without the dev extra (the GPU machine runs tests/ only)
    Sybil = None

STATE = "__docs_snippet_state__"


def enter_page(namespace: dict) -> None:
    folder = tempfile.mkdtemp(prefix="harma-docs-")
    namespace[STATE] = (os.getcwd(), folder, torch.get_num_threads())
    os.chdir(folder)
    torch.set_num_threads(1)


def leave_page(namespace: dict) -> None:
    cwd, folder, threads = namespace.pop(STATE)
    os.chdir(cwd)
    torch.set_num_threads(threads)
    shutil.rmtree(folder, ignore_errors=True)


if Sybil is not None:
    pytest_collect_file = Sybil(
        parsers=[PythonCodeBlockParser(), SkipParser()],
        patterns=["README.md", "docs/*.md", "docs/*/*.md"],
        setup=enter_page,
        teardown=leave_page,
    ).pytest()
else:

    class SnippetsNeedSybil(pytest.Item):
        """Stands for a page's snippets where Sybil is missing: it fails, saying so (never a
        silent pass); the tests under tests/ run as usual."""

        def runtest(self) -> None:
            raise RuntimeError(f"{self.path.name}: running the docs' snippets needs Sybil (pip install -e '.[dev]')")

        def reportinfo(self):
            return self.path, 0, f"{self.path.name}: snippets"

    class PageWithoutSybil(pytest.File):
        def collect(self):
            yield SnippetsNeedSybil.from_parent(self, name="snippets")

    def pytest_collect_file(file_path, parent):
        relative = file_path.relative_to(parent.config.rootpath).parts
        if relative == ("README.md",) or (file_path.suffix == ".md" and relative[0] == "docs" and len(relative) <= 3):
            return PageWithoutSybil.from_parent(parent, path=file_path)
        return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A skipped block is reported at its line of the page, not inside pytest."""
    outcome = yield
    report = outcome.get_result()
    example = getattr(item, "example", None)
    if example is not None and report.skipped and isinstance(report.longrepr, tuple):
        report.longrepr = (str(example.path), example.line, report.longrepr[2])
