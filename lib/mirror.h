/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The mirror job's internals.  mirror.c holds the rules (what is dirty,
 * where guest writes land, what the bulk copy takes next, when the job is
 * READY, what an error does) and the filter image through which the disk
 * sends guest requests while the job runs; pivot.c holds the phase
 * machine and the endings (pivot, cancel, failure); job.c holds the
 * public calls and the public state.  All of it runs on the disk's loop
 * thread; only `state` and its friends are also read by other threads,
 * under state_lock.
 */
#ifndef BM_MIRROR_H
#define BM_MIRROR_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include <blockmirror/blockmirror.h>

#include "bitmap.h"
#include "copy.h"
#include "disk.h"
#include "extent.h"
#include "loop.h"
#include "rate.h"
#include "state.h"

/*
 * Where a job is.  Every phase has one enter_*() function (pivot.c,
 * mirror.c) and one case in bm_job_step(); completions call bm_job_step()
 * and it moves the job on when the phase's exit condition holds.
 *
 *   MAPPING -> COPYING -> READY            (PAUSED from any of the three)
 *   pivot, clean cancel:
 *     PREFLUSH -> DRAIN -> FINAL_COPY -> FINAL_FLUSH -> SWITCH -> COMPLETED
 *     (a pivot that fails before the switch: ABANDON -> READY)
 *   cancel, failure, forced cancel (from any phase that is not ended):
 *     STOPPING -> CANCELLED or FAILED
 *
 * The public state (enum blockmirror_job_state) is derived from it:
 * bm_job_public_state().
 */
enum bm_job_phase {
	BM_PHASE_MAPPING,      /* block status of the source (rule 1) */
	BM_PHASE_COPYING,      /* bulk copy; the READY flush once converged */
	BM_PHASE_READY,        /* converged and flushed */
	BM_PHASE_PAUSED,       /* paused_from says where resume goes */
	BM_PHASE_PREFLUSH,     /* destination flush while the guest runs */
	BM_PHASE_DRAIN,        /* disk quiesced, guest requests in flight
				  finish */
	BM_PHASE_FINAL_COPY,   /* copy what is still dirty (guest stalled) */
	BM_PHASE_FINAL_FLUSH,  /* flush the destination if anything needs it */
	BM_PHASE_SWITCH,       /* stop the tick, then switch (or let go) */
	BM_PHASE_ABANDON,      /* the pivot failed: copies finish, then READY */
	BM_PHASE_STOPPING,     /* cancel/fail: quiesced, the job's own I/O and
				  the guest's finish */
	BM_PHASE_COMPLETED,
	BM_PHASE_CANCELLED,
	BM_PHASE_FAILED,
};

/* Which ending a job is in; BM_GOAL_NONE while it runs.  The phase says
 * where it is; the goal says only where it ends. */
enum bm_job_goal {
	BM_GOAL_NONE,
	BM_GOAL_PIVOT,        /* complete: switch the disk to the destination */
	BM_GOAL_SYNC_CANCEL,  /* cancel after READY: consistent copy, no switch */
	BM_GOAL_CANCEL,       /* cancel: stop as soon as nothing is in flight */
	BM_GOAL_FAIL,         /* the error policy said report */
};

/*
 * A guest write, write-zeroes or discard through the mirror filter: the
 * job's state for it, from the filter's free list (mirror.c).  `guest` is
 * the disk's request, completed when the write is done.
 */
struct bm_mirror_write {
	struct bm_job *job;
	struct bm_io *guest;
	enum bm_req_type type;        /* WRITE, ZERO or DISCARD */
	uint64_t offset;
	uint64_t length;
	void *buf;
	unsigned flags;               /* BM_IO_FUA, BM_IO_MAY_TRIM */
	struct bm_mirror_write *next; /* waiting, held (state-io.c) or free */
	struct bm_mirror_write *prev_active; /* in the job's writes */
	struct bm_mirror_write *next_active;
	struct bm_io io_src;
	struct bm_io io_dst;
	unsigned pending;             /* ios outstanding */
	int err;                      /* the source's result: the guest's */
	int dst_err;
	uint64_t c0, c1;              /* chunks touched, [c0, c1) */
	bool mirrored;
	bool waiting;                 /* blocked behind an overlap */
};

struct bm_job {
	struct blockmirror_disk *disk;
	struct bm_image filter;        /* the disk's image while the job runs */
	struct bm_loop *loop;
	struct bm_image *src;          /* the disk's image at the start,
					  under the filter while it runs */
	struct bm_image *dst;          /* ours until the pivot hands it over */
	char *dst_name;
	char *link;
	struct blockmirror_job_options opt;

	/* Read by other threads under state_lock; written on the loop. */
	pthread_mutex_t state_lock;
	pthread_cond_t state_cond;
	enum blockmirror_job_state state; /* bm_job_public_state(), published */

	/* The phase machine (pivot.c); loop thread only. */
	enum bm_job_phase phase;
	enum bm_job_phase paused_from; /* MAPPING, COPYING or READY */
	enum blockmirror_job_state end_shown; /* public state while ending */
	enum blockmirror_mode mode;    /* ACTIVE or BACKGROUND */
	bool auto_mode;
	bool ready;                    /* has emitted READY */
	bool actively_synced;
	int error;                     /* FAILED: positive errno */
	char error_msg[256];

