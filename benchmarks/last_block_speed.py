"""Where mrml's time goes with the last block adapted, and what each change of its step buys.

On :mod:`memory_speed`'s random tasks (Conv4 at CIFAR-FS shapes, 5-way 5-shot 5-query, the
last block + head adapted, K gradient steps, N CG steps, tasks one at a time) this times, in
the same interleaved rounds as the plain step (:func:`memory_speed.interleaved_seconds`):

* ``before``: the head forward vmapped even for a single task, features computed once (the
  library before this benchmark was written; the vmap is put back by patching);
* ``single-task forward``: one task's head called directly (the library's default now);
* ``features recomputed``: the same, plus the features computed a second time in the graph
  (``MemoryReduced.recompute_features = True``, the default for heads larger than their
  backbone, e.g. ResNet-12's last block; costs one forward pass of the backbone);

and profiles one meta-iteration with cProfile (the top entries by cumulative time).

Command (the results committed in benchmarks/results/)::

    python benchmarks/last_block_speed.py --rounds 10

Writes ``last_block_speed.json`` and ``.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

import mrmeta.lower_level as lower_level

sys.path.insert(0, str(Path(__file__).parent))
import memory_speed as ms  # noqa: E402

CURRENT_FORWARD = lower_level.batched_head_forward


def vmapped_forward(head: nn.Module, params: dict[str, Tensor], features: Tensor) -> Tensor:
    """The head forward before the single-task shortcut: every non-linear head vmapped."""
    if isinstance(head, nn.Linear):
        return CURRENT_FORWARD(head, params, features)
    return vmap(lambda p, z: functional_call(head, p, (z,)))(params, features)


def variant(setting: ms.Setting, batch: ms.TaskBatch, k: int, *, vmapped: bool, recompute: bool):
    """A meta-iteration of mrml with the given head forward and feature recomputation."""
    learner = ms.build("mrml", k, setting)
    learner.recompute_features = recompute
    run = ms.step_function(learner, "mrml", batch, setting)

    def call() -> None:
        lower_level.batched_head_forward = vmapped_forward if vmapped else CURRENT_FORWARD
        try:
            run()
        finally:
            lower_level.batched_head_forward = CURRENT_FORWARD

    return call


def profile(run: Callable[[], None], top: int) -> str:
    """cProfile of one call of ``run``: the ``top`` entries by cumulative time."""
    profiler = cProfile.Profile()
    profiler.runcall(run)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(top)
    return strip_paths(text.getvalue())


def strip_paths(text: str) -> str:
    """File names relative to the repository or to ``site-packages`` (no machine's paths)."""
    root = str(Path(__file__).resolve().parent.parent) + "/"
    text = text.replace(root, "")
    return re.sub(r"\S*/site-packages/", "site-packages/", text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(ms.SHAPES), default="cifar-fs")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    setting = ms.Setting(args.shape, 5, 5, 5, args.tasks, 1, "last-block", 20, torch.device("cpu"))
    batch = ms.random_tasks(setting, torch.Generator().manual_seed(0))
    runs = {
        "plain": ms.step_function(ms.build("plain", args.k, setting), "plain", batch, setting),
        "before": variant(setting, batch, args.k, vmapped=True, recompute=False),
        "single-task forward": variant(setting, batch, args.k, vmapped=False, recompute=False),
        "features recomputed": variant(setting, batch, args.k, vmapped=False, recompute=True),
    }
    for run in runs.values():
        run()  # warm-up
    times = ms.interleaved_seconds(runs, args.rounds, setting.device, 1e9, args.rounds)
    rows = {
        name: {
            "seconds": sorted(times[name])[len(times[name]) // 2],
            "ratio_to_plain": ms.paired_ratio(times[name], times["plain"]),
        }
        for name in runs
    }
    top = profile(runs["single-task forward"], 25)
    command = "python benchmarks/last_block_speed.py " + " ".join(sys.argv[1:])
    results = {"command": command, "setting": vars(args) | {"out": str(args.out)}, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "last_block_speed.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "# mrml with the last block adapted: seconds per meta-iteration against the plain step",
        "",
        f"Command: `{command}`; torch {torch.__version__}, {args.threads} thread(s); Conv4, "
        f"{args.shape} shapes, 5-way 5-shot 5-query, {args.tasks} tasks one at a time, "
        f"K={args.k} gradient steps, N=20 CG steps; {args.rounds} interleaved rounds.",
        "",
        "| variant | s/it (median) | × plain step (median, quartiles) |",
        "|---|---|---|",
    ]
    for name, row in rows.items():
        med, q1, q3 = row["ratio_to_plain"]
        lines.append(f"| {name} | {row['seconds']:.3f} | {med:.2f} ({q1:.2f}-{q3:.2f}) |")
    lines += ["", "cProfile of one meta-iteration (single-task forward):", "", "```", top, "```"]
    (args.out / "last_block_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
