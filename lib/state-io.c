/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Keeping a job's crash-resumable state on disk (format: state.c,
 * docs/state.md).
 *
 * The invariant: a guest write never reaches an image while a region it
 * touches is clean in the newest durable slot of the state file.  So after
 * a crash at any instant, every region where the source and the
 * destination may differ is marked dirty on disk, and a resumed job that
 * copies only the marked regions ends with identical images.
 *
 * Three bitmaps of regions (region_size bytes, at least 4 MiB):
 *
 *   want     what the next slot write will say
 *   durable  what the last completed slot write (write + flush) says
 *   touched  regions a guest write entered since the current clear began
 *
 * Marking (bm_state_hold_write): a write whose regions are dirty in the
 * durable slot, in `want` and in the slot being written goes on at once
 * and costs nothing (all_durable).  Otherwise it sets its regions in
 * `want` and waits in `held`; one slot write (write + flush) at a time
 * carries every mark made meanwhile, so concurrent writes share one sync.
 * When it completes, `durable` takes the snapshot it wrote and the held
 * writes whose regions are all durable re-enter bm_mirror_guest_write.
 *
 * Clearing (bm_state_tick, once a second): candidates are regions dirty
 * on disk that the job holds clean (no DIRTY or COPYING chunk) and that no
 * guest write in flight or waiting touches.  `touched` is emptied, then
 * the destination is flushed; a candidate is cleared from `want` only if
 * it is still clean and no write touched it since, so what the
 * destination holds there was durable before the flush completed.
 *
 * Slots alternate, so a torn slot write leaves the previous one, a
 * superset of what the torn one would have said about marks that guest
 * writes wait for.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "durable.h"
#include "errors.h"
#include "fault.h"
#include "internal.h"
#include "mirror.h"
#include "state.h"
#include "store.h"

#define CLEAR_INTERVAL_NS (1000 * 1000000ull)

/* Tests set this to look at the images when a slot becomes durable. */
void (*bm_state_hook)(struct bm_job *job, uint64_t seq);

struct bm_state_job {
	char *dir;
	char *path;
	struct bm_store *store;
	uint64_t region_size;
	uint64_t regions;
	uint64_t record_hash;
	uint64_t seq;               /* of the last slot written */
	size_t slot_size;
	uint8_t *slot_buf;
	struct bm_bitmap want, durable, snap, touched, busy, candidates;
	struct bm_bitmap resume;    /* resumed: regions dirty in the state */
	bool resumed;
	bool failed;                /* persistence given up after an error */

	bool writing;               /* a slot write or its flush in flight */
	struct bm_io wio;
	struct bm_mirror_write *held; /* writes waiting for marks, FIFO */
	struct bm_mirror_write **held_tail;

	bool clearing;
	unsigned clear_pending;
	int clear_err;
	struct bm_io cflush;
	uint64_t last_clear_ns;
};

/* ---- files ----------------------------------------------------------- */

/* The error message so far, prefixed, with another errno. */
static int
rewrap(int err, const char *prefix)
{
	char msg[512];
	const char *m = blockmirror_last_error();

	snprintf(msg, sizeof msg, "%s", m ? m : strerror(-err));
	return bm_error(err, "%s: %s", prefix, msg);
}

static char *
state_path(const char *dir)
{
	char *p;

	if (asprintf(&p, "%s/%s", dir, BM_STATE_FILE) < 0)
		return NULL;
	return p;
}

int
bm_state_load(const char *dir, struct bm_state *st)
{
	char *path = state_path(dir);
	uint8_t *buf = NULL;
	struct stat sb;
	size_t len = 0;
	int fd, r;

	memset(st, 0, sizeof *st);
	if (!path)
		return bm_error(-ENOMEM, "out of memory");
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		r = -errno;
		bm_error(r, "%s: %s", path, strerror(-r));
		goto out;
	}
	if (fstat(fd, &sb) < 0) {
		r = bm_error(-errno, "%s: %s", path, strerror(errno));
		goto out;
	}
	/* Never more than a record and two slots of the largest bitmap. */
	if (sb.st_size < 0 ||
	    (uint64_t)sb.st_size > BM_STATE_RECORD_SIZE +
		2 * (uint64_t)bm_state_slot_size(BM_STATE_MAX_REGIONS)) {
		r = bm_error(-EBADMSG, "%s: too large for a state file", path);
		goto out;
	}
	buf = malloc((size_t)sb.st_size + 1);
	if (!buf) {
		r = bm_error(-ENOMEM, "out of memory");
		goto out;
	}
	while (len < (size_t)sb.st_size) {
		ssize_t n = pread(fd, buf + len, (size_t)sb.st_size - len,
				  (off_t)len);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			r = bm_error(n < 0 ? -errno : -EIO, "%s: read failed",
				     path);
			goto out;
		}
		len += (size_t)n;
	}
	r = bm_state_parse(buf, len, st);
	if (r < 0)
		rewrap(r, path);
