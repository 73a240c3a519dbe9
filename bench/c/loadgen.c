// SPDX-License-Identifier: Apache-2.0
/*
 * connwatch bench load generators (loopback only). Built by the bench harness
 * into build/bench/loadgen with gcc -O2.
 *
 *   loadgen churn   SERVERS CLIENTS WARMUP_S SECONDS RATE SRC_BASE
 *       SERVERS processes accept()+close() on one listener (127.0.0.1, any
 *       port); CLIENTS processes connect() from SRC_BASE, SRC_BASE+1 ...,
 *       wait for the server's FIN, then close with an RST (no TIME_WAIT).
 *       RATE 0 = as fast as possible, else total offered connections/s.
 *       Prints: conns=N seconds=S rate=R cpu_busy_s=B (system-wide)
 *       cpu_procs_s=P (the generator's own processes) ...
 *   loadgen sysloop MODE PROCS WARMUP_S SECONDS     MODE = getppid | pipe | tcp
 *       (tcp: 1-byte write + read over one established loopback TCP connection)
 *       Prints: iters=N seconds=S ns_per_iter=X (wall, per process)
 *       cpu_ns_per_iter=Y (CPU time the loops got, per iteration) ...
 *   loadgen ws-echo PORT CONNS SIZE WARMUP_S SECONDS SERVER_PID
 *       A WebSocket client (RFC 6455 framing written here, over plain TCP):
 *       CONNS connections to ws://127.0.0.1:PORT/, each ping-pongs one
 *       SIZE-byte binary message at a time with the echo server and checks
 *       every echo byte for byte. Prints: msgs=N (echoes in the measured
 *       window) seconds=S rate=R msgs_total=T (warm-up included)
 *       gen_cpu_s=G (this client's CPU) server_cpu_s=V (SERVER_PID, all its
 *       threads) cpu_busy_s=B (system-wide) ...
 *   loadgen accept-phases CONNS SRC_IP
 *       A server process (own listener on 127.0.0.1) and this client. Reads
 *       commands on stdin: "open" -> the client opens CONNS connections from
 *       SRC_IP and writes one byte on each, the server accepts each and reads
 *       its byte (the connection's first I/O is in the accepting process);
 *       "close" -> the server closes every connection, the client reads each
 *       FIN and closes with an RST (no TIME_WAIT). Prints "ready PORT" once
 *       the server listens, then answers "opened N S" / "closed N S" (S:
 *       seconds the step took). Exits on EOF.
 *   loadgen hold-server MAX [PORT_LO PORT_HI]
 *       Listens on 127.0.0.1 (first free port of the range, else any port),
 *       prints "port P", then accepts and keeps up
 *       to MAX connections, printing "accepted N" whenever the queue drains.
 *   loadgen hold-client SRC_IP PORT
 *       For each line "N" on stdin opens N more connections SRC_IP -> 127.0.0.1:PORT
 *       and answers "ok TOTAL". Exits (RST-closing everything) on EOF.
 *   loadgen hold-listeners N ADDR PORT_LO PORT_HI
 *       Opens N listening sockets on ADDR (a loopback address), on the free
 *       ports of [PORT_LO, PORT_HI] in order; prints "listening N", exits on EOF.
 *   loadgen idle-procs N
 *       Forks N children that only sleep; prints "ready N"; kills them and
 *       exits on EOF.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

struct slot { volatile uint64_t n; char pad[56]; };

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what)
{
	perror(what);
	exit(1);
}

/* system-wide busy CPU seconds (all but idle and iowait) from /proc/stat */
static double cpu_busy(void)
{
	unsigned long long v[10] = {0};
	FILE *f = fopen("/proc/stat", "r");
	if (!f)
		return 0;
	if (fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3],
		   &v[4], &v[5], &v[6], &v[7]) != 8)
		v[0] = 0;
	fclose(f);
	return (double)(v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / sysconf(_SC_CLK_TCK);
}

/* CPU time (ns) the given processes have run, from /proc/<pid>/schedstat */
static double cpu_of(const pid_t *pids, int n)
{
	double t = 0;
	for (int i = 0; i < n; i++) {
		char path[64];
		unsigned long long ns = 0;
		snprintf(path, sizeof(path), "/proc/%d/schedstat", pids[i]);
		FILE *f = fopen(path, "r");
		if (!f)
			continue;
		if (fscanf(f, "%llu", &ns) == 1)
			t += ns / 1e9;
		fclose(f);
	}
	return t;
}

