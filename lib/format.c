/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The engine under mapped formats (qcow2, VHDX): it turns a driver's
 * synchronous answers (format.h) into the asynchronous image interface
 * (image.h).
 *
 * A guest request is cut into chunks.  For each chunk the engine asks
 * the driver where the bytes live: first on the loop with `nowait` (the
 * answer must come from the driver's caches), and when that is not
 * enough, on the image's worker thread, where the driver may read
 * tables, allocate and fill clusters.  Then the engine does the data I/O
 * the answer describes on the image's store: reads, writes, zeroes, or
 * reads from the backing image.  Then the next chunk.
 *
 * The rules that make that safe, all kept on the loop thread:
 *
 * - Busy ranges.  A chunk sent to the worker makes its guest range,
 *   rounded out to clusters, busy before it goes and until its data I/O
 *   is done.  No chunk of another request that touches a busy range is
 *   mapped meanwhile; it waits and is retried when a range is released.
 *   So nobody sees a cluster between its allocation and its data.
 * - Flushes in order.  Requests are kept in the order they started.  A
 *   flush (and the flush half of a FUA write) goes to the driver only
 *   when nothing older is in flight, so the driver's flush finds the data
 *   of every earlier write in the file.
 * - The worker owns the metadata store: a second handle on the same file
 *   with a private loop, so driver I/O never waits for the image's loop
 *   and the image's loop never waits for the worker (close joins the
 *   worker, which by then has nothing to wait for).  A driver with
 *   flush_apart has its flushes (and backing changes, and the driver's own
 *   calls, bm_image_driver_call) run on a flusher
 *   thread with a third handle and loop of its own, so that maps go on
 *   during a flush; the driver orders the two itself.
 * - Data marks.  A chunk is counted (mapped_io) from before its map until
 *   its data I/O is done, in one of two epochs; bm_fmt_data_mark switches
 *   epochs, so a flusher can wait for the chunks mapped before its mark
 *   without holding the driver's lock.
 */
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "errors.h"
#include "fault.h"
#include "format.h"
#include "internal.h"
#include "memstore.h"
#include "waiter.h"

/* R_BACKING: a backing file change, ordered like a flush.  R_CALL: a
 * driver's own call (bm_image_driver_call), ordered the same way. */
enum req_kind { R_READ, R_WRITE, R_ZERO, R_DISCARD, R_STATUS, R_FLUSH,
		R_BACKING, R_CALL };

/* Runs on the driver's thread after a flush, not on the loop. */
static bool
flush_like(enum req_kind kind)
{
	return kind == R_FLUSH || kind == R_BACKING || kind == R_CALL;
}

struct fmt_req;

struct fmt_sub {
	struct bm_io io;
	struct fmt_req *req;
};

struct fmt_req {
	struct bm_fmt *f;
	struct bm_io *io;            /* the caller's request */
	enum req_kind kind;
	uint64_t pos, end;           /* guest range still to do */
	int err;
	bool fua;                    /* a write that becomes a flush */
	bool holds_busy;
	bool counted;                /* in f->mapped_io (see wait_data) */
	unsigned epoch;              /* which f->mapped_io it counts in */
	uint64_t busy_start, busy_end;
	bool flush_sent;
	bool started;                /* start_later has run (try_flush
					   waits for it) */
	bool flush_needed;           /* something to make durable */
	uint64_t seg_off;            /* STATUS: guest offset of seg_next */
	unsigned seg_next;           /* STATUS: next segment to report */
	unsigned pending;            /* sub-requests in flight */
	struct bm_map_req map;
	char msg[256];               /* the worker's error message */

	struct fmt_req *prev, *next; /* in flight, oldest first */
	struct fmt_req *busy_next;
	struct fmt_req *wait_next;
	struct fmt_req *job_next;    /* the worker's queue */
	struct bm_work work;         /* worker -> loop */
	struct bm_op defer;
	struct bm_io presync;        /* FLUSH: the data sync before it */
	struct bm_extent_list tmp;   /* STATUS: the backing image's extents */
	bool top;                    /* STATUS: this layer only (BACKING) */
	struct bm_backing_change *bc; /* R_BACKING */
	int (*call)(void *drv, void *arg); /* R_CALL */
	void *call_arg;
	struct fmt_sub sub[BM_MAP_MAX_SEGS];
};

struct bm_fmt {
	struct bm_image img;         /* first: the image is the engine */
	const struct bm_fmt_driver *drv;
	void *state;
	struct bm_fmt_info info;
	char *path;
	unsigned flags;
	struct bm_loop *loop;        /* the image's loop */
	struct bm_image *backing;
	char *backing_path;          /* as opened */

	/* The driver's side. */
	struct bm_loop *wloop;
	struct bm_store *wstore;
	/* The file's ends, under size_lock: the worker and the flusher may
	 * both write and resize. */
	pthread_mutex_t size_lock;
	uint64_t file_size;          /* the end the driver sees */
	uint64_t phys_size;          /* the file's real size (see grow) */
	pthread_t worker;
	bool worker_started;
	pthread_mutex_t qlock;
	pthread_cond_t qcond;
	struct fmt_req *qhead, *qtail;
	bool stopping;
	/* Drivers with flush_apart: flushes and backing changes run on
	 * their own thread, with their own loop and handle on the file, so
	 * that maps go on during a flush.  One job at a time (try_flush
	 * sends only the oldest request). */
	struct bm_loop *floop;
	struct bm_store *fstore;
	pthread_t flusher;
	bool flusher_started;
	struct fmt_req *fjob;
	pthread_cond_t fcond;
	/* Chunks mapped (by the worker or on the loop) whose data I/O has
	 * not finished, counted from before their map, in two epochs (see
	 * bm_fmt_data_mark): bm_fmt_wait_data and bm_fmt_wait_mark wait
	 * for them (under qlock, dcond). */
	pthread_cond_t dcond;
	unsigned mapped_io[2];
	unsigned epoch;
	unsigned data_waiters;
	struct fmt_req *worker_req;  /* the chunk the worker is mapping */

	/* The loop's side. */
	struct fmt_req *oldest, *newest;
	struct fmt_req *busy;
	struct fmt_req *waiting, *waiting_tail;
	bool dirty;                  /* written since the last flush started */

	/* Replaced backing images and names, kept until close: reads mapped
	 * before a backing change may still use them (and facts borrowers
	 * the strings). */
	struct bm_image **retired;
	char **retired_names;
	size_t nretired;
};

static struct bm_fmt *
to_fmt(struct bm_image *img)
{
	return (struct bm_fmt *)img;
}

/* ---- services for drivers -------------------------------------------- */

const char *
bm_fmt_name(const struct bm_fmt *f)
{
	return f->path;
}

bool
bm_fmt_writable(const struct bm_fmt *f)
{
	return f->flags & BM_IMAGE_WRITE;
}

uint64_t
bm_fmt_file_size(const struct bm_fmt *f)
{
	struct bm_fmt *mf = (struct bm_fmt *)f;
	uint64_t size;

	pthread_mutex_lock(&mf->size_lock);
	size = f->file_size;
	pthread_mutex_unlock(&mf->size_lock);
	return size;
}

