/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * A snapshot's view: the frozen disk, read through bm_disk_aio_to so it
 * counts and queues like the guest's requests (docs/snapshot.md).  This
 * is rule 3 of snapshot.c, where the rules are stated:
 *
 *  3. The view reads a chunk from the scratch once it is not NEEDED, and
 *     from below while it is.  A read of below PINS its range: a guest
 *     write into a pinned range waits for the pin to go even when its
 *     chunks are saved, so no read of below ever runs beside a write that
 *     would change what it returns.
 *
 * One pin per view operation, over all it reads from below (a read: from
 * its first NEEDED chunk to the end of its last; a block status: its
 * whole range), taken when it starts and dropped when it ends, so a read
 * of many runs costs one pin, and dropping it costs O(1) and one retry
 * of the waiting writes.  A view operation that ends after the snapshot
 * broke fails (rule 4), and one that touches a GONE chunk fails at once
 * (rule 5).  Everything runs on the disk's loop.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "errors.h"
#include "extent.h"
#include "snapshot-int.h"
#include "snapshot.h"

/* One read of the scratch or of below, for a part of a view request. */
struct view_sub {
	struct bm_io io;
	struct view_op *op;
};

struct view_op {
	struct blockmirror_snapshot *snap;
	struct bm_io *parent;
	struct snap_pin pin;
	bool pinned;
	unsigned pending;
	int err;
	/* block status: one step at a time */
	uint64_t pos;
	struct view_sub sub[];
};

static inline struct blockmirror_snapshot *
view_snap(struct bm_image *img)
{
	return bm_container_of(img, struct blockmirror_snapshot, view);
}

static void
view_complete_soon(struct bm_op *op, int res)
{
	struct bm_io *io = bm_container_of(op, struct bm_io, op);

	io->done(io, res);
}

void
bm_snapshot_complete_soon(struct blockmirror_snapshot *snap, struct bm_io *io,
			  int res)
{
	bm_loop_defer(snap->disk->loop, &io->op, view_complete_soon, res);
}

/* Rules 4 and 5: a broken snapshot, and chunks the view no longer
 * holds, fail. */
static bool
view_refuse(struct blockmirror_snapshot *snap, struct bm_io *io)
{
	if (!bm_snapshot_ok(snap)) {
		bm_error(-EIO, "%s: broken: %s", snap->name, snap->reason);
		bm_snapshot_complete_soon(snap, io, -EIO);
		return true;
	}
	if (io->length && bm_bitmap_test_range(&snap->gone, io->offset,
					       io->length)) {
		bm_error(-ENODATA, "%s: [%" PRIu64 ", +%" PRIu64 ") is not "
			 "held: %s", snap->name, io->offset, io->length,
			 snap->changed_only ? "the snapshot holds only what "
			 "changed, less what was dropped" : "it was dropped");
		bm_snapshot_complete_soon(snap, io, -ENODATA);
		return true;
	}
	return false;
}

bool
bm_snapshot_pinned(const struct blockmirror_snapshot *snap, uint64_t offset,
		   uint64_t length)
{
	for (const struct snap_pin *p = snap->pins; p; p = p->next)
		if (offset < p->offset + p->length &&
		    p->offset < offset + length)
			return true;
	return false;
}

static void
pin_add(struct view_op *op, uint64_t offset, uint64_t length)
{
	struct blockmirror_snapshot *snap = op->snap;
	struct snap_pin *p = &op->pin;

	p->offset = offset;
	p->length = length;
	p->prev = NULL;
	p->next = snap->pins;
	if (snap->pins)
		snap->pins->prev = p;
	snap->pins = p;
	op->pinned = true;
}

/* The op's reads of below are over: writes waiting for them may go. */
static void
pin_remove(struct view_op *op)
{
	struct blockmirror_snapshot *snap = op->snap;
	struct snap_pin *p = &op->pin;

	if (!op->pinned)
		return;
	if (p->prev)
		p->prev->next = p->next;
	else
		snap->pins = p->next;
	if (p->next)
		p->next->prev = p->prev;
	op->pinned = false;
	if (snap->wait_head)
		bm_snapshot_retry_waiting(snap);
}

/* ---- read ------------------------------------------------------------ */

static void
view_read_done(struct bm_io *io, int err)
{
	struct view_sub *s = bm_container_of(io, struct view_sub, io);
	struct view_op *op = s->op;
	struct blockmirror_snapshot *snap = op->snap;

	if (err < 0 && !op->err)
		op->err = err;
	if (--op->pending)
		return;
	pin_remove(op);
	if (!op->err && !bm_snapshot_ok(snap)) {
		bm_error(-EIO, "%s: broken while reading: %s", snap->name,
			 snap->reason);
		op->err = -EIO;
	}
	op->parent->done(op->parent, op->err);
	free(op);
}

