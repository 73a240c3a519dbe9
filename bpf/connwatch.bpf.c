// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * connwatch: in-kernel accounting of accepted TCP connections, fd-allocation
 * failures, ephemeral-port exhaustion, listen() backlogs and accept-queue
 * overflow drops.
 *
 * Only tracepoints are used (tp_btf): kprobes are not available on our target
 * kernels and fentry is refused, and tracepoints are the stable ABI anyway.
 * Everything is aggregated here; user space reads the maps when scraped.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
/* uapi syscall numbers and errno values of the target architecture */
#include <asm/unistd.h>
#include <asm-generic/errno.h>

#include "connwatch.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define AF_INET 2
#define AF_INET6 10
#define S_IFMT 00170000
#define S_IFSOCK 0140000

/* Filled in by the loader before load. */
const volatile __u16 websocket_ports[CW_WS_PORTS_MAX] = {};
const volatile __u32 websocket_ports_len = 0;
/* no syscall hook: count connections from their handshake (see on_passive_open) */
const volatile bool count_at_handshake = false;

/*
 * Never read: it pulls the shared enums (and the iterator's record) into the
 * object's BTF, where the agent checks its Python mirrors against this build.
 */
const volatile struct {
	enum cw_kind kind;
	enum cw_map_id map_id;
	enum cw_syscall syscall;
	enum cw_class_state class_state;
	struct cw_listener_stat listener_stat;
} cw_btf_anchor = {};

/* Map capacities are placeholders: the loader sets them from configuration. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__type(key, __u64);
	__type(value, struct cw_sock);
} socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct cw_conn_key);
	__type(value, struct cw_conn_counts);
} conn_counts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, struct cw_proc);
} procs SEC(".maps");

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

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, struct cw_listener);
} listeners SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct cw_port_key);
	__type(value, __u64);
} overflow_drops SEC(".maps");

/*
 * Who listens on a (netns, address, port): from listen(), the start-up
 * seeding pass, or a refresh walk. A completed handshake is counted under
 * this owner until a process claims the connection. The address matters: a
 * client socket bound to 127.0.0.5:P is not accepted on a listener at
 * 127.0.0.1:P. Wildcard listeners have an all-zero (or ::ffff:0.0.0.0)
 * address. With SO_REUSEPORT: one of the listening processes.
 */
struct listen_key {
	__u8 addr[CW_ADDR_LEN];
	__u32 netns;
	__u16 lport;
	__u16 _pad;
};

struct listen_owner {
	__u64 pstart;
	__u32 tgid;
	__u32 _pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct listen_key);
	__type(value, struct listen_owner);
} listen_owners SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct cw_peer_key);
	__type(value, __s64);
} peers SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct cw_upgrade_key);
	__type(value, __u64);
} upgrades SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct cw_duration_key);
	__type(value, struct cw_duration_hist);
} durations SEC(".maps");

/* Insert failures per map (enum cw_map_id): the map was full. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, CW_MAP_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} map_full SEC(".maps");

/* Scratch space for the first bytes of an exchange (too big for the stack). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, char[CW_PEEK_LEN]);
} peek_buf SEC(".maps");

/* Live entries of `socks` (hash maps do not report their size). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __s64);
} socks_live SEC(".maps");

/* ---- small helpers ------------------------------------------------------ */

static __always_inline void count_map_full(__u32 map_id)
{
	__u64 *n = bpf_map_lookup_elem(&map_full, &map_id);

	if (n)
		*n += 1; /* per-CPU slot: no atomic needed */
}

/*
 * Return the value for key, inserting init first if absent. A failed insert
 * other than a lost race (-EEXIST) means the map is full: counted, NULL.
 */
static __always_inline void *lookup_or_init(void *map, __u32 map_id,
					    const void *key, const void *init)
{
	void *val = bpf_map_lookup_elem(map, key);
	long err;

	if (val)
		return val;
	err = bpf_map_update_elem(map, key, init, BPF_NOEXIST);
	if (err && err != -EEXIST) {
		count_map_full(map_id);
		return NULL;
	}
	return bpf_map_lookup_elem(map, key);
}

static __always_inline void add_u64(void *map, __u32 map_id, const void *key, __u64 delta)
{
	__u64 zero = 0, *n = lookup_or_init(map, map_id, key, &zero);

	if (n)
		__sync_fetch_and_add(n, delta);
}

/* The thread group leader's boot-based start time: /proc/<pid>/stat field 22. */
static __always_inline __u64 current_pstart(void)
{
	struct task_struct *task = bpf_get_current_task_btf();

	return BPF_CORE_READ(task, group_leader, start_boottime);
}

/* Record (or refresh) the identity of the current process; returns its tgid. */
static __always_inline __u32 note_current_process(__u64 pstart)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct cw_proc *p = bpf_map_lookup_elem(&procs, &tgid);
	struct cw_proc fresh = {};

	if (p && p->pstart == pstart)
		return tgid;
	fresh.pstart = pstart;
	fresh.cgroup_id = bpf_get_current_cgroup_id();
	bpf_get_current_comm(fresh.comm, sizeof(fresh.comm));
	if (bpf_map_update_elem(&procs, &tgid, &fresh, BPF_ANY))
		count_map_full(CW_MAP_PROCS);
	return tgid;
}

