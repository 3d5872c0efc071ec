/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Images: a format driver over a store, mapping guest offsets to store
 * offsets.  Requests use the same bm_io as stores and follow the same
 * rules (asynchronous, completion on the loop thread, never inline).
 * Offsets and lengths are guest offsets within [0, size).
 *
 * block_status fills io->extents with what the guest sees: HOLE for
 * ranges no layer allocates, ZERO for ranges that read as zeroes.
 */
#ifndef BM_IMAGE_H
#define BM_IMAGE_H

#include <stdbool.h>
#include <stdint.h>

#include <blockmirror/blockmirror.h>

#include "backing.h"
#include "store.h"

struct bm_image;

struct bm_image_ops {
	void (*read)(struct bm_image *img, struct bm_io *io);
	void (*write)(struct bm_image *img, struct bm_io *io);
	void (*zero)(struct bm_image *img, struct bm_io *io);
	void (*discard)(struct bm_image *img, struct bm_io *io);
	void (*flush)(struct bm_image *img, struct bm_io *io);
	void (*block_status)(struct bm_image *img, struct bm_io *io);
	/* Optional: move the image (and what it holds) to another loop,
	 * while nothing is in flight.  The default moves the store. */
	void (*set_loop)(struct bm_image *img, struct bm_loop *loop);
	void (*close)(struct bm_image *img);
};

struct bm_image {
	const struct bm_image_ops *ops;
	struct bm_store *store;        /* owned */
	enum blockmirror_format format;
	char *name;                    /* for messages */
	uint64_t size;                 /* virtual size */
	uint32_t cluster_size;         /* allocation unit, 0 for raw */
	uint32_t align;                /* request alignment, >= 1 */
	bool readonly;
	bool zero_init;                /* created by us: reads as zeroes */
	bool close_slow;               /* closing may write back: a qcow2
					  or VHDX image written to (tables,
					  sync), a file written to (NFS and
					  FUSE write back at close) */
	struct bm_image *below;        /* a filter's: the image it stands
					  over (NULL: not a filter) */
};

/*
 * For filter images (below set): requests a filter does not change pass
 * to the image it stands over; the filter's owner closes what is under
 * it, so close does nothing.
 */
void bm_filter_pass_read(struct bm_image *img, struct bm_io *io);
void bm_filter_pass_flush(struct bm_image *img, struct bm_io *io);
void bm_filter_pass_block_status(struct bm_image *img, struct bm_io *io);
void bm_filter_no_close(struct bm_image *img);

/* The image under every filter of `img` (img itself if not a filter). */
static inline struct bm_image *
bm_image_base(struct bm_image *img)
{
	while (img->below)
		img = img->below;
	return img;
}

enum {
	BM_IMAGE_WRITE = 1u << 0,
	BM_IMAGE_DIRECT = 1u << 1,
	BM_IMAGE_NOFOLLOW = 1u << 2,   /* no symbolic link in the path */
	BM_IMAGE_MULTI_CONN = 1u << 3, /* a bulk copy: an NBD export may
					  use several connections */
	BM_IMAGE_DIRECT_BULK = 1u << 4, /* BM_OPEN_DIRECT_BULK */
};

/*
 * Open an image.  With BLOCKMIRROR_FORMAT_AUTO the first sector decides
 * (see probe.h); a named format must match what the image holds, except
 * that naming raw accepts anything.  Errors name the image.
 */
int bm_image_open(struct bm_loop *loop, const char *name,
		  enum blockmirror_format format, unsigned flags,
		  struct bm_image **out);

/*
 * Create an image (a new file, or with `overwrite` a replaced one) and
 * open it for writing.  `options`: driver key=value list or NULL.
 */
int bm_image_create(struct bm_loop *loop, const char *name,
		    enum blockmirror_format format, uint64_t size,
		    const char *options, bool overwrite, unsigned flags,
		    struct bm_image **out);

void bm_image_close(struct bm_image *img);

/*
 * The create options for a copy of `src` in `format`: `options` plus
 * what keeps the guest's view of the disk the same (a VHDX copy of a
 * VHDX gets the source's Page 83 identity unless `options` names one).
 * *out is malloc'd or NULL.  0 or -ENOMEM.
 */
int bm_image_create_options(struct bm_image *src,
			    enum blockmirror_format format,
			    const char *options, char **out);

/* Hand an idle image over to another loop (opened on a private one). */
void bm_image_set_loop(struct bm_image *img, struct bm_loop *loop);

/*
 * What a mapped format knows beyond the bm_image fields: the backing
 * file's name as recorded and as opened, its format, and the image's
 * identity (VHDX Page 83 data).  Raw images: none of it (NULLs, zeroes).
 * Fixed at open, except that bm_image_set_backing changes the backing
 * names (on the loop); any thread may ask, and every string handed out
 * lives as long as the image.
 */
struct bm_image_facts {
	const char *backing_name;
	const char *backing_path;
	enum blockmirror_format backing_format;
	bool has_identity;
	uint8_t identity[16];
};

void bm_image_facts(struct bm_image *img, struct bm_image_facts *out);

/* Guest bytes a mapped format allocates (0 for raw).  Idle images only. */
uint64_t bm_image_data_bytes(struct bm_image *img);

/* The backing image, or NULL. */
struct bm_image *bm_image_backing(struct bm_image *img);

/* Run one request to completion on the image's loop (tools, tests). */
int bm_image_sync(struct bm_image *img,
		  void (*op)(struct bm_image *, struct bm_io *),
		  struct bm_io *io);

static inline void
bm_image_read(struct bm_image *img, struct bm_io *io)
{
	img->ops->read(img, io);
}

static inline void
bm_image_write(struct bm_image *img, struct bm_io *io)
{
	img->ops->write(img, io);
}

static inline void
bm_image_zero(struct bm_image *img, struct bm_io *io)
{
	img->ops->zero(img, io);
}

static inline void
bm_image_discard(struct bm_image *img, struct bm_io *io)
{
	img->ops->discard(img, io);
}

static inline void
bm_image_flush(struct bm_image *img, struct bm_io *io)
{
	img->ops->flush(img, io);
}

static inline void
bm_image_block_status(struct bm_image *img, struct bm_io *io)
{
	img->ops->block_status(img, io);
}

/*
 * Block status of the top layer only: like bm_image_block_status, but a
 * range this image leaves to its backing image is reported as one
 * BM_EXTENT_BACKING extent instead of asking the backing image.  Images
 * without a backing chain answer as bm_image_block_status does.
 */
void bm_image_block_status_top(struct bm_image *img, struct bm_io *io);

/*
 * Re-point a mapped-format image at another backing image that reads the
 * same (docs/chains.md): with every earlier request completed, flush the
 * image, have the driver record `name` durably (format.h, set_backing),
 * then read through `backing` from then on.  `backing` must be open on
 * the image's loop and have the old backing image's size; on success the
 * image takes it (consumes), and keeps the old one open until it closes,
 * since reads already mapped may still be reading it.  Completion
 * (io->done) on the loop; -ENOTSUP for raw images and drivers without
 * set_backing, -EINVAL if the image has no backing file, -EROFS if it is
 * read-only.
 */
struct bm_backing_change {
	struct bm_io io;
	const char *name;            /* as to record in the image */
	struct bm_image *backing;
};

void bm_image_set_backing(struct bm_image *img, struct bm_backing_change *bc);

/* The backing file policy (bm_backing_check and the rest): backing.h,
 * included above. */

/* Drivers (one file each). */
int bm_raw_open(struct bm_store *store, unsigned flags, struct bm_image **out);

#endif /* BM_IMAGE_H */
