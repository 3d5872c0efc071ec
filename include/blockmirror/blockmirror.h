/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * libblockmirror: move a running VM's disk to new storage.
 *
 * Conventions that hold for every call below:
 *
 *  - A call returning int gives 0 (or a documented non-negative value) on
 *    success and a negative errno on failure.  A call returning a pointer
 *    gives NULL and sets errno on failure.
 *  - After a failure, blockmirror_last_error() returns a message for the
 *    calling thread that starts with the name of the function that failed.
 *  - The library never prints, never exits and never aborts on bad input;
 *    diagnostics go to the log callback (blockmirror_set_log).
 *  - Option and result structures start with a `size` field that the caller
 *    sets to sizeof the structure it was compiled with, so that fields can
 *    be added at the end without breaking the ABI.
 *  - Image names are paths to regular files or block devices, or NBD
 *    URIs: nbd://HOST[:PORT]/EXPORT, nbds://... (TLS), nbd+unix:///EXPORT?
 *    socket=PATH, nbds+unix://...  An NBD export holds guest data as it
 *    is (the server handles any format), so it is always raw.
 *  - A returned `const char *` is borrowed; a returned `char *` is the
 *    caller's to free().
 */
#ifndef BLOCKMIRROR_H
#define BLOCKMIRROR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <blockmirror/version.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- Version, errors, logging ---------------------------------------- */

/* The library's version as "MAJOR.MINOR.MICRO".  Never fails. */
extern const char *blockmirror_version(void);

/*
 * The message of the last failed blockmirror call in this thread, or NULL
 * if none failed.  Valid until the next blockmirror call in this thread.
 */
extern const char *blockmirror_last_error(void);

/* The errno of the last failed blockmirror call in this thread (positive). */
extern int blockmirror_last_errno(void);

enum blockmirror_log_level {
	BLOCKMIRROR_LOG_ERROR = 0,
	BLOCKMIRROR_LOG_WARNING = 1,
	BLOCKMIRROR_LOG_INFO = 2,
	BLOCKMIRROR_LOG_DEBUG = 3,
};

typedef void (*blockmirror_log_fn)(void *user_data,
				   enum blockmirror_log_level level,
				   const char *message);

/*
 * Send the library's diagnostics to fn (NULL: drop them).  Messages up to
 * `max_level` are delivered; the environment variable BLOCKMIRROR_DEBUG=1
 * raises it to BLOCKMIRROR_LOG_DEBUG.  Process-wide; may be called from any
 * thread; fn may be called from any thread the library runs on and must
 * not call back into the library.
 */
extern void blockmirror_set_log(blockmirror_log_fn fn, void *user_data,
				enum blockmirror_log_level max_level);

/* ---- Formats --------------------------------------------------------- */

enum blockmirror_format {
	BLOCKMIRROR_FORMAT_AUTO = 0, /* probe the image */
	BLOCKMIRROR_FORMAT_RAW = 1,
	BLOCKMIRROR_FORMAT_QCOW2 = 2,
	BLOCKMIRROR_FORMAT_VHDX = 3,
};

/* "auto", "raw", "qcow2", "vhdx"; NULL for an unknown value. */
extern const char *blockmirror_format_name(enum blockmirror_format format);

/* The format called `name`, or -EINVAL. */
extern int blockmirror_format_from_name(const char *name);

/*
 * Is `name` opened as an NBD URI (it starts with nbd:, nbds:, nbd+unix:
 * or nbds+unix:, case-sensitively) rather than as a path?  The rule every
 * call taking an image name applies; a caller that checks names before
 * handing them over should classify them with it.  Pure; NULL: false.
 */
extern bool blockmirror_nbd_is_uri(const char *name);

/*
 * Probing: with BLOCKMIRROR_FORMAT_AUTO the first sector decides.  An image
 * that starts with a qcow2 or VHDX signature is opened as that format (or
 * refused if the format is not supported), never as raw: only naming
 * BLOCKMIRROR_FORMAT_RAW explicitly treats such a file as raw data.
 */

/* ---- Images ---------------------------------------------------------- */

struct blockmirror_image_info {
	size_t size;                    /* sizeof (struct blockmirror_image_info) */
	enum blockmirror_format format; /* the format the image opened as */
	uint64_t virtual_size;          /* guest-visible bytes */
	uint64_t allocated_bytes;       /* bytes the storage holds (st_blocks) */
	uint32_t cluster_size;          /* allocation unit of the format, 0 for raw */
	bool block_device;              /* the image is a block device */
	/* Since 0.2 (filled when `size` covers them): */
	uint64_t data_bytes;            /* guest bytes the format maps (qcow2,
					 * VHDX); for raw, allocated_bytes */
	char backing_file[1024];        /* as recorded in the image, or "" */
	char backing_path[1024];        /* as opened (relative names resolved
					 * against the image's directory) */
	enum blockmirror_format backing_format; /* AUTO if no backing file */
	bool has_identity;              /* VHDX: the Page 83 identity */
	uint8_t identity[16];
};

/*
 * Open `name` read-only and describe it.  Blocks.  Thread-safe.
 * Errors: -ENOENT, -EACCES, -EISDIR, -EINVAL (not a file or block device,
 * or a signature that contradicts `format`), -ENOTSUP (format not
 * supported).
 */
extern int blockmirror_image_info(const char *name,
				  enum blockmirror_format format,
				  struct blockmirror_image_info *info);

/*
 * Create a new image of `virtual_size` bytes.  `options` is a
 * comma-separated key=value list or NULL; raw accepts none.  An existing
 * file is refused with -EEXIST unless `overwrite` is true.  The new image
 * reads as zeroes and is fsynced (with its directory) before returning.
 * For an NBD URI nothing is created: the export must exist and have
 * exactly `virtual_size` bytes (-EINVAL otherwise).
 */
extern int blockmirror_image_create(const char *name,
				    enum blockmirror_format format,
				    uint64_t virtual_size, const char *options,
				    bool overwrite);

/* ---- Offline copy ---------------------------------------------------- */

/*
 * Progress: called on the copying thread (the caller's for
 * blockmirror_copy, the copy's own for blockmirror_copy_start), at most
 * about 20 times a second and once at the end with done == total.  Must
 * not block.
 */
typedef void (*blockmirror_progress_fn)(void *user_data, uint64_t done,
					uint64_t total);

/*
 * The page cache: by default a file destination is written with O_DIRECT
 * (requests that are not page-aligned, such as qcow2 table entries or the
 * tail of an odd-sized file, go through the cache) and the source is read
 * through the page cache, as qemu-img's -t none -T writeback.  Where the
 * file system refuses O_DIRECT the destination goes through the cache.
 * Through the cache, each bulk write is written back and dropped from the
 * cache before the next takes its buffer, so a copy never fills the cache
 * with the image.
 */
enum {
	/* Replace an existing destination file. */
	BLOCKMIRROR_COPY_OVERWRITE = 1u << 0,
	/* O_DIRECT on both sides (BLOCKMIRROR_COPY_SRC_DIRECT too). */
	BLOCKMIRROR_COPY_DIRECT = 1u << 1,
	/* Write every byte: no holes, no zero detection. */
	BLOCKMIRROR_COPY_ALLOCATE = 1u << 2,
	/* Since 0.3: read the source with O_DIRECT. */
	BLOCKMIRROR_COPY_SRC_DIRECT = 1u << 3,
	/* Since 0.3: write the destination through the page cache rather
	 * than with O_DIRECT.  Not with BLOCKMIRROR_COPY_DIRECT. */
	BLOCKMIRROR_COPY_DST_CACHED = 1u << 4,
};

struct blockmirror_copy_options {
	size_t size;                        /* sizeof (struct blockmirror_copy_options) */
	enum blockmirror_format src_format; /* AUTO: probe */
	enum blockmirror_format dst_format; /* AUTO: same as the source */
	unsigned flags;                     /* BLOCKMIRROR_COPY_* */
	uint32_t request_size;              /* bytes per request, 0: 1 MiB */
	uint32_t requests;                  /* requests in flight, 0: 16 */
	blockmirror_progress_fn progress;   /* NULL: none */
	void *progress_data;
	/* Since 0.2: create options for the destination (see
	 * blockmirror_image_create), or NULL.  A VHDX copy of a VHDX
	 * source keeps the source's Page 83 identity unless these name
	 * one. */
	const char *dst_options;
	/* Since 0.2: data bytes/s the copy may read and write, 0: no limit
	 * (see blockmirror_copy_set_speed). */
	uint64_t speed;
};

enum blockmirror_copy_state {
	BLOCKMIRROR_COPY_RUNNING = 1,   /* copying, or flushing at the end */
	BLOCKMIRROR_COPY_PAUSED = 2,    /* blockmirror_copy_pause */
	BLOCKMIRROR_COPY_DONE = 3,      /* the destination is complete and
					   durable */
	BLOCKMIRROR_COPY_FAILED = 4,    /* a destination file it created is
					   gone again */
	BLOCKMIRROR_COPY_CANCELLED = 5, /* likewise */
};

struct blockmirror_copy_stats {
	size_t size;               /* sizeof (struct blockmirror_copy_stats) */
	uint64_t virtual_size;     /* guest bytes covered (the total) */
	uint64_t bytes_read;       /* read from the source */
	uint64_t bytes_written;    /* data written to the destination */
	uint64_t bytes_zeroed;     /* left as holes or zeroed without data */
	uint64_t elapsed_us;       /* wall time, the final flush included */
	/* Since 0.2 (filled when `size` covers them): */
	uint64_t bytes_done;       /* guest bytes on the destination so far */
	enum blockmirror_copy_state state;
	uint64_t speed;            /* the limit in force, bytes/s; 0: none */
	int error;                 /* FAILED, CANCELLED: the errno (positive) */
};

