"""A thin, typed ctypes binding over the system libbpf (libbpf.so.1, 1.1 API).

Only what connwatch needs: open an object, size its maps and fill its
read-only config before load, load, attach, read maps in batches, read BTF,
and tear everything down. libbpf 1.x returns negative errno values (and NULL
pointers with errno set); both become :class:`LibbpfError` here.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import mmap
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

log = logging.getLogger("connwatch.libbpf")

_lib = ctypes.CDLL(ctypes.util.find_library("bpf") or "libbpf.so.1", use_errno=True)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """libbpf's warnings as debug messages: for trials that may fail."""
    global _quiet
    _quiet = True
    try:
        yield
    finally:
        _quiet = False


class LibbpfError(OSError):
    """A libbpf call failed; ``errno`` is set."""


class LoadError(LibbpfError):
    """Loading an object failed. ``program`` names the program the kernel
    refused (None if the failure was not a program's), ``reason`` says why:
    the verifier's last word, or the errno."""

    def __init__(self, err: int, what: str, program: str | None, reason: str):
        super().__init__(err, what)
        self.program = program
        self.reason = reason


_FAILED_PROG = re.compile(r"prog '([^']+)': failed to load")


def _load_failure(err: int, warnings: list[str]) -> tuple[str | None, str]:
    """(program, reason) from libbpf's warnings about a failed load."""
    program = next((m.group(1) for w in reversed(warnings) if (m := _FAILED_PROG.search(w))), None)
    reason = os.strerror(err)
    for w in reversed(warnings):
        if "-- END PROG LOAD LOG --" in w:
            lines = [ln for ln in w.splitlines() if ln.strip() and not ln.startswith(("processed ", "--"))]
            if lines:
                reason = f"{reason}: {lines[-1].strip()}"
            break
    return program, reason


def _check(ret: int, what: str) -> int:
    if ret < 0:
        raise LibbpfError(-ret, f"{what}: {os.strerror(-ret)}")
    return ret


def _check_ptr(ptr: int | None, what: str) -> int:
    if not ptr:
        err = ctypes.get_errno() or errno.EINVAL
        raise LibbpfError(err, f"{what}: {os.strerror(err)}")
    return ptr


def _fn(name: str, restype, *argtypes):
    f = getattr(_lib, name)
    f.restype = restype
    f.argtypes = list(argtypes)
    return f


_vp, _cp, _u32, _i = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_int
_size_p = ctypes.POINTER(ctypes.c_size_t)

