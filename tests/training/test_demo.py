"""The CPU demo (harma.training.demo): its run on tiny sizes and its command line."""

from __future__ import annotations

import pytest

from harma.training import demo, parse_args
from harma.training.demo import run_demo


def test_quick_demo_runs_and_reloads_its_adapters(tmp_path, capsys):
    result = run_demo(tmp_path / "demo", quick=True)
    assert result["reload_matches"] is True
    output = capsys.readouterr().out
    assert "PRE-TRAINING" in output and "frozen backbone (before)" in output and "HarMA adapters (after)" in output
    # Zero-shot classification of both domains, before (the frozen backbone, epoch 0) and after
    # (the best epoch), as the adapter run logged them.
    assert "Zero-shot scene classification" in output and "source domain (what adaptation may forget)" in output
    logged = result["adapt"]["zero_shot"]
    assert set(result["zero_shot"]) == {"source", "target"}
    for domain in ("source", "target"):
        entry = next(value for root, value in logged.items() if root.endswith(f"{domain}_classes"))
        assert result["zero_shot"][domain] == {"before": entry["before"], "after": entry["best"]}
        assert set(entry["before"]) == {"acc1", "acc5", "mean_per_class_recall"}
    # The demo folder is its own: running again replaces it; a foreign folder is refused.
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "file").write_text("x")
    with pytest.raises(FileExistsError):
        run_demo(tmp_path / "foreign", quick=True)


def test_the_demo_command_line_uses_its_folder(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(demo, "run_demo", lambda output_dir, quick: calls.append((str(output_dir), quick)) or {})
    demo.main([])
    demo.main(["--output_dir", str(tmp_path / "mine"), "--quick"])
    assert calls == [("runs/demo", False), (str(tmp_path / "mine"), True)]


def test_the_training_command_line_has_no_demo_flag():
    with pytest.raises(SystemExit):
        parse_args(["--demo"])
