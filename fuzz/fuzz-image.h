/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * What the image fuzz targets (fuzz-qcow2.c, fuzz-vhdx.c) share: running
 * one input through a format driver.
 *
 * Most inputs go the fast way: the file the input describes is laid out
 * in a memory store (lib/memstore.h), and the driver's open, map, flush
 * and close are called directly on this thread through a detached
 * engine (bm_fmt_detached_new): no file, no ring and no worker thread
 * per input, so thousands of inputs a second.  The driver sees exactly
 * what it sees under the engine: the same bm_fmt_* services over a
 * store, and the same map requests (nowait first, then the slow way).
 *
 * The input's last byte picks the mode:
 *   'W'  open writable (a pending VHDX log is replayed, dirty bits set),
 *        write, zero, discard and map again, change the backing file,
 *        flush and close: allocation, COW, refcount and BAT updates;
 *   'E'  if the input's CRC-32C is a multiple of FUZZ_ENGINE_ONE_IN,
 *        the full engine: the file goes into a memfd and is opened
 *        read-only with bm_image_open, read and block-statused through
 *        the ring and the worker thread (slow, a few hundred inputs a
 *        second, so only for few inputs); else as below;
 *   else open read-only, block-status and read a prefix and the end of
 *        the guest range, and close.
 * Nothing may crash, hang, leak or read out of bounds; errors are fine.
 *
 * A target's limits() keeps an input's cost near the average (goal:
 * 5,000 inputs per CPU-second on one core): images that would make the
 * driver allocate, copy or walk many MiB go through fewer of the steps
 * above (fuzz-qcow2.c).
 */
#ifndef FUZZ_IMAGE_H
#define FUZZ_IMAGE_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "crc32c.h"
#include "errors.h"
#include "extent.h"
#include "format.h"
#include "image.h"
#include "internal.h"
#include "loop.h"
#include "memstore.h"

#define FUZZ_MODE_WRITE 'W'
#define FUZZ_MODE_ENGINE 'E'
#define FUZZ_ENGINE_ONE_IN 32

/* The engine path: the guest range block-statused per input, in
 * requests of FUZZ_CHUNK, and the bytes read at the start of each (the
 * engine maps cluster by cluster and zero-fills holes: a MiB read costs
 * more than the rest of an input). */
#define FUZZ_READ_LIMIT (4u << 20)
#define FUZZ_ENGINE_READ (256u << 10)
/* The guest buffer, and the most the fast path maps at once. */
#define FUZZ_CHUNK (1u << 20)
/* The fast path: where the guest range is mapped (fuzz_map_all), and
 * the driver map calls per request. */
#define FUZZ_SPOTS 6
#define FUZZ_SPAN 8
#define FUZZ_MAX_MAPS 64
/* allocated(), which walks every table, only on images of at most this
 * many clusters. */
#define FUZZ_WALK_CLUSTERS (1u << 16)
/* The 'W' writes: at most this many bytes each. */
#define FUZZ_WRITE_MAX 65536u
/* The memory store: how large the file may grow, and its memory. */
#define FUZZ_MAX_FILE (UINT64_C(1) << 40)
#define FUZZ_MAX_MEM (UINT64_C(64) << 20)

/* Where a target lays out the file an input describes. */
struct fuzz_sink {
	int (*resize)(struct fuzz_sink *k, uint64_t size);
	int (*put)(struct fuzz_sink *k, const void *buf, size_t len,
		   uint64_t off);
	struct bm_store *store;  /* memory store */
	int fd;                  /* memfd */
};

/* What a target's limits() may ask of the harness for one input. */
#define FUZZ_SKIP 1u      /* no driver: only the pure parsers */
#define FUZZ_NO_WRITE 2u  /* 'W' opens read-only */
#define FUZZ_NO_WALK 4u   /* no allocated() */

struct fuzz_target {
	const char *name;
	const struct bm_fmt_driver *drv;
	enum blockmirror_format format;
	/* Lay out the file that data describes.  0 or -1. */
	int (*layout)(const uint8_t *data, size_t size, struct fuzz_sink *k);
	/* Optional: FUZZ_* flags for an input whose image would make the
	 * driver allocate or walk far more than the input is worth (the
	 * formats allow tables of many MiB and 2 MiB clusters); a cheap
	 * look at the input, not a validation. */
	unsigned (*limits)(const uint8_t *data, size_t size);
	/* set_backing reads the file it names (VHDX, for the parent's
	 * identity), which costs the driver as much as an input: then the
	 * short missing name is left out (the long one fails the same way). */
	bool backing_is_read;
};

