/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The copier: a bounded pipeline that moves ranges from a source image to
 * a destination image.  It does not decide what to copy: a producer
 * callback hands it ranges, and it reports each range back when the
 * destination holds it.  The offline copy (offline.c) feeds it from the
 * source's extent map; the mirror job feeds it from the dirty bitmap.
 *
 * A data range is read into one of `requests` buffers of `request_size`
 * bytes, scanned for runs of zero blocks (unless sparse_block is 0), and
 * written as data runs and zero runs; zero runs cost nothing when the
 * destination is known to read as zeroes.  Zero and hole ranges become
 * write-zeroes (holes may be punched) or nothing.  The bytes in flight are
 * bounded by requests * request_size.
 */
#ifndef BM_COPY_H
#define BM_COPY_H

#include <stdbool.h>
#include <stdint.h>

#include "image.h"

enum bm_copy_kind {
	BM_COPY_DATA, /* read the source, write the destination */
	BM_COPY_ZERO, /* the source reads as zeroes here (allocated) */
	BM_COPY_HOLE, /* the source has nothing allocated here */
};

struct bm_copy_range {
	uint64_t offset;
	uint64_t length; /* DATA: at most request_size */
	enum bm_copy_kind kind;
	void *tag;       /* the producer's */
	bool read_failed; /* set by the copier: the source read failed */
	uint64_t written; /* set by the copier: data bytes written (runs
			     of zeroes found in a data range are not) */
};

struct bm_copier;

struct bm_copier_ops {
	/* Next range to copy, or false if there is none right now. */
	bool (*next)(struct bm_copier *c, struct bm_copy_range *r);
	/* The range is on the destination (err 0) or failed. */
	void (*done)(struct bm_copier *c, const struct bm_copy_range *r,
		     int err);
};

struct bm_copy_req;

struct bm_copier {
	struct bm_image *src;
	struct bm_image *dst;
	const struct bm_copier_ops *ops;
	void *opaque;
	uint32_t request_size;
	unsigned requests;
	uint32_t sparse_block;  /* zero detection unit, 0: off */
	bool dst_is_zero;       /* zero runs need no I/O */
	bool allocate;          /* zeroes are written allocated (no punch) */
	bool evict;             /* cached writes leave the page cache */
	bool async;             /* reads and writes off the loop thread
				   (BM_IO_ASYNC) */

	/* counters, read by the owner */
	uint64_t bytes_read;
	uint64_t bytes_written;
	uint64_t bytes_zeroed;
	unsigned inflight;

	/* private */
	struct bm_copy_req *reqs;
	void *arena;            /* every request's buffer */
	struct bm_copy_req *free_reqs;
	bool pumping;
	bool repump;
	bool stopped;
};

/*
 * Allocate the buffers (and fault them in).  The caller has set dst, ops,
 * opaque and the tunables (0 picks defaults: 1 MiB, 16 requests, 4 KiB
 * sparse block; for a store with a copy_size, that size and up to 32
 * requests), and src unless it sets it later with a request_size that is
 * a multiple of the source's alignment (the mirror job allocates before
 * it may touch the disk's image).
 */
int bm_copier_init(struct bm_copier *c);
void bm_copier_fini(struct bm_copier *c);

/* Start as many ranges as slots allow.  Call when work may be available. */
void bm_copier_pump(struct bm_copier *c);

/* Take no new ranges (ranges in flight still finish). */
void bm_copier_stop(struct bm_copier *c);

#endif /* BM_COPY_H */