bool
bm_fmt_has_backing(const struct bm_fmt *f)
{
	return f->backing != NULL;
}

/* The handle on the file for the calling thread: each loop is run by
 * one thread only. */
static struct bm_store *
meta_store(struct bm_fmt *f)
{
	if (f->flusher_started && pthread_equal(pthread_self(), f->flusher))
		return f->fstore;
	return f->wstore;
}

static int
meta_io(struct bm_fmt *f, void (*op)(struct bm_store *, struct bm_io *),
	void *buf, uint64_t len, uint64_t off, unsigned flags)
{
	struct bm_io io = { 0 };

	io.buf = buf;
	io.offset = off;
	io.length = len;
	io.flags = flags;
	return bm_store_sync(meta_store(f), op, &io);
}

int
bm_fmt_pread(struct bm_fmt *f, void *buf, size_t len, uint64_t off)
{
	uint64_t size = bm_fmt_file_size(f);

	if (!bm_range_ok(off, len, size))
		return bm_error(-EINVAL, "%s: read of %zu bytes at offset %"
				PRIu64 " is beyond the end of the file (%"
				PRIu64 " bytes)", f->path, len, off, size);
	if (len == 0)
		return 0;
	return meta_io(f, meta_store(f)->ops->read, buf, len, off, 0);
}

int
bm_fmt_pread_zero(struct bm_fmt *f, void *buf, size_t len, uint64_t off)
{
	if (!bm_range_ok(off, len, INT64_MAX))
		return bm_error(-EINVAL, "%s: read at offset %" PRIu64
				" is out of range", f->path, off);
	if (len == 0)
		return 0;
	return meta_io(f, meta_store(f)->ops->read, buf, len, off, 0);
}

/* A write or zeroing that reached `end` may have grown the file. */
static void
wrote_to(struct bm_fmt *f, uint64_t end)
{
	pthread_mutex_lock(&f->size_lock);
	f->file_size = BM_MAX(f->file_size, end);
	f->phys_size = BM_MAX(f->phys_size, end);
	pthread_mutex_unlock(&f->size_lock);
}

int
bm_fmt_pwrite(struct bm_fmt *f, const void *buf, size_t len, uint64_t off)
{
	int r;

	if (!bm_range_ok(off, len, INT64_MAX))
		return bm_error(-EINVAL, "%s: write at offset %" PRIu64
				" is out of range", f->path, off);
	if (len == 0)
		return 0;
	r = meta_io(f, meta_store(f)->ops->write, (void *)buf, len, off, 0);
	if (r == 0)
		wrote_to(f, off + len);
	return r;
}

int
bm_fmt_zero_file(struct bm_fmt *f, uint64_t off, uint64_t len)
{
	int r;

	if (!bm_range_ok(off, len, INT64_MAX))
		return bm_error(-EINVAL, "%s: zeroing at offset %" PRIu64
				" is out of range", f->path, off);
	if (len == 0)
		return 0;
	r = meta_io(f, meta_store(f)->ops->zero, NULL, len, off,
		    BM_IO_MAY_TRIM);
	if (r == 0)
		wrote_to(f, off + len);
	return r;
}

/*
 * A driver that allocates clusters one by one grows the file by one
 * cluster each time; an ftruncate per cluster takes the inode lock the
 * data writes need.  So the file grows in steps of GROW_STEP (sparse: it
 * costs no space) while the driver sees the end it asked for, and a
 * flush of the image (flush_trim) cuts the file back to that end, so that
 * a flushed file ends where its metadata says.  (After a crash before
 * that, the file ends up to a step later: unused, unallocated space past
 * the last cluster, which the drivers allocate after.)
 */
#define GROW_STEP (UINT64_C(32) << 20)

int
bm_fmt_truncate(struct bm_fmt *f, uint64_t size)
{
	struct bm_store *s = meta_store(f);
	uint64_t phys = size;
	int r = 0;

	if (!s->ops->truncate)
		return bm_error(-ENOTSUP, "%s: the file cannot be resized",
				f->path);
	pthread_mutex_lock(&f->size_lock);
	if (size > f->file_size && size <= f->phys_size) {
		f->file_size = size;
		goto out;
	}
	if (size > f->file_size && size <= INT64_MAX - GROW_STEP)
		phys = bm_round_up(size, GROW_STEP);
	r = s->ops->truncate(s, phys);
	if (r == 0) {
		f->file_size = size;
		f->phys_size = phys;
	}
out:
	pthread_mutex_unlock(&f->size_lock);
	return r;
}

int
bm_fmt_sync(struct bm_fmt *f)
{
	return meta_io(f, meta_store(f)->ops->flush, NULL, 0, 0, 0);
}

/* Cut the file back to the end the driver sees, and sync that, if it
 * had grown past it.  The driver may be growing it meanwhile (a flush
 * apart): the cut and the size change happen together under
 * size_lock. */
static int
trim(struct bm_fmt *f)
{
	struct bm_store *s = meta_store(f);
	bool cut = false;
	int r = 0;

	pthread_mutex_lock(&f->size_lock);
	if (f->phys_size > f->file_size) {
		r = s->ops->truncate(s, f->file_size);
		if (r == 0)
			f->phys_size = f->file_size;
		cut = r == 0;
	}
	pthread_mutex_unlock(&f->size_lock);
	if (r < 0)
		return r;
	return cut ? bm_fmt_sync(f) : 0;
}

/* The driver's flush, then the file trimmed. */
static int
flush_trim(struct bm_fmt *f)
{
	int r = f->drv->flush(f->state);

	return r < 0 ? r : trim(f);
}

/* Chunks counted, less the one the calling worker is mapping itself. */
static unsigned
others_mapped(struct bm_fmt *f)
{
	unsigned n = f->mapped_io[0] + f->mapped_io[1];

	if (f->worker_req && f->worker_req->counted &&
	    pthread_equal(pthread_self(), f->worker))
		n--;
	return n;
}

int
bm_fmt_wait_data(struct bm_fmt *f)
{
	pthread_mutex_lock(&f->qlock);
	f->data_waiters++;
	while (others_mapped(f) > 0)
		pthread_cond_wait(&f->dcond, &f->qlock);
	f->data_waiters--;
	pthread_mutex_unlock(&f->qlock);
	return 0;
}

unsigned
bm_fmt_data_mark(struct bm_fmt *f)
{
	unsigned mark;

	pthread_mutex_lock(&f->qlock);
	/* The previous mark was waited for: its epoch is empty. */
	mark = f->epoch;
	f->epoch ^= 1;
	pthread_mutex_unlock(&f->qlock);
	return mark;
}

void
bm_fmt_wait_mark(struct bm_fmt *f, unsigned mark)
{
	pthread_mutex_lock(&f->qlock);
	f->data_waiters++;
	while (f->mapped_io[mark & 1] > 0)
		pthread_cond_wait(&f->dcond, &f->qlock);
	f->data_waiters--;
	pthread_mutex_unlock(&f->qlock);
}

/* A read of the backing image, run on the image's loop for the worker. */
struct backing_call {
	struct bm_work work;
	struct bm_fmt *f;
	struct bm_io io;
	struct bm_waiter waiter;
};

