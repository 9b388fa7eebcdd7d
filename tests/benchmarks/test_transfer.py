"""The transfer benchmark (benchmarks/transfer.py): its smallest mode runs end to end and writes
the documented JSON; its learning-rate rule and tokenizer behave as documented."""

from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from repo_scripts import load_repo_script

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "transfer.py"
METHODS = ("frozen", "harma", "harma_paper", "harma_plus", "lora", "linear_probe", "full")
RECALLS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")


def load_benchmark():
    return load_repo_script("benchmarks/transfer.py")


def is_percent(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and 0.0 <= value <= 100.0


@pytest.mark.slow
def test_smoke_mode_writes_documented_results(tmp_path: Path) -> None:
    json_path = tmp_path / "results.json"
    plot_path = tmp_path / "plot.png"
    # A subprocess, so the benchmark's thread setting does not leak into the test session.
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--threads", "1", "--json", str(json_path),
         "--plot", str(plot_path), "--data-dir", str(tmp_path / "data")],
        capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "| method |" in completed.stdout  # the markdown table is printed

    results = json.loads(json_path.read_text())
    assert set(METHODS) <= set(results)
    for method in METHODS:
        entry = results[method]
        for key in ("mean_recall", "mean_recall_std", "trainable_params", "step_seconds", "per_seed"):
            assert key in entry, (method, key)
        assert is_percent(entry["mean_recall"])
        assert entry["mean_recall_std"] >= 0.0
        assert entry["step_seconds"] >= 0.0
        for key in RECALLS:
            assert is_percent(entry[key]), (method, key)
        assert len(entry["per_seed"]) == len(results["_meta"]["settings"]["seeds"]) == 1
        run = entry["per_seed"][0]
        assert run["seed"] == 0
        for key in (*RECALLS, "mean_recall"):
            assert is_percent(run["test"][key])
        assert math.isclose(run["test"]["mean_recall"], sum(run["test"][k] for k in RECALLS) / 6, abs_tol=1e-6)
        assert math.isclose(entry["mean_recall"], run["test"]["mean_recall"], abs_tol=1e-6)

    assert results["frozen"]["trainable_params"] == 0
    assert results["frozen"]["step_seconds"] == 0.0
    full = results["full"]["trainable_params"]
    for method in ("harma", "harma_paper", "harma_plus", "lora", "linear_probe"):
        assert 0 < results[method]["trainable_params"] < full
        assert results[method]["step_seconds"] > 0.0
        assert results[method]["lr"] in load_benchmark().LR_LADDER
    # The two HarMA layouts own the same parameters; only who uses the MMS differs.
    assert results["harma"]["trainable_params"] == results["harma_paper"]["trainable_params"]

    meta = results["_meta"]
    assert meta["mode"] == "smoke"
    assert set(meta["lr_grids"]) == set(METHODS) - {"frozen"}
    assert is_percent(meta["pretrain"]["source_test"]["mean_recall"])
    assert set(meta["targets"]) >= {"harma", "harma_paper", "harma_plus", "any_met"}
    assert "mr_above_lora" in meta["targets"]["harma_plus"]
    assert meta["scenario"] == "new-vocabulary" and set(meta["shift"]) == {"frozen_fraction_of_full", "real"}
    # Each HarMA entry records the layout it ran with, at the benchmark's scale.
    import harma

    plus = harma.HarmaConfig.from_dict(results["harma_plus"]["config"])
    assert plus == load_benchmark().MODES["smoke"].scaled_harma_config(harma.HarmaConfig.plus())
    assert results["harma_plus"]["trainable_params"] <= results["harma"]["trainable_params"]

    table = json_path.with_suffix(".md").read_text()
    assert table.startswith("# Transfer benchmark: new vocabulary, smoke mode\n")  # a page title
    rows = [line for line in table.splitlines() if line.startswith("|")]
    assert len(rows) == 2 + len(METHODS)  # header, separator, one row per method
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_known_vocabulary_scenario_runs_and_records_itself(tmp_path: Path) -> None:
    json_path = tmp_path / "results.json"
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--threads", "1", "--scenario", "known-vocabulary", "--methods",
         "frozen", "harma_plus", "full", "--json", str(json_path), "--plot", "none"],
        capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    results = json.loads(json_path.read_text())
    assert list(results) == ["frozen", "harma_plus", "full", "_meta"]  # in the order asked for
    assert results["_meta"]["scenario"] == "known-vocabulary"
    assert set(results["_meta"]["vocabulary"]) >= {"target_words", "unseen_in_pretraining", "min_count"}