_open_file = _fn("bpf_object__open_file", _vp, _cp, _vp)
_obj_load = _fn("bpf_object__load", _i, _vp)
_obj_close = _fn("bpf_object__close", None, _vp)
_obj_btf = _fn("bpf_object__btf", _vp, _vp)
_next_prog = _fn("bpf_object__next_program", _vp, _vp, _vp)
_next_map = _fn("bpf_object__next_map", _vp, _vp, _vp)
_prog_name = _fn("bpf_program__name", _cp, _vp)
_prog_set_autoload = _fn("bpf_program__set_autoload", _i, _vp, ctypes.c_bool)
_prog_autoload = _fn("bpf_program__autoload", ctypes.c_bool, _vp)
_prog_fd = _fn("bpf_program__fd", _i, _vp)
_prog_attach = _fn("bpf_program__attach", _vp, _vp)
_link_destroy = _fn("bpf_link__destroy", _i, _vp)
_prog_attach_iter = _fn("bpf_program__attach_iter", _vp, _vp, _vp)
_link_fd = _fn("bpf_link__fd", _i, _vp)
_iter_create = _fn("bpf_iter_create", _i, _i)
_map_name = _fn("bpf_map__name", _cp, _vp)
_map_fd = _fn("bpf_map__fd", _i, _vp)
_map_set_max_entries = _fn("bpf_map__set_max_entries", _i, _vp, _u32)
_map_max_entries = _fn("bpf_map__max_entries", _u32, _vp)
_map_key_size = _fn("bpf_map__key_size", _u32, _vp)
_map_value_size = _fn("bpf_map__value_size", _u32, _vp)
_map_initial_value = _fn("bpf_map__initial_value", _vp, _vp, _size_p)
_map_is_internal = _fn("bpf_map__is_internal", ctypes.c_bool, _vp)
_map_lookup = _fn("bpf_map_lookup_elem", _i, _i, _vp, _vp)
_map_delete = _fn("bpf_map_delete_elem", _i, _i, _vp)
_map_next_key = _fn("bpf_map_get_next_key", _i, _i, _vp, _vp)
_map_lookup_batch = _fn(
    "bpf_map_lookup_batch", _i, _i, _vp, _vp, _vp, _vp, ctypes.POINTER(_u32), _vp
)
_num_possible_cpus = _fn("libbpf_num_possible_cpus", _i)
_enable_stats = _fn("bpf_enable_stats", _i, _i)
_obj_info = _fn("bpf_obj_get_info_by_fd", _i, _i, _vp, ctypes.POINTER(_u32))
_btf_find = _fn("btf__find_by_name_kind", _i, _vp, _cp, _u32)
_btf_type = _fn("btf__type_by_id", _vp, _vp, _u32)
_btf_name = _fn("btf__name_by_offset", _cp, _vp, _u32)
_btf_resolve_size = _fn("btf__resolve_size", ctypes.c_long, _vp, _u32)
_btf_load_vmlinux = _fn("btf__load_vmlinux_btf", _vp)
_btf_free = _fn("btf__free", None, _vp)
_map_type = _fn("bpf_map__type", _i, _vp)
_map_flags = _fn("bpf_map__map_flags", _u32, _vp)
_map_set_flags = _fn("bpf_map__set_map_flags", _i, _vp, _u32)
_ringbuf_new = _fn("ring_buffer__new", _vp, _i, _vp, _vp, _vp)
_ringbuf_poll = _fn("ring_buffer__poll", _i, _vp, _i)
_ringbuf_free = _fn("ring_buffer__free", None, _vp)

# ---- libbpf log -> Python logging -------------------------------------------

_PRINT_FN = ctypes.CFUNCTYPE(_i, _i, _cp, _vp)
_set_print = _fn("libbpf_set_print", _vp, _PRINT_FN)
_vsnprintf = ctypes.CDLL(None).vsnprintf
_vsnprintf.restype = _i
_vsnprintf.argtypes = [_cp, ctypes.c_size_t, _cp, _vp]
_LEVELS = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}


# one buffer for every message: a verifier log runs up to libbpf's 16 MiB
# (UINT32_MAX >> 8), and its last lines (the reason a program was refused)
# must not be cut off; pages are touched only as far as a message reaches
_print_buf = ctypes.create_string_buffer((1 << 24) + (1 << 16))
# a refused program's verifier log is logged at debug level in full, and as
# its last lines (where the reason is) at the warning level
VERIFIER_LOG_TAIL = 40
# warnings libbpf printed during the current BpfObject.load(), to name the
# program that failed (libbpf unloads everything and returns only an errno)
_load_warnings: list[str] | None = None
# while set, libbpf's warnings are logged as debug (expected failures)
_quiet = False


@_PRINT_FN
def _print(level: int, fmt: bytes, args: int) -> int:
    n = _vsnprintf(_print_buf, len(_print_buf), fmt, args)
    text = _print_buf.value.decode(errors="replace").rstrip()
    if text:
        lvl = logging.DEBUG if _quiet else _LEVELS.get(level, logging.DEBUG)
        lines = text.splitlines()
        if lvl > logging.DEBUG and "-- BEGIN PROG LOAD LOG --" in text and len(lines) > VERIFIER_LOG_TAIL:
            log.debug("%s", text)
            log.log(lvl, "%s\n... (%d lines of the verifier log left out; --log.level=debug shows them)\n%s",
                    lines[0], len(lines) - VERIFIER_LOG_TAIL - 1, "\n".join(lines[-VERIFIER_LOG_TAIL:]))
        else:
            log.log(lvl, "%s", text)
        if _load_warnings is not None and level == 0:
            _load_warnings.append(text)
    return n


