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
#define CW_HIST_BUCKETS 32	/* log2(milliseconds) buckets, see record_duration() */
#define CW_WS_PORTS_MAX 16
#define CW_PEEK_LEN 512		/* bytes of a first request/response examined */
#define CW_PORT_WORDS 1024	/* 65536 ports as 64-bit bitmap words */

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

/*
 * Bounded maps that count their own insert failures (map full). The agent
 * reads the names from this enum in the object's BTF: CW_MAP_<NAME> is the
 * map <name>, sized by the configuration key maps.<name>.
 */
enum cw_map_id {
	CW_MAP_SOCKS = 0,
	CW_MAP_CONN_COUNTS,
	CW_MAP_PROCS,
	CW_MAP_FD_FAILURES,
	CW_MAP_PORT_EXHAUSTION,
	CW_MAP_LISTENERS,
	CW_MAP_PEERS,
	CW_MAP_UPGRADES,
	CW_MAP_DURATIONS,
	CW_MAP_PORT_USE,
	CW_MAP_QUEUED,
	CW_MAP_COUNT,
};

/*
 * Why the in-kernel early trigger woke the agent (kernels where the
 * fd-failure probes need the syscall hook, armed on demand).
 */
enum cw_arm_reason {
	CW_ARM_FDS = 1,		/* a process's lowest free fd passed arm_ratio of RLIMIT_NOFILE */
};

/* One tracked accepted connection: the socks hash, keyed by the struct sock address. */
struct cw_sock {
	__u64 accepted_ns;	/* bpf_ktime_get_ns() when it was accepted, 0 if unknown */
	__u64 pstart;		/* owner (holds it now): start_boottime */
	__u64 acceptor_pstart;	/* acceptor (its accepted/closed counters) */
	__u8 peer[CW_ADDR_LEN];
	__u32 tgid;		/* owner */
	__u32 acceptor_tgid;	/* acceptor */
	__u16 lport;		/* local (listening) port, host order */
	__u16 rport;		/* peer port, network order: with peer and lport, tells sockets apart */
	__u8 kind;		/* enum cw_kind */
	__u8 class_state;	/* enum cw_class_state */
	__u8 close_wait;	/* 1 while the peer has closed and the owner has not */
	__u8 queued;		/* counted at the handshake, not yet seen accepted (see `queued`) */
};

/* conn_counts: per process, local port and kind. */
struct cw_conn_key {
	__u64 pstart;
	__u32 tgid;
	__u16 lport;
	__u8 kind;
	__u8 _pad;
};

struct cw_conn_counts {
	__s64 open;		/* owned by this process and not yet TCP_CLOSE */
	__s64 close_wait;	/* of those, closed by the peer but not by the owner */
	__u64 accepted;		/* accepted by this process */
	__u64 closed;		/* accepted by this process and since TCP_CLOSE */
};

/* procs: identity of every process that appears in a key (key: tgid). */
struct cw_proc {
	__u64 pstart;
	char comm[CW_COMM_LEN];
};

/* fd_failures and port_exhaustion: failed syscalls per process. */
struct cw_fail_key {
	__u64 pstart;
	__u32 tgid;
	__u16 syscall;		/* enum cw_syscall */
	__u16 err;		/* positive errno */
};

/*
 * listeners: one entry per listening TCP socket (key: struct sock address).
 * The live queue fields are refreshed in place by the listener-stats
 * iterator just before the agent reads the map.
 */
struct cw_listener {
	__u64 pstart;		/* owner: the process that called listen(), or held it at start-up */
	__u64 overflow_drops;	/* handshakes dropped because the accept queue was full */
	__u32 tgid;
	__u32 netns;		/* network namespace inode */
	__u32 backlog_requested;	/* listen()'s argument (as unsigned), if CW_LISTENER_BACKLOG_SEEN */
	__u32 flags;		/* CW_LISTENER_* */
	__u16 lport;
	__u16 _pad;
	/* refreshed by the iterator: */
	__u32 state;		/* TCP state; TCP_LISTEN unless it closed a moment ago */
	__u32 queue_length;	/* sk_ack_backlog: connections waiting for accept() */
	__u32 backlog;		/* sk_max_ack_backlog: effective backlog */
	__u32 drops;		/* sk_drops: SYNs (and more) dropped on this listener */
	__u32 somaxconn;	/* net.core.somaxconn of the listener's network namespace */
	/* the same namespace's net.ipv4.ip_local_port_range and tcp_max_tw_buckets */
	__u16 port_range_low;
	__u16 port_range_high;
	__u32 max_tw_buckets;
};

/* the listen probe saw listen()'s argument (not for listeners that predate the agent) */
#define CW_LISTENER_BACKLOG_SEEN 1

/* peers: open connections per owner, local port and peer address. */
struct cw_peer_key {
	__u8 peer[CW_ADDR_LEN];
	__u64 pstart;
	__u32 tgid;
	__u16 lport;
	__u16 _pad;
};

/* upgrades: WebSocket handshake outcomes per process, port and HTTP status. */
struct cw_upgrade_key {
	__u64 pstart;
	__u32 tgid;
	__u16 lport;
	__u16 status;
};

/* durations: log2 histogram of connection lifetimes, per owner, local port and kind. */
struct cw_duration_key {
	__u64 pstart;
	__u32 tgid;
	__u16 lport;
	__u8 kind;
	__u8 _pad;
};

struct cw_duration_hist {
	__u64 buckets[CW_HIST_BUCKETS];
	__u64 sum_ns;
	__u64 count;
};

/*
 * port_use: outbound sockets of the agent's network namespace per
 * destination, counted by the port-use iterator in the run numbered
 * `generation` (entries of older runs are stale).
 */
struct cw_port_use_key {
	__u8 daddr[CW_ADDR_LEN];
	__u16 dport;		/* host order */
	__u16 _pad;
};

struct cw_port_use {
	__u64 generation;
	__u64 sockets;		/* outbound sockets holding a local port towards it, TIME_WAIT included */
};

/* ring buffer record: the early trigger for arming the syscall hook. */
struct cw_arm_event {
	__u64 pstart;
	__u32 tgid;
	__u32 reason;		/* enum cw_arm_reason */
	__u64 used;		/* e.g. the process's lowest free fd */
	__u64 limit;		/* e.g. its soft RLIMIT_NOFILE */
};

#endif /* CONNWATCH_H */
