"""The `kvtier` command."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys

from kvtier.config import CacheConfig, ServeConfig

from . import cli_cache, cli_models, cli_open, service
from .serve_options import add_serve_flags

# The commands that run the model: on the BLAS the daemon runs it on (daemon/blas.py), as
# the cache's entries are keyed by it (a warmed prompt must be one the daemon can reuse).
MODEL_COMMANDS = ("serve", "warm")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvtier", description="Tiered RAM/SSD KV-cache daemon for MLX")
    parser.add_argument("--version", action="version", version=f"kvtier {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the daemon (OpenAI-compatible HTTP API)")
    add_serve_flags(serve)
    cli_cache.add_parsers(commands)
    service.add_parser(commands)
    cli_open.add_parser(commands)
    cli_models.add_parser(commands)
    return parser


def package_version() -> str:
    """The installed package's version (pyproject.toml's, as pip recorded it)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kvtier")
    except PackageNotFoundError:
        return "(not installed: pip install -e .)"


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """The daemon's settings from `kvtier serve`'s flags (ValueError for a bad combination)."""
    from .auth import is_loopback
    from .model_config import configured_models

    given = {"cache_dir": args.cache_dir, "ram_budget": args.ram_budget, "block_size": args.block_size}
    cache = CacheConfig(disk_budget=args.disk_budget, kv_bits=args.kv_bits,
                        kv_group_size=args.kv_group_size, shared_url=args.shared, shared_ttl=args.shared_ttl,
                        **{k: v for k, v in given.items() if v is not None})
    models = configured_models(args.model, args.models_file, args.model_alias)
    config = ServeConfig(model=models[0].source, models=models, host=args.host, port=args.port,
                         prefill_step_size=None if args.prefill_step_size == "auto" else args.prefill_step_size,
                         max_tokens_ceiling=args.max_tokens, pressure_keep=args.pressure_keep,
                         max_context=args.max_context, cache=cache)
    if args.pressure_below is not None:
        config.pressure_below = args.pressure_below
    config.api_key = args.api_key or os.environ.get("KVTIER_API_KEY") or None
    config.max_waiting = args.max_waiting
    if args.max_batch is not None:
        if args.max_batch < 1:
            raise ValueError("--max-batch must be at least 1")
        config.max_batch = args.max_batch
    if args.batch_inexact:
        logging.getLogger("kvtier").warning("--batch-inexact is the default now: requests batch unless --exact is given")
    config.exact = args.exact
    config.prefetch = args.prefetch
    apply_model_flags(config, args)
    config.keep_billing_header = args.keep_billing_header
    config.allowed_hosts, config.allowed_origins = args.allowed_hosts, args.allowed_origins
    config.show_previews = args.show_previews
    if not args.read_timeout > 0:
        raise ValueError("--read-timeout must be a positive number of seconds")
    config.read_timeout = args.read_timeout
    if not config.api_key and not is_loopback(config.host):
        raise ValueError(f"binding {config.host} exposes the model beyond this machine: "
                         "set --api-key (or KVTIER_API_KEY) first")
    return config


def apply_model_flags(config: ServeConfig, args: argparse.Namespace) -> None:
    """The models' settings besides which they are: how names are resolved, the memory they share."""
    config.offline, config.allow_any_model = args.offline, args.allow_any_model
    config.strict_model_names = args.strict_model_names
    if args.memory_budget is not None:
        config.memory_budget = args.memory_budget
    config.keep_alive = None if math.isinf(args.keep_alive) else float(args.keep_alive)


def serve(args: argparse.Namespace) -> int:
    """Run the daemon; 1 when its model failed to load (ValueError for what is wrong before
    it starts: the flags, the address, the model's path)."""
    from kvtier.hub import fetch_model
    from kvtier.index_file import start_walk

    from .listen import open_sockets

    config = serve_config(args)
    sockets = open_sockets(config.host, config.port)  # first: a busy port is known at once
    for spec in config.models:  # every model before start-up: a download is a one-time wait
        fetch_model(spec.source, offline=config.offline)
    # The full check of a large index takes a while: it runs while MLX, mlx-lm and the model load.
    start_walk(config.cache.cache_dir / "index")

    from . import server
    from .app import init_app
    from .state import STATE

    app = init_app(config)
    server.run(app, sockets)
    load_error = app[STATE].worker.load_error
    if load_error is not None:
        print(f"kvtier: could not load the model {config.model}: {load_error}", file=sys.stderr)
        return 1
    return 0


# The exit status of a command whose output's reader left, as a shell reports `ls | head`'s ls.
SIGPIPE_STATUS = 128 + 13


def main(argv: list[str] | None = None) -> int:
    try:
        return _run(argv)
    except BrokenPipeError:  # `kvtier ls | head`: the reader has what it wanted; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nor another at exit's flush
        return SIGPIPE_STATUS


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(args, "log_level", "info").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command in MODEL_COMMANDS:
        from .blas import reexec_with_openblas

        reexec_with_openblas()
    if args.command == "serve":
        try:
            return serve(args)
        except ValueError as exc:
            print(f"kvtier: {exc}", file=sys.stderr)
            return 2
    if args.command in cli_cache.COMMANDS:
        return cli_cache.run(args)
    if args.command == "service":
        return service.run(args)
    if args.command == "open":
        return cli_open.run(args)
    if args.command == cli_models.COMMAND:
        return cli_models.run(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
