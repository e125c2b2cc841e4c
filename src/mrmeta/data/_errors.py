"""Exceptions raised by the data pipeline.

Every error the data pipeline raises for bad user input is a :class:`DataError`, so the CLI can
catch one class and print a one-line message. Messages name what was expected, what was found and
how to fix it. Both classes live in :mod:`mrmeta.errors` (under :class:`~mrmeta.errors.MrmetaError`)
and are re-exported here.
"""

from __future__ import annotations

from mrmeta.errors import DataError, DataNotFoundError

__all__ = ["DataError", "DataNotFoundError"]
