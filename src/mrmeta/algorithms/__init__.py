"""Meta-learning methods, one file each, all implementing :class:`MetaLearner`.

:data:`ALGORITHMS` names them (the CLI's ``--algo``). Each class's options dataclass
(``options_type``, e.g. :class:`MemoryReducedOptions`) is the one home of its keyword options and
their defaults, read by its constructor and by :func:`algorithm_defaults` wherever a default is
shown or filled in.
"""

from __future__ import annotations

from typing import Any

from mrmeta.algorithms._head_learner import HeadLearner
from mrmeta.algorithms._options import LearnerOptions, option_defaults
from mrmeta.algorithms.anil import ANIL, ANILOptions
from mrmeta.algorithms.base import ChunkedLearner, MetaLearner, StepStats
from mrmeta.algorithms.imaml import IMAML, IMAMLOptions
from mrmeta.algorithms.itd_bio import ITDBiO, ITDBiOOptions
from mrmeta.algorithms.maml import FOMAML, MAML, FOMAMLOptions, MAMLOptions
from mrmeta.algorithms.memory_reduced import MemoryReduced, MemoryReducedOptions

ALGORITHMS: dict[str, type[ChunkedLearner]] = {
    "mrml": MemoryReduced,
    "maml": MAML,
    "fomaml": FOMAML,
    "anil": ANIL,
    "itd-bio": ITDBiO,
    "imaml": IMAML,
}


def algorithm_class(name: str) -> type[ChunkedLearner]:
    """The class registered as ``name``, else a ValueError listing the names."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]


def algorithm_defaults(name: str) -> dict[str, Any]:
    """The keyword options of algorithm ``name`` and their defaults, from its options type."""
    return option_defaults(algorithm_class(name).options_type)


def splits_head(name: str) -> bool:
    """Whether algorithm ``name`` takes a ``(backbone, head)`` split (else the whole model)."""
    return issubclass(algorithm_class(name), HeadLearner)


__all__ = [
    "ALGORITHMS",
    "ANIL",
    "ANILOptions",
    "FOMAML",
    "FOMAMLOptions",
    "IMAML",
    "IMAMLOptions",
    "ITDBiO",
    "ITDBiOOptions",
    "LearnerOptions",
    "MAML",
    "MAMLOptions",
    "MemoryReduced",
    "MemoryReducedOptions",
    "MetaLearner",
    "StepStats",
    "algorithm_class",
    "algorithm_defaults",
    "splits_head",
]
