/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Ephemeral-port use of the agent's network namespace: outbound TCP sockets
 * (TIME_WAIT included) per destination, and the distinct local ports they
 * hold, counted in the kernel by the port-use iterator so that only the
 * per-destination totals cross into user space.
 *
 * Each run is numbered (port_use_generation, written by the agent before
 * it runs the iterator); entries and bitmap words from older runs count as
 * empty, so nothing has to be cleared between runs.
 */
#ifndef CW_PORT_USE_BPF_H
#define CW_PORT_USE_BPF_H

#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>

#include "connwatch.h"
#include "maps.bpf.h"
#include "sock.bpf.h"

/* Written by the agent before each run: ip_local_port_range and the run number. */
__u64 port_use_generation = 0;
__u32 port_range_low = 0;
__u32 port_range_high = 0;

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, struct cw_port_use_key);
	__type(value, struct cw_port_use);
} port_use SEC(".maps");

/* One bit per port, in words tagged with the run that set them. */
struct port_word {
	__u64 generation;
	__u64 bits;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, CW_PORT_WORDS);
	__type(key, __u32);
	__type(value, struct port_word);
} listening_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, CW_PORT_WORDS);
	__type(key, __u32);
	__type(value, struct port_word);
} used_ports SEC(".maps");

static __always_inline void mark_port(void *bitmap, __u16 port)
{
	__u32 word = port / 64;
	struct port_word *w = bpf_map_lookup_elem(bitmap, &word);

	if (!w)
		return;
	if (w->generation != port_use_generation) {
		w->generation = port_use_generation;
		w->bits = 0;
	}
	w->bits |= 1ULL << (port % 64); /* iterators run on one CPU at a time */
}

static __always_inline bool port_marked(void *bitmap, __u16 port)
{
	__u32 word = port / 64;
	struct port_word *w = bpf_map_lookup_elem(bitmap, &word);

	return w && w->generation == port_use_generation && (w->bits >> (port % 64)) & 1;
}

/*
 * One socket of the namespace. Listeners come first in the walk, so by the
 * time connections are seen every listening port is marked: a connection
 * whose local port is a listening port was accepted, not made outbound.
 */
static __always_inline void count_port_use(struct sock_common *skc)
{
	struct cw_port_use_key key = {};
	struct cw_port_use *use, fresh = { .generation = port_use_generation };
	int state = BPF_CORE_READ(skc, skc_state);
	__u16 sport = BPF_CORE_READ(skc, skc_num);

	if (state == TCP_LISTEN) {
		mark_port(&listening_ports, sport);
		return;
	}
	if (state == TCP_NEW_SYN_RECV || sport < port_range_low || sport > port_range_high ||
	    port_marked(&listening_ports, sport))
		return;
	mark_port(&used_ports, sport);
	if (BPF_CORE_READ(skc, skc_family) == AF_INET6) {
		bpf_core_read(key.daddr, CW_ADDR_LEN, &skc->skc_v6_daddr);
	} else {
		ipv4_mapped_prefix(key.daddr);
		bpf_core_read(&key.daddr[12], 4, &skc->skc_daddr);
	}
	key.dport = bpf_ntohs(BPF_CORE_READ(skc, skc_dport));
	use = lookup_or_init(&port_use, CW_MAP_PORT_USE, &key, &fresh);
	if (!use)
		return;
	if (use->generation != port_use_generation) {
		use->generation = port_use_generation;
		use->sockets = 0;
	}
	use->sockets++;
}

#endif /* CW_PORT_USE_BPF_H */
