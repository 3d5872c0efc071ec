/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The rebalance planner (tools/plan.c): plans parsed from JSON text, the
 * disks' sizes and pools filled in as cmd-rebalance.c would, then the
 * moves checked: the goal is met, the fewest bytes move, running the
 * moves in order never overfills a pool, and plans that cannot work are
 * refused with a message that names the problem.
 */
#include <check.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "helpers.h"
#include "plan.h"

#define M (1024ull * 1024)

static struct bm_plan plan;
static struct bm_plan_move *moves;
static size_t n_moves;
static char err[1024];

static void
teardown(void)
{
	bm_plan_free(&plan);
	free(moves);
	moves = NULL;
	n_moves = 0;
	err[0] = '\0';
}

static void
parse_ok(const char *json)
{
	int r = bm_plan_parse(json, strlen(json), &plan, err, sizeof err);

	ck_assert_msg(r == 0, "parse failed: %s", err);
}

static void
parse_bad(const char *json, const char *want)
{
	int r = bm_plan_parse(json, strlen(json), &plan, err, sizeof err);

	ck_assert_msg(r == -EINVAL, "parse of %s gave %d, want -EINVAL", json,
		      r);
	ck_assert_msg(strstr(err, want), "message \"%s\" does not say \"%s\"",
		      err, want);
	ck_assert_ptr_null(plan.pools);
}

/* Put disk `name` of `size` MiB in pool `pool`. */
static void
place(const char *name, uint64_t size, const char *pool)
{
	int d = -1, p = -1;

	for (size_t i = 0; i < plan.n_disks; i++)
		if (strcmp(plan.disks[i].name, name) == 0)
			d = (int)i;
	for (size_t i = 0; i < plan.n_pools; i++)
		if (strcmp(plan.pools[i].name, pool) == 0)
			p = (int)i;
	ck_assert_int_ge(d, 0);
	ck_assert_int_ge(p, 0);
	plan.disks[d].size = size * M;
	plan.disks[d].pool = p;
}

static int
compute(void)
{
	return bm_plan_compute(&plan, &moves, &n_moves, err, sizeof err);
}

static uint64_t
bytes_moved(void)
{
	uint64_t b = 0;

	for (size_t i = 0; i < n_moves; i++)
		b += moves[i].bytes;
	return b;
}

/* Replay the moves one after another: no pool is ever over capacity,
 * each disk moves at most once and from where it is; returns the final
 * usage in `used`. */
static void
replay(uint64_t *used)
{
	int *where = calloc(plan.n_disks + 1, sizeof *where);
	bool *seen = calloc(plan.n_disks + 1, sizeof *seen);

	bm_plan_usage(&plan, used);
	for (size_t d = 0; d < plan.n_disks; d++)
		where[d] = plan.disks[d].pool;
	for (size_t i = 0; i < n_moves; i++) {
		const struct bm_plan_move *m = &moves[i];

		ck_assert_msg(!seen[m->disk], "disk %s moves twice",
			      plan.disks[m->disk].name);
		seen[m->disk] = true;
		ck_assert_int_eq(m->from, where[m->disk]);
		ck_assert_int_ne(m->from, m->to);
		ck_assert(m->bytes == plan.disks[m->disk].size);
		/* The destination holds the disk while the source still
		 * does. */
		used[m->to] += m->bytes;
		ck_assert_msg(used[m->to] <= plan.pools[m->to].capacity,
			      "move %zu overfills pool %s", i,
			      plan.pools[m->to].name);
		used[m->from] -= m->bytes;
		where[m->disk] = m->to;
	}
	free(where);
	free(seen);
}

static void
assert_balanced(const uint64_t *used)
{
	double total = 0, cap = 0;

	for (size_t i = 0; i < plan.n_pools; i++) {
		total += (double)used[i];
		cap += (double)plan.pools[i].capacity;
	}
	for (size_t i = 0; i < plan.n_pools; i++) {
		double c = (double)plan.pools[i].capacity;
		double off = (double)used[i] / c - total / cap;

		ck_assert_msg(off <= plan.tolerance + 1e-9 &&
			      -off <= plan.tolerance + 1e-9,
			      "pool %s is %.3f off the mean fraction",
			      plan.pools[i].name, off);
	}
}

