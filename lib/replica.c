/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The replica store (replica.h; docs/replica-store.md).
 *
 * DIR holds the base image, qcow2 layers DIR/layer-NNNNNNNN.qcow2 (an id
 * drawn from a counter, never reused), each backed by the one below it,
 * and DIR/replica.json, the state, replaced atomically
 * (bm_durable_write_file): the layers bottom up, the committed points
 * and, for each point, the layer it owns.  A point's image is its layer:
 * the chain from there down reads as the point.  A layer no point owns
 * is read by nobody on its own.
 *
 * Invariants of the state on disk, after each of its writes:
 *  - every point owns exactly one layer, and the latest point owns the
 *    top one; with no point there is only the base;
 *  - the chain from a point's layer reads as that point.
 *
 * Everything else follows from one step, the merge: the layer U above a
 * layer D that no point owns is copied into D (U's own clusters only:
 * every reader above D finds them in U first, with the same bytes, so
 * nobody's view changes, however far the copy got), D is flushed, the
 * layer above U (if any) is re-pointed at D (crash-safe: both read the
 * same), then the state says D is U's point's layer and U is gone, and
 * U's file is removed.  A crash anywhere leaves either the old state
 * (the merge is simply done again: it is idempotent) or the new one (U's
 * file, named by no state, is swept).  Dropping a point (retention, a
 * commit over a latest point nobody keeps) only takes it out of the
 * state; the merges that follow fold its layer away.  So after tidying,
 * the chain has one layer per point (and one below each pinned point
 * whose merge waits), and a cycle costs its changed bytes twice
 * (received, then merged once the point before it is dropped).
 *
 * A pinned point's layer is never a merge's D (it has an owner) nor its
 * U (that merge waits for the unpin), so a reader that holds it open
 * reads the same bytes; at most its header is re-pointed.
 *
 * A cycle writes into a new layer over the latest point's (or into the
 * base, for the first point), named by no state until commit: a crash
 * before the commit's state write leaves a file the next open sweeps.
 * Promote writes its intent with the new role and generation first, so
 * the fence holds from then on, then merges down to the base and drops
 * every point; open finishes it.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <uuid/uuid.h>

#include "durable.h"
#include "errors.h"
#include "internal.h"
#include "loop.h"
#include "replica-int.h"
#include "replica.h"

#define STATE_FILE "replica.json"
#define LOCK_FILE "replica.lock"
#define VERSION 1
#define MIN_GRANULARITY (4 * BM_KiB)
#define MAX_GRANULARITY (64 * BM_MiB)

static void
state_free(struct bm_replica_state *s)
{
	free(s->layers);
	free(s->points);
	s->layers = NULL;
	s->points = NULL;
	s->nlayers = s->npoints = 0;
}

/* ---- names ----------------------------------------------------------- */

void
bm_replica_layer_path(const struct bm_replica *r, uint64_t id, char *out,
		      size_t len)
{
	if (id == 0)
		snprintf(out, len, "%s", r->base);
	else
		snprintf(out, len, "%s/layer-%08" PRIu64 ".qcow2", r->dir, id);
}

enum blockmirror_format
bm_replica_layer_fmt(const struct bm_replica *r, uint64_t id)
{
	return id == 0 ? r->st.base_fmt : BLOCKMIRROR_FORMAT_QCOW2;
}

void
bm_replica_test_path(const struct bm_replica *r, uint64_t point, char *out,
		     size_t len)
{
	snprintf(out, len, "%s/test-%08" PRIu64 ".qcow2", r->dir, point);
}

uint32_t
bm_replica_cluster(uint32_t g)
{
	return (uint32_t)BM_MIN(g, 2 * BM_MiB);
}

bool
bm_replica_is_uuid(const char *s)
{
	uuid_t u;

	return s && strlen(s) == 36 && uuid_parse(s, u) == 0;
}

void
bm_replica_new_uuid(char out[37])
{
	uuid_t u;

	uuid_generate_random(u);
	uuid_unparse_lower(u, out);
}