out:
	if (fd >= 0)
		close(fd);
	free(buf);
	free(path);
	return r;
}

int
bm_state_remove(const char *dir)
{
	char *path = state_path(dir);
	int r;

	if (!path)
		return bm_error(-ENOMEM, "out of memory");
	r = bm_durable_unlink(path);
	free(path);
	if (r == 0)
		r = bm_durable_rmdir(dir);
	return r;
}

int
bm_state_remove_unborn(const char *dir)
{
	char *path = state_path(dir);
	int r;

	if (!path)
		return bm_error(-ENOMEM, "out of memory");
	r = bm_durable_remove_leftover(path);
	free(path);
	if (r < 0)
		return r;
	if (rmdir(dir) < 0)
		return errno == ENOENT || errno == ENOTEMPTY ||
		       errno == EEXIST || errno == ENOTDIR ? 0 :
		       bm_error(-errno, "%s: %s", dir, strerror(errno));
	return bm_durable_sync_parent(dir);
}

/* Write the record and a first slot to a temporary file, then rename it
 * into place: a state file is complete or absent. */
static int
create_file(struct bm_state_job *ps, const struct bm_state_record *rec,
	    const uint64_t *words)
{
	size_t len = BM_STATE_RECORD_SIZE + 2 * ps->slot_size;
	uint8_t *buf = calloc(1, len);
	int r;

	if (!buf)
		return bm_error(-ENOMEM, "out of memory");
	r = bm_state_record_encode(rec, buf, &ps->record_hash);
	if (r < 0)
		goto out;
	/* Slot seq % 2 holds sequence number seq: the first write after
	 * this one goes to the other slot. */
	ps->seq = 1;
	bm_state_slot_encode(buf + BM_STATE_RECORD_SIZE + ps->slot_size,
			     ps->seq, BM_STATE_PHASE_COPYING, ps->record_hash,
			     ps->region_size, ps->regions, words);
	r = bm_durable_mkdir(ps->dir, 0700);
	if (r == 0)
		r = bm_durable_write_file(ps->path, buf, len, 0600);
out:
	free(buf);
	return r;
}

/* ---- the public reader ----------------------------------------------- */

BM_EXPORT int
blockmirror_state_read(const char *dir, struct blockmirror_state_info *info)
{
	struct bm_state st;
	int r;

	bm_error_clear();
	if (!dir || !info || info->size < sizeof *info)
		return bm_api_fail("blockmirror_state_read",
				   bm_error(-EINVAL, "bad arguments"));
	memset((char *)info + sizeof info->size, 0,
	       sizeof *info - sizeof info->size);
	r = bm_state_load(dir, &st);
	if (r == -EUCLEAN) /* the record is good: the caller may restart */
		r = rewrap(-EBADMSG, "no valid bitmap");
	if (st.rec.source) {
		info->source = st.rec.source;
		info->destination = st.rec.destination;
		st.rec.source = st.rec.destination = NULL;
		info->format = (enum blockmirror_format)st.rec.dst_format;
		info->mode = (enum blockmirror_mode)st.rec.mode;
		info->disk_size = st.rec.disk_size;
		info->granularity = st.rec.granularity;
		info->region_size = st.rec.region_size;
		info->regions = st.regions;
		info->regions_dirty = st.regions_dirty;
	}
	bm_state_free(&st);
	return r < 0 ? bm_api_fail("blockmirror_state_read", r) : 0;
}

