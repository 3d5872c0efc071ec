/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The backing file policy (SECURITY.md, "Backing files"; docs/chains.md).
 *
 * A backing file name comes from inside an image, and images are not
 * trusted: a name could point at any file or device the process can read
 * and copy it into the guest's view.  So a name recorded in an image is
 * opened only if
 *
 * - it is a local path (no URI, no "json:"), with no control bytes, and,
 *   if relative, stays inside the chain's directories when "." and ".."
 *   are folded as text (so nothing outside is even looked up);
 * - realpath() of it (symbolic links and ".." followed) lies inside one
 *   of the chain's directories: the top image's directory as named and
 *   as resolved (the operator named that image), and the directories
 *   the operator allowed (blockmirror_allow_backing_dir, and the
 *   colon-separated BLOCKMIRROR_ALLOW_BACKING_DIRS and, for block
 *   devices too, BLOCKMIRROR_ALLOW_BACKING_DEVICES);
 * - that is a regular file, or a block device in a directory that allows
 *   them: never a FIFO (the open would block), socket or character device;
 * - it is not already in the chain (a loop), and the chain has at most
 *   MAX_CHAIN_DEPTH backing files;
 * - its format is recorded, or it probes as qcow2 or VHDX: a file of
 *   unknown format is never taken as raw data.
 *
 * The canonical path is what is opened, so a name checked is the file
 * read (short of someone renaming directories under it meanwhile: the
 * allowed directories must not be writable by those the policy guards
 * against).  The top image's directories are kept for the whole chain
 * in thread-local state while it opens (the opens nest on one thread),
 * so every image of a chain, and a driver that reads its backing file
 * during its own open (bm_backing_check_in_chain: the VHDX parent's
 * identity), answers to the top image's policy.
 *
 * The format engine (format.c) calls bm_backing_open once a driver has
 * read the name; nothing else here knows about drivers.
 */
#include <errno.h>
#include <libgen.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "backing.h"
#include "errors.h"
#include "image.h"
#include "internal.h"

#define MAX_CHAIN_DEPTH 32

struct backing_policy {
	struct bm_backing_dir *dirs;
	size_t n;
};

static pthread_mutex_t allow_lock = PTHREAD_MUTEX_INITIALIZER;
static struct bm_backing_dir *allow_dirs;   /* the operator's, canonical */
static size_t n_allow;

/* How deep the backing chain being opened on this thread is, and its
 * images (canonical paths, to find loops; display names for messages). */
static _Thread_local unsigned chain_depth;
static _Thread_local struct backing_policy chain_policy;
static _Thread_local char *chain_real[MAX_CHAIN_DEPTH + 1];
static _Thread_local const char *chain_name[MAX_CHAIN_DEPTH + 1];
/* Depth of the image whose backing file failed, once a message says so:
 * the images above pass it on without adding their own. */
static _Thread_local int chain_failed_at;

int
bm_backing_dir_find(const struct bm_backing_dir *dirs, size_t n,
		    const char *path, bool devices)
{
	for (size_t i = 0; i < n; i++) {
		const char *d = dirs[i].path;
		size_t len = strlen(d);

		if (devices && !dirs[i].devices)
			continue;
		while (len > 1 && d[len - 1] == '/')
			len--;
		if (len == 1 && d[0] == '/')
			return path[0] == '/' ? (int)i : -1;
		if (strncmp(path, d, len) == 0 &&
		    (path[len] == '\0' || path[len] == '/'))
			return (int)i;
	}
	return -1;
}

/* Append the components of `p` to out[0, *len), folding "." and "..". */
static bool
fold_into(char *out, size_t size, size_t *len, const char *p)
{
	while (*p) {
		size_t seg;

		while (*p == '/')
			p++;
		seg = strcspn(p, "/");
		if (seg == 0 || (seg == 1 && p[0] == '.')) {
			/* nothing */
		} else if (seg == 2 && p[0] == '.' && p[1] == '.') {
			while (*len > 0 && out[*len - 1] != '/')
				(*len)--;
			if (*len > 0)
				(*len)--;
		} else {
			if (*len + 1 + seg >= size)
				return false;
			out[(*len)++] = '/';
			memcpy(out + *len, p, seg);
			*len += seg;
		}
		p += seg;
	}
	return true;
}

