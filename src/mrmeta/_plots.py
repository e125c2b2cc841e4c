"""Learning-curve plots of a run's ``metrics.jsonl`` (needs matplotlib).

The figure is drawn on its own Agg canvas (``matplotlib.figure.Figure`` with
``FigureCanvasAgg``), without pyplot: importing this module or saving a plot leaves the
user's matplotlib backend and pyplot's figures alone (a notebook keeps its inline backend).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def plot_learning_curves(records: list[dict[str, Any]], path: Path) -> None:
    """Training loss, training and validation accuracy against iterations, saved as a PNG."""
    train = [r for r in records if r.get("kind") == "train" and not r.get("skipped")]
    val = [r for r in records if r.get("kind") == "val"]
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot([r["iteration"] for r in train], [r["loss"] for r in train], lw=1)
    ax_loss.set(xlabel="iteration", ylabel="query loss", title="meta-training loss")
    if train and train[0].get("accuracy") is not None:
        ax_acc.plot(
            [r["iteration"] for r in train],
            [r["accuracy"] for r in train],
            lw=1,
            alpha=0.6,
            label="train (query)",
        )
    if val:
        ax_acc.plot(
            [r["iteration"] for r in val],
            [r["accuracy"] for r in val],
            marker="o",
            label="validation",
        )
    ax_acc.set(xlabel="iteration", ylabel="accuracy", title="accuracy")
    ax_acc.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
