"""A fair comparison on real Omniglot: tune on validation, train several seeds, test once.

Every method goes through the same protocol (docs/design.md, "Fair comparisons"):

* ``tune``: the same number of configurations per method (``--grid``, one of :data:`GRIDS`:
  "2x2", the first study, or "3x3", wider and over the inner problem too), each meta-trained
  for ``--tune-budget`` seconds with seed 0 and scored by its best validation accuracy (the
  same ``--val-tasks`` validation tasks for everyone). The test split is never read here
  (``--test-tasks 0``). Each grid is a study of its own: its tuning, final and long stages
  read and write their own files (:func:`_study`), so a new grid leaves the results of the
  earlier one as they were.
* ``final``: each method's selected configuration, and the extra rows (:data:`EXTRA_ROWS`),
  for ``--seeds`` seeds and ``--budget`` seconds, validated every ``--budget / --validations``
  seconds of training; the best-validation checkpoint is tested once on 600 test tasks under
  the native protocol and again under the frozen-backbone protocol.
* ``long``: runs of ``--long-budget`` seconds (default an hour) for mrml and the
  ``--long-baselines`` (default two) baselines with the best mean validation accuracy in the
  final stage, ``--long-seeds`` seeds each (default one; ``--long-rows`` limits which rows
  run), each tested once.
* ``speed``: where the finished final stage's validation grid cannot order mrml and a
  baseline in reaching 0.9 × mrml's mean best validation accuracy (their mean times are
  within one validation spacing, :func:`undecided_rows`), those rows again, same seeds and
  settings, until just past where their final runs had reached it (:func:`speed_budget`),
  validated every ``--speed-spacing`` seconds (default 4, against the final stage's 20);
  validation only, the test split is not read.
* ``cost``: seconds per meta-iteration of mrml and ANIL at their defaults, interleaved in one
  process with one thread, as a median of paired per-round ratios; also the part of mrml's
  iteration spent in its head work (the lower-level solve and the hypergradient), which says
  how much of a difference comes from the head and how much from the shared backbone.
  ``--cost-chunk-size`` measures both at another chunk size, into a file of its own.
* ``report``: tables, the targets of the issue with their margins, and learning curves.

Every run is one ``python -m mrmeta train`` subprocess with ``--threads 1``, two at a time on
the two cores, and its training time counted in CPU seconds (``--budget-clock cpu``), so that
other load on the machine changes neither a run's budget nor its validation times; the job list
interleaves the methods so that each one shares the machine with every other.

Commands (results in benchmarks/results/)::

    python benchmarks/fair_comparison.py tune --ways 5
    python benchmarks/fair_comparison.py final --ways 5
    python benchmarks/fair_comparison.py long --ways 5
    python benchmarks/fair_comparison.py long --ways 5 --long-seeds 3 --long-rows imaml
    python benchmarks/fair_comparison.py speed --ways 5
    python benchmarks/fair_comparison.py cost --ways 5
    python benchmarks/fair_comparison.py report --ways 5
    python benchmarks/fair_comparison.py tune --ways 5 --grid 3x3 --tune-budget 240
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

RESULTS = Path(__file__).resolve().parent / "results"

# The tuning grids, by name: each gives every method the same number of configurations.
# "2x2" (the first study): the meta learning rate and the method's most important inner
# hyperparameter (its step size, or its regulariser), two values each. "3x3": three meta
# learning rates, and three settings of the method's inner problem, with a value past each 2x2
# selection that sat at an end of its grid: μ for the two methods whose lower level is the head's
# regularised problem (0.1 was selected at 5-way, 0.01 at 20-way); the inner step for ANIL;
# the inner step count and step together for MAML and first-order MAML; λ and the inner step
# together for iMAML (measured: its step of 0.1 is above 2/L at 20-way, see the README; λ 0.5,
# the smaller of the 2x2 values, was selected). ANIL's, ITD-BiO's and iMAML's step counts are
# not tuned (10, 20, 10). mrml's Newton solve stops on its tolerance and its v is exact, so it
# has no inner step, step count or CG count to tune.
_META_LRS_3X3 = (1e-3, 3e-3, 1e-2)
FIRST_GRID = "2x2"  # its study's files have the setting's name alone (see _study)
GRIDS: dict[str, dict[str, list[dict[str, Any]]]] = {
    FIRST_GRID: {
        "mrml": [{"lr": lr, "l2": mu} for lr in (1e-3, 3e-3) for mu in (0.01, 0.1)],
        "itd-bio": [{"lr": lr, "l2": mu} for lr in (1e-3, 3e-3) for mu in (0.01, 0.1)],
        "anil": [{"lr": lr, "inner_lr": a} for lr in (1e-3, 3e-3) for a in (0.1, 0.5)],
        "maml": [{"lr": lr, "inner_lr": a} for lr in (1e-3, 3e-3) for a in (0.1, 0.4)],
        "fomaml": [
            {"lr": lr, "inner_steps": k, "inner_lr": a}
            for lr in (1e-3, 3e-3)
            for k, a in ((1, 0.4), (5, 0.1))
        ],
        "imaml": [{"lr": lr, "reg": reg} for lr in (1e-3, 3e-3) for reg in (0.5, 2.0)],
    },
    "3x3": {
        "mrml": [{"lr": lr, "l2": mu} for lr in _META_LRS_3X3 for mu in (0.003, 0.03, 0.3)],
        "itd-bio": [{"lr": lr, "l2": mu} for lr in _META_LRS_3X3 for mu in (0.003, 0.03, 0.3)],
        "anil": [{"lr": lr, "inner_lr": a} for lr in _META_LRS_3X3 for a in (0.05, 0.1, 0.2)],
        "maml": [
            {"lr": lr, "inner_steps": k, "inner_lr": a}
            for lr in _META_LRS_3X3
            for k, a in ((1, 0.4), (1, 0.8), (3, 0.4))
        ],
        "fomaml": [
            {"lr": lr, "inner_steps": k, "inner_lr": a}
            for lr in _META_LRS_3X3
            for k, a in ((5, 0.1), (5, 0.2), (10, 0.1))
        ],
        "imaml": [
            {"lr": lr, "reg": reg, "inner_lr": a}
            for lr in _META_LRS_3X3
            for reg, a in ((0.5, 0.1), (0.5, 0.05), (0.25, 0.05))
        ],
    },
}
METHODS = tuple(GRIDS[FIRST_GRID])
BASELINES = tuple(method for method in METHODS if method != "mrml")

# mrml with the paper's lower level and its code's settings (not tuned): the recipe users get.
PAPER_RECIPE = Path(__file__).resolve().parents[1] / "configs" / "mrml-paper.toml"

# Rows measured in the final stage besides the tuned methods: (name, based on, changes).
EXTRA_ROWS: list[tuple[str, str, dict[str, Any]]] = [
    ("mrml-learn-head-init", "mrml", {"learn_head_init": True}),
    ("mrml-paper", "paper", tomllib.loads(PAPER_RECIPE.read_text())),
]


def _flags(options: dict[str, Any]) -> list[str]:
    out = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        else:
            out.extend([flag, str(value)])
    return out


def _common(args: argparse.Namespace) -> dict[str, Any]:
    common = {
        "dataset": "omniglot",
        "ways": args.ways,
        "shots": args.shots,
        "queries": args.queries,
        "meta_batch": args.meta_batch,
        "threads": 1,
        "budget_clock": "cpu",
        "iterations": 10**7,
        "checkpoint_every": 10**7,
        "val_every": 10**7,
        "val_tasks": args.val_tasks,
    }
    if args.data_root:
        common["data_root"] = args.data_root
    return common


def run_job(job: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """One ``mrmeta train`` subprocess; its folder's result.json and metrics, summarised."""
    run_dir = Path(job["run_dir"])
    shutil.rmtree(run_dir, ignore_errors=True)
    command = [sys.executable, "-m", "mrmeta", "train", "--out", str(run_dir), "--quiet"]
    command += _flags(job["options"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - started
    records = read_log(run_dir / "metrics.jsonl")
    if done.returncode != 0:
        print(f"FAILED {job['name']}: {done.stderr.strip()[-400:]}", flush=True)
        # a diverged run's records up to the failure are where its cause shows
        rows = trajectory(records)
        return {
            **job,
            "failed": done.stderr.strip()[-2000:],
            "trajectory": trajectory_in_seconds(rows, job.get("machine_ratio", 1.0)),
            "wall_seconds": wall,
        }
    result = json.loads((run_dir / "result.json").read_text())
    summary = summarise_records(records)
    if job.get("machine_ratio"):
        summary = in_logged_seconds(summary, job["machine_ratio"])
    if job.get("frozen_backbone_test"):
        summary["frozen_backbone"] = frozen_backbone_test(run_dir, args)
    print(
        f"{job['name']}: {summary['iterations']} it, best val {summary['best_val']:.4f} "
        f"({wall:.0f} s wall)",
        flush=True,
    )
    return {**job, **summary, "result": result, "wall_seconds": wall}


def summarise_records(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Validation curve (CPU seconds, accuracy), iterations, s/it (wall, and CPU from the third
    iteration on), the solve statistics, and the
    training records between two validations summarised block by block (:func:`trajectory`):
    the run folders are not committed, so the logged result keeps the block means (not the
    per-iteration records)."""
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    per_it = [r["seconds"] for r in train[2:]] or [r["seconds"] for r in train]
    cpu_per_it = [
        b["train_cpu_seconds"] - a["train_cpu_seconds"]
        for a, b in zip(train[1:], train[2:], strict=False)
        if a.get("train_cpu_seconds") is not None and b.get("train_cpu_seconds") is not None
    ]
    norms = _finite(train, "inner_grad_norm_max")
    return {
        "iterations": len(train),
        "curve": [(r["train_cpu_seconds"], r["accuracy"]) for r in val],
        "best_val": max((r["accuracy"] for r in val), default=float("nan")),
        "median_seconds_per_iteration": statistics.median(per_it) if per_it else None,
        "median_cpu_seconds_per_iteration": statistics.median(cpu_per_it) if cpu_per_it else None,
        "inner_grad_norm_max": max(norms) if norms else None,
        "inner_iterations_mean": _mean(
            [r["inner_iterations"] for r in train if r.get("inner_iterations") is not None]
        ),
        "skipped": sum(1 for r in train if r.get("skipped")),
        "trajectory": trajectory(records),
    }


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


# A block's means over its training records (missing and non-finite values skipped):
# query ``loss`` and ``accuracy``; ``inner_grad_norm``, the meta-batch mean of ‖∇φ g‖ after the
# lower-level solve; ``cg_breakdowns``, the fraction of tasks whose CG solve broke down
# (iMAML), and ``cg_residual``, the mean residual ‖∇φ f − H v‖ of v, where the algorithm logs
# them; ``grad_norm``, the norm of the meta-gradient.
BLOCK_MEANS = ("loss", "accuracy", "inner_grad_norm", "cg_breakdowns", "cg_residual", "grad_norm")


def trajectory(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The training records between two validations, one row per block, summarised:
    ``first_iteration`` and ``last_iteration``; ``train_cpu_seconds`` at the block's last
    record; the means of :data:`BLOCK_MEANS`; ``inner_grad_norm_max``, the largest per-task
    ‖∇φ g‖ of the block where the run logs it; ``val_accuracy``, the validation accuracy at the
    block's end.

    A validation with no training record since the one before adds no row. Training records
    after the last validation (a run stopped between two, or one never validated) form a last
    row with ``val_accuracy`` None."""
    rows, block = [], []
    for record in records:
        if record.get("kind") == "train":
            block.append(record)
        elif record.get("kind") == "val" and block:
            rows.append(_block(block, record))
            block = []
    if block:
        rows.append(_block(block, None))
    return rows


def _block(block: list[dict[str, Any]], val: dict[str, Any] | None) -> dict[str, Any]:
    maxima = _finite(block, "inner_grad_norm_max")
    return {
        "first_iteration": block[0]["iteration"],
        "last_iteration": block[-1]["iteration"],
        "train_cpu_seconds": block[-1].get("train_cpu_seconds"),
        **{key: _mean(_finite(block, key)) for key in BLOCK_MEANS},
        "inner_grad_norm_max": max(maxima) if maxima else None,
        "val_accuracy": val["accuracy"] if val else None,
    }


def _finite(records: list[dict[str, Any]], key: str) -> list[float]:
    """The records' values of ``key``, leaving out missing and non-finite ones (which JSON
    cannot hold as numbers)."""
    return [r[key] for r in records if r.get(key) is not None and math.isfinite(r[key])]


# Every budget is CPU seconds, so a study's runs compare only where they ran at one speed. The
# 20-way second study met a machine that took 2.1 times the seconds per iteration of the same
# configurations in an earlier session (benchmarks/results/
# fair_tuning_20way1shot_grid3x3_discarded.jsonl); :func:`check_machine_speed` catches that.
MACHINE_SPEED_TOLERANCE = 0.15  # |measured / logged s/it − 1| allowed
CALIBRATION_SECONDS = 120.0  # CPU seconds of training per calibration run (first 2 it. untimed)
SPEED_AGREEMENT = 0.10  # max / min − 1 allowed between one row's calibrations (--scale-budgets)
CALIBRATION_VAL_TASKS = 16  # the end-of-run validation of a calibration run, kept short


def check_machine_speed(
    logged: list[dict[str, Any]], args: argparse.Namespace, record: Path | None = None
) -> None:
    """Refuse to add runs to a study whose logged runs ran at another speed.

    Times the first logged runs of the first ``--workers`` rows side by side, in one round of
    :func:`measure_rounds` (different rows, as the study's runs go). A slower machine shows
    there, and so does other work on this one, under which a CPU second also buys less work
    (measured: 23–39% more seconds per iteration beside a CI run, README), so both are
    refused. A refusal on a machine believed to be like the study's can be retried; a study
    that must go on elsewhere can scale its budgets instead (``--scale-budgets``,
    :func:`scale_to_logged_speed`). What was measured is appended to ``record``
    (:func:`record_calibration`), refused or not.

    Raises:
        SystemExit: a row's ratio is off by more than :data:`MACHINE_SPEED_TOLERANCE`, or the
            calibration runs failed.
    """
    firsts = first_runs(logged)
    keys = list(firsts)[: args.workers]
    if not keys:
        return
    keys += keys[: args.workers - len(keys)]  # fewer rows than workers
    rows = measure_rounds(firsts, [keys], args)
    off = [(key, here / row["logged"]) for key, row in rows.items() for here in row["here"]
           if abs(here / row["logged"] - 1) > MACHINE_SPEED_TOLERANCE]  # fmt: skip
    if record is not None:
        record_calibration(record, "speed check", rows, list(dict.fromkeys(key for key, _ in off)))
    if off:
        key, ratio = off[0]
        raise SystemExit(
            f"this machine runs '{rows[key]['run']}' at {ratio:.2f} times the seconds per "
            f"iteration of its logged run: CPU-second budgets would not compare with the "
            f"runs already in this study; run it on a machine like the study's, add "
            f"--scale-budgets to give each run the work its budget bought there, or start "
            f"the stage again by moving its .jsonl log aside"
        )


def measure_rounds(
    references: dict[str, dict[str, Any]], rounds: list[list[str]], args: argparse.Namespace
) -> dict[str, dict[str, Any]]:
    """Each round's rows run side by side (:func:`measure_speeds`), one round after another.

    Per row, in first-measured order: the logged reference ``run``'s name, its measurements
    ``here`` (CPU s/it), the rows it was ``beside`` in each, its ``logged`` seconds per
    iteration (:func:`logged_seconds_per_iteration`) and ``ratio`` = mean(here) / logged. A row
    twice in one round (fewer rows than workers) is measured beside a copy of itself."""
    rows: dict[str, dict[str, Any]] = {}
    for side_by_side in rounds:
        seconds = measure_speeds([references[key] for key in side_by_side], args)
        for j, (key, value) in enumerate(zip(side_by_side, seconds, strict=True)):
            if key not in rows:
                logged = logged_seconds_per_iteration(references[key])
                rows[key] = {"run": references[key]["name"], "here": [], "beside": [],
                             "logged": logged}  # fmt: skip
            row = rows[key]
            row["here"].append(value)
            row["beside"].append(side_by_side[:j] + side_by_side[j + 1 :])
    for key, row in rows.items():
        row["ratio"] = statistics.mean(row["here"]) / row["logged"]
        print(
            f"machine speed: {key} ({row['run']}) takes "
            f"{', '.join(f'{v:.2f}' for v in row['here'])} CPU s/it here, {row['logged']:.2f} "
            f"in the log (ratio {row['ratio']:.2f})",
            flush=True,
        )
    return rows


def record_calibration(
    record: Path, check: str, rows: dict[str, dict[str, Any]], refused: list[str]
) -> None:
    """Append one calibration to ``record`` (JSON lines): the date, which ``check`` ran
    (``"speed check"``: :func:`check_machine_speed`; ``"scale budgets"``:
    :func:`calibrated_ratios`), per row what :func:`measure_rounds` gives (its logged run, its
    measurements here in CPU s/it, the rows each ran beside, its logged seconds per iteration
    and ratio), and the rows that were ``refused``.
    Entries written before these fields (the first three of the 20-way second study's file)
    are :func:`calibrated_ratios`' alone, without ``check`` and ``beside`` (its rotation
    rule gives the partners), and name the refused rows ``unsteady``."""
    entry = {"date": time.strftime("%Y-%m-%d %H:%M"), "check": check, "rows": rows,
             "refused": refused}  # fmt: skip
    with record.open("a") as handle:
        handle.write(json.dumps(entry) + "\n")


def first_runs(logged: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each row's first logged run that finished and has seconds per iteration, by
    :func:`speed_key`, in log order: the runs a machine's speed is measured against."""
    out: dict[str, dict[str, Any]] = {}
    for run in logged:
        if "failed" not in run and logged_seconds_per_iteration(run):
            out.setdefault(speed_key(run), run)
    return out


def logged_seconds_per_iteration(run: dict[str, Any]) -> float | None:
    """A logged run's CPU seconds per meta-iteration (the study machine's, for a scaled run).

    Its ``median_cpu_seconds_per_iteration`` where logged (:func:`summarise_records`); for a
    run logged before that was, the median over consecutive trajectory blocks of
    Δ train CPU seconds / Δ iterations (the first block, with the warm-up, left out); for a
    run logged before those, its median wall seconds per iteration (one thread on an otherwise
    idle core: within 1.3% of the CPU seconds, measured on two machines); ``None`` where none
    is known."""
    if run.get("median_cpu_seconds_per_iteration"):
        return run["median_cpu_seconds_per_iteration"]
    rows = [r for r in run.get("trajectory", []) if r.get("train_cpu_seconds") is not None]
    steps = [
        (b["train_cpu_seconds"] - a["train_cpu_seconds"])
        / (b["last_iteration"] - a["last_iteration"])
        for a, b in zip(rows, rows[1:], strict=False)
        if b["last_iteration"] > a["last_iteration"]
    ]
    return statistics.median(steps) if steps else run.get("median_seconds_per_iteration")


def measure_speeds(references: list[dict[str, Any]], args: argparse.Namespace) -> list[float]:
    """The CPU seconds per iteration of each logged run's configuration in ``references``, all
    run side by side here, each for :data:`CALIBRATION_SECONDS` CPU seconds (so that each has
    its partners beside it to the end) with this machine's ``--data-root``.

    CPU seconds, because budgets are: time taken from a virtual machine by its host lengthens
    wall seconds, not the work a CPU second buys.

    Raises:
        SystemExit: a calibration run failed, or made fewer than three iterations.
    """
    replaced = ("time_budget", "val_every_seconds", "data_root")
    jobs = []
    for i, reference in enumerate(references):
        options = {k: v for k, v in reference["options"].items() if k not in replaced}
        if getattr(args, "data_root", None):
            options["data_root"] = args.data_root
        options |= {
            "iterations": 10**7,
            "time_budget": CALIBRATION_SECONDS,
            "val_tasks": CALIBRATION_VAL_TASKS,
            "test_tasks": 0,
        }
        jobs.append({"name": f"calibration {i}", "options": options,
                     "run_dir": str(args.runs / f"calib-{i}")})  # fmt: skip
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = list(pool.map(lambda job: run_job(job, args), jobs))
    if any("result" not in r for r in results):
        raise SystemExit("the machine-speed calibration runs failed (see above); fix that first")
    measured = [r.get("median_cpu_seconds_per_iteration") for r in results]
    if None in measured:
        raise SystemExit(
            f"a machine-speed calibration run made fewer than three iterations in "
            f"{CALIBRATION_SECONDS:g} CPU seconds, too few to time; raise CALIBRATION_SECONDS"
        )
    return measured


def speed_key(run: dict[str, Any]) -> str:
    """What a run is calibrated as: its row (final, long, speed), else its method (tuning),
    else its algorithm."""
    return run.get("row") or run.get("method") or run["options"]["algo"]


def scale_to_logged_speed(
    todo: list[dict[str, Any]],
    logged: list[dict[str, Any]],
    args: argparse.Namespace,
    record: Path | None = None,
) -> list[dict[str, Any]]:
    """``todo``'s jobs with the work their budgets bought on the machine of the ``logged`` runs.

    Each row or method of ``todo`` (:func:`speed_key`) is measured against the first logged run
    of the same one, else of the same algorithm (:func:`calibrated_ratios`, which appends what
    it measured to ``record``). Each of its jobs gets ``time_budget`` and ``val_every_seconds``
    × its ratio r, and ``machine_ratio`` r, by which :func:`run_job` divides the run's times
    back (:func:`in_logged_seconds`). Every row is scaled, however close r is to 1, so that no
    row keeps an error that another has corrected. Each row its own ratio, not one
    machine-wide: the methods' ratios between two machines ranged 1.58–2.14 (README).

    Raises:
        SystemExit: a row of ``todo`` has no logged run of its own or of its algorithm, or
            this machine's speed is not steady (:func:`calibrated_ratios`).
    """
    firsts = first_runs(logged)
    references: dict[str, dict[str, Any]] = {}
    for job in todo:
        key = speed_key(job)
        if key in references:
            continue
        algo = job["options"]["algo"]
        reference = firsts.get(key) or next(
            (r for r in firsts.values() if r["options"].get("algo") == algo), None
        )
        if reference is None:
            raise SystemExit(
                f"--scale-budgets: no finished logged run of {key} (or of {algo}) with seconds "
                f"per iteration to measure this machine's speed against; run one on the "
                f"study's machine first, or drop --scale-budgets"
            )
        references[key] = reference
    ratios = calibrated_ratios(references, args, record)
    return [_scaled(job, ratios[speed_key(job)]) for job in todo]


def calibrated_ratios(
    references: dict[str, dict[str, Any]], args: argparse.Namespace, record: Path | None = None
) -> dict[str, float]:
    """Each row's ratio of CPU seconds per iteration here to those of its logged reference run,
    measured beside the other rows as the study's runs go.

    With rows k_0 … k_{n−1} and w = ``--workers``, round i runs k_i, k_{i+1}, …, k_{i+w−1}
    (indices mod n) side by side (:func:`measure_rounds`), so that every row is measured w
    times, each time beside other partners where there are w or more rows (with fewer, a row
    runs beside itself too). With one worker, the n rounds run twice, so that each row is
    still measured twice (alone, n rounds apart). Different partners, as the study's runs have
    them, rather than copies of one run. A row's ratio is the mean of its measurements over its
    logged seconds per iteration (:func:`logged_seconds_per_iteration`). The measurements,
    rows each ran beside, ratios and verdict are appended to ``record``
    (:func:`record_calibration`), refused or not.

    Raises:
        SystemExit: a row's measurements differ by more than :data:`SPEED_AGREEMENT` (every
            such row named): on a machine whose speed moves that much, no scaling gives runs
            the study's work.
    """
    keys = list(references)
    rounds = [
        [keys[(i + j) % len(keys)] for j in range(args.workers)]
        for i in range(len(keys) * (2 if args.workers == 1 else 1))
    ]
    rows = measure_rounds(references, rounds, args)
    unsteady = [
        key
        for key, row in rows.items()
        if max(row["here"]) / min(row["here"]) > 1 + SPEED_AGREEMENT
    ]
    if record is not None:
        record_calibration(record, "scale budgets", rows, unsteady)
    if unsteady:
        raise SystemExit(
            f"--scale-budgets: this machine's speed is not steady: the calibrations of "
            f"{', '.join(unsteady)} beside different runs are more than {SPEED_AGREEMENT:.0%} "
            f"apart (above), so no scaling would give their runs the study's work; run the "
            f"stage on a steadier machine"
        )
    return {key: row["ratio"] for key, row in rows.items()}


def _scaled(job: dict[str, Any], ratio: float) -> dict[str, Any]:
    """``job`` with its budget options × ``ratio`` and ``machine_ratio`` set."""
    options = {**job["options"]}
    for key in ("time_budget", "val_every_seconds"):
        if key in options:
            options[key] = options[key] * ratio
    return {**job, "options": options, "machine_ratio": ratio}


def in_logged_seconds(summary: dict[str, Any], ratio: float) -> dict[str, Any]:
    """A run's summary (:func:`summarise_records`) with its times divided by ``ratio``: in the
    study machine's seconds. Its own curve and seconds per iteration are kept beside them
    (``curve_here``, ``median_seconds_per_iteration_here``,
    ``median_cpu_seconds_per_iteration_here``)."""
    wall, cpu = summary["median_seconds_per_iteration"], summary["median_cpu_seconds_per_iteration"]
    return {
        **summary,
        "curve": [(t / ratio, accuracy) for t, accuracy in summary["curve"]],
        "curve_here": summary["curve"],
        "median_seconds_per_iteration": wall / ratio if wall is not None else None,
        "median_seconds_per_iteration_here": wall,
        "median_cpu_seconds_per_iteration": cpu / ratio if cpu is not None else None,
        "median_cpu_seconds_per_iteration_here": cpu,
        "trajectory": trajectory_in_seconds(summary["trajectory"], ratio),
    }


def trajectory_in_seconds(rows: list[dict[str, Any]], ratio: float) -> list[dict[str, Any]]:
    """:func:`trajectory`'s rows with ``train_cpu_seconds`` divided by ``ratio``."""
    return [
        {**row, "train_cpu_seconds": row["train_cpu_seconds"] / ratio}
        if row.get("train_cpu_seconds") is not None else row
        for row in rows
    ]  # fmt: skip


def run_all(
    jobs: list[dict[str, Any]],
    args: argparse.Namespace,
    log: Path,
    compared_with: Path | None = None,
    scale_against: Path | None = None,
) -> list[dict[str, Any]]:
    """``--workers`` jobs at a time (one thread each). Each finished job is appended to ``log``
    (JSON lines) at once, and a job already there is not run again: a stage that was stopped
    goes on where it was. Before it adds runs to those logged (or, with none yet, to the runs of the
    log ``compared_with``, which its results are read against), :func:`check_machine_speed`.
    With ``--scale-budgets``, :func:`scale_to_logged_speed` instead, against the runs logged,
    then those of ``compared_with``, then those of ``scale_against`` (the stage before, so that
    a new stage starting on another machine still runs in the study machine's seconds); with
    none of them, the jobs run as they are. Either way what was measured is kept in
    ``<log>_calibrations.jsonl``. Each logged run also records the runs that ran beside it,
    at any moment of its run (``beside``), and this machine (``machine``,
    :func:`machine_description`). Returns every logged result, in job order."""
    done = {r["name"]: r for r in read_log(log)}
    todo = [job for job in jobs if job["name"] not in done]
    earlier = read_log(compared_with) if compared_with else []
    record = log.with_name(log.stem + "_calibrations.jsonl")
    if todo and getattr(args, "scale_budgets", False):
        references = [*done.values(), *earlier, *(read_log(scale_against) if scale_against else [])]
        todo = scale_to_logged_speed(todo, references, args, record) if references else todo
    elif todo:
        check_machine_speed(list(done.values()) or earlier, args, record)
    lock = threading.Lock()
    running: set[str] = set()
    beside: dict[str, set[str]] = {}
    machine = machine_description()

    def run_and_log(job: dict[str, Any]) -> None:
        name = job["name"]
        with lock:  # every run records the runs that shared the machine with it
            beside[name] = set(running)
            for other in running:
                beside[other].add(name)
            running.add(name)
        try:
            result = run_job(job, args)
        finally:
            with lock:
                running.discard(name)
        if "result" in result or "failed" in result:
            result = {**result, "beside": sorted(beside[name]), "machine": machine}
            with lock, log.open("a") as handle:
                handle.write(json.dumps(result) + "\n")

    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        list(pool.map(run_and_log, todo))
    done = {r["name"]: r for r in read_log(log)}
    return [done[job["name"]] for job in jobs if job["name"] in done]


def machine_description() -> dict[str, Any]:
    """The machine a run is logged from: its CPU model (Linux's ``/proc/cpuinfo``, else
    :func:`platform.processor`) and core count. Budgets in CPU seconds compare only on one
    kind of machine, and a run's partner changes the work a CPU second buys (for mrml, by
    14–16% between two partners, measured on one machine type only; README)."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        lines = cpuinfo.read_text(errors="replace").splitlines()
        model = next((line.split(":", 1)[1].strip() for line in lines
                      if line.startswith("model name")), model)  # fmt: skip
    return {"cpu": model, "cores": os.cpu_count()}


def read_log(path: Path) -> list[dict[str, Any]]:
    """The results logged so far (a torn last line, from a kill mid-write, is skipped)."""
    if not path.exists():
        return []
    results = []
    for line in path.read_text().splitlines():
        try:
            results.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return results


def interleave(groups: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Round-robin over the methods' job lists, rotating the start each round, so that
    consecutive jobs (which run side by side) pair different methods every round."""
    out, rounds = [], max(len(g) for g in groups)
    for r in range(rounds):
        order = groups[r % len(groups) :] + groups[: r % len(groups)]
        out += [g[r] for g in order if r < len(g)]
    return out


def first_time(curve: list[list[float]], threshold: float) -> float:
    """First training CPU second with validation accuracy ≥ threshold (``inf``: never)."""
    return next((s for s, acc in curve if acc >= threshold), math.inf)


def speed_threshold(final_runs: list[dict[str, Any]]) -> float:
    """The speed target's threshold: 0.9 × mrml's mean best validation accuracy over its
    successful final runs (NaN without any)."""
    best = [r["best_val"] for r in final_runs if r["row"] == "mrml" and "failed" not in r]
    return 0.9 * statistics.mean(best) if best else math.nan


def mrml_seeds(final_runs: list[dict[str, Any]]) -> list[int]:
    """The seeds of mrml's successful final runs, in order."""
    return sorted({r["seed"] for r in final_runs if r["row"] == "mrml" and "failed" not in r})


def validation_spacing(runs: list[dict[str, Any]]) -> float:
    """The CPU seconds between two validations of a stage's runs (0 where none records it)."""
    return next((study_seconds(r, "val_every_seconds") for r in runs if "options" in r), 0.0)


def study_seconds(run: dict[str, Any], key: str) -> float:
    """A logged run's budget option ``key`` (``time_budget``, ``val_every_seconds``) in the
    study machine's seconds: a run scaled to another machine's speed logs the seconds it ran
    there (:func:`scale_to_logged_speed`)."""
    return run["options"][key] / run.get("machine_ratio", 1.0)


def undecided_rows(final_runs: list[dict[str, Any]], spacing: float) -> list[str]:
    """The baselines whose mean time to the speed threshold (:func:`speed_threshold`) in the
    final stage is within ``spacing`` CPU seconds (one validation spacing) of mrml's: a pair
    the final stage's validation grid cannot order. Rows that never reach it count ``inf``."""
    threshold = speed_threshold(final_runs)
    times: dict[str, list[float]] = {}
    for run in final_runs:
        if "failed" not in run and (run["row"] == "mrml" or run["row"] in BASELINES):
            times.setdefault(run["row"], []).append(first_time(run["curve"], threshold))
    if "mrml" not in times or math.isnan(threshold):
        return []
    mrml = statistics.mean(times["mrml"])
    return [
        row
        for row, values in times.items()
        if row != "mrml" and abs(statistics.mean(values) - mrml) <= spacing
    ]


def _setting(args: argparse.Namespace) -> str:
    return f"{args.ways}way{args.shots}shot"


def _grid_flag(args: argparse.Namespace) -> str:
    """`` --grid NAME`` for a study other than the first, else nothing (for messages)."""
    return "" if args.grid == FIRST_GRID else f" --grid {args.grid}"


def _study(args: argparse.Namespace) -> str:
    """The setting and the tuning grid: the name of a study's results files and run folders
    (the first grid's have the setting's name alone)."""
    return _setting(args) + ("" if args.grid == FIRST_GRID else f"_grid{args.grid}")


def _stage_file(stage: str, args: argparse.Namespace, suffix: str = ".json") -> Path:
    """A stage's results file in the study of ``args``: ``fair_<stage>_<study><suffix>``
    (``.jsonl``: the log of its finished runs)."""
    return RESULTS / f"fair_{stage}_{_study(args)}{suffix}"


def _write_stage(
    stage: str, args: argparse.Namespace, fields: dict[str, Any], command: str | None = None
) -> Path:
    """Write a finished stage's results file: its setting and grid, ``fields``, and the
    command that ran it (``command``, or this process's)."""
    path = _stage_file(stage, args)
    out = {"setting": _setting(args), "grid": args.grid, **fields}
    path.write_text(json.dumps({**out, "command": command or " ".join(sys.argv)}, indent=1) + "\n")
    return path


def tune(args: argparse.Namespace) -> None:
    """Stage 1: every method's grid at seed 0, scored on validation only."""
    groups = []
    for method in args.methods:
        jobs = []
        for i, config in enumerate(GRIDS[args.grid][method]):
            options = {
                **_common(args),
                "algo": method,
                "seed": 0,
                **config,
                "time_budget": args.tune_budget,
                "val_every_seconds": args.tune_budget / args.tune_validations,
                "test_tasks": 0,
            }
            run_dir = args.runs / f"tune-{_study(args)}-{method}-{i}"
            jobs.append(
                {
                    "name": f"tune {method} #{i} {config}",
                    "method": method,
                    "config": config,
                    "options": options,
                    "run_dir": str(run_dir),
                }
            )
        groups.append(jobs)
    results = run_all(interleave(groups), args, _stage_file("tuning", args, ".jsonl"))
    selected = {}
    for method in args.methods:
        mine = [r for r in results if r["method"] == method and "failed" not in r]
        best = max(mine, key=lambda r: r["best_val"])
        selected[method] = best["config"]
    fields = {
        "budget_cpu_seconds": args.tune_budget,
        "val_tasks": args.val_tasks,
        "grids": {m: GRIDS[args.grid][m] for m in args.methods},
        "runs": results,
        "selected": selected,
    }
    path = _write_stage("tuning", args, fields)
    print(f"selected: {json.dumps(selected)}\nwrote {path}")


def final(args: argparse.Namespace) -> None:
    """Stage 2: the selected configurations (and extra rows) over seeds, tested once."""
    tuning = json.loads(_stage_file("tuning", args).read_text())
    rows = [(m, m, tuning["selected"][m]) for m in args.methods if m in tuning["selected"]]
    for name, base, changes in EXTRA_ROWS:
        if name in args.extra_rows:
            config = {} if base == "paper" else dict(tuning["selected"][base])
            rows.append((name, base if base != "paper" else "mrml", {**config, **changes}))
    groups = []
    for name, algo, config in rows:
        jobs = []
        for seed in range(args.seeds):
            run_dir = args.runs / f"final-{_study(args)}-{name}-seed{seed}"
            jobs.append(_job("final", name, algo, seed, config, args.budget, run_dir, args))
        groups.append(jobs)
    results = run_all(
        interleave(groups),
        args,
        _stage_file("final", args, ".jsonl"),
        scale_against=_stage_file("tuning", args, ".jsonl"),
    )
    fields = {
        "budget_cpu_seconds": args.budget,
        "seeds": args.seeds,
        "test_tasks": args.test_tasks,
        "runs": results,
    }
    print(f"wrote {_write_stage('final', args, fields)}")


def best_baselines(final_runs: list[dict[str, Any]], count: int) -> list[str]:
    """The ``count`` baselines with the highest mean best-validation accuracy over their final
    runs: chosen on the validation split, never on test."""
    scores: dict[str, list[float]] = {}
    for run in final_runs:
        if "failed" not in run and run["row"] in BASELINES:
            scores.setdefault(run["row"], []).append(run["best_val"])
    ranked = sorted(scores, key=lambda row: statistics.mean(scores[row]), reverse=True)
    return ranked[:count]


def long(args: argparse.Namespace) -> None:
    """Stage 4: long runs (``--long-budget`` seconds, seeds ``0 .. --long-seeds − 1``) of mrml
    and of the ``--long-baselines`` (default two) baselines with the best validation accuracy in
    the final stage, each tested once. ``--long-rows`` runs only those of the chosen rows.
    Asking for more baselines or seeds later adds them to the same log; the file lists every
    logged run (those of this call first) and every command that wrote it. Seed 0's run folder
    keeps the seedless name it had when the stage ran one seed."""
    tuning = json.loads(_stage_file("tuning", args).read_text())
    final_runs = read_log(_stage_file("final", args, ".jsonl"))
    baselines = best_baselines(final_runs, args.long_baselines)
    if len(baselines) < args.long_baselines:
        raise SystemExit(
            f"long: the final stage's log holds {len(baselines)} baselines with results; run "
            f"'final --ways {args.ways}{_grid_flag(args)}' first (the long rows are chosen on "
            "its validation)"
        )
    chosen = ["mrml", *baselines]
    only = args.long_rows or chosen
    if unknown := [name for name in only if name not in chosen]:
        raise SystemExit(
            f"long: --long-rows {' '.join(unknown)} is not among this setting's long rows "
            f"({', '.join(chosen)}); pick from those"
        )
    jobs = []
    for seed in range(args.long_seeds):
        for name in chosen:
            # seed 0's folder keeps the name it had when the stage ran one seed
            folder = f"long-{_study(args)}-{name}" + (f"-seed{seed}" if seed else "")
            config, budget = tuning["selected"][name], args.long_budget
            jobs.append(_job("long", name, name, seed, config, budget, args.runs / folder, args))
    log = _stage_file("long", args, ".jsonl")
    run_all(
        [job for job in jobs if job["row"] in only],
        args,
        log,
        scale_against=_stage_file("final", args, ".jsonl"),
    )
    logged = {r["name"]: r for r in read_log(log)}
    asked = [logged.pop(job["name"]) for job in jobs if job["name"] in logged]
    # runs of earlier calls with more seeds or baselines stay in the file
    results = asked + sorted(logged.values(), key=lambda r: (r["row"], r["seed"]))
    path = _stage_file("long", args)
    earlier = json.loads(path.read_text()).get("command", "") if path.exists() else ""
    command = " ".join(sys.argv)
    commands = [c for c in earlier.split("; ") if c and c != command] + [command]
    fields = {
        "budget_cpu_seconds": args.long_budget,
        "chosen_by": "mean best validation accuracy of the final stage",
        "baselines": baselines,
        "test_tasks": args.test_tasks,
        "runs": results,
    }
    print(f"wrote {_write_stage('long', args, fields, '; '.join(commands))}")


def speed_budget(
    final_runs: list[dict[str, Any]], rows: list[str], final_spacing: float, spacing: float
) -> float:
    """The speed stage's budget: the latest time at which a final run of ``rows`` first reached
    the threshold, plus one final spacing, rounded up to a whole number of ``spacing``s, so that
    no rerun is cut off before the point where its final run had reached it."""
    threshold = speed_threshold(final_runs)
    reached = [
        t
        for r in final_runs
        if r["row"] in rows and "failed" not in r
        if math.isfinite(t := first_time(r["curve"], threshold))
    ]
    latest = max(reached, default=0.0) + final_spacing
    return spacing * math.ceil(latest / spacing)


def speed(args: argparse.Namespace) -> None:
    """Stage 5: mrml and the baselines the finished final stage cannot order in speed
    (:func:`undecided_rows`), at their selected settings and the final stage's seeds, for
    :func:`speed_budget` CPU seconds validated every ``--speed-spacing`` seconds. Validation
    only: the test split is not read. The report takes those rows' speed target from here."""
    final_path = _stage_file("final", args)
    if not final_path.exists():
        raise SystemExit(
            f"speed: the final stage has not finished ({final_path.name} is missing); run "
            f"'final --ways {args.ways}{_grid_flag(args)}' to the end first (the speed stage "
            "refines its times to 0.9 × mrml's best validation)"
        )
    final_runs = json.loads(final_path.read_text())["runs"]
    tuning = json.loads(_stage_file("tuning", args).read_text())
    final_spacing = validation_spacing(final_runs)
    rows = undecided_rows(final_runs, final_spacing)
    if not rows:
        print(f"speed: every baseline is more than {final_spacing:g} s from mrml; nothing to do")
        return
    seeds = mrml_seeds(final_runs)
    budget = speed_budget(final_runs, ["mrml", *rows], final_spacing, args.speed_spacing)
    validations = round(budget / args.speed_spacing)
    label = f"speed ({budget:g} s, every {args.speed_spacing:g} s)"  # resumes only the same runs
    groups = []
    for name in ["mrml", *rows]:
        jobs = []
        for seed in seeds:
            run_dir = args.runs / f"speed-{_study(args)}-{name}-seed{seed}"
            config = tuning["selected"][name]
            jobs.append(
                _job(
                    label, name, name, seed, config, budget, run_dir, args,
                    validations=validations, test=False,
                )
            )  # fmt: skip
        groups.append(jobs)
    results = run_all(
        interleave(groups),
        args,
        _stage_file("speed", args, ".jsonl"),
        compared_with=_stage_file("final", args, ".jsonl"),
    )
    fields = {
        "chosen_by": "mean time to the threshold within one validation spacing of mrml's, in "
        "the final stage",
        "budget_cpu_seconds": budget,
        "val_every_seconds": budget / validations,
        "final_val_every_seconds": final_spacing,
        "threshold": speed_threshold(final_runs),
        "rows": ["mrml", *rows],
        "seeds": seeds,
        "runs": results,
    }
    print(f"wrote {_write_stage('speed', args, fields)}")


def _job(
    stage: str,
    row: str,
    algo: str,
    seed: int,
    config: dict[str, Any],
    budget: float,
    run_dir: Path,
    args: argparse.Namespace,
    *,
    validations: int | None = None,
    test: bool = True,
) -> dict[str, Any]:
    """One training run of a stage: ``row`` (method ``algo`` at ``config``) at ``seed`` for
    ``budget`` CPU seconds, validated ``validations`` times (default ``--validations``), and
    tested under both protocols (``test``) or not at all."""
    options = {
        **_common(args),
        "algo": algo,
        **config,
        "seed": seed,
        "time_budget": budget,
        "val_every_seconds": budget / (validations or args.validations),
        "test_tasks": args.test_tasks if test else 0,
    }
    return {
        "frozen_backbone_test": test,
        "name": f"{stage} {row} seed {seed}",
        "row": row,
        "seed": seed,
        "config": config,
        "options": options,
        "run_dir": str(run_dir),
    }


def frozen_backbone_test(run_dir: Path, args: argparse.Namespace) -> dict[str, Any] | None:
    """The paper's protocol on the same best-validation checkpoint (``mrmeta eval``)."""
    command = [
        sys.executable,
        "-m",
        "mrmeta",
        "eval",
        "--run",
        str(run_dir),
        "--protocol",
        "frozen-backbone",
        "--tasks",
        str(args.test_tasks),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"failed": done.stderr.strip()[-400:]}
    return {"stdout": done.stdout.strip().splitlines()[-1]}


class Stopwatch:
    """The seconds spent inside the callables it wrapped (:meth:`wrap`), all together."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started

        return timed


def cost_rounds(
    learners: dict[str, tuple[Any, Any]], batches: list[Any], rounds: int, head_watch: Stopwatch
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per round, each learner's seconds per meta-iteration over ``batches`` (the order
    reversed every other round), and for every learner but ANIL the seconds per iteration
    ``head_watch`` counted meanwhile."""
    times: dict[str, list[float]] = {a: [] for a in learners}
    head_times: dict[str, list[float]] = {a: [] for a in learners if a != "anil"}
    for r in range(rounds):
        order = list(learners) if r % 2 == 0 else list(reversed(learners))
        for algo in order:
            learner, optimizer = learners[algo]
            head_before = head_watch.seconds
            started = time.perf_counter()
            for batch in batches:
                learner.meta_step(batch, optimizer)
            times[algo].append((time.perf_counter() - started) / len(batches))
            if algo in head_times:
                head_times[algo].append((head_watch.seconds - head_before) / len(batches))
    return times, head_times


def cost(args: argparse.Namespace) -> None:
    """Stage 3: s/it of mrml and ANIL at their defaults (or both at ``--cost-chunk-size``),
    interleaved, paired ratios; and
    mrml's head work per iteration (its lower-level solves and hypergradients, timed inside
    the same rounds)."""
    import torch

    from mrmeta._factory import build_learner, build_model, build_optimizer
    from mrmeta.algorithms import memory_reduced
    from mrmeta.config import TrainConfig
    from mrmeta.data import TaskSampler, load_dataset

    torch.set_num_threads(1)
    train_split = load_dataset("omniglot", "train", root=args.data_root)
    learners = {}
    variants = {"mrml": {"algo": "mrml"}, "anil": {"algo": "anil"}}
    if args.cost_cg_v:
        variants["mrml-cg-v"] = {"algo": "mrml", "exact_v": False}
    chunking = {} if args.cost_chunk_size is None else {"chunk_size": args.cost_chunk_size}
    for name, changes in variants.items():
        config = TrainConfig.from_dict(
            {"ways": args.ways, "shots": args.shots, "queries": args.queries, **changes, **chunking}
        )
        torch.manual_seed(0)
        model = build_model(config, tuple(train_split.images.shape[-3:]))
        learner = build_learner(config, model)
        learners[name] = (learner, build_optimizer(config, learner))
    # mrml's head work: its solve (an instance attribute over the method) and the module's
    # hypergradient function, which only the mrml learners call.
    # Restored afterwards, so that nothing else in the process is timed.
    head_watch = Stopwatch()
    hypergradient = memory_reduced.head_hypergradient
    memory_reduced.head_hypergradient = head_watch.wrap(hypergradient)
    for name, (learner, _) in learners.items():
        if name != "anil":
            learner.solve = head_watch.wrap(learner.solve)  # type: ignore[method-assign]
    sampler = TaskSampler(train_split, args.ways, args.shots, args.queries, seed=0)
    batches = [sampler.sample(args.meta_batch) for _ in range(args.cost_iterations)]
    try:
        times, head_times = cost_rounds(learners, batches, args.cost_rounds, head_watch)
    finally:
        memory_reduced.head_hypergradient = hypergradient
        for learner, _ in learners.values():
            learner.__dict__.pop("solve", None)
    ratios = [m / a for m, a in zip(times["mrml"], times["anil"], strict=True)]
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    rest = [
        (m - h) / a
        for m, h, a in zip(times["mrml"], head_times["mrml"], times["anil"], strict=True)
    ]
    out = {
        "setting": _setting(args),
        "rounds": args.cost_rounds,
        "iterations_per_round": args.cost_iterations,
        "seconds_per_iteration": times,
        "ratio_median": statistics.median(ratios),
        "ratio_quartiles": [q[0], q[2]],
        "mrml_head_seconds_per_iteration": head_times,
        "mrml_head_share_median": statistics.median(
            h / m for h, m in zip(head_times["mrml"], times["mrml"], strict=True)
        ),
        "mrml_without_head_ratio_median": statistics.median(rest),
        "meta_batch": args.meta_batch,
        "chunk_size": learners["mrml"][0].options.chunk_size,
        "command": " ".join(sys.argv),
    }
    if args.cost_cg_v:
        cg = [m / a for m, a in zip(times["mrml-cg-v"], times["anil"], strict=True)]
        out["cg_v_ratio_median"] = statistics.median(cg)
        print(f"mrml with v from N CG steps / ANIL s/it: median {statistics.median(cg):.3f}")
    # Another chunk size than the default is a side measurement: it does not replace the file
    # the report's cost target reads.
    suffix = "" if args.cost_chunk_size is None else f"_chunk{args.cost_chunk_size}"
    path = RESULTS / f"fair_cost_{_setting(args)}{suffix}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(
        f"mrml / ANIL s/it: median {out['ratio_median']:.3f} "
        f"(quartiles {q[0]:.3f}-{q[2]:.3f}); mrml's head work "
        f"{out['mrml_head_share_median']:.1%} of its iteration; mrml without it / ANIL: "
        f"median {out['mrml_without_head_ratio_median']:.3f}; wrote {path}"
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive whole number")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=("tune", "final", "long", "speed", "cost", "report"))
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=None)
    parser.add_argument("--meta-batch", type=int, default=16)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument(
        "--grid",
        choices=list(GRIDS),
        default=FIRST_GRID,
        help="tune, final, long, report: the tuning grid whose study this is (results files "
        "fair_<stage>_<setting>_grid<name>.json*, except 2x2's: fair_<stage>_<setting>.json*)",
    )
    parser.add_argument("--extra-rows", nargs="*", default=[n for n, _, _ in EXTRA_ROWS])
    parser.add_argument("--tune-budget", type=float, default=90.0)
    parser.add_argument("--tune-validations", type=int, default=6)
    parser.add_argument("--budget", type=float, default=600.0)
    parser.add_argument("--long-budget", type=float, default=3600.0)
    parser.add_argument("--long-baselines", type=int, default=2)
    parser.add_argument("--long-seeds", type=int, default=1)
    parser.add_argument("--long-rows", nargs="+", default=None)
    parser.add_argument("--validations", type=int, default=30)
    parser.add_argument(
        "--speed-spacing",
        type=float,
        default=4.0,
        help="speed: CPU seconds of training between two validations",
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--val-tasks", type=int, default=200)
    parser.add_argument("--test-tasks", type=int, default=600)
    parser.add_argument("--workers", type=_positive_int, default=2)
    parser.add_argument(
        "--scale-budgets",
        action="store_true",
        help="tune, final, long, speed: on a machine of another speed than the stage's logged "
        "runs, give each new run the work its budget bought there (CPU seconds × its row's "
        "measured speed ratio) instead of refusing; its times are logged in the study's seconds",
    )
    parser.add_argument("--cost-rounds", type=int, default=7)
    parser.add_argument("--cost-iterations", type=int, default=5)
    parser.add_argument(
        "--cost-cg-v", action="store_true", help="cost: also mrml with v from N CG steps"
    )
    parser.add_argument(
        "--cost-chunk-size",
        type=lambda text: text if text == "all" else int(text),
        default=None,
        help="cost: both methods at this chunk size (a number or 'all') instead of the default; "
        "written to fair_cost_<setting>_chunk<size>.json",
    )
    parser.add_argument("--runs", type=Path, default=Path("runs/fair"))
    args = parser.parse_args()
    if args.queries is None:  # 20-way: 5 queries per class, so an iteration costs about the same
        args.queries = 15 if args.ways <= 5 else 5
    args.runs.mkdir(parents=True, exist_ok=True)
    if args.stage == "report":
        from fair_report import report  # noqa: PLC0415 - the report needs matplotlib

        report(args)
        return
    stages = {"tune": tune, "final": final, "long": long, "speed": speed, "cost": cost}
    stages[args.stage](args)


if __name__ == "__main__":
    main()
