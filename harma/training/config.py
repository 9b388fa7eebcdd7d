"""The recipe of a training run: `TrainConfig`, its validation and its JSON files."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..classification import COMBINE_MODES
from ..config import LAYOUT_PRESETS, HarmaConfig
from ..io import atomic_write_text, check_readable_file
from ..losses import TEMPERATURE_MAX, TEMPERATURE_MIN
from ..prompts import DEFAULT_TEMPLATES
from .captions import CAPTION_FORMATS, check_csv_separator

METHODS = ("harma", "lora", "full")
PRECISIONS = ("fp32", "bf16", "fp16")
NONFINITE_POLICIES = ("stop", "skip")

# The sets a run evaluates besides its validation split (what adaptation forgets). They change
# no training step and no choice of the best epoch (evaluation runs between epochs, whose data
# order and augmentation are seeded afresh), so a resumed run may add, change or drop them.
MONITOR_FIELDS = frozenset(
    {"zero_shot_sets", "zero_shot_templates", "zero_shot_class_names", "zero_shot_class_prompts",
     "zero_shot_combine", "extra_retrieval_files", "extra_retrieval_image_roots"}
)
_MONITOR_SEQUENCES = ("zero_shot_sets", "extra_retrieval_files", "extra_retrieval_image_roots")

# Fields that may differ between a run and its resumption: they change where and how fast the
# run goes, not what it computes (the non-finite policy only acts on a step that diverged, so a
# run stopped by one can be resumed with nonfinite=skip).
RESUMABLE_CHANGES = frozenset(
    {"output_dir", "num_workers", "threads", "progress", "eval_batch_size", "device", "nonfinite",
     "max_skipped_steps"}
) | MONITOR_FIELDS


def _help(text: str) -> dict[str, str]:
    return {"help": text}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_sequence_of(kind: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, list | tuple) and all(kind(item) for item in value)


# What each annotation of a TrainConfig field accepts (without its "| None"), and how a message
# names it. JSON gives lists where the fields hold tuples, and ints where they hold floats.
FIELD_TYPES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "str": ("a string (str)", lambda value: isinstance(value, str)),
    "int": ("an integer (int)", lambda value: isinstance(value, int) and not isinstance(value, bool)),
    "float": ("a number (float)", _is_number),
    "bool": ("true or false (bool)", lambda value: isinstance(value, bool)),
    "dict": ("an object (dict)", lambda value: isinstance(value, Mapping)),
    "tuple[str, ...]": ("a list of strings", _is_sequence_of(lambda item: isinstance(item, str))),
    "tuple[float, float]": ("a list of numbers", _is_sequence_of(_is_number)),
}
SEQUENCE_FIELDS = ("train_files", "lora_targets", "betas", "zero_shot_sets", "extra_retrieval_files",
                   "extra_retrieval_image_roots")
# Sequence fields of paths: one given as text is one path (a path may hold a comma).
_PATH_SEQUENCES = ("train_files", "zero_shot_sets", "extra_retrieval_files", "extra_retrieval_image_roots")


def _split_text(name: str, value: Any) -> Any:
    """A sequence field given as text: one path (training files, the sets a run follows), or
    comma-separated parts (betas as numbers where they parse). Anything else is returned as it is, for the type check."""
    if not isinstance(value, str):
        return value
    if name in _PATH_SEQUENCES:
        return (value,)
    parts = tuple(part.strip() for part in value.split(","))
    if name == "betas":
        try:
            return tuple(float(part) for part in parts)
        except ValueError:
            return value
    return parts


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric field: ``low`` up to ``high``, each bound included unless
    open. NaN is never in a range; an unbounded float range holds finite numbers only."""

    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    high_text: str | None = None

    def __contains__(self, value: Any) -> bool:
        if not _is_number(value) or value != value or (not self.integer and not math.isfinite(value)):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def interval(self) -> str:
        high = self.high_text or f"{self.high:g}"
        return f"{'(' if self.low_open else '['}{self.low:g}, {high}{')' if self.high_open else ']'}"

    def __str__(self) -> str:
        if self.high == math.inf:
            kind = "an integer" if self.integer else "a finite number"
            return f"{kind} {'>' if self.low_open else '>='} {self.low:g}"
        return f"{'an integer' if self.integer else 'a number'} in {self.interval()}"


