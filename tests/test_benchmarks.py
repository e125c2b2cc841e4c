"""Tests for the bookkeeping of the benchmark scripts: the timing rounds, the paired ratios and
the wall-clock threshold, on made-up measurements whose answers are known by hand."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from _benchmark_scripts import BENCHMARKS, load_benchmark

memory_speed = load_benchmark("memory_speed")
fair = load_benchmark("fair_comparison")
sys.path.insert(0, str(BENCHMARKS))
fair_report = load_benchmark("fair_report")


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
    assert calls == [
        "plain",
        "mrml",
        "maml",
        "mrml",
        "maml",
        "plain",
        "plain",
        "mrml",
        "plain",
        "mrml",
    ]
    assert times == {"plain": [1.0] * 4, "mrml": [1.25] * 4, "maml": [9.0] * 2}


def test_paired_ratio_uses_rounds_not_medians() -> None:
    # the machine slows down in the last two rounds; mrml is 10% faster in every round
    other = [1.0, 1.0, 3.0, 3.0]
    mrml = [0.9, 0.9, 2.7, 2.7]
    med, q1, q3 = memory_speed.paired_ratio(mrml, other)
    assert (med, q1, q3) == pytest.approx((0.9, 0.9, 0.9), rel=1e-12)


def test_speed_target_holds_only_when_the_median_ratio_is_below_one() -> None:
    def row(method: str, k: int, seconds: list[float], peak: int = 100) -> dict:
        return {
            "method": method,
            "k": k,
            "peak_bytes": peak,
            "seconds": sorted(seconds)[1],
            "round_seconds": seconds,
        }

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


def _final_run(row: str, seed: int, test: float, curve: list, norm: float | None = 1e-7) -> dict:
    return {
        "row": row,
        "seed": seed,
        "result": {"test_accuracy": test, "test_ci95": 0.01},
        "curve": curve,
        "best_val": max(a for _, a in curve),
        "iterations": 100,
        "inner_grad_norm_max": norm,
        "inner_iterations_mean": 6.0 if norm else None,
        "config": {"lr": 0.001},
        "frozen_backbone": {"stdout": f"test accuracy: {100 * test - 1:.2f}% ± 0.5% ..."},
    }


def test_fair_report_targets_and_margins() -> None:
    final = {
        "runs": [
            _final_run("mrml", 0, 0.95, [(10, 0.5), (20, 0.86), (30, 0.9)]),
            _final_run("mrml", 1, 0.93, [(10, 0.6), (25, 0.87), (30, 0.9)]),
            _final_run("anil", 0, 0.90, [(12, 0.6), (40, 0.85)], None),
            _final_run("anil", 1, 0.92, [(12, 0.6), (22, 0.82)], None),
            {"row": "maml", "seed": 0, "failed": "boom"},
        ]
    }
    rows = fair_report.rows_of(final)
    assert list(rows) == ["mrml", "anil"]  # a failed run is left out
    threshold = 0.9 * 0.9  # mrml's mean best validation
    summary = {name: fair_report.summarise_row(runs, threshold) for name, runs in rows.items()}
    assert summary["mrml"]["time_to_threshold"] == [20, 25]
    assert summary["anil"]["time_to_threshold"] == [40, 22]
    assert summary["mrml"]["frozen"][0] == pytest.approx(0.93)
    cost = {"ratio_median": 1.05, "ratio_quartiles": [1.0, 1.1], "rounds": 7}
    lines = fair_report.targets(summary, cost)
    # mean 0.94 vs 0.91: +3 points > max std (1.41): holds; time 22.5 vs 31: holds
    assert "+3.00 points" in lines[0] and lines[0].endswith("holds")
    assert lines[1].endswith("holds")
    assert "1.00e-07" in lines[2] and lines[2].endswith("holds")
    assert lines[3].endswith("missed by 5.0%") and "head work" not in lines[3]
    cost.update(mrml_head_share_median=0.0625, mrml_without_head_ratio_median=0.985)
    line = fair_report.targets(summary, cost)[3]
    assert "head work (solve and hypergradient) 6.2% of its iteration" in line
    assert "without it / ANIL 0.985" in line and line.endswith("missed by 5.0%")


def test_stopwatch_counts_the_time_inside_its_wrapped_calls_even_when_they_raise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = {"t": 0.0}
    monkeypatch.setattr(fair.time, "perf_counter", lambda: clock["t"])

    def work(seconds: float) -> float:
        clock["t"] += seconds
        if seconds > 1:
            raise RuntimeError("too long")
        return seconds

    watch = fair.Stopwatch()
    timed = watch.wrap(work)
    assert timed(0.25) == 0.25 and timed(seconds=0.5) == 0.5
    clock["t"] += 10.0  # time outside the wrapped calls is not counted
    with pytest.raises(RuntimeError, match="too long"):
        timed(2.0)
    assert watch.seconds == 2.75


def test_fair_report_calls_a_tie_a_tie() -> None:
    final = {
        "runs": [
            _final_run("mrml", 0, 0.93, [(10, 0.9)]),
            _final_run("mrml", 1, 0.95, [(10, 0.9)]),
            _final_run("itd-bio", 0, 0.935, [(5, 0.9)]),
            _final_run("itd-bio", 1, 0.94, [(5, 0.9)]),
        ]
    }
    summary = {n: fair_report.summarise_row(r, 0.81) for n, r in fair_report.rows_of(final).items()}
    lines = fair_report.targets(summary, None)
    assert lines[0].endswith("tie") and lines[1].endswith("missed")


def test_fair_report_first_order_and_implicit_maml_within_three_points() -> None:
    final = {
        "runs": [
            _final_run("mrml", 0, 0.96, [(10, 0.9)]),
            _final_run("maml", 0, 0.92, [(50, 0.9)]),
            _final_run("fomaml", 0, 0.895, [(40, 0.9)]),  # 2.5 points below maml
            _final_run("imaml", 0, 0.885, [(40, 0.9)]),  # 3.5 points below maml
        ]
    }
    summary = {n: fair_report.summarise_row(r, 0.81) for n, r in fair_report.rows_of(final).items()}
    lines = [line for line in fair_report.targets(summary, None) if "points of maml" in line]
    assert len(lines) == 2
    assert lines[0].startswith("fomaml") and "(-2.50 points)" in lines[0]
    assert lines[0].endswith("holds")
    assert lines[1].startswith("imaml") and lines[1].endswith("missed by 0.50 points")


def test_fair_jobs_interleave_methods_and_the_log_resumes(tmp_path: Path) -> None:
    groups = [[{"name": f"{m}{i}"} for i in range(2)] for m in "abc"]
    order = [j["name"] for j in fair.interleave(groups)]
    assert order == ["a0", "b0", "c0", "b1", "c1", "a1"]  # each round starts one method later
    log = tmp_path / "log.jsonl"
    log.write_text('{"name": "a0", "result": {}}\n{"name": "b0", "res')  # torn last line
    assert [r["name"] for r in fair.read_log(log)] == ["a0"]


def test_every_logged_run_records_the_runs_beside_it_and_the_machine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Jobs a, b, c on two workers, ordered by events: a and b start together, b ends, c starts
    while a still runs. So a ran beside b and c (c only from midway), b and c beside a alone;
    a failed run records them too; the machine is named in every run."""
    started = {name: threading.Event() for name in "abc"}

    def fake_run(job: dict, _: object) -> dict:
        name = job["name"]
        started[name].set()
        waits = {"a": "c", "b": "a"}  # a ends after c started; b after a started
        if name in waits:
            assert started[waits[name]].wait(timeout=10)
        return {**job, "failed": "boom"} if name == "c" else {**job, "result": {}}

    monkeypatch.setattr(fair, "run_job", fake_run)
    log = tmp_path / "stage.jsonl"
    jobs = [{"name": name, "options": {}} for name in "abc"]
    fair.run_all(jobs, argparse.Namespace(workers=2), log)
    logged = {run["name"]: run for run in fair.read_log(log)}
    assert {name: run["beside"] for name, run in logged.items()} == {
        "a": ["b", "c"], "b": ["a"], "c": ["a"]
    }  # fmt: skip
    machine = fair.machine_description()
    assert machine["cpu"] and machine["cores"] >= 1
    assert all(run["machine"] == machine for run in logged.values())


