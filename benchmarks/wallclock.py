"""Wall-clock to accuracy on real Omniglot: every method under the same time budget.

The paper's Table 2 protocol: each method is meta-trained for ``--budget`` seconds of training
time (validation excluded) on the same cores; its validation accuracy (the same fixed validation
tasks for every method) is recorded against training seconds; the time each method needs to reach
0.9 × the best validation accuracy of any method is reported, with the final test accuracy
± 95% CI on ``--test-tasks`` test tasks of the best-validation checkpoint.

Each method is one ``mrmeta.train`` run (the same code as ``mrmeta train``), its run folder kept
under ``--runs``. Command (results committed in benchmarks/results/)::

    python benchmarks/wallclock.py --ways 5 --budget 240

Writes ``wallclock_<ways>way<shots>shot.json``, ``.md`` and ``.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from mrmeta._checkpoint import read_metrics
from mrmeta.config import TrainConfig
from mrmeta.train import train

METHODS = ("mrml", "anil", "itd-bio", "maml", "fomaml", "imaml")


def seconds_per_iteration(config: TrainConfig, scratch: Path) -> float:
    """Median training seconds of a few iterations (sets how often to validate)."""
    probe = config.replace(
        iterations=3, val_every=1000, test_tasks=1, val_tasks=1, time_budget=None
    )
    shutil.rmtree(scratch, ignore_errors=True)
    train(probe, scratch, progress=False)
    seconds = sorted(
        r["seconds"] for r in read_metrics(scratch / "metrics.jsonl") if r["kind"] == "train"
    )
    shutil.rmtree(scratch, ignore_errors=True)
    return seconds[len(seconds) // 2]


def run_method(method: str, args: argparse.Namespace) -> dict:
    """Train one method for the budget; return its validation curve and test result."""
    base = TrainConfig(
        algo=method,
        dataset="omniglot",
        data_root=args.data_root,
        ways=args.ways,
        shots=args.shots,
        queries=args.queries,
        meta_batch=args.meta_batch,
        seed=args.seed,
        threads=args.threads,
        val_tasks=args.val_tasks,
        test_tasks=args.test_tasks,
        iterations=10**6,
        time_budget=args.budget,
        checkpoint_every=10**6,
    )
    per_it = seconds_per_iteration(base, args.runs / f"probe-{method}")
    val_every = max(1, round(args.budget / args.validations / per_it))
    run_dir = args.runs / f"{args.ways}way{args.shots}shot-{method}"
    shutil.rmtree(run_dir, ignore_errors=True)
    started = time.perf_counter()
    result = train(base.replace(val_every=val_every), run_dir, progress=False)
    records = read_metrics(run_dir / "metrics.jsonl")
    curve = [(r["train_seconds"], r["accuracy"]) for r in records if r["kind"] == "val"]
    print(
        f"{method}: {result['iterations']} it, best val {result['best_val_accuracy']:.4f}, "
        f"test {result['test_accuracy']:.4f} ± {result['test_ci95']:.4f} "
        f"({time.perf_counter() - started:.0f} s wall)",
        flush=True,
    )
    return {"method": method, "val_every": val_every, "curve": curve, **result}


def time_to_reach(curve: list[tuple[float, float]], threshold: float) -> float | None:
    """First training second at which validation accuracy reached ``threshold``."""
    return next((s for s, acc in curve if acc >= threshold), None)


def summarize(runs: list[dict]) -> dict:
    """Threshold = 0.9 × the best validation accuracy of any method; times and targets."""
    best = max(r["best_val_accuracy"] for r in runs)
    threshold = 0.9 * best
    for r in runs:
        r["seconds_to_threshold"] = time_to_reach(r["curve"], threshold)
    mrml = next((r for r in runs if r["method"] == "mrml"), None)
    targets = []
    if mrml is not None:
        others = [r for r in runs if r is not mrml]
        t_m = mrml["seconds_to_threshold"]
        reached = [o for o in others if o["seconds_to_threshold"] is not None]
        rival = min(reached, key=lambda o: o["seconds_to_threshold"], default=None)
        first = t_m is not None and (rival is None or t_m < rival["seconds_to_threshold"])
        got = "mrml never" if t_m is None else f"mrml {t_m:.0f} s"
        if rival is not None:
            t_r = rival["seconds_to_threshold"]
            got += f", first baseline {rival['method']} {t_r:.0f} s"
            if t_m is not None:
                got += f" ({'ahead' if first else 'behind'} by {abs(t_r - t_m):.0f} s)"
        targets.append(("mrml reaches 0.9 x best validation accuracy before every baseline",
                        first, got))  # fmt: skip
        top = max(others, key=lambda o: o["test_accuracy"])
        ok = mrml["test_accuracy"] >= top["test_accuracy"] - top["test_ci95"]
        targets.append(
            (
                f"mrml test accuracy within the CI of the best baseline ({top['method']}) or above",
                ok,
                f"{mrml['test_accuracy']:.4f} vs "
                f"{top['test_accuracy']:.4f} ± {top['test_ci95']:.4f}",
            )
        )
    return {"best_val": best, "threshold": threshold, "targets": targets}


def markdown(report: dict) -> str:
    s = report["summary"]
    lines = [
        f"# Wall-clock to accuracy: Omniglot {report['ways']}-way {report['shots']}-shot",
        "",
        f"Command: `{report['command']}`",
        "",
        f"{report['settings']}",
        "",
        f"Threshold = 0.9 × best validation accuracy of any method = "
        f"0.9 × {100 * s['best_val']:.2f}% = {100 * s['threshold']:.2f}%.",
        "",
        "| method | iterations | validated every | s to threshold | best val acc "
        "| test acc ± 95% CI |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        t = r["seconds_to_threshold"]
        lines.append(
            f"| {r['method']} | {r['iterations']} | {_validation_spacing(r)} "
            f"| {'never' if t is None else f'{t:.0f}'}"
            f" | {100 * r['best_val_accuracy']:.2f}% | {100 * r['test_accuracy']:.2f}% ± "
            f"{100 * r['test_ci95']:.2f}% |"
        )
    lines += ["", "Targets:", ""]
    lines += [f"- {'HOLDS' if ok else 'MISSED'}: {d} ({got})" for d, ok, got in s["targets"]]
    return "\n".join(lines) + "\n"


def _validation_spacing(run: dict) -> str:
    """``"17 it (≈ 19 s)"``: how often the run was validated, in iterations and seconds."""
    seconds = [s for s, _ in run["curve"]]
    gaps = [b - a for a, b in zip(seconds, seconds[1:], strict=False)]
    mean = f" (≈ {sum(gaps) / len(gaps):.0f} s)" if gaps else ""
    return f"{run['val_every']} it{mean}"


def write_reports(report: dict, out: Path) -> None:
    """``wallclock_<ways>way<shots>shot.json``, ``.md`` and ``.png`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"wallclock_{report['ways']}way{report['shots']}shot"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    plot(report, stem.with_suffix(".png"))


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in report["runs"]:
        xs, ys = zip(*r["curve"], strict=True) if r["curve"] else ((), ())
        ax.plot(xs, ys, marker=".", label=r["method"])
    ax.axhline(report["summary"]["threshold"], color="k", ls="--", lw=1, label="0.9 × best")
    ax.set(
        xlabel="training seconds",
        ylabel="validation accuracy",
        title=f"Omniglot {report['ways']}-way {report['shots']}-shot",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--meta-batch", type=int, default=16)
    parser.add_argument("--budget", type=float, default=240.0, help="training seconds per method")
    parser.add_argument("--validations", type=int, default=12, help="validations per run, about")
    parser.add_argument("--val-tasks", type=int, default=200)
    parser.add_argument("--test-tasks", type=int, default=600)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--data-root", default=None, help="default: $MRMETA_DATA, else ~/.cache/mrmeta"
    )
    parser.add_argument("--runs", type=Path, default=Path("runs/wallclock"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--replot", type=Path, help="rewrite the .md and .png of a results JSON")
    return parser.parse_args()


def main() -> None:
    import sys

    args = parse_args()
    if args.replot is not None:
        report = json.loads(args.replot.read_text())
        report["summary"] = summarize(report["runs"])
        write_reports(report, args.replot.parent)
        return
    runs = [run_method(m, args) for m in args.methods]
    report = {
        "ways": args.ways,
        "shots": args.shots,
        "command": "python benchmarks/wallclock.py " + " ".join(sys.argv[1:]),
        "settings": (
            f"{args.queries} queries per class, meta-batch {args.meta_batch}, "
            f"{args.budget:.0f} s training budget per method, {args.threads} threads, "
            f"torch {torch.__version__}, {args.val_tasks} validation tasks (the same for "
            f"every method), {args.test_tasks} test tasks (Lake split: evaluation "
            "alphabets), algorithm defaults of `mrmeta train` otherwise."
        ),
        "runs": runs,
    }
    report["summary"] = summarize(runs)
    write_reports(report, args.out)
    for desc, ok, got in report["summary"]["targets"]:
        print(f"{'HOLDS ' if ok else 'MISSED'} {desc}: {got}")


if __name__ == "__main__":
    main()
