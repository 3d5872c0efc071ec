/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The mirror job's public calls and its public state.
 *
 * Every call that acts on a job runs on the disk's loop (bm_disk_call)
 * and first asks job_permitted() whether the job's state allows it; a
 * refused call returns an error and changes nothing.  Internally a job is
 * in a phase (enum bm_job_phase, mirror.h; pivot.c moves it on); every
 * change of phase goes through bm_job_set_phase(), which derives the
 * public state from it (bm_job_public_state()), checks that against the
 * transition table and publishes it under state_lock, where other
 * threads read it (query and wait).  During an ending the public state
 * stays what it was when the ending began, PIVOTING for a pivot.
 *
 *   state       complete  cancel  pause  resume  set_speed  set_mode
 *   MAPPING     EBUSY     yes     EBUSY  EINVAL  yes        yes
 *   COPYING     EBUSY     yes     yes    EINVAL  yes        yes
 *   READY       yes       yes     yes    EINVAL  yes        yes
 *   PAUSED      EBUSY     yes     EINVAL yes     yes        yes
 *   PIVOTING    EBUSY     force   EBUSY  EBUSY   yes        EBUSY
 *   ended       EINVAL    EINVAL  EINVAL EINVAL  EINVAL     EINVAL
 *
 * While a cancel is in progress (the state it began in is shown), a
 * second cancel acts only forced (a clean cancel's flush may hang),
 * complete returns EBUSY, and pause and resume return EBUSY: nothing
 * pauses an ending.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "durable.h"
#include "errors.h"
#include "internal.h"
#include "mirror.h"
#include "nbd.h"
#include "server.h"

enum job_op {
	OP_COMPLETE,
	OP_CANCEL,
	OP_PAUSE,
	OP_RESUME,
	OP_SET_SPEED,
	OP_SET_MODE,
	OP_COUNT,
};

#define S(x) (1u << BLOCKMIRROR_JOB_##x)
#define ENDED (S(COMPLETED) | S(CANCELLED) | S(FAILED))

static const struct {
	const char *name;
	unsigned allowed; /* states where the call acts */
	unsigned busy;    /* states where it returns EBUSY; else EINVAL */
} permitted[OP_COUNT] = {
	[OP_COMPLETE] = { "complete", S(READY),
			  S(MAPPING) | S(COPYING) | S(PAUSED) | S(PIVOTING) },
	/* In PIVOTING only a forced cancel acts (call_op). */
	[OP_CANCEL] = { "cancel", S(MAPPING) | S(COPYING) | S(READY) |
				  S(PAUSED) | S(PIVOTING), 0 },
	[OP_PAUSE] = { "pause", S(COPYING) | S(READY),
		       S(MAPPING) | S(PIVOTING) },
	[OP_RESUME] = { "resume", S(PAUSED), S(PIVOTING) },
	[OP_SET_SPEED] = { "set-speed", ~ENDED & ~1u, 0 },
	[OP_SET_MODE] = { "set-mode", S(MAPPING) | S(COPYING) | S(READY) |
				      S(PAUSED), S(PIVOTING) },
};

/* Which state may follow which. */
static const unsigned transitions[] = {
	[BLOCKMIRROR_JOB_MAPPING] = S(COPYING) | S(PAUSED) | S(CANCELLED) |
				    S(FAILED),
	[BLOCKMIRROR_JOB_COPYING] = S(READY) | S(PAUSED) | S(CANCELLED) |
				    S(FAILED),
	[BLOCKMIRROR_JOB_READY] = S(PAUSED) | S(PIVOTING) | S(COMPLETED) |
				  S(CANCELLED) | S(FAILED),
	[BLOCKMIRROR_JOB_PAUSED] = S(MAPPING) | S(COPYING) | S(READY) |
				   S(COMPLETED) | S(CANCELLED) | S(FAILED),
	[BLOCKMIRROR_JOB_PIVOTING] = S(COMPLETED) | S(READY) | S(CANCELLED) |
				     S(FAILED),
	[BLOCKMIRROR_JOB_COMPLETED] = 0,
	[BLOCKMIRROR_JOB_CANCELLED] = 0,
	[BLOCKMIRROR_JOB_FAILED] = 0,
};

static const char *const state_names[] = {
	[BLOCKMIRROR_JOB_MAPPING] = "mapping",
	[BLOCKMIRROR_JOB_COPYING] = "copying",
	[BLOCKMIRROR_JOB_READY] = "ready",
	[BLOCKMIRROR_JOB_PAUSED] = "paused",
	[BLOCKMIRROR_JOB_PIVOTING] = "pivoting",
	[BLOCKMIRROR_JOB_COMPLETED] = "completed",
	[BLOCKMIRROR_JOB_CANCELLED] = "cancelled",
	[BLOCKMIRROR_JOB_FAILED] = "failed",
};

BM_EXPORT const char *
blockmirror_job_state_name(enum blockmirror_job_state s)
{
	return BM_NAME_OF(state_names, s);
}

BM_EXPORT const char *
blockmirror_mode_name(enum blockmirror_mode mode)
{
	switch (mode) {
	case BLOCKMIRROR_MODE_BACKGROUND:
		return "background";
	case BLOCKMIRROR_MODE_ACTIVE:
		return "active";
	case BLOCKMIRROR_MODE_AUTO:
		return "auto";
	}
	return NULL;
}

bool
bm_job_ended(enum blockmirror_job_state state)
{
	return (S(COMPLETED) | S(CANCELLED) | S(FAILED)) & (1u << state);
}

/* The public state of a phase.  During an ending it is what it was when
 * the ending began (PIVOTING for a pivot), until the ending ends. */
enum blockmirror_job_state
bm_job_public_state(const struct bm_job *job)
{
	switch (job->phase) {
	case BM_PHASE_MAPPING:
		return BLOCKMIRROR_JOB_MAPPING;
	case BM_PHASE_COPYING:
		return BLOCKMIRROR_JOB_COPYING;
	case BM_PHASE_READY:
		return BLOCKMIRROR_JOB_READY;
	case BM_PHASE_PAUSED:
		return BLOCKMIRROR_JOB_PAUSED;
	case BM_PHASE_COMPLETED:
		return BLOCKMIRROR_JOB_COMPLETED;
	case BM_PHASE_CANCELLED:
		return BLOCKMIRROR_JOB_CANCELLED;
	case BM_PHASE_FAILED:
		return BLOCKMIRROR_JOB_FAILED;
	default:
		return job->end_shown;
	}
}

void
bm_job_set_phase(struct bm_job *job, enum bm_job_phase phase)
{
	enum blockmirror_job_state state;

	job->phase = phase;
	state = bm_job_public_state(job);
	if (state == job->state)
		return;
	if (bm_job_ended(state) && !bm_job_ended(job->state))
		bm_state_job_end(job); /* the move is over: so is its state */
	pthread_mutex_lock(&job->state_lock);
	if (!(transitions[job->state] & (1u << state)))
		bm_warn("job: unexpected transition %s -> %s",
			state_names[job->state], state_names[state]);
	job->state = state;
	pthread_cond_broadcast(&job->state_cond);
	pthread_mutex_unlock(&job->state_lock);
}

void
bm_job_event(struct bm_job *job, const struct blockmirror_event *ev)
{
	if (job->opt.on_event)
		job->opt.on_event(job->opt.event_data, ev);
}

static int
job_permitted(struct bm_job *job, enum job_op op)
{
	unsigned s = 1u << job->state;

	/* An ending keeps the public state it began in (PIVOTING for a
	 * pivot), but nothing pauses it. */
	if (bm_job_ending(job) && (op == OP_PAUSE || op == OP_RESUME))
		return bm_error(-EBUSY, "cannot %s: the job is ending",
				permitted[op].name);
	if (permitted[op].allowed & s)
		return 0;
	if (permitted[op].busy & s)
		return bm_error(-EBUSY, "cannot %s: the job is %s",
				permitted[op].name, state_names[job->state]);
	return bm_error(-EINVAL, "cannot %s: the job is %s",
			permitted[op].name, state_names[job->state]);
}

/* ---- start ----------------------------------------------------------- */

static void
start_drained(struct blockmirror_disk *disk)
{
	struct bm_call *call = disk->start_call;
	struct bm_job *job = call->arg;

	disk->start_call = NULL;
	disk->job = job;
	/* Right over the base image, under any snapshot's filter, so the
	 * pivot leaves the snapshots standing. */
	bm_disk_swap_image(disk, job->src, &job->filter);
	bm_mirror_begin(job);
	bm_disk_unquiesce(disk);
	bm_waiter_signal(&call->w, 0);
}

static void
call_start(struct bm_call *call)
{
	struct bm_job *job = call->arg;
	struct blockmirror_disk *disk = job->disk;
	int r;

	if (disk->job || disk->start_call) {
		r = bm_error(-EBUSY, "the disk already has a running job");
		goto out;
	}
	/* Any image of the served chain: writing a backing file would
	 * change what every overlay on it reads. */
	for (struct bm_image *img = bm_disk_base(disk); img;
	     img = bm_image_backing(img)) {
		if (!bm_file_same(img->store, job->dst_name))
			continue;
		r = img == bm_disk_base(disk)
		    ? bm_error(-EINVAL, "%s: is the disk's own image",
			       job->dst_name)
		    : bm_error(-EINVAL, "%s: is a backing file of the disk "
			       "(%s); a move would overwrite what its overlays "
			       "read", job->dst_name, bm_disk_base(disk)->name);
		goto out;
	}
	if (job->dst->size != disk->size) {
		r = bm_error(-EINVAL, "%s: holds %" PRIu64 " bytes but the "
			     "disk has %" PRIu64 " (sizes must match)",
			     job->dst_name, job->dst->size, disk->size);
		goto out;
	}
	job->src = bm_disk_base(disk);
	job->loop = disk->loop;
	bm_image_set_loop(job->dst, disk->loop); /* opened on a private loop */
	job->mode = job->opt.mode == BLOCKMIRROR_MODE_ACTIVE
		    ? BLOCKMIRROR_MODE_ACTIVE : BLOCKMIRROR_MODE_BACKGROUND;
	job->auto_mode = job->opt.mode == BLOCKMIRROR_MODE_AUTO;
	r = bm_mirror_attach(job);
	if (r == 0)
		r = bm_state_job_start(job); /* with a state_dir */
	if (r < 0)
		goto out;
	/* Writes already in flight would land unseen by the job: let them
	 * finish before it starts watching. */
	r = bm_disk_quiesce(disk, start_drained);
	if (r < 0)
		goto out;
	disk->start_call = call;
	return;
out:
	bm_waiter_signal(&call->w, r);
}

static int
check_options(const struct blockmirror_job_options *o)
{
	if (!o || o->size < offsetof(struct blockmirror_job_options,
				     event_data) + sizeof(o->event_data))
		return bm_error(-EINVAL, "options: bad size");
	if ((unsigned)o->mode > BLOCKMIRROR_MODE_AUTO)
		return bm_error(-EINVAL, "unknown mode %d", (int)o->mode);
	if ((unsigned)o->on_error > BLOCKMIRROR_ON_ERROR_RETRY)
		return bm_error(-EINVAL, "unknown error policy %d",
				(int)o->on_error);
	if (o->granularity && (!bm_is_power_of_2(o->granularity) ||
			       o->granularity < 4 * BM_KiB ||
			       o->granularity > 64 * BM_MiB))
		return bm_error(-EINVAL, "granularity %" PRIu64 " must be a "
				"power of two from 4 KiB to 64 MiB",
				o->granularity);
	if (o->buf_size > 64 * BM_MiB)
		return bm_error(-EINVAL, "buffer size %u is larger than 64 MiB",
				o->buf_size);
	if (o->requests > 1024)
		return bm_error(-EINVAL, "%u requests in flight is too many",
				o->requests);
	if (o->link && o->on_pivot)
		return bm_error(-EINVAL, "give a link or an on_pivot callback, "
				"not both");
	if (o->flags & ~(BLOCKMIRROR_JOB_CREATE | BLOCKMIRROR_JOB_RESUME |
			 BLOCKMIRROR_JOB_NOFOLLOW))
		return bm_error(-EINVAL, "unknown flags 0x%x", o->flags);
	if (BM_SIZE_COVERS(o, struct blockmirror_job_options, sync) &&
	    (unsigned)o->sync > BLOCKMIRROR_SYNC_NONE)
		return bm_error(-EINVAL, "unknown sync mode %d", (int)o->sync);
	return 0;
}

/*
 * The create options of a new destination: what keeps the guest's view
 * (bm_image_create_options), and for sync TOP the source's backing file,
 * so the destination reads through to the same chain (docs/chains.md).
 * A relative backing name is made absolute: the destination may live in
 * another directory.  *out is malloc'd or NULL.
 */
static int
dest_create_options(struct bm_image *src, enum blockmirror_format fmt,
		    enum blockmirror_sync sync, char **out)
{
	struct bm_image_facts facts;
	char *backing = NULL;
	int r;

	*out = NULL;
	bm_image_facts(src, &facts);
	if (sync == BLOCKMIRROR_SYNC_TOP && facts.backing_path) {
		const char *fname = blockmirror_format_name(
			facts.backing_format);

		bool vhdx = fmt == BLOCKMIRROR_FORMAT_VHDX &&
			    facts.backing_format == BLOCKMIRROR_FORMAT_VHDX;

		if (fmt != BLOCKMIRROR_FORMAT_QCOW2 && !vhdx)
			return bm_error(-ENOTSUP, "sync top: a new %s "
					"destination cannot have this backing "
					"file (create it yourself)",
					blockmirror_format_name(fmt));
		if (strchr(facts.backing_path, ','))
			return bm_error(-EINVAL, "sync top: backing file name "
					"'%s' has a comma", facts.backing_path);
		if (vhdx ? asprintf(&backing, "parent=%s",
				    facts.backing_path) < 0 :
			   asprintf(&backing, "backing_file=%s%s%s",
				    facts.backing_path,
				    fname ? ",backing_fmt=" : "",
				    fname ? fname : "") < 0)
			return bm_error(-ENOMEM, "out of memory");
	}
	r = bm_image_create_options(src, fmt, backing, out);
	free(backing);
	return r;
}

static void
job_destroy(struct bm_job *job)
{
	bm_state_job_free(job);
	bm_mirror_fini(job);
	bm_image_close(job->dst);
	pthread_cond_destroy(&job->state_cond);
	pthread_mutex_destroy(&job->state_lock);
	free(job->dst_name);
	free(job->link);
	free(job);
}

BM_EXPORT struct blockmirror_job *
blockmirror_job_start(struct blockmirror_disk *disk, const char *destination,
		      const struct blockmirror_job_options *options)
{
	struct bm_call call = { .fn = call_start };
	struct bm_loop *tmp = NULL;
	char *create_options = NULL;
	struct bm_job *job;
	enum blockmirror_format fmt;
	bool created = false;
	unsigned dflags;
	int r;

	bm_error_clear();
	if (!disk || !destination) {
		r = bm_error(-EINVAL, "bad arguments");
		goto fail;
	}
	r = check_options(options);
	if (r < 0)
		goto fail;
	if (bm_nbd_is_uri(destination) &&
	    bm_server_is_own_export(disk, destination)) {
		r = bm_error(-EINVAL, "%s: is this disk's own NBD export; a "
			     "move there would write the disk into itself",
			     destination);
		goto fail;
	}
	job = calloc(1, sizeof *job);
	if (!job || !(job->dst_name = strdup(destination)) ||
	    (options->link && !(job->link = strdup(options->link)))) {
		if (job)
			free(job->dst_name);
		free(job);
		r = bm_error(-ENOMEM, "out of memory");
		goto fail;
	}
	job->disk = disk;
	memcpy(&job->opt, options, BM_MIN(options->size, sizeof job->opt));
	job->opt.size = sizeof job->opt;
	job->opt.link = job->link;
	job->granularity = options->granularity;
	job->phase = BM_PHASE_MAPPING;
	job->state = BLOCKMIRROR_JOB_MAPPING;
	pthread_mutex_init(&job->state_lock, NULL);
	pthread_cond_init(&job->state_cond, NULL);

	/* A source an earlier pivot left may still be closing; it may be
	 * this job's destination. */
	bm_disk_join_closers(disk);
	/* Open the destination on a private loop, here, so the disk's loop
	 * never waits on it; call_start hands it over. */
	r = bm_loop_new(8, &tmp);
	if (r < 0)
		goto fail_job;
	fmt = options->format;
	/* The bulk copy streams past the page cache; the guest's mirrored
	 * writes, and the disk's after the pivot, stay cached. */
	dflags = disk->open_flags | BM_IMAGE_DIRECT_BULK |
		 ((options->flags & BLOCKMIRROR_JOB_NOFOLLOW) ?
		  BM_IMAGE_NOFOLLOW : 0);
	if (options->flags & BLOCKMIRROR_JOB_CREATE) {
		if (fmt == BLOCKMIRROR_FORMAT_AUTO)
			fmt = bm_disk_base(disk)->format;
		r = dest_create_options(bm_disk_base(disk), fmt, job->opt.sync,
					&create_options);
		if (r == 0)
			r = bm_image_create(tmp, destination, fmt, disk->size,
					    create_options, false, dflags,
					    &job->dst);
		free(create_options);
		created = r == 0 && !bm_nbd_is_uri(destination);
		/* The pivot will name this file: its name must survive a
		 * power loss before anything counts on it. */
		if (created)
			r = bm_durable_sync_parent(destination);
	} else {
		r = bm_image_open(tmp, destination, fmt,
				  dflags | BM_IMAGE_WRITE, &job->dst);
	}
	if (r < 0)
		goto fail_job;
	/* The destination's cluster, within 64 KiB..256 KiB: a VHDX block
	 * of 32 MiB as the chunk would make every copy request 32 MiB, and
	 * a guest write that overtakes a copy (rule 4) costs a chunk copied
	 * again: 1 MiB chunks cost a VHDX move 10% more bytes and a third
	 * more time under a 4 KiB random-write guest than 256 KiB ones. */
	if (!job->granularity)
		job->granularity = BM_MAX(64 * BM_KiB,
					  BM_MIN(job->dst->cluster_size,
						 256 * BM_KiB));
	/* Allocated here, not on the disk's loop: faulting in the copy
	 * buffers can take tens of milliseconds the guest would wait. */
	r = bm_mirror_init(job, disk->size);
	if (r < 0)
		goto fail_job;
	call.arg = job;
	r = bm_disk_call(disk, &call);
	if (r < 0)
		goto fail_job;
	bm_loop_free(tmp);
	return (struct blockmirror_job *)job;

fail_job:
	if (created) {
		/* Keep the first error; a partial file left behind is
		 * worth a warning of its own. */
		char first[512];

		snprintf(first, sizeof first, "%s", blockmirror_last_error());
		if (bm_durable_unlink(destination) < 0)
			bm_warn("%s: the new destination could not be removed: "
				"%s", destination, blockmirror_last_error());
		bm_error(r, "%s", first);
	}
	job_destroy(job);
	bm_loop_free(tmp);
fail:
	bm_api_fail("blockmirror_job_start", r);
	errno = -r;
	return NULL;
}

/* ---- calls on a running job ------------------------------------------ */

static struct bm_job *
to_job(struct blockmirror_job *j)
{
	return (struct bm_job *)j;
}

static void
call_query(struct bm_call *call)
{
	struct bm_job *job = call->arg;
	struct blockmirror_job_info *info = call->arg2;
	bool running = !bm_job_ended(job->state);

	info->state = job->state;
	info->mode = job->mode;
	info->auto_mode = job->auto_mode;
	info->ready = job->ready;
	info->actively_synced = job->actively_synced && running &&
				job->mode == BLOCKMIRROR_MODE_ACTIVE;
	info->paused = job->state == BLOCKMIRROR_JOB_PAUSED;
	info->bytes_total = job->disk->size;
	info->dirty_bytes = bm_bitmap_dirty_bytes(&job->dirty);
	info->bytes_remaining = bm_mirror_remaining(job);
	if (job->state == BLOCKMIRROR_JOB_MAPPING)
		info->bytes_remaining = info->bytes_total;
	if (job->state == BLOCKMIRROR_JOB_COMPLETED)
		info->bytes_remaining = info->dirty_bytes = 0;
	info->bytes_done = info->bytes_total - BM_MIN(info->bytes_total,
						      info->bytes_remaining);
	info->bytes_copied = job->bytes_copied;
	info->bytes_mirrored = job->bytes_mirrored;
	info->speed = job->rate.speed;
	info->pivot_stall_us = job->pivot_stall_us;
	info->granularity = job->granularity;
	info->error = job->error;
	bm_waiter_signal(&call->w, 0);
}

BM_EXPORT int
blockmirror_job_query(struct blockmirror_job *j,
		      struct blockmirror_job_info *info)
{
	struct bm_call call = { .fn = call_query, .arg = j, .arg2 = info };
	int r;

	bm_error_clear();
	if (!j || !info || info->size < sizeof *info)
		return bm_api_fail("blockmirror_job_query",
				   bm_error(-EINVAL, "bad arguments"));
	r = bm_disk_call(to_job(j)->disk, &call);
	return r < 0 ? bm_api_fail("blockmirror_job_query", r) : 0;
}

static void
call_op(struct bm_call *call)
{
	struct bm_job *job = call->arg;
	enum job_op op = (enum job_op)call->i;
	int r = job_permitted(job, op);

	if (r < 0)
		goto out;
	switch (op) {
	case OP_COMPLETE:
		r = bm_job_end(job, BM_GOAL_PIVOT, call);
		if (r == 0)
			return; /* signalled when the pivot ends */
		break;
	case OP_CANCEL: {
		bool sync;

		if (job->goal != BM_GOAL_NONE) {
			/* Already ending: a forced cancel overrides a pivot
			 * or a clean cancel (pivot.c). */
			r = call->u64 ? bm_job_force_cancel(job, call)
				      : bm_error(-EBUSY, "cannot cancel: the "
						 "job is %s", job->goal ==
						 BM_GOAL_PIVOT ? "pivoting"
						 : "already ending");
			if (r == 0)
				return;
			break;
		}
		sync = job->ready && !call->u64 &&
		       (job->phase == BM_PHASE_READY ||
			(job->phase == BM_PHASE_PAUSED &&
			 job->paused_from == BM_PHASE_READY));

		r = bm_job_end(job, sync ? BM_GOAL_SYNC_CANCEL
					 : BM_GOAL_CANCEL, call);
		if (r == 0)
			return;
		break;
	}
	case OP_PAUSE: {
		struct blockmirror_event ev = { .type = BLOCKMIRROR_EVENT_PAUSED };

		job->paused_from = job->phase;
		bm_job_set_phase(job, BM_PHASE_PAUSED);
		bm_job_event(job, &ev);
		break;
	}
	case OP_RESUME: {
		struct blockmirror_event ev = { .type = BLOCKMIRROR_EVENT_RESUMED };

		job->retry_after_ns = 0;
		bm_job_set_phase(job, job->paused_from);
		bm_job_event(job, &ev);
		bm_mirror_remap(job); /* paused by a mapping error */
		bm_mirror_pump(job);
		bm_job_step(job);
		break;
	}
	case OP_SET_SPEED:
		bm_rate_set(&job->rate, call->u64, bm_now_ns());
		bm_mirror_pump(job);
		break;
	case OP_SET_MODE:
		if (call->u64 > BLOCKMIRROR_MODE_AUTO) {
			r = bm_error(-EINVAL, "unknown mode");
			break;
		}
		job->auto_mode = call->u64 == BLOCKMIRROR_MODE_AUTO;
		job->auto_stalls = 0;
		job->auto_last_remaining = 0;
		job->mode = call->u64 == BLOCKMIRROR_MODE_ACTIVE
			    ? BLOCKMIRROR_MODE_ACTIVE
			    : BLOCKMIRROR_MODE_BACKGROUND;
		/* Actively synced again only after a clean pass in active
		 * mode: the next READY check cannot tell, so require that
		 * nothing is dirty right now. */
		job->actively_synced = job->mode == BLOCKMIRROR_MODE_ACTIVE &&
				       job->ready &&
				       bm_bitmap_count(&job->dirty) == 0 &&
				       job->copier.inflight == 0;
		break;
	default:
		break;
	}
out:
	bm_waiter_signal(&call->w, r);
}

static int
job_call(struct blockmirror_job *j, const char *name, enum job_op op,
	 uint64_t arg)
{
	struct bm_call call = { .fn = call_op, .arg = j, .i = (int)op,
				.u64 = arg };
	int r;

	bm_error_clear();
	if (!j)
		return bm_api_fail(name, bm_error(-EINVAL, "no job"));
	r = bm_disk_call(to_job(j)->disk, &call);
	return r < 0 ? bm_api_fail(name, r) : 0;
}

BM_EXPORT int
blockmirror_job_complete(struct blockmirror_job *j)
{
	return job_call(j, "blockmirror_job_complete", OP_COMPLETE, 0);
}

BM_EXPORT int
blockmirror_job_cancel(struct blockmirror_job *j, bool force)
{
	return job_call(j, "blockmirror_job_cancel", OP_CANCEL, force);
}

BM_EXPORT int
blockmirror_job_pause(struct blockmirror_job *j)
{
	return job_call(j, "blockmirror_job_pause", OP_PAUSE, 0);
}

BM_EXPORT int
blockmirror_job_resume(struct blockmirror_job *j)
{
	return job_call(j, "blockmirror_job_resume", OP_RESUME, 0);
}

BM_EXPORT int
blockmirror_job_set_speed(struct blockmirror_job *j, uint64_t bytes_per_second)
{
	return job_call(j, "blockmirror_job_set_speed", OP_SET_SPEED,
			bytes_per_second);
}

BM_EXPORT int
blockmirror_job_set_mode(struct blockmirror_job *j, enum blockmirror_mode mode)
{
	return job_call(j, "blockmirror_job_set_mode", OP_SET_MODE,
			(uint64_t)mode);
}

BM_EXPORT int
blockmirror_job_wait(struct blockmirror_job *j, enum blockmirror_job_state state,
		     int timeout_ms)
{
	struct bm_job *job = to_job(j);
	struct timespec deadline;
	int r = 0;

	bm_error_clear();
	if (!job)
		return bm_api_fail("blockmirror_job_wait", -EINVAL);
	if (timeout_ms >= 0)
		bm_deadline(&deadline, timeout_ms);
	pthread_mutex_lock(&job->state_lock);
	while (job->state != state && !bm_job_ended(job->state)) {
		if (timeout_ms < 0) {
			pthread_cond_wait(&job->state_cond, &job->state_lock);
		} else if (pthread_cond_timedwait(&job->state_cond,
						  &job->state_lock,
						  &deadline) == ETIMEDOUT) {
			r = -ETIMEDOUT;
			break;
		}
	}
	if (r == 0)
		r = (int)job->state;
	pthread_mutex_unlock(&job->state_lock);
	if (r < 0)
		return bm_api_fail("blockmirror_job_wait",
				   bm_error(r, "timed out"));
	return r;
}

BM_EXPORT void
blockmirror_job_free(struct blockmirror_job *j)
{
	struct bm_job *job = to_job(j);
	bool ended;

	if (!job)
		return;
	pthread_mutex_lock(&job->state_lock);
	ended = bm_job_ended(job->state);
	pthread_mutex_unlock(&job->state_lock);
	if (!ended) {
		blockmirror_job_cancel(j, true);
		blockmirror_job_wait(j, BLOCKMIRROR_JOB_CANCELLED, -1);
	}
	job_destroy(job);
}

static void
call_cancel_for_close(struct bm_call *call)
{
	struct blockmirror_disk *disk = call->arg;
	struct bm_job *job = disk->job;

	/* The disk goes away only once the job has let go of it. */
	if (!job)
		bm_waiter_signal(&call->w, 0);
	else if (job->goal == BM_GOAL_NONE)
		bm_job_end(job, BM_GOAL_CANCEL, call);
	else if (job->goal == BM_GOAL_PIVOT ||
		 job->goal == BM_GOAL_SYNC_CANCEL)
		bm_job_force_cancel(job, call);
	else
		bm_job_wait_end(job, call); /* signalled when it has ended */
}

void
bm_job_cancel_for_close(struct blockmirror_disk *disk)
{
	struct bm_call call = { .fn = call_cancel_for_close, .arg = disk };

	bm_disk_call(disk, &call);
}
