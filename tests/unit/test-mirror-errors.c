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

#include "durable.h"
#include "fault.h"
#include "helpers.h"
#include "state.h"

#define SIZE (8u << 20)
#define MiB (1u << 20)

struct fixture {
	char dir[64], src[96], dst[96], link[96];
	unsigned char *model;
	struct blockmirror_disk *disk;
	struct blockmirror_job *job;
	struct events ev;
	struct bm_fault_rules rules;
	/* a guest writing to the last MiB while the job runs */
	pthread_t writer;
	atomic_bool stop;
	atomic_int guest_errors;
	atomic_uint guest_writes;     /* acknowledged */
	pthread_mutex_t model_lock;
};

static struct fixture fx;

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
			atomic_fetch_add(&fx.guest_writes, 1);
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
	snprintf(fx.link, sizeof fx.link, "%s/link", fx.dir);
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
	bm_durable_hook = NULL;
	unlink(fx.link);
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

/* The options every test starts from: a new destination, events counted. */
static struct blockmirror_job_options
job_options(enum blockmirror_mode mode, enum blockmirror_error_policy policy)
{
	struct blockmirror_job_options o = {
		.size = sizeof o,
		.flags = BLOCKMIRROR_JOB_CREATE,
		.mode = mode,
		.on_error = policy,
		.on_event = on_event,
		.event_data = &fx.ev,
	};

	return o;
}

static void
start_job_with(const struct blockmirror_job_options *o)
{
	fx.job = blockmirror_job_start(fx.disk, fx.dst, o);
	ck_assert_msg(fx.job != NULL, "%s", blockmirror_last_error());
}

static void
start_job_link(enum blockmirror_mode mode,
	       enum blockmirror_error_policy policy, const char *link)
{
	struct blockmirror_job_options o = job_options(mode, policy);

	o.link = link;
	start_job_with(&o);
}

static void
start_job(enum blockmirror_mode mode, enum blockmirror_error_policy policy)
{
	start_job_link(mode, policy, NULL);
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
	if (policy == BLOCKMIRROR_ON_ERROR_REPORT) {
		unsigned n;

		/* The first error fails the job, and the guest's writes go
		 * on without touching the destination again. */
		ck_assert_int_eq(blockmirror_job_wait(fx.job,
			BLOCKMIRROR_JOB_FAILED, 20000), BLOCKMIRROR_JOB_FAILED);
		n = atomic_load(&fx.guest_writes);
		for (uint64_t end = now_ms() + 20000;
		     atomic_load(&fx.guest_writes) - n < 50 && now_ms() < end;)
			sleep_ms(10);
		ck_assert_uint_ge(atomic_load(&fx.guest_writes) - n, 50);
		ck_assert_int_eq(fx.rules.write_err_count, 4);
		ck_assert_int_ge(fx.ev.dst_errors, 1);
		check_on_source();
		return;
	}
	/* Retried (after 100, 200, 400... ms) until all five are used up,
	 * however slowly that goes here. */
	for (uint64_t end = now_ms() + 20000;
	     fx.rules.write_err_count && now_ms() < end;)
		sleep_ms(10);
	ck_assert_int_eq(fx.rules.write_err_count, 0);
	ck_assert_int_ge(fx.ev.dst_errors, 1);
	ck_assert_int_eq(blockmirror_job_query(fx.job, &info), 0);
	ck_assert(info.ready);
	pivot_and_check();
}
END_TEST

/* ---- a destination that hangs ---------------------------------------- */

START_TEST(test_dst_hangs)
{
	double t0, secs;

	fx.rules.write_delay_ns = 1000000; /* 1 ms: still copying below */
	ck_assert_int_eq(bm_fault_register(fx.dst, &fx.rules), 0);
	open_disk();
	start_job(_i ? BLOCKMIRROR_MODE_ACTIVE : BLOCKMIRROR_MODE_BACKGROUND,
		  BLOCKMIRROR_ON_ERROR_REPORT);
	sleep_ms(20);
	atomic_store(&fx.rules.hang, true);
	sleep_ms(300);
	t0 = now_s();
	ck_assert_int_eq(blockmirror_job_cancel(fx.job, true), 0);
	secs = now_s() - t0;
	ck_assert_msg(secs < 5.0, "forced cancel took %.1f s", secs);
	ck_assert_int_eq(fx.ev.cancelled, 1);
	check_on_source();
}
END_TEST

/* ---- late phases: mapping, the pre-pivot flush, the link ------------- */

static void
wait_ready(void)
{
	int s = blockmirror_job_wait(fx.job, BLOCKMIRROR_JOB_READY, 30000);

	ck_assert_msg(s == BLOCKMIRROR_JOB_READY, "state %d: %s", s,
		      blockmirror_last_error());
}

/* Defect 9: a block-status error while mapping the source, under the stop
 * and retry policies (_i 0 and 1), must not leave the job in MAPPING for
 * good: retry maps again, stop pauses and resume maps again. */
START_TEST(test_map_error)
{
	bool retry = _i == 1;
	int s;

	fx.rules.extents_errno = EIO;
	fx.rules.extents_err_count = 1;
	ck_assert_int_eq(bm_fault_register(fx.src, &fx.rules), 0);
	open_disk();
	start_job(BLOCKMIRROR_MODE_BACKGROUND, retry ?
		  BLOCKMIRROR_ON_ERROR_RETRY : BLOCKMIRROR_ON_ERROR_STOP);
	if (!retry) {
		s = blockmirror_job_wait(fx.job, BLOCKMIRROR_JOB_PAUSED, 10000);
		ck_assert_msg(s == BLOCKMIRROR_JOB_PAUSED, "state %s",
			      blockmirror_job_state_name(s));
		ck_assert_int_eq(blockmirror_job_resume(fx.job), 0);
	}
	pivot_and_check();
	ck_assert_int_eq(fx.ev.src_errors, 1);
}
END_TEST

