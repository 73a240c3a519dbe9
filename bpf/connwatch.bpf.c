// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * connwatch: in-kernel accounting of accepted TCP connections, fd-allocation
 * failures, ephemeral-port exhaustion, listen() backlogs and accept-queue
 * overflow drops. Everything is aggregated here; user space reads the maps
 * when it refreshes.
 *
 * Each logical probe has several programs, one per way to attach it: fentry/
 * fexit on the kernel function where the event happens (every distribution
 * kernel), kprobe/kretprobe on the same function (kernels whose fentry
 * cannot attach), and a tracepoint fallback (kernels with neither, like the
 * development host). The loader (agent/connwatch/probes.py) picks one per
 * probe at start-up and loads only those. This file holds only the programs;
 * the headers hold the logic, by concern.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include <asm-generic/errno.h>

#include "connwatch.h"
#include "core_fixes.bpf.h"
#include "maps.bpf.h"
#include "process.bpf.h"
#include "sock.bpf.h"
#include "conn.bpf.h"
#include "listeners.bpf.h"
#include "arming.bpf.h"
#include "classify.bpf.h"
#include "failures.bpf.h"
#include "seed.bpf.h"
#include "port_use.bpf.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/*
 * Arity of each function hooked with fexit (see fexit_ret()), filled in by
 * the loader from the running kernel's BTF: nargs_<function>.
 */
const volatile __u32 nargs_inet_csk_accept = 0;
const volatile __u32 nargs___sys_listen = 0;
const volatile __u32 nargs_alloc_fd = 0;
const volatile __u32 nargs_alloc_empty_file = 0;
const volatile __u32 nargs_inet_hash_connect = 0;
const volatile __u32 nargs_inet6_hash_connect = 0;
const volatile __u32 nargs_inet_csk_get_port = 0;
const volatile __u32 nargs_tcp_recvmsg = 0;
const volatile __u32 nargs_tcp_v4_syn_recv_sock = 0;
const volatile __u32 nargs_tcp_v6_syn_recv_sock = 0;

/* No accept hook: count connections at their handshake (see on_passive_open). */
const volatile bool count_at_handshake = false;
/* What the syscall hook does: the jobs no function hook covers on this kernel. */
const volatile bool syscall_hook_counts_fd_failures = false;
const volatile bool syscall_hook_counts_port_exhaustion = false;
const volatile bool syscall_hook_sees_listen = false;

/*
 * Never read: it pulls the shared enums and records into the object's BTF,
 * where the agent checks its Python mirrors against this build.
 */
const volatile struct {
	enum cw_kind kind;
	enum cw_map_id map_id;
	enum cw_syscall syscall;
	enum cw_class_state class_state;
	enum cw_arm_reason arm_reason;
	struct cw_port_use_key port_use_key;
	struct cw_port_use port_use;
	struct cw_arm_event arm_event;
} cw_btf_anchor = {};

/* Arguments a kprobe saves for its kretprobe, per thread. */
struct kprobe_args {
	__u64 arg0;
	__u64 arg1;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct kprobe_args);
} kprobe_args SEC(".maps");

static __always_inline void save_args(__u64 arg0, __u64 arg1)
{
	struct kprobe_args args = { .arg0 = arg0, .arg1 = arg1 };
	__u64 tid = bpf_get_current_pid_tgid();

	bpf_map_update_elem(&kprobe_args, &tid, &args, BPF_ANY);
}

static __always_inline bool take_args(struct kprobe_args *out)
{
	__u64 tid = bpf_get_current_pid_tgid();
	struct kprobe_args *args = bpf_map_lookup_elem(&kprobe_args, &tid);

	if (!args)
		return false;
	*out = *args;
	bpf_map_delete_elem(&kprobe_args, &tid);
	return true;
}

/* ---- accept: a connection starts, owned by the accepting process ---------- */

static __always_inline void on_accept(struct sock *sk)
{
	struct cw_sock s = {};
	__u64 pstart;

	if (!sk || !is_tcp_inet(sk))
		return;
	pstart = current_pstart();
	init_sock(&s, sk, bpf_ktime_get_ns(), note_current_process(pstart), pstart);
	track(sk, &s, SEEN_AT_ACCEPT);
}

