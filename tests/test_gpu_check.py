"""scripts/gpu_check.sh on a machine without CUDA: says so, claims nothing, exits 0."""

from __future__ import annotations

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
