/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Opening and creating images: probing, the choice of driver, and the
 * rule that protects guessed images.
 *
 * The rule: an image whose first sector carries a qcow2 or VHDX signature
 * is never opened as raw unless the caller named raw.  Otherwise a guest
 * that wrote a qcow2 header into its raw disk could have the host
 * reinterpret (and later write) it as qcow2, or a qcow2 image could be
 * copied as raw bytes and lose its format.  With AUTO the signature picks
 * the driver, and a format we cannot read is an error, never raw.
 *
 * An NBD URI names an export that is raw by definition (the server turns
 * whatever format it holds into guest data), so it is never probed, and
 * naming qcow2 or VHDX for one is an error.  "Creating" one means opening
 * the existing export, whose size must match.  BM_IMAGE_MULTI_CONN (a
 * bulk copy) lets its store open several connections.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "errors.h"
#include "fault.h"
#include "format.h"
#include "image.h"
#include "internal.h"
#include "nbd.h"
#include "probe.h"

static const char *const format_names[] = {
	[BLOCKMIRROR_FORMAT_AUTO] = "auto",
	[BLOCKMIRROR_FORMAT_RAW] = "raw",
	[BLOCKMIRROR_FORMAT_QCOW2] = "qcow2",
	[BLOCKMIRROR_FORMAT_VHDX] = "vhdx",
};

BM_EXPORT const char *
blockmirror_format_name(enum blockmirror_format format)
{
	return BM_NAME_OF(format_names, format);
}

BM_EXPORT int
blockmirror_format_from_name(const char *name)
{
	bm_error_clear();
	for (size_t i = 0; name && i < BM_ARRAY_SIZE(format_names); i++)
		if (strcmp(name, format_names[i]) == 0)
			return (int)i;
	bm_error(-EINVAL, "unknown format '%s' (use raw, qcow2 or vhdx)",
		 name ? name : "(null)");
	return bm_api_fail("blockmirror_format_from_name", -EINVAL);
}

static int
probe_store(struct bm_store *s, enum blockmirror_format *out)
{
	struct bm_io io = { 0 };
	void *buf;
	int r;

	*out = BLOCKMIRROR_FORMAT_RAW;
	if (s->size == 0)
		return 0;
	if (posix_memalign(&buf, 4096, 4096))
		return bm_error(-ENOMEM, "%s: out of memory", s->name);
	io.buf = buf;
	io.offset = 0;
	io.length = BM_MIN(s->size, 4096);
	if (io.length % s->align)
		io.length = s->align; /* size is aligned, so this fits */
	r = bm_store_sync(s, s->ops->read, &io);
	if (r == 0)
		*out = bm_probe(buf, (size_t)io.length);
	free(buf);
	return r;
}

static const struct bm_fmt_driver *
mapped_driver(enum blockmirror_format format)
{
	switch (format) {
	case BLOCKMIRROR_FORMAT_QCOW2:
		return &bm_qcow2_driver;
	case BLOCKMIRROR_FORMAT_VHDX:
		return &bm_vhdx_driver;
	default:
		return NULL;
	}
}

static int
open_driver(struct bm_store *s, const char *path,
	    enum blockmirror_format format, unsigned flags,
	    struct bm_image **out)
{
	const struct bm_fmt_driver *drv = mapped_driver(format);

	if (format == BLOCKMIRROR_FORMAT_RAW)
		return bm_raw_open(s, flags, out);
	if (!drv)
		return bm_error(-EINVAL, "%s: bad format", s->name);
	if (s->block_device && (flags & BM_IMAGE_WRITE))
		return bm_error(-ENOTSUP, "%s: %s on a block device can only "
				"be opened read-only", path, drv->name);
	return bm_fmt_open(drv, s, path, flags, out);
}

static int
nbd_format_check(const char *name, enum blockmirror_format format)
{
	if (format == BLOCKMIRROR_FORMAT_AUTO ||
	    format == BLOCKMIRROR_FORMAT_RAW)
		return 0;
	if (format == BLOCKMIRROR_FORMAT_QCOW2 ||
	    format == BLOCKMIRROR_FORMAT_VHDX)
		return bm_error(-EINVAL, "%s: an NBD export is raw, not %s "
				"(the server handles the format)", name,
				blockmirror_format_name(format));
	return bm_error(-EINVAL, "%s: bad format", name);
}

/* Open an NBD export (a URI), fault-wrapped like a file. */
static int
open_nbd_store(struct bm_loop *loop, const char *name, unsigned sflags,
	       struct bm_store **out)
{
	int r;

	r = bm_nbd_open(loop, name,
			sflags & (BM_OPEN_WRITE | BM_OPEN_MULTI_CONN), out);
	if (r < 0)
		return r;
	r = bm_store_wrap(name, out);
	if (r < 0) {
		bm_store_close(*out);
		return r;
	}
	return 0;
}

int
bm_image_open(struct bm_loop *loop, const char *name,
	      enum blockmirror_format format, unsigned flags,
	      struct bm_image **out)
{
	enum blockmirror_format found;
	struct bm_store *s;
	unsigned sflags = 0;
	int r;

