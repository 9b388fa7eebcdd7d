"""The HTTP API in process (FastAPI's TestClient): queries, images, several indexes on one
backbone, and the security rules."""

from __future__ import annotations

import io
import json
import os
import shutil
import threading
import time

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin
from search_support import run_search

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from harma.search import IndexOptions, Searcher, build_index, folder_source, read_manifest  # noqa: E402
from harma.search import server as search_server  # noqa: E402
from harma.search.server import SearchService, ServerLimits, create_app  # noqa: E402
from harma.training.model_options import ModelSpec, read_model_config  # noqa: E402


@pytest.fixture(scope="module")
def served(built_index, archive, tmp_path_factory):
    """The built index, and a folder of two more indexes of the same backbone: other adapters,
    and the frozen backbone; all three served together."""
    folder = tmp_path_factory.mktemp("served")
    run_search("index", "--images", str(archive.images), "--out", str(folder / "sets"), *archive.model_args(None),
               "--adapters", f"other={archive.other_adapters}", "--num_workers", "0", "--quiet")
    run_search("index", "--images", str(archive.images), "--out", str(folder / "sets" / "frozen"),
               *archive.model_args(None), "--num_workers", "0", "--quiet")
    searcher = Searcher.open([built_index, folder / "sets"], use_faiss=False)
    limits = ServerLimits(max_upload_bytes=200_000, max_pixels=500_000, max_k=50)
    return TestClient(create_app(searcher, limits)), searcher


def png(size=(40, 30), colour=(200, 30, 30)) -> bytes:
    stream = io.BytesIO()
    Image.new("RGB", size, colour).save(stream, "PNG")
    return stream.getvalue()


def test_text_image_and_item_queries_answer_like_the_python_api(served, archive):
    client, searcher = served
    answer = client.get("/api/search", params={"text": "red roofs", "k": 5}).json()
    assert answer["index"] == "index" and [r["id"] for r in answer["results"]] == \
        [r["id"] for r in searcher.search(text="red roofs", k=5)]
    assert answer["results"][0]["thumb"].startswith("/thumbs/")
    posted = client.post("/api/search", json={"text": "red roofs", "k": 5}).json()
    assert [r["id"] for r in posted["results"]] == [r["id"] for r in answer["results"]]
    image = (archive.images / "fields" / "img003.png").read_bytes()
    uploaded = client.post("/api/search", files={"image": ("x.png", image, "image/png")}, data={"k": "3"}).json()
    assert uploaded["results"][0]["path"] == "fields/img003.png"
    raw = client.post("/api/search?k=2", content=image, headers={"content-type": "image/png"}).json()
    assert raw["results"][0]["path"] == "fields/img003.png"
    item = client.get("/api/search", params={"item": uploaded["results"][0]["id"], "k": 1}).json()
    assert item["results"][0]["id"] == uploaded["results"][0]["id"]
    served_image = client.get(uploaded["results"][0]["image"])
    assert served_image.status_code == 200 and served_image.content == image
    thumb = client.get(uploaded["results"][0]["thumb"])
    assert thumb.headers["content-type"] == "image/jpeg" and Image.open(io.BytesIO(thumb.content)).size == (44, 36)


def test_several_indexes_share_one_backbone_and_answer_as_when_served_alone(served, built_index, tmp_path):
    client, searcher = served
    listed = client.get("/api/indexes").json()["indexes"]
    assert [entry["name"] for entry in listed] == ["index", "frozen", "other"]
    for name in ("other", "frozen", "index"):  # switching back and forth between the sets
        shared = client.get("/api/search", params={"text": "houses", "index": name, "k": 8}).json()
        folder = built_index if name == "index" else searcher.indexes[name].path
        alone = Searcher.open(folder, use_faiss=False).search(text="houses", k=8)
        assert [r["id"] for r in shared["results"]] == [r["id"] for r in alone]
        np.testing.assert_allclose([r["score"] for r in shared["results"]], [r["score"] for r in alone], atol=1e-5)


