/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Snapshots: a point-in-time view of a running disk, by copy-before-write
 * (docs/snapshot.md).  This file is the filter and the calls that take,
 * query and release a snapshot; the view is snapshot-view.c.
 *
 * A snapshot is two images.  Its filter stands on the disk's stack, on
 * top when it is taken (bm_disk_swap_image), over whatever was there: the
 * base image, or a move's mirror filter; a move started later goes under
 * it, so its pivot changes what the filter stands over and nothing else.
 * Its view is the frozen disk, read through bm_disk_aio_to so it counts
 * and queues like the guest's requests.
 *
 * The rules, each per chunk of `granularity` bytes:
 *
 *  1. The instant: the disk is quiesced with nothing in flight when the
 *     filter goes on, so every guest write either completed before (and
 *     is in the view) or passes through the filter (and is not).
 *  2. A chunk is NEEDED until its old data is in the scratch image (at
 *     the same offset).  A guest write or write-zeroes that touches a
 *     NEEDED chunk waits; the filter copies the chunk from the image
 *     below to the scratch (a CBW, BUSY while it runs) and clears NEEDED,
 *     then lets the write on.  So what is below a NEEDED chunk is what it
 *     held at the instant.  A discard is not forwarded over NEEDED chunks
 *     at all: it completes for them without touching them (what a discard
 *     leaves is unspecified, and the old data is a valid outcome), and
 *     goes on over the rest, so a guest's fstrim copies nothing.
 *  3. The view reads a chunk from the scratch once it is not NEEDED, and
 *     from below while it is.  A read of below PINS its range: a guest
 *     write into a pinned range waits for the pin to go even when its
 *     chunks are saved, so no read of below ever runs beside a write that
 *     would change what it returns (snapshot-view.c).
 *  4. The guest before the snapshot: a CBW that fails, a scratch that is
 *     full (max_scratch) or a guest write that has waited timeout_ms
 *     BREAKS the snapshot: every waiting write goes on at once, later ones
 *     pass straight through, and the view fails every read with -EIO and
 *     the reason.  A view read that completes after the break fails too,
 *     even if it may have read the right bytes.
 *  5. A chunk is GONE when the view no longer holds it: it is neither
 *     NEEDED nor saved, and a view read or block status that touches it
 *     fails with -ENODATA.  A snapshot taken CHANGED_ONLY starts with
 *     every chunk GONE but those the `since` record marks (which start
 *     NEEDED); blockmirror_snapshot_drop makes the chunks it covers GONE
 *     (and not NEEDED: a guest write waiting only for them goes on).
 *
 * A write that cannot go yet waits in a FIFO; new writes queue behind it
 * whatever their range, and each retry lets go, in FIFO order, every
 * waiting write that may go then: a write may pass an earlier one that
 * still waits for other chunks (the guest orders overlapping writes by
 * waiting for their completion, never by submission).
 *
 * A hold (blockmirror_snapshot_hold) is phase 1 of a one-disk take
 * kept open under a lease, for a group whose disks are in several
 * processes: the caller holds every disk before it takes any, and the
 * lease's timer on the disk's loop lets the guest go on by itself if the
 * take does not come in time.
 *
 * Threads: a snapshot is made (snap_new: its bitmaps, its scratch image
 * on a private loop) on the caller's thread, before it is on any stack;
 * from the moment call_push puts its filter on, everything runs on the
 * disk's loop, and the public calls cross over through bm_disk_call.
 * Taking, releasing and checkpoints are the disk's control call, one at
 * a time (bm_disk_control_begin): the others queue.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "bitmap.h"
#include "cbt.h"
#include "checkpoint.h"
#include "disk.h"
#include "errors.h"
#include "image.h"
#include "internal.h"
#include "nbd.h"
#include "snapshot-int.h"
#include "snapshot.h"

#define CBW_MAX_BYTES (1024 * BM_KiB)
#define CBW_MAX_INFLIGHT 16
#define DEFAULT_GRANULARITY (64 * BM_KiB)
#define DEFAULT_TIMEOUT_MS 1000
#define GROUP_DRAIN_MS 10000   /* a group take waits this long for a disk */

/* A copy-before-write in flight. */
struct cbw {
	struct bm_io io;
	struct blockmirror_snapshot *snap;
	void *buf;
	bool dropped;                 /* GONE before its read ended: not
					 saved, not counted */
};

static inline struct blockmirror_snapshot *
filter_snap(struct bm_image *img)
{
	return bm_container_of(img, struct blockmirror_snapshot, filter);
}

/* ---- rule 4: breaking ------------------------------------------------ */

static void callback_done(struct blockmirror_snapshot *snap);

static void
retry_soon(struct bm_op *op, int res)
{
	struct blockmirror_snapshot *snap =
		bm_container_of(op, struct blockmirror_snapshot, retry_op);

	bm_snapshot_retry_waiting(snap);
	callback_done(snap);
}

static void __attribute__((format(printf, 3, 4)))
snap_break(struct blockmirror_snapshot *snap, int err, const char *fmt, ...)
{
	va_list ap;

	if (snap->state != BLOCKMIRROR_SNAPSHOT_ACTIVE)
		return;
	snap->state = BLOCKMIRROR_SNAPSHOT_BROKEN;
	snap->error = err < 0 ? -err : EIO;
	va_start(ap, fmt);
	vsnprintf(snap->reason, sizeof snap->reason, fmt, ap);
	va_end(ap);
	bm_warn("%s: broken, the guest goes on: %s", snap->name,
		snap->reason);
	if (snap->on_event) {
		struct blockmirror_event ev = {
			.type = BLOCKMIRROR_EVENT_SNAPSHOT_BROKEN,
			.err = snap->error, .message = snap->reason,
		};

		snap->on_event(snap->event_data, &ev);
	}
	/* Copies still running are of no use now; a hung scratch must not
	 * keep them (they hold the disk's drain) for its own timeout. */
	if (snap->cbw_inflight && snap->scratch &&
	    snap->scratch->store->ops->cancel)
		snap->scratch->store->ops->cancel(snap->scratch->store);
	/* The waiting writes go on from the loop, never from inside a
	 * caller that may be walking the list. */
	snap->callbacks_pending++;
	bm_loop_defer(snap->disk->loop, &snap->retry_op, retry_soon, 0);
}

static void release_idle(struct bm_call *call);

/* The release waits for the last callback into us. */
static void
callback_done(struct blockmirror_snapshot *snap)
{
	struct bm_call *call = snap->release_call;

	if (--snap->callbacks_pending == 0 && call) {
		snap->release_call = NULL;
		release_idle(call);
	}
}

/* ---- rule 2: copy before write --------------------------------------- */

static void
cbw_end(struct cbw *c, int err)
{
	struct blockmirror_snapshot *snap = c->snap;

	bm_bitmap_clear_range(&snap->busy, c->io.offset, c->io.length);
	if (!err) {
		bm_bitmap_clear_range(&snap->needed, c->io.offset,
				      c->io.length);
		snap->cbw_count += !c->dropped;
	}
	snap->cbw_inflight--;
	free(c->buf);
	free(c);
	bm_snapshot_retry_waiting(snap);
	callback_done(snap);
	bm_disk_unhold(snap->disk);
}

