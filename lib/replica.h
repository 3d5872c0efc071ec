/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The replica's store (issue 18; docs/replica-store.md): one disk's
 * recovery points in a directory, received cycle by cycle from a primary.
 *
 * Every committed point reads, through its image's backing chain, exactly
 * as the primary's disk read at that point's instant; a crash at any
 * moment leaves the points that were committed (the latest being the last
 * commit that returned), and bm_replica_open finishes or undoes whatever
 * step it interrupted.  A pinned point's image file is never written nor
 * removed until it is unpinned, so a reader that holds it open keeps
 * reading the same data.
 *
 * Calls block (image I/O, fsyncs) and return 0 or a negative errno with a
 * message (bm_error) naming the directory, the file or the point.  A
 * handle may be used from several threads: its calls are serialized.
 * One process at a time per directory (a lock file, DIR/replica.lock).
 * Not public yet: the commands and the daemon build on it.
 */
#ifndef BM_REPLICA_H
#define BM_REPLICA_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct bm_replica;

#define BM_REPLICA_GEN_HISTORY 8

/* Generation identifiers (UUIDs, lower-case text). */
struct bm_replica_gen {
	char current[37];            /* this store's generation */
	struct {
		char gen[37];        /* the generation that ended... */
		uint64_t point;      /* ...at this point (a promote) */
	} history[BM_REPLICA_GEN_HISTORY];  /* oldest first */
	unsigned nhistory;
};

struct bm_replica_point {
	uint64_t number;             /* the primary's cycle number */
	int64_t instant_ns;          /* the primary's instant (realtime) */
	int64_t committed_ns;        /* when this store committed it */
	uint64_t bytes;              /* bytes the cycle carried */
	bool app_consistent;
	bool retained;               /* kept by the retention policy */
	bool pinned;                 /* pinned, or under a test overlay */
	bool latest;
	char gen[37];                /* the primary generation that sent it */
	char image[4096];            /* the image whose chain reads as it */
};

/*
 * Retention: the latest point always, plus `keep` older points: the
 * first point committed in each window of `every_s` seconds of the
 * primary's instants, for the newest `keep` windows (every_s 0: every
 * point is a window of its own).  keep 0: the latest only.
 */
struct bm_replica_policy {
	unsigned keep;               /* at most BM_REPLICA_MAX_KEEP */
	uint32_t every_s;
};

/* Each retained point is a layer of a chain that opens only up to 32
 * deep (docs/chains.md), pinned points too (7 at most at once). */
#define BM_REPLICA_MAX_KEEP 16

/* What tidying has cost since the handle was opened (for tests and
 * status): layers merged, bytes written into the layers below them, and
 * what those merged layers allocated. */
struct bm_replica_stats {
	uint64_t merges;
	uint64_t merge_bytes;
	uint64_t merged_alloc;
};

/*
 * Make DIR (created if missing) a new store for a disk of `size` bytes.
 * `base`: NULL for a new sparse raw DIR/base.raw; else an existing image
 * inside DIR (a seed copy, an old primary's disk), raw, qcow2 without a
 * backing file, or VHDX, of exactly `size` bytes, not named like the
 * store's own files (docs/replica-store.md), adopted as it is.
 * `granularity`: a power of two from 4 KiB to 64 MiB, 0 for 64 KiB.
 * -EEXIST if DIR already holds a store.  *out is the caller's
 * (bm_replica_close).
 */
int bm_replica_create(const char *dir, uint64_t size, const char *base,
		      uint32_t granularity, struct bm_replica **out);

/*
 * Open DIR's store: a commit, a merge or a promote that a crash
 * interrupted is finished, an uncommitted staging image is removed, and
 * so is every file of the store's names the state does not list; then
 * the store is tidied.  -ENOENT: no store; -EBADMSG: a state that does
 * not parse or holds a bad field (the message names the file and the
 * field).
 */
int bm_replica_open(const char *dir, struct bm_replica **out);

/* Close; an open cycle is aborted.  Accepts NULL. */
void bm_replica_close(struct bm_replica *r);

uint64_t bm_replica_size(struct bm_replica *r);
uint32_t bm_replica_granularity(struct bm_replica *r);

/* "replica", or "primary" once promoted.  Borrowed. */
const char *bm_replica_role(struct bm_replica *r);

