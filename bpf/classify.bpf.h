/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * What a connection is (plain TCP, WebSocket, TLS), decided from its first
 * exchange, and who serves it: the process doing a connection's first I/O
 * owns it (a server that accepts in one process and serves in another, as
 * Node's cluster module does in round-robin mode, is attributed to the
 * worker). After that, each send and receive costs one store lookup.
 */
#ifndef CW_CLASSIFY_BPF_H
#define CW_CLASSIFY_BPF_H

#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>

#include "connwatch.h"
#include "arming.bpf.h"
#include "conn.bpf.h"
#include "maps.bpf.h"
#include "process.bpf.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct cw_upgrade_key);
	__type(value, __u64);
} upgrades SEC(".maps");

#define PEEK_MASK (CW_PEEK_LEN - 1) /* CW_PEEK_LEN is a power of two */

/* Scratch space for the first bytes of an exchange (too big for the stack). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, char[CW_PEEK_LEN]);
} peek_buf SEC(".maps");

/* The user buffer of the read/write/send/recv syscall the current task is in. */
static __always_inline const void *io_buffer(long nr, unsigned long arg, __u64 *len)
{
	struct user_msghdr msg;
	struct iovec iov;

	if (nr == __NR_read || nr == __NR_write || nr == __NR_recvfrom || nr == __NR_sendto)
		return (const void *)arg;
	if (nr == __NR_recvmsg || nr == __NR_sendmsg) {
		if (bpf_probe_read_user(&msg, sizeof(msg), (void *)arg))
			return NULL;
		arg = (unsigned long)msg.msg_iov;
	} else if (nr != __NR_readv && nr != __NR_writev) {
		return NULL; /* io_uring, sendfile, splice, kernel sockets: not inspected */
	}
	/* vectored I/O: the first segment holds the start of the message */
	if (bpf_probe_read_user(&iov, sizeof(iov), (void *)arg))
		return NULL;
	if (iov.iov_len < *len)
		*len = iov.iov_len;
	return iov.iov_base;
}

/* The user buffer of the current send/recv and how much of it moved. */
struct io_view {
	const void *ubuf;
	__u64 len;
};

static __always_inline bool current_io(int moved, struct io_view *io)
{
	struct pt_regs *regs = current_user_regs();

	if (!regs)
		return false;
	io->len = moved;
	io->ubuf = io_buffer(syscall_nr(regs), PT_REGS_PARM2_CORE_SYSCALL(regs), &io->len);
	return io->ubuf && io->len;
}

/*
 * Copy the first `want` bytes (at most CW_PEEK_LEN, at most what moved) of
 * the buffer; returns how many, with *out pointing at them. Only as many
 * as the next check needs: most first exchanges are decided by a few bytes.
 */
static __always_inline __u32 peek(const struct io_view *io, __u64 want, char **out)
{
	__u64 len = io->len < want ? io->len : want;
	__u32 zero = 0;
	char *buf;

	if (!len)
		return 0;
	/*
	 * 1..CW_PEEK_LEN by arithmetic the verifier can follow: clang turns a
	 * compare-and-clamp into a form whose bound is lost across the spill
	 * between the two inlined peeks ("R2 unbounded memory access").
	 */
	len = len > CW_PEEK_LEN ? CW_PEEK_LEN : len;
	len = ((len - 1) & PEEK_MASK) + 1;
	buf = bpf_map_lookup_elem(&peek_buf, &zero);
	if (!buf || bpf_probe_read_user(buf, len, io->ubuf))
		return 0;
	*out = buf;
	return len;
}

/*
 * ASCII case folding without a branch (branches on data multiply verifier
 * states): maps each letter to lower case; callers compare the result with
 * lower-case letters only, or check punctuation on the raw byte.
 */
static __always_inline __u8 fold(char c)
{
	return (__u8)c | 0x20;
}

/* Eight characters as one big-endian word, for one-compare matching. */
#define WORD8(a, b, c, d, e, f, g, h)                                             \
	(((__u64)(a) << 56) | ((__u64)(b) << 48) | ((__u64)(c) << 40) |          \
	 ((__u64)(d) << 32) | ((__u64)(e) << 24) | ((__u64)(f) << 16) |          \
	 ((__u64)(g) << 8) | (__u64)(h))

static __always_inline bool is_blank(char c)
{
	return c == ' ' || c == '\t';
}

/* 1 if x is 0, else 0, without a branch: BPF has no set-on-condition instruction. */
static __always_inline __u64 is_zero(__u64 x)
{
	return 1 ^ ((x | -x) >> 63);
}

/*
 * Does an HTTP request carry "Upgrade: websocket"? Slide an 8-byte window
 * over the case-folded request looking for "upgrade:" just after a newline,
 * skip blanks, then require "websocket". A plain bounded loop (the
 * open-coded iterators that would spare the verifier its per-byte walk need
 * v6.4) whose body has no branch but its two exits, so older verifiers do
 * not follow each partial match as a state of its own. Every index is
 * masked, even buf[pos], behind a barrier_var() so clang keeps the mask:
 * clang drops `pos < CW_PEEK_LEN` as implied by `pos < len`, and 6.1's
 * verifier, which lost len's bound by then, saw buf[CW_PEEK_LEN] ("R4 min
 * value is outside of the allowed memory range").
 * The request starts with "GET ", so a match ends at byte 11 at the
 * earliest and buf[pos - 8] is in the request.
 */
