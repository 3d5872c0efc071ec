/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The rebalance planner.  Pure: a plan (pools, disks, goal) goes in, an
 * ordered list of moves comes out.
 *
 * The invariant every goal keeps: the moves are produced one at a time
 * against a running tally of each pool's used bytes, and a move is only
 * taken if the destination still has room for the whole disk while the
 * source keeps its copy (a move holds both until it ends).  So running
 * the moves in the order given, one after another, never overfills a
 * pool; the executor, which runs several at once, reserves a
 * destination's space when a move starts and frees the source's when it
 * ends, which keeps the same property.
 *
 * Fewest bytes: bin packing is NP-hard, so the goals use greedy choices
 * that favour small moves.  Balance takes, at each step, a single move
 * that reaches the goal if there is one (the smallest), otherwise the
 * move that removes the most imbalance per byte moved; evacuation has no
 * choice about what moves, only where to (largest disk first, to the pool
 * left least full).  A disk never moves twice.
 */
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "plan.h"
#include "size.h"

static int
fail(char *err, size_t errlen, int r, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));

static int
fail(char *err, size_t errlen, int r, const char *fmt, ...)
{
	va_list ap;

	if (errlen) {
		va_start(ap, fmt);
		vsnprintf(err, errlen, fmt, ap);
		va_end(ap);
	}
	return r;
}

/* ---- parsing ---------------------------------------------------------- */

static int
find_pool(const struct bm_plan *p, const char *name)
{
	for (size_t i = 0; i < p->n_pools; i++)
		if (strcmp(p->pools[i].name, name) == 0)
			return (int)i;
	return -1;
}

static int
find_disk(const struct bm_plan *p, const char *name)
{
	for (size_t i = 0; i < p->n_disks; i++)
		if (strcmp(p->disks[i].name, name) == 0)
			return (int)i;
	return -1;
}

/* A size member: a non-negative integer or a string like "256M". */
static int
get_size(json_t *v, uint64_t *out)
{
	if (json_is_integer(v) && json_integer_value(v) >= 0) {
		*out = (uint64_t)json_integer_value(v);
		return 0;
	}
	if (json_is_string(v))
		return parse_size(json_string_value(v), out);
	return -EINVAL;
}

/* Every member of `o` must be one of the NULL-terminated `known`. */
static const char *
unknown_member(json_t *o, const char *const *known)
{
	const char *key;
	json_t *v;

	json_object_foreach(o, key, v) {
		size_t i;

		for (i = 0; known[i]; i++)
			if (strcmp(key, known[i]) == 0)
				break;
		if (!known[i])
			return key;
	}
	return NULL;
}

#define BAD(...) fail(err, errlen, -EINVAL, __VA_ARGS__)

static int
parse_pool(json_t *o, size_t i, struct bm_plan *plan, char *err,
	   size_t errlen)
{
	static const char *const known[] = { "name", "path", "uri", "capacity",
					     "reserved", "weight", NULL };
	struct bm_plan_pool *pool = &plan->pools[i];
	const char *name, *path, *uri, *bad;
	json_t *v;

	if (!json_is_object(o))
		return BAD("pools[%zu] is not an object", i);
	name = json_string_value(json_object_get(o, "name"));
	if (!name || !*name)
		return BAD("pools[%zu] has no \"name\"", i);
	if (find_pool(plan, name) >= 0)
		return BAD("pool '%s' is named twice", name);
	if ((bad = unknown_member(o, known)))
		return BAD("pool '%s': unknown member \"%s\"", name, bad);
	path = json_string_value(json_object_get(o, "path"));
	uri = json_string_value(json_object_get(o, "uri"));
	if (!path == !uri)
		return BAD("pool '%s' needs exactly one of \"path\" (a "
			   "directory) and \"uri\" (an NBD URI)", name);
	if (path && !*path)
		return BAD("pool '%s': empty path", name);
	if (uri && !strstr(uri, "://"))
		return BAD("pool '%s': \"%s\" is not an NBD URI", name, uri);
	if ((v = json_object_get(o, "capacity")) &&
	    (get_size(v, &pool->capacity) < 0 || pool->capacity == 0))
		return BAD("pool '%s': bad capacity (a size like 256M or a "
			   "number of bytes, more than 0)", name);
	if (uri && !pool->capacity)
		return BAD("pool '%s': an NBD pool needs a \"capacity\"", name);
	if ((v = json_object_get(o, "reserved"))) {
		if (get_size(v, &pool->reserved) < 0)
			return BAD("pool '%s': bad reserved size", name);
		pool->reserved_given = true;
	}
	pool->weight = 1.0;
	if ((v = json_object_get(o, "weight"))) {
		if (!json_is_number(v) || !(json_number_value(v) > 0) ||
		    json_number_value(v) > 1e6)
			return BAD("pool '%s': weight must be a number above "
				   "0", name);
		pool->weight = json_number_value(v);
	}
	pool->name = strdup(name);
	pool->path = path ? strdup(path) : NULL;
	pool->uri = uri ? strdup(uri) : NULL;
	if (!pool->name || (path && !pool->path) || (uri && !pool->uri))
		return fail(err, errlen, -ENOMEM, "out of memory");
	plan->n_pools++;
	return 0;
}