BM_EXPORT int
blockmirror_state_remove(const char *dir)
{
	int r;

	bm_error_clear();
	if (!dir)
		return bm_api_fail("blockmirror_state_remove",
				   bm_error(-EINVAL, "bad arguments"));
	r = bm_state_remove(dir);
	return r < 0 ? bm_api_fail("blockmirror_state_remove", r) : 0;
}

/* ---- the job's state ------------------------------------------------- */

static void start_write(struct bm_job *job);
static void state_io_done(struct bm_job *job);

static uint64_t
region_of(const struct bm_state_job *ps, uint64_t offset)
{
	return offset / ps->region_size;
}

/*
 * Are the regions of [offset, +length) dirty in every slot that is or may
 * become the newest on disk?  That is the last durable one and, while a
 * slot write is in flight, the one being written; `want` is a superset of
 * the latter, and a region a clear took out of `want` must wait for the
 * slot that marks it again, not count on the durable one the clear is
 * about to replace.
 */
static bool
all_durable(const struct bm_state_job *ps, uint64_t offset, uint64_t length)
{
	for (uint64_t r = region_of(ps, offset);
	     r <= region_of(ps, offset + length - 1); r++) {
		uint64_t off = r * ps->region_size;

		if (!bm_bitmap_test(&ps->durable, off) ||
		    !bm_bitmap_test(&ps->want, off) ||
		    (ps->writing && !bm_bitmap_test(&ps->snap, off)))
			return false;
	}
	return true;
}

static void
release_held(struct bm_job *job)
{
	struct bm_state_job *ps = job->pstate;
	struct bm_mirror_write *list = ps->held, *ready = NULL;
	struct bm_mirror_write **rtail = &ready;

	ps->held = NULL;
	ps->held_tail = &ps->held;
	while (list) {
		struct bm_mirror_write *req = list;

		list = req->next;
		req->next = NULL;
		if (ps->failed || all_durable(ps, req->offset, req->length)) {
			*rtail = req;
			rtail = &req->next;
		} else {
			*ps->held_tail = req;
			ps->held_tail = &req->next;
		}
	}
	while (ready) {
		struct bm_mirror_write *req = ready;

		ready = req->next;
		req->next = NULL;
		bm_mirror_guest_write(job, req);
	}
}

/* Persistence failed: make sure no stale state is ever trusted, and let
 * the job go on without it. */
static void
give_up(struct bm_job *job, int err)
{
	struct bm_state_job *ps = job->pstate;

	bm_warn("%s: %s; the move goes on without crash-resumable state",
		ps->path, strerror(-err));
	ps->failed = true;
	if (bm_durable_unlink(ps->path) < 0)
		bm_warn("%s", blockmirror_last_error());
	release_held(job);
}

static void
write_done(struct bm_io *io, int err)
{
	struct bm_job *job = io->opaque;
	struct bm_state_job *ps = job->pstate;

	if (err < 0) {
		ps->writing = false;
		give_up(job, err);
		state_io_done(job);
		return;
	}
	if (io->done == write_done && io->buf) {
		/* Written; now make it durable. */
		memset(&ps->wio, 0, sizeof ps->wio);
		ps->wio.done = write_done;
		ps->wio.opaque = job;
		ps->store->ops->flush(ps->store, &ps->wio);
		return;
	}
	ps->writing = false;
	memcpy(ps->durable.words, ps->snap.words,
	       (ps->snap.nbits + 63) / 64 * sizeof(uint64_t));
	ps->durable.count = ps->snap.count;
	if (bm_state_hook)
		bm_state_hook(job, ps->seq);
	release_held(job);
	start_write(job);
	state_io_done(job);
}

static bool
bitmaps_equal(const struct bm_bitmap *a, const struct bm_bitmap *b)
{
	return memcmp(a->words, b->words,
		      (a->nbits + 63) / 64 * sizeof(uint64_t)) == 0;
}

/* State I/O is done: step the job (an ending waits for it, pivot.c). */
static void
state_io_done(struct bm_job *job)
{
	bm_job_step(job);
}

