/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * How a mirror job ends: the pivot, the two cancels, and failure.
 *
 * Every ending starts the same way: the disk is quiesced (new guest
 * requests queue, requests in flight finish), so that when the job lets go
 * of the disk no guest write is half mirrored.  Then:
 *
 *   PIVOT        copy what is still dirty, flush the destination, make the
 *                switch durable (link or on_pivot), swap the disk's image,
 *                release the queue: the guest continues on the destination.
 *   SYNC_CANCEL  the same without the switch: the destination is left a
 *                consistent, flushed point-in-time copy; the guest
 *                continues on the source.
 *   CANCEL       stop copying, wait for copies in flight, let go.
 *   FAIL         the same, after an error the policy says to report.
 *
 * bm_job_step() is the one place that moves an ending forward; every
 * completion that could unblock it (drain, copy, flush, tick) calls it.
 * Until pivot_switch() has returned, the source is authoritative and
 * complete; after, the destination is.  A pivot that cannot be made
 * durable leaves the disk on the source and the job READY.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

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

/*
 * The pivot.  Called with the disk quiesced and drained, nothing dirty,
 * nothing being copied and the destination flushed, so the destination
 * holds exactly what every completed guest write left on the source.
 * First the switch is made durable, so that a crash from here on finds
 * the destination named; then the disk swaps its image and releases the
 * queued requests to the destination.
 */
static int
pivot_switch(struct bm_job *job)
{
	struct blockmirror_disk *disk = job->disk;
	struct bm_image *old;
	bool renamed = false;
	int r = 0;

	if (job->link)
		r = relink(job->link, job->dst_name, &renamed);
	else if (job->opt.on_pivot)
		r = job->opt.on_pivot(job->opt.pivot_data, job->dst_name);
	if (r < 0 && !renamed)
		return r;
	if (r < 0) {
		/* The link names the destination: so must the disk.  Its
		 * durability is unknown; say so and go on. */
		struct blockmirror_event ev = {
			.type = BLOCKMIRROR_EVENT_ERROR,
			.err = -r,
			.message = blockmirror_last_error(),
		};

		bm_warn("pivot: %s; the link names %s, which the disk now "
			"runs on, but may not after a power loss",
			blockmirror_last_error(), job->dst_name);
		bm_job_event(job, &ev);
	}
	pivot_hook(BM_PIVOT_DURABLE);

	old = disk->image;
	disk->image = job->dst;
	disk->job = NULL;
	job->dst = NULL;
	job->src = NULL;
	job->pivot_stall_us = bm_disk_unquiesce(disk) / 1000;
	job->quiesced = false;
	bm_image_close(old);
	pivot_hook(BM_PIVOT_SWAPPED);
	bm_info("pivot: now on %s, guest stalled %" PRIu64 " us",
		disk->image->name, job->pivot_stall_us);
	return 0;
}

/* ---- the endings ----------------------------------------------------- */

static void
signal_call(struct bm_job *job, int err)
{
	struct bm_call *call = job->goal_call;
	struct bm_call *close = NULL;

	job->goal_call = NULL;
	if (bm_job_ended(job->state)) {
		close = job->close_call;
		job->close_call = NULL;
	}
	/* Nothing of the job is touched after this: a waiter may free it
	 * as soon as it wakes. */
	if (close)
		bm_waiter_signal(&close->w, 0);
	if (call)
		bm_waiter_signal(&call->w, err);
}

static void
finish(struct bm_job *job, enum blockmirror_job_state state, bool pivoted)
{
	struct blockmirror_event ev = { 0 };
	enum bm_job_goal goal = job->goal;

	if (!pivoted) {
		/* The state goes before the queued writes are let go: they
		 * reach the source unseen by the job, so a state left on
		 * disk would resume a move that misses them. */
		bm_state_job_end(job);
		job->disk->job = NULL;
		bm_image_close(job->dst);
		job->dst = NULL;
		if (job->quiesced)
			bm_disk_unquiesce(job->disk);
		job->quiesced = false;
	}
	switch (state) {
	case BLOCKMIRROR_JOB_COMPLETED:
		ev.type = BLOCKMIRROR_EVENT_COMPLETED;
		ev.pivoted = pivoted;
		break;
	case BLOCKMIRROR_JOB_CANCELLED:
		ev.type = BLOCKMIRROR_EVENT_CANCELLED;
		break;
	default:
		ev.type = BLOCKMIRROR_EVENT_FAILED;
		ev.err = job->error;
		ev.message = job->error_msg;
		break;
	}
	/* The event first: whoever waits for the state finds it delivered. */
	bm_job_event(job, &ev);
	bm_job_set_state(job, state);
	signal_call(job, goal == BM_GOAL_FAIL ? -job->error : 0);
}