static struct slot *shared_slots(int n)
{
	void *p = mmap(NULL, sizeof(struct slot) * n, PROT_READ | PROT_WRITE,
		       MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		die("mmap");
	memset(p, 0, sizeof(struct slot) * n);
	return p;
}

static uint64_t sum(struct slot *s, int n)
{
	uint64_t t = 0;
	for (int i = 0; i < n; i++)
		t += s[i].n;
	return t;
}

static void child_dies_with_parent(void)
{
	prctl(PR_SET_PDEATHSIG, SIGKILL);
}

/* A loopback listener on the first free port of [lo, hi], or on any port if lo == 0. */
static int listener_in(int backlog, int *port, int lo, int hi)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t len = sizeof(a);
	int one = 1, fd = socket(AF_INET, SOCK_STREAM, 0), p = lo;

	if (fd < 0)
		die("socket");
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	for (;;) {
		a.sin_port = htons(p);
		if (bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0)
			break;
		if (errno != EADDRINUSE || lo == 0 || ++p > hi)
			die("bind");
	}
	if (listen(fd, backlog))
		die("listen");
	getsockname(fd, (struct sockaddr *)&a, &len);
	*port = ntohs(a.sin_port);
	return fd;
}

static int listener(int backlog, int *port)
{
	return listener_in(backlog, port, 0, 0);
}

static int connect_from(struct in_addr src, int port)
{
	struct sockaddr_in s = { .sin_family = AF_INET, .sin_addr = src };
	struct sockaddr_in d = { .sin_family = AF_INET, .sin_port = htons(port),
				 .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	struct linger lg = { 1, 0 };
	int one = 1, fd = socket(AF_INET, SOCK_STREAM, 0);

	if (fd < 0)
		return -1;
	setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof(one));
	setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg)); /* close = RST */
	if (bind(fd, (struct sockaddr *)&s, sizeof(s)) ||
	    connect(fd, (struct sockaddr *)&d, sizeof(d))) {
		close(fd);
		return -1;
	}
	return fd;
}

static void sleep_until(double t)
{
	struct timespec ts;
	double d = t - now();
	if (d <= 0)
		return;
	ts.tv_sec = (time_t)d;
	ts.tv_nsec = (long)((d - ts.tv_sec) * 1e9);
	nanosleep(&ts, NULL);
}

static void reap(pid_t *pids, int n)
{
	for (int i = 0; i < n; i++)
		kill(pids[i], SIGKILL);
	for (int i = 0; i < n; i++)
		waitpid(pids[i], NULL, 0);
}

static int cmd_churn(int argc, char **argv)
{
	if (argc != 8) {
		fprintf(stderr, "usage: loadgen churn SERVERS CLIENTS WARMUP SECONDS RATE SRC_BASE\n");
		return 2;
	}
	int servers = atoi(argv[2]), clients = atoi(argv[3]);
	double warmup = atof(argv[4]), seconds = atof(argv[5]), rate = atof(argv[6]);
	struct in_addr base;
	int port, lfd = listener(4096, &port), n = 0;
	pid_t pids[256];
	struct slot *cnt = shared_slots(clients), *fail = shared_slots(clients);

	if (!inet_aton(argv[7], &base) || servers + clients > 256)
		return 2;
	for (int i = 0; i < servers; i++) {
		pid_t p = fork();
		if (p == 0) {
			child_dies_with_parent();
			for (;;) {
				int c = accept4(lfd, NULL, NULL, 0);
				if (c >= 0)
					close(c);
			}
		}
		pids[n++] = p;
	}
	for (int i = 0; i < clients; i++) {
		pid_t p = fork();
		if (p == 0) {
			struct in_addr src = { htonl(ntohl(base.s_addr) + i) };
			double per = rate > 0 ? clients / rate : 0, next = now();
			char b;
			child_dies_with_parent();
			close(lfd);
			for (;;) {
				if (per > 0) {
					next += per;
					if (next < now() - 0.1)
						next = now(); /* fell behind: do not burst */
					sleep_until(next);
				}
				int fd = connect_from(src, port);
				if (fd < 0) {
					fail[i].n++;
					continue;
				}
				(void)!read(fd, &b, 1); /* server's FIN */
				close(fd);
				cnt[i].n++;
			}
		}
		pids[n++] = p;
	}
	sleep_until(now() + warmup);
	double t0 = now(), b0 = cpu_busy(), p0 = cpu_of(pids, n);
	uint64_t c0 = sum(cnt, clients);
	sleep_until(t0 + seconds);
	double t1 = now(), b1 = cpu_busy(), p1 = cpu_of(pids, n);
	uint64_t c1 = sum(cnt, clients);
	reap(pids, n);
	printf("conns=%llu seconds=%.4f rate=%.1f cpu_busy_s=%.3f cpu_procs_s=%.4f failed=%llu port=%d\n",
	       (unsigned long long)(c1 - c0), t1 - t0, (c1 - c0) / (t1 - t0), b1 - b0, p1 - p0,
	       (unsigned long long)sum(fail, clients), port);
	return 0;
}

