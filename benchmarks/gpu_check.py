"""The GPU check: one command that runs the CUDA-only tests, measures the throughput table and
rehearses a real-size RSITMD training run within one time budget (at most 6 minutes on one
H100 or H200), and writes one JSON and one markdown report.

On the GPU machine it runs through ``bash benchmarks/gpu_check.sh`` (which installs the carried
wheels first and keeps the scratch data outside ``$OUT``; see docs/performance.md):

    python benchmarks/gpu_check.py --data .gpu_data --out /tmp/scratch --report-dir $OUT
    python benchmarks/gpu_check.py --cpu-smoke --data .gpu_data --out /tmp/gpu_check_smoke

Sections, each run as a subprocess under its own time limit, all within one deadline, in order:

1. ``sdpa``: ``pytest -m gpu tests/test_cuda_numerics.py``: the adapters' fused attention
   against the matrix-product path (outputs and gradients), the patched model's step on CUDA
   against the CPU, bf16 and fp16 autocast against float32. First: if the adapters' maths is
   wrong on the GPU, nothing after it means much.
2. ``tests``: the other tests marked ``gpu`` (the whole ``tests`` folder is collected).
   On a GPU, a run where every selected test skipped is a failure.
3. ``throughput``: ``benchmarks/train_throughput.py`` on open_clip ViT-B-32 (random weights),
   batch 214, fp32 (with TF32, harma's training default) / bf16 / fp16 autocast; the strict
   floor, HarMA, LoRA and full fine-tuning: images per second, peak GPU memory, step time and
   matrix-multiply FLOPs against the floor, and the model FLOP utilisation.
4. ``rehearsal``: the real RSITMD annotation files, a placeholder 256x256 image for every file
   they name, and ``examples/train_rsitmd.py`` through its command line with random weights:
   the first epochs under ``torchrun`` (one process: the process group, NCCL on a GPU, DDP), then
   ``--resume`` in a plain process for the last epoch, its one validation and the test of the best
   checkpoint, then ``examples/evaluate.py --run`` on the finished run, whose test metrics must
   equal the ones the run wrote. A few hundred optimizer steps on a GPU. Metrics of random weights
   on placeholder images are near chance: the rehearsal checks that the path works, not accuracy.

A subprocess that outruns its limit is ended with every process it started (torchrun's workers
start sessions of their own, and their data-loader workers); a section whose output file is cut
short keeps its log and says what was unreadable. The reports are rewritten after every section,
so a check cut short still leaves them.

Targets and figures, from the throughput table: HarMA's peak memory at most 0.5x full
fine-tuning's at batch 214, and HarMA's step time within 10% of its FLOP limit (time ratio to
the floor at most 1.10x the FLOP ratio), each at every precision; reported without a bound:
HarMA's images per second in bf16 against fp32 with TF32 (about 1.5-2x expected: bf16's matrix
rate on an H100 is twice TF32's, and not everything is a matrix product), and the model FLOP
utilisation (matmul FLOPs per second over the card's dense bf16 peak) of full fine-tuning and
HarMA.

``--cpu-smoke`` runs the same sections at a size a CPU finishes in a few minutes (a tiny CLIP,
a few steps, 24 training captions), so that CI keeps the script working; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPOSITORY = Path(__file__).resolve().parents[1]
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
SPLITS = ("train", "val", "test")
SECTIONS = ("sdpa", "tests", "throughput", "rehearsal")
NUMERICS_TESTS = "tests/test_cuda_numerics.py"
# Dense bf16 tensor-core peaks in FLOP/s. NVIDIA's H100 and H200 datasheets give the figure with
# 2:4 sparsity (1,979 TFLOP/s for H100 SXM and H200 SXM, 1,671 for the NVL parts, 1,513 for
# H100 PCIe); dense is half of it. A100: 312 dense (A100 datasheet). Matched in this order
# against torch.cuda.get_device_name ("NVIDIA H100 80GB HBM3" is the SXM part).
DENSE_BF16_PEAKS = (("H200 NVL", 835.5e12), ("H200", 989.5e12), ("H100 NVL", 835.5e12),
                    ("H100 PCIe", 756.5e12), ("H100", 989.5e12), ("A100", 312e12))
PACKAGES = ("torch", "torchvision", "open_clip_torch", "ftfy", "wcwidth", "timm", "peft", "transformers",
            "safetensors", "huggingface_hub", "numpy", "pillow", "tqdm", "regex", "pytest")


@dataclasses.dataclass(frozen=True)
class Plan:
    """How big each section is. ``subset``: entries kept per annotation file (None: all)."""

    name: str
    device: str
    deadline_s: float
    test_paths: tuple[str, ...]
    throughput_args: tuple[str, ...]
    model_args: tuple[str, ...]
    batch_size: int
    epochs: int
    max_steps_per_epoch: int | None
    subset: int | None
    num_workers: int
    eval_batch_size: int
    limits_s: dict[str, float]


GPU = Plan(
    name="gpu", device="cuda", deadline_s=360, test_paths=("tests",),
    throughput_args=("--model", "ViT-B-32", "--batch-size", "214", "--precisions", "fp32,bf16,fp16",
                     "--methods", "floor,harma,lora,full", "--steps", "12", "--warmup", "3", "--device", "cuda"),
    model_args=("--model", "ViT-B-32", "--image_size", "224"),
    batch_size=214, epochs=4, max_steps_per_epoch=None, subset=None, num_workers=12, eval_batch_size=512,
    limits_s={"sdpa": 40, "tests": 80, "throughput": 110, "train": 75, "resume": 55, "evaluate": 35},
)
CPU_SMOKE = Plan(
    name="cpu-smoke", device="cpu", deadline_s=480, test_paths=("tests",),
    throughput_args=("--model", "tiny", "--model-config", json.dumps(TINY_CLIP), "--image-size", "32",
                     "--batch-size", "4", "--precisions", "fp32", "--methods", "floor,harma", "--steps", "1",
                     "--warmup", "1", "--device", "cpu", "--threads", "1"),
    model_args=("--model", "tiny", "--model_config", json.dumps(TINY_CLIP), "--image_size", "32"),
    batch_size=8, epochs=2, max_steps_per_epoch=2, subset=24, num_workers=0, eval_batch_size=16,
    limits_s={"sdpa": 120, "tests": 150, "throughput": 120, "train": 120, "resume": 120, "evaluate": 90},
)


class Deadline:
    """The time left to all sections together; each subprocess gets its own limit or less."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def limit(self, cap: float) -> float:
        return max(1.0, min(cap, self.end - time.monotonic()))


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children, ...) from /proc; [] without /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            parent = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not a process
        children.setdefault(parent, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not); False where there is no /proc."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _signal_groups(groups: set[int], sig: signal.Signals) -> None:
    for group in groups:
        try:
            os.killpg(group, sig)
        except (ProcessLookupError, PermissionError):
            pass


