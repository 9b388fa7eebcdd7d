"""`examples/evaluate.py` with several named HarMA adapter files on one backbone, on the CPU in a
few seconds."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from repo_scripts import load_repo_script

import harma
from harma.io import write_safetensors
from harma.training.models import build_backbone, tiny_clip_config
from harma.training.synthetic import make_synthetic_dataset

REPO = Path(__file__).resolve().parents[2]
IMAGE_SIZE = 32
LAYOUT = harma.HarmaConfig(bottleneck=16, heads=4, mini_bottleneck=8, mini_heads=4)


def load_evaluate_script():
    return load_repo_script("examples/evaluate.py", cached=False)


def adapter_file(backbone: torch.nn.Module, path: Path, seed: int) -> Path:
    """HarMA adapters of the layout above with random values (as if trained), saved to ``path``."""
    model = harma.inject_harma_adapters(copy.deepcopy(backbone), LAYOUT)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in harma.adapter_parameters(model):
            param.add_(0.5 * torch.randn(param.shape, generator=generator))
    return harma.save_adapters(model, path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("named_evaluation")
    data = make_synthetic_dataset(root / "data", num_train_images=1, num_val_images=1, num_test_images=8,
                                  image_size=IMAGE_SIZE, seed=5)
    model_config = tiny_clip_config(image_size=IMAGE_SIZE, width=64, layers=2, embed_dim=32)
    torch.manual_seed(0)
    model, backbone = build_backbone("tiny-clip", None, model_config), root / "backbone.pt"
    torch.save(model.state_dict(), backbone)
    files = {name: adapter_file(model, root / f"{name}.safetensors", seed)
             for name, seed in (("first", 1), ("second", 2))}
    base = ["--model", "tiny-clip", "--model_config", json.dumps(model_config), "--pretrained", str(backbone),
            "--annotation", str(data.test_file), "--image_root", str(data.image_root), "--num_workers", "0",
            "--batch_size", "16"]
    return base, files


def test_each_named_adapter_gives_the_metrics_of_its_file_alone(setup, capsys, monkeypatch):
    base, files = setup
    script = load_evaluate_script()
    alone = {name: script.main([*base, "--adapters", str(path), "--json"]) for name, path in files.items()}
    assert alone["first"] != alone["second"]  # two different models
    capsys.readouterr()

    built, read = [], []
    monkeypatch.setattr(script, "build_backbone", lambda *a, **k: built.append(1) or build_backbone(*a, **k))
    dataset_class = script.RetrievalEvalDataset
    monkeypatch.setattr(script, "RetrievalEvalDataset", lambda *a, **k: read.append(1) or dataset_class(*a, **k))
    together = script.main([*base, *(f"--adapters={name}={path}" for name, path in files.items()), "--json"])
    assert together == alone
    assert list(together) == ["first", "second"]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == alone
    assert len(built) == 1 and len(read) == 1

    script.main([*base, "--adapters", f"second={files['second']}", "--adapters", f"first={files['first']}"])
    table = capsys.readouterr().out
    assert "| second | " in table and "| first | " in table
    assert f"first={files['first']}" in table and table.index("| second |") < table.index("| first |")


@pytest.mark.parametrize(("adapters", "message"), [
    (["a=x.safetensors", "a=y.safetensors"], "the name 'a' is given twice"),
    (["keys=x.safetensors"], "'keys' cannot name an adapter set"),
    (["bad name=x.safetensors"], "'bad name' cannot name an adapter set"),
    (["a=x.safetensors", "y.safetensors"], "give each of several adapter files as NAME=PATH"),
    (["a="], "no file after 'a='"),
])
def test_bad_named_adapters_are_argument_errors(adapters, message, capsys):
    argv = ["--run", "x", *(f"--adapters={value}" for value in adapters)]
    with pytest.raises(SystemExit) as exit_info:
        load_evaluate_script().parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_gallery_needs_one_adapter_file(capsys):
    script = load_evaluate_script()
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(["--run", "x", "--adapters", "a=x.safetensors", "--adapters", "b=y.safetensors",
                           "--gallery", "g.html"])
    assert exit_info.value.code == 2 and "--gallery shows one model" in capsys.readouterr().err
    # One named file, or a path whose folder holds '=', is fine.
    assert script.parse_args(["--run", "x", "--adapters", "a=x.safetensors", "--gallery", "g.html"]).adapters == {
        "a": "x.safetensors"}
    assert script.parse_args(["--run", "x", "--adapters", "runs/lr=1/best.safetensors"]).adapters == (
        "runs/lr=1/best.safetensors")


def test_a_named_file_that_is_no_harma_adapter_file_is_named(setup, tmp_path, capsys):
    base, files = setup
    lora = write_safetensors(tmp_path / "lora.safetensors", {"w": torch.zeros(1)}, {"format": "harma.train.lora"})
    for value, expected in ((f"b={lora}", f"{lora} is not a harma adapter file"),
                            (f"b={tmp_path / 'missing.safetensors'}", "no harma adapter file or folder")):
        with pytest.raises(SystemExit) as exit_info:
            load_evaluate_script().main([*base, "--adapters", f"a={files['first']}", "--adapters", value])
        error = capsys.readouterr().err
        assert exit_info.value.code == 2 and f"--adapters {value}:" in error and expected in error
