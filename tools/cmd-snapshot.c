/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * bmirror snapshot: take, list and release snapshots of a served disk
 * through the control socket of `bmirror serve` (docs/control.md).  The
 * server exports each snapshot read-only over NBD; this prints the
 * export's name and URI for NBD clients (qemu-img, nbdcopy, a backup).
 *
 * With several --control sockets the disks of those servers are taken at
 * one instant (a consistency group: snapshot-group.c).  --export,
 * --scratch, --since and --checkpoint are then each for the --control
 * before them; the other options are for every disk.
 */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "bmirror.h"
#include "control.h"
#include "size.h"
#include "snapshot-group.h"

#define MAX_GROUP 16 /* servers in one group */

static void
help_snapshot(void)
{
	printf("Usage: bmirror snapshot --control PATH [--export NAME] "
	       "[--scratch PATH|URI]\n"
	       "         [--scratch-dir DIR] [--timeout-ms N] "
	       "[--max-scratch SIZE]\n"
	       "         [--granularity SIZE] [--since CHECKPOINT] "
	       "[--checkpoint NAME] [--json]\n"
	       "       bmirror snapshot --control PATH [--export NAME]... "
	       "--control PATH [...]\n"
	       "         [--lease-ms N] [--answer-ms N] [--group NAME] [other options]\n"
	       "       bmirror snapshot --control PATH --release NAME\n"
	       "       bmirror snapshot --control PATH --list [--json]\n\n"
	       "Take a snapshot of the served disk and export it read-only "
	       "over NBD\n(default name snap-N); print the export's name and "
	       "URI.  --release\nends a snapshot (its NBD clients are "
	       "disconnected); --list shows them.\n"
	       "With bmirror serve --track: --since also exports what changed "
	       "since that\ncheckpoint as the NBD meta context "
	       "qemu:dirty-bitmap:CHECKPOINT, and\n--checkpoint creates a "
	       "checkpoint at the snapshot's instant (docs/cbt.md).\n"
	       "With several --control, the disks of those servers are "
	       "taken at one instant\n(a consistency group): each server "
	       "holds its guest's writes until all\nhold, for at most "
	       "--lease-ms (default 1000), then takes its snapshot; each has "
	       "--answer-ms\n(default 10000) to answer a take, a commit or an "
	       "abort.\n"
	       "--export, --scratch, --since and --checkpoint are for the "
	       "--control before\nthem.  A failure anywhere leaves no "
	       "snapshot of the group.\n");
}

static void
print_snapshot(json_t *s)
{
	const char *reason = json_string_value(json_object_get(s, "reason"));

	printf("%s %s %s saved=%" JSON_INTEGER_FORMAT " cbw=%"
	       JSON_INTEGER_FORMAT " cbw_max_us=%" JSON_INTEGER_FORMAT "%s%s\n",
	       json_string_value(json_object_get(s, "export")),
	       json_string_value(json_object_get(s, "uri")) ?
	       json_string_value(json_object_get(s, "uri")) : "-",
	       json_string_value(json_object_get(s, "state")),
	       json_integer_value(json_object_get(s, "bytes_saved")),
	       json_integer_value(json_object_get(s, "cbw_count")),
	       json_integer_value(json_object_get(s, "cbw_max_us")),
	       reason ? " " : "", reason ? reason : "");
}

/* The per-disk options given so far go to the --control before them (or,
 * before any, to `pre`). */
static json_t *
disk_target(json_t **disks, size_t n, json_t *pre)
{
	return n ? disks[n - 1] : pre;
}

