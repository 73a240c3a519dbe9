"""The syscall hook and how connections are counted without an accept hook.

Where EMFILE/ENFILE, port exhaustion and listen()'s backlog can be hooked
where they happen (fentry or kprobes: every distribution kernel), no
syscall hook is ever attached. Where they cannot (the development host),
``syscall_tracing: on_demand`` (the default) attaches the syscall hook only
while something nears a limit, ``always`` for good, ``never`` not at all.
The tests here assert whichever applies to the running kernel, read from
``connwatch_probe_info``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from conftest import reset, wait_for
from test_core import connect_many

SYSCALL_HOOK = "cw_sys_exit"


def attached_programs(pid: int) -> set[str]:
    """Names of the BPF programs behind the links a process holds (from its
    fds' fdinfo: this bpftool does not list link owners)."""
    progs = json.loads(subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True,
                                      text=True, check=True).stdout)
    names = {p["id"]: p.get("name", "") for p in progs}
    held = set()
    for info in Path(f"/proc/{pid}/fdinfo").iterdir():
        try:
            text = info.read_text()
        except OSError:
            continue  # closed meanwhile
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        if "link_type" in fields and "prog_id" in fields:
            held.add(names.get(int(fields["prog_id"]), ""))
    return held


def via(agent, probe: str) -> str | None:
    """The kind of hook a probe got on this kernel (fentry, kprobe, ...)."""
    found = agent.scrape().select("connwatch_probe_info", probe=probe)
    return found[0].labels["via"] if found else None


def test_no_syscall_hook_until_a_process_nears_its_limit(start_agent, server):
    """The default agent holds no syscall tracepoint link. Where EMFILE needs
    the syscall hook, it arms once a process passes arm_ratio of its
    RLIMIT_NOFILE, counts EMFILE exactly, and disarms after; elsewhere
    EMFILE is counted without it. (An agent of its own: the session's may
    still be armed by an earlier test's process.)"""
    agent = start_agent()
    assert SYSCALL_HOOK not in attached_programs(agent.proc.pid)
    srv = server("--backlog", "16")
    pid = str(srv.pid)
    subprocess.run(["prlimit", f"--pid={srv.pid}", "--nofile=64:64"], check=True)
    hooked = via(agent, "fd_failures") == "syscall_hook"
    if hooked:
        assert agent.scrape().value("connwatch_syscall_hook_armed") == 0
        assert srv.command("fds 40") == "fds 40"  # 62 % of 64
        agent.wait_for_value("connwatch_syscall_hook_armed", 1)
        assert SYSCALL_HOOK in attached_programs(agent.proc.pid)
    else:
        assert not agent.scrape().select("connwatch_syscall_hook_armed")
    openat, sock, accept4 = (int(x) for x in srv.command("emfile").split()[1:])
    assert (openat, sock, accept4) == (2, 2, 3)
    agent.wait_for_value("connwatch_fd_alloc_failures_total", 2, pid=pid, syscall="openat", errno="EMFILE")
    agent.wait_for_value("connwatch_fd_alloc_failures_total", 2, pid=pid, syscall="socket", errno="EMFILE")
    agent.wait_for_value("connwatch_fd_alloc_failures_total", 3, pid=pid, syscall="accept4", errno="EMFILE")
    assert srv.command("fds 10") == "fds 10"
    if hooked:
        # everything below the ratio (with hysteresis) for 30 s: detached again
        agent.wait_for_value("connwatch_syscall_hook_armed", 0, timeout=90)
        assert SYSCALL_HOOK not in attached_programs(agent.proc.pid)
    else:
        assert SYSCALL_HOOK not in attached_programs(agent.proc.pid)


def test_a_burst_between_refreshes_arms_the_hook_in_time(start_agent, server):
    """Refreshes 10 s apart: a process that jumps past arm_ratio and then
    touches a socket wakes the agent through the BPF ring buffer, which arms
    the syscall hook before the EMFILEs that follow."""
    agent = start_agent("refresh_interval_seconds: 10\n")
    if via(agent, "fd_failures") != "syscall_hook":
        # the kernel hooks fd allocation itself: nothing to arm, counted all the same
        assert SYSCALL_HOOK not in attached_programs(agent.proc.pid)
        return
    srv = server("--backlog", "16")
    subprocess.run(["prlimit", f"--pid={srv.pid}", "--nofile=64:64"], check=True)
    started = time.time()
    assert srv.command("fds 50") == "fds 50"
    assert srv.command("connect") == "connected"  # its own socket activity: the early trigger
    wait_for(lambda: SYSCALL_HOOK in attached_programs(agent.proc.pid), timeout=5,
             what="the syscall hook armed by the ring buffer, before any refresh")
    assert time.time() - started < 10
    assert srv.command("emfile").split()[1:] == ["2", "2", "3"]
    m = agent.wait_for_value("connwatch_fd_alloc_failures_total", 7, pid=srv.pid, timeout=30)
    assert m.value("connwatch_fd_alloc_failures_total", pid=srv.pid, syscall="openat") == 2
    assert "reached fd" in agent.log_path.read_text()


