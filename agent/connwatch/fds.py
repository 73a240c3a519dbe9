"""Per-process file descriptors: how many are open, and the soft RLIMIT_NOFILE.

Counting is O(1) on kernel >= 6.2: ``stat /proc/<pid>/fd`` reports the number
of open fds as st_size (the popcount of the fd table's open bitmap), so a
process with 100,000 fds costs one stat() instead of 100,000 directory
entries. On older kernels st_size is 0 and we count directory entries.
(Measurements: docs/metrics.md, "Headroom".)

:class:`FdCensus` does this for every process of the host once per refresh
(the headroom source and the syscall-hook arming share its walk), and
caches each process's limit, which rarely changes (see its docstring).

A process can exit between any two reads: every function returns None for a
process that is gone or whose /proc entries we may not read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .reread import RereadCache

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


def _size_counts_fds() -> bool:
    """Whether this kernel reports the open-fd count as st_size (>= 6.2): we
    hold fds, so a 0 means it does not."""
    try:
        return os.stat(f"{PROC}/self/fd").st_size > 0
    except OSError:
        return False


@dataclass(frozen=True, slots=True)
class FdUse:
    pid: int
    open: int
    limit: int  # soft RLIMIT_NOFILE
    # the inode of /proc/<pid>/fd: differs for a process that reuses a pid
    incarnation: int = 0

    @property
    def ratio(self) -> float:
        return self.open / self.limit if self.limit else 0.0


class FdCensus:
    """Open fds and soft RLIMIT_NOFILE of every process of the host.

    One stat() per process counts its fds. /proc/<pid>/limits (a text file
    the kernel formats for every resource) is read once per process and
    cached (reread.RereadCache): limits rarely change, and mostly at
    start-up (prlimit, or a process setting its own), so a new process's
    limit is read again in the next census, then after 2, 4, 8 ...
    censuses, at most RECHECK_ROUNDS apart; and at once when the process
    reaches RECHECK_SHARE of it, so a process near its limit is always
    measured against the limit it really has. The cache is keyed by pid
    and the /proc/<pid>/fd inode: a pid reused by a new process misses it.

    Processes without fds (kernel threads, zombies) are left out. On kernels
    before 6.2 counting lists each /proc/<pid>/fd (CAP_DAC_READ_SEARCH for
    other users' processes), at a cost growing with their fds.
    """

    RECHECK_ROUNDS = 30
    RECHECK_SHARE = 0.5

    def __init__(self) -> None:
        self._limits: RereadCache[int] = RereadCache(self.RECHECK_ROUNDS)
        self._size_counts = _size_counts_fds()

    def read(self) -> list[FdUse]:
        self._limits.start_round()
        out = []
        for name in os.listdir(PROC):
            if not name.isdigit():
                continue
            pid = int(name)
            path = f"{PROC}/{pid}/fd"
            try:
                st = os.stat(path)
            except OSError:
                continue  # exited, or not ours to see
            count = st.st_size if self._size_counts else _count_entries(path)
            if not count:
                continue
            limit = self._limits.get((pid, st.st_ino), lambda: max_fds(pid),
                                     stale=lambda cached: count >= cached * self.RECHECK_SHARE)
            if limit is not None:
                out.append(FdUse(pid, count, limit, st.st_ino))
        return out
