"""Per-process file descriptors: how many are open, and the soft RLIMIT_NOFILE.

Counting is O(1) on kernel >= 6.2: ``stat /proc/<pid>/fd`` reports the number
of open fds as st_size (the popcount of the fd table's open bitmap), so a
process with 100,000 fds costs one stat() instead of 100,000 directory
entries. On older kernels st_size is 0 and we count directory entries.
(Measurements: docs/metrics.md, "Headroom".)

A process can exit between any two reads: every function returns None for a
process that is gone or whose /proc entries we may not read.
"""

from __future__ import annotations

import os

PROC = "/proc"
UNLIMITED = "unlimited"


def _count_entries(path: str) -> int | None:
    try:
        with os.scandir(path) as it:
            return sum(1 for _ in it)
    except OSError:
        return None


def open_fds(pid: int) -> int | None:
    """Number of open file descriptors of `pid`, or None if it is gone/unreadable."""
    path = f"{PROC}/{pid}/fd"
    try:
        size = os.stat(path).st_size
    except OSError:
        return None
    if size > 0:
        return size
    # 0 is either a kernel before 6.2 or a process without fds (a zombie
    # has none, and neither does a process that closed them all): only a
    # directory count can tell
    return _count_entries(path)


def parse_limits(text: str, resource_name: str = "Max open files") -> tuple[int | None, int | None] | None:
    """(soft, hard) of one line of /proc/<pid>/limits; None stands for "unlimited"."""
    for line in text.splitlines():
        if not line.startswith(resource_name):
            continue
        words = line[len(resource_name):].split()
        if len(words) < 2:
            return None
        try:
            soft = None if words[0] == UNLIMITED else int(words[0])
            hard = None if words[1] == UNLIMITED else int(words[1])
        except ValueError:
            return None
        return soft, hard
    return None


def nofile_limits(pid: int | str) -> tuple[int | None, int | None] | None:
    """RLIMIT_NOFILE (soft, hard) of `pid` ("self" works); None for "unlimited".

    Read from /proc/<pid>/limits, which anybody may read, rather than
    prlimit(2), which needs the same uid or CAP_SYS_RESOURCE.
    """
    try:
        with open(f"{PROC}/{pid}/limits", encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    return parse_limits(text)


def _nr_open() -> int | None:
    try:
        with open(f"{PROC}/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def max_fds(pid: int) -> int | None:
    """Soft RLIMIT_NOFILE of `pid`: the fd count at which its next open fails (EMFILE).

    "unlimited" cannot actually be set for RLIMIT_NOFILE (the kernel caps it
    at fs.nr_open), but if /proc says so, the effective ceiling is fs.nr_open:
    the fd table never grows past it.
    """
    limits = nofile_limits(pid)
    if limits is None:
        return None
    soft = limits[0]
    return soft if soft is not None else _nr_open()


def all_processes() -> dict[int, tuple[int, int]]:
    """pid -> (open fds, soft RLIMIT_NOFILE) for every process this agent may
    inspect; processes that exit during the walk are left out."""
    out = {}
    for name in os.listdir(PROC):
        if not name.isdigit():
            continue
        pid = int(name)
        used = open_fds(pid)
        limit = max_fds(pid) if used is not None else None
        if limit is not None:
            out[pid] = (used, limit)
    return out