/* Write `want` to the next slot, unless it is on disk already. */
static void
start_write(struct bm_job *job)
{
	struct bm_state_job *ps = job->pstate;

	if (ps->writing || ps->failed || bitmaps_equal(&ps->want, &ps->durable))
		return;
	ps->writing = true;
	memcpy(ps->snap.words, ps->want.words,
	       (ps->want.nbits + 63) / 64 * sizeof(uint64_t));
	ps->snap.count = ps->want.count;
	ps->seq++;
	bm_state_slot_encode(ps->slot_buf, ps->seq, BM_STATE_PHASE_COPYING,
			     ps->record_hash, ps->region_size, ps->regions,
			     ps->snap.words);
	memset(&ps->wio, 0, sizeof ps->wio);
	ps->wio.offset = BM_STATE_RECORD_SIZE + (ps->seq & 1) * ps->slot_size;
	ps->wio.length = ps->slot_size;
	ps->wio.buf = ps->slot_buf;
	ps->wio.done = write_done;
	ps->wio.opaque = job;
	ps->store->ops->write(ps->store, &ps->wio);
}

bool
bm_state_hold_write(struct bm_job *job, struct bm_mirror_write *req)
{
	struct bm_state_job *ps = job->pstate;

	if (!ps || ps->failed || req->length == 0 ||
	    !bm_range_ok(req->offset, req->length, ps->want.size))
		return false;
	bm_bitmap_set_range(&ps->touched, req->offset, req->length);
	if (all_durable(ps, req->offset, req->length))
		return false; /* the common case: nothing to wait for */
	bm_bitmap_set_range(&ps->want, req->offset, req->length);
	req->next = NULL;
	*ps->held_tail = req;
	ps->held_tail = &req->next;
	start_write(job);
	return true;
}

void
bm_state_clip_map(struct bm_job *job)
{
	struct bm_state_job *ps = job->pstate;
	uint64_t w0 = job->map_io.offset, w1 = w0 + job->map_io.length;

	if (!ps || !ps->resumed || ps->failed)
		return;
	/*
	 * The window [w0, w1) was just mapped.  A region clean in `want`
	 * was clean on disk when the job resumed and no guest write has
	 * entered it since (a write marks its regions first), so the
	 * destination holds it already: nothing there is dirty.
	 */
	for (uint64_t r = region_of(ps, w0); r * ps->region_size < w1; r++) {
		uint64_t off = BM_MAX(w0, r * ps->region_size);
		uint64_t end = BM_MIN(w1, (r + 1) * ps->region_size);

		if (bm_bitmap_test(&ps->want, off))
			continue;
		bm_bitmap_clear_range(&job->dirty, off, end - off);
		bm_bitmap_clear_range(&job->zero_hint, off, end - off);
	}
}

static void
mark_busy(struct bm_state_job *ps, const struct bm_mirror_write *r)
{
	if (r->length && bm_range_ok(r->offset, r->length, ps->busy.size))
		bm_bitmap_set_range(&ps->busy, r->offset, r->length);
}

/* Regions a guest write in flight, waiting or held touches. */
static void
find_busy(struct bm_job *job)
{
	struct bm_state_job *ps = job->pstate;

	const struct bm_mirror_write *w;

	bm_bitmap_clear_all(&ps->busy);
	for (w = job->writes; w; w = w->next_active)
		mark_busy(ps, w);
	for (w = job->waiting; w; w = w->next)
		mark_busy(ps, w);
	for (w = ps->held; w; w = w->next)
		mark_busy(ps, w);
}

static bool
region_clean(struct bm_job *job, uint64_t r)
{
	struct bm_state_job *ps = job->pstate;
	uint64_t off = r * ps->region_size;
	uint64_t len = BM_MIN(ps->region_size, ps->want.size - off);

	return bm_bitmap_test(&ps->want, off) &&
	       bm_bitmap_test(&ps->durable, off) &&
	       !bm_bitmap_test(&ps->busy, off) &&
	       !bm_bitmap_test_range(&job->dirty, off, len) &&
	       !bm_bitmap_test_range(&job->copying, off, len);
}

static void
clear_flushed(struct bm_io *io, int err)
{
	struct bm_job *job = io->opaque;
	struct bm_state_job *ps = job->pstate;

	if (err < 0)
		ps->clear_err = err;
	if (--ps->clear_pending)
		return;
	ps->clearing = false;
	if (ps->clear_err == 0 && !ps->failed && !bm_mirror_mapping(job)) {
		find_busy(job);
		for (uint64_t r = 0; r < ps->regions; r++) {
			uint64_t off = r * ps->region_size;

			if (bm_bitmap_test(&ps->candidates, off) &&
			    !bm_bitmap_test(&ps->touched, off) &&
			    region_clean(job, r))
				bm_bitmap_clear_range(&ps->want, off,
						      ps->region_size);
		}
		start_write(job);
	}
	state_io_done(job);
}

