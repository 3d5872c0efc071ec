/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * bmirror serve's replication commands (docs/control.md, "Replication"):
 * "replicate" starts replicating the served disk to a replica
 * (blockmirror_replication_start), "replicate-status" says how it goes,
 * "replicate-sync" runs a cycle now and "replicate-failover" makes the
 * replica the primary, "replicate-stop" ends it.
 *
 * The library's replication thread sends events; they are queued here and
 * the control thread (woken through `wake`) sends them to every client.
 * replicate (its first connection), -sync, -verify and -failover wait
 * for the replica, so each runs on a thread of its own, one at a time,
 * and its answer is queued the same way, for the client that asked: the
 * control thread never waits for the replica.  replicate-stop and quit
 * halt replication, which cuts a call under way short.
 */
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bmirror.h"
#include "hooks.h"
#include "serve-replicate.h"

static struct {
	struct blockmirror_replication *r;
	char replica[512];
	char *freeze_cmd, *thaw_cmd;   /* application-consistent points */
	unsigned freeze_timeout_s;
	void (*wake)(void);
	pthread_mutex_t lock;         /* the queues */
	json_t *events;               /* for everyone */
	json_t *answers;              /* [client, gen, answer] */
	bool waiting;                 /* a sync or failover thread runs */
	pthread_t thread;
	bool joinable;
} R = { .lock = PTHREAD_MUTEX_INITIALIZER };

static void
queue_event(json_t *ev)
{
	pthread_mutex_lock(&R.lock);
	if (!R.events)
		R.events = json_array();
	json_array_append_new(R.events, ev);
	pthread_mutex_unlock(&R.lock);
	R.wake();
}

static void
on_event(void *user_data, const struct blockmirror_replication_event *ev)
{
	json_t *j = json_pack("{s:s, s:s, s:I}", "event",
			      blockmirror_replication_event_name(ev->type),
			      "replica", R.replica,
			      "point", (json_int_t)ev->point);

	if (!j)
		return;
	if (ev->bytes)
		json_object_set_new(j, "bytes", json_integer(
					    (json_int_t)ev->bytes));
	if (ev->type == BLOCKMIRROR_REPLICATION_EVENT_POINT_COMMITTED)
		json_object_set_new(j, "instant_ns", json_integer(
					    ev->instant_ns));
	if (ev->type == BLOCKMIRROR_REPLICATION_EVENT_RPO_MISSED ||
	    ev->type == BLOCKMIRROR_REPLICATION_EVENT_RPO_MET)
		json_object_set_new(j, "rpo_ms", json_integer(
					    (json_int_t)ev->rpo_ms));
	if (ev->err)
		json_object_set_new(j, "errno", json_integer(ev->err));
	if (ev->message)
		json_object_set_new(j, "message", json_string(ev->message));
	queue_event(j);
}

json_t *
serve_repl_status(void)
{
	struct blockmirror_replication_info i = { .size = sizeof i };

	if (!R.r || blockmirror_replication_query(R.r, &i) < 0)
		return NULL;
	return json_pack("{s:s, s:s, s:s, s:I, s:I, s:I, s:b, s:I, s:I, s:I, "
			 "s:I, s:I, s:I, s:f, s:i, s:s}",
			 "replica", R.replica,
			 "state", blockmirror_replication_state_name(i.state),
			 "generation", i.generation,
			 "point", (json_int_t)i.point,
			 "point_instant_ns", (json_int_t)i.point_instant_ns,
			 "rpo_ms", (json_int_t)i.rpo_ms,
			 "rpo_missed", i.rpo_missed,
			 "bytes_behind", (json_int_t)i.bytes_behind,
			 "cycles", (json_int_t)i.cycles,
			 "cycles_failed", (json_int_t)i.cycles_failed,
			 "bytes_sent", (json_int_t)i.bytes_sent,
			 "last_cycle_bytes", (json_int_t)i.last_cycle_bytes,
			 "last_cycle_ms", (json_int_t)i.last_cycle_ms,
			 "throughput", i.throughput,
			 "last_errno", i.last_error,
			 "last_error", i.message);
}

