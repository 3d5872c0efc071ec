/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The replica store's image operations (replica-int.h; the store itself
 * is replica.c, docs/replica-store.md).
 *
 * The one that carries the store's invariant is the merge: it copies what
 * an overlay allocates itself into the image below it.  It never changes
 * what any image above the lower one reads, since each of those reaches
 * the copied clusters through the overlay first, where they hold the same
 * bytes; replica.c only merges into a layer no point reads alone.  Zero
 * clusters are copied as zeroes: below them the lower image may hold
 * data.  What the overlay leaves to its backing file is not touched.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <xxhash.h>

#include "durable.h"
#include "errors.h"
#include "extent.h"
#include "image.h"
#include "internal.h"
#include "replica-int.h"

#define CHUNK (1024 * BM_KiB)

/* A new image, flushed, its name durable. */
static int
create_durable(struct bm_loop *loop, const char *path,
	       enum blockmirror_format fmt, uint64_t size, const char *opts,
	       bool overwrite)
{
	struct bm_image *img = NULL;
	struct bm_io io = { 0 };
	int r;

	r = bm_image_create(loop, path, fmt, size, opts, overwrite, 0, &img);
	if (r == 0)
		r = bm_image_sync(img, bm_image_flush, &io);
	bm_image_close(img);
	if (r == 0)
		r = bm_durable_sync_parent(path);
	return r;
}

int
bm_replica_image_raw(struct bm_loop *loop, const char *path, uint64_t size)
{
	return create_durable(loop, path, BLOCKMIRROR_FORMAT_RAW, size, NULL,
			      false);
}

int
bm_replica_image_overlay(struct bm_loop *loop, const char *path,
			 uint64_t size, const char *backing,
			 enum blockmirror_format fmt, uint32_t cluster)
{
	char opts[4200];

	snprintf(opts, sizeof opts, "cluster_size=%" PRIu32 ",backing_file=%s,"
		 "backing_fmt=%s", cluster, backing,
		 blockmirror_format_name(fmt));
	return create_durable(loop, path, BLOCKMIRROR_FORMAT_QCOW2, size, opts,
			      true);
}

int
bm_replica_image_probe(struct bm_loop *loop, const char *path,
		       enum blockmirror_format *fmt, uint64_t *size)
{
	struct bm_image *img;
	int r;

	r = bm_image_open(loop, path, *fmt, 0, &img);
	if (r < 0)
		return r;
	*fmt = img->format;
	*size = img->size;
	if (bm_image_backing(img))
		r = bm_error(-EINVAL, "%s: has a backing file; a replica's "
			     "base stands alone", path);
	bm_image_close(img);
	return r;
}

int
bm_replica_image_sync(const char *path)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC), r;

	if (fd < 0)
		return bm_error(-errno, "%s: %s", path, strerror(errno));
	r = bm_durable_sync_fd(fd, path);
	close(fd);
	return r == 0 ? bm_durable_sync_parent(path) : r;
}

/* Copy [off, off + len) of `up` into `low`, through `buf`. */
static int
copy_range(struct bm_image *up, struct bm_image *low, uint8_t *buf,
	   uint64_t off, uint64_t len, bool zero)
{
	while (len) {
		struct bm_io io = { .offset = off,
				    .length = BM_MIN(len, CHUNK),
				    .buf = buf };
		int r = 0;

		if (zero) {
			r = bm_image_sync(low, bm_image_zero, &io);
		} else {
			r = bm_image_sync(up, bm_image_read, &io);
			if (r < 0)
				return bm_error_prefix(r, "%s: reading at %"
						       PRIu64 ": ", up->name,
						       off);
			io = (struct bm_io){ .offset = off,
					     .length = io.length, .buf = buf };
			r = bm_image_sync(low, bm_image_write, &io);
		}
		if (r < 0)
			return bm_error_prefix(r, "%s: writing at %" PRIu64
					       ": ", low->name, off);
		off += io.length;
		len -= io.length;
	}
	return 0;
}

