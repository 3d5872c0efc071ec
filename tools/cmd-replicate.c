/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * bmirror replicate: replicate a disk served by `bmirror serve --track` to
 * a replica (`bmirror replica serve`), through the server's control socket
 * (docs/replication.md): start it, see how it goes, run a cycle now, fail
 * over to the replica (planned), stop it.
 */
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "bmirror.h"
#include "control.h"

static void
help_replicate(void)
{
	printf("Usage: bmirror replicate --control PATH --to ADDRESS [--tls-psk FILE]\n"
	       "           [--tls-identity ID] [--interval SECONDS] [--rpo SECONDS]\n"
	       "           [--state FILE] [--resync] [--discard-divergent] [--json]\n"
	       "           [--freeze-cmd CMD [--thaw-cmd CMD] [--app-every SECONDS]\n"
	       "            [--freeze-timeout SECONDS]]\n"
	       "       bmirror replicate status --control PATH [--json]\n"
	       "       bmirror replicate sync --control PATH [--timeout SECONDS] [--json]\n"
	       "       bmirror replicate verify --control PATH [--timeout SECONDS] [--json]\n"
	       "       bmirror replicate failover --control PATH [--timeout SECONDS] [--json]\n"
	       "       bmirror replicate stop --control PATH\n\n"
	       "Replicate the disk served at the control socket PATH (bmirror serve "
	       "--track)\nto the replica at ADDRESS (tcp:HOST:PORT with --tls-psk, or "
	       "unix:PATH):\nevery interval (default 5 s, at least 1 s) the blocks "
	       "written since the last\ncommitted point are sent and committed as a "
	       "new recovery point.\n\n"
	       "  --resync             the replica holds another disk's data or a "
	       "seed copy:\n"
	       "                       compare digests and send only what differs\n"
	       "  --discard-divergent  after a split brain, overwrite what the "
	       "replica's disk\n"
	       "                       holds that this one does not\n"
	       "  --freeze-cmd CMD     run by the server right before a point's "
	       "instant (for\n"
	       "                       example virsh domfsfreeze): the point is "
	       "application-\n"
	       "                       consistent if it exits 0 within "
	       "--freeze-timeout (10 s);\n"
	       "                       --thaw-cmd right after; every point, or "
	       "one per\n"
	       "                       --app-every seconds\n"
	       "  status               state, last committed point and its age (the "
	       "RPO), bytes\n"
	       "                       behind, throughput, errors\n"
	       "  sync                 a cycle now; waits for its point\n"
	       "  verify               compare the replica's latest point with "
	       "the disk by\n"
	       "                       digests; what differs is sent again\n"
	       "  failover             planned failover: the disk takes no more "
	       "writes, a last\n"
	       "                       cycle sends everything, the replica becomes "
	       "the primary\n");
}

static void
print_status(json_t *st)
{
	const char *err = json_string_value(json_object_get(st, "last_error"));

	printf("replica %s: %s, point %" JSON_INTEGER_FORMAT
	       ", rpo %.1f s%s, %" JSON_INTEGER_FORMAT " bytes behind, "
	       "%" JSON_INTEGER_FORMAT " cycles (%" JSON_INTEGER_FORMAT
	       " failed), %" JSON_INTEGER_FORMAT " bytes sent\n",
	       json_string_value(json_object_get(st, "replica")),
	       json_string_value(json_object_get(st, "state")),
	       json_integer_value(json_object_get(st, "point")),
	       json_integer_value(json_object_get(st, "rpo_ms")) / 1000.0,
	       json_is_true(json_object_get(st, "rpo_missed")) ?
	       " (target missed)" : "",
	       json_integer_value(json_object_get(st, "bytes_behind")),
	       json_integer_value(json_object_get(st, "cycles")),
	       json_integer_value(json_object_get(st, "cycles_failed")),
	       json_integer_value(json_object_get(st, "bytes_sent")));
	if (err && *err)
		printf("last error: %s\n", err);
}

static bool
parse_seconds(const char *s, uint64_t *ms)
{
	char *end;
	double v = strtod(s, &end);

	if (end == s || *end || !(v > 0) || v > 86400)
		return false;
	*ms = (uint64_t)(v * 1000 + 0.5);
	return true;
}

