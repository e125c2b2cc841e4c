"""Small, fast versions of benchmarks/convergence.py: the convergence claims (docs/method.md §5) on
synthetic problems whose hypergradient is known exactly (:mod:`mrmeta.testing`).

Every margin below was checked against the measured values (quoted next to each assertion);
all computations are float64 and seeded.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mrmeta.testing import (
    Algorithm1Config,
    SyntheticProblem,
    WarmStarts,
    estimate_hypergradient,
    exact_gradient_descent,
    exact_hypergradient,
    initial_theta,
    lower_lipschitz,
    make_problem,
    replay_errors,
    run_algorithm1,
)

# Small ridge instance on which exact gradient descent at λ_θ = 0.8 (≈ 0.92 / L̂_F, with
# L̂_F = 1.15 the largest |eigenvalue| of ∇²F(θ_0)) reaches ‖∇F‖² ≈ 1e-9 in 60 iterations.
RIDGE = {"tasks": 8, "samples": 10, "features": 3, "l2": 0.1, "outer_l2": 0.1, "seed": 3}
RIDGE_THETA_SEED, RIDGE_LR = 4, 0.8
# Small logistic instance for the hypergradient-error checks.
LOGISTIC = {"tasks": 4, "samples": 10, "features": 3, "l2": 0.1, "outer_l2": 0.05, "seed": 3}


def paper_budget(problem: SyntheticProblem, theta: torch.Tensor) -> tuple[int, int]:
    """``K = ⌈κ⌉``, ``N = ⌈√κ⌉`` with ``κ = max_i L_i / μ``."""
    kappa = float(lower_lipschitz(problem, theta).max()) / problem.l2
    return math.ceil(kappa), math.ceil(math.sqrt(kappa))


def relative_error(estimate: torch.Tensor, exact: torch.Tensor) -> float:
    return float(torch.linalg.norm(estimate - exact) / torch.linalg.norm(exact))


# --------------------------------------------------------------------------- the reference
@pytest.mark.parametrize("kind", ["logistic", "ridge"])
def test_exact_hypergradient_matches_finite_differences(kind: str) -> None:
    """Central differences of F along a random direction, h = 1e-5 (error O(h²) ≈ 1e-10)."""
    problem = make_problem(kind, **LOGISTIC)
    theta = initial_theta(problem, seed=1)
    direction = torch.randn(theta.shape, generator=torch.Generator().manual_seed(2)).double()
    exact = exact_hypergradient(problem, theta)
    h = 1e-5
    plus = exact_hypergradient(problem, theta + h * direction).value
    minus = exact_hypergradient(problem, theta - h * direction).value
    numeric = float((plus - minus) / (2 * h))
    analytic = float((exact.grad * direction).sum())
    assert exact.newton_residual < 1e-12
    assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(analytic))


@pytest.mark.parametrize("kind", ["logistic", "ridge"])
def test_algorithm1_estimate_is_exact_with_a_large_budget(kind: str) -> None:
    """K = 600 cold steps (κ ≈ 8) and N = q CG steps: the library's estimate equals the dense
    one (measured relative error ≈ 1e-13)."""
    problem = make_problem(kind, **LOGISTIC)
    theta = initial_theta(problem, seed=1)
    config = Algorithm1Config(600, problem.head_size, warm_phi=False, warm_v=False)
    tasks = torch.arange(problem.num_tasks)
    estimate = estimate_hypergradient(problem, theta, tasks, config, WarmStarts.fresh(problem))
    assert relative_error(estimate, exact_hypergradient(problem, theta).grad) < 1e-9


def test_repeated_tasks_weigh_as_often_as_drawn() -> None:
    """Sampling with replacement: a task drawn twice counts twice in ĝ."""
    problem = make_problem("logistic", **LOGISTIC)
    theta = initial_theta(problem, seed=1)
    config = Algorithm1Config(20, 5, warm_phi=False, warm_v=False)

    def estimate(tasks: list[int]) -> torch.Tensor:
        memory = WarmStarts.fresh(problem)
        return estimate_hypergradient(problem, theta, torch.tensor(tasks), config, memory)

    expected = (2 * estimate([0]) + estimate([1])) / 3
    torch.testing.assert_close(estimate([0, 1, 0]), expected, rtol=1e-12, atol=1e-14)


def test_config_and_problem_validate_their_arguments() -> None:
    with pytest.raises(ValueError, match="inner_steps"):
        Algorithm1Config(0, 1)
    with pytest.raises(ValueError, match="kind must be one of"):
        make_problem("svm")
    with pytest.raises(ValueError, match="l2"):
        make_problem("ridge", l2=0.0)


# --------------------------------------------------------------------------- (a) deterministic
def test_deterministic_converges_with_warm_starts_and_stalls_without() -> None:
    """All tasks every iteration, T = 60 (measured: warm K=⌈κ⌉, N=⌈√κ⌉ reaches 2.5e-10; cold
    K=1 stalls at 4.3e-2, cold N=1 at 8.0e-3; warm K=N=1 falls 4.6e-4 → 1.2e-6 over t=24..60)."""
    problem = make_problem("ridge", **RIDGE)
    theta0 = initial_theta(problem, RIDGE_THETA_SEED)
    k, n = paper_budget(problem, theta0)
    assert (k, n) == (11, 4)

    def best(config: Algorithm1Config) -> np.ndarray:
        trace = run_algorithm1(problem, config, theta0, iterations=60, outer_lr=RIDGE_LR)
        return np.minimum.accumulate(trace.grad_norm_sq)

    assert best(Algorithm1Config(k, n))[-1] < 1e-8
    assert best(Algorithm1Config(1, n, warm_phi=False, warm_v=False))[-1] > 1e-6
    assert best(Algorithm1Config(k, 1, warm_phi=False, warm_v=False))[-1] > 1e-6
    small = best(Algorithm1Config(1, 1))
    assert small[-1] < 1e-2 * small[24]  # no floor with warm starts, only slower


# --------------------------------------------------------------------------- (b) stochastic
def test_stochastic_plateau_shrinks_with_the_batch() -> None:
    """Constant step λ_θ/2, T = 120, plateau = mean ‖∇F‖² over t ≥ 60 (every 2nd), 2 seeds
    (measured: 6.9e-2 at |B| = 1, 3.5e-3 at |B| = 16, a ratio of 20; asserted ≥ 4)."""
    problem = make_problem("ridge", **RIDGE)
    theta0 = initial_theta(problem, RIDGE_THETA_SEED)
    config = Algorithm1Config(*paper_budget(problem, theta0))

    def plateau(batch_size: int) -> float:
        values = []
        for seed in range(2):
            trace = run_algorithm1(
                problem,
                config,
                theta0,
                iterations=120,
                outer_lr=RIDGE_LR / 2,
                batch_size=batch_size,
                seed=seed,
                record=lambda t: t >= 60 and t % 2 == 0,
            )
            values.append(np.mean(trace.grad_norm_sq))
        return float(np.mean(values))

    large, small = plateau(16), plateau(1)
    assert large < small / 4, (large, small)


# --------------------------------------------------------------------------- (c) K and N
def test_hypergradient_error_decreases_with_k_and_n() -> None:
    """Cold estimates at θ_0 (measured: 0.57, 0.22, 1.4e-2, 4.9e-6 for K = 1, 4, 16, 64 and
    0.14, 3.4e-2, 3.7e-3, 4e-16 for N = 1, 2, 4, 8; asserted: each ≥ 2× below the previous)."""
    problem = make_problem("logistic", **LOGISTIC)
    theta = initial_theta(problem, seed=1)
    exact = exact_hypergradient(problem, theta).grad
    tasks = torch.arange(problem.num_tasks)

    def error(k: int, n: int) -> float:
        config = Algorithm1Config(k, n, warm_phi=False, warm_v=False)
        memory = WarmStarts.fresh(problem)
        return relative_error(estimate_hypergradient(problem, theta, tasks, config, memory), exact)

    by_k = [error(k, problem.head_size) for k in (1, 4, 16, 64)]
    by_n = [error(400, n) for n in (1, 2, 4, 8)]
    for errors in (by_k, by_n):
        assert all(b < a / 2 for a, b in zip(errors, errors[1:], strict=False)), errors


# --------------------------------------------------------------------------- (d) warm starts
def test_warm_starts_reduce_the_error_at_small_budgets() -> None:
    """Along 15 iterates of exact gradient descent, median error over t ≥ 5: the warm start of
    v at N = 1 (K = 100, warm φ; measured 0.14 against 3.1 cold), and of φ and v at K = 2
    (N = q; measured 0.37 against 4.3 cold). Asserted: ≥ 3× lower."""
    problem = make_problem("logistic", **LOGISTIC)
    theta0 = initial_theta(problem, seed=1)
    thetas, grads = exact_gradient_descent(problem, theta0, iterations=15, lr=1.0)

    def median_error(config: Algorithm1Config) -> float:
        return float(replay_errors(problem, thetas, grads, config)[5:].median())

    warm_v, cold_v = (median_error(Algorithm1Config(100, 1, True, w)) for w in (True, False))
    q = problem.head_size
    warm_phi, cold_phi = (median_error(Algorithm1Config(2, q, w, w)) for w in (True, False))
    assert warm_v < cold_v / 3, (warm_v, cold_v)
    assert warm_phi < cold_phi / 3, (warm_phi, cold_phi)
