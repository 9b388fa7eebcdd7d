"""The files of an index and exact search over them.

Layout of an index folder (every file is replaced atomically; a shard is complete when its
embeddings file exists, which is written last)::

    manifest.json              the model, the source, the shards, the count; written last
    build.json                 the options of the build in progress (a resumed run must
                               match them)
    embeddings/emb-00000.npy   float16 (n, d), L2-normalised rows, readable by numpy
    metadata/meta-00000.jsonl  one JSON object per row: position, key, path, captions,
                               label
    failures/fail-00000.jsonl  the shard's unreadable images: position, key, path, reason
    failures.jsonl             all unreadable images (the report)
    faiss.index                optional approximate index (faiss-cpu)

Rows are numbered over the shards in order: the row number is the item's ``id``.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
import threading
import warnings
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .fused import FusedKernelUnavailable, fused_dots

__all__ = [
    "EmbeddingStore",
    "atomic_write_bytes",
    "atomic_write_json",
    "exact_search",
    "read_jsonl_lines",
    "shard_files",
    "write_shard",
]

# torch.from_numpy warns about read-only arrays: the memory-mapped shards, which nothing here
# writes to. A filter for this package's calls only (catch_warnings is not thread-safe).
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning,
                        module=r"harma\.search\.")

# Rows converted to float32 at once: 512 x 512 x 4 bytes = 1 MB, well inside one core's L2 cache
# (measured fastest on the benchmark machine: the converted block is read again from L2).
CHUNK_ROWS = 512
# Scores kept before each top-k: bounds memory to SEGMENT_ROWS x queries floats (and the rows
# of one call of the fused kernel).
SEGMENT_ROWS = 65536


def shard_files(index_dir: Path, shard: int) -> dict[str, Path]:
    """The three files of shard number ``shard``."""
    return {
        "embeddings": index_dir / "embeddings" / f"emb-{shard:05d}.npy",
        "metadata": index_dir / "metadata" / f"meta-{shard:05d}.jsonl",
        "failures": index_dir / "failures" / f"fail-{shard:05d}.jsonl",
    }


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename: a
    reader (or a process killed mid-write) never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, value: Any) -> None:
    """Write ``value`` as indented JSON with sorted keys, replacing ``path`` atomically."""
    atomic_write_bytes(path, (json.dumps(value, indent=1, sort_keys=True) + "\n").encode("utf-8"))


# Characters that end a line for str.splitlines (and other readers) but may stand raw in a JSON
# string: escaped when written, so that every reader of the JSON lines sees one row per line.
_LINE_BREAKS_IN_JSON = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _jsonl(rows: Iterable[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False).translate(_LINE_BREAKS_IN_JSON) + "\n"
                   for row in rows).encode("utf-8")


def read_jsonl_lines(path: Path) -> list[str]:
    """The lines of a JSON-lines file, split at ``\\n`` only: ``str.splitlines`` also splits at
    U+0085, U+2028 and U+2029, which indexes written before they were escaped hold raw in
    their captions."""
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines


def _npy_bytes(array: np.ndarray) -> bytes:
    stream = io.BytesIO()
    np.save(stream, array, allow_pickle=False)
    return stream.getvalue()


def write_shard(index_dir: Path, shard: int, embeddings: np.ndarray, metadata: Sequence[dict[str, Any]],
                failures: Sequence[dict[str, Any]]) -> None:
    """Write one complete shard: metadata and failures first, the embeddings last (their
    presence marks the shard complete)."""
    if len(embeddings) != len(metadata):
        raise ValueError(f"shard {shard}: {len(embeddings)} embeddings for {len(metadata)} metadata rows")
    files = shard_files(index_dir, shard)
    atomic_write_bytes(files["metadata"], _jsonl(metadata))
    atomic_write_bytes(files["failures"], _jsonl(failures))
    atomic_write_bytes(files["embeddings"], _npy_bytes(np.ascontiguousarray(embeddings, dtype=np.float16)))


def _open_rows(path: Path) -> np.ndarray:
    """A read-only memory map of an embeddings shard."""
    return np.load(path, mmap_mode="r", allow_pickle=False)


def exact_search(
    shards: Sequence[np.ndarray], queries: np.ndarray | torch.Tensor, k: int, *, chunk_rows: int = CHUNK_ROWS,
    kernel: str = "blas",
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-``k`` over float16 row blocks (memory maps), chunk by chunk.

    Each chunk of ``chunk_rows`` rows is converted to float32 into one reused buffer and
    multiplied by the queries; the scores of a segment of rows are reduced to the rows that can
    still be among the best ``k`` (those scoring at least the ``k``-th best score so far, ties
    included) before the next. Memory is bounded by ``chunk_rows x d`` and ``SEGMENT_ROWS x m``
    floats, whatever the number of rows. Which rows are chosen, and their order, depend on the
    scores alone, not on the chunk and segment sizes or on how the rows are split into shards
    (the scores themselves are the kernel's: a single query, a matrix-vector product, may
    differ in the last bits from the same query in a batch, and the fused kernel from BLAS).

    Args:
        shards: float16 arrays ``(n_i, d)``; rows are numbered over them in order.
        queries: ``(m, d)`` or ``(d,)`` float queries.
        k: results per query (fewer when there are fewer rows).
        chunk_rows: rows converted to float32 at once (the ``"blas"`` path).
        kernel: ``"blas"``, or ``"fused"``: a single query is scored by the compiled kernel of
            `harma.search.fused` (one pass over the rows; compiled on first use, a few seconds;
            the BLAS path when it cannot be compiled); several queries always go through BLAS.

    Returns:
        ``(scores (m, k') float32, rows (m, k') int64)``, best first; equal scores by row number
        (the lower first). A NaN score (a damaged row) counts as minus infinity.
    """
    query = torch.as_tensor(np.asarray(queries, dtype=np.float32)).reshape(-1, shards[0].shape[1] if shards else 0)
    if kernel not in ("blas", "fused"):
        raise ValueError(f"exact_search: kernel must be 'blas' or 'fused', got {kernel!r}")
    m, dim = query.shape
    best_scores = np.empty((m, 0), dtype=np.float32)
    best_rows = np.empty((m, 0), dtype=np.int64)
    if k < 1:
        return best_scores, best_rows
    indexed_rows = all(shard.dtype == np.float16 and shard.flags.c_contiguous for shard in shards)
    fused = fused_dots(dim) if kernel == "fused" and m == 1 and dim and indexed_rows else None
    if fused is not None:
        try:
            return _fused_search(shards, query[0], k, fused)
        except FusedKernelUnavailable:  # warned; every row is scored again by one kernel
            pass
    query_t = query.t().contiguous()
    buffer = torch.empty(chunk_rows, dim)
    segment = torch.empty(SEGMENT_ROWS, m)
    offset = 0
    for shard in shards:
        rows = torch.from_numpy(np.asarray(shard))  # read-only memory maps: nothing writes to them
        for seg_start in range(0, len(rows), SEGMENT_ROWS):
            seg_stop = min(seg_start + SEGMENT_ROWS, len(rows))
            for start in range(seg_start, seg_stop, chunk_rows):
                stop = min(start + chunk_rows, seg_stop)
                block = buffer[: stop - start]
                block.copy_(rows[start:stop])
                out = segment[start - seg_start : stop - seg_start]
                if m == 1:  # a matrix-vector product: the BLAS gemv kernel
                    torch.mv(block, query[0], out=out[:, 0])
                else:
                    torch.mm(block, query_t, out=out)
            best_scores, best_rows = _merge_best(best_scores, best_rows, segment[: seg_stop - seg_start],
                                                 offset + seg_start, k)
        offset += len(rows)
    return best_scores, best_rows


