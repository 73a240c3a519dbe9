"""WebSocket awareness against real servers and clients: Python `websockets`
and Node `ws` (single process and cluster round-robin), each capping
connections per client IP and answering 429 over the cap."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import urllib.request

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from conftest import ROOT, deadline, wait_for

NODE_SERVER = ROOT / "tests" / "node" / "ws_server.js"
PY_SERVER = ROOT / "tests" / "servers" / "ws_server.py"
# clients per source address: with a cap of 3, .2 gets 3 of 5, .3 gets 2, .4 gets 1
PLAN = {"127.0.0.2": 5, "127.0.0.3": 2, "127.0.0.4": 1}
CAP = 3
ACCEPTED = {ip: min(n, CAP) for ip, n in PLAN.items()}
REJECTED = sum(n - ACCEPTED[ip] for ip, n in PLAN.items())


class Loop:
    """An asyncio loop in a thread, so WebSockets stay open while the test asserts."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout=60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(deadline(timeout))

    def stop(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def aio():
    loop = Loop()
    yield loop
    loop.stop()


async def open_clients(port: int, plan: dict[str, int]):
    """Open plan[ip] WebSockets from each source ip; return (open, refused statuses)."""
    opened, refused = [], []
    for ip, n in plan.items():
        for _ in range(n):
            try:
                ws = await connect(f"ws://127.0.0.1:{port}/", local_addr=(ip, 0),
                                   open_timeout=deadline(10))
                await ws.send("hello")
                assert await ws.recv() == "hello"
                opened.append(ws)
            except InvalidStatus as e:
                refused.append(e.response.status_code)
    return opened, refused


async def close_all(sockets):
    await asyncio.gather(*(ws.close() for ws in sockets))


class Stdio:
    def __init__(self, argv, cwd=None):
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     bufsize=1, cwd=cwd)
        ready = self.proc.stdout.readline().split()
        assert ready and ready[0] == "ready", ready
        self.port = int(ready[1])
        self.pids = [int(p) for p in ready[2:]] or [self.proc.pid]

    def ask(self, line: str):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def stop(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def ws_count(agent, pid, port):
    return agent.scrape().value("connwatch_connections", pid=pid, port=port, kind="websocket") or 0


def test_python_websockets_server(start_agent, aio):
    agent = start_agent("peers:\n  top_k: 2\n")
    srv = Stdio([sys.executable, str(PY_SERVER), "--cap", str(CAP)])
    pid, port = srv.pids[0], srv.port
    try:
        opened, refused = aio.run(open_clients(port, PLAN))
        assert len(opened) == sum(ACCEPTED.values()) and refused == [429] * REJECTED
        # a plain HTTP request and a raw TCP connection are not WebSockets
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=deadline(5))
        raw = socket.create_connection(("127.0.0.1", port))
        raw.sendall(b"hello, not http\r\n\r\n")

        m = agent.wait_for_value("connwatch_connections", len(opened), pid=pid, port=port, kind="websocket")
        assert m.value("connwatch_websocket_upgrades_total", pid=pid, port=port, status=101) == len(opened)
        assert m.value("connwatch_websocket_upgrades_total", pid=pid, port=port, status=429) == REJECTED
        assert srv.ask("stats") == {"open": len(opened), "accepted": len(opened), "rejected": REJECTED}
        # the raw connection is still open and counted as tcp
        wait_for(lambda: agent.scrape().value("connwatch_connections", pid=pid, port=port, kind="tcp") == 1,
                 what="the raw TCP connection counted as tcp")

        # per-peer view: top-2 of 4 peers (3 WebSocket sources + the raw client)
        m = agent.scrape()
        assert m.value("connwatch_peers", port=port) == 4
        assert m.value("connwatch_peer_connections_max", port=port) == 3
        top = {s.labels["peer"]: s.value for s in m.select("connwatch_peer_connections", port=port)}
        assert top == {"127.0.0.2": 3, "127.0.0.3": 2}

        closed_before = (m.value("connwatch_connection_duration_seconds_count", port=port, kind="websocket")
                         or 0)
        aio.run(close_all(opened))
        raw.close()
        m = agent.wait_for_value("connwatch_connection_duration_seconds_count", closed_before + len(opened),
                                 port=port, kind="websocket")
        # refused upgrades, the HTTP request and the raw connection closed as tcp
        agent.wait_for_value("connwatch_connection_duration_seconds_count", REJECTED + 2, port=port, kind="tcp")
        m = agent.wait_for_value("connwatch_connections", 0, pid=pid, port=port)
        buckets = m.select("connwatch_connection_duration_seconds_bucket", port=port, kind="websocket")
        assert buckets[-1].labels["le"] == "+Inf" and buckets[-1].value == len(opened)
    finally:
        srv.stop()


