"""What /proc tells about a process: start time and container id.

Every read tolerates the process vanishing mid-read (it returns None): a
process can exit between any two lines of this file.
"""

from __future__ import annotations

import os

from . import identity

# USER_HZ: /proc/<pid>/stat reports start time in these ticks
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_NS_PER_TICK = 1_000_000_000 // _CLK_TCK


def start_ticks(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (start time since boot, in clock ticks)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # comm may contain spaces and parentheses: split after the last ')'
    fields = data[data.rfind(b")") + 2:].split()
    return int(fields[19]) if len(fields) > 19 else None


def pstart_ticks(pstart_ns: int) -> int:
    """The kernel's start_boottime (ns) as /proc reports it (ticks)."""
    return pstart_ns // _NS_PER_TICK


def is_same_process(pid: int, pstart_ns: int) -> bool:
    return start_ticks(pid) == pstart_ticks(pstart_ns)


def container_id(pid: int) -> str | None:
    """The `container` of identity.identity(pid): "" on the host, None if gone."""
    ident = identity.identity(pid)
    return None if ident is None else ident.container


def comm(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().rstrip("\n")
    except OSError:
        return None
