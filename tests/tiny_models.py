"""Tiny random-initialised models of each supported family, for fast CPU tests."""

from __future__ import annotations

import copy

import torch
from torch import nn

IMAGE_SIZE = 32
CONTEXT_LENGTH = 77


def tiny_open_clip(seed: int = 0, quick_gelu: bool = False, vision_width: int = 64, layers: int = 2,
                   text_width: int = 64, model_class: type[nn.Module] | None = None) -> nn.Module:
    """A 2-block open_clip CLIP (``model_class``: a subclass of ``open_clip.model.CLIP`` to build)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    return (model_class or CLIP)(
        embed_dim=32,
        vision_cfg=CLIPVisionCfg(layers=layers, width=vision_width, head_width=16, patch_size=8,
                                 image_size=IMAGE_SIZE),
        text_cfg=CLIPTextCfg(context_length=CONTEXT_LENGTH, vocab_size=49408, width=text_width, heads=4,
                             layers=layers),
        quick_gelu=quick_gelu,
    ).eval()


def tiny_hf_clip(seed: int = 0) -> nn.Module:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=1000, max_position_embeddings=CONTEXT_LENGTH, bos_token_id=998,
                         eos_token_id=999, pad_token_id=0),
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                           image_size=IMAGE_SIZE, patch_size=8),
        projection_dim=32,
    )
    return CLIPModel(config).eval()


def tiny_hf_siglip(seed: int = 0) -> nn.Module:
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(seed)
    config = SiglipConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=1000, max_position_embeddings=16, bos_token_id=998,
                         eos_token_id=999, pad_token_id=0),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           image_size=IMAGE_SIZE, patch_size=8),
    )
    return SiglipModel(config).eval()


def tiny_timm_vit(seed: int = 0) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(img_size=IMAGE_SIZE, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                             num_classes=0).eval()


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every parameter frozen: the backbone a patched model holds.

    A patched model computes exactly what the frozen backbone computes. Compare it with this, not
    with an unfrozen model: on some CPUs PyTorch routes a frozen ``nn.MultiheadAttention`` through
    another kernel than an unfrozen one, and the two differ in the last bits (about 1e-6; the
    suite makes every machine behave so, see ``conftest.routing_noise``).
    """
    return copy.deepcopy(model).requires_grad_(False)


def images(batch: int = 3, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)


def tokens(batch: int = 3, seed: int = 2, vocab: int = 1000, length: int = CONTEXT_LENGTH) -> torch.Tensor:
    """Random token ids with an end-of-text (the largest id) at a random position."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab - 1, (batch, length), generator=generator)
    ends = torch.randint(3, length, (batch,), generator=generator)
    for row, end in enumerate(ends.tolist()):
        ids[row, end] = vocab - 1
        ids[row, end + 1:] = 0
    return ids


def encode(model: nn.Module, batch_images: torch.Tensor, batch_tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Image and text embeddings of any supported family."""
    if hasattr(model, "encode_image"):
        return model.encode_image(batch_images), model.encode_text(batch_tokens)
    if hasattr(model, "get_image_features"):
        image = model.get_image_features(pixel_values=batch_images)
        text = model.get_text_features(input_ids=batch_tokens[:, : model.config.text_config.max_position_embeddings])
        image = getattr(image, "pooler_output", image)
        text = getattr(text, "pooler_output", text)
        return image, text
    return (model(batch_images),)


def perturb_adapters(model: nn.Module, seed: int = 3, scale: float = 0.05) -> None:
    """Move every adapter parameter away from its initial value, as training would."""
    import harma

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in harma.adapter_parameters(model):
            param.add_(torch.randn(param.shape, generator=generator).to(param.dtype) * scale)


FAMILIES = {
    "open_clip": tiny_open_clip,
    "open_clip_quickgelu": lambda: tiny_open_clip(quick_gelu=True),
    "hf_clip": tiny_hf_clip,
    "hf_siglip": tiny_hf_siglip,
    "timm_vit": tiny_timm_vit,
}
"""One constructor per supported model family, for parametrised tests."""
