/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The rebalance executor: runs the planner's moves, several at once.
 *
 * One thread, one poll(2) loop.  A served disk moves live: the executor
 * is a client of its control socket (docs/control.md), sends "move" with
 * "pivot": true and follows the events; the server pivots at READY and
 * re-points its --link.  An unused image moves offline in this process:
 * a copy handle (blockmirror_copy_start) copies it to a temporary name in
 * the target pool on a library thread; the loop polls the handle's event
 * fd with the control sockets, asks blockmirror_copy_query for progress
 * every QUERY_INTERVAL, and once the copy has ended well renames the
 * copy into place (blockmirror_rename_durable: never over an existing
 * file, both directories synced) and removes the source.  A copy that
 * fails or is cancelled removes its temporary file itself.
 *
 * Space: a move reserves its size in the destination pool when it
 * starts, and the source pool's bytes are released only when the move
 * has ended and the old image is gone.  A move starts only if the
 * reservation fits, so a pool never holds more than its capacity at any
 * instant, whatever the order in which parallel moves finish; a failed
 * move returns its reservation.
 *
 * Speed: the --speed budget is split evenly among the moves still
 * copying (a live move at READY no longer takes a share) and every share
 * is updated when a move starts or stops copying: "set-speed" on a live
 * move's control socket, blockmirror_copy_set_speed on an offline copy,
 * whose loop paces it with a timer.
 *
 * SIGINT and SIGTERM (read from a signalfd; the library's copy threads
 * block every signal) cancel the running moves: "cancel" with "force"
 * on a live move's socket, blockmirror_copy_cancel on an offline copy,
 * which returns once the copy has ended and its temporary file is gone.
 */
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "bmirror.h"
#include "control.h"
#include "rebalance.h"

#define QUERY_INTERVAL 0.25     /* s between progress queries of a move */
#define JSON_PROGRESS_INTERVAL 1.0
#define DRAW_INTERVAL 0.2
#define CANCEL_GRACE 30.0       /* s a cancelled live move may take to end */

enum run_state {
	RUN_PENDING,
	RUN_RUNNING,
	RUN_DONE,
	RUN_FAILED,
	RUN_CANCELLED,
	RUN_SKIPPED,
};

enum reply_kind { REPLY_MOVE, REPLY_QUERY, REPLY_SPEED, REPLY_CANCEL };

struct run {
	const struct bm_plan_move *mv;
	enum run_state state;
	bool live;
	bool copying;           /* takes a share of the speed budget */
	char dest[PATH_MAX + 256];
	char tmp[PATH_MAX + 256]; /* offline to a directory: the temporary name */
	bool dest_is_path;
	double t_start, t_end, t_json, t_cancel;
	uint64_t done, total, copied, speed, stall_us;
	char msg[512];

	/* live */
	int fd;
	struct line_reader *rd;
	enum reply_kind replies[16];
	unsigned n_replies;
	bool query_out;
	bool cancel_sent;
	double t_query;

	/* offline */
	struct blockmirror_copy *copy;
};

struct exec {
	const struct bm_plan *plan;
	struct rb_disk *disks;
	const struct rb_options *o;
	struct run *runs;
	size_t n;
	uint64_t *used;         /* per pool: bytes held or reserved */
	unsigned running;
	unsigned max_running;
	bool interrupted;
	double t0;
	unsigned drawn;         /* progress lines on the terminal */
	double t_draw;
};

static double
now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static const char *
disk_name(const struct exec *x, const struct run *r)
{
	return x->plan->disks[r->mv->disk].name;
}

static const char *
pool_name(const struct exec *x, int pool)
{
	return x->plan->pools[pool].name;
}

