"""Limits and usage per network namespace, for every namespace that holds a
tracked listener (each pod with its own network, the host): its ephemeral
port range and tcp_max_tw_buckets, read from its `struct net` by the
listener-stats iterator (the listeners piece carries them), and its
TIME_WAIT and conntrack counts, read from /proc/<pid>/net of a live owner
of one of its listeners (/proc/<pid>/net shows that process's namespace,
readable without entering it); and, for every namespace but the agent's own
(whose connwatch_system_ephemeral_* series the kernel counts), its
ephemeral-port use per destination from that /proc/<pid>/net/tcp{,6}, as
often as the agent's own (system.recount_interval)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

from .. import metrics
from ..system import PROC, PortUse, ephemeral_port_use, parse_conntrack_stat, parse_sockstat, read_text
from .base import ReadContext, Scrape, Source
from .listeners import Listeners
from .system import recount_interval


def own_netns() -> int:
    try:
        return os.stat(f"{PROC}/self/ns/net").st_ino
    except OSError:
        return 0


@dataclass(frozen=True, slots=True)
class NetnsState:
    netns: int  # inode
    pod_uid: str
    port_range: tuple[int, int] | None
    time_wait_limit: int | None
    time_wait: int | None  # None: no owner's /proc/<pid>/net was readable
    conntrack_entries: int | None  # None: nf_conntrack is not loaded
    port_use: PortUse | None = None  # None: not counted (yet)

    @property
    def labels(self) -> tuple[str, ...]:
        """Values of metrics.NETNS, in its order."""
        return str(self.netns), self.pod_uid


@dataclass(frozen=True)
class Namespaces:
    by_netns: tuple[NetnsState, ...]


class NamespacesSource(Source):
    name = "namespaces"
    needs_identities = True  # live owners only, and their pod

    def __init__(self, cfg):
        super().__init__(cfg)
        self._own_netns = own_netns()
        # netns -> (monotonic time of its next count, the last count)
        self._port_use: dict[int, tuple[float, PortUse | None]] = {}

    def _count_port_use(self, netns: int, pid: int,
                        port_range: tuple[int, int] | None, now: float) -> PortUse | None:
        if netns == self._own_netns:
            return None  # the connwatch_system_ephemeral_* series: one count, one alert
        due_at, use = self._port_use.get(netns, (float("-inf"), None))
        if port_range is not None and now >= due_at:
            found = ephemeral_port_use(port_range, prefer="proc", proc_net=f"{PROC}/{pid}/net")
            use = found[0] if found else None
            due_at = now + recount_interval(self.cfg, use.busiest[1] if use else 0,
                                            port_range[1] - port_range[0] + 1)
        self._port_use[netns] = (due_at, use)
        return use

    def read(self, ctx: ReadContext) -> Namespaces:
        listeners: Listeners | None = ctx.pieces.get("listeners")
        if listeners is None:  # its read failed: nothing to say per namespace either
            return Namespaces(())
        # netns -> its listeners' live owners, and the state of the listener
        # of the lowest (pid, port): one pass, as a host can have 10,000 listeners
        owners: dict[int, set] = {}
        state = {}
        for key, st in listeners.by_port.items():
            if not st.netns or key.owner not in ctx.processes:
                continue
            owners.setdefault(st.netns, set()).add(key.owner)
            first = state.get(st.netns)
            if first is None or (key.owner.tgid, key.port) < first[0]:
                state[st.netns] = ((key.owner.tgid, key.port), st)
        out = []
        now = time.monotonic()
        for netns, held_by in sorted(owners.items()):
            processes = [ctx.processes[o] for o in sorted(held_by, key=lambda o: (o.tgid, o.pstart))]
            st = state[netns][1]
            time_wait = conntrack = port_use = None
            for p in processes:  # the first whose /proc/<pid>/net is still there
                sockstat = read_text(f"{PROC}/{p.pid}/net/sockstat")
                if sockstat is None:
                    continue
                time_wait = parse_sockstat(sockstat).get("TCP", {}).get("tw")
                conntrack_stat = read_text(f"{PROC}/{p.pid}/net/stat/nf_conntrack")
                conntrack = None if conntrack_stat is None else parse_conntrack_stat(conntrack_stat)
                port_use = self._count_port_use(netns, p.pid, st.port_range, now)
                break
            out.append(NetnsState(
                netns=netns,
                pod_uid=next((p.pod_uid for p in processes if p.pod_uid), ""),
                port_range=st.port_range,
                time_wait_limit=st.max_tw_buckets,
                time_wait=time_wait,
                conntrack_entries=conntrack,
                port_use=port_use,
            ))
        self._port_use = {n: c for n, c in self._port_use.items() if n in owners}  # forget those gone
        return Namespaces(tuple(out))

    def families(self, piece: Namespaces, scrape: Scrape) -> Iterator:
        """One series per namespace (not folded past max_process_series: the
        namespace, not the process, is what they describe); a value that
        could not be read is left out, as for the system metrics."""
        columns = (
            (metrics.NETNS_EPHEMERAL_PORT_RANGE_SIZE,
             lambda n: None if n.port_range is None else n.port_range[1] - n.port_range[0] + 1),
            (metrics.NETNS_TIME_WAIT, lambda n: n.time_wait),
            (metrics.NETNS_TIME_WAIT_LIMIT, lambda n: n.time_wait_limit),
            (metrics.NETNS_CONNTRACK_ENTRIES, lambda n: n.conntrack_entries),
            (metrics.NETNS_EPHEMERAL_IN_USE, lambda n: None if n.port_use is None else n.port_use.in_use),
            (metrics.NETNS_EPHEMERAL_IN_USE_MAX_DEST, lambda n: None if n.port_use is None else n.port_use.busiest[1]),
        )
        for metric, value in columns:
            rows = [(n.labels, value(n)) for n in piece.by_netns if value(n) is not None]
            if rows:
                family = metric.family()
                for labels, v in rows:
                    family.add_metric(list(labels), v)
                yield family
        by_destination = [(n.labels, use) for n in piece.by_netns if n.port_use is not None
                          for use in n.port_use.destinations[: self.cfg.port_destinations_top_k]]
        if by_destination:
            family = metrics.NETNS_EPHEMERAL_IN_USE_BY_DEST.family()
            for labels, use in by_destination:
                family.add_metric([*labels, use.destination], use.sockets)
            yield family