def test_fair_report_speed_within_one_validation_spacing_is_a_tie() -> None:
    final = {
        "runs": [
            _final_run("mrml", 0, 0.95, [(20, 0.9)]),
            _final_run("anil", 0, 0.90, [(40, 0.9)]),
            _final_run("maml", 0, 0.80, [(100, 0.9)]),
        ]
    }
    summary = {n: fair_report.summarise_row(r, 0.81) for n, r in fair_report.rows_of(final).items()}
    lines = [line for line in fair_report.targets(summary, None, spacing=20.0) if "speed" in line]
    assert lines[0].endswith("tie (within the 20 s validation spacing)")  # 20 s vs 40 s
    assert lines[1].endswith("holds")  # 20 s vs 100 s
    never = {n: fair_report.summarise_row(r, 0.99) for n, r in fair_report.rows_of(final).items()}
    speeds = [line for line in fair_report.targets(never, None) if "speed" in line]
    assert all(line.endswith("tie") for line in speeds)  # nobody reached the threshold


def test_long_rows_take_the_baselines_best_on_validation_not_test() -> None:
    runs = [
        {"row": "anil", "best_val": 0.90, "seed": 0},
        {"row": "anil", "best_val": 0.92, "seed": 1},
        {"row": "maml", "best_val": 0.95, "seed": 0},  # best on validation
        {"row": "imaml", "best_val": 0.80, "seed": 0},
        {"row": "mrml", "best_val": 0.99, "seed": 0},  # not a baseline
        {"row": "mrml-paper", "best_val": 0.99, "seed": 0},  # nor an extra row
        {"row": "fomaml", "failed": "boom", "seed": 0},
    ]
    assert fair.best_baselines(runs, 2) == ["maml", "anil"]


def test_fair_report_reads_a_running_stage_from_its_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fair_report, "RESULTS", tmp_path)
    args = argparse.Namespace(ways=5, shots=1, grid="2x2")
    assert fair_report._stage("final", args) is None
    options = {"time_budget": 600.0, "val_every_seconds": 20.0, "test_tasks": 600}
    runs = [
        {**_final_run("mrml", 0, 0.95, [(20, 0.9)]), "options": options},
        {**_final_run("anil", 0, 0.90, [(40, 0.9)]), "options": options},
    ]
    log = tmp_path / "fair_final_5way1shot.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in runs) + '{"row": "ma')  # torn line
    stage = fair_report._stage("final", args)
    assert stage is not None and stage["partial"] and len(stage["runs"]) == 2
    text = fair_report.markdown("5way1shot", None, stage, None)
    assert "**Partial**: 2 runs logged" in text
    assert "tie (within the 20 s validation spacing)" in text
    long = {"budget_cpu_seconds": 3600.0, "command": "x", "runs": runs}
    table = "\n".join(fair_report.long_markdown(long))
    assert "## Long budget (1 h of training CPU time, seed 0)" in table
    assert "| mrml | 0 | 100 | 90.00% | 95.00% ± 1.00% | 94.00% |" in table
    assert "mean ± std" not in table.split("\n", 4)[-1]  # one seed per row: no mean line


def test_long_report_gives_a_row_with_several_seeds_its_mean_and_std() -> None:
    runs = [  # in the order a resumed stage logs them: seed by seed, not row by row
        _final_run("mrml", 0, 0.97, [(60, 0.98)]),
        _final_run("imaml", 0, 0.80, [(60, 0.88)]),
        _final_run("imaml", 2, 0.90, [(60, 0.93)]),
        _final_run("mrml", 1, 0.96, [(60, 0.97)]),
        _final_run("imaml", 1, 0.94, [(60, 0.95)]),
    ]
    runs[4] = {**runs[4], "iterations": 130}

    def table_of(runs: list[dict]) -> list[str]:
        long = {"budget_cpu_seconds": 3600, "command": "x", "runs": runs}
        return fair_report.long_markdown(long)

    lines = table_of(runs)
    assert "(1 h of training CPU time, seeds 0, 1, 2)" in lines[0]
    assert "the baseline with the best" in lines[2]  # one baseline, however many seeds
    rows = [[cell.strip() for cell in line.split("|")[1:3]] for line in lines[6:]]
    assert rows == [
        ["mrml", "0"], ["mrml", "1"], ["mrml, mean ± std over 2 seeds", ""],
        ["imaml", "0"], ["imaml", "1"], ["imaml", "2"], ["imaml, mean ± std over 3 seeds", ""],
    ]  # fmt: skip
    # imaml: tests 80, 94, 90: mean 88.00, sample std 7.21; frozen 79, 93, 89; val 88, 95, 93
    assert lines[-1] == (
        "| imaml, mean ± std over 3 seeds | | 110 | 92.00% ± 3.61% | 88.00% ± 7.21% "
        "| 87.00% ± 7.21% |"
    )
    no_frozen = [{**r, "frozen_backbone": None} if r["seed"] == 2 else r for r in runs]
    assert table_of(no_frozen)[-1].endswith("| 88.00% ± 7.21% | — |")  # not over 2 of 3
    failed = [*runs, {"row": "imaml", "seed": 3, "failed": "boom"}]
    lines = table_of(failed)
    assert "| imaml | 3 | failed | — | — | — |" in lines
    assert lines[-1].startswith("| imaml, mean ± std over 3 seeds |")  # failed seed not averaged
    one_each = table_of([runs[0], runs[1]])
    assert not any("mean ± std" in line for line in one_each)


def _fake_stage(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    selected: dict[str, dict],
    final: list[dict] | None = None,
    **options: object,
) -> tuple[list[dict], argparse.Namespace]:
    """A stage's surroundings in ``tmp_path``: the tuning's ``selected`` settings, the final
    stage's log (``final``), ``run_job`` replaced by a recorder; returns the jobs it ran and the
    arguments (common ones, then ``options``). One worker, so that the recorder sees the jobs
    in the order the stage submits them (with two, which of two threads calls first is a
    race)."""
    monkeypatch.setattr(fair, "RESULTS", tmp_path)
    (tmp_path / "fair_tuning_5way1shot.json").write_text(json.dumps({"selected": selected}))
    if final is not None:
        (tmp_path / "fair_final_5way1shot.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in final)
        )
    ran: list[dict] = []

    def fake_run(job: dict, _: object) -> dict:
        ran.append(job)
        return {**job, "result": {"test_accuracy": 0.9, "test_ci95": 0.01}}

    monkeypatch.setattr(fair, "run_job", fake_run)
    args = argparse.Namespace(
        ways=5, shots=1, queries=15, meta_batch=16, val_tasks=200, data_root=None,
        validations=30, test_tasks=600, runs=tmp_path / "runs", workers=1,
        long_budget=3600.0, long_baselines=2, long_seeds=1, long_rows=None, grid="2x2",
    )  # fmt: skip
    for key, value in options.items():
        setattr(args, key, value)
    return ran, args


