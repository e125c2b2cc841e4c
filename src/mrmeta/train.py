"""The training loop: sampling, meta-steps, validation, checkpoints, logging, the final test.

The run folder (lock, identity, checkpoints, metrics) is :mod:`mrmeta._run_folder`; testing a
saved run is :mod:`mrmeta._run_eval`. This module holds :class:`TrainingRun` (one run's state
and its loop) and :func:`train`, which opens the folder, resumes or starts, trains and tests.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import shlex
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mrmeta._checkpoint import MetricsLog, read_metrics
from mrmeta._factory import (
    build_learner,
    build_model,
    build_optimizer,
    effective_config,
    meta_lr,
)
from mrmeta._run_eval import (
    VAL_SEED_OFFSET,
    absolute_data_root,
    accuracy_on_test_tasks,
    data_root_for,
    evaluate_run,
    load_split,
    resolve_device,
    split_sampler,
)
from mrmeta._run_folder import BEST, CONFIG_FILE, LAST, METRICS, RESULT, RunFolder
from mrmeta.algorithms.base import CHUNK_STAT_KEYS, MetaLearner, StepStats
from mrmeta.config import TrainConfig
from mrmeta.data import FewShotDataset, TaskSampler
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
from mrmeta.errors import (
    CheckpointError,
    ConfigError,
    OutOfMemory,
    RunWriteError,
    TrainingDiverged,
    TrainingInterrupted,
)
from mrmeta.evaluate import EvalResult, evaluate
from mrmeta.memory import format_bytes
from mrmeta.tasks import TaskBatch

__all__ = [
    "BEST",
    "CONFIG_FILE",
    "LAST",
    "RESUME_OVERRIDES",
    "TrainingDiverged",
    "TrainingRun",
    "evaluate_run",
    "resumed_config",
    "train",
]


@dataclass
class Progress:
    """The counters a checkpoint carries besides parameters and RNG states."""

    iteration: int = 0
    best_val: float = -math.inf
    train_seconds: float = 0.0
    skipped_in_row: int = 0
    train_cpu_seconds: float = 0.0
    timed_validations: int = 0


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


def device_memory_bytes(device: torch.device) -> int:
    """All the memory of ``device``: the GPU's, or the machine's physical RAM."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def task_batch_bytes(dataset: FewShotDataset, config: TrainConfig, tasks: int) -> int:
    """A lower bound on the memory of drawing ``tasks`` tasks: the sampler's float64 class
    keys ``(tasks, classes)`` plus the pixels ``(tasks, N·(K+Q), C, H, W)`` in float32 and in
    the run's dtype. The model's activations come on top."""
    pixels = math.prod(dataset.images.shape[1:]) * config.ways * (config.shots + config.queries)
    itemsize = torch.empty((), dtype=getattr(torch, config.dtype)).element_size()
    return tasks * (8 * dataset.num_classes + pixels * (4 + itemsize))


def is_out_of_memory(err: BaseException) -> bool:
    """An allocation failure (CUDA or CPU allocator, or Python's ``MemoryError``)."""
    if isinstance(err, MemoryError | torch.cuda.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )


