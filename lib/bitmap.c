/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The dirty bitmap; bitmap.h has the rules for mapping bytes to chunks.
 *
 * Chunk i is bit (i % 64) of words[i / 64], least significant bit first, so
 * walking up the chunks walks up each word and __builtin_ctzll finds the
 * next set (or, on the inverted word, clear) chunk.  Bits at and past nbits
 * in the last word are always clear: set_all masks them off and every other
 * operation clips its chunk range to nbits first, so whole-word scans and
 * popcounts never see them.
 *
 * Byte ranges are turned into half-open chunk ranges [first, end) once, and
 * everything after that works a 64-bit word at a time: a masked head word,
 * whole middle words, a masked tail word.  count is adjusted by the popcount
 * of the bits each word actually changed, so it is exact whatever the
 * previous state was.
 */
#include <assert.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "bitmap.h"
#include "internal.h"

#define WORD_BITS 64
#define ALL_ONES (~UINT64_C(0))
#define MAX_SHIFT 40

/* Words that hold nbits bits. */
static inline uint64_t
nwords(uint64_t nbits)
{
	return nbits / WORD_BITS + (nbits % WORD_BITS != 0);
}

/* The bits of a word at and above bit (from % 64). */
static inline uint64_t
head_mask(uint64_t from)
{
	return ALL_ONES << (from % WORD_BITS);
}

/* The bits of a word below bit (end % 64), all of them when that is 0. */
static inline uint64_t
tail_mask(uint64_t end)
{
	unsigned used = end % WORD_BITS;

	return used ? ALL_ONES >> (WORD_BITS - used) : ALL_ONES;
}

static inline bool
test_bit(const struct bm_bitmap *b, uint64_t bit)
{
	return (b->words[bit / WORD_BITS] >> (bit % WORD_BITS)) & 1;
}

/* Chunks [*first, *end) that [offset, offset + length) touches, clipped. */
static bool
touched_chunks(const struct bm_bitmap *b, uint64_t offset, uint64_t length,
	       uint64_t *first, uint64_t *end)
{
	uint64_t last_byte;

	if (length == 0 || offset >= b->size)
		return false;
	if (bm_add_overflow(offset, length - 1, &last_byte) ||
	    last_byte >= b->size)
		last_byte = b->size - 1;
	*first = offset >> b->shift;
	*end = (last_byte >> b->shift) + 1;
	return true;
}

static inline void
set_word(struct bm_bitmap *b, uint64_t i, uint64_t mask)
{
	uint64_t old = b->words[i];

	b->words[i] = old | mask;
	b->count += (uint64_t)__builtin_popcountll(mask & ~old);
}

static inline void
clear_word(struct bm_bitmap *b, uint64_t i, uint64_t mask)
{
	uint64_t old = b->words[i];

	b->words[i] = old & ~mask;
	b->count -= (uint64_t)__builtin_popcountll(mask & old);
}

/* Set chunks [first, end); first < end <= nbits. */
static void
set_bits(struct bm_bitmap *b, uint64_t first, uint64_t end)
{
	uint64_t i = first / WORD_BITS;
	uint64_t last = (end - 1) / WORD_BITS;

	assert(first < end && end <= b->nbits);
	if (i == last) {
		set_word(b, i, head_mask(first) & tail_mask(end));
		return;
	}
	set_word(b, i, head_mask(first));
	for (i++; i < last; i++)
		set_word(b, i, ALL_ONES);
	set_word(b, last, tail_mask(end));
}

/* Clear chunks [first, end); first < end <= nbits. */
static void
clear_bits(struct bm_bitmap *b, uint64_t first, uint64_t end)
{
	uint64_t i = first / WORD_BITS;
	uint64_t last = (end - 1) / WORD_BITS;

	assert(first < end && end <= b->nbits);
	if (i == last) {
		clear_word(b, i, head_mask(first) & tail_mask(end));
		return;
	}
	clear_word(b, i, head_mask(first));
	for (i++; i < last; i++)
		clear_word(b, i, ALL_ONES);
	clear_word(b, last, tail_mask(end));
}

