"""The flags of `kvtier serve`, declared once: `serve` reads them, `service install` takes the
same ones and writes those given into the service's command line. And the argparse types
the commands share (sizes, durations, positive counts)."""

from __future__ import annotations

import argparse
from typing import Any, Callable, TypeVar

from kvtier import config
from kvtier.config import (
    DEFAULT_DISK_BUDGET,
    default_cache_dir,
    default_max_batch,
    default_memory_budget,
    default_ram_budget,
)

T = TypeVar("T")


def argument_type(parse: Callable[[str], T], name: str) -> Callable[[str], T]:
    """An argparse type from a parser that raises ValueError: its message is argparse's."""
    def convert(text: str) -> T:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = name
    return convert


class Size(int):
    """Bytes, as given on the command line: a service's command line keeps "4GB" as typed."""

    text: str

    def __new__(cls, text: str) -> "Size":
        size = super().__new__(cls, config.parse_size(text))
        size.text = text
        return size

    def __str__(self) -> str:
        return self.text


class Duration(float):
    """Seconds, as given on the command line ("5m"); "never" is infinite."""

    text: str

    def __new__(cls, text: str) -> "Duration":
        seconds = float("inf") if text == "never" else config.parse_duration(text)
        duration = super().__new__(cls, seconds)
        duration.text = text
        return duration

    def __str__(self) -> str:
        return self.text


def _duration(text: str) -> Duration:
    if text == "never":
        raise ValueError(f"not a duration: {text!r} (try 30m, 12h, 7d)")
    return Duration(text)


