"""Tests for the baselines (MAML, first-order MAML, ANIL, ITD-BiO, iMAML).

Every meta-gradient is compared with an independent answer computed here:

* MAML / ANIL / ITD-BiO: plain autograd through an unrolled loop written in this file — one task
  at a time, one ``torch.autograd.grad(create_graph=True)`` per inner step, the MLP written out
  by hand (the library sums the losses of a chunk of tasks into one autograd call per step and,
  for ANIL/ITD-BiO, computes the support features once; the reference recomputes them at every
  step);
* first-order MAML: the mean over tasks of the query-loss gradient at the adapted parameters;
* iMAML: the dense formula ``v = (I + H/λ)⁻¹ ∇L^q(φ_K)`` with ``H`` from ``torch.func.hessian``
  on flattened parameters (an autograd double-backward Hessian, checked against finite
  differences, for the BatchNorm network) and ``torch.linalg.solve``.

Everything is float64 and seeded. Tolerances: the unrolled methods evaluate the same
arithmetic in another order, so they agree to rounding (``rtol = 1e-8``, ``atol = 1e-10``);
iMAML's CG runs to a residual below ``1e-12`` on a tiny problem, so it matches the dense
solve to ``atol = 1e-9``.
"""

from __future__ import annotations

import dataclasses
import doctest
import inspect
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from mrmeta import Conv4, TaskBatch
from mrmeta.algorithms import (
    algorithm_class,
    algorithm_defaults,
    anil,
    base,
    imaml,
    itd_bio,
    maml,
    memory_reduced,
)
from mrmeta.algorithms.anil import ANIL
from mrmeta.algorithms.base import ChunkedLearner
from mrmeta.algorithms.imaml import IMAML
from mrmeta.algorithms.itd_bio import ITDBiO
from mrmeta.algorithms.maml import FOMAML, MAML
from mrmeta.algorithms.memory_reduced import MemoryReduced

TASKS, WAYS, SHOTS, QUERIES, DIM = 3, 3, 2, 2, 4
RTOL, ATOL = 1e-8, 1e-10
Params = dict[str, Tensor]
Forward = Callable[[Params, Tensor], Tensor]


