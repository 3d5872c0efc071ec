/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Black-box scenarios of the mirror job, after the iotests that exercise
 * QEMU's mirror (docs: qemu-mirror.md section 3, numbered as there).
 *
 * Every case builds a raw source image in a fresh temporary directory
 * (1 MiB extents of random data with holes between some of them), opens
 * it as a blockmirror_disk with the library's own loop thread, starts a
 * job through the public API only, and checks what a user can observe:
 * the return values and errno of the calls, the job's state and
 * counters (blockmirror_job_query), the events it delivered, the image
 * the disk runs on, and byte-for-byte the files on disk afterwards.
 *
 *   1  full copy + pivot (all three modes)      16 force-cancel a paused job
 *   2  cancel before READY (force and not)      18 active mode stays in sync
 *   3  cancel after READY: point-in-time copy   19 active mode, overlapping
 *   4  complete before READY is refused              unaligned writes
 *   5  pause and resume                         20 active mode progresses
 *   6  buffer and granularity extremes               under a guest's load
 *   7  empty and unaligned images               22 discard during the mirror
 *   8  size mismatch refused                    26 no probing of a raw
 *  10  mirror to self refused                        destination's content
 *  11  existing destination full of garbage     30 closing the disk while
 *  12  speed limit, high and low                     a job runs
 *
 * Speed limits keep a job from converging where a scenario needs it
 * running; nothing else depends on timing, and every wait is bounded.
 */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <blockmirror/blockmirror.h>

#include "fault.h"
#include "helpers.h"

#define KiB (UINT64_C(1) << 10)
#define MiB (UINT64_C(1) << 20)
#define WAIT_MS 20000 /* for things that take milliseconds when healthy */

/* ---- small helpers ---------------------------------------------------- */

static void
fill_random(unsigned char *p, uint64_t n, uint64_t *seed)
{
	for (uint64_t i = 0; i < n; i++)
		p[i] = (unsigned char)rnd(seed);
}

static const char *
state_name(int s)
{
	const char *n = s > 0 ? blockmirror_job_state_name(
					(enum blockmirror_job_state)s) : NULL;

	return n ? n : "(error)";
}

/* ---- files ------------------------------------------------------------ */

enum layout {
	LAYOUT_HOLES,  /* data in 1 MiB extents, every third MiB a hole */
	LAYOUT_FULL,   /* data everywhere */
};

/*
 * Write a raw image of `size` bytes and return what it reads as (the
 * caller frees it).  Holes are left by ftruncate, never written.
 */
static unsigned char *
make_image(const char *path, uint64_t size, enum layout layout, uint64_t seed)
{
	unsigned char *content = calloc(1, size ? size : 1);
	int fd = open(path, O_CREAT | O_TRUNC | O_WRONLY, 0644);

	ck_assert_ptr_nonnull(content);
	ck_assert_msg(fd >= 0, "creating %s: %s", path, strerror(errno));
	ck_assert_int_eq(ftruncate(fd, (off_t)size), 0);
	for (uint64_t off = 0, i = 0; off < size; off += MiB, i++) {
		uint64_t n = size - off < MiB ? size - off : MiB;

		if (layout == LAYOUT_HOLES && i % 3 == 1)
			continue;
		fill_random(content + off, n, &seed);
		ck_assert_int_eq(pwrite(fd, content + off, n, (off_t)off),
				 (ssize_t)n);
	}
	ck_assert_int_eq(close(fd), 0);
	return content;
}

/* A raw file of `size` bytes, every one of them `byte`. */
static void
make_pattern_file(const char *path, uint64_t size, unsigned char byte)
{
	unsigned char *buf = malloc(MiB);
	int fd = open(path, O_CREAT | O_TRUNC | O_WRONLY, 0644);

	ck_assert_ptr_nonnull(buf);
	ck_assert_msg(fd >= 0, "creating %s: %s", path, strerror(errno));
	memset(buf, byte, MiB);
	for (uint64_t off = 0; off < size; off += MiB) {
		uint64_t n = size - off < MiB ? size - off : MiB;

		ck_assert_int_eq(pwrite(fd, buf, n, (off_t)off), (ssize_t)n);
	}
	ck_assert_int_eq(ftruncate(fd, (off_t)size), 0);
	ck_assert_int_eq(close(fd), 0);
	free(buf);
}

/* The whole file, read with pread; its size in *size. */
static unsigned char *
slurp(const char *path, uint64_t *size)
{
	int fd = open(path, O_RDONLY);
	struct stat st;
	unsigned char *buf;
	uint64_t done = 0;

	ck_assert_msg(fd >= 0, "opening %s: %s", path, strerror(errno));
	ck_assert_int_eq(fstat(fd, &st), 0);
	*size = (uint64_t)st.st_size;
	buf = malloc(*size ? *size : 1);
	ck_assert_ptr_nonnull(buf);
	while (done < *size) {
		ssize_t n = pread(fd, buf + done, *size - done, (off_t)done);

		ck_assert_msg(n > 0, "reading %s at %llu: %s", path,
			      (unsigned long long)done,
			      n < 0 ? strerror(errno) : "unexpected end");
		done += (uint64_t)n;
	}
	close(fd);
	return buf;
}

/* The file must hold exactly `want` (size bytes). */
static void
check_file(const char *path, const unsigned char *want, uint64_t size,
	   const char *what)
{
	uint64_t got_size, i = 0;
	unsigned char *got = slurp(path, &got_size);

	ck_assert_msg(got_size == size, "%s (%s) has %llu bytes, want %llu",
		      what, path, (unsigned long long)got_size,
		      (unsigned long long)size);
	while (i < size && got[i] == want[i])
		i++;
	if (i < size) {
		uint64_t j = i;

		while (j < size && got[j] != want[j])
			j++;
		ck_abort_msg("%s (%s) differs at bytes %llu..%llu of %llu "
			     "(got %02x, want %02x)", what, path,
			     (unsigned long long)i, (unsigned long long)j,
			     (unsigned long long)size, got[i], want[i]);
	}
	free(got);
}

/* The disk must read as `want`. */
static void
check_disk(struct blockmirror_disk *disk, const unsigned char *want,
	   uint64_t size, const char *what)
{
	unsigned char *got = malloc(size ? size : 1);
	int r;

	ck_assert_ptr_nonnull(got);
	r = blockmirror_disk_read(disk, got, size, 0);
	ck_assert_msg(r == 0, "%s: reading the disk: %s", what,
		      blockmirror_last_error());
	for (uint64_t i = 0; i < size; i++)
		if (got[i] != want[i])
			ck_abort_msg("%s: the disk reads %02x at %llu, want "
				     "%02x", what, got[i],
				     (unsigned long long)i, want[i]);
	free(got);
}

/* What the guest sees right now. */
static unsigned char *
disk_snapshot(struct blockmirror_disk *disk, uint64_t size)
{
	unsigned char *buf = malloc(size ? size : 1);
	int r;

	ck_assert_ptr_nonnull(buf);
	r = blockmirror_disk_read(disk, buf, size, 0);
	ck_assert_msg(r == 0, "reading the disk: %s", blockmirror_last_error());
	return buf;
}

/* ---- the fixture: a directory, a source image, its disk --------------- */

struct fx {
	char dir[64];
	char src[96];
	char dst[96];
	uint64_t size;
	unsigned char *content; /* what the source holds */
	struct blockmirror_disk *disk;
	struct events ev;
};

static void
fx_dir(struct fx *f)
{
	memset(f, 0, sizeof *f);
	snprintf(f->dir, sizeof f->dir, "/tmp/test-mirror-scenarios.XXXXXX");
	ck_assert_ptr_nonnull(mkdtemp(f->dir));
	snprintf(f->src, sizeof f->src, "%s/src", f->dir);
	snprintf(f->dst, sizeof f->dst, "%s/dst", f->dir);
}

static void
fx_open_disk(struct fx *f)
{
	f->disk = blockmirror_disk_open(f->src, BLOCKMIRROR_FORMAT_RAW, 0);
	ck_assert_msg(f->disk != NULL, "opening the disk: %s",
		      blockmirror_last_error());
	ck_assert_int_eq(blockmirror_disk_start_thread(f->disk), 0);
	ck_assert_msg(blockmirror_disk_get_size(f->disk) == f->size,
		      "the disk has %llu bytes, want %llu",
		      (unsigned long long)blockmirror_disk_get_size(f->disk),
		      (unsigned long long)f->size);
}

static void
fx_init(struct fx *f, uint64_t size, enum layout layout, uint64_t seed)
{
	fx_dir(f);
	f->size = size;
	f->content = make_image(f->src, size, layout, seed);
	fx_open_disk(f);
}

