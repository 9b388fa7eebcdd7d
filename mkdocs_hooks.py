"""MkDocs hooks of the documentation site (mkdocs.yml: ``hooks``)."""

from __future__ import annotations

import html
import re

SKIP = re.compile(r'^<!--\s*skip:\s*next\s+"(?P<reason>[^"]+)"\s*-->\s*$', re.M)


def on_page_markdown(markdown: str, **_: object) -> str:
    """Show readers what a block the offline snippet test skips needs ("needs the authors'
    checkpoint file"): the skip comment itself is invisible in the rendered page."""
    return SKIP.sub(
        lambda match: f'<p class="snippet-needs"><em>Not runnable offline: '
        f"{html.escape(match.group('reason'))}.</em></p>",
        markdown,
    )
