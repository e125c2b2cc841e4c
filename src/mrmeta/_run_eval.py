"""Testing a saved run (``mrmeta eval``), and the pieces it shares with the training loop:
the device, the data splits, the seeded task samplers, the data root.

:func:`evaluate_run` builds only what a test needs (the model from the checkpoint's config and
the test split's sampler) and leaves the process's global state alone: it sets no global seed
and no thread count, and the random numbers a model's initialisation draws come from a forked
generator, so calling it from a notebook changes nothing there.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import torch

from mrmeta._factory import build_learner, build_model
from mrmeta._run_folder import BEST, LAST, RunFolder
from mrmeta.algorithms.base import MetaLearner
from mrmeta.config import TrainConfig
from mrmeta.data import (
    FewShotDataset,
    TaskSampler,
    available_datasets,
    canonical_dataset_name,
    load_dataset,
)
from mrmeta.errors import ConfigError
from mrmeta.evaluate import EvalResult, evaluate

VAL_SEED_OFFSET, TEST_SEED_OFFSET = 1, 2
"""Validation tasks are drawn with ``seed + 1``, test tasks with ``seed + 2`` (the same tasks at
every validation, and in ``mrmeta eval`` as at the end of training)."""


def resolve_device(name: str) -> torch.device:
    """``torch.device(name)``, refusing ``cuda`` where there is none."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is available; use cpu")
    return torch.device(name)


def absolute_data_root(data_root: str | None) -> str | None:
    """``data_root`` as an absolute path (``~`` expanded), so a run resumed or evaluated from
    another working directory finds its data; ``None`` stays ``None``."""
    if data_root is None:
        return None
    return os.path.abspath(os.path.expanduser(data_root))


def data_root_for(given: str | None, saved: str | None) -> str | None:
    """Where a resumed or evaluated run finds its data: ``given`` (``--data-root``), else the
    saved root if it still exists, else ``None`` (``$MRMETA_DATA`` or the default cache). The
    data's location is not part of a run's identity."""
    if given is not None:
        return absolute_data_root(given)
    if saved is not None and Path(saved).is_dir():
        return saved
    return None


def load_split(config: TrainConfig, split: str) -> FewShotDataset:
    """One split of the run's image benchmark (the command trains on images)."""
    name = image_dataset_name(config.dataset)
    options: dict[str, Any] = {"root": config.data_root}
    if name == "omniglot":  # the only dataset with a download source
        options.update(split_scheme=config.omniglot_split, download=config.download)
    return cast(FewShotDataset, load_dataset(name, split, **options))


def image_dataset_name(given: str) -> str:
    """The registry's name of an image benchmark, else a ConfigError listing those there are."""
    name, images = canonical_dataset_name(given), available_datasets(images_only=True)
    if name in images:
        return name
    what = "not an image benchmark" if name in available_datasets() else "unknown dataset"
    raise ConfigError(
        f"--dataset {given}: {what}; 'mrmeta train' trains on one of {', '.join(images)} "
        "(every dataset loads from Python with mrmeta.data.load_dataset)"
    )


def split_sampler(config: TrainConfig, dataset: FewShotDataset, seed: int) -> TaskSampler:
    """The run's task shape (``ways``, ``shots``, ``queries``) drawn from ``dataset``."""
    return TaskSampler(dataset, config.ways, config.shots, config.queries, seed=seed)


def accuracy_on_test_tasks(
    learner: MetaLearner,
    config: TrainConfig,
    dataset: FewShotDataset,
    device: torch.device,
    *,
    tasks: int | None = None,
    protocol: str | None = None,
    progress: bool = False,
) -> EvalResult:
    """Accuracy on the run's test tasks (seed ``config.seed + 2``): the final test of training
    and ``mrmeta eval`` draw the same tasks."""
    sampler = split_sampler(config, dataset, config.seed + TEST_SEED_OFFSET)
    dtype: torch.dtype = getattr(torch, config.dtype)
    return evaluate(
        learner,
        lambda n: sampler.sample(n).to(device, dtype),
        tasks=tasks or config.test_tasks,
        protocol=protocol or config.eval_protocol,
        device=device,
        progress=progress,
    )


def _checkpoint_to_test(folder: RunFolder, checkpoint: str) -> tuple[str, str]:
    """The file to test and why: ``best.pt``, or ``last.pt`` (asked for, or no ``best.pt``)."""
    if checkpoint not in ("best", "last"):
        raise ConfigError(f"checkpoint must be 'best' or 'last', got {checkpoint!r}")
    if checkpoint == "best" and folder.file(BEST).exists():
        return BEST, "best validation accuracy"
    if folder.file(LAST).exists():
        return LAST, "no best.pt: no validation yet" if checkpoint == "best" else "asked for"
    raise ConfigError(f"--run {folder.path} has no checkpoint ({BEST} or {LAST}); train it first")


def evaluate_run(
    run_dir: str | Path,
    *,
    tasks: int = 600,
    protocol: str = "native",
    checkpoint: str = "best",
    device: str | None = None,
    data_root: str | None = None,
    progress: bool = False,
) -> EvalResult:
    """Test a finished (or interrupted) run on its own test tasks (the same seed).

    Args:
        run_dir: the run folder.
        tasks: test tasks.
        protocol: ``"native"`` or ``"frozen-backbone"``.
        checkpoint: ``"best"`` (``best.pt``; ``last.pt`` when the run never validated) or
            ``"last"``.
        device: where to test (default: the run's device).
        data_root: where the data is now (default: the saved root, else ``$MRMETA_DATA``).
        progress: show a progress bar.

    Returns:
        The accuracy, with ``checkpoint`` naming the file tested, its iteration and why it was
        chosen.

    Raises:
        ConfigError: no checkpoint, bad arguments.
        CheckpointError: the checkpoint is damaged or belongs to another run.
    """
    folder = RunFolder(run_dir)
    name, why = _checkpoint_to_test(folder, checkpoint)
    if tasks < 1:
        raise ConfigError(f"--tasks must be >= 1, got {tasks}")
    state = folder.load(name)
    config = TrainConfig.from_saved(state["config"], source=str(folder.file(name)))
    root = data_root_for(data_root, config.data_root)
    # eval reads the data where it is told or where the run found it, and downloads nothing
    config = config.replace(
        device=device or config.device, distributed=False, data_root=root, download=False
    )
    target = resolve_device(config.device)
    dataset = load_split(config, "test")
    with torch.random.fork_rng(devices=[]):  # the model's initialisation leaves no trace
        learner = build_learner(config, build_model(config, tuple(dataset.images.shape[1:])))
    learner = learner.to(target, getattr(torch, config.dtype))
    learner.load_state_dict(state["learner"])
    result = accuracy_on_test_tasks(
        learner, config, dataset, target, tasks=tasks, protocol=protocol, progress=progress
    )
    iteration = state.get("progress", {}).get("iteration", "?")
    return replace(result, checkpoint=f"{folder.file(name)} (iteration {iteration}, {why})")
