"""The HTTP JSON API and the search page (FastAPI + uvicorn: ``pip install "harma[search]"``).

Routes (every error is a JSON object ``{"error": "..."}`` with a 4xx status, never a traceback):

- ``GET /``: the search page; ``GET /static/app.js``, ``/static/style.css``: its code and style;
- ``GET /api/indexes``: the indexes served, and the limits;
- ``GET /api/search?text=...&k=10&index=NAME`` or ``?item=ID``: top-k results;
- ``POST /api/search``: a JSON body ``{"text" | "item" | "embedding", "k", "index"}``, a
  multipart form with an ``image`` file (and ``k``, ``index``), or raw image bytes
  (``Content-Type: image/...``, ``k`` and ``index`` in the query string);
- ``GET /api/items/{id}``: an item's metadata; ``GET /images/{id}``: the indexed image;
  ``GET /thumbs/{id}``: a small JPEG of it (``?index=NAME`` on all three);
- ``GET /api/health``.

Security defaults: the server binds 127.0.0.1 unless told otherwise; it serves only the images
of indexed items, read from under each index's image root (absolute paths, ``..`` and symlinks
pointing out give 404); uploads larger than ``max_upload_bytes`` are refused while they arrive
(413), uploaded images larger than ``max_pixels`` before they are decoded (413). Indexed
images are served up to the pixel limit their index was built with (``Manifest.max_pixels``);
thumbnails of large JPEGs are decoded at a reduced scale; at most ``max_decodes`` images
(uploads, thumbnails, conversions to PNG) are decoded at once, so that many requests for large
images wait instead of holding a full-size copy each.
"""

# No ``from __future__ import annotations``: FastAPI reads the routes' annotations (Request)
# from the functions defined inside create_app, where the optional framework is imported.
import io
import json
import logging
import mimetypes
import threading
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

from PIL import Image

from .archive import Searcher
from .sources import ImageTooLargeError, open_image

__all__ = ["ServerLimits", "create_app", "serve"]

LOGGER = logging.getLogger("harma.search.server")
STATIC_FILES = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
BROWSER_IMAGE_TYPES = {"image/jpeg", "image/png", "image/gif", "image/webp", "image/bmp"}
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
                               "frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
}


@dataclass(frozen=True)
class ServerLimits:
    """What the server accepts.

    Attributes:
        max_upload_bytes: largest request body (an uploaded image, a JSON query).
        max_pixels: largest uploaded image, width x height (checked before decoding); indexed
            images are served up to their index's own limit (``Manifest.max_pixels``).
        max_k: most results per query.
        max_text_chars: longest text query.
        thumbnail_size: side of the thumbnails in pixels.
        max_decodes: most images decoded at once; others wait (a 179-megapixel image is about
            0.5 GB of RGB while it is decoded).
    """

    max_upload_bytes: int = 10_000_000
    max_pixels: int = 40_000_000
    max_k: int = 100
    max_text_chars: int = 1000
    thumbnail_size: int = 256
    max_decodes: int = 2

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ServerLimits.{name} must be a positive integer, got {value!r}")


class BadQuery(Exception):
    """A request the client must fix: an HTTP status and a message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _BodyTooLarge(Exception):
    pass


class BodySizeLimit:
    """ASGI middleware: refuse a request body over ``limit`` bytes with 413, from its
    ``Content-Length`` or while it arrives (chunked uploads), before it is all in memory."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or len(length) > MAX_DIGITS or int(length) > self.limit):
            await _send_json(send, 413, {"error": f"the request body is larger than {self.limit:,} bytes"})
            return
        received, started = 0, False

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise _BodyTooLarge
            return message

        async def tracking_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await _send_json(send, 413, {"error": f"the request body is larger than {self.limit:,} bytes"})


async def _send_json(send: Any, status: int, body: dict) -> None:
    data = json.dumps(body).encode("utf-8")
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def _static(name: str) -> bytes:
    return resources.files("harma.search").joinpath("static", name).read_bytes()


# Integers of more digits are beyond every limit and id (and int() refuses 4,300 digits).
MAX_DIGITS = 18


