/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * bmirror replica: the replica's side of replication (docs/replication.md).
 * `replica serve DIR` runs the server primaries replicate to
 * (blockmirror_replica_server_start) until SIGINT or SIGTERM; the other
 * commands are the operator's, over its control socket (DIR/control.sock
 * unless --control says otherwise): the recovery points, read-only
 * exports of them, test failovers, and an unplanned promotion.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <unistd.h>

#include "bmirror.h"
#include "control.h"

static void
help_replica(void)
{
	printf("Usage: bmirror replica serve DIR --listen ADDRESS [--tls-psk FILE]\n"
	       "           [--nbd-host HOST] [--control PATH] [--keep N [--every SECONDS]]\n"
	       "           [--create (--size SIZE | --base IMAGE) [--granularity SIZE]]\n"
	       "           [--json]\n"
	       "       bmirror replica points DIR [--control PATH] [--json]\n"
	       "       bmirror replica status DIR [--control PATH] [--json]\n"
	       "       bmirror replica export DIR --point N     (0: the latest)\n"
	       "       bmirror replica unexport DIR --point N\n"
	       "       bmirror replica test-failover DIR --point N\n"
	       "       bmirror replica test-discard DIR --point N\n"
	       "       bmirror replica promote DIR [--point N]\n"
	       "       bmirror replica unpair DIR\n\n"
	       "serve keeps the recovery points of a disk in DIR for primaries "
	       "that replicate\nto ADDRESS (tcp:HOST:PORT, TLS with --tls-psk; or "
	       "unix:PATH).  --create makes\nDIR a replica of a new, empty disk of "
	       "SIZE, or of IMAGE (a seed copy, or the\nold primary's disk after a "
	       "failover).  --keep N [--every S] keeps N older points,\none per S "
	       "seconds (default 0: the newest N), beside the latest.\n\n"
	       "export serves a point read-only over NBD; test-failover serves a "
	       "writable\noverlay of it while replication goes on (discarded by "
	       "test-discard); promote\nmakes the point the disk (every point is "
	       "dropped) and this side a primary:\nserve DIR's image with bmirror "
	       "serve --track.\n");
}

static const char *const event_names[] = {
	[BLOCKMIRROR_REPLICA_PAIRED] = "PAIRED",
	[BLOCKMIRROR_REPLICA_CYCLE_BEGUN] = "CYCLE_BEGUN",
	[BLOCKMIRROR_REPLICA_POINT_COMMITTED] = "POINT_COMMITTED",
	[BLOCKMIRROR_REPLICA_CYCLE_ABORTED] = "CYCLE_ABORTED",
	[BLOCKMIRROR_REPLICA_REFUSED] = "REFUSED",
	[BLOCKMIRROR_REPLICA_PROMOTED] = "PROMOTED",
};

static bool json_events;

static void
on_event(void *data, enum blockmirror_replica_event_type type,
	 const struct blockmirror_replication_event *ev)
{
	const char *name = (unsigned)type < sizeof event_names /
		sizeof event_names[0] && event_names[type] ?
		event_names[type] : "UNKNOWN";
	json_t *j;
	char *s;

	if (!json_events) {
		fprintf(stderr, "bmirror replica: %s point %" PRIu64
			"%s%s\n", name, ev->point, ev->message ? ": " : "",
			ev->message ? ev->message : "");
		return;
	}
	j = json_pack("{s:s, s:I, s:I}", "event", name,
		      "point", (json_int_t)ev->point,
		      "bytes", (json_int_t)ev->bytes);
	if (j && ev->err)
		json_object_set_new(j, "errno", json_integer(ev->err));
	if (j && ev->message)
		json_object_set_new(j, "message", json_string(ev->message));
	s = j ? json_dumps(j, JSON_COMPACT) : NULL;
	if (s) {
		/* One write per line: events come from several threads. */
		size_t n = strlen(s);

		s[n] = '\n';
		if (write(STDOUT_FILENO, s, n + 1) < 0) {
			/* stdout gone: nothing to tell */
		}
		s[n] = '\0';
	}
	free(s);
	json_decref(j);
}

