/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* The command line's size parser (tools/size.c): accepted forms, and
 * every malformed or overflowing one refused. */
#include <check.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>

#include "helpers.h"
#include "size.h"

static void
ok(const char *s, uint64_t want)
{
	uint64_t v = 12345;
	int r = parse_size(s, &v);

	ck_assert_msg(r == 0, "parse_size(\"%s\") = %d", s, r);
	ck_assert_msg(v == want, "parse_size(\"%s\") gave %llu, want %llu", s,
		      (unsigned long long)v, (unsigned long long)want);
}

static void
bad(const char *s, int want)
{
	uint64_t v = 777;
	int r = parse_size(s, &v);

	ck_assert_msg(r == want, "parse_size(\"%s\") = %d, want %d", s, r,
		      want);
	ck_assert_msg(v == 777, "parse_size(\"%s\") wrote a value", s);
}

START_TEST(test_forms)
{
	ok("0", 0);
	ok("4096", 4096);
	ok("1K", 1024);
	ok("1025K", 1025 * 1024);
	ok("1k", 1024);
	ok("512M", 512ull << 20);
	ok("10G", 10ull << 30);
	ok("10GiB", 10ull << 30);
	ok("10gib", 10ull << 30);
	ok("10GB", 10ull << 30);
	ok("2T", 2ull << 40);
	ok("1P", 1ull << 50);
	ok("100B", 100);
	ok("7E", 7ull << 60);
	ok("9223372036854775807", INT64_MAX);
}
END_TEST

START_TEST(test_rejects)
{
	bad("", -EINVAL);
	bad("abc", -EINVAL);
	bad("-1", -EINVAL);
	bad("+1", -EINVAL);
	bad(" 1", -EINVAL);
	bad("1 ", -EINVAL);
	bad("10X", -EINVAL);
	bad("1.5G", -EINVAL);
	bad("1GG", -EINVAL);
	bad("1Gi", -EINVAL);
	bad("G", -EINVAL);
	bad("0x10", -EINVAL);
	bad("8E", -ERANGE);
	bad("9223372036854775808", -ERANGE);
	bad("99999999999999999999", -ERANGE);
	bad("18446744073709551616K", -ERANGE);
	bad("16777216T", -ERANGE);
}
END_TEST

START_TEST(test_uint)
{
	uint64_t v;

	ck_assert(parse_uint("16", 1024, &v) && v == 16);
	ck_assert(parse_uint("1024", 1024, &v) && v == 1024);
	ck_assert(!parse_uint("1025", 1024, &v));
	ck_assert(!parse_uint("0", 1024, &v));
	ck_assert(!parse_uint("-3", 1024, &v));
	ck_assert(!parse_uint("3x", 1024, &v));
	ck_assert(!parse_uint("", 1024, &v));
	ck_assert(!parse_uint("99999999999999999999999", UINT64_MAX, &v));
}
END_TEST

START_TEST(test_human)
{
	char buf[32];

	ck_assert_str_eq(human_size(0, buf, sizeof buf), "0 B");
	ck_assert_str_eq(human_size(1023, buf, sizeof buf), "1023 B");
	ck_assert_str_eq(human_size(1536, buf, sizeof buf), "1.5 KiB");
	ck_assert_str_eq(human_size(2ull << 30, buf, sizeof buf), "2.0 GiB");
}
END_TEST

int
main(void)
{
	Suite *s = suite_create("size");
	TCase *tc = tcase_create("parse");

	tcase_add_test(tc, test_forms);
	tcase_add_test(tc, test_rejects);
	tcase_add_test(tc, test_uint);
	tcase_add_test(tc, test_human);
	suite_add_tcase(s, tc);
	return run_suite(s) ? EXIT_FAILURE : EXIT_SUCCESS;
}
