/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Probing (lib/probe.c) and the rule built on it (lib/image.c): a file
 * that starts with a qcow2 or VHDX signature is never opened as raw unless
 * raw is named.
 */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "helpers.h"
#include "image.h"
#include "loop.h"
#include "probe.h"

START_TEST(test_signatures)
{
	unsigned char buf[BM_PROBE_SIZE];

	memset(buf, 0, sizeof buf);
	ck_assert_int_eq(bm_probe(buf, sizeof buf), BLOCKMIRROR_FORMAT_RAW);
	ck_assert_int_eq(bm_probe(buf, 0), BLOCKMIRROR_FORMAT_RAW);
	memcpy(buf, "QFI\xfb", 4);
	ck_assert_int_eq(bm_probe(buf, sizeof buf), BLOCKMIRROR_FORMAT_QCOW2);
	ck_assert_int_eq(bm_probe(buf, 4), BLOCKMIRROR_FORMAT_QCOW2);
	ck_assert_int_eq(bm_probe(buf, 3), BLOCKMIRROR_FORMAT_RAW);
	memcpy(buf, "QFI\xfa", 4);
	ck_assert_int_eq(bm_probe(buf, sizeof buf), BLOCKMIRROR_FORMAT_RAW);
	memcpy(buf, "vhdxfile", 8);
	ck_assert_int_eq(bm_probe(buf, sizeof buf), BLOCKMIRROR_FORMAT_VHDX);
	ck_assert_int_eq(bm_probe(buf, 7), BLOCKMIRROR_FORMAT_RAW);
	memcpy(buf, "VHDXFILE", 8);
	ck_assert_int_eq(bm_probe(buf, sizeof buf), BLOCKMIRROR_FORMAT_RAW);
	/* A signature later in the sector is data. */
	memset(buf, 0, sizeof buf);
	memcpy(buf + 1, "QFI\xfb", 4);
	ck_assert_int_eq(bm_probe(buf, sizeof buf), BLOCKMIRROR_FORMAT_RAW);
}
END_TEST

static char *
make_file(const void *head, size_t len, size_t size)
{
	char *path = strdup("/tmp/test-probe.XXXXXX");
	int fd = mkstemp(path);

	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(ftruncate(fd, (off_t)size), 0);
	ck_assert_int_eq(pwrite(fd, head, len, 0), (ssize_t)len);
	close(fd);
	return path;
}

static int
open_as(const char *path, enum blockmirror_format f,
	enum blockmirror_format *got)
{
	struct bm_loop *loop;
	struct bm_image *img = NULL;
	int r;

	ck_assert_int_eq(bm_loop_new(8, &loop), 0);
	r = bm_image_open(loop, path, f, BM_IMAGE_WRITE, &img);
	if (r == 0)
		*got = img->format;
	bm_image_close(img);
	bm_loop_free(loop);
	return r;
}

START_TEST(test_guessed_image_not_raw)
{
	enum blockmirror_format got = BLOCKMIRROR_FORMAT_AUTO;
	char *q = make_file("QFI\xfb\0\0\0\3", 8, 65536);
	char *v = make_file("vhdxfile", 8, 65536);
	char *r = make_file("hello", 5, 65536);

	/* Probing picks the format's driver, which refuses these broken
	 * images: a signature alone never makes an image raw. */
	ck_assert_int_eq(open_as(q, BLOCKMIRROR_FORMAT_AUTO, &got), -EINVAL);
	ck_assert_ptr_nonnull(strstr(blockmirror_last_error(), "qcow2"));
	ck_assert_int_eq(open_as(v, BLOCKMIRROR_FORMAT_AUTO, &got), -EINVAL);
	/* Naming raw takes the bytes as they are. */
	ck_assert_int_eq(open_as(q, BLOCKMIRROR_FORMAT_RAW, &got), 0);
	ck_assert_int_eq(got, BLOCKMIRROR_FORMAT_RAW);
	ck_assert_int_eq(open_as(v, BLOCKMIRROR_FORMAT_RAW, &got), 0);
	/* A raw file is raw, and is not a qcow2 or VHDX image. */
	ck_assert_int_eq(open_as(r, BLOCKMIRROR_FORMAT_AUTO, &got), 0);
	ck_assert_int_eq(got, BLOCKMIRROR_FORMAT_RAW);
	ck_assert_int_eq(open_as(r, BLOCKMIRROR_FORMAT_QCOW2, &got), -EINVAL);
	ck_assert_int_eq(open_as(r, BLOCKMIRROR_FORMAT_VHDX, &got), -EINVAL);
	/* A qcow2 file is not VHDX. */
	ck_assert_int_eq(open_as(q, BLOCKMIRROR_FORMAT_VHDX, &got), -EINVAL);
	unlink(q);
	unlink(v);
	unlink(r);
	free(q);
	free(v);
	free(r);
}
END_TEST

START_TEST(test_empty_and_tiny)
{
	enum blockmirror_format got = BLOCKMIRROR_FORMAT_AUTO;
	char *e = make_file("", 0, 0);
	char *t = make_file("QF", 2, 2);

	ck_assert_int_eq(open_as(e, BLOCKMIRROR_FORMAT_AUTO, &got), 0);
	ck_assert_int_eq(got, BLOCKMIRROR_FORMAT_RAW);
	ck_assert_int_eq(open_as(t, BLOCKMIRROR_FORMAT_AUTO, &got), 0);
	ck_assert_int_eq(got, BLOCKMIRROR_FORMAT_RAW);
	unlink(e);
	unlink(t);
	free(e);
	free(t);
}
END_TEST

int
main(void)
{
	Suite *s = suite_create("probe");
	TCase *tc = tcase_create("probe");

	tcase_add_test(tc, test_signatures);
	tcase_add_test(tc, test_guessed_image_not_raw);
	tcase_add_test(tc, test_empty_and_tiny);
	suite_add_tcase(s, tc);
	return run_suite(s) ? EXIT_FAILURE : EXIT_SUCCESS;
}
