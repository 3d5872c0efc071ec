/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The copy handle (blockmirror_copy_start and friends): the offline copy
 * of offline-copy.c on a library thread of its own, watched and steered
 * from other threads.
 *
 * blockmirror_copy_start opens the copy on the caller's thread, so every
 * error found before copying is the caller's at once, then hands the
 * copy, its loop and its images to a new thread, which runs it and
 * touches it alone from then on.  Other threads reach it the way they
 * reach a disk's loop: a struct bm_call posted to the loop (bm_call_post)
 * and waited for.
 *
 * The one race is the end: the thread stops running the loop, so no call
 * may be posted after it has stopped looking.  Under `lock`, a caller
 * posts only while `accepting`, and counts what it posts; the thread,
 * once the copy has ended, clears `accepting` and runs the loop until it
 * has served every call counted (a control call served then finds the
 * copy ended).  After that calls are answered from the final state,
 * without the loop: the counters no longer change.
 *
 * The end is published in this order: the destination removed if the
 * copy failed, the images and the loop closed, the state set, then in
 * one step the `end` waiter signalled (blockmirror_copy_wait) and its
 * eventfd written.  So whoever learns of the end by any of them sees
 * everything done.
 */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "disk.h"
#include "errors.h"
#include "internal.h"
#include "offline-copy.h"
#include "waiter.h"

enum copy_op { OP_QUERY, OP_SET_SPEED, OP_PAUSE, OP_RESUME, OP_CANCEL };

struct blockmirror_copy {
	struct bm_offline_copy oc;     /* the copy's thread only */
	pthread_t thread;
	struct bm_waiter end;          /* signalled once, with the result;
					  end.fd: the event fd */

	pthread_mutex_t lock;
	bool accepting;                /* the loop still serves calls */
	unsigned posted;               /* calls posted to it */
	enum blockmirror_copy_state state; /* final once !accepting and
					      `end` is done */
	int result;

	unsigned served;               /* the copy's thread only */
	bool ended;                    /* likewise: control calls refused */
};

/* The copy whose thread this is, to refuse its own blocking calls. */
static _Thread_local struct blockmirror_copy *this_thread_copy;

static const char *const state_names[] = {
	[BLOCKMIRROR_COPY_RUNNING] = "running",
	[BLOCKMIRROR_COPY_PAUSED] = "paused",
	[BLOCKMIRROR_COPY_DONE] = "done",
	[BLOCKMIRROR_COPY_FAILED] = "failed",
	[BLOCKMIRROR_COPY_CANCELLED] = "cancelled",
};

BM_EXPORT const char *
blockmirror_copy_state_name(enum blockmirror_copy_state state)
{
	return BM_NAME_OF(state_names, state);
}

/* ---- the copy's thread ------------------------------------------------ */

static void
call_op(struct bm_call *call)
{
	struct blockmirror_copy *cp = call->arg;
	struct bm_offline_copy *oc = &cp->oc;
	int r = 0;

	cp->served++;
	if (cp->ended && call->i != OP_QUERY) {
		r = bm_error(-EINVAL, "the copy has ended");
		goto out;
	}
	switch ((enum copy_op)call->i) {
	case OP_QUERY:
		bm_offline_copy_stats(oc, oc->paused ? BLOCKMIRROR_COPY_PAUSED
						     : BLOCKMIRROR_COPY_RUNNING,
				      0, call->arg2);
		break;
	case OP_SET_SPEED:
		bm_offline_copy_set_speed(oc, call->u64);
		break;
	case OP_PAUSE:
		r = bm_offline_copy_pause(oc);
		break;
	case OP_RESUME:
		r = bm_offline_copy_resume(oc);
		break;
	case OP_CANCEL:
		bm_offline_copy_cancel(oc);
		break;
	}
out:
	bm_waiter_signal(&call->w, r);
}

