"""Image files on disk, under `<data_dir>/images/<jobId>/<index>.<attempt>.png`: one directory every node mounts."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
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
        await asyncio.to_thread(_write_atomically, self._data_dir / relative, data)
        return relative

    async def delete_job(self, job_id: str) -> None:
        """Remove a job's image files (after its row is gone, so no URL points at them)."""
        await asyncio.to_thread(shutil.rmtree, self._data_dir / "images" / job_id, True)

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
    # Write, fsync, rename: a crash leaves either no file or the whole file, never a torn PNG
    # that the database already points at (the database records the path only after this).
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)


IMAGES = web.AppKey("images", ImageStore)