static json_t *
error_json(int err, const char *fallback)
{
	const char *m = blockmirror_last_error();

	return json_pack("{s:{s:i, s:s}}", "error", "errno", -err, "message",
			 m ? m : fallback ? fallback : strerror(-err));
}

/* The thread of the last replicate, -sync, -verify or -failover, once
 * it has ended (or to wait for it: quit). */
static void
join_worker(void)
{
	if (R.joinable) {
		pthread_join(R.thread, NULL);
		R.joinable = false;
	}
}

/* On replication's thread, around the instant of a point. */
static int
freeze(void *user_data)
{
	return run_hook("freeze", R.freeze_cmd, R.freeze_timeout_s) == 0 ?
		0 : -1;
}

static void
thaw(void *user_data)
{
	if (R.thaw_cmd)
		run_hook("thaw", R.thaw_cmd, R.freeze_timeout_s);
}

struct start_arg {
	json_t *req;
	struct blockmirror_disk *disk;
	struct blockmirror_replication_options o;
	int client;
	unsigned gen;
};

/* The answer to queue: [client, gen, answer] or, once started,
 * [client, gen, null, handle]: the control thread takes the handle. */
static void
queue_answer(int client, unsigned gen, json_t *answer,
	     struct blockmirror_replication *started)
{
	json_t *e = json_pack("[i, i, o]", client, (int)gen,
			      answer ? answer : json_null());

	if (started)
		json_array_append_new(e, json_integer(
			(json_int_t)(uintptr_t)started));
	pthread_mutex_lock(&R.lock);
	if (!R.answers)
		R.answers = json_array();
	json_array_append_new(R.answers, e);
	R.waiting = false;
	pthread_mutex_unlock(&R.lock);
	R.wake();
}

static void *
start_main(void *arg)
{
	struct start_arg *a = arg;
	struct blockmirror_replication *r = NULL;
	int ret = blockmirror_replication_start(a->disk, &a->o, &r);

	queue_answer(a->client, a->gen, ret < 0 ? error_json(ret, NULL) : NULL,
		     ret < 0 ? NULL : r);
	json_decref(a->req);
	free(a);
	return NULL;
}

