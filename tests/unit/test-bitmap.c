/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Unit tests of the dirty bitmap (lib/bitmap.c).
 *
 * The fixed tests pin down the edges of the contract in bitmap.h: bad
 * granularities, size 0, sizes that are not a multiple of the granularity,
 * the touch-versus-cover rule of set_range and clear_range, ranges that
 * clip at the end or overflow, runs across word boundaries and max_length
 * in next_dirty.  The randomized test drives the bitmap and a naive model
 * (one bool per chunk, every query answered by brute force) through the
 * same seeded sequence of operations and compares every query after every
 * step, at several geometries.
 */
#include <check.h>
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bitmap.h"
#include "helpers.h"
#include "internal.h"

#define KiB BM_KiB
#define TiB (UINT64_C(1) << 40)

/*
 * ck_assert_* records a mark point on every success, which is far too slow
 * for the inner loops below; EXPECT only calls into Check on failure.
 */
#define EXPECT(cond, ...)				\
	do {						\
		if (!(cond))				\
			ck_abort_msg(__VA_ARGS__);	\
	} while (0)

#define U(x) ((unsigned long long)(x))

/*
 * Let the -ENOMEM test see calloc() fail instead of AddressSanitizer
 * aborting the process; harmless in builds without it.
 */
const char *__asan_default_options(void);

const char *
__asan_default_options(void)
{
	return "allocator_may_return_null=1";
}

/* splitmix64: small, and the same sequence everywhere, unlike rand(). */
static uint64_t rng_state;

