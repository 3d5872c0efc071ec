/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Listening sockets for the library's servers (the NBD server, the
 * replication channel): a Unix socket file that is private from its
 * first instant and never replaces anything but a stale socket, and a
 * TCP socket whose bound address can be read back.  Both return 0 or a
 * negative errno with the error message set.
 */
#ifndef BM_LISTEN_H
#define BM_LISTEN_H

#include <stddef.h>
#include <sys/socket.h>
#include <sys/stat.h>

/*
 * Listen on a Unix socket at path, mode 0600 from bind on.  A stale
 * socket there (nobody answers) is replaced; a live one (-EADDRINUSE)
 * or anything else (-EEXIST) is left alone.  sock_flags are added to
 * socket()'s type (SOCK_NONBLOCK).  *made: the file's identity, to
 * remove only that file later (NULL: not wanted).
 */
int bm_listen_unix(const char *path, int sock_flags, int *fd,
		   struct stat *made);

/*
 * Listen on host:port (numeric port; "0": any).  *address: as bound,
 * "tcp:127.0.0.1:40123" or "tcp:[::1]:40123" (malloc'd, the caller's).
 */
int bm_listen_tcp(const char *host, const char *port, int sock_flags,
		  int *fd, char **address);

/* "tcp:ADDR:PORT" of an IPv4 or IPv6 socket address ([ADDR] for v6). */
void bm_format_inet(const struct sockaddr_storage *ss, char *out,
		    size_t size);

#endif /* BM_LISTEN_H */