static void
cbw_written(struct bm_io *io, int err)
{
	struct cbw *c = bm_container_of(io, struct cbw, io);
	struct blockmirror_snapshot *snap = c->snap;

	if (err < 0)
		snap_break(snap, err, "writing old data at %" PRIu64 " to the "
			   "scratch image %s: %s", io->offset,
			   snap->scratch->name, strerror(-err));
	else
		snap->bytes_saved += io->length;
	cbw_end(c, err);
}

static void
cbw_read(struct bm_io *io, int err)
{
	struct cbw *c = bm_container_of(io, struct cbw, io);
	struct blockmirror_snapshot *snap = c->snap;

	if (err < 0) {
		snap_break(snap, err, "reading old data at %" PRIu64 ": %s",
			   io->offset, strerror(-err));
		cbw_end(c, err);
		return;
	}
	if (!bm_snapshot_ok(snap)) {
		cbw_end(c, -ECANCELED);
		return;
	}
	/* Dropped while it read (rule 5): no one will read it. */
	if (bm_bitmap_test_all(&snap->gone, io->offset, io->length)) {
		c->dropped = true;
		cbw_end(c, 0);
		return;
	}
	/* A scratch of ours reads as zeroes where it was never written,
	 * and a chunk is written there at most once. */
	if (snap->scratch_ours && bm_is_zero(c->buf, io->length)) {
		cbw_end(c, 0);
		return;
	}
	if (snap->max_scratch &&
	    snap->bytes_saved + io->length > snap->max_scratch) {
		snap_break(snap, -ENOSPC, "the scratch image is full "
			   "(max_scratch %" PRIu64 " bytes)", snap->max_scratch);
		cbw_end(c, -ENOSPC);
		return;
	}
	io->done = cbw_written;
	io->flags = 0;
	bm_image_write(snap->scratch, io);
}

static int
cbw_start(struct blockmirror_snapshot *snap, uint64_t offset,
	  uint64_t length)
{
	struct cbw *c = calloc(1, sizeof *c);
	/* Read from below, written to the scratch: O_DIRECT either side. */
	uint32_t align = BM_MAX(snap->align, snap->filter.below->align);

	if (!c || posix_memalign(&c->buf, align, length)) {
		free(c);
		snap_break(snap, -ENOMEM, "out of memory for copy-before-"
			   "write");
		return -ENOMEM;
	}
	c->snap = snap;
	c->io.offset = offset;
	c->io.length = length;
	c->io.buf = c->buf;
	c->io.done = cbw_read;
	bm_bitmap_set_range(&snap->busy, offset, length);
	snap->cbw_inflight++;
	snap->callbacks_pending++;
	/* A copy outlives its guest write once the snapshot breaks: the
	 * disk's drain (a pivot, a close) waits for it all the same. */
	bm_disk_hold(snap->disk);
	bm_image_read(snap->filter.below, &c->io);
	return 0;
}

/*
 * May a guest write to [offset, offset + length) go on now?  If not,
 * start the copies it waits for (as many as the limit allows; the rest
 * start when those end).
 */
static bool
write_may_go(struct blockmirror_snapshot *snap, uint64_t offset,
	     uint64_t length)
{
	uint64_t g = snap->granularity, end = offset + length;
	uint64_t pos = bm_round_down(offset, g), run_off, run_len;
	bool ready = true;

	if (!bm_snapshot_ok(snap))
		return true;
	while (pos < end && bm_bitmap_next_dirty(&snap->needed, pos, 0,
						 &run_off, &run_len) &&
	       run_off < end) {
		uint64_t stop = BM_MIN(run_off + run_len, bm_round_up(end, g));

		ready = false;
		pos = run_off;
		while (pos < stop && snap->cbw_inflight < CBW_MAX_INFLIGHT) {
			uint64_t n = 0;

			while (pos < stop && bm_bitmap_test(&snap->busy, pos))
				pos += g;
			while (pos + n < stop && n < CBW_MAX_BYTES &&
			       !bm_bitmap_test(&snap->busy, pos + n))
				n += g;
			n = BM_MIN(n, snap->filter.size - pos);
			if (!n)
				break;
			if (cbw_start(snap, pos, n) < 0)
				return true; /* broken: go on */
			pos += n;
		}
		if (snap->cbw_inflight >= CBW_MAX_INFLIGHT)
			break;
		pos = stop;
	}
	return ready && !bm_snapshot_pinned(snap, offset, length);
}

static void
forward(struct blockmirror_snapshot *snap, struct bm_io *io,
	enum bm_req_type type)
{
	struct bm_image *below = snap->filter.below;

	if (type == BM_REQ_WRITE)
		bm_image_write(below, io);
	else if (type == BM_REQ_ZERO)
		bm_image_zero(below, io);
	else
		bm_image_discard(below, io);
}

static void timer_fired(struct bm_op *op, int res);

static void
arm_timer(struct blockmirror_snapshot *snap)
{
	if (snap->timer_armed || !snap->wait_head || !bm_snapshot_ok(snap))
		return;
	snap->timer_armed = true;
	snap->callbacks_pending++;
	bm_loop_timer_start(snap->disk->loop, &snap->timer,
			    BM_MAX(snap->timeout_ns / 4, 1000000u), timer_fired);
}

static void
timer_fired(struct bm_op *op, int res)
{
	struct blockmirror_snapshot *snap =
		bm_container_of(op, struct blockmirror_snapshot, timer.op);
	struct snap_write *w = snap->wait_head;

	snap->timer_armed = false;
	if (res != -ECANCELED && w &&
	    bm_now_ns() - w->since_ns >= snap->timeout_ns)
		snap_break(snap, -ETIMEDOUT, "a guest write waited more than "
			   "%" PRIu64 " ms for its old data to be saved",
			   snap->timeout_ns / 1000000);
	if (res != -ECANCELED)
		arm_timer(snap);
	callback_done(snap);
}

/* Let every waiting write go that may now, in FIFO order. */
void
bm_snapshot_retry_waiting(struct blockmirror_snapshot *snap)
{
	struct snap_write **pp = &snap->wait_head;
	uint64_t now = bm_now_ns();

	while (*pp) {
		struct snap_write *w = *pp;

		if (!write_may_go(snap, w->io->offset, w->io->length)) {
			pp = &w->next;
			continue;
		}
		*pp = w->next;
		if (!*pp)
			snap->wait_tail = pp;
		snap->cbw_max_ns = BM_MAX(snap->cbw_max_ns, now - w->since_ns);
		forward(snap, w->io, w->type);
		free(w);
	}
	snap->wait_tail = pp;
}

static void
filter_write_type(struct bm_image *img, struct bm_io *io,
		  enum bm_req_type type)
{
	struct blockmirror_snapshot *snap = filter_snap(img);
	struct snap_write *w;

