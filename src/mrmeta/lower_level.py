r"""The lower level of the head-only methods: the head problem, its derivatives and its solvers.

For task ``t`` of a chunk with support features ``Z (n, d)``, support labels ``y``, head
parameters ``φ``, a centre ``c`` and ``μ ≥ 0``::

    g_t(φ) = L(head_φ(Z), y) + μ/2 ‖φ − c‖²        (lower level, strongly convex when μ > 0)
    f_t(φ) = L(head_φ(Z_q), y_q)                    (upper level)

with ``L`` the mean cross-entropy or the mean squared error. A :class:`HeadProblem` holds the
support side of a chunk of ``T`` tasks and answers every question the methods ask of it:

* :meth:`~HeadProblem.objective` ``g_t(φ_t)`` and :meth:`~HeadProblem.gradient` ``∇_φ g_t``;
* :meth:`~HeadProblem.curvature` at a point, a :class:`Curvature` with ``∇²_φ g · v``
  (``hvp``), the mixed product ``∂/∂(Z, c) ⟨∇_φ g, v⟩`` (``mixed_vjp``) and a solve with
  ``∇²_φ g`` (``solve``);
* :meth:`~HeadProblem.outer_gradient` ``(∇_{Z_q} f_t, ∇_φ f_t)``.

Two implementations, chosen by :func:`head_problem`: :class:`LinearHeadProblem` (an
``nn.Linear`` head with a bias: closed forms, a handful of batched matrix products; Newton runs
on its :attr:`~LinearHeadProblem.folded` form, the bias folded into the weights) and
:class:`AutogradHeadProblem` (any head, by autograd through ``torch.func``).

Solvers of the lower level, chosen by :func:`solve_lower_level`: :func:`newton_solve` (exact
Newton directions with a backtracking line search, stopping on ``‖∇_φ g‖ ≤ tol``; the default)
and :func:`mrmeta.inner.gradient_steps` (``K`` plain steps, the paper's configuration). Both
report what they did in a :class:`SolveReport`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mrmeta._per_task import batched_head_forward, check_loss_name, task_losses
from mrmeta._tree import (
    TensorDict,
    tree_axpy,
    tree_dot,
    tree_norm,
    tree_sub,
    tree_where,
    tree_zeros_like,
)
from mrmeta._validation import check_finite_number, check_positive_int
from mrmeta.implicit import CGResult, conjugate_gradient
from mrmeta.inner import gradient_steps

SOLVERS = ("newton", "gd")
CG_CAP = 100  # Newton-CG's iterations per direction for heads without closed forms
SMALL_SYSTEM = 128  # logits (n·C) up to which a Newton system is solved in the logit space:
# measured on one CPU thread, the logit-space solve is faster at 125 logits (5-way 5-shot), the
# class-block solve at 144 (12-way 1-shot) (benchmarks/results/class_block_solve.md)
# Newton's start is chosen among α = 0 and α = 2^(k/2) for these k on the ray through the
# squared-loss solution (LinearHeadProblem.newton_start): steps of √2 from 1/64 to 1024, wide
# enough for the scales measured on Omniglot (α ≈ 3–18) with room on both sides.
RAY_GRID_EXPONENTS = tuple(range(-12, 21))
Solver = Literal["newton", "gd"]


# --------------------------------------------------------------------------- small blocks
def l2_penalty(params: Mapping[str, Tensor], center: Mapping[str, Tensor], l2: float) -> Tensor:
    """``μ/2 · ‖φ_t − c_t‖²`` per task, ``(T,)``."""
    total = sum((params[k] - center[k]).pow(2).reshape(len(params[k]), -1).sum(1) for k in params)
    return 0.5 * l2 * total


def linear_head_lipschitz(features: Tensor, loss: str, out_dim: int, l2: float) -> Tensor:
    """Upper bound ``L_t`` on the curvature of each task's lower level for a linear head.

    With ``A = [Z, 1]`` (``n × (d+1)``) the Hessian of the mean loss in ``(W, b)`` is bounded by
    ``c · ‖A‖₂² / n``, ``c = ½`` for softmax cross-entropy (``diag p − ppᵀ ⪯ ½ I``) and
    ``c = 2 / out_dim`` for the mean squared error; the L2 term adds ``μ``. Gradient descent with
    step ``1/L_t`` converges.

    Args:
        features: ``(T, n, d)`` support features (detached).
        loss: ``"cross_entropy"`` or ``"mse"``.
        out_dim: head outputs ``C``.
        l2: ``μ``.

    Returns:
        ``(T,)``.
    """
    spectral_sq = torch.linalg.matrix_norm(_with_ones(features), ord=2).pow(2)
    c = 0.5 if loss == "cross_entropy" else 2.0 / out_dim
    return c * spectral_sq / features.shape[1] + l2


def head_objective(
    head: nn.Module,
    phi: Mapping[str, Tensor],
    features: Tensor,
    labels: Tensor,
    center: Mapping[str, Tensor],
    l2: float,
    loss: str,
) -> Tensor:
    """``g_t(φ_t) = L(head_φ(Z), y) + μ/2 ‖φ − c‖²`` per task, ``(T,)``, in the graph of
    ``features (T, n, d)`` and ``phi`` (the autograd problem and the unrolled methods)."""
    value = task_losses(batched_head_forward(head, dict(phi), features), labels, loss)
    return value + l2_penalty(phi, center, l2) if l2 > 0 else value


def _with_ones(features: Tensor) -> Tensor:
    """``Z̃ = [Z, 1]``: ``(T, n, d)`` → ``(T, n, d + 1)``."""
    ones = torch.ones(*features.shape[:-1], 1, dtype=features.dtype, device=features.device)
    return torch.cat([features, ones], dim=-1)


def check_inner_lr(inner_lr: object, head: nn.Module) -> float | str:
    """``"auto"`` (linear heads only) or a finite positive number."""
    if inner_lr == "auto":
        if not isinstance(head, nn.Linear):
            raise ValueError(
                "inner_lr='auto' needs an nn.Linear head (its curvature bound is known); "
                f"got {type(head).__name__}: pass a number for inner_lr"
            )
        return "auto"
    return check_finite_number("inner_lr", inner_lr, positive=True)


def check_solver(solver: object, l2: float) -> Solver:
    """``solver`` if it is ``"newton"`` or ``"gd"``; Newton needs ``μ > 0``."""
    if solver not in SOLVERS:
        raise ValueError(f"inner_solver must be one of {', '.join(SOLVERS)}; got {solver!r}")
    if solver == "newton" and l2 <= 0:
        raise ValueError(
            "inner_solver='newton' needs a strongly convex lower level: set l2 > 0 "
            "(e.g. 0.01), or use inner_solver='gd'"
        )
    return solver  # type: ignore[return-value]


# --------------------------------------------------------------------------- the losses
class _LogitLoss(ABC):
    """A task loss ``L(U, y)`` of the logits ``U (T, n, C)``: its value and derivatives in ``U``.

    ``state`` is what the second derivative needs at ``U`` (the softmax for cross-entropy)."""

    @abstractmethod
    def value(self, logits: Tensor, labels: Tensor) -> Tensor:
        """``L`` per task, ``(T,)``."""

    @abstractmethod
    def state(self, logits: Tensor) -> Tensor:
        """What :meth:`hvp` and :meth:`hessian_parts` need at ``U``."""

    @abstractmethod
    def residual(self, state: Tensor, labels: Tensor) -> Tensor:
        """``R = ∂L/∂U``, ``(T, n, C)``."""

    @abstractmethod
    def hvp(self, state: Tensor, direction: Tensor) -> Tensor:
        """``∂²L/∂U² · D`` for ``D (T, n, C)``."""

    @abstractmethod
    def hessian_parts(self, state: Tensor) -> tuple[Tensor, Tensor | None]:
        """The Hessian in ``U``, block-diagonal over examples: a diagonal, or a diagonal
        scaling of a projector,
        ``S_j = diag(√s_j) (I − w_j w_jᵀ) diag(√s_j)`` with ``‖w_j‖ = 1``. Returns
        ``s (T, n, C)`` and ``w (T, n, C)``, or ``None`` where ``S_j = diag(s_j)``.

        The unit ``w_j`` is what lets the class-block solve form its capacitance without a
        difference of nearly equal terms (:func:`_class_block_solve`)."""


class _CrossEntropy(_LogitLoss):
    r"""Mean softmax cross-entropy: ``R = (P − Y)/n``, ``∂²L/∂U² · D = P ⊙ (D − ⟨P, D⟩)/n``,
    ``S_j = (diag p_j − p_j p_jᵀ)/n``: ``s_j = p_j/n``, ``w_j = √p_j`` (unit: ``Σ_a p_ja = 1``)."""

    def value(self, logits: Tensor, labels: Tensor) -> Tensor:
        return task_losses(logits, labels, "cross_entropy")

    def state(self, logits: Tensor) -> Tensor:
        return logits.softmax(-1)

    def residual(self, state: Tensor, labels: Tensor) -> Tensor:
        onehot = F.one_hot(labels.long(), state.shape[-1]).to(state.dtype)
        return (state - onehot) / state.shape[1]

    def hvp(self, state: Tensor, direction: Tensor) -> Tensor:
        centred = direction - (state * direction).sum(-1, keepdim=True)
        return state * centred / state.shape[1]

    def hessian_parts(self, state: Tensor) -> tuple[Tensor, Tensor | None]:
        return state / state.shape[1], state.sqrt()


class _SquaredError(_LogitLoss):
    r"""Mean squared error over the ``n·C`` entries: ``R = 2(U − Y)/(nC)``,
    ``∂²L/∂U² · D = 2D/(nC)``, ``S_j = 2I/(nC)``: ``s_j = 2/(nC)``, no projector."""

    def value(self, logits: Tensor, labels: Tensor) -> Tensor:
        return task_losses(logits, labels, "mse")

    def state(self, logits: Tensor) -> Tensor:
        return logits

    def residual(self, state: Tensor, labels: Tensor) -> Tensor:
        return 2.0 * (state - labels) / (state.shape[1] * state.shape[2])

    def hvp(self, state: Tensor, direction: Tensor) -> Tensor:
        return 2.0 * direction / (state.shape[1] * state.shape[2])

    def hessian_parts(self, state: Tensor) -> tuple[Tensor, Tensor | None]:
        return torch.full_like(state, 2.0 / (state.shape[1] * state.shape[2])), None


_LOGIT_LOSSES: dict[str, _LogitLoss] = {"cross_entropy": _CrossEntropy(), "mse": _SquaredError()}


# --------------------------------------------------------------------------- the problems
class Curvature(ABC):
    """The second-order information of a :class:`HeadProblem` at one point ``φ``."""

    @abstractmethod
    def hvp(self, v: Mapping[str, Tensor]) -> TensorDict:
        """``∇²_φ g_t · v_t`` for every task, shaped like ``v``."""

    @abstractmethod
    def mixed_vjp(self, v: Mapping[str, Tensor]) -> tuple[Tensor, TensorDict]:
        """``(∂/∂Z ⟨∇_φ g_t, v_t⟩, ∂/∂c ⟨∇_φ g_t, v_t⟩)``: ``(T, n, d)`` and shaped like ``c``."""

    @abstractmethod
    def solve(self, rhs: Mapping[str, Tensor]) -> TensorDict:
        """``[∇²_φ g_t]⁻¹ rhs_t`` for every task (exact for linear heads, CG otherwise)."""


class HeadProblem(ABC):
    """The lower level of a chunk of ``T`` tasks (see the module docstring).

    Args:
        features: ``(T, n, d)`` support features, detached.
        labels: ``(T, n)`` class indices, or ``(T, n, C)`` regression targets.
        center: ``c``, shaped like ``φ`` (``(T, *param_shape)`` per name).
        l2: ``μ ≥ 0``.
        loss: ``"cross_entropy"`` or ``"mse"``.
    """

    exact_solve: bool = False
    """Whether :meth:`Curvature.solve` is exact (a closed form) rather than iterative; then
    :meth:`exact_inverse` applies it in float64."""

    def __init__(
        self,
        features: Tensor,
        labels: Tensor,
        center: Mapping[str, Tensor],
        l2: float,
        loss: str,
    ) -> None:
        self.features, self.labels = features, labels
        self.center, self.l2, self.loss = dict(center), float(l2), check_loss_name(loss)

    @property
    def num_tasks(self) -> int:
        return self.features.shape[0]

    @abstractmethod
    def objective(self, phi: Mapping[str, Tensor]) -> Tensor:
        """``g_t(φ_t)`` per task, ``(T,)``."""

    @abstractmethod
    def gradient(self, phi: Mapping[str, Tensor]) -> TensorDict:
        """``∇_φ g_t(φ_t)`` per task, shaped like ``phi``."""

    @abstractmethod
    def curvature(self, phi: Mapping[str, Tensor]) -> Curvature:
        """Second-order information at ``φ``."""

    @abstractmethod
    def outer_gradient(
        self, phi: Mapping[str, Tensor], query: Tensor, query_labels: Tensor
    ) -> tuple[Tensor, TensorDict]:
        """For ``f_t = L(head_φ(Z_q), y_q)``: ``(∇_{Z_q} f_t (T, m, d), ∇_φ f_t)``."""

    @abstractmethod
    def step_size(self) -> Tensor:
        """``1/L_t`` per task ``(T,)`` from a curvature bound (linear heads only)."""

    def gradient_and_curvature(
        self, phi: Mapping[str, Tensor]
    ) -> tuple[TensorDict, Callable[[], Curvature]]:
        """:meth:`gradient` at ``φ``, and :meth:`curvature` at ``φ`` when called (a problem may
        share work between the two; nothing is built for a curvature that is not asked for)."""
        return self.gradient(phi), lambda: self.curvature(phi)

    def exact_inverse(self, phi: Mapping[str, Tensor], rhs: Mapping[str, Tensor]) -> TensorDict:
        """``[∇²_φ g_t(φ_t)]⁻¹ rhs_t`` exactly (problems with :attr:`exact_solve` only)."""
        raise TypeError(f"{type(self).__name__} has no exact solve; use conjugate gradient")

    def penalty_gradient(self, phi: Mapping[str, Tensor]) -> TensorDict:
        """``μ (φ − c)``, the L2 term's gradient."""
        return {k: self.l2 * (phi[k] - self.center[k]) for k in phi}

    def newton_start(self, phi0: Mapping[str, Tensor]) -> TensorDict:
        """Where :func:`newton_solve` starts when asked to start at ``φ⁰``: a point with
        ``g_t ≤ g_t(φ⁰)`` for every task; ``φ⁰`` itself unless the problem knows a better one
        (a linear head: :meth:`LinearHeadProblem.newton_start`)."""
        return {k: t.detach() for k, t in phi0.items()}


