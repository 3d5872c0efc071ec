/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The mirror job under injected faults (lib/fault.c): an EIO on a source
 * read, EIO and ENOSPC on destination writes, and a destination that
 * hangs, under each error policy (report, stop, retry).
 *
 * What must hold every time (DESIGN.md rule 9): the guest sees only the
 * errors of the image it runs on, so its writes keep succeeding; the job
 * fails, pauses or retries as its policy says and reports ERROR events
 * naming the side that failed; a failed or cancelled job leaves the disk
 * on the source with every guest write in it; a job that recovers still
 * pivots to a destination that equals the source.
 */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <blockmirror/blockmirror.h>

#include "fault.h"

#define SIZE (8u << 20)
#define MiB (1u << 20)

struct events {
	atomic_int ready, completed, cancelled, failed, errors, paused;
	atomic_int src_errors, dst_errors;
};

static void
on_event(void *data, const struct blockmirror_event *ev)
{
	struct events *e = data;

	switch (ev->type) {
	case BLOCKMIRROR_EVENT_READY:
		e->ready++;
		break;
	case BLOCKMIRROR_EVENT_COMPLETED:
		e->completed++;
		break;
	case BLOCKMIRROR_EVENT_CANCELLED:
		e->cancelled++;
		break;
	case BLOCKMIRROR_EVENT_FAILED:
		e->failed++;
		break;
	case BLOCKMIRROR_EVENT_ERROR:
		e->errors++;
		if (ev->on_source)
			e->src_errors++;
		else
			e->dst_errors++;
		break;
	case BLOCKMIRROR_EVENT_PAUSED:
		e->paused++;
		break;
	default:
		break;
	}
}

struct fixture {
	char dir[64], src[96], dst[96];
	unsigned char *model;
	struct blockmirror_disk *disk;
	struct blockmirror_job *job;
	struct events ev;
	struct bm_fault_rules rules;
	/* a guest writing to the last MiB while the job runs */
	pthread_t writer;
	atomic_bool stop;
	atomic_int guest_errors;
	pthread_mutex_t model_lock;
};

static struct fixture fx;

static void
sleep_ms(unsigned ms)
{
	struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000L };

	nanosleep(&ts, NULL);
}

static void *
writer_main(void *arg)
{
	unsigned char buf[4096];
	unsigned n = 0;

	while (!atomic_load(&fx.stop)) {
		uint64_t off = SIZE - MiB + (uint64_t)(n % 256) * 4096;

		memset(buf, (int)(n & 0xff) | 1, sizeof buf);
		if (blockmirror_disk_write(fx.disk, buf, sizeof buf, off, 0)) {
			fx.guest_errors++;
		} else {
			pthread_mutex_lock(&fx.model_lock);
			memcpy(fx.model + off, buf, sizeof buf);
			pthread_mutex_unlock(&fx.model_lock);
		}
		n++;
		sleep_ms(1);
	}
	return NULL;
}

static void
setup(void)
{
	int fd;

	memset(&fx, 0, sizeof fx);
	strcpy(fx.dir, "/tmp/test-mirror-errors.XXXXXX");
	ck_assert_ptr_nonnull(mkdtemp(fx.dir));
	snprintf(fx.src, sizeof fx.src, "%s/src", fx.dir);
	snprintf(fx.dst, sizeof fx.dst, "%s/dst", fx.dir);
	fx.model = malloc(SIZE);
	srand(42);
	for (unsigned i = 0; i < SIZE; i++)
		fx.model[i] = (unsigned char)rand();
	memset(fx.model + 3 * MiB, 0, MiB); /* a hole */
	fd = open(fx.src, O_CREAT | O_WRONLY | O_TRUNC, 0644);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(ftruncate(fd, SIZE), 0);
	ck_assert_int_eq(pwrite(fd, fx.model, 3 * MiB, 0), 3 * MiB);
	ck_assert_int_eq(pwrite(fd, fx.model + 4 * MiB, 4 * MiB, 4 * MiB),
			 4 * MiB);
	close(fd);
	pthread_mutex_init(&fx.model_lock, NULL);
}

static void
teardown(void)
{
	bm_fault_unregister(fx.src);
	bm_fault_unregister(fx.dst);
	unlink(fx.src);
	unlink(fx.dst);
	rmdir(fx.dir);
	free(fx.model);
}

