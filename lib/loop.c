/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Event loop over one io_uring ring.
 *
 * Three sources of callbacks, all run on the loop thread:
 *  - completions from the ring: the CQE's user data is the bm_op;
 *  - deferred completions (bm_loop_defer), queued in memory and run on the
 *    next turn, so that no callback runs inside the call that started it;
 *  - work posted by other threads (bm_loop_post): a mutex-protected list
 *    and an eventfd; the ring keeps a poll armed on the eventfd, so a post
 *    wakes a loop sleeping in io_uring_enter and makes the ring fd readable
 *    for callers that poll it from their own event loop.
 *
 * The wake poll's op is the only one not counted in `inflight`.
 */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "errors.h"
#include "internal.h"
#include "loop.h"

struct bm_loop {
	struct io_uring ring;
	int wake_fd;
	struct bm_op wake_op;
	bool wake_armed;

	pthread_mutex_t post_lock;
	struct bm_work *posted; /* LIFO under post_lock, reversed on run */

	struct bm_op *deferred;
	struct bm_op **deferred_tail;

	unsigned inflight;

	/* Timeout removals still in the kernel: freed when they complete,
	 * or by bm_loop_free if the loop ends first. */
	struct timer_remove *removes;
};

struct timer_remove {
	struct bm_op op;
	struct bm_loop *loop;
	struct timer_remove *prev, *next;
};

static void loop_arm_wake(struct bm_loop *loop);

/*
 * liburing maps the ring with its own system calls, which ThreadSanitizer
 * does not see: when a ring is torn down on one thread and another thread's
 * new ring is mapped at the same address, it takes the new ring's first
 * writes for a race with the old ring's last.  The kernel orders the unmap
 * before the map; tell ThreadSanitizer so.
 */
#if defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define BM_TSAN 1
#endif
#endif
#if defined(__SANITIZE_THREAD__)
#define BM_TSAN 1
#endif

#ifdef BM_TSAN
#include <sanitizer/tsan_interface.h>

static void
ring_mapped(struct io_uring *ring)
{
	__tsan_acquire(ring->sq.ring_ptr);
	__tsan_acquire(ring->cq.ring_ptr);
	__tsan_acquire(ring->sq.sqes);
}

static void
ring_unmapping(struct io_uring *ring)
{
	__tsan_release(ring->sq.ring_ptr);
	__tsan_release(ring->cq.ring_ptr);
	__tsan_release(ring->sq.sqes);
}
#else
static inline void ring_mapped(struct io_uring *ring) { (void)ring; }
static inline void ring_unmapping(struct io_uring *ring) { (void)ring; }
#endif

int
bm_loop_new(unsigned entries, struct bm_loop **out)
{
	struct io_uring_params p;
	struct bm_loop *loop;
	int r;

	loop = calloc(1, sizeof *loop);
	if (!loop)
		return bm_error(-ENOMEM, "event loop: out of memory");
	memset(&p, 0, sizeof p);
	/* Completions are only reaped by the loop thread: let the kernel
	 * run task work when we enter, not by interrupting us. */
	p.flags = IORING_SETUP_COOP_TASKRUN;
	r = io_uring_queue_init_params(entries, &loop->ring, &p);
	if (r == -EINVAL) {
		memset(&p, 0, sizeof p);
		r = io_uring_queue_init_params(entries, &loop->ring, &p);
	}
	if (r < 0) {
		free(loop);
		return bm_error(r, "io_uring_queue_init: %s", strerror(-r));
	}
	ring_mapped(&loop->ring);
	loop->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (loop->wake_fd < 0) {
		r = -errno;
		ring_unmapping(&loop->ring);
		io_uring_queue_exit(&loop->ring);
		free(loop);
		return bm_error(r, "eventfd: %s", strerror(-r));
	}
	pthread_mutex_init(&loop->post_lock, NULL);
	loop->deferred_tail = &loop->deferred;
	loop_arm_wake(loop);
	*out = loop;
	return 0;
}

