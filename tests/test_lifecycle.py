"""Start-up and shutdown of the daemon: SIGTERM exits 0 with every block on disk, and no
thread leaves MLX state behind for the interpreter's shutdown."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from tests.conftest import MODELS, ROOT, TEST_BLOCK_SIZE, Daemon, agent_messages
from tests.support.testmodels import make_model

MAX_TOKENS = 8
CRASH_MARKERS = ("terminate called", "Traceback", "Fatal")


@pytest.fixture(scope="module")
def hybrid_model():
    return make_model(MODELS / "qwen3_next", "qwen3_next")


def conversation() -> list[list[dict]]:
    """Five requests: three system prompts, and a second turn on the first."""
    first = agent_messages("alpha", repeat=2)
    return [first, agent_messages("beta", repeat=2), agent_messages("gamma", repeat=2),
            first + [{"role": "assistant", "content": "Done."},
                     {"role": "user", "content": "Now run the tests."}],
            agent_messages("alpha", question="Summarise the README.", repeat=2)]


def ask(daemon: Daemon, messages: list[dict]) -> tuple[str, dict]:
    response = daemon.client().chat.completions.create(
        model=str(daemon.model), messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    return response.choices[0].message.content, response.usage.model_extra["kvtier"]


def index_count(cache_dir) -> int:
    from kvtier.index import Index

    index = Index(cache_dir / "index")
    try:
        return index.totals()[1]
    finally:
        index.close()


def test_sigterm_after_requests_exits_0_with_every_block_on_disk(tmp_path, hybrid_model):
    daemon = Daemon(hybrid_model, tmp_path / "cache")
    first_texts = None
    for _ in range(2):  # the second start reuses what the first one wrote
        daemon.start()
        answers = [ask(daemon, messages) for messages in conversation()]
        stats = daemon.get("/cache/stats")
        assert daemon.stop() == 0, daemon.log.read_text()[-3000:]
        log = daemon.log.read_text()
        assert not [m for m in CRASH_MARKERS if m in log], log[-3000:]
        texts = [text for text, _ in answers]
        if first_texts is None:
            first_texts = texts
            # Everything the hot tier held is on disk: nothing queued was lost at exit.
            assert index_count(daemon.cache_dir) == stats["ram"]["blocks"] > 0
        else:  # and the restarted daemon reuses it, with the same answers
            assert texts == first_texts
            assert all(usage["disk_tokens"] > 0 for _, usage in answers)


# The race made certain: the MLX thread's C++ exit destructors are held back until the
# interpreter is shutting down (a lock the last exit function releases, GIL held), and an
# object freed during the shutdown then lets that thread run. Any thread-exit destructor
# that still needs the interpreter (MLX's per-thread compile cache holds Python objects)
# is then killed mid-destructor: std::terminate, "terminate called without an active
# exception". The worker must have freed that state itself before it ended.
HELD_THREAD_EXIT = r"""
import atexit, ctypes, sys, time
libc = ctypes.CDLL(None)
gate = ctypes.create_string_buffer(64)  # zeroed: PTHREAD_MUTEX_INITIALIZER
libc.pthread_mutex_lock(gate)
atexit.register(ctypes.PyDLL(None).pthread_mutex_unlock, gate)  # registered first: runs last


class YieldsWhileShuttingDown:
    def __del__(self, sleep=time.sleep):
        sleep(0.2)  # gives up the GIL with the interpreter already finalizing


keep = YieldsWhileShuttingDown()

import asyncio
from pathlib import Path

from daemon.worker import Worker
from kvtier.config import CacheConfig
from kvtier.config import ModelSpec
from kvtier.engine import Engine
from kvtier.requests import GenerationRequest


def hold_thread_exit(engine):
    register = libc.__cxa_thread_atexit_impl
    register.argtypes = [ctypes.c_void_p] * 3
    register(ctypes.cast(libc.pthread_mutex_lock, ctypes.c_void_p), ctypes.cast(gate, ctypes.c_void_p), None)


async def main(model, cache_dir, block_size):
    config = CacheConfig(cache_dir=Path(cache_dir), block_size=int(block_size))
    worker = Worker(lambda spec, step, progress, earlier: Engine(model, config), [ModelSpec(model)])
    worker.start()
    tokens = await worker.call(lambda engine: engine.renderer.text_tokens("the quick brown fox " * 20))
    async for _ in worker.generate(GenerationRequest(tokens, max_tokens=4, temperature=0.0)):
        pass
    await worker.call(hold_thread_exit)
    await asyncio.to_thread(worker.stop)


asyncio.run(main(*sys.argv[1:]))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="holds thread exit through glibc")
def test_mlx_thread_leaves_nothing_for_the_interpreter_shutdown(tmp_path, hybrid_model):
    done = subprocess.run([sys.executable, "-c", HELD_THREAD_EXIT, str(hybrid_model),
                           str(tmp_path / "cache"), str(TEST_BLOCK_SIZE)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not [m for m in CRASH_MARKERS if m in done.stderr], done.stderr[-3000:]