def test_every_grid_gives_every_method_the_same_number_of_distinct_configurations() -> None:
    for name, grid in fair.GRIDS.items():
        assert tuple(grid) == fair.METHODS, name
        rows, columns = (int(n) for n in name.split("x"))
        assert {len(configs) for configs in grid.values()} == {rows * columns}, name
        for method, configs in grid.items():
            assert len({json.dumps(c, sort_keys=True) for c in configs}) == len(configs), method


@pytest.mark.parametrize("grid", sorted(fair.GRIDS))
def test_every_grid_configuration_is_a_command_line_the_train_command_accepts(grid: str) -> None:
    from mrmeta.cli import build_parser, config_from_args

    common = fair._common(argparse.Namespace(
        ways=20, shots=1, queries=5, meta_batch=16, val_tasks=200, data_root=None
    ))  # fmt: skip
    for method, configs in fair.GRIDS[grid].items():
        for config in configs:
            flags = fair._flags({**common, "algo": method, "seed": 0, **config})
            args = build_parser().parse_args(["train", "--out", "unused", *flags])
            built = config_from_args(args)  # a key the method does not have is refused here
            assert {key: getattr(built, key) for key in config} == config, (method, config)


def test_tune_stage_of_a_new_grid_keeps_to_its_own_files_and_selects_on_validation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran, args = _fake_stage(
        tmp_path, monkeypatch, {"mrml": {"lr": 1.0}}, methods=["mrml", "anil"], grid="3x3",
        tune_budget=240.0, tune_validations=6,
    )  # fmt: skip
    # distinct scores, best at configuration 2 for mrml and 4 for anil
    scores = {(m, i): 0.5 + 0.01 * ((k * i) % 9) for m, k in (("mrml", 4), ("anil", 2))
              for i in range(9)}  # fmt: skip

    def fake_run(job: dict, _: object) -> dict:
        ran.append(job)
        if "method" not in job:  # a final-stage job
            return {**job, "result": {}}
        index = fair.GRIDS["3x3"][job["method"]].index(job["config"])
        return {**job, "result": {}, "best_val": scores[job["method"], index]}

    monkeypatch.setattr(fair, "run_job", fake_run)
    monkeypatch.setattr(fair.sys, "argv", ["fair_comparison.py", "tune", "--grid", "3x3"])
    earlier = (tmp_path / "fair_tuning_5way1shot.json").read_text()
    fair.tune(args)
    assert len(ran) == 18
    assert [j["method"] for j in ran[:4]] == ["mrml", "anil", "anil", "mrml"]  # interleaved
    for job in ran:
        options = job["options"]
        assert (options["time_budget"], options["val_every_seconds"]) == (240.0, 40.0)
        assert options["test_tasks"] == 0 and options["seed"] == 0
        assert Path(job["run_dir"]).name.startswith(f"tune-5way1shot_grid3x3-{job['method']}-")
    written = json.loads((tmp_path / "fair_tuning_5way1shot_grid3x3.json").read_text())
    assert written["selected"]["mrml"] == fair.GRIDS["3x3"]["mrml"][2]
    assert written["selected"]["anil"] == fair.GRIDS["3x3"]["anil"][4]
    assert written["grid"] == "3x3" and written["grids"]["anil"] == fair.GRIDS["3x3"]["anil"]
    assert (tmp_path / "fair_tuning_5way1shot.json").read_text() == earlier  # 2x2's untouched
    assert len((tmp_path / "fair_tuning_5way1shot_grid3x3.jsonl").read_text().splitlines()) == 18
    args.methods = ["mrml"]
    fair.final(argparse.Namespace(**{**vars(args), "extra_rows": [], "seeds": 1, "budget": 600.0}))
    final_job = ran[-1]
    assert final_job["options"]["lr"] == written["selected"]["mrml"]["lr"]  # the 3x3 selection
    assert Path(final_job["run_dir"]).name == "final-5way1shot_grid3x3-mrml-seed0"
    assert (tmp_path / "fair_final_5way1shot_grid3x3.json").exists()
    assert not (tmp_path / "fair_final_5way1shot.json").exists()
    (tmp_path / "fair_final_5way1shot_grid3x3.jsonl").write_text("")
    with pytest.raises(SystemExit, match="run 'final --ways 5 --grid 3x3' first"):
        fair.long(args)  # the 3x3 study's final stage has no baselines: its own log is read


def test_fair_report_of_a_tuning_stage_still_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fair_report, "RESULTS", tmp_path)
    options = {"time_budget": 240.0, "val_tasks": 200, "test_tasks": 0, "seed": 0}
    runs = [
        {"method": "mrml", "config": {"lr": 0.001}, "options": options, "best_val": 0.8,
         "iterations": 90},
        {"method": "anil", "config": {"lr": 0.01}, "options": options, "failed": "diverged"},
    ]  # fmt: skip
    (tmp_path / "fair_tuning_5way1shot_grid3x3.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in runs)
    )
    args = argparse.Namespace(ways=5, shots=1, grid="3x3")
    monkeypatch.setattr(fair_report, "plot", lambda *_: None)
    fair_report.report(args)
    text = (tmp_path / "fair_5way1shot_grid3x3.md").read_text()
    assert text.startswith("# Fair comparison, Omniglot 5way1shot, grid 3x3 (Lake split): tuning")
    assert "**Partial**: 2 configurations run so far; nothing is selected" in text
    assert "fair_comparison.py tune --ways 5 --grid 3x3 (still running)" in text
    assert '| mrml | `{"lr": 0.001}` | 90 | 80.00% |' in text
    assert '| anil | `{"lr": 0.01}` | — | failed |' in text


def test_final_stage_runs_every_selected_row_and_the_extra_rows_over_seeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    selected = {"mrml": {"lr": 0.003, "l2": 0.1}, "anil": {"lr": 0.001, "inner_lr": 0.1}}
    ran, args = _fake_stage(
        tmp_path, monkeypatch, selected, methods=["mrml", "anil", "maml"],
        extra_rows=["mrml-learn-head-init"], seeds=2, budget=600.0,
    )  # fmt: skip
    fair.final(args)
    assert sorted(j["name"] for j in ran) == sorted(
        f"final {row} seed {seed}"
        for row in ("mrml", "anil", "mrml-learn-head-init")  # maml: not tuned, not run
        for seed in (0, 1)
    )
    for job in ran:
        options, extra = job["options"], job["row"] == "mrml-learn-head-init"
        assert options["algo"] == ("mrml" if extra else job["row"])
        assert options["seed"] == job["seed"] and options["threads"] == 1
        assert (options["time_budget"], options["val_every_seconds"]) == (600.0, 20.0)
        assert options["lr"] == selected[options["algo"]]["lr"]
        assert options.get("learn_head_init", False) is extra
        assert job["run_dir"].endswith(f"final-5way1shot-{job['row']}-seed{job['seed']}")
    assert [j["row"] for j in ran[:3]] == ["mrml", "anil", "mrml-learn-head-init"]  # interleaved


