/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Mapped formats (qcow2, VHDX): the contract between a format driver and
 * the engine that runs it (format.c).
 *
 * A driver is plain synchronous code.  It never sees the event loop, the
 * guest's requests or their buffers' lifetimes; it answers one question,
 * "where does this guest range live?" (map), does whatever metadata work
 * that takes, and makes its metadata durable on flush.  The engine turns
 * the answer into asynchronous I/O on the image's store.
 *
 * Threads.  The engine gives each image a worker thread with a private
 * loop and a second handle on the same file (the "metadata store").  All
 * driver calls with `nowait` false run on that thread (or, during open
 * and create, on the opening thread, and at close, on the closing thread
 * once the worker has stopped), one at a time, and may block in
 * the bm_fmt_* I/O helpers below.  Guest data I/O runs on the image's
 * own loop through the data store; the driver never touches it.  So the
 * loop thread never waits for the worker, and the worker waits only for
 * its private loop (and, for bm_fmt_backing_read, for the image's loop,
 * which never waits for it).
 *
 * A driver that sets flush_apart gets a third thread, the flusher, with
 * its own loop and handle on the file: flush, set_backing and the
 * driver's own calls (bm_image_driver_call) of a writable image run
 * there, one at a time, while map goes on on the worker.  The bm_fmt_*
 * helpers work on either thread (each uses its own handle; a sync on
 * one makes the other's completed writes durable too, being an
 * fdatasync of the same file).  Such a driver serializes
 * flush against map itself, and must not make the worker wait for a
 * flush while the flush waits for data (bm_fmt_wait_mark).
 *
 * The fast path.  The engine first calls map with `nowait` true on the
 * loop thread, holding the driver's lock with trylock: if the answer is
 * in the driver's caches and needs no allocation or I/O, the request never
 * leaves the loop.  Otherwise map returns -EAGAIN and the request goes to
 * the worker.  The driver must not change anything in nowait mode.
 *
 * Ordering the engine guarantees, so the driver need not:
 * - A request sent to the worker holds its guest range, rounded out to
 *   `cluster_size`, busy from before it is mapped until its data I/O has
 *   completed; no other request touching that range is mapped meanwhile.
 *   So a freshly allocated cluster is never read or written by anybody
 *   else before its data (and COW fill) are in place.
 * - flush is called only once every request issued before it has
 *   completed, data included.  Later requests may have been mapped by
 *   then, their data still on its way: a driver that is about to write
 *   a table pointing at clusters it handed out as BM_SEG_DATA calls
 *   bm_fmt_wait_data first (and then bm_fmt_sync), which is what "data
 *   before L2" needs, at flush and when it evicts a table alike.
 * - Clusters the driver frees (discard, zero with BM_IO_MAY_TRIM, COW of
 *   a shared cluster) must not be handed out again before the reference
 *   removal is durable (a flush): keep them pending until the end of the
 *   next flush.  Requests mapped before the free have completed by then.
 *
 * Everything read from the file is untrusted: check offsets, sizes and
 * counts before use, and report what is wrong with bm_error naming the
 * image (bm_fmt_name) and the field.
 */
#ifndef BM_FORMAT_H
#define BM_FORMAT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <blockmirror/blockmirror.h>

#include "image.h"
#include "store.h"

struct bm_fmt;

enum bm_map_op {
	BM_MAP_READ,
	BM_MAP_WRITE,
	BM_MAP_ZERO,    /* flags: BM_IO_MAY_TRIM, BM_IO_FAST_ZERO */
	BM_MAP_DISCARD,
	BM_MAP_STATUS,  /* block status: no change, classify only */
};

enum bm_seg_kind {
	/* The guest bytes live in the file at `host`.  READ: the engine
	 * reads them; WRITE: the engine writes the caller's data there (the
	 * cluster is allocated and, if partly written, already filled);
	 * ZERO: the engine writes zeroes there; STATUS: allocated data. */
	BM_SEG_DATA,
	/* Reads as zeroes and is allocated or marked so (a zero cluster, a
	 * ZERO block state).  STATUS: zero extent. */
	BM_SEG_ZERO,
	/* Reads as zeroes, this layer holds nothing and there is no backing
	 * image (or the range is past its end).  STATUS: hole. */
	BM_SEG_HOLE,
	/* This layer holds nothing: the backing image supplies the bytes at
	 * the same guest offset (zeroes past its end).  STATUS: whatever the
	 * backing image reports. */
	BM_SEG_BACKING,
	/* The driver has done all of it: READ filled r->buf (compressed
	 * clusters); ZERO/DISCARD changed the metadata. */
	BM_SEG_DONE,
};

