/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* bmirror copy: offline copy of an image (blockmirror_copy). */
#include <getopt.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "bmirror.h"

static void
help(void)
{
	printf("Usage: bmirror copy [-f FMT] [-O FMT] [-o OPTIONS] [--overwrite] "
	       "[--progress|--json]\n"
	       "                    [--allocate] [-t CACHE] [-T CACHE] "
	       "[--direct]\n"
	       "                    [--request-size SIZE] [--requests N] "
	       "[--speed RATE] SRC DST\n\n"
	       "Copy the guest data of SRC into a new image DST.  Holes stay "
	       "holes and runs of\nzeroes become holes; DST is flushed to "
	       "stable storage before the command exits.\n\n"
	       "  -f FMT              format of SRC (default: probe)\n"
	       "  -O FMT              format of DST (default: SRC's)\n"
	       "  -o OPTIONS          create options for DST (as for create)\n"
	       "  --overwrite         replace DST if it exists\n"
	       "  --allocate          write every byte (no holes)\n"
	       "  -t CACHE            DST's cache mode: none (O_DIRECT, the "
	       "default) or\n"
	       "                      writeback (the page cache, written back "
	       "and dropped\n"
	       "                      behind the copy)\n"
	       "  -T CACHE            SRC's cache mode: writeback (the "
	       "default) or none\n"
	       "  --direct            -t none -T none\n"
	       "  --request-size SIZE bytes per request (default 1M; to or "
	       "from an NBD server\n"
	       "                      256K, or the larger size it prefers)\n"
	       "  --requests N        requests in flight (default 16; 32 of "
	       "256K)\n"
	       "  --speed RATE        copy at most RATE bytes of data per "
	       "second (64M)\n"
	       "  --progress          draw a progress bar (default on a "
	       "terminal)\n"
	       "  --json              print a JSON summary\n");
}

/* A cache mode, as qemu-img names them: none is O_DIRECT. */
static bool
parse_cache(const char *s, bool *direct)
{
	if (strcmp(s, "none") == 0 || strcmp(s, "writeback") == 0) {
		*direct = strcmp(s, "none") == 0;
		return true;
	}
	return false;
}

int
cmd_copy(int argc, char **argv)
{
	enum { OPT_OVERWRITE = 256, OPT_PROGRESS, OPT_JSON, OPT_ALLOCATE,
	       OPT_DIRECT, OPT_REQSIZE, OPT_REQUESTS, OPT_SPEED, OPT_HELP };
	static const struct option longopts[] = {
		{ "overwrite", no_argument, NULL, OPT_OVERWRITE },
		{ "progress", no_argument, NULL, OPT_PROGRESS },
		{ "json", no_argument, NULL, OPT_JSON },
		{ "allocate", no_argument, NULL, OPT_ALLOCATE },
		{ "direct", no_argument, NULL, OPT_DIRECT },
		{ "request-size", required_argument, NULL, OPT_REQSIZE },
		{ "requests", required_argument, NULL, OPT_REQUESTS },
		{ "speed", required_argument, NULL, OPT_SPEED },
		{ "help", no_argument, NULL, OPT_HELP },
		{ NULL, 0, NULL, 0 },
	};
	struct blockmirror_copy_options o = { .size = sizeof o };
	struct blockmirror_copy_stats st = { .size = sizeof st };
	struct progress *bar;
	bool json = false, want_bar = isatty(STDOUT_FILENO);
	uint64_t v;
	bool direct;
	int c;

	opterr = 0;

	while ((c = getopt_long(argc, argv, ":f:O:o:t:T:h", longopts,
				NULL)) != -1) {
		switch (c) {
		case 'f':
			if (!parse_format(optarg, &o.src_format))
				return EXIT_USAGE;
			break;
		case 'O':
			if (!parse_format(optarg, &o.dst_format))
				return EXIT_USAGE;
			break;
		case 'o':
			o.dst_options = optarg;
			break;
		case OPT_OVERWRITE:
			o.flags |= BLOCKMIRROR_COPY_OVERWRITE;
			break;
		case OPT_PROGRESS:
			want_bar = true;
			break;
		case OPT_JSON:
			json = true;
			want_bar = false;
			break;
		case OPT_ALLOCATE:
			o.flags |= BLOCKMIRROR_COPY_ALLOCATE;
			break;
		case OPT_DIRECT:
			o.flags |= BLOCKMIRROR_COPY_SRC_DIRECT;
			o.flags &= ~BLOCKMIRROR_COPY_DST_CACHED;
			break;
		case 't':
		case 'T':
			if (!parse_cache(optarg, &direct))
				return tool_usage_error("bad cache mode '%s' "
					"(none or writeback)", optarg);
			if (c == 't' && direct)
				o.flags &= ~BLOCKMIRROR_COPY_DST_CACHED;
			else if (c == 't')
				o.flags |= BLOCKMIRROR_COPY_DST_CACHED;
			else if (direct)
				o.flags |= BLOCKMIRROR_COPY_SRC_DIRECT;
			else
				o.flags &= ~BLOCKMIRROR_COPY_SRC_DIRECT;
			break;
		case OPT_REQSIZE:
			if (parse_size(optarg, &v) < 0 || v < 4096 ||
			    v > (32u << 20))
				return tool_usage_error("bad request size '%s'"
					" (4K to 32M)", optarg);
			o.request_size = (uint32_t)v;
			break;
		case OPT_REQUESTS:
			if (!parse_uint(optarg, 1024, &v))
				return tool_usage_error("bad request count "
					"'%s' (1 to 1024)", optarg);
			o.requests = (uint32_t)v;
			break;
		case OPT_SPEED:
			if (parse_size(optarg, &o.speed) < 0 || o.speed == 0)
				return tool_usage_error("bad speed '%s' (bytes "
					"per second, such as 64M)", optarg);
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
		return tool_usage_error("expected SRC and DST");

	bar = progress_new("copying", want_bar);
	o.progress = bar ? progress_update : NULL;
	o.progress_data = bar;
	if (blockmirror_copy(argv[optind], argv[optind + 1], &o, &st) < 0) {
		progress_end(bar);
		tool_lib_error();
		return EXIT_FAILED;
	}
	progress_end(bar);
	if (json) {
		double secs = (double)st.elapsed_us / 1e6;

		json_print(json_pack("{s:s, s:s, s:I, s:I, s:I, s:I, s:I, "
				     "s:f, s:f}",
			"source", argv[optind],
			"destination", argv[optind + 1],
			"virtual_size", (json_int_t)st.virtual_size,
			"bytes_read", (json_int_t)st.bytes_read,
			"bytes_written", (json_int_t)st.bytes_written,
			"bytes_copied", (json_int_t)st.bytes_written,
			"bytes_zeroed", (json_int_t)st.bytes_zeroed,
			"elapsed_s", secs,
			"throughput_mib_s", secs > 0 ?
				(double)st.virtual_size / secs / 1048576.0 : 0.0));
	}
	return EXIT_OK;
}
