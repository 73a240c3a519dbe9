"""The CLI in a pipeline whose reader goes away: no traceback, SIGPIPE's status.

`connwatch doctor --json | head` must end like `yes | head`: quietly, with the
status a shell shows for a process killed by SIGPIPE (141). Each command
writes into a real pipe whose read end is already closed, so its first
write fails whatever the size of its output; one case runs the pipeline
with head(1) in bash, as a user does.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONNWATCH = str(ROOT / ".venv" / "bin" / "connwatch")
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE


def run_into_closed_pipe(*args: str, stream: str = "stdout") -> subprocess.CompletedProcess:
    """Run connwatch with `stream` (stdout or stderr) writing into a pipe nobody reads."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        streams = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, stream: write_end}
        return subprocess.run([CONNWATCH, *args], text=True, timeout=120, **streams)
    finally:
        os.close(write_end)


@pytest.mark.parametrize("args", [
    ["--help"],
    ["--version"],
    ["doctor", "--help"],
    ["doctor", "--json"],  # also stands for plain `doctor`: the same write path, ~1 min per run on a busy host
], ids=" ".join)
def test_stdout_into_a_closed_pipe_ends_quietly(args):
    result = run_into_closed_pipe(*args)
    assert result.stderr == ""
    assert result.returncode == EXIT_BROKEN_PIPE


def test_an_error_line_into_a_closed_pipe_ends_quietly():
    # stderr is the broken pipe, so silence cannot be read from it: the status
    # is the proof (an unhandled BrokenPipeError exits 1, one at exit 120)
    result = run_into_closed_pipe("doctor", "--target-connections", "0", stream="stderr")
    assert result.stdout == ""
    assert result.returncode == EXIT_BROKEN_PIPE


def test_top_once_into_a_closed_pipe_ends_quietly(agent):
    result = run_into_closed_pipe("top", "--once", "--agent", agent.url)
    assert result.stderr == ""
    assert result.returncode == EXIT_BROKEN_PIPE


def test_top_frames_piped_into_head(agent):
    # not a terminal: a frame every 2 s until the reader is gone
    result = subprocess.run(["bash", "-c", f"set -o pipefail; {CONNWATCH} top --agent {agent.url} | head -n 1"],
                            capture_output=True, text=True, timeout=60)
    assert result.stdout.startswith(f"connwatch top  {agent.url}  ")
    assert result.stderr == ""
    assert result.returncode == EXIT_BROKEN_PIPE


def test_doctor_json_piped_into_head():
    result = subprocess.run(["bash", "-c", f"set -o pipefail; {CONNWATCH} doctor --json | head -n 3"],
                            capture_output=True, text=True, timeout=120)
    assert result.stdout.splitlines() == ["{", '  "schema": 1,', '  "target_connections": 100000,']
    assert result.stderr == ""
    # 141 when doctor was still writing as head left (its JSON is large on a
    # host with many sockets); doctor's own 0 or 1 when it was all in the pipe
    assert result.returncode in (EXIT_BROKEN_PIPE, 0, 1)
