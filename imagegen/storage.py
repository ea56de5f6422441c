"""Image files on disk, under `<data_dir>/images/<jobId>/<index>.<attempt>.png`: one directory every node mounts."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

from aiohttp import web


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