static int
parse_disk(json_t *o, size_t i, struct bm_plan *plan, char *err,
	   size_t errlen)
{
	static const char *const known[] = { "name", "control", "image",
					     NULL };
	struct bm_plan_disk *disk = &plan->disks[i];
	const char *name, *control, *image, *bad;

	if (!json_is_object(o))
		return BAD("disks[%zu] is not an object", i);
	name = json_string_value(json_object_get(o, "name"));
	if (!name || !*name)
		return BAD("disks[%zu] has no \"name\"", i);
	if (find_disk(plan, name) >= 0)
		return BAD("disk '%s' is named twice", name);
	if ((bad = unknown_member(o, known)))
		return BAD("disk '%s': unknown member \"%s\"", name, bad);
	control = json_string_value(json_object_get(o, "control"));
	image = json_string_value(json_object_get(o, "image"));
	if (!control == !image)
		return BAD("disk '%s' needs exactly one of \"control\" (a "
			   "served disk's control socket) and \"image\" (an "
			   "image file not in use)", name);
	if ((control && !*control) || (image && !*image))
		return BAD("disk '%s': empty path", name);
	if (image && strstr(image, "://"))
		return BAD("disk '%s': an unused image must be a file, not "
			   "%s", name, image);
	disk->name = strdup(name);
	disk->control = control ? strdup(control) : NULL;
	disk->image = image ? strdup(image) : NULL;
	disk->pool = -1;
	if (!disk->name || (control && !disk->control) ||
	    (image && !disk->image))
		return fail(err, errlen, -ENOMEM, "out of memory");
	plan->n_disks++;
	return 0;
}

