/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Kernel-version shims. vmlinux.h is generated from the floor kernel (Debian
 * 11's 5.10, see bpf/vmlinux/), so anything newer is declared here as a
 * local "flavor" (a ___cw suffix that libbpf strips when it matches names)
 * and used only behind a CO-RE existence check. Each shim names the kernel
 * change it works around.
 */
#ifndef CW_CORE_FIXES_BPF_H
#define CW_CORE_FIXES_BPF_H

#include <bpf/bpf_core_read.h>

/*
 * Helper ids that arrived after the floor, to test for with
 * bpf_core_enum_value_exists(enum bpf_func_id___cw, ...).
 */
enum bpf_func_id___cw {
	/* v5.15, "bpf: Add bpf_task_pt_regs() helper" */
	BPF_FUNC_task_pt_regs___cw = 1,
};

/*
 * The registers the current task entered the kernel with (its syscall
 * number and arguments). bpf_task_pt_regs() arrived in v5.15 ("bpf: Add
 * bpf_task_pt_regs() helper"; it wants the typed task pointer of
 * bpf_get_current_task_btf(), v5.11); before, compute task_pt_regs() as
 * x86-64 and arm64 do: the pt_regs sit at the top of the task's kernel
 * stack (THREAD_SIZE 16 KiB on both without KASAN, which distribution
 * kernels do not enable; no TOP_OF_KERNEL_STACK_PADDING on 64-bit). NULL
 * for kernel threads, which have no user registers.
 */
#define CW_THREAD_SIZE (16 * 1024)

static __always_inline struct pt_regs *current_user_regs(void)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	void *stack;

	if (!BPF_CORE_READ(task, mm))
		return NULL;
	if (bpf_core_enum_value_exists(enum bpf_func_id___cw, BPF_FUNC_task_pt_regs___cw))
		return (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
	stack = BPF_CORE_READ(task, stack);
	return stack ? (struct pt_regs *)(stack + CW_THREAD_SIZE) - 1 : NULL;
}

/*
 * The drop reason of the kfree_skb tracepoint. The argument arrived in
 * v5.17 ("net: skb: introduce kfree_skb_reason()"); the reason for handshake
 * ACKs dropped on a full accept queue, SKB_DROP_REASON_TCP_LISTEN_OVERFLOW,
 * in v6.15. Older kernels count those drops at tcp_v{4,6}_syn_recv_sock().
 */
enum skb_drop_reason___cw {
	SKB_DROP_REASON_TCP_LISTEN_OVERFLOW___cw = 1,
};

static __always_inline bool is_listen_overflow(unsigned int reason)
{
	if (!bpf_core_enum_value_exists(enum skb_drop_reason___cw,
					SKB_DROP_REASON_TCP_LISTEN_OVERFLOW___cw))
		return false;
	return reason == bpf_core_enum_value(enum skb_drop_reason___cw,
					     SKB_DROP_REASON_TCP_LISTEN_OVERFLOW___cw);
}

/*
 * The return value of an fexit program: it follows the traced function's
 * arguments in the context, so its slot depends on the function's arity,
 * which changes between kernels (measured in the kernels' BTF:
 * inet_csk_accept has 4 on 5.10 and 6.1, 2 from v6.10 on, when its
 * arguments became a struct proto_accept_arg; tcp_recvmsg has 6 on 5.10, 5
 * from v5.19 on, "net: remove noblock parameter from recvmsg() entities",
 * 4 on 6.18; tcp_v4_syn_recv_sock has 6 on 6.1, 7 on 6.12). The loader
 * reads the arity from the running kernel's BTF into a `const volatile`
 * before load, so the verifier sees a constant and visits
 * only the matching case: ctx slots past the real return value are never
 * checked.
 */
#define CTX_SLOT(ctx, offset) ({						\
	__u64 __slot;								\
	asm volatile("%0 = *(u64 *)(%1 + " #offset ")" : "=r"(__slot) : "r"(ctx)); \
	__slot;									\
})

static __always_inline __u64 fexit_ret(const __u64 *ctx, __u32 nargs)
{
	/*
	 * One load with a constant offset per case, in assembly: written in C,
	 * clang folds the cases into ctx + 8 * nargs, and the verifier refuses
	 * context access at a computed offset.
	 */
	switch (nargs) {
	case 0: return CTX_SLOT(ctx, 0);
	case 1: return CTX_SLOT(ctx, 8);
	case 2: return CTX_SLOT(ctx, 16);
	case 3: return CTX_SLOT(ctx, 24);
	case 4: return CTX_SLOT(ctx, 32);
	case 5: return CTX_SLOT(ctx, 40);
	case 6: return CTX_SLOT(ctx, 48);
	case 7: return CTX_SLOT(ctx, 56);
	default: return 0;
	}
}

/*
 * net.ipv4.ip_local_port_range of a network namespace. Up to v6.7 it is
 * `int range[2]` under a seqlock (`struct local_ports` in vmlinux.h); v6.8
 * made it one u32, high << 16 | low, read with READ_ONCE (d9f28735af87
 * "Use READ/WRITE_ONCE() for IP local_port_range.", David Laight; in the
 * kernels' BTF: 5.10 and 6.1 have the pair, 6.12 the u32). Which one
 * the kernel has is told by the field's type: the u32 flavor's `range`
 * exists only where it is not an array. The pair is read without the
 * seqlock: a read racing a sysctl write may see the old low with the new
 * high, for one refresh.
 */
struct local_ports___cw_u32 {
	__u32 range;
} __attribute__((preserve_access_index));

static __always_inline void read_local_port_range(struct net *net, __u16 *low, __u16 *high)
{
	struct local_ports *ports = &net->ipv4.ip_local_ports;

	if (bpf_core_field_exists(struct local_ports___cw_u32, range)) {
		__u32 range = BPF_CORE_READ((struct local_ports___cw_u32 *)ports, range);

		*low = range & 0xffff;
		*high = range >> 16;
	} else {
		*low = BPF_CORE_READ(ports, range[0]);
		*high = BPF_CORE_READ(ports, range[1]);
	}
}

/*
 * net.ipv4.tcp_max_tw_buckets of a network namespace. `tcp_death_row` is
 * embedded in struct netns_ipv4 on 5.10 and again from v6.1 on, but a
 * pointer in between: v5.17 moved it out ("tcp: allocate tcp_death_row
 * outside of struct netns_ipv4", Eric Dumazet, fbb8295248e1), v6.1 moved it
 * back ("tcp: Don't allocate tcp_death_row outside of struct netns_ipv4.",
 * Kuniyuki Iwashima, e9bd0cca09d1). None of the matrix's kernels (5.10,
 * 6.1, 6.12) has the pointer; 5.17 to 6.0 do. The flavor's pointer member exists only
 * on the kernels in between (a pointer does not match an embedded struct).
 */
struct netns_ipv4___cw_tw_ptr {
	struct inet_timewait_death_row *tcp_death_row;
} __attribute__((preserve_access_index));

static __always_inline __u32 read_max_tw_buckets(struct net *net)
{
	struct netns_ipv4___cw_tw_ptr *moved = (struct netns_ipv4___cw_tw_ptr *)&net->ipv4;

	if (bpf_core_field_exists(struct netns_ipv4___cw_tw_ptr, tcp_death_row))
		return BPF_CORE_READ(moved, tcp_death_row, sysctl_max_tw_buckets);
	if (bpf_core_field_exists(net->ipv4.tcp_death_row))
		return BPF_CORE_READ(net, ipv4.tcp_death_row.sysctl_max_tw_buckets);
	return 0;
}

#endif /* CW_CORE_FIXES_BPF_H */
