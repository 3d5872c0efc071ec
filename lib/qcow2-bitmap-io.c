/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The qcow2 driver's persistent-bitmap entry points (qcow2.h): reading
 * the bitmaps of an image and replacing them, for a change tracker that
 * keeps its checkpoints in the image (cbt-image.c, docs/cbt.md).
 *
 * The invariant: the header's bitmaps extension only ever names a
 * directory, tables and data that are durable, in clusters whose
 * refcounts are durable.  A commit therefore allocates one run of new
 * clusters past the end of the file, makes their refcounts durable,
 * writes every data cluster, table and the directory into it and syncs,
 * and only then switches the extension with a write that stays inside
 * one 512-byte sector (the same assumption the backing file change
 * makes), and syncs.  The old directory, tables and data are freed like
 * any other cluster, at the end of the next flush.  A crash at any step
 * leaves the old list or the new one; the clusters of the list that
 * lost are leaks (qemu-img check: exit 3), never a reference to a
 * cluster with refcount 0.
 *
 * The extension switch: with an extension already there, its 24 data
 * bytes are rewritten in place.  Without one, the new extension and a
 * new end marker go after the current end marker (invisible behind it),
 * then one 8-byte write turns the old end marker into the extension's
 * type and length; if the backing file name sits where they go, it is
 * first moved to the end of cluster 0 (name written, synced, then its
 * offset and size in sector 0).  Removing the last bitmap turns the
 * extension back into an end marker, which needs it to be the last
 * extension (ours always is).  Autoclear bit 0 is set before an
 * extension appears, so a reader never sees our bitmaps without it.
 *
 * What the list may free: the parser (qcow2-bitmap.c) checks its
 * arithmetic, not the rest of the image.  So at load, and again before
 * a commit frees the list it replaces, every cluster of the list
 * (directory, tables, data) must have refcount exactly 1, appear once,
 * and be none of the header, L1 table, refcount table, refcount blocks,
 * L2 tables or guest data (the L2 tables are looked through only for a
 * list this open has not checked or written itself); otherwise tracking
 * is refused, naming the bitmap, and nothing is changed.  Freeing a
 * cluster that something else still uses would let the next allocation
 * overwrite it.  Load applies the caller's limits (set->check) to the
 * directory before it allocates anything the image's sizes ask.
 *
 * Failures: one before the header switch frees the new run again (at
 * the next flush) and leaves the old list, memory and disk alike.  One
 * during the switch (a write or sync of cluster 0) leaves the file's
 * list unknown: the bitmaps are given up for this open (lose()), never
 * guessed at.
 *
 * Every entry point (load, commit, release, and the open-time check,
 * which has the image to itself) takes flush_lock and lock: no flush
 * runs meanwhile, and map waits.  Load, commit and release run on the
 * driver's thread (bm_image_driver_call).
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "errors.h"
#include "format.h"
#include "internal.h"
#include "qcow2-int.h"

#define EXT_HEADER 8u
#define EXT_DATA 24u

void
bm_qcow2_bitmap_set_free(struct bm_qcow2_bitmap_set *set)
{
	if (!set)
		return;
	for (uint32_t i = 0; set->data && i < set->n; i++)
		free(set->data[i]);
	free(set->data);
	free(set->allocated);
	bm_qcow2_bitmaps_free(set->b, set->n);
	free(set->last);
	set->data = NULL;
	set->allocated = NULL;
	set->b = NULL;
	set->last = NULL;
	set->n = 0;
}

static void
lock(struct qcow2 *q)
{
	pthread_mutex_lock(&q->flush_lock);
	pthread_mutex_lock(&q->lock);
}

static void
unlock(struct qcow2 *q)
{
	pthread_mutex_unlock(&q->lock);
	pthread_mutex_unlock(&q->flush_lock);
}

static int
usable(struct qcow2 *q)
{
	if (q->h.version < 3)
		return bm_error(-ENOTSUP, "%s: qcow2 version 2 images cannot "
				"hold persistent bitmaps", q->name);
	if (!q->writable)
		return bm_error(-EROFS, "%s: read-only", q->name);
	if (q->corrupt)
		return bm_error(-EIO, "%s: qcow2 image is marked corrupt",
				q->name);
	if (q->bitmaps_lost)
		return bm_error(-EIO, "%s: the qcow2 bitmaps are in an unknown "
				"state since a write of the header failed; "
				"reopen the image", q->name);
	return 0;
}

