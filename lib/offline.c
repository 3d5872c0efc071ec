/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The offline operations of the public API: image info, create, copy.
 * Each runs a private event loop on the calling thread.
 *
 * The copy feeds the copier (copy.c) from the source's extent map, read
 * in windows of WINDOW bytes as the copy advances (nbdcopy found that
 * mapping a whole large image up front behaves badly with slow sources),
 * and then makes the destination durable: fdatasync of the file and, for
 * a file this call created, fsync of its directory.  A failed copy
 * removes the destination it created, so a half-written image is never
 * left looking like a finished one.
 *
 * An NBD URI as the destination is an existing export, written in place:
 * no existence check, nothing to remove on failure, an NBD flush instead
 * of fdatasync and no directory to sync.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "copy.h"
#include "durable.h"
#include "errors.h"
#include "extent.h"
#include "image.h"
#include "internal.h"
#include "loop.h"
#include "nbd.h"

#define WINDOW (UINT64_C(1) << 30)
#define MAX_ZERO_RANGE (UINT64_C(1) << 30)
#define PROGRESS_INTERVAL_NS 50000000

#define CHECK_STRUCT(p, type, member)                                      \
	((p) && (p)->size >= offsetof(type, member) + sizeof((p)->member))

static uint64_t
now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* ---- info ------------------------------------------------------------ */

BM_EXPORT int
blockmirror_image_info(const char *name, enum blockmirror_format format,
		       struct blockmirror_image_info *info)
{
	struct bm_loop *loop = NULL;
	struct bm_image *img = NULL;
	int r;

	bm_error_clear();
	if (!name || !CHECK_STRUCT(info, struct blockmirror_image_info,
				   block_device)) {
		r = bm_error(-EINVAL, "bad arguments");
		goto out;
	}
	r = bm_loop_new(8, &loop);
	if (r < 0)
		goto out;
	r = bm_image_open(loop, name, format, 0, &img);
	if (r < 0)
		goto out;
	info->format = img->format;
	info->virtual_size = img->size;
	info->allocated_bytes = img->store->allocated;
	info->cluster_size = img->cluster_size;
	info->block_device = img->store->block_device;
	if (CHECK_STRUCT(info, struct blockmirror_image_info, identity)) {
		struct bm_image_facts facts;

		bm_image_facts(img, &facts);
		info->data_bytes = img->format == BLOCKMIRROR_FORMAT_RAW ?
				   info->allocated_bytes :
				   bm_image_data_bytes(img);
		snprintf(info->backing_file, sizeof info->backing_file, "%s",
			 facts.backing_name ? facts.backing_name : "");
		snprintf(info->backing_path, sizeof info->backing_path, "%s",
			 facts.backing_path ? facts.backing_path : "");
		info->backing_format = facts.backing_path ?
				       facts.backing_format :
				       BLOCKMIRROR_FORMAT_AUTO;
		info->has_identity = facts.has_identity;
		memcpy(info->identity, facts.identity, 16);
	}
out:
	bm_image_close(img);
	bm_loop_free(loop);
	return r < 0 ? bm_api_fail("blockmirror_image_info", r) : 0;
}

/* ---- create ---------------------------------------------------------- */

BM_EXPORT int
blockmirror_image_create(const char *name, enum blockmirror_format format,
			 uint64_t virtual_size, const char *options,
			 bool overwrite)
{
	struct bm_loop *loop = NULL;
	struct bm_image *img = NULL;
	struct bm_io io = { 0 };
	int r;

	bm_error_clear();
	if (!name) {
		r = bm_error(-EINVAL, "no image name");
		goto out;
	}
	r = bm_loop_new(8, &loop);
	if (r < 0)
		goto out;
	r = bm_image_create(loop, name, format, virtual_size, options,
			    overwrite, 0, &img);
	if (r < 0)
		goto out;
	r = bm_image_sync(img, bm_image_flush, &io);
	if (r == 0 && !bm_nbd_is_uri(name))
		r = bm_durable_sync_parent(name);
out:
	bm_image_close(img);
	bm_loop_free(loop);
	return r < 0 ? bm_api_fail("blockmirror_image_create", r) : 0;
}

