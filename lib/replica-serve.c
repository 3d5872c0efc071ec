/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The replica's server (docs/replication.md): primaries connect over the
 * channel (repl-channel.c) and send cycles; the operator's commands come
 * over a Unix control socket.  Every request runs under one lock, in
 * order, over the replica directory (replica.c), which does the durable
 * work; this file decides who may do what:
 *
 * - Pairing.  The first primary to say hello is paired: its generation
 *   and a random fencing token are written to DIR/pairing.json, and only
 *   a primary presenting both may begin or commit a cycle.  Another
 *   generation is refused, unless it descends from the paired one at the
 *   replica's latest point with nothing written since (a failover's new
 *   primary taking the old one's disk back: "incremental"), or the
 *   operator allowed a resync (an unrelated disk, or after a split brain
 *   with discard_divergent, the amount divergent said first).
 * - The fence.  A promoted replica is a primary: it refuses every hello.
 * - The mode of the next cycle, told at hello: "incremental" (since a
 *   point both hold), "full" (onto a base known to read as zeroes) or
 *   "digests" (the primary compares XXH3 digests and sends what differs).
 *   A split brain forked at our latest point, whose divergence the old
 *   disk's record gave us (DIR/divergent.bits), is resynced as
 *   "incremental" plus those granules ("divergent": op divergent).  Until
 *   a point is committed over it, every hello resyncs again.
 * - Each cycle's data arrives over NBD into the staging image that
 *   bm_replica_begin made, on a server of its own; commit stops that
 *   server, closes (flushes) the image and commits the point.
 * - Points are exported read-only, and test failovers writable, each on
 *   a server of its own, from the control socket only; so is an
 *   unplanned promotion.  A planned one comes from the paired primary.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <libgen.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "bitmap.h"
#include "checkpoint.h"
#include "durable.h"
#include "errors.h"
#include "internal.h"
#include "repl-channel.h"
#include "repl-state.h"
#include "replica.h"

#define HANDSHAKE_MS 10000
#define RECV_SLICE_MS 500
#define IDLE_MS (10 * 60 * 1000)   /* a silent connection is dropped */
#define MAX_CONNS 16
#define MAX_DIGESTS 65536          /* per digests request */

struct pairing {
	char gen[37];               /* "" unpaired */
	char token[65];
	bool base_zero;             /* the base reads as zeroes (new) */
	int64_t diverged;           /* bytes the base holds after its latest
				       point that no primary sent; -1
				       unknown.  Kept through pairing, until
				       a point is committed over it */
};

struct served {
	struct served *next;
	uint64_t point;
	enum { SERVED_STAGE, SERVED_POINT, SERVED_TEST } kind;
	struct blockmirror_disk *disk;
	struct blockmirror_server *srv;
	char *address;
	char export[64];
};

struct blockmirror_replica_server {
	struct blockmirror_replica_server_options o;
	char *dir, *psk, *nbd_host, *control;
	struct bm_replica *rep;
	struct bm_chan_listener *lis, *ctl;
	pthread_t accept_thread;
	int stop_fd;

	pthread_mutex_t lock;       /* everything below, and rep */
	pthread_cond_t cond;
	bool stopping;
	unsigned nconns;            /* both kinds, for stop */
	unsigned nremote;           /* on the primaries' listener: a flood
				       there never takes the operator's */
	struct pairing pair;
	struct served *stage;       /* the open cycle's */
	struct served *served;      /* exports and test failovers */
};

struct conn {
	struct blockmirror_replica_server *s;
	struct bm_chan *chan;
	bool local;                 /* the control socket: the operator */
};

static void
event(struct blockmirror_replica_server *s,
      enum blockmirror_replica_event_type type, uint64_t point,
      uint64_t bytes, int err, const char *message)
{
	struct blockmirror_replication_event ev = {
		.point = point, .bytes = bytes, .err = err < 0 ? -err : err,
		.message = message,
	};

	if (s->o.on_event)
		s->o.on_event(s->o.event_data, type, &ev);
}

/* ---- the pairing file -------------------------------------------------- */

static char *
dir_file(const struct blockmirror_replica_server *s, const char *name)
{
	char *p = NULL;

	if (asprintf(&p, "%s/%s", s->dir, name) < 0)
		return NULL;
	return p;
}

static int
pairing_load(struct blockmirror_replica_server *s)
{
	char *path = dir_file(s, "pairing.json");
	json_error_t jerr;
	json_t *j;
	const char *g, *t;
	int r = 0;

	if (!path)
		return -ENOMEM;
	memset(&s->pair, 0, sizeof s->pair);
	/* No file: a crash of --create before it was written (after an
	 * adopted point was committed, say): how the disk diverged is not
	 * known, so a resync compares digests. */
	s->pair.diverged = -1;
	j = json_load_file(path, 0, &jerr);
	if (!j) {
		r = access(path, F_OK) == 0 ?
			bm_error(-EINVAL, "%s: not a pairing file (%s)", path,
				 jerr.text) : 0;
		free(path);
		return r;
	}
	g = json_string_value(json_object_get(j, "gen"));
	t = json_string_value(json_object_get(j, "token"));
	if ((g && strlen(g) != 36) || (t && strlen(t) >= sizeof s->pair.token))
		r = bm_error(-EINVAL, "%s: a bad \"gen\" or \"token\"", path);
	if (r == 0 && g)
		strcpy(s->pair.gen, g);
	if (r == 0 && t)
		strcpy(s->pair.token, t);
	s->pair.base_zero = json_is_true(json_object_get(j, "base_zero"));
	s->pair.diverged = json_is_integer(json_object_get(j, "diverged")) ?
		json_integer_value(json_object_get(j, "diverged")) : -1;
	json_decref(j);
	free(path);
	return r;
}

static int
pairing_save(struct blockmirror_replica_server *s)
{
	char *path = dir_file(s, "pairing.json"), *text;
	json_t *j = json_pack("{s:s,s:s,s:b,s:I}", "gen", s->pair.gen,
			      "token", s->pair.token,
			      "base_zero", s->pair.base_zero,
			      "diverged", (json_int_t)s->pair.diverged);
	int r;

	text = j ? json_dumps(j, JSON_INDENT(1)) : NULL;
	json_decref(j);
	if (!path || !text) {
		free(path);
		free(text);
		return bm_error(-ENOMEM, "out of memory");
	}
	r = bm_durable_write_file(path, text, strlen(text), 0600);
	free(text);
	free(path);
	return r;
}

