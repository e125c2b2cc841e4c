"""The bookkeeping of benchmarks/memory_scale.py: the linear fit of memory in K, the K past the
limit, which methods get one, and the point that is predicted instead of run."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
_spec = importlib.util.spec_from_file_location("bench_memory_scale", BENCHMARKS / "memory_scale.py")
assert _spec is not None and _spec.loader is not None
memory_scale = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(memory_scale)


def test_linear_fit_and_the_k_past_the_limit() -> None:
    points = [(1, 3_000), (2, 5_000), (4, 9_000)]  # 1000 + 2000 K, exactly
    assert memory_scale.linear_fit(points) == pytest.approx((1_000.0, 2_000.0))
    # 1000 + 2000 K > 16000 first at K = 8 (K = 7.5 gives exactly 16000).
    assert memory_scale.k_exceeding(points, 16_000) == 8
    assert memory_scale.k_exceeding([(5, 10), (100, 10)], 16_000) is None  # flat
    assert memory_scale.linear_fit([(3, 7)]) == (7.0, 0.0)


def test_summary_predicts_only_for_the_unrolled_methods() -> None:
    rows = [
        {"method": "plain", "k": 0, "peak_bytes": 2e9},
        {"method": "mrml", "k": 5, "peak_bytes": 2e9},
        {"method": "mrml", "k": 100, "peak_bytes": 2e9 + 8},  # rounding noise, not growth
        {"method": "maml", "k": 1, "peak_bytes": 3e9},
        {"method": "maml", "k": 2, "peak_bytes": 5e9},
        {"method": "anil", "k": 1, "peak_bytes": 10e9},
        {"method": "anil", "k": 2, "peak_bytes": 17e9},
    ]
    got = {s["method"]: s for s in memory_scale.summary(rows, 16.0)}
    assert got["mrml"]["k_exceeding"] is None and got["mrml"]["k_exceeding_is"] == "never (flat)"
    assert got["maml"]["k_exceeding"] == 8 and got["maml"]["k_exceeding_is"] == "predicted"
    assert got["anil"]["k_exceeding"] == 2 and got["anil"]["k_exceeding_is"] == "measured"
    assert got["maml"]["max_vs_plain"] == pytest.approx(2.5)


def test_a_point_predicted_past_the_limit_is_not_run(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_measure(method: str, k: int, setting: object, warmup: int) -> int:
        calls.append((method, k))
        return int(1e9 + 2e9 * k)

    monkeypatch.setattr(memory_scale, "measure_memory", fake_measure)
    args = argparse.Namespace(ks_for={"maml": [1, 2, 20]}, limit_gb=16.0, memory_warmup=0)
    rows = memory_scale.memory_rows(args, setting=None)
    assert calls == [("maml", 1), ("maml", 2)]
    assert rows[-1] == {"method": "maml", "k": 20, "predicted_bytes": pytest.approx(41e9)}
