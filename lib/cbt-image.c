/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The tracker's record kept in a qcow2 image (cbt.h, docs/cbt.md): the
 * checkpoints are the image's persistent dirty bitmaps, so that
 * `qemu-img info` lists them and QEMU can use them.  The tracker itself
 * (cbt.c) is the same as for a sidecar; only the place of its pages and
 * its structural rewrites differ.
 *
 * The mapping.  Checkpoint Ck is bitmap Ck, in directory order.  Only
 * the newest takes marks, so only it has the `auto` flag (QEMU keeps
 * marking it when it opens the image); the older ones are frozen.  A
 * checkpoint that cannot be trusted (LOST, DAMAGED, or found in use or
 * with the image's autoclear bit 0 clear) has the `in_use` flag, so QEMU
 * refuses it too, and we read it back as STALE.
 *
 * The invariant that lets marks go in place: every data cluster of the
 * newest bitmap is allocated (a commit with alloc_last), so marking a
 * block is a write of its 4 KiB page at a known file offset, then a
 * sync, before the guest write goes on (cbt.c's write-back).  The bitmap
 * on disk is then a superset of every acknowledged write at any time: it
 * needs no in_use flag while we hold it, and stays valid for QEMU and
 * for us after kill -9.  That is also why `crashed` is always false
 * here: there is nothing to find, and nothing to distrust.
 *
 * Structural changes (create, remove, and the flags at open and close)
 * build the whole new list in memory and hand it to the driver's commit
 * (qcow2-bitmap-io.c), which writes it into new clusters and switches
 * the header only when they are durable.  They run through the image's
 * request queue (bm_image_driver_call), turning the tracker's loop, which
 * must be the image's.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cbt-int.h"
#include "errors.h"
#include "format.h"
#include "internal.h"
#include "qcow2.h"

struct call {
	struct bm_io io;
	bool done;
	int err;
};

static void
call_done(struct bm_io *io, int err)
{
	struct call *c = io->opaque;

	c->done = true;
	c->err = err;
}

/* Run a driver entry point and wait for it, turning the loop. */
static int
driver_call(struct bm_cbt *cbt, int (*fn)(void *, void *), void *arg)
{
	struct call c = { 0 };

	c.io.done = call_done;
	c.io.opaque = &c;
	bm_image_driver_call(cbt->image, &bm_qcow2_driver, fn, arg, &c.io);
	while (!c.done) {
		int r = bm_loop_run_once(cbt->loop, -1);

		if (r < 0)
			return bm_error(r, "%s: running the loop: %s",
					cbt->path, strerror(-r));
	}
	return c.err;
}

uint64_t
bm_cbt_image_page(const struct bm_cbt *cbt, uint64_t page)
{
	uint64_t byte = page * BM_CBT_PAGE;

	return cbt->last[byte / cbt->cluster_size] +
	       byte % cbt->cluster_size;
}

static uint32_t
log2_u32(uint32_t v)
{
	return (uint32_t)__builtin_ctz(v);
}

/* The image's bytes of one bitmap: whole clusters. */
static uint64_t
image_bytes(const struct bm_cbt *cbt)
{
	return bm_qcow2_bitmap_table_size(cbt->disk_size,
					  log2_u32(cbt->granularity),
					  log2_u32(cbt->cluster_size)) *
	       cbt->cluster_size;
}

bool
bm_cbt_kept_in(const struct bm_cbt *cbt, const struct bm_image *img)
{
	return cbt && cbt->image && cbt->image == img;
}

void
bm_cbt_image_gone(struct bm_cbt *cbt, const struct bm_image *img)
{
	if (cbt->image && cbt->image == img)
		cbt->image_gone = true;
}

int
bm_cbt_image_write(struct bm_cbt *cbt, const struct bm_cbt_entry *ents,
		   struct bm_bitmap *const *bits, size_t count)
{
	struct bm_qcow2_bitmap_set set = { 0 };
	uint64_t bytes = image_bytes(cbt);
	int r = 0;

	if (cbt->image_gone)
		return bm_error(-ESTALE, "%s: the checkpoints are this image's "
				"bitmaps, and the disk was moved off it: they "
				"still take marks, but cannot change; start "
				"tracking anew on the new image", cbt->path);

	set.n = (uint32_t)count;
	set.alloc_last = true;
	set.b = calloc(count ? count : 1, sizeof *set.b);
	set.data = calloc(count ? count : 1, sizeof *set.data);
	if (!set.b || !set.data)
		r = -ENOMEM;
	for (size_t i = 0; r == 0 && i < count; i++) {
		struct bm_qcow2_bitmap *b = &set.b[i];

		b->name = strdup(ents[i].name);
		set.data[i] = malloc(bytes);
		if (!b->name || !set.data[i]) {
			r = -ENOMEM;
			break;
		}
		b->granularity_bits = log2_u32(cbt->granularity);
		b->flags = i + 1 == count ? BM_QCOW2_BME_AUTO : 0;
		/* Whatever makes it untrusted here makes QEMU refuse it. */
		if (ents[i].flags)
			b->flags |= BM_QCOW2_BME_IN_USE;
		bm_cbt_bits_encode(bits[i]->words, NULL, cbt->blocks, 0,
				   bytes / BM_CBT_PAGE, set.data[i]);
	}
	if (r < 0)
		r = bm_error(r, "%s: out of memory", cbt->path);
	else
		r = driver_call(cbt, bm_qcow2_bitmaps_commit, &set);
	if (r == 0) {
		free(cbt->new_last);
		cbt->new_last = set.last;
		set.last = NULL;
	}
	bm_qcow2_bitmap_set_free(&set);
	return r;
}

int
bm_cbt_image_release(struct bm_cbt *cbt)
{
	if (cbt->image_gone)
		return 0;
	return driver_call(cbt, bm_qcow2_bitmaps_release, NULL);
}

/* What the image says, checked against what the tracker can hold: by
 * the driver's load (bm_qcow2_bitmap_set.check), on the directory alone,
 * before it allocates what the image's sizes ask. */
struct load_check {
	struct bm_cbt *cbt;
	uint32_t granularity;      /* in: wanted or 0; out: the image's */
	uint32_t cluster_size;
};

static int
check_set(void *opaque, const struct bm_qcow2_bitmap_set *set)
{
	struct load_check *lc = opaque;
	const struct bm_cbt *cbt = lc->cbt;
	uint32_t *granularity = &lc->granularity;

	lc->cluster_size = UINT32_C(1) << set->cluster_bits;
	if (lc->cluster_size < BM_CBT_PAGE)
		return bm_error(-ENOTSUP, "%s: checkpoints in the image need "
				"clusters of 4 KiB or more (this one has %"
				PRIu32 " bytes); give a sidecar path",
				cbt->path, lc->cluster_size);
	if (set->n > BM_CBT_MAX_CHECKPOINTS)
		return bm_error(-ENOTSUP, "%s: %" PRIu32 " bitmaps, more than "
				"the %u checkpoints a tracker holds",
				cbt->path, set->n, BM_CBT_MAX_CHECKPOINTS);
	for (uint32_t i = 0; i < set->n; i++) {
		const struct bm_qcow2_bitmap *b = &set->b[i];
		uint32_t g;

		if (!bm_cbt_name_ok(b->name))
			return bm_error(-ENOTSUP, "%s: bitmap \"%.80s\" is not "
					"a checkpoint name (1 to 64 bytes of "
					"[A-Za-z0-9._-]); remove it with "
					"qemu-img bitmap --remove", cbt->path,
					b->name);
		if (b->granularity_bits < 12 || b->granularity_bits > 26)
			return bm_error(-ENOTSUP, "%s: bitmap %s has a "
					"granularity of 2^%" PRIu32 " bytes, "
					"not 4 KiB to 64 MiB", cbt->path,
					b->name, b->granularity_bits);
		g = UINT32_C(1) << b->granularity_bits;
		if (*granularity && g != *granularity)
			return bm_error(i ? -ENOTSUP : -ESTALE, "%s: bitmap %s "
					"has a granularity of %" PRIu32
					" bytes, not %" PRIu32, cbt->path,
					b->name, g, *granularity);
		*granularity = g;
	}
	return 0;
}

/* Does the image differ from what the tracker needs to mark in place:
 * the newest fully allocated and auto, flags as the checkpoints say? */
static bool
needs_commit(const struct bm_cbt *cbt, const struct bm_qcow2_bitmap_set *set)
{
	for (uint32_t i = 0; i < set->n; i++) {
		uint32_t want = i + 1 == set->n ? BM_QCOW2_BME_AUTO : 0;

		if (cbt->cp[i].e.flags)
			want |= BM_QCOW2_BME_IN_USE;
		if ((set->b[i].flags & ~BM_QCOW2_BME_EXTRA_COMPAT) != want)
			return true;
	}
	return set->n && !set->allocated[set->n - 1];
}

int
bm_cbt_image_load(struct bm_cbt *cbt, uint32_t granularity)
{
	struct load_check lc = { cbt, granularity, 0 };
	struct bm_qcow2_bitmap_set set = { .check = check_set, .opaque = &lc };
	int r = driver_call(cbt, bm_qcow2_bitmaps_load, &set);

	if (r < 0)
		return r;
	cbt->cluster_size = lc.cluster_size;
	cbt->granularity = lc.granularity ? lc.granularity
					  : BM_CBT_DEFAULT_GRANULARITY;
	cbt->blocks = bm_cbt_blocks(cbt->disk_size, cbt->granularity);
	cbt->bitmap_size = bm_cbt_bitmap_size(cbt->disk_size,
					      cbt->granularity);
	cbt->npages = cbt->bitmap_size / BM_CBT_PAGE;
	for (uint32_t i = 0; i < set.n; i++) {
		struct checkpoint *c = &cbt->cp[i];
		uint64_t added;

		snprintf(c->e.name, sizeof c->e.name, "%s", set.b[i].name);
		c->e.id = i + 1;   /* the image keeps no ids: positions */
		if (set.b[i].flags & BM_QCOW2_BME_IN_USE)
			c->e.flags |= BM_CBT_STALE;
		if (!set.consistent)
			c->e.flags |= BM_CBT_UNKEPT;
		if (bm_bitmap_init(&c->bits, cbt->disk_size,
				   cbt->granularity) < 0) {
			r = bm_error(-ENOMEM, "%s: out of memory", cbt->path);
			goto out;
		}
		cbt->count = i + 1;
		added = bm_cbt_bits_decode(set.data[i], cbt->blocks, 0,
					   cbt->npages, c->bits.words);
		if (added == UINT64_MAX) {
			c->e.flags |= BM_CBT_DAMAGED;
			bm_warn("%s: bitmap %s marks blocks past the end of "
				"the disk: not trusted", cbt->path,
				c->e.name);
		} else {
			c->bits.count = added;
		}
	}
	cbt->next_id = set.n + 1;
	cbt->last = set.last;
	set.last = NULL;
out:
	if (r == 0 && needs_commit(cbt, &set)) {
		bm_qcow2_bitmap_set_free(&set);
		return 1;
	}
	bm_qcow2_bitmap_set_free(&set);
	return r;
}
