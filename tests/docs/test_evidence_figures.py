"""The overview of the evidence (docs/evidence.md) quotes the transfer benchmark's results; its
table must say what the result files say, so that a rerun of the benchmark cannot leave the
page behind."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
ROWS = {
    "known vocabulary, quick": ["transfer_results_known_vocab.json"],
    "known vocabulary, standard": ["transfer_results_known_vocab_standard.json"],
    "new vocabulary, quick": ["transfer_results.json"],
    "new vocabulary, standard": ["transfer_results_standard.json", "transfer_results_standard_plus.json"],
}
COLUMNS = ["frozen", "harma", "harma_paper", "harma_plus", "lora", "full"]


def quoted_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells and cells[0] in ROWS:
            rows[cells[0]] = cells[1:]
    return rows


def measured(files: list[str], method: str) -> tuple[float, float]:
    for name in files:
        results = json.loads((DOCS / name).read_text(encoding="utf-8"))
        if method in results:
            return results[method]["mean_recall"], results[method]["mean_recall_std"]
    raise AssertionError(f"no result of {method} in {files}")


def test_the_overview_table_quotes_the_result_files():
    rows = quoted_rows((DOCS / "evidence.md").read_text(encoding="utf-8"))
    assert set(rows) == set(ROWS), "a scenario row is missing from docs/evidence.md"
    for scenario, cells in rows.items():
        assert len(cells) == len(COLUMNS), scenario
        for method, cell in zip(COLUMNS, cells, strict=True):
            numbers = [float(x) for x in re.findall(r"\d+\.\d", cell)]
            mean, std = measured(ROWS[scenario], method)
            expected = [round(mean, 1)] if method == "frozen" else [round(mean, 1), round(std, 1)]
            assert numbers == expected, f"{scenario}, {method}: the page says {cell!r}, the results {expected}"


def test_the_parser_reads_a_row():
    rows = quoted_rows("| new vocabulary, quick | 10.7 | **19.8** ± 0.8 |")
    assert rows == {"new vocabulary, quick": ["10.7", "**19.8** ± 0.8"]}


FORGETTING_ROWS = {"HarMA (reference)": "harma", "HarMA plus": "harma_plus", "LoRA": "lora",
                   "full fine-tuning": "full"}
FORGETTING_COLUMNS = ["target_gain", "source_acc1", "source_acc1_forgotten", "source_mean_recall_forgotten"]


def test_the_forgetting_table_quotes_the_result_file():
    text = (DOCS / "evidence.md").read_text(encoding="utf-8")
    section = text.split("## What adaptation forgets", 1)[1].split("\n## ", 1)[0]
    endpoints = json.loads((DOCS / "transfer_forgetting_known_vocab.json").read_text(encoding="utf-8"))
    endpoints = endpoints["_meta"]["forgetting"]["endpoints"]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells[0] in FORGETTING_ROWS:
            rows[FORGETTING_ROWS[cells[0]]] = cells[1:]
    assert set(rows) == set(FORGETTING_ROWS.values()), "a method row is missing from the forgetting table"
    for method, cells in rows.items():
        for column, cell in zip(FORGETTING_COLUMNS, cells, strict=True):
            numbers = [float(x) for x in re.findall(r"\d+\.\d", cell)]
            expected = [round(endpoints[method][column]["mean"], 1), round(endpoints[method][column]["std"], 1)]
            assert numbers == expected, f"{method}, {column}: the page says {cell!r}, the results {expected}"
    frozen = endpoints["frozen"]
    assert f"source top-1 {frozen['source_acc1']['mean']:.1f}" in section
    assert f"source mR {frozen['source_mean_recall']['mean']:.1f}" in section
