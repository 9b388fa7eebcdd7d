"""Drawing a `harma.training.gallery.RetrievalGallery`: `render_gallery_html` (one
self-contained HTML file: thumbnails embedded as base64 PNG, inline CSS, no scripts),
`render_gallery_png` (a contact sheet), or `write_gallery`, which picks one from the file name.
Only PIL is needed.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from ..io import atomic_write, atomic_write_text
from ..retrieval import METRIC_KEYS
from .captions import DatasetImage
from .gallery import GALLERY_SUFFIXES, ImageSource, RankedQuery, RetrievalGallery

__all__ = ["render_gallery_html", "render_gallery_png", "write_gallery"]

_HIT_COLOUR = (30, 140, 60)
_MISS_COLOUR = (205, 205, 205)
_TRUTH_COLOUR = (215, 130, 0)
_TEXT_COLOUR = (35, 35, 35)
_FAINT_TEXT_COLOUR = (110, 110, 110)
_BACKGROUND = (255, 255, 255)

# ------------------------------------------------------------------------------ thumbnails


def _check_sources(gallery: RetrievalGallery, images: Sequence[ImageSource], captions: Sequence[str]) -> None:
    if len(images) != gallery.n_images:
        raise ValueError(f"the gallery ranks {gallery.n_images} images but {len(images)} images were given")
    if len(captions) != gallery.n_texts:
        raise ValueError(
            f"the gallery ranks {gallery.n_texts} captions but {len(captions)} captions were given"
        )


def _check_thumbnail_size(thumbnail_size: int) -> None:
    if isinstance(thumbnail_size, bool) or not isinstance(thumbnail_size, int) or thumbnail_size < 16:
        raise ValueError(f"thumbnail_size must be an integer >= 16 (pixels), got {thumbnail_size!r}")


def _load_thumbnail(source: ImageSource, size: int) -> Image.Image:
    """An RGB copy of ``source`` whose longer side is ``size`` pixels."""
    if isinstance(source, Image.Image):
        image = source.convert("RGB")
    elif isinstance(source, DatasetImage):  # stored in a Hugging Face dataset
        with source.open() as opened:
            image = opened.convert("RGB")
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"gallery image not found: '{path}'")
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    scale = size / max(image.size)
    new_size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    # Enlarged small images keep hard pixel edges, so a 32-pixel scene does not pass for a
    # sharp photograph; reduced ones are filtered properly.
    resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS
    return image.resize(new_size, resample)


class _ThumbnailCache:
    """Each image is opened and resized once per rendering, however often it is shown."""

    def __init__(self, images: Sequence[ImageSource], size: int) -> None:
        self.images = images
        self.size = size
        self.thumbnails: dict[int, Image.Image] = {}
        self.data_uris: dict[int, str] = {}

    def thumbnail(self, index: int) -> Image.Image:
        if index not in self.thumbnails:
            self.thumbnails[index] = _load_thumbnail(self.images[index], self.size)
        return self.thumbnails[index]

    def data_uri(self, index: int) -> str:
        if index not in self.data_uris:
            buffer = io.BytesIO()
            self.thumbnail(index).save(buffer, format="PNG", optimize=True)
            encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
            self.data_uris[index] = f"data:image/png;base64,{encoded}"
        return self.data_uris[index]


def _image_label(source: ImageSource, index: int) -> str:
    return Path(str(source)).name if not isinstance(source, Image.Image) else f"image {index}"


def _metrics_summary(metrics: Mapping[str, float] | None) -> str:
    if not metrics:
        return ""
    if all(key in metrics for key in METRIC_KEYS):
        recalls = {key: f"{float(metrics[key]):.2f}" for key in METRIC_KEYS}
        return (f"image->text R@1/5/10 {recalls['i2t_r1']} / {recalls['i2t_r5']} / {recalls['i2t_r10']}, "
                f"text->image R@1/5/10 {recalls['t2i_r1']} / {recalls['t2i_r5']} / {recalls['t2i_r10']}, "
                f"mean recall {recalls['mean_recall']} (percent, whole split)")
    return ", ".join(f"{key} {float(value):.2f}" for key, value in metrics.items())


# ------------------------------------------------------------------------------------ HTML

_HTML_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 24px;
       color: #232323; background: #fff; }
h1 { font-size: 1.3em; margin-bottom: 0.2em; }
h2 { font-size: 1.1em; margin-top: 2em; }
.summary, .legend { color: #555; font-size: 0.9em; }
table { border-collapse: collapse; }
tr.query-row { border-top: 1px solid #ddd; }
td { vertical-align: top; padding: 8px 6px; }
td.query { max-width: 260px; font-size: 0.95em; }
td.query .note { color: #666; font-size: 0.85em; margin-top: 6px; }
td.result, td.truth { text-align: center; font-size: 0.8em; color: #555; }
td.result img, td.truth img, td.query img { display: block; border: 4px solid #e4e4e4; margin: 0 auto 4px; }
td.result.hit img { border-color: #1e8c3c; }
td.truth img { border: 4px dashed #d78200; }
td.truth { color: #a86400; }
.mark { color: #1e8c3c; font-weight: bold; }
ol.captions { margin: 0; padding-left: 0; list-style: none; }
ol.captions li { padding: 3px 6px; margin-bottom: 2px; border-left: 4px solid #e4e4e4; }
ol.captions li.hit { border-left-color: #1e8c3c; background: #eef7f0; }
ol.captions li.truth { border-left: 4px dashed #d78200; color: #a86400; }
.rank { color: #777; font-variant-numeric: tabular-nums; margin-right: 0.5em; }
"""


