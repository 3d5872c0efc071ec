/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The bulk copy's rate limiter (lib/rate.h), with made-up times: what it
 * allows, how long it makes a copy wait, the one-second windows (excess
 * carried over, unused allowance dropped), the request size under a
 * limit, and speeds so large the arithmetic would overflow.
 */
#include <check.h>
#include <stdlib.h>

#include "helpers.h"
#include "rate.h"

#define S UINT64_C(1000000000) /* ns */
#define MiB (UINT64_C(1) << 20)

START_TEST(test_unlimited)
{
	struct bm_rate r;

	bm_rate_set(&r, 0, 5 * S);
	bm_rate_account(&r, UINT64_MAX / 2);
	ck_assert(bm_rate_allows(&r, 5 * S));
	ck_assert_uint_eq(bm_rate_delay_ns(&r, 5 * S), 0);
	ck_assert_uint_eq(bm_rate_request_max(&r, 4 * MiB, 65536), 4 * MiB);
}
END_TEST

START_TEST(test_allowance_and_delay)
{
	struct bm_rate r;
	uint64_t t = 7 * S;

	bm_rate_set(&r, 10 * MiB, t);
	ck_assert(bm_rate_allows(&r, t)); /* the first request goes at once */
	bm_rate_account(&r, 1 * MiB);
	ck_assert(!bm_rate_allows(&r, t));
	/* 1 MiB at 10 MiB/s: allowed again after 0.1 s. */
	ck_assert_uint_ge(bm_rate_delay_ns(&r, t), S / 10);
	ck_assert_uint_le(bm_rate_delay_ns(&r, t), S / 10 + 10000);
	ck_assert(!bm_rate_allows(&r, t + S / 10 - 1000000));
	ck_assert(bm_rate_allows(&r, t + S / 10 + 1000));
	ck_assert_uint_eq(bm_rate_delay_ns(&r, t + S / 10 + 1000), 0);
	/* Never more than a window's wait, whatever was sent. */
	bm_rate_account(&r, 1000 * MiB);
	ck_assert_uint_eq(bm_rate_delay_ns(&r, t), S);
	/* A new limit starts afresh. */
	bm_rate_set(&r, 1 * MiB, t + 2 * S);
	ck_assert_uint_eq(r.bytes, 0);
	ck_assert(bm_rate_allows(&r, t + 2 * S));
}
END_TEST

START_TEST(test_windows)
{
	struct bm_rate r;
	uint64_t t = 1 * S;

	bm_rate_set(&r, 10 * MiB, t);
	/* Not a second yet: nothing changes. */
	bm_rate_account(&r, 5 * MiB);
	bm_rate_roll(&r, t + S / 2);
	ck_assert_uint_eq(r.start_ns, t);
	/* Idle for 10 s: the new window has no saved-up allowance. */
	bm_rate_roll(&r, t + 10 * S);
	ck_assert_uint_eq(r.start_ns, t + 10 * S);
	ck_assert_uint_eq(r.bytes, 0);
	bm_rate_account(&r, 1 * MiB);
	ck_assert(!bm_rate_allows(&r, t + 10 * S));
	/* Sent beyond the allowance: the excess is carried over. */
	bm_rate_account(&r, 29 * MiB);
	bm_rate_roll(&r, t + 12 * S);
	ck_assert_uint_eq(r.start_ns, t + 12 * S);
	ck_assert_uint_eq(r.bytes, 30 * MiB - 20 * MiB);
}
END_TEST

START_TEST(test_request_max)
{
	struct bm_rate r;

	bm_rate_set(&r, 10 * MiB, 0);
	/* A tenth of a second's worth, rounded down to the unit. */
	ck_assert_uint_eq(bm_rate_request_max(&r, 4 * MiB, 65536), MiB);
	ck_assert_uint_eq(bm_rate_request_max(&r, 256 * 1024, 65536),
			  256 * 1024);
	bm_rate_set(&r, 1000, 0);
	ck_assert_uint_eq(bm_rate_request_max(&r, 4 * MiB, 65536), 65536);
	/* The unit never makes a request larger than `max`. */
	ck_assert_uint_eq(bm_rate_request_max(&r, 12288, 65536), 12288);
}
END_TEST

START_TEST(test_huge_speeds)
{
	struct bm_rate r;

	bm_rate_set(&r, UINT64_MAX, 0);
	bm_rate_account(&r, UINT64_MAX);
	bm_rate_account(&r, 1); /* saturates */
	ck_assert_uint_eq(r.bytes, UINT64_MAX);
	ck_assert_uint_eq(bm_rate_allowance(&r, 100 * S), UINT64_MAX);
	ck_assert(bm_rate_allows(&r, 100 * S));
	bm_rate_set(&r, UINT64_MAX / 3, 0);
	bm_rate_account(&r, UINT64_MAX);
	ck_assert_uint_le(bm_rate_delay_ns(&r, 0), S);
	ck_assert_uint_gt(bm_rate_delay_ns(&r, 0), 0);
}
END_TEST

static Suite *
rate_suite(void)
{
	Suite *s = suite_create("rate");
	TCase *tc = tcase_create("limiter");

	tcase_add_test(tc, test_unlimited);
	tcase_add_test(tc, test_allowance_and_delay);
	tcase_add_test(tc, test_windows);
	tcase_add_test(tc, test_request_max);
	tcase_add_test(tc, test_huge_speeds);
	suite_add_tcase(s, tc);
	return s;
}

int
main(void)
{
	return run_suite(rate_suite()) ? EXIT_FAILURE : EXIT_SUCCESS;
}
