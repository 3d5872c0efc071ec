/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Unit tests of extent lists and zero detection (lib/extent.c).
 *
 * Extent lists: merging on append, the -EINVAL cases (gaps, overlaps,
 * overflow) leaving the list untouched, hole normalisation, reset and free,
 * find on every boundary, and a seeded random comparison with an unmerged
 * model.  bm_is_zero: a single nonzero byte at every position of small
 * buffers at every alignment, and at the edges and middle of 1 MiB ones,
 * with nonzero guard bytes around the buffer.  bm_next_run: fixed layouts
 * including partial last blocks, and a seeded random comparison with a
 * per-block model built byte by byte.
 */
#include <check.h>
#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "extent.h"
#include "helpers.h"
#include "internal.h"

#define HOLE BM_EXTENT_HOLE
#define ZERO BM_EXTENT_ZERO

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

static void
expect_extent(const struct bm_extent_list *l, size_t i, uint64_t offset,
	      uint64_t length, uint32_t flags)
{
	ck_assert_uint_gt(l->len, i);
	ck_assert_uint_eq(l->v[i].offset, offset);
	ck_assert_uint_eq(l->v[i].length, length);
	ck_assert_uint_eq(l->v[i].flags, flags);
}

/* Extent lists */

START_TEST(test_append_merge)
{
	struct bm_extent_list l = { 0 };

	ck_assert_uint_eq(bm_extent_list_end(&l), 0);
	ck_assert_int_eq(bm_extent_list_find(&l, 0), -1);

	ck_assert_int_eq(bm_extent_list_append(&l, 0, 100, 0), 0);
	ck_assert_int_eq(bm_extent_list_append(&l, 100, 50, 0), 0);
	ck_assert_uint_eq(l.len, 1);
	expect_extent(&l, 0, 0, 150, 0);

	ck_assert_int_eq(bm_extent_list_append(&l, 150, 10, ZERO), 0);
	ck_assert_uint_eq(l.len, 2);
	expect_extent(&l, 1, 150, 10, ZERO);

	/* A hole reads as zeroes, and is stored so. */
	ck_assert_int_eq(bm_extent_list_append(&l, 160, 10, HOLE), 0);
	ck_assert_uint_eq(l.len, 3);
	expect_extent(&l, 2, 160, 10, HOLE | ZERO);
	ck_assert_int_eq(bm_extent_list_append(&l, 170, 5, HOLE | ZERO), 0);
	ck_assert_int_eq(bm_extent_list_append(&l, 175, 5, HOLE), 0);
	ck_assert_uint_eq(l.len, 3);
	expect_extent(&l, 2, 160, 20, HOLE | ZERO);

	/* Zero lengths are ignored, wherever they claim to be. */
	ck_assert_int_eq(bm_extent_list_append(&l, 180, 0, 0), 0);
	ck_assert_int_eq(bm_extent_list_append(&l, 12345, 0, ZERO), 0);
	ck_assert_int_eq(bm_extent_list_append(&l, 0, 0, HOLE), 0);
	ck_assert_uint_eq(l.len, 3);

	ck_assert_int_eq(bm_extent_list_append(&l, 180, 1, 0), 0);
	ck_assert_uint_eq(l.len, 4);
	expect_extent(&l, 3, 180, 1, 0);
	ck_assert_uint_eq(bm_extent_list_end(&l), 181);
	bm_extent_list_free(&l);
}
END_TEST

START_TEST(test_append_noncontiguous)
{
	struct bm_extent_list l = { 0 };
	static const uint64_t bad[] = { 0, 1, 99, 199, 201, 300, UINT64_MAX };
	size_t i;

	ck_assert_int_eq(bm_extent_list_append(&l, 0, 100, 0), 0);
	ck_assert_int_eq(bm_extent_list_append(&l, 100, 100, ZERO), 0);
	for (i = 0; i < BM_ARRAY_SIZE(bad); i++) {
		/* Same flags as the last extent: must not merge either. */
		ck_assert_int_eq(bm_extent_list_append(&l, bad[i], 1, ZERO),
				 -EINVAL);
		ck_assert_int_eq(bm_extent_list_append(&l, bad[i], 1, 0),
				 -EINVAL);
	}
	/* Unchanged. */
	ck_assert_uint_eq(l.len, 2);
	expect_extent(&l, 0, 0, 100, 0);
	expect_extent(&l, 1, 100, 100, ZERO);
	ck_assert_uint_eq(bm_extent_list_end(&l), 200);
	bm_extent_list_free(&l);
}
END_TEST