void
bm_loop_free(struct bm_loop *loop)
{
	if (!loop)
		return;
	/* Tearing down the ring cancels the wake poll; no completion comes
	 * after it, so removals still pending are freed here. */
	ring_unmapping(&loop->ring);
	io_uring_queue_exit(&loop->ring);
	while (loop->removes) {
		struct timer_remove *rm = loop->removes;

		loop->removes = rm->next;
		free(rm);
	}
	close(loop->wake_fd);
	pthread_mutex_destroy(&loop->post_lock);
	free(loop);
}

static struct io_uring_sqe *
loop_get_sqe(struct bm_loop *loop)
{
	struct io_uring_sqe *sqe;

	while (!(sqe = io_uring_get_sqe(&loop->ring))) {
		/* The ring is full: hand what is queued to the kernel.
		 * -EBUSY means the completion queue is full; reaping is
		 * the caller's next turn, so submit again after it. */
		if (io_uring_submit(&loop->ring) < 0)
			io_uring_submit_and_wait(&loop->ring, 1);
	}
	return sqe;
}

struct io_uring_sqe *
bm_loop_sqe(struct bm_loop *loop, struct bm_op *op, bm_op_fn fn)
{
	struct io_uring_sqe *sqe = loop_get_sqe(loop);

	op->fn = fn;
	io_uring_sqe_set_data(sqe, op);
	loop->inflight++;
	return sqe;
}

void
bm_loop_defer(struct bm_loop *loop, struct bm_op *op, bm_op_fn fn, int res)
{
	op->fn = fn;
	op->res = res;
	op->next = NULL;
	*loop->deferred_tail = op;
	loop->deferred_tail = &op->next;
}

void
bm_loop_timer_start(struct bm_loop *loop, struct bm_timer *t, uint64_t ns,
		    bm_op_fn fn)
{
	struct io_uring_sqe *sqe;

	t->ts.tv_sec = ns / 1000000000;
	t->ts.tv_nsec = ns % 1000000000;
	t->armed = true;
	sqe = bm_loop_sqe(loop, &t->op, fn);
	io_uring_prep_timeout(sqe, &t->ts, 0, 0);
}

static void
timer_remove_done(struct bm_op *op, int res)
{
	struct timer_remove *rm = bm_container_of(op, struct timer_remove, op);

	if (rm->prev)
		rm->prev->next = rm->next;
	else
		rm->loop->removes = rm->next;
	if (rm->next)
		rm->next->prev = rm->prev;
	free(rm);
}

void
bm_loop_timer_cancel(struct bm_loop *loop, struct bm_timer *t)
{
	struct io_uring_sqe *sqe;
	struct timer_remove *rm;

	if (!t->armed)
		return;
	/* The remove request needs an op of its own; it is tiny. */
	rm = calloc(1, sizeof *rm);
	if (!rm)
		return; /* the timer will simply fire */
	rm->loop = loop;
	rm->next = loop->removes;
	if (rm->next)
		rm->next->prev = rm;
	loop->removes = rm;
	sqe = bm_loop_sqe(loop, &rm->op, timer_remove_done);
	io_uring_prep_timeout_remove(sqe, (__u64)(uintptr_t)&t->op, 0);
}

static void
wake_done(struct bm_op *op, int res)
{
	struct bm_loop *loop = bm_container_of(op, struct bm_loop, wake_op);
	struct bm_work *list, *rev = NULL;
	uint64_t v;

	loop->wake_armed = false;
	if (read(loop->wake_fd, &v, sizeof v) < 0) {
		/* EAGAIN: a spurious wake-up; nothing to drain. */
	}
	pthread_mutex_lock(&loop->post_lock);
	list = loop->posted;
	loop->posted = NULL;
	pthread_mutex_unlock(&loop->post_lock);
	while (list) {
		struct bm_work *n = list->next;

		list->next = rev;
		rev = list;
		list = n;
	}
	loop_arm_wake(loop);
	while (rev) {
		struct bm_work *n = rev->next;

		rev->fn(rev);
		rev = n;
	}
}

