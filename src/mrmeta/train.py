"""The outer loop: sampling, meta-steps, validation, checkpoints, logging, the final test."""

from __future__ import annotations

import math
import resource
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

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
from mrmeta.algorithms.base import CHUNK_STAT_KEYS, MetaLearner, StepStats
from mrmeta.config import ConfigError, TrainConfig
from mrmeta.data import (
    FewShotDataset,
    TaskSampler,
    available_datasets,
    canonical_dataset_name,
    load_dataset,
)
from mrmeta.distributed import (
    DistContext,
    DistributedError,
    average_gradients,
    broadcast_module,
    check_on_main,
    gather_rows,
    gather_to_main,
    init_distributed,
    launched_world_size,
    rank_seed,
    shard_size,
    shutdown,
    to_cpu,
)
from mrmeta.evaluate import EvalResult, evaluate
from mrmeta.tasks import TaskBatch

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
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} is a file, not a folder; choose a folder path")
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(
            f"--out {run_dir} already exists and is not empty; pass --resume to continue that "
            "run, or choose a new --out folder"
        )


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is available; use cpu")
    return torch.device(name)


def peak_memory_bytes(device: torch.device) -> tuple[str, int]:
    """The memory figure logged per iteration, and its name.

    CUDA: ``peak_memory_bytes``, the peak allocated by PyTorch during the iteration. CPU:
    ``max_rss_bytes``, the process's resident-set high-water mark so far (it includes the
    dataset and never decreases; use ``benchmarks/memory_speed.py`` for per-step peaks).
    """
    if device.type == "cuda":
        return "peak_memory_bytes", int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return "max_rss_bytes", int(rss if sys.platform == "darwin" else rss * 1024)


def load_image_splits(config: TrainConfig) -> dict[str, FewShotDataset]:
    """The train/val/test splits of an image benchmark (the command trains Conv4 on images)."""
    name = _image_dataset_name(config.dataset)
    options: dict[str, Any] = {"root": config.data_root, "download": config.download}
    if name == "omniglot":
        options["split_scheme"] = config.omniglot_split
    splits = ("train", "val", "test")
    return {s: cast(FewShotDataset, load_dataset(name, s, **options)) for s in splits}


def _image_dataset_name(given: str) -> str:
    """The registry's name of an image benchmark, else a ConfigError listing those there are."""
    name, images = canonical_dataset_name(given), available_datasets(images_only=True)
    if name in images:
        return name
    what = "not an image benchmark" if name in available_datasets() else "unknown dataset"
    raise ConfigError(
        f"--dataset {given}: {what}; 'mrmeta train' trains Conv4 on one of {', '.join(images)} "
        "(every dataset loads from Python with mrmeta.data.load_dataset)"
    )


