"""Peak memory and seconds per meta-iteration against the number of inner steps K.

Every method runs on the same random tasks of the paper's shapes (memory and time do not depend
on pixel values), measured with the same meter in one process:

* memory: :func:`mrmeta.measure_peak_memory` over one meta-iteration after a warm-up iteration
  (CPU: the profiler's allocation trace; CUDA: ``max_memory_allocated``);
* time: every method at a K (and the plain step) timed together in ``--rounds`` interleaved
  rounds after the warm-up; a ratio between two methods is the median of their per-round ratios.

The "plain step" row is one forward and backward pass of the model on the same images in the same
chunks — a supervised step, the floor for any method. ``--adapt last-block`` adapts the last
block and the head instead of the head alone (:func:`mrmeta.models.split_model`; MAML and iMAML
adapt the whole network either way); ``--backbone resnet12`` swaps Conv4 for the standard
ResNet-12 (64-160-320-640). ``benchmarks/memory_scale.py`` runs ResNet-12 up to K = 100.

Command (the results committed in benchmarks/results/)::

    python benchmarks/memory_speed.py --shape cifar-fs --shape mini-imagenet --ks 5 10 15 20

Writes ``memory_speed_<tag>.json``, ``.md`` and ``.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mrmeta import Conv4, MetaLearner, ResNet12, TaskBatch, measure_peak_memory
from mrmeta._per_task import task_features
from mrmeta.algorithms.anil import ANIL
from mrmeta.algorithms.imaml import IMAML
from mrmeta.algorithms.itd_bio import ITDBiO
from mrmeta.algorithms.maml import MAML
from mrmeta.algorithms.memory_reduced import MemoryReduced
from mrmeta.models import split_model

SHAPES = {  # name: (channels, image side, Conv4 filters)
    "cifar-fs": (3, 32, 64),
    "mini-imagenet": (3, 84, 32),
}
METHODS = ("plain", "mrml", "anil", "itd-bio", "maml", "fomaml", "imaml")
PAPER_MB = {  # docs/paper-results.md §3: the paper's peak GPU memory (MB) at K = 5, 10, 20
    ("cifar-fs", "mrml"): {5: 77.5, 10: 77.7, 20: 78.2},
    ("cifar-fs", "anil"): {5: 149.1, 10: 263.3, 20: 491.7},
    ("cifar-fs", "itd-bio"): {5: 149.1, 10: 263.3, 20: 491.8},
    ("cifar-fs", "maml"): {5: 262.0, 10: 463.6, 20: 866.6},
    ("mini-imagenet", "mrml"): {5: 495.8, 10: 496.6, 20: 498.1},
    ("mini-imagenet", "anil"): {5: 1094.1, 10: 1892.7, 20: 3490.9},
    ("mini-imagenet", "maml"): {5: 1776.9, 10: 3149.3, 20: 5894.1},
}


@dataclass(frozen=True)
class Setting:
    """One grid point's fixed parameters."""

    shape: str
    ways: int
    shots: int
    queries: int
    tasks: int
    chunk_size: int | None
    adapt: str
    cg_iters: int
    device: torch.device
    backbone: str = "conv4"
    imaml_cg_iters: int | None = None  # None: cg_iters


def random_tasks(setting: Setting, generator: torch.Generator) -> TaskBatch:
    """Random images and balanced labels of the paper's 5-way 5-shot 5-query shape."""
    channels, side, _ = SHAPES[setting.shape]
    n_s, n_q = setting.ways * setting.shots, setting.ways * setting.queries

    def labels(per_class: int) -> torch.Tensor:
        return torch.arange(setting.ways).repeat_interleave(per_class).repeat(setting.tasks, 1)

    batch = TaskBatch(
        torch.randn(setting.tasks, n_s, channels, side, side, generator=generator),
        labels(setting.shots),
        torch.randn(setting.tasks, n_q, channels, side, side, generator=generator),
        labels(setting.queries),
    )
    return batch.to(setting.device)


def split(setting: Setting) -> tuple[Conv4 | ResNet12, nn.Module, nn.Module]:
    """The model and its (backbone, head) split (:func:`mrmeta.models.split_model`): the linear
    head, or the last block + head. ResNet-12 has the standard widths 64-160-320-640."""
    channels, side, hidden = SHAPES[setting.shape]
    if setting.backbone == "resnet12":
        model: Conv4 | ResNet12 = ResNet12(setting.ways, channels, image_size=side, zero_head=True)
    else:
        model = Conv4(setting.ways, channels, hidden, side, zero_head=True)
    model = model.to(setting.device)
    return (model, *split_model(model, setting.adapt))