/* Open the disk (fault rules may already be registered for src). */
static void
open_disk(void)
{
	fx.disk = blockmirror_disk_open(fx.src, BLOCKMIRROR_FORMAT_RAW, 0);
	ck_assert_msg(fx.disk != NULL, "%s", blockmirror_last_error());
	ck_assert_int_eq(blockmirror_disk_start_thread(fx.disk), 0);
	pthread_create(&fx.writer, NULL, writer_main, NULL);
}

static void
start_job(enum blockmirror_mode mode, enum blockmirror_error_policy policy)
{
	struct blockmirror_job_options o = {
		.size = sizeof o,
		.flags = BLOCKMIRROR_JOB_CREATE,
		.mode = mode,
		.on_error = policy,
		.on_event = on_event,
		.event_data = &fx.ev,
	};

	fx.job = blockmirror_job_start(fx.disk, fx.dst, &o);
	ck_assert_msg(fx.job != NULL, "%s", blockmirror_last_error());
}

static void
stop_writer(void)
{
	atomic_store(&fx.stop, true);
	pthread_join(fx.writer, NULL);
	ck_assert_int_eq(fx.guest_errors, 0);
}

static void
check_file(const char *path, const char *what)
{
	unsigned char *got = malloc(SIZE);
	int fd = open(path, O_RDONLY);
	unsigned i = 0;

	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(pread(fd, got, SIZE, 0), SIZE);
	close(fd);
	while (i < SIZE && got[i] == fx.model[i])
		i++;
	ck_assert_msg(i == SIZE, "%s differs from the guest's data at %u",
		      what, i);
	free(got);
}

/* The job failed or was cancelled: the disk is on the source, intact. */
static void
check_on_source(void)
{
	char *img = blockmirror_disk_get_image(fx.disk);

	ck_assert_str_eq(img, fx.src);
	free(img);
	stop_writer();
	blockmirror_job_free(fx.job);
	ck_assert_int_eq(blockmirror_disk_close(fx.disk), 0);
	check_file(fx.src, "the source");
}

/* The job recovered: pivot and check the destination. */
static void
pivot_and_check(void)
{
	int state = blockmirror_job_wait(fx.job, BLOCKMIRROR_JOB_READY, 30000);
	char *img;

	ck_assert_msg(state == BLOCKMIRROR_JOB_READY, "state %d: %s", state,
		      blockmirror_last_error());
	ck_assert_msg(blockmirror_job_complete(fx.job) == 0, "%s",
		      blockmirror_last_error());
	img = blockmirror_disk_get_image(fx.disk);
	ck_assert_str_eq(img, fx.dst);
	free(img);
	stop_writer();
	blockmirror_job_free(fx.job);
	ck_assert_int_eq(blockmirror_disk_close(fx.disk), 0);
	check_file(fx.dst, "the destination");
}

static void
read_error_rules(int count)
{
	fx.rules.read_errno = EIO;
	fx.rules.read_err_offset = MiB + 4096;
	fx.rules.read_err_length = 1;
	fx.rules.read_err_count = count;
	ck_assert_int_eq(bm_fault_register(fx.src, &fx.rules), 0);
}

static void
write_error_rules(int err, int count)
{
	fx.rules.write_errno = err;
	fx.rules.write_err_after = 2;
	fx.rules.write_err_count = count;
	ck_assert_int_eq(bm_fault_register(fx.dst, &fx.rules), 0);
}

/* ---- source read errors ---------------------------------------------- */

START_TEST(test_src_read_report)
{
	struct blockmirror_job_info info = { .size = sizeof info };

	read_error_rules(-1);
	open_disk();
	start_job(BLOCKMIRROR_MODE_BACKGROUND, BLOCKMIRROR_ON_ERROR_REPORT);
	ck_assert_int_eq(blockmirror_job_wait(fx.job, BLOCKMIRROR_JOB_READY,
					      10000), BLOCKMIRROR_JOB_FAILED);
	ck_assert_int_eq(blockmirror_job_query(fx.job, &info), 0);
	ck_assert_int_eq(info.error, EIO);
	ck_assert_int_eq(fx.ev.failed, 1);
	ck_assert_int_ge(fx.ev.src_errors, 1);
	ck_assert_int_eq(fx.ev.ready, 0);
	/* The failed job cannot be completed or resumed. */
	ck_assert_int_eq(blockmirror_job_complete(fx.job), -EINVAL);
	ck_assert_int_eq(blockmirror_job_resume(fx.job), -EINVAL);
	check_on_source();
}
END_TEST