class TrainingRun:
    """One run folder: builds everything from the config, trains, validates, tests.

    Under ``torch.distributed`` (``dist`` enabled) each rank draws ``meta_batch / W`` tasks
    from its own sampler (seeded by :func:`mrmeta.distributed.rank_seed`), the meta-gradients
    are averaged by one all-reduce per step, and rank 0 alone logs, validates and writes
    checkpoints (which carry every rank's sampler state, so ``--resume`` continues exactly).

    Args:
        config: the run's configuration.
        run_dir: its folder (``config.json``, ``metrics.jsonl``, ``last.pt``, ``best.pt``,
            ``result.json``, ``curves.png``).
        progress: show a progress bar.
        dist: this process's place in the process group (default: one process).
    """

    def __init__(
        self,
        config: TrainConfig,
        run_dir: Path,
        *,
        progress: bool = True,
        dist: DistContext | None = None,
    ) -> None:
        self.config, self.run_dir, self.show_progress = config, Path(run_dir), progress
        self.dist = dist or DistContext()
        self.device = self.dist.device if self.dist.enabled else resolve_device(config.device)
        self.dtype: torch.dtype = getattr(torch, config.dtype)
        self.local_batch = shard_size(config.meta_batch, self.dist.world_size)
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        self.splits = load_image_splits(config)
        torch.manual_seed(config.seed)
        image_shape = tuple(self.splits["train"].images.shape[1:])
        self.model = build_model(config, image_shape)
        self.learner: MetaLearner = build_learner(config, self.model).to(self.device, self.dtype)
        broadcast_module(self.learner, self.dist)
        self.optimizer = build_optimizer(config, self.learner)
        self.sampler = self._sampler("train", rank_seed(config.seed, self.dist.rank))
        for split in ("val", "test"):  # a task shape the split cannot give fails now, not later
            self._sampler(split, config.seed)
        self.progress = Progress()
        self._rank_states: list[dict[str, Any]] | None = None

    def _sampler(self, split: str, seed: int) -> TaskSampler:
        c = self.config
        return TaskSampler(self.splits[split], c.ways, c.shots, c.queries, seed=seed)

    def _draw(self, sampler: TaskSampler, tasks: int) -> TaskBatch:
        return sampler.sample(tasks).to(self.device, self.dtype)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state = {
            "learner": self.learner.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "sampler": self.sampler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "progress": vars(self.progress).copy(),
            "config": self.config.to_dict(),
        }
        if self.dist.enabled:
            state.update(world_size=self.dist.world_size, ranks=self._rank_states)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.learner.load_state_dict(state["learner"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        self.progress = Progress(**state["progress"])
        for group in self.optimizer.param_groups:  # --lr may be changed on --resume
            group["lr"] = self.config.lr
        if self.dist.enabled:
            self._load_rank_state(state)

    def _rank_state(self) -> dict[str, Any]:
        """What differs between ranks: the sampler, the RNG, a learner's per-slot warm starts."""
        extra = {k: v for k, v in self.learner.state_dict().items() if k.endswith("_extra_state")}
        sampler, rng = self.sampler.state_dict(), torch.get_rng_state()
        return to_cpu({"sampler": sampler, "torch_rng": rng, "extra": extra})

    def _load_rank_state(self, state: dict[str, Any]) -> None:
        saved, world = state.get("world_size"), self.dist.world_size
        if saved != world or not state.get("ranks"):
            raise ConfigError(
                f"the run was trained with {saved or 1} process(es) but {world} were launched; "
                "resume it with the same total number of processes"
            )
        mine = state["ranks"][self.dist.rank]
        self.sampler.load_state_dict(mine["sampler"])
        torch.set_rng_state(mine["torch_rng"])
        self.learner.load_state_dict(mine["extra"], strict=False)

    def checkpoint(self, name: str = LAST) -> None:
        save_checkpoint(self.run_dir / name, self.state_dict())

    # ------------------------------------------------------------------ steps
    def step(self) -> dict[str, Any]:
        """One meta-iteration; returns its metrics record."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        batch = self._draw(self.sampler, self.local_batch)
        stats: StepStats = self.learner.meta_step(
            batch, self.optimizer, reduce_gradients=self._reduce_gradients
        )
        seconds = time.perf_counter() - start
        memory_key, memory = peak_memory_bytes(self.device)
        stats, seconds, memory = self._across_ranks(stats, seconds, memory)
        self.progress.iteration += 1
        self.progress.train_seconds += seconds
        self._guard(stats)
        return {
            "kind": "train",
            "iteration": self.progress.iteration,
            **stats.as_dict(),
            "seconds": seconds,
            "train_seconds": self.progress.train_seconds,
            memory_key: memory,
        }

    def _reduce_gradients(self) -> None:
        """The one all-reduce of a distributed step (a no-op in one process).

        Every rank takes the optimizer step (or skips it) on the same averaged gradient: a
        non-finite loss on one rank gives a non-finite gradient, which the all-reduce spreads.
        """
        average_gradients(self.learner.meta_parameters(), self.dist)

    def _across_ranks(
        self, stats: StepStats, seconds: float, peak: int
    ) -> tuple[StepStats, float, int]:
        """The step's statistics averaged over the ranks (each drew as many tasks); seconds
        and peak memory of the slowest / largest rank. Identical on every rank."""
        if not self.dist.enabled:
            return stats, seconds, peak
        keys = CHUNK_STAT_KEYS
        local = [getattr(stats, k) for k in keys]
        rows = gather_rows([0.0 if v is None else v for v in local] + [seconds, peak], self.dist)
        means = rows[:, : len(keys)].mean(0).tolist()
        averaged = {k: None if v is None else m for k, v, m in zip(keys, local, means, strict=True)}
        slowest = rows[:, len(keys) :].max(0).values.tolist()
        return replace(stats, **averaged), slowest[0], int(slowest[1])

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
            self.learner,
            lambda n: self._draw(sampler, n),
            tasks=self.config.val_tasks,
            device=self.device,
        )

    def test(self, tasks: int | None = None, protocol: str | None = None) -> EvalResult:
        """Accuracy on test tasks drawn from classes never seen in meta-training."""
        sampler = self._sampler("test", self.config.seed + 2)
        return evaluate(
            self.learner,
            lambda n: self._draw(sampler, n),
            tasks=tasks or self.config.test_tasks,
            protocol=protocol or self.config.eval_protocol,
            device=self.device,
        )

    # ------------------------------------------------------------------ loop
    def _finished(self) -> bool:
        budget = self.config.time_budget
        out_of_time = budget is not None and self.progress.train_seconds >= budget
        return self.progress.iteration >= self.config.iterations or out_of_time

    def _after_step(self, log: MetricsLog | None, record: dict[str, Any]) -> None:
        it = self.progress.iteration
        validate = it % self.config.val_every == 0 or self._finished()
        save = it % self.config.checkpoint_every == 0 or self._finished()
        if self.dist.enabled and (validate or save):
            self._rank_states = gather_to_main(self._rank_state(), self.dist)
        if log is None:  # ranks other than 0 neither log, validate nor write
            return
        log.write(record)
        if validate:
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
        if save:
            self.checkpoint(LAST)

    def fit(self, log: MetricsLog | None) -> None:
        """Meta-train until ``iterations`` (or ``time_budget`` seconds of training).

        Args:
            log: the metrics log (``None`` on ranks other than 0, which only compute).
        """
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


# What may change when a run is resumed (the rest defines the run and stays as saved).
RESUME_OVERRIDES = (
    "iterations",
    "time_budget",
    "lr",
    "inner_lr",
    "max_skipped",
    "val_every",
    "checkpoint_every",
    "threads",
    "dist_timeout",
)


def resumed_config(run_dir: Path, overrides: dict[str, Any] | None) -> TrainConfig:
    """The saved configuration of the run in ``run_dir`` with the allowed ``overrides``."""
    prepare_run_dir(run_dir, resume=True)
    state = load_checkpoint(run_dir / LAST)
    if "config" not in state:
        raise ConfigError(f"{run_dir / LAST} is not an mrmeta checkpoint (no saved config)")
    saved = TrainConfig.from_dict(state["config"], source=str(run_dir / LAST))
    overrides = dict(overrides or {})
    refused = sorted(set(overrides) - set(RESUME_OVERRIDES))
    if refused:
        raise ConfigError(
            f"--resume keeps the run's settings; {', '.join(refused)} cannot change (only "
            f"{', '.join(RESUME_OVERRIDES)} can). Start a new run to change the others"
        )
    return saved.replace(**overrides)


def train(
    config: TrainConfig | None,
    run_dir: str | Path,
    *,
    resume: bool = False,
    overrides: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Meta-train as ``config`` says, then test; everything goes into ``run_dir``.

    With ``resume`` the run in ``run_dir`` continues from ``last.pt`` with its saved
    configuration (``config`` is ignored; ``overrides`` may change the keys of
    :data:`RESUME_OVERRIDES`), and without overrides it ends with exactly the parameters an
    uninterrupted run would have.

    With ``config.distributed`` the process joins the process group torchrun set up; rank 0
    alone writes ``run_dir`` (to resume, every rank reads ``last.pt``, so on several nodes
    ``run_dir`` must be on a shared filesystem). A failed or timed-out peer raises
    :class:`~mrmeta.distributed.DistributedError` instead of hanging.

    Returns:
        The contents of ``result.json`` (on ranks other than 0: an empty dict).
    """
    run_dir = Path(run_dir)
    if resume:
        config = resumed_config(run_dir, overrides)
    elif config is None:
        raise ValueError("train() needs a config for a new run")
    _refuse_undeclared_launch(config)
    ctx = DistContext()
    if config.distributed:
        ctx = init_distributed(config.device, config.dist_timeout)
    try:
        return _train(config, run_dir, ctx, resume=resume, progress=progress)
    except DistributedError as err:
        raise DistributedError(
            f"{err}; the last checkpoint is {run_dir / LAST}: relaunch the same torchrun "
            "command with --resume to continue"
        ) from err
    finally:
        shutdown(ctx)


def _refuse_undeclared_launch(config: TrainConfig) -> None:
    """Several processes without ``--distributed`` would each train the whole run alone."""
    world = launched_world_size()
    if world > 1 and not config.distributed:
        raise ConfigError(
            f"launched as {world} processes (WORLD_SIZE={world}) but --distributed is off, so "
            "each would train the whole run alone; add --distributed (a resumed run keeps the "
            "setting it was started with)"
        )


def _train(
    config: TrainConfig, run_dir: Path, ctx: DistContext, *, resume: bool, progress: bool
) -> dict[str, Any]:
    if not resume:
        check_on_main(lambda: prepare_run_dir(run_dir, resume=False), ctx)
    run = TrainingRun(config, run_dir, progress=progress and ctx.is_main, dist=ctx)
    if resume:
        run.load_state_dict(load_checkpoint(run_dir / LAST))
    if not ctx.is_main:
        run.fit(None)
        return {}
    run_dir.mkdir(parents=True, exist_ok=True)
    config.save(run_dir / CONFIG_FILE)
    if not resume and not ctx.enabled:
        run.checkpoint(LAST)  # iteration 0: a run killed before its first checkpoint resumes
    log = MetricsLog(run_dir, resume_iteration=run.progress.iteration if resume else None)
    try:
        run.fit(log)
    finally:
        log.close()
    return finish(run)


def finish(run: TrainingRun) -> dict[str, Any]:
    """Test the best-validation parameters, write ``result.json`` and the learning curves."""
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
    _plot(run.run_dir)
    return result


def _plot(run_dir: Path) -> None:
    try:
        from mrmeta._plots import plot_learning_curves
    except ImportError:  # matplotlib is optional
        return
    plot_learning_curves(read_metrics(run_dir / "metrics.jsonl"), run_dir / "curves.png")


def evaluate_run(
    run_dir: str | Path,
    *,
    tasks: int = 600,
    protocol: str = "native",
    checkpoint: str = "best",
    device: str | None = None,
) -> EvalResult:
    """Test a finished (or interrupted) run from its ``best.pt`` or ``last.pt``, on the run's
    own test tasks (same seed), on ``device`` (default: the run's)."""
    run_dir = Path(run_dir)
    if checkpoint not in ("best", "last"):
        raise ConfigError(f"checkpoint must be 'best' or 'last', got {checkpoint!r}")
    name = BEST if checkpoint == "best" else LAST
    if not (run_dir / name).exists() and checkpoint == "best":
        name = LAST
    if not (run_dir / name).exists():
        raise ConfigError(f"--run {run_dir} has no checkpoint ({BEST} or {LAST}); train it first")
    if tasks < 1:
        raise ConfigError(f"--tasks must be >= 1, got {tasks}")
    state = load_checkpoint(run_dir / name)
    if "config" not in state or "learner" not in state:
        raise ConfigError(f"{run_dir / name} is not an mrmeta checkpoint")
    config = TrainConfig.from_dict(state["config"], source=str(run_dir / name))
    config = config.replace(device=device or config.device, distributed=False)
    run = TrainingRun(config, run_dir, progress=False)
    run.learner.load_state_dict(state["learner"])
    return run.test(tasks, protocol)
