"""The fused exact-search kernel (``exact_search(..., kernel="fused")``): the same results as the
BLAS path, scores that do not depend on shards or segments, no recompiling in other threads or
modes, and the BLAS path with a warning where compiling fails."""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest
import torch
from search_support import run_search

import harma.search.fused as fused_module
from harma.search import Searcher, exact_search
from harma.search.archive import SearchIndex

DIM = 24


def unit_rows(n: int, seed: int = 0) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((n, DIM))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float16)


def test_fused_results_equal_blas_and_do_not_depend_on_shards_or_segments(monkeypatch):
    rows = unit_rows(3000)
    query = np.random.default_rng(1).standard_normal(DIM).astype(np.float32)
    blas = exact_search([rows], query, 20)
    one = exact_search([rows], query, 20, kernel="fused")
    assert one[1].tolist() == blas[1].tolist()
    np.testing.assert_allclose(one[0], blas[0], rtol=0, atol=1e-5)  # another summation order than BLAS
    monkeypatch.setattr("harma.search.store.SEGMENT_ROWS", 128)
    for cuts in ((1,), (1000, 1001), (2999,), (7, 1500, 2222)):
        shards = np.split(rows, cuts)
        scores, ids = exact_search(shards, query, 20, kernel="fused")
        assert ids.tolist() == one[1].tolist() and np.array_equal(scores, one[0]), cuts  # bitwise


def test_fused_ties_are_ordered_by_row_number():
    rows = np.tile(unit_rows(1), (300, 1))
    query = rows[0].astype(np.float32)
    shards = [rows[:1], rows[1:150], rows[150:]]
    assert exact_search(shards, query, 6, kernel="fused")[1].tolist() == [[0, 1, 2, 3, 4, 5]]


def test_the_kernel_is_compiled_once_for_every_thread_mode_and_block_size(monkeypatch):
    kernel = fused_module.fused_dots(DIM)
    assert kernel is not None
    rows = unit_rows(500, seed=2)
    query = torch.from_numpy(rows[3].astype(np.float32))
    expected = kernel(rows, query)
    results = []

    def in_inference_mode():
        # The compiler's settings are per thread: a recompile in this thread raises RecompileError.
        with torch._dynamo.config.patch(error_on_recompile=True), torch.inference_mode():
            results.append([kernel(rows[i:j], query) for i, j in ((0, 500), (7, 8), (100, 102), (499, 500))])

    thread = threading.Thread(target=in_inference_mode)
    thread.start()
    thread.join()
    whole, single, pair, last = results[0]
    assert torch.equal(whole, expected) and torch.equal(single, expected[7:8])
    assert torch.equal(pair, expected[100:102]) and torch.equal(last, expected[499:])


def test_where_compiling_fails_exact_search_warns_once_and_uses_blas(monkeypatch):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler here\nsecond line")

    monkeypatch.setattr(torch, "compile", no_compiler)
    monkeypatch.setattr(fused_module, "_KERNELS", {})
    rows, query = unit_rows(200), np.ones(DIM, dtype=np.float32)
    with pytest.warns(RuntimeWarning, match=r"kernel for width 24 is not available \(RuntimeError: no C\+\+ "
                                            r"compiler here\); exact search uses the plain float32 path"):
        scores, ids = exact_search([rows], query, 5, kernel="fused")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = exact_search([rows], query, 5, kernel="fused")
    blas = exact_search([rows], query, 5)
    assert ids.tolist() == again[1].tolist() == blas[1].tolist() and np.array_equal(scores, blas[0])
    with pytest.raises(ValueError, match="kernel must be 'blas' or 'fused', got 'gpu'"):
        exact_search([rows], query, 5, kernel="gpu")


