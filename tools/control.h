/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The control protocol of `bmirror serve`: JSON objects, one per line, on
 * a Unix socket (docs/control.md).  These helpers read and write lines on
 * a socket for both ends.
 */
#ifndef BMIRROR_CONTROL_H
#define BMIRROR_CONTROL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

/* A line reader over a file descriptor. */
struct line_reader {
	int fd;
	char buf[65536];
	size_t len;
};

/*
 * Read one JSON object line.  Returns 1 and stores a new reference in
 * *out, 0 at end of file, -EAGAIN if no complete line is there yet (the
 * fd is non-blocking), or another negative errno (-EPROTO for a line that
 * is not a JSON object: *out is then NULL and the line is dropped).
 */
int line_read(struct line_reader *r, json_t **out);

/* Is a complete line waiting in the reader's buffer (line_read would
 * return it without reading the fd)? */
bool line_pending(const struct line_reader *r);

/* Write a JSON object as one line (blocking: for clients, whose socket is
 * blocking).  0 or -errno.  Steals obj. */
int line_write(int fd, json_t *obj);

/*
 * Lines waiting to go out on a non-blocking socket (the server's side: it
 * never waits for a client).  Zero-initialised is empty.
 */
struct line_out {
	char *buf;
	size_t len, cap;
};

/* Queue a JSON object as one line.  0 or -ENOMEM.  Steals obj. */
int line_out_add(struct line_out *o, json_t *obj);

/* Send what the socket takes now, without waiting: 0 (o->len says what
 * is left), or -errno for a socket that is gone. */
int line_out_flush(struct line_out *o, int fd);

void line_out_free(struct line_out *o);

/* Connect to a control socket; returns the fd or -errno. */
int control_connect(const char *path);

/* The command line's client (cmd-move.c).  client_connect: the fd, or -1
 * with the error printed.  client_request: send `cmd` (stolen) and wait
 * for its reply (a new reference, NULL if the server is gone), passing
 * events to ev_fn.  client_reply_error: -1 with the server's message
 * printed if the reply is an error, else 0. */
int client_connect(const char *path);
json_t *client_request(int fd, struct line_reader *rd, json_t *cmd,
		       void (*ev_fn)(json_t *ev, void *data), void *data);
int client_reply_error(json_t *reply);

/* One command, `cmd` (stolen), on a new connection to `control`: its
 * successful reply, or NULL with the error printed.  client_call_events
 * also passes the events that come before the reply to ev_fn. */
json_t *client_call(const char *control, json_t *cmd);
json_t *client_call_events(const char *control, json_t *cmd,
			   void (*ev_fn)(json_t *ev, void *data), void *data);

/*
 * The members of a command that the server reads, type-checked
 * (docs/control.md).  Strings are borrowed from the JSON object; absent
 * members are NULL, 0 or false (pivot: true).  Members not listed here
 * are left to the command that uses them.
 */
struct control_request {
	const char *cmd;
	const char *to;
	const char *format;
	const char *mode;
	const char *on_error;
	const char *export_name;      /* "export" (snapshot) */
	const char *scratch;          /* snapshot */
	const char *scratch_dir;
	const char *since;            /* snapshot: changed since this
				       * checkpoint */
	const char *checkpoint;       /* snapshot: create this checkpoint */
	const char *name;             /* checkpoint-create, -remove */
	const char *group;            /* snapshot-hold, -take, -commit,
				       * -abort: the group's name */
	uint64_t lease_ms;            /* snapshot-hold: 0 (default) to
				       * CONTROL_LEASE_MAX_MS */
	uint64_t timeout_ms;          /* snapshot: at most UINT32_MAX */
	uint64_t sample;              /* backup-verify: percent, 0 to 100 */
	uint64_t max_scratch;
	uint64_t speed;
	uint64_t granularity;
	bool pivot;
	bool create;
	bool force;
};

/* The longest lease a group hold may ask for: a guest is never held
 * longer than this by a client that dies (docs/control.md). */
#define CONTROL_LEASE_MAX_MS 60000

/*
 * Check a command's members: "cmd" a string, the strings strings, speed,
 * granularity and max_scratch integers from 0 to INT64_MAX, timeout_ms
 * from 0 to UINT32_MAX, lease_ms to CONTROL_LEASE_MAX_MS, sample to 100,
 * the flags
 * booleans; a group's name 1 to 64 bytes of [A-Za-z0-9._-].
 * Pure.  0, or -EINVAL with *err set to a static message.
 */
int control_parse_request(json_t *req, struct control_request *out,
			  const char **err);

/*
 * What the operator lets a move write to (bmirror serve --allow-dir,
 * --allow-nbd).  With both lists empty nothing is confined.
 */
struct control_allow {
	char *const *dirs;  /* directories, canonical (realpath) */
	size_t n_dirs;
	char *const *nbd;   /* NBD hosts, or "unix:" + a canonical socket path
			     * (control_canonical_path) */
	size_t n_nbd;
};

/*
 * The canonical name of the absolute `path`: its directory resolved
 * (realpath: symbolic links and ".." followed) with its last component
 * appended as it is, so that the name opens the same entry whatever
 * later happens to ".." or links above it.  The last component must name
 * an entry (not empty, "." or "..").  0, or a negative errno with a
 * message in err.
 */
int control_canonical_path(const char *path, char *out, size_t outlen,
			   char *err, size_t errlen);

/*
 * May a move write to `to`, and what exactly should it open?  `is_uri`
 * is the library's classification of `to` (blockmirror_nbd_is_uri): the
 * caller makes it once, and the rules below are those of what the
 * library will open.  `create`: the move makes the file.
 *
 * A path must be absolute.  When the server is confined (allow has an
 * entry), a path must also resolve (control_canonical_path) into one of
 * allow->dirs, and its entry, if it exists, must be a regular file or a
 * block device, not a symbolic link (-ELOOP), and a regular file must not
 * have other hard links (with one elsewhere, writing it would write
 * there); an NBD URI must be of the form SCHEME://HOST[:PORT]/EXPORT with
 * HOST in allow->nbd and no query, or SCHEME+unix:///EXPORT?socket=PATH
 * (only that query) with "unix:"PATH, canonical, in allow->nbd; no
 * percent-escapes, user information or fragment.
 *
 * On success `out` holds the name to open: the canonical path for a
 * confined path, a confined Unix NBD URI with its socket's canonical path,
 * else `to` as it is.  0, or a negative errno (-EINVAL,
 * -EPERM, -ELOOP, -ENAMETOOLONG, ...) with a message in err.  Reads the
 * file system, writes nothing.
 */
int control_check_destination(const char *to, bool is_uri, bool create,
			      const struct control_allow *allow, char *out,
			      size_t outlen, char *err, size_t errlen);

/*
 * May the server make files in the directory `dir` (a snapshot's
 * scratch_dir)?  It must be absolute and, when the server is confined,
 * resolve (realpath) into one of allow->dirs; `out` is then the resolved
 * name, else `dir` as it is.  0, or a negative errno with a message in
 * err.
 */
int control_check_dir(const char *dir, const struct control_allow *allow,
		      char *out, size_t outlen, char *err, size_t errlen);

#endif /* BMIRROR_CONTROL_H */
