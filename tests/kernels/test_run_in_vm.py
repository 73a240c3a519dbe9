"""tests/kernels/run-in-vm refuses bad input with one line and exit 2, at
once: no download, no VM (make test-kernels checks the VMs themselves)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

RUN_IN_VM = Path(__file__).resolve().parent / "run-in-vm"


def run_in_vm(*args: str, cwd: Path | str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([RUN_IN_VM, *args], cwd=cwd, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("args, says", [
    (["4.19", "true"], "unknown kernel '4.19': choose one of 5.10, 6.1, 6.12"),
    (["6.1"], "no command to run"),
    (["--timeout", "soon", "6.1", "true"], "argument --timeout: invalid float value: 'soon'"),
])
def test_bad_input_is_one_line_and_exit_2(args, says):
    result = run_in_vm(*args)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and says in result.stderr, result.stderr


def test_a_directory_the_guest_does_not_share_is_refused():
    # /tmp itself is the guest's own (a checkout below it is carried in)
    result = run_in_vm("6.1", "true", cwd="/tmp")
    assert result.returncode == 2
    assert result.stderr == ("run-in-vm: the current directory /tmp is not visible in the VM (it has "
                             "its own /tmp): run from a directory of the root file system\n")
    result = run_in_vm("6.1", "true", cwd="/run")
    assert result.returncode == 2
    assert "its own /run" in result.stderr


def test_help_names_the_kernels_and_the_exit_statuses():
    result = run_in_vm("--help")
    assert result.returncode == 0
    for kernel in ("5.10", "6.1", "6.12"):
        assert kernel in result.stdout
    assert "124" in result.stdout and "125" in result.stdout
