"""``python -m harma.search index | query | serve``: the command line of archive search.

    python -m harma.search index --images DIR --out INDEX --model ViT-B-32 --pretrained W.pt \\
        --adapters best.safetensors
    python -m harma.search index --annotation dataset_ucm.json --split test --image_root imgs ...
    python -m harma.search query INDEX --text "a bridge over a river" --top-k 10 --json
    python -m harma.search serve INDEX --port 8000

Bad input (a missing folder, an index built with another model, an unknown item...) prints one
``error:`` line and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..training.model_options import (
    ModelSpec,
    add_model_arguments,
    add_runtime_arguments,
    parse_adapters,
    spec_from_args,
)
from ..training.options import (
    add_caption_arguments,
    caption_reader_options,
    device_option,
    errors_named,
    exit_on_bad_input,
    integer_at_least,
    positive_number,
)
from .ann import build_faiss_index
from .archive import EXACT_KERNELS, FUSED_MIN_ROWS, Searcher
from .indexer import IndexOptions, build_index
from .server import ServerLimits, serve  # imports the web framework (an optional extra) when called
from .sources import ImageSource, annotation_source, folder_source, open_image, webdataset_source

__all__ = ["build_parser", "main"]

# Besides harma.training.options.BAD_INPUT, the errors of archive search that are the user's to
# fix: an unknown item or index (KeyError, as a mapping says it) and a missing extra (ImportError).
SEARCH_BAD_INPUT = (KeyError, ImportError)


def _index_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("index", help="embed the images of a folder, annotation file or webdataset",
                                 allow_abbrev=False)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="a folder tree of images (a caption file x.txt beside x.jpg is read)")
    source.add_argument("--annotation", help="a caption dataset of any format (docs/data.md): an annotation file, "
                        "or a folder written by a Hugging Face dataset's save_to_disk")
    source.add_argument("--webdataset", nargs="+", metavar="TAR", help="webdataset tar shards, or their folder")
    parser.add_argument("--image_root", help="with --annotation: the folder its image paths are relative to "
                        "(default: the annotation's folder)")
    add_caption_arguments(parser, split_default=None, split_help="with --annotation: the split to index of a "
                          "dataset holding several (Karpathy, NWPU, a DatasetDict); default: a file of one split, whole")
    parser.add_argument("--out", required=True, help="the index folder (one subfolder per named adapter set)")
    add_model_arguments(parser)
    add_runtime_arguments(parser)
    parser.add_argument("--shard_size", type=int, default=10000, help="items per shard (the unit of resumption)")
    parser.add_argument("--strict", action="store_true", help="stop at the first unreadable image")
    parser.add_argument("--part", help="K/N: embed only part K of N (independent machines; rerun without it "
                        "once every part's shards are in --out to write the manifest)")
    parser.add_argument("--faiss", action="store_true", help="also build an approximate FAISS index")
    parser.add_argument("--target_recall", type=float, default=0.95, help="recall@10 the FAISS index must reach")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _model_overrides(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model options (default: the manifest's; given again they must name "
                                      "the same model)")
    add_model_arguments(group)
    group.add_argument("--device", type=device_option, default="cpu", help="cpu | cuda | cuda:N | auto")
    parser.add_argument("--exact", action="store_true", help="exact search even when a FAISS index exists")


def _kernel_option(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--exact_kernel", choices=EXACT_KERNELS, default=default,
                        help="how exact search scores a query: blas (convert, then multiply), fused (a "
                             "kernel compiled by torch.compile at start, a few seconds; 1.5x to 1.7x faster "
                             f"per query), auto (fused from {FUSED_MIN_ROWS:,} rows) (default: {default})")


def _query_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("query", help="search an index by text, image or indexed item", allow_abbrev=False)
    parser.add_argument("index", nargs="+", help="index folder(s)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="a description of the images to find")
    what.add_argument("--image", help="an image file: find similar images")
    what.add_argument("--item", type=int, help="an indexed item's id: find similar images")
    parser.add_argument("--top-k", "--top_k", dest="top_k", type=int, default=10)
    parser.add_argument("--name", help="which index, when several are given (default: the first)")
    parser.add_argument("--json", action="store_true", help="print a JSON list of results")
    _kernel_option(parser, "blas")
    _model_overrides(parser)


def _serve_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("serve", help="serve the JSON API and the search page", allow_abbrev=False)
    parser.add_argument("index", nargs="+", help="index folder(s); several share one backbone")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max_upload_mb", type=positive_number, default=10.0, help="largest accepted upload")
    parser.add_argument("--max_pixels", type=integer_at_least(1), default=40_000_000, help="largest uploaded image (pixels); "
                        "indexed images are served up to the limit they were indexed under")
    parser.add_argument("--max_k", type=integer_at_least(1), default=100, help="most results per query")
    parser.add_argument("--max_decodes", type=integer_at_least(1), default=2,
                        help="most images decoded at once (uploads, thumbnails); other requests wait")
    _kernel_option(parser, "auto")
    _model_overrides(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m harma.search", allow_abbrev=False,
                                     description="Search an image archive with an adapted CLIP-style model.")
    commands = parser.add_subparsers(dest="command", required=True)
    _index_parser(commands)
    _query_parser(commands)
    _serve_parser(commands)
    return parser


def _source(args: argparse.Namespace) -> ImageSource:
    reader_options = caption_reader_options(args)
    if args.annotation:
        return annotation_source(args.annotation, args.image_root, **reader_options)
    given = [name for name, value in reader_options.items() if value is not None]
    if given:
        raise ValueError(f"--{given[0].replace('_', '-')} says how to read --annotation: give it with --annotation")
    if args.images:
        return folder_source(args.images)
    return webdataset_source(args.webdataset[0] if len(args.webdataset) == 1 else args.webdataset)


def _part(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        part, parts = (int(value) for value in text.split("/"))
    except ValueError:
        raise ValueError(f"--part {text!r}: expected K/N, e.g. 0/4") from None
    if not 0 <= part < parts:
        raise ValueError(f"--part {text}: K must be 0 to N-1")
    return part, parts


def run_index(args: argparse.Namespace) -> list[Any]:
    spec = spec_from_args(args)
    source = _source(args)
    for key, reason in source.skipped:
        print(f"skipped {key}: {reason}", file=sys.stderr)
    options = IndexOptions(batch_size=args.batch_size, num_workers=args.num_workers, device=args.device,
                           shard_size=args.shard_size, strict=args.strict, part=_part(args.part),
                           progress=not args.quiet)
    manifests = build_index(source, spec, args.out, options)
    for manifest, folder in zip(manifests, _folders(spec, Path(args.out)), strict=True):
        if manifest is None:
            print(f"{folder}: this process's shards are written; the manifest is written once every part is done")
            continue
        print(f"{folder}: {manifest.count} images indexed ({manifest.dim}-d), {manifest.failures} unreadable "
              f"(listed in {folder / 'failures.jsonl'}); model: {manifest.describe()}")
        if args.faiss:
            entry = build_faiss_index(folder, manifest, target_recall=args.target_recall)
            print(f"{folder}: FAISS {entry['type']} index, nprobe {entry['nprobe']}: recall@10 against exact search "
                  f"{entry['recall_at_10']:.3f} on {entry['queries']} sample queries, {entry['ms_per_query']:.2f} ms "
                  f"per query")
    return manifests


def _folders(spec: ModelSpec, out: Path) -> list[Path]:
    return [out / name for name in spec.adapters] if isinstance(spec.adapters, dict) else [out]


def overrides_of(args: argparse.Namespace) -> dict[str, Any]:
    """The model options given on a query/serve command line, as `ModelSpec` fields."""
    overrides: dict[str, Any] = {}
    for name in ("model", "pretrained", "image_size"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.model_config is not None:
        overrides["model_config"] = args.model_config
    adapters = parse_adapters(args.adapters)
    if isinstance(adapters, dict):
        raise ValueError("--adapters NAME=PATH is for index; query an index of a named set by its folder")
    if adapters is not None:
        overrides["adapters"] = str(Path(adapters).resolve())
    return overrides


def run_query(args: argparse.Namespace) -> list[dict[str, Any]]:
    searcher = Searcher.open(args.index, overrides=overrides_of(args), device=args.device, use_faiss=not args.exact,
                             exact_kernel=args.exact_kernel)
    image = None
    if args.image:
        with errors_named(f"--image {args.image}"):
            image = open_image(Path(args.image).read_bytes())
    if args.top_k < 1:
        raise ValueError("--top-k must be at least 1")
    results = searcher.search(text=args.text, image=image, item=args.item, k=args.top_k, index=args.name)
    if args.json:
        print(json.dumps(results, ensure_ascii=False))
    else:
        for rank, result in enumerate(results, 1):
            caption = (result.get("captions") or [""])[0]
            print(f"{rank:3d}  {result['score']:.4f}  id {result['id']:<6d} {result['path']}  {caption}")
    return results


def _check_servable(searcher: Searcher) -> None:
    """Refuse to serve indexes whose images are stored in a Hugging Face dataset without the
    package that reads them (every image request would fail)."""
    for name, index in searcher.indexes.items():
        if "hf_image_key" in index.manifest.source and importlib.util.find_spec("datasets") is None:
            raise ImportError(f"index {name!r} serves the images stored in the Hugging Face dataset "
                              f"'{index.manifest.source['annotation']}': that needs the datasets package: "
                              f"pip install 'harma[datasets]'")


def run_serve(args: argparse.Namespace) -> None:
    with errors_named("--max_upload_mb"):  # checked before the model is loaded
        limits = ServerLimits(max_upload_bytes=max(1, round(args.max_upload_mb * 1e6)), max_pixels=args.max_pixels,
                              max_k=args.max_k, max_decodes=args.max_decodes)
    searcher = Searcher.open(args.index, overrides=overrides_of(args), device=args.device, use_faiss=not args.exact,
                             exact_kernel=args.exact_kernel)
    _check_servable(searcher)
    serve(searcher, host=args.host, port=args.port, limits=limits)


def main(argv: Sequence[str] | None = None) -> Any:
    args = build_parser().parse_args(argv)
    run = {"index": run_index, "query": run_query, "serve": run_serve}[args.command]
    with exit_on_bad_input(also=SEARCH_BAD_INPUT):
        return run(args)