/* Defect 9, the other way out: cancel after a mapping error. */
START_TEST(test_map_error_cancel)
{
	struct bg_call c;

	fx.rules.extents_errno = EIO;
	fx.rules.extents_err_count = -1;
	ck_assert_int_eq(bm_fault_register(fx.src, &fx.rules), 0);
	open_disk();
	start_job(BLOCKMIRROR_MODE_ACTIVE, BLOCKMIRROR_ON_ERROR_RETRY);
	for (uint64_t end = now_ms() + 20000;
	     !fx.ev.src_errors && now_ms() < end;)
		sleep_ms(10);
	ck_assert_int_ge(fx.ev.src_errors, 1);
	bg_start(&c, fx.job, BG_CANCEL);
	ck_assert_msg(bg_wait(&c, 5000), "cancel after a mapping error hangs");
	ck_assert_int_eq(c.result, 0);
	ck_assert_int_eq(fx.ev.cancelled, 1);
	check_on_source();
}
END_TEST

/* Defect 7: cancel after READY flushes the destination; when that flush
 * fails the cancel must still end (the destination is no consistent copy
 * then: the job fails and says why), never hang. */
START_TEST(test_cancel_ready_flush_fails)
{
	struct bg_call c;
	int s;

	ck_assert_int_eq(bm_fault_register(fx.dst, &fx.rules), 0);
	open_disk();
	start_job(_i ? BLOCKMIRROR_MODE_ACTIVE : BLOCKMIRROR_MODE_BACKGROUND,
		  BLOCKMIRROR_ON_ERROR_REPORT);
	wait_ready();
	fx.rules.flush_errno = EIO;
	fx.rules.flush_err_count = -1;
	bg_start(&c, fx.job, BG_CANCEL);
	ck_assert_msg(bg_wait(&c, 10000), "cancel with a failing flush hangs");
	s = blockmirror_job_wait(fx.job, BLOCKMIRROR_JOB_FAILED, 1000);
	ck_assert_msg(s == BLOCKMIRROR_JOB_FAILED, "state %s",
		      blockmirror_job_state_name(s));
	ck_assert_int_eq(c.result, -EIO);
	ck_assert_int_eq(fx.ev.failed, 1);
	check_on_source();
}
END_TEST

/* Defects 7 and 8: a destination whose flush hangs, in a cancel after
 * READY (_i 0) and in a pivot (_i 1).  A forced cancel ends either at
 * once; the blocked call returns; the disk stays on the source. */
START_TEST(test_flush_hangs_forced_cancel)
{
	struct bg_call c;
	double t0, secs;
	int r;

	ck_assert_int_eq(bm_fault_register(fx.dst, &fx.rules), 0);
	open_disk();
	start_job(BLOCKMIRROR_MODE_ACTIVE, BLOCKMIRROR_ON_ERROR_REPORT);
	wait_ready();
	atomic_store(&fx.rules.hang_flush, true);
	if (_i)
		bg_start(&c, fx.job, BG_COMPLETE);
	else
		bg_start(&c, fx.job, BG_CANCEL);
	sleep_ms(300);
	ck_assert(!atomic_load(&c.done));
	t0 = now_s();
	r = blockmirror_job_cancel(fx.job, true);
	secs = now_s() - t0;
	ck_assert_msg(r == 0, "forced cancel: %s", blockmirror_last_error());
	ck_assert_msg(secs < 5.0, "forced cancel took %.1f s", secs);
	ck_assert_msg(bg_wait(&c, 5000), "the first call still hangs");
	if (_i)
		ck_assert_int_lt(c.result, 0);
	ck_assert_int_eq(blockmirror_job_wait(fx.job, BLOCKMIRROR_JOB_CANCELLED,
					      0), BLOCKMIRROR_JOB_CANCELLED);
	ck_assert_int_eq(fx.ev.cancelled, 1);
	check_on_source();
}
END_TEST

/* The caller's end_timeout_ms: a pivot (_i 1) or a cancel after READY
 * (_i 0) whose destination flush hangs ends by itself, as a forced cancel
 * would, and the blocked call says it timed out. */
START_TEST(test_end_timeout)
{
	struct blockmirror_job_options o =
		job_options(BLOCKMIRROR_MODE_ACTIVE,
			    BLOCKMIRROR_ON_ERROR_REPORT);
	double t0, secs;
	int r;

	o.end_timeout_ms = 300;
	ck_assert_int_eq(bm_fault_register(fx.dst, &fx.rules), 0);
	open_disk();
	start_job_with(&o);
	wait_ready();
	atomic_store(&fx.rules.hang_flush, true);
	t0 = now_s();
	r = _i ? blockmirror_job_complete(fx.job)
	       : blockmirror_job_cancel(fx.job, false);
	secs = now_s() - t0;
	ck_assert_msg(r == -ETIMEDOUT, "%d: %s", r, blockmirror_last_error());
	ck_assert_msg(secs < 5.0, "the ending took %.1f s", secs);
	ck_assert_int_eq(blockmirror_job_wait(fx.job, BLOCKMIRROR_JOB_CANCELLED,
					      5000), BLOCKMIRROR_JOB_CANCELLED);
	check_on_source();
}
END_TEST

/* Make the first fsync of the link's directory during the pivot fail. */
static atomic_bool fail_dir_sync, dir_sync_failed;

static int
dir_sync_hook(const struct bm_durable_event *ev)
{
	if (!ev->done && ev->step == BM_DURABLE_FSYNC_DIR &&
	    atomic_load(&fail_dir_sync) && !atomic_load(&dir_sync_failed)) {
		atomic_store(&dir_sync_failed, true);
		return -EIO;
	}
	return 0;
}

