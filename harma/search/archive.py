"""Querying indexes: `SearchIndex` (one index folder) and `Searcher` (indexes and the model that
embeds their queries), used by the command line, the server and Python code alike.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..training.captions import DatasetImage
from ..training.options import resolve_device
from .ann import load_faiss_index
from .encoder import SearchModel
from .fused import fused_dots
from .manifest import MANIFEST_NAME, Manifest, read_manifest
from .sources import read_item_bytes, read_stored_image, stored_image_table
from .store import EmbeddingStore

__all__ = ["EXACT_KERNELS", "FUSED_MIN_ROWS", "SearchIndex", "Searcher", "find_indexes", "open_index"]

EXACT_KERNELS = ("auto", "blas", "fused")
# Rows from which "auto" compiles the fused kernel: about 0.1 s saved per query at 1,000,000
# rows against a few seconds of compiling, once per process.
FUSED_MIN_ROWS = 100_000


class SearchIndex:
    """A complete index folder: its manifest, memory-mapped embeddings, metadata and (when built
    and ``use_faiss``) its FAISS index.

    Args:
        index_dir: the folder ``index`` wrote.
        use_faiss: search through ``faiss.index`` when the manifest has one (else exact search).
        exact_kernel: how exact search scores a single query (see `exact_search`): ``"blas"``;
            ``"fused"`` (compiled now, when the index is searched exactly); ``"auto"``: fused
            when the index is searched exactly and holds at least `FUSED_MIN_ROWS` rows.
    """

    def __init__(self, index_dir: str | os.PathLike, use_faiss: bool = True, exact_kernel: str = "blas") -> None:
        self.path = Path(index_dir)
        self.manifest: Manifest = read_manifest(self.path)
        self.store = EmbeddingStore(self.path, self.manifest.shards, self.manifest.dim)
        self.root = self.manifest.root
        self._faiss = load_faiss_index(self.path, self.manifest) if use_faiss and self.manifest.faiss else None
        self.exact_kernel = self._choose_kernel(exact_kernel)
        self._stored_images: Any = None  # a Hugging Face dataset's image column, opened on first use

    def __len__(self) -> int:
        return self.manifest.count

    def _choose_kernel(self, exact_kernel: str) -> str:
        if exact_kernel not in EXACT_KERNELS:
            raise ValueError(f"exact_kernel must be one of {', '.join(EXACT_KERNELS)}, got {exact_kernel!r}")
        if exact_kernel == "auto":
            exact_kernel = "fused" if self._faiss is None and len(self) >= FUSED_MIN_ROWS else "blas"
        if exact_kernel == "fused" and self._faiss is None and fused_dots(self.manifest.dim) is None:
            return "blas"  # compiled now, not at the first query; the warning said why not
        return exact_kernel

    @property
    def approximate(self) -> bool:
        """Whether queries go through the FAISS index."""
        return self._faiss is not None

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores (m, k'), ids (m, k'))`` of the top ``k`` rows per query, best first."""
        k = max(1, min(int(k), len(self)))
        queries = np.ascontiguousarray(np.asarray(queries, dtype=np.float32).reshape(-1, self.manifest.dim))
        if self._faiss is not None:
            scores, ids = self._faiss.search(queries, k)
            return scores.astype(np.float32), ids.astype(np.int64)
        return self.store.search(queries, k, kernel=self.exact_kernel)

    def item(self, item_id: int) -> dict[str, Any]:
        """The metadata of item ``item_id``: ``id``, ``key``, ``path``, captions, label.

        Raises:
            KeyError: no such item.
        """
        return self.store.metadata(item_id)

    def image_bytes(self, item_id: int) -> bytes:
        """The encoded image of item ``item_id``, read from under the index's image root only, or
        from the row of the Hugging Face dataset the index was built from.

        Raises:
            KeyError: no such item.
            FileNotFoundError: the file (or the dataset's folder) is gone, or lies outside the
                image root (symlink out).
            ImportError: an image stored in a Hugging Face dataset, without ``datasets``.
        """
        entry = self.item(item_id)
        if "row" not in entry:
            return read_item_bytes(self.root, entry["path"], entry.get("span"))
        if "hf_image_key" not in self.manifest.source:
            raise FileNotFoundError(f"item {item_id} names a dataset row, but the index was built from no dataset")
        if self._stored_images is None:
            self._stored_images = stored_image_table(self.manifest.source)
        row = entry["row"]
        if not isinstance(row, int) or not 0 <= row < len(self._stored_images):  # a tampered index
            raise FileNotFoundError(f"item {item_id} names row {row!r}, which the dataset does not have")
        column = self.manifest.source["hf_image_key"]
        return read_stored_image(DatasetImage(self._stored_images, row, column, entry["path"]), self.root)


def find_indexes(paths: Sequence[str | os.PathLike]) -> dict[str, Path]:
    """``{name: folder}`` of the indexes at ``paths``: an index folder (named by the folder), or a
    folder of indexes written for named adapter sets (each named by its subfolder).

    Raises:
        FileNotFoundError: a path holds no index.
        ValueError: two indexes of one name.
    """
    found: dict[str, Path] = {}
    for path in map(Path, paths):
        if (path / MANIFEST_NAME).is_file() or (path / "build.json").is_file():
            entries = [(path.resolve().name, path)]
        else:
            entries = [(child.name, child) for child in sorted(path.iterdir()) if (child / MANIFEST_NAME).is_file()] \
                if path.is_dir() else []
            if not entries:
                read_manifest(path)  # raises naming what is missing
        for name, folder in entries:
            if name in found:
                raise ValueError(f"two indexes are named {name!r} ('{found[name]}' and '{folder}'): give index "
                                 f"folders of different names")
            found[name] = folder
    return found


