/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * bench-move: a guest doing 4 KiB random writes at queue depth 16 on a
 * local raw disk, first alone and then while the disk moves, in the mode
 * given.  Prints one JSON line: move time, guest IOPS during the move
 * against the same load without a move, guest p99 and max latency during
 * the move, the pivot stall, and the memory the job holds (bitmaps and
 * copy buffers).
 *
 *   bench-move [--mode active|background|auto] [--size BYTES]
 *              [--fill 0.75] [--baseline SECONDS] [--dir DIR]
 *              [--converge SECONDS]
 *
 * A background move that is not READY after --converge seconds (60) is
 * reported as not converged and finished in active mode.
 *
 * The guest runs on the disk's own loop (completions reissue), as an NBD
 * server or a hypervisor's device model would.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <blockmirror/blockmirror.h>

#define QD 16
#define BS 4096

struct guest {
	struct blockmirror_disk *disk;
	uint64_t size;
	unsigned char buf[QD][BS];
	uint64_t start_ns[QD];
	uint64_t seed;
	atomic_bool stop;
	atomic_int inflight;
	/* latencies of completed writes, in ns, with completion times */
	uint64_t *lat;
	uint64_t *when;
	size_t n, cap;
	pthread_mutex_t lock;
	atomic_int errors;
};

static struct guest g;

