"""What the CLI does with a cache directory, without a model: stats, list, purge, verify, pin.

The directory itself is the daemon's disk tier class (local.LocalDisk: index, files, budget,
eviction, checked reads); the daemon's cache routes pass their own. The CLI opens it through
`CacheDir`, which also holds a damaged index's diagnosis and repairs it. Removal always
deletes the index entry first, then the file.
"""

from __future__ import annotations

import builtins
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

from . import cached_models
from .cached_models import UnknownModel as UnknownModel  # re-exported: the CLI and routes catch ops.UnknownModel
from .config import format_size
from .disk import BlockFiles, DamagedBlock, decode_block, remove_path
from .index import BlockRecord, Index, IndexDamaged, now_ms
from .index_file import IndexOutdated, in_use, set_aside
from .index_totals import MODEL_TOTAL_FIELDS, add_to_model_totals
from .leftovers import strays, summary
from .local import LocalDisk

# Files this young may be a running daemon's write in flight, not yet indexed.
ORPHAN_GRACE_SECONDS = 60


class IndexInUse(RuntimeError):
    """A damaged index another process (a running daemon) still has open."""


class CacheDir:
    """A cache directory as the CLI opens it: the daemon's own disk tier class, without its
    threads (`disk`), when the index passes its checks (`walk`: the full one); else `damage`
    says why, and only `verify` proceeds (with `fix`, `repair` replaces the index). An index
    of another kvtier version is rebuilt at once, unless a running daemon has it open."""

    def __init__(self, path: Path, walk: bool = False):
        self.path, self.damage = Path(path).expanduser(), None
        self.advice = "run `kvtier verify --fix`"  # what to do about `damage`
        self._disk: LocalDisk | None = None
        try:
            self._open(walk)
        except IndexOutdated as exc:
            self.damage = str(exc)
            if in_use(self.path / "index"):
                self.advice = ("a kvtier of that version has it open: stop it, and the next kvtier to open "
                               "the index rebuilds it from the block files")
            else:
                self.repair(exc)
        except IndexDamaged as exc:
            self.damage = str(exc)

    def _open(self, walk: bool = False) -> None:
        self._disk = LocalDisk.existing(self.path, walk=walk)
        self._disk.index.on_damage = self._refuse

    def _refuse(self, reason: str) -> None:
        """Damage met in a command's read: the command stops there (a read would go on as a
        miss, and a listing or a purge on a partial index is not the cache's)."""
        self.damage = reason
        raise IndexDamaged(f"{self.path / 'index'}: {reason}")

    @property
    def disk(self) -> LocalDisk:
        if self._disk is None:
            raise IndexDamaged(self.damage or f"{self.path}: closed")
        return self._disk

    def verify(self, fix: bool = False) -> list[Problem]:
        """`verify` of the whole directory, the index file itself first."""
        if self.damage is None:
            try:
                return verify(self.disk, fix)
            except IndexDamaged as exc:
                self.damage = str(exc)
        problem = Problem("index_damaged", "", self.damage)
        if fix:
            problem.detail += "; " + self.repair(IndexDamaged(self.damage))
            return [problem, *verify(self.disk, fix)]
        return [problem]

    def repair(self, problem: IndexDamaged) -> str:
        """Set the index aside (index_file.set_aside) and rebuild it from the block files (every
        file that checks out is indexed again, the others removed). Refused while a daemon has it open."""
        from .reindex import rebuild

        self.close()
        path = self.path / "index"
        if in_use(path):
            raise IndexInUse(f"{path} is damaged but a running kvtier has it open: it replaces the "
                             f"index itself when it meets the damage; or stop it and run this again")
        aside = set_aside(path, problem)
        index = Index(path)
        try:
            index.mark_rebuild(str(problem))
            report = rebuild(index, BlockFiles(self.path / "blocks"))
            index.mark_rebuild(None)
        finally:
            index.close()
        self._open()
        self.damage = None
        return (f"{aside}, rebuilt from the block files: {report.indexed} entries, "
                f"{report.removed} files removed")

    def close(self) -> None:
        if self._disk is not None:
            self._disk.close()
            self._disk = None

    def __enter__(self) -> "CacheDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- stats --------------------------------------------------------------------------------
