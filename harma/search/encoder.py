"""One backbone that embeds queries (and images) for one or several indexes.

Each index names the adapters it was built with: none (the frozen backbone), one file written by
harma (HarMA adapters, LoRA or full fine-tuning), or one HarMA adapter file of several built on
one backbone. Several indexes share one backbone: each HarMA adapter file is loaded as a named
set and `harma.set_adapter` (inference mode) switches between them; the frozen backbone runs with
every set bypassed (`harma.disable_adapters`).
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..checkpoint import FORMAT_NAME as HARMA_FORMAT
from ..checkpoint import load_adapters
from ..inject import disable_adapters, is_patched
from ..io import read_safetensors
from ..named_adapters import set_adapter
from ..training.data import test_transform
from ..training.model_options import ModelSpec, build_from_spec
from ..training.models import build_backbone, build_tokenizer
from ..training.options import resolve_device
from .manifest import IndexMismatchError, Manifest, describe_model, same_backbone

__all__ = ["SearchModel", "autocast_context", "is_harma_adapter_file", "set_name_for"]


def is_harma_adapter_file(path: str) -> bool:
    """Whether ``path`` is a `harma.save_adapters` file (not a LoRA or full training output)."""
    metadata, _ = read_safetensors(path)
    return metadata.get("format") == HARMA_FORMAT


def set_name_for(index_name: str) -> str:
    """An adapter set name for an index name (letters, digits and ``_`` only)."""
    return "index_" + re.sub(r"\W", "_", index_name)


def autocast_context(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """float16 autocast (``torch.amp``) on a CUDA device; nothing on the CPU."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


class SearchModel:
    """A CLIP-style model that embeds texts and images for the indexes it was built for.

    Embeddings are float32, L2-normalised, ``(n, d)`` numpy arrays. Calls are serialised by a
    lock (switching the adapter set and encoding are one step), so one instance serves threads.

    Args:
        model: the backbone with its adapters loaded, in eval mode.
        spec: the backbone's options (the tokenizer and the image size come from it).
        sets: ``{index name: adapter set name, or None for the model as it is, or "" for the
            backbone with every set bypassed}``.
        device: where to run (a name: `harma.training.options.resolve_device`, ``auto`` too).
    """

    def __init__(self, model: nn.Module, spec: ModelSpec, sets: Mapping[str, str | None],
                 device: torch.device | str = "cpu") -> None:
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.model = model.to(self.device).eval()
        self.spec = spec
        self.sets = dict(sets)
        self.tokenizer = build_tokenizer(spec.model, spec.model_config)
        self.transform = test_transform(spec.image_size)
        self._lock = threading.Lock()

    @classmethod
    def for_indexes(cls, manifests: Mapping[str, Manifest], device: torch.device | str = "cpu",
                    spec: ModelSpec | None = None) -> SearchModel:
        """The model that embeds queries for each of ``manifests`` (``{index name: manifest}``).

        ``spec`` (model options given again) overrides the manifests' and must name the same model.

        Raises:
            IndexMismatchError: the indexes were built on different backbones, or ``spec`` differs
                from the model an index was built with (both named).
            ValueError: several indexes of which one has a LoRA or full fine-tuning file (those
                cannot share a backbone).
        """
        names = list(manifests)
        first = manifests[names[0]]
        for name in names[1:]:
            if not same_backbone(manifests[name].backbone, first.backbone):
                raise IndexMismatchError(
                    f"indexes '{names[0]}' and '{name}' were built on different backbones "
                    f"({describe_model(first.backbone, None)} and "
                    f"{describe_model(manifests[name].backbone, None)}); serve each on its own")
        if spec is not None:
            for name, manifest in manifests.items():
                manifest.check_model(spec if len(manifests) == 1 else replace(spec, adapters=manifest.spec.adapters),
                                     name)
        base = spec or first.spec
        if len(manifests) == 1:
            model = build_from_spec(replace(base, adapters=first.spec.adapters))
            return cls(model, base, {names[0]: None}, device)
        return cls._shared(manifests, replace(base, adapters=None), device)

    @classmethod
    def _shared(cls, manifests: Mapping[str, Manifest], base: ModelSpec, device: torch.device | str) -> SearchModel:
        model = build_backbone(base.model, base.pretrained, base.model_config, base.image_size)
        sets: dict[str, str | None] = {}
        for name, manifest in manifests.items():
            adapters = manifest.spec.adapters
            if adapters is None:
                sets[name] = ""
                continue
            if not is_harma_adapter_file(adapters):
                raise ValueError(f"index '{name}' was built with '{adapters}', a LoRA or full fine-tuning file: "
                                 f"only HarMA adapter files share a backbone; serve that index on its own")
            sets[name] = set_name_for(name)
            load_adapters(model, adapters, adapter_name=sets[name])
        return cls(model.eval(), base, sets, device)

    @contextlib.contextmanager
    def _using(self, index: str | None) -> Iterator[nn.Module]:
        if index is not None and index not in self.sets:
            raise KeyError(f"no index {index!r} (indexes: {', '.join(self.sets)})")
        adapter_set = self.sets[index] if index is not None else None
        with self._lock, torch.inference_mode():
            if adapter_set == "" and is_patched(self.model):
                with disable_adapters(self.model):
                    yield self.model
                return
            if adapter_set:
                set_adapter(self.model, adapter_set, inference_mode=True)
            yield self.model

    def _normalised(self, embeddings: torch.Tensor) -> np.ndarray:
        return F.normalize(embeddings.float(), dim=-1).cpu().numpy()

    def encode_text(self, texts: Sequence[str], index: str | None = None) -> np.ndarray:
        """``(len(texts), d)`` float32 unit-length text embeddings."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        with self._using(index) as model, autocast_context(self.device):
            return self._normalised(model.encode_text(tokens))

    def encode_pixels(self, pixels: torch.Tensor, index: str | None = None) -> np.ndarray:
        """``(n, d)`` float32 unit-length embeddings of transformed images ``(n, 3, S, S)``."""
        with self._using(index) as model, autocast_context(self.device):
            return self._normalised(model.encode_image(pixels.to(self.device, non_blocking=True)))

    def encode_images(self, images: Sequence[Image.Image], index: str | None = None) -> np.ndarray:
        """``(len(images), d)`` float32 unit-length embeddings of RGB images."""
        return self.encode_pixels(torch.stack([self.transform(image) for image in images]), index)
