"""Check the built API pages (site/api) as a reader sees them, after `mkdocs build`.

Fails (exit 1) when a Returns section renders as several rows (griffe read ``text: more`` in it
as named values) or shows literal double backticks, or when a signature line is wider than the
configured ``line_length`` (no signature formatter was installed).

    python .ci/check_api_pages.py [site]
"""

from __future__ import annotations

import html
import re
import sys
from pathlib import Path

MAX_SIGNATURE_LINE = 88
SECTION = re.compile(r'<span class="doc-section-title">(Returns|Yields):</span>(.*?)</table>', re.S)
SIGNATURE = re.compile(r'class="doc-signature[^"]*"(.*?)</code></pre>', re.S)


def text_of(fragment: str) -> str:
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", fragment)))


def problems(page: Path) -> list[str]:
    source = page.read_text(encoding="utf-8")
    found = []
    for match in SECTION.finditer(source):
        start = source.rfind('id="harma.', 0, match.start())
        anchor = source[start + 4 : source.find('"', start + 4)]
        rows = match.group(2).count('<tr class="doc-section-item">')
        if rows > 1:
            found.append(f"{anchor}: its {match.group(1)} section renders as {rows} rows")
        if "``" in text_of(match.group(2)):
            found.append(f"{anchor}: its {match.group(1)} section shows literal double backticks")
    for match in SIGNATURE.finditer(source):
        lines = html.unescape(re.sub(r"<[^>]+>", "", match.group(1))).split("\n")
        wide = max(lines, key=len)
        if len(wide) > MAX_SIGNATURE_LINE:
            found.append(f"a signature line of {len(wide)} characters is not wrapped: {wide[:60]}...")
    return found


def main() -> int:
    site = Path(sys.argv[1] if len(sys.argv) > 1 else "site")
    pages = sorted((site / "api").rglob("index.html"))
    if not pages:
        print(f"no API pages under {site / 'api'}; run mkdocs build first", file=sys.stderr)
        return 1
    found = [f"{page.parent.name}: {problem}" for page in pages for problem in problems(page)]
    for problem in found:
        print(problem, file=sys.stderr)
    print(f"checked {len(pages)} API pages: {len(found)} problem(s)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
