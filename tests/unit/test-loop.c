/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The event loop (lib/loop.c): work posted from many threads runs on the
 * loop thread, exactly once each; deferred completions run in order on
 * the next turn; timers fire and cancel; and waiting with nothing that
 * could ever finish is an error rather than a hang.
 */
#include <check.h>
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "helpers.h"
#include "loop.h"

#define THREADS 4
#define POSTS 2000

struct counted {
	struct bm_work w;
	int *count;
	pthread_t *loop_thread;
	bool wrong_thread;
};

static void
counted_fn(struct bm_work *w)
{
	struct counted *c = (struct counted *)w;

	if (!pthread_equal(pthread_self(), *c->loop_thread))
		c->wrong_thread = true;
	(*c->count)++;
}

struct poster {
	struct bm_loop *loop;
	struct counted *items;
};

static void *
poster_main(void *arg)
{
	struct poster *p = arg;

	for (int i = 0; i < POSTS; i++)
		bm_loop_post(p->loop, &p->items[i].w);
	return NULL;
}

START_TEST(test_post_from_threads)
{
	static struct counted items[THREADS][POSTS];
	struct poster posters[THREADS];
	pthread_t threads[THREADS], self = pthread_self();
	struct bm_loop *loop;
	int count = 0;

	ck_assert_int_eq(bm_loop_new(16, &loop), 0);
	for (int t = 0; t < THREADS; t++) {
		for (int i = 0; i < POSTS; i++) {
			items[t][i].w.fn = counted_fn;
			items[t][i].count = &count;
			items[t][i].loop_thread = &self;
		}
		posters[t].loop = loop;
		posters[t].items = items[t];
		pthread_create(&threads[t], NULL, poster_main, &posters[t]);
	}
	while (count < THREADS * POSTS)
		ck_assert_int_ge(bm_loop_run_once(loop, 1000), 0);
	for (int t = 0; t < THREADS; t++)
		pthread_join(threads[t], NULL);
	/* Nothing more arrives. */
	ck_assert_int_ge(bm_loop_run_once(loop, 10), 0);
	ck_assert_int_eq(count, THREADS * POSTS);
	for (int t = 0; t < THREADS; t++)
		for (int i = 0; i < POSTS; i++)
			ck_assert(!items[t][i].wrong_thread);
	bm_loop_free(loop);
}
END_TEST

struct order {
	struct bm_op op[5];
	int seen[5];
	int n;
	bool done;
};

static void
order_fn(struct bm_op *op, int res)
{
	struct order *o = (struct order *)((char *)op -
		(size_t)res * sizeof(struct bm_op));

	o->seen[o->n++] = res;
	if (o->n == 5)
		o->done = true;
}

START_TEST(test_defer_order)
{
	struct bm_loop *loop;
	struct order o = { 0 };

	ck_assert_int_eq(bm_loop_new(8, &loop), 0);
	for (int i = 0; i < 5; i++)
		bm_loop_defer(loop, &o.op[i], order_fn, i);
	ck_assert_int_eq(o.n, 0);
	ck_assert_int_eq(bm_loop_run_until(loop, &o.done), 0);
	for (int i = 0; i < 5; i++)
		ck_assert_int_eq(o.seen[i], i);
	bm_loop_free(loop);
}
END_TEST

struct timer_result {
	struct bm_timer t;
	int res;
	bool done;
};

static void
timer_fn(struct bm_op *op, int res)
{
	struct timer_result *r = (struct timer_result *)op;

	r->res = res;
	r->done = true;
	r->t.armed = false;
}

START_TEST(test_timers)
{
	struct bm_loop *loop;
	struct timer_result a = { 0 }, b = { 0 };

	ck_assert_int_eq(bm_loop_new(8, &loop), 0);
	bm_loop_timer_start(loop, &a.t, 1000000, timer_fn);
	ck_assert_uint_eq(bm_loop_inflight(loop), 1);
	ck_assert_int_eq(bm_loop_run_until(loop, &a.done), 0);
	ck_assert_int_eq(a.res, -ETIME);

	bm_loop_timer_start(loop, &b.t, 60ull * 1000000000, timer_fn);
	ck_assert_int_ge(bm_loop_run_once(loop, 0), 0);
	bm_loop_timer_cancel(loop, &b.t);
	ck_assert_int_eq(bm_loop_run_until(loop, &b.done), 0);
	ck_assert_int_eq(b.res, -ECANCELED);
	while (bm_loop_inflight(loop))
		bm_loop_run_once(loop, 100);
	bm_loop_free(loop);
}
END_TEST

START_TEST(test_nothing_to_wait_for)
{
	struct bm_loop *loop;
	bool never = false;

	ck_assert_int_eq(bm_loop_new(8, &loop), 0);
	ck_assert_int_eq(bm_loop_run_until(loop, &never), -EDEADLK);
	bm_loop_free(loop);
}
END_TEST

/*
 * A ring torn down on one thread and a new one made on another, with
 * nothing between the threads but a relaxed flag: the new ring often lands
 * at the old one's address.  Under ThreadSanitizer this fails unless the
 * loop tells it that the kernel orders the two mappings.
 */
static atomic_int handoff;

static void *
ring_then_wait(void *arg)
{
	struct bm_loop *loop;

	(void)arg;
	ck_assert_int_eq(bm_loop_new(64, &loop), 0);
	bm_loop_free(loop);
	atomic_store_explicit(&handoff, 1, memory_order_relaxed);
	while (atomic_load_explicit(&handoff, memory_order_relaxed) != 2)
		sched_yield();
	return NULL;
}

START_TEST(test_rings_reused_across_threads)
{
	for (int i = 0; i < 20; i++) {
		struct bm_loop *loop;
		bool never = false;
		pthread_t t;

		atomic_store(&handoff, 0);
		ck_assert_int_eq(pthread_create(&t, NULL, ring_then_wait, NULL), 0);
		while (atomic_load_explicit(&handoff, memory_order_relaxed) != 1)
			sched_yield();
		ck_assert_int_eq(bm_loop_new(64, &loop), 0);
		ck_assert_int_eq(bm_loop_run_until(loop, &never), -EDEADLK);
		bm_loop_free(loop);
		atomic_store_explicit(&handoff, 2, memory_order_relaxed);
		ck_assert_int_eq(pthread_join(t, NULL), 0);
	}
}
END_TEST

int
main(void)
{
	Suite *s = suite_create("loop");
	TCase *tc = tcase_create("loop");

	tcase_add_test(tc, test_post_from_threads);
	tcase_add_test(tc, test_defer_order);
	tcase_add_test(tc, test_timers);
	tcase_add_test(tc, test_nothing_to_wait_for);
	tcase_add_test(tc, test_rings_reused_across_threads);
	suite_add_tcase(s, tc);
	return run_suite(s) ? EXIT_FAILURE : EXIT_SUCCESS;
}
