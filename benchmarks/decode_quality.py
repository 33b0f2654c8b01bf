"""What bf16 and int8 decoding cost in quality, on a trained checkpoint and its held-out tokens.

* greedy agreement: ``--prompts`` prompts (held-out windows of ``--prompt_tokens`` tokens) are decoded greedily
  for ``--new_tokens`` tokens in fp32. Each reduced-precision engine then (a) reads fp32's sequences and
  predicts every continuation token (teacher-forced: the fraction of positions whose argmax equals fp32's
  token; one early difference cannot hide the rest) and (b) decodes on its own (free-running: the fraction
  of positions equal to fp32's, which counts everything after a first difference as lost).
* held-out loss: mean next-token loss over ``--loss_batches`` validation batches, relative to fp32.

Targets (issue 18): >= 99 % teacher-forced agreement, loss within 0.5 %. Prints ``RESULT`` lines per precision.

    .venv/bin/python benchmarks/decode_quality.py --ckpt=runs/speedrun/pretrain
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from chatforge.config import die, option, parse
from chatforge.data.shards import TokenWindows
from chatforge.errors import ChatforgeError
from chatforge.infer.engine import Engine
from chatforge.infer.params import SamplingParams
from chatforge.infer.precision import InferenceOptions
from chatforge.model.checkpoint import load_model

PRECISIONS = {"bf16": InferenceOptions("bf16", "none"), "int8": InferenceOptions("bf16", "int8"),
              "int8_fp32": InferenceOptions("fp32", "int8")}  # int8 matrices, the rest (and activations out) fp32


@dataclass
class Config:
    ckpt: str = option("runs/speedrun/pretrain", "trained checkpoint")
    tokens: str = option("runs/speedrun/tokenizer/tokens/val.bin", "held-out token shard")
    prompts: int = option(50, "greedy prompts")
    prompt_tokens: int = option(32, "tokens per prompt")
    new_tokens: int = option(64, "greedy tokens per prompt")
    loss_batches: int = option(8, "validation batches of 8 windows for the held-out loss")
    threads: int = option(1, "torch intra-op threads")


def held_out_loss(model, windows: TokenWindows, batches: int) -> float:
    losses = []
    with torch.inference_mode():
        for x, y in windows.eval_batches(batches, 8):
            logits = model(x)[0]
            losses.append(float(F.cross_entropy(logits.float().flatten(0, 1), y.flatten())))
    return sum(losses) / len(losses)


def teacher_forced_agreement(model, prompts: list[list[int]], continuations: list[list[int]]) -> float:
    same = total = 0
    with torch.inference_mode():
        for prompt, continuation in zip(prompts, continuations):
            ids = torch.tensor([prompt + continuation])
            predicted = model(ids)[0][0, len(prompt) - 1 : -1].argmax(-1)
            same += int((predicted == torch.tensor(continuation)).sum())
            total += len(continuation)
    return same / total


def main(argv: list[str]) -> None:
    cfg, _ = parse(Config, argv)
    torch.set_num_threads(cfg.threads)
    model, _ = load_model(cfg.ckpt)
    block = model.config.block_size
    windows = TokenWindows(cfg.tokens, block)
    starts = torch.linspace(0, windows.num_tokens - cfg.prompt_tokens - 1, cfg.prompts).long().tolist()
    prompts = [windows.tokens[s : s + cfg.prompt_tokens].astype("int64").tolist() for s in starts]
    params = SamplingParams(temperature=0.0, max_tokens=cfg.new_tokens, min_tokens=cfg.new_tokens, ignore_eos=True)
    engines = {"fp32": Engine(model, max_batch_size=16)}
    engines.update({name: Engine(model, max_batch_size=16, options=o) for name, o in PRECISIONS.items()})
    outputs = {name: [c.choices[0].token_ids for c in e.generate(prompts, params)] for name, e in engines.items()}
    losses = {name: held_out_loss(e.model, windows, cfg.loss_batches) for name, e in engines.items()}
    print(f"checkpoint {cfg.ckpt} ({model.config.arch}, {model.num_params() / 1e6:.1f}M parameters); "
          f"{cfg.prompts} held-out prompts x {cfg.new_tokens} greedy tokens; loss over "
          f"{cfg.loss_batches * 8} windows of {block} tokens; fp32 loss {losses['fp32']:.4f}")
    for name in PRECISIONS:
        forced = teacher_forced_agreement(engines[name].model, prompts, outputs["fp32"])
        pairs = [(a, b) for x, y in zip(outputs[name], outputs["fp32"]) for a, b in zip(x, y)]
        free = sum(a == b for a, b in pairs) / len(pairs)
        change = losses[name] / losses["fp32"] - 1
        verdict = "meets" if forced >= 0.99 and abs(change) <= 0.005 else "MISSES"
        print(f"{name:>9}: teacher-forced agreement {forced:.2%}, free-running {free:.2%}, held-out loss "
              f"{losses[name]:.4f} ({change:+.3%}) -> {verdict} the targets (>= 99 %, <= 0.5 %)")
        print(f"RESULT greedy_agreement_{name} {forced:.4f}")
        print(f"RESULT loss_change_{name} {change:.5f}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ChatforgeError as exc:
        die(str(exc))
