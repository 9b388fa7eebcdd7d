"""Evaluate image-text retrieval (R@1/5/10 both ways and mean recall) on a test split.

A finished training run (its config.json names the backbone and the splits):

    python examples/evaluate.py --run runs/rsitmd_geo                  # best.safetensors on test
    python examples/evaluate.py --run runs/rsitmd_geo --checkpoint last --split val

A backbone plus an adapter file (any file harma.training wrote: HarMA, LoRA or full):

    python examples/evaluate.py --model ViT-B-32-quickgelu --pretrained RS5M_ViT-B-32_RET-2.pt \
        --adapters runs/rsitmd_geo/best.safetensors \
        --annotation data/rsitmd/rsitmd_test.json --image_root data/rsitmd/images

A checkpoint released by the HarMA authors (it holds the backbone too):

    python examples/evaluate.py --model ViT-B-32-quickgelu \
        --official-checkpoint harma_rsitmd_georsclip_mr523.pth \
        --annotation data/rsitmd/rsitmd_test.json --image_root data/rsitmd/images

Without --adapters or --official-checkpoint the plain backbone is evaluated (zero-shot).
--json prints the metrics as one JSON object instead of a table.

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

import harma
from harma.retrieval import RetrievalEvaluator, retrieval_metrics_from_embeddings
from harma.training import TrainConfig, format_metrics_table, load_trained_weights
from harma.training.data import RetrievalEvalDataset, test_transform
from harma.training.gallery import GALLERY_SUFFIXES, build_gallery_from_embeddings
from harma.training.gallery_render import write_gallery
from harma.training.models import build_backbone, build_tokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Evaluate retrieval R@1/5/10 and mean recall of a CLIP with HarMA adapters.",
        allow_abbrev=False,
    )
    parser.add_argument("--run", help="a training output folder: backbone, splits and checkpoint from it")
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best",
                        help="with --run: which saved weights (default best, chosen on validation)")
    parser.add_argument("--split", choices=("test", "val"), default="test", help="with --run: which split")
    parser.add_argument("--model", help="open_clip architecture, e.g. ViT-B-32 or ViT-B-32-quickgelu")
    parser.add_argument("--pretrained", help="open_clip tag or local weights file of the backbone")
    parser.add_argument("--model_config", help="open_clip.CLIP arguments as JSON (or a JSON file)")
    parser.add_argument("--image_size", type=int, help="input side in pixels (default: the model's)")
    parser.add_argument("--adapters", help="a .safetensors file written by harma (adapters, LoRA or full)")
    parser.add_argument("--official-checkpoint", dest="official_checkpoint",
                        help="a checkpoint of the authors' implementation (checkpoint_best.pth)")
    parser.add_argument("--annotation", help="val/test annotation file (entries with 'image' and 'caption' list)")
    parser.add_argument("--image_root", help="folder the annotation image paths are relative to")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--num_workers", type=int, default=4)
    parser.add_argument("--device", default="auto", help="auto | cuda | cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="autocast dtype on CUDA")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    gallery = parser.add_argument_group("gallery: what the model retrieved for sample queries")
    gallery.add_argument("--gallery", action="append", default=[], metavar="FILE",
                         help="write a gallery: FILE.html (self-contained page) or FILE.png (contact "
                         "sheet); repeat for both")
    gallery.add_argument("--gallery-queries", dest="gallery_queries", type=int, default=8, metavar="N",
                         help="sample captions and sample images shown (each; default 8)")
    gallery.add_argument("--gallery-top-k", dest="gallery_top_k", type=int, default=5, metavar="K",
                         help="results shown per query (default 5)")
    gallery.add_argument("--gallery-seed", dest="gallery_seed", type=int, default=0,
                         help="seed of the sample of queries (default 0)")
    args = parser.parse_args(argv)
    if args.adapters and args.official_checkpoint:
        parser.error("give --adapters or --official-checkpoint, not both")
    for path in args.gallery:
        if Path(path).suffix.lower() not in GALLERY_SUFFIXES:
            parser.error(f"--gallery {path}: the file name must end in one of {', '.join(GALLERY_SUFFIXES)}")
    if args.gallery_queries < 1 or args.gallery_top_k < 1:
        parser.error("--gallery-queries and --gallery-top-k must be at least 1")
    if args.run is None:
        missing = [name for name in ("model", "annotation", "image_root") if getattr(args, name) is None]
        if missing:
            parser.error(f"without --run, give {', '.join('--' + name for name in missing)}")
    return args


def resolve(args: argparse.Namespace) -> dict:
    """Backbone, weights and split to evaluate, from --run and/or the explicit options."""
    setup = {
        "model": args.model, "pretrained": args.pretrained, "model_config": None,
        "image_size": args.image_size, "annotation": args.annotation, "image_root": args.image_root,
        "weights": args.adapters,
    }
    if args.model_config:
        text = args.model_config
        setup["model_config"] = json.loads(Path(text).read_text() if Path(text).is_file() else text)
    if args.run:
        run = Path(args.run)
        config = TrainConfig.from_json_file(run / "config.json")
        split_file = config.test_file if args.split == "test" else config.val_file
        if split_file is None:
            raise ValueError(f"the run's config.json has no {args.split}_file; pass --annotation")
        from_run = {
            "model": config.model, "pretrained": config.pretrained, "model_config": config.model_config,
            "image_size": config.image_size, "annotation": split_file, "image_root": config.image_root,
            "weights": str(run / f"{args.checkpoint}.safetensors"),
        }
        setup = {key: setup[key] if setup[key] is not None else value for key, value in from_run.items()}
    if args.official_checkpoint and args.pretrained is None:
        setup["pretrained"] = None  # the released checkpoints hold the whole backbone
    return setup


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    try:
        setup = resolve(args)
        # The split first: a wrong image root fails before the model is built.
        image_size = setup["image_size"]
        if image_size is None:
            if setup["model_config"] is not None:
                image_size = setup["model_config"]["vision_cfg"]["image_size"]
            else:
                import open_clip

                image_size = open_clip.get_model_config(setup["model"])["vision_cfg"]["image_size"]
        dataset = RetrievalEvalDataset(setup["annotation"], setup["image_root"], transform=test_transform(image_size))
        if args.run and setup["pretrained"] is None:
            # A run from random initialisation built its backbone right after seeding.
            torch.manual_seed(TrainConfig.from_json_file(Path(args.run) / "config.json").seed)
        model = build_backbone(setup["model"], setup["pretrained"], setup["model_config"], image_size)
    except (FileNotFoundError, ValueError, KeyError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None

    source = "backbone only (zero-shot)"
    if args.official_checkpoint:
        report = harma.load_official_checkpoint(model, args.official_checkpoint)
        source = f"official checkpoint {args.official_checkpoint} (temperature {report.temperature})"
    elif setup["weights"]:
        model = load_trained_weights(model, setup["weights"])
        source = f"weights {setup['weights']}"

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    autocast = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    model = model.to(device).eval()
    evaluator = RetrievalEvaluator.from_dataset(
        dataset, build_tokenizer(setup["model"], setup["model_config"]), batch_size=args.batch_size,
        num_workers=args.num_workers, device=device, autocast_dtype=autocast, progress=not args.json,
    )
    # Encoded once: the metrics and the gallery both come from these embeddings.
    image_embeds, text_embeds = evaluator.encode(model)
    metrics = retrieval_metrics_from_embeddings(image_embeds, text_embeds, evaluator.txt2img.to(image_embeds.device))
    if args.json:
        print(json.dumps(metrics))
    else:
        print(f"{setup['model']} + {source}")
        print(f"{dataset.num_images} images, {len(dataset.captions)} captions from {setup['annotation']}")
        print(format_metrics_table({Path(setup["annotation"]).stem: metrics}))
    if args.gallery:
        gallery = build_gallery_from_embeddings(
            image_embeds, text_embeds, dataset.txt2img, num_queries=args.gallery_queries, k=args.gallery_top_k,
            seed=args.gallery_seed,
        )
        title = f"{setup['model']} + {source}: {Path(setup['annotation']).name}"
        for path in args.gallery:
            write_gallery(path, gallery, dataset.image_paths, dataset.captions, title=title, metrics=metrics)
            # With --json, stdout holds only the metrics.
            print(f"gallery written to {path}", file=sys.stderr if args.json else sys.stdout)
    return metrics


if __name__ == "__main__":
    main()