class TrainingRun:
    """One run folder: builds everything from the config, trains, validates, tests.

    Under ``torch.distributed`` (``dist`` enabled) each rank draws ``meta_batch / W`` tasks
    from its own sampler (seeded by :func:`mrmeta.distributed.rank_seed`), the meta-gradients
    are averaged by one all-reduce per step, and rank 0 alone logs, validates and writes
    checkpoints (which carry every rank's sampler state, so ``--resume`` continues exactly).

    Args:
        config: the run's configuration.
        folder: its run folder (a :class:`~mrmeta._run_folder.RunFolder` or a path), where
            checkpoints go.
        progress: show a progress bar.
        dist: this process's place in the process group (default: one process).
    """

    def __init__(
        self,
        config: TrainConfig,
        folder: RunFolder | str | Path,
        *,
        progress: bool = True,
        dist: DistContext | None = None,
    ) -> None:
        self.config, self.show_progress = config, progress
        self.folder = folder if isinstance(folder, RunFolder) else RunFolder(folder)
        self.run_dir = self.folder.path
        self.dist = dist or DistContext()
        self.device = self.dist.device if self.dist.enabled else resolve_device(config.device)
        self.dtype: torch.dtype = getattr(torch, config.dtype)
        self.local_batch = shard_size(config.meta_batch, self.dist.world_size)
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        self.splits = {split: load_split(config, split) for split in ("train", "val", "test")}
        self._check_task_memory()
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
        return split_sampler(self.config, self.splits[split], seed)

    def _check_task_memory(self) -> None:
        """Refuse a meta-batch whose tasks alone exceed the device's memory (before a step)."""
        need = task_batch_bytes(self.splits["train"], self.config, self.local_batch)
        have = device_memory_bytes(self.device)
        if need > have:
            raise OutOfMemory(
                f"--meta-batch {self.config.meta_batch} needs at least {format_bytes(need)} for "
                f"its tasks alone, more than the {format_bytes(have)} of {self.device}; lower "
                "--meta-batch"
            )

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
            group["lr"] = meta_lr(self.config)
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
        """Write ``name`` (never with non-finite parameters; see :meth:`RunFolder.save`)."""
        self.folder.save(name, self.state_dict(), self.progress.iteration)

    # ------------------------------------------------------------------ steps
    def step(self) -> dict[str, Any]:
        """One meta-iteration; returns its metrics record."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start, start_cpu = time.perf_counter(), time.process_time()
        try:
            batch = self._draw(self.sampler, self.local_batch)
            stats: StepStats = self.learner.meta_step(
                batch, self.optimizer, reduce_gradients=self._reduce_gradients
            )
        except (RuntimeError, MemoryError) as err:
            if not is_out_of_memory(err):
                raise
            self.learner.reset_state()
            raise self._out_of_memory(err) from None
        seconds = time.perf_counter() - start
        self.progress.train_cpu_seconds += time.process_time() - start_cpu
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
            "train_cpu_seconds": self.progress.train_cpu_seconds,
            memory_key: memory,
        }

    def _out_of_memory(self, err: BaseException) -> OutOfMemory:
        c, first = self.config, (str(err).strip().splitlines() or [type(err).__name__])[0]
        chunk = "all" if c.chunk_size is None else c.chunk_size
        return OutOfMemory(
            f"out of memory at iteration {self.progress.iteration + 1} on {self.device} "
            f"({first[:120]}); lower --meta-batch (now {c.meta_batch}) or --chunk-size "
            f"(now {chunk})"
        )

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
                f"meta-gradient (iteration {self.progress.iteration}); stopped. "
                f"{self.folder.last_good()}: lower --lr or --inner-lr and --resume"
            )

    def validate(self) -> EvalResult:
        """Accuracy on the same ``val_tasks`` validation tasks every time (fixed seed)."""
        sampler = self._sampler("val", self.config.seed + VAL_SEED_OFFSET)
        return evaluate(
            self.learner,
            lambda n: self._draw(sampler, n),
            tasks=self.config.val_tasks,
            device=self.device,
        )

    def test(self, tasks: int | None = None, protocol: str | None = None) -> EvalResult:
        """Accuracy on test tasks drawn from classes never seen in meta-training."""
        return accuracy_on_test_tasks(
            self.learner,
            self.config,
            self.splits["test"],
            self.device,
            tasks=tasks,
            protocol=protocol,
        )

    # ------------------------------------------------------------------ loop
    def _finished(self) -> bool:
        budget = self.config.time_budget
        out_of_time = budget is not None and self._spent() >= budget
        return self.progress.iteration >= self.config.iterations or out_of_time

    def _spent(self) -> float:
        """Training seconds so far on the clock ``--budget-clock`` names."""
        if self.config.budget_clock == "cpu":
            return self.progress.train_cpu_seconds
        return self.progress.train_seconds

    def _timed_validation_due(self) -> bool:
        """Whether ``--val-every-seconds`` of training passed since the last timed validation."""
        interval = self.config.val_every_seconds
        if interval is None:
            return False
        marks = math.floor(self._spent() / interval)  # whole intervals trained so far
        if marks <= self.progress.timed_validations:
            return False
        self.progress.timed_validations = marks
        return True

    def _after_step(self, log: MetricsLog | None, record: dict[str, Any]) -> None:
        it = self.progress.iteration
        timed = self._timed_validation_due()
        validate = it % self.config.val_every == 0 or timed or self._finished()
        save = it % self.config.checkpoint_every == 0 or self._finished()
        if self.dist.enabled and (validate or save):
            self._rank_states = gather_to_main(self._rank_state(), self.dist)
        if log is None:  # ranks other than 0 neither log, validate nor write
            return
        self._log(log, record)
        if validate:
            result = self.validate()
            self._log(
                log,
                {
                    "kind": "val",
                    "iteration": it,
                    "accuracy": result.mean,
                    "ci95": result.ci95,
                    "train_seconds": self.progress.train_seconds,
                    "train_cpu_seconds": self.progress.train_cpu_seconds,
                },
            )
            if result.mean > self.progress.best_val:
                self.progress.best_val = result.mean
                self.checkpoint(BEST)
        if save:
            self.checkpoint(LAST)

    def _log(self, log: MetricsLog, record: dict[str, Any]) -> None:
        with self.folder.writing(METRICS):
            log.write(record)

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


RESUME_OVERRIDES = (
    "iterations",
    "time_budget",
    "budget_clock",
    "val_every_seconds",
    "lr",
    "inner_lr",
    "max_skipped",
    "val_every",
    "checkpoint_every",
    "threads",
    "dist_timeout",
    "data_root",
    "download",
)
"""What may change when a run is resumed; every other setting defines the run and may be given
again only with its saved value."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _same_setting(given: Any, saved: Any) -> bool:
    """``given == saved``, where a bool equals only a bool (``1`` is not ``True``)."""
    if isinstance(given, bool) or isinstance(saved, bool):
        return type(given) is type(saved) and given == saved
    return bool(given == saved)