int
rb_destination(const struct bm_plan *plan, const struct rb_disk *disks,
	       const struct bm_plan_move *move, char *buf, size_t len)
{
	const struct bm_plan_pool *pool = &plan->pools[move->to];
	const char *loc = disks[move->disk].location;
	const char *base = strrchr(loc, '/');
	int n;

	if (pool->uri) {
		char *u = bm_plan_pool_uri(pool, plan->disks[move->disk].name);

		if (!u)
			return -ENOMEM;
		n = snprintf(buf, len, "%s", u);
		free(u);
	} else if (blockmirror_nbd_is_uri(loc) || !base) {
		n = snprintf(buf, len, "%s/%s.raw", pool->path,
			     plan->disks[move->disk].name);
	} else {
		n = snprintf(buf, len, "%s%s", pool->path, base);
	}
	return n < 0 || (size_t)n >= len ? -ENAMETOOLONG : 0;
}

json_t *
rb_plan_json(const struct bm_plan *plan, const struct rb_disk *disks,
	     const struct bm_plan_move *moves, size_t n_moves)
{
	uint64_t *used = calloc(plan->n_pools, sizeof *used);
	json_t *jm = json_array(), *jp = json_array();
	uint64_t bytes = 0;
	char dest[PATH_MAX + 256];

	if (!used)
		return NULL;
	bm_plan_usage(plan, used);
	for (size_t i = 0; i < plan->n_pools; i++)
		json_array_append_new(jp, json_pack("{s:s, s:I, s:I}",
			"name", plan->pools[i].name,
			"capacity", (json_int_t)plan->pools[i].capacity,
			"used_before", (json_int_t)used[i]));
	for (size_t i = 0; i < n_moves; i++) {
		const struct bm_plan_move *m = &moves[i];

		if (rb_destination(plan, disks, m, dest, sizeof dest) < 0)
			dest[0] = '\0';
		json_array_append_new(jm, json_pack("{s:s, s:s, s:s, s:I, "
						    "s:s, s:s}",
			"disk", plan->disks[m->disk].name,
			"from", plan->pools[m->from].name,
			"to", plan->pools[m->to].name,
			"bytes", (json_int_t)m->bytes,
			"how", disks[m->disk].live ? "live" : "offline",
			"destination", dest));
		used[m->from] -= m->bytes;
		used[m->to] += m->bytes;
		bytes += m->bytes;
	}
	for (size_t i = 0; i < plan->n_pools; i++)
		json_object_set_new(json_array_get(jp, i), "used_after",
				    json_integer((json_int_t)used[i]));
	free(used);
	return json_pack("{s:s, s:o, s:I, s:o}", "event", "plan", "moves", jm,
			 "bytes_to_move", (json_int_t)bytes, "pools", jp);
}

/* ---- output ------------------------------------------------------------ */

static json_t *
pools_json(const struct exec *x)
{
	json_t *o = json_object();

	for (size_t i = 0; i < x->plan->n_pools; i++)
		json_object_set_new(o, x->plan->pools[i].name,
				    json_integer((json_int_t)x->used[i]));
	return o;
}

static void
undraw(struct exec *x)
{
	for (; x->drawn; x->drawn--)
		printf("\033[1A\033[2K");
	x->drawn = 0;
}

static void
draw(struct exec *x, bool force)
{
	double t = now_s();

	if (!x->o->bars || (!force && t - x->t_draw < DRAW_INTERVAL))
		return;
	x->t_draw = t;
	undraw(x);
	for (size_t i = 0; i < x->n; i++) {
		struct run *r = &x->runs[i];
		char bar[21], a[32], b[32], c[32];
		double frac = r->total ? (double)r->done / (double)r->total : 0;
		double secs = t - r->t_start;
		int fill;

		if (r->state != RUN_RUNNING)
			continue;
		if (frac > 1)
			frac = 1;
		fill = (int)(frac * 20);
		memset(bar, '#', (size_t)fill);
		memset(bar + fill, '.', (size_t)(20 - fill));
		bar[20] = '\0';
		printf("%-12.12s %s -> %s [%s] %3d%% %s/%s %s/s%s\n",
		       disk_name(x, r), pool_name(x, r->mv->from),
		       pool_name(x, r->mv->to), bar, (int)(frac * 100),
		       human_size(r->done, a, sizeof a),
		       human_size(r->total, b, sizeof b),
		       human_size(secs > 0 ? (uint64_t)((double)r->done / secs)
				  : 0, c, sizeof c),
		       r->cancel_sent ? " (cancelling)" : "");
		x->drawn++;
	}
	fflush(stdout);
}

