"""Warm TTFT with the status page open and polling (GET / in headless Chromium) vs without,
on one kvtier daemon: the page must cost the daemon nothing measurable. Blocks of requests
without and with the page alternate, so drift on a shared machine falls on both.

With --screenshots, instead: the page at 1280x800 and 400x800, with a request in flight,
saved as docs/status-page-wide.png and docs/status-page-narrow.png.

    python bench/status_page.py [--repeats 10 --blocks 3]
    python bench/status_page.py --screenshots
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

from harness import ROOT, Server, command_line, machine_description, stream_chat, write_section
from prompts import QUESTIONS, agent_system_prompt, messages_for


def warm_ttfts(server: Server, model: str, system: str, repeats: int) -> list[float]:
    return [stream_chat(server, model, messages_for(system, QUESTIONS[0])).ttft for _ in range(repeats)]


def measure(server: Server, model: str, system: str, args, work: Path) -> dict:
    from tests.support.browser import chromium

    stream_chat(server, model, messages_for(system, QUESTIONS[0]))  # cold: fills the cache
    without: list[float] = []
    with_page: list[float] = []
    with chromium(work) as browser:
        for _ in range(args.blocks):
            browser.get("about:blank")
            without += warm_ttfts(server, model, system, args.repeats)
            browser.get(server.url + "/")
            time.sleep(2)  # the page has loaded and polls
            with_page += warm_ttfts(server, model, system, args.repeats)
    return {"without": without, "with": with_page}


def render(results: dict, machine: str) -> str:
    ms = lambda values: f"{1000 * statistics.median(values):.1f} ms"  # noqa: E731
    spread = lambda values: f"{1000 * min(values):.1f}-{1000 * max(values):.1f} ms"  # noqa: E731
    return "\n".join([
        "### The status page's cost (warm TTFT)",
        "",
        f"`{results['command']}`; {machine}. One kvtier daemon, the generated llama model "
        f"(`.models/llama`), a ~{results['prompt_tokens']}-token agent prompt repeated; "
        f"{len(results['without'])} requests each way, in alternating blocks.",
        "",
        "| | median warm TTFT | range |",
        "|---|---|---|",
        f"| page closed | {ms(results['without'])} | {spread(results['without'])} |",
        f"| page open, polling every second | {ms(results['with'])} | {spread(results['with'])} |",
    ])


def screenshots(server: Server, model: str, system: str, work: Path) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.support.browser import chromium

    # Turns spread over half a minute, so the chart (a sample every 5 s) has bars to show.
    for turn in range(8):
        stream_chat(server, model, messages_for(system, QUESTIONS[turn % 3]))
        time.sleep(4)
    busy = threading.Thread(target=stream_chat, args=(server, model, messages_for(system, QUESTIONS[3])),
                            kwargs={"max_tokens": 600}, daemon=True)
    with chromium(work) as browser:
        browser.set_window_size(1280, 800)
        browser.get(server.url + "/")
        busy.start()
        WebDriverWait(browser, 120, poll_frequency=0.1).until(
            lambda b: "decoding" in b.find_element("id", "requests").text)
        browser.save_screenshot(str(ROOT / "docs" / "status-page-wide.png"))
        browser.set_window_size(400, 800)
        time.sleep(1.5)
        browser.save_screenshot(str(ROOT / "docs" / "status-page-narrow.png"))
    busy.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=10, help="requests per block")
    parser.add_argument("--blocks", type=int, default=3, help="blocks without, then with the page")
    parser.add_argument("--screenshots", action="store_true", help="save the page's screenshots instead")
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/ alone")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from tests.support.testmodels import make_model

    model = make_model(ROOT / ".models" / "llama", "llama")
    system = agent_system_prompt(args.prompt_tokens, AutoTokenizer.from_pretrained(str(model)))
    work = Path(tempfile.mkdtemp(prefix="kvtier-status-"))
    server = Server.kvtier(model, work / "cache", work / "kvtier.log").start()
    try:
        if args.screenshots:
            screenshots(server, str(model), system, work)
            return
        results = dict(measure(server, str(model), system, args, work),
                       command=command_line("status_page.py"), prompt_tokens=args.prompt_tokens)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    section = render(results, machine_description())
    print(section)
    if not args.no_docs:
        write_section("status-page", section)


if __name__ == "__main__":
    main()
