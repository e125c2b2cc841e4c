"""A run folder: its files, its lock, its identity, its checkpoints and its metrics log.

A run folder holds ``config.json`` (the settings), ``run.json`` (the run's identity),
``metrics.jsonl`` (one JSON record per line), ``last.pt`` and ``best.pt`` (checkpoints),
``result.json`` and ``curves.png`` (the final test), and ``.lock``.

- **Lock.** A run holds an exclusive ``fcntl.flock`` on ``.lock`` while it writes the folder;
  the operating system releases it when the process ends, however it ends (``kill -9``
  included). A second run into a locked folder is refused with one line.
- **Identity.** ``run.json`` holds a random ``run_id`` drawn when the run started, and every
  checkpoint carries the same ``run_id``; resuming or evaluating a checkpoint of another run
  (a ``last.pt`` copied from elsewhere) is refused with one line. Folders written before run
  identities existed have no ``run.json`` and are accepted as they are.
- **Checkpoints** are written atomically (a temporary file, fsync, rename), never with
  non-finite parameters, and a failed write names the file and says that the previous
  checkpoint is intact.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from mrmeta._checkpoint import MetricsLog, load_checkpoint, save_checkpoint, write_json
from mrmeta.errors import CheckpointError, RunFolderError, RunWriteError, TrainingDiverged

CONFIG_FILE, IDENTITY_FILE, LOCK_FILE = "config.json", "run.json", ".lock"
LAST, BEST, METRICS, RESULT, CURVES = (
    "last.pt",
    "best.pt",
    "metrics.jsonl",
    "result.json",
    "curves.png",
)
TENSORBOARD = "tensorboard"
RUN_FILES = (CONFIG_FILE, IDENTITY_FILE, LAST, BEST, METRICS, RESULT, CURVES)
"""The files a run writes (besides ``.lock`` and the ``tensorboard`` folder)."""


def _first_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _is_temporary(name: str) -> bool:
    """A temporary file of an atomic write (``.last.pt.<random>.tmp``) a kill left behind."""
    return name.startswith(".") and name.endswith(".tmp")


def nonfinite_tensors(tree: Any, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors in a nested dict/list that hold a NaN or an inf."""
    if isinstance(tree, torch.Tensor):
        bad = tree.is_floating_point() and not bool(torch.isfinite(tree).all())
        return [prefix or "tensor"] if bad else []
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list | tuple):
        items = enumerate(tree)
    else:
        return []
    return [
        n for k, v in items for n in nonfinite_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    ]


