/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * bmirror serve: export a disk over NBD and take commands on a control
 * socket (docs/control.md).
 *
 * Threads: the library's loop thread runs the disk, the NBD server and a
 * move; this thread runs the control socket with poll(2).  Job events are
 * produced on the loop thread; on_event turns each into a JSON line and
 * writes it to a pipe, which this thread reads and forwards to the client
 * that started the move.  This thread also performs the pivot when a move
 * asked for one and its READY event arrives, and frees ended jobs (never
 * on the loop thread).
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "bmirror.h"
#include "control.h"

#define MAX_CLIENTS 16
#define BM_MIN_U64(a, b) ((uint64_t)(a) < (uint64_t)(b) ? (uint64_t)(a) : (uint64_t)(b))

struct client {
	int fd;
	struct line_reader rd;
};

struct serve {
	struct blockmirror_disk *disk;
	struct blockmirror_server *server;
	const char *link;
	const char *control_path;
	int listen_fd;
	int event_pipe[2];
	int signal_fd;
	struct client clients[MAX_CLIENTS];
	struct line_reader event_rd;

	struct blockmirror_job *job;
	int job_client;               /* fd of the client that started it, -1 */
	bool job_pivot;               /* pivot when READY */
	bool job_ended;
	double job_start;
	char job_mode[16];
	bool quit;
	char **allow_dirs;            /* --allow-dir, canonical */
	size_t n_allow;

	/* Crash-resumable state (docs/state.md). */
	const char *state_dir;        /* NULL: moves keep none */
	char *state_dir_buf;
	json_t *resume;               /* what start-up found, or NULL */
};

static struct serve S;

static double
now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static const char *const event_names[] = {
	[BLOCKMIRROR_EVENT_READY] = "READY",
	[BLOCKMIRROR_EVENT_COMPLETED] = "COMPLETED",
	[BLOCKMIRROR_EVENT_CANCELLED] = "CANCELLED",
	[BLOCKMIRROR_EVENT_FAILED] = "FAILED",
	[BLOCKMIRROR_EVENT_ERROR] = "ERROR",
	[BLOCKMIRROR_EVENT_MODE_CHANGED] = "MODE_CHANGED",
	[BLOCKMIRROR_EVENT_PAUSED] = "PAUSED",
	[BLOCKMIRROR_EVENT_RESUMED] = "RESUMED",
};

/* On the loop thread: serialise and hand over through the pipe. */
static void
on_event(void *data, const struct blockmirror_event *ev)
{
	json_t *o = json_pack("{s:s}", "event", event_names[ev->type]);
	char *s;

	if (ev->err)
		json_object_set_new(o, "errno", json_integer(ev->err));
	if (ev->message)
		json_object_set_new(o, "message", json_string(ev->message));
	if (ev->type == BLOCKMIRROR_EVENT_ERROR) {
		json_object_set_new(o, "offset", json_integer((json_int_t)ev->offset));
		json_object_set_new(o, "length", json_integer((json_int_t)ev->length));
		json_object_set_new(o, "side", json_string(ev->on_source ?
					"source" : "destination"));
	}
	if (ev->type == BLOCKMIRROR_EVENT_COMPLETED)
		json_object_set_new(o, "pivoted", json_boolean(ev->pivoted));
	if (ev->type == BLOCKMIRROR_EVENT_MODE_CHANGED)
		json_object_set_new(o, "mode",
				    json_string(blockmirror_mode_name(ev->mode)));
	s = json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER);
	json_decref(o);
	if (s) {
		size_t len = strlen(s);

		s[len++] = '\n';
		if (write(S.event_pipe[1], s, len) < 0) {
			/* The pipe is large enough for any burst we make. */
		}
		free(s);
	}
}

static json_t *
error_reply(int err, const char *msg)
{
	return json_pack("{s:{s:i, s:s}}", "error", "errno", -err, "message",
			 msg ? msg : strerror(-err));
}

static json_t *
lib_error_reply(int err)
{
	const char *m = blockmirror_last_error();
	const char *p;

	if (m && strncmp(m, "blockmirror_", 12) == 0 && (p = strstr(m, ": ")))
		m = p + 2;
	return error_reply(err, m);
}

