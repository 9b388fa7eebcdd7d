"""Evaluate image-text retrieval (R@1/5/10 both ways and mean recall) on a test split.

A finished training run (its config.json names the backbone and the splits):

    python examples/evaluate.py --run runs/rsitmd_geo                  # best.safetensors on test
    python examples/evaluate.py --run runs/rsitmd_geo --checkpoint last --split val

A backbone plus an adapter file (any file harma.training wrote: HarMA, LoRA or full):

    python examples/evaluate.py --model ViT-B-32-quickgelu --pretrained RS5M_ViT-B-32_RET-2.pt \
        --adapters runs/rsitmd_geo/best.safetensors \
        --annotation data/rsitmd/rsitmd_test.json --image_root data/rsitmd/images

Several HarMA adapter files on one backbone, each under a name (the backbone is built and the
split read once; each named set is evaluated in turn, one table row per name):

    python examples/evaluate.py --run runs/rsicd_geo \
        --adapters rsitmd=runs/rsitmd_geo/best.safetensors --adapters rsicd=runs/rsicd_geo/best.safetensors

A checkpoint released by the HarMA authors (it holds the backbone too):

    python examples/evaluate.py --model ViT-B-32-quickgelu \
        --official-checkpoint harma_rsitmd_georsclip_mr523.pth \
        --annotation data/rsitmd/rsitmd_test.json --image_root data/rsitmd/images

Any caption format harma reads (docs/data.md: the RSITMD/RSICD layout, Karpathy dataset_*.json,
NWPU-Captions, open_clip CSV/TSV, a saved Hugging Face dataset); --split picks the split of a file
that holds several (default test), --format names the format where it cannot be detected:

    python examples/evaluate.py --model ViT-B-32 --pretrained laion2b_s34b_b79k \
        --annotation data/ucm/dataset_ucm.json --image_root data/ucm/imgs --split test
    python examples/evaluate.py --model ViT-B-32 --pretrained laion2b_s34b_b79k \
        --annotation test.csv --csv-separator , --csv-img-key path --csv-caption-key text

Without --adapters or --official-checkpoint the plain backbone is evaluated (zero-shot).
--json prints the metrics as one JSON object instead of a table ({name: metrics} for named
adapters).

Zero-shot scene classification of class-per-folder trees, CSV files (filepath,label +
classnames.txt) or class-prefixed image files, with or without retrieval; one table (or one
JSON object with a "zero_shot" entry) covers every set:

    python examples/evaluate.py --model ViT-B-32-quickgelu --pretrained RS5M_ViT-B-32_RET-2.pt \
        --zero-shot data/AID --zero-shot data/NWPU-RESISC45 --templates remote_sensing \
        --class-names names.json --zero-shot-output results/

--gallery FILE also writes what the model retrieved for a few sample queries, with the correct
results marked: a self-contained HTML page (FILE.html) or a PNG contact sheet (FILE.png); give it
twice for both. The same embeddings serve the metrics and the gallery:

    python examples/evaluate.py --run runs/rsitmd_geo --gallery gallery.html --gallery gallery.png \
        --gallery-queries 12 --gallery-seed 1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

import harma
from harma.retrieval import RetrievalEvaluator, retrieval_metrics_from_embeddings
from harma.training import TrainConfig, apply_precision, format_metrics_table
from harma.training.captions import CaptionDataset, read_caption_dataset
from harma.training.data import ImageReadError, RetrievalEvalDataset, read_run_split, test_transform
from harma.training.gallery import GALLERY_SUFFIXES, build_gallery_from_embeddings
from harma.training.gallery_render import write_gallery
from harma.training.model_options import (
    add_model_arguments,
    add_runtime_arguments,
    load_adapter_weights,
    parse_adapters,
    resolve_image_size,
)
from harma.training.models import build_backbone, build_tokenizer
from harma.training.options import BAD_INPUT as COMMAND_LINE_BAD_INPUT
from harma.training.options import (
    add_caption_arguments,
    caption_reader_options,
    errors_named,
    exit_on_bad_input,
    integer_at_least,
    resolve_device,
)
from harma.training.state import check_writable_folder
from harma.training.zero_shot import ZeroShotSuite, format_zero_shot_table

BAD_INPUT = (*COMMAND_LINE_BAD_INPUT, KeyError, TypeError)
"""Errors that are the user's to fix: one ``error:`` line and exit status 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Evaluate retrieval R@1/5/10 and mean recall of a CLIP with HarMA adapters.",
        allow_abbrev=False,
    )
    parser.add_argument("--run", help="a training output folder: backbone, splits and checkpoint from it")
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best",
                        help="with --run: which saved weights (default best, chosen on validation)")
    add_model_arguments(parser)  # --adapters NAME=PATH, repeated: each named set is evaluated in turn
    parser.add_argument("--official-checkpoint", dest="official_checkpoint",
                        help="a checkpoint of the authors' implementation (checkpoint_best.pth)")
    parser.add_argument("--annotation", help="annotation file of any caption format (docs/data.md), or a folder "
                        "written by a Hugging Face dataset's save_to_disk")
    parser.add_argument("--image_root", help="folder the annotation image paths are relative to")
    add_caption_arguments(parser, split_default="test", split_help="which split: of --run (val, test), or of an "
                          "--annotation file holding several")
    add_runtime_arguments(parser)
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None,
                        help="autocast dtype on CUDA (default: with --run the run's precision and TF32, else fp32)")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    gallery = parser.add_argument_group("gallery: what the model retrieved for sample queries")
    gallery.add_argument("--gallery", action="append", default=[], metavar="FILE",
                         help="write a gallery: FILE.html (self-contained page) or FILE.png (contact "
                         "sheet); repeat for both")
    gallery.add_argument("--gallery-queries", dest="gallery_queries", type=int, default=8, metavar="N",
                         help="sample captions and sample images shown (each; default 8)")
    gallery.add_argument("--gallery-top-k", dest="gallery_top_k", type=int, default=5, metavar="K",
                         help="results shown per query (default 5)")
    gallery.add_argument("--gallery-seed", dest="gallery_seed", type=integer_at_least(0), default=0,
                         help="seed of the sample of queries (default 0)")
    zero_shot = parser.add_argument_group("zero-shot scene classification")
    zero_shot.add_argument("--zero-shot", dest="zero_shot", action="append", default=[], metavar="ROOT",
                           help="a classification set: class folders, a CSV of filepath,label with "
                           "classnames.txt (or a folder holding it), or class-prefixed files; repeatable")
    zero_shot.add_argument("--templates", default="satellite", metavar="NAME|FILE",
                           help="prompt templates: satellite (default), skyscript, remote_sensing, or a text "
                           "file of templates with {}")
    zero_shot.add_argument("--class-names", dest="class_names", metavar="FILE",
                           help="class-name overrides: JSON {\"name in the data\": \"name to use\"}, or one "
                           "name per line in class order")
    zero_shot.add_argument("--class-prompts", dest="class_prompts", metavar="FILE",
                           help='JSON {"class": ["prompt", ...]}: own prompts for some classes')
    zero_shot.add_argument("--prompt-combine", dest="prompt_combine", choices=("normalized_mean", "raw_mean"),
                           default="normalized_mean",
                           help="mean of normalised prompt embeddings (CLIP, default) or of raw ones (GeoRSCLIP)")
    zero_shot.add_argument("--zero-shot-output", dest="zero_shot_output", metavar="DIR",
                           help="write per set: a CLIP_benchmark result JSON, a per-class table and a "
                           "confusion matrix PNG")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.adapters = parse_adapters(args.adapters)
    except ValueError as error:
        parser.error(str(error))
    if args.adapters and args.official_checkpoint:
        parser.error("give --adapters or --official-checkpoint, not both")
    if isinstance(args.adapters, dict) and len(args.adapters) > 1 and args.gallery:
        parser.error("--gallery shows one model: give it with one --adapters file, not several")
    for path in args.gallery:
        if Path(path).suffix.lower() not in GALLERY_SUFFIXES:
            parser.error(f"--gallery {path}: the file name must end in one of {', '.join(GALLERY_SUFFIXES)}")
        try:  # checked before the evaluation, not after it
            check_writable_folder(Path(path).parent, "the folder")
        except OSError as error:
            parser.error(f"--gallery {path}: {error}")
    if args.zero_shot_output:
        try:  # checked before the evaluation, not after it
            check_writable_folder(Path(args.zero_shot_output), "the folder")
        except OSError as error:
            parser.error(f"--zero-shot-output {args.zero_shot_output}: {error}")
    if args.gallery_queries < 1 or args.gallery_top_k < 1:
        parser.error("--gallery-queries and --gallery-top-k must be at least 1")
    if args.run is None:
        required = ("model",) if args.zero_shot and args.annotation is None else ("model", "annotation")
        missing = [name for name in required if getattr(args, name) is None]
        if missing:
            parser.error(f"without --run, give {', '.join('--' + name for name in missing)}")
        if args.annotation is None and args.gallery:
            parser.error("--gallery shows retrieval: give --annotation and --image_root")
    return args


