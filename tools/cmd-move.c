/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * bmirror move, status, cancel, pause, resume, complete: clients of the
 * control socket of `bmirror serve` (docs/control.md).
 *
 * move sends one "move" command and then reads the events the server
 * streams back, asking for progress every 200 ms to draw the bar.  It
 * exits 0 once the pivot is durable (COMPLETED with pivoted), or with
 * --no-pivot once the job is READY (the job keeps mirroring; end it later
 * with `bmirror cancel` or `bmirror complete`).
 */
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "bmirror.h"
#include "control.h"

/* ---- the client side of the control protocol (control.h) -------------- */

int
client_connect(const char *path)
{
	int fd = control_connect(path);

	if (fd < 0)
		tool_error("%s: cannot connect to the control socket: %s "
			   "(is bmirror serve running?)", path, strerror(-fd));
	return fd;
}

json_t *
client_request(int fd, struct line_reader *rd, json_t *cmd,
	void (*ev_fn)(json_t *ev, void *data), void *data)
{
	json_t *msg;
	int r;

	if (line_write(fd, cmd) < 0)
		return NULL;
	for (;;) {
		r = line_read(rd, &msg);
		if (r == -EAGAIN) {
			struct pollfd p = { .fd = fd, .events = POLLIN };

			poll(&p, 1, -1);
			continue;
		}
		if (r <= 0)
			return NULL;
		if (json_object_get(msg, "event")) {
			if (ev_fn)
				ev_fn(msg, data);
			json_decref(msg);
			continue;
		}
		return msg;
	}
}

int
client_reply_error(json_t *reply)
{
	json_t *e = json_object_get(reply, "error");

	if (!e)
		return 0;
	tool_error("%s", json_string_value(json_object_get(e, "message")));
	return -1;
}

json_t *
client_call(const char *control, json_t *cmd)
{
	return client_call_events(control, cmd, NULL, NULL);
}

json_t *
client_call_events(const char *control, json_t *cmd,
		   void (*ev_fn)(json_t *ev, void *data), void *data)
{
	struct line_reader rd = { 0 };
	json_t *reply;
	int fd;

	fd = client_connect(control);
	if (fd < 0) {
		json_decref(cmd);
		return NULL;
	}
	rd.fd = fd;
	reply = client_request(fd, &rd, cmd, ev_fn, data);
	close(fd);
	if (!reply) {
		tool_error("%s: the server closed the connection", control);
		return NULL;
	}
	if (client_reply_error(reply) < 0) {
		json_decref(reply);
		return NULL;
	}
	return reply;
}

/* ---- move ------------------------------------------------------------- */

struct move_state {
	bool json;
	struct progress *bar;
	bool pivot;
	bool done;
	int status;
	json_t *summary;
};

static void
move_event(json_t *ev, void *data)
{
	struct move_state *m = data;
	const char *name = json_string_value(json_object_get(ev, "event"));

	if (m->json) {
		char *s = json_dumps(ev, JSON_COMPACT | JSON_PRESERVE_ORDER);

		if (s) {
			puts(s);
			fflush(stdout);
			free(s);
		}
	}
	if (!name)
		return;
	if (strcmp(name, "READY") == 0 && !m->pivot) {
		m->done = true;
		m->status = EXIT_OK;
	} else if (strcmp(name, "COMPLETED") == 0) {
		m->done = true;
		m->status = EXIT_OK;
		m->summary = json_incref(ev);
	} else if (strcmp(name, "CANCELLED") == 0 ||
		   strcmp(name, "FAILED") == 0 ||
		   strcmp(name, "PIVOT_FAILED") == 0) {
		const char *msg = json_string_value(json_object_get(ev,
								    "message"));

		progress_end(m->bar);
		m->bar = NULL;
		tool_error("the move %s%s%s", strcmp(name, "CANCELLED") == 0
			   ? "was cancelled" : strcmp(name, "FAILED") == 0
			   ? "failed" : "could not pivot",
			   msg ? ": " : "", msg ? msg : "");
		m->done = true;
		m->status = EXIT_FAILED;
	} else if (strcmp(name, "ERROR") == 0 && !m->json) {
		const char *msg = json_string_value(json_object_get(ev,
								    "message"));

		progress_end(m->bar);
		m->bar = progress_new("moving", m->bar != NULL);
		tool_error("warning: %s", msg ? msg : "I/O error");
	}
}

