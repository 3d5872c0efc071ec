/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The replica store (lib/replica.c, docs/replica-store.md).
 *
 * A model: a byte array per committed point (the primary's disk at that
 * cycle).  Cycles write random granules (random data, zeroes, the short
 * granule at the disk's end) into the image begin hands out, as the
 * primary's writer would; after each commit every listed point, opened
 * read-only through its image's chain, reads exactly as its snapshot, the
 * chain stays shallow, and merges write no more than the merged layers
 * allocate.  Random retention policies and pins (with a reader holding
 * the pinned image open, which must keep reading the same bytes) are
 * mixed in.
 *
 * Power loss: the crash recorder (recorder.h) logs a sequence (the first
 * point, cycles with merges, a retained point, the oldest retained one
 * dropped, an abort, a promote); at crash points, for each variant, the
 * directory is rebuilt and opened again: the points listed read as the
 * model says, the latest is the last commit that returned (or the one a
 * crash interrupted, if its state was written), nothing is left that the
 * state does not name, and the store takes the next cycle.
 *
 * And the refusals, failing durable steps (bm_durable_hook), the limits
 * on depth, the digests, a seed base, test overlays, promote.
 *
 * BM_REPLICA_CYCLES (default 40 per seed), BM_REPLICA_SEEDS (default 3),
 * BM_CRASH_POINTS (default 150), BM_REPLICA_SEED / BM_CRASH_SEED: the
 * seed (printed).
 */
#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <sys/stat.h>
#include <xxhash.h>

#include "durable.h"
#include "helpers.h"
#include "image.h"
#include "internal.h"
#include "loop.h"
#include "recorder.h"
#include "replica.h"

#define GEN_A "0b7d6c62-8a1c-4f4e-9d43-5a1e2b3c4d5e"
#define MAX_POINTS 4096

static char dir[96], rdir[160];
static uint64_t seed;

static void
setup(void)
{
	snprintf(dir, sizeof dir, "/var/tmp/bm-replica-XXXXXX");
	ck_assert(mkdtemp(dir));
	snprintf(rdir, sizeof rdir, "%s/r", dir);
}

static void
teardown(void)
{
	remove_tree(dir);
}

/* ---- the model -------------------------------------------------------- */

struct model {
	uint64_t size;
	uint32_t g;
	uint8_t *cur;                 /* the primary's disk now */
	uint8_t *snap[MAX_POINTS];    /* by point number */
	uint64_t bytes[MAX_POINTS];
};

static void
model_init(struct model *m, uint64_t size, uint32_t g)
{
	memset(m, 0, sizeof *m);
	m->size = size;
	m->g = g;
	m->cur = calloc(1, size);
	ck_assert(m->cur);
}

static void
model_free(struct model *m)
{
	free(m->cur);
	for (size_t i = 0; i < MAX_POINTS; i++)
		free(m->snap[i]);
}

static uint64_t
granules(const struct model *m)
{
	return (m->size + m->g - 1) / m->g;
}

/* Write `n` random granules of the model into `image` (the primary's
 * writer): random data, zeroes now and then, the short last granule
 * often.  Returns the bytes written. */
static bool writer_flushes = true;

/* The primary's writer; with !writer_flushes, one that leaves its
 * writes unflushed (commit syncs the image). */
static void
writer_put(struct blockmirror_disk *d, struct bm_image *img, void *buf,
	   uint64_t len, uint64_t off, bool zero)
{
	struct bm_io io = { .offset = off, .length = len, .buf = buf };

	if (d && zero)
		ck_assert_int_eq(blockmirror_disk_write_zeroes(d, len, off, 0),
				 0);
	else if (d)
		ck_assert_int_eq(blockmirror_disk_write(d, buf, len, off, 0),
				 0);
	else
		ck_assert_int_eq(bm_image_sync(img, zero ? bm_image_zero
						  : bm_image_write, &io), 0);
}

static uint64_t
write_cycle(struct model *m, const char *image, unsigned n, uint64_t *rng)
{
	struct blockmirror_disk *d = NULL;
	struct bm_image *img = NULL;
	struct bm_loop *loop = NULL;
	uint64_t total = 0;
	uint8_t *buf = aligned_alloc(4096, m->g);

	if (writer_flushes) {
		d = blockmirror_disk_open(image, BLOCKMIRROR_FORMAT_AUTO, 0);
		ck_assert_msg(d, "%s: %s", image, blockmirror_last_error());
	} else {
		ck_assert_int_eq(bm_loop_new(8, &loop), 0);
		ck_assert_msg(bm_image_open(loop, image,
					    BLOCKMIRROR_FORMAT_AUTO,
					    BM_IMAGE_WRITE, &img) == 0,
			      "%s", blockmirror_last_error());
	}
	ck_assert(buf);
	for (unsigned i = 0; i < n; i++) {
		uint64_t last = granules(m) - 1;
		uint64_t k = rnd_range(rng, 4) ? rnd_range(rng, last + 1)
					       : last;
		uint64_t off = k * m->g, len = BM_MIN(m->g, m->size - off);
		bool zero = rnd_range(rng, 5) == 0;

		if (zero) {
			memset(buf, 0, len);
		} else {
			for (uint64_t j = 0; j < len; j++)
				buf[j] = (uint8_t)rnd(rng);
			/* Half a granule of zeroes inside data, sometimes. */
			if (rnd_range(rng, 3) == 0)
				memset(buf, 0, len / 2);
		}
		writer_put(d, img, buf, len, off, zero);
		memcpy(m->cur + off, buf, len);
		total += len;
	}
	ck_assert_int_eq(blockmirror_disk_close(d), 0);
	bm_image_close(img);
	if (loop)
		bm_loop_free(loop);
	free(buf);
	return total;
}

/* One cycle: begin, write, commit; the model's snapshot of it. */
static void
cycle(struct bm_replica *r, struct model *m, uint64_t point, int64_t instant,
      unsigned n, uint64_t *rng)
{
	char *image = NULL;
	int err;

	err = bm_replica_begin(r, point, GEN_A, &image);
	ck_assert_msg(err == 0, "begin %" PRIu64 ": %s", point,
		      blockmirror_last_error());
	m->bytes[point] = write_cycle(m, image, n, rng);
	err = bm_replica_commit(r, instant, m->bytes[point], point % 2);
	ck_assert_msg(err == 0, "commit %" PRIu64 ": %s", point,
		      blockmirror_last_error());
	free(m->snap[point]);
	m->snap[point] = malloc(m->size);
	ck_assert(m->snap[point]);
	memcpy(m->snap[point], m->cur, m->size);
	free(image);
}

/* A new store of `size` bytes (64 KiB granules) under policy `keep`
 * (every point a window), with points 1 to `points` committed, each
 * writing `per` granules. */
static struct bm_replica *
store_with_points(struct model *m, uint64_t size, unsigned keep,
		  uint64_t points, unsigned per, uint64_t *rng)
{
	struct bm_replica_policy pol = { .keep = keep };
	struct bm_replica *r;

	model_init(m, size, 65536);
	ck_assert_int_eq(bm_replica_create(rdir, size, NULL, 0, &r), 0);
	ck_assert_int_eq(bm_replica_set_policy(r, &pol), 0);
	for (uint64_t p = 1; p <= points; p++)
		cycle(r, m, p, (int64_t)p, per, rng);
	return r;
}

/* Read an image whole (read-only, through its chain); NULL + message. */
static uint8_t *
read_image(const char *image, uint64_t size, char *msg, size_t len)
{
	struct blockmirror_disk *d;
	uint8_t *buf = malloc(size);

	d = blockmirror_disk_open(image, BLOCKMIRROR_FORMAT_AUTO,
				  BLOCKMIRROR_DISK_READONLY);
	if (!d || blockmirror_disk_get_size(d) != size ||
	    blockmirror_disk_read(d, buf, size, 0) < 0) {
		snprintf(msg, len, "%s: %s", image, d ? "size or read"
			 : blockmirror_last_error());
		blockmirror_disk_close(d);
		free(buf);
		return NULL;
	}
	blockmirror_disk_close(d);
	return buf;
}

/* The first byte where `a` and `b` differ, or -1. */
static int64_t
differs(const uint8_t *a, const uint8_t *b, uint64_t size)
{
	for (uint64_t i = 0; i < size; i++)
		if (a[i] != b[i])
			return (int64_t)i;
	return -1;
}

/* Images in a chain, the top one included. */
static unsigned
chain_depth(const char *image)
{
	struct bm_loop *loop;
	struct bm_image *img;
	unsigned n = 0;

	ck_assert_int_eq(bm_loop_new(8, &loop), 0);
	ck_assert_msg(bm_image_open(loop, image, BLOCKMIRROR_FORMAT_AUTO, 0,
				    &img) == 0, "%s", blockmirror_last_error());
	for (struct bm_image *i = img; i; i = bm_image_backing(i))
		n++;
	bm_image_close(img);
	bm_loop_free(loop);
	return n;
}

/*
 * Every listed point reads as the model's snapshot; the files in DIR are
 * the state's (base, layers of listed points, test overlays) and no
 * others; returns the number of points, or -1 with `msg` set.
 */
static int
check_points(struct bm_replica *r, struct model *m, char *msg, size_t len)
{
	struct bm_replica_point *list;
	size_t n;
	int bad = 0;

	if (bm_replica_points(r, &list, &n) < 0) {
		snprintf(msg, len, "points: %s", blockmirror_last_error());
		return -1;
	}
	for (size_t i = 0; !bad && i < n; i++) {
		uint8_t *got;
		int64_t at;

		if (!m->snap[list[i].number]) {
			snprintf(msg, len, "point %" PRIu64 " listed, never "
				 "committed", list[i].number);
			bad = 1;
			break;
		}
		got = read_image(list[i].image, m->size, msg, len);
		if (!got) {
			bad = 1;
			break;
		}
		at = differs(got, m->snap[list[i].number], m->size);
		if (at >= 0) {
			snprintf(msg, len, "point %" PRIu64 " (%s) differs at "
				 "byte %" PRId64, list[i].number,
				 list[i].image, at);
			bad = 1;
		}
		free(got);
	}
	free(list);
	return bad ? -1 : (int)n;
}

/* The files a crash or a tidy may not leave: layers that no point
 * names (but `extra` of them: a merge into a layer waits while the
 * point above it is pinned), temporary files.  -1 with msg if one is
 * there. */
static int
check_files(struct bm_replica *r, unsigned extra, char *msg, size_t len)
{
	struct bm_replica_point *list;
	size_t n;
	DIR *d = opendir(rdir);
	struct dirent *e;
	int bad = 0;

	ck_assert(d);
	ck_assert_int_eq(bm_replica_points(r, &list, &n), 0);
	while (!bad && (e = readdir(d))) {
		char path[4200];
		bool named = false;

		if (!strncmp(e->d_name, "test-", 5) || e->d_name[0] == '.')
			continue;
		snprintf(path, sizeof path, "%s/%s", rdir, e->d_name);
		for (size_t i = 0; i < n; i++)
			named |= !strcmp(list[i].image, path);
		named |= !strcmp(e->d_name, "replica.json") ||
			 !strcmp(e->d_name, "replica.lock") ||
			 !strcmp(path, bm_replica_base(r));
		if (!named && (strncmp(e->d_name, "layer-", 6) ||
			       !extra--)) {
			snprintf(msg, len, "%s: left, named by no point", path);
			bad = 1;
		}
	}
	closedir(d);
	free(list);
	return bad ? -1 : 0;
}

/* ---- the model test --------------------------------------------------- */

struct reader {
	uint64_t point;
	struct blockmirror_disk *disk;
};

START_TEST(test_model)
{
	unsigned cycles = (unsigned)env_u64("BM_REPLICA_CYCLES", 40);
	uint64_t rng = seed + (uint64_t)_i * 0x9e3779b97f4a7c15ull;
	uint32_t g = rnd_range(&rng, 2) ? 64 * 1024 : 4096;
	uint64_t size = 24 * g + (rnd_range(&rng, 2) ? 4096 * 3 : 4096);
	struct bm_replica_stats st0, st1;
	struct reader readers[4] = { { 0 } };
	struct bm_replica *r;
	struct model m;
	uint8_t *buf = malloc(size);
	char msg[4400];
	uint64_t point = 0;

	fprintf(stderr, "model: seed %" PRIu64 " loop %d: granule %" PRIu32
		", disk %" PRIu64 "\n", seed, _i, g, size);
	model_init(&m, size, g);
	ck_assert_int_eq(bm_replica_create(rdir, size, NULL, g, &r), 0);
	for (unsigned c = 0; c < cycles; c++) {
		struct reader *rd = &readers[rnd_range(&rng, 4)];
		int n;

		if (rnd_range(&rng, 6) == 0) {
			struct bm_replica_policy p = {
				.keep = (unsigned)rnd_range(&rng, 4),
				.every_s = (uint32_t)rnd_range(&rng, 3),
			};

			ck_assert_int_eq(bm_replica_set_policy(r, &p), 0);
		}
		/* Pin a random listed point with a reader, or let one go. */
		if (rd->disk && rnd_range(&rng, 3) == 0) {
			blockmirror_disk_close(rd->disk);
			rd->disk = NULL;
			ck_assert_int_eq(bm_replica_unpin(r, rd->point), 0);
		} else if (!rd->disk && point && rnd_range(&rng, 3) == 0) {
			struct bm_replica_point *list;
			size_t np;
			char *image;

			ck_assert_int_eq(bm_replica_points(r, &list, &np), 0);
			rd->point = list[rnd_range(&rng, np)].number;
			free(list);
			ck_assert_int_eq(bm_replica_pin(r, rd->point, &image),
					 0);
			rd->disk = blockmirror_disk_open(
				image, BLOCKMIRROR_FORMAT_AUTO,
				BLOCKMIRROR_DISK_READONLY);
			ck_assert_msg(rd->disk, "%s", blockmirror_last_error());
			free(image);
		}
		point += 1 + rnd_range(&rng, 3);
		bm_replica_get_stats(r, &st0);
		cycle(r, &m, point, (int64_t)point * 700000000,
		      1 + (unsigned)rnd_range(&rng, 6), &rng);
		bm_replica_get_stats(r, &st1);
		/* A tidy writes what the merged layers hold, no more. */
		ck_assert_uint_le(st1.merge_bytes - st0.merge_bytes,
				  st1.merged_alloc - st0.merged_alloc);
		n = check_points(r, &m, msg, sizeof msg);
		ck_assert_msg(n > 0, "after point %" PRIu64 ": %s", point, msg);
		{
			struct bm_replica_point *list;
			size_t np;
			unsigned pins = 0;

			ck_assert_int_eq(bm_replica_points(r, &list, &np), 0);
			ck_assert(list[np - 1].latest);
			ck_assert_uint_eq(list[np - 1].number, point);
			for (size_t i = 0; i < np; i++)
				pins += list[i].pinned;
			/* One layer a point, one more a pin at most (a
			 * merge into it waits for the unpin). */
			ck_assert_uint_le(chain_depth(list[np - 1].image),
					  np + pins);
			free(list);
			ck_assert_msg(check_files(r, pins, msg, sizeof msg) ==
				      0, "%s", msg);
		}
		for (size_t i = 0; i < 4; i++) {
			if (!readers[i].disk)
				continue;
			ck_assert_int_eq(blockmirror_disk_read(
						 readers[i].disk, buf, size, 0),
					 0);
			ck_assert_msg(differs(buf, m.snap[readers[i].point],
					      size) < 0,
				      "a reader of pinned point %" PRIu64
				      " sees it change", readers[i].point);
		}
	}
	for (size_t i = 0; i < 4; i++)
		if (readers[i].disk) {
			blockmirror_disk_close(readers[i].disk);
			ck_assert_int_eq(bm_replica_unpin(r, readers[i].point),
					 0);
		}
	bm_replica_get_stats(r, &st1);
	{
		uint64_t sent = 0;

		for (uint64_t p = 1; p <= point; p++)
			sent += m.bytes[p];
		fprintf(stderr, "model: %u cycles, %" PRIu64 " bytes received, "
			"%" PRIu64 " merged in %" PRIu64 " merges\n", cycles,
			sent, st1.merge_bytes, st1.merges);
	}
	/* Reopened, the same points read the same. */
	bm_replica_close(r);
	ck_assert_msg(bm_replica_open(rdir, &r) == 0, "%s",
		      blockmirror_last_error());
	ck_assert_msg(check_points(r, &m, msg, sizeof msg) > 0, "%s", msg);
	ck_assert_msg(check_files(r, 0, msg, sizeof msg) == 0, "%s", msg);
	bm_replica_close(r);
	model_free(&m);
	free(buf);
}
END_TEST

/* ---- a reader of a pinned point, retention ---------------------------- */

START_TEST(test_pinned_reader)
{
	uint64_t rng = seed ^ 0x1234, size = 8 * 65536 + 4096;
	struct bm_replica_point *list;
	struct blockmirror_disk *rd;
	struct bm_replica_policy keep2 = { .keep = 2, .every_s = 10 };
	struct bm_replica *r;
	struct model m;
	uint8_t *buf = malloc(size);
	char *image, msg[4400];
	size_t n;

	model_init(&m, size, 65536);
	ck_assert_int_eq(bm_replica_create(rdir, size, NULL, 0, &r), 0);
	cycle(r, &m, 1, 0, 4, &rng);
	cycle(r, &m, 2, 1000000000, 4, &rng);
	ck_assert_int_eq(bm_replica_pin(r, 0, &image), 0);
	rd = blockmirror_disk_open(image, BLOCKMIRROR_FORMAT_AUTO,
				   BLOCKMIRROR_DISK_READONLY);
	ck_assert(rd);
	/* keep 0: every later cycle merges; the pinned point stays. */
	for (uint64_t p = 3; p < 10; p++) {
		cycle(r, &m, p, (int64_t)p * 1000000000, 3, &rng);
		ck_assert_int_eq(blockmirror_disk_read(rd, buf, size, 0), 0);
		ck_assert(differs(buf, m.snap[2], size) < 0);
		ck_assert_int_eq(bm_replica_points(r, &list, &n), 0);
		ck_assert_uint_eq(n, 2);
		ck_assert_uint_eq(list[0].number, 2);
		ck_assert(list[0].pinned && !list[0].retained);
		free(list);
	}
	blockmirror_disk_close(rd);
	ck_assert_int_eq(bm_replica_unpin(r, 2), 0);
	ck_assert_int_eq(bm_replica_unpin(r, 2), -ENOENT);
	free(image);
	ck_assert_int_eq(bm_replica_points(r, &list, &n), 0);
	ck_assert_uint_eq(n, 1);
	free(list);
	/* keep 2 windows of 10 s: the first point of each window. */
	ck_assert_int_eq(bm_replica_set_policy(r, &keep2), 0);
	for (uint64_t p = 10; p < 40; p++)
		cycle(r, &m, p, (int64_t)p * 1000000000, 2, &rng);
	ck_assert_int_eq(bm_replica_points(r, &list, &n), 0);
	ck_assert_uint_eq(n, 3);
	ck_assert_uint_eq(list[0].number, 20);
	ck_assert_uint_eq(list[1].number, 30);
	ck_assert_uint_eq(list[2].number, 39);
	ck_assert(list[0].retained && list[1].retained && list[2].latest);
	free(list);
	ck_assert_msg(check_points(r, &m, msg, sizeof msg) == 3, "%s", msg);
	/* A test overlay: writable, its point unchanged, gone on discard. */
	ck_assert_int_eq(bm_replica_test_overlay(r, 20, &image), 0);
	{
		char *again;

		ck_assert_int_eq(bm_replica_test_overlay(r, 20, &again),
				 -EEXIST);
		ck_assert_ptr_null(again);
	}
	rd = blockmirror_disk_open(image, BLOCKMIRROR_FORMAT_AUTO, 0);
	ck_assert(rd);
	memset(buf, 0xa5, 4096);
	ck_assert_int_eq(blockmirror_disk_write(rd, buf, 4096, 0, 0), 0);
	ck_assert_int_eq(blockmirror_disk_close(rd), 0);
	ck_assert_int_eq(bm_replica_set_policy(
				 r, &(struct bm_replica_policy){ 0 }), 0);
	cycle(r, &m, 40, 40000000000, 2, &rng);
	{
		char *base;
		uint64_t disc;

		ck_assert_int_eq(bm_replica_promote(r, 0, &base, &disc),
				 -EBUSY);
		ck_assert(strstr(blockmirror_last_error(), "test overlay"));
	}
	/* Across an open too. */
	bm_replica_close(r);
	ck_assert_int_eq(bm_replica_open(rdir, &r), 0);
	ck_assert_msg(check_points(r, &m, msg, sizeof msg) == 2, "%s", msg);
	/* The overlay reads as point 20 but for its own write. */
	{
		uint8_t *got = read_image(image, size, msg, sizeof msg);

		ck_assert_msg(got, "%s", msg);
		memset(m.snap[20], 0xa5, 4096);
		ck_assert(differs(got, m.snap[20], size) < 0);
		free(got);
	}
	ck_assert_int_eq(bm_replica_test_discard(r, 20), 0);
	ck_assert(access(image, F_OK) < 0);
	free(image);
	ck_assert_int_eq(bm_replica_points(r, &list, &n), 0);
	ck_assert_uint_eq(n, 1);
	free(list);
	ck_assert_msg(check_files(r, 0, msg, sizeof msg) == 0, "%s", msg);
	bm_replica_close(r);
	model_free(&m);
	free(buf);
}
END_TEST

/* A reader on its own thread, reading a pinned point over and over. */
struct bg_reader {
	struct blockmirror_disk *disk;
	const uint8_t *want;
	uint64_t size;
	atomic_bool stop;
	unsigned reads, wrong, errors;
};

static void *
bg_reader_main(void *arg)
{
	struct bg_reader *b = arg;
	uint8_t *buf = malloc(b->size);

	while (!atomic_load(&b->stop)) {
		if (blockmirror_disk_read(b->disk, buf, b->size, 0) < 0)
			b->errors++;
		else if (differs(buf, b->want, b->size) >= 0)
			b->wrong++;
		b->reads++;
	}
	free(buf);
	return NULL;
}

/* Layers below a pinned point are merged and its image re-pointed while
 * a reader reads it: every read returns the point. */
START_TEST(test_reader_during_merges)
{
	uint64_t rng = seed ^ 0x2468, size = 16 * 65536 + 4096;
	struct bm_replica_policy none = { 0 };
	struct bg_reader b = { .size = size };
	struct bm_replica *r;
	struct model m;
	pthread_t t;
	char *image;

	r = store_with_points(&m, size, 2, 3, 6, &rng);
	ck_assert_int_eq(bm_replica_pin(r, 3, &image), 0);
	ck_assert_uint_eq(chain_depth(image), 3);
	b.disk = blockmirror_disk_open(image, BLOCKMIRROR_FORMAT_AUTO,
				       BLOCKMIRROR_DISK_READONLY);
	ck_assert(b.disk);
	b.want = m.snap[3];
	ck_assert_int_eq(pthread_create(&t, NULL, bg_reader_main, &b), 0);
	/* 1 and 2 go: 2 is merged into the base, 3 re-pointed at it; then
	 * every cycle merges above 3. */
	ck_assert_int_eq(bm_replica_set_policy(r, &none), 0);
	for (uint64_t p = 4; p <= 12; p++)
		cycle(r, &m, p, (int64_t)p, 6, &rng);
	atomic_store(&b.stop, true);
	pthread_join(t, NULL);
	fprintf(stderr, "reader: %u reads during merges\n", b.reads);
	ck_assert_uint_gt(b.reads, 0);
	ck_assert_uint_eq(b.errors, 0);
	ck_assert_uint_eq(b.wrong, 0);
	ck_assert_uint_eq(chain_depth(image), 2);
	blockmirror_disk_close(b.disk);
	ck_assert_int_eq(bm_replica_unpin(r, 3), 0);
	free(image);
	bm_replica_close(r);
	model_free(&m);
}
END_TEST

/* A pinned point over a dropped one: its file stays, with a test
 * overlay naming it; the merge waits for the unpin. */
START_TEST(test_pin_over_dropped)
{
	uint64_t rng = seed ^ 0x4321, size = 6 * 65536 + 4096;
	struct bm_replica_policy none = { 0 };
	struct bm_replica_point *list;
	struct bm_replica *r;
	struct model m;
	char *pin, *test, msg[4400];
	uint8_t *got;
	size_t n;

	r = store_with_points(&m, size, 5, 3, 3, &rng);
	ck_assert_int_eq(bm_replica_pin(r, 2, &pin), 0);
	ck_assert_int_eq(bm_replica_test_overlay(r, 2, &test), 0);
	ck_assert_int_eq(bm_replica_set_policy(r, &none), 0);
	cycle(r, &m, 4, 4, 3, &rng);
	ck_assert_int_eq(bm_replica_points(r, &list, &n), 0);
	ck_assert_uint_eq(n, 2);
	ck_assert_uint_eq(list[0].number, 2);
	ck_assert_str_eq(list[0].image, pin);
	free(list);
	got = read_image(test, size, msg, sizeof msg);
	ck_assert_msg(got, "%s", msg);
	ck_assert(differs(got, m.snap[2], size) < 0);
	free(got);
	ck_assert_int_eq(bm_replica_unpin(r, 2), 0);
	ck_assert_int_eq(bm_replica_test_discard(r, 2), 0);
	ck_assert_int_eq(bm_replica_points(r, &list, &n), 0);
	ck_assert_uint_eq(n, 1);
	ck_assert_uint_eq(chain_depth(list[0].image), 1);
	free(list);
	ck_assert_msg(check_points(r, &m, msg, sizeof msg) == 1, "%s", msg);
	ck_assert_msg(check_files(r, 0, msg, sizeof msg) == 0, "%s", msg);
	free(pin);
	free(test);
	bm_replica_close(r);
	model_free(&m);
}
END_TEST

/* The deepest chain the limits allow: 16 retained points, 7 pinned ones
 * each over a dropped point whose merge waits; every point opens, and
 * so does the next cycle's image and a test overlay. */
START_TEST(test_limits)
{
	uint64_t rng = seed ^ 0x5151, size = 4 * 65536, p;
	struct bm_replica_policy keep = { .keep = BM_REPLICA_MAX_KEEP };
	struct bm_replica *r;
	struct model m;
	char *image, msg[4400];

	model_init(&m, size, 65536);
	ck_assert_int_eq(bm_replica_create(rdir, size, NULL, 0, &r), 0);
	keep.keep++;
	ck_assert_int_eq(bm_replica_set_policy(r, &keep), -EINVAL);
	keep.keep--;
	ck_assert_int_eq(bm_replica_set_policy(r, &keep), 0);
	for (p = 1; p <= 17; p++)
		cycle(r, &m, p, (int64_t)p, 1, &rng);
	for (p = 2; p <= 14; p += 2) {
		ck_assert_int_eq(bm_replica_pin(r, p, &image), 0);
		free(image);
	}
	ck_assert_int_eq(bm_replica_pin(r, 4, &image), 0);
	free(image);
	ck_assert_int_eq(bm_replica_pin(r, 15, &image), -EMFILE);
	ck_assert_int_eq(bm_replica_test_overlay(r, 15, &image), -EMFILE);
	/* 1, 3, ..., 15 fall out of the newest 16; 16 and on stay. */
	for (p = 18; p <= 34; p++)
		cycle(r, &m, p, (int64_t)p, 1, &rng);
	ck_assert_msg(check_points(r, &m, msg, sizeof msg) == 24, "%s", msg);
	{
		struct bm_replica_point *list;
		size_t n;

		ck_assert_int_eq(bm_replica_points(r, &list, &n), 0);
		/* A layer a point, and one below each pinned point. */
		ck_assert_uint_eq(chain_depth(list[n - 1].image), 24 + 7);
		free(list);
	}
	ck_assert_int_eq(bm_replica_test_overlay(r, 2, &image), 0);
	{
		uint8_t *got = read_image(image, size, msg, sizeof msg);

		ck_assert_msg(got, "%s", msg);
		ck_assert(differs(got, m.snap[2], size) < 0);
		free(got);
	}
	free(image);
	cycle(r, &m, 35, 35, 1, &rng);
	ck_assert_int_eq(bm_replica_test_discard(r, 2), 0);
	for (p = 2; p <= 14; p += 2)
		ck_assert_int_eq(bm_replica_unpin(r, p), 0);
	ck_assert_int_eq(bm_replica_unpin(r, 4), 0);
	ck_assert_msg(check_points(r, &m, msg, sizeof msg) == 17, "%s", msg);
	ck_assert_msg(check_files(r, 0, msg, sizeof msg) == 0, "%s", msg);
	bm_replica_close(r);
	model_free(&m);
}
END_TEST

/* A cycle of one 4 KiB granule costs one 4 KiB merge, not a cluster's
 * worth: the layers' clusters are the granule. */
START_TEST(test_merge_cost)
{
	uint64_t rng = seed ^ 0xc057, size = 64 * 4096;
	struct bm_replica_stats st0, st1;
	struct bm_replica *r;
	struct model m;

	model_init(&m, size, 4096);
	ck_assert_int_eq(bm_replica_create(rdir, size, NULL, 4096, &r), 0);
	cycle(r, &m, 1, 1, 1, &rng);
	for (uint64_t p = 2; p <= 12; p++) {
		bm_replica_get_stats(r, &st0);
		cycle(r, &m, p, (int64_t)p, 1, &rng);
		bm_replica_get_stats(r, &st1);
		ck_assert_uint_eq(st1.merges - st0.merges, 1);
		ck_assert_uint_le(st1.merge_bytes - st0.merge_bytes, 4096);
		ck_assert_uint_le(st1.merged_alloc - st0.merged_alloc, 4096);
	}
	bm_replica_close(r);
	model_free(&m);
}
END_TEST

/* ---- failing steps ---------------------------------------------------- */

/* Fail the `nth` step `step` on a path holding `what` (after a rename
 * onto the state, with `after_state`), once, with `err`. */
static struct fault {
	enum bm_durable_step step;
	const char *what;
	unsigned nth;
	bool after_state, renamed;
	int err;
	bool fired;
} F;

static int
fault_hook(const struct bm_durable_event *ev)
{
	if (ev->done) {
		F.renamed |= ev->step == BM_DURABLE_RENAME && ev->path2 &&
			     strstr(ev->path2, "replica.json");
		return 0;
	}
	if (F.fired || ev->step != F.step || !strstr(ev->path, F.what) ||
	    (F.after_state && !F.renamed) || --F.nth)
		return 0;
	F.fired = true;
	return F.err;
}

static void
fault_arm(enum bm_durable_step step, const char *what, unsigned nth,
	  bool after_state)
{
	F = (struct fault){ .step = step, .what = what, .nth = nth,
			 .after_state = after_state, .err = -EIO };
	bm_durable_hook = fault_hook;
}

/* Begin and write a cycle; the model's snapshot, ready for a commit. */
static void
cycle_open(struct bm_replica *r, struct model *m, uint64_t point,
	   uint64_t *rng)
{
	char *image;

	ck_assert_int_eq(bm_replica_begin(r, point, GEN_A, &image), 0);
	m->bytes[point] = write_cycle(m, image, 3, rng);
	free(image);
	m->snap[point] = malloc(m->size);
	memcpy(m->snap[point], m->cur, m->size);
}

START_TEST(test_faults)
{
	uint64_t rng = seed ^ 0xfa17, size = 6 * 65536 + 4096, v;
	struct bm_replica *r;
	struct model m;
	char msg[4400], *image;

	r = store_with_points(&m, size, 0, 2, 3, &rng);

	/* The state renamed into place, its directory's sync failed: the
	 * point may exist, and does in memory; the cycle is over, so an
	 * abort cannot take the latest point's layer. */
	cycle_open(r, &m, 3, &rng);
	fault_arm(BM_DURABLE_FSYNC_DIR, rdir, 1, true);
	ck_assert_int_eq(bm_replica_commit(r, 3, m.bytes[3], false), -EIO);
	bm_durable_hook = NULL;
	ck_assert(F.fired);
	ck_assert_int_eq(bm_replica_latest(r, &v), 0);
	ck_assert_uint_eq(v, 3);
	ck_assert_int_eq(bm_replica_pending(r, &v), -ENOENT);
	ck_assert_int_eq(bm_replica_abort(r), -ENOENT);
	ck_assert_msg(check_points(r, &m, msg, sizeof msg) > 0, "%s", msg);

	/* The state's rename failed: no point 4, the cycle still open;
	 * aborted, the store is as before. */
	memcpy(m.cur, m.snap[3], size);
	cycle_open(r, &m, 4, &rng);
	fault_arm(BM_DURABLE_RENAME, "replica.json", 1, false);
	ck_assert_int_eq(bm_replica_commit(r, 4, m.bytes[4], false), -EIO);
	bm_durable_hook = NULL;
	ck_assert_int_eq(bm_replica_latest(r, &v), 0);
	ck_assert_uint_eq(v, 3);
	ck_assert_int_eq(bm_replica_pending(r, &v), 0);
	ck_assert_uint_eq(v, 4);
	ck_assert_int_eq(bm_replica_abort(r), 0);
	free(m.snap[4]);
	m.snap[4] = NULL;
	memcpy(m.cur, m.snap[3], size);
	ck_assert_msg(check_points(r, &m, msg, sizeof msg) > 0, "%s", msg);

	/* A merge's state write fails (the third: after the commit's and
	 * the drop of 2 and 3): the commit stands, the next begin or open
	 * finishes the tidy. */
	cycle_open(r, &m, 5, &rng);
	fault_arm(BM_DURABLE_RENAME, "replica.json", 3, false);
	ck_assert_int_eq(bm_replica_commit(r, 5, m.bytes[5], false), 0);
	bm_durable_hook = NULL;
	ck_assert(F.fired);
	ck_assert_msg(check_points(r, &m, msg, sizeof msg) > 0, "%s", msg);
	/* The next cycle's begin goes on with the tidy (a full disk that
	 * made a merge fail may have room again). */
	ck_assert_int_eq(bm_replica_begin(r, 6, GEN_A, &image), 0);
	ck_assert_int_eq(bm_replica_abort(r), 0);
	free(image);
	ck_assert_msg(check_files(r, 0, msg, sizeof msg) == 0, "%s", msg);
	bm_replica_close(r);
	ck_assert_int_eq(bm_replica_open(rdir, &r), 0);
	ck_assert_msg(check_points(r, &m, msg, sizeof msg) == 1, "%s", msg);
	ck_assert_msg(check_files(r, 0, msg, sizeof msg) == 0, "%s", msg);
	bm_replica_close(r);
	model_free(&m);
}
END_TEST

/* ---- digests, a seed, promote ---------------------------------------- */

static void
check_digests(struct bm_replica *r, uint64_t point, const uint8_t *want,
	      uint64_t size, uint32_t g, uint64_t from)
{
	uint64_t n = (size - from + g - 1) / g, *d = calloc(n, 8);

	ck_assert_msg(bm_replica_digests(r, point, from, size - from, d) == 0,
		      "%s", blockmirror_last_error());
	for (uint64_t i = 0; i < n; i++) {
		uint64_t off = from + i * g;

		ck_assert_msg(d[i] == XXH3_64bits(want + off,
						  BM_MIN(g, size - off)),
			      "point %" PRIu64 " granule at %" PRIu64, point,
			      off);
	}
	free(d);
}

START_TEST(test_digests_seed_promote)
{
	uint64_t rng = seed ^ 0x777, size = 12 * 65536 + 8192, disc;
	struct bm_replica_gen gen;
	struct bm_replica_point *list;
	struct bm_replica *r;
	struct model m;
	char base[200], *image;
	size_t n;
	FILE *f;

	model_init(&m, size, 65536);
	for (uint64_t i = 0; i < size; i++)
		m.cur[i] = (uint8_t)rnd(&rng);
	ck_assert_int_eq(mkdir(rdir, 0755), 0);
	snprintf(base, sizeof base, "%s/seed.img", rdir);
	f = fopen(base, "w");
	ck_assert(f && fwrite(m.cur, 1, size, f) == size && !fclose(f));
	ck_assert_int_eq(bm_replica_create(rdir, size, base, 0, &r), 0);
	/* No point yet: the base's digests, for a seeded first copy. */
	check_digests(r, 0, m.cur, size, 65536, 0);
	ck_assert_int_eq(bm_replica_latest(r, &disc), -ENOENT);
	ck_assert_int_eq(bm_replica_begin(r, 5, GEN_A, &image), 0);
	ck_assert_str_eq(image, base);
	free(image);
	ck_assert_int_eq(bm_replica_abort(r), 0);
	cycle(r, &m, 5, 5, 3, &rng);
	for (uint64_t p = 6; p < 12; p++)
		cycle(r, &m, p, (int64_t)p, 3, &rng);
	check_digests(r, 0, m.snap[11], size, 65536, 0);
	check_digests(r, 11, m.snap[11], size, 65536, 3 * 65536);
	ck_assert_int_eq(bm_replica_digests(r, 0, 100, 65536, &disc), -EINVAL);
	ck_assert_int_eq(bm_replica_digests(r, 7, 0, 65536, &disc), -ENOENT);
	ck_assert_int_eq(bm_replica_set_policy(
				 r, &(struct bm_replica_policy){ .keep = 3 }),
			 0);
	for (uint64_t p = 12; p < 16; p++)
		cycle(r, &m, p, (int64_t)p, 3, &rng);
	check_digests(r, 13, m.snap[13], size, 65536, 0);
	/* Promote point 13: 14 and 15 are dropped, and say so. */
	ck_assert_int_eq(bm_replica_get_gen(r, &gen), 0);
	ck_assert_int_eq(bm_replica_promote(r, 13, &image, &disc), 0);
	ck_assert_str_eq(image, base);
	ck_assert_uint_eq(disc, m.bytes[14] + m.bytes[15]);
	ck_assert_str_eq(bm_replica_role(r), "primary");
	{
		struct bm_replica_gen g2;

		ck_assert_int_eq(bm_replica_get_gen(r, &g2), 0);
		ck_assert_str_ne(g2.current, gen.current);
		ck_assert_uint_eq(g2.nhistory, 1);
		ck_assert_str_eq(g2.history[0].gen, GEN_A);
		ck_assert_uint_eq(g2.history[0].point, 13);
	}
	ck_assert_int_eq(bm_replica_points(r, &list, &n), 0);
	ck_assert_uint_eq(n, 0);
	free(list);
	{
		char msg[4400];
		uint8_t *got = read_image(image, size, msg, sizeof msg);

		ck_assert_msg(got, "%s", msg);
		ck_assert(differs(got, m.snap[13], size) < 0);
		free(got);
		ck_assert_msg(check_files(r, 0, msg, sizeof msg) == 0, "%s",
			      msg);
	}
	check_digests(r, 0, m.snap[13], size, 65536, 0);
	/* The fence, before and after an open. */
	free(image);
	ck_assert_int_eq(bm_replica_begin(r, 16, GEN_A, &image), -EROFS);
	bm_replica_close(r);
	ck_assert_int_eq(bm_replica_open(rdir, &r), 0);
	ck_assert_int_eq(bm_replica_begin(r, 16, GEN_A, &image), -EROFS);
	ck_assert_int_eq(bm_replica_promote(r, 0, &image, &disc), -EROFS);
	bm_replica_close(r);
	model_free(&m);
}
END_TEST

/* ---- refusals --------------------------------------------------------- */

/* Open with a state edited by `sed_expr`: refused with `want`, the
 * message naming the file and `field`. */
static void
corrupt_with(const char *sed_expr, int want, const char *field)
{
	char cmd[1200], path[200], save[220];
	struct bm_replica *r = NULL;
	int err;

	snprintf(path, sizeof path, "%s/replica.json", rdir);
	snprintf(save, sizeof save, "%s.good", path);
	snprintf(cmd, sizeof cmd, "cp %s %s && sed -i -e '%s' %s", path, save,
		 sed_expr, path);
	ck_assert_int_eq(system(cmd), 0);
	err = bm_replica_open(rdir, &r);
	ck_assert_msg(err == want, "%s: %d (%s)", sed_expr, err,
		      blockmirror_last_error());
	ck_assert_ptr_null(r);
	ck_assert_msg(blockmirror_last_error(), "%s: no message", sed_expr);
	ck_assert_msg(strstr(blockmirror_last_error(), path) &&
		      strstr(blockmirror_last_error(), field),
		      "%s: \"%s\" names not the file and %s", sed_expr,
		      blockmirror_last_error(), field);
	ck_assert_int_eq(rename(save, path), 0);
}

static void
corrupt(const char *sed_expr, const char *field)
{
	corrupt_with(sed_expr, -EBADMSG, field);
}

START_TEST(test_refusals)
{
	uint64_t rng = seed ^ 0x99, size = 4 * 65536;
	struct bm_replica *r, *r2;
	struct model m;
	char path[200], *image;
	FILE *f;

	model_init(&m, size, 65536);
	ck_assert_int_eq(bm_replica_create(rdir, size, NULL, 1000, &r),
			 -EINVAL);
	ck_assert_int_eq(bm_replica_create(rdir, size, NULL, 0, &r), 0);
	/* One process at a time. */
	ck_assert_int_eq(bm_replica_open(rdir, &r2), -EBUSY);
	ck_assert_int_eq(bm_replica_begin(r, 1, "not-a-uuid", &image),
			 -EINVAL);
	cycle(r, &m, 3, 3, 2, &rng);
	ck_assert_int_eq(bm_replica_begin(r, 3, GEN_A, &image), -EINVAL);
	ck_assert(strstr(blockmirror_last_error(), "point 3"));
	ck_assert_int_eq(bm_replica_begin(r, 2, GEN_A, &image), -EINVAL);
	ck_assert_int_eq(bm_replica_begin(r, 4, GEN_A, &image), 0);
	free(image);
	ck_assert_int_eq(bm_replica_begin(r, 5, GEN_A, &image), -EBUSY);
	ck_assert_int_eq(bm_replica_pending(r, &rng), 0);
	ck_assert_uint_eq(rng, 4);
	ck_assert_int_eq(bm_replica_promote(r, 0, &image, &rng), -EBUSY);
	ck_assert_int_eq(bm_replica_abort(r), 0);
	ck_assert_int_eq(bm_replica_abort(r), -ENOENT);
	ck_assert_int_eq(bm_replica_pin(r, 9, &image), -ENOENT);
	bm_replica_close(r);
	ck_assert_int_eq(bm_replica_create(rdir, size, NULL, 0, &r), -EEXIST);

	corrupt("s/\"granularity\": 65536/\"granularity\": 3/", "granularity");
	corrupt("s/\"version\": 1/\"version\": 2/", "version");
	corrupt("s/\"role\": \"replica\"/\"role\": \"boss\"/", "role");
	corrupt("s/\"layer\": 0/\"layer\": 7/", "layer");
	corrupt("/\"layers\"/,/]/d", "layers");
	corrupt("s/\"generation\": \"0/\"generation\": \"x/", "generation");
	corrupt("s/\"base\": \"base.raw\"/\"base\": \"..\\/x\"/", "base");
	corrupt("1,5d", "replica.json");
	corrupt("s/\"size\": [0-9]*/\"size\": -1/", "size");
	/* The base is not the size the state says. */
	corrupt_with("s/\"size\": 262144/\"size\": 327680/", -EINVAL,
		     "base.raw");

	corrupt("s/\"base\": \"base.raw\"/\"base\": \"layer-00000001.qcow2\"/",
		"base");

	/* A base of the wrong size, or outside DIR, or with a name the
	 * store's own files have: refused, and left alone. */
	snprintf(path, sizeof path, "%s/b2", dir);
	ck_assert_int_eq(mkdir(path, 0755), 0);
	snprintf(path, sizeof path, "%s/b2/seed.raw", dir);
	f = fopen(path, "w");
	ck_assert(f && !ftruncate(fileno(f), size + 512) && !fclose(f));
	ck_assert_int_eq(bm_replica_create(dir, size, path, 0, &r), -EXDEV);
	snprintf(path, sizeof path, "%s/b2", dir);
	{
		char seedp[260];

		snprintf(seedp, sizeof seedp, "%s/seed.raw", path);
		ck_assert_int_eq(bm_replica_create(path, size, seedp, 0, &r),
				 -EINVAL);
		ck_assert_msg(strstr(blockmirror_last_error(), seedp), "%s",
			      blockmirror_last_error());
		snprintf(seedp, sizeof seedp, "%s/layer-00000001.qcow2", path);
		f = fopen(seedp, "w");
		ck_assert(f && !ftruncate(fileno(f), size) && !fclose(f));
		ck_assert_int_eq(bm_replica_create(path, size, seedp, 0, &r),
				 -EINVAL);
		ck_assert_msg(strstr(blockmirror_last_error(), seedp), "%s",
			      blockmirror_last_error());
		ck_assert(access(seedp, F_OK) == 0);
	}
	model_free(&m);
}
END_TEST

/* Random damage to replica.json (bytes changed, cut, a range removed):
 * open returns 0 or an error with a message, never a crash (the
 * sanitizer build makes that a check of memory too). */
START_TEST(test_state_fuzz)
{
	unsigned runs = (unsigned)env_u64("BM_REPLICA_FUZZ", 60);
	uint64_t rng = seed ^ 0xf022, size = 4 * 65536 + 4096;
	struct bm_replica *r;
	struct model m;
	char cmd[600], path[200], *text;
	size_t len;
	FILE *f;

	r = store_with_points(&m, size, 2, 4, 2, &rng);
	ck_assert_int_eq(bm_replica_pin(r, 3, &text), 0);
	free(text);
	ck_assert_int_eq(bm_replica_test_overlay(r, 3, &text), 0);
	free(text);
	bm_replica_close(r);
	snprintf(cmd, sizeof cmd, "cp -a %s %s.orig", rdir, rdir);
	ck_assert_int_eq(system(cmd), 0);
	snprintf(path, sizeof path, "%s.orig/replica.json", rdir);
	f = fopen(path, "r");
	ck_assert(f);
	text = malloc(1 << 16);
	len = fread(text, 1, 1 << 16, f);
	fclose(f);
	snprintf(path, sizeof path, "%s/replica.json", rdir);
	for (unsigned i = 0; i < runs; i++) {
		char *t = malloc(len);
		size_t n = len, at = rnd_range(&rng, len), cut;
		int err;

		memcpy(t, text, len);
		switch (rnd_range(&rng, 3)) {
		case 0:
			for (unsigned k = 1 + rnd_range(&rng, 3); k--;)
				t[rnd_range(&rng, len)] = "0123456789-,:\"[]{}ax"
					[rnd_range(&rng, 20)];
			break;
		case 1:
			n = at;
			break;
		default:
			cut = 1 + rnd_range(&rng, 40);
			n = len - BM_MIN(len - at, cut);
			memmove(t + at, t + len - n + at, n - at);
			break;
		}
		snprintf(cmd, sizeof cmd, "rm -rf %s && cp -a %s.orig %s",
			 rdir, rdir, rdir);
		ck_assert_int_eq(system(cmd), 0);
		f = fopen(path, "w");
		ck_assert(f && fwrite(t, 1, n, f) == n && !fclose(f));
		r = NULL;
		err = bm_replica_open(rdir, &r);
		if (err == 0)
			bm_replica_close(r);
		else
			ck_assert_msg(blockmirror_last_error() && !r,
				      "run %u: %d without a message", i, err);
		free(t);
	}
	free(text);
	model_free(&m);
}
END_TEST

/* ---- power loss ------------------------------------------------------- */

#define C_SIZE (8 * 65536 + 12288)
#define C_POINTS 12

static struct {
	struct model m;
	uint64_t begun[C_POINTS + 2], returned[C_POINTS + 2];
	uint64_t promote_start, promote_done;
} C;

static void
crash_cycle(struct bm_replica *r, uint64_t point, uint64_t *rng)
{
	C.begun[point] = rec_event("commit %" PRIu64, point);
	cycle(r, &C.m, point, (int64_t)point * 1000000000, 3, rng);
	C.returned[point] = rec_event("commit %" PRIu64 " returned", point);
}

static void
record(uint64_t *rng)
{
	struct bm_replica_policy keep1 = { .keep = 1, .every_s = 4 };
	struct bm_replica *r;
	char *image;
	uint64_t disc;

	model_init(&C.m, C_SIZE, 65536);
	ck_assert_int_eq(bm_replica_create(rdir, C_SIZE, NULL, 0, &r), 0);
	bm_replica_close(r);
	ck_assert_int_eq(rec_start(dir), 0);
	writer_flushes = false;
	/* Event 0: so that 0 means "never" in C. */
	rec_event("recording");
	ck_assert_int_eq(bm_replica_open(rdir, &r), 0);
	/* The first point into the base, then cycles merging. */
	for (uint64_t p = 1; p <= 4; p++)
		crash_cycle(r, p, rng);
	/* Points 4 (window 1) and 8 (window 2) are retained. */
	ck_assert_int_eq(bm_replica_set_policy(r, &keep1), 0);
	for (uint64_t p = 5; p <= 9; p++)
		crash_cycle(r, p, rng);
	/* Windows of 4 s: 4 was kept, then 8 took over at 9. */
	ck_assert_int_eq(bm_replica_begin(r, 10, GEN_A, &image), 0);
	write_cycle(&C.m, image, 2, rng);
	ck_assert_int_eq(bm_replica_abort(r), 0);
	memcpy(C.m.cur, C.m.snap[9], C_SIZE);
	free(image);
	for (uint64_t p = 10; p <= C_POINTS; p++)
		crash_cycle(r, p, rng);
	C.promote_start = rec_event("promote");
	ck_assert_int_eq(bm_replica_promote(r, 8, &image, &disc), 0);
	/* Every cycle after 8 is lost, those retention had dropped too. */
	ck_assert_uint_eq(disc, C.m.bytes[9] + C.m.bytes[10] + C.m.bytes[11] +
				C.m.bytes[12]);
	C.promote_done = rec_event("promote returned");
	free(image);
	bm_replica_close(r);
	rec_stop();
	writer_flushes = true;
}

/* After reopening at crash point k: 0, or -1 with msg. */
static int
check_crash(uint64_t k, uint64_t *rng, char *msg, size_t len)
{
	struct bm_replica *r;
	uint64_t last = 0, inflight = 0, latest = 0, next;
	char *image;
	int n;

	for (uint64_t p = 1; p <= C_POINTS; p++) {
		if (C.returned[p] && C.returned[p] < k)
			last = p;
		else if (C.begun[p] && C.begun[p] < k && !inflight)
			inflight = p;
	}
	if (bm_replica_open(rdir, &r) < 0) {
		snprintf(msg, len, "open: %s", blockmirror_last_error());
		return -1;
	}
	if (!strcmp(bm_replica_role(r), "primary")) {
		uint8_t *got;

		if (k <= C.promote_start) {
			snprintf(msg, len, "a primary before the promote");
			goto fail;
		}
		got = read_image(bm_replica_base(r), C_SIZE, msg, len);
		if (!got || differs(got, C.m.snap[8], C_SIZE) >= 0) {
			if (got)
				snprintf(msg, len, "promoted base differs");
			free(got);
			goto fail;
		}
		free(got);
		if (bm_replica_latest(r, &latest) != -ENOENT) {
			snprintf(msg, len, "points left after a promote");
			goto fail;
		}
		bm_replica_close(r);
		return 0;
	}
	if (k > C.promote_done) {
		snprintf(msg, len, "not a primary after the promote returned");
		goto fail;
	}
	n = check_points(r, &C.m, msg, len);
	if (n < 0 || check_files(r, 0, msg, len) < 0)
		goto fail;
	if (bm_replica_latest(r, &latest) < 0)
		latest = 0;
	if (latest != last && latest != inflight) {
		snprintf(msg, len, "latest %" PRIu64 ", the last commit that "
			 "returned is %" PRIu64, latest, last);
		goto fail;
	}
	/* It takes the next cycle (sometimes: it costs). */
	if (rec_rand(rng) % 4 == 0) {
		struct model m2;

		next = (latest ? latest : 0) + 20;
		model_init(&m2, C_SIZE, 65536);
		if (latest)
			memcpy(m2.cur, C.m.snap[latest], C_SIZE);
		for (uint64_t p = 1; p <= C_POINTS; p++)
			m2.snap[p] = C.m.snap[p];
		if (!latest && bm_replica_begin(r, next, GEN_A, &image) == 0) {
			/* No point: the base holds a partial first copy;
			 * the model's first point rewrites it whole. */
			struct blockmirror_disk *d = blockmirror_disk_open(
				image, BLOCKMIRROR_FORMAT_RAW, 0);

			ck_assert(d);
			ck_assert_int_eq(blockmirror_disk_write_zeroes(
						 d, C_SIZE, 0, 0), 0);
			blockmirror_disk_close(d);
			ck_assert_int_eq(bm_replica_abort(r), 0);
			free(image);
		}
		cycle(r, &m2, next, (int64_t)next * 1000000000, 2, rng);
		n = check_points(r, &m2, msg, len);
		for (uint64_t p = 1; p <= C_POINTS; p++)
			m2.snap[p] = NULL;
		model_free(&m2);
		if (n < 0)
			goto fail;
	}
	bm_replica_close(r);
	return 0;
fail:
	bm_replica_close(r);
	return -1;
}

START_TEST(test_power_loss)
{
	unsigned points = (unsigned)env_u64("BM_CRASH_POINTS", 150), fails = 0;
	uint64_t rng = env_seed("BM_CRASH_SEED"), nev, nfp = 0, *fps;
	uint64_t *ks;
	char msg[4400];

	fprintf(stderr, "power loss: seed %" PRIu64 "\n", rng);
	record(&rng);
	nev = rec_now();
	fps = malloc(nev * sizeof *fps);
	ks = malloc(points * sizeof *ks);
	for (uint64_t s = 0; s < nev; s++)
		if (rec_is_flush_point(s))
			fps[nfp++] = s + 1;
	/* Half right after flush points (evenly), half anywhere. */
	for (unsigned i = 0; i < points; i++)
		ks[i] = i % 2 && nfp ? fps[(uint64_t)(i / 2) * nfp /
					   ((points + 1) / 2)]
				     : 1 + rec_rand(&rng) % nev;
	for (unsigned i = 1; i < points; i++)
		for (unsigned j = i; j > 0 && ks[j - 1] > ks[j]; j--) {
			uint64_t t = ks[j];

			ks[j] = ks[j - 1];
			ks[j - 1] = t;
		}
	for (unsigned i = 0; i < points; i++) {
		enum rec_variant v = (enum rec_variant)(i % REC_VARIANTS);

		ck_assert_int_eq(rec_materialize(ks[i], v, &rng), 0);
		if (check_crash(ks[i], &rng, msg, sizeof msg) < 0) {
			fprintf(stderr, "crash before event %" PRIu64 " (%s), "
				"variant %d: %s\n", ks[i],
				rec_describe(ks[i] - 1), v, msg);
			fails++;
		}
	}
	fprintf(stderr, "power loss: %" PRIu64 " events, %" PRIu64 " flush "
		"points, %u crash points, %u failures\n", nev, nfp, points,
		fails);
	ck_assert_uint_eq(fails, 0);
	free(fps);
	free(ks);
	rec_free();
	model_free(&C.m);
}
END_TEST

int
main(void)
{
	Suite *s = suite_create("replica");
	TCase *tc = tcase_create("replica");

	seed = env_seed("BM_REPLICA_SEED");
	fprintf(stderr, "seed %" PRIu64 "\n", seed);
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_set_timeout(tc, 300);
	tcase_add_loop_test(tc, test_model, 0,
			    (int)env_u64("BM_REPLICA_SEEDS", 3));
	tcase_add_test(tc, test_pinned_reader);
	tcase_add_test(tc, test_pin_over_dropped);
	tcase_add_test(tc, test_reader_during_merges);
	tcase_add_test(tc, test_limits);
	tcase_add_test(tc, test_faults);
	tcase_add_test(tc, test_merge_cost);
	tcase_add_test(tc, test_digests_seed_promote);
	tcase_add_test(tc, test_refusals);
	tcase_add_test(tc, test_state_fuzz);
	tcase_add_test(tc, test_power_loss);
	suite_add_tcase(s, tc);
	return run_suite(s) ? EXIT_FAILURE : EXIT_SUCCESS;
}
