"""Peak memory at scale: ResNet-12 at miniImageNet shapes, K up to 100, every method.

The meter and the timing are :mod:`memory_speed`'s (CPU: the profiler's allocation trace via
:func:`mrmeta.measure_peak_memory`; paired, interleaved timing rounds). What differs is the
budget: one ResNet-12 step at 84×84 takes about 30 s on one CPU thread, so

* each method is measured at its own few K (``--ks-for METHOD=K1,K2``), one call each on a fresh
  learner (``--memory-warmup 0``: nothing made before the call is freed in it, so the trace is
  exact up to the optimizer's state);
* an unrolled method's memory is linear in K, ``m(K) = a + bK``; from its measured points the K
  at which it passes ``--limit-gb`` is predicted, and a point predicted above it is not run
  (this machine has 24 GB) but reported as predicted;
* only ``--timed`` methods are timed, against the plain step, at ``--time-ks``.

Command (the results committed in benchmarks/results/)::

    python benchmarks/memory_scale.py --adapt last-block --ks-for mrml=5,100 \
        --ks-for anil=2,5 --ks-for itd-bio=2,5 --timed mrml --time-ks 5 --rounds 2
    python benchmarks/memory_scale.py --adapt head --ks-for mrml=5,100 --ks-for anil=5,100 \
        --ks-for itd-bio=5,100 --ks-for maml=1,2 --ks-for fomaml=1,2 --ks-for imaml=1 \
        --imaml-cg-iters 1

Writes ``memory_scale_<tag>.json`` and ``.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
from pathlib import Path

import torch

from mrmeta import measure_peak_memory

sys.path.insert(0, str(Path(__file__).parent))
import memory_speed as ms  # noqa: E402

UNROLLED = ("maml", "fomaml", "anil", "itd-bio")


def linear_fit(points: list[tuple[int, int]]) -> tuple[float, float]:
    """Least-squares ``(a, b)`` of ``bytes = a + b·K`` through ``(K, bytes)`` points (one point:
    ``b = 0``)."""
    if len(points) == 1:
        return float(points[0][1]), 0.0
    ks, ys = zip(*points, strict=True)
    k_mean, y_mean = statistics.fmean(ks), statistics.fmean(ys)
    slope = sum((k - k_mean) * (y - y_mean) for k, y in points) / sum((k - k_mean) ** 2 for k in ks)
    return y_mean - slope * k_mean, slope


def k_exceeding(points: list[tuple[int, int]], limit_bytes: float) -> int | None:
    """The smallest K with ``a + bK > limit`` on the fit of ``points``; ``None`` when the fit
    does not grow (``b ≤ 0``)."""
    a, b = linear_fit(points)
    if b <= 0:
        return None
    return max(0, math.floor((limit_bytes - a) / b) + 1)


def measure_memory(method: str, k: int, setting: ms.Setting, warmup: int) -> int:
    """Peak bytes of one meta-iteration of ``method`` at ``k`` on a fresh learner."""
    batch = ms.random_tasks(setting, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    run = ms.step_function(ms.build(method, k, setting), method, batch, setting)
    return measure_peak_memory(run, device=setting.device, warmup=warmup)


def memory_rows(args: argparse.Namespace, setting: ms.Setting) -> list[dict]:
    """Every (method, K) of ``--ks-for``: measured, or predicted past ``--limit-gb``."""
    limit = args.limit_gb * 1e9
    rows = []
    for method, ks in args.ks_for.items():
        measured: list[tuple[int, int]] = []
        for k in ks:
            if len(measured) >= 2 and (cut := k_exceeding(measured, limit)) is not None:
                if k >= cut:
                    a, b = linear_fit(measured)
                    rows.append({"method": method, "k": k, "predicted_bytes": a + b * k})
                    continue
            peak = measure_memory(method, k, setting, args.memory_warmup)
            measured.append((k, peak))
            rows.append({"method": method, "k": k, "peak_bytes": peak})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def timing_rows(args: argparse.Namespace, setting: ms.Setting) -> list[dict]:
    """Seconds per call of the ``--timed`` methods and the plain step at each ``--time-ks``."""
    rows = []
    batch = ms.random_tasks(setting, torch.Generator().manual_seed(0))
    for k in args.time_ks:
        runs = {}
        for method in ["plain", *args.timed]:
            torch.manual_seed(0)
            runs[method] = ms.step_function(ms.build(method, k, setting), method, batch, setting)
            runs[method]()  # warm-up
        times = ms.interleaved_seconds(runs, args.rounds, setting.device, 1e9, args.rounds)
        for method in args.timed:
            med, q1, q3 = ms.paired_ratio(times[method], times["plain"])
            rows.append(
                {
                    "method": method,
                    "k": k,
                    "seconds": statistics.median(times[method]),
                    "plain_seconds": statistics.median(times["plain"]),
                    "ratio": med,
                    "ratio_quartiles": [q1, q3],
                    "round_seconds": times[method],
                    "plain_round_seconds": times["plain"],
                }
            )
            print(json.dumps({k2: v for k2, v in rows[-1].items() if "round" not in k2}))
    return rows


def summary(rows: list[dict], limit_gb: float) -> list[dict]:
    """Per method: its fit, the K past ``limit_gb`` (measured or predicted), its largest
    measured peak relative to the plain step."""
    plain = next(r["peak_bytes"] for r in rows if r["method"] == "plain")
    out = []
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "plain"):
        points = [
            (r["k"], r["peak_bytes"]) for r in rows if r["method"] == method and "peak_bytes" in r
        ]
        a, b = linear_fit(points)
        over = [k for k, p in points if p > limit_gb * 1e9]
        # Only the unrolled methods grow with K; the others' fit is rounding noise.
        cut = min(over) if over else None
        if cut is None and method in UNROLLED:
            cut = k_exceeding(points, limit_gb * 1e9)
        out.append(
            {
                "method": method,
                "intercept_bytes": a,
                "bytes_per_step": b,
                "k_exceeding": cut,
                "k_exceeding_is": "measured"
                if over
                else ("never (flat)" if cut is None else "predicted"),
                "max_vs_plain": max(p for _, p in points) / plain,
            }
        )
    return out


def markdown(results: dict) -> str:
    """The memory table, the 16 GB column and the timing table."""
    limit = results["limit_gb"]
    lines = [
        f"# Memory at scale: ResNet-12, miniImageNet shapes ({results['tag']})",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Machine: {results['machine']}; torch {results['torch']}; {results['threads']} thread(s);"
        f" {results['setting']}. MB = 1e6 bytes; a value in *italics* is predicted from the "
        f'method\'s linear fit, not run; "—" in the last column: no growth in K was measured. '
        f"Each point is one meta-iteration on a fresh learner (memory warm-up "
        f"{results.get('memory_warmup', 0)}).",
        "",
        "| method | peak MB at K | × plain step (max measured) | MB per inner step | "
        f"K exceeding {limit:g} GB |",
        "|---|---|---|---|---|",
    ]
    plain = next(r["peak_bytes"] for r in results["rows"] if r["method"] == "plain")
    lines.append(f"| plain step (floor) | {plain / 1e6:.0f} | 1.00 | — | — |")
    for s in results["summary"]:
        cells = []
        for r in results["rows"]:
            if r["method"] != s["method"]:
                continue
            if "peak_bytes" in r:
                cells.append(f"K={r['k']}: {r['peak_bytes'] / 1e6:.0f}")
            else:
                cells.append(f"K={r['k']}: *{r['predicted_bytes'] / 1e6:.0f}*")
        cut = s["k_exceeding"]
        where = "—" if cut is None else f"{cut} ({s['k_exceeding_is']})"
        if s["k_exceeding_is"] == "predicted":
            where += ", not run here"
        lines.append(
            f"| {s['method']} | {'; '.join(cells)} | {s['max_vs_plain']:.2f} | "
            f"{s['bytes_per_step'] / 1e6:.1f} | {where} |"
        )
    if results["timing"]:
        lines += [
            "",
            "Seconds per meta-iteration against the plain step, timed in the same interleaved "
            "rounds (median of the per-round ratios, quartiles):",
            "",
            "| method | K | s/it | plain s/it | ratio (quartiles) |",
            "|---|---|---|---|---|",
        ]
        for r in results["timing"]:
            q1, q3 = r["ratio_quartiles"]
            lines.append(
                f"| {r['method']} | {r['k']} | {r['seconds']:.1f} | {r['plain_seconds']:.1f} | "
                f"{r['ratio']:.2f} ({q1:.2f}-{q3:.2f}) |"
            )
    return "\n".join(lines) + "\n"


def parse_ks_for(text: str) -> tuple[str, list[int]]:
    """``METHOD=K1,K2`` → ``(METHOD, [K1, K2])``."""
    method, _, ks = text.partition("=")
    if method not in ms.METHODS or not ks:
        raise argparse.ArgumentTypeError(f"expected METHOD=K1,K2 with METHOD in {ms.METHODS}")
    return method, [int(k) for k in ks.split(",")]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(ms.SHAPES), default="mini-imagenet")
    parser.add_argument("--backbone", choices=("conv4", "resnet12"), default="resnet12")
    parser.add_argument("--adapt", choices=("head", "last-block"), default="head")
    parser.add_argument("--ks-for", type=parse_ks_for, action="append", default=[])
    parser.add_argument("--tasks", type=int, default=1)
    parser.add_argument("--cg-iters", type=int, default=20)
    parser.add_argument("--imaml-cg-iters", type=int, default=None)
    parser.add_argument("--memory-warmup", type=int, default=0)
    parser.add_argument("--limit-gb", type=float, default=16.0)
    parser.add_argument("--timed", nargs="*", default=[], choices=ms.METHODS[1:])
    parser.add_argument("--time-ks", type=int, nargs="*", default=[])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tag", default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--rewrite", type=Path, help="recompute the summary and .md of a JSON")
    args = parser.parse_args()
    args.ks_for = {"plain": [0], **dict(args.ks_for)}
    return args


def main() -> None:
    args = parse_args()
    if args.rewrite is not None:
        results = json.loads(args.rewrite.read_text())
        results["summary"] = summary(results["rows"], results["limit_gb"])
        args.rewrite.write_text(json.dumps(results, indent=2) + "\n")
        args.rewrite.with_suffix(".md").write_text(markdown(results))
        return
    torch.set_num_threads(args.threads)
    setting = ms.Setting(
        args.shape,
        5,
        5,
        5,
        args.tasks,
        1,
        args.adapt,
        args.cg_iters,
        torch.device("cpu"),
        args.backbone,
        args.imaml_cg_iters,
    )
    rows = memory_rows(args, setting)
    results = {
        "tag": args.tag or f"{args.backbone}_{args.shape}_{args.adapt}",
        "command": "python benchmarks/memory_scale.py " + " ".join(sys.argv[1:]),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "setting": (
            f"{args.backbone}, {args.shape}, 5-way 5-shot 5-query, {args.tasks} task(s), "
            f"adapt {args.adapt}, N={args.cg_iters} "
            f"(iMAML N={args.imaml_cg_iters or args.cg_iters})"
        ),
        "limit_gb": args.limit_gb,
        "memory_warmup": args.memory_warmup,
        "rows": rows,
        "summary": summary(rows, args.limit_gb),
        "timing": timing_rows(args, setting),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"memory_scale_{results['tag']}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