/* Read and parse the current directory (*b NULL when there is none). */
static int
read_dir(struct qcow2 *q, struct bm_qcow2_bitmap **b)
{
	uint64_t size = q->h.bitmaps_dir_size;
	uint8_t *buf;
	int err;

	*b = NULL;
	if (!q->h.has_bitmaps)
		return 0;
	buf = malloc(size);
	if (!buf)
		return bm_error(-ENOMEM, "%s: out of memory", q->name);
	err = bm_fmt_pread(q->f, buf, size, q->h.bitmaps_dir_offset);
	if (err)
		bm_error_prefix(err, "%s: reading the qcow2 bitmap directory: ",
				q->name);
	else
		err = bm_qcow2_bitmap_dir_parse(q->name, &q->h, buf, size, b);
	free(buf);
	return err;
}

/* Does cluster `host` hold the header, L1 or refcount table? */
static bool
meta_overlap(const struct qcow2 *q, uint64_t host)
{
	uint64_t l1 = q->h.l1_table_offset, rt = q->h.refcount_table_offset;

	return host < q->cs ||
	       (host < l1 + (uint64_t)q->h.l1_size * 8 && l1 < host + q->cs) ||
	       (host < rt + ((uint64_t)q->h.refcount_table_clusters << q->cb) &&
		rt < host + q->cs);
}

/* Read bitmap b's table (b->table_size entries, malloc'd into *t) and
 * check every entry. */
static int
read_table(struct qcow2 *q, const struct bm_qcow2_bitmap *b, uint64_t **t)
{
	uint64_t n = b->table_size, fsize = bm_fmt_file_size(q->f);
	uint8_t *buf;
	int err;

	*t = NULL;
	/* Tables do not overlap (the parser): together no larger than the
	 * file, and so is what they cost here. */
	if (b->table_offset > fsize || n * 8 > fsize - b->table_offset)
		return bm_error(-EINVAL, "%s: qcow2 bitmap %.80s: bitmap "
				"table is outside the file", q->name, b->name);
	buf = malloc(n * 8);
	*t = calloc(n, sizeof **t);
	if (!buf || !*t) {
		free(buf);
		return bm_error(-ENOMEM, "%s: out of memory", q->name);
	}
	err = bm_fmt_pread(q->f, buf, n * 8, b->table_offset);
	for (uint64_t j = 0; !err && j < n; j++) {
		uint64_t host;
		bool ones;

		(*t)[j] = bm_get_be64(buf + j * 8);
		err = bm_qcow2_bitmap_entry(q->name, (*t)[j], q->cb, &host,
					    &ones);
		if (!err && host && host + q->cs > fsize)
			err = bm_error(-EINVAL, "data cluster 0x%" PRIx64
				       " is outside the file", host);
		if (!err && host && meta_overlap(q, host))
			err = bm_error(-EINVAL, "data cluster 0x%" PRIx64
				       " overlaps the image's metadata", host);
	}
	free(buf);
	if (err)
		bm_error_prefix(err, "%s: qcow2 bitmap %.80s: ", q->name,
				b->name);
	return err;
}

static void
free_tables(uint64_t **t, uint32_t n)
{
	for (uint32_t i = 0; t && i < n; i++)
		free(t[i]);
	free(t);
}

/* Read and check the table of each of the n bitmaps b (*t: n tables). */
static int
read_tables(struct qcow2 *q, const struct bm_qcow2_bitmap *b, uint32_t n,
	    uint64_t ***t)
{
	int err = 0;

	*t = calloc(n ? n : 1, sizeof **t);
	if (!*t)
		return bm_error(-ENOMEM, "%s: out of memory", q->name);
	for (uint32_t i = 0; !err && i < n; i++)
		err = read_table(q, &b[i], &(*t)[i]);
	return err;
}

static int
cmp_use(const void *a, const void *b)
{
	const struct bm_qcow2_use *x = a, *y = b;

	if (x->cluster != y->cluster)
		return x->cluster < y->cluster ? -1 : 1;
	return (x->owner > y->owner) - (x->owner < y->owner);
}