def test_always_and_never(start_agent, server):
    """always: the syscall hook is attached from the start where it is a
    strategy; never: it is not, its metrics are absent (not zero), they are
    not reported as disabled probes, and connections are still counted. The
    old boolean spelling still works, with a warning."""
    always = start_agent("syscall_tracing: always\n")
    hooked = via(always, "fd_failures") == "syscall_hook"
    assert (SYSCALL_HOOK in attached_programs(always.proc.pid)) == hooked
    never = start_agent("syscall_tracing: false\n")
    assert "deprecated, it means never" in never.log_path.read_text()
    assert SYSCALL_HOOK not in attached_programs(never.proc.pid)
    m = never.scrape()
    if hooked:
        for probe in ("fd_failures", "port_exhaustion", "listen_backlog"):
            assert not m.select("connwatch_probe_enabled", probe=probe), probe
        assert not m.select("connwatch_syscall_hook_armed")
    srv = server("--backlog", "77")
    (port,) = srv.ports
    clients = connect_many("127.0.0.1", port, 4)
    assert srv.command("accept 4") == "accepted 4"
    m = never.wait_for_value("connwatch_connections", 4, pid=srv.pid, port=port)
    assert m.value("connwatch_listen_backlog", pid=srv.pid, port=port) == 77
    if hooked:
        assert m.value("connwatch_listen_backlog_requested", pid=srv.pid, port=port) is None
    always.wait_for_value("connwatch_listen_backlog_requested", 77, pid=srv.pid, port=port)
    for c in clients:
        c.close()


def test_queued_connections_count_once_accepted(agent, server):
    """Connections waiting in the accept queue are the listener's queue, not
    the application's connections: they count once accepted (with an
    accept hook at accept(); without one, at the first I/O, at the close, or
    at the next refresh for a silent one). A connection reset while queued
    is handed over by accept() already closed: accepted and closed."""
    srv = server()
    (port,) = srv.ports
    clients = connect_many("127.0.0.1", port, 6)
    m = agent.wait_for_value("connwatch_listen_queue_length", 6, pid=srv.pid, port=port)
    assert not m.value("connwatch_connections", pid=srv.pid, port=port)
    reset(clients.pop())
    assert srv.command("accept 6") == "accepted 6"
    m = agent.wait_for_value("connwatch_connections", 5, pid=srv.pid, port=port)
    agent.wait_for_value("connwatch_connections_accepted_total", 6, pid=srv.pid, port=port)
    assert m.value("connwatch_peer_connections", pid=srv.pid, port=port, peer="127.0.0.1") == 5
    for c in clients[:2]:
        c.close()
    assert srv.command("close 6") == "closed 6"
    for c in clients[2:]:
        c.close()
    m = agent.wait_for_value("connwatch_connections_closed_total", 6, pid=srv.pid, port=port)
    assert m.value("connwatch_connections_accepted_total", pid=srv.pid, port=port) == 6
    assert m.value("connwatch_connections", pid=srv.pid, port=port) == 0


def test_the_process_that_takes_a_connection_owns_it(agent):
    """A supervisor listens, hands the listener to a worker and closes its
    copy; the worker accepts and serves: the connections are the worker's."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(64)
    port = lst.getsockname()[1]
    agent.wait_for_value("connwatch_listen_backlog", 64, pid=os.getpid(), port=port)
    worker = subprocess.Popen(
        [sys.executable, "-c", "import socket, sys\n"
         "l = socket.socket(fileno=int(sys.argv[1]))\n"
         "held = [l.accept()[0] for _ in range(3)]\n"
         "for c in held: c.recv(1)\n"
         "print('holding', flush=True); sys.stdin.read()\n", str(lst.fileno())],
        pass_fds=[lst.fileno()], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    lst.close()
    try:
        clients = connect_many("127.0.0.1", port, 3)
        for c in clients:
            c.send(b"x")
        assert worker.stdout.readline().strip() == "holding"
        m = agent.wait_for_value("connwatch_connections", 3, pid=worker.pid, port=port)
        assert not m.value("connwatch_connections", pid=os.getpid(), port=port)
        for c in clients:
            c.close()
    finally:
        worker.kill()
        worker.wait()
