/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Changing an overlay's backing file (lib/chain.c, the qcow2 driver's
 * set_backing, bm_qcow2_backing_plan): the plan's two steps leave the
 * old name after step 1 and the new one after step 2, and touch nothing
 * else; a live change through the engine keeps reads right, survives a
 * reopen, alternates the name's place in cluster 0, can change the
 * recorded format, and qemu-img reads the result.
 */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "errors.h"
#include "fault.h"
#include "format.h"
#include "helpers.h"
#include "image.h"
#include "internal.h"
#include "loop.h"
#include "qcow2.h"

static const struct bm_fmt_driver *const force_qcow2 __attribute__((used)) =
	&bm_qcow2_driver;

#define SIZE (4 * BM_MiB)

static char dir[64], top[128], base1[128], base2[128], base3[128];
static char vchild[128], vp1[128], vp2[128];
static struct bm_loop *loop;

static void
write_raw(const char *path, uint8_t fill)
{
	uint8_t *buf = malloc(SIZE);
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);

	ck_assert_ptr_nonnull(buf);
	ck_assert_int_ge(fd, 0);
	for (size_t i = 0; i < SIZE; i++)
		buf[i] = (uint8_t)(fill + i / 4096);
	ck_assert_int_eq(write(fd, buf, SIZE), SIZE);
	close(fd);
	free(buf);
}

static void
setup(void)
{
	char opts[300];
	struct bm_image *img;

	strcpy(dir, "/tmp/test-chain.XXXXXX");
	ck_assert_ptr_nonnull(mkdtemp(dir));
	snprintf(top, sizeof top, "%s/top.qcow2", dir);
	snprintf(base1, sizeof base1, "%s/base1.raw", dir);
	snprintf(base2, sizeof base2, "%s/a-longer-name-for-base2.raw", dir);
	snprintf(base3, sizeof base3, "%s/base3.qcow2", dir);
	snprintf(vchild, sizeof vchild, "%s/child.vhdx", dir);
	snprintf(vp1, sizeof vp1, "%s/p1.vhdx", dir);
	snprintf(vp2, sizeof vp2, "%s/parent-two.vhdx", dir);
	write_raw(base1, 7);
	write_raw(base2, 7);
	ck_assert_int_eq(bm_loop_new(32, &loop), 0);
	snprintf(opts, sizeof opts, "backing_file=%s,backing_fmt=raw", base1);
	ck_assert_int_eq(bm_image_create(loop, top, BLOCKMIRROR_FORMAT_QCOW2,
					 SIZE, opts, true, 0, &img), 0);
	bm_image_close(img);
}

static void
teardown(void)
{
	bm_loop_free(loop);
	remove_tree(dir);
}

static uint8_t *
read_cluster0(size_t *len)
{
	uint8_t *buf = calloc(1, 65536);
	int fd = open(top, O_RDONLY);

	ck_assert_int_ge(fd, 0);
	ck_assert_int_gt(pread(fd, buf, 65536, 0), 512);
	close(fd);
	*len = 65536;
	return buf;
}

/* The plan's steps, applied one at a time to a copy of cluster 0. */
START_TEST(test_plan_steps)
{
	struct bm_qcow2_header h;
	uint8_t sector[BM_QCOW2_SECTOR];
	size_t len;
	uint8_t *buf = read_cluster0(&len), *img = malloc(len);
	uint64_t off, old_off;
	uint32_t old_len;

	ck_assert_int_eq(bm_qcow2_header_parse("t", buf, len, &h), 0);
	ck_assert_str_eq(h.backing_name, base1);
	old_off = bm_get_be64(buf + 8);
	old_len = bm_get_be32(buf + 16);
	ck_assert_int_eq(bm_qcow2_backing_plan("t", buf, len, h.header_length,
					       base2, "raw", &off, sector), 0);
	/* Clear of the old name, inside the cluster. */
	ck_assert(off + strlen(base2) <= old_off || off >= old_off + old_len);
	ck_assert_uint_le(off + strlen(base2), len);
	/* The sector differs only in bytes 8-19 and the name's bytes. */
	for (size_t i = 0; i < BM_QCOW2_SECTOR; i++)
		if (!(i >= 8 && i < 20) && !(i >= off && i < off + strlen(base2)))
			ck_assert_uint_eq(sector[i], buf[i]);
	bm_qcow2_header_free(&h);

	/* Crash after step 1: the old name. */
	memcpy(img, buf, len);
	memcpy(img + off, base2, strlen(base2));
	ck_assert_int_eq(bm_qcow2_header_parse("t", img, len, &h), 0);
	ck_assert_str_eq(h.backing_name, base1);
	bm_qcow2_header_free(&h);
	/* After step 2: the new one. */
	memcpy(img, sector, sizeof sector);
	ck_assert_int_eq(bm_qcow2_header_parse("t", img, len, &h), 0);
	ck_assert_str_eq(h.backing_name, base2);
	ck_assert_str_eq(h.backing_format, "raw");
	bm_qcow2_header_free(&h);

	/* A format of another padded size cannot be changed in place. */
	ck_assert_int_eq(bm_qcow2_backing_plan("t", buf, len, 112, base2,
					       "a-long-format", &off, sector),
			 -ENOTSUP);
	free(img);
	free(buf);
}
END_TEST

