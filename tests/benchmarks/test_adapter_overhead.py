"""benchmarks/adapter_overhead.py on a tiny CLIP: the strict floor stops at the embeddings, and the
comparison gives every method a time ratio and a FLOP ratio to it."""

from __future__ import annotations

from pathlib import Path

import torch
from repo_scripts import load_repo_script

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "adapter_overhead.py"
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def load_script():
    return load_repo_script("benchmarks/adapter_overhead.py")


def flop_counts(script, method: str) -> dict:
    model, optimizer, _ = script.build(method, model_config=TINY_CLIP)
    step = script.make_step(method, model, optimizer, batch=2, image_size=32, context_length=32)
    counter = torch.utils.flop_counter.FlopCounterMode(display=False, custom_mapping=script._CPU_ATTENTION_FLOPS)
    with counter:
        step()
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    return {str(op): count for op, count in counter.get_flop_counts()["Global"].items()}


def test_strict_floor_backpropagates_through_the_blocks_but_not_into_the_pixels():
    script = load_script()
    floor, frozen = flop_counts(script, "floor"), flop_counts(script, "frozen")
    assert "aten.convolution" in floor and "aten.convolution_backward" not in floor
    # The backward through every block takes input gradients only (no weight gradients): about
    # as many products again as the forward.
    assert 1.8 * sum(frozen.values()) < sum(floor.values()) < 2.5 * sum(frozen.values())
    assert any("attention" in op and "backward" in op for op in floor)  # the backbone's fused attention counts


def test_compare_gives_every_method_both_ratios_to_the_floor():
    script = load_script()
    methods = ["frozen", "harma", "harma_plus", "harma_authors", "lora_mlp"]
    results, timing = script.compare(methods, batch=2, rounds=2, warmup=1, image_size=32, model_config=TINY_CLIP)
    assert list(results) == ["floor", *methods]
    assert results["floor"]["time_ratio"] == results["floor"]["flop_ratio"] == 1.0
    assert results["frozen"]["flop_ratio"] < 1.0 < results["harma"]["flop_ratio"]
    # The authors' way of writing the adapters computes the same products as harma's.
    assert results["harma_authors"]["flops"] == results["harma"]["flops"]
    assert results["harma"]["trainable_params"] > results["harma_plus"]["trainable_params"] > 0
    for row in results.values():
        assert len(row["round_ratios"]) == 2 and row["time_ratio"] > 0
        assert row["above_limit"] == row["time_ratio"] / row["flop_ratio"] - 1
    assert timing["rounds_kept"] == 2 and len(timing["foreign_load_per_round"]) == 2
    markdown = script.table(results)
    assert all(f"| {method} |" in markdown for method in results)
