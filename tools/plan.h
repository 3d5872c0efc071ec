/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The rebalance plan (docs/rebalance.md, docs/plan.schema.json): parsing a
 * plan file and choosing the moves that reach its goal.  Everything here
 * is pure: no I/O, no clock, no globals, so the unit tests
 * (tests/unit/test-plan.c) and a fuzzer can call it directly.  Looking at
 * the world (which pool a disk lives in, how big it is, how full a file
 * system is) is the caller's job (tools/cmd-rebalance.c); it fills in the
 * "resolved" fields before calling bm_plan_compute.
 */
#ifndef BMIRROR_PLAN_H
#define BMIRROR_PLAN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct bm_plan_pool {
	char *name;
	char *path;             /* a directory, or NULL */
	char *uri;              /* an NBD URI ("{name}" is the disk's name) */
	uint64_t capacity;      /* bytes; 0 if not given (take statvfs) */
	uint64_t reserved;      /* bytes used by what is not a plan disk */
	bool reserved_given;
	double weight;          /* > 0, default 1 */
};

struct bm_plan_disk {
	char *name;
	char *control;          /* a served disk's control socket, or NULL */
	char *image;            /* an unused image, or NULL */
	/* Resolved by the caller before planning: */
	uint64_t size;          /* virtual size in bytes */
	int pool;               /* index of the pool it lives in */
};

enum bm_plan_goal {
	BM_PLAN_BALANCE = 1,    /* even the used fraction within a tolerance */
	BM_PLAN_EVACUATE = 2,   /* move every disk off one pool */
	BM_PLAN_MOVES = 3,      /* the moves the plan lists */
};

/* One explicit move of the "moves" goal. */
struct bm_plan_request {
	int disk;
	int pool;
};

struct bm_plan {
	struct bm_plan_pool *pools;
	size_t n_pools;
	struct bm_plan_disk *disks;
	size_t n_disks;
	enum bm_plan_goal goal;
	double tolerance;       /* balance: a fraction of each pool's capacity */
	int evacuate;           /* evacuate: the pool to empty */
	struct bm_plan_request *requests;
	size_t n_requests;
};

struct bm_plan_move {
	int disk;
	int from;
	int to;
	uint64_t bytes;         /* the disk's size */
};

/*
 * Parse a plan from JSON text.  Names (of pools in the goal, of disks and
 * pools in explicit moves) are resolved to indices; sizes may be numbers
 * or strings like "256M".  Returns 0, or -EINVAL with a message in err
 * naming the problem ("pool 'slow': capacity ...").  On failure *plan is
 * left empty; on success free it with bm_plan_free.
 */
int bm_plan_parse(const char *text, size_t len, struct bm_plan *plan,
		  char *err, size_t errlen);

/* Free what bm_plan_parse allocated.  Accepts an empty plan. */
void bm_plan_free(struct bm_plan *plan);

/*
 * Each pool's used bytes before any move: its reserved bytes plus the
 * sizes of the plan's disks that live in it.  `used` has n_pools entries.
 */
void bm_plan_usage(const struct bm_plan *plan, uint64_t *used);

/*
 * Choose the moves that reach the plan's goal, in an order in which
 * running them one after another never puts more into a pool than its
 * capacity (a destination's space counts from the start of a move, a
 * source's is freed when it ends).  Each disk moves at most once.
 *
 * Returns 0 and stores a new array (free()) of *n_moves moves, possibly
 * none; or -ENOSPC (a pool is over capacity, or the goal cannot be
 * reached without overfilling one), -EINVAL (a bad plan) with a message
 * in err.  Pure.
 */
int bm_plan_compute(const struct bm_plan *plan, struct bm_plan_move **moves,
		    size_t *n_moves, char *err, size_t errlen);

/* Expand an NBD pool's URI for a disk: "{name}" becomes the disk's name.
 * Returns a new string (free()) or NULL. */
char *bm_plan_pool_uri(const struct bm_plan_pool *pool, const char *disk);

#endif /* BMIRROR_PLAN_H */