int
cmd_replicate(int argc, char **argv)
{
	enum { OPT_CONTROL = 256, OPT_TO, OPT_PSK, OPT_ID, OPT_INTERVAL,
	       OPT_RPO, OPT_STATE, OPT_RESYNC, OPT_DISCARD, OPT_TIMEOUT,
	       OPT_FREEZE, OPT_THAW, OPT_APP_EVERY, OPT_FREEZE_TIMEOUT,
	       OPT_JSON, OPT_HELP };
	static const struct option longopts[] = {
		{ "control", required_argument, NULL, OPT_CONTROL },
		{ "to", required_argument, NULL, OPT_TO },
		{ "tls-psk", required_argument, NULL, OPT_PSK },
		{ "tls-identity", required_argument, NULL, OPT_ID },
		{ "interval", required_argument, NULL, OPT_INTERVAL },
		{ "rpo", required_argument, NULL, OPT_RPO },
		{ "state", required_argument, NULL, OPT_STATE },
		{ "resync", no_argument, NULL, OPT_RESYNC },
		{ "discard-divergent", no_argument, NULL, OPT_DISCARD },
		{ "timeout", required_argument, NULL, OPT_TIMEOUT },
		{ "freeze-cmd", required_argument, NULL, OPT_FREEZE },
		{ "thaw-cmd", required_argument, NULL, OPT_THAW },
		{ "app-every", required_argument, NULL, OPT_APP_EVERY },
		{ "freeze-timeout", required_argument, NULL, OPT_FREEZE_TIMEOUT },
		{ "json", no_argument, NULL, OPT_JSON },
		{ "help", no_argument, NULL, OPT_HELP },
		{ NULL, 0, NULL, 0 },
	};
	const char *control = NULL, *to = NULL, *psk = NULL, *id = NULL;
	const char *state = NULL, *sub = "start", *fz = NULL, *th = NULL;
	uint64_t interval = 0, rpo = 0, timeout = 0, app_every = 0;
	uint64_t freeze_timeout = 0;
	bool resync = false, discard = false, json = false;
	char psk_abs[4096];
	json_t *req, *reply, *ret;
	int c;

	if (argc > 1 && argv[1][0] != '-') {
		sub = argv[1];
		argc--;
		argv++;
	}
	opterr = 0;
	while ((c = getopt_long(argc, argv, ":h", longopts, NULL)) != -1) {
		switch (c) {
		case OPT_CONTROL: control = optarg; break;
		case OPT_TO: to = optarg; break;
		case OPT_PSK: psk = optarg; break;
		case OPT_ID: id = optarg; break;
		case OPT_STATE: state = optarg; break;
		case OPT_RESYNC: resync = true; break;
		case OPT_DISCARD: discard = true; break;
		case OPT_JSON: json = true; break;
		case OPT_FREEZE: fz = optarg; break;
		case OPT_THAW: th = optarg; break;
		case OPT_APP_EVERY:
		case OPT_FREEZE_TIMEOUT:
			if (!parse_uint(optarg, c == OPT_APP_EVERY ?
					366 * 86400 : 3600,
					c == OPT_APP_EVERY ? &app_every :
					&freeze_timeout))
				return tool_usage_error("--%s needs a number "
					"of seconds: \"%s\"",
					c == OPT_APP_EVERY ? "app-every" :
					"freeze-timeout", optarg);
			break;
		case OPT_INTERVAL:
		case OPT_RPO:
		case OPT_TIMEOUT:
			if (!parse_seconds(optarg, c == OPT_INTERVAL ? &interval
					   : c == OPT_RPO ? &rpo : &timeout))
				return tool_usage_error("--%s needs a number of "
					"seconds, up to a day: \"%s\"",
					c == OPT_INTERVAL ? "interval" :
					c == OPT_RPO ? "rpo" : "timeout",
					optarg);
			break;
		case 'h':
		case OPT_HELP:
			help_replicate();
			return EXIT_OK;
		default:
			return tool_bad_option(c, argc, argv);
		}
	}
	if (!control || argc != optind)
		return tool_usage_error("replicate needs --control PATH (and "
					"nothing else that is not an option)");
	if (strcmp(sub, "start") == 0) {
		if (!to)
			return tool_usage_error("replicate needs --to ADDRESS "
						"(tcp:HOST:PORT or unix:PATH)");
		if (strncmp(to, "tcp:", 4) && strncmp(to, "unix:", 5))
			return tool_usage_error("--to must be tcp:HOST:PORT or "
						"unix:PATH, not \"%s\"", to);
		if (!strncmp(to, "tcp:", 4) && !psk)
			return tool_usage_error("a TCP replica needs --tls-psk "
						"FILE");
		if (interval && interval < 1000)
			return tool_usage_error("--interval is at least 1 s");
		if ((app_every || th || freeze_timeout) && !fz)
			return tool_usage_error("--app-every, --thaw-cmd and "
						"--freeze-timeout go with "
						"--freeze-cmd");
		/* The server opens the key file: give it a whole path. */
		if (psk && !realpath(psk, psk_abs)) {
			tool_error("--tls-psk %s: %m", psk);
			return EXIT_FAILED;
		}
		req = json_pack("{s:s, s:s, s:s?, s:s?, s:s?, s:I, s:I, s:b, "
				"s:b}", "cmd", "replicate", "to", to,
				"tls_psk", psk ? psk_abs : NULL,
				"tls_identity", id, "state", state,
				"interval_ms", (json_int_t)interval,
				"rpo_ms", (json_int_t)rpo, "resync", resync,
				"discard_divergent", discard);
		if (fz)
			json_object_update_new(req, json_pack(
				"{s:s, s:s?, s:I, s:I}", "freeze_cmd", fz,
				"thaw_cmd", th, "app_every_s",
				(json_int_t)app_every, "freeze_timeout_s",
				(json_int_t)freeze_timeout));
	} else if (strcmp(sub, "status") == 0 || strcmp(sub, "stop") == 0) {
		req = json_pack("{s:s}", "cmd", strcmp(sub, "stop") ?
				"replicate-status" : "replicate-stop");
	} else if (strcmp(sub, "sync") == 0 || strcmp(sub, "failover") == 0 ||
		   strcmp(sub, "verify") == 0) {
		req = json_pack("{s:s, s:I}", "cmd",
				!strcmp(sub, "sync") ? "replicate-sync" :
				!strcmp(sub, "verify") ? "replicate-verify" :
				"replicate-failover",
				"timeout_ms", (json_int_t)timeout);
		if (!timeout)
			json_object_del(req, "timeout_ms");
	} else {
		return tool_usage_error("unknown replicate command \"%s\" "
					"(status, sync, verify, failover, "
					"stop)", sub);
	}
	reply = client_call(control, req);
	if (!reply)
		return EXIT_FAILED;
	ret = json_object_get(reply, "return");
	if (json)
		json_print(json_incref(ret));
	else if (strcmp(sub, "start") == 0 || strcmp(sub, "status") == 0)
		print_status(ret);
	else if (strcmp(sub, "sync") == 0)
		printf("point %" JSON_INTEGER_FORMAT " committed\n",
		       json_integer_value(json_object_get(ret, "point")));
	else if (strcmp(sub, "verify") == 0)
		printf("point %" JSON_INTEGER_FORMAT ": %" JSON_INTEGER_FORMAT
		       " granules compared, %" JSON_INTEGER_FORMAT " written "
		       "since, %" JSON_INTEGER_FORMAT " differ%s\n",
		       json_integer_value(json_object_get(ret, "point")),
		       json_integer_value(json_object_get(ret, "granules")),
		       json_integer_value(json_object_get(ret, "skipped")),
		       json_integer_value(json_object_get(ret, "mismatches")),
		       json_integer_value(json_object_get(ret, "mismatches")) ?
		       " (the next cycle sends them again)" : "");
	else if (strcmp(sub, "failover") == 0)
		printf("failed over: the replica is the primary at point %"
		       JSON_INTEGER_FORMAT "; this disk takes no more writes\n",
		       json_integer_value(json_object_get(ret, "point")));
	json_decref(reply);
	return EXIT_OK;
}
