/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The copier's pipeline (see copy.h for the contract).
 *
 * Each slot (struct bm_copy_req) owns one buffer and one bm_io.  The
 * buffers are slices of one arena, 2 MiB-aligned and advised for
 * transparent huge pages: a copy faults in a few huge pages instead of
 * thousands of small ones.  Unless the caller sets them, the request size
 * and count come from the stores: an NBD server that wants smaller
 * requests (store->copy_size) gets more of them, so that about as many
 * bytes stay in flight.
 * A data range goes: read -> scan -> one write or zero per run, issued one
 * after another within the slot; slots run in parallel.  Keeping the runs
 * of one slot serial keeps a slot to one request in flight, so the
 * `requests` bound is also the bound on destination requests.
 *
 * pump() is guarded against recursion: a range that completes without
 * I/O (a zero range on a zeroed destination) reports back from inside
 * pump, and the producer may call pump again from its done callback.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "copy.h"
#include "errors.h"
#include "extent.h"
#include "internal.h"

struct bm_copy_req {
	struct bm_copier *c;
	struct bm_copy_req *next_free;
	struct bm_copy_range range;
	struct bm_io io;
	void *buf;
	uint64_t pos; /* data: offset within the range of the next run */
};

#define DEFAULT_REQUEST_SIZE (1u << 20)
#define DEFAULT_REQUESTS 16
#define MAX_SMALL_REQUESTS 32
#define DEFAULT_SPARSE_BLOCK 4096
#define ARENA_ALIGN (2u << 20)

/* The request size the stores under the two images ask for, 0: none. */
static uint32_t
stores_copy_size(const struct bm_copier *c)
{
	uint32_t a = c->src && c->src->store ? c->src->store->copy_size : 0;
	uint32_t b = c->dst->store ? c->dst->store->copy_size : 0;

	return a && b ? BM_MIN(a, b) : a ? a : b;
}

int
bm_copier_init(struct bm_copier *c)
{
	size_t align = 4096, total;

	if (!c->request_size) {
		uint32_t hint = stores_copy_size(c);

		c->request_size = hint ? hint : DEFAULT_REQUEST_SIZE;
		if (!c->requests && hint && hint < DEFAULT_REQUEST_SIZE)
			c->requests = BM_MIN(MAX_SMALL_REQUESTS,
				DEFAULT_REQUESTS *
				(DEFAULT_REQUEST_SIZE / hint));
	}
	if (!c->requests)
		c->requests = DEFAULT_REQUESTS;
	if (c->sparse_block && !bm_is_power_of_2(c->sparse_block))
		return bm_error(-EINVAL, "sparse block size must be a power "
				"of two");
	align = BM_MAX(align, c->dst->align);
	if (c->src)
		align = BM_MAX(align, c->src->align);
	c->request_size = (uint32_t)bm_round_up(c->request_size, align);
	c->reqs = calloc(c->requests, sizeof *c->reqs);
	if (!c->reqs)
		return bm_error(-ENOMEM, "copy: out of memory");
	total = (size_t)c->requests * c->request_size;
	if (posix_memalign(&c->arena, BM_MAX(align, (size_t)ARENA_ALIGN),
			   total)) {
		bm_copier_fini(c);
		return bm_error(-ENOMEM, "copy: out of memory for %u buffers "
				"of %u bytes", c->requests, c->request_size);
	}
#ifdef MADV_HUGEPAGE
	madvise(c->arena, total, MADV_HUGEPAGE);
#endif
#ifdef MADV_POPULATE_WRITE
	/* Fault it all in now, not in the first requests: getting huge
	 * pages may mean compacting memory, tens of milliseconds. */
	madvise(c->arena, total, MADV_POPULATE_WRITE);
#endif
	for (unsigned i = 0; i < c->requests; i++) {
		struct bm_copy_req *q = &c->reqs[i];

		q->buf = (char *)c->arena + (size_t)i * c->request_size;
		q->c = c;
		q->io.opaque = q;
		q->next_free = c->free_reqs;
		c->free_reqs = q;
	}
	return 0;
}

void
bm_copier_fini(struct bm_copier *c)
{
	free(c->arena);
	c->arena = NULL;
	free(c->reqs);
	c->reqs = NULL;
	c->free_reqs = NULL;
}