def end_process_tree(process: subprocess.Popen, grace_s: float = 5.0) -> None:
    """End ``process`` and everything it started: SIGTERM to the process group of each, then
    SIGKILL after ``grace_s`` if any is left. The tree is read before any signal, since a child
    whose parent died leaves it; torchrun's workers lead sessions of their own, so the first
    process's group alone would miss them and their data-loader workers (and the GPU memory)."""
    pids = [process.pid, *descendants(process.pid)]
    groups = {_group(pid) for pid in pids} - {None, os.getpgrp()}
    _signal_groups(groups, signal.SIGTERM)
    end = time.monotonic() + grace_s
    while time.monotonic() < end:
        process.poll()  # reaps the first process once it has exited
        if not any(_alive(pid) for pid in pids):
            return
        time.sleep(0.1)
    _signal_groups(groups, signal.SIGKILL)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass


def run_logged(command: list[str], log: Path, timeout: float) -> dict[str, Any]:
    """Run ``command`` from the repository root with stdout and stderr in ``log``; its exit
    status (None if it ran past ``timeout`` seconds, after which it and every process it
    started are ended), wall seconds and the log's last lines."""
    start = time.monotonic()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w", encoding="utf-8") as stream:
        process = subprocess.Popen(command, cwd=REPOSITORY, stdout=stream, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            status = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            end_process_tree(process)
            status = None
    tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
    return {"command": command, "returncode": status, "timed_out": status is None,
            "wall_s": round(time.monotonic() - start, 1), "log": str(log), "log_tail": tail}


def junit_counts(junit: Path) -> dict[str, int]:
    """Test counts of a pytest JUnit XML file (ValueError when it is missing or cut short)."""
    try:
        root = ElementTree.parse(junit).getroot()
    except (OSError, ElementTree.ParseError) as error:
        raise ValueError(f"{junit.name} unreadable ({type(error).__name__}: {error})") from None
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for suite in root.iter("testsuite"):
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def run_pytest(plan: Plan, name: str, paths: list[str], extra: list[str], out: Path, deadline: Deadline,
               record: dict[str, Any]) -> None:
    """``pytest -m gpu`` on ``paths`` into ``record``: the run, its counts, and ``ok``. On a GPU
    a run where no test passed (all skipped, or none selected) fails."""
    junit = out / f"{name}.xml"
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rA", "-p", "no:cacheprovider",
               f"--junitxml={junit}", *extra, *paths]
    record.update(run_logged(command, out / "logs" / f"{name}.log", deadline.limit(plan.limits_s[name])))
    try:
        record["counts"] = junit_counts(junit)
    except ValueError as error:
        record["error"] = str(error)
    record["ok"] = record["returncode"] == 0 and "counts" in record  # 5: the marker selected no test
    if plan.device == "cuda" and record["ok"] and record["counts"]["passed"] == 0:
        record["ok"] = False
        record["error"] = f"no CUDA test ran on the GPU: {record['counts']['skipped']} skipped, none passed"