/* Defect 4: the pivot renamed the link over to the destination, and the
 * directory's fsync then failed.  The link names the destination, so that
 * is what a restart serves: the disk must go on there too, never back to
 * the source (whose later writes a restart would lose). */
START_TEST(test_pivot_dir_sync_fails)
{
	char target[128];
	char *img;
	ssize_t n;

	ck_assert_int_eq(symlink(fx.src, fx.link), 0);
	open_disk();
	start_job_link(_i ? BLOCKMIRROR_MODE_ACTIVE
			  : BLOCKMIRROR_MODE_BACKGROUND,
		       BLOCKMIRROR_ON_ERROR_REPORT, fx.link);
	wait_ready();
	atomic_store(&dir_sync_failed, false);
	atomic_store(&fail_dir_sync, true);
	bm_durable_hook = dir_sync_hook;
	blockmirror_job_complete(fx.job);
	ck_assert(atomic_load(&dir_sync_failed));
	n = readlink(fx.link, target, sizeof target - 1);
	ck_assert_int_gt(n, 0);
	target[n] = '\0';
	img = blockmirror_disk_get_image(fx.disk);
	ck_assert_msg(strcmp(img, target) == 0, "the disk runs on %s but the "
		      "link names %s", img, target);
	free(img);
	ck_assert_str_eq(target, fx.dst);
	stop_writer();
	blockmirror_job_free(fx.job);
	ck_assert_int_eq(blockmirror_disk_close(fx.disk), 0);
	check_file(fx.dst, "the destination");
}
END_TEST

/* Record the directories synced. */
static char synced_dirs[16][128];
static atomic_int nsynced;

static int
record_dir_sync(const struct bm_durable_event *ev)
{
	if (ev->done && ev->result == 0 && ev->step == BM_DURABLE_FSYNC_DIR) {
		int i = atomic_fetch_add(&nsynced, 1);

		if (i < 16)
			snprintf(synced_dirs[i], sizeof synced_dirs[i], "%s",
				 ev->path);
	}
	return 0;
}

/* Defect 5: a destination the job creates has its directory entry made
 * durable before the job counts on it (READY). */
START_TEST(test_created_dst_dir_synced)
{
	bool found = false;

	atomic_store(&nsynced, 0);
	bm_durable_hook = record_dir_sync;
	open_disk();
	start_job(BLOCKMIRROR_MODE_ACTIVE, BLOCKMIRROR_ON_ERROR_REPORT);
	wait_ready();
	for (int i = 0; i < atomic_load(&nsynced) && i < 16; i++)
		if (strcmp(synced_dirs[i], fx.dir) == 0)
			found = true;
	ck_assert_msg(found, "the new destination's directory was never "
		      "synced");
	pivot_and_check();
}
END_TEST

/* ---- ordering of overlapping writes (rule 4) ------------------------- */

struct aio_wait {
	atomic_int left;
	atomic_int err;
};

static void
aio_done(void *data, int err)
{
	struct aio_wait *w = data;

	if (err)
		atomic_store(&w->err, err);
	atomic_fetch_sub(&w->left, 1);
}

/* Open the disk with no writer thread: these tests choose every write. */
static void
open_disk_quiet(const char *name, enum blockmirror_format fmt)
{
	fx.disk = blockmirror_disk_open(name, fmt, 0);
	ck_assert_msg(fx.disk != NULL, "%s", blockmirror_last_error());
	ck_assert_int_eq(blockmirror_disk_start_thread(fx.disk), 0);
}

/* The job has ended: close the disk and require the destination to
 * equal the source. */
static void
close_and_compare(const char *src, enum blockmirror_format src_fmt)
{
	struct blockmirror_verify_result v = { .size = sizeof v };

	blockmirror_job_free(fx.job);
	ck_assert_int_eq(blockmirror_disk_close(fx.disk), 0);
	/* A destination the job created has the source's format. */
	ck_assert_int_eq(blockmirror_verify(src, src_fmt, fx.dst, src_fmt,
					    NULL, NULL, &v), 0);
	ck_assert_msg(v.identical, "the destination differs from the source "
		      "at %llu", (unsigned long long)v.first_difference);
}

/* Complete the job and require the destination to equal the source. */
static void
pivot_and_compare(const char *src, enum blockmirror_format src_fmt)
{
	ck_assert_int_eq(blockmirror_job_resume(fx.job), 0);
	wait_ready();
	ck_assert_msg(blockmirror_job_complete(fx.job) == 0, "%s",
		      blockmirror_last_error());
	close_and_compare(src, src_fmt);
}

/*
 * Fault rules on both images, an active job READY, then paused with one
 * guest write of 4 KiB at `offset` left DIRTY (written in background
 * mode); the job is back in active mode, still paused.
 */
static void
active_ready_one_dirty(struct bm_fault_rules *dst_rules, uint64_t offset)
{
	static unsigned char one[4096];

	memset(dst_rules, 0, sizeof *dst_rules);
	ck_assert_int_eq(bm_fault_register(fx.src, &fx.rules), 0);
	ck_assert_int_eq(bm_fault_register(fx.dst, dst_rules), 0);
	open_disk_quiet(fx.src, BLOCKMIRROR_FORMAT_RAW);
	start_job(BLOCKMIRROR_MODE_ACTIVE, BLOCKMIRROR_ON_ERROR_REPORT);
	wait_ready();
	ck_assert_int_eq(blockmirror_job_pause(fx.job), 0);
	ck_assert_int_eq(blockmirror_job_set_mode(fx.job,
		BLOCKMIRROR_MODE_BACKGROUND), 0);
	memset(one, 0x11, sizeof one);
	ck_assert_int_eq(blockmirror_disk_write(fx.disk, one, sizeof one,
						offset, 0), 0);
	ck_assert_int_eq(blockmirror_job_set_mode(fx.job,
		BLOCKMIRROR_MODE_ACTIVE), 0);
}