_COUNT, _POSITIVE, _NON_NEGATIVE = Range(1, integer=True), Range(0, low_open=True), Range(0)
_FRACTION = Range(0, 1, high_open=True)
# Every numeric field and its valid values (a test checks that none is missing).
RANGES: dict[str, Range] = {
    **dict.fromkeys(("image_size", "max_words", "lora_rank", "epochs", "batch_size", "grad_accum_steps",
                     "max_steps_per_epoch", "max_skipped_steps", "eval_every", "eval_batch_size",
                     "threads"), _COUNT),
    "num_workers": Range(0, integer=True),
    "seed": Range(0, 2**63, high_open=True, integer=True, high_text="2**63"),
    "lora_alpha": _POSITIVE,
    "lora_dropout": _FRACTION,
    "temperature_init": Range(TEMPERATURE_MIN, TEMPERATURE_MAX),
    "margin": _NON_NEGATIVE,
    "gamma": _NON_NEGATIVE,
    "affiliation_weight": _NON_NEGATIVE,
    "lr": _POSITIVE,
    "weight_decay": _NON_NEGATIVE,
    "betas": _FRACTION,
    "eps": _POSITIVE,
    "warmup_fraction": _FRACTION,
    "max_grad_norm": _POSITIVE,
    "val_fraction": _FRACTION,
    "val_seed": Range(0, 2**63, high_open=True, integer=True, high_text="2**63"),
}


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
    harma: HarmaConfig = field(default=HarmaConfig(), metadata=_help(
        "adapter layout (method harma): HarmaConfig fields, or a preset name: reference, paper, plus"))
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
    # What adaptation forgets: sets evaluated before training and at every validation, never
    # used to choose the best epoch (docs/training.md#what-adaptation-forgets)
    zero_shot_sets: tuple[str, ...] = field(default=(), metadata=_help(
        "classification sets (class folders, CSV + classnames.txt, or class-prefixed files) classified "
        "zero-shot before training and at every validation; never used to choose the best epoch"))
    zero_shot_templates: str = field(default=DEFAULT_TEMPLATES, metadata=_help(
        "prompt templates of zero_shot_sets: satellite, skyscript, remote_sensing, or a text file of "
        "templates with {}"))
    zero_shot_class_names: str | None = field(default=None, metadata=_help(
        "class-name overrides of zero_shot_sets (JSON object, or a list / text file for one set)"))
    zero_shot_class_prompts: str | None = field(default=None, metadata=_help(
        "JSON file of per-class prompts of zero_shot_sets ({class: [prompt, ...]})"))
    zero_shot_combine: str = field(default="normalized_mean", metadata=_help(
        "how a class's prompt embeddings are combined: normalized_mean or raw_mean"))
    extra_retrieval_files: tuple[str, ...] = field(default=(), metadata=_help(
        "other retrieval annotation files (any caption format; a file of several splits: its test split) "
        "evaluated like the val split before "
        "training and at every validation; never used to choose the best epoch"))
    extra_retrieval_image_roots: tuple[str, ...] = field(default=(), metadata=_help(
        "image folder of each extra_retrieval_files entry, in the same order (empty: image_root for all)"))
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
        elif isinstance(self.harma, str) and self.harma in LAYOUT_PRESETS:
            object.__setattr__(self, "harma", HarmaConfig.preset(self.harma))
        for name in SEQUENCE_FIELDS:
            object.__setattr__(self, name, _split_text(name, getattr(self, name)))
        self._check_types()
        for name in SEQUENCE_FIELDS:
            object.__setattr__(self, name, tuple(getattr(self, name)))
        self._validate()
        self._validate_monitors()

    def _check_types(self) -> None:
        """Every field has the type its annotation gives (ints count as floats, bools as nothing
        but bools), so that a wrong JSON value is named before any comparison fails on it."""
        if not isinstance(self.harma, HarmaConfig):
            raise ValueError(
                f"TrainConfig: harma must be a HarmaConfig, an object of its fields (e.g. "
                f'{{"sharing": "paper"}}) or a layout preset {LAYOUT_PRESETS}, got {self.harma!r} '
                f"({type(self.harma).__name__})"
            )
        for config_field in dataclasses.fields(self):
            if config_field.name == "harma":
                continue
            value = getattr(self, config_field.name)
            optional = config_field.type.endswith(" | None")
            description, check = FIELD_TYPES[config_field.type.removesuffix(" | None")]
            if not ((value is None and optional) or (value is not None and check(value))):
                raise ValueError(
                    f"TrainConfig: {config_field.name} must be {description}{' or null' if optional else ''}, "
                    f"got {value!r} ({type(value).__name__})"
                )

    def _validate(self) -> None:
        def fail(message: str) -> None:
            raise ValueError(f"TrainConfig: {message}")

        for name, choices in (("method", METHODS), ("precision", PRECISIONS), ("nonfinite", NONFINITE_POLICIES)):
            if getattr(self, name) not in choices:
                fail(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        if not is_device_name(self.device):
            fail(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        for config_field in dataclasses.fields(self):
            valid, value = RANGES.get(config_field.name), getattr(self, config_field.name)
            if valid is None or value is None:
                continue
            if config_field.name == "betas":
                if len(value) != 2 or not all(beta in valid for beta in value):
                    fail(f"betas must be two numbers in {valid.interval()}, got {list(value)!r}")
            elif value not in valid:
                optional = "null or " if config_field.type.endswith(" | None") else ""
                fail(f"{config_field.name} must be {optional}{valid}, got {value!r}")
        for name in ("model", "output_dir"):
            if not getattr(self, name):
                fail(f"{name} must be a non-empty string, got ''")
        if self.init_adapters is not None:
            if not self.init_adapters:
                fail(f"init_adapters must be the path of a harma adapter file or folder, or None, "
                     f"got {self.init_adapters!r}")
            if self.method != "harma":
                fail(f"init_adapters starts HarMA adapters from a file: it needs method 'harma', "
                     f"not {self.method!r}")
        if not self.lora_targets or not all(self.lora_targets):
            fail(f"lora_targets must name at least one module (no empty names), got {list(self.lora_targets)!r}")
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
        if self.val_fraction and self.val_file:
            fail(f"give val_file or val_fraction, not both (val_file={self.val_file!r}, "
                 f"val_fraction={self.val_fraction})")

    def _validate_monitors(self) -> None:
        """The fields of the sets evaluated besides the validation split (`MONITOR_FIELDS`)."""
        def fail(message: str) -> None:
            raise ValueError(f"TrainConfig: {message}")

        for name in _MONITOR_SEQUENCES:
            value = getattr(self, name)
            if not isinstance(value, tuple) or not all(isinstance(item, str) and item for item in value):
                fail(f"{name} must be a list of non-empty paths, got {value!r}")
            repeated = sorted({item for item in value if value.count(item) > 1})
            if repeated and name != "extra_retrieval_image_roots":
                fail(f"{name} names {', '.join(repr(item) for item in repeated)} more than once")
        for name in ("zero_shot_class_names", "zero_shot_class_prompts"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                fail(f"{name} must be the path of a file, or None, got {value!r}")
            if value is not None and not self.zero_shot_sets:
                fail(f"{name} is given but zero_shot_sets is empty: name the classification sets it is for")
        if not isinstance(self.zero_shot_templates, str) or not self.zero_shot_templates:
            fail(f"zero_shot_templates must be a template set name or a file, got {self.zero_shot_templates!r}")
        if self.zero_shot_combine not in COMBINE_MODES:
            fail(f"zero_shot_combine must be one of {COMBINE_MODES}, got {self.zero_shot_combine!r}")
        roots, files = self.extra_retrieval_image_roots, self.extra_retrieval_files
        if roots and len(roots) != len(files):
            fail(f"extra_retrieval_image_roots has {len(roots)} folder(s) for {len(files)} extra_retrieval_files: "
                 "give one per file, in the same order, or none (image_root for all)")
        if self.test_file and any(_same_path(path, self.test_file) for path in files):
            fail(f"extra_retrieval_files names the test split '{self.test_file}': it is evaluated once, with the "
                 "best checkpoint, at the end, never during training")

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


def _same_path(first: str, second: str) -> bool:
    return os.path.abspath(first) == os.path.abspath(second)


def is_device_name(text: Any) -> bool:
    """Whether ``text`` names a device a run or an evaluation may ask for: ``auto``, ``cpu``,
    ``cuda`` or ``cuda:N``."""
    return isinstance(text, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", text) is not None


def cuda_problem(device: str) -> str | None:
    """Why this machine cannot give the device ``device`` names (an `is_device_name` name), or
    None when it can (``auto`` and ``cpu`` always can)."""
    if not device.startswith("cuda"):
        return None
    import torch

    if not torch.cuda.is_available():
        return f"CUDA is not available on this machine: use cpu or auto, not {device!r}"
    index, count = int(device.partition(":")[2] or 0), torch.cuda.device_count()
    if index >= count:
        return f"{device!r} names a CUDA device this machine lacks (it has {count})"
    return None


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The fields of a JSON config file, without the keys starting with ``_``.

    Raises:
        FileNotFoundError, IsADirectoryError, PermissionError: the file cannot be read (named).
        ValueError: not JSON, or not a JSON object (the file is named).
    """
    path = check_readable_file(path, "config file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"config file '{path}' is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file '{path}' must hold a JSON object of TrainConfig fields")
    return {key: value for key, value in data.items() if not key.startswith("_")}
