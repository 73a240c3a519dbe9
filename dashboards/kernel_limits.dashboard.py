"""Kernel limits: every host-wide limit beside its usage."""

from dashboards import metrics as m
from dashboards.common import (INSTANCE, Layout, bargauge, make_dashboard, instance_var, sel, stat, target,
                               timeseries, usage_thresholds)
from dashboards.params import DEFAULT, Params

RATE = "[$__rate_interval]"
TCP_MEM_PRESSURE = 'threshold="pressure"'


def ratio(usage: str, limit: str, on: str = "") -> str:
    return f"{sel(usage, INSTANCE)} / {on}({sel(limit, INSTANCE)} > 0)"


def build(p: Params = DEFAULT):
    lay = Layout()
    lay.row("Usage of each limit")
    lay.add(bargauge(
        "Usage of each kernel limit",
        "Usage as a share of the limit that bounds it, per host. The alerts fire at "
        f"{p.system_open_files:.0%} (files), {p.conntrack:.0%} (conntrack), {p.ephemeral_ports:.0%} "
        f"(ports), {p.time_wait:.0%} (TIME_WAIT), {p.tcp_orphans_warning:.0%} and {p.tcp_orphans_critical:.0%} "
        f"(orphans: the kernel counts a stuck orphan up to 4 times) and {p.tcp_memory_pressure:.0%} of "
        "tcp_mem pressure (TCP memory).",
        [target(ratio(m.SYSTEM_OPEN_FILES, m.SYSTEM_OPEN_FILES_LIMIT), "{{instance}} open files / fs.file-max"),
         target(ratio(m.SYSTEM_CONNTRACK_ENTRIES, m.SYSTEM_CONNTRACK_LIMIT),
                "{{instance}} conntrack / nf_conntrack_max"),
         target(ratio(m.SYSTEM_EPHEMERAL_IN_USE_MAX_DEST, m.SYSTEM_EPHEMERAL_PORTS, "on(instance, job) group_left() "),
                "{{instance}} ports to busiest destination / ip_local_port_range"),
         target(ratio(m.SYSTEM_TIME_WAIT, m.SYSTEM_TIME_WAIT_LIMIT), "{{instance}} TIME_WAIT / tcp_max_tw_buckets"),
         target(ratio(m.SYSTEM_ORPHANS, m.SYSTEM_ORPHANS_LIMIT), "{{instance}} orphans / tcp_max_orphans"),
         target(f"{sel(m.SYSTEM_TCP_MEMORY, INSTANCE)} / on(instance, job) group_left() "
                f"({sel(m.SYSTEM_TCP_MEMORY_LIMIT, INSTANCE, TCP_MEM_PRESSURE)} > 0)",
                "{{instance}} TCP memory / tcp_mem pressure")],
        "percentunit", thresholds=usage_thresholds(p.system_open_files, p.system_critical), max_=1), w=24, h=9)

    lay.row("Per network namespace (pods)")
    lay.add(bargauge(
        "Usage of each namespace's own limits",
        "For every network namespace holding a listener (each pod with its own network): ports towards its "
        "busiest destination against its own ip_local_port_range (other than the agent's namespace, which is "
        "the host row above), and TIME_WAIT against its own tcp_max_tw_buckets. "
        f"The ports alert fires at {p.ephemeral_ports:.0%}; pod_uid joins kube_pod_info (docs/kubernetes.md).",
        [target(f"{sel(m.NETNS_EPHEMERAL_IN_USE_MAX_DEST, INSTANCE)} / on(instance, job, netns, pod_uid) "
                f"({sel(m.NETNS_EPHEMERAL_PORT_RANGE_SIZE, INSTANCE)} > 0)",
                "{{instance}} netns {{netns}} {{pod_uid}}: ports to busiest destination / its range"),
         target(f"{sel(m.NETNS_TIME_WAIT, INSTANCE)} / on(instance, job, netns, pod_uid) "
                f"({sel(m.NETNS_TIME_WAIT_LIMIT, INSTANCE)} > 0)",
                "{{instance}} netns {{netns}} {{pod_uid}}: TIME_WAIT / its tcp_max_tw_buckets")],
        "percentunit", thresholds=usage_thresholds(p.ephemeral_ports, p.system_critical), max_=1), w=24, h=9)

    lay.row("File handles")
    lay.add(timeseries(
        "Open files vs fs.file-max", "Allocated file handles (file-nr) against fs.file-max (dashed).",
        [target(sel(m.SYSTEM_OPEN_FILES, INSTANCE), "{{instance}} open files"),
         target(sel(m.SYSTEM_OPEN_FILES_LIMIT, INSTANCE), "{{instance}} fs.file-max limit")],
        "short", limits=True), w=16)
    lay.add(stat(
        "fs.nr_open", "Ceiling for any process's RLIMIT_NOFILE (LimitNOFILE/limits.conf cannot exceed it).",
        [target(sel(m.SYSTEM_NR_OPEN, INSTANCE), "{{instance}}")], "short", graph=False), w=8)

    lay.row("Connection tracking and ports")
    lay.add(timeseries(
        "Conntrack entries vs nf_conntrack_max", "Tracked connections against the table size (dashed).",
        [target(sel(m.SYSTEM_CONNTRACK_ENTRIES, INSTANCE), "{{instance}} entries"),
         target(sel(m.SYSTEM_CONNTRACK_LIMIT, INSTANCE), "{{instance}} nf_conntrack_max limit")],
        "short", limits=True), w=12)
    lay.add(timeseries(
        "Ephemeral ports", "Local ports in use (host total and towards the busiest destination) against the "
        "size of ip_local_port_range (dashed); exhaustion happens per destination.",
        [target(sel(m.SYSTEM_EPHEMERAL_IN_USE, INSTANCE), "{{instance}} in use (all destinations)"),
         target(sel(m.SYSTEM_EPHEMERAL_IN_USE_MAX_DEST, INSTANCE), "{{instance}} in use (busiest destination)"),
         target(sel(m.SYSTEM_EPHEMERAL_PORTS, INSTANCE), "{{instance}} ip_local_port_range limit")],
        "short", limits=True), w=12)

    lay.row("TCP sockets and memory")
    lay.add(timeseries(
        "TIME_WAIT vs tcp_max_tw_buckets", "Sockets in TIME_WAIT against tcp_max_tw_buckets (dashed).",
        [target(sel(m.SYSTEM_TIME_WAIT, INSTANCE), "{{instance}} TIME_WAIT"),
         target(sel(m.SYSTEM_TIME_WAIT_LIMIT, INSTANCE), "{{instance}} tcp_max_tw_buckets limit")],
        "short", limits=True), w=8)
    lay.add(timeseries(
        "Orphans vs tcp_max_orphans", "Sockets no process holds any more against tcp_max_orphans (dashed). "
        "An orphan whose peer is silent counts up to 4 times against the limit, so resets start from a quarter "
        f"of it (alerts at {p.tcp_orphans_warning:.0%} and {p.tcp_orphans_critical:.0%}).",
        [target(sel(m.SYSTEM_ORPHANS, INSTANCE), "{{instance}} orphans"),
         target(sel(m.SYSTEM_ORPHANS_LIMIT, INSTANCE), "{{instance}} tcp_max_orphans limit")],
        "short", limits=True), w=8)
    lay.add(timeseries(
        "TCP memory vs tcp_mem", "Memory allocated to TCP buffers against the tcp_mem thresholds (dashed): "
        "above pressure the kernel shrinks buffers, above max it drops (alerts above pressure and at "
        f"{p.tcp_memory_max:.0%} of max).",
        [target(f"{sel(m.SYSTEM_TCP_MEMORY, INSTANCE)} * on(instance, job) group_left() "
                f"{sel(m.SYSTEM_PAGE_SIZE, INSTANCE)}", "{{instance}} TCP memory"),
         target(f"{sel(m.SYSTEM_TCP_MEMORY_LIMIT, INSTANCE)} * on(instance, job) group_left() "
                f"{sel(m.SYSTEM_PAGE_SIZE, INSTANCE)}", "{{instance}} tcp_mem {{threshold}} limit")],
        "bytes", limits=True), w=8)

    lay.row("Listen backlog")
    lay.add(stat(
        "net.core.somaxconn", "Cap on every listener's accept-queue backlog.",
        [target(sel(m.SYSTEM_SOMAXCONN, INSTANCE), "{{instance}}")], "short", graph=False), w=6)
    lay.add(stat(
        "net.ipv4.tcp_max_syn_backlog", "Cap on half-open (SYN_RECV) connections per listener.",
        [target(sel(m.SYSTEM_TCP_MAX_SYN_BACKLOG, INSTANCE), "{{instance}}")], "short", graph=False), w=6)
    lay.add(timeseries(
        "Host listen overflows and drops", "The kernel's ListenOverflows and ListenDrops counters per second.",
        [target(f"rate({sel(m.SYSTEM_LISTEN_OVERFLOWS, INSTANCE)}{RATE})", "{{instance}} ListenOverflows"),
         target(f"rate({sel(m.SYSTEM_LISTEN_DROPS, INSTANCE)}{RATE})", "{{instance}} ListenDrops")],
        "ops", thresholds=[(None, "green"), (0.001, "red")]), w=12)

    return make_dashboard(
        "connwatch-kernel", "connwatch / Kernel limits",
        "Host-wide kernel limits beside their usage: file handles, conntrack, ephemeral ports, TIME_WAIT, "
        "orphans, TCP memory and the listen backlog.",
        lay, [instance_var()])


dashboard = build()
