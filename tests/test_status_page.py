"""The status page (GET /, issue 32) driven in headless Chromium against the daemon's app:
its numbers follow the requests sent with the openai client, a request in flight appears
and leaves, pin/unpin and purge act on the cache, and with --api-key it asks for the key.
Skipped where Chromium, chromedriver or selenium is missing (tests/support/browser.py).
No timed assertions: WebDriverWait with generous timeouts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.browser import chromium

WAIT = 120
CONVERSATION = [{"role": "system", "content": "You are a careful assistant. " * 30},
                {"role": "user", "content": "Tell me about caches."}]


def wait(browser, condition, timeout: float = WAIT):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout, poll_frequency=0.2).until(condition)


def value_of(browser, element_id: str) -> float | None:
    """A number the page shows, as its element's data-value (the raw count behind the text)."""
    raw = browser.execute_script(
        "const e = document.getElementById(arguments[0]); return e ? e.dataset.value ?? null : null;", element_id)
    return float(raw) if raw not in (None, "") else None


def cell_value(browser, row_id: str) -> float | None:
    raw = browser.execute_script(
        "const r = document.getElementById(arguments[0]); const c = r && r.querySelector('[data-value]');"
        "return c ? c.dataset.value : null;", row_id)
    return float(raw) if raw is not None else None


def click(browser, selector: str, text: str) -> bool:
    """Click the element if it shows `text`, in one step: the page redraws its rows each second."""
    return browser.execute_script(
        "const e = document.querySelector(arguments[0]);"
        "if (!e || e.textContent !== arguments[1]) return false; e.click(); return true;", selector, text)


def text_of(browser, selector: str) -> str:
    return browser.execute_script("const e = document.querySelector(arguments[0]); return e ? e.textContent : '';",
                                  selector)


def console_errors(browser) -> list[dict]:
    return [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]


def chat(app, messages=CONVERSATION, max_tokens: int = 4) -> None:
    app.client().chat.completions.create(model=str(app.model), messages=messages,
                                         max_tokens=max_tokens, temperature=0)


def open_page(browser, app) -> None:
    browser.get(app.url + "/")
    wait(browser, lambda b: b.find_element("id", "status").is_displayed())


def test_the_page_follows_the_cache_without_console_errors(app_daemon, tmp_path):
    with chromium(tmp_path) as browser:
        browser.set_window_size(1280, 800)
        open_page(browser, app_daemon)
        assert browser.find_element("tag name", "h1").text == "kvtier"
        assert cell_value(browser, "source-cached") == 0
        chat(app_daemon)
        chat(app_daemon)  # the same prompt: its blocks come from the cache
        wait(browser, lambda b: (cell_value(b, "source-cached") or 0) > 0)
        stats = app_daemon.get("/cache/stats")
        cached = sum(stats["tokens"][f"from_{tier}"] for tier in ("ram", "disk", "shared"))
        wait(browser, lambda b: cell_value(b, "source-cached") == cached)
        app_daemon.get("/cache/entries")  # waits for the queued disk writes
        stats = app_daemon.get("/cache/stats")
        hot = stats["ram"]["bytes"] + stats["live"]["bytes"]
        assert hot > 0 and stats["disk"]["bytes"] > 0
        wait(browser, lambda b: cell_value(b, "tier-ram") == hot and cell_value(b, "tier-disk") == stats["disk"]["bytes"])
        wait(browser, lambda b: value_of(b, "saved-summary") is not None)  # a prefill rate was measured
        wait(browser, lambda b: b.find_elements("css selector", "#conversations tr[data-key]"))
        assert console_errors(browser) == []


def test_a_request_in_flight_appears_and_leaves(app_daemon, tmp_path):
    with chromium(tmp_path) as browser:
        open_page(browser, app_daemon)
        assert "No request in flight" in text_of(browser, "#requests")
        # Long enough to outlast the page's polls: read in part, then the stream closed.
        stream = app_daemon.client().chat.completions.create(
            model=str(app_daemon.model), messages=[{"role": "user", "content": "Count on."}],
            max_tokens=20000, temperature=0, stream=True)
        try:
            for _, _chunk in zip(range(3), stream):
                pass
            row = "#requests tr[id^=request-]"
            wait(browser, lambda b: "decoding" in text_of(b, row) and "tok/s" in text_of(b, row))
        finally:
            stream.close()
        wait(browser, lambda b: "No request in flight" in text_of(b, "#requests"))
        assert console_errors(browser) == []


