"""A probe the running kernel cannot serve is reported off; the rest work.

The agent is limited to tracepoints, the syscall hook and iterators (as on
a kernel without fentry and kprobes). Two tracepoints are younger than the
support floor: the send/recv length tracepoints that classify WebSocket and
TLS connections (v6.3) and the kfree_skb drop reason that names an
accept-queue overflow (SKB_DROP_REASON_TCP_LISTEN_OVERFLOW, v6.15).
On a kernel older than either (Debian's 5.10 and 6.1 in make test-kernels)
that probe must be off, say why once, and take only its own metrics with
it: connection counts stay exact. On newer kernels (this host) the same run
shows every probe on its tracepoint.
"""

from __future__ import annotations

import socket

from conftest import close_ends_the_server_closed
from connwatch.probes import kernel_version
from test_core import connect_many

TRACEPOINTS_ONLY = "attach_kinds: [tracepoint, syscall_hook, iterator]\n"

# the kernel version each tracepoint-fed probe needs, and what names the
# missing feature in the log (before 5.17 kfree_skb has no reason at all)
NEEDS = {
    "classification": ((6, 3), ("sock_send_length",)),
    "overflow_drops": ((6, 15), ("SKB_DROP_REASON_TCP_LISTEN_OVERFLOW", "tracepoint kfree_skb has 2 arguments")),
}


def test_probes_younger_than_the_kernel_are_off_and_the_rest_count_exactly(start_agent, server):
    agent = start_agent(TRACEPOINTS_ONLY)
    m = agent.scrape()
    enabled = {s.labels["probe"]: s.value for s in m.select("connwatch_probe_enabled")}
    via = {s.labels["probe"]: s.labels["via"] for s in m.select("connwatch_probe_info")}
    expected_off = {probe for probe, (since, _) in NEEDS.items() if kernel_version() < since}

    assert {probe for probe, on in enabled.items() if not on} == expected_off, enabled
    assert set(via) == set(enabled) - expected_off
    assert set(via.values()) <= {"tracepoint", "syscall_hook", "iterator"}, via
    log = agent.log_path.read_text()
    for probe in expected_off:
        lines = [line for line in log.splitlines() if f"probe {probe} off" in line]
        assert len(lines) == 1, lines
        assert any(needle in lines[0] for needle in NEEDS[probe][1]), lines[0]

    srv = server()
    (port,) = srv.ports
    clients = connect_many("127.0.0.1", port, 12)
    assert srv.command("accept 12") == "accepted 12"
    m = agent.wait_for_value("connwatch_connections", 12, pid=srv.pid, port=port)
    assert m.value("connwatch_connections_accepted_total", pid=srv.pid, port=port) == 12
    if "classification" in expected_off:
        assert not m.select("connwatch_websocket_upgrades_total")
    if "overflow_drops" in expected_off:
        assert not m.select("connwatch_listen_overflow_drops_total")
    assert srv.command("close 12") == "closed 12"
    clients = close_ends_the_server_closed(clients, 12)
    agent.wait_for_value("connwatch_connections_closed_total", 12, pid=srv.pid, port=port)
    assert agent.scrape().value("connwatch_connections", pid=srv.pid, port=port) == 0
    for c in clients:
        c.close()
