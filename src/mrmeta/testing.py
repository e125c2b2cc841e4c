"""Testing tools for users: synthetic bilevel meta-learning problems whose hypergradient is
known exactly, to check an implementation or a setting of Algorithm 1 against the truth.

A fixed, finite set of ``M`` tasks shares a nonlinear feature map with upper-level variable
``θ = A`` (``d_in × d``); each task ``i`` has a linear head ``φ_i = (W_i, b_i)`` (``c × d``
and ``c``) on the features ``Z = tanh(X A)``::

    g_i(A, φ) = ℓ(Z_s W_iᵀ + b_i, y_s) + μ/2 ‖φ‖²      (lower level, support set)
    f_i(A, φ) = ℓ(Z_q W_iᵀ + b_i, y_q) + ρ/2 ‖A‖²      (upper level, query set)
    F(A)      = (1/M) Σ_i f_i(A, φ_i*(A)),   φ_i*(A) = argmin_φ g_i(A, φ)

with ``ℓ`` the mean softmax cross-entropy (multinomial logistic regression, ``"logistic"``) or
the mean squared error (ridge regression, ``"ridge"``). ``g_i`` is ``μ``-strongly convex in
``φ`` through its L2 term, as the theory assumes (docs/method.md §5).

Two independent ways of getting the hypergradient live here:

* :func:`exact_hypergradient` — the reference: ``φ*`` by damped Newton to machine precision,
  dense Hessians and mixed Jacobians from :mod:`torch.func`, ``torch.linalg.solve``, on a flat
  parameterisation written from scratch (it shares no code with the algorithm);
* :func:`estimate_hypergradient` — Algorithm 1 (docs/method.md §3) on the product's own path:
  ``K`` gradient steps at step ``1/L_i`` per task (:func:`mrmeta.lower_level.solve_lower_level`),
  ``N`` steps of conjugate gradient in :func:`mrmeta.lower_level.head_hypergradient`, warm starts
  of ``φ`` and ``v`` kept per task in :class:`WarmStarts`.

:func:`run_algorithm1` iterates ``θ ← θ − λ_θ ĝ`` on full or sampled task batches and records
the exact stationarity measure ``‖∇F(θ_t)‖²``; :func:`exact_gradient_descent` is the reference
trajectory and :func:`replay_errors` measures ``‖ĝ − ∇F‖ / ‖∇F‖`` along a fixed trajectory.
``benchmarks/convergence.py`` uses them to check the convergence claims (docs/method.md §5).
Everything is meant for float64.

Example:
    >>> problem = make_problem("logistic", tasks=4, samples=10, l2=0.1, seed=0)
    >>> theta = initial_theta(problem, seed=1)
    >>> exact = exact_hypergradient(problem, theta)
    >>> memory = WarmStarts.fresh(problem)
    >>> config = Algorithm1Config(inner_steps=500, cg_iters=problem.head_size)
    >>> estimate = estimate_hypergradient(problem, theta, torch.arange(4), config, memory)
    >>> bool(torch.linalg.norm(estimate - exact.grad) < 1e-6 * torch.linalg.norm(exact.grad))
    True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import grad, jacrev, vmap

from mrmeta._tree import TensorDict
from mrmeta._validation import check_finite_number, check_positive_int
from mrmeta.lower_level import (
    LinearHeadProblem,
    head_hypergradient,
    linear_head_lipschitz,
    solve_lower_level,
)

KINDS = {"logistic": "cross_entropy", "ridge": "mse"}


# --------------------------------------------------------------------------- problems
@dataclass(frozen=True)
class SyntheticProblem:
    """A fixed set of ``M`` tasks, each with ``n`` support and ``n`` query samples.

    Attributes:
        support_x: ``(M, n, d_in)`` inputs.
        support_y: ``(M, n)`` int64 labels (logistic) or ``(M, n, c)`` targets (ridge).
        query_x: ``(M, n, d_in)``.
        query_y: like ``support_y``.
        loss: ``"cross_entropy"`` or ``"mse"`` (a :mod:`mrmeta._per_task` loss name).
        out_dim: ``c``, classes or regression outputs.
        features: ``d``, width of the feature map ``tanh(X A)``.
        l2: ``μ > 0``, the strong-convexity coefficient of every lower level.
        outer_l2: ``ρ ≥ 0``, weight decay ``ρ/2 ‖A‖²`` added to every upper level ``f_i``.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    loss: str
    out_dim: int
    features: int
    l2: float
    outer_l2: float = 0.0

    @property
    def num_tasks(self) -> int:
        """``M``."""
        return self.support_x.shape[0]

    @property
    def head_size(self) -> int:
        """``q = c (d + 1)``, parameters of one task's head."""
        return self.out_dim * (self.features + 1)

    @property
    def theta_shape(self) -> tuple[int, int]:
        """``(d_in, d)``, the shape of ``θ = A``."""
        return self.support_x.shape[-1], self.features