/*
 * Copy the guest-visible content of `src` to a new image `dst`.  Holes
 * stay holes and runs of zeroes found in data become holes (unless
 * BLOCKMIRROR_COPY_ALLOCATE).  The destination is flushed to stable
 * storage before the call returns 0.  On failure a destination file this
 * call created is removed again.  An NBD URI destination is written in
 * place and must have the source's size.  Blocks; runs its own event loop
 * on the calling thread.  `stats` may be NULL.
 *
 * Errors: those of blockmirror_image_info for the source, -EEXIST (the
 * destination exists), -EINVAL (src and dst are the same file, bad
 * options), -ENOSPC, -EIO and other I/O errors.
 */
extern int blockmirror_copy(const char *src, const char *dst,
			    const struct blockmirror_copy_options *options,
			    struct blockmirror_copy_stats *stats);

/*
 * The same copy on a thread of its own, with a handle to watch and steer
 * it from other threads: what a program copying several images at once
 * (bmirror rebalance) uses.  The copy runs its own event loop on a
 * library thread, which blocks every signal; the progress callback runs
 * on that thread.
 *
 *   RUNNING <-> PAUSED;  RUNNING or PAUSED -> DONE, FAILED or CANCELLED
 *
 * Every call below may be made from any thread, except from the copy's
 * own thread (the progress callback), where the blocking ones fail with
 * -EDEADLK.  A call that steers the copy waits only until the copy's
 * loop has carried it out (never for a request in flight), except
 * cancel, which waits for the end.
 */
struct blockmirror_copy;

/*
 * Check and open what blockmirror_copy would (the source opened, the
 * destination created), then start copying and return.  Every error
 * found before the copy starts is returned here, as blockmirror_copy
 * would return it (-EEXIST, -EINVAL, the source's open errors...), and
 * leaves nothing behind.  On success *copy is a new handle, to be freed
 * with blockmirror_copy_free.  `options` is only read during the call
 * (its progress callback and data are kept).
 */
extern int blockmirror_copy_start(const char *src, const char *dst,
				  const struct blockmirror_copy_options *options,
				  struct blockmirror_copy **copy);

/*
 * Snapshot of the copy: the counters of blockmirror_copy_stats so far,
 * the state, the speed limit, the error once it has failed.  After the
 * end it gives the final numbers.  `stats->size` must cover elapsed_us.
 */
extern int blockmirror_copy_query(struct blockmirror_copy *copy,
				  struct blockmirror_copy_stats *stats);

/*
 * Limit the copy's data to bytes_per_second (0: no limit), from now on.
 * The copy holds requests back, paced by a timer on its loop; it never
 * sleeps.  -EINVAL once the copy has ended.
 */
extern int blockmirror_copy_set_speed(struct blockmirror_copy *copy,
				      uint64_t bytes_per_second);

/*
 * Pause: no new request is issued (those in flight finish).  -EINVAL if
 * paused already or ended, -EBUSY while the copy flushes at its end.
 * Resume: continue.  -EINVAL if not paused.
 */
extern int blockmirror_copy_pause(struct blockmirror_copy *copy);
extern int blockmirror_copy_resume(struct blockmirror_copy *copy);

/*
 * Cancel the copy (also a paused one) and wait until it has ended:
 * requests in flight finish, or are cancelled after a second on a
 * destination that hangs (an NBD export), and a destination file the
 * copy created is removed, even if the copy had nothing left to do but
 * its final flush.  The copy's result is then -ECANCELED.  0 once it
 * has ended; -EINVAL if it had ended before the cancel reached it.
 */
extern int blockmirror_copy_cancel(struct blockmirror_copy *copy);

/*
 * Wait at most timeout_ms (-1: no limit; 0: just look) for the copy to
 * end.  The copy's result: 0 (DONE) or its negative errno (-ECANCELED
 * when cancelled), with the copy's message in blockmirror_last_error();
 * or -ETIMEDOUT if it still runs.
 */
extern int blockmirror_copy_wait(struct blockmirror_copy *copy,
				 int timeout_ms);

/*
 * A file descriptor (an eventfd) that becomes readable (POLLIN) when the
 * copy has ended, so that one poll(2) can wait for many copies.  It
 * stays readable until the caller reads it.  Borrowed: the handle owns
 * it and blockmirror_copy_free closes it.  Never fails.
 */
extern int blockmirror_copy_event_fd(struct blockmirror_copy *copy);

/*
 * Cancel the copy if it still runs (as blockmirror_copy_cancel), wait
 * for its thread and free the handle.  Accepts NULL.  Not from the
 * copy's own thread.
 */
extern void blockmirror_copy_free(struct blockmirror_copy *copy);

/* "running", "paused", "done", "failed", "cancelled"; NULL if unknown. */
extern const char *
blockmirror_copy_state_name(enum blockmirror_copy_state state);

/* ---- Verify ---------------------------------------------------------- */

struct blockmirror_verify_result {
	size_t size;                 /* sizeof (struct blockmirror_verify_result) */
	bool identical;              /* same size and same guest data */
	bool size_differs;           /* the virtual sizes differ */
	uint64_t first_difference;   /* first differing byte, if !identical */
	uint64_t bytes_compared;
	uint8_t digest_a[16];        /* XXH3-128 over the chunk digests of A */
	uint8_t digest_b[16];        /*   (canonical byte order) */
};

/*
 * Compare the guest-visible data of two images chunk by chunk with
 * XXH3-128.  Returns 0 whether or not they differ (see result->identical);
 * a negative errno only when an image cannot be opened or read.  `progress`
 * may be NULL.  Blocks.
 */
extern int blockmirror_verify(const char *a, enum blockmirror_format format_a,
			      const char *b, enum blockmirror_format format_b,
			      blockmirror_progress_fn progress,
			      void *progress_data,
			      struct blockmirror_verify_result *result);

/* ---- The disk: the VM-facing device --------------------------------- */

/*
 * A blockmirror_disk is what the VM's block device talks to.  It owns one
 * event loop; guest requests, the mirror job and any NBD server
 * connections of the disk run on it.  The image under the disk (the
 * "active image") is the source until a job pivots, and the destination
 * afterwards; guests never notice the swap.
 *
 * Threads: every blockmirror_disk_* and blockmirror_job_* call may be made
 * from any thread.  Calls made off the loop thread are handed to the loop.
 * Someone must run the loop: either the library, on a thread of its own
 * (blockmirror_disk_start_thread), or the caller, by polling
 * blockmirror_disk_get_fd() for POLLIN and calling
 * blockmirror_disk_process().  Blocking calls wait for the loop; made
 * from the loop thread itself (inside a callback) they fail with
 * -EDEADLK.  Callbacks run on the loop thread and must not block.
 */
struct blockmirror_disk;

enum {
	BLOCKMIRROR_DISK_READONLY = 1u << 0, /* refuse guest writes */
	BLOCKMIRROR_DISK_DIRECT = 1u << 1,   /* O_DIRECT */
};

/*
 * Open `name` as a disk.  Does not start a thread.  Returns NULL and sets
 * errno (and the last error) on failure.  Free with blockmirror_disk_close.
 */
extern struct blockmirror_disk *
blockmirror_disk_open(const char *name, enum blockmirror_format format,
		      unsigned flags);

/*
 * Close the disk: cancel a running job (forced), wait for guest requests
 * in flight, flush the active image, stop the library's thread if there
 * is one, free everything.  Accepts NULL.  Must not be called from the
 * loop thread.  Returns 0 or the flush error.
 */
extern int blockmirror_disk_close(struct blockmirror_disk *disk);

/* Run the disk's loop on a new library thread.  0, -EBUSY if running. */
extern int blockmirror_disk_start_thread(struct blockmirror_disk *disk);

/* The fd to poll (POLLIN) when the caller runs the loop. */
extern int blockmirror_disk_get_fd(struct blockmirror_disk *disk);

/*
 * Run whatever is ready on the loop without blocking.  Returns the number
 * of callbacks run or a negative errno.  Only one thread at a time may
 * run the loop; -EBUSY if the library's thread runs it.
 */
extern int blockmirror_disk_process(struct blockmirror_disk *disk);

/* Guest-visible size in bytes. */
extern uint64_t blockmirror_disk_get_size(struct blockmirror_disk *disk);

/* The active image's name; the caller frees it.  NULL + errno on failure. */
extern char *blockmirror_disk_get_image(struct blockmirror_disk *disk);

/* Completion of an asynchronous guest request: err is 0 or -errno. */
typedef void (*blockmirror_done_fn)(void *user_data, int err);

enum {
	BLOCKMIRROR_REQ_FUA = 1u << 0,     /* write/zero: durable when done */
	BLOCKMIRROR_REQ_MAY_TRIM = 1u << 1, /* zero: may deallocate */
};

/*
 * Asynchronous guest requests.  Returns 0 when the request was accepted,
 * in which case `done` is called exactly once, on the loop thread; or a
 * negative errno (-EINVAL out of range or bad flags, -EROFS, -ENOMEM,
 * -ESHUTDOWN while closing), in which case `done` is never called.  The
 * buffer belongs to the library until done: it must stay valid and, for
 * writes, unchanged.
 */
extern int blockmirror_disk_aio_read(struct blockmirror_disk *disk,
				     void *buf, size_t len, uint64_t offset,
				     blockmirror_done_fn done, void *user_data);
