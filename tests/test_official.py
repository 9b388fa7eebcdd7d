"""The authors' reference checkpoints (harma.official): key translation, exact reproduction of the
reference embeddings, and loads that either fully succeed or leave the model as it was."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_checkpoint import assert_same_outputs
from tiny_models import encode, images, tiny_open_clip, tokens
from torch import nn

import harma

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
                                         r"in the file but \(96,\) in the model"):
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


def test_a_failed_strict_load_leaves_the_model_as_it_was():
    checkpoint = reference_checkpoint(reference_model())
    checkpoint["model"]["model.visual.transformer.resblocks.0.mmadapter.extra_thing"] = torch.zeros(1)
    model = tiny_open_clip(seed=5)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(ValueError, match="unexpected key"):
        harma.load_official_checkpoint(model, checkpoint)
    assert not harma.is_patched(model)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[key], before[key]) for key in before)


@pytest.mark.parametrize("content", [[1, 2, 3], torch.zeros(3)])
def test_a_file_that_is_no_dict_is_named(tmp_path, content):
    path = tmp_path / "odd.pth"
    torch.save(content, path)
    with pytest.raises(ValueError, match=r"odd\.pth holds a (list|Tensor)"):
        harma.load_official_checkpoint(tiny_open_clip(), path)


@pytest.mark.parametrize("cut", [0, 0.5, -1], ids=["empty", "half", "last_byte"])
def test_a_truncated_checkpoint_is_named_and_nothing_changes(tmp_path, cut):
    whole = tmp_path / "whole.pth"
    torch.save(reference_checkpoint(reference_model()), whole)
    data = whole.read_bytes()
    path = tmp_path / "checkpoint_best.pth"
    path.write_bytes(data[: int(len(data) * cut) if isinstance(cut, float) else cut])
    model = tiny_open_clip()
    with pytest.raises(ValueError, match=r"'.*checkpoint_best\.pth' could not be read with torch\.load"):
        harma.load_official_checkpoint(model, path)
    assert not harma.is_patched(model)


def test_a_folder_given_as_the_checkpoint_is_named(tmp_path):
    folder = tmp_path / "checkpoint_best.pth"
    folder.mkdir()
    with pytest.raises(IsADirectoryError, match=r"'.*checkpoint_best\.pth' is a folder, not a file"):
        harma.load_official_checkpoint(tiny_open_clip(), folder)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module.model._orig_mod."])
def test_checkpoints_of_wrapped_models_load_into_wrapped_models(prefix):
    reference = reference_model().eval()
    state = {f"{prefix}{key}": value for key, value in reference.state_dict().items()}
    model = tiny_open_clip(seed=5)
    harma.load_official_checkpoint(nn.DataParallel(torch.compile(model)), state)
    assert harma.get_harma_config(model).sharing == "reference"
    with torch.no_grad():
        for a, b in zip(encode(model, images(), tokens()), encode(reference, images(), tokens()), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_plain_backbone_loads_strictly_into_a_model_patched_with_any_placement(tmp_path):
    source = tiny_open_clip(seed=3)
    path = tmp_path / "backbone.pt"
    torch.save(source.state_dict(), path)
    model = harma.inject_harma_adapters(tiny_open_clip(seed=4), harma.HarmaConfig.plus())
    report = harma.load_official_checkpoint(model, path)  # strict: the adapters are not "missing"
    assert report.missing_keys == [] and harma.is_patched(model)


def test_the_checkpoint_fills_the_default_set_of_a_model_serving_other_sets(tmp_path):
    reference = reference_model().eval()
    model = harma.inject_harma_adapters(tiny_open_clip(seed=5), harma.HarmaConfig.plus(), adapter_name="mine")
    mine = {name: p.detach().clone() for name, p in harma.inject.adapter_named_parameters(model, "mine")}
    report = harma.load_official_checkpoint(model, reference_checkpoint(reference))
    assert report.missing_keys == [] and report.unexpected_keys == []
    assert harma.list_adapters(model) == ["mine", "default"] and harma.active_adapter(model) == "mine"
    assert all(torch.equal(p, mine[name]) for name, p in harma.inject.adapter_named_parameters(model, "mine"))
    harma.set_adapter(model, "default")
    with torch.no_grad():
        for a, b in zip(encode(model, images(), tokens()), encode(reference, images(), tokens()), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_failed_strict_load_leaves_a_model_serving_other_sets_as_it_was():
    model = harma.inject_harma_adapters(tiny_open_clip(seed=5), harma.HarmaConfig(freeze_backbone=False),
                                        adapter_name="mine")
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    state = dict(reference_checkpoint(reference_model())["model"])
    state["model.unknown"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected key"):
        harma.load_official_checkpoint(model, {"model": state})
    assert harma.list_adapters(model) == ["mine"]
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
