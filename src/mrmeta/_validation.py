"""Checks at the API boundary: each error names the argument, what is allowed and what came."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor


def check_positive_int(name: str, value: object, *, minimum: int = 1) -> int:
    """``value`` as an int ``≥ minimum``, else TypeError/ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return value


def check_finite_number(name: str, value: object, *, positive: bool = False) -> float:
    """``value`` as a finite float ``≥ 0`` (``> 0`` when ``positive``), else a clear error."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return float(value)


def check_tensor_dict(name: str, tensors: object) -> dict[str, Tensor]:
    """A non-empty ``dict[str, Tensor]`` of floating tensors, else TypeError/ValueError."""
    if not isinstance(tensors, Mapping):
        raise TypeError(f"{name} must be a dict of str -> Tensor, got {type(tensors).__name__}")
    if not tensors:
        raise ValueError(f"{name} must hold at least one tensor, got an empty dict")
    for key, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}[{key!r}] must be a torch.Tensor, got {type(t).__name__}")
        if not torch.is_floating_point(t):
            raise TypeError(
                f"{name}[{key!r}] has dtype {t.dtype}; use a floating dtype "
                "(float32 or float64), e.g. tensor.double()"
            )
    return dict(tensors)


def check_loss_call(
    name: str, loss: Callable[..., Tensor], theta: Mapping[str, Tensor], phi: Mapping[str, Tensor]
) -> Tensor:
    """Call ``loss(theta, phi)`` and check it returns a scalar; turn a key/shape failure into a
    ValueError that says which loss rejected which inputs."""
    try:
        value = loss(theta, phi)
    except torch.OutOfMemoryError:
        raise
    except (KeyError, RuntimeError, IndexError) as err:
        shapes = {k: tuple(v.shape) for k, v in {**theta, **phi}.items()}
        raise ValueError(
            f"{name}(theta, phi) failed on the given dicts (keys and shapes {shapes}): "
            f"{type(err).__name__}: {err}. Pass theta/phi with the keys and shapes the loss expects"
        ) from err
    if not isinstance(value, Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(
            f"{name} must return a scalar tensor, got {shape}; reduce it (e.g. .mean())"
        )
    return value.reshape(())
