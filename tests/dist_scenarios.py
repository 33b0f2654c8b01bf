"""Training scenarios run once as one process and once under ``torchrun --nproc_per_node=2`` (gloo, CPU) by
``tests/test_distributed_stages.py``, which compares what they leave in ``out_dir``.

    python tests/dist_scenarios.py SCENARIO OUT_DIR [key=value ...]

Each scenario trains a tiny model through the shared loop with a stage's real task (or its real loss code) on
a fixed global batch; its final checkpoint holds the parameters. ``resume=true`` continues the run's latest
checkpoint (as ``--resume``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_helpers import BLOCK, VOCAB, CountingTask, fast_config, tiny_gpt  # noqa: E402

from chatforge.data.chat_batches import ChatBatches  # noqa: E402
from chatforge.embed.model import EmbeddingModel, grad_cache_step  # noqa: E402
from chatforge.train import distributed  # noqa: E402
from chatforge.train.loop import train  # noqa: E402
from chatforge.train.ppo import PPO, train_ppo  # noqa: E402
from chatforge.train.sft import SFTTask  # noqa: E402


def _conversations(count: int) -> list[tuple[list[int], list[int]]]:
    """(ids, loss mask) rows of different lengths and assistant shares, so token weighting matters."""
    g = torch.Generator().manual_seed(7)
    rows = []
    for i in range(count):
        n = 6 + int(torch.randint(0, BLOCK - 5, (1,), generator=g))
        ids = torch.randint(1, VOCAB, (n,), generator=g).tolist()
        answer = 1 + i % (n - 2)
        rows.append((ids, [0] * (n - answer) + [1] * answer))
    return rows


class ContrastiveIdsTask:
    """The embed stage's training step (``grad_cache_step`` through the wrapped model) on random token rows."""

    def __init__(self, batch_size: int, chunk: int):
        self.batch_size, self.chunk = batch_size, chunk

    def _rows(self, step: int, seed: int, part: int, parts: int):
        g = torch.Generator().manual_seed(seed * 1000 + step)
        lengths = torch.randint(3, BLOCK, (self.batch_size,), generator=g)
        ids = torch.randint(1, VOCAB, (self.batch_size, BLOCK), generator=g)
        per = self.batch_size // parts
        ids, lengths = ids[part * per : (part + 1) * per], lengths[part * per : (part + 1) * per]
        return [(ids[i : i + self.chunk], lengths[i : i + self.chunk]) for i in range(0, per, self.chunk)]

    def batch(self, step, part, parts, device):
        return self._rows(step, 1, part, parts), self._rows(step, 2, part, parts)

    def backward(self, model, batch, micro):
        queries, documents = batch
        loss = grad_cache_step(model, queries, documents, loss_weight=micro.scale, sync_context=micro.no_sync)
        return {"loss": loss}


def scenario(name: str, world_size: int):
    """(model, task, config overrides) of scenario ``name``; the global batch is the same at any world size."""
    if name == "pretrain_muon":
        # lr 0.005, not 0.02: at 0.02 (value embeddings' AdamW rate 15x that) four steps of this tiny model amplify
        # the ~1e-7 rounding of summing micro-batches in another order into 1e-3-1e-2 weight gaps, so the check
        # measured the luck of the rounding rather than whether DDP/FSDP take the same steps
        return tiny_gpt(arch="modern"), CountingTask(8), dict(optimizer="muon", lr=0.005, micro_batch_size=2)
    if name == "sft":
        rows = _conversations(24)
        task = SFTTask(ChatBatches(rows, 0, 8, seed=3), ChatBatches(rows[:6], 0, 1), 4)
        return tiny_gpt(), task, dict(micro_batch_size=2)
    if name == "ppo":  # 16 prompts per rollout sampled 8 per rank, minibatches of 8 split 4 + 4
        from test_ppo import FAST, make_ppo

        from chatforge.stages.ppo import Config
        from chatforge.tokenizer import Tokenizer
        from chatforge.train.ppo import KLConfig

        tok = Tokenizer.train(["hello there, general kenobi"] * 5, vocab_size=280)
        fast = {k: v for k, v in FAST.items() if k not in ("warmup_steps", "eval_every", "ckpt_every")}
        cfg = Config(rollout_prompts=16, epochs=1, max_tokens=8, ptx_coef=0.0, kl=KLConfig(beta=0.02, target=4.0),
                     train=fast_config(batch_size=8, lr=3e-2, min_lr=3e-2, **fast))
        ppo = make_ppo(tok, cfg)
        return ppo.policy, ppo, dict(batch_size=8, lr=3e-2, min_lr=3e-2, schedule="constant", weight_decay=0.0)
    if name == "reward":  # rankings (3 answers each) and signal rewards mixed, 8 of each per step
        from chatforge.model.heads import ScalarHeadModel
        from chatforge.train.reward import MixedRewardTask, RewardTask, SignalRewardTask

        rankings = RewardTask(_rankings(24, 1), _rankings(5, 2), 8, 0, 0, "pairwise")
        signals = SignalRewardTask(_signals(24), _signals(5), 8, 0, 0)
        # arch=modern: its untied output layer, which a reward model never uses, must not stall DDP
        model = ScalarHeadModel(tiny_gpt(arch="modern"))
        return model, MixedRewardTask(rankings, signals, 0.5), dict(micro_batch_size=2)
    if name == "embed":  # one micro-batch per process: each contrastive batch is the whole global batch
        return EmbeddingModel(tiny_gpt(arch="modern"), proj_dim=8), ContrastiveIdsTask(8, 2), dict(lr=1e-3)
    raise SystemExit(f"unknown scenario {name}")