def _entries(app) -> list[dict]:
    return app.get("/cache/entries")["data"]


def test_pin_unpin_and_purge_from_the_page(app_daemon, tmp_path):
    from selenium.webdriver.support import expected_conditions

    chat(app_daemon, [{"role": "user", "content": "Something to pin, please. " * 20}])
    with chromium(tmp_path) as browser:
        open_page(browser, app_daemon)
        key = _entries(app_daemon)[0]["key"]
        row = f"#conversations tr[data-key='{key}'] button"
        wait(browser, lambda b: click(b, row, "Pin"))
        wait(browser, lambda b: next(e for e in _entries(app_daemon) if e["key"] == key)["pinned"])
        wait(browser, lambda b: click(b, row, "Unpin"))
        wait(browser, lambda b: not next(e for e in _entries(app_daemon) if e["key"] == key)["pinned"])
        assert app_daemon.get("/cache/stats")["disk"]["entries"] > 0
        browser.find_element("id", "purge").click()
        wait(browser, expected_conditions.alert_is_present()).dismiss()  # asked, and declined
        assert _entries(app_daemon)  # nothing was purged
        browser.find_element("id", "purge").click()
        wait(browser, expected_conditions.alert_is_present()).accept()
        wait(browser, lambda b: app_daemon.get("/cache/stats")["disk"]["entries"] == 0)
        wait(browser, lambda b: "Nothing cached yet" in text_of(b, "#conversations"))
        assert console_errors(browser) == []


def test_with_an_api_key_the_page_asks_for_it(keyed_app, tmp_path):
    page = keyed_app.request("GET", "/")
    assert page.status == 200 and "text/html" in page.headers["Content-Type"]  # the page holds no data
    assert keyed_app.request("GET", "/status").status == 401  # its data needs the key
    with chromium(tmp_path) as browser:
        browser.get(keyed_app.url + "/")
        form = wait(browser, lambda b: b.find_element("id", "key-form").is_displayed()
                    and b.find_element("id", "key-form"))
        assert not browser.find_element("id", "status").is_displayed()
        field = browser.find_element("css selector", "label[for=key-input]")
        assert field.text == "API key"
        browser.find_element("id", "key-input").send_keys("wrong")
        form.submit()
        wait(browser, lambda b: "refused" in b.find_element("id", "key-error").text)
        assert not browser.find_element("id", "status").is_displayed()
        browser.find_element("id", "key-input").send_keys("s3cret")
        form.submit()
        wait(browser, lambda b: b.find_element("id", "status").is_displayed())
        assert keyed_app.model.name in browser.find_element("id", "summary").text
        assert browser.execute_script("return sessionStorage.getItem('kvtier-api-key')") == "s3cret"


