"""The Prometheus collector: a registry of sources, each emitting the
families of its piece of the newest snapshot.

collect() does no I/O: it formats what the refresher last read. Per-process
series are capped (``max_process_series``): processes beyond the cap, ranked
by open connections, then by fd usage, are summed into one ``comm="other"``
series per metric (sources/base.py, ProcessSeries).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client.metrics_core import Metric as Family
from prometheus_client.registry import Collector

from .config import Config
from .snapshot import Snapshot
from .sources.base import ProcessSeries, Scrape, Source
from .sources.connections import Connections
from .sources.headroom import Headroom


def process_series(s: Snapshot, cap: int) -> ProcessSeries:
    connections: Connections | None = s.piece("connections")
    headroom: Headroom | None = s.piece("headroom")
    return ProcessSeries(
        s.processes,
        others=[p.process for p in headroom.processes] if headroom else (),
        connections=connections.weights(s.processes) if connections else None,
        fd_usage=headroom.usage() if headroom else None,
        cap=cap)


class ConnwatchCollector(Collector):
    def __init__(self, current: Callable[[], Snapshot], cfg: Config, sources: list[Source]):
        self._current = current
        self._cfg = cfg
        self.sources = sources
        self.last_collect_seconds = 0.0

    def describe(self) -> Iterator[Family]:
        return iter(())  # unchecked collector: families depend on the snapshot

    def collect(self) -> Iterator[Family]:
        t0 = time.monotonic()
        s = self._current()
        scrape = Scrape(s, process_series(s, self._cfg.max_process_series), self.last_collect_seconds)
        for source in self.sources:
            if source.reports_before_ready or (s.ready and source.name in s.pieces):
                yield from source.families(s.pieces.get(source.name), scrape)
        self.last_collect_seconds = time.monotonic() - t0
