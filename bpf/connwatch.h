/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Structs and enums shared between the BPF programs and the Python agent.
 *
 * agent/connwatch/bpf_types.py mirrors every struct here with ctypes; at
 * start-up the agent compares each mirror with this object's BTF (size,
 * member names and offsets) and refuses to run on a mismatch, so a layout
 * change here that is not made there fails loudly instead of mis-decoding.
 *
 * Keys carry the owning process as (tgid, start_boottime): a pid that is
 * reused by a new process gets a new key, so a dead process's counts can
 * never be attributed to its successor.
 */
#ifndef CONNWATCH_H
#define CONNWATCH_H

#define CW_COMM_LEN 16
#define CW_ADDR_LEN 16		/* IPv6, or IPv4-mapped IPv6 (::ffff:a.b.c.d) */
#define CW_HIST_BUCKETS 32	/* log2(seconds) buckets: [0,1), [1,2), [2,4) ... */
#define CW_WS_PORTS_MAX 16
#define CW_PEEK_LEN 512		/* bytes of a first request/response examined */

/* What a connection turned out to be, decided from its first exchange. */
enum cw_kind {
	CW_KIND_TCP = 0,
	CW_KIND_WEBSOCKET = 1,
	CW_KIND_TLS = 2,
	CW_KIND_MAX = 3,
};

/* Progress of the first-exchange classification of one socket. */
enum cw_class_state {
	CW_CLASS_NEW = 0,	 /* nothing exchanged yet */
	CW_CLASS_UPGRADE_REQ = 1, /* request asked for Upgrade: websocket */
	CW_CLASS_DONE = 2,	 /* decided; no further inspection */
};

/*
 * Syscalls named in fd-allocation and port-exhaustion metrics. The BPF side
 * maps the architecture's syscall numbers to these; anything else that fails
 * with EMFILE/ENFILE is counted as CW_SYS_OTHER.
 */
enum cw_syscall {
	CW_SYS_OTHER = 0,
	CW_SYS_ACCEPT,
	CW_SYS_ACCEPT4,
	CW_SYS_SOCKET,
	CW_SYS_SOCKETPAIR,
	CW_SYS_OPEN,
	CW_SYS_OPENAT,
	CW_SYS_OPENAT2,
	CW_SYS_CREAT,
	CW_SYS_DUP,
	CW_SYS_DUP2,
	CW_SYS_DUP3,
	CW_SYS_FCNTL,
	CW_SYS_PIPE,
	CW_SYS_PIPE2,
	CW_SYS_EPOLL_CREATE,
	CW_SYS_EPOLL_CREATE1,
	CW_SYS_EVENTFD,
	CW_SYS_EVENTFD2,
	CW_SYS_TIMERFD_CREATE,
	CW_SYS_SIGNALFD,
	CW_SYS_SIGNALFD4,
	CW_SYS_INOTIFY_INIT,
	CW_SYS_INOTIFY_INIT1,
	CW_SYS_MEMFD_CREATE,
	CW_SYS_RECVMSG,
	CW_SYS_PIDFD_OPEN,
	CW_SYS_IO_URING_SETUP,
	CW_SYS_CONNECT,
	CW_SYS_BIND,
	CW_SYS_MAX,
};

/* Bounded maps that count their own insert failures (map full). */
enum cw_map_id {
	CW_MAP_SOCKS = 0,
	CW_MAP_CONN_COUNTS,
	CW_MAP_PROCS,
	CW_MAP_FD_FAILURES,
	CW_MAP_PORT_EXHAUSTION,
	CW_MAP_LISTENERS,
	CW_MAP_OVERFLOW_DROPS,
	CW_MAP_PEERS,
	CW_MAP_UPGRADES,
	CW_MAP_DURATIONS,
	CW_MAP_COUNT,
};

