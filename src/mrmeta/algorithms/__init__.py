"""Meta-learning methods, one file each, all implementing :class:`MetaLearner`."""

from mrmeta.algorithms.anil import ANIL
from mrmeta.algorithms.base import MetaLearner, StepStats
from mrmeta.algorithms.imaml import IMAML
from mrmeta.algorithms.itd_bio import ITDBiO
from mrmeta.algorithms.maml import FOMAML, MAML
from mrmeta.algorithms.memory_reduced import MemoryReduced

__all__ = ["ANIL", "FOMAML", "IMAML", "ITDBiO", "MAML", "MemoryReduced", "MetaLearner", "StepStats"]
