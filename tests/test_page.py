"""The live page in a real headless Chromium: submit through the form, watch the images land,
and keep up across a dropped stream by resuming from the last event id."""

from __future__ import annotations

import asyncio
import json
import signal
import urllib.request
from pathlib import Path

import pytest

from .browser import HOST, Browser, Page
from .serverproc import ServerProcess


@pytest.fixture
def backend() -> str:
    """The browser page talks only to the API, which the API tests check on both backends."""
    return "sqlite"

pytestmark = pytest.mark.browser

# Every image of the card has been fetched and decoded by the browser.
IMAGES_LOADED = """(() => {{
    const card = document.querySelector('#jobs li[data-status="{status}"]');
    const images = card ? [...card.querySelectorAll('img')] : [];
    return images.length === {count} && images.every(img => img.complete && img.naturalWidth > 0)
        ? images.map(img => img.naturalWidth) : null;
}})()"""


async def submit(page: Page, num_images: int, animal: str, prompt: str = "") -> None:
    """Fill in the page's form and press its button."""
    values = json.dumps({"numImages": str(num_images), "animal": animal, "prompt": prompt})
    await page.evaluate(f"""(() => {{
        const form = document.getElementById('new-job'), values = {values};
        for (const [name, value] of Object.entries(values)) form[name].value = value;
        form.querySelector('button').click();
    }})()""")


async def test_submitting_the_form_shows_the_job_and_its_images_as_they_land(make_client) -> None:
    client = await make_client(provider={"delay_s": 0.3, "image_size": 96})
    async with Browser() as browser:
        page = await browser.open(f"http://{HOST}:{client.port}/")
        await page.wait_for("document.getElementById('live').textContent === 'live'")
        await submit(page, 3, "owl", "on a branch")
        # While it draws, the card shows its progress: one image stored, the rest still coming.
        partial = await page.wait_for(
            "(() => { const c = document.querySelector('#jobs li'); return c && c.querySelectorAll('img').length === 1"
            " && c.querySelectorAll('.slot').length === 2 && c.dataset.status === 'processing' })()"
        )
        assert partial is True
        widths = await page.wait_for(IMAGES_LOADED.format(status="completed", count=3))
        assert widths == [96, 96, 96]
        title = await page.evaluate("document.querySelector('#jobs li .job-title').textContent")
        prompt = await page.evaluate("document.querySelector('#jobs li .job-prompt').textContent")
        assert (title, prompt) == ("3 × owl", "on a branch")
        assert page.outside_requests(client.port) == []
        assert page.errors == []


def _post_and_wait(url: str) -> dict:
    request = urllib.request.Request(
        f"{url}/generations",
        data=json.dumps({"numImages": 2, "animal": "fox"}).encode(),
        headers={"Content-Type": "application/json", "Prefer": "wait=20"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


async def test_the_page_resumes_by_id_after_the_stream_drops(tmp_path: Path) -> None:
    # A reconnection delay long enough for a whole job to happen while the page is away.
    server = ServerProcess(tmp_path / "data", {"IMAGEGEN_EVENTS__RETRY_MS": "3000", "IMAGEGEN_PROVIDER__IMAGE_SIZE": "64"})
    server.start()
    try:
        async with Browser() as browser:
            page = await browser.open(f"http://{HOST}:{server.port}/")
            await page.wait_for("document.getElementById('live').textContent === 'live'")
            seen_id = await page.wait_for("lastEventId")  # from the stream's first event
            # The stream drops: the server stops, and comes back on the same port.
            await asyncio.to_thread(server.stop, signal.SIGTERM)
            await page.wait_for("document.getElementById('live').textContent !== 'live'")
            await asyncio.to_thread(server.start)
            # A whole job happens before the page reconnects (3 s later): only a resume from
            # its last event id can show it.
            job = await asyncio.to_thread(_post_and_wait, server.url)
            assert job["status"] == "completed"
            widths = await page.wait_for(IMAGES_LOADED.format(status="completed", count=2), timeout=30)
            assert widths == [64, 64]
            assert await page.evaluate(f"document.getElementById('job-{job['jobId']}') !== null")
            assert int(await page.evaluate("lastEventId")) > int(seen_id)
            assert page.outside_requests(server.port) == []
    finally:
        if server.proc.poll() is None:
            server.kill9()
