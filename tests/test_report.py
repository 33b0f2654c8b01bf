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


def test_rlhf_section_shows_ppo_against_best_of_n_and_win_rates_with_intervals(tmp_path):
    (tmp_path / "ppo").mkdir()
    (tmp_path / "ppo" / "summary.json").write_text(json.dumps({"steps": 240, "final_kl": 1.5}))
    (tmp_path / "ppo" / "ppo.png").write_bytes(b"\x89PNG")
    (tmp_path / "eval" / "rlhf").mkdir(parents=True)
    (tmp_path / "eval" / "rlhf" / "rlhf.png").write_bytes(b"\x89PNG")

    def interval(mean):
        return {"mean": mean, "low": mean - 0.1, "high": mean + 0.1, "prompts": 200}

    def rate(value):
        return {"rate": value, "low": value - 0.07, "high": value + 0.07, "prompts": 200}

    model = {"gold_reward": interval(0.2), "proxy_reward": interval(0.5), "similarity": 0.31}
    (tmp_path / "eval" / "rlhf" / "summary.json").write_text(json.dumps({
        "prompts": 200, "sampling": "temperature 1", "intervals": "normal", "max_tokens": 64,
        "unfinished_penalty": 1.0, "gold_reward_difference": interval(0.3), "best_of_n_gold_at_policy_kl": 0.25,
        "policy_minus_best_of_n_gold": -0.05, "policy": {**model, "kl": interval(1.2)}, "sft": model,
        "best_of_n": [{"n": 1, "kl": 0.0, "proxy_reward": 0.5, "gold_reward": 0.2},
                      {"n": 4, "kl": 0.6363, "proxy_reward": 0.9, "gold_reward": 0.3}],
        "win_rate_gold": rate(0.61), "win_rate_minilm": rate(0.55), "win_rate_proxy": rate(0.8)}))
    text = write_report(tmp_path).read_text()
    assert "## RLHF" in text and "| steps | 240 |" in text
    assert "![ppo](ppo/ppo.png)" in text and "![rlhf](eval/rlhf/rlhf.png)" in text
    assert "| best-of-4 from SFT | 0.6363 | 0.9 | 0.3 |  |" in text
    assert "| PPO | 1.2 [1.1, 1.3] on 200 prompts |" in text
    assert "| gold reward model | 0.61 | 0.54 | 0.68 | 200 |" in text
    assert "| gold reward, PPO − SFT (paired) | 0.3 [0.2, 0.4] on 200 prompts |" in text
