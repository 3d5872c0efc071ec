/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The qcow2 driver's private state, shared by qcow2.c (the driver) and
 * qcow2-bitmap-io.c (its persistent-bitmap entry points).  See qcow2.c
 * for the design and the locking.
 */
#ifndef BM_QCOW2_INT_H
#define BM_QCOW2_INT_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include <zstd.h>

#include "format.h"
#include "qcow2.h"

struct table {
	uint64_t offset;       /* host offset; 0: free slot */
	uint8_t *buf;          /* one cluster, big-endian entries */
	uint64_t used;         /* LRU stamp */
	uint32_t young;        /* L2: entries allocated since last flush */
	/* Generations, never reset for the life of the slot: gen counts
	 * changes in memory, wgen is the gen that was last written to the
	 * file (or read from it).  Dirty: gen != wgen. */
	uint64_t gen, wgen;
};

struct cache {
	struct table **t;
	unsigned n;            /* slots in use (t[0..n)) */
	unsigned bound;        /* soft limit on n */
	uint64_t tick;
};

struct pending_free {
	uint64_t cluster;
	uint64_t count;
};

struct qcow2 {
	struct bm_fmt *f;
	const char *name;
	pthread_mutex_t lock;
	struct bm_qcow2_header h;
	uint32_t cb;           /* cluster bits */
	uint64_t cs;           /* cluster size */
	uint64_t l2_entries;
	uint64_t rpb;          /* refcounts per block */
	bool writable;
	bool corrupt;

	uint8_t *l1;           /* l1_size entries, buffer rounded to 512 */
	uint64_t l1_buf_len;
	uint64_t l1_lo, l1_hi; /* dirty entries [lo, hi) */
	uint64_t l1_gen;       /* changes to the L1 table */

	uint8_t *rt;           /* refcount table, rt_entries entries */
	uint64_t rt_entries;
	uint64_t rt_lo, rt_hi;
	uint64_t rt_gen, rt_wgen; /* as struct table's */

	/* Flushes, one at a time (flush_lock, taken before lock).  While
	 * `flushing`, the flusher writes its copies without the lock and
	 * nobody else writes metadata: an eviction or a refcount table
	 * growth that must write waits for `flushed`. */
	pthread_mutex_t flush_lock;
	pthread_cond_t flushed;
	bool flushing;

	struct cache l2c, rbc;
	struct pending_free *pend;
	size_t npend, pend_cap;
	uint64_t cursor;       /* first cluster that may be free */

	/* Allocated on first use (cluster_bufs): up to 2 MiB each, and
	 * many opens never write part of a cluster or decompress. */
	uint8_t *zero;         /* one cluster of zeroes */
	uint8_t *work;         /* one cluster: COW source */
	uint8_t *cin;          /* compressed input, 2 clusters + 512 */
	uint8_t *cout;         /* last decompressed cluster */
	uint64_t cout_entry;   /* its L2 entry; 0: none */
	ZSTD_DCtx *zstd;       /* reused: creating one costs more than a
				* cluster's decompression */

	/* Autoclear bits (qcow2-bitmap-io.c).  Bits we do not maintain are
	 * cleared before the first change of the image, not at open: a
	 * tracker that attaches before that (keep_bitmaps) keeps bit 0, as
	 * it keeps the bitmaps up to date. */
	bool keep_bitmaps;
	/* The bitmap directory this open checked against the L2 tables
	 * (at load) or wrote: its list needs no such check to be freed. */
	uint64_t checked_dir;
	/* A switch of the bitmaps extension failed part way: what the file
	 * holds is not known, so no more commits (qcow2-bitmap-io.c). */
	bool bitmaps_lost;
};

/*
 * For qcow2-bitmap-io.c, with flush_lock and lock held and no flush
 * running:
 *  alloc_run: `count` contiguous clusters past the end of the file, with
 *    refcount 1 (in memory); *host the first one's offset.
 *  flush_refcounts: write dirty refcount blocks and table entries, synced.
 *  free_later: drop one reference to `count` clusters from `cluster` at
 *    the end of the next flush (their reference must be gone by then).
 *  alloc_buf: a zeroed, aligned buffer.
 *  clear_autoclear: clear the autoclear bits we do not maintain, synced.
 */
int bm_qcow2_alloc_run(struct qcow2 *q, uint64_t count, uint64_t *host);
int bm_qcow2_flush_refcounts(struct qcow2 *q);
int bm_qcow2_free_later(struct qcow2 *q, uint64_t cluster, uint64_t count);
void *bm_qcow2_alloc_buf(uint64_t len);
int bm_qcow2_clear_autoclear(struct qcow2 *q);

/*
 * Also for qcow2-bitmap-io.c, under the locks: the refcount of a
 * cluster (0 where no block counts it), and whether any host cluster of
 * u[0..n) (sorted by cluster) is a refcount block, an L2 table or holds
 * guest data: *hit its index (n: none), *what which of those.  The L2
 * tables are read as they are in memory, without touching the cache.
 */
struct bm_qcow2_use {
	uint64_t cluster;      /* host offset >> cluster bits */
	uint32_t owner;        /* bitmap index; UINT32_MAX: the directory */
};

int bm_qcow2_refcount(struct qcow2 *q, uint64_t cluster, uint64_t *v);
int bm_qcow2_find_in_use(struct qcow2 *q, const struct bm_qcow2_use *u,
			 size_t n, size_t *hit, const char **what);

/* At open (qcow2-bitmap-io.c, taking the locks): the bitmap directory,
 * if any, parses. */
int bm_qcow2_bitmaps_check(struct qcow2 *q);

#endif /* BM_QCOW2_INT_H */
