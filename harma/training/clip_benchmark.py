"""Evaluating a harma-adapted model with LAION's CLIP_benchmark (``pip install 'harma[clip-benchmark]'``).

CLIP_benchmark picks a model loader by ``--model_type``; a loader returns ``(model, transform,
tokenizer)``. `register` adds `load_harma` as the model type ``harma``, and

    python -m harma.training.clip_benchmark eval --model_type harma ...

registers it and runs CLIP_benchmark's own command line (every option of ``clip_benchmark
eval`` works). With ``--model_type harma``:

- ``--pretrained RUN``: a harma training run folder; its ``config.json`` names the backbone and
  its ``best.safetensors`` is loaded (``--pretrained RUN/last.safetensors`` for the other one).
  ``--model`` is the run's architecture name (``config.json``'s ``model``).
- ``--pretrained BACKBONE+WEIGHTS``: an open_clip tag or weights file, then any file
  ``harma.training`` wrote (HarMA adapters, LoRA, full fine-tuning) or a checkpoint of the
  HarMA authors (``.pth``). ``--pretrained BACKBONE`` alone is the plain backbone.
- ``--model``: the open_clip architecture, or a JSON file of ``open_clip.CLIP`` arguments.

Give ``--output``: CLIP_benchmark's default file name holds ``--pretrained``, whose ``/`` would
be read as folders. Images are resized to the model's side without cropping (harma's
evaluation transform, `harma.training.data.test_transform`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..official import load_official_checkpoint
from .config import TrainConfig
from .data import test_transform
from .models import build_backbone, build_tokenizer
from .weights import load_trained_weights

__all__ = ["MODEL_TYPE", "load_harma", "main", "register"]

MODEL_TYPE = "harma"
"""The ``--model_type`` name `register` gives the loader."""
_RUN_FILES = ("best.safetensors", "last.safetensors")


def _run_of(pretrained: str) -> tuple[Path, Path] | None:
    """``(run folder, weights file)`` when ``pretrained`` names a run folder or a file in one."""
    path = Path(pretrained)
    if path.is_dir() and (path / "config.json").is_file():
        return path, path / "best.safetensors"
    if path.is_file() and path.name in _RUN_FILES and (path.parent / "config.json").is_file():
        return path.parent, path
    return None


def _model_config(model_name: str) -> tuple[str, dict | None]:
    if model_name.endswith(".json") and Path(model_name).is_file():
        return Path(model_name).stem, json.loads(Path(model_name).read_text(encoding="utf-8"))
    return model_name, None


def _image_size(model_name: str, model_config: dict | None) -> int:
    if model_config is not None:
        return int(model_config["vision_cfg"]["image_size"])
    import open_clip

    config = open_clip.get_model_config(model_name)
    if config is None:
        raise ValueError(f"{model_name!r} is not an open_clip architecture")
    return int(config["vision_cfg"]["image_size"])


def _build_from_run(model_name: str, run: Path, weights: Path) -> tuple[nn.Module, int, Callable[..., Any]]:
    config = TrainConfig.from_json_file(run / "config.json")
    if model_name != config.model:
        raise ValueError(f"--model {model_name!r} but the run '{run}' trained {config.model!r}")
    if not weights.is_file():
        raise FileNotFoundError(f"the run '{run}' has no '{weights.name}'")
    if config.pretrained is None:
        torch.manual_seed(config.seed)  # a run from random initialisation built its backbone right after seeding
    model = build_backbone(config.model, config.pretrained, config.model_config, config.image_size)
    return load_trained_weights(model, weights), config.image_size, build_tokenizer(config.model, config.model_config)


def _build_from_spec(model_name: str, pretrained: str) -> tuple[nn.Module, int, Callable[..., Any]]:
    name, model_config = _model_config(model_name)
    backbone, plus, weights = pretrained.rpartition("+")
    if not plus:
        backbone, weights = pretrained, ""
    image_size = _image_size(name, model_config)
    is_official = weights.lower().endswith((".pth", ".pt"))
    # The authors' checkpoints hold the whole backbone: no backbone weights are needed with them.
    model = build_backbone(name, backbone or None, model_config, image_size)
    if weights and not Path(weights).is_file():
        raise FileNotFoundError(f"weights file not found: '{weights}'")
    if is_official:
        load_official_checkpoint(model, weights)
    elif weights:
        model = load_trained_weights(model, weights)
    return model, image_size, build_tokenizer(name, model_config)


def load_harma(
    model_name: str, pretrained: str, cache_dir: str | None = None, device: str | torch.device = "cpu"
) -> tuple[nn.Module, Callable[..., Any], Callable[..., Any]]:
    """CLIP_benchmark's loader interface: ``(model, transform, tokenizer)`` of a harma model.

    Args:
        model_name: open_clip architecture, or a JSON file of ``open_clip.CLIP`` arguments.
        pretrained: a run folder, ``BACKBONE+WEIGHTS`` or ``BACKBONE`` (see the module docstring).
        cache_dir: unused (open_clip's cache is used for tags).
        device: where the model goes.

    Returns:
        The model in eval mode on ``device``, harma's evaluation transform (PIL image ->
        tensor), and the tokenizer (list of strings -> LongTensor).

    Raises:
        FileNotFoundError, ValueError: a missing file, or weights that do not fit (named).
    """
    run = _run_of(pretrained)
    model, image_size, tokenizer = (
        _build_from_run(model_name, *run) if run is not None else _build_from_spec(model_name, pretrained)
    )
    return model.to(device).eval(), test_transform(image_size), tokenizer


def _numpy_safe_accuracy(original: Callable[..., list[float]]) -> Callable[..., list[float]]:
    """CLIP_benchmark's top-k accuracy, working with NumPy 2: release 1.6.2 calls ``float()`` on
    a one-element array, which NumPy 2 refuses (LAION-AI/CLIP_benchmark issue 147), so every
    zero-shot classification fails. The same counts are taken as a scalar instead, only where
    the original raises that error."""

    def accuracy(output: torch.Tensor, target: torch.Tensor, topk: tuple[int, ...] = (1,)) -> list[float]:
        try:
            return original(output, target, topk)
        except TypeError:
            predicted = output.topk(max(topk), 1, True, True)[1].t()
            correct = predicted.eq(target.view(1, -1).expand_as(predicted))
            return [float(correct[:k].reshape(-1).float().sum().item()) / len(target) for k in topk]

    accuracy.__wrapped__ = original  # type: ignore[attr-defined]
    return accuracy


def register(name: str = MODEL_TYPE) -> None:
    """Make `load_harma` CLIP_benchmark's model type ``name`` in this process (and let its
    zero-shot accuracy run under NumPy 2, see `_numpy_safe_accuracy`).

    Raises:
        ImportError: CLIP_benchmark is not installed (``pip install 'harma[clip-benchmark]'``).
    """
    try:
        import clip_benchmark.metrics.zeroshot_classification as zero_shot
        import clip_benchmark.models as models
    except ImportError as error:
        raise ImportError(
            f"CLIP_benchmark is not installed ({error}); pip install 'harma[clip-benchmark]'"
        ) from None
    if not hasattr(zero_shot.accuracy, "__wrapped__"):
        zero_shot.accuracy = _numpy_safe_accuracy(zero_shot.accuracy)
    models.TYPE2FUNC[name] = load_harma
    if name not in models.MODEL_TYPES:
        models.MODEL_TYPES.append(name)  # the list --model_type's choices and load_clip read


def main(argv: list[str] | None = None) -> int:
    """CLIP_benchmark's command line with the ``harma`` model type registered."""
    try:
        register()
    except ImportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from clip_benchmark.cli import main as clip_benchmark_main

    saved = sys.argv
    sys.argv = ["clip_benchmark", *(sys.argv[1:] if argv is None else argv)]
    try:
        clip_benchmark_main()
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