static int
replica_serve(int argc, char **argv)
{
	enum { OPT_LISTEN = 256, OPT_PSK, OPT_NBD_HOST, OPT_CONTROL, OPT_KEEP,
	       OPT_EVERY, OPT_CREATE, OPT_SIZE, OPT_BASE, OPT_GRAN, OPT_JSON,
	       OPT_HELP };
	static const struct option longopts[] = {
		{ "listen", required_argument, NULL, OPT_LISTEN },
		{ "tls-psk", required_argument, NULL, OPT_PSK },
		{ "nbd-host", required_argument, NULL, OPT_NBD_HOST },
		{ "control", required_argument, NULL, OPT_CONTROL },
		{ "keep", required_argument, NULL, OPT_KEEP },
		{ "every", required_argument, NULL, OPT_EVERY },
		{ "create", no_argument, NULL, OPT_CREATE },
		{ "size", required_argument, NULL, OPT_SIZE },
		{ "base", required_argument, NULL, OPT_BASE },
		{ "granularity", required_argument, NULL, OPT_GRAN },
		{ "json", no_argument, NULL, OPT_JSON },
		{ "help", no_argument, NULL, OPT_HELP },
		{ NULL, 0, NULL, 0 },
	};
	struct blockmirror_replica_server_options o = { .size = sizeof o };
	struct blockmirror_replica_server *s;
	uint64_t v;
	sigset_t set;
	int c, sig;

	opterr = 0;
	while ((c = getopt_long(argc, argv, ":h", longopts, NULL)) != -1) {
		switch (c) {
		case OPT_LISTEN: o.listen = optarg; break;
		case OPT_PSK: o.tls_psk_file = optarg; break;
		case OPT_NBD_HOST: o.nbd_host = optarg; break;
		case OPT_CONTROL: o.control = optarg; break;
		case OPT_CREATE: o.create = true; break;
		case OPT_BASE: o.base = optarg; break;
		case OPT_JSON: json_events = true; break;
		case OPT_KEEP:
			if (!parse_uint(optarg, 16, &v) && strcmp(optarg, "0"))
				return tool_usage_error("--keep needs a number "
					"of points up to 16: \"%s\"", optarg);
			o.keep = strcmp(optarg, "0") ? (unsigned)v : 0;
			o.set_policy = true;
			break;
		case OPT_EVERY:
			if (strcmp(optarg, "0") &&
			    !parse_uint(optarg, 366 * 86400, &v))
				return tool_usage_error("--every needs a number "
					"of seconds: \"%s\"", optarg);
			o.every_s = strcmp(optarg, "0") ? (uint32_t)v : 0;
			o.set_policy = true;
			break;
		case OPT_SIZE:
		case OPT_GRAN:
			if (parse_size(optarg, &v) < 0 || !v ||
			    (c == OPT_GRAN && v > UINT32_MAX))
				return tool_usage_error("--%s needs a size: "
					"\"%s\"", c == OPT_SIZE ? "size" :
					"granularity", optarg);
			if (c == OPT_SIZE)
				o.disk_size = v;
			else
				o.granularity = (uint32_t)v;
			break;
		case 'h':
		case OPT_HELP:
			help_replica();
			return EXIT_OK;
		default:
			return tool_bad_option(c, argc, argv);
		}
	}
	if (argc != optind + 1)
		return tool_usage_error("replica serve needs DIR");
	o.dir = argv[optind];
	if (!o.listen)
		return tool_usage_error("replica serve needs --listen ADDRESS "
					"(tcp:HOST:PORT or unix:PATH)");
	if (!strncmp(o.listen, "tcp:", 4) && !o.tls_psk_file)
		return tool_usage_error("a TCP listener needs --tls-psk FILE");
	if (o.create && !!o.disk_size == !!o.base)
		return tool_usage_error("--create needs one of --size SIZE and "
					"--base IMAGE");
	if (!o.create && (o.disk_size || o.base || o.granularity))
		return tool_usage_error("--size, --base and --granularity go "
					"with --create");
	o.on_event = on_event;

	/* Signals are taken by sigwait below, in this thread only. */
	sigemptyset(&set);
	sigaddset(&set, SIGINT);
	sigaddset(&set, SIGTERM);
	pthread_sigmask(SIG_BLOCK, &set, NULL);
	signal(SIGPIPE, SIG_IGN);
	if (blockmirror_replica_server_start(&o, &s) < 0) {
		tool_lib_error();
		return EXIT_FAILED;
	}
	if (json_events) {
		json_t *j = json_pack("{s:s, s:s, s:s}", "event", "LISTENING",
				      "address",
				      blockmirror_replica_server_address(s),
				      "dir", o.dir);
		char *t = json_dumps(j, JSON_COMPACT);

		printf("%s\n", t);
		fflush(stdout);
		free(t);
		json_decref(j);
	} else {
		fprintf(stderr, "bmirror replica: serving %s on %s\n", o.dir,
			blockmirror_replica_server_address(s));
	}
	sigwait(&set, &sig);
	blockmirror_replica_server_stop(s);
	return EXIT_OK;
}

