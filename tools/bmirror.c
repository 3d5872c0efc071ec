/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * bmirror: the command line of blockmirror.  This file dispatches to the
 * subcommands (cmd-*.c); each parses its own options and runs one library
 * call.  Exit status: 0 done, 1 failed (one line on stderr), 2 bad usage.
 */
#include <stdio.h>
#include <string.h>

#include "bmirror.h"
#include "rebalance.h"

static const struct {
	const char *name;
	int (*fn)(int argc, char **argv);
	const char *summary;
} commands[] = {
	{ "copy", cmd_copy, "copy an image offline, keeping it sparse" },
	{ "create", cmd_create, "create a new image" },
	{ "info", cmd_info, "show an image's format and sizes" },
	{ "verify", cmd_verify, "compare two images' guest data (XXH3)" },
	{ "serve", cmd_serve, "export a disk over NBD, with a control socket" },
	{ "move", cmd_move, "move a served disk live to new storage" },
	{ "status", cmd_client, "show a served disk and its move" },
	{ "cancel", cmd_client, "cancel a move (--force: at once)" },
	{ "pause", cmd_client, "pause a move's bulk copy" },
	{ "resume", cmd_client, "resume a paused move" },
	{ "complete", cmd_client, "pivot a move started with --no-pivot" },
	{ "rebalance", cmd_rebalance, "move many disks between pools (a plan)" },
};

static void
usage(FILE *f)
{
	fprintf(f, "Usage: bmirror COMMAND [OPTIONS] ...\n\nCommands:\n");
	for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
		fprintf(f, "  %-9s %s\n", commands[i].name,
			commands[i].summary);
	fprintf(f, "\n'bmirror COMMAND --help' describes a command.\n");
}

int
main(int argc, char **argv)
{
	if (argc < 2) {
		usage(stderr);
		return EXIT_USAGE;
	}
	if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
		usage(stdout);
		return EXIT_OK;
	}
	if (strcmp(argv[1], "--version") == 0) {
		printf("bmirror %s\n", blockmirror_version());
		return EXIT_OK;
	}
	for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++) {
		static char cmdname[64];

		if (strcmp(argv[1], commands[i].name) != 0)
			continue;
		snprintf(cmdname, sizeof cmdname, "bmirror %s",
			 commands[i].name);
		bm_cmd = cmdname;
		return commands[i].fn(argc - 1, argv + 1);
	}
	return tool_usage_error("unknown command '%s'", argv[1]);
}
