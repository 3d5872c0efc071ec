/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The disk: the VM-facing device over the active image.
 *
 * Guest requests enter through the aio calls from any thread; off the loop
 * thread they are handed over with bm_loop_post.  On the loop thread a
 * request is either started (bm_disk_submit) or, while the disk is
 * quiesced (a job starting or ending, close), queued in arrival order and
 * started when the disk is released.  Every request goes to the active
 * image, whatever it is: the disk knows only "an image".  While a move
 * runs that image is the job's mirror filter (mirror.c), stacked over the
 * source and holding the destination; bm_disk_swap_image() pushes it,
 * swaps in the destination at the pivot, or swaps the source back.
 *
 * `inflight` counts started guest requests; every swap waits for it to
 * reach zero with nothing new admitted, so no request is split between
 * two images.  Nothing here takes a lock on the I/O path: only
 * the hand-over between threads (bm_loop_post) and the blocking wrappers
 * (struct bm_waiter) do.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "disk.h"
#include "errors.h"
#include "internal.h"
#include "mirror.h"
#include "snapshot.h"

uint64_t
bm_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static _Thread_local struct blockmirror_disk *running_disk;

bool
bm_disk_on_loop(struct blockmirror_disk *disk)
{
	return running_disk == disk;
}

/* Run one turn of the loop as its runner. */
static int
disk_run_once(struct blockmirror_disk *disk, int timeout_ms)
{
	struct blockmirror_disk *saved = running_disk;
	int r;

	running_disk = disk;
	r = bm_loop_run_once(disk->loop, timeout_ms);
	running_disk = saved;
	return r;
}

/* ---- opening, closing, the loop's runner ----------------------------- */

BM_EXPORT struct blockmirror_disk *
blockmirror_disk_open(const char *name, enum blockmirror_format format,
		      unsigned flags)
{
	struct blockmirror_disk *disk;
	unsigned iflags = 0;
	int r;

	bm_error_clear();
	if (!name || (flags & ~(BLOCKMIRROR_DISK_READONLY |
				BLOCKMIRROR_DISK_DIRECT))) {
		r = bm_error(-EINVAL, "bad arguments");
		goto fail;
	}
	disk = calloc(1, sizeof *disk);
	if (!disk) {
		r = bm_error(-ENOMEM, "out of memory");
		goto fail;
	}
	if (!(flags & BLOCKMIRROR_DISK_READONLY))
		iflags |= BM_IMAGE_WRITE;
	if (flags & BLOCKMIRROR_DISK_DIRECT)
		iflags |= BM_IMAGE_DIRECT;
	r = bm_loop_new(256, &disk->loop);
	if (r < 0)
		goto fail_free;
	r = bm_image_open(disk->loop, name, format, iflags, &disk->image);
	if (r < 0)
		goto fail_loop;
	disk->size = disk->image->size;
	disk->readonly = flags & BLOCKMIRROR_DISK_READONLY;
	disk->open_flags = iflags;
	disk->queue_tail = &disk->queue_head;
	disk->control_tail = &disk->control_head;
	pthread_mutex_init(&disk->run_lock, NULL);
	pthread_mutex_init(&disk->closers_lock, NULL);
	return disk;

fail_loop:
	bm_loop_free(disk->loop);
fail_free:
	free(disk);
fail:
	bm_api_fail("blockmirror_disk_open", r);
	errno = -r;
	return NULL;
}

static void *
disk_thread(void *arg)
{
	struct blockmirror_disk *disk = arg;

	pthread_mutex_lock(&disk->run_lock);
	while (!atomic_load(&disk->stop_thread)) {
		if (disk_run_once(disk, -1) < 0)
			break; /* the ring failed: nothing left to run on */
	}
	pthread_mutex_unlock(&disk->run_lock);
	return NULL;
}

