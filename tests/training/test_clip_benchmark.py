"""CLIP_benchmark (installed from the package index) evaluates a harma-adapted model through
`harma.training.clip_benchmark` on a local webdataset, and agrees with harma's own evaluator."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from PIL import Image

import harma
from harma.classification import ZeroShotEvaluator
from harma.training.classification_data import load_classification_dataset
from harma.training.clip_benchmark import load_harma, main
from harma.training.config import TrainConfig
from harma.training.models import build_backbone, tiny_clip_config
from harma.training.weights import save_trained_weights

pytest.importorskip("clip_benchmark")
webdataset = pytest.importorskip("webdataset")

IMAGE_SIZE = 32
MODEL_CONFIG = tiny_clip_config(image_size=IMAGE_SIZE, width=64, layers=2, embed_dim=32)
CLASSES = ["BaseballField", "Beach", "Forest", "Port", "River", "Desert"]
TEMPLATES = ["a satellite photo of {c}.", "an aerial image of {c}."]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip_benchmark")
    generator = torch.Generator().manual_seed(0)
    for name in CLASSES:
        (root / "set" / name).mkdir(parents=True)
        for k in range(4):
            pixels = (torch.rand(IMAGE_SIZE, IMAGE_SIZE, 3, generator=generator) * 255).byte().numpy()
            Image.fromarray(pixels).save(root / "set" / name / f"{k}.png")
    torch.manual_seed(0)
    backbone = build_backbone("tiny", None, MODEL_CONFIG)
    torch.save(backbone.state_dict(), root / "backbone.pt")
    (root / "tiny.json").write_text(json.dumps(MODEL_CONFIG))
    patched = harma.inject_harma_adapters(copy.deepcopy(backbone), harma.HarmaConfig(bottleneck=16, heads=4,
                                          mini_bottleneck=8, mini_heads=4))
    with torch.no_grad():
        for param in harma.adapter_parameters(patched):
            param.add_(0.5 * torch.randn(param.shape, generator=generator))
    harma.save_adapters(patched, root / "adapters.safetensors")
    return root


def write_webdataset(dataset, classnames, out_dir):
    """CLIP_benchmark's local webdataset layout: test/0.tar, test/nshards.txt, classnames.txt,
    zeroshot_classification_templates.txt."""
    (out_dir / "test").mkdir(parents=True)
    with webdataset.TarWriter(str(out_dir / "test" / "0.tar")) as sink:
        for index, (path, label) in enumerate(zip(dataset.image_paths, dataset.labels, strict=True)):
            sink.write({"__key__": f"s{index:05d}", "png": path.read_bytes(), "cls": label})
    (out_dir / "test" / "nshards.txt").write_text("1")
    (out_dir / "classnames.txt").write_text("\n".join(classnames) + "\n")
    (out_dir / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")


@pytest.mark.parametrize("spec", ["backbone+adapters", "run"])
def test_clip_benchmark_evaluates_a_harma_model_as_harma_does(files, tmp_path, spec):
    if spec == "run":
        run = tmp_path / "run"
        run.mkdir()
        config = TrainConfig(model="tiny", model_config=MODEL_CONFIG, pretrained=str(files / "backbone.pt"),
                             image_size=IMAGE_SIZE, harma=harma.HarmaConfig(bottleneck=16, heads=4, mini_bottleneck=8,
                                                                           mini_heads=4))
        config.save(run / "config.json")
        model = harma.load_adapters(build_backbone("tiny", None, MODEL_CONFIG), files / "adapters.safetensors")
        save_trained_weights(model, run / "best.safetensors", config)
        model_arg, pretrained = "tiny", str(run)
    else:
        model_arg, pretrained = str(files / "tiny.json"), f"{files / 'backbone.pt'}+{files / 'adapters.safetensors'}"

    model, transform, tokenizer = load_harma(model_arg, pretrained)
    assert harma.is_patched(model)
    dataset = load_classification_dataset(files / "set", transform)
    evaluator = ZeroShotEvaluator.from_dataset(dataset, tokenizer, templates=TEMPLATES, progress=False)
    ours = evaluator.run(model)

    write_webdataset(dataset, evaluator.classnames, tmp_path / "wds")
    output = tmp_path / "result.json"
    assert main(["eval", "--model_type", "harma", "--model", model_arg, "--pretrained", pretrained,
                 "--dataset", "wds/mine", "--dataset_root", str(tmp_path / "wds"), "--task",
                 "zeroshot_classification", "--no_amp", "--num_workers", "0", "--batch_size", "8",
                 "--output", str(output), "--quiet"]) == 0
    theirs = json.loads(output.read_text())
    assert theirs["model"] == model_arg and theirs["pretrained"] == pretrained
    assert theirs["metrics"]["acc1"] * 100 == pytest.approx(ours.metrics["acc1"], abs=1e-9)
    assert theirs["metrics"]["acc5"] * 100 == pytest.approx(ours.metrics["acc5"], abs=1e-9)
    assert theirs["metrics"]["mean_per_class_recall"] * 100 == pytest.approx(ours.metrics["mean_per_class_recall"])
    # harma's own record of the same run has CLIP_benchmark's keys and numbers
    record = ours.clip_benchmark_record("wds/mine", model_arg, pretrained)
    assert set(theirs) <= set(record) | {"language"}
    assert record["metrics"] == pytest.approx(theirs["metrics"])


def test_the_loader_names_what_is_missing(files, tmp_path):
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        load_harma(str(files / "tiny.json"), f"{files / 'backbone.pt'}+{tmp_path / 'absent.safetensors'}")
    with pytest.raises(ValueError, match="is not an open_clip architecture"):
        load_harma("no-such-architecture", str(files / "backbone.pt"))