def make_problem(
    kind: str = "logistic",
    *,
    tasks: int = 16,
    samples: int = 20,
    inputs: int = 5,
    features: int = 6,
    outputs: int = 3,
    l2: float = 0.02,
    noise: float = 0.3,
    outer_l2: float = 0.0,
    seed: int = 0,
) -> SyntheticProblem:
    """Draw a problem from a teacher: ``X ~ N(0, I)``, ``Z = tanh(X A_T)``, per-task heads
    ``W_i ~ N(0, 4/d)``; labels ``y ~ softmax(Z W_iᵀ)`` (logistic) or targets
    ``y = Z W_iᵀ + noise·ε`` (ridge). All tensors float64.

    Args:
        kind: ``"logistic"`` (multinomial logistic-regression heads) or ``"ridge"``.
        tasks: ``M``.
        samples: ``n``, per support set and per query set.
        inputs: ``d_in``.
        features: ``d``.
        outputs: ``c``, classes or regression outputs.
        l2: ``μ > 0``.
        noise: standard deviation of the ridge targets' noise.
        outer_l2: ``ρ ≥ 0``, weight decay on ``A`` in the upper level.
        seed: seeds a private ``torch.Generator``.

    Returns:
        A :class:`SyntheticProblem`.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
    for name, value in (
        ("tasks", tasks),
        ("samples", samples),
        ("inputs", inputs),
        ("features", features),
        ("outputs", outputs),
    ):
        check_positive_int(name, value)
    check_finite_number("l2", l2, positive=True)
    check_finite_number("outer_l2", outer_l2)
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(inputs, features, generator=gen, dtype=torch.float64) / inputs**0.5
    heads = torch.randn(tasks, outputs, features, generator=gen, dtype=torch.float64)
    heads = heads * (4.0 / features) ** 0.5
    x = torch.randn(tasks, 2 * samples, inputs, generator=gen, dtype=torch.float64)
    logits = torch.bmm(torch.tanh(x @ teacher), heads.transpose(1, 2))
    if kind == "logistic":
        y = torch.multinomial(logits.softmax(-1).flatten(0, 1), 1, generator=gen)
        y = y.view(tasks, 2 * samples)
    else:
        y = logits + noise * torch.randn(logits.shape, generator=gen, dtype=torch.float64)
    return SyntheticProblem(
        x[:, :samples],
        y[:, :samples],
        x[:, samples:],
        y[:, samples:],
        KINDS[kind],
        outputs,
        features,
        float(l2),
        float(outer_l2),
    )


def initial_theta(problem: SyntheticProblem, seed: int = 1) -> Tensor:
    """A random starting point ``A₀ ~ N(0, 1/d_in)``, ``(d_in, d)``, float64."""
    gen = torch.Generator().manual_seed(seed)
    d_in, d = problem.theta_shape
    return torch.randn(d_in, d, generator=gen, dtype=torch.float64) / d_in**0.5


def shared_features(theta: Tensor, x: Tensor) -> Tensor:
    """The shared feature map ``tanh(X A)``: ``(..., n, d_in)`` → ``(..., n, d)``."""
    return torch.tanh(x @ theta)


def zero_heads(problem: SyntheticProblem, tasks: int) -> TensorDict:
    """``φ⁰ = 0`` for ``tasks`` tasks: ``weight (T, c, d)``, ``bias (T, c)``."""
    like = problem.support_x
    return {
        "weight": like.new_zeros(tasks, problem.out_dim, problem.features),
        "bias": like.new_zeros(tasks, problem.out_dim),
    }


def lower_lipschitz(problem: SyntheticProblem, theta: Tensor) -> Tensor:
    """``L_i``, the bound on each lower level's curvature used as ``1/L_i`` step, ``(M,)``."""
    zs = shared_features(theta, problem.support_x)
    return linear_head_lipschitz(zs, problem.loss, problem.out_dim, problem.l2)