static void
new_token(char out[65])
{
	char a[37], b[37];

	bm_repl_new_uuid(a);
	bm_repl_new_uuid(b);
	snprintf(out, 65, "%.8s%.4s%.4s%.4s%.12s%.8s%.4s%.4s%.4s%.12s",
		 a, a + 9, a + 14, a + 19, a + 24, b, b + 9, b + 14, b + 19,
		 b + 24);
}

/* Divergence stays as it was: until a point of this primary is
 * committed, the latest point is still the disk that diverged, and a
 * hello after a failed first cycle must resync again. */
static int
pair_with(struct blockmirror_replica_server *s, const char *gen)
{
	strcpy(s->pair.gen, gen);
	new_token(s->pair.token);
	return pairing_save(s);
}

/*
 * DIR/divergent.bits: the replica granules an adopted base was written in
 * after its latest point, as the old primary's change record says (one
 * bit a granule, the lowest bit of each byte first).  It is there only
 * while pair.diverged is, and lets a resync after a split brain send the
 * union of both sides' changes instead of comparing every granule.
 */
#define DIVERGENT_FILE "divergent.bits"
#define MAX_DIVERGENT (UINT64_C(1) << 20)  /* granules per request */

static uint64_t
granules(const struct blockmirror_replica_server *s)
{
	uint64_t g = bm_replica_granularity(s->rep);

	return (bm_replica_size(s->rep) + g - 1) / g;
}

static void
divergent_forget(struct blockmirror_replica_server *s)
{
	char *path = dir_file(s, DIVERGENT_FILE);

	if (path && unlink(path) < 0 && errno != ENOENT)
		bm_warn("%s: %s", path, strerror(errno));
	free(path);
}

/* The blocks written since `cp` in `disk`'s record, as replica granules,
 * kept in DIR.  0, or -errno with no file kept. */
static int
divergent_save(struct blockmirror_replica_server *s,
	       struct blockmirror_disk *disk, const char *cp, uint64_t *bytes)
{
	uint64_t g = bm_replica_granularity(s->rep), size = bm_replica_size(s->rep);
	uint64_t len = (granules(s) + 7) / 8, off = 0, run;
	struct bm_bitmap changed = { 0 };
	char *path = dir_file(s, DIVERGENT_FILE);
	uint8_t *bits = calloc(1, len ? len : 1);
	int r = path && bits ? 0 : bm_error(-ENOMEM, "out of memory");

	if (r == 0)
		r = bm_checkpoint_changed(disk, cp, &changed, bytes);
	while (r == 0 && bm_bitmap_next_dirty(&changed, off, 0, &off, &run)) {
		uint64_t end = BM_MIN(off + run, size);

		for (uint64_t k = off / g; k <= (end - 1) / g; k++)
			bits[k / 8] |= (uint8_t)(1u << (k % 8));
		off = end;
	}
	if (r == 0)
		r = bm_durable_write_file(path, bits, len, 0600);
	bm_bitmap_free(&changed);
	free(bits);
	free(path);
	return r;
}

/* The divergence can be resynced by the records: its file is whole. */
static bool
divergent_kept(const struct blockmirror_replica_server *s)
{
	char *path = dir_file(s, DIVERGENT_FILE);
	struct stat st;
	bool ok = path && stat(path, &st) == 0 && S_ISREG(st.st_mode) &&
		  (uint64_t)st.st_size == (granules(s) + 7) / 8;

	free(path);
	return ok && s->pair.diverged > 0;
}

/* ---- NBD servers of images in the directory --------------------------------- */

static void
served_free(struct served *sv)
{
	if (!sv)
		return;
	blockmirror_server_stop(sv->srv);
	if (sv->disk)
		blockmirror_disk_close(sv->disk);
	free(sv->address);
	free(sv);
}

static int
serve_image(struct blockmirror_replica_server *s, const char *image,
	    bool writable, const char *export, uint64_t point, int kind,
	    struct served **out)
{
	struct blockmirror_server_options so = {
		.size = sizeof so, .export_name = export, .readonly = !writable,
	};
	struct served *sv = calloc(1, sizeof *sv);
	char *addr = NULL;
	int r = 0;

	if (!sv)
		return bm_error(-ENOMEM, "out of memory");
	sv->point = point;
	sv->kind = kind;
	snprintf(sv->export, sizeof sv->export, "%s", export);
	if (s->nbd_host) {
		if (asprintf(&addr, "tcp:%s:0", s->nbd_host) < 0)
			addr = NULL;
		so.tls_psk_file = s->psk;
	} else if (asprintf(&addr, "unix:%s/%s.sock", s->dir,
			    kind == SERVED_STAGE ? "stage" : export) < 0) {
		addr = NULL;
	}
	if (!addr) {
		free(sv);
		return bm_error(-ENOMEM, "out of memory");
	}
	sv->disk = blockmirror_disk_open(image, BLOCKMIRROR_FORMAT_AUTO,
					 writable ? 0 :
					 BLOCKMIRROR_DISK_READONLY);
	if (!sv->disk)
		r = -errno;
	if (r == 0)
		r = blockmirror_disk_start_thread(sv->disk);
	if (r == 0 && !(sv->srv = blockmirror_server_start(sv->disk, addr,
							   &so)))
		r = -errno;
	if (r == 0 && !(sv->address = strdup(
			blockmirror_server_address(sv->srv))))
		r = -ENOMEM;
	free(addr);
	if (r < 0) {
		served_free(sv);
		return r;
	}
	*out = sv;
	return 0;
}

/* Stop serving the open cycle's image and flush it: the cycle goes on
 * to commit or abort. */
static int
stage_close(struct blockmirror_replica_server *s)
{
	struct served *sv = s->stage;
	int r = 0;

	if (!sv)
		return 0;
	s->stage = NULL;
	blockmirror_server_stop(sv->srv);
	sv->srv = NULL;
	r = blockmirror_disk_close(sv->disk);
	sv->disk = NULL;
	served_free(sv);
	return r;
}

/* An open cycle nobody will finish (its primary came back, or we stop). */
static void
cycle_abandon(struct blockmirror_replica_server *s, const char *why)
{
	uint64_t point = s->stage ? s->stage->point : 0;

	if (!s->stage)
		return;
	stage_close(s);
	bm_replica_abort(s->rep);
	event(s, BLOCKMIRROR_REPLICA_CYCLE_ABORTED, point, 0, 0, why);
}

/* ---- requests --------------------------------------------------------------- */

