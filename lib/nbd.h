/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The NBD client store: an NBD export reached with libnbd, driven from
 * the loop (libnbd's socket polled through the ring).  See nbd.c.
 *
 * The store follows store.h.  In addition: requests larger than the
 * server takes are split; at most 64 commands and 64 MiB are handed to
 * libnbd at once (the rest waits in the store); a server that answers
 * nothing for bm_nbd_timeout() seconds while requests wait on it is
 * declared dead: those requests fail with -ETIMEDOUT, the cancel op does
 * the same at once with -ECANCELED, and every later request fails with
 * -EIO ("server is gone"), as after a server that dropped the
 * connection.  Whenever the caller has nothing outstanding, the store has
 * nothing armed on its loop.  One connection per store, unless opened for
 * a bulk copy (BM_OPEN_MULTI_CONN) on a server that advertises multi-conn:
 * then up to 4, requests spread across them; losing any one of them is
 * losing the server.  Of writes flagged BM_IO_WRITEBACK | BM_IO_EVICT (an
 * offline copy's), one in every 64 MiB also waits for a flush, the
 * nearest NBD has to "write it back now".
 */
#ifndef BM_NBD_H
#define BM_NBD_H

#include <stdbool.h>
#include <stdint.h>

#include "store.h"

/* Does `name` look like an NBD URI (nbd:, nbds:, nbd+unix:, nbds+unix:)?
 * Anything else is a path.  vsock URIs are not accepted. */
bool bm_nbd_is_uri(const char *name);

/*
 * Connect to `uri` (blocking, bounded by the timeout) and make a store on
 * `loop`.  flags: BM_OPEN_WRITE, BM_OPEN_MULTI_CONN (others are ignored).
 * With BM_OPEN_MULTI_CONN and a server that advertises multi-conn, up to
 * 4 connections (BLOCKMIRROR_NBD_CONNECTIONS, 1 to 4, sets how many), all
 * made here, in parallel; extra connections the server closes, or leaves
 * waiting for longer than the first took (4 times over, at least 1 s),
 * are given up and the store works with those it got.  URIs may carry
 * tls-psk-file= and tls-certificates=.  store->align is the server's
 * minimum block size, store->allocated is UINT64_MAX (unknown).  Errors
 * name the URI: -EINVAL (a bad URI), -ENOENT (no such socket or export),
 * -ECONNREFUSED, -ETIMEDOUT, -EPROTO, -EROFS (a read-only export opened
 * for writing).  The store may be moved to another loop (store->loop)
 * while nothing is in flight.
 */
int bm_nbd_open(struct bm_loop *loop, const char *uri, unsigned flags,
		struct bm_store **out);

/* Seconds after which a server that answers nothing is declared dead, and
 * the bound on connecting (BLOCKMIRROR_NBD_TIMEOUT overrides the default
 * of 30). */
unsigned bm_nbd_timeout(void);

/* For tests: the connections an NBD store has (0 for other stores). */
unsigned bm_nbd_connections(struct bm_store *s);

#endif /* BM_NBD_H */
