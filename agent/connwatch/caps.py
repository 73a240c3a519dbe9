"""Linux capabilities: read them and drop all but a few, with capget/capset(2).

A tiny ctypes wrapper over the capability v3 ABI (two 32-bit words per set),
prctl(PR_CAPBSET_DROP) for the bounding set and PR_CAP_AMBIENT_CLEAR_ALL for
the ambient set. No libcap needed.

Capabilities belong to a *thread*, not a process: capset(2) and
PR_CAPBSET_DROP change only the calling thread. Threads created after a drop
inherit the reduced sets; threads that already exist keep theirs until they
call :func:`sync` (the metrics server's loop and request threads do, see
web.py). :func:`threads_not_dropped` lists the stragglers.

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

import ctypes
import errno
import os
import threading

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

# What the agent needs to load and attach its BPF programs (before the drop).
FOR_ATTACH = frozenset({"CAP_BPF", "CAP_PERFMON", "CAP_SYS_ADMIN", "CAP_SYS_RESOURCE", "CAP_NET_ADMIN"})
# What it keeps once attached; see the module docstring for why each one.
AFTER_ATTACH = frozenset({"CAP_DAC_READ_SEARCH"})

SETS = ("effective", "permitted", "inheritable", "bounding", "ambient")

_LINUX_CAPABILITY_VERSION_3 = 0x20080522
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_IS_SET = 1
PR_CAP_AMBIENT_CLEAR_ALL = 4


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_libc = ctypes.CDLL(None, use_errno=True)
_capget = _libc.capget
_capget.argtypes = [ctypes.POINTER(_Header), ctypes.POINTER(_Data)]
_capget.restype = ctypes.c_int
_capset = _libc.capset
_capset.argtypes = [ctypes.POINTER(_Header), ctypes.POINTER(_Data)]
_capset.restype = ctypes.c_int
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int

# the keep-set other threads converge to with sync(); None until a drop
_target: frozenset[str] | None = None
_target_lock = threading.Lock()
_synced = threading.local()


def _errcheck(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno() or errno.EPERM
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return len(NAMES) - 1


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


def _mask_to_names(words: tuple[int, int]) -> set[str]:
    mask = words[0] | (words[1] << 32)
    return {_name(i) for i in range(64) if mask >> i & 1}


def _get() -> tuple[_Header, ctypes.Array]:
    hdr = _Header(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)()
    _errcheck(_capget(ctypes.byref(hdr), data), "capget")
    return hdr, data


def current() -> dict[str, set[str]]:
    """The calling thread's capability sets, by name."""
    _, d = _get()
    top = last_cap()
    bounding = {_name(i) for i in range(top + 1) if _prctl(PR_CAPBSET_READ, i, 0, 0, 0) == 1}
    ambient = {_name(i) for i in range(top + 1)
               if _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_IS_SET, i, 0, 0) == 1}
    return {
        "effective": _mask_to_names((d[0].effective, d[1].effective)),
        "permitted": _mask_to_names((d[0].permitted, d[1].permitted)),
        "inheritable": _mask_to_names((d[0].inheritable, d[1].inheritable)),
        "bounding": bounding,
        "ambient": ambient,
    }


def _drop_this_thread(keep_nums: set[int]) -> None:
    hdr, d = _get()
    permitted = (d[0].permitted | d[1].permitted << 32)
    keep_mask = sum(1 << n for n in keep_nums) & permitted  # capset can only lower
    # 1. ambient: must go first (ambient ⊆ permitted ∩ inheritable at all times)
    if _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0:
        err = ctypes.get_errno()
        if err != errno.EINVAL:  # EINVAL: kernel without ambient capabilities
            raise OSError(err, f"prctl(PR_CAP_AMBIENT_CLEAR_ALL): {os.strerror(err)}")
    # 2. bounding set: needs CAP_SETPCAP in the effective set, so before capset;
    #    without it the bounding set stays as the service manager made it
    effective = (d[0].effective | d[1].effective << 32)
    if effective >> NUMBERS["CAP_SETPCAP"] & 1:
        for n in range(last_cap() + 1):
            if n in keep_nums or _prctl(PR_CAPBSET_READ, n, 0, 0, 0) != 1:
                continue
            _errcheck(_prctl(PR_CAPBSET_DROP, n, 0, 0, 0), f"prctl(PR_CAPBSET_DROP, {_name(n)})")
    # 3. effective = permitted = keep, inheritable = none
    new = (_Data * 2)()
    for i in range(2):
        word = (keep_mask >> (32 * i)) & 0xFFFFFFFF
        new[i].effective = new[i].permitted = word
        new[i].inheritable = 0
    hdr = _Header(_LINUX_CAPABILITY_VERSION_3, 0)
    _errcheck(_capset(ctypes.byref(hdr), new), "capset")
    # 4. no execve can ever give privileges back (setuid binaries, file caps)
    _errcheck(_prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")


def drop_thread_capabilities() -> None:
    """Drop every capability of the calling thread only (a throw-away thread
    that tests what works without them)."""
    _drop_this_thread(set())


def drop_all_but(keep) -> dict[str, set[str]]:
    """Drop every capability but `keep` from all five sets of the calling thread.

    Effective and permitted become ``keep`` (those of them the thread has),
    inheritable and ambient become empty, the bounding set becomes ``keep``
    (if the thread has CAP_SETPCAP; else it is left alone), and no_new_privs
    is set. Other existing threads follow when they call
    :func:`sync`. Returns the new sets. Raises OSError if the kernel refuses.
    """
    global _target
    keep = frozenset(_name(n) for n in _numbers(keep))
    with _target_lock:
        _target = keep
    _drop_this_thread(_numbers(keep))
    _synced.target = keep
    return current()


def sync() -> bool:
    """Apply a pending drop to the calling thread; True if it did.

    Idempotent and cheap (a few dozen prctl calls, once per thread). Threads
    started before the drop call it from their loop or at their start.
    """
    target = _target
    if target is None or getattr(_synced, "target", None) is target:
        return False
    _drop_this_thread(_numbers(target))
    _synced.target = target
    return True


def _status_sets(path: str) -> dict[str, set[str]]:
    keys = {"CapEff": "effective", "CapPrm": "permitted", "CapInh": "inheritable",
            "CapBnd": "bounding", "CapAmb": "ambient"}
    out: dict[str, set[str]] = {}
    with open(path) as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in keys:
                mask = int(v.strip(), 16)
                out[keys[k]] = {_name(i) for i in range(64) if mask >> i & 1}
    return out


def process_sets(pid: int | str = "self") -> dict[int, dict[str, set[str]]]:
    """tid -> capability sets, for every thread of a process (from /proc)."""
    out = {}
    base = f"/proc/{pid}/task"
    for tid in os.listdir(base):
        try:
            out[int(tid)] = _status_sets(f"{base}/{tid}/status")
        except OSError:
            continue  # the thread exited
    return out


def threads_not_dropped(pid: int | str = "self") -> list[int]:
    """Threads whose effective/permitted/bounding sets still exceed the target."""
    target = _target if _target is not None else frozenset()
    return [tid for tid, s in process_sets(pid).items()
            if not (s["effective"] <= target and s["permitted"] <= target and s["bounding"] <= target)]
