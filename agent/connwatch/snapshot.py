"""The refresh: every source reads its part into one immutable Snapshot.

Done by the agent's background refresher, so a scrape never waits on the
kernel or /proc. The order: the sources that read BPF counters, then the
identity step (which of their owners are alive, and who they are), the
clean-up step (the counters of exited processes, empty peers), then the
sources that need the identities (headroom reports every socket owner; map
fill is reported after the clean-up).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import cleanup
from .config import Config
from .owners import Identities
from .probes import Probes
from .sources.base import Owner, Process, ReadContext, Source

log = logging.getLogger("connwatch.snapshot")


@dataclass(frozen=True, slots=True)
class SourceRead:
    seconds: float
    ok: bool


@dataclass(frozen=True)
class Snapshot:
    ready: bool = False
    taken_at: float = 0.0       # Unix time
    build_seconds: float = 0.0
    processes: Mapping[Owner, Process] = field(default_factory=dict)  # live owners of BPF keys
    pieces: Mapping[str, Any] = field(default_factory=dict)  # source name -> its part; absent if its read failed
    reads: Mapping[str, SourceRead] = field(default_factory=dict)

    def piece(self, source: str) -> Any:
        return self.pieces.get(source)


class SnapshotReader:
    def __init__(self, probes: Probes, cfg: Config, sources: list[Source]):
        self.probes = probes
        self.cfg = cfg
        self.sources = sources
        self._identities = Identities()

    def read(self) -> Snapshot:
        t0 = time.monotonic()
        ctx = ReadContext(self.probes, self.cfg)
        reads: dict[str, SourceRead] = {}
        identified = False
        for source in self.sources:
            if source.needs_identities and not identified:
                ctx.processes = self._identities.resolve(ctx)
                cleanup.forget_gone_owners(ctx, ctx.processes)
                cleanup.prune_empty_peers(ctx)
                identified = True
            started = time.monotonic()
            try:
                ctx.pieces[source.name] = source.read(ctx)
                ok = True
            except Exception:  # the others still report; this one's success is 0
                log.exception("source %s: read failed", source.name)
                ok = False
            reads[source.name] = SourceRead(time.monotonic() - started, ok)
        return Snapshot(ready=True, taken_at=time.time(), build_seconds=time.monotonic() - t0,
                        processes=ctx.processes, pieces=dict(ctx.pieces), reads=reads)