static struct blockmirror_job_options
fx_options(struct fx *f, enum blockmirror_mode mode)
{
	struct blockmirror_job_options o = {
		.size = sizeof o,
		.flags = BLOCKMIRROR_JOB_CREATE,
		.mode = mode,
		.on_event = on_event,
		.event_data = &f->ev,
	};

	return o;
}

static struct blockmirror_job *
fx_start(struct fx *f, const struct blockmirror_job_options *o)
{
	struct blockmirror_job *job = blockmirror_job_start(f->disk, f->dst, o);

	ck_assert_msg(job != NULL, "starting the job: %s",
		      blockmirror_last_error());
	return job;
}

static void
fx_close_disk(struct fx *f)
{
	int r = blockmirror_disk_close(f->disk);

	f->disk = NULL;
	ck_assert_msg(r == 0, "closing the disk: %s", blockmirror_last_error());
}

static void
fx_fini(struct fx *f)
{
	char path[160];

	if (f->disk)
		fx_close_disk(f);
	unlink(f->src);
	unlink(f->dst);
	snprintf(path, sizeof path, "%s/link", f->dir);
	unlink(path);
	snprintf(path, sizeof path, "%s/hard", f->dir);
	unlink(path);
	rmdir(f->dir);
	free(f->content);
}

static struct blockmirror_job_info
query(struct blockmirror_job *job)
{
	struct blockmirror_job_info info = { .size = sizeof info };
	int r = blockmirror_job_query(job, &info);

	ck_assert_msg(r == 0, "query: %s", blockmirror_last_error());
	return info;
}

static void
wait_state(struct blockmirror_job *job, enum blockmirror_job_state want,
	   int timeout_ms, const char *what)
{
	int s = blockmirror_job_wait(job, want, timeout_ms);

	ck_assert_msg(s == (int)want, "%s: waited for %s, got %s (%d): %s",
		      what, state_name(want), state_name(s), s,
		      s < 0 ? blockmirror_last_error() : "");
}

/* Wait until the job has left MAPPING (small images map in no time). */
static void
wait_copying(struct blockmirror_job *job)
{
	int s = blockmirror_job_wait(job, BLOCKMIRROR_JOB_COPYING, WAIT_MS);

	ck_assert_msg(s == BLOCKMIRROR_JOB_COPYING ||
		      s == BLOCKMIRROR_JOB_READY,
		      "waiting for the copy to start: %s", state_name(s));
}

static void
check_image(struct blockmirror_disk *disk, const char *want)
{
	char *img = blockmirror_disk_get_image(disk);

	ck_assert_msg(img != NULL, "get_image: %s", blockmirror_last_error());
	ck_assert_msg(strcmp(img, want) == 0, "the disk runs on %s, want %s",
		      img, want);
	free(img);
}

/* Synchronous guest write that keeps `model` up to date. */
static void
guest_write(struct blockmirror_disk *disk, unsigned char *model,
	    uint64_t off, uint64_t len, uint64_t *seed)
{
	unsigned char *buf = malloc(len);
	int r;

	ck_assert_ptr_nonnull(buf);
	fill_random(buf, len, seed);
	r = blockmirror_disk_write(disk, buf, len, off, 0);
	ck_assert_msg(r == 0, "write %llu+%llu: %s", (unsigned long long)off,
		      (unsigned long long)len, blockmirror_last_error());
	memcpy(model + off, buf, len);
	free(buf);
}

/* ---- waiting for aio -------------------------------------------------- */

struct aio_wait {
	pthread_mutex_t lock;
	pthread_cond_t cond;
	int pending;
	int calls;
	int first_err;
};

static void
aio_wait_init(struct aio_wait *w)
{
	pthread_mutex_init(&w->lock, NULL);
	pthread_cond_init(&w->cond, NULL);
	w->pending = w->calls = w->first_err = 0;
}

static void
aio_done(void *data, int err)
{
	struct aio_wait *w = data;

	pthread_mutex_lock(&w->lock);
	w->pending--;
	w->calls++;
	if (err && !w->first_err)
		w->first_err = err;
	pthread_cond_broadcast(&w->cond);
	pthread_mutex_unlock(&w->lock);
}

/* Wait for every request; false on timeout. */
static bool
aio_wait_all(struct aio_wait *w, int timeout_ms)
{
	struct timespec deadline;
	bool ok = true;

	clock_gettime(CLOCK_REALTIME, &deadline);
	deadline.tv_sec += timeout_ms / 1000;
	deadline.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
	if (deadline.tv_nsec >= 1000000000L) {
		deadline.tv_sec++;
		deadline.tv_nsec -= 1000000000L;
	}
	pthread_mutex_lock(&w->lock);
	while (w->pending > 0 && ok)
		if (pthread_cond_timedwait(&w->cond, &w->lock, &deadline) ==
		    ETIMEDOUT)
			ok = w->pending == 0;
	pthread_mutex_unlock(&w->lock);
	return ok;
}

/* ---- 1. basic full copy + pivot --------------------------------------- */

START_TEST(test_basic_pivot)
{
	enum blockmirror_mode mode = (enum blockmirror_mode)_i;
	struct fx f;
	struct blockmirror_job_options o;
	struct blockmirror_job_info info;
	struct blockmirror_job *job;
	int r;

	fx_init(&f, 8 * MiB + 12345, LAYOUT_HOLES, 1 + (uint64_t)_i);
	o = fx_options(&f, mode);
	job = fx_start(&f, &o);
	wait_state(job, BLOCKMIRROR_JOB_READY, WAIT_MS, "basic");
	/* The state is visible to blockmirror_job_wait a moment before the
	 * loop delivers the event; a query runs on the loop after it. */
	info = query(job);
	ck_assert_int_eq(f.ev.ready, 1);
	ck_assert_msg(info.ready && info.bytes_remaining == 0 &&
		      info.dirty_bytes == 0 &&
		      info.bytes_done == f.size && info.bytes_total == f.size,
		      "READY but ready %d remaining %llu dirty %llu done %llu "
		      "total %llu", info.ready,
		      (unsigned long long)info.bytes_remaining,
		      (unsigned long long)info.dirty_bytes,
		      (unsigned long long)info.bytes_done,
		      (unsigned long long)info.bytes_total);
	check_image(f.disk, f.src);

	r = blockmirror_job_complete(job);
	ck_assert_msg(r == 0, "complete: %s", blockmirror_last_error());
	info = query(job);
	ck_assert_msg(info.state == BLOCKMIRROR_JOB_COMPLETED,
		      "after complete the job is %s", state_name(info.state));
	ck_assert_msg(info.pivot_stall_us < 10000000u,
		      "the pivot stalled the guest %llu us",
		      (unsigned long long)info.pivot_stall_us);
	ck_assert_int_eq(f.ev.completed, 1);
	ck_assert_int_eq(f.ev.pivoted, 1);
	ck_assert_int_eq(f.ev.cancelled, 0);
	ck_assert_int_eq(f.ev.failed, 0);
	ck_assert_int_eq(f.ev.errors, 0);
	check_image(f.disk, f.dst);
	check_disk(f.disk, f.content, f.size, "after the pivot");
	blockmirror_job_free(job);
	fx_close_disk(&f);
	check_file(f.dst, f.content, f.size, "the destination");
	check_file(f.src, f.content, f.size, "the source");
	fx_fini(&f);
}
END_TEST

/* ---- 2. cancel before READY ------------------------------------------- */

START_TEST(test_cancel_before_ready)
{
	bool force = _i;
	struct fx f;
	struct blockmirror_job_options o;
	struct blockmirror_job_info info;
	struct blockmirror_job *job;
	int r;

	fx_init(&f, 16 * MiB, LAYOUT_FULL, 20 + (uint64_t)_i);
	o = fx_options(&f, BLOCKMIRROR_MODE_BACKGROUND);
	o.speed = 64 * KiB;
	job = fx_start(&f, &o);
	wait_copying(job);
	sleep_ms(100);
	info = query(job);
	ck_assert_msg(info.state == BLOCKMIRROR_JOB_COPYING,
		      "at 64 KiB/s a 16 MiB copy is %s after 0.1 s",
		      state_name(info.state));
	ck_assert(info.speed == 64 * KiB);

	r = blockmirror_job_cancel(job, force);
	ck_assert_msg(r == 0, "cancel(force %d): %s", force,
		      blockmirror_last_error());
	info = query(job);
	ck_assert_msg(info.state == BLOCKMIRROR_JOB_CANCELLED,
		      "cancel(force %d) before READY left the job %s", force,
		      state_name(info.state));
	ck_assert_int_eq(f.ev.cancelled, 1);
	ck_assert_int_eq(f.ev.completed, 0);
	ck_assert_int_eq(f.ev.ready, 0);
	ck_assert_int_eq(f.ev.failed, 0);
	check_image(f.disk, f.src);
	/* An ended job refuses everything. */
	ck_assert_int_eq(blockmirror_job_complete(job), -EINVAL);
	ck_assert_int_eq(blockmirror_job_cancel(job, true), -EINVAL);
	blockmirror_job_free(job);
	check_disk(f.disk, f.content, f.size, "after the cancel");
	fx_close_disk(&f);
	check_file(f.src, f.content, f.size, "the source");
	fx_fini(&f);
}
END_TEST

