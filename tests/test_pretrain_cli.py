"""`chatforge pretrain` end to end on a tiny tokenizer and shards made here; its errors; a real kill and resume."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_helpers import losses, make_corpus, tiny_pretrain_args

from chatforge.cli import main
from chatforge.data.shards import TokenWindows
from chatforge.model.checkpoint import latest_checkpoint, load_model, tokenizer_path
from chatforge.model.hf import export_hf_gpt2
from chatforge.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def test_pretrain_end_to_end(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    main(["pretrain", *tiny_pretrain_args(corpus, out)])
    printed = capsys.readouterr().out
    assert "2 layers, 2 heads, 32 dims, context 32" in printed and "M parameters" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stage"] == "pretrain" and summary["steps"] == 8 and summary["tokens_seen"] == 8 * 8 * 32
    first_val = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first_val["step"] == 0 and summary["final_val_loss"] < first_val["val_loss"] - 0.3
    assert (out / "loss.png").is_file() and (out / "metrics.jsonl").is_file()
    model, info = load_model(out)
    assert info["step"] == 8 and model.config.vocab_size == Tokenizer.load(corpus).vocab_size
    assert tokenizer_path(out).read_text() == (corpus / "tokenizer.json").read_text()
    # the run is complete; resuming it again changes nothing but rewrites the same summary
    main(["pretrain", *tiny_pretrain_args(corpus, out), "--resume"])
    assert json.loads((out / "summary.json").read_text())["steps"] == 8


def test_max_minutes_stops_cleanly_with_a_checkpoint(corpus, tmp_path):
    out = tmp_path / "run"
    main(["pretrain", *tiny_pretrain_args(corpus, out, train__steps=1000, train__max_minutes=0.0001)])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by"] == "max_minutes" and 1 <= summary["steps"] < 1000
    assert latest_checkpoint(out).name == f"step_{summary['steps']:08d}"


def test_init_from_a_hugging_face_folder_starts_from_its_weights(corpus, tmp_path):
    from chatforge.model.gpt import GPT, GPTConfig

    torch.manual_seed(5)
    start = GPT(
        GPTConfig(vocab_size=Tokenizer.load(corpus).vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16)
    ).eval()
    export_hf_gpt2(start, tmp_path / "hf")
    main(["pretrain", *tiny_pretrain_args(corpus, tmp_path / "run", train__steps=2), f"--init_from={tmp_path / 'hf'}"])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    windows = TokenWindows(corpus / "tokens" / "val.bin", 32)
    with torch.no_grad():
        expected = sum(float(start(x, y)[1]) for x, y in windows.eval_batches(2, 8)) / 2
    assert rows[0]["step"] == 0 and rows[0]["val_loss"] == pytest.approx(expected, abs=1e-5)
    assert load_model(tmp_path / "run")[0].config.n_layer == 1


def test_gpt2_weights_stay_gpt2_and_modern_models_do_not_export_to_gpt2(corpus, tmp_path):
    from chatforge.errors import ChatforgeError
    from chatforge.model.gpt import GPT, GPTConfig

    export_hf_gpt2(GPT(GPTConfig(vocab_size=Tokenizer.load(corpus).vocab_size, block_size=32, n_layer=1, n_head=2,
                                 n_embd=16)), tmp_path / "hf")
    with pytest.raises(SystemExit):
        main(["pretrain", *tiny_pretrain_args(corpus, tmp_path / "run"), f"--init_from={tmp_path / 'hf'}",
              "--model.arch=modern"])
    with pytest.raises(ChatforgeError, match="arch=gpt2"):
        export_hf_gpt2(GPT(GPTConfig(arch="modern", n_layer=1, n_head=2, n_embd=16)), tmp_path / "out")


def test_depth_dial_and_time_budget_choose_the_shape(corpus, tmp_path, monkeypatch):
    from chatforge.train import pretrain

    assert pretrain.depth_shape(4) == {"n_layer": 4, "n_embd": 128, "n_head": 2, "block_size": 256}
    assert pretrain.depth_shape(5)["n_embd"] == 192
    # the budget rule on a machine of fixed speed: more time buys a deeper model, and the chosen depth is the
    # deepest whose expected tokens reach TOKENS_PER_PARAM per non-embedding parameter
    monkeypatch.setattr(pretrain, "matmul_peak", lambda device: 1e12)
    model = pretrain.ModelConfig()
    depths = [pretrain.pick_depth(minutes, 8192, "cpu", model)[0] for minutes in (2, 7, 30, 120)]
    assert depths == sorted(depths) and depths[0] < depths[-1]
    depth, tokens = pretrain.pick_depth(7, 8192, "cpu", model)
    assert tokens >= pretrain.TOKENS_PER_PARAM * pretrain.non_embedding_params(model.build(8192, depth))
    # a budget-chosen model is recorded, and a resumed run keeps its shape whatever the machine measures now
    out = tmp_path / "run"
    args = [a for a in tiny_pretrain_args(corpus, out, train__steps=2, train__ckpt_every=1)
            if not a.startswith(("--model.n_layer", "--model.n_head", "--model.n_embd"))]
    main(["pretrain", *args, "--budget_minutes=0.2"])
    first = load_model(out)[0].config
    assert first.arch == "modern" and first.n_embd == pretrain.depth_shape(first.n_layer)["n_embd"]
    monkeypatch.setattr(pretrain, "matmul_peak", lambda device: 1e15)
    main(["pretrain", *args, "--budget_minutes=0.2", "--train.steps=3", "--resume"])
    assert load_model(out)[0].config == first


def _empty_train_shard(corpus: Path, root: Path) -> Path:
    import shutil

    copy = root / "empty"
    shutil.copytree(corpus, copy)
    meta = json.loads((copy / "tokens" / "meta.json").read_text())
    meta["splits"]["train"]["tokens"] = 0
    (copy / "tokens" / "meta.json").write_text(json.dumps(meta))
    (copy / "tokens" / "train.bin").write_bytes(b"")
    return copy


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "tokenizer directory not found"),
        ("empty", "train.bin has 0 tokens"),
        ("typo", "unknown option 'train.stepz'"),
        ("preset", "option 'model.preset' must be one of"),
        ("incompatible", "incompatible with this model: it has n_embd=32 but this run has n_embd=48"),
        ("exists", "already holds checkpoints"),
    ],
)
def test_bad_input_is_one_clear_error_and_overwrites_nothing(corpus, tmp_path, capsys, case, message):
    out = tmp_path / "run"
    if case in ("incompatible", "exists"):
        main(["pretrain", *tiny_pretrain_args(corpus, out, train__steps=2)])
    args = {
        "missing": tiny_pretrain_args(tmp_path / "nowhere", out),
        "empty": tiny_pretrain_args(_empty_train_shard(corpus, tmp_path), out) if case == "empty" else [],
        "typo": [*tiny_pretrain_args(corpus, out), "--train.stepz=3"],
        "preset": [*tiny_pretrain_args(corpus, out), "--model.preset=huge"],
        "incompatible": [*tiny_pretrain_args(corpus, out, model__n_embd=48), "--resume"],
        "exists": tiny_pretrain_args(corpus, out),
    }[case]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_killed_run_resumes_exactly(corpus, tmp_path):
    """SIGKILL a real `chatforge pretrain` process after its step-10 checkpoint; --resume redoes steps 11-20 exactly."""

    def args(out):
        # a wider model makes each step take long enough to kill the run between its checkpoints
        return tiny_pretrain_args(
            corpus,
            out,
            train__steps=20,
            train__ckpt_every=10,
            train__eval_every=10,
            train__batch_size=16,
            model__n_embd=64,
        )

    main(["pretrain", *args(tmp_path / "straight")])
    out = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "chatforge.cli", "pretrain", *args(out)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while latest_checkpoint(out) is None and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert latest_checkpoint(out).name == "step_00000010" and not (out / "summary.json").exists()
    main(["pretrain", *args(out), "--resume"])
    straight, resumed = losses(tmp_path / "straight"), losses(out)
    assert [resumed[s] for s in range(11, 21)] == [straight[s] for s in range(11, 21)]


@pytest.mark.slow
def test_the_fast_path_compiles_and_learns(corpus, tmp_path):
    """bf16 autocast + torch.compile, where this machine supports them (the speedrun's default path)."""
    from chatforge.device import compile_supported

    if not compile_supported("cpu"):
        pytest.skip("no C++ compiler for torch.compile here")
    out = tmp_path / "run"
    main(
        [
            "pretrain",
            *tiny_pretrain_args(
                corpus, out, train__steps=12, train__compile="true", train__dtype="bf16", train__lr=1e-2
            ),
        ]
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["compiled"] and summary["dtype"] == "bf16"
    curve = losses(out)
    assert curve[12] < curve[1] - 0.5
