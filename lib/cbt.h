/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Changed-block tracking: named checkpoints of one disk and, for each, a
 * bitmap of the blocks written since, kept in a sidecar file or in a
 * qcow2 image's persistent bitmaps (cbt-image.c), valid after a crash
 * either way (docs/cbt.md).
 *
 * A tracker holds checkpoints C1..Cn, oldest first.  Bitmap Bk holds the
 * blocks written after Ck was created and before C(k+1) was; only Bn
 * takes marks.  "Changed since Ck" is Bk | ... | Bn.
 *
 * Two halves, as for the mirror's state.  The format half (cbt-format.c)
 * is pure: buffers in, structs out, every field checked, no I/O.  The
 * tracker (cbt.c) keeps the file up to date on the disk's event loop: a
 * guest write goes on only once its blocks are set in Bn on disk
 * (bm_cbt_mark), so after kill -9 or a power loss every block the guest
 * may have written since Cn is marked.
 *
 * Everything here runs on the loop thread of the loop given to
 * bm_cbt_open; nothing takes locks.  Errors are negative errnos with a
 * message (bm_error) that names the sidecar.
 */
#ifndef BM_CBT_H
#define BM_CBT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "bitmap.h"
#include "loop.h"

struct bm_image;

#define BM_CBT_NAME_MAX 64u              /* bytes of a checkpoint name */
#define BM_CBT_MAX_CHECKPOINTS 256u
#define BM_CBT_DEFAULT_GRANULARITY (UINT32_C(64) << 10)
#define BM_CBT_MIN_GRANULARITY (UINT32_C(4) << 10)
#define BM_CBT_MAX_GRANULARITY (UINT32_C(64) << 20)

/*
 * A checkpoint created less than this many seconds after the newest
 * starts its bitmap on disk with the newest's durable blocks
 * (cbt-checkpoint.c); 0 never.  Tests change it, and the clock
 * checkpoints are created by (unix seconds).
 */
extern unsigned bm_cbt_carry_window;
extern uint64_t (*bm_cbt_clock)(void);

/* ---- the format (cbt-format.c) --------------------------------------- */

#define BM_CBT_HEADER_FIXED 64u   /* then 128 bytes per checkpoint */
#define BM_CBT_ENTRY_SIZE 128u
#define BM_CBT_PAGE 4096u         /* the unit of in-place bitmap writes */

/* Header flags. */
#define BM_CBT_IN_USE 1u          /* a tracker has the file open */
/* Checkpoint flags: why "changed since" it can no longer be trusted. */
#define BM_CBT_LOST 1u            /* a write-back of its marks failed */
#define BM_CBT_DAMAGED 2u         /* its bitmap held impossible bits */
/* In-image only (kept as the bitmap's in_use flag, never in a sidecar): */
#define BM_CBT_STALE 4u           /* found in use: its writer did not
				     store it (QEMU died, or a LOST one) */
#define BM_CBT_UNKEPT 8u          /* the image was written by a program
				     that does not keep bitmaps */

struct bm_cbt_entry {
	uint64_t id;                      /* unique, increasing */
	uint64_t created;                 /* unix seconds */
	uint32_t flags;                   /* BM_CBT_LOST, BM_CBT_DAMAGED */
	char name[BM_CBT_NAME_MAX + 1];   /* NUL-terminated */
};

/* The header and checkpoint list: everything but the bitmaps. */
struct bm_cbt_header {
	uint32_t flags;                   /* BM_CBT_IN_USE */
	uint64_t disk_size;
	uint32_t granularity;
	uint64_t next_id;                 /* above every id in the list */
	uint32_t count;
	struct bm_cbt_entry *cp;          /* count entries, oldest first */
};

/* Is `name` 1 to 64 bytes of [A-Za-z0-9._-]? */
bool bm_cbt_name_ok(const char *name);

/* Blocks of a disk, and bytes of one bitmap on disk (whole pages). */
uint64_t bm_cbt_blocks(uint64_t disk_size, uint32_t granularity);
uint64_t bm_cbt_bitmap_size(uint64_t disk_size, uint32_t granularity);

/* Bytes of the header with `count` checkpoints (whole pages). */
size_t bm_cbt_header_size(uint32_t count);

/*
 * Encode h into buf (bm_cbt_header_size(h->count) bytes).  0, or -EINVAL
 * for a header that would not read back (bad geometry, names, ids).
 */
int bm_cbt_header_encode(const struct bm_cbt_header *h, uint8_t *buf);