SEC("fexit/inet_csk_accept")
int BPF_PROG(cw_accept_fexit)
{
	on_accept((struct sock *)fexit_ret(ctx, nargs_inet_csk_accept));
	return 0;
}

SEC("kretprobe/inet_csk_accept")
int BPF_KRETPROBE(cw_accept_kretprobe, struct sock *sk)
{
	on_accept(sk);
	return 0;
}

/*
 * Without an accept hook: a connection starts when its handshake completes
 * (SYN_RECV -> ESTABLISHED, in softirq), owned and accepted by the
 * listener's owner until another process does its first I/O on it.
 */
static __always_inline void on_passive_open(struct sock *sk)
{
	struct listen_owner *owner;
	struct cw_sock s = {};

	/* the second program of the pair finds the first one's entry: done */
	if (sock_lookup(sk) || !is_tcp_inet(sk))
		return;
	owner = listener_of(sk);
	if (!owner)
		return;
	init_sock(&s, sk, bpf_ktime_get_ns(), owner->tgid, owner->pstart);
	track(sk, &s, SEEN_AT_HANDSHAKE);
}

/* ---- state changes: listeners, CLOSE_WAIT, the end of a connection -------- */

static __always_inline void on_listen_start(struct sock *sk)
{
	__u64 pstart;

	if (!is_tcp_inet(sk))
		return;
	pstart = current_pstart();
	note_listener(sk, note_current_process(pstart), pstart);
	check_fd_headroom();
}

/*
 * A process is closing a connection (FIN_WAIT1, LAST_ACK): if it was queued
 * and never touched, this is the first sign it was accepted (see `queued`).
 */
static __always_inline void settle_closing(struct sock *sk)
{
	struct cw_sock *s;
	__u64 pstart;

	if (!count_at_handshake)
		return;
	s = sock_lookup_tracked(sk);
	if (!s || !s->queued || !grafted(sk))
		return;
	pstart = current_pstart();
	settle_queued(sk, s, note_current_process(pstart), pstart);
}

static __always_inline void on_state_change(struct sock *sk, int oldstate, int newstate)
{
	switch (newstate) {
	case TCP_ESTABLISHED:
		if (oldstate == TCP_SYN_RECV && count_at_handshake)
			on_passive_open(sk);
		break;
	case TCP_LISTEN:
		on_listen_start(sk); /* in the context of the listen() caller */
		break;
	case TCP_SYN_SENT:
		check_fd_headroom(); /* in the context of the connect() caller */
		break;
	case TCP_CLOSE_WAIT:
		set_close_wait(sk, true);
		break;
	case TCP_FIN_WAIT1:
		settle_closing(sk);
		break;
	case TCP_LAST_ACK:
		if (oldstate == TCP_CLOSE_WAIT)
			set_close_wait(sk, false);
		settle_closing(sk);
		break;
	case TCP_CLOSE:
		if (oldstate == TCP_LISTEN)
			forget_listener(sk);
		else
			close_entry(sk);
		break;
	}
}

/*
 * The same handler twice. A tracing program does not run nested on one
 * CPU: when a close in process context is interrupted by a softirq that
 * closes another socket, the nested run is skipped (recursion_misses), and
 * that TCP_CLOSE would be lost. The tracepoint calls both programs; if one
 * is busy, the other runs, and each handler is idempotent (the map delete
 * decides which one accounts a close).
 *
 * The second copy works only for an event the first did not finish on
 * this CPU, i.e. one it was skipped for: in the common case, where the
 * first (attached first, so called first) has just handled this very
 * event, the second returns after one per-CPU compare. The first records
 * what it finished as it returns, so there is no window: an event that
 * nests anywhere in the first's run, its prologue and epilogue included,
 * does not match the record of the one before. Where a kernel lets a
 * raw-tracepoint program run nested, or calls the copies the other way
 * round, the second may repeat the first's work: idempotence covers that.
 */
struct sock_state_event {
	__u64 sk;
	__u32 states;	/* oldstate << 16 | newstate */
	__u32 _pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sock_state_event);
} sock_state_done SEC(".maps");

