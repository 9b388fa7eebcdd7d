"""benchmarks/classification_eval.py at a tiny size: the loop and the metrics agree, including on
sets that miss a class, and the script reports a speed-up."""

from __future__ import annotations

import sys

import torch
from repo_scripts import load_repo_script

import harma


def test_the_benchmark_loop_is_an_independent_reference_and_the_script_runs(monkeypatch, capsys):
    script = load_repo_script("benchmarks/classification_eval.py")
    scores, labels = script.make_scores(300, 12, seed=1)
    labels[labels == 3] = 4  # a class without images
    assert harma.classification_metrics(scores, labels) == script.per_sample_loop(scores.numpy(), labels.numpy())
    monkeypatch.setattr(sys, "argv", ["classification_eval.py", "--images", "200", "--classes", "7",
                                      "--repeats", "2", "--loop-repeats", "1", "--threads", str(torch.get_num_threads())])
    script.main()
    out = capsys.readouterr().out
    assert "metrics identical" in out and "speed-up:" in out
