"""Read the pickles few-shot benchmarks are distributed as, without running their code.

``pickle.load`` calls whatever callable a file names, so a tampered dataset file can run any
command. :class:`RestrictedUnpickler` resolves only the handful of globals that numpy arrays and
plain containers need (``_reconstruct``, ``ndarray``, ``dtype``, numpy scalars, ``_frombuffer``
for protocol 5, ``set``/``frozenset``, ``_codecs.encode`` for Python-2-era byte strings) and
refuses everything else with a :class:`DataError` before it is called. Object dtypes are refused
too, since an object array would smuggle arbitrary objects back in: both when a dtype is made
and after its state is set (a pickle's BUILD of a dtype calls ``dtype.__setstate__``, which
accepts object flags on, e.g., a ``V8`` dtype; the array built with it would read its raw
bytes as object pointers). Checking after BUILD needs the pure-Python unpickler, whose
opcode table can be extended; its speed is the C one's for the large byte strings arrays are.
"""

from __future__ import annotations

import codecs
import importlib
import pickle
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mrmeta.data._errors import DataError

_LATIN1 = {"latin1", "latin-1", "iso-8859-1", "iso8859-1", "l1"}


def _numpy_attr(submodule: str, name: str) -> Any:
    """``numpy._core.<submodule>.<name>`` (numpy 2) or ``numpy.core.<submodule>.<name>`` (1.x)."""
    for package in ("numpy._core", "numpy.core"):
        try:
            return getattr(importlib.import_module(f"{package}.{submodule}"), name)
        except (ImportError, AttributeError):
            continue
    raise DataError(f"this numpy has no {submodule}.{name}; cannot read numpy pickles")


# numpy's dtype flags that mark items as Python objects: NPY_ITEM_REFCOUNT (= HASOBJECT),
# NPY_LIST_PICKLE, NPY_ITEM_IS_POINTER. Plain dtypes (numbers, bytes, void, structured records
# of those) have none of them.
_OBJECT_FLAGS = 0x01 | 0x02 | 0x04


def _refuse_object_dtype(dtype: np.dtype, source: str) -> None:
    """Raise :class:`DataError` if ``dtype`` holds, or claims to hold, Python objects."""
    if dtype.hasobject or dtype.flags & _OBJECT_FLAGS:
        raise DataError(
            f"{source}: refused a pickled numpy dtype with object flags ({dtype!r}, flags "
            f"{dtype.flags:#x}): an object array could hold any object. The file is not the "
            "standard distribution (or was tampered with): re-download it from its source"
        )


def _safe_dtype(*args: Any) -> np.dtype:
    """``numpy.dtype(*args)`` that refuses object dtypes."""
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise DataError("refused a pickled numpy array of dtype object (it could hold any object)")
    return dtype


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as old pickles use it (``str`` to ``bytes`` via latin-1), nothing else."""
    if not isinstance(text, str) or encoding.lower() not in _LATIN1:
        raise DataError("refused _codecs.encode with anything but (str, 'latin1') in a pickle")
    return codecs.encode(text, "latin1")


def _allowed() -> dict[tuple[str, str], Callable[..., Any]]:
    reconstruct = _numpy_attr("multiarray", "_reconstruct")
    scalar = _numpy_attr("multiarray", "scalar")
    frombuffer = _numpy_attr("numeric", "_frombuffer")
    table: dict[tuple[str, str], Callable[..., Any]] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): _safe_dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for package in ("numpy.core", "numpy._core"):
        table[(f"{package}.multiarray", "_reconstruct")] = reconstruct
        table[(f"{package}.multiarray", "scalar")] = scalar
        table[(f"{package}.numeric", "_frombuffer")] = frombuffer
    for module in ("builtins", "__builtin__"):
        table[(module, "set")] = set
        table[(module, "frozenset")] = frozenset
    return table


class RestrictedUnpickler(pickle._Unpickler):
    """An unpickler that admits only numpy arrays (non-object dtypes) and plain containers.

    Args:
        file: binary file object.
        source: name used in error messages (usually the path).
        **kwargs: passed to :class:`pickle.Unpickler` (e.g. ``encoding="latin1"`` for files
            written by Python 2).
    """

    def __init__(self, file: Any, *, source: str = "pickle", **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self._source = source
        self._table = _allowed()

    def find_class(self, module: str, name: str) -> Any:
        found = self._table.get((module, name))
        if found is None:
            raise DataError(
                f"{self._source}: refused to load '{module}.{name}' from a pickle; dataset files "
                "may hold only numpy arrays and plain containers. The file is not the standard "
                "distribution (or was tampered with): re-download it from its source"
            )
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise DataError(f"{self._source}: refused a pickle with persistent ids")

    def load_build(self) -> None:
        """BUILD (``inst.__setstate__(state)``), then refuse a dtype the state gave object flags."""
        super().load_build()
        if isinstance(self.stack[-1], np.dtype):
            _refuse_object_dtype(self.stack[-1], self._source)

    dispatch = {**pickle._Unpickler.dispatch, pickle.BUILD[0]: load_build}


def load_pickle(path: Path, *, encoding: str = "latin1") -> Any:
    """Unpickle ``path`` with :class:`RestrictedUnpickler`.

    Args:
        path: the file.
        encoding: how Python 2 ``str`` objects are decoded (``latin1`` keeps numpy buffers
            intact, as the MetaOptNet loaders do).

    Raises:
        DataError: the file names a global outside the allow-list, or is not a valid pickle.
    """
    with open(path, "rb") as handle:
        try:
            return RestrictedUnpickler(handle, source=str(path), encoding=encoding).load()
        except DataError:
            raise
        except (
            pickle.UnpicklingError,
            EOFError,
            ValueError,
            TypeError,
            KeyError,
            IndexError,
            AttributeError,
            SystemError,
            struct.error,
        ) as err:
            raise DataError(
                f"{path}: not a readable pickle ({type(err).__name__}: {err}); the file is "
                "truncated or in another format; re-download it"
            ) from err
