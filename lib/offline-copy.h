/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The offline copy (offline-copy.c), shared by the two ways of running it:
 * blockmirror_copy(), which runs it on the calling thread, and the copy
 * handle (copy-job.c), which runs it on a thread of its own and steers
 * it from other threads through calls posted to its loop.
 *
 * A copy is opened (validation, the source opened, the destination
 * created: every error a caller must see before anything runs), run on
 * whichever thread then owns its loop, and closed.  Between open and
 * close every field belongs to that thread; the steering calls below run
 * on it too (the handle posts them to the loop).
 */
#ifndef BM_OFFLINE_COPY_H
#define BM_OFFLINE_COPY_H

#include <stdbool.h>
#include <stdint.h>

#include <blockmirror/blockmirror.h>

#include "copy.h"
#include "extent.h"
#include "image.h"
#include "loop.h"
#include "rate.h"

struct bm_offline_copy {
	struct bm_loop *loop;
	struct bm_image *in;
	struct bm_image *out;
	char *dst;                     /* the destination's name */
	bool created;                  /* a file this copy made: removed on
					  failure and on cancel */
	uint64_t size;                 /* the source's virtual size */
	uint64_t t0, t_end;            /* ns: opened, run returned (0: not yet) */

	struct bm_copier c;
	struct bm_io map_io;           /* extent lookups */
	struct bm_extent_list map;
	size_t map_index;              /* next extent to hand out */
	uint64_t map_pos;              /* offset reached within the map */
	uint64_t mapped_end;           /* end of what has been mapped */
	bool mapping;                  /* a lookup is in flight */
	uint64_t done_bytes;
	int err;
	bool finished;                 /* nothing left, nothing in flight */
	bool flushing;                 /* the data is copied; making it durable */
	blockmirror_progress_fn progress;
	void *progress_data;
	uint64_t last_progress_ns;

	/* Steering */
	struct bm_rate rate;
	struct bm_timer timer;         /* pacing; after a cancel, the grace
					  period of requests in flight */
	bool timer_cancelling;
	bool paused;                   /* holds the loop (nothing may be in
					  flight while paused) */
	bool cancelled;
	uint64_t cancel_ns;
	bool stores_cancelled;
};

/*
 * Validate, open the source, create the destination.  On failure
 * bm_offline_copy_close(oc, err) still has to be called.  0 or -errno
 * (the errors of blockmirror_copy before it starts copying).
 */
int bm_offline_copy_open(struct bm_offline_copy *oc, const char *src,
			 const char *dst,
			 const struct blockmirror_copy_options *options);

/*
 * Copy, flush the destination, sync its directory (a file this copy
 * created) and report the final progress.  Runs the loop on the calling
 * thread.  0, -ECANCELED after bm_offline_copy_cancel, or -errno.
 */
int bm_offline_copy_run(struct bm_offline_copy *oc);

/*
 * Close both images and free the loop; with err < 0, remove the
 * destination the copy created.  The counters stay readable.
 */
void bm_offline_copy_close(struct bm_offline_copy *oc, int err);

/* Fill `st` (as far as st->size reaches) with the copy's counters and
 * the given state and error (negative errno or 0). */
void bm_offline_copy_stats(const struct bm_offline_copy *oc,
			   enum blockmirror_copy_state state, int err,
			   struct blockmirror_copy_stats *st);

/* Steering, on the thread running the copy's loop. */
void bm_offline_copy_set_speed(struct bm_offline_copy *oc, uint64_t speed);
int bm_offline_copy_pause(struct bm_offline_copy *oc);  /* -EINVAL, -EBUSY */
int bm_offline_copy_resume(struct bm_offline_copy *oc); /* -EINVAL */
/* Stop taking ranges; run returns -ECANCELED once nothing is in flight
 * (requests still in flight after a second are cancelled on the stores
 * that can). */
void bm_offline_copy_cancel(struct bm_offline_copy *oc);

#endif /* BM_OFFLINE_COPY_H */