# --------------------------------------------------------------------------- fixtures
def _mlp(seed: int = 0) -> nn.Sequential:
    """Backbone ``Linear(4, 5) → tanh`` (index 0, 1) and head ``Linear(5, 3)`` (index 2)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(DIM, 5), nn.Tanh(), nn.Linear(5, WAYS)).double()


def _conv4(seed: int = 0, hidden: int = 4) -> Conv4:
    torch.manual_seed(seed)
    return Conv4(ways=WAYS, in_channels=1, hidden=hidden, image_size=16).double()


def _batch(input_shape: tuple[int, ...], loss: str = "cross_entropy", seed: int = 1) -> TaskBatch:
    gen = torch.Generator().manual_seed(seed)
    n_s, n_q = WAYS * SHOTS, WAYS * QUERIES

    def targets(n: int) -> Tensor:
        if loss == "mse":
            return torch.randn(TASKS, n, WAYS, generator=gen, dtype=torch.float64)
        return torch.arange(WAYS).repeat(TASKS, n // WAYS)

    xs = torch.randn(TASKS, n_s, *input_shape, generator=gen, dtype=torch.float64)
    xq = torch.randn(TASKS, n_q, *input_shape, generator=gen, dtype=torch.float64)
    return TaskBatch(xs, targets(n_s), xq, targets(n_q))


def _task_loss(pred: Tensor, target: Tensor, loss: str) -> Tensor:
    if loss == "mse":
        return F.mse_loss(pred, target)
    return F.cross_entropy(pred, target)


def _learner_grads(learner: ChunkedLearner, batch: TaskBatch) -> Params:
    learner.zero_grad(set_to_none=True)
    learner.compute_meta_gradient(batch)
    return {k: p.grad.clone() for k, p in learner.named_parameters() if p.requires_grad}


def _assert_close(actual: Params, expected: Params, atol: float = ATOL) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=RTOL, atol=atol, msg=key)


# --------------------------------------------------------------------------- references
def _reference_adapt(
    forward: Forward,
    params: Params,
    adapted: list[str],
    x: Tensor,
    y: Tensor,
    *,
    steps: int,
    lr: float,
    loss: str,
    l2: float = 0.0,
) -> Params:
    """One task: ``steps`` unrolled gradient steps on the keys ``adapted`` of ``params``."""
    params = dict(params)
    for _ in range(steps):
        inner = _task_loss(forward(params, x), y, loss)
        inner = inner + 0.5 * l2 * sum(params[k].pow(2).sum() for k in adapted)
        grads = torch.autograd.grad(inner, [params[k] for k in adapted], create_graph=True)
        for key, grad in zip(adapted, grads, strict=True):
            params[key] = params[key] - lr * grad
    return params


def _reference_objective(
    forward: Forward,
    params: Params,
    adapted: list[str],
    batch: TaskBatch,
    *,
    steps: int,
    lr: float | list[float],
    loss: str = "cross_entropy",
    l2: float = 0.0,
) -> Tensor:
    """``(1/B) Σ_t L^q_t(φ_t^K(params))`` with the steps kept in the graph, task by task."""
    total = torch.zeros((), dtype=torch.float64)
    for t in range(batch.num_tasks):
        lr_t = lr[t] if isinstance(lr, list) else lr
        adapted_t = _reference_adapt(
            forward,
            params,
            adapted,
            batch.support_x[t],
            batch.support_y[t],
            steps=steps,
            lr=lr_t,
            loss=loss,
            l2=l2,
        )
        total = total + _task_loss(forward(adapted_t, batch.query_x[t]), batch.query_y[t], loss)
    return total / batch.num_tasks


def _grads_of(objective: Tensor, params: Params) -> Params:
    wrt = {k: p for k, p in params.items() if p.requires_grad}
    return dict(zip(wrt, torch.autograd.grad(objective, list(wrt.values())), strict=True))


def _module_forward(model: nn.Module) -> Forward:
    return lambda params, x: functional_call(model, params, (x,))


def _mlp_forward(params: Params, x: Tensor) -> Tensor:
    """The MLP of :func:`_mlp` written out by hand."""
    hidden = torch.tanh(x @ params["0.weight"].T + params["0.bias"])
    return hidden @ params["2.weight"].T + params["2.bias"]


# --------------------------------------------------------------------------- MAML
@pytest.mark.parametrize("chunk_size", [1, 2, None])
@pytest.mark.parametrize("steps", [0, 3])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_maml_mlp_matches_unrolled_reference(chunk_size: int | None, steps: int, loss: str) -> None:
    model, batch = _mlp(), _batch((DIM,), loss)
    learner = MAML(model, inner_steps=steps, inner_lr=0.3, loss=loss, chunk_size=chunk_size)
    params = dict(model.named_parameters())
    expected = _reference_objective(
        _mlp_forward, params, list(params), batch, steps=steps, lr=0.3, loss=loss
    )
    _assert_close(_learner_grads(learner, batch), _prefix("model.", _grads_of(expected, params)))


@pytest.mark.parametrize("chunk_size", [1, None])
def test_maml_conv4_matches_unrolled_reference(chunk_size: int | None) -> None:
    model, batch = _conv4(), _batch((1, 16, 16))
    learner = MAML(model, inner_steps=2, inner_lr=0.2, chunk_size=chunk_size)
    params = dict(model.named_parameters())
    expected = _reference_objective(
        _module_forward(model), params, list(params), batch, steps=2, lr=0.2
    )
    _assert_close(_learner_grads(learner, batch), _prefix("model.", _grads_of(expected, params)))


def _fomaml_reference(model: nn.Module, batch: TaskBatch, steps: int, lr: float) -> Params:
    """``(1/B) Σ_t ∇_φ L^q_t(φ_t^K)`` with ``φ_t^K`` from plain GD on detached parameters."""
    forward, total = _module_forward(model), None
    for t in range(batch.num_tasks):
        phi = {k: p.detach().requires_grad_(True) for k, p in model.named_parameters()}
        for _ in range(steps):
            grads = torch.autograd.grad(
                F.cross_entropy(forward(phi, batch.support_x[t]), batch.support_y[t]),
                list(phi.values()),
            )
            updated = zip(phi.items(), grads, strict=True)
            phi = {k: (p - lr * g).detach().requires_grad_(True) for (k, p), g in updated}
        query = F.cross_entropy(forward(phi, batch.query_x[t]), batch.query_y[t])
        grads = dict(zip(phi, torch.autograd.grad(query, list(phi.values())), strict=True))
        total = grads if total is None else {k: total[k] + grads[k] for k in grads}
    return {k: v / batch.num_tasks for k, v in total.items()}


@pytest.mark.parametrize("chunk_size", [1, None])
@pytest.mark.parametrize("make_model,shape", [(_mlp, (DIM,)), (_conv4, (1, 16, 16))])
def test_first_order_maml_matches_reference(
    chunk_size: int | None, make_model: Callable[[], nn.Module], shape: tuple[int, ...]
) -> None:
    model, batch = make_model(), _batch(shape)
    learner = FOMAML(model, inner_steps=3, inner_lr=0.2, chunk_size=chunk_size)
    assert learner.options.first_order
    expected = _prefix("model.", _fomaml_reference(model, batch, steps=3, lr=0.2))
    _assert_close(_learner_grads(learner, batch), expected)
    same = MAML(model, inner_steps=3, inner_lr=0.2, chunk_size=chunk_size, first_order=True)
    _assert_close(_learner_grads(same, batch), expected)


def _prefix(prefix: str, params: Params) -> Params:
    return {prefix + k: v for k, v in params.items()}


# --------------------------------------------------------------------------- ANIL, ITD-BiO
@pytest.mark.parametrize("chunk_size", [1, None])
@pytest.mark.parametrize("first_order", [False, True])
def test_anil_mlp_matches_unrolled_reference(chunk_size: int | None, first_order: bool) -> None:
    model, batch = _mlp(), _batch((DIM,))
    learner = ANIL(
        model[:2],
        model[2],
        inner_steps=3,
        inner_lr=0.4,
        chunk_size=chunk_size,
        first_order=first_order,
    )
    params = dict(model.named_parameters())
    if first_order:
        expected = _first_order_head_reference(model, batch, steps=3, lr=0.4)
    else:
        objective = _reference_objective(
            _mlp_forward, params, ["2.weight", "2.bias"], batch, steps=3, lr=0.4
        )
        expected = _grads_of(objective, params)
    _assert_close(_learner_grads(learner, batch), _split_names(expected))


def _first_order_head_reference(
    model: nn.Sequential, batch: TaskBatch, steps: int, lr: float
) -> Params:
    """First-order ANIL: head steps with constant gradients ``φ^K = φ⁰ − α Σ_k g_k`` (``g_k``
    detached), then the query loss differentiated with respect to backbone and ``φ⁰``."""
    params = dict(model.named_parameters())
    total = torch.zeros((), dtype=torch.float64)
    for t in range(batch.num_tasks):
        phi = {k: params[k] for k in ("2.weight", "2.bias")}
        for _ in range(steps):
            logits = _mlp_forward({**params, **phi}, batch.support_x[t])
            support = F.cross_entropy(logits, batch.support_y[t])
            grads = torch.autograd.grad(support, list(phi.values()))
            phi = {k: p - lr * g for (k, p), g in zip(phi.items(), grads, strict=True)}
        query = _mlp_forward({**params, **phi}, batch.query_x[t])
        total = total + F.cross_entropy(query, batch.query_y[t])
    return _grads_of(total / batch.num_tasks, params)


def _split_names(params: Params) -> Params:
    """``0.weight`` → ``backbone.0.weight``, ``2.weight`` → ``head.weight`` (learner names)."""
    return {
        (f"head.{k[2:]}" if k.startswith("2.") else f"backbone.{k}"): v for k, v in params.items()
    }


@pytest.mark.parametrize("chunk_size", [1, None])
def test_anil_conv4_matches_unrolled_reference(chunk_size: int | None) -> None:
    model, batch = _conv4(), _batch((1, 16, 16))
    learner = ANIL(model.backbone, model.head, inner_steps=2, inner_lr=0.5, chunk_size=chunk_size)
    params = dict(model.named_parameters())
    objective = _reference_objective(
        _module_forward(model), params, ["head.weight", "head.bias"], batch, steps=2, lr=0.5
    )
    _assert_close(_learner_grads(learner, batch), _grads_of(objective, params))


def _reference_auto_lr(model: nn.Sequential, batch: TaskBatch, l2: float) -> list[float]:
    """``1 / (½ σ_max([Z_s, 1])² / n + μ)`` per task, ``Z_s`` the support features."""
    lrs = []
    for t in range(batch.num_tasks):
        with torch.no_grad():
            z = model[:2](batch.support_x[t])
        design = torch.cat([z, torch.ones(z.shape[0], 1, dtype=z.dtype)], dim=1)
        sigma = torch.linalg.svdvals(design)[0]
        lrs.append(float(1.0 / (0.5 * sigma**2 / z.shape[0] + l2)))
    return lrs


@pytest.mark.parametrize("chunk_size", [1, None])
@pytest.mark.parametrize("inner_lr", [0.4, "auto"])
def test_itd_bio_matches_unrolled_reference(chunk_size: int | None, inner_lr: float | str) -> None:
    model, batch, l2 = _mlp(), _batch((DIM,)), 0.1
    learner = ITDBiO(
        model[:2], model[2], inner_steps=3, inner_lr=inner_lr, l2=l2, chunk_size=chunk_size
    )
    assert not any(p.requires_grad for p in model[2].parameters())  # the head start is fixed
    lr = _reference_auto_lr(model, batch, l2) if inner_lr == "auto" else inner_lr
    params = dict(model.named_parameters())
    params.update({k: params[k].detach().requires_grad_(True) for k in ("2.weight", "2.bias")})
    objective = _reference_objective(
        _mlp_forward, params, ["2.weight", "2.bias"], batch, steps=3, lr=lr, l2=l2
    )
    expected = {k: v for k, v in _grads_of(objective, params).items() if k.startswith("0.")}
    _assert_close(_learner_grads(learner, batch), _split_names(expected))


# --------------------------------------------------------------------------- iMAML
def _flat_loss(model: nn.Module, x: Tensor, y: Tensor) -> Callable[[Tensor], Tensor]:
    """The mean loss of ``model`` on ``(x, y)`` as a function of its flattened parameters."""
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [s.numel() for s in shapes]

    def loss(flat: Tensor) -> Tensor:
        pieces = torch.split(flat, sizes)
        params = {n: p.view(s) for n, p, s in zip(names, pieces, shapes, strict=True)}
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    return loss


def _func_hessian(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    return torch.func.hessian(fn)(x)


def _autograd_hessian(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Row by row with reverse-over-reverse autograd. Used for BatchNorm networks: on
    torch 2.13 ``torch.func.hessian`` (and ``jacrev(jacrev(·))``) of conv → ``F.batch_norm``
    (training, affine) is silently wrong (asymmetric, off by ~10% against central finite
    differences; cf. pytorch/pytorch#196699), while autograd's double backward matches them."""
    leaf = x.detach().requires_grad_(True)
    grad = torch.autograd.grad(fn(leaf), leaf, create_graph=True)[0]
    basis = torch.eye(len(x), dtype=x.dtype)
    rows = [torch.autograd.grad(grad, leaf, e, retain_graph=True)[0] for e in basis]
    return torch.stack(rows)


