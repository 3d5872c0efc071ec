/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The offline copy (offline-copy.h): one image's guest data into a new
 * image, on the event loop of whichever thread runs it.
 *
 * The copy feeds the copier (copy.c) from the source's extent map, read
 * in windows of WINDOW bytes as the copy advances (nbdcopy found that
 * mapping a whole large image up front behaves badly with slow sources),
 * and then makes the destination durable: fdatasync of the file and, for
 * a file this copy created, fsync of its directory.  A failed or
 * cancelled copy removes the destination it created, so a half-written
 * image is never left looking like a finished one.
 *
 * An NBD URI as the destination is an existing export, written in place:
 * no existence check, nothing to remove on failure, an NBD flush instead
 * of fdatasync and no directory to sync.
 *
 * Steering never blocks the loop.  The speed limit is rate.h's limiter,
 * the mirror job's: a data range that would exceed it is not taken, and
 * the timer takes the copy up again when the limit allows.  A pause
 * takes no new range (those in flight finish).  A cancel takes no new
 * range either and ends the copy with -ECANCELED once nothing is in
 * flight; requests a hung store still holds after CANCEL_GRACE_NS are
 * cancelled on it, so a cancel always ends.  `finished` (what the run
 * waits for) is true only with no range, no extent lookup and no timer
 * in flight.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "disk.h"
#include "durable.h"
#include "errors.h"
#include "internal.h"
#include "nbd.h"
#include "offline-copy.h"

#define WINDOW (UINT64_C(1) << 30)
#define MAX_ZERO_RANGE (UINT64_C(1) << 30)
#define PROGRESS_INTERVAL_NS 50000000
#define PACE_UNIT (64 * BM_KiB)        /* smallest data range when paced */
#define CANCEL_GRACE_NS 1000000000u    /* then cancel requests in flight */
#define CANCEL_POLL_NS 100000000u

static void map_next_window(struct bm_offline_copy *oc);

static bool
copy_busy(const struct bm_offline_copy *oc)
{
	return oc->c.inflight || oc->mapping;
}

static void
set_paused(struct bm_offline_copy *oc, bool paused)
{
	if (paused == oc->paused)
		return;
	/* Paused with nothing in flight, the loop still has to wait: for
	 * the resume or the cancel that the handle posts. */
	if (paused)
		bm_loop_hold(oc->loop);
	else
		bm_loop_unhold(oc->loop);
	oc->paused = paused;
}

static void
check_finished(struct bm_offline_copy *oc)
{
	bool all = oc->err || oc->done_bytes == oc->size;

	if (oc->finished || !all || copy_busy(oc))
		return;
	if (oc->timer.armed) {
		/* Done only once the timer's callback has run. */
		if (!oc->timer_cancelling) {
			oc->timer_cancelling = true;
			bm_loop_timer_cancel(oc->loop, &oc->timer);
		}
		return;
	}
	set_paused(oc, false);
	oc->finished = true;
}

/*
 * The timer: the speed limit allows more again; or, after a cancel,
 * requests are still in flight, and those that are after CANCEL_GRACE_NS
 * are cancelled (a hung NBD export must not hold a cancel for ever).
 */
static void
timer_fired(struct bm_op *op, int res)
{
	struct bm_offline_copy *oc =
		bm_container_of(op, struct bm_offline_copy, timer.op);

	oc->timer.armed = false;
	oc->timer_cancelling = false;
	if (oc->finished)
		return;
	if (oc->cancelled) {
		if (copy_busy(oc) && !oc->stores_cancelled &&
		    bm_now_ns() - oc->cancel_ns >= CANCEL_GRACE_NS) {
			struct bm_store *st[2] = { oc->in->store,
						   oc->out->store };

			oc->stores_cancelled = true;
			for (int i = 0; i < 2; i++)
				if (st[i]->ops->cancel)
					st[i]->ops->cancel(st[i]);
		}
		if (copy_busy(oc) && !oc->stores_cancelled)
			bm_loop_timer_start(oc->loop, &oc->timer,
					    CANCEL_POLL_NS, timer_fired);
	} else {
		bm_copier_pump(&oc->c);
	}
	check_finished(oc);
}