BM_EXPORT int
blockmirror_disk_start_thread(struct blockmirror_disk *disk)
{
	int r;

	bm_error_clear();
	if (!disk)
		return bm_api_fail("blockmirror_disk_start_thread", -EINVAL);
	if (atomic_load(&disk->thread_running))
		return bm_api_fail("blockmirror_disk_start_thread",
				   bm_error(-EBUSY, "the thread is running"));
	atomic_store(&disk->stop_thread, false);
	r = pthread_create(&disk->thread, NULL, disk_thread, disk);
	if (r)
		return bm_api_fail("blockmirror_disk_start_thread",
				   bm_error(-r, "pthread_create: %s",
					    strerror(r)));
	atomic_store(&disk->thread_running, true);
	return 0;
}

BM_EXPORT int
blockmirror_disk_get_fd(struct blockmirror_disk *disk)
{
	return bm_loop_fd(disk->loop);
}

BM_EXPORT int
blockmirror_disk_process(struct blockmirror_disk *disk)
{
	int r;

	bm_error_clear();
	if (atomic_load(&disk->thread_running) ||
	    pthread_mutex_trylock(&disk->run_lock) != 0)
		return bm_api_fail("blockmirror_disk_process",
				   bm_error(-EBUSY, "another thread runs the "
					    "loop"));
	r = disk_run_once(disk, 0);
	pthread_mutex_unlock(&disk->run_lock);
	return r < 0 ? bm_api_fail("blockmirror_disk_process", r) : r;
}

BM_EXPORT uint64_t
blockmirror_disk_get_size(struct blockmirror_disk *disk)
{
	return disk->size;
}

static void
call_get_image(struct bm_call *call)
{
	struct blockmirror_disk *disk = call->arg;

	call->arg2 = strdup(bm_disk_base(disk)->name);
	bm_waiter_signal(&call->w, call->arg2 ? 0 : -ENOMEM);
}

BM_EXPORT char *
blockmirror_disk_get_image(struct blockmirror_disk *disk)
{
	struct bm_call call = { .fn = call_get_image, .arg = disk };
	int r;

	bm_error_clear();
	r = bm_disk_call(disk, &call);
	if (r < 0) {
		bm_api_fail("blockmirror_disk_get_image", r);
		errno = -r;
		return NULL;
	}
	return call.arg2;
}

/* ---- calls onto the loop --------------------------------------------- */

static void
call_run(struct bm_work *w)
{
	struct bm_call *call = bm_container_of(w, struct bm_call, work);

	call->fn(call);
}

void
bm_call_post(struct bm_loop *loop, struct bm_call *call)
{
	bm_waiter_init(&call->w);
	call->work.fn = call_run;
	bm_loop_post(loop, &call->work);
}

/* Wait at most timeout_ms (-1: no limit) for the call's signal; if
 * nobody runs the loop, run it here meanwhile. */
static int
call_wait(struct blockmirror_disk *disk, struct bm_call *call,
	  int timeout_ms)
{
	uint64_t deadline = bm_now_ns() + (uint64_t)timeout_ms * 1000000u;
	int r = 0;

	if (atomic_load(&disk->thread_running))
		return bm_waiter_wait_ms(&call->w, timeout_ms);
	pthread_mutex_lock(&disk->run_lock);
	while (!bm_waiter_done(&call->w) &&
	       (timeout_ms < 0 || bm_now_ns() < deadline)) {
		r = disk_run_once(disk, 100);
		if (r < 0)
			break;
	}
	pthread_mutex_unlock(&disk->run_lock);
	if (bm_waiter_done(&call->w))
		return bm_waiter_wait(&call->w);
	return r < 0 ? r : -ETIMEDOUT;
}

int
bm_disk_call_ms(struct blockmirror_disk *disk, struct bm_call *call,
		int timeout_ms)
{
	int r;

	if (bm_disk_on_loop(disk))
		return bm_error(-EDEADLK, "blocking call made from the disk's "
				"own loop thread (a callback)");
	bm_call_post(disk->loop, call);
	r = call_wait(disk, call, timeout_ms);
	if (r == -ETIMEDOUT && !bm_waiter_done(&call->w))
		return r; /* still the caller's to finish */
	bm_waiter_destroy(&call->w);
	return r;
}