	/* Behind any waiting write, so a stream of new writes cannot
	 * starve it (see the top for the order they go in). */
	if (!snap->wait_head && write_may_go(snap, io->offset, io->length)) {
		forward(snap, io, type);
		return;
	}
	w = malloc(sizeof *w);
	if (!w) {
		snap_break(snap, -ENOMEM, "out of memory");
		forward(snap, io, type);
		return;
	}
	w->io = io;
	w->type = type;
	w->since_ns = bm_now_ns();
	w->next = NULL;
	*snap->wait_tail = w;
	snap->wait_tail = &w->next;
	bm_snapshot_retry_waiting(snap);
	arm_timer(snap);
}

static void
filter_write(struct bm_image *img, struct bm_io *io)
{
	filter_write_type(img, io, BM_REQ_WRITE);
}

static void
filter_zero(struct bm_image *img, struct bm_io *io)
{
	filter_write_type(img, io, BM_REQ_ZERO);
}

/* A discard, split: one part for each run of chunks saved already. */
struct discard_op {
	struct blockmirror_snapshot *snap;
	struct bm_io *parent;
	unsigned pending;
	int err;
	struct bm_io part[];
};

static void
discard_part_done(struct bm_io *io, int err)
{
	struct discard_op *op = io->opaque;
	struct bm_io *parent = op->parent;

	if (err < 0 && !op->err)
		op->err = err;
	if (--op->pending)
		return;
	err = op->err;
	free(op);
	parent->done(parent, err);
}

/*
 * Rule 2 for a discard: the NEEDED chunks keep their data (a valid
 * outcome of a discard), so nothing is copied and nothing waits for a
 * copy; the saved runs are discarded (after any pin on them, rule 3).
 * NEEDED chunks only ever become saved, never the reverse, so the split
 * holds while the parts wait.
 */
static void
filter_discard(struct bm_image *img, struct bm_io *io)
{
	struct blockmirror_snapshot *snap = filter_snap(img);
	uint64_t end = io->offset + io->length, pos, e;
	struct discard_op *op;
	unsigned n = 0, i = 0;

	if (!bm_snapshot_ok(snap)) {
		forward(snap, io, BM_REQ_DISCARD);
		return;
	}
	for (pos = io->offset; pos < end; pos = e) {
		e = bm_snapshot_run_end(snap, pos, end);
		n += !bm_bitmap_test(&snap->needed, pos);
	}
	if (!n) {
		bm_snapshot_complete_soon(snap, io, 0);
		return;
	}
	op = calloc(1, sizeof *op + n * sizeof op->part[0]);
	if (!op) {
		/* Copy before the discard instead, as for a write. */
		filter_write_type(img, io, BM_REQ_DISCARD);
		return;
	}
	op->snap = snap;
	op->parent = io;
	op->pending = n;
	for (pos = io->offset; pos < end; pos = e) {
		struct bm_io *part;

		e = bm_snapshot_run_end(snap, pos, end);
		if (bm_bitmap_test(&snap->needed, pos))
			continue;
		part = &op->part[i++];
		part->offset = pos;
		part->length = e - pos;
		part->flags = io->flags;
		part->done = discard_part_done;
		part->opaque = op;
		filter_write_type(img, part, BM_REQ_DISCARD);
	}
}

/* Reads, flushes and block status pass below; the snapshot owns its
 * images. */
static const struct bm_image_ops filter_ops = {
	.read = bm_filter_pass_read,
	.write = filter_write,
	.zero = filter_zero,
	.discard = filter_discard,
	.flush = bm_filter_pass_flush,
	.block_status = bm_filter_pass_block_status,
	.close = bm_filter_no_close,
};

struct blockmirror_disk *
bm_snapshot_disk(struct blockmirror_snapshot *snap)
{
	return snap->disk;
}

const char *
bm_snapshot_since(const struct blockmirror_snapshot *snap)
{
	return snap->has_changed ? snap->since_name : NULL;
}

/* ---- taking ---------------------------------------------------------- */

static void
snap_free(struct blockmirror_snapshot *snap)
{
	if (!snap)
		return;
	if (snap->scratch)
		bm_image_close(snap->scratch);
	if (snap->scratch_path && unlink(snap->scratch_path) < 0)
		bm_warn("%s: could not remove the scratch image: %s",
			snap->scratch_path, strerror(errno));
	bm_bitmap_free(&snap->needed);
	bm_bitmap_free(&snap->gone);
	bm_bitmap_free(&snap->busy);
	bm_bitmap_free(&snap->changed);
	free(snap->scratch_path);
	free(snap->name);
	free(snap);
}

/* Open or create the scratch image on `loop` (a private one). */
static int
open_scratch(struct blockmirror_snapshot *snap, struct bm_loop *loop,
	     const struct blockmirror_snapshot_options *o, uint64_t size,
	     unsigned iflags)
{
	enum blockmirror_format fmt = o->scratch_format;
	int r;

	iflags = (iflags & BM_IMAGE_DIRECT) | BM_IMAGE_WRITE |
		 ((o->flags & BLOCKMIRROR_SNAPSHOT_NOFOLLOW) ?
		  BM_IMAGE_NOFOLLOW : 0);
	if (!o->scratch) {
		const char *dir = o->scratch_dir ? o->scratch_dir
			: getenv("TMPDIR") ? getenv("TMPDIR") : "/var/tmp";
		char *path;
		int fd;

		if (asprintf(&path, "%s/bmirror-scratch-XXXXXX", dir) < 0)
			return bm_error(-ENOMEM, "out of memory");
		fd = mkstemp(path);
		if (fd < 0) {
			r = bm_error(-errno, "%s: cannot make a scratch file: %s",
				     dir, strerror(errno));
			free(path);
			return r;
		}
		close(fd);
		r = bm_image_create(loop, path, BLOCKMIRROR_FORMAT_RAW, size,
				    NULL, true, iflags, &snap->scratch);
		/* Unnamed from here on: gone with the last descriptor. */
		unlink(path);
		free(path);
		snap->scratch_ours = r == 0;
		return r;
	}
	if (o->flags & BLOCKMIRROR_SNAPSHOT_CREATE) {
		if (fmt == BLOCKMIRROR_FORMAT_AUTO)
			fmt = BLOCKMIRROR_FORMAT_RAW;
		r = bm_image_create(loop, o->scratch, fmt, size, NULL, false,
				    iflags, &snap->scratch);
		if (r < 0)
			return r;
		snap->scratch_ours = true;
		if (!bm_nbd_is_uri(o->scratch) &&
		    !(snap->scratch_path = strdup(o->scratch)))
			return bm_error(-ENOMEM, "out of memory");
		return 0;
	}
	r = bm_image_open(loop, o->scratch, fmt, iflags, &snap->scratch);
	if (r < 0)
		return r;
	if (snap->scratch->size < size)
		return bm_error(-EINVAL, "%s: the scratch image holds %" PRIu64
				" bytes, less than the disk's %" PRIu64,
				o->scratch, snap->scratch->size, size);
	return 0;
}

static int
snap_new(struct blockmirror_disk *disk, struct bm_loop *loop,
	 const struct blockmirror_snapshot_options *o,
	 struct blockmirror_snapshot **out)
{
	struct blockmirror_snapshot *snap = calloc(1, sizeof *snap);
	char *image = blockmirror_disk_get_image(disk);
	int r;

