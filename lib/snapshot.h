/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Snapshots of a running disk (snapshot.c, docs/snapshot.md): what the
 * rest of the library sees of them.
 */
#ifndef BM_SNAPSHOT_H
#define BM_SNAPSHOT_H

#include <blockmirror/blockmirror.h>

struct blockmirror_disk;
struct bm_image;

/* The frozen view, an image on the disk's loop: read and block status
 * only, through bm_disk_aio_to so that no swap happens under a request. */
struct bm_image *bm_snapshot_view(struct blockmirror_snapshot *snap);

/* The disk the snapshot is of (NULL once the disk was closed). */
struct blockmirror_disk *bm_snapshot_disk(struct blockmirror_snapshot *snap);

/* What the view holds in [off, off + len): extents appended to `l`
 * (HOLE, ZERO or data).  Blocking; not from the loop thread. */
struct bm_extent_list;
int bm_snapshot_extents(struct blockmirror_disk *disk,
			struct blockmirror_snapshot *snap, uint64_t off,
			uint64_t len, struct bm_extent_list *l);

/*
 * For a reader that reads the view once, in ascending order, and nothing
 * it skips: all below `end` is read (or not held), so drop it from the
 * chunk holding *done (a chunk two reads share goes with the second), and
 * set *done = end.  Blocking, as blockmirror_snapshot_drop.
 */
int bm_snapshot_drop_behind(struct blockmirror_snapshot *snap, uint64_t *done,
			    uint64_t end);

/* The checkpoint the snapshot was taken `since` (borrowed, as long as the
 * snapshot), or NULL: blockmirror_snapshot_changed has nothing. */
const char *bm_snapshot_since(const struct blockmirror_snapshot *snap);

/*
 * The disk is closing, quiesced with nothing in flight (on its loop):
 * take every snapshot's filter off the stack; their handles stay valid
 * (DETACHED) until released.  bm_snapshot_disk_closed then closes their
 * scratch images, once the loop has nothing in flight (any thread).
 */
void bm_snapshot_detach_all(struct blockmirror_disk *disk);
void bm_snapshot_disk_closed(struct blockmirror_disk *disk);

#endif /* BM_SNAPSHOT_H */