static __always_inline long syscall_nr(const struct pt_regs *regs)
{
#if defined(__TARGET_ARCH_x86)
	return regs->orig_ax;
#elif defined(__TARGET_ARCH_arm64)
	return regs->syscallno;
#else
#error "connwatch: add this architecture's syscall-number register"
#endif
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

/* struct sock behind a socket fd of the current task (the fd is known to be a socket). */
static __always_inline struct sock *sock_from_fd(long fd)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct file **fds = BPF_CORE_READ(task, files, fdt, fd);
	struct file *file = NULL;
	struct socket *sock;

	if (fd < 0 || bpf_probe_read_kernel(&file, sizeof(file), &fds[fd]) || !file)
		return NULL;
	sock = BPF_CORE_READ(file, private_data);
	return sock ? BPF_CORE_READ(sock, sk) : NULL;
}

static __always_inline bool is_tcp_inet(const struct sock *sk)
{
	__u16 family = BPF_CORE_READ(sk, __sk_common.skc_family);

	return BPF_CORE_READ(sk, sk_protocol) == IPPROTO_TCP &&
	       (family == AF_INET || family == AF_INET6);
}

/* Peer address as IPv6; IPv4 peers become ::ffff:a.b.c.d. */
static __always_inline void read_peer(const struct sock *sk, __u8 peer[CW_ADDR_LEN])
{
	if (BPF_CORE_READ(sk, __sk_common.skc_family) == AF_INET6) {
		bpf_core_read(peer, CW_ADDR_LEN, &sk->__sk_common.skc_v6_daddr);
		return;
	}
	__builtin_memset(peer, 0, CW_ADDR_LEN);
	peer[10] = 0xff;
	peer[11] = 0xff;
	bpf_core_read(&peer[12], 4, &sk->__sk_common.skc_daddr);
}

/* Local address as IPv6; IPv4 becomes ::ffff:a.b.c.d (as read_peer). */
static __always_inline void read_local(const struct sock *sk, __u8 addr[CW_ADDR_LEN])
{
	if (BPF_CORE_READ(sk, __sk_common.skc_family) == AF_INET6) {
		bpf_core_read(addr, CW_ADDR_LEN, &sk->__sk_common.skc_v6_rcv_saddr);
		return;
	}
	__builtin_memset(addr, 0, CW_ADDR_LEN);
	addr[10] = 0xff;
	addr[11] = 0xff;
	bpf_core_read(&addr[12], 4, &sk->__sk_common.skc_rcv_saddr);
}

/*
 * Local port of a connected socket. Not skc_num: tcp_set_state(TCP_CLOSE)
 * unhashes the socket and zeroes it, and a connection reset while waiting
 * in the accept queue is accepted already closed. inet_sport survives.
 */
static __always_inline __u16 local_port(const struct sock *sk)
{
	return bpf_ntohs(BPF_CORE_READ((const struct inet_sock *)sk, inet_sport));
}

static __always_inline __u32 sock_netns(const struct sock *sk)
{
	return BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum);
}

/* ---- per-connection accounting ----------------------------------------- */

static __always_inline void conn_counts_add(const struct cw_sock *s, __s64 open,
					    __u64 accepted, __u64 closed)
{
	struct cw_conn_key key = {
		.pstart = s->pstart, .tgid = s->tgid, .lport = s->lport, .kind = s->kind,
	};
	struct cw_conn_counts zero = {}, *c;

	c = lookup_or_init(&conn_counts, CW_MAP_CONN_COUNTS, &key, &zero);
	if (!c)
		return;
	if (open)
		__sync_fetch_and_add(&c->open, open);
	if (accepted)
		__sync_fetch_and_add(&c->accepted, accepted);
	if (closed)
		__sync_fetch_and_add(&c->closed, closed);
}

static __always_inline void peers_add(const struct cw_sock *s, __s64 delta)
{
	struct cw_peer_key key = { .lport = s->lport };
	__s64 zero = 0, *n;

	__builtin_memcpy(key.peer, s->peer, CW_ADDR_LEN);
	if (delta < 0) {
		/* never create an entry on close: it was pruned or never fit */
		n = bpf_map_lookup_elem(&peers, &key);
	} else {
		n = lookup_or_init(&peers, CW_MAP_PEERS, &key, &zero);
	}
	if (n)
		__sync_fetch_and_add(n, delta);
}

static __always_inline __u32 log2_u64(__u64 v)
{
	__u32 r = 0;

	/* bounded: at most 64 iterations */
	for (int i = 0; i < 64 && v > 1; i++) {
		v >>= 1;
		r++;
	}
	return r;
}

static __always_inline void record_duration(const struct cw_sock *s, __u64 now)
{
	struct cw_duration_key key = { .lport = s->lport, .kind = s->kind };
	struct cw_duration_hist *h;
	static const struct cw_duration_hist zero;
	__u64 dur = now - s->accepted_ns, ms = dur / 1000000;
	/* bucket i holds [2^(i-1), 2^i) ms; bucket 0 holds < 1 ms */
	__u32 b = ms ? log2_u64(ms) + 1 : 0;

	if (!s->accepted_ns)
		return; /* seeded at start-up: its real age is unknown */
	h = lookup_or_init(&durations, CW_MAP_DURATIONS, &key, &zero);
	if (!h)
		return;
	if (b >= CW_HIST_BUCKETS)
		b = CW_HIST_BUCKETS - 1;
	__sync_fetch_and_add(&h->buckets[b], 1);
	__sync_fetch_and_add(&h->sum_ns, dur);
	__sync_fetch_and_add(&h->count, 1);
}

