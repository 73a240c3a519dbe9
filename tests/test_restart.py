"""Correct after a restart: connections and listeners that exist when the agent
starts are counted on its first scrape (seeded from every process's fd table
by BPF iterators), and nothing of a previous run is left behind."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

from conftest import close_ends_the_server_closed


def connect_accepted(srv, port: int, n: int) -> list[socket.socket]:
    """n connections the server has accepted (it accepts while we connect)."""
    srv.send(f"accept {n}")
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
    assert srv.readline() == f"accepted {n}"
    return clients


def test_counts_exact_on_first_scrape_across_restarts(start_agent, server):
    srv = server("--backlog", "4096")
    (port,) = srv.ports
    pid = srv.pid
    clients = connect_accepted(srv, port, 5000)
    # a decoy: an outbound connection from 127.0.0.5 that uses the listener's
    # port number as its local port; it was not accepted on that listener
    other = server()
    decoy = socket.socket()
    decoy.bind(("127.0.0.5", port))
    decoy.connect(("127.0.0.1", other.ports[0]))
    assert other.command("accept 1") == "accepted 1"

    first = start_agent()
    m = first.scrape()
    assert m.value("connwatch_connections", pid=pid, port=port, kind="tcp") == 5000
    assert m.value("connwatch_connections", pid=other.pid, port=other.ports[0]) == 1
    assert m.value("connwatch_connections", port=port) == 5000
    assert m.value("connwatch_listen_backlog", pid=pid, port=port) == 4096
    # a listener found at start-up has no known listen() argument
    assert m.value("connwatch_listen_backlog_requested", pid=pid, port=port) is None
    assert m.value("connwatch_peer_connections", port=port, peer="127.0.0.1") == 5000
    # seeded connections were not accepted while we watched
    assert m.value("connwatch_connections_accepted_total", pid=pid, port=port) == 0
    first.stop()

    # while no agent runs: half close, others open
    assert srv.command("close 2500") == "closed 2500"
    for c in clients[-2500:]:
        c.close()
    del clients[-2500:]
    clients += connect_accepted(srv, port, 1000)

    second = start_agent()
    m = second.scrape()
    assert m.value("connwatch_connections", pid=pid, port=port, kind="tcp") == 3500
    assert m.value("connwatch_peer_connections", port=port, peer="127.0.0.1") == 3500
    # and it keeps counting from there
    assert srv.command("close 500") == "closed 500"
    clients = close_ends_the_server_closed(clients, 500)
    second.wait_for_value("connwatch_connections", 3000, pid=pid, port=port)
    m = second.wait_for_value("connwatch_connections_closed_total", 500, pid=pid, port=port)
    # closing a seeded connection records no duration: its age is unknown
    assert not m.value("connwatch_connection_duration_seconds_count", port=port, kind="tcp")
    for c in clients + [decoy]:
        c.close()


def test_reused_pid_does_not_inherit_a_dead_process_counts(agent, server):
    """Process A accepts on a port and dies; process B is then given A's pid
    (via /proc/sys/kernel/ns_last_pid, as CRIU does) and accepts on the same
    port. B's series must show only B's connections."""
    first = server()
    (port,) = first.ports
    clients = connect_accepted(first, port, 5)
    agent.wait_for_value("connwatch_connections_accepted_total", 5, pid=first.pid, port=port)
    for c in clients:
        c.close()
    first.stop()
    reused_pid = first.pid

    second = None
    for _ in range(50):  # another process may take the pid first: retry
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(reused_pid - 1))
        candidate = subprocess.Popen(
            [sys.executable, "-c", "import socket, sys\n"
             f"l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
             f"l.bind(('127.0.0.1', {port})); l.listen(8)\n"
             "print('ready', flush=True)\n"
             "held = [l.accept()[0] for _ in range(2)]\n"
             "print('accepted', flush=True); sys.stdin.read()\n"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if candidate.pid == reused_pid:
            second = candidate
            break
        candidate.kill()
        candidate.wait()
        time.sleep(0.01)
    assert second is not None, "could not get the pid reused"
    try:
        assert second.stdout.readline().strip() == "ready"
        new_clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        assert second.stdout.readline().strip() == "accepted"
        m = agent.wait_for_value("connwatch_connections", 2, pid=reused_pid, port=port)
        assert m.value("connwatch_connections_accepted_total", pid=reused_pid, port=port) == 2
        for c in new_clients:
            c.close()
    finally:
        second.kill()
        second.wait()
