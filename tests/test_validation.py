"""Bad input fails at the API boundary with ValueError/TypeError naming the argument."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from mrmeta import Conv4Backbone, MemoryReduced, conjugate_gradient, hypergradient


def _losses() -> tuple[object, object, dict[str, Tensor], dict[str, Tensor]]:
    torch.manual_seed(0)
    x = torch.randn(6, 3)

    def f(theta: dict[str, Tensor], phi: dict[str, Tensor]) -> Tensor:
        return (x @ theta["w"] @ phi["v"]).pow(2).mean()

    def g(theta: dict[str, Tensor], phi: dict[str, Tensor]) -> Tensor:
        return (x @ theta["w"] @ phi["v"] - 1).pow(2).mean() + phi["v"].pow(2).sum()

    return f, g, {"w": torch.randn(3, 2)}, {"v": torch.randn(2)}


def test_hypergradient_reports_keys_the_losses_do_not_accept() -> None:
    f, g, theta, phi = _losses()
    with pytest.raises(ValueError, match=r"outer_loss\(theta, phi\) failed.*KeyError"):
        hypergradient(f, g, {"weights": theta["w"]}, phi)
    with pytest.raises(ValueError, match=r"outer_loss\(theta, phi\) failed.*keys"):
        hypergradient(f, g, theta, {"u": phi["v"]})


def test_hypergradient_reports_wrong_shapes() -> None:
    f, g, theta, phi = _losses()
    with pytest.raises(ValueError, match=r"outer_loss\(theta, phi\) failed.*shapes"):
        hypergradient(f, g, {"w": torch.randn(4, 2)}, phi)
    with pytest.raises(ValueError, match=r"outer_loss\(theta, phi\) failed"):
        hypergradient(f, g, theta, {"v": torch.randn(5)})


def test_hypergradient_rejects_a_non_scalar_loss() -> None:
    f, g, theta, phi = _losses()

    def per_example(th: dict[str, Tensor], ph: dict[str, Tensor]) -> Tensor:
        return torch.ones(6, 3) @ th["w"] @ ph["v"]  # (6,): forgot to reduce

    with pytest.raises(ValueError, match=r"outer_loss must return a scalar.*\(6,\)"):
        hypergradient(per_example, g, theta, phi)
    with pytest.raises(ValueError, match=r"inner_loss must return a scalar"):
        hypergradient(f, per_example, theta, phi)


def test_hypergradient_rejects_integer_tensors_and_non_dicts() -> None:
    f, g, theta, phi = _losses()
    with pytest.raises(TypeError, match=r"theta\['w'\] has dtype torch.int64.*floating"):
        hypergradient(f, g, {"w": torch.ones(3, 2, dtype=torch.long)}, phi)
    with pytest.raises(TypeError, match=r"phi\['v'\] has dtype torch.int32.*floating"):
        hypergradient(f, g, theta, {"v": torch.ones(2, dtype=torch.int32)})
    with pytest.raises(TypeError, match=r"theta must be a dict"):
        hypergradient(f, g, [theta["w"]], phi)
    with pytest.raises(ValueError, match=r"phi must hold at least one tensor"):
        hypergradient(f, g, theta, {})


@pytest.mark.parametrize("cg_iters", [0, -3])
def test_hypergradient_rejects_cg_iters_below_one(cg_iters: int) -> None:
    f, g, theta, phi = _losses()
    with pytest.raises(ValueError, match=rf"cg_iters must be an integer >= 1, got {cg_iters}"):
        hypergradient(f, g, theta, phi, cg_iters=cg_iters)
    with pytest.raises(TypeError, match=r"cg_iters must be an integer"):
        hypergradient(f, g, theta, phi, cg_iters=2.0)


def test_conjugate_gradient_rejects_bad_iters_and_tol() -> None:
    b = {"x": torch.ones(3)}
    with pytest.raises(ValueError, match=r"iters must be an integer >= 1, got 0"):
        conjugate_gradient(lambda v: v, b, iters=0)
    with pytest.raises(TypeError, match=r"iters must be an integer"):
        conjugate_gradient(lambda v: v, b, iters=True)
    with pytest.raises(ValueError, match=r"tol must be >= 0"):
        conjugate_gradient(lambda v: v, b, tol=-1e-3)
    with pytest.raises(TypeError, match=r"b\['x'\] has dtype torch.int64"):
        conjugate_gradient(lambda v: v, {"x": torch.ones(3, dtype=torch.long)})


def test_conjugate_gradient_rejects_nan_tol() -> None:
    """``tol=nan`` makes every ``residual > tol`` comparison false: the solver silently runs zero
    iterations and returns the start. Fails on the current code (``tol < 0`` lets NaN through)."""
    with pytest.raises(ValueError, match=r"tol"):
        conjugate_gradient(lambda v: v, {"x": torch.ones(3)}, tol=float("nan"))


def _learner(**kwargs: object) -> MemoryReduced:
    torch.manual_seed(0)
    return MemoryReduced(nn.Sequential(nn.Linear(3, 4), nn.Tanh()), nn.Linear(4, 2), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"inner_steps": -1}, ValueError, r"inner_steps must be an integer >= 0, got -1"),
        ({"inner_steps": 2.5}, TypeError, r"inner_steps must be an integer"),
        ({"cg_iters": -1}, ValueError, r"cg_iters must be an integer >= 0, got -1"),
        ({"inner_lr": 0.0}, ValueError, r"inner_lr must be > 0, got 0.0"),
        ({"inner_lr": -0.1}, ValueError, r"inner_lr must be > 0"),
        ({"inner_lr": float("nan")}, ValueError, r"inner_lr must be finite"),
        ({"inner_lr": float("inf")}, ValueError, r"inner_lr must be finite"),
        ({"inner_lr": "fast"}, TypeError, r"inner_lr must be a number"),
        ({"l2": -0.1}, ValueError, r"l2 must be >= 0"),
        ({"loss": "hinge"}, ValueError, r"loss must be one of cross_entropy, mse; got 'hinge'"),
        ({"chunk_size": 0}, ValueError, r"chunk_size must be an integer >= 1"),
        ({"cg_tol": float("nan")}, ValueError, r"cg_tol must be finite"),
    ],
)
def test_memory_reduced_rejects_bad_options(kwargs: dict, error: type, pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        _learner(**kwargs)


def test_memory_reduced_auto_inner_lr_needs_a_linear_head() -> None:
    head = nn.Sequential(nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"inner_lr='auto' needs an nn.Linear head.*Sequential"):
        MemoryReduced(nn.Linear(3, 4), head, inner_lr="auto")
    MemoryReduced(nn.Linear(3, 4), head, inner_lr=0.1)  # a number is fine with any head


def test_conv4_rejects_images_too_small_for_four_poolings() -> None:
    with pytest.raises(ValueError, match=r"image_size must be >= 16.*got 8"):
        Conv4Backbone(image_size=8)
