/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The qcow2 format driver (see format.h for the engine contract and
 * qcow2.h for the on-disk structures).
 *
 * Reads version 2 and 3 images; writes version 3 only.  Metadata lives
 * in two small write-back caches (L2 tables, refcount blocks) plus the
 * whole L1 table and refcount table in memory.  Allocation appends (or
 * reuses a cluster freed by an earlier flush) and only changes memory;
 * flush makes it durable in this order, each step followed by a sync:
 *
 *   1. the data (the engine has completed every earlier request and
 *      synced it; bm_fmt_wait_mark waits for later ones already mapped);
 *   2. dirty refcount blocks, then the refcount table entries that
 *      point at new blocks: refcount before reference;
 *   3. dirty L2 tables: data before L2, refcount before reference;
 *   4. the changed part of the L1 table: L2 before L1;
 *   5. pending frees: the decrements of clusters whose last reference
 *      was removed in steps 3-4, so "reference removed before the
 *      cluster is freed".
 *
 * The flush runs on the engine's flusher thread (flush_apart) and holds
 * the lock only to copy and to mark, never across a sync, so guest
 * writes, allocating ones included, go on meanwhile.  Under the lock, at
 * one instant, it copies every dirty refcount block and L2 table and the
 * dirty ranges of the refcount and L1 tables, and counts the pending
 * frees; those copies agree with each other, so writing them in the
 * order above is crash-safe whatever map changes in memory meanwhile.
 * Tables carry generations (gen: changes, wgen: what is in the file): a
 * table changed after the copy stays dirty for the next flush, and a
 * copy is never written over newer content an eviction wrote.  While the
 * flush writes (`flushing`), nobody else writes metadata: an eviction
 * that would write a dirty table takes a clean one or waits, and so does
 * a refcount table growth.  Only the frees counted in the copy are
 * applied at step 5 (in memory, under the lock, then their blocks are
 * copied, written and synced like step 2); a freed cluster may be
 * reused as soon as its decrement is in memory, since its reference is
 * durably gone and its new increment is flushed before any new
 * reference.
 *
 * A crash between any two steps leaves refcounts at or above the true
 * number of references: at worst leaked clusters (qemu-img check exit
 * 3), never a referenced cluster with refcount 0.  Refcount blocks may
 * be written early (cache eviction): relative to the file they only hold
 * increments, which can only leak, and the decrements of step 5, whose
 * references are durably gone.  A write that needs a new cluster
 * (or copy-on-write) for part of a cluster is done by the driver
 * itself: it writes the whole cluster (the guest's bytes plus the fill
 * from the backing image, the old cluster or zeroes).  A whole new
 * cluster of guest data is handed to the engine to write from the
 * caller's buffer.  Either way, before an L2 table with such entries
 * ("young") is written, at flush or eviction, bm_fmt_wait_data and a
 * sync put the data in the file: "data before L2".  Growing the refcount table
 * writes the new table and its blocks elsewhere, syncs, and then
 * switches the header with one 12-byte write inside the first sector;
 * the old table is freed like any other cluster.  The L1 table is never
 * resized (there is no resize), so it is only ever updated in place.
 *
 * Autoclear bits: set, they promise the next reader that what they
 * guard (bit 0: the persistent bitmaps) holds our writes too.  So the
 * bits we do not maintain are cleared before the first change of the
 * image (in map, on the worker), not at open: a change tracker that
 * attaches before that (qcow2-bitmap-io.c, keep_bitmaps) keeps bit 0 and
 * the bitmaps up to date instead.  The bitmap directory is checked at
 * open (qcow2-bitmap.c).
 *
 * Images with internal snapshots, dirty (lazy refcount) or corrupt
 * images and version 2 images are read-only here.  A data write whose
 * host range overlaps metadata marks the image corrupt (as QEMU does)
 * and fails.
 *
 * One mutex (lock) guards the state; map with nowait uses trylock and
 * only answers from memory.  flush_lock serializes flushes (and backing
 * changes), and is taken before lock.  Evictions still write, and sync,
 * under lock; with the cache bounds below they are rare (an image of
 * more than 32 GiB at 64 KiB clusters written all over).
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <zstd.h>

#include "errors.h"
#include "format.h"
#include "internal.h"
#include "qcow2.h"
#include "qcow2-int.h"

/* ---- small helpers ------------------------------------------------- */

static void *
alloc_buf(uint64_t len)
{
	void *p;

	if (posix_memalign(&p, 4096, len ? len : 512))
		return NULL;
	memset(p, 0, len ? len : 512);
	return p;
}

static uint64_t
l1_get(struct qcow2 *q, uint64_t i)
{
	return bm_get_be64(q->l1 + i * 8);
}

static void
l1_set(struct qcow2 *q, uint64_t i, uint64_t v)
{
	bm_put_be64(q->l1 + i * 8, v);
	q->l1_gen++;
	if (q->l1_lo == q->l1_hi) {
		q->l1_lo = i;
		q->l1_hi = i + 1;
	} else {
		q->l1_lo = BM_MIN(q->l1_lo, i);
		q->l1_hi = BM_MAX(q->l1_hi, i + 1);
	}
}

static uint64_t
rt_get(struct qcow2 *q, uint64_t i)
{
	return bm_get_be64(q->rt + i * 8) & BM_QCOW2_REFTABLE_MASK;
}

static void
rt_set(struct qcow2 *q, uint64_t i, uint64_t v)
{
	bm_put_be64(q->rt + i * 8, v);
	q->rt_gen++;
	if (q->rt_lo == q->rt_hi) {
		q->rt_lo = i;
		q->rt_hi = i + 1;
	} else {
		q->rt_lo = BM_MIN(q->rt_lo, i);
		q->rt_hi = BM_MAX(q->rt_hi, i + 1);
	}
}

/* Write entries [lo, hi) of an 8-byte-entry table at `off`, widened to
 * 512-byte boundaries inside the buffer (`buf_len` bytes). */
static int
write_entries(struct qcow2 *q, const uint8_t *buf, uint64_t buf_len,
	      uint64_t off, uint64_t lo, uint64_t hi)
{
	uint64_t a = bm_round_down(lo * 8, 512);
	uint64_t b = BM_MIN(bm_round_up(hi * 8, 512), buf_len);

	return bm_fmt_pwrite(q->f, buf + a, b - a, off + a);
}

static int
mark_corrupt(struct qcow2 *q)
{
	uint8_t b[8];
	int err;

	q->corrupt = true;
	q->h.incompatible |= BM_QCOW2_INCOMPAT_CORRUPT;
	bm_put_be64(b, q->h.incompatible);
	err = bm_fmt_pwrite(q->f, b, 8, BM_QCOW2_OFF_INCOMPAT);
	if (!err)
		err = bm_fmt_sync(q->f);
	return err;
}

static int
add_pending(struct qcow2 *q, uint64_t cluster, uint64_t count)
{
	if (q->npend == q->pend_cap) {
		size_t cap = q->pend_cap ? q->pend_cap * 2 : 64;
		struct pending_free *p = realloc(q->pend, cap * sizeof *p);

		if (!p)
			return bm_error(-ENOMEM, "%s: out of memory", q->name);
		q->pend = p;
		q->pend_cap = cap;
	}
	q->pend[q->npend++] = (struct pending_free){ cluster, count };
	return 0;
}

/* ---- caches --------------------------------------------------------- */

static int flush_refcounts(struct qcow2 *q);

static bool
dirty(const struct table *t)
{
	return t->gen != t->wgen;
}

static void
touch(struct table *t)
{
	t->gen++;
}

/* Wait (the worker, about to write metadata) until a flush has written
 * and synced its copies.  Drops the lock meanwhile. */
static void
wait_flushing(struct qcow2 *q)
{
	while (q->flushing)
		pthread_cond_wait(&q->flushed, &q->lock);
}

static struct table *
cache_find(struct cache *c, uint64_t off)
{
	for (unsigned i = 0; i < c->n; i++)
		if (c->t[i]->offset == off) {
			c->t[i]->used = ++c->tick;
			return c->t[i];
		}
	return NULL;
}

/*
 * Write back every dirty L2 table.  A table may reference clusters whose
 * refcounts are still only in memory, and (young) new clusters whose data
 * may not be durable yet: those go first, one data sync and one refcount
 * flush for all of them.  Writing them all at once, rather than the one
 * table the cache evicts, shares that cost: a copy into a sparse image
 * fills a new table per 512 MiB and evicts one as often.
 */
