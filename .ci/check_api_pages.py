"""Check the built site (after `mkdocs build`) as a reader sees it.

Every page:

- no line of a code block (``<pre>``) is longer than ``MAX_CODE_LINE`` characters, what the
  content column shows at 1280 px;
- in a real browser (headless Chromium through Playwright, 1280 px wide): no code block hides
  part of a line behind a scroll bar, and no table is wider than its container unless it sits
  in a box of its own that scrolls (the theme wraps tables in one) and that box fits the
  column.

The API pages (site/api) also: a Returns or Yields section renders as one row (griffe read
``text: more`` in it as named values otherwise) and shows no literal double backticks.

    python .ci/check_api_pages.py [site] [--no-browser]

Exit status 1 when anything is found (each problem printed), 0 otherwise. Without Chromium
(``apt-get install chromium``, or ``HARMA_CHROMIUM``) or Playwright the browser part is an
error, unless ``--no-browser`` skips it.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import sys
from pathlib import Path

MAX_CODE_LINE = 85
VIEWPORT = {"width": 1280, "height": 900}
SECTION = re.compile(r'<span class="doc-section-title">(Returns|Yields):</span>(.*?)</table>', re.S)
PRE = re.compile(r"<pre[^>]*>(.*?)</pre>", re.S)
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# Widths as the browser lays the page out. A table may be wider than the column only inside
# an ancestor that scrolls horizontally (overflow-x auto or scroll) and is itself no wider
# than the content area; a code block's text must fit its box.
MEASURE = """() => {
  const content = document.querySelector('.md-content');
  const inner = document.querySelector('.md-content__inner') || document.body;
  const limit = content ? content.getBoundingClientRect().right + 1 : innerWidth;
  const label = (el) => (el.closest('[id]') || {}).id || '';
  const found = [];
  for (const table of inner.querySelectorAll('table')) {
    let box = table.parentElement;
    while (box && box !== inner) {
      const overflow = getComputedStyle(box).overflowX;
      if (overflow === 'auto' || overflow === 'scroll') break;
      box = box.parentElement;
    }
    const scrolls = box && box !== inner;
    const head = table.querySelector('th, td');
    const name = head ? head.textContent.trim().slice(0, 30) : '';
    if (scrolls) {
      if (box.getBoundingClientRect().right > limit)
        found.push(`the scroll box of the table "${name}" is wider than the column`);
    } else if (table.getBoundingClientRect().right > inner.getBoundingClientRect().right + 1) {
      found.push(`the table "${name}" (${Math.round(table.scrollWidth)} px) is wider ` +
                 `than its container (${inner.clientWidth} px) and does not scroll`);
    }
  }
  for (const code of inner.querySelectorAll('pre > code')) {
    if (code.scrollWidth > code.clientWidth + 1) {
      const line = code.textContent.split('\\n').reduce((a, b) => (b.length > a.length ? b : a), '');
      found.push(`a code block hides ${code.scrollWidth - code.clientWidth} px of ` +
                 `"${line.trim().slice(0, 50)}" (${line.length} characters)`);
    }
  }
  return found;
}"""


def text_of(fragment: str) -> str:
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", fragment)))


def api_problems(source: str) -> list[str]:
    found = []
    for match in SECTION.finditer(source):
        start = source.rfind('id="harma.', 0, match.start())
        anchor = source[start + 4 : source.find('"', start + 4)]
        rows = match.group(2).count('<tr class="doc-section-item">')
        if rows > 1:
            found.append(f"{anchor}: its {match.group(1)} section renders as {rows} rows")
        if "``" in text_of(match.group(2)):
            found.append(f"{anchor}: its {match.group(1)} section shows literal double backticks")
    return found


def code_line_problems(source: str) -> list[str]:
    found = []
    for match in PRE.finditer(source):
        for line in html.unescape(re.sub(r"<[^>]+>", "", match.group(1))).split("\n"):
            if len(line) > MAX_CODE_LINE:
                found.append(f"a code line of {len(line)} characters (at most {MAX_CODE_LINE}): "
                             f"{line.strip()[:60]}...")
    return found


def find_chromium() -> str | None:
    explicit = os.environ.get("HARMA_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    return next((found for name in CHROMIUM_NAMES if (found := shutil.which(name))), None)


def browser_problems(pages: list[Path]) -> dict[Path, list[str]]:
    """Lay every page out at 1280 px in headless Chromium and measure its tables and code."""
    chromium = find_chromium()
    if chromium is None:
        raise RuntimeError("no Chromium found (apt-get install chromium, or set HARMA_CHROMIUM); "
                           "--no-browser skips the layout check")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise RuntimeError("Playwright is not installed (pip install playwright, in the dev extra); "
                           "--no-browser skips the layout check") from None
    found = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            for path in pages:
                page.goto(path.resolve().as_uri(), wait_until="load")
                found[path] = page.evaluate(MEASURE)
        finally:
            browser.close()
    return found


def main(argv: list[str]) -> int:
    args = [arg for arg in argv if arg != "--no-browser"]
    site = Path(args[0] if args else "site")
    pages = sorted(site.rglob("index.html"))
    api = site / "api"
    if not any(api in page.parents for page in pages):
        print(f"no API pages under {api}; run mkdocs build first", file=sys.stderr)
        return 1
    found = []
    for page in pages:
        source = page.read_text(encoding="utf-8")
        name = str(page.parent.relative_to(site)) or "home"
        problems = code_line_problems(source) + (api_problems(source) if api in page.parents else [])
        found += [f"{name}: {problem}" for problem in problems]
    checked = "characters"
    if "--no-browser" not in argv:
        try:
            measured = browser_problems(pages)
        except RuntimeError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        found += [f"{str(page.parent.relative_to(site)) or 'home'}: {problem}"
                  for page, problems in measured.items() for problem in problems]
        checked = f"characters and layout at {VIEWPORT['width']} px in Chromium"
    for problem in found:
        print(problem, file=sys.stderr)
    print(f"checked {len(pages)} pages ({checked}): {len(found)} problem(s)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
