"""`TrainConfig.init_adapters`: a HarMA run that starts from the adapters of a file, on the CPU in
a few seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import harma
from harma.io import adapter_state_dict
from harma.retrieval import RetrievalEvaluator
from harma.training import TrainConfig, Trainer, build_model, main, train
from harma.training.data import RetrievalEvalDataset, test_transform
from harma.training.models import build_backbone, build_tokenizer, tiny_clip_config
from harma.training.state import read_state
from harma.training.synthetic import make_synthetic_dataset

IMAGE_SIZE = 32
LAYOUT = harma.HarmaConfig(bottleneck=16, heads=4, mini_bottleneck=8, mini_heads=4)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("init_adapters"), num_train_images=2,
                                  num_val_images=4, num_test_images=4, image_size=IMAGE_SIZE, seed=4)


def make_config(data, output_dir: Path, **changes) -> TrainConfig:
    fields = dict(
        model="tiny-clip", pretrained=None, image_size=IMAGE_SIZE,
        model_config=tiny_clip_config(image_size=IMAGE_SIZE, width=64, layers=2, embed_dim=32),
        train_files=(str(data.train_file),), val_file=str(data.val_file), test_file=None,
        image_root=str(data.image_root), batch_size=8, epochs=2, max_steps_per_epoch=1, lr=1e-3,
        num_workers=0, threads=1, progress=False, augment=False, eval_batch_size=16, harma=LAYOUT,
        output_dir=str(output_dir),
    )
    fields.update(changes)
    return TrainConfig(**fields)


def backbone_of(config: TrainConfig) -> torch.nn.Module:
    """The backbone a run of ``config`` builds (random initialisation right after its seed)."""
    torch.manual_seed(config.seed)
    return build_backbone(config.model, None, config.model_config, config.image_size)


@pytest.fixture(scope="module")
def start_file(data, tmp_path_factory):
    """Adapters of the run's layout with other values than a fresh injection (as if trained elsewhere)."""
    model = harma.inject_harma_adapters(backbone_of(make_config(data, "unused")), LAYOUT)
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for param in harma.adapter_parameters(model):
            param.add_(0.5 * torch.randn(param.shape, generator=generator))
    return harma.save_adapters(model, tmp_path_factory.mktemp("start") / "rsitmd.safetensors")


def test_the_adapters_start_from_the_file(data, start_file, tmp_path):
    stored = load_file(str(start_file))
    model = build_model(make_config(data, tmp_path, init_adapters=str(start_file)))
    started = adapter_state_dict(model)
    assert set(started) == set(stored) and all(torch.equal(started[key], stored[key]) for key in stored)
    assert all(param.requires_grad for param in harma.adapter_parameters(model))
    fresh = adapter_state_dict(build_model(make_config(data, tmp_path)))
    assert not all(torch.equal(fresh[key], stored[key]) for key in stored)
    # Without weights (an architecture only), the file is not read.
    build_model(make_config(data, tmp_path, init_adapters="missing.safetensors"), load_weights=False)


def test_a_run_starts_from_the_file_and_resumes_from_its_own_weights(data, start_file, tmp_path):
    config = make_config(data, tmp_path / "run", init_adapters=str(start_file), eval_before_training=True)
    train(config, stop_after_epoch=1)
    # Epoch 0 (before training) is the file's adapters on the run's backbone.
    model = harma.load_adapters(backbone_of(config), start_file)
    val_set = RetrievalEvalDataset(data.val_file, data.image_root, transform=test_transform(IMAGE_SIZE))
    expected = RetrievalEvaluator.from_dataset(val_set, build_tokenizer(config.model, config.model_config),
                                               batch_size=config.eval_batch_size, progress=False).evaluate(model)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [0, 1] and lines[0]["val"] == expected

    # A resumed run reads the file again (build_model) but then restores its own trained adapters.
    trainer = Trainer(config, torch.device("cpu"))
    trainer.setup(fresh=False)
    trainer.restore(read_state(tmp_path / "run" / "last_state.pt", config))
    trained, stored = load_file(str(tmp_path / "run" / "last.safetensors")), load_file(str(start_file))
    resumed = adapter_state_dict(trainer.model)
    assert all(torch.equal(resumed[key], trained[key]) for key in trained)
    assert not all(torch.equal(resumed[key], stored[key]) for key in stored)
    # Where a run started from is part of its recipe.
    with pytest.raises(ValueError, match=r"different recipe: \['init_adapters'\]"):
        train(config.replace(init_adapters=None), resume=True)


def test_another_layout_or_a_missing_file_is_bad_input(data, start_file, tmp_path, capsys):
    other_layout = harma.save_adapters(
        harma.inject_harma_adapters(backbone_of(make_config(data, "unused")), LAYOUT.replace(bottleneck=8)),
        tmp_path / "other_layout.safetensors",
    )
    config = make_config(data, tmp_path / "run")
    config_file = tmp_path / "config.json"
    config.save(config_file)
    for path, expected in ((other_layout, "another adapter layout"),
                           (tmp_path / "missing.safetensors", "no harma adapter file or folder")):
        with pytest.raises(SystemExit) as exit_info:
            main(["--config", str(config_file), "--init_adapters", str(path), "--overwrite"])
        error = capsys.readouterr().err
        assert exit_info.value.code == 2 and str(path) in error and expected in error, error


def test_init_adapters_needs_method_harma(data, start_file, tmp_path, capsys):
    with pytest.raises(ValueError, match="init_adapters .* needs method 'harma', not 'lora'"):
        make_config(data, tmp_path, method="lora", init_adapters=str(start_file))
    with pytest.raises(ValueError, match="init_adapters must be the path"):
        make_config(data, tmp_path, init_adapters="")
    with pytest.raises(SystemExit) as exit_info:
        main(["--method", "full", "--init_adapters", str(start_file), "--print-config"])
    assert exit_info.value.code == 2 and "needs method 'harma'" in capsys.readouterr().err
