/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Extent lists and zero detection.
 *
 * An extent list is a growable array (capacity doubling) kept merged: append
 * extends the last extent when the flags match, so no two neighbours share
 * flags.  Because the extents are contiguous their start offsets ascend,
 * and find is a binary search for the last extent starting at or before
 * the offset.
 *
 * bm_is_zero checks the first 16 bytes itself and then compares the buffer
 * with itself shifted by 16 bytes: if bytes [0, 16) are zero and every byte
 * equals the one 16 bytes before it, all are zero.  That leaves the bulk of
 * the work to the C library's vectorised memcmp, which measured faster on
 * 1 MiB buffers than a 64-bit word loop.  bm_next_run applies bm_is_zero to
 * one block at a time.
 */
#include <assert.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "extent.h"
#include "internal.h"

#define EXTENT_LIST_MIN_CAP 16

/* Bytes bm_is_zero checks by hand before the shifted memcmp. */
#define ZERO_HEAD 16

void
bm_extent_list_reset(struct bm_extent_list *l)
{
	l->len = 0;
}

void
bm_extent_list_free(struct bm_extent_list *l)
{
	free(l->v);
	l->v = NULL;
	l->len = 0;
	l->cap = 0;
}

static int
extent_list_grow(struct bm_extent_list *l)
{
	struct bm_extent *v;
	size_t cap;

	if (l->cap == 0)
		cap = EXTENT_LIST_MIN_CAP;
	else if (l->cap > SIZE_MAX / 2 / sizeof(*v))
		return -ENOMEM;
	else
		cap = l->cap * 2;
	v = realloc(l->v, cap * sizeof(*v));
	if (!v)
		return -ENOMEM;
	l->v = v;
	l->cap = cap;
	return 0;
}

int
bm_extent_list_append(struct bm_extent_list *l, uint64_t offset,
		      uint64_t length, uint32_t flags)
{
	struct bm_extent *last;
	uint64_t end;
	int r;

	if (length == 0)
		return 0;
	if (bm_add_overflow(offset, length, &end))
		return -EINVAL;
	if (flags & BM_EXTENT_HOLE)
		flags |= BM_EXTENT_ZERO;
	if (l->len) {
		last = &l->v[l->len - 1];
		if (offset != last->offset + last->length)
			return -EINVAL;
		if (flags == last->flags) {
			last->length += length;
			return 0;
		}
	}
	if (l->len == l->cap) {
		r = extent_list_grow(l);
		if (r < 0)
			return r;
	}
	l->v[l->len++] = (struct bm_extent){
		.offset = offset,
		.length = length,
		.flags = flags,
	};
	return 0;
}

uint64_t
bm_extent_list_end(const struct bm_extent_list *l)
{
	const struct bm_extent *last;

	if (l->len == 0)
		return 0;
	last = &l->v[l->len - 1];
	return last->offset + last->length;
}

ptrdiff_t
bm_extent_list_find(const struct bm_extent_list *l, uint64_t offset)
{
	size_t lo = 0, hi = l->len, mid;

	if (l->len == 0 || offset < l->v[0].offset ||
	    offset >= bm_extent_list_end(l))
		return -1;
	/* v[lo] starts at or before offset; v[hi], if any, starts after it. */
	while (hi - lo > 1) {
		mid = lo + (hi - lo) / 2;
		if (l->v[mid].offset <= offset)
			lo = mid;
		else
			hi = mid;
	}
	return (ptrdiff_t)lo;
}

bool
bm_is_zero(const void *buf, size_t len)
{
	const unsigned char *p = buf;
	size_t i;

	for (i = 0; i < len && i < ZERO_HEAD; i++)
		if (p[i])
			return false;
	if (len <= ZERO_HEAD)
		return true;
	return memcmp(p, p + ZERO_HEAD, len - ZERO_HEAD) == 0;
}

size_t
bm_next_run(const void *buf, size_t len, size_t pos, size_t block, bool *zero)
{
	const unsigned char *p = buf;
	size_t end, n;
	bool z;

	assert(pos < len);
	assert(bm_is_power_of_2(block));
	/* Blocks lie on multiples of block from the start of the buffer. */
	n = BM_MIN(block - pos % block, len - pos);
	z = bm_is_zero(p + pos, n);
	for (end = pos + n; end < len; end += n) {
		n = BM_MIN(block, len - end);
		if (bm_is_zero(p + end, n) != z)
			break;
	}
	*zero = z;
	return end;
}
