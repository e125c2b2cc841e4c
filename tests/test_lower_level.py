"""The lower level (mrmeta.lower_level) and head_hypergradient against dense references, float64.

References written here: the minimiser φ* by dense Newton steps on the flattened head with
torch.func.hessian (iterated to ‖∇g‖ < 1e-13); the hypergradient with respect to the features
by the implicit function theorem with dense matrices —
``∂F/∂Z_s = −(∂²g/∂Z_s∂φ) H⁻¹ ∇_φ f``, ``∂F/∂Z_q = ∇_{Z_q} f`` — at that φ*.

Shapes cover 5-way and 20-way, 1-shot and 5-shot, cross-entropy and squared loss, the
closed-form head (its logit-space solve up to ``SMALL_SYSTEM`` logits, and beyond it the
class-block solve in both its branches: ``n ≤ d + 1`` or not) and the autograd head (Newton-CG).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, hessian, jacrev

from mrmeta.lower_level import (
    RAY_GRID_EXPONENTS,
    AutogradHeadProblem,
    LinearHeadProblem,
    _class_block_solve,
    _logit_space_solve,
    _split_head,
    _stack_head,
    _with_ones,
    head_hypergradient,
    head_problem,
    newton_solve,
    solve_lower_level,
)

F64 = torch.float64
L2 = 0.05
PHI_TOL = 1e-8  # the solver's φ against the reference minimiser (max abs entry)
GRAD_TOL = 1e-7  # hypergradients, relative to their norm

# (ways, shots, feature dim): n·C against SMALL_SYSTEM picks the default exact solve (the
# logit-space one for the 5-way shapes, the class-block one for the 20-way shapes), and
# n = ways·shots against d + 1 the class-block solve's branch.
SHAPES = [
    pytest.param(5, 1, 16, id="5w1s"),
    pytest.param(5, 5, 32, id="5w5s"),
    pytest.param(5, 5, 12, id="5w5s-n>d+1"),
    pytest.param(20, 1, 24, id="20w1s"),
    pytest.param(20, 5, 6, id="20w5s-n>d+1"),
]


def _task(ways: int, shots: int, dim: int, loss: str, seed: int = 0) -> tuple[Tensor, ...]:
    """Support and query features ``(1, n, d)`` (scaled like real features) and labels."""
    gen = torch.Generator().manual_seed(seed)
    n = ways * shots
    zs = 3 * torch.randn(1, n, dim, generator=gen, dtype=F64)
    zq = 3 * torch.randn(1, 2 * n, dim, generator=gen, dtype=F64)
    if loss == "cross_entropy":
        ys = torch.arange(n).remainder(ways).view(1, n)
        yq = torch.arange(2 * n).remainder(ways).view(1, 2 * n)
    else:
        ys = torch.randn(1, n, ways, generator=gen, dtype=F64)
        yq = torch.randn(1, 2 * n, ways, generator=gen, dtype=F64)
    return zs, ys, zq, yq


def _loss(logits: Tensor, target: Tensor, loss: str) -> Tensor:
    if loss == "cross_entropy":
        return F.cross_entropy(logits, target)
    return F.mse_loss(logits, target)


def _unflatten(x: Tensor, ways: int, dim: int) -> tuple[Tensor, Tensor]:
    return x[: ways * dim].view(ways, dim), x[ways * dim :]


def _lower(zs: Tensor, ys: Tensor, loss: str, ways: int) -> Callable[[Tensor], Tensor]:
    """``g(x) = L(Z W(x)ᵀ + b(x), y) + μ/2 ‖x‖²`` on the flat head ``x``."""
    dim = zs.shape[-1]

    def g(x: Tensor) -> Tensor:
        w, b = _unflatten(x, ways, dim)
        return _loss(zs @ w.T + b, ys, loss) + 0.5 * L2 * x.pow(2).sum()

    return g


def _reference_minimiser(g: Callable[[Tensor], Tensor], size: int) -> Tensor:
    x = torch.zeros(size, dtype=F64)
    for _ in range(60):
        gradient = grad(g)(x)
        if gradient.norm() < 1e-13:
            return x
        step = torch.linalg.solve(hessian(g)(x), gradient)
        scale = 1.0  # halved while g increases, until close enough for plain Newton
        while gradient.norm() > 1e-6 and g(x - scale * step) > g(x) and scale > 1e-8:
            scale /= 2
        x = x - scale * step
    assert grad(g)(x).norm() < 1e-11, "the reference Newton did not converge"
    return x


def _problem(kind: str, zs: Tensor, ys: Tensor, ways: int, loss: str):
    dim = zs.shape[-1]
    center = {
        "weight": torch.zeros(1, ways, dim, dtype=F64),
        "bias": torch.zeros(1, ways, dtype=F64),
    }
    if kind == "linear":
        return LinearHeadProblem(zs, ys, center, L2, loss), center
    head = nn.Linear(dim, ways).double()  # the autograd path, on the same parameter names
    return AutogradHeadProblem(head, zs, ys, center, L2, loss), center


def _flat(phi: dict[str, Tensor]) -> Tensor:
    return torch.cat([phi["weight"][0].reshape(-1), phi["bias"][0]])


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize(("ways", "shots", "dim"), SHAPES)
def test_the_folded_problem_answers_every_question_as_the_problem_with_a_bias(
    ways: int, shots: int, dim: int, loss: str
) -> None:
    """``folded`` (``[Z, 1]``, one parameter ``[W, b]``) against the problem it folds, at a
    point away from the minimiser and a non-zero centre: objective, gradient, curvature
    products, the mixed product, the outer gradient and the exact inverse, each mapped with
    ``_stack_head`` (the features' gradients: their first ``d`` columns), to 1e-12 relative;
    the exact inverse against the solve with a bias, and ``H (H⁻¹ v) = v`` to 1e-10."""
    zs, ys, zq, yq = _task(ways, shots, dim, loss, seed=3)
    gen = torch.Generator().manual_seed(4)

    def head() -> dict[str, Tensor]:
        return {"weight": torch.randn(1, ways, dim, generator=gen, dtype=F64),
                "bias": torch.randn(1, ways, generator=gen, dtype=F64)}  # fmt: skip

    center, phi, v = head(), head(), head()
    problem = LinearHeadProblem(zs, ys, center, L2, loss)
    folded = problem.folded
    fold = lambda tree: _stack_head(tree)  # noqa: E731
    phi_f, v_f = {"weight": fold(phi)}, {"weight": fold(v)}

    def close(got: Tensor, want: Tensor) -> None:
        assert float((got - want).abs().max()) <= 1e-12 * max(1.0, float(want.abs().max()))

    close(folded.objective(phi_f), problem.objective(phi))
    close(folded.gradient(phi_f)["weight"], fold(problem.gradient(phi)))
    grad, curvature_f = folded.gradient_and_curvature(phi_f)
    close(grad["weight"], fold(problem.gradient(phi)))
    curvature = problem.curvature(phi)
    close(curvature_f().hvp(v_f)["weight"], fold(curvature.hvp(v)))
    mixed_f, center_f = folded.curvature(phi_f).mixed_vjp(v_f)
    mixed, center_part = curvature.mixed_vjp(v)
    close(mixed_f[..., :dim], mixed)
    close(center_f["weight"], fold(center_part))
    query_f, outer_f = folded.outer_gradient(phi_f, _with_ones(zq), yq)
    query, outer = problem.outer_gradient(phi, zq, yq)
    close(query_f[..., :dim], query)
    close(outer_f["weight"], fold(outer))
    inverse = problem.exact_inverse(phi, v)  # on the folded problem
    close(fold(inverse), fold(curvature.solve(v)))  # the solve with a bias
    residual = fold(curvature.hvp(inverse)) - fold(v)  # and it is the inverse (its rounding
    assert float(residual.abs().max()) <= 1e-10 * float(fold(v).abs().max())  # grows with κ)


@pytest.mark.parametrize("kind", ["linear", "folded", "autograd"])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize(("ways", "shots", "dim"), SHAPES)
def test_newton_reaches_the_reference_minimiser(
    ways: int, shots: int, dim: int, loss: str, kind: str
) -> None:
    """``folded``: the bias folded into the weights on ``[Z, 1]`` (what ``solve_lower_level``
    runs Newton on), mapped back to ``(W, b)``."""
    zs, ys, _, _ = _task(ways, shots, dim, loss)
    problem, center = _problem("linear" if kind == "folded" else kind, zs, ys, ways, loss)
    if kind == "folded":
        stacked = {"weight": _stack_head(center)}
        solved, report = newton_solve(problem.folded, stacked, tol=1e-11, max_iters=50)
        phi = _split_head(solved["weight"])
    else:
        phi, report = newton_solve(problem, center, tol=1e-11, max_iters=50)
    want = _reference_minimiser(_lower(zs[0], ys[0], loss, ways), ways * (dim + 1))
    assert bool(report.converged.all()) and float(report.grad_norm.max()) <= 1e-11
    assert float((_flat(phi) - want).abs().max()) < PHI_TOL
    if loss == "mse":  # a quadratic: one Newton step (one more to polish the float32 solve;
        # Newton-CG's inexact directions a few)
        assert int(report.iterations.max()) <= (5 if kind == "autograd" else 2)


@pytest.mark.parametrize("kind", ["linear", "autograd"])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize(("ways", "shots", "dim"), SHAPES)
def test_head_hypergradient_at_the_solution_matches_the_dense_ift_formula(
    ways: int, shots: int, dim: int, loss: str, kind: str
) -> None:
    zs, ys, zq, yq = _task(ways, shots, dim, loss, seed=1)
    problem, center = _problem(kind, zs, ys, ways, loss)
    phi, _ = newton_solve(problem, center, tol=1e-11, max_iters=50)
    size = ways * (dim + 1)
    result = head_hypergradient(problem, phi, zq, yq, cg_iters=4 * size, tol=1e-13)
    exact = head_hypergradient(problem, phi, zq, yq, cg_iters=1, exact_v=True)

    x_star = _reference_minimiser(_lower(zs[0], ys[0], loss, ways), size)

    def outer(x: Tensor, z_query: Tensor) -> Tensor:
        w, b = _unflatten(x, ways, dim)
        return _loss(z_query @ w.T + b, yq[0], loss)

    def lower_grad(x: Tensor, z_support: Tensor) -> Tensor:
        return grad(lambda y: _lower(z_support, ys[0], loss, ways)(y))(x)

    v = torch.linalg.solve(
        hessian(_lower(zs[0], ys[0], loss, ways))(x_star), grad(outer)(x_star, zq[0])
    )
    mixed = jacrev(lower_grad, argnums=1)(x_star, zs[0])  # (size, n, d)
    want_support = -torch.einsum("p,pnd->nd", v, mixed)
    want_query = grad(outer, argnums=1)(x_star, zq[0])
    for got, want in ((result.support[0], want_support), (result.query[0], want_query)):
        assert float((got - want).norm() / want.norm()) < GRAD_TOL
    assert float((_flat(result.v) - v).norm() / v.norm()) < GRAD_TOL
    if kind == "linear":  # the exact solve of v gives the same hypergradient
        assert exact.cg is None and float(exact.residual.max()) < 1e-9
        assert float((exact.support[0] - want_support).norm() / want_support.norm()) < GRAD_TOL
        assert float((_flat(exact.v) - v).norm() / v.norm()) < GRAD_TOL
    torch.testing.assert_close(result.center["weight"], L2 * result.v["weight"])


# (μ, relative tolerance): tight fits, where the support probabilities are near one-hot and
# H's condition number is large (about 1e5 and 1e9 at 20-way 1-shot).
TIGHT_FITS = [
    pytest.param(1e-3, 1e-11, id="mu1e-3"),
    pytest.param(1e-6, 1e-8, id="mu1e-6"),
]
EXACT_SOLVES = [
    pytest.param(_logit_space_solve, id="logit-space"),
    pytest.param(_class_block_solve, id="class-blocks"),
]


@pytest.mark.parametrize("solve", EXACT_SOLVES)
@pytest.mark.parametrize(("l2", "tol"), TIGHT_FITS)
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize(("ways", "shots", "dim"), SHAPES)
def test_each_exact_solve_matches_a_dense_solve_where_the_fit_is_tight(
    ways: int,
    shots: int,
    dim: int,
    loss: str,
    l2: float,
    tol: float,
    solve: Callable[..., Tensor],
) -> None:
    """Both exact solves (whichever ``Curvature.solve`` would pick for the shape) against
    ``torch.linalg.solve`` with the dense Hessian from torch.func, for two tasks at once, at
    the minimiser of a problem with a small μ, where the support probabilities are near
    one-hot (where the support set is separable): the regime in which a capacitance matrix
    written as ``I − Σ …`` loses every digit (measured at 20-way 1-shot, μ = 1e-6: 3e-5
    relative, against 8e-10 with the complement form and 4e-11 for the logit-space solve)."""
    tasks = [_task(ways, shots, dim, loss, seed=seed) for seed in (2, 5)]
    zs = torch.cat([t[0] for t in tasks])
    ys = torch.cat([t[1] for t in tasks])
    center = {
        "weight": torch.zeros(2, ways, dim, dtype=F64),
        "bias": torch.zeros(2, ways, dtype=F64),
    }
    problem = LinearHeadProblem(zs, ys, center, l2, loss)
    phi, report = newton_solve(problem, center, tol=1e-10, max_iters=80)
    assert bool(report.converged.all())
    state = problem.curvature(phi).state
    if loss == "cross_entropy" and ways * shots <= dim + 1:  # separable: the tight fit
        assert float(state.max(-1).values.min()) > 0.9
    gen = torch.Generator().manual_seed(3)
    rhs = {k: torch.randn(t.shape, generator=gen, dtype=F64) for k, t in phi.items()}
    diag, unit = problem.logit_loss.hessian_parts(state)
    stacked = solve(_with_ones(zs), problem.gram, diag, unit, l2, _stack_head(rhs))
    for task in range(2):

        def lower(x: Tensor, task: int = task) -> Tensor:
            w, b = _unflatten(x, ways, dim)
            return _loss(zs[task] @ w.T + b, ys[task], loss) + 0.5 * l2 * x.pow(2).sum()

        at = {k: t[task : task + 1] for k, t in phi.items()}
        along = {k: t[task : task + 1] for k, t in rhs.items()}
        want = torch.linalg.solve(hessian(lower)(_flat(at)), _flat(along))
        got = torch.cat([stacked[task, :, :-1].reshape(-1), stacked[task, :, -1]])
        assert float((got - want).norm() / want.norm()) < tol


def test_the_exact_solve_of_a_float32_problem_is_exact_to_float32() -> None:
    """``Curvature.solve`` on a float32 problem computes the loss's curvature in float64 too:
    a float32 softmax sums to 1 only to about 1e-7, which the class-block capacitance would
    otherwise amplify (measured at 20-way 1-shot, μ = 0.03: 2e-6 relative; 5-way: 2e-5)."""
    for ways, dim in ((5, 16), (20, 24)):
        zs, ys, _, _ = _task(ways, 1, dim, "cross_entropy", seed=4)
        center = {
            "weight": torch.zeros(1, ways, dim, dtype=F64),
            "bias": torch.zeros(1, ways, dtype=F64),
        }
        problem = LinearHeadProblem(zs, ys, center, 0.03, "cross_entropy")
        phi, _ = newton_solve(problem, center, tol=1e-10, max_iters=80)
        narrow = LinearHeadProblem(
            zs.float(), ys, {k: t.float() for k, t in center.items()}, 0.03, "cross_entropy"
        )
        rhs = {k: torch.ones_like(t) for k, t in phi.items()}
        want = problem.curvature(phi).solve(rhs)
        narrow_phi = {k: t.float() for k, t in phi.items()}
        got = narrow.curvature(narrow_phi).solve({k: t.float() for k, t in rhs.items()})
        error = (_flat(got).double() - _flat(want)).norm() / _flat(want).norm()
        assert float(error) < 1e-6


def test_newton_cannot_diverge_from_a_far_start() -> None:
    """From this start a full Newton step overshoots (30 → 586); the line search keeps every
    iterate's objective at or below the previous one and still converges."""
    zs, ys, _, _ = _task(5, 1, 16, "cross_entropy")
    problem, _ = _problem("linear", zs, ys, 5, "cross_entropy")
    gen = torch.Generator().manual_seed(2)
    start = {
        "weight": torch.randn(1, 5, 16, generator=gen, dtype=F64),
        "bias": torch.randn(1, 5, generator=gen, dtype=F64),
    }
    values = [float(problem.objective(start))]
    for iters in range(1, 40):  # from the start itself: the line search is what is tested
        phi, report = newton_solve(problem, start, tol=1e-10, max_iters=iters, ray_start=False)
        values.append(float(problem.objective(phi)))
        if bool(report.converged.all()):
            break
    assert bool(report.converged.all())
    assert all(b <= a + 1e-12 for a, b in zip(values, values[1:], strict=False))


def test_a_plain_newton_step_would_overshoot_there() -> None:
    """The far start of the test above is one where the line search matters: the full step
    increases g (so that test fails if the line search is removed)."""
    zs, ys, _, _ = _task(5, 1, 16, "cross_entropy")
    problem, _ = _problem("linear", zs, ys, 5, "cross_entropy")
    gen = torch.Generator().manual_seed(2)
    start = {
        "weight": torch.randn(1, 5, 16, generator=gen, dtype=F64),
        "bias": torch.randn(1, 5, generator=gen, dtype=F64),
    }
    direction = problem.curvature(start).solve({k: -g for k, g in problem.gradient(start).items()})
    full = {k: start[k] + direction[k] for k in start}
    assert float(problem.objective(full)) > float(problem.objective(start))


def _random_center(tasks: int, ways: int, dim: int, seed: int) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "weight": 0.3 * torch.randn(tasks, ways, dim, generator=gen, dtype=F64),
        "bias": 0.3 * torch.randn(tasks, ways, generator=gen, dtype=F64),
    }


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize(("ways", "shots", "dim"), SHAPES)
def test_squared_loss_solution_is_the_minimiser_of_the_squared_loss_problem(
    ways: int, shots: int, dim: int, loss: str
) -> None:
    """``squared_loss_solution`` with a non-zero centre (a learned head start) against the
    dense reference minimiser of ``mean (ZWᵀ + b − Ỹ)² + μ/2 ‖x − c‖²``, ``Ỹ`` the targets (mse)
    or ``onehot(y) − 1/C`` (cross-entropy), in both the ``n`` and the ``d + 1`` space (SHAPES
    has both). For the squared loss the ray start is then the problem's minimiser."""
    zs, ys, _, _ = _task(ways, shots, dim, loss)
    center = _random_center(1, ways, dim, seed=3)
    problem = LinearHeadProblem(zs, ys, center, L2, loss)
    c = _flat(center)
    targets = ys[0] if loss == "mse" else F.one_hot(ys[0], ways).to(F64) - 1.0 / ways

    def g(x: Tensor) -> Tensor:
        w, b = _unflatten(x, ways, dim)
        return F.mse_loss(zs[0] @ w.T + b, targets) + 0.5 * L2 * (x - c).pow(2).sum()

    want = _reference_minimiser(g, ways * (dim + 1))
    assert float((_flat(problem.squared_loss_solution()) - want).abs().max()) < PHI_TOL
    if loss == "mse":
        start = problem.newton_start(_random_center(1, ways, dim, seed=5))  # α = 1: φ* itself
        assert float((_flat(start) - want).abs().max()) < PHI_TOL