/* ---- 3. cancel after READY -------------------------------------------- */

START_TEST(test_cancel_after_ready)
{
	bool force = _i;
	struct fx f;
	struct blockmirror_job_options o;
	struct blockmirror_job_info info;
	struct blockmirror_job *job;
	unsigned char *model, *at_cancel;
	uint64_t seed = 300;
	int r;

	fx_init(&f, 6 * MiB, LAYOUT_HOLES, 30 + (uint64_t)_i);
	model = malloc(f.size);
	memcpy(model, f.content, f.size);
	o = fx_options(&f, BLOCKMIRROR_MODE_BACKGROUND);
	job = fx_start(&f, &o);
	wait_state(job, BLOCKMIRROR_JOB_READY, WAIT_MS, "cancel after READY");

	/* Background mode: these make chunks dirty again, which the clean
	 * cancel must copy before it lets go. */
	guest_write(f.disk, model, 1 * MiB + 17, 100000, &seed);
	guest_write(f.disk, model, 4 * MiB - 3, 7, &seed);
	guest_write(f.disk, model, f.size - 4096, 4096, &seed);
	at_cancel = malloc(f.size);
	memcpy(at_cancel, model, f.size);

	r = blockmirror_job_cancel(job, force);
	ck_assert_msg(r == 0, "cancel(force %d): %s", force,
		      blockmirror_last_error());
	info = query(job);
	if (force) {
		ck_assert_msg(info.state == BLOCKMIRROR_JOB_CANCELLED,
			      "forced cancel after READY left the job %s",
			      state_name(info.state));
		ck_assert_int_eq(f.ev.cancelled, 1);
		ck_assert_int_eq(f.ev.completed, 0);
	} else {
		ck_assert_msg(info.state == BLOCKMIRROR_JOB_COMPLETED,
			      "cancel after READY left the job %s, want "
			      "completed", state_name(info.state));
		ck_assert_int_eq(f.ev.completed, 1);
		ck_assert_int_eq(f.ev.unpivoted, 1);
		ck_assert_int_eq(f.ev.pivoted, 0);
		ck_assert_int_eq(f.ev.cancelled, 0);
	}
	ck_assert_int_eq(f.ev.failed, 0);
	check_image(f.disk, f.src);
	blockmirror_job_free(job);

	/* The guest goes on on the source; the destination must not see
	 * this. */
	guest_write(f.disk, model, 0, 65536, &seed);
	check_disk(f.disk, model, f.size, "after the cancel");
	fx_close_disk(&f);
	check_file(f.src, model, f.size, "the source");
	if (!force)
		check_file(f.dst, at_cancel, f.size,
			   "the destination (point-in-time copy)");
	free(model);
	free(at_cancel);
	fx_fini(&f);
}
END_TEST

/* ---- 4. complete before READY ----------------------------------------- */

START_TEST(test_complete_before_ready)
{
	struct fx f;
	struct blockmirror_job_options o;
	struct blockmirror_job_info info;
	struct blockmirror_job *job;
	const char *msg;
	int r;

	fx_init(&f, 16 * MiB, LAYOUT_FULL, 40);
	o = fx_options(&f, BLOCKMIRROR_MODE_BACKGROUND);
	o.speed = 64 * KiB;
	job = fx_start(&f, &o);
	wait_copying(job);
	r = blockmirror_job_complete(job);
	ck_assert_msg(r == -EBUSY, "complete before READY returned %d (%s), "
		      "want -EBUSY", r, r ? blockmirror_last_error() : "ok");
	ck_assert_int_eq(blockmirror_last_errno(), EBUSY);
	msg = blockmirror_last_error();
	ck_assert_msg(msg && strncmp(msg, "blockmirror_job_complete", 24) == 0,
		      "the last error is '%s'", msg ? msg : "(null)");
	info = query(job);
	ck_assert_msg(info.state == BLOCKMIRROR_JOB_COPYING,
		      "after a refused complete the job is %s",
		      state_name(info.state));
	ck_assert_int_eq(f.ev.completed + f.ev.cancelled + f.ev.failed, 0);
	check_image(f.disk, f.src);

	/* It keeps running and gets there. */
	ck_assert_int_eq(blockmirror_job_set_speed(job, 0), 0);
	wait_state(job, BLOCKMIRROR_JOB_READY, WAIT_MS, "after set_speed 0");
	r = blockmirror_job_complete(job);
	ck_assert_msg(r == 0, "complete: %s", blockmirror_last_error());
	ck_assert_int_eq(f.ev.pivoted, 1);
	check_image(f.disk, f.dst);
	blockmirror_job_free(job);
	fx_close_disk(&f);
	check_file(f.dst, f.content, f.size, "the destination");
	fx_fini(&f);
}
END_TEST

/* ---- 5. pause and resume ---------------------------------------------- */

START_TEST(test_pause_resume)
{
	struct fx f;
	struct blockmirror_job_options o;
	struct blockmirror_job_info info, later;
	struct blockmirror_job *job;
	int r;

	fx_init(&f, 16 * MiB, LAYOUT_FULL, 50);
	o = fx_options(&f, BLOCKMIRROR_MODE_BACKGROUND);
	o.speed = 1 * MiB;
	o.buf_size = 256 * KiB;
	job = fx_start(&f, &o);
	wait_copying(job);
	sleep_ms(200);

	r = blockmirror_job_pause(job);
	ck_assert_msg(r == 0, "pause: %s", blockmirror_last_error());
	ck_assert_int_eq(f.ev.paused, 1);
	ck_assert_int_eq(blockmirror_job_pause(job), -EINVAL);
	ck_assert_int_eq(blockmirror_job_complete(job), -EBUSY);
	/* Copies already in flight may still land: let them, however
	 * slowly they do here (two samples 300 ms apart agree). */
	info = query(job);
	for (int i = 0; i < 33; i++) {
		sleep_ms(300);
		later = query(job);
		if (later.bytes_done == info.bytes_done &&
		    later.bytes_copied == info.bytes_copied)
			break;
		info = later;
	}
	ck_assert_msg(info.state == BLOCKMIRROR_JOB_PAUSED && info.paused,
		      "after pause: %s paused %d", state_name(info.state),
		      info.paused);
	ck_assert_msg(info.bytes_done < f.size, "the copy finished before "
		      "the pause (%llu bytes done)",
		      (unsigned long long)info.bytes_done);
	sleep_ms(500);
	later = query(job);
	ck_assert_msg(later.state == BLOCKMIRROR_JOB_PAUSED,
		      "paused job became %s", state_name(later.state));
	ck_assert_msg(later.bytes_done == info.bytes_done &&
		      later.bytes_copied == info.bytes_copied,
		      "progress while paused: done %llu -> %llu, copied %llu "
		      "-> %llu", (unsigned long long)info.bytes_done,
		      (unsigned long long)later.bytes_done,
		      (unsigned long long)info.bytes_copied,
		      (unsigned long long)later.bytes_copied);

	r = blockmirror_job_resume(job);
	ck_assert_msg(r == 0, "resume: %s", blockmirror_last_error());
	ck_assert_int_eq(f.ev.resumed, 1);
	ck_assert_int_eq(blockmirror_job_resume(job), -EINVAL);
	info = query(job);
	ck_assert_msg(info.state == BLOCKMIRROR_JOB_COPYING && !info.paused,
		      "after resume: %s", state_name(info.state));
	ck_assert_int_eq(blockmirror_job_set_speed(job, 0), 0);
	wait_state(job, BLOCKMIRROR_JOB_READY, WAIT_MS, "after resume");
	r = blockmirror_job_complete(job);
	ck_assert_msg(r == 0, "complete: %s", blockmirror_last_error());
	ck_assert_int_eq(f.ev.pivoted, 1);
	blockmirror_job_free(job);
	fx_close_disk(&f);
	check_file(f.dst, f.content, f.size, "the destination");
	fx_fini(&f);
}
END_TEST

/* ---- 6. buffer and granularity extremes ------------------------------- */

static const uint64_t good_grans[] = { 4 * KiB, 64 * KiB, 64 * MiB };

