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
	{ "snapshot", cmd_snapshot, "snapshot a served disk, export it over NBD" },
	{ "backup", cmd_backup, "back up a disk: full and incremental points" },
	{ "checkpoint", cmd_checkpoint, "list, create, remove a served disk's checkpoints" },
	{ "replicate", cmd_replicate, "replicate a served disk to a replica, fail over" },
	{ "replica", cmd_replica, "keep a replica's recovery points; export, promote" },
	{ "rebalance", cmd_rebalance, "move many disks between pools (a plan)" },
};

/*
 * --allow-backing-dir DIR and --allow-backing-devices DIR, taken out of
 * any command's arguments before it parses its own: backing files named
 * inside images may then also come from DIR (lib/backing.c).  0, or an
 * exit status.
 */
static int
take_backing_options(int *argc, char **argv)
{
	int out = 1;

	for (int i = 1; i < *argc; i++) {
		const char *a = argv[i], *dir = NULL;
		unsigned flags = 0;
		size_t n;

		if (strcmp(a, "--") == 0) {
			while (i < *argc)
				argv[out++] = argv[i++];
			break;
		}
		if (strncmp(a, "--allow-backing-devices", 23) == 0) {
			flags = BLOCKMIRROR_BACKING_DEVICES;
			n = 23;
		} else if (strncmp(a, "--allow-backing-dir", 19) == 0) {
			n = 19;
		} else {
			argv[out++] = argv[i];
			continue;
		}
		if (a[n] == '=')
			dir = a + n + 1;
		else if (a[n] == '\0' && i + 1 < *argc)
			dir = argv[++i];
		else if (a[n] != '\0') {
			argv[out++] = argv[i]; /* another option */
			continue;
		}
		if (!dir || !*dir)
			return tool_usage_error("%.*s needs a directory",
						(int)n, a);
		if (blockmirror_allow_backing_dir(dir, flags) < 0) {
			tool_lib_error();
			return EXIT_USAGE;
		}
	}
	argv[out] = NULL;
	*argc = out;
	return 0;
}

static void
usage(FILE *f)
{
	fprintf(f, "Usage: bmirror COMMAND [OPTIONS] ...\n\nCommands:\n");
	for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
		fprintf(f, "  %-9s %s\n", commands[i].name,
			commands[i].summary);
	fprintf(f, "\n'bmirror COMMAND --help' describes a command.  Every "
		"command that opens images\nalso takes --allow-backing-dir DIR "
		"(backing files named inside images may\ncome from DIR, not only "
		"from the image's own directory) and\n"
		"--allow-backing-devices DIR (block devices in DIR too).\n");
}

int
main(int argc, char **argv)
{
	int r;

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
		argc--;
		argv++;
		r = take_backing_options(&argc, argv);
		if (r)
			return r;
		return commands[i].fn(argc, argv);
	}
	return tool_usage_error("unknown command '%s'", argv[1]);
}
