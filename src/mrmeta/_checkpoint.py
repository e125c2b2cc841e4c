"""Atomic checkpoints and the JSON-lines metrics log of a run folder."""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from mrmeta.errors import CheckpointError


def atomic_write_bytes(path: Path, write: Any) -> None:
    """Write a file by ``write(fileobj)`` into a temporary file beside ``path``, fsync, rename.

    A reader (or a run killed mid-write) sees the old file or the new one, never a half one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` the state atomically."""
    atomic_write_bytes(path, lambda handle: torch.save(state, handle))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no arbitrary code from the file)."""
    try:
        with warnings.catch_warnings():  # torch's protocol warning repeats the unsafe advice
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"no checkpoint at {path}; nothing to resume") from err
    except pickle.UnpicklingError as err:  # torch's text advises weights_only=False: unsafe
        raise CheckpointError(
            f"checkpoint {path} cannot be read: it is not a file of tensors and plain "
            "containers (refused without running anything in it); it is damaged, not an mrmeta "
            "checkpoint, or was tampered with"
        ) from err
    except Exception as err:  # a corrupt or foreign file: say so in one line
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(err).__name__}: "
            f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}); it is damaged or "
            "not an mrmeta checkpoint"
        ) from err


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON atomically."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(path, lambda handle: handle.write(text.encode()))


class MetricsLog:
    """Append-only JSON lines (``metrics.jsonl``), plus TensorBoard scalars when installed.

    On resume the lines past the checkpoint's iteration are dropped, so the log of a resumed
    run is the log of an uninterrupted one; so is a torn last line (a run killed while it
    wrote it).
    """

    def __init__(self, run_dir: Path, *, resume_iteration: int | None = None) -> None:
        self.path = run_dir / "metrics.jsonl"
        if resume_iteration is not None:
            self._truncate(resume_iteration)
        self._handle = self.path.open("a")
        self._tensorboard = _tensorboard_writer(run_dir / "tensorboard")

    def _truncate(self, iteration: int) -> None:
        if not self.path.exists():
            return
        kept = [
            json.dumps(record, sort_keys=True)
            for record in read_metrics(self.path)
            if record.get("iteration", 0) <= iteration
        ]
        write_json_lines(self.path, kept)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (one line) and flush."""
        self._handle.write(json.dumps(record, sort_keys=True) + "\n")
        self._handle.flush()
        if self._tensorboard is not None:
            step = int(record.get("iteration", 0))
            for key, value in record.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    self._tensorboard.add_scalar(
                        f"{record.get('kind', 'train')}/{key}", value, step
                    )

    def close(self) -> None:
        self._handle.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


def write_json_lines(path: Path, lines: list[str]) -> None:
    text = "".join(line + "\n" for line in lines)
    atomic_write_bytes(path, lambda handle: handle.write(text.encode()))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl``, without a torn last line (a kill mid-write).

    Raises:
        CheckpointError: a line other than the last is not JSON (the file was edited or damaged).
    """
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):  # torn by a kill while it was written: drop it
                break
            raise CheckpointError(
                f"{path} line {number} is not JSON; the metrics log is damaged (delete that line "
                "to continue)"
            ) from None
    return records


def _tensorboard_writer(log_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # TensorBoard is optional
        return None
    return SummaryWriter(log_dir=str(log_dir))
