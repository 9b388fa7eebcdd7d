"""Training runs facing faults: a diverging loss, unreadable images, runs killed at any point,
folders left behind by failed runs, contradictory resume options."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_trainer import REPO, make_config, read_metrics, without_times

from harma.losses import HarmaLoss, HarmaLossOutput
from harma.training import TrainConfig, parse_args, train
from harma.training.data import ImageReadError
from harma.training.state import json_safe
from harma.training.synthetic import make_synthetic_dataset
from harma.training.trainer import NonFiniteError

IMAGE_SIZE = 32


@pytest.fixture()
def data(tmp_path):
    # A fresh copy per test: several tests damage images.
    return make_synthetic_dataset(tmp_path / "data", num_train_images=16, num_val_images=8, num_test_images=8,
                                  image_size=IMAGE_SIZE, seed=3)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    data = make_synthetic_dataset(tmp_path_factory.mktemp("data"), num_train_images=16, num_val_images=8,
                                  num_test_images=8, image_size=IMAGE_SIZE, seed=3)
    output_dir = tmp_path_factory.mktemp("runs") / "reference"
    config = make_config(data, output_dir, max_steps_per_epoch=2)
    return data, config, train(config)


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_same_tensors(first: Path, second: Path) -> None:
    a, b = tensors_of(first), tensors_of(second)
    assert set(a) == set(b)
    assert all(torch.equal(a[name], b[name]) for name in a), f"{first} and {second} differ"


class NaNAtCalls(HarmaLoss):
    """The library's loss, returning a NaN loss on the given (1-based) forward calls."""

    calls: tuple[int, ...] = ()

    def forward(self, *args, **kwargs) -> HarmaLossOutput:
        output = super().forward(*args, **kwargs)
        self.count = getattr(self, "count", 0) + 1
        if self.count in self.calls:
            output.loss = output.loss * float("nan")
        return output


def nan_loss_at(monkeypatch, *calls: int) -> None:
    monkeypatch.setattr(NaNAtCalls, "calls", calls)
    monkeypatch.setattr("harma.training.trainer.HarmaLoss", NaNAtCalls)


# ------------------------------------------------------------------------ non-finite


def test_a_nan_loss_stops_the_run_naming_the_step_and_keeps_the_finite_epoch(data, tmp_path, monkeypatch):
    nan_loss_at(monkeypatch, 4)  # epoch 2, step 4 (two steps per epoch)
    config = make_config(data, tmp_path / "run", max_steps_per_epoch=2, epochs=3)
    with pytest.raises(NonFiniteError, match=r"step 4 \(epoch 2\): the loss is not finite.*lower the learning rate"):
        train(config)
    run = tmp_path / "run"
    assert not (run / "results.json").exists()
    assert all(torch.isfinite(t).all() for t in tensors_of(run / "last.safetensors").values())
    assert [line["epoch"] for line in read_metrics(run)] == [1]  # valid JSON, the finished epoch only


def test_the_skip_policy_skips_nan_steps_up_to_its_limit(data, tmp_path, monkeypatch):
    nan_loss_at(monkeypatch, 2)
    results = train(make_config(data, tmp_path / "skip", max_steps_per_epoch=2, nonfinite="skip"))
    assert results["finished"] is True and results["skipped_steps"] == 1
    lines = read_metrics(tmp_path / "skip")
    assert lines[0]["skipped_steps"] == 1 and all(value == value for value in lines[0]["train"].values())
    nan_loss_at(monkeypatch, 1, 2, 3)
    config = make_config(data, tmp_path / "limit", max_steps_per_epoch=2, nonfinite="skip", max_skipped_steps=2)
    with pytest.raises(NonFiniteError, match=r"step 3 .*after 2 skipped step\(s\)"):
        train(config)


