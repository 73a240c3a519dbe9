"""Listeners in every network namespace: accept-queue length, effective and
requested backlog, and the listener's own drop counter (sk_drops)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from conftest import ROOT, wait_for

SERVERS = ROOT / "tests" / "servers"


def in_netns(netns: str, *argv: str) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, *argv],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)


def netstat(netns: str) -> dict[str, int]:
    """TcpExt counters of a namespace, from its /proc/net/netstat."""
    text = subprocess.run(["ip", "netns", "exec", netns, "cat", "/proc/net/netstat"],
                          capture_output=True, text=True, check=True).stdout.splitlines()
    names, values = text[0].split()[1:], text[1].split()[1:]
    return dict(zip(names, map(int, values)))


def test_queue_length_in_another_namespace(hooked_agent, netns):
    agent = hooked_agent
    server = in_netns(netns, str(SERVERS / "hold_server.py"), "--backlog", "64")
    clients = None
    try:
        port = int(server.stdout.readline().split()[1])
        clients = in_netns(netns, str(SERVERS / "hold_clients.py"), "127.0.0.1", str(port), "10")
        assert clients.stdout.readline().strip() == "connected 10"
        # nobody accepts: all 10 wait in the queue of a listener the host's ss cannot see
        m = agent.wait_for_value("connwatch_listen_queue_length", 10, pid=server.pid, port=port)
        assert m.value("connwatch_listen_backlog", pid=server.pid, port=port) == 64
        assert m.value("connwatch_listen_backlog_requested", pid=server.pid, port=port) == 64
        server.stdin.write("accept 4\n")
        server.stdin.flush()
        assert server.stdout.readline().strip() == "accepted 4"
        agent.wait_for_value("connwatch_listen_queue_length", 6, pid=server.pid, port=port)
        agent.wait_for_value("connwatch_connections", 4, pid=server.pid, port=port, kind="tcp")
    finally:
        for p in (clients, server):
            if p:
                p.kill()
                p.wait()


def test_requested_backlog_beside_the_somaxconn_cap(hooked_agent):
    agent = hooked_agent
    somaxconn = int(open("/proc/sys/net/core/somaxconn").read())
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(65535)
    port = s.getsockname()[1]
    m = agent.wait_for_value("connwatch_listen_backlog_requested", 65535, pid=os.getpid(), port=port)
    assert m.value("connwatch_listen_backlog", pid=os.getpid(), port=port) == min(65535, somaxconn)
    s.close()
    wait_for(lambda: not agent.scrape().select("connwatch_listen_backlog", pid=str(os.getpid()), port=str(port)),
             what="the closed listener to disappear")


def test_listener_drops_equal_the_namespace_listen_drops(agent, netns):
    """A listener with backlog 2 that never accepts, flooded from its own
    namespace: its sk_drops equals the namespace's ListenDrops delta."""
    before = netstat(netns)["ListenDrops"]
    server = in_netns(netns, str(SERVERS / "hold_server.py"), "--backlog", "2")
    clients = None
    try:
        port = int(server.stdout.readline().split()[1])
        clients = in_netns(netns, str(SERVERS / "hold_clients.py"), "127.0.0.1", str(port), "40",
                           "--nonblocking")
        assert clients.stdout.readline().strip() == "connected 40"
        delta = wait_for(lambda: netstat(netns)["ListenDrops"] - before, what="ListenDrops to rise")
        # SYN retransmits keep adding drops: compare one scrape with the kernel around it
        def equal():
            lo = netstat(netns)["ListenDrops"] - before
            got = agent.scrape().value("connwatch_listen_drops_total", pid=server.pid, port=port)
            hi = netstat(netns)["ListenDrops"] - before
            return got is not None and lo == hi == got
        wait_for(equal, timeout=30, what="connwatch_listen_drops_total == ListenDrops delta")
        assert delta > 0
    finally:
        for p in (clients, server):
            if p:
                p.kill()
                p.wait()


def test_listener_in_a_namespace_made_after_start_up_is_in_the_next_snapshot(start_agent):
    """No periodic walk finds listeners: one created after start-up, in a
    network namespace made after start-up with its own somaxconn, is in the
    first snapshot that began after its listen() (refreshes 1 s apart)."""
    import time

    from conftest import network_namespace

    agent = start_agent("refresh_interval_seconds: 1\n")
    with network_namespace() as ns:
        subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.core.somaxconn=1000"], check=True)
        server = in_netns(ns, str(SERVERS / "hold_server.py"), "--backlog", "32")
        try:
            port = int(server.stdout.readline().split()[1])  # printed after listen()
            listened = time.time()
            m = agent.scrape_after(listened)
            began = m.value("connwatch_snapshot_timestamp_seconds") - m.value("connwatch_snapshot_duration_seconds")
            if m.value("connwatch_listen_backlog", pid=server.pid, port=port) is None:
                # that snapshot was already under way at listen(): the next one must have it
                assert began <= listened
                m = agent.scrape_after(m.value("connwatch_snapshot_timestamp_seconds"))
            assert m.value("connwatch_listen_backlog", pid=server.pid, port=port) == 32
            assert m.value("connwatch_listen_somaxconn", pid=server.pid, port=port) == 1000
        finally:
            server.kill()
            server.wait()