struct req {
	struct blockmirror_replica_server *s;
	struct conn *c;
	json_t *in;
	json_t *out;      /* the result object */
};

static int
get_u64(struct req *q, const char *key, bool required, uint64_t *v)
{
	json_t *j = json_object_get(q->in, key);

	if (!j && !required)
		return 0;
	if (!json_is_integer(j) || json_integer_value(j) < 0)
		return bm_error(-EINVAL, "\"%s\" must be a whole number", key);
	*v = (uint64_t)json_integer_value(j);
	return 0;
}

static int
get_str(struct req *q, const char *key, size_t max, const char **v)
{
	const char *s = json_string_value(json_object_get(q->in, key));

	if (!s || strlen(s) > max)
		return bm_error(-EINVAL, "\"%s\" must be a string of at most "
				"%zu bytes", key, max);
	*v = s;
	return 0;
}

/* Compared in a time that does not depend on where they differ. */
static bool
same_secret(const char *a, const char *b)
{
	size_t la = strlen(a), lb = strlen(b);
	unsigned char d = la != lb;

	for (size_t i = 0; i < la && i < lb; i++)
		d |= (unsigned char)(a[i] ^ b[i]);
	return d == 0;
}

static int
check_token(struct req *q)
{
	const char *t;

	if (get_str(q, "token", 64, &t) < 0 || !q->s->pair.gen[0] ||
	    !same_secret(t, q->s->pair.token))
		return bm_error(-EACCES, "this replica is paired with another "
				"primary (generation %s): the fencing token "
				"does not match",
				q->s->pair.gen[0] ? q->s->pair.gen : "none");
	return 0;
}

static bool
is_primary(struct blockmirror_replica_server *s)
{
	return strcmp(bm_replica_role(s->rep), "primary") == 0;
}

static int
refuse_primary(struct blockmirror_replica_server *s)
{
	struct bm_replica_gen g;

	bm_replica_get_gen(s->rep, &g);
	return bm_error(-EROFS, "this replica was promoted: it is a primary "
			"now (generation %s) and takes no replication; make "
			"the old primary its replica instead", g.current);
}

/* The latest point's number and generation; false if none. */
static bool
latest_point(struct blockmirror_replica_server *s, uint64_t *n, char gen[37])
{
	struct bm_replica_point *l = NULL;
	size_t cnt = 0;
	bool found = false;

	if (bm_replica_points(s->rep, &l, &cnt) < 0)
		return false;
	for (size_t i = 0; i < cnt; i++)
		if (l[i].latest) {
			*n = l[i].number;
			strcpy(gen, l[i].gen);
			found = true;
		}
	free(l);
	return found;
}

/*
 * hello: who the primary is, and how its next cycle must go.  See the
 * pairing rules at the top: a paired replica takes only its primary (the
 * generation and the token); an unpaired one (new, adopted, or released
 * by the operator with "unpair") decides by lineage.
 */
static int
op_hello(struct req *q)
{
	struct blockmirror_replica_server *s = q->s;
	const char *gen, *mode = "incremental";
	json_t *hist = json_object_get(q->in, "history"), *e;
	uint64_t size = 0, latest = 0, fork = 0;
	char lgen[37] = "";
	bool have, forked = false, resync_ok, discard, paired, by_record;
	size_t i;
	int r;

	if ((r = get_str(q, "gen", 36, &gen)) < 0 ||
	    (r = get_u64(q, "size", true, &size)) < 0)
		return r;
	if (is_primary(s))
		return refuse_primary(s);
	resync_ok = json_is_true(json_object_get(q->in, "resync_ok"));
	discard = json_is_true(json_object_get(q->in, "discard_divergent"));
	/* Forked at the point we hold, which diverged after it by what the
	 * record kept says: the union of that and the primary's own
	 * changes since the fork is what differs (a primary that can). */
	if (size != bm_replica_size(s->rep))
		return bm_error(-ESTALE, "this replica holds a disk of %" PRIu64
				" bytes; the primary's has %" PRIu64,
				bm_replica_size(s->rep), size);
	have = latest_point(s, &latest, lgen);
	json_array_foreach(hist, i, e) {
		const char *hg = json_string_value(json_object_get(e, "gen"));

		if (have && hg && strcmp(hg, lgen) == 0) {
			forked = true;
			fork = json_integer_value(json_object_get(e, "point"));
		}
	}
	paired = s->pair.gen[0] != '\0';
	by_record = forked && fork == latest && divergent_kept(s) &&
		    json_is_true(json_object_get(q->in, "divergent_ok"));
	if (paired) {
		if (strcmp(s->pair.gen, gen))
			return bm_error(-EEXIST, "this replica is paired with "
					"another primary (generation %s); its "
					"operator can release it for this one "
					"with bmirror replica unpair",
					s->pair.gen);
		if ((r = check_token(q)) < 0)
			return r;
		/* Until its first commit here the latest point may still
		 * be a disk that diverged (a failed first cycle). */
		if (!have)
			mode = s->pair.base_zero ? "full" : "digests";
		else if (s->pair.diverged ||
			 (strcmp(lgen, gen) && !(forked && fork == latest)))
			mode = by_record ? "incremental" : "digests";
	} else if (!have) {
		mode = s->pair.base_zero ? "full" : "digests";
	} else if (strcmp(lgen, gen) == 0) {
		mode = s->pair.diverged ? "digests" : "incremental";
	} else if (forked && fork == latest && s->pair.diverged == 0) {
		/* A failover's new primary, from the point we hold. */
	} else if (forked) {
		char amount[96];

		if (s->pair.diverged < 0)
			snprintf(amount, sizeof amount, "an unknown amount");
		else
			snprintf(amount, sizeof amount, "%s%" PRId64 " bytes",
				 latest > fork ? "at least " : "",
				 s->pair.diverged);
		if (!discard)
			return bm_error(-EEXIST, "split brain: this replica's "
					"disk is generation %s point %" PRIu64
					", but the primary's line forked from "
					"point %" PRIu64 " of it: the replica "
					"holds writes the primary does not "
					"have (%s%s); resync with "
					"discard_divergent to overwrite them",
					lgen, latest, fork, amount,
					latest > fork ? ", and the points "
					"after the fork" : "");
		mode = by_record ? "incremental" : "digests";
	} else {
		if (!resync_ok)
			return bm_error(-ESTALE, "this replica holds points of "
					"another disk (generation %s, point "
					"%" PRIu64 "); resync to overwrite it "
					"with this one", lgen, latest);
		mode = "digests";
	}
	if (!paired) {
		if ((r = pair_with(s, gen)) < 0)
			return r;
		event(s, BLOCKMIRROR_REPLICA_PAIRED, latest, 0, 0,
		      bm_chan_peer(q->c->chan));
	}
	q->out = json_pack("{s:s,s:I,s:I,s:s,s:s,s:b}", "role", "replica",
			   "size", (json_int_t)bm_replica_size(s->rep),
			   "granularity",
			   (json_int_t)bm_replica_granularity(s->rep),
			   "mode", mode, "token", s->pair.token,
			   "base_zero", s->pair.base_zero);
	if (have) {
		json_object_set_new(q->out, "latest", json_integer(
					    (json_int_t)latest));
		json_object_set_new(q->out, "latest_gen", json_string(lgen));
	}
	/* The granules to send besides its own changes: op divergent. */
	if (by_record && strcmp(mode, "incremental") == 0)
		json_object_set_new(q->out, "divergent", json_true());
	return 0;
}