def resolve(args: argparse.Namespace) -> dict:
    """Backbone, weights and split to evaluate, from --run and/or the explicit options.

    ``weights`` is None, one file path (any file harma.training wrote) or ``{name: path}`` of
    HarMA adapter files.
    """
    setup = {
        "model": args.model, "pretrained": args.pretrained, "model_config": args.model_config,
        "image_size": args.image_size, "annotation": args.annotation, "image_root": args.image_root,
        "weights": args.adapters, "precision": args.precision, "tf32": None,
    }
    if args.run:
        run = Path(args.run)
        config = TrainConfig.from_json_file(run / "config.json")
        if args.annotation is None and args.split == "train":
            raise ValueError("--run evaluates the run's val or test split; pass --annotation for a training file")
        split_file = config.test_file if args.split == "test" else config.val_file
        held_out = args.split == "val" and config.val_fraction
        if args.annotation is None and split_file is None and not held_out:
            raise ValueError(f"the run's config.json has no {args.split}_file; pass --annotation")
        from_run = {
            "model": config.model, "pretrained": config.pretrained, "model_config": config.model_config,
            "image_size": config.image_size, "annotation": split_file, "image_root": config.image_root,
            "weights": str(run / f"{args.checkpoint}.safetensors"),
            "precision": config.precision, "tf32": config.tf32,
        }
        setup = {key: setup[key] if setup[key] is not None else value for key, value in from_run.items()}
        setup["run_config"] = config
    if args.official_checkpoint and args.pretrained is None:
        setup["pretrained"] = None  # the released checkpoints hold the whole backbone
    return setup


