/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Connection accounting: which accepted connections are open, who owns and
 * who accepted each, per port, kind and peer, and how long they lived.
 *
 * Where it is kept. On kernels whose tracing programs may use socket local
 * storage (v5.11, "bpf: Allow using bpf_sk_storage in FENTRY/FEXIT/RAW_TP")
 * and when every attached strategy passes typed socket pointers, connections
 * seen being accepted live in `sock_store`: the lookup on every send and
 * receive is a pointer or two, the entry dies with the socket, and no table
 * sized for the worst case is needed. Connections found in fd tables at
 * start-up (the iterator reaches them through untyped pointers) and, on
 * other kernels, every connection live in the `socks` hash keyed by the
 * struct sock address.
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
const volatile bool use_sk_storage = false;
const volatile __u16 websocket_ports[CW_WS_PORTS_MAX] = {};
const volatile __u32 websocket_ports_len = 0;

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct cw_sock);
} sock_store SEC(".maps");

/* Capacities are placeholders: the loader sets them from configuration. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__type(key, __u64);
	__type(value, struct cw_sock);
} socks SEC(".maps");

/* Live tracked connections, both stores (hash maps do not report their size). */
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
 * Entries of `socks` while socket storage is in use: only connections
 * seeded at start-up. When none are left, a socket storage miss is final
 * and closes skip the hash lookup.
 */
__s64 seeded_socks = 0;

/*
 * While the start-up seeding runs (set by the agent), a connection can be
 * accepted into socket storage and found in an fd table by the seeding walk
 * at the same time, and the walk cannot look into socket storage (it
 * reaches sockets through untyped pointers). Both sides then claim the
 * socket here first; the insert that wins decides who tracks it. Emptied by
 * the agent when seeding ends.
 */
__u32 seeding_active = 0;

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 262144);
	__type(key, __u64);
	__type(value, __u8);
} seed_claims SEC(".maps");

/*
 * Without an accept hook (count_at_handshake): connections whose handshake
 * completed, waiting to be seen accepted. They are tracked (so a close is
 * never missed) but not counted: a connection in the accept queue is not
 * the application's yet, as with the accept hook. The first of these
 * counts one: its first I/O (the process doing it owns it), a state
 * change while a process holds it (sk_socket set by accept()), or the
 * refresh walk finding sk_socket set (a silent connection: the listener's
 * owner owns it) — whoever deletes its entry here.
 */
struct queued_conn {
	__u64 pstart;		/* the listener's owner */
	__u8 peer[CW_ADDR_LEN];
	__u32 tgid;
	__u16 lport;
	__u8 kind;
	__u8 close_wait;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct queued_conn);
} queued SEC(".maps");

/* Where a socket was first seen. */
enum seen_at {
	SEEN_AT_HANDSHAKE,
	SEEN_AT_ACCEPT,
	SEEN_IN_FD_TABLE,
};

/* ---- the store ------------------------------------------------------------ */

/* The store a connection seen at `at` goes into. */
static __always_inline bool in_storage(enum seen_at at)
{
	return use_sk_storage && at != SEEN_IN_FD_TABLE;
}

/*
 * The entry of a socket that can still be classified: only connections
 * seen being accepted are (seeded ones are past their first exchange), so
 * with socket storage this is the storage lookup alone — what every send
 * and receive on the host pays.
 */
static __always_inline struct cw_sock *sock_lookup_new(struct sock *sk)
{
	__u64 key = (__u64)sk;

	if (use_sk_storage)
		return bpf_sk_storage_get(&sock_store, sk, 0, 0);
	return bpf_map_lookup_elem(&socks, &key);
}

/* The entry of any tracked socket; *stored says which store holds it. */
static __always_inline struct cw_sock *sock_lookup(struct sock *sk, bool *stored)
{
	__u64 key = (__u64)sk;
	struct cw_sock *s;

	*stored = false;
	if (use_sk_storage) {
		s = bpf_sk_storage_get(&sock_store, sk, 0, 0);
		if (s || !seeded_socks) {
			*stored = true;
			return s;
		}
	}
	return bpf_map_lookup_elem(&socks, &key);
}