/* The operator releases the replica from its primary: the next primary
 * to say hello is paired, by the lineage rules. */
static int
op_unpair(struct req *q)
{
	struct blockmirror_replica_server *s = q->s;

	cycle_abandon(s, "the operator unpaired the replica");
	s->pair.gen[0] = '\0';
	s->pair.token[0] = '\0';
	q->out = json_object();
	return pairing_save(s);
}

static int
op_begin(struct req *q)
{
	struct blockmirror_replica_server *s = q->s;
	uint64_t point = 0;
	const char *gen;
	char *image = NULL;
	struct served *sv = NULL;
	int r;

	if (is_primary(s))
		return refuse_primary(s);
	if ((r = check_token(q)) < 0 || (r = get_str(q, "gen", 36, &gen)) < 0 ||
	    (r = get_u64(q, "point", true, &point)) < 0)
		return r;
	if (strcmp(gen, s->pair.gen))
		return bm_error(-EACCES, "begin from generation %s, but this "
				"replica is paired with %s", gen, s->pair.gen);
	cycle_abandon(s, "a new cycle began");
	if (s->pair.base_zero) {
		/* The first point may write into the base: from now on it
		 * is not known to read as zeroes. */
		s->pair.base_zero = false;
		if ((r = pairing_save(s)) < 0)
			return r;
	}
	r = bm_replica_begin(s->rep, point, gen, &image);
	if (r == 0) {
		char name[64], secret[65];

		/* Named at random, told only to this primary: another peer
		 * with the key cannot find the data path. */
		new_token(secret);
		snprintf(name, sizeof name, "stage-%.32s", secret);
		r = serve_image(s, image, true, name, point, SERVED_STAGE,
				&sv);
		if (r < 0)
			bm_replica_abort(s->rep);
	}
	free(image);
	if (r < 0)
		return r;
	s->stage = sv;
	event(s, BLOCKMIRROR_REPLICA_CYCLE_BEGUN, point, 0, 0, NULL);
	q->out = json_pack("{s:s,s:s}", "nbd", sv->address, "export",
			   sv->export);
	return 0;
}

static int
op_commit(struct req *q)
{
	struct blockmirror_replica_server *s = q->s;
	uint64_t point = 0, bytes = 0, instant = 0;
	const char *stage;
	bool app = json_is_true(json_object_get(q->in, "app_consistent"));
	int r;

	if ((r = check_token(q)) < 0 ||
	    (r = get_u64(q, "point", true, &point)) < 0 ||
	    (r = get_u64(q, "bytes", false, &bytes)) < 0 ||
	    (r = get_u64(q, "instant_ns", true, &instant)) < 0)
		return r;
	if (!s->stage || s->stage->point != point)
		return bm_error(-ENOENT, "no cycle for point %" PRIu64 " is "
				"open", point);
	/* The stage this cycle began, not a later one of the same point (a
	 * commit late from a connection the primary gave up on).  Older
	 * primaries do not name it. */
	stage = json_string_value(json_object_get(q->in, "export"));
	if (stage && strcmp(stage, s->stage->export))
		return bm_error(-ENOENT, "the cycle of point %" PRIu64 " that "
				"began on that export is over", point);
	r = stage_close(s);
	if (r < 0) {
		bm_replica_abort(s->rep);
		event(s, BLOCKMIRROR_REPLICA_CYCLE_ABORTED, point, 0, r,
		      blockmirror_last_error());
		return r;
	}
	r = bm_replica_commit(s->rep, (int64_t)instant, bytes, app);
	if (r < 0) {
		int e = r;
		char msg[256];

		snprintf(msg, sizeof msg, "%s", blockmirror_last_error() ?
			 blockmirror_last_error() : strerror(-e));
		bm_replica_abort(s->rep);
		event(s, BLOCKMIRROR_REPLICA_CYCLE_ABORTED, point, 0, e, msg);
		return bm_error(e, "%s", msg);
	}
	/* The point was sent whole over the divergence: it is gone.  A
	 * failure to say so costs one more resync, nothing else. */
	if (s->pair.diverged) {
		s->pair.diverged = 0;
		if (pairing_save(s) < 0)
			bm_warn("%s", blockmirror_last_error());
		divergent_forget(s);
	}
	event(s, BLOCKMIRROR_REPLICA_POINT_COMMITTED, point, bytes, 0, NULL);
	q->out = json_pack("{s:I}", "point", (json_int_t)point);
	return 0;
}

static int
op_abort(struct req *q)
{
	int r = check_token(q);

	if (r < 0)
		return r;
	cycle_abandon(q->s, "the primary aborted it");
	q->out = json_object();
	return 0;
}