START_TEST(test_append_overflow)
{
	struct bm_extent_list l = { 0 };
	uint64_t half = UINT64_C(1) << 63;

	ck_assert_int_eq(bm_extent_list_append(&l, UINT64_MAX, 1, 0), -EINVAL);
	ck_assert_int_eq(bm_extent_list_append(&l, 1, UINT64_MAX, 0), -EINVAL);
	ck_assert_uint_eq(l.len, 0);

	/* Ending exactly at 2^64 - 1 is fine, by merging too. */
	ck_assert_int_eq(bm_extent_list_append(&l, 0, half, 0), 0);
	ck_assert_int_eq(bm_extent_list_append(&l, half, UINT64_MAX - half,
					       HOLE), 0);
	ck_assert_uint_eq(bm_extent_list_end(&l), UINT64_MAX);
	ck_assert_int_eq(bm_extent_list_append(&l, UINT64_MAX, 1, 0), -EINVAL);
	ck_assert_int_eq(bm_extent_list_append(&l, UINT64_MAX, 1, HOLE),
			 -EINVAL);
	ck_assert_int_eq(bm_extent_list_append(&l, UINT64_MAX, 0, 0), 0);
	ck_assert_uint_eq(l.len, 2);
	bm_extent_list_reset(&l);

	ck_assert_int_eq(bm_extent_list_append(&l, 0, half, 0), 0);
	ck_assert_int_eq(bm_extent_list_append(&l, half, half, 0), -EINVAL);
	ck_assert_int_eq(bm_extent_list_append(&l, half, half - 1, 0), 0);
	ck_assert_uint_eq(l.len, 1);
	expect_extent(&l, 0, 0, UINT64_MAX, 0);
	ck_assert_int_eq(bm_extent_list_find(&l, UINT64_MAX - 1), 0);
	ck_assert_int_eq(bm_extent_list_find(&l, UINT64_MAX), -1);
	bm_extent_list_free(&l);
}
END_TEST

START_TEST(test_first_offset)
{
	struct bm_extent_list l = { 0 };

	ck_assert_int_eq(bm_extent_list_append(&l, 4096, 100, ZERO), 0);
	ck_assert_uint_eq(bm_extent_list_end(&l), 4196);
	ck_assert_int_eq(bm_extent_list_find(&l, 0), -1);
	ck_assert_int_eq(bm_extent_list_find(&l, 4095), -1);
	ck_assert_int_eq(bm_extent_list_find(&l, 4096), 0);
	ck_assert_int_eq(bm_extent_list_find(&l, 4195), 0);
	ck_assert_int_eq(bm_extent_list_find(&l, 4196), -1);
	ck_assert_int_eq(bm_extent_list_append(&l, 0, 4096, 0), -EINVAL);
	bm_extent_list_free(&l);
}
END_TEST

START_TEST(test_reset_free)
{
	struct bm_extent_list l = { 0 };
	struct bm_extent *v;
	size_t cap;
	uint64_t i;

	bm_extent_list_free(&l);
	bm_extent_list_reset(&l);
	for (i = 0; i < 100; i++)
		ck_assert_int_eq(bm_extent_list_append(&l, i * 10, 10,
						       (uint32_t)i % 2), 0);
	ck_assert_uint_eq(l.len, 100);
	v = l.v;
	cap = l.cap;

	/* Reset keeps the memory; the list starts over anywhere. */
	bm_extent_list_reset(&l);
	ck_assert_uint_eq(l.len, 0);
	ck_assert_ptr_eq(l.v, v);
	ck_assert_uint_eq(l.cap, cap);
	ck_assert_uint_eq(bm_extent_list_end(&l), 0);
	ck_assert_int_eq(bm_extent_list_find(&l, 0), -1);
	ck_assert_int_eq(bm_extent_list_append(&l, 7, 3, ZERO), 0);
	expect_extent(&l, 0, 7, 3, ZERO);
	ck_assert_uint_eq(l.len, 1);

	bm_extent_list_free(&l);
	ck_assert_ptr_null(l.v);
	ck_assert_uint_eq(l.len, 0);
	ck_assert_uint_eq(l.cap, 0);
	ck_assert_uint_eq(bm_extent_list_end(&l), 0);
	ck_assert_int_eq(bm_extent_list_find(&l, 0), -1);
	ck_assert_int_eq(bm_extent_list_append(&l, 0, 1, 0), 0);
	ck_assert_uint_eq(l.len, 1);
	bm_extent_list_free(&l);
	bm_extent_list_free(&l);
}
END_TEST