void
bm_state_tick(struct bm_job *job)
{
	struct bm_state_job *ps = job->pstate;
	uint64_t now = bm_now_ns();
	bool any = false;

	if (!ps || ps->failed || ps->clearing || job->goal != BM_GOAL_NONE ||
	    bm_mirror_mapping(job) || now - ps->last_clear_ns < CLEAR_INTERVAL_NS)
		return;
	ps->last_clear_ns = now;
	find_busy(job);
	bm_bitmap_clear_all(&ps->candidates);
	for (uint64_t r = 0; r < ps->regions; r++) {
		if (region_clean(job, r)) {
			bm_bitmap_set_range(&ps->candidates,
					    r * ps->region_size, 1);
			any = true;
		}
	}
	if (!any)
		return;
	bm_bitmap_clear_all(&ps->touched);
	ps->clearing = true;
	ps->clear_err = 0;
	/*
	 * The destination only: what the bulk copy and mirrored writes gave
	 * it becomes durable.  The source is not flushed (a source flush
	 * under a guest that rarely flushes stalls its writes for hundreds
	 * of milliseconds); a guest write it never flushed may then survive
	 * a host crash on the destination but not on the source, which is
	 * one of the outcomes an unflushed write allows (docs/state.md).
	 */
	ps->clear_pending = 1;
	memset(&ps->cflush, 0, sizeof ps->cflush);
	ps->cflush.done = clear_flushed;
	ps->cflush.opaque = job;
	bm_image_flush(job->dst, &ps->cflush);
}

void
bm_state_cancel(struct bm_job *job)
{
	struct bm_state_job *ps = job->pstate;

	if (ps && ps->store && bm_state_busy(job) && ps->store->ops->cancel)
		ps->store->ops->cancel(ps->store);
}

bool
bm_state_busy(struct bm_job *job)
{
	struct bm_state_job *ps = job->pstate;

	return ps && (ps->writing || ps->clearing);
}

/* ---- start and end --------------------------------------------------- */

/* The source as the state names it: the link's target, or the image. */
static char *
source_name(struct bm_job *job)
{
	char buf[PATH_MAX], *abs;
	ssize_t n;

	if (job->link) {
		n = readlink(job->link, buf, sizeof buf - 1);
		if (n > 0) {
			buf[n] = '\0';
			return strdup(buf);
		}
	}
	abs = realpath(job->src->name, NULL);
	return abs ? abs : strdup(job->src->name);
}

static int
init_bitmaps(struct bm_state_job *ps, uint64_t size)
{
	struct bm_bitmap *b[] = { &ps->want, &ps->durable, &ps->snap,
				  &ps->touched, &ps->busy, &ps->candidates,
				  &ps->resume };

	for (size_t i = 0; i < BM_ARRAY_SIZE(b); i++)
		if (bm_bitmap_init(b[i], size, ps->region_size) < 0)
			return bm_error(-ENOMEM, "out of memory");
	return 0;
}

static void
load_words(struct bm_bitmap *b, const uint64_t *words, uint64_t regions,
	   uint64_t region_size)
{
	bm_bitmap_clear_all(b);
	for (uint64_t r = 0; r < regions; r++)
		if (words[r / 64] >> (r % 64) & 1)
			bm_bitmap_set_range(b, r * region_size, 1);
}