	if (flags & BM_IMAGE_WRITE)
		sflags |= BM_OPEN_WRITE;
	if (flags & BM_IMAGE_DIRECT)
		sflags |= BM_OPEN_DIRECT;
	if (flags & BM_IMAGE_DIRECT_BULK)
		sflags |= BM_OPEN_DIRECT_BULK;
	if (flags & BM_IMAGE_NOFOLLOW)
		sflags |= BM_OPEN_NOFOLLOW;
	if (bm_nbd_is_uri(name)) {
		r = nbd_format_check(name, format);
		if (r == 0)
			r = open_nbd_store(loop, name, sflags |
					   ((flags & BM_IMAGE_MULTI_CONN) ?
					    BM_OPEN_MULTI_CONN : 0), &s);
		if (r < 0)
			return r;
		r = bm_raw_open(s, flags, out);
		if (r < 0)
			bm_store_close(s);
		return r;
	}
	r = bm_file_open(loop, name, sflags, 0, &s);
	if (r < 0)
		return r;
	r = bm_store_wrap(name, &s);
	if (r < 0)
		goto out_close;

	if (format != BLOCKMIRROR_FORMAT_RAW) {
		r = probe_store(s, &found);
		if (r < 0)
			goto out_close;
		if (format == BLOCKMIRROR_FORMAT_AUTO) {
			format = found;
		} else if (found != format) {
			r = bm_error(-EINVAL, "%s: not a %s image (it looks "
				     "like %s)", name,
				     blockmirror_format_name(format),
				     blockmirror_format_name(found));
			goto out_close;
		}
	}
	r = open_driver(s, name, format, flags, out);
	if (r < 0)
		goto out_close;
	if (flags & BM_IMAGE_WRITE)
		(*out)->close_slow = true;
	return 0;

out_close:
	bm_store_close(s);
	return r;
}

/*
 * Does the whole store read as zeroes?  Block status in windows, stopping
 * at the first window that holds data: cheap for a fresh export and for
 * one full of data alike.  Any doubt (an error) is "no".
 */
static bool
store_is_zero(struct bm_store *s)
{
	struct bm_extent_list l = { 0 };
	bool zero = true;

	for (uint64_t off = 0; zero && off < s->size;) {
		struct bm_io io = { 0 };

		bm_extent_list_reset(&l);
		io.offset = off;
		io.length = BM_MIN(s->size - off, BM_GiB);
		io.extents = &l;
		if (bm_store_sync(s, s->ops->extents, &io) < 0 ||
		    bm_extent_list_end(&l) != off + io.length) {
			bm_error_clear();
			zero = false;
			break;
		}
		for (size_t i = 0; i < l.len; i++)
			if (!(l.v[i].flags & BM_EXTENT_ZERO))
				zero = false;
		off += io.length;
	}
	bm_extent_list_free(&l);
	return zero;
}

/* "Create" on an NBD export: open it, check its size, write nothing. */
static int
create_nbd(struct bm_loop *loop, const char *name,
	   enum blockmirror_format format, uint64_t size, const char *options,
	   unsigned flags, struct bm_image **out)
{
	struct bm_store *s;
	int r;

	r = nbd_format_check(name, format);
	if (r < 0)
		return r;
	if (options && *options)
		return bm_error(-EINVAL, "%s: raw images take no options "
				"(got '%s')", name, options);
	r = open_nbd_store(loop, name, BM_OPEN_WRITE |
			   ((flags & BM_IMAGE_MULTI_CONN) ?
			    BM_OPEN_MULTI_CONN : 0), &s);
	if (r < 0)
		return r;
	if (s->size != size) {
		r = bm_error(-EINVAL, "%s: the export holds %" PRIu64 " bytes, "
			     "not %" PRIu64, name, s->size, size);
		bm_store_close(s);
		return r;
	}
	r = bm_raw_open(s, flags | BM_IMAGE_WRITE, out);
	if (r < 0) {
		bm_store_close(s);
		return r;
	}
	(*out)->zero_init = store_is_zero(s);
	return 0;
}

int
bm_image_create(struct bm_loop *loop, const char *name,
		enum blockmirror_format format, uint64_t size,
		const char *options, bool overwrite, unsigned flags,
		struct bm_image **out)
{
	struct bm_store *s;
	unsigned sflags = overwrite ? BM_OPEN_TRUNCATE : BM_OPEN_CREATE;
	int r;

