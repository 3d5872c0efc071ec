/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * bmirror backup: points of a disk in a backup directory (docs/backup.md).
 *
 *   bmirror backup [-f FMT] IMAGE --to DIR [--incremental]
 *   bmirror backup --control SOCK --to DIR [--incremental]
 *   bmirror backup ... --to NBD-URI --catalog DIR  (the data in an export)
 *   bmirror backup list DIR
 *   bmirror backup verify DIR [--against IMAGE | --control SOCK] [--sample PCT]
 *   bmirror backup prune DIR --keep N
 *   bmirror backup restore DIR [--point N] --to TARGET [-O FMT]
 *
 * An image that no program runs is backed up here, in this process; a
 * disk that `bmirror serve` runs is backed up by the server (the
 * `backup` control command), which holds the disk and its change record.
 * With --json every step is a line (backup_event_json), then the result.
 */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <sys/wait.h>
#include <time.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "bmirror.h"
#include "hooks.h"
#include "control.h"

static void
help_backup(void)
{
	printf("Usage: bmirror backup [-f FMT] IMAGE --to DIR [--incremental]\n"
	       "         [--freeze-cmd CMD] [--thaw-cmd CMD] "
	       "[--freeze-timeout SECS]\n"
	       "       bmirror backup --control PATH --to DIR [--incremental]\n"
	       "       bmirror backup IMAGE|--control PATH --to NBD-URI "
	       "--catalog DIR ...\n"
	       "       bmirror backup list DIR\n"
	       "       bmirror backup verify DIR [--against IMAGE | --control "
	       "PATH] [--sample PCT]\n"
	       "       bmirror backup prune DIR --keep N\n"
	       "       bmirror backup restore DIR [--point N] --to TARGET "
	       "[-O FMT]\n"
	       "       bmirror backup restore DIR [--point N] --overlay FILE\n"
	       "  (each takes --json; taking a point and restore take "
	       "--progress)\n\n"
	       "Take a point of a disk into DIR: full, or --incremental (only "
	       "what\nchanged since the newest point, by the disk's change "
	       "record, or by\ncomparing digests when there is none).  "
	       "verify rereads every point\n(and with --against or --control "
	       "checks the live disk where the record\nsays nothing changed, or "
	       "a random --sample PCT percent of it);\n"
	       "--freeze-cmd runs right before the instant (for example\n"
	       "virsh domfsfreeze); if it fails or times out (10 s) the point "
	       "is\ncrash-consistent, else application-consistent; "
	       "--thaw-cmd runs\nright after.  prune keeps the newest N points; "
	       "restore writes a point to\n"
	       "an image (raw by default), or with --overlay makes a\nqcow2 "
	       "overlay of it to serve at once (instant restore).  With an "
	       "NBD URI\n(nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket="
	       "PATH) as --to, the\npoint's data goes into that export and "
	       "its manifest and digests into\nthe --catalog DIR (list, verify,"
	       " prune and restore take --catalog DIR\nfor DIR too).  --json "
	       "prints every step as a line, then the result.\n");
}

json_t *
backup_event_json(const struct blockmirror_backup_event *ev)
{
	json_t *j = json_pack("{s:s}", "event",
			      blockmirror_backup_event_name(ev->type));
	const char *key = "data";

	if (!j)
		return NULL;
	if (ev->point)
		json_object_set_new(j, "point", json_integer(ev->point));
	switch (ev->type) {
	case BLOCKMIRROR_BACKUP_STARTED:
	case BLOCKMIRROR_BACKUP_COMPLETED:
		json_object_set_new(j, "incremental",
				    json_boolean(ev->incremental));
		/* fall through */
	case BLOCKMIRROR_BACKUP_SNAPSHOT_TAKEN:
		json_object_set_new(j, "healing", json_boolean(ev->healing));
		break;
	case BLOCKMIRROR_BACKUP_PROGRESS:
		json_object_set_new(j, "bytes_done", json_integer(
					    (json_int_t)ev->done));
		json_object_set_new(j, "bytes_total", json_integer(
					    (json_int_t)ev->total));
		break;
	case BLOCKMIRROR_BACKUP_FAILED:
	case BLOCKMIRROR_BACKUP_CANCELLED:
		json_object_set_new(j, "errno", json_integer(ev->err));
		json_object_set_new(j, "error", json_string(ev->message ?
							    ev->message : ""));
		break;
	case BLOCKMIRROR_BACKUP_CHECKPOINT_CREATED:
	case BLOCKMIRROR_BACKUP_CHECKPOINT_REMOVED:
	case BLOCKMIRROR_BACKUP_LEFTOVERS_CLEANED:
		key = "checkpoint";
		break;
	case BLOCKMIRROR_BACKUP_DIGESTS_WRITTEN:
		key = "digests";
		break;
	case BLOCKMIRROR_BACKUP_POINT_RESTORED:
		key = "to";
		break;
	default:
		break;
	}
	if (ev->name)
		json_object_set_new(j, key, json_string(ev->name));
	return j;
}

