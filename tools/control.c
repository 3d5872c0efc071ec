/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Line I/O for the control protocol.  A line longer than the reader's
 * buffer is an error (-EMSGSIZE) and the connection should be dropped:
 * no command needs 64 KiB.
 *
 * Also the server's checks on what a command asks for: members of the
 * right types (control_parse_request) and destinations inside what the
 * operator allowed (control_check_destination).  A control client is
 * trusted only as far as the socket's owner trusts it (SECURITY.md).
 */
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
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

static int
get_string(json_t *req, const char *key, const char **out, const char **err,
	   const char *msg)
{
	json_t *v = json_object_get(req, key);

	*out = NULL;
	if (!v || json_is_null(v))
		return 0;
	if (!json_is_string(v)) {
		*err = msg;
		return -EINVAL;
	}
	*out = json_string_value(v);
	return 0;
}

static int
get_u64(json_t *req, const char *key, uint64_t *out, const char **err,
	const char *msg)
{
	json_t *v = json_object_get(req, key);

	*out = 0;
	if (!v || json_is_null(v))
		return 0;
	if (!json_is_integer(v) || json_integer_value(v) < 0) {
		*err = msg;
		return -EINVAL;
	}
	*out = (uint64_t)json_integer_value(v);
	return 0;
}

static int
get_bool(json_t *req, const char *key, bool def, bool *out, const char **err,
	 const char *msg)
{
	json_t *v = json_object_get(req, key);

	*out = def;
	if (!v || json_is_null(v))
		return 0;
	if (!json_is_boolean(v)) {
		*err = msg;
		return -EINVAL;
	}
	*out = json_is_true(v);
	return 0;
}

int
control_parse_request(json_t *req, struct control_request *out,
		      const char **err)
{
	memset(out, 0, sizeof *out);
	*err = NULL;
	if (!json_is_object(req)) {
		*err = "not a JSON object";
		return -EINVAL;
	}
	if (get_string(req, "cmd", &out->cmd, err, "\"cmd\" must be a "
		       "string") < 0)
		return -EINVAL;
	if (!out->cmd) {
		*err = "no \"cmd\"";
		return -EINVAL;
	}
	if (get_string(req, "to", &out->to, err,
		       "\"to\" must be a string") < 0 ||
	    get_string(req, "format", &out->format, err,
		       "\"format\" must be a string") < 0 ||
	    get_string(req, "mode", &out->mode, err,
		       "\"mode\" must be a string") < 0 ||
	    get_string(req, "on_error", &out->on_error, err,
		       "\"on_error\" must be a string") < 0 ||
	    get_u64(req, "speed", &out->speed, err, "\"speed\" must be "
		    "an integer of at least 0") < 0 ||
	    get_u64(req, "granularity", &out->granularity, err,
		    "\"granularity\" must be an integer of at least 0") < 0 ||
	    get_bool(req, "pivot", true, &out->pivot, err,
		     "\"pivot\" must be true or false") < 0 ||
	    get_bool(req, "create", false, &out->create, err,
		     "\"create\" must be true or false") < 0 ||
	    get_bool(req, "force", false, &out->force, err,
		     "\"force\" must be true or false") < 0)
		return -EINVAL;
	if (out->to && !*out->to) {
		*err = "\"to\" is empty";
		return -EINVAL;
	}
	return 0;
}

static int __attribute__((format(printf, 4, 5)))
dest_error(char *err, size_t errlen, int r, const char *fmt, ...)
{
	va_list ap;

	if (errlen) {
		va_start(ap, fmt);
		vsnprintf(err, errlen, fmt, ap);
		va_end(ap);
	}
	return r;
}

/* Is the canonical path `p` the directory `dir` or inside it? */
static bool
path_within(const char *p, const char *dir)
{
	size_t n = strlen(dir);

	if (n == 1 && dir[0] == '/')
		return p[0] == '/';
	return strncmp(p, dir, n) == 0 && (p[n] == '\0' || p[n] == '/');
}

int
control_check_destination(const char *to, char *const *allow,
			  size_t n_allow, char *err, size_t errlen)
{
	char parent[PATH_MAX], real[PATH_MAX];
	const char *slash, *base;
	struct stat st;

	if (strstr(to, "://")) {
		if (n_allow && strchr(to, '?'))
			return dest_error(err, errlen, -EPERM, "%s: with "
					  "--allow-dir, an NBD URI may not "
					  "have a query (it can name local "
					  "files)", to);
		return 0;
	}
	if (to[0] != '/')
		return dest_error(err, errlen, -EINVAL, "%s: not an absolute "
				  "path", to);
	if (!n_allow)
		return 0;
	slash = strrchr(to, '/');
	base = slash + 1;
	if (!*base || strcmp(base, ".") == 0 || strcmp(base, "..") == 0)
		return dest_error(err, errlen, -EINVAL, "%s: does not name a "
				  "file", to);
	if ((size_t)(slash - to) >= sizeof parent)
		return dest_error(err, errlen, -ENAMETOOLONG, "%s: path too "
				  "long", to);
	memcpy(parent, to, (size_t)(slash - to));
	parent[slash - to] = '\0';
	if (!realpath(parent[0] ? parent : "/", real))
		return dest_error(err, errlen, -errno, "%s: %s", to,
				  strerror(errno));
	for (size_t i = 0; i < n_allow; i++) {
		if (!path_within(real, allow[i]))
			continue;
		/* The last component is opened as named: no symlink there
		 * may point outside. */
		if (lstat(to, &st) == 0 && S_ISLNK(st.st_mode))
			return dest_error(err, errlen, -ELOOP, "%s: is a "
					  "symbolic link", to);
		return 0;
	}
	return dest_error(err, errlen, -EPERM, "%s: outside the directories "
			  "the server allows (--allow-dir)", to);
}