static json_t *
job_info_json(void)
{
	struct blockmirror_job_info i = { .size = sizeof i };

	if (!S.job || blockmirror_job_query(S.job, &i) < 0)
		return json_null();
	return json_pack("{s:s, s:s, s:b, s:b, s:b, s:I, s:I, s:I, s:I, s:I, "
			 "s:I, s:I, s:I, s:I, s:f}",
		"state", blockmirror_job_state_name(i.state),
		"mode", blockmirror_mode_name(i.auto_mode ? BLOCKMIRROR_MODE_AUTO
							   : i.mode),
		"ready", i.ready, "actively_synced", i.actively_synced,
		"paused", i.paused,
		"bytes_total", (json_int_t)i.bytes_total,
		"bytes_done", (json_int_t)i.bytes_done,
		"bytes_remaining", (json_int_t)i.bytes_remaining,
		"dirty_bytes", (json_int_t)i.dirty_bytes,
		"bytes_copied", (json_int_t)i.bytes_copied,
		"bytes_mirrored", (json_int_t)i.bytes_mirrored,
		"speed", (json_int_t)i.speed,
		"pivot_stall_us", (json_int_t)i.pivot_stall_us,
		"granularity", (json_int_t)i.granularity,
		"elapsed_s", now_s() - S.job_start);
}

static json_t *
ctl_query(void)
{
	char *img = blockmirror_disk_get_image(S.disk);
	json_t *r = json_pack("{s:{s:s?, s:I, s:s?, s:o}}", "return",
			      "image", img,
			      "size", (json_int_t)blockmirror_disk_get_size(S.disk),
			      "nbd", blockmirror_server_address(S.server),
			      "job", job_info_json());

	if (S.resume && r)
		json_object_set(json_object_get(r, "return"), "resume",
				S.resume);
	free(img);
	return r;
}

static bool
parse_mode(const char *s, enum blockmirror_mode *out)
{
	if (!s || strcmp(s, "active") == 0)
		*out = BLOCKMIRROR_MODE_ACTIVE;
	else if (strcmp(s, "background") == 0)
		*out = BLOCKMIRROR_MODE_BACKGROUND;
	else if (strcmp(s, "auto") == 0)
		*out = BLOCKMIRROR_MODE_AUTO;
	else
		return false;
	return true;
}

static json_t *
ctl_move(json_t *req, int client_fd)
{
	struct blockmirror_job_options o = { .size = sizeof o };
	const char *to = json_string_value(json_object_get(req, "to"));
	char why[PATH_MAX + 128];
	int bad;
	const char *fmt = json_string_value(json_object_get(req, "format"));
	const char *mode = json_string_value(json_object_get(req, "mode"));
	json_t *pivot = json_object_get(req, "pivot");
	json_t *create = json_object_get(req, "create");

	if (!to)
		return error_reply(-EINVAL, "move needs \"to\"");
	bad = control_check_destination(to, S.allow_dirs, S.n_allow, why,
					sizeof why);
	if (bad < 0)
		return error_reply(bad, why);
	if (S.job && !S.job_ended)
		return error_reply(-EBUSY, "a move is already running");
	if (S.job) {
		blockmirror_job_free(S.job);
		S.job = NULL;
	}
	if (fmt) {
		int f = blockmirror_format_from_name(fmt);

		if (f < 0)
			return lib_error_reply(f);
		o.format = (enum blockmirror_format)f;
	}
	if (!parse_mode(mode, &o.mode))
		return error_reply(-EINVAL, "mode must be active, background "
				   "or auto");
	o.speed = (uint64_t)json_integer_value(json_object_get(req, "speed"));
	o.granularity = (uint64_t)json_integer_value(
		json_object_get(req, "granularity"));
	if (json_is_true(create))
		o.flags |= BLOCKMIRROR_JOB_CREATE;
	{
		const char *pol = json_string_value(json_object_get(req,
							"on_error"));

		if (!pol || strcmp(pol, "report") == 0)
			o.on_error = BLOCKMIRROR_ON_ERROR_REPORT;
		else if (strcmp(pol, "stop") == 0)
			o.on_error = BLOCKMIRROR_ON_ERROR_STOP;
		else if (strcmp(pol, "retry") == 0)
			o.on_error = BLOCKMIRROR_ON_ERROR_RETRY;
		else
			return error_reply(-EINVAL, "on_error must be report, "
					   "stop or retry");
	}
	{
		json_t *js = json_object_get(req, "sync");
		const char *sync = json_string_value(js);

		if (js && !sync)
			return error_reply(-EINVAL, "sync must be a string");
		if (!sync || strcmp(sync, "full") == 0)
			o.sync = BLOCKMIRROR_SYNC_FULL;
		else if (strcmp(sync, "top") == 0)
			o.sync = BLOCKMIRROR_SYNC_TOP;
		else if (strcmp(sync, "none") == 0)
			o.sync = BLOCKMIRROR_SYNC_NONE;
		else
			return error_reply(-EINVAL, "sync must be full, top "
					   "or none");
	}
	o.link = S.link;
	o.state_dir = S.state_dir; /* a new move replaces any old state */
	o.on_event = on_event;
	o.event_data = NULL;
	S.job_ended = false;
	S.job_pivot = !json_is_false(pivot);
	S.job_client = client_fd;
	S.job_start = now_s();
	snprintf(S.job_mode, sizeof S.job_mode, "%s", mode ? mode : "active");
	S.job = blockmirror_job_start(S.disk, to, &o);
	if (!S.job)
		return lib_error_reply(-errno);
	return json_pack("{s:{s:s}}", "return", "state", "started");
}

