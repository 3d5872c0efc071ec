/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * A store in memory, and a driver's engine without a file, for fuzz
 * targets and tests: a qcow2 or VHDX driver can then open and map an
 * image held in a buffer with no file, no ring of its own and no worker
 * thread (fuzz/fuzz-image.h).  Nothing in the library uses either.
 */
#ifndef BM_MEMSTORE_H
#define BM_MEMSTORE_H

#include <stddef.h>
#include <stdint.h>

#include "format.h"
#include "loop.h"
#include "store.h"

/*
 * A growable, sparse store of `size` bytes that read as zeroes, on
 * `loop` (which may be shared by any number of memory stores).  Requests
 * complete through io->done on the next turn of the loop, like any
 * store's; reads past the end return zeroes, writes extend it.  A write,
 * zero or truncate that would make the store larger than `max_size`
 * bytes, or hold more than `max_mem` bytes of written 4 KiB pages, fails
 * with -ENOSPC, so a hostile image cannot make its driver eat the
 * machine's memory.  0 or -ENOMEM.
 */
int bm_mem_store_new(struct bm_loop *loop, const char *name, uint64_t size,
		     uint64_t max_size, uint64_t max_mem,
		     struct bm_store **out);

/* Copy buf into a memory store at off, synchronously (filling it before
 * use).  0, -ENOSPC or -ENOMEM. */
int bm_mem_store_fill(struct bm_store *s, const void *buf, size_t len,
		      uint64_t off);

/*
 * Defined in format.c.  The driver-facing half of the engine over
 * `wstore` (consumed, also on error): bm_fmt_pread and the other driver
 * services of format.h run on it synchronously through wstore's loop,
 * from the calling thread.  There is no image, no worker and no backing
 * image (bm_fmt_has_backing is false, bm_fmt_backing_read gives
 * zeroes); the caller calls the driver's open, map, flush and close
 * itself, one at a time, and then bm_fmt_detached_free (which closes
 * wstore but not the driver).  0 or -ENOMEM.
 */
int bm_fmt_detached_new(struct bm_store *wstore, const char *name,
			unsigned flags, struct bm_fmt **out);
void bm_fmt_detached_free(struct bm_fmt *f);

#endif /* BM_MEMSTORE_H */
