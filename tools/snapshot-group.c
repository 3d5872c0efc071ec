/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * bmirror snapshot with several --control sockets: one instant across
 * the disks of several `bmirror serve` processes (a consistency group,
 * docs/control.md "Consistency groups").
 *
 * The invariant: no server takes its snapshot before every server holds
 * its disk (drained, new guest requests queued).  Then a write that was
 * acknowledged on any disk before the last hold is in every snapshot,
 * and one that queued is in none; a server that takes, and lets its
 * guest go on, while another still holds cannot break that, since a
 * write to a held disk still queues.  So the phases are: every server
 * holds (snapshot-hold, sent to all at once), every server takes
 * (snapshot-take), every server keeps (snapshot-commit).  A failure
 * anywhere aborts the others (snapshot-abort: the hold ends, or the
 * snapshot taken is released), so no half group is left; a failure at
 * the commit releases the snapshots committed already, also on a server
 * whose connection was lost after its take (its commit may have got
 * there): a new connection releases its export by name and removes its
 * checkpoint.  A server that cannot be reached or refuses is named as
 * possibly still holding its snapshot: the tool says "no snapshot of the
 * group is left" only when that is known.  If this client
 * dies, each server aborts when its connection closes, and a server's
 * lease lets its guest go on whatever happens here.
 *
 * Every server is waited for with a deadline: a server that does not
 * answer fails the group like one that refuses.  What failed is said on
 * one line, naming each server that failed.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "bmirror.h"
#include "control.h"
#include "snapshot-group.h"


struct member {
	const char *control;
	int fd;                       /* -1: not connected (or lost) */
	struct line_reader *rd;
	json_t *req;                  /* the hold's members */
	json_t *ret;                  /* the take's answer, then the commit's */
	bool held, taken, committed;
};

/* What went wrong, server by server: said once, on one line. */
static char problems[4096];

static void __attribute__((format(printf, 1, 2)))
note(const char *fmt, ...)
{
	size_t len = strlen(problems);
	va_list ap;

	if (len && len + 2 < sizeof problems) {
		memcpy(problems + len, "; ", 3);
		len += 2;
	}
	va_start(ap, fmt);
	vsnprintf(problems + len, sizeof problems - len, fmt, ap);
	va_end(ap);
}

static uint64_t
now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* The answer to the command sent to m (events skipped), by `deadline`;
 * NULL with the problem noted. */
static json_t *
member_answer(struct member *m, uint64_t deadline)
{
	json_t *msg;
	int r;

	for (;;) {
		r = line_read(m->rd, &msg);
		if (r == -EAGAIN) {
			struct pollfd p = { .fd = m->fd, .events = POLLIN };
			uint64_t now = now_ms();

			if (now >= deadline ||
			    poll(&p, 1, (int)(deadline - now)) == 0) {
				note("%s: no answer in time (the server is "
				     "busy or stuck)", m->control);
				return NULL;
			}
			continue;
		}
		if (r <= 0) {
			note("%s: the server closed the connection",
			     m->control);
			return NULL;
		}
		if (json_object_get(msg, "event")) {
			json_decref(msg);
			continue;
		}
		return msg;
	}
}

/*
 * Send `cmd` for group `group` (with m->req's members for the hold) to
 * every member for which want(m) holds, then read every answer by
 * `deadline`.  ok(m, ret) records a success.  Returns the number of
 * failures, each noted naming its server.
 */
static int
phase(struct member *ms, size_t n, const char *cmd, const char *group,
      bool (*want)(const struct member *m),
      void (*ok)(struct member *m, json_t *ret), uint64_t deadline)
{
	bool sent[n];
	int failed = 0;

	for (size_t i = 0; i < n; i++) {
		struct member *m = &ms[i];
		json_t *c;
		int r;

		sent[i] = false;
		if (m->fd < 0 || !want(m))
			continue;
		c = json_pack("{s:s, s:s}", "cmd", cmd, "group", group);
		if (c && strcmp(cmd, "snapshot-hold") == 0)
			json_object_update(c, m->req);
		r = c ? line_write(m->fd, c) : -ENOMEM;
		if (r < 0) {
			note("%s: cannot send %s: %s", m->control, cmd,
			     strerror(-r));
			failed++;
			continue;
		}
		sent[i] = true;
	}
	for (size_t i = 0; i < n; i++) {
		struct member *m = &ms[i];
		json_t *a, *e;

		if (!sent[i])
			continue;
		a = member_answer(m, deadline);
		if (!a) {
			/* Lost: closing makes the server abort its part. */
			close(m->fd);
			m->fd = -1;
			failed++;
			continue;
		}
		e = json_object_get(a, "error");
		/* An abort of a part the server dropped already (its take
		 * failed) has nothing to undo. */
		if (e && strcmp(cmd, "snapshot-abort") == 0 &&
		    json_integer_value(json_object_get(e, "errno")) == ENOENT)
			e = NULL;
		if (e) {
			note("%s: %s: %s", m->control, cmd,
			     json_string_value(json_object_get(e, "message")));
			failed++;
		} else {
			ok(m, json_object_get(a, "return"));
		}
		json_decref(a);
	}
	return failed;
}

