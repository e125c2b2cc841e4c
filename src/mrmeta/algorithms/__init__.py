"""Meta-learning methods, one file each, all implementing :class:`MetaLearner`."""

from mrmeta.algorithms.base import MetaLearner, StepStats
from mrmeta.algorithms.memory_reduced import MemoryReduced

__all__ = ["MemoryReduced", "MetaLearner", "StepStats"]
