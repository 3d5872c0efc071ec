/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * A tracker's checkpoints (cbt.h): creating, removing, listing, and the
 * blocks changed since one.  See cbt.c for the design.
 *
 * The invariant of the structural changes: the new list and bitmaps are
 * built aside, written as a whole new file (bm_cbt_write_file), and only
 * applied in memory once that file is durable.  So a failure changes
 * nothing, in memory or on disk, and a crash leaves the old file or the
 * new one.  Removing Ck merges Bk into B(k-1) before the write, so
 * "changed since C(k-1)" is the same in both.
 *
 * A checkpoint made within bm_cbt_carry_window seconds of the newest
 * carries: its bitmap is written with every block durable in the
 * newest's, not empty, so the guest's next writes to those blocks do not
 * wait for a sync (cbt.c).  That is a checkpoint a second for
 * replication, whose writes mostly fall in blocks written the second
 * before.  The carried blocks are dropped once they go back more than
 * CARRY_MAX seconds: after a crash, "changed since" a checkpoint holds
 * at most that much from before it.  Removals keep what Bn carries.
 *
 * The fine bitmaps (memory only, cbt.c) follow the coarse ones: a
 * checkpoint created while the fine record is kept gets one (unless
 * memory is short: then none), a removal merges Fk into F(k-1) when both
 * have one and else leaves C(k-1) without, so a fine bitmap always
 * covers its checkpoint's whole life.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cbt-int.h"
#include "errors.h"

#define CARRY_MAX 60

unsigned bm_cbt_carry_window = 10;

static uint64_t
wall_clock(void)
{
	return (uint64_t)time(NULL);
}

uint64_t (*bm_cbt_clock)(void) = wall_clock;

static int
copy_bitmap(struct bm_bitmap *dst, const struct bm_bitmap *src)
{
	if (bm_bitmap_init(dst, src->size, bm_bitmap_granularity(src)) < 0)
		return bm_error(-ENOMEM, "out of memory");
	bm_cbt_or_into(dst, src);
	return 0;
}

/* ---- checkpoints ----------------------------------------------------- */

static long
find(const struct bm_cbt *cbt, const char *name)
{
	for (size_t i = 0; i < cbt->count; i++)
		if (strcmp(cbt->cp[i].e.name, name) == 0)
			return (long)i;
	return -1;
}

static int
bad_name(const struct bm_cbt *cbt, const char *name)
{
	return bm_error(-EINVAL, "%s: bad checkpoint name \"%.80s\": names "
			"are 1 to %u bytes of [A-Za-z0-9._-]", cbt->path,
			name ? name : "", BM_CBT_NAME_MAX);
}

static uint64_t
newest_created(const struct bm_cbt *cbt)
{
	return cbt->cp[cbt->count - 1].e.created;
}

int
bm_cbt_create(struct bm_cbt *cbt, const char *name)
{
	struct bm_cbt_entry ents[BM_CBT_MAX_CHECKPOINTS];
	struct bm_bitmap *bits[BM_CBT_MAX_CHECKPOINTS];
	struct checkpoint c = { 0 };
	struct bm_bitmap carry = { 0 };
	size_t n = cbt->count;
	uint64_t now = bm_cbt_clock();
	bool carry_on;
	int r;

	if (!bm_cbt_name_ok(name))
		return bad_name(cbt, name);
	if (find(cbt, name) >= 0)
		return bm_error(-EEXIST, "%s: checkpoint %s exists already",
				cbt->path, name);
	if (n == BM_CBT_MAX_CHECKPOINTS)
		return bm_error(-ENOSPC, "%s: %u checkpoints already",
				cbt->path, BM_CBT_MAX_CHECKPOINTS);
	/* A failed write-back is flagged on the checkpoints; one still in
	 * flight (the loop failed) must not complete into the new file. */
	if ((r = bm_cbt_flush(cbt)) < 0 && cbt->writing)
		return r;
	/* Carry what is durable of the newest if it is recent, and what it
	 * carried if that is not too old either; a broken tracker's
	 * durable set is no promise, so nothing then. */
	carry_on = n && !cbt->err && !cbt->carried_unknown &&
		   bm_cbt_carry_window &&
		   now - newest_created(cbt) < bm_cbt_carry_window &&
		   (!cbt->carrying || now - cbt->carry_since < CARRY_MAX);
	if (carry_on && (r = copy_bitmap(&carry, &cbt->durable)) < 0)
		return r;
	if (bm_bitmap_init(&c.bits, cbt->disk_size, cbt->granularity) < 0) {
		bm_bitmap_free(&carry);
		return bm_error(-ENOMEM, "%s: out of memory", cbt->path);
	}
	/* Without room for it, the checkpoint just has no fine bitmap. */
	if (cbt->fine_granularity &&
	    bm_bitmap_init(&c.fine, cbt->disk_size,
			   cbt->fine_granularity) < 0)
		memset(&c.fine, 0, sizeof c.fine);
	snprintf(c.e.name, sizeof c.e.name, "%s", name);
	c.e.id = cbt->next_id++;
	c.e.created = now;
	for (size_t i = 0; i < n; i++) {
		ents[i] = cbt->cp[i].e;
		bits[i] = &cbt->cp[i].bits;
	}
	ents[n] = c.e;
	bits[n] = carry_on ? &carry : &c.bits;
	r = bm_cbt_write_file(cbt, ents, bits, n + 1, true);
	if (r < 0) {
		cbt->next_id--;
		bm_bitmap_free(&c.bits);
		bm_bitmap_free(&c.fine);
		bm_bitmap_free(&carry);
		return r;
	}
	if (!carry_on || !cbt->carrying)
		cbt->carry_since = n ? newest_created(cbt) : now;
	cbt->carried_unknown = false;
	cbt->cp[cbt->count++] = c;
	bm_cbt_rewritten(cbt, carry_on ? &carry : NULL);
	bm_bitmap_free(&carry);
	return 0;
}

