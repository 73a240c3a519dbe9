/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Connection accounting: which accepted connections are open, who owns and
 * who accepted each, per port, kind and peer, and how long they lived.
 *
 * Tracked connections live in the `socks` hash, keyed by the struct sock
 * address. Not in socket local storage, though its lookup is cheaper: on
 * the development host creating and deleting one storage element costs
 * ~1.35 us per connection against ~0.3 us for a preallocated hash entry
 * (measured while this was designed; the measuring program was not kept),
 * and what the hooks pay is kept small another way: the `unclassified`
 * count lets sends and receives skip the lookup whenever no tracked
 * connection still waits for its first exchange, and `tracked_ports` lets
 * every hook skip it for a socket on a port no tracked connection had.
 */
#ifndef CW_CONN_BPF_H
#define CW_CONN_BPF_H

#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

#include "connwatch.h"
#include "maps.bpf.h"
#include "process.bpf.h"
#include "sock.bpf.h"

/* Filled in by the loader before load. */
const volatile __u16 websocket_ports[CW_WS_PORTS_MAX] = {};
const volatile __u32 websocket_ports_len = 0;

/* Capacities are placeholders: the loader sets them from configuration. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__type(key, __u64);
	__type(value, struct cw_sock);
} socks SEC(".maps");

/* Live entries of `socks` (hash maps do not report their size). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __s64);
} socks_live SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct cw_conn_key);
	__type(value, struct cw_conn_counts);
} conn_counts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct cw_peer_key);
	__type(value, __s64);
} peers SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct cw_duration_key);
	__type(value, struct cw_duration_hist);
} durations SEC(".maps");

/*
 * Tracked connections whose class_state is not yet CW_CLASS_DONE. Zero most
 * of the time on a server of long-lived connections: then a send or
 * receive costs one load of this variable. A count that drifts from a
 * rare race (two CPUs finishing one socket's classification) only costs
 * lookups, never a missed classification, as long as it stays above zero.
 */
__s64 unclassified = 0;

/*
 * Without an accept hook (count_at_handshake): connections whose handshake
 * completed, waiting to be seen accepted (their `socks` entry has queued
 * set). They are tracked, so a close is never missed, but not counted: a
 * connection in the accept queue is not the application's yet, as with
 * the accept hook. The first of these counts one: its first I/O (the
 * process doing it owns it), a process closing it untouched, or the
 * refresh walk finding it grafted by accept() (a silent connection: the
 * listener's owner owns it) — whoever deletes its key here.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, __u8);
} queued SEC(".maps");

/*
 * Local ports that tracked connections have had: one byte per port, set
 * before an entry is inserted and never cleared, so a socket on a port
 * whose byte is 0 is not tracked. The state-change, send and receive hooks
 * ask this array before looking in `socks`: outbound sockets on ephemeral
 * ports, most of the state changes on a host that also connects out (and
 * both ends of a loopback connection), skip the lookup: ~180 ns less per
 * such event on the development host (docs/architecture.md). Bytes, not
 * bits: setting one is a plain store, where a bit would need an atomic OR
 * (v5.12) or race with its neighbours.
 */
struct tracked_ports {
	__u8 port[65536];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct tracked_ports);
} tracked_ports SEC(".maps");

/* Where a socket was first seen. */
enum seen_at {
	SEEN_AT_HANDSHAKE,
	SEEN_AT_ACCEPT,
	SEEN_IN_FD_TABLE,
};

/* ---- the store ------------------------------------------------------------ */

static __always_inline struct cw_sock *sock_lookup(const struct sock *sk)
{
	__u64 key = (__u64)sk;

	return bpf_map_lookup_elem(&socks, &key);
}

/*
 * A port as an index into tracked_ports, masked behind barrier_var() so
 * that clang keeps the mask it would drop as implied by the 16-bit type:
 * without it the verifiers of 5.10, 6.1 and 6.12 refused the index that
 * comes out of bpf_ntohs() ("math between map_value pointer and register
 * with unbounded min value"); 6.18's accepted it.
 */
static __always_inline __u32 port_index(__u32 port)
{
	barrier_var(port);
	return port & 0xffff;
}

static __always_inline void mark_tracked_port(__u16 port)
{
	__u32 zero = 0, i = port_index(port);
	struct tracked_ports *t = bpf_map_lookup_elem(&tracked_ports, &zero);

	if (t && !t->port[i])
		t->port[i] = 1;
}

