/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The dirty bitmap: one bit per chunk of `granularity` bytes over a disk of
 * `size` bytes.  Pure memory, no I/O, no locking: the owner (one event
 * loop) serialises access.
 *
 * Byte ranges map to chunks in two directions, and the difference matters:
 *
 *  - set_range marks every chunk the range touches, because a guest write
 *    to part of a chunk makes the whole chunk differ;
 *  - clear_range clears only chunks the range covers completely (the last
 *    chunk of the disk counts as covered when the range reaches the end of
 *    the disk), because clearing a chunk that was only partly copied would
 *    lose a difference.
 *
 * `count` is kept exact by every operation, so population queries are O(1).
 */
#ifndef BM_BITMAP_H
#define BM_BITMAP_H

#include <stdbool.h>
#include <stdint.h>

struct bm_bitmap {
	uint64_t *words;
	uint64_t size;   /* bytes covered */
	uint64_t nbits;  /* chunks: ceil(size / granularity) */
	uint64_t count;  /* chunks set */
	unsigned shift;  /* log2(granularity) */
};

/*
 * Prepare an all-clear bitmap.  granularity must be a power of two
 * (1 byte to 2^40); size may be 0.  Returns 0, -EINVAL or -ENOMEM.
 */
int bm_bitmap_init(struct bm_bitmap *b, uint64_t size, uint64_t granularity);

/* Release the words; the struct can be init'ed again.  Accepts a zeroed struct. */
void bm_bitmap_free(struct bm_bitmap *b);

static inline uint64_t
bm_bitmap_granularity(const struct bm_bitmap *b)
{
	return UINT64_C(1) << b->shift;
}

/* Mark every chunk that [offset, offset + length) touches.  Clipped at size. */
void bm_bitmap_set_range(struct bm_bitmap *b, uint64_t offset, uint64_t length);

/* Clear every chunk that [offset, offset + length) covers (see above). */
void bm_bitmap_clear_range(struct bm_bitmap *b, uint64_t offset,
			   uint64_t length);

/* Set or clear everything. */
void bm_bitmap_set_all(struct bm_bitmap *b);
void bm_bitmap_clear_all(struct bm_bitmap *b);

/* Is the chunk holding byte `offset` set?  false past the end. */
bool bm_bitmap_test(const struct bm_bitmap *b, uint64_t offset);

/* Is any chunk that [offset, offset + length) touches set? */
bool bm_bitmap_test_range(const struct bm_bitmap *b, uint64_t offset,
			  uint64_t length);

/* Is every chunk that [offset, offset + length) touches set?  false for
 * an empty range or one past the end. */
bool bm_bitmap_test_all(const struct bm_bitmap *b, uint64_t offset,
			uint64_t length);

/*
 * Find the first run of set chunks at or after the chunk holding `from`.
 * On success stores the run as bytes, chunk-aligned at the start and
 * clipped at size and at `max_length` (0: no limit; otherwise rounded down
 * to whole chunks but at least one chunk), and returns true.  Returns
 * false when no set chunk follows.
 */
bool bm_bitmap_next_dirty(const struct bm_bitmap *b, uint64_t from,
			  uint64_t max_length, uint64_t *offset,
			  uint64_t *length);

/* Number of set chunks. */
static inline uint64_t
bm_bitmap_count(const struct bm_bitmap *b)
{
	return b->count;
}

/* Bytes in set chunks (the last chunk counts only up to size). */
uint64_t bm_bitmap_dirty_bytes(const struct bm_bitmap *b);

/* dst = src, or its complement: same size and granularity.
 * O(size / granularity / 64). */
void bm_bitmap_assign(struct bm_bitmap *dst, const struct bm_bitmap *src,
		      bool invert);

/* Bytes in chunks set in both a and b, which must have the same size and
 * granularity: O(size / granularity / 64). */
uint64_t bm_bitmap_both_bytes(const struct bm_bitmap *a,
			      const struct bm_bitmap *b);

#endif /* BM_BITMAP_H */
