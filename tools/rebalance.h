/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * bmirror rebalance: what the command (cmd-rebalance.c: reading the plan,
 * looking at the disks and pools, planning) hands to the executor
 * (rebalance-exec.c: running the moves).
 */
#ifndef BMIRROR_REBALANCE_H
#define BMIRROR_REBALANCE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "plan.h"

/* What cmd-rebalance.c found out about each disk of the plan. */
struct rb_disk {
	char *location;         /* its image now: an absolute path or a URI */
	uint64_t allocated;     /* bytes its file holds (st_blocks) */
	bool live;              /* served: moves through its control socket */
};

struct rb_options {
	unsigned max_parallel;  /* moves at once, >= 1 */
	uint64_t speed;         /* bytes/s shared by all moves, 0: unlimited */
	bool json;              /* one JSON object per event on stdout */
	bool bars;              /* a line per running move (a terminal) */
};

/*
 * Where a move puts its disk: for a directory pool the pool's directory
 * and the image's file name (or "NAME.raw" for a disk now on NBD), for an
 * NBD pool the pool's URI for the disk.  0, or -ENAMETOOLONG / -ENOMEM.
 */
int rb_destination(const struct bm_plan *plan, const struct rb_disk *disks,
		   const struct bm_plan_move *move, char *buf, size_t len);

/* The JSON "plan" event (also --dry-run --json's output); new reference. */
json_t *rb_plan_json(const struct bm_plan *plan,
			    const struct rb_disk *disks,
			    const struct bm_plan_move *moves, size_t n_moves);

/*
 * Run the moves (in plan order, at most max_parallel at once, a move
 * starting only when its destination pool has room for it), report
 * progress, and print the summary.  SIGINT and SIGTERM cancel the moves
 * that run and start no more.  Returns the exit status: EXIT_OK when every
 * move was done, EXIT_FAILED otherwise.
 */
int rb_execute(const struct bm_plan *plan, struct rb_disk *disks,
	       const struct bm_plan_move *moves, size_t n_moves,
	       const struct rb_options *options);

/* The subcommand (cmd-rebalance.c). */
int cmd_rebalance(int argc, char **argv);

#endif /* BMIRROR_REBALANCE_H */
