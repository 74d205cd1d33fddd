"""Shared tier: blocks on a Redis or Valkey server that every daemon of a team reads and fills.

Keys are namespaced by format version and model fingerprint, so only daemons that load the
same model (same weights, dtype, block size) ever meet each other's blocks:
  kvtier:v1:<fingerprint>:b:<key hex>     a block: format header + the block file's bytes
  kvtier:v1:<fingerprint>:c:<parent hex>  a hash of the entries continuing <parent>:
                                          "<kind>:<key hex>" -> their tokens (uint32 LE)
Nothing read back is trusted: the header's checksum, size and tokens hash are checked here,
and the caller (shared_io.py) checks the tokens, key and shapes as it does for disk files.

The store is best effort, never on a request's critical path for long: uploads are queued
(bounded, dropped and counted when full), request-path reads have short socket timeouts,
and after a failure the tier is skipped (circuit open) until a background ping succeeds.
Eviction is the server's own (maxmemory + allkeys-lru, see docs/operations.md).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .blocks import encode_tokens
from .disk import DamagedBlock, checksum
from .tier import Count

log = logging.getLogger("kvtier.shared")

FORMAT_VERSION = 1
MAGIC = b"KVT" + bytes([FORMAT_VERSION])
PASSWORD_ENV = "KVTIER_SHARED_PASSWORD"
CONNECT_TIMEOUT = 0.5  # seconds: a dead host must not hold a request up
SOCKET_TIMEOUT = 0.5  # per socket read: a stalled store holds a request up once, this long
RECONNECT_SECONDS = 1.0  # while the store is unreachable, how often it is pinged
UPLOAD_BATCH = 32  # entries per upload pipeline


def namespace(fingerprint: str) -> str:
    return f"kvtier:v{FORMAT_VERSION}:{fingerprint}:"


def redacted(url: str) -> str:
    """The URL without its password, for logs and stats."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username + ':' if parts.username else ':'}***@{host}"
    netloc += f":{parts.port}" if parts.port else ""
    return urlunsplit(parts._replace(netloc=netloc))


