// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * Bench only: a tp_btf/sys_exit program that does nothing. Its cost is the
 * price of having any program on raw_syscalls:sys_exit at all (the per-task
 * syscall-tracepoint flag sends every syscall through the slow exit path,
 * plus the BPF trampoline call), i.e. the floor for connwatch's design.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

SEC("tp_btf/sys_exit")
int BPF_PROG(bench_empty_exit, struct pt_regs *regs, long ret)
{
	return 0;
}
