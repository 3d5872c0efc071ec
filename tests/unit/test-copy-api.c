/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The copy handle (lib/copy-job.c, blockmirror_copy_start and friends)
 * on a 256 MiB raw image of random data: the speed limit holds the copy
 * back and a higher one lets it finish; a pause stops it and a resume
 * goes on; a cancel (also of a paused copy, and by free) ends it with
 * -ECANCELED and removes the destination it created; the event fd
 * becomes readable at the end; errors found before copying come back
 * from start; blocking calls from the progress callback are refused.
 * Then, with the tools at hand: a qcow2 destination that qemu-img
 * compares equal, and a cancel that ends although the NBD destination
 * hangs (nbdkit's delay filter).
 *
 * Timings are loose on purpose (a busy 2-core machine): a limited copy
 * must stay far below what an unlimited one does, never near its limit.
 */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <blockmirror/blockmirror.h>

#include "helpers.h"

#define MiB (UINT64_C(1) << 20)
#define SIZE (256 * MiB)
#define SLOW (20 * MiB)          /* bytes/s */

static char dir[64], src[128];

static struct blockmirror_copy_options
options(uint64_t speed)
{
	struct blockmirror_copy_options o = { .size = sizeof o };

	o.speed = speed;
	return o;
}

static struct blockmirror_copy_stats
query(struct blockmirror_copy *c)
{
	struct blockmirror_copy_stats st = { .size = sizeof st };

	ck_assert_int_eq(blockmirror_copy_query(c, &st), 0);
	return st;
}

static void
dst_path(char *buf, size_t len, const char *name)
{
	snprintf(buf, len, "%s/%s", dir, name);
}

static bool
readable(int fd, int timeout_ms)
{
	struct pollfd p = { .fd = fd, .events = POLLIN };

	return poll(&p, 1, timeout_ms) == 1 && (p.revents & POLLIN);
}

static void
assert_same(const char *a, const char *b)
{
	char cmd[400];

	snprintf(cmd, sizeof cmd, "cmp -s '%s' '%s'", a, b);
	ck_assert_msg(system(cmd) == 0, "%s and %s differ", a, b);
}

static struct blockmirror_copy *
start_with(const char *dst, const struct blockmirror_copy_options *o)
{
	struct blockmirror_copy *c = NULL;
	int r = blockmirror_copy_start(src, dst, o, &c);

	ck_assert_msg(r == 0, "start: %s", blockmirror_last_error());
	ck_assert_ptr_nonnull(c);
	return c;
}

static struct blockmirror_copy *
start(const char *dst, uint64_t speed)
{
	struct blockmirror_copy_options o = options(speed);

	return start_with(dst, &o);
}

START_TEST(test_speed_limit)
{
	struct blockmirror_copy_stats st;
	struct blockmirror_copy *c;
	char dst[160];
	double secs, limit;

	dst_path(dst, sizeof dst, "speed.raw");
	c = start(dst, SLOW);
	sleep_ms(1000);
	st = query(c);
	secs = (double)st.elapsed_us / 1e6;
	ck_assert_int_eq(st.state, BLOCKMIRROR_COPY_RUNNING);
	ck_assert_uint_eq(st.speed, SLOW);
	ck_assert_uint_eq(st.virtual_size, SIZE);
	ck_assert_uint_ge(secs * 1000, 900);
	/* At most the allowance plus a request, with a wide margin: an
	 * unlimited copy does the whole image in well under a second. */
	limit = 2.0 * (double)SLOW * secs + 4.0 * MiB;
	ck_assert_msg((double)st.bytes_done <= limit && st.bytes_done < SIZE / 2,
		      "%llu bytes done in %.2f s at %llu bytes/s",
		      (unsigned long long)st.bytes_done, secs,
		      (unsigned long long)SLOW);
	ck_assert_uint_ge(st.bytes_done, MiB);
	ck_assert_uint_le(st.bytes_read, st.bytes_done + 16 * MiB);

	/* Raised: it finishes. */
	ck_assert_int_eq(blockmirror_copy_set_speed(c, 16 * 1024 * MiB), 0);
	ck_assert_uint_eq(query(c).speed, 16 * 1024 * MiB);
	ck_assert_msg(blockmirror_copy_wait(c, 60000) == 0, "%s",
		      blockmirror_last_error());
	st = query(c);
	ck_assert_int_eq(st.state, BLOCKMIRROR_COPY_DONE);
	ck_assert_uint_eq(st.bytes_done, SIZE);
	ck_assert_uint_eq(st.bytes_read, SIZE);
	ck_assert_uint_eq(st.bytes_written + st.bytes_zeroed, SIZE);
	ck_assert_int_eq(st.error, 0);
	/* Ended: control calls are refused, queries still answer. */
	ck_assert_int_eq(blockmirror_copy_set_speed(c, 0), -EINVAL);
	ck_assert_ptr_nonnull(strstr(blockmirror_last_error(),
				     "blockmirror_copy_set_speed: "));
	ck_assert_int_eq(blockmirror_copy_pause(c), -EINVAL);
	ck_assert_int_eq(blockmirror_copy_cancel(c), -EINVAL);
	ck_assert_int_eq(blockmirror_copy_wait(c, 0), 0);
	blockmirror_copy_free(c);
	assert_same(src, dst);
	unlink(dst);
}
END_TEST

START_TEST(test_pause_resume)
{
	struct blockmirror_copy_stats st;
	struct blockmirror_copy *c;
	uint64_t d1, d2;
	char dst[160];

	dst_path(dst, sizeof dst, "pause.raw");
	c = start(dst, SLOW);
	sleep_ms(300);
	ck_assert_int_eq(blockmirror_copy_resume(c), -EINVAL);
	ck_assert_int_eq(blockmirror_copy_pause(c), 0);
	ck_assert_int_eq(query(c).state, BLOCKMIRROR_COPY_PAUSED);
	ck_assert_int_eq(blockmirror_copy_pause(c), -EINVAL);
	/* Even unlimited, a paused copy issues nothing new. */
	ck_assert_int_eq(blockmirror_copy_set_speed(c, 0), 0);
	/* Requests in flight finish (however slow the disk is today). */
	d1 = query(c).bytes_done;
	for (int i = 0; i < 100; i++) {
		sleep_ms(100);
		d2 = query(c).bytes_done;
		if (d2 == d1)
			break;
		d1 = d2;
	}
	sleep_ms(300);
	st = query(c);
	d2 = st.bytes_done;
	ck_assert_uint_eq(d1, d2);
	ck_assert_uint_lt(d2, SIZE);
	ck_assert_int_eq(st.state, BLOCKMIRROR_COPY_PAUSED);
	ck_assert_int_eq(blockmirror_copy_wait(c, 0), -ETIMEDOUT);

	ck_assert_int_eq(blockmirror_copy_resume(c), 0);
	ck_assert_int_ne(query(c).state, BLOCKMIRROR_COPY_PAUSED);
	ck_assert_msg(blockmirror_copy_wait(c, 60000) == 0, "%s",
		      blockmirror_last_error());
	ck_assert_int_eq(query(c).state, BLOCKMIRROR_COPY_DONE);
	blockmirror_copy_free(c);
	assert_same(src, dst);
	unlink(dst);
}
END_TEST

static void
check_cancel(bool paused)
{
	struct blockmirror_copy_stats st;
	struct blockmirror_copy *c;
	char dst[160];

	dst_path(dst, sizeof dst, paused ? "cancel-paused.raw" : "cancel.raw");
	c = start(dst, SLOW);
	sleep_ms(300);
	ck_assert_int_eq(access(dst, F_OK), 0);
	if (paused)
		ck_assert_int_eq(blockmirror_copy_pause(c), 0);
	ck_assert_int_eq(blockmirror_copy_cancel(c), 0);
	/* cancel returned: the copy has ended and its file is gone. */
	ck_assert_int_eq(access(dst, F_OK) < 0 ? errno : 0, ENOENT);
	ck_assert(readable(blockmirror_copy_event_fd(c), 0));
	st = query(c);
	ck_assert_int_eq(st.state, BLOCKMIRROR_COPY_CANCELLED);
	ck_assert_int_eq(st.error, ECANCELED);
	ck_assert_uint_lt(st.bytes_done, SIZE);
	ck_assert_int_eq(blockmirror_copy_wait(c, 0), -ECANCELED);
	ck_assert_ptr_nonnull(strstr(blockmirror_last_error(),
				     "blockmirror_copy_wait: "));
	ck_assert_int_eq(blockmirror_copy_cancel(c), -EINVAL);
	blockmirror_copy_free(c);
}

START_TEST(test_cancel)
{
	check_cancel(false);
}
END_TEST

START_TEST(test_cancel_paused)
{
	check_cancel(true);
}
END_TEST

START_TEST(test_event_fd)
{
	struct blockmirror_copy *c;
	char dst[160];
	int fd;

	dst_path(dst, sizeof dst, "event.raw");
	c = start(dst, SLOW);
	fd = blockmirror_copy_event_fd(c);
	ck_assert_int_ge(fd, 0);
	ck_assert(!readable(fd, 200));
	ck_assert_int_eq(blockmirror_copy_set_speed(c, 0), 0);
	ck_assert_msg(readable(fd, 60000), "no end event");
	/* The end is complete by the time the fd says so. */
	ck_assert_int_eq(blockmirror_copy_wait(c, 0), 0);
	ck_assert_int_eq(query(c).state, BLOCKMIRROR_COPY_DONE);
	blockmirror_copy_free(c);
	assert_same(src, dst);
	unlink(dst);
}
END_TEST

START_TEST(test_free_running)
{
	struct blockmirror_copy *c;
	char dst[160];

	dst_path(dst, sizeof dst, "free.raw");
	c = start(dst, SLOW);
	sleep_ms(200);
	blockmirror_copy_free(c);
	ck_assert_int_ne(access(dst, F_OK), 0);
	blockmirror_copy_free(NULL);
}
END_TEST

START_TEST(test_start_errors)
{
	struct blockmirror_copy_options o = options(0);
	struct blockmirror_copy *c = (void *)1;
	char dst[160], hlink[160], missing[160];
	struct stat sb;

	dst_path(dst, sizeof dst, "exists.raw");
	dst_path(hlink, sizeof hlink, "hardlink.raw");
	dst_path(missing, sizeof missing, "missing.raw");
	ck_assert_int_eq(close(open(dst, O_WRONLY | O_CREAT, 0600)), 0);

	ck_assert_int_eq(blockmirror_copy_start(src, dst, &o, &c), -EEXIST);
	ck_assert_ptr_null(c);
	ck_assert_ptr_nonnull(strstr(blockmirror_last_error(),
				     "blockmirror_copy_start: "));
	ck_assert_int_eq(stat(dst, &sb), 0);
	ck_assert_int_eq(sb.st_size, 0); /* left alone */

	ck_assert_int_eq(blockmirror_copy_start(src, src, &o, &c), -EINVAL);
	ck_assert_int_eq(link(src, hlink), 0);
	o.flags = BLOCKMIRROR_COPY_OVERWRITE;
	ck_assert_int_eq(blockmirror_copy_start(src, hlink, &o, &c), -EINVAL);
	ck_assert_int_eq(blockmirror_copy_start(missing, dst, &o, &c), -ENOENT);
	ck_assert_int_eq(blockmirror_copy_start(src, dst, NULL, &c), -EINVAL);
	ck_assert_int_eq(blockmirror_copy_start(src, dst, &o, NULL), -EINVAL);
	/* O_DIRECT on both sides and a cached destination contradict. */
	o.flags = BLOCKMIRROR_COPY_OVERWRITE | BLOCKMIRROR_COPY_DIRECT |
		  BLOCKMIRROR_COPY_DST_CACHED;
	ck_assert_int_eq(blockmirror_copy_start(src, dst, &o, &c), -EINVAL);
	ck_assert_int_eq(stat(dst, &sb), 0);
	ck_assert_int_eq(sb.st_size, 0);
	o.flags = BLOCKMIRROR_COPY_OVERWRITE;
	ck_assert_ptr_null(c);
	unlink(hlink);

	/* With OVERWRITE the existing file is replaced. */
	ck_assert_int_eq(blockmirror_copy_start(src, dst, &o, &c), 0);
	ck_assert_int_eq(blockmirror_copy_wait(c, 60000), 0);
	blockmirror_copy_free(c);
	assert_same(src, dst);
	unlink(dst);
}
END_TEST

/* Blocking calls from the copy's own thread fail instead of hanging. */
static struct blockmirror_copy *_Atomic self;
static atomic_int self_pause = 1, self_wait = 1, progress_calls;
static pthread_t progress_thread;

static void
self_progress(void *data, uint64_t done, uint64_t total)
{
	struct blockmirror_copy *c = atomic_load(&self);

	progress_calls++;
	progress_thread = pthread_self();
	if (!c)
		return;
	self_pause = blockmirror_copy_pause(c);
	self_wait = blockmirror_copy_wait(c, -1);
}

START_TEST(test_own_thread)
{
	struct blockmirror_copy_options o = options(SLOW);
	struct blockmirror_copy *c;
	char dst[160];

	dst_path(dst, sizeof dst, "self.raw");
	o.progress = self_progress;
	c = start_with(dst, &o);
	atomic_store(&self, c);
	for (int i = 0; i < 200 && self_pause == 1; i++)
		sleep_ms(10);
	ck_assert_int_eq(self_pause, -EDEADLK);
	ck_assert_int_eq(self_wait, -EDEADLK);
	ck_assert(!pthread_equal(progress_thread, pthread_self()));
	blockmirror_copy_free(c);
	ck_assert_int_ne(access(dst, F_OK), 0);
}
END_TEST

/* The synchronous copy honours the speed option too, and fills the
 * appended stats.  Requests smaller than the pacing unit stay as small
 * as the buffers they are read into. */
START_TEST(test_sync_speed)
{
	struct blockmirror_copy_options o = options(SIZE / 8 * 4); /* 2 s */
	struct blockmirror_copy_stats st = { .size = sizeof st };
	char dst[160];

	dst_path(dst, sizeof dst, "sync.raw");
	o.request_size = 48 * 1024;
	ck_assert_int_eq(blockmirror_copy(src, dst, &o, &st), 0);
	ck_assert_uint_ge(st.elapsed_us, 1500000);
	ck_assert_int_eq(st.state, BLOCKMIRROR_COPY_DONE);
	ck_assert_uint_eq(st.bytes_done, SIZE);
	ck_assert_uint_eq(st.speed, SIZE / 8 * 4);
	assert_same(src, dst);
	unlink(dst);
}
END_TEST

/* ---- with tools --------------------------------------------------------- */

START_TEST(test_qcow2_destination)
{
	struct blockmirror_copy_options o = options(0);
	struct blockmirror_copy *c;
	char dst[160], cmd[700];

	dst_path(dst, sizeof dst, "dst.qcow2");
	o.dst_format = BLOCKMIRROR_FORMAT_QCOW2;
	c = start_with(dst, &o);
	ck_assert_msg(readable(blockmirror_copy_event_fd(c), 120000),
		      "no end event");
	ck_assert_msg(blockmirror_copy_wait(c, 0) == 0, "%s",
		      blockmirror_last_error());
	blockmirror_copy_free(c);
	snprintf(cmd, sizeof cmd, "qemu-img check -q -f qcow2 '%s' && "
		 "qemu-img compare -q -f raw -F qcow2 '%s' '%s'", dst, src,
		 dst);
	ck_assert_msg(system(cmd) == 0, "%s", cmd);
	unlink(dst);
}
END_TEST

/* A destination that never answers: the cancel still ends, after its
 * grace period, and reports -ECANCELED. */
START_TEST(test_cancel_hung_nbd)
{
	struct blockmirror_copy *c;
	char sock[160], uri[200];
	double t0;
	pid_t pid;

	dst_path(sock, sizeof sock, "hang.sock");
	snprintf(uri, sizeof uri, "nbd+unix:///?socket=%s", sock);
	pid = nbdkit_start(sock, "--filter=delay", "memory", "256M",
			   "delay-write=60", NULL);
	c = start(uri, 0);
	sleep_ms(500);
	ck_assert_int_eq(query(c).state, BLOCKMIRROR_COPY_RUNNING);
	t0 = now_s();
	ck_assert_int_eq(blockmirror_copy_cancel(c), 0);
	ck_assert_msg(now_s() - t0 < 20, "the cancel took %.1f s",
		      now_s() - t0);
	ck_assert_int_eq(blockmirror_copy_wait(c, 0), -ECANCELED);
	ck_assert_int_eq(query(c).state, BLOCKMIRROR_COPY_CANCELLED);
	blockmirror_copy_free(c);
	kill(pid, SIGTERM);
	waitpid(pid, NULL, 0);
}
END_TEST

/* A suite of one test case holding `tests`. */
static Suite *
suite_of(const char *name, const TTest *const *tests, size_t n)
{
	Suite *s = suite_create(name);
	TCase *tc = tcase_create(name);

	tcase_set_timeout(tc, 120);
	for (size_t i = 0; i < n; i++)
		tcase_add_test(tc, tests[i]);
	suite_add_tcase(s, tc);
	return s;
}

/* 256 MiB of random data, no zero block in it. */
static int
make_source(void)
{
	size_t chunk = 4 * MiB;
	uint64_t *buf = malloc(chunk), seed = 42;
	int fd = open(src, O_WRONLY | O_CREAT | O_EXCL, 0600);

	if (!buf || fd < 0)
		return -1;
	for (uint64_t off = 0; off < SIZE; off += chunk) {
		for (size_t i = 0; i < chunk / 8; i++)
			buf[i] = rnd(&seed) | 1;
		if (write(fd, buf, chunk) != (ssize_t)chunk)
			return -1;
	}
	free(buf);
	return close(fd);
}

int
main(void)
{
	static const char *const tools[] = { "qemu-img", "nbdkit" };
	const TTest *const handle[] = {
		test_speed_limit, test_pause_resume, test_cancel,
		test_cancel_paused, test_event_fd, test_free_running,
		test_start_errors, test_own_thread, test_sync_speed,
	};
	const TTest *const with_tools[] = {
		test_qcow2_destination, test_cancel_hung_nbd,
	};
	int failed, missing = 0;
	char cmd[100];

	strcpy(dir, "/tmp/test-copy-api.XXXXXX");
	if (!mkdtemp(dir))
		return EXIT_FAILURE;
	snprintf(src, sizeof src, "%s/src.raw", dir);
	if (make_source() < 0) {
		perror(src);
		return EXIT_FAILURE;
	}
	failed = run_suite(suite_of("copy-api", handle,
				    sizeof handle / sizeof handle[0]));
	for (size_t i = 0; i < sizeof tools / sizeof tools[0] && !missing; i++)
		missing = missing_tool_status(tools[i]);
	if (!failed && !missing)
		failed = run_suite(suite_of("copy-api-tools", with_tools,
					    sizeof with_tools /
					    sizeof with_tools[0]));
	snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
	if (system(cmd) != 0)
		fprintf(stderr, "could not remove %s\n", dir);
	if (failed)
		return EXIT_FAILURE;
	return missing;
}
