// SPDX-License-Identifier: MIT
/* pingpong: request/response latency and one-way throughput between two local processes.
 *
 *   pingpong [-t tcp|tcp6|unix] [-a ADDRESS] [-m rtt|stream|short|lived] [-e] [-n REQUESTS]
 *            [-s SIZE] [-c CONNECTIONS] [-p same|cross|any] [-w WARMUP] [-j SETTLE_MS] [-d SECONDS]
 *            [-i GAP_US]
 *
 * The server runs in a forked child (one process per connection), so both ends live in the
 * caller's cgroup. TCP sockets set TCP_NODELAY; every read and write loops over short transfers.
 * rtt: each request of SIZE bytes is echoed back whole; per-request CLOCK_MONOTONIC timestamps give
 * mean and percentiles; after the warm-up requests the client pauses SETTLE_MS (default 100), so
 * that a bypass agent sees both ends have read. stream: the client sends SIZE-byte writes for
 * SECONDS, the server reads and counts. short: REQUESTS connections one after the other, each
 * connect, one request and its reply, close; latency per connection. lived: REQUESTS connections
 * one after the other, each living SECONDS and echoing a SIZE-byte request every GAP_US
 * microseconds (default 1000) meanwhile; counts the requests.
 * -e: event-driven, as redis, nginx or asyncio are: non-blocking sockets, and every read or write
 * that would block waits in epoll_wait(). Without it, blocking reads and writes.
 * -a: the local address both ends use (default the loopback address of the family).
 * Prints one JSON object on stdout.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <stddef.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

struct options {
	const char *transport; /* tcp, tcp6, unix */
	const char *address;   /* NULL: loopback */
	const char *mode;      /* rtt, stream, short, lived */
	const char *placement; /* same, cross, any */
	long requests, warmup, size, settle_ms;
	int connections;
	double seconds;
	int event_driven;
	long gap_us;
};

/* event-driven mode: this process's epoll instance, which holds its one socket */
static int epoll_fd = -1;

static void die(const char *what)
{
	fprintf(stderr, "pingpong: %s: %s\n", what, strerror(errno));
	exit(1);
}

static double now_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static void pin(int cpu)
{
	cpu_set_t set;

	if (cpu < 0)
		return;
	CPU_ZERO(&set);
	CPU_SET(cpu % sysconf(_SC_NPROCESSORS_ONLN), &set);
	if (sched_setaffinity(0, sizeof(set), &set))
		die("sched_setaffinity");
}

/* CPU for the server (role 0) or client (role 1) of connection `conn`. */
static int cpu_for(const struct options *o, int role, int conn)
{
	if (!strcmp(o->placement, "same"))
		return conn;
	if (!strcmp(o->placement, "cross"))
		return 2 * conn + role;
	return -1;
}

/* Event-driven mode: make fd non-blocking and the one socket of this process's epoll set,
 * watched for input as an event loop does; output only while a write waits for room. */
static void event_driven(int fd)
{
	struct epoll_event ev = { .events = EPOLLIN, .data.fd = fd };

	if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK))
		die("O_NONBLOCK");
	if (epoll_fd < 0 && (epoll_fd = epoll_create1(0)) < 0)
		die("epoll_create1");
	if (epoll_ctl(epoll_fd, EPOLL_CTL_ADD, fd, &ev))
		die("epoll_ctl add");
}

/* After EAGAIN: in event-driven mode wait until fd is ready for `events`; else try again. */
static void wait_ready(int fd, uint32_t events)
{
	struct epoll_event ev = { .events = events, .data.fd = fd }, out;

	if (epoll_fd < 0)
		return;
	if (events != EPOLLIN && epoll_ctl(epoll_fd, EPOLL_CTL_MOD, fd, &ev))
		die("epoll_ctl mod");
	while (epoll_wait(epoll_fd, &out, 1, -1) < 0)
		if (errno != EINTR)
			die("epoll_wait");
	ev.events = EPOLLIN;
	if (events != EPOLLIN && epoll_ctl(epoll_fd, EPOLL_CTL_MOD, fd, &ev))
		die("epoll_ctl mod");
}

static int write_all(int fd, const char *buf, long len)
{
	while (len > 0) {
		ssize_t n = write(fd, buf, len);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN) {
				wait_ready(fd, EPOLLOUT);
				continue;
			}
			return -1;
		}
		buf += n;
		len -= n;
	}
	return 0;
}

