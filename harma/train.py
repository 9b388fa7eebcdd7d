"""Training engine: HarMA adapters, LoRA or full fine-tuning of an open_clip CLIP for image-text
retrieval, on one process or many (``torchrun``), with exact resumption.

Entry points:

* `train` runs a `TrainConfig` and returns the results (also written to
  ``output_dir/results.json``);
* `main` is the command line of ``examples/train_rsitmd.py`` and friends: a JSON config
  file, ``--field value`` overrides (``--lr 1e-4``, ``--harma.sharing paper``), ``--resume``,
  ``--overwrite`` and ``--demo``;
* `harma.demo.run_demo` is the self-contained CPU demonstration on synthetic data.

Outputs of a run, in ``output_dir`` (see ``docs/training.md``): ``config.json``,
``metrics.jsonl`` (one JSON line per epoch), ``training_curves.png`` (loss and validation mR per
epoch, when matplotlib is installed), ``last.safetensors`` and ``best.safetensors`` (the
trained tensors only; best is chosen on the validation split), ``last_state.pt`` (everything
needed to resume) and ``results.json`` (test metrics of the best checkpoint).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from .checkpoint import atomic_write, atomic_write_text, save_adapters
from .config import HarmaConfig
from .distributed import (
    cleanup_distributed,
    get_rank,
    get_world_size,
    init_distributed_from_env,
    is_distributed,
    is_main_process,
)
from .inject import count_parameters, inject_harma_adapters

__all__ = [
    "METHODS",
    "PRECISIONS",
    "LinearWarmupDecay",
    "TrainConfig",
    "build_model",
    "build_optimizer",
    "evaluate_split",
    "format_metrics_table",
    "load_trained_weights",
    "main",
    "parameter_groups",
    "parse_args",
    "save_trained_weights",
    "train",
]

METHODS = ("harma", "lora", "full")
PRECISIONS = ("fp32", "bf16", "fp16")

STATE_FORMAT = "harma.train_state"
STATE_VERSION = 1
LORA_FORMAT = "harma.train.lora"
FULL_FORMAT = "harma.train.full"
HARMA_FORMAT = "harma.adapters"

CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.jsonl"
LAST_WEIGHTS_NAME = "last.safetensors"
BEST_WEIGHTS_NAME = "best.safetensors"
STATE_NAME = "last_state.pt"
RESULTS_NAME = "results.json"
CURVES_NAME = "training_curves.png"
RUN_FILES = (
    CONFIG_NAME, METRICS_NAME, CURVES_NAME, LAST_WEIGHTS_NAME, BEST_WEIGHTS_NAME, STATE_NAME, RESULTS_NAME,
)

# Fields that may differ between a run and its resumption: they change where and how fast the
# run goes, not what it computes.
RESUMABLE_CHANGES = frozenset(
    {"output_dir", "num_workers", "threads", "progress", "eval_batch_size", "device"}
)


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; defaults are the reference recipe (docs/training.md).

    Load and save with `from_json_file` / `to_dict`; every field can be overridden
    on the command line of `main` as ``--name value`` (``--harma.name value`` for the
    adapter layout). Each field's help text is in its ``metadata["help"]``.
    """

    # Backbone
    model: str = field(default="ViT-B-32", metadata=_help(
        "open_clip architecture name (ViT-B-32, ViT-B-32-quickgelu, ...) or hf-hub:org/repo"))
    pretrained: str | None = field(default="laion2b_s34b_b79k", metadata=_help(
        "open_clip pretrained tag, local weights file (e.g. RS5M_ViT-B-32_RET-2.pt), or none"))
    model_config: dict | None = field(default=None, metadata=_help(
        "open_clip.CLIP keyword arguments (JSON) for an unlisted architecture; 'model' is then a label"))
    image_size: int = field(default=224, metadata=_help("input side in pixels"))
    # Data
    train_files: tuple[str, ...] = field(default=(), metadata=_help(
        "training annotation files (comma-separated or a JSON list)"))
    val_file: str | None = field(default=None, metadata=_help(
        "validation annotation file; the best checkpoint is chosen on it"))
    test_file: str | None = field(default=None, metadata=_help(
        "test annotation file; evaluated once, with the best checkpoint, at the end"))
    image_root: str = field(default="", metadata=_help("folder the annotation image paths are relative to"))
    max_words: int = field(default=30, metadata=_help("captions are cut to this many words"))
    augment: bool = field(default=True, metadata=_help(
        "reference train augmentation (random resized crop, flip, 2 random ops); false: resize only"))
    # Method
    method: str = field(default="harma", metadata=_help("harma | lora | full"))
    harma: HarmaConfig = field(default=HarmaConfig(), metadata=_help("adapter layout (method harma)"))
    lora_rank: int = field(default=8, metadata=_help("LoRA rank (method lora)"))
    lora_alpha: float = field(default=16.0, metadata=_help("LoRA scaling numerator (method lora)"))
    lora_dropout: float = field(default=0.0, metadata=_help("dropout on the LoRA path (method lora)"))
    lora_targets: tuple[str, ...] = field(default=("c_fc", "c_proj", "attn"), metadata=_help(
        "module names given LoRA (method lora); 'attn' is open_clip's nn.MultiheadAttention"))
    # Loss
    temperature_init: float = field(default=0.07, metadata=_help("initial contrastive temperature"))
    learnable_temperature: bool = field(default=True, metadata=_help("train the temperature"))
    margin: float = field(default=0.2, metadata=_help("triplet margin (cosine units)"))
    gamma: float = field(default=2.0, metadata=_help("triplet focusing exponent"))
    hardest_negative: bool = field(default=False, metadata=_help("triplet on the hardest negative only"))
    same_image_positive: bool = field(default=False, metadata=_help(
        "triplet stops counting other captions of the same image as negatives"))
    affiliation_weight: float = field(default=0.0, metadata=_help("weight of the class-centre loss (0: off)"))
    # Optimisation
    epochs: int = field(default=50, metadata=_help("training epochs"))
    lr: float = field(default=4e-4, metadata=_help("peak learning rate"))
    batch_size: int = field(default=214, metadata=_help("image-caption pairs per process and micro-step"))
    weight_decay: float = field(default=0.04, metadata=_help(
        "AdamW decoupled weight decay of >=2-D weights (never biases, norms, gates, temperature)"))
    betas: tuple[float, float] = field(default=(0.9, 0.98), metadata=_help("AdamW betas"))
    eps: float = field(default=1e-8, metadata=_help("AdamW epsilon"))
    warmup_fraction: float = field(default=0.1, metadata=_help(
        "fraction of all optimizer steps spent warming up linearly from 0"))
    grad_accum_steps: int = field(default=1, metadata=_help("micro-steps per optimizer step"))
    max_grad_norm: float | None = field(default=None, metadata=_help(
        "clip the gradient norm to this (none: no clipping, as the reference)"))
    max_steps_per_epoch: int | None = field(default=None, metadata=_help(
        "cap on optimizer steps per epoch (demos, smoke tests)"))
    precision: str = field(default="fp32", metadata=_help("fp32 | bf16 | fp16 (autocast on CUDA)"))
    seed: int = field(default=42, metadata=_help("seed of initialisation, data order and augmentation"))
    # Evaluation
    eval_every: int = field(default=1, metadata=_help("validate every N epochs (and after the last)"))
    eval_batch_size: int = field(default=128, metadata=_help("images/captions per evaluation batch"))
    eval_before_training: bool = field(default=False, metadata=_help(
        "validate the untrained model first (logged as epoch 0)"))
    # Runtime
    output_dir: str = field(default="runs/harma", metadata=_help("where the run's files go"))
    device: str = field(default="auto", metadata=_help("auto | cuda | cpu"))
    num_workers: int = field(default=4, metadata=_help("DataLoader worker processes per process"))
    threads: int | None = field(default=None, metadata=_help("torch CPU threads (none: torch's default)"))
    tf32: bool = field(default=True, metadata=_help("allow TF32 matmuls on CUDA in fp32 mode"))
    progress: bool = field(default=True, metadata=_help("show progress bars (rank 0)"))

    def __post_init__(self) -> None:
        if isinstance(self.harma, Mapping):
            object.__setattr__(self, "harma", HarmaConfig.from_dict(dict(self.harma)))
        for name in ("train_files", "lora_targets", "betas"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = [value] if name == "train_files" else value.split(",")
            if not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        self._validate()

    def _validate(self) -> None:
        def fail(message: str) -> None:
            raise ValueError(f"TrainConfig: {message}")

        if not isinstance(self.harma, HarmaConfig):
            fail(f"harma must be a HarmaConfig or a dict of its fields, got {type(self.harma).__name__}")
        if self.method not in METHODS:
            fail(f"method must be one of {METHODS}, got {self.method!r}")
        if self.precision not in PRECISIONS:
            fail(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.device not in ("auto", "cuda", "cpu") and not self.device.startswith("cuda:"):
            fail(f"device must be auto, cuda or cpu, got {self.device!r}")
        positive_ints = ("image_size", "epochs", "batch_size", "grad_accum_steps", "eval_every",
                         "eval_batch_size", "max_words", "lora_rank")
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                fail(f"{name} must be a positive integer, got {value!r}")
        for name in ("max_steps_per_epoch", "threads"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                fail(f"{name} must be a positive integer or None, got {value!r}")
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) or self.num_workers < 0:
            fail(f"num_workers must be an integer >= 0, got {self.num_workers!r}")
        if not (isinstance(self.lr, int | float) and self.lr > 0):
            fail(f"lr must be a positive number, got {self.lr!r}")
        if not 0 <= self.warmup_fraction < 1:
            fail(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction!r}")
        if self.weight_decay < 0:
            fail(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if len(self.betas) != 2 or not all(0 <= float(b) < 1 for b in self.betas):
            fail(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            fail(f"max_grad_norm must be positive or None, got {self.max_grad_norm!r}")
        if self.model_config is not None and not isinstance(self.model_config, Mapping):
            fail(f"model_config must be a JSON object (dict) or None, got {type(self.model_config).__name__}")
        if not self.lora_targets:
            fail("lora_targets must name at least one module")

    # ------------------------------------------------------------------ (de)serialisation

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible dict (tuples become lists, ``harma`` a nested dict)."""
        data: dict[str, Any] = {}
        for config_field in dataclasses.fields(self):
            value = getattr(self, config_field.name)
            if isinstance(value, HarmaConfig):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, Mapping):
                value = json.loads(json.dumps(value))
            data[config_field.name] = value
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Inverse of `to_dict`; unknown keys are an error naming them (and a close match)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a TrainConfig must be read from a JSON object, got {type(data).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = [key for key in data if key not in known]
        if unknown:
            hints = [
                f"{key!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(key, known, 1))
                else repr(key)
                for key in unknown
            ]
            raise ValueError(f"unknown TrainConfig field(s): {', '.join(hints)}")
        return cls(**dict(data))

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> TrainConfig:
        """Read a config file written by `save` (or by hand; keys starting with ``_``,
        such as ``"_comment"``, are ignored)."""
        return cls.from_dict(_read_config_file(path))

    def save(self, path: str | os.PathLike) -> None:
        """Write the config as indented JSON, atomically."""
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        atomic_write_text(Path(path), text)


def _read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: '{path}'")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"config file '{path}' is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file '{path}' must hold a JSON object of TrainConfig fields")
    return {key: value for key, value in data.items() if not key.startswith("_")}


# ---------------------------------------------------------------------------------- schedule


class LinearWarmupDecay:
    """Learning-rate factor for ``LambdaLR``: 0 -> 1 linearly over ``warmup_steps``, then
    linearly down to 0 at ``total_steps`` (the reference's schedule, stepped once per
    optimizer step). A class rather than a closure so that ``LambdaLR.state_dict`` stores its
    two integers and a resumed scheduler checks against them.
    """

    def __init__(self, warmup_steps: int, total_steps: int) -> None:
        if total_steps < 1 or not 0 <= warmup_steps < max(total_steps, 1):
            raise ValueError(f"need 0 <= warmup_steps < total_steps, got {warmup_steps}, {total_steps}")
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps

    @classmethod
    def from_fraction(cls, warmup_fraction: float, total_steps: int) -> LinearWarmupDecay:
        """Warm-up over ``int(warmup_fraction * total_steps)`` steps (floored, as the reference)."""
        return cls(int(total_steps * warmup_fraction), total_steps)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / self.warmup_steps
        return max(0.0, (self.total_steps - step) / max(1, self.total_steps - self.warmup_steps))


# ---------------------------------------------------------------------------- optimisation


def _no_weight_decay(name: str, param: torch.Tensor) -> bool:
    # Biases, norm scales, gate logits, class/temperature scalars are 0-D or 1-D. Decaying them
    # is not regularisation: it pulls gates towards sigmoid(0) = 0.5 and the temperature
    # towards 0. The reference exempts only names containing "bias".
    return param.ndim < 2 or name.endswith("bias")


def parameter_groups(
    named_parameters: Iterator[tuple[str, nn.Parameter]] | Sequence[tuple[str, nn.Parameter]],
    weight_decay: float,
) -> list[dict[str, Any]]:
    """AdamW parameter groups: ``weight_decay`` for >=2-D weights, none for the rest.

    Frozen parameters are skipped and a parameter reached under two names (a shared tensor)
    appears once. Each group carries the parameters' names under ``"names"``.

    Returns:
        ``[{"params", "names", "weight_decay": weight_decay}, {"params", "names",
        "weight_decay": 0.0}]``, empty groups left out.
    """
    decay: dict[str, list] = {"params": [], "names": []}
    no_decay: dict[str, list] = {"params": [], "names": []}
    seen: set[int] = set()
    for name, param in named_parameters:
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        group = no_decay if _no_weight_decay(name, param) else decay
        group["params"].append(param)
        group["names"].append(name)
    groups = [{**decay, "weight_decay": weight_decay}, {**no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def build_optimizer(model: nn.Module, loss: nn.Module | None, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of ``model`` and the loss temperature, grouped by
    `parameter_groups`, with the recipe's lr, betas, eps and weight decay."""
    named = list(model.named_parameters())
    if loss is not None:
        named += [(f"loss.{name}", param) for name, param in loss.named_parameters()]
    # One multi-tensor kernel per group: on the CPU the default per-tensor loop is ~3x slower.
    return torch.optim.AdamW(
        parameter_groups(named, config.weight_decay), lr=config.lr, betas=tuple(config.betas), eps=config.eps,
        foreach=True,
    )


# ---------------------------------------------------------------------------------- models


def _apply_lora(model: nn.Module, config: TrainConfig) -> nn.Module:
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
        param.requires_grad_("lora_" in name)
    return model


def build_model(config: TrainConfig, *, load_weights: bool = True) -> nn.Module:
    """The backbone of ``config`` with its method applied, in float32 on the CPU.

    ``harma``: adapters injected, backbone frozen. ``lora``: peft LoRA on ``lora_targets``,
    backbone frozen. ``full``: everything trainable except ``logit_scale``/``logit_bias``
    (the loss has its own temperature, and an unused trainable tensor breaks DDP).

    Args:
        load_weights: False builds the architecture with random weights (``pretrained`` ignored).
    """
    from .models import build_backbone

    model = build_backbone(
        config.model,
        pretrained=config.pretrained if load_weights else None,
        model_config=config.model_config,
        image_size=config.image_size,
    )
    if config.method == "harma":
        inject_harma_adapters(model, config.harma)
    elif config.method == "lora":
        model = _apply_lora(model, config)
    else:
        for name, param in model.named_parameters():
            param.requires_grad_(name not in ("logit_scale", "logit_bias"))
    return model


def _base_model_label(config: TrainConfig) -> str:
    if config.pretrained:
        return f"{config.model}/{Path(config.pretrained).name if os.sep in config.pretrained else config.pretrained}"
    return config.model


def save_trained_weights(
    model: nn.Module,
    path: str | os.PathLike,
    config: TrainConfig,
    temperature: float | None = None,
    extra_metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write what the method trained as one safetensors file, atomically.

    ``harma``: `harma.save_adapters` (adapter tensors and the layout). ``lora``: the
    LoRA tensors, with the LoRA settings in the header. ``full``: the whole state dict (it is
    all trained). The loss temperature goes into the header (it does not affect retrieval).
    """
    from safetensors.torch import save_file

    path = Path(path)
    metadata = {
        "method": config.method,
        "train_config": json.dumps(config.to_dict()),
        **({"temperature": repr(float(temperature))} if temperature is not None else {}),
        **dict(extra_metadata or {}),
    }
    if config.method == "harma":
        return save_adapters(model, path, base_model=_base_model_label(config), metadata=metadata)
    if config.method == "lora":
        tensors = {name: p for name, p in model.named_parameters() if p.requires_grad}
        metadata["format"] = LORA_FORMAT
        metadata["lora"] = json.dumps({
            "rank": config.lora_rank, "alpha": config.lora_alpha, "dropout": config.lora_dropout,
            "targets": list(config.lora_targets),
        })
    else:
        tensors = dict(model.state_dict())
        metadata["format"] = FULL_FORMAT
    cpu_tensors = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}
    atomic_write(path, lambda target: save_file(cpu_tensors, str(target), metadata=metadata))
    return path


def _read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"no weights file at '{path}'")
    try:
        with safe_open(str(path), framework="pt") as reader:
            return dict(reader.metadata() or {}), {key: reader.get_tensor(key) for key in reader.keys()}
    except Exception as error:  # safetensors has its own error types for damaged headers
        raise ValueError(f"'{path}' is not a readable safetensors file: {error}") from None


def load_trained_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a file written by `save_trained_weights` into a base model (or into a model
    that already carries the same method). Returns the model, possibly wrapped (LoRA).

    Raises:
        ValueError: an unknown file format, or tensors that do not fit the model (named).
    """
    path = Path(path)
    metadata, tensors = _read_safetensors(path)
    file_format = metadata.get("format")
    if file_format == HARMA_FORMAT:
        from .checkpoint import load_adapters

        return load_adapters(model, path)
    if file_format == FULL_FORMAT:
        result = model.load_state_dict(tensors, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"'{path}' does not fit the model: missing {result.missing_keys[:5]}, "
                f"unexpected {result.unexpected_keys[:5]}"
            )
        return model
    if file_format == LORA_FORMAT:
        lora = json.loads(metadata["lora"])
        if not any("lora_" in name for name, _ in model.named_parameters()):
            stored = TrainConfig(
                method="lora", lora_rank=lora["rank"], lora_alpha=lora["alpha"],
                lora_dropout=lora["dropout"], lora_targets=tuple(lora["targets"]),
            )
            model = _apply_lora(model, stored)
        parameters = dict(model.named_parameters())
        unknown = sorted(set(tensors) - set(parameters))
        missing = sorted(name for name, p in parameters.items() if "lora_" in name and name not in tensors)
        if unknown or missing:
            raise ValueError(f"'{path}' does not fit the model: missing {missing[:5]}, unexpected {unknown[:5]}")
        with torch.no_grad():
            for name, tensor in tensors.items():
                if parameters[name].shape != tensor.shape:
                    raise ValueError(
                        f"'{path}': {name!r} has shape {tuple(tensor.shape)} in the file but "
                        f"{tuple(parameters[name].shape)} in the model"
                    )
                parameters[name].copy_(tensor)
        return model
    raise ValueError(
        f"'{path}' is not a harma training output (its header has format={file_format!r}; expected "
        f"{HARMA_FORMAT!r}, {LORA_FORMAT!r} or {FULL_FORMAT!r})"
    )


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters() if p.requires_grad}


def _load_trainable_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(parameters) != set(state):
        missing = sorted(set(parameters) - set(state))[:5]
        unexpected = sorted(set(state) - set(parameters))[:5]
        raise ValueError(f"{source} does not fit the model: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for name, tensor in state.items():
            parameters[name].copy_(tensor)


# ------------------------------------------------------------------------------------ data


class _TokenizingCollate:
    """Batches ``(image, caption, image_index, label)`` items into tensors, tokenising the
    captions in the loader's worker processes."""

    def __init__(self, tokenizer: Callable[[list[str]], torch.Tensor]) -> None:
        self.tokenizer = tokenizer

    def __call__(self, items: list[tuple[Any, str, int, int]]) -> tuple[torch.Tensor, ...]:
        images, captions, image_indices, labels = zip(*items, strict=True)
        return (
            torch.stack(list(images)),
            self.tokenizer(list(captions)),
            torch.tensor(image_indices, dtype=torch.long),
            torch.tensor(labels, dtype=torch.long),
        )


def _seed_numpy_in_worker(worker_id: int) -> None:
    # torch seeds its own and Python's generators in each worker; numpy is left alone.
    np.random.seed(torch.initial_seed() % 2**32)


def _derived_seed(*keys: int) -> int:
    """A 63-bit seed that depends on every key, well mixed (SeedSequence)."""
    state = np.random.SeedSequence([int(k) % 2**63 for k in keys]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _build_datasets(config: TrainConfig) -> tuple[Any, Any, Any]:
    """Train, validation and test datasets; every image path is checked here, before any model
    is built, so a wrong image root fails in seconds."""
    from .data import RetrievalEvalDataset, RetrievalTrainDataset, test_transform, train_transform

    if not config.train_files:
        raise ValueError("TrainConfig.train_files is empty: give the training annotation file(s)")
    if not config.image_root:
        raise ValueError("TrainConfig.image_root is empty: give the folder the annotation image paths are relative to")
    augment = train_transform if config.augment else test_transform
    train_set = RetrievalTrainDataset(
        list(config.train_files), config.image_root, transform=augment(config.image_size), max_words=config.max_words
    )
    eval_sets = [
        RetrievalEvalDataset(path, config.image_root, transform=test_transform(config.image_size),
                             max_words=config.max_words) if path else None
        for path in (config.val_file, config.test_file)
    ]
    return train_set, eval_sets[0], eval_sets[1]


def evaluate_split(
    model: nn.Module,
    dataset: Any,
    tokenizer: Callable[[list[str]], torch.Tensor],
    *,
    batch_size: int = 128,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """R@1/5/10 both ways and mean recall (percent) of ``model`` on a
    `harma.data.RetrievalEvalDataset` (sharded over ranks under ``torch.distributed``)."""
    from .retrieval import RetrievalEvaluator

    evaluator = RetrievalEvaluator(
        dataset, dataset.captions, dataset.txt2img, tokenizer, batch_size=batch_size,
        num_workers=num_workers, device=device, autocast_dtype=autocast_dtype, progress=progress,
    )
    return evaluator.evaluate(model)


# ------------------------------------------------------------------------------- the run


class _ContrastiveStep(nn.Module):
    """Model and loss in one module, so DDP also averages the temperature's gradient."""

    def __init__(self, model: nn.Module, loss: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(
        self, images: torch.Tensor, tokens: torch.Tensor, image_ids: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        output = self.model(images, tokens)
        if isinstance(output, Mapping):
            image_embeds, text_embeds = output["image_features"], output["text_features"]
        else:
            image_embeds, text_embeds = output[0], output[1]
        losses = self.loss(image_embeds, text_embeds, image_ids, labels)
        affiliation = losses.affiliation if losses.affiliation is not None else losses.loss.new_zeros(())
        return losses.loss, losses.contrastive, losses.triplet, affiliation


def _log(message: str) -> None:
    if is_main_process():
        print(message, flush=True)


def _resolve_device(config: TrainConfig, local_rank: int) -> torch.device:
    if config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"device={config.device!r} but CUDA is not available")
    if config.device.startswith("cuda:"):
        return torch.device(config.device)
    return torch.device("cuda", local_rank)


def _autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    if config.precision == "fp32":
        return None
    if config.precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    return torch.bfloat16 if config.precision == "bf16" else torch.float16


def _check_output_dir(output_dir: Path, resume: bool, overwrite: bool) -> None:
    if resume or not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise FileExistsError(f"output_dir '{output_dir}' exists and is not a folder")
    contents = sorted(p.name for p in output_dir.iterdir())
    if contents and not overwrite:
        raise FileExistsError(
            f"output_dir '{output_dir}' is not empty ({', '.join(contents[:5])}"
            f"{', ...' if len(contents) > 5 else ''}); pass --resume to continue that run, "
            f"--overwrite to replace its files, or choose another --output_dir"
        )


def _state_path(resume: bool | str | os.PathLike, output_dir: Path) -> Path:
    if resume is True:
        return output_dir / STATE_NAME
    path = Path(resume)
    return path / STATE_NAME if path.is_dir() or path.suffix != ".pt" else path


def _differing_fields(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    return sorted(
        key for key in set(stored) | set(current)
        if key not in RESUMABLE_CHANGES and stored.get(key) != current.get(key)
    )


def _rng_state() -> dict[str, Any]:
    numpy_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
            "position": int(numpy_state[2]),
            "has_gauss": int(numpy_state[3]),
            "cached_gaussian": float(numpy_state[4]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: Mapping[str, Any]) -> None:
    python_state = state["python"]
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    numpy_state = state["numpy"]
    np.random.set_state((
        "MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
        numpy_state["has_gauss"], numpy_state["cached_gaussian"],
    ))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_state(path: Path, state: Mapping[str, Any]) -> None:
    atomic_write(path, lambda target: torch.save(dict(state), target))


def _write_metrics(path: Path, history: Sequence[Mapping[str, Any]]) -> None:
    text = "".join(json.dumps(line) + "\n" for line in history)
    atomic_write_text(path, text)


def _plot_curves(output_dir: Path) -> bool:
    """Redraw ``training_curves.png`` from ``metrics.jsonl``. A picture must never end a run:
    on failure, warn once and return False so the caller stops trying."""
    from .visualize import plot_training_curves

    try:
        plot_training_curves(output_dir / METRICS_NAME, output_dir / CURVES_NAME)
    except ImportError as error:
        _log(f"[harma] warning: {CURVES_NAME} is not drawn: {error}")
        return False
    except Exception as error:  # whatever went wrong, training goes on
        _log(f"[harma] warning: drawing {CURVES_NAME} failed ({type(error).__name__}: {error}); no more "
             f"curves this run (redraw later with harma.visualize.plot_training_curves)")
        return False
    return True


def _barrier() -> None:
    if is_distributed():
        dist.barrier()


def _broadcast_error(error: BaseException | None) -> None:
    """Raise on every rank if any rank failed, so that no rank waits forever at a collective."""
    if not is_distributed():
        if error is not None:
            raise error
        return
    failed = torch.tensor([1 if error is not None else 0])
    if dist.get_backend() == "nccl":
        failed = failed.cuda()
    dist.all_reduce(failed)
    if error is not None:
        raise error
    if int(failed.item()):
        raise RuntimeError("another rank failed (see its error above)")


@dataclass
class _EpochStats:
    losses: dict[str, float]
    lr: float
    steps: int


def _train_one_epoch(
    step_module: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    scaler: torch.amp.GradScaler,
    loss_module: nn.Module,
    config: TrainConfig,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    steps: int,
    epoch: int,
) -> _EpochStats:
    from tqdm.auto import tqdm

    accum = config.grad_accum_steps
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    # Summed on the device: reading a loss back every step would stall a GPU.
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    micro_steps = steps * accum
    show_progress = config.progress and is_main_process()
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False,
               disable=not show_progress, dynamic_ncols=True)
    step_module.train()
    optimizer.zero_grad(set_to_none=True)
    micro = 0
    for images, tokens, image_ids, labels in loader:
        if micro >= micro_steps:
            break
        images = images.to(device, non_blocking=True)
        tokens = tokens.to(device, non_blocking=True)
        image_ids = image_ids.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        final_micro_step = (micro + 1) % accum == 0
        sync = (
            contextlib.nullcontext() if final_micro_step or not hasattr(step_module, "no_sync")
            else step_module.no_sync()
        )
        with sync:
            autocast = (
                torch.autocast(device_type=device.type, dtype=autocast_dtype)
                if autocast_dtype else contextlib.nullcontext()
            )
            with autocast:
                losses = step_module(images, tokens, image_ids, labels)
            scaler.scale(losses[0] / accum).backward()
        totals += torch.stack([value.detach().double() for value in losses])
        micro += 1
        if final_micro_step:
            if config.max_grad_norm is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            loss_module.clamp_temperature_()
            bar.update(1)
            if show_progress and (bar.n % 10 == 0 or bar.n == steps):
                bar.set_postfix(loss=f"{float(totals[0]) / micro:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    bar.close()
    if micro < micro_steps:
        raise RuntimeError(f"the train loader gave {micro} micro-batches, expected {micro_steps}")
    means = dict(zip(("loss", "contrastive", "triplet", "affiliation"), (totals / micro).tolist(), strict=True))
    if config.affiliation_weight == 0:
        del means["affiliation"]
    return _EpochStats(losses=means, lr=optimizer.param_groups[0]["lr"], steps=steps)


def train(
    config: TrainConfig,
    *,
    resume: bool | str | os.PathLike = False,
    overwrite: bool = False,
    stop_after_epoch: int | None = None,
) -> dict[str, Any]:
    """Run a training recipe; under ``torchrun`` every process calls this.

    Each epoch: train, validate (every ``eval_every`` epochs), save ``last.safetensors`` and
    ``last_state.pt``, copy to ``best.safetensors`` when validation mean recall improves, append
    to ``metrics.jsonl`` and redraw ``training_curves.png`` from it (skipped, with one warning,
    without matplotlib). At the end the best checkpoint (by validation, never test) is
    evaluated on the test split and ``results.json`` is written.

    Args:
        config: the recipe.
        resume: True to continue the run in ``config.output_dir``, or a run folder /
            ``last_state.pt`` path. The recipe must be the one the run was started with (only
            the fields in ``RESUMABLE_CHANGES`` may differ); the finished run then equals an
            uninterrupted one.
        overwrite: start afresh in a non-empty ``output_dir``, replacing its run files.
        stop_after_epoch: end after this many epochs as if interrupted (a job with a time
            limit); ``resume`` continues it.

    Returns:
        The results dict written to ``results.json`` (``"test"``: test metrics of the best
        checkpoint, ``"best_val"``, ``"best_epoch"``, parameter counts, timings...); for a
        stopped run, the state after the last epoch with ``"finished": False``.

    Raises:
        FileExistsError: a fresh run in a non-empty ``output_dir``.
        FileNotFoundError: missing annotation files, images or weights (named).
        ValueError: an invalid recipe, or resuming with a different one.
    """
    output_dir = Path(config.output_dir)
    state: dict[str, Any] | None = None
    if resume:
        state_path = _state_path(resume, output_dir)
        if not state_path.is_file():
            raise FileNotFoundError(f"nothing to resume: no {STATE_NAME} at '{state_path}'")
        output_dir = state_path.parent
        config = config.replace(output_dir=str(output_dir))
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state.get("format") != STATE_FORMAT or state.get("version", 0) > STATE_VERSION:
            raise ValueError(f"'{state_path}' is not a harma training state (or a newer version)")
        changed = _differing_fields(state["config"], config.to_dict())
        if changed:
            raise ValueError(
                f"cannot resume '{output_dir}' with a different recipe: {changed} differ from the "
                f"stored config.json (only {sorted(RESUMABLE_CHANGES)} may change); start a new run "
                f"in another output_dir instead"
            )
    _check_output_dir(output_dir, resume=bool(resume), overwrite=overwrite)
    if config.threads:
        torch.set_num_threads(config.threads)

    initialised_here = not is_distributed()
    start_time = time.time()
    # torchrun's LOCAL_RANK picks the GPU; the backend follows the device, so a CPU run on a
    # machine with GPUs still uses gloo.
    device = _resolve_device(config, int(os.environ.get("LOCAL_RANK", 0)))
    init_distributed_from_env("nccl" if device.type == "cuda" else "gloo")
    try:
        return _run(config, output_dir, state, device, overwrite, stop_after_epoch, start_time)
    finally:
        if initialised_here:
            cleanup_distributed()


def _run(
    config: TrainConfig,
    output_dir: Path,
    state: dict[str, Any] | None,
    device: torch.device,
    overwrite: bool,
    stop_after_epoch: int | None,
    start_time: float,
) -> dict[str, Any]:
    from .losses import HarmaLoss
    from .models import build_tokenizer, check_pretrained_source

    rank, world_size = get_rank(), get_world_size()
    if state is not None and state.get("world_size") != world_size:
        raise ValueError(
            f"the run was started with {state.get('world_size')} process(es) and is resumed with "
            f"{world_size}: the data order and global batch would differ; resume with the same count"
        )
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = config.tf32
        torch.backends.cudnn.allow_tf32 = config.tf32
    autocast_dtype = _autocast_dtype(config, device)

    # Datasets first: a wrong path fails before minutes of model loading. Every rank checks.
    error: BaseException | None = None
    try:
        train_set, val_set, test_set = _build_datasets(config)
        check_pretrained_source(config.pretrained)
    except (OSError, ValueError) as caught:
        error = caught
    _broadcast_error(error)

    if state is None and is_main_process():
        output_dir.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for name in RUN_FILES:
                (output_dir / name).unlink(missing_ok=True)
        config.save(output_dir / CONFIG_NAME)
    _barrier()

    # Same seed on every rank: identical initial adapters (DDP also broadcasts rank 0's).
    _seed_everything(config.seed)
    model = build_model(config).to(device)
    tokenizer = build_tokenizer(config.model, config.model_config)
    loss_module = HarmaLoss(
        temperature_init=config.temperature_init,
        learnable_temperature=config.learnable_temperature,
        margin=config.margin,
        gamma=config.gamma,
        hardest_negative=config.hardest_negative,
        same_image_positive=config.same_image_positive,
        affiliation_weight=config.affiliation_weight,
    ).to(device)
    step_module: nn.Module = _ContrastiveStep(model, loss_module)
    if is_distributed():
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None
        )

    micro_batches = len(train_set) // (config.batch_size * world_size)
    steps_per_epoch = micro_batches // config.grad_accum_steps
    if config.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
    if steps_per_epoch < 1:
        raise ValueError(
            f"the training set has {len(train_set)} pairs, fewer than one optimizer step of "
            f"batch_size {config.batch_size} x {world_size} process(es) x grad_accum_steps "
            f"{config.grad_accum_steps}; lower batch_size"
        )
    total_steps = steps_per_epoch * config.epochs
    optimizer = build_optimizer(model, loss_module, config)
    schedule = LinearWarmupDecay.from_fraction(config.warmup_fraction, total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")

    counts = count_parameters(model)
    trainable_count = counts.trainable + int(config.learnable_temperature)
    _log(
        f"[harma] method={config.method} model={config.model} pretrained={config.pretrained} "
        f"device={device} processes={world_size} precision={config.precision}\n"
        f"[harma] trainable parameters {trainable_count:,} of {counts.all:,} "
        f"({100 * counts.trainable / max(counts.all, 1):.2f}%), loss temperature included\n"
        f"[harma] train {len(train_set):,} pairs / {train_set.num_images:,} images, "
        f"{steps_per_epoch} steps per epoch x {config.epochs} epochs, global batch "
        f"{config.batch_size * world_size * config.grad_accum_steps}, warm-up {schedule.warmup_steps} steps"
    )

    epoch, global_step = 0, 0
    best_metric, best_epoch = -math.inf, None
    history: list[dict[str, Any]] = []
    if state is not None:
        _load_trainable_state(model, state["trainable"], "the resume state")
        loss_module.load_state_dict(state["loss"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        epoch, global_step = state["epoch"], state["global_step"]
        best_metric = state["best_metric"] if state["best_epoch"] is not None else -math.inf
        best_epoch = state["best_epoch"]
        history = list(state["history"])
        if is_main_process():
            _set_rng_state(state["rng"])
            _write_metrics(output_dir / METRICS_NAME, history)
        _log(f"[harma] resumed '{output_dir}' after epoch {epoch} (step {global_step})"
             + ("; the run had finished: evaluating its best checkpoint again" if epoch >= config.epochs else ""))

    def evaluate(dataset: Any) -> dict[str, float]:
        return evaluate_split(
            model, dataset, tokenizer, batch_size=config.eval_batch_size, num_workers=config.num_workers,
            device=device, autocast_dtype=autocast_dtype, progress=config.progress,
        )

    if state is None and config.eval_before_training and val_set is not None:
        before = evaluate(val_set)
        history.append({"epoch": 0, "step": 0, "val": before, "time_s": 0.0})
        _log(f"[harma] epoch 0 (untrained) val {_short_metrics(before)}")
        if is_main_process():
            _write_metrics(output_dir / METRICS_NAME, history)

    draw_curves = is_main_process()
    collate = _TokenizingCollate(tokenizer)
    sampler = DistributedSampler(
        train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=config.seed, drop_last=True
    )
    stop_at = config.epochs if stop_after_epoch is None else min(config.epochs, stop_after_epoch)
    while epoch < stop_at:
        epoch_start = time.time()
        # The epoch's randomness depends on (seed, epoch, rank) only, so a resumed run
        # draws exactly what an uninterrupted one does, whatever happened in between.
        _seed_everything(_derived_seed(config.seed, epoch, rank))
        sampler.set_epoch(epoch)
        loader = DataLoader(
            train_set, batch_size=config.batch_size, sampler=sampler, num_workers=config.num_workers,
            collate_fn=collate, pin_memory=device.type == "cuda", drop_last=True,
            worker_init_fn=_seed_numpy_in_worker,
            generator=torch.Generator().manual_seed(_derived_seed(config.seed, epoch, rank, 1)),
        )
        stats = _train_one_epoch(
            step_module, loader, optimizer, scheduler, scaler, loss_module, config, device,
            autocast_dtype, steps_per_epoch, epoch,
        )
        epoch += 1
        global_step += stats.steps
        line: dict[str, Any] = {
            "epoch": epoch, "step": global_step, "train": stats.losses, "lr": stats.lr,
            "temperature": float(loss_module.effective_temperature().detach()),
        }
        validate = val_set is not None and (epoch % config.eval_every == 0 or epoch == config.epochs)
        improved = False
        if validate:
            line["val"] = evaluate(val_set)
            improved = line["val"]["mean_recall"] > best_metric
        elif val_set is None and epoch == config.epochs:
            improved = True  # without a validation split the last epoch is kept
        if improved:
            best_metric = line["val"]["mean_recall"] if validate else -math.inf
            best_epoch = epoch
        line["best_epoch"] = best_epoch
        line["time_s"] = round(time.time() - epoch_start, 3)
        history.append(line)
        if is_main_process():
            temperature = float(loss_module.effective_temperature().detach())
            extra = {"epoch": str(epoch), "step": str(global_step)}
            save_trained_weights(model, output_dir / LAST_WEIGHTS_NAME, config, temperature, extra)
            if improved:
                _copy_atomically(output_dir / LAST_WEIGHTS_NAME, output_dir / BEST_WEIGHTS_NAME)
            resume_state = {
                "format": STATE_FORMAT, "version": STATE_VERSION, "config": config.to_dict(),
                "epoch": epoch, "global_step": global_step, "world_size": world_size,
                "best_metric": float(best_metric) if best_epoch is not None else 0.0,
                "best_epoch": best_epoch, "history": history,
                "trainable": _trainable_state(model), "loss": loss_module.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "rng": _rng_state(),
            }
            _save_state(output_dir / STATE_NAME, resume_state)
            _write_metrics(output_dir / METRICS_NAME, history)
            if draw_curves:
                draw_curves = _plot_curves(output_dir)
        _barrier()
        summary = f"[harma] epoch {epoch}/{config.epochs} step {global_step} loss {stats.losses['loss']:.4f} lr {stats.lr:.2e}"
        if validate:
            summary += f" | val {_short_metrics(line['val'])}" + (" (best)" if improved else "")
        _log(summary + f" | {line['time_s']:.1f}s")

    results: dict[str, Any] = {
        "finished": epoch >= config.epochs,
        "method": config.method,
        "model": config.model,
        "pretrained": config.pretrained,
        "epochs": epoch,
        "global_step": global_step,
        "world_size": world_size,
        "best_epoch": best_epoch,
        "best_val": next((line.get("val") for line in history if line["epoch"] == best_epoch), None),
        "trainable_parameters": trainable_count,
        "total_parameters": counts.all,
        "temperature": float(loss_module.effective_temperature().detach()),
        "output_dir": str(output_dir),
    }
    if not results["finished"]:
        _log(f"[harma] stopped after epoch {epoch}; continue with --resume {output_dir}")
        return results

    if test_set is not None and best_epoch is not None:
        load_trained_weights(model, output_dir / BEST_WEIGHTS_NAME)
        results["test"] = evaluate(test_set)
        results["test_checkpoint"] = BEST_WEIGHTS_NAME
        _log(f"[harma] test (best epoch {best_epoch} by validation) {_short_metrics(results['test'])}")
    results["time_s"] = round(time.time() - start_time, 3)
    if is_main_process():
        text = json.dumps(results, indent=2) + "\n"
        atomic_write_text(output_dir / RESULTS_NAME, text)
    _barrier()
    return results


def _copy_atomically(source: Path, target: Path) -> None:
    atomic_write(target, lambda temporary: shutil.copyfile(source, temporary))


def _short_metrics(metrics: Mapping[str, float]) -> str:
    return (
        f"i2t {metrics['i2t_r1']:.1f}/{metrics['i2t_r5']:.1f}/{metrics['i2t_r10']:.1f} "
        f"t2i {metrics['t2i_r1']:.1f}/{metrics['t2i_r5']:.1f}/{metrics['t2i_r10']:.1f} "
        f"mR {metrics['mean_recall']:.2f}"
    )


def format_metrics_table(rows: Mapping[str, Mapping[str, float]]) -> str:
    """A markdown table of R@1/5/10 both ways and mR, one row per named result."""
    header = "| | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 | mR |"
    lines = [header, "|" + "---|" * 8]
    keys = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mean_recall")
    for name, metrics in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{metrics[key]:.2f}" for key in keys) + " |")
    return "\n".join(lines)


# -------------------------------------------------------------------------- command line


def _type_name(config_field: dataclasses.Field) -> str:
    return config_field.type if isinstance(config_field.type, str) else getattr(config_field.type, "__name__", "str")


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _parse_list(text: str) -> list[Any]:
    text = text.strip()
    if text.startswith("["):
        value = json.loads(text)
        if not isinstance(value, list):
            raise ValueError(f"expected a JSON list, got {text!r}")
        return value
    return [part.strip() for part in text.split(",") if part.strip()]


def _parse_field_value(type_name: str, text: str) -> Any:
    """Convert a command-line string to a config field's type (as written in its annotation)."""
    optional = type_name.endswith("| None")
    base = type_name.removesuffix("| None").strip()
    if optional and text.strip().lower() in ("none", "null"):
        return None
    if base == "bool":
        return _parse_bool(text)
    if base == "int":
        return int(text)
    if base == "float":
        return float(text)
    if base == "dict":
        if Path(text).is_file():
            return _read_config_file(text)
        value = json.loads(text)
        if not isinstance(value, dict):
            raise ValueError(f"expected a JSON object or a JSON file, got {text!r}")
        return value
    if base.startswith("tuple["):
        items = _parse_list(text)
        if "int" in base:
            return tuple(int(item) for item in items)
        if "float" in base:
            return tuple(float(item) for item in items)
        return tuple(str(item) for item in items)
    return text


def _metavar(type_name: str) -> str:
    base = type_name.removesuffix("| None").strip()
    if base.startswith("tuple["):
        return "LIST"
    return {"int": "N", "float": "X", "bool": "BOOL", "dict": "JSON"}.get(base, "TEXT")


def _config_fields() -> list[tuple[str, dataclasses.Field, bool]]:
    """``(command-line name, field, belongs to HarmaConfig)`` for every overridable field."""
    fields = [(f.name, f, False) for f in dataclasses.fields(TrainConfig) if f.name != "harma"]
    fields += [(f"harma.{f.name}", f, True) for f in dataclasses.fields(HarmaConfig)]
    return fields


def _build_parser(prog: str | None, description: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        allow_abbrev=False,
        description=description or "Train HarMA adapters (or LoRA / full fine-tuning) on an open_clip CLIP.",
        epilog="Values: lists are comma-separated or JSON; booleans true/false; 'none' clears an optional "
        "field. Example: --config examples/configs/rsitmd_vit.json --image_root /data/rsitmd --lr 2e-4 "
        "--harma.sharing paper",
    )
    parser.add_argument("--config", help="JSON file of TrainConfig fields (over the script's defaults)")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN",
                        help="continue a run: its folder or last_state.pt (default: output_dir)")
    parser.add_argument("--overwrite", action="store_true", help="start afresh in a non-empty output_dir")
    parser.add_argument("--stop-after-epoch", type=int, default=None, metavar="N",
                        help="stop after N epochs as if interrupted (continue with --resume)")
    parser.add_argument("--demo", action="store_true",
                        help="CPU demo on generated data: pretrain a small CLIP, then train HarMA adapters")
    parser.add_argument("--print-config", action="store_true", help="print the merged config and exit")
    group = parser.add_argument_group("recipe fields (override the config file)")
    for cli_name, config_field, _ in _config_fields():
        flags = [f"--{cli_name}"]
        if "_" in cli_name:
            flags.append(f"--{cli_name.replace('_', '-')}")
        type_name = _type_name(config_field)
        help_text = config_field.metadata.get("help", "HarmaConfig field (see harma.HarmaConfig)")
        group.add_argument(
            *flags, dest=f"field:{cli_name}", default=argparse.SUPPRESS, metavar=_metavar(type_name),
            nargs="?" if type_name == "bool" else None, const="true" if type_name == "bool" else None,
            help=f"{help_text} [{type_name}]",
        )
    return parser


def _defaults_dict(defaults: TrainConfig | Mapping[str, Any] | str | os.PathLike | None) -> dict[str, Any]:
    if defaults is None:
        return {}
    if isinstance(defaults, TrainConfig):
        return defaults.to_dict()
    if isinstance(defaults, Mapping):
        return dict(defaults)
    return _read_config_file(defaults)


def _merge_overrides(base: dict[str, Any], namespace: argparse.Namespace) -> dict[str, Any]:
    merged = dict(base)
    harma_fields = dict(merged.get("harma") or {})
    if isinstance(merged.get("harma"), HarmaConfig):
        harma_fields = merged["harma"].to_dict()
    types = {cli_name: (_type_name(f), is_harma) for cli_name, f, is_harma in _config_fields()}
    for key, text in vars(namespace).items():
        if not key.startswith("field:"):
            continue
        cli_name = key.removeprefix("field:")
        type_name, is_harma = types[cli_name]
        try:
            value = _parse_field_value(type_name, text)
        except (ValueError, json.JSONDecodeError) as error:
            raise ValueError(f"--{cli_name}: {error}") from None
        if is_harma:
            harma_fields[cli_name.removeprefix("harma.")] = value
        else:
            merged[cli_name] = value
    if harma_fields:
        merged["harma"] = harma_fields
    return merged


@dataclass(frozen=True)
class ParsedArgs:
    """What `parse_args` found: the merged recipe and the run options."""

    config: TrainConfig
    resume: bool | str
    overwrite: bool
    stop_after_epoch: int | None
    demo: bool
    print_config: bool
    overridden: tuple[str, ...] = ()


def parse_args(
    argv: Sequence[str] | None = None,
    defaults: TrainConfig | Mapping[str, Any] | str | os.PathLike | None = None,
    prog: str | None = None,
    description: str | None = None,
) -> ParsedArgs:
    """Merge, in order: ``defaults``, the ``--config`` file, then ``--field value`` overrides.

    With ``--resume RUN`` and no ``--config``, the run's stored ``config.json`` is the base, so
    ``--resume runs/x`` alone continues that run.
    """
    parser = _build_parser(prog, description)
    namespace = parser.parse_args(list(argv) if argv is not None else None)
    base = _defaults_dict(defaults)
    if namespace.config:
        base.update(_read_config_file(namespace.config))
    elif namespace.resume:
        run = Path(namespace.resume) if isinstance(namespace.resume, str) else Path(
            _merge_overrides(base, namespace).get("output_dir") or TrainConfig.output_dir
        )
        run_dir = run.parent if run.suffix == ".pt" else run
        if (run_dir / CONFIG_NAME).is_file():
            base = _read_config_file(run_dir / CONFIG_NAME)
    try:
        config = TrainConfig.from_dict(_merge_overrides(base, namespace))
    except ValueError as error:
        parser.error(str(error))
    return ParsedArgs(
        config=config,
        resume=namespace.resume,
        overwrite=namespace.overwrite,
        stop_after_epoch=namespace.stop_after_epoch,
        demo=namespace.demo,
        print_config=namespace.print_config,
        overridden=tuple(key.removeprefix("field:") for key in vars(namespace) if key.startswith("field:")),
    )


def main(
    argv: Sequence[str] | None = None,
    defaults: TrainConfig | Mapping[str, Any] | str | os.PathLike | None = None,
    prog: str | None = None,
    description: str | None = None,
) -> dict[str, Any]:
    """Command line of the example scripts; see `parse_args` and ``docs/training.md``."""
    args = parse_args(argv, defaults, prog=prog, description=description)
    if args.print_config:
        print(json.dumps(args.config.to_dict(), indent=2))
        return {}
    if args.demo:
        ignored = [name for name in args.overridden if name != "output_dir"]
        if ignored:
            print(f"note: --demo uses its own settings; ignoring {', '.join('--' + n for n in ignored)}")
        from .demo import run_demo  # the demo builds on this module

        return run_demo(args.config.output_dir if "output_dir" in args.overridden else "runs/demo")
    try:
        return train(args.config, resume=args.resume, overwrite=args.overwrite,
                     stop_after_epoch=args.stop_after_epoch)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        # A bad path or recipe is the user's to fix: one clear line, no traceback.
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