static void
loop_arm_wake(struct bm_loop *loop)
{
	struct io_uring_sqe *sqe;

	if (loop->wake_armed)
		return;
	sqe = loop_get_sqe(loop);
	loop->wake_op.fn = wake_done;
	io_uring_sqe_set_data(sqe, &loop->wake_op);
	io_uring_prep_poll_add(sqe, loop->wake_fd, POLLIN);
	loop->wake_armed = true;
}

void
bm_loop_post(struct bm_loop *loop, struct bm_work *w)
{
	uint64_t one = 1;
	bool first;

	pthread_mutex_lock(&loop->post_lock);
	first = loop->posted == NULL;
	w->next = loop->posted;
	loop->posted = w;
	pthread_mutex_unlock(&loop->post_lock);
	if (first && write(loop->wake_fd, &one, sizeof one) < 0) {
		/* EAGAIN only if the counter is saturated: already awake. */
	}
}

static int
run_deferred(struct bm_loop *loop)
{
	struct bm_op *list = loop->deferred;
	int n = 0;

	loop->deferred = NULL;
	loop->deferred_tail = &loop->deferred;
	while (list) {
		struct bm_op *op = list;

		list = op->next;
		op->fn(op, op->res);
		n++;
	}
	return n;
}

static int
reap(struct bm_loop *loop)
{
	struct io_uring_cqe *cqe;
	int n = 0;

	while (io_uring_peek_cqe(&loop->ring, &cqe) == 0) {
		struct bm_op *op = io_uring_cqe_get_data(cqe);
		int res = cqe->res;

		io_uring_cqe_seen(&loop->ring, cqe);
		if (!op)
			continue;
		if (op != &loop->wake_op)
			loop->inflight--;
		op->fn(op, res);
		n++;
	}
	return n;
}

int
bm_loop_run_once(struct bm_loop *loop, int timeout_ms)
{
	struct io_uring_cqe *cqe;
	int r, n;

	if (loop->deferred || timeout_ms == 0) {
		r = io_uring_submit(&loop->ring);
	} else if (timeout_ms < 0) {
		r = io_uring_submit_and_wait(&loop->ring, 1);
	} else {
		struct __kernel_timespec ts = {
			.tv_sec = timeout_ms / 1000,
			.tv_nsec = (timeout_ms % 1000) * 1000000L,
		};

		r = io_uring_submit_and_wait_timeout(&loop->ring, &cqe, 1,
						     &ts, NULL);
		if (r == -ETIME)
			r = 0;
	}
	if (r < 0 && r != -EINTR && r != -EBUSY && r != -EAGAIN)
		return bm_error(r, "io_uring_enter: %s", strerror(-r));
	n = reap(loop);
	n += run_deferred(loop);
	/* Callbacks queue new requests; hand them over before sleeping. */
	r = io_uring_submit(&loop->ring);
	if (r < 0 && r != -EBUSY && r != -EAGAIN && r != -EINTR)
		return bm_error(r, "io_uring_submit: %s", strerror(-r));
	return n;
}

int
bm_loop_run_until(struct bm_loop *loop, const bool *done)
{
	while (!*done) {
		int r;

		/* Nothing can ever set *done: a bug, not a reason to hang. */
		if (!loop->inflight && !loop->deferred)
			return bm_error(-EDEADLK, "event loop: nothing in flight");
		r = bm_loop_run_once(loop, -1);

		if (r < 0)
			return r;
	}
	return 0;
}

int
bm_loop_fd(const struct bm_loop *loop)
{
	return loop->ring.ring_fd;
}

void
bm_loop_hold(struct bm_loop *loop)
{
	loop->inflight++;
}

void
bm_loop_unhold(struct bm_loop *loop)
{
	loop->inflight--;
}

unsigned
bm_loop_inflight(const struct bm_loop *loop)
{
	return loop->inflight;
}