START_TEST(test_src_read_stop)
{
	read_error_rules(1);
	open_disk();
	start_job(BLOCKMIRROR_MODE_BACKGROUND, BLOCKMIRROR_ON_ERROR_STOP);
	ck_assert_int_eq(blockmirror_job_wait(fx.job, BLOCKMIRROR_JOB_PAUSED,
					      10000), BLOCKMIRROR_JOB_PAUSED);
	ck_assert_int_eq(fx.ev.paused, 1);
	ck_assert_int_eq(fx.ev.src_errors, 1);
	/* Paused means paused. */
	sleep_ms(200);
	ck_assert_int_eq(blockmirror_job_wait(fx.job, BLOCKMIRROR_JOB_READY,
					      0), -ETIMEDOUT);
	ck_assert_int_eq(blockmirror_job_resume(fx.job), 0);
	pivot_and_check();
}
END_TEST

START_TEST(test_src_read_retry)
{
	read_error_rules(3);
	open_disk();
	start_job(BLOCKMIRROR_MODE_BACKGROUND, BLOCKMIRROR_ON_ERROR_RETRY);
	pivot_and_check();
	ck_assert_int_eq(fx.ev.src_errors, 3);
	ck_assert_int_eq(fx.ev.failed, 0);
}
END_TEST

/* ---- destination write errors ---------------------------------------- */

START_TEST(test_dst_write_report)
{
	write_error_rules(EIO, -1);
	open_disk();
	start_job(_i ? BLOCKMIRROR_MODE_ACTIVE : BLOCKMIRROR_MODE_BACKGROUND,
		  BLOCKMIRROR_ON_ERROR_REPORT);
	ck_assert_int_eq(blockmirror_job_wait(fx.job, BLOCKMIRROR_JOB_READY,
					      10000), BLOCKMIRROR_JOB_FAILED);
	ck_assert_int_eq(fx.ev.failed, 1);
	ck_assert_int_ge(fx.ev.dst_errors, 1);
	check_on_source();
}
END_TEST

START_TEST(test_dst_write_stop)
{
	write_error_rules(EIO, 2);
	open_disk();
	start_job(_i ? BLOCKMIRROR_MODE_ACTIVE : BLOCKMIRROR_MODE_BACKGROUND,
		  BLOCKMIRROR_ON_ERROR_STOP);
	ck_assert_int_eq(blockmirror_job_wait(fx.job, BLOCKMIRROR_JOB_PAUSED,
					      10000), BLOCKMIRROR_JOB_PAUSED);
	ck_assert_int_ge(fx.ev.dst_errors, 1);
	/* Resume until the errors are used up. */
	for (int i = 0; i < 5; i++) {
		int s;

		blockmirror_job_resume(fx.job);
		s = blockmirror_job_wait(fx.job, BLOCKMIRROR_JOB_READY, 2000);
		if (s == BLOCKMIRROR_JOB_READY)
			break;
		blockmirror_job_wait(fx.job, BLOCKMIRROR_JOB_PAUSED, 2000);
	}
	pivot_and_check();
}
END_TEST

START_TEST(test_dst_write_retry)
{
	write_error_rules(EIO, 4);
	open_disk();
	start_job(_i ? BLOCKMIRROR_MODE_ACTIVE : BLOCKMIRROR_MODE_BACKGROUND,
		  BLOCKMIRROR_ON_ERROR_RETRY);
	pivot_and_check();
	ck_assert_int_ge(fx.ev.dst_errors, 1);
	ck_assert_int_eq(fx.ev.failed, 0);
}
END_TEST

START_TEST(test_dst_enospc)
{
	/* A full destination: stop pauses, force cancel ends it. */
	write_error_rules(ENOSPC, -1);
	open_disk();
	start_job(BLOCKMIRROR_MODE_ACTIVE, BLOCKMIRROR_ON_ERROR_STOP);
	ck_assert_int_eq(blockmirror_job_wait(fx.job, BLOCKMIRROR_JOB_PAUSED,
					      10000), BLOCKMIRROR_JOB_PAUSED);
	sleep_ms(100); /* guest writes go on, mirrored into a full disk */
	ck_assert_int_eq(blockmirror_job_cancel(fx.job, true), 0);
	ck_assert_int_eq(fx.ev.cancelled, 1);
	check_on_source();
}
END_TEST