static bool sb_done;
static int sb_err;

static void
sb_complete(struct bm_io *io, int err)
{
	(void)io;
	sb_err = err;
	sb_done = true;
}

static int
change(struct bm_image *img, const char *name, enum blockmirror_format fmt)
{
	struct bm_backing_change bc = { .name = name };
	int r;

	r = bm_image_open(loop, name, fmt, 0, &bc.backing);
	if (r < 0)
		return r;
	sb_done = false;
	bc.io.done = sb_complete;
	bm_image_set_backing(img, &bc);
	r = bm_loop_run_until(loop, &sb_done);
	bm_image_close(bc.backing); /* NULL when the image took it */
	return r < 0 ? r : sb_err;
}

static void
expect_read(struct bm_image *img, uint8_t fill, uint8_t top_byte)
{
	uint8_t *buf = malloc(SIZE);
	struct bm_io b = { .offset = 0, .length = SIZE, .buf = buf };

	ck_assert_int_eq(bm_image_sync(img, bm_image_read, &b), 0);
	for (size_t i = 0; i < SIZE; i += 512)
		ck_assert_uint_eq(buf[i], i < 65536 ? top_byte :
				  (uint8_t)(fill + i / 4096));
	free(buf);
}

static void
qemu_img_names(const char *expect, const char *fmt)
{
	char cmd[2048];

	if (system("qemu-img --version >/dev/null 2>&1") != 0)
		return;
	snprintf(cmd, sizeof cmd, "qemu-img check -q '%s' && qemu-img info "
		 "--output=json '%s' | grep -q '\"backing-filename\": \"%s\"' "
		 "&& qemu-img info --output=json '%s' | grep -q "
		 "'\"backing-filename-format\": \"%s\"'", top, top, expect, top,
		 fmt);
	ck_assert_msg(system(cmd) == 0, "qemu-img: %s", cmd);
	snprintf(cmd, sizeof cmd, "qemu-img compare -q '%s' '%s' >/dev/null "
		 "2>&1; test $? = 1", top, expect);
	ck_assert_msg(system(cmd) == 0, "qemu-img compare ran: %s", cmd);
}

START_TEST(test_live_change)
{
	struct bm_image_facts facts;
	struct bm_image *img, *b3;
	uint8_t *data = malloc(65536);
	struct bm_io w = { .offset = 0, .length = 65536, .buf = data };

	memset(data, 0xee, 65536);
	ck_assert_int_eq(bm_image_open(loop, top, BLOCKMIRROR_FORMAT_QCOW2,
				       BM_IMAGE_WRITE, &img), 0);
	ck_assert_int_eq(bm_image_sync(img, bm_image_write, &w), 0);
	expect_read(img, 7, 0xee);

	/* Alternate a few times: the name's place moves back and forth. */
	for (int i = 0; i < 5; i++) {
		const char *n = i % 2 ? base1 : base2;

		ck_assert_int_eq(change(img, n, BLOCKMIRROR_FORMAT_RAW), 0);
		bm_image_facts(img, &facts);
		ck_assert_str_eq(facts.backing_name, n);
		expect_read(img, 7, 0xee);
	}
	bm_image_close(img);
	qemu_img_names(base2, "raw");

	/* Reopen: the new name; then change the format to qcow2. */
	ck_assert_int_eq(bm_image_create(loop, base3, BLOCKMIRROR_FORMAT_QCOW2,
					 SIZE, NULL, true, 0, &b3), 0);
	{
		uint8_t *buf = malloc(SIZE);
		struct bm_io b = { .offset = 0, .length = SIZE, .buf = buf };

		for (size_t i = 0; i < SIZE; i++)
			buf[i] = (uint8_t)(7 + i / 4096);
		ck_assert_int_eq(bm_image_sync(b3, bm_image_write, &b), 0);
		b.length = 0;
		ck_assert_int_eq(bm_image_sync(b3, bm_image_flush, &b), 0);
		free(buf);
	}
	bm_image_close(b3);
	ck_assert_int_eq(bm_image_open(loop, top, BLOCKMIRROR_FORMAT_QCOW2,
				       BM_IMAGE_WRITE, &img), 0);
	bm_image_facts(img, &facts);
	ck_assert_str_eq(facts.backing_name, base2);
	ck_assert_int_eq(change(img, base3, BLOCKMIRROR_FORMAT_QCOW2), 0);
	expect_read(img, 7, 0xee);
	bm_image_close(img);
	qemu_img_names(base3, "qcow2");

	/* A new backing file of another size is refused, nothing changes. */
	ck_assert_int_eq(truncate(base1, SIZE / 2), 0);
	ck_assert_int_eq(bm_image_open(loop, top, BLOCKMIRROR_FORMAT_QCOW2,
				       BM_IMAGE_WRITE, &img), 0);
	ck_assert_int_eq(change(img, base1, BLOCKMIRROR_FORMAT_RAW), -EINVAL);
	bm_image_facts(img, &facts);
	ck_assert_str_eq(facts.backing_name, base3);
	bm_image_close(img);
	free(data);
}
END_TEST

