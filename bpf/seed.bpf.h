/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Start-up seeding: listeners and accepted connections that predate the
 * agent, found once by walking every process's fd table (all network
 * namespaces). Never on the refresh path.
 */
#ifndef CW_SEED_BPF_H
#define CW_SEED_BPF_H

#include <bpf/bpf_core_read.h>

#include "connwatch.h"
#include "conn.bpf.h"
#include "listeners.bpf.h"
#include "process.bpf.h"
#include "sock.bpf.h"

/* A listening socket found in task's fd table, recorded as if we had seen it start listening. */
static __always_inline void seed_listener(struct task_struct *task, struct sock *sk)
{
	__u32 tgid = BPF_CORE_READ(task, tgid);
	__u64 pstart = task_pstart(task);

	note_task_process(task, tgid, pstart);
	note_listener(sk, tgid, pstart);
}

/* Has anything been exchanged on this connection yet? */
static __always_inline bool exchanged_data(const struct sock *sk)
{
	const struct tcp_sock *tp = (const struct tcp_sock *)sk;

	return BPF_CORE_READ(tp, bytes_received) || BPF_CORE_READ(tp, bytes_sent);
}

/*
 * A connection found in task's fd table. An untracked one whose local
 * address is a listener's (so it was accepted, not made outbound) is
 * tracked under its holder, without an accept time.
 */
static __always_inline void seed_connection(struct task_struct *task, struct sock *sk, int state)
{
	struct cw_sock s = {};
	__u64 key = (__u64)sk;
	__u32 tgid;
	__u64 pstart;

	if (state == TCP_CLOSE || state == TCP_SYN_SENT || bpf_map_lookup_elem(&socks, &key))
		return;
	if (!listener_of(sk))
		return; /* an outbound connection */
	tgid = BPF_CORE_READ(task, tgid);
	pstart = task_pstart(task);
	init_sock(&s, sk, 0, tgid, pstart);
	if (exchanged_data(sk))
		s.class_state = CW_CLASS_DONE; /* mid-stream: its first exchange is gone */
	note_task_process(task, tgid, pstart);
	track(sk, &s, SEEN_IN_FD_TABLE);
}

#endif /* CW_SEED_BPF_H */