static void
backing_call_done(struct bm_io *io, int err)
{
	struct backing_call *c = bm_container_of(io, struct backing_call, io);

	bm_waiter_signal(&c->waiter, err);
}

static void
backing_call_run(struct bm_work *w)
{
	struct backing_call *c = bm_container_of(w, struct backing_call, work);

	c->io.done = backing_call_done;
	bm_image_read(c->f->backing, &c->io);
}

int
bm_fmt_backing_read(struct bm_fmt *f, void *buf, size_t len, uint64_t off)
{
	struct backing_call c = { 0 };
	uint64_t have = 0;
	int r;

	if (f->backing && off < f->backing->size)
		have = BM_MIN((uint64_t)len, f->backing->size - off);
	memset((char *)buf + have, 0, len - have);
	if (have == 0)
		return 0;
	bm_waiter_init(&c.waiter);
	c.f = f;
	c.work.fn = backing_call_run;
	c.io.buf = buf;
	c.io.offset = off;
	c.io.length = have;
	bm_loop_post(f->loop, &c.work);
	r = bm_waiter_wait(&c.waiter);
	bm_waiter_destroy(&c.waiter);
	return r;
}

bool
bm_map_add(struct bm_map_req *r, enum bm_seg_kind kind, uint64_t len,
	   uint64_t host)
{
	if (r->nseg) {
		struct bm_seg *s = &r->seg[r->nseg - 1];

		if (s->kind == kind &&
		    (kind != BM_SEG_DATA || r->op == BM_MAP_STATUS ||
		     s->host + s->length == host)) {
			s->length += len;
			return true;
		}
	}
	if (r->nseg == BM_MAP_MAX_SEGS)
		return false;
	r->seg[r->nseg++] = (struct bm_seg){ .length = len, .host = host,
					     .kind = kind };
	return true;
}

/* ---- create options -------------------------------------------------- */

/* The next key=value item of `p`: key and value spans.  NULL at the end. */
static const char *
next_option(const char *p, const char **key, size_t *klen, const char **val,
	    size_t *vlen)
{
	const char *end, *eq;

	while (*p == ',')
		p++;
	if (!*p)
		return NULL;
	end = p + strcspn(p, ",");
	eq = memchr(p, '=', (size_t)(end - p));
	*key = p;
	*klen = (size_t)((eq ? eq : end) - p);
	*val = eq ? eq + 1 : end;
	*vlen = (size_t)(end - *val);
	return end;
}

int
bm_fmt_options_check(const struct bm_fmt *f, const char *options,
		     const char *const *known)
{
	const char *p = options ? options : "", *key, *val;
	size_t klen, vlen;

	while ((p = next_option(p, &key, &klen, &val, &vlen))) {
		bool ok = false;

		for (size_t i = 0; known[i] && !ok; i++)
			ok = strlen(known[i]) == klen &&
			     memcmp(known[i], key, klen) == 0;
		if (!ok)
			return bm_error(-EINVAL, "%s: unknown %s option '%.*s'",
					f->path, f->drv->name, (int)klen, key);
	}
	return 0;
}

int
bm_fmt_option(const char *options, const char *key, char *val, size_t size)
{
	const char *p = options ? options : "", *k, *v;
	size_t klen, vlen;
	int found = 0;

	/* The last one wins, as on a command line. */
	while ((p = next_option(p, &k, &klen, &v, &vlen))) {
		if (klen != strlen(key) || memcmp(k, key, klen) != 0)
			continue;
		if (vlen >= size)
			return -EINVAL;
		memcpy(val, v, vlen);
		val[vlen] = '\0';
		found = 1;
	}
	return found;
}

int
bm_fmt_option_size(const struct bm_fmt *f, const char *options,
		   const char *key, uint64_t *out)
{
	char val[64], *end;
	unsigned long long n;
	unsigned shift = 0;
	int r = bm_fmt_option(options, key, val, sizeof val);

	if (r <= 0)
		return r < 0 ? bm_error(-EINVAL, "%s: option %s: value too "
					"long", f->path, key) : 0;
	errno = 0;
	n = strtoull(val, &end, 10);
	switch (*end) {
	case 'k': case 'K': shift = 10; end++; break;
	case 'm': case 'M': shift = 20; end++; break;
	case 'g': case 'G': shift = 30; end++; break;
	case 't': case 'T': shift = 40; end++; break;
	}
	if (*end == 'i' && shift)
		end++;
	if (*end == 'B' || *end == 'b')
		end++;
	if (errno || end == val || *end || val[0] == '-' ||
	    n > (UINT64_MAX >> shift))
		return bm_error(-EINVAL, "%s: option %s: bad size '%s'",
				f->path, key, val);
	*out = (uint64_t)n << shift;
	return 1;
}

/* ---- the worker ------------------------------------------------------ */

/*
 * Keep this thread's error message for the request's completion (finish
 * sets it again on the loop).  A failure may have recorded none, and
 * blockmirror_last_error() is NULL then: say what errno says.
 */
static void
note_error(struct fmt_req *req, int err)
{
	const char *msg = blockmirror_last_error();

	if (msg)
		snprintf(req->msg, sizeof req->msg, "%s", msg);
	else
		snprintf(req->msg, sizeof req->msg, "%s: %s", req->f->path,
			 strerror(-err));
}

/*
 * A backing change the driver has made durable: read through the new
 * backing image from now on.  The old one stays open until close (a
 * read mapped before may still be reading it; both read the same).
 * Runs on the loop while the worker waits for it (swap_on_loop), so
 * neither thread sees f->backing change under it.
 */
static int
swap_backing(struct bm_fmt *f, struct bm_backing_change *bc)
{
	char *name = strdup(bc->name), *path = strdup(bc->backing->name);
	size_t n = f->nretired + 1;
	struct bm_image **ri = realloc(f->retired, n * sizeof *ri);
	char **rn;

	if (ri)
		f->retired = ri;
	rn = realloc(f->retired_names, 2 * n * sizeof *rn);
	if (rn)
		f->retired_names = rn;
	if (!name || !path || !ri || !rn) {
		free(name);
		free(path);
		/* The image records the new name already; the old backing
		 * image reads the same, so keep reading it. */
		return bm_error(-ENOMEM, "%s: out of memory", f->path);
	}
	f->retired[f->nretired] = f->backing;
	f->retired_names[2 * f->nretired] = f->info.backing_name;
	f->retired_names[2 * f->nretired + 1] = f->backing_path;
	f->nretired = n;
	f->backing = bc->backing;
	bc->backing = NULL;
	f->info.backing_name = name;
	f->backing_path = path;
	f->info.backing_format = f->backing->format;
	return 0;
}

struct swap_call {
	struct bm_work work;
	struct bm_fmt *f;
	struct bm_backing_change *bc;
	int err;
	struct bm_waiter waiter;
};

static void
swap_call_run(struct bm_work *w)
{
	struct swap_call *c = bm_container_of(w, struct swap_call, work);

	c->err = swap_backing(c->f, c->bc);
	bm_waiter_signal(&c->waiter, c->err);
}

