"""Where dataset files live: the ``root`` argument, else ``$MRMETA_DATA``, else a cache folder."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from mrmeta.data._errors import DataNotFoundError

ENV_VAR = "MRMETA_DATA"
"""Environment variable that points at the data root (the CLI's ``--data-root`` overrides it)."""

HOW_TO_POINT = f"pass --data-root (root=...) or set {ENV_VAR} to the folder that holds it"


def default_data_root() -> Path:
    """The data root used when none is given.

    Returns:
        ``$MRMETA_DATA`` if set and non-empty, else ``$XDG_CACHE_HOME/mrmeta``, else
        ``~/.cache/mrmeta``. The folder need not exist.
    """
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(cache).expanduser() if cache else Path.home() / ".cache"
    return base / "mrmeta"


def resolve_root(root: str | os.PathLike[str] | None) -> Path:
    """``root`` as a path if given, else :func:`default_data_root`."""
    return Path(root).expanduser() if root is not None else default_data_root()


def candidate_dirs(root: Path, subdirs: Sequence[str]) -> list[Path]:
    """``root`` itself, then ``root/<subdir>`` for each name, keeping only existing folders."""
    dirs = [root, *(root / name for name in subdirs)]
    return [d for d in dirs if d.is_dir()]


def find_file(root: Path, subdirs: Sequence[str], filename: str, dataset: str) -> Path:
    """Find ``filename`` in ``root`` or one of its ``subdirs``.

    Raises:
        DataNotFoundError: naming every folder searched and how to point at the data.
    """
    for folder in candidate_dirs(root, subdirs):
        path = folder / filename
        if path.is_file():
            return path
    searched = ", ".join(str(root / s) for s in ("", *subdirs))
    raise DataNotFoundError(
        f"{dataset}: {filename} not found (searched {searched}); {HOW_TO_POINT}"
    )