def _rankings(count: int, seed: int) -> list[tuple[list[list[int]], list[int]]]:
    """Reward-model items: 3 answers of different lengths per prompt, ranked in tiers."""
    g = torch.Generator().manual_seed(seed)
    rows = lambda: [torch.randint(1, VOCAB, (3 + int(torch.randint(0, BLOCK - 3, (1,), generator=g)),),  # noqa: E731
                                  generator=g).tolist() for _ in range(3)]
    return [(rows(), [[0], [1, 2]] if i % 2 else [[2], [0], [1]]) for i in range(count)]


def _signals(count: int) -> list[tuple[list[int], float]]:
    g = torch.Generator().manual_seed(11)
    return [(torch.randint(1, VOCAB, (4 + i % 9,), generator=g).tolist(), (-1.0, 0.0, 0.5, 1.0)[i % 4])
            for i in range(count)]


def evaluations(out_dir: Path, parallel: str) -> dict[str, float]:
    """Every stage task's held-out figures on fixed tiny models: pretrain's windows (5 batches), SFT's
    conversations (7 in batches of 2), the reward model's rankings (21, in chunks of 8) and signal rewards (19),
    embed's pairs (11 in chunks of 2). The counts are odd so that the ranks' shares are uneven; with
    ``parallel=fsdp`` the models are sharded first (every rank must run the same number of forward passes)."""
    from chatforge.data.shards import TokenWindows, write_shard
    from chatforge.embed.data import Pair
    from chatforge.embed.model import EmbedSpec
    from chatforge.model.heads import ScalarHeadModel
    from chatforge.tokenizer import Tokenizer
    from chatforge.train.embedding import ContrastiveTask
    from chatforge.train.pretrain import PretrainTask
    from chatforge.train.reward import RewardTask, SignalRewardTask

    ranks = distributed.init("cpu")
    if ranks.is_main:
        write_shard(out_dir / "tokens" / "val.bin", [np.arange(400) % VOCAB], VOCAB)
    ranks.barrier()
    windows = TokenWindows(out_dir / "tokens" / "val.bin", BLOCK, 0)
    rows = _conversations(7)
    tok = Tokenizer.train(["hello there, general kenobi"] * 5, vocab_size=280)
    pairs = [Pair(f"{i} hi {i}", f"{i}{i} there", "chat") for i in range(11)]  # short: within BLOCK tokens
    spec = EmbedSpec(kind="similarity", max_tokens=BLOCK)
    cases = {
        "pretrain": (tiny_gpt(), PretrainTask(windows, windows, 8, 5, 2)),
        "sft": (tiny_gpt(), SFTTask(ChatBatches(rows, 0, 1), ChatBatches(rows, 0, 1), 2)),
        "reward": (ScalarHeadModel(tiny_gpt()), RewardTask(_rankings(8, 1), _rankings(21, 2), 8, 0, 0, "pairwise")),
        "signals": (ScalarHeadModel(tiny_gpt()), SignalRewardTask(_signals(8), _signals(19), 8, 0, 0)),
        "embed": (EmbeddingModel(tiny_gpt(vocab_size=288)), ContrastiveTask(None, pairs, tok, spec, BLOCK, 2)),
    }
    figures = {}
    for name, (model, task) in cases.items():
        torch.manual_seed(5)
        with torch.no_grad():  # zero-initialised projections and heads would make every score and embedding equal
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.2)
        if parallel == "fsdp" and ranks.enabled:
            distributed.shard_model(model, None, False)
        with torch.no_grad():
            out = task.eval_loss(model.eval(), "cpu")
        for key, value in (out.items() if isinstance(out, dict) else [("loss", out)]):
            figures[f"{name}_{key}"] = float(value)
    return figures


def main(argv: list[str]) -> None:
    name, out_dir = argv[0], Path(argv[1])
    overrides = {key: json.loads(value) for key, value in (item.split("=", 1) for item in argv[2:])}
    ranks = distributed.init("cpu")
    if name == "evals":
        figures = evaluations(out_dir, overrides.get("parallel", "ddp"))
        if ranks.is_main:
            (out_dir / "evals.json").write_text(json.dumps(figures))
    else:
        model, task, options = scenario(name, ranks.world_size)
        options.update(overrides)
        resume = options.pop("resume", False)
        config = fast_config(**{"steps": 3, "warmup_steps": 1, **options})
        if isinstance(task, PPO):  # PPO runs its own loop over the shared loop's pieces, as its config's train says
            task.cfg.train = config
            train_ppo(task, out_dir, resume=resume)
        else:
            train(model, task, config, out_dir, resume=resume)
        del model, task
    distributed.finish()


if __name__ == "__main__":
    main(sys.argv[1:])
