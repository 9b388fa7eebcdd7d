"""Building open_clip backbones and their tokenizers for training and evaluation.

Three ways to name a backbone:

* a built-in open_clip architecture and a ``pretrained`` tag (``"ViT-B-32"`` +
  ``"laion2b_s34b_b79k"``), downloaded by open_clip on first use;
* a built-in architecture and a local weights file (``"ViT-B-32-quickgelu"`` +
  ``"/models/RS5M_ViT-B-32_RET-2.pt"``, the GeoRSCLIP backbone), or a Hugging Face Hub model
  (``"hf-hub:org/repo"``);
* an explicit architecture dictionary (``model_config``: the keyword arguments of
  ``open_clip.CLIP``), optionally with a local weights file; used for the small CPU models of
  the demo and the tests (`tiny_clip_config`).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import load_adapters
from ..inject import inject_harma_adapters
from ..io import match_tensors, read_state_dict
from .config import TrainConfig

__all__ = [
    "WEIGHT_SUFFIXES",
    "apply_lora",
    "build_model",
    "build_backbone",
    "build_tokenizer",
    "check_pretrained_source",
    "load_backbone_weights",
    "looks_like_path",
    "native_image_size",
    "tiny_clip_config",
]

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")

Tokenizer = Callable[[list[str]], torch.Tensor]


def tiny_clip_config(
    image_size: int = 32,
    width: int = 128,
    layers: int = 3,
    embed_dim: int = 64,
    patch_size: int = 8,
    context_length: int = 32,
) -> dict[str, Any]:
    """Keyword arguments of ``open_clip.CLIP`` for a small real CLIP that trains on a CPU.

    Both towers are open_clip transformers of ``layers`` blocks and ``width`` features with
    64-feature heads; the text tower uses open_clip's full BPE vocabulary (49,408 tokens), so
    the stock tokenizer works with it. ``context_length`` 32 holds the 30-word captions of the
    datasets and keeps the text tower fast.
    """
    heads = max(1, width // 64)
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {
            "image_size": image_size,
            "patch_size": patch_size,
            "width": width,
            "layers": layers,
            "head_width": width // heads,
        },
        "text_cfg": {
            "context_length": context_length,
            "vocab_size": 49408,
            "width": width,
            "heads": heads,
            "layers": layers,
        },
    }


def looks_like_path(pretrained: str) -> bool:
    """Whether a ``pretrained`` value names a file rather than an open_clip tag."""
    return (
        os.sep in pretrained
        or "/" in pretrained
        or pretrained.endswith(WEIGHT_SUFFIXES)
        or os.path.exists(pretrained)
    )


def check_pretrained_source(pretrained: str | None) -> None:
    """Fail early, before anything is built, when ``pretrained`` names a file that is absent.

    Raises:
        FileNotFoundError: naming the path.
    """
    if pretrained and looks_like_path(pretrained) and not pretrained.startswith("hf-hub:"):
        if not Path(pretrained).expanduser().is_file():
            raise FileNotFoundError(
                f"pretrained weights file not found: '{pretrained}'. For GeoRSCLIP, download "
                f"RS5M_ViT-B-32_RET-2.pt (see docs/training.md) and pass its path."
            )


def check_init_adapters(init_adapters: str | None) -> None:
    """Fail early, before anything is built, when ``init_adapters`` names no file or folder.

    Raises:
        FileNotFoundError: naming the path.
    """
    if init_adapters is not None and not Path(init_adapters).expanduser().exists():
        raise FileNotFoundError(f"init_adapters: no harma adapter file or folder at '{init_adapters}'")


def load_backbone_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a plain open_clip state dict (``.pt``/``.pth``/``.bin`` or ``.safetensors``) into
    ``model``.

    ``logit_scale``/``logit_bias`` may be absent (training here never uses them); any other
    missing or unexpected key is an error that names it, raised before anything is loaded.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file not found: '{path}'")
    state = read_state_dict(path)
    # The loss has its own temperature, so the model's logit scale/bias may be absent.
    targets = {key: value for key, value in model.state_dict().items()
               if key in state or key not in ("logit_scale", "logit_bias")}
    match_tensors(targets, state, f"'{path}'")
    model.load_state_dict(state, strict=False)


def native_image_size(model_name: str, model_config: Mapping[str, Any] | None = None) -> int:
    """The input side, in pixels, that a backbone is built for: ``model_config``'s
    ``vision_cfg.image_size``, or the open_clip architecture's own.

    Raises:
        ValueError: ``model_config`` gives no image size, the architecture is unknown to
            open_clip, or it is a Hub model (whose size is known only once it is downloaded).
    """
    if model_config is not None:
        vision = model_config.get("vision_cfg")
        size = vision.get("image_size") if isinstance(vision, Mapping) else None
        if size is None:
            raise ValueError("model_config has no vision_cfg.image_size: give image_size")
        return size
    if model_name.startswith("hf-hub:"):
        raise ValueError(f"the image size of {model_name!r} is known only once it is downloaded: give image_size")
    import open_clip

    size = (open_clip.get_model_config(_open_clip_name(model_name)) or {}).get("vision_cfg", {}).get("image_size")
    if size is None:
        raise ValueError(f"unknown open_clip model {model_name!r}; see open_clip.list_models() for the names")
    return size


def _open_clip_name(model_name: str) -> str:
    """open_clip's name of an architecture also written the old way (``"ViT-B/32"``)."""
    return model_name if model_name.startswith("hf-hub:") else model_name.replace("/", "-")