def run_numerics(plan: Plan, out: Path, deadline: Deadline, record: dict[str, Any]) -> None:
    """The adapters' CUDA numerics first (tests/test_cuda_numerics.py)."""
    run_pytest(plan, "sdpa", [NUMERICS_TESTS], [], out, deadline, record)


def run_tests(plan: Plan, out: Path, deadline: Deadline, record: dict[str, Any]) -> None:
    """Every other test marked ``gpu``."""
    run_pytest(plan, "tests", list(plan.test_paths), [f"--ignore={NUMERICS_TESTS}"], out, deadline, record)


def run_throughput(plan: Plan, out: Path, deadline: Deadline, record: dict[str, Any]) -> None:
    """benchmarks/train_throughput.py with ``--json``; its rows and device name."""
    table = out / "throughput.json"
    command = [sys.executable, str(REPOSITORY / "benchmarks" / "train_throughput.py"), *plan.throughput_args,
               "--json", str(table)]
    record.update(run_logged(command, out / "logs" / "throughput.log", deadline.limit(plan.limits_s["throughput"])))
    if table.exists():  # rewritten after every configuration, so a run cut short still has rows
        try:
            measured = json.loads(table.read_text(encoding="utf-8"))
            record.update(device=measured["device"], rows=measured["rows"], failed=measured.get("failed", []))
        except (ValueError, KeyError, TypeError) as error:
            record["error"] = f"{table.name} unreadable ({type(error).__name__}: {error})"
    record["ok"] = record["returncode"] == 0 and bool(record.get("rows"))


def dense_bf16_peak(device_name: str) -> float | None:
    """The card's dense bf16 tensor-core peak in FLOP/s (None for a card not in the table)."""
    return next((peak for part, peak in DENSE_BF16_PEAKS if part in device_name), None)


def add_utilisation(rows: list[dict], peak: float | None) -> None:
    """Give every row its matrix-multiply FLOPs per second and, with a ``peak``, the model FLOP
    utilisation (their fraction of the dense bf16 peak, at every precision)."""
    for row in rows:
        rate = row["matmul_flops"] / (row["step_ms"] / 1000) if row.get("matmul_flops") else None
        row["matmul_flops_per_s"] = rate
        row["mfu"] = rate / peak if rate is not None and peak else None


def _row(rows: list[dict], method: str, precision: str) -> dict | None:
    return next((r for r in rows if r["method"] == method and r["precision"] == precision), None)


def _judged(name: str, value: float | None, bound: str, met: Callable[[float], bool] | None) -> dict[str, Any]:
    """A target (``met`` judges its value) or, with ``met`` None, a figure reported without a bound."""
    verdict = None if value is None or met is None else bool(met(value))
    return {"target": name, "value": value, "bound": bound, "met": verdict, "kind": "target" if met else "figure"}