class LinearHeadProblem(HeadProblem):
    r"""Closed forms for a linear head ``U = Z Wᵀ + b`` (``W (C, d)``, ``b (C,)``), or
    ``U = Z Wᵀ`` when the centre has no ``"bias"`` (:meth:`folded`).

    With ``R = ∂L/∂U``, the per-example Hessian blocks ``S_j`` of ``L`` in ``U``,
    ``D = Z V_Wᵀ + V_b`` the logits' direction along ``v``::

        ∇_W g = Rᵀ Z + μ (W − c_W),     ∇_b g = Σ_j R_j + μ (b − c_b)
        ∇²_φ g · v = (Ĥ(D)ᵀ Z + μ V_W,  Σ_j Ĥ(D)_j + μ V_b),   Ĥ(D)_j = S_j D_j
        ∂/∂Z ⟨∇_φ g, v⟩ = R V_W + Ĥ(D) W,     ∂/∂c ⟨∇_φ g, v⟩ = −μ v

    ``∇²_φ g = Jᵀ S J + μ I`` with ``J`` the map from ``Θ = [W, b]`` to the logits: μI plus a term
    of rank ≤ n·C. :meth:`Curvature.solve` uses that (see :class:`_LinearCurvature`).
    """

    exact_solve = True

    def __init__(
        self,
        features: Tensor,
        labels: Tensor,
        center: Mapping[str, Tensor],
        l2: float,
        loss: str,
    ) -> None:
        super().__init__(features, labels, center, l2, loss)
        self.logit_loss = _LOGIT_LOSSES[self.loss]
        self.bias = "bias" in self.center

    @cached_property
    def folded(self) -> LinearHeadProblem:
        r"""The same problem in float64 with the bias folded into the weights: features
        ``Z̃ = [Z, 1]`` and one parameter ``Θ = [W, b]`` (``{"weight": Θ}``, centre ``Θ_c``).
        ``Z̃ Θᵀ = Z Wᵀ + b`` and ``‖Θ − Θ_c‖² = ‖W − c_W‖² + ‖b − c_b‖²``, so ``g`` is unchanged;
        with one tensor instead of two, every step of :func:`newton_solve` costs fewer operations.
        Map points with :func:`_stack_head` and :func:`_split_head`. Computed once per problem
        (the solve and the exact ``v`` share it)."""
        wide = torch.float64
        center = {"weight": _stack_head(self.center).detach().to(wide)}
        features, labels = self.augmented.to(wide), _wide_labels(self.labels)
        return LinearHeadProblem(features, labels, center, self.l2, self.loss)

    def objective(self, phi: Mapping[str, Tensor]) -> Tensor:
        value = self.logit_loss.value(linear_logits(self.features, phi), self.labels)
        return value + l2_penalty(phi, self.center, self.l2) if self.l2 > 0 else value

    def gradient(self, phi: Mapping[str, Tensor]) -> TensorDict:
        return self._gradient_at(phi, self._state(phi))

    def _state(self, phi: Mapping[str, Tensor]) -> Tensor:
        """The loss's state at the support logits of ``φ`` (the softmax for cross-entropy)."""
        return self.logit_loss.state(linear_logits(self.features, phi))

    def _gradient_at(self, phi: Mapping[str, Tensor], state: Tensor) -> TensorDict:
        residual = self.logit_loss.residual(state, self.labels)
        grad = pull_back(self.features, residual, bias=self.bias)
        if self.l2 > 0:
            grad = tree_axpy(1.0, self.penalty_gradient(phi), grad)
        return grad

    def curvature(self, phi: Mapping[str, Tensor]) -> _LinearCurvature:
        return _LinearCurvature(self, dict(phi), self._state(phi))

    def exact_inverse(self, phi: Mapping[str, Tensor], rhs: Mapping[str, Tensor]) -> TensorDict:
        """``[∇²_φ g_t(φ_t)]⁻¹ rhs_t``, exactly, in float64 on :attr:`folded` (see
        :class:`_LinearCurvature`); the result in ``rhs``'s precision."""
        curvature = self.folded.curvature({"weight": _stack_head(_cast(phi, torch.float64))})
        stacked = curvature.solve({"weight": _stack_head(_cast(rhs, torch.float64))})["weight"]
        return _cast(_split_head(stacked, bias=self.bias), rhs["weight"].dtype)

    def gradient_and_curvature(
        self, phi: Mapping[str, Tensor]
    ) -> tuple[TensorDict, Callable[[], _LinearCurvature]]:
        """Both from one evaluation of the loss's state at the support logits."""
        phi = dict(phi)
        state = self._state(phi)
        return self._gradient_at(phi, state), lambda: _LinearCurvature(self, phi, state)

    def outer_gradient(
        self, phi: Mapping[str, Tensor], query: Tensor, query_labels: Tensor
    ) -> tuple[Tensor, TensorDict]:
        state = self.logit_loss.state(linear_logits(query, phi))
        residual = self.logit_loss.residual(state, query_labels)
        return torch.bmm(residual, phi["weight"]), pull_back(query, residual, bias=self.bias)

    @cached_property
    def augmented(self) -> Tensor:
        """``Z̃ = [Z, 1] (T, n, d + 1)`` (``Z`` itself without a bias), computed once."""
        return _with_ones(self.features) if self.bias else self.features

    @cached_property
    def gram(self) -> Tensor:
        """``G̃ = Z̃ Z̃ᵀ (T, n, n)`` in the features' precision, computed once."""
        return torch.bmm(self.augmented, self.augmented.transpose(1, 2))

    def step_size(self) -> Tensor:
        if not self.bias:
            raise ValueError("step_size is for a head with a bias (see LinearHeadProblem.folded)")
        out_dim = self.center["weight"].shape[1]
        return 1.0 / linear_head_lipschitz(self.features, self.loss, out_dim, self.l2)

    def squared_loss_solution(self) -> TensorDict:
        r"""The minimiser ``Θ_sq`` of the same problem with the squared loss on targets ``Ỹ``
        (ridge regression on ``Θ = [W, b]`` with centre ``Θ_c = [c_W, c_b]``)::

            (1/(nC)) ‖Z̃ Θᵀ − Ỹ‖² + μ/2 ‖Θ − Θ_c‖²,     λ = nCμ/2,
            Θ_sq = Θ_c + Rᵀ (G̃ + λI)⁻¹ Z̃ = Θ_c + Rᵀ Z̃ (Z̃ᵀ Z̃ + λI)⁻¹,    R = Ỹ − Z̃ Θ_cᵀ

        (set the gradient ``(2/(nC)) (Z̃ Θᵀ − Ỹ)ᵀ Z̃ + μ (Θ − Θ_c)`` to zero; the two forms are
        equal by the push-through identity), solved by Cholesky in whichever of the ``n`` and
        ``d+1`` spaces is smaller. ``Ỹ`` is the targets for the squared loss (``Θ_sq`` is then
        the problem's exact minimiser ``φ*``) and the centred one-hot labels ``onehot(y) − 1/C``
        for cross-entropy.

        Returns:
            ``Θ_sq`` shaped like the centre: ``(T, C, d)`` and ``(T, C)`` (``(T, C, d)`` alone
            without a bias); NaN for a task whose system could not be factored (non-finite
            features).

        Raises:
            ValueError: without an L2 term (``μ = 0``) the ridge problem has no unique solution.
        """
        if self.l2 <= 0:
            raise ValueError("squared_loss_solution needs l2 > 0 (a strongly convex problem)")
        features = self.augmented  # Z̃ (T, n, d+1)
        center = _stack_head(self.center)  # Θ_c (T, C, d+1)
        (n, d1), classes = features.shape[1:], center.shape[1]
        if self.loss == "mse":
            targets = self.labels.to(features.dtype)
        else:
            onehot = F.one_hot(self.labels.long(), classes).to(features.dtype)
            targets = onehot - 1.0 / classes
        residual = targets - torch.bmm(features, center.transpose(1, 2))  # R (T, n, C)
        ridge = n * classes * self.l2 / 2
        if n <= d1:
            gram = self.gram.clone()  # G̃ (T, n, n), shared with the Newton solves
            gram.diagonal(dim1=-2, dim2=-1).add_(ridge)
            factor, failed = torch.linalg.cholesky_ex(gram)
            coefficients = torch.cholesky_solve(residual, factor)
            step = torch.bmm(coefficients.transpose(1, 2), features)
        else:
            gram = torch.bmm(features.transpose(1, 2), features)  # Z̃ᵀ Z̃ (T, d+1, d+1)
            gram.diagonal(dim1=-2, dim2=-1).add_(ridge)
            pulled = torch.bmm(features.transpose(1, 2), residual)  # Z̃ᵀ R (T, d+1, C)
            factor, failed = torch.linalg.cholesky_ex(gram)
            step = torch.cholesky_solve(pulled, factor).transpose(1, 2)
        step = torch.where((failed != 0).view(-1, 1, 1), torch.nan, step)
        return _split_head(center + step, bias=self.bias)

    def newton_start(self, phi0: Mapping[str, Tensor]) -> TensorDict:
        r"""The best point of a grid on the ray from ``φ⁰`` through the squared-loss solution
        ``Θ_sq`` (:meth:`squared_loss_solution`), per task::

            φ(α) = φ⁰ + α (Θ_sq − φ⁰),    α ∈ A = {0} ∪ {2^(k/2) : k ∈ RAY_GRID_EXPONENTS}

        Along the ray the logits are ``U(α) = U⁰ + α (U_sq − U⁰)`` and the L2 term is the
        quadratic ``μ/2 (‖o‖² + 2α ⟨o, t⟩ + α² ‖t‖²)`` with ``o = φ⁰ − c``, ``t = Θ_sq − φ⁰``,
        so all ``|A| = 34`` values of ``g_t`` cost one loss evaluation on ``34·T`` tasks.
        ``α = 0`` keeps ``φ⁰`` where nothing on the ray is lower (up to rounding,
        ``g_t(φ(α)) ≤ g_t(φ⁰)``), and also where ``Θ_sq`` or a value on the ray is not finite.
        For the squared loss ``α = 1`` is ``φ*``; the cross-entropy minimiser points roughly
        the same way as ``Θ_sq`` at a larger scale, which the grid finds (measured in
        benchmarks/results/newton_start_*.md: about half the Newton iterations at 20-way 1-shot).

        Args:
            phi0: the given start, ``(T, *param_shape)`` per name.

        Returns:
            ``φ(α_t)`` per task, shaped like ``phi0``; ``φ⁰`` itself when ``μ = 0``.
        """
        phi0 = {k: t.detach() for k, t in phi0.items()}
        if self.l2 <= 0:
            return phi0
        toward = tree_sub(self.squared_loss_solution(), phi0)  # t (T, *param_shape)
        finite = torch.stack([t.flatten(1).isfinite().all(1) for t in toward.values()]).all(0)
        toward = tree_where(finite, toward, tree_zeros_like(toward), batched=True)
        exponents = torch.tensor(RAY_GRID_EXPONENTS, dtype=self.features.dtype)
        alphas = torch.cat([exponents.new_zeros(1), torch.exp2(exponents / 2)])
        alphas = alphas.to(self.features.device)  # A (|A|,)
        start_logits = linear_logits(self.features, phi0)  # U⁰ (T, n, C)
        logits_step = linear_logits(self.features, toward)  # U_sq − U⁰ (linear in the step)
        grid = alphas.view(-1, 1, 1, 1) * logits_step + start_logits  # (|A|, T, n, C)
        labels = self.labels.expand(len(alphas), *self.labels.shape).flatten(0, 1)
        loss = self.logit_loss.value(grid.flatten(0, 1), labels).view(len(alphas), -1)
        offset = tree_sub(phi0, self.center)
        offset_sq = tree_dot(offset, offset, batched=True)
        cross = tree_dot(offset, toward, batched=True)
        toward_sq = tree_dot(toward, toward, batched=True)
        column = alphas.view(-1, 1)
        penalty = 0.5 * self.l2 * (offset_sq + 2 * column * cross + column**2 * toward_sq)
        values = (loss + penalty).nan_to_num(nan=torch.inf)  # (|A|, T)
        best = alphas[values.argmin(0)]  # (T,): the first minimum, so ties keep α = 0
        return tree_axpy(best, toward, phi0, batched=True)