	if (!snap || !image ||
	    asprintf(&snap->name, "snapshot of %s", image) < 0) {
		if (snap)
			snap->name = NULL;
		free(image);
		snap_free(snap);
		return bm_error(-ENOMEM, "out of memory");
	}
	free(image);
	snap->disk = disk;
	snap->granularity = o->granularity ? o->granularity
					   : DEFAULT_GRANULARITY;
	snap->timeout_ns = (uint64_t)(o->timeout_ms ? o->timeout_ms
					: DEFAULT_TIMEOUT_MS) * 1000000u;
	snap->max_scratch = o->max_scratch;
	if (o->size >= offsetof(struct blockmirror_snapshot_options,
				event_data) + sizeof o->event_data) {
		snap->on_event = o->on_event;
		snap->event_data = o->event_data;
	}
	snap->wait_tail = &snap->wait_head;
	snap->state = BLOCKMIRROR_SNAPSHOT_ACTIVE;
	snap->since = o->since;
	snap->checkpoint = o->checkpoint;
	snap->changed_only = o->flags & BLOCKMIRROR_SNAPSHOT_CHANGED_ONLY;
	r = bm_bitmap_init(&snap->needed, disk->size, snap->granularity);
	/* Rule 5's bitmap: at once when it starts full, else at the first
	 * drop (call_drop). */
	if (r == 0 && snap->changed_only)
		r = bm_bitmap_init(&snap->gone, disk->size, snap->granularity);
	if (r == 0)
		r = bm_bitmap_init(&snap->busy, disk->size, snap->granularity);
	if (r < 0) {
		snap_free(snap);
		return bm_error(r, "out of memory for the snapshot's bitmaps");
	}
	bm_bitmap_set_all(&snap->needed);
	r = open_scratch(snap, loop, o, disk->size, disk->open_flags);
	if (r < 0) {
		snap_free(snap);
		return r;
	}
	snap->align = BM_MAX(4096u, snap->scratch->align);
	*out = snap;
	return 0;
}

static int
check_options(const struct blockmirror_snapshot_options *o)
{
	uint64_t g;

	if (!o || o->size < offsetof(struct blockmirror_snapshot_options,
				     on_event))
		return bm_error(-EINVAL, "no options, or options of an older "
				"size");
	if (o->flags & ~(BLOCKMIRROR_SNAPSHOT_CREATE |
			 BLOCKMIRROR_SNAPSHOT_NOFOLLOW |
			 BLOCKMIRROR_SNAPSHOT_CHANGED_ONLY))
		return bm_error(-EINVAL, "unknown snapshot flags 0x%x",
				o->flags);
	if ((o->flags & BLOCKMIRROR_SNAPSHOT_CHANGED_ONLY) && !o->since)
		return bm_error(-EINVAL, "CHANGED_ONLY needs a checkpoint to "
				"compare with (since)");
	if ((o->flags & BLOCKMIRROR_SNAPSHOT_CREATE) && !o->scratch)
		return bm_error(-EINVAL, "CREATE needs a scratch image name");
	g = o->granularity;
	if (g && (g & (g - 1) || g < 4 * BM_KiB || g > 1024 * BM_KiB))
		return bm_error(-EINVAL, "granularity %" PRIu64 ": not a power "
				"of two from 4 KiB to 1 MiB", g);
	if (o->scratch_format != BLOCKMIRROR_FORMAT_AUTO &&
	    o->scratch_format != BLOCKMIRROR_FORMAT_RAW &&
	    o->scratch_format != BLOCKMIRROR_FORMAT_QCOW2)
		return bm_error(-EINVAL, "a scratch image is raw or qcow2");
	/* Before any disk stops for them. */
	for (int i = 0; i < 2; i++) {
		const char *name = i ? o->checkpoint : o->since;

		if (name && !bm_cbt_name_ok(name))
			return bm_error(-EINVAL, "bad checkpoint name "
					"\"%.80s\": a name is 1 to 64 of A-Z "
					"a-z 0-9 . _ -", name);
	}
	return 0;
}

/* Where phase 1 of a take is on its disk (call->i; the loop's). */
enum {
	QUIESCE_QUEUED,               /* call_quiesce has not run yet */
	QUIESCE_DRAINING,             /* the disk drains */
	QUIESCE_ABANDONED,            /* the take gave up before its turn */
};

static void hold_arm_lease(struct blockmirror_snapshot_hold *h);

/* Phase 1 ends: the disk stays stopped, and the control call stays the
 * take's, until phase 2.  A hold's (call->arg2) lease starts running in
 * this same callback, so no stall of the caller's thread can leave the
 * disk stopped without it. */
static void
group_drained(struct blockmirror_disk *disk)
{
	struct bm_call *call = disk->control_call;

	if (call->arg2)
		hold_arm_lease(call->arg2);
	bm_waiter_signal(&call->w, 0);
}

static void
quiesce_fail(struct blockmirror_disk *disk, struct bm_call *call, int err)
{
	bm_disk_control_end(disk);
	bm_waiter_signal(&call->w, err);
}

/* Phase 1: the disk stops and drains, and stays stopped. */
static void
call_quiesce(struct bm_call *call)
{
	struct blockmirror_disk *disk = call->arg;
	int r;

	if (!bm_disk_control_begin(disk, call))
		return; /* another call first, or the disk closes */
	if (call->i == QUIESCE_ABANDONED) {
		quiesce_fail(disk, call, bm_error(-ETIMEDOUT, "gave up "
						  "waiting"));
		return;
	}
	r = bm_disk_quiesce(disk, group_drained);
	if (r < 0) {
		quiesce_fail(disk, call, r);
		return;
	}
	call->i = QUIESCE_DRAINING;
}

/*
 * A group take stops waiting for phase 1 (call->arg2) on this disk: if
 * it has not signalled, it ends now, the disk going on, so the take can
 * wait for its signal at once (bm_disk_call_finish).  If it has, the
 * disk is stopped (or refused) as it says.
 */
static void
call_abandon(struct bm_call *call)
{
	struct blockmirror_disk *disk = call->arg;
	struct bm_call *q = call->arg2, **pp;

	if (bm_waiter_done(&q->w)) {
		/* It drained as the take gave up: its result stands. */
	} else if (q->i == QUIESCE_DRAINING) {
		bm_disk_quiesce_cancel(disk, group_drained);
		quiesce_fail(disk, q, -ETIMEDOUT);
	} else if (disk->control_call == q) {
		/* Its turn came and call_quiesce is posted: it ends it. */
		q->i = QUIESCE_ABANDONED;
	} else {
		for (pp = &disk->control_head; *pp != q; pp = &(*pp)->next_control)
			;
		*pp = q->next_control;
		if (!*pp)
			disk->control_tail = pp;
		bm_waiter_signal(&q->w, -ETIMEDOUT);
	}
	bm_waiter_signal(&call->w, 0);
}

/* Phase 1 on one disk of a group, by `deadline` (bm_now_ns); `limit_ms`
 * is what the error says the limit was. */
