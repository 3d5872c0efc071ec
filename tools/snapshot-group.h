/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * A consistency group's snapshot across several bmirror serve processes
 * (snapshot-group.c, docs/control.md "Consistency groups").
 */
#ifndef BMIRROR_SNAPSHOT_GROUP_H
#define BMIRROR_SNAPSHOT_GROUP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

/*
 * Take one instant across the servers at `controls` (n of them, n >= 2):
 * reqs[i] holds the snapshot members for controls[i] (export, scratch,
 * since, ...; lease_ms is added).  `group` names the group (NULL: one is
 * made up); each server holds for at most `lease_ms`, and has
 * `answer_ms` to answer a take, a commit or an abort.  Prints each
 * server's export and URI and the group's instant (or one JSON object),
 * and returns EXIT_OK; or prints what failed, naming the server, leaves
 * no snapshot of the group, and returns EXIT_FAILED.
 */
int snapshot_group(const char *const *controls, json_t *const *reqs, size_t n,
		   const char *group, uint32_t lease_ms, uint32_t answer_ms,
		   bool json);

#endif /* BMIRROR_SNAPSHOT_GROUP_H */