struct bm_seg {
	uint64_t length;
	uint64_t host;          /* BM_SEG_DATA: offset in the file */
	enum bm_seg_kind kind;
};

#define BM_MAP_MAX_SEGS 32

struct bm_map_req {
	enum bm_map_op op;
	bool nowait;            /* on the loop: no I/O, no change, or -EAGAIN */
	unsigned flags;         /* BM_IO_* of the request */
	uint64_t offset;        /* guest range still to map */
	uint64_t length;
	/* READ: where the guest range starts in the caller's buffer (for
	 * BM_SEG_DONE).  WRITE: the data (read-only for the driver).  NULL
	 * for the other operations. */
	void *buf;
	/* Out: segments covering a prefix [offset, offset + sum of lengths)
	 * of the range, at least one, in order.  The engine calls again
	 * for the rest. */
	struct bm_seg seg[BM_MAP_MAX_SEGS];
	unsigned nseg;
};

/*
 * Append a segment to r, merging it into the last one when they continue
 * each other (same kind; for DATA, contiguous in the file unless r is a
 * STATUS request).  false when r is full: map then returns what it has.
 */
bool bm_map_add(struct bm_map_req *r, enum bm_seg_kind kind, uint64_t len,
		uint64_t host);

/* What the driver tells the engine at open (fill in open/create). */
struct bm_fmt_info {
	uint64_t virtual_size;
	uint32_t cluster_size;   /* allocation unit (qcow2 cluster, VHDX block) */
	uint32_t align;          /* guest request alignment, 1 or the sector */
	bool readonly;           /* the driver refuses writes (e.g. v2 qcow2) */
	char *backing_name;      /* malloc'd, as stored in the image, or NULL */
	enum blockmirror_format backing_format; /* AUTO if not recorded */
	uint64_t allocated;      /* bytes of guest data allocated, for info */
	/* The guest-visible identity to keep across copies (VHDX Page 83
	 * data); has_identity false if the format has none. */
	bool has_identity;
	uint8_t identity[16];
};

struct bm_fmt_driver {
	const char *name;
	enum blockmirror_format format;
	/*
	 * Parse an existing image and set up the driver; `flags` are
	 * BM_IMAGE_*.  A writable open may write (log replay, dirty bits,
	 * new GUIDs).  Fill *info; return the driver's state in *drv.
	 */
	int (*open)(struct bm_fmt *f, unsigned flags, struct bm_fmt_info *info,
		    void **drv);
	/*
	 * Write a new empty image of `size` guest bytes into the (empty)
	 * file, honouring `options` (see bm_fmt_option*), and make it
	 * durable.  The engine then opens it with open.
	 */
	int (*create)(struct bm_fmt *f, uint64_t size, const char *options);
	/* See struct bm_map_req.  0, -EAGAIN (nowait only) or -errno. */
	int (*map)(void *drv, struct bm_map_req *r);
	/* Make every metadata change so far durable, in crash-safe order. */
	int (*flush)(void *drv);
	/* flush and set_backing run on the flusher thread, concurrently
	 * with map (see Threads above). */
	bool flush_apart;
	/* Bytes of guest data currently allocated (for info), may be 0. */
	uint64_t (*allocated)(void *drv);
	/* Free the driver.  The engine has flushed first (if writable). */
	void (*close)(void *drv);
	/*
	 * Optional: record `name` (and `format`, AUTO: leave the recorded
	 * format alone) as the backing file, durably and crash-safely: after
	 * a crash at any point the image opens and names either the old or
	 * the new backing file.  The engine has flushed first.
	 */
	int (*set_backing)(void *drv, const char *name,
			   enum blockmirror_format format);
};

extern const struct bm_fmt_driver bm_qcow2_driver;
extern const struct bm_fmt_driver bm_vhdx_driver;

/* ---- services for drivers (the driver's thread only) ------------------ */

/* The image's name, for messages. */
const char *bm_fmt_name(const struct bm_fmt *f);

/* Was the image opened for writing? */
bool bm_fmt_writable(const struct bm_fmt *f);

/* The file's current size in bytes (tracked across writes that grow it). */
uint64_t bm_fmt_file_size(const struct bm_fmt *f);

