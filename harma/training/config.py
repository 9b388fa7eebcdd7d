"""The recipe of a training run: `TrainConfig`, its validation and its JSON files."""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import HarmaConfig
from ..io import atomic_write_text
from .captions import CAPTION_FORMATS, check_csv_separator

METHODS = ("harma", "lora", "full")
PRECISIONS = ("fp32", "bf16", "fp16")
NONFINITE_POLICIES = ("stop", "skip")

# Fields that may differ between a run and its resumption: they change where and how fast the
# run goes, not what it computes (the non-finite policy only acts on a step that diverged, so a
# run stopped by one can be resumed with nonfinite=skip).
RESUMABLE_CHANGES = frozenset(
    {"output_dir", "num_workers", "threads", "progress", "eval_batch_size", "device", "nonfinite",
     "max_skipped_steps"}
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
    data_format: str | None = field(default=None, metadata=_help(
        "caption format of the annotation files: rsitmd, karpathy, nwpu, csv or hf (none: detected)"))
    csv_img_key: str = field(default="filepath", metadata=_help("CSV/TSV column of the image paths"))
    csv_caption_key: str = field(default="title", metadata=_help("CSV/TSV column of the captions"))
    csv_separator: str | None = field(default=None, metadata=_help(
        "CSV/TSV separator (none: tab, or a comma when the header line is comma-separated)"))
    hf_image_key: str | None = field(default=None, metadata=_help(
        "Hugging Face dataset column of the images (none: image, filepath, filename, ...)"))
    hf_caption_key: str | None = field(default=None, metadata=_help(
        "Hugging Face dataset column of the captions (none: captions, caption, sentences, text, title)"))
    val_fraction: float = field(default=0.0, metadata=_help(
        "without val_file: hold out this fraction of the training images (with all their captions) "
        "as the validation split"))
    val_seed: int = field(default=0, metadata=_help("seed of the images held out by val_fraction"))
    max_words: int = field(default=30, metadata=_help("captions are cut to this many words"))
    augment: bool = field(default=True, metadata=_help(
        "reference train augmentation (random resized crop, flip, 2 random ops); false: resize only"))
    # Method
    method: str = field(default="harma", metadata=_help("harma | lora | full"))
    harma: HarmaConfig = field(default=HarmaConfig(), metadata=_help("adapter layout (method harma)"))
    init_adapters: str | None = field(default=None, metadata=_help(
        "a harma adapter file or folder whose weights the trained HarMA adapters start from; its "
        "layout must equal `harma` (method harma)"))
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
    nonfinite: str = field(default="stop", metadata=_help(
        "a NaN/inf loss or gradient: stop the run (stop) or skip that optimizer step (skip)"))
    max_skipped_steps: int = field(default=10, metadata=_help(
        "with nonfinite=skip, stop once this many steps of the run were skipped"))
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
        if self.nonfinite not in NONFINITE_POLICIES:
            fail(f"nonfinite must be one of {NONFINITE_POLICIES}, got {self.nonfinite!r}")
        if self.device not in ("auto", "cuda", "cpu") and not self.device.startswith("cuda:"):
            fail(f"device must be auto, cuda or cpu, got {self.device!r}")
        positive_ints = ("image_size", "epochs", "batch_size", "grad_accum_steps", "eval_every",
                         "eval_batch_size", "max_words", "lora_rank", "max_skipped_steps")
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
        if self.init_adapters is not None:
            if not isinstance(self.init_adapters, str) or not self.init_adapters:
                fail(f"init_adapters must be the path of a harma adapter file or folder, or None, "
                     f"got {self.init_adapters!r}")
            if self.method != "harma":
                fail(f"init_adapters starts HarMA adapters from a file: it needs method 'harma', "
                     f"not {self.method!r}")
        if not self.lora_targets:
            fail("lora_targets must name at least one module")
        self._validate_data()

    def _validate_data(self) -> None:
        def fail(message: str) -> None:
            raise ValueError(f"TrainConfig: {message}")

        if self.data_format is not None and self.data_format not in CAPTION_FORMATS:
            fail(f"data_format must be one of {CAPTION_FORMATS} or None, got {self.data_format!r}")
        for name in ("csv_img_key", "csv_caption_key"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                fail(f"{name} must be a column name, got {getattr(self, name)!r}")
        try:
            check_csv_separator(self.csv_separator)
        except ValueError as error:
            fail(str(error))
        fraction = self.val_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 <= fraction < 1:
            fail(f"val_fraction must be in [0, 1), got {fraction!r}")
        if fraction and self.val_file:
            fail(f"give val_file or val_fraction, not both (val_file={self.val_file!r}, val_fraction={fraction})")
        if isinstance(self.val_seed, bool) or not isinstance(self.val_seed, int):
            fail(f"val_seed must be an integer, got {self.val_seed!r}")

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
        return cls.from_dict(read_config_file(path))

    def save(self, path: str | os.PathLike) -> None:
        """Write the config as indented JSON, atomically."""
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        atomic_write_text(Path(path), text)


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
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
