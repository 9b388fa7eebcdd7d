"""Archive search on the CPU demo's data: the same images indexed with the demo's trained HarMA
adapters and with the frozen backbone, a few queries answered by both, then the search page.

    python examples/search_demo.py                   # runs the CPU demo first if needed (~2 min)
    python examples/search_demo.py --no-serve        # print the comparison only
    make search-demo

The synthetic target-domain test images are indexed twice (``runs/search-demo/adapted`` and
``runs/search-demo/frozen``); the queries are test captions, and each answer marks the image the
caption was written for. Both indexes are then served on one backbone (the adapters switched on
and off per request) at http://127.0.0.1:8000/.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from harma.search import IndexOptions, Searcher, annotation_source, build_index
from harma.search.server import serve
from harma.training.demo import run_demo
from harma.training.model_options import ModelSpec
from harma.training.state import BEST_WEIGHTS_NAME


def demo_outputs(demo_dir: Path, quick: bool) -> tuple[dict, Path, Path, Path]:
    """The demo run's adapted config, and its backbone file, adapter file and target test split;
    the demo is run first when its outputs are missing."""
    adapter_file = demo_dir / "harma" / BEST_WEIGHTS_NAME
    if not adapter_file.is_file():
        print(f"[search demo] no trained adapters in {demo_dir}: running the CPU demo first", flush=True)
        run_demo(demo_dir, quick=quick)
    config = json.loads((demo_dir / "harma" / "config.json").read_text())
    return config, Path(config["pretrained"]), adapter_file, Path(config["test_file"])


def index_both(config: dict, backbone: Path, adapters: Path, test_file: Path, out: Path) -> dict[str, Path]:
    source = annotation_source(test_file, config["image_root"])
    folders = {}
    for name, adapter_file in (("adapted", adapters), ("frozen", None)):
        spec = ModelSpec(config["model"], str(backbone), config["model_config"], config["image_size"],
                         str(adapter_file) if adapter_file else None)
        folders[name] = out / name
        manifest = build_index(source, spec, folders[name], IndexOptions(num_workers=0, progress=False))[0]
        print(f"[search demo] {name}: {manifest.count} images indexed with {manifest.describe()}")
    return folders


def compare(folders: dict[str, Path], queries: int, k: int) -> None:
    searchers = {name: Searcher.open(folder, use_faiss=False) for name, folder in folders.items()}
    index = searchers["adapted"].indexes["adapted"]
    shown = 0
    for item_id in range(0, len(index), max(1, len(index) // queries)):
        entry = index.item(item_id)
        if not entry.get("captions") or shown == queries:
            continue
        shown += 1
        caption = entry["captions"][0]
        print(f'\nquery: "{caption}"   (written for {entry["path"]})')
        for name, searcher in searchers.items():
            results = searcher.search(text=caption, k=k)
            ranks = [r["path"] for r in results]
            found = f"rank {ranks.index(entry['path']) + 1}" if entry["path"] in ranks else f"not in the top {k}"
            listing = ", ".join(f"{Path(r['path']).name} {r['score']:.2f}" for r in results)
            print(f"  {name:8s} ({found}): {listing}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo_dir", default="runs/demo", help="the CPU demo's folder (run there if missing)")
    parser.add_argument("--out", default="runs/search-demo", help="where the two indexes are written")
    parser.add_argument("--quick", action="store_true", help="with a missing demo: its quick plan (seconds)")
    parser.add_argument("--queries", type=int, default=4)
    parser.add_argument("--top_k", type=int, default=5)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--no-serve", dest="serve", action="store_false", help="do not start the page")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    config, backbone, adapters, test_file = demo_outputs(Path(args.demo_dir), args.quick)
    out = Path(args.out)
    if out.exists() and not (out / "adapted" / "manifest.json").exists() and any(out.iterdir()):
        sys.exit(f"error: '{out}' is not empty and holds no search demo: pass another --out")
    folders = index_both(config, backbone, adapters, test_file, out)
    compare(folders, args.queries, args.top_k)
    if args.serve:
        print("\n[search demo] both indexes on one backbone; pick one in the page's menu (Ctrl-C stops)")
        serve(Searcher.open(list(folders.values()), use_faiss=False), port=args.port)


if __name__ == "__main__":
    main()