def saved_config(folder: RunFolder) -> TrainConfig:
    """The configuration of the run in ``folder``: its ``last.pt``'s (identity checked), or
    ``config.json``'s when the run was stopped before it wrote a checkpoint."""
    folder.check_resumable()
    if folder.has_checkpoint():
        return TrainConfig.from_saved(folder.load(LAST)["config"], source=str(folder.file(LAST)))
    path = folder.file(CONFIG_FILE)
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} cannot be read ({err}); the run cannot resume") from None
    return TrainConfig.from_saved(values, source=str(path))


def resumed_config(
    run_dir: str | Path | RunFolder, requested: dict[str, Any] | None
) -> TrainConfig:
    """The saved configuration of the run in ``run_dir``, with the ``requested`` settings.

    ``requested`` holds what the resuming command gave (flags, ``--config`` file): a setting of
    :data:`RESUME_OVERRIDES` takes the new value (``data_root`` made absolute; none given: the
    saved root if it exists, else ``$MRMETA_DATA``), any other setting must equal the saved one.

    Raises:
        ConfigError: a setting outside :data:`RESUME_OVERRIDES` differs from the saved run (the
            message names each, with both values).
    """
    folder = run_dir if isinstance(run_dir, RunFolder) else RunFolder(run_dir)
    saved = saved_config(folder)
    requested = {k.replace("-", "_"): v for k, v in (requested or {}).items()}
    kept = saved.to_dict()
    unknown = {k: v for k, v in requested.items() if k not in kept}
    if unknown:
        TrainConfig.from_dict(unknown, source="--resume")  # raises, naming the unknown key
    changed = [
        f"{_flag(name)} {kept[name]!r} -> {value!r}"
        for name, value in requested.items()
        if name not in RESUME_OVERRIDES and not _same_setting(value, kept[name])
    ]
    if changed:
        raise ConfigError(
            f"--resume continues {folder.path} as it was started; these settings cannot change: "
            f"{', '.join(changed)} (only {', '.join(map(_flag, RESUME_OVERRIDES))} can). Start a "
            "new run to change the others"
        )
    overrides = {k: v for k, v in requested.items() if k in RESUME_OVERRIDES}
    overrides["data_root"] = data_root_for(requested.get("data_root"), saved.data_root)
    return TrainConfig.from_dict({**kept, **overrides}, source="--resume")


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
    configuration (``config`` is ignored; ``overrides`` holds the settings the resuming command
    gave, see :func:`resumed_config`), and without changes it ends with exactly the parameters
    an uninterrupted run would have. A run stopped before its first checkpoint starts again from
    iteration 0.

    The run holds an exclusive lock on ``run_dir`` while it runs (a second run into it is
    refused), checks the folder can be written before it loads any data, and handles SIGTERM
    like SIGINT (:class:`~mrmeta.errors.TrainingInterrupted` says where it stopped). A new run
    that fails before it trained anything (bad data, out of memory) leaves no folder behind.

    With ``config.distributed`` the process joins the process group torchrun set up; rank 0
    alone writes ``run_dir`` (to resume, every rank reads ``last.pt``, so on several nodes
    ``run_dir`` must be on a shared filesystem). A failed or timed-out peer raises
    :class:`~mrmeta.distributed.DistributedError` instead of hanging.

    Returns:
        The contents of ``result.json`` (on ranks other than 0: an empty dict).
    """
    folder = RunFolder(run_dir)
    if resume:
        config = resumed_config(folder, overrides)
    elif config is None:
        raise ValueError("train() needs a config for a new run")
    else:
        folder.check_new()
        config = effective_config(config.replace(data_root=absolute_data_root(config.data_root)))
    _refuse_undeclared_launch(config)
    ctx = DistContext()
    with _sigterm_as_interrupt():
        if config.distributed:
            ctx = init_distributed(config.device, config.dist_timeout)
        try:
            return _train(config, folder, ctx, resume=resume, progress=progress)
        except DistributedError as err:
            raise DistributedError(
                f"{err}; the last checkpoint is {folder.file(LAST)}: relaunch the same torchrun "
                "command with --resume to continue"
            ) from err
        finally:
            shutdown(ctx)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the run is, so that it stops as it does on SIGINT."""


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """While training, SIGTERM raises :class:`_Terminated` (a ``KeyboardInterrupt``)."""
    if threading.current_thread() is not threading.main_thread():  # signals: main thread only
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _refuse_undeclared_launch(config: TrainConfig) -> None:
    """Several processes without ``--distributed`` would each train the whole run alone."""
    world = launched_world_size()
    if world > 1 and not config.distributed:
        raise ConfigError(
            f"launched as {world} processes (WORLD_SIZE={world}) but --distributed is off, so "
            "each would train the whole run alone; add --distributed (a resumed run keeps the "
            "setting it was started with)"
        )