/* The worker's side: have the loop swap, and wait. */
static int
swap_on_loop(struct bm_fmt *f, struct bm_backing_change *bc)
{
	struct swap_call c = { 0 };
	int r;

	bm_waiter_init(&c.waiter);
	c.f = f;
	c.bc = bc;
	c.work.fn = swap_call_run;
	bm_loop_post(f->loop, &c.work);
	r = bm_waiter_wait(&c.waiter);
	bm_waiter_destroy(&c.waiter);
	return r;
}


static void chunk_mapped(struct bm_work *w);

/* A flush or a backing change, on the worker or the flusher. */
static int
run_flush(struct fmt_req *req)
{
	struct bm_fmt *f = req->f;
	int r = flush_trim(f);

	if (r == 0 && req->kind == R_BACKING)
		r = f->drv->set_backing(f->state, req->bc->name,
					req->bc->backing->format);
	if (r == 0 && req->kind == R_BACKING)
		r = swap_on_loop(f, req->bc);
	if (r == 0 && req->kind == R_CALL)
		r = req->call(f->state, req->call_arg);
	return r;
}

static void
job_done(struct fmt_req *req, int r)
{
	req->err = r;
	if (r < 0)
		note_error(req, r);
	req->work.fn = chunk_mapped;
	bm_loop_post(req->f->loop, &req->work);
}

static void
count_locked(struct fmt_req *req)
{
	struct bm_fmt *f = req->f;

	req->epoch = f->epoch;
	f->mapped_io[req->epoch]++;
	req->counted = true;
}

static void *
worker_main(void *arg)
{
	struct bm_fmt *f = arg;

	for (;;) {
		struct fmt_req *req;
		bool map;
		int r;

		pthread_mutex_lock(&f->qlock);
		while (!f->qhead && !f->stopping)
			pthread_cond_wait(&f->qcond, &f->qlock);
		req = f->qhead;
		if (!req) {
			pthread_mutex_unlock(&f->qlock);
			break;
		}
		f->qhead = req->job_next;
		if (!f->qhead)
			f->qtail = NULL;
		/*
		 * Counted before the map, not after: a flusher that takes
		 * a mark under the driver's lock right after this map must
		 * wait for its data (bm_fmt_data_mark).  bm_fmt_wait_data
		 * on this thread leaves it out.
		 */
		map = !flush_like(req->kind);
		if (map) {
			count_locked(req);
			f->worker_req = req;
		}
		pthread_mutex_unlock(&f->qlock);

		r = map ? f->drv->map(f->state, &req->map) : run_flush(req);
		if (map) {
			pthread_mutex_lock(&f->qlock);
			f->worker_req = NULL;
			pthread_mutex_unlock(&f->qlock);
		}
		/* A failed chunk stays counted until the loop fails it. */
		job_done(req, r);
	}
	return NULL;
}

static void *
flusher_main(void *arg)
{
	struct bm_fmt *f = arg;

	for (;;) {
		struct fmt_req *req;

		pthread_mutex_lock(&f->qlock);
		while (!f->fjob && !f->stopping)
			pthread_cond_wait(&f->fcond, &f->qlock);
		req = f->fjob;
		f->fjob = NULL;
		pthread_mutex_unlock(&f->qlock);
		if (!req)
			break;
		job_done(req, run_flush(req));
	}
	return NULL;
}

static void
worker_send(struct bm_fmt *f, struct fmt_req *req)
{
	bm_loop_hold(f->loop);
	req->job_next = NULL;
	pthread_mutex_lock(&f->qlock);
	if (f->flusher_started &&
	    flush_like(req->kind)) {
		f->fjob = req;
		pthread_cond_signal(&f->fcond);
		pthread_mutex_unlock(&f->qlock);
		return;
	}
	if (f->qtail)
		f->qtail->job_next = req;
	else
		f->qhead = req;
	f->qtail = req;
	pthread_cond_signal(&f->qcond);
	pthread_mutex_unlock(&f->qlock);
}

/* ---- requests on the loop -------------------------------------------- */

static void advance(struct fmt_req *req);
static void try_flush(struct bm_fmt *f);

static void
req_unlink(struct fmt_req *req)
{
	struct bm_fmt *f = req->f;

	if (req->prev)
		req->prev->next = req->next;
	else
		f->oldest = req->next;
	if (req->next)
		req->next->prev = req->prev;
	else
		f->newest = req->prev;
}

static void
finish(struct fmt_req *req)
{
	struct bm_fmt *f = req->f;
	struct bm_io *io = req->io;
	int err = req->err;

	req_unlink(req);
	bm_extent_list_free(&req->tmp);
	if (err < 0 && req->msg[0])
		bm_error(err, "%s", req->msg);
	free(req);
	try_flush(f);
	io->done(io, err);
}

/* Count a chunk in f->mapped_io until its data I/O is done. */
static void
count_io(struct fmt_req *req)
{
	struct bm_fmt *f = req->f;

	pthread_mutex_lock(&f->qlock);
	count_locked(req);
	pthread_mutex_unlock(&f->qlock);
}

static void
uncount_io(struct fmt_req *req)
{
	struct bm_fmt *f = req->f;

	if (!req->counted)
		return;
	pthread_mutex_lock(&f->qlock);
	f->mapped_io[req->epoch]--;
	req->counted = false;
	if (f->data_waiters)
		pthread_cond_broadcast(&f->dcond);
	pthread_mutex_unlock(&f->qlock);
}

/* A chunk of another request touches [start, end) while it is busy? */
static bool
range_busy(struct bm_fmt *f, uint64_t start, uint64_t end)
{
	for (struct fmt_req *b = f->busy; b; b = b->busy_next)
		if (start < b->busy_end && b->busy_start < end)
			return true;
	return false;
}

static void
busy_release(struct fmt_req *req)
{
	struct bm_fmt *f = req->f;
	struct fmt_req **pp, *w;

	for (pp = &f->busy; *pp != req; pp = &(*pp)->busy_next)
		;
	*pp = req->busy_next;
	req->holds_busy = false;
	uncount_io(req);

	/* Everyone waiting gets another try, in order. */
	w = f->waiting;
	f->waiting = f->waiting_tail = NULL;
	while (w) {
		struct fmt_req *next = w->wait_next;

		advance(w);
		w = next;
	}
}

static enum bm_map_op
map_op(enum req_kind kind)
{
	switch (kind) {
	case R_READ: return BM_MAP_READ;
	case R_WRITE: return BM_MAP_WRITE;
	case R_ZERO: return BM_MAP_ZERO;
	case R_DISCARD: return BM_MAP_DISCARD;
	default: return BM_MAP_STATUS;
	}
}

static void
fail(struct fmt_req *req, int err)
{
	req->err = err;
	if (!req->msg[0])
		note_error(req, err);
	uncount_io(req);
	if (req->holds_busy)
		busy_release(req);
	finish(req);
}

static void execute(struct fmt_req *req);