START_TEST(test_small_buffer_granularity)
{
	uint64_t gran = good_grans[_i];
	struct fx f;
	struct blockmirror_job_options o;
	struct blockmirror_job_info info;
	struct blockmirror_job *job;
	uint64_t seed = 600;
	unsigned char *model;
	int r;

	fx_init(&f, 5 * MiB + 4096, LAYOUT_HOLES, 60 + (uint64_t)_i);
	model = malloc(f.size);
	memcpy(model, f.content, f.size);
	o = fx_options(&f, BLOCKMIRROR_MODE_BACKGROUND);
	o.buf_size = 4096;
	o.granularity = gran;
	job = fx_start(&f, &o);
	info = query(job);
	ck_assert_msg(info.granularity == gran, "granularity %llu, want %llu",
		      (unsigned long long)info.granularity,
		      (unsigned long long)gran);
	/* Unaligned guest writes while it copies. */
	guest_write(f.disk, model, 3 * MiB + 5, 9000, &seed);
	guest_write(f.disk, model, 1 * MiB - 1, 2, &seed);
	wait_state(job, BLOCKMIRROR_JOB_READY, WAIT_MS, "small buffer");
	r = blockmirror_job_complete(job);
	ck_assert_msg(r == 0, "complete: %s", blockmirror_last_error());
	blockmirror_job_free(job);
	fx_close_disk(&f);
	check_file(f.dst, model, f.size, "the destination");
	free(model);
	fx_fini(&f);
}
END_TEST

static const uint64_t bad_grans[] = { 3000, 2 * KiB, 128 * MiB, 96 * KiB };

START_TEST(test_bad_granularity)
{
	struct fx f;
	struct blockmirror_job_options o;
	struct blockmirror_job *job;

	fx_init(&f, 2 * MiB, LAYOUT_FULL, 65);
	o = fx_options(&f, BLOCKMIRROR_MODE_BACKGROUND);
	o.buf_size = 4096;
	o.granularity = bad_grans[_i];
	errno = 0;
	job = blockmirror_job_start(f.disk, f.dst, &o);
	ck_assert_msg(job == NULL, "granularity %llu was accepted",
		      (unsigned long long)bad_grans[_i]);
	ck_assert_msg(errno == EINVAL, "granularity %llu: errno %d (%s)",
		      (unsigned long long)bad_grans[_i], errno,
		      strerror(errno));
	ck_assert_int_eq(blockmirror_last_errno(), EINVAL);
	ck_assert_msg(access(f.dst, F_OK) != 0 && errno == ENOENT,
		      "a refused job left %s behind", f.dst);
	check_image(f.disk, f.src);
	fx_fini(&f);
}
END_TEST

/* ---- 7. empty and unaligned images ------------------------------------ */

START_TEST(test_zero_length)
{
	struct fx f;
	struct blockmirror_job_options o;
	struct blockmirror_job_info info;
	struct blockmirror_job *job;
	struct stat st;
	int r;

	fx_init(&f, 0, LAYOUT_FULL, 70);
	o = fx_options(&f, BLOCKMIRROR_MODE_BACKGROUND);
	job = fx_start(&f, &o);
	wait_state(job, BLOCKMIRROR_JOB_READY, 5000, "empty image");
	info = query(job);
	ck_assert(info.bytes_total == 0 && info.bytes_remaining == 0);
	r = blockmirror_job_complete(job);
	ck_assert_msg(r == 0, "complete: %s", blockmirror_last_error());
	ck_assert_int_eq(f.ev.pivoted, 1);
	check_image(f.disk, f.dst);
	blockmirror_job_free(job);
	fx_close_disk(&f);
	ck_assert_int_eq(stat(f.dst, &st), 0);
	ck_assert_int_eq(st.st_size, 0);
	fx_fini(&f);
}
END_TEST

START_TEST(test_unaligned_length)
{
	enum blockmirror_mode mode = _i ? BLOCKMIRROR_MODE_ACTIVE
				       : BLOCKMIRROR_MODE_BACKGROUND;
	struct fx f;
	struct blockmirror_job_options o;
	struct blockmirror_job *job;
	uint64_t seed = 700;
	unsigned char *model;
	int r;

	fx_init(&f, 1025 * KiB, LAYOUT_FULL, 71 + (uint64_t)_i);
	model = malloc(f.size);
	memcpy(model, f.content, f.size);
	o = fx_options(&f, mode);
	job = fx_start(&f, &o);
	wait_state(job, BLOCKMIRROR_JOB_READY, WAIT_MS, "1025 KiB");
	/* The tail: the last chunk is a partial one. */
	guest_write(f.disk, model, f.size - 1000, 1000, &seed);
	guest_write(f.disk, model, f.size - 1, 1, &seed);
	r = blockmirror_job_complete(job);
	ck_assert_msg(r == 0, "complete: %s", blockmirror_last_error());
	blockmirror_job_free(job);
	check_disk(f.disk, model, f.size, "after the pivot");
	fx_close_disk(&f);
	check_file(f.dst, model, f.size, "the destination");
	free(model);
	fx_fini(&f);
}
END_TEST

/* ---- 8. size mismatch ------------------------------------------------- */

START_TEST(test_size_mismatch)
{
	struct fx f;
	struct blockmirror_job_options o;
	struct blockmirror_job *job;
	uint64_t dst_size, sz;
	unsigned char *before;
	int r;

	fx_init(&f, 4 * MiB, LAYOUT_HOLES, 80);
	dst_size = _i ? f.size + MiB : f.size - 64 * KiB;
	make_pattern_file(f.dst, dst_size, 0xa7);
	before = slurp(f.dst, &sz);
	o = fx_options(&f, BLOCKMIRROR_MODE_BACKGROUND);
	o.flags = 0;
	o.format = BLOCKMIRROR_FORMAT_RAW;
	errno = 0;
	job = blockmirror_job_start(f.disk, f.dst, &o);
	ck_assert_msg(job == NULL, "a %s destination was accepted",
		      _i ? "larger" : "smaller");
	ck_assert_msg(errno == EINVAL, "%s destination: errno %d (%s)",
		      _i ? "larger" : "smaller", errno, strerror(errno));
	check_file(f.dst, before, dst_size, "the refused destination");
	check_image(f.disk, f.src);
	check_disk(f.disk, f.content, f.size, "after the refusal");

	/* Nothing of the refused job lingers: a proper one runs. */
	ck_assert_int_eq(unlink(f.dst), 0);
	o.flags = BLOCKMIRROR_JOB_CREATE;
	job = fx_start(&f, &o);
	wait_state(job, BLOCKMIRROR_JOB_READY, WAIT_MS, "the next job");
	r = blockmirror_job_cancel(job, false);
	ck_assert_msg(r == 0, "cancel: %s", blockmirror_last_error());
	blockmirror_job_free(job);
	fx_close_disk(&f);
	check_file(f.src, f.content, f.size, "the source");
	check_file(f.dst, f.content, f.size, "the next destination");
	free(before);
	fx_fini(&f);
}
END_TEST

/* ---- 10. mirror to self ----------------------------------------------- */

START_TEST(test_mirror_to_self)
{
	struct fx f;
	struct blockmirror_job_options o;
	struct blockmirror_job *job;
	char lnk[160], hard[160];
	const char *names[3];

	fx_init(&f, 3 * MiB, LAYOUT_HOLES, 100);
	snprintf(lnk, sizeof lnk, "%s/link", f.dir);
	snprintf(hard, sizeof hard, "%s/hard", f.dir);
	ck_assert_int_eq(symlink(f.src, lnk), 0);
	ck_assert_int_eq(link(f.src, hard), 0);
	names[0] = f.src;
	names[1] = lnk;
	names[2] = hard;
	o = fx_options(&f, BLOCKMIRROR_MODE_ACTIVE);
	for (int i = 0; i < 3; i++) {
		/* Existing, same size: only "it is the disk itself" stops it. */
		o.flags = 0;
		errno = 0;
		job = blockmirror_job_start(f.disk, names[i], &o);
		ck_assert_msg(job == NULL, "mirroring to %s (the source) was "
			      "accepted", names[i]);
		ck_assert_msg(errno == EINVAL, "mirror to %s: errno %d (%s)",
			      names[i], errno, strerror(errno));
		/* Asked to create it: it exists. */
		o.flags = BLOCKMIRROR_JOB_CREATE;
		errno = 0;
		job = blockmirror_job_start(f.disk, names[i], &o);
		ck_assert_msg(job == NULL, "creating %s (the source) was "
			      "accepted", names[i]);
		ck_assert_msg(errno == EEXIST || errno == EINVAL,
			      "create %s: errno %d (%s)", names[i], errno,
			      strerror(errno));
		check_file(f.src, f.content, f.size, "the source");
	}
	ck_assert_int_eq(f.ev.completed + f.ev.cancelled + f.ev.failed, 0);
	check_image(f.disk, f.src);
	check_disk(f.disk, f.content, f.size, "after the refusals");
	fx_close_disk(&f);
	check_file(f.src, f.content, f.size, "the source");
	fx_fini(&f);
}
END_TEST

