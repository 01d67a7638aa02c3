"""The run's curves as a picture: training loss and validation AUC against steps, from
``metrics.jsonl`` (``curves.png`` in the run dir, written at the end of a run)."""

from __future__ import annotations

import json
from pathlib import Path

from dlrm_cache.files import atomic_file


def plot_curves(metrics: Path, out: Path) -> None:
    """Loss (every logged step) and val AUC (every evaluation) against steps; an atomic write."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps, loss, val_steps, auc = [], [], [], []
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by a kill
            continue
        if "loss" in record:
            steps.append(record["step"])
            loss.append(record["loss"])
        elif "val" in record:
            val_steps.append(record["step"])
            auc.append(record["val"]["auc"])
    fig = Figure(figsize=(8, 3.2))
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    left.plot(steps, loss, lw=1)
    left.set(xlabel="step", ylabel="training loss (log loss)", title="loss")
    right.plot(val_steps, auc, marker="o")
    right.set(xlabel="step", ylabel="AUC", title="validation AUC")
    fig.tight_layout()
    with atomic_file(out) as f:
        fig.savefig(f, format="png", dpi=100)