/* Read-only images and images without a backing file refuse. */
START_TEST(test_refusals)
{
	struct bm_image *img;

	ck_assert_int_eq(bm_image_open(loop, top, BLOCKMIRROR_FORMAT_QCOW2, 0,
				       &img), 0);
	ck_assert_int_eq(change(img, base2, BLOCKMIRROR_FORMAT_RAW), -EROFS);
	bm_image_close(img);
	ck_assert_int_eq(bm_image_open(loop, base1, BLOCKMIRROR_FORMAT_RAW,
				       BM_IMAGE_WRITE, &img), 0);
	ck_assert_int_eq(change(img, base2, BLOCKMIRROR_FORMAT_RAW), -ENOTSUP);
	bm_image_close(img);
}
END_TEST

/* Write the top's 64 KiB of 0xee and flush. */
static void
write_top(const char *path, enum blockmirror_format fmt)
{
	struct bm_image *img;
	uint8_t *data = malloc(65536);
	struct bm_io w = { .offset = 0, .length = 65536, .buf = data };

	memset(data, 0xee, 65536);
	ck_assert_int_eq(bm_image_open(loop, path, fmt, BM_IMAGE_WRITE, &img),
			 0);
	ck_assert_int_eq(bm_image_sync(img, bm_image_write, &w), 0);
	w.length = 0;
	ck_assert_int_eq(bm_image_sync(img, bm_image_flush, &w), 0);
	bm_image_close(img);
	free(data);
}

/* p1.vhdx with the pattern, a copy of it, and a child of p1. */
static void
make_vhdx_chain(void)
{
	struct blockmirror_copy_options co = { .size = sizeof co };
	struct bm_image *img;
	uint8_t *buf = malloc(SIZE);
	struct bm_io b = { .offset = 0, .length = SIZE, .buf = buf };
	char opts[200];

	for (size_t i = 0; i < SIZE; i++)
		buf[i] = (uint8_t)(7 + i / 4096);
	ck_assert_int_eq(bm_image_create(loop, vp1, BLOCKMIRROR_FORMAT_VHDX,
					 SIZE, NULL, true, 0, &img), 0);
	ck_assert_int_eq(bm_image_sync(img, bm_image_write, &b), 0);
	b.length = 0;
	ck_assert_int_eq(bm_image_sync(img, bm_image_flush, &b), 0);
	bm_image_close(img);
	free(buf);
	unlink(vp2);
	ck_assert_int_eq(blockmirror_copy(vp1, vp2, &co, NULL), 0);
	snprintf(opts, sizeof opts, "parent=%s", vp1);
	ck_assert_int_eq(bm_image_create(loop, vchild, BLOCKMIRROR_FORMAT_VHDX,
					 SIZE, opts, true, 0, &img), 0);
	bm_image_close(img);
	write_top(vchild, BLOCKMIRROR_FORMAT_VHDX);
}