static void
add_use(struct bm_qcow2_use *u, size_t *nu, uint64_t off, uint64_t bytes,
	uint32_t owner, uint32_t cb)
{
	for (uint64_t c = off >> cb; c < (off + bytes + (UINT64_C(1) << cb) -
					  1) >> cb; c++) {
		u[*nu].cluster = c;
		u[*nu].owner = owner;
		(*nu)++;
	}
}

/* Every cluster of the current list (directory, tables t, data), sorted
 * by cluster. */
static int
list_uses(struct qcow2 *q, const struct bm_qcow2_bitmap *b, uint32_t n,
	  uint64_t *const *t, struct bm_qcow2_use **out, size_t *nu)
{
	size_t total = bm_round_up(q->h.bitmaps_dir_size, q->cs) >> q->cb;
	struct bm_qcow2_use *u;

	for (uint32_t i = 0; i < n; i++)
		total += (bm_round_up((uint64_t)b[i].table_size * 8, q->cs) >>
			  q->cb) + b[i].table_size;
	*nu = 0;
	*out = u = malloc(total * sizeof *u);
	if (!u)
		return bm_error(-ENOMEM, "%s: out of memory", q->name);
	add_use(u, nu, q->h.bitmaps_dir_offset, q->h.bitmaps_dir_size,
		UINT32_MAX, q->cb);
	for (uint32_t i = 0; i < n; i++) {
		add_use(u, nu, b[i].table_offset,
			(uint64_t)b[i].table_size * 8, i, q->cb);
		for (uint64_t j = 0; j < b[i].table_size; j++)
			if (t[i][j] & BM_QCOW2_OFFSET_MASK)
				add_use(u, nu, t[i][j] & BM_QCOW2_OFFSET_MASK,
					q->cs, i, q->cb);
	}
	qsort(u, *nu, sizeof *u, cmp_use);
	return 0;
}

/*
 * Freeing the list is safe only if each of its clusters belongs to it
 * alone: refcount exactly 1, named once, not the header, an L1, L2 or
 * refcount table or block, nor guest data.  `deep`: look through the L2
 * tables too (not needed for a list this open checked or wrote).
 */
static int
check_uses(struct qcow2 *q, const struct bm_qcow2_bitmap *b, uint32_t n,
	   uint64_t *const *t, bool deep)
{
	struct bm_qcow2_use *u;
	size_t nu, hit = 0;
	const char *what = NULL;
	char why[64];
	uint64_t v;
	int err = list_uses(q, b, n, t, &u, &nu);

	for (size_t k = 0; !err && !what && k < nu; k++) {
		hit = k;
		if (k && u[k].cluster == u[k - 1].cluster)
			what = "is used twice";
		else if (meta_overlap(q, u[k].cluster << q->cb))
			what = "overlaps the image's metadata";
		else if (!(err = bm_qcow2_refcount(q, u[k].cluster, &v)) &&
			 v != 1) {
			snprintf(why, sizeof why, "has refcount %" PRIu64
				 ", not 1", v);
			what = why;
		}
	}
	if (!err && !what && deep) {
		err = bm_qcow2_find_in_use(q, u, nu, &hit, &what);
		if (!err && hit < nu) {
			snprintf(why, sizeof why, "is also %s", what);
			what = why;
		} else {
			what = NULL;
		}
	}
	if (!err && what)
		err = bm_error(-EINVAL, "%s: qcow2 bitmap %s%.80s: cluster 0x%"
			       PRIx64 " %s", q->name,
			       u[hit].owner == UINT32_MAX ? "directory" : "",
			       u[hit].owner == UINT32_MAX ? "" :
			       b[u[hit].owner].name,
			       u[hit].cluster << q->cb, what);
	free(u);
	return err;
}