static int
quiesce_by(struct blockmirror_disk *disk, struct bm_call *call,
	   uint64_t deadline, unsigned limit_ms)
{
	struct bm_call abandon = { .fn = call_abandon, .arg = disk,
				   .arg2 = call };
	uint64_t now = bm_now_ns();
	char *image;
	int r;

	r = bm_disk_call_ms(disk, call, now < deadline
				? (int)((deadline - now) / 1000000u) : 0);
	if (r != -ETIMEDOUT)
		return r;
	r = bm_disk_call(disk, &abandon);
	if (r == 0)
		r = bm_disk_call_finish(disk, call);
	if (r != -ETIMEDOUT)
		return r; /* it drained as we gave up */
	image = blockmirror_disk_get_image(disk);
	r = bm_error(-ETIMEDOUT, "%s: did not drain within %u ms (a guest "
		     "request there does not complete); no snapshot taken, "
		     "the group's other disks go on", image ? image : "a disk",
		     limit_ms);
	free(image);
	return r;
}

/* The end of a take on one disk: it goes on, and the next snapshot or
 * checkpoint call may start. */
static void
push_end(struct blockmirror_disk *disk, struct bm_call *call, int r)
{
	bm_disk_unquiesce(disk);
	bm_disk_control_end(disk);
	bm_waiter_signal(&call->w, r);
}

/* Rule 5 at the instant, for CHANGED_ONLY: the chunks that the record
 * marks (in its own granularity) are NEEDED, every other one is GONE. */
static void
hold_only_changed(struct blockmirror_snapshot *snap)
{
	uint64_t g = snap->granularity, pos = 0, off, len;

	/* The guest waits: one pass over the words where the record's chunks
	 * are the snapshot's, else one step per run of the record. */
	if (bm_bitmap_granularity(&snap->changed) == g &&
	    snap->changed.nbits == snap->needed.nbits) {
		bm_bitmap_assign(&snap->needed, &snap->changed, false);
		bm_bitmap_assign(&snap->gone, &snap->changed, true);
		return;
	}
	bm_bitmap_clear_all(&snap->needed);
	bm_bitmap_set_all(&snap->gone);
	while (bm_bitmap_next_dirty(&snap->changed, pos, 0, &off, &len)) {
		uint64_t start = bm_round_down(off, g);
		uint64_t end = BM_MIN(bm_round_up(off + len, g),
				      snap->disk->size);

		bm_bitmap_set_range(&snap->needed, start, end - start);
		bm_bitmap_clear_range(&snap->gone, start, end - start);
		pos = off + len;
	}
}

/* Phase 2: the filter goes on top (or, with no snapshot, nothing), and
 * the disk goes on. */
static void
call_push(struct bm_call *call)
{
	struct blockmirror_disk *disk = call->arg;
	struct blockmirror_snapshot *snap = call->arg2;

	/* A close that came between the phases has detached the disk's
	 * snapshots already: this one must not go on after them. */
	if (snap && atomic_load(&disk->closing)) {
		push_end(disk, call, bm_error(-ESHUTDOWN, "the disk is "
					      "closing"));
		return;
	}
	/* Refused before the checkpoint is made: nothing to undo. */
	for (struct bm_image *img = bm_disk_base(disk); snap && img;
	     img = bm_image_backing(img)) {
		if (snap->scratch->store == img->store ||
		    !bm_file_same(img->store, snap->scratch->name))
			continue;
		push_end(disk, call, bm_error(-EINVAL, "%s: is an image of the "
					      "disk (%s); a snapshot would "
					      "overwrite it",
					      snap->scratch->name, img->name));
		return;
	}
	if (snap && (snap->since || snap->checkpoint)) {
		int r = bm_checkpoint_at_instant(disk, snap->since,
						 snap->checkpoint,
						 snap->granularity,
						 &snap->changed,
						 &snap->changed_bytes);

		if (r < 0) {
			push_end(disk, call, r);
			return;
		}
		snap->has_changed = snap->since != NULL;
		if (snap->since)
			snprintf(snap->since_name, sizeof snap->since_name,
				 "%s", snap->since);
		if (snap->changed_only)
			hold_only_changed(snap);
	}
	if (snap) {
		struct bm_image *top = disk->image, *f = &snap->filter;
		struct timespec ts;

		bm_image_set_loop(snap->scratch, disk->loop);
		f->ops = &filter_ops;
		f->format = top->format;
		f->name = snap->name;
		f->size = top->size;
		f->cluster_size = top->cluster_size;
		f->align = top->align;
		f->readonly = top->readonly;
		f->zero_init = top->zero_init;
		f->below = top;
		snap->view = *f;
		snap->view.ops = &bm_snapshot_view_ops;
		snap->view.readonly = true;
		snap->view.below = NULL;
		bm_disk_swap_image(disk, top, f);
		snap->on_stack = true;
		snap->next = disk->snapshots;
		disk->snapshots = snap;
		clock_gettime(CLOCK_REALTIME, &ts);
		snap->taken_unix_ns = (int64_t)ts.tv_sec * 1000000000 +
				      ts.tv_nsec;
	}
	push_end(disk, call, 0);
}

BM_EXPORT int
blockmirror_snapshot_take(struct blockmirror_disk **disks, size_t n,
			  const struct blockmirror_snapshot_options *options,
			  struct blockmirror_snapshot **out)
{
	struct bm_call *calls = NULL; /* phase 1's: the control calls */
	struct bm_loop *tmp = NULL;
	size_t i, stopped = 0;
	uint64_t deadline;
	int r;

	bm_error_clear();
	if (!disks || !n || !out)
		return bm_api_fail("blockmirror_snapshot_take",
				   bm_error(-EINVAL, "bad arguments"));
	r = check_options(options);
	if (r < 0)
		return bm_api_fail("blockmirror_snapshot_take", r);
	if (n > 1 && (options->scratch || options->since ||
		      options->checkpoint))
		return bm_api_fail("blockmirror_snapshot_take",
				   bm_error(-EINVAL, "a scratch image or a "
					    "checkpoint named for %zu disks",
					    n));
	memset(out, 0, n * sizeof *out);
	for (i = 0; i < n; i++) {
		if (!disks[i])
			return bm_api_fail("blockmirror_snapshot_take",
				bm_error(-EINVAL, "disks[%zu] is NULL", i));
		for (size_t j = 0; j < i; j++)
			if (disks[i] == disks[j])
				return bm_api_fail("blockmirror_snapshot_take",
					bm_error(-EINVAL, "disks[%zu] and "
						 "disks[%zu] are the same disk",
						 j, i));
	}
	calls = calloc(n, sizeof *calls);
	r = calls ? bm_loop_new(8, &tmp)
		  : bm_error(-ENOMEM, "out of memory");
	for (i = 0; r == 0 && i < n; i++) {
		if (bm_disk_on_loop(disks[i]))
			r = bm_error(-EDEADLK, "called from a disk's loop "
				     "thread");
		else
			r = snap_new(disks[i], tmp, options, &out[i]);
	}
	/* 1. every disk still, nothing in flight; a group within a time
	 * limit, since the disks stopped already stall their guests */
	deadline = bm_now_ns() + GROUP_DRAIN_MS * 1000000ull;
	for (i = 0; r == 0 && i < n; i++) {
		calls[i] = (struct bm_call){ .fn = call_quiesce,
					     .arg = disks[i] };
		r = n == 1 ? bm_disk_call(disks[i], &calls[i])
			   : quiesce_by(disks[i], &calls[i], deadline,
					 GROUP_DRAIN_MS);
		if (r == 0)
			stopped++;
	}
	/* 2. the instant: every filter on, then every disk goes on (a
	 * checkpoint, which may fail, only with one disk) */
	for (i = 0; i < stopped; i++) {
		struct bm_call call = { .fn = call_push, .arg = disks[i],
					.arg2 = r == 0 ? out[i] : NULL };
		int pr = bm_disk_call(disks[i], &call);

		if (r == 0)
			r = pr;
	}
	if (r < 0) {
		for (i = 0; i < n; i++) {
			snap_free(out[i]);
			out[i] = NULL;
		}
	}
	free(calls);
	bm_loop_free(tmp);
	return r < 0 ? bm_api_fail("blockmirror_snapshot_take", r) : 0;
}

