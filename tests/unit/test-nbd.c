/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The NBD client store (lib/nbd.c) against real servers started here:
 * nbdkit (memory plugin, with the delay, error, nozero, fua, noextents and
 * log filters, an eval plugin that answers block status piecemeal) and
 * qemu-nbd over files.  Data round trips, splitting and the in-flight
 * bounds, zero/trim/flush/FUA and their fallbacks, extents against
 * qemu-img map, the size check of create, read-only exports, connect
 * failures, a server that never answers (-ETIMEDOUT), cancel
 * (-ECANCELED), a server killed mid-request (-EIO), the rule that nothing
 * stays armed on the loop once the caller has nothing outstanding;
 * multi-conn (several connections for a bulk copy, counted in nbdkit's
 * log, the flush after every write is answered, servers that take fewer
 * connections, one connection lost); an offline copy's flushes every
 * 64 MiB; and through the public API: copy to
 * and from an export (with multi-conn, and a server killed mid-copy),
 * verify, info, and a mirror job whose destination is an NBD export.
 *
 * A missing nbdkit, qemu-nbd or qemu-img skips the test (77), except with
 * CI=true, where it fails.
 */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <dirent.h>
#include <time.h>
#include <unistd.h>

#include <blockmirror/blockmirror.h>

#include "extent.h"
#include "helpers.h"
#include "image.h"
#include "nbd.h"
#include "store.h"

#define MiB (1024 * 1024)
#define MAX_SERVERS 4

static char dir[64];
static char sock[128];
static char uri[192];
static struct bm_loop *loop;
static pid_t servers[MAX_SERVERS];
static int nservers;

/* ---- helpers --------------------------------------------------------- */

static void
fill(unsigned char *b, size_t n, unsigned seed)
{
	for (size_t i = 0; i < n; i++)
		b[i] = (unsigned char)(seed * 31 + i * 7 + 1 + (i >> 12));
}

static bool
is_zero(const unsigned char *b, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (b[i])
			return false;
	return true;
}

static void
setup(void)
{
	strcpy(dir, "/tmp/test-nbd.XXXXXX");
	ck_assert_ptr_nonnull(mkdtemp(dir));
	snprintf(sock, sizeof sock, "%s/sock", dir);
	snprintf(uri, sizeof uri, "nbd+unix:///?socket=%s", sock);
	ck_assert_int_eq(bm_loop_new(64, &loop), 0);
	nservers = 0;
	unsetenv("BLOCKMIRROR_NBD_TIMEOUT");
}

static void
kill_servers(void)
{
	for (int i = 0; i < nservers; i++) {
		kill(servers[i], SIGKILL);
		waitpid(servers[i], NULL, 0);
	}
	nservers = 0;
}

static void
teardown(void)
{
	kill_servers();
	bm_loop_free(loop);
	loop = NULL;
	remove_tree(dir);
}

/* Start a server; it dies with the test process in any case. */
static pid_t
spawn(char *const argv[])
{
	pid_t pid = spawn_quiet(argv);

	ck_assert_int_lt(nservers, MAX_SERVERS);
	servers[nservers++] = pid;
	return pid;
}

/* nbdkit -f --exit-with-parent -U sock ARGS... (NULL-terminated). */
static pid_t
start_nbdkit(const char *first, ...)
{
	va_list ap;
	pid_t pid;

	ck_assert_int_lt(nservers, MAX_SERVERS);
	va_start(ap, first);
	pid = nbdkit_start_va(sock, first, ap);
	va_end(ap);
	servers[nservers++] = pid;
	return pid;
}

/* qemu-nbd -f raw --socket=sock --persistent -x '' -e SHARED FILE */
static pid_t
start_qemu_nbd_shared(const char *file, unsigned shared)
{
	char sockopt[160], sharedopt[32];
	char *argv[] = { "qemu-nbd", "-f", "raw", sockopt, "--persistent",
			 "-x", "", sharedopt, (char *)file, NULL };
	pid_t pid;

	snprintf(sockopt, sizeof sockopt, "--socket=%s", sock);
	snprintf(sharedopt, sizeof sharedopt, "--shared=%u", shared);
	pid = spawn(argv);
	wait_socket(sock, pid);
	return pid;
}

/* qemu-nbd -f raw --socket=sock --persistent -x '' [-r] FILE */
static pid_t
start_qemu_nbd(const char *file, bool readonly)
{
	char sockopt[160];
	char *argv[] = { "qemu-nbd", "-f", "raw", sockopt, "--persistent",
			 "--discard=unmap", "-x", "", (char *)file, NULL,
			 NULL };
	pid_t pid;

	snprintf(sockopt, sizeof sockopt, "--socket=%s", sock);
	if (readonly) {
		argv[8] = "-r";
		argv[9] = (char *)file;
	}
	pid = spawn(argv);
	wait_socket(sock, pid);
	return pid;
}

static void
make_file(const char *path, uint64_t size)
{
	int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);

	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(ftruncate(fd, (off_t)size), 0);
	close(fd);
}

static void
write_file_at(const char *path, const void *buf, size_t len, off_t off)
{
	int fd = open(path, O_RDWR);

	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(pwrite(fd, buf, len, off), (ssize_t)len);
	close(fd);
}

static struct bm_store *
open_store(unsigned flags)
{
	struct bm_store *s = NULL;
	int r = bm_nbd_open(loop, uri, flags, &s);

	ck_assert_msg(r == 0, "bm_nbd_open: %d %s", r,
		      blockmirror_last_error());
	return s;
}

static int
do_io(struct bm_store *s, void (*op)(struct bm_store *, struct bm_io *),
      uint64_t off, uint64_t len, void *buf, unsigned flags)
{
	struct bm_io io = { .offset = off, .length = len, .buf = buf,
			    .flags = flags };

	return bm_store_sync(s, op, &io);
}

/* ---- nbdkit's log filter --------------------------------------------- */

/* Connections (ids below 64) that sent an `op` request ("Write", "Read",
 * "Flush"...), as a bit mask, from nbdkit's log filter file. */
static uint64_t
log_conns(const char *path, const char *op)
{
	FILE *f = fopen(path, "r");
	char line[1024], word[32];
	uint64_t mask = 0;
	unsigned id;

	ck_assert_ptr_nonnull(f);
	while (fgets(line, sizeof line, f)) {
		const char *c = strstr(line, " connection=");

		if (c && sscanf(c, " connection=%u %31s", &id, word) == 2 &&
		    id < 64 && strcmp(word, op) == 0)
			mask |= 1ull << id;
	}
	fclose(f);
	return mask;
}

/* How many `op` requests the log holds. */
static unsigned
log_count(const char *path, const char *op)
{
	FILE *f = fopen(path, "r");
	char line[1024], word[32];
	unsigned id, n = 0;

	ck_assert_ptr_nonnull(f);
	while (fgets(line, sizeof line, f)) {
		const char *c = strstr(line, " connection=");

		if (c && sscanf(c, " connection=%u %31s", &id, word) == 2 &&
		    strcmp(word, op) == 0)
			n++;
	}
	fclose(f);
	return n;
}

static unsigned
popcount(uint64_t m)
{
	return (unsigned)__builtin_popcountll(m);
}

/* Line numbers in the log: the first `op` request, and the last reply to
 * an `op` request (0: none). */
static void
log_lines(const char *path, const char *op, unsigned *first_request,
	  unsigned *last_reply)
{
	FILE *f = fopen(path, "r");
	char line[1024], word[32], reply[40];
	unsigned id, no = 0;

	ck_assert_ptr_nonnull(f);
	snprintf(reply, sizeof reply, "...%s", op);
	*first_request = *last_reply = 0;
	while (fgets(line, sizeof line, f)) {
		const char *c = strstr(line, " connection=");

		no++;
		if (!c || sscanf(c, " connection=%u %31s", &id, word) != 2)
			continue;
		if (strcmp(word, op) == 0 && !*first_request)
			*first_request = no;
		if (strcmp(word, reply) == 0)
			*last_reply = no;
	}
	fclose(f);
}

/* Loop tests run with one connection (_i 0), then with a bulk copy's
 * several (_i 1: nbdkit's plugins advertise multi-conn).  The store asks
 * for 4 and keeps the extra ones whose handshakes end within a second
 * (EXTRA_WAIT_NS) or 4 times the first's: a loaded machine may give it
 * fewer than 4.  Several is what these tests need: at least 2. */
static unsigned
multi_conns(struct bm_store *s)
{
	unsigned n = bm_nbd_connections(s);

	ck_assert_msg(n >= 2 && n <= 4, "%u connections", n);
	return n;
}

static struct bm_store *
open_store_conns(unsigned flags, int i)
{
	struct bm_store *s = open_store(flags | (i ? BM_OPEN_MULTI_CONN : 0));

	if (i)
		multi_conns(s);
	else
		ck_assert_uint_eq(bm_nbd_connections(s), 1);
	return s;
}

/* Asynchronous requests, with when they finished. */
struct req {
	struct bm_io io;
	bool done;
	int err;
	uint64_t done_ms;
};

static void
req_done(struct bm_io *io, int err)
{
	struct req *r = io->opaque;

	ck_assert_msg(!r->done, "done called twice");
	r->done = true;
	r->err = err;
	r->done_ms = now_ms();
}

static void
submit(struct bm_store *s, void (*op)(struct bm_store *, struct bm_io *),
       struct req *r, uint64_t off, uint64_t len, void *buf, unsigned flags)
{
	memset(r, 0, sizeof *r);
	r->io.offset = off;
	r->io.length = len;
	r->io.buf = buf;
	r->io.flags = flags;
	r->io.done = req_done;
	r->io.opaque = r;
	op(s, &r->io);
	ck_assert_msg(!r->done, "completed inside the call that started it");
}

