/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The raw driver: guest offset = store offset.  Every request goes
 * straight to the store with the caller's bm_io, so the store's
 * completion is the caller's completion and raw adds nothing to the I/O
 * path.  Block status is the store's extent map.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "errors.h"
#include "image.h"

static void
raw_read(struct bm_image *img, struct bm_io *io)
{
	img->store->ops->read(img->store, io);
}

static void
raw_write(struct bm_image *img, struct bm_io *io)
{
	img->store->ops->write(img->store, io);
}

static void
raw_zero(struct bm_image *img, struct bm_io *io)
{
	img->store->ops->zero(img->store, io);
}

static void
raw_discard(struct bm_image *img, struct bm_io *io)
{
	img->store->ops->discard(img->store, io);
}

static void
raw_flush(struct bm_image *img, struct bm_io *io)
{
	img->store->ops->flush(img->store, io);
}

static void
raw_block_status(struct bm_image *img, struct bm_io *io)
{
	img->store->ops->extents(img->store, io);
}

static void
raw_close(struct bm_image *img)
{
	bm_store_close(img->store);
	free(img->name);
	free(img);
}

static const struct bm_image_ops raw_ops = {
	.read = raw_read,
	.write = raw_write,
	.zero = raw_zero,
	.discard = raw_discard,
	.flush = raw_flush,
	.block_status = raw_block_status,
	.close = raw_close,
};

int
bm_raw_open(struct bm_store *store, unsigned flags, struct bm_image **out)
{
	struct bm_image *img = calloc(1, sizeof *img);

	if (!img || !(img->name = strdup(store->name))) {
		free(img);
		return bm_error(-ENOMEM, "%s: out of memory", store->name);
	}
	img->ops = &raw_ops;
	img->store = store;
	img->format = BLOCKMIRROR_FORMAT_RAW;
	img->size = store->size;
	img->align = store->align;
	img->readonly = store->readonly;
	*out = img;
	return 0;
}