/* ---- 11. existing destination full of garbage ------------------------- */

START_TEST(test_existing_garbage)
{
	struct fx f;
	struct blockmirror_job_options o;
	struct blockmirror_job *job;
	int r;

	fx_init(&f, 7 * MiB + 512, LAYOUT_HOLES, 110 + (uint64_t)_i);
	make_pattern_file(f.dst, f.size, 0x42);
	o = fx_options(&f, _i ? BLOCKMIRROR_MODE_ACTIVE
			      : BLOCKMIRROR_MODE_BACKGROUND);
	o.flags = 0;
	job = fx_start(&f, &o);
	wait_state(job, BLOCKMIRROR_JOB_READY, WAIT_MS, "existing target");
	r = blockmirror_job_complete(job);
	ck_assert_msg(r == 0, "complete: %s", blockmirror_last_error());
	blockmirror_job_free(job);
	fx_close_disk(&f);
	{
		uint64_t sz;
		unsigned char *d = slurp(f.dst, &sz);

		ck_assert(sz == f.size);
		/* MiB 1 of the source is a hole. */
		for (uint64_t i = MiB; i < 2 * MiB; i++)
			ck_assert_msg(d[i] == 0, "the destination holds %02x "
				      "at %llu where the source has a hole",
				      d[i], (unsigned long long)i);
		free(d);
	}
	check_file(f.dst, f.content, f.size, "the destination");
	fx_fini(&f);
}
END_TEST

/* ---- 12. speed limit -------------------------------------------------- */

/* Bytes copied per second over about `ms`. */
static double
measure_rate(struct blockmirror_job *job, unsigned ms)
{
	struct blockmirror_job_info a = query(job), b;
	double t0 = now_s(), t1;

	sleep_ms(ms);
	b = query(job);
	t1 = now_s();
	ck_assert_msg(b.state == BLOCKMIRROR_JOB_COPYING, "the job is %s "
		      "while measuring its speed", state_name(b.state));
	return (double)(b.bytes_copied - a.bytes_copied) / (t1 - t0);
}

START_TEST(test_speed)
{
	struct fx f;
	struct blockmirror_job_options o;
	struct blockmirror_job_info info;
	struct blockmirror_job *job;
	double rate;
	int r;

	fx_init(&f, 32 * MiB, LAYOUT_FULL, 120);

	/* The default is unlimited. */
	o = fx_options(&f, BLOCKMIRROR_MODE_BACKGROUND);
	job = fx_start(&f, &o);
	info = query(job);
	ck_assert_msg(info.speed == 0, "default speed %llu",
		      (unsigned long long)info.speed);
	r = blockmirror_job_cancel(job, true);
	ck_assert_msg(r == 0, "cancel: %s", blockmirror_last_error());
	blockmirror_job_free(job);
	ck_assert_int_eq(unlink(f.dst), 0);
	memset(&f.ev, 0, sizeof f.ev);

	o.speed = 2 * MiB;
	job = fx_start(&f, &o);
	info = query(job);
	ck_assert_msg(info.speed == 2 * MiB, "speed %llu, want %llu",
		      (unsigned long long)info.speed,
		      (unsigned long long)(2 * MiB));
	wait_copying(job);
	ck_assert_int_eq(blockmirror_job_set_speed(job, 3 * MiB), 0);
	info = query(job);
	ck_assert_msg(info.speed == 3 * MiB, "after set_speed: %llu",
		      (unsigned long long)info.speed);
	ck_assert_int_eq(blockmirror_job_set_speed(job, 2 * MiB), 0);
	info = query(job);
	ck_assert(info.speed == 2 * MiB);
	sleep_ms(200);
	rate = measure_rate(job, 1200);
	ck_assert_msg(rate >= 0.25 * 2 * MiB && rate <= 4.0 * 2 * MiB,
		      "limited to 2 MiB/s, copied %.0f bytes/s", rate);


	ck_assert_int_eq(blockmirror_job_set_speed(job, 0), 0);
	ck_assert(query(job).speed == 0);
	wait_state(job, BLOCKMIRROR_JOB_READY, WAIT_MS, "unlimited");
	r = blockmirror_job_complete(job);
	ck_assert_msg(r == 0, "complete: %s", blockmirror_last_error());
	blockmirror_job_free(job);
	fx_close_disk(&f);
	check_file(f.dst, f.content, f.size, "the destination");
	fx_fini(&f);
}
END_TEST

/*
 * A limit below one copy request per second (buf_size, 1 MiB by default)
 * must be honoured too, with the default buffer size: the same loose band.
 */
START_TEST(test_speed_low)
{
	struct fx f;
	struct blockmirror_job_options o;
	struct blockmirror_job *job;
	double rate;

	fx_init(&f, 16 * MiB, LAYOUT_FULL, 121);
	o = fx_options(&f, BLOCKMIRROR_MODE_BACKGROUND);
	o.speed = 128 * KiB;
	job = fx_start(&f, &o);
	wait_copying(job);
	sleep_ms(300);
	rate = measure_rate(job, 2000);
	ck_assert_int_eq(blockmirror_job_cancel(job, true), 0);
	blockmirror_job_free(job);
	fx_close_disk(&f);
	check_file(f.src, f.content, f.size, "the source");
	fx_fini(&f);
	ck_assert_msg(rate >= 0.25 * 128 * KiB && rate <= 4.0 * 128 * KiB,
		      "limited to 128 KiB/s, copied %.0f bytes/s (%.1fx the "
		      "limit)", rate, rate / (128.0 * KiB));
}
END_TEST

/* ---- 16. force-cancel a paused job ------------------------------------ */

/*
 * _i = 0: paused while copying, forced cancel: CANCELLED.
 *      1: paused after READY, forced cancel: CANCELLED.
 *      2: paused after READY, cancel without force: the clean cancel,
 *         COMPLETED without pivot and the destination a copy.
 */
START_TEST(test_cancel_paused)
{
	bool after_ready = _i >= 1, force = _i <= 1;
	struct fx f;
	struct blockmirror_job_options o;
	struct blockmirror_job_info info;
	struct blockmirror_job *job;
	unsigned char *model;
	uint64_t seed = 1600;
	double t0, took;
	int r;

	fx_init(&f, 16 * MiB, LAYOUT_FULL, 160 + (uint64_t)_i);
	model = malloc(f.size);
	memcpy(model, f.content, f.size);
	o = fx_options(&f, BLOCKMIRROR_MODE_BACKGROUND);
	if (!after_ready)
		o.speed = 64 * KiB;
	job = fx_start(&f, &o);
	if (after_ready)
		wait_state(job, BLOCKMIRROR_JOB_READY, WAIT_MS, "ready");
	else
		wait_copying(job);
	r = blockmirror_job_pause(job);
	ck_assert_msg(r == 0, "pause: %s", blockmirror_last_error());
	ck_assert_int_eq(query(job).state, BLOCKMIRROR_JOB_PAUSED);
	/* Writes while paused: dirty chunks the clean cancel must copy. */
	guest_write(f.disk, model, 5 * MiB + 3, 70000, &seed);

	t0 = now_s();
	r = blockmirror_job_cancel(job, force);
	took = now_s() - t0;
	ck_assert_msg(r == 0, "cancel: %s", blockmirror_last_error());
	ck_assert_msg(took < 5.0, "cancelling a paused job took %.1f s", took);
	info = query(job);
	if (force) {
		ck_assert_msg(info.state == BLOCKMIRROR_JOB_CANCELLED,
			      "forced cancel of a paused job: %s",
			      state_name(info.state));
		ck_assert_int_eq(f.ev.cancelled, 1);
		ck_assert_int_eq(f.ev.completed, 0);
	} else {
		ck_assert_msg(info.state == BLOCKMIRROR_JOB_COMPLETED,
			      "cancel of a job paused after READY: %s",
			      state_name(info.state));
		ck_assert_int_eq(f.ev.unpivoted, 1);
	}
	ck_assert_int_eq(f.ev.failed, 0);
	check_image(f.disk, f.src);
	blockmirror_job_free(job);
	fx_close_disk(&f);
	check_file(f.src, model, f.size, "the source");
	if (!force)
		check_file(f.dst, model, f.size, "the destination");
	free(model);
	fx_fini(&f);
}
END_TEST

/* ---- 18. active mode keeps the destination in sync -------------------- */

