"""The agent itself: its version and kernel, readiness, how old and how
costly the served snapshot is, and each source's read in it."""

from __future__ import annotations

import platform
from collections.abc import Iterator

from .. import __version__, metrics
from .base import ReadContext, Scrape, Source


class AgentSource(Source):
    name = "agent"
    reports_before_ready = True

    def __init__(self, cfg, version: str = __version__, kernel: str = platform.release()):
        super().__init__(cfg)
        self.version = version
        self.kernel = kernel

    def read(self, ctx: ReadContext) -> None:
        return None  # everything it reports is the snapshot's own

    def families(self, piece: None, scrape: Scrape) -> Iterator:
        info = metrics.BUILD_INFO.family()
        info.add_metric([self.version, self.kernel], 1)
        yield info
        s = scrape.snapshot
        yield metrics.READY.family(1 if s.ready else 0)
        if not s.ready:
            return
        yield metrics.SNAPSHOT_TIMESTAMP.family(s.taken_at)
        yield metrics.SNAPSHOT_DURATION.family(s.build_seconds)
        duration = metrics.SNAPSHOT_SOURCE_DURATION.family()
        success = metrics.SNAPSHOT_SOURCE_SUCCESS.family()
        for name, r in s.reads.items():
            duration.add_metric([name], r.seconds)
            success.add_metric([name], 1 if r.ok else 0)
        yield duration
        yield success
        yield metrics.SCRAPE_DURATION.family(scrape.last_collect_seconds)
