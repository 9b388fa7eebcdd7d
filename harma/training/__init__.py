"""The application built on the harma core: training runs, their command line, datasets,
backbones, result pictures and synthetic data.

The core (`harma`) never imports this package. What is here:

- `harma.training.config`: the recipe, `TrainConfig`;
- `harma.training.trainer`: the run, `Trainer` and `train`;
- `harma.training.cli`: the command line of the example scripts (`main`, `parse_args`);
- `harma.training.options`: what every command line shares (checked option values, the
  `error:` line and exit status 2, the caption-format options);
- `harma.training.model_options`: the model options of the command lines that run a trained
  model (evaluation, archive search);
- `harma.training.state`: the files of a run folder and the resume state;
- `harma.training.weights`: the weight files a run writes (`save_trained_weights`,
  `load_trained_weights`);
- `harma.training.optim`: AdamW groups and the learning-rate schedule;
- `harma.training.models`: open_clip backbones and tokenizers;
- `harma.training.data`: RSITMD/RSICD annotation files, datasets and transforms;
- `harma.training.classification_data`: classification sets (class folders, CSV, prefixed files);
- `harma.training.zero_shot`: several zero-shot classification sets evaluated together;
- `harma.training.monitor`: the zero-shot and extra retrieval sets a run follows while training
  (what adaptation forgets);
- `harma.training.clip_benchmark`: the loader that lets LAION's CLIP_benchmark evaluate harma models;
- `harma.training.captions`: caption datasets of every format in one form
  (`read_caption_dataset`);
- `harma.training.data`: the retrieval datasets built on them, and transforms;
- `harma.training.report`: retrieval metrics as text and tables;
- `harma.training.gallery`, `harma.training.gallery_render`, `harma.training.curves`: pictures;
- `harma.training.synthetic`: generated datasets for the demo and the benchmarks;
- `harma.training.demo`: the CPU demo, run as ``python -m harma.training.demo``.
"""

from .cli import main, parse_args
from .config import METHODS, PRECISIONS, RESUMABLE_CHANGES, TrainConfig
from .models import build_backbone, build_model, build_tokenizer, load_backbone_weights
from .optim import LinearWarmupDecay, build_optimizer, parameter_groups
from .report import format_metrics_table
from .trainer import Trainer, apply_precision, train
from .weights import load_trained_weights, save_trained_weights

__all__ = [
    "METHODS",
    "PRECISIONS",
    "RESUMABLE_CHANGES",
    "LinearWarmupDecay",
    "TrainConfig",
    "Trainer",
    "apply_precision",
    "build_backbone",
    "build_model",
    "build_optimizer",
    "build_tokenizer",
    "format_metrics_table",
    "load_backbone_weights",
    "load_trained_weights",
    "main",
    "parameter_groups",
    "parse_args",
    "save_trained_weights",
    "train",
]