extern int blockmirror_disk_aio_write(struct blockmirror_disk *disk,
				      const void *buf, size_t len,
				      uint64_t offset, unsigned flags,
				      blockmirror_done_fn done,
				      void *user_data);
extern int blockmirror_disk_aio_write_zeroes(struct blockmirror_disk *disk,
					     uint64_t len, uint64_t offset,
					     unsigned flags,
					     blockmirror_done_fn done,
					     void *user_data);
extern int blockmirror_disk_aio_discard(struct blockmirror_disk *disk,
					uint64_t len, uint64_t offset,
					blockmirror_done_fn done,
					void *user_data);
extern int blockmirror_disk_aio_flush(struct blockmirror_disk *disk,
				      blockmirror_done_fn done,
				      void *user_data);

/* Blocking forms of the above: 0 or a negative errno. */
extern int blockmirror_disk_read(struct blockmirror_disk *disk, void *buf,
				 size_t len, uint64_t offset);
extern int blockmirror_disk_write(struct blockmirror_disk *disk,
				  const void *buf, size_t len,
				  uint64_t offset, unsigned flags);
extern int blockmirror_disk_write_zeroes(struct blockmirror_disk *disk,
					 uint64_t len, uint64_t offset,
					 unsigned flags);
extern int blockmirror_disk_discard(struct blockmirror_disk *disk,
				    uint64_t len, uint64_t offset);
extern int blockmirror_disk_flush(struct blockmirror_disk *disk);

/* ---- The mirror job -------------------------------------------------- */

/*
 * A job moves the disk to a destination image while the guest runs.  See
 * docs/mirror.md for the rules; in short: a bulk copy driven by a dirty
 * bitmap, guest writes mirrored (active mode) or tracked (background
 * mode), READY once the destination matches, and the pivot
 * (blockmirror_job_complete) that switches the disk atomically.
 *
 *   CREATED -> MAPPING -> COPYING <-> READY -> PIVOTING -> COMPLETED
 *                            |          |
 *                          PAUSED     (cancel) -> CANCELLED / COMPLETED
 *                            any state -> FAILED
 */
enum blockmirror_job_state {
	BLOCKMIRROR_JOB_MAPPING = 1,   /* reading the source's allocation */
	BLOCKMIRROR_JOB_COPYING = 2,   /* bulk copy, not yet converged */
	BLOCKMIRROR_JOB_READY = 3,     /* destination matches; may pivot */
	BLOCKMIRROR_JOB_PAUSED = 4,    /* by request or by the stop policy */
	BLOCKMIRROR_JOB_PIVOTING = 5,
	BLOCKMIRROR_JOB_COMPLETED = 6, /* pivoted, or cancelled after READY */
	BLOCKMIRROR_JOB_CANCELLED = 7,
	BLOCKMIRROR_JOB_FAILED = 8,
};

enum blockmirror_mode {
	BLOCKMIRROR_MODE_BACKGROUND = 0, /* guest writes mark chunks dirty */
	BLOCKMIRROR_MODE_ACTIVE = 1,     /* guest writes reach both images */
	BLOCKMIRROR_MODE_AUTO = 2,       /* background until it stops converging */
};

/* What a move copies of a disk with a backing chain (docs/chains.md). */
enum blockmirror_sync {
	BLOCKMIRROR_SYNC_FULL = 0, /* the whole guest view: flatten the chain */
	BLOCKMIRROR_SYNC_TOP = 1,  /* only what the top image allocates; the
				      destination has the same backing chain */
	BLOCKMIRROR_SYNC_NONE = 2, /* only new guest writes; the caller has
				      put the rest on the destination */
};

enum blockmirror_error_policy {
	BLOCKMIRROR_ON_ERROR_REPORT = 0, /* the job fails */
	BLOCKMIRROR_ON_ERROR_STOP = 1,   /* the job pauses until resumed */
	BLOCKMIRROR_ON_ERROR_RETRY = 2,  /* keep the chunk dirty, retry later */
};

enum blockmirror_event_type {
	BLOCKMIRROR_EVENT_READY = 1,
	BLOCKMIRROR_EVENT_COMPLETED = 2,
	BLOCKMIRROR_EVENT_CANCELLED = 3,
	BLOCKMIRROR_EVENT_FAILED = 4,
	BLOCKMIRROR_EVENT_ERROR = 5,       /* an I/O error the policy handled */
	BLOCKMIRROR_EVENT_MODE_CHANGED = 6, /* auto mode switched to active */
	BLOCKMIRROR_EVENT_PAUSED = 7,
	BLOCKMIRROR_EVENT_RESUMED = 8,
	/* A snapshot's (blockmirror_snapshot_options.on_event): it broke,
	 * the guest went on; err and message say why. */
	BLOCKMIRROR_EVENT_SNAPSHOT_BROKEN = 9,
};

struct blockmirror_event {
	enum blockmirror_event_type type;
	int err;               /* ERROR, FAILED: the errno (positive) */
	uint64_t offset;       /* ERROR: the range that failed */
	uint64_t length;
	bool on_source;        /* ERROR: the source failed (else the destination) */
	bool pivoted;          /* COMPLETED: the disk now runs on the destination */
	enum blockmirror_mode mode; /* MODE_CHANGED: the new mode */
	const char *message;   /* ERROR, FAILED: borrowed, valid during the call */
};

typedef void (*blockmirror_event_fn)(void *user_data,
				     const struct blockmirror_event *event);

/*
 * Called during the pivot, with guest I/O stopped and the destination
 * flushed, to make the switch durable in the caller's own configuration.
 * Return 0 to go ahead; a negative errno leaves the disk on the source
 * (the pivot fails and the job stays READY).  Runs on the loop thread.
 */
typedef int (*blockmirror_pivot_fn)(void *user_data, const char *destination);

enum {
	/* Create the destination (it must not exist), same size as the disk. */
	BLOCKMIRROR_JOB_CREATE = 1u << 0,
	/* Resume the move recorded in state_dir (docs/state.md): copy only
	 * what the state marks dirty.  -ESTALE if the state is missing,
	 * invalid or records another move; nothing is written then. */
	BLOCKMIRROR_JOB_RESUME = 1u << 1,
	/* The destination's name was checked by the caller with no symbolic
	 * link in it (a resolved path inside an allowed directory): open it
	 * so that none is followed anywhere in the path, -ELOOP otherwise,
	 * so the name cannot be swapped for a link after the check. */
	BLOCKMIRROR_JOB_NOFOLLOW = 1u << 2,
};

struct blockmirror_job_options {
	size_t size;                   /* sizeof (struct blockmirror_job_options) */
	enum blockmirror_format format; /* destination format; AUTO: probe, or
					   the source's when creating */
	unsigned flags;                /* BLOCKMIRROR_JOB_* */
	enum blockmirror_mode mode;
	uint64_t granularity;          /* chunk size, power of 2, 4 KiB..64 MiB;
					  0: the destination's cluster size
					  within 64 KiB..256 KiB */
	uint32_t buf_size;             /* bytes per copy request, 0: 1 MiB */
	uint32_t requests;             /* copy requests in flight, 0: 16 */
	uint64_t speed;                /* bulk copy bytes/s, 0: unlimited */
	enum blockmirror_error_policy on_error;
	uint64_t max_stall_us;         /* pivot: give up if the final copy
					  would stall the guest longer; 0: no limit */
	const char *link;              /* pivot: re-point this symlink */
	blockmirror_pivot_fn on_pivot; /* pivot: or call this */
	void *pivot_data;
	blockmirror_event_fn on_event; /* may be NULL */
	void *event_data;
	/* Appended fields: a caller's smaller size leaves them zero. */
	enum blockmirror_sync sync;    /* FULL unless set; with CREATE and
					  TOP the new destination gets the
					  source's backing file */
	const char *state_dir;         /* keep crash-resumable state in this
					  directory (docs/state.md); NULL: none */
	/* A pivot or a cancel after READY that has not finished after this
	 * many milliseconds (its destination hangs) becomes a forced
	 * cancel: the destination is abandoned, the disk stays on the
	 * source, the waiting call returns -ETIMEDOUT.  0: wait for ever
	 * (a forced cancel still ends it). */
	uint64_t end_timeout_ms;
};

struct blockmirror_job_info {
	size_t size;                   /* sizeof (struct blockmirror_job_info) */
	enum blockmirror_job_state state;
	enum blockmirror_mode mode;    /* the mode in force (AUTO resolves) */
	bool auto_mode;                /* started in AUTO */
	bool ready;                    /* has been READY and may pivot */
	bool actively_synced;          /* active mode, ready, no dest error since */
	bool paused;
	uint64_t bytes_total;          /* the disk's size */
	uint64_t bytes_done;           /* total - remaining */
	uint64_t bytes_remaining;      /* dirty + being copied */
	uint64_t dirty_bytes;
	uint64_t bytes_copied;         /* data written by the bulk copy */
	uint64_t bytes_mirrored;       /* guest data written to the destination */
	uint64_t speed;
	uint64_t pivot_stall_us;       /* of the last pivot, 0 if none */
	uint64_t granularity;
	int error;                     /* FAILED: the errno (positive) */
};

struct blockmirror_job;

/*
 * Start moving the disk to `destination`.  The destination must have the
 * disk's size (-EINVAL otherwise, before anything is written) and must not
 * be the disk's own image.  One job per disk at a time (-EBUSY).  Returns
 * NULL and sets errno on failure.  The job runs on the disk's loop; free
 * it with blockmirror_job_free once it has ended.
 */
extern struct blockmirror_job *
blockmirror_job_start(struct blockmirror_disk *disk, const char *destination,
		      const struct blockmirror_job_options *options);

