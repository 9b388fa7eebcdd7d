"""Adapter-only checkpoints, peft-style folders, the Hub, and the authors' reference checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import encode, images, perturb_adapters, tiny_open_clip, tokens
from torch import nn

import harma
from harma import io as weights_io


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


# --------------------------------------------------------------------------------------------
# The reference implementation's modules, rebuilt from DESIGN.md sections 1-3 with the
# reference's names and its use of nn.MultiheadAttention on (tokens, batch, width) tensors.


class ReferenceBiShareAdapter(nn.Module):
    def __init__(self, hidden_dim: int = 128, num_heads: int = 8):
        super().__init__()
        self.l1 = nn.Linear(hidden_dim, hidden_dim // 2)
        self.l2 = nn.Linear(hidden_dim // 2, hidden_dim)
        self.multihead_attention1 = nn.MultiheadAttention(hidden_dim // 2, num_heads)
        self.gate1 = nn.Parameter(torch.tensor(0.6))

    def forward(self, x):
        u = self.l1(x)
        attended, _ = self.multihead_attention1(u, u, u)
        alpha = torch.sigmoid(self.gate1)
        return self.l2(alpha * attended + (1 - alpha) * u) + x


class ReferenceMMadapter(nn.Module):
    def __init__(self, share_adapter, hidden_size: int):
        super().__init__()
        self.img_proj_down = nn.Linear(hidden_size, 128)
        self.img_proj_up = nn.Linear(128, hidden_size)
        self.BiShareAdapterxx = share_adapter
        self.multihead_attention = nn.MultiheadAttention(128, 8)
        self.gate1 = nn.Parameter(torch.tensor(0.6))

    def forward(self, x):
        h = F.gelu(self.img_proj_down(x))
        a, _ = self.multihead_attention(h, h, h)
        if self.BiShareAdapterxx is not None:
            a = self.BiShareAdapterxx(a)
        a, _ = self.multihead_attention(a, a, a)
        alpha = torch.sigmoid(self.gate1)
        return x + self.img_proj_up(alpha * h + (1 - alpha) * a)


def reference_block_forward(self, q_x, k_x=None, v_x=None, attn_mask=None):
    x = q_x + self.ls_1(self.attention(q_x=self.ln_1(q_x), attn_mask=attn_mask))
    alpha = torch.sigmoid(self.gate1)
    m = self.mlp(self.ln_2(x)).transpose(0, 1)  # the reference runs its blocks sequence-first
    m = (alpha * self.mmadapter(m) + (1 - alpha) * m).transpose(0, 1)
    return x + self.ls_2(m)


def reference_model(seed: int = 0) -> nn.Module:
    """A tiny CLIP patched the way the authors' fork patches it, with trained-looking adapters."""
    from open_clip.transformer import ResidualAttentionBlock

    class ReferenceBlock(ResidualAttentionBlock):
        forward = reference_block_forward

    model = tiny_open_clip(seed=seed)
    torch.manual_seed(seed + 100)
    for tower, width in ((model.visual.transformer, 64), (model.transformer, 64)):
        for block in tower.resblocks:
            block.__class__ = ReferenceBlock
            share = ReferenceBiShareAdapter() if tower is model.transformer else None
            block.mmadapter = ReferenceMMadapter(share, width)
            block.gate1 = nn.Parameter(torch.tensor(0.6))
    with torch.no_grad():  # as if trained: nothing left at its initial value
        for name, param in model.named_parameters():
            if "mmadapter" in name or "gate1" in name:
                param.add_(torch.randn_like(param) * 0.05)
    return model


def reference_checkpoint(model: nn.Module, temperature: float = 0.031) -> dict:
    state = {f"model.{key}": value for key, value in model.state_dict().items()}
    state["temp"] = torch.tensor(temperature)
    return {"model": state, "config": {"lr": 4e-6, "epochs": 80, "model": "geo"}}


def test_reference_checkpoint_loads_and_reproduces_the_reference_embeddings(tmp_path):
    reference = reference_model().eval()
    keys = list(reference_checkpoint(reference)["model"])
    # the layout of DESIGN.md section 3
    assert "model.visual.transformer.resblocks.0.gate1" in keys
    assert "model.visual.transformer.resblocks.1.mmadapter.multihead_attention.in_proj_weight" in keys
    assert "model.transformer.resblocks.1.mmadapter.BiShareAdapterxx.multihead_attention1.out_proj.bias" in keys
    assert not any("visual" in k and "BiShare" in k for k in keys)
    path = tmp_path / "checkpoint_best.pth"
    torch.save(reference_checkpoint(reference), path)

    model = tiny_open_clip(seed=5)  # other base weights: they must come from the checkpoint
    report = harma.load_official_checkpoint(model, path)
    assert report.temperature == pytest.approx(0.031)
    assert report.missing_keys == [] and report.unexpected_keys == []
    assert report.config["epochs"] == 80
    assert harma.get_harma_config(model).sharing == "reference"
    with torch.no_grad():
        expected = encode(reference, images(), tokens())
        got = encode(model, images(), tokens())
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    bare = tiny_open_clip(seed=6)  # a bare state dict, already in memory
    harma.load_official_checkpoint(bare, reference_checkpoint(reference)["model"])
    assert_same_outputs(model, bare)


def test_reference_checkpoint_key_problems_are_named(tmp_path):
    checkpoint = reference_checkpoint(reference_model())
    checkpoint["model"]["model.visual.transformer.resblocks.0.mmadapter.extra_thing"] = torch.zeros(1)
    del checkpoint["model"]["model.transformer.resblocks.1.mmadapter.gate1"]
    with pytest.raises(ValueError, match=r"1 missing key\(s\) \['transformer.resblocks.1.harma_adapter.gate'\]"
                                         r".*1 unexpected key\(s\) \['visual.transformer.resblocks.0.mmadapter.extra_thing'\]"):
        harma.load_official_checkpoint(tiny_open_clip(), checkpoint)
    report = harma.load_official_checkpoint(tiny_open_clip(), checkpoint, strict=False)
    assert report.missing_keys == ["transformer.resblocks.1.harma_adapter.gate"]
    assert report.unexpected_keys == ["visual.transformer.resblocks.0.mmadapter.extra_thing"]

    wrong = reference_checkpoint(reference_model())
    with pytest.raises(ValueError, match=r"'visual.class_embedding' has shape \(64,\) "
                                         r"in the checkpoint but \(96,\) in the model"):
        harma.load_official_checkpoint(tiny_open_clip(vision_width=96), wrong)


class NotData:
    """Stands for any object whose unpickling would run code."""


def test_reference_checkpoint_with_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "config": NotData()}, path)
    with pytest.raises(ValueError, match="weights_only=True"):
        harma.load_official_checkpoint(tiny_open_clip(), path)


def test_plain_backbone_checkpoint_loads_without_adding_adapters(tmp_path):
    source = tiny_open_clip(seed=3)
    path = tmp_path / "backbone.pt"
    torch.save(source.state_dict(), path)
    model = tiny_open_clip(seed=4)
    report = harma.load_official_checkpoint(model, path)
    assert report.temperature is None and not harma.is_patched(model)
    assert_same_outputs(model, source)