HOSTILE_PATHS = [
    "/images/..%2F..%2Fetc%2Fpasswd", "/images/../../etc/passwd", "/images/%2Fetc%2Fpasswd", "/images/-1",
    "/images/99999", "/images/1e3", "/thumbs/..%2Fconfig.json", "/static/..%2F..%2Fserver.py", "/static/index.html",
    "/api/items/abc", "/etc/passwd", "/images/0?index=..%2F..", "/api/search?text=x&index=nope",
]


def test_hostile_requests_get_4xx_json_errors_and_the_server_keeps_serving(served):
    client, _ = served
    for path in HOSTILE_PATHS:
        response = client.get(path)
        assert 400 <= response.status_code < 500, path
        assert "error" in response.json() and "Traceback" not in response.text, path
    cases = [
        (client.post("/api/search", content=b"{not json", headers={"content-type": "application/json"}), 400, "JSON"),
        (client.post("/api/search", json=["a"]), 400, "object"),
        (client.post("/api/search", json={"text": "x", "item": 1}), 400, "exactly one"),
        (client.post("/api/search", json={"text": "x", "evil": 1}), 400, "unknown field"),
        (client.post("/api/search", json={"embedding": [1.0, 2.0]}), 400, "32 finite numbers"),
        (client.post("/api/search", json={"embedding": "abc"}), 400, "list of numbers"),
        (client.post("/api/search", json={"embedding": [1, True]}), 400, "list of numbers"),
        (client.post("/api/search", json={"text": "x", "k": 0}), 400, "'k'"),
        (client.post("/api/search", json={"text": "x", "k": "many"}), 400, "'k'"),
        (client.post("/api/search", json={"text": "x" * 5000}), 400, "longer"),
        (client.post("/api/search", json={"item": 10 ** 9}), 404, "no item"),
        (client.post("/api/search", json={"text": "x", "index": "../x"}), 404, "no index"),
        (client.post("/api/search", files={"image": ("a.png", b"GIF89a nonsense", "image/png")}), 400, "readable"),
        (client.post("/api/search", files={"image": ("a.png", png((1000, 1000)), "image/png")}), 413, "pixels"),
        (client.post("/api/search", files={"image": ("a.bin", os.urandom(300_000), "image/png")}), 413, "larger"),
        (client.post("/api/search", content=b"x" * 300_000, headers={"content-type": "image/png"}), 413, "larger"),
        (client.post("/api/search", content=b"text=x", headers={"content-type": "text/plain"}), 415, "content type"),
        (client.post("/api/search", data={"k": "3"}), 415, "content type"),
        (client.post("/api/search", files={"picture": ("a.png", png(), "image/png")}), 400, "no 'image'"),
        (client.get("/api/search"), 400, "exactly one"),
        (client.delete("/api/search"), 405, "not allowed"),
    ]
    for response, status, words in cases:
        assert response.status_code == status and words in response.json()["error"], (response.text, status)
    assert client.get("/api/search", params={"text": "roofs"}).status_code == 200


ARABIC_INDIC_THREE = "\u0663"


