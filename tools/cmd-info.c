/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* bmirror info: an image's format and sizes (blockmirror_image_info). */
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bmirror.h"

static void
help(void)
{
	printf("Usage: bmirror info [--json] [--backing-chain] [-f FMT] IMAGE\n\n"
	       "Show IMAGE's format, virtual size, allocated bytes, cluster size\n"
	       "and backing file.  With --backing-chain, every image of the\n"
	       "chain, top first.\n");
}

static char *
identity_string(const struct blockmirror_image_info *info, char *buf,
		size_t n)
{
	const uint8_t *g = info->identity;

	/* A GUID's first three fields are little-endian on disk. */
	snprintf(buf, n, "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-"
		 "%02x%02x%02x%02x%02x%02x", g[3], g[2], g[1], g[0], g[5],
		 g[4], g[7], g[6], g[8], g[9], g[10], g[11], g[12], g[13],
		 g[14], g[15]);
	return buf;
}

static json_t *
info_json(const char *name, const struct blockmirror_image_info *info)
{
	char id[40];
	json_t *o = json_pack("{s:s, s:s, s:I, s:o, s:i, s:b}",
		"filename", name,
		"format", blockmirror_format_name(info->format),
		"virtual-size", (json_int_t)info->virtual_size,
		"allocated-bytes", info->allocated_bytes == UINT64_MAX
			? json_null()
			: json_integer((json_int_t)info->allocated_bytes),
		"cluster-size", (int)info->cluster_size,
		"block-device", info->block_device);

	if (!o)
		return NULL;
	if (info->format != BLOCKMIRROR_FORMAT_RAW)
		json_object_set_new(o, "data-bytes",
				    json_integer((json_int_t)info->data_bytes));
	if (info->backing_file[0]) {
		json_object_set_new(o, "backing-filename",
				    json_string(info->backing_file));
		json_object_set_new(o, "full-backing-filename",
				    json_string(info->backing_path));
		json_object_set_new(o, "backing-filename-format",
				    json_string(blockmirror_format_name(
						info->backing_format)));
	}
	if (info->has_identity)
		json_object_set_new(o, "page83-identity",
				    json_string(identity_string(info, id,
								sizeof id)));
	return o;
}

static void
info_text(const char *name, const struct blockmirror_image_info *info)
{
	char h[32], id[40];

	printf("image: %s\n", name);
	printf("format: %s\n", blockmirror_format_name(info->format));
	printf("virtual size: %" PRIu64 " (%s)\n", info->virtual_size,
	       human_size(info->virtual_size, h, sizeof h));
	if (info->allocated_bytes != UINT64_MAX)
		printf("allocated: %" PRIu64 " (%s)\n", info->allocated_bytes,
		       human_size(info->allocated_bytes, h, sizeof h));
	if (info->format != BLOCKMIRROR_FORMAT_RAW)
		printf("guest data: %" PRIu64 " (%s)\n", info->data_bytes,
		       human_size(info->data_bytes, h, sizeof h));
	if (info->cluster_size)
		printf("cluster size: %u\n", info->cluster_size);
	if (info->backing_file[0]) {
		printf("backing file: %s", info->backing_file);
		if (strcmp(info->backing_file, info->backing_path))
			printf(" (actual path: %s)", info->backing_path);
		printf("\nbacking file format: %s\n",
		       blockmirror_format_name(info->backing_format));
	}
	if (info->has_identity)
		printf("page83 identity: %s\n",
		       identity_string(info, id, sizeof id));
}

int
cmd_info(int argc, char **argv)
{
	enum { OPT_JSON = 256, OPT_HELP, OPT_CHAIN };
	static const struct option longopts[] = {
		{ "json", no_argument, NULL, OPT_JSON },
		{ "backing-chain", no_argument, NULL, OPT_CHAIN },
		{ "help", no_argument, NULL, OPT_HELP },
		{ NULL, 0, NULL, 0 },
	};
	struct blockmirror_image_info info = { .size = sizeof info };
	enum blockmirror_format fmt = BLOCKMIRROR_FORMAT_AUTO;
	bool json = false, chain = false;
	json_t *list = NULL;
	char *name;
	int c, depth = 0;

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
		case OPT_CHAIN:
			chain = true;
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
	name = strdup(argv[optind]);
	if (json && chain)
		list = json_array();
	for (;;) {
		if (!name || blockmirror_image_info(name, fmt, &info) < 0) {
			tool_lib_error();
			free(name);
			json_decref(list);
			return EXIT_FAILED;
		}
		if (list)
			json_array_append_new(list, info_json(name, &info));
		else if (json)
			json_print(info_json(name, &info));
		else
			info_text(name, &info);
		free(name);
		/* Opening the top already opened the whole chain (a loop
		 * would have failed), so this walk ends. */
		if (!chain || !info.backing_file[0] || ++depth > 64)
			break;
		name = strdup(info.backing_path);
		fmt = info.backing_format;
		if (!json)
			printf("\n");
	}
	if (list)
		json_print(list);
	return EXIT_OK;
}
