"""Querying: exact search, the FAISS index and its recall, the command line, model checks."""

from __future__ import annotations

import json
import random
import shutil
import sys
import threading

import numpy as np
import pytest
import torch
from search_support import run_search

import harma.search.ann as ann
from harma.search import EmbeddingStore, Searcher, build_faiss_index, exact_search, read_manifest
from harma.search.store import write_shard


def test_exact_search_equals_a_full_matrix_product_across_shards_and_chunks():
    rng = np.random.default_rng(0)
    shards = [rng.standard_normal((n, 48)).astype(np.float16) for n in (1000, 1, 777)]
    queries = rng.standard_normal((4, 48)).astype(np.float32)
    scores, rows = exact_search(shards, queries, 12, chunk_rows=100)
    full = np.concatenate(shards).astype(np.float32) @ queries.T
    for q in range(4):
        expected = np.argsort(-full[:, q], kind="stable")[:12]
        assert rows[q].tolist() == expected.tolist()
        np.testing.assert_allclose(scores[q], full[expected, q], rtol=1e-5, atol=1e-5)
    assert exact_search(shards, queries[0], 5000)[1].shape == (1, 1778)


@pytest.mark.parametrize("n", [20, 1000, 70000])
def test_exact_search_breaks_ties_by_row_number_whatever_the_index_size(n):
    # torch.topk keeps an arbitrary subset of tied rows: identical rows gave rows 11..15 of 20,
    # 0..4 of 1000, and 65536.. of 70000 (another segment).
    vector = np.random.default_rng(0).standard_normal(8)
    rows = np.tile((vector / np.linalg.norm(vector)).astype(np.float16), (n, 1))
    assert exact_search([rows], vector, 5)[1].tolist() == [[0, 1, 2, 3, 4]]
    assert exact_search([rows[: n // 2], rows[n // 2:]], np.stack([vector, -vector]), 5, chunk_rows=64)[1].tolist() \
        == [[0, 1, 2, 3, 4]] * 2


def test_exact_search_with_many_ties_is_the_stable_order_of_the_full_product():
    # Small integer values: every score is exact in float32 whatever the summation order, so
    # scores tie often and the order by (score descending, row ascending) is known exactly.
    rng = np.random.default_rng(0)
    shards = [rng.integers(-2, 3, (n, 6)).astype(np.float16) for n in (70000, 3, 1500)]
    queries = rng.integers(-2, 3, (3, 6)).astype(np.float32)
    full = np.concatenate(shards).astype(np.float32) @ queries.T
    for k, chunk_rows in ((1, 512), (7, 100), (300, 512)):
        scores, rows = exact_search(shards, queries, k, chunk_rows=chunk_rows)
        for q in range(3):
            expected = np.argsort(-full[:, q], kind="stable")[:k]
            assert rows[q].tolist() == expected.tolist(), (k, q)
            assert scores[q].tolist() == full[expected, q].tolist()


def test_exact_search_ranks_nan_rows_last_as_minus_infinity():
    # torch.topk ranks NaN above every number: a damaged row was every query's best match.
    rng = np.random.default_rng(0)
    shards = [rng.standard_normal((n, 8)).astype(np.float16) for n in (30, 70000)]
    damaged = [(0, 3), (1, 0), (1, 65540)]  # (shard, row): rows 3, 30 and 65570
    for shard, row in damaged:
        shards[shard][row, 2] = np.nan
    queries = rng.standard_normal((2, 8)).astype(np.float32)
    top = exact_search(shards, queries, 5)
    assert not {3, 30, 65570} & set(top[1].ravel().tolist()) and np.isfinite(top[0]).all()
    scores, rows = exact_search(shards, queries, 70030, chunk_rows=1000)
    assert rows[:, -3:].tolist() == [[3, 30, 65570]] * 2 and np.isneginf(scores[:, -3:]).all()
    assert sorted(rows[0].tolist()) == list(range(70030)) and np.isfinite(scores[:, :-3]).all()


def test_a_damaged_row_is_no_result_and_cannot_be_a_query(built_index, tmp_path):
    damaged = shutil.copytree(built_index, tmp_path / "damaged")
    shard = damaged / "embeddings" / "emb-00001.npy"
    rows = np.load(shard)
    rows[2] = np.nan  # item 12
    np.save(shard, rows)
    results = json.loads(run_search("query", str(damaged), "--item", "5", "--top-k", "30", "--json",
                                    "--exact").stdout)
    assert len(results) == 23 and 12 not in [r["id"] for r in results] and results[0]["id"] == 5
    refused = run_search("query", str(damaged), "--item", "12", check=False)
    assert refused.returncode == 2 and "item 12's embedding in the index is damaged" in refused.stderr


def test_metadata_read_by_concurrent_threads_is_the_rows(tmp_path):
    # The server's threads share the cache of metadata shards; without a lock, a shard evicted
    # by one thread between another's lookup and its move_to_end raised KeyError (a 404).
    for shard in range(12):
        write_shard(tmp_path, shard, np.ones((3, 4), np.float16),
                    [{"key": f"{shard}-{i}", "path": "x.png"} for i in range(3)], [])
    store = EmbeddingStore(tmp_path, [{"shard": shard, "count": 3} for shard in range(12)], 4, cached_shards=2)
    errors = []

    def reader(seed):
        rng = random.Random(seed)
        try:
            for _ in range(2000):
                row = rng.randrange(36)
                assert store.metadata(row)["key"] == f"{row // 3}-{row % 3}"
        except Exception as error:
            errors.append(error)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors[:3]


def clustered_store(folder, n=3000, dim=32, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, dim))
    rows = centres[rng.integers(0, 40, n)] + 0.3 * rng.standard_normal((n, dim))
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    write_shard(folder, 0, rows.astype(np.float16), [{"key": str(i), "path": f"{i}.png"} for i in range(n)], [])
    return EmbeddingStore(folder, [{"shard": 0, "count": n}], dim)


def test_the_faiss_index_reaches_its_target_recall_measured_against_exact_search(built_index, tmp_path, monkeypatch):
    pytest.importorskip("faiss")
    small = shutil.copytree(built_index, tmp_path / "small")
    manifest = read_manifest(small)
    entry = build_faiss_index(small, manifest)
    assert entry["type"] == "flat" and entry["recall_at_10"] == 1.0
    assert read_manifest(small).faiss["recall_at_10"] == 1.0
    approximate, exact = (Searcher.open(small, use_faiss=use).search(item=3, k=5) for use in (True, False))
    assert [r["id"] for r in approximate] == [r["id"] for r in exact]  # scores: another summation order
    # A larger index gets an inverted file; its recall is measured and nprobe raised to the target.
    monkeypatch.setattr(ann, "FLAT_LIMIT", 100)
    store = clustered_store(tmp_path)
    manifest.shards, manifest.count, manifest.dim = [{"shard": 0, "count": 3000}], 3000, 32
    entry = build_faiss_index(tmp_path, manifest, target_recall=0.95, queries=200)
    assert entry["type"] == "ivf_sq_fp16" and entry["recall_at_10"] >= 0.95
    assert [step["nprobe"] for step in entry["sweep"]][-1] == entry["nprobe"]
    assert all(step["recall_at_10"] < 0.95 for step in entry["sweep"][:-1])
    index = ann.load_faiss_index(tmp_path, read_manifest(tmp_path))
    sample = np.stack([store.vector(i) for i in range(0, 3000, 15)])
    found = index.search(sample, 10)[1]
    assert ann.recall_at_k(found, exact_search(store.arrays, sample, 10)[1]) >= 0.9


def test_query_prints_json_results_best_first_with_id_path_and_score(built_index, archive):
    result = run_search("query", str(built_index), "--item", "5", "--top-k", "4", "--json", "--exact")
    results = json.loads(result.stdout)
    assert len(results) == 4 and results[0]["id"] == 5 and {"id", "path", "score"} <= set(results[0])
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
    image = archive.images / results[2]["path"]
    by_image = json.loads(run_search("query", str(built_index), "--image", str(image), "--top-k", "1", "--json",
                                     "--exact").stdout)
    assert by_image[0]["path"] == results[2]["path"] and by_image[0]["score"] == pytest.approx(1.0, abs=3e-3)
    text = json.loads(run_search("query", str(built_index), "--text", "red roofs", "--json", "--exact").stdout)
    searcher = Searcher.open(built_index, use_faiss=False)
    assert [r["id"] for r in text] == [r["id"] for r in searcher.search(text="red roofs", k=10)]


def test_a_query_with_another_model_than_the_index_was_built_with_is_refused_naming_both(built_index, archive):
    result = run_search("query", str(built_index), "--text", "roofs", "--adapters", str(archive.other_adapters),
                        check=False)
    assert result.returncode == 2 and result.stderr.count("sha256") == 4  # each model: backbone and adapters
    assert "adapters.safetensors" in result.stderr and "other.safetensors" in result.stderr
    # The same model options given again are accepted (the backbone file is recognised by its hash).
    run_search("query", str(built_index), "--text", "roofs", *archive.model_args(), "--exact")


def test_bad_queries_are_named(built_index, tmp_path):
    assert "no item 999" in run_search("query", str(built_index), "--item", "999", check=False).stderr
    missing = run_search("query", str(tmp_path), "--text", "x", check=False)
    assert missing.returncode == 2 and "no index at" in missing.stderr
    empty = run_search("query", str(built_index), "--text", "  ", check=False)
    assert empty.returncode == 2 and "empty" in empty.stderr


def test_a_file_for_a_folder_or_a_folder_for_a_file_is_one_error_line(archive, built_index, tmp_path):
    # NotADirectoryError and IsADirectoryError were missing from the command line's own list of
    # the user's errors: tracebacks. It now uses harma.training.options.BAD_INPUT.
    file = tmp_path / "file.txt"
    file.write_text("not a folder")
    index = ["index", "--images", str(archive.images), *archive.model_args(), "--num_workers", "0", "--quiet"]
    cases = [
        (["query", str(built_index), "--image", str(tmp_path), "--exact"], f"--image {tmp_path}: [Errno 21]"),
        ([*index, "--out", str(file)], f"'{file}' is a file, not a folder for an index: give another --out"),
        ([*index, "--out", str(file / "index")], f"Not a directory: '{file / 'index'}'"),
        (["serve", str(file / "index")], f"no index at '{file / 'index'}'"),
    ]
    for arguments, message in cases:
        result = run_search(*arguments, check=False)
        assert result.returncode == 2 and result.stderr.startswith("error: ") and message in result.stderr, \
            (arguments, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and file.read_text() == "not a folder"


@pytest.mark.parametrize(("arguments", "message"), [
    (["--batch_size", "0"], "argument --batch_size: expected an integer >= 1, got '0'"),
    (["--num_workers", "-1"], "argument --num_workers: expected an integer >= 0, got '-1'"),
    (["--image_size", "0"], "argument --image_size: expected an integer >= 1, got '0'"),
    (["--model_config", "{bad"], "argument --model_config: '{bad' is neither a JSON file nor valid JSON"),
    (["--model_config", "[1]"], "argument --model_config: expected a JSON object, got a list"),
    (["--device", "gpu"], "argument --device: expected auto, cpu, cuda or cuda:N, got 'gpu'"),
])
def test_bad_model_and_runtime_options_are_the_argument_errors_of_evaluate(archive, tmp_path, arguments, message):
    # The options are defined once (harma.training.model_options): the messages are evaluate.py's.
    result = run_search("index", "--images", str(archive.images), "--out", str(tmp_path / "index"),
                        "--model", "tiny", *arguments, check=False)
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode == 2 and len(errors) == 1 and message in errors[0], result.stderr
    assert not (tmp_path / "index").exists()
    if arguments[0] in ("--model_config", "--device", "--image_size"):
        query = run_search("query", str(tmp_path), "--text", "x", *arguments, check=False)
        assert query.returncode == 2 and message in query.stderr


def test_query_takes_device_auto(built_index):
    # 'auto' is CUDA when there is one, else the CPU (it was given to torch.device as it was).
    auto = run_search("query", str(built_index), "--text", "red roofs", "--json", "--exact", "--device", "auto")
    cpu = run_search("query", str(built_index), "--text", "red roofs", "--json", "--exact", "--device", "cpu")
    if torch.cuda.is_available():  # float16 autocast on the GPU may order near ties otherwise
        assert len(json.loads(auto.stdout)) == len(json.loads(cpu.stdout)) == 10
    else:
        assert json.loads(auto.stdout) == json.loads(cpu.stdout)