/* Turn the loop until every request is done; false after timeout_ms. */
static bool
run_all(struct req *r, size_t n, uint64_t timeout_ms)
{
	uint64_t end = now_ms() + timeout_ms;

	for (;;) {
		size_t left = 0;

		for (size_t i = 0; i < n; i++)
			left += !r[i].done;
		if (!left)
			return true;
		if (now_ms() > end)
			return false;
		ck_assert_int_ge(bm_loop_run_once(loop, 50), 0);
	}
}

static void
run_for(uint64_t ms)
{
	uint64_t end = now_ms() + ms;

	while (now_ms() < end)
		ck_assert_int_ge(bm_loop_run_once(loop, 20), 0);
}

/* ---- URIs -------------------------------------------------------------- */

START_TEST(test_is_uri)
{
	ck_assert(bm_nbd_is_uri("nbd://host/export"));
	ck_assert(bm_nbd_is_uri("nbds://host:10810/"));
	ck_assert(bm_nbd_is_uri("nbd+unix:///?socket=/tmp/s"));
	ck_assert(bm_nbd_is_uri("nbds+unix:///x?socket=/tmp/s"));
	ck_assert(!bm_nbd_is_uri("/var/lib/images/disk.img"));
	ck_assert(!bm_nbd_is_uri("disk.img"));
	ck_assert(!bm_nbd_is_uri("nbd+vsock://1:2/"));
	ck_assert(!bm_nbd_is_uri("./nbd://x"));
	ck_assert(!bm_nbd_is_uri(""));
	ck_assert(!bm_nbd_is_uri(NULL));
}
END_TEST

START_TEST(test_timeout_env)
{
	unsetenv("BLOCKMIRROR_NBD_TIMEOUT");
	ck_assert_uint_eq(bm_nbd_timeout(), 30);
	setenv("BLOCKMIRROR_NBD_TIMEOUT", "2", 1);
	ck_assert_uint_eq(bm_nbd_timeout(), 2);
	setenv("BLOCKMIRROR_NBD_TIMEOUT", "0", 1);
	ck_assert_uint_eq(bm_nbd_timeout(), 30);
	setenv("BLOCKMIRROR_NBD_TIMEOUT", "x", 1);
	ck_assert_uint_eq(bm_nbd_timeout(), 30);
}
END_TEST

/* ---- data path ------------------------------------------------------- */

START_TEST(test_roundtrip)
{
	static const size_t lens[] = { 1, 511, 4096, 65537, MiB, 3 * MiB + 1,
				       8 * MiB };
	size_t big = 40 * MiB + 3;
	unsigned char *w = malloc(big), *r = malloc(big);
	struct bm_store *s;

	start_nbdkit("memory", "64M", NULL);
	s = open_store(BM_OPEN_WRITE);
	ck_assert_uint_eq(s->size, 64 * MiB);
	ck_assert_uint_eq(s->align, 1);
	ck_assert(!s->readonly);
	ck_assert(!s->block_device);
	ck_assert_uint_eq(s->allocated, UINT64_MAX);
	ck_assert_str_eq(s->name, uri);
	for (size_t i = 0; i < sizeof lens / sizeof lens[0]; i++) {
		uint64_t off = (i * 1234567 + 3) % (64 * MiB - lens[i]);

		fill(w, lens[i], (unsigned)i);
		ck_assert_int_eq(do_io(s, s->ops->write, off, lens[i], w, 0),
				 0);
		memset(r, 0xee, lens[i]);
		ck_assert_int_eq(do_io(s, s->ops->read, off, lens[i], r, 0), 0);
		ck_assert_mem_eq(w, r, lens[i]);
	}
	/* Larger than one NBD request: split, then put together. */
	fill(w, big, 99);
	ck_assert_int_eq(do_io(s, s->ops->write, 5, big, w, 0), 0);
	memset(r, 0, big);
	ck_assert_int_eq(do_io(s, s->ops->read, 5, big, r, 0), 0);
	ck_assert(memcmp(w, r, big) == 0);
	/* Zero length, and the edges. */
	ck_assert_int_eq(do_io(s, s->ops->read, 64 * MiB, 0, r, 0), 0);
	ck_assert_int_eq(do_io(s, s->ops->read, 64 * MiB - 1, 1, r, 0), 0);
	ck_assert_int_eq(do_io(s, s->ops->read, 64 * MiB - 1, 2, r, 0),
			 -EINVAL);
	ck_assert_ptr_nonnull(strstr(blockmirror_last_error(), uri));
	ck_assert_int_eq(do_io(s, s->ops->write, UINT64_MAX, 2, w, 0),
			 -EINVAL);
	ck_assert_int_eq(do_io(s, s->ops->write, 0, 4096, w, BM_IO_FUA), 0);
	ck_assert_int_eq(do_io(s, s->ops->flush, 0, 0, NULL, 0), 0);
	/* Nothing stays armed once the caller has nothing outstanding. */
	ck_assert_uint_eq(bm_loop_inflight(loop), 0);
	bm_store_close(s);
	free(w);
	free(r);
}
END_TEST

/* More requests and bytes than the store hands to libnbd at once. */
START_TEST(test_many_in_flight)
{
	enum { NW = 192, NR = 30 };
	static struct req wr[NW], rd[NR];
	unsigned char *w = malloc(NW * 64 * 1024);
	unsigned char *r[NR];
	struct bm_store *s;

	start_nbdkit("memory", "64M", NULL);
	s = open_store(BM_OPEN_WRITE);
	fill(w, NW * 64 * 1024, 7);
	for (int i = 0; i < NW; i++)
		submit(s, s->ops->write, &wr[i], (uint64_t)i * 64 * 1024,
		       64 * 1024, w + i * 64 * 1024, 0);
	ck_assert(run_all(wr, NW, 30000));
	for (int i = 0; i < NW; i++)
		ck_assert_int_eq(wr[i].err, 0);
	/* 240 MiB of reads at once, over the 64 MiB budget. */
	for (int i = 0; i < NR; i++) {
		r[i] = malloc(8 * MiB);
		submit(s, s->ops->read, &rd[i], (uint64_t)(i % 4) * MiB,
		       8 * MiB, r[i], 0);
	}
	ck_assert(run_all(rd, NR, 60000));
	for (int i = 0; i < NR; i++) {
		ck_assert_int_eq(rd[i].err, 0);
		ck_assert(memcmp(r[i], w + (i % 4) * MiB, 8 * MiB) == 0);
		free(r[i]);
	}
	ck_assert_uint_eq(bm_loop_inflight(loop), 0);
	bm_store_close(s);
	free(w);
}
END_TEST

/* The store may move to another loop between requests (with every one
 * of its connections). */
START_TEST(test_move_loop)
{
	struct bm_loop *other;
	unsigned char buf[4096];
	struct bm_store *s;

	start_nbdkit("memory", "1M", NULL);
	s = open_store_conns(BM_OPEN_WRITE, _i);
	fill(buf, sizeof buf, 3);
	ck_assert_int_eq(do_io(s, s->ops->write, 100, sizeof buf, buf, 0), 0);
	ck_assert_uint_eq(bm_loop_inflight(loop), 0);
	ck_assert_int_eq(bm_loop_new(8, &other), 0);
	s->loop = other;
	bm_loop_free(loop); /* nothing of the store may be left on it */
	loop = other;
	memset(buf, 0, sizeof buf);
	ck_assert_int_eq(do_io(s, s->ops->read, 100, sizeof buf, buf, 0), 0);
	{
		unsigned char want[4096];

		fill(want, sizeof want, 3);
		ck_assert_mem_eq(buf, want, sizeof buf);
	}
	bm_store_close(s);
}
END_TEST

/* A server with block size constraints: 512 minimum, 64 KiB maximum. */
START_TEST(test_block_sizes)
{
	unsigned char *w = malloc(3 * MiB), *r = malloc(3 * MiB);
	struct bm_store *s;
	int rc;

	start_nbdkit("--filter=blocksize-policy", "memory", "8M",
		     "blocksize-minimum=512", "blocksize-preferred=4096",
		     "blocksize-maximum=65536", "blocksize-error-policy=error",
		     NULL);
	s = open_store(BM_OPEN_WRITE);
	ck_assert_uint_eq(s->align, 512);
	ck_assert_uint_eq(s->preferred, 4096);
	fill(w, 3 * MiB, 4);
	/* 48 parts of 64 KiB each. */
	ck_assert_int_eq(do_io(s, s->ops->write, 512, 3 * MiB, w, 0), 0);
	ck_assert_int_eq(do_io(s, s->ops->read, 512, 3 * MiB, r, 0), 0);
	ck_assert(memcmp(w, r, 3 * MiB) == 0);
	ck_assert_int_eq(do_io(s, s->ops->zero, 1024, 2 * MiB, NULL, 0), 0);
	ck_assert_int_eq(do_io(s, s->ops->read, 512, 3 * MiB, r, 0), 0);
	ck_assert_mem_eq(r, w, 512);
	ck_assert(is_zero(r + 512, 2 * MiB));
	/* Unaligned: libnbd refuses it; the connection is fine. */
	rc = do_io(s, s->ops->read, 1, 100, r, 0);
	ck_assert_msg(rc == -EINVAL, "%d %s", rc, blockmirror_last_error());
	ck_assert_ptr_nonnull(strstr(blockmirror_last_error(), uri));
	ck_assert_int_eq(do_io(s, s->ops->read, 0, 4096, r, 0), 0);
	ck_assert_uint_eq(bm_loop_inflight(loop), 0);
	bm_store_close(s);
	free(w);
	free(r);
}
END_TEST

