"""The browser helper itself: the SSE and docs page tests lean on its waits and its network log."""

from __future__ import annotations

import pytest

from .browser import Browser


@pytest.mark.browser
async def test_a_wait_that_times_out_leaves_the_page_usable() -> None:
    async with Browser() as browser:
        page = await browser.open("data:text/html,<p id=x>hello</p>")
        with pytest.raises(TimeoutError, match="never"):
            await page.wait_for("window.never", timeout=0.3)
        assert await page.evaluate("document.getElementById('x').textContent") == "hello"
        await page.evaluate("setTimeout(() => { window.later = 42 }, 50)")
        assert await page.wait_for("window.later") == 42


@pytest.mark.browser
async def test_outside_hosts_are_unreachable_and_logged() -> None:
    async with Browser() as browser:
        page = await browser.open("data:text/html,<p>offline</p>")
        outcome = await page.evaluate(
            "fetch('https://cdn.example.com/x.js').then(() => 'reached', () => 'failed')"
        )
        assert outcome == "failed"
        assert page.outside_requests(port=80) == ["https://cdn.example.com/x.js"]
