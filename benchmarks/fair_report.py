"""The report of ``fair_comparison.py``: tables, targets with their margins, learning curves.

Reads ``fair_{tuning,final,long,speed}_<study>.json`` (for a stage that is still running, its
``.jsonl`` log) and ``fair_cost_<setting>.json`` from benchmarks/results/, and writes
``fair_<study>.md`` (and ``.png`` when matplotlib is installed); the study is the setting and
the tuning grid (``fair_comparison._study``). Every number comes from those files; a target
that is missed is printed with its margin.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fair_comparison import (
    BASELINES,
    MACHINE_SPEED_TOLERANCE,
    _grid_flag,
    _setting,
    _study,
    first_time,
    mrml_seeds,
    read_log,
    speed_key,
    speed_threshold,
    study_seconds,
    undecided_rows,
    validation_spacing,
)

RESULTS = Path(__file__).resolve().parent / "results"
SOLVE_TARGET = 1e-4
MAML_GAP_TARGET = 0.03  # iMAML and first-order MAML within 3 points of MAML's mean test accuracy


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def _frozen(run: dict[str, Any]) -> float | None:
    """The frozen-backbone test accuracy (a fraction) from ``mrmeta eval``'s result line."""
    line = (run.get("frozen_backbone") or {}).get("stdout", "")
    match = re.search(r"([0-9.]+)% ±", line)
    return float(match.group(1)) / 100 if match else None


