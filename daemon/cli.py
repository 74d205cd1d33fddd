"""The `kvtier` command."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from . import cli_cache, service
from kvtier.config import DEFAULT_DISK_BUDGET, CacheConfig, ServeConfig, default_cache_dir, \
    default_max_batch, default_ram_budget, parse_duration, parse_size


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvtier", description="Tiered RAM/SSD KV-cache daemon for MLX")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the daemon (OpenAI-compatible HTTP API)")
    serve.add_argument("--model", required=True,
                       help="model directory, or a Hugging Face repo id (downloaded on first use)")
    serve.add_argument("--offline", action="store_true",
                       help="never download: the model must be a directory or in the HF cache")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8420)
    serve.add_argument("--cache-dir", default=None, help=f"default: {default_cache_dir()}")
    serve.add_argument("--ram-budget", type=_size, default=None,
                       help=f"bytes of KV kept in memory (default: {default_ram_budget() // 2**20} MiB, "
                            "a fifth of RAM capped at 8 GiB)")
    serve.add_argument("--disk-budget", type=_size, default=DEFAULT_DISK_BUDGET,
                       help="bytes of cache files on disk (default: 20GB)")
    serve.add_argument("--block-size", type=int, default=None, help="tokens per cached block (default: 128)")
    serve.add_argument("--prefill-step-size", type=int, default=2048,
                       help="tokens computed per forward pass while prefilling (default: 2048)")
    serve.add_argument("--kv-bits", type=int, default=None, choices=[2, 3, 4, 5, 6, 8],
                       help="quantize the KV cache to this many bits (default: model dtype)")
    serve.add_argument("--kv-group-size", type=int, default=64)
    serve.add_argument("--max-tokens", type=int, default=512,
                       help="completion length when a request gives none (default: 512)")
    serve.add_argument("--max-context", type=service.positive_int, default=None,
                       help="tokens a request may span, prompt and completion (default: the limit "
                            "the model's config.json declares; none if it declares none)")
    serve.add_argument("--pressure-below", type=_size, default=None,
                       help="spill hot KV to disk when available memory falls below this "
                            "(default: a tenth of physical memory)")
    serve.add_argument("--pressure-keep", type=float, default=0.25,
                       help="fraction of the RAM budget kept hot after a spill (default: 0.25)")
    serve.add_argument("--api-key", default=None,
                       help="require this bearer token on every route (or set KVTIER_API_KEY); "
                            "needed to bind a non-loopback address")
    serve.add_argument("--max-waiting", type=int, default=32,
                       help="requests queued before the daemon answers 503 (default: 32)")
    serve.add_argument("--max-batch", type=int, default=None,
                       help="requests decoded together in one batch, where batched decode is exact "
                            f"for the model (default: {default_max_batch()}); 1 runs them one at a time")
    serve.add_argument("--batch-inexact", action="store_true",
                       help="batch even where batched decode is not bit-identical to decoding alone "
                            "(as mlx_lm.server does): faster, but greedy text may differ from mlx-lm's")
    serve.add_argument("--model-alias", action="append", default=[], metavar="NAME[=MODEL]",
                       help="another name for the served model, listed in /v1/models (repeatable)")
    serve.add_argument("--strict-model-names", action="store_true",
                       help="answer 404 for model names other than the served model's and its "
                            "aliases (default: any name is served by the one model)")
    serve.add_argument("--keep-billing-header", action="store_true",
                       help="keep Claude Code's x-anthropic-billing-header system line in the "
                            "prompt (default: dropped; it changes per conversation)")
    serve.add_argument("--shared", default=None, metavar="URL",
                       help="a team's shared tier on Redis/Valkey: redis://host:6379/0, rediss:// for "
                            "TLS; the password in the URL or KVTIER_SHARED_PASSWORD")
    serve.add_argument("--shared-ttl", type=_duration, default=None,
                       help="how long a shared entry lives (e.g. 7d; default: until the store evicts it)")
    serve.add_argument("--log-level", default="info")
    cli_cache.add_parsers(commands)
    service.add_parser(commands)
    return parser


def serve(args: argparse.Namespace) -> int:
    from . import server
    from .app import init_app
    from .auth import is_loopback
    from .model_names import parse_alias
    from kvtier.hub import fetch_model

    given = {"cache_dir": args.cache_dir, "ram_budget": args.ram_budget, "block_size": args.block_size}
    cache = CacheConfig(disk_budget=args.disk_budget, kv_bits=args.kv_bits,
                        kv_group_size=args.kv_group_size, shared_url=args.shared, shared_ttl=args.shared_ttl,
                        **{k: v for k, v in given.items() if v is not None})
    config = ServeConfig(model=args.model, host=args.host, port=args.port,
                         prefill_step_size=args.prefill_step_size,
                         max_tokens_default=args.max_tokens, pressure_keep=args.pressure_keep,
                         max_context=args.max_context, cache=cache)
    if args.pressure_below is not None:
        config.pressure_below = args.pressure_below
    config.api_key = args.api_key or os.environ.get("KVTIER_API_KEY") or None
    config.max_waiting = args.max_waiting
    if args.max_batch is not None:
        if args.max_batch < 1:
            raise ValueError("--max-batch must be at least 1")
        config.max_batch = args.max_batch
    config.batch_inexact = args.batch_inexact
    config.model_aliases = [parse_alias(alias, args.model) for alias in args.model_alias]
    config.strict_model_names = args.strict_model_names
    config.keep_billing_header = args.keep_billing_header
    if not config.api_key and not is_loopback(config.host):
        raise ValueError(f"binding {config.host} exposes the model beyond this machine: "
                         "set --api-key (or KVTIER_API_KEY) first")
    fetch_model(args.model, offline=args.offline)  # before binding, as mlx_lm.server does
    server.run(init_app(config), config.host, config.port)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(args, "log_level", "info").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        from .blas import reexec_with_openblas

        reexec_with_openblas()
        try:
            return serve(args)
        except ValueError as exc:
            print(f"kvtier: {exc}", file=sys.stderr)
            return 2
    if args.command in cli_cache.COMMANDS:
        return cli_cache.run(args)
    if args.command == "service":
        return service.run(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
