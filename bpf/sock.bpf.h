/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* Reading struct sock: family, addresses, ports, network namespace. */
#ifndef CW_SOCK_BPF_H
#define CW_SOCK_BPF_H

#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>

#include "connwatch.h"
#include "process.bpf.h"

#define AF_INET 2
#define AF_INET6 10
#define S_IFMT 00170000
#define S_IFSOCK 0140000

static __always_inline bool is_tcp_inet(const struct sock *sk)
{
	__u16 family = BPF_CORE_READ(sk, __sk_common.skc_family);

	return BPF_CORE_READ(sk, sk_protocol) == IPPROTO_TCP &&
	       (family == AF_INET || family == AF_INET6);
}

/* The first 12 bytes of an IPv4-mapped IPv6 address, ::ffff:0.0.0.0. */
static __always_inline void ipv4_mapped_prefix(__u8 addr[CW_ADDR_LEN])
{
	__builtin_memset(addr, 0, CW_ADDR_LEN);
	addr[10] = 0xff;
	addr[11] = 0xff;
}

/* Peer address as IPv6; IPv4 peers become ::ffff:a.b.c.d. */
static __always_inline void read_peer(const struct sock *sk, __u8 peer[CW_ADDR_LEN])
{
	if (BPF_CORE_READ(sk, __sk_common.skc_family) == AF_INET6) {
		bpf_core_read(peer, CW_ADDR_LEN, &sk->__sk_common.skc_v6_daddr);
		return;
	}
	ipv4_mapped_prefix(peer);
	bpf_core_read(&peer[12], 4, &sk->__sk_common.skc_daddr);
}

/* Local address as IPv6, like read_peer(). */
static __always_inline void read_local(const struct sock *sk, __u8 addr[CW_ADDR_LEN])
{
	if (BPF_CORE_READ(sk, __sk_common.skc_family) == AF_INET6) {
		bpf_core_read(addr, CW_ADDR_LEN, &sk->__sk_common.skc_v6_rcv_saddr);
		return;
	}
	ipv4_mapped_prefix(addr);
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

static __always_inline int sock_state(const struct sock *sk)
{
	return BPF_CORE_READ(sk, __sk_common.skc_state);
}

/* The TCP socket behind a file, if it is one (iterators, fd lookups). */
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

/* The TCP socket behind an fd of the current task. */
static __always_inline struct sock *current_tcp_sock(long fd)
{
	struct file **fds = BPF_CORE_READ(current_task(), files, fdt, fd);
	struct file *file = NULL;

	if (fd < 0 || bpf_probe_read_kernel(&file, sizeof(file), &fds[fd]))
		return NULL;
	return tcp_sock_of_file(file);
}

#endif /* CW_SOCK_BPF_H */