static int
resume(struct bm_job *job, struct bm_state_job *ps,
       const struct bm_state_record *want)
{
	struct bm_state st;
	int r = bm_state_load(ps->dir, &st);

	if (r < 0) {
		r = rewrap(-ESTALE, "cannot resume");
		goto out;
	}
	if (st.rec.disk_size != want->disk_size ||
	    st.rec.granularity != want->granularity ||
	    strcmp(st.rec.source, want->source) != 0 ||
	    strcmp(st.rec.destination, want->destination) != 0) {
		r = bm_error(-ESTALE, "cannot resume: the state in %s records "
			     "another move", ps->dir);
		goto out;
	}
	ps->region_size = st.rec.region_size;
	ps->regions = st.regions;
	ps->record_hash = st.record_hash;
	ps->seq = st.seq;
	r = init_bitmaps(ps, job->src->size);
	if (r < 0)
		goto out;
	load_words(&ps->resume, st.words, st.regions, st.rec.region_size);
	load_words(&ps->want, st.words, st.regions, st.rec.region_size);
	load_words(&ps->durable, st.words, st.regions, st.rec.region_size);
	ps->resumed = true;
	bm_info("%s: resuming a move with %" PRIu64 " of %" PRIu64
		" regions dirty", ps->dir, st.regions_dirty, st.regions);
out:
	bm_state_free(&st);
	return r;
}

int
bm_state_job_start(struct bm_job *job)
{
	struct bm_state_record rec = { 0 };
	struct bm_state_job *ps;
	int r;

	if (!job->opt.state_dir) {
		if (job->opt.flags & BLOCKMIRROR_JOB_RESUME)
			return bm_error(-ESTALE, "resume needs a state "
					"directory");
		return 0;
	}
	ps = calloc(1, sizeof *ps);
	if (!ps || !(ps->dir = strdup(job->opt.state_dir)) ||
	    !(ps->path = state_path(ps->dir)) ||
	    !(rec.source = source_name(job))) {
		r = bm_error(-ENOMEM, "out of memory");
		goto fail;
	}
	job->pstate = ps;
	ps->held_tail = &ps->held;
	rec.disk_size = job->src->size;
	rec.granularity = job->granularity;
	rec.region_size = BM_MAX(BM_STATE_MIN_REGION, job->granularity);
	rec.mode = (uint32_t)job->opt.mode;
	rec.src_format = (uint32_t)job->src->format;
	rec.dst_format = (uint32_t)job->dst->format;
	rec.destination = job->dst_name;
	if (job->opt.flags & BLOCKMIRROR_JOB_RESUME) {
		r = resume(job, ps, &rec);
	} else {
		ps->region_size = rec.region_size;
		ps->regions = bm_state_regions(rec.disk_size, rec.region_size);
		r = init_bitmaps(ps, job->src->size);
		if (r == 0) {
			/* Everything may differ until copied. */
			bm_bitmap_set_all(&ps->want);
			bm_bitmap_set_all(&ps->durable);
			ps->slot_size = bm_state_slot_size(ps->regions);
			r = create_file(ps, &rec, ps->want.words);
		}
	}
	if (r < 0)
		goto fail;
	ps->slot_size = bm_state_slot_size(ps->regions);
	if (posix_memalign((void **)&ps->slot_buf, 4096, ps->slot_size)) {
		r = bm_error(-ENOMEM, "out of memory");
		goto fail;
	}
	r = bm_file_open(job->loop, ps->path, BM_OPEN_WRITE, 0, &ps->store);
	if (r == 0)
		r = bm_store_wrap(ps->path, &ps->store);
	if (r < 0)
		goto fail;
	ps->last_clear_ns = bm_now_ns();
	free(rec.source);
	return 0;
fail:
	free(rec.source);
	bm_state_job_free(job);
	return r;
}

void
bm_state_job_end(struct bm_job *job)
{
	struct bm_state_job *ps = job->pstate;

	if (!ps || (ps->failed && !ps->store))
		return; /* ended already (or given up and removed) */
	bm_store_close(ps->store);
	ps->store = NULL;
	if (bm_state_remove(ps->dir) < 0)
		bm_warn("%s", blockmirror_last_error());
	ps->failed = true;
}

void
bm_state_job_free(struct bm_job *job)
{
	struct bm_state_job *ps = job->pstate;

	if (!ps)
		return;
	bm_store_close(ps->store);
	bm_bitmap_free(&ps->want);
	bm_bitmap_free(&ps->durable);
	bm_bitmap_free(&ps->snap);
	bm_bitmap_free(&ps->touched);
	bm_bitmap_free(&ps->busy);
	bm_bitmap_free(&ps->candidates);
	bm_bitmap_free(&ps->resume);
	free(ps->slot_buf);
	free(ps->path);
	free(ps->dir);
	free(ps);
	job->pstate = NULL;
}