typedef int (*job_fn)(struct blockmirror_job *);

static json_t *
ctl_job(const char *cmd, json_t *req)
{
	int r;

	if (!S.job)
		return error_reply(-ENOENT, "no move is running");
	if (strcmp(cmd, "cancel") == 0)
		r = blockmirror_job_cancel(S.job,
			json_is_true(json_object_get(req, "force")));
	else if (strcmp(cmd, "pause") == 0)
		r = blockmirror_job_pause(S.job);
	else if (strcmp(cmd, "resume") == 0)
		r = blockmirror_job_resume(S.job);
	else if (strcmp(cmd, "complete") == 0)
		r = blockmirror_job_complete(S.job);
	else if (strcmp(cmd, "set-speed") == 0)
		r = blockmirror_job_set_speed(S.job, (uint64_t)json_integer_value(
			json_object_get(req, "speed")));
	else {
		enum blockmirror_mode m;

		if (!parse_mode(json_string_value(json_object_get(req, "mode")),
				&m))
			return error_reply(-EINVAL, "mode must be active, "
					   "background or auto");
		r = blockmirror_job_set_mode(S.job, m);
	}
	if (r < 0)
		return lib_error_reply(r);
	return json_pack("{s:o}", "return", job_info_json());
}

/*
 * "move" with "base": move the served image's backing file to "to" (made
 * by copying the old one unless it exists), verify it, then re-point the
 * image at it (blockmirror_disk_set_backing; docs/chains.md).  The base
 * is read-only under the overlay, so no mirroring is needed; the guest
 * goes on meanwhile.  Blocking: the control socket waits, NBD does not.
 */
static json_t *
ctl_move_base(json_t *req, int client_fd)
{
	const char *to = json_string_value(json_object_get(req, "to"));
	char why[PATH_MAX + 128], *img;
	struct blockmirror_image_info ii = { .size = sizeof ii };
	struct blockmirror_copy_options co = { .size = sizeof co };
	struct blockmirror_verify_result vr = { .size = sizeof vr };
	double t0 = now_s();
	json_t *ev;
	int r;

	if (!to)
		return error_reply(-EINVAL, "move needs \"to\"");
	r = control_check_destination(to, S.allow_dirs, S.n_allow, why,
				      sizeof why);
	if (r < 0)
		return error_reply(r, why);
	if (S.job && !S.job_ended)
		return error_reply(-EBUSY, "a move is already running");
	img = blockmirror_disk_get_image(S.disk);
	r = img ? blockmirror_image_info(img, BLOCKMIRROR_FORMAT_AUTO, &ii)
		: -ENOMEM;
	free(img);
	if (r < 0)
		return lib_error_reply(r);
	if (!ii.backing_path[0])
		return error_reply(-EINVAL, "the served image has no backing "
				   "file");
	if (json_is_true(json_object_get(req, "create"))) {
		co.src_format = ii.backing_format;
		r = blockmirror_copy(ii.backing_path, to, &co, NULL);
		if (r < 0)
			return lib_error_reply(r);
	}
	r = blockmirror_verify(ii.backing_path, ii.backing_format, to,
			       BLOCKMIRROR_FORMAT_AUTO, NULL, NULL, &vr);
	if (r < 0)
		return lib_error_reply(r);
	if (!vr.identical)
		return error_reply(-EINVAL, "the new base does not read as "
				   "the old one");
	r = blockmirror_disk_set_backing(S.disk, to, BLOCKMIRROR_FORMAT_AUTO);
	if (r < 0)
		return lib_error_reply(r);
	ev = json_pack("{s:s, s:b, s:s, s:s, s:f}", "event", "COMPLETED",
		       "pivoted", 1, "old_base", ii.backing_path, "base", to,
		       "elapsed_s", now_s() - t0);
	if (ev)
		line_write(client_fd, ev);
	return json_pack("{s:{s:s}}", "return", "state", "completed");
}