/* ---- zero, trim, flush, FUA ------------------------------------------ */

static uint64_t
file_blocks(const char *path)
{
	struct stat st;

	ck_assert_int_eq(stat(path, &st), 0);
	return (uint64_t)st.st_blocks * 512;
}

START_TEST(test_zero_trim_qemu)
{
	char file[96];
	unsigned char *w = malloc(4 * MiB), *r = malloc(4 * MiB);
	struct bm_store *s;
	uint64_t before;
	int fz;

	snprintf(file, sizeof file, "%s/disk.raw", dir);
	make_file(file, 16 * MiB);
	start_qemu_nbd(file, false);
	s = open_store(BM_OPEN_WRITE);
	fill(w, 4 * MiB, 5);
	ck_assert_int_eq(do_io(s, s->ops->write, MiB, 4 * MiB, w, BM_IO_FUA),
			 0);
	ck_assert_int_eq(do_io(s, s->ops->flush, 0, 0, NULL, 0), 0);
	before = file_blocks(file);
	ck_assert_uint_ge(before, 4 * MiB);

	/* Zero, keeping the allocation. */
	ck_assert_int_eq(do_io(s, s->ops->zero, MiB, MiB, NULL, 0), 0);
	ck_assert_int_eq(do_io(s, s->ops->read, MiB, MiB, r, 0), 0);
	ck_assert(is_zero(r, MiB));
	ck_assert_int_eq(do_io(s, s->ops->flush, 0, 0, NULL, 0), 0);
	ck_assert_uint_ge(file_blocks(file), before);

	/* Zero, allowed to punch a hole. */
	ck_assert_int_eq(do_io(s, s->ops->zero, 2 * MiB, MiB, NULL,
			       BM_IO_MAY_TRIM), 0);
	ck_assert_int_eq(do_io(s, s->ops->read, 2 * MiB, MiB, r, 0), 0);
	ck_assert(is_zero(r, MiB));
	ck_assert_int_eq(do_io(s, s->ops->flush, 0, 0, NULL, 0), 0);
	ck_assert_uint_lt(file_blocks(file), before);

	/* Fast zero: done quickly, or refused with -ENOTSUP. */
	fz = do_io(s, s->ops->zero, 3 * MiB, 4096, NULL, BM_IO_FAST_ZERO);
	ck_assert_msg(fz == 0 || fz == -ENOTSUP, "fast zero: %d", fz);

	/* Discard is a hint; the rest of the data is untouched. */
	ck_assert_int_eq(do_io(s, s->ops->discard, 3 * MiB, MiB, NULL, 0), 0);
	ck_assert_int_eq(do_io(s, s->ops->read, 4 * MiB, MiB, r, 0), 0);
	ck_assert_mem_eq(r, w + 3 * MiB, MiB);
	/* Unaligned zeroing. */
	ck_assert_int_eq(do_io(s, s->ops->zero, 4 * MiB + 7, 1000, NULL, 0),
			 0);
	ck_assert_int_eq(do_io(s, s->ops->read, 4 * MiB, 4096, r, 0), 0);
	ck_assert_mem_eq(r, w + 3 * MiB, 7);
	ck_assert(is_zero(r + 7, 1000));
	ck_assert_mem_eq(r + 1007, w + 3 * MiB + 1007, 4096 - 1007);
	ck_assert_uint_eq(bm_loop_inflight(loop), 0);
	bm_store_close(s);
	free(w);
	free(r);
}
END_TEST

static size_t
count_in_file(const char *path, const char *needle)
{
	FILE *f = fopen(path, "r");
	char line[1024];
	size_t n = 0;

	ck_assert_ptr_nonnull(f);
	while (fgets(line, sizeof line, f))
		if (strstr(line, needle))
			n++;
	fclose(f);
	return n;
}

/* A server without zero, FUA and block status: the fallbacks. */
START_TEST(test_fallbacks)
{
	char log[96];
	unsigned char *w = malloc(3 * MiB), *r = malloc(3 * MiB);
	struct bm_extent_list l = { 0 };
	struct bm_io io = { 0 };
	struct bm_store *s;
	char logopt[128];

	snprintf(log, sizeof log, "%s/log", dir);
	snprintf(logopt, sizeof logopt, "logfile=%s", log);
	/* nozero and fua advertise neither by default. */
	start_nbdkit("--filter=log", "--filter=nozero", "--filter=fua",
		     "--filter=noextents", "memory", "8M", logopt, NULL);
	s = open_store(BM_OPEN_WRITE);
	fill(w, 3 * MiB, 11);
	ck_assert_int_eq(do_io(s, s->ops->write, 0, 3 * MiB, w, 0), 0);

	/* Zero by writing zeroes; fast zero refused. */
	ck_assert_int_eq(do_io(s, s->ops->zero, 100, 2 * MiB + 5, NULL, 0), 0);
	ck_assert_int_eq(do_io(s, s->ops->read, 0, 3 * MiB, r, 0), 0);
	ck_assert_mem_eq(r, w, 100);
	ck_assert(is_zero(r + 100, 2 * MiB + 5));
	ck_assert_mem_eq(r + 2 * MiB + 105, w + 2 * MiB + 105,
			 MiB - 105);
	ck_assert_int_eq(do_io(s, s->ops->zero, 0, 4096, NULL,
			       BM_IO_FAST_ZERO), -ENOTSUP);

	/* FUA without server FUA: the write is followed by a flush. */
	ck_assert_uint_eq(count_in_file(log, "Flush"), 0);
	ck_assert_int_eq(do_io(s, s->ops->write, 4096, 4096, w, BM_IO_FUA), 0);
	ck_assert_uint_ge(count_in_file(log, "Flush"), 1);
	/* Zeroes too (written as data here). */
	{
		size_t flushes = count_in_file(log, "Flush");

		ck_assert_int_eq(do_io(s, s->ops->zero, 8192, 4096, NULL,
				       BM_IO_FUA), 0);
		ck_assert_uint_gt(count_in_file(log, "Flush"), flushes);
	}

	/* No block status: everything is data. */
	io.offset = 10;
	io.length = 8 * MiB - 20;
	io.extents = &l;
	ck_assert_int_eq(bm_store_sync(s, s->ops->extents, &io), 0);
	ck_assert_uint_eq(l.len, 1);
	ck_assert_uint_eq(l.v[0].offset, 10);
	ck_assert_uint_eq(l.v[0].length, 8 * MiB - 20);
	ck_assert_uint_eq(l.v[0].flags, 0);
	bm_extent_list_free(&l);
	ck_assert_uint_eq(bm_loop_inflight(loop), 0);
	bm_store_close(s);
	free(w);
	free(r);
}
END_TEST

/* nbdkit memory with FUA: the flag goes with the write, no flush. */
START_TEST(test_fua_native)
{
	char log[96], logopt[128];
	unsigned char buf[4096] = { 1 };
	struct bm_store *s;

	snprintf(log, sizeof log, "%s/log", dir);
	snprintf(logopt, sizeof logopt, "logfile=%s", log);
	start_nbdkit("--filter=log", "memory", "1M", logopt, NULL);
	s = open_store(BM_OPEN_WRITE);
	ck_assert_int_eq(do_io(s, s->ops->write, 0, sizeof buf, buf,
			       BM_IO_FUA), 0);
	ck_assert_uint_ge(count_in_file(log, "fua=1"), 1);
	ck_assert_int_eq(do_io(s, s->ops->zero, 4096, 4096, NULL, BM_IO_FUA),
			 0);
	ck_assert_uint_ge(count_in_file(log, "fua=1"), 2);
	ck_assert_uint_eq(count_in_file(log, "Flush"), 0);
	ck_assert_int_eq(do_io(s, s->ops->discard, 0, 4096, NULL, 0), 0);
	ck_assert_uint_ge(count_in_file(log, "Trim"), 1);
	ck_assert_int_eq(do_io(s, s->ops->flush, 0, 0, NULL, 0), 0);
	ck_assert_uint_ge(count_in_file(log, "Flush"), 1);
	bm_store_close(s);
}
END_TEST

/* ---- extents ----------------------------------------------------------- */

struct map_entry {
	uint64_t start, length;
	bool zero, data;
};

/* qemu-img map --output=json, merged where the flags agree. */
static size_t
qemu_img_map(const char *file, struct map_entry *m, size_t max)
{
	char cmd[256], line[512];
	size_t n = 0;
	FILE *p;

	snprintf(cmd, sizeof cmd, "qemu-img map --output=json -f raw '%s'",
		 file);
	p = popen(cmd, "r");
	ck_assert_ptr_nonnull(p);
	while (fgets(line, sizeof line, p)) {
		struct map_entry e = { 0 };
		char *a = strstr(line, "\"start\":");
		char *b = strstr(line, "\"length\":");

		if (!a || !b)
			continue;
		e.start = strtoull(a + 8, NULL, 10);
		e.length = strtoull(b + 9, NULL, 10);
		e.zero = strstr(line, "\"zero\": true") != NULL;
		e.data = strstr(line, "\"data\": true") != NULL;
		if (n && m[n - 1].zero == e.zero && m[n - 1].data == e.data &&
		    m[n - 1].start + m[n - 1].length == e.start) {
			m[n - 1].length += e.length;
			continue;
		}
		ck_assert_uint_lt(n, max);
		m[n++] = e;
	}
	ck_assert_int_eq(pclose(p), 0);
	return n;
}

