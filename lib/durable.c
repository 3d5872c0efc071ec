/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Publishing names and files durably (durable.h).  Each helper is a short
 * sequence of steps run through step(), which gives the test hook its
 * say before and after, and turns a failure into a message naming the
 * path and the step.  The first error ends the sequence and is returned.
 */
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "durable.h"
#include "errors.h"
#include "internal.h"

int (*bm_durable_hook)(const struct bm_durable_event *ev);

const char *
bm_durable_step_name(enum bm_durable_step step)
{
	switch (step) {
	case BM_DURABLE_WRITE:
		return "write";
	case BM_DURABLE_FSYNC:
		return "fsync";
	case BM_DURABLE_SYMLINK:
		return "symlink";
	case BM_DURABLE_RENAME:
		return "rename";
	case BM_DURABLE_UNLINK:
		return "unlink";
	case BM_DURABLE_MKDIR:
		return "mkdir";
	case BM_DURABLE_RMDIR:
		return "rmdir";
	case BM_DURABLE_FSYNC_DIR:
		return "fsync of the directory";
	}
	return "?";
}

struct step_args {
	int fd;
	mode_t mode;
	bool noreplace;        /* rename: fail with EEXIST rather than replace */
};

static int
do_step(const struct bm_durable_event *ev, const struct step_args *a)
{
	const char *p = ev->buf;
	size_t done = 0;
	int r = 0;

	switch (ev->step) {
	case BM_DURABLE_WRITE:
		while (done < ev->len) {
			ssize_t n = pwrite(a->fd, p + done, ev->len - done,
					   (off_t)done);

			if (n < 0 && errno == EINTR)
				continue;
			if (n <= 0)
				return n < 0 ? -errno : -EIO;
			done += (size_t)n;
		}
		return 0;
	case BM_DURABLE_FSYNC:
	case BM_DURABLE_FSYNC_DIR:
		r = fsync(a->fd);
		break;
	case BM_DURABLE_SYMLINK:
		r = symlink(ev->path2, ev->path);
		break;
	case BM_DURABLE_RENAME:
		r = a && a->noreplace
		    ? renameat2(AT_FDCWD, ev->path, AT_FDCWD, ev->path2,
				RENAME_NOREPLACE)
		    : rename(ev->path, ev->path2);
		break;
	case BM_DURABLE_UNLINK:
		r = unlink(ev->path);
		if (r < 0 && errno == ENOENT)
			r = 0;
		break;
	case BM_DURABLE_MKDIR:
		r = mkdir(ev->path, a->mode);
		if (r < 0 && errno == EEXIST) {
			struct stat st;

			if (stat(ev->path, &st) == 0 && S_ISDIR(st.st_mode))
				r = 0;
			else
				errno = EEXIST;
		}
		break;
	case BM_DURABLE_RMDIR:
		r = rmdir(ev->path);
		if (r < 0 && errno == ENOENT)
			r = 0;
		break;
	}
	return r < 0 ? -errno : 0;
}

/* One step: the hook before, the step, the hook after, the message. */
static int
step(enum bm_durable_step s, const char *path, const char *path2,
     const void *buf, size_t len, const struct step_args *a)
{
	struct bm_durable_event ev = {
		.step = s, .path = path, .path2 = path2, .buf = buf,
		.len = len,
	};
	int r = 0;

	if (bm_durable_hook)
		r = bm_durable_hook(&ev);
	if (r == 0) {
		r = do_step(&ev, a);
		ev.done = true;
		ev.result = r;
		if (bm_durable_hook)
			bm_durable_hook(&ev);
	}
	if (r == 0)
		return 0;
	if (s == BM_DURABLE_RENAME || s == BM_DURABLE_SYMLINK)
		return bm_error(r, "%s: %s to %s: %s", path,
				bm_durable_step_name(s), path2, strerror(-r));
	return bm_error(r, "%s: %s: %s", path, bm_durable_step_name(s),
			strerror(-r));
}

int
bm_durable_sync_dir(const char *dir)
{
	struct step_args a = { .fd = open(dir, O_RDONLY | O_DIRECTORY |
					  O_CLOEXEC) };
	int r;

	if (a.fd < 0)
		return bm_error(-errno, "%s: opening the directory to sync "
				"it: %s", dir, strerror(errno));
	r = step(BM_DURABLE_FSYNC_DIR, dir, NULL, NULL, 0, &a);
	close(a.fd);
	return r;
}

/* The directory part of `path` into buf. */
static int
parent_of(const char *path, char *buf, size_t size)
{
	if (snprintf(buf, size, "%s", path) >= (int)size)
		return bm_error(-ENAMETOOLONG, "%s: name too long", path);
	/* dirname() may return a static "." or point into buf. */
	const char *d = dirname(buf);

	memmove(buf, d, strlen(d) + 1);
	return 0;
}

int
bm_durable_sync_parent(const char *path)
{
	char dir[PATH_MAX];
	int r = parent_of(path, dir, sizeof dir);

	return r < 0 ? r : bm_durable_sync_dir(dir);
}

int
bm_durable_sync_fd(int fd, const char *path)
{
	struct step_args a = { .fd = fd };

	return step(BM_DURABLE_FSYNC, path, NULL, NULL, 0, &a);
}