int
bm_disk_call_finish(struct blockmirror_disk *disk, struct bm_call *call)
{
	int r = call_wait(disk, call, -1);

	bm_waiter_destroy(&call->w);
	return r;
}

int
bm_disk_call(struct blockmirror_disk *disk, struct bm_call *call)
{
	return bm_disk_call_ms(disk, call, -1);
}

/* ---- the control call ------------------------------------------------ */

bool
bm_disk_control_begin(struct blockmirror_disk *disk, struct bm_call *call)
{
	if (disk->control_call && disk->control_call != call) {
		call->next_control = NULL;
		*disk->control_tail = call;
		disk->control_tail = &call->next_control;
		return false;
	}
	/* Free, or its turn: bm_disk_control_end chose it. */
	disk->control_call = call;
	if (atomic_load(&disk->closing)) {
		bm_disk_control_end(disk);
		bm_waiter_signal(&call->w, bm_error(-ESHUTDOWN, "the disk is "
				 "closing"));
		return false;
	}
	return true;
}

void
bm_disk_control_end(struct blockmirror_disk *disk)
{
	struct bm_call *next = disk->control_head;

	disk->control_call = next;
	if (!next)
		return;
	disk->control_head = next->next_control;
	if (!disk->control_head)
		disk->control_tail = &disk->control_head;
	/* From the loop, never inside the call that ends. */
	bm_loop_post(disk->loop, &next->work);
}

/* The disk closes: whoever waits for a turn is told so. */
static void
control_fail_queued(struct blockmirror_disk *disk)
{
	while (disk->control_head) {
		struct bm_call *call = disk->control_head;

		disk->control_head = call->next_control;
		bm_waiter_signal(&call->w, bm_error(-ESHUTDOWN, "the disk is "
				 "closing"));
	}
	disk->control_tail = &disk->control_head;
}

/* ---- guest requests -------------------------------------------------- */

static void
req_io_done(struct bm_io *io, int err)
{
	struct bm_req *req = io->opaque;

	req->err = err;
	bm_disk_req_complete(req);
}

static void
submit_to_image(struct bm_req *req)
{
	struct bm_image *img = req->target ? req->target : req->disk->image;
	struct bm_io *io = &req->io;

	memset(io, 0, sizeof *io);
	io->offset = req->offset;
	io->length = req->length;
	io->buf = req->buf;
	io->done = req_io_done;
	io->opaque = req;
	io->flags = (req->flags & BLOCKMIRROR_REQ_FUA) ? BM_IO_FUA : 0;
	switch (req->type) {
	case BM_REQ_READ:
		bm_image_read(img, io);
		break;
	case BM_REQ_WRITE:
		bm_image_write(img, io);
		break;
	case BM_REQ_ZERO:
		if (req->flags & BLOCKMIRROR_REQ_MAY_TRIM)
			io->flags |= BM_IO_MAY_TRIM;
		bm_image_zero(img, io);
		break;
	case BM_REQ_DISCARD:
		bm_image_discard(img, io);
		break;
	case BM_REQ_FLUSH:
		bm_image_flush(img, io);
		break;
	case BM_REQ_BLOCK_STATUS:
		io->buf = NULL;
		io->extents = req->buf;
		bm_image_block_status(img, io);
		break;
	}
}

void
bm_disk_tracking_failed(struct blockmirror_disk *disk, int err)
{
	if (disk->cbt_failed)
		return;
	disk->cbt_failed = true;
	bm_warn("%s: change tracking failed (%s); the checkpoints are "
		"flagged lost and the guest goes on", bm_disk_base(disk)->name,
		strerror(-err));
}