def test_long_stage_runs_mrml_and_the_two_best_baselines_at_their_tuned_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    selected = {m: {"lr": 0.001 * (i + 1)} for i, m in enumerate(fair.METHODS)}
    ran, args = _fake_stage(tmp_path, monkeypatch, selected)
    with pytest.raises(SystemExit, match="run 'final --ways 5' first"):
        fair.long(args)  # no final stage yet: nothing to choose the baselines on
    final = [{"row": r, "best_val": v, "seed": 0} for r, v in (("anil", 0.9), ("maml", 0.8))]
    final.append({"row": "imaml", "best_val": 0.95, "seed": 0})
    ran, args = _fake_stage(tmp_path, monkeypatch, selected, final)
    fair.long(args)
    assert [j["row"] for j in ran] == ["mrml", "imaml", "anil"]
    for job in ran:
        options = job["options"]
        assert options["algo"] == job["row"] and options["lr"] == selected[job["row"]]["lr"]
        assert (options["time_budget"], options["val_every_seconds"]) == (3600.0, 120.0)
        assert options["test_tasks"] == 600 and options["seed"] == 0 and options["threads"] == 1
    written = json.loads((tmp_path / "fair_long_5way1shot.json").read_text())
    assert [r["row"] for r in written["runs"]] == ["mrml", "imaml", "anil"]
    assert written["baselines"] == ["imaml", "anil"]


def test_long_stage_with_one_baseline_runs_the_best_and_a_later_call_adds_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    selected = {m: {"lr": 0.001} for m in fair.METHODS}
    final = [{"row": r, "best_val": v, "seed": 0} for r, v in (("anil", 0.9), ("maml", 0.8))]
    ran, args = _fake_stage(tmp_path, monkeypatch, selected, final, long_baselines=1)
    fair.long(args)
    assert [j["row"] for j in ran] == ["mrml", "anil"]
    args.long_baselines = 2
    fair.long(args)  # resumes by job name: only the second baseline is new
    assert [j["row"] for j in ran] == ["mrml", "anil", "maml"]
    written = json.loads((tmp_path / "fair_long_5way1shot.json").read_text())
    assert [r["row"] for r in written["runs"]] == ["mrml", "anil", "maml"]


def test_long_stage_adds_seeds_of_the_rows_asked_for_and_keeps_every_logged_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    selected = {m: {"lr": 0.001} for m in fair.METHODS}
    final = [{"row": r, "best_val": v, "seed": 0} for r, v in (("anil", 0.9), ("maml", 0.8))]
    ran, args = _fake_stage(tmp_path, monkeypatch, selected, final)
    monkeypatch.setattr(fair.sys, "argv", ["fair_comparison.py", "long"])
    fair.long(args)
    assert [(j["row"], j["seed"]) for j in ran] == [("mrml", 0), ("anil", 0), ("maml", 0)]
    args.long_seeds, args.long_rows = 3, ["maml"]
    monkeypatch.setattr(fair.sys, "argv", ["fair_comparison.py", "long", "--long-seeds", "3"])
    fair.long(args)  # only maml's seeds 1 and 2 are new
    assert [(j["row"], j["seed"]) for j in ran[3:]] == [("maml", 1), ("maml", 2)]
    assert [j["options"]["seed"] for j in ran[3:]] == [1, 2]
    folders = [Path(j["run_dir"]).name for j in ran]
    assert folders[2:] == ["long-5way1shot-maml", "long-5way1shot-maml-seed1",
                           "long-5way1shot-maml-seed2"]  # fmt: skip
    written = json.loads((tmp_path / "fair_long_5way1shot.json").read_text())
    assert [(r["row"], r["seed"]) for r in written["runs"]] == [
        ("mrml", 0), ("anil", 0), ("maml", 0), ("maml", 1), ("maml", 2)
    ]  # fmt: skip
    assert written["command"] == "fair_comparison.py long; fair_comparison.py long --long-seeds 3"
    args.long_seeds, args.long_rows = 1, None
    monkeypatch.setattr(fair.sys, "argv", ["fair_comparison.py", "long"])
    fair.long(args)  # fewer seeds than logged: nothing runs, nothing is dropped from the file
    assert len(ran) == 5
    written = json.loads((tmp_path / "fair_long_5way1shot.json").read_text())
    assert [(r["row"], r["seed"]) for r in written["runs"]] == [
        ("mrml", 0), ("anil", 0), ("maml", 0), ("maml", 1), ("maml", 2)
    ]  # fmt: skip
    assert written["command"] == "fair_comparison.py long --long-seeds 3; fair_comparison.py long"
    args.long_rows = ["fomaml"]
    with pytest.raises(SystemExit, match="--long-rows fomaml is not among"):
        fair.long(args)
    path = tmp_path / "fair_long_5way1shot.json"
    path.write_text(json.dumps({"runs": []}))  # a file from before "command" was kept
    args.long_rows = None
    fair.long(args)
    assert json.loads(path.read_text())["command"] == "fair_comparison.py long"