def test_the_page_shows_every_model_and_the_selected_ones_numbers(tmp_path, tiny_model, llama_model):
    """Two models: the table shows each one's state and sizes; "Show" puts a model's numbers
    (its tiers) on the page, an unloaded one's what the SSD holds of it."""
    from kvtier.config import ModelSpec
    from kvtier.models_memory import weights_on_disk
    from tests.inprocess import InProcessDaemon

    def configure(config) -> None:
        config.models = [ModelSpec(str(tiny_model), name="tiny"), ModelSpec(str(llama_model), name="llama")]

    app = InProcessDaemon(tiny_model, tmp_path / "cache", configure=configure).start()

    def model_cells(browser, name: str) -> list[str | None]:
        """The data-value of each cell of the model's row: state, weights, hot KV."""
        return browser.execute_script(
            "const r = document.querySelector(`#models tr[data-model='${arguments[0]}']`);"
            "return r ? [...r.querySelectorAll('td')].map(c => c.dataset.value ?? null) : [];", name)

    try:
        with chromium(tmp_path) as browser:
            open_page(browser, app)
            wait(browser, lambda b: model_cells(b, "llama"))
            assert model_cells(browser, "tiny")[0] == "loaded"
            state, weights, hot = model_cells(browser, "llama")[:3]
            assert state == "unloaded" and int(weights or 0) == weights_on_disk(llama_model) and hot == "0"
            app.client().chat.completions.create(model="llama", messages=CONVERSATION, max_tokens=2, temperature=0)
            wait(browser, lambda b: model_cells(b, "llama")[0] == "loaded")
            wait(browser, lambda b: click(b, "#models tr[data-model='llama'] button", "Show"))
            wait(browser, lambda b: "llama" in text_of(b, "#summary") and "llama" in text_of(b, "#models-note"))
            stats = app.get("/cache/stats?model=llama")
            hot_kv = stats["ram"]["bytes"] + stats["live"]["bytes"]
            assert hot_kv > 0
            wait(browser, lambda b: cell_value(b, "tier-ram") == hot_kv)
            assert app.post("/models/llama/unload").status == 200
            wait(browser, lambda b: model_cells(b, "llama")[0] == "unloaded")
            wait(browser, lambda b: "unloaded" in text_of(b, "#tier-facts"))
            assert console_errors(browser) == []
    finally:
        app.stop()


def test_pin_of_an_unknown_prefix_is_a_404(app_daemon):
    reply = app_daemon.post("/cache/pin", {"key": "ffffffffffff"})
    assert reply.status == 404 and reply.json()["error"]["code"] == "prefix_not_found"
    reply = app_daemon.post("/cache/unpin", {})
    assert reply.status == 400 and reply.json()["error"]["param"] == "key"


def test_kvtier_open_opens_the_browser_on_the_page(tmp_path):
    """webbrowser honours $BROWSER: a script standing in for the browser records its argument."""
    opened = tmp_path / "opened"
    browser = tmp_path / "browser"
    browser.write_text(f"#!/bin/sh\necho \"$1\" > {opened}\n")
    browser.chmod(0o755)
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-m", "daemon.cli", "open", "--port", "9123"], cwd=root,
                          env=dict(os.environ, BROWSER=str(browser)), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "http://127.0.0.1:9123/"
    assert opened.read_text().strip() == "http://127.0.0.1:9123/"


@pytest.mark.parametrize("host, url", [("0.0.0.0", "http://127.0.0.1:8420/"), ("::1", "http://[::1]:8420/"),
                                       ("box.lan", "http://box.lan:8420/")])
def test_the_page_url(host, url):
    from daemon.cli_open import page_url

    assert page_url(host, 8420) == url


def test_status_reports_the_phases_and_the_time_saved(app_daemon):
    """The engine tells a request's phases (restoring, then prefilling with what it restored);
    GET /status counts tokens as /cache/stats does and prices the cached ones at the prefill rate."""
    from daemon.state import STATE
    from kvtier.requests import GenerationRequest

    chat(app_daemon, CONVERSATION)
    told: list[tuple[str, int]] = []
    tokens = app_daemon.app[STATE].engine().renderer.render(CONVERSATION, None, "")[0]

    async def generate() -> None:
        request = GenerationRequest(list(tokens), max_tokens=1, temperature=0.0,
                                    phase=lambda *phase: told.append(phase))
        async for _ in app_daemon.app[STATE].worker.generate(request):
            pass

    app_daemon._run(generate())
    assert told[0] == ("restoring", 0) and told[1][0] == "prefilling" and len(told) == 2
    assert 0 < told[1][1] < len(tokens)  # the conversation's blocks were restored
    status, stats = app_daemon.get("/status"), app_daemon.get("/cache/stats")
    assert status["requests"] == [] and status["waiting"] == 0
    assert status["tokens"] == {"ram": stats["tokens"]["from_ram"], "disk": stats["tokens"]["from_disk"],
                                "shared": stats["tokens"]["from_shared"], "computed": stats["tokens"]["computed"]}
    cached = status["tokens"]["ram"] + status["tokens"]["disk"] + status["tokens"]["shared"]
    assert cached > 0 and status["seconds_saved"] == round(cached / status["prefill_tokens_per_second"], 3)