_set_print(_print)

# ---- BTF ------------------------------------------------------------------

BTF_KIND_PTR = 2
BTF_KIND_STRUCT = 4
BTF_KIND_ENUM = 6
BTF_KIND_TYPEDEF = 8
BTF_KIND_FUNC = 12
BTF_KIND_FUNC_PROTO = 13
BTF_KIND_DATASEC = 15


class _BtfType(ctypes.Structure):
    _fields_ = [("name_off", _u32), ("info", _u32), ("size", _u32)]


class _BtfMember(ctypes.Structure):
    _fields_ = [("name_off", _u32), ("type", _u32), ("offset", _u32)]


class _BtfEnum(ctypes.Structure):
    _fields_ = [("name_off", _u32), ("val", ctypes.c_int32)]


class _BtfVarSecinfo(ctypes.Structure):
    _fields_ = [("type", _u32), ("offset", _u32), ("size", _u32)]


class VarPlace(NamedTuple):
    """Where a global variable lies in its data section."""

    offset: int
    size: int


class StructMember(NamedTuple):
    name: str
    offset: int  # bytes
    size: int    # bytes


@dataclass(frozen=True)
class BtfStruct:
    name: str
    size: int
    members: tuple[StructMember, ...]


class Btf:
    """Read-only view of a BTF: an object's (owned by the object), or the
    running kernel's (:meth:`kernel`, freed with :meth:`close`)."""

    def __init__(self, ptr: int, owned: bool = False):
        self._p = ptr
        self._owned = owned

    @classmethod
    def kernel(cls) -> Btf:
        """The running kernel's BTF (/sys/kernel/btf/vmlinux)."""
        return cls(_check_ptr(_btf_load_vmlinux(), "load the kernel's BTF"), owned=True)

    def close(self) -> None:
        if self._owned and self._p:
            _btf_free(self._p)
            self._p = None

    def __enter__(self) -> Btf:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _type(self, tid: int) -> _BtfType:
        return _BtfType.from_address(_btf_type(self._p, tid))

    def _proto_params(self, tid: int) -> int | None:
        """Parameter count of the FUNC_PROTO at tid, None if it is not one."""
        t = self._type(tid)
        return t.info & 0xFFFF if (t.info >> 24) & 0x1F == BTF_KIND_FUNC_PROTO else None

    def function_arity(self, name: str) -> int | None:
        """Arguments of a kernel function, None if BTF does not know it (absent
        or inlined everywhere: then no fentry or BTF-typed hook can reach it)."""
        tid = _btf_find(self._p, name.encode(), BTF_KIND_FUNC)
        return None if tid < 0 else self._proto_params(self._type(tid).size)

    def tracepoint_arity(self, name: str) -> int | None:
        """Arguments of a BTF-typed tracepoint (its btf_trace_<name> typedef is a
        pointer to a prototype whose first parameter is the probe's context),
        None if the kernel has no such tracepoint."""
        tid = _btf_find(self._p, f"btf_trace_{name}".encode(), BTF_KIND_TYPEDEF)
        if tid < 0:
            return None
        ptr = self._type(self._type(tid).size)
        if (ptr.info >> 24) & 0x1F != BTF_KIND_PTR:
            return None
        params = self._proto_params(ptr.size)
        return None if params is None else params - 1

    def _name(self, off: int) -> str:
        return (_btf_name(self._p, off) or b"").decode()

    def struct(self, name: str) -> BtfStruct | None:
        tid = _btf_find(self._p, name.encode(), BTF_KIND_STRUCT)
        if tid < 0:
            return None
        t = _BtfType.from_address(_btf_type(self._p, tid))
        vlen, kflag = t.info & 0xFFFF, t.info >> 31
        base = _btf_type(self._p, tid) + ctypes.sizeof(_BtfType)
        members = []
        for i in range(vlen):
            m = _BtfMember.from_address(base + i * ctypes.sizeof(_BtfMember))
            bits = m.offset & 0xFFFFFF if kflag else m.offset
            size = _btf_resolve_size(self._p, m.type)
            members.append(StructMember(self._name(m.name_off), bits // 8, int(size)))
        return BtfStruct(name, t.size, tuple(members))

    def section_vars(self, section: str) -> dict[str, VarPlace]:
        """Variables of a data section, by name."""
        tid = _btf_find(self._p, section.encode(), BTF_KIND_DATASEC)
        if tid < 0:
            return {}
        t = _BtfType.from_address(_btf_type(self._p, tid))
        base = _btf_type(self._p, tid) + ctypes.sizeof(_BtfType)
        out = {}
        for i in range(t.info & 0xFFFF):
            v = _BtfVarSecinfo.from_address(base + i * ctypes.sizeof(_BtfVarSecinfo))
            var = _BtfType.from_address(_btf_type(self._p, v.type))
            out[self._name(var.name_off)] = VarPlace(v.offset, v.size)
        return out

    def enum(self, name: str) -> dict[str, int] | None:
        tid = _btf_find(self._p, name.encode(), BTF_KIND_ENUM)
        if tid < 0:
            return None
        t = _BtfType.from_address(_btf_type(self._p, tid))
        base = _btf_type(self._p, tid) + ctypes.sizeof(_BtfType)
        out = {}
        for i in range(t.info & 0xFFFF):
            e = _BtfEnum.from_address(base + i * ctypes.sizeof(_BtfEnum))
            out[self._name(e.name_off)] = e.val
        return out


# ---- maps -----------------------------------------------------------------


class Map:
    """A BPF map of a loaded (or opened) object."""

    def __init__(self, ptr: int):
        self._p = ptr
        self.name: str = _map_name(ptr).decode()

    @property
    def fd(self) -> int:
        return _map_fd(self._p)

    @property
    def max_entries(self) -> int:
        return _map_max_entries(self._p)

    def set_max_entries(self, n: int) -> None:
        _check(_map_set_max_entries(self._p, n), f"set max_entries of {self.name}")

    @property
    def key_size(self) -> int:
        return _map_key_size(self._p)

    @property
    def value_size(self) -> int:
        return _map_value_size(self._p)

    @property
    def is_internal(self) -> bool:
        return bool(_map_is_internal(self._p))

    @property
    def type(self) -> int:
        """enum bpf_map_type"""
        return _map_type(self._p)

    @property
    def flags(self) -> int:
        return _map_flags(self._p)

    def set_flags(self, flags: int) -> None:
        """Map flags (BPF_F_*), before load."""
        _check(_map_set_flags(self._p, flags), f"set flags of {self.name}")

    def initial_value(self) -> ctypes.Array:
        """The writable pre-load image of a global-data map (.rodata, .bss)."""
        size = ctypes.c_size_t()
        ptr = _check_ptr(_map_initial_value(self._p, ctypes.byref(size)), f"{self.name} image")
        return (ctypes.c_char * size.value).from_address(ptr)

    def lookup_percpu(self, key: ctypes._CData, value_type) -> list:
        """Every CPU's value of a per-CPU map entry (empty if absent)."""
        ncpu = _check(_num_possible_cpus(), "possible CPUs")
        stride = (ctypes.sizeof(value_type) + 7) & ~7
        buf = ctypes.create_string_buffer(stride * ncpu)
        ret = _map_lookup(self.fd, ctypes.byref(key), buf)
        if ret == -errno.ENOENT:
            return []
        _check(ret, f"lookup in {self.name}")
        return [value_type.from_buffer_copy(buf, i * stride).value for i in range(ncpu)]

    def delete(self, key: ctypes._CData) -> bool:
        ret = _map_delete(self.fd, ctypes.byref(key))
        if ret == -errno.ENOENT:
            return False
        _check(ret, f"delete from {self.name}")
        return True

    def items(self, key_type, value_type, chunk: int = 4096) -> Iterator[tuple]:
        """All (key, value) pairs, read with batched lookups where the kernel can.

        Like ctypes array items: structures come back as structures, simple
        types (c_uint32, c_uint64) as Python ints.
        """
        try:
            yield from self._items_batch(key_type, value_type, chunk)
        except LibbpfError as e:
            if e.errno not in (errno.EINVAL, errno.ENOTSUPP if hasattr(errno, "ENOTSUPP") else 524):
                raise
            yield from self._items_iter(key_type, value_type)

    def _items_batch(self, key_type, value_type, chunk: int) -> Iterator[tuple]:
        out_batch = ctypes.create_string_buffer(max(self.key_size, 8))
        in_batch = ctypes.create_string_buffer(max(self.key_size, 8))
        first = True
        while True:
            # new arrays for every batch: a structure taken from an array
            # shares the array's memory, so the next batch must not reuse it
            keys, values = (key_type * chunk)(), (value_type * chunk)()
            count = _u32(chunk)
            ret = _map_lookup_batch(
                self.fd,
                None if first else in_batch,
                out_batch,
                keys,
                values,
                ctypes.byref(count),
                None,
            )
            # only these three leave a meaningful count (the entries copied)
            if ret not in (0, -errno.ENOENT, -errno.ENOSPC):
                _check(ret, f"batch lookup in {self.name}")
            for i in range(count.value):
                yield keys[i], values[i]
            if ret == -errno.ENOENT:
                return
            # go on after the last bucket returned
            ctypes.memmove(in_batch, out_batch, len(out_batch))
            first = False
            if ret == -errno.ENOSPC:
                chunk *= 2  # the next hash bucket holds more than `chunk` entries

    def _items_iter(self, key_type, value_type) -> Iterator[tuple]:
        # one-element arrays, so that items come out exactly as from a batch
        key, nxt, value = (key_type * 1)(), (key_type * 1)(), (value_type * 1)()
        prev = None
        while _map_next_key(self.fd, prev, nxt) == 0:
            ctypes.memmove(key, nxt, ctypes.sizeof(key))
            prev = key
            if _map_lookup(self.fd, key, value) == 0:
                yield (key_type * 1).from_buffer_copy(key)[0], (value_type * 1).from_buffer_copy(value)[0]

    def memlock_bytes(self) -> int:
        """Kernel memory charged to the map, from /proc/self/fdinfo."""
        with open(f"/proc/self/fdinfo/{self.fd}") as f:
            for line in f:
                if line.startswith("memlock:"):
                    return int(line.split()[1])
        return 0


# ---- programs -------------------------------------------------------------


class _ProgInfo(ctypes.Structure):
    """struct bpf_prog_info (uapi) up to the run statistics."""

    _fields_ = [
        ("type", _u32), ("id", _u32), ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", _u32), ("xlated_prog_len", _u32),
        ("jited_prog_insns", ctypes.c_uint64), ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64), ("created_by_uid", _u32), ("nr_map_ids", _u32),
        ("map_ids", ctypes.c_uint64), ("name", ctypes.c_char * 16), ("ifindex", _u32),
        ("gpl_compatible", _u32), ("netns_dev", ctypes.c_uint64), ("netns_ino", ctypes.c_uint64),
        ("nr_jited_ksyms", _u32), ("nr_jited_func_lens", _u32),
        ("jited_ksyms", ctypes.c_uint64), ("jited_func_lens", ctypes.c_uint64),
        ("btf_id", _u32), ("func_info_rec_size", _u32), ("func_info", ctypes.c_uint64),
        ("nr_func_info", _u32), ("nr_line_info", _u32), ("line_info", ctypes.c_uint64),
        ("jited_line_info", ctypes.c_uint64), ("nr_jited_line_info", _u32),
        ("line_info_rec_size", _u32), ("jited_line_info_rec_size", _u32),
        ("nr_prog_tags", _u32), ("prog_tags", ctypes.c_uint64),
        ("run_time_ns", ctypes.c_uint64), ("run_cnt", ctypes.c_uint64),
        ("recursion_misses", ctypes.c_uint64),
    ]


class _IterMapInfo(ctypes.Structure):
    """union bpf_iter_link_info, its map member"""
    _fields_ = [("map_fd", _u32)]


class _IterAttachOpts(ctypes.Structure):
    """struct bpf_iter_attach_opts"""
    _fields_ = [("sz", ctypes.c_size_t), ("link_info", ctypes.c_void_p), ("link_info_len", _u32)]


class Program:
    def __init__(self, ptr: int):
        self._p = ptr
        self.name: str = _prog_name(ptr).decode()
        self._link: int | None = None

    @property
    def autoload(self) -> bool:
        return bool(_prog_autoload(self._p))

    @autoload.setter
    def autoload(self, on: bool) -> None:
        _check(_prog_set_autoload(self._p, on), f"autoload of {self.name}")

    @property
    def fd(self) -> int:
        return _prog_fd(self._p)

    def attach(self) -> None:
        self._link = _check_ptr(_prog_attach(self._p), f"attach {self.name}")

    def attach_iter(self, map_fd: int | None = None) -> None:
        """Attach an iterator program; map_fd for targets over one map's
        elements (bpf_map_elem), None for the others (task_file, tcp, ...)."""
        opts = None
        if map_fd is not None:
            info = _IterMapInfo(map_fd)
            opts = _IterAttachOpts(ctypes.sizeof(_IterAttachOpts),
                                   ctypes.cast(ctypes.pointer(info), ctypes.c_void_p), ctypes.sizeof(info))
        self._link = _check_ptr(_prog_attach_iter(self._p, ctypes.byref(opts) if opts else None),
                                f"attach iterator {self.name}")

    def run_iter(self) -> bytes:
        """Run an attached iterator once; returns everything it wrote."""
        if self._link is None:
            raise LibbpfError(errno.ENOLINK, f"{self.name} is not attached")
        fd = _check(_iter_create(_link_fd(self._link)), f"create iterator {self.name}")
        chunks = []
        try:
            while True:
                try:
                    chunk = os.read(fd, 1 << 16)
                except BlockingIOError:
                    # a read() that visited a million objects without output
                    # (the kernel's cap per call) ends with EAGAIN: go on
                    continue
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            os.close(fd)
        return b"".join(chunks)

    @property
    def attached(self) -> bool:
        return self._link is not None

    def detach(self) -> None:
        if self._link is not None:
            _link_destroy(self._link)
            self._link = None

    def run_stats(self) -> tuple[int, int, int]:
        """(run_time_ns, run_cnt, recursion_misses). The first two stay 0 unless
        BPF statistics are on; misses (runs skipped because the program was
        already running on that CPU) are always counted."""
        info = _ProgInfo()
        size = _u32(ctypes.sizeof(info))
        _check(_obj_info(self.fd, ctypes.byref(info), ctypes.byref(size)), f"info of {self.name}")
        return info.run_time_ns, info.run_cnt, info.recursion_misses


def enable_run_time_stats() -> int:
    """BPF_ENABLE_STATS(BPF_STATS_RUN_TIME): statistics stay on while the returned fd is open."""
    return _check(_enable_stats(0), "enable BPF run-time statistics")


# ---- global variables and ring buffers ---------------------------------------


class GlobalVars:
    """Global variables of a loaded object's .bss, through an mmap of its map."""

    def __init__(self, mp: Map, layout: dict[str, VarPlace]):
        self._layout = layout
        self._mem = mmap.mmap(mp.fd, max(mp.value_size, mmap.PAGESIZE), mmap.MAP_SHARED,
                              mmap.PROT_READ | mmap.PROT_WRITE)

    def _at(self, name: str, ctype) -> ctypes._CData:
        offset, size = self._layout[name]
        if ctypes.sizeof(ctype) != size:
            raise ValueError(f"{name}: {size} bytes, not {ctypes.sizeof(ctype)}")
        return ctype.from_buffer(self._mem, offset)

    def set(self, name: str, ctype, value) -> None:
        self._at(name, ctype).value = value

    def get(self, name: str, ctype):
        return self._at(name, ctype).value

    def close(self) -> None:
        self._mem.close()


_RINGBUF_SAMPLE_FN = ctypes.CFUNCTYPE(_i, _vp, _vp, ctypes.c_size_t)


class RingBuffer:
    """A BPF ring buffer map, read with a callback per record."""

    def __init__(self, mp: Map, on_record: Callable[[bytes], None]):
        @_RINGBUF_SAMPLE_FN
        def sample(_ctx, data, size):
            on_record(ctypes.string_at(data, size))
            return 0

        self._sample = sample  # keep the callback alive as long as libbpf may call it
        self._p = _check_ptr(_ringbuf_new(mp.fd, sample, None, None), f"ring buffer {mp.name}")

    def poll(self, timeout_ms: int) -> int:
        """Wait up to timeout_ms for records; calls on_record for each; returns their count."""
        ret = _ringbuf_poll(self._p, timeout_ms)
        if ret == -errno.EINTR:
            return 0
        return _check(ret, "poll ring buffer")

    def close(self) -> None:
        if self._p:
            _ringbuf_free(self._p)
            self._p = None


# ---- objects --------------------------------------------------------------


class BpfObject:
    """An opened BPF object file: configure, load, attach, close."""

    def __init__(self, path: str):
        self.path = path
        self._p: int | None = _check_ptr(_open_file(path.encode(), None), f"open {path}")
        self.programs: dict[str, Program] = {}
        p = _next_prog(self._p, None)
        while p:
            prog = Program(p)
            self.programs[prog.name] = prog
            p = _next_prog(self._p, p)
        self.maps: dict[str, Map] = {}
        m = _next_map(self._p, None)
        while m:
            mp = Map(m)
            self.maps[mp.name] = mp
            m = _next_map(self._p, m)

    def __enter__(self) -> BpfObject:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def btf(self) -> Btf:
        return Btf(_check_ptr(_obj_btf(self._p), "object BTF"))

    def rodata(self) -> Map:
        for m in self.maps.values():
            if m.is_internal and m.name.endswith(".rodata"):
                return m
        raise LookupError(f"{self.path} has no .rodata")

    def set_rodata(self, name: str, value: ctypes._CData) -> None:
        """Set a `const volatile` global before load."""
        offset, size = self.btf.section_vars(".rodata")[name]
        if ctypes.sizeof(value) != size:
            raise ValueError(f"{name}: {ctypes.sizeof(value)} bytes given, {size} expected")
        image = self.rodata().initial_value()
        ctypes.memmove(ctypes.addressof(image) + offset, ctypes.byref(value), size)

    def load(self) -> None:
        """Load every program with autoload set; LoadError names a refused one."""
        global _load_warnings
        _load_warnings = warnings = []
        try:
            ret = _obj_load(self._p)
        finally:
            _load_warnings = None
        if ret < 0:
            program, reason = _load_failure(-ret, warnings)
            raise LoadError(-ret, f"load {os.path.basename(self.path)}: {reason}", program, reason)

    def globals(self, section: str = ".bss") -> GlobalVars:
        """The loaded object's global variables of a writable section, shared
        with the kernel (libbpf 1.1 remaps them only for skeletons)."""
        for m in self.maps.values():
            if m.is_internal and m.name.endswith(section):
                return GlobalVars(m, self.btf.section_vars(section))
        raise LookupError(f"{self.path} has no {section}")

    def close(self) -> None:
        if self._p is not None:
            for prog in self.programs.values():
                prog.detach()
            _obj_close(self._p)
            self._p = None