def test_a_weak_shift_stops_the_run_before_adapters_are_scored() -> None:
    benchmark = load_benchmark()
    benchmark.require_real_shift({"frozen": {"mean_recall": 18.0}, "full": {"mean_recall": 30.0}})  # 60%: real
    with pytest.raises(RuntimeError, match="frozen reaches 78% of full"):
        benchmark.require_real_shift({"frozen": {"mean_recall": 24.7}, "full": {"mean_recall": 31.5}})


def test_known_vocabulary_pretraining_covers_every_target_word() -> None:
    benchmark = load_benchmark()
    settings = benchmark.MODES["smoke"]
    words = {"silo", "airstrip", "meadow", "house"}
    counts = benchmark.Counter({"house": 25})
    pairs = benchmark.known_vocabulary_pairs(settings, 60, words, counts)
    assert len(pairs.images) == 60 and pairs.images.shape[1:] == (3, settings.image_size, settings.image_size)
    assert len(pairs.captions) == len(pairs.image_index) == 5 * 60
    seen = benchmark.Counter(word for caption in pairs.captions for word in caption.split())
    for word in words - {"house"}:
        assert seen[word] >= benchmark.KNOWN_VOCABULARY_MIN_COUNT, word
    assert counts["silo"] == seen["silo"]  # the running counts were updated
    # Too few scenes for the words asked: a clear error, not silently thin coverage.
    with pytest.raises(RuntimeError, match="KNOWN_VOCABULARY_SHARE"):
        benchmark.known_vocabulary_pairs(settings, 3, {"parasol", "silo", "airstrip"}, benchmark.Counter())


def test_false_colour_target_keeps_the_words_and_changes_the_colours() -> None:
    benchmark = load_benchmark()
    style, target = benchmark.KNOWN_VOCABULARY_TARGET_STYLE, benchmark.TARGET_STYLE
    assert dict(style.vocabulary) == dict(target.vocabulary)
    assert style.noise_std == target.noise_std and style.scale == target.scale
    # Vegetation is bright in the near-infrared (the red channel here), water dark.
    assert style.palette["tree"][0] > style.palette["tree"][1]
    assert style.palette["water"][0] < 0.6 * style.palette["grass"][0]
    assert style.palette["red"] != target.palette["red"]


def test_vocabulary_report_names_unseen_and_rare_words() -> None:
    benchmark = load_benchmark()
    split = benchmark.PairSplit(images=torch.zeros(1), captions=["a red house", "a red house near a pond"],
                                image_index=torch.zeros(2, dtype=torch.long))
    target_split = benchmark.EvalSplit(images=torch.zeros(1), captions=["a house by a lake"], txt2img=torch.zeros(1))
    source = benchmark.Domain(train=split, val=None, test=split)
    report = benchmark.vocabulary_report(source, {0: benchmark.Domain(train=target_split, val=None, test=target_split)})
    assert report["unseen_in_pretraining"] == ["by", "lake"]
    assert report["min_count"] == 0 and report["target_words"] == 4
    assert report["rarest"]["house"] == 2


def test_harma_sizes_scale_any_preset_and_keep_head_widths() -> None:
    import harma

    settings = load_benchmark().MODES["quick"]  # widths divided by 4
    assert settings.harma_sizes() == {"bottleneck": 32, "heads": 2, "mini_bottleneck": 16, "mini_heads": 2}
    half = harma.HarmaConfig(bottleneck=64, heads=4, mini_bottleneck=32, mini_heads=4, placement="attention+mlp")
    scaled = settings.scaled_harma_config(half)
    assert (scaled.bottleneck, scaled.heads, scaled.mini_bottleneck, scaled.mini_heads) == (16, 1, 8, 1)
    assert scaled.placement == "attention+mlp"


def _fake_run(methods: dict[str, float], scenario: str = "new-vocabulary", source_mr: float = 40.0) -> dict:
    results = {method: {"mean_recall": mr, "trainable_params": 1000 if method == "full" else 10}
               for method, mr in methods.items()}
    results["_meta"] = {"mode": "quick", "settings": {"seeds": [0]}, "vocab_size": 9, "full_params": 1000,
                        "lora": {"rank": 6}, "scenario": scenario, "wall_seconds": 1.0, "threads": 1,
                        "torch": "x", "pretrain": {"source_test": {"mean_recall": source_mr}},
                        "lr_grids": {m: [] for m in methods if m != "frozen"}}
    return results