static void
check_dst_range(const char *path, const unsigned char *want, uint64_t off,
		uint64_t len, const char *what)
{
	unsigned char *got = malloc(len);
	int fd = open(path, O_RDONLY);

	ck_assert_ptr_nonnull(got);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(pread(fd, got, len, (off_t)off), (ssize_t)len);
	close(fd);
	for (uint64_t i = 0; i < len; i++)
		if (got[i] != want[off + i])
			ck_abort_msg("%s: the destination reads %02x at %llu, "
				     "want %02x", what, got[i],
				     (unsigned long long)(off + i),
				     want[off + i]);
	free(got);
}

START_TEST(test_active_in_sync)
{
	struct fx f;
	struct blockmirror_job_options o;
	struct blockmirror_job_info info;
	struct blockmirror_job *job;
	unsigned char *model;
	uint64_t seed = 1800, mirrored = 0;
	char what[96];
	int r;

	fx_init(&f, 8 * MiB, LAYOUT_HOLES, 180);
	model = malloc(f.size);
	memcpy(model, f.content, f.size);
	o = fx_options(&f, BLOCKMIRROR_MODE_ACTIVE);
	job = fx_start(&f, &o);
	/* Before READY too. */
	for (int i = 0; i < 8; i++) {
		uint64_t len = 1 + rnd(&seed) % (200 * KiB);

		guest_write(f.disk, model, rnd(&seed) % (f.size - len), len,
			    &seed);
	}
	wait_state(job, BLOCKMIRROR_JOB_READY, WAIT_MS, "active");
	info = query(job);
	ck_assert_msg(info.mode == BLOCKMIRROR_MODE_ACTIVE &&
		      info.actively_synced && info.dirty_bytes == 0,
		      "at READY: mode %d synced %d dirty %llu", info.mode,
		      info.actively_synced,
		      (unsigned long long)info.dirty_bytes);

	for (int i = 0; i < 40; i++) {
		uint64_t len = 1 + rnd(&seed) % (300 * KiB);
		uint64_t off = rnd(&seed) % (f.size - len);

		if (i % 4 == 3) {
			r = blockmirror_disk_write_zeroes(f.disk, len, off,
				i % 8 == 3 ? BLOCKMIRROR_REQ_MAY_TRIM : 0);
			ck_assert_msg(r == 0, "write_zeroes: %s",
				      blockmirror_last_error());
			memset(model + off, 0, len);
			snprintf(what, sizeof what, "zero %llu+%llu",
				 (unsigned long long)off,
				 (unsigned long long)len);
		} else {
			guest_write(f.disk, model, off, len, &seed);
			snprintf(what, sizeof what, "write %llu+%llu",
				 (unsigned long long)off,
				 (unsigned long long)len);
		}
		info = query(job);
		ck_assert_msg(info.state == BLOCKMIRROR_JOB_READY &&
			      info.actively_synced && info.dirty_bytes == 0 &&
			      info.bytes_remaining == 0,
			      "after %s: %s synced %d dirty %llu remaining "
			      "%llu", what, state_name(info.state),
			      info.actively_synced,
			      (unsigned long long)info.dirty_bytes,
			      (unsigned long long)info.bytes_remaining);
		ck_assert_msg(info.bytes_mirrored > mirrored,
			      "after %s bytes_mirrored stayed %llu", what,
			      (unsigned long long)mirrored);
		mirrored = info.bytes_mirrored;
		/* Completed means on both images. */
		check_dst_range(f.dst, model, off, len, what);
	}
	ck_assert_int_eq(blockmirror_disk_flush(f.disk), 0);
	r = blockmirror_job_complete(job);
	ck_assert_msg(r == 0, "complete: %s", blockmirror_last_error());
	ck_assert_int_eq(f.ev.pivoted, 1);
	ck_assert_int_eq(f.ev.errors, 0);
	blockmirror_job_free(job);
	check_disk(f.disk, model, f.size, "after the pivot");
	fx_close_disk(&f);
	check_file(f.dst, model, f.size, "the destination");
	free(model);
	fx_fini(&f);
}
END_TEST

/* ---- 19. active mode, unaligned and overlapping writes ---------------- */

START_TEST(test_active_overlapping)
{
	struct fx f;
	struct blockmirror_job_options o;
	struct blockmirror_job_info info;
	struct blockmirror_job *job;
	struct aio_wait w;
	static const struct { uint64_t off, len; } ranges[] = {
		{ 0, 1 * MiB }, { 0, 2 * MiB }, { 0, 2 * MiB },
		{ 1 * MiB, 2 * MiB },
	};
	unsigned char *bufs[4], *snap, one = 0xe1, back;
	uint64_t seed = 1900, remaining;
	int r;

	fx_init(&f, 8 * MiB, LAYOUT_FULL, 190);
	o = fx_options(&f, BLOCKMIRROR_MODE_ACTIVE);
	o.speed = 1;
	job = fx_start(&f, &o);
	wait_copying(job);
	info = query(job);
	ck_assert_msg(info.bytes_remaining > f.size / 2,
		      "at 1 byte/s only %llu of %llu bytes are left to copy",
		      (unsigned long long)info.bytes_remaining,
		      (unsigned long long)f.size);
	remaining = info.bytes_remaining;

	/* One byte, inside a dirty chunk. */
	r = blockmirror_disk_write(f.disk, &one, 1, MiB + 42, 0);
	ck_assert_msg(r == 0, "1-byte write: %s", blockmirror_last_error());
	ck_assert_int_eq(blockmirror_disk_read(f.disk, &back, 1, MiB + 42), 0);
	ck_assert_int_eq(back, one);

	/* Overlapping writes all in flight at once. */
	aio_wait_init(&w);
	for (int i = 0; i < 4; i++) {
		bufs[i] = malloc(ranges[i].len);
		memset(bufs[i], 0x10 + i, ranges[i].len);
		fill_random(bufs[i], 4096, &seed);
	}
	pthread_mutex_lock(&w.lock);
	w.pending = 4;
	pthread_mutex_unlock(&w.lock);
	for (int i = 0; i < 4; i++) {
		r = blockmirror_disk_aio_write(f.disk, bufs[i], ranges[i].len,
					       ranges[i].off, 0, aio_done, &w);
		ck_assert_msg(r == 0, "aio_write %d: %s", i,
			      blockmirror_last_error());
	}
	ck_assert_msg(aio_wait_all(&w, WAIT_MS), "overlapping writes hung: "
		      "%d of 4 done", w.calls);
	ck_assert_int_eq(w.first_err, 0);
	ck_assert_int_eq(w.calls, 4);
	/* Active mode: guest writes never add to the remaining work. */
	info = query(job);
	ck_assert_msg(info.bytes_remaining <= remaining, "remaining grew from "
		      "%llu to %llu over the overlapping writes",
		      (unsigned long long)remaining,
		      (unsigned long long)info.bytes_remaining);

	/* And again, unaligned, mixed with zeroes, now with the copy
	 * racing along. */
	ck_assert_int_eq(blockmirror_job_set_speed(job, 0), 0);
	pthread_mutex_lock(&w.lock);
	w.pending = 4;
	w.calls = 0;
	pthread_mutex_unlock(&w.lock);
	r = blockmirror_disk_aio_write(f.disk, bufs[1], MiB + 3, 7 * KiB + 1,
				       0, aio_done, &w);
	ck_assert_int_eq(r, 0);
	r = blockmirror_disk_aio_write_zeroes(f.disk, 300 * KiB + 5, MiB - 77,
					      0, aio_done, &w);
	ck_assert_int_eq(r, 0);
	r = blockmirror_disk_aio_write(f.disk, bufs[3], 2 * MiB - 1,
				       MiB + 100, 0, aio_done, &w);
	ck_assert_int_eq(r, 0);
	r = blockmirror_disk_aio_discard(f.disk, 64 * KiB, 2 * MiB, aio_done,
					 &w);
	ck_assert_int_eq(r, 0);
	ck_assert_msg(aio_wait_all(&w, WAIT_MS), "second batch hung: %d of 4 "
		      "done", w.calls);
	ck_assert_int_eq(w.first_err, 0);

	wait_state(job, BLOCKMIRROR_JOB_READY, WAIT_MS, "after the writes");
	info = query(job);
	ck_assert_msg(info.actively_synced && info.dirty_bytes == 0,
		      "READY: synced %d dirty %llu", info.actively_synced,
		      (unsigned long long)info.dirty_bytes);
	snap = disk_snapshot(f.disk, f.size);
	r = blockmirror_job_complete(job);
	ck_assert_msg(r == 0, "complete: %s", blockmirror_last_error());
	blockmirror_job_free(job);
	check_disk(f.disk, snap, f.size, "after the pivot");
	fx_close_disk(&f);
	check_file(f.dst, snap, f.size, "the destination");
	/* The source stopped exactly where the destination took over. */
	check_file(f.src, snap, f.size, "the source");
	for (int i = 0; i < 4; i++)
		free(bufs[i]);
	free(snap);
	fx_fini(&f);
}
END_TEST