START_TEST(test_extents_qemu)
{
	static const struct { uint64_t off, len; } data[] = {
		{ MiB, 64 * 1024 }, { 3 * MiB + 4096, 8192 },
		{ 5 * MiB, 2 * MiB }, { 8 * MiB - 4096, 4096 },
	};
	struct map_entry m[64];
	struct bm_extent_list l = { 0 };
	struct bm_io io = { 0 };
	unsigned char *w = malloc(2 * MiB);
	char file[96];
	struct bm_store *s;
	size_t n;

	snprintf(file, sizeof file, "%s/sparse.raw", dir);
	make_file(file, 8 * MiB);
	fill(w, 2 * MiB, 1);
	for (size_t i = 0; i < sizeof data / sizeof data[0]; i++)
		write_file_at(file, w, data[i].len, (off_t)data[i].off);
	n = qemu_img_map(file, m, 64);
	ck_assert_uint_ge(n, 5);
	start_qemu_nbd(file, false);
	s = open_store(0);
	ck_assert(s->readonly);
	io.offset = 0;
	io.length = s->size;
	io.extents = &l;
	ck_assert_int_eq(bm_store_sync(s, s->ops->extents, &io), 0);
	ck_assert_uint_eq(bm_extent_list_end(&l), s->size);
	ck_assert_msg(l.len == n, "%zu extents, qemu-img map has %zu", l.len,
		      n);
	for (size_t i = 0; i < n; i++) {
		ck_assert_uint_eq(l.v[i].offset, m[i].start);
		ck_assert_uint_eq(l.v[i].length, m[i].length);
		ck_assert_msg(!!(l.v[i].flags & BM_EXTENT_ZERO) == m[i].zero &&
			      !!(l.v[i].flags & BM_EXTENT_HOLE) == !m[i].data,
			      "extent %zu at %llu: flags %u, map zero %d data "
			      "%d", i, (unsigned long long)m[i].start,
			      l.v[i].flags, m[i].zero, m[i].data);
	}
	/* An unaligned window appends to a list that ends where it starts. */
	bm_extent_list_reset(&l);
	ck_assert_int_eq(bm_extent_list_append(&l, 0, MiB + 5, 0), 0);
	io = (struct bm_io){ .offset = MiB + 5, .length = 3 * MiB,
			     .extents = &l };
	ck_assert_int_eq(bm_store_sync(s, s->ops->extents, &io), 0);
	ck_assert_uint_eq(bm_extent_list_end(&l), 4 * MiB + 5);
	/* A window that does not start where the list ends is an error. */
	io = (struct bm_io){ .offset = 6 * MiB, .length = MiB,
			     .extents = &l };
	ck_assert_int_lt(bm_store_sync(s, s->ops->extents, &io), 0);
	bm_extent_list_free(&l);
	ck_assert_uint_eq(bm_loop_inflight(loop), 0);
	bm_store_close(s);
	free(w);
}
END_TEST

/* A server that describes 64 KiB per reply: the store asks again. */
START_TEST(test_extents_piecemeal)
{
	struct bm_extent_list l = { 0 };
	struct bm_io io = { 0 };
	struct bm_store *s;
	uint64_t pos;

	start_nbdkit("eval", "get_size=echo 1M",
		     "pread=dd if=/dev/zero count=$3 iflag=count_bytes "
		     "status=none",
		     "can_extents=exit 0",
		     "extents=if [ $(( $4 / 65536 % 2 )) = 0 ]; then t=; "
		     "else t=hole,zero; fi; echo $4 $(( 65536 - $4 % 65536 ))"
		     " $t", NULL);
	s = open_store(0);
	io.offset = 1000;
	io.length = MiB - 2000;
	io.extents = &l;
	ck_assert_int_eq(bm_store_sync(s, s->ops->extents, &io), 0);
	ck_assert_uint_eq(l.len, 16);
	pos = 1000;
	for (size_t i = 0; i < l.len; i++) {
		uint64_t end = i == l.len - 1 ? MiB - 1000
					      : (i + 1) * 65536;

		ck_assert_uint_eq(l.v[i].offset, pos);
		ck_assert_uint_eq(l.v[i].offset + l.v[i].length, end);
		ck_assert_uint_eq(l.v[i].flags, i % 2 ? BM_EXTENT_HOLE |
				  BM_EXTENT_ZERO : 0);
		pos = end;
	}
	bm_extent_list_free(&l);
	bm_store_close(s);
}
END_TEST

/* ---- images: open, create --------------------------------------------- */

START_TEST(test_image_create)
{
	unsigned char w[8192], r[8192];
	struct bm_image *img = NULL;
	struct bm_store *s;
	struct bm_io io = { 0 };
	int rc;

	start_nbdkit("memory", "64M", NULL);
	/* Fresh export: all zero. */
	rc = bm_image_create(loop, uri, BLOCKMIRROR_FORMAT_RAW, 64 * MiB,
			     NULL, false, 0, &img);
	ck_assert_msg(rc == 0, "%s", blockmirror_last_error());
	ck_assert(img->zero_init);
	ck_assert_int_eq(img->format, BLOCKMIRROR_FORMAT_RAW);
	ck_assert_uint_eq(img->size, 64 * MiB);
	ck_assert(!img->readonly);
	fill(w, sizeof w, 2);
	io.offset = 40 * MiB + 3;
	io.length = sizeof w;
	io.buf = w;
	ck_assert_int_eq(bm_image_sync(img, bm_image_write, &io), 0);
	bm_image_close(img);
	ck_assert_uint_eq(bm_loop_inflight(loop), 0);

	/* Now it holds data. */
	ck_assert_int_eq(bm_image_create(loop, uri, BLOCKMIRROR_FORMAT_AUTO,
					 64 * MiB, NULL, true, 0, &img), 0);
	ck_assert(!img->zero_init);
	bm_image_close(img);

	/* Wrong size: refused before anything is written. */
	rc = bm_image_create(loop, uri, BLOCKMIRROR_FORMAT_RAW, 32 * MiB,
			     NULL, true, 0, &img);
	ck_assert_int_eq(rc, -EINVAL);
	ck_assert_ptr_nonnull(strstr(blockmirror_last_error(), "67108864"));
	ck_assert_ptr_nonnull(strstr(blockmirror_last_error(), "33554432"));
	ck_assert_int_eq(bm_image_create(loop, uri, BLOCKMIRROR_FORMAT_QCOW2,
					 64 * MiB, NULL, true, 0, &img),
			 -EINVAL);
	ck_assert_int_eq(bm_image_create(loop, uri, BLOCKMIRROR_FORMAT_RAW,
					 64 * MiB, "a=b", true, 0, &img),
			 -EINVAL);
	s = open_store(0);
	ck_assert_int_eq(do_io(s, s->ops->read, 40 * MiB + 3, sizeof r, r, 0),
			 0);
	ck_assert_mem_eq(r, w, sizeof w);
	bm_store_close(s);

	/* Open: raw whatever is asked, except a format an export is not. */
	ck_assert_int_eq(bm_image_open(loop, uri, BLOCKMIRROR_FORMAT_AUTO, 0,
				       &img), 0);
	ck_assert_int_eq(img->format, BLOCKMIRROR_FORMAT_RAW);
	ck_assert(img->readonly);
	bm_image_close(img);
	ck_assert_int_eq(bm_image_open(loop, uri, BLOCKMIRROR_FORMAT_QCOW2, 0,
				       &img), -EINVAL);
	ck_assert_ptr_nonnull(strstr(blockmirror_last_error(), "raw"));
	ck_assert_int_eq(bm_image_open(loop, uri, BLOCKMIRROR_FORMAT_VHDX,
				       BM_IMAGE_WRITE, &img), -EINVAL);
}
END_TEST

START_TEST(test_readonly_export)
{
	char file[96];
	unsigned char buf[4096];
	struct bm_store *s = NULL;

	snprintf(file, sizeof file, "%s/ro.raw", dir);
	make_file(file, MiB);
	start_qemu_nbd(file, true);
	ck_assert_int_eq(bm_nbd_open(loop, uri, BM_OPEN_WRITE, &s), -EROFS);
	ck_assert_ptr_nonnull(strstr(blockmirror_last_error(), "read-only"));
	ck_assert_ptr_nonnull(strstr(blockmirror_last_error(), uri));
	s = open_store(0);
	ck_assert(s->readonly);
	ck_assert_int_eq(do_io(s, s->ops->read, 0, sizeof buf, buf, 0), 0);
	ck_assert_int_eq(do_io(s, s->ops->write, 0, sizeof buf, buf, 0),
			 -EROFS);
	ck_assert_int_eq(do_io(s, s->ops->zero, 0, sizeof buf, NULL, 0),
			 -EROFS);
	ck_assert_int_eq(do_io(s, s->ops->flush, 0, 0, NULL, 0), 0);
	bm_store_close(s);
}
END_TEST

/* ---- failures ------------------------------------------------------- */

