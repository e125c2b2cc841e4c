"""Exceptions raised by the data pipeline.

Every error the data pipeline raises for bad user input is a :class:`DataError`, so the CLI can
catch one class and print a one-line message. Messages name what was expected, what was found and
how to fix it.
"""

from __future__ import annotations


class DataError(ValueError):
    """Bad dataset name, split, option, file or task shape (one line, names the fix)."""


class DataNotFoundError(DataError, FileNotFoundError):
    """The dataset files are not where they were looked for (also a ``FileNotFoundError``)."""
