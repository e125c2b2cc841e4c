"""Tests for the measurements behind the README's explanations of iMAML's and first-order MAML's
20-way results (benchmarks/imaml_breakdowns.py, benchmarks/first_order_gap.py), against dense
float64 references on a tiny network."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

from _benchmark_scripts import load_benchmark
from mrmeta import FOMAML, IMAML, MAML, TaskBatch
from mrmeta.implicit import CGResult

DATA_ROOT = Path(os.environ.get("MRMETA_DATA") or "/nonexistent/mrmeta-data")
needs_omniglot = pytest.mark.skipif(
    not (DATA_ROOT / "omniglot" / "images_background.npz").exists(),
    reason="real Omniglot copy not found (set MRMETA_DATA)",
)

breakdowns = load_benchmark("imaml_breakdowns")
first_order_gap = load_benchmark("first_order_gap")
newton_start = load_benchmark("newton_start")


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def tiny_tasks(tasks: int = 3) -> TaskBatch:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(tasks, 6, 3, generator=gen, dtype=torch.float64) * 2
    xq = torch.randn(tasks, 6, 3, generator=gen, dtype=torch.float64)
    y = torch.arange(3).repeat(tasks, 2)
    return TaskBatch(x, y, xq, y.clone())


def dense_support_hessians(model: nn.Module, batch: TaskBatch, phi: dict) -> list[torch.Tensor]:
    """Each task's Hessian of its mean support cross-entropy at ``phi``, formed densely."""
    names = list(phi)
    shapes = [phi[k].shape[1:] for k in names]
    sizes = [s.numel() for s in shapes]
    out = []
    for t in range(batch.num_tasks):
        flat0 = torch.cat([phi[k][t].flatten() for k in names])

        def loss(flat: torch.Tensor, t: int = t) -> torch.Tensor:
            params = {
                k: p.view(s) for k, p, s in zip(names, flat.split(sizes), shapes, strict=True)
            }
            logits = functional_call(model, params, (batch.support_x[t],))
            return nn.functional.cross_entropy(logits, batch.support_y[t])

        out.append(hessian(loss)(flat0))
    return out


def test_power_iteration_finds_the_extreme_hessian_eigenvalues() -> None:
    model = tiny_model()
    learner = IMAML(model, inner_steps=3, inner_lr=0.3, reg=0.5)
    batch = tiny_tasks()
    phi = learner.adapt(batch.support_x, batch.support_y)
    found, radius = breakdowns.extreme_curvatures(learner, batch, phi, iters=400)
    for t, h in enumerate(dense_support_hessians(model, batch, phi)):
        eigenvalues = torch.linalg.eigvalsh(h)
        torch.testing.assert_close(radius[t], eigenvalues.abs().max(), rtol=1e-4, atol=1e-8)
        assert eigenvalues[0] < 0  # the tiny network's support loss is not convex here
        # a Rayleigh quotient, so never below the smallest eigenvalue; converged, equal to it
        assert found[t] >= eigenvalues[0] - 1e-10
        torch.testing.assert_close(found[t], eigenvalues[0], rtol=1e-4, atol=1e-8)


def test_breakdown_steps_count_the_residual_changes_before_the_freeze() -> None:
    norms = torch.tensor([[4.0, 4.0], [3.0, 2.0], [3.0, 1.0], [3.0, 0.5]])
    cg = CGResult({}, norms, 3, False, "non-positive curvature", torch.tensor([True, False]))
    assert breakdowns.cg_steps_before_breakdown(cg) == [1, 3]


