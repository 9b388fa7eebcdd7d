"""The GPU check: one command that runs the CUDA-only tests, measures the throughput table and
rehearses a real-size RSITMD training run, in at most 8 minutes on one H200, and writes one JSON
and one markdown report.

    python benchmarks/gpu_check.py --data ../shared/data --out gpu_check       # on a GPU machine
    python benchmarks/gpu_check.py --cpu-smoke --data ../shared/data --out /tmp/gpu_check_smoke

Sections, each run as a subprocess under its own time limit, all within one deadline:

1. ``tests``: ``pytest -m gpu`` (the tests that need a CUDA device; elsewhere they skip).
2. ``throughput``: ``benchmarks/train_throughput.py`` on open_clip ViT-B-32 (random weights),
   batch 214, fp32 / bf16 / fp16 autocast; the strict floor, HarMA, LoRA and full fine-tuning:
   images per second, peak GPU memory, step time and matrix-multiply FLOPs against the floor.
3. ``rehearsal``: the real RSITMD annotation files, a placeholder 256x256 image for every file
   they name, and ``examples/train_rsitmd.py`` through its command line with random weights:
   the first epochs under ``torchrun`` (one process: the process group, NCCL on a GPU, DDP), then
   ``--resume`` in a plain process for the last epoch, its one validation and the test of the best
   checkpoint, then ``examples/evaluate.py --run`` on the finished run, whose test metrics must
   equal the ones the run wrote. A few hundred optimizer steps on a GPU. Metrics of random weights
   on placeholder images are near chance: the rehearsal checks that the path works, not accuracy.

Targets, judged from the throughput table and reported as met / not met: HarMA's images per
second in bf16 at least 3x fp32's; HarMA's peak memory at most 0.5x full fine-tuning's at each
precision; HarMA's step time within 10% of its FLOP limit (time ratio to the floor at most 1.10x
the FLOP ratio) at each precision.

``--cpu-smoke`` runs the same sections at a size a CPU finishes in about a minute (a tiny CLIP,
a few steps, 24 training captions), so that CI keeps the script working; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
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
    name="gpu", device="cuda", deadline_s=450, test_paths=("tests",),
    throughput_args=("--model", "ViT-B-32", "--batch-size", "214", "--precisions", "fp32,bf16,fp16",
                     "--methods", "floor,harma,lora,full", "--steps", "15", "--warmup", "3", "--device", "cuda"),
    model_args=("--model", "ViT-B-32", "--image_size", "224"),
    batch_size=214, epochs=4, max_steps_per_epoch=None, subset=None, num_workers=12, eval_batch_size=512,
    limits_s={"tests": 100, "throughput": 150, "train": 120, "resume": 90, "evaluate": 60},
)
CPU_SMOKE = Plan(
    name="cpu-smoke", device="cpu", deadline_s=300, test_paths=("tests/test_inject.py",),
    throughput_args=("--model", "tiny", "--model-config", json.dumps(TINY_CLIP), "--image-size", "32",
                     "--batch-size", "4", "--precisions", "fp32", "--methods", "floor,harma", "--steps", "1",
                     "--warmup", "1", "--device", "cpu", "--threads", "1"),
    model_args=("--model", "tiny", "--model_config", json.dumps(TINY_CLIP), "--image_size", "32"),
    batch_size=8, epochs=2, max_steps_per_epoch=2, subset=24, num_workers=0, eval_batch_size=16,
    limits_s={"tests": 120, "throughput": 120, "train": 120, "resume": 120, "evaluate": 90},
)


class Deadline:
    """The time left to all sections together; each subprocess gets its own limit or less."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def limit(self, cap: float) -> float:
        return max(1.0, min(cap, self.end - time.monotonic()))


def run_logged(command: list[str], log: Path, timeout: float) -> dict[str, Any]:
    """Run ``command`` from the repository root with stdout and stderr in ``log``; its exit
    status (None if it ran past ``timeout`` seconds), wall seconds and the log's last lines."""
    start = time.monotonic()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w", encoding="utf-8") as stream:
        try:
            status = subprocess.run(command, cwd=REPOSITORY, stdout=stream, stderr=subprocess.STDOUT,
                                    timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            status = None
    tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
    return {"command": command, "returncode": status, "timed_out": status is None,
            "wall_s": round(time.monotonic() - start, 1), "log": str(log), "log_tail": tail}


def run_tests(plan: Plan, out: Path, deadline: Deadline) -> dict[str, Any]:
    """``pytest -m gpu`` and the counts from its JUnit XML file."""
    junit = out / "gpu_tests.xml"
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rA", "-p", "no:cacheprovider",
               f"--junitxml={junit}", *plan.test_paths]
    result = run_logged(command, out / "logs" / "tests.log", deadline.limit(plan.limits_s["tests"]))
    if junit.exists():
        counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
        for suite in ElementTree.parse(junit).getroot().iter("testsuite"):
            for key in counts:
                counts[key] += int(suite.get(key, 0))
        counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
        result["counts"] = counts
    result["ok"] = result["returncode"] == 0  # 5 would mean that the marker selected no test

    return result