def test_cost_rounds_alternate_the_order_and_attribute_head_time_to_its_learner(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = {"t": 0.0}
    monkeypatch.setattr(fair.time, "perf_counter", lambda: clock["t"])
    watch = fair.Stopwatch()
    calls: list[str] = []

    class FakeLearner:
        """A meta-step of ``total`` seconds, ``head`` of them inside the watched call."""

        def __init__(self, name: str, total: float, head: float) -> None:
            self.name, self.total, self.head = name, total, head
            self.solve = watch.wrap(lambda: clock.__setitem__("t", clock["t"] + self.head))

        def meta_step(self, batch: object, optimizer: object) -> None:
            calls.append(self.name)
            clock["t"] += self.total - self.head
            if self.head:
                self.solve()

    learners = {
        "mrml": (FakeLearner("mrml", 3.0, 0.25), None),
        "anil": (FakeLearner("anil", 2.5, 0.0), None),
    }
    times, head = fair.cost_rounds(learners, [object(), object()], 3, watch)
    assert calls == ["mrml"] * 2 + ["anil"] * 2 + ["anil"] * 2 + ["mrml"] * 4 + ["anil"] * 2
    assert times == {"mrml": [3.0] * 3, "anil": [2.5] * 3}
    assert head == {"mrml": [0.25] * 3}


def _timed(run: dict, spacing: float) -> dict:
    """A final or speed run as the stage logs it: with the options it ran under."""
    return {**run, "options": {"val_every_seconds": spacing, "time_budget": 600.0,
                               "test_tasks": 600}}  # fmt: skip


def test_undecided_rows_are_the_baselines_within_one_spacing_of_mrml() -> None:
    # mrml's mean best validation 0.95: threshold 0.855; mrml reaches it at 40 s on average
    runs = [
        _final_run("mrml", 0, 0.96, [(20, 0.5), (40, 0.9), (60, 0.94)]),
        _final_run("mrml", 1, 0.96, [(20, 0.5), (40, 0.86), (60, 0.96)]),
        _final_run("fomaml", 0, 0.9, [(40, 0.8), (60, 0.86)]),  # 60 s: one spacing later
        _final_run("anil", 0, 0.9, [(40, 0.8), (60, 0.8), (80, 0.87)]),  # 80 s: two
        _final_run("imaml", 0, 0.9, [(20, 0.88)]),  # 20 s: one spacing earlier
        _final_run("maml", 0, 0.9, [(20, 0.5)]),  # never
        _final_run("mrml-learn-head-init", 0, 0.9, [(40, 0.9)]),  # not a baseline
        {"row": "itd-bio", "seed": 0, "failed": "boom"},
    ]
    assert fair.speed_threshold(runs) == pytest.approx(0.855)
    assert fair.undecided_rows(runs, 20.0) == ["fomaml", "imaml"]
    assert fair.undecided_rows(runs, 19.0) == []
    assert fair.undecided_rows([r for r in runs if r["row"] != "mrml"], 20.0) == []


def test_speed_stage_reruns_the_undecided_rows_on_validation_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    selected = {m: {"lr": 0.001 * (i + 1)} for i, m in enumerate(fair.METHODS)}
    final = [
        _timed(_final_run("mrml", seed, 0.96, [(20, 0.5), (40, 0.9)]), 20.0) for seed in (0, 1)
    ] + [
        _timed(_final_run("fomaml", 0, 0.9, [(40, 0.8), (61, 0.9)]), 20.0),  # 21 s later: the
        _timed(_final_run("fomaml", 1, 0.9, [(40, 0.8), (59, 0.9)]), 20.0),  # mean is 20 s
        _timed(_final_run("anil", 0, 0.9, [(40, 0.8), (80, 0.9)]), 20.0),  # 40 s: decided
        _timed(_final_run("anil", 1, 0.9, [(40, 0.8), (400, 0.9)]), 20.0),  # not rerun
    ]
    ran, args = _fake_stage(tmp_path, monkeypatch, selected, final, speed_spacing=4.0)
    monkeypatch.setattr(fair.sys, "argv", ["fair_comparison.py", "speed"])
    with pytest.raises(SystemExit, match="the final stage has not finished"):
        fair.speed(args)  # its log alone is not enough
    (tmp_path / "fair_final_5way1shot.json").write_text(json.dumps({"runs": final}))
    fair.speed(args)
    assert [(j["row"], j["seed"]) for j in ran] == [
        ("mrml", 0), ("fomaml", 0), ("fomaml", 1), ("mrml", 1)
    ]  # fmt: skip
    for job in ran:
        options = job["options"]
        assert job["config"] == selected[job["row"]]
        # the latest final time of a rerun row (61 s) + one spacing (20 s), in whole 4 s steps
        assert (options["time_budget"], options["val_every_seconds"]) == (84.0, 4.0)
        assert options["test_tasks"] == 0 and not job["frozen_backbone_test"]
        assert Path(job["run_dir"]).name == f"speed-5way1shot-{job['row']}-seed{job['seed']}"
        assert job["name"].startswith("speed (84 s, every 4 s) ")
    written = json.loads((tmp_path / "fair_speed_5way1shot.json").read_text())
    assert written["rows"] == ["mrml", "fomaml"] and written["seeds"] == [0, 1]
    assert written["threshold"] == pytest.approx(0.81) and written["final_val_every_seconds"] == 20


def test_fair_report_takes_the_speed_target_of_the_undecided_rows_from_the_speed_stage() -> None:
    final = {
        "runs": [
            _timed(_final_run("mrml", 0, 0.95, [(20, 0.5), (40, 0.9)]), 20.0),
            _timed(_final_run("fomaml", 0, 0.90, [(40, 0.8), (60, 0.9)]), 20.0),
            _timed(_final_run("anil", 0, 0.90, [(40, 0.8), (60, 0.8), (80, 0.9)]), 20.0),
        ],
        "command": "fair_comparison.py final",
        "seeds": 1,
        "budget_cpu_seconds": 600.0,
        "test_tasks": 600,
    }
    coarse = fair_report.markdown("5way1shot", None, final, None)
    assert "vs fomaml: mrml 40 s against 60 s (mean over seeds): tie (within the 20 s" in coarse

    def speed_stage(mrml_curve: list, fomaml_curve: list, **changes: object) -> dict:
        runs = [_timed(_final_run("mrml", 0, 0.0, mrml_curve), 4.0),
                _timed(_final_run("fomaml", 0, 0.0, fomaml_curve), 4.0),
                _timed(_final_run("anil", 0, 0.0, [(4, 0.9)]), 4.0)]  # fmt: skip
        stage = {"command": "fair_comparison.py speed", "budget_cpu_seconds": 80.0,
                 "val_every_seconds": 4.0, "threshold": 0.81, "seeds": [0],
                 "rows": ["mrml", "fomaml"], "runs": runs}  # fmt: skip
        return {**stage, **changes}

    def speed_lines(speed: dict) -> list[str]:
        text = fair_report.markdown("5way1shot", None, final, None, speed=speed)
        return [line for line in text.splitlines() if "speed" in line.lower()]

    lines = speed_lines(speed_stage([(4, 0.5), (32, 0.9)], [(36, 0.8), (44, 0.9)]))
    # fomaml: 32 s against 44 s, 12 s apart on a 4 s grid
    assert (
        "- speed to 0.9 × mrml's best validation vs fomaml: mrml 32 s against 44 s (mean over "
        "seeds) (speed stage, validated every 4 s): holds"
    ) in lines
    # anil was decided by the final stage (40 s against 80 s): a speed run of it is not used
    assert "vs anil: mrml 40 s against 80 s (mean over seeds): holds" in "\n".join(lines)
    assert "## Speed to accuracy, validated every 4 s of training" in lines
    close = speed_lines(speed_stage([(32, 0.9)], [(36, 0.9)]))
    assert any("against 36 s (mean over seeds) (speed stage, validated every 4 s): tie" in line
               for line in close)  # fmt: skip
    cut = speed_lines(speed_stage([(32, 0.9)], [(36, 0.8)]))  # fomaml not there within 80 s
    assert any("vs fomaml: mrml 40 s against 60 s (mean over seeds) (the speed stage cut a run "
               "off before the threshold: final stage's): tie" in line for line in cut)  # fmt: skip
    stale = speed_lines(speed_stage([(32, 0.9)], [(44, 0.9)], seeds=[0, 1]))
    assert any("made from other final results" in line for line in stale)
    assert any("vs fomaml: mrml 40 s against 60 s (mean over seeds): tie" in line for line in stale)
    running = fair_report.markdown(
        "5way1shot", None, {**final, "partial": True}, None,
        speed=speed_stage([(32, 0.9)], [(44, 0.9)]),
    )  # fmt: skip
    assert "speed stage, validated" not in running


def _logged_run(name: str, seconds: float) -> dict:
    options = {"algo": "anil", "lr": 0.001, "time_budget": 240.0, "val_every_seconds": 40.0,
               "iterations": 10**7, "val_tasks": 200, "test_tasks": 0}  # fmt: skip
    return {"name": name, "options": options, "result": {}, **_per_iteration(seconds)}


def _per_iteration(seconds: float) -> dict:
    """A run summary's seconds per iteration, wall and CPU alike."""
    return {"median_seconds_per_iteration": seconds, "median_cpu_seconds_per_iteration": seconds}


def _machine(
    monkeypatch: pytest.MonkeyPatch, seconds: float | dict[str, float] | None
) -> list[dict]:
    """``run_job`` replaced: calibration runs take ``seconds`` per iteration, or
    ``seconds[a]`` for a run of algorithm ``a`` (``None``: they fail); every job it is given
    is recorded."""
    ran: list[dict] = []

    def fake_run(job: dict, _: object) -> dict:
        ran.append(job)
        if job["name"].startswith("calibration"):
            if seconds is None:
                return {**job, "failed": "boom"}
            here = seconds[job["options"]["algo"]] if isinstance(seconds, dict) else seconds
            return {**job, "result": {}, **_per_iteration(here)}
        return {**job, "result": {}, "best_val": 0.5}

    monkeypatch.setattr(fair, "run_job", fake_run)
    return ran


@pytest.mark.parametrize(("seconds", "refused"), [(6.3, True), (2.4, True), (3.3, False)])
def test_a_stage_refuses_to_add_runs_made_at_another_machine_speed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seconds: float, refused: bool
) -> None:
    """The logged run took 3.0 s/it; here its configuration takes ``seconds``: 2.1 and 0.8
    times are refused (nothing of the stage runs, the log is unchanged), 1.1 goes on."""
    log = tmp_path / "stage.jsonl"
    log.write_text(json.dumps(_logged_run("tune anil #0", 3.0)) + "\n")
    ran = _machine(monkeypatch, seconds)
    args = argparse.Namespace(runs=tmp_path / "runs", workers=2)
    jobs = [{"name": "tune anil #0"}, {"name": "tune anil #1", "options": {}, "run_dir": "x"}]
    if refused:
        with pytest.raises(SystemExit, match=r"times the seconds per iteration of its logged run"):
            fair.run_all(jobs, args, log)
        assert len(log.read_text().splitlines()) == 1
    else:
        assert [r["name"] for r in fair.run_all(jobs, args, log)] == [j["name"] for j in jobs]
    calibrations = [job for job in ran if job["name"].startswith("calibration")]
    assert len(calibrations) == 2  # --workers copies, side by side as the study's runs go
    for job in calibrations:
        options = job["options"]
        assert options["algo"] == "anil" and options["lr"] == 0.001  # the logged configuration
        assert options["time_budget"] == fair.CALIBRATION_SECONDS and options["test_tasks"] == 0
        assert options["iterations"] == 10**7 and "val_every_seconds" not in options
    assert [job["name"] for job in ran[2:]] == ([] if refused else ["tune anil #1"])