/* ---- holding: a group that spans processes (docs/control.md) ---------- */

/*
 * A hold is phase 1 of a take kept open: the disk stopped and drained,
 * its control call the hold's, until blockmirror_snapshot_hold_take does
 * phase 2 or the lease runs out.  The lease is a timer on the disk's own
 * loop, so it fires whatever the holder does (a caller that stalls, a
 * control client that died): the guest is never held past it.
 */
enum hold_state {
	HOLD_HELD,                    /* the disk is stopped for us */
	HOLD_EXPIRED,                 /* the lease ran out: it went on */
	HOLD_DONE,                    /* taken or let go */
};

struct blockmirror_snapshot_hold {
	struct blockmirror_disk *disk;
	struct blockmirror_snapshot *snap; /* made, not on the stack yet */
	struct bm_loop *tmp;          /* the scratch's until the take */
	char *since, *checkpoint;     /* the options' (snap points here) */
	uint32_t lease_ms;
	uint64_t lease_end_ns;        /* bm_now_ns: counted from the hold call */

	/* loop thread only */
	enum hold_state state;
	struct bm_timer lease;
	bool lease_armed;             /* its callback has not run yet */
	struct bm_call *end_call;     /* hold_free: waits for that callback */
	uint64_t held_ns;             /* how long the guest was held */
	uint64_t queued_ns;           /* the longest a guest request waited */
};

/* The guest goes on: the disk's stop and its control call end. */
static void
hold_let_go(struct blockmirror_snapshot_hold *h)
{
	struct blockmirror_disk *disk = h->disk;
	uint64_t now = bm_now_ns();

	h->held_ns = now - disk->quiesce_start_ns;
	h->queued_ns = disk->first_queued_ns ? now - disk->first_queued_ns
					     : 0;
	bm_disk_unquiesce(disk);
	bm_disk_control_end(disk);
}

static void
lease_fired(struct bm_op *op, int res)
{
	struct blockmirror_snapshot_hold *h =
		bm_container_of(op, struct blockmirror_snapshot_hold, lease.op);

	h->lease_armed = false;
	if (res != -ECANCELED && h->state == HOLD_HELD) {
		h->state = HOLD_EXPIRED;
		hold_let_go(h);
		bm_warn("%s: the hold's lease of %" PRIu32 " ms ran out; the "
			"guest goes on", h->snap->name, h->lease_ms);
	}
	if (h->end_call)
		bm_waiter_signal(&h->end_call->w, 0);
}

/* Phase 1 is done (group_drained, on the loop): the lease runs to
 * h->lease_end_ns. */
static void
hold_arm_lease(struct blockmirror_snapshot_hold *h)
{
	uint64_t now = bm_now_ns();

	h->state = HOLD_HELD;
	h->lease_armed = true;
	bm_loop_timer_start(h->disk->loop, &h->lease,
			    h->lease_end_ns > now ? h->lease_end_ns - now : 1,
			    lease_fired);
}

BM_EXPORT int
blockmirror_snapshot_hold(struct blockmirror_disk *disk,
			  const struct blockmirror_snapshot_options *options,
			  uint32_t lease_ms,
			  struct blockmirror_snapshot_hold **out)
{
	struct blockmirror_snapshot_hold *h;
	struct bm_call q = { .fn = call_quiesce, .arg = disk };
	int r;

	bm_error_clear();
	if (!disk || !out || !lease_ms)
		return bm_api_fail("blockmirror_snapshot_hold",
				   bm_error(-EINVAL, "bad arguments"));
	*out = NULL;
	r = check_options(options);
	if (r < 0)
		return bm_api_fail("blockmirror_snapshot_hold", r);
	if (bm_disk_on_loop(disk))
		return bm_api_fail("blockmirror_snapshot_hold",
				   bm_error(-EDEADLK, "called from the disk's "
					    "loop thread"));
	h = calloc(1, sizeof *h);
	if (!h || (options->since && !(h->since = strdup(options->since))) ||
	    (options->checkpoint &&
	     !(h->checkpoint = strdup(options->checkpoint)))) {
		r = bm_error(-ENOMEM, "out of memory");
		goto fail;
	}
	h->disk = disk;
	h->lease_ms = lease_ms;
	h->state = HOLD_DONE;
	/* The scratch is opened before the disk stops: it is not the
	 * guest's wait. */
	r = bm_loop_new(8, &h->tmp);
	if (r == 0)
		r = snap_new(disk, h->tmp, options, &h->snap);
	if (r < 0)
		goto fail;
	h->snap->since = h->since;
	h->snap->checkpoint = h->checkpoint;
	/* The lease counts from here: draining is holding already.  It is
	 * armed on the loop as the drain ends (group_drained). */
	h->lease_end_ns = bm_now_ns() + (uint64_t)lease_ms * 1000000u;
	q.arg2 = h;
	r = quiesce_by(disk, &q, h->lease_end_ns, lease_ms);
	if (r < 0)
		goto fail;
	*out = h;
	return 0;
fail:
	if (h) {
		snap_free(h->snap);
		bm_loop_free(h->tmp);
		free(h->since);
		free(h->checkpoint);
		free(h);
	}
	return bm_api_fail("blockmirror_snapshot_hold", r);
}

/* Phase 2, if the lease has not run out (call_push ends the hold). */
static void
call_hold_take(struct bm_call *call)
{
	struct blockmirror_snapshot_hold *h = call->arg;
	struct blockmirror_disk *disk = h->disk;
	uint64_t now = bm_now_ns();

	if (h->state != HOLD_HELD) {
		bm_waiter_signal(&call->w, bm_error(-ETIMEDOUT, "the hold's "
				 "lease of %" PRIu32 " ms ran out before the "
				 "take; the guest went on, no snapshot taken",
				 h->lease_ms));
		return;
	}
	if (h->lease_armed)
		bm_loop_timer_cancel(disk->loop, &h->lease);
	h->state = HOLD_DONE;
	h->held_ns = now - disk->quiesce_start_ns;
	h->queued_ns = disk->first_queued_ns ? now - disk->first_queued_ns
					     : 0;
	call->arg = disk;
	call->arg2 = h->snap;
	call_push(call);
}

BM_EXPORT int
blockmirror_snapshot_hold_take(struct blockmirror_snapshot_hold *hold,
			       struct blockmirror_snapshot **out)
{
	struct bm_call call = { .fn = call_hold_take };
	int r;

