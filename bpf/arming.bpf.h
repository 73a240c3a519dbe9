/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * The early trigger for the syscall hook armed on demand. On kernels where
 * fd-allocation failures can only be seen at every syscall's exit (no
 * fentry, no kprobes), the agent attaches that hook only while something
 * nears a limit, which it checks on each refresh. A burst between two
 * refreshes is caught here: where a process touches a socket in its own
 * context (its first I/O on a new connection, connect(), listen()), its
 * lowest free fd is compared with arm_ratio of its RLIMIT_NOFILE, and the
 * agent is woken through a ring buffer.
 */
#ifndef CW_ARMING_BPF_H
#define CW_ARMING_BPF_H

#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
/* RLIMIT_NOFILE, uapi */
#include <asm-generic/resource.h>

#include "connwatch.h"
#include "process.bpf.h"

/* Filled in by the loader: on only while the syscall hook is armed on demand. */
const volatile bool arm_trigger = false;
const volatile __u32 arm_ratio_permille = 500;

/* Written by the agent while the hook is attached: no need to wake it then. */
__u32 syscall_hook_armed = 0;
/* The last wake-up, so a busy process cannot flood the ring buffer. */
__u64 last_arm_wakeup_ns = 0;

#define CW_ARM_WAKEUP_INTERVAL_NS (100 * 1000 * 1000ULL)

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4096);
} arm_events SEC(".maps");

static __always_inline void check_fd_headroom(void)
{
	struct task_struct *task;
	struct cw_arm_event e = {};
	__u64 now, next_fd, limit;

	if (!arm_trigger || syscall_hook_armed)
		return;
	task = current_task();
	/* fds are handed out lowest first: next_fd is the count, less any holes */
	next_fd = BPF_CORE_READ(task, files, next_fd);
	limit = BPF_CORE_READ(task, signal, rlim[RLIMIT_NOFILE].rlim_cur);
	if (next_fd * 1000 < limit * arm_ratio_permille)
		return;
	now = bpf_ktime_get_ns();
	if (now - last_arm_wakeup_ns < CW_ARM_WAKEUP_INTERVAL_NS)
		return;
	last_arm_wakeup_ns = now;
	e.tgid = current_tgid();
	e.pstart = task_pstart(task);
	e.reason = CW_ARM_FDS;
	e.used = next_fd;
	e.limit = limit;
	bpf_ringbuf_output(&arm_events, &e, sizeof(e), 0);
}

#endif /* CW_ARMING_BPF_H */