START_TEST(test_connect_errors)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	struct bm_store *s = NULL;
	char bad[256];
	uint64_t t0;
	int lfd, r;

	/* No server at all. */
	ck_assert_int_eq(bm_nbd_open(loop, uri, 0, &s), -ENOENT);
	ck_assert_ptr_nonnull(strstr(blockmirror_last_error(), uri));
	/* Not a URI libnbd accepts. */
	r = bm_nbd_open(loop, "nbd+unix:///", 0, &s);
	ck_assert_msg(r == -EINVAL, "%d %s", r, blockmirror_last_error());

	/* A socket that accepts and never says a word. */
	setenv("BLOCKMIRROR_NBD_TIMEOUT", "2", 1);
	lfd = socket(AF_UNIX, SOCK_STREAM, 0);
	memcpy(sa.sun_path, sock, strlen(sock) + 1);
	ck_assert_int_eq(bind(lfd, (struct sockaddr *)&sa, sizeof sa), 0);
	ck_assert_int_eq(listen(lfd, 4), 0);
	t0 = now_ms();
	ck_assert_int_eq(bm_nbd_open(loop, uri, 0, &s), -ETIMEDOUT);
	ck_assert_uint_ge(now_ms() - t0, 1500);
	ck_assert_uint_lt(now_ms() - t0, 10000);
	close(lfd);
	unlink(sock);

	/* A server without that export. */
	{
		char file[96];

		snprintf(file, sizeof file, "%s/x.raw", dir);
		make_file(file, MiB);
		start_qemu_nbd(file, false);
	}
	snprintf(bad, sizeof bad, "nbd+unix:///nope?socket=%s", sock);
	r = bm_nbd_open(loop, bad, 0, &s);
	ck_assert_msg(r == -ENOENT, "%d %s", r, blockmirror_last_error());
}
END_TEST

/* Reads and writes never answered (60 s delay): -ETIMEDOUT at 2 s, on
 * one connection or spread over several. */
START_TEST(test_hung_server)
{
	static unsigned char buf[3][65536];
	struct req rq[3], late;
	struct bm_store *s;
	uint64_t t0;

	setenv("BLOCKMIRROR_NBD_TIMEOUT", "2", 1);
	start_nbdkit("--filter=delay", "memory", "16M", "rdelay=60",
		     "wdelay=60", NULL);
	s = open_store_conns(BM_OPEN_WRITE, _i);
	t0 = now_ms();
	submit(s, s->ops->read, &rq[0], 0, sizeof buf[0], buf[0], 0);
	submit(s, s->ops->write, &rq[1], MiB, sizeof buf[1], buf[1], 0);
	submit(s, s->ops->read, &rq[2], 40, 1000, buf[2], 0);
	/* At the 2 s timeout, not at the server's 60 s. */
	ck_assert(run_all(rq, 3, 20000));
	for (int i = 0; i < 3; i++) {
		ck_assert_int_eq(rq[i].err, -ETIMEDOUT);
		ck_assert_uint_ge(rq[i].done_ms - t0, 1500);
		ck_assert_uint_lt(rq[i].done_ms - t0, 10000);
	}
	/* The server is gone for good. */
	submit(s, s->ops->read, &late, 0, 512, buf[0], 0);
	ck_assert(run_all(&late, 1, 5000));
	ck_assert_int_eq(late.err, -EIO);
	ck_assert_int_eq(do_io(s, s->ops->flush, 0, 0, NULL, 0), -EIO);
	ck_assert_ptr_nonnull(strstr(blockmirror_last_error(), "gone"));
	ck_assert_uint_eq(bm_loop_inflight(loop), 0);
	bm_store_close(s);
}
END_TEST

/* A slow server within the timeout is just slow. */
START_TEST(test_slow_server)
{
	static unsigned char buf[3][4096];
	struct req rq[3];
	struct bm_store *s;

	/* 1 s writes, well within a 10 s timeout on any machine. */
	setenv("BLOCKMIRROR_NBD_TIMEOUT", "10", 1);
	start_nbdkit("--filter=delay", "memory", "1M", "wdelay=1", NULL);
	s = open_store(BM_OPEN_WRITE);
	for (int i = 0; i < 3; i++) {
		fill(buf[i], sizeof buf[i], (unsigned)i);
		submit(s, s->ops->write, &rq[i], (uint64_t)i * 4096, 4096,
		       buf[i], 0);
	}
	ck_assert(run_all(rq, 3, 20000));
	for (int i = 0; i < 3; i++)
		ck_assert_int_eq(rq[i].err, 0);
	ck_assert_int_eq(do_io(s, s->ops->read, 0, 4096, buf[2], 0), 0);
	fill(buf[1], 4096, 0);
	ck_assert_mem_eq(buf[2], buf[1], 4096);
	bm_store_close(s);
}
END_TEST

START_TEST(test_cancel)
{
	static unsigned char buf[2][65536];
	struct req rq[2], late;
	struct bm_store *s;
	uint64_t t0;

	start_nbdkit("--filter=delay", "memory", "16M", "rdelay=60",
		     "wdelay=60", NULL);
	s = open_store_conns(BM_OPEN_WRITE, _i);
	/* Nothing in flight: cancel does nothing. */
	s->ops->cancel(s);
	ck_assert_int_eq(do_io(s, s->ops->flush, 0, 0, NULL, 0), 0);
	submit(s, s->ops->read, &rq[0], 0, sizeof buf[0], buf[0], 0);
	submit(s, s->ops->write, &rq[1], MiB, sizeof buf[1], buf[1], 0);
	run_for(300);
	ck_assert(!rq[0].done && !rq[1].done);
	t0 = now_ms();
	s->ops->cancel(s);
	ck_assert(!rq[0].done && !rq[1].done); /* not inside the call */
	/* At once: not at the server's 60 s. */
	ck_assert(run_all(rq, 2, 20000));
	for (int i = 0; i < 2; i++) {
		ck_assert_int_eq(rq[i].err, -ECANCELED);
		ck_assert_uint_lt(rq[i].done_ms - t0, 10000);
	}
	submit(s, s->ops->write, &late, 0, 512, buf[0], 0);
	ck_assert(run_all(&late, 1, 5000));
	ck_assert_int_eq(late.err, -EIO);
	ck_assert_uint_eq(bm_loop_inflight(loop), 0);
	bm_store_close(s);
}
END_TEST

/* The server dies while a request waits on it: -EIO at once. */
START_TEST(test_server_killed)
{
	static unsigned char buf[2][65536];
	struct req rq[2], late;
	struct bm_store *s;
	uint64_t t0;
	pid_t pid;

	setenv("BLOCKMIRROR_NBD_TIMEOUT", "30", 1);
	pid = start_nbdkit("--filter=delay", "memory", "16M", "rdelay=5",
			   NULL);
	s = open_store_conns(BM_OPEN_WRITE, _i);
	submit(s, s->ops->read, &rq[0], 0, sizeof buf[0], buf[0], 0);
	submit(s, s->ops->read, &rq[1], MiB, sizeof buf[1], buf[1], 0);
	run_for(300);
	ck_assert(!rq[0].done);
	t0 = now_ms();
	kill(pid, SIGKILL);
	/* At once: not at the 30 s timeout. */
	ck_assert(run_all(rq, 2, 20000));
	for (int i = 0; i < 2; i++) {
		ck_assert_int_eq(rq[i].err, -EIO);
		ck_assert_uint_lt(rq[i].done_ms - t0, 10000);
	}
	submit(s, s->ops->read, &late, 0, 512, buf[0], 0);
	ck_assert(run_all(&late, 1, 5000));
	ck_assert_int_eq(late.err, -EIO);
	ck_assert_uint_eq(bm_loop_inflight(loop), 0);
	bm_store_close(s);
}
END_TEST

/* The server refuses writes: the error is the request's, the
 * connection lives on. */
START_TEST(test_server_errors)
{
	unsigned char buf[4096] = { 0 };
	struct bm_store *s;

	start_nbdkit("--filter=error", "memory", "1M", "error-pwrite=ENOSPC",
		     "error-pwrite-rate=100%", NULL);
	s = open_store(BM_OPEN_WRITE);
	ck_assert_int_eq(do_io(s, s->ops->write, 4096, sizeof buf, buf, 0),
			 -ENOSPC);
	ck_assert_ptr_nonnull(strstr(blockmirror_last_error(), uri));
	ck_assert_ptr_nonnull(strstr(blockmirror_last_error(), "write"));
	ck_assert_int_eq(do_io(s, s->ops->read, 0, sizeof buf, buf, 0), 0);
	{
		/* Several parts, all refused. */
		unsigned char *big = calloc(1, 3 * MiB / 4);

		ck_assert_int_eq(do_io(s, s->ops->write, 0, 3 * MiB / 4, big,
				       0), -ENOSPC);
		free(big);
	}
	ck_assert_int_eq(do_io(s, s->ops->flush, 0, 0, NULL, 0), 0);
	bm_store_close(s);
}
END_TEST

/* Closing with requests out: no callback, no crash, nothing left. */
START_TEST(test_close_busy)
{
	static unsigned char buf[65536];
	struct req rq;
	struct bm_store *s;

	start_nbdkit("--filter=delay", "memory", "1M", "rdelay=60", NULL);
	s = open_store_conns(0, _i);
	submit(s, s->ops->read, &rq, 0, sizeof buf, buf, 0);
	run_for(100);
	bm_store_close(s);
	run_for(200);
	ck_assert(!rq.done);
	ck_assert_uint_eq(bm_loop_inflight(loop), 0);
}
END_TEST


/* ---- multi-conn ------------------------------------------------------ */

static void
log_option(char *log, size_t log_size, char *opt, size_t opt_size,
	   const char *name)
{
	snprintf(log, log_size, "%s/%s", dir, name);
	snprintf(opt, opt_size, "logfile=%s", log);
}

