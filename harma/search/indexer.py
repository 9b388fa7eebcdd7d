"""Building an index: embed every image of a source, shard by shard, resumable and torchrun-aware.

The items are split into fixed shards of ``shard_size`` consecutive items. A shard is written
whole (atomically) once its images are embedded, so a run killed at any point and started again
with the same command embeds only the shards that are missing, and ends with the same files as
an uninterrupted run. Under ``torchrun`` rank ``r`` of ``w`` embeds shards ``r, r + w, ...`` and
writes them itself; rank 0 joins them into the manifest once every rank is done. Without
torchrun, ``part=(K, N)`` does the same for one of N machines that do not talk to each other.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..distributed import barrier, get_rank, get_world_size, init_distributed_from_env, is_distributed
from ..training.model_options import ModelSpec, build_from_spec, load_named_adapters
from ..training.models import build_backbone, looks_like_path
from ..training.options import resolve_device
from .encoder import SearchModel
from .manifest import INDEX_MAX_PIXELS, MANIFEST_NAME, Manifest, adapter_fingerprint
from .sources import ImageSource, ItemDataset, collate_items
from .store import atomic_write_bytes, atomic_write_json, read_jsonl_lines, shard_files, write_shard

__all__ = ["IndexOptions", "UnreadableImageError", "build_index", "index_targets"]

BUILD_NAME = "build.json"


class UnreadableImageError(ValueError):
    """An image could not be read and ``strict`` was asked for (the image and cause are named)."""


@dataclass
class IndexOptions:
    """How to run an index build.

    Attributes:
        batch_size: images per forward pass.
        num_workers: DataLoader worker processes that read and transform images.
        device: where the model runs.
        shard_size: items per shard (the unit of resumption and of work per rank).
        strict: stop at the first unreadable image instead of listing and skipping it.
        max_pixels: images larger than this are unreadable (decompression bombs); recorded in
            the manifest, and the server serves the index's images up to it.
        part: ``(K, N)``: embed only shards ``K, K + N, ...`` (one of N independent machines).
        progress: show a progress bar with images/s.
    """

    batch_size: int = 128
    num_workers: int = 4
    device: str = "auto"
    shard_size: int = 10000
    strict: bool = False
    max_pixels: int = INDEX_MAX_PIXELS
    part: tuple[int, int] | None = None
    progress: bool = True
    stats: dict[str, Any] = field(default_factory=dict)


def _absolute(path: str | None) -> str | None:
    return str(Path(path).expanduser().resolve()) if path else path


def index_targets(spec: ModelSpec, out: Path) -> list[tuple[Path, str | None, str | None]]:
    """``[(index folder, adapters file or None, adapter set name or None)]``: one index, or one
    per named adapter set (``out/NAME``)."""
    if isinstance(spec.adapters, dict):
        return [(out / name, _absolute(path), name) for name, path in spec.adapters.items()]
    return [(out, _absolute(spec.adapters), None)]


def _build_record(spec: ModelSpec, adapters: str | None, adapter_name: str | None, source: ImageSource,
                  options: IndexOptions) -> dict[str, Any]:
    keys = hashlib.sha256("\n".join(item.key for item in source.items).encode("utf-8")).hexdigest()
    return {
        "spec": replace(spec, adapters=adapters).to_dict(), "backbone": spec.backbone_fingerprint(),
        "adapters": adapter_fingerprint(adapters), "adapter_name": adapter_name,
        "source": {**source.description, "kind": source.kind, "root": str(source.root.resolve())},
        "items": len(source.items), "keys_sha256": keys, "shard_size": options.shard_size,
        "max_pixels": options.max_pixels,
    }


def _start_or_resume(index_dir: Path, record: dict[str, Any]) -> None:
    """Write ``build.json``, or check that the one there matches (a resumed build must be the
    same build)."""
    path = index_dir / BUILD_NAME
    if path.is_file():
        previous = json.loads(path.read_text(encoding="utf-8"))
        previous.setdefault("max_pixels", INDEX_MAX_PIXELS)  # a build started before it was recorded
        if previous != record:
            differing = sorted(key for key in set(previous) | set(record) if previous.get(key) != record.get(key))
            raise ValueError(
                f"'{index_dir}' holds an index built with other options or from another list of images "
                f"(differing: {', '.join(differing)}): give another --out, or delete '{index_dir}' to start over")
        return
    if index_dir.exists() and not index_dir.is_dir():
        raise NotADirectoryError(f"'{index_dir}' is a file, not a folder for an index: give another --out")
    if index_dir.exists() and any(index_dir.iterdir()):
        raise FileExistsError(f"'{index_dir}' is not empty and holds no index build: give another --out")
    atomic_write_json(path, record)


def _start_or_resume_all(targets: Sequence[tuple[Path, str | None, str | None]],
                         records: Sequence[dict[str, Any]]) -> None:
    for (index_dir, _, _), record in zip(targets, records, strict=True):
        _start_or_resume(index_dir, record)


def _shard_complete(index_dir: Path, shard: int) -> bool:
    return shard_files(index_dir, shard)["embeddings"].is_file()


def _positions(shard: int, shard_size: int, total: int) -> range:
    return range(shard * shard_size, min((shard + 1) * shard_size, total))


def _my_shards(n_shards: int, part: tuple[int, int] | None) -> list[int]:
    rank, world = (part if part is not None else (get_rank(), get_world_size()))
    return list(range(rank, n_shards, world))


def _build_model(spec: ModelSpec, targets: Sequence[tuple[Path, str | None, str | None]],
                 device: torch.device) -> SearchModel:
    if isinstance(spec.adapters, dict):
        model = build_backbone(spec.model, spec.pretrained, spec.model_config, spec.image_size)
        load_named_adapters(model, {name: path for _, path, name in targets})
        return SearchModel(model.eval(), replace(spec, adapters=None), {name: name for _, _, name in targets}, device)
    return SearchModel(build_from_spec(spec), spec, {"index": None}, device)


class _ShardAccumulator:
    """Rows of the shards in progress, per target, until each shard is whole."""

    def __init__(self, source: ImageSource, shard_size: int, pending: dict[int, list[int]]) -> None:
        self.source, self.shard_size, self.pending = source, shard_size, pending
        self.seen: dict[int, int] = {}
        self.rows: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = {}
        self.failures: dict[int, list[dict[str, Any]]] = {}

    def add(self, target: int, positions: Sequence[int], embeddings: np.ndarray) -> None:
        for position, row in zip(positions, embeddings, strict=True):
            self.rows.setdefault((position // self.shard_size, target), []).append((position, row))

    def fail(self, position: int, reason: str) -> None:
        item = self.source.items[position]
        self.failures.setdefault(position // self.shard_size, []).append(
            {"position": position, "key": item.key, "path": item.path, "reason": reason})

    def count(self, positions: Sequence[int]) -> list[int]:
        """Mark positions as seen; returns the shards now whole."""
        done = []
        for position in positions:
            shard = position // self.shard_size
            self.seen[shard] = self.seen.get(shard, 0) + 1
            if self.seen[shard] == len(_positions(shard, self.shard_size, len(self.source.items))):
                done.append(shard)
        return done

    def write(self, shard: int, targets: Sequence[tuple[Path, str | None, str | None]], dim: int) -> None:
        for target in self.pending[shard]:
            rows = self.rows.pop((shard, target), [])
            embeddings = np.stack([row for _, row in rows]) if rows else np.zeros((0, dim), np.float32)
            metadata = [{"position": position, **self.source.items[position].metadata()} for position, _ in rows]
            write_shard(targets[target][0], shard, embeddings.astype(np.float16), metadata,
                        self.failures.get(shard, []))
        self.failures.pop(shard, None)


def _loader(source: ImageSource, batches: list[list[int]], model: SearchModel, options: IndexOptions) -> DataLoader:
    dataset = ItemDataset(source, range(len(source.items)), model.transform, options.max_pixels)
    return DataLoader(dataset, batch_sampler=batches, num_workers=options.num_workers, collate_fn=collate_items,
                      pin_memory=model.device.type == "cuda", persistent_workers=False)


def _embed_shards(source: ImageSource, targets: list[tuple[Path, str | None, str | None]], model: SearchModel,
                  shards: dict[int, list[int]], options: IndexOptions) -> int:
    """Embed the ``{shard: [target numbers missing it]}`` shards; returns the images embedded."""
    total = len(source.items)
    batches = [list(positions[start:start + options.batch_size])
               for shard in sorted(shards) for positions in [_positions(shard, options.shard_size, total)]
               for start in range(0, len(positions), options.batch_size)]
    accumulator = _ShardAccumulator(source, options.shard_size, shards)
    images_total = sum(len(batch) for batch in batches)
    dim, done_images, start_time = 0, 0, time.perf_counter()
    bar = tqdm(total=images_total, unit="img", desc="index", disable=not (options.progress and get_rank() == 0))
    for images, positions, failed in _loader(source, batches, model, options):
        for position, reason in failed:
            if options.strict:
                item = source.items[position]
                raise UnreadableImageError(f"image '{item.path}'{' member ' + item.member if item.member else ''} "
                                           f"(item {position}, key {item.key!r}) could not be read: {reason}")
            accumulator.fail(position, reason)
        if images is not None:
            for target in sorted({t for shard in {p // options.shard_size for p in positions} for t in shards[shard]}):
                selected = [i for i, p in enumerate(positions) if target in shards[p // options.shard_size]]
                embeddings = model.encode_pixels(images[selected], _set_of(model, targets, target))
                dim = embeddings.shape[1]
                accumulator.add(target, [positions[i] for i in selected], embeddings)
        for shard in accumulator.count(positions + [p for p, _ in failed]):
            accumulator.write(shard, targets, dim or _width(model))
        done_images += len(positions) + len(failed)
        bar.update(len(positions) + len(failed))
    bar.close()
    options.stats.update(images=done_images, seconds=time.perf_counter() - start_time)
    return done_images


def _set_of(model: SearchModel, targets: Sequence[tuple[Path, str | None, str | None]], target: int) -> str:
    name = targets[target][2]
    return name if name is not None else next(iter(model.sets))


def _width(model: SearchModel) -> int:
    return int(model.encode_text(["a"]).shape[1])


def _join(index_dir: Path, record: dict[str, Any], n_shards: int) -> Manifest | None:
    """Write the manifest and the failure report when every shard is complete; else None."""
    missing = [shard for shard in range(n_shards) if not _shard_complete(index_dir, shard)]
    if missing:
        return None
    shards, failures, dim = [], [], None
    for shard in range(n_shards):
        files = shard_files(index_dir, shard)
        array = np.load(files["embeddings"], mmap_mode="r")
        lines = read_jsonl_lines(files["metadata"])
        if len(lines) != len(array):
            raise ValueError(f"'{index_dir}': shard {shard} has {len(array)} embeddings and {len(lines)} metadata "
                             f"rows; delete {files['embeddings']} and run the command again")
        if len(array):
            dim = dim or array.shape[1]
        shards.append({"shard": shard, "count": len(array)})
        failures.extend(read_jsonl_lines(files["failures"]))
    atomic_write_bytes(index_dir / "failures.jsonl", "".join(line + "\n" for line in failures).encode("utf-8"))
    manifest = Manifest(
        spec=ModelSpec(**record["spec"]), backbone=record["backbone"], adapters=record["adapters"],
        adapter_name=record["adapter_name"], dim=int(dim or 0), count=sum(s["count"] for s in shards),
        shards=shards, source=record["source"], failures=len(failures), max_pixels=record["max_pixels"],
    )
    atomic_write_json(index_dir / MANIFEST_NAME, manifest.to_dict())
    return manifest


def _absolute_spec(spec: ModelSpec) -> ModelSpec:
    pretrained = spec.pretrained
    if pretrained and looks_like_path(pretrained) and Path(pretrained).expanduser().exists():
        pretrained = _absolute(pretrained)
    return replace(spec, pretrained=pretrained)


def build_index(source: ImageSource, spec: ModelSpec, out: str | os.PathLike,
                options: IndexOptions | None = None) -> list[Manifest | None]:
    """Embed every image of ``source`` with the model of ``spec`` into the index at ``out`` (one
    index per named adapter set, at ``out/NAME``).

    Run again with the same arguments after an interruption, it embeds only the missing shards.
    Under ``torchrun`` (or with ``options.part``) each process embeds its share; the manifest is
    written once every shard exists.

    Returns:
        The manifest of each index (None for an index whose shards are not all written yet:
        other ranks or parts are still to run).

    Raises:
        ValueError: ``out`` holds a build with other options or another list of images, or an
            image could not be read with ``options.strict``.
        FileExistsError: ``out`` is a non-empty folder that holds no index build.
    """
    options = options or IndexOptions()
    if not source.items:
        raise ValueError(f"no image found in {source.description}")
    init_distributed_from_env()
    spec = _absolute_spec(spec)
    targets = index_targets(spec, Path(out))
    records = [_build_record(spec, adapters, name, source, options) for _, adapters, name in targets]
    # Rank 0 starts the build (writes build.json) before the other ranks check it: a rank that
    # looked while rank 0 was writing would see a folder holding files but no build yet.
    if get_rank() == 0:
        _start_or_resume_all(targets, records)
    if is_distributed():
        barrier()
    if get_rank() != 0:
        _start_or_resume_all(targets, records)
    n_shards = math.ceil(len(source.items) / options.shard_size)
    pending = {shard: [t for t, (index_dir, _, _) in enumerate(targets) if not _shard_complete(index_dir, shard)]
               for shard in _my_shards(n_shards, options.part)}
    pending = {shard: missing for shard, missing in pending.items() if missing}
    if pending:
        device = _device(options.device)
        model = _build_model(spec, targets, device)
        _embed_shards(source, targets, model, pending, options)
    if is_distributed():
        barrier()
        if get_rank() != 0:
            return [None] * len(targets)
    return [_join(index_dir, record, n_shards) for (index_dir, _, _), record in zip(targets, records, strict=True)]


def _device(text: str) -> torch.device:
    device = resolve_device(text)
    if device.type == "cuda" and device.index is None and is_distributed():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device

