"""`chatforge speedrun` end to end on tiny data and tiny models: every stage, the report card, skipping on rerun."""

from __future__ import annotations

import json

import pytest

from chatforge.cli import main

TOPICS = ["cooking pasta", "planting tomatoes", "fixing a bike", "learning Python", "baking bread", "painting walls",
          "writing letters", "running daily", "reading books", "saving money"]


def sharegpt_json(path, n: int = 90) -> None:
    records = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        records.append(
            {
                "id": f"conv{i}_0",
                "conversations": [
                    {
                        "from": "human",
                        "value": f"Conversation {i}: what is your best advice about {topic} for a beginner?",
                    },
                    {
                        "from": "gpt",
                        "value": f"For {topic}, start small, practise every day and keep notes of try number {i}.",
                    },
                ],
            }
        )
    path.write_text(json.dumps(records))


TINY = [
    "--data.stdlib=false",
    "--data.debian=false",
    "--data.holdout_fraction=0.6",
    "--data.min_chars=16",
    "--data.val_fraction=0.2",
    "--tokenizer.vocab_size=300",
    "--pretrain.model.n_layer=1",
    "--pretrain.model.n_head=2",
    "--pretrain.model.n_embd=32",
    "--pretrain.model.block_size=256",
    "--pretrain.train.steps=8",
    "--pretrain.train.batch_size=4",
    "--pretrain.eval_batches=1",
    "--sft_data.rl_fraction=0.45",
    "--sft_data.val_fraction=0.1",
    "--sft_data.prefix_chars=200",
    "--sft.train.steps=6",
    "--sft.train.batch_size=4",
    "--rankings.samples_per_prompt=1",
    "--rankings.max_tokens=8",
    "--rankings.val_fraction=0.3",
    "--rankings.held_out_prompts=4",
    "--reward.train.steps=3",
    "--reward.train.batch_size=2",
    "--reward_gold.train.steps=3",
    "--reward_gold.train.batch_size=2",
    "--ppo.train.steps=2",
    "--ppo.train.batch_size=4",
    "--ppo.rollout_prompts=4",
    "--ppo.epochs=1",
    "--ppo.max_tokens=6",
    "--ppo.held_out_prompts=4",
    "--rlhf_eval.rlhf.best_of=1,2",
    "--sample_tokens=6",
    "--code.max_files=8",
    "--code.val_fraction=0.3",
    "--code.train.steps=2",
    "--code.train.batch_size=2",
    "--code.eval_batches=1",
    "--humaneval.limit=2",
    "--humaneval.n=1",
    "--humaneval.ks=1",
    "--humaneval.max_tokens=8",
    "--embed.train.steps=2",
    "--embed.train.batch_size=4",
    "--embed.max_documents=20",
    "--embed.val_pairs=4",
    "--embed.pairs.wordnet_pairs=0",
    "--embed.minilm=false",
    "--fim.train.steps=2",
    "--fim.train.batch_size=4",
    "--fim.eval_batches=1",
    "--fim.eval_examples=4",
    "--fim_baseline.train.steps=2",
    "--fim_baseline.train.batch_size=4",
    "--fim_baseline.eval_batches=1",
    "--fim_baseline.eval_examples=4",
    "--edit_data.max_chars=100",
    "--edit.train.steps=2",
    "--edit.train.batch_size=2",
    "--icl.icl.items=16",
    "--icl.icl.pool=4",
    "--icl.icl.shots=0,1",
    "--icl.icl.tasks=copy,snippet_kind",
    "--cot.cot.items=2",
    "--cot.cot.shots=1",
    "--ape.items=24",
    "--ape.held_out=4",
    "--ape.forward=2",
    "--ape.reverse=2",
    "--ape.subset=4",
    "--ape.rounds=1",
    "--ape.mc_rounds=0",
    "--tool_data.arithmetic=20",
    "--tool_data.definitions=5",
    "--tool_data.eval_questions=2",
    "--tools.train.steps=2",
    "--tools.train.batch_size=4",
    "--tools_eval.tools.limit=2",
]
FAST = [
    f"--{stage}.train.{key}"
    for stage in ("pretrain", "sft", "reward", "reward_gold", "ppo", "code", "embed", "fim", "fim_baseline", "edit",
                  "tools")
    for key in ("dtype=fp32", "compile=false", "progress=false", "max_minutes=0", "device=cpu")
]