/* --json over the control socket: the server's events as they come. */
static void
print_line(json_t *ev, void *data)
{
	json_print(json_incref(ev));
}

/* --json: each event as a line (progress only in the bar otherwise). */
static void
print_event(void *user_data, const struct blockmirror_backup_event *ev)
{
	json_print(backup_event_json(ev));
}

static void
print_point(const struct blockmirror_backup_point *p, bool json)
{
	if (json) {
		json_print(json_pack("{s:i, s:s, s:b, s:I, s:I, s:I, s:I, s:s, "
				     "s:b, s:s}",
			"point", (int)p->number, "file", p->file,
			"incremental", p->incremental,
			"instant", (json_int_t)p->instant,
			"bytes_changed", (json_int_t)p->bytes_changed,
			"bytes_read", (json_int_t)p->bytes_read,
			"bytes_written", (json_int_t)p->bytes_written,
			"checkpoint", p->checkpoint,
			"healed", p->healed,
			"consistency", p->application_consistent ?
				       "application" : "crash"));
		return;
	}
	printf("point %04u %s %s %s%s read=%" PRIu64 " written=%" PRIu64 "\n",
	       p->number, p->incremental ? "incremental" : "full",
	       p->application_consistent ? "application-consistent"
					 : "crash-consistent",
	       p->file, p->healed ? " (healed by digests)" : "",
	       p->bytes_read, p->bytes_written);
}

/* The freeze and thaw commands (--freeze-cmd, --thaw-cmd). */
struct hooks {
	const char *freeze, *thaw;
	unsigned timeout_s;
};

static int
freeze_hook(void *user_data)
{
	struct hooks *h = user_data;

	if (!h->freeze)
		return -1;
	if (run_hook("freeze", h->freeze, h->timeout_s) == 0)
		return 0;
	fprintf(stderr, "bmirror backup: the point will be crash-consistent\n");
	return -1;
}

static void
thaw_hook(void *user_data)
{
	struct hooks *h = user_data;

	if (h->thaw)
		run_hook("thaw", h->thaw, h->timeout_s);
}

/* Open an image for a backup or a check, with its change record when it
 * has one (IMAGE.bmirror-cbt, written by `bmirror serve --track`). */
static struct blockmirror_disk *
open_tracked(const char *image, enum blockmirror_format fmt, bool readonly)
{
	struct blockmirror_disk *disk;
	char side[PATH_MAX];

	disk = blockmirror_disk_open(image, fmt, readonly ?
				     BLOCKMIRROR_DISK_READONLY : 0);
	if (!disk) {
		tool_lib_error();
		return NULL;
	}
	snprintf(side, sizeof side, "%s.bmirror-cbt", image);
	if (access(side, F_OK) == 0 &&
	    blockmirror_disk_track(disk, side, 0, NULL) < 0) {
		tool_lib_error();
		blockmirror_disk_close(disk);
		return NULL;
	}
	return disk;
}

static struct progress *hooks_bar;

static void
hooked_progress(void *user_data, uint64_t done, uint64_t total)
{
	progress_update(hooks_bar, done, total);
}

static int
take_local(const char *image, enum blockmirror_format fmt, const char *dir,
	   const char *target, bool incremental, struct hooks *hooks,
	   bool json, bool want_bar)
{
	struct blockmirror_backup_options o = { .size = sizeof o };
	struct blockmirror_backup_point p;
	struct blockmirror_disk *disk = open_tracked(image, fmt, false);
	struct progress *bar;
	int r;

	if (!disk)
		return EXIT_FAILED;
	bar = progress_new("backing up", want_bar);
	o.dir = dir;
	o.target = target;
	o.incremental = incremental;
	o.on_event = json ? print_event : NULL;
	/* The hooks get user_data too: the bar goes through them. */
	hooks_bar = bar;
	o.progress = bar ? hooked_progress : NULL;
	o.user_data = hooks;
	if (hooks->freeze || hooks->thaw) {
		o.freeze = freeze_hook;
		o.thaw = thaw_hook;
	}
	r = blockmirror_backup(disk, &o, &p);
	progress_end(bar);
	if (r < 0)
		tool_lib_error();
	if (blockmirror_disk_close(disk) < 0 && r == 0) {
		tool_lib_error();
		r = -1;
	}
	if (r < 0)
		return EXIT_FAILED;
	print_point(&p, json);
	return EXIT_OK;
}

