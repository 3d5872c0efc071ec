/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The disk's internals, shared with the mirror job (job.c, pivot.c) and
 * the NBD server.  Everything here runs on the disk's loop thread unless
 * it says otherwise.
 */
#ifndef BM_DISK_H
#define BM_DISK_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include <blockmirror/blockmirror.h>

#include "cbt.h"
#include "extent.h"
#include "image.h"
#include "loop.h"
#include "waiter.h"

struct bm_job;

enum bm_req_type {
	BM_REQ_READ,
	BM_REQ_WRITE,
	BM_REQ_ZERO,
	BM_REQ_DISCARD,
	BM_REQ_FLUSH,
	BM_REQ_BLOCK_STATUS,          /* buf is a struct bm_extent_list */
};

#define BM_DISK_MAX_DRAINED 8

struct blockmirror_snapshot;

/* One guest request, from acceptance to completion. */
struct bm_req {
	struct bm_work work;          /* handed over from another thread */
	struct blockmirror_disk *disk;
	enum bm_req_type type;
	uint64_t offset;
	uint64_t length;
	void *buf;
	unsigned flags;               /* BLOCKMIRROR_REQ_* */
	blockmirror_done_fn done;
	void *user_data;

	/* the disk's */
	struct bm_req *next;          /* in the queue while quiesced */
	struct bm_image *target;      /* NULL: the active image; else an
					 image on the disk's loop (a
					 snapshot's view) that the request
					 reads while counted and queued like
					 the guest's */
	struct bm_cbt_waiter mark;    /* change tracking: marked first */
	struct bm_io io;              /* to `target`, or the active image */
	int err;                      /* the active image's result */
};

struct bm_call {
	struct bm_work work;
	struct bm_waiter w;
	void (*fn)(struct bm_call *call);
	void *arg;
	void *arg2;
	uint64_t u64;
	int i;
	struct bm_call *next_waiter;  /* a job's end_waiters */
	struct bm_call *next_control; /* the disk's control_head */
};
struct blockmirror_disk {
	struct bm_loop *loop;
	struct bm_image *image;       /* the active image: the only one the
					 guest's requests see (while a job
					 runs, its mirror filter) */
	uint64_t size;
	bool readonly;
	atomic_bool fenced;           /* a failover made the replica the
					 primary: writes refused (any thread) */
	unsigned open_flags;          /* BM_IMAGE_* for images of this disk */

	/* who runs the loop */
	pthread_mutex_t run_lock;     /* held by whoever runs the loop */
	pthread_t thread;
	atomic_bool thread_running;
	atomic_bool stop_thread;

	/* loop thread only */
	unsigned inflight;            /* guest requests in flight */
	unsigned quiesce_depth;       /* > 0: queue new requests */
	struct bm_req *queue_head;    /* queued while quiesced, in order */
	struct bm_req **queue_tail;
	uint64_t quiesce_start_ns;
	uint64_t first_queued_ns;     /* 0: nothing queued yet */
	/* called once inflight hits 0 (one per quiescer: a job's start or
	 * pivot, the control call, the close: three at most) */
	void (*drained[BM_DISK_MAX_DRAINED])(struct blockmirror_disk *disk);
	unsigned ndrained;
	struct bm_op drain_op;        /* reports an immediate drain */
	bool drain_op_pending;
	struct bm_job *job;           /* the running job, for the control
					 calls (start, close, backing); the
					 I/O path never looks at it */
	atomic_bool closing;
	struct bm_work wake_work;     /* wakes the thread to stop it */
	struct bm_call *drain_call;   /* close: waiting for the drain */
	struct bm_call *start_call;   /* job start: waiting for the drain */
	struct blockmirror_snapshot *snapshots; /* live snapshots, newest first */
	struct bm_cbt *cbt;           /* change tracking, or NULL */
	bool cbt_failed;              /* warned that marks fail */
	uint64_t writes_seen;         /* guest writes, write-zeroes and
					 discards started since the open */
	/* The control call: the one snapshot or checkpoint operation under
	 * way (a snapshot taken or released, a checkpoint created or
	 * removed, tracking turned on), which quiesces the disk and finds
	 * its call here when drained.  Others wait in the FIFO behind it
	 * (bm_disk_control_begin). */
	struct bm_call *control_call;
	struct bm_call *control_head, **control_tail;
	struct bm_io close_io;
	/* Sources pivots left, being closed on threads of their own so
	 * that the guest never waits for them (pivot.c); joined before the
	 * next job opens its destination and when the disk closes, never
	 * on the loop. */
	pthread_mutex_t closers_lock;
	struct bm_closer *closers;
};

