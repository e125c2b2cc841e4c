"""hypergradient against the dense implicit-function-theorem formula, unrolled differentiation and
finite differences, on a small float64 bilevel problem.

Upper variables θ: a 2-layer tanh MLP R³ → R⁴. Lower variables φ = (W (C, 4), b (C,)): a
multinomial logistic-regression head on the MLP's features.
``g(θ, φ) = CE(support) + μ/2 ‖φ‖²`` (μ-strongly convex in φ), ``f(θ, φ) = CE(query)``.
The references use torch.func Hessians/Jacobians of flattened vectors and torch.linalg.solve.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import grad, hessian, jacrev

from mrmeta import hypergradient

F64 = torch.float64
MU = 0.1
WAYS, FEATURES = 3, 4
THETA_SHAPES = {"w1": (5, 3), "b1": (5,), "w2": (FEATURES, 5), "b2": (FEATURES,)}
PHI_SHAPES = {"W": (WAYS, FEATURES), "b": (WAYS,)}
PHI_DIM = WAYS * (FEATURES + 1)


def _unflat(vec: Tensor, shapes: dict[str, tuple[int, ...]]) -> dict[str, Tensor]:
    sizes = [math.prod(s) for s in shapes.values()]
    return {k: t.reshape(s) for (k, s), t in zip(shapes.items(), vec.split(sizes), strict=True)}


def _flat(tensors: dict[str, Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors.values()])


def _problem(seed: int = 0) -> tuple[dict[str, Tensor], object, object]:
    """θ, and the losses ``f(θ, φ)``, ``g(θ, φ)`` over dicts (φ may carry a task dimension)."""
    gen = torch.Generator().manual_seed(seed)
    theta = {k: torch.randn(s, generator=gen, dtype=F64) for k, s in THETA_SHAPES.items()}
    xs, xq = (torch.randn(n, 3, generator=gen, dtype=F64) for n in (12, 9))
    ys, yq = torch.arange(12) % WAYS, torch.arange(9) % WAYS

    def logits(th: dict[str, Tensor], ph: dict[str, Tensor], x: Tensor) -> Tensor:
        z = torch.tanh(torch.tanh(x @ th["w1"].T + th["b1"]) @ th["w2"].T + th["b2"])
        return z @ ph["W"].T + ph["b"]

    def f(th: dict[str, Tensor], ph: dict[str, Tensor]) -> Tensor:
        return F.cross_entropy(logits(th, ph, xq), yq)

    def g(th: dict[str, Tensor], ph: dict[str, Tensor]) -> Tensor:
        penalty = 0.5 * MU * (ph["W"].pow(2).sum() + ph["b"].pow(2).sum())
        return F.cross_entropy(logits(th, ph, xs), ys) + penalty

    return theta, f, g


def _flat_loss(loss: object) -> object:
    return lambda tv, pv: loss(_unflat(tv, THETA_SHAPES), _unflat(pv, PHI_SHAPES))


def _solve_inner(g: object, theta: dict[str, Tensor]) -> dict[str, Tensor]:
    """Exact φ*(θ) by Newton's method on the flattened φ (dense Hessian)."""
    tv = _flat(theta).detach()

    def g_phi(pv: Tensor) -> Tensor:
        return _flat_loss(g)(tv, pv)

    pv = torch.zeros(PHI_DIM, dtype=F64)
    for _ in range(30):  # quadratic convergence: about 6 steps from zero
        gradient = grad(g_phi)(pv)
        if float(gradient.norm()) < 1e-13:
            break
        pv = pv - torch.linalg.solve(hessian(g_phi)(pv), gradient)
    assert float(grad(g_phi)(pv).norm()) < 1e-12
    return _unflat(pv, PHI_SHAPES)


def _dense_hypergradient(f: object, g: object, theta: dict, phi: dict) -> tuple[Tensor, Tensor]:
    """``∇_θ f − (∂∇_φ g/∂θ)ᵀ H⁻¹ ∇_φ f`` from dense matrices; also ``v = H⁻¹ ∇_φ f``."""
    tv, pv = _flat(theta), _flat(phi)
    hess = hessian(_flat_loss(g), argnums=1)(tv, pv)  # (q, q)
    mixed = jacrev(jacrev(_flat_loss(g), argnums=1), argnums=0)(tv, pv)  # (q, p)
    f_theta, f_phi = jacrev(_flat_loss(f), argnums=(0, 1))(tv, pv)
    v = torch.linalg.solve(hess, f_phi)
    return f_theta - mixed.T @ v, v


def _rel(x: Tensor, ref: Tensor) -> float:
    return float(torch.linalg.vector_norm(x - ref) / torch.linalg.vector_norm(ref))


def test_matches_dense_implicit_function_theorem() -> None:
    torch.manual_seed(0)
    theta, f, g = _problem()
    phi = _solve_inner(g, theta)
    ref_grad, ref_v = _dense_hypergradient(f, g, theta, phi)
    out = hypergradient(f, g, theta, phi, cg_iters=PHI_DIM)
    assert set(out.grad) == set(THETA_SHAPES)
    assert all(out.grad[k].shape == s for k, s in THETA_SHAPES.items())
    # float64 and CG run for dim(φ) steps (exact in exact arithmetic): 1e-6 relative as asked,
    # far above the ~1e-12 rounding actually seen.
    assert _rel(_flat(out.grad), ref_grad) < 1e-6
    assert _rel(_flat(out.v), ref_v) < 1e-6
    assert float(out.outer_loss) == float(f(theta, phi))
    assert out.cg.iterations <= PHI_DIM and out.cg.breakdown is None