int
cmd_snapshot(int argc, char **argv)
{
	enum {
		OPT_CONTROL = 256, OPT_EXPORT, OPT_SCRATCH, OPT_SCRATCH_DIR,
		OPT_TIMEOUT, OPT_MAX_SCRATCH, OPT_GRANULARITY, OPT_RELEASE,
		OPT_LIST, OPT_JSON, OPT_HELP, OPT_SINCE, OPT_CHECKPOINT,
		OPT_LEASE, OPT_ANSWER, OPT_GROUP,
	};
	static const struct option longopts[] = {
		{ "control", required_argument, NULL, OPT_CONTROL },
		{ "export", required_argument, NULL, OPT_EXPORT },
		{ "scratch", required_argument, NULL, OPT_SCRATCH },
		{ "scratch-dir", required_argument, NULL, OPT_SCRATCH_DIR },
		{ "timeout-ms", required_argument, NULL, OPT_TIMEOUT },
		{ "max-scratch", required_argument, NULL, OPT_MAX_SCRATCH },
		{ "granularity", required_argument, NULL, OPT_GRANULARITY },
		{ "release", required_argument, NULL, OPT_RELEASE },
		{ "list", no_argument, NULL, OPT_LIST },
		{ "json", no_argument, NULL, OPT_JSON },
		{ "help", no_argument, NULL, OPT_HELP },
		{ "since", required_argument, NULL, OPT_SINCE },
		{ "checkpoint", required_argument, NULL, OPT_CHECKPOINT },
		{ "lease-ms", required_argument, NULL, OPT_LEASE },
		{ "answer-ms", required_argument, NULL, OPT_ANSWER },
		{ "group", required_argument, NULL, OPT_GROUP },
		{ NULL, 0, NULL, 0 },
	};
	const char *controls[MAX_GROUP], *release = NULL, *group = NULL;
	json_t *disks[MAX_GROUP], *pre;
	size_t n = 0;
	bool json = false, list = false, take_opts = false;
	json_t *cmd, *reply, *ret;
	uint64_t v, lease_ms = 0, answer_ms = 0;
	int c, status;

	cmd = json_object();
	pre = json_object();
	if (!cmd || !pre) {
		json_decref(cmd);
		json_decref(pre);
		tool_error("out of memory");
		return EXIT_FAILED;
	}
	opterr = 0;
	while ((c = getopt_long(argc, argv, ":h", longopts, NULL)) != -1) {
		switch (c) {
		case OPT_CONTROL:
			if (n == MAX_GROUP) {
				status = tool_usage_error("at most %d --control "
							  "in a group",
							  MAX_GROUP);
				goto done;
			}
			disks[n] = json_object();
			if (!disks[n]) {
				tool_error("out of memory");
				status = EXIT_FAILED;
				goto done;
			}
			controls[n++] = optarg;
			break;
		case OPT_EXPORT:
			if (!*optarg)
				goto empty;
			json_object_set_new(disk_target(disks, n, pre), "export",
					    json_string(optarg));
			take_opts = true;
			break;
		case OPT_SCRATCH:
		case OPT_SCRATCH_DIR:
			if (!*optarg)
				goto empty;
			json_object_set_new(c == OPT_SCRATCH ?
					    disk_target(disks, n, pre) : cmd,
					    c == OPT_SCRATCH ? "scratch"
							     : "scratch_dir",
					    json_string(optarg));
			/* A path that is not there yet: the server makes it
			 * (and removes it at release). */
			if (c == OPT_SCRATCH && !strstr(optarg, "://") &&
			    access(optarg, F_OK) < 0 && errno == ENOENT)
				json_object_set_new(disk_target(disks, n, pre),
						    "create", json_true());
			take_opts = true;
			break;
		case OPT_TIMEOUT:
			if (!parse_uint(optarg, UINT32_MAX, &v)) {
				status = tool_usage_error("--timeout-ms: '%s' "
							  "is not a number of "
							  "milliseconds from 1",
							  optarg);
				goto done;
			}
			json_object_set_new(cmd, "timeout_ms",
					    json_integer((json_int_t)v));
			take_opts = true;
			break;
		case OPT_LEASE:
			if (!parse_uint(optarg, CONTROL_LEASE_MAX_MS, &v) ||
			    !v) {
				status = tool_usage_error("--lease-ms: '%s' is "
							  "not a number of "
							  "milliseconds from 1 "
							  "to %d", optarg,
							  CONTROL_LEASE_MAX_MS);
				goto done;
			}
			lease_ms = v;
			break;
		case OPT_ANSWER:
			if (!parse_uint(optarg, 600000, &v) || !v) {
				status = tool_usage_error("--answer-ms: '%s' is "
							  "not a number of "
							  "milliseconds from 1 "
							  "to 600000", optarg);
				goto done;
			}
			answer_ms = v;
			break;
		case OPT_GROUP:
			if (!*optarg)
				goto empty;
			group = optarg;
			break;
		case OPT_MAX_SCRATCH:
		case OPT_GRANULARITY:
			if (parse_size(optarg, &v) < 0) {
				status = tool_usage_error("--%s: '%s' is not a "
							  "size",
							  c == OPT_MAX_SCRATCH ?
							  "max-scratch" :
							  "granularity", optarg);
				goto done;
			}
			json_object_set_new(cmd, c == OPT_MAX_SCRATCH ?
					    "max_scratch" : "granularity",
					    json_integer((json_int_t)v));
			take_opts = true;
			break;
		case OPT_RELEASE:
			if (!*optarg)
				goto empty;
			release = optarg;
			break;
		case OPT_SINCE:
		case OPT_CHECKPOINT:
			if (!*optarg)
				goto empty;
			json_object_set_new(disk_target(disks, n, pre),
					    c == OPT_SINCE ? "since"
							   : "checkpoint",
					    json_string(optarg));
			take_opts = true;
			break;
		case OPT_LIST:
			list = true;
			break;
		case OPT_JSON:
			json = true;
			break;
		case 'h':
		case OPT_HELP:
			help_snapshot();
			status = EXIT_OK;
			goto done;
		default:
			status = tool_bad_option(c, argc, argv);
			goto done;
		}
	}
	if (!n || argc != optind) {
		status = tool_usage_error("snapshot needs --control PATH");
		goto done;
	}
	if ((release && list) || ((release || list) && take_opts)) {
		status = tool_usage_error("--release and --list take no other "
					  "snapshot options");
		goto done;
	}
	if (n > 1 && (release || list)) {
		status = tool_usage_error("--release and --list take one "
					  "--control");
		goto done;
	}
	if (n == 1 && (lease_ms || answer_ms || group)) {
		status = tool_usage_error("--lease-ms, --answer-ms and --group "
					  "are for a group: several --control");
		goto done;
	}
	if (n > 1 && json_object_size(pre)) {
		status = tool_usage_error("with several --control, --export, "
					  "--scratch, --since and --checkpoint "
					  "follow the --control they are for");
		goto done;
	}
	if (n > 1) {
		for (size_t i = 0; i < n; i++)
			json_object_update(disks[i], cmd);
		status = snapshot_group(controls, disks, n, group,
					lease_ms ? (uint32_t)lease_ms : 1000,
					answer_ms ? (uint32_t)answer_ms : 10000,
					json);
		goto done;
	}
	json_object_update(cmd, pre);
	json_object_update(cmd, disks[0]);
	if (release) {
		json_object_set_new(cmd, "cmd", json_string("snapshot-release"));
		json_object_set_new(cmd, "export", json_string(release));
	} else {
		json_object_set_new(cmd, "cmd", json_string(list ? "query"
								 : "snapshot"));
	}
	reply = client_call(controls[0], json_incref(cmd));
	status = EXIT_FAILED;
	if (!reply)
		goto done;
	ret = json_object_get(reply, "return");
	if (list && json) {
		json_print(json_pack("{s:O}", "snapshots",
				     json_object_get(ret, "snapshots")));
	} else if (json) {
		json_print(json_incref(ret));
	} else if (list) {
		ret = json_object_get(ret, "snapshots");
		size_t i;
		json_t *s;

		json_array_foreach(ret, i, s)
			print_snapshot(s);
	} else if (!release) {
		printf("%s %s\n",
		       json_string_value(json_object_get(ret, "export")),
		       json_string_value(json_object_get(ret, "uri")));
	}
	json_decref(reply);
	status = EXIT_OK;
	goto done;

empty:
	status = tool_usage_error("--%s needs a non-empty value",
				  longopts[c - OPT_CONTROL].name);
done:
	json_decref(cmd);
	json_decref(pre);
	for (size_t i = 0; i < n; i++)
		json_decref(disks[i]);
	return status;
}