/* ---- points, layers, pins -------------------------------------------- */

struct bm_replica_entry *
bm_replica_find(struct bm_replica *r, uint64_t number)
{
	if (number == 0 && r->st.npoints)
		return &r->st.points[r->st.npoints - 1];
	for (size_t i = 0; i < r->st.npoints; i++)
		if (r->st.points[i].number == number)
			return &r->st.points[i];
	return NULL;
}

int
bm_replica_no_point(struct bm_replica *r, uint64_t number)
{
	if (number == 0)
		return bm_error(-ENOENT, "%s: no point committed yet", r->dir);
	return bm_error(-ENOENT, "%s: no point %" PRIu64, r->dir, number);
}

static struct bm_replica_entry *
owner_of(struct bm_replica *r, uint64_t layer)
{
	for (size_t i = 0; i < r->st.npoints; i++)
		if (r->st.points[i].layer == layer)
			return &r->st.points[i];
	return NULL;
}

unsigned *
bm_replica_pin_slot(struct bm_replica *r, uint64_t point, bool add)
{
	for (size_t i = 0; i < BM_REPLICA_MAX_PINS; i++)
		if (r->pins[i].n && r->pins[i].point == point)
			return &r->pins[i].n;
	for (size_t i = 0; add && i < BM_REPLICA_MAX_PINS; i++)
		if (!r->pins[i].n) {
			r->pins[i].point = point;
			return &r->pins[i].n;
		}
	return NULL;
}

bool
bm_replica_pinned(struct bm_replica *r, const struct bm_replica_entry *p)
{
	return p->test_overlay || bm_replica_pin_slot(r, p->number, false);
}

enum store_name { NAME_OTHER, NAME_LAYER, NAME_TEST, NAME_TMP, NAME_OWN };

/* Is `name` one the store makes?  *id: a layer's or a test's number. */
static enum store_name
store_name(const char *name, uint64_t *id)
{
	static const struct { const char *prefix; enum store_name kind; }
	numbered[] = { { "layer-", NAME_LAYER }, { "test-", NAME_TEST } };

	for (size_t i = 0; i < BM_ARRAY_SIZE(numbered); i++) {
		size_t len = strlen(numbered[i].prefix);
		const char *n = name + len;

		if (strncmp(name, numbered[i].prefix, len) ||
		    strspn(n, "0123456789") != 8 || strcmp(n + 8, ".qcow2"))
			continue;
		*id = strtoull(n, NULL, 10);
		return numbered[i].kind;
	}
	if (!strcmp(name, STATE_FILE ".tmp"))
		return NAME_TMP;
	if (!strcmp(name, STATE_FILE) || !strcmp(name, LOCK_FILE))
		return NAME_OWN;
	return NAME_OTHER;
}

/* ---- the state file -------------------------------------------------- */

static int
bad_field(const char *path, const char *field, const char *where)
{
	return bm_error(-EBADMSG, "%s: field \"%s\"%s is missing or out of "
			"range", path, field, where);
}

/* An integer field not below `min`. */
static int
get_int(json_t *o, const char *field, const char *path, const char *where,
	int64_t min, int64_t *out)
{
	json_t *v = json_object_get(o, field);

	if (!json_is_integer(v) || json_integer_value(v) < min)
		return bad_field(path, field, where);
	*out = json_integer_value(v);
	return 0;
}

static int
get_u64(json_t *o, const char *field, const char *path, const char *where,
	uint64_t *out)
{
	int64_t v = 0;
	int r = get_int(o, field, path, where, 0, &v);

	*out = (uint64_t)v;
	return r;
}

static int
get_bool(json_t *o, const char *field, const char *path, const char *where,
	 bool *out)
{
	json_t *v = json_object_get(o, field);

	if (!json_is_boolean(v))
		return bad_field(path, field, where);
	*out = json_is_true(v);
	return 0;
}

