/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Checkpoints of a tracked disk (checkpoint.c, docs/cbt.md): what the
 * rest of the library calls.
 */
#ifndef BM_CHECKPOINT_H
#define BM_CHECKPOINT_H

#include <stdint.h>

struct blockmirror_disk;
struct bm_bitmap;

/* The record's granularity, 0 if the disk does not track changes.
 * Blocking (from any thread but the disk's loop). */
uint64_t bm_checkpoint_granularity(struct blockmirror_disk *disk);

/*
 * What changed since checkpoint `since` (a bitmap in the record's
 * granularity, and its bytes): -ESTALE if it is not trusted, -ENOENT if
 * there is none.  Blocking (from any thread but the disk's loop).
 */
int bm_checkpoint_changed(struct blockmirror_disk *disk, const char *since,
			  struct bm_bitmap *changed, uint64_t *bytes);

/*
 * Keep the record's fine, in-memory bitmaps (cbt.h, bm_cbt_keep_fine)
 * at `granularity` from now on, 0 to undo one such call: what changed
 * since a checkpoint created after it can then be told at that
 * granularity, for a snapshot of the same chunk size.  A control call
 * (checkpoint.c).  Blocking (from any thread but the disk's loop).
 */
int bm_checkpoint_keep_fine(struct blockmirror_disk *disk,
			    uint64_t granularity);
/*
 * For a snapshot's instant (the disk quiesced, nothing in flight, on its
 * loop): `changed` (when `since`) gets what changed since checkpoint
 * `since`, at granularity `g` when the fine record is kept at g and
 * covers it, else at the record's; then checkpoint `create` (when not
 * NULL) is made.  0, or -errno with nothing changed.
 */
int bm_checkpoint_at_instant(struct blockmirror_disk *disk, const char *since,
			     const char *create, uint64_t g,
			     struct bm_bitmap *changed, uint64_t *bytes);

#endif /* BM_CHECKPOINT_H */
