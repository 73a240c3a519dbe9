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
 *   loadgen hold-server MAX [PORT_LO PORT_HI]
 *       Listens on 127.0.0.1 (first free port of the range, else any port),
 *       prints "port P", then accepts and keeps up
 *       to MAX connections, printing "accepted N" whenever the queue drains.
 *   loadgen hold-client SRC_IP PORT
 *       For each line "N" on stdin opens N more connections SRC_IP -> 127.0.0.1:PORT
 *       and answers "ok TOTAL". Exits (RST-closing everything) on EOF.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
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
	fprintf(stderr, "usage: loadgen churn|sysloop|hold-server|hold-client ...\n");
	return 2;
}