@pytest.mark.parametrize("l2", [L2, 1.0])
def test_newton_start_lies_on_the_ray_is_never_worse_and_is_chosen_per_task(l2: float) -> None:
    """Three cross-entropy tasks: the start is ``φ⁰ + α (Θ_sq − φ⁰)`` with ``α`` the grid point
    of lowest ``g`` (checked with ``problem.objective`` at every point of the documented grid)
    per task, ``g`` no higher than at ``φ⁰``; a task that starts at its minimiser stays there
    (nothing on the ray is lower) while the others move."""
    ways, dim = 20, 24
    zs = torch.cat([_task(ways, 1, dim, "cross_entropy", seed=s)[0] for s in range(3)])
    gen = torch.Generator().manual_seed(7)
    ys = torch.stack([torch.randperm(ways, generator=gen) for _ in range(3)])  # per-task labels
    center = _random_center(3, ways, dim, seed=4)
    problem = LinearHeadProblem(zs, ys, center, l2, "cross_entropy")
    solved, _ = newton_solve(problem, center, tol=1e-11, max_iters=50)
    away = _random_center(3, ways, dim, seed=6)  # task 0 starts away from c, task 1 at zero
    zero = {k: torch.zeros_like(t) for k, t in away.items()}
    phi0 = {k: torch.cat([away[k][:1], zero[k][1:2], solved[k][2:]]) for k in center}
    start = problem.newton_start(phi0)
    toward = {k: problem.squared_loss_solution()[k] - phi0[k] for k in phi0}
    moved = {k: start[k] - phi0[k] for k in phi0}
    for t in range(3):
        a = torch.cat([toward[k][t].reshape(-1) for k in toward])
        m = torch.cat([moved[k][t].reshape(-1) for k in moved])
        alpha = float(a @ m / (a @ a))
        assert alpha >= 0 and float((m - alpha * a).norm()) <= 1e-12 * (1 + float(m.norm()))
    grid = [0.0] + [2.0 ** (k / 2) for k in RAY_GRID_EXPONENTS]
    on_grid = torch.stack(
        [problem.objective({k: phi0[k] + a * toward[k] for k in phi0}) for a in grid]
    )
    before, after = problem.objective(phi0), problem.objective(start)
    torch.testing.assert_close(after, on_grid.min(0).values, rtol=1e-12, atol=0.0)
    if l2 == L2:  # from zero the grid's interior is used (α = 2^(5/2) here), not just 0 or 1
        assert grid[int(on_grid[:, 1].argmin())] not in (0.0, 1.0)
    assert bool((after <= before).all())
    assert bool((after[:2] < before[:2] - 1e-3).all())  # the two cold tasks move down
    assert all(torch.equal(start[k][2], phi0[k][2]) for k in phi0)  # the solved one stays