static __always_inline __u32 state_pair(int oldstate, int newstate)
{
	return (__u32)oldstate << 16 | (__u16)newstate;
}

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(cw_sock_state, struct sock *sk, int oldstate, int newstate)
{
	__u32 zero = 0;
	struct sock_state_event *done;

	on_state_change(sk, oldstate, newstate);
	done = bpf_map_lookup_elem(&sock_state_done, &zero);
	if (done) {
		/*
		 * Per-CPU, written only here. Where this program can run
		 * nested, a record torn by a nested run only makes the second
		 * copy repeat work; where it cannot, the second copy does the
		 * work for every event this one was skipped for.
		 */
		done->sk = (__u64)sk;
		done->states = state_pair(oldstate, newstate);
	}
	return 0;
}

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(cw_sock_state_nested, struct sock *sk, int oldstate, int newstate)
{
	__u32 zero = 0;
	struct sock_state_event *done = bpf_map_lookup_elem(&sock_state_done, &zero);

	if (done && done->sk == (__u64)sk && done->states == state_pair(oldstate, newstate))
		return 0;
	on_state_change(sk, oldstate, newstate);
	return 0;
}

/* ---- listen(): the requested backlog -------------------------------------- */

static __always_inline void on_listen_result(long fd, long backlog, long ret)
{
	struct sock *sk;

	if (ret)
		return;
	sk = current_tcp_sock(fd);
	if (sk)
		note_backlog_requested(sk, backlog);
}

SEC("fexit/__sys_listen")
int BPF_PROG(cw_listen_fexit, int fd, int backlog)
{
	on_listen_result(fd, backlog, (int)fexit_ret(ctx, nargs___sys_listen));
	return 0;
}

SEC("kprobe/__sys_listen")
int BPF_KPROBE(cw_listen_kprobe, int fd, int backlog)
{
	save_args(fd, backlog);
	return 0;
}

SEC("kretprobe/__sys_listen")
int BPF_KRETPROBE(cw_listen_kretprobe, int ret)
{
	struct kprobe_args args;

	if (take_args(&args))
		on_listen_result((int)args.arg0, (int)args.arg1, ret);
	return 0;
}

/* ---- fd allocation: EMFILE where fds are allocated, ENFILE where files are - */

SEC("fexit/alloc_fd")
int BPF_PROG(cw_alloc_fd_fexit)
{
	on_fd_alloc_result((int)fexit_ret(ctx, nargs_alloc_fd));
	return 0;
}

SEC("kretprobe/alloc_fd")
int BPF_KRETPROBE(cw_alloc_fd_kretprobe, int ret)
{
	on_fd_alloc_result(ret);
	return 0;
}

SEC("fexit/alloc_empty_file")
int BPF_PROG(cw_alloc_file_fexit)
{
	on_fd_alloc_result((long)fexit_ret(ctx, nargs_alloc_empty_file));
	return 0;
}

SEC("kretprobe/alloc_empty_file")
int BPF_KRETPROBE(cw_alloc_file_kretprobe, long ret)
{
	on_fd_alloc_result(ret);
	return 0;
}

/* ---- local ports: where connect() and bind() pick one ---------------------- */

SEC("fexit/inet_hash_connect")
int BPF_PROG(cw_hash_connect_fexit)
{
	on_connect_port_result((int)fexit_ret(ctx, nargs_inet_hash_connect));
	return 0;
}

SEC("fexit/inet6_hash_connect")
int BPF_PROG(cw_hash_connect6_fexit)
{
	on_connect_port_result((int)fexit_ret(ctx, nargs_inet6_hash_connect));
	return 0;
}

SEC("kretprobe/inet_hash_connect")
int BPF_KRETPROBE(cw_hash_connect_kretprobe, int ret)
{
	on_connect_port_result(ret);
	return 0;
}

SEC("kretprobe/inet6_hash_connect")
int BPF_KRETPROBE(cw_hash_connect6_kretprobe, int ret)
{
	on_connect_port_result(ret);
	return 0;
}