static __always_inline bool is_websocket_port(__u16 port)
{
	for (__u32 i = 0; i < CW_WS_PORTS_MAX; i++) {
		if (i >= websocket_ports_len)
			break;
		if (websocket_ports[i] == port)
			return true;
	}
	return false;
}

static __always_inline void socks_live_add(__s64 delta)
{
	__u32 zero = 0;
	__s64 *n = bpf_map_lookup_elem(&socks_live, &zero);

	if (n)
		*n += delta;
}

/*
 * Count the accept of an entry exactly once: whoever marks it claimed first
 * (a claiming process, or its close racing with that on another CPU).
 * Entries made at accept() are born claimed, their accept counted already.
 */
static __always_inline void count_accept_once(struct cw_sock *s)
{
	if (!(__sync_fetch_and_or(&s->flags, CW_SOCK_CLAIMED) & CW_SOCK_CLAIMED) && s->accepted_ns)
		conn_counts_add(s, 0, 1, 0);
}

/*
 * Stop tracking the socket at key. Only the caller that wins the delete
 * accounts the close, so a close is counted once however many paths race
 * for it. lifetime_known=false: its end is unknown, no duration recorded.
 */
static __always_inline bool close_entry(__u64 key, bool lifetime_known)
{
	struct cw_sock *s = bpf_map_lookup_elem(&socks, &key);
	struct cw_sock copy;

	if (!s)
		return false;
	count_accept_once(s);
	copy = *s;
	if (bpf_map_delete_elem(&socks, &key))
		return false;
	socks_live_add(-1);
	conn_counts_add(&copy, -1, 0, 1);
	peers_add(&copy, -1);
	if (lifetime_known)
		record_duration(&copy, bpf_ktime_get_ns());
	return true;
}

/*
 * An entry left by a socket whose TCP_CLOSE was missed, met again because a
 * new socket got the same address: account that close and drop the entry.
 * True if dropped. Entries seeded from the fd tables (no accept time) are
 * kept: the seeding pass may have found the new socket itself a moment ago.
 */
static __always_inline bool forget_stale(__u64 key)
{
	struct cw_sock *old = bpf_map_lookup_elem(&socks, &key);

	return old && old->accepted_ns && close_entry(key, false);
}

/* Move the open-connection count of s to another owner and/or kind. */
static __always_inline void reassign(struct cw_sock *s, __u32 tgid, __u64 pstart, __u8 kind)
{
	conn_counts_add(s, -1, 0, 0);
	s->tgid = tgid;
	s->pstart = pstart;
	s->kind = kind;
	conn_counts_add(s, 1, 0, 0);
}

/* A process showed it holds the connection: from now on it owns it. */
static __always_inline void claim(struct cw_sock *s, __u32 tgid, __u64 pstart)
{
	if (s->tgid != tgid || s->pstart != pstart)
		reassign(s, tgid, pstart, s->kind);
	count_accept_once(s);
}

/* Where a socket was first seen. */
enum seen_at {
	SEEN_AT_HANDSHAKE,
	SEEN_AT_ACCEPT,
	SEEN_IN_FD_TABLE,
};

static __always_inline bool same_connection(const struct cw_sock *a, const struct cw_sock *b)
{
	const __u64 *pa = (const __u64 *)a->peer, *pb = (const __u64 *)b->peer;

	return a->rport == b->rport && a->lport == b->lport && pa[0] == pb[0] && pa[1] == pb[1];
}

/*
 * Is the entry found at a new socket's address this very socket, rather
 * than one whose TCP_CLOSE was missed? At the handshake: if it has the same
 * addresses and ports (the second of the two state-change programs). At
 * accept(): if the seeding pass just found it (no accept time). In an fd
 * table: always (accept() may have inserted it just now).
 */
static __always_inline bool is_this_socket(const struct cw_sock *old, const struct cw_sock *s,
					   enum seen_at at)
{
	if (at == SEEN_AT_HANDSHAKE)
		return same_connection(old, s);
	if (at == SEEN_AT_ACCEPT)
		return !old->accepted_ns;
	return true;
}

/*
 * Start tracking sk as s, whose counts the caller has added already (undone
 * here if it is not tracked, so nothing counts twice or leaks).
 */
static __always_inline void track(const struct sock *sk, struct cw_sock *s, enum seen_at at)
{
	__u64 key = (__u64)sk;
	struct cw_sock *old;
	long err;

	err = bpf_map_update_elem(&socks, &key, s, BPF_NOEXIST);
	if (err == -EEXIST) {
		old = bpf_map_lookup_elem(&socks, &key);
		if (old && !is_this_socket(old, s, at) && forget_stale(key))
			err = bpf_map_update_elem(&socks, &key, s, BPF_NOEXIST);
	}
	if (err) {
		/* -EEXIST: tracked already; anything else: the map is full */
		if (err != -EEXIST)
			count_map_full(CW_MAP_SOCKS);
		conn_counts_add(s, -1, 0, 0);
		peers_add(s, -1);
		return;
	}
	socks_live_add(1);
	/*
	 * A peer may have reset the connection while it sat in the accept queue,
	 * or just now on another CPU, before our entry existed: then no
	 * TCP_CLOSE event will come for it.
	 */
	if (BPF_CORE_READ(sk, __sk_common.skc_state) == TCP_CLOSE)
		close_entry(key, true);
}