static int
get_uuid(json_t *o, const char *field, const char *path, const char *where,
	 char out[37])
{
	const char *s = json_string_value(json_object_get(o, field));

	if (!bm_replica_is_uuid(s))
		return bad_field(path, field, where);
	memcpy(out, s, 37);
	return 0;
}

static int
load_points(json_t *arr, const char *path, struct bm_replica_state *s)
{
	char where[64];
	int r = 0;

	if (!json_is_array(arr))
		return bad_field(path, "points", "");
	s->points = calloc(json_array_size(arr) + 1, sizeof *s->points);
	if (!s->points)
		return bm_error(-ENOMEM, "out of memory");
	for (size_t i = 0; r == 0 && i < json_array_size(arr); i++) {
		json_t *o = json_array_get(arr, i);
		struct bm_replica_entry *p = &s->points[i];

		snprintf(where, sizeof where, " of point #%zu", i + 1);
		r = get_u64(o, "number", path, where, &p->number);
		if (r == 0 && (p->number == 0 ||
			       (i && p->number <= p[-1].number)))
			r = bad_field(path, "number", where);
		if (r == 0)
			r = get_int(o, "instant_ns", path, where, INT64_MIN,
				    &p->instant_ns);
		if (r == 0)
			r = get_int(o, "committed_ns", path, where,
				    INT64_MIN, &p->committed_ns);
		if (r == 0)
			r = get_u64(o, "bytes", path, where, &p->bytes);
		if (r == 0)
			r = get_u64(o, "bytes_since", path, where,
				    &p->bytes_since);
		if (r == 0)
			r = get_bool(o, "app_consistent", path, where,
				     &p->app_consistent);
		if (r == 0)
			r = get_bool(o, "test_overlay", path, where,
				     &p->test_overlay);
		if (r == 0)
			r = get_uuid(o, "generation", path, where, p->gen);
		if (r == 0)
			r = get_u64(o, "layer", path, where, &p->layer);
		s->npoints = i + 1;
	}
	return r;
}

/* The layers: ids below next_layer, the base first, each owned by one
 * point at most, the top by the latest; none but the base without a
 * point. */
static int
check_layers(json_t *arr, const char *path, struct bm_replica_state *s)
{
	size_t n = json_array_size(arr);

	if (!json_is_array(arr) || n == 0)
		return bad_field(path, "layers", "");
	s->layers = calloc(n, sizeof *s->layers);
	if (!s->layers)
		return bm_error(-ENOMEM, "out of memory");
	for (size_t i = 0; i < n; i++) {
		json_t *v = json_array_get(arr, i);
		json_int_t id = json_integer_value(v);

		if (!json_is_integer(v) || id < 0 || (i == 0) != (id == 0) ||
		    (uint64_t)id >= s->next_layer ||
		    (i && (uint64_t)id <= s->layers[i - 1]))
			return bad_field(path, "layers", "");
		s->layers[i] = (uint64_t)id;
	}
	s->nlayers = n;
	for (size_t i = 0; i < s->npoints; i++) {
		bool found = false;

		for (size_t k = 0; k < n; k++)
			found |= s->layers[k] == s->points[i].layer;
		for (size_t k = 0; k < i; k++)
			found &= s->points[k].layer != s->points[i].layer;
		if (!found)
			return bm_error(-EBADMSG, "%s: field \"layer\" of "
					"point %" PRIu64 " names no layer of "
					"its own", path, s->points[i].number);
	}
	if (s->npoints ? s->points[s->npoints - 1].layer != s->layers[n - 1]
		       : n != 1)
		return bm_error(-EBADMSG, "%s: field \"layers\": the top layer "
				"is not the latest point's", path);
	return 0;
}