START_TEST(test_mirrored_write_errors)
{
	/* Active mode after READY: guest writes are mirrored, and the
	 * destination starts failing them.  The guest must not notice;
	 * the job stops being actively synced and follows its policy. */
	struct blockmirror_job_info info = { .size = sizeof info };
	enum blockmirror_error_policy policy = _i ? BLOCKMIRROR_ON_ERROR_RETRY
						  : BLOCKMIRROR_ON_ERROR_REPORT;

	ck_assert_int_eq(bm_fault_register(fx.dst, &fx.rules), 0);
	open_disk();
	start_job(BLOCKMIRROR_MODE_ACTIVE, policy);
	ck_assert_int_eq(blockmirror_job_wait(fx.job, BLOCKMIRROR_JOB_READY,
					      10000), BLOCKMIRROR_JOB_READY);
	ck_assert_int_eq(blockmirror_job_query(fx.job, &info), 0);
	ck_assert(info.actively_synced);
	fx.rules.write_err_count = 5;
	fx.rules.write_err_after = 0;
	fx.rules.write_errno = EIO;
	for (int i = 0; i < 200 && fx.rules.write_err_count; i++)
		sleep_ms(10);
	ck_assert_int_eq(fx.rules.write_err_count, _i ? 0 : 4);
	ck_assert_int_ge(fx.ev.dst_errors, 1);
	if (policy == BLOCKMIRROR_ON_ERROR_REPORT) {
		ck_assert_int_eq(blockmirror_job_wait(fx.job,
			BLOCKMIRROR_JOB_FAILED, 10000), BLOCKMIRROR_JOB_FAILED);
		check_on_source();
		return;
	}
	ck_assert_int_eq(blockmirror_job_query(fx.job, &info), 0);
	ck_assert(info.ready);
	pivot_and_check();
}
END_TEST

/* ---- a destination that hangs ---------------------------------------- */

START_TEST(test_dst_hangs)
{
	struct timespec t0, t1;
	double secs;

	fx.rules.write_delay_ns = 1000000; /* 1 ms: still copying below */
	ck_assert_int_eq(bm_fault_register(fx.dst, &fx.rules), 0);
	open_disk();
	start_job(_i ? BLOCKMIRROR_MODE_ACTIVE : BLOCKMIRROR_MODE_BACKGROUND,
		  BLOCKMIRROR_ON_ERROR_REPORT);
	sleep_ms(20);
	atomic_store(&fx.rules.hang, true);
	sleep_ms(300);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	ck_assert_int_eq(blockmirror_job_cancel(fx.job, true), 0);
	clock_gettime(CLOCK_MONOTONIC, &t1);
	secs = (double)(t1.tv_sec - t0.tv_sec) +
	       (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
	ck_assert_msg(secs < 5.0, "forced cancel took %.1f s", secs);
	ck_assert_int_eq(fx.ev.cancelled, 1);
	check_on_source();
}
END_TEST

int
main(void)
{
	Suite *s = suite_create("mirror-errors");
	TCase *src = tcase_create("source");
	TCase *dst = tcase_create("destination");
	SRunner *sr;
	int failed;

	tcase_add_checked_fixture(src, setup, teardown);
	tcase_set_timeout(src, 60);
	tcase_add_test(src, test_src_read_report);
	tcase_add_test(src, test_src_read_stop);
	tcase_add_test(src, test_src_read_retry);
	suite_add_tcase(s, src);

	tcase_add_checked_fixture(dst, setup, teardown);
	tcase_set_timeout(dst, 60);
	/* _i: 0 background mode, 1 active mode */
	tcase_add_loop_test(dst, test_dst_write_report, 0, 2);
	tcase_add_loop_test(dst, test_dst_write_stop, 0, 2);
	tcase_add_loop_test(dst, test_dst_write_retry, 0, 2);
	tcase_add_test(dst, test_dst_enospc);
	tcase_add_loop_test(dst, test_mirrored_write_errors, 0, 2);
	tcase_add_loop_test(dst, test_dst_hangs, 0, 2);
	suite_add_tcase(s, dst);

	sr = srunner_create(s);
	srunner_run_all(sr, CK_NORMAL);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