def build_backbone(
    model_name: str,
    pretrained: str | None = None,
    model_config: Mapping[str, Any] | None = None,
    image_size: int | None = None,
) -> nn.Module:
    """Create an open_clip CLIP in float32 on the CPU.

    Args:
        model_name: an open_clip architecture name (``"ViT-B-32"``, ``"ViT-B-32-quickgelu"``),
            or ``"hf-hub:org/repo"``. Only a label when ``model_config`` is given.
        pretrained: an open_clip tag (``"laion2b_s34b_b79k"``, ``"openai"``), a local weights
            file, or None for random initialisation.
        model_config: keyword arguments of ``open_clip.CLIP`` (``embed_dim``, ``vision_cfg``,
            ``text_cfg``, ...) to build an architecture that open_clip does not list.
        image_size: input side in pixels; for a named model a different size than its own
            interpolates the positional embedding (open_clip's ``force_image_size``).

    Raises:
        FileNotFoundError: ``pretrained`` names a missing file.
        RuntimeError: open_clip could not obtain the pretrained weights (named, with the cause).
    """
    import open_clip

    check_pretrained_source(pretrained)
    if model_config is not None:
        kwargs = copy.deepcopy(dict(model_config))
        vision = kwargs.get("vision_cfg", {})
        configured_size = vision.get("image_size") if isinstance(vision, Mapping) else None
        if image_size is not None and configured_size is not None and configured_size != image_size:
            raise ValueError(
                f"image_size={image_size} differs from model_config.vision_cfg.image_size={configured_size}"
            )
        try:
            model = open_clip.CLIP(**kwargs)
        except TypeError as error:
            raise ValueError(f"model_config is not a valid open_clip.CLIP configuration: {error}") from None
        if pretrained:
            if not looks_like_path(pretrained):
                raise ValueError(
                    f"with model_config, pretrained must be a local weights file, got tag {pretrained!r}"
                )
            load_backbone_weights(model, pretrained)
        return model.float()

    force_image_size = None
    model_name = _open_clip_name(model_name)
    if image_size is not None and not model_name.startswith("hf-hub:"):
        native = native_image_size(model_name)
        force_image_size = image_size if image_size != native else None
    try:
        model = open_clip.create_model(
            model_name,
            pretrained=os.path.expanduser(pretrained) if pretrained else None,
            force_image_size=force_image_size,
        )
    except RuntimeError as error:
        raise RuntimeError(
            f"open_clip could not create {model_name!r} with pretrained={pretrained!r}: {error}. "
            f"Tags are downloaded on first use (no network here?); a local weights file path "
            f"works offline."
        ) from error
    return model.float()


def build_tokenizer(model_name: str, model_config: Mapping[str, Any] | None = None) -> Tokenizer:
    """open_clip's tokenizer for ``model_name``; for a ``model_config`` model, the stock BPE
    tokenizer with that model's context length.

    Returns:
        ``tokenizer(list_of_str) -> LongTensor (n, context_length)``.
    """
    import open_clip

    if model_config is not None:
        text = model_config.get("text_cfg", {})
        context_length = text.get("context_length", 77) if isinstance(text, Mapping) else 77
        return open_clip.tokenizer.SimpleTokenizer(context_length=context_length)
    return open_clip.get_tokenizer(model_name)


def is_lora_parameter(name: str) -> bool:
    """Whether a parameter name belongs to a peft LoRA layer."""
    return "lora_" in name


def apply_lora(model: nn.Module, config: TrainConfig) -> nn.Module:
    """peft LoRA on ``config.lora_targets`` of ``model``, the rest frozen. Returns the model."""
    from peft import LoraConfig, inject_adapter_in_model

    lora_config = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_targets),
    )
    try:
        model = inject_adapter_in_model(lora_config, model)
    except ValueError as error:
        raise ValueError(f"LoRA could not be applied with lora_targets={list(config.lora_targets)}: {error}") from None
    for name, param in model.named_parameters():
        param.requires_grad_(is_lora_parameter(name))
    return model


def build_model(config: TrainConfig, *, load_weights: bool = True) -> nn.Module:
    """The backbone of ``config`` with its method applied, in float32 on the CPU.

    ``harma``: adapters injected, backbone frozen. ``lora``: peft LoRA on ``lora_targets``,
    backbone frozen. ``full``: everything trainable except ``logit_scale``/``logit_bias``
    (the loss has its own temperature, and an unused trainable tensor breaks DDP).

    With ``init_adapters`` (method ``harma``), the injected adapters start from that file's
    values instead of their initialisation (`harma.load_adapters`: its layout must equal
    ``config.harma``, its architecture the backbone's, and its values be finite).

    Args:
        load_weights: False builds the architecture with random weights (``pretrained`` and
            ``init_adapters`` ignored).

    Raises:
        FileNotFoundError: ``init_adapters`` names no file or folder (checked before the backbone
            is built).
        ValueError: ``init_adapters`` is no harma adapter file, or does not fit (named).
    """
    init_adapters = config.init_adapters if load_weights else None  # TrainConfig: method harma only
    check_init_adapters(init_adapters)
    model = build_backbone(
        config.model,
        pretrained=config.pretrained if load_weights else None,
        model_config=config.model_config,
        image_size=config.image_size,
    )
    if config.method == "harma":
        inject_harma_adapters(model, config.harma)
        if init_adapters is not None:
            try:
                load_adapters(model, Path(init_adapters).expanduser())
            except ValueError as error:
                raise ValueError(f"init_adapters: {error}") from None
    elif config.method == "lora":
        model = apply_lora(model, config)
    else:
        for name, param in model.named_parameters():
            param.requires_grad_(name not in ("logit_scale", "logit_bias"))
    return model