static __always_inline void init_sock(struct cw_sock *s, const struct sock *sk, __u64 accepted_ns)
{
	s->accepted_ns = accepted_ns;
	s->lport = local_port(sk);
	s->rport = BPF_CORE_READ(sk, __sk_common.skc_dport);
	read_peer(sk, s->peer);
	if (is_websocket_port(s->lport)) {
		s->kind = CW_KIND_WEBSOCKET;
		s->class_state = CW_CLASS_DONE;
	}
}

/* With syscall tracing: a connection starts when accept() returns it. */
static __always_inline void on_accept(long fd)
{
	struct sock *sk = sock_from_fd(fd);
	struct cw_sock s = {}, *known;
	__u64 key = (__u64)sk;
	__u64 pstart;
	__u32 tgid;

	if (!sk || !is_tcp_inet(sk))
		return;
	pstart = current_pstart();
	tgid = note_current_process(pstart);
	known = bpf_map_lookup_elem(&socks, &key);
	if (known && is_this_socket(known, NULL, SEEN_AT_ACCEPT))
		return; /* the seeding pass found it in our fd table a moment ago */
	init_sock(&s, sk, bpf_ktime_get_ns());
	s.tgid = tgid;
	s.pstart = pstart;
	s.flags = CW_SOCK_CLAIMED;
	conn_counts_add(&s, 1, 1, 0);
	peers_add(&s, 1);
	track(sk, &s, SEEN_AT_ACCEPT);
}

/* Owner of the listener for this socket's local address and port (or a wildcard). */
static __always_inline struct listen_owner *listener_of(struct listen_key *port, const struct sock *sk)
{
	struct listen_owner *owner;

	read_local(sk, port->addr);
	owner = bpf_map_lookup_elem(&listen_owners, port);
	if (owner)
		return owner;
	if (port->addr[10] == 0xff && port->addr[11] == 0xff) {
		/* an IPv4 address: 0.0.0.0 */
		port->addr[12] = port->addr[13] = port->addr[14] = port->addr[15] = 0;
		owner = bpf_map_lookup_elem(&listen_owners, port);
		if (owner)
			return owner;
	}
	__builtin_memset(port->addr, 0, CW_ADDR_LEN); /* :: (also takes IPv4 when dual-stack) */
	return bpf_map_lookup_elem(&listen_owners, port);
}

static __always_inline void note_listener(const struct sock *sk, __u32 netns, __u32 tgid, __u64 pstart)
{
	struct listen_owner owner = { .pstart = pstart, .tgid = tgid };
	struct listen_key port = { .netns = netns };

	read_local(sk, port.addr);
	port.lport = BPF_CORE_READ(sk, __sk_common.skc_num);
	if (bpf_map_update_elem(&listen_owners, &port, &owner, BPF_ANY))
		count_map_full(CW_MAP_LISTENERS);
}

/*
 * Without syscall tracing: a connection starts when its handshake completes
 * (SYN_RECV -> ESTABLISHED, in softirq), counted under the listener's owner
 * until a process claims it. An unknown listener's connections are picked
 * up by the next refresh walk of the fd tables.
 */
static __always_inline void on_passive_open(const struct sock *sk)
{
	struct listen_key port = {};
	struct listen_owner *owner;
	struct cw_sock s = {}, *known;
	__u64 key = (__u64)sk;

	if (!is_tcp_inet(sk))
		return;
	init_sock(&s, sk, bpf_ktime_get_ns());
	/* the handler runs twice when nothing nests (see cw_sock_state_nested) */
	known = bpf_map_lookup_elem(&socks, &key);
	if (known && is_this_socket(known, &s, SEEN_AT_HANDSHAKE))
		return;
	port.netns = sock_netns(sk);
	port.lport = s.lport;
	owner = listener_of(&port, sk);
	if (!owner)
		return;
	s.tgid = owner->tgid;
	s.pstart = owner->pstart;
	conn_counts_add(&s, 1, 0, 0);
	peers_add(&s, 1);
	track(sk, &s, SEEN_AT_HANDSHAKE);
}

static __always_inline void on_listen(const struct pt_regs *regs)
{
	struct sock *sk = sock_from_fd(PT_REGS_PARM1_CORE_SYSCALL(regs));
	struct cw_listener l = {};
	__u64 key = (__u64)sk;

	if (!sk || !is_tcp_inet(sk))
		return;
	l.pstart = current_pstart();
	l.tgid = note_current_process(l.pstart);
	l.netns = sock_netns(sk);
	l.backlog_requested = (__u32)PT_REGS_PARM2_CORE_SYSCALL(regs);
	l.backlog_effective = BPF_CORE_READ(sk, sk_max_ack_backlog);
	l.lport = BPF_CORE_READ(sk, __sk_common.skc_num);
	l.family = BPF_CORE_READ(sk, __sk_common.skc_family);
	/* listen() may be called again to change the backlog: overwrite */
	if (bpf_map_update_elem(&listeners, &key, &l, BPF_ANY))
		count_map_full(CW_MAP_LISTENERS);
	note_listener(sk, l.netns, l.tgid, l.pstart);
}