/* The entry of sk if it may be tracked: no lookup for a socket on a port no tracked one had. */
static __always_inline struct cw_sock *sock_lookup_tracked(const struct sock *sk)
{
	__u32 zero = 0, i = port_index(local_port(sk));
	struct tracked_ports *t = bpf_map_lookup_elem(&tracked_ports, &zero);

	if (t && !t->port[i])
		return NULL;
	return sock_lookup(sk);
}

/*
 * The entry of a socket that may still be classified, for the send and
 * receive hooks: skips the lookup when no tracked connection is.
 */
static __always_inline struct cw_sock *sock_lookup_unclassified(const struct sock *sk)
{
	return unclassified ? sock_lookup_tracked(sk) : NULL;
}

/* s's first exchange is decided: no more looking at its data. */
static __always_inline void classified(struct cw_sock *s)
{
	if (s->class_state == CW_CLASS_DONE)
		return;
	s->class_state = CW_CLASS_DONE;
	atomic_add(&unclassified, -1);
}

static __always_inline void socks_live_add(__s64 delta)
{
	__u32 zero = 0;
	__s64 *n = bpf_map_lookup_elem(&socks_live, &zero);

	if (n)
		*n += delta; /* per-CPU slot */
}

/* Has a process accepted this socket? accept() grafts it onto a struct socket. */
static __always_inline bool grafted(const struct sock *sk)
{
	return BPF_CORE_READ(sk, sk_socket) != NULL;
}

/* ---- counts ---------------------------------------------------------------- */

static __always_inline struct cw_conn_counts *counts_of(__u32 tgid, __u64 pstart, __u16 lport, __u8 kind)
{
	struct cw_conn_key key = { .pstart = pstart, .tgid = tgid, .lport = lport, .kind = kind };
	struct cw_conn_counts zero = {};

	return lookup_or_init(&conn_counts, CW_MAP_CONN_COUNTS, &key, &zero);
}

/* The owner's gauges: open connections and, of those, CLOSE_WAIT ones. */
static __always_inline void owner_add(const struct cw_sock *s, __s64 delta)
{
	struct cw_conn_counts *c = counts_of(s->tgid, s->pstart, s->lport, s->kind);

	if (!c)
		return;
	atomic_add(&c->open, delta);
	if (s->close_wait)
		atomic_add(&c->close_wait, delta);
}

/* The acceptor's counters (its entry for the kind the connection has now). */
static __always_inline void acceptor_count(const struct cw_sock *s, __u64 accepted, __u64 closed)
{
	struct cw_conn_counts *c = counts_of(s->acceptor_tgid, s->acceptor_pstart, s->lport, s->kind);

	if (!c)
		return;
	if (accepted)
		atomic_add(&c->accepted, accepted);
	if (closed)
		atomic_add(&c->closed, closed);
}

static __always_inline void peers_add(const struct cw_sock *s, __s64 delta)
{
	struct cw_peer_key key = { .pstart = s->pstart, .tgid = s->tgid, .lport = s->lport };
	__s64 zero = 0, *n;

	__builtin_memcpy(key.peer, s->peer, CW_ADDR_LEN);
	if (delta < 0)
		/* never create an entry on close: it was pruned or never fit */
		n = bpf_map_lookup_elem(&peers, &key);
	else
		n = lookup_or_init(&peers, CW_MAP_PEERS, &key, &zero);
	if (n)
		atomic_add(n, delta);
}

/* What a connection adds to its owner's gauges: open, CLOSE_WAIT, per peer. */
static __always_inline void count_connection(const struct cw_sock *s, __s64 delta)
{
	owner_add(s, delta);
	peers_add(s, delta);
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
	struct cw_duration_key key = {
		.pstart = s->pstart, .tgid = s->tgid, .lport = s->lport, .kind = s->kind,
	};
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
	atomic_add(&h->buckets[b], 1);
	atomic_add(&h->sum_ns, dur);
	atomic_add(&h->count, 1);
}

/* ---- life cycle ------------------------------------------------------------ */

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

/* A new entry for sk, owned and accepted by (tgid, pstart). */
static __always_inline void init_sock(struct cw_sock *s, const struct sock *sk, __u64 accepted_ns,
				      __u32 tgid, __u64 pstart)
{
	s->accepted_ns = accepted_ns;
	s->tgid = s->acceptor_tgid = tgid;
	s->pstart = s->acceptor_pstart = pstart;
	s->lport = local_port(sk);
	s->rport = BPF_CORE_READ(sk, __sk_common.skc_dport);
	read_peer(sk, s->peer);
	if (is_websocket_port(s->lport)) {
		s->kind = CW_KIND_WEBSOCKET;
		s->class_state = CW_CLASS_DONE;
	}
}