static int
op_digests(struct req *q)
{
	struct blockmirror_replica_server *s = q->s;
	uint64_t off = 0, count = 0, point = 0, g = bm_replica_granularity(s->rep);
	uint64_t *d;
	uint8_t *bytes;
	int r;

	if ((r = get_u64(q, "offset", true, &off)) < 0 ||
	    (r = get_u64(q, "count", true, &count)) < 0 ||
	    (r = get_u64(q, "point", false, &point)) < 0)
		return r;
	if (!q->c->local && (r = check_token(q)) < 0)
		return r;
	if (!count || count > MAX_DIGESTS || off % g ||
	    off >= bm_replica_size(s->rep))
		return bm_error(-EINVAL, "digests of %" PRIu64 " granules at "
				"%" PRIu64 ": at most %d, granule-aligned, "
				"inside the disk", count, off, MAX_DIGESTS);
	count = BM_MIN(count, (bm_replica_size(s->rep) - off + g - 1) / g);
	d = calloc(count, sizeof *d);
	bytes = malloc(count * 8);
	if (!d || !bytes) {
		free(d);
		free(bytes);
		return bm_error(-ENOMEM, "out of memory");
	}
	r = bm_replica_digests(s->rep, point, off,
			       BM_MIN(count * g, bm_replica_size(s->rep) - off),
			       d);
	for (uint64_t i = 0; r == 0 && i < count; i++)
		for (int b = 0; b < 8; b++)
			bytes[i * 8 + b] = (uint8_t)(d[i] >> (8 * b));
	if (r == 0) {
		q->out = json_object();
		r = bm_chan_b64_put(q->out, "digests", bytes, count * 8);
	}
	free(d);
	free(bytes);
	return r;
}

/*
 * divergent: bits of the granules [offset / granularity, + count) that
 * the adopted base was written in after its latest point (a multiple of
 * 8 granules from the start), the lowest bit of each byte first.
 */
static int
op_divergent(struct req *q)
{
	struct blockmirror_replica_server *s = q->s;
	uint64_t off = 0, count = 0, g = bm_replica_granularity(s->rep);
	uint64_t first, len;
	char *path = NULL;
	uint8_t *bytes = NULL;
	ssize_t n;
	int fd = -1, r;

	if ((r = get_u64(q, "offset", true, &off)) < 0 ||
	    (r = get_u64(q, "count", true, &count)) < 0)
		return r;
	if (!q->c->local && (r = check_token(q)) < 0)
		return r;
	if (!count || count > MAX_DIVERGENT || off % (8 * g) ||
	    off >= bm_replica_size(s->rep))
		return bm_error(-EINVAL, "divergent granules: %" PRIu64 " at "
				"%" PRIu64 ": at most %" PRIu64 ", from a "
				"multiple of 8 granules, inside the disk",
				count, off, MAX_DIVERGENT);
	if (!divergent_kept(s))
		return bm_error(-ENOENT, "this replica keeps no record of how "
				"its disk diverged");
	first = off / g / 8;
	len = BM_MIN((count + 7) / 8, (granules(s) + 7) / 8 - first);
	path = dir_file(s, DIVERGENT_FILE);
	bytes = malloc(len);
	if (!path || !bytes) {
		r = bm_error(-ENOMEM, "out of memory");
		goto out;
	}
	fd = open(path, O_RDONLY | O_CLOEXEC);
	n = fd < 0 ? -1 : pread(fd, bytes, len, (off_t)first);
	if (n != (ssize_t)len) {
		r = bm_error(n < 0 ? -errno : -EIO, "%s: %s", path,
			     n < 0 ? strerror(errno) : "short read");
		goto out;
	}
	q->out = json_object();
	r = bm_chan_b64_put(q->out, "bits", bytes, len);
out:
	if (fd >= 0)
		close(fd);
	free(bytes);
	free(path);
	return r;
}

static json_t *
point_json(const struct bm_replica_point *p)
{
	return json_pack("{s:I,s:I,s:I,s:I,s:b,s:b,s:b,s:b,s:s,s:s}",
			 "point", (json_int_t)p->number,
			 "instant_ns", (json_int_t)p->instant_ns,
			 "committed_ns", (json_int_t)p->committed_ns,
			 "bytes", (json_int_t)p->bytes,
			 "app_consistent", p->app_consistent,
			 "retained", p->retained, "pinned", p->pinned,
			 "latest", p->latest, "gen", p->gen,
			 "image", p->image);
}

static int
op_points(struct req *q)
{
	struct bm_replica_point *l = NULL;
	size_t n = 0;
	json_t *a;
	int r = bm_replica_points(q->s->rep, &l, &n);

	if (r < 0)
		return r;
	a = json_array();
	for (size_t i = 0; i < n; i++)
		json_array_append_new(a, point_json(&l[i]));
	free(l);
	q->out = json_pack("{s:o}", "points", a);
	return 0;
}

static int
op_status(struct req *q)
{
	struct blockmirror_replica_server *s = q->s;
	struct bm_replica_gen g;
	struct bm_replica_point *l = NULL;
	size_t n = 0;
	json_t *ex = json_array();
	struct timespec ts;

	bm_replica_get_gen(s->rep, &g);
	q->out = json_pack("{s:s,s:s,s:s,s:I,s:I,s:s,s:b}", "dir", s->dir,
			   "image", bm_replica_base(s->rep),
			   "role", bm_replica_role(s->rep),
			   "size", (json_int_t)bm_replica_size(s->rep),
			   "granularity",
			   (json_int_t)bm_replica_granularity(s->rep),
			   "generation", g.current,
			   "cycle_open", s->stage != NULL);
	if (s->pair.gen[0])
		json_object_set_new(q->out, "paired_gen",
				    json_string(s->pair.gen));
	clock_gettime(CLOCK_REALTIME, &ts);
	if (bm_replica_points(s->rep, &l, &n) == 0) {
		for (size_t i = 0; i < n; i++)
			if (l[i].latest) {
				int64_t now = (int64_t)ts.tv_sec * 1000000000 +
					      ts.tv_nsec;

				json_object_set_new(q->out, "latest",
						    point_json(&l[i]));
				json_object_set_new(q->out, "latest_age_ms",
					json_integer((now - l[i].instant_ns) /
						     1000000));
			}
		json_object_set_new(q->out, "points", json_integer(
					    (json_int_t)n));
		free(l);
	}
	for (struct served *sv = s->served; sv; sv = sv->next)
		json_array_append_new(ex, json_pack("{s:I,s:s,s:s,s:s}",
			"point", (json_int_t)sv->point,
			"kind", sv->kind == SERVED_TEST ? "test" : "point",
			"nbd", sv->address, "export", sv->export));
	json_object_set_new(q->out, "exports", ex);
	return 0;
}

static struct served **
find_served(struct blockmirror_replica_server *s, uint64_t point, int kind)
{
	for (struct served **p = &s->served; *p; p = &(*p)->next)
		if ((*p)->point == point && (int)(*p)->kind == kind)
			return p;
	return NULL;
}

/* export / test-failover: serve point P read-only, or a writable overlay
 * of it; unexport / test-discard end it. */