KEEP_FOLDER_ON = (KeyboardInterrupt, TrainingDiverged, DistributedError, RunWriteError)
"""Failures after which a new run's folder stays (it can be resumed); after any other failure
before the first trained checkpoint, the folder is removed so the command can be rerun."""


def _train(
    config: TrainConfig, folder: RunFolder, ctx: DistContext, *, resume: bool, progress: bool
) -> dict[str, Any]:
    check_on_main(lambda: folder.acquire(resume=resume), ctx)
    run: TrainingRun | None = None
    try:
        run = TrainingRun(config, folder, progress=progress and ctx.is_main, dist=ctx)
        return _train_locked(run, ctx, resume=resume)
    except KeyboardInterrupt as err:
        raise _interrupted(folder, run, err, ctx) from None
    except BaseException as err:
        trained = (folder.saved_iteration or 0) > 0
        if ctx.is_main and not resume and not trained and not isinstance(err, KEEP_FOLDER_ON):
            folder.discard()
        raise
    finally:
        folder.release()


def _train_locked(run: TrainingRun, ctx: DistContext, *, resume: bool) -> dict[str, Any]:
    folder = run.folder
    if resume and folder.has_checkpoint():
        run.load_state_dict(folder.load(LAST))
        folder.saved_iteration = run.progress.iteration
    if not ctx.is_main:
        run.fit(None)
        return {}
    if folder.read_identity() is None or not resume:
        folder.start_identity()
    folder.write_json(CONFIG_FILE, run.config.to_dict())
    if folder.saved_iteration is None and not ctx.enabled:
        run.checkpoint(LAST)  # iteration 0: a run killed before its first checkpoint resumes
    log = folder.open_log(resume_iteration=run.progress.iteration)
    try:
        run.fit(log)
        return finish(run)
    except (RuntimeError, MemoryError) as err:  # out of memory in validation or the test
        if is_out_of_memory(err) and not isinstance(err, OutOfMemory):
            raise run._out_of_memory(err) from None
        raise
    finally:
        log.close()


