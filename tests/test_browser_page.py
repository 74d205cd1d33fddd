"""A web page in a real browser (headless Chromium) cannot use the daemon (issue 34,
docs/security.md): a page of another origin, and a DNS-rebinding page whose own name leads to
the daemon. Skipped where Chromium, chromedriver or selenium is missing (tests/support/browser.py)."""

from __future__ import annotations

import asyncio
import threading
from typing import Iterator

import pytest
from aiohttp import web

from tests.support.browser import chromium

CHAT = '{"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}'
# Each fetch's outcome: its status (and whether the page could read it), or why it rejected.
ATTEMPT = """
async function attempt(url, init) {
  try {
    const reply = await fetch(url, init);
    return {status: reply.status, type: reply.type};
  } catch (error) {
    return {rejected: String(error)};
  }
}
"""
# The other site's page: a simple POST (text/plain: no preflight), a JSON POST (preflighted),
# a blind no-cors POST and a GET of the cache's entries.
PAGE = f"""<!doctype html><title>another site</title><script>
{ATTEMPT}
const daemon = new URLSearchParams(location.search).get("daemon");
const chat = {CHAT!r};
Promise.all([
  attempt(daemon + "/v1/chat/completions", {{method: "POST", body: chat, headers: {{"Content-Type": "text/plain"}}}}),
  attempt(daemon + "/v1/chat/completions", {{method: "POST", body: chat,
                                             headers: {{"Content-Type": "application/json"}}}}),
  attempt(daemon + "/v1/chat/completions", {{method: "POST", body: chat, mode: "no-cors"}}),
  attempt(daemon + "/cache/entries", {{}}),
]).then(results => {{ window.results = results; }});
</script>"""


def work_done(app) -> dict:
    stats = app.get("/cache/stats")
    return {"counters": stats["counters"], "tokens": stats["tokens"], "disk": stats["disk"]["entries"]}


@pytest.fixture
def page_server() -> Iterator[str]:
    """The other site: a small aiohttp server on another 127.0.0.1 port, serving PAGE."""
    from tests.conftest import free_port

    app = web.Application()
    async def page(_: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html")

    app.router.add_get("/", page)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="page-server", daemon=True)
    thread.start()
    runner = web.AppRunner(app)
    port = free_port()

    async def start() -> None:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()

    asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    yield f"http://127.0.0.1:{port}"
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.close()


def results_of(browser) -> list[dict]:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, 120).until(lambda b: b.execute_script("return window.results"))


def test_a_page_of_another_origin_is_refused(app_daemon, page_server, tmp_path):
    before = work_done(app_daemon)
    with chromium(tmp_path) as browser:
        browser.get(f"{page_server}/?daemon={app_daemon.url}")
        simple, preflighted, blind, entries = results_of(browser)
    for outcome in (simple, preflighted, entries):  # refused, or unreadable without CORS headers
        assert "rejected" in outcome or outcome["status"] == 403, outcome
    assert blind == {"status": 0, "type": "opaque"}  # sent; the page never learns the answer
    assert work_done(app_daemon) == before  # and the daemon computed nothing


def test_a_rebinding_page_is_refused(app_daemon, tmp_path):
    """attacker.test resolves to 127.0.0.1 (as a rebinding name does once rebound): its page
    is the daemon's origin to the browser, so it may send JSON and read the answers."""
    before = work_done(app_daemon)
    page = f"http://attacker.test:{app_daemon.port}"
    with chromium(tmp_path, "--host-resolver-rules=MAP attacker.test 127.0.0.1") as browser:
        browser.get(page + "/health")
        assert "host_not_allowed" in browser.page_source
        script = ATTEMPT + f"""
        const done = arguments[arguments.length - 1];
        Promise.all([
          attempt("/v1/chat/completions", {{method: "POST", body: {CHAT!r},
                                            headers: {{"Content-Type": "application/json"}}}}),
          attempt("/cache/entries", {{}}),
        ]).then(done);"""
        chat, entries = browser.execute_async_script(script)
    assert chat == {"status": 403, "type": "basic"} and entries == {"status": 403, "type": "basic"}
    assert work_done(app_daemon) == before
