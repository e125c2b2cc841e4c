"""Few-shot data: benchmark loaders, the task sampler, and safe reading of dataset files.

Data flows ``load_dataset(...)`` -> ``TaskSampler(dataset, ways, shots, queries, seed=...)``
(``SinusoidSampler(tasks, shots, queries, seed=...)`` for regression) ->
``sampler.sample(batch_size)`` -> :class:`mrmeta.tasks.TaskBatch`. Datasets know nothing of
sampling: the samplers depend on the datasets, never the reverse.
"""

from mrmeta.data._dataset import FewShotDataset
from mrmeta.data._errors import DataError, DataNotFoundError
from mrmeta.data._paths import ENV_VAR, default_data_root
from mrmeta.data._registry import (
    available_datasets,
    canonical_dataset_name,
    image_datasets,
    is_image_dataset,
    load_dataset,
)
from mrmeta.data._safe_pickle import RestrictedUnpickler, load_pickle
from mrmeta.data._sampler import TaskSampler
from mrmeta.data.sinusoid import SinusoidSampler, SinusoidTasks

__all__ = [
    "ENV_VAR",
    "DataError",
    "DataNotFoundError",
    "FewShotDataset",
    "RestrictedUnpickler",
    "SinusoidSampler",
    "SinusoidTasks",
    "TaskSampler",
    "available_datasets",
    "canonical_dataset_name",
    "default_data_root",
    "image_datasets",
    "is_image_dataset",
    "load_dataset",
    "load_pickle",
]