static int
l2_writeback_all(struct qcow2 *q)
{
	struct cache *c = &q->l2c;
	bool young = false;
	int err = 0;

	for (unsigned i = 0; i < c->n; i++)
		young |= dirty(c->t[i]) && c->t[i]->young;
	if (young) {
		bm_fmt_wait_data(q->f);
		err = bm_fmt_sync(q->f);
	}
	if (!err)
		err = flush_refcounts(q);
	for (unsigned i = 0; !err && i < c->n; i++) {
		struct table *t = c->t[i];

		if (!dirty(t))
			continue;
		t->young = 0;
		err = bm_fmt_pwrite(q->f, t->buf, q->cs, t->offset);
		if (!err)
			t->wgen = t->gen;
	}
	return err;
}

static int
table_writeback(struct qcow2 *q, struct cache *c, struct table *t)
{
	int err;

	if (!dirty(t))
		return 0;
	if (c == &q->l2c)
		return l2_writeback_all(q);
	err = bm_fmt_pwrite(q->f, t->buf, q->cs, t->offset);
	if (!err)
		t->wgen = t->gen;
	return err;
}

/* A slot for a table not in the cache: a new one under the bound, else
 * the least recently used one, preferring tables without young entries
 * (writing those needs no data sync).  During a flush, a clean one if
 * there is any; else it waits for the flush and returns -EAGAIN: the
 * caller looks again (the flusher may have loaded tables meanwhile). */
static int
cache_slot(struct qcow2 *q, struct cache *c, struct table **out)
{
	struct table *victim = NULL, *clean = NULL, **nt;
	int err;

	for (unsigned i = 0; c->n >= c->bound && i < c->n; i++) {
		struct table *t = c->t[i];

		if (!victim || (victim->young && !t->young) ||
		    (!victim->young == !t->young && t->used < victim->used))
			victim = t;
		if (!dirty(t) && (!clean || t->used < clean->used))
			clean = t;
	}
	if (victim && dirty(victim) && q->flushing) {
		if (!clean) {
			wait_flushing(q);
			return -EAGAIN;
		}
		victim = clean;
	}
	if (victim) {
		err = table_writeback(q, c, victim);
		if (err)
			return err;
		*out = victim;
		return 0;
	}
	nt = realloc(c->t, (c->n + 1) * sizeof *nt);
	if (!nt)
		return bm_error(-ENOMEM, "%s: out of memory", q->name);
	c->t = nt;
	victim = calloc(1, sizeof *victim);
	if (!victim || !(victim->buf = alloc_buf(q->cs))) {
		free(victim);
		return bm_error(-ENOMEM, "%s: out of memory", q->name);
	}
	c->t[c->n++] = victim;
	*out = victim;
	return 0;
}

/* The table at `off`, read from the file unless `fresh` (then zeroed
 * and dirty). */
static int
cache_get(struct qcow2 *q, struct cache *c, uint64_t off, bool fresh,
	  struct table **out)
{
	struct table *t;
	int err;

	do {
		t = cache_find(c, off);
		if (t && !fresh) {
			*out = t;
			return 0;
		}
		err = t ? 0 : cache_slot(q, c, &t);
	} while (err == -EAGAIN);
	if (err)
		return err;
	t->offset = 0;
	t->young = 0;
	/* A new gen either way, for copies of what the slot held before
	 * (see decide); fresh: dirty. */
	touch(t);
	if (fresh) {
		memset(t->buf, 0, q->cs);
	} else {
		/* Clean, also as a free slot if the read fails. */
		t->wgen = t->gen;
		err = bm_fmt_pread_zero(q->f, t->buf, q->cs, off);
		if (err)
			return err;
	}
	t->offset = off;
	t->used = ++c->tick;
	*out = t;
	return 0;
}

static void
cache_free(struct cache *c)
{
	for (unsigned i = 0; i < c->n; i++) {
		free(c->t[i]->buf);
		free(c->t[i]);
	}
	free(c->t);
	c->t = NULL;
	c->n = 0;
}

/* ---- refcounts ------------------------------------------------------ */

static int grow_reftable(struct qcow2 *q, uint64_t need_index,
			 uint64_t avoid);

/* The refcount block for `cluster`; *t NULL if there is none (all its
 * counts are 0) and !create.  With create, a missing block (or table
 * entry) is made, avoiding cluster `avoid` for the block itself. */
static int
rc_block(struct qcow2 *q, uint64_t cluster, bool create, uint64_t avoid,
	 struct table **t)
{
	uint64_t ti = cluster / q->rpb, off, b;
	int err;

	*t = NULL;
	if (ti >= q->rt_entries) {
		if (!create)
			return 0;
		err = grow_reftable(q, ti, avoid);
		if (err)
			return err;
	}
	off = rt_get(q, ti);
	if (off & (q->cs - 1))
		return bm_error(-EIO, "%s: corrupt qcow2 image: refcount "
				"block offset 0x%" PRIx64 " unaligned "
				"(refcount table index %" PRIu64 ")", q->name,
				off, ti);
	if (off)
		return cache_get(q, &q->rbc, off, false, t);
	if (!create)
		return 0;
	/* Every cluster of this range has refcount 0: the new block takes
	 * one of them and counts itself. */
	b = ti * q->rpb;
	if (b == avoid || b == 0)
		b++;
	if (b == avoid)
		b++;
	err = cache_get(q, &q->rbc, b << q->cb, true, t);
	if (err)
		return err;
	bm_qcow2_refcount_set((*t)->buf, q->h.refcount_order, b % q->rpb, 1);
	rt_set(q, ti, b << q->cb);
	return 0;
}

static int
rc_set(struct qcow2 *q, uint64_t cluster, uint64_t v)
{
	struct table *t;
	int err = rc_block(q, cluster, true, cluster, &t);

	if (err)
		return err;
	bm_qcow2_refcount_set(t->buf, q->h.refcount_order, cluster % q->rpb,
			      v);
	touch(t);
	return 0;
}

/*
 * Make the refcount table cover entry `need_index`: build a larger
 * table and the blocks for the clusters it occupies at the end of
 * everything the current table covers (and past cluster `avoid`), all
 * counting themselves; write and sync them, then switch the header.
 */
static int
grow_reftable_now(struct qcow2 *q, uint64_t need_index, uint64_t avoid)
{
	uint64_t cover = q->rt_entries * q->rpb;
	uint64_t start = BM_MAX(cover, avoid + 1), entries, tc, nb = 0;
	uint64_t first_block, old_off = q->h.refcount_table_offset;
	uint64_t old_clusters = q->h.refcount_table_clusters;
	uint8_t *nt = NULL, *blk = NULL, hb[12];
	int err;

	start = BM_MAX(start, bm_round_up(bm_fmt_file_size(q->f), q->cs) >>
				      q->cb);
	err = flush_refcounts(q);
	if (err)
		return err;
	entries = BM_MAX(q->rt_entries * 2, need_index + 1);
	for (;;) {
		uint64_t end, nb2;

		tc = (entries * 8 + q->cs - 1) >> q->cb;
		end = start + tc + nb;
		nb2 = (end - 1) / q->rpb - start / q->rpb + 1;
		if ((end - 1) / q->rpb >= entries) {
			entries = (end - 1) / q->rpb + 1;
			continue;
		}
		if (nb2 == nb)
			break;
		nb = nb2;
	}
	if (tc << q->cb > BM_QCOW2_MAX_REFTABLE_BYTES)
		return bm_error(-EFBIG, "%s: qcow2 refcount table would "
				"exceed its size limit", q->name);
	nt = alloc_buf(tc << q->cb);
	blk = alloc_buf(q->cs);
	if (!nt || !blk) {
		err = bm_error(-ENOMEM, "%s: out of memory", q->name);
		goto out;
	}
	memcpy(nt, q->rt, q->rt_entries * 8);
	first_block = start / q->rpb;
	for (uint64_t k = 0; k < nb; k++) {
		uint64_t range = first_block + k;

		memset(blk, 0, q->cs);
		for (uint64_t c = start; c < start + tc + nb; c++)
			if (c / q->rpb == range)
				bm_qcow2_refcount_set(blk, q->h.refcount_order,
						      c % q->rpb, 1);
		bm_put_be64(nt + range * 8, (start + tc + k) << q->cb);
		err = bm_fmt_pwrite(q->f, blk, q->cs, (start + tc + k) << q->cb);
		if (err)
			goto out;
	}
	err = bm_fmt_pwrite(q->f, nt, tc << q->cb, start << q->cb);
	if (!err)
		err = bm_fmt_sync(q->f);
	if (err)
		goto out;
	bm_put_be64(hb, start << q->cb);
	bm_put_be32(hb + 8, (uint32_t)tc);
	err = bm_fmt_pwrite(q->f, hb, sizeof hb, BM_QCOW2_OFF_REFTABLE);
	if (!err)
		err = bm_fmt_sync(q->f);
	if (err)
		goto out;
	free(q->rt);
	q->rt = nt;
	nt = NULL;
	q->rt_entries = (tc << q->cb) / 8;
	q->rt_lo = q->rt_hi = 0;
	q->rt_wgen = ++q->rt_gen;
	q->h.refcount_table_offset = start << q->cb;
	q->h.refcount_table_clusters = (uint32_t)tc;
	err = add_pending(q, old_off >> q->cb, old_clusters);
out:
	free(nt);
	free(blk);
	return err;
}