/* See seeding_active: false if the other side of the race has the socket. */
static __always_inline bool claim_from_seeding(struct sock *sk)
{
	__u64 key = (__u64)sk;
	__u8 one = 1;

	if (!use_sk_storage || !seeding_active)
		return true;
	return bpf_map_update_elem(&seed_claims, &key, &one, BPF_NOEXIST) == 0;
}

/* 0 if inserted, -EEXIST if tracked already, another error if full. */
static __always_inline long sock_insert(struct sock *sk, struct cw_sock *s, enum seen_at at)
{
	__u64 key = (__u64)sk;

	if (!claim_from_seeding(sk))
		return -EEXIST;
	if (!in_storage(at))
		return bpf_map_update_elem(&socks, &key, s, BPF_NOEXIST);
	if (bpf_sk_storage_get(&sock_store, sk, 0, 0))
		return -EEXIST;
	if (bpf_sk_storage_get(&sock_store, sk, s, BPF_SK_STORAGE_GET_F_CREATE))
		return 0;
	/* a concurrent create wins the race and leaves us NULL too */
	return bpf_sk_storage_get(&sock_store, sk, 0, 0) ? -EEXIST : -ENOMEM;
}

/* True if this caller removed the entry (and so accounts for its end). */
static __always_inline bool sock_delete(struct sock *sk, bool stored)
{
	__u64 key = (__u64)sk;

	if (stored)
		return bpf_sk_storage_delete(&sock_store, sk) == 0;
	if (bpf_map_delete_elem(&socks, &key))
		return false;
	if (use_sk_storage)
		atomic_add(&seeded_socks, -1);
	return true;
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
 * Stop tracking sk, whose entry s is in socket storage (stored) or the hash.
 * Only the caller that wins the delete accounts for the end, so a close is
 * counted once however many paths race for it. lifetime_known=false: its
 * end is unknown, no duration recorded.
 */
static __always_inline bool end_entry(struct sock *sk, const struct cw_sock *s, bool stored,
				      bool lifetime_known)
{
	struct cw_sock copy = *s;
	__u64 key = (__u64)sk;
	bool counted = true;

	if (!sock_delete(sk, stored))
		return false;
	socks_live_add(-1);
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
static __always_inline void close_entry(struct sock *sk)
{
	struct cw_sock *s;
	bool stored;

	s = sock_lookup(sk, &stored);
	if (s)
		end_entry(sk, s, stored, true);
}

static __always_inline bool same_connection(const struct cw_sock *a, const struct cw_sock *b)
{
	const __u64 *pa = (const __u64 *)a->peer, *pb = (const __u64 *)b->peer;

	return a->rport == b->rport && a->lport == b->lport && pa[0] == pb[0] && pa[1] == pb[1];
}

/*
 * A hash entry found at a new socket's address: is it this very socket,
 * or one whose TCP_CLOSE was missed and whose memory was reused? At the
 * handshake: this one if it has the same addresses and ports (the second
 * of the two state-change programs). At accept: this one if the start-up
 * seeding found it a moment ago (no accept time). In an fd table: always.
 * (Socket storage dies with its socket: its entries are never stale.)
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

/* Drop a stale hash entry at sk (see is_this_socket), accounting its close. */
static __always_inline bool forget_stale(struct sock *sk, const struct cw_sock *old)
{
	return old->accepted_ns && end_entry(sk, old, false, false);
}

/*
 * Start tracking sk as s. Its gauges are added before the insert and undone
 * if it fails, so a close racing on another CPU never subtracts what was
 * not added; its accept is counted once the entry exists (a connection that
 * could not be tracked is counted in map_full instead).
 */
static __always_inline void track(struct sock *sk, struct cw_sock *s, enum seen_at at)
{
	struct queued_conn q = { .pstart = s->pstart, .tgid = s->tgid, .lport = s->lport, .kind = s->kind };
	__u64 key = (__u64)sk;
	struct cw_sock *old;
	long err;

	if (sock_state(sk) == TCP_CLOSE_WAIT)
		s->close_wait = 1; /* the peer closed while it waited in the accept queue */
	s->queued = at == SEEN_AT_HANDSHAKE;
	if (s->queued) {
		__builtin_memcpy(q.peer, s->peer, CW_ADDR_LEN);
		q.close_wait = s->close_wait;
		if (bpf_map_update_elem(&queued, &key, &q, BPF_NOEXIST))
			return; /* the second state-change program (or the map is full: uncounted) */
	} else {
		count_connection(s, 1);
	}
	err = sock_insert(sk, s, at);
	if (err == -EEXIST && !in_storage(at)) {
		old = bpf_map_lookup_elem(&socks, &key);
		if (old && !is_this_socket(old, s, at) && forget_stale(sk, old))
			err = sock_insert(sk, s, at);
	}
	if (err) {
		/* -EEXIST: tracked already; anything else: the store is full */
		if (err != -EEXIST)
			count_map_full(CW_MAP_SOCKS);
		if (s->queued)
			bpf_map_delete_elem(&queued, &key);
		else
			count_connection(s, -1);
		return;
	}
	socks_live_add(1);
	if (at == SEEN_AT_ACCEPT)
		acceptor_count(s, 1, 0);
	else if (at == SEEN_IN_FD_TABLE && use_sk_storage)
		atomic_add(&seeded_socks, 1);
	/*
	 * A peer may have reset the connection while it sat in the accept
	 * queue, or just now on another CPU, before our entry existed: then no
	 * TCP_CLOSE event will come for it.
	 */
	if (sock_state(sk) == TCP_CLOSE) {
		old = in_storage(at) ? bpf_sk_storage_get(&sock_store, sk, 0, 0) : bpf_map_lookup_elem(&socks, &key);
		if (old)
			end_entry(sk, old, in_storage(at), true);
	}
}

/*
 * A queued connection (see `queued`) was seen accepted, owned by (tgid,
 * pstart): count it, unless someone else did (the refresh walk, under the
 * listener's owner) or its close is being accounted. Counted before the
 * entry in `queued` is deleted, and undone if that delete loses: a close
 * racing on another CPU, which subtracts only once the entry is gone, then
 * never subtracts what was not added yet. True if this call counted it.
 */
static __always_inline bool settle_queued(struct sock *sk, struct cw_sock *s, __u32 tgid, __u64 pstart)
{
	struct cw_sock settled = *s;
	__u64 key = (__u64)sk;

	settled.tgid = settled.acceptor_tgid = tgid;
	settled.pstart = settled.acceptor_pstart = pstart;
	settled.queued = 0;
	count_connection(&settled, 1);
	if (bpf_map_delete_elem(&queued, &key)) {
		count_connection(&settled, -1);
		s->queued = 0;
		return false;
	}
	acceptor_count(&settled, 1, 0);
	*s = settled;
	return true;
}

/*
 * The refresh walk over `queued`: a connection a process accepted but has
 * not touched is counted for the listener's owner. Called for each entry by
 * bpf_for_each_map_elem, which allows deleting the element it visits.
 */
static __always_inline void settle_if_accepted(__u64 *key, struct queued_conn *q)
{
	struct cw_sock s = {
		.pstart = q->pstart, .acceptor_pstart = q->pstart, .tgid = q->tgid, .acceptor_tgid = q->tgid,
		.lport = q->lport, .kind = q->kind, .close_wait = q->close_wait,
	};

	if (!grafted((const struct sock *)*key))
		return;
	__builtin_memcpy(s.peer, q->peer, CW_ADDR_LEN);
	count_connection(&s, 1); /* before the delete: see settle_queued() */
	if (bpf_map_delete_elem(&queued, key)) {
		count_connection(&s, -1);
		return;
	}
	acceptor_count(&s, 1, 0);
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
static __always_inline void set_close_wait(struct sock *sk, bool on)
{
	__u64 key = (__u64)sk;
	struct cw_conn_counts *c;
	struct cw_sock *s;
	bool stored;

	s = sock_lookup(sk, &stored);
	if (!s || s->close_wait == on)
		return; /* untracked, or the second program of the pair: done already */
	s->close_wait = on;
	if (s->queued) {
		struct queued_conn *q = bpf_map_lookup_elem(&queued, &key);

		if (q) {
			q->close_wait = on; /* counted with it when it is seen accepted */
			return;
		}
	}
	c = counts_of(s->tgid, s->pstart, s->lport, s->kind);
	if (c)
		atomic_add(&c->close_wait, on ? 1 : -1);
}

#endif /* CW_CONN_BPF_H */