int
bm_cbt_remove(struct bm_cbt *cbt, const char *name)
{
	struct bm_cbt_entry ents[BM_CBT_MAX_CHECKPOINTS];
	struct bm_bitmap *bits[BM_CBT_MAX_CHECKPOINTS];
	struct bm_bitmap merged = { 0 }, shown = { 0 };
	long k = name ? find(cbt, name) : -1;
	size_t j = 0;
	int r;

	if (k < 0)
		return bm_error(-ENOENT, "%s: no checkpoint named %.80s",
				cbt->path, name ? name : "(null)");
	if ((r = bm_cbt_flush(cbt)) < 0 && cbt->writing)
		return r;
	/* B(k-1) | Bk keeps "changed since C(k-1)" as it was. */
	if (k > 0) {
		r = copy_bitmap(&merged, &cbt->cp[k - 1].bits);
		if (r < 0)
			return r;
		bm_cbt_or_into(&merged, &cbt->cp[k].bits);
	}
	for (size_t i = 0; i < cbt->count; i++) {
		if (i == (size_t)k)
			continue;
		ents[j] = cbt->cp[i].e;
		bits[j] = &cbt->cp[i].bits;
		if (i + 1 == (size_t)k) {
			ents[j].flags |= cbt->cp[k].e.flags;
			bits[j] = &merged;
		}
		j++;
	}
	/* The newest on disk keeps what it carries (and what is durable of
	 * it, whichever bitmap it becomes). */
	if (cbt->carrying && j) {
		r = copy_bitmap(&shown, bits[j - 1]);
		if (r < 0) {
			bm_bitmap_free(&merged);
			return r;
		}
		bm_cbt_or_into(&shown, &cbt->durable);
		bits[j - 1] = &shown;
	}
	r = bm_cbt_write_file(cbt, ents, bits, j, true);
	if (r < 0) {
		bm_bitmap_free(&merged);
		bm_bitmap_free(&shown);
		return r;
	}
	bm_bitmap_free(&cbt->cp[k].bits);
	if (k > 0) {
		bm_bitmap_free(&cbt->cp[k - 1].bits);
		cbt->cp[k - 1].bits = merged;
		/* In place (memory only, nothing to undo); without Fk,
		 * F(k-1) would miss Bk's blocks: it goes. */
		if (cbt->cp[k - 1].fine.words && cbt->cp[k].fine.words)
			bm_cbt_or_into(&cbt->cp[k - 1].fine,
				       &cbt->cp[k].fine);
		else
			bm_bitmap_free(&cbt->cp[k - 1].fine);
		cbt->cp[k - 1].e.flags = ents[k - 1].flags;
	}
	bm_bitmap_free(&cbt->cp[k].fine);
	memmove(&cbt->cp[k], &cbt->cp[k + 1],
		(cbt->count - (size_t)k - 1) * sizeof cbt->cp[0]);
	cbt->count--;
	bm_cbt_rewritten(cbt, shown.words ? &shown : NULL);
	bm_bitmap_free(&shown);
	return 0;
}

size_t
bm_cbt_count(const struct bm_cbt *cbt)
{
	return cbt->count;
}