SEC("fexit/inet_csk_get_port")
int BPF_PROG(cw_get_port_fexit, struct sock *sk, unsigned short snum)
{
	on_bind_port_result(snum, (int)fexit_ret(ctx, nargs_inet_csk_get_port));
	return 0;
}

SEC("kprobe/inet_csk_get_port")
int BPF_KPROBE(cw_get_port_kprobe, struct sock *sk, unsigned short snum)
{
	save_args(snum, 0);
	return 0;
}

SEC("kretprobe/inet_csk_get_port")
int BPF_KRETPROBE(cw_get_port_kretprobe, int ret)
{
	struct kprobe_args args;

	if (take_args(&args))
		on_bind_port_result(args.arg0, ret);
	return 0;
}

/* ---- the syscall hook: the fallback for the three probes above ------------- */

/* bind() to port 0 (the kernel picks the port); sockaddr's port is at offset 2 for IPv4 and IPv6. */
static __always_inline bool binds_any_port(const struct pt_regs *regs)
{
	__u16 head[2] = {};

	if (bpf_probe_read_user(head, sizeof(head), (void *)PT_REGS_PARM2_CORE_SYSCALL(regs)))
		return false;
	return (head[0] == AF_INET || head[0] == AF_INET6) && head[1] == 0;
}

/*
 * Every syscall return: attached only while needed (see arming.bpf.h), as
 * any syscall tracepoint slows every syscall on the host. The common path
 * is two compares.
 */
SEC("tp_btf/sys_exit")
int BPF_PROG(cw_sys_exit, struct pt_regs *regs, long ret)
{
	long nr = syscall_nr(regs);

	if (ret >= 0) {
		if (syscall_hook_sees_listen && nr == __NR_listen)
			on_listen_result(PT_REGS_PARM1_CORE_SYSCALL(regs), PT_REGS_PARM2_CORE_SYSCALL(regs), ret);
		return 0;
	}
	if (ret == -EMFILE || ret == -ENFILE) {
		if (syscall_hook_counts_fd_failures)
			count_failure(&fd_failures, CW_MAP_FD_FAILURES, nr, -ret);
	} else if ((ret == -EADDRNOTAVAIL && nr == __NR_connect) ||
		   (ret == -EADDRINUSE && nr == __NR_bind && binds_any_port(regs))) {
		if (syscall_hook_counts_port_exhaustion)
			count_failure(&port_exhaustion, CW_MAP_PORT_EXHAUSTION, nr, -ret);
	}
	return 0;
}

/* ---- send and receive: classification and first-I/O ownership -------------- */

static __always_inline int peek_len(size_t size)
{
	return size > CW_PEEK_LEN ? CW_PEEK_LEN : size;
}

SEC("fentry/tcp_sendmsg")
int BPF_PROG(cw_sendmsg_fentry, struct sock *sk, struct msghdr *msg, size_t size)
{
	on_send(sk, peek_len(size));
	return 0;
}

SEC("fexit/tcp_recvmsg")
int BPF_PROG(cw_recvmsg_fexit, struct sock *sk)
{
	on_recv(sk, (int)fexit_ret(ctx, nargs_tcp_recvmsg));
	return 0;
}

SEC("kprobe/tcp_sendmsg")
int BPF_KPROBE(cw_sendmsg_kprobe, struct sock *sk, struct msghdr *msg, size_t size)
{
	on_send(sk, peek_len(size));
	return 0;
}

SEC("kprobe/tcp_recvmsg")
int BPF_KPROBE(cw_recvmsg_kprobe, struct sock *sk)
{
	save_args((__u64)sk, 0);
	return 0;
}

SEC("kretprobe/tcp_recvmsg")
int BPF_KRETPROBE(cw_recvmsg_kretprobe, int ret)
{
	struct kprobe_args args;

	if (take_args(&args))
		on_recv((struct sock *)args.arg0, ret);
	return 0;
}

SEC("tp_btf/sock_send_length")
int BPF_PROG(cw_sock_send, struct sock *sk, int ret, int flags)
{
	on_send(sk, ret);
	return 0;
}

