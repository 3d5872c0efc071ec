/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Extents: what a range of an image holds, in the vocabulary of NBD's
 * base:allocation context (a hole reads as zeroes; a zero extent reads as
 * zeroes but may be allocated).  And zero detection over data buffers,
 * which is how copies turn runs of zeroes into holes.  Pure, no I/O.
 */
#ifndef BM_EXTENT_H
#define BM_EXTENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum {
	BM_EXTENT_HOLE = 1u << 0, /* not allocated */
	BM_EXTENT_ZERO = 1u << 1, /* reads as zeroes */
	/* Only from bm_image_block_status_top: this layer holds nothing,
	 * the backing image supplies the bytes (what they are is not
	 * asked).  Never with HOLE or ZERO. */
	BM_EXTENT_BACKING = 1u << 2,
};

struct bm_extent {
	uint64_t offset;
	uint64_t length;
	uint32_t flags; /* BM_EXTENT_* */
};

/*
 * A list of extents in ascending, contiguous order: each one starts where
 * the previous one ended.  Appending an extent with the same flags as the
 * last one extends it instead.
 */
struct bm_extent_list {
	struct bm_extent *v;
	size_t len;
	size_t cap;
};

/* Empty the list, keeping its memory. */
void bm_extent_list_reset(struct bm_extent_list *l);

/* Free the memory; the list is empty and usable afterwards. */
void bm_extent_list_free(struct bm_extent_list *l);

/*
 * Append [offset, offset + length) with flags.  A zero length is ignored.
 * A hole without BM_EXTENT_ZERO is stored with it (holes read as zeroes).
 * The first extent may start at any offset.  Returns 0, -EINVAL if the
 * extent does not start where the list ends (or offset + length
 * overflows), -ENOMEM; the list is unchanged on error.
 */
int bm_extent_list_append(struct bm_extent_list *l, uint64_t offset,
			  uint64_t length, uint32_t flags);

/* Offset just past the last extent (0 for an empty list). */
uint64_t bm_extent_list_end(const struct bm_extent_list *l);

/*
 * Index of the extent that holds `offset`, or -1 if none does.  Binary
 * search.
 */
ptrdiff_t bm_extent_list_find(const struct bm_extent_list *l, uint64_t offset);

/* Does the buffer hold only zero bytes?  Fast for large buffers. */
bool bm_is_zero(const void *buf, size_t len);

/*
 * Split a buffer into data and zero runs for a sparse write.  Starting at
 * `pos` (a multiple of `block` or 0), return the end of the run that
 * starts there and set *zero to whether it is all zeroes.  Runs are made of
 * whole blocks of `block` bytes (a power of two); a final partial block is
 * part of the data or zero run by its content.  pos < len required.
 */
size_t bm_next_run(const void *buf, size_t len, size_t pos, size_t block,
		   bool *zero);

#endif /* BM_EXTENT_H */
