"""Peak memory per rank of DDP vs FSDP2 on a GPT of >= 100M parameters: two gloo processes on the CPU, two
optimizer steps of Muon + AdamW (the pretraining default) through the shared loop.

    torchrun --standalone --nproc_per_node=2 benchmarks/fsdp_memory.py ddp  OUT_DIR
    torchrun --standalone --nproc_per_node=2 benchmarks/fsdp_memory.py fsdp OUT_DIR

Each rank prints its peak resident memory (``ru_maxrss``: everything the process ever held: the model, its
gradients, DDP's buckets, the optimizer state, activations). FSDP builds the model on the meta device, so no
rank ever holds the whole of it; DDP holds it whole on every rank. The batch is tiny (2 x 64 tokens): the
comparison is about the training state, not the activations.

glibc's allocator keeps freed blocks of up to 32 MB in its heap once it has seen large frees (its dynamic mmap
threshold), so FSDP's per-block gathered parameters, freed after each block, would stay in the resident size
without being in use: the script re-runs itself with ``MALLOC_MMAP_THRESHOLD_=65536`` (both modes), so large
buffers return to the system when freed and the peak counts memory in use.
"""

from __future__ import annotations

import os
import resource
import sys

import torch

from chatforge.model.gpt import GPT, GPTConfig
from chatforge.train import distributed
from chatforge.train.loop import TrainConfig, lm_loss, train

SHAPE = dict(vocab_size=1024, block_size=64, n_layer=16, n_head=12, n_embd=768)


class RandomTokens:
    def batch(self, step, part, parts, device):
        g = torch.Generator().manual_seed(step * 100 + part)
        rows = torch.randint(0, SHAPE["vocab_size"], (1, SHAPE["block_size"] + 1), generator=g)
        return rows[:, :-1].to(device), rows[:, 1:].to(device)

    loss = staticmethod(lm_loss)


def main(parallel: str, out_dir: str) -> None:
    ranks = distributed.init("cpu")
    torch.manual_seed(0)
    with torch.device("meta" if parallel == "fsdp" else "cpu"):
        model = GPT(GPTConfig(**SHAPE))
    params = sum(p.numel() for p in model.parameters())
    cfg = TrainConfig(steps=2, batch_size=2 * ranks.world_size, optimizer="muon", lr=0.02, warmup_steps=1,
                      eval_every=0, ckpt_every=0, dtype="fp32", compile="false", device="cpu", progress=False,
                      parallel=parallel)
    train(model, RandomTokens(), cfg, f"{out_dir}/{parallel}")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for rank, peak in enumerate(distributed.gather_over_ranks(peak_mb)):
        if ranks.is_main:
            print(f"{parallel}: {params / 1e6:.1f}M parameters, rank {rank} peak RSS {peak:,.0f} MB")


if __name__ == "__main__":
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    main(sys.argv[1], sys.argv[2])
