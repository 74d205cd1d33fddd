"""Which tiers a store has below RAM, from the configuration: the local disk, then the shared
store when `--shared` names one. The one place that names the concrete tiers."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from .config import CacheConfig
from .disk import ParsedBlock
from .disk_registry import open_disk
from .disk_tier import DiskTier
from .kvstate import CachePlan, Layout, matches_layout, snapshot_matches
from .shared import SharedTier
from .shared_io import SharedIO
from .tier import Count, Tier

Fits = Callable[[ParsedBlock, str], bool]


def model_fits(layout: Layout, plan: CachePlan | None) -> Fits:
    """Whether an entry read from a tier has this model's shapes, dtypes (a block) or cache
    classes (a snapshot)."""
    def fits(parsed: ParsedBlock, kind: str) -> bool:
        if kind == "kv":
            shapes = {name: t.shape for name, t in parsed.tensors.items()}
            return matches_layout(shapes, parsed.dtypes, layout, len(parsed.tokens))
        return plan is not None and snapshot_matches(parsed.metadata.get("skeleton") or "", plan)
    return fits


@dataclass
class Tiers:
    """The tiers below RAM, nearest first, and the two the daemon also manages by name."""

    below: list[Tier]
    disk: DiskTier  # the cache directory: its index also backs pins, the prefetch, `kvtier stats`
    shared: SharedTier | None  # the team's store, for its connection state


def open_tiers(config: CacheConfig, fingerprint: str, count: Count, readers: ThreadPoolExecutor,
               fits: Fits) -> Tiers:
    """The configured tiers below RAM: the local disk, then the shared store if one is named."""
    disk = DiskTier(open_disk(config.cache_dir, config.disk_budget, count, fingerprint), readers,
                    fingerprint, fits, config.block_size, count)
    if not config.shared_url:
        return Tiers([disk], disk, None)
    shared = SharedTier(config.shared_url, fingerprint, count, config.shared_ttl)
    return Tiers([disk, SharedIO(shared, readers, fingerprint, fits, count)], disk, shared)