def _stack_head(phi: Mapping[str, Tensor]) -> Tensor:
    """``Θ = [W, b]``: ``(T, C, d)`` and ``(T, C)`` → ``(T, C, d + 1)``; ``W`` without a bias."""
    if "bias" not in phi:
        return phi["weight"]
    return torch.cat([phi["weight"], phi["bias"].unsqueeze(-1)], -1)


def _split_head(stacked: Tensor, *, bias: bool = True) -> TensorDict:
    """The inverse of :func:`_stack_head` (``bias``: whether the head has one)."""
    if not bias:
        return {"weight": stacked}
    return {"weight": stacked[..., :-1], "bias": stacked[..., -1]}


def linear_logits(features: Tensor, phi: Mapping[str, Tensor]) -> Tensor:
    """``Z Wᵀ + b`` (``Z Wᵀ`` without a bias): ``(T, n, d)`` → ``(T, n, C)`` (linear in ``φ``:
    also ``D`` along ``v``)."""
    if "bias" not in phi:
        return torch.bmm(features, phi["weight"].transpose(1, 2))
    return torch.baddbmm(phi["bias"].unsqueeze(1), features, phi["weight"].transpose(1, 2))


def pull_back(features: Tensor, logit_grad: Tensor, *, bias: bool = True) -> TensorDict:
    """``(Gᵀ Z, Σ_j G_j)``: a gradient ``G (T, n, C)`` in the logits carried to ``(W, b)``
    (to ``W`` alone without a bias)."""
    weight = torch.bmm(logit_grad.transpose(1, 2), features)
    return {"weight": weight, "bias": logit_grad.sum(1)} if bias else {"weight": weight}


