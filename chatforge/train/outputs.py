"""What a training run leaves in its ``out_dir`` besides checkpoints: metrics, the loss plot, the summary."""

from __future__ import annotations

import json
from pathlib import Path

from chatforge import io

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
PLOT_FILE = "loss.png"


def read_metrics(out_dir: str | Path, up_to_step: int | None = None) -> list[dict]:
    """Rows of ``metrics.jsonl`` (those of steps after ``up_to_step`` dropped: a resumed run redoes them)."""
    path = Path(out_dir) / METRICS_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            if up_to_step is None or row.get("step", 0) <= up_to_step:
                rows.append(row)
    return rows


def plot_losses(rows: list[dict], path: str | Path, title: str = "") -> None:
    """Train loss (raw and smoothed) and validation loss against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        steps, losses = zip(*train)
        smooth, ema = [], losses[0]
        for value in losses:
            ema = 0.9 * ema + 0.1 * value
            smooth.append(ema)
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8)
        ax.plot(steps, smooth, color="tab:blue", label="train (smoothed)")
    if val:
        ax.plot(*zip(*val), "o-", color="tab:orange", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend()
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