/* ---- parsing --------------------------------------------------------- */

START_TEST(test_parse_full)
{
	parse_ok("{\"version\": 1,"
		 " \"pools\": [{\"name\": \"a\", \"path\": \"/p/a\","
		 "   \"capacity\": \"1G\", \"weight\": 2},"
		 "  {\"name\": \"n\", \"uri\": \"nbd+unix:///{name}?socket=/s\","
		 "   \"capacity\": 1048576, \"reserved\": \"4K\"}],"
		 " \"disks\": [{\"name\": \"vm1\", \"control\": \"/run/vm1.ctl\"},"
		 "  {\"name\": \"img\", \"image\": \"/p/a/img.raw\"}],"
		 " \"goal\": {\"type\": \"moves\", \"moves\":"
		 "  [{\"disk\": \"img\", \"to\": \"n\"}]}}");
	ck_assert_uint_eq(plan.n_pools, 2);
	ck_assert(plan.pools[0].capacity == 1024 * M);
	ck_assert(plan.pools[0].weight == 2.0);
	ck_assert(plan.pools[1].reserved == 4096);
	ck_assert_uint_eq(plan.n_disks, 2);
	ck_assert_str_eq(plan.disks[0].control, "/run/vm1.ctl");
	ck_assert_ptr_null(plan.disks[0].image);
	ck_assert_int_eq(plan.goal, BM_PLAN_MOVES);
	ck_assert_uint_eq(plan.n_requests, 1);
	ck_assert_int_eq(plan.requests[0].disk, 1);
	ck_assert_int_eq(plan.requests[0].pool, 1);
	{
		char *u = bm_plan_pool_uri(&plan.pools[1], "img");

		ck_assert_str_eq(u, "nbd+unix:///img?socket=/s");
		free(u);
	}
}
END_TEST

START_TEST(test_parse_bad)
{
	static const char *pools = "\"pools\": [{\"name\": \"a\", \"path\": \"/a\"}]";

	parse_bad("{\"pools\": [", "malformed JSON");
	teardown();
	parse_bad("[]", "not a JSON object");
	teardown();
	parse_bad("{\"disks\": [], \"goal\": {\"type\": \"balance\"}}",
		  "\"pools\"");
	teardown();
	{
		char buf[512];

		snprintf(buf, sizeof buf, "{%s, \"disks\": [], \"goal\": "
			 "{\"type\": \"evacuate\", \"pool\": \"zz\"}}", pools);
		parse_bad(buf, "unknown pool 'zz'");
		teardown();
		snprintf(buf, sizeof buf, "{%s, \"disks\": [], \"goal\": "
			 "{\"type\": \"moves\", \"moves\": [{\"disk\": \"d\", "
			 "\"to\": \"a\"}]}}", pools);
		parse_bad(buf, "unknown disk 'd'");
		teardown();
		snprintf(buf, sizeof buf, "{%s, \"disks\": [{\"name\": \"d\"}],"
			 " \"goal\": {\"type\": \"balance\"}}", pools);
		parse_bad(buf, "disk 'd' needs exactly one");
		teardown();
		snprintf(buf, sizeof buf, "{%s, \"disks\": [], \"goal\": "
			 "{\"type\": \"balance\", \"tolerance\": 2}}", pools);
		parse_bad(buf, "tolerance");
		teardown();
		snprintf(buf, sizeof buf, "{%s, \"disks\": [], \"goal\": "
			 "{\"type\": \"shuffle\"}}", pools);
		parse_bad(buf, "unknown type 'shuffle'");
		teardown();
		snprintf(buf, sizeof buf, "{%s, \"disks\": [], \"colour\": 1, "
			 "\"goal\": {\"type\": \"balance\"}}", pools);
		parse_bad(buf, "unknown member \"colour\"");
		teardown();
	}
	parse_bad("{\"pools\": [{\"name\": \"n\", \"uri\": \"nbd://h/\"}],"
		  " \"disks\": [], \"goal\": {\"type\": \"balance\"}}",
		  "needs a \"capacity\"");
	teardown();
	parse_bad("{\"pools\": [{\"name\": \"a\", \"path\": \"/a\"},"
		  " {\"name\": \"a\", \"path\": \"/b\"}], \"disks\": [],"
		  " \"goal\": {\"type\": \"balance\"}}", "named twice");
	teardown();
	parse_bad("{\"pools\": [{\"name\": \"a\", \"path\": \"/a\", "
		  "\"capacity\": \"lots\"}], \"disks\": [],"
		  " \"goal\": {\"type\": \"balance\"}}", "bad capacity");
}
END_TEST