def test_measure_reports_breakdowns_where_the_damped_hessian_is_indefinite() -> None:
    model = tiny_model()
    batch = tiny_tasks()
    learner = IMAML(model, inner_steps=3, inner_lr=0.3, reg=1e-3, cg_iters=10)
    phi = learner.adapt(batch.support_x, batch.support_y)
    smallest = [torch.linalg.eigvalsh(h)[0] for h in dense_support_hessians(model, batch, phi)]
    row = breakdowns.measure(learner, batch, power_iters=200)
    # I + H/λ is indefinite on every task at λ = 1e-3 (each H has an eigenvalue below −λ)
    assert all(e < -1e-3 for e in smallest)
    assert row["breakdown_fraction"] == 1.0
    # with no inner steps (φ = θ) and λ ten times the most negative eigenvalue there: none
    start = IMAML(tiny_model(), inner_steps=0, reg=1.0)
    phi = start.adapt(batch.support_x, batch.support_y)
    worst = max(
        -float(torch.linalg.eigvalsh(h)[0]) for h in dense_support_hessians(model, batch, phi)
    )
    large = IMAML(tiny_model(), inner_steps=0, reg=10 * worst, cg_iters=10)
    assert breakdowns.measure(large, batch, power_iters=20)["breakdown_fraction"] == 0.0
    # one CG step from 0: v = (bᵀb / bᵀAb) b with A = I + H/λ, b = ∇L^q(θ); its ‖b − Av‖/‖b‖
    one_step = IMAML(tiny_model(), inner_steps=0, reg=10 * worst, cg_iters=1)
    relative = []
    for t, h in enumerate(dense_support_hessians(model, batch, phi)):
        params = {k: p.detach().requires_grad_(True) for k, p in model.named_parameters()}
        logits = functional_call(model, params, (batch.query_x[t],))
        grads = torch.autograd.grad(
            nn.functional.cross_entropy(logits, batch.query_y[t]), list(params.values())
        )
        b = torch.cat([g.flatten() for g in grads])
        a = torch.eye(len(b), dtype=b.dtype) + h / (10 * worst)
        r = b - (b @ b) / (b @ a @ b) * (a @ b)
        relative.append(float(r.norm() / b.norm()))
    row = breakdowns.measure(one_step, batch, power_iters=1)
    assert abs(row["relative_residual_median"] - sorted(relative)[1]) < 1e-10
    assert abs(row["relative_residual_max"] - max(relative)) < 1e-10


def test_first_order_gap_compares_the_exact_and_first_order_gradients() -> None:
    batch = tiny_tasks()
    exact = first_order_gap.meta_gradient(MAML(tiny_model(), inner_steps=2, inner_lr=0.5), batch)
    first = first_order_gap.meta_gradient(FOMAML(tiny_model(), inner_steps=2, inner_lr=0.5), batch)
    # reference: the unrolled gradient of the mean query loss, and the query gradient at φ^K
    model = tiny_model()
    theta = {k: p.detach().requires_grad_(True) for k, p in model.named_parameters()}
    grads_exact, grads_first = [], []
    for t in range(batch.num_tasks):
        phi = dict(theta)
        for _ in range(2):
            logits = functional_call(model, phi, (batch.support_x[t],))
            loss = nn.functional.cross_entropy(logits, batch.support_y[t])
            g = torch.autograd.grad(loss, list(phi.values()), create_graph=True)
            phi = {k: p - 0.5 * gk for (k, p), gk in zip(phi.items(), g, strict=True)}
        query = functional_call(model, phi, (batch.query_x[t],))
        q = nn.functional.cross_entropy(query, batch.query_y[t]) / batch.num_tasks
        grads_exact.append(
            torch.cat(
                [
                    g.flatten()
                    for g in torch.autograd.grad(q, list(theta.values()), retain_graph=True)
                ]
            )
        )
        grads_first.append(
            torch.cat([g.flatten() for g in torch.autograd.grad(q, list(phi.values()))])
        )
    torch.testing.assert_close(exact, sum(grads_exact), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(first, sum(grads_first), rtol=1e-9, atol=1e-12)
    assert torch.nn.functional.cosine_similarity(first, exact, dim=0) < 1 - 1e-6


@needs_omniglot
@pytest.mark.parametrize("script", ["imaml_breakdowns", "first_order_gap", "newton_start"])
def test_diagnostic_commands_write_their_tables(
    script: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    modules = {
        "imaml_breakdowns": breakdowns,
        "first_order_gap": first_order_gap,
        "newton_start": newton_start,
    }
    module = modules[script]
    extra = {
        "imaml_breakdowns": ["--regs", "0.5", "--power-iters", "2"],
        "newton_start": ["--repeats", "1"],
    }.get(script, [])
    argv = [script, "--ways", "3", "--meta-batch", "2", "--data-root", str(DATA_ROOT)]
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(tmp_path), *extra])
    module.main()
    written = json.loads((tmp_path / f"{script}_3way1shot.json").read_text())
    assert [r["state"] for r in written["rows"]] == ["initial network (seed 0)"]
    row = written["rows"][0]
    if script == "imaml_breakdowns":
        assert 0.0 <= row["breakdown_fraction"] <= 1.0 and row["spectral_radius_median"] > 0
    elif script == "newton_start":  # both starts solve to mrml's tolerance, to the same φ
        for start in row["starts"].values():
            assert start["grad_norm_max"] <= written["inner_tol"] and start["iterations_mean"] > 0
        assert row["solution_difference_max"] < 1e-5
    else:
        assert -1.0 <= row["cosine"] <= 1.0 and row["exact_norm"] > 0
    table = (tmp_path / f"{script}_3way1shot.md").read_text()
    assert "initial network (seed 0)" in table and written["command"] in table


