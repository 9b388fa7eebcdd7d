"""Adapter-only files (harma.checkpoint): safetensors files, peft-style folders, the Hub."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import encode, images, perturb_adapters, tiny_open_clip, tokens
from torch import nn

import harma
from harma import io as weights_io
from harma.checkpoint import load_adapter_state


def trained_model(config: harma.HarmaConfig | None = None, **model_kwargs) -> nn.Module:
    model = harma.inject_harma_adapters(tiny_open_clip(**model_kwargs), config)
    perturb_adapters(model)
    return model


def outputs(model: nn.Module) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return encode(model, images(), tokens())


def assert_same_outputs(first: nn.Module, second: nn.Module) -> None:
    for a, b in zip(outputs(first), outputs(second), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("layout", ["reference", "paper", "none"])
def test_round_trip_into_an_unpatched_model_reproduces_outputs_exactly(tmp_path, layout):
    model = trained_model(harma.HarmaConfig(sharing=layout, layers=[-1] if layout == "none" else None))
    path = harma.save_adapters(model, tmp_path / "adapters.safetensors")
    fresh = tiny_open_clip()  # same base weights, no adapters
    harma.load_adapters(fresh, path)
    assert harma.get_harma_config(fresh) == harma.get_harma_config(model)
    assert_same_outputs(model, fresh)
    assert all(p.requires_grad for p in harma.adapter_parameters(fresh))


def test_file_holds_only_adapter_tensors_and_the_shared_mini_adapter_once(tmp_path):
    model = trained_model(harma.HarmaConfig.paper())
    path = harma.save_adapters(model, tmp_path / "a.safetensors")
    with safe_open(str(path), framework="pt") as reader:
        keys = list(reader.keys())
        metadata = reader.metadata()
    assert all(".harma_adapter." in key for key in keys)
    assert sum(p.numel() for p in harma.adapter_parameters(model)) == sum(
        harma.read_adapter_file(path).tensors[k].numel() for k in keys
    )
    mini_keys = [k for k in keys if ".mini_adapter." in k]
    # two layers, one MMS each, stored under the first tower that uses it only
    assert {k.split(".harma_adapter.")[0] for k in mini_keys} == {
        "visual.transformer.resblocks.0",
        "visual.transformer.resblocks.1",
    }
    assert metadata["format"] == "harma.adapters" and metadata["format_version"] == "2"
    assert json.loads(metadata["fingerprint"])[0] == {
        "name": "vision", "path": "visual.transformer.resblocks", "blocks": 2, "width": 64,
    }
    loaded = harma.load_adapters(tiny_open_clip(), path)
    vision = loaded.visual.transformer.resblocks[1].harma_adapter.mini_adapter
    assert vision is loaded.transformer.resblocks[1].harma_adapter.mini_adapter
    assert torch.equal(vision.up.weight, model.transformer.resblocks[1].harma_adapter.mini_adapter.up.weight)


def test_loading_into_a_patched_model_of_another_layout_is_an_error(tmp_path):
    path = harma.save_adapters(trained_model(harma.HarmaConfig.paper()), tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match=r"another adapter layout.*sharing='paper' \(model: 'reference'\)"):
        harma.load_adapters(harma.inject_harma_adapters(tiny_open_clip()), path)


def test_other_widths_and_layer_counts_are_clear_errors(tmp_path):
    path = harma.save_adapters(trained_model(), tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match=r"vision \(2 blocks of width 64\).*vision \(2 blocks of width 96\)"):
        harma.load_adapters(tiny_open_clip(vision_width=96), path)
    with pytest.raises(ValueError, match=r"vision \(2 blocks of width 64\).*vision \(3 blocks of width 64\)"):
        harma.load_adapters(tiny_open_clip(layers=3), path)


def test_a_wrong_tensor_shape_is_named_with_both_shapes(tmp_path):
    path = harma.save_adapters(trained_model(), tmp_path / "a.safetensors")
    adapter_file = harma.read_adapter_file(path)
    tensors = dict(adapter_file.tensors)
    key = "transformer.resblocks.1.harma_adapter.down.weight"
    tensors[key] = torch.zeros(128, 65)
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=adapter_file.metadata)
    with pytest.raises(ValueError, match=rf"{key}.*\(128, 65\) in the file but \(128, 64\) in the model"):
        harma.load_adapters(tiny_open_clip(), tmp_path / "bad.safetensors")
    del tensors[key]
    tensors["transformer.resblocks.1.harma_adapter.extra"] = torch.zeros(1)
    save_file(tensors, str(tmp_path / "keys.safetensors"), metadata=adapter_file.metadata)
    with pytest.raises(ValueError, match=rf"1 adapter tensor\(s\) missing.*{key}.*no place in the model.*extra"):
        harma.load_adapters(tiny_open_clip(), tmp_path / "keys.safetensors")


def test_files_that_are_not_harma_adapters_are_clear_errors(tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="is not a harma adapter file"):
        harma.load_adapters(tiny_open_clip(), tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        harma.load_adapters(tiny_open_clip(), tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError, match="no adapter file or folder"):
        harma.load_adapters(tiny_open_clip(), tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError, match="no adapter file or folder at runs/best.safetensors"):
        harma.load_adapters(tiny_open_clip(), "runs/best.safetensors")  # a typo, not a Hub id
    save_file({"w": torch.zeros(2)}, str(tmp_path / "future.safetensors"),
              metadata={"format": "harma.adapters", "format_version": "99"})
    with pytest.raises(ValueError, match="format version 99.*upgrade harma"):
        harma.load_adapters(tiny_open_clip(), tmp_path / "future.safetensors")


def test_an_interrupted_save_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    model = trained_model()
    path = harma.save_adapters(model, tmp_path / "a.safetensors")
    good = path.read_bytes()

    def dies_half_way(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(weights_io, "save_file", dies_half_way)
    perturb_adapters(model, seed=9)
    with pytest.raises(KeyboardInterrupt):
        harma.save_adapters(model, path)
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


def test_saved_files_get_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        path = harma.save_adapters(trained_model(), tmp_path / "a.safetensors")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644


def test_peft_style_folder_keeps_an_existing_model_card(tmp_path):
    model = trained_model()
    folder = tmp_path / "adapters"
    harma.save_adapters(model, folder, base_model="ViT-B-32/laion2b_s34b_b79k")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["library"] == "harma" and config["config"]["sharing"] == "reference"
    assert config["base_model"] == "ViT-B-32/laion2b_s34b_b79k"
    assert "base_model: ViT-B-32/laion2b_s34b_b79k" in (folder / "README.md").read_text()
    (folder / "README.md").write_text("my own card")
    harma.save_adapters(model, folder)
    assert (folder / "README.md").read_text() == "my own card"
    assert_same_outputs(model, harma.load_adapters(tiny_open_clip(), folder))


def test_hub_repository_id_resolves_from_the_local_cache_when_offline(tmp_path):
    model = trained_model()
    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--harma-tiny" / "snapshots" / ("a" * 40)
    harma.save_adapters(model, snapshot)
    (cache / "models--someone--harma-tiny" / "refs").mkdir(parents=True)
    (cache / "models--someone--harma-tiny" / "refs" / "main").write_text("a" * 40)
    expected = tmp_path / "expected.pt"
    torch.save(outputs(model), expected)
    script = (
        "import sys, torch, harma; sys.path.insert(0, 'tests')\n"
        "from tiny_models import tiny_open_clip, encode, images, tokens\n"
        "model = harma.load_adapters(tiny_open_clip(), 'hf-hub:someone/harma-tiny')\n"
        "with torch.no_grad(): got = encode(model, images(), tokens())\n"
        f"want = torch.load({str(expected)!r})\n"
        "assert all(torch.equal(a, b) for a, b in zip(got, want))\n"
        "try:\n"
        "    harma.load_adapters(tiny_open_clip(), 'someone/not-cached')\n"
        "except Exception as error:\n"
        "    print('offline error:', type(error).__name__)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home")}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "offline error:" in result.stdout


def test_push_to_hub_uploads_the_peft_style_folder(monkeypatch):
    from huggingface_hub import HfApi

    uploaded = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: uploaded.update(repo=repo_id))

    def upload_folder(self, repo_id, folder_path, commit_message):
        uploaded["files"] = sorted(os.listdir(folder_path))
        uploaded["config"] = json.loads(Path(folder_path, "adapter_config.json").read_text())
        return "https://hub.example/commit/1"

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    url = harma.push_adapters_to_hub(trained_model(), "someone/harma-tiny", base_model="tiny")
    assert url == "https://hub.example/commit/1"
    assert uploaded["repo"] == "someone/harma-tiny"
    assert uploaded["files"] == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert uploaded["config"]["base_model"] == "tiny"


def test_push_to_hub_checks_everything_before_any_hub_call(monkeypatch):
    import huggingface_hub
    from huggingface_hub import HfApi

    def no_hub_call(*args, **kwargs):
        raise AssertionError("the Hub was called before the inputs were checked")

    for name in ("create_repo", "upload_folder", "create_commit", "upload_file", "repo_exists", "whoami"):
        monkeypatch.setattr(HfApi, name, no_hub_call)
        monkeypatch.setattr(huggingface_hub, name, no_hub_call)
    model = trained_model()
    with pytest.raises(ValueError, match=r"'nope'.*'default'"):
        harma.push_adapters_to_hub(model, "someone/harma-tiny", adapter_name="nope")
    with pytest.raises(ValueError, match="carries no HarMA adapters"):
        harma.push_adapters_to_hub(tiny_open_clip(), "someone/harma-tiny")
    for repo_id in ("not a repo id", "a/b/c", ""):
        with pytest.raises(ValueError, match=rf"push_adapters_to_hub: {re.escape(repr(repo_id))} is not a Hub "
                                             r"repository id \(org/name\)"):
            harma.push_adapters_to_hub(model, repo_id)


def nan_adapter_file(tmp_path: Path) -> tuple[nn.Module, Path, str]:
    """A trained model, its adapter file with one tensor turned NaN, and that tensor's name."""
    model = trained_model()
    name, param = next(iter(weights_io.adapter_state_dict(model).items()))
    with torch.no_grad():
        param.view(-1)[0] = float("nan")
    return model, harma.save_adapters(model, tmp_path / "diverged.safetensors", allow_nonfinite=True), name