static json_t *
handle(json_t *req, int client_fd)
{
	struct control_request cr;
	const char *cmd, *why;

	/* Members of the wrong type are refused before anything runs. */
	if (control_parse_request(req, &cr, &why) < 0)
		return error_reply(-EINVAL, why);
	cmd = cr.cmd;
	if (strcmp(cmd, "query") == 0)
		return ctl_query();
	if (strcmp(cmd, "move") == 0 &&
	    json_is_true(json_object_get(req, "base")))
		return ctl_move_base(req, client_fd);
	if (strcmp(cmd, "move") == 0)
		return ctl_move(req, client_fd);
	if (strcmp(cmd, "cancel") == 0 || strcmp(cmd, "pause") == 0 ||
	    strcmp(cmd, "resume") == 0 || strcmp(cmd, "complete") == 0 ||
	    strcmp(cmd, "set-speed") == 0 || strcmp(cmd, "set-mode") == 0)
		return ctl_job(cmd, req);
	if (strcmp(cmd, "quit") == 0) {
		S.quit = true;
		return json_pack("{s:{}}", "return");
	}
	return error_reply(-EINVAL, "unknown command");
}

/* ---- events from the loop -------------------------------------------- */

static void
forward_event(json_t *ev)
{
	const char *name = json_string_value(json_object_get(ev, "event"));

	if (name && (strcmp(name, "COMPLETED") == 0 ||
		     strcmp(name, "CANCELLED") == 0 ||
		     strcmp(name, "FAILED") == 0)) {
		json_t *info = job_info_json();

		S.job_ended = true;
		if (json_is_object(info)) {
			json_object_set(ev, "bytes_copied",
					json_object_get(info, "bytes_copied"));
			json_object_set(ev, "pivot_stall_us",
					json_object_get(info, "pivot_stall_us"));
		}
		json_object_set_new(ev, "elapsed_s",
				    json_real(now_s() - S.job_start));
		json_object_set_new(ev, "mode", json_string(S.job_mode));
		json_decref(info);
	}
	if (S.job_client >= 0 &&
	    line_write(S.job_client, json_incref(ev)) < 0)
		S.job_client = -1; /* it went away; the move goes on */
	if (name && strcmp(name, "READY") == 0 && S.job_pivot) {
		int r = blockmirror_job_complete(S.job);

		if (r < 0 && S.job_client >= 0) {
			json_t *e = json_pack("{s:s, s:i}", "event",
					      "PIVOT_FAILED", "errno", -r);

			json_object_set_new(e, "message", json_string(
				blockmirror_last_error()));
			line_write(S.job_client, e);
		}
	}
	json_decref(ev);
}

/* ---- sockets ---------------------------------------------------------- */

/*
 * Only our own user and root may talk to the control socket.  The
 * socket file is 0600 already; this holds even if its mode or its
 * directory's is loosened, or the descriptor is passed on.
 */
static bool
peer_allowed(int fd)
{
	struct ucred cred;
	socklen_t len = sizeof cred;

	if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0)
		return false;
	if (cred.uid == geteuid() || cred.uid == 0)
		return true;
	fprintf(stderr, "bmirror serve: %s: refused a control client of "
		"uid %u (pid %d)\n", S.control_path, (unsigned)cred.uid,
		(int)cred.pid);
	return false;
}

