/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The replica store's calls (replica.h): queries, cycles, pins, test
 * overlays, digests, promote.  Each takes the handle's lock, works on the
 * state in memory and writes it with bm_replica_save before anything that
 * depends on it (the design, and why each order is crash-safe, is on top
 * of replica.c).
 */
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "durable.h"
#include "errors.h"
#include "internal.h"
#include "replica-int.h"
#include "replica.h"

static int64_t
now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* The calls that name a point (and hand out an image), under the lock. */
static int
locked_image(struct bm_replica *r, uint64_t point, char **image,
	     int (*fn)(struct bm_replica *, uint64_t, char **))
{
	int err;

	pthread_mutex_lock(&r->lock);
	*image = NULL;
	err = fn(r, point, image);
	pthread_mutex_unlock(&r->lock);
	return err;
}

static int
locked_point(struct bm_replica *r, uint64_t point,
	     int (*fn)(struct bm_replica *, uint64_t))
{
	int err;

	pthread_mutex_lock(&r->lock);
	err = fn(r, point);
	pthread_mutex_unlock(&r->lock);
	return err;
}

/* A tidy that fails after the change that called it is not that call's
 * failure: the next tidy goes on from where it stopped. */
static void
tidy_or_warn(struct bm_replica *r, const char *after)
{
	if (bm_replica_tidy(r) < 0)
		bm_warn("%s: tidying after %s: %s", r->dir, after,
			blockmirror_last_error());
}

/* ---- queries ---------------------------------------------------------- */

uint64_t
bm_replica_size(struct bm_replica *r)
{
	return r->st.size;
}

uint32_t
bm_replica_granularity(struct bm_replica *r)
{
	return r->st.g;
}

const char *
bm_replica_role(struct bm_replica *r)
{
	return r->st.primary ? "primary" : "replica";
}

const char *
bm_replica_base(struct bm_replica *r)
{
	return r->base;
}

int
bm_replica_get_gen(struct bm_replica *r, struct bm_replica_gen *gen)
{
	pthread_mutex_lock(&r->lock);
	*gen = r->st.gen;
	pthread_mutex_unlock(&r->lock);
	return 0;
}

void
bm_replica_get_stats(struct bm_replica *r, struct bm_replica_stats *s)
{
	pthread_mutex_lock(&r->lock);
	*s = r->stats;
	pthread_mutex_unlock(&r->lock);
}

int
bm_replica_set_policy(struct bm_replica *r, const struct bm_replica_policy *p)
{
	struct bm_replica_policy old;
	int err;

	if (p->keep > BM_REPLICA_MAX_KEEP)
		return bm_error(-EINVAL, "%s: keep %u: at most %d older points "
				"are kept", r->dir, p->keep,
				BM_REPLICA_MAX_KEEP);
	pthread_mutex_lock(&r->lock);
	old = r->st.policy;
	r->st.policy = *p;
	err = bm_replica_save(r);
	if (err < 0)
		r->st.policy = old;
	pthread_mutex_unlock(&r->lock);
	return err;
}

int
bm_replica_points(struct bm_replica *r, struct bm_replica_point **list,
		  size_t *n)
{
	struct bm_replica_point *v;

	pthread_mutex_lock(&r->lock);
	*list = NULL;
	*n = 0;
	v = calloc(r->st.npoints + 1, sizeof *v);
	if (!v) {
		pthread_mutex_unlock(&r->lock);
		return bm_error(-ENOMEM, "out of memory");
	}
	bm_replica_choose_retained(r);
	for (size_t i = 0; i < r->st.npoints; i++) {
		const struct bm_replica_entry *p = &r->st.points[i];

		v[i] = (struct bm_replica_point){
			.number = p->number, .instant_ns = p->instant_ns,
			.committed_ns = p->committed_ns, .bytes = p->bytes,
			.app_consistent = p->app_consistent,
			.retained = p->retained,
			.pinned = bm_replica_pinned(r, p),
			.latest = i + 1 == r->st.npoints,
		};
		memcpy(v[i].gen, p->gen, sizeof v[i].gen);
		bm_replica_layer_path(r, p->layer, v[i].image,
				      sizeof v[i].image);
	}
	*list = v;
	*n = r->st.npoints;
	pthread_mutex_unlock(&r->lock);
	return 0;
}

int
bm_replica_latest(struct bm_replica *r, uint64_t *point)
{
	int err = 0;

	pthread_mutex_lock(&r->lock);
	if (r->st.npoints)
		*point = r->st.points[r->st.npoints - 1].number;
	else
		err = bm_replica_no_point(r, 0);
	pthread_mutex_unlock(&r->lock);
	return err;
}

