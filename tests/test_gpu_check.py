"""scripts/gpu_check.sh on a machine without CUDA: says so, claims nothing, exits 0; and each of its measurements
runs on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the real checks")
def test_gpu_check_without_cuda_claims_nothing():
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], env={"PYTHON": sys.executable,
                          "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "no CUDA device" in done.stdout and "nothing checked" in done.stdout
    assert "|" not in done.stdout  # no table rows: no figures claimed


def _check(*args, processes: int = 1) -> str:
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([*launcher, str(ROOT / "benchmarks" / "gpu_check.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_every_gpu_check_measurement_runs_on_the_cpu(tmp_path):
    """The script's measurements are only ever run by someone with a GPU; here each runs its code path on the
    CPU (gloo, a tiny model), so an API drift breaks this test instead of the GPU owner's check."""
    assert "tiny ddp x1: tokens/s" in _check("pretrain", str(tmp_path / "one"), "tiny", "ddp", "cpu")
    assert "tiny ddp x2: tokens/s" in _check("pretrain", str(tmp_path / "ddp"), "tiny", "ddp", "cpu", processes=2)
    compared = _check("compare", str(tmp_path / "one"), str(tmp_path / "ddp"), "2")
    gap = float(compared.split("largest loss gap over")[1].split("|")[1].split()[0])
    assert gap < 2e-2 and "scaling efficiency" in compared
    assert "tiny fsdp x2: peak memory per rank" in _check(
        "pretrain", str(tmp_path / "fsdp"), "tiny", "fsdp", "cpu", processes=2)
    decoded = _check("decode", "tiny", "cpu")
    assert all(f"batch {b} (tokens/s)" in decoded for b in (1, 16, 64))
    assert "on 1 GPU(s)" in _check("rollout", str(tmp_path), "tiny", "cpu")
    assert "2 GPUs vs 1" in _check("rollout", str(tmp_path), "tiny", "cpu", processes=2)