@dataclass(frozen=True)
class _LinearCurvature(Curvature):
    r"""Curvature of a :class:`LinearHeadProblem` at ``φ``; ``state`` is the loss's state at the
    support logits (the softmax for cross-entropy).

    :meth:`solve` applies ``H⁻¹ = (Jᵀ S J + μ I)⁻¹`` exactly, in float64, with ``J`` the map
    from ``Θ = [W, b]`` to the logits, ``Z̃ = [Z, 1] (n, m)``, ``m = d + 1`` (without a bias:
    ``Θ = W``, ``Z̃ = Z``, ``m = d``), ``G̃ = Z̃ Z̃ᵀ`` and
    the per-example blocks ``S_j = diag(√s_j) (I − w_j w_jᵀ) diag(√s_j)``
    (:meth:`_LogitLoss.hessian_parts`).
    Up to ``SMALL_SYSTEM`` logits (``n·C``) it solves one system in the logit space
    (:func:`_logit_space_solve`; 25 unknowns at 5-way 1-shot); beyond, it uses the class-block
    structure of ``H`` (:func:`_class_block_solve`: ``C`` systems of size ``min(n, m)`` and one
    of size ``n``, instead of one of size ``n·C = 400`` at 20-way 1-shot). The eigenvalues of
    ``H`` are ``≥ μ``.
    """

    problem: LinearHeadProblem
    phi: TensorDict
    state: Tensor

    def _logit_hvp(self, v: Mapping[str, Tensor]) -> Tensor:
        return self.problem.logit_loss.hvp(self.state, linear_logits(self.problem.features, v))

    def hvp(self, v: Mapping[str, Tensor]) -> TensorDict:
        out = pull_back(self.problem.features, self._logit_hvp(v), bias=self.problem.bias)
        return tree_axpy(self.problem.l2, v, out) if self.problem.l2 > 0 else out

    def mixed_vjp(self, v: Mapping[str, Tensor]) -> tuple[Tensor, TensorDict]:
        residual = self.problem.logit_loss.residual(self.state, self.problem.labels)
        wrt_features = torch.bmm(residual, v["weight"]) + torch.bmm(
            self._logit_hvp(v), self.phi["weight"]
        )
        return wrt_features, {k: -self.problem.l2 * t for k, t in v.items()}

    def solve(self, rhs: Mapping[str, Tensor]) -> TensorDict:
        """Exact, in float64 (see the class docstring), the loss's state included (a float32
        softmax sums to 1 only to about 1e-7); the result in ``rhs``'s precision."""
        wide = torch.float64
        features = self.problem.augmented.to(wide)
        gram = self.problem.gram  # computed once per problem; the Newton solves are in float64
        gram = gram if gram.dtype == wide else torch.bmm(features, features.mT)
        state = self.state
        if state.dtype != wide:
            logits = linear_logits(self.problem.features.to(wide), _cast(self.phi, wide))
            state = self.problem.logit_loss.state(logits)
        diag, unit = self.problem.logit_loss.hessian_parts(state)
        stacked = _stack_head(rhs).to(wide)
        n, c = diag.shape[1:]
        solver = _logit_space_solve if n * c <= SMALL_SYSTEM else _class_block_solve
        x = solver(features, gram, diag, unit, self.problem.l2, stacked).to(rhs["weight"].dtype)
        return _split_head(x, bias=self.problem.bias)


