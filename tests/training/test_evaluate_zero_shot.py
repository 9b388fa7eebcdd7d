"""`examples/evaluate.py --zero-shot`: several classification sets, JSON and tables, result files,
named adapter sets, bad input; on the CPU in seconds."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from PIL import Image
from repo_scripts import load_repo_script

import harma
from harma.classification import ZeroShotEvaluator
from harma.training.classification_data import load_classification_dataset
from harma.training.data import test_transform
from harma.training.models import build_backbone, build_tokenizer, tiny_clip_config
from harma.training.synthetic import make_synthetic_dataset
from harma.training.zero_shot import ZeroShotSuite

IMAGE_SIZE = 32
LAYOUT = harma.HarmaConfig(bottleneck=16, heads=4, mini_bottleneck=8, mini_heads=4)
MODEL_CONFIG = tiny_clip_config(image_size=IMAGE_SIZE, width=64, layers=2, embed_dim=32)


def write_tree(root, classes, per_class=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for name in classes:
        (root / name).mkdir(parents=True)
        for k in range(per_class):
            pixels = (torch.rand(IMAGE_SIZE, IMAGE_SIZE, 3, generator=generator) * 255).byte().numpy()
            Image.fromarray(pixels).save(root / name / f"{k}.png")
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero_shot_evaluation")
    aid = write_tree(root / "AID", ["BaseballField", "Beach", "DenseResidential", "Forest", "Port", "River"])
    ucm = write_tree(root / "UCM", ["baseballdiamond", "harbor", "river"], seed=1)
    torch.manual_seed(0)
    model, backbone = build_backbone("tiny-clip", None, MODEL_CONFIG), root / "backbone.pt"
    torch.save(model.state_dict(), backbone)
    files = {}
    for name, seed in (("first", 1), ("second", 2)):
        patched = harma.inject_harma_adapters(copy.deepcopy(model), LAYOUT)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in harma.adapter_parameters(patched):
                param.add_(0.5 * torch.randn(param.shape, generator=generator))
        files[name] = harma.save_adapters(patched, root / f"{name}.safetensors")
    base = ["--model", "tiny-clip", "--model_config", json.dumps(MODEL_CONFIG), "--pretrained", str(backbone),
            "--num_workers", "0", "--batch_size", "8"]
    return {"root": root, "aid": aid, "ucm": ucm, "model": model, "base": base, "files": files}


def direct_metrics(model, root, templates="satellite"):
    dataset = load_classification_dataset(root, test_transform(IMAGE_SIZE))
    evaluator = ZeroShotEvaluator.from_dataset(dataset, build_tokenizer("tiny-clip", MODEL_CONFIG),
                                               templates=templates, batch_size=8, progress=False)
    return evaluator.evaluate(model), evaluator.classnames


def test_several_sets_print_one_json_object_with_metrics_and_class_names(setup, capsys):
    script = load_repo_script("examples/evaluate.py", cached=False)
    roots = [str(setup["aid"]), str(setup["ucm"])]
    script.main([*setup["base"], "--zero-shot", roots[0], "--zero-shot", roots[1], "--json"])
    out = json.loads(capsys.readouterr().out)
    assert list(out) == ["zero_shot"] and list(out["zero_shot"]) == roots
    for root in roots:
        metrics, classnames = direct_metrics(setup["model"], root)
        assert out["zero_shot"][root]["metrics"] == pytest.approx(metrics)
        assert out["zero_shot"][root]["classnames"] == classnames
    aid = out["zero_shot"][roots[0]]
    assert set(aid["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert "acc5" not in out["zero_shot"][roots[1]]["metrics"]  # 3 classes
    assert aid["classnames"][:3] == ["baseball field", "beach", "dense residential"]
    assert aid["raw_classnames"][0] == "BaseballField" and aid["templates"] == ["a satellite photo of {}."]


def test_the_table_names_the_classes_used_and_the_files_follow_clip_benchmark(setup, capsys, tmp_path):
    script = load_repo_script("examples/evaluate.py", cached=False)
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"baseballdiamond": "baseball diamond", "harbor": "harbour"}))
    out_dir = tmp_path / "results"
    script.main([*setup["base"], "--zero-shot", str(setup["aid"]), "--zero-shot", str(setup["ucm"]),
                 "--class-names", str(names), "--templates", "remote_sensing", "--zero-shot-output", str(out_dir)])
    text = capsys.readouterr().out
    assert "renamed: BaseballField -> baseball field; Beach -> beach; DenseResidential -> dense residential" in text
    assert "baseballdiamond -> baseball diamond; harbor -> harbour" in text
    assert "| acc1 | acc5 | mean per-class recall |" in text and f"| {setup['ucm']} | " in text
    record = json.loads((out_dir / "UCM_zeroshot_classification.json").read_text())
    assert {"dataset", "model", "pretrained", "task", "metrics"} <= set(record)
    assert record["task"] == "zeroshot_classification" and record["dataset"] == "UCM"
    assert record["metrics"]["acc5"] is None and 0 <= record["metrics"]["acc1"] <= 1
    assert record["classnames"] == ["baseball diamond", "harbour", "river"]
    metrics, _ = direct_metrics(setup["model"], setup["ucm"], templates="remote_sensing")
    assert record["metrics"]["acc1"] == pytest.approx(metrics["acc1"] / 100)
    assert len(record["prompts"][0]) == 48 and sum(record["class_counts"]) == 9
    assert (out_dir / "AID_zeroshot_classification_per_class.md").read_text().startswith("| class | images |")
    with Image.open(out_dir / "AID_zeroshot_classification_confusion.png") as image:
        assert image.format == "PNG"


def test_named_adapter_sets_and_retrieval_in_one_run(setup, capsys, tmp_path):
    script = load_repo_script("examples/evaluate.py", cached=False)
    data = make_synthetic_dataset(tmp_path / "data", num_train_images=1, num_val_images=1, num_test_images=8,
                                  image_size=IMAGE_SIZE, seed=5)
    retrieval = ["--annotation", str(data.test_file), "--image_root", str(data.image_root)]
    files = setup["files"]
    root = str(setup["aid"])
    alone = {}
    for name, path in files.items():
        script.main([*setup["base"], *retrieval, "--adapters", str(path), "--zero-shot", root, "--json"])
        alone[name] = json.loads(capsys.readouterr().out)
    script.main([*setup["base"], *retrieval, *(f"--adapters={n}={p}" for n, p in files.items()),
                 "--zero-shot", root, "--json"])
    together = json.loads(capsys.readouterr().out)
    assert set(together) == {"retrieval", "zero_shot"}
    for name in files:
        assert together["zero_shot"][root]["metrics"][name] == pytest.approx(alone[name]["zero_shot"][root]["metrics"])
        assert together["retrieval"][name] == pytest.approx(alone[name]["retrieval"])
    assert alone["first"] != alone["second"]


def test_the_suite_evaluates_each_named_set_in_inference_mode(setup):
    suite = ZeroShotSuite([setup["ucm"]], test_transform(IMAGE_SIZE), build_tokenizer("tiny-clip", MODEL_CONFIG),
                          progress=False)
    model = copy.deepcopy(setup["model"])
    for name, path in setup["files"].items():
        harma.load_adapters(model, path, adapter_name=name)
    results = suite.evaluate_adapters(model, ["first", "second"])
    root = str(setup["ucm"])
    for name, path in setup["files"].items():
        alone = harma.load_adapters(copy.deepcopy(setup["model"]), path)
        assert torch.equal(results[name][root].ranks, suite.evaluate(alone)[root].ranks)
    assert not any(p.requires_grad for p in model.parameters())


def run_failing(script, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv)
    assert exit_info.value.code == 2
    # progress bars may come first; the error is one line, the last, without a traceback
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "Traceback" not in "\n".join(err)
    return err[-1]


def test_bad_zero_shot_input_ends_with_one_error_line(setup, capsys, tmp_path):
    script = load_repo_script("examples/evaluate.py", cached=False)
    base = setup["base"]
    broken = write_tree(tmp_path / "broken", ["lake", "farm"])
    (broken / "empty").mkdir()
    assert "class folder" in run_failing(script, [*base, "--zero-shot", str(broken)], capsys)
    (broken / "empty").rmdir()
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"laek": "lake"}))
    message = run_failing(script, [*base, "--zero-shot", str(broken), "--class-names", str(names)], capsys)
    assert "'laek' names no class of" in message
    listing = tmp_path / "names.txt"
    listing.write_text("a\nb\n")
    message = run_failing(script, [*base, "--zero-shot", str(broken), "--zero-shot", str(setup["ucm"]),
                                   "--class-names", str(listing)], capsys)
    assert "give one set only" in message
    message = run_failing(script, [*base, "--zero-shot", str(broken), "--templates", "no_such"], capsys)
    assert "neither a template set" in message
    (broken / "farm" / "0.png").write_bytes(b"damaged")
    message = run_failing(script, [*base, "--zero-shot", str(broken)], capsys)
    assert "0.png' (class 'farm'" in message and "could not be read" in message


def test_result_files_of_sets_with_one_folder_name_are_kept_apart_and_the_folder_is_checked_first(
        setup, capsys, tmp_path):
    script = load_repo_script("examples/evaluate.py", cached=False)
    other_aid = write_tree(tmp_path / "other" / "AID", ["lake", "farm"], seed=3)
    out_dir = tmp_path / "results"
    script.main([*setup["base"], "--zero-shot", str(setup["aid"]), "--zero-shot", str(other_aid),
                 "--zero-shot-output", str(out_dir), "--json"])
    capsys.readouterr()
    first = json.loads((out_dir / "AID_zeroshot_classification.json").read_text())
    second = json.loads((out_dir / "AID-2_zeroshot_classification.json").read_text())
    assert (first["root"], second["root"]) == (str(setup["aid"]), str(other_aid))
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    with pytest.raises(SystemExit) as exit_info:
        script.main([*setup["base"], "--zero-shot", str(setup["aid"]), "--zero-shot-output", str(blocked)])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert exit_info.value.code == 2 and len(errors) == 1
    assert "--zero-shot-output" in errors[0] and "is a file" in errors[0]
