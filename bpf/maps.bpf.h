/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* Generic map helpers: insert-or-find, counters, and the map-full counts. */
#ifndef CW_MAPS_BPF_H
#define CW_MAPS_BPF_H

#include <bpf/bpf_helpers.h>
#include <asm-generic/errno.h>

#include "connwatch.h"

/* Insert failures per map (enum cw_map_id): the map was full. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, CW_MAP_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} map_full SEC(".maps");

static __always_inline void count_map_full(__u32 map_id)
{
	__u64 *n = bpf_map_lookup_elem(&map_full, &map_id);

	if (n)
		*n += 1; /* per-CPU slot: no atomic needed */
}

/*
 * The value for key, inserting init first if absent. A failed insert other
 * than a lost race (-EEXIST) means the map is full: counted, NULL.
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

/*
 * Atomic add with the result unused: compiles to the plain XADD instruction
 * that every kernel since 4.x accepts (a fetching atomic, which needs v5.12,
 * would make a program unloadable on 5.10).
 */
#define atomic_add(ptr, delta) ((void)__sync_fetch_and_add((ptr), (delta)))

static __always_inline void add_u64(void *map, __u32 map_id, const void *key, __u64 delta)
{
	__u64 zero = 0, *n = lookup_or_init(map, map_id, key, &zero);

	if (n)
		atomic_add(n, delta);
}

#endif /* CW_MAPS_BPF_H */