def image_size_of(setup: dict) -> int:
    return resolve_image_size(setup["model"], setup["model_config"], setup["image_size"])


def read_split(args: argparse.Namespace, setup: dict) -> CaptionDataset:
    """The split to evaluate: --annotation's, or the run's (a held-out validation split is held
    out again, the same images)."""
    if args.annotation is None and "run_config" in setup:
        return read_run_split(setup["run_config"], args.split)
    return read_caption_dataset(setup["annotation"], image_root=setup["image_root"], **caption_reader_options(args))


def build_split_and_backbone(args: argparse.Namespace, setup: dict) -> tuple[RetrievalEvalDataset | None, nn.Module]:
    """The evaluation split (None when only zero-shot sets are evaluated), then the backbone (the
    split first: a wrong image root fails before the model is built)."""
    image_size = image_size_of(setup)
    dataset = None
    if setup["annotation"] is not None or "run_config" in setup:
        dataset = RetrievalEvalDataset(read_split(args, setup), transform=test_transform(image_size))
        setup["annotation"], setup["split_name"] = dataset.caption_dataset.source, dataset.caption_dataset.name
    if args.run and setup["pretrained"] is None:
        # A run from random initialisation built its backbone right after seeding.
        torch.manual_seed(TrainConfig.from_json_file(Path(args.run) / "config.json").seed)
    model = build_backbone(setup["model"], setup["pretrained"], setup["model_config"], image_size)
    return dataset, model


def load_weights(args: argparse.Namespace, setup: dict, model: nn.Module) -> tuple[nn.Module, str]:
    """``model`` with what was asked loaded into it, and a description of that source."""
    weights = setup["weights"]
    if args.official_checkpoint:
        with errors_named(f"--official-checkpoint {args.official_checkpoint}"):
            report = harma.load_official_checkpoint(model, args.official_checkpoint)
        return model, f"official checkpoint {args.official_checkpoint} (temperature {report.temperature})"
    model = load_adapter_weights(model, weights)
    if isinstance(weights, dict):
        return model, "adapters " + ", ".join(f"{name}={path}" for name, path in weights.items())
    return model, f"weights {weights}" if weights else "backbone only (zero-shot)"


def encoding_options(args: argparse.Namespace, setup: dict) -> dict:
    """Device, autocast dtype, batch size, workers and progress bars of every evaluator."""
    device = resolve_device(args.device)
    # The run's settings, so that its embeddings are computed as the run computed them.
    autocast = apply_precision(setup["precision"] or "fp32", setup["tf32"], device)
    return {"batch_size": args.batch_size, "num_workers": args.num_workers, "device": device,
            "autocast_dtype": autocast, "progress": not args.json}


def build_evaluator(args: argparse.Namespace, setup: dict, dataset: RetrievalEvalDataset | None,
                    model: nn.Module) -> tuple[RetrievalEvaluator | None, nn.Module]:
    """The evaluator of the split (None without one), and ``model`` moved to the device in eval
    mode."""
    options = encoding_options(args, setup)
    evaluator = None if dataset is None else RetrievalEvaluator.from_dataset(
        dataset, build_tokenizer(setup["model"], setup["model_config"]), **options
    )
    return evaluator, model.to(options["device"]).eval()


def build_zero_shot(args: argparse.Namespace, setup: dict) -> ZeroShotSuite | None:
    """The --zero-shot sets and their evaluators (None without any), read before the model."""
    if not args.zero_shot:
        return None
    return ZeroShotSuite(
        args.zero_shot, test_transform(image_size_of(setup)), build_tokenizer(setup["model"], setup["model_config"]),
        templates=args.templates, class_names=args.class_names, class_prompts=args.class_prompts,
        combine=args.prompt_combine, **encoding_options(args, setup),
    )


