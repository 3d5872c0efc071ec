/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The job's phase machine, and how a job ends: the pivot, the two
 * cancels, and failure.
 *
 * A job is in exactly one phase (enum bm_job_phase, mirror.h).  Each
 * phase is entered by one enter_*() function and left when the condition
 * in its case of bm_job_step() holds; every completion that could make a
 * condition true (copy, flush, drain, state I/O, tick) calls
 * bm_job_step().  The goal says only which ending the job is in.
 *
 *   MAPPING, COPYING, READY, PAUSED   the job runs (mirror.c, job.c)
 *
 *   pivot (complete) and clean cancel (cancel after READY):
 *   PREFLUSH     flush the destination while the guest still runs, so the
 *                flush in the stall finds little to write (and the source
 *                where the change record lives in it); wait for state
 *                I/O too, for the same reason
 *   DRAIN        the disk is quiesced: new guest requests queue, those in
 *                flight finish
 *   FINAL_COPY   (pivot: first give up if the copy would stall the guest
 *                longer than max_stall_us) copy what is still dirty
 *   FINAL_FLUSH  flush the destination if anything since the last flush
 *                must be durable
 *   SWITCH       stop the tick; then pivot() (make the switch durable,
 *                swap the disk's image, release the queue) or, for a clean
 *                cancel, let go: the destination is a consistent copy
 *   ABANDON      the pivot failed before the switch (an error in the
 *                final copy or flush): copies in flight finish, the job is
 *                READY again on the source and the caller learns the error
 *
 *   cancel, failure, forced cancel:
 *   STOPPING     the copier stops, the disk is quiesced; when neither the
 *                guest nor the job has anything in flight, the job ends
 *
 * Bounded exits.  A cancel before READY, a failure, and a forced cancel in
 * any phase that has not ended go to STOPPING (bm_job_end,
 * bm_job_force_cancel).  STOPPING waits only for I/O already in flight,
 * and the tick cancels the destination's requests after a grace period
 * (mirror.c), so a dead destination cannot keep it there.  A pivot that
 * fails at or before SWITCH leaves the disk on the source: until pivot()
 * has made the switch durable the source is authoritative and complete;
 * after, the destination is.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cbt.h"
#include "durable.h"
#include "errors.h"
#include "internal.h"
#include "mirror.h"

/* Tests set this to stop the process at a given step of the pivot. */
void (*bm_pivot_hook)(enum bm_pivot_step step);

static inline void
pivot_hook(enum bm_pivot_step step)
{
	if (bm_pivot_hook)
		bm_pivot_hook(step);
}

/* ---- the durable switch ---------------------------------------------- */

/*
 * Point `link` at `target` atomically and durably.  *renamed says whether
 * the link names the target now: once it does, whatever failed after (the
 * directory's fsync) cannot take the switch back, since a restart serves
 * what the link names.  A failed directory fsync is tried once more.
 */
static int
relink(const char *link, const char *target, bool *renamed)
{
	int r = bm_durable_symlink(target, link, renamed);

	if (r < 0 && *renamed && bm_durable_sync_parent(link) == 0)
		r = 0;
	return r;
}

/* ---- ending a job ---------------------------------------------------- */

/*
 * The callers waiting for an ending are taken out of the job before the
 * ending is published (bm_job_set_phase), and woken after it: a thread
 * that sees the job ended may free it at once, so nothing of the job is
 * read after that.
 */
struct waiters {
	struct bm_call *call;        /* the one the ending answers */
	struct bm_call *others;      /* told 0 */
};

static struct waiters
take_waiters(struct bm_job *job, bool ending)
{
	struct waiters w = { job->goal_call, NULL };

	job->goal_call = NULL;
	if (ending) {
		w.others = job->end_waiters;
		job->end_waiters = NULL;
	}
	return w;
}

static void
wake(struct waiters w, int err)
{
	while (w.others) {
		struct bm_call *c = w.others;

		w.others = c->next_waiter;
		bm_waiter_signal(&c->w, 0);
	}
	if (w.call)
		bm_waiter_signal(&w.call->w, err);
}

void
bm_job_wait_end(struct bm_job *job, struct bm_call *call)
{
	call->next_waiter = job->end_waiters;
	job->end_waiters = call;
}

static void
finish(struct bm_job *job, enum bm_job_phase phase, bool pivoted)
{
	struct blockmirror_event ev = { 0 };
	enum bm_job_goal goal = job->goal;

	if (!pivoted) {
		/* The state goes before the queued writes are let go: they
		 * reach the source unseen by the job, so a state left on
		 * disk would resume a move that misses them. */
		bm_state_job_end(job);
		/* the filter goes */
		bm_disk_swap_image(job->disk, &job->filter, job->src);
		job->disk->job = NULL;
		bm_image_close(job->dst);
		job->dst = NULL;
		if (job->quiesced)
			bm_disk_unquiesce(job->disk);
		job->quiesced = false;
	}
	switch (phase) {
	case BM_PHASE_COMPLETED:
		ev.type = BLOCKMIRROR_EVENT_COMPLETED;
		ev.pivoted = pivoted;
		break;
	case BM_PHASE_CANCELLED:
		ev.type = BLOCKMIRROR_EVENT_CANCELLED;
		break;
	default:
		ev.type = BLOCKMIRROR_EVENT_FAILED;
		ev.err = job->error;
		ev.message = job->error_msg;
		break;
	}
	struct waiters w = take_waiters(job, true);
	int err = job->end_err ? job->end_err :
		  goal == BM_GOAL_FAIL ? -job->error : 0;

	/* The event first: whoever waits for the state finds it delivered. */
	bm_job_event(job, &ev);
	bm_job_set_phase(job, phase);
	wake(w, err); /* the job may be gone from here on */
}

/* ---- the pivot ------------------------------------------------------- */

/* Give up on a pivot: READY again on the source; the caller learns err. */
static void
back_to_ready(struct bm_job *job, int err)
{
	job->goal = BM_GOAL_NONE;
	job->abandon_err = 0;
	if (job->quiesced)
		bm_disk_unquiesce(job->disk);
	job->quiesced = false;
	bm_job_set_phase(job, BM_PHASE_READY);
	bm_mirror_pump(job);
	bm_mirror_tick_start(job);
	wake(take_waiters(job, false), err);
}

/*
 * The pivot, top to bottom.  Called in SWITCH: the disk quiesced and
 * drained, nothing dirty, nothing being copied, the destination flushed,
 * the tick stopped; so the destination holds exactly what every completed
 * guest write left on the source.
 *
 * 1. The durable switch: after it a crash finds the destination named.
 *    If it fails and the link does not name the destination, nothing has
 *    changed: back to READY on the source.
 * 2. The swap: the destination replaces the mirror filter as the disk's
 *    image (bm_disk_swap_image); the job lets go.
 * 3. The release: the queued guest requests go to the destination, and
 *    the source is closed, on a thread of its own where closing may
 *    write back (bm_disk_close_later).
 */
static void
pivot(struct bm_job *job)
{
	struct blockmirror_disk *disk = job->disk;
	struct bm_image *old;
	bool renamed = false;
	int r = 0;

	/* 1. the durable switch */
	if (job->link)
		r = relink(job->link, job->dst_name, &renamed);
	else if (job->opt.on_pivot)
		r = job->opt.on_pivot(job->opt.pivot_data, job->dst_name);
	if (r < 0) {
		struct blockmirror_event ev = {
			.type = BLOCKMIRROR_EVENT_ERROR,
			.err = -r,
			.message = blockmirror_last_error(),
		};

		/* The link names the destination: so must the disk.  Its
		 * durability is unknown; say so and go on. */
		if (renamed)
			bm_warn("pivot: %s; the link names %s, which the disk "
				"now runs on, but may not after a power loss",
				blockmirror_last_error(), job->dst_name);
		bm_job_event(job, &ev);
		if (!renamed) {
			back_to_ready(job, r);
			return;
		}
	}
	pivot_hook(BM_PIVOT_DURABLE);

	/* 2. the swap: the destination replaces the filter */
	bm_disk_swap_image(disk, &job->filter, job->dst);
	disk->job = NULL;
	old = job->src;
	job->dst = NULL;
	job->src = NULL;

	/* 3. the release */
	job->pivot_stall_us = bm_disk_unquiesce(disk) / 1000;
	job->quiesced = false;
	/* A record kept in the source's bitmaps outlives the image. */
	if (disk->cbt)
		bm_cbt_image_gone(disk->cbt, old);
	bm_disk_close_later(disk, old);
	pivot_hook(BM_PIVOT_SWAPPED);
	bm_info("pivot: now on %s, guest stalled %" PRIu64 " us",
		bm_disk_base(disk)->name, job->pivot_stall_us);
	finish(job, BM_PHASE_COMPLETED, true);
}

/* ---- the phases of an ending ------------------------------------------ */

static void enter_drain(struct bm_job *job);
static void enter_final_copy(struct bm_job *job);
static void enter_final_flush(struct bm_job *job);
static void enter_switch(struct bm_job *job);
static void enter_abandon(struct bm_job *job, int err);
static void enter_stopping(struct bm_job *job, enum bm_job_goal goal);

bool
bm_job_ending(const struct bm_job *job)
{
	return job->phase >= BM_PHASE_PREFLUSH &&
	       job->phase <= BM_PHASE_STOPPING;
}

static void
job_drained(struct blockmirror_disk *disk)
{
	if (disk->job)
		bm_job_step(disk->job);
}

static void dst_flushed(struct bm_io *io, int err);

/* The job's one destination flush; dst_flushed() completes it. */
static void
flush_dst(struct bm_job *job)
{
	job->flushing = true;
	bm_mirror_dst_flush_started(job);
	memset(&job->flush_io, 0, sizeof job->flush_io);
	job->flush_io.done = dst_flushed;
	job->flush_io.opaque = job;
	bm_image_flush(job->dst, &job->flush_io);
}

static void
src_flushed(struct bm_io *io, int err)
{
	struct bm_job *job = io->opaque;

	/* Only so that the record's marks find little to sync; a failure
	 * shows there (and the guest's own flushes report to the guest). */
	job->src_flushing = false;
	bm_job_step(job);
}

/* Pivot or clean cancel, from READY (or PAUSED after READY). */
static void
enter_preflush(struct bm_job *job)
{
	bm_job_set_phase(job, BM_PHASE_PREFLUSH);
	/* A READY flush in flight serves as the preflush. */
	if (!job->flushing)
		flush_dst(job);
	/* The source is not flushed: nothing needs its cached writes on
	 * disk once the destination holds them all, and one whose close
	 * writes back (a qcow2 or VHDX image, a file on NFS) is closed on
	 * a thread of its own after the switch (pivot()).  Except where
	 * the disk's change record lives in the source's bitmaps: the
	 * record goes on marking there after the pivot, each new mark
	 * followed by a data sync of that file, and the guest's first
	 * write to an unmarked block would wait for all of it. */
	if (job->goal == BM_GOAL_PIVOT &&
	    bm_cbt_kept_in(job->disk->cbt, job->src)) {
		job->src_flushing = true;
		memset(&job->src_flush_io, 0, sizeof job->src_flush_io);
		job->src_flush_io.done = src_flushed;
		job->src_flush_io.opaque = job;
		bm_image_flush(job->src, &job->src_flush_io);
	}
}

static void
enter_drain(struct bm_job *job)
{
	int r = bm_disk_quiesce(job->disk, job_drained);

	if (r < 0) {
		enter_abandon(job, r); /* back to READY; a later try */
		return;
	}
	bm_job_set_phase(job, BM_PHASE_DRAIN);
	job->quiesced = true;
	bm_job_step(job);
}

/* Would copying what is left stall the guest longer than allowed? */
static bool
stall_too_long(struct bm_job *job)
{
	uint64_t left = bm_mirror_remaining(job), elapsed, est_us;

	if (!job->opt.max_stall_us || !left)
		return false;
	elapsed = bm_now_ns() - job->copy_start_ns;
	if (!job->copy_busy_bytes || !elapsed)
		return true; /* no rate known: any copy is a guess */
	/* left / (bytes per us) */
	est_us = (uint64_t)((double)left * (double)elapsed / 1000.0 /
			    (double)job->copy_busy_bytes);
	return est_us > job->opt.max_stall_us;
}

static void
enter_final_copy(struct bm_job *job)
{
	if (job->goal == BM_GOAL_PIVOT) {
		pivot_hook(BM_PIVOT_DRAINED);
		if (stall_too_long(job)) {
			int err = bm_error(-ETIMEDOUT, "the final copy of %"
					   PRIu64 " bytes would exceed the "
					   "stall limit of %" PRIu64 " us",
					   bm_mirror_remaining(job),
					   job->opt.max_stall_us);

			back_to_ready(job, err);
			return;
		}
	}
	bm_job_set_phase(job, BM_PHASE_FINAL_COPY);
	bm_job_step(job);
}

static void
final_flushed(struct bm_job *job)
{
	if (job->goal == BM_GOAL_PIVOT)
		pivot_hook(BM_PIVOT_FLUSHED);
	enter_switch(job);
}

static void
enter_final_flush(struct bm_job *job)
{
	bm_job_set_phase(job, BM_PHASE_FINAL_FLUSH);
	if (!job->copied_since_flush && !job->guest_flush_since_flush) {
		/* Nothing since the last flush needs to be durable: spare
		 * the guest a flush in the stall. */
		final_flushed(job);
		return;
	}
	flush_dst(job);
}

static void
final_flush_done(struct bm_job *job, int err)
{
	if (err >= 0) {
		final_flushed(job);
		return;
	}
	job->error = -err;
	snprintf(job->error_msg, sizeof job->error_msg,
		 "flushing the destination: %s", strerror(-err));
	if (job->goal == BM_GOAL_PIVOT)
		enter_abandon(job, err);
	else
		enter_stopping(job, BM_GOAL_FAIL);
}

static void
enter_switch(struct bm_job *job)
{
	bm_job_set_phase(job, BM_PHASE_SWITCH);
	bm_job_step(job);
}

static void
enter_abandon(struct bm_job *job, int err)
{
	bm_copier_stop(&job->copier);
	job->abandon_err = err;
	bm_job_set_phase(job, BM_PHASE_ABANDON);
	bm_job_step(job);
}

static void
enter_stopping(struct bm_job *job, enum bm_job_goal goal)
{
	job->goal = goal;
	job->abandon_err = 0;
	bm_copier_stop(&job->copier);
	bm_job_set_phase(job, BM_PHASE_STOPPING);
	if (!job->quiesced) {
		job->quiesced = true;
		/* Without a drained callback (never, see bm_disk_quiesce)
		 * the disk still stops, and the tick below steps the job. */
		if (bm_disk_quiesce(job->disk, job_drained) < 0)
			bm_disk_quiesce(job->disk, NULL);
	}
	bm_mirror_tick_start(job); /* cancels a hung destination's requests */
	bm_job_step(job);
}

/*
 * Every destination flush completes here; the phase says which flush it
 * was.  A flush that fails where nobody waits for it counts as not done.
 */
static void
dst_flushed(struct bm_io *io, int err)
{
	struct bm_job *job = io->opaque;

	job->flushing = false;
	switch (job->phase) {
	case BM_PHASE_COPYING:
	case BM_PHASE_PAUSED:
		bm_mirror_ready_flushed(job, err);
		break;
	case BM_PHASE_FINAL_FLUSH:
		final_flush_done(job, err);
		return;
	default:
		if (err < 0)
			job->copied_since_flush = true;
		break;
	}
	bm_job_step(job);
}

/* Nothing in flight that would let the job out of STOPPING? */
static bool
stopped(struct bm_job *job)
{
	return job->disk->inflight == 0 && !bm_mirror_busy(job) &&
	       !bm_state_busy(job);
}

/* The tick may run a last time before the job lets go: stop it first;
 * its callback steps again. */
static bool
tick_stopped(struct bm_job *job)
{
	if (!job->tick.armed)
		return true;
	bm_loop_timer_cancel(job->loop, &job->tick);
	return false;
}

void
bm_job_step(struct bm_job *job)
{
	switch (job->phase) {
	case BM_PHASE_MAPPING:
	case BM_PHASE_READY:
	case BM_PHASE_PAUSED:
		break;
	case BM_PHASE_COPYING:
		/* Rule 6: READY once converged and flushed. */
		if (!job->mapping && bm_bitmap_count(&job->dirty) == 0 &&
		    job->copier.inflight == 0 && !job->flushing)
			bm_mirror_flush_for_ready(job);
		break;
	case BM_PHASE_PREFLUSH:
		/* State I/O finishes while the guest still runs too, so that
		 * it never adds to the stall. */
		if (!job->flushing && !job->src_flushing &&
		    !bm_state_busy(job))
			enter_drain(job);
		break;
	case BM_PHASE_DRAIN:
		if (job->disk->inflight == 0)
			enter_final_copy(job);
		break;
	case BM_PHASE_FINAL_COPY:
		if (bm_bitmap_count(&job->dirty) || job->copier.inflight ||
		    job->mapping) {
			bm_mirror_pump(job);
			break;
		}
		enter_final_flush(job);
		break;
	case BM_PHASE_FINAL_FLUSH:
		break; /* dst_flushed() moves on */
	case BM_PHASE_SWITCH:
		if (bm_state_busy(job) || !tick_stopped(job))
			break;
		if (job->goal == BM_GOAL_PIVOT)
			pivot(job);
		else
			finish(job, BM_PHASE_COMPLETED, false);
		break;
	case BM_PHASE_ABANDON:
		if (bm_mirror_busy(job))
			break;
		job->copier.stopped = false;
		back_to_ready(job, job->abandon_err);
		break;
	case BM_PHASE_STOPPING:
		if (!stopped(job) || !tick_stopped(job))
			break;
		finish(job, job->goal == BM_GOAL_CANCEL ? BM_PHASE_CANCELLED
							: BM_PHASE_FAILED,
		       false);
		break;
	case BM_PHASE_COMPLETED:
	case BM_PHASE_CANCELLED:
	case BM_PHASE_FAILED:
		break;
	}
}

/* Does the tick go on?  Not once the job only waits for it to stop. */
bool
bm_job_tick_wanted(struct bm_job *job)
{
	switch (job->phase) {
	case BM_PHASE_SWITCH:
	case BM_PHASE_COMPLETED:
	case BM_PHASE_CANCELLED:
	case BM_PHASE_FAILED:
		return false;
	case BM_PHASE_STOPPING:
		return !stopped(job);
	default:
		return true;
	}
}

/* ---- the calls that start or change an ending ----------------------- */

/* An error while ending (the final copy, a mirrored write, a flush). */
void
bm_job_ending_error(struct bm_job *job, int err)
{
	if (job->goal == BM_GOAL_PIVOT) {
		/* The disk stays on the source. */
		if (job->phase == BM_PHASE_ABANDON)
			job->abandon_err = err;
		else if (job->phase != BM_PHASE_SWITCH)
			enter_abandon(job, err);
		return;
	}
	job->error = -err;
	snprintf(job->error_msg, sizeof job->error_msg,
		 "the final copy failed: %s", strerror(-err));
	enter_stopping(job, BM_GOAL_FAIL);
}

/*
 * A forced cancel while a pivot or a clean cancel is under way (their
 * flush may hang on a dead destination): the ending becomes a plain
 * cancel, from whatever phase it is in.  Until pivot() runs, which it
 * does in one go on this thread, the source is still authoritative, so
 * nothing is lost.  The call waiting for the pivot learns -ECANCELED; one
 * waiting for a clean cancel learns that the job was cancelled, as it
 * asked.  Requests still in flight to the destination are cancelled by
 * the tick after a grace period (mirror.c).
 */
int
bm_job_force_cancel(struct bm_job *job, struct bm_call *call)
{
	if (job->goal != BM_GOAL_PIVOT && job->goal != BM_GOAL_SYNC_CANCEL)
		return bm_error(-EBUSY, "cannot cancel: the job is already "
				"ending");
	/* The call already waiting stays the one the ending answers. */
	if (job->goal == BM_GOAL_PIVOT)
		job->end_err = -ECANCELED;
	if (call)
		bm_job_wait_end(job, call);
	job->end_start_ns = bm_now_ns();
	enter_stopping(job, BM_GOAL_CANCEL);
	return 0;
}

/*
 * The caller's end_timeout_ms ran out during a pivot or a clean cancel
 * (the tick checks): as a forced cancel, but the waiting call learns
 * -ETIMEDOUT, and an ERROR event says why.
 */
void
bm_job_end_timed_out(struct bm_job *job)
{
	struct blockmirror_event ev = {
		.type = BLOCKMIRROR_EVENT_ERROR,
		.err = ETIMEDOUT,
	};
	char msg[200];

	if (job->goal != BM_GOAL_PIVOT && job->goal != BM_GOAL_SYNC_CANCEL)
		return;
	snprintf(msg, sizeof msg, "the %s did not finish within %" PRIu64
		 " ms; the destination is abandoned, the disk stays on the "
		 "source", job->goal == BM_GOAL_PIVOT ? "pivot" : "cancel",
		 job->opt.end_timeout_ms);
	ev.message = msg;
	bm_job_event(job, &ev);
	snprintf(job->error_msg, sizeof job->error_msg, "%s", msg);
	job->end_err = -ETIMEDOUT;
	job->end_start_ns = bm_now_ns();
	enter_stopping(job, BM_GOAL_CANCEL);
}

int
bm_job_end(struct bm_job *job, enum bm_job_goal goal, struct bm_call *call)
{
	if (job->goal != BM_GOAL_NONE) {
		/* A failure overrides an ending in progress; its caller
		 * learns the error. */
		if (goal == BM_GOAL_FAIL && job->goal != BM_GOAL_FAIL) {
			enter_stopping(job, BM_GOAL_FAIL);
			return 0;
		}
		return bm_error(-EBUSY, "the job is already ending");
	}
	job->goal = goal;
	job->goal_call = call;
	job->end_start_ns = bm_now_ns();
	job->end_shown = goal == BM_GOAL_PIVOT ? BLOCKMIRROR_JOB_PIVOTING
					       : job->state;
	if (goal == BM_GOAL_PIVOT || goal == BM_GOAL_SYNC_CANCEL)
		enter_preflush(job);
	else
		enter_stopping(job, goal);
	return 0;
}

/* The READY flush (mirror.c) completes through dst_flushed() too. */
void
bm_job_flush_dst(struct bm_job *job)
{
	flush_dst(job);
}
