/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Messages, format names and JSON output shared by the subcommands.
 */
#include <getopt.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bmirror.h"

const char *bm_cmd = "bmirror";

void
tool_error(const char *fmt, ...)
{
	va_list ap;

	fprintf(stderr, "%s: ", bm_cmd);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
}

void
tool_lib_error(void)
{
	const char *msg = blockmirror_last_error();
	const char *p;

	if (!msg) {
		tool_error("%s", strerror(blockmirror_last_errno()));
		return;
	}
	/* Drop the "blockmirror_xxx: " prefix: the user ran a command, not
	 * a function. */
	if (strncmp(msg, "blockmirror_", 12) == 0 && (p = strstr(msg, ": ")))
		msg = p + 2;
	tool_error("%s", msg);
}

int
tool_usage_error(const char *fmt, ...)
{
	va_list ap;

	fprintf(stderr, "%s: ", bm_cmd);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fprintf(stderr, " (see '%s --help')\n", bm_cmd);
	return EXIT_USAGE;
}

int
tool_bad_option(int c, int argc, char **argv)
{
	const char *arg = optind > 0 && optind <= argc ? argv[optind - 1] : "";

	if (c == ':') {
		if (optopt > 0 && optopt < 256)
			return tool_usage_error("option '-%c' needs a value",
						optopt);
		return tool_usage_error("option '%s' needs a value", arg);
	}
	if (optopt > 0 && optopt < 256)
		return tool_usage_error("unknown option '-%c'", optopt);
	return tool_usage_error("unknown option '%s'", arg);
}

bool
parse_format(const char *s, enum blockmirror_format *out)
{
	int f = blockmirror_format_from_name(s);

	if (f < 0 || f == BLOCKMIRROR_FORMAT_AUTO) {
		tool_usage_error("unknown format '%s' (use raw, qcow2 or vhdx)",
				 s);
		return false;
	}
	*out = (enum blockmirror_format)f;
	return true;
}

void
json_print(json_t *obj)
{
	char *s = json_dumps(obj, JSON_COMPACT | JSON_PRESERVE_ORDER);

	if (s) {
		puts(s);
		fflush(stdout);
		free(s);
	}
	json_decref(obj);
}