def _imaml_dense_reference(
    model: nn.Module,
    batch: TaskBatch,
    *,
    steps: int,
    lr: float,
    reg: float,
    hessian: Callable[[Callable[[Tensor], Tensor], Tensor], Tensor] = _func_hessian,
) -> tuple[Tensor, list[Tensor]]:
    """``(1/B) Σ_t (I + H_t/λ)⁻¹ ∇L^q_t(φ_t)`` densely, and each task's adapted ``φ_t``."""
    theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    total, adapted = torch.zeros_like(theta), []
    for t in range(batch.num_tasks):
        support = _flat_loss(model, batch.support_x[t], batch.support_y[t])
        query = _flat_loss(model, batch.query_x[t], batch.query_y[t])
        phi = theta.clone()
        for _ in range(steps):
            phi = phi - lr * (torch.func.grad(support)(phi) + reg * (phi - theta))
        system = torch.eye(theta.numel(), dtype=theta.dtype) + hessian(support, phi) / reg
        assert torch.linalg.eigvalsh(system).min() > 0.1  # CG's precondition holds here
        total += torch.linalg.solve(system, torch.func.grad(query)(phi))
        adapted.append(phi)
    return total / batch.num_tasks, adapted


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # torch.func.hessian
@pytest.mark.parametrize("chunk_size", [1, None])
def test_imaml_matches_dense_implicit_gradient(chunk_size: int | None) -> None:
    model, batch = _mlp(), _batch((DIM,))
    n_params = sum(p.numel() for p in model.parameters())
    learner = IMAML(
        model,
        inner_steps=3,
        inner_lr=0.1,
        reg=1.0,
        cg_iters=2 * n_params,
        cg_tol=1e-13,
        chunk_size=chunk_size,
    )
    expected, _ = _imaml_dense_reference(model, batch, steps=3, lr=0.1, reg=1.0)
    learner.zero_grad(set_to_none=True)
    stats = learner.compute_meta_gradient(batch)
    actual = torch.nn.utils.parameters_to_vector([p.grad for p in model.parameters()])
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-9)
    assert stats.cg_residual is not None and stats.cg_residual < 1e-10