static void
req_marked(struct bm_cbt_waiter *w, int err)
{
	struct bm_req *req = bm_container_of(w, struct bm_req, mark);

	if (err < 0)
		bm_disk_tracking_failed(req->disk, err);
	submit_to_image(req);
}

/* Write-ahead: the change is on record before it happens. */
static void
mark_then_submit(struct bm_req *req)
{
	int r;

	req->mark.fn = req_marked;
	r = bm_cbt_mark(req->disk->cbt, req->offset, req->length, &req->mark);
	if (r == 1)
		return; /* req_marked submits it */
	if (r < 0)
		bm_disk_tracking_failed(req->disk, r);
	submit_to_image(req);
}

void
bm_disk_submit(struct bm_req *req)
{
	struct blockmirror_disk *disk = req->disk;

	if (disk->quiesce_depth) {
		if (!disk->first_queued_ns)
			disk->first_queued_ns = bm_now_ns();
		req->next = NULL;
		*disk->queue_tail = req;
		disk->queue_tail = &req->next;
		return;
	}
	disk->inflight++;
	if (!req->target && (req->type == BM_REQ_WRITE ||
			     req->type == BM_REQ_ZERO ||
			     req->type == BM_REQ_DISCARD)) {
		disk->writes_seen++;
		if (disk->cbt) {
			mark_then_submit(req);
			return;
		}
	}
	submit_to_image(req);
}

void
bm_disk_swap_image(struct blockmirror_disk *disk, struct bm_image *old,
		   struct bm_image *img)
{
	struct bm_image **slot = &disk->image;

	if (disk->inflight || !disk->quiesce_depth)
		bm_warn("disk: image swapped with %u requests in flight%s",
			disk->inflight, disk->quiesce_depth ? "" :
			" and the disk not quiesced");
	while (*slot != old && (*slot)->below)
		slot = &(*slot)->below;
	if (*slot != old) {
		/* A broken caller: say so loudly rather than lose an image. */
		bm_warn("disk: %s is not in the disk's stack", old->name);
		return;
	}
	*slot = img;
}

static void call_drained(struct blockmirror_disk *disk);

void
bm_disk_hold(struct blockmirror_disk *disk)
{
	disk->inflight++;
}

void
bm_disk_unhold(struct blockmirror_disk *disk)
{
	if (--disk->inflight == 0 && disk->quiesce_depth)
		call_drained(disk);
}

/* Nothing in flight: tell every quiescer waiting for that, oldest
 * first.  Each may unquiesce, or quiesce again (and so wait anew). */
static void
call_drained(struct blockmirror_disk *disk)
{
	while (disk->ndrained && disk->inflight == 0) {
		void (*fn)(struct blockmirror_disk *) = disk->drained[0];

		memmove(disk->drained, disk->drained + 1,
			--disk->ndrained * sizeof disk->drained[0]);
		fn(disk);
	}
}

void
bm_disk_req_complete(struct bm_req *req)
{
	struct blockmirror_disk *disk = req->disk;

	req->done(req->user_data, req->err);
	free(req);
	if (--disk->inflight == 0 && disk->quiesce_depth)
		call_drained(disk);
}

static void
drained_soon(struct bm_op *op, int res)
{
	struct blockmirror_disk *disk =
		bm_container_of(op, struct blockmirror_disk, drain_op);

	disk->drain_op_pending = false;
	if (disk->inflight == 0)
		call_drained(disk);
}