def build(method: str, k: int, setting: Setting) -> MetaLearner | nn.Module:
    """The learner of ``method`` with ``k`` inner steps (the plain step: the bare model)."""
    model, backbone, head = split(setting)
    head_lr: float | str = "auto" if setting.adapt == "head" else 0.01
    common = {"inner_steps": k, "chunk_size": setting.chunk_size}
    if method == "plain":
        return model
    if method == "mrml":
        return MemoryReduced(  # the paper's K plain steps and N CG steps: memory against K
            backbone,
            head,
            inner_solver="gd",
            inner_lr=head_lr,
            cg_iters=setting.cg_iters,
            exact_v=False,
            **common,
        )
    if method == "anil":
        return ANIL(backbone, head, inner_lr=0.1, **common)
    if method == "itd-bio":
        return ITDBiO(backbone, head, inner_lr=head_lr, **common)
    if method in ("maml", "fomaml"):
        return MAML(model, first_order=method == "fomaml", **common)  # the class's inner lr
    cg_iters = setting.cg_iters if setting.imaml_cg_iters is None else setting.imaml_cg_iters
    return IMAML(model, cg_iters=cg_iters, **common)


def plain_step(model: Conv4 | ResNet12, batch: TaskBatch, chunk_size: int | None) -> None:
    """One forward and one backward of Conv4 over every image of each chunk (support and query
    in one graph, as a meta-step needs them), chunk by chunk."""
    for chunk in batch.chunks(chunk_size):
        loss = sum(
            F.cross_entropy(model.head(task_features(model.backbone, x)).flatten(0, 1), y.flatten())
            for x, y in ((chunk.support_x, chunk.support_y), (chunk.query_x, chunk.query_y))
        )
        loss.backward()


def step_function(learner: nn.Module, method: str, batch: TaskBatch, setting: Setting) -> Callable:
    """A closure running one meta-iteration (or one plain step)."""
    params = [p for p in learner.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-4)
    if method == "plain":

        def run() -> None:
            optimizer.zero_grad(set_to_none=True)
            plain_step(learner, batch, setting.chunk_size)
            optimizer.step()

        return run
    return lambda: learner.meta_step(batch, optimizer)


def interleaved_seconds(
    runs: dict[str, Callable], rounds: int, device: torch.device, slow: float, slow_rounds: int
) -> dict[str, list[float]]:
    """Wall-clock seconds of every run, measured in rounds that call each run once.

    The order of the runs rotates from round to round, so that a drift in the machine's speed
    (other load, frequency changes) reaches every method alike and the per-round ratios between
    two methods are paired measurements. A run slower than ``slow`` × the first run of round 0 is
    timed in the first ``slow_rounds`` rounds only (MAML at K = 20 takes seconds a call).
    """
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            if r >= slow_rounds and times[name] and times[name][0] > slow * times[names[0]][0]:
                continue
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            runs[name]()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def measure_k(k: int, methods: list[str], setting: Setting, args: argparse.Namespace) -> list[dict]:
    """Peak bytes of every method at ``k`` (one at a time, after a warm-up call), then their
    seconds per call, timed together in interleaved rounds (:func:`interleaved_seconds`)."""
    batch = random_tasks(setting, torch.Generator().manual_seed(0))
    runs, rows = {}, {}
    for method in methods:
        torch.manual_seed(0)
        run = step_function(build(method, k, setting), method, batch, setting)
        peak = measure_peak_memory(run, device=setting.device, warmup=1)
        runs[method] = run
        rows[method] = {"method": method, "k": k, "peak_bytes": peak}
    times = interleaved_seconds(runs, args.rounds, setting.device, 5.0, args.slow_rounds)
    for method, row in rows.items():
        row["seconds"] = statistics.median(times[method])
        row["round_seconds"] = times[method]
    return list(rows.values())