def test_non_finite_weights_are_never_saved(data, tmp_path, monkeypatch):
    original = torch.optim.AdamW.step

    def poisoning_step(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("inf"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoning_step)
    config = make_config(data, tmp_path / "run", max_steps_per_epoch=1, epochs=1, nonfinite="skip")
    with pytest.raises(NonFiniteError, match=r"after epoch 1 .* are not finite.*nothing of this epoch is saved"):
        train(config)
    assert not (tmp_path / "run" / "last.safetensors").exists()
    assert not (tmp_path / "run" / "best.safetensors").exists()


def test_metrics_json_stays_valid_with_non_finite_numbers():
    line = {"train": {"loss": float("nan")}, "lr": float("inf"), "values": [1.0, float("-inf")]}
    assert json.loads(json.dumps(json_safe(line), allow_nan=False)) == {
        "train": {"loss": None}, "lr": None, "values": [1.0, None],
    }


def test_the_command_line_exits_non_zero_when_the_run_diverges(data, tmp_path, monkeypatch, capsys):
    from harma.training import main

    nan_loss_at(monkeypatch, 1)
    config_file = tmp_path / "recipe.json"
    make_config(data, tmp_path / "run", max_steps_per_epoch=2).save(config_file)
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(config_file)])
    assert exit_info.value.code == 3
    assert "step 1 (epoch 1): the loss is not finite" in capsys.readouterr().err


# ---------------------------------------------------------------------- bad images


def damage(path: Path) -> None:
    path.write_bytes(b"this is not an image")


def test_a_corrupt_training_image_in_a_worker_is_named_with_its_entry(data, tmp_path):
    entries = json.loads(data.train_file.read_text())
    damage(data.image_root / entries[0]["image"])
    config = make_config(data, tmp_path / "run", num_workers=1, augment=False)
    with pytest.raises(ImageReadError) as error:
        train(config)
    message = str(error.value)
    named = re.search(rf"entry (\d+) of '{re.escape(str(data.train_file))}'", message)
    assert named and entries[int(named.group(1))]["image"] == entries[0]["image"], message
    assert entries[0]["image"] in message and "Traceback" not in message
    # The run saved nothing, so the same command starts it again once the image is fixed.
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.json"]


def test_a_corrupt_validation_image_loses_no_training(data, reference, tmp_path):
    _, reference_config, reference_results = reference
    val_entries = json.loads(data.val_file.read_text())
    image = data.image_root / val_entries[3]["image"]
    good = image.read_bytes()
    damage(image)
    config = make_config(data, tmp_path / "run", max_steps_per_epoch=2)
    with pytest.raises(ImageReadError, match=rf"entry 3 of '{data.val_file}'"):
        train(config)
    assert (tmp_path / "run" / "last.safetensors").is_file()  # epoch 1 was saved before validating
    image.write_bytes(good)
    results = train(config, resume=True)
    reference_dir = Path(reference_config.output_dir)
    assert_same_tensors(tmp_path / "run" / "best.safetensors", reference_dir / "best.safetensors")
    assert results["test"] == reference_results["test"]
    assert without_times(read_metrics(tmp_path / "run")) == without_times(read_metrics(reference_dir))


# -------------------------------------------------------------- folders and options


