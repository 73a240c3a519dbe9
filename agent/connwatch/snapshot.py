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
from typing import NamedTuple

from . import bpf_types, procinfo
from .config import Config, peer_network
from .headroom import HeadroomSnapshot, read_headroom
from .libbpf import LibbpfError
from .probes import Probes
from .system import PortUse

log = logging.getLogger("connwatch.snapshot")

ERRNO_NAMES = {errno.EMFILE: "EMFILE", errno.ENFILE: "ENFILE", errno.EADDRNOTAVAIL: "EADDRNOTAVAIL",
               errno.EADDRINUSE: "EADDRINUSE"}
TCP_LISTEN = 10
KIND_NAMES = {k.value: k.name.lower() for k in bpf_types.Kind}
SYSCALL_NAMES = {s.value: s.name.lower() for s in bpf_types.Syscall}


@dataclass(frozen=True)
class Process:
    pid: int
    comm: str
    container: str


class ConnKey(NamedTuple):
    pid: int
    port: int
    kind: str


class ConnCounts(NamedTuple):
    open: int        # owned now
    close_wait: int  # of those, closed by the peer and not yet by the owner
    accepted: int    # accepted by this process
    closed: int      # accepted by this process and since closed


class FailureKey(NamedTuple):
    pid: int
    syscall: str
    errno: str


class PortKey(NamedTuple):
    """A listening port of one process."""
    pid: int
    port: int


@dataclass(frozen=True)
class ListenerState:
    queue_length: int
    backlog: int
    drops: int
    overflow_drops: int
    somaxconn: int  # of the listener's network namespace
    requested: int | None  # None: listen()'s argument was not seen


class UpgradeKey(NamedTuple):
    pid: int
    port: int
    status: int


class DurationKey(NamedTuple):
    pid: int
    port: int
    kind: str


@dataclass(frozen=True)
class Histogram:
    buckets: tuple[tuple[float, int], ...]  # (upper bound in seconds, cumulative count)
    sum_seconds: float
    count: int


@dataclass(frozen=True)
class PeerStats:
    distinct: int
    busiest: int
    top: tuple[tuple[str, int], ...]  # (peer label, open connections), largest first


@dataclass(frozen=True)
class MapStats:
    entries: int
    capacity: int
    full: int
    memory_bytes: int


@dataclass(frozen=True)
class ProgramStats:
    run_time_ns: int
    runs: int
    recursion_misses: int


@dataclass(frozen=True)
class ProbeState:
    enabled: bool
    via: str = ""     # fentry, kprobe, tracepoint, syscall_hook, iterator
    attach: str = ""  # where, e.g. "fexit/inet_csk_accept"


