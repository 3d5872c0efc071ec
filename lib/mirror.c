/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The mirror's rules.  Everything that decides what the destination holds
 * is in this file; DESIGN.md ("The mirror job: invariants") numbers them.
 *
 * Chunks of `granularity` bytes are DIRTY (bit in `dirty`), COPYING (bit
 * in `copying`) or CLEAN (neither).  A chunk can be DIRTY and COPYING at
 * once: a guest write landed while its copy was in flight, so the copy's
 * result is already stale and the chunk will be copied again.
 *
 * 1. Start.  While the source's allocation is mapped (phase MAPPING, or
 *    PAUSED in it: bm_mirror_mapping()) every chunk counts as dirty for
 *    guest writes, which only ever set bits.
 *    Mapped data sets DIRTY.  Mapped zeroes and holes set nothing when the
 *    destination is known to read as zero; otherwise they set DIRTY and
 *    `zero_hint`, so the copy writes zeroes instead of reading data.  A
 *    guest write clears zero_hint for every chunk it touches; a chunk a
 *    guest wrote before the map arrives is DIRTY already and never gets
 *    the hint.  Sync top maps the top layer only and leaves what it
 *    leaves to its backing image (BM_EXTENT_BACKING) clean: the
 *    destination's own backing chain holds the same bytes.  Sync none
 *    leaves every mapped chunk clean (docs/chains.md).
 *
 * 2. Bulk copy.  mirror_next() takes the next run of DIRTY chunks that
 *    are not COPYING and not touched by a guest write in flight, clears
 *    DIRTY and sets COPYING, and hands the run to the copier.  When the
 *    run is on the destination COPYING is cleared; a failed run becomes
 *    DIRTY again.  A guest write that completes meanwhile re-dirties its
 *    chunks, so the copy's possibly stale result is never trusted.
 *
 * 3. Guest write, background mode (and active mode while MAPPING): mark
 *    the touched chunks DIRTY, write the source, mark them DIRTY again
 *    (a copy may not start on them meanwhile, but the mark is what
 *    counts), then complete.  A job starts only once the writes already
 *    in flight have finished, so no write escapes it.
 *
 * 4. Guest write, active mode: wait while any earlier write, mirrored or
 *    not, touches the same chunks (so source and destination apply
 *    overlapping writes in the same order, and a mirrored write never
 *    completes after an overlapping unmirrored one landed behind it on
 *    the source).  If every touched chunk is DIRTY, write only the
 *    source: the chunks stay DIRTY for the copy.  If a copy is in flight
 *    on a touched chunk, write only the source too and leave the chunks
 *    DIRTY (they are copied again), so a copy's old data never lands
 *    after a newer mirrored write; but wait for the copy instead if the
 *    write also touches a CLEAN chunk (going to the source alone would
 *    dirty it) or if the copy's chunk is CONTENDED (below).  Otherwise
 *    write both; on success the chunks the write covers entirely become
 *    CLEAN and partly covered DIRTY ones stay DIRTY.  So the remaining
 *    work (DIRTY or COPYING chunks) never grows.  (DESIGN.md would write
 *    only the source when *any* chunk is dirty; that would have to dirty
 *    the clean chunks next to it and let the remaining work grow.)  A
 *    destination failure never fails the guest: the chunks become DIRTY,
 *    the job is no longer actively synced, and the error policy applies.
 *    In background mode a write waits only for overlapping mirrored
 *    writes left from active mode.  must_wait() is this rule, the one
 *    range tracker for guest writes and copies.
 *    Why a write does not simply wait for every copy: a copy request
 *    lives as long as the destination's queue is deep (tens of
 *    milliseconds on a busy disk), and a guest write waiting behind it
 *    would take as long.  The price is a second copy of the chunks such
 *    a write overtook.  A chunk whose copy was overtaken is CONTENDED (bit
 *    in `contended`), and the guest waits for its next copy, so each
 *    dirtying costs at most two copies and active mode converges under
 *    any write load.  A CONTENDED chunk copied without being overtaken is
 *    no longer CONTENDED.
 *
 * 5. Write-zeroes are writes (mirrored as write-zeroes, FUA kept).  A
 *    discard is a hint an image may ignore (inside an allocated qcow2
 *    cluster, or on NBD), so a discard mirrored as a discard could leave
 *    the two images different.  A discard that would be mirrored is
 *    turned into a write-zeroes that may deallocate, on both images: both
 *    then read zeroes.  One that would not (background mode, or every
 *    chunk dirty) reaches the source as the hint it is, and its chunks
 *    stay DIRTY: the copy brings over whatever the source then reads.
 *    So during a move a discarded range reads as its old data or as
 *    zeroes, the same on both images once the move ends.  Flushes only
 *    reach the source: the pivot flushes the destination.
 *
 * 6. READY: mapped, nothing DIRTY or COPYING, destination flushed
 *    (phase COPYING -> READY; the phases and the endings are pivot.c's).
 *
 * 9. Errors: mirror_error() applies the policy.  report ends the job
 *    (pivot.c), stop pauses it, retry keeps the chunks DIRTY (they come
 *    round again) and, after several errors in a row, holds the copy back
 *    for a growing backoff.
 *
 * Guest writes have priority over the bulk copy for the destination:
 * while mirrored writes are in flight the copy keeps at most a quarter of
 * its requests going.
 *
 * The filter.  While the job runs, the disk's active image is job->filter,
 * a filter image stacked over the source that holds the destination; the
 * disk sends it every guest request as it would any image.  Reads and
 * block status pass through to the source; flushes reach the source
 * (rule 5); writes, write-zeroes and discards become a struct
 * bm_mirror_write, the job's per-request state (chunks, mirrored or not,
 * the ios to each image), taken from a free list that grows only to the
 * most writes ever in flight at once, and follow rules 3 to 5.  The job
 * pushes the filter when it starts and swaps it out when it ends
 * (bm_disk_swap_image(): the destination at the pivot, the source
 * otherwise); the disk never asks whether a job runs.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "errors.h"