/* Snapshot of the job's progress.  Blocking; 0 or -errno. */
extern int blockmirror_job_query(struct blockmirror_job *job,
				 struct blockmirror_job_info *info);

/*
 * Pivot: switch the disk to the destination.  Blocks until the switch is
 * durable (0) or has failed (the disk stays on the source).  -EBUSY before
 * READY; -ETIMEDOUT if max_stall_us would be exceeded (the job stays
 * READY); -EINVAL in a state that cannot pivot.
 */
extern int blockmirror_job_complete(struct blockmirror_job *job);

/*
 * Cancel.  Before READY, or with force: stop, leave the destination as it
 * is (CANCELLED).  After READY without force: make the destination a
 * consistent point-in-time copy, flush it, and stay on the source
 * (COMPLETED without pivot; FAILED with the error if the flush fails).
 * With force it also ends a pivot in progress (the blocked complete returns
 * -ECANCELED) or a cancel still flushing, even on a destination that hangs:
 * requests in flight there are cancelled after a second.  Blocks until the
 * job has ended.  -EBUSY without force while the job is pivoting.
 */
extern int blockmirror_job_cancel(struct blockmirror_job *job, bool force);

/* Stop and restart the bulk copy.  Blocking. */
extern int blockmirror_job_pause(struct blockmirror_job *job);
extern int blockmirror_job_resume(struct blockmirror_job *job);

/* Bulk copy rate limit in bytes/s, 0: unlimited.  Blocking. */
extern int blockmirror_job_set_speed(struct blockmirror_job *job,
				     uint64_t bytes_per_second);

/* Switch between active and background (either way).  Blocking. */
extern int blockmirror_job_set_mode(struct blockmirror_job *job,
				    enum blockmirror_mode mode);

/*
 * Wait until the job reaches `state` or ends, at most timeout_ms (-1: no
 * limit).  Returns the state reached, or -ETIMEDOUT.
 */
extern int blockmirror_job_wait(struct blockmirror_job *job,
				enum blockmirror_job_state state,
				int timeout_ms);

/*
 * Free an ended job (cancelling it with force first if it still runs).
 * Accepts NULL.  Must not be called from the loop thread.
 */
extern void blockmirror_job_free(struct blockmirror_job *job);

/* "copying", "ready", ... */
extern const char *blockmirror_job_state_name(enum blockmirror_job_state s);
extern const char *blockmirror_mode_name(enum blockmirror_mode mode);

/* ---- Snapshots: a point-in-time view of a running disk (docs/snapshot.md) */

/*
 * A snapshot freezes what the disk holds at one instant while the guest
 * keeps writing: before a guest write, write-zeroes or discard changes a
 * block the snapshot still needs, the old data goes to a scratch image
 * (copy-before-write).  The snapshot reads the frozen view.  It survives
 * a move of the disk (it stands above the move) and its pivot.
 *
 * A snapshot never fails the guest: if the scratch image fails, fills up
 * (max_scratch), or a guest write would wait longer than timeout_ms for
 * its old data to be saved, the snapshot breaks (BLOCKMIRROR_SNAPSHOT_BROKEN,
 * its reads fail with -EIO naming why) and the guest goes on.
 */
struct blockmirror_snapshot;

enum {
	/* Create `scratch` (a new raw file or qcow2 by its format; it must
	 * not exist) and remove it when the snapshot is released. */
	BLOCKMIRROR_SNAPSHOT_CREATE = 1u << 0,
	/* Open or create `scratch` with no symbolic link followed anywhere
	 * in its path (-ELOOP otherwise), as BLOCKMIRROR_JOB_NOFOLLOW: for a
	 * name the caller checked inside an allowed directory. */
	BLOCKMIRROR_SNAPSHOT_NOFOLLOW = 1u << 1,
	/* With `since` (one disk; -EINVAL otherwise): hold only what
	 * changed since that checkpoint.  Old data is saved before a guest
	 * write only in the chunks (of `granularity`) that hold a change
	 * the record marks; a read or block status of the view that
	 * touches any other chunk fails with -ENODATA.  For a caller that
	 * reads only the changes (a replication cycle, an incremental
	 * backup): the guest pays for no other copies. */
	BLOCKMIRROR_SNAPSHOT_CHANGED_ONLY = 1u << 2,
};

struct blockmirror_snapshot_options {
	size_t size;                  /* sizeof (struct ...), for growth */
	/* Where overwritten data goes: a path or an NBD URI, at least the
	 * disk's size.  NULL: a new unnamed file in scratch_dir, gone when
	 * the snapshot is released or the process dies. */
	const char *scratch;
	const char *scratch_dir;      /* NULL: $TMPDIR, else /var/tmp */
	enum blockmirror_format scratch_format; /* AUTO: probe (or raw) */
	unsigned flags;               /* BLOCKMIRROR_SNAPSHOT_* */
	uint64_t granularity;         /* copy-before-write unit, a power of
					 two, 4 KiB..1 MiB; 0: 64 KiB */
	uint32_t timeout_ms;          /* 0: 1000 */
	uint64_t max_scratch;         /* bytes of old data; 0: no limit */
	/* With change tracking on (blockmirror_disk_track), at the instant:
	 * note what changed since checkpoint `since` (for an incremental
	 * backup: blockmirror_snapshot_changed), then create checkpoint
	 * `checkpoint`.  Either may be NULL.  One disk only. */
	const char *since;
	const char *checkpoint;
	/* Appended (an older size leaves them NULL): called once, on the
	 * disk's loop thread, when the snapshot breaks, with
	 * BLOCKMIRROR_EVENT_SNAPSHOT_BROKEN (err, message).  It must not
	 * block nor call the library's blocking functions: a program wakes
	 * its own thread from it. */
	blockmirror_event_fn on_event;
	void *event_data;
};

enum blockmirror_snapshot_state {
	BLOCKMIRROR_SNAPSHOT_ACTIVE = 1,
	BLOCKMIRROR_SNAPSHOT_BROKEN,
	BLOCKMIRROR_SNAPSHOT_DETACHED, /* the disk was closed under it */
};

struct blockmirror_snapshot_info {
	enum blockmirror_snapshot_state state;
	uint64_t size;                /* the disk's */
	uint64_t granularity;
	int64_t taken_unix_ns;        /* the instant, CLOCK_REALTIME */
	uint64_t bytes_saved;         /* old data held in the scratch */
	uint64_t cbw_count;           /* copy-before-writes done */
	uint64_t cbw_max_us;          /* the longest a guest write waited */
	int error;                    /* BROKEN: the errno (positive) */
	char reason[256];             /* BROKEN: why, for people */
};

/*
 * Take a snapshot of each of `n` disks at one instant (a consistency
 * group: one VM's disks, so that a database and its log on two disks are
 * seen at the same point): every disk stops admitting guest requests,
 * waits for those in flight, and only when all are still does any of
 * them go on.  A write acknowledged before the call is in every
 * snapshot; a write started after it returns is in none.  out[i] is the
 * snapshot of disks[i].  0 or -errno (then none is taken).  Another
 * snapshot or checkpoint operation under way on a disk is waited for, not
 * refused.  A group waits at most 10 s for its disks to drain, since
 * those stopped already stall their guests: then -ETIMEDOUT, naming the
 * disk that did not drain, and every disk goes on.
 */
extern int blockmirror_snapshot_take(struct blockmirror_disk **disks,
				     size_t n,
				     const struct blockmirror_snapshot_options *options,
				     struct blockmirror_snapshot **out);

/*
 * A snapshot in two phases, for a consistency group whose disks are in
 * several processes (bmirror serve: docs/control.md).  Phase 1,
 * blockmirror_snapshot_hold: the scratch is made, then the disk stops
 * admitting guest requests (they queue) and waits for those in flight;
 * it stays stopped under a lease of `lease_ms` counted from the call:
 * when the lease runs out the disk goes on by itself, whatever the
 * holder does, and the hold can no longer be taken.  A disk that does
 * not drain within the lease fails the call (-ETIMEDOUT naming it), and
 * goes on.  Phase 2, blockmirror_snapshot_hold_take: the snapshot is
 * taken at the held instant (every write acknowledged before the hold is
 * in it, none that queued is) and the disk goes on; -ETIMEDOUT if the
 * lease ran out first.  The caller holds every disk of the group before
 * it takes any.  Options as blockmirror_snapshot_take with one disk
 * (since and checkpoint included; the strings are copied).  While held,
 * the disk's other snapshot and checkpoint operations wait.  Free every
 * hold of a disk before closing it.  Blocking; not from the loop thread.
 * 0 or -errno.
 */
struct blockmirror_snapshot_hold;

struct blockmirror_snapshot_hold_info {
	size_t size;                  /* sizeof (struct ...), for growth */
	bool held;                    /* the disk is stopped for the hold */
	bool expired;                 /* the lease ran out: it went on */
	uint64_t held_us;             /* how long guest requests were held
					 (so far, if held) */
	uint64_t queued_us;           /* the longest a guest request waited
					 in the queue (0: none came) */
};

extern int blockmirror_snapshot_hold(struct blockmirror_disk *disk,
				     const struct blockmirror_snapshot_options *options,
				     uint32_t lease_ms,
				     struct blockmirror_snapshot_hold **out);
/* *out: the snapshot, the caller's (blockmirror_snapshot_release). */
extern int blockmirror_snapshot_hold_take(struct blockmirror_snapshot_hold *hold,
					  struct blockmirror_snapshot **out);