def _logit_space_solve(
    features: Tensor, gram: Tensor, diag: Tensor, unit: Tensor | None, l2: float, rhs: Tensor
) -> Tensor:
    r"""``(Jᵀ S J + μ I)⁻¹ r`` through the ``n·C`` logits: ``Z̃ (T, n, m)``, ``G̃ (T, n, n)``,
    ``s, w (T, n, C)`` (:meth:`_LogitLoss.hessian_parts`), ``r (T, C, m)`` → ``(T, C, m)``.

    With ``t = J x`` (so ``J Jᵀ = G̃ ⊗ I_C``), ``μ x = r − Jᵀ S t`` gives::

        (μ I + (G̃ ⊗ I_C) S) t = J r,     x = (r − Jᵀ S t) / μ,
        [(G̃ ⊗ I_C) S]_{(j,a),(k,b)} = G̃_jk (S_k)_{ab}

    one ``n·C``-square system (not symmetric; its eigenvalues are those of
    ``μ I + S^{1/2} (G̃ ⊗ I_C) S^{1/2}``, ``≥ μ``), solved by LU. Cheapest for small ``n·C``."""
    tasks, n, c = diag.shape
    blocks = torch.diag_embed(diag)  # S_k (T, n, C, C)
    if unit is not None:
        rank_one = diag.sqrt() * unit  # S_k = diag(s_k) − u_k u_kᵀ, u_k = √s_k ⊙ w_k
        blocks = blocks - rank_one.unsqueeze(-1) * rank_one.unsqueeze(-2)
    system = torch.einsum("tjk,tkab->tjakb", gram, blocks).reshape(tasks, n * c, n * c)
    system.diagonal(dim1=-2, dim2=-1).add_(l2)
    logits_rhs = torch.bmm(features, rhs.mT).reshape(tasks, n * c, 1)  # J r
    t = torch.linalg.solve(system, logits_rhs).view(tasks, n, c)
    curved = (blocks * t.unsqueeze(-2)).sum(-1)  # S t (T, n, C)
    return (rhs - torch.bmm(curved.mT, features)) / l2