static int
listen_control(const char *path)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	struct stat st;
	int fd;

	if (strlen(path) >= sizeof sa.sun_path) {
		tool_error("%s: control socket path too long", path);
		return -1;
	}
	strcpy(sa.sun_path, path);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd < 0) {
		tool_error("%s: socket: %s", path, strerror(errno));
		return -1;
	}
	/* Replace a stale socket, never a file or a live server's socket. */
	if (lstat(path, &st) == 0) {
		int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
		bool live = S_ISSOCK(st.st_mode) && probe >= 0 &&
			    connect(probe, (struct sockaddr *)&sa,
				    sizeof sa) == 0;

		if (probe >= 0)
			close(probe);
		if (!S_ISSOCK(st.st_mode) || live) {
			tool_error("%s: %s", path, live ? "a server is "
				   "listening on it" : "exists and is not a "
				   "socket");
			close(fd);
			return -1;
		}
		unlink(path);
	}
	/* The socket's mode is the file's: 0600 from bind on, without
	 * changing the umask behind the loop thread's back. */
	if (fchmod(fd, 0600) < 0 ||
	    bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0 ||
	    listen(fd, 16) < 0) {
		tool_error("%s: %s", path, strerror(errno));
		close(fd);
		return -1;
	}
	return fd;
}

static void
drop_client(struct client *c)
{
	if (S.job_client == c->fd)
		S.job_client = -1;
	close(c->fd);
	c->fd = -1;
}

static void
serve_loop(void)
{
	while (!S.quit) {
		struct pollfd p[MAX_CLIENTS + 3];
		int n = 0;

		p[n++] = (struct pollfd){ .fd = S.listen_fd, .events = POLLIN };
		p[n++] = (struct pollfd){ .fd = S.event_pipe[0], .events = POLLIN };
		p[n++] = (struct pollfd){ .fd = S.signal_fd, .events = POLLIN };
		for (int i = 0; i < MAX_CLIENTS; i++)
			p[n++] = (struct pollfd){ .fd = S.clients[i].fd,
						  .events = POLLIN };
		if (poll(p, (nfds_t)n, -1) < 0) {
			if (errno == EINTR)
				continue;
			break;
		}
		if (p[2].revents) {
			struct signalfd_siginfo si;

			if (read(S.signal_fd, &si, sizeof si) > 0)
				S.quit = true;
		}
		if (p[1].revents) {
			json_t *ev;
			int r;

			while ((r = line_read(&S.event_rd, &ev)) == 1 ||
			       r == -EPROTO)
				if (ev)
					forward_event(ev);
		}
		if (p[0].revents) {
			int fd = accept4(S.listen_fd, NULL, NULL,
					 SOCK_CLOEXEC | SOCK_NONBLOCK);
			int i;

			if (fd >= 0 && !peer_allowed(fd)) {
				close(fd);
				fd = -1;
			}

			for (i = 0; fd >= 0 && i < MAX_CLIENTS; i++)
				if (S.clients[i].fd < 0) {
					S.clients[i].fd = fd;
					S.clients[i].rd.fd = fd;
					S.clients[i].rd.len = 0;
					break;
				}
			if (fd >= 0 && i == MAX_CLIENTS)
				close(fd);
		}
		for (int i = 0; i < MAX_CLIENTS; i++) {
			struct client *c = &S.clients[i];
			json_t *req;
			int r;

			if (c->fd < 0 || !p[3 + i].revents)
				continue;
			while ((r = line_read(&c->rd, &req)) == 1 ||
			       r == -EPROTO) {
				json_t *reply = req ? handle(req, c->fd)
					: error_reply(-EPROTO, "not a JSON "
						      "object");

				json_decref(req);
				if (line_write(c->fd, reply) < 0)
					break;
			}
			if (r != -EAGAIN && r != 1 && r != -EPROTO)
				drop_client(c);
		}
	}
}

