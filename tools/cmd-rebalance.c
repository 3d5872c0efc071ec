/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * bmirror rebalance: move many disks between pools as a plan file says
 * (docs/rebalance.md).
 *
 * Three steps, and nothing moves until the first two have passed:
 *  1. read the plan (plan.c) and look at the world: ask every served disk
 *     which image it runs on and how big it is, find every unused image
 *     and make sure nobody has it open, find each disk's pool, take
 *     capacities the plan leaves out from the file system;
 *  2. plan (plan.c, pure) and check that no destination exists yet;
 *  3. run the moves (rebalance-exec.c).
 * A problem found in step 1 or 2 is one line on stderr naming the plan
 * file and the pool or disk, and exit status 1.
 */
#include <dirent.h>
#include <errno.h>
#include <getopt.h>
#include <libgen.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "bmirror.h"
#include "control.h"
#include "plan.h"
#include "rebalance.h"

static const char *plan_file;

static void plan_error(const char *fmt, ...)
	__attribute__((format(printf, 1, 2)));

static void
plan_error(const char *fmt, ...)
{
	char msg[1024];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	tool_error("%s: %s", plan_file, msg);
}

static char *
read_all(const char *path, size_t *len)
{
	FILE *f = strcmp(path, "-") == 0 ? stdin : fopen(path, "re");
	size_t cap = 4096, n = 0;
	char *buf;

	if (!f)
		return NULL;
	buf = malloc(cap);
	while (buf) {
		size_t got = fread(buf + n, 1, cap - n, f);

		n += got;
		if (n < cap)
			break;
		if (cap >= (16u << 20)) {
			free(buf);
			buf = NULL;
			errno = EFBIG;
			break;
		}
		char *nb = realloc(buf, cap *= 2);

		if (!nb) {
			free(buf);
			buf = NULL;
		}
		buf = nb;
	}
	if (buf && ferror(f)) {
		free(buf);
		buf = NULL;
		errno = EIO;
	}
	if (f != stdin)
		fclose(f);
	*len = n;
	return buf;
}

/* Ask a served disk for its image and size (a blocking "query"). */
static int
query_served(struct bm_plan_disk *d, struct rb_disk *rd)
{
	struct line_reader *lr = calloc(1, sizeof *lr);
	json_t *reply = NULL, *ret, *job;
	const char *image;
	int fd, r;

	if (!lr)
		return -ENOMEM;
	fd = control_connect(d->control);
	if (fd < 0) {
		plan_error("disk '%s': cannot connect to the control socket "
			   "%s: %s (is bmirror serve running?)", d->name,
			   d->control, strerror(-fd));
		free(lr);
		return fd;
	}
	lr->fd = fd;
	r = line_write(fd, json_pack("{s:s}", "cmd", "query"));
	while (r == 0) {
		r = line_read(lr, &reply);
		if (r == 1 && json_object_get(reply, "event")) {
			json_decref(reply);
			reply = NULL;
			r = 0;
			continue;
		}
		break;
	}
	close(fd);
	free(lr);
	ret = json_object_get(reply, "return");
	image = json_string_value(json_object_get(ret, "image"));
	if (r != 1 || !image) {
		plan_error("disk '%s': %s: no answer to a query", d->name,
			   d->control);
		json_decref(reply);
		return -EPROTO;
	}
	job = json_object_get(ret, "job");
	if (json_is_object(job)) {
		const char *st = json_string_value(json_object_get(job, "state"));

		if (st && strcmp(st, "completed") && strcmp(st, "cancelled") &&
		    strcmp(st, "failed")) {
			plan_error("disk '%s': a move is already running (%s)",
				   d->name, st);
			json_decref(reply);
			return -EBUSY;
		}
	}
	rd->live = true;
	rd->location = blockmirror_nbd_is_uri(image) ? strdup(image)
					    : realpath(image, NULL);
	d->size = (uint64_t)json_integer_value(
		json_object_get(ret, "size"));
	json_decref(reply);
	if (!rd->location) {
		plan_error("disk '%s': %s: %s", d->name, image, strerror(errno));
		return -errno;
	}
	return 0;
}

