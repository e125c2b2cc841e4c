"""Meta-learning methods, one file each, all implementing :class:`MetaLearner`.

:data:`ALGORITHMS` names them (the CLI's ``--algo``); each class's constructor is the one home of
its defaults, read by :func:`algorithm_defaults` wherever a default is shown or filled in.
"""

from __future__ import annotations

import inspect
from typing import Any

from mrmeta.algorithms._head_learner import HeadLearner
from mrmeta.algorithms.anil import ANIL
from mrmeta.algorithms.base import MetaLearner, StepStats
from mrmeta.algorithms.imaml import IMAML
from mrmeta.algorithms.itd_bio import ITDBiO
from mrmeta.algorithms.maml import FOMAML, MAML
from mrmeta.algorithms.memory_reduced import MemoryReduced

ALGORITHMS: dict[str, type[MetaLearner]] = {
    "mrml": MemoryReduced,
    "maml": MAML,
    "fomaml": FOMAML,
    "anil": ANIL,
    "itd-bio": ITDBiO,
    "imaml": IMAML,
}


def algorithm_class(name: str) -> type[MetaLearner]:
    """The class registered as ``name``, else a ValueError listing the names."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]


def algorithm_defaults(name: str) -> dict[str, Any]:
    """The keyword options of algorithm ``name`` and their defaults, from its constructor."""
    parameters = inspect.signature(algorithm_class(name).__init__).parameters.values()
    return {p.name: p.default for p in parameters if p.kind is p.KEYWORD_ONLY}


def splits_head(name: str) -> bool:
    """Whether algorithm ``name`` takes a ``(backbone, head)`` split (else the whole model)."""
    return issubclass(algorithm_class(name), HeadLearner)


__all__ = [
    "ALGORITHMS",
    "ANIL",
    "FOMAML",
    "IMAML",
    "ITDBiO",
    "MAML",
    "MemoryReduced",
    "MetaLearner",
    "StepStats",
    "algorithm_class",
    "algorithm_defaults",
    "splits_head",
]