	bm_error_clear();
	if (!hold || !out)
		return bm_api_fail("blockmirror_snapshot_hold_take",
				   bm_error(-EINVAL, "bad arguments"));
	*out = NULL;
	if (!hold->snap)
		return bm_api_fail("blockmirror_snapshot_hold_take",
				   bm_error(-EINVAL, "taken already"));
	call.arg = hold;
	r = bm_disk_call(hold->disk, &call);
	if (r < 0)
		return bm_api_fail("blockmirror_snapshot_hold_take", r);
	*out = hold->snap;
	hold->snap = NULL;
	return 0;
}

/* Let go (if still held), and wait for the lease's callback. */
static void
call_hold_end(struct bm_call *call)
{
	struct blockmirror_snapshot_hold *h = call->arg;

	if (h->state == HOLD_HELD) {
		h->state = HOLD_DONE;
		hold_let_go(h);
	}
	if (!h->lease_armed) {
		bm_waiter_signal(&call->w, 0);
		return;
	}
	h->end_call = call;
	bm_loop_timer_cancel(h->disk->loop, &h->lease);
}

BM_EXPORT void
blockmirror_snapshot_hold_free(struct blockmirror_snapshot_hold *hold)
{
	struct bm_call call = { .fn = call_hold_end };

	if (!hold)
		return;
	call.arg = hold;
	bm_disk_call(hold->disk, &call);
	snap_free(hold->snap);
	bm_loop_free(hold->tmp);
	free(hold->since);
	free(hold->checkpoint);
	free(hold);
}

static void
call_hold_query(struct bm_call *call)
{
	struct blockmirror_snapshot_hold *h = call->arg;
	struct blockmirror_snapshot_hold_info *i = call->arg2;
	uint64_t now = bm_now_ns();

	i->held = h->state == HOLD_HELD;
	i->expired = h->state == HOLD_EXPIRED;
	if (i->held) {
		i->held_us = (now - h->disk->quiesce_start_ns) / 1000;
		i->queued_us = h->disk->first_queued_ns ?
			       (now - h->disk->first_queued_ns) / 1000 : 0;
	} else {
		i->held_us = h->held_ns / 1000;
		i->queued_us = h->queued_ns / 1000;
	}
	bm_waiter_signal(&call->w, 0);
}

BM_EXPORT int
blockmirror_snapshot_hold_query(struct blockmirror_snapshot_hold *hold,
				struct blockmirror_snapshot_hold_info *info)
{
	struct bm_call call = { .fn = call_hold_query };
	int r;

	bm_error_clear();
	if (!hold || !info || info->size < sizeof *info)
		return bm_api_fail("blockmirror_snapshot_hold_query",
				   bm_error(-EINVAL, "bad arguments"));
	call.arg = hold;
	call.arg2 = info;
	r = bm_disk_call(hold->disk, &call);
	return r < 0 ? bm_api_fail("blockmirror_snapshot_hold_query", r) : 0;
}

/* ---- reading, asking ------------------------------------------------- */

/* Rule 5: the whole chunks of the range (arg2: offset, length) go;
 * whatever waits only for them goes on. */
static void
call_drop(struct bm_call *call)
{
	struct blockmirror_snapshot *snap = call->arg;
	const uint64_t *range = call->arg2;
	uint64_t g = snap->granularity, size = snap->needed.size;
	uint64_t start = bm_round_up(range[0], g);
	uint64_t end = range[0] + range[1] >= size
		       ? size : bm_round_down(range[0] + range[1], g);

	if (start < end && !snap->gone.words &&
	    bm_bitmap_init(&snap->gone, size, g) < 0) {
		bm_waiter_signal(&call->w, bm_error(-ENOMEM, "out of memory "
						    "for the snapshot's "
						    "bitmaps"));
		return;
	}
	if (start < end) {
		bm_bitmap_clear_range(&snap->needed, start, end - start);
		bm_bitmap_set_range(&snap->gone, start, end - start);
		if (snap->wait_head)
			bm_snapshot_retry_waiting(snap);
	}
	bm_waiter_signal(&call->w, 0);
}

int
bm_snapshot_drop_behind(struct blockmirror_snapshot *snap, uint64_t *done,
			uint64_t end)
{
	uint64_t from = bm_round_down(*done, snap->granularity);
	int r = blockmirror_snapshot_drop(snap, from, end - from);

	if (r == 0)
		*done = end;
	return r;
}

BM_EXPORT int
blockmirror_snapshot_drop(struct blockmirror_snapshot *snap, uint64_t offset,
			  uint64_t length)
{
	struct bm_call call = { .fn = call_drop };
	uint64_t range[2] = { offset, length };
	int r;

	bm_error_clear();
	if (!snap)
		r = bm_error(-EINVAL, "bad arguments");
	else if (!snap->disk)
		r = bm_error(-ESHUTDOWN, "%s: the disk was closed", snap->name);
	else if (offset > snap->needed.size ||
		 length > snap->needed.size - offset)
		r = bm_error(-EINVAL, "%s: [%" PRIu64 ", +%" PRIu64 ") is "
			     "beyond the end (%" PRIu64 ")", snap->name,
			     offset, length, snap->needed.size);
	else if (bm_disk_on_loop(snap->disk))
		r = bm_error(-EDEADLK, "blocking call from the disk's loop "
			     "thread");
	else {
		call.arg = snap;
		call.arg2 = range;
		r = bm_disk_call(snap->disk, &call);
	}
	return r < 0 ? bm_api_fail("blockmirror_snapshot_drop", r) : 0;
}

BM_EXPORT int
blockmirror_snapshot_changed(struct blockmirror_snapshot *snap,
			     uint64_t *granularity, uint64_t **words,
			     uint64_t *nbits, uint64_t *bytes)
{
	size_t len;

	bm_error_clear();
	if (!snap || !granularity || !words || !nbits || !bytes)
		return bm_api_fail("blockmirror_snapshot_changed",
				   bm_error(-EINVAL, "bad arguments"));
	if (!snap->has_changed)
		return bm_api_fail("blockmirror_snapshot_changed",
				   bm_error(-ENOENT, "%s: taken without a "
					    "checkpoint to compare with",
					    snap->name));
	len = (snap->changed.nbits + 63) / 64 * sizeof (uint64_t);
	*words = malloc(len ? len : 1);
	if (!*words)
		return bm_api_fail("blockmirror_snapshot_changed",
				   bm_error(-ENOMEM, "out of memory"));
	memcpy(*words, snap->changed.words, len);
	*granularity = bm_bitmap_granularity(&snap->changed);
	*nbits = snap->changed.nbits;
	*bytes = snap->changed_bytes;
	return 0;
}

BM_EXPORT int
blockmirror_snapshot_aio_read(struct blockmirror_snapshot *snap, void *buf,
			      size_t count, uint64_t offset,
			      blockmirror_done_fn done, void *user_data)
{
	int r;

	bm_error_clear();
	if (!snap || !buf || !done)
		r = bm_error(-EINVAL, "bad arguments");
	else if (!snap->disk)
		r = bm_error(-ESHUTDOWN, "%s: the disk was closed", snap->name);
	else if (count > (1u << 30))
		r = bm_error(-EINVAL, "request of %zu bytes is too large",
			     count);
	else
		r = bm_disk_aio_to(snap->disk, &snap->view, BM_REQ_READ, buf,
				   count, offset, done, user_data);
	return r < 0 ? bm_api_fail("blockmirror_snapshot_aio_read", r) : 0;
}