def rows_of(final: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Successful final runs grouped by row name, in order of appearance."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for run in final["runs"]:
        if "failed" not in run:
            rows.setdefault(run["row"], []).append(run)
    return rows


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise_row(runs: list[dict[str, Any]], threshold: float) -> dict[str, Any]:
    tests = [r["result"]["test_accuracy"] for r in runs]
    frozen = [f for r in runs if (f := _frozen(r)) is not None]
    times = [first_time(r["curve"], threshold) for r in runs]
    return {
        "seeds": len(runs),
        "test": _mean_std(tests),
        "test_ci95": [r["result"]["test_ci95"] for r in runs],
        "frozen": _mean_std(frozen) if frozen else None,
        "best_val": _mean_std([r["best_val"] for r in runs]),
        "time_to_threshold": times,
        "mean_time": statistics.mean(times),
        "iterations": statistics.mean(r["iterations"] for r in runs),
        "inner_grad_norm_max": max(
            (r["inner_grad_norm_max"] for r in runs if r["inner_grad_norm_max"] is not None),
            default=None,
        ),
        "inner_iterations_mean": _mean_or_none([r["inner_iterations_mean"] for r in runs]),
        "config": runs[0]["config"],
    }


def _mean_or_none(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.mean(kept) if kept else None


@dataclass(frozen=True)
class DenseSpeed:
    """The finished speed stage's times to the threshold: ``times[row][seed]`` (``inf``:
    never within its budget), validated every ``spacing`` CPU seconds; ``rows`` are the
    baselines it refines (mrml is in ``times`` too)."""

    times: dict[str, dict[int, float]]
    spacing: float
    rows: list[str]

    def paired(self, row: str) -> tuple[float, float] | None:
        """mrml's and ``row``'s mean times over the seeds both ran, or ``None`` where there
        is no such seed or one of those runs was cut off before the threshold (the final
        stage's verdict then stands)."""
        mine, theirs = self.times.get("mrml", {}), self.times.get(row, {})
        seeds = sorted(set(mine) & set(theirs))
        pairs = [(mine[s], theirs[s]) for s in seeds]
        if not pairs or not all(math.isfinite(t) for pair in pairs for t in pair):
            return None
        return statistics.mean(m for m, _ in pairs), statistics.mean(t for _, t in pairs)


def dense_speed(speed: dict[str, Any], final: dict[str, Any], threshold: float) -> DenseSpeed:
    """:class:`DenseSpeed` of the speed stage's successful runs at the final stage's
    ``threshold``.

    Raises:
        ValueError: the speed stage was run on other final results (its threshold, seeds or
            rows are not what the finished final stage gives now).
    """
    rows = undecided_rows(final["runs"], validation_spacing(final["runs"]))
    if (
        not math.isclose(speed["threshold"], threshold)
        or speed["seeds"] != mrml_seeds(final["runs"])
        or speed["rows"] != ["mrml", *rows]
    ):
        raise ValueError(
            "the speed stage's file was made from other final results (threshold, seeds or "
            "rows differ): not used; run 'speed' again"
        )
    times: dict[str, dict[int, float]] = {}
    for run in speed["runs"]:
        if "failed" not in run:
            times.setdefault(run["row"], {})[run["seed"]] = first_time(run["curve"], threshold)
    return DenseSpeed(times, speed["val_every_seconds"], rows)


def _refinement(
    speed: dict[str, Any] | None, final: dict[str, Any], threshold: float
) -> tuple[DenseSpeed | None, str | None]:
    """The speed stage's times where they belong to this finished final stage, else why not
    (``None, None`` without a speed stage or while the final stage runs)."""
    if speed is None or final.get("partial"):
        return None, None
    try:
        return dense_speed(speed, final, threshold), None
    except ValueError as err:
        return None, str(err)


def speed_markdown(speed: dict[str, Any], dense: DenseSpeed) -> list[str]:
    """The speed stage's table: each row's CPU seconds to the threshold, per seed."""
    out = [
        f"## Speed to accuracy, validated every {dense.spacing:g} s of training",
        "",
        f"Command: `{speed['command']}`; mrml and the baselines whose mean time to the "
        "threshold, in the final stage, was within one validation spacing of mrml's, again at "
        f"the same settings and seeds, for {speed['budget_cpu_seconds']:g} CPU seconds (just "
        "past the latest time their final runs had reached it); validation only.",
        "",
        "| row | seed | CPU s to threshold |",
        "|---|---|---|",
    ]
    _note_scaled_budgets(out, speed["runs"])
    for row, times in dense.times.items():
        out += [f"| {row} | {seed} | {_secs(t)} |" for seed, t in sorted(times.items())]
    return out


def targets(
    summary: dict[str, dict[str, Any]],
    cost: dict[str, Any] | None,
    spacing: float = 0.0,
    dense: DenseSpeed | None = None,
) -> list[str]:
    """The issue's targets, each with whether it holds and its margin. ``spacing``: the CPU
    seconds between validations; times to the threshold that differ by no more than that are
    a tie (the validation grid, not the method, would decide the order). ``dense``: the speed
    stage's times (:func:`dense_speed`), which replace the final stage's for the baselines it
    refines, over the seeds both rows ran there."""
    mrml = summary.get("mrml")
    if mrml is None:
        return ["mrml has no final runs yet: no target can be checked"]
    baselines = {k: v for k, v in summary.items() if k in BASELINES}
    lines = []
    for name, row in baselines.items():
        gap = mrml["test"][0] - row["test"][0]
        need = max(mrml["test"][1], row["test"][1])
        verdict = "holds" if gap > need else ("tie" if abs(gap) <= need else "missed")
        lines.append(
            f"accuracy vs {name}: mrml {100 * mrml['test'][0]:.2f}% − {100 * row['test'][0]:.2f}% "
            f"= {100 * gap:+.2f} points, needs > {100 * need:.2f} (larger seed std): {verdict}"
        )
    lines += [speed_line(name, mrml, row, spacing, dense) for name, row in baselines.items()]
    for name in ("fomaml", "imaml"):
        if name in baselines and "maml" in baselines:
            gap = baselines["maml"]["test"][0] - baselines[name]["test"][0]
            verdict = (
                "holds"
                if gap <= MAML_GAP_TARGET
                else f"missed by {100 * (gap - MAML_GAP_TARGET):.2f} points"
            )
            lines.append(
                f"{name} within {100 * MAML_GAP_TARGET:.0f} points of maml: "
                f"{100 * baselines[name]['test'][0]:.2f}% against "
                f"{100 * baselines['maml']['test'][0]:.2f}% ({100 * -gap:+.2f} points): {verdict}"
            )
    norm = mrml["inner_grad_norm_max"]
    if norm is not None:
        verdict = "holds" if norm <= SOLVE_TARGET else f"missed by {norm / SOLVE_TARGET:.1f}×"
        lines.append(
            f"solve quality: largest ‖∇φ g‖ over every mrml iteration and seed {norm:.2e} "
            f"(target ≤ {SOLVE_TARGET:.0e}): {verdict}"
        )
    if cost is not None:
        lines.append(cost_line(cost))
    return lines


def speed_line(
    name: str,
    mrml: dict[str, Any],
    row: dict[str, Any],
    spacing: float,
    dense: DenseSpeed | None,
) -> str:
    """The speed target against baseline ``name``: the final stage's mean times (``spacing``
    apart), or the speed stage's where it refines this baseline (see :func:`targets`)."""
    ours, theirs, grid, source = mrml["mean_time"], row["mean_time"], spacing, ""
    if dense is not None and name in dense.rows:
        if (pair := dense.paired(name)) is None:
            source = " (the speed stage cut a run off before the threshold: final stage's)"
        else:
            (ours, theirs), grid = pair, dense.spacing
            source = f" (speed stage, validated every {grid:g} s)"
    gap = theirs - ours  # inf - inf (neither reached it) is nan
    if math.isnan(gap) or abs(gap) <= grid:
        verdict = "tie" + (f" (within the {grid:g} s validation spacing)" if grid else "")
    else:
        verdict = "holds" if gap > 0 else "missed"
    return (
        f"speed to 0.9 × mrml's best validation vs {name}: mrml {_secs(ours)} "
        f"against {_secs(theirs)} (mean over seeds){source}: {verdict}"
    )


def _secs(value: float) -> str:
    return "never" if math.isinf(value) else f"{value:.0f} s"


def _pct(pair: tuple[float, float] | None) -> str:
    return "—" if pair is None else f"{100 * pair[0]:.2f}% ± {100 * pair[1]:.2f}%"


def tuning_markdown(tuning: dict[str, Any]) -> list[str]:
    """The tuning table: every configuration tried, its validation score, the selection."""
    out = [
        "## Tuning (validation split only)",
        "",
        f"Command: `{tuning['command']}`; {tuning['budget_cpu_seconds']:.0f} CPU seconds "
        f"per configuration, seed 0, best validation accuracy on {tuning['val_tasks']} "
        "validation tasks; the test split is not read.",
        "",
        "| method | configuration | iterations | best val |",
        "|---|---|---|---|",
    ]
    _note_scaled_budgets(out, tuning["runs"])
    if tuning.get("partial"):
        out[2:2] = [
            f"**Partial**: {len(tuning['runs'])} configurations run so far; nothing is "
            "selected until every one has.",
            "",
        ]
    for run in tuning["runs"]:
        best = "failed" if "failed" in run else f"{100 * run['best_val']:.2f}%"
        chosen = " (selected)" if tuning["selected"].get(run["method"]) == run["config"] else ""
        out.append(
            f"| {run['method']} | `{json.dumps(run['config'])}`{chosen} | "
            f"{run.get('iterations', '—')} | {best} |"
        )
    return out


def cost_line(cost: dict[str, Any]) -> str:
    """The cost target's line; with mrml's head work where the cost stage measured it."""
    ratio, (q1, q3) = cost["ratio_median"], cost["ratio_quartiles"]
    verdict = "holds" if ratio <= 1 else f"missed by {100 * (ratio - 1):.1f}%"
    head = ""
    if "mrml_head_share_median" in cost:
        head = (
            f"; mrml's head work (solve and hypergradient) {cost['mrml_head_share_median']:.1%}"
            f" of its iteration, mrml without it / ANIL "
            f"{cost['mrml_without_head_ratio_median']:.3f}"
        )
    return (
        f"cost per iteration: mrml / ANIL s/it median of paired ratios {ratio:.3f} "
        f"(quartiles {q1:.3f}–{q3:.3f}, {cost['rounds']} rounds{head}; target ≤ 1): {verdict}"
    )


def _chosen_baselines(long: dict[str, Any]) -> str:
    """The words for the baselines the long stage ran besides mrml: "the baseline" or "the N
    baselines"."""
    rows = dict.fromkeys(r["row"] for r in long["runs"] if r["row"] != "mrml")
    baselines = long.get("baselines", list(rows))
    return "the baseline" if len(baselines) == 1 else f"the {len(baselines)} baselines"


def long_markdown(long: dict[str, Any]) -> list[str]:
    """The long-budget runs, each tested once under both protocols, one line per seed; a row
    with several seeds gets a line of mean ± standard deviation over its seeds."""
    hours = long["budget_cpu_seconds"] / 3600
    seeds = sorted({run.get("seed", 0) for run in long["runs"]})
    which = "seed 0" if seeds == [0] else "seeds " + ", ".join(map(str, seeds))
    by_row: dict[str, list[dict[str, Any]]] = {}
    for run in long["runs"]:
        by_row.setdefault(run["row"], []).append(run)
    several = any(sum("failed" not in r for r in runs) > 1 for runs in by_row.values())
    out = [
        f"## Long budget ({hours:g} h of training CPU time, {which})",
        "",
        f"Command: `{long['command']}`; besides mrml, {_chosen_baselines(long)} with the best "
        "mean validation accuracy in the final stage. 95% CI over the test tasks"
        + ("; a row with several seeds adds their mean ± standard deviation." if several else "."),
        "",
        "| row | seed | iterations | best val | test, native | test, frozen backbone |",
        "|---|---|---|---|---|---|",
    ]
    _note_scaled_budgets(out, long["runs"])
    for row, runs in by_row.items():
        for run in sorted(runs, key=lambda r: r.get("seed", 0)):
            seed = run.get("seed", 0)
            if "failed" in run:
                out.append(f"| {row} | {seed} | failed | — | — | — |")
                continue
            result, frozen = run["result"], _frozen(run)
            test = f"{100 * result['test_accuracy']:.2f}% ± {100 * result['test_ci95']:.2f}%"
            out.append(
                f"| {row} | {seed} | {run['iterations']} | {100 * run['best_val']:.2f}% | {test} | "
                f"{'—' if frozen is None else f'{100 * frozen:.2f}%'} |"
            )
        if len(done := [r for r in runs if "failed" not in r]) > 1:
            out.append(_long_mean_line(row, done))
    return out


def _long_mean_line(row: str, runs: list[dict[str, Any]]) -> str:
    """Mean ± standard deviation over a long row's seeds (frozen only if every seed has it)."""
    vals = _mean_std([r["best_val"] for r in runs])
    tests = _mean_std([r["result"]["test_accuracy"] for r in runs])
    frozen = [f for r in runs if (f := _frozen(r)) is not None]
    frozen_text = "—"
    if len(frozen) == len(runs):
        mean, std = _mean_std(frozen)
        frozen_text = f"{100 * mean:.2f}% ± {100 * std:.2f}%"
    return (
        f"| {row}, mean ± std over {len(runs)} seeds | | "
        f"{statistics.mean(r['iterations'] for r in runs):.0f} | "
        f"{100 * vals[0]:.2f}% ± {100 * vals[1]:.2f}% | "
        f"{100 * tests[0]:.2f}% ± {100 * tests[1]:.2f}% | {frozen_text} |"
    )


def markdown(
    setting: str,
    tuning: dict | None,
    final: dict | None,
    cost: dict | None,
    long: dict | None = None,
    speed: dict | None = None,
) -> str:
    if final is None:
        out = [f"# Fair comparison, Omniglot {setting} (Lake split): tuning", ""]
        out += ["The final stage (seeds, test) has not been run yet.", ""]
        if cost is not None:
            out += [f"- {cost_line(cost)}", ""]
        return "\n".join(out + (tuning_markdown(tuning) if tuning else [])) + "\n"
    rows = rows_of(final)
    threshold = speed_threshold(final["runs"])
    summary = {name: summarise_row(runs, threshold) for name, runs in rows.items()}
    out = [f"# Fair comparison, Omniglot {setting} (Lake split)", ""]
    if final.get("partial"):
        out += [
            f"**Partial**: {len(final['runs'])} runs logged so far; the stage has not finished, "
            "and rows with fewer seeds are not comparable yet.",
            "",
        ]
    out += [f"Command: `{final['command']}`", ""]
    out += [
        f"{final['seeds']} seeds per row, {final['budget_cpu_seconds']:.0f} CPU seconds of "
        f"training per run (one thread each, two runs at a time), test on "
        f"{final['test_tasks']} tasks with the best-validation checkpoint. Threshold for the "
        f"speed target: 0.9 × mrml's mean best validation accuracy = {100 * threshold:.2f}%.",
        "",
        "| row | configuration (tuned on validation) | iterations | best val | test, native "
        "(mean ± std over seeds) | per-seed 95% CI | test, frozen backbone | CPU s to threshold |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in summary.items():
        cis = ", ".join(f"±{100 * c:.2f}" for c in row["test_ci95"])
        times = ", ".join(_secs(t) for t in row["time_to_threshold"])
        out.append(
            f"| {name} | `{json.dumps(row['config'])}` | {row['iterations']:.0f} | "
            f"{_pct(row['best_val'])} | {_pct(row['test'])} | {cis} | {_pct(row['frozen'])} | "
            f"{times} |"
        )
    spacing = validation_spacing(final["runs"])
    dense, stale = _refinement(speed, final, threshold)
    lines = targets(summary, cost, spacing, dense)
    out += ["", "Targets:", ""] + [f"- {line}" for line in lines]
    if stale:
        out += ["", f"Speed stage: {stale}."]
    out += machine_lines(rows, final["runs"])
    if "mrml" in summary and summary["mrml"]["inner_iterations_mean"] is not None:
        out += [
            "",
            f"mrml's Newton iterations per task, mean: "
            f"{summary['mrml']['inner_iterations_mean']:.2f}",
        ]
    if speed is not None and dense is not None:
        out += ["", *speed_markdown(speed, dense)]
    if long is not None:
        out += ["", *long_markdown(long)]
    if tuning is not None:
        out += ["", *tuning_markdown(tuning)]
    return "\n".join(out) + "\n"


def machine_lines(rows: dict[str, list[dict[str, Any]]], runs: list[dict[str, Any]]) -> list[str]:
    """The paragraphs on how the runs shared the machine (:func:`machine_share_line`) and, if
    any ran elsewhere with scaled budgets, which (:func:`scaled_budgets_line`)."""
    scaled = scaled_budgets_line(runs)
    return ["", machine_share_line(rows), *(["", scaled] if scaled else [])]


def _note_scaled_budgets(table: list[str], runs: list[dict[str, Any]]) -> None:
    """Put :func:`scaled_budgets_line`, if any, into a stage's ``table`` as its own paragraph
    after the command's (the table's lines 0–3: heading, blank, command, blank)."""
    if scaled := scaled_budgets_line(runs):
        table[4:4] = [scaled, ""]


def scaled_budgets_line(runs: list[dict[str, Any]]) -> str | None:
    """Which runs ran on another machine with budgets scaled to the study's
    (``fair_comparison.py --scale-budgets``), and by how much; ``None`` if none did."""
    ratios: dict[str, list[float]] = {}
    for run in runs:
        if run.get("machine_ratio"):
            ratios.setdefault(speed_key(run), []).append(run["machine_ratio"])
    if not ratios:
        return None
    count = sum(len(values) for values in ratios.values())
    each = ", ".join(
        f"{key} {min(values):.2f}" + (f"–{max(values):.2f}" if max(values) > min(values) else "")
        for key, values in ratios.items()
    )
    return (
        f"Budgets scaled: {count} of {len(runs)} runs ran on a machine of another speed, each "
        f"with its CPU-second budget and validation spacing multiplied by its row's measured "
        f"ratio of CPU seconds per iteration there to the study's ({each}); their curves and "
        f"seconds per iteration are given in the study's seconds, their wall_seconds as "
        f"measured."
    )


def machine_share_line(rows: dict[str, list[dict[str, Any]]]) -> str:
    """The runs whose median seconds per iteration differ from their row's median over seeds by
    more than :data:`MACHINE_SPEED_TOLERANCE`: the same setting at another speed means that run
    had another share of the machine, or another machine (same CPU seconds, different work)."""
    outliers = []
    for name, runs in rows.items():
        seconds = {r["seed"]: r.get("median_seconds_per_iteration") for r in runs}
        known = [s for s in seconds.values() if s]
        if len(known) < 2:
            continue
        middle = statistics.median(known)
        for seed, value in seconds.items():
            if value and abs(value / middle - 1) > MACHINE_SPEED_TOLERANCE:
                outliers.append(
                    f"{name} seed {seed} {value:.2f} s/it against the row's median "
                    f"{middle:.2f} s ({value / middle - 1:+.0%})"
                )
    limit = f"{MACHINE_SPEED_TOLERANCE:.0%}"
    if not outliers:
        return f"Machine share: every run's seconds per iteration are within {limit} of its row's."
    return f"Machine share: **outside {limit} of their row**: " + "; ".join(outliers) + "."


def plot(final: dict, path: Path) -> None:
    try:
        import matplotlib.figure
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError:
        return
    figure = matplotlib.figure.Figure(figsize=(7, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for name, runs in rows_of(final).items():
        for i, run in enumerate(runs):
            xs, ys = zip(*run["curve"], strict=True) if run["curve"] else ((), ())
            axes.plot(
                xs,
                ys,
                label=name if i == 0 else None,
                color=f"C{list(rows_of(final)).index(name)}",
                alpha=0.8,
            )
    axes.set_xlabel("training CPU seconds")
    axes.set_ylabel("validation accuracy")
    axes.legend(fontsize=8)
    figure.savefig(path, dpi=110, bbox_inches="tight")


_COMMANDS = {"tuning": "tune"}  # the command of a stage whose files are named otherwise


def _stage(name: str, args: argparse.Namespace) -> dict[str, Any] | None:
    """A stage's results in the study of ``args`` (:func:`fair_comparison._study`): its JSON
    once it has finished, else what its log holds so far (marked ``partial``), else ``None``."""
    study = _study(args)
    done = _load(f"fair_{name}_{study}.json")
    if done is not None:
        return done
    log = RESULTS / f"fair_{name}_{study}.jsonl"
    if not log.exists():
        return None
    runs = read_log(log)
    if not runs:
        return None
    first = runs[0]["options"]  # a budget option in it is this run's machine's seconds
    return {
        "partial": True,
        "runs": runs,
        "budget_cpu_seconds": study_seconds(runs[0], "time_budget"),
        "seeds": len({r.get("seed", 0) for r in runs}),  # tuning runs are all seed 0
        "val_tasks": first.get("val_tasks"),
        "test_tasks": first["test_tasks"],
        "selected": {},  # the tuning stage selects once every configuration has run
        "command": f"benchmarks/fair_comparison.py {_COMMANDS.get(name, name)} --ways "
        f"{args.ways}{_grid_flag(args)} (still running)",
    }


def report(args: argparse.Namespace) -> None:
    setting, study = _setting(args), _study(args)
    final = _stage("final", args)
    text = markdown(
        setting if study == setting else f"{setting}, grid {args.grid}",
        _stage("tuning", args),
        final,
        _load(f"fair_cost_{setting}.json"),
        _stage("long", args),
        _load(f"fair_speed_{study}.json"),  # only once it has finished
    )
    (RESULTS / f"fair_{study}.md").write_text(text)
    if final is not None:
        plot(final, RESULTS / f"fair_{study}.png")
    print(text)