/* The worker's way to a larger refcount table: not while a flush
 * writes (the new table is written from memory, and points at blocks
 * the flush may not have made durable yet). */
static int
grow_reftable(struct qcow2 *q, uint64_t need_index, uint64_t avoid)
{
	wait_flushing(q);
	return grow_reftable_now(q, need_index, avoid);
}

/*
 * Write dirty refcount blocks, sync, then the table entries that point
 * at new blocks, sync (the eviction's and the table growth's way, under
 * the lock, never during a flush's writes).  A new block may have been
 * written by an eviction and not synced: a sync always comes before the
 * entries.
 */
static int
flush_refcounts(struct qcow2 *q)
{
	bool wrote = false;
	int err;

	for (unsigned i = 0; i < q->rbc.n; i++) {
		struct table *t = q->rbc.t[i];

		if (!dirty(t))
			continue;
		err = bm_fmt_pwrite(q->f, t->buf, q->cs, t->offset);
		if (err)
			return err;
		t->wgen = t->gen;
		wrote = true;
	}
	if (q->rt_lo != q->rt_hi) {
		err = bm_fmt_sync(q->f);
		if (err)
			return err;
		err = write_entries(q, q->rt, q->rt_entries * 8,
				    q->h.refcount_table_offset, q->rt_lo,
				    q->rt_hi);
		if (err)
			return err;
		q->rt_lo = q->rt_hi = 0;
		q->rt_wgen = q->rt_gen;
		wrote = true;
	}
	return wrote ? bm_fmt_sync(q->f) : 0;
}

/* The first cluster at or after the cursor with refcount 0. */
static int
find_free(struct qcow2 *q, uint64_t *out)
{
	uint64_t c = q->cursor;

	for (;;) {
		uint64_t ti = c / q->rpb;
		struct table *t;
		int err;

		if (ti >= q->rt_entries || rt_get(q, ti) == 0) {
			*out = c;
			return 0;
		}
		err = rc_block(q, c, false, 0, &t);
		if (err)
			return err;
		for (uint64_t i = c % q->rpb; i < q->rpb; i++)
			if (!bm_qcow2_refcount_get(t->buf, q->h.refcount_order,
						   i)) {
				*out = ti * q->rpb + i;
				return 0;
			}
		c = (ti + 1) * q->rpb;
	}
}

static int
alloc_cluster(struct qcow2 *q, uint64_t *host)
{
	uint64_t c, before = q->cursor;
	int err = find_free(q, &c);

	if (err)
		return err;
	if (c >= (UINT64_C(1) << (56 - q->cb)))
		return bm_error(-EFBIG, "%s: qcow2 image full", q->name);
	err = rc_set(q, c, 1);
	if (err)
		return err;
	/* Unless a flush freed clusters below c while rc_set waited. */
	if (q->cursor == before)
		q->cursor = c + 1;
	*host = c << q->cb;
	return 0;
}

/* Apply the first n pending frees (the later ones wait for a later
 * flush: their references may not be durably gone yet). */
static int
apply_frees(struct qcow2 *q, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		for (uint64_t c = q->pend[i].cluster;
		     c < q->pend[i].cluster + q->pend[i].count; c++) {
			struct table *t;
			uint64_t v;
			int err = rc_block(q, c, false, 0, &t);

			if (err)
				return err;
			v = t ? bm_qcow2_refcount_get(t->buf,
						      q->h.refcount_order,
						      c % q->rpb) : 0;
			if (!v) {
				bm_warn("%s: qcow2: freeing cluster 0x%" PRIx64
					" whose refcount is already 0",
					q->name, c << q->cb);
				continue;
			}
			bm_qcow2_refcount_set(t->buf, q->h.refcount_order,
					      c % q->rpb, v - 1);
			touch(t);
			if (v == 1 && c < q->cursor)
				q->cursor = c;
		}
	}
	memmove(q->pend, q->pend + n, (q->npend - n) * sizeof *q->pend);
	q->npend -= n;
	return 0;
}

/* Autoclear bits we do not maintain (bit 0 unless a tracker keeps the
 * bitmaps): set, they would tell the next reader the bitmaps hold our
 * writes.  Called under the lock before the first change. */
static uint64_t
stale_autoclear(const struct qcow2 *q)
{
	return q->h.autoclear & ~(q->keep_bitmaps ? BM_QCOW2_AUTOCLEAR_BITMAPS
						   : UINT64_C(0));
}

int
bm_qcow2_clear_autoclear(struct qcow2 *q)
{
	uint8_t b[8];
	int err;

	if (!stale_autoclear(q))
		return 0;
	bm_put_be64(b, q->h.autoclear & ~stale_autoclear(q));
	err = bm_fmt_pwrite(q->f, b, 8, BM_QCOW2_OFF_AUTOCLEAR);
	if (!err)
		err = bm_fmt_sync(q->f);
	if (!err)
		q->h.autoclear &= ~stale_autoclear(q);
	return err;
}

/* The refcount of `cluster`, 0 where there is no block. */
static int
rc_get(struct qcow2 *q, uint64_t cluster, uint64_t *v)
{
	struct table *t;
	int err = rc_block(q, cluster, false, 0, &t);

	*v = 0;
	if (!err && t)
		*v = bm_qcow2_refcount_get(t->buf, q->h.refcount_order,
					   cluster % q->rpb);
	return err;
}

int
bm_qcow2_alloc_run(struct qcow2 *q, uint64_t count, uint64_t *host)
{
	uint64_t start = bm_round_up(bm_fmt_file_size(q->f), q->cs) >> q->cb;
	uint64_t i = 0, v;
	int err = 0;

	/* Past the end of the file everything is free, but for refcount
	 * blocks made meanwhile (a new block takes a cluster of its range):
	 * a run that meets one starts again after it. */
	while (!err && i < count) {
		if (start + count >= (UINT64_C(1) << (56 - q->cb)))
			return bm_error(-EFBIG, "%s: qcow2 image full", q->name);
		err = rc_get(q, start + i, &v);
		if (!err && v) {
			for (uint64_t k = 0; !err && k < i; k++)
				err = rc_set(q, start + k, 0);
			start += i + 1;
			i = 0;
			continue;
		}
		if (!err)
			err = rc_set(q, start + i, 1);
		i++;
	}
	if (err)
		return err;
	*host = start << q->cb;
	return 0;
}

int
bm_qcow2_flush_refcounts(struct qcow2 *q)
{
	return flush_refcounts(q);
}

int
bm_qcow2_free_later(struct qcow2 *q, uint64_t cluster, uint64_t count)
{
	return add_pending(q, cluster, count);
}

void *
bm_qcow2_alloc_buf(uint64_t len)
{
	return alloc_buf(len);
}

/* Is host cluster `c` one of u[0..n) (sorted)?  Its index, or n. */
static size_t
use_find(const struct bm_qcow2_use *u, size_t n, uint64_t c)
{
	size_t lo = 0, hi = n;

	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;

		if (u[mid].cluster < c)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo < n && u[lo].cluster == c ? lo : n;
}

