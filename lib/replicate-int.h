/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Replication's primary side, shared by replicate.c (the handle, the
 * cycle, the thread, the API) and repl-send.c (what crosses to the
 * replica: data by the change record, by extents, by digests, and the
 * online verify).  Library-internal.
 */
#ifndef BM_REPLICATE_INT_H
#define BM_REPLICATE_INT_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include <jansson.h>

#include <blockmirror/blockmirror.h>

#include "repl-state.h"

#define CHECKPOINT_PREFIX "repl-"
/* A control call's deadline (BLOCKMIRROR_REPL_TIMEOUT seconds, default
 * 30), and a commit's or a promotion's, which sync and merge: four. */
#define CALL_MS bm_repl_call_ms()
#define COMMIT_MS (4 * bm_repl_call_ms())
#define DIGEST_BATCH 4096       /* granules per digests call */
#define IDLE_RECONNECT_MS (5 * 60 * 1000) /* under the replica's 10 */
#define SLOTS 32                /* NBD writes in flight */
#define SLOT_BYTES (256 * 1024)

/* ---- the handle -------------------------------------------------------- */

struct blockmirror_replication {
	struct blockmirror_disk *disk;
	struct blockmirror_replication_options o;
	char *replica, *psk, *identity, *state_path;
	uint64_t size, granule;      /* the replica's granule for digests */
	/* The cycle's snapshot chunk, at which the disk's record keeps a
	 * fine bitmap for us (bm_checkpoint_keep_fine); 0: neither. */
	uint64_t fine;

	pthread_t thread;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	bool stop;
	bool failover;               /* asked for: the next cycle is last */
	uint64_t sync_asked;         /* requests (counter) */
	int64_t sync_ask_ns;         /* the newest request's time (realtime) */
	int failover_err;
	bool failover_done;
	unsigned waiters;            /* in sync, verify or failover */
	bool joined;                 /* halt joined the thread */

	/* under lock */
	struct bm_repl_state st;
	struct blockmirror_replication_info info;

	/* the thread's own */
	struct bm_chan *chan;
	bool resync;                 /* the next cycle compares digests */
	bool base_zero;              /* the replica's disk reads as zeroes */
	bool refused;                /* the last begin was refused for good */
	bool promote_unknown;        /* a promote got no answer */
	uint64_t chan_used_ms;       /* the channel's last use */
	uint64_t replica_latest;
	char since[64];              /* checkpoint for the next cycle */
	int64_t last_app_ns;
	/* Granules (the replica's) a verify found different: the next
	 * cycle sends them too. */
	uint64_t *resend;
	uint64_t nresend;
	/* verify, asked from another thread (under lock) */
	bool verify_asked, verify_done;
	int verify_err;
	char verify_msg[256];
	struct blockmirror_replication_check check;
};

/* One cycle's data on its way to the replica's staging export: SLOTS
 * reads of the snapshot and writes to the replica in flight, each with
 * its own buffer.  A slot is busy from slot_get until its write (or the
 * read before it) ends; `reading` while its snapshot read runs, `ready`
 * once that is done and the sender thread has still to write it. */
struct bm_repl_slot {
	struct bm_repl_sender *s;
	uint8_t *buf;
	uint64_t off, len;
	int rerr;                     /* the read's */
	bool busy, reading, ready;
};

struct bm_repl_sender {
	struct blockmirror_replication *r;
	struct blockmirror_snapshot *snap;
	struct blockmirror_disk *target;
	const char *uri;
	struct bm_repl_slot slots[SLOTS];
	uint8_t *bufs;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	unsigned busy;
	int err;
	char msg[256];
	uint64_t sent;                /* bytes written (data and zeroes) */
	bool drop;                    /* a CHANGED_ONLY snapshot: let go of
					 what is read (ranges ascend) */
	uint64_t dropped_to;          /* bm_snapshot_drop_behind's */
	uint64_t read_to;             /* the end of the last read asked */
	uint64_t *theirs;             /* digests mode: the replica's batch */
	uint64_t theirs_first, theirs_n;
	uint64_t zero_digest, zero_tail;
};

/* A control call's deadline in ms (BLOCKMIRROR_REPL_TIMEOUT). */
int bm_repl_call_ms(void);
/* Replication is being halted (any thread). */
bool bm_repl_stopping(struct blockmirror_replication *r);
/* A control call that a halt cuts short (-ECANCELED). */
int bm_repl_call(struct blockmirror_replication *r, json_t *req,
		 json_t **res, int timeout_ms);
/* K of checkpoint "repl-K", 0 for another name. */
uint64_t bm_repl_checkpoint_point(const char *name);

/* "tcp:HOST:PORT" or "unix:PATH" and an export as an NBD URI (TLS over
 * TCP, with the replication's key file and identity); NULL: no memory. */
char *bm_repl_nbd_uri(struct blockmirror_replication *r, const char *addr,
		      const char *export);
/* Open the staging export `uri` for the snapshot's data; close it
 * (drained and flushed by the disk's close) with the cycle's result. */
int bm_repl_sender_open(struct bm_repl_sender *s,
			struct blockmirror_replication *r,
			struct blockmirror_snapshot *snap, const char *uri);
int bm_repl_sender_close(struct bm_repl_sender *s, int r);
/* Wait for the writes in flight: 0 or the first error. */
int bm_repl_drain(struct bm_repl_sender *s);
/* The granules written since the snapshot's checkpoint. */
int bm_repl_send_changed(struct bm_repl_sender *s);
/* Every data extent (onto a replica that reads as zeroes). */
int bm_repl_send_full(struct bm_repl_sender *s);
/* Granules whose XXH3-64 differs from the replica's latest point's
 * (*differ: their bytes). */
int bm_repl_send_differing(struct bm_repl_sender *s, uint64_t *differ);
/* The granules a verify found different, or the replica's disk was
 * written in after a split brain (r->resend). */
int bm_repl_send_resend(struct bm_repl_sender *s);
/* After a split brain: the granules the replica's disk was written in
 * after the fork, added to r->resend (op divergent), on the thread. */
int bm_repl_fetch_divergent(struct blockmirror_replication *r);
/* Online verify (blockmirror_replication_verify), on the thread. */
int bm_repl_verify(struct blockmirror_replication *r,
		   struct blockmirror_replication_check *c);

#endif /* BM_REPLICATE_INT_H */
