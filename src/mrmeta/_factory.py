"""Build the model, the learner and the optimizer a :class:`TrainConfig` describes."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch
from torch import nn

from mrmeta.algorithms import algorithm_class, algorithm_defaults, splits_head
from mrmeta.algorithms.base import MetaLearner
from mrmeta.config import ALGORITHM_OPTIONS, ConfigError, TrainConfig
from mrmeta.models import Conv4, ResNet12, resnet12_widths, split_model

LAST_BLOCK_DEFAULTS = {"inner_solver": "gd", "inner_lr": 0.1}
"""The lower level of ``adapt = "last-block"`` where the config leaves it unset: gradient steps
of a fixed size. ``"auto"`` needs a linear head's curvature bound, which a conv block does not
have, and Newton-CG does not converge on its non-convex lower level (README, Backbones)."""


def build_model(config: TrainConfig, image_shape: tuple[int, ...]) -> Conv4 | ResNet12:
    """The ``config.backbone`` model for ``image_shape = (C, H, W)``, head zero-initialised.

    ``conv4``: ``config.hidden`` filters per layer. ``resnet12``: block widths
    :func:`~mrmeta.models.resnet12_widths` of ``config.hidden`` (64 → 64-160-320-640).
    """
    if len(image_shape) != 3 or image_shape[1] != image_shape[2]:
        raise ConfigError(
            f"--backbone {config.backbone} needs square images (C, H, W); dataset "
            f"{config.dataset!r} gives {image_shape}"
        )
    channels, side, _ = image_shape
    if config.backbone == "resnet12":
        widths = resnet12_widths(config.hidden)
        return ResNet12(config.ways, channels, widths, side, zero_head=True)
    return Conv4(config.ways, channels, config.hidden, side, zero_head=True)


def learner_options(config: TrainConfig) -> dict[str, Any]:
    """The constructor options ``config`` sets for its algorithm (unset ones are left out)."""
    accepted = algorithm_defaults(config.algo)
    options = {"chunk_size": config.chunk_size}
    for name in ALGORITHM_OPTIONS:
        value = getattr(config, name)
        if name in accepted and value is not None:
            options[name] = value
    if config.adapt == "last-block":
        for name, value in LAST_BLOCK_DEFAULTS.items():
            if name in accepted:
                options.setdefault(name, value)
    return options


def effective_config(config: TrainConfig) -> TrainConfig:
    """``config`` with each algorithm option it leaves unset (``None``) set to the value its
    learner will use (the algorithm's default, or :data:`LAST_BLOCK_DEFAULTS`), and ``lr`` to
    the algorithm's ``meta_lr``: what a run saves, so that resuming or testing it, or reading its
    ``config.json``, never depends on the defaults of a later version."""
    accepted, chosen = algorithm_defaults(config.algo), learner_options(config)
    filled = {
        name: chosen.get(name, accepted[name])
        for name in ALGORITHM_OPTIONS
        if getattr(config, name) is None and name in accepted
    }
    return config.replace(**filled, lr=meta_lr(config))


def resolved(config: TrainConfig, name: str) -> Any:
    """``config.<name>``, or the algorithm's default when the config leaves it unset."""
    if name == "lr":
        return meta_lr(config)
    value = getattr(config, name)
    return algorithm_defaults(config.algo).get(name) if value is None else value


def build_learner(config: TrainConfig, model: Conv4) -> MetaLearner:
    """The meta-learner named by ``config.algo`` on ``model``."""
    try:
        cls = algorithm_class(config.algo)
        if splits_head(config.algo):
            backbone, head = split_model(model, config.adapt)
            return cls(backbone, head, **learner_options(config))
        return cls(model, **learner_options(config))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"--algo {config.algo}: {_as_flags(str(err))}") from err


def _as_flags(message: str) -> str:
    """``message`` with a leading option name as its flag (``inner_lr`` → ``--inner-lr``)."""
    first, _, rest = message.partition(" ")
    if first in {f.name for f in fields(TrainConfig)}:
        return f"--{first.replace('_', '-')} {rest}"
    return message


def build_optimizer(config: TrainConfig, learner: MetaLearner | nn.Module) -> torch.optim.Optimizer:
    """Adam or SGD over the learner's meta-parameters at ``config.lr`` (unset: the algorithm's
    ``meta_lr``)."""
    params = list(learner.meta_parameters())
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=meta_lr(config))
    return torch.optim.SGD(params, lr=meta_lr(config))


def meta_lr(config: TrainConfig) -> float:
    """``config.lr``, or the algorithm's ``meta_lr`` when the config leaves it unset."""
    return algorithm_defaults(config.algo)["meta_lr"] if config.lr is None else config.lr