struct served {
	struct progress *bar;
	struct hooks *hooks;
	bool thawed;
	bool json;                    /* print each event */
};

static void
served_event(json_t *ev, void *data)
{
	struct served *sv = data;
	const char *name = json_string_value(json_object_get(ev, "event"));

	if (!name)
		return;
	if (sv->json)
		print_line(ev, NULL);
	if (!strcmp(name, "SNAPSHOT_TAKEN") && !sv->thawed) {
		sv->thawed = true;
		thaw_hook(sv->hooks);
	} else if (!strcmp(name, "BACKUP_PROGRESS") && sv->bar) {
		progress_update(sv->bar, (uint64_t)json_integer_value(
					json_object_get(ev, "bytes_done")),
				(uint64_t)json_integer_value(
					json_object_get(ev, "bytes_total")));
	}
}

static int
take_served(const char *control, const char *dir, const char *target,
	    bool incremental, struct hooks *hooks, bool json, bool want_bar)
{
	struct served sv = { .hooks = hooks, .json = json };
	json_t *req;
	struct line_reader rd = { 0 };
	char real[PATH_MAX];
	bool frozen = false;
	json_t *reply, *r;
	int fd;

	/* The server opens DIR by its absolute name, which must exist
	 * for the server to check where it is: made here if new. */
	if (mkdir(dir, 0755) < 0 && errno != EEXIST)
		return tool_usage_error("%s: %s", dir, strerror(errno));
	if (!realpath(dir, real))
		return tool_usage_error("%s: %s", dir, strerror(errno));
	fd = client_connect(control);
	if (fd < 0)
		return EXIT_FAILED;
	rd.fd = fd;
	/* The freeze runs here, the instant in the server right after,
	 * and the thaw as soon as the server says the instant is taken. */
	if (hooks->freeze)
		frozen = freeze_hook(hooks) == 0;
	sv.bar = progress_new("backing up", want_bar);
	req = json_pack("{s:s, s:s, s:b, s:b}", "cmd", "backup", "dir", real,
			"incremental", incremental, "frozen", frozen);
	if (req && target)
		json_object_set_new(req, "target", json_string(target));
	reply = client_request(fd, &rd, req, served_event, &sv);
	progress_end(sv.bar);
	if (!sv.thawed)
		thaw_hook(hooks);
	close(fd);
	if (!reply) {
		tool_error("%s: the server closed the connection", control);
		return EXIT_FAILED;
	}
	if (client_reply_error(reply) < 0) {
		json_decref(reply);
		return EXIT_FAILED;
	}
	r = json_object_get(reply, "return");
	if (json)
		json_print(json_incref(r));
	else
		printf("point %04" JSON_INTEGER_FORMAT " %s %s %s%s\n",
		       json_integer_value(json_object_get(r, "point")),
		       json_is_true(json_object_get(r, "incremental")) ?
		       "incremental" : "full",
		       json_string_value(json_object_get(r, "consistency")),
		       json_string_value(json_object_get(r, "file")),
		       json_is_true(json_object_get(r, "healed")) ?
		       " (healed by digests)" : "");
	json_decref(reply);
	return EXIT_OK;
}