/* The process's sockets: the NBD connections, in a test. */
static int
socket_fds(int *fds, int max)
{
	DIR *d = opendir("/proc/self/fd");
	struct dirent *e;
	char path[300], target[64];
	int n = 0;

	ck_assert_ptr_nonnull(d);
	while ((e = readdir(d))) {
		ssize_t len;

		snprintf(path, sizeof path, "/proc/self/fd/%s", e->d_name);
		len = readlink(path, target, sizeof target - 1);
		if (len <= 0)
			continue;
		target[len] = '\0';
		if (strncmp(target, "socket:", 7) == 0 && n < max)
			fds[n++] = atoi(e->d_name);
	}
	closedir(d);
	return n;
}

/* A store for a bulk copy (BM_OPEN_MULTI_CONN) on a multi-conn server
 * opens 4 connections and spreads commands over them; its flush goes out
 * once every write is answered, wherever it went.  Without the flag, one
 * connection. */
START_TEST(test_multi_conn)
{
	enum { NW = 32, LEN = 256 * 1024 };
	static struct req wr[NW], fl;
	unsigned char *w = malloc(NW * LEN), *r = malloc(NW * LEN);
	char log[96], logopt[128];
	unsigned flush_sent, last_write, unused;
	uint64_t before, writers;
	struct bm_store *s;
	unsigned n;

	log_option(log, sizeof log, logopt, sizeof logopt, "log");
	start_nbdkit("--filter=log", "--filter=delay", "memory", "64M",
		     logopt, "wdelay=200ms", NULL);
	fill(w, NW * LEN, 5);

	s = open_store(BM_OPEN_WRITE);
	ck_assert_uint_eq(bm_nbd_connections(s), 1);
	ck_assert_int_eq(do_io(s, s->ops->write, 0, 4096, w, 0), 0);
	bm_store_close(s);
	before = log_conns(log, "Write");
	ck_assert_uint_eq(popcount(before), 1);

	s = open_store(BM_OPEN_WRITE | BM_OPEN_MULTI_CONN);
	n = multi_conns(s);
	for (int i = 0; i < NW; i++)
		submit(s, s->ops->write, &wr[i], (uint64_t)i * LEN, LEN,
		       w + (size_t)i * LEN, 0);
	/* With the writes still out (200 ms each). */
	submit(s, s->ops->flush, &fl, 0, 0, NULL, 0);
	ck_assert(run_all(wr, NW, 20000));
	ck_assert(run_all(&fl, 1, 20000));
	ck_assert_int_eq(fl.err, 0);
	for (int i = 0; i < NW; i++) {
		ck_assert_int_eq(wr[i].err, 0);
		ck_assert_uint_ge(fl.done_ms, wr[i].done_ms);
	}
	ck_assert_int_eq(do_io(s, s->ops->read, 0, NW * LEN, r, 0), 0);
	ck_assert(memcmp(w, r, NW * LEN) == 0);
	ck_assert_uint_eq(bm_loop_inflight(loop), 0);
	bm_store_close(s);

	writers = log_conns(log, "Write") & ~before;
	ck_assert_msg(popcount(writers) == n, "writes on %u of %u "
		      "connections", popcount(writers), n);
	/* In the log, the flush comes after the last write's reply. */
	log_lines(log, "Write", &unused, &last_write);
	log_lines(log, "Flush", &flush_sent, &unused);
	ck_assert_uint_ne(flush_sent, 0);
	ck_assert_msg(flush_sent > last_write, "the flush (line %u) went out "
		      "before the last write was answered (line %u)",
		      flush_sent, last_write);
	free(w);
	free(r);
}
END_TEST

/* Servers that take fewer connections than asked, or do not advertise
 * multi-conn: the store works with the connections it got, and does not
 * wait long for the others. */
START_TEST(test_multi_conn_fewer)
{
	unsigned char w[65536], r[65536];
	struct bm_store *s;
	char file[96];
	uint64_t t0;

	fill(w, sizeof w, 9);
	/* nbdkit closes the extra clients at once. */
	start_nbdkit("--filter=limit", "memory", "16M", "limit=1", NULL);
	/* Not long: well before the 30 s timeout, on any machine. */
	t0 = now_ms();
	s = open_store(BM_OPEN_WRITE | BM_OPEN_MULTI_CONN);
	ck_assert_uint_lt(now_ms() - t0, 15000);
	ck_assert_uint_eq(bm_nbd_connections(s), 1);
	ck_assert_int_eq(do_io(s, s->ops->write, MiB, sizeof w, w, 0), 0);
	ck_assert_int_eq(do_io(s, s->ops->read, MiB, sizeof r, r, 0), 0);
	ck_assert_mem_eq(w, r, sizeof w);
	ck_assert_int_eq(do_io(s, s->ops->flush, 0, 0, NULL, 0), 0);
	bm_store_close(s);
	kill_servers();
	unlink(sock);

	/* No multi-conn: one connection. */
	start_nbdkit("--filter=multi-conn", "memory", "16M",
		     "multi-conn-mode=disable", NULL);
	s = open_store(BM_OPEN_WRITE | BM_OPEN_MULTI_CONN);
	ck_assert_uint_eq(bm_nbd_connections(s), 1);
	bm_store_close(s);
	kill_servers();
	unlink(sock);

	/* qemu-nbd --shared=2 advertises multi-conn, and leaves a third
	 * client waiting unaccepted. */
	snprintf(file, sizeof file, "%s/shared.raw", dir);
	make_file(file, 16 * MiB);
	start_qemu_nbd_shared(file, 2);
	t0 = now_ms();
	s = open_store(BM_OPEN_WRITE | BM_OPEN_MULTI_CONN);
	ck_assert_uint_lt(now_ms() - t0, 15000);
	/* The second, unless it came too late (a stall); never the
	 * third. */
	ck_assert_uint_ge(bm_nbd_connections(s), 1);
	ck_assert_uint_le(bm_nbd_connections(s), 2);
	ck_assert_int_eq(do_io(s, s->ops->write, 3 * MiB, sizeof w, w, 0), 0);
	ck_assert_int_eq(do_io(s, s->ops->flush, 0, 0, NULL, 0), 0);
	ck_assert_int_eq(do_io(s, s->ops->read, 3 * MiB, sizeof r, r, 0), 0);
	ck_assert_mem_eq(w, r, sizeof w);
	ck_assert_uint_eq(bm_loop_inflight(loop), 0);
	bm_store_close(s);
}
END_TEST

/* An offline copy's writes (BM_IO_WRITEBACK | BM_IO_EVICT) have the
 * server flush after every 64 MiB of them, so that it writes back during
 * the copy; other writes, and the mirror's bulk writes (WRITEBACK alone),
 * do not. */
START_TEST(test_writeback_flush)
{
	enum { LEN = 4 * MiB, N = 40 };
	unsigned char *w = malloc(LEN);
	char log[96], logopt[128];
	struct bm_store *s;
	uint64_t off;

	log_option(log, sizeof log, logopt, sizeof logopt, "log");
	start_nbdkit("--filter=log", "memory", "256M", logopt, NULL);
	s = open_store(BM_OPEN_WRITE | BM_OPEN_MULTI_CONN);
	fill(w, LEN, 3);
	for (int i = 0; i < N; i++) {
		off = (uint64_t)i * LEN;
		ck_assert_int_eq(do_io(s, s->ops->write, off, LEN, w, 0), 0);
		ck_assert_int_eq(do_io(s, s->ops->write, off, LEN, w,
				       BM_IO_WRITEBACK), 0);
	}
	ck_assert_uint_eq(log_count(log, "Flush"), 0);
	for (int i = 0; i < N; i++) {
		off = (uint64_t)i * LEN;
		ck_assert_int_eq(do_io(s, s->ops->write, off, LEN, w,
				       BM_IO_WRITEBACK | BM_IO_EVICT), 0);
	}
	/* 160 MiB: two flushes. */
	ck_assert_uint_eq(log_count(log, "Flush"), 2);
	ck_assert_uint_eq(bm_loop_inflight(loop), 0);
	bm_store_close(s);
	free(w);
}
END_TEST

/* One of the connections is lost while requests wait on the server:
 * every request fails at once with -EIO naming the connection, the store
 * is dead from then on, and nothing stays armed. */
START_TEST(test_multi_conn_lost)
{
	enum { NR = 8 };
	static unsigned char buf[NR][65536];
	struct req rq[NR], late;
	struct bm_store *s;
	char of[32];
	int fds[8];
	uint64_t t0;
	unsigned n;

	setenv("BLOCKMIRROR_NBD_TIMEOUT", "30", 1);
	start_nbdkit("--filter=delay", "memory", "16M", "rdelay=10", NULL);
	s = open_store(BM_OPEN_WRITE | BM_OPEN_MULTI_CONN);
	n = multi_conns(s);
	ck_assert_int_eq(socket_fds(fds, 8), (int)n);
	for (int i = 0; i < NR; i++)
		submit(s, s->ops->read, &rq[i], (uint64_t)i * MiB,
		       sizeof buf[i], buf[i], 0);
	run_for(300);
	for (int i = 0; i < NR; i++)
		ck_assert(!rq[i].done);
	t0 = now_ms();
	/* As if the server dropped that one connection.  At once: not
	 * when the server answers (10 s) or at the 30 s timeout. */
	ck_assert_int_eq(shutdown(fds[1], SHUT_RDWR), 0);
	ck_assert(run_all(rq, NR, 20000));
	for (int i = 0; i < NR; i++) {
		ck_assert_int_eq(rq[i].err, -EIO);
		ck_assert_uint_lt(rq[i].done_ms - t0, 8000);
	}
	ck_assert_ptr_nonnull(strstr(blockmirror_last_error(), "lost"));
	snprintf(of, sizeof of, " of %u)", n);
	ck_assert_msg(strstr(blockmirror_last_error(), of), "%s",
		      blockmirror_last_error());
	submit(s, s->ops->read, &late, 0, 512, buf[0], 0);
	ck_assert(run_all(&late, 1, 5000));
	ck_assert_int_eq(late.err, -EIO);
	ck_assert_ptr_nonnull(strstr(blockmirror_last_error(), "gone"));
	ck_assert_uint_eq(bm_loop_inflight(loop), 0);
	bm_store_close(s);
}
END_TEST