static struct bm_loop *
fuzz_loop(void)
{
	static struct bm_loop *loop;

	if (!loop && bm_loop_new(32, &loop) < 0)
		abort();
	return loop;
}

/* FUZZ_VERBOSE=1 in the environment: say what an input did (replaying
 * one input by hand). */
static void
fuzz_note(const char *what, int r)
{
	static int verbose = -1;

	if (verbose < 0)
		verbose = getenv("FUZZ_VERBOSE") != NULL;
	if (verbose)
		fprintf(stderr, "%s: %d%s%s\n", what, r, r < 0 ? " " : "",
			r < 0 ? blockmirror_last_error() : "");
}

/* A guest buffer: compressed clusters are decompressed into it (READ)
 * and written from it (WRITE). */
static uint8_t *
fuzz_buf(void)
{
	static uint8_t *buf;

	if (!buf && !(buf = calloc(1, FUZZ_CHUNK)))
		abort();
	return buf;
}

/* One guest request, mapped chunk by chunk like format.c's advance()
 * and execute() do, with the data I/O of DATA segments done on the
 * memory store.  false once the budget of map calls is spent. */
static bool
fuzz_request(struct bm_fmt *f, const struct bm_fmt_driver *drv, void *state,
	     enum bm_map_op op, unsigned flags, uint64_t off, uint64_t len,
	     unsigned *maps)
{
	uint8_t *buf = fuzz_buf();
	uint64_t pos = off, end = off + len;

	if (len > FUZZ_CHUNK && (op == BM_MAP_READ || op == BM_MAP_WRITE))
		end = off + FUZZ_CHUNK;
	while (pos < end) {
		struct bm_map_req r;
		int err;

		if (++*maps > FUZZ_MAX_MAPS)
			return false;
		memset(&r, 0, offsetof(struct bm_map_req, seg));
		r.op = op;
		r.flags = flags;
		r.offset = pos;
		r.length = end - pos;
		if (op == BM_MAP_READ || op == BM_MAP_WRITE)
			r.buf = buf + (pos - off);
		r.nowait = true;
		err = drv->map(state, &r);
		if (err == -EAGAIN) {
			r.nowait = false;
			r.nseg = 0;
			err = drv->map(state, &r);
		}
		/* The engine fails such a request the same way. */
		if (err < 0 || r.nseg == 0 || r.nseg > BM_MAP_MAX_SEGS) {
			fuzz_note("map", err < 0 ? err : -EPROTO);
			return true;
		}
		for (unsigned i = 0; i < r.nseg; i++) {
			struct bm_seg *sg = &r.seg[i];

			if (sg->length == 0 || sg->length > end - pos)
				return true;
			if (sg->kind == BM_SEG_DATA && op == BM_MAP_WRITE)
				bm_fmt_pwrite(f, buf + (pos - off), sg->length,
					      sg->host);
			else if (sg->kind == BM_SEG_DATA && op == BM_MAP_ZERO)
				bm_fmt_zero_file(f, sg->host, sg->length);
			else if (sg->kind == BM_SEG_DATA && op == BM_MAP_READ)
				/* A taste of the data: reading all of it
				 * would only cost time. */
				bm_fmt_pread_zero(f, buf + (pos - off),
						  BM_MIN(sg->length, 512),
						  sg->host);
			pos += sg->length;
		}
	}
	return true;
}

/*
 * Block status and reads at the start, the end and FUZZ_SPOTS points in
 * between, so that a large image loads many tables (each qcow2 L2 table,
 * each VHDX BAT chunk covers a wide guest range) while the guest bytes
 * mapped, which cost time per cluster, stay few: FUZZ_SPAN clusters, at
 * most a chunk, at each point.
 */
static void
fuzz_map_all(struct bm_fmt *f, const struct bm_fmt_driver *drv, void *state,
	     uint64_t vsize, uint64_t cs)
{
	uint64_t len = BM_MIN((uint64_t)FUZZ_CHUNK, FUZZ_SPAN * cs);

	for (unsigned i = 0; i <= FUZZ_SPOTS + 1; i++) {
		/* vsize / FUZZ_SPOTS * i: no overflow, any vsize. */
		uint64_t off = i > FUZZ_SPOTS ? (vsize > len ? vsize - len : 0) :
						vsize / (FUZZ_SPOTS + 1) * i;
		unsigned maps = 0;

		off &= ~(uint64_t)4095;
		if (off >= vsize)
			continue;
		fuzz_request(f, drv, state, BM_MAP_STATUS, 0, off,
			     BM_MIN(len, vsize - off), &maps);
		fuzz_request(f, drv, state, BM_MAP_READ, 0, off,
			     BM_MIN(len, vsize - off), &maps);
	}
}