static int
do_list(const char *dir, bool json)
{
	struct blockmirror_backup_point *v;
	size_t n;

	if (blockmirror_backup_list(dir, &v, &n) < 0) {
		tool_lib_error();
		return EXIT_FAILED;
	}
	if (json) {
		json_t *a = json_array();

		for (size_t i = 0; i < n; i++)
			json_array_append_new(a, json_pack(
				"{s:i, s:s, s:b, s:I, s:I, s:s, s:b}",
				"point", (int)v[i].number, "file", v[i].file,
				"incremental", v[i].incremental,
				"instant", (json_int_t)v[i].instant,
				"bytes", (json_int_t)v[i].bytes_written,
				"checkpoint", v[i].checkpoint,
				"superseded", v[i].superseded));
		json_print(json_pack("{s:o}", "points", a));
	} else {
		for (size_t i = 0; i < n; i++)
			printf("%04u %-11s %" PRId64 " %" PRIu64 " %s%s\n",
			       v[i].number, v[i].incremental ? "incremental"
			       : "full", v[i].instant, v[i].bytes_written,
			       v[i].file, v[i].superseded ? " (superseded)"
							  : "");
	}
	free(v);
	return EXIT_OK;
}

static int
do_verify(const char *dir, const char *against, enum blockmirror_format fmt,
	  const char *control, unsigned sample, bool json)
{
	struct blockmirror_backup_verify_options o = { .size = sizeof o };
	struct blockmirror_backup_check c;
	struct blockmirror_disk *disk = NULL;
	int r;

	if (control) {
		char real[PATH_MAX];
		json_t *reply;

		if (!realpath(dir, real))
			return tool_usage_error("%s: %s", dir, strerror(errno));
		reply = client_call_events(control, json_pack(
				"{s:s, s:s, s:i}", "cmd", "backup-verify", "dir",
				real, "sample", (int)sample),
				json ? print_line : NULL, NULL);
		if (!reply)
			return EXIT_FAILED;
		if (json)
			json_print(json_incref(json_object_get(reply,
							       "return")));
		else
			printf("%s: every point reads as its digests, and the "
			       "live disk agrees\n", dir);
		json_decref(reply);
		return EXIT_OK;
	}
	if (against && !(disk = open_tracked(against, fmt, true)))
		return EXIT_FAILED;
	o.live = disk;
	o.live_sample_percent = sample;
	o.on_event = json ? print_event : NULL;
	r = blockmirror_backup_verify_opts(dir, &o, &c);
	if (r < 0)
		tool_lib_error();
	if (disk)
		blockmirror_disk_close(disk);
	if (json)
		json_print(json_pack("{s:b, s:i, s:i, s:I, s:I, s:I}",
			"ok", r == 0, "points", (int)c.points,
			"bad_point", (int)c.bad_point,
			"bytes_read", (json_int_t)c.bytes_read,
			"live_bytes_read", (json_int_t)c.live_bytes_read,
			"live_mismatches", (json_int_t)c.live_mismatches));
	else if (r == 0)
		printf("%s: %u points read as their digests%s\n", dir,
		       c.points, disk ? ", and the live disk agrees" : "");
	return r < 0 ? EXIT_FAILED : EXIT_OK;
}

static int
do_prune(const char *dir, uint64_t keep, bool json)
{
	struct blockmirror_backup_prune_result p;

	if (blockmirror_backup_prune_with_events(dir, (unsigned)keep, &p, json ?
						 print_event : NULL, NULL) < 0) {
		tool_lib_error();
		return EXIT_FAILED;
	}
	if (json)
		json_print(json_pack("{s:i, s:i, s:b, s:I}", "first",
				     (int)p.first, "removed", (int)p.removed,
				     "merged", p.merged, "bytes_read",
				     (json_int_t)p.bytes_read));
	else
		printf("%s: removed %u points; the chain starts at %04u%s\n",
		       dir, p.removed, p.first,
		       p.merged ? " (made full)" : "");
	return EXIT_OK;
}

/* Instant restore: a new qcow2 overlay over the point, to serve at once
 * and move to production storage while the guest runs on it. */
static int
make_overlay(const char *file, const char *overlay, bool json)
{
	struct blockmirror_image_info info = { .size = sizeof info };
	char real[PATH_MAX], opts[PATH_MAX + 64];

	if (!realpath(file, real) ||
	    blockmirror_image_info(real, BLOCKMIRROR_FORMAT_QCOW2, &info) < 0) {
		tool_lib_error();
		return EXIT_FAILED;
	}
	if (strchr(real, ','))
		return tool_usage_error("%s: a backup directory whose path "
					"holds a comma cannot be an overlay's "
					"backing file", real);
	snprintf(opts, sizeof opts, "backing_file=%s,backing_fmt=qcow2", real);
	if (blockmirror_image_create(overlay, BLOCKMIRROR_FORMAT_QCOW2,
				     info.virtual_size, opts, false) < 0) {
		tool_lib_error();
		return EXIT_FAILED;
	}
	if (json)
		json_print(json_pack("{s:s, s:s}", "point", real, "overlay",
				     overlay));
	else
		printf("%s: an overlay of %s; serve it with "
		       "--allow-backing-dir %.*s\n", overlay, real,
		       (int)(strrchr(real, '/') - real), real);
	return EXIT_OK;
}

