/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The randomized model test of the mirror job (DESIGN.md rules 1-9).
 *
 * Several guest threads issue random writes, write-zeroes, discards,
 * flushes and read-backs (1 byte to 4 MiB, unaligned, overlapping over
 * time) through a blockmirror_disk while a job moves it, and keep a
 * byte-for-byte model of what the guest has been told is on the disk.
 * Two guest requests never overlap while both are in flight (a range
 * lock), as a real guest that cares about its data behaves; everything
 * else about their timing is left to the threads.  Meanwhile a controller
 * pauses, resumes, switches modes and speeds, and ends the job with a
 * pivot, a cancel after READY, or a forced cancel, at random moments.
 *
 * Afterwards: the disk reads back as the model; after a pivot the
 * destination file equals the model and the disk runs on it; after a
 * cancel the source file equals the model, and after a cancel after READY
 * (with the guests stopped first) so does the destination.  In active
 * mode the remaining work must never grow once mapping is done.
 *
 * Each iteration's seed is its index, so a failure is repeatable with
 * CK_RUN_CASE and the iteration number printed in the message.
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

#include "helpers.h"

#define GUESTS 4
#define MiB (1u << 20)

static int iterations = 24;

/* ---- the shared model and the range lock ----------------------------- */

struct model {
	unsigned char *bytes;
	uint64_t size;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	uint64_t held_off[GUESTS];
	uint64_t held_len[GUESTS];
	atomic_ulong discards;  /* discards started and finished: each */
	atomic_int discarding;  /* may add work; in flight now */
};

static void
range_lock(struct model *m, int who, uint64_t off, uint64_t len)
{
	pthread_mutex_lock(&m->lock);
	for (;;) {
		bool clash = false;

		for (int i = 0; i < GUESTS; i++)
			if (i != who && m->held_len[i] &&
			    off < m->held_off[i] + m->held_len[i] &&
			    m->held_off[i] < off + len)
				clash = true;
		if (!clash)
			break;
		pthread_cond_wait(&m->cond, &m->lock);
	}
	m->held_off[who] = off;
	m->held_len[who] = len ? len : 1;
	pthread_mutex_unlock(&m->lock);
}

static void
range_unlock(struct model *m, int who)
{
	pthread_mutex_lock(&m->lock);
	m->held_len[who] = 0;
	pthread_cond_broadcast(&m->cond);
	pthread_mutex_unlock(&m->lock);
}

/* ---- guests ---------------------------------------------------------- */

struct guest {
	pthread_t thread;
	int id;
	uint64_t seed;
	struct blockmirror_disk *disk;
	struct model *m;
	atomic_bool *stop;
	char failure[256];
	unsigned long ops;
};

static uint64_t
pick_length(uint64_t *s, uint64_t size)
{
	uint64_t len;

	switch (rnd_range(s, 4)) {
	case 0:
		len = 1 + rnd_range(s, 512);
		break;
	case 1:
		len = 1 + rnd_range(s, 64 * 1024);
		break;
	case 2:
		len = 4096 * (1 + rnd_range(s, 64));
		break;
	default:
		len = 1 + rnd_range(s, 4 * MiB);
		break;
	}
	return len > size ? size : len;
}

static void *
guest_main(void *arg)
{
	struct guest *g = arg;
	struct model *m = g->m;
	unsigned char *buf = malloc(4 * MiB), *back = malloc(4 * MiB);
	uint64_t s = g->seed;

	while (!atomic_load(g->stop) && !g->failure[0]) {
		uint64_t len = pick_length(&s, m->size);
		uint64_t off = rnd_range(&s, m->size - len + 1);
		unsigned kind = (unsigned)rnd_range(&s, 20);
		int r = 0;

		range_lock(m, g->id, off, len);
		if (kind < 11) { /* write */
			for (uint64_t i = 0; i < len; i++)
				buf[i] = (unsigned char)rnd(&s);
			r = blockmirror_disk_write(g->disk, buf, len, off,
						   kind == 0 ? BLOCKMIRROR_REQ_FUA
							     : 0);
			if (r == 0)
				memcpy(m->bytes + off, buf, len);
		} else if (kind < 14) { /* write zeroes */
			r = blockmirror_disk_write_zeroes(g->disk, len, off,
				kind == 11 ? BLOCKMIRROR_REQ_MAY_TRIM : 0);
			if (r == 0)
				memset(m->bytes + off, 0, len);
		} else if (kind < 16) { /* discard (reads back as zero on raw) */
			atomic_fetch_add(&m->discarding, 1);
			atomic_fetch_add(&m->discards, 1);
			r = blockmirror_disk_discard(g->disk, len, off);
			atomic_fetch_add(&m->discards, 1);
			atomic_fetch_sub(&m->discarding, 1);
			if (r == 0)
				memset(m->bytes + off, 0, len);
		} else if (kind < 17) {
			r = blockmirror_disk_flush(g->disk);
		} else { /* read back */
			r = blockmirror_disk_read(g->disk, back, len, off);
			if (r == 0 && memcmp(back, m->bytes + off, len) != 0) {
				uint64_t i = 0;

				while (back[i] == m->bytes[off + i])
					i++;
				snprintf(g->failure, sizeof g->failure,
					 "guest %d: read at %llu+%llu differs "
					 "from the model at %llu", g->id,
					 (unsigned long long)off,
					 (unsigned long long)len,
					 (unsigned long long)(off + i));
			}
		}
		range_unlock(m, g->id);
		if (r < 0)
			snprintf(g->failure, sizeof g->failure,
				 "guest %d: request failed: %s", g->id,
				 blockmirror_last_error());
		g->ops++;
	}
	free(buf);
	free(back);
	return NULL;
}