def stats(cache: LocalDisk) -> dict:
    models = cache.index.models()
    counters = cache.index.counters()
    per_model = cache.index.model_totals()  # kept by the index with every write
    for fingerprint in set(per_model) | set(counters):
        entry = per_model.setdefault(fingerprint, dict.fromkeys(MODEL_TOTAL_FIELDS, 0))
        entry["model"] = models.get(fingerprint, {}).get("name", "?")
        # One model has a fingerprint per mlx / mlx-lm: after an upgrade, this tells them apart.
        entry["runtime"] = models.get(fingerprint, {}).get("runtime", {})
        entry.update(rates(counters.get(fingerprint, {})))
    overall: dict[str, int] = {}
    for model_counters in counters.values():
        for name, value in model_counters.items():
            overall[name] = overall.get(name, 0) + value
    # The disk tier's own stats (the daemon's schema), less what only a daemon knows (budget, queues).
    disk = {k: v for k, v in cache.stats().items() if k in ("entries", "bytes", "index_bytes", "used_bytes")}
    # And what else lies there (temp files a kill left, foreign files): all of it is what du counts.
    disk.update(summary(strays(cache.files, cache.index)))
    disk["on_disk_bytes"] = disk["used_bytes"] + disk["leftover_bytes"] + disk["foreign_bytes"]
    return {"cache_dir": str(cache.path), "disk": disk, "overall": rates(overall), "models": per_model}


def model_totals(records: Iterable[BlockRecord]) -> dict[str, dict[str, int]]:
    """Blocks, snapshots, bytes and pinned bytes per model, counted from the records."""
    totals: dict[str, dict[str, int]] = {}
    for record in records:
        add_to_model_totals(totals, record)
    return totals


def rates(counters: dict[str, int]) -> dict:
    """Request and token counts, and the hit rate weighted by tokens: prompt tokens restored
    from the cache over all prompt tokens (a request reusing 3 of 45,000 tokens barely counts).
    `hits` are requests that reused anything at all; `half_cached` reused at least half."""
    hits, misses = counters.get("requests_hit", 0), counters.get("requests_miss", 0)
    cached = sum(counters.get(f"tokens_from_{tier}", 0) for tier in ("ram", "disk", "shared"))
    prompt = cached + counters.get("tokens_computed", 0)
    return {"requests": hits + misses, "hits": hits, "misses": misses,
            "half_cached": counters.get("requests_half_cached", 0),
            "hit_rate": round(cached / prompt, 4) if prompt else None,
            "prompt_tokens": prompt,
            "tokens_from_ram": counters.get("tokens_from_ram", 0),
            "tokens_from_disk": counters.get("tokens_from_disk", 0),
            "tokens_from_shared": counters.get("tokens_from_shared", 0),
            "tokens_computed": counters.get("tokens_computed", 0)}


# -- prefixes -----------------------------------------------------------------------------
@dataclass
class Prefix:
    """A cached prefix: a chain of KV blocks ending in a block no other block extends."""

    key: str
    model: str
    fingerprint: str
    tokens: int
    bytes: int
    blocks: int
    last_used: float
    pinned: bool
    preview: str = ""
    chain: list[builtins.bytes] = field(default_factory=list, repr=False)  # not the field `bytes`

    def to_json(self) -> dict:
        out = asdict(self)
        out.pop("chain")
        return out


