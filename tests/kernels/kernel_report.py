"""What the agent does on the running kernel, for docs/kernels.md.

Run by `make test-kernels` inside each of Debian's kernels and on the
host: a real agent is started, driven through the paths every probe covers,
and what it reports is printed as one JSON line (CONNWATCH_KERNEL_REPORT),
which tests/kernels/matrix collects and tests/kernels/render_kernels_doc
turns into docs/kernels.md. The assertions are what must hold everywhere.
"""

from __future__ import annotations

import json
import os
import platform
import re
import socket
import subprocess

from conftest import wait_for
from test_probe_fallback import TRACEPOINTS_ONLY

MARKER = "CONNWATCH_KERNEL_REPORT "
FLOOR = (5, 10)


def kernel_series() -> str:
    return ".".join(platform.release().split(".")[:2])


def capabilities_after_attach(log: str) -> list[str]:
    found = re.search(r"capabilities after attach: (.*)", log)
    return sorted(found.group(1).split(", ")) if found and found.group(1) != "none" else []


def probe_hooks(m) -> dict[str, dict[str, str]]:
    """probe -> the kind of hook and the attach points it got, or via "off"."""
    probes = {s.labels["probe"]: {"via": s.labels["via"], "attach": s.labels["attach"]}
              for s in m.select("connwatch_probe_info")}
    for s in m.select("connwatch_probe_enabled"):
        probes.setdefault(s.labels["probe"], {"via": "off", "attach": ""})
    return probes


def linked_program_names() -> set[str]:
    """Names of the BPF programs attached through a link (bpftool)."""
    links = json.loads(subprocess.run(["bpftool", "-j", "link", "show"], capture_output=True, text=True,
                                      check=True).stdout or "[]")
    progs = json.loads(subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True,
                                      check=True).stdout or "[]")
    names = {p["id"]: p.get("name", "") for p in progs}
    return {names.get(link.get("prog_id"), "") for link in links}


def test_report(hooked_agent, start_agent, server, capsys):
    agent = hooked_agent
    srv = server("--backlog", "33")
    (port,) = srv.ports
    # exercise every probe once: connections, an upgrade-like first exchange,
    # EMFILE, a listener with a requested backlog
    subprocess.run(["prlimit", f"--pid={srv.pid}", "--nofile=64:64"], check=True)
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    assert srv.command("accept 3") == "accepted 3"
    assert srv.command("emfile").startswith("emfile ")
    m = agent.wait_for_value("connwatch_connections", 3, pid=srv.pid, port=port)
    wait_for(lambda: agent.scrape().value("connwatch_fd_alloc_failures_total", pid=srv.pid),
             what="EMFILE counted")
    probes = probe_hooks(agent.scrape())
    report = {
        "kernel": kernel_series(),
        "where": "vm" if os.environ.get("CONNWATCH_VM_KERNEL") else "host",
        "probes": probes,
        # what a kernel without fentry and kprobes would get (tests/test_probe_fallback.py)
        "tracepoints_only": probe_hooks(start_agent(TRACEPOINTS_ONLY).scrape()),
        "capabilities": capabilities_after_attach(agent.log_path.read_text()),
    }
    with capsys.disabled():
        print(MARKER + json.dumps(report, sort_keys=True), flush=True)
    # what must hold on every supported kernel
    assert tuple(map(int, report["kernel"].split("."))) >= FLOOR
    assert all(p["via"] != "off" for name, p in probes.items() if name != "overflow_drops"), probes
    if report["where"] == "vm":
        # distribution kernels have fentry: EMFILE (counted above), the requested
        # backlog and EADDRNOTAVAIL come without the syscall hook, so even this
        # `syscall_tracing: always` agent holds no sys_exit link (issue 12)
        assert all(p["via"] != "syscall_hook" for p in probes.values()), probes
        assert agent.scrape().value("connwatch_syscall_hook_armed") is None
        assert "cw_sys_exit" not in linked_program_names()
    for c in clients:
        c.close()