/* --allow-dir DIR: kept canonical, as control_check_destination wants. */
static int
add_allow_dir(const char *dir)
{
	char *real = realpath(dir, NULL);
	char **v;
	struct stat st;

	if (!real || stat(real, &st) < 0 || !S_ISDIR(st.st_mode)) {
		tool_usage_error("--allow-dir %s: %s", dir,
				 real ? "not a directory" : strerror(errno));
		free(real);
		return -1;
	}
	v = realloc(S.allow_dirs, (S.n_allow + 1) * sizeof *v);
	if (!v) {
		free(real);
		return -1;
	}
	v[S.n_allow++] = real;
	S.allow_dirs = v;
	return 0;
}

static void
free_allow_dirs(void)
{
	for (size_t i = 0; i < S.n_allow; i++)
		free(S.allow_dirs[i]);
	free(S.allow_dirs);
	S.allow_dirs = NULL;
	S.n_allow = 0;
}

/* ---- crash-resumable state (docs/state.md) ---------------------------- */

/* The target of the symlink `link`, malloc'd, or NULL. */
static char *
read_link(const char *link)
{
	char buf[PATH_MAX];
	ssize_t n = readlink(link, buf, sizeof buf - 1);

	if (n <= 0)
		return NULL;
	buf[n] = '\0';
	return strdup(buf);
}

/* Take up the move a crash left (docs/state.md), like a `move` command
 * without a client. */
static int
start_recovered_move(const struct blockmirror_recovery *rec)
{
	struct blockmirror_job_options o = { .size = sizeof o };

	o.link = S.link;
	o.on_event = on_event;
	S.job_ended = false;
	S.job_pivot = true;
	S.job_client = -1;
	S.job_start = now_s();
	snprintf(S.job_mode, sizeof S.job_mode, "%s",
		 blockmirror_mode_name(rec->state.mode));
	S.job = blockmirror_job_start_recovered(S.disk, rec, &o);
	return S.job ? 0 : -errno;
}

/*
 * At start-up: what a crash left, decided by the library
 * (blockmirror_recover).  Reported in the `resume` member of the first
 * status reply and on stderr.
 */
static int
state_setup(bool no_state, const char *image)
{
	struct blockmirror_recovery rec = { .size = sizeof rec };
	const struct blockmirror_state_info *si = &rec.state;
	static const char *const phase[] = {
		[BLOCKMIRROR_RECOVER_RESUME] = "copying",
		[BLOCKMIRROR_RECOVER_RESTART] = "copying",
		[BLOCKMIRROR_RECOVER_SWITCHED] = "switched",
		[BLOCKMIRROR_RECOVER_DISCARDED] = "discarded",
	};
	int r;

	if (no_state) {
		S.state_dir = NULL;
		return 0;
	}
	r = blockmirror_recover(S.link, image, S.state_dir, 0, &rec);
	if (r < 0) {
		fprintf(stderr, "bmirror serve: %s\n", blockmirror_last_error());
		return r;
	}
	if (rec.state_dir && !S.state_dir) {
		S.state_dir_buf = strdup(rec.state_dir);
		S.state_dir = S.state_dir_buf;
	}
	if (rec.action == BLOCKMIRROR_RECOVER_NONE)
		goto out;
	fprintf(stderr, "bmirror serve: %s\n", rec.message);
	S.resume = json_pack("{s:s, s:b, s:s}", "state_dir", rec.state_dir,
			     "resumed", false, "phase", phase[rec.action]);
	if (si->destination)
		json_object_set_new(S.resume, "destination",
				    json_string(si->destination));
	if (rec.action != BLOCKMIRROR_RECOVER_RESUME &&
	    rec.action != BLOCKMIRROR_RECOVER_RESTART) {
		if (rec.action == BLOCKMIRROR_RECOVER_DISCARDED)
			json_object_set_new(S.resume, "error",
					    json_string(rec.message));
		goto out;
	}
	if (rec.action == BLOCKMIRROR_RECOVER_RESTART)
		json_object_set_new(S.resume, "error", json_string(rec.message));
	if (start_recovered_move(&rec) < 0) {
		const char *err = blockmirror_last_error();

		fprintf(stderr, "bmirror serve: cannot take up the move: %s\n",
			err);
		json_object_set_new(S.resume, rec.action ==
				    BLOCKMIRROR_RECOVER_RESUME ? "error"
				    : "restart_error", json_string(err));
		if (rec.action != BLOCKMIRROR_RECOVER_RESUME)
			goto out;
		/* The bitmap could not be used after all: a full copy. */
		rec.action = BLOCKMIRROR_RECOVER_RESTART;
		fprintf(stderr, "bmirror serve: restarting the move to %s "
			"from a full copy\n", si->destination);
		if (start_recovered_move(&rec) < 0) {
			json_object_set_new(S.resume, "restart_error",
				json_string(blockmirror_last_error()));
			goto out;
		}
	}
	if (rec.action == BLOCKMIRROR_RECOVER_RESTART) {
		json_object_set_new(S.resume, "full_copy", json_true());
		goto out;
	}
	json_object_set_new(S.resume, "resumed", json_true());
	json_object_set_new(S.resume, "regions",
			    json_integer((json_int_t)si->regions));
	json_object_set_new(S.resume, "regions_dirty",
			    json_integer((json_int_t)si->regions_dirty));
	json_object_set_new(S.resume, "bytes_dirty", json_integer(
		(json_int_t)BM_MIN_U64(si->regions_dirty * si->region_size,
				       si->disk_size)));
out:
	blockmirror_recovery_free(&rec);
	return 0;
}