static void
help_move(void)
{
	printf("Usage: bmirror move --control PATH --to DEST [-O FMT] "
	       "[--mode active|background|auto]\n"
	       "                    [--speed RATE] [--granularity SIZE] "
	       "[--no-pivot] [--progress|--json]\n"
	       "                    [--on-error report|stop|retry] "
	       "[--sync full|top|none | --shallow]\n"
	       "       bmirror move --control PATH --base --to NEW_BASE\n\n"
	       "Move the disk served by `bmirror serve` to DEST (a path, "
	       "created if it does not\nexist, or an NBD URI of an export "
	       "of the same size) while the guest runs, and\npivot to it "
	       "once it is in sync.  RATE and SIZE take suffixes (64M).\n"
	       "--sync: full copies the whole chain into DEST (default), top "
	       "only the top\nimage (DEST gets the same backing file), none "
	       "only new writes.\n--base: move the backing file of the "
	       "served disk instead (copied unless\nNEW_BASE exists, "
	       "verified, then the disk is re-pointed at it).\n");
}

int
cmd_move(int argc, char **argv)
{
	enum { OPT_CONTROL = 256, OPT_TO, OPT_MODE, OPT_SPEED, OPT_GRAN,
	       OPT_NO_PIVOT, OPT_PROGRESS, OPT_JSON, OPT_ON_ERROR, OPT_HELP,
	       OPT_SYNC, OPT_SHALLOW, OPT_BASE };
	static const struct option longopts[] = {
		{ "control", required_argument, NULL, OPT_CONTROL },
		{ "to", required_argument, NULL, OPT_TO },
		{ "mode", required_argument, NULL, OPT_MODE },
		{ "speed", required_argument, NULL, OPT_SPEED },
		{ "granularity", required_argument, NULL, OPT_GRAN },
		{ "no-pivot", no_argument, NULL, OPT_NO_PIVOT },
		{ "progress", no_argument, NULL, OPT_PROGRESS },
		{ "json", no_argument, NULL, OPT_JSON },
		{ "on-error", required_argument, NULL, OPT_ON_ERROR },
		{ "sync", required_argument, NULL, OPT_SYNC },
		{ "shallow", no_argument, NULL, OPT_SHALLOW },
		{ "base", no_argument, NULL, OPT_BASE },
		{ "help", no_argument, NULL, OPT_HELP },
		{ NULL, 0, NULL, 0 },
	};
	const char *on_error = "report", *sync = "full";
	struct move_state m = { .pivot = true, .status = EXIT_FAILED };
	const char *control = NULL, *to = NULL, *mode = "active";
	enum blockmirror_format ofmt = BLOCKMIRROR_FORMAT_AUTO;
	char dest[PATH_MAX];
	uint64_t speed = 0, gran = 0;
	bool want_bar = isatty(STDOUT_FILENO), create = false, base = false;
	struct line_reader rd = { 0 };
	json_t *cmd, *reply;
	struct timespec t0, t1;
	int c, fd;

	opterr = 0;
	while ((c = getopt_long(argc, argv, ":O:h", longopts, NULL)) != -1) {
		switch (c) {
		case OPT_CONTROL:
			control = optarg;
			break;
		case OPT_TO:
			to = optarg;
			break;
		case 'O':
			if (!parse_format(optarg, &ofmt))
				return EXIT_USAGE;
			break;
		case OPT_MODE:
			if (strcmp(optarg, "active") && strcmp(optarg, "auto") &&
			    strcmp(optarg, "background"))
				return tool_usage_error("--mode takes active, "
					"background or auto, not '%s'", optarg);
			mode = optarg;
			break;
		case OPT_SPEED:
			if (parse_size(optarg, &speed) < 0)
				return tool_usage_error("bad speed '%s'",
							optarg);
			break;
		case OPT_GRAN:
			if (parse_size(optarg, &gran) < 0)
				return tool_usage_error("bad granularity '%s'",
							optarg);
			break;
		case OPT_NO_PIVOT:
			m.pivot = false;
			break;
		case OPT_ON_ERROR:
			if (strcmp(optarg, "report") && strcmp(optarg, "stop") &&
			    strcmp(optarg, "retry"))
				return tool_usage_error("--on-error takes "
					"report, stop or retry, not '%s'",
					optarg);
			on_error = optarg;
			break;
		case OPT_SYNC:
			if (strcmp(optarg, "full") && strcmp(optarg, "top") &&
			    strcmp(optarg, "none"))
				return tool_usage_error("--sync takes full, top "
					"or none, not '%s'", optarg);
			sync = optarg;
			break;
		case OPT_SHALLOW:
			sync = "top";
			break;
		case OPT_BASE:
			base = true;
			break;
		case OPT_PROGRESS:
			want_bar = true;
			break;
		case OPT_JSON:
			m.json = true;
			want_bar = false;
			break;
		case 'h':
		case OPT_HELP:
			help_move();
			return EXIT_OK;
		default:
			return tool_bad_option(c, argc, argv);
		}
	}
	if (!control || !to || argc != optind)
		return tool_usage_error("move needs --control PATH and --to DEST");

	/* A path is handed to the server absolute; a new one is created. */
	if (!blockmirror_nbd_is_uri(to)) {
		struct stat st;

		if (to[0] == '/') {
			snprintf(dest, sizeof dest, "%s", to);
		} else {
			char cwd[PATH_MAX];

			if (!getcwd(cwd, sizeof cwd)) {
				tool_error("getcwd: %s", strerror(errno));
				return EXIT_FAILED;
			}
			if ((size_t)snprintf(dest, sizeof dest, "%s/%.*s", cwd,
					     (int)(sizeof dest - 2 - strlen(cwd)),
					     to) >= sizeof dest) {
				tool_error("%s: path too long", to);
				return EXIT_USAGE;
			}
		}
		create = stat(dest, &st) < 0 && errno == ENOENT;
	} else {
		snprintf(dest, sizeof dest, "%s", to);
	}

	fd = client_connect(control);
	if (fd < 0)
		return EXIT_FAILED;
	rd.fd = fd;
	cmd = json_pack("{s:s, s:s, s:s, s:b, s:b, s:I, s:I, s:s}", "cmd",
			"move", "to", dest, "mode", mode, "pivot", m.pivot,
			"create", create, "speed", (json_int_t)speed,
			"granularity", (json_int_t)gran, "on_error", on_error);
	if (strcmp(sync, "full"))
		json_object_set_new(cmd, "sync", json_string(sync));
	if (base)
		json_object_set_new(cmd, "base", json_true());
	if (ofmt)
		json_object_set_new(cmd, "format",
				    json_string(blockmirror_format_name(ofmt)));
	clock_gettime(CLOCK_MONOTONIC, &t0);
	reply = client_request(fd, &rd, cmd, move_event, &m);
	if (!reply) {
		tool_error("%s: the server closed the connection", control);
		close(fd);
		return EXIT_FAILED;
	}
	if (client_reply_error(reply) < 0) {
		json_decref(reply);
		close(fd);
		return EXIT_FAILED;
	}
	json_decref(reply);

	m.bar = progress_new("moving", want_bar);
	while (!m.done) {
		json_t *info;

		reply = client_request(fd, &rd, json_pack("{s:s}", "cmd", "query"),
				move_event, &m);
		if (!reply) {
			tool_error("%s: the server went away during the move",
				   control);
			break;
		}
		info = json_object_get(json_object_get(reply, "return"), "job");
		if (json_is_object(info) && m.bar && !m.done)
			progress_update(m.bar, (uint64_t)json_integer_value(
				json_object_get(info, "bytes_done")),
				(uint64_t)json_integer_value(
				json_object_get(info, "bytes_total")));
		json_decref(reply);
		if (m.done)
			break;
		/* Wait for an event or the next progress tick. */
		{
			struct pollfd p = { .fd = fd, .events = POLLIN };

			if (rd.len == 0)
				poll(&p, 1, 200);
		}
		while (rd.len || (poll(&(struct pollfd){ .fd = fd,
				.events = POLLIN }, 1, 0) > 0)) {
			json_t *ev;
			int r = line_read(&rd, &ev);

			if (r != 1)
				break;
			if (json_object_get(ev, "event"))
				move_event(ev, &m);
			json_decref(ev);
			if (m.done)
				break;
		}
	}
	progress_end(m.bar);
	clock_gettime(CLOCK_MONOTONIC, &t1);
	if (m.status == EXIT_OK) {
		double secs = (double)(t1.tv_sec - t0.tv_sec) +
			      (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
		json_t *s = m.summary;
		json_int_t copied = json_integer_value(json_object_get(s,
							"bytes_copied"));
		json_int_t stall = json_integer_value(json_object_get(s,
							"pivot_stall_us"));

		if (m.json) {
			json_print(json_pack("{s:s, s:I, s:f, s:I, s:s, s:b}",
				"summary", m.pivot ? "pivoted" : "ready",
				"bytes_copied", copied, "elapsed_s", secs,
				"pivot_stall_us", stall, "mode", mode,
				"pivoted", m.pivot));
		} else if (m.pivot) {
			char h[32];

			printf("moved to %s: %s copied in %.1f s, guest "
			       "stalled %lld us at the pivot\n", dest,
			       human_size((uint64_t)copied, h, sizeof h), secs,
			       (long long)stall);
		} else {
			printf("%s is in sync and mirrored; end the move with "
			       "bmirror complete or cancel\n", dest);
		}
	}
	json_decref(m.summary);
	close(fd);
	return m.status;
}

/* ---- status, cancel, pause, resume, complete ------------------------- */

static void
help_client(const char *what)
{
	printf("Usage: bmirror %s --control PATH [--json]%s\n", what,
	       strcmp(what, "cancel") == 0 ? " [--force]" : "");
}

/* What `serve` found of a crashed move when it started (docs/state.md). */
static void
print_resume(json_t *r)
{
	const char *err = json_string_value(json_object_get(r, "error"));

	if (!json_is_object(r))
		return;
	if (json_is_true(json_object_get(r, "resumed")))
		printf("resumed: a crashed move to %s, %lld of %lld regions "
		       "to copy again\n",
		       json_string_value(json_object_get(r, "destination")),
		       (long long)json_integer_value(json_object_get(r,
							"regions_dirty")),
		       (long long)json_integer_value(json_object_get(r,
							"regions")));
	else if (err)
		printf("state: not trusted (%s)%s\n", err,
		       json_is_true(json_object_get(r, "full_copy"))
		       ? "; the move restarted from a full copy" : "");
	else
		printf("state: a crashed move found after its switch; "
		       "removed\n");
}

static void
print_status(json_t *ret)
{
	json_t *job = json_object_get(ret, "job");
	char a[32], b[32];

	printf("image: %s\n", json_string_value(json_object_get(ret, "image")));
	printf("nbd: %s\n", json_string_value(json_object_get(ret, "nbd")));
	print_resume(json_object_get(ret, "resume"));
	if (!json_is_object(job)) {
		printf("move: none\n");
		return;
	}
	printf("move: %s, %s mode%s\n",
	       json_string_value(json_object_get(job, "state")),
	       json_string_value(json_object_get(job, "mode")),
	       json_is_true(json_object_get(job, "actively_synced"))
	       ? ", actively synced" : "");
	printf("progress: %s of %s, %lld bytes dirty\n",
	       human_size((uint64_t)json_integer_value(
			json_object_get(job, "bytes_done")), a, sizeof a),
	       human_size((uint64_t)json_integer_value(
			json_object_get(job, "bytes_total")), b, sizeof b),
	       (long long)json_integer_value(json_object_get(job,
							     "dirty_bytes")));
}

int
cmd_client(int argc, char **argv)
{
	enum { OPT_CONTROL = 256, OPT_JSON, OPT_FORCE, OPT_HELP };
	static const struct option longopts[] = {
		{ "control", required_argument, NULL, OPT_CONTROL },
		{ "json", no_argument, NULL, OPT_JSON },
		{ "force", no_argument, NULL, OPT_FORCE },
		{ "help", no_argument, NULL, OPT_HELP },
		{ NULL, 0, NULL, 0 },
	};
	const char *what = argv[0], *control = NULL;
	bool json = false, force = false;
	json_t *cmd, *reply;
	int c;

	opterr = 0;
	while ((c = getopt_long(argc, argv, ":h", longopts, NULL)) != -1) {
		switch (c) {
		case OPT_CONTROL:
			control = optarg;
			break;
		case OPT_JSON:
			json = true;
			break;
		case OPT_FORCE:
			if (strcmp(what, "cancel") != 0)
				return tool_usage_error("--force is for cancel");
			force = true;
			break;
		case 'h':
		case OPT_HELP:
			help_client(what);
			return EXIT_OK;
		default:
			return tool_bad_option(c, argc, argv);
		}
	}
	if (!control || argc != optind)
		return tool_usage_error("%s needs --control PATH", what);
	cmd = json_pack("{s:s}", "cmd", strcmp(what, "status") == 0
					? "query" : what);
	if (force)
		json_object_set_new(cmd, "force", json_true());
	reply = client_call(control, cmd);
	if (!reply)
		return EXIT_FAILED;
	if (json)
		json_print(json_incref(json_object_get(reply, "return")));
	else if (strcmp(what, "status") == 0)
		print_status(json_object_get(reply, "return"));
	json_decref(reply);
	return EXIT_OK;
}
