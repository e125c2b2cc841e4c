"""The exceptions ``mrmeta`` raises for user mistakes and for runs that cannot go on.

Every one of them is a :class:`MrmetaError`, so a caller (the command line among them) can catch
one class and show its message, which is one line saying what was wrong and how to fix it.

- :class:`ConfigError`: a bad setting, flag or config file.
- :class:`DataError`: a bad dataset name, option, file or task shape
  (:class:`DataNotFoundError`: the files are not where they were looked for).
- :class:`CheckpointError`: a checkpoint that is damaged, foreign, or of another run.
- :class:`RunFolderError`: a run folder that is in use, not writable, or holds no run.
- :class:`RunWriteError`: writing into the run folder failed during a run (disk full,
  read-only filesystem); the last good checkpoint is intact.
- :class:`TrainingDiverged`: too many non-finite meta-steps, or non-finite parameters.
- :class:`OutOfMemory`: a meta-batch too large for the memory there is.
- :class:`TrainingInterrupted`: SIGINT or SIGTERM stopped a run; the message says how to resume.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class MrmetaError(Exception):
    """Base class of the user-facing errors; the message is one line that names the fix."""


class ConfigError(MrmetaError, ValueError):
    """A bad configuration value or file; the message says which key and what is allowed.

    Errors about keys carry ``problems``: ``(key, text)`` pairs, one line ``"{key} {text}"``
    each, so a caller that knows where a key came from can name it as the user wrote it
    (``--time-budget`` for a flag, ``run.toml: time_budget`` for a file) with :meth:`renamed`.
    """

    def __init__(self, message: str = "", problems: Sequence[tuple[str, str]] = ()) -> None:
        self.problems = tuple(problems)
        super().__init__(message or "\n".join(f"{key} {text}" for key, text in self.problems))

    def renamed(self, name: Callable[[str], str]) -> ConfigError:
        """The same error with every key ``k`` of ``problems`` written as ``name(k)``."""
        if not self.problems:
            return self
        return ConfigError(problems=[(name(key), text) for key, text in self.problems])


class DataError(MrmetaError, ValueError):
    """Bad dataset name, split, option, file or task shape (one line, names the fix)."""


class DataNotFoundError(DataError, FileNotFoundError):
    """The dataset files are not where they were looked for (also a ``FileNotFoundError``)."""


class CheckpointError(MrmetaError, ValueError):
    """A checkpoint that cannot be read, is not an mrmeta checkpoint, or belongs to another run."""


class RunFolderError(MrmetaError):
    """A run folder that is locked by another run, cannot be created, or holds no run."""


class RunWriteError(MrmetaError, OSError):
    """A write into the run folder failed mid-run; the message names the file."""


class TrainingDiverged(MrmetaError, RuntimeError):
    """Too many consecutive meta-steps had a non-finite loss or meta-gradient, or the
    parameters themselves became non-finite (such a checkpoint is never written)."""


class OutOfMemory(MrmetaError, MemoryError):
    """The run needs more memory than the device has (lower ``--meta-batch``/``--chunk-size``)."""


class TrainingInterrupted(MrmetaError):
    """SIGINT or SIGTERM stopped the run; the message says where and how to resume.

    Attributes:
        signal_number: the signal (``2`` for SIGINT, ``15`` for SIGTERM).
    """

    def __init__(self, message: str, signal_number: int) -> None:
        super().__init__(message)
        self.signal_number = signal_number