/* 1: got len bytes; 0: EOF before any byte; -1: error or EOF midway. */
static int read_all(int fd, char *buf, long len)
{
	long got = 0;

	while (got < len) {
		ssize_t n;

		if (epoll_fd >= 0) /* an event loop reads when epoll says there is something to read */
			wait_ready(fd, EPOLLIN);
		n = read(fd, buf + got, len - got);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN) {
				wait_ready(fd, EPOLLIN);
				continue;
			}
			return -1;
		}
		if (n == 0)
			return got ? -1 : 0;
		got += n;
	}
	return 1;
}

static void bad_address(const char *address, const char *family)
{
	fprintf(stderr, "pingpong: -a %s is not an %s address\n", address, family);
	exit(2);
}

struct endpoint {
	int family;
	socklen_t len;
	union {
		struct sockaddr_in in;
		struct sockaddr_in6 in6;
		struct sockaddr_un un;
	} addr;
};

static int listen_on(const struct options *o, struct endpoint *ep)
{
	int fd, one = 1;

	memset(ep, 0, sizeof(*ep));
	if (!strcmp(o->transport, "unix")) {
		ep->family = AF_UNIX;
		ep->addr.un.sun_family = AF_UNIX;
		/* abstract name: nothing to clean up */
		snprintf(ep->addr.un.sun_path + 1, sizeof(ep->addr.un.sun_path) - 1, "pingpong-%d", getpid());
		ep->len = offsetof(struct sockaddr_un, sun_path) + 1 + strlen(ep->addr.un.sun_path + 1);
	} else if (!strcmp(o->transport, "tcp6")) {
		ep->family = AF_INET6;
		ep->addr.in6.sin6_family = AF_INET6;
		ep->addr.in6.sin6_addr = in6addr_loopback;
		if (o->address && inet_pton(AF_INET6, o->address, &ep->addr.in6.sin6_addr) != 1)
			bad_address(o->address, "IPv6");
		ep->len = sizeof(ep->addr.in6);
	} else {
		ep->family = AF_INET;
		ep->addr.in.sin_family = AF_INET;
		ep->addr.in.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
		if (o->address && inet_pton(AF_INET, o->address, &ep->addr.in.sin_addr) != 1)
			bad_address(o->address, "IPv4");
		ep->len = sizeof(ep->addr.in);
	}
	fd = socket(ep->family, SOCK_STREAM, 0);
	if (fd < 0)
		die("socket");
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(fd, (struct sockaddr *)&ep->addr, ep->len) || listen(fd, 1024))
		die("bind/listen");
	if (ep->family != AF_UNIX && getsockname(fd, (struct sockaddr *)&ep->addr, &ep->len))
		die("getsockname");
	return fd;
}

static void nodelay(int fd, int family)
{
	int one = 1;

	if (family != AF_UNIX && setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)))
		die("TCP_NODELAY");
}

static void serve(const struct options *o, int fd, int family)
{
	char *buf = malloc(o->size > 65536 ? o->size : 65536);

	nodelay(fd, family);
	if (o->event_driven)
		event_driven(fd);
	if (!strcmp(o->mode, "stream")) {
		for (;;) {
			ssize_t n = read(fd, buf, 65536);

			if (n < 0 && errno == EAGAIN)
				wait_ready(fd, EPOLLIN);
			else if (n == 0 || (n < 0 && errno != EINTR))
				break;
		}
	} else {
		while (read_all(fd, buf, o->size) == 1)
			if (write_all(fd, buf, o->size))
				break;
	}
	exit(0);
}

/* short and lived modes: one connection after another, each one request and its reply (short),
 * or requests for a lifetime (lived) */
static void serve_short(const struct options *o, int lfd, long count)
{
	char *buf = malloc(o->size);

	for (long i = 0; i < count; i++) {
		int fd = accept(lfd, NULL, NULL);

		if (fd < 0)
			die("accept");
		nodelay(fd, AF_INET);
		if (o->event_driven)
			event_driven(fd);
		do {
			int got = read_all(fd, buf, o->size);

			if (got == 0 && !strcmp(o->mode, "lived"))
				break; /* the client's end of this connection */
			if (got != 1 || write_all(fd, buf, o->size))
				die("short serve");
		} while (!strcmp(o->mode, "lived"));
		if (epoll_fd >= 0)
			epoll_ctl(epoll_fd, EPOLL_CTL_DEL, fd, NULL);
		close(fd);
	}
	exit(0);
}

