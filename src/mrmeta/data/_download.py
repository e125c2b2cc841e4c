"""Download a file with a checksum, and unpack a zip, so that nothing half-done counts as data.

A download streams into a hidden temporary file next to its destination and is renamed into
place only after its checksum matched; a zip is unpacked into a hidden temporary folder and its
top folder renamed into place in one step. An interrupted run leaves only hidden ``.part`` /
``.unpack`` leftovers, which are never read as data (and are cleaned up when possible).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from tqdm.auto import tqdm

from mrmeta.data._errors import DataError
from mrmeta.data._paths import HOW_TO_POINT

_CHUNK = 1 << 20


def file_digests(path: Path) -> tuple[str, str]:
    """``(sha256, md5)`` hex digests of a file."""
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            sha.update(block)
            md5.update(block)
    return sha.hexdigest(), md5.hexdigest()


def verify_checksum(path: Path, *, sha256: str | None, md5: str | None, source: str) -> None:
    """Check ``path`` against the expected digests (those that are not ``None``).

    Raises:
        DataError: a digest differs; the message gives both values and the fix.
    """
    got_sha, got_md5 = file_digests(path)
    for kind, want, got in (("sha256", sha256, got_sha), ("md5", md5, got_md5)):
        if want is not None and want.lower() != got:
            raise DataError(
                f"checksum mismatch for {source}: expected {kind} {want}, got {got}; the download "
                "is corrupt or the file changed upstream; retry, or place a verified copy under "
                f"the data root ({HOW_TO_POINT})"
            )


def make_folder(folder: Path) -> None:
    """``mkdir -p folder``, or a one-line :class:`DataError` saying why it cannot be."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot create {folder} to download into ({err}); {HOW_TO_POINT}") from err


def download_file(
    url: str,
    dest: Path,
    *,
    sha256: str | None = None,
    md5: str | None = None,
    timeout: float = 60.0,
) -> Path:
    """Download ``url`` to ``dest`` atomically, verifying its checksum.

    The bytes go to a hidden temporary file in ``dest``'s folder, which is renamed to ``dest``
    only when the checksum matched; on any failure it is deleted.

    Raises:
        DataError: network failure (the message says how to use a local copy instead) or
            checksum mismatch.
    """
    make_folder(dest.parent)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            _stream(url, out, timeout)
        verify_checksum(tmp, sha256=sha256, md5=md5, source=url)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _stream(url: str, out: BinaryIO, timeout: float) -> None:
    """Copy ``url`` into ``out``, with a progress bar on a terminal (tqdm; none otherwise)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            name = url.rsplit("/", 1)[-1]
            bar = {"total": total, "desc": name, "unit": "B", "unit_scale": True}
            with tqdm.wrapattr(out, "write", **bar, unit_divisor=1024, disable=None) as sink:
                shutil.copyfileobj(response, sink, _CHUNK)
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise DataError(
            f"could not download {url} ({err}); offline, copy the data to a folder and "
            f"{HOW_TO_POINT}"
        ) from err


def check_zip_members(archive: Path, top: str) -> list[str]:
    """Names of the files in ``archive``, all of which must lie under the folder ``top/``.

    Raises:
        DataError: not a zip, or a member outside ``top/`` (absolute, ``..``, another folder).
    """
    try:
        with zipfile.ZipFile(archive) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError) as err:
        raise DataError(f"{archive} is not a readable zip ({err}); delete it and retry") from err
    for name in names:
        parts = PurePosixPath(name).parts
        if name.startswith("/") or ".." in parts or "\\" in name or not parts or parts[0] != top:
            raise DataError(
                f"{archive}: member {name!r} is outside '{top}/'; this is not the expected "
                "archive; delete it and retry"
            )
    return [n for n in names if not n.endswith("/")]


def extract_zip(archive: Path, parent: Path, top: str) -> Path:
    """Unpack ``archive`` (whose members all lie under ``top/``) to ``parent/top`` atomically.

    Returns:
        ``parent / top``. If it already exists, nothing is extracted.
    """
    target = parent / top
    if target.is_dir():
        return target
    check_zip_members(archive, top)
    staging = Path(tempfile.mkdtemp(prefix=f".{top}.", suffix=".unpack", dir=parent))
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(staging)
        try:
            os.rename(staging / top, target)
        except OSError:
            if not target.is_dir():  # another process may have finished first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
