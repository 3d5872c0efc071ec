/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The mapped-format engine (lib/format.c), with a toy driver defined
 * here: a header, one table entry per 4 KiB cluster (unallocated, zero,
 * or a file offset), clusters appended at the end of the file, an
 * optional backing file.  The toy answers nowait maps only for clusters
 * it has already allocated, so both the loop's fast path and the worker
 * are exercised.
 *
 * The tests run many requests at once against a byte model of the
 * guest disk: overlapping writes are never issued together (their order
 * would be undefined), but writes into the same cluster are, which is
 * what busy ranges must keep correct (a partial-cluster allocation's fill
 * must not overwrite a neighbour's data).  Then the image is closed,
 * reopened and compared, and block status is checked against the model.
 */
#include <check.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "errors.h"
#include "extent.h"
#include "format.h"
#include "helpers.h"
#include "image.h"
#include "internal.h"

#define TOY_CLUSTER 4096u
#define TOY_MAGIC 0x544f59464d54ull /* "TOYFMT" */
enum { TOY_UNALLOC = 0, TOY_ZERO = 1 };

struct toy {
	struct bm_fmt *f;
	pthread_mutex_t lock;
	uint64_t size, nclusters, table_off, next_free;
	uint64_t *table;
	bool dirty;
};

static int
toy_create(struct bm_fmt *f, uint64_t size, const char *options)
{
	static const char *const known[] = { "backing", NULL };
	uint8_t hdr[4096] = { 0 };
	char backing[256] = "";
	uint64_t n = (size + TOY_CLUSTER - 1) / TOY_CLUSTER;
	int r = bm_fmt_options_check(f, options, known);

	if (r < 0)
		return r;
	bm_fmt_option(options, "backing", backing, sizeof backing);
	bm_put_be64(hdr, TOY_MAGIC);
	bm_put_be64(hdr + 8, size);
	memcpy(hdr + 64, backing, strlen(backing));
	r = bm_fmt_pwrite(f, hdr, sizeof hdr, 0);
	if (r == 0)
		r = bm_fmt_truncate(f, 4096 + n * 8);
	if (r == 0)
		r = bm_fmt_sync(f);
	return r;
}

static int
toy_open(struct bm_fmt *f, unsigned flags, struct bm_fmt_info *info,
	 void **out)
{
	uint8_t hdr[4096];
	struct toy *t;
	int r = bm_fmt_pread(f, hdr, sizeof hdr, 0);

	(void)flags;
	if (r < 0)
		return r;
	if (bm_get_be64(hdr) != TOY_MAGIC)
		return bm_error(-EINVAL, "%s: not a toy image", bm_fmt_name(f));
	t = calloc(1, sizeof *t);
	ck_assert_ptr_nonnull(t);
	pthread_mutex_init(&t->lock, NULL);
	t->f = f;
	t->size = bm_get_be64(hdr + 8);
	t->nclusters = (t->size + TOY_CLUSTER - 1) / TOY_CLUSTER;
	t->table_off = 4096;
	t->table = calloc(t->nclusters + 1, 8);
	r = bm_fmt_pread(f, t->table, t->nclusters * 8, t->table_off);
	ck_assert_int_eq(r, 0);
	t->next_free = (bm_fmt_file_size(f) + TOY_CLUSTER - 1) /
		       TOY_CLUSTER * TOY_CLUSTER;
	for (uint64_t i = 0; i < t->nclusters; i++)
		if (t->table[i] > TOY_ZERO &&
		    t->table[i] + TOY_CLUSTER > t->next_free)
			t->next_free = t->table[i] + TOY_CLUSTER;
	info->virtual_size = t->size;
	info->cluster_size = TOY_CLUSTER;
	info->align = 1;
	if (hdr[64]) {
		hdr[64 + 255] = 0;
		info->backing_name = strdup((char *)hdr + 64);
		info->backing_format = BLOCKMIRROR_FORMAT_RAW;
	}
	*out = t;
	return 0;
}

static void
add_seg(struct bm_map_req *r, enum bm_seg_kind kind, uint64_t len,
	uint64_t host)
{
	struct bm_seg *last = r->nseg ? &r->seg[r->nseg - 1] : NULL;

	if (last && last->kind == kind && kind != BM_SEG_DATA) {
		last->length += len;
		return;
	}
	if (last && kind == BM_SEG_DATA && last->kind == kind &&
	    last->host + last->length == host) {
		last->length += len;
		return;
	}
	r->seg[r->nseg++] = (struct bm_seg){ .length = len, .host = host,
					     .kind = kind };
}

/* A test can stop the worker in the middle of a fill. */
static pthread_mutex_t gate_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t gate_cond = PTHREAD_COND_INITIALIZER;
static bool gate_closed, gate_reached;

static void
hold_fill_point(void)
{
	pthread_mutex_lock(&gate_lock);
	gate_reached = true;
	pthread_cond_broadcast(&gate_cond);
	while (gate_closed)
		pthread_cond_wait(&gate_cond, &gate_lock);
	pthread_mutex_unlock(&gate_lock);
}

static bool
gate_was_reached(void)
{
	bool r;

	pthread_mutex_lock(&gate_lock);
	r = gate_reached;
	pthread_mutex_unlock(&gate_lock);
	return r;
}

static void
gate_set(bool closed)
{
	pthread_mutex_lock(&gate_lock);
	gate_closed = closed;
	gate_reached = false;
	pthread_cond_broadcast(&gate_cond);
	pthread_mutex_unlock(&gate_lock);
}

/*
 * Allocate the cluster at `c`, filling what the write will not cover.
 * The table says "allocated" before the fill is written and the lock is
 * dropped around the fill, as a driver that keeps its fast path open
 * during I/O would: only the engine's busy ranges keep other requests
 * out of the cluster meanwhile.
 */
static int
toy_alloc(struct toy *t, uint64_t c, uint64_t skip, uint64_t len)
{
	uint8_t *buf = malloc(TOY_CLUSTER);
	uint64_t host = t->next_free, old = t->table[c];
	int r = 0;

	ck_assert_ptr_nonnull(buf);
	t->next_free += TOY_CLUSTER;
	t->table[c] = host;
	t->dirty = true;
	pthread_mutex_unlock(&t->lock);
	hold_fill_point();
	if (old == TOY_UNALLOC)
		r = bm_fmt_backing_read(t->f, buf, TOY_CLUSTER,
					c * TOY_CLUSTER);
	else
		memset(buf, 0, TOY_CLUSTER);
	/* The guest's part gets a pattern its write must replace: a lost
	 * write shows up as 0xEE. */
	memset(buf + skip, 0xEE, len);
	if (r == 0)
		r = bm_fmt_pwrite(t->f, buf, TOY_CLUSTER, host);
	free(buf);
	pthread_mutex_lock(&t->lock);
	if (r < 0)
		t->table[c] = old;
	return r;
}

static int
toy_map(void *drv, struct bm_map_req *r)
{
	struct toy *t = drv;
	uint64_t off = r->offset, end = r->offset + r->length;
	int err = 0;

	if (r->nowait) {
		if (pthread_mutex_trylock(&t->lock))
			return -EAGAIN;
	} else {
		pthread_mutex_lock(&t->lock);
	}
	while (off < end && r->nseg < BM_MAP_MAX_SEGS) {
		uint64_t c = off / TOY_CLUSTER, in = off % TOY_CLUSTER;
		uint64_t len = BM_MIN(end - off, TOY_CLUSTER - in);
		uint64_t e = t->table[c];

		switch (r->op) {
		case BM_MAP_READ:
		case BM_MAP_STATUS:
			if (e > TOY_ZERO)
				add_seg(r, BM_SEG_DATA, len, e + in);
			else if (e == TOY_ZERO)
				add_seg(r, BM_SEG_ZERO, len, 0);
			else
				add_seg(r, bm_fmt_has_backing(t->f) ?
					BM_SEG_BACKING : BM_SEG_HOLE, len, 0);
			break;
		case BM_MAP_WRITE:
			if (e <= TOY_ZERO) {
				if (r->nowait) {
					err = -EAGAIN;
					goto out;
				}
				err = toy_alloc(t, c, in, len);
				if (err < 0)
					goto out;
			}
			add_seg(r, BM_SEG_DATA, len, t->table[c] + in);
			break;
		case BM_MAP_ZERO:
		case BM_MAP_DISCARD:
			if (len < TOY_CLUSTER) {
				/* Partial: write zeroes into the cluster. */
				if (e == TOY_ZERO ||
				    (e == TOY_UNALLOC &&
				     !bm_fmt_has_backing(t->f))) {
					add_seg(r, BM_SEG_DONE, len, 0);
					break;
				}
				if (e <= TOY_ZERO) {
					if (r->nowait) {
						err = -EAGAIN;
						goto out;
					}
					err = toy_alloc(t, c, in, len);
					if (err < 0)
						goto out;
				}
				add_seg(r, BM_SEG_DATA, len,
					t->table[c] + in);
				break;
			}
			if (r->nowait) {
				err = -EAGAIN;
				goto out;
			}
			t->table[c] = r->op == BM_MAP_ZERO ? TOY_ZERO :
				      TOY_UNALLOC;
			t->dirty = true;
			add_seg(r, BM_SEG_DONE, len, 0);
			break;
		}
		off += len;
	}
out:
	pthread_mutex_unlock(&t->lock);
	if (err == -EAGAIN || (err < 0 && r->nseg == 0))
		return err;
	return 0;
}

static int
toy_flush(void *drv)
{
	struct toy *t = drv;
	int r;

	pthread_mutex_lock(&t->lock);
	r = bm_fmt_sync(t->f);
	if (r == 0 && t->dirty)
		r = bm_fmt_pwrite(t->f, t->table, t->nclusters * 8,
				  t->table_off);
	if (r == 0 && t->dirty)
		r = bm_fmt_sync(t->f);
	if (r == 0)
		t->dirty = false;
	pthread_mutex_unlock(&t->lock);
	return r;
}

static void
toy_close(void *drv)
{
	struct toy *t = drv;

	pthread_mutex_destroy(&t->lock);
	free(t->table);
	free(t);
}

static const struct bm_fmt_driver toy_driver = {
	.name = "toy",
	.format = BLOCKMIRROR_FORMAT_QCOW2, /* any mapped one */
	.open = toy_open,
	.create = toy_create,
	.map = toy_map,
	.flush = toy_flush,
	.close = toy_close,
};

/* ---- harness ---------------------------------------------------------- */

#define DISK (4u << 20)

static char dir[64], path[96], base_path[96];
static struct bm_loop *loop;
static uint8_t *model, *base_model;

static uint64_t rng_state;

static void
setup(void)
{
	strcpy(dir, "/tmp/test-format.XXXXXX");
	ck_assert_ptr_nonnull(mkdtemp(dir));
	snprintf(path, sizeof path, "%s/top.toy", dir);
	snprintf(base_path, sizeof base_path, "%s/base.raw", dir);
	ck_assert_int_eq(bm_loop_new(64, &loop), 0);
	model = calloc(1, DISK);
	base_model = calloc(1, DISK);
	rng_state = 42;
}

static void
teardown(void)
{
	unlink(path);
	unlink(base_path);
	rmdir(dir);
	bm_loop_free(loop);
	free(model);
	free(base_model);
}

static struct bm_image *
toy_open_path(unsigned flags)
{
	struct bm_store *s;
	struct bm_image *img;

	ck_assert_int_eq(bm_file_open(loop, path, flags & BM_IMAGE_WRITE ?
				      BM_OPEN_WRITE : 0, 0, &s), 0);
	if (bm_fmt_open(&toy_driver, s, path, flags, &img) < 0)
		ck_abort_msg("open: %s", blockmirror_last_error());
	return img;
}

static struct bm_image *
toy_create_path(const char *options)
{
	struct bm_store *s;
	struct bm_image *img;

	ck_assert_int_eq(bm_file_open(loop, path, BM_OPEN_CREATE, 0, &s), 0);
	if (bm_fmt_create(&toy_driver, s, path, DISK, options,
			  BM_IMAGE_WRITE, &img) < 0)
		ck_abort_msg("create: %s", blockmirror_last_error());
	return img;
}

struct op {
	struct bm_io io;
	uint8_t *buf;
	int kind; /* 0 read, 1 write, 2 zero, 3 discard */
	uint64_t done;
	int err;
};

static unsigned outstanding;

static void
op_done(struct bm_io *io, int err)
{
	struct op *o = bm_container_of(io, struct op, io);

	if (err < 0)
		ck_abort_msg("request failed: %s", blockmirror_last_error());
	if (o->kind == 0 && memcmp(o->buf, model + io->offset, io->length))
		ck_abort_msg("read at %lu+%lu differs from the model",
			     (unsigned long)io->offset,
			     (unsigned long)io->length);
	o->done = 1;
	outstanding--;
}

/* A batch of non-overlapping requests in flight at once. */
static void
random_batch(struct bm_image *img, bool writes, bool discard_is_zero)
{
	struct op ops[16];
	uint64_t used[16][2];
	unsigned n = 0;

	memset(ops, 0, sizeof ops);
	for (unsigned i = 0; i < 16; i++) {
		uint64_t len = 1 + rnd(&rng_state) % (3 * TOY_CLUSTER);
		uint64_t off = rnd(&rng_state) % (DISK - len);
		bool clash = false;
		struct op *o = &ops[n];

		if (rnd(&rng_state) % 2)
			len = (len + 511) & ~511ull;
		if (off + len > DISK)
			continue;
		for (unsigned j = 0; j < n; j++)
			if (off < used[j][1] && used[j][0] < off + len)
				clash = true;
		if (clash)
			continue;
		used[n][0] = off;
		used[n][1] = off + len;
		o->buf = malloc(len);
		o->kind = writes ? (int)(rnd(&rng_state) % 4) : 0;
		o->io.offset = off;
		o->io.length = len;
		o->io.buf = o->buf;
		o->io.done = op_done;
		switch (o->kind) {
		case 0:
			bm_image_read(img, &o->io);
			break;
		case 1:
			for (uint64_t b = 0; b < len; b++)
				o->buf[b] = (uint8_t)rnd(&rng_state);
			memcpy(model + off, o->buf, len);
			bm_image_write(img, &o->io);
			break;
		case 2:
			o->io.buf = NULL;
			memset(model + off, 0, len);
			bm_image_zero(img, &o->io);
			break;
		case 3:
			/* Whole clusters only: discard shows the backing
			 * file through; partial ones write zeroes. */
			o->io.buf = NULL;
			for (uint64_t b = off; b < off + len; b++) {
				uint64_t c = b / TOY_CLUSTER;
				bool whole = c * TOY_CLUSTER >= off &&
					     (c + 1) * TOY_CLUSTER <= off + len;

				model[b] = whole && !discard_is_zero ?
					   base_model[b] : 0;
			}
			bm_image_discard(img, &o->io);
			break;
		}
		n++;
		outstanding++;
	}
	while (outstanding)
		ck_assert_int_ge(bm_loop_run_once(loop, -1), 0);
	for (unsigned i = 0; i < n; i++)
		free(ops[i].buf);
}

static void
check_all(struct bm_image *img)
{
	uint8_t *buf = malloc(DISK);
	struct bm_io io = { .offset = 0, .length = DISK, .buf = buf };

	ck_assert_int_eq(bm_image_sync(img, bm_image_read, &io), 0);
	for (uint64_t i = 0; i < DISK; i += TOY_CLUSTER)
		if (memcmp(buf + i, model + i, TOY_CLUSTER))
			ck_abort_msg("cluster at %lu differs", (unsigned long)i);
	free(buf);
}

static void
check_status(struct bm_image *img)
{
	struct bm_extent_list l = { 0 };
	struct bm_io io = { .offset = 0, .length = DISK, .extents = &l };

	ck_assert_int_eq(bm_image_sync(img, bm_image_block_status, &io), 0);
	ck_assert_uint_eq(bm_extent_list_end(&l), DISK);
	ck_assert_uint_eq(l.v[0].offset, 0);
	for (size_t i = 0; i < l.len; i++)
		if (l.v[i].flags & BM_EXTENT_ZERO)
			ck_assert(bm_is_zero(model + l.v[i].offset,
					     l.v[i].length));
	bm_extent_list_free(&l);
}

static void
flush(struct bm_image *img)
{
	struct bm_io io = { 0 };

	ck_assert_int_eq(bm_image_sync(img, bm_image_flush, &io), 0);
}

START_TEST(test_random_no_backing)
{
	struct bm_image *img = toy_create_path(NULL);

	for (int round = 0; round < 60; round++) {
		random_batch(img, true, true);
		if (round % 10 == 0)
			flush(img);
	}
	check_all(img);
	check_status(img);
	bm_image_close(img); /* flushes */
	img = toy_open_path(0);
	check_all(img);
	check_status(img);
	bm_image_close(img);
}
END_TEST

START_TEST(test_random_backing)
{
	FILE *fp = fopen(base_path, "w");
	struct bm_image *img;
	char opt[128];

	ck_assert_ptr_nonnull(fp);
	for (uint64_t i = 0; i < DISK; i++)
		base_model[i] = (i / TOY_CLUSTER) % 3 ? (uint8_t)(i * 13) : 0;
	ck_assert_uint_eq(fwrite(base_model, 1, DISK, fp), DISK);
	fclose(fp);
	memcpy(model, base_model, DISK);
	snprintf(opt, sizeof opt, "backing=base.raw");
	img = toy_create_path(opt);
	ck_assert_ptr_nonnull(bm_image_backing(img));
	check_all(img);
	for (int round = 0; round < 60; round++)
		random_batch(img, true, false);
	check_all(img);
	check_status(img);
	bm_image_close(img);
	img = toy_open_path(BM_IMAGE_WRITE);
	check_all(img);
	bm_image_close(img);
}
END_TEST

/* Many writes into the same fresh cluster at once: the first allocates
 * and fills, the rest must wait for it and then land. */
START_TEST(test_same_cluster)
{
	struct bm_image *img = toy_create_path(NULL);
	struct op ops[8];

	memset(ops, 0, sizeof ops);
	for (unsigned i = 0; i < 8; i++) {
		struct op *o = &ops[i];

		o->buf = malloc(512);
		memset(o->buf, 0x10 + i, 512);
		memset(model + TOY_CLUSTER * 5 + i * 512, 0x10 + i, 512);
		o->kind = 1;
		o->io.offset = TOY_CLUSTER * 5 + i * 512;
		o->io.length = 512;
		o->io.buf = o->buf;
		o->io.done = op_done;
		outstanding++;
		bm_image_write(img, &o->io);
	}
	while (outstanding)
		ck_assert_int_ge(bm_loop_run_once(loop, -1), 0);
	check_all(img);
	for (unsigned i = 0; i < 8; i++)
		free(ops[i].buf);
	bm_image_close(img);
}
END_TEST

/* A write into a cluster whose allocation is half done must wait for
 * it: the fill would otherwise overwrite it. */
START_TEST(test_busy_range)
{
	struct bm_image *img = toy_create_path(NULL);
	struct op ops[2];

	memset(ops, 0, sizeof ops);
	gate_set(true);
	for (unsigned i = 0; i < 2; i++) {
		struct op *o = &ops[i];

		o->buf = malloc(512);
		memset(o->buf, 0x40 + i, 512);
		memset(model + TOY_CLUSTER * 7 + i * 1024, 0x40 + i, 512);
		o->kind = 1;
		o->io.offset = TOY_CLUSTER * 7 + i * 1024;
		o->io.length = 512;
		o->io.buf = o->buf;
		o->io.done = op_done;
		outstanding++;
		bm_image_write(img, &o->io);
		/* The first one reaches the fill and stays there. */
		while (i == 0 && !gate_was_reached())
			ck_assert_int_ge(bm_loop_run_once(loop, 10), 0);
	}
	for (int turn = 0; turn < 10; turn++)
		ck_assert_int_ge(bm_loop_run_once(loop, 5), 0);
	ck_assert_uint_eq(outstanding, 2);
	gate_set(false);
	while (outstanding)
		ck_assert_int_ge(bm_loop_run_once(loop, -1), 0);
	check_all(img);
	for (unsigned i = 0; i < 2; i++)
		free(ops[i].buf);
	bm_image_close(img);
}
END_TEST

START_TEST(test_bad_requests)
{
	struct bm_image *img = toy_create_path(NULL);
	uint8_t buf[512];
	struct bm_io io = { .offset = DISK - 256, .length = 512, .buf = buf };

	ck_assert_int_eq(bm_image_sync(img, bm_image_read, &io), -EINVAL);
	ck_assert_ptr_nonnull(strstr(blockmirror_last_error(), "beyond"));
	bm_image_close(img);

	img = toy_open_path(0);
	io.offset = 0;
	ck_assert_int_eq(bm_image_sync(img, bm_image_write, &io), -EROFS);
	bm_image_close(img);
}
END_TEST

START_TEST(test_missing_backing)
{
	struct bm_store *s;
	struct bm_image *img;

	ck_assert_int_eq(bm_file_open(loop, path, BM_OPEN_CREATE, 0, &s), 0);
	ck_assert_int_eq(bm_fmt_create(&toy_driver, s, path, DISK,
				       "backing=nowhere.img", BM_IMAGE_WRITE,
				       &img), -ENOENT);
	ck_assert_ptr_nonnull(strstr(blockmirror_last_error(), "nowhere.img"));
	bm_store_close(s);
}
END_TEST

START_TEST(test_bad_option)
{
	struct bm_store *s;
	struct bm_image *img;

	ck_assert_int_eq(bm_file_open(loop, path, BM_OPEN_CREATE, 0, &s), 0);
	ck_assert_int_eq(bm_fmt_create(&toy_driver, s, path, DISK,
				       "colour=blue", BM_IMAGE_WRITE, &img),
			 -EINVAL);
	ck_assert_ptr_nonnull(strstr(blockmirror_last_error(), "colour"));
	bm_store_close(s);
}
END_TEST

START_TEST(test_option_parsing)
{
	char v[16];

	ck_assert_int_eq(bm_fmt_option("a=1,b=two,a=3", "a", v, sizeof v), 1);
	ck_assert_str_eq(v, "3");
	ck_assert_int_eq(bm_fmt_option("a=1,b=two", "c", v, sizeof v), 0);
	ck_assert_int_eq(bm_fmt_option("b=twotwotwotwotwotwo", "b", v,
				       sizeof v), -EINVAL);
	ck_assert_int_eq(bm_fmt_option(NULL, "b", v, sizeof v), 0);
}
END_TEST

static Suite *
format_suite(void)
{
	Suite *s = suite_create("format");
	TCase *tc = tcase_create("engine");

	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_set_timeout(tc, 120);
	tcase_add_test(tc, test_random_no_backing);
	tcase_add_test(tc, test_random_backing);
	tcase_add_test(tc, test_same_cluster);
	tcase_add_test(tc, test_busy_range);
	tcase_add_test(tc, test_bad_requests);
	tcase_add_test(tc, test_missing_backing);
	tcase_add_test(tc, test_bad_option);
	tcase_add_test(tc, test_option_parsing);
	suite_add_tcase(s, tc);
	return s;
}

int
main(void)
{
	return run_suite(format_suite()) ? EXIT_FAILURE : EXIT_SUCCESS;
}