extern int blockmirror_snapshot_hold_query(struct blockmirror_snapshot_hold *hold,
					   struct blockmirror_snapshot_hold_info *info);
/* Let the disk go if still held, and free the hold (not a snapshot it
 * gave).  Accepts NULL.  Blocking. */
extern void blockmirror_snapshot_hold_free(struct blockmirror_snapshot_hold *hold);

/* Read the frozen view (aio: done runs on the disk's loop thread):
 * -EIO once the snapshot broke, -ENODATA for chunks it does not hold
 * (CHANGED_ONLY, blockmirror_snapshot_drop). */
extern int blockmirror_snapshot_aio_read(struct blockmirror_snapshot *snap,
					 void *buf, size_t count,
					 uint64_t offset,
					 blockmirror_done_fn done,
					 void *user_data);
extern int blockmirror_snapshot_read(struct blockmirror_snapshot *snap,
				     void *buf, size_t count,
				     uint64_t offset);

/* State and counters.  Blocking; 0 or -errno. */
extern int blockmirror_snapshot_query(struct blockmirror_snapshot *snap,
				      struct blockmirror_snapshot_info *info);

/*
 * Let the snapshot go: guest writes stop saving old data, the scratch
 * space is freed (a scratch the library created is removed), and the
 * handle is freed.  Accepts NULL.  Blocking; not from the loop thread.
 * Waits for another snapshot or checkpoint operation on the disk to end
 * first.  -ESHUTDOWN (the handle kept) while the disk is closing: the
 * close detaches the snapshot; release it once the close returned.
 */
extern int blockmirror_snapshot_release(struct blockmirror_snapshot *snap);

/*
 * The caller will not read [offset, offset + length) again: the chunks
 * wholly inside it (and the last, partial chunk of the disk if the range
 * reaches the end) stop costing a copy before the guest's next write to
 * them, and reading any of them fails with -ENODATA from now on; a copy
 * already under way ends without saving.  Any snapshot.  For a caller
 * that reads the snapshot once, in pieces (QEMU's fleecing discards what
 * its backup has read, to the same end).  Blocking.  -EINVAL past the
 * end, -ESHUTDOWN if the disk was closed, -EDEADLK on the disk's loop.
 */
extern int blockmirror_snapshot_drop(struct blockmirror_snapshot *snap,
				     uint64_t offset, uint64_t length);

/*
 * What changed between checkpoint `since` and the snapshot's instant
 * (options.since): a bitmap of `granularity`-byte blocks (bit b of
 * words[b / 64]: block b changed), malloc'd, and the bytes it covers.
 * -ENOENT if the snapshot was taken without `since`.
 */
extern int blockmirror_snapshot_changed(struct blockmirror_snapshot *snap,
					uint64_t *granularity, uint64_t **words,
					uint64_t *nbits, uint64_t *bytes);

/* ---- Changed-block tracking: checkpoints (docs/cbt.md) ---------------- */

/*
 * Record every guest write of the disk from now on, at `granularity`
 * (0: the record's, or 64 KiB).  Where: in the sidecar file `sidecar`
 * (created if missing); with sidecar NULL, in the image itself as
 * persistent dirty bitmaps when the disk's image is a writable qcow2
 * version 3 image with clusters of 4 KiB or more, else in the image path
 * plus ".bmirror-cbt".  Each write is marked on disk before it reaches
 * the image, so the record survives a crash or a power loss.  Writes in
 * flight complete first.  Blocking; -EBUSY if already tracking; -ESTALE
 * if the disk has served a write since it was opened and the record
 * holds checkpoints (they would miss it: start tracking before the first
 * write), or if the granularity differs from the record's; -ENOTSUP for
 * a qcow2 image whose bitmaps cannot be checkpoints (the message says
 * why).  *crashed (may be NULL) says the previous tracker did not close
 * a sidecar (never set for a record in the image: see docs/cbt.md).
 */
extern int blockmirror_disk_track(struct blockmirror_disk *disk,
				  const char *sidecar, uint32_t granularity,
				  bool *crashed);

/*
 * Where the disk's change record lives: *path (malloc'd, the caller's)
 * is the sidecar's path or the image's name, *in_image says the
 * checkpoints are the image's persistent bitmaps.  -EINVAL if the disk
 * does not track changes.  Blocking.
 */
extern int blockmirror_disk_track_record(struct blockmirror_disk *disk,
					 char **path, bool *in_image);

struct blockmirror_checkpoint {
	char name[65];
	uint64_t id;
	int64_t created;              /* unix seconds */
	uint64_t changed_bytes;       /* written since, up to the next one */
	bool trusted;
	char reason[160];             /* !trusted: why */
};

/* Create, remove (merging its record into the previous one's) and list
 * checkpoints.  Blocking.  The list is malloc'd, oldest first. */
extern int blockmirror_checkpoint_create(struct blockmirror_disk *disk,
					 const char *name);
extern int blockmirror_checkpoint_remove(struct blockmirror_disk *disk,
					 const char *name);
extern int blockmirror_checkpoint_list(struct blockmirror_disk *disk,
				       struct blockmirror_checkpoint **list,
				       size_t *n);

/* ---- Backups of a running disk (docs/backup.md) ------------------------ */

/*
 * The steps of a backup, a verify, a restore and a prune, in the order
 * they happen (docs/backup.md lists each with its fields).  A backup
 * sends STARTED first and exactly one of COMPLETED, FAILED or CANCELLED
 * last (none when its arguments or options are refused outright).
 */
enum blockmirror_backup_event_type {
	BLOCKMIRROR_BACKUP_STARTED = 1,
	BLOCKMIRROR_BACKUP_LEFTOVERS_CLEANED = 2, /* of a backup that died */
	BLOCKMIRROR_BACKUP_FREEZE_BEGUN = 3,
	BLOCKMIRROR_BACKUP_FROZEN = 4,
	BLOCKMIRROR_BACKUP_FREEZE_FAILED = 5,   /* the point: crash-consistent */
	BLOCKMIRROR_BACKUP_SNAPSHOT_TAKEN = 6,  /* the instant */
	BLOCKMIRROR_BACKUP_THAWED = 7,
	BLOCKMIRROR_BACKUP_CHECKPOINT_CREATED = 8,
	BLOCKMIRROR_BACKUP_PROGRESS = 9,
	BLOCKMIRROR_BACKUP_DATA_FLUSHED = 10,   /* the target holds the data */
	BLOCKMIRROR_BACKUP_DIGESTS_WRITTEN = 11,
	BLOCKMIRROR_BACKUP_POINT_COMMITTED = 12, /* the manifest is durable */
	BLOCKMIRROR_BACKUP_CHECKPOINT_REMOVED = 13,
	BLOCKMIRROR_BACKUP_COMPLETED = 14,
	BLOCKMIRROR_BACKUP_FAILED = 15,
	BLOCKMIRROR_BACKUP_CANCELLED = 16,
	BLOCKMIRROR_BACKUP_POINT_VERIFIED = 17, /* verify */
	BLOCKMIRROR_BACKUP_POINT_SUPERSEDED = 18, /* verify: not readable */
	BLOCKMIRROR_BACKUP_LIVE_VERIFIED = 19,  /* verify with the live disk */
	BLOCKMIRROR_BACKUP_POINT_RESTORED = 20, /* restore */
	BLOCKMIRROR_BACKUP_POINT_MERGED = 21,   /* prune: made full */
	BLOCKMIRROR_BACKUP_POINT_REMOVED = 22,  /* prune */
};

struct blockmirror_backup_event {
	enum blockmirror_backup_event_type type;
	unsigned point;        /* the point it is about */
	bool incremental;      /* STARTED, COMPLETED */
	bool healing;          /* STARTED, SNAPSHOT_TAKEN, COMPLETED: by
				  digests, without a change record */
	uint64_t done, total;  /* PROGRESS: bytes */
	/* Borrowed, valid during the call, else NULL.  STARTED, DATA_FLUSHED,
	 * POINT_VERIFIED, POINT_RESTORED: the data's file or NBD URI;
	 * CHECKPOINT_CREATED, CHECKPOINT_REMOVED: the checkpoint;
	 * LEFTOVERS_CLEANED: the checkpoint, or NULL for files only. */
	const char *name;
	int err;               /* FAILED, CANCELLED: errno (positive) */
	const char *message;   /* FAILED, CANCELLED: borrowed, valid during
				  the call */
};

typedef void (*blockmirror_backup_event_fn)(
	void *user_data, const struct blockmirror_backup_event *event);

/* The event's name as the command line and the control socket print it
 * ("BACKUP_STARTED", "SNAPSHOT_TAKEN", ...); "UNKNOWN" for others. */
extern const char *blockmirror_backup_event_name(
	enum blockmirror_backup_event_type type);

struct blockmirror_backup_options {
	size_t size;                  /* sizeof (struct ...), for growth */
	const char *dir;              /* the backup's directory of points */
	/* Only what changed since the newest point (needs change tracking,
	 * blockmirror_disk_track, from before that point was taken). */
	bool incremental;
	blockmirror_progress_fn progress; /* may be NULL */
	void *user_data;
	/* Application consistency (our VSS writers): freeze runs right
	 * before the snapshot's instant, thaw right after it (also when the
	 * snapshot fails).  freeze returns 0 when the guest's applications
	 * are quiesced, making the point application-consistent; any other
	 * value (a refusal, a timeout) makes it crash-consistent, and the
	 * backup goes on.  Both may be NULL; they get user_data. */
	int (*freeze)(void *user_data);
	void (*thaw)(void *user_data);
	/* Asked between reads (from the backup's thread): true stops the
	 * backup with -ECANCELED, leaving no point behind.  May be NULL. */
	bool (*cancelled)(void *user_data);
	/* Appended fields: a caller's smaller size leaves them zero. */
	/* Each step, on the backup's thread (the caller's).  May be NULL. */
	blockmirror_backup_event_fn on_event;
	void *event_data;
	/* An NBD export (nbd://, nbds://, nbd+unix:// URI) to write the
	 * point's data into, instead of DIR/NNNN.qcow2: a full point writes
	 * the whole disk there, an incremental one the granules that
	 * changed.  DIR is then the catalogue (manifests, digests).  NULL:
	 * the data goes into DIR. */
	const char *target;
};

