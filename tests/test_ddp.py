"""Data-parallel training: two gloo processes under torchrun take the same steps as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import losses, make_corpus, tiny_pretrain_args

from chatforge.cli import main

ROOT = Path(__file__).resolve().parents[1]


# AdamW sums the same gradients in another order: float rounding only. Muon orthogonalises each update in bf16,
# where a last-bit difference in a summed gradient can round to the next bf16 value (2^-8 relative): measured
# 5e-3 apart after 8 steps, so its tolerance is 2e-2. At Muon's default rate the amplification is rounding luck:
# on an Intel Xeon one process alone, splitting the batch into micro-batches of 2, ended 6.2e-2 apart at step 7
# (5.1e-3 at lr 0.005), so Muon runs at 0.005 here.
@pytest.mark.slow
@pytest.mark.parametrize(
    "optimizer, lr_options, tolerance", [("adamw", {}, 1e-4), ("muon", {"train__lr": 0.005}, 2e-2)]
)
def test_ddp_matches_single_process(tmp_path, optimizer, lr_options, tolerance):
    """Same global batch of 8: 1 process vs 2 processes each accumulating 2 micro-batches of 2."""
    corpus = make_corpus(tmp_path / "tok")
    main(["pretrain", *tiny_pretrain_args(corpus, tmp_path / "single", train__optimizer=optimizer, **lr_options)])
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "chatforge.cli",
        "pretrain",
        *tiny_pretrain_args(
            corpus, tmp_path / "ddp", train__micro_batch_size=2, train__optimizer=optimizer, **lr_options
        ),
    ]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    single, ddp = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert single.keys() == ddp.keys() == set(range(1, 9))
    assert [ddp[s] for s in single] == pytest.approx([single[s] for s in single], abs=tolerance)
    summary = {name: json.loads((tmp_path / name / "summary.json").read_text()) for name in ("single", "ddp")}
    assert summary["ddp"]["world_size"] == 2 and summary["ddp"]["grad_accum_steps"] == 2
    assert summary["ddp"]["tokens_seen"] == summary["single"]["tokens_seen"] == 8 * 8 * 32
    assert summary["ddp"]["final_val_loss"] == pytest.approx(summary["single"]["final_val_loss"], abs=tolerance)
    # only rank 0 wrote: one set of outputs, one checkpoint folder per saved step
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir()) == [
        "latest",
        "step_00000004",
        "step_00000008",
    ]