/*
 * Defect 1: in active mode an unmirrored write W1 (its chunk is dirty)
 * still in flight to the source, and a mirrored write W2 that overlaps it
 * (it also covers a clean chunk).  W2 reaches the source first and its
 * destination write is slow; W1 lands on the source after W2 and
 * completes first.  Source and destination then hold different data for
 * the overlap, and W2's completion must not leave the chunk clean.
 */
START_TEST(test_active_overlap_order)
{
	static struct bm_fault_rules dst_rules;
	static unsigned char w1[4096], w2[128 << 10];
	struct aio_wait w = { .left = 2 };

	/* Paused: no copy cleans what the test dirties. */
	active_ready_one_dirty(&dst_rules, 0);
	memset(w1, 0x22, sizeof w1);
	memset(w2, 0x33, sizeof w2);
	fx.rules.next_write_delay_ns = 100 * 1000000ull;
	dst_rules.next_write_delay_ns = 300 * 1000000ull;
	ck_assert_int_eq(blockmirror_disk_aio_write(fx.disk, w1, sizeof w1,
						    4096, 0, aio_done, &w), 0);
	ck_assert_int_eq(blockmirror_disk_aio_write(fx.disk, w2, sizeof w2, 0,
						    0, aio_done, &w), 0);
	while (atomic_load(&w.left))
		sleep_ms(5);
	ck_assert_int_eq(w.err, 0);
	pivot_and_compare(fx.src, BLOCKMIRROR_FORMAT_RAW);
}
END_TEST

/* Wait up to 20 s for a counter of the fault rules to pass `than`. */
static bool
wait_counter(_Atomic uint64_t *c, uint64_t than)
{
	for (uint64_t end = now_ms() + 20000;
	     atomic_load(c) <= than && now_ms() < end;)
		sleep_ms(5);
	return atomic_load(c) > than;
}

/*
 * Rule 4 in active mode: a guest write to a chunk whose copy is in flight
 * does not wait for the copy (the destination is hung here: waiting would
 * be forever).  It goes to the source alone and leaves the chunk DIRTY.
 * The chunk is then CONTENDED: the guest does wait for its next copy,
 * which must not be overtaken again (a guest write reaches the source
 * only after that copy is on the destination).  The destination ends up
 * equal to the source.
 */
START_TEST(test_active_write_overtakes_copy)
{
	static struct bm_fault_rules dst_rules;
	static unsigned char two[4096], three[4096];
	struct aio_wait w2 = { .left = 1 }, w3 = { .left = 1 };
	uint64_t sub;

	/* Dirty one chunk, then copy it into a hung destination. */
	active_ready_one_dirty(&dst_rules, MiB);
	sub = atomic_load(&dst_rules.submitted);
	atomic_store(&dst_rules.hang, true);
	ck_assert_int_eq(blockmirror_job_resume(fx.job), 0);
	ck_assert_msg(wait_counter(&dst_rules.submitted, sub),
		      "the copy never reached the destination");
	/* Overtake it. */
	memset(two, 0x22, sizeof two);
	ck_assert_int_eq(blockmirror_disk_aio_write(fx.disk, two, sizeof two,
						    MiB + 8192, 0, aio_done,
						    &w2), 0);
	for (uint64_t end = now_ms() + 20000;
	     atomic_load(&w2.left) && now_ms() < end;)
		sleep_ms(5);
	if (atomic_load(&w2.left))
		atomic_store(&dst_rules.hang, false); /* let it end */
	ck_assert_msg(atomic_load(&w2.left) == 0, "a guest write waited for "
		      "a copy into a hung destination");
	ck_assert_int_eq(w2.err, 0);
	/* The copy lands and the chunk is copied again: that copy is the
	 * one the guest waits for.  It is held, first in its read of the
	 * source, then in its write to the destination, until the check
	 * below is done, however slow this machine is. */
	atomic_store(&fx.rules.hang, true);
	sub = atomic_load(&fx.rules.submitted);
	atomic_store(&dst_rules.hang, false);
	ck_assert_msg(wait_counter(&fx.rules.submitted, sub),
		      "the chunk was not copied again");
	sub = atomic_load(&dst_rules.submitted);
	atomic_store(&dst_rules.hang, true);
	atomic_store(&fx.rules.hang, false);
	ck_assert_msg(wait_counter(&dst_rules.submitted, sub),
		      "the copy read the chunk but did not write it");
	sub = atomic_load(&fx.rules.submitted);
	memset(three, 0x33, sizeof three);
	ck_assert_int_eq(blockmirror_disk_aio_write(fx.disk, three,
						    sizeof three, MiB + 16384,
						    0, aio_done, &w3), 0);
	sleep_ms(300);
	ck_assert_msg(atomic_load(&fx.rules.submitted) == sub &&
		      atomic_load(&w3.left) == 1, "a guest write overtook "
		      "the copy of a contended chunk");
	atomic_store(&dst_rules.hang, false);
	for (uint64_t end = now_ms() + 20000;
	     atomic_load(&w3.left) && now_ms() < end;)
		sleep_ms(5);
	ck_assert_int_eq(atomic_load(&w3.left), 0);
	ck_assert_int_eq(w3.err, 0);
	wait_ready();
	ck_assert_msg(blockmirror_job_complete(fx.job) == 0, "complete: %s",
		      blockmirror_last_error());
	close_and_compare(fx.src, BLOCKMIRROR_FORMAT_RAW);
}
END_TEST

/*
 * A pivot does not flush a raw source: the destination holds every write,
 * and closing a raw file syncs nothing.  (It used to, in PREFLUSH: seconds
 * of the guest's cached writes after a busy move, the guest's writes
 * waiting behind them.)
 */
