/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * bmirror serve: export a disk over NBD and take commands on a control
 * socket (docs/control.md).
 *
 * Threads: the library's loop thread runs the disk, the NBD server and a
 * move; this thread runs the control socket with poll(2).  Job events are
 * produced on the loop thread; on_event queues each (see "events from the
 * loop" for why none is ever lost) and this thread turns them into JSON
 * lines for the client that started the move.  This thread also performs
 * the pivot when a move asked for one and its READY event arrives, and
 * frees ended jobs (never on the loop thread).  Job-ending events are
 * processed whether or not any client is there to see them.
 *
 * This thread never waits for a client.  Sockets are non-blocking; each
 * client has an output queue sent as fast as it reads.  A client whose
 * queue holds OUT_PAUSE bytes has no more of its commands read until it
 * takes them (so one that pipelines commands without reading only slows
 * itself); one whose queue still grows past OUT_MAX (events it does not
 * read) is disconnected.  Each poll round reads at most LINES_PER_ROUND
 * commands from each client, so a flooding client cannot starve others.
 *
 * A consistency group's hold ("snapshot-hold", docs/control.md) stops
 * the guest under a lease that runs on the loop thread, so the guest goes
 * on in time even while this thread is busy; the hold itself runs on a
 * thread of its own, like a backup; the holder's connection closing
 * before the commit ends the group's part here.
 */
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "bmirror.h"
#include "control.h"
#include "serve-replicate.h"

#define MAX_CLIENTS 64
#define LINES_PER_ROUND 16          /* commands per client per poll round */
#define OUT_PAUSE (64 * 1024)       /* queued output that pauses reading */
#define OUT_MAX (1024 * 1024)       /* queued output that disconnects */
#define MAX_SNAPSHOTS 64            /* the server's limit of exports */
#define DEFAULT_LEASE_MS 1000       /* a group's hold, unless asked */
#define BM_MIN_U64(a, b) ((uint64_t)(a) < (uint64_t)(b) ? (uint64_t)(a) : (uint64_t)(b))

struct client {
	int fd;                       /* -1: a free slot */
	struct line_reader rd;
	struct line_out out;          /* lines not yet taken by the client */
	bool eof;                     /* it sent EOF: close once out is sent */
	unsigned gen;                 /* which connection holds the slot */
};

/* What a "snapshot" or "snapshot-hold" asks for, checked: the options
 * point into it. */
struct snap_request {
	struct blockmirror_snapshot_options o;
	char scratch[PATH_MAX], dir[PATH_MAX];
	char *export_name;            /* malloc'd */
	char *since, *checkpoint;     /* copies, for a request kept past its
				       * command (a group's hold) */
};

struct serve {
	struct blockmirror_disk *disk;
	struct blockmirror_server *server;
	const char *link;
	const char *control_path;
	int listen_fd;
	int event_fd;                 /* wakes this thread for queued events */
	int signal_fd;
	struct client clients[MAX_CLIENTS];

	struct blockmirror_job *job;
	unsigned job_gen;             /* tags the job's events (event_data) */
	int job_client;               /* index of the client that started it,
				       * -1 */
	bool job_pivot;               /* pivot when READY */
	bool job_ended;
	double job_start;
	char job_mode[16];
	bool quit;
	char **allow_dirs;            /* --allow-dir, canonical */
	size_t n_allow;
	char **allow_nbd;             /* --allow-nbd, "unix:" paths canonical */
	size_t n_allow_nbd;

	/* Snapshots, each exported read-only by the server (docs/control.md):
	 * released at quit, after the server stopped serving them. */
	struct {
		char *export_name;
		struct blockmirror_snapshot *snap;
		char *since;          /* taken since this checkpoint, or NULL */
		char *checkpoint;     /* and created this one, or NULL */
		uint64_t changed_bytes; /* since `since` */
		char *group;          /* taken in this group, or NULL */
		uint64_t held_us, queued_us; /* the group's hold */
		bool broken_told;     /* SNAPSHOT_BROKEN sent */
	} snaps[MAX_SNAPSHOTS];
	atomic_bool snaps_broke;      /* one broke since they were looked at */
	size_t n_snaps;
	unsigned snap_counter;        /* the default names: snap-N */
	unsigned client_gen;          /* numbers connections (client.gen) */

	/* This disk's part in a consistency group ("consistency groups"
	 * below): held, then taken (its snapshot pending), until committed or
	 * aborted; one at a time, for the client that held it. */
	struct {
		bool active;
		char name[65];
		int client;               /* the holder's slot and gen */
		unsigned gen;
		uint32_t lease_ms;
		struct blockmirror_snapshot_hold *hold; /* until the take */
		struct snap_request *req; /* what the hold asked for */
		char *pending;            /* taken: its export, to commit */
		/* The hold itself runs on a thread of its own (hold_main):
		 * this one goes on answering the other clients meanwhile. */
		bool holding;             /* hold_thread runs (this thread's
					   * view) */
		pthread_t hold_thread;
		atomic_bool hold_done;    /* set by hold_thread, then wake() */
		int hold_r;               /* hold_thread's, read once done */
		struct blockmirror_snapshot_hold *hold_new;
		char hold_err[512];
	} grp;
	/* The last group let go here because its hold's lease ran out: its
	 * holder's take, commit or abort is told so (group_expire). */
	struct {
		char name[65];
		int client;
		unsigned gen;
		uint32_t lease_ms;
	} grp_expired;

	/* A backup ("backup"), on a thread of its own so that this one goes
	 * on answering; it wakes this one through event_fd. */
	struct {
		bool running;             /* this thread's view */
		pthread_t thread;
		int client;               /* who asked, and the slot's gen */
		unsigned gen;
		char dir[PATH_MAX];
		char target[PATH_MAX];    /* an NBD export, or "" */
		bool incremental, frozen;
		atomic_bool cancel;       /* quit: stop at the next read */
		double t0;
		pthread_mutex_t lock;     /* guards the rest */
		uint64_t done, total;
		json_t *events;           /* to send, in order */
		bool taken, finished;
		int r;
		char err[512];
		struct blockmirror_backup_point pt;
	} bk;

	/* Crash-resumable state (docs/state.md). */
	const char *state_dir;        /* NULL: moves keep none */
	char *state_dir_buf;
	json_t *resume;               /* what start-up found, or NULL */

	/* Change tracking (--track, docs/cbt.md): on from before the first
	 * guest request, until the disk closes. */
	char *track_sidecar;          /* where the record is (the sidecar or
					 the image); NULL: not tracking */
	bool track_in_image;          /* the image's persistent bitmaps */
	bool track_crashed;           /* the previous tracker did not close */
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

/*
 * Job events, from the loop thread to this one.  None may be lost: a lost
 * COMPLETED would leave the job running as far as this thread knows and
 * refuse every later move (EBUSY), a lost READY the automatic pivot.  So
 * on_event appends to an unbounded list under a mutex and only wakes this
 * thread through an eventfd (a failed wake-up loses nothing: the counter
 * is non-zero already).  A node that cannot be allocated is replaced by
 * one kept aside per event type; only a repeat of the same type before
 * this thread catches up can be lost then, never READY or a job-ending
 * event, which come once per job.  Each event carries its job's
 * generation, so one left over from an earlier job is never taken for
 * the current one's.
 */
struct ev_node {
	struct ev_node *next;
	unsigned gen;
	bool spare;                   /* one of EQ.spares */
	struct blockmirror_event ev;  /* .message: malloc'd copy, or NULL */
};

#define N_EVENT_TYPES (BLOCKMIRROR_EVENT_RESUMED + 1)

static struct {
	pthread_mutex_t lock;
	struct ev_node *head, **tail;
	struct ev_node spares[N_EVENT_TYPES];
	bool spare_busy[N_EVENT_TYPES];
} EQ = { .lock = PTHREAD_MUTEX_INITIALIZER, .tail = &EQ.head };

/* On the loop thread: copy the event and queue it for this thread. */
static void
on_event(void *data, const struct blockmirror_event *ev)
{
	unsigned t = (unsigned)ev->type;
	char *msg;
	struct ev_node *n;
	uint64_t one = 1;

	if (t == 0 || t >= N_EVENT_TYPES || !event_names[t])
		return; /* a type this program does not know */
	msg = ev->message ? strdup(ev->message) : NULL;
	n = malloc(sizeof *n);
	pthread_mutex_lock(&EQ.lock);
	if (!n && !EQ.spare_busy[t]) {
		EQ.spare_busy[t] = true;
		n = &EQ.spares[t];
		n->spare = true;
	} else if (n) {
		n->spare = false;
	}
	if (n) {
		n->next = NULL;
		n->gen = (unsigned)(uintptr_t)data;
		n->ev = *ev;
		n->ev.message = msg;
		*EQ.tail = n;
		EQ.tail = &n->next;
	}
	pthread_mutex_unlock(&EQ.lock);
	if (!n)
		free(msg);
	if (write(S.event_fd, &one, sizeof one) < 0) {
		/* EAGAIN: the counter is non-zero, this thread wakes anyway. */
	}
}

/* Take every queued event off the list (this thread). */
static struct ev_node *
take_events(void)
{
	struct ev_node *list;

	pthread_mutex_lock(&EQ.lock);
	list = EQ.head;
	EQ.head = NULL;
	EQ.tail = &EQ.head;
	pthread_mutex_unlock(&EQ.lock);
	return list;
}

static void
free_event(struct ev_node *n)
{
	free((char *)n->ev.message);
	if (!n->spare) {
		free(n);
		return;
	}
	pthread_mutex_lock(&EQ.lock);
	EQ.spare_busy[n->ev.type] = false;
	pthread_mutex_unlock(&EQ.lock);
}

static json_t *
event_json(const struct blockmirror_event *ev)
{
	json_t *o = json_pack("{s:s}", "event", event_names[ev->type]);

	if (!o)
		return NULL;
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
	return o;
}

static void client_send(int ci, json_t *obj);

static json_t *
error_reply(int err, const char *msg)
{
	return json_pack("{s:{s:i, s:s}}", "error", "errno", -err, "message",
			 msg ? msg : strerror(-err));
}

/* This thread's last library error, without the function's name (NULL:
 * none). */
static const char *
lib_error_message(void)
{
	const char *m = blockmirror_last_error();
	const char *p;

	if (m && strncmp(m, "blockmirror_", 12) == 0 && (p = strstr(m, ": ")))
		m = p + 2;
	return m;
}

static json_t *
lib_error_reply(int err)
{
	return error_reply(err, lib_error_message());
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

static const char *
snapshot_state_name(enum blockmirror_snapshot_state st)
{
	switch (st) {
	case BLOCKMIRROR_SNAPSHOT_ACTIVE:
		return "active";
	case BLOCKMIRROR_SNAPSHOT_BROKEN:
		return "broken";
	case BLOCKMIRROR_SNAPSHOT_DETACHED:
		return "detached";
	}
	return "unknown";
}

/* Append `name` to `uri`, percent-encoding all but unreserved bytes: an
 * export name may hold anything. */
static void
uri_append_name(char *uri, size_t size, const char *name)
{
	size_t n = strlen(uri);

	for (const unsigned char *p = (const unsigned char *)name;
	     *p && n + 4 < size; p++) {
		if (isalnum(*p) || strchr("-._~", *p))
			uri[n++] = (char)*p;
		else
			n += (size_t)snprintf(uri + n, size - n, "%%%02X", *p);
	}
	uri[n] = '\0';
}

/* The NBD URI of export `name` on our server: nbd+unix:///NAME?socket=
 * PATH or nbd://HOST:PORT/NAME.  false if it does not fit. */
static bool
export_uri(const char *name, char *uri, size_t size)
{
	const char *a = blockmirror_server_address(S.server);
	const char *colon;
	int n;

	if (strncmp(a, "unix:", 5) == 0) {
		snprintf(uri, size, "nbd+unix:///");
		uri_append_name(uri, size, name);
		n = (int)strlen(uri);
		n += snprintf(uri + n, size - (size_t)n, "?socket=%s", a + 5);
		return (size_t)n < size;
	}
	if (strncmp(a, "tcp:", 4) != 0 || !(colon = strrchr(a + 4, ':')))
		return false;
	/* An IPv6 address goes in brackets (it may have them already). */
	if (memchr(a + 4, ':', (size_t)(colon - (a + 4))) && a[4] != '[')
		n = snprintf(uri, size, "nbd://[%.*s]%s/",
			     (int)(colon - (a + 4)), a + 4, colon);
	else
		n = snprintf(uri, size, "nbd://%s/", a + 4);
	if (n < 0 || (size_t)n >= size)
		return false;
	uri_append_name(uri, size, name);
	return strlen(uri) + 4 < size;
}

static json_t *
snapshot_json(size_t i)
{
	struct blockmirror_snapshot_info si;
	char uri[PATH_MAX + 4200];
	json_t *j;

	if (blockmirror_snapshot_query(S.snaps[i].snap, &si) < 0)
		return json_pack("{s:s, s:s}", "export", S.snaps[i].export_name,
				 "state", "unknown");
	j = json_pack("{s:s, s:s?, s:s, s:I, s:I, s:f, s:I, s:I, s:I}",
		      "export", S.snaps[i].export_name,
		      "uri", export_uri(S.snaps[i].export_name, uri,
					sizeof uri) ? uri : NULL,
		      "state", snapshot_state_name(si.state),
		      "size", (json_int_t)si.size,
		      "granularity", (json_int_t)si.granularity,
		      "instant", (double)si.taken_unix_ns / 1e9,
		      "bytes_saved", (json_int_t)si.bytes_saved,
		      "cbw_count", (json_int_t)si.cbw_count,
		      "cbw_max_us", (json_int_t)si.cbw_max_us);
	if (j && si.state == BLOCKMIRROR_SNAPSHOT_BROKEN) {
		json_object_set_new(j, "error", json_integer(si.error));
		json_object_set_new(j, "reason", json_string(si.reason));
	}
	if (j && S.snaps[i].checkpoint)
		json_object_set_new(j, "checkpoint",
				    json_string(S.snaps[i].checkpoint));
	if (j && S.snaps[i].group) {
		json_object_set_new(j, "group", json_string(S.snaps[i].group));
		json_object_set_new(j, "held_us", json_integer(
			(json_int_t)S.snaps[i].held_us));
		json_object_set_new(j, "queued_us", json_integer(
			(json_int_t)S.snaps[i].queued_us));
	}
	if (j && S.snaps[i].since) {
		json_object_set_new(j, "since", json_string(S.snaps[i].since));
		json_object_set_new(j, "changed_bytes", json_integer(
			(json_int_t)S.snaps[i].changed_bytes));
	}
	return j;
}

static json_t *
snapshots_json(void)
{
	json_t *a = json_array();

	for (size_t i = 0; a && i < S.n_snaps; i++)
		json_array_append_new(a, snapshot_json(i));
	return a;
}

static json_t *backup_json(void);
static json_t *group_json(void);

/* Where the change record is: {record: "image"|"sidecar", path, crashed}
 * (and "sidecar": path for a sidecar, as before). */
static json_t *
track_json(void)
{
	json_t *t = json_pack("{s:s, s:s, s:b}", "record",
			      S.track_in_image ? "image" : "sidecar", "path",
			      S.track_sidecar, "crashed", S.track_crashed);

	if (t && !S.track_in_image)
		json_object_set_new(t, "sidecar",
				    json_string(S.track_sidecar));
	return t;
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

	if (r)
		json_object_set_new(json_object_get(r, "return"),
				    "snapshots", snapshots_json());
	if (r && S.grp.active)
		json_object_set_new(json_object_get(r, "return"), "group",
				    group_json());
	if (r && S.bk.running)
		json_object_set_new(json_object_get(r, "return"), "backup",
				    backup_json());
	if (r && S.track_sidecar)
		json_object_set_new(json_object_get(r, "return"), "tracking",
				    track_json());
	if (r) {
		json_t *repl = serve_repl_status();

		if (repl)
			json_object_set_new(json_object_get(r, "return"),
					    "replication", repl);
	}

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

/* The destination a move asked for, checked (control_check_destination)
 * into dest, the name to open. */
static int
check_destination(const char *to, bool create, char *dest, size_t destlen,
		  char *why, size_t whylen)
{
	const struct control_allow allow = {
		.dirs = S.allow_dirs, .n_dirs = S.n_allow,
		.nbd = S.allow_nbd, .n_nbd = S.n_allow_nbd,
	};

	return control_check_destination(to, blockmirror_nbd_is_uri(to),
					 create, &allow, dest, destlen, why,
					 whylen);
}

static json_t *
ctl_move(json_t *req, int ci)
{
	struct blockmirror_job_options o = { .size = sizeof o };
	const char *to = json_string_value(json_object_get(req, "to"));
	char why[PATH_MAX + 128], dest[PATH_MAX];
	int bad;
	const char *fmt = json_string_value(json_object_get(req, "format"));
	const char *mode = json_string_value(json_object_get(req, "mode"));
	json_t *pivot = json_object_get(req, "pivot");
	json_t *create = json_object_get(req, "create");

	if (!to)
		return error_reply(-EINVAL, "move needs \"to\"");
	bad = check_destination(to, json_is_true(create), dest, sizeof dest,
				why, sizeof why);
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
	/* A confined path was resolved and checked: no link may appear in
	 * it between that check and the open. */
	if (S.n_allow && !blockmirror_nbd_is_uri(dest))
		o.flags |= BLOCKMIRROR_JOB_NOFOLLOW;
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
	/* Generation 0 is a recovered move's (start_recovered_move). */
	o.event_data = (void *)(uintptr_t)++S.job_gen;
	S.job_ended = false;
	S.job_pivot = !json_is_false(pivot);
	S.job_client = ci;
	S.job_start = now_s();
	snprintf(S.job_mode, sizeof S.job_mode, "%s", mode ? mode : "active");
	S.job = blockmirror_job_start(S.disk, dest, &o);
	if (!S.job)
		return lib_error_reply(-errno);
	return json_pack("{s:{s:s}}", "return", "state", "started");
}

#define NOT_TRACKING "the disk does not track changes: start bmirror " \
		     "serve with --track"

/* Slot i's notes go (not the snapshot or its name). */
static void
snapshot_forget(size_t i)
{
	free(S.snaps[i].since);
	free(S.snaps[i].checkpoint);
	free(S.snaps[i].group);
	S.snaps[i].since = S.snaps[i].checkpoint = S.snaps[i].group = NULL;
	S.snaps[i].changed_bytes = 0;
	S.snaps[i].held_us = S.snaps[i].queued_us = 0;
	S.snaps[i].broken_told = false;
}

/* Keep what a snapshot taken `since` was asked for, in slot i. */
static int
snapshot_note(size_t i, struct blockmirror_snapshot *snap, const char *since,
	      const char *checkpoint)
{
	uint64_t gran, nbits, *words = NULL;
	int r;

	if (since) {
		r = blockmirror_snapshot_changed(snap, &gran, &words, &nbits,
						 &S.snaps[i].changed_bytes);
		free(words);
		if (r < 0)
			return r;
	}
	if ((since && !(S.snaps[i].since = strdup(since))) ||
	    (checkpoint && !(S.snaps[i].checkpoint = strdup(checkpoint)))) {
		snapshot_forget(i);
		return -ENOMEM;
	}
	return 0;
}

/*
 * Check a snapshot's members into sr (a scratch the client names is a
 * destination like a move's: inside --allow-dir or --allow-nbd when the
 * server is confined, and so is a scratch_dir) and choose its export
 * name.  NULL, or the error to answer (sr then holds nothing).
 */
static void wake(void);

/* A snapshot broke (on the disk's loop thread): this thread tells the
 * clients (snapshots_tell_broken), woken through event_fd. */
static void
snapshot_broke(void *user_data, const struct blockmirror_event *ev)
{
	atomic_store(&S.snaps_broke, true);
	wake();
}

/* Every control client hears once of each exported snapshot that broke:
 * its export stays (reads fail, naming why) until released. */
static void
snapshots_tell_broken(void)
{
	/* Most wake-ups are for other events: look only after a break. */
	if (!atomic_exchange(&S.snaps_broke, false))
		return;
	for (size_t i = 0; i < S.n_snaps; i++) {
		struct blockmirror_snapshot_info si;
		json_t *ev;

		if (S.snaps[i].broken_told ||
		    blockmirror_snapshot_query(S.snaps[i].snap, &si) < 0 ||
		    si.state != BLOCKMIRROR_SNAPSHOT_BROKEN)
			continue;
		S.snaps[i].broken_told = true;
		ev = json_pack("{s:s, s:s, s:i, s:s}", "event",
			       "SNAPSHOT_BROKEN", "export",
			       S.snaps[i].export_name, "errno", si.error,
			       "reason", si.reason);
		for (int ci = 0; ci < MAX_CLIENTS; ci++)
			if (S.clients[ci].fd >= 0)
				client_send(ci, json_incref(ev));
		json_decref(ev);
	}
}

static json_t *
snapshot_prepare(const struct control_request *cr, struct snap_request *sr)
{
	const struct control_allow allow = {
		.dirs = S.allow_dirs, .n_dirs = S.n_allow,
		.nbd = S.allow_nbd, .n_nbd = S.n_allow_nbd,
	};
	struct blockmirror_snapshot_options *o = &sr->o;
	char why[PATH_MAX + 128], name[32];
	int r;

	memset(sr, 0, sizeof *sr);
	o->size = sizeof *o;
	if (S.n_snaps == MAX_SNAPSHOTS)
		return error_reply(-EMFILE, "too many snapshots");
	if ((cr->since || cr->checkpoint) && !S.track_sidecar)
		return error_reply(-EINVAL, NOT_TRACKING);
	o->since = cr->since;
	o->checkpoint = cr->checkpoint;
	if (cr->scratch) {
		r = check_destination(cr->scratch, cr->create, sr->scratch,
				      sizeof sr->scratch, why, sizeof why);
		if (r < 0)
			return error_reply(r, why);
		o->scratch = sr->scratch;
		if (cr->create)
			o->flags |= BLOCKMIRROR_SNAPSHOT_CREATE;
		/* As a move's destination: no link may appear in the
		 * checked name before the open. */
		if (S.n_allow && !blockmirror_nbd_is_uri(sr->scratch))
			o->flags |= BLOCKMIRROR_SNAPSHOT_NOFOLLOW;
	}
	if (cr->scratch_dir) {
		r = control_check_dir(cr->scratch_dir, &allow, sr->dir,
				      sizeof sr->dir, why, sizeof why);
		if (r < 0)
			return error_reply(r, why);
		o->scratch_dir = sr->dir;
	}
	if (cr->format) {
		int f = blockmirror_format_from_name(cr->format);

		if (f < 0)
			return lib_error_reply(f);
		o->scratch_format = (enum blockmirror_format)f;
	}
	o->granularity = cr->granularity;
	o->timeout_ms = (uint32_t)cr->timeout_ms;
	o->max_scratch = cr->max_scratch;
	o->on_event = snapshot_broke;
	if (!cr->export_name)
		snprintf(name, sizeof name, "snap-%u", ++S.snap_counter);
	sr->export_name = strdup(cr->export_name ? cr->export_name : name);
	if (!sr->export_name)
		return error_reply(-ENOMEM, NULL);
	for (size_t k = 0; k < S.n_snaps; k++) {
		if (strcmp(S.snaps[k].export_name, sr->export_name) == 0) {
			snprintf(why, sizeof why, "%s: a snapshot is exported "
				 "under that name", sr->export_name);
			free(sr->export_name);
			sr->export_name = NULL;
			return error_reply(-EEXIST, why);
		}
	}
	return NULL;
}

/*
 * The snapshot `snap`, taken as sr asked, goes into a slot and is
 * exported under sr->export_name (consumed, with snap).  The slot's
 * index, or -1 with *err the answer: the snapshot is released, and the
 * checkpoint it created removed (no backup was started from it: its
 * record merges into the one before).
 */
static int
snapshot_install(struct snap_request *sr, struct blockmirror_snapshot *snap,
		 json_t **err)
{
	size_t i = S.n_snaps;
	int r = snapshot_note(i, snap, sr->o.since, sr->o.checkpoint);

	if (r == 0)
		r = blockmirror_server_export_snapshot(S.server,
						       sr->export_name, snap);
	if (r < 0) {
		*err = lib_error_reply(r);
		snapshot_forget(i);
		blockmirror_snapshot_release(snap);
		if (sr->o.checkpoint)
			blockmirror_checkpoint_remove(S.disk, sr->o.checkpoint);
		free(sr->export_name);
		sr->export_name = NULL;
		return -1;
	}
	S.snaps[i].export_name = sr->export_name;
	S.snaps[i].snap = snap;
	sr->export_name = NULL;
	S.n_snaps++;
	/* It may have broken before it got here, its wake-up gone. */
	atomic_store(&S.snaps_broke, true);
	snapshots_tell_broken();
	return (int)i;
}

static json_t *group_busy(void);

/* "snapshot": take a snapshot of the disk and export it read-only under
 * "export" (default snap-N). */
static json_t *
ctl_snapshot(const struct control_request *cr)
{
	struct snap_request sr;
	struct blockmirror_snapshot *snap = NULL;
	struct blockmirror_disk *disk = S.disk;
	json_t *ret;
	int r, i;

	if (S.grp.active)
		return group_busy();
	ret = snapshot_prepare(cr, &sr);
	if (ret)
		return ret;
	r = blockmirror_snapshot_take(&disk, 1, &sr.o, &snap);
	if (r < 0) {
		free(sr.export_name);
		return lib_error_reply(r);
	}
	i = snapshot_install(&sr, snap, &ret);
	if (i < 0)
		return ret;
	ret = snapshot_json((size_t)i);
	return json_pack("{s:o}", "return", ret ? ret : json_null());
}

/* The slot of the snapshot exported as `name`, or -1. */
static int
snapshot_find(const char *name)
{
	for (size_t i = 0; i < S.n_snaps; i++)
		if (strcmp(S.snaps[i].export_name, name) == 0)
			return (int)i;
	return -1;
}

/* Unexport slot i (its clients are closed), then release it. */
static int
snapshot_drop(size_t i)
{
	int r = blockmirror_server_unexport(S.server, S.snaps[i].export_name);

	if (r < 0)
		return r;
	blockmirror_snapshot_release(S.snaps[i].snap);
	free(S.snaps[i].export_name);
	snapshot_forget(i);
	S.snaps[i] = S.snaps[--S.n_snaps];
	memset(&S.snaps[S.n_snaps], 0, sizeof S.snaps[S.n_snaps]);
	return 0;
}

/* "snapshot-release": unexport (its clients are closed), then release. */
static json_t *
ctl_snapshot_release(const struct control_request *cr)
{
	char why[4200];
	int i, r;

	if (!cr->export_name)
		return error_reply(-EINVAL, "snapshot-release needs "
				   "\"export\"");
	i = snapshot_find(cr->export_name);
	if (i < 0) {
		snprintf(why, sizeof why, "%s: no such snapshot export",
			 cr->export_name);
		return error_reply(-ENOENT, why);
	}
	r = snapshot_drop((size_t)i);
	if (r < 0)
		return lib_error_reply(r);
	return json_pack("{s:{s:s}}", "return", "export", cr->export_name);
}

/* At the end, once the server no longer serves them. */
static void
release_snapshots(void)
{
	while (S.n_snaps) {
		S.n_snaps--;
		blockmirror_snapshot_release(S.snaps[S.n_snaps].snap);
		free(S.snaps[S.n_snaps].export_name);
		snapshot_forget(S.n_snaps);
	}
}

/* ---- consistency groups (docs/control.md) ----------------------------- */

/*
 * A group's snapshot across several servers, driven by one client
 * (bmirror snapshot --control A --control B): "snapshot-hold" stops and
 * drains the disk under a lease (blockmirror_snapshot_hold: the lease
 * runs on the disk's loop, so the guest goes on when it runs out even if
 * this thread is busy), "snapshot-take" takes and exports the snapshot
 * at the held instant and lets the guest go on, "snapshot-commit" makes
 * it stay.  "snapshot-abort", or the holder's connection closing before
 * the commit, ends the hold or releases the snapshot taken, so a group
 * that fails anywhere leaves nothing here (a snapshot that cannot be
 * unexported stays, and the abort says so).  A hold whose lease ran out
 * ends the group before the next command (group_expire): the guest went
 * on, so nothing waits for the holder, whose take or commit is then told
 * of the lease.
 *
 * snapshot-hold runs on a thread of its own (hold_main: the scratch is
 * made, then the disk drains, for at most lease_ms), so this thread goes
 * on answering the others; the holder's answer is sent when it is done
 * (group_hold_deliver, woken through event_fd), and its next commands
 * are read only after that, so its answers stay in order.
 */

static json_t *
group_busy(void)
{
	char why[160];

	snprintf(why, sizeof why, "group %s holds this disk's snapshots; try "
		 "again when it ends", S.grp.name);
	return error_reply(-EBUSY, why);
}

static void
snap_request_free(struct snap_request *sr)
{
	if (!sr)
		return;
	free(sr->export_name);
	free(sr->since);
	free(sr->checkpoint);
	free(sr);
}

static void
group_clear(void)
{
	snap_request_free(S.grp.req);
	free(S.grp.pending);
	memset(&S.grp, 0, sizeof S.grp);
	S.grp.client = -1;
}

/* What the hold says of the guest's wait, into obj (NULL: nothing). */
static void
group_hold_times(json_t *obj, uint64_t *held_us, uint64_t *queued_us)
{
	struct blockmirror_snapshot_hold_info hi = { .size = sizeof hi };

	if (blockmirror_snapshot_hold_query(S.grp.hold, &hi) < 0)
		return;
	if (held_us)
		*held_us = hi.held_us;
	if (queued_us)
		*queued_us = hi.queued_us;
	if (!obj)
		return;
	json_object_set_new(obj, "held", json_boolean(hi.held));
	json_object_set_new(obj, "expired", json_boolean(hi.expired));
	json_object_set_new(obj, "held_us", json_integer((json_int_t)hi.held_us));
	json_object_set_new(obj, "queued_us",
			    json_integer((json_int_t)hi.queued_us));
}

/* The group's part here ends with nothing left: the disk is let go, or
 * the snapshot taken is released (and the checkpoint it created goes).
 * What happened goes into obj (NULL: nowhere).  If the snapshot cannot
 * be released, the group stays as it is (its snapshot pending, its
 * checkpoint kept) and the error is returned: nothing claims it gone. */
static int
group_abort(json_t *obj)
{
	if (S.grp.hold) {
		group_hold_times(obj, NULL, NULL);
		blockmirror_snapshot_hold_free(S.grp.hold);
		S.grp.hold = NULL;
	}
	if (S.grp.pending) {
		int i = snapshot_find(S.grp.pending);
		int r = i >= 0 ? snapshot_drop((size_t)i) : 0;

		if (r < 0)
			return r;
		if (i >= 0 && S.grp.req->checkpoint)
			blockmirror_checkpoint_remove(S.disk,
						      S.grp.req->checkpoint);
		if (obj)
			json_object_set_new(obj, "released",
					    json_string(S.grp.pending));
	}
	group_clear();
	return 0;
}

/* The holder's connection closes before the commit: its group failed. */
static void
group_client_gone(int ci)
{
	if (!S.grp.active || S.grp.client != ci ||
	    S.clients[ci].gen != S.grp.gen || S.grp.holding)
		return; /* holding: group_hold_deliver sees it gone */
	fprintf(stderr, "bmirror serve: %s: the client of group %s went "
		"away before the commit; %s\n", S.control_path, S.grp.name,
		S.grp.hold ? "the disk goes on, no snapshot taken"
			   : "its snapshot is released");
	if (group_abort(NULL) < 0) {
		/* Nobody may abort it now: it stays as a plain snapshot,
		 * listed with its group, released with snapshot-release. */
		fprintf(stderr, "bmirror serve: %s: %s: could not release "
			"it (%s); it stays exported\n", S.control_path,
			S.grp.pending, blockmirror_last_error());
		group_clear();
	}
}

/* A hold whose lease ran out ends the group here: the guest went on by
 * itself, so nothing is left to keep, and `snapshot` or another group
 * need not wait for the holder to come back.  Checked before each
 * command. */
static void
group_expire(void)
{
	struct blockmirror_snapshot_hold_info hi = { .size = sizeof hi };

	if (!S.grp.active || !S.grp.hold ||
	    blockmirror_snapshot_hold_query(S.grp.hold, &hi) < 0 ||
	    !hi.expired)
		return;
	fprintf(stderr, "bmirror serve: %s: the hold of group %s ran out of "
		"its lease (%u ms); the group ends here\n",
		S.control_path, S.grp.name, (unsigned)S.grp.lease_ms);
	memcpy(S.grp_expired.name, S.grp.name, sizeof S.grp_expired.name);
	S.grp_expired.client = S.grp.client;
	S.grp_expired.gen = S.grp.gen;
	S.grp_expired.lease_ms = S.grp.lease_ms;
	group_abort(NULL);
}

/* A take, commit or abort for the group that group_expire ended, from
 * its holder: the error that says so, or NULL. */
static json_t *
group_expired_reply(const char *cmd, const char *group, int ci)
{
	char why[200];

	if (strcmp(S.grp_expired.name, group) != 0 ||
	    S.grp_expired.client != ci ||
	    S.clients[ci].gen != S.grp_expired.gen)
		return NULL;
	if (strcmp(cmd, "snapshot-abort") == 0)
		return json_pack("{s:{s:s, s:b, s:b}}", "return", "group",
				 group, "held", 0, "expired", 1);
	snprintf(why, sizeof why, "group %s: the hold's lease of %u"
		 " ms ran out before the %s; the guest went on, no snapshot "
		 "taken", group, (unsigned)S.grp_expired.lease_ms, cmd + 9);
	return error_reply(-ETIMEDOUT, why);
}

/* The hold's thread: the scratch is made and the disk drains there, for
 * at most the lease, while the control thread goes on. */
static void *
hold_main(void *arg)
{
	struct blockmirror_snapshot_hold *h = NULL;
	int r = blockmirror_snapshot_hold(S.disk, &S.grp.req->o,
					  S.grp.lease_ms, &h);

	S.grp.hold_new = h;
	S.grp.hold_r = r;
	if (r < 0)
		snprintf(S.grp.hold_err, sizeof S.grp.hold_err, "%s",
			 lib_error_message() ? lib_error_message()
					     : strerror(-r));
	atomic_store(&S.grp.hold_done, true);
	wake();
	return NULL;
}

static json_t *
group_hold(const struct control_request *cr, int ci)
{
	struct snap_request *sr;
	json_t *ret;
	int r;

	if (S.grp.active)
		return group_busy();
	sr = malloc(sizeof *sr);
	if (!sr)
		return error_reply(-ENOMEM, NULL);
	ret = snapshot_prepare(cr, sr);
	if (ret) {
		free(sr);
		return ret;
	}
	if ((cr->since && !(sr->since = strdup(cr->since))) ||
	    (cr->checkpoint && !(sr->checkpoint = strdup(cr->checkpoint)))) {
		snap_request_free(sr);
		return error_reply(-ENOMEM, NULL);
	}
	sr->o.since = sr->since;
	sr->o.checkpoint = sr->checkpoint;
	S.grp.lease_ms = cr->lease_ms ? (uint32_t)cr->lease_ms
				      : DEFAULT_LEASE_MS;
	S.grp.active = true;
	snprintf(S.grp.name, sizeof S.grp.name, "%s", cr->group);
	S.grp.client = ci;
	S.grp.gen = S.clients[ci].gen;
	S.grp.req = sr;
	atomic_store(&S.grp.hold_done, false);
	r = pthread_create(&S.grp.hold_thread, NULL, hold_main, NULL);
	if (r) {
		group_clear();
		return error_reply(-r, "cannot start the hold's thread");
	}
	S.grp.holding = true;
	return NULL; /* the answer comes when the disk is held */
}

/* On this thread, woken by event_fd: the hold's answer, once it is
 * done.  A holder gone meanwhile lets the disk go at once. */
static void
group_hold_deliver(void)
{
	int ci = S.grp.client;
	json_t *ret;

	if (!S.grp.holding || !atomic_load(&S.grp.hold_done))
		return;
	pthread_join(S.grp.hold_thread, NULL);
	S.grp.holding = false;
	if (S.clients[ci].fd < 0 || S.clients[ci].gen != S.grp.gen)
		ci = -1;
	if (S.grp.hold_r < 0) {
		ret = error_reply(S.grp.hold_r, S.grp.hold_err);
		group_clear();
		client_send(ci, ret);
		return;
	}
	S.grp.hold = S.grp.hold_new;
	if (ci < 0) {
		fprintf(stderr, "bmirror serve: %s: the client of group %s "
			"went away before its hold was answered; the disk "
			"goes on, no snapshot taken\n", S.control_path,
			S.grp.name);
		group_abort(NULL);
		return;
	}
	ret = json_pack("{s:s, s:s, s:i}", "group", S.grp.name, "export",
			S.grp.req->export_name, "lease_ms",
			(int)S.grp.lease_ms);
	if (ret)
		group_hold_times(ret, NULL, NULL);
	client_send(ci, json_pack("{s:o}", "return", ret ? ret : json_null()));
}

/* At quit: a hold still running is waited for (the lease bounds it). */
static void
group_hold_stop(void)
{
	if (!S.grp.holding)
		return;
	pthread_join(S.grp.hold_thread, NULL);
	S.grp.holding = false;
	if (S.grp.hold_r < 0)
		group_clear();
	else
		S.grp.hold = S.grp.hold_new;
}

static json_t *
group_take(void)
{
	struct blockmirror_snapshot *snap;
	uint64_t held_us = 0, queued_us = 0;
	json_t *ret;
	int r, i;

	if (!S.grp.hold)
		return error_reply(-EINVAL, "the group's snapshot is taken "
				   "already");
	r = blockmirror_snapshot_hold_take(S.grp.hold, &snap);
	if (r < 0) {
		ret = lib_error_reply(r);
		group_abort(NULL);
		return ret;
	}
	group_hold_times(NULL, &held_us, &queued_us);
	blockmirror_snapshot_hold_free(S.grp.hold);
	S.grp.hold = NULL;
	i = snapshot_install(S.grp.req, snap, &ret);
	if (i < 0) {
		group_clear();
		return ret;
	}
	S.snaps[i].group = strdup(S.grp.name);
	S.snaps[i].held_us = held_us;
	S.snaps[i].queued_us = queued_us;
	S.grp.pending = strdup(S.snaps[i].export_name);
	if (!S.snaps[i].group || !S.grp.pending) {
		group_abort(NULL);
		return error_reply(-ENOMEM, NULL);
	}
	ret = snapshot_json((size_t)i);
	return json_pack("{s:o}", "return", ret ? ret : json_null());
}

/* "snapshot-hold", "snapshot-take", "snapshot-commit", "snapshot-abort",
 * each with "group": the group's name. */
static json_t *
ctl_group(const char *cmd, const struct control_request *cr, int ci)
{
	char why[200];
	json_t *ret;
	int i, r;

	if (!cr->group)
		return error_reply(-EINVAL, "the snapshot-hold, -take, -commit "
				   "and -abort commands need \"group\"");
	if (strcmp(cmd, "snapshot-hold") == 0)
		return group_hold(cr, ci);
	if ((!S.grp.active || strcmp(S.grp.name, cr->group) != 0) &&
	    (ret = group_expired_reply(cmd, cr->group, ci)))
		return ret;
	if (!S.grp.active || strcmp(S.grp.name, cr->group) != 0) {
		snprintf(why, sizeof why, "group %s: not held here",
			 cr->group);
		return error_reply(-ENOENT, why);
	}
	if (S.grp.client != ci || S.clients[ci].gen != S.grp.gen) {
		snprintf(why, sizeof why, "group %s is another control "
			 "client's", cr->group);
		return error_reply(-EPERM, why);
	}
	if (strcmp(cmd, "snapshot-take") == 0)
		return group_take();
	if (strcmp(cmd, "snapshot-abort") == 0) {
		ret = json_pack("{s:s}", "group", S.grp.name);
		r = group_abort(ret);
		if (r < 0) {
			json_decref(ret);
			return lib_error_reply(r);
		}
		return json_pack("{s:o}", "return", ret ? ret : json_null());
	}
	if (S.grp.hold)
		return error_reply(-EINVAL, "the group's snapshot is not taken "
				   "yet");
	i = snapshot_find(S.grp.pending);
	if (i < 0) {
		snprintf(why, sizeof why, "group %s: its snapshot was released "
			 "before the commit", cr->group);
		group_clear();
		return error_reply(-ENOENT, why);
	}
	group_clear();
	ret = snapshot_json((size_t)i);
	return json_pack("{s:o}", "return", ret ? ret : json_null());
}

/* What query says of a group under way here. */
static json_t *
group_json(void)
{
	json_t *j = json_pack("{s:s, s:s, s:i}", "name", S.grp.name,
			      "state", S.grp.holding ? "holding"
				       : S.grp.hold ? "held" : "taken",
			      "lease_ms", (int)S.grp.lease_ms);

	if (j && S.grp.hold)
		group_hold_times(j, NULL, NULL);
	if (j && S.grp.pending)
		json_object_set_new(j, "export", json_string(S.grp.pending));
	return j;
}

/* ---- checkpoints (docs/cbt.md) ------------------------------------- */

static json_t *
checkpoint_json(const struct blockmirror_checkpoint *cp)
{
	json_t *j = json_pack("{s:s, s:I, s:I, s:I, s:b}", "name", cp->name,
			      "id", (json_int_t)cp->id,
			      "created", (json_int_t)cp->created,
			      "changed_bytes", (json_int_t)cp->changed_bytes,
			      "trusted", cp->trusted);

	if (j && !cp->trusted)
		json_object_set_new(j, "reason", json_string(cp->reason));
	return j;
}

/* "checkpoints": the list, oldest first; "checkpoint-create" and
 * "checkpoint-remove": by "name".  Blocking: the disk is quiesced for a
 * moment, the control socket waits, NBD clients' requests too. */
static json_t *
ctl_checkpoint(const char *cmd, const struct control_request *cr)
{
	struct blockmirror_checkpoint *l = NULL;
	json_t *a = NULL;
	size_t n = 0;
	int r;

	if (!S.track_sidecar)
		return error_reply(-EINVAL, NOT_TRACKING);
	if (strcmp(cmd, "checkpoints") != 0) {
		if (!cr->name)
			return error_reply(-EINVAL, "checkpoint-create and "
					   "checkpoint-remove need \"name\"");
		r = strcmp(cmd, "checkpoint-create") == 0 ?
		    blockmirror_checkpoint_create(S.disk, cr->name) :
		    blockmirror_checkpoint_remove(S.disk, cr->name);
		if (r < 0)
			return lib_error_reply(r);
	}
	r = blockmirror_checkpoint_list(S.disk, &l, &n);
	if (r < 0)
		return lib_error_reply(r);
	a = json_array();
	for (size_t i = 0; a && i < n; i++)
		json_array_append_new(a, checkpoint_json(&l[i]));
	free(l);
	return json_pack("{s:{s:o, s:o}}", "return", "checkpoints",
			 a ? a : json_null(), "tracking", track_json());
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
ctl_move_base(json_t *req, int ci)
{
	const char *to = json_string_value(json_object_get(req, "to"));
	bool create = json_is_true(json_object_get(req, "create"));
	char why[PATH_MAX + 128], dest[PATH_MAX], *img;
	struct blockmirror_image_info ii = { .size = sizeof ii };
	struct blockmirror_copy_options co = { .size = sizeof co };
	struct blockmirror_verify_result vr = { .size = sizeof vr };
	double t0 = now_s();
	json_t *ev;
	int r;

	if (!to)
		return error_reply(-EINVAL, "move needs \"to\"");
	r = check_destination(to, create, dest, sizeof dest, why, sizeof why);
	if (r < 0)
		return error_reply(r, why);
	to = dest;
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
	if (create) {
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
	client_send(ci, ev);
	return json_pack("{s:{s:s}}", "return", "state", "completed");
}

/* ---- backups (docs/backup.md) --------------------------------------- */

/* Wake this thread (from another): it delivers what was queued for it,
 * and tells of snapshots that broke. */
static void
wake(void)
{
	uint64_t one = 1;

	if (write(S.event_fd, &one, sizeof one) < 0) {
		/* EAGAIN: the counter is non-zero, this thread wakes anyway */
	}
}

/* The backup's callbacks, on its thread.  Every event is queued for
 * the client; a progress event replaces one not yet sent, so that a slow
 * client gets the steps in order without a flood. */
static void
bk_event(void *user_data, const struct blockmirror_backup_event *ev)
{
	json_t *j = backup_event_json(ev);
	size_t n;

	pthread_mutex_lock(&S.bk.lock);
	if (ev->type == BLOCKMIRROR_BACKUP_PROGRESS) {
		S.bk.done = ev->done;
		S.bk.total = ev->total;
	}
	if (ev->type == BLOCKMIRROR_BACKUP_SNAPSHOT_TAKEN)
		S.bk.taken = true;
	n = json_array_size(S.bk.events);
	if (j && n && ev->type == BLOCKMIRROR_BACKUP_PROGRESS &&
	    !strcmp(json_string_value(json_object_get(json_array_get(
			S.bk.events, n - 1), "event")), "BACKUP_PROGRESS"))
		json_array_set_new(S.bk.events, n - 1, j);
	else if (j)
		json_array_append_new(S.bk.events, j);
	pthread_mutex_unlock(&S.bk.lock);
	wake();
}

/* The client ran its freeze hook before asking ("frozen") and it held:
 * the point is application-consistent. */
static int
bk_freeze(void *user_data)
{
	return 0;
}

static bool
bk_cancelled(void *user_data)
{
	return atomic_load(&S.bk.cancel);
}

static void *
backup_main(void *arg)
{
	struct blockmirror_backup_options o = { .size = sizeof o };
	struct blockmirror_backup_point pt;
	int r;

	o.dir = S.bk.dir;
	o.target = S.bk.target[0] ? S.bk.target : NULL;
	o.incremental = S.bk.incremental;
	/* The client froze before asking: the freeze is said to have held
	 * only when it did, and a point without one has no freeze step. */
	o.freeze = S.bk.frozen ? bk_freeze : NULL;
	o.cancelled = bk_cancelled;
	/* SNAPSHOT_TAKEN, right after the instant, lets the client thaw. */
	o.on_event = bk_event;
	r = blockmirror_backup(S.disk, &o, &pt);
	pthread_mutex_lock(&S.bk.lock);
	S.bk.r = r;
	if (r < 0)
		snprintf(S.bk.err, sizeof S.bk.err, "%s",
			 blockmirror_last_error() ? blockmirror_last_error()
						  : strerror(-r));
	S.bk.pt = pt;
	S.bk.finished = true;
	pthread_mutex_unlock(&S.bk.lock);
	wake();
	return NULL;
}

/* The client that asked, if its connection is still the one in the
 * slot; else -1 (nobody: what is sent is dropped). */
static int
backup_client(void)
{
	int ci = S.bk.client;

	return ci >= 0 && S.clients[ci].fd >= 0 &&
	       S.clients[ci].gen == S.bk.gen ? ci : -1;
}

/* On this thread, woken by event_fd: pass the backup's news on, and its
 * answer once it has ended. */
static void
backup_deliver(void)
{
	bool finished;
	json_t *events, *ev;
	size_t i;
	int ci = backup_client();

	if (!S.bk.running)
		return;
	pthread_mutex_lock(&S.bk.lock);
	events = S.bk.events;
	S.bk.events = json_array();
	finished = S.bk.finished;
	pthread_mutex_unlock(&S.bk.lock);
	json_array_foreach(events, i, ev)
		client_send(ci, json_incref(ev));
	json_decref(events);
	if (!finished)
		return;
	pthread_join(S.bk.thread, NULL);
	S.bk.running = false;
	json_decref(S.bk.events); /* its thread has ended: nothing comes */
	S.bk.events = NULL;
	if (S.bk.r < 0) {
		client_send(ci, error_reply(S.bk.r, S.bk.err));
		return;
	}
	client_send(ci, json_pack("{s:{s:i, s:s, s:b, s:b, s:I, s:I, s:I, s:I, "
				  "s:s, s:s, s:f}}", "return",
		"point", (int)S.bk.pt.number, "file", S.bk.pt.file,
		"incremental", S.bk.pt.incremental, "healed", S.bk.pt.healed,
		"instant", (json_int_t)S.bk.pt.instant,
		"bytes_changed", (json_int_t)S.bk.pt.bytes_changed,
		"bytes_read", (json_int_t)S.bk.pt.bytes_read,
		"bytes_written", (json_int_t)S.bk.pt.bytes_written,
		"checkpoint", S.bk.pt.checkpoint,
		"consistency", S.bk.pt.application_consistent ?
			       "application" : "crash",
		"elapsed_s", now_s() - S.bk.t0));
}

/* Quit: a running backup stops at its next read and leaves no point. */
static void
backup_stop(void)
{
	if (!S.bk.running)
		return;
	atomic_store(&S.bk.cancel, true);
	pthread_join(S.bk.thread, NULL);
	S.bk.running = false;
	json_decref(S.bk.events);
	S.bk.events = NULL;
}

/* What query says of a running backup. */
static json_t *
backup_json(void)
{
	json_t *j;

	pthread_mutex_lock(&S.bk.lock);
	j = json_pack("{s:s, s:s?, s:b, s:b, s:I, s:I}", "dir", S.bk.dir,
		      "target", S.bk.target[0] ? S.bk.target : NULL,
		      "incremental", S.bk.incremental, "taken", S.bk.taken,
		      "bytes_done", (json_int_t)S.bk.done,
		      "bytes_total", (json_int_t)S.bk.total);
	pthread_mutex_unlock(&S.bk.lock);
	return j;
}

/* The backup directory: absolute, existing, and inside an allowed
 * directory when the server is confined (like a snapshot's scratch). */
static int
backup_dir(json_t *req, char *dir, size_t len, char *why, size_t whylen)
{
	const struct control_allow allow = {
		.dirs = S.allow_dirs, .n_dirs = S.n_allow,
		.nbd = S.allow_nbd, .n_nbd = S.n_allow_nbd,
	};
	const char *d = json_string_value(json_object_get(req, "dir"));

	if (!d || !*d) {
		snprintf(why, whylen, "backup needs \"dir\" (a string)");
		return -EINVAL;
	}
	return control_check_dir(d, &allow, dir, len, why, whylen);
}

/*
 * "backup": take a point of the served disk into "dir" ("incremental":
 * only what changed since the newest point there; with --track by the
 * change record, else by digests; "frozen": the client's freeze hook
 * held, so the point is application-consistent; "target": an NBD export
 * for the data, "dir" then the catalogue).  It runs on a thread of its
 * own: this one goes on answering.  The client gets every step as an
 * event (SNAPSHOT_TAKEN right after the instant: it may thaw), and the
 * answer when the backup ends.  One backup at a time.
 */
static json_t *
ctl_backup(json_t *req, int ci)
{
	json_t *v = json_object_get(req, "incremental");
	json_t *fz = json_object_get(req, "frozen");
	json_t *tg = json_object_get(req, "target");
	char dir[PATH_MAX], why[PATH_MAX + 128], target[PATH_MAX] = "";
	int r;

	if ((v && !json_is_boolean(v)) || (fz && !json_is_boolean(fz)))
		return error_reply(-EINVAL, "\"incremental\" and \"frozen\" "
				   "must be true or false");
	if (tg && (!json_is_string(tg) ||
		   !blockmirror_nbd_is_uri(json_string_value(tg))))
		return error_reply(-EINVAL, "\"target\" must be an NBD URI");
	if (S.bk.running)
		return error_reply(-EBUSY, "a backup is running");
	r = backup_dir(req, dir, sizeof dir, why, sizeof why);
	if (r == 0 && tg)
		r = check_destination(json_string_value(tg), false, target,
				      sizeof target, why, sizeof why);
	if (r < 0)
		return error_reply(r, why);
	snprintf(S.bk.dir, sizeof S.bk.dir, "%s", dir);
	snprintf(S.bk.target, sizeof S.bk.target, "%s", target);
	S.bk.incremental = json_is_true(v);
	S.bk.frozen = json_is_true(fz);
	S.bk.client = ci;
	S.bk.gen = S.clients[ci].gen;
	S.bk.t0 = now_s();
	atomic_store(&S.bk.cancel, false);
	S.bk.done = S.bk.total = 0;
	S.bk.taken = S.bk.finished = false;
	json_decref(S.bk.events);
	S.bk.events = json_array();
	r = pthread_create(&S.bk.thread, NULL, backup_main, NULL);
	if (r)
		return error_reply(-r, "cannot start the backup's thread");
	S.bk.running = true;
	return NULL; /* the answer comes when it ends */
}

/* Verify's steps, to the client that asked (queued: sent after). */
static void
verify_event(void *user_data, const struct blockmirror_backup_event *ev)
{
	client_send(*(int *)user_data, backup_event_json(ev));
}

/* "backup-verify": every point of "dir" against its digests, and the
 * served disk against the newest point where nothing changed since (all
 * of it, or a "sample" percent); each step an event. */
static json_t *
ctl_backup_verify(json_t *req, const struct control_request *cr, int ci)
{
	struct blockmirror_backup_verify_options o = {
		.size = sizeof o, .live = S.disk,
		.live_sample_percent = (unsigned)cr->sample,
		.on_event = verify_event, .event_data = &ci,
	};
	struct blockmirror_backup_check c;
	char dir[PATH_MAX], why[PATH_MAX + 128];
	int r = backup_dir(req, dir, sizeof dir, why, sizeof why);

	if (r < 0)
		return error_reply(r, why);
	r = blockmirror_backup_verify_opts(dir, &o, &c);
	if (r < 0)
		return lib_error_reply(r);
	return json_pack("{s:{s:i, s:I, s:I, s:I}}", "return",
			 "points", (int)c.points,
			 "bytes_read", (json_int_t)c.bytes_read,
			 "live_bytes_read", (json_int_t)c.live_bytes_read,
			 "live_mismatches", (json_int_t)c.live_mismatches);
}

static json_t *
handle(json_t *req, int ci)
{
	struct control_request cr;
	const char *cmd, *why;

	/* Members of the wrong type are refused before anything runs. */
	if (control_parse_request(req, &cr, &why) < 0)
		return error_reply(-EINVAL, why);
	cmd = cr.cmd;
	group_expire();
	if (strcmp(cmd, "query") == 0)
		return ctl_query();
	if (serve_repl_is_command(cmd))
		return serve_repl_command(cmd, req, S.disk, ci,
					  S.clients[ci].gen);
	if (strcmp(cmd, "move") == 0 &&
	    json_is_true(json_object_get(req, "base")))
		return ctl_move_base(req, ci);
	if (strcmp(cmd, "move") == 0)
		return ctl_move(req, ci);
	if (strcmp(cmd, "snapshot") == 0)
		return ctl_snapshot(&cr);
	if (strcmp(cmd, "snapshot-release") == 0)
		return ctl_snapshot_release(&cr);
	if (strcmp(cmd, "snapshot-hold") == 0 ||
	    strcmp(cmd, "snapshot-take") == 0 ||
	    strcmp(cmd, "snapshot-commit") == 0 ||
	    strcmp(cmd, "snapshot-abort") == 0)
		return ctl_group(cmd, &cr, ci);
	if (strcmp(cmd, "backup") == 0)
		return ctl_backup(req, ci);
	if (strcmp(cmd, "backup-verify") == 0)
		return ctl_backup_verify(req, &cr, ci);
	if (strcmp(cmd, "checkpoints") == 0 ||
	    strcmp(cmd, "checkpoint-create") == 0 ||
	    strcmp(cmd, "checkpoint-remove") == 0)
		return ctl_checkpoint(cmd, &cr);
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
	/* If the client is gone or drops out here, the move goes on. */
	client_send(S.job_client, json_incref(ev));
	if (name && strcmp(name, "READY") == 0 && S.job_pivot) {
		int r = blockmirror_job_complete(S.job);

		if (r < 0 && S.job_client >= 0) {
			json_t *e = json_pack("{s:s, s:i}", "event",
					      "PIVOT_FAILED", "errno", -r);

			if (e)
				json_object_set_new(e, "message", json_string(
					blockmirror_last_error()));
			client_send(S.job_client, e);
		}
	}
	json_decref(ev);
}

/* Replication's news: an event for every client (client -1), an answer
 * for the one that asked if its connection is still there. */
static void
repl_send(int client, unsigned gen, json_t *obj)
{
	if (client >= 0) {
		client_send(S.clients[client].fd >= 0 &&
			    S.clients[client].gen == gen ? client : -1, obj);
		return;
	}
	for (int ci = 0; ci < MAX_CLIENTS; ci++)
		if (S.clients[ci].fd >= 0)
			client_send(ci, json_incref(obj));
	json_decref(obj);
}

/* Forward the queued events of the current job, in order. */
static void
deliver_events(void)
{
	struct ev_node *list, *n;
	uint64_t count;

	if (read(S.event_fd, &count, sizeof count) < 0) {
		/* EAGAIN: a wake-up for events already taken */
	}
	backup_deliver();
	serve_repl_deliver(repl_send);
	group_hold_deliver();
	snapshots_tell_broken();
	list = take_events();
	while ((n = list)) {
		list = n->next;
		if (n->gen == S.job_gen && S.job) {
			json_t *ev = event_json(&n->ev);

			if (ev)
				forward_event(ev);
			else if (n->ev.type == BLOCKMIRROR_EVENT_COMPLETED ||
				 n->ev.type == BLOCKMIRROR_EVENT_CANCELLED ||
				 n->ev.type == BLOCKMIRROR_EVENT_FAILED)
				S.job_ended = true; /* told nobody, but over */
		}
		free_event(n);
	}
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
	    listen(fd, MAX_CLIENTS) < 0) {
		tool_error("%s: %s", path, strerror(errno));
		close(fd);
		return -1;
	}
	return fd;
}

static void
drop_client(struct client *c)
{
	group_client_gone((int)(c - S.clients));
	if (S.job_client == (int)(c - S.clients))
		S.job_client = -1;
	close(c->fd);
	c->fd = -1;
	c->rd.len = 0;
	c->eof = false;
	line_out_free(&c->out);
}

/*
 * Queue a line for client `ci` (-1 or a free slot: nobody, the line is
 * dropped) and send what its socket takes now.  A client that is gone, or
 * that has let more than OUT_MAX bytes pile up, is disconnected.  Steals
 * obj (NULL: nothing is sent).
 */
static void
client_send(int ci, json_t *obj)
{
	struct client *c = ci >= 0 ? &S.clients[ci] : NULL;

	if (!c || c->fd < 0 || !obj) {
		json_decref(obj);
		return;
	}
	if (line_out_add(&c->out, obj) < 0 ||
	    line_out_flush(&c->out, c->fd) < 0) {
		drop_client(c);
		return;
	}
	if (c->out.len > OUT_MAX) {
		fprintf(stderr, "bmirror serve: %s: disconnected a control "
			"client that left %zu bytes unread\n", S.control_path,
			c->out.len);
		drop_client(c);
	}
}

/* Does the client wait for its snapshot-hold's answer (answers go in
 * order, so its next commands are read after it)? */
static bool
client_holding(const struct client *c)
{
	return S.grp.holding && c == &S.clients[S.grp.client] &&
	       c->gen == S.grp.gen;
}

/* Are the client's commands read now?  Not after its EOF, nor while its
 * answers pile up unread, nor while its hold runs. */
static bool
client_reads(const struct client *c)
{
	return c->fd >= 0 && !c->eof && c->out.len < OUT_PAUSE &&
	       !client_holding(c);
}

/* Run up to LINES_PER_ROUND of the client's commands. */
static void
client_commands(int ci)
{
	struct client *c = &S.clients[ci];

	for (int k = 0; k < LINES_PER_ROUND && client_reads(c) && !S.quit;
	     k++) {
		json_t *req, *reply;
		int r = line_read(&c->rd, &req);

		if (r == -EAGAIN)
			return;
		if (r == 0) {
			c->eof = true; /* a partial last line is dropped */
			return;
		}
		if (r < 0 && r != -EPROTO) {
			drop_client(c); /* -EMSGSIZE, or the socket failed */
			return;
		}
		reply = req ? handle(req, ci)
			    : error_reply(-EPROTO, "not a JSON object");
		json_decref(req);
		client_send(ci, reply);
	}
}

static void
accept_clients(void)
{
	/* A bounded number per round: the rest wait in the backlog. */
	for (int k = 0; k < MAX_CLIENTS; k++) {
		int fd = accept4(S.listen_fd, NULL, NULL,
				 SOCK_CLOEXEC | SOCK_NONBLOCK);
		int i;

		if (fd < 0)
			return;
		if (!peer_allowed(fd)) {
			close(fd);
			continue;
		}
		for (i = 0; i < MAX_CLIENTS; i++)
			if (S.clients[i].fd < 0)
				break;
		if (i == MAX_CLIENTS) {
			struct line_out o = { 0 };

			/* Said once, without waiting: then closed. */
			if (line_out_add(&o, error_reply(-EBUSY, "too many "
					 "control clients")) == 0)
				line_out_flush(&o, fd);
			line_out_free(&o);
			close(fd);
			continue;
		}
		S.clients[i].fd = fd;
		S.clients[i].gen = ++S.client_gen;
		S.clients[i].rd.fd = fd;
		S.clients[i].rd.len = 0;
		S.clients[i].eof = false;
		S.clients[i].out.len = 0;
	}
}

static void
serve_loop(void)
{
	struct pollfd p[MAX_CLIENTS + 3];

	while (!S.quit) {
		int n = 0, timeout = -1;

		p[n++] = (struct pollfd){ .fd = S.listen_fd, .events = POLLIN };
		p[n++] = (struct pollfd){ .fd = S.event_fd, .events = POLLIN };
		p[n++] = (struct pollfd){ .fd = S.signal_fd, .events = POLLIN };
		for (int i = 0; i < MAX_CLIENTS; i++) {
			struct client *c = &S.clients[i];
			short ev = 0;

			if (client_reads(c)) {
				ev |= POLLIN;
				/* Lines left over from the last round. */
				if (line_pending(&c->rd))
					timeout = 0;
			}
			if (c->fd >= 0 && c->out.len)
				ev |= POLLOUT;
			p[n++] = (struct pollfd){ .fd = c->fd, .events = ev };
		}
		if (poll(p, (nfds_t)n, timeout) < 0) {
			if (errno == EINTR)
				continue;
			break;
		}
		if (p[2].revents) {
			struct signalfd_siginfo si;

			if (read(S.signal_fd, &si, sizeof si) > 0)
				S.quit = true;
		}
		/* Events first: a job's end frees the way for a new move. */
		if (p[1].revents)
			deliver_events();
		if (p[0].revents)
			accept_clients();
		for (int i = 0; i < MAX_CLIENTS && !S.quit; i++) {
			struct client *c = &S.clients[i];
			short re = p[3 + i].revents;

			if (c->fd < 0)
				continue;
			if (c->out.len && (re & (POLLOUT | POLLERR | POLLHUP)) &&
			    line_out_flush(&c->out, c->fd) < 0) {
				drop_client(c);
				continue;
			}
			/* A holder that hung up while its hold runs: not
			 * read, so not seen to go otherwise. */
			if (client_holding(c) && (re & (POLLHUP | POLLERR))) {
				drop_client(c);
				continue;
			}
			if (client_reads(c) && (re || line_pending(&c->rd)))
				client_commands(i);
			if (c->fd >= 0 && c->eof && !c->out.len)
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

/* --allow-nbd HOST | unix:SOCKET: a socket's path kept canonical, as
 * control_check_destination wants. */
static int
add_allow_nbd(const char *arg)
{
	char canon[PATH_MAX], why[PATH_MAX + 128], *e, **v;

	if (strncmp(arg, "unix:", 5) == 0) {
		if (control_canonical_path(arg + 5, canon, sizeof canon, why,
					   sizeof why) < 0)
			return tool_usage_error("--allow-nbd %s", why);
		if (asprintf(&e, "unix:%s", canon) < 0)
			return -1;
	} else {
		size_t n = strlen(arg);

		if (!n || strspn(arg, "abcdefghijklmnopqrstuvwxyz"
			     "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-:[]") != n)
			return tool_usage_error("--allow-nbd takes a host name "
						"or address, or unix:PATH, "
						"not '%s'", arg);
		e = strdup(arg);
		if (!e)
			return -1;
	}
	v = realloc(S.allow_nbd, (S.n_allow_nbd + 1) * sizeof *v);
	if (!v) {
		free(e);
		return -1;
	}
	v[S.n_allow_nbd++] = e;
	S.allow_nbd = v;
	return 0;
}

static void
free_allow_dirs(void)
{
	for (size_t i = 0; i < S.n_allow_nbd; i++)
		free(S.allow_nbd[i]);
	free(S.allow_nbd);
	S.allow_nbd = NULL;
	S.n_allow_nbd = 0;
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

/*
 * --track: record the disk's changes in `sidecar` (NULL: in a qcow2
 * image itself, else the image's name plus .bmirror-cbt), and say so if
 * the previous tracker did not close a sidecar (a crash: its checkpoints
 * stay trusted, docs/cbt.md).
 */
static int
track_setup(const char *sidecar, uint32_t granularity)
{
	int r;

	r = blockmirror_disk_track(S.disk, sidecar, granularity,
				   &S.track_crashed);
	if (r == 0)
		r = blockmirror_disk_track_record(S.disk, &S.track_sidecar,
						  &S.track_in_image);
	if (r < 0) {
		tool_lib_error();
		return r;
	}
	if (S.track_crashed)
		fprintf(stderr, "bmirror serve: %s: the previous tracker did "
			"not close it (crashed); its checkpoints are still "
			"trusted\n", S.track_sidecar);
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
	       "[--allow-nbd HOST|unix:SOCKET]...\n"
	       "                     [--handshake-timeout SECONDS] "
	       "[--track[=SIDECAR] [--track-granularity SIZE]]\n"
	       "                     (IMAGE | --link LINK)\n\n"
	       "Export IMAGE (or the image LINK points to) over NBD and take "
	       "commands on the\ncontrol socket (bmirror move, status, "
	       "cancel, pause, resume).  With --link, a\nmove's pivot "
	       "re-points LINK at the destination.  With --allow-dir or "
	       "--allow-nbd,\nmoves may only write into those directories "
	       "and to those NBD servers.  Runs until SIGTERM, "
	       "SIGINT or a quit command.\n"
	       "An NBD client that has not finished its handshake "
	       "(TLS included) after\n--handshake-timeout seconds "
	       "(default 10) is disconnected.\n");
	printf("\n--track[=SIDECAR] records which blocks the guest writes, "
	       "for incremental\nbackups (bmirror checkpoint, bmirror snapshot "
	       "--since); the record is kept in\nSIDECAR, by default in a "
	       "qcow2 IMAGE as its persistent dirty bitmaps, else\nin "
	       "IMAGE.bmirror-cbt, and survives crashes (docs/cbt.md).  "
	       "--track-granularity\n(default the record's, else 64K): smaller "
	       "costs more marks and sends less\nfor scattered small writes "
	       "(replication, incremental backups).\n");
	printf("\nA move keeps crash-resumable state in --state-dir DIR "
	       "(with --link, by\ndefault LINK.bmirror-state; --no-state: "
	       "none).  Started again after a\ncrash, serve resumes the move "
	       "it finds there (docs/state.md).\n");
}

int
cmd_serve(int argc, char **argv)
{
	enum { OPT_NBD = 256, OPT_CONTROL, OPT_LINK, OPT_EXPORT, OPT_READONLY,
	       OPT_PSK, OPT_ALLOW_DIR, OPT_HELP, OPT_STATE_DIR, OPT_NO_STATE,
	       OPT_ALLOW_NBD, OPT_HANDSHAKE, OPT_TRACK, OPT_TRACK_GRAN };
	static const struct option longopts[] = {
		{ "nbd", required_argument, NULL, OPT_NBD },
		{ "control", required_argument, NULL, OPT_CONTROL },
		{ "link", required_argument, NULL, OPT_LINK },
		{ "export-name", required_argument, NULL, OPT_EXPORT },
		{ "readonly", no_argument, NULL, OPT_READONLY },
		{ "tls-psk-file", required_argument, NULL, OPT_PSK },
		{ "allow-dir", required_argument, NULL, OPT_ALLOW_DIR },
		{ "allow-nbd", required_argument, NULL, OPT_ALLOW_NBD },
		{ "state-dir", required_argument, NULL, OPT_STATE_DIR },
		{ "no-state", no_argument, NULL, OPT_NO_STATE },
		{ "handshake-timeout", required_argument, NULL, OPT_HANDSHAKE },
		{ "track", optional_argument, NULL, OPT_TRACK },
		{ "track-granularity", required_argument, NULL,
		  OPT_TRACK_GRAN },
		{ "help", no_argument, NULL, OPT_HELP },
		{ NULL, 0, NULL, 0 },
	};
	struct blockmirror_server_options so = { .size = sizeof so };
	enum blockmirror_format fmt = BLOCKMIRROR_FORMAT_AUTO;
	const char *nbd = NULL, *image = NULL;
	unsigned dflags = 0;
	sigset_t mask;
	int c, status = EXIT_OK;
	bool no_state = false, track = false;
	uint32_t track_gran = 0;
	const char *sidecar = NULL;
	char *link_target = NULL;

	opterr = 0;
	S.listen_fd = S.signal_fd = S.event_fd = -1;
	S.job_client = -1;
	S.grp.client = -1;
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
		case OPT_ALLOW_NBD:
			if (add_allow_nbd(optarg) < 0)
				return EXIT_USAGE;
			break;
		case OPT_STATE_DIR:
			S.state_dir = optarg;
			break;
		case OPT_NO_STATE:
			no_state = true;
			break;
		case OPT_HANDSHAKE: {
			char *end;
			unsigned long v;

			errno = 0;
			v = strtoul(optarg, &end, 10);
			if (errno || end == optarg || *end || v == 0 ||
			    v > 86400 || optarg[0] == '-')
				return tool_usage_error("--handshake-timeout: "
					"'%s' is not a number of seconds from "
					"1 to 86400", optarg);
			so.handshake_timeout = (unsigned)v;
			break;
		}
		case OPT_TRACK:
			if (optarg && !*optarg)
				return tool_usage_error("--track=SIDECAR needs "
							"a file name");
			track = true;
			sidecar = optarg;
			break;
		case OPT_TRACK_GRAN: {
			uint64_t g;

			if (parse_size(optarg, &g) < 0 || g < 4096 ||
			    g > 64 * 1024 * 1024 || (g & (g - 1)))
				return tool_usage_error("--track-granularity "
					"needs a power of two from 4K to 64M: "
					"\"%s\"", optarg);
			track_gran = (uint32_t)g;
			break;
		}
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
		if (link_target && blockmirror_nbd_is_uri(link_target))
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
	pthread_mutex_init(&S.bk.lock, NULL);
	S.event_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	serve_repl_init(wake);
	if (S.event_fd < 0) {
		tool_error("eventfd: %s", strerror(errno));
		return EXIT_FAILED;
	}
	for (int i = 0; i < MAX_CLIENTS; i++)
		S.clients[i].fd = -1;

	S.disk = blockmirror_disk_open(image, fmt, dflags);
	if (!S.disk) {
		tool_lib_error();
		return EXIT_FAILED;
	}
	if (blockmirror_disk_start_thread(S.disk) < 0)
		goto fail_disk;
	/* Before any guest request: none may go unrecorded. */
	if (track_gran && !track)
		return tool_usage_error("--track-granularity goes with --track");
	if (track && track_setup(sidecar, track_gran) < 0) {
		status = EXIT_FAILED;
		goto out;
	}
	/* A move a crash left is taken up before the guest can write: a
	 * write that reached the source before the resumed job watches
	 * would be missing on the destination. */
	if (state_setup(no_state, image) < 0) {
		status = EXIT_FAILED;
		goto out;
	}
	S.server = blockmirror_server_start(S.disk, nbd, &so);
	if (!S.server) {
		tool_lib_error();
		status = EXIT_FAILED;
		goto out;
	}
	S.listen_fd = listen_control(S.control_path);
	if (S.listen_fd < 0) {
		status = EXIT_FAILED;
		goto out;
	}
	serve_loop();

out:
	/* Before event_fd closes: the hold's thread wakes us through it. */
	group_hold_stop();
	/* A move still running is cancelled: no job is left half-done. */
	if (S.job) {
		if (!S.job_ended)
			blockmirror_job_cancel(S.job, true);
		blockmirror_job_free(S.job);
	}
	/* Events the job sent to the end; answers (quit's) once, unwaited. */
	for (struct ev_node *n = take_events(), *next; n; n = next) {
		next = n->next;
		free_event(n);
	}
	if (S.event_fd >= 0)
		close(S.event_fd);
	for (int i = 0; i < MAX_CLIENTS; i++) {
		struct client *cl = &S.clients[i];

		if (cl->fd < 0)
			continue;
		line_out_flush(&cl->out, cl->fd);
		drop_client(cl);
	}
	if (S.listen_fd >= 0) {
		close(S.listen_fd);
		unlink(S.control_path);
	}
	if (S.grp.active)
		group_abort(NULL); /* its client stayed to the end */
	backup_stop();
	serve_repl_stop();
	blockmirror_server_stop(S.server);
	release_snapshots();
	if (blockmirror_disk_close(S.disk) < 0) {
		tool_lib_error();
		status = EXIT_FAILED;
	}
	free_allow_dirs();
	json_decref(S.resume);
	free(S.state_dir_buf);
	free(S.track_sidecar);
	free(link_target);
	return status;

fail_disk:
	tool_lib_error();
	blockmirror_disk_close(S.disk);
	free(link_target);
	return EXIT_FAILED;
}
