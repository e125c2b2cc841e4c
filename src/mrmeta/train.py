"""The outer loop: sampling, meta-steps, validation, checkpoints, logging, the final test."""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mrmeta._checkpoint import (
    MetricsLog,
    load_checkpoint,
    read_metrics,
    save_checkpoint,
    write_json,
)
from mrmeta._factory import build_learner, build_model, build_optimizer
from mrmeta.algorithms.base import MetaLearner, StepStats
from mrmeta.config import ConfigError, TrainConfig
from mrmeta.data import TaskSampler, load_dataset
from mrmeta.evaluate import EvalResult, evaluate

CONFIG_FILE, LAST, BEST = "config.json", "last.pt", "best.pt"


class TrainingDiverged(RuntimeError):
    """Too many consecutive meta-steps had a non-finite loss or meta-gradient."""


@dataclass
class Progress:
    """The counters a checkpoint carries besides parameters and RNG states."""

    iteration: int = 0
    best_val: float = -math.inf
    train_seconds: float = 0.0
    skipped_in_row: int = 0


def prepare_run_dir(run_dir: Path, resume: bool) -> None:
    """Refuse to overwrite an existing run; require one to resume."""
    if resume:
        if not (run_dir / CONFIG_FILE).exists() or not (run_dir / LAST).exists():
            raise ConfigError(
                f"--resume: {run_dir} holds no run to resume (no {CONFIG_FILE} and {LAST}); "
                "start a new run without --resume"
            )
        return
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(
            f"--out {run_dir} already exists and is not empty; pass --resume to continue that "
            "run, or choose a new --out folder"
        )


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is available; use cpu")
    return torch.device(name)


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: peak allocated since the last reset. CPU: the process's peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class TrainingRun:
    """One run folder: builds everything from the config, trains, validates, tests.

    Args:
        config: the run's configuration.
        run_dir: its folder (``config.json``, ``metrics.jsonl``, ``last.pt``, ``best.pt``,
            ``result.json``, ``curves.png``).
        progress: show a progress bar.
    """

    def __init__(self, config: TrainConfig, run_dir: Path, *, progress: bool = True) -> None:
        self.config, self.run_dir, self.show_progress = config, Path(run_dir), progress
        self.device = resolve_device(config.device)
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        split_options = {"root": config.data_root, "download": config.download}
        self.splits = {
            s: load_dataset(config.dataset, s, **split_options) for s in ("train", "val", "test")
        }
        torch.manual_seed(config.seed)
        image_shape = tuple(self.splits["train"].images.shape[1:])
        self.model = build_model(config, image_shape)
        self.learner: MetaLearner = build_learner(config, self.model).to(self.device)
        self.optimizer = build_optimizer(config, self.learner)
        self.sampler = self._sampler("train", config.seed)
        self.progress = Progress()

    def _sampler(self, split: str, seed: int) -> TaskSampler:
        c = self.config
        return TaskSampler(self.splits[split], c.ways, c.shots, c.queries, seed=seed)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "learner": self.learner.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "sampler": self.sampler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "progress": vars(self.progress).copy(),
            "config": self.config.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.learner.load_state_dict(state["learner"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        self.progress = Progress(**state["progress"])

    def checkpoint(self, name: str = LAST) -> None:
        save_checkpoint(self.run_dir / name, self.state_dict())

    # ------------------------------------------------------------------ steps
    def step(self) -> dict[str, Any]:
        """One meta-iteration; returns its metrics record."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        batch = self.sampler.sample(self.config.meta_batch).to(self.device)
        stats: StepStats = self.learner.meta_step(batch, self.optimizer)
        seconds = time.perf_counter() - start
        self.progress.iteration += 1
        self.progress.train_seconds += seconds
        self._guard(stats)
        return {
            "kind": "train",
            "iteration": self.progress.iteration,
            **stats.as_dict(),
            "seconds": seconds,
            "train_seconds": self.progress.train_seconds,
            "peak_memory_bytes": peak_memory_bytes(self.device),
        }

    def _guard(self, stats: StepStats) -> None:
        """Count consecutive skipped steps; stop the run when there are too many."""
        if not stats.skipped:
            self.progress.skipped_in_row = 0
            return
        self.learner.reset_state()
        self.progress.skipped_in_row += 1
        if self.progress.skipped_in_row > self.config.max_skipped:
            raise TrainingDiverged(
                f"{self.progress.skipped_in_row} consecutive meta-steps had a non-finite loss or "
                f"meta-gradient (iteration {self.progress.iteration}); stopped. The last good "
                f"checkpoint is {self.run_dir / LAST}: lower --lr or --inner-lr and --resume"
            )

    def validate(self) -> EvalResult:
        """Accuracy on the same ``val_tasks`` validation tasks every time (fixed seed)."""
        sampler = self._sampler("val", self.config.seed + 1)
        return evaluate(
            self.learner, sampler.sample, tasks=self.config.val_tasks, device=self.device
        )

    def test(self, tasks: int | None = None, protocol: str | None = None) -> EvalResult:
        """Accuracy on test tasks drawn from classes never seen in meta-training."""
        sampler = self._sampler("test", self.config.seed + 2)
        return evaluate(
            self.learner,
            sampler.sample,
            tasks=tasks or self.config.test_tasks,
            protocol=protocol or self.config.eval_protocol,
            device=self.device,
        )

    # ------------------------------------------------------------------ loop
    def _finished(self) -> bool:
        budget = self.config.time_budget
        out_of_time = budget is not None and self.progress.train_seconds >= budget
        return self.progress.iteration >= self.config.iterations or out_of_time

    def _after_step(self, log: MetricsLog, record: dict[str, Any]) -> None:
        log.write(record)
        it = self.progress.iteration
        if it % self.config.val_every == 0 or self._finished():
            result = self.validate()
            log.write(
                {
                    "kind": "val",
                    "iteration": it,
                    "accuracy": result.mean,
                    "ci95": result.ci95,
                    "train_seconds": self.progress.train_seconds,
                }
            )
            if result.mean > self.progress.best_val:
                self.progress.best_val = result.mean
                self.checkpoint(BEST)
        if it % self.config.checkpoint_every == 0 or self._finished():
            self.checkpoint(LAST)

    def fit(self, log: MetricsLog) -> None:
        """Meta-train until ``iterations`` (or ``time_budget`` seconds of training)."""
        bar = tqdm(
            total=self.config.iterations,
            initial=self.progress.iteration,
            disable=not self.show_progress,
            desc=f"{self.config.algo}",
            unit="it",
        )
        with bar:
            while not self._finished():
                record = self.step()
                self._after_step(log, record)
                bar.update(1)
                bar.set_postfix(_postfix(record, self.progress.best_val))


def _postfix(record: dict[str, Any], best_val: float) -> dict[str, str]:
    postfix = {"loss": f"{record['loss']:.3f}", "s/it": f"{record['seconds']:.2f}"}
    if record.get("accuracy") is not None:
        postfix["acc"] = f"{record['accuracy']:.3f}"
    if best_val > -math.inf:
        postfix["best_val"] = f"{best_val:.3f}"
    return postfix


def train(
    config: TrainConfig, run_dir: str | Path, *, resume: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Meta-train as ``config`` says, then test; everything goes into ``run_dir``.

    With ``resume`` the run in ``run_dir`` continues from ``last.pt`` with its saved
    configuration, and ends with exactly the parameters an uninterrupted run would have.

    Returns:
        The contents of ``result.json``.
    """
    run_dir = Path(run_dir)
    prepare_run_dir(run_dir, resume)
    if resume:
        config = TrainConfig.from_dict(
            load_checkpoint(run_dir / LAST)["config"], source="checkpoint"
        )
    run = TrainingRun(config, run_dir, progress=progress)
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume:
        run.load_state_dict(load_checkpoint(run_dir / LAST))
    else:
        config.save(run_dir / CONFIG_FILE)
    log = MetricsLog(run_dir, resume_iteration=run.progress.iteration if resume else None)
    try:
        run.fit(log)
    finally:
        log.close()
    return finish(run)


def finish(run: TrainingRun) -> dict[str, Any]:
    """Test the best-validation parameters, write ``result.json`` and the learning curves."""
    final = {
        k: v.detach().clone()
        for k, v in run.learner.state_dict().items()
        if isinstance(v, torch.Tensor)
    }
    if (run.run_dir / BEST).exists():
        run.learner.load_state_dict(load_checkpoint(run.run_dir / BEST)["learner"])
    test = run.test()
    result = {
        "algo": run.config.algo,
        "dataset": run.config.dataset,
        "ways": run.config.ways,
        "shots": run.config.shots,
        "iterations": run.progress.iteration,
        "train_seconds": run.progress.train_seconds,
        "best_val_accuracy": run.progress.best_val,
        "test_accuracy": test.mean,
        "test_ci95": test.ci95,
        "test_tasks": test.tasks,
        "test_protocol": test.protocol,
        "tested_checkpoint": BEST if (run.run_dir / BEST).exists() else LAST,
    }
    write_json(run.run_dir / "result.json", result)
    run.learner.load_state_dict({**run.learner.state_dict(), **final})
    _plot(run.run_dir)
    return result


def _plot(run_dir: Path) -> None:
    try:
        from mrmeta._plots import plot_learning_curves
    except ImportError:  # matplotlib is optional
        return
    plot_learning_curves(read_metrics(run_dir / "metrics.jsonl"), run_dir / "curves.png")


def evaluate_run(
    run_dir: str | Path, *, tasks: int = 600, protocol: str = "native", checkpoint: str = "best"
) -> EvalResult:
    """Test a finished (or interrupted) run from its ``best.pt`` or ``last.pt``."""
    run_dir = Path(run_dir)
    name = BEST if checkpoint == "best" else LAST
    if not (run_dir / name).exists() and checkpoint == "best":
        name = LAST
    if not (run_dir / name).exists():
        raise ConfigError(f"--run {run_dir} has no checkpoint ({BEST} or {LAST}); train it first")
    if tasks < 1:
        raise ConfigError(f"--tasks must be >= 1, got {tasks}")
    state = load_checkpoint(run_dir / name)
    config = TrainConfig.from_dict(state["config"], source=str(run_dir / name))
    run = TrainingRun(config, run_dir, progress=False)
    run.learner.load_state_dict(state["learner"])
    return run.test(tasks, protocol)
