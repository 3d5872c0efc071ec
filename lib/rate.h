/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The rate limiter of a bulk copy: the mirror job's (mirror.c) and the
 * offline copy's (offline.c).  A copy asks bm_rate_allows() before it
 * issues a request and counts what it sends with bm_rate_account(); the
 * limiter never sleeps: when it says no, the copy waits for a timer on
 * its loop (bm_rate_delay_ns says how long) and asks again.
 *
 * Accounting runs in windows of about a second.  bm_rate_roll() starts a
 * new one, carrying over what was sent beyond the allowance (a request
 * larger than the remaining allowance) but not unused allowance, so a
 * pause or an idle stretch never turns into a burst.  All arithmetic
 * saturates: any speed up to UINT64_MAX is accepted.
 *
 * Times are monotonic nanoseconds (bm_now_ns); nothing here reads the
 * clock, so the rules are tested with made-up times (test-rate.c).
 */
#ifndef BM_RATE_H
#define BM_RATE_H

#include <stdbool.h>
#include <stdint.h>

#include "internal.h"

#define BM_RATE_WINDOW_NS UINT64_C(1000000000)

struct bm_rate {
	uint64_t speed;    /* bytes/s, 0: unlimited */
	uint64_t start_ns; /* start of the accounting window */
	uint64_t bytes;    /* sent in this window */
};

/* A new limit (0: none), with a fresh window from `now`. */
static inline void
bm_rate_set(struct bm_rate *r, uint64_t speed, uint64_t now)
{
	r->speed = speed;
	r->start_ns = now;
	r->bytes = 0;
}

/* Bytes the window allows by `now`. */
static inline uint64_t
bm_rate_allowance(const struct bm_rate *r, uint64_t now)
{
	uint64_t us = now > r->start_ns ? (now - r->start_ns) / 1000 : 0;
	uint64_t b;

	if (bm_mul_overflow(us, r->speed, &b))
		return UINT64_MAX;
	return b / 1000000u;
}

/* May the copy send more now? */
static inline bool
bm_rate_allows(const struct bm_rate *r, uint64_t now)
{
	return !r->speed || r->bytes <= bm_rate_allowance(r, now);
}

static inline void
bm_rate_account(struct bm_rate *r, uint64_t bytes)
{
	if (bm_add_overflow(r->bytes, bytes, &r->bytes))
		r->bytes = UINT64_MAX;
}

/* Start a new window once the current one is a second old. */
static inline void
bm_rate_roll(struct bm_rate *r, uint64_t now)
{
	if (!r->speed || now < r->start_ns ||
	    now - r->start_ns <= BM_RATE_WINDOW_NS)
		return;
	r->bytes -= BM_MIN(r->bytes, bm_rate_allowance(r, now));
	r->start_ns = now;
}

/* Nanoseconds until the copy may send again (0: now), at most a window. */
static inline uint64_t
bm_rate_delay_ns(const struct bm_rate *r, uint64_t now)
{
	uint64_t rem, frac, due, elapsed;

	if (bm_rate_allows(r, now))
		return 0;
	/* The allowance reaches r->bytes after bytes / speed seconds:
	 * `due` in microseconds, then in nanoseconds. */
	rem = r->bytes % r->speed;
	if (bm_mul_overflow(rem, 1000000u, &frac))
		frac = rem / (r->speed / 1000000u); /* speed > 18 TB/s */
	else
		frac /= r->speed;
	if (bm_mul_overflow(r->bytes / r->speed, 1000000u, &due) ||
	    bm_add_overflow(due, frac + 1, &due) ||
	    bm_mul_overflow(due, 1000u, &due))
		return BM_RATE_WINDOW_NS;
	elapsed = now > r->start_ns ? now - r->start_ns : 0;
	if (due <= elapsed)
		return 1000; /* rounding: a microsecond */
	return BM_MIN(due - elapsed, BM_RATE_WINDOW_NS);
}

/*
 * The largest request to issue: `max`, or under a limit about a tenth of
 * a second's worth (keeps the rate smooth), rounded down to `unit` (a
 * power of two) and at least `unit`; never more than `max`.
 */
static inline uint64_t
bm_rate_request_max(const struct bm_rate *r, uint64_t max, uint64_t unit)
{
	if (!r->speed)
		return max;
	return BM_MIN(max, BM_MAX(unit, bm_round_down(r->speed / 10, unit)));
}

#endif /* BM_RATE_H */
