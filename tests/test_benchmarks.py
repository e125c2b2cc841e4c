"""Tests for the bookkeeping of the benchmark scripts: the timing rounds, the paired ratios and
the wall-clock threshold, on made-up measurements whose answers are known by hand."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


memory_speed = load("memory_speed")
wallclock = load("wallclock")


def test_interleaved_rounds_rotate_the_order_and_spare_slow_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []
    clock = {"t": 0.0}  # a fake clock: each call advances it by the method's cost
    costs = {"plain": 1.0, "mrml": 1.25, "maml": 9.0}  # exact in binary
    runs = {}
    for name, cost in costs.items():

        def call(name: str = name, cost: float = cost) -> None:
            calls.append(name)
            clock["t"] += cost

        runs[name] = call
    monkeypatch.setattr(memory_speed.time, "perf_counter", lambda: clock["t"])
    times = memory_speed.interleaved_seconds(
        runs, rounds=4, device=torch.device("cpu"), slow=5.0, slow_rounds=2
    )
    # round r starts at the r-th method; maml (9x plain) only in rounds 0 and 1
    assert calls == ["plain", "mrml", "maml", "mrml", "maml", "plain", "plain", "mrml", "plain",
                     "mrml"]  # fmt: skip
    assert times == {"plain": [1.0] * 4, "mrml": [1.25] * 4, "maml": [9.0] * 2}


def test_paired_ratio_uses_rounds_not_medians() -> None:
    # the machine slows down in the last two rounds; mrml is 10% faster in every round
    other = [1.0, 1.0, 3.0, 3.0]
    mrml = [0.9, 0.9, 2.7, 2.7]
    med, q1, q3 = memory_speed.paired_ratio(mrml, other)
    assert (med, q1, q3) == pytest.approx((0.9, 0.9, 0.9), rel=1e-12)


def test_speed_target_holds_only_when_the_median_ratio_is_below_one() -> None:
    def row(method: str, k: int, seconds: list[float], peak: int = 100) -> dict:
        return {"method": method, "k": k, "peak_bytes": peak, "seconds": sorted(seconds)[1],
                "round_seconds": seconds}  # fmt: skip

    rows = [
        row("plain", 5, [1.0, 1.0, 1.0]),
        row("plain", 20, [1.0, 1.0, 1.0]),
        row("mrml", 5, [1.0, 1.0, 1.0]),
        row("mrml", 20, [1.1, 1.1, 1.1], peak=101),
        row("anil", 20, [1.0, 1.2, 1.2]),  # mrml faster in 2 of 3 rounds
        row("itd-bio", 20, [1.0, 1.0, 1.05]),  # mrml slower in 2 of 3 rounds
        row("maml", 20, [5.0, 5.0, 5.0], peak=2000),
    ]
    got = {desc: ok for desc, ok, _ in memory_speed.targets(rows, "cifar-fs")}
    assert got == {
        "mrml peak memory K=20 within 2% of K=5": True,
        "mrml peak memory K=20 <= 1.2x plain step": True,
        "mrml s/it K=20 <= 1.3x plain step": True,
        "mrml s/it K=20 below anil": True,
        "mrml s/it K=20 below itd-bio": False,
        "mrml s/it K=20 below maml": True,
        "MAML peak memory K=20 >= 10x mrml": True,  # 2000 / 101 = 19.8
    }


def test_wallclock_threshold_is_nine_tenths_of_the_best_validation_accuracy() -> None:
    runs = [
        {"method": "mrml", "best_val_accuracy": 0.9, "curve": [(10, 0.5), (20, 0.82), (30, 0.9)],
         "test_accuracy": 0.91, "test_ci95": 0.01},
        {"method": "anil", "best_val_accuracy": 0.95, "curve": [(12, 0.6), (25, 0.86), (40, 0.95)],
         "test_accuracy": 0.94, "test_ci95": 0.01},
        {"method": "maml", "best_val_accuracy": 0.5, "curve": [(15, 0.5)],
         "test_accuracy": 0.5, "test_ci95": 0.02},
    ]  # fmt: skip
    summary = wallclock.summarize(runs)
    assert summary["threshold"] == pytest.approx(0.855)
    assert [r["seconds_to_threshold"] for r in runs] == [30, 25, None]
    assert [ok for _, ok, _ in summary["targets"]] == [False, False]  # later, and 0.91 < 0.93