static json_t *
start(json_t *req, struct blockmirror_disk *disk, int client, unsigned gen)
{
	struct blockmirror_replication_options o = { .size = sizeof o };
	struct start_arg *a;
	const char *to = json_string_value(json_object_get(req, "to"));
	json_t *iv = json_object_get(req, "interval_ms");
	json_t *rpo = json_object_get(req, "rpo_ms");
	json_t *app = json_object_get(req, "app_every_s");
	json_t *ft = json_object_get(req, "freeze_timeout_s");
	const char *fz = json_string_value(json_object_get(req, "freeze_cmd"));
	const char *th = json_string_value(json_object_get(req, "thaw_cmd"));

	if (R.r)
		return error_json(-EBUSY, "the disk replicates already: "
				  "replicate-stop first");
	if (R.waiting)
		return error_json(-EBUSY, "a replicate command is under way");
	if (!to || !*to)
		return error_json(-EINVAL, "replicate needs \"to\": the "
				  "replica's tcp:HOST:PORT or unix:PATH");
	if ((iv && !json_is_integer(iv)) || (rpo && !json_is_integer(rpo)) ||
	    (app && !json_is_integer(app)) ||
	    json_integer_value(iv) < 0 || json_integer_value(rpo) < 0 ||
	    json_integer_value(iv) > 86400000 ||
	    json_integer_value(rpo) > 86400000)
		return error_json(-EINVAL, "\"interval_ms\" and \"rpo_ms\" "
				  "must be whole numbers of milliseconds up to "
				  "a day");
	if ((ft && !json_is_integer(ft)) || json_integer_value(ft) < 0 ||
	    json_integer_value(ft) > 3600 || json_integer_value(app) < 0 ||
	    json_integer_value(app) > 86400 * 366)
		return error_json(-EINVAL, "\"app_every_s\" and "
				  "\"freeze_timeout_s\" must be whole numbers "
				  "of seconds");
	if (json_integer_value(app) && !fz)
		return error_json(-EINVAL, "\"app_every_s\" needs "
				  "\"freeze_cmd\"");
	free(R.freeze_cmd);
	free(R.thaw_cmd);
	R.freeze_cmd = fz ? strdup(fz) : NULL;
	R.thaw_cmd = th ? strdup(th) : NULL;
	R.freeze_timeout_s = ft ? (unsigned)json_integer_value(ft) : 10;
	if (!R.freeze_timeout_s)
		R.freeze_timeout_s = 10;
	if (R.freeze_cmd) {
		o.freeze = freeze;
		o.thaw = thaw;
		o.app_every_s = (uint32_t)json_integer_value(app); /* 0: all */
	}
	o.replica = to;
	o.tls_psk_file = json_string_value(json_object_get(req, "tls_psk"));
	o.tls_identity = json_string_value(json_object_get(req,
							   "tls_identity"));
	o.interval_ms = (uint32_t)json_integer_value(iv);
	o.rpo_target_ms = (uint32_t)json_integer_value(rpo);
	o.state_file = json_string_value(json_object_get(req, "state"));
	if (json_is_true(json_object_get(req, "resync")))
		o.flags |= BLOCKMIRROR_REPLICATION_RESYNC_OK;
	if (json_is_true(json_object_get(req, "discard_divergent")))
		o.flags |= BLOCKMIRROR_REPLICATION_DISCARD_DIVERGENT;
	o.on_event = on_event;
	snprintf(R.replica, sizeof R.replica, "%s", to);
	/* The first connection may take a call's deadline: on a thread of
	 * its own, answered when it ends (serve_repl_deliver). */
	join_worker();
	a = calloc(1, sizeof *a);
	if (!a)
		return error_json(-ENOMEM, NULL);
	a->req = json_incref(req);   /* o's strings point into it */
	a->disk = disk;
	a->o = o;
	a->client = client;
	a->gen = gen;
	R.waiting = true;
	if (pthread_create(&R.thread, NULL, start_main, a)) {
		R.waiting = false;
		json_decref(a->req);
		free(a);
		return error_json(-EAGAIN, "cannot start a thread");
	}
	R.joinable = true;
	return NULL;
}

enum wait_kind { WAIT_SYNC, WAIT_FAILOVER, WAIT_VERIFY };

struct waiter_arg {
	enum wait_kind kind;
	uint32_t timeout_ms;
	int client;
	unsigned gen;
};

static void *
wait_main(void *arg)
{
	struct waiter_arg *a = arg;
	struct blockmirror_replication_check c = { .size = sizeof c };
	uint64_t point = 0;
	json_t *ans;
	int r;

	if (a->kind == WAIT_VERIFY)
		r = blockmirror_replication_verify(R.r, a->timeout_ms, &c);
	else if (a->kind == WAIT_FAILOVER)
		r = blockmirror_replication_failover(R.r, a->timeout_ms,
						     &point);
	else
		r = blockmirror_replication_sync(R.r, a->timeout_ms, &point);
	if (r < 0)
		ans = error_json(r, NULL);
	else if (a->kind == WAIT_VERIFY)
		ans = json_pack("{s:{s:I, s:I, s:I, s:I, s:I}}", "return",
				"point", (json_int_t)c.point,
				"granules", (json_int_t)c.granules,
				"skipped", (json_int_t)c.skipped,
				"mismatches", (json_int_t)c.mismatches,
				"first_mismatch", (json_int_t)c.first_mismatch);
	else
		ans = json_pack("{s:{s:I, s:b}}", "return", "point",
				(json_int_t)point, "failed_over",
				a->kind == WAIT_FAILOVER);
	queue_answer(a->client, a->gen, ans, NULL);
	free(a);
	return NULL;
}