static void
view_read(struct bm_image *img, struct bm_io *io)
{
	struct blockmirror_snapshot *snap = view_snap(img);
	uint64_t end = io->offset + io->length, pos;
	uint64_t pin_start = UINT64_MAX, pin_end = 0;
	unsigned n = 0, i = 0;
	struct view_op *op;

	if (view_refuse(snap, io))
		return;
	for (pos = io->offset; pos < end; n++) {
		uint64_t e = bm_snapshot_run_end(snap, pos, end);

		if (bm_bitmap_test(&snap->needed, pos)) {
			pin_start = BM_MIN(pin_start, pos);
			pin_end = e;
		}
		pos = e;
	}
	if (!n) {
		bm_snapshot_complete_soon(snap, io, 0);
		return;
	}
	op = calloc(1, sizeof *op + n * sizeof op->sub[0]);
	if (!op) {
		bm_snapshot_complete_soon(snap, io, -ENOMEM);
		return;
	}
	op->snap = snap;
	op->parent = io;
	op->pending = n;
	if (pin_end)
		pin_add(op, pin_start, pin_end - pin_start);
	for (pos = io->offset; pos < end; i++) {
		uint64_t e = bm_snapshot_run_end(snap, pos, end);
		struct view_sub *s = &op->sub[i];
		bool needed = bm_bitmap_test(&snap->needed, pos);

		s->op = op;
		s->io.offset = pos;
		s->io.length = e - pos;
		s->io.buf = (char *)io->buf + (pos - io->offset);
		s->io.done = view_read_done;
		bm_image_read(needed ? snap->filter.below : snap->scratch,
			      &s->io);
		pos = e;
	}
}

/* ---- block status ---------------------------------------------------- */

static void view_status_step(struct view_op *op);

static void
view_status_done(struct bm_io *io, int err)
{
	struct view_sub *s = bm_container_of(io, struct view_sub, io);
	struct view_op *op = s->op;
	struct bm_extent_list *l = op->parent->extents;
	uint64_t got = bm_extent_list_end(l);

	if (err < 0) {
		op->err = err;
		op->pos = op->parent->offset + op->parent->length;
	} else {
		op->pos = got > s->io.offset ? got : s->io.offset + s->io.length;
	}
	view_status_step(op);
}

/* Saved runs read as data (the scratch holds them); the rest is what
 * below says, asked one run at a time under the op's pin. */
static void
view_status_step(struct view_op *op)
{
	struct blockmirror_snapshot *snap = op->snap;
	struct bm_io *parent = op->parent;
	uint64_t end = parent->offset + parent->length;
	struct view_sub *s = &op->sub[0];

	while (op->pos < end && !op->err) {
		uint64_t e = bm_snapshot_run_end(snap, op->pos, end);

		/* Dropped since the request began (rule 5). */
		if (bm_bitmap_test_range(&snap->gone, op->pos, e - op->pos)) {
			op->err = bm_error(-ENODATA, "%s: dropped while its "
					   "block status was asked",
					   snap->name);
			break;
		}
		if (!bm_bitmap_test(&snap->needed, op->pos)) {
			op->err = bm_extent_list_append(parent->extents,
							op->pos, e - op->pos,
							0);
			op->pos = e;
			continue;
		}
		memset(s, 0, sizeof *s);
		s->op = op;
		s->io.offset = op->pos;
		s->io.length = e - op->pos;
		s->io.extents = parent->extents;
		s->io.done = view_status_done;
		bm_image_block_status(snap->filter.below, &s->io);
		return;
	}
	pin_remove(op);
	if (!op->err && !bm_snapshot_ok(snap))
		op->err = -EIO;
	/* Never inline with the request (a saved range asks nobody). */
	bm_snapshot_complete_soon(snap, parent, op->err);
	free(op);
}

static void
view_block_status(struct bm_image *img, struct bm_io *io)
{
	struct blockmirror_snapshot *snap = view_snap(img);
	struct view_op *op;

	if (view_refuse(snap, io))
		return;
	op = calloc(1, sizeof *op + sizeof op->sub[0]);
	if (!op) {
		bm_snapshot_complete_soon(snap, io, -ENOMEM);
		return;
	}
	op->snap = snap;
	op->parent = io;
	op->pos = io->offset;
	pin_add(op, io->offset, io->length);
	view_status_step(op);
}

/* ---- the rest of an image -------------------------------------------- */

static void
view_no_write(struct bm_image *img, struct bm_io *io)
{
	bm_snapshot_complete_soon(view_snap(img), io, -EROFS);
}

static void
view_flush(struct bm_image *img, struct bm_io *io)
{
	bm_snapshot_complete_soon(view_snap(img), io, 0);
}

static void
view_close(struct bm_image *img)
{
	/* The snapshot owns its images. */
}

const struct bm_image_ops bm_snapshot_view_ops = {
	.read = view_read,
	.write = view_no_write,
	.zero = view_no_write,
	.discard = view_no_write,
	.flush = view_flush,
	.block_status = view_block_status,
	.close = view_close,
};

struct bm_image *
bm_snapshot_view(struct blockmirror_snapshot *snap)
{
	return &snap->view;
}

static void
extents_done(void *user_data, int err)
{
	bm_waiter_signal(user_data, err);
}

int
bm_snapshot_extents(struct blockmirror_disk *disk,
		    struct blockmirror_snapshot *snap, uint64_t off,
		    uint64_t len, struct bm_extent_list *l)
{
	struct bm_waiter w;
	int r;

	bm_waiter_init(&w);
	r = bm_disk_aio_to(disk, bm_snapshot_view(snap), BM_REQ_BLOCK_STATUS,
			   l, len, off, extents_done, &w);
	if (r == 0)
		r = bm_disk_wait(disk, &w);
	bm_waiter_destroy(&w);
	return r;
}