static void *
copy_thread(void *arg)
{
	struct blockmirror_copy *cp = arg;
	enum blockmirror_copy_state state = BLOCKMIRROR_COPY_DONE;
	char msg[sizeof cp->end.msg] = "";
	unsigned posted;
	int r;

	this_thread_copy = cp;
	r = bm_offline_copy_run(&cp->oc);
	if (r < 0) {
		snprintf(msg, sizeof msg, "%s", blockmirror_last_error() ?
			 blockmirror_last_error() : strerror(-r));
		state = cp->oc.cancelled && r == -ECANCELED
			? BLOCKMIRROR_COPY_CANCELLED : BLOCKMIRROR_COPY_FAILED;
	}

	/* Serve the calls already posted, and take no more. */
	cp->ended = true;
	pthread_mutex_lock(&cp->lock);
	cp->accepting = false;
	posted = cp->posted;
	pthread_mutex_unlock(&cp->lock);
	while (cp->served < posted)
		if (bm_loop_run_once(cp->oc.loop, 100) < 0)
			break; /* the ring failed: nothing can be served */

	bm_offline_copy_close(&cp->oc, r);
	pthread_mutex_lock(&cp->lock);
	cp->state = state;
	cp->result = r;
	pthread_mutex_unlock(&cp->lock);
	if (r < 0)
		bm_error(r, "%s", msg);
	bm_waiter_signal(&cp->end, r);
	return NULL;
}

/* ---- calls from other threads ----------------------------------------- */

/*
 * Run `op` on the copy's loop and wait for it.  1 (nothing done) if the
 * copy has ended and its loop no longer serves calls.
 */
static int
copy_call(struct blockmirror_copy *cp, enum copy_op op, uint64_t u64,
	  struct blockmirror_copy_stats *stats)
{
	struct bm_call call = { .fn = call_op, .arg = cp, .arg2 = stats,
				.u64 = u64, .i = (int)op };
	bool accepting;
	int r;

	if (this_thread_copy == cp)
		return bm_error(-EDEADLK, "called from the copy's own thread "
				"(the progress callback)");
	pthread_mutex_lock(&cp->lock);
	accepting = cp->accepting;
	if (accepting)
		cp->posted++;
	pthread_mutex_unlock(&cp->lock);
	if (!accepting)
		return 1;
	bm_call_post(cp->oc.loop, &call);
	r = bm_waiter_wait(&call.w);
	bm_waiter_destroy(&call.w);
	return r;
}

/* A control call: acts, or says the copy has ended. */
static int
control(struct blockmirror_copy *cp, const char *name, enum copy_op op,
	uint64_t u64)
{
	int r;

	bm_error_clear();
	if (!cp)
		return bm_api_fail(name, bm_error(-EINVAL, "no copy"));
	r = copy_call(cp, op, u64, NULL);
	if (r == 1)
		r = bm_error(-EINVAL, "the copy has ended");
	return r < 0 ? bm_api_fail(name, r) : 0;
}

BM_EXPORT int
blockmirror_copy_start(const char *src, const char *dst,
		       const struct blockmirror_copy_options *options,
		       struct blockmirror_copy **out)
{
	struct blockmirror_copy *cp = NULL;
	sigset_t all, old;
	int r;

	bm_error_clear();
	if (!out)
		return bm_api_fail("blockmirror_copy_start",
				   bm_error(-EINVAL, "bad arguments"));
	*out = NULL;
	cp = calloc(1, sizeof *cp);
	if (!cp)
		return bm_api_fail("blockmirror_copy_start",
				   bm_error(-ENOMEM, "out of memory"));
	bm_waiter_init(&cp->end);
	cp->end.fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (cp->end.fd < 0) {
		r = bm_error(-errno, "eventfd: %s", strerror(errno));
		bm_waiter_destroy(&cp->end);
		free(cp);
		return bm_api_fail("blockmirror_copy_start", r);
	}
	r = bm_offline_copy_open(&cp->oc, src, dst, options);
	if (r == 0) {
		pthread_mutex_init(&cp->lock, NULL);
		cp->accepting = true;
		cp->state = BLOCKMIRROR_COPY_RUNNING;
		/* The caller's signals stay the caller's threads' business. */
		sigfillset(&all);
		pthread_sigmask(SIG_SETMASK, &all, &old);
		r = -pthread_create(&cp->thread, NULL, copy_thread, cp);
		pthread_sigmask(SIG_SETMASK, &old, NULL);
		if (r < 0) {
			r = bm_error(r, "pthread_create: %s", strerror(-r));
			pthread_mutex_destroy(&cp->lock);
		}
	}
	if (r < 0) {
		bm_offline_copy_close(&cp->oc, r);
		close(cp->end.fd);
		bm_waiter_destroy(&cp->end);
		free(cp);
		return bm_api_fail("blockmirror_copy_start", r);
	}
	pthread_setname_np(cp->thread, "bm-copy");
	*out = cp;
	return 0;
}