SEC("tp_btf/sock_recv_length")
int BPF_PROG(cw_sock_recv, struct sock *sk, int ret, int flags)
{
	on_recv(sk, ret);
	return 0;
}

/* ---- accept-queue overflow: handshakes dropped on a full queue ------------ */

/* tcp_v{4,6}_syn_recv_sock() returns no child when the listener's queue is full. */
static __always_inline void on_syn_recv_result(struct sock *listener, __u64 child)
{
	if (!child && accept_queue_full(listener))
		count_overflow_drop((__u64)listener);
}

SEC("fexit/tcp_v4_syn_recv_sock")
int BPF_PROG(cw_syn_recv_fexit, struct sock *sk)
{
	on_syn_recv_result(sk, fexit_ret(ctx, nargs_tcp_v4_syn_recv_sock));
	return 0;
}

SEC("fexit/tcp_v6_syn_recv_sock")
int BPF_PROG(cw_syn_recv6_fexit, struct sock *sk)
{
	on_syn_recv_result(sk, fexit_ret(ctx, nargs_tcp_v6_syn_recv_sock));
	return 0;
}

SEC("kprobe/tcp_v4_syn_recv_sock")
int BPF_KPROBE(cw_syn_recv_kprobe, struct sock *sk)
{
	save_args((__u64)sk, 0);
	return 0;
}

SEC("kretprobe/tcp_v4_syn_recv_sock")
int BPF_KRETPROBE(cw_syn_recv_kretprobe, void *child)
{
	struct kprobe_args args;

	if (take_args(&args))
		on_syn_recv_result((struct sock *)args.arg0, (__u64)child);
	return 0;
}

SEC("kprobe/tcp_v6_syn_recv_sock")
int BPF_KPROBE(cw_syn_recv6_kprobe, struct sock *sk)
{
	save_args((__u64)sk, 0);
	return 0;
}

SEC("kretprobe/tcp_v6_syn_recv_sock")
int BPF_KRETPROBE(cw_syn_recv6_kretprobe, void *child)
{
	struct kprobe_args args;

	if (take_args(&args))
		on_syn_recv_result((struct sock *)args.arg0, (__u64)child);
	return 0;
}

/* The listener a dropped handshake ACK was for: (netns, destination address, port). */
static __always_inline struct listen_owner *listener_of_packet(struct sk_buff *skb)
{
	struct listen_key port = {};
	unsigned char *head = BPF_CORE_READ(skb, head);
	__u16 nh = BPF_CORE_READ(skb, network_header), th = BPF_CORE_READ(skb, transport_header);
	struct net_device *dev = BPF_CORE_READ(skb, dev);
	struct tcphdr tcp;
	__u8 version = 0;

	if (!dev || bpf_probe_read_kernel(&tcp, sizeof(tcp), head + th) ||
	    bpf_probe_read_kernel(&version, 1, head + nh))
		return NULL;
	port.netns = BPF_CORE_READ(dev, nd_net.net, ns.inum);
	port.lport = bpf_ntohs(tcp.dest);
	if (version >> 4 == 6) {
		bpf_probe_read_kernel(port.addr, CW_ADDR_LEN, head + nh + offsetof(struct ipv6hdr, daddr));
	} else {
		ipv4_mapped_prefix(port.addr);
		bpf_probe_read_kernel(&port.addr[12], 4, head + nh + offsetof(struct iphdr, daddr));
	}
	return listener_for(&port);
}

/*
 * Handshake ACKs dropped because the listener's accept queue was full, on
 * kernels that name that drop reason. (SYNs dropped for the same reason
 * are in the listener's sk_drops.)
 */
SEC("tp_btf/kfree_skb")
int BPF_PROG(cw_kfree_skb, struct sk_buff *skb, void *location, unsigned int reason)
{
	struct listen_owner *owner;

	if (!is_listen_overflow(reason))
		return 0;
	owner = listener_of_packet(skb);
	if (owner)
		count_overflow_drop(owner->sk);
	return 0;
}

/* ---- processes ---------------------------------------------------------------- */