#include "internal.h"
#include "mirror.h"

/* A window's block status may run on the loop (a file's SEEK_DATA walk
 * is synchronous), holding up the guest meanwhile: the window length
 * adapts so that the call takes about MAP_CALL_NS. */
#define MAP_WINDOW_MIN (UINT64_C(16) << 20)
#define MAP_WINDOW_FIRST (UINT64_C(64) << 20)
#define MAP_WINDOW_MAX (UINT64_C(1) << 30)
#define MAP_CALL_NS (1000 * 1000ull)
#define TICK_NS (100 * 1000000ull)
#define RETRY_MIN_NS (100 * 1000000ull)
#define RETRY_MAX_NS (5000 * 1000000ull)
#define RETRY_HOLD_AFTER 3     /* consecutive errors before holding back */
#define AUTO_SAMPLE_TICKS 10   /* auto mode samples once a second */
#define AUTO_STALLS 3          /* samples without progress before switching */
#define CANCEL_GRACE_NS (1000 * 1000000ull)

static inline uint64_t
chunk_of(const struct bm_job *job, uint64_t offset)
{
	return offset >> job->dirty.shift;
}

static inline uint64_t
chunk_offset(const struct bm_job *job, uint64_t chunk)
{
	return chunk << job->dirty.shift;
}

/* Bytes of chunks [c0, c1), the last chunk clipped to the disk. */
static uint64_t
chunk_bytes(const struct bm_job *job, uint64_t c0, uint64_t c1)
{
	uint64_t end = BM_MIN(chunk_offset(job, c1), job->dirty.size);

	return end - chunk_offset(job, c0);
}

/* Until the whole source is mapped, guest writes only set DIRTY bits and
 * no region of the persisted state may be cleared. */
bool
bm_mirror_mapping(const struct bm_job *job)
{
	return job->mapping || job->phase == BM_PHASE_MAPPING ||
	       (job->phase == BM_PHASE_PAUSED &&
		job->paused_from == BM_PHASE_MAPPING);
}

/* ---- rule 1: mapping the source -------------------------------------- */

static void map_window(struct bm_job *job);

static void
map_apply(struct bm_job *job)
{
	bool dst_zero = job->dst->zero_init;

	/* Sync none: the caller put the source's content on the
	 * destination; only guest writes from now on are the job's. */
	if (job->opt.sync == BLOCKMIRROR_SYNC_NONE)
		return;
	for (size_t i = 0; i < job->map.len; i++) {
		const struct bm_extent *e = &job->map.v[i];

		/* Sync top: the destination's backing chain supplies what
		 * the source's top layer leaves to its own. */
		if (e->flags & BM_EXTENT_BACKING)
			continue;
		if (!(e->flags & BM_EXTENT_ZERO)) {
			bm_bitmap_set_range(&job->dirty, e->offset, e->length);
			continue;
		}
		if (dst_zero)
			continue;
		/* Zeroes on a destination that may hold anything: copy as
		 * zeroes, but only chunks no guest write has touched (those
		 * are dirty already and must be read). */
		for (uint64_t c = chunk_of(job, e->offset);
		     c < chunk_of(job, e->offset + e->length - 1) + 1; c++) {
			uint64_t off = chunk_offset(job, c);

			if (bm_bitmap_test(&job->dirty, off))
				continue;
			bm_bitmap_set_range(&job->dirty, off, 1);
			if (e->offset <= off &&
			    off + job->granularity <= e->offset + e->length)
				bm_bitmap_set_range(&job->zero_hint, off, 1);
		}
	}
}