static int
state_load(const char *dir, struct bm_replica_state *s)
{
	char path[PATH_MAX];
	json_error_t jerr;
	json_t *m, *v;
	const char *str;
	uint64_t u = 0;
	int r;

	memset(s, 0, sizeof *s);
	snprintf(path, sizeof path, "%s/%s", dir, STATE_FILE);
	m = json_load_file(path, 0, &jerr);
	if (!m) {
		if (access(path, F_OK) < 0 && errno == ENOENT)
			return bm_error(-ENOENT, "%s: no replica here (no %s)",
					dir, STATE_FILE);
		return bm_error(-EBADMSG, "%s: not a replica state: %s", path,
				jerr.text);
	}
	r = get_u64(m, "version", path, "", &u);
	if (r == 0 && u != VERSION)
		r = bm_error(-EBADMSG, "%s: field \"version\": %" PRIu64
			     ", this library knows %d", path, u, VERSION);
	if (r == 0)
		r = get_u64(m, "size", path, "", &s->size);
	if (r == 0 && (s->size == 0 || s->size > INT64_MAX))
		r = bad_field(path, "size", "");
	if (r == 0)
		r = get_u64(m, "granularity", path, "", &u);
	if (r == 0 && (u < MIN_GRANULARITY || u > MAX_GRANULARITY ||
		       !bm_is_power_of_2(u)))
		r = bad_field(path, "granularity", "");
	s->g = (uint32_t)u;
	str = json_string_value(json_object_get(m, "role"));
	if (r == 0 && (!str || (strcmp(str, "replica") &&
				strcmp(str, "primary"))))
		r = bad_field(path, "role", "");
	s->primary = str && !strcmp(str, "primary");
	if (r == 0)
		r = get_uuid(m, "generation", path, "", s->gen.current);
	v = json_object_get(m, "history");
	if (r == 0 && (!json_is_array(v) ||
		       json_array_size(v) > BM_REPLICA_GEN_HISTORY))
		r = bad_field(path, "history", "");
	for (size_t i = 0; r == 0 && i < json_array_size(v); i++) {
		json_t *h = json_array_get(v, i);

		r = get_uuid(h, "generation", path, " of the history",
			     s->gen.history[i].gen);
		if (r == 0)
			r = get_u64(h, "point", path, " of the history",
				    &s->gen.history[i].point);
		s->gen.nhistory = (unsigned)i + 1;
	}
	str = json_string_value(json_object_get(m, "base"));
	if (r == 0 && (!str || !*str || strchr(str, '/') ||
		       !strcmp(str, ".") || !strcmp(str, "..") ||
		       strlen(str) >= sizeof s->base ||
		       store_name(str, &u) != NAME_OTHER))
		r = bad_field(path, "base", "");
	if (r == 0)
		snprintf(s->base, sizeof s->base, "%s", str);
	/* (A public call: it clears the message, so only before one.) */
	str = json_string_value(json_object_get(m, "base_format"));
	if (r == 0)
		s->base_fmt = str ? blockmirror_format_from_name(str) : -1;
	if (r == 0 && (int)s->base_fmt <= BLOCKMIRROR_FORMAT_AUTO)
		r = bad_field(path, "base_format", "");
	v = json_object_get(m, "policy");
	if (r == 0)
		r = get_u64(v, "keep", path, " of the policy", &u);
	if (r == 0 && u > UINT32_MAX)
		r = bad_field(path, "keep", " of the policy");
	s->policy.keep = (unsigned)u;
	if (r == 0)
		r = get_u64(v, "every_s", path, " of the policy", &u);
	if (r == 0 && u > UINT32_MAX)
		r = bad_field(path, "every_s", " of the policy");
	s->policy.every_s = (uint32_t)u;
	if (r == 0)
		r = get_bool(m, "promoting", path, "", &s->promoting);
	if (r == 0)
		r = get_u64(m, "next_layer", path, "", &s->next_layer);
	if (r == 0 && s->next_layer == 0)
		r = bad_field(path, "next_layer", "");
	if (r == 0)
		r = load_points(json_object_get(m, "points"), path, s);
	if (r == 0)
		r = check_layers(json_object_get(m, "layers"), path, s);
	if (r == 0 && s->primary && s->npoints && !s->promoting)
		r = bm_error(-EBADMSG, "%s: field \"points\": a primary holds "
			     "none", path);
	if (r == 0 && s->promoting && !s->primary)
		r = bad_field(path, "promoting", "");
	json_decref(m);
	if (r < 0)
		state_free(s);
	return r;
}