static int
parse_goal(json_t *g, struct bm_plan *plan, char *err, size_t errlen)
{
	const char *type, *bad;
	json_t *v;

	if (!json_is_object(g))
		return BAD("the plan has no \"goal\" object");
	type = json_string_value(json_object_get(g, "type"));
	if (!type)
		return BAD("the goal has no \"type\" (balance, evacuate or "
			   "moves)");
	if (strcmp(type, "balance") == 0) {
		static const char *const known[] = { "type", "tolerance",
						     NULL };

		if ((bad = unknown_member(g, known)))
			return BAD("goal: unknown member \"%s\"", bad);
		plan->goal = BM_PLAN_BALANCE;
		plan->tolerance = 0.05;
		if ((v = json_object_get(g, "tolerance"))) {
			if (!json_is_number(v) || json_number_value(v) < 0 ||
			    json_number_value(v) > 1)
				return BAD("goal: tolerance must be a number "
					   "from 0 to 1 (a fraction of each "
					   "pool's capacity)");
			plan->tolerance = json_number_value(v);
		}
		return 0;
	}
	if (strcmp(type, "evacuate") == 0) {
		static const char *const known[] = { "type", "pool", NULL };
		const char *name = json_string_value(json_object_get(g, "pool"));

		if ((bad = unknown_member(g, known)))
			return BAD("goal: unknown member \"%s\"", bad);
		if (!name)
			return BAD("goal: evacuate needs \"pool\"");
		plan->goal = BM_PLAN_EVACUATE;
		plan->evacuate = find_pool(plan, name);
		if (plan->evacuate < 0)
			return BAD("goal: unknown pool '%s'", name);
		return 0;
	}
	if (strcmp(type, "moves") == 0) {
		static const char *const known[] = { "type", "moves", NULL };
		json_t *list = json_object_get(g, "moves"), *m;
		size_t i;

		if ((bad = unknown_member(g, known)))
			return BAD("goal: unknown member \"%s\"", bad);
		if (!json_is_array(list))
			return BAD("goal: \"moves\" must be an array of "
				   "{\"disk\", \"to\"}");
		plan->goal = BM_PLAN_MOVES;
		plan->requests = calloc(json_array_size(list) + 1,
					sizeof *plan->requests);
		if (!plan->requests)
			return fail(err, errlen, -ENOMEM, "out of memory");
		json_array_foreach(list, i, m) {
			const char *d = json_string_value(json_object_get(m,
								"disk"));
			const char *to = json_string_value(json_object_get(m,
								"to"));
			struct bm_plan_request *r = &plan->requests[i];

			if (!d || !to)
				return BAD("goal: moves[%zu] needs \"disk\" and "
					   "\"to\"", i);
			r->disk = find_disk(plan, d);
			if (r->disk < 0)
				return BAD("goal: moves[%zu]: unknown disk "
					   "'%s'", i, d);
			r->pool = find_pool(plan, to);
			if (r->pool < 0)
				return BAD("goal: moves[%zu]: unknown pool "
					   "'%s'", i, to);
			for (size_t k = 0; k < i; k++)
				if (plan->requests[k].disk == r->disk)
					return BAD("goal: disk '%s' is moved "
						   "twice", d);
			plan->n_requests++;
		}
		return 0;
	}
	return BAD("goal: unknown type '%s' (balance, evacuate or moves)",
		   type);
}

int
bm_plan_parse(const char *text, size_t len, struct bm_plan *plan, char *err,
	      size_t errlen)
{
	static const char *const known[] = { "version", "pools", "disks",
					     "goal", NULL };
	json_error_t jerr;
	json_t *root, *pools, *disks, *v;
	const char *bad;
	size_t i;
	int r;

	memset(plan, 0, sizeof *plan);
	root = json_loadb(text, len, JSON_REJECT_DUPLICATES, &jerr);
	if (!root)
		return BAD("malformed JSON at line %d, column %d: %s",
			   jerr.line, jerr.column, jerr.text);
	r = -EINVAL;
	if (!json_is_object(root)) {
		BAD("the plan is not a JSON object");
		goto out;
	}
	if ((bad = unknown_member(root, known))) {
		BAD("unknown member \"%s\"", bad);
		goto out;
	}
	v = json_object_get(root, "version");
	if (v && (!json_is_integer(v) || json_integer_value(v) != 1)) {
		BAD("unsupported plan version (this bmirror reads version 1)");
		goto out;
	}
	pools = json_object_get(root, "pools");
	disks = json_object_get(root, "disks");
	if (!json_is_array(pools) || json_array_size(pools) < 1) {
		BAD("the plan needs a \"pools\" array with at least one pool");
		goto out;
	}
	if (!json_is_array(disks)) {
		BAD("the plan needs a \"disks\" array");
		goto out;
	}
	if (json_array_size(pools) > 4096 || json_array_size(disks) > 65536) {
		BAD("too many pools or disks");
		goto out;
	}
	plan->pools = calloc(json_array_size(pools), sizeof *plan->pools);
	plan->disks = calloc(json_array_size(disks) + 1, sizeof *plan->disks);
	if (!plan->pools || !plan->disks) {
		r = fail(err, errlen, -ENOMEM, "out of memory");
		goto out;
	}
	json_array_foreach(pools, i, v)
		if ((r = parse_pool(v, i, plan, err, errlen)) < 0)
			goto out;
	json_array_foreach(disks, i, v)
		if ((r = parse_disk(v, i, plan, err, errlen)) < 0)
			goto out;
	r = parse_goal(json_object_get(root, "goal"), plan, err, errlen);
out:
	json_decref(root);
	if (r < 0)
		bm_plan_free(plan);
	return r;
}

