/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Line I/O for the control protocol.  A line longer than the reader's
 * buffer is an error (-EMSGSIZE) and the connection should be dropped:
 * no command needs 64 KiB.  Clients write with line_write (blocking); the
 * server queues its lines (struct line_out) and sends them only as fast
 * as each client reads: it never waits for one.
 *
 * Also the server's checks on what a command asks for: members of the
 * right types (control_parse_request) and destinations inside what the
 * operator allowed (control_check_destination).  A control client is
 * trusted only as far as the socket's owner trusts it (SECURITY.md).
 *
 * Destinations: the invariant is that the rules are applied to what the
 * library will open.  So the caller classifies `to` with the library's
 * own rule (blockmirror_nbd_is_uri: a path may well contain "://"), a
 * confined path is checked and then opened by its canonical name (the
 * directory resolved once, here), and an NBD URI is allowed only in a
 * plain form whose host or socket cannot read differently to libnbd
 * (no percent-escapes, user information, fragment or other query).
 */
#include <ctype.h>
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

bool
line_pending(const struct line_reader *r)
{
	return memchr(r->buf, '\n', r->len) != NULL;
}

int
line_out_add(struct line_out *o, json_t *obj)
{
	char *s = json_dumps(obj, JSON_COMPACT | JSON_PRESERVE_ORDER);
	size_t len;

	json_decref(obj);
	if (!s)
		return -ENOMEM;
	len = strlen(s);
	if (o->cap - o->len < len + 1) {
		size_t cap = o->cap ? o->cap : 4096;
		char *b;

		while (cap - o->len < len + 1) {
			if (cap > SIZE_MAX / 2) {
				free(s);
				return -ENOMEM;
			}
			cap *= 2;
		}
		b = realloc(o->buf, cap);
		if (!b) {
			free(s);
			return -ENOMEM;
		}
		o->buf = b;
		o->cap = cap;
	}
	memcpy(o->buf + o->len, s, len);
	o->buf[o->len + len] = '\n';
	o->len += len + 1;
	free(s);
	return 0;
}

int
line_out_flush(struct line_out *o, int fd)
{
	size_t off = 0;
	int r = 0;

	while (off < o->len) {
		ssize_t n = send(fd, o->buf + off, o->len - off,
				 MSG_NOSIGNAL | MSG_DONTWAIT);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno != EAGAIN && errno != EWOULDBLOCK)
				r = -errno;
			break;
		}
		off += (size_t)n;
	}
	memmove(o->buf, o->buf + off, o->len - off);
	o->len -= off;
	/* A burst that is out gives its memory back. */
	if (o->len == 0 && o->cap > 65536) {
		free(o->buf);
		o->buf = NULL;
		o->cap = 0;
	}
	return r;
}