int
bm_disk_quiesce(struct blockmirror_disk *disk,
		void (*drained)(struct blockmirror_disk *disk))
{
	if (drained && disk->ndrained == BM_DISK_MAX_DRAINED) {
		/* More quiescers than the disk has (a job, the control
		 * call, the close): a bug, never the guest's doing. */
		bm_warn("disk: %u quiescers wait already; refusing one",
			disk->ndrained);
		return bm_error(-EBUSY, "the disk has too many quiescers");
	}
	if (disk->quiesce_depth++ == 0) {
		disk->quiesce_start_ns = bm_now_ns();
		disk->first_queued_ns = 0;
	}
	if (!drained)
		return 0;
	disk->drained[disk->ndrained++] = drained;
	if (disk->inflight == 0 && !disk->drain_op_pending) {
		/* Already drained: report on the next turn, never inline. */
		disk->drain_op_pending = true;
		bm_loop_defer(disk->loop, &disk->drain_op, drained_soon, 0);
	}
	return 0;
}

void
bm_disk_quiesce_cancel(struct blockmirror_disk *disk,
		       void (*drained)(struct blockmirror_disk *disk))
{
	for (unsigned i = 0; i < disk->ndrained; i++) {
		if (disk->drained[i] != drained)
			continue;
		memmove(disk->drained + i, disk->drained + i + 1,
			(--disk->ndrained - i) * sizeof disk->drained[0]);
		break;
	}
	bm_disk_unquiesce(disk);
}

uint64_t
bm_disk_unquiesce(struct blockmirror_disk *disk)
{
	struct bm_req *list;
	uint64_t waited = 0;

	if (--disk->quiesce_depth)
		return 0;
	disk->ndrained = 0;
	if (disk->first_queued_ns)
		waited = bm_now_ns() - disk->first_queued_ns;
	list = disk->queue_head;
	disk->queue_head = NULL;
	disk->queue_tail = &disk->queue_head;
	while (list) {
		struct bm_req *r = list;

		list = r->next;
		bm_disk_submit(r);
	}
	return waited;
}

/* ---- the aio entry points -------------------------------------------- */

static void
req_posted(struct bm_work *w)
{
	bm_disk_submit(bm_container_of(w, struct bm_req, work));
}

static int
disk_aio_to(struct blockmirror_disk *disk, struct bm_image *target,
	    enum bm_req_type type, void *buf, uint64_t len, uint64_t offset,
	    unsigned flags, blockmirror_done_fn done, void *user_data)
{
	struct bm_req *req;

	if (!disk || !done)
		return -EINVAL;
	if (atomic_load(&disk->closing))
		return bm_error(-ESHUTDOWN, "the disk is closing");
	if (type != BM_REQ_FLUSH && !bm_range_ok(offset, len, disk->size))
		return bm_error(-EINVAL, "request %" PRIu64 "+%" PRIu64
				" beyond the end of the disk (%" PRIu64 ")",
				offset, len, disk->size);
	if ((type == BM_REQ_WRITE || type == BM_REQ_ZERO ||
	     type == BM_REQ_DISCARD) && (disk->readonly || target))
		return bm_error(-EROFS, "the disk is read-only");
	if ((type == BM_REQ_WRITE || type == BM_REQ_ZERO ||
	     type == BM_REQ_DISCARD) && atomic_load(&disk->fenced))
		return bm_error(-EROFS, "the disk failed over to its replica: "
				"it takes no more writes");
	if (flags & ~(BLOCKMIRROR_REQ_FUA | BLOCKMIRROR_REQ_MAY_TRIM))
		return bm_error(-EINVAL, "unknown request flags 0x%x", flags);
	if ((type == BM_REQ_READ || type == BM_REQ_WRITE) && len > (1u << 30))
		return bm_error(-EINVAL, "request of %" PRIu64 " bytes is too "
				"large", len);
	req = calloc(1, sizeof *req);
	if (!req)
		return bm_error(-ENOMEM, "out of memory");
	req->disk = disk;
	req->target = target;
	req->type = type;
	req->buf = buf;
	req->length = len;
	req->offset = offset;
	req->flags = flags;
	req->done = done;
	req->user_data = user_data;
	if (bm_disk_on_loop(disk)) {
		bm_disk_submit(req);
	} else {
		req->work.fn = req_posted;
		bm_loop_post(disk->loop, &req->work);
	}
	return 0;
}

