"""The weights I/O layer (harma.io): atomic writes, readable errors, all-or-nothing loads."""

from __future__ import annotations

import os
import re

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


def test_check_finite_names_the_source_and_the_first_non_finite_tensors():
    tensors = {"ok": torch.ones(3), "steps": torch.arange(4), "a": torch.tensor([1.0, float("nan"), float("inf")]),
               "b": torch.full((2, 2), float("-inf"), dtype=torch.float16)}
    assert weights_io.nonfinite_tensors(tensors) == ["a", "b"]
    with pytest.raises(ValueError, match=r"'f\.safetensors' holds NaN or infinite values in 2 of 4 tensor\(s\): "
                                         r"'a' \(1 NaN, 1 infinite of 3 values\), 'b' \(0 NaN, 4 infinite of 4 "
                                         r"values\); look at the run"):
        weights_io.check_finite(tensors, "'f.safetensors'", hint="look at the run")
    weights_io.check_finite({"ok": torch.ones(3), "steps": torch.arange(4)}, "'f'")
    many = {f"t{i}": torch.tensor([float("nan")]) for i in range(5)}
    with pytest.raises(ValueError, match=r"5 of 5 tensor\(s\): 't0'.*'t2' \(1 NaN.*\) and 2 more$"):
        weights_io.check_finite(many, "'f'")


def test_a_folder_where_a_file_is_expected_is_named_as_a_folder(tmp_path):
    folder = tmp_path / "weights.safetensors"
    folder.mkdir()
    with pytest.raises(IsADirectoryError, match=r"weights\.safetensors' is a folder, not a weights file"):
        weights_io.read_safetensors(folder)
    with pytest.raises(IsADirectoryError, match=r"weights\.safetensors' is a folder, not a file"):
        weights_io.read_torch_file(folder)
    with pytest.raises(IsADirectoryError, match="is a folder"):
        weights_io.read_state_dict(folder)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads every file")
def test_a_file_without_read_permission_is_named_with_the_cause(tmp_path):
    path = weights_io.write_safetensors(tmp_path / "locked.safetensors", {"a": torch.ones(1)}, {})
    torch.save({"a": torch.ones(1)}, tmp_path / "locked.pt")
    locked_folder = tmp_path / "locked_folder"
    locked_folder.mkdir()
    weights_io.write_safetensors(locked_folder / "inner.safetensors", {"a": torch.ones(1)}, {})
    for target in (path, tmp_path / "locked.pt"):
        target.chmod(0)
    locked_folder.chmod(0)
    try:
        for read, target in ((weights_io.read_safetensors, path), (weights_io.read_torch_file, tmp_path / "locked.pt"),
                             (weights_io.read_safetensors, locked_folder / "inner.safetensors")):
            with pytest.raises(PermissionError, match=rf"'{re.escape(str(target))}' cannot be read: "
                                                      r"Permission denied") as caught:
                read(target)
            assert "No such file" not in str(caught.value)
    finally:
        locked_folder.chmod(0o755)


@pytest.mark.parametrize("cut", [4, 20, -3], ids=["in_the_length", "in_the_header", "in_the_data"])
def test_a_truncated_safetensors_file_is_named(tmp_path, cut):
    whole = weights_io.write_safetensors(tmp_path / "whole.safetensors", {"a": torch.ones(8), "b": torch.zeros(2)},
                                         {"kind": "test"}).read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(whole[:cut])
    with pytest.raises(ValueError, match=r"'.*cut\.safetensors' is not a readable safetensors file"):
        weights_io.read_safetensors(path)


@pytest.mark.parametrize("cut", [0, 10, 0.5, -1], ids=["empty", "first_bytes", "half", "last_byte"])
def test_a_truncated_torch_file_is_named(tmp_path, cut):
    whole = tmp_path / "whole.pt"
    torch.save({"state_dict": {"w": torch.arange(64.0)}}, whole)
    data = whole.read_bytes()
    path = tmp_path / "cut.pt"
    path.write_bytes(data[: int(len(data) * cut) if isinstance(cut, float) else cut])
    with pytest.raises(ValueError, match=r"'.*cut\.pt' could not be read with torch\.load"):
        weights_io.read_torch_file(path)
    with pytest.raises(ValueError, match=r"cut\.pt"):
        weights_io.read_state_dict(path)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod.", "base_model.model.module."])
def test_adapter_tensors_stored_with_wrapper_prefixes_load(prefix):
    source = harma.inject_harma_adapters(tiny_open_clip(), harma.HarmaConfig.paper())
    perturb_adapters(source)
    stored = {f"{prefix}{name}": t for name, t in weights_io.adapter_state_dict(source).items()}
    target = harma.inject_harma_adapters(tiny_open_clip(), harma.HarmaConfig.paper())
    weights_io.load_adapter_tensors(torch.nn.DataParallel(target), stored, "stored")
    expected = weights_io.adapter_state_dict(source)
    assert all(torch.equal(t, expected[name]) for name, t in weights_io.adapter_state_dict(target).items())
    stored["module.visual.transformer.resblocks.0.extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"no place in the model, e\.g\. \['module\.visual\.transformer\.resblocks"):
        weights_io.match_adapter_tensors(target, stored, "stored")


def test_an_unreadable_file_is_named_with_the_cause_even_as_root(tmp_path, monkeypatch):
    path = weights_io.write_safetensors(tmp_path / "locked.safetensors", {"a": torch.ones(1)}, {})

    def refuse(file, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(file))

    monkeypatch.setattr(weights_io, "open", refuse, raising=False)  # what open() does for another user
    with pytest.raises(PermissionError, match=r"locked\.safetensors' cannot be read: Permission denied \(check"):
        weights_io.read_safetensors(path)
    with pytest.raises(PermissionError, match=r"locked\.safetensors' cannot be read"):
        harma.read_adapter_file(path)