def prefixes(cache: LocalDisk, preview_tokens: int = 12, limit: int | None = None,
             offset: int = 0) -> list[Prefix]:
    """Cached prefixes, most recently used first (by their last block: the order eviction
    takes them in reverse), `offset` of them skipped and at most `limit` returned. Read from
    the index's LRU order as far as the page needs, so a page costs the same however many
    entries the cache holds."""
    models = cache.index.models()
    out: list[Prefix] = []
    for key, record in cache.index.newest():
        if limit is not None and len(out) >= limit:
            break
        if record.kind != "kv" or cache.index.children(key, "kv"):
            continue  # a snapshot, or extended by another block: not the end of a prefix
        if offset:
            offset -= 1
            continue
        chain = _chain(cache, key, record)
        out.append(Prefix(
            key=key.hex(), model=models.get(record.fingerprint, {}).get("name", "?"),
            fingerprint=record.fingerprint, tokens=sum(r.num_tokens for _, r in chain),
            bytes=sum(r.nbytes for _, r in chain), blocks=len(chain), last_used=record.access_ms / 1000,
            pinned=all(r.pinned for _, r in chain), chain=[k for k, _ in chain]))
    for prefix in out if preview_tokens else ():  # none asked: no file read, no tokenizer loaded
        prefix.preview = _preview(cache, prefix, models, preview_tokens)
    return out


def _chain(cache: LocalDisk, key: bytes, record: BlockRecord) -> list[tuple[bytes, BlockRecord]]:
    """The entry and its cached ancestors, root first (stops where an ancestor is missing)."""
    chain = [(key, record)]
    while (parent := cache.index.get(bytes.fromhex(chain[-1][1].parent))) is not None and parent.kind == "kv":
        chain.append((bytes.fromhex(chain[-1][1].parent), parent))
    return chain[::-1]


def _preview(cache: LocalDisk, prefix: Prefix, models: dict, count: int) -> str:
    """The first tokens decoded with the model's own tokenizer, when it is still on disk."""
    tokenizer_file = Path(models.get(prefix.fingerprint, {}).get("path", "/nonexistent")) / "tokenizer.json"
    record = cache.index.get(prefix.chain[0])
    if not tokenizer_file.exists() or record is None:
        return ""
    try:
        from tokenizers import Tokenizer

        _, tokens, _ = decode_block(cache.files.read(prefix.chain[0].hex(), record.checksum, record.nbytes))
        text = Tokenizer.from_file(str(tokenizer_file)).decode(tokens[:count].tolist())
    except (DamagedBlock, OSError, ValueError):
        return ""
    return " ".join(text.split())


def find_prefix(cache: LocalDisk, key_prefix: str) -> list[Prefix]:
    return [p for p in prefixes(cache, preview_tokens=0) if p.key.startswith(key_prefix.lower())]


def set_pinned(cache: LocalDisk, key_prefix: str, pinned: bool) -> int:
    """Pin or unpin every prefix whose key starts with `key_prefix` (its whole chain)."""
    matches = find_prefix(cache, key_prefix)
    return sum(cache.index.set_pinned(p.chain, pinned) for p in matches)


# -- purge --------------------------------------------------------------------------------
def resolve_model(cache: LocalDisk, selector: str) -> set[str]:
    """The fingerprints `selector` names: a model's fingerprint, a name it was served by or
    its directory name (every fingerprint of that model), or the start of one fingerprint
    with entries, as `stats` and `ls` show them (kvtier.cached_models)."""
    totals = cache.index.model_totals()
    holding = {fp for fp, entry in totals.items() if entry.get("blocks") or entry.get("snapshots")}
    return cached_models.select(cache.index.models(), set(totals), holding, selector)