static int
load_one(struct qcow2 *q, struct bm_qcow2_bitmap_set *s, uint32_t i,
	 uint64_t **tp)
{
	const struct bm_qcow2_bitmap *b = &s->b[i];
	uint64_t *t = *tp;
	int err = 0;

	s->allocated[i] = true;
	if (!(s->data[i] = bm_qcow2_alloc_buf(b->table_size * q->cs)))
		err = bm_error(-ENOMEM, "%s: out of memory", q->name);
	for (uint64_t j = 0; !err && j < b->table_size; j++) {
		uint8_t *dst = s->data[i] + j * q->cs;
		uint64_t host = t[j] & BM_QCOW2_OFFSET_MASK;

		if (host)
			err = bm_fmt_pread(q->f, dst, q->cs, host);
		else if (t[j] & 1)
			memset(dst, 0xff, q->cs);
		s->allocated[i] &= host != 0;
	}
	if (!err && i == s->n - 1) {
		s->last = t;   /* entries of aligned offsets: the hosts */
		*tp = NULL;
		for (uint64_t j = 0; j < b->table_size; j++)
			s->last[j] &= BM_QCOW2_OFFSET_MASK;
	}
	return err;
}

int
bm_qcow2_bitmaps_load(void *drv, void *arg)
{
	struct qcow2 *q = drv;
	struct bm_qcow2_bitmap_set *s = arg;
	int (*check)(void *, const struct bm_qcow2_bitmap_set *) = s->check;
	void *opaque = s->opaque;
	uint64_t **t = NULL;
	int err;

	memset(s, 0, sizeof *s);
	lock(q);
	s->cluster_bits = q->cb;
	err = usable(q);
	if (!err)
		err = read_dir(q, &s->b);
	if (!err && s->b)
		s->n = q->h.bitmaps_nb;
	/* The caller's limits before anything sized by the image. */
	if (!err && check)
		err = check(opaque, s);
	if (!err && s->n)
		err = read_tables(q, s->b, s->n, &t);
	if (!err && s->n)
		err = check_uses(q, s->b, s->n, t, true);
	if (!err && s->n) {
		s->data = calloc(s->n, sizeof *s->data);
		s->allocated = calloc(s->n, sizeof *s->allocated);
		if (!s->data || !s->allocated)
			err = bm_error(-ENOMEM, "%s: out of memory", q->name);
	}
	for (uint32_t i = 0; !err && i < s->n; i++)
		err = load_one(q, s, i, &t[i]);
	s->consistent = !q->h.has_bitmaps ||
			(q->h.autoclear & BM_QCOW2_AUTOCLEAR_BITMAPS);
	if (!err) {
		q->keep_bitmaps = true;
		q->checked_dir = q->h.bitmaps_dir_offset;
	}
	unlock(q);
	free_tables(t, s->n);
	if (err)
		bm_qcow2_bitmap_set_free(s);
	return err;
}

int
bm_qcow2_bitmaps_check(struct qcow2 *q)
{
	struct bm_qcow2_bitmap *b;
	int err;

	lock(q);   /* nobody else yet: for the rule of the file */
	err = read_dir(q, &b);
	unlock(q);
	bm_qcow2_bitmaps_free(b, q->h.bitmaps_nb);
	/* Valid but not ours to rewrite: refused when tracking starts. */
	if (err == -ENOTSUP)
		bm_error_clear();
	return err == -ENOTSUP ? 0 : err;
}

int
bm_qcow2_bitmaps_release(void *drv, void *arg)
{
	struct qcow2 *q = drv;

	(void)arg;
	lock(q);
	q->keep_bitmaps = false;
	unlock(q);
	return 0;
}

/* ---- commit --------------------------------------------------------- */

static bool
all_zero(const uint8_t *p, uint64_t n)
{
	for (uint64_t i = 0; i < n; i++)
		if (p[i])
			return false;
	return true;
}

/* The clusters the current list uses (directory, tables, data), to be
 * freed once the new list is in place. */
struct frees {
	uint64_t *c;      /* pairs: first cluster, count */
	size_t n, cap;
};

static int
add_free(struct qcow2 *q, struct frees *fr, uint64_t off, uint64_t bytes)
{
	if (fr->n == fr->cap) {
		size_t cap = fr->cap ? fr->cap * 2 : 32;
		uint64_t *c = realloc(fr->c, cap * 2 * sizeof *c);

		if (!c)
			return bm_error(-ENOMEM, "%s: out of memory", q->name);
		fr->c = c;
		fr->cap = cap;
	}
	fr->c[2 * fr->n] = off >> q->cb;
	fr->c[2 * fr->n + 1] = bm_round_up(bytes, q->cs) >> q->cb;
	fr->n++;
	return 0;
}

