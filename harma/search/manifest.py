"""The manifest of an index: the model that embedded it, the source, the shards and the count.

``query`` and ``serve`` rebuild the model from the manifest alone; model options given again
override it, and a model that differs from the one the index was built with is refused.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..training.model_options import ModelSpec, file_sha256

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "INDEX_MAX_PIXELS",
    "IndexMismatchError",
    "Manifest",
    "adapter_fingerprint",
    "describe_model",
    "read_manifest",
    "same_backbone",
]

FORMAT = "harma.search.index"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
# PIL's own decompression-bomb limit (it refuses larger images itself): the largest image the
# indexer reads unless told otherwise, and the limit of an index whose manifest names none.
INDEX_MAX_PIXELS = 178_956_970


class IndexMismatchError(ValueError):
    """The model asked for is not the one an index was built with (both are named)."""


def adapter_fingerprint(adapters: str | None) -> dict[str, Any] | None:
    """``{"path", "sha256"}`` of one adapter (or LoRA / full) file, None without adapters."""
    if adapters is None:
        return None
    path = Path(adapters)
    if path.is_dir():
        path = path / "adapter_model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"--adapters: no file at '{adapters}'")
    return {"path": str(adapters), "sha256": file_sha256(path)}


def describe_model(backbone: dict[str, Any], adapters: dict[str, Any] | None) -> str:
    """A short human description: ``ViT-B-32 (pretrained x.pt, sha256 1a2b3c4d) + adapters a.safetensors
    (sha256 5e6f7a8b)``."""
    text = backbone["model"]
    if backbone.get("model_config") is not None:
        text += " (model_config " + json.dumps(backbone["model_config"], sort_keys=True)[:60] + "...)"
    if backbone.get("pretrained"):
        sha = backbone.get("pretrained_sha256")
        text += f" pretrained {backbone['pretrained']}" + (f" (sha256 {sha[:12]})" if sha else "")
    text += f" at {backbone['image_size']} px"
    if adapters is None:
        return text + ", no adapters (frozen backbone)"
    return text + f" + adapters {adapters['path']} (sha256 {adapters['sha256'][:12]})"


def same_backbone(first: dict[str, Any], second: dict[str, Any]) -> bool:
    """Whether two `ModelSpec.backbone_fingerprint` name the same backbone: the same options, and
    the same weights (by SHA-256 when both are local files, so a moved file is the same)."""
    keys = ("model", "model_config", "image_size")
    if any(first.get(key) != second.get(key) for key in keys):
        return False
    if first.get("pretrained_sha256") and second.get("pretrained_sha256"):
        return first["pretrained_sha256"] == second["pretrained_sha256"]
    return first.get("pretrained") == second.get("pretrained")


@dataclass
class Manifest:
    """The content of ``manifest.json`` (see `harma.search.store` for the folder layout).

    Attributes:
        spec: the model options the index was built with (``adapters`` one file or None).
        backbone: `ModelSpec.backbone_fingerprint` of the backbone.
        adapters: `adapter_fingerprint` of the adapter file, or None (frozen backbone).
        adapter_name: the named set the adapters were given as (``--adapters NAME=PATH``).
        dim: embedding width.
        count: number of indexed items (rows).
        shards: ``[{"shard", "count"}]`` in row order.
        source: how the items were found (`ImageSource.description`) and ``kind``, ``root``.
        failures: number of unreadable images (listed in ``failures.jsonl``).
        faiss: the approximate index's description (file, type, recall@10), or None.
        max_pixels: the largest image (width x height) the indexer read; the server serves the
            index's images up to it.
    """

    spec: ModelSpec
    backbone: dict[str, Any]
    adapters: dict[str, Any] | None
    adapter_name: str | None
    dim: int
    count: int
    shards: list[dict[str, Any]]
    source: dict[str, Any]
    failures: int = 0
    faiss: dict[str, Any] | None = None
    max_pixels: int = INDEX_MAX_PIXELS

    @property
    def root(self) -> Path:
        """The folder the indexed paths are relative to."""
        return Path(self.source["root"])

    def describe(self) -> str:
        return describe_model(self.backbone, self.adapters)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION, "spec": self.spec.to_dict(),
            "backbone": self.backbone, "adapters": self.adapters, "adapter_name": self.adapter_name,
            "dim": self.dim, "count": self.count, "dtype": "float16", "normalized": True,
            "shards": self.shards, "source": self.source, "failures": self.failures, "faiss": self.faiss,
            "max_pixels": self.max_pixels,
        }

    def check_model(self, spec: ModelSpec, index_dir: str | os.PathLike) -> None:
        """Refuse ``spec`` when its backbone or adapter file differs from the index's.

        Raises:
            IndexMismatchError: naming the index's model and the model asked for.
        """
        backbone = spec.backbone_fingerprint()
        adapters = adapter_fingerprint(spec.adapters) if isinstance(spec.adapters, str) else None
        same_adapters = (adapters or {}).get("sha256") == (self.adapters or {}).get("sha256")
        if not same_backbone(backbone, self.backbone) or not same_adapters:
            raise IndexMismatchError(
                f"index '{index_dir}' was built with {self.describe()}; the model asked for is "
                f"{describe_model(backbone, adapters)}. Query an index with the model that built it "
                f"(or index again with this one)."
            )


def read_manifest(index_dir: str | os.PathLike) -> Manifest:
    """Read ``INDEX/manifest.json``.

    Raises:
        FileNotFoundError: no index there (an unfinished build is named as such).
        ValueError: not a harma search index, a newer format, or a damaged file (named).
    """
    index_dir = Path(index_dir)
    path = index_dir / MANIFEST_NAME
    if not path.is_file():
        if (index_dir / "build.json").is_file():
            raise FileNotFoundError(f"index '{index_dir}' is not finished (no manifest.json): run the same "
                                    f"index command again to complete it")
        raise FileNotFoundError(f"no index at '{index_dir}' (no manifest.json)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"'{path}' is not valid JSON: {error}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"'{path}' is not a harma search manifest (format {FORMAT!r})")
    if data.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"'{path}' has format version {data['format_version']}; this harma reads up to "
                         f"{FORMAT_VERSION}: upgrade harma")
    max_pixels = data.get("max_pixels", INDEX_MAX_PIXELS)  # absent from indexes written before it was recorded
    if type(max_pixels) is not int or max_pixels < 1:
        raise ValueError(f"'{path}' is damaged: max_pixels must be a positive integer, got {max_pixels!r}")
    try:
        return Manifest(
            spec=ModelSpec(**data["spec"]), backbone=data["backbone"], adapters=data["adapters"],
            adapter_name=data.get("adapter_name"), dim=int(data["dim"]), count=int(data["count"]),
            shards=list(data["shards"]), source=dict(data["source"]), failures=int(data.get("failures", 0)),
            faiss=data.get("faiss"), max_pixels=max_pixels,
        )
    except (KeyError, TypeError) as error:
        raise ValueError(f"'{path}' is damaged: {type(error).__name__}: {error}") from None