/* Give up on a pivot: back to READY on the source. */
static void
abandon_pivot(struct bm_job *job, int err)
{
	job->goal = BM_GOAL_NONE;
	job->drained = false;
	job->final_flushed = false;
	job->stall_checked = false;
	if (job->quiesced)
		bm_disk_unquiesce(job->disk);
	job->quiesced = false;
	bm_job_set_state(job, BLOCKMIRROR_JOB_READY);
	signal_call(job, err);
	bm_mirror_pump(job);
}

static void
job_drained(struct blockmirror_disk *disk)
{
	struct bm_job *job = disk->job;

	if (job->goal == BM_GOAL_PIVOT)
		pivot_hook(BM_PIVOT_DRAINED);
	job->drained = true;
	bm_job_step(job);
}

static void
final_flush_done(struct bm_io *io, int err)
{
	struct bm_job *job = io->opaque;

	job->flushing_final = false;
	if (err < 0 && job->goal == BM_GOAL_CANCEL) {
		/* Cancelled by force while flushing: nothing to keep. */
		bm_job_step(job);
		return;
	}
	if (err < 0) {
		job->error = -err;
		snprintf(job->error_msg, sizeof job->error_msg,
			 "flushing the destination: %s", strerror(-err));
		if (job->goal == BM_GOAL_PIVOT) {
			abandon_pivot(job, err);
			return;
		}
		job->goal = BM_GOAL_FAIL;
	} else {
		job->final_flushed = true;
		if (job->goal == BM_GOAL_PIVOT)
			pivot_hook(BM_PIVOT_FLUSHED);
	}
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

void
bm_job_step(struct bm_job *job)
{
	if (bm_job_ended(job->state))
		return;

	if (job->goal == BM_GOAL_NONE) {
		/* Rule 6: READY once converged and flushed. */
		if (job->state == BLOCKMIRROR_JOB_COPYING && !job->mapping &&
		    bm_bitmap_count(&job->dirty) == 0 &&
		    job->copier.inflight == 0 && !job->flushing) {
			bm_job_flush_for_ready(job);
		}
		return;
	}

	if (!job->drained)
		return;

	if (job->goal == BM_GOAL_PIVOT && !job->stall_checked) {
		job->stall_checked = true;
		if (stall_too_long(job)) {
			bm_error(-ETIMEDOUT, "the final copy of %" PRIu64
				 " bytes would exceed the stall limit of %"
				 PRIu64 " us", bm_mirror_remaining(job),
				 job->opt.max_stall_us);
			abandon_pivot(job, -ETIMEDOUT);
			return;
		}
	}

	if (job->pivot_failed_err) {
		int err = job->pivot_failed_err;

		if (job->copier.inflight || job->mapping)
			return;
		job->pivot_failed_err = 0;
		job->copier.stopped = false;
		abandon_pivot(job, err);
		return;
	}

	if (job->goal == BM_GOAL_PIVOT || job->goal == BM_GOAL_SYNC_CANCEL) {
		if (bm_bitmap_count(&job->dirty) || job->copier.inflight ||
		    job->mapping) {
			bm_mirror_pump(job);
			return;
		}
		if (!job->final_flushed && !job->copied_since_flush &&
		    !job->guest_flush_since_flush && !job->flushing &&
		    !job->flushing_final) {
			/* Nothing since the last flush needs to be durable:
			 * spare the guest a flush in the stall. */
			job->final_flushed = true;
			if (job->goal == BM_GOAL_PIVOT)
				pivot_hook(BM_PIVOT_FLUSHED);
		}
		if (!job->final_flushed) {
			if (!job->flushing_final && !job->flushing) {
				job->flushing_final = true;
				bm_mirror_dst_flush_started(job);
				memset(&job->flush_io, 0, sizeof job->flush_io);
				job->flush_io.done = final_flush_done;
				job->flush_io.opaque = job;
				bm_image_flush(job->dst, &job->flush_io);
			}
			return;
		}
	} else if (job->copier.inflight || job->mapping || job->flushing ||
		   job->flushing_final) {
		return;
	}

	if (bm_state_busy(job))
		return; /* its completion steps again */

	/* Nothing of ours is in flight but the tick: stop it first. */
	job->finishing = true;
	if (job->tick.armed) {
		bm_loop_timer_cancel(job->loop, &job->tick);
		return; /* its callback steps again */
	}

	switch (job->goal) {
	case BM_GOAL_PIVOT: {
		int r = pivot_switch(job);

		if (r < 0) {
			struct blockmirror_event ev = {
				.type = BLOCKMIRROR_EVENT_ERROR,
				.err = -r,
				.message = blockmirror_last_error(),
			};

			job->finishing = false;
			bm_job_event(job, &ev);
			abandon_pivot(job, r);
			bm_mirror_tick_start(job);
			return;
		}
		finish(job, BLOCKMIRROR_JOB_COMPLETED, true);
		break;
	}
	case BM_GOAL_SYNC_CANCEL:
		finish(job, BLOCKMIRROR_JOB_COMPLETED, false);
		break;
	case BM_GOAL_CANCEL:
		finish(job, BLOCKMIRROR_JOB_CANCELLED, false);
		break;
	default:
		finish(job, BLOCKMIRROR_JOB_FAILED, false);
		break;
	}
}

static void
preflush_done(struct bm_io *io, int err)
{
	struct bm_job *job = io->opaque;

	job->preflushing = false;
	if (err < 0) {
		/* Counted as not flushed; the final flush will report. */
		job->copied_since_flush = true;
	}
	/* Whatever the goal is now (a forced cancel or a failure may have
	 * replaced it), the ending goes on from a quiesced disk. */
	bm_job_quiesce_for_end(job);
	bm_job_step(job);
}

/*
 * Quiesce for an ending, once the preflush is done.  State I/O in flight
 * (state-io.c: a clearing pass flushes the destination) finishes first,
 * while the guest still runs, so that it never adds to the stall; its
 * completion calls this again.
 */
void
bm_job_quiesce_for_end(struct bm_job *job)
{
	if (job->quiesced || job->preflushing || bm_state_busy(job) ||
	    job->goal == BM_GOAL_NONE || bm_job_ended(job->state))
		return;
	job->quiesced = true;
	bm_disk_quiesce(job->disk, job_drained);
}

void
bm_job_ending_error(struct bm_job *job, int err)
{
	if (job->goal == BM_GOAL_PIVOT) {
		/* The final copy failed: the disk stays on the source. */
		bm_copier_stop(&job->copier);
		job->pivot_failed_err = err;
		return;
	}
	job->error = -err;
	snprintf(job->error_msg, sizeof job->error_msg,
		 "the final copy failed: %s", strerror(-err));
	job->goal = BM_GOAL_FAIL;
	bm_copier_stop(&job->copier);
}

/*
 * A forced cancel while a pivot or a clean cancel is under way (their
 * flush may hang on a dead destination): the ending becomes a plain
 * cancel.  Until pivot_switch() runs, which it does in one go on this
 * thread, the source is still authoritative, so nothing is lost.  The
 * call waiting for the pivot learns -ECANCELED; one waiting for a clean
 * cancel learns that the job was cancelled, as it asked.  Requests still
 * in flight to the destination are cancelled by the tick after a grace
 * period (mirror.c).
 */
int
bm_job_force_cancel(struct bm_job *job, struct bm_call *call)
{
	struct bm_call *prev = job->goal_call;

	if (job->goal != BM_GOAL_PIVOT && job->goal != BM_GOAL_SYNC_CANCEL)
		return bm_error(-EBUSY, "cannot cancel: the job is already "
				"ending");
	if (prev)
		bm_waiter_signal(&prev->w, job->goal == BM_GOAL_PIVOT ?
				 bm_error(-ECANCELED, "the pivot was "
					  "cancelled") : 0);
	job->goal = BM_GOAL_CANCEL;
	job->goal_call = call;
	job->end_start_ns = bm_now_ns();
	job->pivot_failed_err = 0;
	bm_copier_stop(&job->copier);
	bm_mirror_tick_start(job);
	bm_job_quiesce_for_end(job);
	bm_job_step(job);
	return 0;
}

int
bm_job_end(struct bm_job *job, enum bm_job_goal goal, struct bm_call *call)
{
	if (job->goal != BM_GOAL_NONE) {
		/* A failure overrides an ending in progress; its caller
		 * learns the error. */
		if (goal == BM_GOAL_FAIL && job->goal != BM_GOAL_FAIL) {
			job->goal = BM_GOAL_FAIL;
			bm_copier_stop(&job->copier);
			bm_job_step(job);
			return 0;
		}
		return bm_error(-EBUSY, "the job is already ending");
	}
	job->goal = goal;
	job->goal_call = call;
	job->end_start_ns = bm_now_ns();
	job->drained = false;
	job->final_flushed = false;
	job->stall_checked = false;
	if (goal == BM_GOAL_CANCEL || goal == BM_GOAL_FAIL)
		bm_copier_stop(&job->copier);
	if (goal == BM_GOAL_PIVOT)
		bm_job_set_state(job, BLOCKMIRROR_JOB_PIVOTING);
	if ((goal == BM_GOAL_PIVOT || goal == BM_GOAL_SYNC_CANCEL) &&
	    !job->flushing) {
		/* Flush while the guest still runs, so that the flush in
		 * the stall finds little or nothing to write. */
		job->preflushing = true;
		bm_mirror_dst_flush_started(job);
		memset(&job->flush_io, 0, sizeof job->flush_io);
		job->flush_io.done = preflush_done;
		job->flush_io.opaque = job;
		bm_image_flush(job->dst, &job->flush_io);
		return 0;
	}
	job->quiesced = true;
	bm_disk_quiesce(job->disk, job_drained);
	return 0;
}