static void
print_point(json_t *p)
{
	printf("point %" JSON_INTEGER_FORMAT " instant_ns=%" JSON_INTEGER_FORMAT
	       " bytes=%" JSON_INTEGER_FORMAT "%s%s%s%s %s\n",
	       json_integer_value(json_object_get(p, "point")),
	       json_integer_value(json_object_get(p, "instant_ns")),
	       json_integer_value(json_object_get(p, "bytes")),
	       json_is_true(json_object_get(p, "latest")) ? " latest" : "",
	       json_is_true(json_object_get(p, "retained")) ? " retained" : "",
	       json_is_true(json_object_get(p, "pinned")) ? " pinned" : "",
	       json_is_true(json_object_get(p, "app_consistent")) ?
	       " application-consistent" : "",
	       json_string_value(json_object_get(p, "image")));
}

/* The operator's commands, over the control socket. */
static int
replica_client(const char *sub, int argc, char **argv)
{
	enum { OPT_CONTROL = 256, OPT_POINT, OPT_JSON, OPT_HELP };
	static const struct option longopts[] = {
		{ "control", required_argument, NULL, OPT_CONTROL },
		{ "point", required_argument, NULL, OPT_POINT },
		{ "json", no_argument, NULL, OPT_JSON },
		{ "help", no_argument, NULL, OPT_HELP },
		{ NULL, 0, NULL, 0 },
	};
	static const struct { const char *sub, *op; bool point; } subs[] = {
		{ "points", "points", false },
		{ "status", "status", false },
		{ "export", "export", true },
		{ "unexport", "unexport", true },
		{ "test-failover", "test-failover", true },
		{ "test-discard", "test-discard", true },
		{ "promote", "promote", false },
		{ "unpair", "unpair", false },
	};
	const char *control = NULL, *op = NULL;
	char path[4096];
	uint64_t point = 0;
	bool json = false, has_point = false, need_point = false;
	json_t *req, *reply, *ret, *p;
	size_t i;
	int c;

	for (i = 0; i < sizeof subs / sizeof subs[0]; i++)
		if (strcmp(sub, subs[i].sub) == 0) {
			op = subs[i].op;
			need_point = subs[i].point;
		}
	if (!op)
		return tool_usage_error("unknown replica command \"%s\"", sub);
	opterr = 0;
	while ((c = getopt_long(argc, argv, ":h", longopts, NULL)) != -1) {
		switch (c) {
		case OPT_CONTROL: control = optarg; break;
		case OPT_JSON: json = true; break;
		case OPT_POINT:
			if (!parse_uint(optarg, UINT64_MAX, &point) &&
			    strcmp(optarg, "0"))
				return tool_usage_error("--point needs a point "
					"number: \"%s\"", optarg);
			if (!strcmp(optarg, "0"))
				point = 0;
			has_point = true;
			break;
		case 'h':
		case OPT_HELP:
			help_replica();
			return EXIT_OK;
		default:
			return tool_bad_option(c, argc, argv);
		}
	}
	if (!control && argc == optind + 1) {
		snprintf(path, sizeof path, "%s/control.sock", argv[optind]);
		control = path;
	} else if (!control || argc != optind) {
		return tool_usage_error("replica %s needs DIR or --control PATH",
					sub);
	}
	if (need_point && !has_point)
		return tool_usage_error("replica %s needs --point N", sub);
	req = json_pack("{s:s}", "op", op);
	if (has_point)
		json_object_set_new(req, "point", json_integer(
					    (json_int_t)point));
	reply = client_call(control, req);
	if (!reply)
		return EXIT_FAILED;
	ret = json_object_get(reply, "return");
	if (json) {
		json_print(json_incref(ret));
	} else if (strcmp(op, "points") == 0) {
		json_array_foreach(json_object_get(ret, "points"), i, p)
			print_point(p);
	} else if (strcmp(op, "export") == 0 ||
		   strcmp(op, "test-failover") == 0) {
		printf("point %" JSON_INTEGER_FORMAT ": %s export %s\n",
		       json_integer_value(json_object_get(ret, "point")),
		       json_string_value(json_object_get(ret, "nbd")),
		       json_string_value(json_object_get(ret, "export")));
	} else if (strcmp(op, "promote") == 0) {
		printf("promoted at point %" JSON_INTEGER_FORMAT ": the disk is "
		       "%s (generation %s); %" JSON_INTEGER_FORMAT " bytes of "
		       "newer points discarded\n",
		       json_integer_value(json_object_get(ret, "point")),
		       json_string_value(json_object_get(ret, "image")),
		       json_string_value(json_object_get(ret, "gen")),
		       json_integer_value(json_object_get(ret,
							  "discarded_bytes")));
	} else if (strcmp(op, "status") == 0) {
		json_print(json_incref(ret));
	}
	json_decref(reply);
	return EXIT_OK;
}

int
cmd_replica(int argc, char **argv)
{
	if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
		help_replica();
		return argc < 2 ? EXIT_USAGE : EXIT_OK;
	}
	if (strcmp(argv[1], "serve") == 0)
		return replica_serve(argc - 1, argv + 1);
	return replica_client(argv[1], argc - 1, argv + 1);
}