def test_newton_start_is_the_lowest_point_of_the_documented_grid_for_every_task() -> None:
    """Twelve 20-way tasks with feature scales from 0.3 to 10, labels permuted per task, half
    of them starting from zero and half from a centre with a large bias: each start has the
    lowest ``g`` (by ``problem.objective``) over ``φ⁰ + α (Θ_sq − φ⁰)`` on the documented grid,
    and the chosen α spread over the grid (odd and even exponents both)."""
    ways, dim, tasks = 20, 24, 12
    gen = torch.Generator().manual_seed(8)
    scales = torch.logspace(-0.5, 1.0, tasks, dtype=F64).view(-1, 1, 1)
    zs = scales * torch.randn(tasks, ways, dim, generator=gen, dtype=F64)
    ys = torch.stack([torch.randperm(ways, generator=gen) for _ in range(tasks)])
    zero = {
        "weight": torch.zeros(tasks, ways, dim, dtype=F64),
        "bias": torch.zeros(tasks, ways, dtype=F64),
    }
    away = _random_center(tasks, ways, dim, seed=9)
    away["bias"] = 10 * away["bias"]
    odd = torch.arange(tasks) % 2 == 1
    phi0 = {k: torch.where(odd.view(-1, *[1] * (t.dim() - 1)), away[k], t) for k, t in zero.items()}
    # the odd tasks start at their centre (a learned head start), which has a large bias
    problem = LinearHeadProblem(zs, ys, phi0, L2, "cross_entropy")
    start = problem.newton_start(phi0)
    toward = {k: problem.squared_loss_solution()[k] - phi0[k] for k in phi0}
    grid = [0.0] + [2.0 ** (k / 2) for k in RAY_GRID_EXPONENTS]
    on_grid = torch.stack(
        [problem.objective({k: phi0[k] + a * toward[k] for k in phi0}) for a in grid]
    )
    torch.testing.assert_close(
        problem.objective(start), on_grid.min(0).values, rtol=1e-12, atol=0.0
    )
    chosen = on_grid.argmin(0).tolist()  # index i ≥ 1 is exponent RAY_GRID_EXPONENTS[i - 1]
    exponents = {RAY_GRID_EXPONENTS[i - 1] for i in chosen if i > 0}
    assert len(exponents) >= 4 and {e % 2 for e in exponents} == {0, 1}