static bool
want_all(const struct member *m)
{
	return true;
}

static bool
want_held(const struct member *m)
{
	return m->held;
}

static bool
want_taken(const struct member *m)
{
	return m->taken;
}

static void
ok_hold(struct member *m, json_t *ret)
{
	m->held = true;
}

static void
ok_take(struct member *m, json_t *ret)
{
	m->taken = true;
	json_decref(m->ret);
	m->ret = json_incref(ret);
}

static void
ok_commit(struct member *m, json_t *ret)
{
	m->committed = true;
	ok_take(m, ret);
}

/* Aborted: nothing of the group is left there. */
static void
ok_abort(struct member *m, json_t *ret)
{
	m->held = m->taken = false;
}

/* A new connection to m, whose first was lost (or never made). */
static int
member_reconnect(struct member *m)
{
	int fd = control_connect(m->control);

	if (fd < 0) {
		note("%s: cannot reconnect: %s", m->control, strerror(-fd));
		return fd;
	}
	fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
	m->fd = fd;
	memset(m->rd, 0, sizeof *m->rd);
	m->rd->fd = fd;
	return 0;
}

/* Send `c` (consumed) to m and read its answer by `deadline`: 0, the
 * server's -errno (its message into why), or -EIO with the problem
 * noted (the connection is then closed: what it was doing is unknown). */
static int
member_ask(struct member *m, json_t *c, uint64_t deadline, char *why,
	   size_t why_len)
{
	char cmd[32];
	json_t *a, *e;
	int r;

	snprintf(cmd, sizeof cmd, "%s", c ? json_string_value(
		 json_object_get(c, "cmd")) : "a command");
	r = c ? line_write(m->fd, c) : -ENOMEM;
	if (r < 0) {
		note("%s: cannot send %s: %s", m->control, cmd, strerror(-r));
	} else if (!(a = member_answer(m, deadline))) {
		r = -EIO;
	} else {
		e = json_object_get(a, "error");
		r = e ? -(int)json_integer_value(json_object_get(e, "errno"))
		      : 0;
		if (e)
			snprintf(why, why_len, "%s", json_string_value(
				 json_object_get(e, "message")));
		if (r > 0 || (e && r == 0))
			r = -EIO; /* a server that gave no errno */
		json_decref(a);
		return r;
	}
	close(m->fd);
	m->fd = -1;
	return r;
}

/*
 * Release m's snapshot, `exp`, and the checkpoint its take made: after a
 * commit, or after a take whose abort failed or whose member was lost
 * since (its commit may have reached the server, which then keeps the
 * snapshot when the connection closes; or not, and the server drops it
 * itself: then both are gone already, errno 2).  A lost member is
 * reached again on a new connection.  Returns whether nothing of m's is
 * known to be left; if something may be, a note names it and the
 * command that removes it.
 */
static bool
release_member(struct member *m, const char *exp, uint64_t deadline)
{
	const char *cp = json_string_value(json_object_get(m->ret,
							   "checkpoint"));
	char why[512] = "";
	int r = m->fd < 0 ? member_reconnect(m) : 0;

	if (r == 0)
		r = member_ask(m, json_pack("{s:s, s:s}", "cmd",
					    "snapshot-release", "export", exp),
			       deadline, why, sizeof why);
	if (r < 0 && r != -ENOENT) {
		if (*why)
			note("%s: snapshot-release %s: %s", m->control, exp,
			     why);
		note("%s may still hold the group's snapshot %s%s%s (release "
		     "it with bmirror snapshot --control %s --release %s)",
		     m->control, exp, cp ? " and checkpoint " : "",
		     cp ? cp : "", m->control, exp);
		return false;
	}
	/* The checkpoint made at its instant goes too (its record merges
	 * into the one before), as an abort does. */
	if (!cp)
		return true;
	*why = '\0';
	r = member_ask(m, json_pack("{s:s, s:s}", "cmd", "checkpoint-remove",
				    "name", cp), deadline, why, sizeof why);
	if (r < 0 && r != -ENOENT) {
		if (*why)
			note("%s: checkpoint-remove %s: %s", m->control, cp,
			     why);
		note("%s may still hold the group's checkpoint %s (remove it "
		     "with bmirror checkpoint --control %s --remove %s)",
		     m->control, cp, m->control, cp);
		return false;
	}
	return true;
}

/*
 * Undo what a failed group left: holds and pending snapshots aborted,
 * committed snapshots released (and the checkpoints they made removed),
 * also on a server whose connection was lost after its take.  Problems
 * are noted; the servers abort on their own when the connections close.
 * Returns how many servers may still hold a snapshot of the group, each
 * named in a note with what to release.
 */
