/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * bmirror checkpoint: list, create and remove the checkpoints of a disk
 * served with `bmirror serve --track`, through its control socket
 * (docs/control.md, docs/cbt.md).  A checkpoint marks the instant an
 * incremental backup counts changes from (bmirror snapshot --since).
 */
#include <getopt.h>
#include <stdio.h>
#include <string.h>

#include "bmirror.h"
#include "control.h"

static void
help_checkpoint(void)
{
	printf("Usage: bmirror checkpoint --control PATH --list [--json]\n"
	       "       bmirror checkpoint --control PATH --create NAME "
	       "[--json]\n"
	       "       bmirror checkpoint --control PATH --remove NAME "
	       "[--json]\n\n"
	       "List, create or remove the checkpoints of a disk served with "
	       "bmirror serve\n--track.  A name is 1 to 64 of A-Z a-z 0-9 . _ "
	       "-.  Removing a checkpoint\nmerges what changed since it into "
	       "the one before.  Each prints the list\nafterwards: where the "
	       "record is (\"# record: image|sidecar PATH\"), then\nname, "
	       "id, creation time, bytes changed since, trusted or why not.\n");
}

static void
print_checkpoint(json_t *cp)
{
	const char *reason = json_string_value(json_object_get(cp, "reason"));

	printf("%s id=%" JSON_INTEGER_FORMAT " created=%" JSON_INTEGER_FORMAT
	       " changed=%" JSON_INTEGER_FORMAT " %s%s%s\n",
	       json_string_value(json_object_get(cp, "name")),
	       json_integer_value(json_object_get(cp, "id")),
	       json_integer_value(json_object_get(cp, "created")),
	       json_integer_value(json_object_get(cp, "changed_bytes")),
	       json_is_true(json_object_get(cp, "trusted")) ? "trusted"
							     : "untrusted",
	       reason ? " " : "", reason ? reason : "");
}

int
cmd_checkpoint(int argc, char **argv)
{
	enum { OPT_CONTROL = 256, OPT_LIST, OPT_CREATE, OPT_REMOVE, OPT_JSON,
	       OPT_HELP };
	static const struct option longopts[] = {
		{ "control", required_argument, NULL, OPT_CONTROL },
		{ "list", no_argument, NULL, OPT_LIST },
		{ "create", required_argument, NULL, OPT_CREATE },
		{ "remove", required_argument, NULL, OPT_REMOVE },
		{ "json", no_argument, NULL, OPT_JSON },
		{ "help", no_argument, NULL, OPT_HELP },
		{ NULL, 0, NULL, 0 },
	};
	const char *control = NULL, *what = NULL, *name = NULL;
	bool json = false;
	json_t *reply, *list, *cp, *track;
	size_t i;
	int c, n = 0;

	opterr = 0;
	while ((c = getopt_long(argc, argv, ":h", longopts, NULL)) != -1) {
		switch (c) {
		case OPT_CONTROL:
			control = optarg;
			break;
		case OPT_LIST:
			what = "checkpoints";
			n++;
			break;
		case OPT_CREATE:
		case OPT_REMOVE:
			if (!*optarg)
				return tool_usage_error("--%s needs a "
					"checkpoint name", c == OPT_CREATE ?
					"create" : "remove");
			what = c == OPT_CREATE ? "checkpoint-create"
					       : "checkpoint-remove";
			name = optarg;
			n++;
			break;
		case OPT_JSON:
			json = true;
			break;
		case 'h':
		case OPT_HELP:
			help_checkpoint();
			return EXIT_OK;
		default:
			return tool_bad_option(c, argc, argv);
		}
	}
	if (!control || argc != optind)
		return tool_usage_error("checkpoint needs --control PATH");
	if (n != 1)
		return tool_usage_error("give one of --list, --create NAME "
					"and --remove NAME");
	reply = client_call(control, json_pack("{s:s, s:s?}", "cmd", what,
					       "name", name));
	if (!reply)
		return EXIT_FAILED;
	list = json_object_get(json_object_get(reply, "return"),
			       "checkpoints");
	track = json_object_get(json_object_get(reply, "return"), "tracking");
	if (json) {
		json_print(json_pack("{s:O, s:O?}", "checkpoints", list,
				     "tracking", track));
	} else {
		const char *rec = json_string_value(json_object_get(track,
								    "record"));

		if (rec)
			printf("# record: %s %s\n", rec, json_string_value(
			       json_object_get(track, "path")));
		json_array_foreach(list, i, cp)
			print_checkpoint(cp);
	}
	json_decref(reply);
	return EXIT_OK;
}