def judge_targets(rows: list[dict]) -> list[dict[str, Any]]:
    """The targets and figures from the throughput rows: each with its value, bound and ``met``
    (True, False, or None where the table lacks what it needs, e.g. peak memory on a CPU, or
    for a figure); ``kind`` says which of the two it is."""
    fp32, bf16 = _row(rows, "harma", "fp32"), _row(rows, "harma", "bf16")
    speedup = bf16["images_per_s"] / fp32["images_per_s"] if fp32 and bf16 else None
    judged = [_judged("HarMA images/s, bf16 vs fp32 with TF32", speedup, "reported (1.5-2x expected)", None)]
    for precision in sorted({r["precision"] for r in rows}, key=["fp32", "bf16", "fp16"].index):
        harma, full = _row(rows, "harma", precision), _row(rows, "full", precision)
        memory = None
        if harma and full and harma.get("peak_memory_gib") is not None and full.get("peak_memory_gib"):
            memory = harma["peak_memory_gib"] / full["peak_memory_gib"]
        batch = f" at batch {harma['batch_size']}" if harma and "batch_size" in harma else ""
        judged.append(_judged(f"HarMA peak memory vs full fine-tuning{batch}, {precision}", memory, "<= 0.5",
                              lambda v: v <= 0.5))
        above = harma.get("above_limit") if harma else None
        judged.append(_judged(f"HarMA step time above its FLOP limit, {precision}", above, "<= 0.10",
                              lambda v: v <= 0.10))
        for method, label in (("full", "full fine-tuning"), ("harma", "HarMA")):
            row = _row(rows, method, precision)
            judged.append(_judged(f"MFU of {label}, {precision}", row.get("mfu") if row else None,
                                  "reported (of the dense bf16 peak)", None))
    return judged


def placeholder_image(relative: str, size: int = 256):
    """A smooth RGB image ``size`` x ``size`` whose colours follow from the file name, so the
    same name always gives the same picture and different names differ."""
    import numpy as np
    from PIL import Image

    generator = np.random.default_rng(zlib.crc32(relative.encode("utf-8")))
    cells = generator.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    return Image.fromarray(cells).resize((size, size), Image.BILINEAR)


def _write_image(task: tuple[str, str]) -> None:
    root, relative = task
    path = Path(root) / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    placeholder_image(relative).save(path)  # the format follows the suffix (.tif in RSITMD)


def prepare_data(plan: Plan, data: Path, out: Path) -> dict[str, Any]:
    """Annotation files (all entries, or the first ``plan.subset`` of each) and a placeholder
    image for every file they name; the paths and counts."""
    source = data / "rsitmd"
    missing = [name for name in (f"rsitmd_{split}.json" for split in SPLITS) if not (source / name).exists()]
    if missing:
        raise FileNotFoundError(f"{source} lacks {missing}; pass --data with the folder holding rsitmd/")
    folder, images = out / "rehearsal_data", out / "rehearsal_data" / "images"
    files, names = {}, set()
    for split in SPLITS:
        entries = json.loads((source / f"rsitmd_{split}.json").read_text(encoding="utf-8"))
        if plan.subset is not None:
            entries = entries[: plan.subset]
        files[split] = folder / f"rsitmd_{split}.json"
        files[split].parent.mkdir(parents=True, exist_ok=True)
        files[split].write_text(json.dumps(entries), encoding="utf-8")
        names.update(entry["image"] for entry in entries)
    tasks = [(str(images), name) for name in sorted(names)]
    if len(tasks) > 200:
        import multiprocessing

        # Spawned, not forked: this process has started CUDA (and its threads) by now.
        with multiprocessing.get_context("spawn").Pool(min(16, os.cpu_count() or 1)) as pool:
            pool.map(_write_image, tasks, chunksize=64)
    else:
        for task in tasks:
            _write_image(task)
    return {"files": {k: str(v) for k, v in files.items()}, "image_root": str(images), "images": len(tasks),
            "entries": {split: len(json.loads(path.read_text())) for split, path in files.items()}}