void
bm_copier_stop(struct bm_copier *c)
{
	c->stopped = true;
}

static void
req_finish(struct bm_copy_req *q, int err)
{
	struct bm_copier *c = q->c;
	struct bm_copy_range r = q->range;

	q->next_free = c->free_reqs;
	c->free_reqs = q;
	c->inflight--;
	c->ops->done(c, &r, err);
	bm_copier_pump(c);
}

static void data_next_run(struct bm_copy_req *q);

static void
run_done(struct bm_io *io, int err)
{
	struct bm_copy_req *q = io->opaque;

	if (err < 0) {
		req_finish(q, err);
		return;
	}
	if (io->buf)
		q->range.written += io->length;
	q->pos += io->length;
	data_next_run(q);
}

/* Write the next data or zero run of a data range that has been read. */
static void
data_next_run(struct bm_copy_req *q)
{
	struct bm_copier *c = q->c;
	const uint64_t len = q->range.length;

	while (q->pos < len) {
		size_t end;
		bool zero = false;

		if (c->sparse_block)
			end = bm_next_run(q->buf, (size_t)len, (size_t)q->pos,
					  c->sparse_block, &zero);
		else
			end = (size_t)len;
		q->io.offset = q->range.offset + q->pos;
		q->io.length = end - q->pos;
		q->io.done = run_done;
		if (!zero) {
			q->io.buf = (char *)q->buf + q->pos;
			q->io.flags = BM_IO_WRITEBACK |
				      (c->evict ? BM_IO_EVICT : 0) |
				      (c->async ? BM_IO_ASYNC : 0);
			c->bytes_written += q->io.length;
			bm_image_write(c->dst, &q->io);
			return;
		}
		c->bytes_zeroed += q->io.length;
		if (c->dst_is_zero) {
			q->pos = end;
			continue;
		}
		q->io.buf = NULL; /* run_done: not data */
		q->io.flags = c->allocate ? 0 : BM_IO_MAY_TRIM;
		bm_image_zero(c->dst, &q->io);
		return;
	}
	req_finish(q, 0);
}

static void
read_done(struct bm_io *io, int err)
{
	struct bm_copy_req *q = io->opaque;

	if (err < 0) {
		q->range.read_failed = true;
		req_finish(q, err);
		return;
	}
	q->c->bytes_read += q->range.length;
	q->pos = 0;
	data_next_run(q);
}

static void
zero_done(struct bm_io *io, int err)
{
	req_finish(io->opaque, err);
}

static void
req_start(struct bm_copier *c, struct bm_copy_req *q)
{
	switch (q->range.kind) {
	case BM_COPY_DATA:
		q->io.offset = q->range.offset;
		q->io.length = q->range.length;
		q->io.buf = q->buf;
		q->io.flags = c->async ? BM_IO_ASYNC : 0;
		q->io.done = read_done;
		bm_image_read(c->src, &q->io);
		return;
	case BM_COPY_ZERO:
	case BM_COPY_HOLE:
		c->bytes_zeroed += q->range.length;
		q->io.offset = q->range.offset;
		q->io.length = q->range.length;
		q->io.done = zero_done;
		q->io.flags = c->allocate ? 0 : BM_IO_MAY_TRIM;
		bm_image_zero(c->dst, &q->io);
		return;
	}
}

void
bm_copier_pump(struct bm_copier *c)
{
	if (c->pumping) {
		c->repump = true;
		return;
	}
	c->pumping = true;
	do {
		c->repump = false;
		while (!c->stopped && c->free_reqs) {
			struct bm_copy_req *q = c->free_reqs;
			struct bm_copy_range r;

			if (!c->ops->next(c, &r))
				break;
			if (r.kind != BM_COPY_DATA && c->dst_is_zero &&
			    !c->allocate) {
				/* Nothing to do on a zeroed destination. */
				c->bytes_zeroed += r.length;
				c->ops->done(c, &r, 0);
				continue;
			}
			c->free_reqs = q->next_free;
			c->inflight++;
			r.read_failed = false;
			r.written = 0;
			q->range = r;
			req_start(c, q);
		}
	} while (c->repump);
	c->pumping = false;
}