def _digits(text: str, what: str) -> int | None:
    """The number that ``text`` writes in ASCII digits, or None (``int`` also reads other
    scripts' digits, ``²``, spaces and underscores)."""
    if not (text.isascii() and text.isdigit()):
        return None
    if len(text) > MAX_DIGITS:
        raise BadQuery(400, f"'{what}' is out of range: more than {MAX_DIGITS} digits")
    return int(text)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _int(value: Any, what: str) -> int:
    """An integer field: a JSON integer (not a boolean, nor a number with a fraction or an
    exponent: 2.7, 3.0, 1e400), or a string of ASCII digits with an optional ``-`` (a query
    string, a form field)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if abs(value) >= 10 ** MAX_DIGITS:
            raise BadQuery(400, f"'{what}' is out of range: more than {MAX_DIGITS} digits")
        return value
    if isinstance(value, str):
        number = _digits(value.removeprefix("-"), what)
        if number is not None:
            return -number if value.startswith("-") else number
    raise BadQuery(400, f"'{what}' must be an integer in ASCII digits, got {_shown(value)}")


def _embedding(value: Any) -> list[float]:
    """A JSON list of numbers as floats (an integer too large for a float is refused here)."""
    try:
        if isinstance(value, list) and all(type(v) in (int, float) for v in value):
            return [float(v) for v in value]
    except OverflowError:
        pass
    raise BadQuery(400, "'embedding' must be a list of numbers, each finite")


class SearchService:
    """What the routes do, without the web framework (so it is tested on its own too)."""

    def __init__(self, searcher: Searcher, limits: ServerLimits) -> None:
        self.searcher, self.limits = searcher, limits
        self.thumbnail = lru_cache(maxsize=2048)(self._thumbnail)
        self._decode_slots = threading.BoundedSemaphore(limits.max_decodes)

    def index(self, name: Any) -> str:
        if name is not None and not isinstance(name, str):
            raise BadQuery(400, f"'index' must be the name of an index, got {_shown(name)}")
        try:
            return self.searcher.index(name or None)[0]
        except KeyError as error:
            raise BadQuery(404, error.args[0]) from None

    def k(self, value: Any) -> int:
        k = _int(10 if value in (None, "") else value, "k")
        if not 1 <= k <= self.limits.max_k:
            raise BadQuery(400, f"'k' must be 1 to {self.limits.max_k}, got {k}")
        return k

    def search(self, *, index: str | None, k: Any, **query: Any) -> dict[str, Any]:
        name, k = self.index(index), self.k(k)
        given = {key: value for key, value in query.items() if value is not None}
        if len(given) != 1:
            raise BadQuery(400, f"give exactly one query: text, item, embedding or an image "
                                f"(got {', '.join(given) or 'none'})")
        text = given.get("text")
        if text is not None and (not isinstance(text, str) or not text.strip()):
            raise BadQuery(400, "'text' must be a non-empty string")
        if text is not None and len(text) > self.limits.max_text_chars:
            raise BadQuery(400, f"'text' is longer than {self.limits.max_text_chars} characters")
        if "item" in given:
            given["item"] = _int(given["item"], "item")
        if "embedding" in given:
            given["embedding"] = _embedding(given["embedding"])
        if isinstance(given.get("image"), (bytes, bytearray)):
            with self._decode_slots:  # the full-size upload is held until it is embedded
                given["image"] = self._open_upload(given["image"])
                return self._answer(name, k, given)
        return self._answer(name, k, given)

    def _answer(self, name: str, k: int, given: dict[str, Any]) -> dict[str, Any]:
        start = time.perf_counter()
        try:
            results = self.searcher.search(k=k, index=name, **given)
        except KeyError as error:
            raise BadQuery(404, error.args[0]) from None
        except ValueError as error:
            raise BadQuery(400, str(error)) from None
        for result in results:
            result["image"] = f"/images/{result['id']}?index={name}"
            result["thumb"] = f"/thumbs/{result['id']}?index={name}"
        return {"index": name, "k": k, "took_ms": round(1000 * (time.perf_counter() - start), 2),
                "query": {key: value for key, value in given.items() if key != "embedding" and key != "image"},
                "results": results}

    def _open_upload(self, data: bytes) -> Image.Image:
        """An uploaded image, decoded (400/413 `BadQuery` when it cannot be); callers hold a slot."""
        if not data:
            raise BadQuery(400, "the upload is empty")
        try:
            return open_image(data, self.limits.max_pixels)
        except ImageTooLargeError as error:
            raise BadQuery(413, f"the upload is too large: {error}") from None
        except ValueError as error:
            raise BadQuery(400, f"the upload is not a readable image: {error}") from None

    def item(self, index: str | None, item_id: str) -> tuple[str, dict[str, Any]]:
        name = self.index(index)
        number = _digits(item_id, "id")
        if number is None:
            raise BadQuery(404, f"no item {_shown(item_id)} in index {name!r}: an item id is written in ASCII digits")
        try:
            return name, self.searcher.indexes[name].item(number)
        except KeyError as error:
            raise BadQuery(404, error.args[0]) from None

    def _indexed_image(self, index: str | None, item_id: str) -> tuple[str, dict[str, Any], bytes]:
        """``(index name, metadata, encoded image)`` of an indexed item."""
        name, entry = self.item(index, item_id)
        try:
            data = self.searcher.indexes[name].image_bytes(entry["id"])
        except (FileNotFoundError, ValueError, OSError, ImportError):  # ImportError: a dataset without datasets
            raise BadQuery(404, f"the image of item {entry['id']} is not available") from None
        return name, entry, data

    def image(self, index: str | None, item_id: str) -> tuple[bytes, str]:
        """The image bytes and their media type (formats browsers cannot show become PNG)."""
        name, entry, data = self._indexed_image(index, item_id)
        # A dataset row's name need not say its format: it is sent as PNG.
        media = None if "row" in entry else mimetypes.guess_type(entry.get("member") or entry["path"])[0]
        if media in BROWSER_IMAGE_TYPES:
            return data, media
        with self._decode_slots:  # held until the full-size image is encoded and let go
            return self._encode(self._decoded(name, entry, data), "PNG"), "image/png"

    def _decoded(self, name: str, entry: dict[str, Any], data: bytes, fit: int | None = None) -> Image.Image:
        """An indexed image, decoded under the pixel limit its index was built with (the upload
        limit is for uploads: the indexer may have read larger images). Callers hold a decode
        slot until they have let the image go."""
        try:
            return open_image(data, self.searcher.indexes[name].manifest.max_pixels, fit=fit)
        except ImageTooLargeError as error:  # the file was replaced after indexing
            raise BadQuery(404, f"the image of item {entry['id']} is larger than its index allows: {error}") from None
        except ValueError:
            raise BadQuery(404, f"the image of item {entry['id']} cannot be decoded") from None

    @staticmethod
    def _encode(image: Image.Image, kind: str) -> bytes:
        stream = io.BytesIO()
        image.save(stream, kind, **({"quality": 85} if kind == "JPEG" else {}))
        return stream.getvalue()

    def _thumbnail(self, index: str, item_id: str) -> bytes:
        name, entry, data = self._indexed_image(index, item_id)
        with self._decode_slots:
            return self._encode(self._decoded(name, entry, data, fit=self.limits.thumbnail_size), "JPEG")


def create_app(searcher: Searcher, limits: ServerLimits | None = None) -> Any:
    """The FastAPI application serving ``searcher``'s indexes (see the module's routes).

    Raises:
        ImportError: FastAPI is not installed (``pip install "harma[search]"``).
    """
    try:
        from fastapi import FastAPI
    except ImportError:
        raise ImportError('the server needs FastAPI and uvicorn: pip install "harma[search]"') from None
    limits = limits or ServerLimits()
    service = SearchService(searcher, limits)
    app = FastAPI(title="harma archive search", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    _add_error_handlers(app)
    _add_page_routes(app, service)
    _add_api_routes(app, service)
    app.add_middleware(BodySizeLimit, limit=limits.max_upload_bytes)
    return app


def _json(status: int, body: dict) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse(body, status_code=status, headers=SECURITY_HEADERS)


def _add_error_handlers(app: Any) -> None:
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    @app.exception_handler(BadQuery)
    async def bad_query(_request: Any, error: BadQuery) -> Any:
        return _json(error.status, {"error": error.message})

    @app.exception_handler(HTTPException)
    async def http_error(_request: Any, error: HTTPException) -> Any:
        message = {404: "not found", 405: "method not allowed"}.get(error.status_code, str(error.detail))
        return _json(error.status_code, {"error": message})

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Any, error: RequestValidationError) -> Any:
        problems = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in error.errors())
        return _json(400, {"error": f"bad request: {problems}"})

    @app.exception_handler(Exception)
    async def internal(_request: Any, error: Exception) -> Any:
        LOGGER.exception("internal error")
        return _json(500, {"error": "internal error (see the server's log)"})


def _add_page_routes(app: Any, service: SearchService) -> None:
    from fastapi import Response

    page = _static("index.html")
    static = {name: (_static(name), media) for name, media in STATIC_FILES.items()}

    @app.get("/", include_in_schema=False)
    def home() -> Any:
        return Response(page, media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)

    @app.get("/static/{name}", include_in_schema=False)
    def static_file(name: str) -> Any:
        if name not in static:
            raise BadQuery(404, "not found")
        data, media = static[name]
        return Response(data, media_type=media, headers=SECURITY_HEADERS)

    @app.get("/images/{item_id}")
    def image(item_id: str, index: str | None = None) -> Any:
        data, media = service.image(index, item_id)
        return Response(data, media_type=media, headers={**SECURITY_HEADERS, "Cache-Control": "max-age=3600"})

    @app.get("/thumbs/{item_id}")
    def thumbnail(item_id: str, index: str | None = None) -> Any:
        data = service.thumbnail(service.index(index), item_id)
        return Response(data, media_type="image/jpeg", headers={**SECURITY_HEADERS, "Cache-Control": "max-age=3600"})


def _add_api_routes(app: Any, service: SearchService) -> None:
    from fastapi import Request

    @app.get("/api/health")
    def health() -> Any:
        return _json(200, {"status": "ok"})

    @app.get("/api/indexes")
    def indexes() -> Any:
        return _json(200, {"indexes": service.searcher.describe(), "limits": asdict(service.limits)})

    @app.get("/api/items/{item_id}")
    def item(item_id: str, index: str | None = None) -> Any:
        return _json(200, service.item(index, item_id)[1])

    @app.get("/api/search")
    def search_get(text: str | None = None, item: str | None = None, k: str | None = None,
                   index: str | None = None) -> Any:
        return _json(200, service.search(index=index, k=k, text=text, item=item))

    @app.post("/api/search")
    async def search_post(request: Request) -> Any:
        query = await _post_query(request, service)
        # Decoding (which may wait for a slot), the model and the matrix products run in a worker
        # thread: the event loop stays free.
        from starlette.concurrency import run_in_threadpool

        return _json(200, await run_in_threadpool(lambda: service.search(**query)))


async def _post_query(request: Any, service: SearchService) -> dict[str, Any]:
    """``{index, k, text|item|embedding|image}`` of a POST: JSON, multipart form, or raw image."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    params = request.query_params
    if content_type == "application/json":
        try:
            body = json.loads(await request.body())
        # ValueError: an integer of over 4,300 digits; RecursionError: arrays nested too deep
        except (ValueError, RecursionError) as error:
            raise BadQuery(400, f"the body is not valid JSON: {error}") from None
        if not isinstance(body, dict):
            raise BadQuery(400, "the JSON body must be an object with text, item or embedding")
        unknown = sorted(set(body) - {"text", "item", "embedding", "k", "index"})
        if unknown:
            raise BadQuery(400, f"unknown field(s) {unknown}; expected text, item, embedding, k, index")
        return {"index": body.get("index"), "k": body.get("k"), "text": body.get("text"),
                "item": body.get("item"), "embedding": body.get("embedding")}
    if content_type == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=8, max_part_size=service.limits.max_upload_bytes)
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise BadQuery(400, "the form has no 'image' file")
        image = await upload.read()  # decoded by the search, in a worker thread and a decode slot
        return {"index": form.get("index") or params.get("index"), "k": form.get("k") or params.get("k"),
                "image": image}
    if content_type.startswith("image/") or content_type == "application/octet-stream":
        return {"index": params.get("index"), "k": params.get("k"), "image": await request.body()}
    raise BadQuery(415, f"unsupported content type {content_type or 'none'!r}: send JSON, a multipart form with an "
                        f"'image' file, or image bytes")


def serve(searcher: Searcher, host: str = "127.0.0.1", port: int = 8000, limits: ServerLimits | None = None) -> None:
    """Run the server until interrupted (uvicorn), printing the page's URL."""
    try:
        import uvicorn
    except ImportError:
        raise ImportError('the server needs FastAPI and uvicorn: pip install "harma[search]"') from None
    app = create_app(searcher, limits)
    shown = f"[{host}]" if ":" in host else host
    print(f"harma search: {', '.join(f'{n} ({len(i)} images)' for n, i in searcher.indexes.items())}; "
          f"open http://{shown}:{port}/", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
