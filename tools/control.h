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

/* Write a JSON object as one line (blocking).  0 or -errno.  Steals obj. */
int line_write(int fd, json_t *obj);

/* Connect to a control socket; returns the fd or -errno. */
int control_connect(const char *path);

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
	uint64_t speed;
	uint64_t granularity;
	bool pivot;
	bool create;
	bool force;
};

/*
 * Check a command's members: "cmd" a string, the strings strings, speed
 * and granularity integers from 0 to INT64_MAX, the flags booleans.
 * Pure.  0, or -EINVAL with *err set to a static message.
 */
int control_parse_request(json_t *req, struct control_request *out,
			  const char **err);

/*
 * May a move write to `to` (a path or an NBD URI)?  A path must be
 * absolute.  With n_allow > 0 allowed directories (canonical, from
 * realpath), a path must also name an entry, not a symbolic link, of a
 * directory that resolves (realpath: symlinks and ".." followed) to one of
 * them or below, and an NBD URI must have no query (which could name a
 * local socket or key file).  0, or a negative errno with a message in
 * err.
 */
int control_check_destination(const char *to, char *const *allow,
			      size_t n_allow, char *err, size_t errlen);

#endif /* BMIRROR_CONTROL_H */
