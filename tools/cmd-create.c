/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* bmirror create: make a new, empty image (blockmirror_image_create). */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>

#include "bmirror.h"

static void
help(void)
{
	printf("Usage: bmirror create -f FMT [-o OPTIONS] [--overwrite] "
	       "IMAGE SIZE\n\n"
	       "Create IMAGE holding SIZE bytes of zeroes (sizes like 10G, "
	       "512M, 1025K).\n");
}

int
cmd_create(int argc, char **argv)
{
	enum { OPT_OVERWRITE = 256, OPT_HELP };
	static const struct option longopts[] = {
		{ "overwrite", no_argument, NULL, OPT_OVERWRITE },
		{ "help", no_argument, NULL, OPT_HELP },
		{ NULL, 0, NULL, 0 },
	};
	enum blockmirror_format fmt = BLOCKMIRROR_FORMAT_RAW;
	const char *opts = NULL;
	bool overwrite = false;
	uint64_t size;
	int c, r;

	opterr = 0;

	while ((c = getopt_long(argc, argv, ":f:o:h", longopts, NULL)) != -1) {
		switch (c) {
		case 'f':
			if (!parse_format(optarg, &fmt))
				return EXIT_USAGE;
			break;
		case 'o':
			opts = optarg;
			break;
		case OPT_OVERWRITE:
			overwrite = true;
			break;
		case 'h':
		case OPT_HELP:
			help();
			return EXIT_OK;
		default:
			return tool_bad_option(c, argc, argv);
		}
	}
	if (argc - optind != 2)
		return tool_usage_error("expected IMAGE and SIZE");
	r = parse_size(argv[optind + 1], &size);
	if (r == -ERANGE)
		return tool_usage_error("size '%s' is too large",
					argv[optind + 1]);
	if (r < 0)
		return tool_usage_error("bad size '%s' (use bytes or a "
					"suffix: 10G, 512M, 1025K)",
					argv[optind + 1]);
	if (blockmirror_image_create(argv[optind], fmt, size, opts,
				     overwrite) < 0) {
		tool_lib_error();
		return EXIT_FAILED;
	}
	return EXIT_OK;
}