/* The next chunk: map it here if the driver can, else on the worker. */
static void
advance(struct fmt_req *req)
{
	struct bm_fmt *f = req->f;
	uint32_t cs = f->info.cluster_size ? f->info.cluster_size : 1;
	uint64_t bs, be;
	int r;

	if (req->pos >= req->end) {
		if (req->fua) {
			req->kind = R_FLUSH;
			try_flush(f);
			return;
		}
		finish(req);
		return;
	}
	bs = req->pos / cs * cs;
	be = BM_MIN(req->end / cs * cs + (req->end % cs ? cs : 0),
		    (uint64_t)UINT64_MAX - cs);
	if (range_busy(f, bs, be)) {
		req->wait_next = NULL;
		if (f->waiting_tail)
			f->waiting_tail->wait_next = req;
		else
			f->waiting = req;
		f->waiting_tail = req;
		return;
	}

	memset(&req->map, 0, offsetof(struct bm_map_req, seg));
	req->map.op = map_op(req->kind);
	req->map.flags = req->io->flags;
	req->map.offset = req->pos;
	req->map.length = req->end - req->pos;
	if (req->kind == R_READ || req->kind == R_WRITE)
		req->map.buf = (char *)req->io->buf +
			       (req->pos - req->io->offset);
	req->map.nowait = true;
	req->map.nseg = 0;
	/*
	 * A chunk mapped here holds no busy range: a discard may free its
	 * cluster on the worker while its data I/O is in flight, and a
	 * flush already queued may then make the cluster reusable.  So
	 * bm_fmt_wait_data (which a driver calls under the lock that this
	 * map takes with trylock, before it frees anything for reuse)
	 * waits for it too.  Counted before the map, so that a worker
	 * holding that lock cannot miss it.
	 */
	count_io(req);
	r = f->drv->map(f->state, &req->map);
	if (r == 0) {
		execute(req);
		return;
	}
	uncount_io(req);
	if (r != -EAGAIN) {
		fail(req, r);
		return;
	}
	req->map.nowait = false;
	req->map.nseg = 0;
	req->holds_busy = true;
	req->busy_start = bs;
	req->busy_end = be;
	req->busy_next = f->busy;
	f->busy = req;
	worker_send(f, req);
}

static void
chunk_done(struct fmt_req *req)
{
	uint64_t len = 0;

	uncount_io(req);
	if (req->err < 0) {
		fail(req, req->err);
		return;
	}
	for (unsigned i = 0; i < req->map.nseg; i++)
		len += req->map.seg[i].length;
	req->pos += len;
	if (req->holds_busy)
		busy_release(req);
	advance(req);
}

static void
sub_done(struct bm_io *io, int err)
{
	struct fmt_sub *s = bm_container_of(io, struct fmt_sub, io);
	struct fmt_req *req = s->req;

	if (err < 0 && req->err == 0) {
		req->err = err;
		note_error(req, err);
	}
	if (--req->pending == 0)
		chunk_done(req);
}

static struct bm_io *
sub_io(struct fmt_req *req, unsigned i, uint64_t off, uint64_t len, void *buf)
{
	struct fmt_sub *s = &req->sub[i];

	memset(&s->io, 0, sizeof s->io);
	s->req = req;
	s->io.done = sub_done;
	s->io.offset = off;
	s->io.length = len;
	s->io.buf = buf;
	req->pending++;
	return &s->io;
}

static void status_next(struct fmt_req *req);
static void nothing_done(struct bm_op *op, int res);

static void
status_failed(struct fmt_req *req, int err)
{
	req->err = err;
	if (!req->msg[0])
		note_error(req, err);
	req->seg_next = req->map.nseg;
}

static void
status_backing_done(struct bm_io *io, int err)
{
	struct fmt_sub *s = bm_container_of(io, struct fmt_sub, io);
	struct fmt_req *req = s->req;
	struct bm_extent_list *out = req->io->extents;
	uint64_t end = io->offset + io->length;

	req->pending--;
	if (err < 0) {
		status_failed(req, err);
		status_next(req);
		return;
	}
	/* Clip what the backing image said to the segment; where it said
	 * nothing, "data" is the safe guess. */
	for (size_t i = 0; i < req->tmp.len && err == 0; i++) {
		struct bm_extent *e = &req->tmp.v[i];
		uint64_t a = BM_MAX(e->offset, io->offset);
		uint64_t b = BM_MIN(e->offset + e->length, end);

		if (a < b && a == req->seg_off)
			err = bm_extent_list_append(out, a, b - a, e->flags);
		if (a < b && a == req->seg_off)
			req->seg_off = b;
	}
	if (err == 0 && req->seg_off < end)
		err = bm_extent_list_append(out, req->seg_off,
					    end - req->seg_off, 0);
	if (err < 0)
		status_failed(req, bm_error(-ENOMEM, "%s: out of memory",
					    req->f->path));
	req->seg_off = end;
	req->seg_next++;
	status_next(req);
}

/*
 * STATUS reports one segment at a time, so that extents stay in order;
 * a backing segment asks the backing image.  The chunk ends through a
 * deferred op, so long runs of chunks do not recurse.
 */
static void
status_next(struct fmt_req *req)
{
	struct bm_fmt *f = req->f;
	struct bm_extent_list *out = req->io->extents;

	while (req->seg_next < req->map.nseg) {
		struct bm_seg *sg = &req->map.seg[req->seg_next];
		uint64_t off = req->seg_off;
		uint32_t flags = 0;

		if (sg->kind == BM_SEG_BACKING && req->top && f->backing) {
			/* Top layer only: the backing image is not asked. */
			if (bm_extent_list_append(out, off, sg->length,
						  BM_EXTENT_BACKING) < 0) {
				status_failed(req, bm_error(-ENOMEM, "%s: out "
						"of memory", f->path));
				break;
			}
			req->seg_off += sg->length;
			req->seg_next++;
			continue;
		}
		if (sg->kind == BM_SEG_BACKING && f->backing &&
		    off < f->backing->size) {
			uint64_t len = BM_MIN(sg->length,
					      f->backing->size - off);
			struct bm_io *io;

			if (len < sg->length) {
				/* Past the backing image's end: the next
				 * chunk maps it again and finds a hole. */
				sg->length = len;
				req->map.nseg = req->seg_next + 1;
			}
			bm_extent_list_reset(&req->tmp);
			io = sub_io(req, 0, off, len, NULL);
			io->extents = &req->tmp;
			io->done = status_backing_done;
			bm_image_block_status(f->backing, io);
			return;
		}
		if (sg->kind == BM_SEG_ZERO)
			flags = BM_EXTENT_ZERO;
		else if (sg->kind != BM_SEG_DATA)
			flags = BM_EXTENT_HOLE | BM_EXTENT_ZERO;
		if (bm_extent_list_append(out, off, sg->length, flags) < 0) {
			status_failed(req, bm_error(-ENOMEM, "%s: out of "
						    "memory", f->path));
			break;
		}
		req->seg_off += sg->length;
		req->seg_next++;
	}
	req->pending = 1;
	bm_loop_defer(f->loop, &req->defer, nothing_done, 0);
}

/* Deferred completion when a chunk needed no I/O at all. */
static void
nothing_done(struct bm_op *op, int res)
{
	struct fmt_req *req = bm_container_of(op, struct fmt_req, defer);

	(void)res;
	if (--req->pending == 0)
		chunk_done(req);
}

