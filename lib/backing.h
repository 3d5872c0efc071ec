/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The backing file policy (SECURITY.md, "Backing files"; the rules are
 * in the comment on top of lib/backing.c).  A backing file name read from
 * an image is opened only if it leads to a regular file (or, where
 * allowed, a block device) inside one of a chain's directories: the top
 * image's own (as named and as resolved) and those the operator allowed.
 * Paths here are absolute and canonical (realpath).
 */
#ifndef BM_BACKING_H
#define BM_BACKING_H

#include <stdbool.h>
#include <stddef.h>

#include <blockmirror/blockmirror.h>

struct bm_image;
struct bm_loop;

struct bm_backing_dir {
	const char *path;
	bool devices;                /* block devices in it may be backing files */
};

/*
 * Which of dirs[0, n) holds `path` (equal to it or below it): the index
 * of the first, or -1.  With `devices`, only dirs that allow block
 * devices count.  No I/O.
 */
int bm_backing_dir_find(const struct bm_backing_dir *dirs, size_t n,
			const char *path, bool devices);

/*
 * The part of the policy that needs no I/O: the name alone, as an image
 * in directory `dir` (absolute) records it.  Refuses (negative errno, the
 * reason in *why) names that are empty, too long, not local paths (URIs,
 * "json:"), hold control bytes, or are relative and lead, with "." and
 * ".." folded as text, outside every dir (-EPERM; out holds where it
 * leads).  Otherwise writes the folded absolute path to out[0, size) and
 * returns 0 if it lies inside a dir, 1 if not (an absolute name: only
 * resolving its symbolic links can tell).  out[0] is '\0' if nothing
 * was folded.
 */
int bm_backing_name_check(const struct bm_backing_dir *dirs, size_t n,
			  const char *dir, const char *name, char *out,
			  size_t size, const char **why);

/*
 * May the image `image` (as opened, the top of its chain) record `name`
 * as its backing file, so that it opens again?  The whole policy, with
 * I/O: 0 and the canonical path of the file it names (*real, malloc'd),
 * or a negative errno with a message naming the image and the reason.
 */
int bm_backing_check(const char *image, const char *name, char **real);

/*
 * For a driver that reads the backing file `name` recorded in `image`
 * during its own open, before the engine opens it (VHDX: the parent's
 * identity): like bm_backing_check, but while a chain is being opened
 * on this thread, under that chain's policy (its top image's), which is
 * the one bm_backing_open will apply.  Loops and depth are left to
 * bm_backing_open.  *real is malloc'd; a refusal sets the message that
 * bm_backing_open would give.
 */
int bm_backing_check_in_chain(const char *image, const char *name,
			      char **real);

/*
 * Open the backing file `name` that the image `image` (as opened)
 * records, in `format` (AUTO: probed, qcow2 or VHDX only), on `loop`,
 * under the policy.  0 with *backing and *path (the name as recorded,
 * resolved against the image's directory as named: what
 * bm_image_facts reports) both the caller's, or a negative errno with
 * a message naming the image, the name and the reason (for a failure
 * further down the chain, prefixed "IMAGE: in its backing chain: "),
 * and both NULL.  A NULL or empty name opens nothing and returns 0.
 * Blocking.  The backing image's own backing file opens inside this
 * call, on the same thread; the outermost call holds the chain's policy
 * for all of them.
 */
int bm_backing_open(struct bm_loop *loop, const char *image, const char *name,
		    enum blockmirror_format format, struct bm_image **backing,
		    char **path);

#endif /* BM_BACKING_H */