def test_autograd_hessian_reference_matches_finite_differences() -> None:
    """The Conv4 reference Hessian is checked against central differences of the gradient
    (step 1e-6 in float64: truncation and rounding errors near 1e-9, tolerance 1e-7)."""
    model, batch = _conv4(hidden=2), _batch((1, 16, 16))
    support = _flat_loss(model, batch.support_x[0], batch.support_y[0])
    theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    hessian, eps = _autograd_hessian(support, theta), 1e-6
    for i in (0, 20, 23, 60, 150):
        step = torch.zeros_like(theta)
        step[i] = eps
        column = torch.func.grad(support)(theta + step) - torch.func.grad(support)(theta - step)
        torch.testing.assert_close(hessian[:, i], column / (2 * eps), rtol=0, atol=1e-7)


def test_imaml_conv4_chunk_sizes_agree_and_match_dense() -> None:
    model, batch = _conv4(hidden=2), _batch((1, 16, 16))  # 159 parameters
    expected, _ = _imaml_dense_reference(
        model, batch, steps=2, lr=0.05, reg=50.0, hessian=_autograd_hessian
    )
    for chunk_size in (1, None):
        learner = IMAML(
            model,
            inner_steps=2,
            inner_lr=0.05,
            reg=50.0,
            cg_iters=60,
            cg_tol=1e-13,
            chunk_size=chunk_size,
        )
        learner.zero_grad(set_to_none=True)
        learner.compute_meta_gradient(batch)
        actual = torch.nn.utils.parameters_to_vector([p.grad for p in model.parameters()])
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-9)


