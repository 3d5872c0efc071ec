/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Line I/O for the control protocol.  A line longer than the reader's
 * buffer is an error (-EMSGSIZE) and the connection should be dropped:
 * no command needs 64 KiB.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "control.h"

int
line_read(struct line_reader *r, json_t **out)
{
	char *nl;
	ssize_t n;

	*out = NULL;
	for (;;) {
		nl = memchr(r->buf, '\n', r->len);
		if (nl) {
			size_t line = (size_t)(nl - r->buf);
			json_error_t err;
			json_t *j;

			*nl = '\0';
			j = json_loadb(r->buf, line, 0, &err);
			memmove(r->buf, nl + 1, r->len - line - 1);
			r->len -= line + 1;
			if (!j || !json_is_object(j)) {
				json_decref(j);
				return -EPROTO;
			}
			*out = j;
			return 1;
		}
		if (r->len == sizeof r->buf)
			return -EMSGSIZE;
		n = read(r->fd, r->buf + r->len, sizeof r->buf - r->len);
		if (n == 0)
			return 0;
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		r->len += (size_t)n;
	}
}

int
line_write(int fd, json_t *obj)
{
	char *s = json_dumps(obj, JSON_COMPACT | JSON_PRESERVE_ORDER);
	size_t len, off = 0;
	int r = 0;

	json_decref(obj);
	if (!s)
		return -ENOMEM;
	len = strlen(s);
	s[len++] = '\n'; /* json_dumps leaves room: replace the NUL */
	while (off < len) {
		ssize_t n = send(fd, s + off, len - off, MSG_NOSIGNAL);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN) {
				usleep(1000);
				continue;
			}
			r = -errno;
			break;
		}
		off += (size_t)n;
	}
	free(s);
	return r;
}

int
control_connect(const char *path)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int fd, r;

	if (strlen(path) >= sizeof sa.sun_path)
		return -ENAMETOOLONG;
	strcpy(sa.sun_path, path);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
		r = -errno;
		close(fd);
		return r;
	}
	return fd;
}