/* Is any of chunks [first, end) set?  first < end <= nbits. */
static bool
any_bits(const struct bm_bitmap *b, uint64_t first, uint64_t end)
{
	uint64_t i = first / WORD_BITS;
	uint64_t last = (end - 1) / WORD_BITS;

	if (i == last)
		return b->words[i] & head_mask(first) & tail_mask(end);
	if (b->words[i] & head_mask(first))
		return true;
	for (i++; i < last; i++)
		if (b->words[i])
			return true;
	return b->words[last] & tail_mask(end);
}

/* Are all of chunks [first, end) set?  first < end <= nbits. */
static bool
all_bits(const struct bm_bitmap *b, uint64_t first, uint64_t end)
{
	uint64_t i = first / WORD_BITS;
	uint64_t last = (end - 1) / WORD_BITS;
	uint64_t m;

	if (i == last) {
		m = head_mask(first) & tail_mask(end);
		return (b->words[i] & m) == m;
	}
	if ((b->words[i] & head_mask(first)) != head_mask(first))
		return false;
	for (i++; i < last; i++)
		if (b->words[i] != ALL_ONES)
			return false;
	return (b->words[last] & tail_mask(end)) == tail_mask(end);
}

/* The first set chunk at or after `from`, or nbits. */
static uint64_t
find_set(const struct bm_bitmap *b, uint64_t from)
{
	uint64_t i, n, w;

	if (from >= b->nbits)
		return b->nbits;
	i = from / WORD_BITS;
	n = nwords(b->nbits);
	w = b->words[i] & head_mask(from);
	while (!w) {
		if (++i == n)
			return b->nbits;
		w = b->words[i];
	}
	/* The bits past nbits are clear, so this is below nbits. */
	return i * WORD_BITS + (uint64_t)__builtin_ctzll(w);
}

/* The first clear chunk at or after `from` and below `limit`, or limit. */
static uint64_t
find_clear(const struct bm_bitmap *b, uint64_t from, uint64_t limit)
{
	uint64_t i, last, w;

	assert(limit <= b->nbits);
	if (from >= limit)
		return limit;
	i = from / WORD_BITS;
	last = (limit - 1) / WORD_BITS;
	w = ~b->words[i] & head_mask(from);
	while (!w) {
		if (i == last)
			return limit;
		w = ~b->words[++i];
	}
	return BM_MIN(i * WORD_BITS + (uint64_t)__builtin_ctzll(w), limit);
}

/* First byte of chunk `bit`, or size for nbits (which may not be aligned). */
static inline uint64_t
chunk_start(const struct bm_bitmap *b, uint64_t bit)
{
	return bit >= b->nbits ? b->size : bit << b->shift;
}

int
bm_bitmap_init(struct bm_bitmap *b, uint64_t size, uint64_t granularity)
{
	uint64_t n;

	memset(b, 0, sizeof(*b));
	if (!bm_is_power_of_2(granularity) ||
	    granularity > (UINT64_C(1) << MAX_SHIFT))
		return -EINVAL;
	b->shift = (unsigned)__builtin_ctzll(granularity);
	b->nbits = (size >> b->shift) + ((size & (granularity - 1)) != 0);
	n = nwords(b->nbits);
	if (n) {
		if (n > SIZE_MAX / sizeof(uint64_t))
			goto nomem;
		b->words = calloc((size_t)n, sizeof(uint64_t));
		if (!b->words)
			goto nomem;
	}
	b->size = size;
	return 0;

nomem:
	memset(b, 0, sizeof(*b));
	return -ENOMEM;
}

void
bm_bitmap_free(struct bm_bitmap *b)
{
	free(b->words);
	memset(b, 0, sizeof(*b));
}

void
bm_bitmap_set_range(struct bm_bitmap *b, uint64_t offset, uint64_t length)
{
	uint64_t first, end;

	if (touched_chunks(b, offset, length, &first, &end))
		set_bits(b, first, end);
}