static int
roll_back(struct member *ms, size_t n, const char *group,
	  uint32_t answer_ms)
{
	uint64_t deadline = now_ms() + answer_ms;
	int left = 0;

	for (size_t i = 0; i < n; i++)
		if (ms[i].committed)
			ms[i].held = false;
	phase(ms, n, "snapshot-abort", group, want_held, ok_abort, deadline);
	for (size_t i = 0; i < n; i++) {
		struct member *m = &ms[i];
		const char *exp = json_string_value(json_object_get(m->ret,
								    "export"));

		/* Taken still: its abort failed, or its answer was lost. */
		if (exp && (m->committed || m->taken) &&
		    !release_member(m, exp, deadline))
			left++;
	}
	return left;
}

/* What the group tells the operator: each server's export and URI, and
 * the group's instant and guest cost. */
static void
report(struct member *ms, size_t n, const char *group, bool json)
{
	double instant = 0;
	json_int_t held = 0, queued = 0;
	json_t *a = json_array();

	for (size_t i = 0; i < n; i++) {
		json_t *r = ms[i].ret;
		double t = json_number_value(json_object_get(r, "instant"));
		json_int_t h = json_integer_value(json_object_get(r, "held_us"));
		json_int_t q = json_integer_value(json_object_get(r,
								  "queued_us"));

		/* Every disk was held from before the first take to its
		 * own: the group's instant is the first take's. */
		if (i == 0 || t < instant)
			instant = t;
		held = h > held ? h : held;
		queued = q > queued ? q : queued;
		if (json) {
			json_t *o = json_deep_copy(r);

			json_object_set_new(o, "control",
					    json_string(ms[i].control));
			json_array_append_new(a, o);
		} else {
			printf("%s %s\n", json_string_value(json_object_get(
				       r, "export")),
			       json_string_value(json_object_get(r, "uri")));
		}
	}
	if (json)
		json_print(json_pack("{s:s, s:f, s:I, s:I, s:o}", "group",
				     group, "instant", instant, "held_max_us",
				     held, "queued_max_us", queued,
				     "snapshots", a));
	else
		printf("group %s instant=%.6f disks=%zu held_max_us=%"
		       JSON_INTEGER_FORMAT " queued_max_us=%"
		       JSON_INTEGER_FORMAT "\n", group, instant, n, held,
		       queued);
	if (!json)
		json_decref(a);
}

int
snapshot_group(const char *const *controls, json_t *const *reqs, size_t n,
	       const char *group, uint32_t lease_ms, uint32_t answer_ms,
	       bool json)
{
	struct member *ms = calloc(n, sizeof *ms);
	char name[80];
	int status = EXIT_FAILED;
	const char *failed_at = "connect";

	if (!ms) {
		tool_error("out of memory");
		return EXIT_FAILED;
	}
	if (!group) {
		snprintf(name, sizeof name, "group-%ld-%d", (long)time(NULL),
			 (int)getpid());
		group = name;
	}
	for (size_t i = 0; i < n; i++) {
		ms[i].control = controls[i];
		ms[i].req = reqs[i];
		json_object_set_new(ms[i].req, "lease_ms",
				    json_integer(lease_ms));
		ms[i].rd = calloc(1, sizeof *ms[i].rd);
		ms[i].fd = ms[i].rd ? control_connect(controls[i]) : -ENOMEM;
		if (ms[i].fd < 0) {
			note("%s: cannot connect to the control socket: %s "
			     "(is bmirror serve running?)", controls[i],
			     strerror(-ms[i].fd));
			goto fail; /* nothing held yet */
		}
		ms[i].rd->fd = ms[i].fd;
		/* Answers are waited for with poll and a deadline. */
		fcntl(ms[i].fd, F_SETFL, fcntl(ms[i].fd, F_GETFL) | O_NONBLOCK);
	}
	/* 1. every disk held: its guest's writes queue from here on */
	failed_at = "hold";
	if (phase(ms, n, "snapshot-hold", group, want_all, ok_hold,
		  now_ms() + lease_ms + answer_ms))
		goto fail;
	/* 2. every disk taken at the held instant, each then going on */
	failed_at = "take";
	if (phase(ms, n, "snapshot-take", group, want_held, ok_take,
		  now_ms() + answer_ms))
		goto fail;
	/* 3. kept: until now a server drops its part when we go */
	failed_at = "commit";
	if (phase(ms, n, "snapshot-commit", group, want_taken, ok_commit,
		  now_ms() + answer_ms))
		goto fail;
	report(ms, n, group, json);
	status = EXIT_OK;
	goto out;
fail:
	if (roll_back(ms, n, group, answer_ms))
		tool_error("group %s failed at the %s: %s", group, failed_at,
			   problems);
	else
		tool_error("group %s failed at the %s: %s; no snapshot of the "
			   "group is left", group, failed_at, problems);
out:
	for (size_t i = 0; i < n; i++) {
		if (ms[i].fd >= 0)
			close(ms[i].fd);
		free(ms[i].rd);
		json_decref(ms[i].ret);
	}
	free(ms);
	return status;
}