static void
map_done(struct bm_io *io, int err)
{
	struct bm_job *job = io->opaque;

	job->mapping = false;
	if (err < 0) {
		bm_mirror_error(job, true, io->offset, io->length, err);
		bm_job_step(job);
		return;
	}
	map_apply(job);
	bm_state_clip_map(job); /* resumed: the destination holds the rest */
	job->mapped_end = io->offset + io->length;
	if (job->goal != BM_GOAL_NONE) {
		bm_job_step(job);
		return;
	}
	if (job->mapped_end < job->src->size) {
		map_window(job);
		return;
	}
	bm_job_set_phase(job, BM_PHASE_COPYING);
	job->copy_start_ns = bm_now_ns();
	bm_mirror_pump(job);
	bm_job_step(job);
}

/*
 * Map again after a block-status error: the retry policy once its backoff
 * is over (the tick calls this), the stop policy on resume.  Mapping goes
 * on from the first window not yet applied.
 */
void
bm_mirror_remap(struct bm_job *job)
{
	if (job->phase != BM_PHASE_MAPPING || job->mapping ||
	    job->goal != BM_GOAL_NONE || job->src->size == 0 ||
	    (job->retry_after_ns && bm_now_ns() < job->retry_after_ns))
		return;
	map_window(job);
}

static void
map_window(struct bm_job *job)
{
	uint64_t t;

	bm_extent_list_reset(&job->map);
	memset(&job->map_io, 0, sizeof job->map_io);
	job->map_io.offset = job->mapped_end;
	if (!job->map_window)
		job->map_window = MAP_WINDOW_FIRST;
	job->map_io.length = BM_MIN(job->map_window,
				    job->src->size - job->mapped_end);
	job->map_io.extents = &job->map;
	job->map_io.done = map_done;
	job->map_io.opaque = job;
	job->mapping = true;
	t = bm_now_ns();
	if (job->opt.sync == BLOCKMIRROR_SYNC_TOP)
		bm_image_block_status_top(job->src, &job->map_io);
	else
		bm_image_block_status(job->src, &job->map_io);
	t = bm_now_ns() - t;
	if (t > MAP_CALL_NS && job->map_window > MAP_WINDOW_MIN)
		job->map_window /= 2;
	else if (t < MAP_CALL_NS / 4 && job->map_window < MAP_WINDOW_MAX)
		job->map_window *= 2;
}

static void kick_waiting(struct bm_job *job);

/* ---- rule 2: the bulk copy ------------------------------------------- */

/* Does a guest write in flight touch chunk c? */
static bool
chunk_being_written(const struct bm_job *job, uint64_t c)
{
	const struct bm_mirror_write *r;

	for (r = job->writes; r; r = r->next_active)
		if (c >= r->c0 && c < r->c1)
			return true;
	for (r = job->waiting; r; r = r->next)
		if (c >= r->c0 && c < r->c1)
			return true;
	return false;
}

static bool
chunk_copyable(const struct bm_job *job, uint64_t c)
{
	return !bm_bitmap_test(&job->copying, chunk_offset(job, c)) &&
	       !chunk_being_written(job, c);
}

static bool
job_stopping(const struct bm_job *job)
{
	return job->phase == BM_PHASE_STOPPING;
}

static bool
copy_allowed_now(struct bm_job *job)
{
	uint64_t now;

	if (job_stopping(job))
		return false;
	if (bm_job_ending(job))
		return true; /* the final copy of a pivot or a clean cancel */
	switch (job->phase) {
	case BM_PHASE_COPYING:
	case BM_PHASE_READY:
		break;
	default:
		return false;
	}
	/* Guest writes first: keep most of the destination free. */
	if (job->mirrored_inflight &&
	    job->copier.inflight >= BM_MAX(1u, job->copier.requests / 4))
		return false;
	now = bm_now_ns();
	if (job->retry_after_ns && now < job->retry_after_ns)
		return false;
	/* Over the limit: the tick pumps again. */
	return bm_rate_allows(&job->rate, now);
}

static bool
mirror_next(struct bm_copier *c, struct bm_copy_range *r)
{
	struct bm_job *job = c->opaque;
	uint64_t off, len, c0, c1, end, max = c->request_size;
	bool wrapped = false;
	bool zero, contended;

	if (!copy_allowed_now(job))
		return false;
	/* Under a low speed limit, smaller requests keep the rate smooth:
	 * about a tenth of a second's worth, at least one chunk. */
	if (job->goal == BM_GOAL_NONE)
		max = bm_rate_request_max(&job->rate, max, job->granularity);
	for (;;) {
		if (!bm_bitmap_next_dirty(&job->dirty, job->cursor, max,
					  &off, &len)) {
			if (wrapped || job->cursor == 0)
				return false;
			wrapped = true;
			job->cursor = 0;
			continue;
		}
		c0 = chunk_of(job, off);
		end = chunk_of(job, off + len - 1) + 1;
		if (!chunk_copyable(job, c0)) {
			/* Busy now; its copy or write will pump us again. */
			job->cursor = chunk_offset(job, c0 + 1);
			if (job->cursor >= job->dirty.size) {
				if (wrapped)
					return false;
				wrapped = true;
				job->cursor = 0;
			}
			continue;
		}
		zero = bm_bitmap_test(&job->zero_hint, off);
		contended = bm_bitmap_test(&job->contended, off);
		for (c1 = c0 + 1; c1 < end; c1++) {
			uint64_t o = chunk_offset(job, c1);

			if (!chunk_copyable(job, c1) ||
			    bm_bitmap_test(&job->zero_hint, o) != zero ||
			    bm_bitmap_test(&job->contended, o) != contended)
				break;
		}
		break;
	}
	off = chunk_offset(job, c0);
	len = chunk_bytes(job, c0, c1);
	bm_bitmap_clear_range(&job->dirty, off, chunk_offset(job, c1) - off);
	bm_bitmap_set_range(&job->copying, off, len);
	job->cursor = chunk_offset(job, c1);
	if (job->cursor >= job->dirty.size)
		job->cursor = 0;
	r->offset = off;
	r->length = len;
	r->kind = zero ? BM_COPY_HOLE : BM_COPY_DATA;
	r->tag = NULL;
	if (!zero)
		bm_rate_account(&job->rate, len);
	return true;
}