void
bm_bitmap_clear_range(struct bm_bitmap *b, uint64_t offset, uint64_t length)
{
	uint64_t mask = bm_bitmap_granularity(b) - 1;
	uint64_t first, end, range_end;

	if (length == 0 || offset >= b->size)
		return;
	/* Round the start up and the end down to whole chunks... */
	first = (offset >> b->shift) + ((offset & mask) != 0);
	/* ...except that reaching the end of the disk covers the last one. */
	if (bm_add_overflow(offset, length, &range_end) ||
	    range_end >= b->size)
		end = b->nbits;
	else
		end = range_end >> b->shift;
	if (first < end)
		clear_bits(b, first, end);
}

void
bm_bitmap_set_all(struct bm_bitmap *b)
{
	uint64_t n = nwords(b->nbits);

	if (n == 0)
		return;
	memset(b->words, 0xff, (size_t)n * sizeof(uint64_t));
	b->words[n - 1] = tail_mask(b->nbits);
	b->count = b->nbits;
}

void
bm_bitmap_clear_all(struct bm_bitmap *b)
{
	uint64_t n = nwords(b->nbits);

	if (n)
		memset(b->words, 0, (size_t)n * sizeof(uint64_t));
	b->count = 0;
}

bool
bm_bitmap_test(const struct bm_bitmap *b, uint64_t offset)
{
	if (offset >= b->size)
		return false;
	return test_bit(b, offset >> b->shift);
}

bool
bm_bitmap_test_range(const struct bm_bitmap *b, uint64_t offset,
		     uint64_t length)
{
	uint64_t first, end;

	if (b->count == 0 ||
	    !touched_chunks(b, offset, length, &first, &end))
		return false;
	return any_bits(b, first, end);
}

bool
bm_bitmap_test_all(const struct bm_bitmap *b, uint64_t offset,
		   uint64_t length)
{
	uint64_t first, end;

	if (b->count == 0 ||
	    !touched_chunks(b, offset, length, &first, &end))
		return false;
	return all_bits(b, first, end);
}

bool
bm_bitmap_next_dirty(const struct bm_bitmap *b, uint64_t from,
		     uint64_t max_length, uint64_t *offset, uint64_t *length)
{
	uint64_t first, limit, end, chunks;

	if (b->count == 0 || from >= b->size)
		return false;
	first = find_set(b, from >> b->shift);
	if (first == b->nbits)
		return false;
	limit = b->nbits;
	if (max_length) {
		chunks = BM_MAX(max_length >> b->shift, 1);
		if (chunks < limit - first)
			limit = first + chunks;
	}
	end = find_clear(b, first + 1, limit);
	*offset = chunk_start(b, first);
	*length = chunk_start(b, end) - *offset;
	return true;
}

uint64_t
bm_bitmap_dirty_bytes(const struct bm_bitmap *b)
{
	uint64_t tail = b->size & (bm_bitmap_granularity(b) - 1);

	if (b->count == 0)
		return 0;
	/* No overflow: both results are at most size. */
	if (tail && test_bit(b, b->nbits - 1))
		return ((b->count - 1) << b->shift) + tail;
	return b->count << b->shift;
}

void
bm_bitmap_assign(struct bm_bitmap *dst, const struct bm_bitmap *src,
		 bool invert)
{
	uint64_t words = nwords(src->nbits), tail = src->nbits % 64;

	dst->count = 0;
	for (uint64_t i = 0; i < words; i++) {
		uint64_t w = invert ? ~src->words[i] : src->words[i];

		/* Bits past nbits stay clear: popcounts never see them. */
		if (i == words - 1 && tail)
			w &= (UINT64_C(1) << tail) - 1;
		dst->words[i] = w;
		dst->count += (uint64_t)__builtin_popcountll(w);
	}
}

uint64_t
bm_bitmap_both_bytes(const struct bm_bitmap *a, const struct bm_bitmap *b)
{
	uint64_t tail = a->size & (bm_bitmap_granularity(a) - 1);
	uint64_t n = 0, words = nwords(a->nbits);

	if (a->count == 0 || b->count == 0)
		return 0;
	for (uint64_t i = 0; i < words; i++)
		n += (uint64_t)__builtin_popcountll(a->words[i] & b->words[i]);
	if (n && tail && test_bit(a, a->nbits - 1) && test_bit(b, b->nbits - 1))
		return ((n - 1) << a->shift) + tail;
	return n << a->shift;
}