static int
disk_aio(struct blockmirror_disk *disk, enum bm_req_type type, void *buf,
	 uint64_t len, uint64_t offset, unsigned flags,
	 blockmirror_done_fn done, void *user_data)
{
	return disk_aio_to(disk, NULL, type, buf, len, offset, flags, done,
			   user_data);
}

int
bm_disk_aio_to(struct blockmirror_disk *disk, struct bm_image *target,
	       enum bm_req_type type, void *buf, uint64_t len,
	       uint64_t offset, blockmirror_done_fn done, void *user_data)
{
	return disk_aio_to(disk, target, type, buf, len, offset, 0, done,
			   user_data);
}

#define AIO_RETURN(name, r) \
	((r) < 0 ? bm_api_fail(name, (r)) : 0)

BM_EXPORT int
blockmirror_disk_aio_read(struct blockmirror_disk *disk, void *buf,
			  size_t len, uint64_t offset,
			  blockmirror_done_fn done, void *user_data)
{
	int r = disk_aio(disk, BM_REQ_READ, buf, len, offset, 0, done,
			 user_data);

	return AIO_RETURN("blockmirror_disk_aio_read", r);
}

BM_EXPORT int
blockmirror_disk_aio_write(struct blockmirror_disk *disk, const void *buf,
			   size_t len, uint64_t offset, unsigned flags,
			   blockmirror_done_fn done, void *user_data)
{
	int r;

	if (flags & BLOCKMIRROR_REQ_MAY_TRIM)
		r = bm_error(-EINVAL, "MAY_TRIM is for write-zeroes");
	else
		r = disk_aio(disk, BM_REQ_WRITE, (void *)buf, len, offset,
			     flags, done, user_data);
	return AIO_RETURN("blockmirror_disk_aio_write", r);
}

BM_EXPORT int
blockmirror_disk_aio_write_zeroes(struct blockmirror_disk *disk, uint64_t len,
				  uint64_t offset, unsigned flags,
				  blockmirror_done_fn done, void *user_data)
{
	int r = disk_aio(disk, BM_REQ_ZERO, NULL, len, offset, flags, done,
			 user_data);

	return AIO_RETURN("blockmirror_disk_aio_write_zeroes", r);
}

BM_EXPORT int
blockmirror_disk_aio_discard(struct blockmirror_disk *disk, uint64_t len,
			     uint64_t offset, blockmirror_done_fn done,
			     void *user_data)
{
	int r = disk_aio(disk, BM_REQ_DISCARD, NULL, len, offset, 0, done,
			 user_data);

	return AIO_RETURN("blockmirror_disk_aio_discard", r);
}

int
bm_disk_aio_block_status(struct blockmirror_disk *disk, uint64_t len,
			 uint64_t offset, struct bm_extent_list *l,
			 blockmirror_done_fn done, void *user_data)
{
	return disk_aio(disk, BM_REQ_BLOCK_STATUS, l, len, offset, 0, done,
			user_data);
}

BM_EXPORT int
blockmirror_disk_aio_flush(struct blockmirror_disk *disk,
			   blockmirror_done_fn done, void *user_data)
{
	int r = disk_aio(disk, BM_REQ_FLUSH, NULL, 0, 0, 0, done, user_data);

	return AIO_RETURN("blockmirror_disk_aio_flush", r);
}

/* ---- blocking wrappers ----------------------------------------------- */

static void
sync_done(void *user_data, int err)
{
	bm_waiter_signal(user_data, err);
}

bool
bm_disk_has_thread(struct blockmirror_disk *disk)
{
	return atomic_load(&disk->thread_running);
}

int
bm_disk_turn(struct blockmirror_disk *disk, int timeout_ms)
{
	int r;

	if (atomic_load(&disk->thread_running))
		return 0;
	if (pthread_mutex_trylock(&disk->run_lock) != 0)
		return -EBUSY;
	r = disk_run_once(disk, timeout_ms);
	pthread_mutex_unlock(&disk->run_lock);
	return r < 0 ? r : 1;
}

