"""`kvtier stats | ls | purge | verify | pin | unpin | warm`: inspect and manage a cache
directory, with the daemon running or stopped. Human output by default, `--json` for tools."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from kvtier.config import default_cache_dir, format_size

from .serve_options import duration, size

COMMANDS = ("stats", "ls", "purge", "verify", "pin", "unpin", "warm")


def add_parsers(commands: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--cache-dir", default=None, help=f"default: {default_cache_dir()}")
    common.add_argument("--json", action="store_true", help="machine-readable output")

    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("--shared", metavar="URL", default=None,
                        help="the shared tier (redis://host:6379/0, rediss://...): stats adds what it "
                             "holds per model; ls and purge act on it instead of the cache directory")

    commands.add_parser("stats", parents=[common, shared], help="tiers, budgets, hit rates per model")
    ls = commands.add_parser("ls", parents=[common, shared], help="cached prefixes")
    ls.add_argument("--limit", type=_natural, default=50, help="at most this many prefixes (default 50)")
    ls.add_argument("--offset", type=_natural, default=0, help="skip this many first (the next page)")
    purge = commands.add_parser("purge", parents=[common, shared], help="remove cached entries")
    what = purge.add_argument_group("what to remove (at least one)")
    what.add_argument("--all", action="store_true",
                      help="pinned entries included; alone, every entry (with --model or --older-than: what they select)")
    what.add_argument("--model", help="a model's entries: a name it was served by or its directory name, "
                                      "or a fingerprint or its start, as `stats` and `ls` show them "
                                      "(a name two models share is refused, listing them)")
    what.add_argument("--older-than", type=duration, help="entries unused for this long (7d, 12h)")
    what.add_argument("--to-size", type=size, help="evict least recently used entries down to this size")
    verify = commands.add_parser("verify", parents=[common], help="check the index, and every file against it")
    verify.add_argument("--fix", action="store_true",
                        help="remove what is broken; rebuild a damaged index from the block files")
    pin_help = {"pin": "protect a cached prefix from eviction and purges (but --all)",
                "unpin": "let a pinned prefix be evicted and purged again"}
    for name in ("pin", "unpin"):
        pin = commands.add_parser(name, parents=[common], help=pin_help[name])
        pin.add_argument("key", help="the prefix key from `kvtier ls` (a unique start is enough)")
    warm = commands.add_parser("warm", parents=[common], help="prefill a prompt and persist it")
    warm.add_argument("--model", required=True, help="a model directory or a Hugging Face repo id, as serve's")
    warm.add_argument("file", help="a text file (used as the system prompt), a .json file with "
                                   "{messages, tools}, or - for standard input (either)")
    warm.add_argument("--pin", action="store_true", help="protect it from eviction")
    warm.add_argument("--block-size", type=int, default=None, help="must match the daemon's")
    warm.add_argument("--kv-bits", type=int, default=None, help="must match the daemon's")


def run(args: argparse.Namespace) -> int:
    cache_dir = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
    if args.command == "warm":
        return _warm(args, cache_dir)
    import lmdb

    from kvtier.index import IndexDamaged
    from kvtier.ops import CacheDir

    if getattr(args, "shared", None):
        return _on_shared(args, cache_dir)
    try:
        # A purge reads the whole index first: it must not remove entries from a damaged one.
        cache = CacheDir(cache_dir, walk=args.command in ("verify", "purge"))
    except FileNotFoundError as exc:
        return _fail(str(exc))
    except (OSError, lmdb.Error) as exc:  # another user's directory, a read-only disk
        return _fail(f"cannot open the cache at {cache_dir}: {getattr(exc, 'strerror', None) or exc}")
    if cache.damage and args.command != "verify":
        return _fail(f"the index cannot be used ({cache.damage}): {cache.advice}")
    with cache:
        try:
            return {"stats": _stats, "ls": _ls, "purge": _purge, "verify": _verify,
                    "pin": _pin, "unpin": _pin}[args.command](args, cache)
        except IndexDamaged as exc:  # met while reading it
            return _damaged(str(exc))
        except lmdb.Error as exc:  # not damage (a full disk, a lock): still one line, never a traceback
            return _fail(f"the index at {cache_dir / 'index'} could not be read: {exc}")


def _on_shared(args, cache_dir: Path) -> int:
    """stats/ls/purge with --shared: what the shared store holds per model, or purge it;
    model names come from the local cache directory's index when there is one."""
    import redis

    from kvtier import shared

    try:
        if args.command == "purge":
            return _purge_shared(args, cache_dir)
        usage = shared.model_usage(args.shared)
    except (redis.RedisError, OSError, ValueError) as exc:
        reason = shared.describe_error(exc, tls=args.shared.startswith("rediss://"))
        return _fail(f"shared cache {shared.redacted(args.shared)}: {reason}")
    names = _model_names(cache_dir)
    models = {fp: dict(entry, model=names.get(fp, "?")) for fp, entry in usage.items()}
    data: dict[str, Any] = {"url": shared.redacted(args.shared), "models": models}
    lines = [f"shared: {data['url']}"] + [
        f"model {m['model']} [{fp[:12]}]: {m['entries']} entries, {format_size(m['bytes'])}"
        for fp, m in models.items()]
    if args.command == "stats" and os.path.isdir(cache_dir / "index"):
        from kvtier.ops import CacheDir, stats

        with CacheDir(cache_dir) as cache:
            if cache.damage is None:
                data = dict(stats(cache.disk), shared=data)
                lines = [f"cache: {data['cache_dir']}",
                         f"disk:  {data['disk']['entries']} entries, {format_size(data['disk']['bytes'])}"] + lines
    _emit(args, data, "\n".join(lines))
    return 0


