"""Learning-curve plots of a run's ``metrics.jsonl`` (needs matplotlib)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_learning_curves(records: list[dict[str, Any]], path: Path) -> None:
    """Training loss, training and validation accuracy against iterations, saved as a PNG."""
    train = [r for r in records if r.get("kind") == "train" and not r.get("skipped")]
    val = [r for r in records if r.get("kind") == "val"]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
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
    plt.close(fig)