static json_t *
points_json(struct bm_replica *r)
{
	json_t *a = json_array();

	for (size_t i = 0; a && i < r->st.npoints; i++) {
		const struct bm_replica_entry *p = &r->st.points[i];
		char image[PATH_MAX];

		bm_replica_layer_path(r, p->layer, image, sizeof image);
		if (json_array_append_new(a, json_pack(
			    "{s:I, s:I, s:I, s:I, s:I, s:b, s:s, s:I, s:s, "
			    "s:b, s:b}", "number", (json_int_t)p->number,
			    "instant_ns", (json_int_t)p->instant_ns,
			    "committed_ns", (json_int_t)p->committed_ns,
			    "bytes", (json_int_t)p->bytes,
			    "bytes_since", (json_int_t)p->bytes_since,
			    "app_consistent", p->app_consistent,
			    "generation", p->gen,
			    "layer", (json_int_t)p->layer,
			    "image", image, "retained", p->retained,
			    "test_overlay", p->test_overlay)) < 0) {
			json_decref(a);
			return NULL;
		}
	}
	return a;
}

static int
state_write(struct bm_replica *r)
{
	const struct bm_replica_state *s = &r->st;
	json_t *m, *layers = json_array(), *hist = json_array();
	char path[PATH_MAX], *text = NULL;
	int err;

	for (size_t i = 0; layers && i < s->nlayers; i++)
		json_array_append_new(layers, json_integer(
					      (json_int_t)s->layers[i]));
	for (unsigned i = 0; hist && i < s->gen.nhistory; i++)
		json_array_append_new(hist, json_pack(
			"{s:s, s:I}", "generation", s->gen.history[i].gen,
			"point", (json_int_t)s->gen.history[i].point));
	m = json_pack("{s:i, s:I, s:I, s:s, s:s, s:o?, s:s, s:s, "
		      "s:{s:I, s:I}, s:b, s:I, s:o?, s:o?}",
		      "version", VERSION, "size", (json_int_t)s->size,
		      "granularity", (json_int_t)s->g,
		      "role", s->primary ? "primary" : "replica",
		      "generation", s->gen.current, "history", hist,
		      "base", s->base,
		      "base_format", blockmirror_format_name(s->base_fmt),
		      "policy", "keep", (json_int_t)s->policy.keep,
		      "every_s", (json_int_t)s->policy.every_s,
		      "promoting", s->promoting,
		      "next_layer", (json_int_t)s->next_layer,
		      "layers", layers, "points", points_json(r));
	if (m)
		text = json_dumps(m, JSON_INDENT(2));
	json_decref(m);
	if (!text)
		return bm_error(-ENOMEM, "%s: out of memory for the state",
				r->dir);
	snprintf(path, sizeof path, "%s/%s", r->dir, STATE_FILE);
	err = bm_durable_write_file(path, text, strlen(text), 0644);
	free(text);
	return err;
}

/*
 * Write the state changed in memory.  On failure, memory goes back to
 * what the file holds (the old state, or the new one if only the
 * directory's sync failed), so the handle never runs ahead of the disk.
 */
int
bm_replica_save(struct bm_replica *r)
{
	struct bm_replica_state s;
	int err = state_write(r), e2;

	if (err == 0)
		return 0;
	e2 = state_load(r->dir, &s);
	if (e2 == 0) {
		state_free(&r->st);
		r->st = s;
	}
	return err;
}

/* ---- tidying --------------------------------------------------------- */