def connect(url: str, socket_timeout: float = SOCKET_TIMEOUT):
    """A client for `url` (redis://, rediss:// for TLS, ?cluster=true for Redis Cluster), with
    short timeouts and no retries: the tier's own circuit breaker decides when to try again.
    The password comes from the URL, else from KVTIER_SHARED_PASSWORD; other query parameters
    are redis-py's (e.g. ?ssl_ca_certs=/path/ca.pem to trust a private CA)."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"not a Redis URL: {redacted(url)!r} (try redis://host:6379/0 or rediss://...)")
    query = parse_qs(parts.query)
    cluster = query.pop("cluster", ["false"])[0].lower() in ("1", "true", "yes")
    options = dict(socket_timeout=socket_timeout, socket_connect_timeout=CONNECT_TIMEOUT,
                   retry=Retry(NoBackoff(), 0))
    if parts.password is None and os.environ.get(PASSWORD_ENV):
        options["password"] = os.environ[PASSWORD_ENV]
    # Re-encoded: parse_qs decoded the values, and redis-py decodes them again.
    clean = urlunsplit(parts._replace(query=urlencode({k: v[0] for k, v in query.items()})))
    if cluster:
        from redis.cluster import RedisCluster

        return RedisCluster.from_url(clean, **options)
    return redis.Redis.from_url(clean, **options)


@dataclass
class Header:
    """What a stored value says about itself, checked before its payload is parsed."""

    kind: str
    nbytes: int
    checksum: str
    tokens_hash: str


def encode_value(kind: str, payload: bytes, tokens_digest: str) -> bytes:
    header = json.dumps({"kind": kind, "nbytes": len(payload), "checksum": checksum(payload),
                         "tokens_hash": tokens_digest}, sort_keys=True).encode()
    return MAGIC + len(header).to_bytes(4, "little") + header + payload


def decode_value(value: bytes) -> tuple[Header, bytes]:
    """The header and the block file's bytes of a stored value; DamagedBlock if they do not
    check out (another format, truncated, altered)."""
    if len(value) < 8 or value[:4] != MAGIC:
        raise DamagedBlock("not a kvtier shared value of this format")
    size = int.from_bytes(value[4:8], "little")
    try:
        fields = json.loads(value[8 : 8 + size])
        header = Header(str(fields["kind"]), int(fields["nbytes"]), str(fields["checksum"]),
                        str(fields["tokens_hash"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise DamagedBlock(f"unreadable shared value header: {exc}") from exc
    payload = value[8 + size :]
    if len(payload) != header.nbytes:
        raise DamagedBlock("shared value truncated or padded")
    if checksum(payload) != header.checksum:
        raise DamagedBlock("shared value checksum mismatch")
    return header, payload


@dataclass
class Upload:
    key: bytes
    parent: bytes
    kind: str
    tokens: np.ndarray
    value: bytes


class SharedTier:
    """The shared store as one model's tier. `count` feeds the daemon's counters."""

    name = "shared"

    def __init__(self, url: str, fingerprint: str, count: Count,
                 ttl_seconds: float | None = None, queue_bytes: int = 256 << 20):
        self.url = redacted(url)
        self._tls = url.startswith("rediss://")
        self.ttl = int(ttl_seconds) if ttl_seconds else None
        self._count = count
        self._prefix = namespace(fingerprint)
        self._client = connect(url)
        self._queue: deque[Upload] = deque()
        self._queue_bytes, self._max_queue_bytes = 0, queue_bytes
        self._busy = False
        self._cond = threading.Condition()
        self._up = threading.Event()
        self._closing = threading.Event()
        self.error: str | None = None
        self._try_connect(first=True)
        self._threads = [threading.Thread(target=self._upload_loop, name="kvtier-shared-upload", daemon=True),
                         threading.Thread(target=self._reconnect_loop, name="kvtier-shared-ping", daemon=True)]
        for thread in self._threads:
            thread.start()

    @property
    def connected(self) -> bool:
        return self._up.is_set()

    # -- reads and writes (shared_io.SharedIO makes them a tier.Tier) ----------------------
    def lookup(self, keys: list[bytes]) -> dict[bytes, int]:
        """Of `keys`, those the store holds, with their value sizes: one round trip."""
        if not keys or not self.connected:
            return {}
        sizes = self._call(lambda: self._pipelined([("strlen", self._block(k)) for k in keys]))
        return {k: int(n) for k, n in zip(keys, sizes or ()) if n}

    def get(self, key: bytes) -> bytes | None:
        """The stored value under `key` (unchecked: see `decode_value`), None when missing or
        the store is unreachable."""
        if not self.connected:
            return None
        return self._call(lambda: self._client.get(self._block(key)))

    def put(self, entry: Upload) -> None:
        """Queue an upload; dropped (and counted) when the queue is full or the store down."""
        with self._cond:
            if not self.connected or self._queue_bytes + len(entry.value) > self._max_queue_bytes:
                self._count("shared_uploads_dropped", 1)
                return
            self._queue.append(entry)
            self._queue_bytes += len(entry.value)
            self._cond.notify_all()

    def remove(self, key: bytes, parent: bytes | None = None, kind: str = "kv") -> None:
        """Forget a damaged or purged entry (and its line in its parent's listing)."""
        def remove() -> None:
            pipe = self._client.pipeline(transaction=False)
            pipe.delete(self._block(key))
            if parent is not None:
                pipe.hdel(self._children(parent), f"{kind}:{key.hex()}")
            pipe.execute()

        if self.connected:
            self._call(remove)

    def keys(self) -> Iterator[bytes]:
        for name in self._client.scan_iter(match=self._prefix + "b:*", count=1000):
            yield bytes.fromhex(name.decode().rsplit(":", 1)[1])

    def children(self, parent: bytes, kind: str = "kv") -> dict[bytes, np.ndarray]:
        """Tokens of the entries of `kind` the store lists under `parent` (unchecked)."""
        if not self.connected:
            return {}
        listing = self._call(lambda: self._client.hgetall(self._children(parent))) or {}
        found = {}
        for field, tokens in listing.items():
            field_kind, _, key_hex = field.decode(errors="replace").partition(":")
            if field_kind != kind or len(tokens) % 4:
                continue
            try:
                found[bytes.fromhex(key_hex)] = np.frombuffer(tokens, dtype="<u4")
            except ValueError:
                continue
        return found

    def stats(self) -> dict:
        with self._cond:
            queued, queued_bytes = len(self._queue), self._queue_bytes
        return {"url": self.url, "connected": self.connected, "error": self.error,
                "ttl_seconds": self.ttl, "queued_uploads": queued, "queued_bytes": queued_bytes}

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until queued uploads are sent (or dropped); True if that happened in time."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._busy, timeout)

    def close(self) -> None:
        self.flush(timeout=5.0)
        self._closing.set()
        with self._cond:
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=5.0)
        try:
            self._client.close()
        except redis.RedisError:
            pass

    # -- internals -----------------------------------------------------------------------
    def _block(self, key: bytes) -> str:
        return f"{self._prefix}b:{key.hex()}"

    def _children(self, parent: bytes) -> str:
        return f"{self._prefix}c:{parent.hex()}"

    def _pipelined(self, commands: list[tuple]) -> list:
        pipe = self._client.pipeline(transaction=False)
        for name, *args in commands:
            getattr(pipe, name)(*args)
        return pipe.execute()

    def _call(self, operation: Callable):
        """Run one operation against the store; a failure opens the circuit (the tier is
        skipped until the background ping succeeds) and counts as an error, never raises."""
        try:
            return operation()
        except (redis.RedisError, OSError) as exc:
            self._failed(exc)
            return None

    def _failed(self, exc: Exception) -> None:
        self._count("shared_errors", 1)
        was_up = self._up.is_set()
        self._up.clear()
        self.error = describe_error(exc, self._tls)
        if was_up:
            log.warning("shared cache %s unreachable (%s): serving from the local tiers, "
                        "reconnecting in the background", self.url, self.error)

    def _try_connect(self, first: bool = False) -> None:
        try:
            self._client.ping()
        except (redis.RedisError, OSError) as exc:
            self.error = describe_error(exc, self._tls)
            if first:
                self._count("shared_errors", 1)
                log.warning("shared cache %s not usable at start-up (%s): serving from the local "
                            "tiers, retrying in the background", self.url, self.error)
            return
        self.error = None
        self._up.set()
        log.info("shared cache %s connected", self.url)

    def _reconnect_loop(self) -> None:
        while not self._closing.wait(RECONNECT_SECONDS):
            if not self._up.is_set():
                self._try_connect()

    def _upload_loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closing.is_set())
                if not self._queue:
                    return
                batch = [self._queue.popleft() for _ in range(min(UPLOAD_BATCH, len(self._queue)))]
                self._busy = True
            try:
                self._upload(batch)
            finally:
                with self._cond:
                    self._queue_bytes -= sum(len(u.value) for u in batch)
                    self._busy = False
                    self._cond.notify_all()

    def _upload(self, batch: list[Upload]) -> None:
        if not self.connected:
            self._count("shared_uploads_dropped", len(batch))
            return

        def send() -> bool:
            pipe = self._client.pipeline(transaction=False)
            for upload in batch:
                pipe.set(self._block(upload.key), upload.value, ex=self.ttl)
                listing = self._children(upload.parent)
                pipe.hset(listing, f"{upload.kind}:{upload.key.hex()}", encode_tokens(upload.tokens))
                if self.ttl:
                    pipe.expire(listing, self.ttl)
            pipe.execute()
            return True

        if self._call(send):
            self._count("shared_uploads", len(batch))
            self._count("shared_bytes_uploaded", sum(len(u.value) for u in batch))
        else:
            self._count("shared_uploads_dropped", len(batch))


