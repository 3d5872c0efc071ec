/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The mirror job's internals.  mirror.c holds the rules (what is dirty,
 * where guest writes land, what the bulk copy takes next, when the job is
 * READY, what an error does); pivot.c holds the endings (pivot, cancel,
 * failure); job.c holds the public calls and the state machine.  All of
 * it runs on the disk's loop thread; only `state` and its friends are
 * also read by other threads, under state_lock.
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
#include "state.h"

/* How a job ends: the goal pivot.c drives towards once asked to stop. */
enum bm_job_goal {
	BM_GOAL_NONE,
	BM_GOAL_PIVOT,        /* complete: switch the disk to the destination */
	BM_GOAL_SYNC_CANCEL,  /* cancel after READY: consistent copy, no switch */
	BM_GOAL_CANCEL,       /* cancel: stop as soon as nothing is in flight */
	BM_GOAL_FAIL,         /* the error policy said report */
};

struct bm_job {
	struct blockmirror_disk *disk;
	struct bm_loop *loop;
	struct bm_image *src;          /* the disk's image at the start */
	struct bm_image *dst;          /* ours until the pivot hands it over */
	char *dst_name;
	char *link;
	struct blockmirror_job_options opt;

	/* Read by other threads under state_lock; written on the loop. */
	pthread_mutex_t state_lock;
	pthread_cond_t state_cond;
	enum blockmirror_job_state state;
	enum blockmirror_job_state paused_from; /* state to resume to */
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
	struct bm_copier copier;
	uint64_t cursor;               /* where the bulk copy looks next */
	struct bm_req *writes;         /* guest writes in flight through the job */
	struct bm_req *waiting;        /* active-mode writes waiting, FIFO */
	struct bm_req **waiting_tail;
	unsigned mirrored_inflight;
	bool mapping;
	uint64_t mapped_end;
	struct bm_extent_list map;
	struct bm_io map_io;
	bool flushing;                 /* the READY flush is in flight */
	struct bm_io flush_io;
	uint64_t bytes_copied;
	uint64_t bytes_mirrored;
	uint64_t copy_start_ns;
	uint64_t copy_busy_bytes;      /* for the pivot's stall estimate */

	/* The tick: speed limit, retry backoff, auto mode (mirror.c). */
	struct bm_timer tick;
	uint64_t speed;
	uint64_t speed_start_ns;
	uint64_t speed_bytes;
	uint64_t retry_after_ns;       /* no copies before this */
	uint64_t retry_backoff_ns;
	unsigned consecutive_errors;   /* destination/source errors in a row */
	uint64_t auto_last_remaining;
	unsigned auto_ticks;
	unsigned auto_stalls;

	/* The endings (pivot.c). */
	enum bm_job_goal goal;
	struct bm_call *goal_call;     /* the caller waiting for the ending */
	struct bm_call *close_call;    /* blockmirror_disk_close, waiting */
	bool quiesced;
	bool drained;
	bool flushing_final;
	bool final_flushed;
	bool preflushing;              /* pivot: flushing before quiescing */
	bool copied_since_flush;       /* the bulk copy wrote since the last
					  destination flush */
	bool guest_flush_since_flush;  /* the guest asked for durability since */
	bool finishing;                /* waiting for the tick to stop */
	bool stall_checked;
	int pivot_failed_err;          /* the final copy failed: abandon */
	uint64_t end_start_ns;         /* when the ending began */
	uint64_t pivot_stall_us;
	int goal_err;

	/* Crash-resumable state (state-io.c); NULL without a state_dir. */
	struct bm_state_job *pstate;
};

/* mirror.c: the rules */
int bm_mirror_init(struct bm_job *job);
void bm_mirror_fini(struct bm_job *job);
void bm_mirror_begin(struct bm_job *job);
void bm_mirror_guest_write(struct bm_job *job, struct bm_req *req);
void bm_mirror_guest_flush(struct bm_job *job);
void bm_mirror_dst_flush_started(struct bm_job *job);
void bm_mirror_pump(struct bm_job *job);
void bm_mirror_error(struct bm_job *job, bool on_source, uint64_t offset,
		     uint64_t length, int err);
uint64_t bm_mirror_remaining(struct bm_job *job);
void bm_mirror_tick_start(struct bm_job *job);
void bm_job_flush_for_ready(struct bm_job *job);
bool bm_mirror_idle(struct bm_job *job);
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
int bm_job_end(struct bm_job *job, enum bm_job_goal goal,
	       struct bm_call *call);
void bm_job_ending_error(struct bm_job *job, int err);
void bm_job_quiesce_for_end(struct bm_job *job);

/* job.c: state and events */
void bm_job_set_state(struct bm_job *job, enum blockmirror_job_state state);
void bm_job_event(struct bm_job *job, const struct blockmirror_event *ev);
bool bm_job_ended(enum blockmirror_job_state state);

/* Called by blockmirror_disk_close: force-cancel a job that still runs. */
void bm_job_cancel_for_close(struct blockmirror_disk *disk);

#endif /* BM_MIRROR_H */