static int
do_restore(const char *dir, uint64_t point, const char *to,
	   const char *overlay, enum blockmirror_format fmt, bool json,
	   bool want_bar)
{
	struct blockmirror_backup_point *v;
	struct progress *bar;
	uint64_t written = 0;
	size_t n;
	int r;

	if (overlay) {
		char file[PATH_MAX];

		if (blockmirror_backup_list(dir, &v, &n) < 0) {
			tool_lib_error();
			return EXIT_FAILED;
		}
		if (!n || (point && (point < v[0].number ||
				     point > v[n - 1].number))) {
			tool_error("%s: no point %04" PRIu64 " (%s)", dir,
				   point, n ? "see bmirror backup list"
					    : "it holds no backup point");
			free(v);
			return EXIT_FAILED;
		}
		snprintf(file, sizeof file, "%s",
			 v[point ? point - v[0].number : n - 1].file);
		free(v);
		/* An overlay's backing file must be a file here. */
		if (blockmirror_nbd_is_uri(file)) {
			tool_error("%s: the point's data is in the NBD export "
				   "%s, not in a file: restore it with --to "
				   "TARGET, or serve an overlay of the export "
				   "yourself", dir, file);
			return EXIT_FAILED;
		}
		return make_overlay(file, overlay, json);
	}
	bar = progress_new("restoring", want_bar);
	r = blockmirror_backup_restore_with_events(dir, (unsigned)point, to,
						   fmt, bar ? progress_update
							    : NULL, bar,
						   &written, json ?
						   print_event : NULL, NULL);
	progress_end(bar);
	if (r < 0) {
		tool_lib_error();
		return EXIT_FAILED;
	}
	if (json)
		json_print(json_pack("{s:s, s:i, s:s, s:I}", "dir", dir,
				     "point", (int)point, "to", to,
				     "bytes_written", (json_int_t)written));
	return EXIT_OK;
}

