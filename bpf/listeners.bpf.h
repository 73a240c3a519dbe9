/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Listening sockets: the set of them in every network namespace, kept as
 * they appear (TCP_CLOSE -> TCP_LISTEN, in the listen() caller's context)
 * and vanish (TCP_LISTEN -> TCP_CLOSE), seeded once at start-up; their
 * requested backlog (listen()'s argument) and accept-queue overflows; and,
 * read from that set on each refresh, their live queues.
 */
#ifndef CW_LISTENERS_BPF_H
#define CW_LISTENERS_BPF_H

#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

#include "connwatch.h"
#include "core_fixes.bpf.h"
#include "maps.bpf.h"
#include "process.bpf.h"
#include "sock.bpf.h"

/* Key: the struct sock address. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, struct cw_listener);
} listeners SEC(".maps");

/*
 * Who listens on a (netns, address, port). A completed handshake is counted
 * under this owner when no accept hook is available, and an overflow drop
 * seen only as a packet is charged to this listener. The address matters:
 * a client socket bound to 127.0.0.5:P is not accepted on a listener at
 * 127.0.0.1:P. Wildcard listeners have an all-zero (or ::ffff:0.0.0.0)
 * address. With SO_REUSEPORT: the latest of the listening processes.
 */
struct listen_key {
	__u8 addr[CW_ADDR_LEN];
	__u32 netns;
	__u16 lport;
	__u16 _pad;
};

struct listen_owner {
	__u64 pstart;
	__u64 sk;		/* the listener's struct sock address */
	__u32 tgid;
	__u32 _pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct listen_key);
	__type(value, struct listen_owner);
} listen_owners SEC(".maps");

static __always_inline void listen_key_of(const struct sock *sk, struct listen_key *key)
{
	key->netns = sock_netns(sk);
	key->lport = BPF_CORE_READ(sk, __sk_common.skc_num);
	read_local(sk, key->addr);
}

/*
 * A socket started listening, owned by (tgid, pstart). Called again for a
 * listener already known (the second state-change program, a second
 * listen() changing the backlog): keeps its counters.
 */
static __always_inline void note_listener(const struct sock *sk, __u32 tgid, __u64 pstart)
{
	struct listen_owner owner = { .pstart = pstart, .tgid = tgid, .sk = (__u64)sk };
	struct cw_listener l = {}, *known;
	struct listen_key port = {};
	__u64 key = (__u64)sk;

	listen_key_of(sk, &port);
	known = bpf_map_lookup_elem(&listeners, &key);
	if (!known) {
		l.pstart = pstart;
		l.tgid = tgid;
		l.netns = port.netns;
		l.lport = port.lport;
		if (bpf_map_update_elem(&listeners, &key, &l, BPF_NOEXIST) == -E2BIG)
			count_map_full(CW_MAP_LISTENERS);
	}
	if (bpf_map_update_elem(&listen_owners, &port, &owner, BPF_ANY))
		count_map_full(CW_MAP_LISTENERS);
}

/* listen()'s argument, seen by the listen probe once the socket listens. */
static __always_inline void note_backlog_requested(const struct sock *sk, int backlog)
{
	__u64 key = (__u64)sk;
	struct cw_listener *l = bpf_map_lookup_elem(&listeners, &key);

	if (!l)
		return;
	/* unsigned, as the kernel compares it with somaxconn: -1 asks for the most */
	l->backlog_requested = (__u32)backlog;
	l->flags |= CW_LISTENER_BACKLOG_SEEN;
}

/* A listener closed: drop it, and its owner entry if that names this socket. */
static __always_inline void forget_listener(const struct sock *sk)
{
	struct listen_owner *owner;
	struct listen_key port = {};
	struct cw_listener *l;
	__u64 key = (__u64)sk;

	l = bpf_map_lookup_elem(&listeners, &key);
	if (!l)
		return;
	read_local(sk, port.addr);
	port.netns = l->netns;
	port.lport = l->lport; /* skc_num is zeroed by now */
	owner = bpf_map_lookup_elem(&listen_owners, &port);
	if (owner && owner->sk == key)
		bpf_map_delete_elem(&listen_owners, &port);
	bpf_map_delete_elem(&listeners, &key);
}

/* The listener a connection to (netns, address, port) arrives at: exact address first, then wildcards. */
static __always_inline struct listen_owner *listener_for(struct listen_key *port)
{
	struct listen_owner *owner = bpf_map_lookup_elem(&listen_owners, port);

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

/* The listener an accepted socket came from. */
static __always_inline struct listen_owner *listener_of(const struct sock *sk)
{
	struct listen_key port = { .netns = sock_netns(sk), .lport = local_port(sk) };

	read_local(sk, port.addr);
	return listener_for(&port);
}

/* A handshake was dropped because the listener's accept queue was full. */
static __always_inline void count_overflow_drop(__u64 listener)
{
	struct cw_listener *l = bpf_map_lookup_elem(&listeners, &listener);

	if (l)
		atomic_add(&l->overflow_drops, 1);
}

/* sk_acceptq_is_full() */
static __always_inline bool accept_queue_full(const struct sock *sk)
{
	return BPF_CORE_READ(sk, sk_ack_backlog) > BPF_CORE_READ(sk, sk_max_ack_backlog);
}

/*
 * Refresh a listener's live queue fields and its network namespace's
 * limits (somaxconn, the ephemeral port range, tcp_max_tw_buckets), read
 * through its key. The key is the address of a socket that was listening
 * when the entry was made; TCP sockets are freed RCU-safely
 * (SLAB_TYPESAFE_BY_RCU) and iterators run under RCU, so the memory is a
 * struct sock even if this one closed a moment ago: the agent uses the
 * entry only if the state read here is TCP_LISTEN and the port is still
 * its.
 */
static __always_inline void refresh_listener(__u64 key, struct cw_listener *l)
{
	const struct sock *sk = (const struct sock *)key;
	struct net *net;

	l->state = BPF_CORE_READ(sk, __sk_common.skc_state);
	if (BPF_CORE_READ(sk, __sk_common.skc_num) != l->lport)
		l->state = TCP_CLOSE;
	l->queue_length = BPF_CORE_READ(sk, sk_ack_backlog);
	l->backlog = BPF_CORE_READ(sk, sk_max_ack_backlog);
	l->drops = BPF_CORE_READ(sk, sk_drops.counter);
	net = BPF_CORE_READ(sk, __sk_common.skc_net.net);
	l->somaxconn = BPF_CORE_READ(net, core.sysctl_somaxconn);
	read_local_port_range(net, &l->port_range_low, &l->port_range_high);
	l->max_tw_buckets = read_max_tw_buckets(net);
}

#endif /* CW_LISTENERS_BPF_H */
