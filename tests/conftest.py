"""Shared test settings."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    """Tests use tiny tensors: intra-op threads only add overhead (10-100x slower on a busy
    2-core machine), and one thread keeps results independent of the machine's core count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _no_internet_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Omniglot downloads by default when no copy is found: point its official source at a
    closed loopback port, so a test never reaches the internet (the download tests serve
    their own archives on 127.0.0.1)."""
    from mrmeta.data import _omniglot_files

    monkeypatch.setattr(_omniglot_files, "OFFICIAL_URL", "http://127.0.0.1:9/omniglot")