static void
mirror_copied(struct bm_copier *c, const struct bm_copy_range *r, int err)
{
	struct bm_job *job = c->opaque;
	uint64_t c0 = chunk_of(job, r->offset);
	uint64_t c1 = chunk_of(job, r->offset + r->length - 1) + 1;
	uint64_t span = chunk_offset(job, c1) - chunk_offset(job, c0);

	bm_bitmap_clear_range(&job->copying, r->offset, span);
	if (err < 0) {
		bm_bitmap_set_range(&job->dirty, r->offset, r->length);
		bm_mirror_error(job, r->read_failed, r->offset, r->length,
				err);
	} else {
		/* Rule 4: a chunk a guest write overtook (DIRTY again) is
		 * CONTENDED for its next copy; one that was not is not. */
		for (uint64_t k = c0; k < c1; k++) {
			uint64_t o = chunk_offset(job, k);

			if (bm_bitmap_test(&job->dirty, o))
				bm_bitmap_set_range(&job->contended, o, 1);
			else
				bm_bitmap_clear_range(&job->contended, o, 1);
		}
		job->bytes_copied += r->written;
		job->copy_busy_bytes += r->length;
		job->retry_backoff_ns = 0;
		job->consecutive_errors = 0;
		job->copied_since_flush = true;
	}
	/* Active writes may have been waiting for this copy. */
	kick_waiting(job);
	bm_job_step(job);
}

static const struct bm_copier_ops mirror_copier_ops = {
	.next = mirror_next,
	.done = mirror_copied,
};

void
bm_mirror_pump(struct bm_job *job)
{
	bm_copier_pump(&job->copier);
}

/* ---- rules 3, 4, 5: guest writes ------------------------------------- */

static void
writes_add(struct bm_job *job, struct bm_mirror_write *req)
{
	req->prev_active = NULL;
	req->next_active = job->writes;
	if (job->writes)
		job->writes->prev_active = req;
	job->writes = req;
}

static void
writes_remove(struct bm_job *job, struct bm_mirror_write *req)
{
	if (req->prev_active)
		req->prev_active->next_active = req->next_active;
	else
		job->writes = req->next_active;
	if (req->next_active)
		req->next_active->prev_active = req->prev_active;
}

/*
 * The range tracker: must this write wait?  In flight means issued to the
 * source and not yet completed; copies count from the read of the source
 * to the write of the destination.  The rule (the top comment's rule 4):
 *
 *   - every write waits for earlier waiting writes it overlaps (FIFO);
 *   - in active mode a write waits for every overlapping write in flight,
 *     mirrored or not, and for every overlapping copy;
 *   - in background mode a write waits only for overlapping mirrored
 *     writes (left from active mode).
 *
 * So two overlapping operations of which one reaches the destination never
 * run at once, and the destination sees them in the source's order.
 */
/* Must a write to [c0, c1) wait for a copy in flight (rule 4)?  If the
 * copy is of a CONTENDED chunk, or if the write also touches a CLEAN
 * chunk, which going to the source alone would dirty. */
static bool
waits_for_copy(const struct bm_job *job, uint64_t c0, uint64_t c1)
{
	bool copy = false, clean = false;

	for (uint64_t c = c0; c < c1; c++) {
		uint64_t o = chunk_offset(job, c);

		if (bm_bitmap_test(&job->copying, o)) {
			if (bm_bitmap_test(&job->contended, o))
				return true;
			copy = true;
		} else if (!bm_bitmap_test(&job->dirty, o)) {
			clean = true;
		}
	}
	return copy && clean;
}

static bool
must_wait(struct bm_job *job, struct bm_mirror_write *req, bool active)
{
	if (active && waits_for_copy(job, req->c0, req->c1))
		return true;
	for (struct bm_mirror_write *r = job->writes; r; r = r->next_active)
		if ((active || r->mirrored) && r->c0 < req->c1 &&
		    req->c0 < r->c1)
			return true;
	for (struct bm_mirror_write *r = job->waiting; r && r != req; r = r->next)
		if (r->c0 < req->c1 && req->c0 < r->c1)
			return true;
	return false;
}

