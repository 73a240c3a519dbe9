"""Churn soak: WebSocket connects, messages, graceful closes and abrupt
resets, and processes killed with sockets open, against real servers, with
the agent scraped every second. At the end every gauge equals the ground
truth from `ss`, the per-socket map is back to its baseline and the agent's
memory has not grown past a bound.

CI runs it for CONNWATCH_SOAK_SECONDS (default 20); `make soak` runs 600.
Both with the syscall hook (the default) and without it (`syscall_tracing:
false`, where connections are counted from the handshake).
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import subprocess
import sys
import threading
import time

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus, WebSocketException

from conftest import ROOT, ServerProcess, wait_for
from test_websocket import NODE_SERVER, PY_SERVER, Loop, Stdio

SOAK_SECONDS = float(os.environ.get("CONNWATCH_SOAK_SECONDS", "20"))
RSS_GROWTH_BOUND = 30 * 2**20
HELD_AT_END = 40


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def ss_owners(port: int) -> dict[int, int]:
    """Connected sockets accepted on the listener 127.0.0.1:port, per owning pid,
    from ss (by address too: an outbound socket elsewhere on the host may
    have the same local port number on another 127.x address)."""
    out = subprocess.run(["ss", "-Htnp", "state", "connected", "src", f"127.0.0.1:{port}"],
                         capture_output=True, text=True, check=True).stdout
    owners: dict[int, int] = {}
    for line in out.splitlines():
        for pid in set(re.findall(r"pid=(\d+)", line)):
            owners[int(pid)] = owners.get(int(pid), 0) + 1
    return owners


async def churn(ports: list[int], deadline: float, held: list, rng: random.Random, errors: list):
    async def one(port: int):
        ip = f"127.0.0.{rng.randint(2, 9)}"
        try:
            ws = await connect(f"ws://127.0.0.1:{port}/", local_addr=(ip, 0), open_timeout=10)
        except InvalidStatus:
            return  # the server's per-IP cap said 429: part of the load
        for _ in range(rng.randint(0, 3)):
            await ws.send("x" * rng.randint(1, 2000))
            await ws.recv()
        r = rng.random()
        if r < 0.3:
            ws.transport.abort()  # abrupt reset
        elif r < 0.8:
            await ws.close()
        else:
            held.append(ws)
            if len(held) > 100:
                await held.pop(rng.randrange(len(held))).close()

    while time.monotonic() < deadline:
        results = await asyncio.gather(*(one(rng.choice(ports)) for _ in range(20)), return_exceptions=True)
        errors.extend(r for r in results if isinstance(r, Exception)
                      and not isinstance(r, (WebSocketException, ConnectionError, OSError)))


@pytest.mark.timeout(SOAK_SECONDS + 300)
@pytest.mark.parametrize("syscall_tracing", [True, False], ids=["default", "no-syscall-hook"])
def test_churn_soak(start_agent, syscall_tracing):
    agent = start_agent(f"peers:\n  top_k: 5\nsyscall_tracing: {str(syscall_tracing).lower()}\n")
    baseline_socks = agent.scrape().value("connwatch_bpf_map_entries", map="socks")
    servers = [
        Stdio([sys.executable, str(PY_SERVER), "--cap", "50"]),
        Stdio(["node", str(NODE_SERVER), "50", "2"], cwd=ROOT / "tests" / "node"),
    ]
    aio = Loop()
    stop = threading.Event()
    scrape_failures: list[Exception] = []

    def scraper():
        while not stop.wait(1.0):
            try:
                agent.scrape()
            except Exception as e:  # noqa: BLE001 - recorded and asserted below
                scrape_failures.append(e)

    scrape_thread = threading.Thread(target=scraper, daemon=True)
    scrape_thread.start()
    rng = random.Random(1234)
    held: list = []
    errors: list = []
    try:
        rss_start = None
        deadline = time.monotonic() + SOAK_SECONDS
        while time.monotonic() < deadline:
            # a process that dies with accepted sockets open
            victim = ServerProcess()
            victim_clients = [__import__("socket").create_connection(("127.0.0.1", victim.ports[0]))
                              for _ in range(5)]
            victim.command("accept 5")
            round_end = min(deadline, time.monotonic() + 5)
            aio.run(churn([s.port for s in servers], round_end, held, rng, errors), timeout=120)
            victim.stop()  # SIGKILL with 5 connections open
            for c in victim_clients:
                c.close()
            if rss_start is None:
                rss_start = rss(agent.proc.pid)  # after warm-up
        assert not errors, errors[:3]

        # settle: keep HELD_AT_END WebSockets open, close the rest
        async def settle():
            while len(held) > HELD_AT_END:
                await held.pop().close()
        aio.run(settle())
        for s in servers:
            expected = ss_owners(s.port)
            def matches():
                m = agent.scrape()
                got = {int(x.labels["pid"]): int(x.value)
                       for x in m.select("connwatch_connections", port=s.port) if x.value}
                truth = ss_owners(s.port)
                return got == truth and got
            wait_for(matches, timeout=30, what=lambda: f"gauges == ss for port {s.port} ({expected})")
        assert sum(sum(ss_owners(s.port).values()) for s in servers) == len(held)
        # every WebSocket still open is counted as one
        m = agent.scrape()
        assert sum(m.value("connwatch_connections", port=s.port, kind="websocket") or 0
                   for s in servers) == len(held)

        async def close_held():
            await asyncio.gather(*(ws.close() for ws in held))
        aio.run(close_held())
        held.clear()
        agent.wait_for_value("connwatch_bpf_map_entries", baseline_socks, map="socks", timeout=60)
        assert rss(agent.proc.pid) - rss_start < RSS_GROWTH_BOUND
        assert not scrape_failures, scrape_failures[:3]
    finally:
        stop.set()
        aio.stop()
        for s in servers:
            s.stop()