BM_EXPORT int
blockmirror_copy_query(struct blockmirror_copy *cp,
		       struct blockmirror_copy_stats *stats)
{
	int r;

	bm_error_clear();
	if (!cp || !BM_SIZE_COVERS(stats, struct blockmirror_copy_stats,
				   elapsed_us))
		return bm_api_fail("blockmirror_copy_query",
				   bm_error(-EINVAL, "bad arguments"));
	r = copy_call(cp, OP_QUERY, 0, stats);
	if (r == 1) {
		/* Ended: the counters are final (published under lock). */
		pthread_mutex_lock(&cp->lock);
		bm_offline_copy_stats(&cp->oc, cp->state, cp->result, stats);
		pthread_mutex_unlock(&cp->lock);
		r = 0;
	}
	return r < 0 ? bm_api_fail("blockmirror_copy_query", r) : 0;
}

BM_EXPORT int
blockmirror_copy_set_speed(struct blockmirror_copy *cp,
			   uint64_t bytes_per_second)
{
	return control(cp, "blockmirror_copy_set_speed", OP_SET_SPEED,
		       bytes_per_second);
}

BM_EXPORT int
blockmirror_copy_pause(struct blockmirror_copy *cp)
{
	return control(cp, "blockmirror_copy_pause", OP_PAUSE, 0);
}

BM_EXPORT int
blockmirror_copy_resume(struct blockmirror_copy *cp)
{
	return control(cp, "blockmirror_copy_resume", OP_RESUME, 0);
}

BM_EXPORT int
blockmirror_copy_cancel(struct blockmirror_copy *cp)
{
	int r = control(cp, "blockmirror_copy_cancel", OP_CANCEL, 0);

	if (r < 0)
		return r;
	/* Its result is the copy's, not this call's. */
	bm_waiter_wait(&cp->end);
	bm_error_clear();
	return 0;
}

BM_EXPORT int
blockmirror_copy_wait(struct blockmirror_copy *cp, int timeout_ms)
{
	int r;

	bm_error_clear();
	if (!cp)
		return bm_api_fail("blockmirror_copy_wait",
				   bm_error(-EINVAL, "no copy"));
	if (this_thread_copy == cp)
		return bm_api_fail("blockmirror_copy_wait",
				   bm_error(-EDEADLK, "called from the copy's "
					    "own thread (the progress "
					    "callback)"));
	r = bm_waiter_wait_ms(&cp->end, timeout_ms);
	if (r == -ETIMEDOUT && !bm_waiter_done(&cp->end))
		bm_error(r, "the copy still runs after %d ms", timeout_ms);
	return r < 0 ? bm_api_fail("blockmirror_copy_wait", r) : 0;
}

BM_EXPORT int
blockmirror_copy_event_fd(struct blockmirror_copy *cp)
{
	return cp->end.fd;
}

BM_EXPORT void
blockmirror_copy_free(struct blockmirror_copy *cp)
{
	if (!cp || this_thread_copy == cp)
		return;
	if (!bm_waiter_done(&cp->end))
		blockmirror_copy_cancel(cp); /* -EINVAL if it just ended */
	pthread_join(cp->thread, NULL);
	pthread_mutex_destroy(&cp->lock);
	close(cp->end.fd);
	bm_waiter_destroy(&cp->end);
	free(cp);
}