/*
 * A base image for set_backing, made once by the driver's own create in
 * a memfd: a driver that reads what it links to (VHDX records the
 * parent's DataWriteGuid) then goes all the way instead of failing at
 * a missing file.  Its path, or NULL.
 */
static const char *
fuzz_parent(const struct fuzz_target *t)
{
	static char path[64];
	static bool tried;
	struct bm_store *s;
	struct bm_fmt *f;
	int fd, r = -1;

	if (tried)
		return path[0] ? path : NULL;
	tried = true;
	fd = memfd_create("fuzz-parent", 0);
	if (fd < 0)
		return NULL;
	snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
	if (bm_file_open(fuzz_loop(), path, BM_OPEN_WRITE, 0, &s) == 0 &&
	    bm_fmt_detached_new(s, path, BM_IMAGE_WRITE, &f) == 0) {
		r = t->drv->create ? t->drv->create(f, 4u << 20, "") : -1;
		bm_fmt_detached_free(f);
	}
	bm_error_clear();
	if (r < 0) {
		/* The fd stays open: the path is ours for the run. */
		path[0] = 0;
		return NULL;
	}
	return path;
}

/* Writes that make a driver allocate, fill partial clusters, free and
 * zero; then the backing file changes; flushes between. */
static void
fuzz_write_all(struct bm_fmt *f, const struct fuzz_target *t, void *state,
	       const struct bm_fmt_info *info)
{
	const struct bm_fmt_driver *drv = t->drv;
	const char *parent = fuzz_parent(t);
	unsigned maps = 0;
	uint64_t vsize = info->virtual_size;
	uint64_t cs = info->cluster_size ? info->cluster_size : 65536;
	uint8_t *buf = fuzz_buf();
	int r;
	struct {
		enum bm_map_op op;
		unsigned flags;
		uint64_t off, len;
	} ops[] = {
		{ BM_MAP_WRITE, 0, 4096, 8192 },
		{ BM_MAP_WRITE, 0, cs, FUZZ_WRITE_MAX },
		{ BM_MAP_ZERO, BM_IO_MAY_TRIM, 0, cs },
		{ BM_MAP_ZERO, 0, 2 * cs, cs },
		{ BM_MAP_ZERO, BM_IO_FAST_ZERO, 3 * cs, 4096 },
		{ BM_MAP_DISCARD, 0, cs, cs },
		{ BM_MAP_WRITE, 0, vsize > 4096 ? (vsize - 4096) & ~4095ull : 0,
		  4096 },
		{ BM_MAP_WRITE, 0, 2 * cs + 4096, 4096 },
	};

	/* Reads of the last input left their bytes in buf. */
	memset(buf, 0xa5, FUZZ_WRITE_MAX);
	for (size_t i = 0; i < BM_ARRAY_SIZE(ops); i++) {
		uint64_t off = ops[i].off, len = ops[i].len;

		if (off >= vsize)
			continue;
		len = BM_MIN(len, vsize - off);
		if (!fuzz_request(f, drv, state, ops[i].op, ops[i].flags, off,
				  len, &maps))
			return;
		if (i == 3 && drv->flush(state) < 0)
			return;
	}
	r = drv->flush(state);
	fuzz_note("flush", r);
	if (r < 0)
		return;
	if (drv->set_backing) {
		if (!parent || !t->backing_is_read) {
			r = drv->set_backing(state, "fuzz-base.img",
					     t->format);
			fuzz_note("set_backing", r);
		}
		if (parent) {
			r = drv->set_backing(state, parent, t->format);
			fuzz_note("set_backing (a real base)", r);
		}
		r = drv->set_backing(state, "../a/rather/longer/name/for/the/"
				     "backing/file.vhdx",
				     BLOCKMIRROR_FORMAT_AUTO);
		fuzz_note("set_backing", r);
	}
	fuzz_map_all(f, drv, state, vsize, cs);
}

static int
fuzz_mem_resize(struct fuzz_sink *k, uint64_t size)
{
	return k->store->ops->truncate(k->store, size) < 0 ? -1 : 0;
}

static int
fuzz_mem_put(struct fuzz_sink *k, const void *buf, size_t len, uint64_t off)
{
	return bm_mem_store_fill(k->store, buf, len, off) < 0 ? -1 : 0;
}

