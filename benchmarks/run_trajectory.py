"""A training run's trajectory between validations, from its folder or a fair-comparison log.

The run folders are not committed. This summarises one run folder's training records block
by block, a block being the iterations between two validations, so that a change in the run (a
collapse, an instability) can be read next to its cause and committed with the results. The
summary is :func:`fair_comparison.trajectory` (its fields are listed there), which the fair
comparison's logs also keep for each run they log (field ``trajectory``); ``--log`` writes the
table of one such logged run, with no run folder needed.

Command::

    python benchmarks/run_trajectory.py RUN_DIR --out benchmarks/results/NAME.json
    python benchmarks/run_trajectory.py --log benchmarks/results/fair_long_5way1shot.jsonl \
        --job "long itd-bio seed 1" --out benchmarks/results/NAME.json

(Runs logged before the logs kept trajectories have none there; pass their run folder.)

Writes ``NAME.json`` and ``NAME.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _diagnostic_setup import write_results  # noqa: E402
from fair_comparison import read_log, trajectory  # noqa: E402


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """The run's records in the order written; a torn last line (a kill mid-write) is skipped."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise SystemExit(f"{run_dir}: no metrics.jsonl; pass the folder of an mrmeta train run")
    return read_log(path)


def _cell(value: Any, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _norm(value: Any) -> str:
    """Three significant digits: norms run from 1e-7 (mrml's solve) to 1e3 (a diverging one)."""
    return "–" if value is None else f"{value:.3g}"


def markdown(out: dict[str, Any]) -> str:
    """The blocks as a Markdown table, with the command that wrote them."""
    lines = [
        f"# Training trajectory of `{out['run']}`",
        "",
        f"Means over the training records between two validations. Command: `{out['command']}`",
        "",
        "| iterations | CPU s | loss | accuracy | mean ‖∇φ g‖ | max ‖∇φ g‖ | CG breakdowns "
        "| CG residual | meta-gradient norm | validation |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in out["blocks"]:  # blocks written before the meta-gradient norm was kept lack it
        val = row["val_accuracy"]
        lines.append(
            f"| {row['first_iteration']}–{row['last_iteration']} "
            f"| {_cell(row['train_cpu_seconds'], 0)} | {_cell(row['loss'], 3)} "
            f"| {_cell(row['accuracy'], 3)} | {_norm(row['inner_grad_norm'])} "
            f"| {_norm(row['inner_grad_norm_max'])} | {_cell(row['cg_breakdowns'], 2)} "
            f"| {_norm(row['cg_residual'])} | {_norm(row.get('grad_norm'))} "
            f"| {'–' if val is None else f'{100 * val:.2f}%'} |"
        )
    return "\n".join(lines) + "\n"


def logged_trajectory(log: Path, job: str) -> list[dict[str, Any]]:
    """The blocks that a fair-comparison log (``.jsonl``) kept for its run named ``job``."""
    if not log.is_file():
        raise SystemExit(f"{log}: no such file; pass a fair_*.jsonl log of benchmarks/results")
    logged = read_log(log)
    entries = all(isinstance(run, dict) and "name" in run for run in logged)
    if not entries or (not logged and log.read_text().strip()):
        raise SystemExit(f"{log}: not a fair-comparison log; pass its .jsonl file, not the .json")
    runs = {run["name"]: run for run in logged}
    if job not in runs:
        known = ", ".join(repr(name) for name in runs) or "none"
        raise SystemExit(f"{log}: no run named {job!r}; the runs logged there: {known}")
    if "trajectory" not in runs[job]:
        why = "it failed before" if "failed" in runs[job] else "it was logged before"
        raise SystemExit(
            f"{log}: run {job!r} was logged without its trajectory ({why} the logs kept "
            "one); pass its run folder instead"
        )
    return runs[job]["trajectory"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, nargs="?", help="an mrmeta train run folder")
    parser.add_argument("--log", type=Path, help="a fair-comparison log (.jsonl) instead")
    parser.add_argument("--job", help="with --log: the logged run's name")
    parser.add_argument("--out", type=Path, required=True, help="NAME.json (NAME.md beside it)")
    args = parser.parse_args(argv)
    if (args.run_dir is None) == (args.log is None) or (args.log is None) != (args.job is None):
        parser.error("pass either a run folder, or --log LOG --job NAME (not both)")
    if args.log is not None:
        rows, run = logged_trajectory(args.log, args.job), args.job
    else:
        rows, run = trajectory(read_records(args.run_dir)), args.run_dir.name
    if not rows:
        raise SystemExit(f"{args.run_dir or args.job}: no training records")
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["benchmarks/run_trajectory.py", *given])
    out = {"run": run, "blocks": rows, "command": command}
    write_results(out, args.out.stem, args.out.parent, markdown)


if __name__ == "__main__":
    main()
