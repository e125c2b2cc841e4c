"""MemoryReduced (Algorithm 1) against a reference written here with plain autograd, float64.

Reference per task: features by calling the backbone on that task alone, K gradient steps by hand,
the dense Hessian of g in φ (torch.func.hessian), ``v = H⁻¹ ∇_φ f`` by torch.linalg.solve, the
mixed term ``∇²_{θφ} g · v`` by autograd through the backbone, the mean over tasks, then
``θ − η ĝ`` (SGD). The learner runs CG for dim(φ) steps, so it is exact up to rounding.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, hessian

from mrmeta import Conv4, Conv4Backbone, MemoryReduced, TaskBatch
from mrmeta.memory import measure_peak_memory

F64 = torch.float64
WAYS, FEATURES, TASKS, N_SUPPORT, N_QUERY = 3, 4, 4, 6, 6
PHI_DIM = WAYS * (FEATURES + 1)
ETA = 0.5  # SGD step
# float64; CG with dim(φ) steps on a Hessian with condition number ~10-30 is exact to ~1e-12.
TOL = 1e-8


def _setup(kind: str = "mlp", seed: int = 0) -> tuple[nn.Module, nn.Module, TaskBatch]:
    torch.manual_seed(seed)
    if kind == "mlp":  # no `supports_task_batches`: the learner calls it once per task
        backbone: nn.Module = nn.Sequential(nn.Linear(3, FEATURES), nn.Tanh())
        shape: tuple[int, ...] = (3,)
    else:
        backbone, shape = Conv4Backbone(in_channels=1, hidden=FEATURES, image_size=16), (1, 16, 16)
    head = nn.Linear(FEATURES, WAYS)
    return backbone.double(), head.double(), _batch(shape)


def _batch(shape: tuple[int, ...]) -> TaskBatch:
    labels_s = (torch.arange(N_SUPPORT) % WAYS).repeat(TASKS, 1)
    labels_q = torch.randperm(N_QUERY).remainder(WAYS).repeat(TASKS, 1)
    xs, xq = torch.randn(TASKS, N_SUPPORT, *shape), torch.randn(TASKS, N_QUERY, *shape)
    return TaskBatch(xs.double(), labels_s, xq.double(), labels_q)


Phi = list[Tensor]  # [W (WAYS, FEATURES), b (WAYS,)]


def _lower(zs: Tensor, ys: Tensor, l2: float, center: Phi) -> Callable[[Phi], Tensor]:
    """``g(φ) = CE(Z_s Wᵀ + b, y_s) + μ/2 ‖φ − c‖²``."""

    def g(phi: Phi) -> Tensor:
        penalty = sum((p - c).pow(2).sum() for p, c in zip(phi, center, strict=True))
        return F.cross_entropy(zs @ phi[0].T + phi[1], ys) + 0.5 * l2 * penalty

    return g


def _as_phi(vec: Tensor) -> Phi:
    return [vec[: WAYS * FEATURES].view(WAYS, FEATURES), vec[WAYS * FEATURES :]]


def _gd(g: Callable[[Phi], Tensor], phi: Phi, steps: int, lr: float | Tensor) -> Phi:
    """``steps`` plain gradient steps, no graph kept."""
    for _ in range(steps):
        leaves = [p.detach().requires_grad_(True) for p in phi]
        grads = torch.autograd.grad(g(leaves), leaves)
        phi = [(p - lr * d).detach() for p, d in zip(leaves, grads, strict=True)]
    return phi


def _implicit_term(
    zs: Tensor, zq: Tensor, task: tuple, phi: Phi, l2: float, center: Phi, params: list[Tensor]
) -> tuple[Tensor, ...]:
    """``∇²_{θφ} g · v`` with ``v = H⁻¹ ∇_φ f`` from the dense Hessian ``H = ∇²_φ g``."""
    _, ys, _, yq = task
    g_fixed = _lower(zs.detach(), ys, l2, [c.detach() for c in center])
    pv = torch.cat([p.reshape(-1) for p in phi])
    rhs = grad(lambda x: F.cross_entropy(zq.detach() @ _as_phi(x)[0].T + _as_phi(x)[1], yq))(pv)
    v = torch.linalg.solve(hessian(lambda x: g_fixed(_as_phi(x)))(pv), rhs)
    leaves = [p.clone().requires_grad_(True) for p in phi]
    grad_phi = torch.autograd.grad(_lower(zs, ys, l2, center)(leaves), leaves, create_graph=True)
    return torch.autograd.grad(torch.cat([d.reshape(-1) for d in grad_phi]) @ v, params)


def _reference_task(
    backbone: nn.Module,
    head: nn.Module,
    task: tuple,
    phi0: Phi,
    *,
    steps: int,
    lr: float | str,
    l2: float,
    cg: int,
    learn_init: bool,
) -> tuple[list[Tensor], Phi, Tensor]:
    """Meta-gradient of one task (list over params), its φ^K and its query loss."""
    xs, ys, xq, yq = task
    params = list(backbone.parameters()) + (list(head.parameters()) if learn_init else [])
    zs, zq = backbone(xs), backbone(xq)  # this task alone: BatchNorm statistics per task
    center = list(head.parameters()) if learn_init else [torch.zeros_like(p) for p in phi0]
    if lr == "auto":  # 1/L, L = ½‖[Z_s, 1]‖₂²/n + μ
        design = torch.cat([zs.detach(), torch.ones(len(zs), 1, dtype=F64)], 1)
        lr = 1.0 / (0.5 * torch.linalg.matrix_norm(design, ord=2) ** 2 / len(zs) + l2)
    phi = _gd(_lower(zs.detach(), ys, l2, [c.detach() for c in center]), phi0, steps, lr)
    query_loss = F.cross_entropy(zq @ phi[0].T + phi[1], yq)
    grads = torch.autograd.grad(query_loss, params, allow_unused=True, retain_graph=True)
    grads = [torch.zeros_like(p) if d is None else d for p, d in zip(params, grads, strict=True)]
    if cg:
        mixed = _implicit_term(zs, zq, task, phi, l2, center, params)
        grads = [d - m for d, m in zip(grads, mixed, strict=True)]
    return grads, phi, query_loss.detach()


def _reference(
    backbone: nn.Module,
    head: nn.Module,
    batch: TaskBatch,
    phi0s: list[Phi] | None = None,
    **kw: Any,
) -> tuple[list[Tensor], list[Phi], float]:
    """Mean meta-gradient over tasks, the φ^K of every slot, the mean query loss."""
    total, phis, losses = None, [], []
    for t in range(batch.num_tasks):
        task = tuple(x[t] for x in batch.fields())
        phi0 = [p.detach() for p in head.parameters()] if phi0s is None else phi0s[t]
        grads, phi, loss = _reference_task(backbone, head, task, phi0, **kw)
        total = grads if total is None else [a + b for a, b in zip(total, grads, strict=True)]
        phis.append(phi)
        losses.append(loss)
    return [t / batch.num_tasks for t in total], phis, float(torch.stack(losses).mean())


def _sgd_reference(
    backbone: nn.Module,
    head: nn.Module,
    batch: TaskBatch,
    phi0s: list[Phi] | None = None,
    **kw: Any,
) -> tuple[list[Tensor], list[Phi], float]:
    """Parameters after one SGD step on the reference meta-gradient (on copies)."""
    backbone, head = copy.deepcopy(backbone), copy.deepcopy(head)
    grads, phis, loss = _reference(backbone, head, batch, phi0s, **kw)
    params = list(backbone.parameters()) + (list(head.parameters()) if kw["learn_init"] else [])
    return [(p - ETA * d).detach() for p, d in zip(params, grads, strict=True)], phis, loss


def _learner_params(learner: MemoryReduced, learn_init: bool) -> list[Tensor]:
    head = list(learner.head.parameters()) if learn_init else []
    return [p.detach().clone() for p in [*learner.backbone.parameters(), *head]]


def _assert_close(got: list[Tensor], want: list[Tensor], before: list[Tensor]) -> None:
    """Updates ``got − before`` and ``want − before`` agree to TOL relative."""
    delta_got = torch.cat([(g - b).reshape(-1) for g, b in zip(got, before, strict=True)])
    delta_want = torch.cat([(w - b).reshape(-1) for w, b in zip(want, before, strict=True)])
    assert delta_want.norm() > 0
    assert float((delta_got - delta_want).norm() / delta_want.norm()) < TOL


def _step_and_compare(
    kind: str,
    *,
    learn_init: bool = False,
    chunk_size: int | None = 1,
    closed_form: bool = True,
    **options: Any,
) -> MemoryReduced:
    backbone, head, batch = _setup(kind)
    kw = {"steps": 5, "lr": 0.3, "l2": 0.1, "cg": PHI_DIM} | options
    learner = MemoryReduced(
        backbone,
        head,
        inner_steps=kw["steps"],
        inner_lr=kw["lr"],
        l2=kw["l2"],
        cg_iters=kw["cg"],
        learn_head_init=learn_init,
        chunk_size=chunk_size,
        closed_form=closed_form,
    )
    assert learner.uses_closed_form == closed_form
    before = _learner_params(learner, learn_init)
    want, _, loss = _sgd_reference(
        learner.backbone, learner.head, batch, learn_init=learn_init, **kw
    )
    stats = learner.meta_step(batch, torch.optim.SGD(learner.meta_parameters(), lr=ETA))
    assert not stats.skipped
    assert stats.loss == pytest.approx(loss, rel=1e-12)  # same φ^K, same loss (float64)
    _assert_close(_learner_params(learner, learn_init), want, before)
    return learner


@pytest.mark.parametrize("closed_form", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 2, None])
@pytest.mark.parametrize("kind", ["mlp", "conv4"])
def test_meta_step_matches_reference(kind: str, chunk_size: int | None, closed_form: bool) -> None:
    """Both head paths — closed form (mrmeta._linear_ce) and autograd — against the reference."""
    _step_and_compare(kind, chunk_size=chunk_size, closed_form=closed_form)


@pytest.mark.parametrize("closed_form", [True, False])
def test_learn_head_init_on_both_head_paths(closed_form: bool) -> None:
    _step_and_compare("conv4", learn_init=True, chunk_size=2, closed_form=closed_form)


@pytest.mark.parametrize("kind", ["mlp", "conv4"])
def test_auto_inner_lr_matches_reference(kind: str) -> None:
    _step_and_compare(kind, lr="auto", chunk_size=None)


def test_head_is_frozen_unless_learned() -> None:
    learner = _step_and_compare("mlp")
    backbone, head, _ = _setup("mlp")  # same seed: the parameters before the step
    assert torch.equal(learner.head.weight, head.weight) and learner.head.weight.grad is None
    assert not torch.equal(learner.backbone[0].weight, backbone[0].weight)


def test_learn_head_init_sends_the_gradient_to_the_head() -> None:
    learner = _step_and_compare("mlp", learn_init=True, chunk_size=2)
    assert learner.head.weight.grad is not None and learner.head.weight.grad.abs().max() > 0


@pytest.mark.parametrize("closed_form", [True, False])
def test_cg_iters_zero_on_both_head_paths(closed_form: bool) -> None:
    _step_and_compare("conv4", cg=0, l2=0.1, chunk_size=2, closed_form=closed_form)


def test_cg_iters_zero_uses_only_the_direct_gradient() -> None:
    _step_and_compare("mlp", cg=0, l2=0.0)


def test_warm_start_head_starts_from_the_previous_solution_of_the_slot() -> None:
    backbone, head, batch1 = _setup("mlp")
    batch2 = _batch((3,))
    kw = {"steps": 3, "lr": 0.3, "l2": 0.1, "cg": PHI_DIM, "learn_init": False}
    learner = MemoryReduced(
        backbone,
        head,
        inner_steps=3,
        inner_lr=0.3,
        l2=0.1,
        cg_iters=PHI_DIM,
        warm_start_head=True,
        chunk_size=3,
    )
    optimizer = torch.optim.SGD(learner.meta_parameters(), lr=ETA)
    ref_backbone = copy.deepcopy(backbone)
    _, phis, _ = _sgd_reference(ref_backbone, head, batch1, **kw)
    learner.meta_step(batch1, optimizer)
    ref_backbone.load_state_dict(learner.backbone.state_dict())  # checked by the tests above
    before = _learner_params(learner, False)
    want, _, _ = _sgd_reference(ref_backbone, head, batch2, phi0s=phis, **kw)
    cold, _, _ = _sgd_reference(ref_backbone, head, batch2, **kw)
    learner.meta_step(batch2, optimizer)
    _assert_close(_learner_params(learner, False), want, before)
    diff = max(float((w - c).abs().max()) for w, c in zip(want, cold, strict=True))
    assert diff > 1e-6  # K = 3 is far from converged: the start matters, so the test can fail


def _two_steps(cg_iters: int, warm_start_cg: bool) -> list[Tensor]:
    backbone, head, batch1 = _setup("mlp")
    batch2 = _batch((3,))
    learner = MemoryReduced(
        backbone,
        head,
        inner_steps=5,
        inner_lr=0.3,
        l2=0.1,
        cg_iters=cg_iters,
        warm_start_cg=warm_start_cg,
        chunk_size=None,
    )
    optimizer = torch.optim.SGD(learner.meta_parameters(), lr=ETA)
    learner.meta_step(batch1, optimizer)
    after_first = _learner_params(learner, False)
    learner.meta_step(batch2, optimizer)
    return [*after_first, *_learner_params(learner, False)]


def test_warm_start_cg_changes_the_start_but_not_the_exact_solution() -> None:
    n_params = 2
    cold, warm = _two_steps(2, False), _two_steps(2, True)
    for a, b in zip(cold[:n_params], warm[:n_params], strict=True):  # first step: no saved v
        assert torch.equal(a, b)
    assert max(float((a - b).abs().max()) for a, b in zip(cold, warm, strict=True)) > 1e-6
    cold, warm = _two_steps(PHI_DIM, False), _two_steps(PHI_DIM, True)
    for a, b in zip(cold, warm, strict=True):  # exact CG: the start does not matter (TOL)
        torch.testing.assert_close(a, b, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("kind", ["mlp", "conv4"])
def test_predict_returns_the_reference_adapted_logits(kind: str) -> None:
    backbone, head, batch = _setup(kind)
    learner = MemoryReduced(backbone, head, inner_steps=4, l2=0.1, chunk_size=3)
    logits = learner.predict(batch)
    assert logits.shape == (TASKS, N_QUERY, WAYS)
    kw = {"steps": 4, "lr": "auto", "l2": 0.1, "cg": 0, "learn_init": False}
    _, phis, _ = _reference(backbone, head, batch, **kw)
    for t, (weight, bias) in enumerate(phis):
        with torch.no_grad():
            want = backbone(batch.query_x[t]) @ weight.T + bias
        torch.testing.assert_close(logits[t], want, rtol=1e-10, atol=1e-12)  # float64


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_inner_steps() -> None:
    torch.manual_seed(0)
    model = Conv4(ways=5, in_channels=1, hidden=16, image_size=28)
    batch = TaskBatch(
        torch.randn(4, 5, 1, 28, 28),
        torch.arange(5).repeat(4, 1),
        torch.randn(4, 25, 1, 28, 28),
        torch.arange(5).repeat(4, 5),
    )
    peaks = {}
    for steps in (5, 40):
        learner = MemoryReduced(model.backbone, model.head, inner_steps=steps, chunk_size=1)
        model.zero_grad(set_to_none=True)
        peaks[steps] = measure_peak_memory(lambda lr=learner: lr.compute_meta_gradient(batch))
    assert peaks[5] > 0
    # The K inner steps keep no graph: 8× more steps, same peak within 2%.
    assert peaks[40] == pytest.approx(peaks[5], rel=0.02)
