// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * connwatch's object plus one program the kernel cannot attach: its
 * tracepoint does not exist. The agent must report that probe disabled and
 * keep every other one working (tests/test_faults.py).
 */
#include "../../bpf/connwatch.bpf.c"

SEC("tp_btf/connwatch_no_such_tracepoint")
int cw_refused(void *ctx)
{
	return 0;
}