static void
fuzz_direct(const struct fuzz_target *t, const uint8_t *data, size_t size,
	    bool write, unsigned limits)
{
	unsigned flags = write ? BM_IMAGE_WRITE : 0;
	struct fuzz_sink k = { fuzz_mem_resize, fuzz_mem_put, NULL, -1 };
	struct bm_fmt_info info = { 0 };
	struct bm_fmt *f;
	void *state = NULL;
	int r;

	if (bm_mem_store_new(fuzz_loop(), t->name, 0, FUZZ_MAX_FILE,
			     FUZZ_MAX_MEM, &k.store) < 0)
		return;
	if (t->layout(data, size, &k) < 0) {
		bm_store_close(k.store);
		return;
	}
	if (bm_fmt_detached_new(k.store, t->name, flags, &f) < 0)
		return;
	r = t->drv->open(f, flags, &info, &state);
	fuzz_note(write ? "open writable" : "open", r);
	if (r == 0 && info.backing_name) {
		char what[128];

		snprintf(what, sizeof what, "backing file '%s'",
			 info.backing_name);
		fuzz_note(what, 0);
	}
	if (r == 0) {
		/* The engine refuses a writable open of a read-only image
		 * and closes the driver without a flush. */
		if (!(write && info.readonly)) {
			if (write)
				fuzz_write_all(f, t, state, &info);
			else
				fuzz_map_all(f, t->drv, state,
					     info.virtual_size,
					     info.cluster_size ?
						     info.cluster_size : 512);
			if (write)
				t->drv->flush(state);
		}
		/* A walk of every table (every L1 entry, every BAT entry):
		 * worth it after writes, on guest ranges of few clusters,
		 * too slow to pay on every input. */
		if (write && !(limits & FUZZ_NO_WALK) && info.cluster_size &&
		    info.virtual_size / info.cluster_size <= FUZZ_WALK_CLUSTERS)
			t->drv->allocated(state);
		t->drv->close(state);
	}
	free(info.backing_name);
	bm_fmt_detached_free(f);
}

static int
fuzz_fd_resize(struct fuzz_sink *k, uint64_t size)
{
	return ftruncate(k->fd, (off_t)size);
}

static int
fuzz_fd_put(struct fuzz_sink *k, const void *buf, size_t len, uint64_t off)
{
	return pwrite(k->fd, buf, len, (off_t)off) == (ssize_t)len ? 0 : -1;
}

/* The whole engine, read-only, as a guest would see the image. */
static void
fuzz_engine(const struct fuzz_target *t, const uint8_t *data, size_t size)
{
	struct fuzz_sink k = { fuzz_fd_resize, fuzz_fd_put, NULL, -1 };
	uint8_t *buf = fuzz_buf();
	struct bm_image *img;
	char path[64];

	fuzz_note("full engine", 0);
	k.fd = memfd_create(t->name, 0);
	if (k.fd < 0)
		return;
	snprintf(path, sizeof path, "/proc/self/fd/%d", k.fd);
	if (t->layout(data, size, &k) < 0 ||
	    bm_image_open(fuzz_loop(), path, t->format, 0, &img) < 0) {
		close(k.fd);
		return;
	}
	for (uint64_t off = 0; off < img->size && off < FUZZ_READ_LIMIT;
	     off += FUZZ_CHUNK) {
		uint64_t n = BM_MIN(img->size - off, (uint64_t)FUZZ_CHUNK);
		struct bm_extent_list l = { 0 };
		struct bm_io r = { .offset = off,
				   .length = BM_MIN(n, FUZZ_ENGINE_READ),
				   .buf = buf };
		struct bm_io s = { .offset = off, .length = n, .extents = &l };

		bm_image_sync(img, bm_image_block_status, &s);
		bm_extent_list_free(&l);
		if (bm_image_sync(img, bm_image_read, &r) < 0)
			break;
	}
	bm_image_data_bytes(img);
	bm_image_close(img);
	close(k.fd);
}

/* The whole of LLVMFuzzerTestOneInput after the target's own checks. */
static void
fuzz_image(const struct fuzz_target *t, const uint8_t *data, size_t size)
{
	int mode = size ? data[size - 1] : 0;
	unsigned limits = t->limits ? t->limits(data, size) : 0;

	if (limits & FUZZ_SKIP) {
		fuzz_note("skipped (too large for the harness)", 0);
		return;
	}
	/* Mutants of an 'E' input mostly end in 'E' too: a checksum of
	 * the whole input keeps them to one in FUZZ_ENGINE_ONE_IN, so the
	 * slow path stays a small share of the executions. */
	if (mode == FUZZ_MODE_ENGINE &&
	    bm_crc32c(0, data, size) % FUZZ_ENGINE_ONE_IN == 0)
		fuzz_engine(t, data, size);
	else
		fuzz_direct(t, data, size,
			    mode == FUZZ_MODE_WRITE && !(limits & FUZZ_NO_WRITE),
			    limits);
	bm_error_clear();
}

#endif /* FUZZ_IMAGE_H */