static bool
write_active(const struct bm_job *job)
{
	return job->mode == BLOCKMIRROR_MODE_ACTIVE && !bm_mirror_mapping(job);
}

static bool
all_dirty(struct bm_job *job, uint64_t c0, uint64_t c1)
{
	for (uint64_t c = c0; c < c1; c++)
		if (!bm_bitmap_test(&job->dirty, chunk_offset(job, c)))
			return false;
	return true;
}

static void write_finish(struct bm_mirror_write *req);

static void
write_io_done(struct bm_io *io, int err)
{
	struct bm_mirror_write *req = io->opaque;

	if (io == &req->io_src)
		req->err = err;
	else
		req->dst_err = err;
	if (--req->pending == 0)
		write_finish(req);
}

static void
prep_io(struct bm_mirror_write *req, struct bm_io *io)
{
	memset(io, 0, sizeof *io);
	io->offset = req->offset;
	io->length = req->length;
	io->buf = req->buf;
	io->opaque = req;
	io->done = write_io_done;
	io->flags = req->flags & BM_IO_FUA;
	if (req->type == BM_REQ_ZERO)
		io->flags |= req->flags & BM_IO_MAY_TRIM;
}

static void
issue(struct bm_image *img, struct bm_mirror_write *req, struct bm_io *io)
{
	switch (req->type) {
	case BM_REQ_WRITE:
		bm_image_write(img, io);
		break;
	case BM_REQ_ZERO:
		bm_image_zero(img, io);
		break;
	case BM_REQ_DISCARD:
		/* Rule 5: mirrored, it zeroes both images (deallocating
		 * where they can), so both read the same; else it is the
		 * source's hint and the chunks stay dirty for the copy. */
		if (req->mirrored) {
			io->flags |= BM_IO_MAY_TRIM;
			bm_image_zero(img, io);
		} else {
			bm_image_discard(img, io);
		}
		break;
	default:
		break;
	}
}

static void
write_start(struct bm_job *job, struct bm_mirror_write *req, bool active)
{
	/* A write the destination cannot take as it is (finer than its
	 * sectors) goes to the source alone and leaves its chunks to the
	 * copy, whose requests are whole chunks. */
	req->mirrored = active && !job_stopping(job) &&
			req->offset % job->dst->align == 0 &&
			req->length % job->dst->align == 0 &&
			!all_dirty(job, req->c0, req->c1) &&
			!bm_bitmap_test_range(&job->copying,
					      chunk_offset(job, req->c0),
					      chunk_bytes(job, req->c0,
							  req->c1));
	req->pending = req->mirrored ? 2 : 1;
	req->err = req->dst_err = 0;
	writes_add(job, req);
	prep_io(req, &req->io_src);
	if (req->mirrored) {
		job->mirrored_inflight++;
		prep_io(req, &req->io_dst);
	}
	if (!req->mirrored)
		/* Dirty from the start too, so the remaining work counts it
		 * at once; it is marked again when the write lands. */
		bm_bitmap_set_range(&job->dirty, req->offset, req->length);
	issue(job->src, req, &req->io_src);
	if (req->mirrored)
		issue(job->dst, req, &req->io_dst);
}

static void
kick_waiting(struct bm_job *job)
{
	struct bm_mirror_write **pp = &job->waiting;

	while (*pp) {
		struct bm_mirror_write *req = *pp;

		/* The mode may have changed while it waited. */
		bool active = write_active(job);

		if (must_wait(job, req, active)) {
			pp = &req->next;
			continue;
		}
		*pp = req->next;
		if (job->waiting_tail == &req->next)
			job->waiting_tail = pp;
		req->waiting = false;
		write_start(job, req, active);
	}
}

static void
write_finish(struct bm_mirror_write *req)
{
	struct bm_job *job = req->job;
	struct bm_io *guest = req->guest;
	int err = req->err;
	uint64_t touched_off = chunk_offset(job, req->c0);
	uint64_t touched_len = chunk_offset(job, req->c1) - touched_off;

	writes_remove(job, req);
	/* Whatever reached the source, the destination no longer reads as
	 * zero there for certain. */
	bm_bitmap_clear_range(&job->zero_hint, touched_off, touched_len);
	if (req->mirrored) {
		job->mirrored_inflight--;
		if (req->err == 0 && req->dst_err == 0) {
			job->bytes_mirrored += req->length;
			job->consecutive_errors = 0;
			bm_bitmap_clear_range(&job->dirty, req->offset,
					      req->length);
		} else {
			bm_bitmap_set_range(&job->dirty, req->offset,
					    req->length);
		}
		if (req->dst_err) {
			job->actively_synced = false;
			bm_mirror_error(job, false, req->offset, req->length,
					req->dst_err);
		}
	} else {
		bm_bitmap_set_range(&job->dirty, req->offset, req->length);
	}
	req->next = job->free_writes;
	job->free_writes = req;
	guest->done(guest, err); /* the guest sees only the source's result */
	kick_waiting(job);
	bm_mirror_pump(job);
	bm_job_step(job);
}