def test_integer_fields_take_ascii_digits_and_json_integers_only(served):
    # int() read '٣' as 3 and truncated 2.7 to 2; '²' (isdigit, not int) and 1e400 (infinite)
    # were 500s, as were an index that is a list and integers too large for a float or for int().
    client, _ = served
    post = [
        ({"text": "x", "k": 2.7}, "'k' must be an integer in ASCII digits, got 2.7"),
        ({"text": "x", "k": 3.0}, "'k' must be an integer in ASCII digits, got 3.0"),
        ('{"text": "x", "k": 1e400}', "'k' must be an integer in ASCII digits, got inf"),
        ({"text": "x", "k": True}, "'k' must be an integer in ASCII digits, got True"),
        ({"text": "x", "k": ARABIC_INDIC_THREE}, "'k' must be an integer in ASCII digits"),
        ({"text": "x", "k": 10 ** 30}, "'k' is out of range: more than 18 digits"),
        ({"item": 1.5}, "'item' must be an integer in ASCII digits, got 1.5"),
        ({"item": "\u00b2"}, "'item' must be an integer in ASCII digits"),
        ({"text": "x", "index": ["index"]}, "'index' must be the name of an index, got ['index']"),
        ({"text": "x", "index": 0}, "'index' must be the name of an index, got 0"),
        ({"embedding": [10 ** 400] * 32}, "'embedding' must be a list of numbers, each finite"),
    ]
    for body, message in post:
        text = body if isinstance(body, str) else json.dumps(body)
        response = client.post("/api/search", content=text, headers={"content-type": "application/json"})
        assert response.status_code == 400 and message in response.json()["error"], (body, response.text)
    for raw in (b'{"text": "x", "k": ' + b"9" * 5000 + b"}", b"[" * 100_000):
        response = client.post("/api/search", content=raw, headers={"content-type": "application/json"})
        assert response.status_code == 400 and "not valid JSON" in response.json()["error"], response.text
    get = [
        ("/api/search?text=x&k=" + ARABIC_INDIC_THREE, 400, "'k' must be an integer in ASCII digits"),
        ("/api/search?text=x&k=%C2%B2", 400, "'k' must be an integer in ASCII digits"),
        ("/api/search?text=x&k=1_0", 400, "'k' must be an integer in ASCII digits"),
        ("/api/search?item=" + ARABIC_INDIC_THREE, 400, "'item' must be an integer in ASCII digits"),
        ("/api/search?item=" + "9" * 5000, 400, "'item' is out of range"),
        ("/api/items/%C2%B2", 404, "an item id is written in ASCII digits"),
        ("/images/%C2%B2", 404, "an item id is written in ASCII digits"),
        ("/thumbs/%C2%B2", 404, "an item id is written in ASCII digits"),
        ("/api/items/" + ARABIC_INDIC_THREE, 404, "an item id is written in ASCII digits"),
        ("/api/items/" + "9" * 5000, 400, "'id' is out of range"),
    ]
    for path, status, message in get:
        response = client.get(path)
        assert response.status_code == status and message in response.json()["error"], (path, response.text)
    assert len(client.post("/api/search", json={"text": "x", "k": "3"}).json()["results"]) == 3
    assert client.get("/api/items/3").json()["id"] == 3


def test_only_indexed_files_under_the_image_root_are_served(archive, tmp_path):
    images = shutil.copytree(archive.images, tmp_path / "images")
    out = tmp_path / "index"
    run_search("index", "--images", str(images), "--out", str(out), *archive.model_args(), "--num_workers", "0",
               "--quiet")
    client = TestClient(create_app(Searcher.open(out, use_faiss=False)))
    secret = tmp_path / "secret.png"
    secret.write_bytes(png())
    (images / "fields" / "img001.png").unlink()
    (images / "fields" / "img001.png").symlink_to(secret)  # item 0 now points out of the image root
    assert client.get("/images/0").status_code == 404 and client.get("/thumbs/0").status_code == 404
    assert client.get("/images/1").status_code == 200
    metadata = out / "metadata" / "meta-00000.jsonl"
    lines = metadata.read_text().splitlines()
    for number, path in ((1, str(secret)), (2, "../secret.png")):  # a tampered index names outside files
        lines[number] = json.dumps({**json.loads(lines[number]), "path": path})
    metadata.write_text("\n".join(lines) + "\n")
    client = TestClient(create_app(Searcher.open(out, use_faiss=False)))
    assert client.get("/images/1").status_code == 404 and client.get("/images/2").status_code == 404
    assert client.get("/images/3").status_code == 200