def evaluate_zero_shot(suite: ZeroShotSuite, model: nn.Module) -> dict:
    """Each set's result; an unreadable image ends the command with one error line naming it."""
    try:
        return suite.evaluate(model)
    except ImageReadError as error:
        print(f"error: {ImageReadError.without_worker_traceback(error)}", file=sys.stderr)
        raise SystemExit(2) from None


def report_zero_shot(args: argparse.Namespace, setup: dict, suite: ZeroShotSuite, source: str, rows: dict,
                     zero_shot: dict, named: bool) -> None:
    """Print retrieval (if any) and zero-shot results: one JSON object or tables; write files."""
    if args.zero_shot_output:
        pretrained = Path(setup["pretrained"]).name if setup["pretrained"] else "random"
        suite.write_files(args.zero_shot_output, zero_shot, setup["model"], pretrained, named=named)
    if args.json:
        out = {"zero_shot": suite.to_json(zero_shot, named=named)}
        if rows:
            out["retrieval"] = rows if named else next(iter(rows.values()))
        print(json.dumps(out))
        return
    if rows:
        report(args, setup, None, source, rows, named)
    else:
        print(f"{setup['model']} + {source}")
    print(suite.describe_classes())
    for root in args.zero_shot:
        table = {name: zero_shot[name][root].metrics for name in zero_shot} if named else {root: zero_shot[root].metrics}
        print(format_zero_shot_table(table))


def write_galleries(args: argparse.Namespace, setup: dict, dataset: RetrievalEvalDataset, source: str,
                    embeddings: tuple[torch.Tensor, torch.Tensor], metrics: dict[str, float]) -> None:
    image_embeds, text_embeds = embeddings
    gallery = build_gallery_from_embeddings(
        image_embeds, text_embeds, dataset.txt2img, num_queries=args.gallery_queries, k=args.gallery_top_k,
        seed=args.gallery_seed,
    )
    title = f"{setup['model']} + {source}: {Path(setup['annotation']).name}"
    for path in args.gallery:
        write_gallery(path, gallery, dataset.image_paths, dataset.captions, title=title, metrics=metrics)
        # With --json, stdout holds only the metrics.
        print(f"gallery written to {path}", file=sys.stderr if args.json else sys.stdout)


def report(args: argparse.Namespace, setup: dict, dataset: RetrievalEvalDataset | None, source: str,
           rows: dict[str, dict[str, float]], named: bool) -> None:
    """Print the metrics: one JSON object (``{name: metrics}`` for named adapters) or a table."""
    if args.json:
        print(json.dumps(rows if named else next(iter(rows.values()))))
        return
    print(f"{setup['model']} + {source}")
    if dataset is not None:
        print(f"{dataset.num_images} images, {len(dataset.captions)} captions from {setup['annotation']}")
    print(format_metrics_table(rows))


def main(argv: list[str] | None = None) -> dict:
    """Evaluate; returns the metrics, or ``{name: metrics}`` for named adapters."""
    args = parse_args(argv)
    try:
        setup = resolve(args)
        suite = build_zero_shot(args, setup)
        dataset, model = build_split_and_backbone(args, setup)
        model, source = load_weights(args, setup, model)
    except BAD_INPUT as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    evaluator, model = build_evaluator(args, setup, dataset, model)
    named = isinstance(setup["weights"], dict) and not args.official_checkpoint
    names = list(setup["weights"]) if named else [setup.get("split_name", "model")]
    rows: dict[str, dict[str, float]] = {}
    zero_shot: dict = {}
    for name in names:
        if named:
            harma.set_adapter(model, name, inference_mode=True)
        if suite is not None:
            zero_shot.update({name: evaluate_zero_shot(suite, model)} if named else evaluate_zero_shot(suite, model))
        if evaluator is None:
            continue
        # Encoded once: the metrics and the gallery both come from these embeddings.
        with exit_on_bad_input():  # an unreadable image, named with its entry
            image_embeds, text_embeds = evaluator.encode(model)
        rows[name] = retrieval_metrics_from_embeddings(
            image_embeds, text_embeds, evaluator.txt2img.to(image_embeds.device)
        )
    if suite is not None:
        report_zero_shot(args, setup, suite, source, rows, zero_shot, named)
        return {"retrieval": rows, "zero_shot": suite.to_json(zero_shot, named=named)}
    report(args, setup, dataset, source, rows, named)
    if args.gallery:
        write_galleries(args, setup, dataset, source, (image_embeds, text_embeds), rows[names[-1]])
    return rows if named else rows[names[0]]


if __name__ == "__main__":
    main()
