"""`examples/evaluate.py` facing bad input: every case ends with exit status 2 and one `error:` line
naming the option, file or entry, never a traceback."""

from __future__ import annotations

import json
import re

import pytest
import torch
from repo_scripts import load_repo_script

import harma
from harma.training.models import build_backbone, tiny_clip_config
from harma.training.synthetic import make_synthetic_dataset

IMAGE_SIZE = 32
LAYOUT = harma.HarmaConfig(bottleneck=16, heads=4, mini_bottleneck=8, mini_heads=4)


def load_evaluate_script():
    return load_repo_script("examples/evaluate.py", cached=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A backbone file, an adapter file and folder for it, and the options naming them."""
    root = tmp_path_factory.mktemp("evaluate_faults")
    data = make_synthetic_dataset(root / "data", num_train_images=1, num_val_images=1, num_test_images=6,
                                  image_size=IMAGE_SIZE, seed=5)
    model_config = tiny_clip_config(image_size=IMAGE_SIZE, width=64, layers=2, embed_dim=32)
    torch.manual_seed(0)
    model, backbone = build_backbone("tiny-clip", None, model_config), root / "backbone.pt"
    torch.save(model.state_dict(), backbone)
    harma.inject_harma_adapters(model, LAYOUT)
    with torch.no_grad():
        for param in harma.adapter_parameters(model):
            param.add_(0.3 * torch.randn(param.shape, generator=torch.Generator().manual_seed(1)))
    adapters = {"file": harma.save_adapters(model, root / "adapters.safetensors"),
                "folder": root / "adapters"}
    harma.save_adapters(model, adapters["folder"])
    base = ["--model", "tiny-clip", "--model_config", json.dumps(model_config), "--pretrained", str(backbone),
            "--annotation", str(data.test_file), "--image_root", str(data.image_root), "--num_workers", "0",
            "--json"]
    return base, adapters, data


def one_error_line(capsys, exit_info) -> str:
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.mark.parametrize(("arguments", "message"), [
    (["--batch_size", "0"], "argument --batch_size: expected an integer >= 1, got '0'"),
    (["--num_workers", "-1"], "argument --num_workers: expected an integer >= 0, got '-1'"),
    (["--image_size", "0"], "argument --image_size: expected an integer >= 1, got '0'"),
    (["--gallery-seed", "-1"], "argument --gallery-seed: expected an integer >= 0, got '-1'"),
    (["--model_config", "{bad"], "argument --model_config: '{bad' is neither a JSON file nor valid JSON"),
    (["--model_config", "[1]"], "argument --model_config: expected a JSON object, got a list"),
    (["--device", "gpu"], "argument --device: expected auto, cpu, cuda or cuda:N, got 'gpu'"),
])
def test_bad_option_values_are_named_argument_errors(arguments, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_evaluate_script().parse_args(["--run", "x", *arguments])
    assert message in one_error_line(capsys, exit_info)


def test_a_model_config_file_that_is_no_json_object_is_named(tmp_path, capsys):
    broken = tmp_path / "model.json"
    broken.write_text('{"embed_dim": 32,')
    with pytest.raises(SystemExit) as exit_info:
        load_evaluate_script().parse_args(["--run", "x", "--model_config", str(broken)])
    line = one_error_line(capsys, exit_info)
    assert f"argument --model_config: config file '{broken}' is not valid JSON" in line


def test_a_gallery_that_cannot_be_written_is_an_argument_error(tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    gallery = tmp_path / "a_file" / "gallery.html"
    with pytest.raises(SystemExit) as exit_info:
        load_evaluate_script().parse_args(["--run", "x", "--gallery", str(gallery)])
    line = one_error_line(capsys, exit_info)
    assert f"--gallery {gallery}: the folder '{gallery.parent}' cannot be created: '{tmp_path / 'a_file'}' is a file" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_cuda_device_without_cuda_is_an_argument_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_evaluate_script().parse_args(["--run", "x", "--device", "cuda"])
    assert "argument --device: CUDA is not available on this machine" in one_error_line(capsys, exit_info)


@pytest.mark.parametrize("num_workers", ["0", "1"])
def test_a_corrupt_image_is_named_with_its_entry(setup, tmp_path, num_workers, capsys):
    base, adapters, data = setup
    root = tmp_path / "images"
    entries = json.loads(data.test_file.read_text())
    for entry in entries:
        target = root / entry["image"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((data.image_root / entry["image"]).read_bytes())
    (root / entries[2]["image"]).write_bytes(b"this is not an image")
    arguments = [*base, "--image_root", str(root), "--num_workers", num_workers, "--adapters", str(adapters["file"])]
    with pytest.raises(SystemExit) as exit_info:
        load_evaluate_script().main(arguments)
    line = one_error_line(capsys, exit_info)
    assert re.search(rf"image '.*{re.escape(entries[2]['image'])}' \(entry 2 of '.*test\.json'\) could not be read",
                     line), line


def test_adapters_given_as_a_folder(setup, tmp_path, capsys):
    base, adapters, _ = setup
    script = load_evaluate_script()
    # A folder save_adapters wrote holds HarMA adapters: it is evaluated as its file is.
    assert script.main([*base, "--adapters", str(adapters["folder"])]) == script.main(
        [*base, "--adapters", str(adapters["file"])])
    capsys.readouterr()
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "best.safetensors").write_bytes(adapters["file"].read_bytes())
    for folder, expected in ((run, f"'{run}' is a folder without adapter_model.safetensors: it holds a "
                                   f"training run; give its best.safetensors or last.safetensors"),
                             (tmp_path, f"'{tmp_path}' is a folder without adapter_model.safetensors")):
        with pytest.raises(SystemExit) as exit_info:
            script.main([*base, "--adapters", str(folder)])
        line = one_error_line(capsys, exit_info)
        assert f"--adapters {folder}: " in line and expected in line, line


def test_an_unknown_model_or_a_model_config_without_image_size_is_named(setup, capsys):
    base, _, _ = setup
    script = load_evaluate_script()
    model_option = base.index("--model")
    unknown = [*base[:model_option], "--model", "no-such-model", *base[model_option + 4:]]  # no --model_config
    with pytest.raises(SystemExit) as exit_info:
        script.main(unknown)
    assert "unknown open_clip model 'no-such-model'" in one_error_line(capsys, exit_info)
    config = json.loads(base[base.index("--model_config") + 1])
    del config["vision_cfg"]["image_size"]
    without_size = [*base[:model_option + 2], "--model_config", json.dumps(config), *base[model_option + 4:]]
    with pytest.raises(SystemExit) as exit_info:
        script.main(without_size)
    assert "model_config has no vision_cfg.image_size: give image_size" in one_error_line(capsys, exit_info)


def test_a_missing_weights_file_names_the_option(setup, tmp_path, capsys):
    base, _, _ = setup
    missing = tmp_path / "nope.pth"
    for option in ("--official-checkpoint", "--adapters"):
        with pytest.raises(SystemExit) as exit_info:
            load_evaluate_script().main([*base, option, str(missing)])
        line = one_error_line(capsys, exit_info)
        assert f"{option} {missing}: no " in line and f"file at '{missing}'" in line, line