def _class_block_solve(
    features: Tensor, gram: Tensor, diag: Tensor, unit: Tensor | None, l2: float, rhs: Tensor
) -> Tensor:
    r"""``(Jᵀ S J + μ I)⁻¹ r`` by the class-block structure of ``H``: same shapes as
    :func:`_logit_space_solve`.

    With ``S_j = diag(s_j) − u_j u_jᵀ``, ``u_j = √s_j ⊙ w_j``, the sum
    ``Σ_j diag(s_j) ⊗ z̃_j z̃_jᵀ`` is block-diagonal over the classes ``a``, so::

        H = B − V Vᵀ,   B = blockdiag_a(B_a),   B_a = μ I_m + Z̃ᵀ diag(s_{·a}) Z̃,
        V = [v_1 … v_n],   (v_j)_a = u_{ja} z̃_j                (no projector: H = B)

    and Woodbury's identity with the ``n``-square capacitance ``E = I − Vᵀ B⁻¹ V``::

        H⁻¹ r = B⁻¹ (r + V E⁻¹ Vᵀ B⁻¹ r)

    Written as ``I`` minus a sum, ``E`` is a small difference of order-one terms where the fit
    is tight (``p_j`` near one-hot, small ``μ``) and loses every digit. With
    ``ρ_a = diag(√s_{·a})``, ``K_a = Z̃ B_a⁻¹ Z̃ᵀ`` and the complement
    ``Ω_a = I − ρ_a K_a ρ_a`` (:func:`_class_blocks`), ``Σ_a w_ja² = 1`` cancels the identity
    exactly::

        E = I − Σ_a diag(w_a) ρ_a K_a ρ_a diag(w_a) = Σ_a diag(w_a) Ω_a diag(w_a)

    a sum of positive semi-definite terms (solved by LU, which a rounding error at the edge of
    definiteness cannot break). Each ``B_a`` is factored in the smaller of its two spaces:
    ``C`` systems of size ``min(n, m)`` and one of size ``n``, against one of size ``n·C`` in
    the logit space (``20 × 20`` and ``20 × 20`` against ``400 × 400`` at 20-way 1-shot)."""
    apply_inverse, complement = _class_blocks(features, gram, diag.mT, l2)
    if unit is None:
        return apply_inverse(rhs)
    w = unit.mT  # (T, C, n)
    u = diag.mT.sqrt() * w
    capacitance = (w.unsqueeze(-1) * complement() * w.unsqueeze(-2)).sum(1)  # Σ_a w_a Ω_a w_a
    y = apply_inverse(rhs)  # B⁻¹ r
    projected = (u * torch.bmm(y, features.mT)).sum(1).unsqueeze(-1)  # Vᵀ B⁻¹ r (T, n, 1)
    coefficients = torch.linalg.solve(capacitance, projected).mT  # E⁻¹ Vᵀ B⁻¹ r (T, 1, n)
    return y + apply_inverse(torch.bmm(u * coefficients, features))  # + B⁻¹ V (…)


def _class_blocks(
    features: Tensor, gram: Tensor, diag: Tensor, l2: float
) -> tuple[Callable[[Tensor], Tensor], Callable[[], Tensor]]:
    r"""The blocks ``B_a = μ I_m + Z̃ᵀ ρ_a² Z̃`` for ``Z̃ (T, n, m)``, ``G̃ (T, n, n)``,
    ``s (T, C, n)`` (one row per class), ``ρ_a = diag(√s_a)``, factored by Cholesky. Returns
    ``y ↦ B⁻¹ y`` on ``(T, C, m)`` and the complement ``Ω_a = I − ρ_a Z̃ B_a⁻¹ Z̃ᵀ ρ_a``
    ``(T, C, n, n)``.

    For ``n ≤ m``, Woodbury in the ``n`` space with ``M_a = μ I + ρ_a G̃ ρ_a``::

        B_a⁻¹ y = (y − Z̃ᵀ ρ_a M_a⁻¹ ρ_a Z̃ y) / μ,     Ω_a = μ M_a⁻¹

    (no subtraction); else ``B_a`` itself, ``m``-square, and ``Ω_a`` as the difference."""
    n, m = features.shape[1:]
    if n <= m:
        root = diag.sqrt()  # ρ (T, C, n)
        small = root.unsqueeze(-1) * gram.unsqueeze(1) * root.unsqueeze(-2)  # ρ_a G̃ ρ_a
        small.diagonal(dim1=-2, dim2=-1).add_(l2)
        chol = torch.linalg.cholesky(small)

        def apply_inverse(y: Tensor) -> Tensor:
            inner = (root * torch.bmm(y, features.mT)).unsqueeze(-1)  # ρ_a Z̃ y_a
            coefficients = root * torch.cholesky_solve(inner, chol).squeeze(-1)
            return (y - torch.bmm(coefficients, features)) / l2

        def complement() -> Tensor:
            return l2 * torch.cholesky_inverse(chol)

        return apply_inverse, complement
    blocks = torch.einsum("tnx,tan,tny->taxy", features, diag, features)
    blocks.diagonal(dim1=-2, dim2=-1).add_(l2)
    chol = torch.linalg.cholesky(blocks)

    def apply_dense(y: Tensor) -> Tensor:
        return torch.cholesky_solve(y.unsqueeze(-1), chol).squeeze(-1)

    def complement_dense() -> Tensor:
        scaled = features.mT.unsqueeze(1) * diag.sqrt().unsqueeze(-2)  # Z̃ᵀ ρ_a (T, C, m, n)
        half = torch.linalg.solve_triangular(chol, scaled, upper=False)  # L_a⁻¹ Z̃ᵀ ρ_a
        return torch.eye(n, dtype=features.dtype, device=features.device) - half.mT @ half

    return apply_dense, complement_dense


class AutogradHeadProblem(HeadProblem):
    """Any head, by autograd: ``head`` applied with per-task parameters through ``torch.func``.

    Its :meth:`Curvature.solve` runs conjugate gradient on the Hessian-vector products (Newton-CG
    when used by :func:`newton_solve`); it has no curvature bound, so :meth:`step_size` refuses.
    """

    def __init__(
        self,
        head: nn.Module,
        features: Tensor,
        labels: Tensor,
        center: Mapping[str, Tensor],
        l2: float,
        loss: str,
    ) -> None:
        super().__init__(features, labels, center, l2, loss)
        self.head = head

    def _objective_of(
        self, features: Tensor, phi: Mapping[str, Tensor], center: TensorDict
    ) -> Tensor:
        return head_objective(self.head, phi, features, self.labels, center, self.l2, self.loss)

    def objective(self, phi: Mapping[str, Tensor]) -> Tensor:
        return self._objective_of(self.features, phi, self.center)

    def gradient(self, phi: Mapping[str, Tensor]) -> TensorDict:
        with torch.enable_grad():
            leaves = _leaves(phi)
            grads = torch.autograd.grad(self.objective(leaves).sum(), list(leaves.values()))
        return dict(zip(leaves, grads, strict=True))

    def curvature(self, phi: Mapping[str, Tensor]) -> _AutogradCurvature:
        with torch.enable_grad():
            features = self.features.detach().requires_grad_(True)
            phi_l, center_l = _leaves(phi), _leaves(self.center)
            total = self._objective_of(features, phi_l, center_l).sum()
            grads = torch.autograd.grad(total, list(phi_l.values()), create_graph=True)
        return _AutogradCurvature(dict(zip(phi_l, grads, strict=True)), phi_l, features, center_l)

    def outer_gradient(
        self, phi: Mapping[str, Tensor], query: Tensor, query_labels: Tensor
    ) -> tuple[Tensor, TensorDict]:
        with torch.enable_grad():
            query_l, phi_l = query.detach().requires_grad_(True), _leaves(phi)
            pred = batched_head_forward(self.head, phi_l, query_l)
            total = task_losses(pred, query_labels, self.loss).sum()
            grads = torch.autograd.grad(total, [query_l, *phi_l.values()])
        return grads[0], dict(zip(phi_l, grads[1:], strict=True))

    def step_size(self) -> Tensor:
        raise ValueError(
            f"inner_lr='auto' needs an nn.Linear head; got {type(self.head).__name__}: "
            "pass a number for inner_lr, or use inner_solver='newton'"
        )


def _leaves(tensors: Mapping[str, Tensor]) -> TensorDict:
    return {k: t.detach().requires_grad_(True) for k, t in tensors.items()}