# --------------------------------------------------------------------------- predict
def _reference_predictions(
    forward: Forward, params: Params, adapted: list[str], batch: TaskBatch, **kwargs: object
) -> Tensor:
    outs = []
    for t in range(batch.num_tasks):
        phi = _reference_adapt(
            forward, params, adapted, batch.support_x[t], batch.support_y[t], **kwargs
        )
        outs.append(forward(phi, batch.query_x[t]).detach())
    return torch.stack(outs)


@pytest.mark.parametrize("chunk_size", [1, None])
def test_predict_matches_reference_adaptation(chunk_size: int | None) -> None:
    model, batch = _conv4(), _batch((1, 16, 16))
    params, head = dict(model.named_parameters()), ["head.weight", "head.bias"]
    forward = _module_forward(model)
    maml = MAML(model, inner_steps=2, inner_lr=0.3, chunk_size=chunk_size)
    expected = _reference_predictions(
        forward, params, list(params), batch, steps=2, lr=0.3, loss="cross_entropy"
    )
    assert maml.predict(batch).shape == (TASKS, WAYS * QUERIES, WAYS)
    torch.testing.assert_close(maml.predict(batch), expected, rtol=RTOL, atol=ATOL)
    anil = ANIL(model.backbone, model.head, inner_steps=3, inner_lr=0.5, chunk_size=chunk_size)
    expected = _reference_predictions(
        forward, params, head, batch, steps=3, lr=0.5, loss="cross_entropy"
    )
    torch.testing.assert_close(anil.predict(batch), expected, rtol=RTOL, atol=ATOL)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # torch.func.hessian
def test_itd_bio_and_imaml_predict_match_reference() -> None:
    model, batch = _mlp(), _batch((DIM,))
    params = {k: p.detach().requires_grad_(True) for k, p in model.named_parameters()}
    itd = ITDBiO(model[:2], model[2], inner_steps=3, inner_lr=0.4, l2=0.1)
    expected = _reference_predictions(
        _mlp_forward,
        params,
        ["2.weight", "2.bias"],
        batch,
        steps=3,
        lr=0.4,
        loss="cross_entropy",
        l2=0.1,
    )
    torch.testing.assert_close(itd.predict(batch), expected, rtol=RTOL, atol=ATOL)
    model = _mlp()  # ITDBiO froze the head of the previous one; iMAML adapts every parameter
    imaml = IMAML(model, inner_steps=3, inner_lr=0.1, reg=1.0, cg_iters=3)
    _, adapted = _imaml_dense_reference(model, batch, steps=3, lr=0.1, reg=1.0)
    expected = torch.stack(
        [_flat_predict(model, phi, batch.query_x[t]) for t, phi in enumerate(adapted)]
    )
    pred = imaml.predict(batch)
    assert pred.shape == (TASKS, WAYS * QUERIES, WAYS)
    torch.testing.assert_close(pred, expected, rtol=RTOL, atol=ATOL)


