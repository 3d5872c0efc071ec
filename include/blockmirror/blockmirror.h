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
 *  - Image names are paths to regular files or block devices.
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
 */
extern int blockmirror_image_create(const char *name,
				    enum blockmirror_format format,
				    uint64_t virtual_size, const char *options,
				    bool overwrite);

/* ---- Offline copy ---------------------------------------------------- */

/*
 * Progress: called on the copying thread, at most about 20 times a second
 * and once at the end with done == total.  Must not block.
 */
typedef void (*blockmirror_progress_fn)(void *user_data, uint64_t done,
					uint64_t total);

enum {
	/* Replace an existing destination file. */
	BLOCKMIRROR_COPY_OVERWRITE = 1u << 0,
	/* Open both sides with O_DIRECT where the file system allows it. */
	BLOCKMIRROR_COPY_DIRECT = 1u << 1,
	/* Write every byte: no holes, no zero detection. */
	BLOCKMIRROR_COPY_ALLOCATE = 1u << 2,
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
};

struct blockmirror_copy_stats {
	size_t size;               /* sizeof (struct blockmirror_copy_stats) */
	uint64_t virtual_size;     /* guest bytes covered */
	uint64_t bytes_read;       /* read from the source */
	uint64_t bytes_written;    /* data written to the destination */
	uint64_t bytes_zeroed;     /* left as holes or zeroed without data */
	uint64_t elapsed_us;       /* wall time, the final flush included */
};

/*
 * Copy the guest-visible content of `src` to a new image `dst`.  Holes
 * stay holes and runs of zeroes found in data become holes (unless
 * BLOCKMIRROR_COPY_ALLOCATE).  The destination is flushed to stable
 * storage before the call returns 0.  On failure a destination file this
 * call created is removed again.  Blocks; runs its own event loop on the
 * calling thread.  `stats` may be NULL.
 *
 * Errors: those of blockmirror_image_info for the source, -EEXIST (the
 * destination exists), -EINVAL (src and dst are the same file, bad
 * options), -ENOSPC, -EIO and other I/O errors.
 */
extern int blockmirror_copy(const char *src, const char *dst,
			    const struct blockmirror_copy_options *options,
			    struct blockmirror_copy_stats *stats);

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

#ifdef __cplusplus
}
#endif

#endif /* BLOCKMIRROR_H */