/* A connected client socket, set up as the options say. */
static int connect_to(const struct options *o, const struct endpoint *ep)
{
	int fd = socket(ep->family, SOCK_STREAM, 0);

	if (fd < 0 || connect(fd, (const struct sockaddr *)&ep->addr, ep->len))
		die("connect");
	nodelay(fd, ep->family);
	if (o->event_driven)
		event_driven(fd);
	return fd;
}

static void client_short(const struct options *o, const struct endpoint *ep, long count, double *lat)
{
	char *buf = calloc(1, o->size), *back = malloc(o->size);

	pin(cpu_for(o, 1, 0));
	for (long i = -o->warmup; i < count; i++) {
		double t0 = now_us(), requests = 0;
		int fd = connect_to(o, ep);

		do {
			if (requests && o->gap_us)
				usleep(o->gap_us);
			if (write_all(fd, buf, o->size) || read_all(fd, back, o->size) != 1)
				die("short request");
			requests++;
		} while (!strcmp(o->mode, "lived") && now_us() - t0 < o->seconds * 1e6);
		if (epoll_fd >= 0)
			epoll_ctl(epoll_fd, EPOLL_CTL_DEL, fd, NULL);
		close(fd);
		if (i >= 0)
			lat[i] = !strcmp(o->mode, "lived") ? requests : now_us() - t0;
	}
	exit(0);
}

static int compare(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return (x > y) - (x < y);
}

static double percentile(const double *sorted, long n, double p)
{
	long i = (long)ceil(p / 100.0 * n) - 1;

	return sorted[i < 0 ? 0 : (i >= n ? n - 1 : i)];
}

/* One client connection: rtt fills lat[0..count), stream stores bytes sent in *bytes. */
static void client(const struct options *o, const struct endpoint *ep, int conn, long count, double *lat,
		   double *bytes)
{
	char *buf = malloc(o->size), *back = malloc(o->size);
	int fd = connect_to(o, ep);

	pin(cpu_for(o, 1, conn));
	for (long i = 0; i < o->size; i++)
		buf[i] = (char)(i * 131 + conn);
	if (!strcmp(o->mode, "stream")) {
		double end = now_us() + o->seconds * 1e6, sent = 0;

		while (now_us() < end) {
			if (write_all(fd, buf, o->size))
				die("write");
			sent += o->size;
		}
		*bytes = sent;
	} else {
		for (long i = -o->warmup; i < count; i++) {
			double t0;

			if (i == 0 && o->settle_ms)
				usleep(o->settle_ms * 1000);
			t0 = now_us();

			if (write_all(fd, buf, o->size) || read_all(fd, back, o->size) != 1)
				die("echo");
			if (i >= 0)
				lat[i] = now_us() - t0;
		}
		if (memcmp(buf, back, o->size)) {
			fprintf(stderr, "pingpong: echo differs from request\n");
			exit(1);
		}
	}
	close(fd);
	exit(0);
}

/* short and lived: connections one after the other, each served as it comes */
static int one_by_one(const struct options *o)
{
	return !strcmp(o->mode, "short") || !strcmp(o->mode, "lived");
}

static void usage(void)
{
	fprintf(stderr, "usage: pingpong [-t tcp|tcp6|unix] [-a ADDR] [-m rtt|stream|short|lived] [-e] [-n N] [-s SIZE] "
			"[-c CONNS] [-p same|cross|any] [-w WARMUP] [-j SETTLE_MS] [-d SECONDS] [-i GAP_US]\n");
	exit(2);
}