static int
old_clusters(struct qcow2 *q, struct frees *fr)
{
	struct bm_qcow2_bitmap *b;
	uint64_t **t = NULL;
	uint32_t n = q->h.bitmaps_nb;
	int err = read_dir(q, &b);

	if (err || !b)
		return err;
	err = read_tables(q, b, n, &t);
	if (!err)
		err = check_uses(q, b, n, t,
				 q->h.bitmaps_dir_offset != q->checked_dir);
	if (!err)
		err = add_free(q, fr, q->h.bitmaps_dir_offset,
			       q->h.bitmaps_dir_size);
	for (uint32_t i = 0; !err && i < n; i++) {
		for (uint64_t j = 0; !err && j < b[i].table_size; j++)
			if (t[i][j] & BM_QCOW2_OFFSET_MASK)
				err = add_free(q, fr,
					       t[i][j] & BM_QCOW2_OFFSET_MASK,
					       q->cs);
		if (!err)
			err = add_free(q, fr, b[i].table_offset,
				       (uint64_t)b[i].table_size * 8);
	}
	free_tables(t, n);
	bm_qcow2_bitmaps_free(b, n);
	return err;
}

static int
write_sync(struct qcow2 *q, const void *buf, size_t len, uint64_t off)
{
	int err = bm_fmt_pwrite(q->f, buf, len, off);

	return err ? err : bm_fmt_sync(q->f);
}

static int
set_autoclear(struct qcow2 *q)
{
	uint8_t b[8];
	int err;

	if (q->h.autoclear & BM_QCOW2_AUTOCLEAR_BITMAPS)
		return 0;
	bm_put_be64(b, q->h.autoclear | BM_QCOW2_AUTOCLEAR_BITMAPS);
	err = write_sync(q, b, 8, BM_QCOW2_OFF_AUTOCLEAR);
	if (!err)
		q->h.autoclear |= BM_QCOW2_AUTOCLEAR_BITMAPS;
	return err;
}

/* Move the backing file name to the end of cluster 0, out of the way
 * of a new extension ending at `need`. */
static int
move_backing_name(struct qcow2 *q, uint64_t need)
{
	uint64_t old = q->h.backing_offset, len = q->h.backing_size;
	uint64_t to = bm_round_down(q->cs - len, 8);
	uint8_t b[8];
	int err;

	if (!old || old >= need)
		return 0;
	if (to < need || to < old + len)
		return bm_error(-ENOSPC, "%s: no room in the qcow2 header for "
				"the bitmaps extension", q->name);
	err = write_sync(q, q->h.backing_name, len, to);
	if (!err) {
		bm_put_be64(b, to);
		err = write_sync(q, b, 8, 8);
	}
	if (!err)
		q->h.backing_offset = to;
	return err;
}

static bool
one_sector(uint64_t off, uint64_t len)
{
	return off / BM_QCOW2_SECTOR == (off + len - 1) / BM_QCOW2_SECTOR;
}

/* Point the header at the new directory (n bitmaps; n == 0: none).
 * *wrote: cluster 0 may have changed (a failure is then not clean). */
