"""Process detail: one process's connections, fds, accept queue, durations and peers."""

from dashboards import metrics as m
from dashboards.common import (COMM, INSTANCE, PID, PORT, Layout, bargauge, comm_var, make_dashboard,
                               failure_annotations, heatmap, instance_var, pid_var, port_var, sel, stat,
                               target, timeseries, usage_thresholds)
from dashboards.params import DEFAULT, Params

RATE = "[$__rate_interval]"
KIND_WS = 'kind="websocket"'


def build(p: Params = DEFAULT):
    proc = (INSTANCE, COMM, PID)
    conns = sel(m.CONNECTIONS, *proc, PORT)
    open_fds = sel(m.PROCESS_OPEN_FDS, *proc)
    max_fds = sel(m.PROCESS_MAX_FDS, *proc)
    fd_usage = f"{open_fds} / ({max_fds} > 0)"
    usage = usage_thresholds(p.fd_usage_warning, p.fd_usage_critical)
    duration = sel(m.CONNECTION_DURATION_BUCKET, INSTANCE, PORT)

    lay = Layout()
    lay.row("Process")
    for title, desc, expr, unit, thr in [
        ("Connections", "Open connections of the selected process on the selected ports.",
         f"sum({conns})", "short", None),
        ("WebSocket connections", "Open WebSocket connections of the selected process.",
         f"sum({sel(m.CONNECTIONS, *proc, PORT, KIND_WS)})", "short", None),
        ("Open fds", "File descriptors the process holds (sockets, files, pipes, ...).",
         f"sum({open_fds})", "short", None),
        ("Fd soft limit", "The process's soft RLIMIT_NOFILE: EMFILE beyond this many fds.",
         f"max({max_fds})", "short", None),
        ("Fd usage now", f"Open fds / soft limit; alerts at {p.fd_usage_warning:.0%} and {p.fd_usage_critical:.0%}.",
         f"max({fd_usage})", "percentunit", usage),
        ("Fd allocation failures (total)", "EMFILE/ENFILE failures of this process since the agent started.",
         f"sum({sel(m.FD_ALLOC_FAILURES, *proc)})", "short", [(None, "green"), (1, "red")]),
    ]:
        lay.add(stat(title, desc, [target(expr, title)], unit, thresholds=thr), w=4, h=5)

    lay.row("Connections and file descriptors")
    lay.add(timeseries(
        "Connections by port and kind", "Open connections of the process per local port and kind.",
        [target(f"sum by (pid, port, kind) ({conns})", "{{pid}} :{{port}} {{kind}}")], "short", stack=True), w=8)
    lay.add(timeseries(
        "CLOSE_WAIT by port",
        "Of those, connections the peer has closed and the process has not (CLOSE_WAIT). A healthy server "
        "closes within milliseconds, so this stays near 0; a line that only climbs is a missing close(), one "
        f"fd lost per departed client (the alert: {p.close_wait_min_connections} or more in the process, not "
        f"falling over {p.close_wait_window}).",
        [target(f"sum by (pid, port) ({sel(m.CONNECTIONS_CLOSE_WAIT, *proc, PORT)})", "{{pid}} :{{port}}")],
        "short", thresholds=[(None, "green"), (p.close_wait_min_connections, "orange")]), w=8)
    lay.add(timeseries(
        "Accepted and closed per second", "Connection churn per local port.",
        [target(f"sum by (port) (rate({sel(m.ACCEPTED, *proc, PORT)}{RATE}))", "accepted :{{port}}"),
         target(f"sum by (port) (rate({sel(m.CLOSED, *proc, PORT)}{RATE}))", "closed :{{port}}")],
        "cps"), w=8)
    lay.add(timeseries(
        "File descriptors vs soft limit", "Open fds against the soft RLIMIT_NOFILE (dashed).",
        [target(f"sum by (pid, comm) ({open_fds})", "{{comm}} ({{pid}}) open fds"),
         target(f"max by (pid, comm) ({max_fds})", "{{comm}} ({{pid}}) fd soft limit")],
        "short", limits=True), w=12)
    lay.add(timeseries(
        "Fd usage", "Open fds as a share of the soft limit, with the alert thresholds.",
        [target(fd_usage, "{{comm}} ({{pid}})")], "percentunit", thresholds=usage, max_=1), w=6)
    lay.add(timeseries(
        "Fd allocation failures", "EMFILE/ENFILE failures per second by syscall.",
        [target(f"sum by (syscall, errno) (rate({sel(m.FD_ALLOC_FAILURES, *proc)}{RATE}))",
                "{{syscall}} {{errno}}")], "ops", thresholds=[(None, "green"), (0.001, "red")]), w=6)

    lay.row("Accept queue")
    lay.add(timeseries(
        "Accept queue vs effective backlog",
        "Connections waiting for accept() against the listener's effective backlog (dashed).",
        [target(sel(m.LISTEN_QUEUE_LENGTH, *proc, PORT), ":{{port}} queue"),
         target(sel(m.LISTEN_BACKLOG, *proc, PORT), ":{{port}} effective backlog")],
        "short", limits=True), w=8)
    lay.add(bargauge(
        "Requested vs effective backlog",
        "What the application passed to listen() against what the kernel granted (capped at "
        "net.core.somaxconn).",
        [target(f"max by (port) ({sel(m.LISTEN_BACKLOG_REQUESTED, *proc, PORT)})", ":{{port}} requested",
                instant=True),
         target(f"max by (port) ({sel(m.LISTEN_BACKLOG, *proc, PORT)})", ":{{port}} effective", instant=True),
         target(f"max({sel(m.SYSTEM_SOMAXCONN, INSTANCE)})", "net.core.somaxconn", instant=True)],
        "short"), w=8)
    lay.add(timeseries(
        "Listen drops", "SYNs dropped on a full queue (per listener) and handshake ACKs dropped (per port).",
        [target(f"sum by (port) (rate({sel(m.LISTEN_DROPS, *proc, PORT)}{RATE}))", ":{{port}} SYN drops"),
         target(f"sum by (port) (rate({sel(m.LISTEN_OVERFLOW_DROPS, INSTANCE, PORT)}{RATE}))",
                ":{{port}} ACK drops")],
        "ops", thresholds=[(None, "green"), (0.001, "red")]), w=8)

    lay.row("WebSocket")
    lay.add(timeseries(
        "Upgrade outcomes", "Upgrade requests per second by HTTP status (101 accepted; 429/503 refused).",
        [target(f"sum by (port, status) (rate({sel(m.WEBSOCKET_UPGRADES, *proc, PORT)}{RATE}))",
                ":{{port}} HTTP {{status}}")], "reqps"), w=12)
    lay.add(heatmap(
        "Connection duration",
        "How long connections on the selected ports lived, by kernel-side log2 bucket, counted at close.",
        [target(f"sum by (le) (increase({duration}{RATE}))", "{{le}}", fmt="heatmap")], "s"), w=12)
    lay.add(timeseries(
        "Connection duration quantiles", "Median and 99th percentile lifetime of closed connections.",
        [target(f"histogram_quantile(0.5, sum by (le, port) (rate({duration}{RATE})))", "p50 :{{port}}"),
         target(f"histogram_quantile(0.99, sum by (le, port) (rate({duration}{RATE})))", "p99 :{{port}}")],
        "s"), w=8)
    lay.add(bargauge(
        "Top peers", f"Peers with the most connections on the selected ports (alert above "
        f"{p.peer_share:.0%} of a port's connections).",
        [target(f"topk(10, {sel(m.PEER_CONNECTIONS, INSTANCE, PORT)})", "{{peer}} → :{{port}}", instant=True)],
        "short"), w=8)
    lay.add(timeseries(
        "Peers", "Distinct peers per port and the connections of the busiest one.",
        [target(sel(m.PEERS, INSTANCE, PORT), ":{{port}} distinct peers"),
         target(sel(m.PEER_CONNECTIONS_MAX, INSTANCE, PORT), ":{{port}} busiest peer's connections")],
        "short"), w=8)

    return make_dashboard(
        "connwatch-process", "connwatch / Process detail",
        "One process: connections, fd usage vs limit, accept queue vs backlog, durations and peers.",
        lay, [instance_var(), comm_var(), pid_var(), port_var(COMM, PID)],
        failure_annotations(proc=(COMM, PID)))


dashboard = build()
