"""The learning-curve plot: written without touching the user's matplotlib backend or pyplot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

SRC = Path(__file__).resolve().parents[1] / "src"

# Runs in a fresh interpreter: a user has chosen the (non-interactive, always available) SVG
# backend, then imports the module and saves a plot.
USER_SESSION = """
import sys
from pathlib import Path

import matplotlib

matplotlib.use("svg")
from mrmeta._plots import plot_learning_curves

records = [
    {"kind": "train", "iteration": 1, "loss": 1.6, "accuracy": 0.2},
    {"kind": "train", "iteration": 2, "loss": 1.2, "accuracy": 0.5},
    {"kind": "train", "iteration": 3, "loss": float("nan"), "skipped": True},
    {"kind": "val", "iteration": 2, "accuracy": 0.4},
]
plot_learning_curves(records, Path(sys.argv[1]))
print(matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules)
"""


def test_plot_keeps_the_users_backend_and_leaves_pyplot_alone(tmp_path: Path) -> None:
    out = tmp_path / "curves.png"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    env.pop("MPLBACKEND", None)
    done = subprocess.run(
        [sys.executable, "-c", USER_SESSION, str(out)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert done.stdout.split() == ["svg", "False"]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