def open_index(path: str | os.PathLike, use_faiss: bool = True, exact_kernel: str = "blas") -> SearchIndex:
    """Open one index folder (`SearchIndex`)."""
    return SearchIndex(path, use_faiss, exact_kernel)


@dataclass
class Searcher:
    """Indexes and the one model that embeds their queries.

    ``search`` takes exactly one query: a text, an image, an indexed item (image to image), or
    an embedding; results are dicts with ``id``, ``score``, ``key``, ``path`` (and captions,
    label when the index has them), best first.
    """

    indexes: dict[str, SearchIndex]
    model: SearchModel

    @classmethod
    def open(cls, paths: Sequence[str | os.PathLike] | str | os.PathLike, *,
             overrides: Mapping[str, Any] | None = None, device: str | torch.device = "cpu",
             use_faiss: bool = True, exact_kernel: str = "blas") -> Searcher:
        """Open the indexes at ``paths`` (see `find_indexes`) and build their model from the
        manifests.

        Args:
            overrides: `ModelSpec` fields given again (``pretrained`` of a moved file...); the
                model they name must be the one the indexes were built with.
            device: where the model runs (``auto``: CUDA when available).
            use_faiss: search through the FAISS index of an index that has one.
            exact_kernel: ``"blas"``, ``"fused"`` or ``"auto"``: how exact search scores a
                single query (`SearchIndex`); a long-lived process gains from ``"auto"``.
        """
        device = resolve_device(device) if isinstance(device, str) else device  # before anything is read
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        indexes = {name: SearchIndex(folder, use_faiss, exact_kernel) for name, folder in find_indexes(paths).items()}
        manifests = {name: index.manifest for name, index in indexes.items()}
        spec = replace(next(iter(manifests.values())).spec, **overrides) if overrides else None
        model = SearchModel.for_indexes(manifests, device, spec)
        return cls(indexes, model)

    def index(self, name: str | None) -> tuple[str, SearchIndex]:
        """``(name, index)``; None names the first index.

        Raises:
            KeyError: no index of that name (the names are listed).
        """
        if name is None:
            name = next(iter(self.indexes))
        if name not in self.indexes:
            raise KeyError(f"no index {name!r}; the indexes are {', '.join(sorted(self.indexes))}")
        return name, self.indexes[name]

    def query_embedding(self, name: str, *, text: str | None = None, image: Image.Image | None = None,
                        item: int | None = None, embedding: Sequence[float] | None = None) -> np.ndarray:
        """The ``(d,)`` unit-length query vector of exactly one of the query kinds.

        Raises:
            ValueError: not exactly one query given, an empty text, or an embedding of the
                wrong width or length zero.
            KeyError: an unknown item.
        """
        given = [kind for kind, value in (("text", text), ("image", image), ("item", item), ("embedding", embedding))
                 if value is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of text, image, item, embedding (got {', '.join(given) or 'none'})")
        _, index = self.index(name)
        if text is not None:
            if not text.strip():
                raise ValueError("the text query is empty")
            return self.model.encode_text([text], name)[0]
        if image is not None:
            return self.model.encode_images([image], name)[0]
        if item is not None:
            vector = index.store.vector(item)
            if not np.isfinite(vector).all():
                raise ValueError(f"item {item}'s embedding in the index is damaged (not finite numbers)")
            return vector
        vector = np.asarray(embedding, dtype=np.float32).reshape(-1)
        if vector.shape != (index.manifest.dim,) or not np.isfinite(vector).all() or not np.linalg.norm(vector):
            raise ValueError(f"the embedding must be {index.manifest.dim} finite numbers, not all zero")
        return vector / np.linalg.norm(vector)

    def search(self, *, text: str | None = None, image: Image.Image | None = None, item: int | None = None,
               embedding: Sequence[float] | None = None, k: int = 10, index: str | None = None) -> list[dict[str, Any]]:
        """The top ``k`` items of index ``index`` (default: the first) for one query; rows whose
        embedding is damaged (a score that is not a number) are left out."""
        name, search_index = self.index(index)
        query = self.query_embedding(name, text=text, image=image, item=item, embedding=embedding)
        scores, ids = search_index.search(query, k)
        return [{**search_index.item(int(row)), "score": float(score)}
                for score, row in zip(scores[0], ids[0], strict=True) if row >= 0 and np.isfinite(score)]

    def describe(self) -> list[dict[str, Any]]:
        """One entry per index: name, count, width, model, search kind."""
        return [{"name": name, "count": len(index), "dim": index.manifest.dim, "model": index.manifest.describe(),
                 "search": "faiss " + index.manifest.faiss["type"] if index.approximate else "exact",
                 "recall_at_10": (index.manifest.faiss or {}).get("recall_at_10") if index.approximate else 1.0}
                for name, index in self.indexes.items()]