/* ---- 20. active mode progresses under load ---------------------------- */

struct hammer {
	pthread_t thread;
	struct blockmirror_disk *disk;
	uint64_t size;
	atomic_bool stop;
	atomic_ulong writes;
	atomic_int err;
};

static void *
hammer_main(void *arg)
{
	struct hammer *h = arg;
	uint64_t seed = 2000, half = h->size / 2;
	unsigned char buf[4096];

	while (!atomic_load(&h->stop)) {
		uint64_t off = half + (rnd(&seed) % (half / 4096)) * 4096;
		int r;

		fill_random(buf, 64, &seed);
		r = blockmirror_disk_write(h->disk, buf, sizeof buf, off, 0);
		if (r < 0) {
			atomic_store(&h->err, r);
			break;
		}
		atomic_fetch_add(&h->writes, 1);
	}
	return NULL;
}

START_TEST(test_active_under_load)
{
	struct fx f;
	struct blockmirror_job_options o;
	struct blockmirror_job_info info;
	struct blockmirror_job *job;
	struct hammer h = { 0 };
	uint64_t samples[6];
	unsigned char *snap;
	int r;

	fx_init(&f, 16 * MiB, LAYOUT_FULL, 200);
	o = fx_options(&f, BLOCKMIRROR_MODE_ACTIVE);
	o.speed = 1 * MiB;
	o.buf_size = 256 * KiB;
	h.disk = f.disk;
	h.size = f.size;
	ck_assert_int_eq(pthread_create(&h.thread, NULL, hammer_main, &h), 0);
	job = fx_start(&f, &o);
	wait_copying(job);
	for (int i = 0; i < 6; i++) {
		if (i)
			sleep_ms(300);
		info = query(job);
		ck_assert_msg(info.state == BLOCKMIRROR_JOB_COPYING,
			      "sample %d: the job is %s", i,
			      state_name(info.state));
		samples[i] = info.bytes_remaining;
		if (i)
			ck_assert_msg(samples[i] <= samples[i - 1],
				      "remaining grew from %llu to %llu in "
				      "active mode",
				      (unsigned long long)samples[i - 1],
				      (unsigned long long)samples[i]);
	}
	ck_assert_msg(samples[5] < samples[0], "no progress in 1.5 s under "
		      "load: %llu bytes remain (%lu guest writes)",
		      (unsigned long long)samples[5],
		      (unsigned long)atomic_load(&h.writes));
	ck_assert_msg(atomic_load(&h.writes) > 0, "the guest made no writes");

	ck_assert_int_eq(blockmirror_job_set_speed(job, 0), 0);
	wait_state(job, BLOCKMIRROR_JOB_READY, WAIT_MS, "under load");
	atomic_store(&h.stop, true);
	pthread_join(h.thread, NULL);
	ck_assert_msg(atomic_load(&h.err) == 0, "guest write failed: %d",
		      atomic_load(&h.err));
	info = query(job);
	ck_assert_msg(info.actively_synced && info.dirty_bytes == 0,
		      "READY under load: synced %d dirty %llu",
		      info.actively_synced,
		      (unsigned long long)info.dirty_bytes);
	snap = disk_snapshot(f.disk, f.size);
	r = blockmirror_job_complete(job);
	ck_assert_msg(r == 0, "complete: %s", blockmirror_last_error());
	blockmirror_job_free(job);
	fx_close_disk(&f);
	check_file(f.dst, snap, f.size, "the destination");
	free(snap);
	fx_fini(&f);
}
END_TEST

/* ---- 22. discard during the mirror ------------------------------------ */

START_TEST(test_discard)
{
	enum blockmirror_mode mode = _i ? BLOCKMIRROR_MODE_ACTIVE
				       : BLOCKMIRROR_MODE_BACKGROUND;
	struct fx f;
	struct blockmirror_job_options o;
	struct blockmirror_job *job;
	unsigned char *model, back[4096];
	int r;

	fx_dir(&f);
	f.size = 4 * MiB;
	make_pattern_file(f.src, f.size, 0x5d);
	f.content = malloc(f.size);
	memset(f.content, 0x5d, f.size);
	fx_open_disk(&f);
	model = malloc(f.size);
	memcpy(model, f.content, f.size);
	o = fx_options(&f, mode);
	o.speed = 2 * MiB;
	o.buf_size = 256 * KiB;
	job = fx_start(&f, &o);
	wait_copying(job);
	r = blockmirror_disk_discard(f.disk, 64 * KiB, MiB);
	ck_assert_msg(r == 0, "discard: %s", blockmirror_last_error());
	memset(model + MiB, 0, 64 * KiB);
	ck_assert_int_eq(blockmirror_disk_read(f.disk, back, sizeof back,
					       MiB + 4096), 0);
	for (size_t i = 0; i < sizeof back; i++)
		ck_assert_msg(back[i] == 0, "a discarded range reads %02x",
			      back[i]);
	ck_assert_int_eq(blockmirror_job_set_speed(job, 0), 0);
	wait_state(job, BLOCKMIRROR_JOB_READY, WAIT_MS, "discard");
	r = blockmirror_job_complete(job);
	ck_assert_msg(r == 0, "complete: %s", blockmirror_last_error());
	blockmirror_job_free(job);
	fx_close_disk(&f);
	check_file(f.src, model, f.size, "the source");
	check_file(f.dst, model, f.size, "the destination");
	free(model);
	fx_fini(&f);
}
END_TEST

/* ---- 26. no probing of a raw destination ------------------------------ */

START_TEST(test_probed_destination)
{
	static const unsigned char qcow2[4] = { 'Q', 'F', 'I', 0xfb };
	static const unsigned char vhdx[8] = { 'v', 'h', 'd', 'x',
					       'f', 'i', 'l', 'e' };
	const unsigned char *magic = _i % 2 ? vhdx : qcow2;
	size_t magic_len = _i % 2 ? sizeof vhdx : sizeof qcow2;
	bool src_too = _i >= 2; /* the source carries the signature too */
	struct fx f;
	struct blockmirror_job_options o;
	struct blockmirror_job *job;
	unsigned char *before;
	uint64_t sz;
	int fd, r;

	fx_dir(&f);
	f.size = 3 * MiB;
	f.content = make_image(f.src, f.size, LAYOUT_HOLES, 260 + (uint64_t)_i);
	if (src_too) {
		fd = open(f.src, O_WRONLY);
		ck_assert_int_ge(fd, 0);
		ck_assert_int_eq(pwrite(fd, magic, magic_len, 0),
				 (ssize_t)magic_len);
		close(fd);
		memcpy(f.content, magic, magic_len);
	}
	fx_open_disk(&f);
	make_pattern_file(f.dst, f.size, 0);
	fd = open(f.dst, O_WRONLY);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(pwrite(fd, magic, magic_len, 0), (ssize_t)magic_len);
	close(fd);
	before = slurp(f.dst, &sz);

	o = fx_options(&f, BLOCKMIRROR_MODE_BACKGROUND);
	o.flags = 0;
	o.format = BLOCKMIRROR_FORMAT_AUTO;
	errno = 0;
	job = blockmirror_job_start(f.disk, f.dst, &o);
	ck_assert_msg(job == NULL, "a raw destination with a %s signature "
		      "was probed and accepted", _i % 2 ? "VHDX" : "qcow2");
	ck_assert_msg(errno == ENOTSUP || errno == EINVAL, "probing: errno "
		      "%d (%s)", errno, strerror(errno));
	check_file(f.dst, before, f.size, "the probed destination");

	o.format = BLOCKMIRROR_FORMAT_RAW;
	job = fx_start(&f, &o);
	wait_state(job, BLOCKMIRROR_JOB_READY, WAIT_MS, "explicit raw");
	r = blockmirror_job_complete(job);
	ck_assert_msg(r == 0, "complete: %s", blockmirror_last_error());
	blockmirror_job_free(job);
	fx_close_disk(&f);
	check_file(f.dst, f.content, f.size, "the destination");
	free(before);
	fx_fini(&f);
}
END_TEST

/* ---- 30. closing the disk while a job runs ---------------------------- */

