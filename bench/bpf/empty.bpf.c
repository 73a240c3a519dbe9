// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * Bench only: programs that do nothing, on the hooks connwatch uses. With
 * kernel.bpf_stats_enabled=1 their ns per run is the floor every program on
 * the same hook pays in bpf_stats' accounting (the clock reads around the
 * program, the call into it); a connwatch program's ns per run minus its
 * empty twin's is the work connwatch's own code does. The harness attaches
 * only the programs a measurement names (see bench/common.py:Bpf).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/*
 * The price of having any program on raw_syscalls:sys_exit at all: the
 * per-task syscall-tracepoint flag sends every syscall through the slow
 * exit path, plus the tracepoint's call into BPF. What an armed syscall
 * hook costs before connwatch's program does anything.
 */
SEC("tp_btf/sys_exit")
int BPF_PROG(bench_empty_exit, struct pt_regs *regs, long ret)
{
	return 0;
}

/* Twins of cw_sock_send / cw_sock_recv (classification, first-I/O claim). */
SEC("tp_btf/sock_send_length")
int BPF_PROG(bench_empty_send, struct sock *sk, int ret, int flags)
{
	return 0;
}

SEC("tp_btf/sock_recv_length")
int BPF_PROG(bench_empty_recv, struct sock *sk, int ret, int flags)
{
	return 0;
}

/*
 * Twins of cw_sock_state and cw_sock_state_nested: connwatch attaches two
 * programs to inet_sock_set_state (see bpf/connwatch.bpf.c), so the floor
 * is two dispatches per state change.
 */
SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(bench_empty_state, struct sock *sk, int oldstate, int newstate)
{
	return 0;
}

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(bench_empty_state2, struct sock *sk, int oldstate, int newstate)
{
	return 0;
}

/*
 * Twin of cw_accept_fexit, for kernels with fentry/fexit (the Debian
 * kernels in tests/kernels/run-in-vm; this development host refuses it).
 */
SEC("fexit/inet_csk_accept")
int BPF_PROG(bench_empty_accept)
{
	return 0;
}