static void
help(void)
{
	printf("Usage: bmirror serve [-f FMT] --nbd unix:PATH|tcp:HOST:PORT "
	       "--control PATH\n"
	       "                     [--export-name NAME] [--readonly] "
	       "[--tls-psk-file FILE]\n"
	       "                     [--allow-dir DIR]... "
	       "(IMAGE | --link LINK)\n\n"
	       "Export IMAGE (or the image LINK points to) over NBD and take "
	       "commands on the\ncontrol socket (bmirror move, status, "
	       "cancel, pause, resume).  With --link, a\nmove's pivot "
	       "re-points LINK at the destination.  With --allow-dir, moves "
	       "may only write\ninto those directories.  Runs until SIGTERM, "
	       "SIGINT or a quit command.\n");
	printf("\nA move keeps crash-resumable state in --state-dir DIR "
	       "(with --link, by\ndefault LINK.bmirror-state; --no-state: "
	       "none).  Started again after a\ncrash, serve resumes the move "
	       "it finds there (docs/state.md).\n");
}

int
cmd_serve(int argc, char **argv)
{
	enum { OPT_NBD = 256, OPT_CONTROL, OPT_LINK, OPT_EXPORT, OPT_READONLY,
	       OPT_PSK, OPT_ALLOW_DIR, OPT_HELP, OPT_STATE_DIR, OPT_NO_STATE };
	static const struct option longopts[] = {
		{ "nbd", required_argument, NULL, OPT_NBD },
		{ "control", required_argument, NULL, OPT_CONTROL },
		{ "link", required_argument, NULL, OPT_LINK },
		{ "export-name", required_argument, NULL, OPT_EXPORT },
		{ "readonly", no_argument, NULL, OPT_READONLY },
		{ "tls-psk-file", required_argument, NULL, OPT_PSK },
		{ "allow-dir", required_argument, NULL, OPT_ALLOW_DIR },
		{ "state-dir", required_argument, NULL, OPT_STATE_DIR },
		{ "no-state", no_argument, NULL, OPT_NO_STATE },
		{ "help", no_argument, NULL, OPT_HELP },
		{ NULL, 0, NULL, 0 },
	};
	struct blockmirror_server_options so = { .size = sizeof so };
	enum blockmirror_format fmt = BLOCKMIRROR_FORMAT_AUTO;
	const char *nbd = NULL, *image = NULL;
	unsigned dflags = 0;
	sigset_t mask;
	int c, status = EXIT_OK;
	bool no_state = false;
	char *link_target = NULL;

	opterr = 0;
	S.listen_fd = S.signal_fd = -1;
	S.job_client = -1;
	while ((c = getopt_long(argc, argv, ":f:h", longopts, NULL)) != -1) {
		switch (c) {
		case 'f':
			if (!parse_format(optarg, &fmt))
				return EXIT_USAGE;
			break;
		case OPT_NBD:
			nbd = optarg;
			break;
		case OPT_CONTROL:
			S.control_path = optarg;
			break;
		case OPT_LINK:
			S.link = optarg;
			break;
		case OPT_EXPORT:
			so.export_name = optarg;
			break;
		case OPT_READONLY:
			so.readonly = true;
			dflags |= BLOCKMIRROR_DISK_READONLY;
			break;
		case OPT_PSK:
			so.tls_psk_file = optarg;
			break;
		case OPT_ALLOW_DIR:
			if (add_allow_dir(optarg) < 0)
				return EXIT_USAGE;
			break;
		case OPT_STATE_DIR:
			S.state_dir = optarg;
			break;
		case OPT_NO_STATE:
			no_state = true;
			break;
		case 'h':
		case OPT_HELP:
			help();
			return EXIT_OK;
		default:
			return tool_bad_option(c, argc, argv);
		}
	}
	if (!nbd || !S.control_path)
		return tool_usage_error("--nbd and --control are required");
	if (S.link && argc - optind != 0)
		return tool_usage_error("give IMAGE or --link LINK, not both");
	if (!S.link && argc - optind != 1)
		return tool_usage_error("expected one IMAGE (or --link LINK)");
	if (strncmp(nbd, "unix:", 5) != 0 && strncmp(nbd, "tcp:", 4) != 0)
		return tool_usage_error("--nbd takes unix:PATH or "
					"tcp:HOST:PORT, not '%s'", nbd);
	image = S.link ? S.link : argv[optind];
	if (S.link) {
		struct stat st;

		if (lstat(S.link, &st) < 0) {
			tool_error("%s: %s", S.link, strerror(errno));
			return EXIT_FAILED;
		}
		if (!S_ISLNK(st.st_mode)) {
			tool_error("%s: not a symbolic link", S.link);
			return EXIT_FAILED;
		}
		/* A pivot to an NBD export points LINK at its URI, which
		 * is opened as such rather than as a path. */
		link_target = read_link(S.link);
		if (link_target && strstr(link_target, "://"))
			image = link_target;
	}

	/* Signals are read through a signalfd, in the poll loop. */
	sigemptyset(&mask);
	sigaddset(&mask, SIGTERM);
	sigaddset(&mask, SIGINT);
	sigaddset(&mask, SIGHUP);
	pthread_sigmask(SIG_BLOCK, &mask, NULL);
	signal(SIGPIPE, SIG_IGN);
	S.signal_fd = signalfd(-1, &mask, SFD_CLOEXEC);
	if (pipe2(S.event_pipe, O_CLOEXEC | O_NONBLOCK) < 0) {
		tool_error("pipe: %s", strerror(errno));
		return EXIT_FAILED;
	}
	fcntl(S.event_pipe[1], F_SETPIPE_SZ, 1 << 20);
	S.event_rd.fd = S.event_pipe[0];
	for (int i = 0; i < MAX_CLIENTS; i++)
		S.clients[i].fd = -1;

	S.disk = blockmirror_disk_open(image, fmt, dflags);
	if (!S.disk) {
		tool_lib_error();
		return EXIT_FAILED;
	}
	if (blockmirror_disk_start_thread(S.disk) < 0)
		goto fail_disk;
	S.server = blockmirror_server_start(S.disk, nbd, &so);
	if (!S.server)
		goto fail_disk;
	S.listen_fd = listen_control(S.control_path);
	if (S.listen_fd < 0) {
		status = EXIT_FAILED;
		goto out;
	}

	if (state_setup(no_state, image) < 0) {
		status = EXIT_FAILED;
		goto out;
	}
	serve_loop();

out:
	/* A move still running is cancelled: no job is left half-done. */
	if (S.job) {
		if (!S.job_ended)
			blockmirror_job_cancel(S.job, true);
		blockmirror_job_free(S.job);
	}
	for (int i = 0; i < MAX_CLIENTS; i++)
		if (S.clients[i].fd >= 0)
			close(S.clients[i].fd);
	if (S.listen_fd >= 0) {
		close(S.listen_fd);
		unlink(S.control_path);
	}
	blockmirror_server_stop(S.server);
	if (blockmirror_disk_close(S.disk) < 0) {
		tool_lib_error();
		status = EXIT_FAILED;
	}
	free_allow_dirs();
	json_decref(S.resume);
	free(S.state_dir_buf);
	free(link_target);
	return status;

fail_disk:
	tool_lib_error();
	blockmirror_disk_close(S.disk);
	free(link_target);
	return EXIT_FAILED;
}