/* The clusters guest data of one L2 table (buf) takes, against u. */
static size_t
l2_hit(struct qcow2 *q, const uint8_t *buf, uint64_t l2_off,
       const struct bm_qcow2_use *u, size_t n)
{
	for (uint64_t i = 0; i < q->l2_entries; i++) {
		struct bm_qcow2_l2 e;
		uint64_t first, last;
		size_t k;

		/* A bad entry is refused where it is used; here it holds
		 * nothing we could free by mistake. */
		if (bm_qcow2_l2_decode(q->name, bm_get_be64(buf + i * 8), q->cb,
				       q->h.version, &e, l2_off, i) < 0) {
			bm_error_clear();
			continue;
		}
		if (e.kind != BM_QCOW2_NORMAL &&
		    e.kind != BM_QCOW2_ZERO_ALLOC &&
		    e.kind != BM_QCOW2_COMPRESSED)
			continue;
		first = e.host >> q->cb;
		last = e.kind == BM_QCOW2_COMPRESSED && e.csize ?
		       (e.host + e.csize - 1) >> q->cb : first;
		for (uint64_t c = first; c <= last; c++)
			if ((k = use_find(u, n, c)) < n)
				return k;
	}
	return n;
}

int
bm_qcow2_find_in_use(struct qcow2 *q, const struct bm_qcow2_use *u,
		     size_t n, size_t *hit, const char **what)
{
	uint8_t *buf = NULL;
	int err = 0;

	*hit = n;
	for (uint64_t i = 0; i < q->rt_entries && *hit == n; i++)
		if (rt_get(q, i))
			*hit = use_find(u, n, rt_get(q, i) >> q->cb);
	*what = "a refcount block";
	if (*hit < n)
		return 0;
	*what = "an L2 table";
	for (uint64_t i = 0; i < q->h.l1_size && *hit == n; i++) {
		uint64_t off = l1_get(q, i) & BM_QCOW2_OFFSET_MASK;

		if (off)
			*hit = use_find(u, n, off >> q->cb);
	}
	if (*hit < n)
		return 0;
	/* Guest data: a cached table may be newer than the file; one that
	 * is not cached is clean there.  Read aside, evicting nothing. */
	*what = "guest data";
	for (uint64_t i = 0; !err && i < q->h.l1_size && *hit == n; i++) {
		uint64_t off = l1_get(q, i) & BM_QCOW2_OFFSET_MASK;
		struct table *t;

		if (!off || off & (q->cs - 1))
			continue;
		if ((t = cache_find(&q->l2c, off))) {
			*hit = l2_hit(q, t->buf, off, u, n);
			continue;
		}
		if (!buf && !(buf = alloc_buf(q->cs))) {
			err = bm_error(-ENOMEM, "%s: out of memory", q->name);
			break;
		}
		err = bm_fmt_pread_zero(q->f, buf, q->cs, off);
		if (!err)
			*hit = l2_hit(q, buf, off, u, n);
	}
	free(buf);
	return err;
}

int
bm_qcow2_refcount(struct qcow2 *q, uint64_t cluster, uint64_t *v)
{
	return rc_get(q, cluster, v);
}

/* ---- L2 tables ------------------------------------------------------ */

/* The L2 table for L1 index `i` (*t NULL: none).  With `alloc` a
 * missing one is allocated; a shared one is refused. */
static int
l2_table(struct qcow2 *q, uint64_t i, bool nowait, bool alloc,
	 struct table **t)
{
	uint64_t e = l1_get(q, i), off = e & BM_QCOW2_OFFSET_MASK, host;
	int err;

	*t = NULL;
	if (off == 0) {
		if (!alloc)
			return 0;
		if (nowait)
			return -EAGAIN;
		err = alloc_cluster(q, &host);
		if (!err)
			err = cache_get(q, &q->l2c, host, true, t);
		if (err)
			return err;
		l1_set(q, i, host | BM_QCOW2_FLAG_COPIED);
		return 0;
	}
	if (off & (q->cs - 1))
		return bm_error(-EIO, "%s: corrupt qcow2 image: L2 table "
				"offset 0x%" PRIx64 " unaligned (L1 index %"
				PRIu64 ")", q->name, off, i);
	if (alloc && !(e & BM_QCOW2_FLAG_COPIED))
		return bm_error(-EIO, "%s: qcow2 L2 table 0x%" PRIx64 " (L1 "
				"index %" PRIu64 ") is shared (no COPIED "
				"flag); run 'qemu-img check -r all'",
				q->name, off, i);
	if (nowait) {
		*t = cache_find(&q->l2c, off);
		return *t ? 0 : -EAGAIN;
	}
	return cache_get(q, &q->l2c, off, false, t);
}

static int
l2_entry(struct qcow2 *q, struct table *t, uint64_t i, struct bm_qcow2_l2 *e)
{
	if (!t) {
		memset(e, 0, sizeof *e);
		return 0;
	}
	return bm_qcow2_l2_decode(q->name, bm_get_be64(t->buf + i * 8),
				  q->cb, q->h.version, e, t->offset, i);
}

static void
l2_set(struct table *t, uint64_t i, uint64_t v)
{
	bm_put_be64(t->buf + i * 8, v);
	touch(t);
}

/* Does [host, host+len) overlap metadata we know of?  Like QEMU's
 * "cached" overlap check: header, L1, refcount table, cached tables. */
static const char *
overlap(struct qcow2 *q, uint64_t host, uint64_t len)
{
	uint64_t end = host + len;

#define OVERLAPS(a, l) ((a) < end && host < (a) + (l))
	if (OVERLAPS(0, q->cs))
		return "header";
	if (OVERLAPS(q->h.l1_table_offset, (uint64_t)q->h.l1_size * 8))
		return "active L1 table";
	if (OVERLAPS(q->h.refcount_table_offset,
		     (uint64_t)q->h.refcount_table_clusters << q->cb))
		return "refcount table";
	for (unsigned i = 0; i < q->rbc.n; i++)
		if (q->rbc.t[i]->offset && OVERLAPS(q->rbc.t[i]->offset, q->cs))
			return "refcount block";
	for (unsigned i = 0; i < q->l2c.n; i++)
		if (q->l2c.t[i]->offset && OVERLAPS(q->l2c.t[i]->offset, q->cs))
			return "L2 table";
#undef OVERLAPS
	return NULL;
}

static int
refuse_overlap(struct qcow2 *q, uint64_t host, uint64_t len, bool nowait)
{
	const char *what = overlap(q, host, len);

	if (!what)
		return 0;
	if (nowait)
		return -EAGAIN;
	mark_corrupt(q);
	return bm_error(-EIO, "%s: qcow2: marking image as corrupt: "
			"preventing a write at 0x%" PRIx64 " that would "
			"overwrite metadata (%s)", q->name, host, what);
}

/* ---- reading clusters ----------------------------------------------- */

/* The cluster-sized buffers, allocated on first need.  0 or -ENOMEM. */
static int
cluster_bufs(struct qcow2 *q)
{
	if (q->cout)
		return 0;
	if (!q->zero)
		q->zero = alloc_buf(q->cs);
	if (!q->work)
		q->work = alloc_buf(q->cs);
	if (!q->cin)
		q->cin = alloc_buf(2 * q->cs + 512);
	if (q->zero && q->work && q->cin)
		q->cout = alloc_buf(q->cs);
	return q->cout ? 0 : bm_error(-ENOMEM, "%s: out of memory", q->name);
}

/* bm_qcow2_decompress of `in_len` bytes of q->cin into q->cout, with
 * the image's own zstd context.  0, -EIO or -ENOMEM. */
static int
decompress(struct qcow2 *q, size_t in_len)
{
	ZSTD_inBuffer ib = { q->cin, in_len, 0 };
	ZSTD_outBuffer ob = { q->cout, q->cs, 0 };

	if (q->h.compression_type != BM_QCOW2_ZSTD)
		return bm_qcow2_decompress(q->h.compression_type, q->cin,
					   in_len, q->cout, q->cs);
	if (!q->zstd && !(q->zstd = ZSTD_createDCtx()))
		return -ENOMEM;
	/* The last cluster may have failed half-way. */
	if (ZSTD_isError(ZSTD_DCtx_reset(q->zstd, ZSTD_reset_session_only)))
		return -EIO;
	while (ob.pos < ob.size && ib.pos < ib.size) {
		size_t r = ZSTD_decompressStream(q->zstd, &ob, &ib);

		if (ZSTD_isError(r))
			return -EIO;
		if (r == 0)
			break;
	}
	return ob.pos == ob.size ? 0 : -EIO;
}