/*
 * Durability on the destination.  Guest flushes reach only the source; the
 * destination needs flushing before the pivot only for what the guest was
 * promised durable (a flush or FUA since the last destination flush) and
 * for bulk-copied data (durable on the source before the job touched it).
 * Unflushed guest writes may be lost by a crash on either image alike.
 */
void
bm_mirror_dst_flush_started(struct bm_job *job)
{
	job->copied_since_flush = false;
	job->guest_flush_since_flush = false;
}

void
bm_mirror_guest_write(struct bm_job *job, struct bm_mirror_write *req)
{
	/* With a state_dir, no write reaches an image before its regions
	 * are dirty on disk; a held write comes back here (state-io.c). */
	if (bm_state_hold_write(job, req))
		return;
	if (req->flags & BM_IO_FUA)
		job->guest_flush_since_flush = true;
	bool active = write_active(job);

	req->c0 = chunk_of(job, req->offset);
	req->c1 = req->length ? chunk_of(job, req->offset + req->length - 1) + 1
			      : req->c0 + 1;
	if (req->c1 > job->dirty.nbits)
		req->c1 = job->dirty.nbits;
	if (req->c0 >= req->c1)
		req->c1 = req->c0 + 1; /* zero-length at the end */
	if (must_wait(job, req, active)) {
		req->waiting = true;
		req->next = NULL;
		*job->waiting_tail = req;
		job->waiting_tail = &req->next;
		return;
	}
	write_start(job, req, active);
}

/* ---- the filter image ------------------------------------------------ */

/*
 * While the job runs, the disk's active image is job->filter: reads and
 * block status pass through to the source, flushes reach the source (and
 * note that the guest asked for durability), writes, write-zeroes and
 * discards take a bm_mirror_write from the free list and follow rules 3
 * to 5.  The list only grows to the most writes ever in flight at once,
 * so the guest's path allocates nothing once the job is warm.
 */
static inline struct bm_job *
filter_job(struct bm_image *img)
{
	return bm_container_of(img, struct bm_job, filter);
}

static void
filter_failed(struct bm_op *op, int res)
{
	struct bm_io *io = bm_container_of(op, struct bm_io, op);

	io->done(io, res);
}

static void
filter_write_type(struct bm_image *img, struct bm_io *io,
		  enum bm_req_type type)
{
	struct bm_job *job = filter_job(img);
	struct bm_mirror_write *w = job->free_writes;

