/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Which NBD URIs name a disk's own exports.
 *
 * A move whose destination is the export of the very disk it moves would
 * mirror every write back into the disk through the network: the job
 * writes the export, the server writes the disk, the job mirrors that
 * write again.  blockmirror_job_start asks bm_server_is_own_export()
 * first and refuses such a destination.
 *
 * Every running server registers here (a process-wide list under a
 * mutex; servers start and stop rarely).  A URI names a server when:
 *
 *   nbd+unix, nbds+unix  its socket= file is the server's socket (same
 *                        device and inode);
 *   nbd, nbds            its port is the server's port and its host
 *                        resolves to an address of this machine (one a
 *                        socket can bind to).
 *
 * The URI is only read here, never trusted further: a name that cannot
 * be parsed names no server, and opening it fails later on its own.
 */
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "server-int.h"

#define NBD_DEFAULT_PORT "10809"

struct entry {
	struct blockmirror_server *s;
	struct entry *next;
};

static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static struct entry *registry;

void
bm_server_register(struct blockmirror_server *s)
{
	struct entry *e = malloc(sizeof *e);

	/* Out of memory: the check is lost, not the server. */
	if (!e)
		return;
	e->s = s;
	pthread_mutex_lock(&registry_lock);
	e->next = registry;
	registry = e;
	pthread_mutex_unlock(&registry_lock);
}

void
bm_server_unregister(struct blockmirror_server *s)
{
	pthread_mutex_lock(&registry_lock);
	for (struct entry **pp = &registry; *pp; pp = &(*pp)->next) {
		if ((*pp)->s == s) {
			struct entry *e = *pp;

			*pp = e->next;
			free(e);
			break;
		}
	}
	pthread_mutex_unlock(&registry_lock);
}

static int
hexval(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/* Percent-decode [p, p + n) into out (size > n); false if malformed. */
static bool
decode(const char *p, size_t n, char *out, size_t size)
{
	size_t o = 0;

	if (n >= size)
		return false;
	for (size_t i = 0; i < n; i++) {
		if (p[i] == '%') {
			int hi, lo;

			if (i + 2 >= n)
				return false;
			hi = hexval(p[i + 1]);
			lo = hexval(p[i + 2]);
			if (hi < 0 || lo < 0)
				return false;
			out[o++] = (char)(hi * 16 + lo);
			i += 2;
		} else {
			out[o++] = p[i];
		}
	}
	out[o] = '\0';
	return strlen(out) == o; /* no NUL smuggled in */
}

/* The socket= parameter of a Unix-socket URI. */
static bool
unix_socket_of(const char *uri, char *out, size_t size)
{
	const char *q = strchr(uri, '?');

	while (q) {
		const char *param = q + 1;
		size_t n = strcspn(param, "&#");

		if (strncmp(param, "socket=", 7) == 0)
			return decode(param + 7, n - 7, out, size);
		q = param[n] == '&' ? param + n : NULL;
	}
	return false;
}

/* Host and port of a TCP URI (port defaulted). */
static bool
tcp_host_port(const char *uri, char *host, size_t hsize, char *port,
	      size_t psize)
{
	const char *a = strstr(uri, "://"), *end, *at, *colon;
	size_t n;

	if (!a)
		return false;
	a += 3;
	n = strcspn(a, "/?#");
	end = a + n;
	at = memchr(a, '@', n);
	if (at)
		a = at + 1;
	if (*a == '[') {
		const char *rb = memchr(a, ']', (size_t)(end - a));

		if (!rb || (size_t)(rb - a - 1) >= hsize)
			return false;
		memcpy(host, a + 1, (size_t)(rb - a - 1));
		host[rb - a - 1] = '\0';
		colon = rb + 1 < end && rb[1] == ':' ? rb + 1 : NULL;
	} else {
		colon = memchr(a, ':', (size_t)(end - a));
		n = (size_t)((colon ? colon : end) - a);
		if (!decode(a, n, host, hsize))
			return false;
	}
	if (colon && colon + 1 < end) {
		n = (size_t)(end - colon - 1);
		if (n >= psize)
			return false;
		memcpy(port, colon + 1, n);
		port[n] = '\0';
	} else {
		snprintf(port, psize, "%s", NBD_DEFAULT_PORT);
	}
	if (!*host)
		snprintf(host, hsize, "localhost");
	return true;
}

/* Does `host` resolve to an address of this machine? */
static bool
host_is_local(const char *host)
{
	struct addrinfo hints = { .ai_socktype = SOCK_DGRAM };
	struct addrinfo *res, *ai;
	bool local = false;

	if (getaddrinfo(host, NULL, &hints, &res) != 0)
		return false;
	for (ai = res; ai && !local; ai = ai->ai_next) {
		int fd = socket(ai->ai_family, SOCK_DGRAM | SOCK_CLOEXEC, 0);

		if (fd < 0)
			continue;
		/* Port 0 of the address: binding works only for ours. */
		if (ai->ai_family == AF_INET)
			((struct sockaddr_in *)ai->ai_addr)->sin_port = 0;
		else if (ai->ai_family == AF_INET6)
			((struct sockaddr_in6 *)ai->ai_addr)->sin6_port = 0;
		local = bind(fd, ai->ai_addr, ai->ai_addrlen) == 0;
		close(fd);
	}
	freeaddrinfo(res);
	return local;
}

static int
server_port(const struct blockmirror_server *s)
{
	struct sockaddr_storage ss;
	socklen_t len = sizeof ss;

	if (getsockname(s->fd, (struct sockaddr *)&ss, &len) < 0)
		return -1;
	if (ss.ss_family == AF_INET)
		return ntohs(((struct sockaddr_in *)&ss)->sin_port);
	if (ss.ss_family == AF_INET6)
		return ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
	return -1;
}

bool
bm_server_is_own_export(struct blockmirror_disk *disk, const char *uri)
{
	char sock[4096], host[256], port[16];
	bool is_unix = strstr(uri, "+unix://") != NULL;
	bool found = false, local_known = false, local = false;
	struct stat want, st;

	if (is_unix) {
		if (!unix_socket_of(uri, sock, sizeof sock) ||
		    stat(sock, &want) < 0)
			return false;
	} else if (!tcp_host_port(uri, host, sizeof host, port,
				  sizeof port)) {
		return false;
	}
	pthread_mutex_lock(&registry_lock);
	for (struct entry *e = registry; e && !found; e = e->next) {
		const struct blockmirror_server *s = e->s;

		if (s->disk != disk || s->tcp == is_unix)
			continue;
		if (is_unix) {
			found = s->unix_path && stat(s->unix_path, &st) == 0 &&
				st.st_dev == want.st_dev &&
				st.st_ino == want.st_ino;
			continue;
		}
		if (server_port(s) != atoi(port))
			continue;
		if (!local_known) {
			local = host_is_local(host);
			local_known = true;
		}
		found = local;
	}
	pthread_mutex_unlock(&registry_lock);
	return found;
}