def test_newton_start_keeps_the_start_of_a_task_with_non_finite_features() -> None:
    """A task whose ridge system cannot be factored (NaN features) keeps ``φ⁰``; the other
    task of the chunk still moves, and nothing raises."""
    ways, dim = 5, 16
    zs = torch.cat([_task(ways, 1, dim, "cross_entropy", seed=s)[0] for s in range(2)])
    zs[1, 0, 0] = torch.nan
    ys = torch.arange(ways).repeat(2, 1)
    center = {
        "weight": torch.zeros(2, ways, dim, dtype=F64),
        "bias": torch.zeros(2, ways, dtype=F64),
    }
    problem = LinearHeadProblem(zs, ys, center, L2, "cross_entropy")
    assert bool(problem.squared_loss_solution()["weight"][1].isnan().all())
    start = problem.newton_start(center)
    assert all(torch.equal(start[k][1], center[k][1]) for k in center)
    assert float(start["weight"][0].abs().max()) > 0


def test_the_ray_start_cuts_newton_iterations_and_ends_at_the_same_minimiser() -> None:
    """20-way 1-shot, four tasks from zero: measured here 9–10 iterations without the ray start
    and 6 with it (Omniglot features: 8.1 → 3.6); both end at φ* to 1e-10."""
    ways, dim = 20, 24
    zs = torch.cat([_task(ways, 1, dim, "cross_entropy", seed=s)[0] for s in range(4)])
    ys = torch.arange(ways).repeat(4, 1)
    center = {
        "weight": torch.zeros(4, ways, dim, dtype=F64),
        "bias": torch.zeros(4, ways, dtype=F64),
    }
    problem = LinearHeadProblem(zs, ys, center, L2, "cross_entropy")
    plain, plain_report = newton_solve(problem, center, tol=1e-11, max_iters=50, ray_start=False)
    rayed, ray_report = newton_solve(problem, center, tol=1e-11, max_iters=50)
    assert bool(plain_report.converged.all()) and bool(ray_report.converged.all())
    assert int(ray_report.iterations.sum()) <= int(plain_report.iterations.sum()) - 8
    for k in plain:
        assert float((plain[k] - rayed[k]).abs().max()) < 1e-10


