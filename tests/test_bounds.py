"""Bounded everything: series cardinality is capped by configuration however
many peers and processes the traffic brings, full maps are counted, and the
agent's memory stays bounded."""

from __future__ import annotations

import os
import socket

from conftest import reset, wait_for

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
        reset(c)
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


def test_listeners_past_the_cap_fold_into_their_process_port_other(start_agent):
    """max_listener_series: the host's `cap` most urgent listeners keep their
    own series, ours with the fullest accept queue among them however late
    it ranks by port (the host's other listeners compete for the rest: one
    that dropped ranks above our idle ones); the rest of ours add up under
    our port="other", and the totals equal the kernel's."""
    cap, n = 5, 40
    agent = start_agent(f"max_listener_series: {cap}\n")
    me = str(os.getpid())
    listeners, clients = [], []
    try:
        for i in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            s.listen(10 + i)  # backlogs 10 .. 49: their sum is the ground truth
            listeners.append(s)
        full = listeners[-1]
        full_port = full.getsockname()[1]
        for _ in range(3):  # never accepted: 3 in the queue of the last listener
            c = socket.create_connection(full.getsockname())
            clients.append(c)

        def folded():
            m = agent.scrape()
            if m.value("connwatch_listen_queue_length", pid=me, port=full_port) != 3:
                return None
            return m if m.value("connwatch_listen_backlog", pid=me) == sum(range(10, 10 + n)) else None

        m = wait_for(folded, 20, what="the full listener under its own port, every backlog counted")
        for name in ("connwatch_listen_queue_length", "connwatch_listen_backlog", "connwatch_listen_drops_total",
                     "connwatch_listen_somaxconn"):
            own_series = [(s.labels["pid"], s.labels["port"]) for s in m.select(name) if s.labels["port"] != "other"]
            assert len(own_series) == cap, (name, own_series)
            ports = [s.labels["port"] for s in m.select(name, pid=me)]
            assert ports.count("other") == 1, (name, ports)
        own = {int(s.labels["port"]) for s in m.select("connwatch_listen_backlog", pid=me) if s.labels["port"] != "other"}
        assert full_port in own
        ports = {s.getsockname()[1]: 10 + i for i, s in enumerate(listeners)}
        other = m.value("connwatch_listen_backlog", pid=me, port="other")
        assert other == sum(b for p, b in ports.items() if p not in own)
        assert m.value("connwatch_listen_queue_length", pid=me, port="other") == 0
        somaxconn = int(open("/proc/sys/net/core/somaxconn").read())
        assert m.value("connwatch_listen_somaxconn", pid=me, port="other") == somaxconn
    finally:
        for s in clients + listeners:
            s.close()
