"""Linux capabilities: read them, and drop all but a few (python3-prctl).

Capabilities belong to a *thread*, not a process: capset(2) and
PR_CAPBSET_DROP change only the calling thread, and a thread inherits its
creator's sets. The agent drops them before it starts any thread
(agent.py), so every thread it runs has the reduced sets.

The keep-set after attach, :data:`AFTER_ATTACH`, was chosen by measurement on
kernel 6.18 (docs/reliability.md, "Capabilities after attach";
tests/test_capabilities.py repeats the measurement):

* ``CAP_DAC_READ_SEARCH`` -- counting another user's open fds by listing
  /proc/<pid>/fd (mode 0500, owned by that user), which fds.py falls back to
  on kernels before 6.2 where stat(/proc/<pid>/fd).st_size is 0.

Everything else the agent does after attach needs no capability on 6.18:
stat(/proc/<pid>/fd) (the fd count), /proc/<pid>/{stat,cgroup,comm,limits},
BPF map lookups/updates/deletes and BPF_OBJ_GET_INFO_BY_FD on fds it already
holds, BPF_ITER_CREATE on an iterator link it already holds and read(2) of
the iterator, sock_diag in its own network namespace, closing (detaching)
links at exit. ``CAP_SYS_PTRACE`` is *not* kept: only readlink of
/proc/<pid>/fd/N and /proc/<pid>/fdinfo of other users' (or of root's)
processes need it, the agent reads neither (`connwatch doctor` does, and runs
as its own process), and it would let the agent read any process's memory.
Entering another network namespace (setns) needs ``CAP_SYS_ADMIN``: do that
before the drop, or read other namespaces with BPF iterators.

Without ``CAP_SETPCAP`` (a non-root service that was given only the
capabilities it needs, like the systemd unit) the bounding set cannot be
changed; it is left as the service manager set it, and no_new_privs keeps
anything in it from being regained through execve.
"""

from __future__ import annotations

import errno

import prctl

NAMES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
    "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW",
    "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ",
    "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
)
NUMBERS = {name: i for i, name in enumerate(NAMES)}

# What the agent keeps once attached; see the module docstring for why each one.
AFTER_ATTACH = frozenset({"CAP_DAC_READ_SEARCH"})

# the lines of /proc/<pid>/task/<tid>/status that hold the sets
_STATUS_SETS = {"CapInh": "inheritable", "CapPrm": "permitted", "CapEff": "effective",
                "CapBnd": "bounding", "CapAmb": "ambient"}
# capability numbers python-prctl knows (it refuses others)
_ALL = range(prctl.CAP_LAST_CAP + 1)


def _name(n: int) -> str:
    return NAMES[n] if n < len(NAMES) else f"CAP_{n}"


def _numbers(names) -> set[int]:
    out = set()
    for name in names:
        name = name.upper()
        if not name.startswith("CAP_"):
            name = "CAP_" + name
        if name not in NUMBERS:
            raise ValueError(f"unknown capability {name}")
        out.add(NUMBERS[name])
    return out


def current() -> dict[str, set[str]]:
    """The calling thread's five capability sets, by name, as the kernel reports them."""
    out = {}
    with open("/proc/thread-self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in _STATUS_SETS:
                mask = int(value, 16)
                out[_STATUS_SETS[key]] = {_name(i) for i in range(64) if mask >> i & 1}
    return out


def _kernel_last_cap() -> int:
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return int(f.read())


def drop_thread_capabilities() -> None:
    """Drop every capability of the calling thread only: for a throw-away
    thread that tests what works without them (capset(2) changes the calling
    thread alone)."""
    prctl.set_caps((list(_ALL), (prctl.CAP_EFFECTIVE, prctl.CAP_PERMITTED, prctl.CAP_INHERITABLE), False))


def drop_all_but(keep) -> dict[str, set[str]]:
    """Drop every capability but `keep` from all five sets of the calling thread.

    Effective and permitted become ``keep`` (those of them the thread has),
    inheritable and ambient become empty, the bounding set becomes ``keep``
    (if the thread has CAP_SETPCAP; else it is left alone), and no_new_privs
    is set. Threads created afterwards inherit all of it. Returns the new
    sets. Raises OSError if the kernel refuses.
    """
    keep_nums = _numbers(keep)
    permitted = current()["permitted"]
    held = {n for n in keep_nums if _name(n) in permitted}
    # 1. the bounding set: dropping from it needs CAP_SETPCAP in the effective
    #    set, so before the capset below; without it the bounding set stays as
    #    the service manager made it
    if prctl.cap_effective.setpcap:
        for n in range(min(_kernel_last_cap(), prctl.CAP_LAST_CAP) + 1):
            if n not in keep_nums and prctl.capbset_read(n):
                prctl.capbset_drop(n)
    # 2. effective = permitted = keep, inheritable = none, in one capset(2).
    #    python-prctl has no call for the ambient set, and needs none: the
    #    kernel keeps only what is both permitted and inheritable in it
    #    (capabilities(7)), so it is empty from here on.
    flags = (prctl.CAP_EFFECTIVE, prctl.CAP_PERMITTED, prctl.CAP_INHERITABLE)
    prctl.set_caps(([n for n in _ALL if n not in keep_nums], flags, False),
                   (keep_nums, prctl.CAP_INHERITABLE, False),
                   (held, prctl.CAP_EFFECTIVE, True))
    # 3. no execve can ever give privileges back (setuid binaries, file caps)
    prctl.set_no_new_privs(1)
    sets = current()
    left = (sets["effective"] | sets["permitted"]) - {_name(n) for n in keep_nums}
    if left:  # a capability newer than python-prctl, which cannot name it
        raise OSError(errno.EPERM, f"cannot drop {', '.join(sorted(left))}")
    return sets
