// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * Bench only: the alternative design for connwatch's syscall hook. Instead of
 * one tp_btf program on raw_syscalls:sys_exit (every syscall of every task),
 * one classic tracepoint program per fd-allocating syscall
 * (syscalls:sys_exit_accept4, ...), doing the same accounting with
 * connwatch's own helpers (this file includes bpf/connwatch.bpf.c).
 *
 * Not covered here: listen() (its fd/backlog arguments are not in the exit
 * event; the alternative needs sys_enter_listen too, a rare syscall).
 */
#include "connwatch.bpf.c"

/* format of events/syscalls/sys_exit_<name>/format */
struct cw_sys_exit_args {
	__u64 common;
	int nr;
	int pad;
	long ret;
};

static __always_inline void alt_fail(long nr, long ret)
{
	if (ret == -EMFILE || ret == -ENFILE)
		count_failure(&fd_failures, CW_MAP_FD_FAILURES, nr, -ret);
}

#define ACCEPT_PROG(name, sysnr)                                             \
	SEC("tracepoint/syscalls/sys_exit_" #name)                           \
	int alt_##name(struct cw_sys_exit_args *ctx)                         \
	{                                                                    \
		if (ctx->ret >= 0)                                           \
			on_accept(ctx->ret);                                 \
		else                                                         \
			alt_fail(sysnr, ctx->ret);                           \
		return 0;                                                    \
	}

#define FDALLOC_PROG(name, sysnr)                                            \
	SEC("tracepoint/syscalls/sys_exit_" #name)                           \
	int alt_##name(struct cw_sys_exit_args *ctx)                         \
	{                                                                    \
		if (ctx->ret < 0)                                            \
			alt_fail(sysnr, ctx->ret);                           \
		return 0;                                                    \
	}

#define PORT_PROG(name, sysnr)                                               \
	SEC("tracepoint/syscalls/sys_exit_" #name)                           \
	int alt_##name(struct cw_sys_exit_args *ctx)                         \
	{                                                                    \
		if (ctx->ret == -EADDRNOTAVAIL)                              \
			count_failure(&port_exhaustion, CW_MAP_PORT_EXHAUSTION, \
				      sysnr, EADDRNOTAVAIL);                 \
		else                                                         \
			alt_fail(sysnr, ctx->ret);                           \
		return 0;                                                    \
	}

ACCEPT_PROG(accept4, __NR_accept4)
#ifdef __NR_accept
ACCEPT_PROG(accept, __NR_accept)
#endif
FDALLOC_PROG(socket, __NR_socket)
FDALLOC_PROG(socketpair, __NR_socketpair)
FDALLOC_PROG(openat, __NR_openat)
FDALLOC_PROG(openat2, __NR_openat2)
#ifdef __NR_open
FDALLOC_PROG(open, __NR_open)
#endif
#ifdef __NR_creat
FDALLOC_PROG(creat, __NR_creat)
#endif
FDALLOC_PROG(dup, __NR_dup)
#ifdef __NR_dup2
FDALLOC_PROG(dup2, __NR_dup2)
#endif
FDALLOC_PROG(dup3, __NR_dup3)
FDALLOC_PROG(fcntl, __NR_fcntl)
#ifdef __NR_pipe
FDALLOC_PROG(pipe, __NR_pipe)
#endif
FDALLOC_PROG(pipe2, __NR_pipe2)
#ifdef __NR_epoll_create
FDALLOC_PROG(epoll_create, __NR_epoll_create)
#endif
FDALLOC_PROG(epoll_create1, __NR_epoll_create1)
#ifdef __NR_eventfd
FDALLOC_PROG(eventfd, __NR_eventfd)
#endif
FDALLOC_PROG(eventfd2, __NR_eventfd2)
FDALLOC_PROG(timerfd_create, __NR_timerfd_create)
#ifdef __NR_signalfd
FDALLOC_PROG(signalfd, __NR_signalfd)
#endif
FDALLOC_PROG(signalfd4, __NR_signalfd4)
#ifdef __NR_inotify_init
FDALLOC_PROG(inotify_init, __NR_inotify_init)
#endif
FDALLOC_PROG(inotify_init1, __NR_inotify_init1)
FDALLOC_PROG(memfd_create, __NR_memfd_create)
FDALLOC_PROG(recvmsg, __NR_recvmsg)
FDALLOC_PROG(pidfd_open, __NR_pidfd_open)
FDALLOC_PROG(io_uring_setup, __NR_io_uring_setup)
PORT_PROG(connect, __NR_connect)
PORT_PROG(bind, __NR_bind)