static __always_inline void count_failure(void *map, __u32 map_id, long nr, long err)
{
	__u64 pstart = current_pstart();
	struct cw_fail_key key = {
		.pstart = pstart,
		.tgid = note_current_process(pstart),
		.syscall = syscall_id(nr),
		.err = err,
	};

	add_u64(map, map_id, &key, 1);
}

/* ---- WebSocket classification (first exchange only) -------------------- */

/* The user buffer of the read/write/send/recv syscall the current task is in. */
static __always_inline const void *io_buffer(long nr, unsigned long arg, __u64 *len)
{
	struct user_msghdr msg;
	struct iovec iov;

	if (nr == __NR_read || nr == __NR_write || nr == __NR_recvfrom || nr == __NR_sendto)
		return (const void *)arg;
	if (nr == __NR_recvmsg || nr == __NR_sendmsg) {
		if (bpf_probe_read_user(&msg, sizeof(msg), (void *)arg))
			return NULL;
		arg = (unsigned long)msg.msg_iov;
	} else if (nr != __NR_readv && nr != __NR_writev) {
		return NULL; /* io_uring, sendfile, splice, kernel sockets: not inspected */
	}
	/* vectored I/O: the first segment holds the start of the message */
	if (bpf_probe_read_user(&iov, sizeof(iov), (void *)arg))
		return NULL;
	if (iov.iov_len < *len)
		*len = iov.iov_len;
	return iov.iov_base;
}

/* Copy up to CW_PEEK_LEN bytes the current syscall moved; returns the count. */
static __always_inline __u32 peek_io(int ret, char **out)
{
	struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
	__u64 len = ret;
	__u32 zero = 0;
	const void *ubuf;
	char *buf;

	ubuf = io_buffer(syscall_nr(regs), PT_REGS_PARM2_CORE_SYSCALL(regs), &len);
	buf = bpf_map_lookup_elem(&peek_buf, &zero);
	if (!ubuf || !buf || len == 0)
		return 0;
	if (len > CW_PEEK_LEN)
		len = CW_PEEK_LEN;
	if (bpf_probe_read_user(buf, len, ubuf))
		return 0;
	*out = buf;
	return len;
}

/*
 * ASCII case folding without a branch (branches on data multiply verifier
 * states): maps each letter to lower case; callers compare the result with
 * lower-case letters only, or check punctuation on the raw byte.
 */
static __always_inline __u8 fold(char c)
{
	return (__u8)c | 0x20;
}

/* Eight characters as one big-endian word, for one-compare matching. */
#define WORD8(a, b, c, d, e, f, g, h)                                             \
	(((__u64)(a) << 56) | ((__u64)(b) << 48) | ((__u64)(c) << 40) |          \
	 ((__u64)(d) << 32) | ((__u64)(e) << 24) | ((__u64)(f) << 16) |          \
	 ((__u64)(g) << 8) | (__u64)(h))
#define PEEK_MASK (CW_PEEK_LEN - 1)

/*
 * Does an HTTP request carry "Upgrade: websocket"? Slide an 8-byte window
 * over the case-folded request looking for "upgrade:" at the start of a
 * line, skip blanks, then require "websocket".
 */
extern int bpf_iter_num_new(struct bpf_iter_num *it, int start, int end) __ksym;
extern int *bpf_iter_num_next(struct bpf_iter_num *it) __ksym;
extern void bpf_iter_num_destroy(struct bpf_iter_num *it) __ksym;

static __always_inline bool is_blank(char c)
{
	return c == ' ' || c == '\t';
}

static __always_inline bool requests_websocket(const char *buf, __u32 len)
{
	struct bpf_iter_num it;
	__u64 win = 0;
	__u32 at = 0; /* index just past "upgrade:", 0 if not found */
	int *i;

	/* an open-coded iterator: the verifier checks the body once, not per byte */
	bpf_iter_num_new(&it, 0, len);
	while ((i = bpf_iter_num_next(&it))) {
		__u32 pos = *i & PEEK_MASK;

		win = (win << 8) | fold(buf[pos]);
		if (win == WORD8('u', 'p', 'g', 'r', 'a', 'd', 'e', ':') && buf[pos] == ':' &&
		    pos >= 8 && buf[(pos - 8) & PEEK_MASK] == '\n') {
			at = pos + 1;
			break;
		}
	}
	bpf_iter_num_destroy(&it);
	if (!at)
		return false;
	/* optional whitespace */
	if (at < len && is_blank(buf[at & PEEK_MASK]))
		at++;
	if (at < len && is_blank(buf[at & PEEK_MASK]))
		at++;
	if (at + 9 > len)
		return false;
	win = 0;
	for (int k = 0; k < 8; k++)
		win = (win << 8) | fold(buf[(at + k) & PEEK_MASK]);
	return win == WORD8('w', 'e', 'b', 's', 'o', 'c', 'k', 'e') &&
	       fold(buf[(at + 8) & PEEK_MASK]) == 't';
}

