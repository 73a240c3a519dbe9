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

#endif /* CW_CORE_FIXES_BPF_H */
