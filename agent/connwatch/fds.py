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


@dataclass(slots=True)
class _CachedLimit:
    fd_dir_inode: int  # tells a reused pid from the process we read
    limit: int
    read_in: int       # the census round it was read in
    reread_after: int  # censuses until it is read again: doubles up to RECHECK_ROUNDS


class FdCensus:
    """Open fds and soft RLIMIT_NOFILE of every process of the host.

    One stat() per process counts its fds. /proc/<pid>/limits (a text file
    the kernel formats for every resource) is read once per process and
    cached: limits rarely change (prlimit, or a process setting its own at
    start-up). Start-up is when they do change, so a new process's limit is
    read again in the next census, then after 2, 4, 8 ... censuses, at most
    RECHECK_ROUNDS apart; and at once when the process reaches RECHECK_SHARE
    of it, so a process near its limit is always measured against the limit
    it really has. A pid reused by a new process has a new /proc/<pid>/fd
    inode, which misses the cache.

    Processes without fds (kernel threads, zombies) are left out. On kernels
    before 6.2 counting lists each /proc/<pid>/fd (CAP_DAC_READ_SEARCH for
    other users' processes), at a cost growing with their fds.
    """

    RECHECK_ROUNDS = 30
    RECHECK_SHARE = 0.5

    def __init__(self) -> None:
        self._limits: dict[int, _CachedLimit] = {}
        self._round = 0
        self._size_counts = _size_counts_fds()

    def read(self) -> list[FdUse]:
        self._round += 1
        seen: dict[int, _CachedLimit] = {}
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
            cached = self._limits.get(pid)
            if cached is not None and cached.fd_dir_inode != st.st_ino:
                cached = None  # the pid was reused
            if (cached is None or self._round - cached.read_in >= cached.reread_after
                    or count >= cached.limit * self.RECHECK_SHARE):
                limit = max_fds(pid)
                if limit is None:
                    continue
                after = 1 if cached is None else min(2 * cached.reread_after, self.RECHECK_ROUNDS)
                cached = _CachedLimit(st.st_ino, limit, self._round, after)
            seen[pid] = cached
            out.append(FdUse(pid, count, cached.limit, st.st_ino))
        self._limits = seen  # forget the processes that are gone
        return out
