/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The changed-block tracker's private parts, shared by cbt.c (open,
 * close, marking and write-back, whole-file rewrites) and
 * cbt-checkpoint.c (creating, removing and reading checkpoints).  See
 * cbt.c for the design.
 */
#ifndef BM_CBT_INT_H
#define BM_CBT_INT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "bitmap.h"
#include "cbt.h"
#include "store.h"

struct checkpoint {
	struct bm_cbt_entry e;
	struct bm_bitmap bits;       /* Bk; for the newest, `want` */
	/* Bk at fine_granularity, in memory only: set by every mark since
	 * Ck was created in this process (words NULL: not kept, as for a
	 * checkpoint read from the file). */
	struct bm_bitmap fine;
};

struct bm_cbt {
	struct bm_loop *loop;
	char *path;                  /* the sidecar, or the image */
	/* In-image record (cbt-image.c): the qcow2 image whose persistent
	 * bitmaps hold the checkpoints, and where the clusters of Bn are
	 * (last[i]: cluster i of its data); NULL for a sidecar.  new_last
	 * is a commit's, applied by bm_cbt_rewritten. */
	struct bm_image *image;
	bool image_gone;             /* closed under us (bm_cbt_image_gone) */
	uint64_t *last, *new_last;
	uint32_t cluster_size;
	struct bm_store *store;
	uint64_t disk_size;
	uint32_t granularity;
	uint32_t fine_granularity;   /* 0: no fine record (bm_cbt_keep_fine) */
	unsigned fine_users;         /* the keep_fine calls not undone */
	uint64_t blocks;
	uint64_t bitmap_size;        /* bytes of one bitmap in the file */
	uint64_t npages;             /* pages of one bitmap */
	uint64_t next_id;
	bool crashed;

	size_t count;
	struct checkpoint cp[BM_CBT_MAX_CHECKPOINTS];

	struct bm_bitmap durable;    /* set in Bn on disk */
	/* Bn on disk holds blocks of the checkpoints before Cn too
	 * (carried: durable is not within Bn's `want`), since carry_since
	 * (unix seconds).  See bm_cbt_create. */
	bool carrying;
	uint64_t carry_since;
	/* Opened after a crash: Bn may hold carried blocks of unknown age,
	 * so the next checkpoint starts empty. */
	bool carried_unknown;
	struct bm_bitmap pending;    /* pages of Bn to write; one bit a page */
	struct bm_bitmap inflight;   /* pages the write-back in flight holds */
	uint8_t *wbuf;               /* those pages' snapshot, at their place */

	bool writing;                /* a write-back (writes, flush) running */
	bool flushing;               /* its flush */
	uint64_t cursor;             /* next page of inflight to write */
	struct bm_io io;

	int err;                     /* broken: the write-back's error */
	char *errmsg;
	struct bm_cbt_waiter *waiters, **wtail;
};

/* dst |= src (same geometry), count kept exact. */
void bm_cbt_or_into(struct bm_bitmap *dst, const struct bm_bitmap *src);

/*
 * Write a whole new file durably: the header with `count` entries and
 * their bitmaps (bits[i] for ents[i]).  The store still holds the old
 * file; on failure the old file is still in place.
 */
int bm_cbt_write_file(struct bm_cbt *cbt, const struct bm_cbt_entry *ents,
		      struct bm_bitmap *const *bits, size_t count,
		      bool in_use);

/* After a rewrite that matches memory: Bn is durable as it is (with
 * the blocks of `carried` too, unless NULL: what the rewrite wrote for
 * Bn beyond it), the tracker is mended, and the store moves to the new
 * file. */
void bm_cbt_rewritten(struct bm_cbt *cbt, const struct bm_bitmap *carried);

/* ---- the in-image record (cbt-image.c) ---- */

/* Load the image's bitmaps as checkpoints (cbt->image, loop, path and
 * disk_size set): 0, or 1 when the image must be rewritten before marks
 * can go in place (the newest not fully allocated, flags to change), or
 * -errno. */
int bm_cbt_image_load(struct bm_cbt *cbt, uint32_t granularity);

/* bm_cbt_write_file's in-image half: replace the image's bitmaps. */
int bm_cbt_image_write(struct bm_cbt *cbt, const struct bm_cbt_entry *ents,
		       struct bm_bitmap *const *bits, size_t count);

/* File offset of page `page` of Bn. */
uint64_t bm_cbt_image_page(const struct bm_cbt *cbt, uint64_t page);

/* Stop keeping the image's bitmaps (the tracker closes). */
int bm_cbt_image_release(struct bm_cbt *cbt);

#endif /* BM_CBT_INT_H */
