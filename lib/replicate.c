/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Replication, the primary's side (docs/replication.md): a thread that,
 * every interval, takes a snapshot of the disk, sends the blocks that
 * changed since the last point the replica committed into the replica's
 * staging export over NBD, and asks the replica to commit them.  While it
 * runs, the disk's change record keeps a fine bitmap (4 KiB) in memory
 * beside its crash-safe granules, and the snapshots are taken in that
 * unit, so a guest's small write costs its size on the wire.
 *
 * The rules that keep the replica right:
 * - A cycle's snapshot is taken `since` checkpoint repl-K, where K is a
 *   point the replica holds of this disk's generation (K <= its latest):
 *   what changed since K is a superset of what changed since its latest,
 *   and the data sent is whole blocks as they are at the instant, so
 *   applying it over the latest point gives the instant exactly.  A
 *   commit whose answer was lost is therefore harmless.
 * - The snapshot creates checkpoint repl-N.  Only once the replica said
 *   it committed N are the older repl-* checkpoints removed; a failed
 *   cycle removes repl-N, whose record merges into the previous one's.
 * - Without a checkpoint to trust (the first point onto a replica that
 *   is not known to be zero, a lost record, a replica re-paired after a
 *   failover), XXH3 digests of every granule are compared and only those
 *   that differ are sent (as DRBD's checksum-based resync).  After a
 *   split brain where the replica kept how its disk diverged, a cycle
 *   sends what changed since the fork plus those granules instead.
 * - The state file (the generation, the fencing token the replica gave,
 *   the last committed point) is written durably after each commit.
 *
 * The guest never waits for any of this: a failing cycle only fails the
 * cycle.  What crosses to the replica, and the online verify, are in
 * repl-send.c; the replica's side is replica-serve.c over replica.c.
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

#include "checkpoint.h"
#include "disk.h"
#include "durable.h"
#include "errors.h"
#include "extent.h"
#include "internal.h"
#include "repl-channel.h"
#include "repl-state.h"
#include "replicate-int.h"
#include "snapshot.h"
#include "waiter.h"

/* ---- the handle: replicate-int.h ------------------------------------- */

int
bm_repl_call_ms(void)
{
	const char *e = getenv("BLOCKMIRROR_REPL_TIMEOUT");
	char *end;
	unsigned long v;

	if (!e || !*e)
		return 30000;
	v = strtoul(e, &end, 10);
	return *end || v == 0 || v > 3600 ? 30000 : (int)v * 1000;
}

bool
bm_repl_stopping(struct blockmirror_replication *r)
{
	bool stop;

	pthread_mutex_lock(&r->lock);
	stop = r->stop;
	pthread_mutex_unlock(&r->lock);
	return stop;
}

/*
 * bm_chan_call, but a halt ends the wait within a fifth of a second
 * (-ECANCELED) rather than at the deadline: a replica that stalls must
 * not hold up whoever stops replication.
 */
int
bm_repl_call(struct blockmirror_replication *r, json_t *req, json_t **res,
	     int timeout_ms)
{
	struct timespec t0, now;
	json_t *reply = NULL;
	int ret;

	*res = NULL;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	ret = bm_chan_send(r->chan, req, timeout_ms);
	while (ret == 0) {
		ret = bm_chan_recv(r->chan, &reply, 200);
		if (ret != -ETIMEDOUT)
			break;
		clock_gettime(CLOCK_MONOTONIC, &now);
		if (bm_repl_stopping(r))
			return bm_error(-ECANCELED, "replication was stopped");
		if ((now.tv_sec - t0.tv_sec) * 1000 +
		    (now.tv_nsec - t0.tv_nsec) / 1000000 >= timeout_ms)
			return bm_error(-ETIMEDOUT, "the replica at %s did not "
					"answer within %d ms", r->replica,
					timeout_ms);
		ret = 0;
	}
	if (ret < 0)
		return ret;
	ret = bm_chan_parse_reply(req, reply, bm_chan_peer(r->chan), res);
	json_decref(reply);
	return ret;
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

uint64_t
bm_repl_checkpoint_point(const char *name)
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
		uint64_t k = bm_repl_checkpoint_point(l[i].name);

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
		uint64_t k = bm_repl_checkpoint_point(l[i].name);

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
		uint64_t k = bm_repl_checkpoint_point(l[i].name);

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
	bool divergent = false;
	int ret;

	ret = bm_chan_connect(r->replica, r->psk, r->identity, CALL_MS,
			      &r->chan);
	if (ret < 0)
		return ret;
	pthread_mutex_lock(&r->lock);
	st = r->st;
	pthread_mutex_unlock(&r->lock);
	req = json_pack("{s:s,s:i,s:b,s:I,s:s,s:o,s:I,s:b,s:b}",
			"op", "hello", "version", 1, "divergent_ok", 1,
			"size", (json_int_t)r->size, "gen", st.gen,
			"history", history_json(&st),
			"committed", (json_int_t)st.committed,
			"resync_ok", !!(r->o.flags &
					BLOCKMIRROR_REPLICATION_RESYNC_OK),
			"discard_divergent", !!(r->o.flags &
				BLOCKMIRROR_REPLICATION_DISCARD_DIVERGENT));
	if (st.token[0])
		json_object_set_new(req, "token", json_string(st.token));
	ret = bm_repl_call(r, req, &res, CALL_MS);
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
		divergent = k && json_is_true(json_object_get(res,
							       "divergent"));
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
	/* After a split brain: what the replica's disk was written in
	 * after the fork goes too (asked with the token just given). */
	if (divergent && (ret = bm_repl_fetch_divergent(r)) < 0)
		goto fail;
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
	struct bm_repl_sender s = { 0 };
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
	so.granularity = r->fine;
	/* A cycle that sends only what changed holds only that, and lets go
	 * of each range as it reads it: the guest's writes elsewhere, and
	 * to what was sent, cost no copy.  What a verify asks to resend is
	 * outside that record: such a cycle holds the whole disk. */
	if (so.since && !r->resend)
		so.flags |= BLOCKMIRROR_SNAPSHOT_CHANGED_ONLY;
	if (r->o.freeze && (!r->o.app_every_s || !r->last_app_ns ||
			    realtime_ns() - r->last_app_ns >=
			    (int64_t)r->o.app_every_s * 1000000000)) {
		fr = r->o.freeze(r->o.freeze_data);
		frozen = true;
		app = fr == 0;
	}
	/* Syncs asked until now are served by this instant; one asked
	 * later waits for a cycle of its own. */
	pthread_mutex_lock(&r->lock);
	r->sync_asked = 0;
	pthread_mutex_unlock(&r->lock);
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
	ret = bm_repl_call(r, req, &res, CALL_MS);
	json_decref(req);
	/* The replica's refusal for good (promoted, paired with another):
	 * not the errors of this side's own steps. */
	r->refused = ret < 0 && refused_for_good(ret);
	if (ret < 0)
		goto out;
	addr = json_string_value(json_object_get(res, "nbd"));
	export = json_string_value(json_object_get(res, "export"));
	if (!addr || !export || !(uri = bm_repl_nbd_uri(r, addr, export))) {
		ret = bm_error(-EPROTO, "the replica at %s answered begin "
			       "without a usable NBD address", r->replica);
		goto out;
	}
	ret = bm_repl_sender_open(&s, r, snap, uri);
	s.drop = so.flags & BLOCKMIRROR_SNAPSHOT_CHANGED_ONLY;
	if (ret == 0) {
		if (r->resync)
			ret = bm_repl_send_differing(&s, &differ);
		else if (so.since)
			ret = bm_repl_send_changed(&s);
		else if (r->base_zero)
			ret = bm_repl_send_full(&s);
		else
			ret = bm_repl_send_differing(&s, &differ);
		/* What a verify found different, unless all was compared. */
		if (ret == 0 && so.since && !r->resync && r->resend)
			ret = bm_repl_send_resend(&s);
	}
	if (ret == 0)
		ret = bm_repl_drain(&s);
	if (ret == 0)
		ret = blockmirror_disk_flush(s.target);
	ret = bm_repl_sender_close(&s, ret);
	if (ret < 0)
		goto abort;

	/* The stage is named: a commit late from a connection given up
	 * on cannot commit a later cycle's (export is begin's answer's). */
	req = json_pack("{s:s,s:I,s:s,s:s,s:I,s:I,s:b}", "op", "commit",
			"point", (json_int_t)n, "token", st.token,
			"export", export,
			"instant_ns", (json_int_t)si.taken_unix_ns,
			"bytes", (json_int_t)s.sent, "app_consistent", app);
	json_decref(res);
	res = NULL;
	ret = bm_repl_call(r, req, &res, COMMIT_MS);
	json_decref(req);
	if (ret < 0)
		goto out; /* committed or not: the next hello says */

	pthread_mutex_lock(&r->lock);
	r->st.committed = n;
	r->st.committed_instant_ns = si.taken_unix_ns;
	/* A sync asked after the reset above and before the instant is
	 * served by this point: no cycle of its own. */
	if (si.taken_unix_ns >= r->sync_ask_ns)
		r->sync_asked = 0;
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
	bm_repl_call(r, req, &res, CALL_MS);
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
	ret = bm_repl_call(r, req, &res, COMMIT_MS);
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
			bm_deadline(&ts, (int)wait);
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

			ret = bm_repl_verify(r, &c);
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
	if (r->fine)
		bm_checkpoint_keep_fine(r->disk, 0);
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

/*
 * The unit a cycle sends in: a guest's 4 KiB write costs 4 KiB on the
 * wire, not the record's whole granule.  The smallest power of two from
 * 4 KiB whose bitmap of the disk fits in 8 MiB (4 KiB up to 256 GiB),
 * if finer than the record and at most 1 MiB; else 0 (whole granules).
 * The record's fine
 * bitmaps and the cycle's snapshot hold a few such bitmaps each.
 */
static uint64_t
fine_granularity(uint64_t size, uint64_t record)
{
	uint64_t g = 4 * BM_KiB;

	while (size / g > (UINT64_C(1) << 26))
		g *= 2;
	/* A snapshot's chunk is at most 1 MiB. */
	return g < record && g <= BM_MiB ? g : 0;
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
	/* Without it, cycles send whole granules: slower, as right. */
	r->fine = fine_granularity(r->size, bm_checkpoint_granularity(disk));
	if (r->fine && bm_checkpoint_keep_fine(disk, r->fine) < 0)
		r->fine = 0;
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
	/* Written since the committed point: its checkpoint's record and
	 * those of any cycle's taken since (each up to the next), summed. */
	if (blockmirror_checkpoint_list(r->disk, &l, &n) == 0) {
		for (size_t i = 0; i < n; i++)
			if (bm_repl_checkpoint_point(l[i].name) >= committed &&
			    bm_repl_checkpoint_point(l[i].name) > 0)
				behind += l[i].changed_bytes;
		free(l);
	}
	behind = BM_MIN(behind, r->size);
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
		bm_deadline(&ts, 50);
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
	r->sync_ask_ns = BM_MAX(r->sync_ask_ns, asked);
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