/* The base image's path (absolute).  Borrowed; lives as the handle. */
const char *bm_replica_base(struct bm_replica *r);

int bm_replica_get_gen(struct bm_replica *r, struct bm_replica_gen *gen);

/* Persisted at once; points are dropped by it at the next tidy (a
 * commit, an unpin, a begin, an open).  -EINVAL: keep above BM_REPLICA_MAX_KEEP. */
int bm_replica_set_policy(struct bm_replica *r,
			  const struct bm_replica_policy *p);

/*
 * Open cycle `point` (above the latest) from the primary generation
 * `primary_gen`: *image (the caller's) is the image the primary's
 * changed granules are written to, created empty: a qcow2 overlay of
 * the latest point, or the base itself for the first point.  Nothing is
 * durable until bm_replica_commit.  -EROFS once the store is a primary
 * (the fence), -EBUSY while a cycle is open, -EINVAL for a point not
 * above the latest or a bad generation.  A tidy that an earlier call
 * could not finish (a full disk) is tried again first.
 */
int bm_replica_begin(struct bm_replica *r, uint64_t point,
		     const char *primary_gen, char **image);

/* The open cycle's point number, or -ENOENT when none is open. */
int bm_replica_pending(struct bm_replica *r, uint64_t *point);

/*
 * Make the open cycle the latest point, durably (the image is synced
 * first); then tidy (retention, merges).  A failure of the tidy after the
 * commit is not returned: the point exists, the next tidy goes on.
 */
int bm_replica_commit(struct bm_replica *r, int64_t instant_ns,
		      uint64_t bytes, bool app_consistent);

/* Drop the open cycle's image; the latest point is unchanged.  (For the
 * first point the base keeps what was written: there is no point yet,
 * and bm_replica_digests tells what it holds.) */
int bm_replica_abort(struct bm_replica *r);

/* The committed points, oldest first: *list malloc'd, the caller's. */
int bm_replica_points(struct bm_replica *r, struct bm_replica_point **list,
		      size_t *n);

/* -ENOENT while there is none. */
int bm_replica_latest(struct bm_replica *r, uint64_t *point);

/*
 * Pin `point` (0: the latest): *image (the caller's) is the image whose
 * chain reads as it; that file is neither written nor removed until the
 * last unpin (pins nest; they last as long as the handle).  -ENOENT: no
 * such point; -EMFILE: 7 other points are pinned (or under test
 * overlays) already.
 */
int bm_replica_pin(struct bm_replica *r, uint64_t point, char **image);
int bm_replica_unpin(struct bm_replica *r, uint64_t point);

/*
 * Test failover: a new writable qcow2 overlay DIR/test-N.qcow2 of point
 * N (0: the latest), which stays pinned while the overlay exists (across
 * opens, too).  -EEXIST if N has one.  Discard removes it and unpins.
 */
int bm_replica_test_overlay(struct bm_replica *r, uint64_t point,
			    char **image);
int bm_replica_test_discard(struct bm_replica *r, uint64_t point);

/*
 * XXH3-64 of each granule of point `point` (0: the latest, or the base
 * while there is no point) in [offset, offset + len): offset a multiple
 * of the granularity, len too unless the range ends at the disk's end
 * (the last granule may be short).  out[] has len / granularity entries,
 * rounded up.
 */
int bm_replica_digests(struct bm_replica *r, uint64_t point, uint64_t offset,
		       uint64_t len, uint64_t *out);

/*
 * Failover: make `point` (0: the latest) the disk.  The layers up to it
 * are merged into the base (resumable by bm_replica_open after a crash),
 * every point is dropped, the role becomes "primary" and a new
 * generation starts, with (the point's generation, point) in its
 * history.  *image (the caller's): the base's path, now the disk to
 * serve; *discarded: the bytes the primary sent in the cycles after
 * `point` (those of points retention had dropped since included), now
 * lost.  -EBUSY while a point is pinned, a test overlay exists or a
 * cycle is open; -EROFS if already a primary.
 */
int bm_replica_promote(struct bm_replica *r, uint64_t point, char **image,
		       uint64_t *discarded);

void bm_replica_get_stats(struct bm_replica *r, struct bm_replica_stats *s);

#endif /* BM_REPLICA_H */
