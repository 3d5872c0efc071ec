/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Replication, the primary's side (docs/replication.md): a thread that,
 * every interval, takes a snapshot of the disk, sends the granules that
 * changed since the last point the replica committed into the replica's
 * staging export over NBD, and asks the replica to commit them.
 *
 * The rules that keep the replica right:
 * - A cycle's snapshot is taken `since` checkpoint repl-K, where K is a
 *   point the replica holds of this disk's generation (K <= its latest):
 *   what changed since K is a superset of what changed since its latest,
 *   and the data sent is whole granules as they are at the instant, so
 *   applying it over the latest point gives the instant exactly.  A
 *   commit whose answer was lost is therefore harmless.
 * - The snapshot creates checkpoint repl-N.  Only once the replica said
 *   it committed N are the older repl-* checkpoints removed; a failed
 *   cycle removes repl-N, whose record merges into the previous one's.
 * - Without a checkpoint to trust (the first point onto a replica that
 *   is not known to be zero, a lost record, a replica re-paired after a
 *   failover), XXH3 digests of every granule are compared and only those
 *   that differ are sent (as DRBD's checksum-based resync).
 * - The state file (the generation, the fencing token the replica gave,
 *   the last committed point) is written durably after each commit.
 *
 * The guest never waits for any of this: a failing cycle only fails the
 * cycle.  The replica's side is lib/replica-serve.c over lib/replica.c.
 */
#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <uuid/uuid.h>
#include <xxhash.h>

#include "disk.h"
#include "durable.h"
#include "errors.h"
#include "extent.h"
#include "internal.h"
#include "repl-channel.h"
#include "repl-state.h"
#include "snapshot.h"

#define CHECKPOINT_PREFIX "repl-"
/* A control call's deadline (BLOCKMIRROR_REPL_TIMEOUT seconds, default
 * 30), and a commit's or a promotion's, which sync and merge: four. */
#define CALL_MS call_ms()
#define COMMIT_MS (4 * call_ms())
#define DIGEST_BATCH 4096       /* granules per digests call */
#define IDLE_RECONNECT_MS (5 * 60 * 1000) /* under the replica's 10 */
#define SLOTS 8                 /* NBD writes in flight */
#define SLOT_BYTES (1024 * 1024)

/* ---- the handle -------------------------------------------------------- */

struct blockmirror_replication {
	struct blockmirror_disk *disk;
	struct blockmirror_replication_options o;
	char *replica, *psk, *identity, *state_path;
	uint64_t size, granule;      /* the replica's granule for digests */

	pthread_t thread;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	bool stop;
	bool failover;               /* asked for: the next cycle is last */
	uint64_t sync_asked;         /* requests (counter) */
	int64_t sync_after_ns;       /* the newest asked instant */
	int failover_err;
	bool failover_done;
	unsigned waiters;            /* in sync, verify or failover */
	bool joined;                 /* halt joined the thread */

	/* under lock */
	struct bm_repl_state st;
	struct blockmirror_replication_info info;

	/* the thread's own */
	struct bm_chan *chan;
	bool connected_once;
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

static int
call_ms(void)
{
	const char *e = getenv("BLOCKMIRROR_REPL_TIMEOUT");
	char *end;
	unsigned long v;

	if (!e || !*e)
		return 30000;
	v = strtoul(e, &end, 10);
	return *end || v == 0 || v > 3600 ? 30000 : (int)v * 1000;
}

static int64_t
realtime_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static uint64_t
mono_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static void
emit(struct blockmirror_replication *r,
     enum blockmirror_replication_event_type type, uint64_t point,
     uint64_t bytes, int err, const char *message)
{
	struct blockmirror_replication_event ev = {
		.type = type, .point = point, .bytes = bytes,
		.err = err < 0 ? -err : err, .message = message,
	};

	pthread_mutex_lock(&r->lock);
	ev.instant_ns = r->st.committed_instant_ns;
	ev.rpo_ms = r->info.rpo_ms;
	pthread_mutex_unlock(&r->lock);
	if (r->o.on_event)
		r->o.on_event(r->o.event_data, &ev);
}

static void
set_state(struct blockmirror_replication *r,
	  enum blockmirror_replication_state s)
{
	pthread_mutex_lock(&r->lock);
	r->info.state = s;
	pthread_cond_broadcast(&r->cond);
	pthread_mutex_unlock(&r->lock);
}

static void
note_error(struct blockmirror_replication *r, int err)
{
	const char *m = blockmirror_last_error();

	pthread_mutex_lock(&r->lock);
	r->info.last_error = -err;
	snprintf(r->info.message, sizeof r->info.message, "%s",
		 m ? m : strerror(-err));
	pthread_mutex_unlock(&r->lock);
}

/* ---- checkpoints --------------------------------------------------------- */

static uint64_t
checkpoint_point(const char *name)
{
	char *end;
	unsigned long long k;

	if (strncmp(name, CHECKPOINT_PREFIX, strlen(CHECKPOINT_PREFIX)))
		return 0;
	k = strtoull(name + strlen(CHECKPOINT_PREFIX), &end, 10);
	return *end ? 0 : k;
}

/* The newest trusted repl-K with K <= `most` (0 if none). */
static uint64_t
newest_checkpoint(struct blockmirror_replication *r, uint64_t most)
{
	struct blockmirror_checkpoint *l = NULL;
	uint64_t best = 0;
	size_t n = 0;

	if (blockmirror_checkpoint_list(r->disk, &l, &n) < 0)
		return 0;
	for (size_t i = 0; i < n; i++) {
		uint64_t k = checkpoint_point(l[i].name);

		if (k && k <= most && l[i].trusted && k > best)
			best = k;
	}
	free(l);
	return best;
}

/* Remove every repl-* checkpoint but repl-`keep`. */
static void
remove_checkpoints_but(struct blockmirror_replication *r, uint64_t keep)
{
	struct blockmirror_checkpoint *l = NULL;
	size_t n = 0;

	if (blockmirror_checkpoint_list(r->disk, &l, &n) < 0)
		return;
	for (size_t i = 0; i < n; i++) {
		uint64_t k = checkpoint_point(l[i].name);

		if (k && k != keep)
			blockmirror_checkpoint_remove(r->disk, l[i].name);
	}
	free(l);
}

/* Remove the repl-K checkpoints above `latest`: cycles the replica never
 * committed (a primary that died in one); their records merge into the
 * older checkpoints', so nothing they covered is lost, and their numbers
 * are free for the next cycles. */
static void
remove_checkpoints_above(struct blockmirror_replication *r, uint64_t latest)
{
	struct blockmirror_checkpoint *l = NULL;
	size_t n = 0;

	if (blockmirror_checkpoint_list(r->disk, &l, &n) < 0)
		return;
	for (size_t i = n; i-- > 0;) {
		uint64_t k = checkpoint_point(l[i].name);

		if (k > latest)
			blockmirror_checkpoint_remove(r->disk, l[i].name);
	}
	free(l);
}

/* ---- the channel -------------------------------------------------------- */

static json_t *
history_json(const struct bm_repl_state *st)
{
	json_t *h = json_array();

	for (unsigned i = 0; i < st->nhistory; i++)
		json_array_append_new(h, json_pack("{s:s,s:I}",
			"gen", st->history[i].gen,
			"point", (json_int_t)st->history[i].point));
	return h;
}

static void
disconnect(struct blockmirror_replication *r)
{
	bm_chan_close(r->chan);
	r->chan = NULL;
}

/*
 * Connect and say who we are.  The replica answers with its role, size,
 * latest point and how the next cycle must go ("incremental" from a
 * point it shares with us, "digests", or "full" onto a disk it knows is
 * zeroes), and the fencing token it holds for us.  A refusal for good
 * (fenced, split brain, another disk) is returned as such.
 */
static int
connect_replica(struct blockmirror_replication *r)
{
	json_t *req, *res = NULL, *v;
	struct bm_repl_state st;
	const char *mode, *token;
	int ret;

	ret = bm_chan_connect(r->replica, r->psk, r->identity, CALL_MS,
			      &r->chan);
	if (ret < 0)
		return ret;
	pthread_mutex_lock(&r->lock);
	st = r->st;
	pthread_mutex_unlock(&r->lock);
	req = json_pack("{s:s,s:i,s:I,s:s,s:o,s:I,s:b,s:b}",
			"op", "hello", "version", 1,
			"size", (json_int_t)r->size, "gen", st.gen,
			"history", history_json(&st),
			"committed", (json_int_t)st.committed,
			"resync_ok", !!(r->o.flags &
					BLOCKMIRROR_REPLICATION_RESYNC_OK),
			"discard_divergent", !!(r->o.flags &
				BLOCKMIRROR_REPLICATION_DISCARD_DIVERGENT));
	if (st.token[0])
		json_object_set_new(req, "token", json_string(st.token));
	ret = bm_chan_call(r->chan, req, &res, CALL_MS);
	json_decref(req);
	if (ret < 0)
		goto fail;
	if (json_integer_value(json_object_get(res, "size")) !=
	    (json_int_t)r->size) {
		ret = bm_error(-ESTALE, "the replica at %s holds a disk of "
			       "%" JSON_INTEGER_FORMAT " bytes, this one has "
			       "%" PRIu64, r->replica,
			       json_integer_value(json_object_get(res,
								  "size")),
			       r->size);
		goto fail;
	}
	mode = json_string_value(json_object_get(res, "mode"));
	token = json_string_value(json_object_get(res, "token"));
	r->granule = json_integer_value(json_object_get(res, "granularity"));
	v = json_object_get(res, "latest");
	r->replica_latest = json_is_integer(v) ? json_integer_value(v) : 0;
	r->base_zero = json_is_true(json_object_get(res, "base_zero"));
	if (!mode || !token || strlen(token) >= sizeof st.token ||
	    r->granule < 512 || r->granule > (1u << 26) ||
	    (r->granule & (r->granule - 1))) {
		ret = bm_error(-EPROTO, "the replica at %s answered hello "
			       "without a valid mode, token or granularity",
			       r->replica);
		goto fail;
	}
	r->since[0] = '\0';
	r->resync = false;
	remove_checkpoints_above(r, r->replica_latest);
	if (strcmp(mode, "incremental") == 0) {
		uint64_t k = newest_checkpoint(r, r->replica_latest);

		if (k)
			snprintf(r->since, sizeof r->since,
				 CHECKPOINT_PREFIX "%" PRIu64, k);
		else
			r->resync = true; /* our record of it is gone */
	} else if (strcmp(mode, "digests") == 0) {
		r->resync = true;
	} else if (strcmp(mode, "full") != 0) {
		ret = bm_error(-EPROTO, "the replica at %s asked for an "
			       "unknown mode \"%s\"", r->replica, mode);
		goto fail;
	}
	pthread_mutex_lock(&r->lock);
	if (strcmp(r->st.token, token)) {
		strcpy(r->st.token, token);
		st = r->st;
		pthread_mutex_unlock(&r->lock);
		ret = bm_repl_state_save(r->state_path, &st);
		if (ret < 0)
			goto fail;
	} else {
		pthread_mutex_unlock(&r->lock);
	}
	json_decref(res);
	return 0;
fail:
	json_decref(res);
	disconnect(r);
	return ret;
}

/* Errors the replica gives for good: no retry makes them go away. */
static bool
refused_for_good(int err)
{
	return err == -EPERM || err == -EACCES || err == -EEXIST ||
	       err == -ESTALE || err == -EROFS;
}

/* ---- sending data -------------------------------------------------------- */

struct slot {
	struct sender *s;
	uint8_t *buf;
	bool busy;
};

struct sender {
	struct blockmirror_replication *r;
	struct blockmirror_snapshot *snap;
	struct blockmirror_disk *target;
	const char *uri;
	struct slot slots[SLOTS];
	uint8_t *bufs;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	unsigned busy;
	int err;
	char msg[256];
	uint64_t sent;                /* bytes written (data and zeroes) */
	uint64_t *theirs;             /* digests mode: the replica's batch */
	uint64_t theirs_first, theirs_n;
	uint64_t zero_digest, zero_tail;
};

static void
slot_done(void *user_data, int err)
{
	struct slot *sl = user_data;
	struct sender *s = sl->s;
	const char *m = err < 0 ? blockmirror_last_error() : NULL;

	pthread_mutex_lock(&s->lock);
	if (err < 0 && !s->err) {
		s->err = err;
		snprintf(s->msg, sizeof s->msg, "%s", m ? m : strerror(-err));
	}
	sl->busy = false;
	s->busy--;
	pthread_cond_broadcast(&s->cond);
	pthread_mutex_unlock(&s->lock);
}

/* A free slot, or NULL once a write failed (s->err). */
static struct slot *
slot_get(struct sender *s)
{
	struct slot *got = NULL;

	pthread_mutex_lock(&s->lock);
	while (!s->err && s->busy == SLOTS)
		pthread_cond_wait(&s->cond, &s->lock);
	for (unsigned i = 0; !s->err && i < SLOTS; i++)
		if (!s->slots[i].busy) {
			got = &s->slots[i];
			got->busy = true;
			s->busy++;
			break;
		}
	pthread_mutex_unlock(&s->lock);
	return got;
}

static int
drain(struct sender *s)
{
	int err;

	pthread_mutex_lock(&s->lock);
	while (s->busy)
		pthread_cond_wait(&s->cond, &s->lock);
	err = s->err;
	pthread_mutex_unlock(&s->lock);
	if (err < 0)
		return bm_error(err, "%s: %s", s->uri, s->msg);
	return 0;
}

/* Write `len` bytes of `sl`'s buffer at `off`: zeroes as such. */
static int
slot_write(struct sender *s, struct slot *sl, uint64_t len, uint64_t off)
{
	int r;

	if (bm_is_zero(sl->buf, len))
		r = blockmirror_disk_aio_write_zeroes(s->target, len, off, 0,
						      slot_done, sl);
	else
		r = blockmirror_disk_aio_write(s->target, sl->buf, len, off,
					       0, slot_done, sl);
	if (r < 0) {
		slot_done(sl, r);
		return drain(s);
	}
	s->sent += len;
	return 0;
}

/* Send [off, off + len) of the snapshot, at most SLOT_BYTES at a time. */
static int
send_range(struct sender *s, uint64_t off, uint64_t len)
{
	while (len) {
		uint64_t n = BM_MIN(len, SLOT_BYTES);
		struct slot *sl = slot_get(s);
		int r;

		if (!sl)
			return drain(s);
		r = blockmirror_snapshot_read(s->snap, sl->buf, n, off);
		if (r < 0) {
			slot_done(sl, 0);
			return r;
		}
		r = slot_write(s, sl, n, off);
		if (r < 0)
			return r;
		off += n;
		len -= n;
	}
	return 0;
}

/* The granules the snapshot says changed since the cycle's checkpoint. */
static int
send_changed(struct sender *s)
{
	uint64_t g, *words = NULL, nbits, bytes, size = s->r->size;
	int r = blockmirror_snapshot_changed(s->snap, &g, &words, &nbits,
					     &bytes);

	for (uint64_t b = 0; r == 0 && b < nbits;) {
		uint64_t e;

		if (!(words[b / 64] >> (b % 64) & 1)) {
			b++;
			continue;
		}
		for (e = b; e < nbits && words[e / 64] >> (e % 64) & 1; e++)
			;
		r = send_range(s, b * g, BM_MIN(e * g, size) - b * g);
		b = e;
	}
	free(words);
	return r;
}

/* Every data extent of the snapshot (the replica's disk reads as zeroes
 * elsewhere). */
static int
send_full(struct sender *s)
{
	struct bm_extent_list l = { 0 };
	uint64_t size = s->r->size;
	int r = 0;

	for (uint64_t pos = 0; r == 0 && pos < size;) {
		bm_extent_list_reset(&l);
		r = bm_snapshot_extents(s->r->disk, s->snap, pos,
					BM_MIN(size - pos, BM_GiB), &l);
		for (size_t i = 0; r == 0 && i < l.len; i++)
			if (!(l.v[i].flags & (BM_EXTENT_HOLE | BM_EXTENT_ZERO)))
				r = send_range(s, l.v[i].offset,
					       BM_MIN(l.v[i].length,
						      size - l.v[i].offset));
		if (r == 0 && !l.len)
			r = bm_error(-EIO, "the snapshot reported nothing at "
				     "%" PRIu64, pos);
		if (r == 0)
			pos = BM_MAX(bm_extent_list_end(&l), pos + 1);
	}
	bm_extent_list_free(&l);
	return r;
}

/* The replica's digests of granules [first, first + n). */
static int
fetch_digests(struct sender *s, uint64_t point, uint64_t first, uint64_t n)
{
	struct blockmirror_replication *r = s->r;
	json_t *req, *res = NULL;
	void *buf = NULL;
	size_t len = 0;
	int ret;

	req = json_pack("{s:s,s:I,s:I,s:I,s:s}", "op", "digests",
			"offset", (json_int_t)(first * r->granule),
			"count", (json_int_t)n, "point", (json_int_t)point,
			"token", r->st.token);
	ret = bm_chan_call(r->chan, req, &res, CALL_MS);
	json_decref(req);
	if (ret == 0)
		ret = bm_chan_b64_get(res, "digests", &buf, &len, n * 8);
	json_decref(res);
	if (ret < 0)
		return ret;
	if (len != n * 8) {
		free(buf);
		return bm_error(-EPROTO, "the replica at %s sent %zu bytes of "
				"digests for %" PRIu64 " granules", r->replica,
				len, n);
	}
	for (uint64_t i = 0; i < n; i++) {
		uint8_t *p = (uint8_t *)buf + i * 8;
		uint64_t d = 0;

		for (int b = 7; b >= 0; b--)
			d = d << 8 | p[b];
		s->theirs[i] = d;
	}
	free(buf);
	s->theirs_first = first;
	s->theirs_n = n;
	return 0;
}

/* The granules a verify found different (replica granularity). */
static int
send_resend(struct sender *s)
{
	struct blockmirror_replication *r = s->r;
	int ret = 0;

	for (uint64_t k = 0; ret == 0 && k < r->nresend; k++)
		if (r->resend[k / 64] >> (k % 64) & 1)
			ret = send_range(s, k * r->granule,
					 BM_MIN(r->granule,
						r->size - k * r->granule));
	return ret;
}

/* has[k - first]: granule k of [first, first + n) holds data in the
 * snapshot (a data extent touches it); the others read as zeroes. */
static int
granules_with_data(struct sender *s, uint64_t first, uint64_t n,
		   uint8_t *has)
{
	struct blockmirror_replication *r = s->r;
	uint64_t g = r->granule, end = BM_MIN((first + n) * g, r->size);
	struct bm_extent_list l = { 0 };
	int ret = 0;

	memset(has, 0, n);
	for (uint64_t pos = first * g; ret == 0 && pos < end;) {
		bm_extent_list_reset(&l);
		ret = bm_snapshot_extents(r->disk, s->snap, pos, end - pos, &l);
		if (ret == 0 && !l.len)
			ret = bm_error(-EIO, "the snapshot reported nothing at "
				       "%" PRIu64, pos);
		for (size_t i = 0; ret == 0 && i < l.len; i++) {
			uint64_t a = BM_MAX(l.v[i].offset, first * g);
			uint64_t b = BM_MIN(l.v[i].offset + l.v[i].length, end);

			if (l.v[i].flags & (BM_EXTENT_HOLE | BM_EXTENT_ZERO) ||
			    a >= b)
				continue;
			for (uint64_t k = a / g; k <= (b - 1) / g; k++)
				has[k - first] = 1;
		}
		if (ret == 0)
			pos = BM_MAX(bm_extent_list_end(&l), pos + 1);
	}
	bm_extent_list_free(&l);
	return ret;
}

/* Granule [ks, ke) against the replica's digest `theirs`: sent if it
 * differs (*differ counts it). */
static int
send_if_differs(struct sender *s, bool data, uint64_t ks, uint64_t ke,
		uint64_t theirs, uint64_t *differ)
{
	uint64_t zd = ke - ks < s->r->granule ? s->zero_tail : s->zero_digest;
	struct slot *sl;
	int ret;

	if (!data && theirs == zd)
		return 0;
	sl = slot_get(s);
	if (!sl)
		return drain(s);
	if (data) {
		ret = blockmirror_snapshot_read(s->snap, sl->buf, ke - ks, ks);
		if (ret < 0) {
			slot_done(sl, 0);
			return ret;
		}
		if (XXH3_64bits(sl->buf, ke - ks) == theirs) {
			slot_done(sl, 0);
			return 0;
		}
	} else {
		memset(sl->buf, 0, ke - ks);
	}
	*differ += ke - ks;
	return slot_write(s, sl, ke - ks, ks);
}

static void
zero_digests(struct sender *s, const uint8_t *zero)
{
	uint64_t g = s->r->granule, size = s->r->size;

	s->zero_digest = XXH3_64bits(zero, g);
	s->zero_tail = XXH3_64bits(zero, size % g ? size % g : g);
}

/*
 * Digests mode: read the whole snapshot (holes cost nothing: their
 * digest is known), compare each granule's XXH3-64 with the replica's,
 * send those that differ.  *differ: their bytes.
 */
static int
send_differing(struct sender *s, uint64_t *differ)
{
	struct blockmirror_replication *r = s->r;
	uint64_t g = r->granule, size = r->size;
	uint64_t ngran = (size + g - 1) / g;
	uint8_t *zero = calloc(1, g), *has = malloc(DIGEST_BATCH);
	int ret = 0;

	s->theirs = malloc(DIGEST_BATCH * sizeof *s->theirs);
	if (!zero || !has || !s->theirs) {
		free(zero);
		free(has);
		return bm_error(-ENOMEM, "out of memory");
	}
	zero_digests(s, zero);
	free(zero);
	*differ = 0;
	for (uint64_t first = 0; ret == 0 && first < ngran;
	     first += DIGEST_BATCH) {
		uint64_t n = BM_MIN(DIGEST_BATCH, ngran - first);

		ret = fetch_digests(s, 0, first, n);
		if (ret == 0)
			ret = granules_with_data(s, first, n, has);
		for (uint64_t k = first; ret == 0 && k < first + n; k++)
			ret = send_if_differs(s, has[k - first], k * g,
					      BM_MIN(k * g + g, size),
					      s->theirs[k - first], differ);
		if (ret == 0)
			ret = drain(s);
	}
	free(has);
	free(s->theirs);
	s->theirs = NULL;
	return ret;
}

/* "tcp:HOST:PORT" or "unix:PATH" and an export name as an NBD URI, TLS
 * when TCP. */
static char *
nbd_uri(struct blockmirror_replication *r, const char *addr,
	const char *export)
{
	char *uri = NULL;
	int n = -1;

	if (strncmp(addr, "unix:", 5) == 0)
		n = asprintf(&uri, "nbd+unix:///%s?socket=%s", export,
			     addr + 5);
	else if (strncmp(addr, "tcp:", 4) == 0 && r->psk && r->identity) {
		const char *port = strrchr(addr, ':');
		size_t hl = (size_t)(port - addr - 4);
		const char *rport = strrchr(r->replica, ':');
		int rl = (int)(rport - r->replica - 4);

		/* A server on every address (0.0.0.0, [::]) is reached the
		 * way the channel reached the replica. */
		if ((hl == 7 && !strncmp(addr + 4, "0.0.0.0", 7)) ||
		    (hl == 4 && !strncmp(addr + 4, "[::]", 4)) || hl == 0)
			n = asprintf(&uri, "nbds://%s@%.*s%s/%s?tls-psk-file=%s",
				     r->identity, rl, r->replica + 4, port,
				     export, r->psk);
		else
			n = asprintf(&uri, "nbds://%s@%s/%s?tls-psk-file=%s",
				     r->identity, addr + 4, export, r->psk);
	}
	if (n < 0)
		return NULL;
	return uri;
}

static int
sender_open(struct sender *s, struct blockmirror_replication *r,
	    struct blockmirror_snapshot *snap, const char *uri)
{
	memset(s, 0, sizeof *s);
	s->r = r;
	s->snap = snap;
	s->uri = uri;
	pthread_mutex_init(&s->lock, NULL);
	pthread_cond_init(&s->cond, NULL);
	s->bufs = aligned_alloc(4096, (size_t)SLOTS * SLOT_BYTES);
	if (!s->bufs)
		return bm_error(-ENOMEM, "out of memory");
	for (unsigned i = 0; i < SLOTS; i++) {
		s->slots[i].s = s;
		s->slots[i].buf = s->bufs + (size_t)i * SLOT_BYTES;
	}
	s->target = blockmirror_disk_open(uri, BLOCKMIRROR_FORMAT_RAW, 0);
	if (!s->target)
		return -errno;
	if (blockmirror_disk_get_size(s->target) != r->size)
		return bm_error(-ESTALE, "%s: the replica's staging export has "
				"%" PRIu64 " bytes, the disk %" PRIu64, uri,
				blockmirror_disk_get_size(s->target), r->size);
	return blockmirror_disk_start_thread(s->target);
}

static int
sender_close(struct sender *s, int r)
{
	if (s->target) {
		int c;

		drain(s);
		c = blockmirror_disk_close(s->target);
		if (r == 0 && c < 0)
			r = bm_error(c, "%s: flushing the replica's staging "
				     "export: %s", s->uri,
				     blockmirror_last_error() ?
				     blockmirror_last_error() : strerror(-c));
	}
	free(s->bufs);
	free(s->theirs);
	pthread_mutex_destroy(&s->lock);
	pthread_cond_destroy(&s->cond);
	return r;
}

/* ---- a cycle --------------------------------------------------------------- */

/*
 * One point: snapshot, begin, send, flush, commit, record.  `last`: the
 * planned failover's final cycle (the disk is fenced already).
 */
static int
cycle(struct blockmirror_replication *r, uint64_t *committed)
{
	struct blockmirror_snapshot_options so = { .size = sizeof so };
	struct blockmirror_snapshot *snap = NULL;
	struct blockmirror_snapshot_info si;
	struct sender s = { 0 };
	struct bm_repl_state st;
	char cp[64], *uri = NULL, msg[512];
	const char *addr, *export;
	json_t *req, *res = NULL;
	uint64_t n, differ = 0, start = mono_ms();
	bool frozen = false, app = false;
	int ret, fr = -1;

	pthread_mutex_lock(&r->lock);
	st = r->st;
	pthread_mutex_unlock(&r->lock);
	n = BM_MAX(st.committed, r->replica_latest) + 1;
	snprintf(cp, sizeof cp, CHECKPOINT_PREFIX "%" PRIu64, n);
	so.since = r->since[0] && !r->resync ? r->since : NULL;
	so.checkpoint = cp;
	if (r->o.freeze && r->o.app_every_s &&
	    realtime_ns() - r->last_app_ns >=
	    (int64_t)r->o.app_every_s * 1000000000) {
		fr = r->o.freeze(r->o.freeze_data);
		frozen = true;
		app = fr == 0;
	}
	ret = blockmirror_snapshot_take(&r->disk, 1, &so, &snap);
	if (frozen && r->o.thaw)
		r->o.thaw(r->o.freeze_data);
	if (frozen)
		r->last_app_ns = realtime_ns();
	if (ret < 0)
		return ret;
	ret = blockmirror_snapshot_query(snap, &si);
	if (ret < 0)
		goto out;
	set_state(r, r->resync || !so.since ? BLOCKMIRROR_REPLICATION_SYNCING
					     : BLOCKMIRROR_REPLICATION_SENDING);

	req = json_pack("{s:s,s:I,s:s,s:s,s:b}", "op", "begin",
			"point", (json_int_t)n, "gen", st.gen,
			"token", st.token,
			"whole", r->resync || !so.since);
	ret = bm_chan_call(r->chan, req, &res, CALL_MS);
	json_decref(req);
	/* The replica's refusal for good (promoted, paired with another):
	 * not the errors of this side's own steps. */
	r->refused = ret < 0 && refused_for_good(ret);
	if (ret < 0)
		goto out;
	addr = json_string_value(json_object_get(res, "nbd"));
	export = json_string_value(json_object_get(res, "export"));
	if (!addr || !export || !(uri = nbd_uri(r, addr, export))) {
		ret = bm_error(-EPROTO, "the replica at %s answered begin "
			       "without a usable NBD address", r->replica);
		goto out;
	}
	ret = sender_open(&s, r, snap, uri);
	if (ret == 0) {
		if (r->resync)
			ret = send_differing(&s, &differ);
		else if (so.since)
			ret = send_changed(&s);
		else if (r->base_zero)
			ret = send_full(&s);
		else
			ret = send_differing(&s, &differ);
		/* What a verify found different, unless all was compared. */
		if (ret == 0 && so.since && !r->resync && r->resend)
			ret = send_resend(&s);
	}
	if (ret == 0)
		ret = drain(&s);
	if (ret == 0)
		ret = blockmirror_disk_flush(s.target);
	ret = sender_close(&s, ret);
	if (ret < 0)
		goto abort;

	json_decref(res);
	res = NULL;
	req = json_pack("{s:s,s:I,s:s,s:I,s:I,s:b}", "op", "commit",
			"point", (json_int_t)n, "token", st.token,
			"instant_ns", (json_int_t)si.taken_unix_ns,
			"bytes", (json_int_t)s.sent, "app_consistent", app);
	ret = bm_chan_call(r->chan, req, &res, COMMIT_MS);
	json_decref(req);
	if (ret < 0)
		goto out; /* committed or not: the next hello says */

	pthread_mutex_lock(&r->lock);
	r->st.committed = n;
	r->st.committed_instant_ns = si.taken_unix_ns;
	st = r->st;
	r->info.cycles++;
	r->info.bytes_sent += s.sent;
	r->info.last_cycle_bytes = s.sent;
	r->info.last_cycle_ms = mono_ms() - start;
	r->info.throughput = r->info.last_cycle_ms ?
		s.sent * 1000.0 / r->info.last_cycle_ms : 0;
	pthread_mutex_unlock(&r->lock);
	/* The replica holds point N whatever this file says (the next hello
	 * tells): a failure to record it is told, the cycle stands. */
	ret = bm_repl_state_save(r->state_path, &st);
	if (ret < 0)
		note_error(r, ret);
	ret = 0;
	r->replica_latest = n;
	snprintf(r->since, sizeof r->since, "%s", cp);
	r->resync = false;
	free(r->resend);
	r->resend = NULL;
	r->nresend = 0;
	remove_checkpoints_but(r, n);
	*committed = n;
	if (!so.since && !r->base_zero)
		emit(r, BLOCKMIRROR_REPLICATION_EVENT_RESYNC, n, differ, 0,
		     NULL);
	emit(r, BLOCKMIRROR_REPLICATION_EVENT_POINT_COMMITTED, n, s.sent, 0,
	     NULL);
	goto out;
abort:
	snprintf(msg, sizeof msg, "%s", blockmirror_last_error() ?
		 blockmirror_last_error() : strerror(-ret));
	json_decref(res);
	res = NULL;
	req = json_pack("{s:s,s:s}", "op", "abort", "token", st.token);
	bm_chan_call(r->chan, req, &res, CALL_MS);
	json_decref(req);
	bm_error(ret, "%s", msg);
out:
	/* The cleanup's calls set the thread's error: keep the cycle's. */
	if (ret < 0) {
		const char *m = blockmirror_last_error();

		snprintf(msg, sizeof msg, "%s", m ? m : strerror(-ret));
	}
	if (ret < 0 && snap) /* its record merges into the previous one's */
		blockmirror_checkpoint_remove(r->disk, cp);
	json_decref(res);
	free(uri);
	if (snap)
		blockmirror_snapshot_release(snap);
	if (ret < 0)
		return bm_error(ret, "%s", msg);
	return ret;
}

/* ---- online verify ------------------------------------------------------------ */

/* Was any part of [off, off + len) written since the snapshot's
 * checkpoint (bitmap of granularity gt)? */
static bool
written_since(const uint64_t *words, uint64_t nbits, uint64_t gt,
	      uint64_t off, uint64_t len)
{
	for (uint64_t b = off / gt; b <= (off + len - 1) / gt && b < nbits; b++)
		if (words[b / 64] >> (b % 64) & 1)
			return true;
	return false;
}

/*
 * The replica's latest point against a snapshot of the disk now: every
 * granule not written since that point's checkpoint must have the
 * replica's digest.  Those that do not go into r->resend.
 */
static int
verify(struct blockmirror_replication *r,
       struct blockmirror_replication_check *c)
{
	struct blockmirror_snapshot_options so = { .size = sizeof so };
	struct sender s = { 0 };
	uint64_t gt, *words = NULL, nbits = 0, bytes, g = r->granule;
	uint64_t ngran = (r->size + g - 1) / g, point;
	uint8_t *has = NULL, *buf = NULL, *zero = NULL;
	char msg[512];
	int ret;

	memset(c, 0, sizeof *c);
	c->size = sizeof *c;
	pthread_mutex_lock(&r->lock);
	point = r->st.committed;
	pthread_mutex_unlock(&r->lock);
	if (!point || !r->since[0] || r->resync ||
	    checkpoint_point(r->since) != point)
		return bm_error(-EAGAIN, "no committed point of this disk's "
				"line to verify yet: wait for a cycle");
	c->point = point;
	so.since = r->since;
	s.r = r;
	ret = blockmirror_snapshot_take(&r->disk, 1, &so, &s.snap);
	if (ret == 0)
		ret = blockmirror_snapshot_changed(s.snap, &gt, &words, &nbits,
						   &bytes);
	has = malloc(DIGEST_BATCH);
	buf = malloc(g);
	zero = calloc(1, g);
	s.theirs = malloc(DIGEST_BATCH * sizeof *s.theirs);
	free(r->resend);
	r->resend = calloc((ngran + 63) / 64, sizeof *r->resend);
	r->nresend = ngran;
	if (ret == 0 && (!has || !buf || !zero || !s.theirs || !r->resend))
		ret = bm_error(-ENOMEM, "out of memory");
	if (ret == 0)
		zero_digests(&s, zero);
	for (uint64_t first = 0; ret == 0 && first < ngran;
	     first += DIGEST_BATCH) {
		uint64_t n = BM_MIN(DIGEST_BATCH, ngran - first);

		ret = fetch_digests(&s, point, first, n);
		if (ret == 0)
			ret = granules_with_data(&s, first, n, has);
		for (uint64_t k = first; ret == 0 && k < first + n; k++) {
			uint64_t off = k * g, len = BM_MIN(g, r->size - off);
			uint64_t d = len < g ? s.zero_tail : s.zero_digest;

			if (written_since(words, nbits, gt, off, len)) {
				c->skipped++;
				continue;
			}
			if (has[k - first]) {
				ret = blockmirror_snapshot_read(s.snap, buf,
								len, off);
				d = XXH3_64bits(buf, len);
			}
			c->granules++;
			if (ret == 0 && d != s.theirs[k - first]) {
				if (!c->mismatches)
					c->first_mismatch = off;
				c->mismatches++;
				r->resend[k / 64] |= UINT64_C(1) << (k % 64);
			}
		}
	}
	if (ret < 0 || !c->mismatches) {
		free(r->resend);
		r->resend = NULL;
		r->nresend = 0;
	}
	if (ret < 0)
		snprintf(msg, sizeof msg, "%s", blockmirror_last_error() ?
			 blockmirror_last_error() : strerror(-ret));
	free(words);
	free(has);
	free(buf);
	free(zero);
	free(s.theirs);
	if (s.snap)
		blockmirror_snapshot_release(s.snap);
	if (ret < 0)
		return bm_error(ret, "%s", msg);
	return ret;
}

/* ---- the thread ------------------------------------------------------------ */

static void
update_rpo(struct blockmirror_replication *r)
{
	uint64_t target = r->o.rpo_target_ms, rpo;
	bool missed, was;

	pthread_mutex_lock(&r->lock);
	rpo = r->st.committed_instant_ns ?
		(uint64_t)(realtime_ns() - r->st.committed_instant_ns) / 1000000
		: 0;
	r->info.rpo_ms = rpo;
	was = r->info.rpo_missed;
	missed = r->st.committed ? rpo > target : false;
	r->info.rpo_missed = missed;
	pthread_mutex_unlock(&r->lock);
	if (missed && !was)
		emit(r, BLOCKMIRROR_REPLICATION_EVENT_RPO_MISSED,
		     r->st.committed, 0, 0, NULL);
	else if (!missed && was)
		emit(r, BLOCKMIRROR_REPLICATION_EVENT_RPO_MET,
		     r->st.committed, 0, 0, NULL);
}

/* Promote the replica at the point just committed (planned failover). */
static int
promote(struct blockmirror_replication *r, uint64_t point)
{
	json_t *req, *res = NULL;
	struct bm_repl_state st;
	const char *gen;
	int ret;

	pthread_mutex_lock(&r->lock);
	st = r->st;
	pthread_mutex_unlock(&r->lock);
	req = json_pack("{s:s,s:I,s:s,s:b}", "op", "promote",
			"point", (json_int_t)point, "token", st.token,
			"planned", 1);
	ret = bm_chan_call(r->chan, req, &res, COMMIT_MS);
	json_decref(req);
	/* No answer: the replica may or may not have been promoted. */
	r->promote_unknown = ret == -ETIMEDOUT || ret == -ECONNRESET ||
			     ret == -EPIPE || ret == -EPROTO;
	if (ret < 0)
		return ret;
	gen = json_string_value(json_object_get(res, "gen"));
	if (!gen || strlen(gen) != 36) {
		json_decref(res);
		return bm_error(-EPROTO, "the replica at %s answered promote "
				"without its new generation", r->replica);
	}
	pthread_mutex_lock(&r->lock);
	strcpy(r->st.fenced_by, gen);
	st = r->st;
	pthread_mutex_unlock(&r->lock);
	json_decref(res);
	/* The replica is the primary now, whatever this file says: a
	 * failure here is told, the failover stands. */
	ret = bm_repl_state_save(r->state_path, &st);
	if (ret < 0)
		note_error(r, ret);
	return 0;
}

/* A verify asked for has ended (ret), or cannot run. */
static void
verify_end(struct blockmirror_replication *r, int ret,
	   const struct blockmirror_replication_check *c)
{
	const char *m = ret < 0 ? blockmirror_last_error() : NULL;

	pthread_mutex_lock(&r->lock);
	if (c)
		r->check = *c;
	r->verify_err = ret;
	snprintf(r->verify_msg, sizeof r->verify_msg, "%s",
		 m ? m : ret < 0 ? strerror(-ret) : "");
	r->verify_asked = false;
	r->verify_done = true;
	pthread_cond_broadcast(&r->cond);
	pthread_mutex_unlock(&r->lock);
}

static void *
run(void *arg)
{
	struct blockmirror_replication *r = arg;
	uint64_t backoff = 500, next = 0;
	bool down_said = false;

	for (;;) {
		uint64_t committed = 0, now;
		bool failover;
		int ret;

		pthread_mutex_lock(&r->lock);
		while (!r->stop && !r->failover && r->sync_asked == 0 &&
		       !r->verify_asked && mono_ms() < next) {
			uint64_t wait = BM_MIN(next - mono_ms(), 1000);
			struct timespec ts;

			pthread_mutex_unlock(&r->lock);
			update_rpo(r);
			pthread_mutex_lock(&r->lock);
			if (r->stop || r->failover || r->sync_asked ||
			    r->verify_asked)
				break;
			clock_gettime(CLOCK_REALTIME, &ts);
			ts.tv_sec += (time_t)(wait / 1000);
			ts.tv_nsec += (long)(wait % 1000) * 1000000;
			if (ts.tv_nsec >= 1000000000) {
				ts.tv_sec++;
				ts.tv_nsec -= 1000000000;
			}
			pthread_cond_timedwait(&r->cond, &r->lock, &ts);
		}
		failover = r->failover;
		r->sync_asked = 0;
		if (r->stop) {
			pthread_mutex_unlock(&r->lock);
			break;
		}
		pthread_mutex_unlock(&r->lock);

		now = mono_ms();
		/* The replica drops a connection silent for 10 minutes:
		 * after a long interval, start afresh rather than fail. */
		if (r->chan && now - r->chan_used_ms > IDLE_RECONNECT_MS)
			disconnect(r);
		if (!r->chan) {
			set_state(r, BLOCKMIRROR_REPLICATION_CONNECTING);
			ret = connect_replica(r);
			if (ret < 0) {
				note_error(r, ret);
				if (refused_for_good(ret)) {
					emit(r, BLOCKMIRROR_REPLICATION_EVENT_FENCED,
					     0, 0, ret, blockmirror_last_error());
					set_state(r, BLOCKMIRROR_REPLICATION_FENCED);
					goto fenced;
				}
				if (!down_said)
					emit(r, BLOCKMIRROR_REPLICATION_EVENT_DISCONNECTED,
					     0, 0, ret, blockmirror_last_error());
				down_said = true;
				next = now + backoff;
				backoff = BM_MIN(backoff * 2,
						 BM_MAX(r->o.interval_ms, 500));
				if (r->verify_asked)
					verify_end(r, ret, NULL);
				if (failover)
					goto failover_failed;
				continue;
			}
			down_said = false;
			backoff = 500;
			r->chan_used_ms = mono_ms();
			emit(r, BLOCKMIRROR_REPLICATION_EVENT_CONNECTED,
			     r->replica_latest, 0, 0, NULL);
		}
		if (r->verify_asked && !failover) {
			struct blockmirror_replication_check c;

			ret = verify(r, &c);
			verify_end(r, ret, &c);
			if (ret < 0 && ret != -EAGAIN) {
				note_error(r, ret);
				disconnect(r);
			}
			continue;
		}
		if (failover)
			bm_disk_fence(r->disk);
		ret = cycle(r, &committed);
		update_rpo(r);
		if (ret < 0) {
			note_error(r, ret);
			pthread_mutex_lock(&r->lock);
			r->info.cycles_failed++;
			pthread_mutex_unlock(&r->lock);
			emit(r, BLOCKMIRROR_REPLICATION_EVENT_CYCLE_FAILED, 0,
			     0, ret, blockmirror_last_error());
			disconnect(r);
			if (failover && !(r->refused && ret == -EROFS))
				bm_disk_unfence(r->disk);
			if (r->refused) {
				emit(r, BLOCKMIRROR_REPLICATION_EVENT_FENCED,
				     0, 0, ret, r->info.message);
				set_state(r, BLOCKMIRROR_REPLICATION_FENCED);
				goto fenced;
			}
			next = mono_ms() + backoff;
			backoff = BM_MIN(backoff * 2,
					 BM_MAX(r->o.interval_ms, 500));
			if (failover)
				goto failover_failed;
			continue;
		}
		backoff = 500;
		r->chan_used_ms = mono_ms();
		set_state(r, BLOCKMIRROR_REPLICATION_IDLE);
		if (failover) {
			ret = promote(r, committed);
			if (ret < 0) {
				note_error(r, ret);
				goto failover_failed;
			}
			emit(r, BLOCKMIRROR_REPLICATION_EVENT_FAILOVER_DONE,
			     committed, 0, 0, NULL);
			pthread_mutex_lock(&r->lock);
			r->failover_done = true;
			r->failover_err = 0;
			r->info.state = BLOCKMIRROR_REPLICATION_FAILED_OVER;
			pthread_cond_broadcast(&r->cond);
			pthread_mutex_unlock(&r->lock);
			break;
		}
		next = now + r->o.interval_ms;
		continue;
failover_failed:
		/* The replica was not promoted: the guest may write again.
		 * If the promote's answer was lost, it may have been: the
		 * fence stays, and the message says so. */
		if (r->promote_unknown) {
			pthread_mutex_lock(&r->lock);
			snprintf(r->info.message + strlen(r->info.message),
				 sizeof r->info.message -
				 strlen(r->info.message),
				 "; the promotion's answer was lost, so the "
				 "disk stays fenced: see whether the replica "
				 "is the primary (bmirror replica status)");
			pthread_mutex_unlock(&r->lock);
		} else {
			bm_disk_unfence(r->disk);
		}
		r->promote_unknown = false;
		pthread_mutex_lock(&r->lock);
		r->failover = false;
		r->failover_done = true;
		r->failover_err = r->info.last_error ? -r->info.last_error
						     : -EIO;
		pthread_cond_broadcast(&r->cond);
		pthread_mutex_unlock(&r->lock);
	}
	disconnect(r);
	return NULL;
fenced:
	pthread_mutex_lock(&r->lock);
	r->failover_done = true;
	r->failover_err = r->info.last_error ? -r->info.last_error : -EPERM;
	pthread_cond_broadcast(&r->cond);
	while (!r->stop)
		pthread_cond_wait(&r->cond, &r->lock);
	pthread_mutex_unlock(&r->lock);
	disconnect(r);
	return NULL;
}

/* ---- the API ------------------------------------------------------------------ */

static void
repl_free(struct blockmirror_replication *r)
{
	free(r->resend);
	free(r->replica);
	free(r->psk);
	free(r->identity);
	free(r->state_path);
	pthread_mutex_destroy(&r->lock);
	pthread_cond_destroy(&r->cond);
	free(r);
}

static int
dup_opt(char **dst, const char *src)
{
	if (!src)
		return 0;
	*dst = strdup(src);
	return *dst ? 0 : -ENOMEM;
}

/* The identity of the key file's first line ("identity:hexkey"): NBD
 * over TLS names one (libnbd would take the login name). */
static int
first_identity(const char *psk, char **out)
{
	FILE *f = fopen(psk, "re");
	char line[512], *colon;

	if (!f)
		return bm_error(-errno, "%s: %s", psk, strerror(errno));
	if (!fgets(line, sizeof line, f) || !(colon = strchr(line, ':')) ||
	    colon == line) {
		fclose(f);
		return bm_error(-EINVAL, "%s: its first line is not "
				"identity:hexkey", psk);
	}
	fclose(f);
	*out = strndup(line, (size_t)(colon - line));
	return *out ? 0 : -ENOMEM;
}

/* This disk's state: the file's, or a new generation. */
static int
state_init(struct blockmirror_replication *r)
{
	int ret = bm_repl_state_load(r->state_path, &r->st);

	if (ret == -ENOENT) {
		bm_repl_new_uuid(r->st.gen);
		ret = bm_repl_state_save(r->state_path, &r->st);
	}
	if (ret == 0 && r->st.fenced_by[0])
		ret = bm_error(-EPERM, "%s: this disk failed over to its "
			       "replica (now generation %s): it is no longer a "
			       "primary; make it a replica of the new primary "
			       "(bmirror replica serve --base)", r->state_path,
			       r->st.fenced_by);
	return ret;
}

BM_EXPORT int
blockmirror_replication_start(struct blockmirror_disk *disk,
			      const struct blockmirror_replication_options *options,
			      struct blockmirror_replication **out)
{
	struct blockmirror_replication *r;
	char *rec = NULL, *image = NULL;
	bool in_image;
	int ret;

	if (!disk || !options || !out || !options->replica ||
	    options->size < offsetof(struct blockmirror_replication_options,
				     app_every_s))
		return bm_error(-EINVAL, "replication: missing disk, options "
				"or replica");
	if (options->interval_ms && options->interval_ms < 1000)
		return bm_error(-EINVAL, "replication: an interval of %u ms "
				"is below the 1 s floor",
				options->interval_ms);
	if (strncmp(options->replica, "tcp:", 4) == 0 &&
	    !options->tls_psk_file)
		return bm_error(-EINVAL, "replication to %s: a TCP replica "
				"needs a TLS pre-shared key file",
				options->replica);
	ret = blockmirror_disk_track_record(disk, &rec, &in_image);
	free(rec);
	if (ret < 0)
		return bm_error(-EINVAL, "replication needs change tracking "
				"on the disk (blockmirror_disk_track, "
				"bmirror serve --track)");
	r = calloc(1, sizeof *r);
	if (!r)
		return -ENOMEM;
	pthread_mutex_init(&r->lock, NULL);
	pthread_cond_init(&r->cond, NULL);
	memcpy(&r->o, options, BM_MIN(options->size, sizeof r->o));
	r->o.size = sizeof r->o;
	if (!r->o.interval_ms)
		r->o.interval_ms = 5000;
	if (!r->o.rpo_target_ms)
		r->o.rpo_target_ms = 2 * r->o.interval_ms + 5000;
	r->disk = disk;
	r->size = blockmirror_disk_get_size(disk);
	ret = dup_opt(&r->replica, options->replica);
	if (ret == 0)
		ret = dup_opt(&r->psk, options->tls_psk_file);
	if (ret == 0)
		ret = dup_opt(&r->identity, options->tls_identity);
	if (ret == 0 && !r->identity && r->psk)
		ret = first_identity(r->psk, &r->identity);
	if (ret == 0 && options->state_file) {
		ret = dup_opt(&r->state_path, options->state_file);
	} else if (ret == 0) {
		image = blockmirror_disk_get_image(disk);
		if (!image || asprintf(&r->state_path, "%s.bmirror-repl",
				       image) < 0)
			ret = -ENOMEM;
		free(image);
	}
	if (ret == 0)
		ret = state_init(r);
	if (ret < 0)
		goto fail;
	r->info.size = sizeof r->info;
	r->info.state = BLOCKMIRROR_REPLICATION_CONNECTING;
	strcpy(r->info.generation, r->st.gen);
	r->info.point = r->st.committed;
	ret = connect_replica(r);
	if (ret < 0 && refused_for_good(ret))
		goto fail;
	if (ret < 0)
		note_error(r, ret);
	ret = pthread_create(&r->thread, NULL, run, r);
	if (ret) {
		disconnect(r);
		ret = bm_error(-ret, "replication: cannot start its thread");
		goto fail;
	}
	*out = r;
	return 0;
fail:
	repl_free(r);
	return ret;
}

BM_EXPORT int
blockmirror_replication_query(struct blockmirror_replication *r,
			      struct blockmirror_replication_info *info)
{
	struct blockmirror_checkpoint *l = NULL;
	uint64_t behind = 0, committed;
	size_t n = 0;

	if (!r || !info || info->size < sizeof *info)
		return -EINVAL;
	update_rpo(r);
	pthread_mutex_lock(&r->lock);
	committed = r->st.committed;
	pthread_mutex_unlock(&r->lock);
	if (blockmirror_checkpoint_list(r->disk, &l, &n) == 0) {
		for (size_t i = 0; i < n; i++)
			if (checkpoint_point(l[i].name) == committed)
				behind = l[i].changed_bytes;
		free(l);
	}
	pthread_mutex_lock(&r->lock);
	r->info.point = r->st.committed;
	r->info.point_instant_ns = r->st.committed_instant_ns;
	r->info.bytes_behind = committed ? behind : r->size;
	memcpy(info, &r->info, sizeof *info);
	pthread_mutex_unlock(&r->lock);
	return 0;
}

static int
wait_until(struct blockmirror_replication *r, bool (*done)(
		   struct blockmirror_replication *, int64_t), int64_t arg,
	   uint32_t timeout_ms)
{
	uint64_t deadline = timeout_ms ? mono_ms() + timeout_ms : 0;
	int ret = 0;

	while (!done(r, arg)) {
		struct timespec ts;

		if (r->info.state == BLOCKMIRROR_REPLICATION_FAILED_OVER) {
			ret = bm_error(-EALREADY, "replication to %s ended: "
				       "the replica is the primary since a "
				       "planned failover at point %" PRIu64,
				       r->replica, r->st.committed);
			break;
		}
		if (r->info.state == BLOCKMIRROR_REPLICATION_FENCED ||
		    r->info.state == BLOCKMIRROR_REPLICATION_STOPPED ||
		    (r->stop && !done(r, arg))) {
			ret = bm_error(-EPERM, "replication to %s stopped: %s",
				       r->replica, r->info.message);
			break;
		}
		if (deadline && mono_ms() >= deadline) {
			ret = bm_error(-ETIMEDOUT, "replication to %s: no "
				       "point committed within %u ms (last "
				       "error: %s)", r->replica, timeout_ms,
				       r->info.last_error ? r->info.message
							  : "none");
			break;
		}
		clock_gettime(CLOCK_REALTIME, &ts);
		ts.tv_nsec += 50 * 1000000;
		if (ts.tv_nsec >= 1000000000) {
			ts.tv_sec++;
			ts.tv_nsec -= 1000000000;
		}
		pthread_cond_timedwait(&r->cond, &r->lock, &ts);
	}
	return ret;
}

/* Under r->lock: `set` asks the thread for something, then wait (at
 * most timeout_ms) until `done`; stop waits for such callers to leave. */
static int
ask(struct blockmirror_replication *r,
    void (*set)(struct blockmirror_replication *),
    bool (*done)(struct blockmirror_replication *, int64_t), int64_t arg,
    uint32_t timeout_ms)
{
	int ret;

	r->waiters++;
	set(r);
	pthread_cond_broadcast(&r->cond);
	ret = wait_until(r, done, arg, timeout_ms);
	r->waiters--;
	pthread_cond_broadcast(&r->cond);
	return ret;
}

static void
ask_sync(struct blockmirror_replication *r)
{
	r->sync_asked++;
}

static void
ask_failover(struct blockmirror_replication *r)
{
	r->failover = true;
	r->failover_done = false;
}

static void
ask_verify(struct blockmirror_replication *r)
{
	r->verify_asked = true;
	r->verify_done = false;
}

static bool
synced(struct blockmirror_replication *r, int64_t after)
{
	return r->st.committed_instant_ns >= after;
}

BM_EXPORT int
blockmirror_replication_sync(struct blockmirror_replication *r,
			     uint32_t timeout_ms, uint64_t *point)
{
	int64_t asked = realtime_ns();
	int ret;

	if (!r)
		return -EINVAL;
	pthread_mutex_lock(&r->lock);
	ret = ask(r, ask_sync, synced, asked, timeout_ms);
	if (ret == 0 && point)
		*point = r->st.committed;
	pthread_mutex_unlock(&r->lock);
	return ret;
}

static bool
failed_over(struct blockmirror_replication *r, int64_t unused)
{
	return r->failover_done;
}

BM_EXPORT int
blockmirror_replication_failover(struct blockmirror_replication *r,
				 uint32_t timeout_ms, uint64_t *point)
{
	int ret;

	if (!r)
		return -EINVAL;
	pthread_mutex_lock(&r->lock);
	if (r->info.state == BLOCKMIRROR_REPLICATION_FAILED_OVER) {
		pthread_mutex_unlock(&r->lock);
		return bm_error(-EALREADY, "the replica is the primary already");
	}
	ret = ask(r, ask_failover, failed_over, 0, timeout_ms);
	if (ret == 0 && r->failover_err)
		ret = bm_error(r->failover_err, "planned failover to %s: %s",
			       r->replica, r->info.message);
	if (ret == 0 && point)
		*point = r->st.committed;
	pthread_mutex_unlock(&r->lock);
	return ret;
}

static bool
verified(struct blockmirror_replication *r, int64_t unused)
{
	return r->verify_done;
}

BM_EXPORT int
blockmirror_replication_verify(struct blockmirror_replication *r,
			       uint32_t timeout_ms,
			       struct blockmirror_replication_check *check)
{
	int ret;

	if (!r || !check || check->size < sizeof *check)
		return bm_error(-EINVAL, "replication verify: bad arguments");
	pthread_mutex_lock(&r->lock);
	ret = ask(r, ask_verify, verified, 0, timeout_ms);
	if (ret == 0 && r->verify_err < 0)
		ret = bm_error(r->verify_err, "verifying the replica at %s: %s",
			       r->replica, r->verify_msg);
	if (ret == 0)
		memcpy(check, &r->check, sizeof *check);
	pthread_mutex_unlock(&r->lock);
	return ret;
}

BM_EXPORT void
blockmirror_replication_halt(struct blockmirror_replication *r)
{
	bool join;

	if (!r)
		return;
	pthread_mutex_lock(&r->lock);
	r->stop = true;
	join = !r->joined;
	r->joined = true;
	pthread_cond_broadcast(&r->cond);
	pthread_mutex_unlock(&r->lock);
	/* A cycle under way ends at its next call's deadline at worst. */
	if (join)
		pthread_join(r->thread, NULL);
	/* Callers waiting in sync, verify or failover see STOPPED and
	 * return; so does any that comes later. */
	pthread_mutex_lock(&r->lock);
	r->info.state = BLOCKMIRROR_REPLICATION_STOPPED;
	snprintf(r->info.message, sizeof r->info.message,
		 "replication was stopped");
	pthread_cond_broadcast(&r->cond);
	pthread_mutex_unlock(&r->lock);
}

BM_EXPORT void
blockmirror_replication_stop(struct blockmirror_replication *r)
{
	if (!r)
		return;
	blockmirror_replication_halt(r);
	pthread_mutex_lock(&r->lock);
	while (r->waiters)
		pthread_cond_wait(&r->cond, &r->lock);
	pthread_mutex_unlock(&r->lock);
	repl_free(r);
}

static const char *const state_names[] = {
	[BLOCKMIRROR_REPLICATION_CONNECTING] = "connecting",
	[BLOCKMIRROR_REPLICATION_SYNCING] = "syncing",
	[BLOCKMIRROR_REPLICATION_IDLE] = "idle",
	[BLOCKMIRROR_REPLICATION_SENDING] = "sending",
	[BLOCKMIRROR_REPLICATION_FENCED] = "fenced",
	[BLOCKMIRROR_REPLICATION_FAILED_OVER] = "failed-over",
	[BLOCKMIRROR_REPLICATION_STOPPED] = "stopped",
};

static const char *const event_names[] = {
	[BLOCKMIRROR_REPLICATION_EVENT_CONNECTED] = "CONNECTED",
	[BLOCKMIRROR_REPLICATION_EVENT_DISCONNECTED] = "DISCONNECTED",
	[BLOCKMIRROR_REPLICATION_EVENT_POINT_COMMITTED] = "POINT_COMMITTED",
	[BLOCKMIRROR_REPLICATION_EVENT_CYCLE_FAILED] = "CYCLE_FAILED",
	[BLOCKMIRROR_REPLICATION_EVENT_RPO_MISSED] = "RPO_MISSED",
	[BLOCKMIRROR_REPLICATION_EVENT_RPO_MET] = "RPO_MET",
	[BLOCKMIRROR_REPLICATION_EVENT_RESYNC] = "RESYNC",
	[BLOCKMIRROR_REPLICATION_EVENT_FENCED] = "FENCED",
	[BLOCKMIRROR_REPLICATION_EVENT_FAILOVER_DONE] = "FAILOVER_DONE",
};

BM_EXPORT const char *
blockmirror_replication_state_name(enum blockmirror_replication_state s)
{
	return (unsigned)s < BM_ARRAY_SIZE(state_names) && state_names[s] ?
		state_names[s] : "unknown";
}

BM_EXPORT const char *
blockmirror_replication_event_name(enum blockmirror_replication_event_type t)
{
	return (unsigned)t < BM_ARRAY_SIZE(event_names) && event_names[t] ?
		event_names[t] : "UNKNOWN";
}