/* _i = 0: copying, speed-limited; 1: READY; 2: paused. */
START_TEST(test_close_with_job)
{
	struct fx f;
	struct blockmirror_job_options o;
	struct blockmirror_job *job;
	double t0, took;
	int r, s;

	fx_init(&f, 16 * MiB, LAYOUT_FULL, 300 + (uint64_t)_i);
	o = fx_options(&f, BLOCKMIRROR_MODE_BACKGROUND);
	if (_i != 1)
		o.speed = 64 * KiB;
	job = fx_start(&f, &o);
	if (_i == 1) {
		wait_state(job, BLOCKMIRROR_JOB_READY, WAIT_MS, "ready");
	} else {
		wait_copying(job);
		sleep_ms(50);
	}
	if (_i == 2)
		ck_assert_int_eq(blockmirror_job_pause(job), 0);

	t0 = now_s();
	r = blockmirror_disk_close(f.disk);
	took = now_s() - t0;
	f.disk = NULL;
	ck_assert_msg(r == 0, "close: %s", blockmirror_last_error());
	ck_assert_msg(took < 5.0, "closing the disk took %.1f s", took);
	s = blockmirror_job_wait(job, BLOCKMIRROR_JOB_CANCELLED, 0);
	ck_assert_msg(s == BLOCKMIRROR_JOB_CANCELLED, "after close the job is "
		      "%s", state_name(s));
	ck_assert_int_eq(f.ev.cancelled, 1);
	ck_assert_int_eq(f.ev.completed + f.ev.failed, 0);
	blockmirror_job_free(job);
	check_file(f.src, f.content, f.size, "the source");
	fx_fini(&f);
}
END_TEST

/* ---- auto mode: background until it stops converging ----------------- */

/*
 * A guest dirtying 64 KiB chunks with 4 KiB writes faster than a
 * speed-limited background copy can clean them: the remaining work stops
 * shrinking, so auto mode must switch itself to active (MODE_CHANGED),
 * after which the job converges even under the same load.
 */
START_TEST(test_auto_mode)
{
	struct fx f;
	struct blockmirror_job_options o;
	struct blockmirror_job_info info;
	struct blockmirror_job *job;
	struct hammer h = { 0 };
	unsigned char *snap;
	int r;

	/* 4 MiB: the first half is copied in about two seconds, then the
	 * hammered second half keeps the remaining work from shrinking. */
	fx_init(&f, 4 * MiB, LAYOUT_FULL, 300);
	o = fx_options(&f, BLOCKMIRROR_MODE_AUTO);
	o.speed = 1 * MiB;
	h.disk = f.disk;
	h.size = f.size;
	job = fx_start(&f, &o);
	ck_assert_int_eq(pthread_create(&h.thread, NULL, hammer_main, &h), 0);
	for (int i = 0; i < 200 && !f.ev.mode_changed; i++)
		sleep_ms(100);
	ck_assert_msg(f.ev.mode_changed == 1, "auto mode did not switch to "
		      "active in 20 s");
	info = query(job);
	ck_assert_int_eq(info.mode, BLOCKMIRROR_MODE_ACTIVE);
	ck_assert(info.auto_mode);
	ck_assert_int_eq(blockmirror_job_set_speed(job, 0), 0);
	wait_state(job, BLOCKMIRROR_JOB_READY, WAIT_MS, "auto mode");
	atomic_store(&h.stop, true);
	pthread_join(h.thread, NULL);
	ck_assert_int_eq(atomic_load(&h.err), 0);
	snap = disk_snapshot(f.disk, f.size);
	r = blockmirror_job_complete(job);
	ck_assert_msg(r == 0, "complete: %s", blockmirror_last_error());
	blockmirror_job_free(job);
	fx_close_disk(&f);
	check_file(f.dst, snap, f.size, "the destination");
	free(snap);
	fx_fini(&f);
}
END_TEST

/* ---- the pivot's stall limit ------------------------------------------ */

/*
 * With max_stall_us, a pivot whose final copy would stall the guest
 * longer is refused with ETIMEDOUT and the job stays READY on the
 * source; once the remaining work is small the same pivot goes through.
 * The destination is slowed down (lib/fault.c) so that the pivot's own
 * copying before it stops the guest cannot clean everything first.
 */
START_TEST(test_max_stall)
{
	static struct bm_fault_rules rules;
	struct fx f;
	struct blockmirror_job_options o;
	struct blockmirror_job *job;
	unsigned char *buf = malloc(8 * MiB);
	char *img;
	int r;

	fx_init(&f, 32 * MiB, LAYOUT_FULL, 400);
	memset(&rules, 0, sizeof rules);
	ck_assert_int_eq(bm_fault_register(f.dst, &rules), 0);
	o = fx_options(&f, BLOCKMIRROR_MODE_BACKGROUND);
	o.max_stall_us = 1;
	job = fx_start(&f, &o);
	wait_state(job, BLOCKMIRROR_JOB_READY, WAIT_MS, "max stall");
	/* Background mode with the copy slowed to a crawl: 8 MiB of guest
	 * writes stay dirty. */
	memset(buf, 0x77, 8 * MiB);
	ck_assert_int_eq(blockmirror_job_set_speed(job, 1), 0);
	ck_assert_int_eq(blockmirror_disk_write(f.disk, buf, 8 * MiB, MiB, 0),
			 0);
	ck_assert_msg(query(job).dirty_bytes >= 7 * MiB, "the writes were "
		      "copied already");
	rules.write_delay_ns = 300 * 1000000ull;
	r = blockmirror_job_complete(job);
	ck_assert_msg(r == -ETIMEDOUT, "complete with 8 MiB dirty and a 1 us "
		      "stall limit returned %d (%s)", r,
		      r ? blockmirror_last_error() : "pivoted");
	ck_assert_int_eq(query(job).state, BLOCKMIRROR_JOB_READY);
	img = blockmirror_disk_get_image(f.disk);
	ck_assert_str_eq(img, f.src);
	free(img);
	/* Nothing dirty any more: the pivot copies nothing and proceeds. */
	rules.write_delay_ns = 0;
	ck_assert_int_eq(blockmirror_job_set_speed(job, 0), 0);
	for (int i = 0; i < 250 && query(job).bytes_remaining; i++)
		sleep_ms(20);
	ck_assert_int_eq(query(job).bytes_remaining, 0);
	r = blockmirror_job_complete(job);
	ck_assert_msg(r == 0, "complete when clean: %s",
		      blockmirror_last_error());
	memcpy(f.content + MiB, buf, 8 * MiB);
	blockmirror_job_free(job);
	fx_close_disk(&f);
	check_file(f.dst, f.content, f.size, "the destination");
	free(buf);
	bm_fault_unregister(f.dst);
	fx_fini(&f);
}
END_TEST

/* ---- main ------------------------------------------------------------- */

static void
add(Suite *s, const char *name, const TTest *t, int loops)
{
	TCase *tc = tcase_create(name);

	tcase_set_timeout(tc, 60);
	tcase_add_loop_test(tc, t, 0, loops);
	suite_add_tcase(s, tc);
}

int
main(void)
{
	Suite *s = suite_create("mirror-scenarios");

	add(s, "01-basic-pivot", test_basic_pivot, 3);
	add(s, "02-cancel-before-ready", test_cancel_before_ready, 2);
	add(s, "03-cancel-after-ready", test_cancel_after_ready, 2);
	add(s, "04-complete-before-ready", test_complete_before_ready, 1);
	add(s, "05-pause-resume", test_pause_resume, 1);
	add(s, "06-small-buffer", test_small_buffer_granularity,
	    (int)(sizeof good_grans / sizeof good_grans[0]));
	add(s, "06-bad-granularity", test_bad_granularity,
	    (int)(sizeof bad_grans / sizeof bad_grans[0]));
	add(s, "07-zero-length", test_zero_length, 1);
	add(s, "07-unaligned-length", test_unaligned_length, 2);
	add(s, "08-size-mismatch", test_size_mismatch, 2);
	add(s, "10-mirror-to-self", test_mirror_to_self, 1);
	add(s, "11-existing-garbage", test_existing_garbage, 2);
	add(s, "12-speed", test_speed, 1);
	add(s, "12-speed-low", test_speed_low, 1);
	add(s, "16-cancel-paused", test_cancel_paused, 3);
	add(s, "18-active-in-sync", test_active_in_sync, 1);
	add(s, "19-active-overlapping", test_active_overlapping, 1);
	add(s, "20-active-under-load", test_active_under_load, 1);
	add(s, "22-discard", test_discard, 2);
	add(s, "26-probed-destination", test_probed_destination, 4);
	add(s, "30-close-with-job", test_close_with_job, 3);
	add(s, "auto-mode", test_auto_mode, 1);
	add(s, "max-stall", test_max_stall, 1);

	return run_suite(s) ? EXIT_FAILURE : EXIT_SUCCESS;
}
