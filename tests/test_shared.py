"""The shared tier on a real redis-server (Debian's package), started on a free loopback port."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis

from kvtier import shared
from kvtier.config import CacheConfig
from kvtier.shared import namespace
from kvtier.tiers import NewEntry, TieredStore
from tests.conftest import agent_messages, free_port
from tests.support.blocks import BLOCK, LAYOUT, arrays_for, assert_hits_hold_their_arrays, fill, make_store

REDIS_SERVER = shutil.which("redis-server") or shutil.which("valkey-server") or ""
pytestmark = pytest.mark.skipif(not REDIS_SERVER, reason="redis-server is not installed "
                                "(apt-get install redis-server, or `make system-deps`)")
MAX_TOKENS = 8


class RedisServer:
    """A throwaway redis-server: no persistence, loopback only; stop() and start() again
    keep its port (and lose its data, as a restarted cache would)."""

    def __init__(self, workdir: Path, password: str | None = None):
        self.workdir, self.password, self.port = workdir, password, free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        args = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.workdir)]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = self.client()
        for _ in range(200):
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                time.sleep(0.05)
        raise TimeoutError("redis-server did not start")

    def stop(self) -> None:
        assert self.proc is not None, "not started"
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    if server.proc is not None:
        server.stop()


@pytest.fixture
def fresh_redis(redis_server):
    redis_server.client().flushall()
    return redis_server


def wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.05)


def shared_store(cache_dir, url, **overrides):
    return make_store(cache_dir, shared_url=url, **overrides)


def block_names(server: RedisServer, fingerprint: str = "fp-test") -> list[bytes]:
    return sorted(server.client().scan_iter(match=namespace(fingerprint) + "b:*"))


# -- in process: two stores with separate cache directories, one Redis ---------------------
def test_a_second_store_restores_the_first_ones_blocks_from_the_shared_tier(tmp_path, fresh_redis):
    tokens = list(range(200, 200 + 3 * BLOCK + 5))
    first = shared_store(tmp_path / "a", fresh_redis.url)
    refs = fill(first, tokens, flush=True)
    assert first.stats()["counters"]["shared_uploads"] == 3
    second = shared_store(tmp_path / "b", fresh_redis.url)
    match = second.match(refs, tokens)
    assert match.sources == ["shared"] * 3 and match.num_tokens == 3 * BLOCK
    assert_hits_hold_their_arrays(match.hits)
    # Kept locally: on the second store's own disk from now on, found there without Redis.
    second.promote([first_entry(hit) for hit in match.hits])
    second.flush()
    second.close()
    first.close()
    again = make_store(tmp_path / "b")
    assert again.match(refs, tokens).sources == ["disk"] * 3
    again.close()


def first_entry(hit):
    return NewEntry(hit.ref, hit.tokens, arrays_for(hit.ref.index), source=hit.source)


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_a_damaged_shared_value_is_a_miss_and_removed(tmp_path, fresh_redis, damage):
    tokens = list(range(300, 300 + 2 * BLOCK))
    first = shared_store(tmp_path / "a", fresh_redis.url)
    refs = fill(first, tokens, flush=True)
    first.close()
    client = fresh_redis.client()
    name = f"{namespace('fp-test')}b:{refs[1].hex}"
    value = client.get(name)
    damaged = {"truncate": value[:-100], "flip": value[:-7] + bytes([value[-7] ^ 1]) + value[-6:],
               "garbage": b"not a block"}[damage]
    client.set(name, damaged)
    second = shared_store(tmp_path / "b", fresh_redis.url)
    match = second.match(refs, tokens)
    assert match.sources == ["shared"]  # the chain stops at the damaged block
    assert second.stats()["counters"]["shared_damaged"] == 1
    assert client.get(name) is None  # removed from the store
    second.close()


def test_a_value_stored_under_another_key_is_a_miss(tmp_path, fresh_redis):
    """Values are checked against the key asked for: a value copied to another key (or
    another key's listing) is not used."""
    tokens = list(range(400, 400 + 2 * BLOCK))
    first = shared_store(tmp_path / "a", fresh_redis.url)
    refs = fill(first, tokens, flush=True)
    first.close()
    client = fresh_redis.client()
    prefix = namespace("fp-test")
    client.set(f"{prefix}b:{refs[1].hex}", client.get(f"{prefix}b:{refs[0].hex}"))
    second = shared_store(tmp_path / "b", fresh_redis.url)
    assert second.match(refs, tokens).sources == ["shared"]
    second.close()


def test_redis_down_is_a_local_miss_counted_and_reuse_resumes_when_it_returns(tmp_path, redis_server):
    redis_server.client().flushall()
    tokens = list(range(500, 500 + 2 * BLOCK))
    first = shared_store(tmp_path / "a", redis_server.url)
    refs = fill(first, tokens, flush=True)
    second = shared_store(tmp_path / "b", redis_server.url)
    redis_server.stop()
    try:
        assert second.match(refs, tokens).hits == []  # served as a miss, no exception
        assert second.stats()["shared"]["connected"] is False
        assert second.stats()["counters"]["shared_errors"] >= 1
        assert second.match(refs, tokens).hits == []  # circuit open: the store is skipped
    finally:
        redis_server.start()
    wait_for(lambda: second.shared.connected and first.shared.connected)
    later = list(range(600, 600 + 2 * BLOCK))  # the restarted store is empty: new blocks fill it
    later_refs = fill(first, later, flush=True)
    assert second.match(later_refs, later).sources == ["shared", "shared"]
    assert second.stats()["shared"]["error"] is None
    second.close()
    first.close()


def test_requirepass_is_honoured_and_a_wrong_password_is_a_warning(tmp_path, caplog, monkeypatch):
    server = RedisServer(tmp_path, password="s3cret-pass").start()
    try:
        tokens = list(range(700, 700 + 2 * BLOCK))
        first = shared_store(tmp_path / "a", server.url)
        refs = fill(first, tokens, flush=True)
        assert first.stats()["shared"]["url"] == f"redis://:***@127.0.0.1:{server.port}/0"
        first.close()
        monkeypatch.setenv(shared.PASSWORD_ENV, "s3cret-pass")
        from_env = shared_store(tmp_path / "b", f"redis://127.0.0.1:{server.port}/0")
        assert from_env.match(refs, tokens).sources == ["shared", "shared"]
        from_env.close()
        monkeypatch.delenv(shared.PASSWORD_ENV)
        wrong = shared_store(tmp_path / "c", f"redis://:wrong@127.0.0.1:{server.port}/0")
        assert wrong.match(refs, tokens).hits == []
        stats = wrong.stats()["shared"]
        assert stats["connected"] is False and "authentication failed" in stats["error"]
        assert any("authentication failed" in r.getMessage() for r in caplog.records)
        wrong.close()
    finally:
        server.stop()


def test_only_the_same_model_meets_its_blocks(tmp_path, fresh_redis):
    tokens = list(range(800, 800 + 2 * BLOCK))
    first = shared_store(tmp_path / "a", fresh_redis.url)
    fill(first, tokens, flush=True)
    first.close()
    assert len(block_names(fresh_redis)) == 2 and not block_names(fresh_redis, "fp-other")
    usage = shared.model_usage(fresh_redis.url)
    assert usage["fp-test"]["entries"] == 2 and usage["fp-test"]["bytes"] > 2 * 4 * 2 * 8 * BLOCK * 4
    assert shared.purge(fresh_redis.url, "fp-other") == 0
    assert shared.purge(fresh_redis.url, "fp-test") == 2
    assert not list(fresh_redis.client().scan_iter(match="kvtier:*"))


# -- two daemons, separate cache directories, one Redis ------------------------------------
def chat(daemon, messages):
    response = daemon.client().chat.completions.create(model="default", messages=messages,
                                                       max_tokens=MAX_TOKENS, temperature=0)
    return response.choices[0].message.content, response.usage.model_extra["kvtier"]


def uploads_done(daemon) -> bool:
    stats = daemon.get("/cache/stats")
    return stats["shared"]["queued_uploads"] == 0 and stats["counters"].get("shared_uploads", 0) > 0


# The daemons below run the tiny model: what they test (the shared tier between processes,
# Redis going away, a bad password) does not depend on the model's size.
def test_a_second_daemon_answers_the_first_ones_prompt_from_the_shared_tier(
        tmp_path, daemon_factory, tiny_model, tiny_reference, fresh_redis):
    reference = tiny_reference
    messages = agent_messages("atlas")
    expected = reference.chat(messages, MAX_TOKENS)
    first = daemon_factory(tiny_model, "--shared", fresh_redis.url, cache_dir=tmp_path / "a")
    assert chat(first, messages)[0] == expected
    wait_for(lambda: uploads_done(first))
    second = daemon_factory(tiny_model, "--shared", fresh_redis.url, cache_dir=tmp_path / "b")
    assert second.get("/health")["shared_connected"] is True
    text, usage = chat(second, messages)
    prompt_tokens = len(reference.chat_tokens(messages))
    assert text == expected
    assert usage["shared_tokens"] >= prompt_tokens - 64 - 1 and usage["computed_tokens"] < 64 + 1
    stats = second.get("/cache/stats")
    assert stats["tokens"]["from_shared"] == usage["shared_tokens"] and stats["counters"]["shared_hits"] > 0
    assert "kvtier_shared_hits_total" in second_metrics(second)
    # Kept locally: the second daemon's next identical request comes from its own tiers.
    text, usage = chat(second, messages)
    assert text == expected and usage["shared_tokens"] == 0 and usage["ram_tokens"] > 0


def second_metrics(daemon) -> str:
    import urllib.request

    with urllib.request.urlopen(daemon.url + "/metrics", timeout=30) as r:
        return r.read().decode()


def test_redis_stopped_mid_conversation_keeps_answers_right(
        tmp_path, daemon_factory, tiny_model, tiny_reference, redis_server):
    reference = tiny_reference
    redis_server.client().flushall()
    first = daemon_factory(tiny_model, "--shared", redis_server.url, cache_dir=tmp_path / "a")
    second = daemon_factory(tiny_model, "--shared", redis_server.url, cache_dir=tmp_path / "b")
    turn = agent_messages("borealis", "Hello.")
    assert chat(first, turn)[0] == reference.chat(turn, MAX_TOKENS)
    wait_for(lambda: uploads_done(first))
    redis_server.stop()
    try:
        turn = turn + [{"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Go on."}]
        for daemon in (first, second):  # the first from its own tiers, the second computes it all
            text, usage = chat(daemon, turn)
            assert text == reference.chat(turn, MAX_TOKENS) and usage["shared_tokens"] == 0
        health = second.get("/health")
        assert health["status"] == "ok" and health["shared_connected"] is False and health["shared_error"]
        assert second.get("/cache/stats")["counters"]["shared_errors"] >= 1
    finally:
        redis_server.start()
    wait_for(lambda: all(d.get("/health")["shared_connected"] for d in (first, second)))
    other = agent_messages("cygnus", "Hello.")  # the restarted store is empty: fill it again
    uploaded = first.get("/cache/stats")["counters"].get("shared_uploads", 0)
    assert chat(first, other)[0] == reference.chat(other, MAX_TOKENS)
    # Its blocks uploaded, not only an empty queue (the blocks are queued after the answer).
    wait_for(lambda: uploads_done(first) and first.get("/cache/stats")["counters"]["shared_uploads"] > uploaded)
    text, usage = chat(second, other)
    assert text == reference.chat(other, MAX_TOKENS) and usage["shared_tokens"] > 0


def test_a_wrong_password_is_a_start_up_warning_not_a_crash(tmp_path, daemon_factory, tiny_model, tiny_reference):
    reference = tiny_reference
    server = RedisServer(tmp_path, password="right-one").start()
    try:
        url = f"redis://:badpass123@127.0.0.1:{server.port}/0"
        daemon = daemon_factory(tiny_model, "--shared", url, cache_dir=tmp_path / "a")
        health = daemon.get("/health")
        assert health["status"] == "ok" and health["shared_connected"] is False
        assert "authentication failed" in health["shared_error"] and "badpass123" not in health["shared_error"]
        messages = agent_messages("dorado")
        assert chat(daemon, messages)[0] == reference.chat(messages, MAX_TOKENS)
        assert "authentication failed" in daemon.log.read_text()
        assert "badpass123" not in daemon.log.read_text()  # the password never reaches the log
    finally:
        server.stop()


def test_the_cli_shows_and_purges_one_models_shared_entries(tmp_path, fresh_redis):
    from tests.test_cli import kvtier, kvtier_json

    for fingerprint, start in (("fp-test", 900), ("fp-other", 950)):
        config = CacheConfig(cache_dir=tmp_path / fingerprint, block_size=BLOCK, shared_url=fresh_redis.url)
        store = TieredStore(config, fingerprint, LAYOUT)
        fill(store, list(range(start, start + 2 * BLOCK)))
        store.index.register_model(fingerprint, {"name": f"model-{fingerprint}"})
        store.close()
    cache = str(tmp_path / "fp-test")
    stats = kvtier_json("stats", "--shared", fresh_redis.url, "--cache-dir", cache)
    assert stats["disk"]["entries"] == 2  # the local directory's, beside the shared store's
    assert stats["shared"]["models"]["fp-test"] == {"entries": 2, "bytes": stats["shared"]["models"]["fp-test"]["bytes"],
                                                    "model": "model-fp-test"}
    assert stats["shared"]["models"]["fp-other"]["entries"] == 2
    listed = kvtier_json("ls", "--shared", fresh_redis.url, "--cache-dir", cache)
    assert set(listed["models"]) == {"fp-test", "fp-other"}
    purged = kvtier_json("purge", "--shared", fresh_redis.url, "--model", "model-fp-test", "--cache-dir", cache)
    assert purged == {"removed": 2, "fingerprint": "fp-test"}
    assert set(shared.model_usage(fresh_redis.url)) == {"fp-other"}
    down = kvtier("stats", "--shared", f"redis://127.0.0.1:{free_port()}/0", "--cache-dir", cache)
    assert down.returncode == 2 and "shared cache" in down.stderr and "Traceback" not in down.stderr


def test_every_tier_implements_the_one_interface(tmp_path, fresh_redis):
    from kvtier.tier import Tier

    store = shared_store(tmp_path, fresh_redis.url)
    refs = fill(store, list(range(1000, 1000 + 2 * BLOCK)), flush=True)
    assert [tier.name for tier in store.tiers] == ["disk", "shared"]
    for tier in store.tiers:
        assert isinstance(tier, Tier)
        assert set(tier.lookup([r.key for r in refs])) == {r.key for r in refs}, tier.name
    store.close()


def test_a_stalled_store_is_a_miss_not_a_hang(tmp_path, redis_server):
    """A store that accepts connections but stops answering (SIGSTOP) times out, opens the
    circuit and is skipped; it is used again once it answers."""
    import signal

    redis_server.client().flushall()
    tokens = list(range(1100, 1100 + 2 * BLOCK))
    first = shared_store(tmp_path / "a", redis_server.url)
    refs = fill(first, tokens, flush=True)
    first.close()
    second = shared_store(tmp_path / "b", redis_server.url)
    redis_server.proc.send_signal(signal.SIGSTOP)
    try:
        assert second.match(refs, tokens).hits == []
        assert second.stats()["shared"]["connected"] is False and "Timeout" in second.stats()["shared"]["error"]
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    wait_for(lambda: second.shared.connected)
    assert second.match(refs, tokens).sources == ["shared", "shared"]
    second.close()


# -- TLS and Redis Cluster, each on its own throwaway servers ------------------------------
OPENSSL = shutil.which("openssl") or ""
REDIS_CLI = shutil.which("redis-cli") or shutil.which("valkey-cli") or ""


def wait_for_ping(client, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Wait for a server to answer; if its process exits first, fail with what it logged."""
    for _ in range(200):
        try:
            client.ping()
            return
        except redis.ConnectionError:
            if proc is not None and proc.poll() is not None:
                break
            time.sleep(0.05)
    said = log.read_text()[-2000:] if log is not None and log.exists() else ""
    raise TimeoutError(f"redis-server did not start:\n{said}")


def cluster_node_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too: a cluster node refuses
    ports above 55535, which the kernel's ephemeral range (up to 60999) often hands out."""
    import random
    import socket

    for _ in range(100):
        port = random.randint(20000, 55535)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair for a cluster node")


def make_certificates(workdir: Path) -> dict[str, Path]:
    """A throwaway CA and a server certificate it signs, for 127.0.0.1."""
    paths = {name: workdir / f"{name}.pem" for name in ("ca", "ca-key", "server", "server-key")}
    def run(*args):
        subprocess.run([OPENSSL, *args], check=True, capture_output=True, cwd=workdir)
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=kvtier test CA",
        "-keyout", paths["ca-key"], "-out", paths["ca"])
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
        "-keyout", paths["server-key"], "-out", workdir / "server.csr")
    (workdir / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", workdir / "server.csr", "-CA", paths["ca"], "-CAkey", paths["ca-key"],
        "-CAcreateserial", "-days", "1", "-extfile", workdir / "san.ext", "-out", paths["server"])
    return paths


