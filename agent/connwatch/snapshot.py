"""Read the BPF maps into one immutable snapshot.

A background thread builds snapshots; scrapes only ever read the newest one,
so a slow /proc or a large map never blocks an HTTP request.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import hmac
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field

from . import bpf_types as T
from . import procinfo
from .config import Config, peer_network
from .headroom import HeadroomSnapshot, read_headroom
from .libbpf import LibbpfError
from .probes import PROBES, Probes

log = logging.getLogger("connwatch.snapshot")

ERRNO_NAMES = {errno.EMFILE: "EMFILE", errno.ENFILE: "ENFILE", errno.EADDRNOTAVAIL: "EADDRNOTAVAIL"}
TCP_LISTEN = 10
KIND_NAMES = {k.value: k.name.lower() for k in T.Kind}
SYSCALL_NAMES = {s.value: s.name.lower() for s in T.Syscall}


@dataclass(frozen=True)
class Process:
    pid: int
    comm: str
    container: str


@dataclass(frozen=True)
class ListenerState:
    queue_length: int
    backlog: int
    drops: int
    requested: int | None  # None: the listener predates the agent


@dataclass(frozen=True)
class PeerStats:
    distinct: int
    busiest: int
    top: tuple[tuple[str, int], ...]  # (peer label, open connections), largest first


@dataclass
class Snapshot:
    taken_at: float = 0.0
    build_seconds: float = 0.0
    ready: bool = False
    processes: dict[int, Process] = field(default_factory=dict)
    # (pid, port, kind) -> [open, accepted, closed]
    connections: dict[tuple[int, int, str], list[int]] = field(default_factory=dict)
    # (pid, syscall, errno name) -> count
    fd_failures: dict[tuple[int, str, str], int] = field(default_factory=dict)
    # (pid, syscall) -> count
    port_exhaustion: dict[tuple[int, str], int] = field(default_factory=dict)
    # (pid, port) -> ListenerState (one listener per (pid, port) after de-duplication)
    listeners: dict[tuple[int, int], ListenerState] = field(default_factory=dict)
    # port -> drops
    overflow_drops: dict[int, int] = field(default_factory=dict)
    # (pid, port, HTTP status) -> WebSocket upgrade answers
    upgrades: dict[tuple[int, int, int], int] = field(default_factory=dict)
    # (port, kind) -> (cumulative bucket counts by upper bound in seconds, sum seconds, count)
    durations: dict[tuple[int, str], tuple[list[tuple[float, int]], float, int]] = field(default_factory=dict)
    # port -> PeerStats
    peers: dict[int, PeerStats] = field(default_factory=dict)
    headroom: HeadroomSnapshot | None = None
    # map name -> (entries, capacity, full)
    maps: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    map_memory: dict[str, int] = field(default_factory=dict)
    probes: dict[str, bool] = field(default_factory=dict)
    # probe -> (run_time_ns, run_count, recursion_misses)
    program_stats: dict[str, tuple[int, int, int]] = field(default_factory=dict)


class SnapshotReader:
    """Turns map contents into a Snapshot; owns the (pid, start) -> Process cache."""

    def __init__(self, probes: Probes, cfg: Config):
        self.probes = probes
        self.cfg = cfg
        self._process_cache: dict[tuple[int, int], Process] = {}
        # entries of each map as read by the current read(), so map fill is
        # counted from the same pass instead of iterating every map again
        self._entries: dict[str, int] = {}
        self._headroom: HeadroomSnapshot | None = None
        self._socket_table_read_at = float("-inf")

    def _items(self, name: str, key_type, value_type) -> list:
        items = list(self.probes.maps[name].items(key_type, value_type))
        self._entries[name] = len(items)
        return items

    def _live_processes(self) -> dict[int, tuple[int, T.Proc]]:
        """tgid -> (pstart, proc) for processes the kernel still knows as alive."""
        return {k: (v.pstart, v) for k, v in self._items("procs", ctypes.c_uint32, T.Proc)}

    def _process(self, tgid: int, pstart: int, proc: T.Proc) -> Process | None:
        key = (tgid, pstart)
        p = self._process_cache.get(key)
        if p is None:
            container = procinfo.container_id(tgid)
            if container is None:  # exited between the map read and now
                return None
            p = Process(tgid, proc.comm.decode(errors="replace"), container)
            self._process_cache[key] = p
        return p

    def read(self) -> Snapshot:
        t0 = time.monotonic()
        s = Snapshot(ready=True, probes=dict(self.probes.enabled))
        maps = self.probes.maps
        self._entries = {}
        # The fd-table walk first (without syscall tracing it also claims
        # connections, which moves counters); then counters; identities last:
        # a process that starts in between is then already in `procs`, so its
        # fresh counters are never dropped.
        listener_stats = self._read_listener_stats()
        conn_items = self._items("conn_counts", T.ConnKey, T.ConnCounts)
        fail_items = {name: self._items(name, T.FailKey, ctypes.c_uint64)
                      for name in ("fd_failures", "port_exhaustion")}
        upgrade_items = self._items("upgrades", T.UpgradeKey, ctypes.c_uint64)
        live = self._live_processes()
        used: set[tuple[int, int]] = set()

        def owner(tgid: int, pstart: int) -> Process | None:
            entry = live.get(tgid)
            if entry is None or entry[0] != pstart:
                return None  # the process exited (or its pid now belongs to another)
            p = self._process(tgid, pstart, entry[1])
            if p is not None:
                used.add((tgid, pstart))
                s.processes[tgid] = p
            return p

        def owned(mapname: str, items):
            """The items whose process is alive; counters of exited ones are deleted."""
            stale = []
            for k, v in items:
                if owner(k.tgid, k.pstart) is None:
                    stale.append(k)
                else:
                    yield k, v
            self._delete_stale(maps[mapname], stale)

        for k, v in owned("conn_counts", conn_items):
            s.connections[(k.tgid, k.lport, KIND_NAMES.get(k.kind, "tcp"))] = [v.open, v.accepted, v.closed]

        for mapname, target, with_errno in (("fd_failures", s.fd_failures, True),
                                            ("port_exhaustion", s.port_exhaustion, False)):
            for k, v in owned(mapname, fail_items[mapname]):
                name = SYSCALL_NAMES.get(k.syscall, "other")
                key = (k.tgid, name, ERRNO_NAMES.get(k.err, str(k.err))) if with_errno else (k.tgid, name)
                target[key] = target.get(key, 0) + v

        for st in listener_stats:
            l = st.l
            if st.state != TCP_LISTEN or owner(l.tgid, l.pstart) is None:
                continue
            key = (l.tgid, l.lport)
            prev = s.listeners.get(key)
            # IPv4 and IPv6 listeners on one port (or one shared by forked
            # workers) add up, as the kernel's queues do
            s.listeners[key] = ListenerState(
                queue_length=st.queue_length + (prev.queue_length if prev else 0),
                backlog=st.backlog + (prev.backlog if prev else 0),
                drops=st.drops + (prev.drops if prev else 0),
                requested=None if l.flags & T.LISTENER_SEEDED else max(
                    l.backlog_requested, (prev.requested or 0) if prev else 0),
            )

        for k, v in owned("upgrades", upgrade_items):
            s.upgrades[(k.tgid, k.lport, k.status)] = v

        for k, h in self._items("durations", T.DurationKey, T.DurationHist):
            s.durations[(k.lport, KIND_NAMES.get(k.kind, "tcp"))] = _histogram(h)
        s.peers = self._read_peers()
        due = t0 - self._socket_table_read_at >= self.cfg.socket_table_interval_seconds
        if due:
            self._socket_table_read_at = t0
        s.headroom = self._headroom = read_headroom(s.processes, due, self._headroom)

        drops: dict[int, int] = defaultdict(int)
        for k, v in self._items("overflow_drops", T.PortKey, ctypes.c_uint64):
            drops[k.lport] += v
        s.overflow_drops = dict(drops)

        self._read_map_stats(s)
        self._read_program_stats(s)
        # forget cached identities of processes that are gone
        self._process_cache = {k: v for k, v in self._process_cache.items() if k in used}
        s.taken_at = time.time()
        s.build_seconds = time.monotonic() - t0
        return s

    def _read_listener_stats(self) -> list[T.ListenerStat]:
        """Live queue state of known listeners, de-duplicated: a listener shared
        by several processes (fork) is seen once per process holding it."""
        raw = self.probes.run_iterator("cw_listener_stats") or b""
        size = ctypes.sizeof(T.ListenerStat)
        seen, out = set(), []
        for off in range(0, len(raw) - size + 1, size):
            st = T.ListenerStat.from_buffer_copy(raw, off)
            ident = (st.l.netns, st.l.family, st.l.lport, st.l.tgid)
            if ident not in seen:
                seen.add(ident)
                out.append(st)
        return out

    def _peer_label(self, raw) -> str:
        peers = self.cfg.peers
        addr = T.peer_address(raw)
        net = peer_network(addr, peers)
        label = str(addr) if net.prefixlen == net.max_prefixlen else str(net)
        if peers.hash:
            return hmac.new(peers.hash_key.encode(), label.encode(), hashlib.sha256).hexdigest()[:16]
        return label

    def _read_peers(self) -> dict[int, PeerStats]:
        mp = self.probes.maps["peers"]
        per_port: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        empty = []
        for k, n in self._items("peers", T.PeerKey, ctypes.c_int64):
            if n <= 0:
                empty.append(k)
                continue
            per_port[k.lport][self._peer_label(k.peer)] += n
        # Zero entries are pruned only under pressure: a delete can race with
        # a concurrent accept from the same peer and lose its increment.
        if len(empty) > mp.max_entries // 2:
            for k in empty:
                try:
                    if mp.delete(k):
                        self._entries["peers"] -= 1
                except LibbpfError:
                    pass
        out = {}
        k_top = self.cfg.peers.top_k
        for port, counts in per_port.items():
            ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
            out[port] = PeerStats(len(counts), ranked[0][1], tuple(ranked[:k_top]))
        return out

    def _delete_stale(self, mp, keys) -> None:
        """Drop counters of exited processes (double-checked against /proc)."""
        for k in keys:
            if procinfo.is_same_process(k.tgid, k.pstart):
                continue  # alive after all: its procs entry did not fit
            try:
                if mp.delete(k):
                    self._entries[mp.name] -= 1
            except LibbpfError as e:
                log.debug("delete stale entry from %s: %s", mp.name, e)

    def _read_map_stats(self, s: Snapshot) -> None:
        maps = self.probes.maps
        full = maps["map_full"]
        for mid in T.MapId:
            name = mid.name.lower()
            mp = maps[name]
            if name == "socks":
                entries = sum(maps["socks_live"].lookup_percpu(ctypes.c_uint32(0), ctypes.c_int64))
            elif name in self._entries:
                entries = self._entries[name]
            else:
                entries = sum(1 for _ in mp.items(_raw(mp.key_size), _raw(mp.value_size)))
            s.maps[name] = (entries, mp.max_entries,
                            sum(full.lookup_percpu(ctypes.c_uint32(mid), ctypes.c_uint64)))
            s.map_memory[name] = mp.memlock_bytes()

    def _read_program_stats(self, s: Snapshot) -> None:
        for name, prog in self.probes.obj.programs.items():
            if prog.attached:
                s.program_stats[PROBES.get(name, name)] = prog.run_stats()


_RAW: dict[int, type] = {}


def _raw(size: int) -> type:
    """An opaque ctypes type of `size` bytes, for counting entries."""
    if size not in _RAW:
        _RAW[size] = ctypes.c_char * size
    return _RAW[size]


def _histogram(h: T.DurationHist) -> tuple[list[tuple[float, int]], float, int]:
    """Kernel log2 buckets (bucket i: [2^(i-1), 2^i) ms) as cumulative le buckets."""
    cumulative, running = [], 0
    # the last kernel bucket also holds everything longer: it becomes +Inf
    for i in range(T.HIST_BUCKETS - 1):
        running += h.buckets[i]
        cumulative.append(((2 ** i) / 1000.0, running))
    return cumulative, h.sum_ns / 1e9, h.count