def _fused_search(shards: Sequence[np.ndarray], query: torch.Tensor, k: int, fused: Any) -> tuple[np.ndarray, np.ndarray]:
    """`exact_search` of one query ``(d,)`` with the compiled kernel, segment by segment."""
    best_scores = np.empty((1, 0), dtype=np.float32)
    best_rows = np.empty((1, 0), dtype=np.int64)
    offset = 0
    for shard in shards:
        for seg_start in range(0, len(shard), SEGMENT_ROWS):
            scores = fused(shard[seg_start : seg_start + SEGMENT_ROWS], query)[:, None]
            best_scores, best_rows = _merge_best(best_scores, best_rows, scores, offset + seg_start, k)
        offset += len(shard)
    return best_scores, best_rows


def _merge_best(best_scores: np.ndarray, best_rows: np.ndarray, scores: torch.Tensor, first_row: int,
                k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` of the rows kept so far (``(m, b)``, sorted) and a segment's ``scores``
    ``(s, m)`` of rows ``first_row...`` (NaN is made minus infinity in place), sorted by score
    (descending), then row (ascending)."""
    length, m = scores.shape
    kept = best_scores.shape[1]
    kth_best = torch.from_numpy(best_scores[:, k - 1]) if kept >= k else None
    if length <= k:
        scores.nan_to_num_(-math.inf, math.inf, -math.inf)
        row, query = np.repeat(np.arange(length), m), np.tile(np.arange(m), length)
    else:
        top = torch.topk(scores, k + 1, dim=0)
        if bool(top.values.isnan().any()):  # topk ranks NaN above every number
            top = torch.topk(scores.nan_to_num_(-math.inf, math.inf, -math.inf), k + 1, dim=0)
        if kth_best is not None and bool((top.values[0] <= kth_best).all()):
            return best_scores, best_rows  # nothing beats the k-th kept row (an equal score has a later row)
        row, query = _candidates(scores, top, k, kth_best)
    queries = np.concatenate([np.repeat(np.arange(m), kept), query])
    candidate_scores = np.concatenate([best_scores.reshape(-1), scores.numpy()[row, query]])
    candidate_rows = np.concatenate([best_rows.reshape(-1), row + first_row])
    order = np.lexsort((candidate_rows, -candidate_scores, queries))
    counts = kept + np.bincount(query, minlength=m)  # at least min(k, rows so far) per query
    width = min(k, kept + length)
    taken = order[(np.cumsum(counts) - counts)[:, None] + np.arange(width)]
    return candidate_scores[taken], candidate_rows[taken]


def _candidates(scores: torch.Tensor, top: Any, k: int, kth_best: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, queries)`` of the segment's rows that may be among each query's best ``k``: every
    row scoring at least the segment's ``k``-th best score (and ``kth_best``, the ``k``-th best
    of the rows before, when given). ``top``: the segment's ``torch.topk(scores, k + 1)``.

    ``torch.topk`` keeps an arbitrary subset of equal scores: its rows are the candidates only
    when no row outside them ties with the ``k``-th (then they are every row scoring at least
    it); otherwise the rows are found by comparing every score with the threshold."""
    m = scores.shape[1]
    if bool((top.values[k] < top.values[k - 1]).all()):
        return top.indices[:k].reshape(-1).numpy(), np.tile(np.arange(m), k)
    threshold = top.values[k - 1]
    if kth_best is not None:
        threshold = torch.maximum(threshold, kth_best)
    row, query = torch.nonzero(scores >= threshold, as_tuple=True)
    return row.numpy(), query.numpy()


class EmbeddingStore:
    """The rows of a complete index: memory-mapped embeddings and lazily read metadata (the
    ``cached_shards`` metadata files read last are kept; threads may read concurrently).

    Args:
        index_dir: the index folder.
        shards: ``[{"shard": i, "count": n}, ...]`` from the manifest, in row order.
        dim: embedding width.
    """

    def __init__(self, index_dir: str | os.PathLike, shards: Sequence[dict[str, Any]], dim: int,
                 cached_shards: int = 8) -> None:
        self.index_dir = Path(index_dir)
        self.shard_numbers = [int(entry["shard"]) for entry in shards]
        counts = [int(entry["count"]) for entry in shards]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64).tolist()
        self.dim = dim
        self._arrays = [_open_rows(shard_files(self.index_dir, number)["embeddings"]) for number in self.shard_numbers]
        for array, count, number in zip(self._arrays, counts, self.shard_numbers, strict=True):
            if array.shape != (count, dim) or array.dtype != np.float16:
                raise ValueError(f"index '{self.index_dir}': shard {number} holds {array.dtype} {array.shape}, "
                                 f"the manifest says float16 ({count}, {dim})")
        self._metadata: OrderedDict[int, list[str]] = OrderedDict()
        self._cached_shards = cached_shards
        # The server reads metadata from several threads: without it, a shard evicted by one
        # between another's lookup and its move_to_end raised KeyError (a 404 for a real item).
        self._metadata_lock = threading.Lock()

    def __len__(self) -> int:
        return self.offsets[-1]

    @property
    def arrays(self) -> list[np.ndarray]:
        """The memory-mapped float16 shards, in row order."""
        return self._arrays

    def _locate(self, row: int) -> tuple[int, int]:
        if not isinstance(row, (int, np.integer)) or not 0 <= row < len(self):
            raise KeyError(f"no item {row!r} in the index (ids are 0 to {len(self) - 1})")
        shard = bisect_right(self.offsets, int(row)) - 1
        return shard, int(row) - self.offsets[shard]

    def vector(self, row: int) -> np.ndarray:
        """The float32 embedding ``(d,)`` of item ``row``."""
        shard, local = self._locate(row)
        return np.asarray(self._arrays[shard][local], dtype=np.float32)

    def metadata(self, row: int) -> dict[str, Any]:
        """The metadata of item ``row`` (``key``, ``path``, ``captions``...) with its ``id``."""
        shard, local = self._locate(row)
        with self._metadata_lock:
            lines = self._metadata.get(shard)
            if lines is not None:
                self._metadata.move_to_end(shard)
        if lines is None:  # read outside the lock: other threads go on meanwhile
            lines = read_jsonl_lines(shard_files(self.index_dir, self.shard_numbers[shard])["metadata"])
            with self._metadata_lock:
                self._metadata[shard] = lines
                self._metadata.move_to_end(shard)
                while len(self._metadata) > self._cached_shards:
                    self._metadata.popitem(last=False)
        entry = json.loads(lines[local])
        entry["id"] = int(row)
        return entry

    def search(self, queries: np.ndarray, k: int, kernel: str = "blas") -> tuple[np.ndarray, np.ndarray]:
        """Exact top-``k`` (`exact_search`, with its ``kernel``) over every row."""
        return exact_search(self._arrays, queries, k, kernel=kernel)