/* A process other than us that has `st`'s file open: its pid, or 0. */
static long
opened_by(const struct stat *st)
{
	DIR *proc = opendir("/proc");
	struct dirent *e;
	long found = 0;

	if (!proc)
		return 0;
	while (!found && (e = readdir(proc))) {
		char dir[64];
		struct dirent *f;
		long pid = strtol(e->d_name, NULL, 10);
		DIR *fds;

		if (pid <= 0 || pid == (long)getpid())
			continue;
		snprintf(dir, sizeof dir, "/proc/%ld/fd", pid);
		if (!(fds = opendir(dir)))
			continue;
		while ((f = readdir(fds))) {
			struct stat fst;
			char p[400];

			if (f->d_name[0] == '.')
				continue;
			snprintf(p, sizeof p, "%s/%s", dir, f->d_name);
			if (stat(p, &fst) == 0 && fst.st_dev == st->st_dev &&
			    fst.st_ino == st->st_ino) {
				found = pid;
				break;
			}
		}
		closedir(fds);
	}
	closedir(proc);
	return found;
}

static int
look_at_image(struct bm_plan_disk *d, struct rb_disk *rd)
{
	struct blockmirror_image_info info = { .size = sizeof info };
	struct stat st;
	long pid;

	rd->location = realpath(d->image, NULL);
	if (!rd->location || stat(rd->location, &st) < 0) {
		plan_error("disk '%s': %s: %s", d->name, d->image,
			   strerror(errno));
		return -ENOENT;
	}
	if (!S_ISREG(st.st_mode)) {
		plan_error("disk '%s': %s is not a regular file", d->name,
			   d->image);
		return -EINVAL;
	}
	if ((pid = opened_by(&st))) {
		plan_error("disk '%s': %s is in use by process %ld (a served "
			   "disk moves through its \"control\" socket)",
			   d->name, d->image, pid);
		return -EBUSY;
	}
	if (blockmirror_image_info(rd->location, BLOCKMIRROR_FORMAT_AUTO,
				   &info) < 0) {
		plan_error("disk '%s': %s", d->name, blockmirror_last_error());
		return -EINVAL;
	}
	d->size = info.virtual_size;
	rd->allocated = info.allocated_bytes == UINT64_MAX ? info.virtual_size
							    : info.allocated_bytes;
	return 0;
}

/* Step 1: fill in what the plan file cannot know. */
static int
look_at_world(struct bm_plan *plan, struct rb_disk *disks)
{
	for (size_t i = 0; i < plan->n_pools; i++) {
		struct bm_plan_pool *pool = &plan->pools[i];
		struct stat st;
		char *real;

		if (!pool->path)
			continue;
		real = realpath(pool->path, NULL);
		if (!real || stat(real, &st) < 0 || !S_ISDIR(st.st_mode)) {
			plan_error("pool '%s': %s: %s", pool->name, pool->path,
				   real ? "not a directory" : strerror(errno));
			free(real);
			return -1;
		}
		free(pool->path);
		pool->path = real;
	}

	for (size_t i = 0; i < plan->n_disks; i++) {
		struct bm_plan_disk *d = &plan->disks[i];
		int r = d->control ? query_served(d, &disks[i])
				   : look_at_image(d, &disks[i]);

		if (r < 0)
			return -1;
	}

	for (size_t i = 0; i < plan->n_disks; i++) {
		struct bm_plan_disk *d = &plan->disks[i];
		const char *loc = disks[i].location;

		for (size_t k = 0; k < i; k++)
			if (strcmp(loc, disks[k].location) == 0) {
				plan_error("disk '%s': %s is disk '%s' %s",
					   d->name, loc, plan->disks[k].name,
					   disks[k].live ? "(served)" : "too");
				return -1;
			}
		d->pool = -1;
		for (size_t p = 0; p < plan->n_pools && d->pool < 0; p++) {
			const struct bm_plan_pool *pool = &plan->pools[p];

			if (pool->path && !blockmirror_nbd_is_uri(loc)) {
				char buf[PATH_MAX];

				snprintf(buf, sizeof buf, "%s", loc);
				if (strcmp(dirname(buf), pool->path) == 0)
					d->pool = (int)p;
			} else if (pool->uri) {
				char *u = bm_plan_pool_uri(pool, d->name);

				if (u && strcmp(u, loc) == 0)
					d->pool = (int)p;
				free(u);
			}
		}
		if (d->pool < 0) {
			plan_error("disk '%s' (%s) is in none of the plan's "
				   "pools", d->name, loc);
			return -1;
		}
	}

	/* Capacities the plan leaves out: the whole file system. */
	for (size_t i = 0; i < plan->n_pools; i++) {
		struct bm_plan_pool *pool = &plan->pools[i];
		struct statvfs sv;
		struct stat st, st2;
		uint64_t fs_used, ours = 0;

		if (pool->capacity)
			continue;
		if (statvfs(pool->path, &sv) < 0 || stat(pool->path, &st) < 0) {
			plan_error("pool '%s': %s: %s", pool->name, pool->path,
				   strerror(errno));
			return -1;
		}
		for (size_t k = 0; k < plan->n_pools; k++)
			if (k != i && plan->pools[k].path &&
			    !plan->pools[k].capacity &&
			    stat(plan->pools[k].path, &st2) == 0 &&
			    st2.st_dev == st.st_dev) {
				plan_error("pools '%s' and '%s' share a file "
					   "system: give their \"capacity\"",
					   pool->name, plan->pools[k].name);
				return -1;
			}
		pool->capacity = (uint64_t)sv.f_blocks * sv.f_frsize;
		if (pool->reserved_given)
			continue;
		/* What the file system holds besides the plan's disks,
		 * which count with their virtual sizes. */
		fs_used = (uint64_t)(sv.f_blocks - sv.f_bfree) * sv.f_frsize;
		for (size_t d = 0; d < plan->n_disks; d++)
			if (plan->disks[d].pool == (int)i)
				ours += disks[d].allocated;
		pool->reserved = fs_used > ours ? fs_used - ours : 0;
	}
	return 0;
}