/* Do the I/O a map answer describes. */
static void
execute(struct fmt_req *req)
{
	struct bm_fmt *f = req->f;
	struct bm_store *s = f->img.store;
	uint64_t off = req->pos;
	char *buf = req->map.buf;

	if (req->map.nseg == 0 || req->map.nseg > BM_MAP_MAX_SEGS) {
		fail(req, bm_error(-EIO, "%s: driver mapped nothing at %"
				   PRIu64, f->path, req->pos));
		return;
	}
	/* Hold one count across submission so that nothing completes the
	 * chunk before every segment is out. */
	req->pending = 1;
	if (req->kind == R_STATUS) {
		req->seg_next = 0;
		req->seg_off = req->pos;
		status_next(req);
		return;
	}
	for (unsigned i = 0; i < req->map.nseg; i++) {
		struct bm_seg *sg = &req->map.seg[i];
		struct bm_io *io;

		if (sg->length == 0 || off + sg->length > req->end) {
			req->err = bm_error(-EIO, "%s: driver mapped a bad "
					    "segment at %" PRIu64, f->path,
					    off);
			break;
		}
		switch (req->kind) {
		case R_READ:
			if (sg->kind == BM_SEG_DATA) {
				io = sub_io(req, i, sg->host, sg->length, buf);
				io->flags = req->io->flags & BM_IO_ASYNC;
				s->ops->read(s, io);
			} else if (sg->kind == BM_SEG_BACKING && f->backing &&
				   off < f->backing->size) {
				uint64_t n = BM_MIN(sg->length,
						    f->backing->size - off);

				memset(buf + n, 0, sg->length - n);
				io = sub_io(req, i, off, n, buf);
				bm_image_read(f->backing, io);
			} else if (sg->kind != BM_SEG_DONE) {
				memset(buf, 0, sg->length);
			}
			break;
		case R_WRITE:
			if (sg->kind == BM_SEG_DATA) {
				io = sub_io(req, i, sg->host, sg->length, buf);
				io->flags = req->io->flags &
					    (BM_IO_WRITEBACK | BM_IO_EVICT |
					     BM_IO_ASYNC);
				s->ops->write(s, io);
			} else if (sg->kind != BM_SEG_DONE) {
				req->err = bm_error(-EIO, "%s: driver gave no "
						    "place to write at %"
						    PRIu64, f->path, off);
			}
			break;
		case R_ZERO:
		case R_DISCARD:
			if (sg->kind == BM_SEG_DATA) {
				io = sub_io(req, i, sg->host, sg->length, NULL);
				if (req->kind == R_ZERO) {
					io->flags = req->io->flags &
						    (BM_IO_MAY_TRIM |
						     BM_IO_FAST_ZERO);
					s->ops->zero(s, io);
				} else {
					s->ops->discard(s, io);
				}
			}
			break;
		default:
			break;
		}
		if (req->err < 0)
			break;
		off += sg->length;
		if (buf)
			buf += sg->length;
	}
	bm_loop_defer(f->loop, &req->defer, nothing_done, 0);
}

static int
backing_change_check(struct bm_fmt *f, struct bm_io *io)
{
	struct bm_backing_change *bc =
		bm_container_of(io, struct bm_backing_change, io);

	if (!f->drv->set_backing)
		return bm_error(-ENOTSUP, "%s: %s images cannot change their "
				"backing file here", f->path, f->drv->name);
	if (f->img.readonly)
		return bm_error(-EROFS, "%s: opened read-only", f->path);
	if (!f->backing)
		return bm_error(-EINVAL, "%s: has no backing file", f->path);
	if (!bc->name || !*bc->name || !bc->backing)
		return bm_error(-EINVAL, "%s: no new backing file", f->path);
	if (bc->backing->size != f->backing->size)
		return bm_error(-EINVAL, "%s: new backing file %s holds %"
				PRIu64 " bytes, the old one %" PRIu64,
				f->path, bc->backing->name, bc->backing->size,
				f->backing->size);
	return 0;
}

/* The worker has answered (a map or a flush). */
static void
chunk_mapped(struct bm_work *w)
{
	struct fmt_req *req = bm_container_of(w, struct fmt_req, work);

	bm_loop_unhold(req->f->loop);
	if (flush_like(req->kind)) {
		finish(req);
		return;
	}
	if (req->err < 0) {
		fail(req, req->err);
		return;
	}
	execute(req);
}

static void
flush_skipped(struct bm_op *op, int res)
{
	(void)res;
	finish(bm_container_of(op, struct fmt_req, defer));
}

static void
presynced(struct bm_io *io, int err)
{
	struct fmt_req *req = bm_container_of(io, struct fmt_req, presync);

	if (err < 0) {
		fail(req, err);
		return;
	}
	worker_send(req->f, req);
}

/* Send the oldest request to the driver if it is a flush. */
static void
try_flush(struct bm_fmt *f)
{
	struct fmt_req *req = f->oldest;

	/* Not before the request's own start_later: until then the loop
	 * reads its fields, and a backing change is checked there. */
	if (!req || !flush_like(req->kind) ||
	    req->flush_sent || !req->started)
		return;
	req->flush_sent = true;
	if (req->kind == R_FLUSH &&
	    (!req->flush_needed || f->img.readonly)) {
		bm_loop_defer(f->loop, &req->defer, flush_skipped, 0);
		return;
	}
	if (req->kind == R_FLUSH) {
		/* Sync the data first, asynchronously: a driver's flush
		 * starts with a data sync too, and one that flushes on the
		 * worker holds the worker (and its lock) through it, so
		 * every request that needs the worker would wait for what
		 * may be hundreds of MiB of writeback.  Left for the driver
		 * is what was written meanwhile. */
		memset(&req->presync, 0, sizeof req->presync);
		req->presync.done = presynced;
		f->img.store->ops->flush(f->img.store, &req->presync);
		return;
	}
	worker_send(f, req);
}

static void
start_later(struct bm_op *op, int res)
{
	struct fmt_req *req = bm_container_of(op, struct fmt_req, defer);

	(void)res;
	req->started = true;
	/* A backing change or driver call refused at submission fails
	 * here; a flush always goes through try_flush. */
	if (flush_like(req->kind) && (req->err == 0 || req->kind == R_FLUSH))
		try_flush(req->f);
	else if (req->err < 0)
		fail(req, req->err);
	else
		advance(req);
}

static void
oom_done(struct bm_op *op, int res)
{
	struct bm_io *io = bm_container_of(op, struct bm_io, op);

	io->done(io, res);
}

