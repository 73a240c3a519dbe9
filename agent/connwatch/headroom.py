"""Headroom: every count next to the limit that bounds it, as Prometheus metrics.

read_headroom() does the I/O (the agent's background refresher calls it);
headroom_metrics() only formats a snapshot (the scrape-time collector calls
it), so a scrape never waits on /proc or the socket table.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from . import fds
from .system import PortUse, SystemLimits, read_system

PROCESS_LABELS = ["pid", "comm", "container"]
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class HeadroomSnapshot:
    system: SystemLimits
    # pid -> (open fds, soft RLIMIT_NOFILE); processes that vanished are absent
    process_fds: dict[int, tuple[int, int]] = field(default_factory=dict)


def read_headroom(pids: Iterable[int], with_socket_table: bool = True,
                  previous: HeadroomSnapshot | None = None,
                  port_use: Callable[[tuple[int, int]], PortUse | None] | None = None) -> HeadroomSnapshot:
    """Per-process fd use and the system limits. with_socket_table=False keeps
    the previous reading's socket-table numbers (see read_system)."""
    per_process: dict[int, tuple[int, int]] = {}
    for pid in pids:
        open_count = fds.open_fds(pid)
        limit = fds.max_fds(pid)
        if open_count is None or limit is None:
            continue  # exited (or became unreadable) between the two reads
        per_process[pid] = (open_count, limit)
    system = read_system(with_socket_table, previous.system if previous else None, port_use)
    return HeadroomSnapshot(system=system, process_fds=per_process)


def _gauge(name: str, doc: str, value: int | None) -> Iterator[Metric]:
    if value is not None:
        yield GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: int | None) -> Iterator[Metric]:
    # prometheus_client appends the _total suffix to counter samples
    if value is not None:
        yield CounterMetricFamily(name.removesuffix("_total"), doc, value=value)


def headroom_metrics(h: HeadroomSnapshot, label_of: Callable[[int], tuple[str, str, str]]) -> Iterator[Metric]:
    """Metric families for one snapshot. A value that could not be read is
    left out rather than reported as 0, so a ratio never divides by a fake
    limit and an absent() alert can tell "unknown" from "zero"."""
    yield from _process_metrics(h.process_fds, label_of)
    yield from _system_metrics(h.system)


def _process_metrics(process_fds: dict[int, tuple[int, int]],
                     label_of: Callable[[int], tuple[str, str, str]]) -> Iterator[Metric]:
    open_family = GaugeMetricFamily("connwatch_process_open_fds",
                                    "Open file descriptors of the process (/proc/<pid>/fd).",
                                    labels=PROCESS_LABELS)
    max_family = GaugeMetricFamily("connwatch_process_max_fds",
                                   "Soft RLIMIT_NOFILE of the process: opening an fd past it fails with EMFILE "
                                   "(/proc/<pid>/limits).",
                                   labels=PROCESS_LABELS)
    # several pids can share labels (the collector folds processes past its
    # series cap into comm="other"): their fds and limits add up
    totals: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0])
    for pid, (open_count, limit) in process_fds.items():
        row = totals[tuple(label_of(pid))]
        row[0] += open_count
        row[1] += limit
    for labels, (open_count, limit) in sorted(totals.items()):
        open_family.add_metric(list(labels), open_count)
        max_family.add_metric(list(labels), limit)
    yield open_family
    yield max_family


def _system_metrics(s: SystemLimits) -> Iterator[Metric]:
    yield from _gauge("connwatch_system_open_files",
                      "File handles allocated system-wide (first field of fs.file-nr).", s.open_files)
    yield from _gauge("connwatch_system_open_files_limit",
                      "fs.file-max: file handles the kernel allocates before open() fails with ENFILE.",
                      s.open_files_limit)
    yield from _gauge("connwatch_system_nr_open",
                      "fs.nr_open: the ceiling of any process's RLIMIT_NOFILE.", s.nr_open)
    yield from _gauge("connwatch_system_conntrack_entries",
                      "Connection-tracking entries (net.netfilter.nf_conntrack_count).", s.conntrack_entries)
    yield from _gauge("connwatch_system_conntrack_entries_limit",
                      "net.netfilter.nf_conntrack_max: new flows are dropped once the table is full.",
                      s.conntrack_entries_limit)
    yield from _gauge("connwatch_system_ephemeral_ports",
                      "Local ports connect() may pick: net.ipv4.ip_local_port_range minus ip_local_reserved_ports.",
                      s.ephemeral_ports)
    yield from _gauge("connwatch_system_ephemeral_ports_in_use",
                      "Distinct local ports in the ephemeral range held by outbound TCP sockets "
                      "(TIME_WAIT included; the agent's network namespace).",
                      s.ephemeral_ports_in_use)
    busiest = s.port_destinations[0][1] if s.port_destinations else (0 if s.port_destinations is not None else None)
    yield from _gauge("connwatch_system_ephemeral_ports_in_use_max_destination",
                      "Local ports held by outbound TCP sockets to the busiest single destination (remote ip:port); "
                      "connect() fails with EADDRNOTAVAIL when this reaches connwatch_system_ephemeral_ports.",
                      busiest)
    yield from _gauge("connwatch_system_tcp_time_wait",
                      "TCP sockets in TIME_WAIT (/proc/net/sockstat tw).", s.tcp_time_wait)
    yield from _gauge("connwatch_system_tcp_time_wait_limit",
                      "net.ipv4.tcp_max_tw_buckets: past it, closing sockets skip TIME_WAIT (TCPTimeWaitOverflow).",
                      s.tcp_time_wait_limit)
    yield from _gauge("connwatch_system_tcp_orphans",
                      "TCP sockets closed by their process but not yet by the peer (/proc/net/sockstat orphan).",
                      s.tcp_orphans)
    yield from _gauge("connwatch_system_tcp_orphans_limit",
                      "net.ipv4.tcp_max_orphans: past it, orphaned connections are reset.", s.tcp_orphans_limit)
    yield from _gauge("connwatch_system_tcp_memory_pages",
                      "Pages allocated to TCP socket buffers system-wide (/proc/net/sockstat TCP mem).",
                      s.tcp_memory_pages)
    if s.tcp_memory_pages_limit is not None:
        limit = GaugeMetricFamily("connwatch_system_tcp_memory_pages_limit",
                                  "net.ipv4.tcp_mem thresholds in pages: below min no pressure, above pressure "
                                  "buffers shrink, at max allocations fail.",
                                  labels=["threshold"])
        for threshold in ("min", "pressure", "max"):
            limit.add_metric([threshold], getattr(s.tcp_memory_pages_limit, threshold))
        yield limit
    yield GaugeMetricFamily("connwatch_system_page_size_bytes",
                            "Memory page size, to turn the *_pages metrics into bytes.", value=PAGE_SIZE)
    yield from _gauge("connwatch_system_somaxconn",
                      "net.core.somaxconn: the cap on every listen() backlog.", s.somaxconn)
    yield from _gauge("connwatch_system_tcp_max_syn_backlog",
                      "net.ipv4.tcp_max_syn_backlog: half-open connections a listener keeps before SYN cookies "
                      "or drops.", s.tcp_max_syn_backlog)
    yield from _counter("connwatch_system_listen_overflows_total",
                        "Times a listener's accept queue was full (TcpExt ListenOverflows).", s.listen_overflows)
    yield from _counter("connwatch_system_listen_drops_total",
                        "Connection attempts dropped at a listener, overflows included (TcpExt ListenDrops).",
                        s.listen_drops)
