/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The replica store's insides, shared by its files: the handle and the
 * state (replica.c, which holds the design comment), the calls made
 * with them (replica-cycle.c), and the image operations (replica-image.c:
 * creating layers, syncing them, merging a layer into the one below it,
 * re-pointing an overlay, digests; each a blocking call on the store's
 * private loop, returning 0 or a negative errno with a message naming
 * the image).
 */
#ifndef BM_REPLICA_INT_H
#define BM_REPLICA_INT_H

#include <limits.h>
#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <blockmirror/blockmirror.h>

#include "replica.h"

struct bm_loop;

/* ---- image operations (replica-image.c) ------------------------------- */

/* A new sparse raw image of `size` bytes, durable. */
int bm_replica_image_raw(struct bm_loop *loop, const char *path,
			 uint64_t size);

/* A new empty qcow2 overlay of `backing` (absolute, in `fmt`), durable
 * (an existing file at `path` is replaced). */
int bm_replica_image_overlay(struct bm_loop *loop, const char *path,
			     uint64_t size, const char *backing,
			     enum blockmirror_format fmt, uint32_t cluster);

/* What an existing image is: its format (probed if *fmt is AUTO, else
 * that one) and size; -EINVAL if it has a backing file. */
int bm_replica_image_probe(struct bm_loop *loop, const char *path,
			   enum blockmirror_format *fmt, uint64_t *size);

/* Make a file's data (and its name) durable. */
int bm_replica_image_sync(const char *path);

/*
 * Copy what the overlay `upper` allocates itself (data and zero
 * clusters, not what it leaves to its backing file) into `lower` (in
 * `fmt`), and flush `lower`.  *written: data bytes copied (zeroes are
 * not counted); *alloc: bytes `upper` allocates.
 */
int bm_replica_image_merge(struct bm_loop *loop, const char *upper,
			   const char *lower, enum blockmirror_format fmt,
			   uint64_t *written, uint64_t *alloc);

/* Make the overlay `path` name `backing` (which reads as its current
 * backing file), crash-safely (blockmirror_disk_set_backing). */
int bm_replica_image_repoint(const char *path, const char *backing,
			     enum blockmirror_format fmt);

/* XXH3-64 of each granule `g` of the image in [offset, offset + len),
 * the range checked by the caller. */
int bm_replica_image_digests(struct bm_loop *loop, const char *path,
			     enum blockmirror_format fmt, uint32_t g,
			     uint64_t offset, uint64_t len, uint64_t *out);

/* ---- the store (replica.c) -------------------------------------------- */

/* Points pinned at once (test overlays included): each may hold two
 * layers of the chain (its own, and one a merge waits to fold), and a
 * chain has at most 32 backing files (backing.c): 1 + BM_REPLICA_MAX_KEEP
 * + 2 * 7 + a staging or test overlay stays below. */
#define BM_REPLICA_MAX_PINS 7

struct bm_replica_entry {
	uint64_t number;
	int64_t instant_ns, committed_ns;
	uint64_t bytes;
	uint64_t bytes_since;          /* and of the cycles dropped since
					  the point before */
	bool app_consistent;
	bool test_overlay;
	bool retained;                 /* as the last tidy chose */
	char gen[37];
	uint64_t layer;                /* the layer id it owns */
};

/* What replica.json holds. */
struct bm_replica_state {
	uint64_t size;
	uint32_t g;
	bool primary;
	bool promoting;                /* promote's merges not done yet */
	struct bm_replica_gen gen;
	struct bm_replica_policy policy;
	char base[NAME_MAX + 1];       /* a name in DIR */
	enum blockmirror_format base_fmt;
	uint64_t next_layer;
	uint64_t *layers;              /* ids, bottom first; 0: the base */
	size_t nlayers;
	struct bm_replica_entry *points; /* oldest first */
	size_t npoints;
};

struct bm_replica {
	pthread_mutex_t lock;
	char *dir;                     /* canonical */
	char *base;                    /* DIR/base name */
	int lockfd;
	struct bm_loop *loop;
	struct bm_replica_state st;
	struct { uint64_t point; unsigned n; } pins[BM_REPLICA_MAX_PINS];
	bool cycle;
	uint64_t cycle_point, cycle_layer;
	char cycle_gen[37];
	struct bm_replica_stats stats;
};

/* DIR/layer-NNNNNNNN.qcow2, or the base for id 0; and its format. */
void bm_replica_layer_path(const struct bm_replica *r, uint64_t id, char *out,
			   size_t len);
enum blockmirror_format bm_replica_layer_fmt(const struct bm_replica *r,
					     uint64_t id);
/* DIR/test-NNNNNNNN.qcow2, point's test overlay. */
void bm_replica_test_path(const struct bm_replica *r, uint64_t point,
			  char *out, size_t len);
/* A layer's cluster size for granularity g. */
uint32_t bm_replica_cluster(uint32_t g);
bool bm_replica_is_uuid(const char *s);
void bm_replica_new_uuid(char out[37]);

/* Point `number` (0: the latest), or NULL; the -ENOENT message. */
struct bm_replica_entry *bm_replica_find(struct bm_replica *r,
					 uint64_t number);
int bm_replica_no_point(struct bm_replica *r, uint64_t number);

/* A point's pin count (added if `add` and missing), or NULL; pinned:
 * by a pin or a test overlay. */
unsigned *bm_replica_pin_slot(struct bm_replica *r, uint64_t point, bool add);
bool bm_replica_pinned(struct bm_replica *r,
		       const struct bm_replica_entry *p);

/* Mark the points the policy retains (and the latest). */
void bm_replica_choose_retained(struct bm_replica *r);

/* Write the state changed in memory, durably; on failure memory goes
 * back to what the file holds. */
int bm_replica_save(struct bm_replica *r);

/* Retention, then the merges it allows (not while a cycle is open). */
int bm_replica_tidy(struct bm_replica *r);

/* Remove the files of the store's names that the state does not list. */
void bm_replica_sweep(struct bm_replica *r);

#endif /* BM_REPLICA_INT_H */