/* ---- helpers --------------------------------------------------------- */

static void
write_file(const char *path, const unsigned char *data, uint64_t size,
	   uint64_t *seed)
{
	int fd = open(path, O_CREAT | O_TRUNC | O_WRONLY, 0644);

	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(ftruncate(fd, (off_t)size), 0);
	/* Data in some 1 MiB extents, holes in the rest. */
	for (uint64_t off = 0; off < size; off += MiB) {
		uint64_t n = size - off < MiB ? size - off : MiB;

		if (rnd_range(seed, 3) == 0)
			continue;
		ck_assert_int_eq(pwrite(fd, data + off, n, (off_t)off),
				 (ssize_t)n);
	}
	close(fd);
}

static void
check_file(const char *path, const unsigned char *want, uint64_t size,
	   const char *what, int iter, const char *params)
{
	unsigned char *got = malloc(size ? size : 1);
	int fd = open(path, O_RDONLY);
	uint64_t i = 0;
	struct stat st;

	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(fstat(fd, &st), 0);
	ck_assert_msg((uint64_t)st.st_size == size, "iteration %d: %s has "
		      "%lld bytes, want %llu", iter, what,
		      (long long)st.st_size, (unsigned long long)size);
	ck_assert_int_eq(pread(fd, got, size, 0), (ssize_t)size);
	close(fd);
	while (i < size && got[i] == want[i])
		i++;
	if (i < size) {
		uint64_t j = i;

		while (j < size && got[j] != want[j])
			j++;
		ck_abort_msg("iteration %d (%s): %s differs from the model "
			     "at bytes %llu..%llu (got %02x want %02x)", iter,
			     params, what, (unsigned long long)i,
			     (unsigned long long)j, got[i], want[i]);
	}
	free(got);
}

/* Zero the model where the source file has holes; fill the rest. */
static void
model_from_file(const char *path, unsigned char *model, uint64_t size)
{
	int fd = open(path, O_RDONLY);

	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(pread(fd, model, size, 0), (ssize_t)size);
	close(fd);
}

/* ---- one iteration --------------------------------------------------- */

enum ending { END_PIVOT, END_SYNC_CANCEL, END_FORCE_CANCEL, END_COUNT };

