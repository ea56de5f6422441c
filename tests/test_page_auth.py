"""The live page with auth on, in a real headless Chromium: it asks for the key once, keeps it in
the tab's session storage, follows the stream with tokens that it renews before they expire (the
stream resumes by id across each renewal, missing nothing), and shows signed images."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from .auth_keys import ACME_KEY, SECRET, auth_section, bearer
from .browser import HOST, Browser


@pytest.fixture
def backend() -> str:
    """The page talks only to the API, which the API tests check on both backends."""
    return "sqlite"


pytestmark = pytest.mark.browser

TOKEN_TTL_S = 3


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEGEN_SECRET", SECRET)


async def test_the_page_asks_for_a_key_and_follows_jobs_across_token_renewals(make_client: Any) -> None:
    client = await make_client(auth=auth_section(token_ttl_s=TOKEN_TTL_S), provider={"delay_s": 0.05})
    async with Browser() as browser:
        page = await browser.open(f"http://{HOST}:{client.port}/")
        assert await page.wait_for("!document.getElementById('key-form').hidden") is True
        assert await page.evaluate("document.getElementById('new-job').hidden") is True
        # A wrong key is refused on the spot; the right one is kept for this tab.
        await page.evaluate("""(() => { const f = document.getElementById('key-form');
            f.key.value = 'ig_wrong'; f.querySelector('button').click(); })()""")
        assert "not valid" in await page.wait_for("document.getElementById('key-error').textContent")
        await page.evaluate(f"""(() => {{ const f = document.getElementById('key-form');
            f.key.value = '{ACME_KEY}'; f.querySelector('button').click(); }})()""")
        await page.wait_for("document.getElementById('live').textContent === 'live'")
        assert await page.evaluate("sessionStorage.getItem('imagegen.apiKey')") == ACME_KEY
        # Jobs arrive all through several token lifetimes; another tenant's too, never shown.
        ours, theirs = [], []
        for round_ in range(int(TOKEN_TTL_S * 3 / 0.25)):
            tenant, mine = ("globex", theirs) if round_ % 6 == 5 else ("acme", ours)
            response = await client.post("/generations", json={"numImages": 1}, headers=bearer(tenant))
            mine.append((await response.json())["jobId"])
            await asyncio.sleep(0.25)
        every_card_done = "[{}].every(id => {{ const c = document.getElementById('job-' + id); " \
            "return c && c.dataset.status === 'completed' && c.querySelector('img')?.naturalWidth > 0 }})".format(
                ", ".join(f"'{job_id}'" for job_id in ours))
        assert await page.wait_for(every_card_done, timeout=30) is True
        assert await page.evaluate(f"[{', '.join(repr(j) for j in theirs)}].some(id => document.getElementById('job-' + id))") is False
        streams = [url for url in page.requests if "/generations/events" in url]
        tokens = [url for url in page.requests if url.endswith("/tokens")]
        # One stream per token, each opened with a new token before the last expired, each
        # resuming after the last id seen; the list was loaded once (no reset filled a gap).
        assert len(streams) >= 3 and len(tokens) == len(streams), (streams, tokens)
        assert all("token=" in url for url in streams) and all("lastEventId=" in url for url in streams[1:])
        assert len([url for url in page.requests if "/generations?limit=30" in url]) == 1
        assert await page.evaluate("document.getElementById('live').textContent") == "live"
        assert page.outside_requests(client.port) == []
        # The one refused request is the wrong key's check: no stream ever met an expired token.
        assert page.errors == ["Failed to load resource: the server responded with a status of 401 (Unauthorized)"]