int
bm_disk_wait(struct blockmirror_disk *disk, struct bm_waiter *w)
{
	if (atomic_load(&disk->thread_running))
		return bm_waiter_wait(w);
	pthread_mutex_lock(&disk->run_lock);
	while (!bm_waiter_done(w) && disk_run_once(disk, 100) >= 0)
		;
	pthread_mutex_unlock(&disk->run_lock);
	return bm_waiter_wait(w);
}

static int
disk_sync(struct blockmirror_disk *disk, const char *name,
	  enum bm_req_type type, void *buf, uint64_t len, uint64_t offset,
	  unsigned flags)
{
	struct bm_waiter w;
	int r;

	bm_error_clear();
	if (!disk)
		return bm_api_fail(name, -EINVAL);
	if (bm_disk_on_loop(disk))
		return bm_api_fail(name, bm_error(-EDEADLK, "blocking call "
				   "from the disk's loop thread"));
	bm_waiter_init(&w);
	r = disk_aio(disk, type, buf, len, offset, flags, sync_done, &w);
	if (r == 0) {
		r = bm_disk_wait(disk, &w);
		if (r < 0)
			bm_error(r, "%s at %" PRIu64 "+%" PRIu64 ": %s",
				 type == BM_REQ_READ ? "read" : "write",
				 offset, len, strerror(-r));
	}
	bm_waiter_destroy(&w);
	return r < 0 ? bm_api_fail(name, r) : 0;
}

BM_EXPORT int
blockmirror_disk_read(struct blockmirror_disk *disk, void *buf, size_t len,
		      uint64_t offset)
{
	return disk_sync(disk, "blockmirror_disk_read", BM_REQ_READ, buf, len,
			 offset, 0);
}

BM_EXPORT int
blockmirror_disk_write(struct blockmirror_disk *disk, const void *buf,
		       size_t len, uint64_t offset, unsigned flags)
{
	if (flags & BLOCKMIRROR_REQ_MAY_TRIM)
		return bm_api_fail("blockmirror_disk_write", -EINVAL);
	return disk_sync(disk, "blockmirror_disk_write", BM_REQ_WRITE,
			 (void *)buf, len, offset, flags);
}

BM_EXPORT int
blockmirror_disk_write_zeroes(struct blockmirror_disk *disk, uint64_t len,
			      uint64_t offset, unsigned flags)
{
	return disk_sync(disk, "blockmirror_disk_write_zeroes", BM_REQ_ZERO,
			 NULL, len, offset, flags);
}

BM_EXPORT int
blockmirror_disk_discard(struct blockmirror_disk *disk, uint64_t len,
			 uint64_t offset)
{
	return disk_sync(disk, "blockmirror_disk_discard", BM_REQ_DISCARD,
			 NULL, len, offset, 0);
}

BM_EXPORT int
blockmirror_disk_flush(struct blockmirror_disk *disk)
{
	return disk_sync(disk, "blockmirror_disk_flush", BM_REQ_FLUSH, NULL,
			 0, 0, 0);
}

/* ---- close ----------------------------------------------------------- */

static void
close_flushed(struct bm_io *io, int err)
{
	struct bm_call *call = io->opaque;

	bm_waiter_signal(&call->w, err);
}

static void
close_drained(struct blockmirror_disk *disk)
{
	struct bm_call *call = disk->drain_call;
	struct bm_io *io = &disk->close_io;

	/* Snapshots go first: their handles stay valid, detached. */
	bm_snapshot_detach_all(disk);
	control_fail_queued(disk);
	memset(io, 0, sizeof *io);
	io->done = close_flushed;
	io->opaque = call;
	bm_image_flush(disk->image, io);
}