static struct fmt_req *
submit(struct bm_image *img, struct bm_io *io, enum req_kind kind)
{
	struct bm_fmt *f = to_fmt(img);
	struct fmt_req *req = calloc(1, sizeof *req);
	int err = 0;

	if (!req) {
		/* The engine does not pass the caller's bm_io down to a
		 * store, so its op is free to carry the failure. */
		bm_error(-ENOMEM, "%s: out of memory", f->path);
		bm_loop_defer(f->loop, &io->op, oom_done, -ENOMEM);
		return NULL;
	}
	req->f = f;
	req->io = io;
	req->kind = kind;
	req->pos = io->offset;
	req->end = io->offset + io->length;
	req->fua = (kind == R_WRITE || kind == R_ZERO) &&
		   (io->flags & BM_IO_FUA);
	if (kind == R_BACKING)
		err = backing_change_check(f, io);
	else if (kind == R_CALL)
		err = img->readonly ? bm_error(-EROFS, "%s: opened read-only",
					       f->path) : 0;
	else if (kind != R_FLUSH &&
		 !bm_range_ok(io->offset, io->length, img->size))
		err = bm_error(-EINVAL, "%s: request at %" PRIu64 "+%" PRIu64
			       " beyond the end (%" PRIu64 ")", f->path,
			       io->offset, io->length, img->size);
	else if (kind != R_FLUSH && kind != R_STATUS &&
		 (io->offset % img->align || io->length % img->align))
		err = bm_error(-EINVAL, "%s: request at %" PRIu64 "+%" PRIu64
			       " is not aligned to %u bytes", f->path,
			       io->offset, io->length, img->align);
	else if (kind != R_READ && kind != R_STATUS && kind != R_FLUSH &&
		 img->readonly)
		err = bm_error(-EROFS, "%s: opened read-only", f->path);
	if (err < 0) {
		req->err = err;
		note_error(req, err);
	}
	if (kind == R_WRITE || kind == R_ZERO || kind == R_DISCARD)
		f->dirty = true;
	if (kind == R_FLUSH) {
		/* This flush covers what was written before it started. */
		req->flush_needed = f->dirty;
		f->dirty = false;
	}
	if (req->fua) {
		req->flush_needed = true;
		f->dirty = false;
	}

	req->prev = f->newest;
	if (f->newest)
		f->newest->next = req;
	else
		f->oldest = req;
	f->newest = req;
	bm_loop_defer(f->loop, &req->defer, start_later, 0);
	return req;
}

static void fmt_read(struct bm_image *i, struct bm_io *io) { submit(i, io, R_READ); }
static void fmt_write(struct bm_image *i, struct bm_io *io) { submit(i, io, R_WRITE); }
static void fmt_zero(struct bm_image *i, struct bm_io *io) { submit(i, io, R_ZERO); }
static void fmt_discard(struct bm_image *i, struct bm_io *io) { submit(i, io, R_DISCARD); }
static void fmt_flush(struct bm_image *i, struct bm_io *io) { submit(i, io, R_FLUSH); }
static void fmt_status(struct bm_image *i, struct bm_io *io) { submit(i, io, R_STATUS); }

static void
fmt_set_loop(struct bm_image *img, struct bm_loop *loop)
{
	struct bm_fmt *f = to_fmt(img);

	f->loop = loop;
	img->store->loop = loop;
	if (f->backing)
		bm_image_set_loop(f->backing, loop);
}

/* ---- open, create, close --------------------------------------------- */

static void
fmt_free(struct bm_fmt *f)
{
	if (f->worker_started || f->flusher_started) {
		pthread_mutex_lock(&f->qlock);
		f->stopping = true;
		pthread_cond_signal(&f->qcond);
		pthread_cond_signal(&f->fcond);
		pthread_mutex_unlock(&f->qlock);
	}
	if (f->worker_started)
		pthread_join(f->worker, NULL);
	if (f->flusher_started) {
		pthread_join(f->flusher, NULL);
		/* The final flush below runs on this thread, on wstore. */
		f->flusher_started = false;
	}
	if (f->state) {
		int r = f->img.readonly ? 0 : flush_trim(f);
		const char *msg = blockmirror_last_error();

		if (r < 0)
			bm_info("%s: final metadata flush failed: %s", f->path,
				msg ? msg : strerror(-r));
		f->drv->close(f->state);
	}
	bm_image_close(f->backing);
	for (size_t i = 0; i < f->nretired; i++) {
		bm_image_close(f->retired[i]);
		free(f->retired_names[2 * i]);
		free(f->retired_names[2 * i + 1]);
	}
	free(f->retired);
	free(f->retired_names);
	bm_store_close(f->wstore);
	bm_loop_free(f->wloop);
	bm_store_close(f->fstore);
	bm_loop_free(f->floop);
	pthread_cond_destroy(&f->qcond);
	pthread_cond_destroy(&f->fcond);
	pthread_cond_destroy(&f->dcond);
	pthread_mutex_destroy(&f->qlock);
	pthread_mutex_destroy(&f->size_lock);
	free(f->info.backing_name);
	free(f->backing_path);
	free(f->img.name);
	free(f->path);
	free(f);
}

static void
fmt_close(struct bm_image *img)
{
	struct bm_fmt *f = to_fmt(img);
	struct bm_store *s = img->store;

	fmt_free(f);
	bm_store_close(s);
}

static const struct bm_image_ops fmt_ops = {
	.read = fmt_read,
	.write = fmt_write,
	.zero = fmt_zero,
	.discard = fmt_discard,
	.flush = fmt_flush,
	.block_status = fmt_status,
	.set_loop = fmt_set_loop,
	.close = fmt_close,
};

void
bm_image_set_backing(struct bm_image *img, struct bm_backing_change *bc)
{
	struct fmt_req *req;

	if (img->ops != &fmt_ops) {
		bm_error(-ENOTSUP, "%s: only qcow2 and VHDX images have a "
			 "backing file", img->name);
		bm_loop_defer(img->store->loop, &bc->io.op, oom_done,
			      -ENOTSUP);
		return;
	}
	req = submit(img, &bc->io, R_BACKING);
	if (req)
		req->bc = bc;
}

void
bm_image_driver_call(struct bm_image *img, const struct bm_fmt_driver *drv,
		     int (*fn)(void *drv, void *arg), void *arg,
		     struct bm_io *io)
{
	struct fmt_req *req;

	if (!bm_image_has_driver(img, drv)) {
		bm_error(-ENOTSUP, "%s: not a %s image", img->name, drv->name);
		bm_loop_defer(img->store->loop, &io->op, oom_done, -ENOTSUP);
		return;
	}
	io->offset = io->length = 0;
	req = submit(img, io, R_CALL);
	if (req) {
		req->call = fn;
		req->call_arg = arg;
	}
}

bool
bm_image_has_driver(const struct bm_image *img,
		    const struct bm_fmt_driver *drv)
{
	return img->ops == &fmt_ops && ((const struct bm_fmt *)img)->drv == drv;
}

void
bm_image_block_status_top(struct bm_image *img, struct bm_io *io)
{
	struct fmt_req *req;

	if (img->ops != &fmt_ops) {
		bm_image_block_status(img, io);
		return;
	}
	/* The request starts from a deferred op: marking it now is in
	 * time. */
	req = submit(img, io, R_STATUS);
	if (req)
		req->top = true;
}