/* ---- balance --------------------------------------------------------- */

static const char *three_pools =
	"{\"pools\": [{\"name\": \"a\", \"path\": \"/a\", \"capacity\": \"100M\"},"
	" {\"name\": \"b\", \"path\": \"/b\", \"capacity\": \"100M\"},"
	" {\"name\": \"c\", \"path\": \"/c\", \"capacity\": \"40M\"}],"
	" \"disks\": [{\"name\": \"d1\", \"image\": \"/x\"},"
	"  {\"name\": \"d2\", \"image\": \"/x\"}, {\"name\": \"d3\", \"image\": \"/x\"},"
	"  {\"name\": \"d4\", \"image\": \"/x\"}, {\"name\": \"d5\", \"image\": \"/x\"},"
	"  {\"name\": \"d6\", \"image\": \"/x\"}],"
	" \"goal\": {\"type\": \"balance\", \"tolerance\": 0.1}}";

START_TEST(test_balance)
{
	uint64_t used[3];

	parse_ok(three_pools);
	place("d1", 32, "a");
	place("d2", 24, "a");
	place("d3", 16, "a");
	place("d4", 8, "a");
	place("d5", 8, "b");
	place("d6", 4, "a");
	ck_assert_int_eq(compute(), 0);
	ck_assert_uint_gt(n_moves, 0);
	replay(used);
	assert_balanced(used);
}
END_TEST

/* The fewest bytes: one small disk evens the pools, a large one does
 * not, and moving everything would also "work". */
START_TEST(test_balance_fewest_bytes)
{
	uint64_t used[3];

	parse_ok("{\"pools\": [{\"name\": \"a\", \"path\": \"/a\", \"capacity\": \"100M\"},"
		 " {\"name\": \"b\", \"path\": \"/b\", \"capacity\": \"100M\","
		 "  \"reserved\": \"32M\"}],"
		 " \"disks\": [{\"name\": \"big\", \"image\": \"/x\"},"
		 "  {\"name\": \"s1\", \"image\": \"/x\"}, {\"name\": \"s2\", \"image\": \"/x\"}],"
		 " \"goal\": {\"type\": \"balance\", \"tolerance\": 0.05}}");
	place("big", 32, "a");
	place("s1", 16, "a");
	place("s2", 16, "a");
	ck_assert_int_eq(compute(), 0);
	ck_assert_uint_eq(n_moves, 1);
	ck_assert(bytes_moved() == 16 * M);
	ck_assert_int_eq(moves[0].to, 1);
	replay(used);
	assert_balanced(used);
}
END_TEST

/* Already balanced: nothing moves. */
START_TEST(test_balance_nothing)
{
	parse_ok(three_pools);
	place("d1", 20, "a");
	place("d2", 20, "b");
	place("d3", 8, "c");
	place("d4", 1, "a");
	place("d5", 1, "b");
	place("d6", 0, "c");
	ck_assert_int_eq(compute(), 0);
	ck_assert_uint_eq(n_moves, 0);
}
END_TEST

/* The small pool is never overfilled, even though the greedy choice
 * would like to put a big disk there. */
START_TEST(test_balance_never_overfill)
{
	uint64_t used[3];

	parse_ok(three_pools);
	place("d1", 36, "a");
	place("d2", 36, "b");
	place("d3", 16, "a");
	place("d4", 8, "a");
	place("d5", 8, "b");
	place("d6", 4, "a");
	/* c (40M) could take a 36M disk, which would leave it far above
	 * its target; the 16M one is what evens the pools. */
	ck_assert_int_eq(compute(), 0);
	replay(used);
	ck_assert(used[2] <= 40 * M);
	ck_assert(bytes_moved() == 16 * M);
	assert_balanced(used);
}
END_TEST