def purge(cache: LocalDisk, *, everything: bool = False, model: str | None = None,
          older_than_s: float | None = None, to_size: int | None = None) -> dict:
    """Remove entries matching the filters `model` and `older_than_s`, pinned ones too with
    `everything`, which alone removes every entry (with a filter it never widens it: `--model M
    --all` is M's entries, pinned included, as the shared tier's purge takes it). UnknownModel
    when `model` names none, or is ambiguous."""
    fingerprints = resolve_model(cache, model) if model is not None else None
    records = cache.records()
    victims: list[bytes] = []
    pinned_kept = 0
    if fingerprints is not None or older_than_s is not None:
        cutoff = now_ms() - older_than_s * 1000 if older_than_s is not None else None
        for key, record in records.items():
            if fingerprints is not None and record.fingerprint not in fingerprints:
                continue
            if cutoff is not None and record.access_ms >= cutoff:
                continue
            if record.pinned and not everything:
                pinned_kept += 1  # said, so an operator does not take them for a failed purge
                continue
            victims.append(key)
    elif everything:
        victims = list(records)
    removed = cache.remove_many(victims)
    if to_size is not None:
        removed += cache.evict_to(to_size)
    total_bytes, total_blocks = cache.index.totals()
    return {"removed": removed, "entries": total_blocks, "bytes": total_bytes, "pinned_kept": pinned_kept,
            "models": sorted(fingerprints or ())}


# -- verify -------------------------------------------------------------------------------
@dataclass
class Problem:
    # index_damaged, damaged, dangling, not_a_file, undecodable_record, orphan_file, temp_file,
    # totals; foreign_file is listed but no problem (verify --fix leaves it: kvtier.leftovers)
    kind: str
    key: str
    detail: str


def verify(cache: LocalDisk, fix: bool = False) -> list[Problem]:
    """Check every record against its file (size, checksum, format, tokens), and every file
    against the index. With `fix`, remove what is broken and recount the totals. Damage met
    in the index raises IndexDamaged (CacheDir.verify checks the index file itself too)."""
    problems: list[Problem] = []
    for key, record in cache.index.items():
        problem = _check_record(cache, key, record)
        if problem:
            problems.append(problem)
            if fix:
                cache.remove_many([key])
    problems += _verify_files(cache, fix)
    total_bytes, total_blocks = cache.index.totals()
    actual = [r for _, r in cache.index.items() if r is not None]
    if (total_bytes, total_blocks) != (sum(r.nbytes for r in actual), len(actual)):
        problems.append(Problem("totals", "", f"index totals {total_bytes} B / {total_blocks} "
                                              f"differ from the records"))
    if cache.index.model_totals() != model_totals(actual):
        problems.append(Problem("totals", "", "the per-model totals differ from the records"))
    if fix:
        cache.index.recount()
    return problems


def _verify_files(cache: LocalDisk, fix: bool) -> list[Problem]:
    """What lies under the block directory besides indexed block files (kvtier.leftovers).
    With `fix`, ours are removed; foreign files are listed (kind foreign_file), never removed."""
    problems, now = [], time.time()
    for stray in strays(cache.files, cache.index):
        if stray.kind in ("temp_file", "orphan_file") and now - stray.mtime < ORPHAN_GRACE_SECONDS:
            continue  # may be a running daemon's write in flight
        detail = f"{stray.path} ({format_size(stray.nbytes)})"
        if stray.kind == "not_a_file":
            detail += ": a directory (or other non-file) where a block file belongs"
        elif stray.kind == "foreign_file":
            detail += ": not written by kvtier; remove it yourself if it is not needed"
        problems.append(Problem(stray.kind, stray.key or stray.path.name, detail))
        if fix and stray.ours:
            remove_path(stray.path)
    return problems


def _check_record(cache: LocalDisk, key: bytes, record: BlockRecord | None) -> Problem | None:
    if record is None:
        return Problem("undecodable_record", key.hex(), "index record cannot be read")
    path = cache.files.path_for(key.hex())
    if not path.exists():
        return Problem("dangling", key.hex(), "indexed but its file is missing")
    if not path.is_file():
        return Problem("not_a_file", key.hex(), f"{path} is a directory (or other non-file), not its block file")
    try:
        cache.read_checked(key, record)
    except DamagedBlock as exc:
        return Problem("damaged", key.hex(), str(exc))
    return None


def to_json(value) -> str:
    return json.dumps(value, indent=2, default=lambda o: o.to_json() if hasattr(o, "to_json") else asdict(o))