def run_throughput(plan: Plan, out: Path, deadline: Deadline) -> dict[str, Any]:
    """benchmarks/train_throughput.py with ``--json``; its rows and device name."""
    table = out / "throughput.json"
    command = [sys.executable, str(REPOSITORY / "benchmarks" / "train_throughput.py"), *plan.throughput_args,
               "--json", str(table)]
    result = run_logged(command, out / "logs" / "throughput.log", deadline.limit(plan.limits_s["throughput"]))
    if table.exists():  # written after every configuration, so a run cut short still has rows
        measured = json.loads(table.read_text(encoding="utf-8"))
        result.update(device=measured["device"], rows=measured["rows"])
    result["ok"] = result["returncode"] == 0 and "rows" in result
    return result


def _row(rows: list[dict], method: str, precision: str) -> dict | None:
    return next((r for r in rows if r["method"] == method and r["precision"] == precision), None)


def judge_targets(rows: list[dict]) -> list[dict[str, Any]]:
    """The GPU targets from the throughput rows: each with its value, bound and ``met`` (True,
    False, or None where the table lacks what it needs, e.g. peak memory on a CPU)."""
    targets = []
    fp32, bf16 = _row(rows, "harma", "fp32"), _row(rows, "harma", "bf16")
    speedup = bf16["images_per_s"] / fp32["images_per_s"] if fp32 and bf16 else None
    targets.append({"target": "HarMA images/s, bf16 vs fp32", "value": speedup, "bound": ">= 3.0",
                    "met": None if speedup is None else speedup >= 3.0})
    for precision in sorted({r["precision"] for r in rows}, key=["fp32", "bf16", "fp16"].index):
        harma, full = _row(rows, "harma", precision), _row(rows, "full", precision)
        memory = None
        if harma and full and harma["peak_memory_gib"] is not None and full["peak_memory_gib"]:
            memory = harma["peak_memory_gib"] / full["peak_memory_gib"]
        targets.append({"target": f"HarMA peak memory vs full fine-tuning, {precision}", "value": memory,
                        "bound": "<= 0.5", "met": None if memory is None else memory <= 0.5})
        above = harma.get("above_limit") if harma else None
        targets.append({"target": f"HarMA step time above its FLOP limit, {precision}", "value": above,
                        "bound": "<= 0.10", "met": None if above is None else above <= 0.10})
    return targets


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
        from multiprocessing import Pool

        with Pool(min(16, os.cpu_count() or 1)) as pool:
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


def run_rehearsal(plan: Plan, data: Path, out: Path, deadline: Deadline) -> dict[str, Any]:
    """Train (stopped early), resume, evaluate; each step's record, and whether the evaluation
    of the finished run reproduces the test metrics it wrote."""
    start = time.monotonic()
    result: dict[str, Any] = {"ok": False, "steps": {}}
    try:
        result["data"] = prepare_data(plan, data, out)
    except (OSError, ValueError) as error:
        result["error"] = f"{type(error).__name__}: {error}"
        return result
    result["steps"]["images"] = {"wall_s": round(time.monotonic() - start, 1)}
    run_dir, logs = out / "rehearsal_run", out / "logs"
    train = _train_command(plan, result["data"], run_dir)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
    steps = result["steps"]
    steps["train"] = run_logged([*torchrun, *train, "--overwrite", "--stop-after-epoch", str(plan.epochs - 1)],
                                logs / "train.log", deadline.limit(plan.limits_s["train"]))
    if steps["train"]["returncode"] != 0:
        return result
    steps["resume"] = run_logged([sys.executable, *train, "--resume", str(run_dir)], logs / "resume.log",
                                 deadline.limit(plan.limits_s["resume"]))
    if steps["resume"]["returncode"] != 0:
        return result
    try:
        history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        written = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        result["error"] = f"the finished run's files: {type(error).__name__}: {error}"
        return result
    result.update(epochs_logged=len(history), history=history, results=written)
    evaluate = [sys.executable, str(REPOSITORY / "examples" / "evaluate.py"), "--run", str(run_dir), "--json",
                "--device", plan.device, "--batch_size", str(plan.eval_batch_size),
                "--num_workers", str(plan.num_workers)]
    steps["evaluate"] = run_logged(evaluate, logs / "evaluate.log", deadline.limit(plan.limits_s["evaluate"]))
    if steps["evaluate"]["returncode"] != 0:
        return result
    lines = [line for line in Path(steps["evaluate"]["log"]).read_text().splitlines() if line.startswith("{")]
    result["evaluated"] = json.loads(lines[-1]) if lines else {}
    result["evaluation_matches_run"] = same_metrics(result["evaluated"], written.get("test") or {})
    result["ok"] = len(history) == plan.epochs and result["evaluation_matches_run"]
    return result


