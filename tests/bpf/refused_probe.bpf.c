// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * connwatch's object with one program the verifier refuses: the tracepoint
 * strategy's send hook reads past its tracepoint's arguments. The agent must
 * move that probe to its next strategy (on the development host there is
 * none: the probe is reported off) and keep every other probe working
 * (tests/test_faults.py).
 */
#define cw_sock_send cw_sock_send_replaced /* the real program, out of the way */
#include "../../bpf/connwatch.bpf.c"
#undef cw_sock_send

SEC("tp_btf/sock_send_length")
int cw_sock_send(unsigned long long *ctx)
{
	return ((volatile __u64 *)ctx)[64] != 0;
}