void
bm_replica_choose_retained(struct bm_replica *r)
{
	const struct bm_replica_policy *pol = &r->st.policy;
	size_t n = r->st.npoints, want = pol->keep;
	int64_t span = (int64_t)pol->every_s * 1000000000;

	for (size_t i = 0; i < n; i++)
		r->st.points[i].retained = false;
	if (!n)
		return;
	r->st.points[n - 1].retained = true;
	/* Newest window first: a point is its window's first when the
	 * point before it lies in another window. */
	for (size_t i = n - 1; want && i-- > 0;) {
		struct bm_replica_entry *p = &r->st.points[i];
		int64_t w, wp;

		if (i > 0 && span) {
			w = p->instant_ns / span - (p->instant_ns % span < 0);
			wp = p[-1].instant_ns / span -
			     (p[-1].instant_ns % span < 0);
			if (w == wp)
				continue;
		}
		p->retained = true;
		want--;
	}
}

/* Drop the points neither the policy, the latest, nor a pin keeps; a
 * dropped point's cycles count as the next point's. */
static int
retain(struct bm_replica *r)
{
	size_t k = 0, n = r->st.npoints;
	uint64_t carried = 0;

	bm_replica_choose_retained(r);
	for (size_t i = 0; i < n; i++) {
		struct bm_replica_entry *p = &r->st.points[i];

		p->bytes_since += carried;
		carried = 0;
		if (p->retained || bm_replica_pinned(r, p))
			r->st.points[k++] = *p;
		else
			carried = p->bytes_since;
	}
	if (k == n)
		return 0;
	r->st.npoints = k;
	return bm_replica_save(r);
}

/* Merge layer i + 1 into layer i, which no point owns. */
static int
merge_one(struct bm_replica *r, size_t i)
{
	char up[PATH_MAX], low[PATH_MAX], above[PATH_MAX];
	uint64_t uid = r->st.layers[i + 1], did = r->st.layers[i];
	struct bm_replica_entry *p;
	uint64_t written, alloc;
	int err;

	bm_replica_layer_path(r, uid, up, sizeof up);
	bm_replica_layer_path(r, did, low, sizeof low);
	err = bm_replica_image_merge(r->loop, up, low,
				     bm_replica_layer_fmt(r, did), &written,
				     &alloc);
	if (err == 0 && i + 2 < r->st.nlayers) {
		bm_replica_layer_path(r, r->st.layers[i + 2], above,
				      sizeof above);
		err = bm_replica_image_repoint(above, low,
					       bm_replica_layer_fmt(r, did));
	}
	if (err < 0)
		return err;
	r->stats.merges++;
	r->stats.merge_bytes += written;
	r->stats.merged_alloc += alloc;
	p = owner_of(r, uid);
	if (p)
		p->layer = did;
	memmove(&r->st.layers[i + 1], &r->st.layers[i + 2],
		(r->st.nlayers - i - 2) * sizeof *r->st.layers);
	r->st.nlayers--;
	err = bm_replica_save(r);
	/* Named by no state now: an open sweeps it if this fails. */
	if (err == 0 && bm_durable_unlink(up) < 0)
		bm_warn("%s", blockmirror_last_error());
	return err;
}

/* Retention, then merges until no unowned layer can take the one above
 * it; then a promote's end.  Not while a cycle is open. */
int
bm_replica_tidy(struct bm_replica *r)
{
	int err;

	if (r->cycle)
		return 0;
	err = retain(r);
	for (size_t i = 0; err == 0 && i + 1 < r->st.nlayers;) {
		struct bm_replica_entry *up = owner_of(r, r->st.layers[i + 1]);

		if (owner_of(r, r->st.layers[i]) ||
		    (up && bm_replica_pinned(r, up))) {
			i++;
			continue;
		}
		err = merge_one(r, i);
	}
	if (err == 0 && r->st.promoting && r->st.nlayers == 1) {
		r->st.promoting = false;
		r->st.npoints = 0;
		err = bm_replica_save(r);
	}
	return err;
}

/* Remove what a crash left: files of the store's names that the state
 * does not list. */
