/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Listening sockets (listen.h).  The invariant of the Unix socket file:
 * it is mode 0600 from the instant it exists (the mode is set on the
 * socket before bind, without the process-wide umask, which other
 * threads share), and only a stale socket is ever removed to make room
 * for it.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "errors.h"
#include "listen.h"

#define BACKLOG 128

/* Nothing at sa's path, or a stale socket, removed; else an error. */
static int
clear_socket_path(const struct sockaddr_un *sa)
{
	const char *path = sa->sun_path;
	struct stat st;
	int probe, r;

	if (lstat(path, &st) < 0)
		return errno == ENOENT ? 0 : bm_error(-errno, "%s: %s", path,
						      strerror(errno));
	if (!S_ISSOCK(st.st_mode))
		return bm_error(-EEXIST, "%s exists and is not a socket; "
				"not replacing it", path);
	probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (probe < 0)
		return bm_error(-errno, "socket: %s", strerror(errno));
	r = connect(probe, (const struct sockaddr *)sa, sizeof *sa);
	close(probe);
	if (r == 0)
		return bm_error(-EADDRINUSE, "%s: a server is listening on "
				"it", path);
	if (unlink(path) < 0 && errno != ENOENT)
		return bm_error(-errno, "%s: cannot remove the stale socket: "
				"%s", path, strerror(errno));
	return 0;
}

int
bm_listen_unix(const char *path, int sock_flags, int *fd, struct stat *made)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	struct stat st;
	int s, r;

	*fd = -1;
	if (strlen(path) >= sizeof sa.sun_path)
		return bm_error(-ENAMETOOLONG, "%s: socket path longer than "
				"%zu bytes", path, sizeof sa.sun_path - 1);
	strcpy(sa.sun_path, path);
	r = clear_socket_path(&sa);
	if (r < 0)
		return r;
	s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | sock_flags, 0);
	if (s < 0)
		return bm_error(-errno, "socket: %s", strerror(errno));
	/* On Linux the file gets the mode of the socket's inode. */
	if (fchmod(s, 0600) < 0 ||
	    bind(s, (struct sockaddr *)&sa, sizeof sa) < 0) {
		r = bm_error(-errno, "%s: %s", path, strerror(errno));
		close(s);
		return r;
	}
	/* Should a kernel ignore the socket's mode, fix the file's (lstat
	 * first: never chmod through a symlink put in its place). */
	if (lstat(path, &st) < 0 || !S_ISSOCK(st.st_mode) ||
	    ((st.st_mode & 0777) != 0600 && chmod(path, 0600) < 0))
		r = bm_error(-EPERM, "%s: cannot make the socket mode 0600",
			     path);
	else if (listen(s, BACKLOG) < 0)
		r = bm_error(-errno, "%s: listen: %s", path, strerror(errno));
	if (r < 0) {
		unlink(path);
		close(s);
		return r;
	}
	if (made)
		*made = st;
	*fd = s;
	return 0;
}

void
bm_format_inet(const struct sockaddr_storage *ss, char *out, size_t size)
{
	char host[INET6_ADDRSTRLEN] = "?";

	if (ss->ss_family == AF_INET6) {
		const struct sockaddr_in6 *s6 = (const void *)ss;

		inet_ntop(AF_INET6, &s6->sin6_addr, host, sizeof host);
		snprintf(out, size, "tcp:[%s]:%u", host,
			 (unsigned)ntohs(s6->sin6_port));
	} else {
		const struct sockaddr_in *s4 = (const void *)ss;

		inet_ntop(AF_INET, &s4->sin_addr, host, sizeof host);
		snprintf(out, size, "tcp:%s:%u", host,
			 (unsigned)ntohs(s4->sin_port));
	}
}

int
bm_listen_tcp(const char *host, const char *port, int sock_flags, int *fd,
	      char **address)
{
	struct addrinfo hints = {
		.ai_family = AF_UNSPEC,
		.ai_socktype = SOCK_STREAM,
		.ai_flags = AI_PASSIVE | AI_NUMERICSERV,
	};
	struct addrinfo *res;
	struct sockaddr_storage ss;
	socklen_t sl = sizeof ss;
	char bound[INET6_ADDRSTRLEN + 16];
	int s = -1, r, one = 1;

	*fd = -1;
	*address = NULL;
	r = getaddrinfo(host, port, &hints, &res);
	if (r)
		return bm_error(-EADDRNOTAVAIL, "%s: %s", host,
				gai_strerror(r));
	r = -EADDRNOTAVAIL;
	for (struct addrinfo *ai = res; ai && s < 0; ai = ai->ai_next) {
		s = socket(ai->ai_family,
			   ai->ai_socktype | SOCK_CLOEXEC | sock_flags,
			   ai->ai_protocol);
		if (s < 0) {
			r = -errno;
			continue;
		}
		setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
		if (bind(s, ai->ai_addr, ai->ai_addrlen) == 0 &&
		    listen(s, BACKLOG) == 0)
			break;
		r = -errno;
		close(s);
		s = -1;
	}
	freeaddrinfo(res);
	if (s < 0)
		return bm_error(r, "tcp:%s:%s: %s", host, port, strerror(-r));
	if (getsockname(s, (struct sockaddr *)&ss, &sl) < 0) {
		r = bm_error(-errno, "getsockname: %s", strerror(errno));
		close(s);
		return r;
	}
	bm_format_inet(&ss, bound, sizeof bound);
	*address = strdup(bound);
	if (!*address) {
		close(s);
		return bm_error(-ENOMEM, "out of memory");
	}
	*fd = s;
	return 0;
}