static void
read_done(void *user_data, int err)
{
	bm_waiter_signal(user_data, err);
}

BM_EXPORT int
blockmirror_snapshot_read(struct blockmirror_snapshot *snap, void *buf,
			  size_t count, uint64_t offset)
{
	struct bm_waiter w;
	int r;

	if (snap && snap->disk && bm_disk_on_loop(snap->disk))
		return bm_api_fail("blockmirror_snapshot_read",
				   bm_error(-EDEADLK, "blocking call from the "
					    "disk's loop thread"));
	bm_waiter_init(&w);
	r = blockmirror_snapshot_aio_read(snap, buf, count, offset, read_done,
					  &w);
	if (r == 0)
		r = bm_disk_wait(snap->disk, &w);
	bm_waiter_destroy(&w);
	return r < 0 ? bm_api_fail("blockmirror_snapshot_read", r) : 0;
}

static void
fill_info(struct blockmirror_snapshot *snap,
	  struct blockmirror_snapshot_info *info)
{
	memset(info, 0, sizeof *info);
	info->state = snap->state;
	info->size = snap->filter.size;
	info->granularity = snap->granularity;
	info->taken_unix_ns = snap->taken_unix_ns;
	info->bytes_saved = snap->bytes_saved;
	info->cbw_count = snap->cbw_count;
	info->cbw_max_us = snap->cbw_max_ns / 1000;
	info->error = snap->error;
	snprintf(info->reason, sizeof info->reason, "%s", snap->reason);
}

static void
call_query(struct bm_call *call)
{
	fill_info(call->arg2, call->arg);
	bm_waiter_signal(&call->w, 0);
}

BM_EXPORT int
blockmirror_snapshot_query(struct blockmirror_snapshot *snap,
			   struct blockmirror_snapshot_info *info)
{
	struct bm_call call = { .fn = call_query, .arg = info, .arg2 = snap };
	int r = 0;

	bm_error_clear();
	if (!snap || !info)
		r = bm_error(-EINVAL, "bad arguments");
	else if (!snap->disk)
		fill_info(snap, info);
	else
		r = bm_disk_call(snap->disk, &call);
	return r < 0 ? bm_api_fail("blockmirror_snapshot_query", r) : 0;
}

/* ---- letting go ------------------------------------------------------ */

/* Off the stack and the disk's list, the disk quiesced and drained: no
 * guest write waits in the filter (it would be in flight). */
static void
take_off(struct blockmirror_disk *disk, struct blockmirror_snapshot *snap)
{
	struct blockmirror_snapshot **pp = &disk->snapshots;

	bm_disk_swap_image(disk, &snap->filter, snap->filter.below);
	snap->on_stack = false;
	while (*pp != snap)
		pp = &(*pp)->next;
	*pp = snap->next;
	snap->next = NULL;
	if (snap->timer_armed)
		bm_loop_timer_cancel(disk->loop, &snap->timer);
}

/* The last step: the scratch closes (a file of ours goes with its
 * name when the handle is freed). */
static void
release_finish(struct bm_call *call)
{
	struct blockmirror_snapshot *snap = call->arg2;

	bm_image_close(snap->scratch);
	snap->scratch = NULL;
	bm_waiter_signal(&call->w, 0);
}

static void
release_discarded(struct bm_io *io, int err)
{
	struct bm_call *call = io->opaque;
	struct blockmirror_snapshot *snap = call->arg2;

	if (err < 0)
		bm_warn("%s: the scratch image could not be emptied: %s",
			snap->scratch->name, strerror(-err));
	release_finish(call);
}

/* Nothing calls back into the snapshot any more: a scratch we were
 * given is handed back empty. */
static void
release_idle(struct bm_call *call)
{
	struct blockmirror_snapshot *snap = call->arg2;
	struct bm_io *io = &snap->release_io;

	if (snap->scratch_ours) {
		release_finish(call);
		return;
	}
	memset(io, 0, sizeof *io);
	io->length = snap->scratch->size;
	io->done = release_discarded;
	io->opaque = call;
	bm_image_discard(snap->scratch, io);
}

static void
release_drained(struct blockmirror_disk *disk)
{
	struct bm_call *call = disk->control_call;
	struct blockmirror_snapshot *snap = call->arg2;
	struct bm_store *st = snap->scratch->store;

	take_off(disk, snap);
	bm_disk_unquiesce(disk);
	/* The disk's part is done; the scratch's is the snapshot's own. */
	bm_disk_control_end(disk);
	/* Copies still in flight belong to a broken snapshot (a guest write
	 * in flight would have kept the disk from draining): a hung
	 * scratch must not hold the release. */
	if (snap->cbw_inflight && st->ops->cancel)
		st->ops->cancel(st);
	if (snap->callbacks_pending)
		snap->release_call = call; /* callback_done goes on */
	else
		release_idle(call);
}

static void
call_release(struct bm_call *call)
{
	struct blockmirror_disk *disk = call->arg;
	int r;

	/* Closing, the disk takes the filter off itself (detached): the
	 * caller releases the handle once it is closed. */
	if (!bm_disk_control_begin(disk, call))
		return; /* another call first, or the disk closes */
	r = bm_disk_quiesce(disk, release_drained);
	if (r < 0) {
		bm_disk_control_end(disk);
		bm_waiter_signal(&call->w, r);
	}
}

BM_EXPORT int
blockmirror_snapshot_release(struct blockmirror_snapshot *snap)
{
	struct bm_call call = { .fn = call_release, .arg2 = snap };
	int r = 0;

	bm_error_clear();
	if (!snap)
		return 0;
	if (snap->disk) {
		call.arg = snap->disk;
		r = bm_disk_call(snap->disk, &call);
		if (r < 0)
			return bm_api_fail("blockmirror_snapshot_release", r);
	}
	snap_free(snap);
	return 0;
}

void
bm_snapshot_detach_all(struct blockmirror_disk *disk)
{
	struct blockmirror_snapshot *list = NULL;

	while (disk->snapshots) {
		struct blockmirror_snapshot *snap = disk->snapshots;

		take_off(disk, snap);
		snap->state = BLOCKMIRROR_SNAPSHOT_DETACHED;
		snprintf(snap->reason, sizeof snap->reason, "the disk was "
			 "closed");
		snap->next = list;
		list = snap;
	}
	/* Kept for bm_snapshot_disk_closed, off the stack. */
	disk->snapshots = list;
}

void
bm_snapshot_disk_closed(struct blockmirror_disk *disk)
{
	while (disk->snapshots) {
		struct blockmirror_snapshot *snap = disk->snapshots;

		disk->snapshots = snap->next;
		snap->next = NULL;
		bm_image_close(snap->scratch);
		snap->scratch = NULL;
		snap->disk = NULL;
	}
}