/* Decompress the cluster of entry `raw` into q->cout. */
static int
load_compressed(struct qcow2 *q, uint64_t raw, const struct bm_qcow2_l2 *e,
		uint64_t guest)
{
	int err;

	if (q->cout_entry == raw && raw)
		return 0;
	q->cout_entry = 0;
	err = cluster_bufs(q);
	if (!err)
		err = bm_fmt_pread_zero(q->f, q->cin, e->csize, e->host);
	if (err)
		return err;
	err = decompress(q, e->csize);
	if (err)
		return bm_error(err, "%s: qcow2 compressed cluster at "
				"0x%" PRIx64 " (guest offset 0x%" PRIx64 ") "
				"does not decompress", q->name, e->host, guest);
	q->cout_entry = raw;
	return 0;
}

/* What guest cluster `gc` (entry *e) reads as, into q->work; *zero set
 * instead of filling when it reads as zeroes. */
static int
cluster_content(struct qcow2 *q, uint64_t gc, uint64_t raw,
		const struct bm_qcow2_l2 *e, bool *zero)
{
	uint64_t guest = gc << q->cb, len;
	int err;

	*zero = false;
	switch (e->kind) {
	case BM_QCOW2_UNALLOCATED:
		if (!bm_fmt_has_backing(q->f) || guest >= q->h.size)
			break;
		len = BM_MIN(q->cs, q->h.size - guest);
		memset(q->work + len, 0, q->cs - len);
		return bm_fmt_backing_read(q->f, q->work, len, guest);
	case BM_QCOW2_NORMAL:
		return bm_fmt_pread_zero(q->f, q->work, q->cs, e->host);
	case BM_QCOW2_COMPRESSED:
		err = load_compressed(q, raw, e, guest);
		if (!err)
			memcpy(q->work, q->cout, q->cs);
		return err;
	default:
		break;
	}
	*zero = true;
	return 0;
}

/* ---- map ------------------------------------------------------------ */


static int
free_entry(struct qcow2 *q, const struct bm_qcow2_l2 *e)
{
	uint64_t first, count;

	switch (e->kind) {
	case BM_QCOW2_NORMAL:
	case BM_QCOW2_ZERO_ALLOC:
		return add_pending(q, e->host >> q->cb, 1);
	case BM_QCOW2_COMPRESSED:
		bm_qcow2_compressed_span(e, q->cb, &first, &count);
		return add_pending(q, first, count);
	default:
		return 0;
	}
}

/*
 * Give guest cluster `gc` (entry `i` of table t, currently *e) a host
 * cluster of its own and write all of it: what the cluster read as,
 * with [in, in+n) replaced by `data` (zeroes if NULL).
 *
 * The engine writes the guest's part itself, straight from the caller's
 * buffer, when nothing else of the cluster needs writing: a whole
 * cluster of guest data, or part of a cluster that reads as zeroes and
 * is new at the end of the file (the file is extended first, so the
 * rest already reads as zeroes).  Then, with `handoff` set, *handoff
 * gets the host offset of the guest's part and nothing is written here.
 * Either way the table becomes "young": before it is written,
 * bm_fmt_wait_data and a sync put the data in the file first.
 */
static int
cow_cluster(struct qcow2 *q, struct table *t, uint64_t i, uint64_t gc,
	    uint64_t raw, const struct bm_qcow2_l2 *e, uint64_t in,
	    uint64_t n, const uint8_t *data, uint64_t *handoff)
{
	bool reuse = e->kind == BM_QCOW2_ZERO_ALLOC && e->copied;
	bool zero = true, fresh = false;
	const uint8_t *src;
	uint64_t host;
	int err = cluster_bufs(q);

	if (!err && n < q->cs)
		err = cluster_content(q, gc, raw, e, &zero);
	if (err)
		return err;
	if (reuse) {
		host = e->host;
	} else {
		err = alloc_cluster(q, &host);
		if (err)
			return err;
		fresh = host >= bm_fmt_file_size(q->f);
		if (host + q->cs > bm_fmt_file_size(q->f))
			err = bm_fmt_truncate(q->f, host + q->cs);
	}
	if (!err)
		err = refuse_overlap(q, host, q->cs, false);
	if (err)
		return err;
	if (handoff && data && (n == q->cs || (fresh && zero))) {
		*handoff = host + in;
	} else {
		if (n == q->cs) {
			src = data ? data : q->zero;
		} else {
			if (zero)
				memset(q->work, 0, q->cs);
			if (data)
				memcpy(q->work + in, data, n);
			else
				memset(q->work + in, 0, n);
			src = q->work;
		}
		err = bm_fmt_pwrite(q->f, src, q->cs, host);
		if (err)
			return err;
	}
	l2_set(t, i, host | BM_QCOW2_FLAG_COPIED);
	t->young++;
	if (q->cout_entry == raw)
		q->cout_entry = 0;
	return reuse ? 0 : free_entry(q, e);
}

static int
map_read(struct qcow2 *q, struct bm_map_req *r, uint64_t pos, uint64_t n,
	 struct table *t, uint64_t i, uint64_t raw,
	 const struct bm_qcow2_l2 *e)
{
	uint64_t in = pos & (q->cs - 1);
	enum bm_seg_kind kind;
	int err;

	switch (e->kind) {
	case BM_QCOW2_UNALLOCATED:
		kind = bm_fmt_has_backing(q->f) ? BM_SEG_BACKING : BM_SEG_HOLE;
		break;
	case BM_QCOW2_ZERO_PLAIN:
	case BM_QCOW2_ZERO_ALLOC:
		kind = BM_SEG_ZERO;
		break;
	case BM_QCOW2_NORMAL:
		bm_map_add(r, BM_SEG_DATA, n, e->host + in);
		return 0;
	default:
		if (r->op == BM_MAP_STATUS) {
			bm_map_add(r, BM_SEG_DATA, n, 0);
			return 0;
		}
		if (r->nowait)
			return -EAGAIN;
		err = load_compressed(q, raw, e, pos);
		if (err)
			return err;
		memcpy((uint8_t *)r->buf + (pos - r->offset), q->cout + in, n);
		kind = BM_SEG_DONE;
		break;
	}
	bm_map_add(r, kind, n, 0);
	return 0;
}

static int
map_write(struct qcow2 *q, struct bm_map_req *r, uint64_t pos, uint64_t n,
	  struct table *t, uint64_t i, uint64_t raw,
	  const struct bm_qcow2_l2 *e)
{
	uint64_t in = pos & (q->cs - 1), host = 0;
	const uint8_t *data = NULL;
	int err;

	if (e->kind == BM_QCOW2_NORMAL && e->copied) {
		err = refuse_overlap(q, e->host + in, n, r->nowait);
		if (!err)
			bm_map_add(r, BM_SEG_DATA, n, e->host + in);
		return err;
	}
	if (r->nowait)
		return -EAGAIN;
	if (r->op == BM_MAP_ZERO && (r->flags & BM_IO_FAST_ZERO))
		return -ENOTSUP;
	if (r->op == BM_MAP_WRITE)
		data = (const uint8_t *)r->buf + (pos - r->offset);
	err = cow_cluster(q, t, i, pos >> q->cb, raw, e, in, n, data,
			  r->op == BM_MAP_WRITE ? &host : NULL);
	if (!err)
		bm_map_add(r, host ? BM_SEG_DATA : BM_SEG_DONE, n, host);
	return err;
}

/* Zero or discard a whole guest cluster through its L2 entry. */
static int
map_zero_full(struct qcow2 *q, struct bm_map_req *r, uint64_t n,
	      struct table *t, uint64_t i, const struct bm_qcow2_l2 *e)
{
	bool trim = r->op == BM_MAP_DISCARD || (r->flags & BM_IO_MAY_TRIM);
	bool keep = !trim && e->kind == BM_QCOW2_NORMAL && e->copied;
	uint64_t want;

