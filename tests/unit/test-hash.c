/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * lib/hash.c: digests are XXH3-128 in canonical (big-endian) byte order,
 * the streaming digest equals the one-shot digest, and any single changed
 * byte changes the digest.
 */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

#include "hash.h"
#include "helpers.h"

START_TEST(test_known_values)
{
	struct bm_digest d;
	char hex[33];
	XXH128_hash_t h = XXH3_128bits("", 0);
	char want[33];

	/* Canonical order: the high 64 bits first, each big-endian. */
	snprintf(want, sizeof want, "%016llx%016llx",
		 (unsigned long long)h.high64, (unsigned long long)h.low64);
	bm_hash_buffer("", 0, &d);
	bm_digest_hex(&d, hex);
	ck_assert_str_eq(hex, want);
	/* The published XXH3-128 of the empty input. */
	ck_assert_str_eq(hex, "99aa06d3014798d86001c324468d497f");
}
END_TEST

START_TEST(test_stream_matches_buffer)
{
	unsigned char buf[10000];
	struct bm_digest a, b;
	struct bm_hash_stream *s;

	srand(7);
	for (size_t i = 0; i < sizeof buf; i++)
		buf[i] = (unsigned char)rand();
	bm_hash_buffer(buf, sizeof buf, &a);
	s = bm_hash_stream_new();
	ck_assert_ptr_nonnull(s);
	for (size_t off = 0; off < sizeof buf; off += 777) {
		size_t n = sizeof buf - off < 777 ? sizeof buf - off : 777;

		bm_hash_stream_add(s, buf + off, n);
	}
	bm_hash_stream_end(s, &b);
	bm_hash_stream_free(s);
	ck_assert_mem_eq(a.bytes, b.bytes, 16);
}
END_TEST

START_TEST(test_every_byte_matters)
{
	static unsigned char buf[65536];
	struct bm_digest base, d;

	memset(buf, 0, sizeof buf);
	bm_hash_buffer(buf, sizeof buf, &base);
	for (size_t i = 0; i < sizeof buf; i += 509) {
		buf[i] = 1;
		bm_hash_buffer(buf, sizeof buf, &d);
		ck_assert_msg(memcmp(base.bytes, d.bytes, 16) != 0,
			      "byte %zu did not change the digest", i);
		buf[i] = 0;
	}
	/* Length is part of the digest: zeroes of two lengths differ. */
	bm_hash_buffer(buf, sizeof buf - 1, &d);
	ck_assert(memcmp(base.bytes, d.bytes, 16) != 0);
}
END_TEST

int
main(void)
{
	Suite *s = suite_create("hash");
	TCase *tc = tcase_create("xxh3");

	tcase_add_test(tc, test_known_values);
	tcase_add_test(tc, test_stream_matches_buffer);
	tcase_add_test(tc, test_every_byte_matters);
	suite_add_tcase(s, tc);
	return run_suite(s) ? EXIT_FAILURE : EXIT_SUCCESS;
}