void
bm_replica_sweep(struct bm_replica *r)
{
	DIR *d = opendir(r->dir);
	struct dirent *e;

	while (d && (e = readdir(d))) {
		enum store_name kind;
		char path[PATH_MAX];
		uint64_t id;
		bool keep = true;

		kind = store_name(e->d_name, &id);
		if (kind == NAME_LAYER) {
			keep = false;
			for (size_t i = 0; i < r->st.nlayers; i++)
				keep |= r->st.layers[i] == id;
		} else if (kind == NAME_TEST) {
			struct bm_replica_entry *p =
				id ? bm_replica_find(r, id) : NULL;

			keep = p && p->test_overlay;
		} else if (kind == NAME_TMP) {
			keep = false;
		}
		/* (An operator's base may have any name but these.) */
		if (keep || !strcmp(e->d_name, r->st.base))
			continue;
		snprintf(path, sizeof path, "%s/%s", r->dir, e->d_name);
		if (bm_durable_unlink(path) == 0)
			bm_info("%s: removed %s, left by a crash", r->dir,
				e->d_name);
	}
	if (d)
		closedir(d);
}

/* ---- open, create, close --------------------------------------------- */

static int
handle_new(const char *dir, struct bm_replica **out)
{
	struct bm_replica *r = calloc(1, sizeof *r);
	char path[PATH_MAX];
	int err;

	*out = NULL;
	if (!r)
		return bm_error(-ENOMEM, "out of memory");
	pthread_mutex_init(&r->lock, NULL);
	r->lockfd = -1;
	r->dir = realpath(dir, NULL);
	if (!r->dir) {
		err = bm_error(-errno, "%s: %s", dir, strerror(errno));
		goto fail;
	}
	snprintf(path, sizeof path, "%s/%s", r->dir, LOCK_FILE);
	r->lockfd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
	if (r->lockfd < 0 || flock(r->lockfd, LOCK_EX | LOCK_NB) < 0) {
		err = errno == EWOULDBLOCK
		      ? bm_error(-EBUSY, "%s: the replica is in use", path)
		      : bm_error(-errno, "%s: %s", path, strerror(errno));
		goto fail;
	}
	err = bm_loop_new(8, &r->loop);
	if (err < 0)
		goto fail;
	*out = r;
	return 0;
fail:
	bm_replica_close(r);
	return err;
}

static int
set_base(struct bm_replica *r)
{
	free(r->base);
	if (asprintf(&r->base, "%s/%s", r->dir, r->st.base) < 0) {
		r->base = NULL;
		return bm_error(-ENOMEM, "out of memory");
	}
	return 0;
}

int
bm_replica_open(const char *dir, struct bm_replica **out)
{
	enum blockmirror_format fmt;
	struct bm_replica *r;
	char path[PATH_MAX];
	uint64_t size;
	int err;

	err = handle_new(dir, &r);
	if (err < 0)
		return err;
	err = state_load(r->dir, &r->st);
	if (err == 0)
		err = set_base(r);
	for (size_t i = 0; err == 0 && i < r->st.nlayers; i++) {
		bm_replica_layer_path(r, r->st.layers[i], path, sizeof path);
		if (access(path, F_OK) < 0)
			err = bm_error(-ENOENT, "%s: layer %" PRIu64 " is "
				       "missing: %s", r->dir, r->st.layers[i],
				       path);
	}
	/* The base as the state says it is (opened in its format: a raw
	 * base's first sector is guest data, whatever it looks like). */
	fmt = r->st.base_fmt;
	if (err == 0)
		err = bm_replica_image_probe(r->loop, r->base, &fmt, &size);
	if (err == 0 && size != r->st.size)
		err = bm_error(-EINVAL, "%s: holds %" PRIu64 " bytes, %s/%s "
			       "says the disk has %" PRIu64, r->base, size,
			       r->dir, STATE_FILE, r->st.size);
	if (err == 0) {
		bm_replica_sweep(r);
		err = bm_replica_tidy(r);
	}
	if (err < 0) {
		bm_replica_close(r);
		return err;
	}
	*out = r;
	return 0;
}