static int
op_serve_point(struct req *q, bool test)
{
	struct blockmirror_replica_server *s = q->s;
	uint64_t point = 0;
	char *image = NULL, name[32];
	struct served *sv = NULL;
	int r, kind = test ? SERVED_TEST : SERVED_POINT;

	if ((r = get_u64(q, "point", true, &point)) < 0)
		return r;
	if (!point && (r = bm_replica_latest(s->rep, &point)) < 0)
		return bm_error(r, "the replica holds no point yet");
	if (find_served(s, point, kind))
		return bm_error(-EEXIST, "point %" PRIu64 " is served for %s "
				"already", point, test ? "a test failover" :
				"reading");
	r = test ? bm_replica_test_overlay(s->rep, point, &image)
		 : bm_replica_pin(s->rep, point, &image);
	if (r < 0)
		return r;
	snprintf(name, sizeof name, "%s-%" PRIu64, test ? "test" : "point",
		 point);
	r = serve_image(s, image, test, name, point, kind, &sv);
	free(image);
	if (r < 0) {
		if (test)
			bm_replica_test_discard(s->rep, point);
		else
			bm_replica_unpin(s->rep, point);
		return r;
	}
	sv->next = s->served;
	s->served = sv;
	q->out = json_pack("{s:I,s:s,s:s}", "point", (json_int_t)point,
			   "nbd", sv->address, "export", sv->export);
	return 0;
}

static int
op_unserve_point(struct req *q, bool test)
{
	struct blockmirror_replica_server *s = q->s;
	uint64_t point = 0;
	struct served **p, *sv;
	int r;

	if ((r = get_u64(q, "point", true, &point)) < 0)
		return r;
	p = find_served(s, point, test ? SERVED_TEST : SERVED_POINT);
	if (!p)
		return bm_error(-ENOENT, "point %" PRIu64 " is not served for "
				"%s", point, test ? "a test failover" :
				"reading");
	sv = *p;
	*p = sv->next;
	served_free(sv);
	r = test ? bm_replica_test_discard(s->rep, point)
		 : bm_replica_unpin(s->rep, point);
	if (r == 0)
		q->out = json_object();
	return r;
}

/*
 * The disk becomes a primary of its own: bm_replica_promote makes the
 * point the base image; then the new primary's replication state (a new
 * generation descending from the old one at that point) is written next
 * to it, and checkpoint repl-P is created in its change record, so that
 * replicating back to the old primary's disk sends only what changes
 * from now on.
 */
static int
promote(struct blockmirror_replica_server *s, uint64_t point, bool planned,
	json_t **out)
{
	struct bm_repl_state st = { 0 };
	struct bm_replica_gen g;
	struct blockmirror_disk *disk = NULL;
	char *image = NULL, *state = NULL, cp[64];
	uint64_t discarded = 0;
	int r;

	if (s->served)
		return bm_error(-EBUSY, "points are exported or under a test "
				"failover: end those first");
	cycle_abandon(s, "the replica is being promoted");
	if (!point && (r = bm_replica_latest(s->rep, &point)) < 0)
		return bm_error(r, "the replica holds no point to promote");
	r = bm_replica_promote(s->rep, point, &image, &discarded);
	if (r < 0)
		return r;
	r = bm_replica_get_gen(s->rep, &g);
	if (r == 0) {
		strcpy(st.gen, g.current);
		st.nhistory = BM_MIN(g.nhistory, BM_REPL_MAX_HISTORY);
		for (unsigned i = 0; i < st.nhistory; i++) {
			strcpy(st.history[i].gen, g.history[i].gen);
			st.history[i].point = g.history[i].point;
		}
		if (asprintf(&state, "%s.bmirror-repl", image) < 0)
			r = -ENOMEM;
	}
	if (r == 0)
		r = bm_repl_state_save(state, &st);
	snprintf(cp, sizeof cp, "repl-%" PRIu64, point);
	if (r == 0 && !(disk = blockmirror_disk_open(image,
						     BLOCKMIRROR_FORMAT_AUTO,
						     0)))
		r = -errno;
	if (r == 0)
		r = blockmirror_disk_track(disk, NULL, 0, NULL);
	if (r == 0)
		r = blockmirror_checkpoint_create(disk, cp);
	if (disk) {
		int c = blockmirror_disk_close(disk);

		if (r == 0)
			r = c;
	}
	if (r == 0) {
		event(s, BLOCKMIRROR_REPLICA_PROMOTED, point, discarded, 0,
		      image);
		*out = json_pack("{s:s,s:I,s:s,s:I,s:b}", "gen", g.current,
				 "point", (json_int_t)point, "image", image,
				 "discarded_bytes", (json_int_t)discarded,
				 "planned", planned);
	}
	free(state);
	free(image);
	return r;
}

static int
op_promote(struct req *q)
{
	uint64_t point = 0;
	bool planned = json_is_true(json_object_get(q->in, "planned"));
	int r;

	if (is_primary(q->s))
		return refuse_primary(q->s);
	if ((r = get_u64(q, "point", false, &point)) < 0)
		return r;
	if (planned && (r = check_token(q)) < 0)
		return r;
	if (!planned && !q->c->local)
		return bm_error(-EPERM, "an unplanned promotion is the "
				"operator's: only over the control socket");
	return promote(q->s, point, planned, &q->out);
}

static int
dispatch(struct req *q)
{
	const char *op = json_string_value(json_object_get(q->in, "op"));
	bool local = q->c->local;

	if (!op)
		return bm_error(-EINVAL, "a request needs an \"op\"");
	if (strcmp(op, "hello") == 0)
		return op_hello(q);
	if (strcmp(op, "begin") == 0)
		return op_begin(q);
	if (strcmp(op, "commit") == 0)
		return op_commit(q);
	if (strcmp(op, "abort") == 0)
		return op_abort(q);
	if (strcmp(op, "digests") == 0)
		return op_digests(q);
	if (strcmp(op, "divergent") == 0)
		return op_divergent(q);
	if (strcmp(op, "promote") == 0)
		return op_promote(q);
	if (local && strcmp(op, "status") == 0)
		return op_status(q);
	if (local && strcmp(op, "points") == 0)
		return op_points(q);
	if (local && strcmp(op, "unpair") == 0)
		return op_unpair(q);
	if (local && strcmp(op, "export") == 0)
		return op_serve_point(q, false);
	if (local && strcmp(op, "unexport") == 0)
		return op_unserve_point(q, false);
	if (local && strcmp(op, "test-failover") == 0)
		return op_serve_point(q, true);
	if (local && strcmp(op, "test-discard") == 0)
		return op_unserve_point(q, true);
	return bm_error(-EINVAL, "unknown op \"%.64s\"%s", op, local ? "" :
			" (status, points, exports, test failovers, unpair "
			"and unplanned promotions are the control socket's)");
}