static __always_inline bool is_tls_client_hello(const char *buf, __u32 len)
{
	/* TLS record: handshake (22), version 3.x, then handshake type 1 */
	return len >= 6 && buf[0] == 0x16 && buf[1] == 0x03 && buf[5] == 0x01;
}

/* "HTTP/1.x NNN": the status code, 0 if this is not an HTTP response. */
static __always_inline __u16 http_status(const char *buf, __u32 len)
{
	if (len < 12 || buf[0] != 'H' || buf[1] != 'T' || buf[2] != 'T' || buf[3] != 'P' ||
	    buf[4] != '/' || buf[8] != ' ')
		return 0;
	for (int i = 9; i < 12; i++)
		if (buf[i] < '0' || buf[i] > '9')
			return 0;
	return (buf[9] - '0') * 100 + (buf[10] - '0') * 10 + (buf[11] - '0');
}

/*
 * The process doing a connection's first I/O owns it: a server that
 * accepts in one process and serves in another (Node's cluster module in
 * round-robin mode passes the socket to a worker) is attributed to the worker.
 */
static __always_inline void take_ownership(struct cw_sock *s)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	__u64 pstart;

	if (tgid == s->tgid && (s->flags & CW_SOCK_CLAIMED))
		return;
	pstart = current_pstart();
	note_current_process(pstart);
	claim(s, tgid, pstart);
}

static __always_inline void count_upgrade(const struct cw_sock *s, __u16 status)
{
	struct cw_upgrade_key key = {
		.pstart = s->pstart, .tgid = s->tgid, .lport = s->lport, .status = status,
	};

	add_u64(&upgrades, CW_MAP_UPGRADES, &key, 1);
}

/* Inbound bytes of a new connection: an upgrade request, TLS, or plain TCP. */
static __always_inline void classify_request(struct cw_sock *s, int ret)
{
	char *buf = NULL;
	__u32 len;

	take_ownership(s);
	s->class_state = CW_CLASS_DONE;
	len = peek_io(ret, &buf);
	if (!len || !buf)
		return;
	if (is_tls_client_hello(buf, len)) {
		reassign(s, s->tgid, s->pstart, CW_KIND_TLS);
		return;
	}
	if (len > 4 && buf[0] == 'G' && buf[1] == 'E' && buf[2] == 'T' && buf[3] == ' ' &&
	    requests_websocket(buf, len))
		s->class_state = CW_CLASS_UPGRADE_REQ;
}

/* Outbound bytes after an upgrade request: 101 makes a WebSocket. */
static __always_inline void classify_response(struct cw_sock *s, int ret)
{
	char *buf = NULL;
	__u32 len = peek_io(ret, &buf);
	__u16 status;

	s->class_state = CW_CLASS_DONE;
	if (!len || !buf)
		return;
	status = http_status(buf, len);
	if (!status)
		return;
	count_upgrade(s, status);
	if (status == 101)
		reassign(s, s->tgid, s->pstart, CW_KIND_WEBSOCKET);
}

/* ---- programs ---------------------------------------------------------- */

/*
 * Every syscall return. Successful accept()s and listen()s are recorded;
 * -EMFILE/-ENFILE from any syscall and -EADDRNOTAVAIL from connect()/bind()
 * are counted. The common path is two compares.
 */
SEC("tp_btf/sys_exit")
int BPF_PROG(cw_sys_exit, struct pt_regs *regs, long ret)
{
	long nr = syscall_nr(regs);

	if (ret >= 0) {
		if (nr == __NR_accept4
#ifdef __NR_accept
		    || nr == __NR_accept
#endif
		)
			on_accept(ret);
		else if (nr == __NR_listen)
			on_listen(regs);
		return 0;
	}
	if (ret == -EMFILE || ret == -ENFILE)
		count_failure(&fd_failures, CW_MAP_FD_FAILURES, nr, -ret);
	else if (ret == -EADDRNOTAVAIL && (nr == __NR_connect || nr == __NR_bind))
		count_failure(&port_exhaustion, CW_MAP_PORT_EXHAUSTION, nr, -ret);
	return 0;
}

/* A listener closed: drop it, and its owner entry if it is the one recorded there. */
static __always_inline void forget_listener(const struct sock *sk)
{
	struct listen_key port = { .netns = sock_netns(sk) };
	struct listen_owner *owner;
	struct cw_listener *l;
	__u64 key = (__u64)sk;

	l = bpf_map_lookup_elem(&listeners, &key);
	if (!l)
		return;
	read_local(sk, port.addr);
	port.lport = l->lport; /* skc_num is zeroed by now */
	owner = bpf_map_lookup_elem(&listen_owners, &port);
	if (owner && owner->tgid == l->tgid && owner->pstart == l->pstart)
		bpf_map_delete_elem(&listen_owners, &port);
	bpf_map_delete_elem(&listeners, &key);
}

/*
 * A completed handshake starts a connection to a listener; TCP_CLOSE ends
 * it, or ends a listener.
 */
