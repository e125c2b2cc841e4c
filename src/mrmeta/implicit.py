"""Implicit differentiation: conjugate gradient (Subroutine 1) and the IFT hypergradient.

For the bilevel problem ``min_θ f(θ, φ*(θ))`` with ``φ*(θ) = argmin_φ g(θ, φ)`` the implicit
function theorem gives (docs/method.md §2)::

    ∇F(θ) = ∇_θ f(θ, φ*) − ∇²_{θφ} g(θ, φ*) · [∇²_φ g(θ, φ*)]⁻¹ · ∇_φ f(θ, φ*)

:func:`hypergradient` evaluates this at a given ``φ ≈ φ*`` with Hessian-vector products only: the
inverse is applied by :func:`conjugate_gradient`, the mixed term is one vector-Jacobian product.
No matrix is ever formed and nothing about how ``φ`` was obtained is needed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from mrmeta._tree import TensorDict, tree_axpy, tree_dot, tree_sub, tree_where, tree_zeros_like
from mrmeta._validation import (
    check_finite_number,
    check_loss_call,
    check_positive_int,
    check_tensor_dict,
)

HVP = Callable[[TensorDict], TensorDict]
LossFn = Callable[[TensorDict, TensorDict], Tensor]


@dataclass(frozen=True)
class CGResult:
    """Outcome of :func:`conjugate_gradient`.

    Attributes:
        solution: the final iterate ``v``, shaped like ``b``.
        residual_norms: ``(n_iter + 1,)`` — or ``(n_iter + 1, B)`` when batched — norms
            ``‖b − H v‖`` at the start and after each iteration.
        iterations: iterations actually run.
        converged: whether every residual fell to ``tol`` or below (``tol = 0`` asks for an
            exact zero, so a fixed-budget solve usually reports ``False``).
        breakdown: ``None``, or why the solve stopped early without converging (a non-positive
            curvature ``pᵀHp ≤ 0`` — ``H`` not positive definite — or a non-finite value). The
            iterate before the failing step is returned.
        failed: bool, 0-d or ``(B,)``: which systems broke down. With ``batched`` a failing
            system is frozen at its last good iterate while the others go on.
    """

    solution: TensorDict
    residual_norms: Tensor
    iterations: int
    converged: bool
    breakdown: str | None = None
    failed: Tensor | None = None

    @property
    def residual(self) -> Tensor:
        """Final residual norm: 0-d, or ``(B,)`` when batched."""
        return self.residual_norms[-1]


def _describe(tensors: Mapping[str, object]) -> str:
    """``{key: shape}`` of a dict as text, for error messages."""
    items = (
        f"{k!r}: {tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}"
        for k, t in tensors.items()
    )
    return "{" + ", ".join(items) + "}"


def _check_like_b(name: str, tensors: object, b: TensorDict) -> TensorDict:
    """``tensors`` as a dict with exactly the keys and shapes of ``b``, else a clear error.

    ``name`` says where the dict came from (``"x0"``, ``"hvp(v)"``) so the message points at
    the argument to fix.
    """
    if not isinstance(tensors, Mapping):
        raise TypeError(
            f"{name} must be a dict of str -> Tensor shaped like b {_describe(b)}, "
            f"got {type(tensors).__name__}"
        )
    if set(tensors) != set(b):
        raise ValueError(
            f"{name} must have the keys of b {sorted(b)}, got {sorted(tensors, key=str)} "
            f"(missing {sorted(set(b) - set(tensors))}, "
            f"extra {sorted(set(tensors) - set(b), key=str)})"
        )
    for key, t in tensors.items():
        if not isinstance(t, Tensor) or t.shape != b[key].shape:
            raise ValueError(
                f"{name} must be shaped like b {_describe(b)}, got {_describe(tensors)}"
            )
    return dict(tensors)


def _check_systems(b: TensorDict) -> None:
    """With ``batched``, every tensor of ``b`` has a first dimension indexing the same systems."""
    leading = {t.shape[0] if t.dim() else None for t in b.values()}
    if len(leading) != 1 or None in leading:
        raise ValueError(
            "batched=True needs every tensor of b to share its first dimension (one entry per "
            f"system), got {_describe(b)}"
        )


def _checked(hvp: HVP, b: TensorDict) -> HVP:
    """``hvp`` whose every result is checked to have the keys and shapes of ``b``."""

    def product(v: TensorDict) -> TensorDict:
        return _check_like_b("hvp(v)", hvp(v), b)

    return product


def _non_finite(name: str, tensors: TensorDict, batched: bool) -> tuple[Tensor, str | None]:
    """Which systems of ``tensors`` hold a NaN or an inf (0-d, or ``(B,)`` when ``batched``),
    and a message naming the first bad key and which it holds (``None`` when all are finite)."""
    first = next(iter(tensors.values()))
    bad = torch.zeros(first.shape[0] if batched else (), dtype=torch.bool, device=first.device)
    reason = None
    for key, t in tensors.items():
        flat = t.reshape(t.shape[0] if batched else 1, -1)
        nan, inf = torch.isnan(flat).any(1), torch.isinf(flat).any(1)
        bad = bad | (nan | inf).reshape(bad.shape)
        if reason is None and bool((nan | inf).any()):
            reason = f"non-finite input: {name}[{key!r}] holds {'NaN' if nan.any() else 'inf'}"
    return bad, reason


def _cg_state(
    hvp: HVP, b: TensorDict, x0: TensorDict | None, batched: bool
) -> tuple[TensorDict, TensorDict, TensorDict, Tensor, str | None]:
    """Initial ``(x, r, p)`` with ``r = p = b − H x0`` (``x0 = 0`` when not given), the systems
    that cannot start (a NaN/inf in ``b``, ``x0`` or ``H x0``) and the first reason.

    Such a system keeps a finite ``x`` (``x0`` where finite, else zeros) and ``p = 0``, so it
    never feeds a NaN into ``hvp``; its residual stays ``b − H x`` (non-finite when ``b`` is).
    """
    failed, reason = _non_finite("b", b, batched)
    if reason is not None:
        reason += ": the right-hand side must be finite (check the outer loss and its gradient)"
    x = tree_zeros_like(b)
    if x0 is not None:
        x0_bad, x0_reason = _non_finite("x0", x0, batched)
        x = tree_where(x0_bad, x, {k: x0[k].detach().to(b[k]) for k in b}, batched=batched)
        if x0_reason is not None:
            failed, reason = failed | x0_bad, reason or x0_reason + ": pass a finite x0, or None"
    r = dict(b) if x0 is None else tree_sub(b, hvp(x))
    r_bad, _ = _non_finite("b - H x0", r, batched)
    if reason is None and bool((r_bad & ~failed).any()):
        reason = "non-finite value in the Hessian-vector product H x0 (check the losses)"
    failed = failed | r_bad
    return x, r, tree_where(failed, tree_zeros_like(r), r, batched=batched), failed, reason


def _cg_failures(curvature: Tensor, active: Tensor) -> tuple[Tensor, str | None]:
    """Systems whose ``pᵀHp`` is non-finite or non-positive while unconverged, and why."""
    non_finite = active & ~torch.isfinite(curvature)
    non_positive = active & ~non_finite & (curvature <= 0)
    if bool(non_finite.any()):
        return non_finite | non_positive, (
            "non-finite value in the Hessian-vector product (check the losses for NaN/inf)"
        )
    if bool(non_positive.any()):
        return non_positive, (
            "non-positive curvature pᵀHp ≤ 0: the Hessian is not positive definite there"
        )
    return non_positive, None


def conjugate_gradient(
    hvp: HVP,
    b: Mapping[str, Tensor],
    x0: Mapping[str, Tensor] | None = None,
    *,
    iters: int = 20,
    tol: float = 0.0,
    batched: bool = False,
) -> CGResult:
    """Solve ``H v = b`` for symmetric positive-definite ``H`` given only ``v ↦ H v``.

    Subroutine 1 of the paper, with an optional warm start ``x0``::

        r⁰ = p⁰ = b − H v⁰
        for n < iters:  h = H pⁿ;  η = rᵀr / pᵀh;  v += η p;  r' = r − η h;
                        ζ = r'ᵀr' / rᵀr;  p = r' + ζ p

    A system whose ``b``, ``x0`` or ``H x0`` holds a NaN or an inf does not start: it is
    reported in ``failed`` and ``breakdown`` (naming the argument, the key, NaN or inf); its
    solution is a finite start (``x0`` where finite, else zeros) and its residual norm is
    ``‖b − H x‖`` there (NaN or inf when ``b`` is: the true value, not a made-up one).

    Args:
        hvp: maps a dict shaped like ``b`` to ``H`` times it (same keys, same shapes).
        b: right-hand side, a dict of floating tensors.
        x0: warm start with the keys and shapes of ``b`` (``None``: zeros).
        iters: maximum number of iterations, ``≥ 1``.
        tol: stop once every residual norm ``‖b − H v‖ ≤ tol`` (``0``: run all ``iters``
            unless the residual is exactly zero).
        batched: the first dimension of every tensor indexes independent systems (one per
            task, ``H`` block diagonal): step sizes and residuals are per system.

    Returns:
        A :class:`CGResult`; its ``breakdown`` says why the solve stopped early, if it did.

    Raises:
        TypeError: ``b``, ``x0`` or a result of ``hvp`` is not a dict of tensors.
        ValueError: ``x0`` or a result of ``hvp`` does not have the keys and shapes of ``b``
            (the message gives both), or ``batched`` tensors disagree on the number of systems.

    Example:
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]])
        >>> out = conjugate_gradient(lambda v: {"x": A @ v["x"]}, {"x": torch.ones(2)}, iters=2)
        >>> torch.allclose(A @ out.solution["x"], torch.ones(2), atol=1e-5)
        True
    """
    check_positive_int("iters", iters)
    check_finite_number("tol", tol)
    b = check_tensor_dict("b", b)
    if batched:
        _check_systems(b)
    x0 = None if x0 is None else _check_like_b("x0", x0, b)
    hvp = _checked(hvp, b)
    x, r, p, failed, breakdown = _cg_state(hvp, b, x0, batched)
    rr = tree_dot(r, r, batched=batched)
    norms, n_done = [rr.sqrt()], 0
    for _ in range(iters):
        active = ~failed & (rr.sqrt() > tol)
        if not bool(active.any()):
            break
        h = hvp(p)
        curvature = tree_dot(p, h, batched=batched)
        bad, reason = _cg_failures(curvature, active)
        failed, active = failed | bad, active & ~bad
        breakdown = breakdown or reason
        if not bool(active.any()):
            break
        safe = torch.where(active, curvature, torch.ones_like(curvature))
        eta = torch.where(active, rr / safe, torch.zeros_like(rr))
        x = tree_where(active, tree_axpy(eta, p, x, batched=batched), x, batched=batched)
        r = tree_where(active, tree_axpy(-eta, h, r, batched=batched), r, batched=batched)
        rr_new = torch.where(active, tree_dot(r, r, batched=batched), rr)
        zeta = torch.where(active, rr_new / torch.where(active, rr, torch.ones_like(rr)), 0 * rr)
        p = tree_where(active, tree_axpy(zeta, p, r, batched=batched), p, batched=batched)
        rr, n_done = rr_new, n_done + 1
        norms.append(rr.sqrt())
    residuals = torch.stack(norms)
    converged = breakdown is None and bool((residuals[-1] <= tol).all())
    return CGResult(x, residuals, n_done, converged, breakdown, failed)


@dataclass(frozen=True)
class Hypergradient:
    """Outcome of :func:`hypergradient`.

    Attributes:
        grad: ``∇_θ f − ∇²_{θφ} g · v``, shaped like ``theta``.
        v: the CG solution ``v ≈ [∇²_φ g]⁻¹ ∇_φ f``, shaped like ``phi`` (warm-start the next call).
        cg: the full :class:`CGResult`.
        outer_loss: the value of ``f(θ, φ)`` (detached).
    """

    grad: TensorDict
    v: TensorDict
    cg: CGResult
    outer_loss: Tensor

    @property
    def residual(self) -> Tensor:
        """Final CG residual norm ``‖∇_φ f − ∇²_φ g · v‖``."""
        return self.cg.residual


def _as_leaves(name: str, tensors: Mapping[str, Tensor]) -> TensorDict:
    """Fresh leaf tensors (sharing storage) that require grad."""
    return {k: t.detach().requires_grad_(True) for k, t in check_tensor_dict(name, tensors).items()}


def grad_dicts(output: Tensor, *inputs: TensorDict) -> tuple[TensorDict, ...]:
    """``∇ output`` with respect to each dict of ``inputs`` (zeros where it does not depend)."""
    leaves = [t for group in inputs for t in group.values()]
    flat = iter(torch.autograd.grad(output, leaves, allow_unused=True))
    return tuple(
        {k: torch.zeros_like(t) if (g := next(flat)) is None else g for k, t in group.items()}
        for group in inputs
    )


def vjp_dict(outputs: TensorDict, inputs: TensorDict, cotangent: TensorDict) -> TensorDict:
    """``Σ_k (∂ outputs[k] / ∂ inputs)ᵀ cotangent[k]`` keeping the graph for more products."""
    keys = list(outputs)
    grads = torch.autograd.grad(
        [outputs[k] for k in keys],
        list(inputs.values()),
        grad_outputs=[cotangent[k] for k in keys],
        retain_graph=True,
        allow_unused=True,
    )
    return {
        k: torch.zeros_like(t) if g is None else g
        for (k, t), g in zip(inputs.items(), grads, strict=True)
    }


def hypergradient(
    outer_loss: LossFn,
    inner_loss: LossFn,
    theta: Mapping[str, Tensor],
    phi: Mapping[str, Tensor],
    *,
    cg_iters: int = 20,
    v0: Mapping[str, Tensor] | None = None,
    tol: float = 0.0,
    batched: bool = False,
) -> Hypergradient:
    """Implicit-function-theorem hypergradient at ``φ ≈ argmin_φ g(θ, φ)``.

    Computes ``∇_θ f(θ, φ) − ∇²_{θφ} g(θ, φ) · v`` where ``v`` solves
    ``∇²_φ g(θ, φ) · v = ∇_φ f(θ, φ)`` by ``cg_iters`` steps of :func:`conjugate_gradient`.
    One graph of ``∇_φ g`` is built (``create_graph``); each CG step is one Hessian-vector
    product through it and the mixed term is one vector-Jacobian product into ``θ``.

    Args:
        outer_loss: ``f(theta, phi) -> scalar``.
        inner_loss: ``g(theta, phi) -> scalar``, strongly convex in ``phi`` near ``phi``.
        theta: upper-level variables, dict of floating tensors (any shapes).
        phi: lower-level solution, dict of floating tensors.
        cg_iters: CG iterations ``N ≥ 1``.
        v0: warm start for CG, shaped like ``phi`` (``None``: zeros).
        tol: CG stops early once the residual norm is ``≤ tol``.
        batched: the first dimension of every ``phi`` tensor indexes independent tasks whose
            losses are summed in ``g``: CG then runs per task (see :func:`conjugate_gradient`).

    Returns:
        A :class:`Hypergradient` (``grad`` shaped like ``theta``; ``v`` to warm-start next time).

    Example:
        >>> theta, phi = {"t": torch.tensor(1.0)}, {"p": torch.tensor(1.0)}
        >>> f = lambda th, ph: (ph["p"] - 2.0) ** 2
        >>> g = lambda th, ph: (ph["p"] - th["t"]) ** 2      # φ*(θ) = θ, so F'(θ) = 2(θ − 2)
        >>> round(float(hypergradient(f, g, theta, phi, cg_iters=1).grad["t"]), 6)
        -2.0
    """
    check_positive_int("cg_iters", cg_iters)
    theta_l, phi_l = _as_leaves("theta", theta), _as_leaves("phi", phi)
    with torch.enable_grad():
        f = check_loss_call("outer_loss", outer_loss, theta_l, phi_l)
        grad_f_theta, b = grad_dicts(f, theta_l, phi_l)
        g = check_loss_call("inner_loss", inner_loss, theta_l, phi_l)
        grad_phi_g = dict(
            zip(phi_l, torch.autograd.grad(g, list(phi_l.values()), create_graph=True), strict=True)
        )
        cg = conjugate_gradient(
            lambda v: vjp_dict(grad_phi_g, phi_l, v),
            b,
            v0,
            iters=cg_iters,
            tol=tol,
            batched=batched,
        )
        mixed = vjp_dict(grad_phi_g, theta_l, cg.solution)
    grad = {k: (grad_f_theta[k] - mixed[k]).detach() for k in theta_l}
    solution = {k: t.detach() for k, t in cg.solution.items()}
    return Hypergradient(grad, solution, cg, f.detach())
