/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Marks of a change tracker (lib/cbt.h) and their waiters, shared by the
 * tests of the sidecar (test-cbt.c) and of the record in a qcow2 image
 * (test-qcow2-bitmap.c): a mark is done once bm_cbt_mark said "durable
 * already" or its waiter ran; with `recording` on, that acknowledgement
 * is a crash recorder event (recorder.h), so a crash point knows which
 * marks a guest may have seen acknowledged.  One thread.
 */
#ifndef BM_TEST_CBT_MARKS_H
#define BM_TEST_CBT_MARKS_H

#include <check.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cbt.h"
#include "internal.h"
#include "recorder.h"

struct mark {
	struct bm_cbt_waiter w;
	uint64_t off, len;
	int err;
	bool done;
	uint64_t ack;              /* recorder event, with the recorder on */
};

static int marks_left;
static bool recording;

static void
mark_done(struct bm_cbt_waiter *w, int err)
{
	struct mark *m = bm_container_of(w, struct mark, w);

	ck_assert(!m->done);
	m->err = err;
	m->done = true;
	if (recording)
		m->ack = rec_event("ack mark %" PRIu64 "+%" PRIu64, m->off,
				   m->len);
	marks_left--;
}

/* Mark; returns what bm_cbt_mark did, completing m at once for 0. */
static int
issue(struct bm_cbt *cbt, struct mark *m, uint64_t off, uint64_t len)
{
	int r;

	memset(m, 0, sizeof *m);
	m->w.fn = mark_done;
	m->off = off;
	m->len = len;
	marks_left++;
	r = bm_cbt_mark(cbt, off, len, &m->w);
	if (r <= 0) {
		marks_left--;
		m->err = r;
		m->done = true;
		if (recording && r == 0)
			m->ack = rec_event("ack mark %" PRIu64 "+%" PRIu64
					   " (durable already)", off, len);
	}
	return r;
}

/* Turn the loop until every mark issued is done. */
static void
wait_marks(struct bm_loop *loop)
{
	while (marks_left > 0)
		ck_assert_int_ge(bm_loop_run_once(loop, -1), 0);
}

/* The seed from environment variable `var`, or the time; printed. */
static uint64_t
seed_from_env(const char *var, const char *who)
{
	const char *s = getenv(var);
	uint64_t seed = s ? strtoull(s, NULL, 0) : (uint64_t)time(NULL);

	printf("%s: seed %" PRIu64 " (%s=%" PRIu64 " replays it)\n", who,
	       seed, var, seed);
	fflush(stdout);
	return seed;
}

/* End a recording: every mark of m[0..n) must have succeeded. */
static void
stop_recording(const struct mark *m, size_t n)
{
	recording = false;
	rec_stop();
	for (size_t i = 0; i < n; i++)
		ck_assert_int_eq(m[i].err, 0);
}

/* Replay a crash right before every event of the recording, in each
 * variant, and check what it left; returns the number of points. */
static uint64_t
replay_crash_points(void (*check)(uint64_t k, int variant), uint64_t *rng)
{
	uint64_t total = rec_now(), checked = 0;

	for (uint64_t k = 0; k <= total; k++) {
		for (int v = 0; v < REC_VARIANTS; v++) {
			ck_assert_int_eq(rec_materialize(k, (enum rec_variant)v,
							 rng), 0);
			check(k, v);
			checked++;
		}
	}
	return checked;
}

#endif /* BM_TEST_CBT_MARKS_H */