void
line_out_free(struct line_out *o)
{
	free(o->buf);
	o->buf = NULL;
	o->len = o->cap = 0;
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
	    get_string(req, "export", &out->export_name, err,
		       "\"export\" must be a string") < 0 ||
	    get_string(req, "scratch", &out->scratch, err,
		       "\"scratch\" must be a string") < 0 ||
	    get_string(req, "scratch_dir", &out->scratch_dir, err,
		       "\"scratch_dir\" must be a string") < 0 ||
	    get_string(req, "since", &out->since, err,
		       "\"since\" must be a string") < 0 ||
	    get_string(req, "checkpoint", &out->checkpoint, err,
		       "\"checkpoint\" must be a string") < 0 ||
	    get_string(req, "name", &out->name, err,
		       "\"name\" must be a string") < 0 ||
	    get_string(req, "group", &out->group, err,
		       "\"group\" must be a string") < 0 ||
	    get_u64(req, "lease_ms", &out->lease_ms, err,
		    "\"lease_ms\" must be an integer of at least 0") < 0 ||
	    get_u64(req, "timeout_ms", &out->timeout_ms, err,
		    "\"timeout_ms\" must be an integer of at least 0") < 0 ||
	    get_u64(req, "sample", &out->sample, err,
		    "\"sample\" must be an integer of at least 0") < 0 ||
	    get_u64(req, "max_scratch", &out->max_scratch, err,
		    "\"max_scratch\" must be an integer of at least 0") < 0 ||
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
	if (out->sample > 100) {
		*err = "\"sample\" is more than 100 (percent)";
		return -EINVAL;
	}
	if (out->lease_ms > CONTROL_LEASE_MAX_MS) {
		*err = "\"lease_ms\" is more than 60000";
		return -EINVAL;
	}
	if (out->group && (!*out->group || strlen(out->group) > 64 ||
			   strspn(out->group, "abcdefghijklmnopqrstuvwxyz"
				  "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-") !=
			   strlen(out->group))) {
		*err = "\"group\" must be 1 to 64 of A-Z a-z 0-9 . _ -";
		return -EINVAL;
	}
	if (out->timeout_ms > UINT32_MAX) {
		*err = "\"timeout_ms\" is too large";
		return -EINVAL;
	}
	if ((out->export_name && !*out->export_name) ||
	    (out->scratch && !*out->scratch) ||
	    (out->scratch_dir && !*out->scratch_dir)) {
		*err = "\"export\", \"scratch\" and \"scratch_dir\" must "
		       "not be empty";
		return -EINVAL;
	}
	/* Checkpoint names are checked by the library; empty ones here,
	 * so that none reads as absent. */
	if ((out->since && !*out->since) ||
	    (out->checkpoint && !*out->checkpoint) ||
	    (out->name && !*out->name)) {
		*err = "\"since\", \"checkpoint\" and \"name\" must not be "
		       "empty";
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
control_canonical_path(const char *path, char *out, size_t outlen,
		       char *err, size_t errlen)
{
	char parent[PATH_MAX], real[PATH_MAX];
	const char *slash = strrchr(path, '/'), *base;
	size_t plen, rlen, blen;

	if (path[0] != '/' || !slash)
		return dest_error(err, errlen, -EINVAL, "%s: not an absolute "
				  "path", path);
	base = slash + 1;
	if (!*base || strcmp(base, ".") == 0 || strcmp(base, "..") == 0)
		return dest_error(err, errlen, -EINVAL, "%s: does not name a "
				  "file", path);
	plen = (size_t)(slash - path);
	if (plen >= sizeof parent)
		return dest_error(err, errlen, -ENAMETOOLONG, "%s: path too "
				  "long", path);
	memcpy(parent, path, plen);
	parent[plen] = '\0';
	if (!realpath(plen ? parent : "/", real))
		return dest_error(err, errlen, -errno, "%s: %s", path,
				  strerror(errno));
	rlen = strlen(real);
	if (rlen == 1) /* "/" */
		rlen = 0;
	blen = strlen(base);
	if (rlen + 1 + blen + 1 > outlen || rlen + 1 + blen + 1 > PATH_MAX)
		return dest_error(err, errlen, -ENAMETOOLONG, "%s: path too "
				  "long", path);
	memcpy(out, real, rlen);
	out[rlen] = '/';
	memcpy(out + rlen + 1, base, blen + 1);
	return 0;
}

static int
check_path(const char *to, bool create, const struct control_allow *allow,
	   char *out, size_t outlen, char *err, size_t errlen)
{
	struct stat st;
	size_t i;
	int r;

	r = control_canonical_path(to, out, outlen, err, errlen);
	if (r < 0)
		return r;
	for (i = 0; i < allow->n_dirs; i++)
		if (path_within(out, allow->dirs[i]))
			break;
	if (i == allow->n_dirs)
		return dest_error(err, errlen, -EPERM, "%s: outside the "
				  "directories the server allows "
				  "(--allow-dir)", to);
	if (lstat(out, &st) < 0) {
		if (errno == ENOENT)
			return 0; /* made by the move, or it fails */
		return dest_error(err, errlen, -errno, "%s: %s", to,
				  strerror(errno));
	}
	/* The last component is opened as named: no symlink there may
	 * point outside, nor a second name of a file outside. */
	if (S_ISLNK(st.st_mode))
		return dest_error(err, errlen, -ELOOP, "%s: is a symbolic link",
				  to);
	if (create)
		return dest_error(err, errlen, -EEXIST, "%s: exists (\"create\" "
				  "makes a new file)", to);
	if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode))
		return dest_error(err, errlen, -EINVAL, "%s: not a regular file "
				  "or a block device", to);
	if (S_ISREG(st.st_mode) && st.st_nlink > 1)
		return dest_error(err, errlen, -EPERM, "%s: has other hard "
				  "links, which may lie outside --allow-dir", to);
	return 0;
}

