/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Fuzz target for the addresses and URIs blockmirror itself takes apart:
 * bm_nbd_is_uri (lib/nbd.c: is an image name an NBD URI or a path?),
 * bm_server_parse_address (lib/server-proto.c: `serve --nbd unix:PATH |
 * tcp:HOST:PORT`) and a rebalance pool's URI template expanded for a disk
 * name (tools/plan.c).  The input is the string; its first half is also
 * used as a disk name for the template.  Everything must stay within
 * the string and the fixed-size fields it fills.  libnbd parses the rest
 * of an NBD URI when it connects; that parser is libnbd's own.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "errors.h"
#include "nbd.h"
#include "plan.h"
#include "server.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct bm_server_address a;
	struct bm_plan_pool pool = { .name = (char *)"p" };
	char *s = malloc(size + 1), *name, *u;

	if (!s)
		return 0;
	memcpy(s, data, size);
	s[size] = '\0';
	bm_nbd_is_uri(s);
	if (bm_server_parse_address(s, &a) == 0) {
		/* Every field came back terminated and within bounds. */
		if (strnlen(a.path, sizeof a.path) == sizeof a.path ||
		    strnlen(a.host, sizeof a.host) == sizeof a.host ||
		    strnlen(a.port, sizeof a.port) == sizeof a.port ||
		    (a.unix_socket && !a.path[0]) ||
		    (!a.unix_socket && (!a.host[0] || !a.port[0])))
			abort();
	}
	name = strndup(s, size / 2);
	pool.uri = s;
	if (name) {
		u = bm_plan_pool_uri(&pool, name);
		if (u && !strstr(s, "{name}") && strcmp(u, s) != 0)
			abort();
		free(u);
	}
	free(name);
	free(s);
	bm_error_clear();
	return 0;
}