/* ---- public API ----------------------------------------------------- */

static void
write_pattern_file(const char *path, uint64_t size, unsigned seed)
{
	unsigned char *b = malloc(MiB);

	make_file(path, size);
	/* Data, a hole, zeroes written out, data again. */
	fill(b, MiB, seed);
	write_file_at(path, b, MiB, 0);
	write_file_at(path, b, MiB, (off_t)(5 * MiB + 17));
	memset(b, 0, MiB);
	write_file_at(path, b, MiB, (off_t)(9 * MiB));
	fill(b, MiB, seed + 1);
	write_file_at(path, b, 4096, (off_t)(size - 4096));
	free(b);
}

START_TEST(test_copy_verify_info)
{
	struct blockmirror_copy_options co = { .size = sizeof co };
	struct blockmirror_verify_result vr = { .size = sizeof vr };
	struct blockmirror_image_info ii = { .size = sizeof ii };
	char src[96], dst[96], back[96], cmd[512], small[96];
	unsigned char *junk = malloc(MiB);
	int r;

	snprintf(src, sizeof src, "%s/src.raw", dir);
	snprintf(dst, sizeof dst, "%s/dst.raw", dir);
	snprintf(back, sizeof back, "%s/back.raw", dir);
	snprintf(small, sizeof small, "%s/small.raw", dir);
	write_pattern_file(src, 24 * MiB, 1);
	/* The export holds junk where the source has holes. */
	make_file(dst, 24 * MiB);
	memset(junk, 0xff, MiB);
	for (int i = 0; i < 24; i += 3)
		write_file_at(dst, junk, MiB, (off_t)i * MiB);
	start_qemu_nbd(dst, false);

	r = blockmirror_copy(src, uri, &co, NULL);
	ck_assert_msg(r == 0, "copy: %s", blockmirror_last_error());
	snprintf(cmd, sizeof cmd, "qemu-img compare -q -f raw -F raw '%s' "
		 "'%s'", src, dst);
	ck_assert_int_eq(system(cmd), 0);
	/* Again, with the export flagged as existing (overwrite). */
	co.flags = BLOCKMIRROR_COPY_OVERWRITE;
	ck_assert_int_eq(blockmirror_copy(src, uri, &co, NULL), 0);
	ck_assert_int_eq(system(cmd), 0);
	co.flags = 0;

	r = blockmirror_verify(src, BLOCKMIRROR_FORMAT_AUTO, uri,
			       BLOCKMIRROR_FORMAT_AUTO, NULL, NULL, &vr);
	ck_assert_msg(r == 0, "verify: %s", blockmirror_last_error());
	ck_assert(vr.identical);
	write_file_at(src, "x", 1, 7 * MiB + 3);
	ck_assert_int_eq(blockmirror_verify(uri, BLOCKMIRROR_FORMAT_RAW, src,
					    BLOCKMIRROR_FORMAT_RAW, NULL, NULL,
					    &vr), 0);
	ck_assert(!vr.identical);
	ck_assert_uint_eq(vr.first_difference, 7 * MiB + 3);

	/* From the export to a new file. */
	ck_assert_int_eq(blockmirror_copy(uri, back, &co, NULL), 0);
	snprintf(cmd, sizeof cmd, "qemu-img compare -q -f raw -F raw '%s' "
		 "'%s'", dst, back);
	ck_assert_int_eq(system(cmd), 0);

	ck_assert_int_eq(blockmirror_image_info(uri, BLOCKMIRROR_FORMAT_AUTO,
						&ii), 0);
	ck_assert_int_eq(ii.format, BLOCKMIRROR_FORMAT_RAW);
	ck_assert_uint_eq(ii.virtual_size, 24 * MiB);
	ck_assert_uint_eq(ii.allocated_bytes, UINT64_MAX);
	ck_assert(!ii.block_device);

	/* A source of another size: refused, the export untouched. */
	make_file(small, 8 * MiB);
	ck_assert_int_eq(blockmirror_copy(small, uri, &co, NULL), -EINVAL);
	ck_assert_ptr_nonnull(strstr(blockmirror_last_error(), "8388608"));
	ck_assert_int_eq(system(cmd), 0);
	/* blockmirror_image_create on an export: a size check. */
	ck_assert_int_eq(blockmirror_image_create(uri, BLOCKMIRROR_FORMAT_RAW,
						  24 * MiB, NULL, false), 0);
	ck_assert_int_eq(blockmirror_image_create(uri, BLOCKMIRROR_FORMAT_RAW,
						  MiB, NULL, false), -EINVAL);
	ck_assert_int_eq(system(cmd), 0);
	free(junk);
}
END_TEST

static void
guest_writes(struct blockmirror_disk *disk, unsigned char *model,
	     uint64_t size, unsigned *seed, int n)
{
	unsigned char buf[65536];

	for (int i = 0; i < n; i++) {
		uint64_t len = 512 + (uint64_t)rand_r(seed) % 60000;
		uint64_t off = (uint64_t)rand_r(seed) % (size - len);

		fill(buf, len, (unsigned)rand_r(seed));
		ck_assert_int_eq(blockmirror_disk_write(disk, buf, len, off,
							0), 0);
		memcpy(model + off, buf, len);
	}
}

START_TEST(test_mirror_to_nbd)
{
	struct blockmirror_job_options o = { .size = sizeof o };
	struct blockmirror_job_info info = { .size = sizeof info };
	struct events ev = { 0 };
	const uint64_t size = 16 * MiB;
	unsigned char *model = malloc(size), *back = malloc(size);
	struct blockmirror_disk *disk;
	struct blockmirror_job *job;
	char src[96], dst[96], *img;
	unsigned seed = 42;
	int state, fd;

	snprintf(src, sizeof src, "%s/src.raw", dir);
	snprintf(dst, sizeof dst, "%s/dst.raw", dir);
	write_pattern_file(src, size, 3);
	fd = open(src, O_RDONLY);
	ck_assert_int_eq(pread(fd, model, size, 0), (ssize_t)size);
	close(fd);
	make_file(dst, size);
	start_qemu_nbd(dst, false);

	disk = blockmirror_disk_open(src, BLOCKMIRROR_FORMAT_RAW, 0);
	ck_assert_msg(disk != NULL, "%s", blockmirror_last_error());
	ck_assert_int_eq(blockmirror_disk_start_thread(disk), 0);
	o.granularity = 64 * 1024;
	o.on_event = on_event;
	o.event_data = &ev;
	job = blockmirror_job_start(disk, uri, &o);
	ck_assert_msg(job != NULL, "%s", blockmirror_last_error());
	guest_writes(disk, model, size, &seed, 200);
	blockmirror_job_set_mode(job, BLOCKMIRROR_MODE_ACTIVE);
	state = blockmirror_job_wait(job, BLOCKMIRROR_JOB_READY, 60000);
	ck_assert_msg(state == BLOCKMIRROR_JOB_READY, "state %d: %s", state,
		      blockmirror_last_error());
	guest_writes(disk, model, size, &seed, 50);
	ck_assert_msg(blockmirror_job_complete(job) == 0, "pivot: %s",
		      blockmirror_last_error());
	ck_assert_int_eq(blockmirror_job_query(job, &info), 0);
	ck_assert_int_eq(info.state, BLOCKMIRROR_JOB_COMPLETED);
	ck_assert_int_eq(ev.failed, 0);
	ck_assert_int_eq(ev.errors, 0);
	ck_assert_int_ge(ev.ready, 1);
	blockmirror_job_free(job);
	img = blockmirror_disk_get_image(disk);
	ck_assert_str_eq(img, uri);
	free(img);
	/* The disk now runs on the export. */
	guest_writes(disk, model, size, &seed, 20);
	ck_assert_int_eq(blockmirror_disk_read(disk, back, size, 0), 0);
	ck_assert(memcmp(back, model, size) == 0);
	ck_assert_int_eq(blockmirror_disk_close(disk), 0);
	/* And the export's file holds it. */
	fd = open(dst, O_RDONLY);
	ck_assert_int_eq(pread(fd, back, size, 0), (ssize_t)size);
	close(fd);
	for (uint64_t i = 0; i < size; i++)
		if (back[i] != model[i])
			ck_abort_msg("the export differs at %llu",
				     (unsigned long long)i);
	free(model);
	free(back);
}
END_TEST

/* A destination that stops answering: a forced cancel still returns, the
 * guest keeps running on the source. */
