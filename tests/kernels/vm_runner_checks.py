"""tests/kernels/run-in-vm itself, booting real VMs (6.1): the command's
output, exit status, directory and environment arrive; the timeouts and
SIGTERM stop QEMU and leave none behind. make test-kernels runs these on the
host; the file name does not match test_*.py, so make test does not."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

CHECKOUT = Path(__file__).resolve().parent.parent.parent
RUN_IN_VM = CHECKOUT / "tests" / "kernels" / "run-in-vm"
CONSOLE_LOG = CHECKOUT / "build" / "vm" / "6.1-console.log"


def qemu_of_this_checkout() -> list[int]:
    """QEMUs writing this checkout's 6.1 console log: ours, whoever else runs VMs."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if f"path={CONSOLE_LOG}".encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:  # exited meanwhile
            pass
    return pids


@pytest.fixture(autouse=True)
def no_qemu_left_behind():
    yield
    assert qemu_of_this_checkout() == []


def run_in_vm(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([RUN_IN_VM, *args], cwd=CHECKOUT, capture_output=True, text=True,
                          timeout=300, **kwargs)


def test_output_status_directory_and_environment_arrive():
    script = ('echo "in $(pwd) on $(uname -r)"; echo to-stderr >&2; '
              'echo "kernel=$CONNWATCH_VM_KERNEL passed=$CONNWATCH_CHECK other=${OTHER_VARIABLE-unset}"; '
              'seq 1 20000; exit 7')
    env = {**os.environ, "CONNWATCH_CHECK": "yes", "OTHER_VARIABLE": "set"}
    result = run_in_vm("6.1", "sh", "-c", script, env=env)
    assert result.returncode == 7, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"in {CHECKOUT} on 6.1.")
    assert lines[1:3] == ["to-stderr", "kernel=6.1 passed=yes other=unset"]
    # All of it, up to the last line written before the guest powered off.
    assert lines[3:] == [str(n) for n in range(1, 20001)]
    assert result.stderr == ""


def test_boot_timeout_stops_the_vm_with_one_line():
    result = run_in_vm("--boot-timeout", "2", "6.1", "true")
    assert result.returncode == 125
    assert result.stderr.count("\n") == 1
    assert "the 6.1 kernel (linux-image-6.1" in result.stderr
    assert "did not start the command within 2 s; console log: build/vm/6.1-console.log" in result.stderr


def test_overall_timeout_stops_the_vm_with_exit_124():
    result = run_in_vm("--timeout", "3", "6.1", "sleep", "600")
    assert result.returncode == 124
    assert result.stderr.startswith("run-in-vm: timed out after 3 s on the 6.1 kernel")


def test_sigterm_stops_the_vm():
    runner = subprocess.Popen([RUN_IN_VM, "6.1", "sleep", "600"], cwd=CHECKOUT)
    try:
        deadline = time.monotonic() + 60
        while not qemu_of_this_checkout():
            assert time.monotonic() < deadline, "QEMU did not start"
            time.sleep(0.2)
        runner.send_signal(signal.SIGTERM)
        assert runner.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        runner.kill()
        runner.wait()