START_TEST(test_model)
{
	static const uint64_t grans[] = { 4096, 65536, MiB };
	uint64_t seed = (uint64_t)_i * 7919 + 1;
	uint64_t size = (4 + rnd_range(&seed, 13)) * MiB + rnd_range(&seed, 3) *
			(rnd_range(&seed, 4096) + 1);
	enum blockmirror_mode mode = (enum blockmirror_mode)(_i % 3);
	enum ending ending = (enum ending)((_i / 3) % END_COUNT);
	char dir[] = "/tmp/test-mirror.XXXXXX", src[64], dst[64];
	struct blockmirror_job_options o = { .size = sizeof o };
	struct blockmirror_job_info info = { .size = sizeof info };
	struct events ev = { 0 };
	struct guest guests[GUESTS];
	struct model m;
	struct blockmirror_disk *disk;
	struct blockmirror_job *job;
	atomic_bool stop = false;
	uint64_t last_remaining = UINT64_MAX;
	unsigned long last_discards = 0;
	char *img, params[160];
	int r, state;
	bool pivoted = false, synced = false, early_pivot = false;

	ck_assert_ptr_nonnull(mkdtemp(dir));
	snprintf(src, sizeof src, "%s/src", dir);
	snprintf(dst, sizeof dst, "%s/dst", dir);
	m.size = size;
	m.bytes = malloc(size);
	for (uint64_t i = 0; i < size; i++)
		m.bytes[i] = (unsigned char)rnd(&seed);
	write_file(src, m.bytes, size, &seed);
	model_from_file(src, m.bytes, size);
	pthread_mutex_init(&m.lock, NULL);
	pthread_cond_init(&m.cond, NULL);
	memset(m.held_len, 0, sizeof m.held_len);

	disk = blockmirror_disk_open(src, BLOCKMIRROR_FORMAT_RAW, 0);
	ck_assert_msg(disk != NULL, "%s", blockmirror_last_error());
	ck_assert_int_eq(blockmirror_disk_start_thread(disk), 0);

	o.flags = BLOCKMIRROR_JOB_CREATE;
	o.mode = mode;
	o.granularity = grans[rnd_range(&seed, 3)];
	o.buf_size = rnd_range(&seed, 3) == 0 ? 4096 : 0;
	o.requests = rnd_range(&seed, 3) == 0 ? 1 : 0;
	o.on_event = on_event;
	o.event_data = &ev;
	if (rnd_range(&seed, 4) == 0)
		o.speed = 64 * MiB;
	snprintf(params, sizeof params, "mode %d ending %d size %llu gran %llu "
		 "buf %u req %u speed %llu", mode, ending,
		 (unsigned long long)size, (unsigned long long)o.granularity,
		 o.buf_size, o.requests, (unsigned long long)o.speed);

	for (int i = 0; i < GUESTS; i++) {
		guests[i] = (struct guest){ .id = i, .disk = disk, .m = &m,
					    .stop = &stop,
					    .seed = seed * 31 + (uint64_t)i };
		pthread_create(&guests[i].thread, NULL, guest_main, &guests[i]);
	}
	sleep_ms((unsigned)rnd_range(&seed, 30));

	job = blockmirror_job_start(disk, dst, &o);
	ck_assert_msg(job != NULL, "iteration %d: %s", _i,
		      blockmirror_last_error());

	/* Random interference until READY. */
	for (int step = 0; step < 2000; step++) {
		unsigned long discards = atomic_load(&m.discards);

		ck_assert_int_eq(blockmirror_job_query(job, &info), 0);
		/* A discard reaches the source alone and dirties its chunks
		 * (mirror.c, rule 5): only writes never add work. */
		if (discards != last_discards ||
		    atomic_load(&m.discarding) > 0)
			last_remaining = UINT64_MAX;
		last_discards = discards;
		if (mode == BLOCKMIRROR_MODE_ACTIVE &&
		    info.state != BLOCKMIRROR_JOB_MAPPING &&
		    info.state != BLOCKMIRROR_JOB_PAUSED) {
			ck_assert_msg(info.bytes_remaining <= last_remaining,
				      "iteration %d: remaining grew from %llu "
				      "to %llu in active mode", _i,
				      (unsigned long long)last_remaining,
				      (unsigned long long)info.bytes_remaining);
			last_remaining = info.bytes_remaining;
		}
		if (info.state == BLOCKMIRROR_JOB_READY && step > 3)
			break;
		switch (rnd_range(&seed, 40)) {
		case 0:
			if (blockmirror_job_pause(job) == 0) {
				sleep_ms(5);
				ck_assert_int_eq(blockmirror_job_resume(job), 0);
			}
			break;
		case 1:
			if (mode == BLOCKMIRROR_MODE_BACKGROUND)
				blockmirror_job_set_mode(job,
					BLOCKMIRROR_MODE_ACTIVE);
			break;
		case 2:
			if (mode != BLOCKMIRROR_MODE_ACTIVE)
				blockmirror_job_set_mode(job,
					BLOCKMIRROR_MODE_BACKGROUND);
			break;
		case 3:
			blockmirror_job_set_speed(job, 0);
			break;
		case 4:
			/* Not ready yet: a pivot must be refused (unless the
			 * job got ready since the query: then it pivots). */
			if (info.state == BLOCKMIRROR_JOB_COPYING &&
			    ending == END_PIVOT) {
				r = blockmirror_job_complete(job);
				if (r == 0)
					early_pivot = true;
				else
					ck_assert_int_eq(r, -EBUSY);
			}
			break;
		default:
			break;
		}
		if (early_pivot)
			break;
		if (ending == END_FORCE_CANCEL && rnd_range(&seed, 50) == 0)
			break; /* cancel at a random moment, ready or not */
		sleep_ms(2);
	}
	/* Speed limits or background mode under load may not converge on
	 * their own in time: active mode does. */
	if (ending != END_FORCE_CANCEL && !early_pivot) {
		blockmirror_job_set_speed(job, 0);
		blockmirror_job_set_mode(job, BLOCKMIRROR_MODE_ACTIVE);
		state = blockmirror_job_wait(job, BLOCKMIRROR_JOB_READY, 60000);
		ck_assert_msg(state == BLOCKMIRROR_JOB_READY, "iteration %d: "
			      "not ready (%d): %s", _i, state,
			      blockmirror_last_error());
		ck_assert_int_ge(ev.ready, 1);
	}

	switch (ending) {
	case END_PIVOT:
		r = early_pivot ? 0 : blockmirror_job_complete(job);
		ck_assert_msg(r == 0, "iteration %d: pivot: %s", _i,
			      blockmirror_last_error());
		pivoted = true;
		break;
	case END_SYNC_CANCEL:
		/* A point-in-time copy: stop the guests so the moment is
		 * known, then cancel. */
		atomic_store(&stop, true);
		for (int i = 0; i < GUESTS; i++)
			pthread_join(guests[i].thread, NULL);
		r = blockmirror_job_cancel(job, false);
		ck_assert_msg(r == 0, "iteration %d: cancel: %s", _i,
			      blockmirror_last_error());
		synced = true;
		break;
	default:
		r = blockmirror_job_cancel(job, true);
		ck_assert_msg(r == 0, "iteration %d: cancel: %s", _i,
			      blockmirror_last_error());
		break;
	}
	if (!synced) {
		sleep_ms((unsigned)rnd_range(&seed, 50));
		atomic_store(&stop, true);
		for (int i = 0; i < GUESTS; i++)
			pthread_join(guests[i].thread, NULL);
	}
	for (int i = 0; i < GUESTS; i++)
		ck_assert_msg(!guests[i].failure[0], "iteration %d: %s", _i,
			      guests[i].failure);

	ck_assert_int_eq(blockmirror_job_query(job, &info), 0);
	if (pivoted) {
		ck_assert_int_eq(info.state, BLOCKMIRROR_JOB_COMPLETED);
		ck_assert_int_eq(ev.completed, 1);
	} else if (synced) {
		ck_assert_int_eq(info.state, BLOCKMIRROR_JOB_COMPLETED);
	} else {
		ck_assert_int_eq(info.state, BLOCKMIRROR_JOB_CANCELLED);
		ck_assert_int_eq(ev.cancelled, 1);
	}
	ck_assert_int_eq(ev.failed, 0);
	ck_assert_int_eq(ev.errors, 0);
	blockmirror_job_free(job);

	/* The guest's view. */
	{
		unsigned char *back = malloc(size);

		ck_assert_int_eq(blockmirror_disk_read(disk, back, size, 0), 0);
		for (uint64_t i = 0; i < size; i++)
			if (back[i] != m.bytes[i])
				ck_abort_msg("iteration %d (%s): the disk "
					     "differs from the model at %llu",
					     _i, params, (unsigned long long)i);
		free(back);
	}
	img = blockmirror_disk_get_image(disk);
	ck_assert_str_eq(img, pivoted ? dst : src);
	free(img);
	ck_assert_int_eq(blockmirror_disk_close(disk), 0);

	/* The files. */
	if (pivoted) {
		check_file(dst, m.bytes, size, "the destination", _i, params);
	} else {
		check_file(src, m.bytes, size, "the source", _i, params);
		if (synced)
			check_file(dst, m.bytes, size, "the destination", _i, params);
	}
	unlink(src);
	unlink(dst);
	rmdir(dir);
	free(m.bytes);
}
END_TEST

int
main(void)
{
	Suite *s = suite_create("mirror");
	TCase *tc = tcase_create("model");
	const char *env = getenv("BM_MODEL_ITERATIONS");

	if (env && atoi(env) > 0)
		iterations = atoi(env);
	tcase_set_timeout(tc, 120);
	env = getenv("BM_MODEL_ONLY");
	if (env)
		tcase_add_loop_test(tc, test_model, atoi(env), atoi(env) + 1);
	else
		tcase_add_loop_test(tc, test_model, 0, iterations);
	suite_add_tcase(s, tc);
	return run_suite(s) ? EXIT_FAILURE : EXIT_SUCCESS;
}
