/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Fuzz target for the control protocol as `bmirror serve` reads it
 * (tools/control.c, docs/control.md): the input is what a client sends.
 * It is read back line by line through the server's line reader (from a
 * memfd, as from the socket), and every JSON object goes through
 * control_parse_request and, when it names a destination, through
 * control_check_destination with and without allowed directories.
 * Malformed lines, over-long lines and wrong types are expected; crashes,
 * leaks and a reader that loops are not.
 */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "control.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static struct line_reader rd;

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static char *const allow[] = { (char *)"/tmp", (char *)"/" };
	struct control_request req;
	const char *msg;
	char err[256];
	json_t *j;
	int fd, r;

	fd = memfd_create("fuzz-control", 0);
	if (fd < 0)
		return 0;
	if (write(fd, data, size) != (ssize_t)size ||
	    lseek(fd, 0, SEEK_SET) != 0) {
		close(fd);
		return 0;
	}
	rd.fd = fd;
	rd.len = 0;
	while ((r = line_read(&rd, &j)) == 1 || r == -EPROTO) {
		if (!j)
			continue;
		if (control_parse_request(j, &req, &msg) == 0) {
			if (!req.cmd)
				abort();
			if (req.to) {
				control_check_destination(req.to, NULL, 0,
							  err, sizeof err);
				control_check_destination(req.to, allow, 1,
							  err, sizeof err);
				control_check_destination(req.to, allow + 1, 1,
							  err, sizeof err);
			}
		} else if (!msg) {
			abort();
		}
		json_decref(j);
	}
	close(fd);
	return 0;
}