/* Is `host` (len bytes) an entry of allow->nbd?  Brackets around an IPv6
 * address are not part of it on either side; case does not count. */
static bool
nbd_host_allowed(const char *host, size_t len,
		 const struct control_allow *allow)
{
	if (len >= 2 && host[0] == '[') {
		host++;
		len -= 2;
	}
	for (size_t i = 0; i < allow->n_nbd; i++) {
		const char *a = allow->nbd[i];
		size_t alen = strlen(a);

		if (strncmp(a, "unix:", 5) == 0)
			continue;
		if (alen >= 2 && a[0] == '[' && a[alen - 1] == ']') {
			a++;
			alen -= 2;
		}
		if (alen == len && strncasecmp(a, host, len) == 0)
			return true;
	}
	return false;
}

static bool
nbd_socket_allowed(const char *path, const struct control_allow *allow)
{
	for (size_t i = 0; i < allow->n_nbd; i++)
		if (strncmp(allow->nbd[i], "unix:", 5) == 0 &&
		    strcmp(allow->nbd[i] + 5, path) == 0)
			return true;
	return false;
}

/*
 * A confined NBD URI (see control.h).  `to` starts with one of the
 * library's schemes, a word of letters and '+' up to the first ':'.
 */
static int
check_uri(const char *to, const struct control_allow *allow, char *out,
	  size_t outlen, char *err, size_t errlen)
{
	const char *colon = strchr(to, ':'), *auth, *p, *q;
	bool is_unix;
	size_t alen, hlen;

	if (!colon || colon == to || strncmp(colon, "://", 3) != 0 ||
	    strspn(to, "abcdefghijklmnopqrstuvwxyz+") != (size_t)(colon - to))
		return dest_error(err, errlen, -EINVAL, "%s: not an NBD URI "
				  "(SCHEME://...)", to);
	is_unix = (size_t)(colon - to) > 5 &&
		  strncmp(colon - 5, "+unix", 5) == 0;
	auth = colon + 3;
	alen = strcspn(auth, "/?#");
	p = auth + alen;
	if (strpbrk(to, "%#") || memchr(auth, '@', alen))
		return dest_error(err, errlen, -EPERM, "%s: with --allow-dir, "
				  "an NBD URI may not have percent-escapes, "
				  "user information or a fragment", to);
	q = strchr(p, '?');
	if (is_unix) {
		char sock[PATH_MAX];
		const char *path;

		if (alen || !q || strncmp(q + 1, "socket=", 7) != 0 ||
		    strpbrk(q + 8, "&;"))
			return dest_error(err, errlen, -EPERM, "%s: with "
					  "--allow-dir, a Unix NBD URI must "
					  "be SCHEME:///EXPORT?socket=PATH, "
					  "nothing else", to);
		path = q + 8;
		if (control_canonical_path(path, sock, sizeof sock, NULL,
					   0) < 0 ||
		    !nbd_socket_allowed(sock, allow))
			return dest_error(err, errlen, -EPERM, "%s: the socket "
					  "is not one the server allows "
					  "(--allow-nbd unix:PATH)", to);
		/* Connect to the socket that was checked. */
		if ((size_t)(path - to) + strlen(sock) >= outlen)
			return dest_error(err, errlen, -ENAMETOOLONG, "%s: too "
					  "long", to);
		memcpy(out, to, (size_t)(path - to));
		strcpy(out + (path - to), sock);
		return 0;
	}
	if (q)
		return dest_error(err, errlen, -EPERM, "%s: with --allow-dir, "
				  "an NBD URI may not have a query (it can "
				  "name local files)", to);
	/* HOST[:PORT] or [IPV6][:PORT], of plain characters only. */
	if (alen && auth[0] == '[') {
		const char *end = memchr(auth, ']', alen);

		if (!end)
			goto bad_host;
		hlen = (size_t)(end - auth) + 1;
		for (size_t i = 1; i + 1 < hlen; i++)
			if (!isxdigit((unsigned char)auth[i]) &&
			    auth[i] != ':' && auth[i] != '.')
				goto bad_host;
	} else {
		hlen = strcspn(auth, ":/");
		if (hlen > alen)
			hlen = alen;
		for (size_t i = 0; i < hlen; i++)
			if (!isalnum((unsigned char)auth[i]) &&
			    auth[i] != '.' && auth[i] != '-')
				goto bad_host;
	}
	if (hlen == 0 || (hlen < alen && (auth[hlen] != ':' ||
					  hlen + 1 == alen)))
		goto bad_host;
	for (size_t i = hlen + 1; i < alen; i++)
		if (!isdigit((unsigned char)auth[i]))
			goto bad_host;
	if (!nbd_host_allowed(auth, hlen, allow))
		return dest_error(err, errlen, -EPERM, "%s: the host is not "
				  "one the server allows (--allow-nbd HOST)",
				  to);
	memcpy(out, to, strlen(to) + 1);
	return 0;
bad_host:
	return dest_error(err, errlen, -EPERM, "%s: with --allow-dir, an NBD "
			  "URI needs a plain HOST[:PORT]", to);
}