def test_newton_with_no_iterations_returns_its_start() -> None:
    """``max_iters = 0`` means no solve: not even the ray start moves ``φ⁰``."""
    zs, ys, _, _ = _task(5, 1, 16, "cross_entropy")
    problem, center = _problem("linear", zs, ys, 5, "cross_entropy")
    phi, report = newton_solve(problem, center, tol=1e-11, max_iters=0)
    assert all(torch.equal(phi[k], center[k]) for k in center)
    assert report.iterations.tolist() == [0]


@pytest.mark.parametrize(
    ("ways", "dim"),
    # n·C = 25 logits: the logit-space solve; 400: the class-block solve.
    [pytest.param(5, 16, id="5w-logit-space"), pytest.param(20, 24, id="20w-class-blocks")],
)
def test_solve_lower_level_reports_per_task_and_casts_back(ways: int, dim: int) -> None:
    zs, ys, _, _ = _task(ways, 1, dim, "cross_entropy")
    zs = torch.cat([zs, 0.1 * zs]).float()  # two tasks of different difficulty, float32
    ys = torch.cat([ys, ys])
    center = {"weight": torch.zeros(2, ways, dim), "bias": torch.zeros(2, ways)}
    head = nn.Linear(dim, ways)
    problem = head_problem(head, zs, ys, center, l2=L2, loss="cross_entropy")
    phi, report = solve_lower_level(
        problem, center, solver="newton", max_iters=50, tol=1e-9, lr="auto"
    )
    assert phi["weight"].dtype == torch.float32
    assert report.iterations.shape == (2,) and bool((report.iterations >= 1).all())
    assert bool(report.converged.all()) and float(report.grad_norm.max()) <= 1e-9
    phi_gd, report_gd = solve_lower_level(
        problem, center, solver="gd", max_iters=7, tol=1e-9, lr="auto"
    )
    assert report_gd.iterations.tolist() == [7, 7] and not bool(report_gd.converged.any())


