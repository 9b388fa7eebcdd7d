"""Offline transfer benchmark: does a frozen backbone with HarMA adapters adapt to a new domain?

No pretrained CLIP weights and no remote-sensing images are available offline, so the benchmark
makes its own: it pretrains a small open_clip CLIP from scratch on synthetic captioned scenes of
a "source" domain (``harma.training.synthetic``, ``style="source"``), then adapts it to a shifted "target"
domain (``style="target"``: other palette, textures, object scale, sensor noise and words in
the captions) with each of

- ``frozen``: the pretrained backbone, zero-shot (no training);
- ``harma``: HarMA adapters, reference layout (MMS used by the text tower only);
- ``harma_paper``: HarMA adapters, paper layout (MMS of layer i shared by both towers);
- ``harma_plus``: HarMA adapters, the ``HarmaConfig.plus`` preset (adapters after attention and
  MLP, masked and single-pass adapter attention, at no more parameters than the reference);
- ``lora``: peft LoRA on the MLPs (``c_fc``, ``c_proj``) and the attention (``attn``, peft's
  ``nn.MultiheadAttention`` support) of every block, rank chosen to match HarMA's
  reference-layout parameter count;
- ``linear_probe``: only the two projections (``visual.proj``, ``text_projection``);
- ``full``: every backbone weight.

Every trained method uses the same loss (:class:`harma.losses.HarmaLoss`, whose temperature is
trained in every method), the same optimiser (AdamW, betas 0.9/0.98, weight decay 0.04 on
matrices), the same schedule (10% linear warm-up, then linear decay), the same number of steps,
the same batches in the same order (per seed), and its own learning rate, picked by one rule
for all: on seed 0, train with c and its two neighbours on the ladder 1e-5, 3e-5, 1e-4, 3e-4,
1e-3, ... (about x3 apart), where c = 3e-4 for full fine-tuning and c = 3e-3 (ten times more)
for the methods that train only new or few parameters; while the best validation mR sits at an
end of the grid, add the next rung beyond it (at most ``grid_extensions`` times); the learning
rate with the best mean recall on the target *validation* split wins and is used for every
seed. The test split is never used for any choice.

Two scenarios (``--scenario``). ``new-vocabulary`` (the default): the source captions use one
word for each concept and the target captions another, so 40 of the target's words never occur
in pretraining and their embeddings stay random in a frozen backbone. ``known-vocabulary``:
30% of the pretraining images are captioned with the target's words (the images keep the
source look), so every target word occurs at least 20 times in pretraining and the shift is in
the images and in which words are used, as for a real pretrained CLIP.

Results on the held-out target test split (R@1/5/10 both ways, mR), trainable parameters and
median train-step time are written as JSON (``--json``), a markdown table next to it, and a plot
of mR against trainable parameters (``--plot``). See ``docs/transfer_benchmark.md``.

``--forgetting`` also measures what adaptation costs on the source domain: source-domain
zero-shot scene classification (a synthetic classification set of the source style) and source
retrieval mR, at the end of every run and along it (every tenth of the steps), and compares each
adapter method with full fine-tuning at the same target gain (the protocol is in
``docs/transfer_benchmark.md``, section "Forgetting").

    python benchmarks/transfer.py --quick --json docs/transfer_results.json   # 10-12 min, 2 CPU cores
    python benchmarks/transfer.py --smoke --json /tmp/smoke.json             # seconds, for the test
    python benchmarks/transfer.py --json results.json                        # the larger setting
    python benchmarks/transfer.py --quick --scenario known-vocabulary --json docs/transfer_results_known_vocab.json
    python benchmarks/transfer.py --scenario known-vocabulary --forgetting --methods frozen harma harma_plus lora full
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO_ROOT))

import harma  # noqa: E402
from harma.classification import ZeroShotEvaluator  # noqa: E402
from harma.losses import HarmaLoss  # noqa: E402
from harma.retrieval import retrieval_metrics_from_embeddings  # noqa: E402
from harma.training.classification_data import load_classification_dataset  # noqa: E402
from harma.training.data import DEFAULT_CLIP_MEAN, DEFAULT_CLIP_STD, preprocess_caption  # noqa: E402
from harma.training.synthetic import (  # noqa: E402
    LABEL_NAMES,
    SOURCE_STYLE,
    SYNTHETIC_TEMPLATES,
    TARGET_STYLE,
    SceneStyle,
    generate_scene,
    make_synthetic_classification_set,
    make_synthetic_dataset,
)

METHODS = ("frozen", "harma", "harma_paper", "harma_plus", "lora", "linear_probe", "full")
TRAINED_METHODS = METHODS[1:]
HARMA_METHODS = ("harma", "harma_paper", "harma_plus")
SCENARIOS = ("new-vocabulary", "known-vocabulary")
# known-vocabulary: this share of the pretraining images is captioned with the target's words,
# and every target caption word must then occur this often in the pretraining captions.
KNOWN_VOCABULARY_SHARE = 0.3
KNOWN_VOCABULARY_MIN_COUNT = 20


def false_colour(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """A colour-infrared composite of an RGB colour: displayed (NIR, red, green), with the
    near-infrared estimated as bright for vegetation, sand and concrete and dark for water."""
    red, green, blue = rgb
    near_infrared = min(255, max(0, round(1.6 * green - 0.8 * blue)))
    return near_infrared, red, green


# known-vocabulary: with the target style's look alone the frozen backbone reached 78% of full
# fine-tuning's mR (quick mode), too close for a real shift; the target is also seen through a
# colour-infrared sensor, so colours no longer mean what they meant in pretraining.
KNOWN_VOCABULARY_TARGET_STYLE = dataclasses.replace(
    TARGET_STYLE, name="target_false_colour",
    palette={key: false_colour(rgb) for key, rgb in TARGET_STYLE.palette.items()},
)
METRIC_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mean_recall")
# Centre of each method's learning-rate grid (see the module docstring).
LR_CENTRE = {"full": 3e-4, "harma": 3e-3, "harma_paper": 3e-3, "harma_plus": 3e-3, "lora": 3e-3,
             "linear_probe": 3e-3}
# Learning rates are tried along this ladder (about x3 apart): the grid is the centre and its
# two neighbours, extended one rung at a time past an edge winner.
LR_LADDER = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
SOURCE_DATA_SEED = 1000  # the source domain and the pretraining never change with --seeds
PRETRAIN_SEED = 1000
DEFAULT_PLOT = REPO_ROOT / "docs" / "img" / "transfer_mr_vs_params.png"

# The architecture is ViT-B/32's with every width divided by 4 and 4 blocks per tower instead
# of 12; HarMA's bottlenecks are divided by the same factor with their head widths kept
# (MGA: 128 -> 32 features, heads of 16; MMS: 64 -> 16 features, heads of 8), so the adapters
# take about the same share of the model as on ViT-B/32.


@dataclass(frozen=True)
class Settings:
    """Sizes of one benchmark mode."""

    name: str
    seeds: tuple[int, ...]
    source_train_images: int
    source_test_images: int
    target_train_images: int
    target_val_images: int
    target_test_images: int
    pretrain_steps: int
    pretrain_batch: int
    pretrain_lr: float
    adapt_steps: int
    adapt_batch: int
    grid_extensions: int
    vision_width: int = 192
    text_width: int = 128
    layers: int = 4
    head_width: int = 64
    image_size: int = 32
    patch_size: int = 8
    context_length: int = 32
    eval_batch: int = 256
    timing_rounds: int = 3
    timing_steps: int = 3

    @property
    def width_scale(self) -> float:
        """Tower width relative to ViT-B/32's text tower (512), which sets HarMA's sizes."""
        return self.text_width / 512

    @property
    def embed_dim(self) -> int:
        return int(512 * self.width_scale)

    def harma_sizes(self, config: harma.HarmaConfig | None = None) -> dict[str, int]:
        """The bottlenecks of ``config`` (ViT-B/32 sizes; default the reference's 128 and 64)
        scaled with the model by the width scale, with ``config``'s head widths kept (16 for
        the reference's MGA, 8 for its MMS)."""
        config = config or harma.HarmaConfig()

        def scaled(width: int, heads: int) -> tuple[int, int]:
            new_width = max(1, round(width * self.width_scale))
            new_heads = max(1, new_width // (width // heads))
            while new_width % new_heads:
                new_heads -= 1
            return new_width, new_heads

        bottleneck, heads = scaled(config.bottleneck, config.heads)
        mini, mini_heads = scaled(config.mini_bottleneck, config.mini_heads)
        return {"bottleneck": bottleneck, "heads": heads, "mini_bottleneck": mini, "mini_heads": mini_heads}

    def scaled_harma_config(self, config: harma.HarmaConfig) -> harma.HarmaConfig:
        """``config`` (written for ViT-B/32) with its bottlenecks scaled to this model."""
        return config.replace(**self.harma_sizes(config))


MODES: dict[str, Settings] = {
    # A few seconds: tiny model and data, one seed, a handful of steps. For the test.
    "smoke": Settings(
        name="smoke", seeds=(0,), source_train_images=40, source_test_images=20,
        target_train_images=20, target_val_images=10, target_test_images=10,
        pretrain_steps=4, pretrain_batch=16, pretrain_lr=1e-3,
        adapt_steps=2, adapt_batch=8, grid_extensions=0,
        vision_width=96, text_width=64, layers=1, context_length=32, timing_rounds=1, timing_steps=1,
    ),
    # 10-12 minutes on 2 shared CPU cores.
    "quick": Settings(
        name="quick", seeds=(0, 1, 2), source_train_images=1000, source_test_images=200,
        target_train_images=200, target_val_images=100, target_test_images=200,
        pretrain_steps=400, pretrain_batch=32, pretrain_lr=1e-3,
        adapt_steps=80, adapt_batch=32, grid_extensions=1,
    ),
    # The larger setting (about 1-2 hours on 2 CPU cores).
    "standard": Settings(
        name="standard", seeds=(0, 1, 2), source_train_images=3000, source_test_images=300,
        target_train_images=500, target_val_images=200, target_test_images=300,
        pretrain_steps=2000, pretrain_batch=64, pretrain_lr=1e-3,
        adapt_steps=300, adapt_batch=32, grid_extensions=2,
    ),
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def derived_seed(*keys: Any) -> int:
    return zlib.crc32(repr(keys).encode("utf-8"))


# ------------------------------------------------------------------------------------- data


class CompactTokenizer:
    """open_clip's BPE tokenizer with the token ids renumbered into a compact table.

    Only BPE tokens that occur in some caption of the benchmark (both domains, every split)
    get a row, numbered in BPE order, so the end-of-text token keeps the largest id and
    open_clip's argmax pooling still finds it; 0 stays the padding id. This is equivalent to
    the full 49,408-row embedding table, of which the model would only ever read these rows
    (rows of words never seen in pretraining keep their random initialisation either way),
    but it keeps the embedding table from dominating the parameter count of a model this small.
    """

    def __init__(self, captions: Sequence[str], context_length: int) -> None:
        from open_clip.tokenizer import SimpleTokenizer

        self.bpe = SimpleTokenizer(context_length=context_length)
        self.context_length = context_length
        tokens = self.bpe(list(captions))
        used = torch.unique(torch.cat([tokens.flatten(), torch.tensor([0])]))
        special = torch.tensor([self.bpe.sot_token_id, self.bpe.eot_token_id])
        used = torch.unique(torch.cat([used, special]))  # sorted: 0 first, end-of-text last
        self.lookup = torch.full((len(self.bpe.encoder),), -1, dtype=torch.long)
        self.lookup[used] = torch.arange(len(used))
        self.vocab_size = len(used)

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        ids = self.lookup[self.bpe(list(captions))]
        if bool((ids < 0).any()):
            raise ValueError("a caption holds a token outside the benchmark's vocabulary")
        return ids


@dataclass
class PairSplit:
    """Training pairs: ``images[image_index[k]]`` goes with caption ``captions[k]``."""

    images: torch.Tensor  # (n_images, 3, H, W), normalised
    captions: list[str]
    image_index: torch.Tensor  # (n_pairs,)
    tokens: torch.Tensor | None = None


@dataclass
class EvalSplit:
    images: torch.Tensor
    captions: list[str]
    txt2img: torch.Tensor
    tokens: torch.Tensor | None = None


def _decode_images(image_root: Path, relative_paths: Sequence[str]) -> torch.Tensor:
    from PIL import Image

    arrays = []
    for relative in relative_paths:
        with Image.open(image_root / relative) as image:
            arrays.append(np.asarray(image.convert("RGB"), dtype=np.uint8))
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(DEFAULT_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(DEFAULT_CLIP_STD).view(1, 3, 1, 1)
    return ((pixels - mean) / std).contiguous()


def load_pairs(annotation_file: Path, image_root: Path) -> PairSplit:
    entries = json.loads(annotation_file.read_text(encoding="utf-8"))
    paths: list[str] = []
    index_of: dict[str, int] = {}
    image_index = []
    for entry in entries:
        if entry["image"] not in index_of:
            index_of[entry["image"]] = len(paths)
            paths.append(entry["image"])
        image_index.append(index_of[entry["image"]])
    return PairSplit(
        images=_decode_images(image_root, paths),
        captions=[preprocess_caption(entry["caption"]) for entry in entries],
        image_index=torch.tensor(image_index),
    )


def load_eval(annotation_file: Path, image_root: Path) -> EvalSplit:
    entries = json.loads(annotation_file.read_text(encoding="utf-8"))
    captions, txt2img = [], []
    for index, entry in enumerate(entries):
        for caption in entry["caption"]:
            captions.append(preprocess_caption(caption))
            txt2img.append(index)
    return EvalSplit(
        images=_decode_images(image_root, [entry["image"] for entry in entries]),
        captions=captions,
        txt2img=torch.tensor(txt2img),
    )


@dataclass
class ClassSet:
    """A scene classification set of one domain (`make_synthetic_classification_set`), decoded,
    and its zero-shot evaluator once the tokenizer is known."""

    images: torch.Tensor  # (n_images, 3, H, W), normalised
    labels: list[int]
    classnames: list[str]
    evaluator: ZeroShotEvaluator | None = None


@dataclass
class Domain:
    train: PairSplit
    val: EvalSplit | None
    test: EvalSplit
    classes: ClassSet | None = None  # with --forgetting


def make_domain(root: Path, style: str | SceneStyle, seed: int, n_train: int, n_val: int, n_test: int,
                image_size: int, load_val: bool) -> Domain:
    files = make_synthetic_dataset(root, num_train_images=n_train, num_val_images=n_val,
                                   num_test_images=n_test, image_size=image_size, seed=seed, style=style)
    return Domain(
        train=load_pairs(files.train_file, files.image_root),
        val=load_eval(files.val_file, files.image_root) if load_val else None,
        test=load_eval(files.test_file, files.image_root),
    )


def make_class_set(root: Path, style: str | SceneStyle, seed: int, images_per_class: int, image_size: int) -> ClassSet:
    made = make_synthetic_classification_set(root, images_per_class=images_per_class, image_size=image_size,
                                             seed=seed, style=style)
    dataset = load_classification_dataset(made.root)
    relative = [str(path.relative_to(made.root)) for path in dataset.image_paths]
    return ClassSet(_decode_images(made.root, relative), dataset.labels, list(dataset.classes))


def add_class_sets(settings: Settings, data_dir: Path, source: Domain, targets: dict[int, Domain],
                   target_style: str | SceneStyle, tokenizer: CompactTokenizer) -> None:
    """The source classification set (source style, the source data seed) and one target set
    per seed (the scenario's target style, the run's seed), as large as the test splits, each
    with its evaluator (prompts: `SYNTHETIC_TEMPLATES` with the class names in the domain's
    words). The tokenizer is the one built from the captions: every prompt word must be in it."""
    per_class = len(LABEL_NAMES)
    source.classes = make_class_set(data_dir / "source_classes", "source", SOURCE_DATA_SEED,
                                    max(1, settings.source_test_images // per_class), settings.image_size)
    for seed, domain in targets.items():
        domain.classes = make_class_set(data_dir / f"target_classes_seed{seed}", target_style, seed,
                                        max(1, settings.target_test_images // per_class), settings.image_size)
    for domain in (source, *targets.values()):
        classes = domain.classes
        classes.evaluator = ZeroShotEvaluator(classes.images, classes.labels, classes.classnames, tokenizer,
                                              templates=list(SYNTHETIC_TEMPLATES), batch_size=settings.eval_batch,
                                              progress=False)
        tokenizer([prompt for prompts in classes.evaluator.prompts for prompt in prompts])  # raises on unknown words


def tokenize_domain(domain: Domain, tokenizer: CompactTokenizer) -> None:
    for split in (domain.train, domain.val, domain.test):
        if split is not None:
            split.tokens = tokenizer(split.captions)


# ------------------------------------------------------------------------------------ model


def build_clip(settings: Settings, vocab_size: int) -> nn.Module:
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    return CLIP(
        embed_dim=settings.embed_dim,
        vision_cfg=CLIPVisionCfg(
            layers=settings.layers, width=settings.vision_width, head_width=settings.head_width,
            patch_size=settings.patch_size, image_size=settings.image_size,
        ),
        text_cfg=CLIPTextCfg(
            context_length=settings.context_length, vocab_size=vocab_size, width=settings.text_width,
            heads=settings.text_width // settings.head_width, layers=settings.layers,
        ),
    ).float()


def lora_targets() -> list[str]:
    # "attn" is each block's nn.MultiheadAttention (peft adapts its in_proj and out_proj);
    # targeting "attn.out_proj" alone would do nothing, since nn.MultiheadAttention reads that
    # weight directly instead of calling the module.
    return ["c_fc", "c_proj", "attn"]


def lora_parameters_per_rank(settings: Settings, vocab_size: int, modules: Sequence[str] | None = None) -> int:
    model = apply_method(build_clip(settings, vocab_size), "lora", settings, lora_rank=1, lora_modules=modules)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def harma_method_config(method: str) -> harma.HarmaConfig:
    """The ViT-B/32-sized layout of a HarMA method of the benchmark."""
    factories = {"harma": "reference", "harma_paper": "paper", "harma_plus": "plus"}
    return getattr(harma.HarmaConfig, factories[method])()


def apply_method(model: nn.Module, method: str, settings: Settings, lora_rank: int = 8,
                 lora_modules: Sequence[str] | None = None,
                 harma_config: harma.HarmaConfig | None = None) -> nn.Module:
    """Prepare ``model`` for ``method``: add its modules and set ``requires_grad``.

    ``lora_modules`` replaces the benchmark's LoRA targets (`lora_targets()`), and
    ``harma_config`` (ViT-B/32-sized, scaled here) a HarMA method's layout, for diagnostics and
    the selection of the ``harma_plus`` preset."""
    if method in HARMA_METHODS:
        config = harma_config or harma_method_config(method)
        harma.inject_harma_adapters(model, settings.scaled_harma_config(config))
    elif method == "lora":
        import warnings

        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                            target_modules=list(lora_modules or lora_targets()))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft's notes on nn.MultiheadAttention support
            model = inject_adapter_in_model(config, model)
        for name, param in model.named_parameters():
            param.requires_grad_("lora_" in name)
    elif method == "linear_probe":
        for name, param in model.named_parameters():
            param.requires_grad_(name in ("visual.proj", "text_projection"))
    elif method in ("full", "frozen"):
        for name, param in model.named_parameters():
            # logit_scale is unused: the loss carries its own temperature.
            param.requires_grad_(method == "full" and name not in ("logit_scale", "logit_bias"))
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    return model


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------- training


def parameter_groups(named: Sequence[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    decay, no_decay, seen = [], [], set()
    for name, param in named:
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (no_decay if param.ndim < 2 or name.endswith("bias") else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def batch_order(n_pairs: int, steps: int, batch: int, seed: int) -> list[torch.Tensor]:
    """Batches of pair indices: shuffled epochs, reshuffled each epoch; a pure function of the seed."""
    generator = torch.Generator().manual_seed(seed)
    pool: list[int] = []
    batches = []
    for _ in range(steps):
        while len(pool) < batch:
            pool.extend(torch.randperm(n_pairs, generator=generator).tolist())
        batches.append(torch.tensor(pool[:batch]))
        del pool[:batch]
    return batches


@dataclass
class TrainResult:
    step_seconds: float
    final_loss: float
    temperature: float


def train(model: nn.Module, data: PairSplit, steps: int, batch: int, lr: float, order_seed: int,
          loss_fn: nn.Module, weight_decay: float = 0.04, loss_log: list[float] | None = None,
          checkpoints: Sequence[int] = (), on_checkpoint: Callable[[int], None] | None = None) -> TrainResult:
    """AdamW (0.9, 0.98), 10% linear warm-up then linear decay, one step per batch.

    ``loss_log``, if given, receives the loss of every step. ``on_checkpoint(step)`` is called
    before the first step (step 0) and after each step listed in ``checkpoints`` (evaluation
    there does not change training: the model is put back in training mode afterwards)."""
    named = list(model.named_parameters()) + [("temperature", loss_fn.temperature)]
    optimizer = torch.optim.AdamW(parameter_groups(named, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-8)
    warmup = max(1, int(0.1 * steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    model.train()
    if on_checkpoint is not None and 0 in checkpoints:
        on_checkpoint(0)
        model.train()
    times = []
    loss_value = float("nan")
    for step, indices in enumerate(batch_order(len(data.captions), steps, batch, order_seed), start=1):
        start = time.perf_counter()
        image_index = data.image_index[indices]
        output = loss_fn(model.encode_image(data.images[image_index]), model.encode_text(data.tokens[indices]),
                         image_index)
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        optimizer.step()
        scheduler.step()
        loss_fn.clamp_temperature_()
        times.append(time.perf_counter() - start)
        loss_value = float(output.loss.detach())
        if loss_log is not None:
            loss_log.append(loss_value)
        if not math.isfinite(loss_value):
            break
        if on_checkpoint is not None and step in checkpoints:
            on_checkpoint(step)
            model.train()
    model.eval()
    # The first steps pay for allocations; the median of the rest is the steady-state cost.
    steady = times[min(2, len(times) - 1):]
    return TrainResult(statistics.median(steady), loss_value, float(loss_fn.effective_temperature().detach()))


@torch.no_grad()
def evaluate(model: nn.Module, split: EvalSplit, batch: int) -> dict[str, float]:
    model.eval()
    image_embeds = torch.cat([model.encode_image(split.images[i:i + batch])
                              for i in range(0, len(split.images), batch)])
    text_embeds = torch.cat([model.encode_text(split.tokens[i:i + batch])
                             for i in range(0, len(split.tokens), batch)])
    if not (torch.isfinite(image_embeds).all() and torch.isfinite(text_embeds).all()):
        return {key: 0.0 for key in METRIC_KEYS} | {"diverged": 1.0}
    metrics = retrieval_metrics_from_embeddings(image_embeds, text_embeds, split.txt2img)
    return {key: float(metrics[key]) for key in METRIC_KEYS}


def classify(model: nn.Module, classes: ClassSet) -> dict[str, float]:
    """Zero-shot classification metrics (percent) of ``classes`` with ``model``."""
    try:
        return classes.evaluator.evaluate(model)
    except ValueError as error:
        if "NaN or infinite" not in str(error):
            raise
        return {"acc1": 0.0, "acc5": 0.0, "mean_per_class_recall": 0.0, "diverged": 1.0}


def checkpoint_steps(steps: int) -> list[int]:
    """Where a run's trajectory is measured: before the first step and after every tenth of them."""
    return sorted({round(k * steps / 10) for k in range(11)})


def trajectory_point(model: nn.Module, step: int, source: Domain, target: Domain, batch: int) -> dict[str, float]:
    return {
        "step": step,
        "target_val_mean_recall": evaluate(model, target.val, batch)["mean_recall"],
        "source_mean_recall": evaluate(model, source.test, batch)["mean_recall"],
        "source_acc1": classify(model, source.classes)["acc1"],
        "target_acc1": classify(model, target.classes)["acc1"],
    }


def source_figures(model: nn.Module, source: Domain, target: Domain, batch: int) -> dict[str, dict[str, float]]:
    """What a model knows of the source domain (retrieval on its test split, zero-shot
    classification) and zero-shot classification of the target domain."""
    return {"source_test": evaluate(model, source.test, batch), "source_zero_shot": classify(model, source.classes),
            "target_zero_shot": classify(model, target.classes)}


# ------------------------------------------------------------------------------ the benchmark


def pretrain(settings: Settings, source: Domain, vocab_size: int) -> tuple[dict[str, torch.Tensor], dict]:
    torch.manual_seed(PRETRAIN_SEED)
    model = apply_method(build_clip(settings, vocab_size), "full", settings)
    loss_fn = HarmaLoss()
    start = time.perf_counter()
    result = train(model, source.train, settings.pretrain_steps, settings.pretrain_batch,
                   settings.pretrain_lr, derived_seed("pretrain", PRETRAIN_SEED), loss_fn)
    seconds = time.perf_counter() - start
    metrics = evaluate(model, source.test, settings.eval_batch)
    info = {
        "steps": settings.pretrain_steps, "batch": settings.pretrain_batch, "lr": settings.pretrain_lr,
        "seconds": round(seconds, 1), "step_seconds": result.step_seconds, "final_loss": result.final_loss,
        "source_test": metrics, "parameters": trainable_count(model),
    }
    return {key: value.clone() for key, value in model.state_dict().items()}, info


def run_method(method: str, lr: float, seed: int, settings: Settings, state: dict[str, torch.Tensor],
               vocab_size: int, target: Domain, lora_rank: int, splits: Sequence[str],
               harma_config: harma.HarmaConfig | None = None, source: Domain | None = None) -> dict[str, Any]:
    """Adapt the pretrained backbone with ``method`` on seed ``seed``'s target data and evaluate
    on ``splits``. ``harma_config`` replaces a HarMA method's layout (see `apply_method`). With
    ``source`` (``--forgetting``), also the source figures at the end (`source_figures`) and the
    ``trajectory`` (`trajectory_point` at every `checkpoint_steps`)."""
    torch.manual_seed(derived_seed("init", method, seed))  # adapter / LoRA initialisation
    model = build_clip(settings, vocab_size)
    model.load_state_dict(state)
    model = apply_method(model, method, settings, lora_rank, harma_config=harma_config)
    loss_fn = HarmaLoss()
    params = trainable_count(model) + 1  # + the loss temperature, trained by every method
    trajectory: list[dict[str, float]] = []

    def measure(step: int) -> None:
        trajectory.append(trajectory_point(model, step, source, target, settings.eval_batch))

    result = train(model, target.train, settings.adapt_steps, settings.adapt_batch, lr,
                   derived_seed("order", seed), loss_fn, checkpoints=checkpoint_steps(settings.adapt_steps),
                   on_checkpoint=measure if source is not None else None)
    out: dict[str, Any] = {
        "seed": seed, "lr": lr, "trainable_params": params, "step_seconds": result.step_seconds,
        "final_loss": result.final_loss, "temperature": result.temperature,
    }
    for split in splits:
        out[split] = evaluate(model, getattr(target, split), settings.eval_batch)
    if source is not None:
        out.update(source_figures(model, source, target, settings.eval_batch))
        out["trajectory"] = trajectory
    return out


def time_steps(methods: Sequence[str], settings: Settings, state: dict[str, torch.Tensor], vocab_size: int,
               data: PairSplit, lora_rank: int, rounds: int, steps_per_round: int) -> dict[str, float]:
    """Median seconds per training step (forward, backward, AdamW step) of each method, measured
    round-robin on the same batches so that a busy machine slows every method alike."""
    models, optimizers, losses = {}, {}, {}
    for method in methods:
        torch.manual_seed(0)
        model = build_clip(settings, vocab_size)
        model.load_state_dict(state)
        models[method] = apply_method(model, method, settings, lora_rank)
        losses[method] = HarmaLoss()
        named = list(models[method].named_parameters()) + [("temperature", losses[method].temperature)]
        optimizers[method] = torch.optim.AdamW(parameter_groups(named, 0.04), lr=1e-5)
    batches = batch_order(len(data.captions), steps_per_round, settings.adapt_batch, seed=0)
    times: dict[str, list[float]] = {method: [] for method in methods}
    for round_index in range(rounds + 1):  # round 0 warms up and is not counted
        for method in methods:
            model, loss_fn, optimizer = models[method], losses[method], optimizers[method]
            for indices in batches:
                start = time.perf_counter()
                image_index = data.image_index[indices]
                output = loss_fn(model.encode_image(data.images[image_index]),
                                 model.encode_text(data.tokens[indices]), image_index)
                optimizer.zero_grad(set_to_none=True)
                output.loss.backward()
                optimizer.step()
                if round_index:
                    times[method].append(time.perf_counter() - start)
    return {method: statistics.median(values) for method, values in times.items()}


def choose_lr(method: str, runner: Callable[[float], dict[str, Any]], extensions: int,
              on_run: Callable[[dict[str, Any]], None]) -> tuple[float, list[dict[str, Any]]]:
    """Best learning rate by validation mR on the ladder grid, extended past an edge winner.

    Ties go to the smaller learning rate."""
    runs: dict[int, dict[str, Any]] = {}

    def run(rung: int) -> None:
        if rung not in runs:
            runs[rung] = runner(LR_LADDER[rung])
            on_run(runs[rung])

    def best() -> int:
        return max(sorted(runs), key=lambda rung: (runs[rung]["val"]["mean_recall"], -rung))

    centre = LR_LADDER.index(LR_CENTRE[method])
    for rung in (centre - 1, centre, centre + 1):
        run(rung)
    for _ in range(extensions):
        rungs, winner = sorted(runs), best()
        if winner == rungs[0] and winner > 0:
            run(winner - 1)
        elif winner == rungs[-1] and winner < len(LR_LADDER) - 1:
            run(winner + 1)
        else:
            break
    return LR_LADDER[best()], [runs[rung] for rung in sorted(runs)]


def summarise(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for key in METRIC_KEYS:
        values = [run["test"][key] for run in per_seed]
        summary[key] = statistics.fmean(values)
        summary[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    summary["step_seconds_in_training"] = statistics.fmean(run["step_seconds"] for run in per_seed)
    return summary


def _concatenate(first: PairSplit, second: PairSplit) -> PairSplit:
    return PairSplit(images=torch.cat([first.images, second.images]), captions=first.captions + second.captions,
                     image_index=torch.cat([first.image_index, second.image_index + len(first.images)]))


def make_source(settings: Settings, data_dir: Path, scenario: str, target_words: set[str]) -> Domain:
    """The pretraining domain. ``known-vocabulary``: a `KNOWN_VOCABULARY_SHARE` of the training
    images look like the source but are captioned with the target style's words, picked so that
    every word of ``target_words`` occurs at least `KNOWN_VOCABULARY_MIN_COUNT` times."""
    n_train = settings.source_train_images
    n_known = round(KNOWN_VOCABULARY_SHARE * n_train) if scenario == "known-vocabulary" else 0
    source = make_domain(data_dir / "source", "source", SOURCE_DATA_SEED, n_train - n_known, 1,
                         settings.source_test_images, settings.image_size, load_val=False)
    if n_known:
        counts = Counter(word for caption in source.train.captions for word in caption.split())
        source.train = _concatenate(source.train, known_vocabulary_pairs(settings, n_known, target_words, counts))
    return source


def _scene_pixels(images: Sequence[Any]) -> torch.Tensor:
    pixels = torch.from_numpy(np.stack([np.asarray(image, dtype=np.uint8) for image in images]))
    pixels = pixels.permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(DEFAULT_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(DEFAULT_CLIP_STD).view(1, 3, 1, 1)
    return ((pixels - mean) / std).contiguous()


def known_vocabulary_pairs(settings: Settings, count: int, target_words: set[str], counts: Counter) -> PairSplit:
    """``count`` source-look scenes captioned with the target's words. Scenes are drawn in turn
    over the labels; while a target word is short of `KNOWN_VOCABULARY_MIN_COUNT` pretraining
    occurrences, only scenes that use a short word are kept, then the rest are filled in order.
    ``counts`` (word -> occurrences so far) is updated."""
    style = dataclasses.replace(SOURCE_STYLE, name="source_target_words", vocabulary=TARGET_STYLE.vocabulary)
    kept: list[Any] = []
    spare: list[Any] = []
    for k in range(40 * count):
        short = {word for word in target_words if counts[word] < KNOWN_VOCABULARY_MIN_COUNT}
        if not short and len(kept) + len(spare) >= count:
            break
        label = LABEL_NAMES[k % len(LABEL_NAMES)]
        scene = generate_scene(label, np.random.default_rng([SOURCE_DATA_SEED, 77, k]), style, settings.image_size)
        captions = [preprocess_caption(caption) for caption in scene.captions]
        words = [word for caption in captions for word in caption.split()]
        if short & set(words):
            kept.append((scene.image, captions))
            counts.update(words)
        elif len(spare) < count:
            spare.append((scene.image, captions))
    if len(kept) > count or any(counts[word] < KNOWN_VOCABULARY_MIN_COUNT for word in target_words):
        raise RuntimeError(f"known-vocabulary pretraining data: {count} scenes cannot give every target word "
                           f"{KNOWN_VOCABULARY_MIN_COUNT} occurrences; raise KNOWN_VOCABULARY_SHARE")
    for image, captions in spare[:count - len(kept)]:
        kept.append((image, captions))
        counts.update(word for caption in captions for word in caption.split())
    return PairSplit(images=_scene_pixels([image for image, _ in kept]),
                     captions=[caption for _, captions in kept for caption in captions],
                     image_index=torch.tensor([i for i, (_, captions) in enumerate(kept) for _ in captions]))


def vocabulary_report(source: Domain, targets: dict[int, Domain]) -> dict[str, Any]:
    """How often each word of the target captions (every seed, every split) occurs in the
    pretraining captions: the rarest words and those never seen."""
    counts: dict[str, int] = {}
    for caption in source.train.captions:
        for word in caption.split():
            counts[word] = counts.get(word, 0) + 1
    target_words = {word for domain in targets.values()
                    for split in (domain.train, domain.val, domain.test) if split is not None
                    for caption in split.captions for word in caption.split()}
    by_count = sorted(target_words, key=lambda word: (counts.get(word, 0), word))
    return {
        "target_words": len(target_words),
        "unseen_in_pretraining": [word for word in by_count if word not in counts],
        "min_count": counts.get(by_count[0], 0) if by_count else 0,
        "rarest": {word: counts.get(word, 0) for word in by_count[:5]},
    }


def prepare_domains(settings: Settings, data_dir: Path, scenario: str = "new-vocabulary", forgetting: bool = False
                    ) -> tuple[Domain, dict[int, Domain], CompactTokenizer, dict[str, Any]]:
    """The source domain, one target domain per seed, the tokenizer of all their captions and
    the vocabulary report (`vocabulary_report`). With ``forgetting``, each domain also gets its
    classification set (`add_class_sets`); nothing else changes.

    Raises:
        RuntimeError: ``known-vocabulary`` pretraining data in which some target word would occur
            fewer than `KNOWN_VOCABULARY_MIN_COUNT` times (not checked in smoke mode).
    """
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; choose from {SCENARIOS}")
    start = time.perf_counter()
    seeds = settings.seeds
    target_style = KNOWN_VOCABULARY_TARGET_STYLE if scenario == "known-vocabulary" else TARGET_STYLE
    targets = {
        seed: make_domain(data_dir / f"target_seed{seed}", target_style, seed, settings.target_train_images,
                          settings.target_val_images, settings.target_test_images, settings.image_size,
                          load_val=True)
        for seed in seeds
    }
    target_words = {word for domain in targets.values() for split in (domain.train, domain.val, domain.test)
                    for caption in split.captions for word in caption.split()}
    if scenario == "known-vocabulary" and settings.name == "smoke":
        target_words = set()  # too few pretraining scenes for the word counts; the smoke run only checks the code
    source = make_source(settings, data_dir, scenario, target_words)
    all_captions = list(source.train.captions) + list(source.test.captions)
    for domain in targets.values():
        all_captions += domain.train.captions + domain.val.captions + domain.test.captions
    tokenizer = CompactTokenizer(all_captions, settings.context_length)
    for domain in (source, *targets.values()):
        tokenize_domain(domain, tokenizer)
    if forgetting:
        add_class_sets(settings, data_dir, source, targets, target_style, tokenizer)
    report = vocabulary_report(source, targets)
    log(f"data ready in {time.perf_counter() - start:.1f}s ({scenario}): vocabulary {tokenizer.vocab_size} BPE "
        f"tokens; {len(report['unseen_in_pretraining'])} of {report['target_words']} target caption words never "
        f"occur in pretraining; the rarest occur {report['rarest']} times")
    return source, targets, tokenizer, report


@dataclass
class MethodRunner:
    """Trains and evaluates the methods of one benchmark run on its pretrained backbone."""

    settings: Settings
    state: dict[str, torch.Tensor]
    vocab_size: int
    targets: dict[int, Domain]
    lora_rank: int
    source: Domain | None = None  # with --forgetting

    def frozen(self) -> tuple[list[dict[str, Any]], None, None]:
        model = build_clip(self.settings, self.vocab_size)
        model.load_state_dict(self.state)
        per_seed = [{"seed": seed, "lr": None, "trainable_params": 0, "step_seconds": 0.0,
                     "val": evaluate(model, self.targets[seed].val, self.settings.eval_batch),
                     "test": evaluate(model, self.targets[seed].test, self.settings.eval_batch)}
                    for seed in self.settings.seeds]
        if self.source is not None:
            for run in per_seed:
                run.update(source_figures(model, self.source, self.targets[run["seed"]], self.settings.eval_batch))
        return per_seed, None, None

    def one(self, method: str, lr: float, seed: int) -> dict[str, Any]:
        run = run_method(method, lr, seed, self.settings, self.state, self.vocab_size, self.targets[seed],
                         self.lora_rank, ("val", "test"), source=self.source)
        log(f"  {method:12s} seed {run['seed']} lr {run['lr']:.0e}: val mR {run['val']['mean_recall']:5.1f}"
            f"  ({run['step_seconds'] * 1000:.0f} ms/step, loss {run['final_loss']:.3f})")
        return run

    def trained(self, method: str) -> tuple[list[dict[str, Any]], float, list[dict[str, Any]]]:
        """Learning rate chosen on the first seed's validation split, then every other seed."""
        seeds = self.settings.seeds
        best_lr, grid_runs = choose_lr(method, lambda lr: self.one(method, lr, seeds[0]),
                                       self.settings.grid_extensions, lambda run: None)
        grid = [{"lr": run["lr"], "val_mean_recall": run["val"]["mean_recall"],
                 "test_mean_recall": run["test"]["mean_recall"], "final_loss": run["final_loss"]}
                for run in grid_runs]
        log(f"  {method}: lr {best_lr:.0e} chosen on seed {seeds[0]}'s validation split")
        per_seed = [next(run for run in grid_runs if run["lr"] == best_lr)]
        per_seed += [self.one(method, best_lr, seed) for seed in seeds[1:]]
        return per_seed, best_lr, grid


def run_benchmark(settings: Settings, data_dir: Path, methods: Sequence[str],
                  scenario: str = "new-vocabulary", forgetting: bool = False) -> dict[str, Any]:
    wall_start = time.perf_counter()
    seeds = settings.seeds
    log(f"mode {settings.name}: seeds {list(seeds)}, {torch.get_num_threads()} threads, data in {data_dir}"
        + (", with the forgetting measures" if forgetting else ""))
    source, targets, tokenizer, vocabulary = prepare_domains(settings, data_dir, scenario, forgetting)

    state, pretrain_info = pretrain(settings, source, tokenizer.vocab_size)
    full_params = pretrain_info["parameters"]
    log(f"pretrained {full_params:,} parameters in {pretrain_info['seconds']}s "
        f"({pretrain_info['step_seconds'] * 1000:.0f} ms/step): source test mR "
        f"{pretrain_info['source_test']['mean_recall']:.1f}")

    harma_params = trainable_count(apply_method(build_clip(settings, tokenizer.vocab_size), "harma", settings))
    per_rank = lora_parameters_per_rank(settings, tokenizer.vocab_size)
    lora_rank = max(1, round(harma_params / per_rank))
    log(f"HarMA (reference layout) trains {harma_params:,} parameters; LoRA rank {lora_rank} "
        f"({lora_rank * per_rank:,} parameters) matches it")

    run = MethodRunner(settings, state, tokenizer.vocab_size, targets, lora_rank, source if forgetting else None)
    results: dict[str, Any] = {}
    grids: dict[str, Any] = {}
    # frozen and full first: in the known-vocabulary scenario they must show a real shift before
    # any adapter method is scored. Each method is seeded on its own, so the order changes nothing.
    for method in sorted(methods, key=lambda m: m not in ("frozen", "full")):
        per_seed, lr, grid = run.frozen() if method == "frozen" else run.trained(method)
        if grid is not None:
            grids[method] = grid
        summary = summarise(per_seed)
        params = per_seed[0]["trainable_params"]
        results[method] = {
            **summary,
            "step_seconds": 0.0,  # trained methods: replaced by the round-robin timing below
            "trainable_params": params,
            "trainable_percent_of_full": 100.0 * params / (full_params + 1),
            "lr": lr,
            "per_seed": per_seed,
        }
        if method in HARMA_METHODS:
            results[method]["config"] = settings.scaled_harma_config(harma_method_config(method)).to_dict()
        log(f"{method}: test mR {summary['mean_recall']:.1f} +- {summary['mean_recall_std']:.1f} "
            f"({params:,} trainable parameters)")
        if forgetting:
            log(f"{method}: source zero-shot acc1 {per_seed_mean(per_seed, 'source_zero_shot', 'acc1'):.1f}, "
                f"source test mR {per_seed_mean(per_seed, 'source_test', 'mean_recall'):.1f} (mean over seeds)")
        if method == "full" and scenario == "known-vocabulary" and settings.name != "smoke":
            require_real_shift(results)
    results = {method: results[method] for method in methods}

    trained = [method for method in methods if method != "frozen"]
    if trained:
        log(f"timing {settings.timing_rounds} round-robin rounds of {settings.timing_steps} steps per method")
        step_seconds = time_steps(trained, settings, state, tokenizer.vocab_size, targets[seeds[0]].train,
                                  lora_rank, settings.timing_rounds, settings.timing_steps)
        for method, seconds in step_seconds.items():
            results[method]["step_seconds"] = seconds

    results["_meta"] = {
        "mode": settings.name,
        "scenario": scenario,
        "vocabulary": vocabulary,
        "settings": dataclasses.asdict(settings) | {"embed_dim": settings.embed_dim},
        "harma_sizes": settings.harma_sizes(),
        "lora": {"rank": lora_rank, "alpha": 2 * lora_rank, "targets": lora_targets()},
        "lr_rule": (f"on seed {seeds[0]}, c and its two neighbours, c = {LR_CENTRE['full']:g} for full fine-tuning and "
                    f"{LR_CENTRE['harma']:g} for the others, extended along {list(LR_LADDER)} past an edge winner at "
                    f"most {settings.grid_extensions} times; best target validation mR wins"),
        "lr_grids": {method: grids[method] for method in methods if method in grids},
        "vocab_size": tokenizer.vocab_size,
        "full_params": full_params + 1,
        "pretrain": pretrain_info,
        "targets": check_targets(results),
        "shift": check_shift(results),
        "wall_seconds": round(time.perf_counter() - wall_start, 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
    }
    if forgetting:
        results["_meta"]["forgetting"] = forgetting_analysis(results)
    return results


def check_targets(results: dict[str, Any]) -> dict[str, Any]:
    """The targets of a HarMA layout: >= 90% of full fine-tuning's mR with <= 5% of its trainable
    parameters and >= 20 mR points above the frozen backbone; for ``harma_plus`` also at least
    LoRA's mR with no more parameters than LoRA."""
    if "full" not in results or "frozen" not in results:
        return {}
    full, frozen = results["full"], results["frozen"]
    out: dict[str, Any] = {}
    for method in HARMA_METHODS:
        if method not in results:
            continue
        mr = results[method]["mean_recall"]
        ratio = mr / full["mean_recall"] if full["mean_recall"] > 0 else float("inf")
        param_ratio = results[method]["trainable_params"] / full["trainable_params"]
        out[method] = {
            "mr_fraction_of_full": ratio,
            "param_fraction_of_full": param_ratio,
            "mr_above_frozen": mr - frozen["mean_recall"],
            "met": bool(ratio >= 0.9 and param_ratio <= 0.05 and mr - frozen["mean_recall"] >= 20.0),
        }
        if method == "harma_plus" and "lora" in results:
            lora = results["lora"]
            out[method]["mr_above_lora"] = mr - lora["mean_recall"]
            out[method]["params_at_most_lora"] = results[method]["trainable_params"] <= lora["trainable_params"]
    out["any_met"] = any(v["met"] for k, v in out.items() if isinstance(v, dict))
    return out


def require_real_shift(results: dict[str, Any]) -> None:
    """Stop before any adapter method is scored if the frozen backbone is too close to full
    fine-tuning (more than 60% of its mR): the scenario would not test adaptation.

    Raises:
        RuntimeError: the shift is too weak, with both figures.
    """
    shift = check_shift(results)
    if shift and not shift["real"]:
        raise RuntimeError(f"the domain shift is too weak: frozen reaches {100 * shift['frozen_fraction_of_full']:.0f}% "
                           f"of full fine-tuning's mR (at most 60% wanted); strengthen the image shift before "
                           f"scoring adapters")


def check_shift(results: dict[str, Any]) -> dict[str, Any]:
    """Whether the domain shift is real: the frozen backbone's mR at most 60% of full fine-tuning's."""
    if "full" not in results or "frozen" not in results or results["full"]["mean_recall"] <= 0:
        return {}
    fraction = results["frozen"]["mean_recall"] / results["full"]["mean_recall"]
    return {"frozen_fraction_of_full": fraction, "real": bool(fraction <= 0.6)}


# -------------------------------------------------------------------------------- forgetting

# The two forgetting measures: (per-seed entry, metric) of a run, and the trajectory key.
FORGETTING_MEASURES = {"source_acc1": ("source_zero_shot", "acc1"), "source_mean_recall": ("source_test", "mean_recall")}
# Below this frozen source accuracy (twice chance with 10 classes) the classification measure says nothing.
MIN_INFORMATIVE_ACC1 = 20.0


def per_seed_mean(per_seed: Sequence[dict[str, Any]], entry: str, key: str) -> float:
    return statistics.fmean(run[entry][key] for run in per_seed)


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def endpoint_forgetting(results: dict[str, Any]) -> dict[str, Any]:
    """Per method and seed, at the end of training: target test mR gain over the frozen
    backbone, and the forgetting of each measure (frozen minus the method, in points)."""
    frozen = {run["seed"]: run for run in results["frozen"]["per_seed"]}
    out: dict[str, Any] = {}
    for method in METHODS:
        if method not in results or "source_test" not in results[method]["per_seed"][0]:
            continue
        rows = []
        for run in results[method]["per_seed"]:
            reference = frozen[run["seed"]]
            row = {"seed": run["seed"], "target_gain": run["test"]["mean_recall"] - reference["test"]["mean_recall"],
                   "target_acc1": run["target_zero_shot"]["acc1"]}
            for measure, (entry, key) in FORGETTING_MEASURES.items():
                row[measure] = run[entry][key]
                row[f"{measure}_forgotten"] = reference[entry][key] - run[entry][key]
            rows.append(row)
        keys = [key for key in rows[0] if key != "seed"]
        out[method] = {"per_seed": rows, **{key: _mean_std([row[key] for row in rows]) for key in keys}}
    return out


def forgetting_at_gain(trajectory: Sequence[dict[str, float]], level: float, measure: str) -> float:
    """Forgetting of ``measure`` (step 0 minus the checkpoint) where the target validation gain
    over step 0 first reaches ``level``, interpolated linearly from the checkpoint before.

    Raises:
        ValueError: the trajectory never reaches ``level``.
    """
    gain_base, measure_base = trajectory[0]["target_val_mean_recall"], trajectory[0][measure]
    points = [(p["target_val_mean_recall"] - gain_base, measure_base - p[measure]) for p in trajectory]
    for (gain_before, forgot_before), (gain, forgot) in zip(points, points[1:], strict=False):
        if gain >= level:
            if gain == gain_before:
                return forgot
            return forgot_before + (level - gain_before) / (gain - gain_before) * (forgot - forgot_before)
    raise ValueError(f"the trajectory never reaches a target gain of {level}")


def max_gain(trajectory: Sequence[dict[str, float]]) -> float:
    base = trajectory[0]["target_val_mean_recall"]
    return max(p["target_val_mean_recall"] - base for p in trajectory)


def matched_comparison(adapter: dict[str, Any], full: dict[str, Any]) -> dict[str, Any]:
    """One seed: the highest target validation gain both runs reach, and each run's forgetting there."""
    trajectories = (adapter.get("trajectory") or [], full.get("trajectory") or [])
    if any(not t or t[0]["step"] != 0 for t in trajectories):
        return {"seed": adapter["seed"], "failed": "no trajectory"}
    level = min(max_gain(t) for t in trajectories)
    if level <= 0:
        return {"seed": adapter["seed"], "level": level,
                "failed": "a method never improves the target validation mR (or diverged)"}
    row: dict[str, Any] = {"seed": adapter["seed"], "level": level}
    for measure in FORGETTING_MEASURES:
        method_value, full_value = (forgetting_at_gain(t, level, measure) for t in trajectories)
        row[measure] = {"method": method_value, "full": full_value, "difference": method_value - full_value}
    return row


def verdict(differences: Sequence[float | None]) -> str:
    """The protocol's rule: lower (higher) forgetting than full fine-tuning on every seed."""
    if not differences or any(d is None for d in differences):
        return "undecided (a seed failed)"
    if all(d < 0 for d in differences):
        return "forgets less"
    if all(d > 0 for d in differences):
        return "forgets more"
    return "no consistent difference"


def _verdicts(rows: Sequence[dict[str, Any]], difference: Callable[[dict[str, Any], str], float | None]) -> dict:
    out = {}
    for measure in FORGETTING_MEASURES:
        differences = [difference(row, measure) for row in rows]
        known = [d for d in differences if d is not None]
        out[measure] = {"verdict": verdict(differences), "differences": differences,
                        **({"difference": _mean_std(known)} if known else {})}
    return out


def forgetting_analysis(results: dict[str, Any]) -> dict[str, Any]:
    """End points, the comparison of every other trained method with full fine-tuning at the
    same target gain (per seed, and the verdicts), and the sanity condition of the protocol."""
    if "frozen" not in results or "source_test" not in results["frozen"]["per_seed"][0]:
        return {}
    endpoints = endpoint_forgetting(results)
    frozen_acc1 = endpoints["frozen"]["source_acc1"]["mean"]
    analysis: dict[str, Any] = {
        "endpoints": endpoints,
        "frozen_source_acc1": frozen_acc1,
        "acc1_informative": frozen_acc1 >= MIN_INFORMATIVE_ACC1,
        "matched": {},
        "endpoint_verdicts": {},
    }
    if "full" not in endpoints:
        return analysis
    full_runs = {run["seed"]: run for run in results["full"]["per_seed"]}
    full_rows = {row["seed"]: row for row in endpoints["full"]["per_seed"]}
    for method in endpoints:
        if method in ("frozen", "full"):
            continue
        rows = [matched_comparison(run, full_runs[run["seed"]]) for run in results[method]["per_seed"]]
        analysis["matched"][method] = {
            "per_seed": rows,
            "verdicts": _verdicts(rows, lambda row, m: None if "failed" in row else row[m]["difference"]),
        }
        analysis["endpoint_verdicts"][method] = _verdicts(
            endpoints[method]["per_seed"],
            lambda row, m: row[f"{m}_forgotten"] - full_rows[row["seed"]][f"{m}_forgotten"],
        )
    return analysis


# ------------------------------------------------------------------------------------ output

LABELS = {
    "frozen": "frozen (zero-shot)", "harma": "HarMA (reference)", "harma_paper": "HarMA (paper)",
    "harma_plus": "HarMA plus",
    "lora": "LoRA", "linear_probe": "linear probe", "full": "full fine-tuning",
}


def markdown_table(results: dict[str, Any]) -> str:
    meta = results.get("_meta", {})
    full_params = meta.get("full_params") or 1
    # mR comes right after the method: a 12-column table is wider than a docs page, and the
    # columns that scroll out of view should be the details.
    lines = [
        "| method | mR (mean ± std) | trainable params | % of full | lr | i2t R@1 | i2t R@5 | i2t R@10 "
        "| t2i R@1 | t2i R@5 | t2i R@10 | step ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method in METHODS:
        if method not in results:
            continue
        r = results[method]
        lr = "-" if r["lr"] is None else f"{r['lr']:.0e}"
        step = "-" if method == "frozen" else f"{1000 * r['step_seconds']:.0f}"
        recalls = " | ".join(f"{r[key]:.1f}" for key in METRIC_KEYS[:6])
        lines.append(
            f"| {LABELS[method]} | **{r['mean_recall']:.1f}** ± {r['mean_recall_std']:.1f} "
            f"| {r['trainable_params']:,} | {100 * r['trainable_params'] / full_params:.2f} "
            f"| {lr} | {recalls} | {step} |"
        )
    return "\n".join(lines) + "\n"


def summary_text(results: dict[str, Any]) -> str:
    meta = results["_meta"]
    pre = meta["pretrain"]
    lines = [
        f"Mode `{meta['mode']}`, scenario `{meta.get('scenario', 'new-vocabulary')}`, seeds "
        f"{meta['settings']['seeds']}, {meta['threads']} threads, wall time {meta['wall_seconds']:.0f} s.",
        f"Pretrained backbone: {meta['full_params']:,} trainable parameters in full training "
        f"(incl. the loss temperature); source-domain test mR {pre['source_test']['mean_recall']:.1f} "
        f"after {pre['steps']} steps.",
        f"LoRA: rank {meta['lora']['rank']}, alpha {meta['lora']['alpha']}, targets {meta['lora']['targets']}.",
        f"Learning rate rule: {meta['lr_rule']}.",
    ]
    for method, grid in meta["lr_grids"].items():
        points = ", ".join(f"{g['lr']:.0e}: {g['val_mean_recall']:.1f}" for g in grid)
        lines.append(f"- {method}: val mR by lr {{{points}}}")
    for method, check in meta["targets"].items():
        if isinstance(check, dict):
            versus_lora = (f"; {check['mr_above_lora']:+.1f} mR over LoRA with "
                           f"{'no more' if check['params_at_most_lora'] else 'MORE'} parameters"
                           if "mr_above_lora" in check else "")
            lines.append(
                f"Target check {method}: {100 * check['mr_fraction_of_full']:.0f}% of full fine-tuning's mR "
                f"(need >= 90%), {100 * check['param_fraction_of_full']:.2f}% of its parameters (need <= 5%), "
                f"{check['mr_above_frozen']:+.1f} mR over frozen (need >= +20): "
                f"{'met' if check['met'] else 'NOT met'}{versus_lora}"
            )
    shift = meta.get("shift") or {}
    if shift:
        lines.append(f"Shift check: frozen reaches {100 * shift['frozen_fraction_of_full']:.0f}% of full fine-tuning's "
                     f"mR (need <= 60%): {'real' if shift['real'] else 'TOO WEAK'}")
    return "\n".join(lines) + "\n"


def markdown_page(results: dict[str, Any]) -> str:
    """The results page written next to the JSON: a title of its own, the table, and the
    summary's facts as lists under headings (one run-on paragraph otherwise)."""
    meta = results["_meta"]
    scenario = meta.get("scenario", "new-vocabulary").replace("-", " ")
    methods = [LABELS[method] for method in METHODS if method in results]
    only = f" ({', '.join(methods)})" if len(methods) < 3 else ""
    lines = summary_text(results).splitlines()
    grids = [line for line in lines if line.startswith("- ")]
    checks = [line for line in lines if line.startswith(("Target check", "Shift check"))]
    settings = [line for line in lines if line not in grids and line not in checks]
    forgetting = ", with forgetting" if meta.get("forgetting") else ""
    parts = [
        f"# Transfer benchmark: {scenario}, {meta['mode']} mode{only}{forgetting}",
        "Raw results of `benchmarks/transfer.py` (target-domain test split, mean ± std over "
        "seeds); how to read them: [the transfer benchmark](transfer_benchmark.md).",
        markdown_table(results).rstrip("\n"),
        "## Settings\n\n" + "\n".join(f"- {line}" for line in settings),
        "## Validation mR of each learning rate (seed 0)\n\n" + "\n".join(grids),
    ]
    if checks:
        parts.append("## Checks\n\n" + "\n".join(f"- {line}" for line in checks))
    if meta.get("forgetting"):
        parts.append("## Forgetting (source domain)\n\n" + forgetting_markdown(results).rstrip("\n"))
    return "\n\n".join(parts) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = results["_meta"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    colours = {"harma": "tab:red", "harma_paper": "tab:orange", "harma_plus": "tab:purple", "lora": "tab:blue",
               "linear_probe": "tab:green", "full": "black"}
    for method, colour in colours.items():
        if method not in results:
            continue
        r = results[method]
        ax.errorbar([r["trainable_params"]], [r["mean_recall"]], yerr=[r["mean_recall_std"]], fmt="o",
                    color=colour, capsize=4, markersize=7, label=LABELS[method])
        # The two HarMA layouts have the same parameter count: their labels go on opposite sides.
        left = method == "harma_paper"
        ax.annotate(f"{r['mean_recall']:.1f}", (r["trainable_params"], r["mean_recall"]),
                    textcoords="offset points", xytext=(-7 if left else 7, -3), fontsize=8, color=colour,
                    ha="right" if left else "left")
    if "frozen" in results:
        frozen = results["frozen"]
        ax.axhline(frozen["mean_recall"], color="grey", linestyle="--", label=LABELS["frozen"])
        ax.axhspan(frozen["mean_recall"] - frozen["mean_recall_std"],
                   frozen["mean_recall"] + frozen["mean_recall_std"], color="grey", alpha=0.15)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("target test mR (%)")
    n_seeds = len(meta["settings"]["seeds"])
    ax.set_title(f"Synthetic source -> target transfer, {meta.get('scenario', 'new-vocabulary')} "
                 f"({meta['mode']} mode, {n_seeds} seeds, mean ± std)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _pm(stats: dict[str, float], signed: bool = False) -> str:
    return f"{stats['mean']:{'+' if signed else ''}.1f} ± {stats['std']:.1f}"


def forgetting_markdown(results: dict[str, Any]) -> str:
    """The forgetting tables: end points, the matched-gain comparisons per seed, the verdicts."""
    analysis = results["_meta"].get("forgetting") or {}
    if not analysis:
        return ""
    endpoints = analysis["endpoints"]
    frozen = endpoints["frozen"]
    lines = [
        "Forgetting (source domain; mean ± std over seeds, end of training at the chosen learning rate). "
        f"Frozen backbone: source zero-shot acc1 {frozen['source_acc1']['mean']:.1f} (chance 10.0; "
        f"{'informative' if analysis['acc1_informative'] else 'NOT informative: below 20'}), "
        f"source test mR {frozen['source_mean_recall']['mean']:.1f}. Forgotten = frozen minus the method "
        "(negative: gained).",
        "",
        "| method | target test mR gain | source acc1 | forgotten (acc1) | source mR | forgotten (mR) | target acc1 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for method, row in endpoints.items():
        lines.append(
            f"| {LABELS[method]} | {_pm(row['target_gain'], True)} | {_pm(row['source_acc1'])} "
            f"| {_pm(row['source_acc1_forgotten'], True)} | {_pm(row['source_mean_recall'])} "
            f"| {_pm(row['source_mean_recall_forgotten'], True)} | {_pm(row['target_acc1'])} |"
        )
    if analysis["matched"]:
        lines += ["", "At the same target gain (target validation mR over step 0; forgetting of the method / of full "
                  "fine-tuning where both first reach it):", "",
                  "| method | seed | matched gain | forgotten acc1: method / full | forgotten mR: method / full |",
                  "|---|---:|---:|---:|---:|"]
        for method, matched in analysis["matched"].items():
            for row in matched["per_seed"]:
                if "failed" in row:
                    lines.append(f"| {LABELS[method]} | {row['seed']} | - | failed: {row['failed']} | |")
                    continue
                cells = [f"{row[m]['method']:+.1f} / {row[m]['full']:+.1f}" for m in FORGETTING_MEASURES]
                lines.append(f"| {LABELS[method]} | {row['seed']} | {row['level']:.1f} | {cells[0]} | {cells[1]} |")
        lines += ["", "Verdicts (the protocol's rule: lower forgetting than full fine-tuning on every seed; "
                  "difference = method minus full, mean ± std):", "",
                  "| method | at the same gain: acc1 | at the same gain: mR | end points: acc1 | end points: mR |",
                  "|---|---|---|---|---|"]
        for method, matched in analysis["matched"].items():
            cells = [_verdict_cell(block[m]) for block in (matched["verdicts"], analysis["endpoint_verdicts"][method])
                     for m in FORGETTING_MEASURES]
            lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _verdict_cell(entry: dict[str, Any]) -> str:
    if "difference" not in entry:
        return entry["verdict"]
    return f"{entry['verdict']} ({_pm(entry['difference'], True)})"


def plot_forgetting(results: dict[str, Any], path: Path) -> None:
    """Forgetting against target gain along every run (chosen learning rate, each seed): one
    panel per forgetting measure, one colour per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"harma": "tab:red", "harma_paper": "tab:orange", "harma_plus": "tab:purple", "lora": "tab:blue",
               "linear_probe": "tab:green", "full": "black"}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), dpi=120)
    titles = {"source_acc1": "source zero-shot acc1 forgotten (points)",
              "source_mean_recall": "source retrieval mR forgotten (points)"}
    for ax, measure in zip(axes, FORGETTING_MEASURES, strict=True):
        for method, colour in colours.items():
            if method not in results or "trajectory" not in results[method]["per_seed"][0]:
                continue
            for index, run in enumerate(results[method]["per_seed"]):
                trajectory = run["trajectory"]
                gain_base, base = trajectory[0]["target_val_mean_recall"], trajectory[0][measure]
                ax.plot([p["target_val_mean_recall"] - gain_base for p in trajectory],
                        [base - p[measure] for p in trajectory], marker=".", color=colour, alpha=0.7,
                        label=LABELS[method] if index == 0 else None)
        ax.axhline(0.0, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("target validation mR gain over the frozen backbone (points)")
        ax.set_title(titles[measure], fontsize=9)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    meta = results["_meta"]
    fig.suptitle(f"Forgetting along adaptation, {meta.get('scenario')} ({meta['mode']} mode, one line per seed; "
                 "points every tenth of the steps)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def merge_results(earlier: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``earlier`` with the methods of ``new`` added or replaced, its targets and shift checks
    recomputed. Both runs must have the same mode, scenario, settings and pretrained backbone.

    Raises:
        ValueError: the runs differ in any of those (named).
    """
    # Compare as stored: a run in memory holds tuples where its JSON file holds lists.
    earlier, new = (json.loads(json.dumps(json_safe(run))) for run in (earlier, new))
    old_meta, new_meta = earlier["_meta"], new["_meta"]
    for key in ("mode", "settings", "vocab_size", "full_params", "lora"):
        if old_meta.get(key) != new_meta.get(key):
            raise ValueError(f"cannot merge runs that differ in {key}: {old_meta.get(key)!r} vs {new_meta.get(key)!r}")
    if old_meta.get("scenario", "new-vocabulary") != new_meta["scenario"]:
        raise ValueError(f"cannot merge a {new_meta['scenario']} run into a {old_meta.get('scenario')} run")
    if old_meta["pretrain"]["source_test"] != new_meta["pretrain"]["source_test"]:
        raise ValueError("cannot merge runs whose pretrained backbones differ (source test metrics differ)")
    methods = [m for m in METHODS if m in earlier or m in new]
    merged = {method: new.get(method, earlier.get(method)) for method in methods}
    merged["_meta"] = dict(old_meta)
    merged["_meta"]["lr_grids"] = {**old_meta["lr_grids"], **new_meta["lr_grids"]}
    merged["_meta"]["targets"] = check_targets(merged)
    merged["_meta"]["shift"] = check_shift(merged)
    if "forgetting" in old_meta or "forgetting" in new_meta:
        merged["_meta"]["forgetting"] = forgetting_analysis(merged)
    merged["_meta"]["merged_runs"] = old_meta.get("merged_runs", []) + [
        {"methods": [m for m in new if not m.startswith("_")], "wall_seconds": new_meta["wall_seconds"],
         "threads": new_meta["threads"], "torch": new_meta["torch"]}]
    return merged


def write_json(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(results), indent=1) + "\n", encoding="utf-8")


def json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the 10-12-minute CPU setting (3 seeds)")
    mode.add_argument("--smoke", action="store_true", help="tiny sizes, 1 seed, a few steps (seconds)")
    parser.add_argument("--json", type=Path, help="write the results here (and a .md table next to it)")
    parser.add_argument("--plot", default=None,
                        help=f"PNG of mR against trainable parameters; default {DEFAULT_PLOT.relative_to(REPO_ROOT)} "
                             "except in --smoke mode; 'none' to skip")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the mode's seeds")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--scenario", choices=SCENARIOS, default="new-vocabulary",
                        help="new-vocabulary: target words unseen in pretraining (default); known-vocabulary: "
                             "every target word occurs in pretraining, the shift is in images and word usage")
    parser.add_argument("--adapt-steps", type=int, help="override the mode's adaptation steps (every method)")
    parser.add_argument("--pretrain-steps", type=int, help="override the mode's pretraining steps")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads; default: 2, or 1 when the machine is already busy "
                             "(1-minute load average >= 1), where a second thread mostly waits")
    parser.add_argument("--merge-into", type=Path, metavar="JSON",
                        help="add the methods of this run to an earlier run's results (same mode, scenario, seeds "
                             "and settings) and write the union with --json")
    parser.add_argument("--combine", type=Path, nargs="+", metavar="JSON",
                        help="run nothing: merge these results files (as --merge-into does, first to last) "
                             "and write the union with --json")
    parser.add_argument("--data-dir", type=Path, help="where to write the synthetic data (default: a temporary folder)")
    parser.add_argument("--forgetting", action="store_true",
                        help="also measure what adaptation forgets of the source domain (zero-shot classification, "
                             "retrieval) along every run, and compare with full fine-tuning at the same target gain")
    parser.add_argument("--forgetting-plot", type=Path, metavar="PNG",
                        help="with --forgetting: plot forgetting against target gain along every run")
    args = parser.parse_args(argv)

    settings = MODES["quick" if args.quick else "smoke" if args.smoke else "standard"]
    if args.seeds:
        settings = dataclasses.replace(settings, seeds=tuple(args.seeds))
    if args.adapt_steps:
        settings = dataclasses.replace(settings, adapt_steps=args.adapt_steps)
    if args.pretrain_steps:
        settings = dataclasses.replace(settings, pretrain_steps=args.pretrain_steps)
    threads = args.threads
    if threads is None:
        threads = 2 if not hasattr(os, "getloadavg") or os.getloadavg()[0] < 1.0 else 1
    torch.set_num_threads(threads)
    methods = [m for m in METHODS if m in args.methods]

    if args.combine:
        runs = [json.loads(path.read_text(encoding="utf-8")) for path in args.combine]
        results = functools.reduce(merge_results, runs)
    elif args.data_dir is not None:
        args.data_dir.mkdir(parents=True, exist_ok=True)
        results = run_benchmark(settings, args.data_dir, methods, args.scenario, args.forgetting)
    else:
        with tempfile.TemporaryDirectory(prefix="harma-transfer-") as tmp:
            results = run_benchmark(settings, Path(tmp), methods, args.scenario, args.forgetting)

    if args.merge_into is not None:
        if args.json is not None:  # this run's own results survive a refused merge
            write_json(args.json.with_name(args.json.stem + "_run.json"), results)
        results = merge_results(json.loads(args.merge_into.read_text(encoding="utf-8")), results)
    table = markdown_table(results)
    summary = summary_text(results) + ("\n" + forgetting_markdown(results) if results["_meta"].get("forgetting") else "")
    print()
    print(table)
    print(summary)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.json, results)
        args.json.with_suffix(".md").write_text(markdown_page(results), encoding="utf-8")
        log(f"wrote {args.json} and {args.json.with_suffix('.md')}")
    plot_path = args.plot if args.plot is not None else (None if args.smoke else str(DEFAULT_PLOT))
    if plot_path and plot_path.lower() != "none":
        plot(results, Path(plot_path))
        log(f"wrote {plot_path}")
    if args.forgetting_plot is not None and results["_meta"].get("forgetting"):
        plot_forgetting(results, args.forgetting_plot)
        log(f"wrote {args.forgetting_plot}")
    return results


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
