/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * A one-shot rendezvous between a thread blocked in a public call and the
 * loop thread that finishes the work: signal once with a result, wait
 * for it.  Error messages are per thread, so a failure's message travels
 * with the result: the signalling thread's last error is copied in, and
 * bm_waiter_wait sets it as the waiting thread's last error.
 */
#ifndef BM_WAITER_H
#define BM_WAITER_H

#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>

#include "errors.h"

struct bm_waiter {
	pthread_mutex_t lock;
	pthread_cond_t cond;
	bool done;
	int err;
	char msg[512];
};

static inline void
bm_waiter_init(struct bm_waiter *w)
{
	pthread_mutex_init(&w->lock, NULL);
	pthread_cond_init(&w->cond, NULL);
	w->done = false;
	w->err = 0;
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

static inline int
bm_waiter_wait(struct bm_waiter *w)
{
	int err;

	pthread_mutex_lock(&w->lock);
	while (!w->done)
		pthread_cond_wait(&w->cond, &w->lock);
	err = w->err;
	pthread_mutex_unlock(&w->lock);
	if (err < 0 && w->msg[0])
		bm_error(err, "%s", w->msg);
	return err;
}

#endif /* BM_WAITER_H */
