"""The repository stands alone: no tracked file refers to a document or folder outside it.

The method, the paper's numbers and the design notes live in ``docs/``; a reference to the
private planning documents this project started from, or to a sibling ``shared`` folder, is
one a user who clones the repository cannot follow.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The planning documents by name (written so that this file does not match itself).
OUTSIDE_DOCUMENTS = re.compile(r"\b(?:PAPER|DESIGN|STYLE)\.md\b")
# A folder next to the checkout, by relative or absolute path.
OUTSIDE_FOLDER = re.compile(r"(?:\.\./|/work/)shared\b")

# May locate the CI machine's data copy outside the checkout.
FOLDER_ALLOWED = {".ci/run"}
# Still read the real Omniglot copy from the sibling folder, until they switch to
# $MRMETA_DATA and the download command. Remove a file from here once it no longer needs it:
# the test fails on an entry that has become unnecessary, so the list can only shrink.
FOLDER_PENDING: set[str] = set()


def outside_references(text: str, *, folder: bool = True) -> list[str]:
    """The references to things outside the repository in ``text``, one string per line found.

    Args:
        text: a file's contents.
        folder: also look for the sibling folder (else only for the documents).

    Returns:
        ``"<line number>: <line>"`` for every line with such a reference.
    """
    hits = []
    for number, line in enumerate(text.splitlines(), start=1):
        if OUTSIDE_DOCUMENTS.search(line) or (folder and OUTSIDE_FOLDER.search(line)):
            hits.append(f"{number}: {line.strip()}")
    return hits


def tracked_text_files() -> dict[str, str]:
    """``{path relative to the root: text}`` of every UTF-8 text file git tracks or would track
    (new files not yet committed included, ignored files excluded)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the tracked files are unknown")
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    files = {}
    for name in filter(None, listing.split("\0")):
        path = ROOT / name
        if not path.is_file():  # deleted in the working tree, not yet committed
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue  # binary (plots)
        try:
            files[name] = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
    return files


def test_the_checker_finds_each_kind_of_reference() -> None:
    paper, design, style = "PAPER" + ".md", "DESIGN" + ".md", "STYLE" + ".md"
    sibling = ".." + "/shared/data"
    text = "\n".join(
        [
            "see docs/method.md §3",  # inside: fine
            f"as {paper} §2 says",
            f"({design}, Measuring)",
            f"read {style} once",
            f"--data-root {sibling}",
            "MY_PAPER.mdx and shared/ alone are not references",
        ]
    )
    assert outside_references(text) == [
        f"2: as {paper} §2 says",
        f"3: ({design}, Measuring)",
        f"4: read {style} once",
        f"5: --data-root {sibling}",
    ]
    assert len(outside_references(text, folder=False)) == 3


def test_no_tracked_file_refers_outside_the_repository() -> None:
    files = tracked_text_files()
    assert "README.md" in files and "tests/test_repository.py" in files
    found = {}
    for name, text in files.items():
        exempt = name in FOLDER_ALLOWED or name in FOLDER_PENDING
        hits = outside_references(text, folder=not exempt)
        if hits:
            found[name] = hits
    assert not found, "references to files outside the repository (point them at docs/): " + (
        "; ".join(f"{name} line {hit}" for name, hits in found.items() for hit in hits)
    )


def test_every_pending_exemption_is_still_needed() -> None:
    files = tracked_text_files()
    done = sorted(
        name
        for name in FOLDER_PENDING
        if name not in files or not OUTSIDE_FOLDER.search(files[name])
    )
    assert not done, f"remove {', '.join(done)} from FOLDER_PENDING: no sibling-folder path left"
