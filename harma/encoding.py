"""Running a CLIP-style model's two encoders over an evaluation set: batched, on one device,
in eval mode, each process on its own shard.

Shared by `harma.retrieval.RetrievalEvaluator` and `harma.classification.ZeroShotEvaluator`.
A model is used through ``encode_image(images)`` and ``encode_text(tokens)`` (open_clip and
any model with that interface); a Hugging Face ``CLIPModel``/``SiglipModel`` (which has
``get_image_features``/``get_text_features`` instead) is called through those, with the token
ids as ``input_ids``. Wrappers with a ``.module`` (DDP, DataParallel) are looked through.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from .distributed import is_main_process

__all__ = ["BatchEncoder", "encoders_of", "kept_modes", "shard_bounds"]

AUTOCAST_DTYPES = (None, torch.bfloat16, torch.float16)


def _first_field(item: Any) -> Tensor:
    return item[0] if isinstance(item, (tuple, list)) else item


def _collate_images(items: list[Any]) -> Tensor:
    return torch.stack([_first_field(item) for item in items])


def shard_bounds(n_items: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous, near-equal shard ``[start, stop)`` of ``n_items`` for ``rank``."""
    return n_items * rank // world_size, n_items * (rank + 1) // world_size


def _features(output: Any) -> Tensor:
    # transformers 5 returns an output object whose pooler_output holds the projected features.
    return getattr(output, "pooler_output", output)


class _HuggingFaceEncoders:
    """open_clip-style ``encode_image``/``encode_text`` of a transformers CLIP or SigLIP model."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def encode_image(self, images: Tensor) -> Tensor:
        return _features(self.model.get_image_features(pixel_values=images))

    def encode_text(self, input_ids: Tensor) -> Tensor:
        return _features(self.model.get_text_features(input_ids=input_ids))


def encoders_of(model: nn.Module) -> Any:
    """The object whose ``encode_image``/``encode_text`` embed images and token ids.

    Looks through wrappers exposing ``.module`` (DDP, DataParallel). A model with
    ``encode_image`` is returned itself; a Hugging Face model with ``get_image_features`` and
    ``get_text_features`` is wrapped.

    Raises:
        TypeError: the model has neither interface.
    """
    inner = model
    while not hasattr(inner, "encode_image") and not hasattr(inner, "get_image_features") and hasattr(
        inner, "module"
    ):
        inner = inner.module
    if hasattr(inner, "encode_image"):
        return inner
    if hasattr(inner, "get_image_features") and hasattr(inner, "get_text_features"):
        return _HuggingFaceEncoders(inner)
    raise TypeError(
        f"{type(model).__name__} has no encode_image/encode_text (open_clip's interface) nor "
        "get_image_features/get_text_features (Hugging Face's): wrap it in a module that has"
    )


@contextlib.contextmanager
def kept_modes(model: nn.Module) -> Iterator[None]:
    """Eval mode inside; afterwards every submodule gets back its own ``training`` flag.

    Adapter training typically keeps a frozen backbone in eval mode, which a blanket
    ``model.train()`` afterwards would undo.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, was_training in modes:
            module.training = was_training


class BatchEncoder:
    """Batched encoding settings and loops; evaluators inherit them.

    Subclasses call ``_set_encoding_options`` in their ``__init__``: it checks and sets
    ``tokenizer``, ``batch_size``, ``num_workers``, ``device``, ``autocast_dtype`` and
    ``progress``.
    """

    tokenizer: Callable[[list[str]], Tensor]
    batch_size: int
    num_workers: int
    device: torch.device | None
    autocast_dtype: torch.dtype | None
    progress: bool

    def _set_encoding_options(
        self,
        tokenizer: Callable[[list[str]], Tensor],
        batch_size: int,
        num_workers: int,
        device: torch.device | str | None,
        autocast_dtype: torch.dtype | None,
        progress: bool,
    ) -> None:
        for name, value, minimum in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        if autocast_dtype not in AUTOCAST_DTYPES:
            raise ValueError(
                f"autocast_dtype must be None, torch.bfloat16 or torch.float16, got {autocast_dtype}"
            )
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.device = torch.device(device) if device is not None else None
        self.autocast_dtype = autocast_dtype
        self.progress = progress

    def _resolve_device(self, model: nn.Module) -> torch.device:
        if self.device is not None:
            return self.device
        first_parameter = next(model.parameters(), None)
        return first_parameter.device if first_parameter is not None else torch.device("cpu")

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is not None and device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=self.autocast_dtype)
        return contextlib.nullcontext()

    def _show_progress(self) -> bool:
        return self.progress and is_main_process()

    def _image_batches(
        self, encoder: Any, dataset: Dataset | Sequence[Any], device: torch.device, indices: list[int]
    ) -> Iterator[Tensor]:
        """float32 embeddings ``(batch, d)`` of ``dataset[indices]``, batch by batch, in order."""
        loader = DataLoader(
            Subset(dataset, indices),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=_collate_images,
            pin_memory=device.type == "cuda",
        )
        for images in tqdm(loader, desc="encode images", disable=not self._show_progress()):
            with self._autocast(device):
                embeds = encoder.encode_image(images.to(device, non_blocking=True)).float()
            # Yielded outside autocast: what the caller computes from it stays in float32.
            yield embeds

    def _encode_text_list(
        self, encoder: Any, device: torch.device, texts: Sequence[str], desc: str = "encode captions"
    ) -> Tensor:
        """float32 embeddings ``(len(texts), d)`` of a non-empty list of strings."""
        chunks = []
        batch_starts = range(0, len(texts), self.batch_size)
        for batch_start in tqdm(batch_starts, desc=desc, disable=not self._show_progress()):
            tokens = self.tokenizer(list(texts[batch_start : batch_start + self.batch_size]))
            with self._autocast(device):
                chunks.append(encoder.encode_text(tokens.to(device)).float())
        return torch.cat(chunks)