START_TEST(test_vhdx_live_change)
{
	struct bm_image_facts facts;
	struct bm_image *img;

	make_vhdx_chain();
	ck_assert_int_eq(bm_image_open(loop, vchild, BLOCKMIRROR_FORMAT_VHDX,
				       BM_IMAGE_WRITE, &img), 0);
	expect_read(img, 7, 0xee);
	ck_assert_int_eq(change(img, vp2, BLOCKMIRROR_FORMAT_VHDX), 0);
	bm_image_facts(img, &facts);
	ck_assert_str_eq(facts.backing_name, vp2);
	expect_read(img, 7, 0xee);
	/* Not a VHDX parent: refused. */
	ck_assert_int_eq(change(img, base1, BLOCKMIRROR_FORMAT_RAW), -ENOTSUP);
	bm_image_close(img);
	/* Without the old parent, the child opens over the new one. */
	ck_assert_int_eq(unlink(vp1), 0);
	ck_assert_int_eq(bm_image_open(loop, vchild, BLOCKMIRROR_FORMAT_VHDX, 0,
				       &img), 0);
	bm_image_facts(img, &facts);
	ck_assert_str_eq(facts.backing_name, vp2);
	expect_read(img, 7, 0xee);
	bm_image_close(img);
}
END_TEST

/*
 * A crash at every step: the image's writes fail from the k-th on (and
 * its flushes), for k = 0, 1, ... until the change goes through.  Each
 * time the image reopens, names the old or the new backing file, and
 * reads right.
 */
static void
crash_steps(const char *path, enum blockmirror_format fmt,
	    const char *old_name, const char *new_name,
	    enum blockmirror_format bfmt, void (*prepare)(void))
{
	bool changed = false;
	unsigned steps_tried = 0, steps_new = 0;

	for (uint64_t k = 0; !changed && k < 64; k++) {
		struct bm_fault_rules rules = { 0 };
		struct bm_image_facts facts;
		struct bm_image *img;
		int r;

		prepare();
		ck_assert_int_eq(bm_fault_register(path, &rules), 0);
		ck_assert_int_eq(bm_image_open(loop, path, fmt, BM_IMAGE_WRITE,
					       &img), 0);
		rules.write_errno = EIO;
		rules.write_err_count = -1;
		rules.fail_flush = true;
		rules.write_err_after = rules.writes + k;
		r = change(img, new_name, bfmt);
		changed = r == 0;
		bm_image_close(img);
		bm_fault_unregister(path);

		ck_assert_int_eq(bm_image_open(loop, path, fmt, BM_IMAGE_WRITE,
					       &img), 0);
		bm_image_facts(img, &facts);
		ck_assert_msg(strcmp(facts.backing_name, old_name) == 0 ||
			      strcmp(facts.backing_name, new_name) == 0,
			      "k=%" PRIu64 ": backing name '%s'", k,
			      facts.backing_name);
		if (changed)
			ck_assert_str_eq(facts.backing_name, new_name);
		if (k == 0)
			ck_assert_str_eq(facts.backing_name, old_name);
		if (strcmp(facts.backing_name, new_name) == 0)
			steps_new++;
		steps_tried++;
		expect_read(img, 7, 0xee);
		bm_image_close(img);
	}
	ck_assert(changed);
	/* Several steps, each a possible crash point. */
	ck_assert_uint_ge(steps_tried, 3);
	if (getenv("CHAIN_VERBOSE"))
		fprintf(stderr, "%s: %u crash points, %u with the new name\n",
			path, steps_tried, steps_new);
}

static void
prepare_qcow2(void)
{
	char opts[300];
	struct bm_image *img;

	snprintf(opts, sizeof opts, "backing_file=%s,backing_fmt=raw", base1);
	ck_assert_int_eq(bm_image_create(loop, top, BLOCKMIRROR_FORMAT_QCOW2,
					 SIZE, opts, true, 0, &img), 0);
	bm_image_close(img);
	write_top(top, BLOCKMIRROR_FORMAT_QCOW2);
}

START_TEST(test_crash_steps_qcow2)
{
	crash_steps(top, BLOCKMIRROR_FORMAT_QCOW2, base1, base2,
		    BLOCKMIRROR_FORMAT_RAW, prepare_qcow2);
}
END_TEST

START_TEST(test_crash_steps_vhdx)
{
	crash_steps(vchild, BLOCKMIRROR_FORMAT_VHDX, vp1, vp2,
		    BLOCKMIRROR_FORMAT_VHDX, make_vhdx_chain);
}
END_TEST

static Suite *
chain_suite(void)
{
	Suite *s = suite_create("chain");
	TCase *tc = tcase_create("qcow2");

	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_add_test(tc, test_plan_steps);
	tcase_add_test(tc, test_live_change);
	tcase_add_test(tc, test_refusals);
	tcase_add_test(tc, test_crash_steps_qcow2);
	tcase_add_test(tc, test_vhdx_live_change);
	tcase_add_test(tc, test_crash_steps_vhdx);
	tcase_set_timeout(tc, 60);
	suite_add_tcase(s, tc);
	return s;
}

int
main(void)
{
	return run_suite(chain_suite()) ? EXIT_FAILURE : EXIT_SUCCESS;
}
