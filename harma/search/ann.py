"""An approximate index through FAISS (``pip install "harma[search]"`` brings ``faiss-cpu``), for
indexes too large for exact search at the wanted latency.

The type is chosen from the size (as autofaiss does, without its memory-budget search): up to
``FLAT_LIMIT`` rows a flat inner-product index (exact, the same results as exact search); above,
an inverted file with ``sqrt(n)`` lists whose vectors are stored as float16 (about the size of
the shards). The number of lists probed per query (``nprobe``) is raised until recall@10
against exact search, measured on a sample of the indexed embeddings used as queries, reaches
the target; every value tried is recorded in the manifest with its recall and query time.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .manifest import MANIFEST_NAME, Manifest
from .store import EmbeddingStore, atomic_write_json, exact_search

__all__ = ["FAISS_NAME", "build_faiss_index", "import_faiss", "load_faiss_index", "recall_at_k"]

FAISS_NAME = "faiss.index"
FLAT_LIMIT = 50_000
NPROBES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def import_faiss() -> Any:
    """The ``faiss`` module.

    Raises:
        ImportError: faiss is not installed, saying how to install it.
    """
    try:
        import faiss
    except ImportError:
        raise ImportError('the approximate index needs faiss: pip install "harma[search]" (or faiss-cpu)') from None
    return faiss


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    """Mean share of each query's exact top-``k`` rows that ``found`` (its top ``k``) holds."""
    hits = [len(set(f[:k].tolist()) & set(t[:k].tolist())) / min(k, len(t)) for f, t in zip(found, truth, strict=True)]
    return float(np.mean(hits)) if hits else 1.0


def _add_in_chunks(index: Any, store: EmbeddingStore, chunk: int = 65536) -> None:
    for array in store.arrays:
        for start in range(0, len(array), chunk):
            index.add(np.asarray(array[start:start + chunk], dtype=np.float32))


def _train_sample(store: EmbeddingStore, size: int, rng: np.random.Generator) -> np.ndarray:
    rows = np.sort(rng.choice(len(store), size=min(size, len(store)), replace=False))
    return np.stack([store.vector(int(row)) for row in rows])


def _new_index(faiss: Any, store: EmbeddingStore, rng: np.random.Generator) -> tuple[Any, dict[str, Any]]:
    n, dim = len(store), store.dim
    if n <= FLAT_LIMIT:
        return faiss.IndexFlatIP(dim), {"type": "flat"}
    nlist = int(min(65536, max(16, round(math.sqrt(n)))))
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, faiss.ScalarQuantizer.QT_fp16,
                                          faiss.METRIC_INNER_PRODUCT)
    index.train(_train_sample(store, 40 * nlist, rng))
    return index, {"type": "ivf_sq_fp16", "nlist": nlist}


def _time_per_query(index: Any, queries: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    found = np.stack([index.search(query[None], k)[1][0] for query in queries])
    return found, 1000 * (time.perf_counter() - start) / len(queries)


def build_faiss_index(index_dir: str | os.PathLike, manifest: Manifest, *, target_recall: float = 0.95,
                      queries: int = 500, k: int = 10, seed: int = 0) -> dict[str, Any]:
    """Build ``faiss.index`` for a complete index, measure its recall@``k`` against exact search,
    and record it in the manifest.

    Returns:
        The manifest's faiss entry: type, nprobe, recall_at_10, ms_per_query, sweep (every
        nprobe tried) and queries.
    """
    faiss = import_faiss()
    index_dir = Path(index_dir)
    store = EmbeddingStore(index_dir, manifest.shards, manifest.dim)
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    index, entry = _new_index(faiss, store, rng)
    _add_in_chunks(index, store)
    build_seconds = time.perf_counter() - start
    sample = _train_sample(store, queries, rng)
    truth = exact_search(store.arrays, sample, k)[1]
    sweep = []
    for nprobe in NPROBES if entry["type"] != "flat" else (None,):
        if nprobe is not None:
            if nprobe > entry["nlist"]:
                break
            index.nprobe = nprobe
        found, milliseconds = _time_per_query(index, sample, k)
        sweep.append({"nprobe": nprobe, "recall_at_10": recall_at_k(found, truth, k), "ms_per_query": milliseconds})
        if sweep[-1]["recall_at_10"] >= target_recall:
            break
    chosen = sweep[-1]
    _write_index(faiss, index, index_dir / FAISS_NAME)
    entry.update(file=FAISS_NAME, nprobe=chosen["nprobe"], recall_at_10=chosen["recall_at_10"],
                 ms_per_query=chosen["ms_per_query"], target_recall=target_recall, queries=len(sample),
                 build_seconds=build_seconds, sweep=sweep, count=manifest.count)
    manifest.faiss = entry
    atomic_write_json(index_dir / MANIFEST_NAME, manifest.to_dict())
    return entry


def _write_index(faiss: Any, index: Any, path: Path) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        faiss.write_index(index, temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_faiss_index(index_dir: str | os.PathLike, manifest: Manifest) -> Any:
    """The FAISS index of ``manifest`` (memory-mapped where FAISS can), with its ``nprobe`` set.

    Raises:
        ValueError: the file is missing or was built for another count of rows (rebuild it).
    """
    faiss = import_faiss()
    entry = manifest.faiss or {}
    path = Path(index_dir) / entry.get("file", FAISS_NAME)
    if not path.is_file():
        raise ValueError(f"index '{index_dir}': its manifest names {path.name}, which is missing; build it again "
                         f"with index --faiss, or query with --exact")
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if entry.get("type") != "flat" else 0
    index = faiss.read_index(str(path), flags)
    if index.ntotal != manifest.count:
        raise ValueError(f"index '{index_dir}': {path.name} holds {index.ntotal} vectors, the index {manifest.count}; "
                         f"build it again with index --faiss")
    if entry.get("nprobe"):
        index.nprobe = int(entry["nprobe"])
    return index
