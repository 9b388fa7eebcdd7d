"""A small archive for the search tests: a tiny random open_clip backbone saved as a weights file
(so that every process rebuilds the same model), two HarMA adapter files, and generated images
that differ in colour and pattern. The helpers are in ``search_support``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from search_support import Archive, adapter_file, run_search, write_images

from harma.io import write_safetensors
from harma.training.models import build_backbone, tiny_clip_config


@pytest.fixture(scope="session")
def archive(tmp_path_factory) -> Archive:
    root = tmp_path_factory.mktemp("archive")
    config = tiny_clip_config(image_size=32, width=64, layers=2, embed_dim=32)
    (root / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    model = build_backbone("tiny", None, config)
    write_safetensors(root / "backbone.safetensors", dict(model.state_dict()), {})
    adapters = adapter_file(model, root / "adapters.safetensors", seed=1)
    other = adapter_file(model, root / "other.safetensors", seed=2)
    write_images(root / "images", 24)
    (root / "images" / "roofs" / "img000.txt").write_text("red roofs beside a road\nmany houses\n")
    return Archive(root, root / "images", root / "config.json", root / "backbone.safetensors", adapters, other)


@pytest.fixture(scope="session")
def built_index(archive, tmp_path_factory) -> Path:
    """The archive indexed with the adapters (3 shards of 10), at one thread (`run_search`)."""
    out = tmp_path_factory.mktemp("index") / "index"
    run_search("index", "--images", str(archive.images), "--out", str(out), *archive.model_args(),
               "--batch_size", "4", "--num_workers", "0", "--shard_size", "10", "--quiet")
    return out