int
bm_replica_pending(struct bm_replica *r, uint64_t *point)
{
	int err = 0;

	pthread_mutex_lock(&r->lock);
	if (r->cycle)
		*point = r->cycle_point;
	else
		err = -ENOENT;
	pthread_mutex_unlock(&r->lock);
	return err;
}

/* ---- cycles ----------------------------------------------------------- */

static void tidy_or_warn(struct bm_replica *r, const char *after);

static int
begin(struct bm_replica *r, uint64_t point, const char *primary_gen,
      char **image)
{
	struct bm_replica_entry *latest = bm_replica_find(r, 0);
	char path[PATH_MAX], below[PATH_MAX];
	int err;

	if (r->st.primary)
		return bm_error(-EROFS, "%s: this replica has become a primary "
				"(generation %s): it takes no replication",
				r->dir, r->st.gen.current);
	if (r->cycle)
		return bm_error(-EBUSY, "%s: cycle %" PRIu64 " is open", r->dir,
				r->cycle_point);
	if (!bm_replica_is_uuid(primary_gen))
		return bm_error(-EINVAL, "%s: \"%s\" is not a generation "
				"(a UUID)", r->dir, primary_gen ? primary_gen
								: "");
	if (point == 0 || (latest && point <= latest->number))
		return bm_error(-EINVAL, "%s: point %" PRIu64 " is not above "
				"the latest (%" PRIu64 ")", r->dir, point,
				latest ? latest->number : 0);
	if (r->st.next_layer >= 100000000)
		return bm_error(-ENOSPC, "%s: out of layer names", r->dir);
	/* What a failed tidy left (a full disk may have room again). */
	tidy_or_warn(r, "the previous cycle");
	latest = bm_replica_find(r, 0);   /* the tidy may have moved it */
	r->cycle_layer = 0;
	if (latest) {
		r->cycle_layer = r->st.next_layer;
		bm_replica_layer_path(r, r->cycle_layer, path, sizeof path);
		bm_replica_layer_path(r, latest->layer, below, sizeof below);
		err = bm_replica_image_overlay(
			r->loop, path, r->st.size, below,
			bm_replica_layer_fmt(r, latest->layer),
			bm_replica_cluster(r->st.g));
		if (err < 0)
			return err;
	} else {
		snprintf(path, sizeof path, "%s", r->base);
	}
	*image = strdup(path);
	if (!*image) {
		if (latest)
			bm_durable_unlink(path);
		return bm_error(-ENOMEM, "out of memory");
	}
	r->cycle = true;
	r->cycle_point = point;
	memcpy(r->cycle_gen, primary_gen, sizeof r->cycle_gen);
	return 0;
}

int
bm_replica_begin(struct bm_replica *r, uint64_t point, const char *primary_gen,
		 char **image)
{
	int err;

	pthread_mutex_lock(&r->lock);
	*image = NULL;
	err = begin(r, point, primary_gen, image);
	pthread_mutex_unlock(&r->lock);
	return err;
}

static int
commit(struct bm_replica *r, int64_t instant_ns, uint64_t bytes,
       bool app_consistent)
{
	char path[PATH_MAX];
	struct bm_replica_entry *p;
	uint64_t *layers;
	int err;

	if (!r->cycle)
		return bm_error(-ENOENT, "%s: no cycle is open", r->dir);
	bm_replica_layer_path(r, r->cycle_layer, path, sizeof path);
	err = bm_replica_image_sync(path);
	if (err < 0)
		return err;
	layers = realloc(r->st.layers, (r->st.nlayers + 1) * sizeof *layers);
	p = realloc(r->st.points, (r->st.npoints + 1) * sizeof *p);
	if (layers)
		r->st.layers = layers;
	if (p)
		r->st.points = p;
	if (!layers || !p)
		return bm_error(-ENOMEM, "out of memory");
	p = &r->st.points[r->st.npoints++];
	*p = (struct bm_replica_entry){
		.number = r->cycle_point, .instant_ns = instant_ns,
		.committed_ns = now_ns(), .bytes = bytes, .bytes_since = bytes,
		.app_consistent = app_consistent, .retained = true,
		.layer = r->cycle_layer,
	};
	memcpy(p->gen, r->cycle_gen, sizeof p->gen);
	if (r->cycle_layer) {
		r->st.layers[r->st.nlayers++] = r->cycle_layer;
		r->st.next_layer++;
	}
	err = bm_replica_save(r);
	/* A sync that failed after the rename: the point may exist.  The
	 * state reread says; its image is then no staging to drop. */
	if (err < 0 && !bm_replica_find(r, r->cycle_point))
		return err;
	r->cycle = false;
	if (err < 0)
		return err;
	tidy_or_warn(r, "a commit");
	return 0;
}

