"""Image files on disk, under `<data_dir>/images/<jobId>/<index>.<attempt>.png`: one directory every node mounts."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from pathlib import Path

from aiohttp import web

from .errors import StartupError


class ImageStore:
    """Writes image files atomically and resolves the relative paths the database keeps."""

    def __init__(self, data_dir: Path) -> None:
        self._data_dir = data_dir

    async def save(self, job_id: str, index: int, attempt: int, data: bytes) -> str:
        """Store one image durably; return its path relative to data_dir.

        Each attempt writes files of its own: a stale attempt (its node paused past its lease
        while another node drew the job again) must not overwrite the file that the winning
        attempt recorded, which clients cache as immutable. The database says which file is
        the job's; the others go with the job's directory.
        """
        relative = f"images/{job_id}/{index}.{attempt}.png"
        # The thread cannot be stopped: a caller cancelled meanwhile (its job was canceled)
        # waits for it, and removes what it wrote, so a cancel never leaves a file behind.
        writing = asyncio.ensure_future(asyncio.to_thread(_write_atomically, self._data_dir / relative, data))
        try:
            await asyncio.shield(writing)
        except asyncio.CancelledError:
            await asyncio.gather(writing, return_exceptions=True)
            await self.discard(relative)
            raise
        return relative

    async def discard(self, relative: str) -> None:
        """Remove an image the database did not take (its attempt lost, its job was canceled or
        deleted meanwhile), and the job's directory if that leaves it empty: a delete that ran
        while the image was being written may have found the directory and removed the rest."""
        await asyncio.to_thread(_discard, self._data_dir / relative)

    async def delete_job(self, job_id: str) -> None:
        """Remove a job's image files (after its row is gone, so no URL points at them)."""
        await asyncio.to_thread(shutil.rmtree, self._data_dir / "images" / job_id, True)

    def job_dirs(self) -> list[str]:
        """The job ids that have an image directory."""
        images = self._data_dir / "images"
        return [entry.name for entry in os.scandir(images) if entry.is_dir()] if images.is_dir() else []

    async def sweep(self, gone: list[str], temp_older_than_s: float) -> int:
        """Remove the directories of jobs that no longer exist (`gone`), and temporary files
        older than `temp_older_than_s` that a crash left mid-write; return how many entries went."""
        return await asyncio.to_thread(_sweep, self._data_dir / "images", gone, temp_older_than_s)

    def path(self, relative: str) -> Path:
        """The file behind a path the database recorded."""
        return self._data_dir / relative


def check_data_dir(data_dir: Path) -> None:
    """Make sure images can be stored under `data_dir` (creating it), or raise StartupError.

    Run at start-up, so that a directory that cannot be created or written stops the service
    with one line instead of failing every job later.
    """
    images = data_dir / "images"
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"cannot create the data directory {data_dir}: {exc.strerror or exc}") from None
    try:
        images.mkdir(exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=images, prefix=".probe-", suffix=".tmp"):
            pass
    except OSError as exc:
        raise StartupError(f"cannot write in the data directory {data_dir}: {exc.strerror or exc}") from None


def _write_atomically(path: Path, data: bytes) -> None:
    # Write, fsync, rename, fsync the directory: a crash or a power loss leaves either no file
    # or the whole file, never a torn or missing PNG that the database already points at (the
    # database records the path only after this returns).
    if not path.parent.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        _fsync_dir(path.parent.parent)  # the new job directory's own entry in images/
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)  # the rename itself


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _discard(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.with_suffix(".tmp").unlink(missing_ok=True)
    try:
        path.parent.rmdir()  # only if empty: the job's other images stay
    except OSError:
        pass


def _sweep(images: Path, gone: list[str], temp_older_than_s: float) -> int:
    removed = 0
    for job_id in gone:
        if (images / job_id).is_dir():
            shutil.rmtree(images / job_id, ignore_errors=True)
            removed += 1
    cutoff = time.time() - temp_older_than_s
    for tmp in images.glob("*/*.tmp"):
        try:
            if tmp.stat().st_mtime <= cutoff:
                tmp.unlink()
                removed += 1
        except FileNotFoundError:
            pass
    return removed


IMAGES = web.AppKey("images", ImageStore)