int
control_check_destination(const char *to, bool is_uri, bool create,
			  const struct control_allow *allow, char *out,
			  size_t outlen, char *err, size_t errlen)
{
	static const struct control_allow none;
	size_t len = strlen(to);

	if (!allow)
		allow = &none;
	if (len >= outlen)
		return dest_error(err, errlen, -ENAMETOOLONG, "%s: too long",
				  to);
	if (!is_uri && to[0] != '/')
		return dest_error(err, errlen, -EINVAL, "%s: not an absolute "
				  "path", to);
	if (!allow->n_dirs && !allow->n_nbd) {
		memcpy(out, to, len + 1);
		return 0;
	}
	if (!is_uri)
		return check_path(to, create, allow, out, outlen, err, errlen);
	if (!allow->n_nbd)
		return dest_error(err, errlen, -EPERM, "%s: with --allow-dir, "
				  "NBD destinations need --allow-nbd", to);
	return check_uri(to, allow, out, outlen, err, errlen);
}

int
control_check_dir(const char *dir, const struct control_allow *allow,
		  char *out, size_t outlen, char *err, size_t errlen)
{
	char real[PATH_MAX];
	size_t i;

	if (dir[0] != '/')
		return dest_error(err, errlen, -EINVAL, "%s: not an absolute "
				  "path", dir);
	if (!allow || (!allow->n_dirs && !allow->n_nbd)) {
		if (strlen(dir) >= outlen)
			return dest_error(err, errlen, -ENAMETOOLONG, "%s: "
					  "path too long", dir);
		strcpy(out, dir);
		return 0;
	}
	if (!realpath(dir, real))
		return dest_error(err, errlen, -errno, "%s: %s", dir,
				  strerror(errno));
	for (i = 0; i < allow->n_dirs; i++)
		if (path_within(real, allow->dirs[i]))
			break;
	if (i == allow->n_dirs)
		return dest_error(err, errlen, -EPERM, "%s: not inside the "
				  "directories the server allows "
				  "(--allow-dir)", dir);
	if (strlen(real) >= outlen)
		return dest_error(err, errlen, -ENAMETOOLONG, "%s: path too "
				  "long", dir);
	strcpy(out, real);
	return 0;
}
