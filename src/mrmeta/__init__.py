"""mrmeta: memory-reduced meta-learning and the baselines it is compared against."""

from mrmeta.algorithms import (
    ANIL,
    FOMAML,
    IMAML,
    MAML,
    ITDBiO,
    MemoryReduced,
    MetaLearner,
    StepStats,
)
from mrmeta.implicit import CGResult, Hypergradient, conjugate_gradient, hypergradient
from mrmeta.inner import gradient_descent, unrolled_gradient_descent
from mrmeta.memory import format_bytes, measure_peak_memory
from mrmeta.models import (
    Conv4,
    Conv4Backbone,
    ResNet12,
    ResNet12Backbone,
    TaskBatchNorm2d,
    split_model,
)
from mrmeta.tasks import TaskBatch

__version__ = "0.1.0"

__all__ = [
    "ANIL",
    "FOMAML",
    "IMAML",
    "ITDBiO",
    "MAML",
    "CGResult",
    "Conv4",
    "Conv4Backbone",
    "Hypergradient",
    "MemoryReduced",
    "MetaLearner",
    "ResNet12",
    "ResNet12Backbone",
    "StepStats",
    "TaskBatch",
    "TaskBatchNorm2d",
    "conjugate_gradient",
    "format_bytes",
    "gradient_descent",
    "hypergradient",
    "measure_peak_memory",
    "split_model",
    "unrolled_gradient_descent",
]