int
bm_replica_create(const char *dir, uint64_t size, const char *base,
		  uint32_t granularity, struct bm_replica **out)
{
	struct bm_replica *r;
	struct bm_replica_state *s;
	char path[PATH_MAX], *real = NULL;
	uint64_t bsize;
	int err;

	*out = NULL;
	if (!granularity)
		granularity = 64 * BM_KiB;
	if (granularity < MIN_GRANULARITY || granularity > MAX_GRANULARITY ||
	    !bm_is_power_of_2(granularity))
		return bm_error(-EINVAL, "%s: granularity %" PRIu32 " is not a "
				"power of two from 4 KiB to 64 MiB", dir,
				granularity);
	if (size == 0 || size > INT64_MAX)
		return bm_error(-EINVAL, "%s: bad disk size %" PRIu64, dir,
				size);
	err = bm_durable_mkdir(dir, 0755);
	if (err == 0)
		err = handle_new(dir, &r);
	if (err < 0)
		return err;
	s = &r->st;
	snprintf(path, sizeof path, "%s/%s", r->dir, STATE_FILE);
	if (access(path, F_OK) == 0) {
		err = bm_error(-EEXIST, "%s: holds a replica already", r->dir);
		goto fail;
	}
	s->size = size;
	s->g = granularity;
	s->next_layer = 1;
	bm_replica_new_uuid(s->gen.current);
	s->layers = calloc(1, sizeof *s->layers);
	s->nlayers = 1;
	if (!s->layers) {
		err = bm_error(-ENOMEM, "out of memory");
		goto fail;
	}
	if (!base) {
		snprintf(s->base, sizeof s->base, "base.raw");
		s->base_fmt = BLOCKMIRROR_FORMAT_RAW;
		err = set_base(r);
		if (err == 0)
			err = bm_replica_image_raw(r->loop, r->base, size);
		if (err < 0)
			goto fail;
		goto save;
	}
	real = realpath(base, NULL);
	if (!real) {
		err = bm_error(-errno, "%s: %s", base, strerror(errno));
		goto fail;
	}
	if (strncmp(real, r->dir, strlen(r->dir)) ||
	    real[strlen(r->dir)] != '/' || strchr(real + strlen(r->dir) + 1,
						  '/')) {
		err = bm_error(-EXDEV, "%s: the base must be a file in %s (the "
			       "layers' backing file policy)", base, r->dir);
		goto fail;
	}
	snprintf(s->base, sizeof s->base, "%s", real + strlen(r->dir) + 1);
	if (store_name(s->base, &bsize) != NAME_OTHER) {
		err = bm_error(-EINVAL, "%s: a name the replica store uses for "
			       "its own files; rename the base", base);
		goto fail;
	}
	err = set_base(r);
	s->base_fmt = BLOCKMIRROR_FORMAT_AUTO;
	if (err == 0)
		err = bm_replica_image_probe(r->loop, r->base, &s->base_fmt,
					     &bsize);
	if (err == 0 && bsize != size)
		err = bm_error(-EINVAL, "%s: holds %" PRIu64 " bytes, the disk "
			       "%" PRIu64, base, bsize, size);
	if (err < 0)
		goto fail;
save:
	err = bm_replica_save(r);
	if (err < 0)
		goto fail;
	free(real);
	*out = r;
	return 0;
fail:
	free(real);
	bm_replica_close(r);
	return err;
}

void
bm_replica_close(struct bm_replica *r)
{
	if (!r)
		return;
	if (r->cycle)
		bm_replica_abort(r);
	state_free(&r->st);
	if (r->loop)
		bm_loop_free(r->loop);
	if (r->lockfd >= 0)
		close(r->lockfd);
	pthread_mutex_destroy(&r->lock);
	free(r->base);
	free(r->dir);
	free(r);
}