struct blockmirror_backup_point {
	unsigned number;              /* 1 for the first (full) point */
	bool incremental;
	int64_t instant;              /* unix seconds of the snapshot */
	/* incremental: what the record said changed (healed: what differed
	 * from the previous point's digests) */
	uint64_t bytes_changed;
	/* incremental without a record to trust (no tracking, a lost or
	 * removed checkpoint): the whole disk was read and compared with
	 * the previous point's digests, and only what differs written */
	bool healed;
	uint64_t bytes_read;          /* from the snapshot */
	uint64_t bytes_written;       /* data (not zeroes) into the point */
	char file[4096];              /* DIR/NNNN.qcow2 */
	char checkpoint[80];          /* created at the instant, or "" */
	bool application_consistent;  /* freeze succeeded */
	/* list: an NBD point whose export has since been written by a newer
	 * point, or partly by one that failed (its data is no longer
	 * readable as the point; file is the URI) */
	bool superseded;
};

/*
 * Take a point: a snapshot of the disk (one instant), read into
 * DIR/NNNN.qcow2 (an incremental point's backing file is the previous
 * point) or into the export `target`, with XXH128 digests of every
 * granule and a manifest, written durably last.  The guest keeps
 * running.  Blocking (the caller's thread; not the disk's loop).  0, or
 * -errno with nothing left behind that a restore could take for a point
 * (a failing export's message names its URI).  Each step goes to
 * on_event.
 */
extern int blockmirror_backup(struct blockmirror_disk *disk,
			      const struct blockmirror_backup_options *options,
			      struct blockmirror_backup_point *point);

struct blockmirror_backup_check {
	unsigned points;              /* points that read as their digests */
	unsigned bad_point;           /* the first damaged one, 0 if none */
	uint64_t bytes_read;
	uint64_t live_bytes_read;     /* with `live` */
	uint64_t live_mismatches;     /* granules */
	uint64_t live_first_mismatch; /* byte offset */
	bool live_first_mismatch_set;
};

/*
 * Reread every point of DIR through its chain and compare it with its
 * digests (-EBADMSG naming the first damaged point and offset).  In an
 * NBD catalogue only the newest point is reread, from its export; the
 * older ones are superseded and only their digests files are checked.  With
 * `live`, also compare the live disk with the newest point where the
 * change record says nothing changed since: a difference there means the
 * record missed a write (-EBADMSG).  Blocking.
 */
extern int blockmirror_backup_verify(const char *dir,
				     struct blockmirror_disk *live,
				     struct blockmirror_backup_check *check);

/* The points of DIR, oldest first (malloc'd; bytes_written: the space
 * each point's image takes, 0 in an export; file: the image or the
 * export's URI).  0 points is not an error. */
extern int blockmirror_backup_list(const char *dir,
				   struct blockmirror_backup_point **points,
				   size_t *count);

/*
 * Restore point `number` of DIR (0: the newest) to a new image `target`
 * of `format` (AUTO: raw), reading it through its chain and checking
 * every granule against the point's digests: a damaged point fails the
 * restore (-EBADMSG, naming the point and offset; the new image is
 * removed) instead of restoring wrong data.  A superseded point of an NBD
 * catalogue: -ESTALE.  Blocking.
 */
extern int blockmirror_backup_restore(const char *dir, unsigned number,
				      const char *target,
				      enum blockmirror_format format,
				      blockmirror_progress_fn progress,
				      void *user_data,
				      uint64_t *bytes_written);

struct blockmirror_backup_prune_result {
	unsigned first;               /* the oldest point left */
	unsigned removed;             /* points removed */
	bool merged;                  /* the oldest kept was made full */
	uint64_t bytes_read;          /* from the backup, never the disk */
};

/*
 * Keep the newest `keep` points of DIR: the oldest of them becomes a full
 * point (a synthetic full: read through its chain, checked against its
 * digests, written standalone and renamed over it), then the older
 * points go.  Reads only the backup.  Crash-safe at every step.
 */
extern int blockmirror_backup_prune(const char *dir, unsigned keep,
				    struct blockmirror_backup_prune_result *r);

/*
 * As blockmirror_backup_verify, _restore and _prune, with each step sent
 * to on_event (may be NULL) on the caller's thread: POINT_VERIFIED or
 * POINT_SUPERSEDED per point and LIVE_VERIFIED; POINT_RESTORED;
 * POINT_MERGED and POINT_REMOVED per point.
 */
extern int blockmirror_backup_verify_with_events(
	const char *dir, struct blockmirror_disk *live,
	struct blockmirror_backup_check *check,
	blockmirror_backup_event_fn on_event, void *event_data);

/*
 * blockmirror_backup_verify with every choice: `live` (may be NULL),
 * and of the granules the change record says did not change since the
 * newest point, check only a random `live_sample_percent` (1 to 99; 0
 * or 100: all of them), so that a large disk can be checked often and
 * cheaply: a record that misses writes shows after a few runs.  Events
 * as blockmirror_backup_verify_with_events.  -EINVAL past 100.
 */
struct blockmirror_backup_verify_options {
	size_t size;                  /* sizeof (struct ...), for growth */
	struct blockmirror_disk *live;
	unsigned live_sample_percent;
	blockmirror_backup_event_fn on_event; /* may be NULL */
	void *event_data;
};

extern int blockmirror_backup_verify_opts(
	const char *dir, const struct blockmirror_backup_verify_options *options,
	struct blockmirror_backup_check *check);
extern int blockmirror_backup_restore_with_events(
	const char *dir, unsigned number, const char *target,
	enum blockmirror_format format, blockmirror_progress_fn progress,
	void *user_data, uint64_t *bytes_written,
	blockmirror_backup_event_fn on_event, void *event_data);
extern int blockmirror_backup_prune_with_events(
	const char *dir, unsigned keep,
	struct blockmirror_backup_prune_result *r,
	blockmirror_backup_event_fn on_event, void *event_data);

/* ---- Continuous replication (docs/replication.md) --------------------- */

/*
 * A disk replicates to a replica (`bmirror replica serve`, on another
 * host): every interval a cycle takes a snapshot of the disk, sends the
 * granules changed since the last point the replica committed (over NBD,
 * TLS with a pre-shared key when the transport is TCP), and asks the
 * replica to commit them as a new recovery point; the replica only ever
 * exposes whole points.  The disk must track changes
 * (blockmirror_disk_track) before replication starts: the checkpoint
 * "repl-N" marks the instant of point N.  The guest never sees an error
 * of replication's: a lost link, a stalled or full replica fail the
 * cycle, the changes stay tracked, and the next cycle sends them.
 */
struct blockmirror_replication;

enum blockmirror_replication_state {
	BLOCKMIRROR_REPLICATION_CONNECTING = 1, /* no answer from the replica yet */
	BLOCKMIRROR_REPLICATION_SYNCING,        /* initial copy or resync */
	BLOCKMIRROR_REPLICATION_IDLE,           /* between cycles */
	BLOCKMIRROR_REPLICATION_SENDING,        /* a cycle */
	BLOCKMIRROR_REPLICATION_FENCED,         /* the replica refused us for
						   good (it was promoted, or
						   another primary owns it) */
	BLOCKMIRROR_REPLICATION_FAILED_OVER,    /* a planned failover made the
						   replica the primary */
	BLOCKMIRROR_REPLICATION_STOPPED,
};

enum blockmirror_replication_event_type {
	BLOCKMIRROR_REPLICATION_EVENT_CONNECTED = 1,
	BLOCKMIRROR_REPLICATION_EVENT_DISCONNECTED = 2,  /* err, message */
	BLOCKMIRROR_REPLICATION_EVENT_POINT_COMMITTED = 3, /* point, bytes, instant */
	BLOCKMIRROR_REPLICATION_EVENT_CYCLE_FAILED = 4,  /* err, message */
	BLOCKMIRROR_REPLICATION_EVENT_RPO_MISSED = 5,    /* rpo_ms past the target */
	BLOCKMIRROR_REPLICATION_EVENT_RPO_MET = 6,       /* back within the target */
	BLOCKMIRROR_REPLICATION_EVENT_RESYNC = 7,        /* a cycle compares digests
						      (bytes: what differed) */
	BLOCKMIRROR_REPLICATION_EVENT_FENCED = 8,  /* err, message */
	BLOCKMIRROR_REPLICATION_EVENT_FAILOVER_DONE = 9, /* point: the replica's */
};

struct blockmirror_replication_event {
	enum blockmirror_replication_event_type type;
	uint64_t point;
	uint64_t bytes;
	int64_t instant_ns;   /* CLOCK_REALTIME of the point's snapshot */
	uint64_t rpo_ms;
	int err;              /* positive errno */
	const char *message;  /* borrowed, valid during the call */
};

typedef void (*blockmirror_replication_event_fn)(
	void *user_data, const struct blockmirror_replication_event *event);