/* The engine with its metadata store, before the driver has run. */
static int
fmt_new(const struct bm_fmt_driver *drv, struct bm_store *store,
	const char *path, unsigned flags, struct bm_fmt **out)
{
	struct bm_fmt *f = calloc(1, sizeof *f);
	int r;

	if (!f || !(f->path = strdup(path)) || !(f->img.name = strdup(path))) {
		if (f)
			free(f->path);
		free(f);
		return bm_error(-ENOMEM, "%s: out of memory", path);
	}
	pthread_mutex_init(&f->qlock, NULL);
	pthread_mutex_init(&f->size_lock, NULL);
	pthread_cond_init(&f->qcond, NULL);
	pthread_cond_init(&f->fcond, NULL);
	pthread_cond_init(&f->dcond, NULL);
	f->drv = drv;
	f->flags = flags;
	f->loop = store->loop;
	f->img.ops = &fmt_ops;
	f->img.format = drv->format;
	f->img.readonly = !(flags & BM_IMAGE_WRITE);
	f->img.close_slow = !f->img.readonly;
	store->growable = true;

	r = bm_loop_new(16, &f->wloop);
	if (r < 0) {
		bm_error(r, "%s: cannot create a loop: %s", path, strerror(-r));
		goto fail;
	}
	r = bm_file_open(f->wloop, path, ((flags & BM_IMAGE_WRITE) ?
			 BM_OPEN_WRITE : 0) | ((flags & BM_IMAGE_NOFOLLOW) ?
			 BM_OPEN_NOFOLLOW : 0), 0, &f->wstore);
	if (r < 0)
		goto fail;
	r = bm_store_wrap(path, &f->wstore);
	if (r < 0)
		goto fail;
	f->wstore->growable = true;
	f->file_size = f->wstore->size;
	f->phys_size = f->file_size;
	*out = f;
	return 0;
fail:
	fmt_free(f);
	return r;
}

/* Test hook (fuzz/, declared in memstore.h): the driver's services over
 * wstore, without an image, a worker or a backing image. */
int
bm_fmt_detached_new(struct bm_store *wstore, const char *name,
		    unsigned flags, struct bm_fmt **out)
{
	struct bm_fmt *f = calloc(1, sizeof *f);

	if (!f || !(f->path = strdup(name))) {
		free(f);
		bm_store_close(wstore);
		return bm_error(-ENOMEM, "%s: out of memory", name);
	}
	pthread_mutex_init(&f->qlock, NULL);
	pthread_mutex_init(&f->size_lock, NULL);
	pthread_cond_init(&f->qcond, NULL);
	pthread_cond_init(&f->fcond, NULL);
	pthread_cond_init(&f->dcond, NULL);
	f->flags = flags;
	f->img.readonly = !(flags & BM_IMAGE_WRITE);
	f->wstore = wstore;
	wstore->growable = true;
	f->file_size = wstore->size;
	f->phys_size = f->file_size;
	*out = f;
	return 0;
}

void
bm_fmt_detached_free(struct bm_fmt *f)
{
	if (f)
		fmt_free(f);
}

/* The flusher's own loop and handle on the file, and the thread. */
static int
start_flusher(struct bm_fmt *f)
{
	int r = bm_loop_new(16, &f->floop);

	if (r < 0)
		return bm_error(r, "%s: cannot create a loop: %s", f->path,
				strerror(-r));
	r = bm_file_open(f->floop, f->path, BM_OPEN_WRITE |
			 ((f->flags & BM_IMAGE_NOFOLLOW) ? BM_OPEN_NOFOLLOW :
			  0), 0, &f->fstore);
	if (r == 0)
		r = bm_store_wrap(f->path, &f->fstore);
	if (r < 0)
		return r;
	f->fstore->growable = true;
	r = pthread_create(&f->flusher, NULL, flusher_main, f);
	if (r)
		return bm_error(-r, "%s: cannot start a thread: %s", f->path,
				strerror(r));
	f->flusher_started = true;
	return 0;
}

int
bm_fmt_open(const struct bm_fmt_driver *drv, struct bm_store *store,
	    const char *path, unsigned flags, struct bm_image **out)
{
	struct bm_fmt *f;
	int r;

	r = fmt_new(drv, store, path, flags, &f);
	if (r < 0)
		return r;
	r = drv->open(f, flags, &f->info, &f->state);
	if (r < 0) {
		f->state = NULL;
		goto fail;
	}
	if ((flags & BM_IMAGE_WRITE) && f->info.readonly) {
		r = bm_error(-EROFS, "%s: this %s image can only be opened "
			     "read-only", path, drv->name);
		goto fail;
	}
	/* The backing file policy and the chain: backing.c. */
	r = bm_backing_open(f->loop, f->path, f->info.backing_name,
			    f->info.backing_format, &f->backing,
			    &f->backing_path);
	if (r < 0)
		goto fail;
	f->img.store = store;
	f->img.size = f->info.virtual_size;
	f->img.cluster_size = f->info.cluster_size;
	f->img.align = f->info.align ? f->info.align : 1;
	if (f->img.align < store->align)
		f->img.align = store->align;
	r = pthread_create(&f->worker, NULL, worker_main, f);
	if (r) {
		r = bm_error(-r, "%s: cannot start a thread: %s", path,
			     strerror(r));
		goto fail;
	}
	f->worker_started = true;
	if (drv->flush_apart && (flags & BM_IMAGE_WRITE)) {
		r = start_flusher(f);
		if (r < 0)
			goto fail;
	}
	*out = &f->img;
	return 0;
fail:
	/* Nothing was written through a failed open that needs a flush. */
	if (f->state) {
		f->drv->close(f->state);
		f->state = NULL;
	}
	fmt_free(f);
	return r;
}

int
bm_fmt_create(const struct bm_fmt_driver *drv, struct bm_store *store,
	      const char *path, uint64_t size, const char *options,
	      unsigned flags, struct bm_image **out)
{
	struct bm_fmt *f;
	int r;

	r = fmt_new(drv, store, path, flags | BM_IMAGE_WRITE, &f);
	if (r < 0)
		return r;
	r = drv->create(f, size, options);
	if (r == 0)
		r = trim(f);
	fmt_free(f);
	if (r < 0)
		return r;
	return bm_fmt_open(drv, store, path, flags | BM_IMAGE_WRITE, out);
}

uint64_t
bm_image_data_bytes(struct bm_image *img)
{
	struct bm_fmt *f = to_fmt(img);

	if (img->ops != &fmt_ops || !f->drv->allocated)
		return 0;
	return f->drv->allocated(f->state);
}

struct bm_image *
bm_image_backing(struct bm_image *img)
{
	return img->ops == &fmt_ops ? to_fmt(img)->backing : NULL;
}

void
bm_image_facts(struct bm_image *img, struct bm_image_facts *out)
{
	struct bm_fmt *f;

	memset(out, 0, sizeof *out);
	out->backing_format = BLOCKMIRROR_FORMAT_AUTO;
	if (img->ops != &fmt_ops)
		return;
	f = to_fmt(img);
	out->backing_name = f->info.backing_name;
	out->backing_path = f->backing_path;
	out->backing_format = f->backing ? f->backing->format :
					   f->info.backing_format;
	out->has_identity = f->info.has_identity;
	memcpy(out->identity, f->info.identity, 16);
}