/* A process is gone: forget its identity so user space drops its series. */
SEC("tp_btf/sched_process_exit")
int BPF_PROG(cw_process_exit, struct task_struct *task)
{
	__u32 tgid = BPF_CORE_READ(task, tgid);
	struct cw_proc *p;

	/* do_exit() drops signal->live before this tracepoint: 0 = last thread */
	if (BPF_CORE_READ(task, signal, live.counter) != 0)
		return 0;
	p = bpf_map_lookup_elem(&procs, &tgid);
	if (p && p->pstart == task_pstart(task))
		bpf_map_delete_elem(&procs, &tgid);
	return 0;
}

/* ---- iterators ------------------------------------------------------------------ */

/* Start-up seeding, pass 1: every listening TCP socket, in every network namespace. */
SEC("iter/task_file")
int cw_seed_listeners(struct bpf_iter__task_file *ctx)
{
	struct task_struct *task = ctx->task;
	struct sock *sk = task ? tcp_sock_of_file(ctx->file) : NULL;

	if (sk && sock_state(sk) == TCP_LISTEN)
		seed_listener(task, sk);
	return 0;
}

/* Start-up seeding, pass 2: the accepted connections held in fd tables. */
SEC("iter/task_file")
int cw_seed_conns(struct bpf_iter__task_file *ctx)
{
	struct task_struct *task = ctx->task;
	struct sock *sk = task ? tcp_sock_of_file(ctx->file) : NULL;
	int state;

	if (!sk)
		return 0;
	state = sock_state(sk);
	if (state != TCP_LISTEN)
		seed_connection(task, sk, state);
	return 0;
}

static long settle_if_accepted_cb(struct bpf_map *map, __u64 *key, __u8 *unused_value, void *unused)
{
	settle_if_accepted(key);
	return 0;
}

static long refresh_listener_cb(struct bpf_map *map, __u64 *key, struct cw_listener *l, void *unused)
{
	refresh_listener(*key, l);
	return 0;
}

/*
 * Each refresh, just before the agent reads the listeners map: the live
 * queue of every known listener, refreshed in the map, so the work grows
 * with listeners, not with fds (and no seq_file page limits the count);
 * and, without an accept hook, the queued connections some process has
 * since accepted (see `queued`). Driven by the iterator over BPF maps,
 * whose first call walks our maps with bpf_for_each_map_elem() (v5.13):
 * the map-element iterator, which needs neither, is refused by some
 * kernels (the development host).
 */
SEC("iter/bpf_map")
int cw_listener_stats(struct bpf_iter__bpf_map *ctx)
{
	if (ctx->meta->seq_num || !ctx->map)
		return 0;
	if (count_at_handshake)
		bpf_for_each_map_elem(&queued, settle_if_accepted_cb, NULL, 0);
	bpf_for_each_map_elem(&listeners, refresh_listener_cb, NULL, 0);
	return 0;
}

/*
 * The same without bpf_for_each_map_elem() (before v5.13), as two
 * iterators over map elements (v5.9), run in this order: one over `queued`
 * (handshake counting only: runs, and finds nothing, otherwise), one over
 * the listeners map.
 */
SEC("iter/bpf_map_elem")
int cw_queued_settle_elem(struct bpf_iter__bpf_map_elem *ctx)
{
	__u64 *key = ctx->key;

	if (key && count_at_handshake)
		settle_if_accepted(key);
	return 0;
}

SEC("iter/bpf_map_elem")
int cw_listener_stats_elem(struct bpf_iter__bpf_map_elem *ctx)
{
	struct cw_listener *l = ctx->value;
	__u64 *key = ctx->key;

	if (key && l)
		refresh_listener(*key, l);
	return 0;
}

/* Each socket-table interval: outbound port use of the agent's network namespace. */
SEC("iter/tcp")
int cw_port_use(struct bpf_iter__tcp *ctx)
{
	struct sock_common *skc = ctx->sk_common;

	if (skc)
		count_port_use(skc);
	return 0;
}

/* ---- feature probes: loaded alone at start-up, never part of the agent ------ */

/* Can fentry/fexit programs load and attach here? */
SEC("fentry/__sys_listen")
int BPF_PROG(cw_probe_fentry)
{
	return 0;
}