enum {
	/* The replica holds data this disk's replication did not put there
	 * (a seed copy, the old primary after a failover) or lost track of
	 * it: compare XXH3 digests of every granule and send only those
	 * that differ, instead of refusing. */
	BLOCKMIRROR_REPLICATION_RESYNC_OK = 1u << 0,
	/* After a split brain (the replica's disk was written after the
	 * point both sides last shared), overwrite its divergent data. */
	BLOCKMIRROR_REPLICATION_DISCARD_DIVERGENT = 1u << 1,
};

struct blockmirror_replication_options {
	size_t size;                  /* sizeof (struct ...), for growth */
	/* The replica's channel: "tcp:HOST:PORT" (TLS-PSK, required) or
	 * "unix:PATH". */
	const char *replica;
	const char *tls_psk_file;     /* psktool format: "identity:hexkey" */
	const char *tls_identity;     /* NULL: the file's first */
	uint32_t interval_ms;         /* between cycle starts; 0: 5000;
					 at least 1000 */
	uint32_t rpo_target_ms;       /* 0: 2 * interval + 5000 */
	/* This disk's side of the pairing (generation identifiers, the
	 * fencing token, the last committed point), written durably.
	 * NULL: the image's name + ".bmirror-repl". */
	const char *state_file;
	unsigned flags;               /* BLOCKMIRROR_REPLICATION_* */
	/* Each event, on replication's thread; must not block. */
	blockmirror_replication_event_fn on_event;
	void *event_data;
	/* Application-consistent points (as the backup's): freeze before
	 * the instant, thaw right after: for every point (app_every_s 0),
	 * or for one every `app_every_s` seconds at most.  NULL: none. */
	int (*freeze)(void *user_data);
	void (*thaw)(void *user_data);
	void *freeze_data;
	uint32_t app_every_s;
};

struct blockmirror_replication_info {
	size_t size;                  /* sizeof (struct ...), for growth */
	enum blockmirror_replication_state state;
	char generation[37];          /* this disk's */
	uint64_t point;               /* the newest the replica committed, 0:
					 none yet */
	int64_t point_instant_ns;
	uint64_t rpo_ms;              /* now - that point's instant */
	bool rpo_missed;
	uint64_t bytes_behind;        /* written since that point (an upper
					 bound: granules) */
	uint64_t cycles, cycles_failed;
	uint64_t bytes_sent;          /* data over NBD, all cycles */
	uint64_t last_cycle_bytes;
	uint64_t last_cycle_ms;
	double throughput;            /* bytes/s of the last cycle's data */
	int last_error;               /* positive errno, 0: none */
	char message[256];            /* the last error's */
};

/* Start replicating `disk` on a thread of the library's.  -EINVAL (the
 * disk does not track changes, bad options), or the first connection's
 * refusal for good (-EPERM fenced, -EEXIST split brain, -ESTALE a
 * replica of another disk); a replica that cannot be reached is retried,
 * not an error. */
extern int blockmirror_replication_start(
	struct blockmirror_disk *disk,
	const struct blockmirror_replication_options *options,
	struct blockmirror_replication **out);

extern int blockmirror_replication_query(struct blockmirror_replication *r,
					 struct blockmirror_replication_info *info);

/* Run a cycle now and wait (at most timeout_ms; 0: no limit) until a
 * point at least as new as this instant is committed: *point (may be
 * NULL) is its number. */
extern int blockmirror_replication_sync(struct blockmirror_replication *r,
					uint32_t timeout_ms, uint64_t *point);

/*
 * Planned failover: the disk refuses guest writes from now on (-EROFS;
 * the VM is shut down first), a last cycle sends every write
 * acknowledged before, and the replica is promoted at that point: it
 * becomes the primary, with a new generation, and this side is fenced.
 * *point: the point the replica became.  Replication then stops.
 */
extern int blockmirror_replication_failover(struct blockmirror_replication *r,
					    uint32_t timeout_ms,
					    uint64_t *point);

/*
 * Online verify: compare the replica's latest point with the disk by
 * digests (only digests cross the network): a snapshot of the disk now,
 * and every granule the change record says was not written since that
 * point must have the replica's digest.  Those that differ are counted
 * and sent again by the next cycle.  Runs on replication's thread, between
 * cycles; waits at most timeout_ms (0: no limit).
 */
struct blockmirror_replication_check {
	size_t size;                  /* sizeof (struct ...), for growth */
	uint64_t point;               /* the replica's point compared */
	uint64_t granules;            /* compared */
	uint64_t skipped;             /* written since the point: not */
	uint64_t mismatches;          /* marked to send again */
	uint64_t first_mismatch;      /* byte offset, if any */
};

extern int blockmirror_replication_verify(
	struct blockmirror_replication *r, uint32_t timeout_ms,
	struct blockmirror_replication_check *check);

/* Stop replicating (a cycle under way ends at its next deadline; the
 * replica keeps its last point), and make every call waiting on `r` in
 * another thread return; calls made afterwards return at once.  `r`
 * stays valid until blockmirror_replication_stop: a program whose other
 * threads may still be about to call halts first, lets them finish, then
 * stops.  Accepts NULL. */
extern void blockmirror_replication_halt(struct blockmirror_replication *r);

/* Halt if not halted yet, wait for calls in progress to return, and free.
 * No call may start once this one has.  Accepts NULL. */
extern void blockmirror_replication_stop(struct blockmirror_replication *r);

/* "connecting", "syncing", "idle", "sending", "fenced", "failed-over",
 * "stopped"; and the events' names ("POINT_COMMITTED", ...). */
extern const char *blockmirror_replication_state_name(
	enum blockmirror_replication_state s);
extern const char *blockmirror_replication_event_name(
	enum blockmirror_replication_event_type t);

/*
 * The replica's side: a server over a replica directory (its recovery
 * points, docs/replica-store.md).  Primaries connect to `listen`
 * ("tcp:HOST:PORT", TLS-PSK required; or "unix:PATH"); each cycle's data
 * arrives over NBD on a server of its own (TCP, TLS with the same keys,
 * on `nbd_host` and a port chosen per cycle; or a Unix socket in the
 * directory).  The operator's commands (points, exports, test failover,
 * promotion) come over the Unix socket `control` (mode 0600).  The
 * protocol is in docs/replication.md.
 */
struct blockmirror_replica_server;

enum blockmirror_replica_event_type {
	BLOCKMIRROR_REPLICA_PAIRED = 1,          /* message: the primary */
	BLOCKMIRROR_REPLICA_CYCLE_BEGUN = 2,     /* point */
	BLOCKMIRROR_REPLICA_POINT_COMMITTED = 3, /* point, bytes */
	BLOCKMIRROR_REPLICA_CYCLE_ABORTED = 4,   /* point, message */
	BLOCKMIRROR_REPLICA_REFUSED = 5,         /* err, message */
	BLOCKMIRROR_REPLICA_PROMOTED = 6,        /* point, bytes (discarded),
						    message: the disk's image */
};

typedef void (*blockmirror_replica_event_fn)(
	void *user_data, enum blockmirror_replica_event_type type,
	const struct blockmirror_replication_event *event);

struct blockmirror_replica_server_options {
	size_t size;                  /* sizeof (struct ...), for growth */
	const char *dir;
	const char *listen;
	const char *control;          /* NULL: DIR/control.sock */
	const char *nbd_host;         /* NULL: listen's host (TCP) */
	const char *tls_psk_file;
	/* Make DIR a replica first (it must not be one): of a disk of
	 * `disk_size` bytes on a new sparse base, or of `base`, an image
	 * the operator placed (a seed copy, or the old primary's disk after
	 * a failover: its replication state is adopted). */
	bool create;
	uint64_t disk_size;
	const char *base;
	uint32_t granularity;         /* 0: 64 KiB */
	/* Recovery points beyond the latest: `keep`, one per `every_s`
	 * seconds (0 0: the latest only).  Kept in DIR. */
	unsigned keep;
	uint32_t every_s;
	bool set_policy;              /* apply keep/every_s to an existing DIR */
	blockmirror_replica_event_fn on_event; /* any thread; must not block */
	void *event_data;
};

extern int blockmirror_replica_server_start(
	const struct blockmirror_replica_server_options *options,
	struct blockmirror_replica_server **out);
/* The address primaries connect to, as bound ("tcp:127.0.0.1:41234"). */
extern const char *blockmirror_replica_server_address(
	struct blockmirror_replica_server *s);
/* Stop listening, abandon an open cycle (the latest point stays), end
 * every export, close the directory.  Accepts NULL. */
extern void blockmirror_replica_server_stop(struct blockmirror_replica_server *s);

/* ---- Crash-resumable state (docs/state.md) --------------------------- */

struct blockmirror_state_info {
	size_t size;                   /* sizeof (struct blockmirror_state_info) */
	char *source;                  /* the caller's (free); NULL if unknown */
	char *destination;             /* the caller's (free); NULL if unknown */
	enum blockmirror_format format; /* the destination's */
	enum blockmirror_mode mode;
	uint64_t disk_size;
	uint64_t granularity;
	uint64_t region_size;          /* bytes per persisted bit */
	uint64_t regions;
	uint64_t regions_dirty;        /* to copy again on resume */
};

/*
 * Read the state a move left in `dir`.  0: a valid state, *info filled.
 * -ENOENT: none.  -EBADMSG: the state fails its checks (the message says
 * which); source and destination are filled if the move record itself is
 * intact, so the move can start again from a full copy.  Other -errno:
 * could not read it.
 */
extern int blockmirror_state_read(const char *dir,
				  struct blockmirror_state_info *info);

/* Remove the state in `dir`, durably.  0 (also when there was none). */
extern int blockmirror_state_remove(const char *dir);