/* A line of text, above the progress lines. */
static void
say(struct exec *x, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void
say(struct exec *x, const char *fmt, ...)
{
	va_list ap;

	if (x->o->json)
		return;
	undraw(x);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	putchar('\n');
	draw(x, true);
	fflush(stdout);
}

static void
emit(struct exec *x, json_t *ev)
{
	if (x->o->json)
		json_print(ev);
	else
		json_decref(ev);
}

/* ---- the speed budget ------------------------------------------------- */

static void queue_request(struct exec *x, struct run *r, json_t *cmd,
			  enum reply_kind kind);

static void
share_speed(struct exec *x)
{
	unsigned copying = 0;
	uint64_t share;

	if (!x->o->speed)
		return;
	for (size_t i = 0; i < x->n; i++)
		copying += x->runs[i].state == RUN_RUNNING &&
			   x->runs[i].copying;
	if (!copying)
		return;
	share = x->o->speed / copying;
	if (!share)
		share = 1;
	for (size_t i = 0; i < x->n; i++) {
		struct run *r = &x->runs[i];

		if (r->state != RUN_RUNNING || !r->copying ||
		    r->speed == share)
			continue;
		r->speed = share;
		if (r->live && r->fd >= 0) {
			queue_request(x, r, json_pack("{s:s, s:I}", "cmd",
					"set-speed", "speed", (json_int_t)share),
				      REPLY_SPEED);
		} else if (!r->live && r->copy) {
			/* -EINVAL if it has just ended: its end is read soon. */
			blockmirror_copy_set_speed(r->copy, share);
		}
	}
}

/* ---- ending a move ------------------------------------------------------ */

static void
close_run(struct run *r)
{
	if (r->fd >= 0)
		close(r->fd);
	r->fd = -1;
	free(r->rd);
	r->rd = NULL;
	blockmirror_copy_free(r->copy);
	r->copy = NULL;
}

static void
finish(struct exec *x, struct run *r, enum run_state st)
{
	const struct bm_plan_move *m = r->mv;
	struct rb_disk *d = &x->disks[m->disk];
	double secs;

	close_run(r);
	r->state = st;
	r->t_end = now_s();
	secs = r->t_end - r->t_start;
	x->running--;
	if (st == RUN_DONE) {
		/* The disk now lives at dest; the old image goes, and only
		 * then does its pool get the bytes back. */
		if (!blockmirror_nbd_is_uri(d->location) &&
		    blockmirror_unlink_durable(d->location) < 0)
			say(x, "warning: cannot remove the old image: %s",
			    blockmirror_last_error());
		x->used[m->from] -= m->bytes;
		free(d->location);
		d->location = strdup(r->dest);
		emit(x, json_pack("{s:s, s:s, s:s, s:s, s:s, s:I, s:I, s:f, "
				  "s:I, s:o}",
			"event", "done", "disk", disk_name(x, r),
			"from", pool_name(x, m->from), "to", pool_name(x, m->to),
			"destination", r->dest, "bytes", (json_int_t)m->bytes,
			"bytes_copied", (json_int_t)r->copied,
			"elapsed_s", secs,
			"pivot_stall_us", (json_int_t)r->stall_us,
			"pools", pools_json(x)));
		{
			char a[32];

			say(x, "moved %s: %s -> %s (%s in %.1f s)",
			    disk_name(x, r), pool_name(x, m->from),
			    pool_name(x, m->to),
			    human_size(m->bytes, a, sizeof a), secs);
		}
	} else {
		/* The disk stays where it was; what this move made goes (a
		 * copy that did not end well has removed its own file). */
		if (!r->live && r->tmp[0])
			unlink(r->tmp);
		else if (r->live && r->dest_is_path)
			unlink(r->dest);
		x->used[m->to] -= m->bytes;
		emit(x, json_pack("{s:s, s:s, s:s, s:s, s:s, s:b, s:f, s:o}",
			"event", "failed", "disk", disk_name(x, r),
			"from", pool_name(x, m->from), "to", pool_name(x, m->to),
			"message", r->msg, "cancelled", st == RUN_CANCELLED,
			"elapsed_s", secs, "pools", pools_json(x)));
		say(x, "%s %s: %s -> %s: %s", st == RUN_CANCELLED ?
		    "cancelled" : "failed to move", disk_name(x, r),
		    pool_name(x, m->from), pool_name(x, m->to), r->msg);
	}
	share_speed(x);
}

static void
fail_run(struct exec *x, struct run *r, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static void
fail_run(struct exec *x, struct run *r, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(r->msg, sizeof r->msg, fmt, ap);
	va_end(ap);
	finish(x, r, x->interrupted ? RUN_CANCELLED : RUN_FAILED);
}

/* ---- live moves --------------------------------------------------------- */

static void
queue_request(struct exec *x, struct run *r, json_t *cmd, enum reply_kind kind)
{
	if (r->fd < 0 || r->n_replies == sizeof r->replies /
	    sizeof r->replies[0]) {
		json_decref(cmd);
		return;
	}
	if (line_write(r->fd, cmd) < 0)
		return; /* the end of file on the socket ends the move */
	r->replies[r->n_replies++] = kind;
}

static int
start_live(struct exec *x, struct run *r)
{
	const struct bm_plan_disk *pd = &x->plan->disks[r->mv->disk];
	int fd = control_connect(pd->control);

	if (fd < 0) {
		snprintf(r->msg, sizeof r->msg, "%s: cannot connect to the "
			 "control socket: %s", pd->control, strerror(-fd));
		return -1;
	}
	fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
	r->rd = calloc(1, sizeof *r->rd);
	if (!r->rd) {
		close(fd);
		snprintf(r->msg, sizeof r->msg, "out of memory");
		return -1;
	}
	r->fd = fd;
	r->rd->fd = fd;
	r->copying = true;
	r->total = r->mv->bytes;
	queue_request(x, r, json_pack("{s:s, s:s, s:s, s:b, s:b, s:I}",
		"cmd", "move", "to", r->dest, "mode", "active", "pivot", true,
		"create", r->dest_is_path, "speed", (json_int_t)r->speed),
		REPLY_MOVE);
	return 0;
}

static void
live_event(struct exec *x, struct run *r, json_t *ev)
{
	const char *name = json_string_value(json_object_get(ev, "event"));
	const char *msg = json_string_value(json_object_get(ev, "message"));

	if (!name)
		return;
	if (strcmp(name, "READY") == 0) {
		r->copying = false;
		r->done = r->total;
		share_speed(x);
	} else if (strcmp(name, "COMPLETED") == 0) {
		r->copied = (uint64_t)json_integer_value(
			json_object_get(ev, "bytes_copied"));
		r->stall_us = (uint64_t)json_integer_value(
			json_object_get(ev, "pivot_stall_us"));
		if (json_is_true(json_object_get(ev, "pivoted"))) {
			finish(x, r, RUN_DONE);
		} else {
			if (!r->msg[0])
				snprintf(r->msg, sizeof r->msg, "cancelled "
					 "after it was in sync");
			finish(x, r, x->interrupted ? RUN_CANCELLED
				   : RUN_FAILED);
		}
	} else if (strcmp(name, "CANCELLED") == 0) {
		if (!r->msg[0])
			snprintf(r->msg, sizeof r->msg, "cancelled");
		finish(x, r, x->interrupted ? RUN_CANCELLED : RUN_FAILED);
	} else if (strcmp(name, "FAILED") == 0) {
		fail_run(x, r, "%s", msg ? msg : "the move failed");
	} else if (strcmp(name, "PIVOT_FAILED") == 0) {
		/* The job stays READY: end it, keeping the disk where it is. */
		snprintf(r->msg, sizeof r->msg, "the pivot failed: %s",
			 msg ? msg : "?");
		if (!r->cancel_sent) {
			r->cancel_sent = true;
			r->t_cancel = now_s();
			queue_request(x, r, json_pack("{s:s, s:b}", "cmd",
					"cancel", "force", true), REPLY_CANCEL);
		}
	}
}

static void
live_reply(struct exec *x, struct run *r, json_t *msg)
{
	enum reply_kind kind;
	json_t *e = json_object_get(msg, "error");

	if (!r->n_replies)
		return;
	kind = r->replies[0];
	memmove(r->replies, r->replies + 1,
		--r->n_replies * sizeof r->replies[0]);
	switch (kind) {
	case REPLY_MOVE:
		if (e) {
			/* Nothing was started, nothing was created. */
			r->dest_is_path = false;
			fail_run(x, r, "%s", json_string_value(
				json_object_get(e, "message")));
		}
		break;
	case REPLY_QUERY: {
		json_t *job = json_object_get(json_object_get(msg, "return"),
					      "job");

		r->query_out = false;
		if (json_is_object(job)) {
			r->done = (uint64_t)json_integer_value(
				json_object_get(job, "bytes_done"));
			r->total = (uint64_t)json_integer_value(
				json_object_get(job, "bytes_total"));
			r->copied = (uint64_t)json_integer_value(
				json_object_get(job, "bytes_copied"));
		}
		break;
	}
	case REPLY_SPEED:
	case REPLY_CANCEL:
		break;
	}
}

static void
live_input(struct exec *x, struct run *r)
{
	json_t *msg;
	int n;

	while (r->state == RUN_RUNNING) {
		n = line_read(r->rd, &msg);
		if (n == -EAGAIN)
			return;
		if (n == -EPROTO)
			continue;
		if (n <= 0) {
			fail_run(x, r, "%s: the server went away during the "
				 "move", x->plan->disks[r->mv->disk].control);
			return;
		}
		if (!msg)
			continue;
		if (json_object_get(msg, "event"))
			live_event(x, r, msg);
		else
			live_reply(x, r, msg);
		json_decref(msg);
	}
}

/* ---- offline moves ------------------------------------------------------ */

/* The library's last message, without the name of the call. */
static void
lib_message(char *buf, size_t len, const char *fallback)
{
	const char *m = blockmirror_last_error();
	const char *p;

	if (m && strncmp(m, "blockmirror_", 12) == 0 && (p = strstr(m, ": ")))
		m = p + 2;
	snprintf(buf, len, "%s", m ? m : fallback);
}

static int
start_offline(struct exec *x, struct run *r)
{
	struct blockmirror_copy_options o = { .size = sizeof o };
	const char *src = x->disks[r->mv->disk].location;
	const char *dst;

	if (r->dest_is_path) {
		char dir[PATH_MAX + 256];
		const char *base = strrchr(r->dest, '/') + 1;

		snprintf(dir, sizeof dir, "%.*s", (int)(base - r->dest),
			 r->dest);
		if ((size_t)snprintf(r->tmp, sizeof r->tmp,
				     "%s.%s.rebalance-%ld", dir, base,
				     (long)getpid()) >= sizeof r->tmp) {
			r->tmp[0] = '\0';
			snprintf(r->msg, sizeof r->msg, "path too long");
			return -1;
		}
		dst = r->tmp;
	} else {
		dst = r->dest;
	}
	o.src_format = BLOCKMIRROR_FORMAT_AUTO; /* and the same format out */
	/* Several copies share this process: 2 MiB of buffers each. */
	o.request_size = 256 * 1024;
	o.requests = 8;
	o.speed = r->speed;
	if (blockmirror_copy_start(src, dst, &o, &r->copy) < 0) {
		/* Nothing was created (a file of that name is not ours). */
		lib_message(r->msg, sizeof r->msg, "the copy failed");
		r->tmp[0] = '\0';
		return -1;
	}
	r->copying = true;
	r->total = r->mv->bytes;
	return 0;
}

/* The copy has ended well: put the new image in place, durably. */
static void
offline_commit(struct exec *x, struct run *r)
{
	if (r->dest_is_path) {
		/* Never replace an image that appeared meanwhile; every
		 * error of the rename and of the directory syncs counts. */
		if (blockmirror_rename_durable(r->tmp, r->dest) < 0) {
			fail_run(x, r, "%s", blockmirror_last_error());
			return;
		}
		r->tmp[0] = '\0';
	}
	finish(x, r, RUN_DONE);
}

/* Progress of a copy, for the bars and the JSON events; after its end,
 * the final numbers (bytes_done is the whole size when it is done). */
static void
offline_query(struct run *r)
{
	struct blockmirror_copy_stats st = { .size = sizeof st };

	if (blockmirror_copy_query(r->copy, &st) == 0) {
		r->done = st.bytes_done;
		r->total = st.virtual_size;
		r->copied = st.bytes_written;
	}
}

/* The copy's event fd is readable: it has ended. */
static void
offline_ended(struct exec *x, struct run *r)
{
	char msg[sizeof r->msg];
	int rc = blockmirror_copy_wait(r->copy, 0);

	if (rc == -ETIMEDOUT)
		return;
	if (rc < 0)
		lib_message(msg, sizeof msg, "the copy failed");
	offline_query(r);
	if (rc == 0) {
		offline_commit(x, r);
	} else {
		r->tmp[0] = '\0'; /* the copy removed it */
		fail_run(x, r, "%s", msg);
	}
}

/* ---- the loop ------------------------------------------------------------ */

static bool
room_for(const struct exec *x, const struct bm_plan_move *m)
{
	uint64_t cap = x->plan->pools[m->to].capacity;

	return x->used[m->to] <= cap && m->bytes <= cap - x->used[m->to];
}

static void
start_moves(struct exec *x)
{
	bool started = false;

	for (size_t i = 0; i < x->n && x->running < x->o->max_parallel; i++) {
		struct run *r = &x->runs[i];
		char a[32];
		int rc;

		if (r->state != RUN_PENDING || !room_for(x, r->mv))
			continue;
		r->state = RUN_RUNNING;
		r->t_start = r->t_json = now_s();
		x->running++;
		x->used[r->mv->to] += r->mv->bytes;
		if (x->running > x->max_running)
			x->max_running = x->running;
		/* The first share: what the others will have after this. */
		if (x->o->speed) {
			unsigned copying = 1;

			for (size_t k = 0; k < x->n; k++)
				copying += k != i &&
					   x->runs[k].state == RUN_RUNNING &&
					   x->runs[k].copying;
			r->speed = x->o->speed / copying ? x->o->speed / copying
							  : 1;
		}
		emit(x, json_pack("{s:s, s:s, s:s, s:s, s:s, s:I, s:s, s:i, "
				  "s:o}",
			"event", "start", "disk", disk_name(x, r),
			"from", pool_name(x, r->mv->from),
			"to", pool_name(x, r->mv->to), "destination", r->dest,
			"bytes", (json_int_t)r->mv->bytes,
			"how", r->live ? "live" : "offline",
			"running", (int)x->running, "pools", pools_json(x)));
		say(x, "moving %s: %s -> %s (%s, %s)", disk_name(x, r),
		    pool_name(x, r->mv->from), pool_name(x, r->mv->to),
		    human_size(r->mv->bytes, a, sizeof a),
		    r->live ? "live" : "offline");
		rc = r->live ? start_live(x, r) : start_offline(x, r);
		if (rc < 0) {
			r->dest_is_path = r->dest_is_path && !r->live;
			finish(x, r, RUN_FAILED);
			continue;
		}
		started = true;
	}
	if (started)
		share_speed(x);
}

static void
interrupt(struct exec *x)
{
	x->interrupted = true;
	say(x, "interrupted: cancelling %u running move%s", x->running,
	    x->running == 1 ? "" : "s");
	for (size_t i = 0; i < x->n; i++) {
		struct run *r = &x->runs[i];

		if (r->state != RUN_RUNNING)
			continue;
		if (r->live && !r->cancel_sent) {
			r->cancel_sent = true;
			r->t_cancel = now_s();
			snprintf(r->msg, sizeof r->msg, "cancelled");
			queue_request(x, r, json_pack("{s:s, s:b}", "cmd",
					"cancel", "force", true), REPLY_CANCEL);
		} else if (!r->live && r->copy) {
			/* Returns once it has ended (-EINVAL: it had, well);
			 * the end is read from its event fd like any other. */
			blockmirror_copy_cancel(r->copy);
		}
	}
}

static void
tick(struct exec *x)
{
	double t = now_s();

	for (size_t i = 0; i < x->n; i++) {
		struct run *r = &x->runs[i];

		if (r->state != RUN_RUNNING)
			continue;
		if (r->live && r->cancel_sent &&
		    t - r->t_cancel > CANCEL_GRACE) {
			/* A move we asked to stop that does not: give up
			 * on it rather than hang. */
			r->dest_is_path = false;
			fail_run(x, r, "did not end %.0f s after cancel",
				 CANCEL_GRACE);
			continue;
		}
		if (r->live && !r->query_out && t - r->t_query >= QUERY_INTERVAL) {
			r->query_out = true;
			r->t_query = t;
			queue_request(x, r, json_pack("{s:s}", "cmd", "query"),
				      REPLY_QUERY);
		} else if (!r->live && t - r->t_query >= QUERY_INTERVAL) {
			r->t_query = t;
			offline_query(r);
		}
		if (x->o->json && t - r->t_json >= JSON_PROGRESS_INTERVAL) {
			r->t_json = t;
			emit(x, json_pack("{s:s, s:s, s:I, s:I, s:I, s:f}",
				"event", "progress", "disk", disk_name(x, r),
				"done", (json_int_t)r->done,
				"total", (json_int_t)r->total,
				"speed", (json_int_t)r->speed,
				"elapsed_s", t - r->t_start));
		}
	}
	draw(x, false);
}

static int
summary(struct exec *x)
{
	json_t *moved = json_array(), *failed = json_array(),
	       *cancelled = json_array(), *skipped = json_array();
	uint64_t bytes = 0, copied = 0;
	double secs = now_s() - x->t0;
	size_t n_done = 0;
	const char *what;
	char a[32], b[32];

	undraw(x);
	for (size_t i = 0; i < x->n; i++) {
		struct run *r = &x->runs[i];
		json_t *name = json_string(disk_name(x, r));

		switch (r->state) {
		case RUN_DONE:
			json_array_append_new(moved, name);
			bytes += r->mv->bytes;
			copied += r->copied;
			n_done++;
			break;
		case RUN_FAILED:
			json_array_append_new(failed, name);
			break;
		case RUN_CANCELLED:
			json_array_append_new(cancelled, name);
			break;
		default:
			json_array_append_new(skipped, name);
			break;
		}
	}
	what = n_done == x->n ? "done" : x->interrupted ? "interrupted"
		: "failed";
	if (x->o->json) {
		json_t *s = json_pack("{s:s, s:I, s:o, s:o, s:o, s:o, s:I, s:I, "
				      "s:f, s:f, s:i, s:o}",
			"summary", what, "moves", (json_int_t)x->n,
			"moved", moved, "failed", failed,
			"cancelled", cancelled, "not_started", skipped,
			"bytes_moved", (json_int_t)bytes,
			"bytes_copied", (json_int_t)copied,
			"elapsed_s", secs,
			"throughput_bytes_s", secs > 0 ? (double)copied / secs : 0.0,
			"max_running", (int)x->max_running,
			"pools", pools_json(x));

		json_print(s);
	} else {
		printf("rebalance %s: %zu of %zu moves done, %s moved in "
		       "%.1f s (%s/s)\n", what, n_done, x->n,
		       human_size(bytes, a, sizeof a), secs,
		       human_size(secs > 0 ? (uint64_t)((double)copied / secs)
				  : 0, b, sizeof b));
		for (size_t i = 0; i < x->n; i++) {
			struct run *r = &x->runs[i];

			if (r->state == RUN_DONE)
				continue;
			printf("  %s: %s (%s)\n", disk_name(x, r),
			       r->state == RUN_FAILED ? "failed" :
			       r->state == RUN_CANCELLED ? "cancelled" :
			       "not started", r->msg[0] ? r->msg : "-");
		}
		json_decref(moved);
		json_decref(failed);
		json_decref(cancelled);
		json_decref(skipped);
	}
	fflush(stdout);
	return n_done == x->n ? EXIT_OK : EXIT_FAILED;
}

int
rb_execute(const struct bm_plan *plan, struct rb_disk *disks,
	   const struct bm_plan_move *moves, size_t n_moves,
	   const struct rb_options *o)
{
	struct exec x = { .plan = plan, .disks = disks, .o = o, .n = n_moves };
	struct pollfd *p = NULL;
	size_t *owner = NULL;
	sigset_t mask, old;
	int sfd, status;

	x.runs = calloc(n_moves + 1, sizeof *x.runs);
	x.used = calloc(plan->n_pools, sizeof *x.used);
	p = calloc(n_moves + 1, sizeof *p);
	owner = calloc(n_moves + 1, sizeof *owner);
	if (!x.runs || !x.used || !p || !owner) {
		tool_error("out of memory");
		status = EXIT_FAILED;
		goto out_free;
	}
	bm_plan_usage(plan, x.used);
	for (size_t i = 0; i < n_moves; i++) {
		struct run *r = &x.runs[i];

		r->mv = &moves[i];
		r->fd = -1;
		r->live = disks[moves[i].disk].live;
		r->dest_is_path = !plan->pools[moves[i].to].uri;
		if (rb_destination(plan, disks, &moves[i], r->dest,
				   sizeof r->dest) < 0) {
			tool_error("%s: destination name too long",
				   plan->disks[moves[i].disk].name);
			status = EXIT_FAILED;
			goto out_free;
		}
	}

	sigemptyset(&mask);
	sigaddset(&mask, SIGINT);
	sigaddset(&mask, SIGTERM);
	sigprocmask(SIG_BLOCK, &mask, &old);
	signal(SIGPIPE, SIG_IGN);
	sfd = signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK);

	x.t0 = now_s();
	for (;;) {
		int nfds = 0, timeout;

		if (!x.interrupted)
			start_moves(&x);
		if (!x.running)
			break;
		p[nfds++] = (struct pollfd){ .fd = sfd, .events = POLLIN };
		for (size_t i = 0; i < x.n; i++) {
			struct run *r = &x.runs[i];

			if (r->state != RUN_RUNNING)
				continue;
			owner[nfds] = i;
			p[nfds++] = (struct pollfd){
				.fd = r->live ? r->fd
					      : blockmirror_copy_event_fd(r->copy),
				.events = POLLIN };
		}
		timeout = (int)(1000 * (o->bars ? DRAW_INTERVAL
					: QUERY_INTERVAL));
		if (poll(p, (nfds_t)nfds, timeout) < 0 && errno != EINTR)
			break;
		if (p[0].revents) {
			struct signalfd_siginfo si;

			if (read(sfd, &si, sizeof si) > 0 && !x.interrupted)
				interrupt(&x);
		}
		for (int k = 1; k < nfds; k++) {
			struct run *r = &x.runs[owner[k]];

			if (!p[k].revents || r->state != RUN_RUNNING)
				continue;
			if (r->live)
				live_input(&x, r);
			else
				offline_ended(&x, r);
		}
		tick(&x);
	}

	/* Only a failed poll leaves copies running: stop them (which
	 * removes their temporary files). */
	for (size_t i = 0; i < x.n; i++) {
		blockmirror_copy_free(x.runs[i].copy);
		x.runs[i].copy = NULL;
	}

	/* What could not start: its pool never got the room (a move that
	 * would have made it failed), or we were interrupted. */
	for (size_t i = 0; i < x.n; i++) {
		struct run *r = &x.runs[i];

		if (r->state != RUN_PENDING)
			continue;
		r->state = RUN_SKIPPED;
		if (x.interrupted)
			snprintf(r->msg, sizeof r->msg, "interrupted before "
				 "it started");
		else
			snprintf(r->msg, sizeof r->msg, "pool '%s' has no room "
				 "for it (an earlier move failed)",
				 pool_name(&x, r->mv->to));
	}
	status = summary(&x);
	if (sfd >= 0)
		close(sfd);
	sigprocmask(SIG_SETMASK, &old, NULL);
out_free:
	free(x.runs);
	free(x.used);
	free(p);
	free(owner);
	return status;
}
