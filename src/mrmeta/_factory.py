"""Build the model, the learner and the optimizer a :class:`TrainConfig` describes."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mrmeta.algorithms.base import MetaLearner
from mrmeta.algorithms.memory_reduced import MemoryReduced
from mrmeta.config import ConfigError, TrainConfig
from mrmeta.models import Conv4


def build_model(config: TrainConfig, image_shape: tuple[int, ...]) -> Conv4:
    """Conv4 for ``image_shape = (C, H, W)`` with a zero-initialised head."""
    channels, height, width = image_shape
    if height != width:
        raise ConfigError(f"Conv4 needs square images, the dataset has {height}x{width}")
    return Conv4(config.ways, channels, config.hidden, height, zero_head=True)


def _inner_lr(config: TrainConfig, default: float | str) -> float | str:
    return default if config.inner_lr is None else config.inner_lr


def _mrml(config: TrainConfig, model: Conv4) -> MetaLearner:
    return MemoryReduced(
        model.backbone,
        model.head,
        inner_steps=config.inner_steps,
        inner_lr=_inner_lr(config, "auto"),
        cg_iters=config.cg_iters,
        l2=config.l2,
        warm_start_head=config.warm_start_head,
        warm_start_cg=config.warm_start_cg,
        learn_head_init=config.learn_head_init,
        chunk_size=config.chunk_size,
    )


_BUILDERS: dict[str, Callable[[TrainConfig, Conv4], MetaLearner]] = {"mrml": _mrml}


def register_builder(name: str, builder: Callable[[TrainConfig, Conv4], MetaLearner]) -> None:
    """Make ``--algo name`` build a learner with ``builder(config, model)``."""
    _BUILDERS[name] = builder


def build_learner(config: TrainConfig, model: Conv4) -> MetaLearner:
    """The meta-learner named by ``config.algo`` on ``model``."""
    if config.algo not in _BUILDERS:
        raise ConfigError(
            f"algorithm {config.algo!r} is not available; choose one of {', '.join(_BUILDERS)}"
        )
    try:
        return _BUILDERS[config.algo](config, model)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"--algo {config.algo}: {err}") from err


def build_optimizer(config: TrainConfig, learner: nn.Module) -> torch.optim.Optimizer:
    """Adam or SGD over the learner's meta-parameters at ``config.lr``."""
    params = list(learner.meta_parameters())
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr)
    return torch.optim.SGD(params, lr=config.lr)