def _img_tag(cache: _ThumbnailCache, index: int, label: str) -> str:
    text = html.escape(label, quote=True)
    return f'<img src="{cache.data_uri(index)}" alt="{text}" title="{text}">'


def _text_to_image_rows(
    gallery: RetrievalGallery, images: Sequence[ImageSource], captions: Sequence[str], cache: _ThumbnailCache
) -> list[str]:
    rows = []
    for query in gallery.text_to_image:
        position_note = (
            f"correct image at #{query.rank + 1}" if query.found
            else f"correct image not in the top {len(query.top)}: it is #{query.rank + 1}"
        )
        cells = [
            f'<td class="query"><div class="caption">{html.escape(captions[query.query])}</div>'
            f'<div class="note">caption {query.query}; {position_note}</div></td>'
        ]
        for position, image, score, hit in query.shown():
            mark = '<span class="mark">&#10003;</span> ' if hit else ""
            css_class = "result hit" if hit else "result"
            cells.append(
                f'<td class="{css_class}" data-position="{position}" data-index="{image}">'
                f"{_img_tag(cache, image, _image_label(images[image], image))}"
                f"{mark}#{position + 1} &middot; {score:.3f}</td>"
            )
        if not query.found:
            truth = query.best_relevant
            cells.append(
                f'<td class="truth" data-index="{truth}">'
                f"{_img_tag(cache, truth, _image_label(images[truth], truth))}correct: #{query.rank + 1}</td>"
            )
        rows.append(f'<tr class="query-row" data-query="{query.query}">{"".join(cells)}</tr>')
    return rows