	if (e->kind == BM_QCOW2_ZERO_PLAIN ||
	    (e->kind == BM_QCOW2_ZERO_ALLOC && !trim) ||
	    (r->op == BM_MAP_DISCARD && e->kind == BM_QCOW2_UNALLOCATED &&
	     !bm_fmt_has_backing(q->f))) {
		bm_map_add(r, BM_SEG_DONE, n, 0);
		return 0;
	}
	if (r->nowait)
		return -EAGAIN;
	want = keep ? (e->host | BM_QCOW2_FLAG_COPIED | BM_QCOW2_FLAG_ZERO)
		    : BM_QCOW2_FLAG_ZERO;
	l2_set(t, i, want);
	if (!keep) {
		int err = free_entry(q, e);

		if (err)
			return err;
	}
	q->cout_entry = 0;
	bm_map_add(r, BM_SEG_DONE, n, 0);
	return 0;
}

static int
map_zero(struct qcow2 *q, struct bm_map_req *r, uint64_t pos, uint64_t n,
	 struct table *t, uint64_t i, uint64_t raw,
	 const struct bm_qcow2_l2 *e)
{
	uint64_t in = pos & (q->cs - 1);
	bool full = in == 0 && (n == q->cs || pos + n >= q->h.size);

	if (full)
		return map_zero_full(q, r, n, t, i, e);
	if (r->op == BM_MAP_DISCARD || e->kind == BM_QCOW2_ZERO_PLAIN ||
	    e->kind == BM_QCOW2_ZERO_ALLOC ||
	    (e->kind == BM_QCOW2_UNALLOCATED && !bm_fmt_has_backing(q->f))) {
		bm_map_add(r, BM_SEG_DONE, n, 0);
		return 0;
	}
	return map_write(q, r, pos, n, t, i, raw, e);
}

static int
map_one(struct qcow2 *q, struct bm_map_req *r, uint64_t pos, uint64_t n)
{
	uint64_t gc = pos >> q->cb, l1i = gc / q->l2_entries;
	uint64_t i = gc % q->l2_entries, raw;
	bool change = r->op != BM_MAP_READ && r->op != BM_MAP_STATUS;
	struct bm_qcow2_l2 e;
	struct table *t;
	int err;

	err = l2_table(q, l1i, r->nowait, false, &t);
	if (err)
		return err;
	if (change && !t) {
		bool partial = (pos & (q->cs - 1)) ||
			       (n < q->cs && pos + n < q->h.size);

		/* Zeroing or discarding where nothing is allocated and
		 * nothing shows through needs no table. */
		if (r->op != BM_MAP_WRITE && (!bm_fmt_has_backing(q->f) ||
					      (r->op == BM_MAP_DISCARD &&
					       partial))) {
			bm_map_add(r, BM_SEG_DONE, n, 0);
			return 0;
		}
	}
	if (change && (!t || !(l1_get(q, l1i) & BM_QCOW2_FLAG_COPIED))) {
		err = l2_table(q, l1i, r->nowait, true, &t);
		if (err)
			return err;
	}
	raw = t ? bm_get_be64(t->buf + i * 8) : 0;
	err = l2_entry(q, t, i, &e);
	if (err)
		return err;
	switch (r->op) {
	case BM_MAP_READ:
	case BM_MAP_STATUS:
		return map_read(q, r, pos, n, t, i, raw, &e);
	case BM_MAP_WRITE:
		return map_write(q, r, pos, n, t, i, raw, &e);
	default:
		return map_zero(q, r, pos, n, t, i, raw, &e);
	}
}

static int
qcow2_map(void *drv, struct bm_map_req *r)
{
	struct qcow2 *q = drv;
	uint64_t pos = r->offset, end = r->offset + r->length;
	bool change = r->op != BM_MAP_READ && r->op != BM_MAP_STATUS;
	int err = 0;

	if (r->nowait) {
		if (pthread_mutex_trylock(&q->lock))
			return -EAGAIN;
	} else {
		pthread_mutex_lock(&q->lock);
	}
	r->nseg = 0;
	if (change && !q->writable)
		err = bm_error(-EROFS, "%s: qcow2 image is read-only", q->name);
	else if (change && q->corrupt)
		err = bm_error(-EIO, "%s: qcow2 image is marked corrupt; "
			       "refusing to write", q->name);
	else if (change && stale_autoclear(q))
		err = r->nowait ? -EAGAIN : bm_qcow2_clear_autoclear(q);
	while (!err && pos < end && r->nseg < BM_MAP_MAX_SEGS) {
		uint64_t n = BM_MIN(q->cs - (pos & (q->cs - 1)), end - pos);

		err = map_one(q, r, pos, n);
		if (!err)
			pos += n;
	}
	if (err == -EAGAIN && r->nowait && r->nseg)
		err = 0;
	pthread_mutex_unlock(&q->lock);
	return err;
}

/* ---- flush ---------------------------------------------------------- */

/*
 * A flush copies, under the lock and at one instant, everything dirty:
 * refcount blocks, the dirty range of the refcount table, L2 tables, the
 * dirty range of the L1 table, and how many frees are pending.  The
 * copies are consistent with each other (every reference in them has its
 * refcount in them or on disk already), so it can write them in the
 * crash-safe order, with a sync after each step, without the lock, while
 * map goes on changing memory.  What changed after the copy stays dirty
 * (gen != wgen) for the next flush.
 */
struct copy {
	struct table *t;
	uint64_t offset, gen;
	uint8_t *buf;
	bool write;           /* nobody wrote gen or later meanwhile */
};

/* A copy of the 512-byte sectors of an entry table's dirty range. */
struct range_copy {
	uint8_t *buf;
	uint64_t off;         /* where buf goes in the file */
	uint64_t len;         /* 0: nothing dirty */
	uint64_t gen;
	bool write;
};

struct snapshot {
	struct copy *rc, *l2;
	unsigned nrc, nl2;
	struct range_copy rt, l1;
	size_t npend;         /* frees whose references this flush removes */
	bool young;           /* an L2 copy points at data mapped lately */
};

static void
snap_free(struct snapshot *s)
{
	for (unsigned i = 0; i < s->nrc; i++)
		free(s->rc[i].buf);
	for (unsigned i = 0; i < s->nl2; i++)
		free(s->l2[i].buf);
	free(s->rc);
	free(s->l2);
	free(s->rt.buf);
	free(s->l1.buf);
	memset(s, 0, sizeof *s);
}

static int
copy_tables(struct qcow2 *q, struct cache *c, struct copy **out,
	    unsigned *n, bool *young)
{
	*out = calloc(c->n ? c->n : 1, sizeof **out);
	if (!*out)
		return -ENOMEM;
	for (unsigned i = 0; i < c->n; i++) {
		struct table *t = c->t[i];
		struct copy *k = &(*out)[*n];

		if (!dirty(t))
			continue;
		k->buf = malloc(q->cs);
		if (!k->buf)
			return -ENOMEM;
		memcpy(k->buf, t->buf, q->cs);
		k->t = t;
		k->offset = t->offset;
		k->gen = t->gen;
		if (young)
			*young |= t->young != 0;
		(*n)++;
	}
	return 0;
}

static int
copy_range(struct qcow2 *q, const uint8_t *buf, uint64_t buf_len,
	   uint64_t off, uint64_t lo, uint64_t hi, uint64_t gen,
	   struct range_copy *r)
{
	uint64_t a = bm_round_down(lo * 8, 512);
	uint64_t b = BM_MIN(bm_round_up(hi * 8, 512), buf_len);

	(void)q;
	if (lo == hi)
		return 0;
	r->buf = malloc(b - a);
	if (!r->buf)
		return -ENOMEM;
	memcpy(r->buf, buf + a, b - a);
	r->off = off + a;
	r->len = b - a;
	r->gen = gen;
	return 0;
}

/* Under the lock: copy what is dirty (with `l2`, the L2 and L1 tables
 * and the pending frees too, else only refcounts). */
static int
snap_take(struct qcow2 *q, struct snapshot *s, bool l2)
{
	int err;

	memset(s, 0, sizeof *s);
	err = copy_tables(q, &q->rbc, &s->rc, &s->nrc, NULL);
	if (!err)
		err = copy_range(q, q->rt, q->rt_entries * 8,
				 q->h.refcount_table_offset, q->rt_lo,
				 q->rt_hi, q->rt_gen, &s->rt);
	if (!err && l2)
		err = copy_tables(q, &q->l2c, &s->l2, &s->nl2, &s->young);
	if (!err && l2)
		err = copy_range(q, q->l1, q->l1_buf_len, q->h.l1_table_offset,
				 q->l1_lo, q->l1_hi, q->l1_gen, &s->l1);
	if (!err && l2)
		s->npend = q->npend;
	if (err) {
		snap_free(s);
		return bm_error(err, "%s: out of memory", q->name);
	}
	return 0;
}