static void
map_done(struct bm_io *io, int err)
{
	struct bm_offline_copy *oc = io->opaque;

	oc->mapping = false;
	if (err < 0) {
		if (!oc->err)
			oc->err = err;
		check_finished(oc);
		return;
	}
	oc->mapped_end = io->offset + io->length;
	bm_copier_pump(&oc->c);
	check_finished(oc);
}

static void
map_next_window(struct bm_offline_copy *oc)
{
	bm_extent_list_reset(&oc->map);
	oc->map_index = 0;
	oc->map_io.offset = oc->mapped_end;
	oc->map_io.length = BM_MIN(WINDOW, oc->size - oc->mapped_end);
	oc->map_io.extents = &oc->map;
	oc->map_io.done = map_done;
	oc->map_io.opaque = oc;
	oc->mapping = true;
	bm_image_block_status(oc->c.src, &oc->map_io);
}

/* May a data range go now?  Under the speed limit, or wait for the timer. */
static bool
pace(struct bm_offline_copy *oc)
{
	uint64_t now;

	if (!oc->rate.speed)
		return true;
	now = bm_now_ns();
	bm_rate_roll(&oc->rate, now);
	if (bm_rate_allows(&oc->rate, now))
		return true;
	if (!oc->timer.armed)
		bm_loop_timer_start(oc->loop, &oc->timer,
				    bm_rate_delay_ns(&oc->rate, now),
				    timer_fired);
	return false;
}

static bool
copy_next(struct bm_copier *c, struct bm_copy_range *r)
{
	struct bm_offline_copy *oc = c->opaque;

	while (!oc->err && !oc->paused) {
		struct bm_extent *e;
		uint64_t end, max;

		if (oc->map_index >= oc->map.len) {
			if (!oc->mapping && oc->mapped_end < oc->size)
				map_next_window(oc);
			return false;
		}
		e = &oc->map.v[oc->map_index];
		if (oc->map_pos < e->offset)
			oc->map_pos = e->offset;
		end = e->offset + e->length;
		if (oc->map_pos >= end) {
			oc->map_index++;
			continue;
		}
		if (e->flags & BM_EXTENT_ZERO) {
			r->kind = (e->flags & BM_EXTENT_HOLE) ? BM_COPY_HOLE
							       : BM_COPY_ZERO;
			max = MAX_ZERO_RANGE;
		} else {
			if (!pace(oc))
				return false;
			r->kind = BM_COPY_DATA;
			max = bm_rate_request_max(&oc->rate, c->request_size,
						  PACE_UNIT);
		}
		r->offset = oc->map_pos;
		r->length = BM_MIN(end - oc->map_pos, max);
		r->tag = NULL;
		oc->map_pos += r->length;
		if (r->kind == BM_COPY_DATA)
			bm_rate_account(&oc->rate, r->length);
		return true;
	}
	return false;
}

static void
copy_done(struct bm_copier *c, const struct bm_copy_range *r, int err)
{
	struct bm_offline_copy *oc = c->opaque;
	uint64_t t;

	if (err < 0) {
		if (!oc->err)
			oc->err = err;
		bm_copier_stop(c);
	} else {
		oc->done_bytes += r->length;
	}
	if (oc->progress && !oc->err) {
		t = bm_now_ns();
		if (t - oc->last_progress_ns >= PROGRESS_INTERVAL_NS) {
			oc->last_progress_ns = t;
			oc->progress(oc->progress_data, oc->done_bytes,
				     oc->size);
		}
	}
	check_finished(oc);
}

static const struct bm_copier_ops offline_copier_ops = {
	.next = copy_next,
	.done = copy_done,
};