def _positive(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise ValueError(f"not a positive whole number: {text!r}")
    return int(text)


def _port(text: str, lowest: int = 0) -> int:
    if not text.strip().isdigit() or not lowest <= int(text) <= 65535:
        raise ValueError(f"not a port number ({lowest}-65535): {text!r}")
    return int(text)


def _auto_or_positive(text: str) -> int | str:
    return "auto" if text == "auto" else _positive(text)


size = argument_type(Size, "size")
duration = argument_type(_duration, "duration")
keep_alive = argument_type(Duration, "keep_alive")  # a duration or "never"
positive_int = argument_type(_positive, "positive_int")
auto_or_positive = argument_type(_auto_or_positive, "auto_or_positive")
port = argument_type(_port, "port")  # 0: any free port, as the log's "listening on" says
daemon_port = argument_type(lambda text: _port(text, lowest=1), "port")  # one a daemon listens on

# (flag, argparse keywords); a `service install` writes only the flags it was given.
SERVE_FLAGS: list[tuple[str, dict[str, Any]]] = [
    ("--model", dict(action="append", default=[], metavar="[NAME=]SOURCE",
                     help="a model directory, or a Hugging Face repo id (downloaded on first use), "
                          "optionally named NAME; repeatable: the first is the default model, "
                          "serving names that match no other")),
    ("--models-file", dict(default=None, metavar="FILE",
                           help="a TOML file of [[models]] (source, name, aliases, max_context, "
                                "kv_bits, kv_group_size, pin), after any --model (docs/operations.md)")),
    ("--offline", dict(action="store_true",
                       help="never download: the model must be a directory or in the HF cache")),
    ("--host", dict(default="127.0.0.1",
                    help="address to listen on (default: 127.0.0.1; any other needs --api-key)")),
    ("--port", dict(type=port, default=8420, help="port to listen on (default: 8420; 0: any free one)")),
    ("--cache-dir", dict(default=None, help=f"default: {default_cache_dir()}")),
    ("--ram-budget", dict(type=size, default=None,
                          help=f"bytes of KV kept in memory (default: {default_ram_budget() // 2**20} "
                               "MiB, a fifth of RAM capped at 8 GiB)")),
    ("--prefetch", dict(type=size, default=None,
                        help="bytes of the most recently used cache entries read from disk into RAM "
                             "at start-up, in the background (default: half the RAM budget; 0: none)")),
    ("--disk-budget", dict(type=size, default=DEFAULT_DISK_BUDGET,
                           help="bytes of cache files on disk (default: 20GB)")),
    ("--memory-budget", dict(type=size, default=None,
                             help="bytes of model weights and hot KV of the loaded models together; "
                                  "past it the least recently used idle model is unloaded (default: "
                                  f"{default_memory_budget() // 2**30} GiB, three quarters of RAM)")),
    ("--keep-alive", dict(type=keep_alive, default=keep_alive("never"), metavar="DURATION|never",
                          help="unload a model idle this long, e.g. 5m (default: never; the memory "
                               "budget unloads idle models when another needs the room)")),
    ("--block-size", dict(type=int, default=None, help="tokens per cached block (default: 128)")),
    ("--prefill-step-size", dict(type=auto_or_positive, default="auto",
                                 help="tokens computed per forward pass while prefilling (default: auto, "
                                      "timed at start-up so a chunk takes ~0.3 s: 16-2048, smaller deeper "
                                      "in a prompt)")),
    ("--kv-bits", dict(type=int, default=None, choices=[2, 3, 4, 5, 6, 8],
                       help="quantize the KV cache to this many bits (default: model dtype)")),
    ("--kv-group-size", dict(type=int, default=64,
                             help="values sharing one scale and bias when --kv-bits quantizes (default: 64)")),
    ("--max-tokens", dict(type=positive_int, default=None,
                          help="most tokens any completion may have, whatever the request asks "
                               "(default: none; a request without a limit runs until the model "
                               "stops or the context is full)")),
    ("--max-context", dict(type=positive_int, default=None,
                           help="tokens a request may span, prompt and completion (default: the "
                                "limit the model's config.json declares; none if it declares none)")),
    ("--pressure-below", dict(type=size, default=None,
                              help="spill hot KV to disk when available memory falls below this "
                                   "(default: a tenth of physical memory)")),
    ("--pressure-keep", dict(type=float, default=0.25,
                             help="fraction of the RAM budget kept hot after a spill (default: 0.25)")),
    ("--api-key", dict(default=None,
                       help="require this bearer token on every route (or set KVTIER_API_KEY); "
                            "needed to bind a non-loopback address")),
    ("--allowed-hosts", dict(action="append", default=[], metavar="NAME",
                             help="another name clients may reach the daemon by (the Host header; default: "
                                  "127.0.0.1, localhost, [::1] and --host; repeatable)")),
    ("--allowed-origins", dict(action="append", default=[], metavar="ORIGIN",
                               help="a web origin (http://host:port) whose pages may call the daemon, with "
                                    "CORS (default: none but the daemon's own; repeatable)")),
    ("--show-previews", dict(action="store_true",
                             help="show the start of each cached prompt's text in /cache/entries "
                                  "(default: counts, keys and times only)")),
    ("--max-waiting", dict(type=positive_int, default=32,  # 0 refused every request, even an idle daemon's
                           help="requests queued before the daemon answers 503 (default: 32)")),
    ("--max-batch", dict(type=int, default=None,
                         help="requests served at once, decoded in one batch "
                              f"(default: {default_max_batch()}); 1 runs them one at a time")),
    ("--exact", dict(action="store_true",
                     help="where batched decode is not bit-identical to decoding alone on this backend "
                          "(/health batching.exact), interleave requests, each decoding its own row: "
                          "answers equal plain mlx-lm's, at one stream's decode rate")),
    ("--batch-inexact", dict(action="store_true", help=argparse.SUPPRESS)),  # the default now
    ("--model-alias", dict(action="append", default=[], metavar="NAME[=MODEL]",
                           help="another name for the default model, or for MODEL (any configured "
                                "model's name); globs such as 'claude-*' allowed (repeatable)")),
    ("--strict-model-names", dict(action="store_true",
                                  help="answer 404 for model names that are no configured model's "
                                       "name or alias (default: the default model serves them)")),
    ("--allow-any-model", dict(action="store_true",
                               help="a request may name a Hugging Face repo id not configured: it "
                                    "is loaded from the HF cache (downloaded unless --offline)")),
    ("--keep-billing-header", dict(action="store_true",
                                   help="keep Claude Code's x-anthropic-billing-header system line in "
                                        "the prompt (default: dropped; it changes per conversation)")),
    ("--shared", dict(default=None, metavar="URL",
                      help="a team's shared tier on Redis/Valkey: redis://host:6379/0, rediss:// for "
                           "TLS; the password in the URL or KVTIER_SHARED_PASSWORD (keep it out of "
                           "the URL for a service)")),
    ("--shared-ttl", dict(type=duration, default=None,
                          help="how long a shared entry lives (e.g. 7d; default: until the store evicts it)")),
    ("--read-timeout", dict(type=float, default=60.0, metavar="SECONDS",
                            help="seconds a client has to send a request's headers, and its body, "
                                 "before the connection is closed (the body: a 408); also how "
                                 "long an idle keep-alive connection stays open (default: 60)")),
    ("--log-level", dict(default="info", type=str.lower, choices=["debug", "info", "warning", "error"],
                         help="the log's detail (default: info)")),
]
# Not written into a service file, which other users may be able to read.
SERVE_ONLY = {"--api-key"}
SERVICE_HELP = {"--cache-dir": "also set as KVTIER_CACHE_DIR for the service"}


def _dest(flag: str) -> str:
    return flag[2:].replace("-", "_")


def add_serve_flags(parser: argparse.ArgumentParser, for_service: bool = False) -> None:
    """The serve flags; for a service without defaults, so that only those given are written."""
    for flag, options in SERVE_FLAGS:
        if for_service and flag in SERVE_ONLY:
            continue
        if for_service:
            options = dict(options, default=argparse.SUPPRESS)
            options["help"] = SERVICE_HELP.get(flag, options.get("help"))
        parser.add_argument(flag, **options)


def serve_args(options: dict[str, Any]) -> tuple[str, ...]:
    """The `kvtier serve` command line of the given options (by dest; None: not given), in
    the order the flags are declared."""
    args: list[str] = []
    for flag, declared in SERVE_FLAGS:
        value = options.get(_dest(flag))
        if value is None or value is False or value == []:
            continue
        if declared.get("action") == "store_true":
            args.append(flag)
        else:
            repeated = declared.get("action") == "append" and not isinstance(value, str)
            for item in value if repeated else [value]:
                args += [flag, str(item)]
    return tuple(args)