static int
write_copies(struct qcow2 *q, struct copy *k, unsigned n)
{
	for (unsigned i = 0; i < n; i++) {
		int err = k[i].write ? bm_fmt_pwrite(q->f, k[i].buf, q->cs,
						     k[i].offset) : 0;

		if (err)
			return err;
	}
	return 0;
}

static int
write_range(struct qcow2 *q, const struct range_copy *r)
{
	return r->write ? bm_fmt_pwrite(q->f, r->buf, r->len, r->off) : 0;
}

/* A copy is written unless somebody (an eviction, before the flush
 * started writing) wrote the same or newer content: never older content
 * over newer. */
static void
decide(struct copy *k, unsigned n)
{
	for (unsigned i = 0; i < n; i++)
		k[i].write = k[i].t->offset == k[i].offset &&
			     k[i].t->wgen < k[i].gen;
}

static void
mark_written(struct copy *k, unsigned n, bool l2)
{
	for (unsigned i = 0; i < n; i++) {
		struct table *t = k[i].t;

		if (t->offset != k[i].offset)
			continue;
		if (t->wgen < k[i].gen)
			t->wgen = k[i].gen;
		/* The young entries of the copy are durable; newer ones
		 * (the table changed since) keep the count. */
		if (l2 && t->gen == k[i].gen)
			t->young = 0;
	}
}

/*
 * Write a snapshot in the crash-safe order, each step followed by a sync
 * (a step with nothing in it is skipped): refcount blocks; the refcount
 * table's entries; L2 tables; L1 entries.  A step some of whose copies
 * an eviction wrote instead still syncs: the eviction may not have.
 * The lock is taken only to decide and to mark; `flushing` keeps every
 * other writer of metadata out meanwhile.
 */
static int
snap_write(struct qcow2 *q, struct snapshot *s)
{
	int err = 0;

	pthread_mutex_lock(&q->lock);
	q->flushing = true;
	decide(s->rc, s->nrc);
	decide(s->l2, s->nl2);
	s->rt.write = s->rt.len && q->rt_wgen < s->rt.gen;
	s->l1.write = s->l1.len != 0;
	pthread_mutex_unlock(&q->lock);

	err = write_copies(q, s->rc, s->nrc);
	/* Also when only the entries changed: a new block may have been
	 * written by an eviction, not synced. */
	if (!err && (s->nrc || s->rt.len))
		err = bm_fmt_sync(q->f);
	if (!err && s->rt.len) {
		err = write_range(q, &s->rt);
		if (!err)
			err = bm_fmt_sync(q->f);
	}
	if (!err)
		err = write_copies(q, s->l2, s->nl2);
	if (!err && s->nl2)
		err = bm_fmt_sync(q->f);
	if (!err && s->l1.len) {
		err = write_range(q, &s->l1);
		if (!err)
			err = bm_fmt_sync(q->f);
	}

	pthread_mutex_lock(&q->lock);
	if (!err) {
		mark_written(s->rc, s->nrc, false);
		mark_written(s->l2, s->nl2, true);
		if (s->rt.len && q->rt_wgen < s->rt.gen)
			q->rt_wgen = s->rt.gen;
		if (s->rt.len && q->rt_gen == s->rt.gen)
			q->rt_lo = q->rt_hi = 0;
		if (s->l1.len && q->l1_gen == s->l1.gen)
			q->l1_lo = q->l1_hi = 0;
	}
	q->flushing = false;
	pthread_cond_broadcast(&q->flushed);
	pthread_mutex_unlock(&q->lock);
	return err;
}

/*
 * 1. Under the lock: a data mark and the snapshot.  2. Without it: wait
 * for the data of every chunk mapped before (their young L2 entries are
 * in the copies), and sync it.  3. snap_write.  4. Under the lock again:
 * apply the frees counted in the snapshot (their references are durably
 * gone now) and copy the refcount blocks that changed; write and sync
 * them.  Nothing is synced with the lock held.
 */
static int
qcow2_flush(void *drv)
{
	struct qcow2 *q = drv;
	struct snapshot s;
	unsigned mark;
	int err;

	if (!q->writable)
		return 0;
	pthread_mutex_lock(&q->flush_lock);
	pthread_mutex_lock(&q->lock);
	mark = bm_fmt_data_mark(q->f);
	err = snap_take(q, &s, true);
	pthread_mutex_unlock(&q->lock);
	/* Always: a mark must be waited for before the next one, and a
	 * free must not be reused under a write still in flight. */
	bm_fmt_wait_mark(q->f, mark);
	if (!err && s.young)
		err = bm_fmt_sync(q->f);
	if (!err)
		err = snap_write(q, &s);
	if (!err && s.npend) {
		size_t n = s.npend;

		snap_free(&s);
		pthread_mutex_lock(&q->lock);
		err = apply_frees(q, n);
		if (!err)
			err = snap_take(q, &s, false);
		pthread_mutex_unlock(&q->lock);
		if (!err)
			err = snap_write(q, &s);
	}
	snap_free(&s);
	pthread_mutex_unlock(&q->flush_lock);
	return err;
}

/* ---- allocated, close ----------------------------------------------- */

static uint64_t
qcow2_allocated(void *drv)
{
	struct qcow2 *q = drv;
	uint64_t total = 0, n = q->h.l1_size;
	uint8_t *buf = alloc_buf(q->cs);

	if (!buf)
		return 0;
	/* Entries past the guest range map nothing (map never looks at
	 * them), however long the table says it is. */
	if (bm_qcow2_l1_entries(q->h.size, q->cb, &n))
		n = BM_MIN(n, (uint64_t)q->h.l1_size);
	pthread_mutex_lock(&q->lock);
	for (uint64_t i = 0; i < n; i++) {
		uint64_t off = l1_get(q, i) & BM_QCOW2_OFFSET_MASK;
		struct table *t;
		const uint8_t *p = buf;

		if (!off || off & (q->cs - 1))
			continue;
		t = cache_find(&q->l2c, off);
		if (t)
			p = t->buf;
		else if (bm_fmt_pread_zero(q->f, buf, q->cs, off))
			break;
		for (uint64_t j = 0; j < q->l2_entries; j++) {
			uint64_t e = bm_get_be64(p + j * 8);

			if ((e & BM_QCOW2_FLAG_COMPRESSED) ||
			    ((e & BM_QCOW2_OFFSET_MASK) &&
			     !(e & BM_QCOW2_FLAG_ZERO)))
				total += q->cs;
		}
	}
	pthread_mutex_unlock(&q->lock);
	free(buf);
	return BM_MIN(total, bm_round_up(q->h.size, q->cs));
}

static void
qcow2_free(struct qcow2 *q)
{
	if (!q)
		return;
	cache_free(&q->l2c);
	cache_free(&q->rbc);
	bm_qcow2_header_free(&q->h);
	free(q->l1);
	free(q->rt);
	free(q->pend);
	free(q->zero);
	free(q->work);
	free(q->cin);
	free(q->cout);
	ZSTD_freeDCtx(q->zstd);
	pthread_mutex_destroy(&q->lock);
	pthread_mutex_destroy(&q->flush_lock);
	pthread_cond_destroy(&q->flushed);
	free(q);
}

static void
qcow2_close(void *drv)
{
	qcow2_free(drv);
}

/* ---- open ----------------------------------------------------------- */

static unsigned
cache_bound(uint64_t budget, uint64_t cs, unsigned lo, unsigned hi)
{
	uint64_t n = budget / cs;

	return (unsigned)BM_MAX((uint64_t)lo, BM_MIN(n, (uint64_t)hi));
}

static int
check_writable(struct qcow2 *q)
{
	const struct bm_qcow2_header *h = &q->h;

	if (h->version < 3)
		return bm_error(-ENOTSUP, "%s: qcow2 version 2 (compat=0.10) "
				"images can only be opened read-only; upgrade "
				"with 'qemu-img amend -o compat=1.1'", q->name);
	if (h->incompatible & BM_QCOW2_INCOMPAT_CORRUPT)
		return bm_error(-EIO, "%s: qcow2 image is marked corrupt; it "
				"can only be opened read-only (repair with "
				"'qemu-img check -r all')", q->name);
	if (h->incompatible & BM_QCOW2_INCOMPAT_DIRTY)
		return bm_error(-EIO, "%s: qcow2 image was not closed cleanly "
				"(dirty bit, lazy refcounts); repair it with "
				"'qemu-img check -r all' before writing",
				q->name);
	if (h->nb_snapshots)
		return bm_error(-ENOTSUP, "%s: qcow2 image has %" PRIu32
				" internal snapshot(s); writing to images with "
				"internal snapshots is not supported", q->name,
				h->nb_snapshots);
	return 0;
}