int
bm_backing_name_check(const struct bm_backing_dir *dirs, size_t n,
		      const char *dir, const char *name, char *out,
		      size_t size, const char **why)
{
	size_t len = 0;

	*why = "no room for the path";
	if (size < 2)
		return -EINVAL;
	out[0] = '\0';
	if (!name[0]) {
		*why = "the name is empty";
		return -EPERM;
	}
	for (const char *c = name; *c; c++)
		if ((unsigned char)*c < 0x20 || *c == 0x7f) {
			*why = "the name holds control characters";
			return -EPERM;
		}
	if (strstr(name, "://") || strncmp(name, "json:", 5) == 0) {
		*why = "not a local path (blockmirror opens only local "
		       "backing files)";
		return -ENOTSUP;
	}
	if (strlen(name) >= PATH_MAX) {
		*why = "the name is too long";
		return -ENAMETOOLONG;
	}
	if (name[0] != '/' && dir[0] != '/') {
		*why = "the image's directory is not known";
		return -EINVAL;
	}
	if ((name[0] != '/' && !fold_into(out, size, &len, dir)) ||
	    !fold_into(out, size, &len, name)) {
		out[0] = '\0';
		*why = "the path is too long";
		return -ENAMETOOLONG;
	}
	if (len == 0)
		out[len++] = '/';
	out[len] = '\0';
	if (bm_backing_dir_find(dirs, n, out, false) >= 0)
		return 0;
	if (name[0] != '/') {
		/* out holds where it leads, for the message. */
		*why = "it leads out of the chain's directories";
		return -EPERM;
	}
	return 1;
}

/* `s` for a message: control bytes as \xNN, cut to fit out[size]. */
static const char *
printable(const char *s, char *out, size_t size)
{
	size_t n = 0;

	for (; *s && n + 5 < size; s++) {
		unsigned char c = (unsigned char)*s;

		if (c < 0x20 || c == 0x7f)
			n += (size_t)snprintf(out + n, size - n, "\\x%02x", c);
		else
			out[n++] = (char)c;
	}
	out[n] = '\0';
	return out;
}

static void
policy_free(struct backing_policy *p)
{
	for (size_t i = 0; i < p->n; i++)
		free((char *)p->dirs[i].path);
	free(p->dirs);
	p->dirs = NULL;
	p->n = 0;
}

/* Add `path` (made canonical here; taken over) if it is a directory. */
static int
policy_add(struct backing_policy *p, char *path, bool devices)
{
	struct bm_backing_dir *d;
	char *real = path ? realpath(path, NULL) : NULL;
	struct stat st;

	free(path);
	if (!real || stat(real, &st) < 0 || !S_ISDIR(st.st_mode)) {
		/* An allowed directory that is not there allows nothing. */
		free(real);
		return 0;
	}
	d = realloc(p->dirs, (p->n + 1) * sizeof *d);
	if (!d) {
		free(real);
		return -ENOMEM;
	}
	p->dirs = d;
	d[p->n].path = real;
	d[p->n].devices = devices;
	p->n++;
	return 0;
}

static int
policy_add_env(struct backing_policy *p, const char *var, bool devices)
{
	const char *v = getenv(var);

	while (v && *v) {
		size_t len = strcspn(v, ":");
		int r = 0;

		if (len > 0)
			r = policy_add(p, strndup(v, len), devices);
		if (r < 0)
			return r;
		v += len + (v[len] == ':');
	}
	return 0;
}

/* The directories of a chain whose top image is `top`. */
static int
policy_new(const char *top, struct backing_policy *p)
{
	char *copy = strdup(top), *real = realpath(top, NULL);
	int r = copy ? 0 : -ENOMEM;

	p->dirs = NULL;
	p->n = 0;
	if (r == 0)
		r = policy_add(p, strdup(dirname(copy)), false);
	if (r == 0 && real)
		r = policy_add(p, strdup(dirname(real)), false);
	free(copy);
	free(real);
	pthread_mutex_lock(&allow_lock);
	for (size_t i = 0; r == 0 && i < n_allow; i++)
		r = policy_add(p, strdup(allow_dirs[i].path),
			       allow_dirs[i].devices);
	pthread_mutex_unlock(&allow_lock);
	if (r == 0)
		r = policy_add_env(p, "BLOCKMIRROR_ALLOW_BACKING_DIRS", false);
	if (r == 0)
		r = policy_add_env(p, "BLOCKMIRROR_ALLOW_BACKING_DEVICES",
				   true);
	if (r < 0) {
		policy_free(p);
		return bm_error(r, "%s: out of memory", top);
	}
	return 0;
}

static const char *
file_kind(mode_t mode)
{
	if (S_ISFIFO(mode))
		return "a FIFO";
	if (S_ISSOCK(mode))
		return "a socket";
	if (S_ISCHR(mode))
		return "a character device";
	if (S_ISDIR(mode))
		return "a directory";
	if (S_ISBLK(mode))
		return "a block device";
	return "not a regular file";
}

/*
 * The policy for the name `name` recorded in `image` (as opened): 0 and
 * the canonical path to open, or an error naming the image and the name.
 */
