"""The markup the snippet test (conftest.py at the repository root, Sybil) relies on.

Sybil runs the ``python`` blocks of README.md and docs/*.md. A ``<!-- skip: next "reason" -->``
comment skips the next *Python* block, wherever it is: before a ``bash`` block it would silently
skip an unrelated Python block further down. Every skip must therefore sit right before a Python
block and give its reason, which the test report shows.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SKIP = re.compile(r"<!--\s*skip:(?P<body>.*?)-->", re.S)
REASON = re.compile(r'\s*next\s+"[^"]+"\s*$')
FENCE = re.compile(r"^(```+|~~~+)\s*(?P<info>\S*)", re.M)


def skips_and_next_fence(text: str):
    for match in SKIP.finditer(text):
        following = text[match.end():]
        fence = FENCE.search(following)
        gap = following[: fence.start()] if fence else following
        yield match, (fence.group("info") if fence else None), gap


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_skip_directive_gives_a_reason_and_precedes_a_python_block(page: Path):
    text = page.read_text(encoding="utf-8")
    for match, info, gap in skips_and_next_fence(text):
        line = text.count("\n", 0, match.start()) + 1
        assert REASON.match(match.group("body")), f"{page.name}:{line}: write skip: next \"reason\""
        assert info == "python", f"{page.name}:{line}: the skip is followed by a {info!r} block, not python"
        assert not gap.strip(), f"{page.name}:{line}: text between the skip and its block: {gap.strip()[:40]!r}"


def test_the_markup_check_sees_a_misplaced_skip():
    text = '<!-- skip: next "needs data" -->\n```bash\nls\n```\n\n```python\nx = 1\n```\n'
    [(_, info, _)] = list(skips_and_next_fence(text))
    assert info == "bash"


MAX_CODE_LINE = 85  # what the docs' content column shows at 1280 px (.ci/check_api_pages.py)


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_no_code_line_is_wider_than_the_page_shows(page: Path):
    inside, wide = False, []
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line.lstrip()):
            inside = not inside
        elif inside and len(line) > MAX_CODE_LINE:
            wide.append(f"{page.name}:{number}: {len(line)} characters")
    assert not wide, "code lines wider than the page: " + "; ".join(wide)