class RunFolder:
    """The folder ``--out`` of one run (see the module docstring for what it holds).

    Args:
        path: the folder, as the user gave it (messages name it so).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.run_id: str | None = None
        self.saved_iteration: int | None = None
        """Iteration of the newest ``last.pt`` this process wrote or read (``None``: none yet)."""
        self._lock_handle: Any = None
        self._created = False

    def file(self, name: str) -> Path:
        return self.path / name

    def has_checkpoint(self) -> bool:
        return self.file(LAST).exists()

    # ------------------------------------------------------------------ states
    def check_new(self) -> None:
        """Refuse a new run into a file, or into a folder that holds a run with a checkpoint or
        files that are not a run's (reads only). A folder whose run never wrote a checkpoint
        (killed between ``config.json`` and the first ``last.pt``) is restarted."""
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(f"--out {self.path} is a file, not a folder; choose a folder path")
        if not self.path.is_dir():
            return
        present = {p.name for p in self.path.iterdir()} - {LOCK_FILE}
        if not present:
            return
        if self.has_checkpoint() or CONFIG_FILE not in present:
            raise RunFolderError(
                f"--out {self.path} already exists and is not empty; pass --resume to continue "
                "that run, or choose a new --out folder"
            )
        unknown = {n for n in present - set(RUN_FILES) - {TENSORBOARD} if not _is_temporary(n)}
        if unknown:
            raise RunFolderError(
                f"--out {self.path} holds a run without a checkpoint and other files "
                f"({', '.join(sorted(unknown))}); move them away or choose a new --out folder"
            )

    def check_resumable(self) -> None:
        """Require a run to resume: ``config.json`` (``last.pt`` too, unless none was written)."""
        if not self.file(CONFIG_FILE).exists():
            raise RunFolderError(
                f"--resume: {self.path} holds no run to resume (no {CONFIG_FILE}); start a new "
                "run without --resume"
            )

    # ------------------------------------------------------------------ lock
    def acquire(self, *, resume: bool) -> None:
        """Create the folder if needed and take its lock; check its state again under the lock.

        Raises:
            RunFolderError: the folder cannot be created or written, another run holds it, or
                (checked again now that no other run can change it) it is not what was asked.
        """
        self._created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            handle = self.file(LOCK_FILE).open("a+")
        except OSError as err:
            self._created = False
            raise RunFolderError(
                f"--out {self.path} cannot be created or written ({_first_line(err)}); choose a "
                "folder you can write to"
            ) from None
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            handle.close()
            raise RunFolderError(
                f"{self.path} is in use by another mrmeta run (pid {holder}); wait until it "
                "ends, or choose another --out folder"
            ) from None
        self._lock_handle = handle
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        if resume:
            self.check_resumable()
        else:
            self.check_new()

    def release(self) -> None:
        """Give the lock back (the OS also does when the process ends)."""
        if self._lock_handle is not None:
            with contextlib.suppress(OSError):
                self._lock_handle.close()
            self._lock_handle = None

    def discard(self) -> None:
        """Remove what a new run wrote when it failed before any training was saved, so that the
        same command (corrected) can start again; the folder too if this run created it."""
        for name in RUN_FILES:
            with contextlib.suppress(OSError):
                self.file(name).unlink(missing_ok=True)
        for temporary in self.path.glob(".*.tmp"):  # left by a write that failed mid-way
            with contextlib.suppress(OSError):
                temporary.unlink()
        shutil.rmtree(self.file(TENSORBOARD), ignore_errors=True)
        if self._created:
            with contextlib.suppress(OSError):
                self.file(LOCK_FILE).unlink(missing_ok=True)
                self.path.rmdir()

    # ------------------------------------------------------------------ identity
    def start_identity(self) -> str:
        """Draw a new run's identity and write ``run.json``."""
        self.run_id = uuid.uuid4().hex
        self.write_json(IDENTITY_FILE, {"run_id": self.run_id})
        return self.run_id

    def read_identity(self) -> str | None:
        """The folder's ``run_id`` (``None`` for a folder written before run identities)."""
        path = self.file(IDENTITY_FILE)
        if not path.exists():
            return None
        try:
            run_id = json.loads(path.read_text())["run_id"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(
                f'{path} is damaged ({_first_line(err)}); it should hold {{"run_id": ...}}'
            ) from None
        self.run_id = str(run_id)
        return self.run_id

    def check_identity(self, state: dict[str, Any], path: Path) -> None:
        """Refuse a checkpoint whose ``run_id`` is not this folder's."""
        if self.run_id is None:
            self.read_identity()
        if self.run_id is None:  # a folder from before run identities
            return
        theirs = state.get("run_id")
        if theirs != self.run_id:
            raise CheckpointError(
                f"{path} belongs to another run (run id {theirs or 'none'}, {self.path} is run "
                f"{self.run_id}); put this run's own checkpoint back, or use the run it came from"
            )

    # ------------------------------------------------------------------ files
    def load(self, name: str) -> dict[str, Any]:
        """A checkpoint of this run (identity checked)."""
        path = self.file(name)
        state = load_checkpoint(path)
        if not isinstance(state, dict) or "config" not in state or "learner" not in state:
            raise CheckpointError(f"{path} is not an mrmeta checkpoint (no saved config)")
        self.check_identity(state, path)
        return state

    def save(self, name: str, state: dict[str, Any], iteration: int) -> None:
        """Write checkpoint ``name`` atomically, stamped with the run's identity.

        Raises:
            TrainingDiverged: a parameter is NaN or inf (nothing is written).
            RunWriteError: the write failed (the previous file of that name is intact).
        """
        bad = nonfinite_tensors(state.get("learner", {}))
        if bad:
            raise TrainingDiverged(
                f"the parameters became non-finite at iteration {iteration} ({bad[0]}); "
                f"{name} was not written. {self.last_good()}: lower --lr or --inner-lr and --resume"
            )
        with self.writing(name):
            save_checkpoint(self.file(name), {**state, "run_id": self.run_id})
        if name == LAST:
            self.saved_iteration = iteration

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        with self.writing(name):
            write_json(self.file(name), data)

    def open_log(self, resume_iteration: int | None) -> MetricsLog:
        with self.writing(METRICS):
            return MetricsLog(self.path, resume_iteration=resume_iteration)

    def last_good(self) -> str:
        """Where the run can continue from, in words."""
        if self.saved_iteration is None:
            return "No checkpoint was written yet"
        last = self.file(LAST)
        return f"The last good checkpoint {last} (iteration {self.saved_iteration}) is intact"

    @contextlib.contextmanager
    def writing(self, name: str) -> Any:
        """Turn an ``OSError`` (disk full, read-only filesystem, ...) into one line naming the
        file and saying what is still intact."""
        try:
            yield
        except RunWriteError:
            raise
        except OSError as err:
            intact = self.last_good()
            raise RunWriteError(
                f"cannot write {self.file(name)} ({_first_line(err)}); {intact[0].lower()}"
                f"{intact[1:]}: free space or fix the folder, then --resume"
            ) from None