	if (w) {
		job->free_writes = w->next;
	} else if (!(w = malloc(sizeof *w))) {
		/* The guest's io is ours to complete, never inline. */
		bm_loop_defer(job->loop, &io->op, filter_failed, -ENOMEM);
		return;
	}
	memset(w, 0, sizeof *w);
	w->job = job;
	w->guest = io;
	w->type = type;
	w->offset = io->offset;
	w->length = io->length;
	w->buf = io->buf;
	w->flags = io->flags & (BM_IO_FUA | BM_IO_MAY_TRIM);
	bm_mirror_guest_write(job, w);
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

static void
filter_discard(struct bm_image *img, struct bm_io *io)
{
	filter_write_type(img, io, BM_REQ_DISCARD);
}

static void
filter_flush(struct bm_image *img, struct bm_io *io)
{
	struct bm_job *job = filter_job(img);

	job->guest_flush_since_flush = true;
	bm_image_flush(job->src, io);
}

/* Reads and block status pass to the source (below); the job owns the
 * filter and both images under it. */
static const struct bm_image_ops filter_ops = {
	.read = bm_filter_pass_read,
	.write = filter_write,
	.zero = filter_zero,
	.discard = filter_discard,
	.flush = filter_flush,
	.block_status = bm_filter_pass_block_status,
	.close = bm_filter_no_close,
};

/* The filter looks like the source to whoever asks the disk's image. */
static void
filter_init(struct bm_job *job)
{
	struct bm_image *f = &job->filter;

	f->ops = &filter_ops;
	f->store = job->src->store;    /* borrowed, for questions only */
	f->format = job->src->format;
	f->name = job->src->name;      /* borrowed */
	f->size = job->src->size;
	f->cluster_size = job->src->cluster_size;
	f->align = job->src->align;
	f->readonly = job->src->readonly;
	f->zero_init = job->src->zero_init;
	f->below = job->src;
}

/* ---- rule 6: ready, and progress ------------------------------------- */

uint64_t
bm_mirror_remaining(struct bm_job *job)
{
	/* A chunk DIRTY while COPYING (a write overtook its copy) is one
	 * chunk still to copy. */
	return bm_bitmap_dirty_bytes(&job->dirty) +
	       bm_bitmap_dirty_bytes(&job->copying) -
	       bm_bitmap_both_bytes(&job->dirty, &job->copying);
}

bool
bm_mirror_busy(const struct bm_job *job)
{
	return job->copier.inflight || job->mapping || job->flushing ||
	       job->src_flushing;
}

/* The READY flush is done (pivot.c's dst_flushed() steps next). */
void
bm_mirror_ready_flushed(struct bm_job *job, int err)
{
	if (err < 0) {
		bm_mirror_error(job, false, 0, 0, err);
	} else if (job->phase == BM_PHASE_COPYING) {
		struct blockmirror_event ev = { .type = BLOCKMIRROR_EVENT_READY };

		job->ready = true;
		job->actively_synced = job->mode == BLOCKMIRROR_MODE_ACTIVE;
		bm_job_event(job, &ev);
		bm_job_set_phase(job, BM_PHASE_READY);
	}
}

void
bm_mirror_flush_for_ready(struct bm_job *job)
{
	if (job->retry_after_ns && bm_now_ns() < job->retry_after_ns)
		return; /* the tick steps again */
	bm_job_flush_dst(job);
}

/* ---- rule 9: errors -------------------------------------------------- */

void
bm_mirror_error(struct bm_job *job, bool on_source, uint64_t offset,
		uint64_t length, int err)
{
	struct blockmirror_event ev = {
		.type = BLOCKMIRROR_EVENT_ERROR,
		.err = -err,
		.offset = offset,
		.length = length,
		.on_source = on_source,
		.message = blockmirror_last_error(),
	};
	char msg[200];

	if (job->phase == BM_PHASE_STOPPING || bm_job_ended(job->state))
		return; /* already ending; the first error is kept */
	snprintf(msg, sizeof msg, "%s at %" PRIu64 "+%" PRIu64 ": %s",
		 on_source ? "source" : "destination", offset, length,
		 strerror(-err));
	ev.message = msg;
	bm_job_event(job, &ev);
	/* A copy or mirrored write that fails before the final copy (it
	 * was in flight when the ending began) has left its chunks DIRTY:
	 * the final copy takes them again, with the guest stopped, and its
	 * result decides, whatever the policy. */
	if (job->goal != BM_GOAL_NONE && length &&
	    (job->phase == BM_PHASE_PREFLUSH || job->phase == BM_PHASE_DRAIN))
		return;
	if (job->goal != BM_GOAL_NONE) {
		bm_job_ending_error(job, err);
		return;
	}
	switch (job->opt.on_error) {
	case BLOCKMIRROR_ON_ERROR_REPORT:
		job->error = -err;
		snprintf(job->error_msg, sizeof job->error_msg, "%s", msg);
		bm_job_end(job, BM_GOAL_FAIL, NULL);
		break;
	case BLOCKMIRROR_ON_ERROR_STOP:
		if (job->phase == BM_PHASE_MAPPING ||
		    job->phase == BM_PHASE_COPYING ||
		    job->phase == BM_PHASE_READY) {
			struct blockmirror_event p = {
				.type = BLOCKMIRROR_EVENT_PAUSED,
				.err = -err,
				.message = msg,
			};

			job->paused_from = job->phase;
			bm_job_event(job, &p);
			bm_job_set_phase(job, BM_PHASE_PAUSED);
		}
		break;
	case BLOCKMIRROR_ON_ERROR_RETRY:
		/* The range stays dirty and comes round again.  Only errors
		 * with no success between them hold the whole copy back, for
		 * a growing while: a flaky destination keeps moving, a dead
		 * one is not hammered. */
		if (++job->consecutive_errors < RETRY_HOLD_AFTER)
			break;
		job->retry_backoff_ns = job->retry_backoff_ns
			? BM_MIN(job->retry_backoff_ns * 2, RETRY_MAX_NS)
			: RETRY_MIN_NS;
		job->retry_after_ns = bm_now_ns() + job->retry_backoff_ns;
		break;
	}
}

/* ---- the tick: speed, retry, auto mode ------------------------------- */

static void
auto_sample(struct bm_job *job)
{
	uint64_t remaining = bm_mirror_remaining(job);

	if (!job->auto_mode || job->mode == BLOCKMIRROR_MODE_ACTIVE ||
	    job->phase != BM_PHASE_COPYING)
		return;
	if (job->auto_last_remaining && remaining >= job->auto_last_remaining)
		job->auto_stalls++;
	else
		job->auto_stalls = 0;
	job->auto_last_remaining = remaining;
	if (job->auto_stalls >= AUTO_STALLS) {
		struct blockmirror_event ev = {
			.type = BLOCKMIRROR_EVENT_MODE_CHANGED,
			.mode = BLOCKMIRROR_MODE_ACTIVE,
		};

		job->mode = BLOCKMIRROR_MODE_ACTIVE;
		bm_job_event(job, &ev);
	}
}

static void
tick(struct bm_op *op, int res)
{
	struct bm_job *job = bm_container_of(op, struct bm_job, tick.op);

	job->tick.armed = false;
	if (!bm_job_tick_wanted(job)) {
		bm_job_step(job); /* it waited for the tick to stop */
		return;
	}
	if ((job->goal == BM_GOAL_PIVOT || job->goal == BM_GOAL_SYNC_CANCEL) &&
	    job->opt.end_timeout_ms &&
	    (bm_now_ns() - job->end_start_ns) / 1000000 >
	    job->opt.end_timeout_ms)
		bm_job_end_timed_out(job); /* now stopping, below */
	if (job_stopping(job)) {
		/* Requests that will not finish (a hung destination) are
		 * cancelled after a grace period, so that a forced cancel
		 * returns. */
		if ((bm_mirror_busy(job) || job->mirrored_inflight ||
		     bm_state_busy(job)) &&
		    bm_now_ns() - job->end_start_ns > CANCEL_GRACE_NS) {
			struct bm_store *st = job->dst->store;

			if (st->ops->cancel)
				st->ops->cancel(st);
		}
		/* A hung state file holds guest writes and the ending: its
		 * requests go too, and the state with them (state-io.c); a
		 * clear's destination flush went with the store above. */
		if (bm_now_ns() - job->end_start_ns > CANCEL_GRACE_NS)
			bm_state_cancel(job);
		bm_mirror_tick_start(job);
		bm_job_step(job);
		return;
	}
	if (++job->auto_ticks % AUTO_SAMPLE_TICKS == 0)
		auto_sample(job);
	bm_state_tick(job); /* clear persisted regions both images hold */
	bm_mirror_remap(job);
	/* A new accounting window every second (rate.h). */
	bm_rate_roll(&job->rate, bm_now_ns());
	bm_mirror_tick_start(job);
	bm_mirror_pump(job);
	bm_job_step(job);
}

/* ---- setup ----------------------------------------------------------- */

int
bm_mirror_init(struct bm_job *job, uint64_t size)
{
	uint32_t req;
	int r;

	r = bm_bitmap_init(&job->dirty, size, job->granularity);
	if (r == 0)
		r = bm_bitmap_init(&job->copying, size, job->granularity);
	if (r == 0)
		r = bm_bitmap_init(&job->zero_hint, size, job->granularity);
	if (r == 0)
		r = bm_bitmap_init(&job->contended, size, job->granularity);
	if (r < 0)
		return bm_error(r, "out of memory for the dirty bitmap");
	req = job->opt.buf_size ? job->opt.buf_size : (1u << 20);
	if (req < job->granularity)
		req = (uint32_t)job->granularity;
	job->copier.dst = job->dst;
	job->copier.ops = &mirror_copier_ops;
	job->copier.opaque = job;
	job->copier.request_size = req;
	job->copier.requests = job->opt.requests ? job->opt.requests : 16;
	/* Keep the buffers bounded with huge chunks. */
	while (job->copier.requests > 1 &&
	       (uint64_t)job->copier.requests * req > (64u << 20))
		job->copier.requests /= 2;
	job->copier.sparse_block = 4096;
	/* The guest's requests share the loop: the bulk copy's data is
	 * copied by the kernel's workers, not in the loop's submit. */
	job->copier.async = true;
	/* A destination chunk may be copied twice, so zero runs must be
	 * written even on a destination that started out zeroed. */
	job->copier.dst_is_zero = false;
	return bm_copier_init(&job->copier);
}

int
bm_mirror_attach(struct bm_job *job)
{
	if (job->src->align > 1 && job->copier.request_size % job->src->align)
		return bm_error(-EINVAL, "%s: requests of %u bytes do not suit "
				"its alignment of %u bytes", job->src->name,
				job->copier.request_size, job->src->align);
	job->copier.src = job->src;
	job->waiting_tail = &job->waiting;
	filter_init(job);
	bm_rate_set(&job->rate, job->opt.speed, bm_now_ns());
	return 0;
}

void
bm_mirror_tick_start(struct bm_job *job)
{
	if (!job->tick.armed)
		bm_loop_timer_start(job->loop, &job->tick, TICK_NS, tick);
}

void
bm_mirror_begin(struct bm_job *job)
{
	bm_mirror_tick_start(job);
	if (job->src->size == 0) {
		job->mapped_end = 0;
		bm_job_set_phase(job, BM_PHASE_COPYING);
		bm_job_step(job);
		return;
	}
	map_window(job);
}

void
bm_mirror_fini(struct bm_job *job)
{
	bm_copier_fini(&job->copier);
	bm_bitmap_free(&job->dirty);
	bm_bitmap_free(&job->copying);
	bm_bitmap_free(&job->zero_hint);
	bm_bitmap_free(&job->contended);
	bm_extent_list_free(&job->map);
	while (job->free_writes) {
		struct bm_mirror_write *w = job->free_writes;

		job->free_writes = w->next;
		free(w);
	}
}