START_TEST(test_pivot_leaves_raw_source_unsynced)
{
	static unsigned char buf[4096];
	uint64_t flushes;

	memset(&fx.rules, 0, sizeof fx.rules);
	ck_assert_int_eq(bm_fault_register(fx.src, &fx.rules), 0);
	open_disk_quiet(fx.src, BLOCKMIRROR_FORMAT_RAW);
	start_job(BLOCKMIRROR_MODE_ACTIVE, BLOCKMIRROR_ON_ERROR_REPORT);
	wait_ready();
	memset(buf, 0x3c, sizeof buf);
	ck_assert_int_eq(blockmirror_disk_write(fx.disk, buf, sizeof buf, MiB,
						0), 0);
	flushes = atomic_load(&fx.rules.flushes);
	ck_assert_msg(blockmirror_job_complete(fx.job) == 0, "complete: %s",
		      blockmirror_last_error());
	ck_assert_uint_eq(atomic_load(&fx.rules.flushes), flushes);
	close_and_compare(fx.src, BLOCKMIRROR_FORMAT_RAW);
}
END_TEST

/* A new qcow2 image in the test's directory, with fault rules (fx.rules),
 * opened as the disk. */
static void
qcow2_source_open(char *src, size_t len, const char *name)
{
	snprintf(src, len, "%s/%s", fx.dir, name);
	ck_assert_int_eq(blockmirror_image_create(src,
		BLOCKMIRROR_FORMAT_QCOW2, SIZE, "cluster_size=65536", false),
		0);
	memset(&fx.rules, 0, sizeof fx.rules);
	ck_assert_int_eq(bm_fault_register(src, &fx.rules), 0);
	open_disk_quiet(src, BLOCKMIRROR_FORMAT_QCOW2);
}

/*
 * Start an active job and, once READY, write 64 KiB of `byte` at `off` (a
 * new cluster of a qcow2 source: its close has tables to write); then
 * hang the source's flushes and complete, which must go through.  The
 * source's flush count when they were hung.
 */
static uint64_t
pivot_with_source_flushes_hung(uint64_t off, int byte)
{
	static unsigned char buf[1 << 16];
	uint64_t flushes;

	start_job(BLOCKMIRROR_MODE_ACTIVE, BLOCKMIRROR_ON_ERROR_REPORT);
	wait_ready();
	memset(buf, byte, sizeof buf);
	ck_assert_int_eq(blockmirror_disk_write(fx.disk, buf, sizeof buf, off,
						0), 0);
	atomic_store(&fx.rules.hang_flush, true);
	flushes = atomic_load(&fx.rules.flushes);
	ck_assert_msg(blockmirror_job_complete(fx.job) == 0, "complete: %s",
		      blockmirror_last_error());
	return flushes;
}

/*
 * A qcow2 source, whose close writes its tables and syncs, is closed off
 * the disk's loop after the pivot: with the source's flushes hung, the
 * pivot still completes and the guest reads and writes on the
 * destination; the close finishes once the flushes go through, and the
 * source is a sound image holding what the destination held at the pivot
 * (blockmirror_verify opens it).
 */
START_TEST(test_pivot_closes_qcow2_source_aside)
{
	static unsigned char buf[1 << 16], back[1 << 16];
	uint64_t flushes;
	char src[128];

	qcow2_source_open(src, sizeof src, "src.qcow2");
	memset(buf, 0x4d, sizeof buf);
	ck_assert_int_eq(blockmirror_disk_write(fx.disk, buf, sizeof buf, 0,
						0), 0);
	flushes = pivot_with_source_flushes_hung(4 * MiB, 0x4e);
	memset(buf, 0x4f, sizeof buf);
	ck_assert_int_eq(blockmirror_disk_write(fx.disk, buf, sizeof buf,
						6 * MiB, 0), 0);
	ck_assert_int_eq(blockmirror_disk_read(fx.disk, back, sizeof back,
					       6 * MiB), 0);
	ck_assert_mem_eq(back, buf, sizeof buf);
	atomic_store(&fx.rules.hang_flush, false);
	blockmirror_job_free(fx.job);
	ck_assert_int_eq(blockmirror_disk_close(fx.disk), 0);
	/* The close synced, once let through. */
	ck_assert_uint_gt(atomic_load(&fx.rules.flushes), flushes);
	bm_fault_unregister(src);
	/* The source as the pivot left it: without the write made after
	 * it, which went to the destination only. */
	{
		struct blockmirror_disk *d = blockmirror_disk_open(src,
			BLOCKMIRROR_FORMAT_QCOW2, 0);
		static const unsigned char zero[1 << 16];

		ck_assert_msg(d != NULL, "%s", blockmirror_last_error());
		ck_assert_int_eq(blockmirror_disk_read(d, back, sizeof back,
						       4 * MiB), 0);
		ck_assert_uint_eq(back[0], 0x4e);
		ck_assert_int_eq(blockmirror_disk_read(d, back, sizeof back,
						       6 * MiB), 0);
		ck_assert_mem_eq(back, zero, sizeof back);
		ck_assert_int_eq(blockmirror_disk_close(d), 0);
	}
	unlink(src);
}
END_TEST

static atomic_bool released;

static void *
release_flushes(void *arg)
{
	sleep_ms(200);
	atomic_store(&released, true);
	atomic_store(&fx.rules.hang_flush, false);
	return NULL;
}

/*
 * A move back onto a source that is still being closed (its flushes hung)
 * waits for that close before it opens the image: two owners of one qcow2
 * file would corrupt it.  The moved-back disk then equals the
 * destination it came from.
 */
