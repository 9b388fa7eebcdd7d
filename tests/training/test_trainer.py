"""The training engine on generated data with a small real open_clip CLIP, on the CPU."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from repo_scripts import load_repo_script
from safetensors.torch import load_file

import harma
from harma.losses import HarmaLoss
from harma.retrieval import RetrievalEvaluator
from harma.training import (
    LinearWarmupDecay,
    TrainConfig,
    apply_precision,
    build_model,
    load_trained_weights,
    main,
    parameter_groups,
    parse_args,
    train,
)
from harma.training.data import RetrievalEvalDataset, test_transform
from harma.training.models import build_backbone, build_tokenizer, tiny_clip_config
from harma.training.synthetic import make_synthetic_dataset

REPO = Path(__file__).resolve().parents[2]
IMAGE_SIZE = 32


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return make_synthetic_dataset(root, num_train_images=16, num_val_images=8, num_test_images=8,
                                   image_size=IMAGE_SIZE, seed=3)


def tiny_model_config() -> dict:
    return tiny_clip_config(image_size=IMAGE_SIZE, width=64, layers=2, embed_dim=32)


def make_config(data, output_dir: Path, **changes) -> TrainConfig:
    fields = dict(
        model="tiny-clip", pretrained=None, model_config=tiny_model_config(), image_size=IMAGE_SIZE,
        train_files=(str(data.train_file),), val_file=str(data.val_file), test_file=str(data.test_file),
        image_root=str(data.image_root), batch_size=8, epochs=2, max_steps_per_epoch=3, lr=1e-3,
        num_workers=0, threads=1, progress=False, augment=True, eval_batch_size=16,
        harma=harma.HarmaConfig(bottleneck=16, heads=4, mini_bottleneck=8, mini_heads=4),
        output_dir=str(output_dir),
    )
    fields.update(changes)
    return TrainConfig(**fields)


@pytest.fixture(scope="module")
def reference_run(data, tmp_path_factory):
    """An uninterrupted two-epoch HarMA run that several tests compare against."""
    output_dir = tmp_path_factory.mktemp("runs") / "reference"
    results = train(make_config(data, output_dir))
    return output_dir, results


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def without_times(lines: list[dict]) -> list[dict]:
    return [{key: value for key, value in line.items() if key != "time_s"} for line in lines]


# ------------------------------------------------------------------------- end to end


def test_end_to_end_run_writes_metrics_checkpoints_and_results(reference_run):
    output_dir, results = reference_run
    for name in ("config.json", "metrics.jsonl", "last.safetensors", "best.safetensors", "last_state.pt",
                 "results.json"):
        assert (output_dir / name).is_file(), name
    lines = read_metrics(output_dir)
    assert [line["epoch"] for line in lines] == [1, 2]
    assert [line["step"] for line in lines] == [3, 6]
    for line in lines:
        assert set(line["train"]) == {"loss", "contrastive", "triplet"}
        assert "mean_recall" in line["val"]
        assert "test" not in line  # the test split is never looked at during training
    stored = json.loads((output_dir / "results.json").read_text())
    assert stored == json.loads(json.dumps(results))
    assert set(stored["test"]) == {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mean_recall"}
    val_recalls = [line["val"]["mean_recall"] for line in lines]
    assert stored["best_epoch"] == 1 + val_recalls.index(max(val_recalls))
    assert stored["best_val"] == lines[stored["best_epoch"] - 1]["val"]
    assert stored["finished"] is True and stored["epochs"] == 2
    assert TrainConfig.from_json_file(output_dir / "config.json").lr == 1e-3


def make_config_from(output_dir: Path) -> TrainConfig:
    return TrainConfig.from_dict(json.loads((output_dir / "config.json").read_text()))


def test_best_checkpoint_is_the_best_validation_epoch(reference_run):
    output_dir, results = reference_run
    best = load_file(str(output_dir / "best.safetensors"))
    last = load_file(str(output_dir / "last.safetensors"))
    assert set(best) == set(last) and all(".harma_adapter." in name for name in best)
    same = all(torch.equal(best[name], last[name]) for name in best)
    assert same == (results["best_epoch"] == 2)


def test_saved_adapters_reproduce_the_test_metrics(data, reference_run):
    output_dir, results = reference_run
    config = make_config_from(output_dir)
    torch.manual_seed(config.seed)  # the backbone is randomly initialised right after this seed
    model = build_backbone(config.model, None, config.model_config, config.image_size)
    load_trained_weights(model, output_dir / "best.safetensors")

    test_set = RetrievalEvalDataset(data.test_file, data.image_root, transform=test_transform(IMAGE_SIZE))
    tokenizer = build_tokenizer(config.model, config.model_config)
    metrics = RetrievalEvaluator.from_dataset(test_set, tokenizer, batch_size=config.eval_batch_size,
                                              progress=False).evaluate(model)
    assert metrics == results["test"]


# ------------------------------------------------------------------ resume, reproducibility


def test_resumed_run_equals_the_uninterrupted_run(data, reference_run, tmp_path):
    reference_dir, reference_results = reference_run
    config = make_config(data, tmp_path / "interrupted")
    stopped = train(config, stop_after_epoch=1)
    assert stopped["finished"] is False and not (tmp_path / "interrupted" / "results.json").exists()
    assert len(read_metrics(tmp_path / "interrupted")) == 1

    resumed = train(config, resume=True)
    assert resumed["finished"] is True

    expected = torch.load(reference_dir / "last_state.pt", weights_only=True)
    actual = torch.load(tmp_path / "interrupted" / "last_state.pt", weights_only=True)
    assert set(actual["trainable"]) == set(expected["trainable"])
    for name, tensor in expected["trainable"].items():
        assert torch.equal(actual["trainable"][name], tensor), name
    assert torch.equal(actual["loss"]["temperature"], expected["loss"]["temperature"])
    expected_optimizer, actual_optimizer = expected["optimizer"], actual["optimizer"]
    assert actual_optimizer["param_groups"] == expected_optimizer["param_groups"]
    assert set(actual_optimizer["state"]) == set(expected_optimizer["state"])
    for index, param_state in expected_optimizer["state"].items():
        for key, value in param_state.items():
            assert torch.equal(actual_optimizer["state"][index][key], value), (index, key)
    assert actual["scheduler"] == expected["scheduler"]
    assert (actual["epoch"], actual["global_step"]) == (2, 6)
    assert without_times(read_metrics(tmp_path / "interrupted")) == without_times(read_metrics(reference_dir))
    assert resumed["test"] == reference_results["test"]
    assert resumed["best_epoch"] == reference_results["best_epoch"]


def test_resuming_with_a_different_recipe_is_refused(data, tmp_path):
    config = make_config(data, tmp_path / "run", epochs=2, max_steps_per_epoch=1, val_file=None, test_file=None)
    train(config, stop_after_epoch=1)
    with pytest.raises(ValueError, match=r"different recipe: \['lr'\]"):
        train(config.replace(lr=5e-4), resume=True)
    # Where it runs and how fast may change.
    train(config.replace(eval_batch_size=4, progress=False), resume=True)


def test_same_seed_gives_the_same_adapters_and_another_seed_does_not(data, reference_run, tmp_path):
    reference_dir, _ = reference_run
    expected = load_file(str(reference_dir / "last.safetensors"))
    train(make_config(data, tmp_path / "again"))
    again = load_file(str(tmp_path / "again" / "last.safetensors"))
    assert all(torch.equal(again[name], expected[name]) for name in expected)

    train(make_config(data, tmp_path / "other", seed=7, test_file=None))
    other = load_file(str(tmp_path / "other" / "last.safetensors"))
    assert not all(torch.equal(other[name], expected[name]) for name in expected)


# ---------------------------------------------------------------------------- processes


def test_two_process_gloo_run_with_torchrun(data, tmp_path):
    model_config = tmp_path / "tiny.json"
    model_config.write_text(json.dumps(tiny_model_config()))
    output_dir = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        # torchrun picks the rendezvous port itself: nothing can take it between choice and use.
        "--standalone", str(REPO / "examples" / "train_rsitmd.py"),
        "--model", "tiny-clip", "--pretrained", "none", "--model_config", str(model_config),
        "--image_size", str(IMAGE_SIZE), "--train_files", str(data.train_file), "--val_file", str(data.val_file),
        "--test_file", str(data.test_file), "--image_root", str(data.image_root), "--batch_size", "4",
        "--epochs", "2", "--max_steps_per_epoch", "2", "--num_workers", "0", "--threads", "1",
        "--progress", "false", "--harma.bottleneck", "16", "--harma.heads", "4", "--harma.mini_bottleneck", "8",
        "--harma.mini_heads", "4", "--harma.sharing", "paper", "--output_dir", str(output_dir),
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=180, env=environment, cwd=REPO)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    results = json.loads((output_dir / "results.json").read_text())
    assert results["world_size"] == 2 and results["finished"]
    assert "mean_recall" in results["test"]
    assert [line["step"] for line in read_metrics(output_dir)] == [2, 4]
    assert "processes=2" in completed.stdout


# --------------------------------------------------------------------------- safeguards


def test_a_fresh_run_refuses_a_non_empty_output_dir(data, tmp_path):
    output_dir = tmp_path / "taken"
    output_dir.mkdir()
    (output_dir / "notes.txt").write_text("mine")
    config = make_config(data, output_dir, epochs=1, max_steps_per_epoch=1, val_file=None, test_file=None)
    with pytest.raises(FileExistsError, match="not empty.*--resume.*--overwrite"):
        train(config)
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(write_config(tmp_path / "c.json", config))])
    assert exit_info.value.code == 2
    train(config, overwrite=True)
    assert (output_dir / "notes.txt").read_text() == "mine"  # only the run's own files are replaced
    assert (output_dir / "last.safetensors").is_file()


def write_config(path: Path, config: TrainConfig) -> Path:
    config.save(path)
    return path


def test_missing_images_fail_before_the_model_is_built(data, tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the data was checked")

    monkeypatch.setattr("harma.training.trainer.build_model", no_model)
    config = make_config(data, tmp_path / "run", image_root=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="image root"):
        train(config)


# ------------------------------------------------------------------ schedule, optimizer


def test_linear_warmup_then_linear_decay_to_zero():
    schedule = LinearWarmupDecay.from_fraction(0.1, 100)
    assert schedule.warmup_steps == 10
    assert [schedule(step) for step in (0, 5, 10, 55, 100)] == [0.0, 0.5, 1.0, 0.5, 0.0]
    assert LinearWarmupDecay.from_fraction(0.1, 105).warmup_steps == 10  # floored, as the reference

    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=4e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LinearWarmupDecay(2, 10))
    learning_rates = []
    for _ in range(10):
        learning_rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [0.0, 2e-4, 4e-4, 3.5e-4, 3e-4, 2.5e-4, 2e-4, 1.5e-4, 1e-4, 0.5e-4]
    assert learning_rates == pytest.approx(expected)
    assert optimizer.param_groups[0]["lr"] == 0.0


def test_weight_decay_skips_biases_norms_gates_and_the_temperature():
    model = harma.inject_harma_adapters(
        build_backbone("tiny", None, tiny_model_config()), harma.HarmaConfig(bottleneck=16, heads=4,
                                                                             mini_bottleneck=8, mini_heads=4)
    )
    loss = HarmaLoss()
    named = list(model.named_parameters()) + [("loss.temperature", loss.temperature)]
    decay, no_decay = parameter_groups(named, 0.04)
    assert decay["weight_decay"] == 0.04 and no_decay["weight_decay"] == 0.0
    trainable = {name for name, param in named if param.requires_grad}
    assert set(decay["names"]) | set(no_decay["names"]) == trainable
    assert "loss.temperature" in no_decay["names"]
    for fragment in ("block_gate", ".gate", "down.bias", "up.bias", "in_proj_bias", "mini_adapter.gate"):
        assert any(fragment in name for name in no_decay["names"]), fragment
    assert all(name.endswith("weight") for name in decay["names"])
    assert any(name.endswith("attn.in_proj_weight") for name in decay["names"])
    assert not any("block_gate" in name or name.endswith("bias") for name in decay["names"])


def test_full_fine_tuning_decays_matrices_not_layer_norms():
    config = TrainConfig(method="full", model="tiny", pretrained=None, model_config=tiny_model_config(),
                         image_size=IMAGE_SIZE)
    model = build_model(config)
    decay, no_decay = parameter_groups(model.named_parameters(), 0.04)
    assert "logit_scale" not in decay["names"] + no_decay["names"]
    assert any(".ln_1.weight" in name for name in no_decay["names"])
    assert "token_embedding.weight" in decay["names"]


# ---------------------------------------------------------------------- other methods


def test_lora_trains_mlp_and_attention_in_one_step(data, tmp_path):
    config = make_config(data, tmp_path / "lora", method="lora", epochs=1, max_steps_per_epoch=1,
                         val_file=None, test_file=None)
    train(config)
    tensors = load_file(str(tmp_path / "lora" / "last.safetensors"))
    assert all("lora_" in name for name in tensors)
    for target in ("mlp.c_fc.lora_B", "mlp.c_proj.lora_B", "attn.lora_B", "attn.base_layer.out_proj.lora_B"):
        moved = [name for name in tensors if target in name]
        assert moved, target
        assert all(tensors[name].abs().sum() > 0 for name in moved), target  # B starts at zero

    torch.manual_seed(config.seed)
    model = build_backbone(config.model, None, config.model_config, config.image_size)
    model = load_trained_weights(model, tmp_path / "lora" / "last.safetensors")
    loaded = dict(model.named_parameters())
    assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors.items())


def test_full_fine_tuning_one_step_changes_the_backbone(data, tmp_path):
    config = make_config(data, tmp_path / "full", method="full", epochs=1, max_steps_per_epoch=1,
                         val_file=None, test_file=None)
    torch.manual_seed(config.seed)
    initial = build_model(config).state_dict()
    train(config)
    trained = load_file(str(tmp_path / "full" / "last.safetensors"))
    assert set(trained) == set(initial)
    assert not torch.equal(trained["visual.transformer.resblocks.0.mlp.c_fc.weight"],
                           initial["visual.transformer.resblocks.0.mlp.c_fc.weight"])
    assert torch.equal(trained["logit_scale"], initial["logit_scale"])


# -------------------------------------------------------------------------- configuration


def test_config_file_then_command_line_overrides(tmp_path):
    config_file = tmp_path / "recipe.json"
    config_file.write_text(json.dumps({
        "_comment": "ignored", "lr": 4e-6, "epochs": 80, "model": "ViT-B-32-quickgelu",
        "harma": {"sharing": "reference", "bottleneck": 64},
    }))
    args = parse_args([
        "--config", str(config_file), "--lr", "1e-4", "--harma.sharing", "paper", "--train_files", "a.json,b.json",
        "--max-grad-norm", "1.5", "--augment", "false", "--betas", "0.8,0.9", "--harma.layers", "[0, -1]",
        "--pretrained", "none", "--hardest_negative",
    ], defaults={"epochs": 3, "batch_size": 16})
    config = args.config
    assert (config.lr, config.epochs, config.batch_size, config.model) == (1e-4, 80, 16, "ViT-B-32-quickgelu")
    assert config.harma == harma.HarmaConfig(sharing="paper", bottleneck=64, layers=(0, -1))
    assert config.train_files == ("a.json", "b.json")
    assert (config.max_grad_norm, config.augment, config.betas) == (1.5, False, (0.8, 0.9))
    assert config.pretrained is None and config.hardest_negative is True
    assert not args.resume

    saved = tmp_path / "saved.json"
    config.save(saved)
    assert TrainConfig.from_json_file(saved) == config


def test_bad_configuration_is_named():
    with pytest.raises(ValueError, match=r"'epoch' \(did you mean 'epochs'\?\)"):
        TrainConfig.from_dict({"epoch": 3})
    with pytest.raises(ValueError, match="method must be one of"):
        TrainConfig(method="adapters")
    with pytest.raises(ValueError, match="unknown HarmaConfig field"):
        TrainConfig.from_dict({"harma": {"bottle": 3}})
    with pytest.raises(SystemExit):
        parse_args(["--epochs", "many"])
    with pytest.raises(SystemExit):
        parse_args(["--no-such-option", "1"])


@pytest.mark.parametrize(("fields", "message"), [
    ({"weight_decay": "x"}, r"weight_decay must be a number \(float\), got 'x' \(str\)"),
    ({"train_files": 5}, r"train_files must be a list of strings, got 5 \(int\)"),
    ({"train_files": ["a.json", 5]}, r"train_files must be a list of strings, got \['a.json', 5\]"),
    ({"harma": "papers"}, r"harma must be a HarmaConfig, an object of its fields \(e\.g\. "
                          r"\{\"sharing\": \"paper\"\}\) or a layout preset \('reference', 'paper', 'plus'\), "
                          r"got 'papers' \(str\)"),
    ({"augment": "false"}, r"augment must be true or false \(bool\), got 'false' \(str\)"),
    ({"epochs": 2.5}, r"epochs must be an integer \(int\), got 2\.5 \(float\)"),
    ({"epochs": True}, r"epochs must be an integer \(int\), got True \(bool\)"),
    ({"seed": "1"}, r"seed must be an integer \(int\), got '1' \(str\)"),
    ({"device": 5}, r"device must be a string \(str\), got 5 \(int\)"),
    ({"model": ""}, r"model must be a non-empty string"),
    ({"output_dir": None}, r"output_dir must be a string \(str\), got None"),
    ({"val_file": 3}, r"val_file must be a string \(str\) or null, got 3 \(int\)"),
    ({"model_config": [1]}, r"model_config must be an object \(dict\) or null, got \[1\] \(list\)"),
    ({"betas": [0.9, "a"]}, r"betas must be a list of numbers, got \[0\.9, 'a'\]"),
    ({"betas": "0.9,x"}, r"betas must be a list of numbers, got '0\.9,x'"),
    ({"lora_targets": [1]}, r"lora_targets must be a list of strings, got \[1\]"),
    ({"max_grad_norm": "1"}, r"max_grad_norm must be a number \(float\) or null, got '1' \(str\)"),
    ({"harma": {"bottleneck": "x"}}, r"HarmaConfig\.bottleneck must be a positive integer, got 'x'"),
])
def test_wrongly_typed_config_values_name_the_field_and_the_type(fields, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict(fields)


@pytest.mark.parametrize(("field", "value", "valid"), [
    ("lr", float("inf"), "a finite number > 0"),
    ("lr", float("nan"), "a finite number > 0"),
    ("lr", 0.0, "a finite number > 0"),
    ("weight_decay", float("nan"), "a finite number >= 0"),
    ("weight_decay", -0.1, "a finite number >= 0"),
    ("max_grad_norm", float("nan"), r"null or a finite number > 0"),
    ("max_grad_norm", float("inf"), r"null or a finite number > 0"),
    ("max_grad_norm", 0.0, r"null or a finite number > 0"),
    ("margin", float("nan"), "a finite number >= 0"),
    ("margin", float("inf"), "a finite number >= 0"),
    ("margin", -0.2, "a finite number >= 0"),
    ("gamma", float("nan"), "a finite number >= 0"),
    ("gamma", -1.0, "a finite number >= 0"),
    ("affiliation_weight", float("nan"), "a finite number >= 0"),
    ("affiliation_weight", float("inf"), "a finite number >= 0"),
    ("affiliation_weight", -1.0, "a finite number >= 0"),
    ("lora_alpha", float("inf"), "a finite number > 0"),
    ("lora_alpha", 0.0, "a finite number > 0"),
    ("lora_dropout", 5.0, r"a number in \[0, 1\)"),
    ("lora_dropout", 1.0, r"a number in \[0, 1\)"),
    ("lora_dropout", float("nan"), r"a number in \[0, 1\)"),
    ("temperature_init", 0.0, r"a number in \[0\.001, 0\.5\]"),
    ("temperature_init", float("nan"), r"a number in \[0\.001, 0\.5\]"),
    ("eps", 0.0, "a finite number > 0"),
    ("eps", float("nan"), "a finite number > 0"),
    ("warmup_fraction", float("nan"), r"a number in \[0, 1\)"),
    ("warmup_fraction", 1.0, r"a number in \[0, 1\)"),
    ("betas", (0.9, float("nan")), r"two numbers in \[0, 1\)"),
    ("betas", (0.9, 1.0), r"two numbers in \[0, 1\)"),
    ("betas", (0.9,), r"two numbers in \[0, 1\)"),
    ("seed", -1, r"an integer in \[0, 2\*\*63\)"),
    ("seed", 2**64, r"an integer in \[0, 2\*\*63\)"),
    ("epochs", 0, "an integer >= 1"),
    ("num_workers", -1, "an integer >= 0"),
    ("threads", 0, r"null or an integer >= 1"),
    ("max_steps_per_epoch", 0, r"null or an integer >= 1"),
    ("device", "cuda:x", r"auto, cpu, cuda or cuda:N"),
])
def test_non_finite_and_out_of_range_values_name_the_field_and_the_valid_range(field, value, valid):
    with pytest.raises(ValueError, match=rf"TrainConfig: {field} must be {valid}, got "):
        TrainConfig(**{field: value})


def test_every_numeric_field_has_a_checked_range():
    # A numeric field added later without a range would accept NaN again.
    from harma.training.config import RANGES

    numeric = {f.name for f in dataclasses.fields(TrainConfig)
               if f.type.removesuffix(" | None") in ("int", "float", "tuple[float, float]")}
    assert numeric == set(RANGES)
    for name in numeric - {"betas"}:
        with pytest.raises(ValueError, match=rf"TrainConfig: {name} must be "):
            TrainConfig(**{name: float("nan")})


def test_a_config_file_with_a_bad_value_is_one_error_line_naming_the_field(tmp_path, capsys):
    config_file = tmp_path / "recipe.json"
    for fields, field in (({"weight_decay": "x"}, "weight_decay"), ({"harma": "papers"}, "harma"),
                          ({"lr": 1e999}, "lr")):
        config_file.write_text(json.dumps(fields))
        with pytest.raises(SystemExit) as exit_info:
            main(["--config", str(config_file)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"TrainConfig: {field} must be" in err[0] and "error:" in err[0], err
    for arguments, field in ((["--lr", "inf"], "lr"), (["--lora_dropout", "5"], "lora_dropout")):
        with pytest.raises(SystemExit) as exit_info:
            main(arguments)
        assert exit_info.value.code == 2
        assert f"TrainConfig: {field} must be" in capsys.readouterr().err


def test_resume_alone_reads_the_stored_config(data, tmp_path):
    config = make_config(data, tmp_path / "run", lr=3e-4)
    (tmp_path / "run").mkdir()
    config.save(tmp_path / "run" / "config.json")
    args = parse_args(["--resume", str(tmp_path / "run"), "--progress", "true"])
    assert args.resume == str(tmp_path / "run")
    assert args.config == config.replace(progress=True)


# ---------------------------------------------------------------------- scripts and demo


def test_evaluate_script_reproduces_the_run_results(reference_run, capsys):
    output_dir, results = reference_run
    module = load_repo_script("examples/evaluate.py", cached=False)
    metrics = module.main(["--run", str(output_dir), "--json", "--num_workers", "0"])
    assert metrics == results["test"]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == results["test"]


def test_evaluate_script_applies_the_run_precision_and_tf32(reference_run, tmp_path, monkeypatch):
    output_dir, results = reference_run
    run = tmp_path / "run"
    shutil.copytree(output_dir, run)
    config = TrainConfig.from_json_file(run / "config.json")
    config.replace(precision="bf16", tf32=False).save(run / "config.json")
    module = load_repo_script("examples/evaluate.py", cached=False)
    applied = []
    monkeypatch.setattr(module, "apply_precision", lambda *args: applied.append(args) or apply_precision(*args))
    # bf16 autocast is for CUDA: on the CPU the run's metrics come back unchanged.
    assert module.main(["--run", str(run), "--json", "--num_workers", "0", "--device", "cpu"]) == results["test"]
    module.main(["--run", str(run), "--json", "--num_workers", "0", "--device", "cpu", "--precision", "fp32"])
    module.main(["--model", config.model, "--model_config", json.dumps(config.model_config), "--annotation",
                 str(config.test_file), "--image_root", str(config.image_root), "--json", "--num_workers", "0",
                 "--device", "cpu"])
    cpu = torch.device("cpu")
    assert applied == [("bf16", False, cpu), ("fp32", False, cpu), ("fp32", None, cpu)]


def test_a_layout_preset_names_the_adapter_layout_in_files_and_on_the_command_line(tmp_path, capsys):
    assert TrainConfig(harma="plus").harma == harma.HarmaConfig.plus()
    config_file = tmp_path / "recipe.json"
    config_file.write_text(json.dumps({"harma": "paper"}))
    assert parse_args(["--config", str(config_file)]).config.harma == harma.HarmaConfig.paper()
    parsed = parse_args(["--config", str(config_file), "--harma", "plus", "--harma.layers", "-1"])
    assert parsed.config.harma == harma.HarmaConfig.plus(layers=(-1,))
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--harma", "papers"])
    assert exit_info.value.code == 2 and "invalid choice: 'papers'" in capsys.readouterr().err


@pytest.mark.parametrize(("value", "field"), [
    ("[1.7, 2.9]", "layers"), ("[true]", "layers"), ("[[1]]", "layers"), ("[1]", "towers"), ("[null]", "towers")])
def test_json_list_values_on_the_command_line_are_checked_not_coerced(value, field, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args([f"--harma.{field}", value])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert exit_info.value.code == 2 and len(errors) == 1 and f"HarmaConfig.{field} must be" in errors[0]
    assert parse_args(["--harma.layers", "[0, -1]"]).config.harma.layers == (0, -1)


def test_a_long_inline_model_config_is_json_not_a_file_name():
    architecture = {**tiny_clip_config(image_size=32, width=64, layers=2, embed_dim=32),
                    "comment_padding": "x" * 300}
    text = json.dumps(architecture)
    assert len(text) > 255 and "/" not in text
    from harma.training.options import read_json_object

    assert read_json_object(text) == architecture
    assert parse_args(["--model_config", text]).config.model_config == architecture