/* Lists of every length up to 70: find at and around every boundary. */
START_TEST(test_find_boundaries)
{
	struct bm_extent_list l = { 0 };
	uint64_t start[71], o;
	size_t n, i, j;
	ptrdiff_t want;

	for (n = 1; n <= 70; n++) {
		bm_extent_list_reset(&l);
		start[0] = 1000;
		for (i = 0; i < n; i++) {
			/* Lengths 1, 2, 3, 1000, 1, ... */
			uint64_t len = i % 4 == 3 ? 1000 : i % 4 + 1;

			ck_assert_int_eq(bm_extent_list_append(&l, start[i],
							       len, i % 2 ?
							       ZERO : 0), 0);
			start[i + 1] = start[i] + len;
		}
		ck_assert_uint_eq(l.len, n);
		ck_assert_uint_eq(bm_extent_list_end(&l), start[n]);
		EXPECT(bm_extent_list_find(&l, 0) == -1 &&
		       bm_extent_list_find(&l, start[0] - 1) == -1 &&
		       bm_extent_list_find(&l, start[n]) == -1 &&
		       bm_extent_list_find(&l, UINT64_MAX) == -1,
		       "n %zu: outside", n);
		for (i = 0; i <= n; i++) {
			for (o = start[i] - 1; o <= start[i] + 1; o++) {
				want = -1;
				for (j = 0; j < n; j++)
					if (o >= start[j] && o < start[j + 1])
						want = (ptrdiff_t)j;
				EXPECT(bm_extent_list_find(&l, o) == want,
				       "n %zu: find(%llu) %td, expected %td",
				       n, U(o), bm_extent_list_find(&l, o),
				       want);
			}
		}
	}
	bm_extent_list_free(&l);
}
END_TEST

/* Many appends, growing the array many times. */
START_TEST(test_many)
{
	struct bm_extent_list l = { 0 };
	uint64_t o = 0, len;
	size_t i, n = 100000;

	for (i = 0; i < n; i++) {
		len = 1 + i % 7;
		EXPECT(bm_extent_list_append(&l, o, len, i % 2 ? HOLE : 0) == 0,
		       "append %zu", i);
		o += len;
	}
	ck_assert_uint_eq(l.len, n);
	ck_assert_uint_ge(l.cap, n);
	ck_assert_uint_eq(bm_extent_list_end(&l), o);
	for (i = 0, o = 0; i < n; i++) {
		len = 1 + i % 7;
		EXPECT(l.v[i].offset == o && l.v[i].length == len &&
		       l.v[i].flags == (i % 2 ? HOLE | ZERO : 0u),
		       "extent %zu", i);
		EXPECT(bm_extent_list_find(&l, o) == (ptrdiff_t)i &&
		       bm_extent_list_find(&l, o + len - 1) == (ptrdiff_t)i,
		       "find in extent %zu", i);
		o += len;
	}
	bm_extent_list_free(&l);
}
END_TEST

/*
 * Random appends (some zero-length, some misplaced) against a model that
 * keeps every accepted extent unmerged.  The list must be the model merged:
 * contiguous, no two neighbours with equal flags, and find must land on an
 * extent with the model's flags at every probed offset.
 */