/*
 * Stop tracking sk, whose entry is s. Only the caller that wins the delete
 * accounts for the end, so a close is counted once however many paths race
 * for it. lifetime_known=false: its end is unknown, no duration recorded.
 */
static __always_inline bool end_entry(const struct sock *sk, const struct cw_sock *s, bool lifetime_known)
{
	struct cw_sock copy = *s;
	__u64 key = (__u64)sk;
	bool counted = true;

	if (bpf_map_delete_elem(&socks, &key))
		return false;
	socks_live_add(-1);
	if (copy.class_state != CW_CLASS_DONE)
		atomic_add(&unclassified, -1);
	if (copy.queued && !bpf_map_delete_elem(&queued, &key)) {
		/*
		 * Never counted: it ends while still queued (reset by the peer;
		 * accept() will hand it over closed) or as its holder closes it
		 * untouched. Accepted and closed, with no time in the gauge.
		 */
		acceptor_count(&copy, 1, 0);
		counted = false;
	}
	if (counted)
		count_connection(&copy, -1);
	acceptor_count(&copy, 0, 1);
	if (lifetime_known)
		record_duration(&copy, bpf_ktime_get_ns());
	return true;
}

/* TCP_CLOSE of sk: the end of its connection, if it is a tracked one. */
static __always_inline void close_entry(const struct sock *sk)
{
	struct cw_sock *s = sock_lookup_tracked(sk);

	if (s)
		end_entry(sk, s, true);
}

static __always_inline bool same_connection(const struct cw_sock *a, const struct cw_sock *b)
{
	const __u64 *pa = (const __u64 *)a->peer, *pb = (const __u64 *)b->peer;

	return a->rport == b->rport && a->lport == b->lport && pa[0] == pb[0] && pa[1] == pb[1];
}

/*
 * An entry found at a new socket's address: is it this very socket, or one
 * whose TCP_CLOSE was missed and whose memory was reused? At the handshake:
 * this one if it has the same addresses and ports (the second of the two
 * state-change programs). At accept: this one if the start-up seeding
 * found it a moment ago (no accept time). In an fd table: always.
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

/* Drop a stale entry at sk (see is_this_socket), accounting its close. */
static __always_inline bool forget_stale(const struct sock *sk, const struct cw_sock *old)
{
	return old->accepted_ns && end_entry(sk, old, false);
}

/*
 * Start tracking sk as s. Its counts are added before the insert and undone
 * if it fails, so a close racing on another CPU never subtracts what was
 * not added; its accept is counted once the entry exists (a connection that
 * could not be tracked is counted in map_full instead). At the handshake it
 * is queued, not counted (see `queued`).
 */
static __always_inline void track(const struct sock *sk, struct cw_sock *s, enum seen_at at)
{
	bool unclassified_one = s->class_state != CW_CLASS_DONE;
	__u64 key = (__u64)sk;
	struct cw_sock *old;
	__u8 one = 1;
	long err, queued_err;

	mark_tracked_port(s->lport); /* before the entry exists: no close finds it unmarked */
	if (sock_state(sk) == TCP_CLOSE_WAIT)
		s->close_wait = 1; /* the peer closed while it waited in the accept queue */
	s->queued = at == SEEN_AT_HANDSHAKE;
	if (!s->queued)
		count_connection(s, 1);
	if (unclassified_one)
		atomic_add(&unclassified, 1); /* before the entry exists: no first send is skipped */
	err = bpf_map_update_elem(&socks, &key, s, BPF_NOEXIST);
	if (err == -EEXIST) {
		old = bpf_map_lookup_elem(&socks, &key);
		if (old && !is_this_socket(old, s, at) && forget_stale(sk, old))
			err = bpf_map_update_elem(&socks, &key, s, BPF_NOEXIST);
	}
	if (!err && s->queued) {
		queued_err = bpf_map_update_elem(&queued, &key, &one, BPF_NOEXIST);
		/*
		 * -EEXIST: an orphan, a key whose connection's entry is gone (an
		 * entry was just inserted where none was), left by a close that
		 * raced with a settle (see settle_queued): it stands for this
		 * connection now. Refused, it would refuse every later one at
		 * this address.
		 */
		if (queued_err && queued_err != -EEXIST) {
			count_map_full(CW_MAP_QUEUED); /* could never be settled: not tracked either */
			bpf_map_delete_elem(&socks, &key);
			err = -ENOSPC; /* `queued` is full, not `socks` */
		}
	}
	if (err) {
		/* -EEXIST: tracked already; anything else: a map is full */
		if (err == -E2BIG)
			count_map_full(CW_MAP_SOCKS);
		if (!s->queued)
			count_connection(s, -1);
		if (unclassified_one)
			atomic_add(&unclassified, -1);
		return;
	}
	socks_live_add(1);
	if (at == SEEN_AT_ACCEPT)
		acceptor_count(s, 1, 0);
	/*
	 * A peer may have reset the connection while it sat in the accept
	 * queue, or just now on another CPU, before our entry existed: then no
	 * TCP_CLOSE event will come for it.
	 */
	if (sock_state(sk) == TCP_CLOSE) {
		old = bpf_map_lookup_elem(&socks, &key);
		if (old)
			end_entry(sk, old, true);
	}
}