static int
run_copy(struct bm_offline_copy *oc)
{
	struct bm_copier *c = &oc->c;
	int r;

	r = bm_copier_init(c);
	if (r < 0)
		return r;
	if (oc->size == 0) {
		oc->finished = true;
	} else {
		map_next_window(oc);
		r = bm_loop_run_until(oc->loop, &oc->finished);
	}
	bm_copier_fini(c);
	bm_extent_list_free(&oc->map);
	if (r < 0)
		return r;
	return oc->err;
}

static bool
same_file(const char *a, const char *b)
{
	struct stat sa, sb;

	return stat(a, &sa) == 0 && stat(b, &sb) == 0 &&
	       sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

int
bm_offline_copy_open(struct bm_offline_copy *oc, const char *src,
		     const char *dst,
		     const struct blockmirror_copy_options *options)
{
	enum blockmirror_format dst_format;
	/* A bulk copy: NBD exports get several connections where the
	 * server allows (store.h). */
	unsigned flags, src_iflags = BM_IMAGE_MULTI_CONN,
		 dst_iflags = BM_IMAGE_DIRECT | BM_IMAGE_MULTI_CONN;
	const char *dst_options = NULL;
	char *dst_options_full = NULL;
	bool dst_uri;
	int r;

	oc->t0 = bm_now_ns();
	if (!src || !dst ||
	    !BM_SIZE_COVERS(options, struct blockmirror_copy_options,
			    progress_data))
		return bm_error(-EINVAL, "bad arguments");
	flags = options->flags;
	if ((flags & BLOCKMIRROR_COPY_DIRECT) &&
	    (flags & BLOCKMIRROR_COPY_DST_CACHED))
		return bm_error(-EINVAL, "O_DIRECT on both sides and a cached "
				"destination: pick one");
	if (flags & (BLOCKMIRROR_COPY_DIRECT | BLOCKMIRROR_COPY_SRC_DIRECT))
		src_iflags |= BM_IMAGE_DIRECT;
	if (flags & BLOCKMIRROR_COPY_DST_CACHED)
		dst_iflags &= ~BM_IMAGE_DIRECT;
	dst_uri = bm_nbd_is_uri(dst);
	if (strcmp(src, dst) == 0 ||
	    (!dst_uri && !bm_nbd_is_uri(src) && same_file(src, dst)))
		return bm_error(-EINVAL, "%s and %s are the same file", src,
				dst);
	oc->dst = strdup(dst);
	if (!oc->dst)
		return bm_error(-ENOMEM, "out of memory");
	r = bm_loop_new(256, &oc->loop);
	if (r < 0)
		return r;
	r = bm_image_open(oc->loop, src, options->src_format, src_iflags,
			  &oc->in);
	if (r < 0)
		return r;
	dst_format = options->dst_format ? options->dst_format
					 : oc->in->format;
	if (!dst_uri && access(dst, F_OK) == 0 &&
	    !(flags & BLOCKMIRROR_COPY_OVERWRITE))
		return bm_error(-EEXIST, "%s: already exists (overwrite it "
				"explicitly to replace it)", dst);
	if (BM_SIZE_COVERS(options, struct blockmirror_copy_options,
			   dst_options))
		dst_options = options->dst_options;
	r = bm_image_create_options(oc->in, dst_format, dst_options,
				    &dst_options_full);
	if (r < 0)
		return r;
	r = bm_image_create(oc->loop, dst, dst_format, oc->in->size,
			    dst_options_full,
			    flags & BLOCKMIRROR_COPY_OVERWRITE, dst_iflags,
			    &oc->out);
	free(dst_options_full);
	if (r < 0)
		return r;
	oc->created = !dst_uri && !oc->out->store->block_device;

	oc->size = oc->in->size;
	oc->c.src = oc->in;
	oc->c.dst = oc->out;
	oc->c.ops = &offline_copier_ops;
	oc->c.opaque = oc;
	oc->c.request_size = options->request_size;
	oc->c.requests = options->requests;
	oc->c.allocate = flags & BLOCKMIRROR_COPY_ALLOCATE;
	oc->c.evict = true;
	oc->c.sparse_block = oc->c.allocate ? 0 : 4096;
	oc->c.dst_is_zero = oc->out->zero_init && !oc->c.allocate;
	oc->progress = options->progress;
	oc->progress_data = options->progress_data;
	bm_rate_set(&oc->rate,
		    BM_SIZE_COVERS(options, struct blockmirror_copy_options,
				   speed) ? options->speed : 0, bm_now_ns());
	return 0;
}

int
bm_offline_copy_run(struct bm_offline_copy *oc)
{
	struct bm_io io = { 0 };
	int r;

	r = run_copy(oc);
	if (r == 0) {
		/* A cancel may still come while the flush runs the loop. */
		oc->flushing = true;
		r = bm_image_sync(oc->out, bm_image_flush, &io);
		if (r == 0)
			r = oc->err;
	}
	if (r == 0 && oc->created)
		r = bm_durable_sync_parent(oc->dst);
	if (oc->cancelled)
		r = bm_error(-ECANCELED, "cancelled");
	if (r == 0 && oc->progress)
		oc->progress(oc->progress_data, oc->size, oc->size);
	oc->t_end = bm_now_ns();
	return r;
}

void
bm_offline_copy_close(struct bm_offline_copy *oc, int err)
{
	bm_image_close(oc->in);
	bm_image_close(oc->out);
	oc->in = oc->out = NULL;
	if (err < 0 && oc->created && unlink(oc->dst) == 0)
		bm_info("%s: removed the incomplete copy", oc->dst);
	bm_loop_free(oc->loop);
	oc->loop = NULL;
	free(oc->dst);
	oc->dst = NULL;
}

void
bm_offline_copy_stats(const struct bm_offline_copy *oc,
		      enum blockmirror_copy_state state, int err,
		      struct blockmirror_copy_stats *st)
{
	st->virtual_size = oc->size;
	st->bytes_read = oc->c.bytes_read;
	st->bytes_written = oc->c.bytes_written;
	st->bytes_zeroed = oc->c.bytes_zeroed;
	st->elapsed_us = ((oc->t_end ? oc->t_end : bm_now_ns()) - oc->t0) / 1000;
	if (!BM_SIZE_COVERS(st, struct blockmirror_copy_stats, error))
		return;
	st->bytes_done = state == BLOCKMIRROR_COPY_DONE ? oc->size
							: oc->done_bytes;
	st->state = state;
	st->speed = oc->rate.speed;
	st->error = -err;
}

void
bm_offline_copy_set_speed(struct bm_offline_copy *oc, uint64_t speed)
{
	bm_rate_set(&oc->rate, speed, bm_now_ns());
	if (!oc->finished)
		bm_copier_pump(&oc->c);
}

int
bm_offline_copy_pause(struct bm_offline_copy *oc)
{
	if (oc->paused)
		return bm_error(-EINVAL, "the copy is paused already");
	if (oc->finished)
		return bm_error(-EBUSY, "the copy is flushing the "
				"destination");
	set_paused(oc, true);
	return 0;
}

int
bm_offline_copy_resume(struct bm_offline_copy *oc)
{
	if (!oc->paused)
		return bm_error(-EINVAL, "the copy is not paused");
	set_paused(oc, false);
	bm_copier_pump(&oc->c);
	check_finished(oc);
	return 0;
}

void
bm_offline_copy_cancel(struct bm_offline_copy *oc)
{
	oc->cancelled = true;
	oc->cancel_ns = bm_now_ns();
	if (!oc->err)
		oc->err = -ECANCELED;
	if (oc->finished)
		return; /* flushing: the run sees `cancelled` */
	bm_copier_stop(&oc->c);
	set_paused(oc, false);
	if (copy_busy(oc) && !oc->timer.armed)
		bm_loop_timer_start(oc->loop, &oc->timer, CANCEL_POLL_NS,
				    timer_fired);
	check_finished(oc);
}