@pytest.mark.parametrize("workers", [0, 2], ids=["single", "cluster2"])
def test_node_ws_server(agent, aio, workers):
    srv = Stdio(["node", str(NODE_SERVER), str(CAP), str(workers)], cwd=ROOT / "tests" / "node")
    port = srv.port
    try:
        opened, refused = aio.run(open_clients(port, PLAN))
        stats = {int(k): v for k, v in srv.ask("stats").items()}
        assert sum(s["accepted"] for s in stats.values()) == len(opened)
        assert sum(s["rejected"] for s in stats.values()) == len(refused)
        assert set(refused) <= {429}
        # every serving process (the workers, in cluster mode) owns exactly its WebSockets
        for pid, st in stats.items():
            agent.wait_for_value("connwatch_connections", st["open"], pid=pid, port=port, kind="websocket")
            agent.wait_for_value("connwatch_websocket_upgrades_total", st["accepted"], pid=pid, port=port,
                                 status=101)
            if st["rejected"]:
                agent.wait_for_value("connwatch_websocket_upgrades_total", st["rejected"], pid=pid,
                                     port=port, status=429)
        if workers:
            # the primary accepted every socket but serves none
            assert not agent.scrape().value("connwatch_connections", pid=srv.proc.pid, port=port,
                                            kind="websocket")
        aio.run(close_all(opened))
        for pid in stats:
            agent.wait_for_value("connwatch_connections", 0, pid=pid, port=port, kind="websocket")
    finally:
        srv.stop()


@pytest.mark.parametrize("peers_config, expected_label", [
    ("ipv4_prefix: 24", "127.0.0.0/24"),
    ("ipv4_prefix: 24\n  hash: true\n  hash_key: test-key", None),
], ids=["prefix", "hashed"])
def test_peer_labels_aggregated_or_hashed(start_agent, server, peers_config, expected_label):
    agent = start_agent(f"peers:\n  {peers_config}\n")
    srv = server()
    (port,) = srv.ports
    clients = []
    for ip in ("127.0.0.2", "127.0.0.3", "127.0.0.3"):
        c = socket.socket()
        c.bind((ip, 0))
        c.connect(("127.0.0.1", port))
        clients.append(c)
    srv.command("accept 3")
    m = agent.wait_for_value("connwatch_peer_connections_max", 3, port=port)
    (series,) = m.select("connwatch_peer_connections", port=port)
    assert series.value == 3 and m.value("connwatch_peers", port=port) == 1
    label = series.labels["peer"]
    if expected_label:
        assert label == expected_label
    else:  # a keyed hash of the /24: no address in the label
        assert len(label) == 16 and "127" not in label and int(label, 16) >= 0
    for c in clients:
        c.close()


def test_tls_is_recognised_and_hinted_ports_count_as_websocket(start_agent, aio, tmp_path):
    """wss terminated in the application is ciphertext at the syscall layer:
    a ClientHello makes kind="tls", unless the port is listed in
    websocket_ports, where every connection counts as a WebSocket."""
    import ssl
    from conftest import free_port

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
                    "-days", "1", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    hinted = free_port()
    agent = start_agent(f"websocket_ports: [{hinted}]\n")
    servers = [Stdio([sys.executable, str(PY_SERVER), "--cap", "10", "--port", str(port),
                      "--cert", str(cert), "--key", str(key)]) for port in (hinted, 0)]
    client_tls = ssl.create_default_context(cafile=str(cert))
    try:
        async def open_wss(port, n):
            return [await connect(f"wss://localhost:{port}/", ssl=client_tls, open_timeout=deadline(10))
                    for _ in range(n)]
        held = aio.run(open_wss(servers[0].port, 3)) + aio.run(open_wss(servers[1].port, 2))
        hint_pid, tls_pid = servers[0].pids[0], servers[1].pids[0]
        m = agent.wait_for_value("connwatch_connections", 3, pid=hint_pid, port=hinted, kind="websocket")
        assert m.value("connwatch_connections", pid=hint_pid, port=hinted, kind="tls") in (None, 0)
        m = agent.wait_for_value("connwatch_connections", 2, pid=tls_pid, port=servers[1].port, kind="tls")
        assert m.value("connwatch_connections", pid=tls_pid, port=servers[1].port, kind="websocket") in (None, 0)

        async def close(sockets):
            await asyncio.gather(*(ws.close() for ws in sockets))
        aio.run(close(held))
    finally:
        for srv in servers:
            srv.stop()