#undef BAD

void
bm_plan_free(struct bm_plan *plan)
{
	for (size_t i = 0; i < plan->n_pools; i++) {
		free(plan->pools[i].name);
		free(plan->pools[i].path);
		free(plan->pools[i].uri);
	}
	for (size_t i = 0; i < plan->n_disks; i++) {
		free(plan->disks[i].name);
		free(plan->disks[i].control);
		free(plan->disks[i].image);
	}
	free(plan->pools);
	free(plan->disks);
	free(plan->requests);
	memset(plan, 0, sizeof *plan);
}

char *
bm_plan_pool_uri(const struct bm_plan_pool *pool, const char *disk)
{
	const char *at = strstr(pool->uri, "{name}");
	size_t n;
	char *s;

	if (!at)
		return strdup(pool->uri);
	n = strlen(pool->uri) - 6 + strlen(disk) + 1;
	if (!(s = malloc(n)))
		return NULL;
	snprintf(s, n, "%.*s%s%s", (int)(at - pool->uri), pool->uri, disk,
		 at + 6);
	return s;
}

/* ---- planning --------------------------------------------------------- */

void
bm_plan_usage(const struct bm_plan *plan, uint64_t *used)
{
	for (size_t i = 0; i < plan->n_pools; i++)
		used[i] = plan->pools[i].reserved;
	for (size_t d = 0; d < plan->n_disks; d++)
		if (plan->disks[d].pool >= 0 &&
		    (size_t)plan->disks[d].pool < plan->n_pools)
			used[plan->disks[d].pool] += plan->disks[d].size;
}

struct planner {
	const struct bm_plan *plan;
	uint64_t *used;
	int *where;             /* each disk's pool after the moves so far */
	bool *moved;
	struct bm_plan_move *moves;
	size_t n_moves;
	double *target;         /* balance: each pool's target used bytes */
	char *err;
	size_t errlen;
};

static bool
fits(const struct planner *p, int pool, uint64_t size)
{
	uint64_t cap = p->plan->pools[pool].capacity;

	return p->used[pool] <= cap && size <= cap - p->used[pool];
}

static void
take(struct planner *p, int disk, int to)
{
	uint64_t size = p->plan->disks[disk].size;

	p->moves[p->n_moves++] = (struct bm_plan_move){
		.disk = disk, .from = p->where[disk], .to = to, .bytes = size };
	p->used[p->where[disk]] -= size;
	p->used[to] += size;
	p->where[disk] = to;
	p->moved[disk] = true;
}

/* Bytes by which a pool holding `used` is outside its tolerance band. */
static double
excess(const struct planner *p, int pool, double used)
{
	double band = p->plan->tolerance *
		      (double)p->plan->pools[pool].capacity;
	double off = fabs(used - p->target[pool]) - band;

	return off > 0 ? off : 0;
}

static double
total_excess(const struct planner *p)
{
	double e = 0;

	for (size_t i = 0; i < p->plan->n_pools; i++)
		e += excess(p, (int)i, (double)p->used[i]);
	return e;
}

/* Below this, an imbalance is rounding, not bytes. */
#define EPSILON 0.5

