"""benchmarks/named_adapters.py on a tiny CLIP: switching is timed, each set's memory is its file's
tensor bytes, no backbone tensor is copied, and switching gives the outputs of the set alone."""

from __future__ import annotations

import json
from pathlib import Path

from repo_scripts import load_repo_script

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "named_adapters.py"
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
NAMES = ["rsitmd", "rsicd", "ucm"]


def load_script():
    return load_repo_script("benchmarks/named_adapters.py")


def test_named_adapters_benchmark_in_its_cpu_smoke_size(tmp_path, capsys):
    script = load_script()
    output = tmp_path / "named.json"
    status = script.main([
        "--names", *NAMES, "--model-config", json.dumps(TINY_CLIP), "--image-size", "32", "--batch", "2",
        "--switches", "20", "--forward-repeats", "1", "--reload-repeats", "1", "--threads", "1",
        "--json", str(output),
    ])
    assert status == 0
    results = json.loads(output.read_text())["results"]
    assert results["passed"]

    sets = results["sets"]
    assert [row["name"] for row in sets] == NAMES
    assert [row["sets_held"] for row in sets] == [1, 2, 3]
    assert "set_adapter_median_us" not in sets[0]  # nothing to switch to with one set
    for row in sets[1:]:
        assert 0 < row["set_adapter_min_us"] <= row["set_adapter_median_us"] <= row["set_adapter_p90_us"]
        assert 0 < row["inference_median_us"] <= row["inference_p90_us"]
    assert results["set_adapter_median_us"] == sets[-1]["set_adapter_median_us"]
    assert results["forward_s"] > 0 and results["reload_from_file_s"] > 0
    assert results["set_adapter_vs_forward"] == results["set_adapter_median_us"] / 1e6 / results["forward_s"]

    # A set's parameters are exactly its file's tensor data: the file adds only its header.
    for row in sets:
        assert row["parameters"] > 0
        assert row["parameter_bytes"] == row["parameters"] * 4  # float32
        assert row["file_tensor_bytes"] == row["parameter_bytes"]
        assert 0 < row["file_bytes"] - row["parameter_bytes"] == row["file_header_bytes"] < 64 * 1024
        assert row["add_from_file_s"] > 0
    # Resident memory grows by about a set, never by a backbone (Python objects and allocator
    # rounding on top of the tensors; the backbone here is 8x a set).
    backbone = results["backbone"]
    assert backbone["parameter_bytes"] > 4 * sets[0]["parameter_bytes"]
    for row in sets[1:]:
        assert row["rss_growth_bytes"] < row["parameter_bytes"] + backbone["parameter_bytes"] / 2

    assert backbone["same_tensors_after"] and backbone["tensors"] > 0
    assert [check["name"] for check in results["checks"]] == NAMES
    for check in results["checks"]:
        assert check["equal_to_set_alone"]
        assert check["differs_from_backbone"] and check["differs_from_other_sets"]

    printed = capsys.readouterr().out
    assert "| set_adapter, 3 sets held (median) |" in printed
    assert "| outputs after switching equal a model holding only that set | 3 of 3 sets |" in printed


def test_the_check_fails_when_a_set_is_not_what_it_claims(monkeypatch):
    """The correctness check can fail: a model whose switched outputs are perturbed is caught."""
    script = load_script()
    original = script.outputs
    calls = {"n": 0}

    def perturbed(model, images, texts):
        values = original(model, images, texts)
        calls["n"] += 1
        import harma

        if harma.is_patched(model) and len(harma.list_adapters(model)) > 1 and harma.active_adapter(model) == "b":
            values[0] = values[0] + 1e-6
        return values

    monkeypatch.setattr(script, "outputs", perturbed)
    results = script.run(["a", "b"], model_config=TINY_CLIP, image_size=32, batch=2, switches=5,
                         forward_repeats=1, reload_repeats=1)
    assert calls["n"] > 0
    assert not results["passed"]
    assert [check["equal_to_set_alone"] for check in results["checks"]] == [True, False]
