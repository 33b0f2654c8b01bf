"""Each training stage under torchrun (2 gloo processes on the CPU) ends with the parameters of one process
trained on the same global batch (the scenarios are in ``dist_scenarios.py``).

Tolerance: fp32 throughout; the two runs differ only in summation order (a gradient summed over 2 ranks by
all-reduce vs over one batch, micro-batches accumulated in another grouping), ~1e-7 relative per step. Adam and
Muon normalise updates, so a rounding difference in a near-zero gradient coordinate can move its update by up to
~lr; after 3 steps AdamW-trained parameters agree to 1e-4 absolute, while a real fault (local negatives,
unsynchronised gradients, mean-of-means weighting) moves them by 1e-3 or more. Muon orthogonalises in bf16
(torch.optim.Muon's Newton–Schulz), so a rounding difference flips bf16 ulps (2^-8 relative) of updates of
size ~lr·√(fan ratio) ≈ 0.04: ~1e-4 per step, hence 5e-4 for the Muon scenario (measured 1.2e-4).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = Path(__file__).resolve().parent / "dist_scenarios.py"
ADAMW_TOLERANCE, MUON_TOLERANCE = 1e-4, 5e-4


def run_scenario(name: str, out_dir: Path, processes: int = 1, **options) -> dict[str, torch.Tensor]:
    """Run scenario ``name`` as one process or under torchrun; the parameters it ended with."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT)
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    extra = [f"{key}={json.dumps(value)}" for key, value in options.items()]
    done = subprocess.run([*launcher, str(SCENARIOS), name, str(out_dir), *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out_dir / "params.pt")


def max_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("name, single_options, parallel_options, tolerance", [
    # SFT: one micro-batch of 8 vs 2 ranks x 2 micro-batches of 2; a mean of micro-batch means would differ
    ("sft", {"micro_batch_size": 8}, {"micro_batch_size": 2}, ADAMW_TOLERANCE),
    # embed: negatives must span both ranks' rows and the temperature's gradient must be reduced
    ("embed", {}, {}, ADAMW_TOLERANCE),
    # pretrain's modern model with Muon + AdamW under DDP
    ("pretrain_muon", {}, {}, MUON_TOLERANCE),
])
def test_two_processes_match_one(tmp_path, name, single_options, parallel_options, tolerance):
    single = run_scenario(name, tmp_path / "single", **single_options)
    parallel = run_scenario(name, tmp_path / "ddp", processes=2, **parallel_options)
    gap = max_gap(single, parallel)
    print(f"{name}: largest parameter gap {gap:.2e}")
    assert gap < tolerance, f"{name}: parameters differ by {gap}"