def _purge_shared(args, cache_dir: Path) -> int:
    from kvtier import shared

    if not (args.all or args.model):
        return _fail("purge --shared needs --all or --model (the store evicts by itself: maxmemory)")
    fingerprint = None
    if args.model:
        names = _model_names(cache_dir)
        known = set(shared.model_usage(args.shared)) | set(names)
        matches = {fp for fp in known if args.model in (fp, names.get(fp), Path(names.get(fp) or "").name)}
        if len(matches) != 1:
            return _fail(f"{args.model!r} names {'no' if not matches else 'more than one'} model the "
                         f"shared cache holds: give its fingerprint (see `kvtier stats --shared URL`)")
        fingerprint = matches.pop()
    removed = shared.purge(args.shared, fingerprint)
    _emit(args, {"removed": removed, "fingerprint": fingerprint},
          f"removed {removed} entries from {shared.redacted(args.shared)}")
    return 0


def _model_names(cache_dir: Path) -> dict[str, str]:
    """Fingerprint -> model name, from the local index (empty when there is none)."""
    if not os.path.isdir(cache_dir / "index"):
        return {}
    import lmdb

    from kvtier.index import IndexDamaged
    from kvtier.ops import CacheDir

    try:
        with CacheDir(cache_dir) as cache:
            if cache.damage is not None:
                return {}
            return {fp: model.get("name", "?") for fp, model in cache.disk.index.models().items()}
    except (OSError, lmdb.Error, IndexDamaged):  # names are a convenience: fingerprints still work
        return {}