def _flat_predict(model: nn.Module, flat: Tensor, x: Tensor) -> Tensor:
    shapes = [p.shape for p in model.parameters()]
    pieces = torch.split(flat, [s.numel() for s in shapes])
    names = [k for k, _ in model.named_parameters()]
    params = {n: p.view(s) for n, p, s in zip(names, pieces, shapes, strict=True)}
    return functional_call(model, params, (x,))


# --------------------------------------------------------------------------- API
def test_meta_step_statistics_and_parameters() -> None:
    model, batch = _mlp(), _batch((DIM,))
    anil = ANIL(model[:2], model[2], inner_steps=2)
    assert {n for n, p in anil.named_parameters() if p.requires_grad} >= {"head.weight"}
    stats = anil.meta_step(batch, torch.optim.SGD(anil.meta_parameters(), lr=0.1))
    assert stats.loss > 0 and stats.accuracy is not None and stats.inner_grad_norm is not None
    itd = ITDBiO(model[:2], model[2], inner_steps=2)
    assert all(not n.startswith("head.") for n, p in itd.named_parameters() if p.requires_grad)
    imaml = IMAML(_mlp(), inner_steps=2, cg_iters=3)
    stats = imaml.meta_step(batch, torch.optim.SGD(imaml.meta_parameters(), lr=0.1))
    assert stats.cg_residual is not None and not stats.skipped


_BUILDERS: dict[str, Callable[..., ChunkedLearner]] = {
    "maml": lambda **kw: MAML(_mlp(), **kw),
    "fomaml": lambda **kw: FOMAML(_mlp(), **kw),
    "anil": lambda **kw: ANIL(_mlp()[:2], _mlp()[2], **kw),
    "itd_bio": lambda **kw: ITDBiO(_mlp()[:2], _mlp()[2], **kw),
    "imaml": lambda **kw: IMAML(_mlp(), **kw),
}


