/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The event loop: one io_uring ring, plus an eventfd through which other
 * threads post work.  Everything attached to a loop (stores, images, the
 * disk, its job, server connections) is touched only by the thread that is
 * running the loop at the moment, so none of it needs locks.
 *
 * An operation is a `struct bm_op` embedded in the caller's own state; its
 * callback runs on the loop thread with the result (a byte count or a
 * negative errno).  Callbacks never run inside the call that started the
 * operation: results known at once are delivered through bm_loop_defer on
 * the next turn of the loop.  That rule keeps every caller free of
 * re-entrancy.
 */
#ifndef BM_LOOP_H
#define BM_LOOP_H

#include <stdbool.h>
#include <stdint.h>

#include <liburing.h>

struct bm_loop;
struct bm_op;

typedef void (*bm_op_fn)(struct bm_op *op, int res);

struct bm_op {
	bm_op_fn fn;
	struct bm_op *next; /* deferred queue */
	int res;
};

/* Work posted from another thread; runs on the loop thread. */
struct bm_work {
	void (*fn)(struct bm_work *w);
	struct bm_work *next;
};

/* A one-shot timer. */
struct bm_timer {
	struct bm_op op; /* res: -ETIME when it fires, -ECANCELED */
	struct __kernel_timespec ts;
	bool armed;
};

/* Create a loop with a ring of `entries` submission slots.  0 or -errno. */
int bm_loop_new(unsigned entries, struct bm_loop **out);

/* Free the loop.  Nothing may be in flight.  Accepts NULL. */
void bm_loop_free(struct bm_loop *loop);

/*
 * A submission slot for `op`, submitting queued ones first if the ring is
 * full.  Never NULL.  The caller fills it with io_uring_prep_*; user data
 * is already set, and the op counts as in flight until its callback.
 */
struct io_uring_sqe *bm_loop_sqe(struct bm_loop *loop, struct bm_op *op,
				 bm_op_fn fn);

/* Complete op with res on the next turn of the loop. */
void bm_loop_defer(struct bm_loop *loop, struct bm_op *op, bm_op_fn fn,
		   int res);

/* Arm a timer to fire after `ns` nanoseconds. */
void bm_loop_timer_start(struct bm_loop *loop, struct bm_timer *t,
			 uint64_t ns, bm_op_fn fn);

/* Cancel an armed timer; its callback still runs (with -ECANCELED). */
void bm_loop_timer_cancel(struct bm_loop *loop, struct bm_timer *t);

/*
 * Post work from any thread.  Thread-safe, never blocks on the loop.  The
 * work struct must stay valid until its fn has run.
 */
void bm_loop_post(struct bm_loop *loop, struct bm_work *w);

/*
 * One turn: submit what is queued, wait up to timeout_ms for at least one
 * event (-1: no limit; 0: do not wait) unless something is already ready,
 * then run every callback that is ready.  Returns the number of callbacks
 * run, or a negative errno from io_uring.
 */
int bm_loop_run_once(struct bm_loop *loop, int timeout_ms);

/* Turn the loop until *done becomes true.  0 or a negative errno. */
int bm_loop_run_until(struct bm_loop *loop, const bool *done);

/* The fd to poll for POLLIN when the caller runs the loop (the ring's). */
int bm_loop_fd(const struct bm_loop *loop);

/*
 * Count work that another thread will post back (a worker's answer) as
 * in flight, so that bm_loop_run_until waits for it.  Loop thread only;
 * every hold is matched by one unhold.
 */
void bm_loop_hold(struct bm_loop *loop);
void bm_loop_unhold(struct bm_loop *loop);

/* Operations in flight (timers included, the wake poll not). */
unsigned bm_loop_inflight(const struct bm_loop *loop);

#endif /* BM_LOOP_H */
