"""Archive search benchmark: indexing throughput, exact and FAISS query time, server load.

Every figure that is compared is measured side by side in this one run (interleaved rounds,
medians), and quoted as a ratio:

1. indexing: ``build_index`` over generated images against a bare loop (the same images read
   and transformed in the main process, ``encode_image`` at the same batch size); target >= 0.9x.
2. exact top-10 over ``--rows`` x ``--dim`` float16 embeddings (memory-mapped from ``--workdir``):
   median query time against the memory-bandwidth limit (bytes read / the fastest of several
   plain read kernels over the same array) and against one numpy matrix product over the same
   array, for both kernels (``blas``: convert, then multiply; ``fused``: compiled, what
   ``serve`` uses on an index this large); targets: <= 2x the limit, <= 1x numpy.
3. FAISS: the index ``build_faiss_index`` chooses, its recall@10 against exact search and median
   query time (target recall >= 0.95).
4. load: ``--clients`` concurrent clients x ``--queries`` text queries each against a real
   uvicorn server: errors, median and p99 latency.

    python benchmarks/search.py --threads 1                     # 1,000,000 x 512 (about 1 GB)
    python benchmarks/search.py --threads 1 --rows 20000 --images 64 --json out.json   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harma.search import IndexOptions, build_faiss_index, exact_search, folder_source  # noqa: E402
from harma.search.fused import fused_dots  # noqa: E402
from harma.search.manifest import Manifest  # noqa: E402
from harma.training.model_options import ModelSpec, build_from_spec  # noqa: E402
from harma.training.models import tiny_clip_config  # noqa: E402


def generate_images(folder: Path, count: int, size: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:05d}.jpg")


def bare_loop(source, spec: ModelSpec, batch_size: int) -> float:
    """Images per second of reading, transforming and encode_image in one loop, nothing else."""
    from harma.search.sources import open_image, read_item_bytes
    from harma.training.data import test_transform

    model, transform = build_from_spec(spec), test_transform(spec.image_size)
    start = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, len(source.items), batch_size):
            items = source.items[first:first + batch_size]
            pixels = torch.stack([transform(open_image(read_item_bytes(source.root, item.path))) for item in items])
            model.encode_image(pixels)
    return len(source.items) / (time.perf_counter() - start)


def indexing(args: argparse.Namespace, work: Path) -> dict:
    from harma.search import build_index

    images = work / "images"
    generate_images(images, args.images, args.image_side)
    config = tiny_clip_config(image_size=args.model_image_size, width=args.width, layers=args.layers)
    torch.manual_seed(0)
    spec = ModelSpec("tiny", None, config, args.model_image_size, None)
    source = folder_source(images)
    pipeline, bare = [], []
    for round_number in range(args.rounds):
        bare.append(bare_loop(source, spec, args.batch_size))
        options = IndexOptions(batch_size=args.batch_size, num_workers=args.num_workers, progress=False,
                               device=args.device)
        build_index(source, spec, work / f"index-{round_number}", options)
        pipeline.append(options.stats["images"] / options.stats["seconds"])
    result = {"images": args.images, "batch_size": args.batch_size, "num_workers": args.num_workers,
              "pipeline_images_per_s": statistics.median(pipeline), "bare_images_per_s": statistics.median(bare)}
    result["ratio"] = result["pipeline_images_per_s"] / result["bare_images_per_s"]
    result["target_met"] = result["ratio"] >= 0.9
    return result


def make_embeddings(work: Path, rows: int, dim: int) -> Path:
    """Clustered unit vectors (as real embeddings are), float16, in one shard of an index folder."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((1000, dim)).astype(np.float32)
    path = work / "embeddings" / "emb-00000.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(rows, dim))
    for start in range(0, rows, 100_000):
        block = centres[rng.integers(0, 1000, min(100_000, rows - start))]
        block = block + 0.6 * rng.standard_normal(block.shape, dtype=np.float32)
        array[start:start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    array.flush()
    del array
    write_shard_metadata(work, rows)
    return path


def write_shard_metadata(work: Path, rows: int) -> None:
    lines = "".join(json.dumps({"key": str(i), "path": f"{i}.jpg"}) + "\n" for i in range(rows))
    (work / "metadata").mkdir(exist_ok=True)
    (work / "metadata" / "meta-00000.jsonl").write_text(lines)
    (work / "failures").mkdir(exist_ok=True)
    (work / "failures" / "fail-00000.jsonl").write_text("")


def read_kernels(tensor: torch.Tensor) -> dict:
    return {"int64 sum": lambda: tensor.view(torch.int64).sum(), "int32 max": lambda: tensor.view(torch.int32).max(),
            "numpy int64 sum": lambda: tensor.numpy().view(np.int64).sum()}


def exact(args: argparse.Namespace, work: Path) -> dict:
    path = make_embeddings(work, args.rows, args.dim)
    array = np.load(path, mmap_mode="r")
    tensor = torch.from_numpy(np.asarray(array))
    rng = np.random.default_rng(1)
    queries = [array[i].astype(np.float32) + 0.1 * rng.standard_normal(args.dim, dtype=np.float32)
               for i in rng.integers(0, args.rows, args.rounds * 3)]
    start = time.perf_counter()
    compiled = fused_dots(args.dim) is not None  # compiled before timing, as serve does at start
    compile_s = time.perf_counter() - start
    kernels = {"exact": "blas", "exact fused": "fused"}
    times: dict[str, list[float]] = {"numpy": [], **{k: [] for k in kernels}, **{k: [] for k in read_kernels(tensor)}}
    for round_number in range(args.rounds * 3):
        for name, kernel in read_kernels(tensor).items():
            start = time.perf_counter()
            kernel()
            times[name].append(time.perf_counter() - start)
        for name, kernel in kernels.items():
            start = time.perf_counter()
            exact_search([array], queries[round_number], 10, kernel=kernel)
            times[name].append(time.perf_counter() - start)
        if round_number < args.rounds:  # numpy's float16 product is slow: fewer rounds
            start = time.perf_counter()
            np.argpartition(-(np.asarray(array) @ queries[round_number].astype(np.float16)), 10)[:10]
            times["numpy"].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    fastest_read = min(median[name] for name in read_kernels(tensor))
    bytes_read = array.nbytes
    ratios = {name: median[name] / fastest_read for name in kernels}
    # serve's default (exact_kernel auto) uses the fused kernel on an index of this size.
    served = "exact fused" if compiled else "exact"
    return {"rows": args.rows, "dim": args.dim, "bytes": bytes_read, "median_s": median,
            "bandwidth_gb_s": bytes_read / fastest_read / 1e9, "limit_s": fastest_read,
            "fused_compiled": compiled, "fused_compile_s": compile_s,
            "ratio_to_bandwidth_limit": ratios, "ratio_to_numpy": median[served] / median["numpy"],
            "target_met": ratios[served] <= 2 and median[served] <= median["numpy"]}


def approximate(args: argparse.Namespace, work: Path) -> dict:
    spec = ModelSpec("tiny", None, None, 32, None)
    manifest = Manifest(spec=spec, backbone={}, adapters=None, adapter_name=None, dim=args.dim, count=args.rows,
                        shards=[{"shard": 0, "count": args.rows}], source={"root": str(work)})
    entry = build_faiss_index(work, manifest, target_recall=0.95, queries=args.faiss_queries)
    return {key: entry[key] for key in ("type", "nlist", "nprobe", "recall_at_10", "ms_per_query", "build_seconds",
                                        "sweep", "queries") if key in entry} | {"target_met": entry["recall_at_10"] >= 0.95}


def load(args: argparse.Namespace, work: Path) -> dict:
    import httpx

    index = work / "index-0"
    port = 18000 + os.getpid() % 1000
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads)}
    server = subprocess.Popen([sys.executable, "-m", "harma.search", "serve", str(index), "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("the server did not start")
        latencies: list[float] = []
        errors: list[str] = []
        words = ["river", "bridge", "parking lot", "farmland", "a port with ships", "dense houses", "forest"]

        def client(number: int) -> None:
            with httpx.Client(base_url=url, timeout=60) as session:
                for query in range(args.queries):
                    start = time.perf_counter()
                    response = session.get("/api/search", params={"text": f"{words[(number + query) % 7]} {query}"})
                    latencies.append(time.perf_counter() - start)
                    if response.status_code != 200:
                        errors.append(response.text)

        threads = [threading.Thread(target=client, args=(n,)) for n in range(args.clients)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - start
    finally:
        server.kill()
        server.wait()
    ordered = sorted(latencies)
    return {"clients": args.clients, "queries_each": args.queries, "errors": len(errors),
            "median_ms": 1000 * statistics.median(ordered), "p99_ms": 1000 * ordered[int(0.99 * (len(ordered) - 1))],
            "queries_per_s": len(ordered) / wall, "target_met": not errors}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="archive search benchmark (ratios measured side by side)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--image_side", type=int, default=64, help="side of the generated JPEG images")
    parser.add_argument("--model_image_size", type=int, default=64)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_workers", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--faiss_queries", type=int, default=300)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--workdir", help="where the generated data goes (default: a temporary folder in /tmp)")
    parser.add_argument("--skip", action="append", default=[], choices=("indexing", "exact", "faiss", "load"))
    parser.add_argument("--json", help="also write the results to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    results: dict = {"threads": args.threads, "device": args.device}
    with tempfile.TemporaryDirectory(dir=args.workdir or "/tmp", prefix="harma-search-bench-") as folder:
        work = Path(folder)
        for name, step in (("indexing", indexing), ("exact", exact), ("faiss", approximate), ("load", load)):
            if name in args.skip or (name == "faiss" and "exact" in args.skip) or (
                    name == "load" and "indexing" in args.skip):
                continue
            print(f"[search benchmark] {name}...", flush=True)
            results[name] = step(args, work)
            print(json.dumps(results[name], indent=1, default=float), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=float) + "\n")
    return results


if __name__ == "__main__":
    main()