static __always_inline bool requests_websocket(const char *buf, __u32 len)
{
	__u32 at = 0; /* index just past "upgrade:", 0 if not found */
	__u64 win = 0;

	for (__u32 pos = 0; pos < CW_PEEK_LEN; pos++) {
		if (pos >= len)
			break;
		__u32 at_pos = pos;

		barrier_var(at_pos); /* keep the mask: see above */
		win = (win << 8) | fold(buf[at_pos & PEEK_MASK]);
		if (is_zero(win ^ WORD8('u', 'p', 'g', 'r', 'a', 'd', 'e', ':')) &
		    is_zero((__u8)buf[(pos - 8) & PEEK_MASK] ^ '\n')) {
			at = pos + 1;
			break;
		}
	}
	if (!at)
		return false;
	/* optional whitespace */
	if (at < len && is_blank(buf[at & PEEK_MASK]))
		at++;
	if (at < len && is_blank(buf[at & PEEK_MASK]))
		at++;
	if (at + 9 > len)
		return false;
	win = 0;
	for (int k = 0; k < 8; k++)
		win = (win << 8) | fold(buf[(at + k) & PEEK_MASK]);
	return win == WORD8('w', 'e', 'b', 's', 'o', 'c', 'k', 'e') &&
	       fold(buf[(at + 8) & PEEK_MASK]) == 't';
}

static __always_inline bool is_tls_client_hello(const char *buf, __u32 len)
{
	/* TLS record: handshake (22), version 3.x, then handshake type 1 */
	return len >= 6 && buf[0] == 0x16 && buf[1] == 0x03 && buf[5] == 0x01;
}

/* "HTTP/1.x NNN": the status code, 0 if this is not an HTTP response. */
static __always_inline __u16 http_status(const char *buf, __u32 len)
{
	if (len < 12 || buf[0] != 'H' || buf[1] != 'T' || buf[2] != 'T' || buf[3] != 'P' ||
	    buf[4] != '/' || buf[8] != ' ')
		return 0;
	for (int i = 9; i < 12; i++)
		if (buf[i] < '0' || buf[i] > '9')
			return 0;
	return (buf[9] - '0') * 100 + (buf[10] - '0') * 10 + (buf[11] - '0');
}

/* The process doing a connection's first I/O owns it from now on. */
static __always_inline void take_ownership(const struct sock *sk, struct cw_sock *s)
{
	__u32 tgid = current_tgid();
	__u64 pstart;

	check_fd_headroom();
	if (tgid == s->tgid && !s->queued)
		return;
	pstart = current_pstart();
	note_current_process(pstart);
	if (s->queued && settle_queued(sk, s, tgid, pstart))
		return;
	if (tgid != s->tgid)
		reassign(s, tgid, pstart, s->kind);
}

static __always_inline void count_upgrade(const struct cw_sock *s, __u16 status)
{
	struct cw_upgrade_key key = {
		.pstart = s->pstart, .tgid = s->tgid, .lport = s->lport, .status = status,
	};

	add_u64(&upgrades, CW_MAP_UPGRADES, &key, 1);
}

/* Bytes to tell TLS (6) and an HTTP GET (4) apart, and an HTTP status line (12). */
#define CW_REQUEST_HEAD 8
#define CW_STATUS_LINE 12

/* Inbound bytes of a new connection: an upgrade request, TLS, or plain TCP. */
static __always_inline void classify_request(const struct sock *sk, struct cw_sock *s, int moved)
{
	struct io_view io;
	char *buf = NULL;
	__u32 len = 0;

	take_ownership(sk, s);
	if (current_io(moved, &io))
		len = peek(&io, CW_REQUEST_HEAD, &buf);
	if (len && buf && is_tls_client_hello(buf, len)) {
		reassign(s, s->tgid, s->pstart, CW_KIND_TLS);
	} else if (len > 4 && buf && buf[0] == 'G' && buf[1] == 'E' && buf[2] == 'T' && buf[3] == ' ') {
		len = peek(&io, CW_PEEK_LEN, &buf);
		if (len && buf && requests_websocket(buf, len)) {
			s->class_state = CW_CLASS_UPGRADE_REQ; /* the answer decides */
			return;
		}
	}
	classified(s);
}

/* Outbound bytes after an upgrade request: 101 makes a WebSocket. */
static __always_inline void classify_response(struct cw_sock *s, int moved)
{
	struct io_view io;
	char *buf = NULL;
	__u32 len = current_io(moved, &io) ? peek(&io, CW_STATUS_LINE, &buf) : 0;
	__u16 status = len && buf ? http_status(buf, len) : 0;

	classified(s);
	if (!status)
		return;
	count_upgrade(s, status);
	if (status == 101)
		reassign(s, s->tgid, s->pstart, CW_KIND_WEBSOCKET);
}

/* `moved` bytes were received on sk. */
static __always_inline void on_recv(const struct sock *sk, int moved)
{
	struct cw_sock *s;

	if (moved <= 0)
		return;
	s = sock_lookup_unclassified(sk);
	if (s && s->class_state == CW_CLASS_NEW)
		classify_request(sk, s, moved);
}

/* `moved` bytes are being (or were) sent on sk. */
static __always_inline void on_send(const struct sock *sk, int moved)
{
	struct cw_sock *s;

	if (moved <= 0)
		return;
	s = sock_lookup_unclassified(sk);
	if (!s || s->class_state == CW_CLASS_DONE)
		return;
	if (s->class_state == CW_CLASS_UPGRADE_REQ) {
		classify_response(s, moved);
	} else {
		/* the server spoke first: not an HTTP upgrade */
		take_ownership(sk, s);
		classified(s);
	}
}

#endif /* CW_CLASSIFY_BPF_H */
