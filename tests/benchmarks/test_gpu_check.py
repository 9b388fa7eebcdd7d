"""benchmarks/gpu_check.py: the CPU-smoke size runs every section and writes both reports; the
targets are judged from the throughput rows as documented."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from repo_scripts import load_repo_script

REPOSITORY = Path(__file__).resolve().parents[2]

SCRIPT = REPOSITORY / "benchmarks" / "gpu_check.py"
DATA = REPOSITORY.parent / "shared" / "data"


def load_script():
    return load_repo_script("benchmarks/gpu_check.py")


def row(method: str, precision: str, images_per_s: float, memory: float | None, above: float | None) -> dict:
    return {"method": method, "precision": precision, "images_per_s": images_per_s, "peak_memory_gib": memory,
            "above_limit": above}


def test_targets_are_met_not_met_or_not_measured():
    check = load_script()
    rows = [row("harma", "fp32", 100.0, 10.0, 0.05), row("full", "fp32", 60.0, 30.0, 0.2),
            row("harma", "bf16", 250.0, 8.0, 0.12), row("full", "bf16", 150.0, 12.0, 0.3)]
    verdicts = {t["target"]: (t["value"], t["met"]) for t in check.judge_targets(rows)}
    assert verdicts["HarMA images/s, bf16 vs fp32"] == (2.5, False)
    assert verdicts["HarMA peak memory vs full fine-tuning, fp32"] == (pytest.approx(1 / 3), True)
    assert verdicts["HarMA peak memory vs full fine-tuning, bf16"] == (pytest.approx(2 / 3), False)
    assert verdicts["HarMA step time above its FLOP limit, fp32"] == (0.05, True)
    assert verdicts["HarMA step time above its FLOP limit, bf16"] == (0.12, False)
    cpu_rows = [row("harma", "fp32", 10.0, None, None), row("full", "fp32", 5.0, None, None)]
    assert all(t["met"] is None for t in check.judge_targets(cpu_rows))


def test_placeholder_images_are_fixed_by_their_name():
    check = load_script()
    first, again, other = (check.placeholder_image(name) for name in ("train/a_1.tif", "train/a_1.tif", "val/b.tif"))
    assert first.size == (256, 256) and first.mode == "RGB"
    assert first.tobytes() == again.tobytes() != other.tobytes()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_the_gpu_size_refuses_to_run_without_cuda(tmp_path):
    with pytest.raises(SystemExit):
        load_script().main(["--out", str(tmp_path)])


@pytest.mark.slow
def test_cpu_smoke_runs_every_section_and_writes_both_reports(tmp_path):
    if not (DATA / "rsitmd" / "rsitmd_train.json").exists():
        pytest.skip(f"the RSITMD annotation files are not in {DATA}")
    out = tmp_path / "check"
    # A subprocess, as CI runs it: its sections start subprocesses of their own.
    completed = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--data", str(DATA), "--out", str(out)],
                               cwd=REPOSITORY, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text(encoding="utf-8"))
    markdown = (out / "gpu_check.md").read_text(encoding="utf-8")
    tests, throughput, rehearsal = (report["sections"][name] for name in ("tests", "throughput", "rehearsal"))
    assert tests["ok"] and tests["counts"]["failures"] == tests["counts"]["errors"] == 0
    assert tests["counts"]["tests"] >= 1  # the CUDA test is collected (and skipped on the CPU)
    assert throughput["ok"] and [(r["method"], r["precision"]) for r in throughput["rows"]] == [
        ("floor", "fp32"), ("harma", "fp32")]
    assert throughput["rows"][0]["time_vs_floor"] == throughput["rows"][0]["flops_vs_floor"] == 1.0
    assert throughput["rows"][1]["flops_vs_floor"] > 1.0
    assert rehearsal["ok"] and rehearsal["epochs_logged"] == 2 and rehearsal["evaluation_matches_run"]
    assert [rehearsal["steps"][name]["returncode"] for name in ("train", "resume", "evaluate")] == [0, 0, 0]
    assert rehearsal["history"][-1]["step"] == 4 and "val" in rehearsal["history"][-1]  # 2 epochs x 2 steps
    assert rehearsal["data"]["images"] == len(list(Path(rehearsal["data"]["image_root"]).rglob("*.tif")))
    for target in report["targets"]:
        assert target["target"] in markdown
    assert "## Rehearsal of examples/train_rsitmd.py" in markdown and "evaluate.py --run` reproduces them: True" in markdown