static int
switch_header(struct qcow2 *q, uint32_t n, uint64_t dir_size,
	      uint64_t dir_off, bool *wrote)
{
	uint8_t ext[EXT_HEADER + EXT_DATA + 8] = { 0 };
	uint64_t pos = q->h.bitmaps_ext_pos, end = q->h.ext_end_pos;
	int err;

	bm_qcow2_bitmap_ext_encode(n, dir_size, dir_off, ext + EXT_HEADER);
	if (n && q->h.has_bitmaps) {
		if (!one_sector(pos + EXT_HEADER, EXT_DATA))
			return bm_error(-ENOTSUP, "%s: the qcow2 bitmaps "
					"extension straddles a sector: it "
					"cannot be switched atomically",
					q->name);
		*wrote = true;
		return write_sync(q, ext + EXT_HEADER, EXT_DATA,
				  pos + EXT_HEADER);
	}
	if (!n) {
		if (!q->h.has_bitmaps)
			return 0;
		if (end != pos + EXT_HEADER + EXT_DATA)
			return bm_error(-ENOTSUP, "%s: the qcow2 bitmaps "
					"extension is not the last one: it "
					"cannot be removed atomically",
					q->name);
		*wrote = true;
		return write_sync(q, ext + EXT_HEADER + EXT_DATA, 8, pos);
	}
	if (!end || end + sizeof ext > q->cs)
		return bm_error(-ENOSPC, "%s: no room in the qcow2 header for "
				"the bitmaps extension", q->name);
	*wrote = true;
	err = move_backing_name(q, end + sizeof ext);
	if (!err)
		err = set_autoclear(q);
	if (!err)
		err = write_sync(q, ext + EXT_HEADER, EXT_DATA + 8,
				 end + EXT_HEADER);
	if (err)
		return err;
	bm_put_be32(ext, BM_QCOW2_EXT_BITMAPS);
	bm_put_be32(ext + 4, EXT_DATA);
	err = write_sync(q, ext, EXT_HEADER, end);
	if (!err) {
		q->h.bitmaps_ext_pos = (uint32_t)end;
		q->h.ext_end_pos = (uint32_t)(end + EXT_HEADER + EXT_DATA);
	}
	return err;
}

/* Where each part of the new list goes in the run. */
struct layout {
	uint64_t clusters;         /* of the run */
	uint64_t dir_size;
	uint64_t **host;           /* per bitmap: data cluster offsets */
	uint64_t *table;           /* per bitmap: table offset */
};

static void
layout_free(struct layout *l, uint32_t n)
{
	for (uint32_t i = 0; l->host && i < n; i++)
		free(l->host[i]);
	free(l->host);
	free(l->table);
}

/* Lay the list out in a run at `base` (base 0: only count clusters). */
static int
plan(struct qcow2 *q, struct bm_qcow2_bitmap_set *s, uint64_t base,
     struct layout *l)
{
	uint64_t c = 0;

	for (uint32_t i = 0; i < s->n; i++) {
		struct bm_qcow2_bitmap *b = &s->b[i];
		uint64_t t = bm_qcow2_bitmap_table_size(q->h.size,
							b->granularity_bits,
							q->cb);

		if (!t)
			return bm_error(-EINVAL, "%s: bitmap %.80s: bad "
					"granularity", q->name, b->name);
		b->table_size = (uint32_t)t;
		for (uint64_t j = 0; j < t; j++) {
			bool need = !all_zero(s->data[i] + j * q->cs, q->cs) ||
				    (s->alloc_last && i == s->n - 1);

			l->host[i][j] = need ? base + (c++ << q->cb) : 0;
		}
		l->table[i] = base + (c << q->cb);
		b->table_offset = l->table[i];
		c += bm_round_up(t * 8, q->cs) >> q->cb;
	}
	l->dir_size = bm_qcow2_bitmap_dir_size(s->b, s->n);
	if (l->dir_size > BM_QCOW2_MAX_BITMAP_DIR)
		return bm_error(-EFBIG, "%s: qcow2 bitmap directory too large",
				q->name);
	c += bm_round_up(l->dir_size, q->cs) >> q->cb;
	l->clusters = c;
	return 0;
}

/* Fill the run: data clusters, tables, directory. */
static int
fill(struct qcow2 *q, struct bm_qcow2_bitmap_set *s, uint64_t base,
     struct layout *l, uint8_t *run)
{
	for (uint32_t i = 0; i < s->n; i++) {
		uint8_t *t = run + (l->table[i] - base);

		for (uint64_t j = 0; j < s->b[i].table_size; j++) {
			if (l->host[i][j])
				memcpy(run + (l->host[i][j] - base),
				       s->data[i] + j * q->cs, q->cs);
			bm_put_be64(t + j * 8, l->host[i][j]);
		}
	}
	return s->n ? bm_qcow2_bitmap_dir_encode(s->b, s->n,
			run + (l->clusters << q->cb) -
			bm_round_up(l->dir_size, q->cs),
			bm_round_up(l->dir_size, q->cs)) : 0;
}