/*
 * The header's size as its fixed part says (the first 64 bytes of len):
 * 0 and *size, or -EBADMSG when that part is not a tracker's.
 */
int bm_cbt_header_peek(const uint8_t *buf, size_t len, size_t *size);

/*
 * Parse and check a whole header.  0 with *h filled (h->cp is the
 * caller's: free it), or -EBADMSG (bm_error says why, without the path).
 */
int bm_cbt_header_decode(const uint8_t *buf, size_t len,
			 struct bm_cbt_header *h);

/*
 * Bitmap bytes <-> words: block b is bit b % 8 of byte b / 8.  Encode
 * writes pages [page, page + npages) of a bitmap of `blocks` bits from
 * `words` (ORed with `also` unless NULL) to buf (which holds those
 * pages); decode ORs them into words
 * and returns the number of bits newly set, or UINT64_MAX (words
 * untouched) if a bit past the last block is set.
 */
void bm_cbt_bits_encode(const uint64_t *words, const uint64_t *also,
			uint64_t blocks, uint64_t page, uint64_t npages,
			uint8_t *buf);
uint64_t bm_cbt_bits_decode(const uint8_t *buf, uint64_t blocks,
			    uint64_t page, uint64_t npages, uint64_t *words);

/* ---- the tracker (cbt.c) --------------------------------------------- */

struct bm_cbt;

/*
 * A mark that must wait for the disk.  The caller sets fn (and opaque)
 * and keeps the struct alive until fn runs; the other fields are the
 * tracker's.  fn runs on the loop thread, never inside bm_cbt_mark, with
 * 0 (the range is marked durably: submit the guest write) or a negative
 * errno (it is not: the disk submits the guest write all the same and
 * warns once, bm_disk_tracking_failed, the checkpoints being LOST).  fn may call bm_cbt_mark, not
 * the synchronous calls below.
 */
struct bm_cbt_waiter {
	void (*fn)(struct bm_cbt_waiter *w, int err);
	void *opaque;
	uint64_t offset, length;
	struct bm_cbt_waiter *next;
};

/* What bm_cbt_get reports of a checkpoint; the strings are borrowed
 * until the next bm_cbt_create, bm_cbt_remove or bm_cbt_close. */
struct bm_cbt_info {
	const char *name;
	uint64_t id;
	uint64_t created;          /* unix seconds */
	uint64_t blocks;           /* set in its own bitmap */
	const char *untrusted;     /* NULL, or why changed-since is refused */
};

/*
 * Open the sidecar at `path` for a disk of disk_size bytes.  A missing
 * file is created empty (no checkpoint) when `create`, else -ENOENT.
 * granularity 0 takes the file's (or BM_CBT_DEFAULT_GRANULARITY for a new
 * file); otherwise it must match the file's.  A file of another disk
 * size or granularity is refused (-ESTALE, naming both), a damaged
 * header or list too (-EBADMSG): nothing is silently replaced.  On
 * success the file is rewritten durably with its in-use flag set; if it
 * was set already the previous tracker did not close (bm_cbt_crashed),
 * which write-ahead marking makes harmless.  Synchronous: turns `loop`.
 */
int bm_cbt_open(struct bm_loop *loop, const char *path, uint64_t disk_size,
		uint32_t granularity, bool create, struct bm_cbt **out);

/*
 * The same with the checkpoints kept in the image itself: the persistent
 * dirty bitmaps of `image`, a writable qcow2 version 3 image with
 * clusters of 4 KiB or more, whose loop is `loop` (this turns it, and
 * runs the driver's thread, so: on that loop's thread, the image idle).
 * Every bitmap of the image is a checkpoint, in directory order; all
 * must share one granularity and have names bm_cbt_name_ok accepts
 * (-ENOTSUP otherwise, naming it).  Never crashed (there is no in-use
 * flag to find: marks are written ahead in place).  See docs/cbt.md.
 */
int bm_cbt_open_image(struct bm_loop *loop, struct bm_image *image,
		      uint64_t disk_size, uint32_t granularity,
		      struct bm_cbt **out);

/*
 * The image `img` is about to be closed while the disk goes on (a move's
 * pivot): if the tracker keeps its checkpoints in it, marks go on into
 * its file through the tracker's own handle, and the list can no longer
 * change (create, remove: -ESTALE, saying why).
 */
void bm_cbt_image_gone(struct bm_cbt *cbt, const struct bm_image *img);
/* Is the record kept in `img` (its qcow2 bitmaps)?  Accepts NULL. */
bool bm_cbt_kept_in(const struct bm_cbt *cbt, const struct bm_image *img);