def _number(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _verdict(met: bool | None) -> str:
    return {True: "met", False: "**not met**", None: "not measured"}[met]


def markdown_report(report: dict[str, Any]) -> str:
    """The report as markdown: targets, the throughput table, tests and rehearsal in short."""
    lines = [f"# GPU check ({report['plan']}): {report['environment']['device']}", "",
             f"torch {report['environment']['torch']}, CUDA {report['environment']['cuda']}, "
             f"{report['wall_s']:.0f} s in all.", "", "## Targets", "", "| target | value | bound | verdict |",
             "|---|---:|---|---|"]
    for target in report["targets"]:
        lines.append(f"| {target['target']} | {_number(target['value'])} | {target['bound']} | "
                     f"{_verdict(target['met'])} |")
    tests = report["sections"]["tests"]
    lines += ["", "## CUDA-only tests", "", f"`{' '.join(tests['command'][2:])}`: exit status "
              f"{tests['returncode']}, {json.dumps(tests.get('counts', 'no JUnit file'))}"
              + (f"; error: {tests['error']}" if tests.get("error") else "")]
    throughput = report["sections"]["throughput"]
    lines += ["", "## Throughput", ""]
    if throughput.get("rows"):
        lines += ["| method | precision | images/s | ms/step | peak memory (GiB) | time vs floor | "
                  "matmul FLOPs vs floor | above the FLOP limit |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for row in throughput["rows"]:
            above = row.get("above_limit")
            lines.append(
                f"| {row['method']} | {row['precision']} | {row['images_per_s']:.1f} | {row['step_ms']:.1f} | "
                f"{_number(row['peak_memory_gib'], 2)} | {_number(row.get('time_vs_floor'))}x | "
                f"{_number(row.get('flops_vs_floor'))}x | {'n/a' if above is None else f'{100 * above:+.1f}%'} |")
    else:
        lines.append(f"no rows (exit status {throughput['returncode']}, {throughput.get('error', 'see')} "
                     f"{throughput['log']})")
    lines += ["", "## Rehearsal of examples/train_rsitmd.py", "", *rehearsal_lines(report["sections"]["rehearsal"])]
    return "\n".join(lines) + "\n"


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


def guarded(section: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A section's record; an exception in the check itself becomes part of the report, so that
    the other sections and both reports still come out."""
    try:
        return section()
    except Exception as error:  # the report must still be written
        return {"ok": False, "error": f"{type(error).__name__}: {error}", "command": ["", "", "(failed)"],
                "returncode": None, "log": "", "steps": {}}


def default_data() -> Path:
    """``../shared/data`` beside the repository, or ``shared/data`` inside it (a device machine's copy)."""
    candidates = (REPOSITORY.parent / "shared" / "data", REPOSITORY / "shared" / "data")
    return next((path for path in candidates if (path / "rsitmd").is_dir()), candidates[0])


def environment(plan: Plan) -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda and plan.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    return {"torch": torch.__version__, "cuda": torch.version.cuda if cuda else None, "device": device,
            "python": sys.version.split()[0]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None,
                        help="folder holding rsitmd/rsitmd_{train,val,test}.json (default: ../shared/data, "
                        "else shared/data in the repository)")
    parser.add_argument("--out", default="gpu_check", help="folder for the reports, logs, images and run")
    parser.add_argument("--cpu-smoke", action="store_true", help="the CI size on the CPU (about a minute)")
    parser.add_argument("--sections", default="tests,throughput,rehearsal", help="comma-separated subset")
    args = parser.parse_args(argv)
    plan = CPU_SMOKE if args.cpu_smoke else GPU
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = environment(plan)
    if plan.device == "cuda" and env["cuda"] is None:
        parser.error("no CUDA device here; pass --cpu-smoke for the CPU-sized run")
    start, deadline = time.monotonic(), Deadline(plan.deadline_s)
    chosen = args.sections.split(",")
    skipped = {"ok": None, "skipped": True, "command": ["", "", "(not run)"], "returncode": None, "log": ""}
    runners = {"tests": lambda: run_tests(plan, out, deadline),
               "throughput": lambda: run_throughput(plan, out, deadline),
               "rehearsal": lambda: run_rehearsal(plan, Path(args.data or default_data()), out, deadline)}
    sections = {name: guarded(runner) if name in chosen else {**skipped, "error": "not selected", "steps": {}}
                for name, runner in runners.items()}
    report = {"plan": plan.name, "environment": env, "sections": sections,
              "targets": judge_targets(sections["throughput"].get("rows", [])),
              "wall_s": time.monotonic() - start}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    (out / "gpu_check.md").write_text(markdown_report(report), encoding="utf-8")
    print(markdown_report(report))
    return report


if __name__ == "__main__":
    main()