/* ---- copy ------------------------------------------------------------ */

struct offline_copy {
	struct bm_loop *loop;
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
	blockmirror_progress_fn progress;
	void *progress_data;
	uint64_t last_progress_ns;
};

static void map_next_window(struct offline_copy *oc);

static void
check_finished(struct offline_copy *oc)
{
	bool all = oc->err || oc->done_bytes == oc->c.src->size;

	if (all && oc->c.inflight == 0 && !oc->mapping)
		oc->finished = true;
}

static void
map_done(struct bm_io *io, int err)
{
	struct offline_copy *oc = io->opaque;

	oc->mapping = false;
	if (err < 0) {
		if (!oc->err)
			oc->err = err;
		check_finished(oc);
		return;
	}
	oc->mapped_end = io->offset + io->length;
	bm_copier_pump(&oc->c);
	check_finished(oc);
}

static void
map_next_window(struct offline_copy *oc)
{
	uint64_t size = oc->c.src->size;

	bm_extent_list_reset(&oc->map);
	oc->map_index = 0;
	oc->map_io.offset = oc->mapped_end;
	oc->map_io.length = BM_MIN(WINDOW, size - oc->mapped_end);
	oc->map_io.extents = &oc->map;
	oc->map_io.done = map_done;
	oc->map_io.opaque = oc;
	oc->mapping = true;
	bm_image_block_status(oc->c.src, &oc->map_io);
}

static bool
copy_next(struct bm_copier *c, struct bm_copy_range *r)
{
	struct offline_copy *oc = c->opaque;

	while (!oc->err) {
		struct bm_extent *e;
		uint64_t end, max;

		if (oc->map_index >= oc->map.len) {
			if (!oc->mapping && oc->mapped_end < c->src->size)
				map_next_window(oc);
			return false;
		}
		e = &oc->map.v[oc->map_index];
		if (oc->map_pos < e->offset)
			oc->map_pos = e->offset;
		end = e->offset + e->length;
		if (oc->map_pos >= end) {
			oc->map_index++;
			continue;
		}
		if (e->flags & BM_EXTENT_ZERO) {
			r->kind = (e->flags & BM_EXTENT_HOLE) ? BM_COPY_HOLE
							       : BM_COPY_ZERO;
			max = MAX_ZERO_RANGE;
		} else {
			r->kind = BM_COPY_DATA;
			max = c->request_size;
		}
		r->offset = oc->map_pos;
		r->length = BM_MIN(end - oc->map_pos, max);
		r->tag = NULL;
		oc->map_pos += r->length;
		return true;
	}
	return false;
}

static void
copy_done(struct bm_copier *c, const struct bm_copy_range *r, int err)
{
	struct offline_copy *oc = c->opaque;
	uint64_t t;

	if (err < 0) {
		if (!oc->err)
			oc->err = err;
		bm_copier_stop(c);
	} else {
		oc->done_bytes += r->length;
	}
	if (oc->progress && !oc->err) {
		t = now_ns();
		if (t - oc->last_progress_ns >= PROGRESS_INTERVAL_NS) {
			oc->last_progress_ns = t;
			oc->progress(oc->progress_data, oc->done_bytes,
				     c->src->size);
		}
	}
	check_finished(oc);
}

static const struct bm_copier_ops offline_copier_ops = {
	.next = copy_next,
	.done = copy_done,
};

static int
run_copy(struct offline_copy *oc)
{
	struct bm_copier *c = &oc->c;
	int r;

	r = bm_copier_init(c);
	if (r < 0)
		return r;
	if (c->src->size == 0) {
		oc->finished = true;
	} else {
		map_next_window(oc);
		r = bm_loop_run_until(oc->loop, &oc->finished);
	}
	bm_copier_fini(c);
	bm_extent_list_free(&oc->map);
	if (r < 0)
		return r;
	return oc->err;
}

