"""Building an index: the files, what they hold, resumption, parts and ranks, sources."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from processes import spawn_on_free_port
from search_support import REPO, run_search, write_images

import harma.search.indexer as indexer
from harma.search import (
    IndexOptions,
    SearchIndex,
    SearchModel,
    annotation_source,
    build_index,
    folder_source,
    read_manifest,
    webdataset_source,
)
from harma.search.manifest import INDEX_MAX_PIXELS
from harma.training.model_options import ModelSpec, build_from_spec, read_model_config


def spec_of(archive, adapters=None) -> ModelSpec:
    config = read_model_config(str(archive.config))
    return ModelSpec("tiny", str(archive.backbone), config, 32, str(adapters) if adapters else None)


def index_files(index: Path) -> dict[str, bytes]:
    names = [p for p in sorted(index.rglob("*")) if p.is_file() and p.name != "build.json"]
    return {p.relative_to(index).as_posix(): p.read_bytes() for p in names}


def test_an_index_holds_unit_float16_rows_metadata_and_a_manifest(built_index, archive):
    manifest = read_manifest(built_index)
    assert manifest.count == 24 and manifest.dim == 32 and [s["count"] for s in manifest.shards] == [10, 10, 4]
    assert manifest.adapters["sha256"] and manifest.spec.adapters == str(archive.adapters)
    rows = np.concatenate([np.load(built_index / "embeddings" / f"emb-{i:05d}.npy") for i in range(3)])
    assert rows.dtype == np.float16 and rows.shape == (24, 32)
    np.testing.assert_allclose(np.linalg.norm(rows.astype(np.float32), axis=1), 1.0, atol=2e-3)
    first = json.loads((built_index / "metadata" / "meta-00000.jsonl").read_text().splitlines()[0])
    assert first["path"] == "fields/img001.png" and first["label"] == "fields"
    captioned = [json.loads(line) for line in (built_index / "metadata" / "meta-00001.jsonl").read_text().splitlines()]
    assert {"key": "roofs/img000.png", "captions": ["red roofs beside a road", "many houses"]}.items() <= \
        next(entry for entry in captioned if entry["key"] == "roofs/img000.png").items()


def test_index_rows_are_the_models_normalised_image_embeddings(built_index, archive):
    source = folder_source(archive.images)
    model = build_from_spec(spec_of(archive, archive.adapters))
    search_model = SearchModel(model, spec_of(archive), {"x": None})
    with torch.no_grad():
        expected = search_model.encode_images([Image.open(archive.images / item.path).convert("RGB")
                                               for item in source.items])
    rows = np.concatenate([np.load(built_index / "embeddings" / f"emb-{i:05d}.npy") for i in range(3)])
    np.testing.assert_allclose(rows.astype(np.float32), expected, atol=2e-3)  # float16 storage


def test_in_process_builds_embed_at_one_thread_like_the_builds_they_are_compared_with(archive, tmp_path,
                                                                                    monkeypatch):
    # built_index (a session fixture, set up before the function-scoped one_thread fixture) was
    # built at the default thread count and compared bitwise with 1-thread builds.
    threads = []
    encode = SearchModel.encode_pixels
    monkeypatch.setattr(SearchModel, "encode_pixels",
                        lambda self, *args: threads.append(torch.get_num_threads()) or encode(self, *args))
    torch.set_num_threads(2)  # as outside a test; the suite's one_thread fixture restores it
    run_search("index", "--images", str(archive.images), "--out", str(tmp_path / "index"), *archive.model_args(),
               "--batch_size", "12", "--num_workers", "0", "--quiet")
    assert threads == [1, 1] and torch.get_num_threads() == 2


def test_unreadable_images_are_listed_and_skipped_and_strict_makes_them_fatal(archive, tmp_path):
    images = tmp_path / "images"
    write_images(images, 5)
    (images / "roofs" / "broken.png").write_bytes(b"no image here")
    out = tmp_path / "index"
    result = run_search("index", "--images", str(images), "--out", str(out), *archive.model_args(),
                        "--num_workers", "0", "--quiet")
    assert "1 unreadable" in result.stdout
    report = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [entry["path"] for entry in report] == ["roofs/broken.png"] and "not a readable image" in report[0]["reason"]
    assert read_manifest(out).count == 5
    strict = run_search("index", "--images", str(images), "--out", str(tmp_path / "strict"), *archive.model_args(),
                        "--num_workers", "0", "--quiet", "--strict", check=False)
    assert strict.returncode == 2 and "roofs/broken.png" in strict.stderr and "Traceback" not in strict.stderr


def test_a_build_interrupted_after_any_shard_resumes_to_the_uninterrupted_index(archive, built_index, tmp_path,
                                                                                   monkeypatch):
    source, spec = folder_source(archive.images), spec_of(archive, archive.adapters)
    options = IndexOptions(batch_size=4, num_workers=0, shard_size=10, progress=False)
    original = indexer.write_shard
    for crash_after in (0, 1, 2):
        out = tmp_path / f"crash{crash_after}"
        written = []

        def failing_write(*args, crash_after=crash_after, written=written):
            if len(written) == crash_after:
                raise KeyboardInterrupt
            written.append(args[1])
            original(*args)

        monkeypatch.setattr(indexer, "write_shard", failing_write)
        with pytest.raises(KeyboardInterrupt):
            build_index(source, spec, out, options)
        assert not (out / "manifest.json").exists()
        monkeypatch.setattr(indexer, "write_shard", original)
        build_index(source, spec, out, options)
        assert index_files(out) == index_files(built_index)


def test_a_build_killed_with_sigkill_resumes_to_the_uninterrupted_index(archive, built_index, tmp_path):
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "harma.search", "index", "--images", str(archive.images), "--out", str(out),
               *archive.model_args(), "--batch_size", "4", "--num_workers", "0", "--shard_size", "10", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (out / "embeddings" / "emb-00000.npy").exists() and process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed_early = not (out / "manifest.json").exists()
    run_search("index", "--images", str(archive.images), "--out", str(out), *archive.model_args(),
               "--batch_size", "4", "--num_workers", "0", "--shard_size", "10", "--quiet")
    assert index_files(out) == index_files(built_index)
    assert not list(out.rglob("*.tmp"))
    assert killed_early, "the build finished before it could be killed: nothing was resumed"


def test_a_build_with_other_options_or_images_in_the_same_folder_is_refused(archive, built_index, tmp_path):
    result = run_search("index", "--images", str(archive.images), "--out", str(built_index),
                        *archive.model_args(archive.other_adapters), "--shard_size", "10", "--quiet", check=False)
    assert result.returncode == 2 and "differing: adapters, spec" in result.stderr
    (tmp_path / "mine.txt").write_text("keep me")
    result = run_search("index", "--images", str(archive.images), "--out", str(tmp_path), *archive.model_args(),
                        "--quiet", check=False)
    assert result.returncode == 2 and "not empty" in result.stderr and (tmp_path / "mine.txt").read_text() == "keep me"


def test_named_adapter_sets_write_one_index_each_equal_to_separate_builds(archive, built_index, tmp_path):
    run_search("index", "--images", str(archive.images), "--out", str(tmp_path / "sets"),
               *archive.model_args(None), "--adapters", f"mine={archive.adapters}",
               "--adapters", f"other={archive.other_adapters}", "--batch_size", "4", "--num_workers", "0",
               "--shard_size", "10", "--quiet")
    alone = np.load(built_index / "embeddings" / "emb-00001.npy").astype(np.float32)
    mine = np.load(tmp_path / "sets" / "mine" / "embeddings" / "emb-00001.npy").astype(np.float32)
    other = np.load(tmp_path / "sets" / "other" / "embeddings" / "emb-00001.npy").astype(np.float32)
    np.testing.assert_allclose(mine, alone, atol=2e-3)
    assert np.abs(other - alone).max() > 0.05
    assert read_manifest(tmp_path / "sets" / "other").adapter_name == "other"


def test_parts_on_separate_machines_join_into_the_uninterrupted_index(archive, built_index, tmp_path):
    out = tmp_path / "parts"
    common = ["index", "--images", str(archive.images), "--out", str(out), *archive.model_args(),
              "--batch_size", "4", "--num_workers", "0", "--shard_size", "10", "--quiet"]
    first = run_search(*common, "--part", "0/2")
    assert "once every part is done" in first.stdout and not (out / "manifest.json").exists()
    assert sorted(p.name for p in (out / "embeddings").iterdir()) == ["emb-00000.npy", "emb-00002.npy"]
    run_search(*common, "--part", "1/2")
    run_search(*common)  # every shard is there: only the manifest is written
    assert index_files(out) == index_files(built_index)


def test_the_pixel_limit_is_recorded_and_a_resumed_build_must_keep_it(archive, tmp_path):
    source, spec = folder_source(archive.images), spec_of(archive, archive.adapters)
    out = tmp_path / "index"
    options = IndexOptions(batch_size=4, num_workers=0, shard_size=10, progress=False, part=(0, 2))
    build_index(source, spec, out, options)
    record = json.loads((out / "build.json").read_text())
    assert record["max_pixels"] == INDEX_MAX_PIXELS
    with pytest.raises(ValueError, match="differing: max_pixels"):
        build_index(source, spec, out, replace(options, part=None, max_pixels=10_000))
    del record["max_pixels"]  # a build started by an earlier version, which did not record it
    (out / "build.json").write_text(json.dumps(record))
    build_index(source, spec, out, replace(options, part=None))
    assert read_manifest(out).max_pixels == INDEX_MAX_PIXELS
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["max_pixels"]  # an index written by an earlier version: the indexer's default then
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert read_manifest(out).max_pixels == INDEX_MAX_PIXELS
    (out / "manifest.json").write_text(json.dumps({**manifest, "max_pixels": 2.5}))
    with pytest.raises(ValueError, match="damaged: max_pixels must be a positive integer, got 2.5"):
        read_manifest(out)


def _rank_worker(rank: int, port: int, folder: str, out: str, spec: ModelSpec) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        build_index(folder_source(folder), spec, out, IndexOptions(batch_size=4, num_workers=0, shard_size=10,
                                                                   progress=False, device="cpu"))
    finally:
        torch.distributed.destroy_process_group()


def test_torchrun_ranks_write_their_own_shards_and_rank_0_joins_them(archive, built_index, tmp_path):
    out = tmp_path / "ranks"
    spawn_on_free_port(_rank_worker, (str(archive.images), str(out), spec_of(archive, archive.adapters)), nprocs=2)
    assert index_files(out) == index_files(built_index)


def test_webdataset_shards_and_annotation_files_are_sources(archive, tmp_path):
    tar_path = tmp_path / "wds" / "shard-000.tar"
    tar_path.parent.mkdir()
    images = sorted(archive.images.rglob("*.png"))[:3]
    with tarfile.open(tar_path, "w") as archive_file:
        for number, image in enumerate(images):
            for name, data in ((f"s{number}.png", image.read_bytes()), (f"s{number}.txt", b"caption %d" % number)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive_file.addfile(info, io.BytesIO(data))
    source = webdataset_source(tar_path.parent)
    assert [item.key for item in source.items] == ["shard-000.tar:s0", "shard-000.tar:s1", "shard-000.tar:s2"]
    assert source.items[1].captions == ("caption 1",)
    manifests = build_index(source, spec_of(archive), tmp_path / "wds-index",
                            IndexOptions(num_workers=0, progress=False))
    assert manifests[0].count == 3

    annotation = tmp_path / "test.json"
    annotation.write_text(json.dumps([
        {"image": "roofs/img000.png", "caption": "red roofs"},
        {"image": "fields/img001.png", "caption": "a green field", "label_name": "field"},
        {"image": "roofs/img000.png", "caption": "houses"},
        {"image": "../outside.png", "caption": "not under the root"},
    ]))
    source = annotation_source(annotation, archive.images)
    assert [(item.path, item.captions, item.label) for item in source.items] == [
        ("roofs/img000.png", ("red roofs", "houses"), None), ("fields/img001.png", ("a green field",), "field")]
    assert source.skipped == [("../outside.png", f"entry 3: outside the image root '{archive.images}'")]


def test_captions_holding_unicode_line_separators_are_indexed_and_read_back(archive, tmp_path):
    # U+2028, U+2029 and U+0085 end a line for str.splitlines, not for JSON lines: a caption
    # holding one made the metadata file one row longer than its embeddings, forever.
    captions = ["red roofs\u2028beside a road", "many\u2029houses", "a green\x85field"]
    annotation = tmp_path / "test.json"
    annotation.write_text(json.dumps([{"image": "roofs/img000.png", "caption": captions[:2]},
                                      {"image": "fields/img001.png", "caption": captions[2:]}]))
    out = tmp_path / "index"
    command = ["index", "--annotation", str(annotation), "--image_root", str(archive.images), "--out", str(out),
               *archive.model_args(), "--num_workers", "0", "--quiet"]
    run_search(*command)
    metadata = out / "metadata" / "meta-00000.jsonl"
    assert not set("\u2028\u2029\x85") & set(metadata.read_text(encoding="utf-8"))  # escaped: any reader splits
    assert [SearchIndex(out, use_faiss=False).item(i)["captions"] for i in range(2)] == [captions[:2], captions[2:]]
    # An index written with the separators raw (before they were escaped) is read as well.
    rows = [json.loads(line) for line in metadata.read_text(encoding="utf-8").split("\n") if line]
    metadata.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    (out / "manifest.json").unlink()
    run_search(*command)  # every shard is complete: only the manifest is written again
    assert [SearchIndex(out, use_faiss=False).item(i)["captions"] for i in range(2)] == [captions[:2], captions[2:]]


def test_a_caption_file_linking_out_of_the_image_folder_is_skipped_and_listed(archive, tmp_path):
    images = tmp_path / "images"
    write_images(images, 4)
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET-TOKEN=hunter2\n")
    (images / "roofs" / "img000.txt").symlink_to(secret)
    (images / "roofs" / "inside.txt").write_text("a caption inside the folder\n")
    (images / "roofs" / "img002.txt").symlink_to(images / "roofs" / "inside.txt")  # a link inside is fine
    source = folder_source(images)
    captions = {item.key: item.captions for item in source.items}
    assert captions["roofs/img000.png"] == () and captions["roofs/img002.png"] == ("a caption inside the folder",)
    assert source.skipped == [("roofs/img000.txt", "its real path is outside the image folder (a symlink out)")]
    out = tmp_path / "index"
    result = run_search("index", "--images", str(images), "--out", str(out), *archive.model_args(),
                        "--num_workers", "0", "--quiet")
    assert "skipped roofs/img000.txt: its real path is outside" in result.stderr
    assert "SECRET" not in "".join(path.read_text() for path in out.rglob("*.jsonl"))