static uint64_t
rng(void)
{
	uint64_t z = (rng_state += UINT64_C(0x9e3779b97f4a7c15));

	z = (z ^ (z >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
	z = (z ^ (z >> 27)) * UINT64_C(0x94d049bb133111eb);
	return z ^ (z >> 31);
}

/* [0, n), n > 0. */
static uint64_t
rng_below(uint64_t n)
{
	return rng() % n;
}

/* Are exactly the chunks [first, end) set, and nothing else? */
static void
expect_only(const struct bm_bitmap *b, uint64_t first, uint64_t end)
{
	uint64_t g = bm_bitmap_granularity(b), c;

	ck_assert_uint_eq(bm_bitmap_count(b), end - first);
	for (c = 0; c < b->nbits; c++)
		EXPECT(bm_bitmap_test(b, c * g) == (c >= first && c < end),
		       "chunk %llu: expected %d", U(c),
		       c >= first && c < end);
}

/* Fixed tests */

START_TEST(test_init_bad_granularity)
{
	static const uint64_t bad[] = {
		0, 3, 6, 1000, 4097, (UINT64_C(1) << 40) + 1,
		UINT64_C(1) << 41, UINT64_C(1) << 63, UINT64_MAX,
	};
	struct bm_bitmap b;
	size_t i;

	for (i = 0; i < BM_ARRAY_SIZE(bad); i++) {
		memset(&b, 0xa5, sizeof(b));
		ck_assert_int_eq(bm_bitmap_init(&b, 1 << 20, bad[i]),
				 -EINVAL);
		/* Left zeroed, so freeing it is harmless. */
		ck_assert_ptr_null(b.words);
		ck_assert_uint_eq(b.nbits, 0);
		bm_bitmap_free(&b);
	}
}
END_TEST

START_TEST(test_init_geometry)
{
	static const struct {
		uint64_t size, gran, nbits;
	} t[] = {
		{ 0, 1, 0 },
		{ 0, TiB, 0 },
		{ 1, 1, 1 },
		{ 1, 4096, 1 },
		{ 4095, 4096, 1 },
		{ 4096, 4096, 1 },
		{ 4097, 4096, 2 },
		{ 64 * 512, 512, 64 },
		{ 64 * 512 + 1, 512, 65 },
		{ 1000, 1, 1000 },
		{ 3 * TiB, TiB, 3 },
		{ UINT64_MAX, TiB, UINT64_C(1) << 24 },
		{ UINT64_MAX - TiB + 2, TiB, UINT64_C(1) << 24 },
		{ UINT64_MAX - TiB + 1, TiB, (UINT64_C(1) << 24) - 1 },
	};
	struct bm_bitmap b;
	size_t i;

	for (i = 0; i < BM_ARRAY_SIZE(t); i++) {
		ck_assert_int_eq(bm_bitmap_init(&b, t[i].size, t[i].gran), 0);
		ck_assert_uint_eq(b.size, t[i].size);
		ck_assert_uint_eq(b.nbits, t[i].nbits);
		ck_assert_uint_eq(bm_bitmap_granularity(&b), t[i].gran);
		ck_assert_uint_eq(bm_bitmap_count(&b), 0);
		ck_assert_uint_eq(bm_bitmap_dirty_bytes(&b), 0);
		bm_bitmap_free(&b);
		ck_assert_ptr_null(b.words);
	}
}
END_TEST

START_TEST(test_init_enomem)
{
	struct bm_bitmap b;

	/* 2^64 one-byte chunks: 2 EiB of words. */
	ck_assert_int_eq(bm_bitmap_init(&b, UINT64_MAX, 1), -ENOMEM);
	ck_assert_ptr_null(b.words);
	ck_assert_uint_eq(b.nbits, 0);
	bm_bitmap_free(&b);
}
END_TEST

START_TEST(test_free_reinit)
{
	struct bm_bitmap b;

	memset(&b, 0, sizeof(b));
	bm_bitmap_free(&b);
	bm_bitmap_free(&b);
	ck_assert_int_eq(bm_bitmap_init(&b, 100 * KiB, 4 * KiB), 0);
	bm_bitmap_set_all(&b);
	bm_bitmap_free(&b);
	bm_bitmap_free(&b);
	ck_assert_int_eq(bm_bitmap_init(&b, 10, 1), 0);
	ck_assert_uint_eq(bm_bitmap_count(&b), 0);
	ck_assert(!bm_bitmap_test(&b, 0));
	bm_bitmap_free(&b);
}
END_TEST

START_TEST(test_size_zero)
{
	uint64_t off = 1, len = 1;
	struct bm_bitmap b;

	ck_assert_int_eq(bm_bitmap_init(&b, 0, 512), 0);
	bm_bitmap_set_range(&b, 0, 100);
	bm_bitmap_set_range(&b, 0, UINT64_MAX);
	bm_bitmap_set_all(&b);
	ck_assert_uint_eq(bm_bitmap_count(&b), 0);
	ck_assert_uint_eq(bm_bitmap_dirty_bytes(&b), 0);
	ck_assert(!bm_bitmap_test(&b, 0));
	ck_assert(!bm_bitmap_test_range(&b, 0, UINT64_MAX));
	ck_assert(!bm_bitmap_next_dirty(&b, 0, 0, &off, &len));
	/* Outputs untouched on false. */
	ck_assert_uint_eq(off, 1);
	ck_assert_uint_eq(len, 1);
	bm_bitmap_clear_range(&b, 0, UINT64_MAX);
	bm_bitmap_clear_all(&b);
	ck_assert_uint_eq(bm_bitmap_count(&b), 0);
	bm_bitmap_free(&b);
}
END_TEST

/* 11 chunks of 4 KiB, the last one 100 bytes. */
#define G 4096
#define SIZE (10 * G + 100)

START_TEST(test_set_range_touches)
{
	struct bm_bitmap b;

	ck_assert_int_eq(bm_bitmap_init(&b, SIZE, G), 0);
	bm_bitmap_set_range(&b, G - 1, 2);
	expect_only(&b, 0, 2);
	/* Setting again changes nothing. */
	bm_bitmap_set_range(&b, 0, 2 * G);
	expect_only(&b, 0, 2);
	bm_bitmap_set_range(&b, 2 * G, 1);
	expect_only(&b, 0, 3);
	bm_bitmap_set_range(&b, 3 * G - 1, 1);
	expect_only(&b, 0, 3);

	/* Empty ranges and ranges past the end touch nothing. */
	bm_bitmap_set_range(&b, 5 * G, 0);
	bm_bitmap_set_range(&b, SIZE, 1);
	bm_bitmap_set_range(&b, SIZE, UINT64_MAX);
	bm_bitmap_set_range(&b, SIZE + G, G);
	bm_bitmap_set_range(&b, UINT64_MAX, UINT64_MAX);
	bm_bitmap_set_range(&b, UINT64_MAX - 1, 1);
	expect_only(&b, 0, 3);

	/* Clipped at the end, including when offset + length overflows. */
	bm_bitmap_clear_all(&b);
	bm_bitmap_set_range(&b, SIZE - 1, UINT64_MAX);
	expect_only(&b, 10, 11);
	ck_assert_uint_eq(bm_bitmap_dirty_bytes(&b), 100);
	ck_assert(bm_bitmap_test(&b, SIZE - 1));
	ck_assert(!bm_bitmap_test(&b, SIZE));
	bm_bitmap_set_range(&b, 9 * G + 1, 5 * G);
	expect_only(&b, 9, 11);
	ck_assert_uint_eq(bm_bitmap_dirty_bytes(&b), G + 100);

	bm_bitmap_set_range(&b, 0, UINT64_MAX);
	expect_only(&b, 0, 11);
	ck_assert_uint_eq(bm_bitmap_dirty_bytes(&b), SIZE);
	bm_bitmap_free(&b);
}
END_TEST

START_TEST(test_clear_range_covers)
{
	struct bm_bitmap b;

	ck_assert_int_eq(bm_bitmap_init(&b, SIZE, G), 0);
	bm_bitmap_set_all(&b);
	expect_only(&b, 0, 11);

	/* Partly covered chunks stay. */
	bm_bitmap_clear_range(&b, 1, G);
	bm_bitmap_clear_range(&b, 0, G - 1);
	bm_bitmap_clear_range(&b, G + 1, G);
	bm_bitmap_clear_range(&b, 3 * G - 1, G);
	expect_only(&b, 0, 11);

	/* Empty ranges and ranges past the end clear nothing. */
	bm_bitmap_clear_range(&b, 0, 0);
	bm_bitmap_clear_range(&b, SIZE, UINT64_MAX);
	bm_bitmap_clear_range(&b, UINT64_MAX, UINT64_MAX);
	expect_only(&b, 0, 11);

	bm_bitmap_clear_range(&b, 0, G);
	expect_only(&b, 1, 11);
	/* [4097, 16385) covers chunks 2 and 3 only. */
	bm_bitmap_set_all(&b);
	bm_bitmap_clear_range(&b, G + 1, 3 * G);
	ck_assert_uint_eq(bm_bitmap_count(&b), 9);
	ck_assert(bm_bitmap_test(&b, G));
	ck_assert(!bm_bitmap_test(&b, 2 * G));
	ck_assert(!bm_bitmap_test(&b, 3 * G));
	ck_assert(bm_bitmap_test(&b, 4 * G));
	/* Clearing clear chunks keeps the count exact. */
	bm_bitmap_clear_range(&b, 0, 5 * G);
	ck_assert_uint_eq(bm_bitmap_count(&b), 6);
	ck_assert_uint_eq(bm_bitmap_dirty_bytes(&b), 5 * G + 100);

	/* The partial last chunk is covered only by reaching the end. */
	bm_bitmap_set_all(&b);
	bm_bitmap_clear_range(&b, 10 * G, 99);
	bm_bitmap_clear_range(&b, 10 * G + 1, 99);
	bm_bitmap_clear_range(&b, 10 * G + 1, UINT64_MAX);
	expect_only(&b, 0, 11);
	bm_bitmap_clear_range(&b, 10 * G, 100);
	expect_only(&b, 0, 10);
	bm_bitmap_set_all(&b);
	bm_bitmap_clear_range(&b, 10 * G, 101);
	expect_only(&b, 0, 10);
	bm_bitmap_set_all(&b);
	bm_bitmap_clear_range(&b, 9 * G, UINT64_MAX);
	expect_only(&b, 0, 9);
	bm_bitmap_set_all(&b);
	bm_bitmap_clear_range(&b, 0, SIZE);
	expect_only(&b, 0, 0);
	bm_bitmap_free(&b);

	/* Size a multiple of the granularity: no special last chunk. */
	ck_assert_int_eq(bm_bitmap_init(&b, 8 * G, G), 0);
	bm_bitmap_set_all(&b);
	bm_bitmap_clear_range(&b, 7 * G, G - 1);
	expect_only(&b, 0, 8);
	bm_bitmap_clear_range(&b, 7 * G, G);
	expect_only(&b, 0, 7);
	bm_bitmap_free(&b);
}
END_TEST

START_TEST(test_test_range)
{
	struct bm_bitmap b;

	ck_assert_int_eq(bm_bitmap_init(&b, SIZE, G), 0);
	bm_bitmap_set_range(&b, 4 * G, 1);
	ck_assert(bm_bitmap_test(&b, 4 * G));
	ck_assert(bm_bitmap_test(&b, 5 * G - 1));
	ck_assert(!bm_bitmap_test(&b, 4 * G - 1));
	ck_assert(!bm_bitmap_test(&b, 5 * G));

	ck_assert(bm_bitmap_test_range(&b, 4 * G - 1, 2));
	ck_assert(bm_bitmap_test_range(&b, 5 * G - 1, 1));
	ck_assert(bm_bitmap_test_range(&b, 0, UINT64_MAX));
	ck_assert(!bm_bitmap_test_range(&b, 0, 4 * G));
	ck_assert(!bm_bitmap_test_range(&b, 5 * G, UINT64_MAX));
	ck_assert(!bm_bitmap_test_range(&b, 4 * G, 0));

	/* The last chunk, clipped, and nothing past the end. */
	bm_bitmap_set_range(&b, SIZE - 1, 1);
	ck_assert(bm_bitmap_test_range(&b, SIZE - 1, UINT64_MAX));
	ck_assert(bm_bitmap_test_range(&b, 10 * G, 1));
	ck_assert(!bm_bitmap_test_range(&b, SIZE, UINT64_MAX));
	ck_assert(!bm_bitmap_test_range(&b, UINT64_MAX, UINT64_MAX));
	ck_assert(!bm_bitmap_test(&b, SIZE));
	ck_assert(!bm_bitmap_test(&b, UINT64_MAX));
	bm_bitmap_free(&b);
}
END_TEST

#undef G
#undef SIZE

/*
 * With granularity 1, set and clear runs [a, e) for every pair of positions
 * around the word boundaries, and check every query against the run.
 */
START_TEST(test_word_boundaries)
{
	static const uint64_t pos[] = {
		0, 1, 2, 62, 63, 64, 65, 127, 128, 129, 191, 192, 193,
		255, 256, 320, 511, 512, 513, 997, 998, 999, 1000,
	};
	uint64_t size = 1000, off, len, a, e, c;
	struct bm_bitmap b;
	size_t i, j;

	ck_assert_int_eq(bm_bitmap_init(&b, size, 1), 0);
	for (i = 0; i < BM_ARRAY_SIZE(pos); i++) {
		for (j = i + 1; j < BM_ARRAY_SIZE(pos); j++) {
			a = pos[i];
			e = pos[j];
			bm_bitmap_clear_all(&b);
			bm_bitmap_set_range(&b, a, e - a);
			EXPECT(bm_bitmap_count(&b) == e - a, "[%llu, %llu)",
			       U(a), U(e));
			for (c = 0; c < size; c++)
				EXPECT(bm_bitmap_test(&b, c) ==
				       (c >= a && c < e),
				       "[%llu, %llu) at %llu", U(a), U(e),
				       U(c));
			EXPECT(bm_bitmap_next_dirty(&b, 0, 0, &off, &len) &&
			       off == a && len == e - a,
			       "[%llu, %llu)", U(a), U(e));
			EXPECT(!bm_bitmap_next_dirty(&b, e, 0, &off, &len),
			       "[%llu, %llu)", U(a), U(e));
			EXPECT(bm_bitmap_test_range(&b, 0, a + 1),
			       "[%llu, %llu)", U(a), U(e));
			EXPECT(bm_bitmap_test_range(&b, e - 1, size),
			       "[%llu, %llu)", U(a), U(e));
			EXPECT(!bm_bitmap_test_range(&b, 0, a),
			       "[%llu, %llu)", U(a), U(e));
			EXPECT(!bm_bitmap_test_range(&b, e, size),
			       "[%llu, %llu)", U(a), U(e));

			/* Clear all but the two ends of the run. */
			if (e - a > 2)
				bm_bitmap_clear_range(&b, a + 1, e - a - 2);
			EXPECT(bm_bitmap_count(&b) == BM_MIN(e - a, 2),
			       "[%llu, %llu)", U(a), U(e));
			EXPECT(bm_bitmap_test(&b, a) &&
			       bm_bitmap_test(&b, e - 1),
			       "[%llu, %llu)", U(a), U(e));
			bm_bitmap_clear_range(&b, a, e - a);
			EXPECT(bm_bitmap_count(&b) == 0, "[%llu, %llu)",
			       U(a), U(e));
		}
	}
	bm_bitmap_free(&b);
}
END_TEST

START_TEST(test_next_dirty)
{
	uint64_t g = 4096, size = 10 * g + 100, off, len;
	struct bm_bitmap b;

	ck_assert_int_eq(bm_bitmap_init(&b, size, g), 0);
	ck_assert(!bm_bitmap_next_dirty(&b, 0, 0, &off, &len));

	/* Chunks 3, 4 and 5. */
	bm_bitmap_set_range(&b, 3 * g + 10, 2 * g);
	ck_assert(bm_bitmap_next_dirty(&b, 0, 0, &off, &len));
	ck_assert_uint_eq(off, 3 * g);
	ck_assert_uint_eq(len, 3 * g);
	/* The run starts at the chunk holding `from`, before it. */
	ck_assert(bm_bitmap_next_dirty(&b, 3 * g + 5, 0, &off, &len));
	ck_assert_uint_eq(off, 3 * g);
	ck_assert_uint_eq(len, 3 * g);
	ck_assert(bm_bitmap_next_dirty(&b, 5 * g - 1, 0, &off, &len));
	ck_assert_uint_eq(off, 4 * g);
	ck_assert_uint_eq(len, 2 * g);
	ck_assert(!bm_bitmap_next_dirty(&b, 6 * g, 0, &off, &len));

	/* max_length: whole chunks, at least one. */
	ck_assert(bm_bitmap_next_dirty(&b, 0, 1, &off, &len));
	ck_assert_uint_eq(off, 3 * g);
	ck_assert_uint_eq(len, g);
	ck_assert(bm_bitmap_next_dirty(&b, 0, g, &off, &len));
	ck_assert_uint_eq(len, g);
	ck_assert(bm_bitmap_next_dirty(&b, 0, 2 * g - 1, &off, &len));
	ck_assert_uint_eq(len, g);
	ck_assert(bm_bitmap_next_dirty(&b, 0, 2 * g, &off, &len));
	ck_assert_uint_eq(len, 2 * g);
	ck_assert(bm_bitmap_next_dirty(&b, 0, 3 * g, &off, &len));
	ck_assert_uint_eq(len, 3 * g);
	ck_assert(bm_bitmap_next_dirty(&b, 0, 100 * g, &off, &len));
	ck_assert_uint_eq(len, 3 * g);
	ck_assert(bm_bitmap_next_dirty(&b, 0, UINT64_MAX, &off, &len));
	ck_assert_uint_eq(len, 3 * g);

	/* The partial last chunk is clipped at size. */
	bm_bitmap_set_range(&b, size - 1, 1);
	ck_assert(bm_bitmap_next_dirty(&b, 6 * g, 0, &off, &len));
	ck_assert_uint_eq(off, 10 * g);
	ck_assert_uint_eq(len, 100);
	ck_assert(bm_bitmap_next_dirty(&b, size - 1, 1, &off, &len));
	ck_assert_uint_eq(off, 10 * g);
	ck_assert_uint_eq(len, 100);
	bm_bitmap_set_range(&b, 9 * g, 1);
	ck_assert(bm_bitmap_next_dirty(&b, 6 * g, 0, &off, &len));
	ck_assert_uint_eq(off, 9 * g);
	ck_assert_uint_eq(len, g + 100);
	ck_assert(bm_bitmap_next_dirty(&b, 6 * g, g, &off, &len));
	ck_assert_uint_eq(len, g);
	ck_assert(!bm_bitmap_next_dirty(&b, size, 0, &off, &len));
	ck_assert(!bm_bitmap_next_dirty(&b, UINT64_MAX, 0, &off, &len));
	bm_bitmap_free(&b);

	/* Runs across word boundaries, granularity 1. */
	ck_assert_int_eq(bm_bitmap_init(&b, 300, 1), 0);
	bm_bitmap_set_range(&b, 60, 70);
	ck_assert(bm_bitmap_next_dirty(&b, 0, 0, &off, &len));
	ck_assert_uint_eq(off, 60);
	ck_assert_uint_eq(len, 70);
	ck_assert(bm_bitmap_next_dirty(&b, 64, 0, &off, &len));
	ck_assert_uint_eq(off, 64);
	ck_assert_uint_eq(len, 66);
	ck_assert(bm_bitmap_next_dirty(&b, 0, 4, &off, &len));
	ck_assert_uint_eq(off, 60);
	ck_assert_uint_eq(len, 4);
	ck_assert(bm_bitmap_next_dirty(&b, 0, 69, &off, &len));
	ck_assert_uint_eq(len, 69);
	bm_bitmap_set_range(&b, 200, 100);
	ck_assert(bm_bitmap_next_dirty(&b, 130, 0, &off, &len));
	ck_assert_uint_eq(off, 200);
	ck_assert_uint_eq(len, 100);
	bm_bitmap_set_all(&b);
	ck_assert(bm_bitmap_next_dirty(&b, 1, 0, &off, &len));
	ck_assert_uint_eq(off, 1);
	ck_assert_uint_eq(len, 299);
	bm_bitmap_free(&b);
}
END_TEST

START_TEST(test_dirty_bytes)
{
	struct bm_bitmap b;

	ck_assert_int_eq(bm_bitmap_init(&b, 3 * 512 + 1, 512), 0);
	bm_bitmap_set_range(&b, 3 * 512, 1);
	ck_assert_uint_eq(bm_bitmap_dirty_bytes(&b), 1);
	bm_bitmap_set_range(&b, 0, 1);
	ck_assert_uint_eq(bm_bitmap_dirty_bytes(&b), 513);
	bm_bitmap_set_all(&b);
	ck_assert_uint_eq(bm_bitmap_count(&b), 4);
	ck_assert_uint_eq(bm_bitmap_dirty_bytes(&b), 3 * 512 + 1);
	bm_bitmap_clear_range(&b, 0, 512);
	ck_assert_uint_eq(bm_bitmap_dirty_bytes(&b), 2 * 512 + 1);
	bm_bitmap_clear_range(&b, 3 * 512, 1);
	ck_assert_uint_eq(bm_bitmap_dirty_bytes(&b), 2 * 512);
	bm_bitmap_clear_all(&b);
	ck_assert_uint_eq(bm_bitmap_dirty_bytes(&b), 0);
	bm_bitmap_free(&b);
}
END_TEST

/* Chunks set in both of two bitmaps, across words, with a short last
 * chunk. */
START_TEST(test_both_bytes)
{
	struct bm_bitmap a, b;
	const uint64_t size = 200 * 512 + 7;

	ck_assert_int_eq(bm_bitmap_init(&a, size, 512), 0);
	ck_assert_int_eq(bm_bitmap_init(&b, size, 512), 0);
	ck_assert_uint_eq(bm_bitmap_both_bytes(&a, &b), 0);
	bm_bitmap_set_range(&a, 0, 100 * 512);
	ck_assert_uint_eq(bm_bitmap_both_bytes(&a, &b), 0);
	bm_bitmap_set_range(&b, 60 * 512, 70 * 512);   /* chunks 60..129 */
	ck_assert_uint_eq(bm_bitmap_both_bytes(&a, &b), 40 * 512);
	ck_assert_uint_eq(bm_bitmap_both_bytes(&b, &a), 40 * 512);
	bm_bitmap_set_range(&a, size - 1, 1);          /* the short chunk */
	ck_assert_uint_eq(bm_bitmap_both_bytes(&a, &b), 40 * 512);
	bm_bitmap_set_range(&b, size - 1, 1);
	ck_assert_uint_eq(bm_bitmap_both_bytes(&a, &b), 40 * 512 + 7);
	bm_bitmap_set_all(&a);
	bm_bitmap_set_all(&b);
	ck_assert_uint_eq(bm_bitmap_both_bytes(&a, &b), size);
	bm_bitmap_free(&a);
	bm_bitmap_free(&b);
}
END_TEST

/* test_all: every touched chunk set, across words, clipped at the end. */
START_TEST(test_test_all)
{
	struct bm_bitmap b;
	const uint64_t size = 200 * 512 + 7;

	ck_assert_int_eq(bm_bitmap_init(&b, size, 512), 0);
	ck_assert(!bm_bitmap_test_all(&b, 0, 512));
	bm_bitmap_set_range(&b, 60 * 512, 70 * 512);   /* chunks 60..129 */
	ck_assert(bm_bitmap_test_all(&b, 60 * 512, 70 * 512));
	ck_assert(bm_bitmap_test_all(&b, 60 * 512 + 1, 1));
	ck_assert(!bm_bitmap_test_all(&b, 59 * 512, 2 * 512));
	ck_assert(!bm_bitmap_test_all(&b, 129 * 512, 512 + 1));
	ck_assert(!bm_bitmap_test_all(&b, 70 * 512, 0));
	bm_bitmap_set_range(&b, size - 1, 1);
	ck_assert(bm_bitmap_test_all(&b, size - 7, 100)); /* clipped */
	ck_assert(!bm_bitmap_test_all(&b, size, 1));
	bm_bitmap_set_all(&b);
	ck_assert(bm_bitmap_test_all(&b, 0, size));
	bm_bitmap_free(&b);
}
END_TEST

/* assign: a copy or the complement, bits past the end left clear, the
 * count exact. */
START_TEST(test_assign)
{
	struct bm_bitmap a, b;
	const uint64_t size = 200 * 512 + 7;   /* 201 chunks: a tail word */

	ck_assert_int_eq(bm_bitmap_init(&a, size, 512), 0);
	ck_assert_int_eq(bm_bitmap_init(&b, size, 512), 0);
	bm_bitmap_set_range(&a, 60 * 512, 70 * 512);
	bm_bitmap_set_range(&a, size - 1, 1);
	bm_bitmap_assign(&b, &a, false);
	ck_assert_uint_eq(bm_bitmap_count(&b), 71);
	ck_assert_uint_eq(bm_bitmap_both_bytes(&a, &b), 70 * 512 + 7);
	bm_bitmap_assign(&b, &a, true);
	ck_assert_uint_eq(bm_bitmap_count(&b), 201 - 71);
	ck_assert_uint_eq(bm_bitmap_both_bytes(&a, &b), 0);
	ck_assert(bm_bitmap_test(&b, 0));
	ck_assert(!bm_bitmap_test(&b, 60 * 512));
	ck_assert(!bm_bitmap_test(&b, size - 1));
	ck_assert_uint_eq(bm_bitmap_dirty_bytes(&b), 130 * 512);
	/* The complement of the complement is the original. */
	bm_bitmap_assign(&a, &b, true);
	ck_assert_uint_eq(bm_bitmap_count(&a), 71);
	ck_assert_uint_eq(bm_bitmap_dirty_bytes(&a), 70 * 512 + 7);
	bm_bitmap_free(&a);
	bm_bitmap_free(&b);
}
END_TEST

/* 2^24 chunks of 1 TiB, the last one a byte short: nothing may overflow. */
START_TEST(test_huge)
{
	uint64_t nbits = UINT64_C(1) << 24, last = (nbits - 1) * TiB;
	uint64_t off, len;
	struct bm_bitmap b;

	ck_assert_int_eq(bm_bitmap_init(&b, UINT64_MAX, TiB), 0);
	bm_bitmap_set_all(&b);
	ck_assert_uint_eq(bm_bitmap_count(&b), nbits);
	ck_assert_uint_eq(bm_bitmap_dirty_bytes(&b), UINT64_MAX);
	ck_assert(bm_bitmap_next_dirty(&b, 0, 0, &off, &len));
	ck_assert_uint_eq(off, 0);
	ck_assert_uint_eq(len, UINT64_MAX);
	ck_assert(bm_bitmap_next_dirty(&b, UINT64_MAX - 1, 0, &off, &len));
	ck_assert_uint_eq(off, last);
	ck_assert_uint_eq(len, TiB - 1);
	ck_assert(bm_bitmap_next_dirty(&b, TiB, 2 * TiB, &off, &len));
	ck_assert_uint_eq(off, TiB);
	ck_assert_uint_eq(len, 2 * TiB);

	bm_bitmap_clear_range(&b, TiB, UINT64_MAX);
	ck_assert_uint_eq(bm_bitmap_count(&b), 1);
	bm_bitmap_clear_range(&b, 0, UINT64_MAX);
	ck_assert_uint_eq(bm_bitmap_count(&b), 0);

	bm_bitmap_set_range(&b, UINT64_MAX - 1, UINT64_MAX);
	ck_assert_uint_eq(bm_bitmap_count(&b), 1);
	ck_assert_uint_eq(bm_bitmap_dirty_bytes(&b), TiB - 1);
	ck_assert(bm_bitmap_test(&b, last));
	ck_assert(bm_bitmap_test(&b, UINT64_MAX - 1));
	ck_assert(!bm_bitmap_test(&b, UINT64_MAX));
	ck_assert(!bm_bitmap_test(&b, last - 1));
	ck_assert(bm_bitmap_test_range(&b, 0, UINT64_MAX));
	ck_assert(bm_bitmap_next_dirty(&b, 0, 0, &off, &len));
	ck_assert_uint_eq(off, last);
	ck_assert_uint_eq(len, TiB - 1);
	bm_bitmap_clear_range(&b, last, TiB - 2);
	ck_assert_uint_eq(bm_bitmap_count(&b), 1);
	bm_bitmap_clear_range(&b, last, TiB - 1);
	ck_assert_uint_eq(bm_bitmap_count(&b), 0);

	/* A range of most of the disk, word at a time. */
	bm_bitmap_set_range(&b, TiB - 1, 1000 * TiB);
	ck_assert_uint_eq(bm_bitmap_count(&b), 1001);
	bm_bitmap_set_range(&b, 500 * TiB, UINT64_MAX);
	ck_assert_uint_eq(bm_bitmap_count(&b), nbits);
	bm_bitmap_clear_range(&b, 100 * TiB, 200 * TiB);
	ck_assert_uint_eq(bm_bitmap_count(&b), nbits - 200);
	ck_assert(bm_bitmap_next_dirty(&b, 0, 0, &off, &len));
	ck_assert_uint_eq(off, 0);
	ck_assert_uint_eq(len, 100 * TiB);
	ck_assert(bm_bitmap_next_dirty(&b, 100 * TiB, 0, &off, &len));
	ck_assert_uint_eq(off, 300 * TiB);
	ck_assert_uint_eq(len, UINT64_MAX - 300 * TiB);
	bm_bitmap_free(&b);
}
END_TEST

/* Randomized comparison with a naive model */

struct model {
	uint64_t size;
	uint64_t gran;
	uint64_t nbits;
	bool *bit;
};

/* offset + length, saturated: anything past 2^64 - 1 is past every chunk. */
static uint64_t
sat_end(uint64_t offset, uint64_t length)
{
	return offset > UINT64_MAX - length ? UINT64_MAX : offset + length;
}

static uint64_t
chunk_end(const struct model *m, uint64_t c)
{
	return c + 1 == m->nbits ? m->size : (c + 1) * m->gran;
}

static bool
touches(const struct model *m, uint64_t c, uint64_t offset, uint64_t length)
{
	return length && c * m->gran < sat_end(offset, length) &&
	       offset < chunk_end(m, c);
}

static bool
covers(const struct model *m, uint64_t c, uint64_t offset, uint64_t length)
{
	return length && offset <= c * m->gran &&
	       chunk_end(m, c) <= sat_end(offset, length);
}

static void
model_set_range(struct model *m, uint64_t offset, uint64_t length)
{
	uint64_t c;

	for (c = 0; c < m->nbits; c++)
		if (touches(m, c, offset, length))
			m->bit[c] = true;
}

static void
model_clear_range(struct model *m, uint64_t offset, uint64_t length)
{
	uint64_t c;

	for (c = 0; c < m->nbits; c++)
		if (covers(m, c, offset, length))
			m->bit[c] = false;
}

static bool
model_test_range(const struct model *m, uint64_t offset, uint64_t length)
{
	uint64_t c;

	for (c = 0; c < m->nbits; c++)
		if (m->bit[c] && touches(m, c, offset, length))
			return true;
	return false;
}

static bool
model_next_dirty(const struct model *m, uint64_t from, uint64_t max_length,
		 uint64_t *offset, uint64_t *length)
{
	uint64_t c, e, limit = UINT64_MAX;

	if (max_length)
		limit = BM_MAX(max_length / m->gran, 1);
	for (c = 0; c < m->nbits; c++) {
		if (!m->bit[c] || chunk_end(m, c) <= from)
			continue;
		for (e = c; e < m->nbits && m->bit[e] && e - c < limit; e++)
			;
		*offset = c * m->gran;
		*length = chunk_end(m, e - 1) - *offset;
		return true;
	}
	return false;
}

static uint64_t
model_count(const struct model *m)
{
	uint64_t c, n = 0;

	for (c = 0; c < m->nbits; c++)
		n += m->bit[c];
	return n;
}

static uint64_t
model_dirty_bytes(const struct model *m)
{
	uint64_t c, n = 0;

	for (c = 0; c < m->nbits; c++)
		if (m->bit[c])
			n += chunk_end(m, c) - c * m->gran;
	return n;
}

/* Mostly near chunk boundaries, sometimes anywhere, at or past the end. */
static uint64_t
rand_delta(uint64_t g)
{
	switch (rng_below(4)) {
	case 0:
		return 0;
	case 1:
		return g - 1;
	case 2:
		return BM_MIN(g - 1, 1);
	default:
		return rng_below(g);
	}
}

static uint64_t
rand_offset(const struct model *m)
{
	switch (rng_below(16)) {
	case 0:
		return rng_below(m->size + 1);
	case 1:
		return m->size - BM_MIN(m->size, rng_below(3));
	case 2:
		return m->size + rng_below(2 * m->gran);
	case 3:
		return UINT64_MAX - rng_below(2);
	default:
		return rng_below(m->nbits + 1) * m->gran + rand_delta(m->gran);
	}
}

static uint64_t
rand_length(const struct model *m)
{
	uint64_t n;

	switch (rng_below(16)) {
	case 0:
		return 0;
	case 1:
		return UINT64_MAX - rng_below(2);
	case 2:
		return m->size;
	case 3:
		return 1 + rng_below(2 * m->gran);
	case 4:
		/* Whole words' worth of chunks. */
		return 64 * (1 + rng_below(3)) * m->gran;
	default:
		n = rng_below(BM_MIN(m->nbits, 150) + 1);
		if (n && rng_below(4) == 0)
			return n * m->gran - 1;
		return n * m->gran + rand_delta(m->gran);
	}
}

static uint64_t
rand_max_length(const struct model *m)
{
	switch (rng_below(6)) {
	case 0:
	case 1:
		return 0;
	case 2:
		return 1 + rng_below(m->gran);
	case 3:
		return UINT64_MAX;
	default:
		return rand_length(m);
	}
}

/*
 * Walk all runs with next_dirty: together they must be exactly the set
 * chunks, each run maximal up to the length limit.
 */
static void
check_walk(const struct bm_bitmap *b, const struct model *m,
	   uint64_t max_length, const char *where)
{
	uint64_t limit = UINT64_MAX, from = 0, c = 0, off, len, first, end;

	if (max_length)
		limit = BM_MAX(max_length / m->gran, 1);
	while (bm_bitmap_next_dirty(b, from, max_length, &off, &len)) {
		EXPECT(off >= from && off % m->gran == 0 && len > 0 &&
		       off < m->size && len <= m->size - off,
		       "%s: walk from %llu: run %llu+%llu", where, U(from),
		       U(off), U(len));
		first = off / m->gran;
		for (; c < first; c++)
			EXPECT(!m->bit[c], "%s: walk skipped chunk %llu",
			       where, U(c));
		end = first + len / m->gran + (len % m->gran != 0);
		EXPECT(end - first <= limit && chunk_end(m, end - 1) ==
		       off + len, "%s: walk run %llu+%llu, max %llu", where,
		       U(off), U(len), U(max_length));
		for (; c < end; c++)
			EXPECT(m->bit[c], "%s: walk run %llu+%llu has clear "
			       "chunk %llu", where, U(off), U(len), U(c));
		EXPECT(end - first == limit || end == m->nbits ||
		       !m->bit[end], "%s: walk run %llu+%llu not maximal",
		       where, U(off), U(len));
		from = off + len;
	}
	for (; c < m->nbits; c++)
		EXPECT(!m->bit[c], "%s: walk missed chunk %llu", where, U(c));
}

static void
check_all(const struct bm_bitmap *b, const struct model *m, const char *where)
{
	uint64_t c, n, off, len, moff = 0, mlen = 0, o, l, ml;
	bool r, mr;
	int k;

	EXPECT(bm_bitmap_count(b) == model_count(m), "%s: count %llu, "
	       "expected %llu", where, U(bm_bitmap_count(b)),
	       U(model_count(m)));
	EXPECT(bm_bitmap_dirty_bytes(b) == model_dirty_bytes(m),
	       "%s: dirty_bytes %llu, expected %llu", where,
	       U(bm_bitmap_dirty_bytes(b)), U(model_dirty_bytes(m)));
	/* Bits past nbits stay clear. */
	n = (m->nbits + 63) / 64;
	EXPECT(m->nbits % 64 == 0 ||
	       !(b->words[n - 1] >> (m->nbits % 64)),
	       "%s: bits set past nbits", where);

	for (c = 0; c < m->nbits; c++) {
		EXPECT(bm_bitmap_test(b, c * m->gran) == m->bit[c] &&
		       bm_bitmap_test(b, chunk_end(m, c) - 1) == m->bit[c],
		       "%s: test chunk %llu, expected %d", where, U(c),
		       m->bit[c]);
		o = c * m->gran + rng_below(chunk_end(m, c) - c * m->gran);
		EXPECT(bm_bitmap_test(b, o) == m->bit[c],
		       "%s: test %llu, expected %d", where, U(o), m->bit[c]);
	}
	EXPECT(!bm_bitmap_test(b, m->size) && !bm_bitmap_test(b, UINT64_MAX),
	       "%s: test past the end", where);

	for (k = 0; k < 4; k++) {
		o = rand_offset(m);
		l = rand_length(m);
		r = bm_bitmap_test_range(b, o, l);
		mr = model_test_range(m, o, l);
		EXPECT(r == mr, "%s: test_range(%llu, %llu) %d, expected %d",
		       where, U(o), U(l), r, mr);
	}
	for (k = 0; k < 4; k++) {
		o = rand_offset(m);
		ml = rand_max_length(m);
		off = len = 0;
		r = bm_bitmap_next_dirty(b, o, ml, &off, &len);
		mr = model_next_dirty(m, o, ml, &moff, &mlen);
		EXPECT(r == mr && (!r || (off == moff && len == mlen)),
		       "%s: next_dirty(%llu, %llu) %d %llu+%llu, "
		       "expected %d %llu+%llu", where, U(o), U(ml), r,
		       U(off), U(len), mr, U(moff), U(mlen));
	}
	check_walk(b, m, rand_max_length(m), where);
}

static const struct {
	uint64_t size;
	uint64_t gran;
} configs[] = {
	{ 1000, 1 },			/* granularity 1 */
	{ 127, 2 },			/* one word, partial last chunk */
	{ 1, 4096 },			/* one partial chunk */
	{ 0, 512 },			/* empty */
	{ 512 * 700 + 100, 512 },	/* not a multiple */
	{ 8 * 320 - 3, 8 },		/* 5 words, partial last chunk */
	{ 65536 * 640, 65536 },		/* exactly 10 words */
	{ 4096 * 2049 + 4095, 4096 },
	{ 200 * TiB + 12345, TiB },	/* largest granularity */
};

#define RANDOM_STEPS 5000

START_TEST(test_random)
{
	struct bm_bitmap b;
	struct model m;
	uint64_t o, l;
	char where[128];
	unsigned step;

	rng_state = UINT64_C(0x5eed) + (uint64_t)_i;
	m.size = configs[_i].size;
	m.gran = configs[_i].gran;
	ck_assert_int_eq(bm_bitmap_init(&b, m.size, m.gran), 0);
	m.nbits = b.nbits;
	m.bit = calloc(m.nbits + 1, sizeof(*m.bit));
	ck_assert_ptr_nonnull(m.bit);

	for (step = 0; step < RANDOM_STEPS; step++) {
		o = rand_offset(&m);
		l = rand_length(&m);
		switch (rng_below(20)) {
		case 0:
			bm_bitmap_set_all(&b);
			memset(m.bit, 1, m.nbits * sizeof(*m.bit));
			snprintf(where, sizeof(where), "config %d step %u "
				 "set_all", _i, step);
			break;
		case 1:
			bm_bitmap_clear_all(&b);
			memset(m.bit, 0, m.nbits * sizeof(*m.bit));
			snprintf(where, sizeof(where), "config %d step %u "
				 "clear_all", _i, step);
			break;
		case 2: case 3: case 4: case 5: case 6:
		case 7: case 8: case 9: case 10:
			bm_bitmap_set_range(&b, o, l);
			model_set_range(&m, o, l);
			snprintf(where, sizeof(where), "config %d step %u "
				 "set_range(%llu, %llu)", _i, step, U(o),
				 U(l));
			break;
		default:
			bm_bitmap_clear_range(&b, o, l);
			model_clear_range(&m, o, l);
			snprintf(where, sizeof(where), "config %d step %u "
				 "clear_range(%llu, %llu)", _i, step, U(o),
				 U(l));
			break;
		}
		check_all(&b, &m, where);
	}
	free(m.bit);
	bm_bitmap_free(&b);
}
END_TEST

static Suite *
bitmap_suite(void)
{
	Suite *s = suite_create("bitmap");
	TCase *tc;

	tc = tcase_create("init");
	tcase_add_test(tc, test_init_bad_granularity);
	tcase_add_test(tc, test_init_geometry);
	tcase_add_test(tc, test_init_enomem);
	tcase_add_test(tc, test_free_reinit);
	tcase_add_test(tc, test_size_zero);
	suite_add_tcase(s, tc);

	tc = tcase_create("ranges");
	tcase_add_test(tc, test_set_range_touches);
	tcase_add_test(tc, test_clear_range_covers);
	tcase_add_test(tc, test_test_range);
	tcase_add_test(tc, test_word_boundaries);
	tcase_add_test(tc, test_dirty_bytes);
	suite_add_tcase(s, tc);

	tc = tcase_create("next_dirty");
	tcase_add_test(tc, test_next_dirty);
	tcase_add_test(tc, test_huge);
	tcase_add_test(tc, test_both_bytes);
	tcase_add_test(tc, test_assign);
	tcase_add_test(tc, test_test_all);
	suite_add_tcase(s, tc);

	tc = tcase_create("random");
	tcase_set_timeout(tc, 100);
	tcase_add_loop_test(tc, test_random, 0, (int)BM_ARRAY_SIZE(configs));
	suite_add_tcase(s, tc);
	return s;
}

int
main(void)
{
	return run_suite(bitmap_suite()) ? EXIT_FAILURE : EXIT_SUCCESS;
}