def test_merge_adds_methods_and_recomputes_the_checks() -> None:
    benchmark = load_benchmark()
    earlier = _fake_run({"frozen": 5.0, "harma": 20.0, "lora": 25.0, "full": 30.0})
    new = _fake_run({"harma_plus": 28.0})
    new["_meta"]["settings"]["seeds"] = (0,)  # a run in memory holds tuples, its JSON file lists
    merged = benchmark.merge_results(earlier, new)
    assert [key for key in merged if key != "_meta"] == ["frozen", "harma", "harma_plus", "lora", "full"]
    assert merged["harma"] == earlier["harma"]
    check = merged["_meta"]["targets"]["harma_plus"]
    assert check["mr_above_lora"] == pytest.approx(3.0) and check["mr_fraction_of_full"] == pytest.approx(28 / 30)
    assert merged["_meta"]["shift"]["real"] and "harma_plus" in merged["_meta"]["lr_grids"]
    with pytest.raises(ValueError, match="backbones differ"):
        benchmark.merge_results(earlier, _fake_run({"harma_plus": 28.0}, source_mr=41.0))
    with pytest.raises(ValueError, match="known-vocabulary run into"):
        benchmark.merge_results(earlier, _fake_run({"harma_plus": 28.0}, scenario="known-vocabulary"))


def test_lr_rule_extends_past_an_edge_winner_and_never_sees_test() -> None:
    benchmark = load_benchmark()
    ladder = benchmark.LR_LADDER
    tried: list[float] = []

    def runner(lr: float) -> dict:
        tried.append(lr)
        # Validation keeps improving with the learning rate; test would prefer the smallest.
        return {"lr": lr, "val": {"mean_recall": 10 * math.log10(lr) + 100}, "test": {"mean_recall": -lr}}

    best, runs = benchmark.choose_lr("harma", runner, extensions=2, on_run=lambda run: None)
    centre = ladder.index(benchmark.LR_CENTRE["harma"])
    assert tried == [ladder[centre - 1], ladder[centre], ladder[centre + 1], ladder[centre + 2], ladder[centre + 3]]
    assert best == ladder[centre + 3]
    assert [run["lr"] for run in runs] == sorted(tried)

    tried.clear()
    best, _ = benchmark.choose_lr("full", lambda lr: runner(lr) | {"val": {"mean_recall": -abs(math.log10(lr / 3e-4))}},
                                  extensions=2, on_run=lambda run: None)
    assert best == 3e-4 and len(tried) == 3  # the centre won: no extension


def test_compact_tokenizer_keeps_padding_zero_and_end_of_text_largest() -> None:
    benchmark = load_benchmark()
    captions = ["a red house on the left", "two planes near a white terminal"]
    tokenizer = benchmark.CompactTokenizer(captions, context_length=16)
    tokens = tokenizer(captions)
    assert tokens.shape == (2, 16)
    assert int(tokens.max()) == tokenizer.vocab_size - 1
    # open_clip pools the text at the argmax token: it must be the end-of-text position.
    bpe = tokenizer.bpe(captions)
    assert torch.equal(tokens.argmax(dim=-1), bpe.argmax(dim=-1))
    assert torch.equal(tokens == 0, bpe == 0)
    with pytest.raises(ValueError, match="vocabulary"):
        tokenizer(["zebra"])


ABLATIONS = SCRIPT.with_name("transfer_ablations.py")