int
bm_replica_commit(struct bm_replica *r, int64_t instant_ns, uint64_t bytes,
		  bool app_consistent)
{
	int err;

	pthread_mutex_lock(&r->lock);
	err = commit(r, instant_ns, bytes, app_consistent);
	pthread_mutex_unlock(&r->lock);
	return err;
}

int
bm_replica_abort(struct bm_replica *r)
{
	char path[PATH_MAX];
	int err = 0;

	pthread_mutex_lock(&r->lock);
	if (!r->cycle) {
		err = bm_error(-ENOENT, "%s: no cycle is open", r->dir);
	} else {
		r->cycle = false;
		if (r->cycle_layer) {
			bm_replica_layer_path(r, r->cycle_layer, path,
					      sizeof path);
			err = bm_durable_unlink(path);
		}
	}
	pthread_mutex_unlock(&r->lock);
	return err;
}

/* ---- pins and test overlays ------------------------------------------ */

/* May `p` be pinned (once more)?  Each pinned point may hold layers of
 * the chain, whose depth is bounded. */
static int
may_pin(struct bm_replica *r, const struct bm_replica_entry *p)
{
	unsigned n = 0;

	if (bm_replica_pinned(r, p))
		return 0;
	for (size_t i = 0; i < r->st.npoints; i++)
		n += bm_replica_pinned(r, &r->st.points[i]);
	if (n >= BM_REPLICA_MAX_PINS)
		return bm_error(-EMFILE, "%s: point %" PRIu64 ": %u points are "
				"pinned or under test overlays already, the "
				"most a chain allows", r->dir, p->number, n);
	return 0;
}

static int
pin(struct bm_replica *r, uint64_t point, char **image)
{
	struct bm_replica_entry *p = bm_replica_find(r, point);
	char path[PATH_MAX];
	unsigned *n;
	int err;

	if (!p)
		return bm_replica_no_point(r, point);
	err = may_pin(r, p);
	if (err < 0)
		return err;
	n = bm_replica_pin_slot(r, p->number, true);
	if (!n)
		return bm_error(-EMFILE, "%s: too many pins", r->dir);
	if (image) {
		bm_replica_layer_path(r, p->layer, path, sizeof path);
		*image = strdup(path);
		if (!*image)
			return bm_error(-ENOMEM, "out of memory");
	}
	(*n)++;
	return 0;
}

static int
unpin(struct bm_replica *r, uint64_t point)
{
	struct bm_replica_entry *p = bm_replica_find(r, point);
	unsigned *n = p ? bm_replica_pin_slot(r, p->number, false) : NULL;

	if (!n)
		return bm_error(-ENOENT, "%s: point %" PRIu64 " is not pinned",
				r->dir, point);
	if (--*n == 0)
		tidy_or_warn(r, "an unpin");
	return 0;
}

int
bm_replica_pin(struct bm_replica *r, uint64_t point, char **image)
{
	return locked_image(r, point, image, pin);
}

int
bm_replica_unpin(struct bm_replica *r, uint64_t point)
{
	return locked_point(r, point, unpin);
}

static int
test_overlay(struct bm_replica *r, uint64_t point, char **image)
{
	struct bm_replica_entry *p = bm_replica_find(r, point);
	char path[PATH_MAX], below[PATH_MAX];
	int err;

	if (!p)
		return bm_replica_no_point(r, point);
	bm_replica_test_path(r, p->number, path, sizeof path);
	if (p->test_overlay)
		return bm_error(-EEXIST, "%s: point %" PRIu64 " has a test "
				"overlay already: %s", r->dir, p->number, path);
	err = may_pin(r, p);
	if (err < 0)
		return err;
	bm_replica_layer_path(r, p->layer, below, sizeof below);
	err = bm_replica_image_overlay(r->loop, path, r->st.size, below,
				       bm_replica_layer_fmt(r, p->layer),
				       bm_replica_cluster(r->st.g));
	if (err < 0)
		return err;
	p->test_overlay = true;
	err = bm_replica_save(r);
	if (err == 0 && !(*image = strdup(path)))
		err = bm_error(-ENOMEM, "out of memory");
	return err;
}

int
bm_replica_test_overlay(struct bm_replica *r, uint64_t point, char **image)
{
	return locked_image(r, point, image, test_overlay);
}