def test_indexes_choose_the_kernel_and_answer_alike(built_index, monkeypatch):
    assert SearchIndex(built_index).exact_kernel == "blas"
    assert SearchIndex(built_index, exact_kernel="auto").exact_kernel == "blas"  # a small index
    monkeypatch.setattr("harma.search.archive.FUSED_MIN_ROWS", 1)
    assert SearchIndex(built_index, exact_kernel="auto").exact_kernel == "fused"
    with pytest.raises(ValueError, match="exact_kernel must be one of auto, blas, fused, got 'fast'"):
        SearchIndex(built_index, exact_kernel="fast")
    plain = Searcher.open(built_index, use_faiss=False)
    fused = Searcher.open(built_index, use_faiss=False, exact_kernel="fused")
    for text in ("a bridge over a river", "houses and trees"):
        expected = plain.search(text=text, k=5)
        answer = fused.search(text=text, k=5)
        assert [r["id"] for r in answer] == [r["id"] for r in expected]
        np.testing.assert_allclose([r["score"] for r in answer], [r["score"] for r in expected], atol=1e-5)
    command = run_search("query", str(built_index), "--text", "a bridge over a river", "--top-k", "5", "--json",
                         "--exact_kernel", "fused")
    assert command.returncode == 0 and '"id"' in command.stdout


def test_past_the_recompile_limit_the_width_falls_back_to_blas_with_one_warning():
    # A change of global settings (here the thread count) recompiles the kernel; past dynamo's
    # limit a fullgraph compile raises: every query then failed (a 500 in serve).
    dim = 20
    rows = np.random.default_rng(3).standard_normal((400, dim)).astype(np.float16)
    query = np.ones(dim, dtype=np.float32)
    expected = exact_search([rows], query, 5)[1].tolist()
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    threads = torch.get_num_threads()
    try:
        with torch._dynamo.config.patch(**{limit: 1}):
            assert exact_search([rows], query, 5, kernel="fused")[1].tolist() == expected
            torch.set_num_threads(threads + 1)
            with pytest.warns(RuntimeWarning, match=f"kernel for width {dim} is not available"):
                assert exact_search([rows], query, 5, kernel="fused")[1].tolist() == expected
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                assert exact_search([rows], query, 5, kernel="fused")[1].tolist() == expected
    finally:
        torch.set_num_threads(threads)
    assert fused_module.fused_dots(dim) is None


def test_with_torch_compile_disabled_fused_is_blas_with_a_warning(monkeypatch):
    # torch.compile then returns the function uncompiled: about 20x slower than BLAS, silently.
    monkeypatch.setattr(fused_module, "_KERNELS", {})
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")
    with pytest.warns(RuntimeWarning, match="torch.compile is disabled in this process"):
        assert fused_module.fused_dots(DIM) is None


def test_only_c_contiguous_float16_rows_go_through_the_kernel(monkeypatch):
    calls = []
    kernel = fused_module.fused_dots(DIM)
    monkeypatch.setitem(fused_module._KERNELS, DIM, lambda rows, query: calls.append(rows) or kernel(rows, query))
    rows = unit_rows(300)
    query = np.ones(DIM, dtype=np.float32)
    expected = exact_search([rows], query, 5)[1].tolist()
    for shards in ([rows.astype(np.float32)], [np.asfortranarray(rows)], [rows[::2]]):
        exact_search(shards, query, 5, kernel="fused")
    assert not calls  # each would have compiled the kernel again (another dtype or strides)
    assert exact_search([rows], query, 5, kernel="fused")[1].tolist() == expected and calls


def test_concurrent_searches_leave_the_warning_filters_alone(tmp_path):
    # warnings.catch_warnings in each search is not thread-safe: concurrent searches left an
    # "ignore UserWarning" filter installed for the whole process.
    np.save(tmp_path / "rows.npy", unit_rows(3000))
    rows = np.load(tmp_path / "rows.npy", mmap_mode="r")
    query = np.ones(DIM, dtype=np.float32)
    expected = exact_search([rows], query, 5)[1].tolist()
    before = list(warnings.filters)
    answers = []

    def search(kernel):
        for _ in range(40):
            answers.append(exact_search([rows], query, 5, kernel=kernel)[1].tolist() == expected)

    threads = [threading.Thread(target=search, args=(kernel,)) for kernel in ("blas", "fused") * 4]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(answers) and len(answers) == 320
    assert warnings.filters == before