static void
print_plan(const struct bm_plan *plan, const struct rb_disk *disks,
	   const struct bm_plan_move *moves, size_t n_moves)
{
	uint64_t *used = calloc(plan->n_pools, sizeof *used);
	uint64_t total = 0;
	char a[32], b[32], c[32];

	if (!used)
		return;
	bm_plan_usage(plan, used);
	if (!n_moves)
		printf("nothing to move: the goal is met\n");
	for (size_t i = 0; i < n_moves; i++) {
		const struct bm_plan_move *m = &moves[i];
		char dest[PATH_MAX + 256];

		if (rb_destination(plan, disks, m, dest, sizeof dest) < 0)
			dest[0] = '\0';
		printf("move %s (%s, %s) from %s to %s: %s\n",
		       plan->disks[m->disk].name,
		       human_size(m->bytes, a, sizeof a),
		       disks[m->disk].live ? "live" : "offline",
		       plan->pools[m->from].name, plan->pools[m->to].name, dest);
		total += m->bytes;
	}
	printf("\n%-16s %12s %12s %12s\n", "pool", "capacity", "used now",
	       "used after");
	for (size_t i = 0; i < plan->n_pools; i++) {
		uint64_t after = used[i];

		for (size_t k = 0; k < n_moves; k++) {
			if (moves[k].from == (int)i)
				after -= moves[k].bytes;
			if (moves[k].to == (int)i)
				after += moves[k].bytes;
		}
		printf("%-16s %12s %7s %3.0f%% %7s %3.0f%%\n",
		       plan->pools[i].name,
		       human_size(plan->pools[i].capacity, a, sizeof a),
		       human_size(used[i], b, sizeof b),
		       100.0 * (double)used[i] /
		       (double)plan->pools[i].capacity,
		       human_size(after, c, sizeof c),
		       100.0 * (double)after / (double)plan->pools[i].capacity);
	}
	printf("\n%zu move%s, %s to move\n", n_moves, n_moves == 1 ? "" : "s",
	       human_size(total, a, sizeof a));
	free(used);
}

static void
help(void)
{
	printf("Usage: bmirror rebalance PLAN.json [--dry-run] "
	       "[--max-parallel N] [--speed RATE]\n"
	       "                         [--progress|--json]\n\n"
	       "Move disks between storage pools as PLAN.json says "
	       "(docs/rebalance.md): even\nthe pools' used fraction, empty "
	       "a pool, or make the moves it lists.  Served\ndisks move "
	       "live through their control sockets, unused images offline.\n\n"
	       "  --dry-run          print the moves and the pools' usage, "
	       "move nothing\n"
	       "  --max-parallel N   moves at once (default 2)\n"
	       "  --speed RATE       bytes/s shared by all moves (64M; "
	       "default unlimited)\n"
	       "  --progress         a line per running move (default on "
	       "a terminal)\n"
	       "  --json             one JSON object per event and a "
	       "summary\n");
}