static json_t *
start_wait(json_t *req, enum wait_kind kind, int client, unsigned gen)
{
	struct waiter_arg *a;
	json_t *t = json_object_get(req, "timeout_ms");
	bool busy;

	if (!R.r)
		return error_json(-ENOENT, "the disk does not replicate");
	if (t && (!json_is_integer(t) || json_integer_value(t) < 0 ||
		  json_integer_value(t) > 86400000))
		return error_json(-EINVAL, "\"timeout_ms\" must be a whole "
				  "number of milliseconds up to a day");
	pthread_mutex_lock(&R.lock);
	busy = R.waiting;
	pthread_mutex_unlock(&R.lock);
	if (busy)
		return error_json(-EBUSY, "a replicate-sync, -verify or "
				  "-failover is under way");
	join_worker();
	a = calloc(1, sizeof *a);
	if (!a)
		return error_json(-ENOMEM, NULL);
	a->kind = kind;
	a->timeout_ms = t ? (uint32_t)json_integer_value(t) :
			    (kind == WAIT_SYNC ? 60000 : 300000);
	a->client = client;
	a->gen = gen;
	R.waiting = true;
	if (pthread_create(&R.thread, NULL, wait_main, a)) {
		R.waiting = false;
		free(a);
		return error_json(-EAGAIN, "cannot start a thread");
	}
	R.joinable = true;
	return NULL; /* answered when it ends */
}

json_t *
serve_repl_command(const char *cmd, json_t *req, struct blockmirror_disk *disk,
		   int client, unsigned gen)
{
	if (strcmp(cmd, "replicate") == 0)
		return start(req, disk, client, gen);
	if (strcmp(cmd, "replicate-status") == 0) {
		json_t *st = serve_repl_status();

		return st ? json_pack("{s:o}", "return", st)
			  : error_json(-ENOENT, "the disk does not replicate");
	}
	if (strcmp(cmd, "replicate-sync") == 0)
		return start_wait(req, WAIT_SYNC, client, gen);
	if (strcmp(cmd, "replicate-failover") == 0)
		return start_wait(req, WAIT_FAILOVER, client, gen);
	if (strcmp(cmd, "replicate-verify") == 0)
		return start_wait(req, WAIT_VERIFY, client, gen);
	if (strcmp(cmd, "replicate-stop") == 0) {
		if (!R.r)
			return error_json(-ENOENT, "the disk does not "
					  "replicate");
		serve_repl_stop();
		return json_pack("{s:{}}", "return");
	}
	return NULL;
}

bool
serve_repl_is_command(const char *cmd)
{
	return strncmp(cmd, "replicate", 9) == 0;
}

void
serve_repl_init(void (*wake)(void))
{
	R.wake = wake;
}

void
serve_repl_deliver(void (*send)(int client, unsigned gen, json_t *obj))
{
	json_t *events, *answers, *e;
	size_t i;

	pthread_mutex_lock(&R.lock);
	events = R.events;
	answers = R.answers;
	R.events = R.answers = NULL;
	pthread_mutex_unlock(&R.lock);
	json_array_foreach(events, i, e)
		send(-1, 0, json_incref(e));
	json_array_foreach(answers, i, e) {
		json_t *ans = json_array_get(e, 2);

		if (json_array_size(e) == 4) {
			/* Started: the handle is this thread's now. */
			R.r = (struct blockmirror_replication *)(uintptr_t)
				json_integer_value(json_array_get(e, 3));
			ans = json_pack("{s:o}", "return",
					serve_repl_status());
		} else {
			json_incref(ans);
		}
		send((int)json_integer_value(json_array_get(e, 0)),
		     (unsigned)json_integer_value(json_array_get(e, 1)), ans);
	}
	json_decref(events);
	json_decref(answers);
}

static void
drop_answer(int client, unsigned gen, json_t *obj)
{
	json_decref(obj);
}

void
serve_repl_stop(void)
{
	struct blockmirror_replication *r;

	/* A start under way ends first, and its handle is taken. */
	if (!R.r && R.joinable) {
		join_worker();
		serve_repl_deliver(drop_answer);
	}
	r = R.r;
	if (!r)
		return;
	/* A waiting sync, verify or failover returns once halted (or at
	 * once, if its thread had not called yet); only then is r freed. */
	blockmirror_replication_halt(r);
	join_worker();
	blockmirror_replication_stop(r);
	R.r = NULL;
}