def _natural(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def _damaged(reason: str) -> int:
    return _fail(f"the index is damaged ({reason}): run `kvtier verify --fix`")


def _fail(message: str) -> int:
    print(f"kvtier: {message}", file=sys.stderr)
    return 2


def _emit(args: argparse.Namespace, data, human: str) -> None:
    print(json.dumps(data, indent=2) if args.json else human)


def _stats(args, cache) -> int:
    from kvtier.ops import stats

    data = stats(cache.disk)
    lines = [f"cache: {data['cache_dir']}",
             f"disk:  {data['disk']['entries']} entries, {format_size(data['disk']['bytes'])} "
             f"(+ {format_size(data['disk']['index_bytes'])} index)"]
    disk = data["disk"]
    if disk["leftover_files"] or disk["foreign_files"]:
        lines.append(f"       {format_size(disk['on_disk_bytes'])} on disk in all (du), with "
                     f"{disk['leftover_files']} leftover files ({format_size(disk['leftover_bytes'])}: "
                     f"`kvtier verify --fix` removes them) and {disk['foreign_files']} foreign files "
                     f"({format_size(disk['foreign_bytes'])}: `kvtier verify` lists them)")
    for fingerprint, model in data["models"].items():
        lines.append(f"model {model['model']} [{fingerprint[:12]}]{_runtime_text(model['runtime'])}: "
                     f"{model['blocks']} blocks, "
                     f"{model['snapshots']} snapshots, {format_size(model['bytes'])} "
                     f"({format_size(model['pinned_bytes'])} pinned)")
        lines.append(f"  {_rates_line(model)}")
    lines.append(f"all models: {_rates_line(data['overall'])}")
    _emit(args, data, "\n".join(lines))
    return 0


def _runtime_text(runtime) -> str:
    """' (mlx 0.32.4, mlx-lm 0.32.2, cpu)': what computed a model's entries (not in older indexes)."""
    if not isinstance(runtime, dict) or not runtime:
        return ""
    labels = {"mlx": "mlx ", "mlx_lm": "mlx-lm ", "device": ""}
    return " (" + ", ".join(f"{labels.get(k, k + ' ')}{v}" for k, v in runtime.items()) + ")"


def _rates_line(rates: dict) -> str:
    rate = "-" if rates["hit_rate"] is None else f"{100 * rates['hit_rate']:.0f}%"
    return (f"hit rate {rate} of {rates['prompt_tokens']} prompt tokens (RAM "
            f"{rates['tokens_from_ram']}, disk {rates['tokens_from_disk']}, shared "
            f"{rates['tokens_from_shared']}, computed "
            f"{rates['tokens_computed']}); {rates['half_cached']} of {rates['requests']} requests "
            f"reused at least half their prompt")


def _ls(args, cache) -> int:
    from kvtier.ops import prefixes

    found = prefixes(cache.disk, limit=args.limit, offset=args.offset)
    # The fingerprint too: one model has one per mlx / mlx-lm version, and purge --model takes it.
    header = (f"{'key':<16} {'model':<20} {'fingerprint':<12} {'tokens':>7} {'size':>10} {'tier':<5} "
              f"{'last used':<19} pin  preview")
    rows = [f"{p.key[:16]:<16} {Path(p.model).name[:20]:<20} {p.fingerprint[:12]:<12} {p.tokens:>7} "
            f"{format_size(p.bytes):>10} "
            f"{'disk':<5} {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(p.last_used)):<19} "
            f"{'yes' if p.pinned else 'no ':<4} {p.preview[:60]}" for p in found]
    _emit(args, [dict(p.to_json(), tier="disk") for p in found], "\n".join([header, *rows]))
    return 0


def _purge(args, cache) -> int:
    from kvtier.ops import UnknownModel, purge

    if not (args.all or args.model or args.older_than is not None or args.to_size is not None):
        return _fail("purge needs --all, --model, --older-than or --to-size")
    try:
        result = purge(cache.disk, everything=args.all, model=args.model, older_than_s=args.older_than,
                       to_size=args.to_size)
    except UnknownModel as exc:
        return _fail(str(exc))
    kept = result["pinned_kept"]
    _emit(args, result, f"removed {result['removed']} entries; {result['entries']} left, "
                        f"{format_size(result['bytes'])}"
                        + (f"; kept {kept} pinned entries (`kvtier unpin` them, or add --all)" if kept else ""))
    return 0


def _verify(args, cache) -> int:
    from kvtier.ops import IndexInUse

    try:
        problems = cache.verify(fix=args.fix)
    except IndexInUse as exc:
        print(f"kvtier: {exc}", file=sys.stderr)
        return 1
    # Foreign files are listed, not problems of the cache: --fix leaves them (kvtier.leftovers).
    foreign = [p for p in problems if p.kind == "foreign_file"]
    problems = [p for p in problems if p.kind != "foreign_file"]
    data = {"problems": [p.__dict__ for p in problems], "foreign": [p.__dict__ for p in foreign],
            "fixed": bool(args.fix and problems)}
    lines = [f"{p.kind:<18} {p.key[:32]:<32} {p.detail}" for p in problems + foreign]
    summary = "cache is consistent" if not problems else \
        f"{len(problems)} problem(s){', repaired' if args.fix else '; run `kvtier verify --fix` to repair'}"
    if foreign:
        summary += f"; {len(foreign)} foreign file(s) kvtier did not write (left as they are)"
    _emit(args, data, "\n".join([*lines, summary]))
    return 1 if problems and not args.fix else 0


def _pin(args, cache) -> int:
    from kvtier.ops import set_pinned

    changed = set_pinned(cache.disk, args.key, pinned=args.command == "pin")
    if not changed:
        return _fail(f"no cached prefix starts with {args.key!r} (see `kvtier ls`)")
    _emit(args, {"entries": changed}, f"{args.command}ned {changed} entries")
    return 0


def _warm(args, cache_dir: Path) -> int:
    from kvtier.config import CacheConfig
    from kvtier.engine import Engine
    from kvtier.hub import ModelUnavailable, fetch_model
    from kvtier.scheduler import warm

    try:
        text = _read_text(args.file)
        messages, tools = _warm_conversation(text, args.file)
        given = {"block_size": args.block_size, "kv_bits": args.kv_bits}
        config = CacheConfig(cache_dir=cache_dir, **{k: v for k, v in given.items() if v is not None})
    except ValueError as exc:  # the file, or the flags CacheConfig checks (as serve's)
        return _fail(str(exc))
    try:  # as serve finds its models: a repo id is downloaded, a directory must be a model
        fetch_model(args.model)
    except ModelUnavailable as exc:
        return _fail(str(exc))
    engine = Engine(args.model, config)
    try:
        result = warm(engine, messages, tools, pin=args.pin, progress=_progress_bar)
    finally:
        engine.close()
    print(file=sys.stderr)
    _emit(args, result, f"warmed {result['tokens']} tokens ({result['computed_tokens']} computed)"
                        f"{', pinned' if args.pin else ''}")
    return 0


def _read_text(source: str) -> str:
    """The file (or standard input, `-`) as UTF-8, as JSON and the daemon's bodies are;
    ValueError for one that cannot be read or is not UTF-8."""
    try:
        data = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {source}: {exc.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{source} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None


def _warm_conversation(text: str, source: str) -> tuple[list[dict], list[dict] | None]:
    """The messages and tools to warm, checked and templated as POST /cache/warm does (the
    prompt a request with them renders); ValueError naming what is wrong."""
    from .bodies import validate
    from .bodies_cache import WarmRequest
    from .errors import ApiError
    from .routes.cache import warm_conversation

    try:
        return warm_conversation(validate(WarmRequest, _warm_body(text, source)))
    except ApiError as exc:
        raise ValueError(f"{source}: {exc.message}") from None


def _warm_body(text: str, source: str) -> dict:
    """What to warm: a .json file is an agent's request; other text a system prompt, unless
    it parses as a request (piped to standard input, say)."""
    try:
        return _agent_request(text, source)
    except ValueError:
        if source.lower().endswith(".json"):
            raise
        return {"prompt": text}


def _agent_request(text: str, source: str) -> dict:
    """{"messages": [...], "tools": [...]}; ValueError naming what is wrong with it."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{source} is not JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        raise ValueError(f'{source} has no "messages" list: a .json file to warm is an agent\'s '
                         'request, {"messages": [...], "tools": [...]}')
    return {"messages": data["messages"], "tools": data.get("tools")}


def _progress_bar(done: int, total: int) -> None:
    width = 30
    filled = int(width * done / max(total, 1))
    print(f"\rprefill [{'#' * filled}{'.' * (width - filled)}] {done}/{total} tokens",
          end="", file=sys.stderr, flush=True)