static int
plan_balance(struct planner *p)
{
	const struct bm_plan *plan = p->plan;
	double total = 0, wcap = 0;

	for (size_t i = 0; i < plan->n_pools; i++) {
		total += (double)p->used[i];
		wcap += plan->pools[i].weight * (double)plan->pools[i].capacity;
	}
	for (size_t i = 0; i < plan->n_pools; i++) {
		double cap = (double)plan->pools[i].capacity;

		p->target[i] = total * plan->pools[i].weight * cap / wcap;
		if (p->target[i] > cap)
			p->target[i] = cap;
	}

	for (;;) {
		double e = total_excess(p);
		int best_d = -1, best_q = -1;
		uint64_t best_size = 0;
		double best_ratio = 0, best_gain = 0;
		bool best_reaches = false;

		if (e < EPSILON)
			return 0;
		for (size_t d = 0; d < plan->n_disks; d++) {
			uint64_t size = plan->disks[d].size;
			int from = p->where[d];

			if (p->moved[d] || from < 0 || size == 0)
				continue;
			for (size_t q = 0; q < plan->n_pools; q++) {
				double after, gain, ratio;
				bool reaches;

				if ((int)q == from || !fits(p, (int)q, size))
					continue;
				after = e - excess(p, from, (double)p->used[from])
					  - excess(p, (int)q, (double)p->used[q])
					  + excess(p, from, (double)(p->used[from] - size))
					  + excess(p, (int)q, (double)(p->used[q] + size));
				gain = e - after;
				if (gain < EPSILON)
					continue;
				reaches = after < EPSILON;
				ratio = gain / (double)size;
				/* A move that reaches the goal beats any that
				 * does not; among those, the smallest. */
				if (reaches) {
					if (!best_reaches || size < best_size) {
						best_reaches = true;
						best_d = (int)d;
						best_q = (int)q;
						best_size = size;
					}
					continue;
				}
				if (best_reaches)
					continue;
				if (best_d < 0 || ratio > best_ratio * (1 + 1e-9) ||
				    (ratio >= best_ratio * (1 - 1e-9) &&
				     gain > best_gain)) {
					best_d = (int)d;
					best_q = (int)q;
					best_size = size;
					best_ratio = ratio;
					best_gain = gain;
				}
			}
		}
		if (best_d < 0)
			break;
		take(p, best_d, best_q);
	}

	/* Name the pool furthest from its target. */
	{
		int worst = 0;
		double w = -1;

		for (size_t i = 0; i < plan->n_pools; i++) {
			double x = excess(p, (int)i, (double)p->used[i]);

			if (x > w) {
				w = x;
				worst = (int)i;
			}
		}
		return fail(p->err, p->errlen, -ENOSPC,
			    "cannot balance the pools within a tolerance of "
			    "%g: pool '%s' would stay at %.1f%% used (target "
			    "%.1f%%)", plan->tolerance,
			    plan->pools[worst].name,
			    100.0 * (double)p->used[worst] /
			    (double)plan->pools[worst].capacity,
			    100.0 * p->target[worst] /
			    (double)plan->pools[worst].capacity);
	}
}

static int
plan_evacuate(struct planner *p)
{
	const struct bm_plan *plan = p->plan;
	int x = plan->evacuate;

	for (;;) {
		int d = -1, best_q = -1;
		double best_fill = 0;
		char h[32];

		/* The largest disk still there first: it has the fewest
		 * places to go. */
		for (size_t i = 0; i < plan->n_disks; i++)
			if (p->where[i] == x && !p->moved[i] &&
			    (d < 0 || plan->disks[i].size > plan->disks[d].size))
				d = (int)i;
		if (d < 0)
			return 0;
		for (size_t q = 0; q < plan->n_pools; q++) {
			const struct bm_plan_pool *pool = &plan->pools[q];
			double fill;

			if ((int)q == x || !fits(p, (int)q, plan->disks[d].size))
				continue;
			fill = (double)(p->used[q] + plan->disks[d].size) /
			       ((double)pool->capacity * pool->weight);
			if (best_q < 0 || fill < best_fill) {
				best_q = (int)q;
				best_fill = fill;
			}
		}
		if (best_q < 0)
			return fail(p->err, p->errlen, -ENOSPC,
				    "cannot empty pool '%s': disk '%s' (%s) "
				    "fits in no other pool",
				    plan->pools[x].name, plan->disks[d].name,
				    human_size(plan->disks[d].size, h,
					       sizeof h));
		take(p, d, best_q);
	}
}