	if (bm_nbd_is_uri(name))
		return create_nbd(loop, name, format, size, options, flags,
				  out);
	if (format != BLOCKMIRROR_FORMAT_RAW && !mapped_driver(format))
		return bm_error(-EINVAL, "%s: bad format", name);
	if (format == BLOCKMIRROR_FORMAT_RAW && options && *options)
		return bm_error(-EINVAL, "%s: raw images take no options "
				"(got '%s')", name, options);
	if (size > INT64_MAX)
		return bm_error(-EFBIG, "%s: size %" PRIu64 " is too large",
				name, size);
	if (flags & BM_IMAGE_DIRECT)
		sflags |= BM_OPEN_DIRECT;
	if (flags & BM_IMAGE_DIRECT_BULK)
		sflags |= BM_OPEN_DIRECT_BULK;
	if (flags & BM_IMAGE_NOFOLLOW)
		sflags |= BM_OPEN_NOFOLLOW;
	r = bm_file_open(loop, name, sflags,
			 format == BLOCKMIRROR_FORMAT_RAW ? size : 0, &s);
	if (r == -EEXIST)
		return bm_error(r, "%s: already exists", name);
	if (r < 0)
		return r;
	r = bm_store_wrap(name, &s);
	if (r < 0) {
		bm_store_close(s);
		return r;
	}
	if (format != BLOCKMIRROR_FORMAT_RAW) {
		if (s->block_device) {
			bm_store_close(s);
			return bm_error(-ENOTSUP, "%s: creating %s images on "
					"block devices is not supported", name,
					blockmirror_format_name(format));
		}
		r = bm_fmt_create(mapped_driver(format), s, name, size,
				  options, flags, out);
		if (r < 0) {
			/* What we made (or emptied) holds no image: leave
			 * nothing behind that a retry would trip over. */
			bm_store_close(s);
			unlink(name);
			return r;
		}
		(*out)->zero_init = bm_image_backing(*out) == NULL;
		return 0;
	}
	if (s->block_device && s->size != size) {
		bm_store_close(s);
		return bm_error(-EINVAL, "%s: block device holds %" PRIu64
				" bytes, not %" PRIu64, name, s->size, size);
	}
	r = bm_raw_open(s, flags, out);
	if (r < 0) {
		bm_store_close(s);
		return r;
	}
	(*out)->zero_init = !s->block_device;
	(*out)->close_slow = true;
	return 0;
}

int
bm_image_create_options(struct bm_image *src, enum blockmirror_format format,
			const char *options, char **out)
{
	struct bm_image_facts facts;
	const uint8_t *g;
	char page83[40];
	int n;

	*out = NULL;
	bm_image_facts(src, &facts);
	if (format != BLOCKMIRROR_FORMAT_VHDX || !facts.has_identity ||
	    (options && bm_fmt_option(options, "page83", page83,
				      sizeof page83) != 0)) {
		if (options && !(*out = strdup(options)))
			return bm_error(-ENOMEM, "out of memory");
		return 0;
	}
	/* The GUID's text form: its first three fields are little-endian
	 * in the image. */
	g = facts.identity;
	n = asprintf(out, "%s%spage83=%02x%02x%02x%02x-%02x%02x-%02x%02x-"
		     "%02x%02x-%02x%02x%02x%02x%02x%02x",
		     options ? options : "", options && *options ? "," : "",
		     g[3], g[2], g[1], g[0], g[5], g[4], g[7], g[6], g[8],
		     g[9], g[10], g[11], g[12], g[13], g[14], g[15]);
	if (n < 0) {
		*out = NULL;
		return bm_error(-ENOMEM, "out of memory");
	}
	return 0;
}

void
bm_filter_pass_read(struct bm_image *img, struct bm_io *io)
{
	bm_image_read(img->below, io);
}

void
bm_filter_pass_flush(struct bm_image *img, struct bm_io *io)
{
	bm_image_flush(img->below, io);
}

void
bm_filter_pass_block_status(struct bm_image *img, struct bm_io *io)
{
	bm_image_block_status(img->below, io);
}

void
bm_filter_no_close(struct bm_image *img)
{
}

void
bm_image_set_loop(struct bm_image *img, struct bm_loop *loop)
{
	if (img->ops->set_loop)
		img->ops->set_loop(img, loop);
	else
		img->store->loop = loop;
}

void
bm_image_close(struct bm_image *img)
{
	if (img)
		img->ops->close(img);
}

/*
 * Running one request to completion (tools, tests, opening images): the
 * caller's thread turns the loop until the request is done.  Stores and
 * images share the waiting.
 */
struct io_wait {
	bool done;
	int err;
};

static void
io_wait_done(struct bm_io *io, int err)
{
	struct io_wait *w = io->opaque;

	w->done = true;
	w->err = err;
}

static int
io_wait(struct bm_loop *loop, struct io_wait *w)
{
	int r = bm_loop_run_until(loop, &w->done);

	return r < 0 ? r : w->err;
}

int
bm_store_sync(struct bm_store *s,
	      void (*op)(struct bm_store *, struct bm_io *), struct bm_io *io)
{
	struct io_wait w = { 0 };

	io->done = io_wait_done;
	io->opaque = &w;
	op(s, io);
	return io_wait(s->loop, &w);
}

int
bm_image_sync(struct bm_image *img,
	      void (*op)(struct bm_image *, struct bm_io *), struct bm_io *io)
{
	struct io_wait w = { 0 };

	io->done = io_wait_done;
	io->opaque = &w;
	op(img, io);
	return io_wait(img->store->loop, &w);
}