/* ---- connections ------------------------------------------------------------- */

static void *
conn_thread(void *arg)
{
	struct conn *c = arg;
	struct blockmirror_replica_server *s = c->s;
	uint64_t idle = 0;
	int r = bm_chan_handshake(c->chan, HANDSHAKE_MS);

	while (r == 0) {
		struct req q = { .s = s, .c = c };
		const char *m;
		bool stopping;

		pthread_mutex_lock(&s->lock);
		stopping = s->stopping;
		pthread_mutex_unlock(&s->lock);
		if (stopping)
			break;
		r = bm_chan_recv(c->chan, &q.in, RECV_SLICE_MS);
		if (r == -ETIMEDOUT) {
			idle += RECV_SLICE_MS;
			r = idle >= IDLE_MS ? -ETIMEDOUT : 0;
			continue;
		}
		if (r < 0)
			break;
		idle = 0;
		pthread_mutex_lock(&s->lock);
		r = s->stopping ? bm_error(-ESHUTDOWN, "the replica is "
					   "stopping") : dispatch(&q);
		pthread_mutex_unlock(&s->lock);
		m = r < 0 ? blockmirror_last_error() : NULL;
		if (r < 0 && q.in &&
		    strcmp(json_string_value(json_object_get(q.in, "op")) ?: "",
			   "hello") == 0)
			event(s, BLOCKMIRROR_REPLICA_REFUSED, 0, 0, r, m);
		r = bm_chan_reply(c->chan, r < 0 ? NULL : q.out, r,
				  r < 0 ? (m ? m : strerror(-r)) : NULL, 10000);
		json_decref(q.in);
		json_decref(q.out);
	}
	bm_chan_close(c->chan);
	pthread_mutex_lock(&s->lock);
	s->nconns--;
	s->nremote -= !c->local;
	pthread_cond_broadcast(&s->cond);
	pthread_mutex_unlock(&s->lock);
	free(c);
	return NULL;
}

static void
accept_one(struct blockmirror_replica_server *s,
	   struct bm_chan_listener *l, bool local)
{
	struct conn *c;
	struct bm_chan *ch = NULL;
	pthread_attr_t a;
	pthread_t t;

	if (bm_chan_accept(l, 0, &ch) < 0)
		return;
	pthread_mutex_lock(&s->lock);
	if ((local ? s->nconns - s->nremote : s->nremote) >= MAX_CONNS ||
	    !(c = calloc(1, sizeof *c))) {
		pthread_mutex_unlock(&s->lock);
		bm_chan_close(ch);
		return;
	}
	c->s = s;
	c->chan = ch;
	c->local = local;
	s->nconns++;
	s->nremote += !local;
	pthread_attr_init(&a);
	pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
	if (pthread_create(&t, &a, conn_thread, c)) {
		s->nconns--;
		s->nremote -= !local;
		bm_chan_close(ch);
		free(c);
	}
	pthread_attr_destroy(&a);
	pthread_mutex_unlock(&s->lock);
}

static void *
accept_thread(void *arg)
{
	struct blockmirror_replica_server *s = arg;

	for (;;) {
		struct pollfd p[3] = {
			{ .fd = s->stop_fd, .events = POLLIN },
			{ .fd = bm_chan_listener_fd(s->lis), .events = POLLIN },
			{ .fd = bm_chan_listener_fd(s->ctl), .events = POLLIN },
		};

		if (poll(p, 3, -1) < 0 && errno != EINTR)
			break;
		if (p[0].revents)
			break;
		if (p[1].revents)
			accept_one(s, s->lis, false);
		if (p[2].revents)
			accept_one(s, s->ctl, true);
	}
	return NULL;
}

/* ---- start and stop -------------------------------------------------------- */

/* The host part of "tcp:HOST:PORT" (NULL for unix:). */
static char *
tcp_host(const char *addr)
{
	const char *h, *colon;

	if (strncmp(addr, "tcp:", 4))
		return NULL;
	h = addr + 4;
	colon = strrchr(h, ':');
	if (!colon)
		return NULL;
	return strndup(h, (size_t)(colon - h));
}

/*
 * Make DIR a replica of `base`, the old primary's disk after a failover
 * (its state file says which generation and point it holds): that point
 * becomes the replica's latest, and what the old primary wrote after it
 * (its change record says) is the divergent amount a resync must own up
 * to.  A base without a state file is a seed: no point yet, digests.
 */
static int
adopt(struct blockmirror_replica_server *s)
{
	struct bm_repl_state st;
	char *state = NULL, *image = NULL;
	struct blockmirror_disk *disk;
	uint64_t point;
	int r;

	s->pair.diverged = -1;
	if (asprintf(&state, "%s.bmirror-repl", s->o.base) < 0)
		return -ENOMEM;
	r = bm_repl_state_load(state, &st);
	free(state);
	if (r == -ENOENT || (r == 0 && !st.committed))
		return 0;
	if (r < 0)
		return r;
	/*
	 * The point it holds: its newest trusted repl-M (the replica may
	 * have committed M while this side died before writing its state
	 * file: M is then the truth, and the state file's point older), and
	 * what it wrote since: the divergent amount.
	 */
	point = st.committed;
	disk = blockmirror_disk_open(s->o.base, BLOCKMIRROR_FORMAT_AUTO, 0);
	if (disk) {
		struct blockmirror_checkpoint *l = NULL;
		size_t n = 0;

		if (blockmirror_disk_track(disk, NULL, 0, NULL) == 0 &&
		    blockmirror_checkpoint_list(disk, &l, &n) == 0)
			for (size_t i = 0; i < n; i++) {
				unsigned long long k;
				int end = 0;

				if (sscanf(l[i].name, "repl-%llu%n", &k,
					   &end) != 1 || l[i].name[end] ||
				    !l[i].trusted || k < point ||
				    (k == point && s->pair.diverged >= 0))
					continue;
				point = k;
				s->pair.diverged = (int64_t)l[i].changed_bytes;
			}
		free(l);
		/* What it wrote since, granule by granule, for a resync that
		 * reads only that and the new primary's changes.  Without it
		 * a resync compares digests. */
		if (s->pair.diverged >= 0) {
			char cp[48];
			uint64_t bytes = 0;

			snprintf(cp, sizeof cp, "repl-%" PRIu64, point);
			/* changed_bytes above counts only up to the next
			 * checkpoint: without the whole record, unknown. */
			s->pair.diverged = divergent_save(s, disk, cp,
							  &bytes) == 0 ?
					   (int64_t)bytes : -1;
			if (s->pair.diverged <= 0)
				divergent_forget(s);
		}
		blockmirror_disk_close(disk);
	}
	r = bm_replica_begin(s->rep, point, st.gen, &image);
	free(image);
	if (r == 0)
		r = bm_replica_commit(s->rep, st.committed_instant_ns, 0, false);
	/* Unpaired: the next primary is paired by its lineage. */
	return r;
}

