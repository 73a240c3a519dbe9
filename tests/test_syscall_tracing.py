"""`syscall_tracing: false`: no syscall hook, so no syscall on the host pays
the tracing slow path; connections are then counted from their handshake
and owned by the process that holds or first uses them. The default (with
the hook) is covered by every other test; here what differs."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

from conftest import wait_for
from test_core import connect_many

NO_SYSCALLS = "syscall_tracing: false\n"


def reset(c: socket.socket) -> None:
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()


def attached_programs(pid: int) -> set[str]:
    """Names of the BPF programs behind the links a process holds (from its
    fds' fdinfo: this bpftool does not list link owners)."""
    progs = json.loads(subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True,
                                      text=True, check=True).stdout)
    names = {p["id"]: p.get("name", "") for p in progs}
    held = set()
    for info in Path(f"/proc/{pid}/fdinfo").iterdir():
        fields = dict(line.split(":", 1) for line in info.read_text().splitlines() if ":" in line)
        if "link_type" in fields and "prog_id" in fields:
            held.add(names.get(int(fields["prog_id"]), ""))
    return held


def wait_listener_seen(agent, pid: int, port: int) -> None:
    wait_for(lambda: agent.scrape().value("connwatch_listen_backlog", pid=pid, port=port),
             what=f"listener {pid}:{port} in the metrics")


def test_without_syscall_tracing_queued_connections_count_for_the_listener(start_agent, server):
    """Counted from the handshake: a connection waiting in the accept queue
    already counts, under the listener's owner; its accept is counted when a
    process claims it (here: the refresh walk finds it in the fd table)."""
    agent = start_agent(NO_SYSCALLS)
    srv = server()
    (port,) = srv.ports
    wait_listener_seen(agent, srv.pid, port)
    clients = connect_many("127.0.0.1", port, 6)
    # not accepted yet: in the accept queue, counted for the listener's owner
    m = agent.wait_for_value("connwatch_connections", 6, pid=srv.pid, port=port)
    assert not m.value("connwatch_connections_accepted_total", pid=srv.pid, port=port)
    # reset while queued: gone, and counted as accepted and closed (the handshake completed)
    reset(clients.pop())
    m = agent.wait_for_value("connwatch_connections", 5, pid=srv.pid, port=port)
    assert m.value("connwatch_connections_closed_total", pid=srv.pid, port=port) == 1
    assert m.value("connwatch_connections_accepted_total", pid=srv.pid, port=port) == 1
    assert srv.command("accept 5") == "accepted 5"
    m = agent.wait_for_value("connwatch_connections_accepted_total", 6, pid=srv.pid, port=port)
    assert m.value("connwatch_connections", pid=srv.pid, port=port) == 5
    for c in clients:
        c.close()


def test_without_syscall_tracing_connections_are_still_counted(start_agent, server):
    before = server()  # a listener the start-up walk finds
    agent = start_agent(NO_SYSCALLS)
    assert "cw_sys_exit" not in attached_programs(agent.proc.pid)
    assert {"cw_sock_state", "cw_sock_recv"} <= attached_programs(agent.proc.pid)
    m = agent.scrape()
    # switched off by configuration: not a disabled probe (which would alert)
    assert not m.select("connwatch_probe_enabled", probe="sys_exit")
    assert m.value("connwatch_probe_enabled", probe="inet_sock_set_state") == 1

    # a listener that existed at start-up: counted from the handshake, under its owner
    (p0,) = before.ports
    held0 = connect_many("127.0.0.1", p0, 4)
    assert before.command("accept 4") == "accepted 4"
    m = agent.wait_for_value("connwatch_connections", 4, pid=before.pid, port=p0)
    agent.wait_for_value("connwatch_connections_accepted_total", 4, pid=before.pid, port=p0)

    # a listener opened after start-up: no listen() event; the refresh walk finds it
    srv = server()
    (port,) = srv.ports
    wait_listener_seen(agent, srv.pid, port)
    held = connect_many("127.0.0.1", port, 30)
    assert srv.command("accept 30") == "accepted 30"
    m = agent.wait_for_value("connwatch_connections", 30, pid=srv.pid, port=port, kind="tcp")
    agent.wait_for_value("connwatch_connections_accepted_total", 30, pid=srv.pid, port=port)
    assert m.value("connwatch_peer_connections", port=port, peer="127.0.0.1") == 30
    # what needs the syscall hook is absent, not zero (another server: its
    # EMFILE exercise leaves a connection in its accept queue)
    failing = server("--backlog", "77")
    wait_listener_seen(agent, failing.pid, failing.ports[0])
    assert failing.command("emfile").startswith("emfile ")
    m = agent.scrape_after(time.time() + 0.2)  # two refreshes after the EMFILEs
    assert not m.select("connwatch_fd_alloc_failures_total")
    assert m.value("connwatch_listen_backlog_requested", pid=failing.pid) is None

    for c in held[:10]:
        c.close()
    assert srv.command("close 30") == "closed 30"
    for c in held[10:]:
        c.close()
    agent.wait_for_value("connwatch_connections", 0, pid=srv.pid, port=port)
    m = agent.wait_for_value("connwatch_connections_closed_total", 30, pid=srv.pid, port=port)
    assert m.value("connwatch_connection_duration_seconds_count", port=port, kind="tcp") == 30
    for c in held0:
        c.close()


def test_without_syscall_tracing_the_holder_owns_the_connection(start_agent):
    """A connection nobody has read or written is claimed by the process whose
    fd table holds it, not by the listener's recorded owner: here the test
    process listens, hands the listener to a worker and closes its copy (as a
    supervisor does), and the worker accepts."""
    agent = start_agent(NO_SYSCALLS)
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(64)
    port = lst.getsockname()[1]
    agent.wait_for_value("connwatch_listen_backlog", 64, pid=os.getpid(), port=port)
    worker = subprocess.Popen(
        [sys.executable, "-c", "import socket, sys\n"
         "l = socket.socket(fileno=int(sys.argv[1]))\n"
         "held = [l.accept()[0] for _ in range(3)]\n"
         "print('holding', flush=True); sys.stdin.read()\n", str(lst.fileno())],
        pass_fds=[lst.fileno()], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    lst.close()
    try:
        clients = connect_many("127.0.0.1", port, 3)
        assert worker.stdout.readline().strip() == "holding"
        m = agent.wait_for_value("connwatch_connections", 3, pid=worker.pid, port=port)
        assert not m.value("connwatch_connections", pid=os.getpid(), port=port)
        for c in clients:
            c.close()
    finally:
        worker.kill()
        worker.wait()


def test_requested_backlog_and_emfile_need_the_syscall_hook(agent, server):
    """The default keeps them: listen()'s argument and EMFILE are seen."""
    srv = server("--backlog", "77")
    (port,) = srv.ports
    agent.wait_for_value("connwatch_listen_backlog_requested", 77, pid=srv.pid, port=port)
    assert srv.command("emfile").startswith("emfile ")
    wait_for(lambda: agent.scrape().value("connwatch_fd_alloc_failures_total", pid=srv.pid),
             what="EMFILE counted")