START_TEST(test_mirror_hung_destination)
{
	struct blockmirror_job_options o = { .size = sizeof o };
	struct blockmirror_job_info info = { .size = sizeof info };
	const uint64_t size = 16 * MiB;
	unsigned char *model = malloc(size), *back = malloc(size);
	struct blockmirror_disk *disk;
	struct blockmirror_job *job;
	char src[96];
	unsigned seed = 7;
	uint64_t t0;
	int fd;

	snprintf(src, sizeof src, "%s/src.raw", dir);
	write_pattern_file(src, size, 5);
	fd = open(src, O_RDONLY);
	ck_assert_int_eq(pread(fd, model, size, 0), (ssize_t)size);
	close(fd);
	start_nbdkit("--filter=delay", "memory", "16M", "wdelay=60", NULL);

	disk = blockmirror_disk_open(src, BLOCKMIRROR_FORMAT_RAW, 0);
	ck_assert_ptr_nonnull(disk);
	ck_assert_int_eq(blockmirror_disk_start_thread(disk), 0);
	job = blockmirror_job_start(disk, uri, &o);
	ck_assert_msg(job != NULL, "%s", blockmirror_last_error());
	guest_writes(disk, model, size, &seed, 20);
	usleep(300 * 1000);
	t0 = now_ms();
	ck_assert_int_eq(blockmirror_job_cancel(job, true), 0);
	ck_assert_uint_lt(now_ms() - t0, 10000);
	ck_assert_int_eq(blockmirror_job_query(job, &info), 0);
	ck_assert_int_eq(info.state, BLOCKMIRROR_JOB_CANCELLED);
	blockmirror_job_free(job);
	guest_writes(disk, model, size, &seed, 20);
	ck_assert_int_eq(blockmirror_disk_read(disk, back, size, 0), 0);
	ck_assert(memcmp(back, model, size) == 0);
	ck_assert_int_eq(blockmirror_disk_close(disk), 0);
	free(model);
	free(back);
}
END_TEST

/* A copy to and from a multi-conn export goes over several connections
 * and leaves the same bytes; a server that takes a single connection gets
 * the copy over it. */
START_TEST(test_copy_multi_conn)
{
	struct blockmirror_copy_options co = { .size = sizeof co };
	char src[96], back[96], dst[96], log[96], logopt[128], cmd[512];
	char fileopt[128];
	uint64_t readers, writers;

	snprintf(src, sizeof src, "%s/src.raw", dir);
	snprintf(back, sizeof back, "%s/back.raw", dir);
	snprintf(dst, sizeof dst, "%s/dst.raw", dir);
	write_pattern_file(src, 24 * MiB, 7);
	log_option(log, sizeof log, logopt, sizeof logopt, "log");
	start_nbdkit("--filter=log", "memory", "24M", logopt, NULL);

	ck_assert_msg(blockmirror_copy(src, uri, &co, NULL) == 0, "copy: %s",
		      blockmirror_last_error());
	writers = log_conns(log, "Write");
	ck_assert_msg(popcount(writers) > 1, "writes on %u connections",
		      popcount(writers));
	snprintf(cmd, sizeof cmd, "qemu-img compare -q -f raw -F raw '%s' "
		 "'%s'", src, uri);
	ck_assert_int_eq(system(cmd), 0);
	/* Back: the reads are spread too. */
	readers = log_conns(log, "Read");
	ck_assert_msg(blockmirror_copy(uri, back, &co, NULL) == 0, "copy: %s",
		      blockmirror_last_error());
	readers = log_conns(log, "Read") & ~readers;
	ck_assert_msg(popcount(readers) > 1, "reads on %u connections",
		      popcount(readers));
	snprintf(cmd, sizeof cmd, "qemu-img compare -q -f raw -F raw '%s' "
		 "'%s'", src, back);
	ck_assert_int_eq(system(cmd), 0);
	kill_servers();
	unlink(sock);

	/* One client at a time: the extra connections are refused. */
	make_file(dst, 24 * MiB);
	log_option(log, sizeof log, logopt, sizeof logopt, "log1");
	snprintf(fileopt, sizeof fileopt, "file=%s", dst);
	start_nbdkit("--filter=log", "--filter=limit", "file", fileopt,
		     logopt, "limit=1", NULL);
	ck_assert_msg(blockmirror_copy(src, uri, &co, NULL) == 0, "copy: %s",
		      blockmirror_last_error());
	ck_assert_uint_eq(popcount(log_conns(log, "Write")), 1);
	snprintf(cmd, sizeof cmd, "qemu-img compare -q -f raw -F raw '%s' "
		 "'%s'", src, dst);
	ck_assert_int_eq(system(cmd), 0);
}
END_TEST

/* Has nbdkit's log filter logged a Write request?  (No check: the
 * killer below is a child process.) */
static bool
log_has_write(const char *path)
{
	FILE *f = fopen(path, "r");
	char line[1024], word[32];
	bool found = false;
	unsigned id;

	if (!f)
		return false;
	while (!found && fgets(line, sizeof line, f)) {
		const char *c = strstr(line, " connection=");

		found = c && sscanf(c, " connection=%u %31s", &id, word) == 2 &&
			strcmp(word, "Write") == 0;
	}
	fclose(f);
	return found;
}

/* The server dies in the middle of a copy over several connections: the
 * copy fails soon with -EIO and says why; it does not wait out the
 * timeout. */
START_TEST(test_copy_server_killed)
{
	struct blockmirror_copy_options co = { .size = sizeof co };
	volatile uint64_t *killed_at;
	const char *msg, *which;
	char src[96], log[96], logopt[128];
	pid_t pid, killer;
	unsigned conn, conns = 0;
	uint64_t t0;
	int r;

	setenv("BLOCKMIRROR_NBD_TIMEOUT", "30", 1);
	snprintf(src, sizeof src, "%s/src.raw", dir);
	write_pattern_file(src, 24 * MiB, 9);
	log_option(log, sizeof log, logopt, sizeof logopt, "log");
	pid = start_nbdkit("--filter=log", "--filter=delay", "memory", "24M",
			   logopt, "wdelay=5", NULL);
	killed_at = mmap(NULL, sizeof *killed_at, PROT_READ | PROT_WRITE,
			 MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	ck_assert(killed_at != MAP_FAILED);
	*killed_at = 0;
	killer = fork();
	ck_assert_int_ge(killer, 0);
	if (killer == 0) {
		/* Once the copy writes (its store has every connection it
		 * will have by then), on any machine; the writes take 5 s. */
		for (int i = 0; i < 3000 && !log_has_write(log); i++)
			usleep(10 * 1000);
		usleep(100 * 1000);
		*killed_at = now_ms();
		kill(pid, SIGKILL);
		_exit(0);
	}
	r = blockmirror_copy(src, uri, &co, NULL);
	t0 = now_ms();
	msg = blockmirror_last_error();
	ck_assert_int_eq(waitpid(killer, NULL, 0), killer);
	ck_assert_msg(r == -EIO, "copy: %d %s", r, msg);
	/* Soon: well before the 30 s timeout. */
	ck_assert_uint_lt(t0 - *killed_at, 10000);
	munmap((void *)killed_at, sizeof *killed_at);
	/* "... lost (connection i of n)": several (4, or at least 2 on a
	 * machine too slow for the extra handshakes). */
	which = strstr(msg, "(connection ");
	ck_assert_msg(strstr(msg, "lost") && which &&
		      sscanf(which, "(connection %u of %u)", &conn,
			     &conns) == 2 && conns >= 2 && conns <= 4,
		      "%s", msg);
}
END_TEST

/* ---- main -------------------------------------------------------------- */

static Suite *
nbd_suite(void)
{
	Suite *s = suite_create("nbd");
	TCase *t = tcase_create("store");
	TCase *e = tcase_create("api");

	tcase_add_checked_fixture(t, setup, teardown);
	tcase_set_timeout(t, 60);
	tcase_add_test(t, test_is_uri);
	tcase_add_test(t, test_timeout_env);
	tcase_add_test(t, test_roundtrip);
	tcase_add_test(t, test_many_in_flight);
	tcase_add_loop_test(t, test_move_loop, 0, 2);
	tcase_add_test(t, test_block_sizes);
	tcase_add_test(t, test_zero_trim_qemu);
	tcase_add_test(t, test_fallbacks);
	tcase_add_test(t, test_fua_native);
	tcase_add_test(t, test_extents_qemu);
	tcase_add_test(t, test_extents_piecemeal);
	tcase_add_test(t, test_image_create);
	tcase_add_test(t, test_readonly_export);
	tcase_add_test(t, test_connect_errors);
	tcase_add_loop_test(t, test_hung_server, 0, 2);
	tcase_add_test(t, test_slow_server);
	tcase_add_loop_test(t, test_cancel, 0, 2);
	tcase_add_loop_test(t, test_server_killed, 0, 2);
	tcase_add_test(t, test_server_errors);
	tcase_add_loop_test(t, test_close_busy, 0, 2);
	tcase_add_test(t, test_multi_conn);
	tcase_add_test(t, test_multi_conn_fewer);
	tcase_add_test(t, test_multi_conn_lost);
	tcase_add_test(t, test_writeback_flush);
	suite_add_tcase(s, t);

	tcase_add_checked_fixture(e, setup, teardown);
	tcase_set_timeout(e, 120);
	tcase_add_test(e, test_copy_verify_info);
	tcase_add_test(e, test_mirror_to_nbd);
	tcase_add_test(e, test_mirror_hung_destination);
	tcase_add_test(e, test_copy_multi_conn);
	tcase_add_test(e, test_copy_server_killed);
	suite_add_tcase(s, e);
	return s;
}

int
main(void)
{
	static const char *const tools[] = { "nbdkit", "qemu-nbd", "qemu-img" };

	for (size_t i = 0; i < sizeof tools / sizeof tools[0]; i++) {
		int missing = missing_tool_status(tools[i]);

		if (missing)
			return missing;
	}
	return run_suite(nbd_suite()) ? EXIT_FAILURE : EXIT_SUCCESS;
}
