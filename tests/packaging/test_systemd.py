"""The packaged unit under a real systemd: a clean Debian 12 root with
systemd and the .deb installed, booted with systemd-nspawn on this machine's
kernel, `connwatch.service` started by systemd with every sandboxing setting
of the unit in force (seccomp filter, MemoryDenyWriteExecute, namespaces,
ambient capabilities as the `connwatch` user): the agent attaches its probes
and becomes ready, confined exactly as the unit says."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

import cwpkg
from cwpkg_fixtures import deb_path  # noqa: F401  (fixtures)
from test_deb import _free_port, _samples, _scrape, _descendants

pytestmark = pytest.mark.timeout(1500)


@pytest.fixture(scope="module")
def booted(deb_path):
    if shutil.which("systemd-nspawn") is None:
        pytest.skip("systemd-nspawn (Debian package systemd-container) is not installed")
    root = cwpkg.Chroot(Path("/var/tmp"))
    proc = None
    try:
        root.mount_proc()
        shutil.copy(deb_path, root.path / "tmp" / deb_path.name)
        shutil.copy(cwpkg.INSTALL_SCRIPT, root.path / "tmp" / "install-deb.sh")
        root.restore_archives()
        root.run("sh", "/tmp/install-deb.sh", f"/tmp/{deb_path.name}", timeout=900)
        root.run("apt-get", "install", "-y", "-q", "--no-install-recommends", "systemd", "systemd-sysv",
                 timeout=900)
        root.save_archives()
        subprocess.run(["umount", "-l", str(root.path / "proc")], check=True)
        root._mounts.remove(root.path / "proc")
        port = _free_port()
        # the unit appends $CONNWATCH_ARGS: a free loopback port instead of :9476
        (root.path / "etc/default/connwatch").write_text(
            f'CONNWATCH_ARGS="--web.listen-address 127.0.0.1:{port}"\n')
        caps = ",".join(cwpkg.unit_capabilities())
        # the container gets the unit's capabilities in its bounding set (as a
        # host has them) and bpf(2) in nspawn's own syscall filter; the host
        # network namespace is shared, so the agent sees this test's sockets
        log = tempfile.TemporaryFile(mode="w+")
        proc = subprocess.Popen(
            ["systemd-nspawn", "-D", str(root.path), "-b", "--register=no", "--keep-unit",
             "--console=passive", f"--capability={caps}", "--system-call-filter=bpf",
             "--bind-ro=/sys/kernel/btf"],
            stdout=log, stderr=subprocess.STDOUT)
        yield root, proc, port, log
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # nspawn: power the container off
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                # killing nspawn alone would leave the container's init (and
                # the agent in it) running, reparented to the host's init:
                # kill the init first, which ends its whole pid namespace
                for child in _children(proc.pid):
                    os.kill(child, signal.SIGKILL)
                proc.kill()
                proc.wait()
        root.close()


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def _init_pid(proc: subprocess.Popen, timeout: float = 30) -> int:
    """Host pid of the container's systemd (the child of systemd-nspawn)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for st in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = st.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == proc.pid:
                return int(st.parent.name)
        assert proc.poll() is None, "systemd-nspawn exited"
        time.sleep(0.2)
    raise AssertionError("the container's init did not start")


def _in_container(proc: subprocess.Popen, *cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(["nsenter", "-t", str(_init_pid(proc)), "-a", *cmd],
                          capture_output=True, text=True, timeout=60)


def _agent_pid(proc: subprocess.Popen, port: int) -> int | None:
    for pid in _descendants(_init_pid(proc)):
        try:
            if f"127.0.0.1:{port}".encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        except OSError:
            continue
    return None


def test_unit_runs_the_agent_under_systemd(booted):
    root, proc, port, log = booted
    deadline = time.monotonic() + 180
    text = None
    while time.monotonic() < deadline:
        assert proc.poll() is None, "systemd-nspawn exited:\n" + (log.seek(0) or log.read())
        text = _scrape(port)
        if text and re.search(r"^connwatch_ready 1(\.0)?$", text, re.M):
            break
        if _in_container(proc, "systemctl", "is-failed", "--quiet", "connwatch").returncode == 0:
            break  # exit code 2 is not restarted (RestartPreventExitStatus=2)
        time.sleep(0.5)
    journal = _in_container(proc, "journalctl", "-u", "connwatch", "--no-pager", "-o", "cat").stdout
    assert text and re.search(r"^connwatch_ready 1(\.0)?$", text, re.M), \
        f"not ready under systemd:\n{_in_container(proc, 'systemctl', 'status', 'connwatch', '--no-pager').stdout}\n{journal[-3000:]}"
    assert _in_container(proc, "systemctl", "is-active", "connwatch").stdout.strip() == "active"
    probes = {lbl["probe"]: v for lbl, v in _samples(text, "connwatch_probe_enabled")}
    assert probes.get("accept") == 1 and probes.get("connection_state") == 1, probes

    # (no connection counting here: nspawn always gives the container its own
    # pid namespace, and the agent resolves the kernel's global pids through
    # /proc, as it would without hostPID in Kubernetes. Counting is proven in
    # the host's pid namespace by test_deb.py, with the same capabilities.)

    # what systemd did to the process, seen by the kernel
    pid = _agent_pid(proc, port)
    assert pid is not None
    status = Path(f"/proc/{pid}/status").read_text()
    field = lambda k: re.search(rf"^{k}:\s*(.*)$", status, re.M)[1]  # noqa: E731
    names = cwpkg.run(["setpriv", "--list-caps"]).stdout.split()
    allowed = sum(1 << names.index(c.removeprefix("CAP_").lower()) for c in cwpkg.unit_capabilities())
    for s in ("CapEff", "CapPrm", "CapBnd", "CapAmb"):
        assert int(field(s), 16) & ~allowed == 0, (s, field(s))
    assert field("NoNewPrivs") == "1"
    assert field("Seccomp") == "2"  # SystemCallFilter= (and MemoryDenyWriteExecute=) in force
    uid = root.run("id", "-u", "connwatch").stdout.strip()
    assert field("Uid").split()[0] == uid
    assert "Traceback" not in journal, journal[-3000:]
