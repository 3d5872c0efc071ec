/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * A primary's side of a replication pairing, in a small JSON file next to
 * its disk (IMAGE.bmirror-repl by default): its generation identifier and
 * the generations it descends from (each with the point where it forked),
 * the fencing token its replica gave it, the last point the replica
 * committed, and, once a planned failover made the replica the primary,
 * the generation that fenced it.  Written whole and durably
 * (bm_durable_write_file).  replicate.c keeps it; replica-serve.c writes
 * the new primary's at a promotion and reads the old primary's when its
 * disk is adopted as a replica.
 */
#ifndef BM_REPL_STATE_H
#define BM_REPL_STATE_H

#include <stdint.h>

#define BM_REPL_MAX_HISTORY 8

struct bm_repl_history {
	char gen[37];
	uint64_t point;
};

struct bm_repl_state {
	char gen[37];
	/* the generations this disk descends from, each with the point
	 * where this line forked from it */
	struct bm_repl_history history[BM_REPL_MAX_HISTORY];
	unsigned nhistory;
	char token[80];                      /* the replica's, "" none */
	uint64_t committed;                  /* 0: none */
	int64_t committed_instant_ns;
	char fenced_by[37];                  /* failed over: the new gen */
};

/* A new random generation identifier (a UUID, lower case). */
void bm_repl_new_uuid(char out[37]);

/* -ENOENT (no message) if there is no file; -EINVAL naming the file and
 * the field if it is not one of ours. */
int bm_repl_state_load(const char *path, struct bm_repl_state *st);
int bm_repl_state_save(const char *path, const struct bm_repl_state *st);

#endif /* BM_REPL_STATE_H */
