/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Publishing names and files durably.
 *
 * POSIX makes a file's data durable only once the file is synced, and a
 * new name (a created file, a rename, a symlink, an unlink) only once the
 * directory that holds it is synced.  Every place in lib/ that must
 * survive a power loss (the pivot's link, the state directory, a created
 * image, an offline copy) goes through these helpers, so that the order is
 * written once: data first, then the name, then the directory.
 *
 * Every helper returns 0 or the first negative errno it met, with a
 * message naming the path (bm_error); none drops an error.
 *
 * bm_durable_hook lets tests fail any step (fault injection) and watch
 * every step that happened (the crash recorder): it is called before a
 * step with `done` false (a negative return fails the step without doing
 * it) and after a step that was attempted with `done` true and `result`
 * set.  NULL outside tests; the cost is one load per step.
 */
#ifndef BM_DURABLE_H
#define BM_DURABLE_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

enum bm_durable_step {
	BM_DURABLE_WRITE,      /* path: a new file's content (buf, len) */
	BM_DURABLE_FSYNC,      /* path: a file's data and size */
	BM_DURABLE_SYMLINK,    /* path: a new symlink to path2 */
	BM_DURABLE_RENAME,     /* path renamed over path2 */
	BM_DURABLE_UNLINK,     /* path removed */
	BM_DURABLE_MKDIR,      /* path: a new directory */
	BM_DURABLE_RMDIR,      /* path: a directory removed */
	BM_DURABLE_FSYNC_DIR,  /* path: a directory's entries */
};

struct bm_durable_event {
	enum bm_durable_step step;
	const char *path;
	const char *path2;
	const void *buf;
	size_t len;
	bool done;             /* false: before the step; true: after */
	int result;            /* done: 0 or -errno */
};

extern int (*bm_durable_hook)(const struct bm_durable_event *ev);

/* The name of a step, for messages ("rename", "fsync of the directory"). */
const char *bm_durable_step_name(enum bm_durable_step step);

/* Sync the directory `dir`. */
int bm_durable_sync_dir(const char *dir);

/* Sync the directory that holds `path`. */
int bm_durable_sync_parent(const char *path);

/* Sync an open file's data and size (fsync; `path` for messages). */
int bm_durable_sync_fd(int fd, const char *path);

/*
 * A file this process just created at `path` (open with O_CREAT): make its
 * content and its name durable (fsync the file through `fd` if fd >= 0,
 * then its directory).
 */
int bm_durable_publish(int fd, const char *path);

/*
 * Rename `from` over `to` and sync the directory of `to` (and of `from`
 * when it differs).  If the rename succeeded but a sync failed, *renamed
 * (when not NULL) says so: the new name is visible, its durability
 * unknown.
 */
int bm_durable_rename(const char *from, const char *to, bool *renamed);

/* As bm_durable_rename, but never replaces: -EEXIST if `to` exists. */
int bm_durable_rename_new(const char *from, const char *to);

/*
 * Point the symlink `link` at `target` atomically and durably: a symlink
 * under a temporary name beside it, renamed over `link`, then the
 * directory synced.  *renamed as for bm_durable_rename.
 */
int bm_durable_symlink(const char *target, const char *link, bool *renamed);

/*
 * Write a whole new file atomically: `len` bytes to `path`.tmp, synced,
 * renamed to `path`, the directory synced.  The file is complete or
 * absent after a crash.
 */
int bm_durable_write_file(const char *path, const void *buf, size_t len,
			  mode_t mode);
/* Remove the temporary a bm_durable_write_file of `path` cut short left
 * (a crash between its write and its rename); 0 if there is none. */
int bm_durable_remove_leftover(const char *path);

/* Remove `path` and sync its directory; a missing file is not an error. */
int bm_durable_unlink(const char *path);

/* mkdir (an existing directory is fine) and sync its parent. */
int bm_durable_mkdir(const char *dir, mode_t mode);

/* rmdir (a missing one is fine) and sync its parent. */
int bm_durable_rmdir(const char *dir);

#endif /* BM_DURABLE_H */
