/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Process identity: who did it, as (tgid, start_boottime) plus a name for
 * user space, and which syscall it was in.
 */
#ifndef CW_PROCESS_BPF_H
#define CW_PROCESS_BPF_H

#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
/* uapi syscall numbers of the target architecture */
#include <asm/unistd.h>

#include "connwatch.h"
#include "core_fixes.bpf.h"
#include "maps.bpf.h"

/* procs: identity of every process that appears in a key (key: tgid). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, struct cw_proc);
} procs SEC(".maps");

/*
 * The current task through the helper every supported kernel has
 * (bpf_get_current_task_btf() needs v5.11); every read goes through
 * BPF_CORE_READ, so the untyped pointer is enough.
 */
static __always_inline struct task_struct *current_task(void)
{
	return (struct task_struct *)bpf_get_current_task();
}

static __always_inline __u32 current_tgid(void)
{
	return bpf_get_current_pid_tgid() >> 32;
}

/* The thread group leader's boot-based start time: /proc/<pid>/stat field 22. */
static __always_inline __u64 task_pstart(struct task_struct *task)
{
	return BPF_CORE_READ(task, group_leader, start_boottime);
}

static __always_inline __u64 current_pstart(void)
{
	return task_pstart(current_task());
}

/* Has the current process's last thread begun to exit (signal->live at 0)? */
static __always_inline bool current_process_exiting(void)
{
	return BPF_CORE_READ(current_task(), signal, live.counter) == 0;
}

/*
 * Record (or refresh) the identity of the current process; returns its
 * tgid. Not for a process that is exiting: its entry was removed at
 * sched_process_exit, and the sockets it still closes afterwards
 * (exit_files() runs after that tracepoint) must not bring it back, or its
 * series would outlive it.
 */
static __always_inline __u32 note_current_process(__u64 pstart)
{
	__u32 tgid = current_tgid();
	struct cw_proc *p = bpf_map_lookup_elem(&procs, &tgid);
	struct cw_proc fresh = {};

	if ((p && p->pstart == pstart) || current_process_exiting())
		return tgid;
	fresh.pstart = pstart;
	bpf_get_current_comm(fresh.comm, sizeof(fresh.comm));
	if (bpf_map_update_elem(&procs, &tgid, &fresh, BPF_ANY))
		count_map_full(CW_MAP_PROCS);
	return tgid;
}

/* The process a task belongs to (iterators: not the current task). */
static __always_inline void note_task_process(struct task_struct *task, __u32 tgid, __u64 pstart)
{
	struct cw_proc p = { .pstart = pstart };

	BPF_CORE_READ_STR_INTO(&p.comm, task, group_leader, comm);
	if (bpf_map_update_elem(&procs, &tgid, &p, BPF_NOEXIST) == -E2BIG)
		count_map_full(CW_MAP_PROCS);
}

static __always_inline long syscall_nr(const struct pt_regs *regs)
{
#if defined(__TARGET_ARCH_x86)
	return BPF_CORE_READ(regs, orig_ax);
#elif defined(__TARGET_ARCH_arm64)
	return BPF_CORE_READ(regs, syscallno);
#else
#error "connwatch: add this architecture's syscall-number register"
#endif
}

/* The syscall the current task is in, -1 if none (a kernel thread). */
static __always_inline long current_syscall(void)
{
	struct pt_regs *regs = current_user_regs();

	return regs ? syscall_nr(regs) : -1;
}

static __always_inline __u16 syscall_id(long nr)
{
	switch (nr) {
#ifdef __NR_accept
	case __NR_accept: return CW_SYS_ACCEPT;
#endif
	case __NR_accept4: return CW_SYS_ACCEPT4;
	case __NR_socket: return CW_SYS_SOCKET;
	case __NR_socketpair: return CW_SYS_SOCKETPAIR;
#ifdef __NR_open
	case __NR_open: return CW_SYS_OPEN;
#endif
	case __NR_openat: return CW_SYS_OPENAT;
	case __NR_openat2: return CW_SYS_OPENAT2;
#ifdef __NR_creat
	case __NR_creat: return CW_SYS_CREAT;
#endif
	case __NR_dup: return CW_SYS_DUP;
#ifdef __NR_dup2
	case __NR_dup2: return CW_SYS_DUP2;
#endif
	case __NR_dup3: return CW_SYS_DUP3;
	case __NR_fcntl: return CW_SYS_FCNTL;
#ifdef __NR_pipe
	case __NR_pipe: return CW_SYS_PIPE;
#endif
	case __NR_pipe2: return CW_SYS_PIPE2;
#ifdef __NR_epoll_create
	case __NR_epoll_create: return CW_SYS_EPOLL_CREATE;
#endif
	case __NR_epoll_create1: return CW_SYS_EPOLL_CREATE1;
#ifdef __NR_eventfd
	case __NR_eventfd: return CW_SYS_EVENTFD;
#endif
	case __NR_eventfd2: return CW_SYS_EVENTFD2;
	case __NR_timerfd_create: return CW_SYS_TIMERFD_CREATE;
#ifdef __NR_signalfd
	case __NR_signalfd: return CW_SYS_SIGNALFD;
#endif
	case __NR_signalfd4: return CW_SYS_SIGNALFD4;
#ifdef __NR_inotify_init
	case __NR_inotify_init: return CW_SYS_INOTIFY_INIT;
#endif
	case __NR_inotify_init1: return CW_SYS_INOTIFY_INIT1;
	case __NR_memfd_create: return CW_SYS_MEMFD_CREATE;
	case __NR_recvmsg: return CW_SYS_RECVMSG;
	case __NR_pidfd_open: return CW_SYS_PIDFD_OPEN;
	case __NR_io_uring_setup: return CW_SYS_IO_URING_SETUP;
	case __NR_connect: return CW_SYS_CONNECT;
	case __NR_bind: return CW_SYS_BIND;
	default: return CW_SYS_OTHER;
	}
}

#endif /* CW_PROCESS_BPF_H */