/*
 * Put `img` where `old` is in the disk's stack of images: the active
 * image, or the image some filter stands over (bm_image.below).  The one
 * mechanism that starts a move (the mirror filter replaces the base
 * image, with the base under it), pivots (the destination replaces the
 * filter), ends one without a pivot (the source replaces the filter
 * again), takes a snapshot (its filter replaces the active image) and
 * releases one.  Filters above the one replaced keep standing, so a
 * snapshot survives a move's pivot.  Only with the disk quiesced and
 * nothing in flight, so that no request is split between two stacks.
 */
void bm_disk_swap_image(struct blockmirror_disk *disk, struct bm_image *old,
			struct bm_image *img);

/* Close `img`, which nothing references any more and which has nothing
 * in flight: at once, or on a thread of its own when closing may write
 * back (bm_image.close_slow).  Loop thread. */
void bm_disk_close_later(struct blockmirror_disk *disk, struct bm_image *img);
/* Wait for every close bm_disk_close_later started.  Not the loop
 * thread. */
void bm_disk_join_closers(struct blockmirror_disk *disk);

/* The image under every filter: the one a move moves. */
static inline struct bm_image *
bm_disk_base(struct blockmirror_disk *disk)
{
	return bm_image_base(disk->image);
}

/* Monotonic clock in nanoseconds. */
uint64_t bm_now_ns(void);

/* Start a guest request on the loop thread (after any queueing). */
void bm_disk_submit(struct bm_req *req);

/* The request is finished: tell the guest and free it. */
void bm_disk_req_complete(struct bm_req *req);

/*
 * Stop admitting guest requests (they queue), and call `drained` once
 * none is in flight (on a later loop turn, never inside this call).
 * Quiescers nest: each passes its own `drained` (NULL: none), and
 * requests flow again after the last bm_disk_unquiesce.  -EBUSY, with
 * nothing changed, if BM_DISK_MAX_DRAINED quiescers wait already: never,
 * since a disk has three at most (a job, the control call, the close),
 * but the caller fails its operation rather than wait forever.
 */
int bm_disk_quiesce(struct blockmirror_disk *disk,
		    void (*drained)(struct blockmirror_disk *disk));

/* Undo a bm_disk_quiesce whose `drained` has not been called yet: it
 * never will be, and the disk goes on if nobody else holds it. */
void bm_disk_quiesce_cancel(struct blockmirror_disk *disk,
			    void (*drained)(struct blockmirror_disk *disk));

/*
 * Admit requests again and start the queued ones, in order.  Returns how
 * long (ns) the first queued request waited, 0 if none was queued.
 */
uint64_t bm_disk_unquiesce(struct blockmirror_disk *disk);

/*
 * Hand `call` to `loop` from another thread: call->fn runs on the loop
 * thread and must end with bm_waiter_signal(&call->w, err).  The caller
 * waits for that (bm_waiter_wait), then bm_waiter_destroy(&call->w).
 * The call must stay valid, and someone must run the loop, until then.
 */
void bm_call_post(struct bm_loop *loop, struct bm_call *call);

/*
 * Run `fn(arg)` on the loop thread and wait for it to call
 * bm_waiter_signal(w, err); returns err.  Called from any thread but the
 * loop's (-EDEADLK there).  If no thread runs the loop, this thread runs
 * it while it waits.
 */