int
bm_replica_image_merge(struct bm_loop *loop, const char *upper,
		       const char *lower, enum blockmirror_format fmt,
		       uint64_t *written, uint64_t *alloc)
{
	struct bm_image *up = NULL, *low = NULL;
	struct bm_extent_list ext = { 0 };
	uint8_t *buf = aligned_alloc(4096, CHUNK);
	uint64_t off = 0;
	struct bm_io io = { 0 };
	int r;

	*written = *alloc = 0;
	if (!buf)
		return bm_error(-ENOMEM, "out of memory");
	r = bm_image_open(loop, upper, BLOCKMIRROR_FORMAT_QCOW2, 0, &up);
	if (r == 0)
		r = bm_image_open(loop, lower, fmt, BM_IMAGE_WRITE, &low);
	if (r == 0 && up->size != low->size)
		r = bm_error(-EINVAL, "%s: %" PRIu64 " bytes, its backing file "
			     "%s %" PRIu64, upper, up->size, lower, low->size);
	if (r == 0)
		*alloc = bm_image_data_bytes(up);
	while (r == 0 && off < up->size) {
		io = (struct bm_io){ .offset = off, .length = up->size - off,
				     .extents = &ext };
		bm_extent_list_reset(&ext);
		r = bm_image_sync(up, bm_image_block_status_top, &io);
		if (r == 0 && (!ext.len || ext.v[0].offset != off))
			r = bm_error(-EIO, "%s: no block status at %" PRIu64,
				     upper, off);
		for (size_t i = 0; r == 0 && i < ext.len; i++) {
			struct bm_extent *e = &ext.v[i];
			uint64_t len = BM_MIN(e->length, up->size - e->offset);

			if (e->flags & BM_EXTENT_BACKING)
				continue;
			r = copy_range(up, low, buf, e->offset, len,
				       e->flags & BM_EXTENT_ZERO);
			if (!(e->flags & BM_EXTENT_ZERO))
				*written += len;
		}
		if (r == 0)
			off = BM_MIN(bm_extent_list_end(&ext), up->size);
	}
	if (r == 0) {
		io = (struct bm_io){ 0 };
		r = bm_image_sync(low, bm_image_flush, &io);
		if (r < 0)
			bm_error_prefix(r, "%s: flush: ", lower);
	}
	bm_extent_list_free(&ext);
	bm_image_close(up);
	bm_image_close(low);
	free(buf);
	return r;
}

int
bm_replica_image_repoint(const char *path, const char *backing,
			 enum blockmirror_format fmt)
{
	struct blockmirror_disk *d;
	int r;

	d = blockmirror_disk_open(path, BLOCKMIRROR_FORMAT_QCOW2, 0);
	if (!d)
		return bm_error(-errno, "%s", blockmirror_last_error());
	r = blockmirror_disk_set_backing(d, backing, fmt);
	if (r < 0)
		r = bm_error(r, "%s", blockmirror_last_error());
	if (blockmirror_disk_close(d) < 0 && r == 0)
		r = bm_error(-EIO, "%s", blockmirror_last_error());
	return r;
}

int
bm_replica_image_digests(struct bm_loop *loop, const char *path,
			 enum blockmirror_format fmt, uint32_t g,
			 uint64_t offset, uint64_t len, uint64_t *out)
{
	struct bm_image *img = NULL;
	uint64_t chunk = BM_MAX(CHUNK, g), done = 0;
	uint8_t *buf = aligned_alloc(4096, chunk);
	int r;

	if (!buf)
		return bm_error(-ENOMEM, "out of memory");
	r = bm_image_open(loop, path, fmt, 0, &img);
	while (r == 0 && done < len) {
		struct bm_io io = { .offset = offset + done,
				    .length = BM_MIN(chunk, len - done),
				    .buf = buf };

		r = bm_image_sync(img, bm_image_read, &io);
		if (r < 0) {
			bm_error_prefix(r, "%s: reading at %" PRIu64 ": ",
					path, io.offset);
			break;
		}
		for (uint64_t k = 0; k < io.length; k += g)
			*out++ = XXH3_64bits(buf + k,
					     BM_MIN(g, io.length - k));
		done += io.length;
	}
	bm_image_close(img);
	free(buf);
	return r;
}