static int
plan_moves(struct planner *p)
{
	const struct bm_plan *plan = p->plan;
	size_t left = 0;
	bool *done = calloc(plan->n_requests + 1, sizeof *done);

	if (!done)
		return fail(p->err, p->errlen, -ENOMEM, "out of memory");
	for (size_t i = 0; i < plan->n_requests; i++) {
		const struct bm_plan_request *r = &plan->requests[i];

		/* Already there: nothing to do. */
		if (p->where[r->disk] == r->pool)
			done[i] = true;
		else
			left++;
	}
	/* In the order given, except that a move waits until the moves
	 * out of its destination have made room for it. */
	while (left) {
		size_t i;

		for (i = 0; i < plan->n_requests; i++) {
			const struct bm_plan_request *r = &plan->requests[i];

			if (!done[i] &&
			    fits(p, r->pool, plan->disks[r->disk].size))
				break;
		}
		if (i == plan->n_requests) {
			char a[32], b[32], c[32];

			for (i = 0; done[i]; i++)
				;
			const struct bm_plan_request *r = &plan->requests[i];
			const struct bm_plan_pool *pool = &plan->pools[r->pool];

			free(done);
			return fail(p->err, p->errlen, -ENOSPC,
				    "moving disk '%s' (%s) to pool '%s' would "
				    "overfill it: %s used of %s",
				    plan->disks[r->disk].name,
				    human_size(plan->disks[r->disk].size, a,
					       sizeof a), pool->name,
				    human_size(p->used[r->pool], b, sizeof b),
				    human_size(pool->capacity, c, sizeof c));
		}
		take(p, plan->requests[i].disk, plan->requests[i].pool);
		done[i] = true;
		left--;
	}
	free(done);
	return 0;
}

int
bm_plan_compute(const struct bm_plan *plan, struct bm_plan_move **moves,
		size_t *n_moves, char *err, size_t errlen)
{
	struct planner p = { .plan = plan, .err = err, .errlen = errlen };
	size_t n = plan->n_pools ? plan->n_pools : 1;
	size_t nd = plan->n_disks + 1;
	int r;

	*moves = NULL;
	*n_moves = 0;
	for (size_t i = 0; i < plan->n_pools; i++)
		if (!plan->pools[i].capacity)
			return fail(err, errlen, -EINVAL, "pool '%s' has no "
				    "capacity", plan->pools[i].name);
	for (size_t d = 0; d < plan->n_disks; d++)
		if (plan->disks[d].pool < 0 ||
		    (size_t)plan->disks[d].pool >= plan->n_pools)
			return fail(err, errlen, -EINVAL, "disk '%s' is in "
				    "none of the plan's pools",
				    plan->disks[d].name);
	p.used = calloc(n, sizeof *p.used);
	p.target = calloc(n, sizeof *p.target);
	p.where = calloc(nd, sizeof *p.where);
	p.moved = calloc(nd, sizeof *p.moved);
	p.moves = calloc(nd, sizeof *p.moves);
	if (!p.used || !p.target || !p.where || !p.moved || !p.moves) {
		r = fail(err, errlen, -ENOMEM, "out of memory");
		goto out;
	}
	bm_plan_usage(plan, p.used);
	for (size_t i = 0; i < plan->n_pools; i++) {
		char a[32], b[32];

		if (p.used[i] > plan->pools[i].capacity) {
			r = fail(err, errlen, -ENOSPC, "pool '%s' is over "
				 "capacity: %s used of %s",
				 plan->pools[i].name,
				 human_size(p.used[i], a, sizeof a),
				 human_size(plan->pools[i].capacity, b,
					    sizeof b));
			goto out;
		}
	}
	for (size_t d = 0; d < plan->n_disks; d++)
		p.where[d] = plan->disks[d].pool;

	switch (plan->goal) {
	case BM_PLAN_BALANCE:
		r = plan_balance(&p);
		break;
	case BM_PLAN_EVACUATE:
		r = plan_evacuate(&p);
		break;
	case BM_PLAN_MOVES:
		r = plan_moves(&p);
		break;
	default:
		r = fail(err, errlen, -EINVAL, "the plan has no goal");
		break;
	}
	if (r == 0) {
		*moves = p.moves;
		*n_moves = p.n_moves;
		p.moves = NULL;
	}
out:
	free(p.used);
	free(p.target);
	free(p.where);
	free(p.moved);
	free(p.moves);
	return r;
}
