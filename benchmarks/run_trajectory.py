"""A training run's trajectory between validations, from its ``metrics.jsonl``.

A fair-comparison log keeps each run's validation curve but not its training records, and the
run folders are not committed. This summarises one run folder's training records block by
block, a block being the iterations between two validations, so that a change in the run (a
collapse, an instability) can be read next to its cause and committed with the results:

* ``loss``, ``accuracy``: mean query loss and accuracy of the block's meta-batches;
* ``inner_grad_norm``: mean of the meta-batch means of ‖∇φ g‖ after the lower-level solve;
* ``inner_grad_norm_max``: the largest per-task ‖∇φ g‖ of the block (where the run logs it);
* ``cg_breakdowns``: mean fraction of tasks whose CG solve broke down (iMAML), and
  ``cg_residual``: mean relative CG residual, where the algorithm logs them;
* ``val_accuracy``: the validation accuracy at the block's end.

Command::

    python benchmarks/run_trajectory.py RUN_DIR --out benchmarks/results/NAME.json

Writes ``NAME.json`` and ``NAME.md``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _diagnostic_setup import write_results  # noqa: E402
from fair_comparison import read_log  # noqa: E402

SUMMED = ("loss", "accuracy", "inner_grad_norm", "cg_breakdowns", "cg_residual")


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """The run's records in the order written; a torn last line (a kill mid-write) is skipped."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise SystemExit(f"{run_dir}: no metrics.jsonl; pass the folder of an mrmeta train run")
    return read_log(path)


def _mean_of(block: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in block if r.get(key) is not None and math.isfinite(r[key])]
    return sum(values) / len(values) if values else None


def trajectory(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per validation: the training records since the previous validation, summarised.

    Training records after the last validation (a run stopped between two) form a last row
    with ``val_accuracy`` None."""
    rows, block = [], []
    for record in records:
        if record.get("kind") == "train":
            block.append(record)
        elif record.get("kind") == "val" and block:
            rows.append(_row(block, record))
            block = []
    if block:
        rows.append(_row(block, None))
    return rows


def _row(block: list[dict[str, Any]], val: dict[str, Any] | None) -> dict[str, Any]:
    maxima = [r["inner_grad_norm_max"] for r in block if r.get("inner_grad_norm_max") is not None]
    return {
        "first_iteration": block[0]["iteration"],
        "last_iteration": block[-1]["iteration"],
        "train_cpu_seconds": block[-1].get("train_cpu_seconds"),
        **{key: _mean_of(block, key) for key in SUMMED},
        "inner_grad_norm_max": max(maxima) if maxima else None,
        "val_accuracy": val["accuracy"] if val else None,
    }


def _cell(value: Any, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(out: dict[str, Any]) -> str:
    """The blocks as a Markdown table, with the command that wrote them."""
    lines = [
        f"# Training trajectory of `{out['run']}`",
        "",
        f"Means over the training records between two validations. Command: `{out['command']}`",
        "",
        "| iterations | CPU s | loss | accuracy | mean ‖∇φ g‖ | max ‖∇φ g‖ | CG breakdowns "
        "| CG residual | validation |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in out["blocks"]:
        val = row["val_accuracy"]
        lines.append(
            f"| {row['first_iteration']}–{row['last_iteration']} "
            f"| {_cell(row['train_cpu_seconds'], 0)} | {_cell(row['loss'], 3)} "
            f"| {_cell(row['accuracy'], 3)} | {_cell(row['inner_grad_norm'], 3)} "
            f"| {_cell(row['inner_grad_norm_max'], 3)} | {_cell(row['cg_breakdowns'], 2)} "
            f"| {_cell(row['cg_residual'], 2)} | {'–' if val is None else f'{100 * val:.2f}%'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="an mrmeta train run folder")
    parser.add_argument("--out", type=Path, required=True, help="NAME.json (NAME.md beside it)")
    args = parser.parse_args(argv)
    rows = trajectory(read_records(args.run_dir))
    if not rows:
        raise SystemExit(f"{args.run_dir}: metrics.jsonl has no training records yet")
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["benchmarks/run_trajectory.py", *given])
    out = {"run": args.run_dir.name, "blocks": rows, "command": command}
    write_results(out, args.out.stem, args.out.parent, markdown)


if __name__ == "__main__":
    main()
