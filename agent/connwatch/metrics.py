"""Every metric the agent serves, declared once.

A declaration holds everything said about a metric: its name, type, help
text, labels, unit, where its value comes from and, for the reference, what
it means in detail. The sources (connwatch/sources/) make their families
from it with :meth:`Metric.family`, dashboards/metrics.py takes the names
from it, and the tables of docs/metrics.md are generated from it
(``python -m connwatch.metrics_doc``), so a metric's name and labels are
written in one place.

The constant's name is the one dashboards and alert rules use
(``m.CONNECTIONS``); ``name`` is the series name as scraped, so counters
end in ``_total``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily)
from prometheus_client.metrics_core import Metric as Family

# The labels of every per-process series, in this order: the process and the
# container and Kubernetes pod it runs in (connwatch/identity.py).
PROCESS = ("pid", "comm", "container", "pod_uid")

# docs/metrics.md sections, in the order the sources read them
CONCERNS = ("connections", "failures", "listeners", "headroom", "system", "namespaces", "bpf", "agent")

# The labels of every per-network-namespace series: the namespace's inode
# (as `ls -Li /proc/<pid>/ns/net` shows it) and the pod its listeners run in.
NETNS = ("netns", "pod_uid")


@dataclass(frozen=True)
class Metric:
    name: str
    type: Literal["gauge", "counter", "histogram"]
    help: str
    concern: str
    source: str
    labels: tuple[str, ...] = ()
    unit: str = ""
    # docs/metrics.md only: said after `help` in the Meaning column
    details: str = ""

    def __post_init__(self) -> None:
        if self.concern not in CONCERNS:
            raise ValueError(f"{self.name}: unknown concern {self.concern}")
        if (self.type == "counter") != self.name.endswith("_total"):
            raise ValueError(f"{self.name}: counters, and only counters, end in _total")
        if self.unit and self.unit not in self.name.removesuffix("_total").split("_")[-1:]:
            raise ValueError(f"{self.name}: the name must end in its unit {self.unit}")

    @property
    def family_name(self) -> str:
        """prometheus_client's name for the family: a counter's without _total
        (it appends that to the samples)."""
        return self.name.removesuffix("_total")

    def family(self, value: float | None = None) -> Family:
        """An empty family of this metric to add samples to, or, for a metric
        without labels, the family holding `value`."""
        kind = {"gauge": GaugeMetricFamily, "counter": CounterMetricFamily,
                "histogram": HistogramMetricFamily}[self.type]
        if value is not None:
            return kind(self.family_name, self.help, value=value, unit=self.unit)
        return kind(self.family_name, self.help, labels=list(self.labels), unit=self.unit)


def _gauge(name: str, help: str, concern: str, source: str, labels: tuple[str, ...] = (), **kw) -> Metric:
    return Metric(name, "gauge", help, concern, source, labels, **kw)


def _counter(name: str, help: str, concern: str, source: str, labels: tuple[str, ...] = (), **kw) -> Metric:
    return Metric(name, "counter", help, concern, source, labels, **kw)


# ---- connections (BPF) ------------------------------------------------------

CONNECTIONS = _gauge(
    "connwatch_connections",
    "Accepted TCP connections not yet closed, per owning process, local port and kind.",
    "connections",
    "`accept`/`accept4` returns (fexit or kretprobe on `inet_csk_accept`; where neither works, the completed "
    "handshake at `inet_sock_set_state`, counted once a process has the connection), `inet_sock_set_state` to "
    "`TCP_CLOSE`; seeded at start-up from every process's fd table (`iter/task_file`)",
    PROCESS + ("port", "kind"),
    details="IPv4 and IPv6. A connection counts until the kernel reaches `TCP_CLOSE`, which can come after the "
    "application's `close()`: an orphaned socket still finishing its close stays counted under its last "
    "owner, where `ss -p` shows it with no process. The owner is the process that did the connection's first "
    "read/write (Node's cluster module accepts in the primary and hands the socket to a worker: the worker "
    "owns it). `kind` is `websocket` (an `Upgrade: websocket` request answered `101`, or a port listed in "
    "`websocket_ports`), `tls` (first bytes a TLS ClientHello on a port not hinted) or `tcp`.")
CONNECTIONS_CLOSE_WAIT = _gauge(
    "connwatch_connections_close_wait",
    "Of those, connections the peer has closed and the owning process has not (CLOSE_WAIT).",
    "connections",
    "`inet_sock_set_state` `ESTABLISHED` → `CLOSE_WAIT` (+1) and `CLOSE_WAIT` → `LAST_ACK` or `TCP_CLOSE` (−1)",
    PROCESS + ("port", "kind"),
    details="As `ss -tan state close-wait` shows them. A healthy server closes within milliseconds of reading "
    "the end of the stream; a count that only grows is a missing `close()`, one fd lost per departed client "
    "(alert: `ConnwatchCloseWaitAccumulating`).")
ACCEPTED = _counter(
    "connwatch_connections_accepted_total",
    "TCP connections the process accepted.",
    "connections",
    "`accept`/`accept4` returns (fexit or kretprobe on `inet_csk_accept`), or where neither works the first "
    "sign that a connection counted from its handshake was accepted",
    PROCESS + ("port",),
    details="Since the agent started (seeded connections are not counted). Each connection's accept is "
    "counted exactly once: by the insert that tracks it or, counted from the handshake, by whoever first "
    "removes it from the `queued` map; also when its owner changes or it closes at the same moment on "
    "another CPU.")
CLOSED = _counter(
    "connwatch_connections_closed_total",
    "Connections the process accepted that since reached TCP_CLOSE.",
    "connections",
    "`inet_sock_set_state` → `TCP_CLOSE`",
    PROCESS + ("port",))
CONNECTION_DURATION = Metric(
    "connwatch_connection_duration_seconds", "histogram",
    "Lifetime of accepted connections at TCP_CLOSE, per last owner (log2 buckets, in-kernel).",
    "connections",
    "`bpf_ktime_get_ns()` at accept (at the handshake where no accept hook works) and at `TCP_CLOSE`, bucketed "
    "in the kernel (log2 of milliseconds: `le` = 0.001, 0.002, 0.004 … s)",
    PROCESS + ("port", "kind"), unit="seconds",
    details="Connections seeded at start-up have no known age and are not recorded.")
WEBSOCKET_UPGRADES = _counter(
    "connwatch_websocket_upgrades_total",
    "WebSocket upgrade requests answered, by HTTP status (101 = accepted).",
    "connections",
    "a new connection's first bytes received (a `GET` with `Upgrade: websocket`, any case, within its first "
    "512 bytes) and sent (the answer's HTTP status): fentry on `tcp_sendmsg` and fexit on `tcp_recvmsg`, their "
    "kprobes, or `tp_btf/sock_send_length` and `sock_recv_length`",
    PROCESS + ("port", "status"),
    details="`status=\"101\"` accepted; `429`, `503` … refused by the application. The bytes are read from the "
    "syscall's user buffer; classification stops after the first exchange.")
PEER_CONNECTIONS = _gauge(
    "connwatch_peer_connections",
    "Open connections of the top-K peers per listening process and port.",
    "connections",
    "`peers` BPF map (per owner, local port and peer address)",
    PROCESS + ("port", "peer"),
    details="K is `peers.top_k` (default 20). `peer` is the address, the prefix it is aggregated to "
    "(`peers.ipv4_prefix`/`ipv6_prefix`) or a keyed hash of that (`peers.hash`).")
PEERS = _gauge(
    "connwatch_peers",
    "Distinct peers with open connections per listening process and port.",
    "connections",
    "same",
    PROCESS + ("port",),
    details="After aggregation. For the `other` fold, the sum over the folded processes.")
PEER_CONNECTIONS_MAX = _gauge(
    "connwatch_peer_connections_max",
    "Open connections of the busiest peer per listening process and port.",
    "connections",
    "same",
    PROCESS + ("port",))

# ---- fd allocation and port exhaustion failures (BPF) ---------------------------

FD_ALLOC_FAILURES = _counter(
    "connwatch_fd_alloc_failures_total",
    "Syscalls that failed with EMFILE (per-process fd limit) or ENFILE (fs.file-max).",
    "failures",
    "fexit or kretprobe on `alloc_fd`/`alloc_empty_file`; where neither works, the syscall hook "
    "(`tp_btf/sys_exit` returning `-EMFILE`/`-ENFILE`), attached as `syscall_tracing` says",
    PROCESS + ("syscall", "errno"),
    details="`EMFILE` = the process hit its soft `RLIMIT_NOFILE`, `ENFILE` = the host hit `fs.file-max`. "
    "`syscall` names the fd-allocating syscalls (`accept4`, `socket`, `openat`, `dup`, `pipe2`, "
    "`epoll_create1`, `eventfd2`, …); any other is `other`. Through the syscall hook, failures are counted "
    "only while it is attached (`connwatch_syscall_hook_armed`).")
PORT_EXHAUSTION_FAILURES = _counter(
    "connwatch_port_exhaustion_failures_total",
    "connect() or bind() calls that found no free local port (EADDRNOTAVAIL; EADDRINUSE for bind() to port 0).",
    "failures",
    "fexit or kretprobe on `inet_hash_connect`/`inet6_hash_connect`/`inet_csk_get_port`; where neither works, "
    "the syscall hook (`tp_btf/sys_exit` of `connect`/`bind`), attached as `syscall_tracing` says",
    PROCESS + ("syscall",),
    details="The ephemeral range is exhausted for a destination (compare `connwatch_ephemeral_ports_in_use`).")

# ---- listeners (BPF, every network namespace) -----------------------------------

LISTEN_QUEUE_LENGTH = _gauge(
    "connwatch_listen_queue_length",
    "Connections in the listener's accept queue, waiting for accept() (ss Recv-Q).",
    "listeners",
    "`sk_ack_backlog`, written into the `listeners` map each refresh by the listener-stats iterator "
    "(`iter/bpf_map` + `bpf_for_each_map_elem`, or `iter/bpf_map_elem`)",
    PROCESS + ("port",))
LISTEN_BACKLOG = _gauge(
    "connwatch_listen_backlog",
    "Effective accept-queue size: listen()'s backlog capped at net.core.somaxconn (ss Send-Q).",
    "listeners",
    "`sk_max_ack_backlog`",
    PROCESS + ("port",),
    details="The queue is full when `queue_length` exceeds it.")
LISTEN_BACKLOG_REQUESTED = _gauge(
    "connwatch_listen_backlog_requested",
    "Backlog the application passed to listen() (the kernel caps it at net.core.somaxconn); absent for "
    "listeners that predate the agent.",
    "listeners",
    "`listen()`'s second argument (fexit or kretprobe on `__sys_listen`, or the syscall hook "
    "`tp_btf/sys_exit`)",
    PROCESS + ("port",),
    details="Above `connwatch_listen_somaxconn` it was silently capped. Where only the syscall hook sees "
    "`listen()`: absent with `syscall_tracing: never`, and with `on_demand` for a `listen()` made while the "
    "hook was detached.")
LISTEN_SOMAXCONN = _gauge(
    "connwatch_listen_somaxconn",
    "net.core.somaxconn of the listener's network namespace: the cap on its listen() backlog.",
    "listeners",
    "`net->core.sysctl_somaxconn` of the listening socket's namespace",
    PROCESS + ("port",))
LISTEN_DROPS = _counter(
    "connwatch_listen_drops_total",
    "Packets the listener dropped (sk_drops), chiefly SYNs refused on a full accept queue.",
    "listeners",
    "`sk_drops` of the listening socket",
    PROCESS + ("port",),
    details="The kernel's per-listener share of `ListenDrops`.")
LISTEN_OVERFLOW_DROPS = _counter(
    "connwatch_listen_overflow_drops_total",
    "Handshakes dropped because the listener's accept queue was full.",
    "listeners",
    "fexit or kretprobe on `tcp_v4_syn_recv_sock`/`tcp_v6_syn_recv_sock`, or `tp_btf/kfree_skb` with reason "
    "`SKB_DROP_REASON_TCP_LISTEN_OVERFLOW` (v6.15)",
    PROCESS + ("port",),
    details="Handshake ACKs dropped: clients that think they are connected but are not. Absent where the "
    "`overflow_drops` probe is off (a kernel that offers none of its strategies).")

# ---- headroom per process (/proc) ------------------------------------------------

PROCESS_OPEN_FDS = _gauge(
    "connwatch_process_open_fds",
    "Open file descriptors of the process (/proc/<pid>/fd).",
    "headroom",
    "`st_size` of `stat /proc/<pid>/fd` (kernel ≥ 6.2); a count of the directory's entries on older kernels",
    PROCESS)
PROCESS_MAX_FDS = _gauge(
    "connwatch_process_max_fds",
    "Soft RLIMIT_NOFILE of the process: opening an fd past it fails with EMFILE (/proc/<pid>/limits).",
    "headroom",
    "\"Max open files\" soft column of `/proc/<pid>/limits`, re-read when the process nears it",
    PROCESS,
    details="\"unlimited\" (not settable for NOFILE in practice) is reported as `fs.nr_open`, the real ceiling.")

# ---- system (/proc, sysctl, sock_diag) --------------------------------------------

SYSTEM_OPEN_FILES = _gauge(
    "connwatch_system_open_files", "File handles allocated system-wide (first field of fs.file-nr).",
    "system", "`/proc/sys/fs/file-nr` (allocated − free)")
SYSTEM_OPEN_FILES_LIMIT = _gauge(
    "connwatch_system_open_files_limit",
    "fs.file-max: file handles the kernel allocates before open() fails with ENFILE.",
    "system", "`/proc/sys/fs/file-max`")
SYSTEM_NR_OPEN = _gauge(
    "connwatch_system_nr_open", "fs.nr_open: the ceiling of any process's RLIMIT_NOFILE.",
    "system", "`/proc/sys/fs/nr_open`",
    details="setrlimit and systemd's `LimitNOFILE=` fail above it. Compare with `connwatch_process_max_fds`.")
SYSTEM_CONNTRACK_ENTRIES = _gauge(
    "connwatch_system_conntrack_entries", "Connection-tracking entries (net.netfilter.nf_conntrack_count).",
    "system", "`/proc/sys/net/netfilter/nf_conntrack_count`",
    details="Absent while `nf_conntrack` is not loaded.")
SYSTEM_CONNTRACK_LIMIT = _gauge(
    "connwatch_system_conntrack_entries_limit",
    "net.netfilter.nf_conntrack_max: new flows are dropped once the table is full.",
    "system", "`/proc/sys/net/netfilter/nf_conntrack_max`",
    details="\"nf_conntrack: table full\" in the kernel log. Absent while `nf_conntrack` is not loaded.")
SYSTEM_EPHEMERAL_PORTS = _gauge(
    "connwatch_system_ephemeral_ports",
    "Local ports connect() may pick: net.ipv4.ip_local_port_range minus ip_local_reserved_ports.",
    "system", "`/proc/sys/net/ipv4/ip_local_port_range` minus the ports of `ip_local_reserved_ports` inside it",
    details="Per destination: `connect()` can reuse a local port for another destination.")
SYSTEM_EPHEMERAL_IN_USE = _gauge(
    "connwatch_system_ephemeral_ports_in_use",
    "Distinct local ports in the ephemeral range held by outbound TCP sockets (TIME_WAIT included; the "
    "agent's network namespace).",
    "system",
    "the port-use iterator (`iter/tcp`) over the agent's network namespace, a sock_diag dump where it cannot "
    "run; every `socket_table_interval_seconds` near exhaustion, `socket_table_idle_interval_seconds` far from it",
    details="Every state that holds a 4-tuple counts: SYN_SENT … TIME_WAIT. Sockets accepted from a local "
    "listener are not outbound and are left out.")
SYSTEM_EPHEMERAL_IN_USE_MAX_DEST = _gauge(
    "connwatch_system_ephemeral_ports_in_use_max_destination",
    "Local ports held by outbound TCP sockets to the busiest single destination (remote ip:port); connect() "
    "fails with EADDRNOTAVAIL when this reaches connwatch_system_ephemeral_ports.",
    "system", "same count, grouped by remote ip:port",
    details="The busiest destination's address is `connwatch_ephemeral_ports_in_use`'s first `destination`.")
EPHEMERAL_PORTS_IN_USE = _gauge(
    "connwatch_ephemeral_ports_in_use",
    "Local ports held by outbound TCP sockets towards one destination (remote ip:port), for the busiest "
    "destinations.",
    "system", "same count, per remote ip:port",
    ("destination",),
    details="The top `port_destinations_top_k` destinations (default 10), busiest first; `connect()` to a "
    "destination fails with `EADDRNOTAVAIL` when its count reaches `connwatch_system_ephemeral_ports`. "
    "`destination` is `ip:port`, `[ipv6]:port` for IPv6.")
SOCKET_TABLE_COUNT_CPU = _gauge(
    "connwatch_socket_table_count_cpu_seconds",
    "CPU time the last count of ephemeral-port use took (kernel time included), by how it was counted.",
    "system", "the refresher thread's CPU clock around the count", ("method",), unit="seconds",
    details="`method` is `bpf_iterator` (counted in the kernel), `sock_diag` (a dump filtered in the kernel to "
    "the ephemeral range) or `proc` (`/proc/net/tcp{,6}`). It grows with the sockets of the namespace; divided by "
    "the recount interval it is the share of a core the count costs.")
SYSTEM_TIME_WAIT = _gauge(
    "connwatch_system_tcp_time_wait", "TCP sockets in TIME_WAIT (/proc/net/sockstat tw).",
    "system", "`/proc/net/sockstat` `TCP: … tw`")
SYSTEM_TIME_WAIT_LIMIT = _gauge(
    "connwatch_system_tcp_time_wait_limit",
    "net.ipv4.tcp_max_tw_buckets: past it, closing sockets skip TIME_WAIT (TCPTimeWaitOverflow).",
    "system", "`/proc/sys/net/ipv4/tcp_max_tw_buckets`",
    details="\"time wait bucket table overflow\" in the kernel log.")
SYSTEM_ORPHANS = _gauge(
    "connwatch_system_tcp_orphans",
    "TCP sockets closed by their process but not yet by the peer (/proc/net/sockstat orphan).",
    "system", "`/proc/net/sockstat` `TCP: … orphan`")
SYSTEM_ORPHANS_LIMIT = _gauge(
    "connwatch_system_tcp_orphans_limit", "net.ipv4.tcp_max_orphans: past it, orphaned connections are reset.",
    "system", "`/proc/sys/net/ipv4/tcp_max_orphans`",
    details="\"too many orphaned sockets\" in the kernel log.")
SYSTEM_TCP_MEMORY = _gauge(
    "connwatch_system_tcp_memory_pages",
    "Pages allocated to TCP socket buffers system-wide (/proc/net/sockstat TCP mem).",
    "system", "`/proc/net/sockstat` `TCP: … mem`",
    details="All network namespaces.")
SYSTEM_TCP_MEMORY_LIMIT = _gauge(
    "connwatch_system_tcp_memory_pages_limit",
    "net.ipv4.tcp_mem thresholds in pages: below min no pressure, above pressure buffers shrink, at max "
    "allocations fail.",
    "system", "`/proc/sys/net/ipv4/tcp_mem`",
    ("threshold",),
    details="`threshold` is `min`, `pressure` or `max`. Absent where `tcp_mem` is not visible (it exists only "
    "in the host's network namespace).")
SYSTEM_PAGE_SIZE = _gauge(
    "connwatch_system_page_size_bytes", "Memory page size, to turn the *_pages metrics into bytes.",
    "system", "`sysconf(_SC_PAGE_SIZE)`", unit="bytes")
SYSTEM_SOMAXCONN = _gauge(
    "connwatch_system_somaxconn", "net.core.somaxconn: the cap on every listen() backlog.",
    "system", "`/proc/sys/net/core/somaxconn`",
    details="Of the agent's network namespace; each listener's own is `connwatch_listen_somaxconn`.")
SYSTEM_TCP_MAX_SYN_BACKLOG = _gauge(
    "connwatch_system_tcp_max_syn_backlog",
    "net.ipv4.tcp_max_syn_backlog: half-open connections a listener keeps before SYN cookies or drops.",
    "system", "`/proc/sys/net/ipv4/tcp_max_syn_backlog`")
SYSTEM_LISTEN_OVERFLOWS = _counter(
    "connwatch_system_listen_overflows_total", "Times a listener's accept queue was full (TcpExt ListenOverflows).",
    "system", "`/proc/net/netstat` `TcpExt: ListenOverflows`")
SYSTEM_LISTEN_DROPS = _counter(
    "connwatch_system_listen_drops_total",
    "Connection attempts dropped at a listener, overflows included (TcpExt ListenDrops).",
    "system", "`/proc/net/netstat` `TcpExt: ListenDrops`")

# ---- network namespaces (BPF, /proc/<pid>/net) ----------------------------------------

_NETNS_DETAILS = ("One series per network namespace holding a live listener the agent tracks (each pod's, the "
                  "host's); `pod_uid` is that of the listeners' owner (the first non-empty one).")
NETNS_EPHEMERAL_PORT_RANGE_SIZE = _gauge(
    "connwatch_netns_ephemeral_port_range_size",
    "Local ports net.ipv4.ip_local_port_range of the network namespace spans (high - low + 1).",
    "namespaces", "`net->ipv4.ip_local_ports.range` of a listener's namespace, read by the listener-stats "
    "iterator", NETNS,
    details=_NETNS_DETAILS + " Unlike `connwatch_system_ephemeral_ports`, the namespace's "
    "`ip_local_reserved_ports` are not subtracted.")
NETNS_TIME_WAIT = _gauge(
    "connwatch_netns_tcp_time_wait",
    "TCP sockets in TIME_WAIT in the network namespace (its /proc/net/sockstat tw).",
    "namespaces", "`/proc/<pid>/net/sockstat` `TCP: … tw` of a listener's owner", NETNS,
    details=_NETNS_DETAILS)
NETNS_TIME_WAIT_LIMIT = _gauge(
    "connwatch_netns_tcp_time_wait_limit",
    "net.ipv4.tcp_max_tw_buckets of the network namespace: past it, closing sockets skip TIME_WAIT.",
    "namespaces", "`net->ipv4.tcp_death_row.sysctl_max_tw_buckets` of a listener's namespace, read by the "
    "listener-stats iterator", NETNS,
    details=_NETNS_DETAILS)
NETNS_EPHEMERAL_IN_USE = _gauge(
    "connwatch_netns_ephemeral_ports_in_use",
    "Distinct local ports in the namespace's ephemeral range held by its outbound TCP sockets (TIME_WAIT "
    "included).",
    "namespaces", "`/proc/<pid>/net/tcp{,6}` of a listener's owner, as often as the agent's own namespace "
    "(`socket_table_interval_seconds` near exhaustion, `socket_table_idle_interval_seconds` far from it)", NETNS,
    details=_NETNS_DETAILS + " Not for the agent's own namespace: that is "
    "`connwatch_system_ephemeral_ports_in_use`, counted in the kernel. Another namespace's sockets can only "
    "be listed as text without entering it "
    "(which takes `CAP_SYS_ADMIN`), so its count costs about 1 µs per socket of that namespace each "
    "recount.")
NETNS_EPHEMERAL_IN_USE_MAX_DEST = _gauge(
    "connwatch_netns_ephemeral_ports_in_use_max_destination",
    "Local ports held by the namespace's outbound TCP sockets to its busiest single destination (remote "
    "ip:port); connect() there fails with EADDRNOTAVAIL when this reaches the namespace's range.",
    "namespaces", "same count, grouped by remote ip:port", NETNS,
    details=_NETNS_DETAILS + " Compare with `connwatch_netns_ephemeral_port_range_size`.")
NETNS_EPHEMERAL_IN_USE_BY_DEST = _gauge(
    "connwatch_netns_ephemeral_ports_in_use_by_destination",
    "Local ports held by the namespace's outbound TCP sockets towards one destination (remote ip:port), for "
    "its busiest destinations.",
    "namespaces", "same count, per remote ip:port", (*NETNS, "destination"),
    details="The top `port_destinations_top_k` destinations of each namespace, busiest first; `destination` "
    "as in `connwatch_ephemeral_ports_in_use`.")
NETNS_CONNTRACK_ENTRIES = _gauge(
    "connwatch_netns_conntrack_entries",
    "Connection-tracking entries of the network namespace.",
    "namespaces", "`entries` of `/proc/<pid>/net/stat/nf_conntrack` of a listener's owner", NETNS,
    details=_NETNS_DETAILS + " Absent while `nf_conntrack` is not loaded. The kernel holds each namespace's "
    "count against the global `nf_conntrack_max` (`connwatch_system_conntrack_entries_limit`).")

# ---- BPF ------------------------------------------------------------------------

PROBE_ENABLED = _gauge(
    "connwatch_probe_enabled",
    "1 if the probe is attached, 0 if this kernel can do none of its attach strategies.",
    "bpf", "the start-up plan (connwatch/probes.py)", ("probe",),
    details="The reason is logged. Probes: `connection_state`, `accept`, `classification`, `listen_backlog`, "
    "`fd_failures`, `port_exhaustion`, `overflow_drops`, `process_exit`, `seeding`, `listener_stats`, "
    "`port_use`.")
PROBE_INFO = _gauge(
    "connwatch_probe_info",
    "The attach strategy each attached probe got on this kernel (always 1).",
    "bpf", "same", ("probe", "via", "attach"),
    details="`via` is `fentry`, `kprobe`, `tracepoint`, `syscall_hook` or `iterator`; `attach` says where.")
SYSCALL_HOOK_ARMED = _gauge(
    "connwatch_syscall_hook_armed",
    "1 while the syscall hook is attached (kernels without fentry or kprobes, syscall_tracing: on_demand arms "
    "it near a limit).",
    "bpf", "connwatch/arming.py",
    details="Absent where no probe needs the syscall hook, and with `syscall_tracing: never`.")
BPF_MAP_ENTRIES = _gauge(
    "connwatch_bpf_map_entries", "Entries in a BPF map.", "bpf", "the map read of each refresh", ("map",))
BPF_MAP_CAPACITY = _gauge(
    "connwatch_bpf_map_capacity", "Configured max_entries of a BPF map.", "bpf", "`maps.*` in the config",
    ("map",))
BPF_MAP_FULL = _counter(
    "connwatch_bpf_map_full_total",
    "Inserts a BPF map refused because it was full (that event went uncounted).",
    "bpf", "per-CPU `map_full` counters, one per `enum cw_map_id`", ("map",))
BPF_MAP_MEMORY = _gauge(
    "connwatch_bpf_map_memory_bytes", "Kernel memory charged to a BPF map.", "bpf", "`memlock` in fdinfo",
    ("map",), unit="bytes")
BPF_PROGRAM_RUN_SECONDS = _counter(
    "connwatch_bpf_program_run_seconds_total",
    "Time spent in a BPF program (needs sysctl kernel.bpf_stats_enabled=1).",
    "bpf", "`BPF_OBJ_GET_INFO_BY_FD` `run_time_ns`", ("program",), unit="seconds",
    details="`bpf_stats: true` in the config turns the statistics on; 0 otherwise.")
BPF_PROGRAM_RUNS = _counter(
    "connwatch_bpf_program_runs_total",
    "Invocations of a BPF program (needs sysctl kernel.bpf_stats_enabled=1).",
    "bpf", "`BPF_OBJ_GET_INFO_BY_FD` `run_cnt`", ("program",))
BPF_PROGRAM_RECURSION_MISSES = _counter(
    "connwatch_bpf_program_recursion_misses_total",
    "Runs of a BPF program the kernel skipped because it was already running on that CPU (an event it did "
    "not see).",
    "bpf", "`BPF_OBJ_GET_INFO_BY_FD` `recursion_misses`", ("program",),
    details="Always counted. `inet_sock_set_state` is attached twice so that a skipped run of one is handled "
    "by the other.")

# ---- the agent itself -------------------------------------------------------------

BUILD_INFO = _gauge(
    "connwatch_build_info", "connwatch version and the running kernel.", "agent", "the agent", ("version", "kernel"),
    details="Always 1.")
READY = _gauge(
    "connwatch_ready", "1 once the probes are attached and a snapshot was read.", "agent", "the agent",
    details="0 while starting (probes loading).")
SNAPSHOT_TIMESTAMP = _gauge(
    "connwatch_snapshot_timestamp_seconds", "When the snapshot served by this scrape was read (Unix time).",
    "agent", "the refresher", unit="seconds")
SNAPSHOT_DURATION = _gauge(
    "connwatch_snapshot_duration_seconds", "How long reading the served snapshot took.",
    "agent", "the refresher", unit="seconds",
    details="Maps, iterators, /proc: every source's read, the identities and the clean-up.")
SNAPSHOT_SOURCE_DURATION = _gauge(
    "connwatch_snapshot_source_duration_seconds",
    "How long each source took to read its part of the served snapshot.",
    "agent", "the refresher", ("source",), unit="seconds",
    details="Sources: `connections`, `failures`, `listeners`, `headroom`, `system`, `namespaces`, `bpf`, "
    "`agent` "
    "(node_exporter's `node_scrape_collector_duration_seconds`, but measured where connwatch does its "
    "I/O: in the background refresh, not in the scrape).")
SNAPSHOT_SOURCE_SUCCESS = _gauge(
    "connwatch_snapshot_source_success",
    "1 if the source read its part of the served snapshot, 0 if that read failed (its metrics are absent).",
    "agent", "the refresher", ("source",),
    details="The reason is logged.")
SCRAPE_DURATION = _gauge(
    "connwatch_scrape_duration_seconds", "How long the previous scrape's collection took (snapshot to text).",
    "agent", "the collector", unit="seconds")
HTTP_CONNECTIONS = _counter(
    "connwatch_http_connections_total",
    "Connections to the metrics endpoint: accepted; over the cap and answered 503 (shed_503) or closed "
    "unanswered (shed_closed); cut off to make room (evicted).",
    "agent", "connwatch/web.py", ("outcome",))

# constant name -> declaration, in declaration order
BY_CONSTANT: dict[str, Metric] = {k: v for k, v in dict(globals()).items() if isinstance(v, Metric)}
ALL: tuple[Metric, ...] = tuple(BY_CONSTANT.values())
BY_NAME: dict[str, Metric] = {m.name: m for m in ALL}