int
cmd_rebalance(int argc, char **argv)
{
	enum { OPT_DRY_RUN = 256, OPT_MAX_PARALLEL, OPT_SPEED, OPT_PROGRESS,
	       OPT_JSON, OPT_HELP };
	static const struct option longopts[] = {
		{ "dry-run", no_argument, NULL, OPT_DRY_RUN },
		{ "max-parallel", required_argument, NULL, OPT_MAX_PARALLEL },
		{ "speed", required_argument, NULL, OPT_SPEED },
		{ "progress", no_argument, NULL, OPT_PROGRESS },
		{ "json", no_argument, NULL, OPT_JSON },
		{ "help", no_argument, NULL, OPT_HELP },
		{ NULL, 0, NULL, 0 },
	};
	struct rb_options o = { .max_parallel = 2,
				.bars = isatty(STDOUT_FILENO) };
	struct bm_plan plan = { 0 };
	struct rb_disk *disks = NULL;
	struct bm_plan_move *moves = NULL;
	size_t n_moves = 0, len;
	bool dry_run = false;
	char err[1024], *text;
	uint64_t v;
	int c, status = EXIT_FAILED;

	opterr = 0;
	while ((c = getopt_long(argc, argv, ":h", longopts, NULL)) != -1) {
		switch (c) {
		case OPT_DRY_RUN:
			dry_run = true;
			break;
		case OPT_MAX_PARALLEL:
			if (!parse_uint(optarg, 64, &v))
				return tool_usage_error("bad --max-parallel "
					"'%s' (1 to 64)", optarg);
			o.max_parallel = (unsigned)v;
			break;
		case OPT_SPEED:
			if (parse_size(optarg, &o.speed) < 0)
				return tool_usage_error("bad speed '%s'",
							optarg);
			break;
		case OPT_PROGRESS:
			o.bars = true;
			break;
		case OPT_JSON:
			o.json = true;
			o.bars = false;
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
		return tool_usage_error("expected one PLAN.json");
	plan_file = argv[optind];

	text = read_all(plan_file, &len);
	if (!text) {
		tool_error("%s: %s", plan_file, strerror(errno));
		return EXIT_FAILED;
	}
	if (bm_plan_parse(text, len, &plan, err, sizeof err) < 0) {
		free(text);
		plan_error("%s", err);
		return EXIT_FAILED;
	}
	free(text);
	disks = calloc(plan.n_disks + 1, sizeof *disks);
	if (!disks) {
		tool_error("out of memory");
		goto out;
	}
	if (look_at_world(&plan, disks) < 0)
		goto out;
	if (bm_plan_compute(&plan, &moves, &n_moves, err, sizeof err) < 0) {
		plan_error("%s", err);
		goto out;
	}
	for (size_t i = 0; i < n_moves; i++) {
		char dest[PATH_MAX + 256];
		struct stat st;

		if (rb_destination(&plan, disks, &moves[i], dest,
				   sizeof dest) < 0) {
			plan_error("disk '%s': destination name too long",
				   plan.disks[moves[i].disk].name);
			goto out;
		}
		if (!plan.pools[moves[i].to].uri && lstat(dest, &st) == 0) {
			plan_error("disk '%s': the destination %s exists "
				   "already", plan.disks[moves[i].disk].name,
				   dest);
			goto out;
		}
	}

	if (o.json)
		json_print(rb_plan_json(&plan, disks, moves, n_moves));
	if (dry_run) {
		if (!o.json)
			print_plan(&plan, disks, moves, n_moves);
		status = EXIT_OK;
		goto out;
	}
	status = rb_execute(&plan, disks, moves, n_moves, &o);
out:
	for (size_t i = 0; disks && i < plan.n_disks; i++)
		free(disks[i].location);
	free(disks);
	free(moves);
	bm_plan_free(&plan);
	return status;
}
