/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* bmirror info: an image's format and sizes (blockmirror_image_info). */
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>

#include "bmirror.h"

static void
help(void)
{
	printf("Usage: bmirror info [--json] [-f FMT] IMAGE\n\n"
	       "Show IMAGE's format, virtual size and allocated bytes.\n");
}

int
cmd_info(int argc, char **argv)
{
	enum { OPT_JSON = 256, OPT_HELP };
	static const struct option longopts[] = {
		{ "json", no_argument, NULL, OPT_JSON },
		{ "help", no_argument, NULL, OPT_HELP },
		{ NULL, 0, NULL, 0 },
	};
	struct blockmirror_image_info info = { .size = sizeof info };
	enum blockmirror_format fmt = BLOCKMIRROR_FORMAT_AUTO;
	bool json = false;
	char h1[32], h2[32];
	const char *name;
	int c;

	opterr = 0;

	while ((c = getopt_long(argc, argv, ":f:h", longopts, NULL)) != -1) {
		switch (c) {
		case 'f':
			if (!parse_format(optarg, &fmt))
				return EXIT_USAGE;
			break;
		case OPT_JSON:
			json = true;
			break;
		case 'h':
		case OPT_HELP:
			help();
			return EXIT_OK;
		default:
			return tool_bad_option(c, argc, argv);
		}
	}
	if (argc - optind != 1)
		return tool_usage_error("expected one IMAGE");
	name = argv[optind];
	if (blockmirror_image_info(name, fmt, &info) < 0) {
		tool_lib_error();
		return EXIT_FAILED;
	}
	if (json) {
		json_print(json_pack("{s:s, s:s, s:I, s:o, s:i, s:b}",
			"filename", name,
			"format", blockmirror_format_name(info.format),
			"virtual-size", (json_int_t)info.virtual_size,
			"allocated-bytes", info.allocated_bytes == UINT64_MAX
				? json_null()
				: json_integer((json_int_t)info.allocated_bytes),
			"cluster-size", (int)info.cluster_size,
			"block-device", info.block_device));
		return EXIT_OK;
	}
	printf("image: %s\n", name);
	printf("format: %s\n", blockmirror_format_name(info.format));
	printf("virtual size: %" PRIu64 " (%s)\n", info.virtual_size,
	       human_size(info.virtual_size, h1, sizeof h1));
	if (info.allocated_bytes != UINT64_MAX)
		printf("allocated: %" PRIu64 " (%s)\n", info.allocated_bytes,
		       human_size(info.allocated_bytes, h2, sizeof h2));
	if (info.cluster_size)
		printf("cluster size: %u\n", info.cluster_size);
	return EXIT_OK;
}