def test_a_folder_without_checkpoint_is_rerun_by_the_same_command_or_by_resume(data, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    make_config(data, run).save(run / "config.json")
    (run / ".last_state.pt.x1y2.tmp").write_bytes(b"half")
    config = make_config(data, run, max_steps_per_epoch=1, epochs=1)
    assert train(config, resume=True)["finished"] is True
    assert not list(run.glob(".*.tmp"))
    for name in ("last.safetensors", "last_state.pt", "results.json"):
        (run / name).unlink()
    (run / "best.safetensors").unlink()
    assert train(config)["finished"] is True  # only config.json and metrics were left


def test_a_folder_with_a_checkpoint_is_still_protected(reference, tmp_path):
    _, config, _ = reference
    copy = tmp_path / "copy"
    shutil.copytree(config.output_dir, copy)
    with pytest.raises(FileExistsError, match="not empty"):
        train(config.replace(output_dir=str(copy)))


def folder_snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file of ``folder`` with its bytes and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(capsys, exit_info) -> str:
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "error: " in lines[0] and "Traceback" not in captured.err, captured.err
    return lines[0]


def test_a_missing_or_unreadable_config_file_is_one_error_line(reference, tmp_path, capsys):
    from harma.training import main

    _, config, _ = reference
    copy = tmp_path / "copy"
    shutil.copytree(config.output_dir, copy)
    before = folder_snapshot(copy)
    (tmp_path / "folder.json").mkdir()
    files = {"missing.json": None, "folder.json": None, "broken.json": b'{"lr": 1e-4,',
             "list.json": b"[1, 2]", "binary.json": b"\xff\xfe\x00"}
    expected = {"missing.json": "no config file at", "folder.json": "is a folder, not a config file",
                "broken.json": "is not valid JSON", "list.json": "must hold a JSON object",
                "binary.json": "is not valid JSON"}
    for name, content in files.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        for extra in ([], ["--resume", str(copy)]):
            with pytest.raises(SystemExit) as exit_info:
                main(["--config", str(tmp_path / name), *extra])
            line = one_error_line(capsys, exit_info)
            assert "--config: " in line and name in line and expected[name] in line, line
    assert folder_snapshot(copy) == before


def test_a_val_file_listing_an_image_twice_stops_the_run_before_anything_is_replaced(reference, tmp_path):
    data, config, _ = reference
    copy = tmp_path / "copy"
    shutil.copytree(config.output_dir, copy)
    before = folder_snapshot(copy)
    entries = json.loads(data.val_file.read_text())
    val_file = tmp_path / "val.json"
    val_file.write_text(json.dumps([*entries, {**entries[1], "caption": ["another caption"]}]))
    with pytest.raises(ValueError, match=rf"entry {len(entries)}: image '{re.escape(entries[1]['image'])}' is "
                                         r"listed again \(entry 1 lists"):
        train(config.replace(output_dir=str(copy), val_file=str(val_file)), overwrite=True)
    assert folder_snapshot(copy) == before  # --overwrite replaces the run's files only once the inputs are good


def test_an_unwritable_output_folder_is_one_error_line_before_anything_is_built(data, tmp_path, monkeypatch,
                                                                              capsys):
    from harma.training import main

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the output folder was checked")

    monkeypatch.setattr("harma.training.trainer.build_model", no_model)
    config_file = tmp_path / "recipe.json"
    make_config(data, tmp_path / "run").save(config_file)
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(config_file), "--output_dir", str(tmp_path / "a_file" / "run")])
    line = one_error_line(capsys, exit_info)
    assert f"output_dir '{tmp_path / 'a_file' / 'run'}' cannot be created: '{tmp_path / 'a_file'}' is a file" in line

    # A folder this user may not write into (or a read-only file system): what os.access says
    # for another user's folder; as root every folder is writable, so the answer is given here.
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != locked and real_access(path, mode, **kw))
    for output_dir in (locked / "run", locked / "deeper" / "run"):
        with pytest.raises(SystemExit) as exit_info:
            main(["--config", str(config_file), "--output_dir", str(output_dir)])
        line = one_error_line(capsys, exit_info)
        assert f"output_dir '{output_dir}' cannot be written: no permission to write in '{locked}'" in line, line
    assert not list(locked.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_cuda_device_without_cuda_is_one_error_line_and_creates_nothing(data, tmp_path, capsys):
    from harma.training import main

    config_file = tmp_path / "recipe.json"
    make_config(data, tmp_path / "run").save(config_file)
    for device in ("cuda", "cuda:1"):
        with pytest.raises(SystemExit) as exit_info:
            main(["--config", str(config_file), "--device", device])
        line = one_error_line(capsys, exit_info)
        assert f"TrainConfig.device: CUDA is not available on this machine: use cpu or auto, not '{device}'" in line
    assert not (tmp_path / "run").exists()


def test_resume_of_a_run_killed_before_its_folder_existed_starts_it(data, tmp_path, capsys):
    # A requeue script that always passes --resume: the first start finds no folder at all.
    config = make_config(data, tmp_path / "runs" / "run", max_steps_per_epoch=1, epochs=1)
    assert train(config, resume=True)["finished"] is True
    assert "does not exist yet: nothing to resume, starting the run from the beginning" in capsys.readouterr().out
    assert (tmp_path / "runs" / "run" / "best.safetensors").is_file()
    second = tmp_path / "other"
    parsed = parse_args(["--resume", str(second), "--train_files", str(data.train_file)])
    assert parsed.resume == str(second)
    # The same for a last_state.pt path in a missing folder.
    assert train(config.replace(output_dir=str(second)), resume=second / "last_state.pt")["finished"] is True


def test_stop_after_epoch_below_one_is_an_argument_error(capsys):
    for value in ("0", "-1", "x"):
        with pytest.raises(SystemExit) as exit_info:
            parse_args(["--stop-after-epoch", value])
        assert f"argument --stop-after-epoch: expected an integer >= 1, got '{value}'" in one_error_line(
            capsys, exit_info)
    with pytest.raises(ValueError, match="stop_after_epoch must be an integer >= 1, got 0"):
        train(TrainConfig(), stop_after_epoch=0)


def test_resume_with_another_output_dir_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        parse_args(["--resume", str(tmp_path / "a"), "--output_dir", str(tmp_path / "b")])
    parsed = parse_args(["--resume", str(tmp_path / "a"), "--output_dir", str(tmp_path / "a")])
    assert parsed.resume == str(tmp_path / "a")


# ------------------------------------------------------------------ fault injection

# Runs the training command line in a child process that kills itself with SIGKILL at one
# point: the N-th call of a function (for writes: after the temporary file is written, before
# it is renamed into place).
KILLER = r"""
import functools, os, signal, sys
import harma.io, harma.training.state as state, harma.training.trainer as trainer
from harma.training import main

point, count = sys.argv[1], int(sys.argv[2])
calls = {"n": 0}

def kill_at_call(function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == count:
            os.kill(os.getpid(), signal.SIGKILL)
        return function(*args, **kwargs)
    return wrapper

def kill_in_write(name):
    original = harma.io.atomic_write
    def atomic_write(path, write):
        if os.path.basename(str(path)) == name:
            def write_then_die(target):
                write(target)
                calls["n"] += 1
                if calls["n"] == count:
                    os.kill(os.getpid(), signal.SIGKILL)
            return original(path, write_then_die)
        return original(path, write)
    harma.io.atomic_write = state.atomic_write = atomic_write

if point == "optimizer-step":
    trainer.Trainer._optimizer_step = kill_at_call(trainer.Trainer._optimizer_step)
elif point == "validation":
    trainer.Trainer.evaluate = kill_at_call(trainer.Trainer.evaluate)
else:
    kill_in_write(point)
main(sys.argv[3:])
"""


def run_killed(arguments: list[str], point: str, count: int) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-c", KILLER, point, str(count), *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)


KILL_POINTS = [
    ("optimizer-step", 3),          # mid-epoch 2 (two steps per epoch)
    ("last.safetensors", 1),        # writing epoch 1's weights, before its validation
    ("best.safetensors", 1),        # copying epoch 1's weights to best, after its validation
    ("last_state.pt", 2),           # writing epoch 1's state after its validation
]


@pytest.mark.slow
@pytest.mark.parametrize("point, count", KILL_POINTS, ids=[f"{p}-{c}" for p, c in KILL_POINTS])
def test_a_run_killed_at_any_point_resumes_to_the_uninterrupted_tensors(reference, tmp_path, point, count):
    _, config, reference_results = reference
    recipe = tmp_path / "recipe.json"
    config.replace(output_dir=str(tmp_path / "run")).save(recipe)
    killed = run_killed(["--config", str(recipe)], point, count)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
    run, reference_dir = tmp_path / "run", Path(config.output_dir)
    train(config.replace(output_dir=str(run)), resume=True)
    for name in ("last.safetensors", "best.safetensors"):
        assert_same_tensors(run / name, reference_dir / name)
    assert json.loads((run / "results.json").read_text())["test"] == reference_results["test"]
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]
