/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Fuzz target for the NBD server (lib/server*.c) as a hostile client
 * meets it: the input is everything a client sends after connecting, the
 * handshake flags, options and transmission requests with their
 * payloads, fed through a socket to real servers exporting a 1 MiB raw
 * disk (a memfd) on the library's loop thread.  So the whole state
 * machine runs: option haggling, the request checks, disk I/O, replies,
 * pipelining, the in-flight bounds and EOF at any point.
 *
 * The input's first byte picks the server: 0 writable with the default
 * export, 1 read-only with a name and a description, 2 TCP with TLS-PSK
 * required (all the fuzzer can reach there is what comes before and
 * during the handshake).  The rest is written while the replies are read
 * and dropped; then the client half-closes and the server must end the
 * connection by itself.  A connection still open 20 seconds later is a
 * hang and aborts.  Before the next input, the target waits (on the loop)
 * until the server has freed every connection: a disk request still in
 * flight is referenced only from the io_uring ring, which LeakSanitizer
 * does not scan, and would look leaked.
 */
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <blockmirror/blockmirror.h>

#include "server-int.h"

#define DISK_SIZE (1u << 20)
#define NSERVERS 3
#define HANG_MS 20000

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static struct {
	bool ready;
	char dir[64];
	int memfd;
	struct blockmirror_disk *disk;
	struct blockmirror_server *srv[NSERVERS];
} F;

static void
teardown(void)
{
	char path[128];

	for (int i = 0; i < NSERVERS; i++)
		blockmirror_server_stop(F.srv[i]);
	blockmirror_disk_close(F.disk);
	close(F.memfd);
	snprintf(path, sizeof path, "%s/keys.psk", F.dir);
	unlink(path);
	rmdir(F.dir);
}

static void
die(const char *what)
{
	fprintf(stderr, "fuzz-nbd-server: %s: %s\n", what,
		blockmirror_last_error() ? blockmirror_last_error()
					 : strerror(errno));
	abort();
}

static void
setup(void)
{
	struct blockmirror_server_options o = { .size = sizeof o };
	char path[128], addr[160];
	FILE *fp;

	signal(SIGPIPE, SIG_IGN);
	strcpy(F.dir, "/tmp/bm-fuzz-nbd-XXXXXX");
	if (!mkdtemp(F.dir))
		die("mkdtemp");
	F.memfd = memfd_create("fuzz-nbd-disk", 0);
	if (F.memfd < 0 || ftruncate(F.memfd, DISK_SIZE) < 0)
		die("memfd");
	/* Some data, so reads and block status see more than a hole. */
	for (unsigned off = 0; off < DISK_SIZE / 2; off += 4096) {
		uint8_t b[512];

		memset(b, (int)(off >> 12), sizeof b);
		if (pwrite(F.memfd, b, sizeof b, off) != (ssize_t)sizeof b)
			die("pwrite");
	}
	snprintf(path, sizeof path, "/proc/self/fd/%d", F.memfd);
	F.disk = blockmirror_disk_open(path, BLOCKMIRROR_FORMAT_RAW, 0);
	if (!F.disk || blockmirror_disk_start_thread(F.disk) < 0)
		die("disk");

	/* Plenty of clients: connections close asynchronously. */
	o.max_clients = 1024;
	snprintf(addr, sizeof addr, "unix:%s/rw.sock", F.dir);
	if (!(F.srv[0] = blockmirror_server_start(F.disk, addr, &o)))
		die("server rw");
	o.readonly = true;
	o.export_name = "fuzz";
	o.description = "a read-only export for the fuzzer";
	snprintf(addr, sizeof addr, "unix:%s/ro.sock", F.dir);
	if (!(F.srv[1] = blockmirror_server_start(F.disk, addr, &o)))
		die("server ro");
	snprintf(path, sizeof path, "%s/keys.psk", F.dir);
	fp = fopen(path, "w");
	if (!fp || fprintf(fp, "alice:0123456789abcdef0123456789abcdef\n") < 0 ||
	    fclose(fp) != 0)
		die("psk file");
	o.readonly = false;
	o.tls_psk_file = path;
	if (!(F.srv[2] = blockmirror_server_start(F.disk, "tcp:127.0.0.1:0",
						  &o)))
		die("server tls");
	atexit(teardown);
	F.ready = true;
}

static int
connect_to(int i)
{
	const char *a = blockmirror_server_address(F.srv[i]);
	int fd;

	if (strncmp(a, "unix:", 5) == 0) {
		struct sockaddr_un sa = { .sun_family = AF_UNIX };

		snprintf(sa.sun_path, sizeof sa.sun_path, "%s", a + 5);
		fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (fd >= 0 &&
		    connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
			close(fd);
			fd = -1;
		}
	} else {
		/* tcp:127.0.0.1:PORT */
		struct addrinfo hints = { .ai_socktype = SOCK_STREAM,
					  .ai_flags = AI_NUMERICHOST |
						      AI_NUMERICSERV };
		struct addrinfo *res;

		if (getaddrinfo("127.0.0.1", strrchr(a, ':') + 1, &hints,
				&res))
			return -1;
		fd = socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (fd >= 0 && connect(fd, res->ai_addr, res->ai_addrlen) < 0) {
			close(fd);
			fd = -1;
		}
		freeaddrinfo(res);
	}
	if (fd >= 0)
		fcntl(fd, F_SETFL, O_NONBLOCK);
	return fd;
}

static void
count_clients(struct bm_call *call)
{
	call->u64 = 0;
	for (int i = 0; i < NSERVERS; i++)
		call->u64 += F.srv[i]->nclients;
	bm_waiter_signal(&call->w, 0);
}

/* Wait until no server has a connection left. */
static void
wait_idle(void)
{
	for (int i = 0; i < HANG_MS; i++) {
		struct bm_call call = { .fn = count_clients };

		if (bm_disk_call(F.disk, &call) < 0)
			die("bm_disk_call");
		if (!call.u64)
			return;
		usleep(1000);
	}
	fprintf(stderr, "fuzz-nbd-server: a connection was never freed\n");
	abort();
}

static int64_t
now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static uint8_t sink[1 << 16];
	size_t off = 1;
	int64_t deadline;
	int fd;

	if (!F.ready)
		setup();
	if (size < 1)
		return 0;
	fd = connect_to(data[0] % NSERVERS);
	if (fd < 0)
		die("connect");
	if (off == size)
		shutdown(fd, SHUT_WR);
	deadline = now_ms() + HANG_MS;
	for (;;) {
		struct pollfd p = { .fd = fd, .events = POLLIN };
		ssize_t n;

		if (off < size)
			p.events |= POLLOUT;
		if (now_ms() > deadline) {
			fprintf(stderr, "fuzz-nbd-server: the server kept "
				"the connection open after EOF\n");
			abort();
		}
		if (poll(&p, 1, 1000) < 0 && errno != EINTR)
			die("poll");
		if (p.revents & POLLOUT) {
			n = send(fd, data + off, size - off, MSG_NOSIGNAL);
			if (n > 0)
				off += (size_t)n;
			else if (n < 0 && errno != EAGAIN && errno != EINTR)
				off = size; /* it hung up on us: fine */
			if (off == size)
				shutdown(fd, SHUT_WR);
		}
		if (p.revents & (POLLIN | POLLHUP | POLLERR)) {
			n = recv(fd, sink, sizeof sink, 0);
			if (n == 0 || (n < 0 && errno != EAGAIN &&
				       errno != EINTR))
				break;
		}
	}
	close(fd);
	wait_idle();
	return 0;
}
