"""Checks of the VM itself, run inside it by tests/kernels/run-in-vm (make
test-kernels): the right kernel booted and the guest offers what connwatch
and its tests need. The file name does not match test_*.py, so a plain
pytest run on the host does not collect it."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

CHECKOUT = Path(__file__).resolve().parent.parent.parent


@pytest.fixture(autouse=True, scope="module")
def inside_vm():
    if "CONNWATCH_VM_KERNEL" not in os.environ:
        pytest.fail("these run inside a VM: tests/kernels/run-in-vm KERNEL "
                    ".venv/bin/python -m pytest tests/kernels/guest_checks.py")


def test_runs_the_requested_kernel():
    series = os.environ["CONNWATCH_VM_KERNEL"]  # 5.10, 6.1 or 6.12, set by run-in-vm
    assert os.uname().release.startswith(series + "."), os.uname().release


def test_kernel_has_btf():
    assert Path("/sys/kernel/btf/vmlinux").stat().st_size > 0


def test_network_namespaces_can_be_added_and_deleted():
    name = f"connwatch-guest-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        links = subprocess.run(["ip", "-netns", name, "-o", "link", "show"], check=True,
                               capture_output=True, text=True).stdout
        assert ": lo:" in links
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)
    assert not Path("/run/netns", name).exists()


def test_loopback_tcp_connects():
    with socket.create_server(("127.0.0.1", 0)) as server:
        with socket.create_connection(server.getsockname(), timeout=10) as client:
            accepted, _ = server.accept()
            with accepted:
                client.sendall(b"ping")
                assert accepted.recv(4) == b"ping"


def test_kernel_modules_load_on_demand():
    """/lib/modules is the booted kernel's: adding a dummy link makes the
    kernel load the dummy module through modprobe."""
    name = "cwguest0"
    subprocess.run(["ip", "link", "add", name, "type", "dummy"], check=True)
    subprocess.run(["ip", "link", "del", name], check=True)


def test_checkout_is_visible_at_the_same_path():
    """run-in-vm starts the command in the caller's directory: the checkout
    when make test-kernels runs these."""
    assert Path.cwd() == CHECKOUT
    assert 'name = "connwatch"' in (CHECKOUT / "pyproject.toml").read_text()


def test_bpf_and_cgroup2_file_systems_are_mounted():
    mounts = {fields[1]: fields[2]
              for fields in map(str.split, Path("/proc/mounts").read_text().splitlines())}
    assert mounts["/sys/fs/bpf"] == "bpf"
    assert mounts["/sys/fs/cgroup"] == "cgroup2"
    assert mounts["/tmp"] == "tmpfs"