def _interrupted(
    folder: RunFolder, run: TrainingRun | None, err: KeyboardInterrupt, ctx: DistContext
) -> TrainingInterrupted:
    """Where the run stopped, what is intact, and how to continue it, in one line."""
    name, number = ("SIGTERM", 15) if isinstance(err, _Terminated) else ("SIGINT", 2)
    where = "before training started" if run is None else f"at iteration {run.progress.iteration}"
    resume = (
        "relaunch the same torchrun command with --resume"
        if ctx.enabled
        else f"mrmeta train --out {shlex.quote(str(folder.path))} --resume"
    )
    if folder.saved_iteration is not None:
        intact = folder.last_good()
    elif folder.has_checkpoint():
        intact = f"The checkpoint {folder.file(LAST)} is intact"
    elif folder.file(CONFIG_FILE).exists():
        intact = "No checkpoint was written yet (it starts again from iteration 0)"
    else:
        return TrainingInterrupted(
            f"stopped by {name} {where}; nothing was trained: run the same command again", number
        )
    return TrainingInterrupted(
        f"stopped by {name} {where}; {intact}: continue with '{resume}'", number
    )


def finish(run: TrainingRun) -> dict[str, Any]:
    """Test the best-validation parameters, write ``result.json`` and the learning curves."""
    tested = BEST if run.folder.file(BEST).exists() else LAST
    if tested == BEST:
        run.learner.load_state_dict(run.folder.load(BEST)["learner"])
    test = run.test() if run.config.test_tasks > 0 else None  # 0: the test split is not read
    result = {
        "algo": run.config.algo,
        "dataset": run.config.dataset,
        "ways": run.config.ways,
        "shots": run.config.shots,
        "iterations": run.progress.iteration,
        "train_seconds": run.progress.train_seconds,
        "best_val_accuracy": run.progress.best_val,
        "test_accuracy": None if test is None else test.mean,
        "test_ci95": None if test is None else test.ci95,
        "test_tasks": 0 if test is None else test.tasks,
        "test_protocol": run.config.eval_protocol,
        "tested_checkpoint": tested,
        "run_id": run.folder.run_id,
    }
    run.folder.write_json(RESULT, result)
    with run.folder.writing("curves.png"):
        _plot(run.run_dir)
    return result


def _plot(run_dir: Path) -> None:
    try:
        from mrmeta._plots import plot_learning_curves
    except ImportError:  # matplotlib is optional
        return
    plot_learning_curves(read_metrics(run_dir / METRICS), run_dir / "curves.png")