# --------------------------------------------------------------------------- exact reference
def _flat_head(phi: Tensor, z: Tensor, out_dim: int) -> Tensor:
    """``Z Wᵀ + b`` for one task with ``φ = [vec(W), b]`` flat, ``(q,)``; ``z (n, d)``."""
    d = z.shape[-1]
    return z @ phi[: out_dim * d].reshape(out_dim, d).T + phi[out_dim * d :]


def _flat_loss(pred: Tensor, target: Tensor, loss: str) -> Tensor:
    """Mean cross-entropy against one-hot ``target`` or mean squared error, from scratch."""
    if loss == "cross_entropy":
        return -(target * torch.log_softmax(pred, -1)).sum(-1).mean()
    return (pred - target).pow(2).mean()


@dataclass(frozen=True)
class _Dense:
    """Per-task losses on flat heads, for :func:`torch.func` (one task; vmap over tasks)."""

    loss: str
    out_dim: int
    l2: float
    outer_l2: float

    def inner(self, theta: Tensor, phi: Tensor, x: Tensor, y: Tensor) -> Tensor:
        pred = _flat_head(phi, torch.tanh(x @ theta), self.out_dim)
        return _flat_loss(pred, y, self.loss) + 0.5 * self.l2 * phi.dot(phi)

    def outer(self, theta: Tensor, phi: Tensor, x: Tensor, y: Tensor) -> Tensor:
        pred = _flat_head(phi, torch.tanh(x @ theta), self.out_dim)
        return _flat_loss(pred, y, self.loss) + 0.5 * self.outer_l2 * theta.pow(2).sum()


def _targets(problem: SyntheticProblem, y: Tensor) -> Tensor:
    """One-hot float targets for cross-entropy; regression targets unchanged."""
    if problem.loss == "cross_entropy":
        return F.one_hot(y, problem.out_dim).to(problem.support_x.dtype)
    return y