/* ---- Recovery after a crash (docs/state.md) -------------------------- */

/* What a program serving a disk does with the state a crash left. */
enum blockmirror_recovery_action {
	/* No state: serve `image`; no move to take up. */
	BLOCKMIRROR_RECOVER_NONE = 0,
	/* The switch was not durable: the source is authoritative and
	 * complete.  Serve `image` (the source) and resume the recorded
	 * move, copying only what the state marks dirty. */
	BLOCKMIRROR_RECOVER_RESUME = 1,
	/* As RESUME, but the state's bitmap failed its checks and is not
	 * trusted: the recorded move starts again from a full copy. */
	BLOCKMIRROR_RECOVER_RESTART = 2,
	/* The switch was durable: serve `image` (the destination); the
	 * move is over and its state has been removed. */
	BLOCKMIRROR_RECOVER_SWITCHED = 3,
	/* The state could not be used (its record is unreadable, or it
	 * records a move of another image): it has been removed, nothing
	 * resumes; serve `image`. */
	BLOCKMIRROR_RECOVER_DISCARDED = 4,
};

struct blockmirror_recovery {
	size_t size;                    /* sizeof (struct blockmirror_recovery) */
	enum blockmirror_recovery_action action;
	char *image;                    /* what to serve; the caller's */
	char *state_dir;                /* the state directory looked at, or
					   NULL; the caller's */
	/* RESUME, RESTART: the move to take up (source and destination
	 * are the caller's); SWITCHED, DISCARDED: what was found. */
	struct blockmirror_state_info state;
	char message[512];              /* what was found and done, one line */
};

enum {
	/* Decide, but change nothing (no state is removed). */
	BLOCKMIRROR_RECOVER_KEEP = 1u << 0,
};

/*
 * Decide what to serve after a crash, from the state directory
 * `state_dir` (NULL: LINK.bmirror-state when `link` is given) and the
 * image the caller would serve: the target of the symlink `link`, or
 * `image` when link is NULL.  A state whose destination is what the link
 * names means the switch was durable (SWITCHED); one whose source it
 * names is resumed (RESUME) or, if its bitmap is damaged, restarted
 * (RESTART); anything else is removed (DISCARDED).  Never starts a job:
 * open the disk on out->image and, for RESUME and RESTART, call
 * blockmirror_job_start_recovered.  Free with blockmirror_recovery_free.
 * 0 or a negative errno (the state could not be read or removed).
 * Blocking; any thread.
 */
extern int blockmirror_recover(const char *link, const char *image,
			       const char *state_dir, unsigned flags,
			       struct blockmirror_recovery *out);

extern void blockmirror_recovery_free(struct blockmirror_recovery *r);

/*
 * Take up the move a recovery found (RESUME or RESTART) on `disk`, which
 * must be open on out->image: the destination, format, mode and
 * granularity come from the state, everything else (link or on_pivot,
 * events, speed, error policy) from `options`.  As blockmirror_job_start;
 * -EINVAL for any other action.
 */
extern struct blockmirror_job *
blockmirror_job_start_recovered(struct blockmirror_disk *disk,
				const struct blockmirror_recovery *recovery,
				const struct blockmirror_job_options *options);

/* ---- Publishing files durably ---------------------------------------- */

/*
 * Rename `from` to `to` and sync both directories, so that after a power
 * loss `to` names the file and `from` is gone.  Never replaces: -EEXIST
 * if `to` exists.  The file's own data must have been synced by the
 * caller.  0 or a negative errno, with the step that failed in
 * blockmirror_last_error().  Blocking; any thread.
 */
extern int blockmirror_rename_durable(const char *from, const char *to);

/* Remove `path` and sync its directory; a missing file is no error. */
extern int blockmirror_unlink_durable(const char *path);

/* ---- The NBD server -------------------------------------------------- */

/*
 * An NBD server exporting a disk (what `bmirror serve` runs).  It runs on
 * the disk's loop, so clients read and write through the disk, follow a
 * pivot without reconnecting, and are mirrored by a running job like any
 * other guest.  Fixed newstyle handshake, structured replies,
 * base:allocation block status, several clients at once.
 */
struct blockmirror_server;

/* A NULL options pointer means the defaults below. */
struct blockmirror_server_options {
	size_t size;              /* sizeof (struct blockmirror_server_options) */
	const char *export_name;  /* NULL: "" (the default export) */
	const char *description;  /* NULL: none */
	bool readonly;            /* refuse writes */
	const char *tls_psk_file; /* TCP only: require TLS with these PSKs
				     (the psktool format: "user:hexkey" lines) */
	unsigned max_clients;     /* 0: 16 (clients past the handshake) */
	/* Seconds a client has to finish the handshake (TLS included) and
	 * reach transmission; then it is closed.  0: 10.  Connections still
	 * in the handshake have their own slots (32, at most 4 per client
	 * address, per /64 for IPv6), so they never take a served client's
	 * (docs/nbd-server.md). */
	unsigned handshake_timeout;
};

/*
 * Listen on `address`: "unix:PATH" (a socket file created with mode 0600,
 * replacing a stale one) or "tcp:HOST:PORT" (HOST empty: 127.0.0.1).
 * Returns NULL and sets errno on failure.  Blocking; any thread but the
 * loop's.
 */
extern struct blockmirror_server *
blockmirror_server_start(struct blockmirror_disk *disk, const char *address,
			 const struct blockmirror_server_options *options);

/*
 * Stop listening, let requests in flight finish, close every client.
 * Accepts NULL.  Blocking; any thread but the loop's.  Must be called
 * before blockmirror_disk_close.
 */
extern void blockmirror_server_stop(struct blockmirror_server *server);

/* The address actually bound ("tcp:127.0.0.1:10809"); borrowed. */
extern const char *blockmirror_server_address(struct blockmirror_server *s);

/*
 * Export `snap`, a snapshot of the served disk, read-only as a second
 * export called `export_name` (not empty, at most 4096 bytes, neither
 * the disk's export name nor one already exported; at most 64 of them).
 * Clients that ask for that name read the frozen view and its block
 * status; writes fail with EPERM.  A snapshot taken with options.since
 * also offers the meta context "qemu:dirty-bitmap:SINCE" (flag 1: the
 * granule changed since that checkpoint), copied from
 * blockmirror_snapshot_changed at this call (docs/nbd-server.md).  NBD_OPT_LIST lists every export.  The
 * snapshot stays the caller's: it must outlive the export
 * (blockmirror_server_unexport, or blockmirror_server_stop).  0 or
 * -errno (-EEXIST: the name is taken; -EXDEV: not a snapshot of this
 * server's disk).  Blocking; any thread but the loop's.
 */
extern int blockmirror_server_export_snapshot(struct blockmirror_server *s,
					      const char *export_name,
					      struct blockmirror_snapshot *snap);

/*
 * Remove a snapshot's export: no new client finds it, and its clients
 * are closed gracefully (requests in flight finish and are answered;
 * those that do not read their replies are closed after 2 s).  Returns
 * once no request of the export can reach the snapshot any more, so the
 * caller may then release it.  0 or -errno (-ENOENT: no such export).
 * Blocking; any thread but the loop's.
 */
extern int blockmirror_server_unexport(struct blockmirror_server *s,
				       const char *export_name);

/* ---- Backing chains (docs/chains.md) ----------------------------------- */

/*
 * Make the disk's image (a qcow2 overlay or a differencing VHDX) name
 * `backing` as its backing file, live: the pivot of moving the base
 * image under a running overlay.  `backing` must read exactly as the current backing image
 * (the caller has copied and verified it; this call does not compare
 * them) and have its size.  The name is recorded as given (make it
 * absolute) crash-safely: after a crash at any point the image names
 * the old or the new file.  Guest I/O continues; reads go to the new
 * file afterwards.  -EINVAL if the image has no backing file or the
 * sizes differ, -EBUSY while a job runs, -ENOTSUP for formats that
 * cannot do it.  Blocking; not on the loop thread.
 */
extern int blockmirror_disk_set_backing(struct blockmirror_disk *disk,
					const char *backing,
					enum blockmirror_format format);

/*
 * Backing file names recorded inside images are not trusted (SECURITY.md,
 * docs/chains.md).  Such a name is opened only if it resolves (symbolic
 * links and ".." followed) to a regular file inside the directory of the
 * image the caller named (its tree), or inside a directory allowed here
 * or in BLOCKMIRROR_ALLOW_BACKING_DIRS (colon-separated, read at each
 * open).  Block devices are refused unless their directory is allowed
 * with BLOCKMIRROR_BACKING_DEVICES (or listed in
 * BLOCKMIRROR_ALLOW_BACKING_DEVICES); FIFOs, sockets and character
 * devices always are.  A backing file with no recorded format is opened
 * only if it is qcow2 or VHDX, never as raw.  Refusals are -EPERM, with
 * a message naming the image, the name and the reason.
 *
 * blockmirror_allow_backing_dir adds `dir` to the process-wide list of
 * allowed directories (resolved now: it must exist), for images opened
 * afterwards; NULL empties the list.  flags: 0 or
 * BLOCKMIRROR_BACKING_DEVICES.  -ENOENT, -ENOTDIR, -EINVAL, -ENOMEM.
 * Thread-safe.
 */
enum {
	BLOCKMIRROR_BACKING_DEVICES = 1u << 0, /* block devices in it too */
};

extern int blockmirror_allow_backing_dir(const char *dir, unsigned flags);

#ifdef __cplusplus
}
#endif

#endif /* BLOCKMIRROR_H */
