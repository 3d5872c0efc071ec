/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Stores: the byte containers under an image.  A local file or block
 * device (file.c, io_uring) and, later, an NBD export (libnbd).  A store
 * knows nothing of formats; an image driver (image.h) maps guest offsets
 * onto it.
 *
 * Requests are asynchronous and always complete through io->done on the
 * loop thread, never inside the call that started them.  The caller owns
 * the bm_io and the buffer until done runs.  A request the store cannot
 * accept (out of bounds, read-only store) completes with an error the same
 * way.  Short reads and writes are finished inside the store: done sees
 * either the whole length or an error.
 */
#ifndef BM_STORE_H
#define BM_STORE_H

#include <stdbool.h>
#include <stdint.h>

#include "extent.h"
#include "loop.h"

struct bm_store;
struct bm_io;

enum {
	BM_IO_FUA = 1u << 0,     /* write: durable before done */
	BM_IO_MAY_TRIM = 1u << 1, /* zero: may deallocate (punch a hole) */
	BM_IO_FAST_ZERO = 1u << 2, /* zero: fail with -ENOTSUP rather than write zeroes */
	BM_IO_WRITEBACK = 1u << 3, /* write: bulk copy: start writing it back */
	BM_IO_EVICT = 1u << 4,     /* with WRITEBACK: wait for it to be
				      written back and drop it from the
				      page cache before done */
	BM_IO_ASYNC = 1u << 5,     /* read/write: a file store hands it to
				      the kernel's workers instead of
				      copying cached data on the loop
				      thread (a move's bulk copy: the
				      guest's requests share that thread) */
};

struct bm_io {
	struct bm_op op;           /* the store's; do not touch */
	struct bm_store *store;    /* the store's: set when submitted */
	void (*done)(struct bm_io *io, int err);
	void *opaque;              /* the caller's */
	uint64_t offset;
	uint64_t length;
	void *buf;                 /* read, write */
	unsigned flags;            /* BM_IO_* */
	struct bm_extent_list *extents; /* extents: filled for the range */
	uint64_t progress;         /* the store's: bytes done so far */
	int stage;                 /* the store's: fallback step */
};

struct bm_store_ops {
	const char *name;
	void (*read)(struct bm_store *s, struct bm_io *io);
	void (*write)(struct bm_store *s, struct bm_io *io);
	void (*zero)(struct bm_store *s, struct bm_io *io);
	void (*discard)(struct bm_store *s, struct bm_io *io);
	void (*flush)(struct bm_store *s, struct bm_io *io);
	/* Append extents covering [offset, offset + length) to io->extents. */
	void (*extents)(struct bm_store *s, struct bm_io *io);
	/* Optional: finish every request in flight as soon as possible,
	 * with -ECANCELED if it has not completed (a hung destination). */
	void (*cancel)(struct bm_store *s);
	/* Optional, synchronous: set the size of a growable store. */
	int (*truncate)(struct bm_store *s, uint64_t size);
	void (*close)(struct bm_store *s);
};

struct bm_store {
	const struct bm_store_ops *ops;
	struct bm_loop *loop;
	char *name;            /* for messages */
	uint64_t size;
	uint32_t align;        /* required offset/length/buffer alignment, >= 1 */
	uint32_t preferred;    /* preferred request size, 0 unknown */
	uint32_t copy_size;    /* bulk copy request size that suits the
				  store best, 0: no preference */
	bool readonly;
	bool block_device;
	/* A file under a mapped format: requests may reach past `size`
	 * (writes extend the file, reads past its end return zeroes). */
	bool growable;
	uint64_t allocated;    /* bytes the storage holds, UINT64_MAX unknown */
};

/* Flags for opening a file store. */
enum {
	BM_OPEN_WRITE = 1u << 0,
	BM_OPEN_DIRECT = 1u << 1,   /* O_DIRECT where possible */
	BM_OPEN_CREATE = 1u << 2,   /* create; fail if it exists */
	BM_OPEN_TRUNCATE = 1u << 3, /* create or empty an existing file */
	BM_OPEN_NOFOLLOW = 1u << 4, /* no symbolic link anywhere in the
				       path: -ELOOP (openat2 where the
				       kernel has it, else the last part) */
	/* NBD only: for a bulk copy, up to 4 connections to a server that
	 * advertises multi-conn (nbd.h); BM_IMAGE_MULTI_CONN asks for it
	 * through bm_image_open and bm_image_create.  File stores ignore
	 * it. */
	BM_OPEN_MULTI_CONN = 1u << 5,
	/* File stores: O_DIRECT for bulk copy writes (BM_IO_WRITEBACK)
	 * only; every other request goes through the page cache.  A move's
	 * destination: the copy streams to the disk without filling the
	 * cache, the guest's mirrored writes stay cached as on the
	 * source. */
	BM_OPEN_DIRECT_BULK = 1u << 6,
};

/*
 * Open a local file or block device.  With BM_OPEN_CREATE or
 * BM_OPEN_TRUNCATE, `size` is the new file's size and the file reads as
 * zeroes afterwards.  Errors name the path: -ENOENT, -EACCES, -EISDIR,
 * -EINVAL (not a regular file or block device), -EEXIST.
 */
int bm_file_open(struct bm_loop *loop, const char *path, unsigned flags,
		 uint64_t size, struct bm_store **out);

/* Does the file at `path` hold the same inode as the store? */
bool bm_file_same(struct bm_store *s, const char *path);
/* For tests: how many fdatasyncs a file store has issued (0 for others). */
uint64_t bm_file_datasyncs(struct bm_store *s);
/* For tests: does the file store have its O_DIRECT descriptor? */
bool bm_file_direct(struct bm_store *s);

static inline void
bm_store_close(struct bm_store *s)
{
	if (s)
		s->ops->close(s);
}

/* Run one request to completion on the store's loop (tools, tests). */
int bm_store_sync(struct bm_store *s,
		  void (*op)(struct bm_store *, struct bm_io *),
		  struct bm_io *io);

#endif /* BM_STORE_H */