def big_images(folder, side=1200):
    """A JPEG and a TIFF (which browsers cannot show: served as PNG) over the upload limit of
    the served fixture (500,000 pixels)."""
    folder.mkdir(parents=True)
    stripes = np.zeros((side, side, 3), dtype=np.uint8)
    stripes[::8] = (250, 200, 10)
    Image.fromarray(stripes).save(folder / "big.jpg", quality=90)
    Image.fromarray(stripes[: side // 2]).save(folder / "wide.tif")
    return folder


def test_indexed_images_over_the_upload_limit_are_served_and_thumbnailed(archive, tmp_path, monkeypatch):
    # The upload limit (max_pixels) was applied to indexed images: their thumbnails, and
    # formats served as PNG, were 404.
    images = big_images(tmp_path / "images")
    out = tmp_path / "index"
    run_search("index", "--images", str(images), "--out", str(out), *archive.model_args(), "--num_workers", "0",
               "--quiet")
    client = TestClient(create_app(Searcher.open(out, use_faiss=False), ServerLimits(max_pixels=500_000)))
    decoded = []
    original_load = JpegImagePlugin.JpegImageFile.load

    def load(image):
        decoded.append(image.size)
        return original_load(image)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", load)
    assert [client.get(f"/api/items/{i}").json()["path"] for i in (0, 1)] == ["big.jpg", "wide.tif"]
    jpeg, tiff = client.get("/images/0"), client.get("/images/1")
    assert jpeg.status_code == 200 and jpeg.content == (images / "big.jpg").read_bytes() and not decoded
    assert tiff.headers["content-type"] == "image/png" and Image.open(io.BytesIO(tiff.content)).size == (1200, 600)
    thumbs = [client.get(f"/thumbs/{i}") for i in (0, 1)]
    assert [Image.open(io.BytesIO(t.content)).size for t in thumbs] == [(256, 256), (256, 128)], thumbs[0].text
    assert decoded and max(decoded) == (600, 600)  # the JPEG decoded at half scale, not 1200 x 1200
    upload = client.post("/api/search", content=(images / "big.jpg").read_bytes(),
                         headers={"content-type": "image/jpeg"})
    assert upload.status_code == 413 and "1,440,000 pixels" in upload.json()["error"]


def test_an_image_over_its_index_pixel_limit_is_not_served(archive, tmp_path):
    images = big_images(tmp_path / "images", side=600)
    out = tmp_path / "index"
    config = read_model_config(str(archive.config))
    spec = ModelSpec("tiny", str(archive.backbone), config, 32, str(archive.adapters))
    build_index(folder_source(images), spec, out, IndexOptions(num_workers=0, progress=False, max_pixels=400_000))
    assert read_manifest(out).max_pixels == 400_000 and read_manifest(out).count == 2
    Image.new("RGB", (700, 700)).save(images / "big.jpg")  # replaced after indexing
    client = TestClient(create_app(Searcher.open(out, use_faiss=False)))
    assert client.get("/thumbs/1").status_code == 200
    response = client.get("/thumbs/0")
    assert response.status_code == 404 and "larger than its index allows" in response.json()["error"]
    assert "490,000 pixels; the limit is 400,000" in response.json()["error"]


def test_the_page_and_its_static_files_are_served_with_a_content_security_policy(served):
    client, _ = served
    page = client.get("/")
    assert page.status_code == 200 and 'id="query"' in page.text and "default-src 'self'" in \
        page.headers["content-security-policy"]
    assert "textContent" in client.get("/static/app.js").text
    assert client.get("/static/style.css").headers["content-type"].startswith("text/css")


class ConcurrencyCounter:
    """Wraps a function so that each call lasts 50 ms, counting the most calls running at once."""

    def __init__(self) -> None:
        self.running = self.most = 0
        self.lock = threading.Lock()

    def wrap(self, function):
        def counted(*args, **kwargs):
            with self.lock:
                self.running += 1
                self.most = max(self.most, self.running)
            time.sleep(0.05)
            with self.lock:
                self.running -= 1
            return function(*args, **kwargs)

        return counted


@pytest.mark.parametrize("max_decodes", [1, 2])
def test_at_most_max_decodes_images_are_decoded_at_once(served, monkeypatch, max_decodes):
    # Each decode of a large image holds a full-size copy: a burst of thumbnail and upload
    # requests must wait for a slot, not decode all at once.
    _, searcher = served
    service = SearchService(searcher, ServerLimits(max_decodes=max_decodes))
    counter = ConcurrencyCounter()
    monkeypatch.setattr(search_server, "open_image", counter.wrap(search_server.open_image))
    name = service.index(None)
    calls = [lambda i=i: service.thumbnail(name, str(i)) for i in range(4)] + [lambda: service.search(index=None, k=1, image=png())] * 4
    failures = []

    def call(function):
        try:
            function()
        except Exception as error:  # noqa: BLE001 - every failure is reported below
            failures.append(error)

    threads = [threading.Thread(target=call, args=(function,)) for function in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures and 1 <= counter.most <= max_decodes


def test_server_limits_are_positive_integers(built_index):
    for field in ("max_upload_bytes", "max_pixels", "max_k", "max_text_chars", "thumbnail_size", "max_decodes"):
        for value in (0, -1, 2.5, True):
            with pytest.raises(ValueError, match=rf"ServerLimits\.{field} must be a positive integer, got {value!r}"):
                ServerLimits(**{field: value})
    for option, value in (("--max_decodes", "0"), ("--max_k", "-1"), ("--max_pixels", "2.5"),
                          ("--max_upload_mb", "nan"), ("--max_upload_mb", "inf"), ("--max_upload_mb", "0")):
        # Refused by the parser, before the model is loaded (inf was an OverflowError traceback).
        result = run_search("serve", str(built_index), option, value, check=False)
        assert result.returncode == 2 and result.stderr.count("error:") == 1, (option, value, result.stderr)
        assert f"argument {option}" in result.stderr and repr(value) in result.stderr


def test_a_decoded_image_is_encoded_and_let_go_inside_its_slot(served, monkeypatch):
    # The slot covered the decoding only: four TIFFs converted to PNG at once held four
    # full-size images with max_decodes=1.
    _, searcher = served
    service = SearchService(searcher, ServerLimits(max_decodes=1))
    counter = ConcurrencyCounter()
    monkeypatch.setattr(SearchService, "_encode", staticmethod(counter.wrap(SearchService._encode)))
    name = service.index(None)
    threads = [threading.Thread(target=service.thumbnail, args=(name, str(i))) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert counter.most == 1 and counter.running == 0


def test_an_upload_waiting_for_a_slot_does_not_hold_up_other_requests(served, monkeypatch):
    # The upload was decoded on the event loop: while it waited for a slot, every request
    # (health included) waited with it.
    _, searcher = served
    original = search_server.open_image

    def open_image(data, max_pixels, fit=None):
        if fit is not None:  # a thumbnail: holds the only slot for a while
            time.sleep(3.0)
        return original(data, max_pixels, fit=fit)

    monkeypatch.setattr(search_server, "open_image", open_image)
    timings = {}
    with TestClient(create_app(searcher, ServerLimits(max_decodes=1))) as client:
        def timed(name, call):
            start = time.perf_counter()
            timings[name] = (call().status_code, time.perf_counter() - start)

        requests = [
            threading.Thread(target=timed, args=("thumb", lambda: client.get("/thumbs/3"))),
            threading.Thread(target=timed, args=("upload", lambda: client.post(
                "/api/search", content=png(), headers={"content-type": "image/png"}))),
            threading.Thread(target=timed, args=("health", lambda: client.get("/api/health"))),
        ]
        for thread in requests:
            thread.start()
            time.sleep(0.3)
        for thread in requests:
            thread.join()
    assert {name: status for name, (status, _) in timings.items()} == {"thumb": 200, "upload": 200, "health": 200}
    assert timings["health"][1] < 1.5, timings  # not the thumbnail's remaining 2.4 s
    assert timings["upload"][1] > 2.0, timings  # it did wait for the slot
