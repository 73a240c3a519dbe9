"""The clean-up step of a refresh: what the kernel cannot delete itself.

Counters keyed by a process stay in their maps after it exits (the exit
probe forgets only its identity): once a refresh finds their owner gone,
they are deleted here, after a double check against /proc. Peers whose
connections all closed stay at 0 and are pruned only under pressure: a
delete can race with a concurrent accept from the same peer and lose its
increment.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from . import procinfo
from .libbpf import LibbpfError
from .sources.base import Owner, Process, ReadContext

log = logging.getLogger("connwatch.cleanup")


def forget_gone_owners(ctx: ReadContext, alive: Mapping[Owner, Process]) -> int:
    """Delete the counters of owners that exited; how many were deleted."""
    deleted = 0
    for map_name, keys in ctx.owned_keys.items():
        gone = [k for owner, k in keys if owner not in alive]
        deleted += _delete(ctx, map_name, [k for k in gone if not procinfo.is_same_process(k.tgid, k.pstart)])
    return deleted


def prune_empty_peers(ctx: ReadContext) -> int:
    """Delete the peers entries at 0 once they fill half the map."""
    empty = ctx.empty_keys.get("peers", [])
    if len(empty) <= ctx.probes.maps["peers"].max_entries // 2:
        return 0
    return _delete(ctx, "peers", empty)


def _delete(ctx: ReadContext, map_name: str, keys: list) -> int:
    mp = ctx.probes.maps[map_name]
    deleted = 0
    for k in keys:
        try:
            if mp.delete(k):
                deleted += 1
        except LibbpfError as e:
            log.debug("delete from %s: %s", map_name, e)
    if map_name in ctx.entries:
        ctx.entries[map_name] -= deleted
    return deleted