/*
 * The header switch failed part way: the file may show the old list or
 * the new one.  Rather than guess, give up the bitmaps for this open:
 * no more commits, nothing of either list freed (leaks at worst), and
 * autoclear bit 0 cleared, now if the file takes it, else before the
 * next change of the image (keep_bitmaps), so that QEMU and the next
 * load distrust every bitmap and a backup heals.
 */
static int
lose(struct qcow2 *q, int err)
{
	char why[256];

	snprintf(why, sizeof why, "%s", blockmirror_last_error());
	q->bitmaps_lost = true;
	q->keep_bitmaps = false;
	(void)bm_qcow2_clear_autoclear(q);
	return bm_error(err, "%s; the image's bitmaps are now in an unknown "
			"state and not trusted", why);
}

static int
commit_locked(struct qcow2 *q, struct bm_qcow2_bitmap_set *s)
{
	struct layout l = { 0 };
	struct frees fr = { 0 };
	uint64_t base = 0, dir_off = 0;
	uint8_t *run = NULL;
	bool wrote = false;
	int err = usable(q);

	if (!err && s->n > BM_QCOW2_MAX_BITMAPS)
		err = bm_error(-ENOSPC, "%s: too many bitmaps", q->name);
	if (err)
		return err;
	l.host = calloc(s->n ? s->n : 1, sizeof *l.host);
	l.table = calloc(s->n ? s->n : 1, sizeof *l.table);
	err = l.host && l.table ? 0 : -ENOMEM;
	for (uint32_t i = 0; !err && i < s->n; i++) {
		uint64_t t = bm_qcow2_bitmap_table_size(q->h.size,
				s->b[i].granularity_bits, q->cb);

		if (!(l.host[i] = calloc(t ? t : 1, sizeof **l.host)))
			err = -ENOMEM;
	}
	if (err) {
		err = bm_error(err, "%s: out of memory", q->name);
		goto out;
	}
	err = plan(q, s, 0, &l);
	if (!err)
		err = old_clusters(q, &fr);
	if (!err && l.clusters)
		err = bm_qcow2_alloc_run(q, l.clusters, &base);
	if (!err && l.clusters && !(run = bm_qcow2_alloc_buf(l.clusters << q->cb)))
		err = bm_error(-ENOMEM, "%s: out of memory", q->name);
	if (!err && l.clusters)
		err = plan(q, s, base, &l);
	if (!err)
		err = fill(q, s, base, &l, run);
	/* Refcounts, then what they count, then the reference to it. */
	if (!err)
		err = bm_qcow2_flush_refcounts(q);
	if (!err && l.clusters)
		err = write_sync(q, run, l.clusters << q->cb, base);
	if (!err && s->n)
		dir_off = base + (l.clusters << q->cb) -
			  bm_round_up(l.dir_size, q->cs);
	if (!err)
		err = switch_header(q, s->n, l.dir_size, dir_off, &wrote);
	if (!err && s->n)
		err = set_autoclear(q);
	if (err && wrote) {
		err = lose(q, err);
		goto out;
	}
	/* Nothing refers to the run: it goes back at the next flush. */
	if (err && base)
		bm_qcow2_free_later(q, base >> q->cb, l.clusters);
	if (err)
		goto out;
	q->h.has_bitmaps = s->n != 0;
	q->h.bitmaps_nb = s->n;
	q->h.bitmaps_dir_size = l.dir_size;
	q->h.bitmaps_dir_offset = dir_off;
	if (!s->n)
		q->h.ext_end_pos = q->h.bitmaps_ext_pos;
	for (size_t i = 0; !err && i < fr.n; i++)
		err = bm_qcow2_free_later(q, fr.c[2 * i], fr.c[2 * i + 1]);
	q->checked_dir = dir_off;
	if (s->n) {
		s->last = l.host[s->n - 1];
		l.host[s->n - 1] = NULL;
	}
out:
	layout_free(&l, s->n);
	free(fr.c);
	free(run);
	return err;
}

int
bm_qcow2_bitmaps_commit(void *drv, void *arg)
{
	struct qcow2 *q = drv;
	int err;

	lock(q);
	err = commit_locked(q, arg);
	unlock(q);
	return err;
}