def paired_ratio(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Median, lower and upper quartile of the per-round ratios ``a_r / b_r`` (the rounds both
    were timed in)."""
    ratios = sorted(x / y for x, y in zip(a, b, strict=False))
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    q1, med, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return med, q1, q3


def targets(rows: list[dict], shape: str) -> list[tuple[str, bool, str]]:
    """The issue's targets that this grid can check: (description, holds, measured).

    Speed comparisons use the per-round ratios of :func:`interleaved_seconds`: "below" holds when
    their median is under 1, and the quartiles are printed so a tie within noise shows as one.
    """
    table = {(r["method"], r["k"]): r for r in rows}
    ks = sorted({r["k"] for r in rows if r["method"] != "plain"})
    lo, hi = ks[0], ks[-1]
    out = []
    if ("mrml", lo) not in table or ("mrml", hi) not in table:
        return out
    mrml = table["mrml", hi]
    ratio = mrml["peak_bytes"] / table["mrml", lo]["peak_bytes"]
    out.append(
        (
            f"mrml peak memory K={hi} within 2% of K={lo}",
            abs(ratio - 1) <= 0.02,
            f"ratio {ratio:.4f}",
        )
    )
    plain = table.get(("plain", hi))
    if plain:
        r = mrml["peak_bytes"] / plain["peak_bytes"]
        out.append((f"mrml peak memory K={hi} <= 1.2x plain step", r <= 1.2, f"{r:.2f}x"))
        med, q1, q3 = _ratio(mrml, plain)
        out.append(
            (
                f"mrml s/it K={hi} <= 1.3x plain step",
                med <= 1.3,
                f"{med:.2f}x, quartiles {q1:.2f}-{q3:.2f}",
            )
        )
    for other in ("anil", "itd-bio", "maml"):
        if (other, hi) in table:
            med, q1, q3 = _ratio(mrml, table[other, hi])
            out.append(
                (
                    f"mrml s/it K={hi} below {other}",
                    med < 1,
                    f"mrml/{other} = {med:.3f}, quartiles {q1:.3f}-{q3:.3f}; "
                    f"{mrml['seconds']:.3f}s vs {table[other, hi]['seconds']:.3f}s",
                )
            )
    if shape == "cifar-fs" and ("maml", hi) in table:
        r = table["maml", hi]["peak_bytes"] / mrml["peak_bytes"]
        out.append((f"MAML peak memory K={hi} >= 10x mrml", r >= 10, f"{r:.1f}x"))
    return out


def _ratio(a: dict, b: dict) -> tuple[float, float, float]:
    """:func:`paired_ratio` of two rows' per-round seconds."""
    return paired_ratio(a["round_seconds"], b["round_seconds"])


def markdown(results: dict) -> str:
    """The results as markdown tables (MB = 1e6 bytes)."""
    lines = [
        f"# Memory and speed against K ({results['tag']})",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Machine: {results['machine']}; torch {results['torch']}; "
        f"{results['threads']} threads; device {results['device']}.",
        "",
    ]
    for shape, block in results["shapes"].items():
        lines += _shape_tables(shape, block)
    return "\n".join(lines) + "\n"


def comparable_to_paper(block: dict) -> bool:
    """Whether a grid's setting is the paper's: Conv4, the head adapted, tasks one at a time."""
    setting = block["setting"]
    return "adapt head" in setting and "chunk 1," in setting and "resnet12" not in setting


def _shape_tables(shape: str, block: dict) -> list[str]:
    rows, ks = block["rows"], block["ks"]
    head_only = comparable_to_paper(block)
    table = {(r["method"], r["k"]): r for r in rows}
    plains = {k: table[("plain", k)] for k in ks}
    head = "| method | " + " | ".join(f"K={k}" for k in ks) + " |"
    rule = "|---|" + "---|" * len(ks)
    lines = [
        f"## {shape} — {block['setting']}",
        "",
        "Peak memory, MB (paper's GPU MB):" if head_only else "Peak memory, MB:",
        "",
        head,
        rule,
        "| plain step (floor) | "
        + " | ".join(f"{plains[k]['peak_bytes'] / 1e6:.1f}" for k in ks)
        + " |",
    ]
    for method in METHODS[1:]:
        cells = []
        for k in ks:
            r = table.get((method, k))
            paper = PAPER_MB.get((shape, method), {}).get(k) if head_only else None
            cell = "—" if r is None else f"{r['peak_bytes'] / 1e6:.1f}"
            cells.append(cell + (f" ({paper})" if paper else ""))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Seconds per meta-iteration as a ratio to the plain step timed in the same rounds "
        "(median of the per-round ratios; the plain step's median seconds in its row):",
        "",
        head,
        rule,
        "| plain step (s) | " + " | ".join(f"{plains[k]['seconds']:.3f}" for k in ks) + " |",
    ]
    for method in METHODS[1:]:
        cells = [
            f"{_ratio(table[(method, k)], plains[k])[0]:.2f}" if (method, k) in table else "—"
            for k in ks
        ]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "Targets:", ""]
    lines += [
        f"- {'HOLDS' if ok else 'MISSED'}: {desc} ({got})" for desc, ok, got in block["targets"]
    ]
    return lines + [""]


