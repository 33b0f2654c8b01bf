"""The report card is rebuilt from what the stages left on disk: every section they wrote, plots linked."""

from __future__ import annotations

import json

from chatforge.report import write_report


def test_report_has_a_section_per_stage_output(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.json").write_text(json.dumps({
        "sources": {"sharegpt": {"read": 10, "kept": 8, "chars": 1000}},
        "filters": {"exact_duplicate": 2}, "splits": {"train": {"documents": 7, "chars": 900}}}))
    (tmp_path / "pretrain").mkdir()
    (tmp_path / "pretrain" / "summary.json").write_text(json.dumps({"final_val_loss": 3.25, "tokens_seen": 123456,
                                                                     "model": {"n_layer": 4}}))
    (tmp_path / "pretrain" / "loss.png").write_bytes(b"\x89PNG")
    (tmp_path / "samples.json").write_text(json.dumps([{"model": "sft", "prompt": "Hi?", "completion": "Hello!"}]))
    text = write_report(tmp_path, timings={"data": 30.0, "pretrain": 570.0}).read_text()
    assert "## Corpus" in text and "| sharegpt | 1,000 | 8 | 10 |" in text
    assert "| exact_duplicate | 2 |" in text
    assert "## Pretraining" in text and "| final_val_loss | 3.25 |" in text and "| tokens_seen | 123,456 |" in text
    assert "![loss](pretrain/loss.png)" in text
    assert "### sft" in text and "Hello!" in text
    assert "| total (min) | 10 |" in text
    assert "Reward model" not in text  # stages that did not run leave no empty section