/*
 * Synchronous I/O on the file through the metadata store.  Writes may
 * extend the file.  Reading past the end of the file is an error except
 * for bm_fmt_pread_zero, which returns zeroes there.  0 or -errno with
 * the error set.
 */
int bm_fmt_pread(struct bm_fmt *f, void *buf, size_t len, uint64_t off);
int bm_fmt_pread_zero(struct bm_fmt *f, void *buf, size_t len, uint64_t off);
int bm_fmt_pwrite(struct bm_fmt *f, const void *buf, size_t len,
		  uint64_t off);
/* Make [off, off+len) read as zeroes (may punch a hole). */
int bm_fmt_zero_file(struct bm_fmt *f, uint64_t off, uint64_t len);
/* Set the file's size (grow with zeroes, or shrink). */
int bm_fmt_truncate(struct bm_fmt *f, uint64_t size);
/*
 * Wait until the data I/O of every chunk mapped so far has finished: the
 * chunks the worker mapped (the engine's writes into clusters the driver
 * handed out) and those mapped on the loop in nowait mode (which hold no
 * busy range, so a discard may free their cluster meanwhile).  Worker
 * thread only (the chunk the worker is mapping is left out).  The wait
 * is short as long as the driver calls this under the lock its nowait
 * map takes with trylock: no new chunk is mapped on either side while it
 * waits.  Always 0.
 */
int bm_fmt_wait_data(struct bm_fmt *f);

/*
 * The same in two halves, for a flush apart (flusher thread): take a
 * mark under the lock that map takes (every chunk mapped so far, and any
 * the worker is about to map, is behind it), drop the lock, then wait
 * for the mark without it.  Chunks mapped after the mark are not waited
 * for.  Every mark must be waited for before the next one is taken.
 */
unsigned bm_fmt_data_mark(struct bm_fmt *f);
void bm_fmt_wait_mark(struct bm_fmt *f, unsigned mark);

/* fdatasync: every completed write to the file, data and metadata
 * store alike, is durable afterwards. */
int bm_fmt_sync(struct bm_fmt *f);

/*
 * Read the backing image's guest view of [off, off+len) (zeroes past its
 * end, zeroes if there is no backing image).  For COW fills.
 */
int bm_fmt_backing_read(struct bm_fmt *f, void *buf, size_t len,
			uint64_t off);

/* Is there a backing image? */
bool bm_fmt_has_backing(const struct bm_fmt *f);

/*
 * Create options: a comma-separated key=value list.  bm_fmt_options_check
 * fails naming the first key not in `known` (NULL-terminated).
 * bm_fmt_option copies the value of `key` into val (NUL-terminated) and
 * returns 1, 0 if absent, -EINVAL if the value does not fit.
 * bm_fmt_option_size parses a size with an optional K/M/G/T suffix
 * (powers of 1024) or returns -EINVAL naming the key.
 */
int bm_fmt_options_check(const struct bm_fmt *f, const char *options,
			 const char *const *known);
int bm_fmt_option(const char *options, const char *key, char *val,
		  size_t size);
int bm_fmt_option_size(const struct bm_fmt *f, const char *options,
		       const char *key, uint64_t *out);

/* ---- the engine's side (image.c) ------------------------------------- */

/*
 * Open a mapped-format image over `store` (taking it), with the path for
 * the metadata store and for resolving relative backing names.
 */
int bm_fmt_open(const struct bm_fmt_driver *drv, struct bm_store *store,
		const char *path, unsigned flags, struct bm_image **out);

/* Create into the empty file behind `store`, then open. */
int bm_fmt_create(const struct bm_fmt_driver *drv, struct bm_store *store,
		  const char *path, uint64_t size, const char *options,
		  unsigned flags, struct bm_image **out);

/* Is `img` a mapped-format image run by driver `drv`? */
bool bm_image_has_driver(const struct bm_image *img,
			 const struct bm_fmt_driver *drv);

/*
 * Run fn(driver state, arg) on the driver's thread (the flusher, or the
 * worker), ordered like a flush: after every earlier request, after a
 * flush of the image's metadata, before every later request.  io (its
 * done, opaque) completes on the image's loop with fn's result.  For a
 * driver's own entry points that change metadata outside map (qcow2's
 * persistent bitmaps).  -ENOTSUP if img is not run by drv, -EROFS if it
 * is read-only.
 */
void bm_image_driver_call(struct bm_image *img,
			  const struct bm_fmt_driver *drv,
			  int (*fn)(void *drv, void *arg), void *arg,
			  struct bm_io *io);

#endif /* BM_FORMAT_H */
