"""Host-wide limits beside their usage (/proc, sysctl), and ephemeral-port
use per destination (the port-use iterator, a sock_diag dump where it
cannot run; every socket_table_interval_seconds near exhaustion, every
socket_table_idle_interval_seconds far from it: recount_interval)."""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

from .. import bpf_types, metrics
from ..system import DestinationUse, PortUse, SystemLimits, read_system
from .base import ReadContext, Scrape, Source


@dataclass(frozen=True)
class System:
    limits: SystemLimits
    page_size: int


def destination_label(k: bpf_types.PortUseKey) -> str:
    addr = bpf_types.peer_address(k.daddr)
    return f"[{addr}]:{k.dport}" if addr.version == 6 else f"{addr}:{k.dport}"


def recount_interval(cfg, busiest: int, ports: int | None) -> float:
    """Seconds until the next socket-table count of a namespace whose busiest
    destination holds `busiest` of its `ports` ephemeral ports. A count
    costs about 1 µs per socket of the namespace (docs/performance.md), so
    while every destination is below arm_ratio of the range (far from
    EADDRNOTAVAIL) it is done every socket_table_idle_interval_seconds, and
    nearer every socket_table_interval_seconds."""
    if ports and busiest >= cfg.arm_ratio * ports:
        return cfg.socket_table_interval_seconds
    return max(cfg.socket_table_idle_interval_seconds, cfg.socket_table_interval_seconds)


class SystemSource(Source):
    name = "system"

    def __init__(self, cfg):
        super().__init__(cfg)
        self._previous: SystemLimits | None = None
        self._socket_table_read_at = float("-inf")
        self._recount_interval = 0.0
        self._port_use_generation = 0

    def read(self, ctx: ReadContext) -> System:
        now = time.monotonic()
        # the socket-table walk is the one part whose cost grows with every
        # socket on the host: the refreshes in between reuse its numbers
        due = now - self._socket_table_read_at >= self._recount_interval
        if due:
            self._socket_table_read_at = now
        limits = read_system(due, self._previous, lambda port_range: self._read_port_use(ctx, port_range))
        if due:
            self._recount_interval = recount_interval(self.cfg, limits.busiest_destination_sockets,
                                                      limits.ephemeral_ports)
        self._previous = limits
        return System(limits, os.sysconf("SC_PAGE_SIZE"))

    def _read_port_use(self, ctx: ReadContext, port_range: tuple[int, int]) -> PortUse | None:
        """Outbound port use of this network namespace, counted by the port-use
        iterator in the kernel; None where it cannot run (read_system then
        falls back to a sock_diag dump)."""
        probes = ctx.probes
        if not probes.via("port_use"):
            return None
        self._port_use_generation += 1
        gen = self._port_use_generation
        bss = probes.globals
        bss.set("port_range_low", ctypes.c_uint32, port_range[0])
        bss.set("port_range_high", ctypes.c_uint32, port_range[1])
        bss.set("port_use_generation", ctypes.c_uint64, gen)
        probes.run_iterator("port_use")
        in_use = sum(bin(w.bits).count("1")
                     for _, w in probes.maps["used_ports"].items(ctypes.c_uint32, bpf_types.PortWord)
                     if w.generation == gen)
        destinations = sorted((DestinationUse(destination_label(k), v.sockets)
                               for k, v in ctx.items("port_use", bpf_types.PortUseKey, bpf_types.PortUse)
                               if v.generation == gen), key=lambda d: (-d.sockets, d.destination))
        return PortUse(in_use, tuple(destinations))

    def families(self, piece: System, scrape: Scrape) -> Iterator:
        """A value that could not be read is left out rather than reported as
        0, so a ratio never divides by a fake limit and an absent() alert can
        tell "unknown" from "zero"."""
        s = piece.limits
        scalars = (
            (metrics.SYSTEM_OPEN_FILES, s.open_files),
            (metrics.SYSTEM_OPEN_FILES_LIMIT, s.open_files_limit),
            (metrics.SYSTEM_NR_OPEN, s.nr_open),
            (metrics.SYSTEM_CONNTRACK_ENTRIES, s.conntrack_entries),
            (metrics.SYSTEM_CONNTRACK_LIMIT, s.conntrack_entries_limit),
            (metrics.SYSTEM_EPHEMERAL_PORTS, s.ephemeral_ports),
            (metrics.SYSTEM_EPHEMERAL_IN_USE, s.ephemeral_ports_in_use),
            (metrics.SYSTEM_TIME_WAIT, s.tcp_time_wait),
            (metrics.SYSTEM_TIME_WAIT_LIMIT, s.tcp_time_wait_limit),
            (metrics.SYSTEM_ORPHANS, s.tcp_orphans),
            (metrics.SYSTEM_ORPHANS_LIMIT, s.tcp_orphans_limit),
            (metrics.SYSTEM_TCP_MEMORY, s.tcp_memory_pages),
            (metrics.SYSTEM_PAGE_SIZE, piece.page_size),
            (metrics.SYSTEM_SOMAXCONN, s.somaxconn),
            (metrics.SYSTEM_TCP_MAX_SYN_BACKLOG, s.tcp_max_syn_backlog),
            (metrics.SYSTEM_LISTEN_OVERFLOWS, s.listen_overflows),
            (metrics.SYSTEM_LISTEN_DROPS, s.listen_drops),
        )
        yield from (metric.family(value) for metric, value in scalars if value is not None)
        if s.port_destinations is not None:
            yield metrics.SYSTEM_EPHEMERAL_IN_USE_MAX_DEST.family(s.busiest_destination_sockets)
            per_destination = metrics.EPHEMERAL_PORTS_IN_USE.family()
            for use in s.port_destinations[: self.cfg.port_destinations_top_k]:
                per_destination.add_metric([use.destination], use.sockets)
            yield per_destination
        if s.socket_table_source is not None and s.socket_table_cpu_seconds is not None:
            cost = metrics.SOCKET_TABLE_COUNT_CPU.family()
            cost.add_metric([s.socket_table_source], s.socket_table_cpu_seconds)
            yield cost
        if s.tcp_memory_pages_limit is not None:
            limit = metrics.SYSTEM_TCP_MEMORY_LIMIT.family()
            for threshold in ("min", "pressure", "max"):
                limit.add_metric([threshold], getattr(s.tcp_memory_pages_limit, threshold))
            yield limit