def test_warm_start_at_the_solution_needs_one_cg_step() -> None:
    torch.manual_seed(1)
    theta, f, g = _problem(seed=1)
    phi = _solve_inner(g, theta)
    ref_grad, ref_v = _dense_hypergradient(f, g, theta, phi)
    out = hypergradient(f, g, theta, phi, cg_iters=1, v0=_unflat(ref_v, PHI_SHAPES))
    # Starting at v* the first residual is rounding only (float64): 1e-10 of ‖∇_φ f‖.
    assert float(out.cg.residual_norms[0]) < 1e-10 * float(ref_v.norm())
    assert _rel(_flat(out.grad), ref_grad) < 1e-8
    cold = hypergradient(f, g, theta, phi, cg_iters=1)
    assert _rel(_flat(cold.grad), ref_grad) > 1e-3  # one cold step is far off: v0 was used


def test_matches_differentiating_through_many_unrolled_steps() -> None:
    torch.manual_seed(2)
    theta, f, g = _problem(seed=2)
    phi_star = _solve_inner(g, theta)
    ref_grad, _ = _dense_hypergradient(f, g, theta, phi_star)
    hess = hessian(_flat_loss(g), argnums=1)(_flat(theta), _flat(phi_star))
    eigs = torch.linalg.eigvalsh(hess)
    lr, steps = 1.0 / float(eigs[-1]), 500
    # Unrolled GD from φ* (a fixed point) has Jacobian J_K = (I − λH)^K-weighted partial sums
    # with J_K − J* = −(I − λH)^K J*: relative truncation error ≤ (1 − λμ_min)^K.
    truncation = (1.0 - lr * float(eigs[0])) ** steps
    assert truncation < 1e-8

    theta_l = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
    phi = {k: v.clone().requires_grad_(True) for k, v in phi_star.items()}
    for _ in range(steps):
        grads = torch.autograd.grad(g(theta_l, phi), list(phi.values()), create_graph=True)
        phi = {k: p - lr * d for (k, p), d in zip(phi.items(), grads, strict=True)}
    unrolled = torch.autograd.grad(f(theta_l, phi), list(theta_l.values()))
    out = hypergradient(f, g, theta, phi_star, cg_iters=PHI_DIM)
    # Looser than the dense check (1e-5 instead of 1e-6): besides the truncation above, 500
    # steps of double-backward accumulate rounding in the Jacobian recursion.
    assert _rel(torch.cat([u.reshape(-1) for u in unrolled]), ref_grad) < 1e-5
    assert _rel(_flat(out.grad), torch.cat([u.reshape(-1) for u in unrolled])) < 1e-5


def test_matches_central_finite_differences_of_the_value_function() -> None:
    torch.manual_seed(3)
    theta, f, g = _problem(seed=3)
    out = hypergradient(f, g, theta, _solve_inner(g, theta), cg_iters=PHI_DIM)
    gen = torch.Generator().manual_seed(4)
    direction = torch.randn(_flat(theta).shape, generator=gen, dtype=F64)
    direction /= direction.norm()
    eps = 1e-5

    def value(t: float) -> float:  # F(θ + t d) = f(θ + t d, φ*(θ + t d)), φ* re-solved
        shifted = _unflat(_flat(theta) + t * direction, THETA_SHAPES)
        return float(f(shifted, _solve_inner(g, shifted)))

    fd = (value(eps) - value(-eps)) / (2 * eps)
    # Central differences in float64 with ε = 1e-5: O(ε²) ≈ 1e-10 truncation plus
    # ~1e-16/ε ≈ 1e-11 rounding; allow 1e-7 of ‖∇F‖.
    assert abs(float(_flat(out.grad) @ direction) - fd) < 1e-7 * float(_flat(out.grad).norm())


def test_batched_tasks_solve_per_task_systems() -> None:
    """Two tasks sharing θ: φ stacked as ``(2, ...)``, losses summed, ``batched=True``."""
    torch.manual_seed(5)
    theta, f_a, g_a = _problem(seed=5)
    _, f_b, g_b = _problem(seed=6)
    # Task b keeps task a's θ (shared) but has its own data (seed 6).
    phis = [_solve_inner(g_a, theta), _solve_inner(g_b, theta)]
    stacked = {k: torch.stack([p[k] for p in phis]) for k in PHI_SHAPES}

    def split(fa: object, fb: object) -> object:
        return lambda th, ph: (
            fa(th, {k: v[0] for k, v in ph.items()}) + fb(th, {k: v[1] for k, v in ph.items()})
        )

    out = hypergradient(
        split(f_a, f_b), split(g_a, g_b), theta, stacked, cg_iters=PHI_DIM, batched=True
    )
    ref_a, v_a = _dense_hypergradient(f_a, g_a, theta, phis[0])
    ref_b, v_b = _dense_hypergradient(f_b, g_b, theta, phis[1])
    assert out.cg.residual_norms.shape[1] == 2
    # Same float64 budget as the single-task check.
    assert _rel(_flat(out.grad), ref_a + ref_b) < 1e-6
    assert _rel(_flat({k: v[0] for k, v in out.v.items()}), v_a) < 1e-6
    assert _rel(_flat({k: v[1] for k, v in out.v.items()}), v_b) < 1e-6