/* Weights: a pool of weight 2 takes twice the fraction. */
START_TEST(test_balance_weight)
{
	uint64_t used[2];

	parse_ok("{\"pools\": [{\"name\": \"a\", \"path\": \"/a\", \"capacity\": \"100M\"},"
		 " {\"name\": \"b\", \"path\": \"/b\", \"capacity\": \"100M\", \"weight\": 3}],"
		 " \"disks\": [{\"name\": \"d1\", \"image\": \"/x\"},"
		 "  {\"name\": \"d2\", \"image\": \"/x\"}, {\"name\": \"d3\", \"image\": \"/x\"},"
		 "  {\"name\": \"d4\", \"image\": \"/x\"}],"
		 " \"goal\": {\"type\": \"balance\", \"tolerance\": 0.05}}");
	place("d1", 10, "a");
	place("d2", 10, "a");
	place("d3", 10, "a");
	place("d4", 10, "a");
	ck_assert_int_eq(compute(), 0);
	replay(used);
	ck_assert(used[0] == 10 * M);
	ck_assert(used[1] == 30 * M);
}
END_TEST

START_TEST(test_balance_infeasible)
{
	parse_ok("{\"pools\": [{\"name\": \"a\", \"path\": \"/a\", \"capacity\": \"100M\"},"
		 " {\"name\": \"b\", \"path\": \"/b\", \"capacity\": \"100M\"}],"
		 " \"disks\": [{\"name\": \"huge\", \"image\": \"/x\"}],"
		 " \"goal\": {\"type\": \"balance\", \"tolerance\": 0.05}}");
	place("huge", 80, "a");
	ck_assert_int_eq(compute(), -ENOSPC);
	ck_assert_msg(strstr(err, "cannot balance") && strstr(err, "pool '"),
		      "message: %s", err);
	ck_assert_ptr_null(moves);
}
END_TEST

/* ---- evacuate -------------------------------------------------------- */

START_TEST(test_evacuate)
{
	uint64_t used[3];

	parse_ok("{\"pools\": [{\"name\": \"a\", \"path\": \"/a\", \"capacity\": \"100M\"},"
		 " {\"name\": \"b\", \"path\": \"/b\", \"capacity\": \"64M\"},"
		 " {\"name\": \"c\", \"path\": \"/c\", \"capacity\": \"32M\"}],"
		 " \"disks\": [{\"name\": \"d1\", \"image\": \"/x\"},"
		 "  {\"name\": \"d2\", \"image\": \"/x\"}, {\"name\": \"d3\", \"image\": \"/x\"},"
		 "  {\"name\": \"d4\", \"image\": \"/x\"}, {\"name\": \"keep\", \"image\": \"/x\"}],"
		 " \"goal\": {\"type\": \"evacuate\", \"pool\": \"a\"}}");
	place("d1", 32, "a");
	place("d2", 24, "a");
	place("d3", 16, "a");
	place("d4", 8, "a");
	place("keep", 8, "b");
	ck_assert_int_eq(compute(), 0);
	ck_assert_uint_eq(n_moves, 4);
	ck_assert(bytes_moved() == 80 * M);
	replay(used);
	ck_assert(used[0] == 0);
	for (size_t i = 0; i < n_moves; i++)
		ck_assert_int_eq(moves[i].from, 0);
}
END_TEST

START_TEST(test_evacuate_infeasible)
{
	parse_ok("{\"pools\": [{\"name\": \"a\", \"path\": \"/a\", \"capacity\": \"100M\"},"
		 " {\"name\": \"b\", \"path\": \"/b\", \"capacity\": \"40M\"}],"
		 " \"disks\": [{\"name\": \"d1\", \"image\": \"/x\"},"
		 "  {\"name\": \"d2\", \"image\": \"/x\"}],"
		 " \"goal\": {\"type\": \"evacuate\", \"pool\": \"a\"}}");
	place("d1", 32, "a");
	place("d2", 16, "a");
	ck_assert_int_eq(compute(), -ENOSPC);
	ck_assert_msg(strstr(err, "cannot empty pool 'a'") &&
		      strstr(err, "disk 'd2'"), "message: %s", err);
}
END_TEST