int
cmd_backup(int argc, char **argv)
{
	enum { OPT_TO = 256, OPT_CATALOG, OPT_INCREMENTAL, OPT_CONTROL,
	       OPT_AGAINST, OPT_SAMPLE,
	       OPT_KEEP, OPT_POINT, OPT_JSON, OPT_PROGRESS, OPT_OVERLAY,
	       OPT_FREEZE, OPT_THAW, OPT_FREEZE_TIMEOUT, OPT_HELP };
	static const struct option longopts[] = {
		{ "to", required_argument, NULL, OPT_TO },
		{ "catalog", required_argument, NULL, OPT_CATALOG },
		{ "incremental", no_argument, NULL, OPT_INCREMENTAL },
		{ "control", required_argument, NULL, OPT_CONTROL },
		{ "against", required_argument, NULL, OPT_AGAINST },
		{ "sample", required_argument, NULL, OPT_SAMPLE },
		{ "keep", required_argument, NULL, OPT_KEEP },
		{ "point", required_argument, NULL, OPT_POINT },
		{ "json", no_argument, NULL, OPT_JSON },
		{ "progress", no_argument, NULL, OPT_PROGRESS },
		{ "overlay", required_argument, NULL, OPT_OVERLAY },
		{ "freeze-cmd", required_argument, NULL, OPT_FREEZE },
		{ "thaw-cmd", required_argument, NULL, OPT_THAW },
		{ "freeze-timeout", required_argument, NULL, OPT_FREEZE_TIMEOUT },
		{ "help", no_argument, NULL, OPT_HELP },
		{ NULL, 0, NULL, 0 },
	};
	enum blockmirror_format fmt = BLOCKMIRROR_FORMAT_AUTO;
	const char *to = NULL, *control = NULL, *against = NULL, *action;
	const char *overlay = NULL, *catalog = NULL, *target = NULL;
	struct hooks hooks = { .timeout_s = 10 };
	bool incremental = false, json = false;
	bool want_bar = isatty(STDOUT_FILENO);
	uint64_t keep = 0, point = 0, secs, sample = 0;
	int c;

	opterr = 0;
	while ((c = getopt_long(argc, argv, ":f:O:h", longopts, NULL)) != -1) {
		switch (c) {
		case 'f':
		case 'O':
			if (!parse_format(optarg, &fmt))
				return EXIT_USAGE;
			break;
		case OPT_TO:
			to = *optarg ? optarg : NULL;
			break;
		case OPT_CATALOG:
			catalog = *optarg ? optarg : NULL;
			break;
		case OPT_INCREMENTAL:
			incremental = true;
			break;
		case OPT_CONTROL:
			control = optarg;
			break;
		case OPT_AGAINST:
			against = optarg;
			break;
		case OPT_OVERLAY:
			overlay = optarg;
			break;
		case OPT_SAMPLE:
			if (!parse_uint(optarg, 100, &sample) || !sample)
				return tool_usage_error("--sample: '%s' is not "
					"a percentage from 1 to 100", optarg);
			break;
		case OPT_FREEZE:
			hooks.freeze = optarg;
			break;
		case OPT_THAW:
			hooks.thaw = optarg;
			break;
		case OPT_FREEZE_TIMEOUT:
			if (!parse_uint(optarg, 3600, &secs) || !secs)
				return tool_usage_error("--freeze-timeout: '%s' "
					"is not a number of seconds from 1 to "
					"3600", optarg);
			hooks.timeout_s = (unsigned)secs;
			break;
		case OPT_KEEP:
		case OPT_POINT:
			if (!parse_uint(optarg, 9999, c == OPT_KEEP ? &keep
								  : &point))
				return tool_usage_error("--%s: '%s' is not a "
					"number from 1 to 9999", c == OPT_KEEP ?
					"keep" : "point", optarg);
			break;
		case OPT_JSON:
			json = true;
			want_bar = false;
			break;
		case OPT_PROGRESS:
			want_bar = true;
			break;
		case 'h':
		case OPT_HELP:
			help_backup();
			return EXIT_OK;
		default:
			return tool_bad_option(c, argc, argv);
		}
	}
	action = optind < argc ? argv[optind] : NULL;
	if (action && (!strcmp(action, "list") || !strcmp(action, "verify") ||
		       !strcmp(action, "prune") ||
		       !strcmp(action, "restore"))) {
		const char *dir = argc - optind == 2 ? argv[optind + 1] : NULL;

		if (dir && catalog)
			return tool_usage_error("backup %s: give DIR or "
						"--catalog DIR, not both",
						action);
		if (!dir)
			dir = argc == optind + 1 ? catalog : NULL;
		if (!dir)
			return tool_usage_error("backup %s needs DIR (or "
						"--catalog DIR)", action);
		if (!strcmp(action, "list"))
			return do_list(dir, json);
		if (!strcmp(action, "verify")) {
			if (against && control)
				return tool_usage_error("--against and "
							"--control exclude "
							"each other");
			if (sample && !against && !control)
				return tool_usage_error("--sample is of the "
							"live disk: it needs "
							"--against or "
							"--control");
			return do_verify(dir, against, fmt, control,
					 (unsigned)sample, json);
		}
		if (!strcmp(action, "prune")) {
			if (!keep)
				return tool_usage_error("prune needs --keep N");
			return do_prune(dir, keep, json);
		}
		if (!to == !overlay)
			return tool_usage_error("restore needs --to TARGET or "
						"--overlay FILE");
		return do_restore(dir, point, to, overlay, fmt, json,
				  want_bar);
	}
	if (!to)
		return tool_usage_error("backup needs --to DIR (or --to NBD-URI "
					"--catalog DIR)");
	if (blockmirror_nbd_is_uri(to)) {
		target = to;
		to = catalog;
		if (!to)
			return tool_usage_error("--to %s: an NBD target needs "
						"--catalog DIR, the directory "
						"for the points' manifests and "
						"digests", target);
	} else if (catalog) {
		return tool_usage_error("--catalog goes with an NBD URI as "
					"--to; with a directory the catalogue "
					"is in it");
	}
	if (control) {
		if (argc != optind)
			return tool_usage_error("--control takes no IMAGE");
		return take_served(control, to, target, incremental, &hooks,
				   json, want_bar);
	}
	if (argc - optind != 1)
		return tool_usage_error("expected IMAGE (or --control PATH)");
	return take_local(argv[optind], fmt, to, target, incremental, &hooks,
			  json, want_bar);
}