static __always_inline void on_state_change(const struct sock *sk, int oldstate, int newstate)
{
	__u64 key = (__u64)sk;

	if (newstate == TCP_ESTABLISHED && oldstate == TCP_SYN_RECV && count_at_handshake) {
		on_passive_open(sk);
		return;
	}
	if (newstate != TCP_CLOSE)
		return;
	if (oldstate == TCP_LISTEN)
		forget_listener(sk);
	else
		close_entry(key, true);
}

/*
 * The same handler twice. A tracing program does not run nested on one
 * CPU: when a close in process context is interrupted by a softirq that
 * closes another socket, the nested run is skipped (recursion_misses), and
 * that TCP_CLOSE would be lost. The tracepoint calls both programs; if one
 * is busy, the other runs, and the map delete decides which one accounts.
 */
SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(cw_sock_state, const struct sock *sk, const int oldstate, const int newstate)
{
	on_state_change(sk, oldstate, newstate);
	return 0;
}

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(cw_sock_state_nested, const struct sock *sk, const int oldstate, const int newstate)
{
	on_state_change(sk, oldstate, newstate);
	return 0;
}

/*
 * Handshake ACKs dropped because the listener's accept queue was full. (SYNs
 * dropped for the same reason carry no drop reason; they are in sk_drops.)
 */
SEC("tp_btf/kfree_skb")
int BPF_PROG(cw_kfree_skb, struct sk_buff *skb, void *location, enum skb_drop_reason reason)
{
	struct cw_port_key key = {};
	struct tcphdr th;
	struct net_device *dev;
	unsigned char *head;
	__u16 thoff;

	if (!bpf_core_enum_value_exists(enum skb_drop_reason, SKB_DROP_REASON_TCP_LISTEN_OVERFLOW) ||
	    reason != bpf_core_enum_value(enum skb_drop_reason, SKB_DROP_REASON_TCP_LISTEN_OVERFLOW))
		return 0;
	head = BPF_CORE_READ(skb, head);
	thoff = BPF_CORE_READ(skb, transport_header);
	if (bpf_probe_read_kernel(&th, sizeof(th), head + thoff))
		return 0;
	key.lport = bpf_ntohs(th.dest);
	dev = BPF_CORE_READ(skb, dev);
	key.netns = dev ? BPF_CORE_READ(dev, nd_net.net, ns.inum) : 0;
	add_u64(&overflow_drops, CW_MAP_OVERFLOW_DROPS, &key, 1);
	return 0;
}

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
	if (p && p->pstart == BPF_CORE_READ(task, group_leader, start_boottime))
		bpf_map_delete_elem(&procs, &tgid);
	return 0;
}

/*
 * Data moved on a socket. For tracked connections still being classified,
 * look at the bytes; for everything else this is one hash lookup.
 */
SEC("tp_btf/sock_recv_length")
int BPF_PROG(cw_sock_recv, struct sock *sk, int ret, int flags)
{
	__u64 key = (__u64)sk;
	struct cw_sock *s;

	if (ret <= 0)
		return 0;
	s = bpf_map_lookup_elem(&socks, &key);
	if (s && s->class_state == CW_CLASS_NEW)
		classify_request(s, ret);
	return 0;
}

SEC("tp_btf/sock_send_length")
int BPF_PROG(cw_sock_send, struct sock *sk, int ret, int flags)
{
	__u64 key = (__u64)sk;
	struct cw_sock *s;

	if (ret <= 0)
		return 0;
	s = bpf_map_lookup_elem(&socks, &key);
	if (!s || s->class_state == CW_CLASS_DONE)
		return 0;
	if (s->class_state == CW_CLASS_UPGRADE_REQ) {
		classify_response(s, ret);
	} else {
		/* the server spoke first: not an HTTP upgrade */
		take_ownership(s);
		s->class_state = CW_CLASS_DONE;
	}
	return 0;
}

/* ---- iterators: start-up seeding and listener queues --------------------- */

/* The process a task belongs to, recorded like note_current_process(). */
static __always_inline void note_task_process(struct task_struct *task, __u32 tgid, __u64 pstart)
{
	struct cw_proc p = { .pstart = pstart };

	BPF_CORE_READ_STR_INTO(&p.comm, task, group_leader, comm);
	p.cgroup_id = BPF_CORE_READ(task, cgroups, dfl_cgrp, kn, id);
	bpf_map_update_elem(&procs, &tgid, &p, BPF_NOEXIST);
}

/* The TCP socket behind an fd seen by a task_file iterator, if it is one. */
static __always_inline struct sock *tcp_sock_of_file(struct file *file)
{
	struct socket *sock;
	struct sock *sk;

	if (!file || (BPF_CORE_READ(file, f_inode, i_mode) & S_IFMT) != S_IFSOCK)
		return NULL;
	sock = BPF_CORE_READ(file, private_data);
	sk = sock ? BPF_CORE_READ(sock, sk) : NULL;
	return sk && is_tcp_inet(sk) ? sk : NULL;
}