static int
backing_resolve(const struct backing_policy *p, const char *image,
		const char *name, char **out)
{
	char esc[512], folded[PATH_MAX], *copy, *dir, *joined = NULL, *real;
	const char *why, *top = p->n ? p->dirs[0].path : "/";
	struct stat st;
	int r, inside;

	*out = NULL;
	printable(name, esc, sizeof esc);
	copy = strdup(image);
	dir = copy ? realpath(dirname(copy), NULL) : NULL;
	free(copy);
	if (!dir)
		return bm_error(-errno, "%s: cannot resolve the image's "
				"directory: %s", image, strerror(errno));
	inside = bm_backing_name_check(p->dirs, p->n, dir, name, folded,
				       sizeof folded, &why);
	if (inside < 0 && folded[0] == '/') {
		/* Relative, and out of the tree as text: not looked up. */
		free(dir);
		return bm_error(inside, "%s: backing file '%s' refused: it "
				"leads to %s, outside %s (allow other "
				"directories with bmirror's --allow-backing-dir "
				"or BLOCKMIRROR_ALLOW_BACKING_DIRS)", image, esc,
				folded, top);
	}
	if (inside < 0) {
		free(dir);
		return bm_error(inside, "%s: backing file '%s' refused: %s",
				image, esc, why);
	}
	if (name[0] == '/')
		joined = strdup(name);
	else if (asprintf(&joined, "%s/%s", dir, name) < 0)
		joined = NULL;
	free(dir);
	if (!joined)
		return bm_error(-ENOMEM, "%s: out of memory", image);
	real = realpath(joined, NULL);
	if (!real) {
		r = -errno;
		free(joined);
		/* Outside: refused whether it exists or not. */
		if (inside)
			return bm_error(-EPERM, "%s: backing file '%s' refused: "
					"it leads to %s, outside %s (allow "
					"other directories with bmirror's "
					"--allow-backing-dir or "
					"BLOCKMIRROR_ALLOW_BACKING_DIRS)",
					image, esc, folded, top);
		return bm_error(r, "%s: backing file '%s': %s", image, esc,
				strerror(-r));
	}
	free(joined);
	if (bm_backing_dir_find(p->dirs, p->n, real, false) < 0) {
		r = bm_error(-EPERM, "%s: backing file '%s' refused: it "
			     "resolves to %s, outside %s (allow other "
			     "directories with bmirror's --allow-backing-dir or "
			     "BLOCKMIRROR_ALLOW_BACKING_DIRS)",
			     image, esc, real, top);
		free(real);
		return r;
	}
	if (stat(real, &st) < 0) {
		r = bm_error(-errno, "%s: backing file '%s': %s: %s", image,
			     esc, real, strerror(errno));
		free(real);
		return r;
	}
	if (S_ISBLK(st.st_mode) &&
	    bm_backing_dir_find(p->dirs, p->n, real, true) < 0) {
		r = bm_error(-EPERM, "%s: backing file '%s' refused: %s is a "
			     "block device (allow block devices in its "
			     "directory with BLOCKMIRROR_ALLOW_BACKING_DEVICES)",
			     image, esc, real);
		free(real);
		return r;
	}
	if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode)) {
		r = bm_error(-EPERM, "%s: backing file '%s' refused: %s is %s",
			     image, esc, real, file_kind(st.st_mode));
		free(real);
		return r;
	}
	*out = real;
	return 0;
}

int
bm_backing_check(const char *image, const char *name, char **real)
{
	struct backing_policy p;
	int r;

	*real = NULL;
	r = policy_new(image, &p);
	if (r < 0)
		return r;
	r = backing_resolve(&p, image, name, real);
	policy_free(&p);
	return r;
}

BM_EXPORT int
blockmirror_allow_backing_dir(const char *dir, unsigned flags)
{
	struct bm_backing_dir *d;
	struct stat st;
	char *real;

	bm_error_clear();
	if (flags & ~(unsigned)BLOCKMIRROR_BACKING_DEVICES)
		return bm_api_fail("blockmirror_allow_backing_dir",
				   bm_error(-EINVAL, "unknown flags 0x%x",
					    flags));
	if (!dir) {
		pthread_mutex_lock(&allow_lock);
		for (size_t i = 0; i < n_allow; i++)
			free((char *)allow_dirs[i].path);
		free(allow_dirs);
		allow_dirs = NULL;
		n_allow = 0;
		pthread_mutex_unlock(&allow_lock);
		return 0;
	}
	real = realpath(dir, NULL);
	if (!real)
		return bm_api_fail("blockmirror_allow_backing_dir",
				   bm_error(-errno, "%s: %s", dir,
					    strerror(errno)));
	if (stat(real, &st) < 0 || !S_ISDIR(st.st_mode)) {
		free(real);
		return bm_api_fail("blockmirror_allow_backing_dir",
				   bm_error(-ENOTDIR, "%s: not a directory",
					    dir));
	}
	pthread_mutex_lock(&allow_lock);
	d = realloc(allow_dirs, (n_allow + 1) * sizeof *d);
	if (d) {
		allow_dirs = d;
		d[n_allow].path = real;
		d[n_allow].devices = flags & BLOCKMIRROR_BACKING_DEVICES;
		n_allow++;
	}
	pthread_mutex_unlock(&allow_lock);
	if (!d) {
		free(real);
		return bm_api_fail("blockmirror_allow_backing_dir",
				   bm_error(-ENOMEM, "out of memory"));
	}
	return 0;
}


