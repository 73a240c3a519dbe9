/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Failures at a limit, per process and syscall: fd allocation (EMFILE: the
 * process's RLIMIT_NOFILE; ENFILE: fs.file-max) and local-port allocation
 * (no free ephemeral port for connect(), or for bind() to port 0).
 */
#ifndef CW_FAILURES_BPF_H
#define CW_FAILURES_BPF_H

#include <bpf/bpf_helpers.h>
#include <asm-generic/errno.h>

#include "connwatch.h"
#include "maps.bpf.h"
#include "process.bpf.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct cw_fail_key);
	__type(value, __u64);
} fd_failures SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct cw_fail_key);
	__type(value, __u64);
} port_exhaustion SEC(".maps");

static __always_inline void count_failure(void *map, __u32 map_id, long syscall_nr, long err)
{
	__u64 pstart = current_pstart();
	struct cw_fail_key key = {
		.pstart = pstart,
		.tgid = note_current_process(pstart),
		.syscall = syscall_id(syscall_nr),
		.err = err,
	};

	add_u64(map, map_id, &key, 1);
}

/* An fd or a struct file could not be allocated: ret is the error (or a pointer). */
static __always_inline void on_fd_alloc_result(long ret)
{
	if (ret == -EMFILE || ret == -ENFILE)
		count_failure(&fd_failures, CW_MAP_FD_FAILURES, current_syscall(), -ret);
}

/* No local port was free for connect() (EADDRNOTAVAIL). */
static __always_inline void on_connect_port_result(long ret)
{
	if (ret == -EADDRNOTAVAIL)
		count_failure(&port_exhaustion, CW_MAP_PORT_EXHAUSTION, current_syscall(), -ret);
}

/*
 * inet_csk_get_port() failed for a bind() to port 0: no free local port
 * (bind() then fails with EADDRINUSE). A failure for a given port is a
 * conflict, not exhaustion.
 */
static __always_inline void on_bind_port_result(unsigned short snum, long ret)
{
	if (ret && !snum)
		count_failure(&port_exhaustion, CW_MAP_PORT_EXHAUSTION, current_syscall(), EADDRINUSE);
}

#endif /* CW_FAILURES_BPF_H */