int bm_disk_call(struct blockmirror_disk *disk, struct bm_call *call);

/*
 * What the guest sees in [offset, offset + len): extents appended to `l`
 * (which the caller owns until done).  Goes through the disk like a read,
 * so it queues during a pivot and always asks the active image.
 */
int bm_disk_aio_block_status(struct blockmirror_disk *disk, uint64_t len,
			     uint64_t offset, struct bm_extent_list *l,
			     blockmirror_done_fn done, void *user_data);

/*
 * A read or block status of `target`, an image on the disk's loop that
 * is not the active one (a snapshot's view), through the disk: counted
 * in `inflight` and queued while the disk is quiesced like a guest
 * request, so that no swap happens under it.  Writes: -EROFS.
 */
int bm_disk_aio_to(struct blockmirror_disk *disk, struct bm_image *target,
		   enum bm_req_type type, void *buf, uint64_t len,
		   uint64_t offset, blockmirror_done_fn done, void *user_data);

/*
 * Wait for `w`, signalled by a request's completion on the disk's loop:
 * on the disk's thread if it runs, else running the loop here.  Not from
 * the loop thread.  Returns what the waiter was signalled with.
 */
int bm_disk_wait(struct blockmirror_disk *disk, struct bm_waiter *w);

/*
 * For a caller that waits for aio completions of its own: does the
 * disk's thread run its loop?  If not, bm_disk_turn runs it once here
 * (at most timeout_ms for something to happen): 1, or 0 when its thread
 * runs it, -EBUSY when another caller does, or the loop's error.  Not
 * from the loop thread.
 */
bool bm_disk_has_thread(struct blockmirror_disk *disk);
int bm_disk_turn(struct blockmirror_disk *disk, int timeout_ms);

/* Refuse guest writes from now on (-EROFS naming the failover): a
 * request already admitted still completes, so the caller drains (a
 * snapshot does) before it takes the disk's last state. */
void bm_disk_fence(struct blockmirror_disk *disk);
/* A failover that certainly did not happen: writes are taken again. */
void bm_disk_unfence(struct blockmirror_disk *disk);

/* Work of the disk's own that a drain must wait for like a guest request
 * (a snapshot's copy-before-write). */
void bm_disk_hold(struct blockmirror_disk *disk);
void bm_disk_unhold(struct blockmirror_disk *disk);

/* Marks failed: the record is incomplete (the tracker flags its
 * checkpoints), and the guest goes on. */
void bm_disk_tracking_failed(struct blockmirror_disk *disk, int err);

/*
 * Snapshot and checkpoint operations, one at a time (from call->fn, on
 * the loop): true if `call` is the disk's control call now and goes on;
 * false if another is under way and `call` waits in a FIFO, to have
 * call->fn run again (and get true) once those before it have ended, or
 * if the disk is closing (`call` is signalled -ESHUTDOWN then).  The
 * control call ends with bm_disk_control_end, before it signals its
 * waiter.
 */
bool bm_disk_control_begin(struct blockmirror_disk *disk,
			   struct bm_call *call);
void bm_disk_control_end(struct blockmirror_disk *disk);

/*
 * bm_disk_call with a time limit: -ETIMEDOUT (no message) if call->fn
 * has not signalled within timeout_ms.  Then the call is still posted or
 * under way: the caller must make it signal (another call that ends it)
 * and wait for it with bm_disk_call_finish.  Otherwise returns what
 * bm_disk_call would.
 */
int bm_disk_call_ms(struct blockmirror_disk *disk, struct bm_call *call,
		    int timeout_ms);
int bm_disk_call_finish(struct blockmirror_disk *disk, struct bm_call *call);

/* Is the current thread running this disk's loop? */
bool bm_disk_on_loop(struct blockmirror_disk *disk);

#endif /* BM_DISK_H */