def test_adapters_holding_nan_or_inf_are_not_saved_unless_allowed(tmp_path):
    model = trained_model()
    name, param = next((n, p) for n, p in weights_io.adapter_state_dict(model).items() if p.numel() > 1)
    with torch.no_grad():
        param.view(-1)[:2] = torch.tensor([float("inf"), float("nan")])
    existing = tmp_path / "kept.safetensors"
    harma.save_adapters(trained_model(), existing)
    saved = existing.read_bytes()
    for target in (existing, tmp_path / "folder", tmp_path / "new.safetensors"):
        with pytest.raises(ValueError, match=rf"save_adapters: adapter set 'default' \(nothing written to "
                                             rf"'{re.escape(str(target))}'\) holds NaN or infinite values in 1 of "
                                             rf"\d+ tensor\(s\): '{re.escape(name)}' \(1 NaN, 1 infinite.*"
                                             r"allow_nonfinite=True to save"):
            harma.save_adapters(model, target)
    assert existing.read_bytes() == saved  # the file the user had is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.safetensors"]
    with pytest.raises(ValueError, match=r"push_adapters_to_hub: adapter set 'default' \(nothing uploaded to "
                                         r"'someone/harma-tiny'\) holds NaN or infinite values"):
        harma.push_adapters_to_hub(model, "someone/harma-tiny")  # refused before the Hub is contacted
    path = harma.save_adapters(model, tmp_path / "diverged.safetensors", allow_nonfinite=True)
    assert torch.isnan(harma.read_adapter_file(path).tensors[name]).sum() == 1