/* socks: one entry per accepted, not yet closed TCP socket (key: struct sock *). */
struct cw_sock {
	__u64 accepted_ns;	/* bpf_ktime_get_ns() at handshake completion, 0 if unknown */
	__u64 pstart;		/* owner's start_boottime */
	__u8 peer[CW_ADDR_LEN];
	__u32 tgid;		/* owner: see CW_SOCK_CLAIMED */
	__u16 lport;		/* local (listening) port, host order */
	__u16 status;		/* HTTP status of an upgrade answer, 0 if none */
	__u8 kind;		/* enum cw_kind */
	__u8 class_state;	/* enum cw_class_state */
	__u16 rport;		/* peer port, network order: with peer and lport, tells sockets apart */
	__u32 flags;		/* CW_SOCK_*; 32 bits for atomic or */
};

/*
 * Without syscall tracing, an entry is made when the handshake completes,
 * under the listener's owner; the owner is claimed by the first read/write
 * or a refresh walk of the fd tables, whichever comes first, and the accept
 * is counted then (or at close, if it closes unclaimed). With syscall
 * tracing, accept() makes the entry, claimed.
 */
#define CW_SOCK_CLAIMED 1

/* conn_counts: per process, local port and kind. */
struct cw_conn_key {
	__u64 pstart;
	__u32 tgid;
	__u16 lport;
	__u8 kind;
	__u8 _pad;
};

struct cw_conn_counts {
	__s64 open;		/* accepted and not yet TCP_CLOSE */
	__u64 accepted;
	__u64 closed;
};

/* procs: identity of every process that appears in a key (key: tgid). */
struct cw_proc {
	__u64 pstart;
	__u64 cgroup_id;
	char comm[CW_COMM_LEN];
};

/* fd_failures: syscalls that returned -EMFILE/-ENFILE. */
struct cw_fail_key {
	__u64 pstart;
	__u32 tgid;
	__u16 syscall;		/* enum cw_syscall */
	__u16 err;		/* positive errno */
};

/* listeners: one entry per listening socket seen in listen() (key: struct sock *). */
struct cw_listener {
	__u64 pstart;
	__u32 tgid;
	__u32 netns;		/* network namespace inode */
	__u32 backlog_requested;	/* listen()'s argument, before the somaxconn cap */
	__u32 backlog_effective;	/* sk_max_ack_backlog after listen() */
	__u16 lport;
	__u16 family;
	__u32 flags;		/* CW_LISTENER_* */
};

#define CW_LISTENER_SEEDED 1	/* found at start-up: listen()'s argument unknown */

/* One record of the listener_stats iterator: a listener's live queue. */
struct cw_listener_stat {
	struct cw_listener l;
	__u32 queue_length;	/* sk_ack_backlog: connections waiting for accept() */
	__u32 backlog;		/* sk_max_ack_backlog: effective backlog */
	__u32 drops;		/* sk_drops: SYNs (and more) dropped on this listener */
	__u32 state;		/* TCP state; TCP_LISTEN unless closing */
};

/* overflow_drops: handshake ACKs dropped on a full accept queue. */
struct cw_port_key {
	__u32 netns;
	__u16 lport;
	__u16 _pad;
};

/* peers: open connections per (local port, peer address). */
struct cw_peer_key {
	__u8 peer[CW_ADDR_LEN];
	__u16 lport;
	__u8 _pad[6];
};

/* upgrades: WebSocket handshake outcomes per process, port and HTTP status. */
struct cw_upgrade_key {
	__u64 pstart;
	__u32 tgid;
	__u16 lport;
	__u16 status;
};

/* durations: log2 histogram of connection lifetimes, per local port and kind. */
struct cw_duration_key {
	__u16 lport;
	__u8 kind;
	__u8 _pad[5];
};

struct cw_duration_hist {
	__u64 buckets[CW_HIST_BUCKETS];
	__u64 sum_ns;
	__u64 count;
};

#endif /* CONNWATCH_H */
