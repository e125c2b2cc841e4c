"""Training options of the fair benchmark: the CPU clock, timed validations, no test, and the
lower-level solver's report in metrics.jsonl (real Omniglot, tiny runs)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mrmeta.cli import main

DATA_ROOT = Path(os.environ.get("MRMETA_DATA") or "/nonexistent/mrmeta-data")
needs_omniglot = pytest.mark.skipif(
    not (DATA_ROOT / "omniglot" / "images_background.npz").exists(),
    reason="real Omniglot copy not found (set MRMETA_DATA)",
)

TINY = [
    "--dataset",
    "omniglot",
    "--data-root",
    str(DATA_ROOT),
    "--ways",
    "3",
    "--shots",
    "1",
    "--queries",
    "2",
    "--meta-batch",
    "2",
    "--hidden",
    "8",
    "--val-tasks",
    "4",
    "--threads",
    "1",
    "--quiet",
]


def _records(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


@needs_omniglot
def test_cpu_budget_stops_on_cpu_seconds_and_validates_on_time(tmp_path: Path) -> None:
    run = tmp_path / "run"
    code = main(
        [
            "train",
            "--out",
            str(run),
            *TINY,
            "--iterations",
            "100000",
            "--test-tasks",
            "2",
            "--budget-clock",
            "cpu",
            "--time-budget",
            "3",
            "--val-every",
            "100000",
            "--val-every-seconds",
            "1",
        ]
    )
    assert code == 0
    train = _records(run, "train")
    cpu = [r["train_cpu_seconds"] for r in train]
    assert cpu == sorted(cpu) and cpu[-1] >= 3 and (len(cpu) == 1 or cpu[-2] < 3)
    val = _records(run, "val")
    marks = [r["train_cpu_seconds"] for r in val]
    # one validation at the first step after each whole CPU second (1 s, 2 s), one at the end
    firsts = [next(c for c in cpu if c >= k) for k in (1, 2)]
    assert marks == [*firsts, cpu[-1]]


@needs_omniglot
def test_test_tasks_zero_reads_no_test_split(tmp_path: Path, monkeypatch, capsys) -> None:
    from mrmeta import train as train_module

    def no_test(*args: object, **kwargs: object) -> None:
        raise AssertionError("the test split was read")

    monkeypatch.setattr(train_module.TrainingRun, "test", no_test)
    run = tmp_path / "run"
    code = main(
        [
            "train",
            "--out",
            str(run),
            *TINY,
            "--iterations",
            "2",
            "--test-tasks",
            "0",
            "--inner-steps",
            "3",
            "--cg-iters",
            "2",
        ]
    )
    assert code == 0
    result = json.loads((run / "result.json").read_text())
    assert result["test_accuracy"] is None and result["test_tasks"] == 0
    assert "no test" in capsys.readouterr().out


@needs_omniglot
def test_metrics_report_the_lower_level_solve(tmp_path: Path) -> None:
    run = tmp_path / "run"
    code = main(["train", "--out", str(run), *TINY, "--iterations", "2", "--test-tasks", "2"])
    assert code == 0
    for record in _records(run, "train"):
        assert 1 <= record["inner_iterations"] <= 50
        assert record["inner_grad_norm"] <= record["inner_grad_norm_max"] <= 1e-4