@dataclass(frozen=True)
class _AutogradCurvature(Curvature):
    """Curvature by autograd through one graph of ``∇_φ g`` built at ``φ`` (``create_graph``)."""

    grad_phi: TensorDict
    phi: TensorDict
    features: Tensor
    center: TensorDict

    def _vjp(self, inputs: list[Tensor], v: Mapping[str, Tensor]) -> tuple[Tensor, ...]:
        keys = list(self.grad_phi)
        grads = torch.autograd.grad(
            [self.grad_phi[k] for k in keys],
            inputs,
            grad_outputs=[v[k] for k in keys],
            retain_graph=True,
            allow_unused=True,
        )
        return tuple(
            torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads, strict=True)
        )

    def hvp(self, v: Mapping[str, Tensor]) -> TensorDict:
        return dict(zip(self.phi, self._vjp(list(self.phi.values()), v), strict=True))

    def mixed_vjp(self, v: Mapping[str, Tensor]) -> tuple[Tensor, TensorDict]:
        grads = self._vjp([self.features, *self.center.values()], v)
        return grads[0], dict(zip(self.center, grads[1:], strict=True))

    def solve(self, rhs: Mapping[str, Tensor]) -> TensorDict:
        """Truncated CG (Newton-CG): to a residual of ``10⁻³ ‖rhs‖``, at most
        ``min(dim φ, CG_CAP)`` iterations — an inexact Newton direction, still a descent one."""
        size = sum(t[0].numel() for t in rhs.values())
        scale = float(tree_norm(rhs, batched=True).min())
        iters = min(size, CG_CAP)
        result = conjugate_gradient(self.hvp, rhs, iters=iters, tol=1e-3 * scale, batched=True)
        return {k: t.detach() for k, t in result.solution.items()}


def has_closed_form(head: nn.Module) -> bool:
    """Whether ``head``'s problem has closed forms and an exact solve (:class:`LinearHeadProblem`:
    an ``nn.Linear`` with a bias); any other head is handled by autograd."""
    return isinstance(head, nn.Linear) and head.bias is not None


def head_problem(
    head: nn.Module,
    features: Tensor,
    labels: Tensor,
    center: Mapping[str, Tensor],
    *,
    l2: float,
    loss: str,
) -> HeadProblem:
    """The :class:`HeadProblem` for ``head``: closed forms for an ``nn.Linear`` with a bias,
    autograd for anything else. ``features (T, n, d)`` are detached here."""
    features = features.detach()
    if has_closed_form(head):
        return LinearHeadProblem(features, labels, center, l2, loss)
    return AutogradHeadProblem(head, features, labels, center, l2, loss)


# --------------------------------------------------------------------------- Algorithm 1


@dataclass(frozen=True)
class HeadHypergradient:
    """Outcome of :func:`head_hypergradient` for a chunk of ``T`` tasks.

    Attributes:
        support: ``∂F_t/∂Z_s = −∂/∂Z_s ⟨∇_φ g_t, v_t⟩``, ``(T, n, d)``.
        query: ``∂F_t/∂Z_q = ∇_{Z_q} f_t``, ``(T, m, d)``.
        center: ``∂F_t/∂c = μ v_t`` (the head's start, when it is meta-learned), shaped like ``φ``.
        v: ``v_t ≈ [∇²_φ g_t]⁻¹ ∇_φ f_t`` (``None`` when ``cg_iters = 0``).
        cg: the :class:`CGResult` (``None`` when ``cg_iters = 0`` or ``v`` was solved exactly).
        residual: ``‖∇²_φ g_t v_t − ∇_φ f_t‖`` per task ``(T,)`` (``None`` when
            ``cg_iters = 0``).
    """

    support: Tensor
    query: Tensor
    center: TensorDict
    v: TensorDict | None
    cg: CGResult | None
    residual: Tensor | None = None


def head_hypergradient(
    problem: HeadProblem,
    phi: Mapping[str, Tensor],
    query: Tensor,
    query_labels: Tensor,
    *,
    cg_iters: int,
    v0: Mapping[str, Tensor] | None = None,
    tol: float = 0.0,
    exact_v: bool = False,
) -> HeadHypergradient:
    r"""Algorithm 1's hypergradient of every task of a chunk, with respect to its features.

    The upper and lower levels see the backbone ``θ`` only through the features ``Z_s, Z_q``
    (and the head's start ``c`` when it is learned), so the implicit function theorem at
    ``φ_t ≈ φ_t*`` gives, per task::

        v_t = [∇²_φ g_t]⁻¹ ∇_φ f_t              (exactly, or N CG steps from v0)
        ∂F_t/∂Z_q = ∇_{Z_q} f_t,    ∂F_t/∂(Z_s, c) = −∂/∂(Z_s, c) ⟨∇_φ g_t, v_t⟩

    and one ordinary backward pass of the backbone carries these into ``θ``. ``cg_iters = 0``
    drops the implicit term (only ``∇_{Z_q} f``).

    Args:
        problem: the chunk's lower level.
        phi: the lower-level solution, ``(T, *param_shape)`` per name.
        query: ``(T, m, d)`` query features (detached).
        query_labels: ``(T, m)`` (or ``(T, m, C)`` targets).
        cg_iters: ``N ≥ 0``.
        v0: CG's warm start, shaped like ``phi``.
        tol: CG stops once every residual is ``≤ tol``.
        exact_v: where the problem has an exact solve (:attr:`HeadProblem.exact_solve`: a
            linear head), solve for ``v`` with it instead of CG — the same exact solve as a
            Newton direction, in float64; ``cg_iters`` then only says whether there is an
            implicit term (``0`` or not). Other problems use ``cg_iters`` CG steps either way.

    Returns:
        A :class:`HeadHypergradient`.
    """
    check_positive_int("cg_iters", cg_iters, minimum=0)
    grad_query, grad_phi = problem.outer_gradient(phi, query, query_labels)
    if cg_iters == 0:
        zeros = tree_zeros_like(dict(phi))
        return HeadHypergradient(torch.zeros_like(problem.features), grad_query, zeros, None, None)
    curvature = problem.curvature(phi)
    cg = None
    if exact_v and problem.exact_solve:
        v = problem.exact_inverse(phi, grad_phi)
    else:
        cg = conjugate_gradient(curvature.hvp, grad_phi, v0, iters=cg_iters, tol=tol, batched=True)
        v = {k: t.detach() for k, t in cg.solution.items()}
    residual = (
        cg.residual
        if cg is not None
        else tree_norm(tree_sub(curvature.hvp(v), grad_phi), batched=True)
    )
    mixed_support, mixed_center = curvature.mixed_vjp(v)
    center = {k: -t.detach() for k, t in mixed_center.items()}
    return HeadHypergradient(
        -mixed_support.detach(), grad_query.detach(), center, v, cg, residual.detach()
    )


# --------------------------------------------------------------------------- the solvers
@dataclass(frozen=True)
class SolveReport:
    """What a lower-level solver did, per task.

    Attributes:
        iterations: ``(T,)`` int64: Newton iterations (or gradient steps) each task used.
        grad_norm: ``(T,)`` final ``‖∇_φ g_t‖`` in the solver's precision.
        converged: ``(T,)`` bool: ``grad_norm ≤ tol`` (always ``False`` for ``tol = 0``).
    """

    iterations: Tensor
    grad_norm: Tensor
    converged: Tensor