def plot(results: dict, path: Path) -> None:
    """Grouped bars of peak memory against K per method, one panel per shape (Figure 2 style)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(results["shapes"])
    fig, axes = plt.subplots(1, len(shapes), figsize=(7 * len(shapes), 4.5), squeeze=False)
    for ax, shape in zip(axes[0], shapes, strict=True):
        block = results["shapes"][shape]
        table = {(r["method"], r["k"]): r["peak_bytes"] / 1e6 for r in block["rows"]}
        methods = [m for m in METHODS[1:] if any((m, k) in table for k in block["ks"])]
        width = 0.8 / len(block["ks"])
        for i, k in enumerate(block["ks"]):
            xs = [j + i * width for j in range(len(methods))]
            ax.bar(xs, [table.get((m, k), 0) for m in methods], width, label=f"K={k}")
        paper = [
            (j + i * width, PAPER_MB[(shape, m)][k])
            for j, m in enumerate(methods)
            for i, k in enumerate(block["ks"])
            if k in PAPER_MB.get((shape, m), {}) and comparable_to_paper(block)
        ]
        if paper:
            ax.scatter(
                *zip(*paper, strict=True), marker="x", color="k", zorder=3, label="paper (GPU)"
            )
        ax.axhline(table[("plain", block["ks"][-1])], color="k", ls="--", lw=1, label="plain step")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(methods))], methods)
        ax.set(ylabel="peak memory (MB)", title=f"{shape} ({block['setting']})")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_shape(shape: str, args: argparse.Namespace, device: torch.device) -> dict:
    setting = Setting(
        shape,
        5,
        5,
        5,
        args.tasks,
        args.chunk_size,
        args.adapt,
        args.cg_iters,
        device,
        args.backbone,
    )
    rows = []
    for k in args.ks:
        for row in measure_k(k, ["plain", *args.methods], setting, args):
            rows.append(row)
            brief = {key: v for key, v in row.items() if key != "round_seconds"}
            print(json.dumps({"shape": shape, **brief}), flush=True)
    desc = (
        f"5-way 5-shot 5-query, {args.tasks} tasks, chunk {args.chunk_size or 'all'}, "
        f"{args.backbone}, adapt {args.adapt}, N={args.cg_iters}, {args.rounds} timing rounds"
    )
    return {"setting": desc, "ks": args.ks, "rows": rows, "targets": targets(rows, shape)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", action="append", choices=sorted(SHAPES), dest="shapes")
    parser.add_argument("--ks", type=int, nargs="+", default=[5, 10, 15, 20])
    parser.add_argument("--methods", nargs="+", default=list(METHODS[1:]), choices=METHODS[1:])
    parser.add_argument("--tasks", type=int, default=4, help="tasks per meta-iteration")
    parser.add_argument("--chunk-size", type=lambda s: None if s == "all" else int(s), default=1)
    parser.add_argument("--adapt", choices=("head", "last-block"), default="head")
    parser.add_argument("--backbone", choices=("conv4", "resnet12"), default="conv4")
    parser.add_argument("--cg-iters", type=int, default=20)
    parser.add_argument(
        "--rounds", type=int, default=20, help="timing rounds (each calls every method once)"
    )
    parser.add_argument(
        "--slow-rounds",
        type=int,
        default=3,
        help="rounds for methods slower than 5x the plain step",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tag", default=None, help="file name tag (default: from settings)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--replot", type=Path, help="rewrite the .md and .png of a results JSON")
    return parser.parse_args()


def write_reports(results: dict, out: Path) -> None:
    """``memory_speed_<tag>.json``, ``.md`` and ``.png`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"memory_speed_{results['tag']}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(results))
    plot(results, stem.with_suffix(".png"))


def main() -> None:
    args = parse_args()
    if args.replot is not None:
        write_reports(json.loads(args.replot.read_text()), args.replot.parent)
        return
    args.shapes = args.shapes or ["cifar-fs"]
    device = torch.device(args.device)
    tag = args.tag or f"{args.device}_{args.adapt}_chunk{args.chunk_size or 'all'}"
    if args.backbone != "conv4" and args.tag is None:
        tag = f"{args.backbone}_{tag}"
    results = {
        "tag": tag,
        "command": "python benchmarks/memory_speed.py " + " ".join(_argv()),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "shapes": {shape: run_shape(shape, args, device) for shape in args.shapes},
    }
    write_reports(results, args.out)
    for shape, block in results["shapes"].items():
        for desc, ok, got in block["targets"]:
            print(f"[{shape}] {'HOLDS ' if ok else 'MISSED'} {desc}: {got}")


def _argv() -> list[str]:
    import sys

    return sys.argv[1:]


if __name__ == "__main__":
    main()