@pytest.mark.slow
def test_ablation_script_runs_each_variant_and_changes_only_what_it_names(tmp_path: Path) -> None:
    json_path = tmp_path / "ablations.json"
    completed = subprocess.run(
        [sys.executable, str(ABLATIONS), "--smoke", "--seeds", "0", "--json", str(json_path),
         "--data-dir", str(tmp_path / "data")],
        capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    results = json.loads(json_path.read_text())
    variants = [name for name in results if not name.startswith("_")]
    assert "harma" in variants and "lora" in variants and len(variants) >= 10
    for name in variants:
        assert is_percent(results[name]["test_mean_recall"]) and is_percent(results[name]["val_mean_recall"])
    harma_params = results["harma"]["trainable_params"]
    assert results["harma_vision_only"]["trainable_params"] + results["harma_text_only"]["trainable_params"] \
        == harma_params + 1  # the temperature is counted in each
    for name in ("harma_causal_text", "harma_one_attention", "harma_3x_steps"):
        assert results[name]["trainable_params"] == harma_params
    assert results["harma_fixed_temperature"]["temperature"] == pytest.approx(0.07)
    assert results["harma"]["temperature"] != pytest.approx(0.07)
    assert results["harma_3x_steps"]["steps"] == 3 * results["harma"]["steps"]
    assert results["lora_vision_only"]["trainable_params"] + results["lora_text_only"]["trainable_params"] \
        == results["lora"]["trainable_params"] + 1
    # LoRA on the MLPs alone gets a higher rank, so its budget still matches HarMA's.
    assert results["_meta"]["lora_ranks"]["lora_mlp_only"] > results["_meta"]["lora_ranks"]["lora"]
    assert abs(results["lora_mlp_only"]["trainable_params"] - harma_params) < 0.15 * harma_params


def test_ablation_variants_alter_the_adapters_as_described() -> None:
    sys.path.insert(0, str(ABLATIONS.parent))
    try:
        ablations = importlib.import_module("transfer_ablations")
    finally:
        sys.path.remove(str(ABLATIONS.parent))
    transfer = ablations.transfer
    settings = transfer.MODES["smoke"]
    vocab = 40
    state = transfer.build_clip(settings, vocab).state_dict()

    def text_adapter_output(variant_name: str, text: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(0)
        model = ablations.build_variant(ablations.VARIANTS[variant_name], settings, state, vocab, lora_rank=1)
        for name, param in model.named_parameters():
            if "harma_adapter" in name and param.ndim:
                with torch.no_grad():
                    param.add_(0.3 * torch.randn_like(param))
        adapter = model.get_submodule("transformer.resblocks.0.harma_adapter")
        with torch.no_grad():
            return adapter(text)

    torch.manual_seed(1)
    text = torch.randn(1, 6, settings.text_width)
    later_changed = text.clone()
    later_changed[0, 5] += 3.0
    # Causal text adapters: the first tokens do not see a change at the last position.
    causal = text_adapter_output("harma_causal_text", text)
    assert torch.allclose(causal[0, :5], text_adapter_output("harma_causal_text", later_changed)[0, :5], atol=1e-6)
    reference = text_adapter_output("harma", text)
    assert not torch.allclose(reference[0, :5], text_adapter_output("harma", later_changed)[0, :5], atol=1e-4)
    assert not torch.allclose(text_adapter_output("harma_one_attention", text), reference, atol=1e-4)


# ------------------------------------------------------------------------------- forgetting


def run_smoke(tmp_path: Path, name: str, *extra: str) -> dict:
    json_path = tmp_path / f"{name}.json"
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--threads", "1", "--scenario", "known-vocabulary", "--methods",
         "frozen", "harma", "lora", "full", "--json", str(json_path), "--plot", "none", *extra],
        capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return json.loads(json_path.read_text())


@pytest.mark.slow
def test_forgetting_measures_change_no_target_figure_and_are_recorded(tmp_path: Path) -> None:
    plot_path = tmp_path / "forgetting.png"
    plain = run_smoke(tmp_path, "plain")
    watched = run_smoke(tmp_path, "watched", "--forgetting", "--forgetting-plot", str(plot_path))
    benchmark = load_benchmark()
    steps = benchmark.checkpoint_steps(watched["_meta"]["settings"]["adapt_steps"])
    assert steps == [0, 1, 2]
    for method in ("frozen", "harma", "lora", "full"):
        assert watched[method]["lr"] == plain[method]["lr"]
        for run, plain_run in zip(watched[method]["per_seed"], plain[method]["per_seed"], strict=True):
            # Measuring along the run changes nothing it trains or scores on the target domain.
            assert run["val"] == plain_run["val"] and run["test"] == plain_run["test"]
            assert run.get("final_loss") == plain_run.get("final_loss")
            assert is_percent(run["source_test"]["mean_recall"]) and is_percent(run["source_zero_shot"]["acc1"])
            assert is_percent(run["target_zero_shot"]["acc1"])
            if method == "frozen":
                continue
            trajectory = run["trajectory"]
            assert [point["step"] for point in trajectory] == steps
            last = trajectory[-1]  # the trained model, evaluated the same way as at the end
            assert last["target_val_mean_recall"] == run["val"]["mean_recall"]
            assert last["source_mean_recall"] == run["source_test"]["mean_recall"]
            assert last["source_acc1"] == run["source_zero_shot"]["acc1"]
            assert last["target_acc1"] == run["target_zero_shot"]["acc1"]
    analysis = watched["_meta"]["forgetting"]
    assert set(analysis["endpoints"]) == {"frozen", "harma", "lora", "full"}
    assert analysis["endpoints"]["frozen"]["source_acc1_forgotten"]["mean"] == 0.0
    assert set(analysis["matched"]) == set(analysis["endpoint_verdicts"]) == {"harma", "lora"}
    allowed = {"forgets less", "forgets more", "no consistent difference", "undecided (a seed failed)"}
    for method in ("harma", "lora"):
        for block in (analysis["matched"][method]["verdicts"], analysis["endpoint_verdicts"][method]):
            assert set(block) == {"source_acc1", "source_mean_recall"}
            assert all(entry["verdict"] in allowed for entry in block.values())
    assert "Forgetting (source domain" in (tmp_path / "watched.md").read_text()
    assert "forgetting" not in plain["_meta"]
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def trajectory(*points: tuple[float, float, float]) -> list[dict]:
    """(target val mR, source acc1, source mR) at steps 0, 1, 2, ..."""
    return [{"step": step, "target_val_mean_recall": gain, "source_acc1": acc1, "source_mean_recall": mr,
             "target_acc1": 0.0} for step, (gain, acc1, mr) in enumerate(points)]


def test_forgetting_is_read_where_the_target_gain_is_first_reached() -> None:
    benchmark = load_benchmark()
    run = trajectory((10.0, 60.0, 40.0), (14.0, 56.0, 38.0), (20.0, 50.0, 30.0), (18.0, 40.0, 20.0))
    assert benchmark.max_gain(run) == 10.0
    # Gain 7 lies between step 1 (gain 4, forgot 4) and step 2 (gain 10, forgot 10): halfway.
    assert benchmark.forgetting_at_gain(run, 7.0, "source_acc1") == pytest.approx(7.0)
    assert benchmark.forgetting_at_gain(run, 8.0, "source_mean_recall") == pytest.approx(2 + (4 / 6) * 8)
    # The first crossing counts, not a later checkpoint that forgot more.
    assert benchmark.forgetting_at_gain(run, 10.0, "source_acc1") == pytest.approx(10.0)
    with pytest.raises(ValueError, match="never reaches"):
        benchmark.forgetting_at_gain(run, 10.5, "source_acc1")


def test_each_method_is_compared_with_full_fine_tuning_at_their_common_gain() -> None:
    benchmark = load_benchmark()
    adapter = {"seed": 0, "trajectory": trajectory((10.0, 60.0, 40.0), (16.0, 59.0, 39.0))}
    full = {"seed": 0, "trajectory": trajectory((10.0, 60.0, 40.0), (13.0, 57.0, 37.0), (30.0, 45.0, 20.0))}
    row = benchmark.matched_comparison(adapter, full)
    assert row["level"] == 6.0  # the adapter's largest gain
    assert row["source_acc1"]["method"] == pytest.approx(1.0)
    # Gain 6 lies 3/17 of the way from step 1 (gain 3, forgot 3) to step 2 (gain 20, forgot 15).
    assert row["source_acc1"]["full"] == pytest.approx(3 + (3 / 17) * 12)
    assert row["source_acc1"]["difference"] < 0
    flat = {"seed": 1, "trajectory": trajectory((10.0, 60.0, 40.0), (9.0, 60.0, 40.0))}
    assert "failed" in benchmark.matched_comparison(flat, full)
    assert benchmark.matched_comparison({"seed": 2}, full)["failed"] == "no trajectory"
    assert benchmark.verdict([-1.0, -0.5, -2.0]) == "forgets less"
    assert benchmark.verdict([1.0, 0.5, 2.0]) == "forgets more"
    assert benchmark.verdict([-1.0, 0.0, -2.0]) == "no consistent difference"
    assert benchmark.verdict([-1.0, None, -2.0]) == "undecided (a seed failed)"