def newton_solve(
    problem: HeadProblem,
    phi0: Mapping[str, Tensor],
    *,
    tol: float,
    max_iters: int,
    ray_start: bool = True,
) -> tuple[TensorDict, SolveReport]:
    r"""Minimise every task's ``g_t`` by Newton's method with a backtracking line search.

    The iterations start at :meth:`HeadProblem.newton_start` of ``φ⁰`` (``ray_start``, and
    ``max_iters > 0``): for a linear head the best point on the ray from ``φ⁰`` through the
    squared-loss solution, which is never worse than ``φ⁰`` and roughly halves the iterations
    at 20-way 1-shot. Then ``Δ = −[∇²_φ g]⁻¹ ∇_φ g`` from :meth:`Curvature.solve`, and the
    largest ``s ∈ {1, ½, ¼, …}`` with ``g(φ + sΔ) ≤ g(φ) + 10⁻⁴ s ⟨∇g, Δ⟩`` (up to rounding),
    per task; a task stops once ``‖∇_φ g_t‖ ≤ tol``. On a μ-strongly convex ``g`` with
    Lipschitz Hessian this converges from any start, quadratically near ``φ*``, so the start
    changes the number of iterations, not where they end (up to ``tol``). A task whose line
    search finds no decrease keeps its iterate (and reports ``converged = False``).

    Args:
        problem: the chunk's lower level (μ > 0).
        phi0: the start, ``(T, *param_shape)`` per name.
        tol: stop once ``‖∇_φ g_t‖ ≤ tol`` for every task.
        max_iters: the cap on Newton iterations (``K``).
        ray_start: start at ``problem.newton_start(φ⁰)`` rather than at ``φ⁰`` itself.

    Returns:
        ``(φ, report)``.
    """
    use_ray = ray_start and max_iters > 0
    phi = problem.newton_start(phi0) if use_ray else {k: v.detach() for k, v in phi0.items()}
    value = problem.objective(phi)
    grad, curvature = problem.gradient_and_curvature(phi)  # the curvature: when asked for
    norm = tree_norm(grad, batched=True)
    iterations = torch.zeros(problem.num_tasks, dtype=torch.int64, device=norm.device)
    for _ in range(max_iters):
        active = norm > tol
        if not bool(active.any()):
            break
        direction = curvature().solve({k: -g for k, g in grad.items()})
        phi, value = _backtrack(problem, phi, value, grad, direction, active)
        grad, curvature = problem.gradient_and_curvature(phi)
        norm = torch.where(active, tree_norm(grad, batched=True), norm)
        iterations += active.to(iterations.dtype)
    return phi, SolveReport(iterations, norm, norm <= tol)


def _backtrack(
    problem: HeadProblem,
    phi: TensorDict,
    value: Tensor,
    grad: TensorDict,
    direction: TensorDict,
    active: Tensor,
    *,
    halvings: int = 30,
) -> tuple[TensorDict, Tensor]:
    """Armijo backtracking per task from ``s = 1``; inactive tasks keep ``φ``. The comparison
    allows rounding error of ``g`` (so that steps near ``φ*`` are not refused for noise)."""
    slope = tree_dot(grad, direction, batched=True)
    slack = 64 * torch.finfo(value.dtype).eps * value.abs().clamp_min(1.0)
    step = torch.ones_like(value)
    pending = active.clone()
    for _ in range(halvings):
        trial = tree_axpy(step, direction, phi, batched=True)
        trial_value = problem.objective(trial)
        ok = pending & (trial_value <= value + 1e-4 * step * slope + slack)
        phi = tree_where(ok, trial, phi, batched=True)
        value = torch.where(ok, trial_value, value)
        pending = pending & ~ok
        if not bool(pending.any()):
            break
        step = torch.where(pending, 0.5 * step, step)
    return phi, value


def solve_lower_level(
    problem: HeadProblem,
    phi0: Mapping[str, Tensor],
    *,
    solver: Solver,
    max_iters: int,
    tol: float,
    lr: float | Literal["auto"],
    ray_start: bool = True,
) -> tuple[TensorDict, SolveReport]:
    """Solve the chunk's lower level with ``solver`` and report how it went.

    * ``"newton"``: :func:`newton_solve` with ``tol`` and the cap ``max_iters``, in float64 when
      the problem is in a lower precision (the head problem is small; the result is cast back);
      a linear head's problem is solved in its :attr:`~LinearHeadProblem.folded` form.
    * ``"gd"``: ``max_iters`` plain steps of ``lr`` (``"auto"``: ``1/L_t`` per task), the
      paper's lower level.

    Args:
        problem: the chunk's lower level.
        phi0: the start, ``(T, *param_shape)`` per name.
        solver: ``"newton"`` or ``"gd"``.
        max_iters: ``K``: Newton's cap, or the number of gradient steps.
        tol: Newton's tolerance on ``‖∇_φ g_t‖`` (the report uses it for ``gd`` too).
        lr: the gradient step (``"gd"`` only).
        ray_start: Newton starts at ``problem.newton_start(φ⁰)`` (see :func:`newton_solve`).
    """
    check_positive_int("max_iters", max_iters, minimum=0)
    if solver == "newton":
        dtype = problem.features.dtype
        if isinstance(problem, LinearHeadProblem):  # one parameter tensor: fewer operations
            start = {"weight": _stack_head(_cast(phi0, torch.float64))}
            stacked, report = newton_solve(
                problem.folded, start, tol=tol, max_iters=max_iters, ray_start=ray_start
            )
            return _cast(_split_head(stacked["weight"], bias=problem.bias), dtype), report
        start = _cast(phi0, torch.float64)
        phi, report = newton_solve(
            _in_float64(problem), start, tol=tol, max_iters=max_iters, ray_start=ray_start
        )
        return _cast(phi, dtype), report
    step: Tensor | float = problem.step_size() if lr == "auto" else float(lr)
    phi = gradient_steps(problem.gradient, phi0, steps=max_iters, lr=step)
    norm = tree_norm(problem.gradient(phi), batched=True)
    iterations = torch.full_like(norm, max_iters, dtype=torch.int64)
    return phi, SolveReport(iterations, norm, norm <= tol)


def _cast(tensors: Mapping[str, Tensor], dtype: torch.dtype) -> TensorDict:
    return {k: t.detach().to(dtype) for k, t in tensors.items()}


def _wide_labels(labels: Tensor) -> Tensor:
    """Regression targets in float64; class indices as they are."""
    return labels.double() if labels.is_floating_point() else labels


def _in_float64(problem: AutogradHeadProblem) -> AutogradHeadProblem:
    """The same problem with its floating tensors in float64 (itself if already there); the
    module is kept, its parameters come from ``φ``. (A linear head's float64 form is
    :attr:`LinearHeadProblem.folded`.)"""
    if problem.features.dtype == torch.float64:
        return problem
    args = (problem.features.double(), _wide_labels(problem.labels))
    center = _cast(problem.center, torch.float64)
    return AutogradHeadProblem(problem.head, *args, center, problem.l2, problem.loss)