def _train_command(plan: Plan, prepared: dict[str, Any], run_dir: Path) -> list[str]:
    files = prepared["files"]
    return [
        str(REPOSITORY / "examples" / "train_rsitmd.py"), *plan.model_args, "--pretrained", "none",
        "--train_files", files["train"], "--val_file", files["val"], "--test_file", files["test"],
        "--image_root", prepared["image_root"], "--output_dir", str(run_dir), "--device", plan.device,
        "--batch_size", str(plan.batch_size), "--epochs", str(plan.epochs), "--eval_every", str(plan.epochs),
        "--eval_batch_size", str(plan.eval_batch_size), "--num_workers", str(plan.num_workers),
        "--progress", "false", "--seed", "0",
        *(("--max_steps_per_epoch", str(plan.max_steps_per_epoch)) if plan.max_steps_per_epoch else ()),
    ]


def same_metrics(first: dict[str, float], second: dict[str, float], tolerance: float = 0.01) -> bool:
    """Whether two metric dicts agree (in percentage points) on every metric both have, and
    have at least one."""
    common = set(first) & set(second)
    return bool(common) and all(abs(first[key] - second[key]) <= tolerance for key in common)


def run_rehearsal(plan: Plan, data: Path, out: Path, deadline: Deadline, record: dict[str, Any]) -> None:
    """Train (stopped early), resume, evaluate, into ``record``: each step's record, and whether
    the evaluation of the finished run reproduces the test metrics it wrote."""
    start = time.monotonic()
    record.update(ok=False, steps={})
    try:
        record["data"] = prepare_data(plan, data, out)
    except (OSError, ValueError) as error:
        record["error"] = f"{type(error).__name__}: {error}"
        return
    steps = record["steps"]
    steps["images"] = {"wall_s": round(time.monotonic() - start, 1)}
    run_dir, logs = out / "rehearsal_run", out / "logs"
    train = _train_command(plan, record["data"], run_dir)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
    steps["train"] = run_logged([*torchrun, *train, "--overwrite", "--stop-after-epoch", str(plan.epochs - 1)],
                                logs / "train.log", deadline.limit(plan.limits_s["train"]))
    if steps["train"]["returncode"] != 0:
        return
    steps["resume"] = run_logged([sys.executable, *train, "--resume", str(run_dir)], logs / "resume.log",
                                 deadline.limit(plan.limits_s["resume"]))
    if steps["resume"]["returncode"] != 0:
        return
    try:
        history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        written = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        record["error"] = f"the finished run's files: {type(error).__name__}: {error}"
        return
    record.update(epochs_logged=len(history), history=history, results=written)
    evaluate = [sys.executable, str(REPOSITORY / "examples" / "evaluate.py"), "--run", str(run_dir), "--json",
                "--device", plan.device, "--batch_size", str(plan.eval_batch_size),
                "--num_workers", str(plan.num_workers)]
    steps["evaluate"] = run_logged(evaluate, logs / "evaluate.log", deadline.limit(plan.limits_s["evaluate"]))
    if steps["evaluate"]["returncode"] != 0:
        return
    lines = [line for line in Path(steps["evaluate"]["log"]).read_text().splitlines() if line.startswith("{")]
    try:
        record["evaluated"] = json.loads(lines[-1])
    except (IndexError, ValueError) as error:
        record["error"] = f"no metrics in the evaluation's output ({type(error).__name__}: {error})"
        return
    record["evaluation_matches_run"] = same_metrics(record["evaluated"], written.get("test") or {})
    record["ok"] = len(history) == plan.epochs and record["evaluation_matches_run"]