@dataclass
class Snapshot:
    taken_at: float = 0.0
    build_seconds: float = 0.0
    ready: bool = False
    processes: dict[int, Process] = field(default_factory=dict)
    connections: dict[ConnKey, ConnCounts] = field(default_factory=dict)
    fd_failures: dict[FailureKey, int] = field(default_factory=dict)
    port_exhaustion: dict[tuple[int, str], int] = field(default_factory=dict)  # (pid, syscall)
    listeners: dict[PortKey, ListenerState] = field(default_factory=dict)
    upgrades: dict[UpgradeKey, int] = field(default_factory=dict)
    durations: dict[DurationKey, Histogram] = field(default_factory=dict)
    peers: dict[PortKey, PeerStats] = field(default_factory=dict)
    headroom: HeadroomSnapshot | None = None
    maps: dict[str, MapStats] = field(default_factory=dict)
    probes: dict[str, ProbeState] = field(default_factory=dict)
    syscall_hook_armed: bool | None = None  # None: no probe needs the syscall hook here
    program_stats: dict[str, ProgramStats] = field(default_factory=dict)


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
        self._port_use_generation = 0

    def _items(self, name: str, key_type, value_type) -> list:
        items = list(self.probes.maps[name].items(key_type, value_type))
        self._entries[name] = len(items)
        return items

    def _live_processes(self) -> dict[int, tuple[int, bpf_types.Proc]]:
        """tgid -> (pstart, proc) for processes the kernel still knows as alive."""
        return {k: (v.pstart, v) for k, v in self._items("procs", ctypes.c_uint32, bpf_types.Proc)}

    def _process(self, tgid: int, pstart: int, proc: bpf_types.Proc) -> Process | None:
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
        s = Snapshot(ready=True, probes=self._probe_states())
        maps = self.probes.maps
        self._entries = {}
        # counters first, identities last: a process that starts in between
        # is then already in `procs`, so its fresh counters are never dropped
        listeners = self._read_listeners()
        conn_items = self._items("conn_counts", bpf_types.ConnKey, bpf_types.ConnCounts)
        fail_items = {name: self._items(name, bpf_types.FailKey, ctypes.c_uint64)
                      for name in ("fd_failures", "port_exhaustion")}
        upgrade_items = self._items("upgrades", bpf_types.UpgradeKey, ctypes.c_uint64)
        duration_items = self._items("durations", bpf_types.DurationKey, bpf_types.DurationHist)
        peer_items = self._items("peers", bpf_types.PeerKey, ctypes.c_int64)
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
            s.connections[ConnKey(k.tgid, k.lport, KIND_NAMES.get(k.kind, "tcp"))] = ConnCounts(
                v.open, v.close_wait, v.accepted, v.closed)

        for k, v in owned("fd_failures", fail_items["fd_failures"]):
            key = FailureKey(k.tgid, SYSCALL_NAMES.get(k.syscall, "other"), ERRNO_NAMES.get(k.err, str(k.err)))
            s.fd_failures[key] = s.fd_failures.get(key, 0) + v
        for k, v in owned("port_exhaustion", fail_items["port_exhaustion"]):
            key = (k.tgid, SYSCALL_NAMES.get(k.syscall, "other"))
            s.port_exhaustion[key] = s.port_exhaustion.get(key, 0) + v

        for l in listeners:
            if l.state != TCP_LISTEN or owner(l.tgid, l.pstart) is None:
                continue
            key = PortKey(l.tgid, l.lport)
            prev = s.listeners.get(key)
            requested = l.backlog_requested if l.flags & bpf_types.LISTENER_BACKLOG_SEEN else None
            # IPv4 and IPv6 listeners on one port (or one shared by forked
            # workers) add up, as the kernel's queues do
            s.listeners[key] = ListenerState(
                queue_length=l.queue_length + (prev.queue_length if prev else 0),
                backlog=l.backlog + (prev.backlog if prev else 0),
                drops=l.drops + (prev.drops if prev else 0),
                overflow_drops=l.overflow_drops + (prev.overflow_drops if prev else 0),
                somaxconn=l.somaxconn,
                requested=requested if prev is None or prev.requested is None else max(
                    prev.requested, requested or 0),
            )

        for k, v in owned("upgrades", upgrade_items):
            s.upgrades[UpgradeKey(k.tgid, k.lport, k.status)] = v
        for k, h in owned("durations", duration_items):
            s.durations[DurationKey(k.tgid, k.lport, KIND_NAMES.get(k.kind, "tcp"))] = _histogram(h)
        s.peers = self._read_peers(list(owned("peers", peer_items)))

        due = t0 - self._socket_table_read_at >= self.cfg.socket_table_interval_seconds
        if due:
            self._socket_table_read_at = t0
        s.headroom = self._headroom = read_headroom(
            s.processes, due, self._headroom, port_use=self._read_port_use if due else None)

        self._read_map_stats(s)
        self._read_program_stats(s)
        hook = self.probes.syscall_hook
        s.syscall_hook_armed = hook.armed if hook else None
        # forget cached identities of processes that are gone
        self._process_cache = {k: v for k, v in self._process_cache.items() if k in used}
        s.taken_at = time.time()
        s.build_seconds = time.monotonic() - t0
        return s

    def _probe_states(self) -> dict[str, ProbeState]:
        out = {}
        for name, on in self.probes.enabled.items():
            strategy = self.probes.via(name)
            out[name] = ProbeState(on, strategy.via, strategy.attach) if strategy else ProbeState(on)
        return out

    def _read_listeners(self) -> list[bpf_types.Listener]:
        """Every known listener, its live queue refreshed in the map by the
        listener-stats iterator just before (none if that probe is off)."""
        if self.probes.run_iterator("listener_stats") is None:
            return []
        return [l for _, l in self._items("listeners", ctypes.c_uint64, bpf_types.Listener)]

    def _read_port_use(self, port_range: tuple[int, int]) -> PortUse | None:
        """Outbound port use of this network namespace, counted by the port-use
        iterator in the kernel; None where it cannot run (read_system then
        falls back to a sock_diag dump)."""
        if not self.probes.via("port_use"):
            return None
        self._port_use_generation += 1
        gen = self._port_use_generation
        bss = self.probes.globals
        bss.set("port_range_low", ctypes.c_uint32, port_range[0])
        bss.set("port_range_high", ctypes.c_uint32, port_range[1])
        bss.set("port_use_generation", ctypes.c_uint64, gen)
        self.probes.run_iterator("port_use")
        maps = self.probes.maps
        in_use = sum(bin(w.bits).count("1")
                     for _, w in maps["used_ports"].items(ctypes.c_uint32, bpf_types.PortWord)
                     if w.generation == gen)
        destinations = sorted(((_destination(k), v.sockets)
                               for k, v in self._items("port_use", bpf_types.PortUseKey, bpf_types.PortUse)
                               if v.generation == gen), key=lambda d: (-d[1], d[0]))
        return PortUse(in_use, tuple(destinations))

    def _peer_label(self, raw) -> str:
        peers = self.cfg.peers
        addr = bpf_types.peer_address(raw)
        net = peer_network(addr, peers)
        label = str(addr) if net.prefixlen == net.max_prefixlen else str(net)
        if peers.hash:
            return hmac.new(peers.hash_key.encode(), label.encode(), hashlib.sha256).hexdigest()[:16]
        return label

    def _read_peers(self, items) -> dict[PortKey, PeerStats]:
        mp = self.probes.maps["peers"]
        per_port: dict[PortKey, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        empty = []
        for k, n in items:
            if n <= 0:
                empty.append(k)
                continue
            per_port[PortKey(k.tgid, k.lport)][self._peer_label(k.peer)] += n
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
        for mid in bpf_types.MapId:
            name = mid.name.lower()
            mp = maps[name]
            nfull = sum(full.lookup_percpu(ctypes.c_uint32(mid), ctypes.c_uint64))
            if name == "socks":
                entries = sum(maps["socks_live"].lookup_percpu(ctypes.c_uint32(0), ctypes.c_int64))
            elif name in self._entries:
                entries = self._entries[name]
            else:
                entries = sum(1 for _ in mp.items(_raw(mp.key_size), _raw(mp.value_size)))
            s.maps[name] = MapStats(entries, mp.max_entries, nfull, mp.memlock_bytes())

    def _read_program_stats(self, s: Snapshot) -> None:
        for name, prog in self.probes.obj.programs.items():
            if prog.fd >= 0:
                s.program_stats[name.removeprefix("cw_")] = ProgramStats(*prog.run_stats())


_RAW: dict[int, type] = {}


def _raw(size: int) -> type:
    """An opaque ctypes type of `size` bytes, for counting entries."""
    if size not in _RAW:
        _RAW[size] = ctypes.c_char * size
    return _RAW[size]


def _destination(k: bpf_types.PortUseKey) -> str:
    addr = bpf_types.peer_address(k.daddr)
    return f"[{addr}]:{k.dport}" if addr.version == 6 else f"{addr}:{k.dport}"


def _histogram(h: bpf_types.DurationHist) -> Histogram:
    """Kernel log2 buckets (bucket i: [2^(i-1), 2^i) ms) as cumulative le buckets."""
    cumulative, running = [], 0
    # the last kernel bucket also holds everything longer: it becomes +Inf
    for i in range(bpf_types.HIST_BUCKETS - 1):
        running += h.buckets[i]
        cumulative.append(((2 ** i) / 1000.0, running))
    return Histogram(tuple(cumulative), h.sum_ns / 1e9, h.count)