/* A listening socket found in task's fd table, recorded as if we had seen its listen(). */
static __always_inline void seed_listener(struct task_struct *task, struct sock *sk)
{
	struct cw_listener l = {};
	__u64 key = (__u64)sk;

	l.tgid = task->tgid;
	l.pstart = BPF_CORE_READ(task, group_leader, start_boottime);
	l.netns = sock_netns(sk);
	l.backlog_effective = BPF_CORE_READ(sk, sk_max_ack_backlog);
	l.lport = BPF_CORE_READ(sk, __sk_common.skc_num);
	l.family = BPF_CORE_READ(sk, __sk_common.skc_family);
	l.flags = CW_LISTENER_SEEDED;
	note_task_process(task, l.tgid, l.pstart);
	if (bpf_map_update_elem(&listeners, &key, &l, BPF_NOEXIST) == -E2BIG)
		count_map_full(CW_MAP_LISTENERS);
	note_listener(sk, l.netns, l.tgid, l.pstart);
}

/* Has anything been exchanged on this connection yet? */
static __always_inline bool exchanged_data(const struct sock *sk)
{
	const struct tcp_sock *tp = (const struct tcp_sock *)sk;

	return BPF_CORE_READ(tp, bytes_received) || BPF_CORE_READ(tp, bytes_sent);
}

/*
 * A connection found in task's fd table. One nobody claimed yet is claimed
 * by its holder. An untracked one whose local address is a listener's (so
 * it was accepted, not made outbound) is tracked, without an accept time.
 */
static __always_inline void seed_connection(struct task_struct *task, struct sock *sk, int state)
{
	struct listen_key port = {};
	struct cw_sock s = {}, *known;
	__u64 key = (__u64)sk;
	__u64 pstart;

	if (state == TCP_CLOSE || state == TCP_SYN_SENT)
		return;
	known = bpf_map_lookup_elem(&socks, &key);
	if (known) {
		/* the common case on a refresh walk: tracked and claimed, nothing to do */
		if (!(known->flags & CW_SOCK_CLAIMED)) {
			pstart = BPF_CORE_READ(task, group_leader, start_boottime);
			note_task_process(task, task->tgid, pstart);
			claim(known, task->tgid, pstart);
		}
		return;
	}
	port.netns = sock_netns(sk);
	port.lport = local_port(sk);
	if (!listener_of(&port, sk))
		return; /* an outbound connection */
	pstart = BPF_CORE_READ(task, group_leader, start_boottime);
	init_sock(&s, sk, 0);
	if (exchanged_data(sk))
		s.class_state = CW_CLASS_DONE; /* mid-stream: its first exchange is gone */
	s.tgid = task->tgid;
	s.pstart = pstart;
	s.flags = CW_SOCK_CLAIMED;
	note_task_process(task, s.tgid, s.pstart);
	conn_counts_add(&s, 1, 0, 0);
	peers_add(&s, 1);
	track(sk, &s, SEEN_IN_FD_TABLE);
}

/*
 * Start-up seeding, pass 1: every listening TCP socket held by any process,
 * in every network namespace.
 */
SEC("iter/task_file")
int cw_seed_listeners(struct bpf_iter__task_file *ctx)
{
	struct task_struct *task = ctx->task;
	struct sock *sk = task ? tcp_sock_of_file(ctx->file) : NULL;

	if (sk && BPF_CORE_READ(sk, __sk_common.skc_state) == TCP_LISTEN)
		seed_listener(task, sk);
	return 0;
}

/* Start-up seeding, pass 2: the connections held in fd tables (see seed_connection). */
SEC("iter/task_file")
int cw_seed_conns(struct bpf_iter__task_file *ctx)
{
	struct task_struct *task = ctx->task;
	struct sock *sk = task ? tcp_sock_of_file(ctx->file) : NULL;
	int state;

	if (!sk)
		return 0;
	state = BPF_CORE_READ(sk, __sk_common.skc_state);
	if (state != TCP_LISTEN)
		seed_connection(task, sk, state);
	return 0;
}

/*
 * Each refresh: the live accept-queue state of every known listener, in
 * every namespace. A walk over every process's fds, because this kernel
 * refuses iter/bpf_map_elem (EPERM) and iter/tcp sees one namespace only.
 * Without syscall tracing there are no listen()/accept() events, so the
 * same walk also records new listeners and claims connections (one walk
 * per refresh, not three).
 */
SEC("iter/task_file")
int cw_listener_stats(struct bpf_iter__task_file *ctx)
{
	struct task_struct *task = ctx->task;
	struct sock *sk = task ? tcp_sock_of_file(ctx->file) : NULL;
	struct cw_listener_stat out = {};
	struct cw_listener *l;
	__u64 key = (__u64)sk;
	int state;

	if (!sk)
		return 0;
	if (count_at_handshake) {
		state = BPF_CORE_READ(sk, __sk_common.skc_state);
		if (state != TCP_LISTEN) {
			seed_connection(task, sk, state);
			return 0;
		}
		seed_listener(task, sk);
	}
	l = bpf_map_lookup_elem(&listeners, &key);
	if (!l)
		return 0;
	out.l = *l;
	out.queue_length = BPF_CORE_READ(sk, sk_ack_backlog);
	out.backlog = BPF_CORE_READ(sk, sk_max_ack_backlog);
	out.drops = BPF_CORE_READ(sk, sk_drops.counter);
	out.state = BPF_CORE_READ(sk, __sk_common.skc_state);
	bpf_seq_write(ctx->meta->seq, &out, sizeof(out));
	return 0;
}
