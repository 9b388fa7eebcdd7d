"""The weights I/O layer (harma.io): atomic writes, readable errors, all-or-nothing loads."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import perturb_adapters, tiny_open_clip

import harma
from harma import io as weights_io


def test_atomic_write_leaves_no_file_and_no_temporary_on_failure(tmp_path):
    target = tmp_path / "out.bin"

    def fails(temporary):
        temporary.write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        weights_io.atomic_write(target, fails)
    assert list(tmp_path.iterdir()) == []


def test_write_and_read_safetensors_round_trip(tmp_path):
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.int64)}
    path = weights_io.write_safetensors(tmp_path / "x.safetensors", tensors, {"kind": "test"})
    metadata, read = weights_io.read_safetensors(path)
    assert metadata == {"kind": "test"} and set(read) == {"a", "b"}
    assert all(torch.equal(read[name], tensors[name]) for name in tensors)


def test_reading_a_damaged_or_missing_file_names_it(tmp_path):
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="damaged.safetensors.*not a readable safetensors file"):
        weights_io.read_safetensors(damaged)
    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        weights_io.read_safetensors(tmp_path / "absent.safetensors")


@pytest.mark.parametrize("content", [[torch.zeros(1)], torch.zeros(2), {"w": "text"}])
def test_a_torch_file_that_is_no_state_dict_is_named(tmp_path, content):
    path = tmp_path / "odd.pt"
    torch.save(content, path)
    with pytest.raises(ValueError, match=r"odd\.pt.*(state dict|weights_only)"):
        weights_io.read_state_dict(path)


def test_match_tensors_names_missing_unexpected_and_shapes():
    targets = {"a": torch.zeros(2), "b": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"'f' does not fit.*1 tensor\(s\) missing.*\['b'\].*no place.*\['c'\]"):
        weights_io.match_tensors(targets, {"a": torch.ones(2), "c": torch.ones(1)}, "'f'")
    with pytest.raises(ValueError, match=r"'b' has shape \(4,\) in the file but \(3,\) in the model"):
        weights_io.match_tensors(targets, {"a": torch.ones(2), "b": torch.ones(4)}, "'f'")


def test_load_tensors_copies_nothing_when_one_tensor_does_not_fit():
    targets = {"a": torch.zeros(2), "b": torch.zeros(3)}
    with pytest.raises(ValueError):
        weights_io.load_tensors(targets, {"a": torch.ones(2), "b": torch.ones(4)}, "'f'")
    assert torch.equal(targets["a"], torch.zeros(2))
    weights_io.load_tensors(targets, {"a": torch.ones(2), "b": torch.ones(3)}, "'f'")
    assert torch.equal(targets["b"], torch.ones(3))


def test_adapter_tensors_load_with_or_without_the_peft_prefix():
    source = harma.inject_harma_adapters(tiny_open_clip(), harma.HarmaConfig.paper())
    perturb_adapters(source)
    stored = {f"{weights_io.PEFT_KEY_PREFIX}{name}": t for name, t in weights_io.adapter_state_dict(source).items()}
    target = harma.inject_harma_adapters(tiny_open_clip(), harma.HarmaConfig.paper())
    weights_io.load_adapter_tensors(target, stored, "stored")
    expected = weights_io.adapter_state_dict(source)
    assert all(torch.equal(t, expected[name]) for name, t in weights_io.adapter_state_dict(target).items())


def test_a_failed_adapter_load_leaves_an_unpatched_model_unpatched(tmp_path):
    source = harma.inject_harma_adapters(tiny_open_clip())
    path = harma.save_adapters(source, tmp_path / "a.safetensors")
    adapter_file = harma.read_adapter_file(path)
    tensors = dict(adapter_file.tensors)
    tensors.pop(next(iter(tensors)))
    save_file(tensors, str(tmp_path / "b.safetensors"), metadata=adapter_file.metadata)
    model = tiny_open_clip()
    with pytest.raises(ValueError, match="1 adapter tensor"):
        harma.load_adapters(model, tmp_path / "b.safetensors")
    assert not harma.is_patched(model) and not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("entry, problem", [
    ("format_version", "format_version 'x' is not an integer"),
    ("fingerprint", "damaged architecture fingerprint"),
    ("config", "'config' is not JSON"),
])
def test_damaged_adapter_headers_are_named(tmp_path, entry, problem):
    path = harma.save_adapters(harma.inject_harma_adapters(tiny_open_clip()), tmp_path / "a.safetensors")
    adapter_file = harma.read_adapter_file(path)
    metadata = dict(adapter_file.metadata)
    metadata[entry] = {"format_version": "x", "fingerprint": '[{"name": "vision"}]', "config": "{"}[entry]
    save_file(dict(adapter_file.tensors), str(tmp_path / "bad.safetensors"), metadata=metadata)
    with pytest.raises(ValueError, match=rf"bad\.safetensors.*{problem}"):
        harma.load_adapters(tiny_open_clip(), tmp_path / "bad.safetensors")