def _number(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _verdict(target: dict[str, Any]) -> str:
    if target.get("kind") == "figure":
        return "reported" if target["value"] is not None else "not measured"
    return {True: "met", False: "**not met**", None: "not measured"}[target["met"]]


def _status(section: dict[str, Any]) -> str:
    if section.get("skipped"):
        return "not run"
    state = {True: "passed", False: "**FAILED**", None: "not judged"}[section.get("ok")]
    return state + (f" ({section['error']})" if section.get("error") else "")


def markdown_report(report: dict[str, Any]) -> str:
    """The report as markdown: sections, targets, the throughput table, tests and rehearsal in short."""
    env = report["environment"]
    lines = [f"# GPU check ({report['plan']}): {env['device']}", "",
             f"Python {env['python']}, torch {env['torch']}, CUDA {env['cuda']}, {report['wall_s']:.0f} s in all"
             f" (budget {report['budget_s']:.0f} s). Packages: "
             + ", ".join(f"{name} {version}" for name, version in env.get("packages", {}).items()) + ".", "",
             "| section | status | seconds |", "|---|---|---:|"]
    for name, section in report["sections"].items():
        lines.append(f"| {name} | {_status(section)} | {section.get('wall_s', '')} |")
    peak = env.get("dense_bf16_peak")
    lines += ["", "## Targets and figures", "",
              f"Dense bf16 peak used for the MFU: {_number(peak / 1e12 if peak else None, 1)} TFLOP/s.", "",
              "| target | value | bound | verdict |", "|---|---:|---|---|"]
    for target in report["targets"]:
        lines.append(f"| {target['target']} | {_number(target['value'])} | {target['bound']} | {_verdict(target)} |")
    for name, title in (("sdpa", "CUDA numerics (tests/test_cuda_numerics.py)"), ("tests", "Other CUDA-only tests")):
        section = report["sections"].get(name, {})
        lines += ["", f"## {title}", "", f"exit status {section.get('returncode')}, "
                  f"{json.dumps(section.get('counts', 'no JUnit file'))}"]
    lines += ["", "## Throughput", "", *throughput_lines(report["sections"].get("throughput", {}))]
    lines += ["", "## Rehearsal of examples/train_rsitmd.py", "",
              *rehearsal_lines(report["sections"].get("rehearsal", {}))]
    return "\n".join(lines) + "\n"


def throughput_lines(throughput: dict[str, Any]) -> list[str]:
    """The throughput table as markdown lines."""
    if not throughput.get("rows"):
        return [f"no rows (exit status {throughput.get('returncode')}, {throughput.get('error', 'see')} "
                f"{throughput.get('log', '')})"]
    lines = [f"Failed: {failed['method']} {failed['precision']}: {failed['error']}" for failed in throughput.get("failed", [])]
    lines += ["| method | precision | images/s | ms/step | peak memory (GiB) | time vs floor | "
             "matmul FLOPs vs floor | above the FLOP limit | matmul TFLOP/s | MFU |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in throughput["rows"]:
        above, rate = row.get("above_limit"), row.get("matmul_flops_per_s")
        lines.append(
            f"| {row['method']} | {row['precision']} | {row['images_per_s']:.1f} | {row['step_ms']:.1f} | "
            f"{_number(row['peak_memory_gib'], 2)} | {_number(row.get('time_vs_floor'))}x | "
            f"{_number(row.get('flops_vs_floor'))}x | {'n/a' if above is None else f'{100 * above:+.1f}%'} | "
            f"{_number(None if rate is None else rate / 1e12, 1)} | {_number(row.get('mfu'))} |")
    return lines


def rehearsal_lines(rehearsal: dict[str, Any]) -> list[str]:
    """Markdown lines on the rehearsal: data, each subprocess, the epochs logged, the metrics."""
    if "data" not in rehearsal:
        return [f"not run: {rehearsal.get('error')}"]
    data = rehearsal["data"]
    lines = [f"{data['entries']} annotation entries (train, val, test), {data['images']} placeholder images.", ""]
    for name, step in rehearsal["steps"].items():
        status = "" if "returncode" not in step else f", exit status {step['returncode']}" + (
            " (timed out)" if step["timed_out"] else "")
        lines.append(f"- {name}: {step['wall_s']} s{status}")
    if "history" in rehearsal:
        lines += ["", f"Epochs logged: {rehearsal['epochs_logged']}; test metrics written by the run: "
                  f"{json.dumps(rehearsal['results'].get('test'))}; `evaluate.py --run` reproduces them: "
                  f"{rehearsal.get('evaluation_matches_run')}. Random weights on placeholder images: "
                  "the metrics are near chance by design."]
    if rehearsal.get("error"):
        lines += ["", f"Error: {rehearsal['error']}"]
    return lines


def guarded(section: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """A section's record, as far as it got: an exception in the check itself is added to it
    (the logs and counts gathered before stay), so that the other sections and both reports
    still come out."""
    record: dict[str, Any] = {}
    start = time.monotonic()
    try:
        section(record)
    except Exception as error:  # the report must still be written
        record.update(ok=False, error=f"{type(error).__name__}: {error}")
    record.setdefault("wall_s", round(time.monotonic() - start, 1))
    return record


def default_data() -> Path:
    """The folder holding ``rsitmd/``: ``.gpu_data`` (what ``make gpu-prep`` copied, and what
    travels to a GPU machine), else ``../shared/data`` beside the repository."""
    candidates = (REPOSITORY / ".gpu_data", REPOSITORY.parent / "shared" / "data")
    return next((path for path in candidates if (path / "rsitmd").is_dir()), candidates[0])


def environment(plan: Plan) -> dict[str, Any]:
    """Versions, the device and its dense bf16 peak."""
    from importlib import metadata

    import torch

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda and plan.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    return {"torch": torch.__version__, "cuda": torch.version.cuda if cuda else None, "device": device,
            "python": sys.version.split()[0], "packages": packages, "dense_bf16_peak": dense_bf16_peak(device)}


def setup_record(status: int | None, log: str | None) -> dict[str, Any]:
    """The record of gpu_check.sh's wheel installation, when it ran one."""
    if status is None:
        return {"ok": None, "skipped": True, "error": "not run by gpu_check.sh"}
    tail = Path(log).read_text(encoding="utf-8", errors="replace").splitlines()[-15:] if log and Path(log).exists() else []
    return {"ok": status == 0, "returncode": status, "log": log, "log_tail": tail,
            **({} if status == 0 else {"error": "the carried wheels did not install"})}


def write_reports(report: dict[str, Any], report_dir: Path) -> None:
    """Both reports, each written whole to a temporary name and then moved into place."""
    for name, text in (("gpu_check.json", json.dumps(report, indent=2)), ("gpu_check.md", markdown_report(report))):
        temporary = report_dir / f".{name}.tmp"
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, report_dir / name)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None,
                        help="folder holding rsitmd/rsitmd_{train,val,test}.json (default: .gpu_data, else "
                        "../shared/data)")
    parser.add_argument("--out", default="gpu_check", help="scratch folder: logs, images, the run")
    parser.add_argument("--report-dir", default=None, help="where gpu_check.json and .md go (default: --out)")
    parser.add_argument("--cpu-smoke", action="store_true", help="the CI size on the CPU (a few minutes)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset")
    parser.add_argument("--setup-status", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--setup-log", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    plan = CPU_SMOKE if args.cpu_smoke else GPU
    out = Path(args.out).resolve()
    report_dir = Path(args.report_dir).resolve() if args.report_dir else out
    for folder in (out, report_dir):
        folder.mkdir(parents=True, exist_ok=True)
    env = environment(plan)
    if plan.device == "cuda" and env["cuda"] is None:
        parser.error("no CUDA device here; pass --cpu-smoke for the CPU-sized run")
    start, deadline = time.monotonic(), Deadline(plan.deadline_s)
    chosen = args.sections.split(",")
    runners = {"sdpa": lambda record: run_numerics(plan, out, deadline, record),
               "tests": lambda record: run_tests(plan, out, deadline, record),
               "throughput": lambda record: run_throughput(plan, out, deadline, record),
               "rehearsal": lambda record: run_rehearsal(plan, Path(args.data or default_data()), out, deadline,
                                                         record)}
    sections = {"setup": setup_record(args.setup_status, args.setup_log)}
    sections.update({name: {"ok": None, "skipped": True, "error": "not selected"} for name in SECTIONS})
    report = {"plan": plan.name, "environment": env, "sections": sections, "targets": [], "budget_s": plan.deadline_s}
    for name in (name for name in SECTIONS if name in chosen):
        sections[name] = {"ok": None, "error": "running, or cut short"}
        report["wall_s"] = time.monotonic() - start
        write_reports(report, report_dir)
        sections[name] = guarded(runners[name])
        if name == "throughput":
            add_utilisation(sections[name].get("rows", []), env["dense_bf16_peak"])
            report["targets"] = judge_targets(sections[name].get("rows", []))
    report["wall_s"] = time.monotonic() - start
    report["ok"] = all(section.get("ok") is not False for section in sections.values())
    write_reports(report, report_dir)
    print(markdown_report(report))
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
