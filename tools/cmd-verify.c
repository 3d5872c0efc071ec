/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * bmirror verify: compare two images' guest data (blockmirror_verify).
 * Exit 0 identical, 1 different (with the first differing offset), 2 an
 * error (or bad usage).
 */
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <unistd.h>

#include "bmirror.h"

static void
help(void)
{
	printf("Usage: bmirror verify [--json] [--progress] [-f FMT] [-F FMT] "
	       "A B\n\n"
	       "Compare the guest data of A and B chunk by chunk (XXH3-128).\n"
	       "Exit 0: identical; 1: different; 2: error.\n");
}

static void
hex(const uint8_t d[16], char out[33])
{
	for (int i = 0; i < 16; i++)
		snprintf(out + 2 * i, 3, "%02x", d[i]);
}

int
cmd_verify(int argc, char **argv)
{
	enum { OPT_JSON = 256, OPT_PROGRESS, OPT_HELP };
	static const struct option longopts[] = {
		{ "json", no_argument, NULL, OPT_JSON },
		{ "progress", no_argument, NULL, OPT_PROGRESS },
		{ "help", no_argument, NULL, OPT_HELP },
		{ NULL, 0, NULL, 0 },
	};
	struct blockmirror_verify_result res = { .size = sizeof res };
	enum blockmirror_format fa = BLOCKMIRROR_FORMAT_AUTO;
	enum blockmirror_format fb = BLOCKMIRROR_FORMAT_AUTO;
	bool json = false, want_bar = false;
	struct progress *bar;
	char da[33], db[33];
	int c;

	opterr = 0;

	while ((c = getopt_long(argc, argv, ":f:F:h", longopts, NULL)) != -1) {
		switch (c) {
		case 'f':
			if (!parse_format(optarg, &fa))
				return EXIT_USAGE;
			break;
		case 'F':
			if (!parse_format(optarg, &fb))
				return EXIT_USAGE;
			break;
		case OPT_JSON:
			json = true;
			break;
		case OPT_PROGRESS:
			want_bar = true;
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
		return tool_usage_error("expected two images A and B");
	bar = progress_new("verifying", want_bar && !json &&
			   isatty(STDOUT_FILENO));
	if (blockmirror_verify(argv[optind], fa, argv[optind + 1], fb,
			       bar ? progress_update : NULL, bar, &res) < 0) {
		progress_end(bar);
		tool_lib_error();
		return EXIT_USAGE; /* 2: an error, as documented */
	}
	progress_end(bar);
	hex(res.digest_a, da);
	hex(res.digest_b, db);
	if (json) {
		json_t *o = json_pack("{s:b, s:b, s:I, s:s, s:s}",
			"identical", res.identical,
			"size_differs", res.size_differs,
			"bytes_compared", (json_int_t)res.bytes_compared,
			"digest_a", da, "digest_b", db);

		if (!res.identical)
			json_object_set_new(o, "first_difference",
				json_integer((json_int_t)res.first_difference));
		json_print(o);
	} else if (res.identical) {
		printf("identical (%" PRIu64 " bytes, xxh3-128 %s)\n",
		       res.bytes_compared, da);
	} else if (res.size_differs) {
		printf("different: sizes differ; first difference at offset "
		       "%" PRIu64 "\n", res.first_difference);
	} else {
		printf("different: first difference at offset %" PRIu64 "\n",
		       res.first_difference);
	}
	return res.identical ? EXIT_OK : EXIT_FAILED;
}