static int cmd_sysloop(int argc, char **argv)
{
	if (argc != 6) {
		fprintf(stderr, "usage: loadgen sysloop getppid|pipe|tcp PROCS WARMUP SECONDS\n");
		return 2;
	}
	int pipe_mode = strcmp(argv[2], "pipe") == 0, tcp_mode = strcmp(argv[2], "tcp") == 0;
	int procs = atoi(argv[3]);
	double warmup = atof(argv[4]), seconds = atof(argv[5]);
	struct slot *cnt = shared_slots(procs);
	pid_t pids[64] = {0};

	if (procs > 64)
		return 2;
	for (int i = 0; i < procs; i++) {
		pid_t p = fork();
		if (p == 0) {
			int fds[2];
			char b = 'x';
			child_dies_with_parent();
			if (pipe_mode && pipe(fds))
				die("pipe");
			if (tcp_mode) {
				/* one loopback TCP connection, accepted in this process:
				 * fds[1] = client end (writes), fds[0] = server end (reads) */
				int port, lfd = listener(1, &port), one = 1;
				struct in_addr lo = { htonl(INADDR_LOOPBACK) };
				fds[1] = connect_from(lo, port);
				fds[0] = accept4(lfd, NULL, NULL, 0);
				if (fds[0] < 0 || fds[1] < 0)
					die("tcp pair");
				setsockopt(fds[1], IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
				close(lfd);
			}
			for (;;) {
				if (pipe_mode || tcp_mode) {
					if (write(fds[1], &b, 1) != 1 || read(fds[0], &b, 1) != 1)
						die("pipe io");
				} else {
					syscall(SYS_getppid);
				}
				cnt[i].n++;
			}
		}
		pids[i] = p;
	}
	sleep_until(now() + warmup);
	double t0 = now(), b0 = cpu_busy(), p0 = cpu_of(pids, procs);
	uint64_t c0 = sum(cnt, procs);
	sleep_until(t0 + seconds);
	double t1 = now(), b1 = cpu_busy(), p1 = cpu_of(pids, procs);
	uint64_t c1 = sum(cnt, procs);
	reap(pids, procs);
	/* ns_per_iter: wall time per iteration of one process; cpu_ns_per_iter:
	 * CPU time the loops actually got per iteration (robust to other load) */
	printf("iters=%llu seconds=%.4f ns_per_iter=%.2f cpu_ns_per_iter=%.2f cpu_busy_s=%.3f cpu_procs_s=%.4f\n",
	       (unsigned long long)(c1 - c0), t1 - t0, (t1 - t0) * procs * 1e9 / (double)(c1 - c0),
	       (p1 - p0) * 1e9 / (double)(c1 - c0), b1 - b0, p1 - p0);
	return 0;
}

static __attribute__((noreturn)) int cmd_hold_server(int argc, char **argv)
{
	int max = argc > 2 ? atoi(argv[2]) : 19000, port, n = 0;
	int lfd = listener_in(4096, &port, argc > 4 ? atoi(argv[3]) : 0, argc > 4 ? atoi(argv[4]) : 0);
	struct pollfd pfd = { .fd = lfd, .events = POLLIN };

	fcntl(lfd, F_SETFL, O_NONBLOCK);
	printf("port %d\n", port);
	fflush(stdout);
	for (;;) {
		if (poll(&pfd, 1, -1) < 0 && errno != EINTR)
			die("poll");
		int got = 0;
		while (n < max) {
			int c = accept4(lfd, NULL, NULL, SOCK_NONBLOCK);
			if (c < 0)
				break;
			n++;
			got++;
		}
		if (got) {
			printf("accepted %d\n", n);
			fflush(stdout);
		}
		if (n >= max)
			pause();
		if (!got)
			usleep(1000);
	}
}

static int cmd_hold_client(int argc, char **argv)
{
	struct in_addr src;
	int port, total = 0;
	char line[64];

	if (argc != 4 || !inet_aton(argv[2], &src)) {
		fprintf(stderr, "usage: loadgen hold-client SRC_IP PORT\n");
		return 2;
	}
	port = atoi(argv[3]);
	while (fgets(line, sizeof(line), stdin)) {
		int want = atoi(line), failed = 0;
		for (int i = 0; i < want; i++) {
			if (connect_from(src, port) < 0)
				failed++;
			else
				total++;
		}
		printf("ok %d failed %d errno %d\n", total, failed, failed ? errno : 0);
		fflush(stdout);
	}
	return 0;
}

/* ---- ws-echo: a WebSocket ping-pong client ------------------------------------ */

/*
 * One process, one epoll loop, one message in flight per connection: the
 * client's own work per echo is a write, a read and a share of an
 * epoll_wait, a few microseconds, so a single-threaded echo server (tens of
 * microseconds per message in JavaScript or Python) is the bottleneck. The
 * harness checks that from gen_cpu_s and server_cpu_s.
 *
 * Client frames are masked as RFC 6455 requires, with one fixed mask key:
 * servers unmask whatever the key, and a fresh random key per frame would
 * only add client work. The Sec-WebSocket-Accept answer is not verified (it
 * needs SHA-1); the status line must be 101 and every echo must match.
 */
#define WS_MAX_PAYLOAD 65535
#define WS_BUF (WS_MAX_PAYLOAD + 16)

struct ws_conn {
	int fd;
	size_t have; /* bytes in buf not yet parsed */
	unsigned char buf[WS_BUF];
};

struct ws_frame {
	unsigned char bytes[WS_MAX_PAYLOAD + 8];
	size_t len;
};

static const unsigned char ws_mask[4] = { 0x37, 0xfa, 0x21, 0x3d };

/* A masked client frame: FIN + opcode, length, mask key, masked payload. */
static void ws_build(struct ws_frame *f, int opcode, const unsigned char *payload, size_t n)
{
	size_t h = 0;

	f->bytes[h++] = 0x80 | opcode;
	if (n < 126) {
		f->bytes[h++] = 0x80 | n;
	} else {
		f->bytes[h++] = 0x80 | 126;
		f->bytes[h++] = n >> 8;
		f->bytes[h++] = n & 0xff;
	}
	memcpy(f->bytes + h, ws_mask, 4);
	h += 4;
	for (size_t i = 0; i < n; i++)
		f->bytes[h + i] = payload[i] ^ ws_mask[i & 3];
	f->len = h + n;
}

/* Ping-pong keeps at most one small frame per connection in flight, so the
 * socket's send buffer always has room: a short write is a failure. */
static void ws_send(int fd, const struct ws_frame *f)
{
	if (write(fd, f->bytes, f->len) != (ssize_t)f->len)
		die("ws write");
}

/* Blocking connect and HTTP upgrade; the socket is non-blocking afterwards. */
static void ws_open(struct ws_conn *c, int port)
{
	struct sockaddr_in d = { .sin_family = AF_INET, .sin_port = htons(port),
				 .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	char req[256];
	int one = 1, n;

	c->fd = socket(AF_INET, SOCK_STREAM, 0);
	if (c->fd < 0 || connect(c->fd, (struct sockaddr *)&d, sizeof(d)))
		die("ws connect");
	setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	n = snprintf(req, sizeof(req),
		     "GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\n"
		     "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
		     "Sec-WebSocket-Version: 13\r\n\r\n", port);
	if (write(c->fd, req, n) != n)
		die("ws upgrade request");
	c->have = 0;
	for (;;) {
		ssize_t r = read(c->fd, c->buf + c->have, sizeof(c->buf) - 1 - c->have);
		char *end;
		if (r <= 0)
			die("ws upgrade response");
		c->have += r;
		c->buf[c->have] = 0;
		end = strstr((char *)c->buf, "\r\n\r\n");
		if (!end)
			continue;
		if (strncmp((char *)c->buf, "HTTP/1.1 101", 12)) {
			fprintf(stderr, "ws upgrade refused: %.40s\n", c->buf);
			exit(1);
		}
		end += 4;
		c->have -= end - (char *)c->buf;
		memmove(c->buf, end, c->have);
		break;
	}
	fcntl(c->fd, F_SETFL, O_NONBLOCK);
}

/*
 * Parse the server's frames in c->buf; for every complete echo check it
 * and send the next message. Returns the number of echoes.
 */
static int ws_drain(struct ws_conn *c, const unsigned char *payload, size_t size,
		    const struct ws_frame *msg)
{
	int echoes = 0;
	size_t off = 0;

	for (;;) {
		unsigned char *p = c->buf + off;
		size_t avail = c->have - off, h = 2, n;
		struct ws_frame pong;

		if (avail < 2)
			break;
		if (p[1] & 0x80) {
			fprintf(stderr, "ws: masked frame from the server\n");
			exit(1);
		}
		n = p[1] & 0x7f;
		if (n == 126) {
			if (avail < 4)
				break;
			n = (size_t)p[2] << 8 | p[3];
			h = 4;
		} else if (n == 127) {
			fprintf(stderr, "ws: frame larger than 64 KiB from the server\n");
			exit(1);
		}
		if (avail < h + n)
			break;
		switch (p[0] & 0x0f) {
		case 0x1: /* text */
		case 0x2: /* binary */
			if (n != size || memcmp(p + h, payload, size)) {
				fprintf(stderr, "ws: echo of %zu bytes does not match the %zu sent\n", n, size);
				exit(1);
			}
			echoes++;
			ws_send(c->fd, msg);
			break;
		case 0x9: /* ping: answer, although the bench servers do not send any */
			ws_build(&pong, 0xa, p + h, n);
			ws_send(c->fd, &pong);
			break;
		case 0xa: /* pong */
			break;
		default:
			fprintf(stderr, "ws: unexpected opcode %d from the server\n", p[0] & 0x0f);
			exit(1);
		}
		off += h + n;
	}
	memmove(c->buf, c->buf + off, c->have - off);
	c->have -= off;
	return echoes;
}

/* CPU seconds of every thread of pid (Node and Python have helper threads). */
static double cpu_of_threads(pid_t pid)
{
	char path[64];
	struct dirent *e;
	DIR *d;
	double t = 0;

	snprintf(path, sizeof(path), "/proc/%d/task", pid);
	d = opendir(path);
	if (!d)
		return 0;
	while ((e = readdir(d))) {
		pid_t tid = atoi(e->d_name);
		if (tid > 0)
			t += cpu_of(&tid, 1); /* /proc/<tid>/schedstat works for any thread */
	}
	closedir(d);
	return t;
}

static double own_cpu(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int cmd_ws_echo(int argc, char **argv)
{
	if (argc != 8) {
		fprintf(stderr, "usage: loadgen ws-echo PORT CONNS SIZE WARMUP SECONDS SERVER_PID\n");
		return 2;
	}
	int port = atoi(argv[2]), nconn = atoi(argv[3]);
	size_t size = atoi(argv[4]);
	double warmup = atof(argv[5]), seconds = atof(argv[6]);
	pid_t server = atoi(argv[7]);
	static unsigned char payload[WS_MAX_PAYLOAD];
	static struct ws_frame msg, bye;
	struct epoll_event evs[64];
	struct ws_conn *conns;
	uint64_t total = 0, at_start = 0;
	double t0 = 0, g0 = 0, s0 = 0, b0 = 0, t_end;
	int ep, measuring = 0;

	if (nconn < 1 || size < 1 || size > WS_MAX_PAYLOAD)
		return 2;
	conns = calloc(nconn, sizeof(*conns));
	if (!conns || (ep = epoll_create1(0)) < 0)
		die("ws setup");
	for (size_t i = 0; i < size; i++)
		payload[i] = 'a' + i % 26;
	ws_build(&msg, 0x2, payload, size);
	for (int i = 0; i < nconn; i++) {
		struct epoll_event ev = { .events = EPOLLIN, .data.ptr = &conns[i] };
		ws_open(&conns[i], port);
		if (epoll_ctl(ep, EPOLL_CTL_ADD, conns[i].fd, &ev))
			die("epoll_ctl");
	}
	for (int i = 0; i < nconn; i++)
		ws_send(conns[i].fd, &msg);
	t_end = now() + warmup;
	for (;;) {
		int n = epoll_wait(ep, evs, 64, 100);
		double t;

		if (n < 0 && errno != EINTR)
			die("epoll_wait");
		for (int i = 0; i < n; i++) {
			struct ws_conn *c = evs[i].data.ptr;
			ssize_t r = read(c->fd, c->buf + c->have, sizeof(c->buf) - c->have);
			if (r == 0) {
				fprintf(stderr, "ws: the server closed a connection\n");
				return 1;
			}
			if (r < 0) {
				if (errno == EAGAIN || errno == EINTR)
					continue;
				die("ws read");
			}
			c->have += r;
			total += ws_drain(c, payload, size, &msg);
		}
		t = now();
		if (t < t_end)
			continue;
		if (measuring)
			break;
		measuring = 1;
		t0 = t, g0 = own_cpu(), s0 = cpu_of_threads(server), b0 = cpu_busy();
		at_start = total;
		t_end = t0 + seconds;
	}
	double t1 = now(), g1 = own_cpu(), s1 = cpu_of_threads(server), b1 = cpu_busy();
	uint64_t msgs = total - at_start;

	printf("msgs=%llu seconds=%.4f rate=%.1f msgs_total=%llu gen_cpu_s=%.4f server_cpu_s=%.4f "
	       "cpu_busy_s=%.3f conns=%d size=%zu\n",
	       (unsigned long long)msgs, t1 - t0, msgs / (t1 - t0), (unsigned long long)total,
	       g1 - g0, s1 - s0, b1 - b0, nconn, size);
	/* a close frame (status 1000), so the servers see an orderly end; an
	 * echo still in flight may make it fail, which does not matter now */
	ws_build(&bye, 0x8, (const unsigned char *)"\x03\xe8", 2);
	for (int i = 0; i < nconn; i++) {
		(void)!write(conns[i].fd, bye.bytes, bye.len);
		close(conns[i].fd);
	}
	return 0;
}

/* ---- accept-phases: the accept path and the close path, measured apart ----------- */

static void write_all(int fd, const void *p, size_t n)
{
	if (write(fd, p, n) != (ssize_t)n)
		die("write");
}

static char read_byte(int fd)
{
	char b;
	if (read(fd, &b, 1) != 1)
		die("read");
	return b;
}

/* The server: its own listener (so it owns it), then phases on command. */
static __attribute__((noreturn)) void accept_server(int n, int cmd, int done)
{
	int port, lfd = listener(4096, &port), *fds = calloc(n, sizeof(int));

	if (!fds)
		die("calloc");
	write_all(done, &port, sizeof(port));
	for (;;) {
		char op = read_byte(cmd);
		if (op == 'o') {
			for (int i = 0; i < n; i++) {
				fds[i] = accept4(lfd, NULL, NULL, 0);
				if (fds[i] < 0)
					die("accept4");
				read_byte(fds[i]); /* the connection's first I/O */
			}
		} else {
			for (int i = 0; i < n; i++)
				close(fds[i]);
		}
		write_all(done, &op, 1);
	}
}

static int cmd_accept_phases(int argc, char **argv)
{
	struct in_addr src;
	char line[64];
	int n, port, cmd[2], done[2], *fds;
	pid_t server;

	if (argc != 4 || (n = atoi(argv[2])) < 1 || !inet_aton(argv[3], &src)) {
		fprintf(stderr, "usage: loadgen accept-phases CONNS SRC_IP\n");
		return 2;
	}
	fds = calloc(n, sizeof(int));
	if (!fds || pipe(cmd) || pipe(done))
		die("setup");
	server = fork();
	if (server == 0) {
		child_dies_with_parent();
		accept_server(n, cmd[0], done[1]);
	}
	if (read(done[0], &port, sizeof(port)) != sizeof(port))
		die("server port");
	printf("ready %d\n", port); /* the server listens: nothing more happens until "open" */
	while (fgets(line, sizeof(line), stdin)) {
		double t0 = now();
		char op = line[0], ack;

		if (op != 'o' && op != 'c')
			continue;
		write_all(cmd[1], &op, 1);
		for (int i = 0; i < n; i++) {
			if (op == 'o') {
				fds[i] = connect_from(src, port);
				if (fds[i] < 0)
					die("connect");
				write_all(fds[i], "x", 1);
			} else {
				char b;
				(void)!read(fds[i], &b, 1); /* the server's FIN */
				close(fds[i]);              /* SO_LINGER 0: RST */
			}
		}
		if (read(done[0], &ack, 1) != 1)
			die("server");
		printf("%s %d %.4f\n", op == 'o' ? "opened" : "closed", n, now() - t0);
	}
	reap(&server, 1);
	return 0;
}

/* ---- hold-listeners, idle-procs: listeners and processes for the scale axes ------- */

static int cmd_hold_listeners(int argc, char **argv)
{
	int n, lo, hi, got = 0;
	struct in_addr addr;
	char line[8];

	if (argc != 6 || (n = atoi(argv[2])) < 0 || !inet_aton(argv[3], &addr)) {
		fprintf(stderr, "usage: loadgen hold-listeners N ADDR PORT_LO PORT_HI\n");
		return 2;
	}
	lo = atoi(argv[4]);
	hi = atoi(argv[5]);
	for (int p = lo; got < n && p <= hi; p++) {
		struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(p), .sin_addr = addr };
		int fd = socket(AF_INET, SOCK_STREAM, 0);
		if (fd < 0)
			die("socket");
		if (bind(fd, (struct sockaddr *)&a, sizeof(a)) || listen(fd, 128)) {
			close(fd); /* port taken: the next one */
			continue;
		}
		got++;
	}
	if (got < n) {
		fprintf(stderr, "hold-listeners: only %d free ports in [%d, %d] on %s\n", got, lo, hi, argv[3]);
		return 1;
	}
	printf("listening %d\n", got);
	while (fgets(line, sizeof(line), stdin))
		;
	return 0;
}

static int cmd_idle_procs(int argc, char **argv)
{
	int n = argc == 3 ? atoi(argv[2]) : -1;
	pid_t *pids;
	char line[8];

	if (n < 0 || !(pids = calloc(n ? n : 1, sizeof(pid_t)))) {
		fprintf(stderr, "usage: loadgen idle-procs N\n");
		return 2;
	}
	for (int i = 0; i < n; i++) {
		pids[i] = fork();
		if (pids[i] < 0) {
			reap(pids, i);
			die("fork");
		}
		if (pids[i] == 0) {
			child_dies_with_parent();
			for (;;)
				pause();
		}
	}
	printf("ready %d\n", n);
	while (fgets(line, sizeof(line), stdin))
		;
	reap(pids, n);
	return 0;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc >= 2 && !strcmp(argv[1], "churn"))
		return cmd_churn(argc, argv);
	if (argc >= 2 && !strcmp(argv[1], "sysloop"))
		return cmd_sysloop(argc, argv);
	if (argc >= 2 && !strcmp(argv[1], "hold-server"))
		return cmd_hold_server(argc, argv);
	if (argc >= 2 && !strcmp(argv[1], "hold-client"))
		return cmd_hold_client(argc, argv);
	if (argc >= 2 && !strcmp(argv[1], "ws-echo"))
		return cmd_ws_echo(argc, argv);
	if (argc >= 2 && !strcmp(argv[1], "accept-phases"))
		return cmd_accept_phases(argc, argv);
	if (argc >= 2 && !strcmp(argv[1], "hold-listeners"))
		return cmd_hold_listeners(argc, argv);
	if (argc >= 2 && !strcmp(argv[1], "idle-procs"))
		return cmd_idle_procs(argc, argv);
	fprintf(stderr, "usage: loadgen churn|sysloop|ws-echo|accept-phases|hold-server|hold-client|"
		"hold-listeners|idle-procs ...\n");
	return 2;
}
