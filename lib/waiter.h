/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * A one-shot rendezvous between a thread blocked in a public call and the
 * loop thread that finishes the work: signal once with a result, wait
 * for it.  Error messages are per thread, so a failure's message travels
 * with the result: the signalling thread's last error is copied in, and
 * bm_waiter_wait sets it as the waiting thread's last error.  A waiter
 * may also stand for the end of something that others wait for, each
 * with a time limit (bm_waiter_wait_ms): signalled once, it stays done.
 * Such a waiter can have an eventfd (`fd`) for poll(2) users, written in
 * the same locked step that marks it done, so that whoever sees one of
 * the two also finds the other.
 */
#ifndef BM_WAITER_H
#define BM_WAITER_H

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

#include "errors.h"

struct bm_waiter {
	pthread_mutex_t lock;
	pthread_cond_t cond;
	bool done;
	int err;
	int fd;           /* an eventfd written when signalled, or -1 */
	char msg[512];
};

static inline void
bm_waiter_init(struct bm_waiter *w)
{
	pthread_mutex_init(&w->lock, NULL);
	pthread_cond_init(&w->cond, NULL);
	w->done = false;
	w->err = 0;
	w->fd = -1;
	w->msg[0] = '\0';
}

static inline void
bm_waiter_destroy(struct bm_waiter *w)
{
	pthread_cond_destroy(&w->cond);
	pthread_mutex_destroy(&w->lock);
}

static inline void
bm_waiter_signal(struct bm_waiter *w, int err)
{
	const char *m = err < 0 ? blockmirror_last_error() : NULL;

	pthread_mutex_lock(&w->lock);
	if (m)
		snprintf(w->msg, sizeof w->msg, "%s", m);
	w->err = err;
	w->done = true;
	if (w->fd >= 0) {
		uint64_t one = 1;

		if (write(w->fd, &one, sizeof one) < 0) {
			/* Cannot fail: the counter is far from saturated. */
		}
	}
	pthread_cond_broadcast(&w->cond);
	pthread_mutex_unlock(&w->lock);
}

static inline bool
bm_waiter_done(struct bm_waiter *w)
{
	bool d;

	pthread_mutex_lock(&w->lock);
	d = w->done;
	pthread_mutex_unlock(&w->lock);
	return d;
}

/* The CLOCK_REALTIME instant timeout_ms from now (pthread_cond_timedwait). */
static inline void
bm_deadline(struct timespec *ts, int timeout_ms)
{
	clock_gettime(CLOCK_REALTIME, ts);
	ts->tv_sec += timeout_ms / 1000;
	ts->tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
	if (ts->tv_nsec >= 1000000000L) {
		ts->tv_sec++;
		ts->tv_nsec -= 1000000000L;
	}
}

/*
 * Wait at most timeout_ms (-1: no limit) for the signal; its result, or
 * -ETIMEDOUT (no message set) if it has not come.
 */
static inline int
bm_waiter_wait_ms(struct bm_waiter *w, int timeout_ms)
{
	struct timespec deadline;
	int err = -ETIMEDOUT;
	bool done;

	if (timeout_ms >= 0)
		bm_deadline(&deadline, timeout_ms);
	pthread_mutex_lock(&w->lock);
	while (!w->done) {
		if (timeout_ms < 0)
			pthread_cond_wait(&w->cond, &w->lock);
		else if (pthread_cond_timedwait(&w->cond, &w->lock,
						&deadline) == ETIMEDOUT)
			break;
	}
	done = w->done;
	if (done)
		err = w->err;
	pthread_mutex_unlock(&w->lock);
	if (done && err < 0 && w->msg[0])
		bm_error(err, "%s", w->msg);
	return err;
}

static inline int
bm_waiter_wait(struct bm_waiter *w)
{
	return bm_waiter_wait_ms(w, -1);
}

#endif /* BM_WAITER_H */