static uint64_t
now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static uint64_t
rnd(void)
{
	uint64_t z = (g.seed += 0x9e3779b97f4a7c15ull);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static void issue(int slot);

static void
done(void *data, int err)
{
	int slot = (int)(intptr_t)data;
	uint64_t t = now_ns();

	if (err)
		g.errors++;
	pthread_mutex_lock(&g.lock);
	if (g.n == g.cap) {
		g.cap = g.cap ? g.cap * 2 : 1 << 20;
		g.lat = realloc(g.lat, g.cap * sizeof *g.lat);
		g.when = realloc(g.when, g.cap * sizeof *g.when);
	}
	g.lat[g.n] = t - g.start_ns[slot];
	g.when[g.n] = t;
	g.n++;
	pthread_mutex_unlock(&g.lock);
	if (atomic_load(&g.stop)) {
		g.inflight--;
		return;
	}
	issue(slot);
}

static void
issue(int slot)
{
	uint64_t off = (rnd() % (g.size / BS)) * BS;

	memset(g.buf[slot], (int)(rnd() & 0xff), BS);
	g.start_ns[slot] = now_ns();
	if (blockmirror_disk_aio_write(g.disk, g.buf[slot], BS, off, 0, done,
				       (void *)(intptr_t)slot) < 0) {
		g.errors++;
		g.inflight--;
	}
}

static void
guest_start(void)
{
	atomic_store(&g.stop, false);
	g.inflight = QD;
	for (int i = 0; i < QD; i++)
		issue(i);
}

static void
guest_stop(void)
{
	atomic_store(&g.stop, true);
	while (g.inflight > 0)
		usleep(1000);
}

static int
cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

/* IOPS, p99 and max of the writes completed in [t0, t1). */
static void
window(uint64_t t0, uint64_t t1, double *iops, double *p99_ms, double *max_ms)
{
	uint64_t *v = malloc((g.n + 1) * sizeof *v);
	size_t k = 0;

	pthread_mutex_lock(&g.lock);
	for (size_t i = 0; i < g.n; i++)
		if (g.when[i] >= t0 && g.when[i] < t1)
			v[k++] = g.lat[i];
	pthread_mutex_unlock(&g.lock);
	qsort(v, k, sizeof *v, cmp_u64);
	*iops = (double)k / ((double)(t1 - t0) / 1e9);
	if (getenv("BENCH_WHEN_MAX")) {
		uint64_t worst = 0, at = 0;

		pthread_mutex_lock(&g.lock);
		for (size_t i = 0; i < g.n; i++)
			if (g.when[i] >= t0 && g.when[i] < t1 && g.lat[i] > worst) {
				worst = g.lat[i];
				at = g.when[i] - g.lat[i];
			}
		pthread_mutex_unlock(&g.lock);
		fprintf(stderr, "worst %.1f ms issued at +%.3f s\n",
			(double)worst / 1e6, (double)(at - t0) / 1e9);
	}
	*p99_ms = k ? (double)v[k * 99 / 100] / 1e6 : 0;
	*max_ms = k ? (double)v[k - 1] / 1e6 : 0;
	free(v);
}

static void
make_source(const char *path, uint64_t size, double fill)
{
	unsigned char *buf = malloc(1 << 20);
	int fd = open(path, O_CREAT | O_TRUNC | O_WRONLY, 0644);

	if (fd < 0 || ftruncate(fd, (off_t)size) < 0) {
		perror(path);
		exit(1);
	}
	g.seed = 1;
	for (uint64_t off = 0; off < size; off += 1 << 20) {
		if ((double)(rnd() % 1000) >= fill * 1000)
			continue;
		for (int i = 0; i < (1 << 20); i += 8) {
			uint64_t r = rnd();

			memcpy(buf + i, &r, 8);
		}
		if (pwrite(fd, buf, 1 << 20, (off_t)off) != 1 << 20) {
			perror(path);
			exit(1);
		}
	}
	fsync(fd);
	close(fd);
	free(buf);
}

int
main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "mode", required_argument, NULL, 'm' },
		{ "size", required_argument, NULL, 's' },
		{ "fill", required_argument, NULL, 'f' },
		{ "baseline", required_argument, NULL, 'b' },
		{ "dir", required_argument, NULL, 'd' },
		{ "converge", required_argument, NULL, 'c' },
		{ NULL, 0, NULL, 0 },
	};
	enum blockmirror_mode mode = BLOCKMIRROR_MODE_ACTIVE;
	uint64_t size = 2ull << 30;
	double fill = 0.75, base_s = 5;
	const char *dir = "/var/tmp";
	char src[4096], dst[4096];
	struct blockmirror_job_options o = { .size = sizeof o };
	struct blockmirror_job_info info = { .size = sizeof info };
	struct blockmirror_job *job;
	uint64_t t0, t1, t_ready, remaining_at_switch = 0;
	int converge_ms = 60000;
	bool converged = true;
	double base_iops, base_p99, base_max, iops, p99, max;
	int c;

	while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (c) {
		case 'm':
			mode = strcmp(optarg, "background") == 0
			       ? BLOCKMIRROR_MODE_BACKGROUND
			       : strcmp(optarg, "auto") == 0
			       ? BLOCKMIRROR_MODE_AUTO : BLOCKMIRROR_MODE_ACTIVE;
			break;
		case 's':
			size = strtoull(optarg, NULL, 0);
			break;
		case 'f':
			fill = atof(optarg);
			break;
		case 'b':
			base_s = atof(optarg);
			break;
		case 'd':
			dir = optarg;
			break;
		case 'c':
			converge_ms = (int)(atof(optarg) * 1000);
			break;
		default:
			fprintf(stderr, "usage: see the top of bench-move.c\n");
			return 2;
		}
	}
	snprintf(src, sizeof src, "%s/bench-move-src.%d", dir, (int)getpid());
	snprintf(dst, sizeof dst, "%s/bench-move-dst.%d", dir, (int)getpid());
	make_source(src, size, fill);
	pthread_mutex_init(&g.lock, NULL);
	g.size = size;
	g.seed = 7;
	g.disk = blockmirror_disk_open(src, BLOCKMIRROR_FORMAT_RAW, 0);
	if (!g.disk || blockmirror_disk_start_thread(g.disk) < 0) {
		fprintf(stderr, "%s\n", blockmirror_last_error());
		return 1;
	}

	/* The same load without a move. */
	guest_start();
	usleep((useconds_t)(base_s * 1e6 / 5)); /* warm up */
	t0 = now_ns();
	usleep((useconds_t)(base_s * 1e6));
	t1 = now_ns();
	window(t0, t1, &base_iops, &base_p99, &base_max);

	/* The move. */
	o.flags = BLOCKMIRROR_JOB_CREATE;
	o.mode = mode;
	t0 = now_ns();
	job = blockmirror_job_start(g.disk, dst, &o);
	if (!job) {
		fprintf(stderr, "%s\n", blockmirror_last_error());
		return 1;
	}
	/* Background mode may not converge under this load (the guest
	 * dirties chunks faster than they can be copied): say so, with
	 * the remaining work, and finish in active mode. */
	if (blockmirror_job_wait(job, BLOCKMIRROR_JOB_READY, converge_ms) !=
	    BLOCKMIRROR_JOB_READY) {
		blockmirror_job_query(job, &info);
		converged = false;
		remaining_at_switch = info.bytes_remaining;
		blockmirror_job_set_mode(job, BLOCKMIRROR_MODE_ACTIVE);
		if (blockmirror_job_wait(job, BLOCKMIRROR_JOB_READY, 600000) !=
		    BLOCKMIRROR_JOB_READY) {
			fprintf(stderr, "not ready: %s\n",
				blockmirror_last_error());
			return 1;
		}
	}
	t_ready = now_ns();
	if (blockmirror_job_complete(job) < 0) {
		fprintf(stderr, "pivot: %s\n", blockmirror_last_error());
		return 1;
	}
	t1 = now_ns();
	blockmirror_job_query(job, &info);
	window(t0, t1, &iops, &p99, &max);
	guest_stop();

	printf("{\"mode\":\"%s\",\"size\":%llu,\"fill\":%.2f,"
	       "\"move_s\":%.3f,\"ready_s\":%.3f,"
	       "\"guest_iops_no_move\":%.0f,\"guest_iops_during_move\":%.0f,"
	       "\"iops_ratio\":%.3f,\"guest_p99_ms\":%.3f,\"guest_max_ms\":%.3f,"
	       "\"no_move_p99_ms\":%.3f,\"no_move_max_ms\":%.3f,"
	       "\"pivot_stall_us\":%llu,\"bytes_copied\":%llu,"
	       "\"bytes_mirrored\":%llu,\"job_memory_bytes\":%llu,"
	       "\"converged\":%s,\"remaining_when_switched\":%llu,"
	       "\"guest_errors\":%d}\n",
	       blockmirror_mode_name(mode), (unsigned long long)size, fill,
	       (double)(t1 - t0) / 1e9, (double)(t_ready - t0) / 1e9,
	       base_iops, iops, iops / base_iops, p99, max, base_p99, base_max,
	       (unsigned long long)info.pivot_stall_us,
	       (unsigned long long)info.bytes_copied,
	       (unsigned long long)info.bytes_mirrored,
	       /* three bitmaps of one bit per chunk, 16 buffers of 1 MiB */
	       (unsigned long long)(3 * (size / info.granularity + 63) / 8 +
				    16ull * (1 << 20)),
	       converged ? "true" : "false",
	       (unsigned long long)remaining_at_switch, (int)g.errors);
	blockmirror_job_free(job);
	blockmirror_disk_close(g.disk);
	unlink(src);
	unlink(dst);
	return g.errors ? 1 : 0;
}