@pytest.mark.slow
def test_speedrun_runs_every_stage_then_skips_them(tmp_path, capsys):
    sharegpt_json(tmp_path / "sharegpt.json")
    args = [
        "speedrun",
        f"--run_dir={tmp_path / 'run'}",
        f"--data.sharegpt_file={tmp_path / 'sharegpt.json'}",
        *TINY,
        *FAST,
    ]
    main(args)
    run = tmp_path / "run"
    report = (run / "report.md").read_text()
    for title in (
        "Corpus",
        "Tokenizer",
        "Pretraining",
        "SFT data",
        "Supervised fine-tuning",
        "Ranking data",
        "Reward model",
        "RLHF",
        "Code model",
        "HumanEval",
        "Insert (fill-in-the-middle)",
        "Edit data",
        "Edit (instruction-driven rewrites)",
        "In-context learning",
        "Chain-of-thought",
        "Automatic Prompt Engineer",
        "SFT with tool-use conversations",
        "Tool use",
        "Embeddings (contrastive pre-training)",
        "Embeddings: held-out",
        "Samples",
        "Wall time per stage",
    ):
        assert f"## {title}" in report, title
    samples = json.loads((run / "samples.json").read_text())
    assert {s["model"] for s in samples} == {"pretrained", "code", "sft", "ppo"}
    assert "chatforge chat --ckpt=" in capsys.readouterr().out
    main(args)
    out = capsys.readouterr().out
    assert out.count("up to date, skipped") == 24
    # a changed option reruns that stage and the stages that read its outputs, nothing else
    main(args[: -len(FAST)] + FAST + ["--reward.train.steps=4"])
    out = capsys.readouterr().out
    assert "reward ..." in out and "ppo ..." in out and "rlhf-eval ..." in out and "samples ..." in out
    assert all(
        f"{name}: up to date" in out
        for name in ("pretrain", "sft", "rankings", "reward-gold", "code", "humaneval", "embed", "fim", "edit")
    )


@pytest.mark.slow
def test_speedrun_under_torchrun_writes_each_output_once_and_trains_as_one_process(tmp_path):
    """Two gloo processes: the data and tokenizer steps (and every other non-training step) run on rank 0 alone,
    so the corpus and the token shards are written once; the training steps run on both ranks. Pretraining then
    matches one process rerunning it on the same shards: same global batch of 4 (2 per rank), Muon, whose bf16
    orthogonalisation turns last-bit differences into bf16 steps of about the learning rate; the 8 steps here are
    all warm-up at small rates (measured: losses 1e-6 apart), hence 1e-3."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from train_helpers import losses

    root = Path(__file__).resolve().parents[1]
    sharegpt_json(tmp_path / "sharegpt.json")
    options = [f"--data.sharegpt_file={tmp_path / 'sharegpt.json'}", *TINY, *FAST]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(root)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "chatforge.cli", "speedrun", f"--run_dir={tmp_path / 'run'}", *options]
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = done.stdout
    assert printed.count("[data] corpus written to") == 1  # rank 0's data step only
    assert printed.count("tokenizer: train:") == 1  # the train shard encoded and written once
    assert printed.count("[speedrun] tokenizer ...") == 2  # while both ranks went through the step list
    run = tmp_path / "run"
    assert "## Samples" in (run / "report.md").read_text()
    summary = json.loads((run / "pretrain" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["parallel"] == "ddp"
    for stage in ("sft", "reward", "ppo", "code", "fim", "edit", "tools", "embed"):
        assert json.loads((run / stage / "summary.json").read_text())["world_size"] == 2, stage
    single = tmp_path / "single"
    shutil.copytree(run, single, ignore=shutil.ignore_patterns("pretrain"))
    main(["speedrun", f"--run_dir={single}", "--only=pretrain", *options])
    parallel_losses, single_losses = losses(run / "pretrain"), losses(single / "pretrain")
    print("pretrain losses, 2 processes:", parallel_losses, "1 process:", single_losses)
    assert parallel_losses.keys() == single_losses.keys() == set(range(1, 9))
    assert list(parallel_losses.values()) == pytest.approx(list(single_losses.values()), abs=1e-3)