START_TEST(test_move_back_waits_for_close)
{
	struct blockmirror_job_options o;
	pthread_t t;
	char src[128];

	qcow2_source_open(src, sizeof src, "back.qcow2");
	pivot_with_source_flushes_hung(3 * MiB, 0x71);
	blockmirror_job_free(fx.job);
	atomic_store(&released, false);
	ck_assert_int_eq(pthread_create(&t, NULL, release_flushes, NULL), 0);
	o = job_options(BLOCKMIRROR_MODE_ACTIVE, BLOCKMIRROR_ON_ERROR_REPORT);
	o.flags = 0;
	fx.job = blockmirror_job_start(fx.disk, src, &o);
	ck_assert_msg(atomic_load(&released), "the move back opened the "
		      "source while its close was still writing it");
	pthread_join(t, NULL);
	ck_assert_msg(fx.job != NULL, "%s", blockmirror_last_error());
	wait_ready();
	ck_assert_msg(blockmirror_job_complete(fx.job) == 0, "complete: %s",
		      blockmirror_last_error());
	blockmirror_job_free(fx.job);
	fx.job = NULL;
	ck_assert_int_eq(blockmirror_disk_close(fx.disk), 0);
	bm_fault_unregister(src);
	{
		struct blockmirror_verify_result v = { .size = sizeof v };

		ck_assert_int_eq(blockmirror_verify(src,
			BLOCKMIRROR_FORMAT_QCOW2, fx.dst,
			BLOCKMIRROR_FORMAT_QCOW2, NULL, NULL, &v), 0);
		ck_assert(v.identical);
	}
	unlink(src);
}
END_TEST

/*
 * Where the disk's change record is the qcow2 source's own bitmaps, the
 * tracker goes on marking there after the pivot, each new mark followed
 * by a data sync of that file: the pivot flushes the source first, while
 * the guest still runs, so that the first write after it does not wait
 * for everything the guest wrote during the move.
 */
START_TEST(test_pivot_flushes_source_holding_record)
{
	static unsigned char buf[1 << 16];
	bool in_image = false;
	uint64_t flushes;
	char src[128], *where = NULL;

	qcow2_source_open(src, sizeof src, "rec.qcow2");
	ck_assert_msg(blockmirror_disk_track(fx.disk, NULL, 0, NULL) == 0,
		      "%s", blockmirror_last_error());
	ck_assert_int_eq(blockmirror_disk_track_record(fx.disk, &where,
						       &in_image), 0);
	free(where);
	ck_assert(in_image);
	start_job(BLOCKMIRROR_MODE_ACTIVE, BLOCKMIRROR_ON_ERROR_REPORT);
	wait_ready();
	memset(buf, 0x61, sizeof buf);
	ck_assert_int_eq(blockmirror_disk_write(fx.disk, buf, sizeof buf,
						2 * MiB, 0), 0);
	flushes = atomic_load(&fx.rules.flushes);
	ck_assert_msg(blockmirror_job_complete(fx.job) == 0, "complete: %s",
		      blockmirror_last_error());
	ck_assert_uint_gt(atomic_load(&fx.rules.flushes), flushes);
	blockmirror_job_free(fx.job);
	ck_assert_int_eq(blockmirror_disk_close(fx.disk), 0);
	bm_fault_unregister(src);
	unlink(src);
}
END_TEST

/*
 * A mirrored write in flight when complete() is called fails on the
 * destination while the pivot drains the guest.  Its chunk is dirty, so
 * the final copy takes it again and the pivot goes through, under every
 * policy (_i: report, stop, retry); it used to be abandoned with the
 * stale error (complete() returned -EIO although the destination had
 * recovered).
 *
 * The job learns how a mirrored write went once both its halves are
 * done: its destination half fails at once here, and its source half is
 * held until complete() is under way, on any machine.
 */
START_TEST(test_error_while_draining)
{
	static const enum blockmirror_error_policy policy[] = {
		BLOCKMIRROR_ON_ERROR_REPORT, BLOCKMIRROR_ON_ERROR_STOP,
		BLOCKMIRROR_ON_ERROR_RETRY,
	};
	static struct bm_fault_rules dst_rules;
	static unsigned char buf[4096];
	struct aio_wait w = { .left = 1 };
	struct blockmirror_job_info info = { .size = sizeof info };
	struct bg_call c;
	uint64_t sub;

	memset(&dst_rules, 0, sizeof dst_rules);
	ck_assert_int_eq(bm_fault_register(fx.src, &fx.rules), 0);
	ck_assert_int_eq(bm_fault_register(fx.dst, &dst_rules), 0);
	open_disk_quiet(fx.src, BLOCKMIRROR_FORMAT_RAW);
	start_job(BLOCKMIRROR_MODE_ACTIVE, policy[_i]);
	wait_ready();
	/* The next destination write (the mirrored half of the guest's)
	 * fails once. */
	dst_rules.write_err_after = 0;
	dst_rules.write_err_count = 1;
	dst_rules.write_errno = EIO;
	atomic_store(&fx.rules.hang, true);
	sub = atomic_load(&fx.rules.submitted);
	memset(buf, 0x5a, sizeof buf);
	ck_assert_int_eq(blockmirror_disk_aio_write(fx.disk, buf, sizeof buf,
						    MiB, 0, aio_done, &w), 0);
	ck_assert_msg(wait_counter(&dst_rules.failures, 0), "the mirrored "
		      "write did not fail");
	ck_assert_msg(wait_counter(&fx.rules.submitted, sub), "the write "
		      "never reached the source");
	ck_assert_int_eq(atomic_load(&w.left), 1);
	bg_start(&c, fx.job, BG_COMPLETE);
	for (uint64_t end = now_ms() + 20000; now_ms() < end; sleep_ms(5)) {
		ck_assert_int_eq(blockmirror_job_query(fx.job, &info), 0);
		if (info.state == BLOCKMIRROR_JOB_PIVOTING)
			break;
	}
	ck_assert_int_eq(info.state, BLOCKMIRROR_JOB_PIVOTING);
	atomic_store(&fx.rules.hang, false);
	ck_assert_msg(bg_wait(&c, 60000), "complete() hangs");
	ck_assert_msg(c.result == 0, "complete: %s", strerror(-c.result));
	while (atomic_load(&w.left))
		sleep_ms(5);
	ck_assert_int_eq(w.err, 0);
	ck_assert_uint_eq(atomic_load(&dst_rules.failures), 1);
	ck_assert_int_ge(fx.ev.errors, 1);
	close_and_compare(fx.src, BLOCKMIRROR_FORMAT_RAW);
}
END_TEST