START_TEST(test_list_random)
{
	static const uint32_t flag_set[] = { 0, ZERO, HOLE, HOLE | ZERO };
	struct bm_extent_list l = { 0 };
	struct bm_extent *model;
	size_t n, cap = 4000, i, j, k;
	uint64_t start, end, o, len;
	uint32_t flags;
	ptrdiff_t f;
	int r, round;

	model = calloc(cap, sizeof(*model));
	ck_assert_ptr_nonnull(model);
	rng_state = 0xe87e;
	for (round = 0; round < 20; round++) {
		bm_extent_list_reset(&l);
		n = 0;
		start = end = rng_below(3) ? 0 : rng();
		for (i = 0; i < cap; i++) {
			flags = flag_set[rng_below(4)];
			len = rng_below(8) ? 1 + rng_below(5000) :
			      rng_below(2);
			o = end;
			if (rng_below(10) == 0)
				o = rng_below(4) ? end + rng_below(3) - 1 :
				    rng();
			if (rng_below(50) == 0)
				len = UINT64_MAX - rng_below(100);
			r = bm_extent_list_append(&l, o, len, flags);
			if (len == 0) {
				EXPECT(r == 0, "round %d: zero length: %d",
				       round, r);
				continue;
			}
			if ((n && o != end) || o > UINT64_MAX - len) {
				EXPECT(r == -EINVAL, "round %d: append(%llu,"
				       " %llu) after %llu: %d, expected "
				       "-EINVAL", round, U(o), U(len),
				       U(end), r);
				continue;
			}
			EXPECT(r == 0, "round %d: append: %d", round, r);
			if (n == 0)
				start = o;
			model[n].offset = o;
			model[n].length = len;
			model[n].flags = flags & HOLE ? flags | ZERO : flags;
			end = o + len;
			n++;
			if (end > UINT64_MAX - 10000)
				break;
		}

		/* The list is the model, merged. */
		ck_assert_uint_eq(bm_extent_list_end(&l), n ? end : 0);
		for (i = 0, j = 0; i < l.len; i++) {
			EXPECT(j < n && l.v[i].offset == model[j].offset,
			       "round %d: extent %zu", round, i);
			EXPECT(i == 0 || l.v[i].flags != l.v[i - 1].flags,
			       "round %d: extent %zu not merged", round, i);
			len = 0;
			for (; j < n && model[j].offset < l.v[i].offset +
			     l.v[i].length; j++) {
				EXPECT(model[j].flags == l.v[i].flags,
				       "round %d: extent %zu flags", round, i);
				len += model[j].length;
			}
			EXPECT(len == l.v[i].length,
			       "round %d: extent %zu length", round, i);
		}
		ck_assert_uint_eq(j, n);

		/* find at random offsets and at every model boundary. */
		for (k = 0; k < 2 * n + 100; k++) {
			if (k < n) {
				j = k;
				o = model[j].offset;
			} else if (k < 2 * n) {
				j = k - n;
				o = model[j].offset + model[j].length - 1;
			} else {
				if (n && rng_below(4))
					o = start + rng_below(end - start);
				else
					o = rng_below(3) ? rng() : end;
				for (j = 0; j < n && model[j].offset +
				     model[j].length <= o; j++)
					;
			}
			f = bm_extent_list_find(&l, o);
			if (n == 0 || o < start || o >= end) {
				EXPECT(f == -1, "round %d: find(%llu) %td",
				       round, U(o), f);
				continue;
			}
			EXPECT(f >= 0 && (size_t)f < l.len &&
			       o >= l.v[f].offset &&
			       o - l.v[f].offset < l.v[f].length &&
			       l.v[f].flags == model[j].flags,
			       "round %d: find(%llu) %td", round, U(o), f);
		}
	}
	free(model);
	bm_extent_list_free(&l);
}
END_TEST

/* bm_is_zero */

/* A buffer of len bytes at buf, with nonzero bytes before and after it. */
struct guarded {
	unsigned char *mem;
	unsigned char *buf;
	size_t len;
};

#define GUARD 64

static void
guarded_init(struct guarded *g, size_t len, size_t align)
{
	g->mem = malloc(len + 2 * GUARD + 16);
	ck_assert_ptr_nonnull(g->mem);
	memset(g->mem, 0xff, len + 2 * GUARD + 16);
	/* mem is 16-byte aligned, so buf is align bytes past alignment. */
	g->buf = g->mem + GUARD + align;
	g->len = len;
	memset(g->buf, 0, len);
}

static void
guarded_free(struct guarded *g)
{
	free(g->mem);
}

START_TEST(test_is_zero_empty)
{
	unsigned char one = 1;

	ck_assert(bm_is_zero(NULL, 0));
	ck_assert(bm_is_zero(&one, 0));
	ck_assert(!bm_is_zero(&one, 1));
	one = 0;
	ck_assert(bm_is_zero(&one, 1));
}
END_TEST

/* A single nonzero byte at every position, every length, 16 alignments. */
START_TEST(test_is_zero_small)
{
	static const unsigned char values[] = { 1, 0x80, 0xff, 0x10 };
	struct guarded g;
	size_t align, len, pos;

	for (align = 0; align < 16; align++) {
		for (len = 0; len <= 260; len++) {
			guarded_init(&g, len, align);
			EXPECT(bm_is_zero(g.buf, len), "align %zu len %zu",
			       align, len);
			for (pos = 0; pos < len; pos++) {
				g.buf[pos] = values[pos % 4];
				EXPECT(!bm_is_zero(g.buf, len), "align %zu len"
				       " %zu nonzero at %zu", align, len, pos);
				g.buf[pos] = 0;
			}
			EXPECT(bm_is_zero(g.buf, len), "align %zu len %zu",
			       align, len);
			guarded_free(&g);
		}
	}
}
END_TEST