@pytest.mark.parametrize("name", sorted(_BUILDERS))
@pytest.mark.parametrize(
    "kwargs,error,argument",
    [
        ({"inner_steps": -1}, ValueError, "inner_steps"),
        ({"inner_steps": 1.5}, TypeError, "inner_steps"),
        ({"inner_lr": 0.0}, ValueError, "inner_lr"),
        ({"inner_lr": -0.1}, ValueError, "inner_lr"),
        ({"inner_lr": float("nan")}, ValueError, "inner_lr"),
        ({"loss": "hinge"}, ValueError, "loss"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
    ],
)
def test_bad_arguments_name_the_argument(
    name: str, kwargs: dict[str, object], error: type[Exception], argument: str
) -> None:
    with pytest.raises(error, match=argument):
        _BUILDERS[name](**kwargs)


@pytest.mark.parametrize(
    "kwargs,error,argument",
    [
        ({"reg": 0.0}, ValueError, "reg"),
        ({"reg": -1.0}, ValueError, "reg"),
        ({"cg_iters": 0}, ValueError, "cg_iters"),
        ({"cg_iters": 2.0}, TypeError, "cg_iters"),
    ],
)
def test_imaml_bad_arguments(
    kwargs: dict[str, object], error: type[Exception], argument: str
) -> None:
    with pytest.raises(error, match=argument):
        IMAML(_mlp(), **kwargs)


def test_inner_lr_auto_needs_linear_head_and_is_not_for_maml() -> None:
    with pytest.raises(TypeError, match="inner_lr"):
        MAML(_mlp(), inner_lr="auto")
    with pytest.raises(ValueError, match="inner_lr"):
        ITDBiO(_mlp()[:1], nn.Sequential(nn.Linear(5, 3)), inner_lr="auto")
    with pytest.raises(ValueError, match="l2"):
        ITDBiO(_mlp()[:2], _mlp()[2], l2=-1.0)


# --------------------------------------------------------------------------- keyword options
# Each algorithm's keyword options and defaults, as the README's table and the CLI's help state
# them; they live once, in the algorithm's options dataclass.
_EXPECTED_DEFAULTS: dict[str, dict[str, object]] = {
    "mrml": {
        "inner_solver": "newton",
        "inner_steps": 50,
        "inner_tol": 1e-6,
        "inner_lr": "auto",
        "cg_iters": 20,
        "cg_tol": 0.0,
        "exact_v": True,
        "l2": 0.03,
        "loss": "cross_entropy",
        "warm_start_head": False,
        "warm_start_cg": False,
        "learn_head_init": False,
        "chunk_size": 1,
        "meta_lr": 3e-3,
    },
    "itd-bio": {
        "inner_steps": 20,
        "inner_lr": "auto",
        "l2": 0.03,
        "first_order": False,
        "meta_lr": 3e-3,
    },
    "anil": {"inner_steps": 10, "inner_lr": 0.05, "first_order": False, "meta_lr": 1e-3},
    "maml": {"inner_steps": 1, "inner_lr": 0.4, "first_order": False, "meta_lr": 3e-3},
    "fomaml": {"inner_steps": 10, "inner_lr": 0.1, "meta_lr": 1e-3},
    "imaml": {
        "inner_steps": 10,
        "inner_lr": 0.1,
        "reg": 0.5,
        "cg_iters": 5,
        "cg_tol": 0.0,
        "meta_lr": 1e-3,
    },
}
_COMMON_DEFAULTS = {"loss": "cross_entropy", "chunk_size": 1}


@pytest.mark.parametrize("name", sorted(_EXPECTED_DEFAULTS))
def test_defaults_signature_and_options_agree(name: str) -> None:
    """``algorithm_defaults``, the class's signature (``help``) and a default-built learner's
    ``options`` all show the same options and defaults."""
    expected = {**_COMMON_DEFAULTS, **_EXPECTED_DEFAULTS[name]}
    assert algorithm_defaults(name) == expected
    keywords = {
        p.name: p.default
        for p in inspect.signature(algorithm_class(name)).parameters.values()
        if p.kind is p.KEYWORD_ONLY
    }
    assert keywords == expected
    learner = _BUILDERS[name.replace("-", "_")]() if name != "mrml" else _mrml()
    assert {k: getattr(learner.options, k) for k in expected} == expected


_TUNING = Path(__file__).parents[1] / "benchmarks/results/fair_tuning_5way1shot_grid3x3.json"
_TUNED_KEYS = {"lr": "meta_lr"}  # the tuning grid's names that differ from the options' names


def test_tuned_defaults_are_the_tuning_studys_selection() -> None:
    """Every default marked "tuned" is the configuration the committed tuning study selected
    on the validation split, for every method it tuned."""
    selected = json.loads(_TUNING.read_text())["selected"]
    assert set(selected) == set(_EXPECTED_DEFAULTS)
    for name, config in selected.items():
        tuned = {_TUNED_KEYS.get(k, k): v for k, v in config.items()}
        defaults = algorithm_defaults(name)
        assert {k: defaults[k] for k in tuned} == tuned, name


def _mrml() -> ChunkedLearner:
    return MemoryReduced(_mlp()[:2], _mlp()[2])


@pytest.mark.parametrize("name", sorted(_BUILDERS))
def test_unknown_option_names_the_valid_ones(name: str) -> None:
    with pytest.raises(TypeError, match=r"has no option inner_stpes; valid options: .*inner_steps"):
        _BUILDERS[name](inner_stpes=3)


def test_fixed_settings_are_not_options() -> None:
    """ANIL always meta-learns its head's start, FOMAML is always first order: neither takes
    the setting as an option, and the options of a built learner cannot be changed."""
    with pytest.raises(TypeError, match="FOMAML has no option first_order"):
        FOMAML(_mlp(), first_order=False)
    with pytest.raises(TypeError, match="ANIL has no option learn_head_init"):
        ANIL(_mlp()[:2], _mlp()[2], learn_head_init=False)
    learner = ANIL(_mlp()[:2], _mlp()[2])
    assert learner.options.learn_head_init and learner.options.l2 == 0.0
    assert all(p.requires_grad for p in learner.head.parameters())
    with pytest.raises(dataclasses.FrozenInstanceError):
        learner.options.inner_steps = 3  # type: ignore[misc]


def test_docstring_examples_run() -> None:
    """The usage examples of the learners' docstrings run as written."""
    for module in (base, anil, itd_bio, maml, imaml, memory_reduced):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.attempted > 0 and result.failed == 0, module.__name__