/*
 * Defect 6: a discard is only a hint on the source (inside an allocated
 * qcow2 cluster it frees nothing and the old data stays); the destination
 * must end up reading what the source reads, whatever that is.
 */
START_TEST(test_active_discard_partial_cluster)
{
	char src[128];
	static unsigned char buf[1 << 20];

	snprintf(src, sizeof src, "%s/src.qcow2", fx.dir);
	ck_assert_int_eq(blockmirror_image_create(src,
		BLOCKMIRROR_FORMAT_QCOW2, SIZE, "cluster_size=65536", false),
		0);
	open_disk_quiet(src, BLOCKMIRROR_FORMAT_QCOW2);
	memset(buf, 0x5a, sizeof buf);
	ck_assert_int_eq(blockmirror_disk_write(fx.disk, buf, sizeof buf, 0,
						0), 0);
	start_job(_i ? BLOCKMIRROR_MODE_ACTIVE : BLOCKMIRROR_MODE_BACKGROUND,
		  BLOCKMIRROR_ON_ERROR_REPORT);
	wait_ready();
	ck_assert_int_eq(blockmirror_job_pause(fx.job), 0);
	/* 4 KiB inside the second cluster, and a cluster and a half. */
	ck_assert_int_eq(blockmirror_disk_discard(fx.disk, 4096, 65536 + 8192),
			 0);
	ck_assert_int_eq(blockmirror_disk_discard(fx.disk, 98304, 196608 +
						  32768), 0);
	pivot_and_compare(src, BLOCKMIRROR_FORMAT_QCOW2);
	unlink(src);
}
END_TEST

/* ---- the persistent bitmap (state-io.c) ------------------------------ */

/*
 * Defect 2: a guest write that arrives while a clear of the persistent
 * bitmap is being written must not count as marked by the slot that is
 * clearing its region.  Background mode, the copy paused so that the
 * destination lacks the write: once the write has completed, its region
 * must be dirty in the state on disk, whatever a crash would find.
 */
START_TEST(test_state_write_during_clear)
{
	static struct bm_fault_rules st_rules;
	static unsigned char buf[4096];
	struct blockmirror_job_options o =
		job_options(BLOCKMIRROR_MODE_BACKGROUND,
			    BLOCKMIRROR_ON_ERROR_REPORT);
	struct blockmirror_state_info si = { .size = sizeof si };
	struct aio_wait w = { .left = 1 };
	char sdir[128], sfile[160];
	uint64_t sub;

	snprintf(sdir, sizeof sdir, "%s/state", fx.dir);
	snprintf(sfile, sizeof sfile, "%s/%s", sdir, BM_STATE_FILE);
	memset(&st_rules, 0, sizeof st_rules);
	ck_assert_int_eq(bm_fault_register(sfile, &st_rules), 0);
	o.state_dir = sdir;
	open_disk_quiet(fx.src, BLOCKMIRROR_FORMAT_RAW);
	start_job_with(&o);
	wait_ready();
	memset(buf, 0x77, sizeof buf);
	ck_assert_int_eq(blockmirror_disk_write(fx.disk, buf, sizeof buf, 0,
						0), 0);
	/* The copy cleans region 0 again; the next clear of the state
	 * hangs in its slot write. */
	atomic_store(&st_rules.hang, true);
	sub = st_rules.submitted;
	for (uint64_t end = now_ms() + 20000;
	     st_rules.submitted == sub && now_ms() < end;)
		sleep_ms(10);
	ck_assert_msg(st_rules.submitted > sub, "no clear of the state");
	ck_assert_int_eq(blockmirror_job_pause(fx.job), 0);
	memset(buf, 0x78, sizeof buf);
	ck_assert_int_eq(blockmirror_disk_aio_write(fx.disk, buf, sizeof buf,
						    0, 0, aio_done, &w), 0);
	sleep_ms(100);
	sub = st_rules.flushes;
	atomic_store(&st_rules.hang, false);
	while (atomic_load(&w.left))
		sleep_ms(5);
	ck_assert_int_eq(w.err, 0);
	/* The clearing slot has landed (and any slot after it). */
	for (uint64_t end = now_ms() + 20000;
	     st_rules.flushes == sub && now_ms() < end;)
		sleep_ms(10);
	sleep_ms(200);
	ck_assert_int_eq(blockmirror_state_read(sdir, &si), 0);
	ck_assert_msg(si.regions_dirty >= 1, "the write at 0 completed, the "
		      "destination lacks it, and the state on disk says "
		      "nothing is dirty");
	free(si.source);
	free(si.destination);
	pivot_and_compare(fx.src, BLOCKMIRROR_FORMAT_RAW);
	bm_fault_unregister(sfile);
	rmdir(sdir);
}
END_TEST

/* A clear of the persistent bitmap flushes the destination; when that
 * flush hangs, a forced cancel must still end the job (its request is
 * cancelled with the destination's others). */