def _image_to_text_rows(
    gallery: RetrievalGallery, images: Sequence[ImageSource], captions: Sequence[str], cache: _ThumbnailCache
) -> list[str]:
    rows = []
    for query in gallery.image_to_text:
        position_note = (
            f"first correct caption at #{query.rank + 1}" if query.found
            else f"no correct caption in the top {len(query.top)}: the first is #{query.rank + 1}"
        )
        label = _image_label(images[query.query], query.query)
        items = []
        for position, caption, score, hit in query.shown():
            mark = '<span class="mark">&#10003;</span> ' if hit else ""
            css_class = "result hit" if hit else "result"
            items.append(
                f'<li class="{css_class}" data-position="{position}" data-index="{caption}">'
                f'{mark}<span class="rank">#{position + 1} &middot; {score:.3f}</span>'
                f"{html.escape(captions[caption])}</li>"
            )
        if not query.found:
            truth = query.best_relevant
            items.append(
                f'<li class="truth" data-index="{truth}">correct: <span class="rank">#{query.rank + 1}</span>'
                f"{html.escape(captions[truth])}</li>"
            )
        rows.append(
            f'<tr class="query-row" data-query="{query.query}"><td class="query">'
            f"{_img_tag(cache, query.query, label)}"
            f'<div class="note">{html.escape(label)}; {position_note}</div></td>'
            f'<td><ol class="captions">{"".join(items)}</ol></td></tr>'
        )
    return rows


def render_gallery_html(
    gallery: RetrievalGallery,
    images: Sequence[ImageSource],
    captions: Sequence[str],
    *,
    title: str = "Retrieval gallery",
    metrics: Mapping[str, float] | None = None,
    thumbnail_size: int = 128,
) -> str:
    """One self-contained HTML page showing ``gallery``.

    Thumbnails are embedded as base64 PNG ``data:`` URIs, the CSS is inline, and there is no
    script or external resource, so the file can be mailed or attached as it is. All text
    (captions, file names, title) is HTML-escaped.

    Layout: a table per direction, one ``<tr class="query-row">`` per query. Caption queries:
    the caption, then ``k`` result cells (``<td class="result">``, ``class="result hit"`` with a
    green border and a check mark for the correct image), then, when the correct image is not
    among them, a ``<td class="truth">`` cell showing it with its rank. Image queries: the
    image, then a list of ``k`` captions marked the same way (``<li class="result hit">``).
    Result elements carry ``data-position`` (0-based) and ``data-index`` (image or caption
    index).

    Args:
        gallery: from `build_gallery` or `build_gallery_from_embeddings`.
        images: ``(n_images,)`` image file paths or PIL images, indexed as the gallery's image
            indices (``RetrievalEvalDataset.image_paths``).
        captions: ``(n_texts,)`` caption strings (``RetrievalEvalDataset.captions``).
        title: the page heading.
        metrics: shown under the heading, e.g. the ``retrieval_metrics`` dict (percent).
        thumbnail_size: longer side of the thumbnails, in pixels.

    Raises:
        ValueError: ``images`` or ``captions`` not matching the gallery's sizes.
        FileNotFoundError: an image file that is shown does not exist.
    """
    _check_sources(gallery, images, captions)
    _check_thumbnail_size(thumbnail_size)
    cache = _ThumbnailCache(images, thumbnail_size)
    summary = _metrics_summary(metrics)
    k_images, k_captions = gallery.images_per_query, gallery.captions_per_query
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_HTML_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="summary">{html.escape(summary)}</p>' if summary else "",
        f'<p class="legend">{gallery.n_images} images, {gallery.n_texts} captions. '
        '<span class="mark">&#10003;</span> green: a correct result; dashed orange: the correct '
        "item when it is not among those shown, with its rank. Scores are similarities.</p>",
        f'<section id="text-to-image"><h2>Caption &rarr; top-{k_images} images '
        f"({len(gallery.text_to_image)} sample captions)</h2><table>",
        *_text_to_image_rows(gallery, images, captions, cache),
        "</table></section>",
        f'<section id="image-to-text"><h2>Image &rarr; top-{k_captions} captions '
        f"({len(gallery.image_to_text)} sample images)</h2><table>",
        *_image_to_text_rows(gallery, images, captions, cache),
        "</table></section>",
        "</body></html>",
    ]
    return "\n".join(part for part in parts if part) + "\n"


# ------------------------------------------------------------------------------------- PNG

Colour = tuple[int, int, int]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one fixed-size bitmap font
        return ImageFont.load_default()