static int
test_discard(struct bm_replica *r, uint64_t point)
{
	struct bm_replica_entry *p = bm_replica_find(r, point);
	char path[PATH_MAX];
	uint64_t number;
	int err;

	if (!p || !p->test_overlay)
		return bm_error(-ENOENT, "%s: point %" PRIu64 " has no test "
				"overlay", r->dir, point);
	number = p->number;
	p->test_overlay = false;
	err = bm_replica_save(r);
	if (err < 0)
		return err;
	/* Named by no state now: swept by an open if this fails. */
	bm_replica_test_path(r, number, path, sizeof path);
	err = bm_durable_unlink(path);
	tidy_or_warn(r, "a test overlay's discard");
	return err;
}

int
bm_replica_test_discard(struct bm_replica *r, uint64_t point)
{
	return locked_point(r, point, test_discard);
}

/* ---- digests, promote ------------------------------------------------- */

static int
digests(struct bm_replica *r, uint64_t point, uint64_t offset, uint64_t len,
	uint64_t *out)
{
	struct bm_replica_entry *p = bm_replica_find(r, point);
	char path[PATH_MAX];
	uint64_t end, layer;

	if (!p && (point || r->st.npoints))
		return bm_replica_no_point(r, point);
	if (offset % r->st.g || bm_add_overflow(offset, len, &end) ||
	    end > r->st.size || (len % r->st.g && end != r->st.size))
		return bm_error(-EINVAL, "%s: [%" PRIu64 ", +%" PRIu64 ") is "
				"not a range of whole granules of the disk",
				r->dir, offset, len);
	layer = p ? p->layer : 0;
	bm_replica_layer_path(r, layer, path, sizeof path);
	return bm_replica_image_digests(r->loop, path,
					bm_replica_layer_fmt(r, layer),
					r->st.g, offset, len, out);
}

int
bm_replica_digests(struct bm_replica *r, uint64_t point, uint64_t offset,
		   uint64_t len, uint64_t *out)
{
	int err;

	pthread_mutex_lock(&r->lock);
	err = digests(r, point, offset, len, out);
	pthread_mutex_unlock(&r->lock);
	return err;
}

static int
promote(struct bm_replica *r, uint64_t point, char **image,
	uint64_t *discarded)
{
	struct bm_replica_entry *p = bm_replica_find(r, point), kept;
	struct bm_replica_gen *g = &r->st.gen;
	char path[PATH_MAX];
	size_t top;
	int err;

	if (r->st.primary)
		return bm_error(-EROFS, "%s: a primary already", r->dir);
	if (!p)
		return bm_replica_no_point(r, point);
	if (r->cycle)
		return bm_error(-EBUSY, "%s: cycle %" PRIu64 " is open", r->dir,
				r->cycle_point);
	for (size_t i = 0; i < r->st.npoints; i++)
		if (bm_replica_pinned(r, &r->st.points[i]))
			return bm_error(-EBUSY, "%s: point %" PRIu64 " is "
					"pinned%s", r->dir,
					r->st.points[i].number,
					r->st.points[i].test_overlay
					? " by a test overlay" : "");
	*discarded = 0;
	for (size_t i = 0; i < r->st.npoints; i++)
		if (r->st.points[i].number > p->number)
			*discarded += r->st.points[i].bytes_since;
	/* The intent, with the fence: the new role and generation. */
	kept = *p;
	for (top = 0; r->st.layers[top] != kept.layer; top++)
		;
	r->st.points[0] = kept;
	r->st.npoints = 1;
	r->st.nlayers = top + 1;
	if (g->nhistory == BM_REPLICA_GEN_HISTORY)
		memmove(&g->history[0], &g->history[1],
			--g->nhistory * sizeof g->history[0]);
	memcpy(g->history[g->nhistory].gen, kept.gen, 37);
	g->history[g->nhistory++].point = kept.number;
	bm_replica_new_uuid(g->current);
	r->st.primary = true;
	r->st.promoting = true;
	err = bm_replica_save(r);
	if (err < 0)
		return err;
	bm_replica_sweep(r);
	err = bm_replica_tidy(r);
	if (err < 0)
		return bm_error_prefix(err, "%s: promoting point %" PRIu64
				       " (open the replica again to finish): ",
				       r->dir, kept.number);
	bm_replica_layer_path(r, 0, path, sizeof path);
	*image = strdup(path);
	return *image ? 0 : bm_error(-ENOMEM, "out of memory");
}

int
bm_replica_promote(struct bm_replica *r, uint64_t point, char **image,
		   uint64_t *discarded)
{
	int err;

	pthread_mutex_lock(&r->lock);
	*image = NULL;
	err = promote(r, point, image, discarded);
	pthread_mutex_unlock(&r->lock);
	return err;
}