static void
call_close(struct bm_call *call)
{
	struct blockmirror_disk *disk = call->arg;

	int r = bm_disk_quiesce(disk, close_drained);

	if (r < 0)
		bm_waiter_signal(&call->w, r);
	else
		disk->drain_call = call;
}

static void
wake_nothing(struct bm_work *w)
{
	/* Only wakes the loop so the thread sees stop_thread. */
}

BM_EXPORT int
blockmirror_disk_close(struct blockmirror_disk *disk)
{
	struct bm_call call = { .fn = call_close };
	int r;

	bm_error_clear();
	if (!disk)
		return 0;
	if (bm_disk_on_loop(disk))
		return bm_api_fail("blockmirror_disk_close",
				   bm_error(-EDEADLK, "called from the loop "
					    "thread"));
	/* A running job is cancelled (forced); its handle stays valid for
	 * blockmirror_job_free. */
	bm_job_cancel_for_close(disk);
	atomic_store(&disk->closing, true);
	call.arg = disk;
	r = bm_disk_call(disk, &call);
	if (atomic_load(&disk->thread_running)) {
		atomic_store(&disk->stop_thread, true);
		disk->wake_work.fn = wake_nothing;
		bm_loop_post(disk->loop, &disk->wake_work);
		pthread_join(disk->thread, NULL);
		atomic_store(&disk->thread_running, false);
	}
	/* Requests that were queued while closing are failed. */
	while (disk->queue_head) {
		struct bm_req *req = disk->queue_head;

		disk->queue_head = req->next;
		req->done(req->user_data, -ESHUTDOWN);
		free(req);
	}
	/* Let the ring finish anything still outstanding (the flush). */
	while (bm_loop_inflight(disk->loop))
		bm_loop_run_once(disk->loop, 100);
	bm_snapshot_disk_closed(disk);
	bm_disk_join_closers(disk);
	if (disk->cbt) {
		int cr = bm_cbt_close(disk->cbt);

		if (cr < 0 && r == 0)
			r = cr;
		disk->cbt = NULL;
	}
	bm_image_close(disk->image);
	bm_loop_free(disk->loop);
	pthread_mutex_destroy(&disk->run_lock);
	pthread_mutex_destroy(&disk->closers_lock);
	free(disk);
	return r < 0 ? bm_api_fail("blockmirror_disk_close", r) : 0;
}

struct bm_closer {
	pthread_t thread;
	struct bm_image *img;
	struct bm_closer *next;
};

static void *
closer_main(void *arg)
{
	struct bm_closer *c = arg;

	bm_image_close(c->img);
	return NULL;
}

void
bm_disk_join_closers(struct blockmirror_disk *disk)
{
	struct bm_closer *c;

	pthread_mutex_lock(&disk->closers_lock);
	c = disk->closers;
	disk->closers = NULL;
	pthread_mutex_unlock(&disk->closers_lock);
	while (c) {
		struct bm_closer *next = c->next;

		pthread_join(c->thread, NULL);
		free(c);
		c = next;
	}
}

void
bm_disk_close_later(struct blockmirror_disk *disk, struct bm_image *img)
{
	struct bm_closer *c = img->close_slow ? malloc(sizeof *c) : NULL;

	/* Closing touches only the image's own descriptors and, for a
	 * format image, its own worker, flusher and loops. */
	if (c) {
		c->img = img;
		pthread_mutex_lock(&disk->closers_lock);
		if (pthread_create(&c->thread, NULL, closer_main, c) == 0) {
			c->next = disk->closers;
			disk->closers = c;
			c = NULL;
			img = NULL;
		}
		pthread_mutex_unlock(&disk->closers_lock);
		free(c);
	}
	if (img)
		bm_image_close(img);
}

void
bm_disk_fence(struct blockmirror_disk *disk)
{
	atomic_store(&disk->fenced, true);
}

void
bm_disk_unfence(struct blockmirror_disk *disk)
{
	atomic_store(&disk->fenced, false);
}
