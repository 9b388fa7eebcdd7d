"""Training curves (harma.training.curves) from metrics files and from training runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PIL import Image
from test_trainer import IMAGE_SIZE, make_config

from harma.training import train
from harma.training.curves import plot_training_curves
from harma.training.state import CURVES_NAME
from harma.training.synthetic import make_synthetic_dataset

REPO = Path(__file__).resolve().parents[2]
DATA_URI_PREFIX = "data:image/png;base64,"
HOSTILE_CAPTION = '<script>alert("x")</script> & <b>bold</b>'



@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return make_synthetic_dataset(root, num_train_images=16, num_val_images=8, num_test_images=12,
                                   image_size=IMAGE_SIZE, seed=5)



# ------------------------------------------------------------------------ training curves


def write_metrics(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def val(mean_recall: float) -> dict:
    return {"i2t_r1": 1.0, "i2t_r5": 2.0, "i2t_r10": 3.0, "t2i_r1": 1.0, "t2i_r5": 2.0, "t2i_r10": 3.0,
            "mean_recall": mean_recall}


def test_plot_training_curves_from_a_hand_written_metrics_file(tmp_path):
    pytest.importorskip("matplotlib")
    lines = [{"epoch": 0, "step": 0, "val": val(10.0), "time_s": 0.0}]
    for epoch, (loss, recall) in enumerate([(3.0, 20.0), (2.5, 31.0), (2.2, 29.0)], start=1):
        lines.append({"epoch": epoch, "step": 10 * epoch, "lr": 1e-4, "temperature": 0.07, "best_epoch": 2,
                      "train": {"loss": loss, "contrastive": loss - 0.5, "triplet": 0.5, "affiliation": 0.1},
                      "val": val(recall), "time_s": 1.0})
    metrics = write_metrics(tmp_path / "metrics.jsonl", lines)
    out = plot_training_curves(metrics, tmp_path / "plots" / "curves.png", title="hand written")
    with Image.open(out) as picture:
        assert picture.format == "PNG" and 800 <= picture.width <= 1400 and 300 <= picture.height <= 600
    # Not validated yet, and a run without validation: still a picture.
    only_train = [{key: value for key, value in line.items() if key != "val"} for line in lines[1:]]
    only_train_file = write_metrics(tmp_path / "train_only.jsonl", only_train)
    plot_training_curves(only_train_file, tmp_path / "train_only.png")
    assert (tmp_path / "train_only.png").is_file()


def test_plot_training_curves_names_bad_input(tmp_path):
    pytest.importorskip("matplotlib")
    with pytest.raises(FileNotFoundError, match="metrics file not found"):
        plot_training_curves(tmp_path / "absent.jsonl", tmp_path / "out.png")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"epoch": 1}\n{"epoch": 2, \n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        plot_training_curves(broken, tmp_path / "out.png")
    with pytest.raises(ValueError, match="holds no epochs"):
        plot_training_curves(write_metrics(tmp_path / "empty.jsonl", []), tmp_path / "out.png")
    assert not (tmp_path / "out.png").exists()


def block_matplotlib(monkeypatch) -> None:
    """Make every ``import matplotlib...`` fail, as if it were not installed."""
    for name in [name for name in sys.modules if name == "matplotlib" or name.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)


def test_plot_training_curves_without_matplotlib_says_how_to_install_it(tmp_path, monkeypatch):
    block_matplotlib(monkeypatch)
    metrics = write_metrics(tmp_path / "metrics.jsonl", [{"epoch": 1, "train": {"loss": 1.0}}])
    with pytest.raises(ImportError, match=r"harma\[plot\]"):
        plot_training_curves(metrics, tmp_path / "out.png")


@pytest.fixture(scope="module")
def tiny_run(data, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("runs") / "tiny"
    train(make_config(data, output_dir, epochs=2, max_steps_per_epoch=1, eval_before_training=True))
    return output_dir


def test_training_draws_its_curves_next_to_the_metrics(tiny_run):
    pytest.importorskip("matplotlib")
    with Image.open(tiny_run / CURVES_NAME) as picture:
        assert picture.format == "PNG" and picture.width > 500
    assert not [path.name for path in tiny_run.iterdir() if path.name.endswith(".tmp")]


@pytest.mark.parametrize("failure", ["no matplotlib", "plot error"])
def test_a_failing_plot_warns_once_and_never_stops_training(data, tmp_path, monkeypatch, capsys, failure):
    if failure == "no matplotlib":
        block_matplotlib(monkeypatch)
    else:
        def broken_plot(*args, **kwargs):
            raise OSError("disk full")

        monkeypatch.setattr("harma.training.trainer.plot_training_curves", broken_plot)
    results = train(make_config(data, tmp_path / "run", epochs=2, max_steps_per_epoch=1))
    assert results["finished"] is True and (tmp_path / "run" / "results.json").is_file()
    assert not (tmp_path / "run" / CURVES_NAME).exists()
    warnings = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert len(warnings) == 1 and CURVES_NAME in warnings[0]
    assert ("harma[plot]" if failure == "no matplotlib" else "disk full") in warnings[0]