def test_the_machine_speed_check_compares_a_new_log_with_the_one_it_is_read_against(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first speed-stage run is checked against the final stage's runs; a new stage with
    nothing to compare with, or a stage with nothing left to run, calibrates nothing; the
    calibration reads the data from this machine's ``--data-root``, not the logged run's;
    failed calibration runs stop the stage."""
    final_log, speed_log = tmp_path / "final.jsonl", tmp_path / "speed.jsonl"
    final_log.write_text(json.dumps(_logged_run("final anil seed 0", 3.0)) + "\n")
    args = argparse.Namespace(runs=tmp_path / "runs", workers=2)
    job = {"name": "speed anil seed 0", "options": {}, "run_dir": "x"}
    ran = _machine(monkeypatch, 6.0)
    with pytest.raises(SystemExit, match="2.00 times"):
        fair.run_all([job], args, speed_log, compared_with=final_log)
    assert not speed_log.exists()
    ran.clear()
    fair.run_all([job], args, tmp_path / "new.jsonl")  # no runs to compare with: no check
    assert [j["name"] for j in ran] == ["speed anil seed 0"]
    ran.clear()
    fair.run_all([{"name": "final anil seed 0"}], args, final_log)  # nothing to run: no check
    assert ran == []
    logged = _logged_run("final anil seed 0", 3.0)
    logged["options"]["data_root"] = "/elsewhere/data"  # the machine the run was logged on
    final_log.write_text(json.dumps(logged) + "\n")
    ran = _machine(monkeypatch, 3.1)  # a machine like the study's
    fair.run_all([job], argparse.Namespace(**vars(args), data_root="/here"), speed_log, final_log)
    assert [j["options"]["data_root"] for j in ran[:2]] == ["/here", "/here"]  # this machine's
    ran.clear()
    fair.run_all([job], args, tmp_path / "other.jsonl", compared_with=final_log)
    assert all("data_root" not in j["options"] for j in ran[:2])  # the default location
    _machine(monkeypatch, None)
    with pytest.raises(SystemExit, match="calibration runs failed"):
        fair.run_all([job], args, tmp_path / "failing.jsonl", compared_with=final_log)


def test_fair_report_names_the_runs_made_at_another_speed_than_their_row() -> None:
    def runs(row: str, seconds: list[float | None]) -> list[dict]:
        return [{"row": row, "seed": i, "median_seconds_per_iteration": s}
                for i, s in enumerate(seconds)]  # fmt: skip

    even = {"mrml": runs("mrml", [2.0, 2.1, 2.2]), "anil": runs("anil", [3.0, None, 3.3])}
    assert "every run's seconds per iteration are within 15%" in fair_report.machine_share_line(
        even
    )
    uneven = {**even, "maml": runs("maml", [2.0, 2.1, 2.6]), "imaml": runs("imaml", [5.0])}
    line = fair_report.machine_share_line(uneven)
    assert "outside 15% of their row" in line
    assert "maml seed 2 2.60 s/it against the row's median 2.10 s (+24%)" in line
    assert "mrml" not in line and "imaml" not in line  # within 15%; a single seed


def _todo(name: str, algo: str, **fields: object) -> dict:
    budgets = {"time_budget": 240.0, "val_every_seconds": 40.0}
    return {"name": name, "options": {"algo": algo, **budgets}, "run_dir": name, **fields}


def test_scaled_budgets_give_each_method_the_work_its_budget_bought_on_the_study_machine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``--scale-budgets``, each method is calibrated against its own first logged run
    (never a later one, never another method's) and its new runs get that ratio × the CPU
    budget and validation spacing (ANIL 2.0×, mrml 2.5× here), logged as they ran; a method
    within the tolerance runs as it is; one with nothing to calibrate against stops the stage."""
    log = tmp_path / "stage.jsonl"
    mrml = _logged_run("tune mrml #0", 2.0)
    mrml["options"] |= {"algo": "mrml", "l2": 0.1}
    untimed = {**_logged_run("tune itd-bio #0", 1.0), "median_cpu_seconds_per_iteration": None,
               "median_seconds_per_iteration": None}  # fmt: skip
    untimed["options"]["algo"] = "itd-bio"
    failed = {**_logged_run("tune anil #0", 1.0), "failed": "diverged"}  # never a reference
    logged = [untimed, failed, _logged_run("tune anil #1", 3.0), _logged_run("tune anil #2", 9.0),
              mrml]  # fmt: skip
    logged[1]["method"] = logged[2]["method"] = logged[3]["method"] = "anil"
    mrml["method"] = "mrml"
    log.write_text("".join(json.dumps(r) + "\n" for r in logged))
    ran = _machine(monkeypatch, {"anil": 6.0, "mrml": 5.0, "itd-bio": 1.0})
    args = argparse.Namespace(runs=tmp_path / "runs", workers=2, scale_budgets=True)
    todo = [_todo("tune anil #3", "anil", method="anil"),
            _todo("tune mrml #1", "mrml", method="mrml")]  # fmt: skip
    results = fair.run_all([{"name": r["name"]} for r in logged] + todo, args, log)
    calibrations = [job["options"] for job in ran if job["name"].startswith("calibration")]
    # each method against its first logged run, beside the other, in rotated rounds
    anil_0, mrml_0 = ("anil", None), ("mrml", 0.1)
    assert [(o["algo"], o.get("l2")) for o in calibrations] == [anil_0, mrml_0, mrml_0, anil_0]
    assert all(o["time_budget"] == fair.CALIBRATION_SECONDS for o in calibrations)
    assert all("val_every_seconds" not in o for o in calibrations)
    scaled = {r["name"]: r for r in results[len(logged) :]}
    anil, mrml_run = scaled["tune anil #3"], scaled["tune mrml #1"]
    assert anil["machine_ratio"] == pytest.approx(2.0)
    assert anil["options"]["time_budget"] == pytest.approx(480.0)
    assert anil["options"]["val_every_seconds"] == pytest.approx(80.0)
    assert fair.study_seconds(anil, "val_every_seconds") == pytest.approx(40.0)
    assert mrml_run["machine_ratio"] == pytest.approx(2.5)
    assert mrml_run["options"]["time_budget"] == pytest.approx(600.0)
    assert [json.loads(line)["name"] for line in log.read_text().splitlines()][-2:] == [
        "tune anil #3",
        "tune mrml #1",
    ]
    calibrations_log = json.loads((tmp_path / "stage_calibrations.jsonl").read_text())
    assert calibrations_log["rows"]["anil"]["here"] == [6.0, 6.0]
    # itd-bio's only logged run has no seconds per iteration: nothing to calibrate against
    with pytest.raises(SystemExit, match="no finished logged run of itd-bio"):
        fair.run_all([_todo("tune itd-bio #1", "itd-bio", method="itd-bio")], args, log)
    _machine(monkeypatch, {"anil": 3.3})  # 1.1×: scaled too, as every row is
    near = fair.run_all([_todo("tune anil #4", "anil", method="anil")], args, log)[0]
    assert near["machine_ratio"] == pytest.approx(1.1)
    assert near["options"]["time_budget"] == pytest.approx(264.0)


def test_a_new_stage_with_scaled_budgets_is_measured_against_the_stage_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A final stage starting on another machine calibrates each row against the tuning runs
    (a row of its own method, else of its algorithm, as the paper's configuration is mrml's);
    once it has runs of its own, against those; a speed stage's against the final runs it is
    read against."""
    tuning = tmp_path / "tuning.jsonl"
    runs = [_logged_run("tune anil #0", 3.0), _logged_run("tune mrml #0", 2.0)]
    runs[0]["method"], runs[1]["method"] = "anil", "mrml"
    runs[1]["options"]["algo"] = "mrml"
    tuning.write_text("".join(json.dumps(r) + "\n" for r in runs))
    final = tmp_path / "final.jsonl"
    ran = _machine(monkeypatch, {"anil": 6.0, "mrml": 5.0})
    args = argparse.Namespace(runs=tmp_path / "runs", workers=1, scale_budgets=True)
    jobs = [_todo("final anil seed 0", "anil", row="anil"),
            _todo("final mrml-paper seed 0", "mrml", row="mrml-paper")]  # fmt: skip
    done = fair.run_all(jobs, args, final, scale_against=tuning)
    assert [r["machine_ratio"] for r in done] == pytest.approx([2.0, 2.5])
    calibrated = [j["options"]["algo"] for j in ran if j["name"].startswith("calibration")]
    assert calibrated == ["anil", "mrml"] * 2  # one worker: each row alone, twice
    done[0]["median_cpu_seconds_per_iteration"] = 1.5  # in the study's seconds, as logged
    final.write_text(json.dumps(done[0]) + "\n")
    ran.clear()
    again = fair.run_all(
        [_todo("final anil seed 1", "anil", row="anil")], args, final, None, tuning
    )
    assert again[0]["machine_ratio"] == pytest.approx(4.0)  # against the final run, 6.0 / 1.5
    speed = fair.run_all(
        [_todo("speed anil seed 0", "anil", row="anil")], args, tmp_path / "speed.jsonl", final
    )
    assert speed[0]["machine_ratio"] == pytest.approx(4.0)
    paper, mrml = _logged_run("final mrml-paper seed 0", 1.0), _logged_run("final mrml seed 0", 2.0)
    paper["row"], mrml["row"] = "mrml-paper", "mrml"
    paper["options"]["algo"] = mrml["options"]["algo"] = "mrml"
    final.write_text(json.dumps(paper) + "\n" + json.dumps(mrml) + "\n")
    row = fair.run_all(
        [_todo("speed mrml seed 0", "mrml", row="mrml")], args, tmp_path / "s", final
    )
    assert row[0]["machine_ratio"] == pytest.approx(2.5)  # its own row's run, not mrml-paper's
    unscaled = argparse.Namespace(**{**vars(args), "scale_budgets": False})
    fresh = fair.run_all(jobs, unscaled, tmp_path / "other.jsonl", scale_against=tuning)
    assert all("machine_ratio" not in r for r in fresh)  # a new stage is compared within itself


def test_a_run_with_a_scaled_budget_logs_its_times_in_the_study_machines_seconds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``run_job`` divides a scaled run's curve, trajectory and seconds per iteration by its
    machine ratio, and keeps its own; a failed scaled run's trajectory too; an unscaled run's
    times are as measured; its CPU seconds per iteration leave out the first two."""
    cpu = [6.0, 12.0, 15.0, 19.0]  # train CPU seconds after each iteration: 6, 6, 3, 4 s each
    train = [{"kind": "train", "iteration": i, "seconds": 4.0, "train_cpu_seconds": c,
              "loss": 1.0, "accuracy": 0.5} for i, c in enumerate(cpu)]  # fmt: skip
    records = [*train[:2], {"kind": "val", "accuracy": 0.6, "train_cpu_seconds": 12.0},
               *train[2:], {"kind": "val", "accuracy": 0.7, "train_cpu_seconds": 19.0}]  # fmt: skip
    fail = False

    def fake_subprocess(command: list[str], **_: object) -> subprocess.CompletedProcess:
        run_dir = Path(command[command.index("--out") + 1])
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (run_dir / "result.json").write_text("{}")
        return subprocess.CompletedProcess(command, 1 if fail else 0, "", "boom" if fail else "")

    monkeypatch.setattr(fair.subprocess, "run", fake_subprocess)
    args = argparse.Namespace()
    job = {"name": "tune anil #0", "options": {"algo": "anil"}, "run_dir": str(tmp_path / "a")}
    plain = fair.run_job(job, args)
    assert plain["curve"] == [(12.0, 0.6), (19.0, 0.7)]
    assert plain["median_seconds_per_iteration"] == 4.0
    assert plain["median_cpu_seconds_per_iteration"] == 3.5  # of the third and fourth
    assert fair.logged_seconds_per_iteration(plain) == 3.5
    assert "curve_here" not in plain
    scaled = fair.run_job({**job, "run_dir": str(tmp_path / "b"), "machine_ratio": 2.0}, args)
    assert scaled["curve"] == [(6.0, 0.6), (9.5, 0.7)]
    assert scaled["curve_here"] == plain["curve"]
    assert scaled["median_seconds_per_iteration"] == 2.0
    assert scaled["median_seconds_per_iteration_here"] == 4.0
    assert scaled["median_cpu_seconds_per_iteration"] == 1.75
    assert [row["train_cpu_seconds"] for row in scaled["trajectory"]] == [6.0, 9.5]
    fail = True
    failed = fair.run_job({**job, "run_dir": str(tmp_path / "c"), "machine_ratio": 2.0}, args)
    assert [row["train_cpu_seconds"] for row in failed["trajectory"]] == [6.0, 9.5]


def test_runs_logged_without_cpu_seconds_per_iteration_take_them_from_their_trajectory() -> None:
    """Older logs: the median over consecutive blocks of Δ CPU seconds / Δ iterations; older
    still, the wall seconds."""
    rows = [{"last_iteration": 9, "train_cpu_seconds": 40.0},  # the warm-up block
            {"last_iteration": 19, "train_cpu_seconds": 70.0},  # 3.0 s/it
            {"last_iteration": 29, "train_cpu_seconds": 102.0},  # 3.2
            {"last_iteration": 34, "train_cpu_seconds": 118.0}]  # 3.2 (5 iterations)  # fmt: skip
    assert fair.logged_seconds_per_iteration({"trajectory": rows}) == pytest.approx(3.2)
    assert fair.logged_seconds_per_iteration({"trajectory": rows[:1]}) is None
    assert fair.logged_seconds_per_iteration({}) is None
    # logged before the trajectory kept CPU seconds: the median wall seconds per iteration
    wall = {"median_seconds_per_iteration": 2.9, "trajectory": [{"last_iteration": 9}]}
    assert fair.logged_seconds_per_iteration(wall) == 2.9


def test_a_stage_with_scaled_runs_reads_its_spacing_and_budget_in_the_study_machines_seconds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The validation spacing that decides ties, and a running stage's budget, come from a
    scaled first run divided back by its ratio; the report's tables say which runs were scaled
    (after the command, before the table)."""
    scaled = {"name": "final anil seed 0", "row": "anil", "seed": 0, "machine_ratio": 2.0,
              "options": {"algo": "anil", "time_budget": 1200.0, "val_every_seconds": 40.0,
                          "test_tasks": 600, "val_tasks": 200}}  # fmt: skip
    assert fair.validation_spacing([scaled]) == pytest.approx(20.0)
    monkeypatch.setattr(fair_report, "RESULTS", tmp_path)
    (tmp_path / "fair_final_5way1shot.jsonl").write_text(json.dumps(scaled) + "\n")
    args = argparse.Namespace(ways=5, shots=1, grid=fair.FIRST_GRID)
    assert fair_report._stage("final", args)["budget_cpu_seconds"] == pytest.approx(600.0)
    tuning = {"command": "tune", "budget_cpu_seconds": 240, "val_tasks": 200, "selected": {},
              "runs": [{"method": "anil", "config": {}, "best_val": 0.5, "iterations": 9,
                        "machine_ratio": 2.0, "options": {"algo": "anil"}}]}  # fmt: skip
    lines = fair_report.tuning_markdown(tuning)
    table = lines.index("| method | configuration | iterations | best val |")
    assert lines[table - 2].startswith("Budgets scaled: 1 of 1 runs") and lines[table - 1] == ""
    assert lines[table - 3] == "" and lines[table - 4].startswith("Command:")


def test_fair_report_says_which_runs_ran_with_scaled_budgets() -> None:
    def run(row: str, ratio: float | None) -> dict:
        return {
            "row": row,
            "options": {"algo": "mrml"},
            **({"machine_ratio": ratio} if ratio else {}),
        }

    assert fair_report.scaled_budgets_line([run("anil", None), run("mrml", None)]) is None
    line = fair_report.scaled_budgets_line(
        [run("anil", None), run("anil", 2.04), run("anil", 2.1), run("mrml-paper", 2.3)]
    )
    assert line is not None
    assert "3 of 4 runs ran on a machine of another speed" in line
    assert "(anil 2.04–2.10, mrml-paper 2.30)" in line
    rows = {"anil": [{"row": "anil", "seed": 0, "median_seconds_per_iteration": 2.0}]}
    assert fair_report.machine_lines(rows, [run("anil", None)])[2:] == []
    assert fair_report.machine_lines(rows, [run("anil", 2.0)])[3].startswith("Budgets scaled")


def test_calibration_measures_each_row_beside_different_partners_and_refuses_an_unsteady_machine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three rows, two workers: rounds (a, b), (b, c), (c, a), so each row is measured twice,
    beside two different partners, and its ratio is the mean of both; measurements of one row
    more than :data:`SPEED_AGREEMENT` apart stop the stage, after every row's measurements are
    recorded."""
    references = {}
    for algo, seconds in (("anil", 2.0), ("mrml", 3.0), ("maml", 4.0)):
        references[algo] = _logged_run(f"final {algo} seed 0", seconds)
        references[algo]["options"]["algo"] = algo
    rounds: list[list[str]] = []
    slow_beside = {"anil": 1.0, "mrml": 1.0, "maml": 1.0}

    def fake_measure(runs: list[dict], _: object) -> list[float]:
        algos = [r["options"]["algo"] for r in runs]
        rounds.append(algos)
        # each run at twice its logged seconds, times how much its partner slows it
        return [
            2 * fair.logged_seconds_per_iteration(r) * slow_beside[other]
            for r, other in zip(runs, algos[1:] + algos[:1], strict=True)
        ]

    monkeypatch.setattr(fair, "measure_speeds", fake_measure)
    args = argparse.Namespace(workers=2)
    assert fair.calibrated_ratios(references, args) == pytest.approx(
        {"anil": 2.0, "mrml": 2.0, "maml": 2.0}
    )
    assert rounds == [["anil", "mrml"], ["mrml", "maml"], ["maml", "anil"]]
    rounds.clear()  # one worker: each row alone, twice
    alone = fair.calibrated_ratios(references, argparse.Namespace(workers=1))
    assert alone == pytest.approx({"anil": 2.0, "mrml": 2.0, "maml": 2.0})
    assert rounds == [["anil"], ["mrml"], ["maml"]] * 2
    slow_beside["maml"] = 1.08  # within SPEED_AGREEMENT: the mean of 2.0 and 2.16
    assert fair.calibrated_ratios(references, args)["mrml"] == pytest.approx(2.08)
    slow_beside["maml"] = 1.25
    record = tmp_path / "calibrations.jsonl"
    with pytest.raises(SystemExit, match="not steady: the calibrations of anil, mrml beside"):
        fair.calibrated_ratios(references, args, record)
    entry = json.loads(record.read_text())  # what was measured is kept, refused or not
    assert entry["check"] == "scale budgets" and entry["refused"] == ["anil", "mrml"]
    assert entry["rows"]["mrml"]["here"] == [6.0, 7.5] and entry["rows"]["maml"]["logged"] == 4.0
    assert entry["rows"]["mrml"]["beside"] == [["anil"], ["maml"]]  # rounds (a, b) then (b, c)
    assert entry["rows"]["maml"]["ratio"] == pytest.approx(2.0)


def test_the_machine_speed_check_times_two_different_rows_side_by_side_old_logs_included(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The plain check runs the first logged runs of the first two rows beside each other (not
    two copies of one), against wall seconds where an old log has nothing else, and refuses if
    either is off."""
    log = tmp_path / "stage.jsonl"
    anil, mrml = _logged_run("tune anil #0", 3.0), _logged_run("tune mrml #0", 2.0)
    anil["method"], mrml["method"], mrml["options"]["algo"] = "anil", "mrml", "mrml"
    del mrml["median_cpu_seconds_per_iteration"]  # an old log: wall seconds only
    log.write_text(json.dumps(anil) + "\n" + json.dumps(mrml) + "\n")
    args = argparse.Namespace(runs=tmp_path / "runs", workers=2)
    job = _todo("tune anil #1", "anil", method="anil")
    ran = _machine(monkeypatch, {"anil": 3.2, "mrml": 2.1})
    fair.run_all([job], args, log)
    assert sorted(j["options"]["algo"] for j in ran[:2]) == ["anil", "mrml"]  # side by side
    assert ran[2]["name"] == "tune anil #1"
    _machine(monkeypatch, {"anil": 3.2, "mrml": 3.0})  # mrml 1.5 times
    with pytest.raises(SystemExit, match="runs 'tune mrml #0' at 1.50 times"):
        fair.run_all([_todo("tune anil #2", "anil", method="anil")], args, log)
    # both checks are kept beside the log, the refused one too, with each run's partner
    passed, refused = map(
        json.loads, (tmp_path / "stage_calibrations.jsonl").read_text().splitlines()
    )
    assert passed["check"] == refused["check"] == "speed check"
    assert passed["refused"] == [] and refused["refused"] == ["mrml"]
    assert refused["rows"]["mrml"] == {"run": "tune mrml #0", "here": [3.0], "beside": [["anil"]],
                                       "logged": 2.0, "ratio": 1.5}  # fmt: skip
    assert refused["rows"]["anil"]["here"] == [3.2] and refused["rows"]["anil"]["beside"] == [
        ["mrml"]
    ]