def _over_tasks(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``fn(theta, phi, x, y)`` vmapped over tasks (``theta`` shared)."""
    return vmap(fn, in_dims=(None, 0, 0, 0))


def _newton_step(dense: _Dense, theta: Tensor, phi: Tensor, data: tuple[Tensor, Tensor]) -> Tensor:
    """One damped Newton step per task (Armijo backtracking, halving up to 40 times)."""
    value = _over_tasks(dense.inner)
    gradient = _over_tasks(grad(dense.inner, argnums=1))(theta, phi, *data)
    hessian = _over_tasks(jacrev(grad(dense.inner, argnums=1), argnums=1))(theta, phi, *data)
    step = torch.linalg.solve(hessian, gradient)
    decrement = (gradient * step).sum(-1)
    base = value(theta, phi, *data)
    slack = 8 * torch.finfo(phi.dtype).eps * base.abs()
    t = torch.ones_like(base)
    for _ in range(40):
        trial = phi - t[:, None] * step
        ok = value(theta, trial, *data) <= base - 1e-4 * t * decrement + slack
        if bool(ok.all()):
            break
        t = torch.where(ok, t, t / 2)
    return trial


def solve_lower_exact(
    problem: SyntheticProblem,
    theta: Tensor,
    start: Tensor | None = None,
    *,
    tol: float = 1e-13,
    max_iters: int = 60,
) -> tuple[Tensor, float]:
    """``φ_i*(θ)`` for every task by damped Newton on the dense Hessian.

    Args:
        problem: the tasks.
        theta: ``(d_in, d)``.
        start: ``(M, q)`` flat heads to start from (``None``: zeros).
        tol: stop once every ``‖∇_φ g_i‖ ≤ tol``.
        max_iters: at most this many Newton steps.

    Returns:
        ``(φ* (M, q), max_i ‖∇_φ g_i(θ, φ_i*)‖)`` — the residual says how exact it is.
    """
    dense = _Dense(problem.loss, problem.out_dim, problem.l2, problem.outer_l2)
    data = (problem.support_x, _targets(problem, problem.support_y))
    phi = (
        start
        if start is not None
        else problem.support_x.new_zeros(problem.num_tasks, problem.head_size)
    )
    gradient = _over_tasks(grad(dense.inner, argnums=1))
    residual = float(gradient(theta, phi, *data).norm(dim=-1).max())
    for _ in range(max_iters):
        if residual <= tol:
            break
        phi = _newton_step(dense, theta, phi, data)
        residual = float(gradient(theta, phi, *data).norm(dim=-1).max())
    return phi, residual


@dataclass(frozen=True)
class ExactHypergradient:
    """Outcome of :func:`exact_hypergradient`.

    Attributes:
        grad: ``∇F(θ)``, ``(d_in, d)``.
        value: ``F(θ)``, 0-d.
        phi_star: ``(M, q)`` flat lower-level solutions (``[vec(W_i), b_i]``).
        newton_residual: ``max_i ‖∇_φ g_i(θ, φ_i*)‖``.
        hessians: ``(M, q, q)``, ``∇²_φ g_i(θ, φ_i*)``.
    """

    grad: Tensor
    value: Tensor
    phi_star: Tensor
    newton_residual: float
    hessians: Tensor


def exact_hypergradient(
    problem: SyntheticProblem, theta: Tensor, start: Tensor | None = None
) -> ExactHypergradient:
    """``∇F(θ) = (1/M) Σ_i [∇_θ f_i − (∂_θ ∇_φ g_i)ᵀ (∇²_φ g_i)⁻¹ ∇_φ f_i]`` at ``φ_i*(θ)``,
    with dense matrices and ``torch.linalg.solve`` (docs/method.md §2).

    Args:
        problem: the tasks.
        theta: ``(d_in, d)``.
        start: warm start for Newton, ``(M, q)`` (e.g. the previous ``phi_star``).

    Returns:
        An :class:`ExactHypergradient`.
    """
    dense = _Dense(problem.loss, problem.out_dim, problem.l2, problem.outer_l2)
    phi, residual = solve_lower_exact(problem, theta, start)
    support = (problem.support_x, _targets(problem, problem.support_y))
    query = (problem.query_x, _targets(problem, problem.query_y))
    second = jacrev(grad(dense.inner, argnums=1), argnums=(0, 1))
    mixed, hessians = _over_tasks(second)(theta, phi, *support)
    outer_theta, outer_phi = _over_tasks(grad(dense.outer, argnums=(0, 1)))(theta, phi, *query)
    v = torch.linalg.solve(hessians, outer_phi)
    implicit = torch.einsum("mqp,mq->mp", mixed.flatten(2), v).view_as(outer_theta)
    value = _over_tasks(dense.outer)(theta, phi, *query).mean()
    return ExactHypergradient((outer_theta - implicit).mean(0), value, phi, residual, hessians)


# --------------------------------------------------------------------------- Algorithm 1
@dataclass(frozen=True)
class Algorithm1Config:
    """Settings of Algorithm 1's hypergradient estimate.

    Attributes:
        inner_steps: ``K ≥ 1`` gradient steps on each lower level, step ``1/L_i``.
        cg_iters: ``N ≥ 1`` conjugate-gradient steps for ``v``.
        warm_phi: start ``φ⁰`` of task ``i`` from its previous ``φ^K`` (else from 0).
        warm_v: start CG of task ``i`` from its previous ``v`` (else from 0).
    """

    inner_steps: int
    cg_iters: int
    warm_phi: bool = True
    warm_v: bool = True

    def __post_init__(self) -> None:
        check_positive_int("inner_steps", self.inner_steps)
        check_positive_int("cg_iters", self.cg_iters)


@dataclass
class WarmStarts:
    """Per-task memory of Algorithm 1: the last ``φ^K`` and ``v`` of each of the ``M`` tasks.

    Attributes:
        phi: ``weight (M, c, d)``, ``bias (M, c)``.
        v: shaped like ``phi``; zeros until a task is first visited.
    """

    phi: TensorDict
    v: TensorDict = field(default_factory=dict)

    @classmethod
    def fresh(cls, problem: SyntheticProblem) -> WarmStarts:
        """Zero heads and zero ``v`` for every task."""
        return cls(zero_heads(problem, problem.num_tasks), zero_heads(problem, problem.num_tasks))


def estimate_hypergradient(
    problem: SyntheticProblem,
    theta: Tensor,
    tasks: Tensor,
    config: Algorithm1Config,
    memory: WarmStarts,
) -> Tensor:
    """Algorithm 1's ``ĝ = (1/|B|) Σ_{i∈B} [∇_θ f_i − ∇²_{θφ} g_i · v_i]`` at ``φ_i^K``.

    The product's own path: the features ``Z = tanh(XA)`` of the visited tasks, ``K`` gradient
    steps of size ``1/L_i`` from the warm start (or 0) by
    :func:`mrmeta.lower_level.solve_lower_level`, ``v_i`` and the feature gradients by
    :func:`mrmeta.lower_level.head_hypergradient` (``N`` CG steps from the warm start or 0), and
    one backward pass of the feature map into ``A``. ``memory`` is updated in place with the
    new ``φ^K`` and ``v`` of the visited tasks.

    Args:
        problem: the tasks.
        theta: ``(d_in, d)``.
        tasks: ``(|B|,)`` int64 task indices; repeats allowed (sampling with replacement).
        config: ``K``, ``N`` and the warm starts.
        memory: per-task warm starts, updated in place.

    Returns:
        ``ĝ``, ``(d_in, d)``.
    """
    leaf = theta.detach().requires_grad_(True)
    with torch.enable_grad():
        zs = shared_features(leaf, problem.support_x[tasks])
        zq = shared_features(leaf, problem.query_x[tasks])
    zero = zero_heads(problem, len(tasks))
    lower = LinearHeadProblem(zs.detach(), problem.support_y[tasks], zero, problem.l2, problem.loss)
    start = {k: v[tasks] for k, v in memory.phi.items()} if config.warm_phi else zero
    phi, _ = solve_lower_level(
        lower, start, solver="gd", max_iters=config.inner_steps, tol=0.0, lr="auto"
    )
    v0 = {k: v[tasks] for k, v in memory.v.items()} if config.warm_v else None
    result = head_hypergradient(
        lower, phi, zq.detach(), problem.query_y[tasks], cg_iters=config.cg_iters, v0=v0
    )
    (grad,) = torch.autograd.grad([zs, zq], [leaf], [result.support, result.query])
    for key in memory.phi:
        memory.phi[key][tasks] = phi[key]
        memory.v[key][tasks] = result.v[key]
    return grad / len(tasks) + problem.outer_l2 * theta.detach()


@dataclass
class Trace:
    """What :func:`run_algorithm1` records at the iterations it evaluates.

    Attributes:
        iterations: the ``t`` of each record (``θ_t`` is the iterate before step ``t``).
        grad_norm_sq: exact ``‖∇F(θ_t)‖²``.
        value: exact ``F(θ_t)``.
        estimate_error: ``‖ĝ_t − ∇F(θ_t)‖ / ‖∇F(θ_t)‖``.
    """

    iterations: list[int] = field(default_factory=list)
    grad_norm_sq: list[float] = field(default_factory=list)
    value: list[float] = field(default_factory=list)
    estimate_error: list[float] = field(default_factory=list)


def _record(trace: Trace, t: int, exact: ExactHypergradient, estimate: Tensor) -> None:
    """Append the exact measures at iteration ``t``."""
    norm = torch.linalg.norm(exact.grad)
    trace.iterations.append(t)
    trace.grad_norm_sq.append(float(norm**2))
    trace.value.append(float(exact.value))
    trace.estimate_error.append(float(torch.linalg.norm(estimate - exact.grad) / norm))


def run_algorithm1(
    problem: SyntheticProblem,
    config: Algorithm1Config,
    theta0: Tensor,
    *,
    iterations: int,
    outer_lr: float,
    batch_size: int | None = None,
    seed: int = 0,
    record: Callable[[int], bool] = lambda t: True,
) -> Trace:
    """Run Algorithm 1 with plain SGD ``θ_{t+1} = θ_t − λ_θ ĝ_t`` and record exact measures.

    Args:
        problem: the tasks.
        config: ``K``, ``N``, warm starts.
        theta0: ``θ_0``, ``(d_in, d)``.
        iterations: ``T``.
        outer_lr: ``λ_θ`` (constant).
        batch_size: ``|B|`` tasks drawn uniformly with replacement each iteration (``None``:
            every task every iteration — the deterministic case).
        seed: seeds the task sampler.
        record: which ``t`` to evaluate ``∇F(θ_t)`` exactly at (each costs dense solves).

    Returns:
        A :class:`Trace`.
    """
    gen = torch.Generator().manual_seed(seed)
    memory, trace = WarmStarts.fresh(problem), Trace()
    theta, phi_star = theta0.detach().clone(), None
    everyone = torch.arange(problem.num_tasks)
    for t in range(iterations):
        tasks = (
            everyone
            if batch_size is None
            else torch.randint(problem.num_tasks, (batch_size,), generator=gen)
        )
        estimate = estimate_hypergradient(problem, theta, tasks, config, memory)
        if record(t):
            exact = exact_hypergradient(problem, theta, phi_star)
            phi_star = exact.phi_star
            _record(trace, t, exact, estimate)
        theta = theta - outer_lr * estimate
    return trace


def exact_gradient_descent(
    problem: SyntheticProblem, theta0: Tensor, *, iterations: int, lr: float
) -> tuple[list[Tensor], list[Tensor]]:
    """The reference trajectory ``θ_{t+1} = θ_t − λ ∇F(θ_t)`` with the exact hypergradient.

    Args:
        problem: the tasks.
        theta0: ``θ_0``, ``(d_in, d)``.
        iterations: ``T``.
        lr: ``λ``.

    Returns:
        ``([θ_0 … θ_{T-1}], [∇F(θ_0) … ∇F(θ_{T-1})])``.
    """
    theta, start = theta0.detach().clone(), None
    thetas, grads = [], []
    for _ in range(iterations):
        exact = exact_hypergradient(problem, theta, start)
        start = exact.phi_star
        thetas.append(theta)
        grads.append(exact.grad)
        theta = theta - lr * exact.grad
    return thetas, grads


def replay_errors(
    problem: SyntheticProblem,
    thetas: list[Tensor],
    exact_grads: list[Tensor],
    config: Algorithm1Config,
) -> Tensor:
    """``‖ĝ_t − ∇F(θ_t)‖ / ‖∇F(θ_t)‖`` along a fixed trajectory, all tasks every step.

    The warm starts evolve along ``thetas`` exactly as they would in a run that visited these
    iterates, so settings (``K``, ``N``, warm or cold) are compared on the same points.

    Args:
        problem: the tasks.
        thetas: ``θ_0 … θ_{T-1}``.
        exact_grads: ``∇F(θ_t)`` for each.
        config: ``K``, ``N``, warm starts.

    Returns:
        ``(T,)`` relative errors.
    """
    memory = WarmStarts.fresh(problem)
    everyone = torch.arange(problem.num_tasks)
    errors = []
    for theta, exact in zip(thetas, exact_grads, strict=True):
        estimate = estimate_hypergradient(problem, theta, everyone, config, memory)
        errors.append(torch.linalg.norm(estimate - exact) / torch.linalg.norm(exact))
    return torch.stack(errors)