def test_newton_refuses_a_lower_level_without_l2() -> None:
    from mrmeta import MemoryReduced

    with pytest.raises(ValueError, match="l2 > 0"):
        MemoryReduced(nn.Linear(3, 4), nn.Linear(4, 2), l2=0.0)


@pytest.mark.parametrize(
    ("ways", "shots", "dim"),
    [
        pytest.param(5, 1, 16, id="5w1s-25-logits"),  # the logit-space solve
        pytest.param(5, 5, 32, id="5w5s-125-logits"),
        pytest.param(20, 1, 24, id="20w1s-400-logits"),  # the class-block solve
    ],
)
def test_exact_v_of_a_float32_model_is_exact_to_float32_rounding(
    ways: int, shots: int, dim: int
) -> None:
    """The exact solve of ``v`` for a float32 model (the float64 Woodbury or dense solve, cast
    back) against a dense float64 solve on the same float32-rounded inputs, with a small μ:
    accurate to float32's rounding of the result."""
    l2 = 1e-3
    zs, ys, zq, yq = _task(ways, shots, dim, "cross_entropy")
    zs, zq = zs.float(), zq.float()
    center = {"weight": torch.zeros(1, ways, dim), "bias": torch.zeros(1, ways)}
    problem = head_problem(nn.Linear(dim, ways), zs, ys, center, l2=l2, loss="cross_entropy")
    phi, _ = solve_lower_level(problem, center, solver="newton", max_iters=80, tol=1e-6, lr="auto")
    got = head_hypergradient(problem, phi, zq, yq, cg_iters=1, exact_v=True).v
    assert got is not None and got["weight"].dtype == torch.float32

    x, zs64, zq64 = _flat(phi).double(), zs[0].double(), zq[0].double()

    def lower(y: Tensor) -> Tensor:
        w, b = _unflatten(y, ways, dim)
        return F.cross_entropy(zs64 @ w.T + b, ys[0]) + 0.5 * l2 * y.pow(2).sum()

    def outer(y: Tensor) -> Tensor:
        w, b = _unflatten(y, ways, dim)
        return F.cross_entropy(zq64 @ w.T + b, yq[0])

    h = hessian(lower)(x)
    want = torch.linalg.solve(h, grad(outer)(x))
    assert float((_flat(got).double() - want).norm() / want.norm()) < 1e-6
