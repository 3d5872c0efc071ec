/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * What the two halves of a snapshot share: the filter, which saves old
 * data before guest writes (snapshot.c, rules 1, 2 and 4), and the view,
 * which reads the instant (snapshot-view.c, rule 3).  The rules are
 * stated at the top of snapshot.c.  Everything here is the disk's loop
 * thread's once the filter is on the stack.
 */
#ifndef BM_SNAPSHOT_INT_H
#define BM_SNAPSHOT_INT_H

#include <stdbool.h>
#include <stdint.h>

#include "bitmap.h"
#include "disk.h"
#include "image.h"
#include "internal.h"

/* A range of the image below that a view operation reads (rule 3): a
 * guest write into it waits until it goes.  Doubly linked, so that it
 * goes in O(1). */
struct snap_pin {
	uint64_t offset;
	uint64_t length;
	struct snap_pin *prev, *next;
};

/* A guest write waiting for rule 2 or 3. */
struct snap_write {
	struct bm_io *io;
	enum bm_req_type type;
	uint64_t since_ns;
	struct snap_write *next;
};

struct blockmirror_snapshot {
	struct bm_image filter;        /* on the disk's stack */
	struct bm_image view;          /* the frozen disk */
	struct blockmirror_disk *disk; /* NULL once detached */
	struct blockmirror_snapshot *next; /* disk->snapshots */
	struct bm_image *scratch;
	char *scratch_path;            /* ours to remove at release */
	bool scratch_ours;             /* created here: reads as zeroes */
	char *name;                    /* "snapshot of IMAGE" */
	uint64_t granularity;
	uint64_t timeout_ns;
	uint64_t max_scratch;
	uint32_t align;                /* of the scratch; a copy's buffer
					  also meets the image below's */

	/* loop thread only */
	struct bm_bitmap needed;       /* rule 2 */
	struct bm_bitmap gone;         /* rule 5 */
	bool changed_only;             /* BLOCKMIRROR_SNAPSHOT_CHANGED_ONLY */
	struct bm_bitmap busy;
	unsigned cbw_inflight;
	struct snap_write *wait_head, **wait_tail;
	struct snap_pin *pins;         /* rule 3: one per view operation */
	unsigned callbacks_pending;    /* CBWs, the timer, the retry after a
					  break: each calls back into us */
	struct bm_timer timer;
	bool timer_armed;
	struct bm_op retry_op;         /* after a break */
	bool on_stack;
	enum blockmirror_snapshot_state state;
	int error;
	char reason[256];
	blockmirror_event_fn on_event;  /* the options': told of a break */
	void *event_data;
	int64_t taken_unix_ns;
	uint64_t bytes_saved;
	uint64_t cbw_count;
	uint64_t cbw_max_ns;
	struct bm_call *release_call;  /* waiting for callbacks_pending
					  to reach 0 */
	const char *since, *checkpoint; /* the options', during take */
	struct bm_bitmap changed;      /* since `since`, at the instant */
	uint64_t changed_bytes;
	bool has_changed;
	char since_name[65];           /* has_changed: the checkpoint's */
	struct bm_io release_io;
};

static inline bool
bm_snapshot_ok(const struct blockmirror_snapshot *snap)
{
	return snap->state == BLOCKMIRROR_SNAPSHOT_ACTIVE;
}

/* The end of the run of chunks at `pos` that are all NEEDED (or all not),
 * clipped at `end`. */
static inline uint64_t
bm_snapshot_run_end(const struct blockmirror_snapshot *snap, uint64_t pos,
		    uint64_t end)
{
	bool needed = bm_bitmap_test(&snap->needed, pos);
	uint64_t g = snap->granularity;

	pos = bm_round_down(pos, g) + g;
	while (pos < end && bm_bitmap_test(&snap->needed, pos) == needed)
		pos += g;
	return BM_MIN(pos, end);
}

/* snapshot.c: let every waiting guest write go that may now. */
void bm_snapshot_retry_waiting(struct blockmirror_snapshot *snap);

/* snapshot-view.c: the view's image operations, and whether a guest
 * write to [offset, offset + length) must wait for a view read. */
extern const struct bm_image_ops bm_snapshot_view_ops;

/* Complete `io` with `res` (success included) on the next turn of the
 * disk's loop, never inside the call that started it. */
void bm_snapshot_complete_soon(struct blockmirror_snapshot *snap,
			       struct bm_io *io, int res);

bool bm_snapshot_pinned(const struct blockmirror_snapshot *snap,
			uint64_t offset, uint64_t length);

#endif /* BM_SNAPSHOT_INT_H */