def test_an_adapter_file_with_nan_is_refused_unless_allowed(tmp_path):
    _, path, name = nan_adapter_file(tmp_path)
    model = tiny_open_clip()
    with pytest.raises(ValueError, match=rf"diverged\.safetensors holds NaN or infinite values in 1 of \d+ "
                                         rf"tensor\(s\): '{re.escape(name)}' \(1 NaN, 0 infinite.*allow_nonfinite=True"):
        harma.load_adapters(model, path)
    assert not harma.is_patched(model) and not any(m._forward_hooks for m in model.modules())
    patched = trained_model()
    before = {key: value.clone() for key, value in weights_io.adapter_state_dict(patched).items()}
    with pytest.raises(ValueError, match="NaN or infinite"):
        harma.load_adapters(patched, path)
    assert all(torch.equal(value, before[key]) for key, value in weights_io.adapter_state_dict(patched).items())
    harma.load_adapters(model, path, allow_nonfinite=True)
    assert torch.isnan(weights_io.adapter_state_dict(model)[name]).sum() == 1


def test_load_adapter_state_keeps_its_positional_call_and_checks_finiteness(tmp_path):
    _, path, name = nan_adapter_file(tmp_path)
    adapter_file = harma.read_adapter_file(path)
    arguments = (adapter_file.config, adapter_file.fingerprint, adapter_file.tensors, "peft folder")
    with pytest.raises(ValueError, match=rf"peft folder holds NaN.*'{re.escape(name)}'"):
        load_adapter_state(tiny_open_clip(), *arguments)
    load_adapter_state(tiny_open_clip(), *arguments, allow_nonfinite=True)


