"""What adaptation forgets, measured while training: zero-shot classification sets and extra
retrieval sets evaluated before training and at every validation (harma.training.monitor)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_trainer import IMAGE_SIZE, make_config, read_metrics, without_times

from harma.classification import ZeroShotEvaluator
from harma.retrieval import RetrievalEvaluator
from harma.training import RESUMABLE_CHANGES, TrainConfig, main, parse_args, train
from harma.training.classification_data import load_classification_dataset
from harma.training.config import MONITOR_FIELDS
from harma.training.data import ImageReadError, RetrievalEvalDataset, test_transform
from harma.training.models import build_backbone, build_tokenizer
from harma.training.monitor import monitor_results, short_monitors
from harma.training.synthetic import make_synthetic_classification_set, make_synthetic_dataset
from harma.training.weights import load_trained_weights


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return make_synthetic_dataset(root, num_train_images=16, num_val_images=8, num_test_images=8,
                                   image_size=IMAGE_SIZE, seed=3)


@pytest.fixture(scope="module")
def other_domain(tmp_path_factory):
    """A classification set and a retrieval set of the other domain, in folders of their own."""
    root = tmp_path_factory.mktemp("other")
    classes = make_synthetic_classification_set(root / "classes", images_per_class=1, image_size=IMAGE_SIZE,
                                                style="target")
    retrieval = make_synthetic_dataset(root / "retrieval", num_train_images=1, num_val_images=6,
                                       num_test_images=1, image_size=IMAGE_SIZE, seed=9, style="target")
    return classes, retrieval


def monitored(data, other_domain, output_dir: Path, **changes) -> TrainConfig:
    classes, retrieval = other_domain
    fields = dict(zero_shot_sets=(str(classes.root),), zero_shot_templates=str(classes.templates_file),
                  extra_retrieval_files=(str(retrieval.val_file),),
                  extra_retrieval_image_roots=(str(retrieval.image_root),))
    return make_config(data, output_dir, **{**fields, **changes})


@pytest.fixture(scope="module")
def runs(data, other_domain, tmp_path_factory):
    """The same three-epoch run (validation every second epoch) without and with monitored sets."""
    base = tmp_path_factory.mktemp("runs")
    plain = train(make_config(data, base / "plain", epochs=3, eval_every=2))
    watched = train(monitored(data, other_domain, base / "watched", epochs=3, eval_every=2))
    return (base / "plain", plain), (base / "watched", watched)


def test_monitored_sets_are_evaluated_before_training_and_at_every_validation(runs, other_domain):
    _, (output_dir, _) = runs
    classes, retrieval = other_domain
    lines = read_metrics(output_dir)
    assert [line["epoch"] for line in lines] == [0, 1, 2, 3]
    assert "val" not in lines[0]  # eval_before_training is off: epoch 0 holds the monitored sets only
    for line in lines:
        evaluated = line["epoch"] in (0, 2, 3)  # before training, then the validation schedule
        assert ("zero_shot" in line) == evaluated and ("extra_retrieval" in line) == evaluated
        if evaluated:
            assert set(line["zero_shot"]) == {str(classes.root)}
            assert set(line["zero_shot"][str(classes.root)]) == {"acc1", "acc5", "mean_per_class_recall"}
            assert set(line["extra_retrieval"]) == {str(retrieval.val_file)}
            assert "mean_recall" in line["extra_retrieval"][str(retrieval.val_file)]


def test_the_curves_get_a_panel_of_the_monitored_sets(runs):
    pytest.importorskip("matplotlib")
    (plain_dir, _), (watched_dir, _) = runs
    with Image.open(plain_dir / "training_curves.png") as plain, Image.open(watched_dir / "training_curves.png") as watched:
        assert plain.width == 1100 and watched.width == 1500 and watched.height == plain.height


def test_monitored_sets_change_neither_training_nor_the_choice_of_the_best_epoch(runs):
    (plain_dir, plain), (watched_dir, watched) = runs
    strip = ("zero_shot", "extra_retrieval", "time_s")
    watched_lines = [{k: v for k, v in line.items() if k not in strip} for line in read_metrics(watched_dir)[1:]]
    assert watched_lines == without_times(read_metrics(plain_dir))
    for key in ("best_epoch", "best_val", "test", "temperature"):
        assert watched[key] == plain[key], key
    for name in ("best.safetensors", "last.safetensors"):  # their metadata hold the configs, which differ
        watched_tensors, plain_tensors = load_file(str(watched_dir / name)), load_file(str(plain_dir / name))
        assert set(watched_tensors) == set(plain_tensors)
        assert all(torch.equal(watched_tensors[key], plain_tensors[key]) for key in plain_tensors)


def test_results_hold_the_sets_before_training_at_the_best_epoch_and_the_change(data, runs, other_domain):
    _, (output_dir, results) = runs
    classes, retrieval = other_domain
    assert json.loads((output_dir / "results.json").read_text()) == json.loads(json.dumps(results))
    lines = {line["epoch"]: line for line in read_metrics(output_dir)}
    zero_shot = results["zero_shot"][str(classes.root)]
    assert zero_shot["before"] == lines[0]["zero_shot"][str(classes.root)]
    assert zero_shot["best"] == lines[results["best_epoch"]]["zero_shot"][str(classes.root)]
    assert zero_shot["change"] == {k: zero_shot["best"][k] - zero_shot["before"][k] for k in zero_shot["best"]}
    assert zero_shot["classnames"] == list(classes.class_names) and zero_shot["images"] == 10
    assert zero_shot["templates"] == ["{}"]
    extra = results["extra_retrieval"][str(retrieval.val_file)]
    assert extra["best"] == lines[results["best_epoch"]]["extra_retrieval"][str(retrieval.val_file)]

    # The logged values are those of the evaluators on the best checkpoint, and on the backbone.
    config = TrainConfig.from_json_file(output_dir / "config.json")
    torch.manual_seed(config.seed)  # the backbone is randomly initialised right after this seed
    model = build_backbone(config.model, None, config.model_config, config.image_size)
    tokenizer = build_tokenizer(config.model, config.model_config)
    evaluator = ZeroShotEvaluator.from_dataset(
        load_classification_dataset(classes.root, test_transform(IMAGE_SIZE)), tokenizer,
        templates=classes.templates_file, batch_size=config.eval_batch_size, progress=False)
    retrieval_set = RetrievalEvalDataset(retrieval.val_file, retrieval.image_root, transform=test_transform(IMAGE_SIZE))
    retrieval_evaluator = RetrievalEvaluator.from_dataset(retrieval_set, tokenizer,
                                                          batch_size=config.eval_batch_size, progress=False)
    assert evaluator.evaluate(model) == zero_shot["before"]
    load_trained_weights(model, output_dir / "best.safetensors")
    assert evaluator.evaluate(model) == zero_shot["best"]
    assert retrieval_evaluator.evaluate(model) == extra["best"]


def test_a_resumed_run_may_add_monitored_sets(data, other_domain, tmp_path):
    assert MONITOR_FIELDS <= RESUMABLE_CHANGES
    train(make_config(data, tmp_path / "run"), stop_after_epoch=1)
    results = train(monitored(data, other_domain, tmp_path / "run"), resume=True)
    lines = read_metrics(tmp_path / "run")
    assert ["zero_shot" in line for line in lines] == [False, True]
    classes, _ = other_domain
    entry = results["zero_shot"][str(classes.root)]
    assert entry["before"] is None and entry["change"] is None  # no epoch 0: added on resume
    assert entry["best"] == (lines[1]["zero_shot"][str(classes.root)] if results["best_epoch"] == 2 else None)


def test_the_command_line_takes_the_monitored_sets(data, other_domain, tmp_path):
    classes, retrieval = other_domain
    args = parse_args(["--zero_shot_sets", f"{classes.root},{tmp_path}", "--zero-shot-templates", "skyscript",
                       "--extra_retrieval_files", str(retrieval.val_file), "--zero_shot_combine", "raw_mean"])
    assert args.config.zero_shot_sets == (str(classes.root), str(tmp_path))
    assert args.config.extra_retrieval_files == (str(retrieval.val_file),)
    assert args.config.zero_shot_templates == "skyscript" and args.config.zero_shot_combine == "raw_mean"
    assert TrainConfig.from_dict(args.config.to_dict()) == args.config
    assert TrainConfig(zero_shot_sets="one/set").zero_shot_sets == ("one/set",)


@pytest.mark.parametrize(("changes", "message"), [
    ({"zero_shot_sets": ("a", "a")}, "zero_shot_sets names 'a' more than once"),
    ({"zero_shot_sets": ("",)}, "zero_shot_sets must be a list of non-empty paths"),
    ({"zero_shot_sets": ("a",), "zero_shot_combine": "mean"}, "zero_shot_combine must be one of"),
    ({"zero_shot_sets": ("a",), "zero_shot_templates": ""}, "zero_shot_templates must be"),
    ({"zero_shot_class_names": "names.json"}, "zero_shot_class_names is given but zero_shot_sets is empty"),
    ({"zero_shot_class_prompts": "p.json"}, "zero_shot_class_prompts is given but zero_shot_sets is empty"),
    ({"extra_retrieval_files": ("a.json", "b.json"), "extra_retrieval_image_roots": ("x",)},
     "extra_retrieval_image_roots has 1 folder"),
    ({"extra_retrieval_image_roots": ("x",)}, "extra_retrieval_image_roots has 1 folder"),
    ({"test_file": "data/test.json", "extra_retrieval_files": ("./data/test.json",)},
     "extra_retrieval_files names the test split"),
])
def test_bad_monitor_fields_are_named(changes, message):
    with pytest.raises(ValueError, match=f"TrainConfig: {message}"):
        TrainConfig(**changes)


def test_a_missing_or_bad_set_fails_before_training_naming_the_field(data, other_domain, tmp_path, capsys):
    classes, retrieval = other_domain
    with pytest.raises(FileNotFoundError, match="zero_shot_sets: classification set not found: '.*absent'"):
        train(monitored(data, other_domain, tmp_path / "a", zero_shot_sets=(str(tmp_path / "absent"),)))
    with pytest.raises(ValueError, match="zero_shot_templates: templates 'nope': neither a template set"):
        train(monitored(data, other_domain, tmp_path / "b", zero_shot_templates="nope"))
    with pytest.raises(FileNotFoundError, match="zero_shot_class_names: class-name file not found"):
        train(monitored(data, other_domain, tmp_path / "b", zero_shot_class_names=str(tmp_path / "names.json")))
    (tmp_path / "prompts.json").write_text('{"airfield": "not a list"}')
    with pytest.raises(ValueError, match="zero_shot_class_prompts: class-prompt file .* expected a non-empty list"):
        train(monitored(data, other_domain, tmp_path / "b", zero_shot_class_prompts=str(tmp_path / "prompts.json")))
    (tmp_path / "names.json").write_text('{"nowhere": "x"}')
    with pytest.raises(ValueError, match="zero_shot_sets: class names .* 'nowhere' names no class"):
        train(monitored(data, other_domain, tmp_path / "b", zero_shot_class_names=str(tmp_path / "names.json")))
    with pytest.raises(FileNotFoundError, match="extra_retrieval_files: .*absent.json"):
        train(monitored(data, other_domain, tmp_path / "c", extra_retrieval_files=(str(tmp_path / "absent.json"),)))
    # A wrong image root: the first image is named.
    with pytest.raises(FileNotFoundError, match="extra_retrieval_files: .*"):
        train(monitored(data, other_domain, tmp_path / "d", extra_retrieval_image_roots=(str(tmp_path),)))
    assert not any((tmp_path / name / "last.safetensors").exists() for name in "abcd")
    config = monitored(data, other_domain, tmp_path / "e", zero_shot_sets=(str(tmp_path / "absent"),))
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(write_config(config, tmp_path / "e.json"))])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: zero_shot_sets: classification set not found") and "Traceback" not in error


def write_config(config: TrainConfig, path: Path) -> Path:
    config.save(path)
    return path


def test_results_and_log_lines_of_hand_written_histories():
    history = [
        {"epoch": 0, "zero_shot": {"sets/aid": {"acc1": 50.0, "mean_per_class_recall": 40.0}}},
        {"epoch": 1, "zero_shot": {"sets/aid": {"acc1": 45.0, "mean_per_class_recall": 41.0}},
         "extra_retrieval": {"x/rsicd.json": {"mean_recall": 12.5}}},
    ]
    out = monitor_results(history, 1, {"sets/aid": {"classnames": ["a"]}})
    assert out["zero_shot"]["sets/aid"] == {
        "before": history[0]["zero_shot"]["sets/aid"], "best": history[1]["zero_shot"]["sets/aid"],
        "change": {"acc1": -5.0, "mean_per_class_recall": 1.0}, "classnames": ["a"]}
    assert out["extra_retrieval"]["x/rsicd.json"] == {"before": None, "best": {"mean_recall": 12.5}, "change": None}
    assert monitor_results(history, None, {})["zero_shot"]["sets/aid"]["best"] is None
    assert monitor_results([{"epoch": 1}], 1, {}) == {}
    assert short_monitors(history[1]) == "zero-shot aid acc1 45.0 | rsicd.json mR 12.50"
    assert short_monitors({"epoch": 2}) == ""


def test_an_unreadable_image_of_a_followed_set_is_named_and_loses_no_training(data, tmp_path):
    classes = make_synthetic_classification_set(tmp_path / "classes", images_per_class=1, image_size=IMAGE_SIZE)
    broken = classes.root / "forest" / "forest_00000.png"
    good = broken.read_bytes()
    config = make_config(data, tmp_path / "run", epochs=1, zero_shot_sets=(str(classes.root),),
                         zero_shot_templates=str(classes.templates_file), num_workers=1)
    broken.write_bytes(b"not a png")
    with pytest.raises(ImageReadError, match=f"{broken}") as error:
        train(config)  # the epoch-0 evaluation, before any training
    assert "Traceback" not in str(error.value)
    broken.write_bytes(good)
    train(config.replace(epochs=2), stop_after_epoch=1, overwrite=True)
    broken.write_bytes(b"not a png")
    with pytest.raises(ImageReadError):
        train(config.replace(epochs=2), resume=True)  # the second epoch, then its validation
    assert read_metrics(tmp_path / "run")[-1]["epoch"] == 2 and (tmp_path / "run" / "last.safetensors").is_file()
    broken.write_bytes(good)
    results = train(config.replace(epochs=2), resume=True)  # validates epoch 2, then finishes
    assert results["finished"] and "zero_shot" in read_metrics(tmp_path / "run")[-1]