@pytest.mark.skipif(not OPENSSL, reason="openssl is not installed (needed to make test certificates)")
def test_a_tls_store_is_used_with_the_ca_from_the_url_and_plain_text_is_a_warning(tmp_path, caplog):
    from urllib.parse import quote

    (tmp_path / "certs+ca").mkdir()  # a "+" must reach redis-py percent-encoded, not as a space
    certs = make_certificates(tmp_path / "certs+ca")
    port = free_port()
    proc = subprocess.Popen([REDIS_SERVER, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                             "--tls-cert-file", certs["server"], "--tls-key-file", certs["server-key"],
                             "--tls-ca-cert-file", certs["ca"], "--tls-auth-clients", "no",
                             "--save", "", "--appendonly", "no", "--dir", tmp_path],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_ping(redis.Redis(host="127.0.0.1", port=port, ssl=True, ssl_ca_certs=str(certs["ca"])))
        url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={quote(str(certs['ca']), safe='/')}"
        tokens = list(range(1200, 1200 + 2 * BLOCK))
        first = shared_store(tmp_path / "a", url)
        refs = fill(first, tokens, flush=True)
        assert first.stats()["counters"]["shared_uploads"] == 2
        first.close()
        second = shared_store(tmp_path / "b", url)
        assert second.match(refs, tokens).sources == ["shared", "shared"]
        second.close()
        untrusted = shared_store(tmp_path / "c", f"rediss://127.0.0.1:{port}/0")  # the system CAs
        assert untrusted.match(refs, tokens).hits == []
        assert untrusted.stats()["shared"]["connected"] is False
        assert "not trusted" in untrusted.stats()["shared"]["error"]
        assert "ssl_ca_certs" in untrusted.stats()["shared"]["error"]
        untrusted.close()
        plain = shared_store(tmp_path / "d", f"redis://127.0.0.1:{port}/0")  # TLS port, no TLS
        assert plain.match(refs, tokens).hits == []
        assert plain.stats()["shared"]["connected"] is False
        assert "use rediss://" in plain.stats()["shared"]["error"]
        assert any("not usable at start-up" in r.getMessage() for r in caplog.records)
        plain.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


class RedisClusterServers:
    """Three throwaway cluster-enabled redis-servers (masters, no replicas), one cluster."""

    def __init__(self, workdir: Path, count: int = 3):
        self.workdir, self.ports = workdir, [cluster_node_port() for _ in range(count)]
        self.procs: list[subprocess.Popen] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0?cluster=true"

    def start(self) -> "RedisClusterServers":
        logs = [self.workdir / f"node-{n}.log" for n in range(len(self.ports))]
        for n, port in enumerate(self.ports):
            node_dir = self.workdir / f"node-{n}"
            node_dir.mkdir()
            self.procs.append(subprocess.Popen(
                [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                 "--cluster-config-file", f"nodes-{n}.conf", "--save", "", "--appendonly", "no",
                 "--dir", node_dir, "--logfile", logs[n]], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        for port, proc, log in zip(self.ports, self.procs, logs):
            wait_for_ping(redis.Redis(host="127.0.0.1", port=port), proc, log)
        subprocess.run([REDIS_CLI, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                        "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=60)
        clients = [redis.Redis(host="127.0.0.1", port=p) for p in self.ports]
        wait_for(lambda: all(c.cluster("info")["cluster_state"] == "ok" for c in clients))
        return self

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.wait(timeout=10)


@pytest.mark.skipif(not REDIS_CLI, reason="redis-cli is not installed (needed to create the cluster)")
def test_a_redis_cluster_store_is_shared_with_a_models_keys_spread_over_slots(tmp_path):
    from redis.cluster import RedisCluster

    cluster = RedisClusterServers(tmp_path).start()
    try:
        tokens = list(range(1300, 1300 + 3 * BLOCK + 5))
        first = shared_store(tmp_path / "a", cluster.url)
        refs = fill(first, tokens, flush=True)
        assert first.stats()["counters"]["shared_uploads"] == 3
        assert first.stats()["counters"].get("shared_errors", 0) == 0
        first.close()
        second = shared_store(tmp_path / "b", cluster.url)
        match = second.match(refs, tokens)
        assert match.sources == ["shared"] * 3
        assert_hits_hold_their_arrays(match.hits)
        assert {r.key for r in refs} <= set(second.shared.keys())
        second.close()
        client = RedisCluster(host="127.0.0.1", port=cluster.ports[0])
        names = list(client.scan_iter(match=namespace("fp-test") + "*"))
        assert len({client.keyslot(name) for name in names}) > 1  # the pipelines crossed slots
        assert shared.model_usage(cluster.url)["fp-test"]["entries"] == 3
        assert shared.purge(cluster.url, "fp-test") == 3
        assert not list(client.scan_iter(match="kvtier:*"))
        client.close()
    finally:
        cluster.stop()


# -- machines on another mlx-lm: their entries a miss here, never removed from the team's store --
def test_another_mlx_lm_s_entries_are_a_miss_and_stay_in_the_shared_tier(tmp_path, fresh_redis, monkeypatch,
                                                                         llama_model, reference):
    """Machines of a team may run different mlx-lm versions, whose kernels compute other KV
    (and snapshot layouts): each misses the other's blocks, without deleting them."""
    import mlx_lm

    from kvtier.engine import Engine
    from kvtier.requests import GenerationRequest
    from kvtier.scheduler import generate

    tokens = [(5 * i) % 190 + 4 for i in range(3 * BLOCK + 9)]

    def config(name):
        return CacheConfig(cache_dir=tmp_path / name, block_size=BLOCK, shared_url=fresh_redis.url)

    def answer(engine, prompt):
        chunks = list(generate(engine, GenerationRequest(prompt, max_tokens=3, temperature=0.0)))
        return "".join(c.text for c in chunks), chunks[-1].usage

    real = mlx_lm.__version__
    monkeypatch.setattr(mlx_lm, "__version__", "0.0.1")  # the other machine's mlx-lm
    other = Engine(str(llama_model), config("other"))
    answer(other, tokens)
    other.store.flush()
    other.close()
    client = fresh_redis.client()
    names = sorted(client.scan_iter(match=namespace(other.fingerprint) + "*"))
    assert names
    monkeypatch.setattr(mlx_lm, "__version__", real)
    here = Engine(str(llama_model), config("here"))
    assert here.fingerprint != other.fingerprint
    text, usage = answer(here, tokens)
    assert usage.cached_tokens == 0  # the other's KV blocks are in the store, but not this mlx-lm's
    assert text == reference.generate(tokens, 3)
    assert here.store.stats()["counters"].get("shared_damaged", 0) == 0
    here.store.flush()
    here.close()
    assert set(names) <= set(client.scan_iter(match=namespace(other.fingerprint) + "*"))