START_TEST(test_forced_cancel_hung_clear)
{
	struct blockmirror_job_options o =
		job_options(BLOCKMIRROR_MODE_ACTIVE,
			    BLOCKMIRROR_ON_ERROR_REPORT);
	struct blockmirror_state_info si = { .size = sizeof si };
	static unsigned char buf[4096];
	struct bg_call c;
	char sdir[128];
	uint64_t sub, end;

	snprintf(sdir, sizeof sdir, "%s/state", fx.dir);
	o.state_dir = sdir;
	ck_assert_int_eq(bm_fault_register(fx.dst, &fx.rules), 0);
	open_disk_quiet(fx.src, BLOCKMIRROR_FORMAT_RAW);
	start_job_with(&o);
	wait_ready();
	/* Once the state on disk is clean, no clear is under way (the
	 * last one wrote that). */
	for (end = now_ms() + 20000; now_ms() < end; sleep_ms(10)) {
		ck_assert_int_eq(blockmirror_state_read(sdir, &si), 0);
		free(si.source);
		free(si.destination);
		if (si.regions_dirty == 0)
			break;
	}
	ck_assert_uint_eq(si.regions_dirty, 0);
	atomic_store(&fx.rules.hang_flush, true);
	/* A write marks region 0 dirty; the next clear (once a second)
	 * takes it, and hangs in its flush: the only request to the
	 * destination after the write's own. */
	memset(buf, 0x5d, sizeof buf);
	ck_assert_int_eq(blockmirror_disk_write(fx.disk, buf, sizeof buf, 0,
						0), 0);
	memcpy(fx.model, buf, sizeof buf);
	sub = atomic_load(&fx.rules.submitted);
	for (end = now_ms() + 20000;
	     atomic_load(&fx.rules.submitted) == sub && now_ms() < end;)
		sleep_ms(10);
	ck_assert_msg(atomic_load(&fx.rules.submitted) > sub, "no clear "
		      "flushed the destination");
	bg_start(&c, fx.job, BG_FORCE);
	ck_assert_msg(bg_wait(&c, 5000), "forced cancel hangs on a clear");
	ck_assert_int_eq(c.result, 0);
	ck_assert_int_eq(blockmirror_job_wait(fx.job, BLOCKMIRROR_JOB_CANCELLED,
					      0), BLOCKMIRROR_JOB_CANCELLED);
	blockmirror_job_free(fx.job);
	ck_assert_int_eq(blockmirror_disk_close(fx.disk), 0);
	check_file(fx.src, "the source");
	rmdir(sdir);
}
END_TEST

/* BLOCKMIRROR_JOB_NOFOLLOW: a destination name with a symbolic link in its
 * path (one swapped in after the caller checked the name) is refused
 * with ELOOP, and nothing is created behind the link. */
START_TEST(test_job_nofollow)
{
	struct blockmirror_job_options o = {
		.size = sizeof o,
		.flags = BLOCKMIRROR_JOB_CREATE | BLOCKMIRROR_JOB_NOFOLLOW,
		.mode = BLOCKMIRROR_MODE_ACTIVE,
	};
	char sub[128], lnk[128], via[160], real[160];

	snprintf(sub, sizeof sub, "%s/sub", fx.dir);
	snprintf(lnk, sizeof lnk, "%s/lnk", fx.dir);
	snprintf(via, sizeof via, "%s/x.raw", lnk);
	snprintf(real, sizeof real, "%s/x.raw", sub);
	ck_assert_int_eq(mkdir(sub, 0700), 0);
	ck_assert_int_eq(symlink(sub, lnk), 0);
	open_disk_quiet(fx.src, BLOCKMIRROR_FORMAT_RAW);
	fx.job = blockmirror_job_start(fx.disk, via, &o);
	ck_assert_ptr_null(fx.job);
	ck_assert_int_eq(errno, ELOOP);
	ck_assert_int_eq(access(real, F_OK), -1);
	fx.job = blockmirror_job_start(fx.disk, real, &o);
	ck_assert_msg(fx.job != NULL, "%s", blockmirror_last_error());
	ck_assert_int_eq(blockmirror_job_cancel(fx.job, true), 0);
	blockmirror_job_free(fx.job);
	ck_assert_int_eq(blockmirror_disk_close(fx.disk), 0);
	unlink(real);
	unlink(lnk);
	rmdir(sub);
}
END_TEST

int
main(void)
{
	Suite *s = suite_create("mirror-errors");
	TCase *src = tcase_create("source");
	TCase *dst = tcase_create("destination");
	TCase *late = tcase_create("late");
	TCase *order = tcase_create("order");

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

	tcase_add_checked_fixture(late, setup, teardown);
	tcase_set_timeout(late, 60);
	tcase_add_loop_test(late, test_map_error, 0, 2);
	tcase_add_test(late, test_map_error_cancel);
	tcase_add_loop_test(late, test_cancel_ready_flush_fails, 0, 2);
	tcase_add_loop_test(late, test_flush_hangs_forced_cancel, 0, 2);
	tcase_add_loop_test(late, test_end_timeout, 0, 2);
	tcase_add_loop_test(late, test_pivot_dir_sync_fails, 0, 2);
	tcase_add_test(late, test_created_dst_dir_synced);
	suite_add_tcase(s, late);

	tcase_add_checked_fixture(order, setup, teardown);
	tcase_set_timeout(order, 60);
	tcase_add_test(order, test_active_overlap_order);
	tcase_add_loop_test(order, test_active_discard_partial_cluster, 0, 2);
	tcase_add_test(order, test_state_write_during_clear);
	tcase_add_test(order, test_forced_cancel_hung_clear);
	tcase_add_test(order, test_job_nofollow);
	tcase_add_loop_test(order, test_error_while_draining, 0, 3);
	tcase_add_test(order, test_active_write_overtakes_copy);
	tcase_add_test(order, test_pivot_leaves_raw_source_unsynced);
	tcase_add_test(order, test_pivot_closes_qcow2_source_aside);
	tcase_add_test(order, test_pivot_flushes_source_holding_record);
	tcase_add_test(order, test_move_back_waits_for_close);
	suite_add_tcase(s, order);

	return run_suite(s) ? EXIT_FAILURE : EXIT_SUCCESS;
}
