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

#endif /* BMIRROR_CONTROL_H */
