"""GET /images/{jobId}/{index}.png: real PNGs from disk, cacheable, and nothing but what the database names."""

from __future__ import annotations

import io
import uuid

import pytest
from aiohttp.test_utils import TestClient
from PIL import Image

from .conftest import create_job, wait_for_status


async def test_images_are_real_pngs_of_the_configured_size(make_client) -> None:
    client = await make_client(provider={"image_size": 96})
    job_id = await create_job(client, numImages=2, animal="fox")
    job = await wait_for_status(client, job_id, {"completed"})
    pictures = []
    for url in job["imageUrls"]:
        response = await client.get(url.split(str(client.make_url("")).rstrip("/"), 1)[1])
        assert response.status == 200
        assert response.headers["Content-Type"] == "image/png"
        assert "immutable" in response.headers["Cache-Control"]
        assert response.headers["ETag"]
        image = Image.open(io.BytesIO(await response.read()))
        assert image.format == "PNG" and image.size == (96, 96)
        # A picture, not a solid colour.
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 20
        pictures.append(image.tobytes())
    assert pictures[0] != pictures[1], "each image of a job differs"


async def test_etag_revalidation_answers_304(client: TestClient) -> None:
    job_id = await create_job(client)
    await wait_for_status(client, job_id, {"completed"})
    first = await client.get(f"/images/{job_id}/0.png")
    again = await client.get(f"/images/{job_id}/0.png", headers={"If-None-Match": first.headers["ETag"]})
    assert again.status == 304


@pytest.mark.parametrize("backend", ["sqlite"])  # the provider alone: no database involved
async def test_same_job_and_index_draw_the_same_picture(tmp_path, make_client) -> None:
    # Determinism: a job recovered after a crash redraws exactly what it would have drawn.
    from imagegen.providers import ImageRequest, ProviderSettings
    from imagegen.providers.local import LocalProvider

    provider = LocalProvider(ProviderSettings(image_size=64))
    request = ImageRequest(job_id=str(uuid.uuid4()), index=1, animal="owl", size=64, attempt=1, prompt="an owl")
    assert await provider.generate(request) == await provider.generate(request)


@pytest.mark.parametrize(
    "path",
    [
        "/images/{job}/1.png",  # index past the job's images
        "/images/{job}/01.png",  # not the canonical index
        "/images/{other}/0.png",  # unknown job
        "/images/not-a-uuid/0.png",
        "/images/{job}/0.jpg",
        "/images/{job}/..%2F..%2Fimagegen.sqlite3",
        "/images/..%2Fimagegen.sqlite3/0.png",
        "/images/{job}/%2E%2E/0.png",
    ],
)
async def test_anything_else_under_images_is_404(client: TestClient, path: str) -> None:
    job_id = await create_job(client)
    await wait_for_status(client, job_id, {"completed"})
    response = await client.get(path.format(job=job_id, other=uuid.uuid4()))
    assert response.status == 404
    assert response.content_type == "application/problem+json"


@pytest.mark.parametrize("index", ["9" * 5000, "٠", "1234567"])
async def test_absurd_or_foreign_digit_indexes_are_404_not_500(client: TestClient, index: str) -> None:
    job_id = await create_job(client)
    await wait_for_status(client, job_id, {"completed"})
    response = await client.get(f"/images/{job_id}/{index}.png")
    assert response.status == 404
