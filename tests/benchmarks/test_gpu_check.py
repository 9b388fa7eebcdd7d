"""benchmarks/gpu_check.py and the files around it: the CPU-smoke size runs every section and
writes both reports; targets and figures come from the throughput rows as documented; a timed-out
section ends every process it started; a section cut short keeps its log; on a GPU a test run
that only skipped fails; the preparation step and the dry run's rules on what comes back."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from repo_scripts import load_repo_script

REPOSITORY = Path(__file__).resolve().parents[2]

SCRIPT = REPOSITORY / "benchmarks" / "gpu_check.py"
DATA = next((path for path in (REPOSITORY / ".gpu_data", REPOSITORY.parent / "shared" / "data")
             if (path / "rsitmd" / "rsitmd_train.json").exists()), REPOSITORY.parent / "shared" / "data")


def load_script():
    return load_repo_script("benchmarks/gpu_check.py")


def row(method: str, precision: str, images_per_s: float, memory: float | None, above: float | None,
        mfu: float | None = None) -> dict:
    return {"method": method, "precision": precision, "images_per_s": images_per_s, "peak_memory_gib": memory,
            "above_limit": above, "batch_size": 214, "mfu": mfu}


def test_targets_are_met_not_met_or_not_measured_and_figures_are_reported():
    check = load_script()
    rows = [row("harma", "fp32", 100.0, 10.0, 0.05, 0.2), row("full", "fp32", 60.0, 30.0, 0.2, 0.4),
            row("harma", "bf16", 250.0, 8.0, 0.12, 0.3), row("full", "bf16", 150.0, 12.0, 0.3, 0.5)]
    judged = {t["target"]: t for t in check.judge_targets(rows)}
    verdicts = {name: (t["value"], t["met"]) for name, t in judged.items()}
    assert verdicts["HarMA images/s, bf16 vs fp32 with TF32"] == (2.5, None)
    assert judged["HarMA images/s, bf16 vs fp32 with TF32"]["kind"] == "figure"
    assert verdicts["HarMA peak memory vs full fine-tuning at batch 214, fp32"] == (pytest.approx(1 / 3), True)
    assert verdicts["HarMA peak memory vs full fine-tuning at batch 214, bf16"] == (pytest.approx(2 / 3), False)
    assert verdicts["HarMA step time above its FLOP limit, fp32"] == (0.05, True)
    assert verdicts["HarMA step time above its FLOP limit, bf16"] == (0.12, False)
    assert verdicts["MFU of full fine-tuning, bf16"] == (0.5, None) and verdicts["MFU of HarMA, fp32"] == (0.2, None)
    cpu_rows = [row("harma", "fp32", 10.0, None, None), row("full", "fp32", 5.0, None, None)]
    assert all(t["met"] is None for t in check.judge_targets(cpu_rows))
    report = {"plan": "gpu", "wall_s": 1.0, "budget_s": 390, "targets": list(judged.values()), "sections": {},
              "environment": {"device": "d", "torch": "t", "cuda": None, "python": "3", "dense_bf16_peak": None}}
    markdown = check.markdown_report(report)
    assert "| HarMA step time above its FLOP limit, bf16 | 0.120 | <= 0.10 | **not met** |" in markdown
    assert "| MFU of HarMA, bf16 | 0.300 | reported (of the dense bf16 peak) | reported |" in markdown


def test_utilisation_is_matmul_flops_per_second_over_the_dense_bf16_peak():
    check = load_script()
    assert check.dense_bf16_peak("NVIDIA H100 80GB HBM3") == check.dense_bf16_peak("NVIDIA H200") == 989.5e12
    assert check.dense_bf16_peak("NVIDIA H100 PCIe") == 756.5e12 and check.dense_bf16_peak("CPU (2 cores)") is None
    rows = [{"matmul_flops": 4e12, "step_ms": 10.0}, {"matmul_flops": 4e12, "step_ms": 20.0}]
    check.add_utilisation(rows, 1e15)
    assert [r["matmul_flops_per_s"] for r in rows] == [4e14, 2e14] and [r["mfu"] for r in rows] == [0.4, 0.2]
    check.add_utilisation(rows, None)
    assert rows[0]["mfu"] is None and rows[0]["matmul_flops_per_s"] == 4e14


def test_placeholder_images_are_fixed_by_their_name():
    check = load_script()
    first, again, other = (check.placeholder_image(name) for name in ("train/a_1.tif", "train/a_1.tif", "val/b.tif"))
    assert first.size == (256, 256) and first.mode == "RGB"
    assert first.tobytes() == again.tobytes() != other.tobytes()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_the_gpu_size_refuses_to_run_without_cuda(tmp_path):
    with pytest.raises(SystemExit):
        load_script().main(["--out", str(tmp_path)])


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc")
def test_a_timeout_ends_every_process_the_command_started(tmp_path):
    # Like torchrun: a parent whose worker leads a session of its own, and the worker's own child
    # (a data-loader worker). The worker writes both pids once the child runs.
    pids = tmp_path / "pids"
    worker = ("import os, subprocess, sys, time; "
              "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{c.pid}}'); time.sleep(60)")
    parent = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {worker!r}], " \
             "start_new_session=True); time.sleep(60)"
    start = time.monotonic()
    record = load_script().run_logged([sys.executable, "-c", parent], tmp_path / "log.txt", timeout=4)
    assert record["timed_out"] and record["returncode"] is None and time.monotonic() - start < 30
    started = [int(pid) for pid in pids.read_text().split()]
    for _ in range(50):  # signalled; orphans are reaped by init a moment later
        if not any(alive(pid) for pid in started):
            break
        time.sleep(0.1)
    assert not any(alive(pid) for pid in started)


def test_on_a_gpu_a_test_run_where_everything_skipped_fails(tmp_path):
    tests = tmp_path / "test_skipping.py"
    tests.write_text("import pytest\n\n@pytest.mark.gpu\ndef test_needs_cuda():\n    pytest.skip('no CUDA')\n")
    check = load_script()
    deadline = check.Deadline(120)
    for device, ok in (("cuda", False), ("cpu", True)):
        plan = dataclasses.replace(check.CPU_SMOKE, device=device)
        record: dict = {}
        check.run_pytest(plan, "tests", [str(tests)], ["-W", "ignore"], tmp_path / device, deadline, record)
        assert record["returncode"] == 0 and record["counts"]["skipped"] == 1 and record["ok"] is ok, record
        assert record.get("error") == (None if ok else "no CUDA test ran on the GPU: 1 skipped, none passed")


def test_a_section_whose_file_is_cut_short_keeps_its_log(tmp_path, monkeypatch):
    check = load_script()

    def cut_short(command, log, timeout):
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("floor fp32: 10 images/s\n")
        (tmp_path / "throughput.json").write_text('{"device": "x", "rows": [{"meth')
        return {"command": command, "returncode": None, "timed_out": True, "wall_s": 1.0, "log": str(log),
                "log_tail": ["floor fp32: 10 images/s"]}

    monkeypatch.setattr(check, "run_logged", cut_short)
    record = check.guarded(lambda r: check.run_throughput(check.CPU_SMOKE, tmp_path, check.Deadline(10), r))
    assert record["ok"] is False and record["timed_out"] and record["log_tail"] == ["floor fp32: 10 images/s"]
    assert record["error"].startswith("throughput.json unreadable (JSONDecodeError")
    (tmp_path / "cut.xml").write_text("<testsuites><testsuite tests='3'")
    with pytest.raises(ValueError, match="cut.xml unreadable"):
        check.junit_counts(tmp_path / "cut.xml")
    # An exception inside a section keeps what the section had recorded.
    partial = check.guarded(lambda r: (r.update(log="kept.log"), 1 / 0))
    assert partial.items() >= {"log": "kept.log", "ok": False, "error": "ZeroDivisionError: division by zero"}.items()


def test_the_device_script_refuses_to_run_without_out():
    env = {key: value for key, value in os.environ.items() if key != "OUT"}
    completed = subprocess.run(["bash", str(REPOSITORY / "benchmarks" / "gpu_check.sh")], env=env,
                               capture_output=True, text=True, timeout=60)
    assert completed.returncode == 2 and "error: set OUT" in completed.stderr
    completed = subprocess.run(["bash", str(REPOSITORY / "benchmarks" / "gpu_check.sh"), "--gpu"],
                               env={**env, "OUT": "/nonexistent/out"}, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 2 and "usage:" in completed.stderr


def test_preparation_keeps_one_pure_wheel_of_each_and_names_missing_annotations(tmp_path, monkeypatch):
    prep = load_repo_script("benchmarks/gpu_prep.py", cached=False)
    monkeypatch.setattr(prep, "WHEELHOUSE", tmp_path / "wheels")
    (tmp_path / "wheels").mkdir()
    for name, version in prep.WHEELS.items():
        (tmp_path / "wheels" / f"{name}-{version}-py3-none-any.whl").write_bytes(b"")
    (tmp_path / "wheels" / "ftfy-6.0.0-py3-none-any.whl").write_bytes(b"")  # two versions stop an install
    kept = prep.fetch_wheels()  # everything is in place: no download
    assert sorted(p.name for p in (tmp_path / "wheels").iterdir()) == sorted(p.name for p in kept)
    assert len(kept) == len(prep.WHEELS)
    with pytest.raises(SystemExit, match=r"lacks rsitmd/rsitmd_train.json.*SHARED_DATA="):
        prep.copy_annotations(tmp_path / "no_shared_data")


def test_the_dry_run_checks_what_would_come_back(tmp_path):
    dry_run = load_repo_script("benchmarks/gpu_dry_run.py", cached=False)
    (tmp_path / "gpu_check.json").write_text("{}")
    assert dry_run.returned_files(tmp_path)[1] == []
    for index in range(8):
        (tmp_path / f"extra_{index}.txt").write_text("x")
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "b" / "c" / "deep.txt").write_text("x")
    (tmp_path / "bad name.txt").write_text("x")
    problems = dry_run.returned_files(tmp_path)[1]
    assert "11 files, more than 8" in problems
    assert any("deep.txt: more than 2 folders down" in p for p in problems)
    assert any(p.startswith("bad name.txt: name outside") for p in problems)


@pytest.mark.slow
def test_cpu_smoke_runs_every_section_and_writes_both_reports(tmp_path):
    if not (DATA / "rsitmd" / "rsitmd_train.json").exists():
        pytest.skip(f"the RSITMD annotation files are not in {DATA}")
    out, reports = tmp_path / "check", tmp_path / "reports"
    # A subprocess, as CI runs it: its sections start subprocesses of their own.
    completed = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--data", str(DATA), "--out", str(out),
                                "--report-dir", str(reports)], cwd=REPOSITORY, capture_output=True, text=True,
                               timeout=900)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    report = json.loads((reports / "gpu_check.json").read_text(encoding="utf-8"))
    markdown = (reports / "gpu_check.md").read_text(encoding="utf-8")
    assert sorted(path.name for path in reports.iterdir()) == ["gpu_check.json", "gpu_check.md"]
    sdpa, tests, throughput, rehearsal = (report["sections"][name] for name in check_sections())
    for section in (sdpa, tests):
        assert section["ok"] and section["counts"]["failures"] == section["counts"]["errors"] == 0
    assert sdpa["counts"]["skipped"] >= 19  # the CUDA numerics are collected (and skip on the CPU)
    assert tests["counts"]["tests"] >= 2
    assert throughput["ok"] and [(r["method"], r["precision"]) for r in throughput["rows"]] == [
        ("floor", "fp32"), ("harma", "fp32")]
    assert throughput["rows"][0]["time_vs_floor"] == throughput["rows"][0]["flops_vs_floor"] == 1.0
    assert throughput["rows"][1]["flops_vs_floor"] > 1.0 and throughput["rows"][1]["mfu"] is None
    assert rehearsal["ok"] and rehearsal["epochs_logged"] == 2 and rehearsal["evaluation_matches_run"]
    assert [rehearsal["steps"][name]["returncode"] for name in ("train", "resume", "evaluate")] == [0, 0, 0]
    assert rehearsal["history"][-1]["step"] == 4 and "val" in rehearsal["history"][-1]  # 2 epochs x 2 steps
    assert rehearsal["data"]["images"] == len(list(Path(rehearsal["data"]["image_root"]).rglob("*.tif")))
    assert report["ok"] and report["sections"]["setup"]["skipped"]
    for target in report["targets"]:
        assert target["target"] in markdown
    assert "## Rehearsal of examples/train_rsitmd.py" in markdown and "evaluate.py --run` reproduces them: True" in markdown


def check_sections() -> tuple[str, ...]:
    return load_script().SECTIONS


def test_a_failing_throughput_configuration_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    throughput = load_repo_script("benchmarks/train_throughput.py", cached=False)

    def measure(method, precision, args, device):
        if method == "harma":
            raise RuntimeError("CUDA out of memory")
        return {"method": method, "precision": precision, "batch_size": 4, "steps": 1, "images_per_s": 1.0,
                "step_ms": 10.0, "peak_memory_gib": None, "trainable_parameters": 0, "matmul_flops": 100}

    monkeypatch.setattr(throughput, "measure", measure)
    table = tmp_path / "throughput.json"
    with pytest.raises(SystemExit, match="1 configuration.*harma fp32: RuntimeError: CUDA out of memory"):
        throughput.main(["--device", "cpu", "--methods", "floor,harma,full", "--json", str(table)])
    written = json.loads(table.read_text())
    assert [row["method"] for row in written["rows"]] == ["floor", "full"]
    assert written["failed"] == [{"method": "harma", "precision": "fp32", "error": "RuntimeError: CUDA out of memory"}]


def pytest_without_sybil(*arguments: str) -> subprocess.CompletedProcess:
    code = f"import sys; sys.modules['sybil'] = None; import pytest; sys.exit(pytest.main({list(arguments)!r}))"
    return subprocess.run([sys.executable, "-c", code], cwd=REPOSITORY, capture_output=True, text=True, timeout=300)


def test_the_gpu_tests_run_where_the_dev_extra_is_missing():
    # The GPU machine has no Sybil: the root conftest imported it, and both test sections of the
    # check failed at collection before running anything.
    gpu = pytest_without_sybil("-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/test_cuda_numerics.py")
    assert gpu.returncode == 0, (gpu.stdout + gpu.stderr)[-2000:]
    assert re.search(r"\d+ (skipped|passed)", gpu.stdout), gpu.stdout[-2000:]
    page = pytest_without_sybil("-q", "-p", "no:cacheprovider", "README.md")
    assert page.returncode == 1 and "README.md::snippets" in page.stdout, page.stdout[-2000:]
    assert "needs Sybil (pip install -e '.[dev]')" in page.stdout  # never a silent pass