static int
open_dir(struct blockmirror_replica_server *s)
{
	struct bm_replica_policy p = { .keep = s->o.keep,
				       .every_s = s->o.every_s };
	int r;

	if (s->o.create) {
		uint64_t size = s->o.disk_size;

		if (s->o.base) {
			struct blockmirror_disk *d = blockmirror_disk_open(
				s->o.base, BLOCKMIRROR_FORMAT_AUTO,
				BLOCKMIRROR_DISK_READONLY);

			if (!d)
				return -errno;
			size = blockmirror_disk_get_size(d);
			blockmirror_disk_close(d);
		}
		if (!size)
			return bm_error(-EINVAL, "a new replica needs the "
					"disk's size or a base image");
		r = bm_replica_create(s->dir, size, s->o.base,
				      s->o.granularity, &s->rep);
		if (r < 0)
			return r;
		s->pair.base_zero = !s->o.base;
		s->pair.diverged = 0;
		if (s->o.base && (r = adopt(s)) < 0)
			return r;
		r = pairing_save(s);
		if (r == 0)
			r = bm_replica_set_policy(s->rep, &p);
		return r;
	}
	r = bm_replica_open(s->dir, &s->rep);
	if (r == 0)
		r = pairing_load(s);
	if (r == 0 && s->o.set_policy)
		r = bm_replica_set_policy(s->rep, &p);
	return r;
}

static void
server_free(struct blockmirror_replica_server *s)
{
	while (s->served) {
		struct served *sv = s->served;

		s->served = sv->next;
		served_free(sv);
	}
	if (s->rep)
		cycle_abandon(s, "the replica server stops");
	bm_replica_close(s->rep);
	bm_chan_listener_close(s->lis);
	bm_chan_listener_close(s->ctl);
	if (s->stop_fd >= 0)
		close(s->stop_fd);
	free(s->dir);
	free(s->psk);
	free(s->nbd_host);
	free(s->control);
	pthread_mutex_destroy(&s->lock);
	pthread_cond_destroy(&s->cond);
	free(s);
}

/* Backing files of the points live in DIR, and the base may live in its
 * own directory: both are trusted. */
static int
allow_dirs(struct blockmirror_replica_server *s)
{
	char *copy;
	int r = blockmirror_allow_backing_dir(s->dir, 0);

	if (r == 0 && s->o.base && (copy = strdup(s->o.base))) {
		r = blockmirror_allow_backing_dir(dirname(copy), 0);
		free(copy);
	}
	return r;
}

BM_EXPORT int
blockmirror_replica_server_start(
	const struct blockmirror_replica_server_options *options,
	struct blockmirror_replica_server **out)
{
	struct blockmirror_replica_server *s;
	char *real;
	int r;

	if (!options || !out || !options->dir || !options->listen ||
	    options->size < offsetof(struct blockmirror_replica_server_options,
				     event_data))
		return bm_error(-EINVAL, "replica server: missing options, "
				"directory or listen address");
	if (strncmp(options->listen, "tcp:", 4) == 0 &&
	    !options->tls_psk_file)
		return bm_error(-EINVAL, "replica server on %s: TCP needs a "
				"TLS pre-shared key file", options->listen);
	s = calloc(1, sizeof *s);
	if (!s)
		return -ENOMEM;
	s->stop_fd = -1;
	pthread_mutex_init(&s->lock, NULL);
	pthread_cond_init(&s->cond, NULL);
	memcpy(&s->o, options, BM_MIN(options->size, sizeof s->o));
	if (options->create && (r = bm_durable_mkdir(options->dir, 0700)) < 0)
		goto fail;
	real = realpath(options->dir, NULL);
	if (!real) {
		r = bm_error(-errno, "%s: %s", options->dir, strerror(errno));
		goto fail;
	}
	s->dir = real;
	s->psk = options->tls_psk_file ? strdup(options->tls_psk_file) : NULL;
	s->nbd_host = options->nbd_host ? strdup(options->nbd_host)
					: tcp_host(options->listen);
	if (options->control)
		s->control = strdup(options->control);
	else if (asprintf(&s->control, "%s/control.sock", s->dir) < 0)
		s->control = NULL;
	if (!s->control) {
		r = -ENOMEM;
		goto fail;
	}
	r = allow_dirs(s);
	if (r == 0)
		r = open_dir(s);
	if (r == 0)
		r = bm_chan_listen(options->listen, s->psk, &s->lis);
	if (r == 0) {
		char *ctl = NULL;

		if (asprintf(&ctl, "unix:%s", s->control) < 0)
			r = -ENOMEM;
		else
			r = bm_chan_listen(ctl, NULL, &s->ctl);
		free(ctl);
	}
	if (r == 0 && (s->stop_fd = eventfd(0, EFD_CLOEXEC)) < 0)
		r = -errno;
	if (r == 0 && (r = -pthread_create(&s->accept_thread, NULL,
					   accept_thread, s)) < 0)
		bm_error(r, "replica server: cannot start a thread");
	if (r < 0)
		goto fail;
	*out = s;
	return 0;
fail:
	server_free(s);
	return r;
}

BM_EXPORT const char *
blockmirror_replica_server_address(struct blockmirror_replica_server *s)
{
	return s ? bm_chan_listener_address(s->lis) : NULL;
}

BM_EXPORT void
blockmirror_replica_server_stop(struct blockmirror_replica_server *s)
{
	uint64_t one = 1;

	if (!s)
		return;
	if (write(s->stop_fd, &one, sizeof one) < 0) {
		/* an eventfd write cannot fail here */
	}
	pthread_join(s->accept_thread, NULL);
	pthread_mutex_lock(&s->lock);
	s->stopping = true;
	while (s->nconns)
		pthread_cond_wait(&s->cond, &s->lock);
	pthread_mutex_unlock(&s->lock);
	server_free(s);
}