class_block_solve = load_benchmark("class_block_solve")


@needs_omniglot
def test_class_block_solve_times_both_exact_solves_which_agree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = ["class_block_solve", "--settings", "3x1", "4x2", "--meta-batch", "2", "--repeats", "1"]
    argv += ["--data-root", str(DATA_ROOT), "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    class_block_solve.main()
    from mrmeta import lower_level

    written = json.loads((tmp_path / "class_block_solve.json").read_text())
    assert written["small_system"] == lower_level.SMALL_SYSTEM > 32  # the switch is restored
    assert [(r["setting"], r["logits"]) for r in written["rows"]] == [("3x1", 9), ("4x2", 32)]
    for row in written["rows"]:
        assert row["relative_difference_max"] < 1e-10
        for solve in row["solves"].values():
            assert solve["ms_per_solve"] > 0 and solve["relative_residual_max"] < 1e-10
    table = (tmp_path / "class_block_solve.md").read_text()
    assert written["command"] in table and "| 4x2 | 32 |" in table


frozen_step = load_benchmark("frozen_protocol_step")


@pytest.mark.data
@needs_omniglot
def test_frozen_protocol_step_matches_the_protocol_and_a_dense_curvature_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mrmeta._checkpoint import load_checkpoint
    from mrmeta._factory import build_learner, build_model
    from mrmeta._per_task import task_features
    from mrmeta.cli import main as cli_main
    from mrmeta.config import TrainConfig
    from mrmeta.data import TaskSampler, load_dataset
    from mrmeta.evaluate import backbone_of, evaluate

    run = tmp_path / "run"
    train = ["train", "--dataset", "omniglot", "--data-root", str(DATA_ROOT), "--ways", "3"]
    train += ["--queries", "2", "--meta-batch", "2", "--hidden", "8", "--iterations", "2"]
    train += ["--val-every", "2", "--val-tasks", "2", "--test-tasks", "2", "--threads", "1"]
    assert cli_main([*train, "--out", str(run), "--quiet"]) == 0
    argv = ["frozen_protocol_step", "--ways", "3", "--queries", "2", "--tasks", "40"]
    argv += ["--data-root", str(DATA_ROOT), "--checkpoint", str(run / "last.pt")]
    monkeypatch.setattr(sys, "argv", [*argv, "--setting", "20", "0.05", "--out", str(tmp_path)])
    frozen_step.main()
    row = json.loads((tmp_path / "frozen_protocol_step_3way1shot.json").read_text())
    row = row["checkpoints"][0]
    assert row["algo"] == "mrml" and row["iteration"] == 2

    # the same 40 validation tasks (seed 0, batches of 32 then 8), tested by evaluate()
    split = load_dataset("omniglot", "val", root=str(DATA_ROOT))
    state = load_checkpoint(run / "last.pt")
    config = TrainConfig.from_saved(state["config"], source="test")
    learner = build_learner(config, build_model(config, tuple(split.images.shape[-3:])))
    learner.load_state_dict(state["learner"])
    sampler = TaskSampler(split, 3, 1, 2, seed=0)
    reference = evaluate(learner, sampler.sample, tasks=40, protocol="frozen-backbone")
    assert row["accuracy"][0]["accuracy"] == pytest.approx(reference.mean, abs=1e-6)

    # 2 / L_t against the largest eigenvalue of ½ AᵀA / n, A = [Z, 1], in float64
    sampler = TaskSampler(split, 3, 1, 2, seed=0)
    steps, norms = [], []
    with torch.no_grad():
        for size in (32, 8):
            z = task_features(backbone_of(learner), sampler.sample(size).support_x).double()
            a = torch.cat([z, torch.ones(*z.shape[:-1], 1, dtype=z.dtype)], dim=-1)
            top = torch.linalg.eigvalsh(a.mT @ a)[..., -1] * 0.5 / a.shape[1]
            steps += (2.0 / top).tolist()
            norms += z.norm(dim=-1).mean(dim=1).tolist()
    assert row["stable_step_median"] == pytest.approx(statistics.median(steps), rel=1e-4)
    assert row["feature_norm_mean"] == pytest.approx(statistics.mean(norms), rel=1e-5)
    table = (tmp_path / "frozen_protocol_step_3way1shot.md").read_text()
    assert "| mrml | 2 |" in table and "20 steps of 0.05" in table


def test_run_trajectory_summarises_the_training_records_between_validations(
    tmp_path: Path,
) -> None:
    """Blocks end at each validation; means skip missing and non-finite values; the records
    after the last validation form a last block; a torn last line is skipped. The fair
    comparison logs the same blocks, and ``--log`` writes a logged run's table; wrong
    arguments or files stop with a message. Expected values are worked out by hand from the
    records below."""
    trajectory = load_benchmark("run_trajectory")

    def train(it: int, loss: float, breakdowns: float | None, norm_max: float | None) -> str:
        return json.dumps(
            {
                "kind": "train",
                "iteration": it,
                "train_cpu_seconds": 10.0 * it,
                "loss": loss,
                "accuracy": 0.5,
                "inner_grad_norm": 0.1 * it,
                "inner_grad_norm_max": norm_max,
                "cg_breakdowns": breakdowns,
                "cg_residual": None,
                "grad_norm": float(it),
                "seconds": 1.0,
            }
        )

    lines = [
        train(1, 1.0, 0.0, 0.4),
        train(2, 3.0, 0.5, 0.9),
        json.dumps({"kind": "val", "iteration": 2, "accuracy": 0.8, "train_cpu_seconds": 20.0}),
        train(3, float("inf"), 1.0, None),
        train(4, 2.0, None, 0.2),
        train(5, 4.0, 0.5, 0.3),
        json.dumps({"kind": "val", "iteration": 5, "accuracy": 0.6, "train_cpu_seconds": 50.0}),
        train(6, 5.0, 1.0, 7.0),
        '{"kind": "train", "iteration": 7, "lo',
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    rows = trajectory.trajectory(trajectory.read_records(tmp_path))

    assert [(r["first_iteration"], r["last_iteration"]) for r in rows] == [(1, 2), (3, 5), (6, 6)]
    assert [r["loss"] for r in rows] == pytest.approx([2.0, 3.0, 5.0])
    assert [r["cg_breakdowns"] for r in rows] == pytest.approx([0.25, 0.75, 1.0])
    assert [r["inner_grad_norm"] for r in rows] == pytest.approx([0.15, 0.4, 0.6])
    assert [r["inner_grad_norm_max"] for r in rows] == pytest.approx([0.9, 0.3, 7.0])
    assert [r["cg_residual"] for r in rows] == [None, None, None]
    assert [r["val_accuracy"] for r in rows] == [0.8, 0.6, None]
    assert [r["train_cpu_seconds"] for r in rows] == [20.0, 50.0, 60.0]
    assert [r["grad_norm"] for r in rows] == pytest.approx([1.5, 4.0, 6.0])

    out = tmp_path / "results" / "trajectory.json"
    trajectory.main([str(tmp_path), "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["blocks"] == json.loads(json.dumps(rows))
    assert written["command"] == f"benchmarks/run_trajectory.py {tmp_path} --out {out}"
    assert written["run"] == tmp_path.name
    table = out.with_suffix(".md").read_text()
    assert written["command"] in table
    assert "| 3–5 | 50 | 3.000 | 0.500 | 0.4 | 0.3 | 0.75 | – | 4 | 60.00% |" in table
    with pytest.raises(SystemExit, match="no metrics.jsonl"):
        trajectory.main([str(tmp_path / "missing"), "--out", str(out)])

    # the fair comparison logs the same blocks with each run, and the table can come from there
    fair = load_benchmark("fair_comparison")
    records = trajectory.read_records(tmp_path)
    assert fair.summarise_records(records)["trajectory"] == rows
    log = tmp_path / "fair_final.jsonl"
    logged = [
        {"name": "final mrml seed 0", "trajectory": rows},
        {"name": "final anil seed 0", "failed": "boom"},
    ]
    log.write_text("".join(json.dumps(run) + "\n" for run in logged))
    from_log = tmp_path / "results" / "from_log.json"
    trajectory.main(["--log", str(log), "--job", "final mrml seed 0", "--out", str(from_log)])
    assert json.loads(from_log.read_text())["blocks"] == written["blocks"]
    assert json.loads(from_log.read_text())["run"] == "final mrml seed 0"
    with pytest.raises(SystemExit, match="no run named 'final maml seed 0'.*'final anil seed 0'"):
        trajectory.main(["--log", str(log), "--job", "final maml seed 0", "--out", str(out)])
    with pytest.raises(SystemExit, match="without its trajectory"):
        trajectory.main(["--log", str(log), "--job", "final anil seed 0", "--out", str(out)])
    with pytest.raises(SystemExit, match="no such file"):
        trajectory.main(["--log", str(tmp_path / "nope.jsonl"), "--job", "x", "--out", str(out)])
    summary = tmp_path / "fair_final.json"  # the summary file beside a log is not a log
    summary.write_text(json.dumps({"runs": logged, "seeds": 3}, indent=1) + "\n")
    with pytest.raises(SystemExit, match="not a fair-comparison log"):
        trajectory.main(["--log", str(summary), "--job", "final mrml seed 0", "--out", str(out)])
    job = ["--job", "final mrml seed 0"]
    for wrong in ([str(tmp_path), "--log", str(log), *job], [str(tmp_path), *job], job, []):
        with pytest.raises(SystemExit) as error:
            trajectory.main([*wrong, "--out", str(out)])
        assert error.value.code == 2


def test_trajectory_blocks_without_validation_or_between_two_validations() -> None:
    """A run never validated is one block with no validation accuracy; a validation right after
    another adds no block."""
    fair = load_benchmark("fair_comparison")

    def train(it: int) -> dict:
        return {"kind": "train", "iteration": it, "train_cpu_seconds": it, "loss": float(it)}

    def val(accuracy: float) -> dict:
        return {"kind": "val", "accuracy": accuracy}

    never = fair.trajectory([train(1), train(2)])
    assert [(r["first_iteration"], r["last_iteration"], r["val_accuracy"]) for r in never] == [
        (1, 2, None)
    ]
    assert never[0]["loss"] == pytest.approx(1.5)
    twice = fair.trajectory([val(0.1), train(1), val(0.2), val(0.3), train(2), val(0.4)])
    assert [(r["first_iteration"], r["val_accuracy"]) for r in twice] == [(1, 0.2), (2, 0.4)]
    assert fair.trajectory([val(0.1)]) == []


def test_a_failed_run_is_logged_with_its_trajectory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that exits non-zero (diverged) keeps the blocks of its records up to the failure."""
    fair = load_benchmark("fair_comparison")
    run_dir = tmp_path / "run"
    records = [
        {"kind": "train", "iteration": 1, "train_cpu_seconds": 1.0, "loss": 2.0},
        {"kind": "val", "accuracy": 0.5},
        {"kind": "train", "iteration": 2, "train_cpu_seconds": 2.0, "loss": 9.0},
    ]

    def diverging_train(command: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        run_dir.mkdir()
        lines = [json.dumps(record) for record in records]
        (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        return subprocess.CompletedProcess(command, 1, "", "TrainingDiverged: loss is nan")

    monkeypatch.setattr(fair.subprocess, "run", diverging_train)
    job = {"name": "final mrml seed 0", "run_dir": str(run_dir), "options": {"algo": "mrml"}}
    logged = fair.run_job(job, argparse.Namespace())
    assert "TrainingDiverged" in logged["failed"]
    assert logged["trajectory"] == fair.trajectory(records)
    assert [r["loss"] for r in logged["trajectory"]] == [2.0, 9.0]
