"""tests/kernels/matrix names what failed under its table, where the end of a
CI log shows it (its `host` column runs pytest without a VM, so this is
checked on the host)."""

from __future__ import annotations

import subprocess
from pathlib import Path

MATRIX = Path(__file__).resolve().parent / "matrix"

SUITE = '''
def test_holds():
    assert 1 + 1 == 2


def test_breaks():
    counted = 41
    assert counted == 42, "connwatch_connections was 41, not 42"
'''


def run_matrix(*pytest_args: str) -> subprocess.CompletedProcess:
    return subprocess.run([MATRIX, "host", "--", *pytest_args], capture_output=True, text=True,
                          timeout=120)


def test_the_table_is_followed_by_the_failing_tests_and_their_messages(tmp_path):
    suite = tmp_path / "test_suite.py"
    suite.write_text(SUITE)
    result = run_matrix(str(suite), "-p", "no:randomly")
    assert result.returncode == 1, result.stdout + result.stderr
    table, _, after = result.stdout.partition("\nhost: FAILED (exit 1)\n")
    assert table.splitlines()[-1].split()[3:6] == ["1", "1", "0"]  # passed, failed, errors
    lines = after.splitlines()
    assert any(line.startswith("  FAILED ") and "test_suite.py::test_breaks" in line for line in lines), after
    assert any(line.startswith("  E ") and line.endswith("AssertionError: connwatch_connections was 41, not 42")
               for line in lines), after
    assert "test_holds" not in after


def test_every_failing_test_is_named_however_long_the_tracebacks(tmp_path):
    suite = tmp_path / "test_suite.py"
    suite.write_text("import pytest\n\n\n@pytest.mark.parametrize('n', range(1, 13))\n"
                     "def test_long(n):\n    assert [0] * 40 == [n] * 40\n")
    result = run_matrix(str(suite), "-p", "no:randomly")
    after = result.stdout.partition("\nhost: FAILED (exit 1)\n")[2]
    named = [line for line in after.splitlines() if line.startswith("  FAILED ")]
    assert len(named) == 12 and all(f"test_long[{n}]" in line for n, line in enumerate(named, 1)), after


def test_nothing_follows_the_table_when_every_kernel_passed(tmp_path):
    suite = tmp_path / "test_suite.py"
    suite.write_text(SUITE)
    result = run_matrix(str(suite), "-k", "holds")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.rstrip().splitlines()[-1].split()[-1] == "ok"
