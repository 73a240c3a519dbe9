"""Bounded everything: series cardinality is capped by configuration however
many peers and processes the traffic brings, full maps are counted, and the
agent's memory stays bounded."""

from __future__ import annotations

import os
import socket

from conftest import wait_for

MAX_PROCESSES = 50
TOP_K = 5


def agent_rss_bytes(agent) -> int:
    with open(f"/proc/{agent.proc.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_50k_peers_and_2000_processes_stay_under_the_caps(start_agent):
    agent = start_agent(f"max_process_series: {MAX_PROCESSES}\npeers:\n  top_k: {TOP_K}\n"
                        "maps:\n  peers: 20000\n")
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    port = listener.getsockname()[1]

    # 50,000 distinct peers (127.1.x.y), each connected and accepted once
    for i in range(50000):
        c = socket.socket()
        c.bind((f"127.1.{i // 250}.{i % 250 + 1}", 0))
        c.connect(("127.0.0.1", port))
        s, _ = listener.accept()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        c.close()
        s.close()
    m = agent.wait_for_value("connwatch_connections_closed_total", 50000, pid=os.getpid(), port=port,
                             timeout=60)
    assert m.value("connwatch_connections_accepted_total", pid=os.getpid(), port=port) == 50000
    # closed peers' zero entries are pruned under pressure: the map stays within bounds
    assert m.value("connwatch_bpf_map_entries", map="peers") <= 20000
    assert m.value("connwatch_peers", port=port) is None  # no open connections, no peers

    # 2,000 processes, each serving one connection (a prefork server)
    children, clients = [], []
    try:
        for _ in range(2000):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # child: accept one connection, read its request, hold it until the pipe closes
                os.close(w)
                conn, _ = listener.accept()
                conn.recv(1)
                os.read(r, 1)
                os._exit(0)
            os.close(r)
            children.append((pid, w))
            clients.append(socket.create_connection(("127.0.0.1", port)))
            clients[-1].send(b"x")

        def all_counted():
            m = agent.scrape()
            total = m.value("connwatch_connections", port=port, kind="tcp") or 0
            return m if total == 2000 else None
        m = wait_for(all_counted, timeout=60, what="2000 connections counted")
        pids = {s.labels["pid"] for s in m.select("connwatch_connections")}
        assert len(pids) <= MAX_PROCESSES + 1  # the kept processes and one "other"
        other = m.select("connwatch_connections", comm="other", port=port)
        assert other and other[0].labels["pid"] == "" and other[0].value >= 2000 - MAX_PROCESSES
        # top-K peers per listening process and port: at most (kept processes + "other") x K
        per_process: dict[str, int] = {}
        for s in m.select("connwatch_peer_connections", port=port):
            per_process[s.labels["pid"]] = per_process.get(s.labels["pid"], 0) + 1
        assert max(per_process.values()) <= TOP_K and len(per_process) <= MAX_PROCESSES + 1
        series = sum(1 for s in m.samples)
        assert series < 5000, series
        assert agent_rss_bytes(agent) < 150 * 2**20
    finally:
        for pid, w in children:
            os.close(w)
        for pid, _ in children:
            os.waitpid(pid, 0)
        for c in clients:
            c.close()
    # the exited processes leave no series behind
    wait_for(lambda: not agent.scrape().select("connwatch_connections", comm="other", port=str(port)),
             timeout=60, what="the exited processes' series to disappear")
    listener.close()


def test_full_peer_map_is_counted_not_fatal(start_agent, server):
    agent = start_agent("maps:\n  peers: 100\n")
    srv = server("--backlog", "1024")
    (port,) = srv.ports
    srv.send("accept 300")
    clients = []
    for i in range(300):
        c = socket.socket()
        c.bind((f"127.2.{i // 250}.{i % 250 + 1}", 0))
        c.connect(("127.0.0.1", port))
        clients.append(c)
    assert srv.readline() == "accepted 300"
    # the map is full at 100 entries (the host's other connections may hold
    # some); each of our peers that did not fit was counted; the
    # connections themselves all were
    m = agent.wait_for_value("connwatch_connections", 300, pid=srv.pid, port=port)
    ours = m.value("connwatch_peers", port=port)
    assert m.value("connwatch_bpf_map_entries", map="peers") == 100
    assert 0 < ours <= 100
    assert m.value("connwatch_bpf_map_full_total", map="peers") >= 300 - ours
    for c in clients:
        c.close()