static bool
same_file(const char *a, const char *b)
{
	struct stat sa, sb;

	return stat(a, &sa) == 0 && stat(b, &sb) == 0 &&
	       sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

BM_EXPORT int
blockmirror_copy(const char *src, const char *dst,
		 const struct blockmirror_copy_options *options,
		 struct blockmirror_copy_stats *stats)
{
	struct offline_copy oc = { 0 };
	struct bm_image *in = NULL, *out = NULL;
	enum blockmirror_format dst_format;
	struct bm_io io = { 0 };
	unsigned flags = 0, iflags = 0;
	bool created = false, dst_uri;
	const char *dst_options = NULL;
	char *dst_options_full = NULL;
	uint64_t t0 = now_ns();
	int r;

	bm_error_clear();
	if (!src || !dst ||
	    !CHECK_STRUCT(options, struct blockmirror_copy_options,
			  progress_data)) {
		r = bm_error(-EINVAL, "bad arguments");
		goto out;
	}
	if (stats && !CHECK_STRUCT(stats, struct blockmirror_copy_stats,
				   elapsed_us)) {
		r = bm_error(-EINVAL, "stats: bad size");
		goto out;
	}
	flags = options->flags;
	if (flags & BLOCKMIRROR_COPY_DIRECT)
		iflags |= BM_IMAGE_DIRECT;
	dst_uri = bm_nbd_is_uri(dst);
	if (strcmp(src, dst) == 0 ||
	    (!dst_uri && !bm_nbd_is_uri(src) && same_file(src, dst))) {
		r = bm_error(-EINVAL, "%s and %s are the same file", src, dst);
		goto out;
	}
	r = bm_loop_new(256, &oc.loop);
	if (r < 0)
		goto out;
	r = bm_image_open(oc.loop, src, options->src_format, iflags, &in);
	if (r < 0)
		goto out;
	dst_format = options->dst_format ? options->dst_format : in->format;
	if (!dst_uri && access(dst, F_OK) == 0 &&
	    !(flags & BLOCKMIRROR_COPY_OVERWRITE)) {
		r = bm_error(-EEXIST, "%s: already exists (overwrite it "
			     "explicitly to replace it)", dst);
		goto out;
	}
	if (CHECK_STRUCT(options, struct blockmirror_copy_options,
			 dst_options))
		dst_options = options->dst_options;
	r = bm_image_create_options(in, dst_format, dst_options,
				    &dst_options_full);
	if (r < 0)
		goto out;
	r = bm_image_create(oc.loop, dst, dst_format, in->size,
			    dst_options_full,
			    flags & BLOCKMIRROR_COPY_OVERWRITE, iflags, &out);
	if (r < 0)
		goto out;
	created = !dst_uri && !out->store->block_device;

	oc.c.src = in;
	oc.c.dst = out;
	oc.c.ops = &offline_copier_ops;
	oc.c.opaque = &oc;
	oc.c.request_size = options->request_size;
	oc.c.requests = options->requests;
	oc.c.allocate = flags & BLOCKMIRROR_COPY_ALLOCATE;
	oc.c.sparse_block = oc.c.allocate ? 0 : 4096;
	oc.c.dst_is_zero = out->zero_init && !oc.c.allocate;
	oc.progress = options->progress;
	oc.progress_data = options->progress_data;
	r = run_copy(&oc);
	if (r < 0)
		goto out;
	r = bm_image_sync(out, bm_image_flush, &io);
	if (r < 0)
		goto out;
	if (created && (r = bm_durable_sync_parent(dst)) < 0)
		goto out;
	if (oc.progress)
		oc.progress(oc.progress_data, in->size, in->size);
	if (stats) {
		stats->virtual_size = in->size;
		stats->bytes_read = oc.c.bytes_read;
		stats->bytes_written = oc.c.bytes_written;
		stats->bytes_zeroed = oc.c.bytes_zeroed;
		stats->elapsed_us = (now_ns() - t0) / 1000;
	}
out:
	bm_image_close(in);
	bm_image_close(out);
	if (r < 0 && created && unlink(dst) == 0)
		bm_info("%s: removed the incomplete copy", dst);
	bm_loop_free(oc.loop);
	free(dst_options_full);
	return r < 0 ? bm_api_fail("blockmirror_copy", r) : 0;
}
