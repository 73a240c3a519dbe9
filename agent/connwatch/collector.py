"""Prometheus collector: metric families from the newest snapshot.

collect() does no I/O: it formats what the refresher last read. Per-process
series are capped (``max_process_series``); processes beyond the cap, ranked
by open connections, are summed into one ``comm="other"`` series per metric.
"""

from __future__ import annotations

import platform
import time
from collections import defaultdict
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from . import __version__
from .config import Config
from .headroom import headroom_metrics
from .snapshot import Process, Snapshot

OTHER = Process(0, "other", "")
PROC_LABELS = ["pid", "comm", "container"]


def _proc_labels(p: Process) -> list[str]:
    return ["" if p is OTHER else str(p.pid), p.comm, p.container]


class ConnwatchCollector(Collector):
    def __init__(self, current: Callable[[], Snapshot], cfg: Config):
        self._current = current
        self._cfg = cfg
        self.last_collect_seconds = 0.0

    def describe(self) -> Iterator[Metric]:
        return iter(())  # unchecked collector: families depend on the snapshot

    def collect(self) -> Iterator[Metric]:
        t0 = time.monotonic()
        s = self._current()
        yield from self._agent(s)
        if s.ready:
            yield from self._per_process(s)
            yield from self._bpf(s)
        self.last_collect_seconds = time.monotonic() - t0

    # ---- agent itself -----------------------------------------------------

    def _agent(self, s: Snapshot) -> Iterator[Metric]:
        info = GaugeMetricFamily("connwatch_build_info", "connwatch version and the running kernel.",
                                 labels=["version", "kernel"])
        info.add_metric([__version__, platform.release()], 1)
        yield info
        yield GaugeMetricFamily("connwatch_ready", "1 once the probes are attached and a snapshot was read.",
                                value=1 if s.ready else 0)
        if not s.ready:
            return
        yield GaugeMetricFamily("connwatch_snapshot_timestamp_seconds",
                                "When the snapshot served by this scrape was read (Unix time).",
                                value=s.taken_at)
        yield GaugeMetricFamily("connwatch_snapshot_duration_seconds",
                                "How long reading the served snapshot took.", value=s.build_seconds)
        yield GaugeMetricFamily("connwatch_scrape_duration_seconds",
                                "How long the previous scrape's collection took (snapshot to text).",
                                value=self.last_collect_seconds)
        enabled = GaugeMetricFamily("connwatch_probe_enabled",
                                    "1 if the probe is attached, 0 if this kernel can do none of its attach strategies.",
                                    labels=["probe"])
        info = GaugeMetricFamily("connwatch_probe_info",
                                 "The attach strategy each attached probe got on this kernel (always 1).",
                                 labels=["probe", "via", "attach"])
        for name, st in sorted(s.probes.items()):
            enabled.add_metric([name], 1 if st.enabled else 0)
            if st.enabled:
                info.add_metric([name, st.via, st.attach], 1)
        yield enabled
        yield info
        if s.syscall_hook_armed is not None:
            yield GaugeMetricFamily("connwatch_syscall_hook_armed",
                                    "1 while the syscall hook is attached (kernels without fentry or kprobes, "
                                    "syscall_tracing: on_demand arms it near a limit).",
                                    value=1 if s.syscall_hook_armed else 0)

    # ---- per process --------------------------------------------------------

    def _visible(self, s: Snapshot) -> Callable[[int], Process]:
        """pid -> the Process its series are reported under (itself or OTHER)."""
        weight: dict[int, int] = defaultdict(int)
        for key, counts in s.connections.items():
            weight[key.pid] += max(counts.open, 0) * 1_000_000 + counts.accepted
        for pid in s.processes:
            weight.setdefault(pid, 0)
        ranked = sorted(weight, key=lambda pid: (-weight[pid], pid))
        kept = set(ranked[: self._cfg.max_process_series])
        return lambda pid: s.processes[pid] if pid in kept else OTHER

    def _per_process(self, s: Snapshot) -> Iterator[Metric]:
        who = self._visible(s)
        conns = GaugeMetricFamily(
            "connwatch_connections",
            "Accepted TCP connections not yet closed, per owning process, local port and kind.",
            labels=PROC_LABELS + ["port", "kind"])
        close_wait = GaugeMetricFamily(
            "connwatch_connections_close_wait",
            "Of those, connections the peer has closed and the owning process has not (CLOSE_WAIT).",
            labels=PROC_LABELS + ["port", "kind"])
        accepted = CounterMetricFamily("connwatch_connections_accepted",
                                       "TCP connections the process accepted.", labels=PROC_LABELS + ["port"])
        closed = CounterMetricFamily("connwatch_connections_closed",
                                     "Connections the process accepted that since reached TCP_CLOSE.",
                                     labels=PROC_LABELS + ["port"])
        rows = [((*_proc_labels(who(key.pid)), str(key.port)), key.kind, counts)
                for key, counts in s.connections.items()]
        yield _summed(conns, (((*labels, kind), max(c.open, 0)) for labels, kind, c in rows))
        yield _summed(close_wait, (((*labels, kind), max(c.close_wait, 0)) for labels, kind, c in rows))
        yield _summed(accepted, ((labels, c.accepted) for labels, _, c in rows))
        yield _summed(closed, ((labels, c.closed) for labels, _, c in rows))

        fdfail = CounterMetricFamily("connwatch_fd_alloc_failures",
                                     "Syscalls that failed with EMFILE (per-process fd limit) or ENFILE (fs.file-max).",
                                     labels=PROC_LABELS + ["syscall", "errno"])
        yield _summed(fdfail, (((*_proc_labels(who(key.pid)), key.syscall, key.errno), n)
                               for key, n in s.fd_failures.items()))
        exhaust = CounterMetricFamily("connwatch_port_exhaustion_failures",
                                      "connect() or bind() calls that found no free local port (EADDRNOTAVAIL; "
                                      "EADDRINUSE for bind() to port 0).",
                                      labels=PROC_LABELS + ["syscall"])
        yield _summed(exhaust, (((*_proc_labels(who(pid)), sc), n)
                                for (pid, sc), n in s.port_exhaustion.items()))
        yield from self._listeners(s, who)
        upgrades = CounterMetricFamily("connwatch_websocket_upgrades",
                                       "WebSocket upgrade requests answered, by HTTP status (101 = accepted).",
                                       labels=PROC_LABELS + ["port", "status"])
        yield _summed(upgrades, (((*_proc_labels(who(key.pid)), str(key.port), str(key.status)), n)
                                 for key, n in s.upgrades.items()))
        yield from self._durations(s, who)
        yield from self._peers(s, who)
        if s.headroom is not None:
            yield from headroom_metrics(s.headroom, lambda pid: tuple(_proc_labels(who(pid))))

    def _listeners(self, s: Snapshot, who: Callable[[int], Process]) -> Iterator[Metric]:
        labels = PROC_LABELS + ["port"]
        queue = GaugeMetricFamily("connwatch_listen_queue_length",
                                  "Connections in the listener's accept queue, waiting for accept() (ss Recv-Q).",
                                  labels=labels)
        backlog = GaugeMetricFamily("connwatch_listen_backlog",
                                    "Effective accept-queue size: listen()'s backlog capped at net.core.somaxconn "
                                    "(ss Send-Q).", labels=labels)
        drops = CounterMetricFamily("connwatch_listen_drops",
                                    "Packets the listener dropped (sk_drops), chiefly SYNs refused on a full "
                                    "accept queue.", labels=labels)
        requested = GaugeMetricFamily("connwatch_listen_backlog_requested",
                                      "Backlog the application passed to listen() (the kernel caps it at "
                                      "net.core.somaxconn); absent for listeners that predate the agent.",
                                      labels=labels)
        drops_overflow = CounterMetricFamily("connwatch_listen_overflow_drops",
                                             "Handshakes dropped because the listener's accept queue was full.",
                                             labels=labels)
        somaxconn = GaugeMetricFamily("connwatch_listen_somaxconn",
                                      "net.core.somaxconn of the listener's network namespace: the cap on its "
                                      "listen() backlog.", labels=labels)
        rows = [((*_proc_labels(who(key.pid)), str(key.port)), st) for key, st in s.listeners.items()]
        yield _summed(queue, ((lab, st.queue_length) for lab, st in rows))
        yield _summed(backlog, ((lab, st.backlog) for lab, st in rows))
        yield _summed(drops, ((lab, st.drops) for lab, st in rows))
        yield _summed(drops_overflow, ((lab, st.overflow_drops) for lab, st in rows))
        yield _maxed(somaxconn, ((lab, st.somaxconn) for lab, st in rows))
        yield _maxed(requested, ((lab, st.requested) for lab, st in rows if st.requested is not None))

    def _durations(self, s: Snapshot, who: Callable[[int], Process]) -> Iterator[Metric]:
        hist = HistogramMetricFamily("connwatch_connection_duration_seconds",
                                     "Lifetime of accepted connections at TCP_CLOSE, per last owner (log2 buckets, "
                                     "in-kernel).", labels=PROC_LABELS + ["port", "kind"])
        merged: dict[tuple, list] = {}
        for key, h in s.durations.items():
            labels = (*_proc_labels(who(key.pid)), str(key.port), key.kind)
            acc = merged.setdefault(labels, [[0] * len(h.buckets), 0.0, 0])
            for i, (_, n) in enumerate(h.buckets):
                acc[0][i] += n
            acc[1] += h.sum_seconds
            acc[2] += h.count
        bounds = [f"{le:g}" for le, _ in next(iter(s.durations.values())).buckets] if s.durations else []
        for labels, (counts, total, count) in sorted(merged.items()):
            hist.add_metric(list(labels), list(zip(bounds, counts)) + [("+Inf", count)], sum_value=total)
        yield hist

    def _peers(self, s: Snapshot, who: Callable[[int], Process]) -> Iterator[Metric]:
        labels = PROC_LABELS + ["port"]
        top = GaugeMetricFamily("connwatch_peer_connections",
                                f"Open connections of the top-{self._cfg.peers.top_k} peers per listening process "
                                "and port.", labels=labels + ["peer"])
        distinct = GaugeMetricFamily("connwatch_peers", "Distinct peers with open connections per listening process "
                                     "and port.", labels=labels)
        busiest = GaugeMetricFamily("connwatch_peer_connections_max",
                                    "Open connections of the busiest peer per listening process and port.",
                                    labels=labels)
        merged: dict[tuple, list] = {}
        for key, st in s.peers.items():
            lab = (*_proc_labels(who(key.pid)), str(key.port))
            acc = merged.setdefault(lab, [0, 0, defaultdict(int)])
            acc[0] += st.distinct  # processes folded into "other": distinct per process, summed
            acc[1] = max(acc[1], st.busiest)
            for peer, n in st.top:
                acc[2][peer] += n
        for lab, (n_distinct, n_busiest, counts) in sorted(merged.items()):
            distinct.add_metric(list(lab), n_distinct)
            busiest.add_metric(list(lab), n_busiest)
            ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: self._cfg.peers.top_k]
            for peer, n in ranked:
                top.add_metric([*lab, peer], n)
        yield top
        yield distinct
        yield busiest

    # ---- BPF side -------------------------------------------------------------

    def _bpf(self, s: Snapshot) -> Iterator[Metric]:
        entries = GaugeMetricFamily("connwatch_bpf_map_entries", "Entries in a BPF map.", labels=["map"])
        capacity = GaugeMetricFamily("connwatch_bpf_map_capacity", "Configured max_entries of a BPF map.",
                                     labels=["map"])
        full = CounterMetricFamily("connwatch_bpf_map_full",
                                   "Inserts a BPF map refused because it was full (that event went uncounted).",
                                   labels=["map"])
        memory = GaugeMetricFamily("connwatch_bpf_map_memory_bytes", "Kernel memory charged to a BPF map.",
                                   labels=["map"])
        for name, st in sorted(s.maps.items()):
            entries.add_metric([name], st.entries)
            capacity.add_metric([name], st.capacity)
            full.add_metric([name], st.full)
            memory.add_metric([name], st.memory_bytes)
        yield entries
        yield capacity
        yield full
        yield memory
        run_time = CounterMetricFamily("connwatch_bpf_program_run_seconds",
                                       "Time spent in a BPF program (needs sysctl kernel.bpf_stats_enabled=1).",
                                       labels=["program"])
        runs = CounterMetricFamily("connwatch_bpf_program_runs",
                                   "Invocations of a BPF program (needs sysctl kernel.bpf_stats_enabled=1).",
                                   labels=["program"])
        misses = CounterMetricFamily("connwatch_bpf_program_recursion_misses",
                                     "Runs of a BPF program the kernel skipped because it was already running "
                                     "on that CPU (an event it did not see).", labels=["program"])
        for name, st in sorted(s.program_stats.items()):
            run_time.add_metric([name], st.run_time_ns / 1e9)
            runs.add_metric([name], st.runs)
            misses.add_metric([name], st.recursion_misses)
        yield run_time
        yield runs
        yield misses


def _summed(family, rows) -> Metric:
    total: dict[tuple, int] = defaultdict(int)
    for labels, v in rows:
        total[labels] += v
    for labels, v in sorted(total.items()):
        family.add_metric(list(labels), v)
    return family


def _maxed(family, rows) -> Metric:
    best: dict[tuple, int] = {}
    for labels, v in rows:
        best[labels] = max(best.get(labels, v), v)
    for labels, v in sorted(best.items()):
        family.add_metric(list(labels), v)
    return family