/* ---- opening a chain -------------------------------------------------- */

/* The chain's state, set up by the top image and dropped after it. */
static int
chain_begin(const char *image)
{
	int r = policy_new(image, &chain_policy);

	if (r < 0)
		return r;
	chain_failed_at = -1;
	chain_real[0] = realpath(image, NULL);
	chain_name[0] = image;
	return 0;
}

static void
chain_end(void)
{
	policy_free(&chain_policy);
	free(chain_real[0]);
	chain_real[0] = NULL;
	chain_name[0] = NULL;
}

/* Refuse for this level: the message names the image and its backing
 * name. */
static int
chain_fail(int r)
{
	if (chain_failed_at < 0)
		chain_failed_at = (int)chain_depth;
	return r;
}

int
bm_backing_check_in_chain(const char *image, const char *name, char **real)
{
	*real = NULL;
	if (chain_depth == 0)
		return bm_backing_check(image, name, real);
	return backing_resolve(&chain_policy, image, name, real);
}

static int
open_backing_checked(struct bm_loop *loop, const char *image,
		     const char *name, enum blockmirror_format format,
		     const char *esc, struct bm_image **backing, char **path)
{
	char *real = NULL, *joined = NULL;
	struct bm_image *img = NULL;
	int r;

	r = backing_resolve(&chain_policy, image, name, &real);
	if (r < 0)
		return chain_fail(r);
	for (unsigned i = 0; i <= chain_depth; i++) {
		if (chain_real[i] && strcmp(chain_real[i], real) == 0) {
			r = bm_error(-ELOOP, "%s: backing file '%s' refused: "
				     "a loop (%s is already in the chain)",
				     image, esc, chain_name[i]);
			free(real);
			return chain_fail(r);
		}
	}
	if (chain_depth >= MAX_CHAIN_DEPTH) {
		free(real);
		return chain_fail(bm_error(-ELOOP, "%s: backing file '%s' "
					   "refused: the chain would be "
					   "deeper than %d backing files",
					   image, esc, MAX_CHAIN_DEPTH));
	}

	chain_depth++;
	chain_real[chain_depth] = real;
	chain_name[chain_depth] = real;
	r = bm_image_open(loop, real, format, 0, &img);
	chain_real[chain_depth] = NULL;
	chain_name[chain_depth] = NULL;
	chain_depth--;
	free(real);
	if (r < 0) {
		if (chain_failed_at < 0)
			bm_error_prefix(r, "%s: backing file '%s': ", image,
					esc);
		return chain_fail(r);
	}
	if (format == BLOCKMIRROR_FORMAT_AUTO &&
	    img->format == BLOCKMIRROR_FORMAT_RAW) {
		bm_image_close(img);
		return chain_fail(bm_error(-EPERM, "%s: backing file '%s' "
					   "refused: it has no recorded "
					   "format and is not a qcow2 or VHDX "
					   "image (a backing file is never "
					   "probed as raw: record its format "
					   "with qemu-img rebase -u -b NAME "
					   "-F raw IMAGE)", image, esc));
	}

	/* As recorded, resolved against the image's directory as named
	 * (bm_image_facts: what a new overlay of the same base names). */
	if (name[0] == '/') {
		joined = strdup(name);
	} else {
		char *copy = strdup(image);

		if (!copy || asprintf(&joined, "%s/%s", dirname(copy),
				      name) < 0)
			joined = NULL;
		free(copy);
	}
	if (!joined) {
		bm_image_close(img);
		return chain_fail(bm_error(-ENOMEM, "%s: out of memory",
					   image));
	}
	*backing = img;
	*path = joined;
	return 0;
}

int
bm_backing_open(struct bm_loop *loop, const char *image, const char *name,
		enum blockmirror_format format, struct bm_image **backing,
		char **path)
{
	bool top = chain_depth == 0;
	char esc[512];
	int r;

	*backing = NULL;
	*path = NULL;
	if (!name || !*name)
		return 0;
	printable(name, esc, sizeof esc);
	if (top) {
		r = chain_begin(image);
		if (r < 0)
			return r;
	}
	r = open_backing_checked(loop, image, name, format, esc, backing,
				 path);
	if (top) {
		/* A failure further down: say whose chain it is. */
		if (r < 0 && chain_failed_at > 0)
			bm_error_prefix(r, "%s: in its backing chain: ", image);
		chain_end();
	}
	return r;
}
