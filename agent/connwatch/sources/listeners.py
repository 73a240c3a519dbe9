"""Listening sockets per owning process and port: accept-queue fill, the
effective and requested backlog, somaxconn of the listener's namespace,
drops (BPF map listeners, refreshed in place by the listener-stats
iterator just before it is read)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from .. import bpf_types, metrics
from .base import ReadContext, Scrape, Source, maxed, owned_rows, summed
from .connections import PortKey

TCP_LISTEN = 10


@dataclass(frozen=True, slots=True)
class ListenerState:
    queue_length: int
    backlog: int
    drops: int
    overflow_drops: int
    somaxconn: int  # of the listener's network namespace
    requested: int | None  # None: listen()'s argument was not seen
    # the listener's network namespace (inode) and its limits, for the namespaces source
    netns: int = 0
    port_range: tuple[int, int] | None = None  # net.ipv4.ip_local_port_range; None: not read
    max_tw_buckets: int | None = None  # net.ipv4.tcp_max_tw_buckets


@dataclass(frozen=True)
class Listeners:
    by_port: Mapping[PortKey, ListenerState]
    # off where the kernel cannot name an accept-queue overflow: the series
    # is then absent, not a 0 that would read as "no overflow"
    overflow_drops_counted: bool = False


# the port label of a process's listeners past max_listener_series, summed
OTHER_PORT = "other"


def _urgency(st: ListenerState) -> tuple[float, int, int]:
    """Listeners nearest trouble first: the fullest queue, then the most
    drops (counters only grow, so a listener that dropped keeps its series)."""
    return (st.queue_length / st.backlog if st.backlog else float(st.queue_length > 0),
            st.overflow_drops, st.drops)


class ListenersSource(Source):
    name = "listeners"

    def _ports_with_series(self, piece: Listeners) -> Iterator[tuple[PortKey, str, ListenerState]]:
        """(key, port label, state): the max_listener_series most urgent
        listeners under their own port, every other one under its process's
        port="other", which sums them (or keeps the largest limit). A host
        with 10,000 listeners would otherwise serve six series for each."""
        cap = self.cfg.max_listener_series
        if len(piece.by_port) <= cap:
            for key, st in piece.by_port.items():
                yield key, str(key.port), st
            return
        ranked = sorted(piece.by_port.items(), key=lambda kv: (tuple(-x for x in _urgency(kv[1])), kv[0].port, kv[0].owner.tgid, kv[0].owner.pstart))
        for i, (key, st) in enumerate(ranked):
            yield key, str(key.port) if i < cap else OTHER_PORT, st

    def read(self, ctx: ReadContext) -> Listeners:
        by_port: dict[PortKey, ListenerState] = {}
        if ctx.probes.run_iterator("listener_stats") is None:
            return Listeners(by_port)
        overflow_drops_counted = ctx.probes.via("overflow_drops") is not None
        # entries of closed listeners are deleted by the kernel, not by the clean-up
        for owner, _, l in ctx.owned_items("listeners", bpf_types.u64, bpf_types.Listener,
                                           forget_with_owner=False, owner_in_value=True):
            if l.state != TCP_LISTEN:
                continue
            key = PortKey(owner, l.lport)
            prev = by_port.get(key)
            requested = l.backlog_requested if l.flags & bpf_types.LISTENER_BACKLOG_SEEN else None
            # IPv4 and IPv6 listeners on one port (or one shared by forked
            # workers) add up, as the kernel's queues do
            by_port[key] = ListenerState(
                queue_length=l.queue_length + (prev.queue_length if prev else 0),
                backlog=l.backlog + (prev.backlog if prev else 0),
                drops=l.drops + (prev.drops if prev else 0),
                overflow_drops=l.overflow_drops + (prev.overflow_drops if prev else 0),
                somaxconn=l.somaxconn,
                requested=requested if prev is None or prev.requested is None else max(
                    prev.requested, requested or 0),
                netns=l.netns,
                port_range=(l.port_range_low, l.port_range_high) if l.port_range_high else None,
                max_tw_buckets=l.max_tw_buckets,
            )
        return Listeners(by_port, overflow_drops_counted)

    def families(self, piece: Listeners, scrape: Scrape) -> Iterator:
        rows = [(key.owner, (port,), st) for key, port, st in self._ports_with_series(piece)]
        yield summed(metrics.LISTEN_QUEUE_LENGTH.family(), owned_rows(rows, scrape, lambda st: st.queue_length))
        yield summed(metrics.LISTEN_BACKLOG.family(), owned_rows(rows, scrape, lambda st: st.backlog))
        yield summed(metrics.LISTEN_DROPS.family(), owned_rows(rows, scrape, lambda st: st.drops))
        if piece.overflow_drops_counted:
            yield summed(metrics.LISTEN_OVERFLOW_DROPS.family(),
                         owned_rows(rows, scrape, lambda st: st.overflow_drops))
        yield maxed(metrics.LISTEN_SOMAXCONN.family(), owned_rows(rows, scrape, lambda st: st.somaxconn))
        yield maxed(metrics.LISTEN_BACKLOG_REQUESTED.family(), owned_rows(
            [r for r in rows if r[2].requested is not None], scrape, lambda st: st.requested))