int
bm_durable_publish(int fd, const char *path)
{
	int r = 0;

	if (fd >= 0)
		r = bm_durable_sync_fd(fd, path);
	return r < 0 ? r : bm_durable_sync_parent(path);
}

static int
rename_durably(const char *from, const char *to, bool noreplace,
	       bool *renamed)
{
	struct step_args a = { .fd = -1, .noreplace = noreplace };
	char d1[PATH_MAX], d2[PATH_MAX];
	int r;

	if (renamed)
		*renamed = false;
	r = parent_of(from, d1, sizeof d1);
	if (r == 0)
		r = parent_of(to, d2, sizeof d2);
	if (r == 0)
		r = step(BM_DURABLE_RENAME, from, to, NULL, 0, &a);
	if (r < 0)
		return r;
	if (renamed)
		*renamed = true;
	r = bm_durable_sync_dir(d2);
	if (r == 0 && strcmp(d1, d2) != 0)
		r = bm_durable_sync_dir(d1);
	return r;
}

int
bm_durable_rename(const char *from, const char *to, bool *renamed)
{
	return rename_durably(from, to, false, renamed);
}

int
bm_durable_rename_new(const char *from, const char *to)
{
	return rename_durably(from, to, true, NULL);
}

/* The public forms, for programs (bmirror rebalance) that publish files
 * of their own. */
BM_EXPORT int
blockmirror_rename_durable(const char *from, const char *to)
{
	int r;

	bm_error_clear();
	if (!from || !to)
		return bm_api_fail("blockmirror_rename_durable",
				   bm_error(-EINVAL, "bad arguments"));
	r = bm_durable_rename_new(from, to);
	return r < 0 ? bm_api_fail("blockmirror_rename_durable", r) : 0;
}

BM_EXPORT int
blockmirror_unlink_durable(const char *path)
{
	int r;

	bm_error_clear();
	if (!path)
		return bm_api_fail("blockmirror_unlink_durable",
				   bm_error(-EINVAL, "bad arguments"));
	r = bm_durable_unlink(path);
	return r < 0 ? bm_api_fail("blockmirror_unlink_durable", r) : 0;
}

int
bm_durable_symlink(const char *target, const char *link, bool *renamed)
{
	char tmp[PATH_MAX];
	int r;

	if (renamed)
		*renamed = false;
	if (snprintf(tmp, sizeof tmp, "%s.bm-tmp.%ld", link,
		     (long)getpid()) >= (int)sizeof tmp)
		return bm_error(-ENAMETOOLONG, "%s: name too long", link);
	unlink(tmp); /* a leftover of a crash of a process with our pid */
	r = step(BM_DURABLE_SYMLINK, tmp, target, NULL, 0, NULL);
	if (r < 0)
		return r;
	r = bm_durable_rename(tmp, link, renamed);
	if (r < 0 && !(renamed && *renamed))
		unlink(tmp);
	return r;
}

/* The temporary bm_durable_write_file writes `path` to first. */
static int
tmp_name(const char *path, char *tmp, size_t len)
{
	if (snprintf(tmp, len, "%s.tmp", path) >= (int)len)
		return bm_error(-ENAMETOOLONG, "%s: name too long", path);
	return 0;
}

int
bm_durable_remove_leftover(const char *path)
{
	char tmp[PATH_MAX];
	int r = tmp_name(path, tmp, sizeof tmp);

	if (r == 0 && unlink(tmp) < 0 && errno != ENOENT)
		r = bm_error(-errno, "%s: %s", tmp, strerror(errno));
	return r;
}

int
bm_durable_write_file(const char *path, const void *buf, size_t len,
		      mode_t mode)
{
	char tmp[PATH_MAX];
	struct step_args a;
	int r = tmp_name(path, tmp, sizeof tmp);

	if (r < 0)
		return r;
	a.fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW,
		    mode);
	if (a.fd < 0)
		return bm_error(-errno, "%s: %s", tmp, strerror(errno));
	r = step(BM_DURABLE_WRITE, tmp, NULL, buf, len, &a);
	if (r == 0)
		r = step(BM_DURABLE_FSYNC, tmp, NULL, NULL, 0, &a);
	close(a.fd);
	if (r == 0)
		r = bm_durable_rename(tmp, path, NULL);
	if (r < 0)
		unlink(tmp);
	return r;
}

int
bm_durable_unlink(const char *path)
{
	int r = step(BM_DURABLE_UNLINK, path, NULL, NULL, 0, NULL);

	return r < 0 ? r : bm_durable_sync_parent(path);
}

int
bm_durable_mkdir(const char *dir, mode_t mode)
{
	struct step_args a = { .mode = mode };
	int r = step(BM_DURABLE_MKDIR, dir, NULL, NULL, 0, &a);

	return r < 0 ? r : bm_durable_sync_parent(dir);
}

int
bm_durable_rmdir(const char *dir)
{
	int r = step(BM_DURABLE_RMDIR, dir, NULL, NULL, 0, NULL);

	return r < 0 ? r : bm_durable_sync_parent(dir);
}