	/* The rules (mirror.c). */
	uint64_t granularity;
	struct bm_bitmap dirty;        /* DIRTY chunks */
	struct bm_bitmap copying;      /* COPYING chunks */
	struct bm_bitmap zero_hint;    /* read as zero at the start, unwritten since */
	struct bm_bitmap contended;    /* a guest write overtook its last copy */
	struct bm_copier copier;
	uint64_t cursor;               /* where the bulk copy looks next */
	struct bm_mirror_write *writes;  /* guest writes in flight */
	struct bm_mirror_write *waiting; /* writes waiting (overlap), FIFO */
	struct bm_mirror_write **waiting_tail;
	struct bm_mirror_write *free_writes; /* for the next guest writes */
	unsigned mirrored_inflight;
	bool mapping;                  /* a block-status request is in flight */
	uint64_t mapped_end;
	uint64_t map_window;           /* length of the next window */
	struct bm_extent_list map;
	struct bm_io map_io;
	bool flushing;                 /* a destination flush is in flight (the
					  READY flush, the preflush or the
					  final flush: the phase says which) */
	struct bm_io flush_io;
	bool src_flushing;             /* the preflush of the source */
	struct bm_io src_flush_io;
	uint64_t bytes_copied;
	uint64_t bytes_mirrored;
	uint64_t copy_start_ns;
	uint64_t copy_busy_bytes;      /* for the pivot's stall estimate */

	/* The tick: speed limit, retry backoff, auto mode (mirror.c). */
	struct bm_timer tick;
	struct bm_rate rate;           /* the bulk copy's speed limit */
	uint64_t retry_after_ns;       /* no copies before this */
	uint64_t retry_backoff_ns;
	unsigned consecutive_errors;   /* destination/source errors in a row */
	uint64_t auto_last_remaining;
	unsigned auto_ticks;
	unsigned auto_stalls;

	/* The endings (pivot.c). */
	enum bm_job_goal goal;
	struct bm_call *goal_call;     /* the caller waiting for the ending */
	int end_err;                   /* what goal_call learns instead
					  (-ECANCELED, -ETIMEDOUT), or 0 */
	struct bm_call *end_waiters;   /* others waiting for the end (disk
					  close, a second cancel): told 0 */
	bool quiesced;                 /* the job holds the disk quiesced */
	bool copied_since_flush;       /* the bulk copy wrote since the last
					  destination flush */
	bool guest_flush_since_flush;  /* the guest asked for durability since */
	int abandon_err;               /* ABANDON: what the caller learns */
	uint64_t end_start_ns;         /* when the ending began */
	uint64_t pivot_stall_us;

	/* Crash-resumable state (state-io.c); NULL without a state_dir. */
	struct bm_state_job *pstate;
};

/* mirror.c: the rules */
/* Allocate the bitmaps and the copy buffers for a disk of `size` bytes
 * (the caller's thread, before the job touches the disk), then attach to
 * job->src on the disk's loop. */
int bm_mirror_init(struct bm_job *job, uint64_t size);
int bm_mirror_attach(struct bm_job *job);
void bm_mirror_fini(struct bm_job *job);
void bm_mirror_begin(struct bm_job *job);
/* The filter's write path, after state-io.c's hold (it calls this again
 * for a held write). */
void bm_mirror_guest_write(struct bm_job *job, struct bm_mirror_write *w);
void bm_mirror_dst_flush_started(struct bm_job *job);
void bm_mirror_pump(struct bm_job *job);
void bm_mirror_error(struct bm_job *job, bool on_source, uint64_t offset,
		     uint64_t length, int err);
uint64_t bm_mirror_remaining(struct bm_job *job);
void bm_mirror_tick_start(struct bm_job *job);
/* COPYING converged: flush the destination; READY when it is done. */
void bm_mirror_flush_for_ready(struct bm_job *job);
void bm_mirror_ready_flushed(struct bm_job *job, int err);
/* Is the job's own I/O (copies, block status, a flush) in flight? */
bool bm_mirror_busy(const struct bm_job *job);
/* Writes see the source as being mapped (MAPPING, or paused in it). */
bool bm_mirror_mapping(const struct bm_job *job);
/* After a block-status error: map again once the policy allows. */
void bm_mirror_remap(struct bm_job *job);

/* pivot.c: the endings */
enum bm_pivot_step {
	BM_PIVOT_DRAINED = 1,  /* guest I/O stopped */
	BM_PIVOT_FLUSHED,      /* final copy done, destination flushed */
	BM_PIVOT_DURABLE,      /* link or on_pivot done (the link's own
				  steps: durable.h's hook) */
	BM_PIVOT_SWAPPED,      /* the disk runs on the destination */
	BM_PIVOT_STEPS,
};
extern void (*bm_pivot_hook)(enum bm_pivot_step step);
void bm_job_step(struct bm_job *job);
int bm_job_force_cancel(struct bm_job *job, struct bm_call *call);
void bm_job_end_timed_out(struct bm_job *job);
/* `call` is signalled (with 0) once the job has ended. */
void bm_job_wait_end(struct bm_job *job, struct bm_call *call);
int bm_job_end(struct bm_job *job, enum bm_job_goal goal,
	       struct bm_call *call);
void bm_job_ending_error(struct bm_job *job, int err);
/* Flush the destination (one flush at a time: job->flushing). */
void bm_job_flush_dst(struct bm_job *job);
/* Should the tick go on, or is the job waiting for it to stop? */
bool bm_job_tick_wanted(struct bm_job *job);
/* Is the job in an ending (a phase from PREFLUSH to STOPPING)? */
bool bm_job_ending(const struct bm_job *job);

/* job.c: phases, state and events */
/* Enter a phase and publish the public state derived from it. */
void bm_job_set_phase(struct bm_job *job, enum bm_job_phase phase);
enum blockmirror_job_state bm_job_public_state(const struct bm_job *job);
void bm_job_event(struct bm_job *job, const struct blockmirror_event *ev);
bool bm_job_ended(enum blockmirror_job_state state);

/* Called by blockmirror_disk_close: force-cancel a job that still runs. */
void bm_job_cancel_for_close(struct blockmirror_disk *disk);

#endif /* BM_MIRROR_H */