/*
 * A queued connection (see `queued`) was seen accepted, owned by (tgid,
 * pstart): count it, unless someone else did (the refresh walk, under the
 * listener's owner) or its close is being accounted. Counted before its key
 * in `queued` is deleted, and undone if that delete loses: a close racing
 * on another CPU, which subtracts only once the key is gone, then never
 * subtracts what was not added yet. True if this call counted it.
 */
static __always_inline bool settle_queued(const struct sock *sk, const struct cw_sock *s, __u32 tgid,
					  __u64 pstart)
{
	struct cw_sock settled = *s;
	__u64 key = (__u64)sk;
	struct cw_sock *now;

	settled.tgid = settled.acceptor_tgid = tgid;
	settled.pstart = settled.acceptor_pstart = pstart;
	settled.queued = 0;
	count_connection(&settled, 1);
	if (bpf_map_delete_elem(&queued, &key)) {
		/* the winner (a settle or the close) writes the entry, if it still exists */
		count_connection(&settled, -1);
		return false;
	}
	acceptor_count(&settled, 1, 0);
	/*
	 * Into the entry as it is now, looked up again: s was found before the
	 * work above, and a close on another CPU may have deleted that element
	 * meanwhile and the map handed it to another connection (a preallocated
	 * hash reuses a freed element at once). Written through s, that
	 * connection would get this one's owner and lose its queued flag, and
	 * its key would stay in `queued` after its close: an orphan key (see
	 * track()).
	 */
	now = sock_lookup(sk);
	if (!now)
		return true; /* closed meanwhile: that close subtracts what was added here */
	now->tgid = settled.tgid;
	now->pstart = settled.pstart;
	now->acceptor_tgid = settled.acceptor_tgid;
	now->acceptor_pstart = settled.acceptor_pstart;
	now->queued = 0;
	return true;
}

/*
 * The refresh walk over `queued`: a connection a process accepted but has
 * not touched is counted for the listener's owner. Called for each key by
 * bpf_for_each_map_elem, which allows deleting the element it visits.
 */
static __always_inline void settle_if_accepted(const __u64 *key)
{
	/* read once: settle_queued() deletes by this value, whatever the element holds meanwhile */
	const struct sock *sk = (const struct sock *)*key;
	struct cw_sock *s = sock_lookup(sk);

	if (s && grafted(sk))
		settle_queued(sk, s, s->tgid, s->pstart);
}

/* Move s's open count (and peer, CLOSE_WAIT) to another owner and/or kind. */
static __always_inline void reassign(struct cw_sock *s, __u32 tgid, __u64 pstart, __u8 kind)
{
	count_connection(s, -1);
	s->tgid = tgid;
	s->pstart = pstart;
	s->kind = kind;
	count_connection(s, 1);
}

/* The peer closed (ESTABLISHED -> CLOSE_WAIT) or the owner did (CLOSE_WAIT -> LAST_ACK). */
static __always_inline void set_close_wait(const struct sock *sk, bool on)
{
	struct cw_sock *s = sock_lookup_tracked(sk);
	struct cw_conn_counts *c;
	__u64 key = (__u64)sk;

	if (!s || s->close_wait == on)
		return; /* untracked, or the second program of the pair: done already */
	s->close_wait = on;
	if (s->queued && bpf_map_lookup_elem(&queued, &key))
		return; /* counted with it when it is seen accepted */
	c = counts_of(s->tgid, s->pstart, s->lport, s->kind);
	if (c)
		atomic_add(&c->close_wait, on ? 1 : -1);
}

#endif /* CW_CONN_BPF_H */
