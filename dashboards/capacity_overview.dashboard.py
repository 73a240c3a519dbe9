"""Capacity overview: per host, connections vs the limits that bound them."""

from dashboards import metrics as m
from dashboards.common import (INSTANCE, PORT, Layout, bargauge, events_in, make_dashboard, failure_annotations,
                               headroom_thresholds, instance_var, port_var, sel, stat, target, timeseries,
                               usage_thresholds)
from dashboards.params import DEFAULT, Params

RATE = "[$__rate_interval]"
KIND_WS = 'kind="websocket"'
NOT_101 = 'status!="101"'


def build(p: Params = DEFAULT):
    conns = sel(m.CONNECTIONS, INSTANCE, PORT)
    open_fds = sel(m.PROCESS_OPEN_FDS, INSTANCE)
    max_fds = sel(m.PROCESS_MAX_FDS, INSTANCE)
    queue = sel(m.LISTEN_QUEUE_LENGTH, INSTANCE, PORT)
    backlog = sel(m.LISTEN_BACKLOG, INSTANCE, PORT)
    fd_usage = f"{open_fds} / ({max_fds} > 0)"
    headroom = headroom_thresholds(p)

    lay = Layout()
    lay.row("Now")
    for title, desc, expr, unit, thr in [
        ("WebSocket connections", "Open WebSocket connections (HTTP 101 upgrades, or connections on "
         "websocket_ports) on the selected hosts and ports.",
         f'sum({sel(m.CONNECTIONS, INSTANCE, PORT, KIND_WS)})', "short", None),
        ("TCP connections", "All accepted, not yet closed connections (tcp, websocket and tls).",
         f"sum({conns})", "short", None),
        ("Worst process fd headroom", "Smallest share of its soft RLIMIT_NOFILE any process still has "
         "free. Each connection holds one file descriptor; at 0 % accept() fails with EMFILE.",
         f"min(1 - {fd_usage})", "percentunit", headroom),
        ("Host fd headroom (fs.file-max)", "Share of fs.file-max still free on the worst host; at 0 % "
         "every process gets ENFILE.",
         f"min(1 - {sel(m.SYSTEM_OPEN_FILES, INSTANCE)} / ({sel(m.SYSTEM_OPEN_FILES_LIMIT, INSTANCE)} > 0))",
         "percentunit", headroom),
        ("Worst accept-queue headroom", "Smallest share of its effective backlog (after the somaxconn cap) "
         "any listener still has free; at 0 % the kernel drops new connections.",
         f"min(clamp_min(1 - {queue} / ({backlog} > 0), 0))", "percentunit", headroom),
        ("Upgrades refused (1h)", "WebSocket upgrades the servers answered with a status other than "
         "101 (429 per-IP cap, 503 global cap, ...) in the last hour.",
         events_in(sel(m.WEBSOCKET_UPGRADES, INSTANCE, PORT, NOT_101), "1h"), "short",
         [(None, "green"), (1, "orange")]),
    ]:
        lay.add(stat(title, desc, [target(expr, title)], unit, thresholds=thr), w=4, h=5)

    lay.row("Connections vs limits")
    lay.add(timeseries(
        "Connections by kind", "Open connections per host and kind.",
        [target(f"sum by (instance, kind) ({conns})", "{{instance}} {{kind}}")], "short", stack=True), w=12)
    busiest = f"topk(5, sum by (instance, pid) ({conns}))"
    lay.add(timeseries(
        "Busiest processes: connections vs fd soft limit",
        "Connections of the five busiest processes, with each one's soft RLIMIT_NOFILE (dashed): the "
        "ceiling its connection count runs into.",
        [target(f"topk(5, sum by (instance, pid, comm) ({conns}))", "{{comm}} ({{pid}}) connections"),
         target(f"max by (instance, pid, comm) ({max_fds}) and on(instance, pid) {busiest}",
                "{{comm}} ({{pid}}) fd soft limit")],
        "short", limits=True), w=12)
    lay.add(timeseries(
        "Fd usage of the busiest processes",
        f"Open fds / soft RLIMIT_NOFILE. Alerts at {p.fd_usage_warning:.0%} (warning) and "
        f"{p.fd_usage_critical:.0%} (critical).",
        [target(f"topk(5, {fd_usage})", "{{comm}} ({{pid}})")], "percentunit",
        thresholds=usage_thresholds(p.fd_usage_warning, p.fd_usage_critical), max_=1), w=8)
    lay.add(timeseries(
        "Host open files vs fs.file-max", "Allocated file handles against fs.file-max (dashed).",
        [target(sel(m.SYSTEM_OPEN_FILES, INSTANCE), "{{instance}} open files"),
         target(sel(m.SYSTEM_OPEN_FILES_LIMIT, INSTANCE), "{{instance}} fs.file-max limit")],
        "short", limits=True), w=8)
    lay.add(timeseries(
        "Accept queues vs backlog and somaxconn",
        "Longest accept queue per port against its effective backlog and net.core.somaxconn (dashed).",
        [target(f"max by (instance, port) ({queue})", ":{{port}} queue"),
         target(f"max by (instance, port) ({backlog})", ":{{port}} backlog"),
         target(sel(m.SYSTEM_SOMAXCONN, INSTANCE), "{{instance}} somaxconn")],
        "short", limits=True), w=8)
    lay.add(bargauge(
        "Headroom to each limit",
        "Share of each limit still free (worst process, worst listener, busiest destination).",
        [target(f"min by (instance) (1 - {fd_usage})", "{{instance}} process fds (worst)"),
         target(f"1 - {sel(m.SYSTEM_OPEN_FILES, INSTANCE)} / ({sel(m.SYSTEM_OPEN_FILES_LIMIT, INSTANCE)} > 0)",
                "{{instance}} fs.file-max"),
         target(f"min by (instance) (clamp_min(1 - {queue} / ({backlog} > 0), 0))",
                "{{instance}} accept queue (worst)"),
         target(f"1 - {sel(m.SYSTEM_CONNTRACK_ENTRIES, INSTANCE)} / "
                f"({sel(m.SYSTEM_CONNTRACK_LIMIT, INSTANCE)} > 0)", "{{instance}} conntrack"),
         target(f"1 - {sel(m.SYSTEM_EPHEMERAL_IN_USE_MAX_DEST, INSTANCE)} / on(instance, job) group_left() "
                f"({sel(m.SYSTEM_EPHEMERAL_PORTS, INSTANCE)} > 0)", "{{instance}} ephemeral ports"),
         target(f"1 - {sel(m.SYSTEM_TIME_WAIT, INSTANCE)} / ({sel(m.SYSTEM_TIME_WAIT_LIMIT, INSTANCE)} > 0)",
                "{{instance}} TIME_WAIT buckets")],
        "percentunit", thresholds=headroom, max_=1), w=24, h=9)

    lay.row("Busiest")
    lay.add(bargauge(
        "Busiest processes", "Processes holding the most connections.",
        [target(f"topk(10, sum by (instance, pid, comm, container, pod_uid) ({conns}))",
                "{{comm}} ({{pid}}) {{container}} {{pod_uid}}", instant=True)], "short"), w=8, h=9)
    lay.add(bargauge(
        "Busiest ports", "Local ports holding the most connections.",
        [target(f"topk(10, sum by (instance, port) ({conns}))", "{{instance}} :{{port}}", instant=True)],
        "short"), w=8, h=9)
    lay.add(bargauge(
        "Busiest peers", f"Peers holding the most connections (alert above {p.peer_share:.0%} of a port).",
        [target(f"topk(10, {sel(m.PEER_CONNECTIONS, INSTANCE, PORT)})", "{{peer}} → :{{port}}", instant=True)],
        "short"), w=8, h=9)

    lay.row("Upgrades and failures")
    lay.add(timeseries(
        "WebSocket upgrade outcomes",
        "Upgrade requests per second by HTTP status: 101 accepted, 429 refused by a per-IP cap, 503 refused "
        "at the global cap.",
        [target(f"sum by (status) (rate({sel(m.WEBSOCKET_UPGRADES, INSTANCE, PORT)}{RATE}))", "HTTP {{status}}")],
        "reqps"), w=12)
    lay.add(timeseries(
        "EMFILE / ENFILE failures",
        "Syscalls failing because the process (EMFILE) or the host (ENFILE) ran out of file descriptors.",
        [target(f"sum by (instance, pid, comm, syscall, errno) "
                f"(rate({sel(m.FD_ALLOC_FAILURES, INSTANCE)}{RATE}))", "{{comm}} ({{pid}}) {{syscall}} {{errno}}")],
        "ops", thresholds=[(None, "green"), (0.001, "red")]), w=12)
    lay.add(timeseries(
        "Listen drops",
        "Connections dropped because an accept queue was full: SYNs per listener (sk_drops), handshake "
        "ACKs per port (BPF) and the host's ListenOverflows counter.",
        [target(f"sum by (instance, port) (rate({sel(m.LISTEN_DROPS, INSTANCE, PORT)}{RATE}))",
                ":{{port}} SYN drops"),
         target(f"sum by (instance, port) (rate({sel(m.LISTEN_OVERFLOW_DROPS, INSTANCE, PORT)}{RATE}))",
                ":{{port}} ACK drops"),
         target(f"rate({sel(m.SYSTEM_LISTEN_OVERFLOWS, INSTANCE)}{RATE})", "{{instance}} ListenOverflows")],
        "ops", thresholds=[(None, "green"), (0.001, "red")]), w=12)
    lay.add(timeseries(
        "Local port exhaustion (EADDRNOTAVAIL)",
        "connect()/bind() calls that found no free local port.",
        [target(f"sum by (instance, pid, comm, syscall) "
                f"(rate({sel(m.PORT_EXHAUSTION_FAILURES, INSTANCE)}{RATE}))", "{{comm}} ({{pid}}) {{syscall}}")],
        "ops", thresholds=[(None, "green"), (0.001, "red")]), w=12)

    return make_dashboard(
        "connwatch-capacity", "connwatch / Capacity overview",
        "WebSocket and TCP connections per host against the limits that bound them.",
        lay, [instance_var(), port_var()], failure_annotations())


dashboard = build()