int main(int argc, char **argv)
{
	struct options o = { "tcp", NULL, "rtt", "any", 100000, -1, 1024, 100, 1, 3.0, 0, 1000 };
	struct endpoint ep;
	int opt, lfd, status, failed = 0;

	while ((opt = getopt(argc, argv, "t:a:m:n:s:c:p:w:j:d:i:e")) != -1) {
		switch (opt) {
		case 't': o.transport = optarg; break;
		case 'a': o.address = optarg; break;
		case 'm': o.mode = optarg; break;
		case 'n': o.requests = atol(optarg); break;
		case 's': o.size = atol(optarg); break;
		case 'c': o.connections = atoi(optarg); break;
		case 'p': o.placement = optarg; break;
		case 'w': o.warmup = atol(optarg); break;
		case 'j': o.settle_ms = atol(optarg); break;
		case 'd': o.seconds = atof(optarg); break;
		case 'e': o.event_driven = 1; break;
		case 'i': o.gap_us = atol(optarg); break;
		default: usage();
		}
	}
	if (o.requests < 1 || o.size < 1 || o.connections < 1 || o.connections > 1024 || o.seconds <= 0 ||
	    (strcmp(o.transport, "tcp") && strcmp(o.transport, "tcp6") && strcmp(o.transport, "unix")) ||
	    (strcmp(o.mode, "rtt") && strcmp(o.mode, "stream") && strcmp(o.mode, "short") && strcmp(o.mode, "lived")) ||
	    o.settle_ms < 0 || o.gap_us < 0 ||
	    (one_by_one(&o) && (o.connections != 1 || !strcmp(o.transport, "unix"))) ||
	    (strcmp(o.placement, "same") && strcmp(o.placement, "cross") && strcmp(o.placement, "any")))
		usage();
	if (o.warmup < 0)
		o.warmup = !strcmp(o.mode, "lived") ? 0 : o.requests / 20 < 2000 ? o.requests / 20 : 2000;

	long per_conn = (o.requests + o.connections - 1) / o.connections;
	long total = per_conn * o.connections;
	double *lat = mmap(NULL, total * sizeof(double) + o.connections * sizeof(double), PROT_READ | PROT_WRITE,
			   MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	double *bytes = lat + total;

	if (lat == MAP_FAILED)
		die("mmap");
	lfd = listen_on(&o, &ep);
	if (one_by_one(&o)) {
		if (fork() == 0) {
			pin(cpu_for(&o, 0, 0));
			serve_short(&o, lfd, total + o.warmup);
		}
		if (fork() == 0)
			client_short(&o, &ep, total, lat);
	}
	for (int c = 0; c < o.connections && !one_by_one(&o); c++) {
		if (fork() == 0) { /* server for one connection */
			int fd = accept(lfd, NULL, NULL);

			if (fd < 0)
				die("accept");
			close(lfd);
			pin(cpu_for(&o, 0, c));
			serve(&o, fd, ep.family);
		}
	}
	double start = now_us();
	for (int c = 0; c < o.connections && !one_by_one(&o); c++)
		if (fork() == 0)
			client(&o, &ep, c, per_conn, lat + c * per_conn, bytes + c);
	close(lfd);
	while (wait(&status) > 0)
		failed |= !WIFEXITED(status) || WEXITSTATUS(status);
	double elapsed = (now_us() - start) / 1e6;
	if (failed) {
		fprintf(stderr, "pingpong: a client or server failed\n");
		return 1;
	}

	printf("{\"transport\": \"%s\", \"mode\": \"%s\", \"io\": \"%s\", \"size\": %ld, \"connections\": %d, "
	       "\"placement\": \"%s\", ", o.transport, o.mode, o.event_driven ? "event" : "blocking", o.size,
	       o.connections, o.placement);
	if (!strcmp(o.mode, "stream")) {
		double sent = 0;

		for (int c = 0; c < o.connections; c++)
			sent += bytes[c];
		printf("\"seconds\": %.3f, \"bytes\": %.0f, \"mbytes_per_s\": %.2f}\n", o.seconds, sent,
		       sent / o.seconds / 1e6);
	} else if (!strcmp(o.mode, "lived")) {
		double requests = 0;

		for (long i = 0; i < total; i++)
			requests += lat[i];
		printf("\"lifetime_s\": %.3f, \"gap_us\": %ld, \"connections_made\": %ld, \"requests\": %.0f, "
		       "\"requests_per_s\": %.0f}\n", o.seconds, o.gap_us, total, requests, requests / elapsed);
	} else {
		double sum = 0;

		for (long i = 0; i < total; i++)
			sum += lat[i];
		qsort(lat, total, sizeof(double), compare);
		printf("\"requests\": %ld, \"mean_us\": %.3f, \"p50_us\": %.3f, \"p90_us\": %.3f, "
		       "\"p99_us\": %.3f, \"p999_us\": %.3f, \"max_us\": %.3f, \"requests_per_s\": %.0f}\n",
		       total, sum / total, percentile(lat, total, 50), percentile(lat, total, 90),
		       percentile(lat, total, 99), percentile(lat, total, 99.9), lat[total - 1], total / elapsed);
	}
	return 0;
}