/* Large buffers: the start, the middle, the end, around 16 and 4096. */
START_TEST(test_is_zero_large)
{
	static const size_t lens[] = {
		(1 << 20) - 1, 1 << 20, (1 << 20) + 1, (1 << 20) + 17,
		4 << 20,
	};
	static const size_t aligns[] = { 0, 1, 3, 8, 15 };
	struct guarded g;
	size_t a, i, k, len, pos[40], np;

	for (i = 0; i < BM_ARRAY_SIZE(lens); i++) {
		len = lens[i];
		np = 0;
		for (k = 0; k < 34; k++)
			pos[np++] = k;
		pos[np++] = 4095;
		pos[np++] = 4096;
		pos[np++] = len / 2 - 1;
		pos[np++] = len / 2;
		pos[np++] = len / 2 + 1;
		pos[np++] = len / 3;
		for (a = 0; a < BM_ARRAY_SIZE(aligns); a++) {
			guarded_init(&g, len, aligns[a]);
			ck_assert(bm_is_zero(g.buf, len));
			for (k = 0; k < np + 34; k++) {
				/* The positions above, then the last 34. */
				size_t p = k < np ? pos[k] : len - 1 - (k - np);

				g.buf[p] = 0x40;
				EXPECT(!bm_is_zero(g.buf, len), "len %zu align"
				       " %zu nonzero at %zu", len, aligns[a],
				       p);
				/* Excluding it from either side. */
				EXPECT(bm_is_zero(g.buf, p) &&
				       bm_is_zero(g.buf + p + 1, len - p - 1),
				       "len %zu align %zu split at %zu", len,
				       aligns[a], p);
				g.buf[p] = 0;
			}
			ck_assert(bm_is_zero(g.buf, len));
			guarded_free(&g);
		}
	}
}
END_TEST

/* bm_next_run */

/* Fill block k of buf with zeroes or, for a '1' in layout, data. */
static unsigned char *
make_buf(const char *layout, size_t block, size_t len)
{
	unsigned char *buf = calloc(1, len ? len : 1);
	size_t k;

	ck_assert_ptr_nonnull(buf);
	for (k = 0; layout[k]; k++)
		if (layout[k] == '1')
			/* The last byte of the block (or of the buffer). */
			buf[BM_MIN((k + 1) * block, len) - 1] = 0x5a;
	return buf;
}

static void
expect_run(const unsigned char *buf, size_t len, size_t pos, size_t block,
	   size_t end, bool zero)
{
	bool z = !zero;

	ck_assert_uint_eq(bm_next_run(buf, len, pos, block, &z), end);
	ck_assert_int_eq(z, zero);
}

START_TEST(test_next_run_fixed)
{
	unsigned char *buf;
	size_t b = 512, len;

	/* All zero, all data. */
	buf = make_buf("0000", b, 4 * b);
	expect_run(buf, 4 * b, 0, b, 4 * b, true);
	expect_run(buf, 4 * b, 3 * b, b, 4 * b, true);
	free(buf);
	buf = make_buf("1111", b, 4 * b);
	expect_run(buf, 4 * b, 0, b, 4 * b, false);
	free(buf);

	/* Z D D Z */
	buf = make_buf("0110", b, 4 * b);
	expect_run(buf, 4 * b, 0, b, b, true);
	expect_run(buf, 4 * b, b, b, 3 * b, false);
	expect_run(buf, 4 * b, 2 * b, b, 3 * b, false);
	expect_run(buf, 4 * b, 3 * b, b, 4 * b, true);
	free(buf);

	/* A nonzero first byte makes the whole block data. */
	buf = make_buf("0000", b, 4 * b);
	buf[2 * b] = 1;
	expect_run(buf, 4 * b, 0, b, 2 * b, true);
	expect_run(buf, 4 * b, 2 * b, b, 3 * b, false);
	expect_run(buf, 4 * b, 3 * b, b, 4 * b, true);
	free(buf);

	/* Partial last block, zero or data, after zero or data. */
	len = 3 * b + 100;
	buf = make_buf("0000", b, len);
	expect_run(buf, len, 0, b, len, true);
	expect_run(buf, len, 3 * b, b, len, true);
	free(buf);
	buf = make_buf("0001", b, len);
	expect_run(buf, len, 0, b, 3 * b, true);
	expect_run(buf, len, 3 * b, b, len, false);
	free(buf);
	buf = make_buf("0010", b, len);
	expect_run(buf, len, 0, b, 2 * b, true);
	expect_run(buf, len, 2 * b, b, 3 * b, false);
	expect_run(buf, len, 3 * b, b, len, true);
	free(buf);
	buf = make_buf("0011", b, len);
	expect_run(buf, len, 2 * b, b, len, false);
	free(buf);

	/* A block larger than the buffer: one partial block. */
	buf = make_buf("0", 4096, 100);
	expect_run(buf, 100, 0, 4096, 100, true);
	buf[0] = 1;
	expect_run(buf, 100, 0, 4096, 100, false);
	free(buf);

	/* Block 1: byte runs. */
	buf = make_buf("00101", 1, 5);
	expect_run(buf, 5, 0, 1, 2, true);
	expect_run(buf, 5, 1, 1, 2, true);
	expect_run(buf, 5, 2, 1, 3, false);
	expect_run(buf, 5, 3, 1, 4, true);
	expect_run(buf, 5, 4, 1, 5, false);
	free(buf);
}
END_TEST