/* ---- explicit moves -------------------------------------------------- */

START_TEST(test_moves_ordered)
{
	uint64_t used[2];

	/* b is full: its disk must leave before a's can arrive. */
	parse_ok("{\"pools\": [{\"name\": \"a\", \"path\": \"/a\", \"capacity\": \"64M\"},"
		 " {\"name\": \"b\", \"path\": \"/b\", \"capacity\": \"32M\"}],"
		 " \"disks\": [{\"name\": \"x\", \"image\": \"/x\"},"
		 "  {\"name\": \"y\", \"image\": \"/x\"}, {\"name\": \"z\", \"image\": \"/x\"}],"
		 " \"goal\": {\"type\": \"moves\", \"moves\": ["
		 "  {\"disk\": \"x\", \"to\": \"b\"}, {\"disk\": \"y\", \"to\": \"a\"},"
		 "  {\"disk\": \"z\", \"to\": \"a\"}]}}");
	place("x", 16, "a");
	place("y", 32, "b");
	place("z", 8, "a"); /* already there: no move */
	ck_assert_int_eq(compute(), 0);
	ck_assert_uint_eq(n_moves, 2);
	ck_assert_str_eq(plan.disks[moves[0].disk].name, "y");
	ck_assert_str_eq(plan.disks[moves[1].disk].name, "x");
	replay(used);
	ck_assert(used[0] == 40 * M && used[1] == 16 * M);
}
END_TEST

START_TEST(test_moves_overfill)
{
	parse_ok("{\"pools\": [{\"name\": \"a\", \"path\": \"/a\", \"capacity\": \"64M\"},"
		 " {\"name\": \"b\", \"path\": \"/b\", \"capacity\": \"16M\"}],"
		 " \"disks\": [{\"name\": \"x\", \"image\": \"/x\"}],"
		 " \"goal\": {\"type\": \"moves\", \"moves\": ["
		 "  {\"disk\": \"x\", \"to\": \"b\"}]}}");
	place("x", 32, "a");
	ck_assert_int_eq(compute(), -ENOSPC);
	ck_assert_msg(strstr(err, "disk 'x'") && strstr(err, "pool 'b'") &&
		      strstr(err, "overfill"), "message: %s", err);
}
END_TEST

/* ---- refused before planning ----------------------------------------- */

START_TEST(test_over_capacity)
{
	parse_ok(three_pools);
	place("d1", 32, "c");
	place("d2", 16, "c");
	place("d3", 1, "a");
	place("d4", 1, "a");
	place("d5", 1, "a");
	place("d6", 1, "a");
	ck_assert_int_eq(compute(), -ENOSPC);
	ck_assert_msg(strstr(err, "pool 'c' is over capacity"), "message: %s",
		      err);
}
END_TEST

START_TEST(test_disk_in_no_pool)
{
	parse_ok(three_pools);
	place("d1", 1, "a");
	ck_assert_int_eq(compute(), -EINVAL);
	ck_assert_msg(strstr(err, "disk 'd2'"), "message: %s", err);
}
END_TEST

static Suite *
plan_suite(void)
{
	Suite *s = suite_create("plan");
	TCase *tc = tcase_create("plan");

	tcase_add_checked_fixture(tc, NULL, teardown);
	tcase_add_test(tc, test_parse_full);
	tcase_add_test(tc, test_parse_bad);
	tcase_add_test(tc, test_balance);
	tcase_add_test(tc, test_balance_fewest_bytes);
	tcase_add_test(tc, test_balance_nothing);
	tcase_add_test(tc, test_balance_never_overfill);
	tcase_add_test(tc, test_balance_weight);
	tcase_add_test(tc, test_balance_infeasible);
	tcase_add_test(tc, test_evacuate);
	tcase_add_test(tc, test_evacuate_infeasible);
	tcase_add_test(tc, test_moves_ordered);
	tcase_add_test(tc, test_moves_overfill);
	tcase_add_test(tc, test_over_capacity);
	tcase_add_test(tc, test_disk_in_no_pool);
	suite_add_tcase(s, tc);
	return s;
}

int
main(void)
{
	return run_suite(plan_suite()) ? EXIT_FAILURE : EXIT_SUCCESS;
}