def _fit_line(draw: ImageDraw.ImageDraw, text: str, font: Any, width: float) -> str:
    """``text`` cut (with an ellipsis) to at most ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text.rstrip() + "..."


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: Any, width: float, max_lines: int) -> list[str]:
    """``text`` in at most ``max_lines`` lines of at most ``width`` pixels, the last one cut."""
    lines: list[str] = []
    words = text.split()
    current = ""
    for position, word in enumerate(words):
        candidate = f"{current} {word}".strip()
        if not current or draw.textlength(candidate, font=font) <= width:
            current = candidate
            continue
        lines.append(current)
        if len(lines) == max_lines - 1:
            current = " ".join(words[position:])
            break
        current = word
    if current:
        lines.append(current)
    return [_fit_line(draw, line, font, width) for line in lines[:max_lines]]


def _draw_check(draw: ImageDraw.ImageDraw, x: float, y: float, size: float) -> None:
    """A white check mark on a green disc, top-left corner at ``(x, y)``. Drawn as lines:
    the default font need not have a check-mark glyph."""
    draw.ellipse((x, y, x + size, y + size), fill=_HIT_COLOUR)
    points = [(x + 0.25 * size, y + 0.52 * size), (x + 0.43 * size, y + 0.7 * size),
              (x + 0.76 * size, y + 0.32 * size)]
    draw.line(points, fill=(255, 255, 255), width=max(2, round(size / 7)), joint="curve")


@dataclass(frozen=True)
class _SheetLayout:
    """Sizes of the contact sheet, in pixels."""

    thumb: int
    pad: int = 10
    border: int = 4
    text_column: int = 260
    body_size: int = 13
    heading_size: int = 17

    @property
    def cell(self) -> int:
        return self.thumb + 2 * self.border

    @property
    def line_height(self) -> int:
        return self.body_size + 5

    @property
    def results_x(self) -> int:
        return self.pad + self.text_column + self.pad

    def width(self, k: int) -> int:
        # the query column, k result cells, then the cell of the correct image of a miss
        return self.results_x + (k + 1) * (self.cell + self.pad) + self.pad

    def caption_row_height(self) -> int:
        return self.cell + self.line_height + 2 * self.pad

    def image_row_height(self, k: int) -> int:
        return max(self.cell, (k + 2) * self.line_height) + 2 * self.pad


class _Sheet:
    """The contact sheet being drawn, with its fonts and thumbnails."""

    def __init__(self, width: int, height: int, layout: _SheetLayout, cache: _ThumbnailCache) -> None:
        self.image = Image.new("RGB", (width, height), _BACKGROUND)
        self.draw = ImageDraw.Draw(self.image)
        self.layout = layout
        self.cache = cache
        self.body = _font(layout.body_size)
        self.small = _font(layout.body_size - 2)
        self.heading = _font(layout.heading_size)

    def text(
        self, x: float, y: float, text: str, font: Any, colour: Colour, width: float | None = None
    ) -> None:
        """Draw ``text`` at ``(x, y)``, cut to ``width`` pixels when given."""
        self.draw.text((x, y), text if width is None else _fit_line(self.draw, text, font, width),
                       font=font, fill=colour)

    def separator(self, y: int) -> None:
        self.draw.line((self.layout.pad, y, self.image.width - self.layout.pad, y), fill=(225, 225, 225))

    def framed_thumbnail(self, index: int, x: int, y: int, colour: Colour, dashed: bool = False) -> None:
        layout, cell = self.layout, self.layout.cell
        if dashed:
            dash = 6
            for start in range(0, cell, 2 * dash):
                stop = min(start + dash, cell - 1)
                for inset in range(layout.border):
                    near, far = inset, cell - 1 - inset
                    for line in ((start, near, stop, near), (start, far, stop, far),
                                 (near, start, near, stop), (far, start, far, stop)):
                        self.draw.line((x + line[0], y + line[1], x + line[2], y + line[3]), fill=colour)
        else:
            self.draw.rectangle((x, y, x + cell - 1, y + cell - 1), outline=colour, width=layout.border)
        thumbnail = self.cache.thumbnail(index)
        # A thumbnail that is not square is centred in its square frame.
        self.image.paste(thumbnail, (x + layout.border + (layout.thumb - thumbnail.width) // 2,
                                     y + layout.border + (layout.thumb - thumbnail.height) // 2))

    def caption_query_row(self, query: RankedQuery, caption: str, k: int, top: int) -> None:
        layout = self.layout
        max_lines = max(1, layout.cell // layout.line_height)
        caption_lines = _wrap(self.draw, caption, self.body, layout.text_column, max_lines)
        for line_number, line in enumerate(caption_lines):
            self.text(layout.pad, top + line_number * layout.line_height, line, self.body, _TEXT_COLOUR)
        note = f"correct: #{query.rank + 1}" if query.found else f"missed (correct #{query.rank + 1})"
        self.text(layout.pad, top + max_lines * layout.line_height, note, self.small,
                  _HIT_COLOUR if query.found else _TRUTH_COLOUR)
        check_size = max(14, layout.thumb // 5)
        label_y = top + layout.cell + 2
        for position, image, score, hit in query.shown():
            x = layout.results_x + position * (layout.cell + layout.pad)
            self.framed_thumbnail(image, x, top, _HIT_COLOUR if hit else _MISS_COLOUR)
            if hit:
                _draw_check(self.draw, x + layout.cell - check_size - 2, top + 2, check_size)
            self.text(x, label_y, f"#{position + 1}  {score:.3f}", self.small,
                      _HIT_COLOUR if hit else _FAINT_TEXT_COLOUR, width=layout.cell)
        if not query.found:
            x = layout.results_x + k * (layout.cell + layout.pad) + layout.pad
            self.framed_thumbnail(query.best_relevant, x, top, _TRUTH_COLOUR, dashed=True)
            self.text(x, label_y, f"correct: #{query.rank + 1}", self.small, _TRUTH_COLOUR, width=layout.cell)

    def image_query_row(self, query: RankedQuery, captions: Sequence[str], top: int) -> None:
        layout = self.layout
        self.framed_thumbnail(query.query, layout.pad, top, _MISS_COLOUR)
        check_x = layout.pad + layout.cell + 2 * layout.pad
        text_x = check_x + layout.body_size + 6
        right = self.image.width - layout.pad
        for position, caption, score, hit in query.shown():
            line_y = top + position * layout.line_height
            if hit:
                _draw_check(self.draw, check_x, line_y + 1, layout.body_size)
            prefix = f"#{position + 1}  {score:.3f}   "
            self.text(text_x, line_y, prefix, self.body, _FAINT_TEXT_COLOUR)
            caption_x = text_x + self.draw.textlength(prefix, font=self.body)
            self.text(caption_x, line_y, captions[caption], self.body, _HIT_COLOUR if hit else _TEXT_COLOUR,
                      width=right - caption_x)
        if not query.found:
            text = f"correct caption: #{query.rank + 1}  {captions[query.best_relevant]}"
            self.text(text_x, top + len(query.top) * layout.line_height, text, self.body, _TRUTH_COLOUR,
                      width=right - text_x)


def render_gallery_png(
    gallery: RetrievalGallery,
    images: Sequence[ImageSource],
    captions: Sequence[str],
    *,
    title: str = "Retrieval gallery",
    metrics: Mapping[str, float] | None = None,
    thumbnail_size: int = 96,
) -> Image.Image:
    """A contact sheet of ``gallery`` as one RGB PIL image (PIL only, no matplotlib).

    Top part, one row per caption query: the caption (wrapped), its ``k`` retrieved images
    (correct ones in a green frame with a check mark, others in a grey frame; rank and score
    under each), and, when the correct image is not among them, the correct image in a dashed
    orange frame with its rank. Bottom part, one row per image query: the image and its ``k``
    captions, correct ones in green with a check mark, then the best-placed correct caption
    with its rank when none is shown.

    The sheet is ``290 + (k + 1) * (thumbnail_size + 18)`` pixels wide (974 for ``k=5`` at 96
    pixels; ``k`` is `RetrievalGallery.images_per_query`) and about ``thumbnail_size + 46`` pixels high per query row, plus headings.

    Args:
        gallery: as `render_gallery_html`.
        images: as `render_gallery_html`.
        captions: as `render_gallery_html`.
        title: as `render_gallery_html`.
        metrics: as `render_gallery_html`.
        thumbnail_size: longer side of the thumbnails, in pixels.

    Raises:
        ValueError: ``images`` or ``captions`` not matching the gallery's sizes.
        FileNotFoundError: an image file that is shown does not exist.
    """
    _check_sources(gallery, images, captions)
    _check_thumbnail_size(thumbnail_size)
    layout = _SheetLayout(thumb=thumbnail_size)
    k_images, k_captions = gallery.images_per_query, gallery.captions_per_query
    width = layout.width(k_images)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    heading, small = _font(layout.heading_size), _font(layout.body_size - 2)
    title_lines = _wrap(measure, title, heading, width - 2 * layout.pad, 3)
    summary = _metrics_summary(metrics)
    summary_lines = _wrap(measure, summary, small, width - 2 * layout.pad, 3) if summary else []
    title_height = layout.heading_size + 6
    section_height = layout.heading_size + 2 * layout.pad
    height = (
        layout.pad + len(title_lines) * title_height + len(summary_lines) * layout.line_height + layout.pad
        + 2 * section_height
        + len(gallery.text_to_image) * layout.caption_row_height()
        + len(gallery.image_to_text) * layout.image_row_height(k_captions)
        + layout.pad
    )
    sheet = _Sheet(width, height, layout, _ThumbnailCache(images, thumbnail_size))

    y = layout.pad
    for line in title_lines:
        sheet.text(layout.pad, y, line, sheet.heading, _TEXT_COLOUR)
        y += title_height
    for line in summary_lines:
        sheet.text(layout.pad, y, line, sheet.small, _FAINT_TEXT_COLOUR)
        y += layout.line_height
    y += layout.pad
    sheet.text(layout.pad, y + layout.pad // 2, f"Caption -> top-{k_images} images", sheet.heading,
               _TEXT_COLOUR)
    y += section_height
    for query in gallery.text_to_image:
        sheet.separator(y)
        sheet.caption_query_row(query, captions[query.query], k_images, y + layout.pad)
        y += layout.caption_row_height()
    sheet.text(layout.pad, y + layout.pad // 2, f"Image -> top-{k_captions} captions", sheet.heading,
               _TEXT_COLOUR)
    y += section_height
    for query in gallery.image_to_text:
        sheet.separator(y)
        sheet.image_query_row(query, captions, y + layout.pad)
        y += layout.image_row_height(k_captions)
    return sheet.image


def write_gallery(
    path: str | os.PathLike,
    gallery: RetrievalGallery,
    images: Sequence[ImageSource],
    captions: Sequence[str],
    **options: Any,
) -> Path:
    """Render ``gallery`` as HTML (``.html``/``.htm``) or a PNG contact sheet (``.png``),
    chosen by the file name, and write it atomically.

    ``options`` go to `render_gallery_html` or `render_gallery_png` (``title``, ``metrics``,
    ``thumbnail_size``). Returns the path written.

    Raises:
        ValueError: another file extension (named), or what the renderer raises.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in GALLERY_SUFFIXES:
        raise ValueError(
            f"gallery file '{path}' must end in one of {', '.join(GALLERY_SUFFIXES)}, got {suffix!r}"
        )
    if suffix == ".png":
        sheet = render_gallery_png(gallery, images, captions, **options)
        atomic_write(path, lambda target: sheet.save(target, format="PNG", optimize=True))
    else:
        atomic_write_text(path, render_gallery_html(gallery, images, captions, **options))
    return path