/* Why changed-since checkpoint i cannot be trusted, or NULL. */
static const char *
untrusted(const struct bm_cbt *cbt, size_t i)
{
	for (; i < cbt->count; i++) {
		if (cbt->cp[i].e.flags & BM_CBT_LOST)
			return "a write-back of the tracker failed since it "
			       "was created: writes may be missing";
		if (cbt->cp[i].e.flags & BM_CBT_DAMAGED)
			return "a bitmap since it was created is damaged";
		if (cbt->cp[i].e.flags & BM_CBT_UNKEPT)
			return "the image was written by a program that does "
			       "not keep its bitmaps (autoclear bit 0 clear)";
		if (cbt->cp[i].e.flags & BM_CBT_STALE)
			return "the image marks a bitmap since it was created "
			       "in use: the last program to write the image "
			       "did not store it (QEMU stopped, or it was "
			       "found untrusted before)";
	}
	return NULL;
}

int
bm_cbt_get(const struct bm_cbt *cbt, size_t i, struct bm_cbt_info *info)
{
	if (i >= cbt->count)
		return bm_error(-ENOENT, "%s: no checkpoint %zu", cbt->path, i);
	info->name = cbt->cp[i].e.name;
	info->id = cbt->cp[i].e.id;
	info->created = cbt->cp[i].e.created;
	info->blocks = bm_bitmap_count(&cbt->cp[i].bits);
	info->untrusted = untrusted(cbt, i);
	return 0;
}

int
bm_cbt_keep_fine(struct bm_cbt *cbt, uint32_t granularity)
{
	if (granularity &&
	    (granularity & (granularity - 1) ||
	     granularity < BM_CBT_MIN_GRANULARITY ||
	     granularity >= cbt->granularity))
		return bm_error(-EINVAL, "%s: a fine record of %" PRIu32
				" bytes: not a power of two from %" PRIu32
				" below the record's %" PRIu32, cbt->path,
				granularity, BM_CBT_MIN_GRANULARITY,
				cbt->granularity);
	if (granularity) {
		if (cbt->fine_users && granularity != cbt->fine_granularity)
			return bm_error(-EBUSY, "%s: a fine record of %" PRIu32
					" bytes is kept already", cbt->path,
					cbt->fine_granularity);
		cbt->fine_users++;
		cbt->fine_granularity = granularity;
		return 0;
	}
	if (!cbt->fine_users || --cbt->fine_users)
		return 0;
	/* Kept no longer: what exists would miss the marks from now on. */
	for (size_t i = 0; i < cbt->count; i++)
		bm_bitmap_free(&cbt->cp[i].fine);
	cbt->fine_granularity = 0;
	return 0;
}

uint32_t
bm_cbt_fine_granularity(const struct bm_cbt *cbt)
{
	return cbt->fine_granularity;
}

static int
changed_since(const struct bm_cbt *cbt, const char *name, bool fine,
	      struct bm_bitmap *out, uint64_t *bytes)
{
	long k = name ? find(cbt, name) : -1;
	uint32_t g = cbt->granularity;
	const char *why;

	memset(out, 0, sizeof *out);
	if (k < 0)
		return bm_error(-ENOENT, "%s: no checkpoint named %.80s",
				cbt->path, name ? name : "(null)");
	why = untrusted(cbt, (size_t)k);
	if (why)
		return bm_error(-ESTALE, "%s: checkpoint %s is not trusted: %s",
				cbt->path, name, why);
	/* Every fine bitmap is at fine_granularity: another is refused
	 * while one is kept, and the last user's undoing frees them. */
	for (size_t i = (size_t)k; fine && i < cbt->count; i++)
		fine = cbt->cp[i].fine.words != NULL;
	if (fine)
		g = cbt->fine_granularity;
	if (bm_bitmap_init(out, cbt->disk_size, g) < 0)
		return bm_error(-ENOMEM, "%s: out of memory", cbt->path);
	for (size_t i = (size_t)k; i < cbt->count; i++)
		bm_cbt_or_into(out, fine ? &cbt->cp[i].fine
					 : &cbt->cp[i].bits);
	*bytes = bm_bitmap_dirty_bytes(out);
	return 0;
}

int
bm_cbt_changed_since(const struct bm_cbt *cbt, const char *name,
		     struct bm_bitmap *out, uint64_t *bytes)
{
	return changed_since(cbt, name, false, out, bytes);
}

int
bm_cbt_changed_since_fine(const struct bm_cbt *cbt, const char *name,
			  struct bm_bitmap *out, uint64_t *bytes)
{
	return changed_since(cbt, name, true, out, bytes);
}