static int
backing_format(struct qcow2 *q, enum blockmirror_format *out)
{
	const char *fmt = q->h.backing_format;

	*out = BLOCKMIRROR_FORMAT_AUTO;
	if (!fmt[0])
		return 0;
	if (!strcmp(fmt, "raw") || !strcmp(fmt, "file"))
		*out = BLOCKMIRROR_FORMAT_RAW;
	else if (!strcmp(fmt, "qcow2"))
		*out = BLOCKMIRROR_FORMAT_QCOW2;
	else if (!strcmp(fmt, "vhdx"))
		*out = BLOCKMIRROR_FORMAT_VHDX;
	else
		return bm_error(-ENOTSUP, "%s: backing file format '%s' is not "
				"supported", q->name, fmt);
	return 0;
}

static int
load_tables(struct qcow2 *q)
{
	const struct bm_qcow2_header *h = &q->h;
	uint64_t l1_end = h->l1_table_offset + (uint64_t)h->l1_size * 8;
	uint64_t rt_len = (uint64_t)h->refcount_table_clusters << q->cb;

	if (h->l1_size && h->l1_table_offset < h->refcount_table_offset + rt_len &&
	    h->refcount_table_offset < l1_end)
		return bm_error(-EINVAL, "%s: corrupt qcow2 image: the L1 "
				"table overlaps the refcount table", q->name);
	q->l1_buf_len = bm_round_up((uint64_t)h->l1_size * 8, 512);
	q->l1 = alloc_buf(q->l1_buf_len);
	q->rt = alloc_buf(rt_len);
	if (!q->l1 || !q->rt)
		return bm_error(-ENOMEM, "%s: out of memory", q->name);
	q->rt_entries = rt_len / 8;
	if (h->l1_size) {
		int err = bm_fmt_pread_zero(q->f, q->l1, q->l1_buf_len,
					    h->l1_table_offset);

		if (err)
			return err;
		/* Whatever follows the table in its last sector is not ours. */
		memset(q->l1 + (uint64_t)h->l1_size * 8, 0,
		       q->l1_buf_len - (uint64_t)h->l1_size * 8);
	}
	return bm_fmt_pread_zero(q->f, q->rt, rt_len,
				 h->refcount_table_offset);
}

static int
setup(struct qcow2 *q, unsigned flags)
{
	uint8_t first[512];
	uint8_t *c0;
	uint32_t cb;
	int err;

	err = bm_fmt_pread_zero(q->f, first, sizeof first, 0);
	if (err)
		return err;
	cb = bm_get_be32(first + 20);
	if (bm_get_be32(first) != BM_QCOW2_MAGIC ||
	    cb < BM_QCOW2_MIN_CLUSTER_BITS || cb > BM_QCOW2_MAX_CLUSTER_BITS) {
		err = bm_qcow2_header_parse(q->name, first, sizeof first,
					    &q->h);
		return err ? err : bm_error(-EINVAL, "%s: not a qcow2 image",
					    q->name);
	}
	c0 = alloc_buf(UINT64_C(1) << cb);
	if (!c0)
		return bm_error(-ENOMEM, "%s: out of memory", q->name);
	err = bm_fmt_pread_zero(q->f, c0, UINT64_C(1) << cb, 0);
	if (!err)
		err = bm_qcow2_header_parse(q->name, c0, UINT64_C(1) << cb,
					    &q->h);
	free(c0);
	if (err)
		return err;
	q->cb = cb;
	q->cs = UINT64_C(1) << cb;
	q->l2_entries = q->cs / 8;
	q->rpb = (q->cs * 8) >> q->h.refcount_order;
	q->writable = flags & BM_IMAGE_WRITE;
	if (q->writable && (err = check_writable(q)))
		return err;
	q->l2c.bound = cache_bound(4 * BM_MiB, q->cs, 4, 256);
	q->rbc.bound = cache_bound(2 * BM_MiB, q->cs, 4, 64);
	return load_tables(q);
}

static int
qcow2_open(struct bm_fmt *f, unsigned flags, struct bm_fmt_info *info,
	   void **drv)
{
	struct qcow2 *q = calloc(1, sizeof *q);
	int err;

	if (!q)
		return bm_error(-ENOMEM, "%s: out of memory", bm_fmt_name(f));
	q->f = f;
	q->name = bm_fmt_name(f);
	pthread_mutex_init(&q->lock, NULL);
	pthread_mutex_init(&q->flush_lock, NULL);
	pthread_cond_init(&q->flushed, NULL);
	err = setup(q, flags);
	if (!err)
		err = bm_qcow2_bitmaps_check(q);
	if (!err)
		err = backing_format(q, &info->backing_format);
	if (!err && q->h.backing_name &&
	    !(info->backing_name = strdup(q->h.backing_name)))
		err = bm_error(-ENOMEM, "%s: out of memory", q->name);
	if (err) {
		qcow2_free(q);
		return err;
	}
	info->virtual_size = q->h.size;
	info->cluster_size = (uint32_t)q->cs;
	info->align = 1;
	info->readonly = !q->writable;
	info->allocated = 0;
	info->has_identity = false;
	*drv = q;
	return 0;
}

/*
 * Change the backing file name (bm_qcow2_backing_plan): the new name
 * goes into free space in cluster 0 first, then one sector write flips
 * the header to it.  The header area is read from the file, under the
 * lock, so the sector written back carries every field the driver has
 * changed before (they are all written through at once).  The header
 * fields that say where the name is follow the disk.
 */
static int
qcow2_set_backing(void *drv, const char *name, enum blockmirror_format format)
{
	struct qcow2 *q = drv;
	const char *fmt = format == BLOCKMIRROR_FORMAT_AUTO ? NULL :
			  blockmirror_format_name(format);
	uint8_t sector[BM_QCOW2_SECTOR];
	uint64_t off;
	char *copy = strdup(name);
	uint8_t *buf = alloc_buf(q->cs);
	int err;

	if (!copy || !buf) {
		free(copy);
		free(buf);
		return bm_error(-ENOMEM, "%s: out of memory", q->name);
	}
	pthread_mutex_lock(&q->flush_lock);
	pthread_mutex_lock(&q->lock);
	err = q->writable ? 0 : bm_error(-EROFS, "%s: read-only", q->name);
	if (!err)
		err = bm_fmt_pread_zero(q->f, buf, q->cs, 0);
	if (!err)
		err = bm_qcow2_backing_plan(q->name, buf, q->cs,
					    q->h.header_length, name, fmt,
					    &off, sector);
	if (!err)
		err = bm_fmt_pwrite(q->f, name, strlen(name), off);
	if (!err)
		err = bm_fmt_sync(q->f);
	if (!err)
		err = bm_fmt_pwrite(q->f, sector, sizeof sector, 0);
	if (!err)
		err = bm_fmt_sync(q->f);
	if (!err) {
		free(q->h.backing_name);
		q->h.backing_name = copy;
		copy = NULL;
		/* Where the name now is: a new bitmaps extension may have to
		 * move it (qcow2-bitmap-io.c). */
		q->h.backing_offset = off;
		q->h.backing_size = (uint32_t)strlen(name);
		if (fmt)
			snprintf(q->h.backing_format,
				 sizeof q->h.backing_format, "%s", fmt);
	}
	pthread_mutex_unlock(&q->lock);
	pthread_mutex_unlock(&q->flush_lock);
	free(copy);
	free(buf);
	return err;
}

const struct bm_fmt_driver bm_qcow2_driver = {
	.name = "qcow2",
	.format = BLOCKMIRROR_FORMAT_QCOW2,
	.open = qcow2_open,
	.create = bm_qcow2_create,
	.map = qcow2_map,
	.flush = qcow2_flush,
	.flush_apart = true,
	.allocated = qcow2_allocated,
	.close = qcow2_close,
	.set_backing = qcow2_set_backing,
};