/*
 * Random buffers of random blocks, each block zero or holding a few nonzero
 * bytes anywhere in it, against a model that looks at every byte.  Runs are
 * checked from every block start, not only from where the previous run
 * ended.
 */
START_TEST(test_next_run_random)
{
	static const size_t blocks[] = { 1, 2, 64, 512, 4096, 65536 };
	size_t len, block, nblocks, k, pos, end, want, i, n;
	unsigned char *buf;
	bool *model, z;
	int round;

	rng_state = 0x2e40;
	for (round = 0; round < 300; round++) {
		block = blocks[rng_below(BM_ARRAY_SIZE(blocks))];
		len = 1 + rng_below(rng_below(4) ? 40 * block : 300000);
		nblocks = len / block + (len % block != 0);
		buf = calloc(1, len);
		model = calloc(nblocks, sizeof(*model));
		ck_assert(buf && model);

		/* Runs of zero or data blocks of random lengths. */
		for (k = 0; k < nblocks; k += n) {
			n = 1 + rng_below(6);
			if (rng_below(2))
				continue;
			for (i = k; i < k + n && i < nblocks; i++) {
				end = BM_MIN((i + 1) * block, len);
				buf[i * block + rng_below(end - i * block)] =
					(unsigned char)(1 + rng_below(255));
			}
		}
		for (k = 0; k < nblocks; k++) {
			model[k] = true;
			end = BM_MIN((k + 1) * block, len);
			for (i = k * block; i < end; i++)
				if (buf[i])
					model[k] = false;
		}

		for (k = 0; k < nblocks; k++) {
			pos = k * block;
			for (want = k + 1; want < nblocks &&
			     model[want] == model[k]; want++)
				;
			want = BM_MIN(want * block, len);
			z = !model[k];
			end = bm_next_run(buf, len, pos, block, &z);
			EXPECT(end == want && z == model[k], "round %d: len "
			       "%zu block %zu pos %zu: %zu %d, expected %zu "
			       "%d", round, len, block, pos, end, z, want,
			       model[k]);
		}
		free(buf);
		free(model);
	}
}
END_TEST

static Suite *
extent_suite(void)
{
	Suite *s = suite_create("extent");
	TCase *tc;

	tc = tcase_create("list");
	tcase_add_test(tc, test_append_merge);
	tcase_add_test(tc, test_append_noncontiguous);
	tcase_add_test(tc, test_append_overflow);
	tcase_add_test(tc, test_first_offset);
	tcase_add_test(tc, test_reset_free);
	tcase_add_test(tc, test_find_boundaries);
	tcase_add_test(tc, test_many);
	suite_add_tcase(s, tc);

	tc = tcase_create("list_random");
	tcase_set_timeout(tc, 100);
	tcase_add_test(tc, test_list_random);
	suite_add_tcase(s, tc);

	tc = tcase_create("is_zero");
	tcase_set_timeout(tc, 100);
	tcase_add_test(tc, test_is_zero_empty);
	tcase_add_test(tc, test_is_zero_small);
	tcase_add_test(tc, test_is_zero_large);
	suite_add_tcase(s, tc);

	tc = tcase_create("next_run");
	tcase_set_timeout(tc, 100);
	tcase_add_test(tc, test_next_run_fixed);
	tcase_add_test(tc, test_next_run_random);
	suite_add_tcase(s, tc);
	return s;
}

int
main(void)
{
	return run_suite(extent_suite()) ? EXIT_FAILURE : EXIT_SUCCESS;
}