def describe_error(exc: Exception, tls: bool = False) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, redis.AuthenticationError) or "NOAUTH" in text or "WRONGPASS" in text:
        return (f"authentication failed ({text}): check the password in the URL or "
                f"{PASSWORD_ENV}")
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return (f"TLS certificate not trusted ({text}): add ?ssl_ca_certs=/path/to/ca.pem "
                "to the URL")
    if not tls and ("reset by peer" in text or "closed by server" in text):
        return f"{type(exc).__name__}: {text} (if the store expects TLS, use rediss://)"
    return f"{type(exc).__name__}: {text}"


# -- operations without a model (the CLI) --------------------------------------------------
def model_usage(url: str) -> dict[str, dict]:
    """Entries and bytes stored per model fingerprint, by scanning this format's keys."""
    client = connect(url, socket_timeout=10.0)
    usage: dict[str, dict] = {}
    names = list(client.scan_iter(match=f"kvtier:v{FORMAT_VERSION}:*:b:*", count=1000))
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.strlen(name)
    for name, size in zip(names, pipe.execute() if names else ()):
        fingerprint = name.decode().split(":")[2]
        entry = usage.setdefault(fingerprint, {"entries": 0, "bytes": 0})
        entry["entries"] += 1
        entry["bytes"] += int(size)
    client.close()
    return usage


def purge(url: str, fingerprint: str | None = None) -> int:
    """Remove one model's entries (or every kvtier entry of this format); returns the number
    of blocks removed."""
    client = connect(url, socket_timeout=10.0)
    pattern = namespace(fingerprint) + "*" if fingerprint else f"kvtier:v{FORMAT_VERSION}:*"
    removed, batch = 0, []
    for name in client.scan_iter(match=pattern, count=1000):
        batch.append(name)
        removed += b":b:" in name
        if len(batch) >= 500:
            client.unlink(*batch)
            batch = []
    if batch:
        client.unlink(*batch)
    client.close()
    return removed