def single_process_ddp(model: nn.Module, tmp_path: Path) -> nn.Module:
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    return nn.parallel.DistributedDataParallel(model)


WRAPPERS = {
    "plain": lambda model, tmp_path: model,
    "compile": lambda model, tmp_path: torch.compile(model),
    "data_parallel": lambda model, tmp_path: nn.DataParallel(model),
    "ddp": single_process_ddp,
    "ddp_of_compiled": lambda model, tmp_path: single_process_ddp(torch.compile(model), tmp_path),
}


@pytest.fixture
def wrap(request, tmp_path):
    yield lambda model: WRAPPERS[request.param](model, tmp_path)
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize("wrap", sorted(WRAPPERS), indirect=True)
def test_adapter_files_are_independent_of_compile_and_ddp_wrappers(tmp_path, wrap):
    model = trained_model(harma.HarmaConfig.paper())
    plain = harma.save_adapters(model, tmp_path / "plain.safetensors")
    wrapped = harma.save_adapters(wrap(model), tmp_path / "wrapped.safetensors")
    assert harma.read_adapter_file(wrapped).tensors.keys() == harma.read_adapter_file(plain).tensors.keys()
    assert harma.read_adapter_file(wrapped).fingerprint == harma.read_adapter_file(plain).fingerprint
    for target in (tiny_open_clip(), harma.inject_harma_adapters(tiny_open_clip(), harma.HarmaConfig.paper())):
        assert harma.load_adapters(wrap(target), wrapped) is not None
        assert_same_outputs(model, target)


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module.", "module._orig_mod."])
def test_adapter_files_of_older_versions_with_wrapper_prefixes_load(tmp_path, prefix):
    model = trained_model(harma.HarmaConfig.paper())
    adapter_file = harma.read_adapter_file(harma.save_adapters(model, tmp_path / "a.safetensors"))
    save_file({f"{prefix}{key}": value for key, value in adapter_file.tensors.items()},
              str(tmp_path / "old.safetensors"), metadata=adapter_file.metadata)
    for target in (tiny_open_clip(), torch.compile(tiny_open_clip())):
        harma.load_adapters(target, tmp_path / "old.safetensors")
        assert_same_outputs(model, harma.named_adapters.unwrap_model(target))


def test_the_safetensors_suffix_in_any_case_writes_a_file(tmp_path):
    path = harma.save_adapters(trained_model(), tmp_path / "Adapters.SAFETENSORS")
    assert path == tmp_path / "Adapters.SAFETENSORS" and path.is_file()
    assert_same_outputs(trained_model(), harma.load_adapters(tiny_open_clip(), path))


@pytest.mark.parametrize("name", ["adapters.pt", "adapters.pth", "adapters.BIN", "last.ckpt"])
def test_a_path_with_another_weight_suffix_is_refused_and_nothing_written(tmp_path, name):
    with pytest.raises(ValueError, match=rf"cannot save adapters to '.*{re.escape(name)}': adapter files are "
                                         r"safetensors.*use a name ending in \.safetensors for one file, or a folder"):
        harma.save_adapters(trained_model(), tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_a_folder_without_adapter_file_is_named(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no harma adapter file at '.*run/adapter_model\.safetensors'"):
        harma.load_adapters(tiny_open_clip(), tmp_path / "run")