/* Does the tracker keep its checkpoints in the image (not a sidecar)?
 * bm_cbt_path: the sidecar's path or the image's name. */
bool bm_cbt_in_image(const struct bm_cbt *cbt);
const char *bm_cbt_path(const struct bm_cbt *cbt);

/*
 * Make every mark durable, rewrite the file with the in-use flag clear
 * (and any lost checkpoint flagged), and free the tracker, even when
 * that fails: 0 or the first error.  Accepts NULL.  Synchronous.
 */
int bm_cbt_close(struct bm_cbt *cbt);

/*
 * Write-ahead marking of a guest write to [offset, offset + length):
 *  0   the range is marked durably in Bn already (or there is no
 *      checkpoint): go on at once.  Costs one bitmap test.
 *  1   queued: w->fn runs once the range is durable (or failed).
 * <0   refused at once: out of range, or the tracker is broken (a
 *      write-back failed; every later mark fails the same way until a
 *      bm_cbt_create or bm_cbt_remove rewrites the file).
 */
int bm_cbt_mark(struct bm_cbt *cbt, uint64_t offset, uint64_t length,
		struct bm_cbt_waiter *w);

/* Wait (turning the loop) until every mark made so far is durable or
 * has failed.  0 or the tracker's error. */
int bm_cbt_flush(struct bm_cbt *cbt);

/*
 * Structural changes: called with guest writes quiesced, they wait for
 * write-back, then rewrite the whole file durably (temporary file,
 * fsync, rename, directory fsync), so a crash leaves the old list or the
 * new one.  On failure nothing changes, in memory or on disk.
 *
 * create: append checkpoint `name` (-EINVAL for a bad name, -EEXIST for
 * a taken one, -ENOSPC past BM_CBT_MAX_CHECKPOINTS); its bitmap starts
 * empty and the previous newest is frozen.
 * remove: drop checkpoint `name` (-ENOENT if none); its bitmap is merged
 * into the one before, so changed-since of the one before is unchanged.
 */
int bm_cbt_create(struct bm_cbt *cbt, const char *name);
int bm_cbt_remove(struct bm_cbt *cbt, const char *name);

/* Checkpoints, oldest first: i from 0 to bm_cbt_count() - 1. */
size_t bm_cbt_count(const struct bm_cbt *cbt);
int bm_cbt_get(const struct bm_cbt *cbt, size_t i, struct bm_cbt_info *info);

/*
 * The blocks changed since checkpoint `name`, as a new bitmap of the
 * disk (granularity-sized chunks; the caller frees it with
 * bm_bitmap_free), and the bytes it covers.  Includes marks not yet
 * durable.  -ENOENT for no such checkpoint, -ESTALE if it is untrusted
 * (the message says why).
 */
int bm_cbt_changed_since(const struct bm_cbt *cbt, const char *name,
			 struct bm_bitmap *out, uint64_t *bytes);

/*
 * The fine record (memory only, cbt.c): checkpoints created from now on
 * also keep their marks at `granularity` (a power of two from
 * BM_CBT_MIN_GRANULARITY, below the record's).  Counted: each call with
 * a granularity is undone by one with 0, and the last undoing drops the
 * fine bitmaps kept.  -EINVAL for a bad granularity, -EBUSY for another
 * one than the record keeps already.
 */
int bm_cbt_keep_fine(struct bm_cbt *cbt, uint32_t granularity);
/* The fine record's granularity, 0 when it is not kept. */
uint32_t bm_cbt_fine_granularity(const struct bm_cbt *cbt);
/* bm_cbt_changed_since at the fine record's granularity when every
 * checkpoint from `name` on has a fine bitmap, else at the record's:
 * bm_bitmap_granularity(out) says which. */
int bm_cbt_changed_since_fine(const struct bm_cbt *cbt, const char *name,
			      struct bm_bitmap *out, uint64_t *bytes);
/* The previous tracker of this file did not close it. */
bool bm_cbt_crashed(const struct bm_cbt *cbt);

/* false while marks fail: since a write-back error, until a structural
 * rewrite.  Checkpoints older than the error stay untrusted after it. */
bool bm_cbt_trusted(const struct bm_cbt *cbt);

uint32_t bm_cbt_granularity(const struct bm_cbt *cbt);

/* Hand an idle tracker (no write-back in flight) to another loop: it
 * was opened on a private one. */
void bm_cbt_set_loop(struct bm_cbt *cbt, struct bm_loop *loop);

#endif /* BM_CBT_H */
