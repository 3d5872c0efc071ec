/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * qcow2 persistent bitmaps and the change tracker kept in them
 * (lib/qcow2-bitmap.c, lib/qcow2-bitmap-io.c, lib/cbt-image.c,
 * docs/cbt.md).
 *
 * Format: a directory round-trips; each kind of malformed directory
 * (offsets, sizes, names, flags, types, extra data, overlaps, trailing
 * bytes) is refused with a message naming the entry, and no single-byte
 * change makes the parser misbehave; 65535 entries are checked in n log
 * n, not n^2.
 *
 * (BM_QBM_SEED replays a seed; it is printed.)
 *
 * Tracking: marks, checkpoint creations and removals on a qcow2 image
 * against a model; reopened, the image's bitmaps hold exactly the model
 * (the newest with every data cluster allocated, the only auto one), and
 * qemu-img check is clean.  Bad bitmap table entries make tracking
 * refuse the image, naming the bitmap and the problem, and so do
 * clusters that belong to the image (an L2 table, a refcount block,
 * guest data) or that the list names twice; the tracker's limits are
 * applied before anything the image sizes is read.  A creation whose
 * writes start failing at any point leaves no leak if the header was not
 * touched, and otherwise says the bitmaps are in an unknown state and
 * has them read back untrusted.  A backing file
 * changed (set_backing, to a shorter and to a longer name) before the
 * first checkpoint stays whole and right in the header.
 *
 * Crash: the crash recorder (recorder.h) logs marks, each acknowledged
 * (rec_event) once its waiter runs, with a checkpoint created (carrying
 * its predecessor's blocks) and the oldest removed in the middle.  At every event, for each variant
 * (durable writes only, all of them, a random torn subset), the image a
 * crash may have left opens, holds the old or the new list (never
 * anything else), and marks every block of every mark acknowledged
 * before the crash; qemu-img check finds no corruption (leaks allowed)
 * at a sample of the points.
 */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "cbt-int.h"
#include "cbt-marks.h"
#include "errors.h"
#include "fault.h"
#include "helpers.h"
#include "image.h"
#include "internal.h"
#include "qcow2.h"
#include "recorder.h"

#define CB 16                       /* 64 KiB clusters */
#define GRAN 4096u
/* Three bitmap clusters of 64 KiB at 4 KiB granularity, the last one
 * partial, and a partial last block. */
#define DISK ((UINT64_C(5) << 30) + 12800)

static struct bm_loop *loop;
static char dir[PATH_MAX], path[PATH_MAX + 16];
static bool have_qemu_img;

static void
setup(void)
{
	const char *base = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";

	snprintf(dir, sizeof dir, "%s/test-qbm-XXXXXX", base);
	ck_assert_ptr_nonnull(mkdtemp(dir));
	snprintf(path, sizeof path, "%s/disk.qcow2", dir);
	ck_assert_int_eq(bm_loop_new(64, &loop), 0);
	have_qemu_img = system("qemu-img --version >/dev/null 2>&1") == 0;
}

static void
teardown(void)
{
	bm_loop_free(loop);
	remove_tree(dir);
}

#define ck_assert_msg_has(s) \
	ck_assert_msg(strstr(blockmirror_last_error(), (s)), \
		      "message \"%s\" lacks \"%s\"", \
		      blockmirror_last_error(), (s))

/* ---- the directory ---------------------------------------------------- */

static struct bm_qcow2_header H;
static uint8_t dirbuf[4096];
static size_t dirlen;

/* Three bitmaps of a 5 GiB disk with 64 KiB clusters, directory at
 * 1 MiB, tables at 2, 3 and 4 MiB. */
static void
make_dir(void)
{
	struct bm_qcow2_bitmap b[3] = {
		{ "a", 0, 16, 2u << 20, 0 },
		{ "checkpoint-2", BM_QCOW2_BME_IN_USE, 12, 3u << 20, 0 },
		{ "c3", BM_QCOW2_BME_AUTO, 20, 4u << 20, 0 },
	};

	for (int i = 0; i < 3; i++)
		b[i].table_size = (uint32_t)bm_qcow2_bitmap_table_size(
			DISK, b[i].granularity_bits, CB);
	memset(&H, 0, sizeof H);
	H.version = 3;
	H.cluster_bits = CB;
	H.size = DISK;
	H.has_bitmaps = true;
	H.bitmaps_nb = 3;
	H.bitmaps_dir_offset = 1u << 20;
	dirlen = bm_qcow2_bitmap_dir_size(b, 3);
	H.bitmaps_dir_size = dirlen;
	ck_assert_uint_eq(dirlen, 24 + 8 + 24 + 16 + 24 + 8);
	ck_assert_int_eq(bm_qcow2_bitmap_dir_encode(b, 3, dirbuf, dirlen), 0);
}

static int
parse(void)
{
	struct bm_qcow2_bitmap *b;
	int r = bm_qcow2_bitmap_dir_parse("img", &H, dirbuf, dirlen, &b);

	if (r == 0)
		bm_qcow2_bitmaps_free(b, H.bitmaps_nb);
	else
		ck_assert_ptr_null(b);
	return r;
}

START_TEST(test_dir_roundtrip)
{
	struct bm_qcow2_bitmap *b;

	make_dir();
	ck_assert_uint_eq(bm_qcow2_bitmap_table_size(DISK, 12, CB), 3);
	ck_assert_uint_eq(bm_qcow2_bitmap_table_size(DISK, 16, CB), 1);
	ck_assert_uint_eq(bm_qcow2_bitmap_table_size(1, 16, CB), 1);
	ck_assert_int_eq(bm_qcow2_bitmap_dir_parse("img", &H, dirbuf, dirlen,
						   &b), 0);
	ck_assert_str_eq(b[0].name, "a");
	ck_assert_str_eq(b[1].name, "checkpoint-2");
	ck_assert_str_eq(b[2].name, "c3");
	ck_assert_uint_eq(b[1].flags, BM_QCOW2_BME_IN_USE);
	ck_assert_uint_eq(b[2].flags, BM_QCOW2_BME_AUTO);
	ck_assert_uint_eq(b[1].granularity_bits, 12);
	ck_assert_uint_eq(b[1].table_offset, 3u << 20);
	ck_assert_uint_eq(b[1].table_size, 3);
	/* Byte layout of the first entry, as the specification has it. */
	ck_assert_uint_eq(bm_get_be64(dirbuf), 2u << 20);
	ck_assert_uint_eq(bm_get_be32(dirbuf + 8), 1);
	ck_assert_uint_eq(dirbuf[16], 1);
	ck_assert_uint_eq(dirbuf[17], 16);
	ck_assert_uint_eq(bm_get_be16(dirbuf + 18), 1);
	ck_assert_uint_eq(dirbuf[24], 'a');
	bm_qcow2_bitmaps_free(b, 3);
}
END_TEST

/* Each case: a change to the good directory, its error and message. */
START_TEST(test_dir_malformed)
{
	static const struct {
		size_t off;
		int width;          /* 1, 2, 4, 8 bytes */
		uint64_t value;
		int err;
		const char *msg;
	} cases[] = {
		{ 0, 8, (2u << 20) + 512, -EINVAL, "table offset" },
		{ 0, 8, 0, -EINVAL, "table offset" },
		{ 0, 8, 1u << 20, -EINVAL, "overlaps the directory" },
		{ 0, 8, 3u << 20, -EINVAL, "table of another bitmap" },
		{ 8, 4, 3, -EINVAL, "table size" },
		{ 12, 4, 8, -ENOTSUP, "unknown bitmap flags" },
		{ 16, 1, 2, -ENOTSUP, "unknown bitmap type" },
		{ 17, 1, 8, -EINVAL, "granularity" },
		{ 17, 1, 32, -EINVAL, "granularity" },
		{ 18, 2, 0, -EINVAL, "name size" },
		{ 18, 2, 1024, -EINVAL, "name size" },
		{ 18, 2, 200, -EINVAL, "past the end" },
		{ 20, 4, 8, -ENOTSUP, "extra data" },
		{ 25, 1, 'x', -EINVAL, "padding" },
		{ 24, 1, 0, -EINVAL, "NUL" },
		/* the second entry, at 32 */
		{ 32 + 8, 4, 1, -EINVAL, "table size" },
	};

	for (size_t i = 0; i < BM_ARRAY_SIZE(cases); i++) {
		uint8_t *p;

		make_dir();
		p = dirbuf + cases[i].off;
		switch (cases[i].width) {
		case 1: p[0] = (uint8_t)cases[i].value; break;
		case 2: bm_put_be16(p, (uint16_t)cases[i].value); break;
		case 4: bm_put_be32(p, (uint32_t)cases[i].value); break;
		default: bm_put_be64(p, cases[i].value); break;
		}
		bm_error_clear();
		ck_assert_msg(parse() == cases[i].err, "case %zu: %s", i,
			      blockmirror_last_error());
		ck_assert_msg_has(cases[i].msg);
		ck_assert_msg_has("img: qcow2 bitmap");
	}

	/* Two bitmaps with one name. */
	{
		struct bm_qcow2_bitmap b[2] = {
			{ "dup", 0, 16, 2u << 20, 1 },
			{ "dup", 0, 16, 3u << 20, 1 },
		};

		make_dir();
		H.bitmaps_nb = 2;
		dirlen = H.bitmaps_dir_size = bm_qcow2_bitmap_dir_size(b, 2);
		ck_assert_int_eq(bm_qcow2_bitmap_dir_encode(b, 2, dirbuf,
							    dirlen), 0);
		ck_assert_int_eq(parse(), -EINVAL);
		ck_assert_msg_has("two bitmaps with one name");
	}
	/* Bytes after the last entry, and too few bytes. */
	make_dir();
	dirlen += 8;
	H.bitmaps_dir_size = dirlen;
	ck_assert_int_eq(parse(), -EINVAL);
	ck_assert_msg_has("after its 3 entries");
	make_dir();
	H.bitmaps_nb = 4;
	ck_assert_int_eq(parse(), -EINVAL);
	ck_assert_msg_has("past the end");
	make_dir();
	dirlen -= 8;
	ck_assert_int_eq(parse(), -EINVAL);
	ck_assert_msg_has("does not match the bitmaps extension");
}
END_TEST

/* The process's CPU time, in seconds. */
static double
cpu_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Encode the first k of b as a directory (h and buf follow) and parse
 * it `reps` times: the least CPU time a parse took.  Each returns want
 * (a valid directory is freed). */
static double
dir_parse_cost(struct bm_qcow2_bitmap *b, uint32_t k,
	       struct bm_qcow2_header *h, uint8_t *buf, int want, int reps)
{
	struct bm_qcow2_bitmap *out;
	double best = 1e9;
	size_t len;

	h->bitmaps_nb = k;
	len = h->bitmaps_dir_size = bm_qcow2_bitmap_dir_size(b, k);
	ck_assert_int_eq(bm_qcow2_bitmap_dir_encode(b, k, buf, len), 0);
	for (int i = 0; i < reps; i++) {
		double t = cpu_s();
		int r = bm_qcow2_bitmap_dir_parse("img", h, buf, len, &out);

		t = cpu_s() - t;
		ck_assert_msg(r == want, "%" PRIu32 " entries: %d, %s", k, r,
			      blockmirror_last_error());
		if (!r)
			bm_qcow2_bitmaps_free(out, k);
		if (t < best)
			best = t;
	}
	return best;
}

/* A directory of 65535 entries (the most there may be) is checked in
 * about 21 times what a sixteenth of it takes (n log n): names and
 * tables are sorted, not compared pair by pair (2e9 comparisons, seconds
 * at every open, about 256 times).  Measured against that, in CPU time,
 * not against a time: the machine and build may be slow, and loaded.  A
 * name given twice and a table given twice, the two entries far apart,
 * are still found. */
START_TEST(test_dir_many)
{
	const uint32_t n = BM_QCOW2_MAX_BITMAPS;
	struct bm_qcow2_bitmap *b = calloc(n, sizeof *b);
	struct bm_qcow2_header h = { 0 };
	double part;
	uint8_t *buf;

	ck_assert_ptr_nonnull(b);
	for (uint32_t i = 0; i < n; i++) {
		b[i].name = malloc(16);
		snprintf(b[i].name, 16, "b%" PRIu32, (i * 7919u) % n);
		b[i].granularity_bits = 16;
		b[i].table_offset = (UINT64_C(64) +
				     (uint64_t)i * 104729 % n) << CB;
		b[i].table_size = 1;
	}
	h.version = 3;
	h.cluster_bits = CB;
	h.size = UINT64_C(1) << 30;
	h.has_bitmaps = true;
	h.bitmaps_dir_offset = 1u << CB;
	buf = malloc(bm_qcow2_bitmap_dir_size(b, n));
	ck_assert_ptr_nonnull(buf);
	/* A sixteenth of the directory (its first entries: names and
	 * tables as scattered). */
	part = dir_parse_cost(b, n / 16, &h, buf, 0, 5);
	for (int round = 0; round < 3; round++) {
		int want = round ? -EINVAL : 0;
		double t;

		if (round == 1)
			snprintf(b[n - 1].name, 16, "%s", b[0].name);
		if (round == 2) {
			snprintf(b[n - 1].name, 16, "unique");
			b[n - 1].table_offset = b[1].table_offset;
		}
		t = dir_parse_cost(b, n, &h, buf, want, 3);
		/* 20 to 45 here, sanitizers included (caches favour the
		 * small one); pairwise, 240. */
		ck_assert_msg(t < 128 * part, "round %d: %.1f ms, %.0f times "
			      "the %.2f ms of a sixteenth", round, t * 1e3,
			      t / part, part * 1e3);
		if (round == 1)
			ck_assert_msg_has("entry 65534 (b0): two bitmaps");
		if (round == 2)
			ck_assert_msg_has("entry 65534 (unique): bitmap table "
					  "overlaps the table of another");
	}
	free(buf);
	bm_qcow2_bitmaps_free(b, n);
}
END_TEST

START_TEST(test_dir_flips)
{
	uint64_t rng = 77;
	unsigned ok = 0;

	/* No change may crash, leak or read past the buffer (ASan, the
	 * fuzz target does the rest); most are refused. */
	for (size_t i = 0; i < 4096; i++) {
		make_dir();
		dirbuf[rnd_range(&rng, dirlen)] ^=
			(uint8_t)(1u << rnd_range(&rng, 8));
		ok += parse() == 0;
	}
	ck_assert_uint_lt(ok, 4096);
}
END_TEST

START_TEST(test_table_entry)
{
	uint64_t host;
	bool ones;

	ck_assert_int_eq(bm_qcow2_bitmap_entry("img", 0x30000, CB, &host,
					       &ones), 0);
	ck_assert_uint_eq(host, 0x30000);
	ck_assert(!ones);
	ck_assert_int_eq(bm_qcow2_bitmap_entry("img", 1, CB, &host, &ones), 0);
	ck_assert(ones && host == 0);
	ck_assert_int_eq(bm_qcow2_bitmap_entry("img", 0x30200, CB, &host,
					       &ones), -EINVAL);
	ck_assert_msg_has("not cluster-aligned");
	ck_assert_int_eq(bm_qcow2_bitmap_entry("img", 0x30001, CB, &host,
					       &ones), -EINVAL);
	ck_assert_int_eq(bm_qcow2_bitmap_entry("img", 2, CB, &host, &ones),
			 -EINVAL);
	ck_assert_msg_has("reserved");
	ck_assert_int_eq(bm_qcow2_bitmap_entry("img", UINT64_C(1) << 62, CB,
					       &host, &ones), -EINVAL);
}
END_TEST

/* ---- a tracker in the image ------------------------------------------- */

/* Mark and wait: every mark is done before the next step. */
static void
mark_now(struct bm_cbt *cbt, struct mark *m, uint64_t off, uint64_t len)
{
	ck_assert_msg(issue(cbt, m, off, len) >= 0, "mark: %s",
		      blockmirror_last_error());
	wait_marks(loop);
}

static struct bm_image *
image_open(void)
{
	struct bm_image *img;
	int r = bm_image_open(loop, path, BLOCKMIRROR_FORMAT_QCOW2,
			      BM_IMAGE_WRITE, &img);

	ck_assert_msg(r == 0, "open: %s", blockmirror_last_error());
	return img;
}

static struct bm_cbt *
track(struct bm_image *img)
{
	struct bm_cbt *cbt;
	int r = bm_cbt_open_image(loop, img, DISK, GRAN, &cbt);

	ck_assert_msg(r == 0, "track: %s", blockmirror_last_error());
	ck_assert(bm_cbt_in_image(cbt));
	ck_assert(!bm_cbt_crashed(cbt));
	return cbt;
}

/* Tracked, the image holds n checkpoints; then closed. */
static void
track_count_close(struct bm_image *img, size_t n)
{
	struct bm_cbt *cbt = track(img);

	ck_assert_uint_eq(bm_cbt_count(cbt), n);
	ck_assert_int_eq(bm_cbt_close(cbt), 0);
	bm_image_close(img);
}

/* A new empty image, tracked. */
static struct bm_cbt *
new_tracked(struct bm_image **img)
{
	ck_assert_int_eq(bm_image_create(loop, path, BLOCKMIRROR_FORMAT_QCOW2,
					 DISK, NULL, false, BM_IMAGE_WRITE,
					 img), 0);
	return track(*img);
}

static uint64_t
seed(void)
{
	return seed_from_env("BM_QBM_SEED", "test-qcow2-bitmap");
}

static int
run_qemu_img(const char *args)
{
	char cmd[PATH_MAX + 256];
	int st;

	snprintf(cmd, sizeof cmd, "qemu-img %s '%s' >/dev/null 2>&1", args,
		 path);
	st = system(cmd);
	return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static void
random_range(uint64_t *rng, uint64_t *off, uint64_t *len)
{
	*off = rnd_range(rng, DISK);
	*len = 1 + (rnd_range(rng, 8) ? rnd_range(rng, 3 * GRAN)
				      : rnd_range(rng, 64u << 20));
	if (*len > DISK - *off)
		*len = DISK - *off;
}

/* The model: per checkpoint, the blocks marked while it was newest. */
#define MAXCP 8
static struct {
	char name[MAXCP][16];
	struct bm_bitmap bits[MAXCP];
	size_t n;
} M;

static void
model_create(const char *name)
{
	snprintf(M.name[M.n], sizeof M.name[0], "%s", name);
	ck_assert_int_eq(bm_bitmap_init(&M.bits[M.n], DISK, GRAN), 0);
	M.n++;
}

static void
model_remove(size_t k)
{
	if (k > 0)
		for (uint64_t b = 0; b < M.bits[k].nbits; b++)
			if (bm_bitmap_test(&M.bits[k], b * GRAN))
				bm_bitmap_set_range(&M.bits[k - 1], b * GRAN,
						    1);
	bm_bitmap_free(&M.bits[k]);
	memmove(&M.bits[k], &M.bits[k + 1], (M.n - k - 1) * sizeof M.bits[0]);
	memmove(&M.name[k], &M.name[k + 1], (M.n - k - 1) * sizeof M.name[0]);
	M.n--;
}

static int cur_step;
static const char *cur_op = "";

/* The tracker's list and changed-since match the model exactly. */
static void
model_check(struct bm_cbt *cbt)
{
	ck_assert_uint_eq(bm_cbt_count(cbt), M.n);
	for (size_t i = 0; i < M.n; i++) {
		struct bm_cbt_info info;
		struct bm_bitmap since, want;
		uint64_t bytes;

		ck_assert_int_eq(bm_cbt_get(cbt, i, &info), 0);
		ck_assert_str_eq(info.name, M.name[i]);
		ck_assert_ptr_null(info.untrusted);
		ck_assert_int_eq(bm_cbt_changed_since(cbt, M.name[i], &since,
						      &bytes), 0);
		ck_assert_int_eq(bm_bitmap_init(&want, DISK, GRAN), 0);
		for (size_t j = i; j < M.n; j++)
			bm_cbt_or_into(&want, &M.bits[j]);
		ck_assert_uint_eq(bm_bitmap_count(&since),
				  bm_bitmap_count(&want));
		ck_assert_msg(memcmp(since.words, want.words,
				     (want.nbits + 63) / 64 * 8) == 0,
			      "changed since %s differs from the model after "
			      "step %d (%s)", M.name[i], cur_step, cur_op);
		bm_bitmap_free(&since);
		bm_bitmap_free(&want);
	}
}

START_TEST(test_track_model)
{
	uint64_t rng = seed() ^ 0x9b17, names = 0;
	struct bm_image *img;
	struct bm_cbt *cbt;
	struct mark m;

	setup();
	memset(&M, 0, sizeof M);
	cbt = new_tracked(&img);
	ck_assert_uint_eq(bm_cbt_count(cbt), 0);
	for (int step = 0; step < 60; step++) {
		uint64_t op = rnd_range(&rng, 10), off, len;
		char name[16];

		if (op < 6 && M.n) {
			random_range(&rng, &off, &len);
			cur_op = "mark";
			mark_now(cbt, &m, off, len);
			ck_assert_int_eq(m.err, 0);
			bm_bitmap_set_range(&M.bits[M.n - 1], off, len);
		} else if (op < 8 && M.n < MAXCP) {
			cur_op = "create";
			snprintf(name, sizeof name, "c%" PRIu64, ++names);
			ck_assert_int_eq(bm_cbt_create(cbt, name), 0);
			model_create(name);
		} else if (op == 8 && M.n) {
			size_t k = (size_t)rnd_range(&rng, M.n);

			cur_op = "remove";
			ck_assert_int_eq(bm_cbt_remove(cbt, M.name[k]), 0);
			model_remove(k);
		} else {
			/* Close and reopen: the image holds it all. */
			cur_op = "reopen";
			ck_assert_int_eq(bm_cbt_close(cbt), 0);
			bm_image_close(img);
			if (have_qemu_img)
				ck_assert_int_eq(run_qemu_img("check -q"), 0);
			img = image_open();
			cbt = track(img);
		}
		cur_step = step;
		model_check(cbt);
	}
	ck_assert_int_eq(bm_cbt_close(cbt), 0);
	bm_image_close(img);
	if (have_qemu_img) {
		ck_assert_int_eq(run_qemu_img("check -q"), 0);
		/* QEMU reads the newest as auto, the others frozen. */
		if (M.n) {
			char cmd[PATH_MAX + 1024];

			snprintf(cmd, sizeof cmd, "qemu-img info --output=json "
				 "'%s' | python3 -c 'import json,sys; "
				 "b=json.load(sys.stdin)[\"format-specific\"]"
				 "[\"data\"][\"bitmaps\"]; "
				 "assert [x[\"name\"] for x in b]==sys.argv[1:],b; "
				 "assert all((\"auto\" in x[\"flags\"])==(i==len(b)-1)"
				 " and \"in-use\" not in x[\"flags\"] and "
				 "x[\"granularity\"]==4096 for i,x in "
				 "enumerate(b)),b'", path);
			for (size_t i = 0; i < M.n; i++) {
				strcat(cmd, " ");
				strcat(cmd, M.name[i]);
			}
			ck_assert_msg(system(cmd) == 0, "%s", cmd);
		}
	}
	for (size_t i = 0; i < M.n; i++)
		bm_bitmap_free(&M.bits[i]);
	teardown();
}
END_TEST

/* Where the image's first bitmap table is (read from the file). */
/* The image's header, parsed (free with bm_qcow2_header_free). */
static void
read_header(struct bm_qcow2_header *h)
{
	static uint8_t c0[65536];
	FILE *f = fopen(path, "rb");

	ck_assert_ptr_nonnull(f);
	ck_assert_uint_eq(fread(c0, 1, sizeof c0, f), sizeof c0);
	fclose(f);
	ck_assert_int_eq(bm_qcow2_header_parse("img", c0, sizeof c0, h), 0);
}

static uint64_t
first_table(void)
{
	static uint8_t d[4096];
	struct bm_qcow2_header h;
	struct bm_qcow2_bitmap *b;
	uint64_t off;
	FILE *f = fopen(path, "rb");

	ck_assert_ptr_nonnull(f);
	read_header(&h);
	ck_assert(h.has_bitmaps && h.bitmaps_dir_size <= sizeof d);
	ck_assert_int_eq(fseek(f, (long)h.bitmaps_dir_offset, SEEK_SET), 0);
	ck_assert_uint_eq(fread(d, 1, h.bitmaps_dir_size, f),
			  h.bitmaps_dir_size);
	fclose(f);
	ck_assert_int_eq(bm_qcow2_bitmap_dir_parse("img", &h, d,
						   h.bitmaps_dir_size, &b), 0);
	off = b[0].table_offset;
	bm_qcow2_bitmaps_free(b, h.bitmaps_nb);
	bm_qcow2_header_free(&h);
	return off;
}

static uint64_t
file_be64(uint64_t off)
{
	uint8_t b[8];
	FILE *f = fopen(path, "rb");

	ck_assert_ptr_nonnull(f);
	ck_assert_int_eq(fseek(f, (long)off, SEEK_SET), 0);
	ck_assert_uint_eq(fread(b, 1, 8, f), 8);
	fclose(f);
	return bm_get_be64(b);
}

static void
put_file_be64(uint64_t off, uint64_t v)
{
	uint8_t b[8];
	FILE *f = fopen(path, "r+b");

	ck_assert_ptr_nonnull(f);
	bm_put_be64(b, v);
	ck_assert_int_eq(fseek(f, (long)off, SEEK_SET), 0);
	ck_assert_uint_eq(fwrite(b, 1, 8, f), 8);
	fclose(f);
}

/* Bad bitmap table entries: tracking refuses the image, saying why;
 * nothing is changed.  Among them, clusters that belong to the image
 * (an L2 table, a refcount block, guest data), that the list names
 * twice, or that nothing counts: a commit would free them (or drive a
 * refcount below 0), and the next allocation reuse them. */
START_TEST(test_bad_tables)
{
	enum { FIXED, L2, RBLOCK, DATA, TWICE, FREE };
	static const struct {
		int kind;
		uint64_t entry;
		const char *msg;
	} cases[] = {
		{ FIXED, 0x10000, "overlaps the image's metadata" },
		{ FIXED, 0x10200, "not cluster-aligned" },
		{ FIXED, UINT64_C(1) << 40, "outside the file" },
		{ FIXED, 0x3fe, "reserved bits" },
		{ L2, 0, "is also an L2 table" },
		{ RBLOCK, 0, "is also a refcount block" },
		{ DATA, 0, "is also guest data" },
		{ TWICE, 0, "is used twice" },
		{ FREE, 0, "has refcount 0, not 1" },
	};
	static uint8_t data[65536], back[65536];
	struct bm_io io = { .offset = 0, .length = sizeof data, .buf = data };
	struct bm_qcow2_header h;
	struct bm_image *img;
	struct bm_cbt *cbt;
	uint64_t table, l2, guest, rblock, free_c = 0;
	struct stat st;

	setup();
	cbt = new_tracked(&img);
	for (size_t i = 0; i < sizeof data; i++)
		data[i] = (uint8_t)(i * 7 + 1);
	ck_assert_int_eq(bm_image_sync(img, bm_image_write, &io), 0);
	ck_assert_int_eq(bm_cbt_create(cbt, "c1"), 0);
	ck_assert_int_eq(bm_cbt_close(cbt), 0);
	bm_image_close(img);
	table = first_table();
	read_header(&h);
	l2 = file_be64(h.l1_table_offset) & BM_QCOW2_OFFSET_MASK;
	guest = file_be64(l2) & BM_QCOW2_OFFSET_MASK;
	rblock = file_be64(h.refcount_table_offset);
	/* A cluster inside the file that nothing counts: one more at its
	 * end. */
	ck_assert_int_eq(stat(path, &st), 0);
	free_c = bm_round_up((uint64_t)st.st_size, UINT64_C(1) << CB);
	ck_assert_int_eq(truncate(path, (off_t)free_c + (1 << CB)), 0);
	bm_qcow2_header_free(&h);
	ck_assert(l2 && guest && rblock && free_c);
	for (size_t i = 0; i < BM_ARRAY_SIZE(cases); i++) {
		uint64_t at = table, old = file_be64(table), e;
		int r;

		switch (cases[i].kind) {
		case L2: e = l2; break;
		case RBLOCK: e = rblock; break;
		case DATA: e = guest; break;
		case TWICE: at = table + 8; e = old; old = file_be64(at); break;
		case FREE: e = free_c; break;
		default: e = cases[i].entry; break;
		}
		put_file_be64(at, e);
		img = image_open();
		r = bm_cbt_open_image(loop, img, DISK, 0, &cbt);
		ck_assert_msg(r == -EINVAL, "case %zu: %d %s", i, r,
			      blockmirror_last_error());
		ck_assert_msg_has(cases[i].msg);
		ck_assert_msg_has("bitmap c1");
		bm_image_close(img);
		put_file_be64(at, old);
	}
	img = image_open();
	io.buf = back;
	ck_assert_int_eq(bm_image_sync(img, bm_image_read, &io), 0);
	ck_assert(memcmp(back, data, sizeof data) == 0);
	track_count_close(img, 1);
	if (have_qemu_img)
		ck_assert_int_eq(run_qemu_img("check -q"), 0);
	teardown();
}
END_TEST

/* A granularity the tracker cannot hold is refused on the directory
 * alone, before the tables are read or anything they size allocated:
 * the bad table entry also there is never reached. */
START_TEST(test_limits_first)
{
	struct bm_qcow2_header h;
	struct bm_image *img;
	struct bm_cbt *cbt;
	uint8_t e[4];
	uint64_t table;
	FILE *f;
	int r;

	setup();
	cbt = new_tracked(&img);
	ck_assert_int_eq(bm_cbt_create(cbt, "c1"), 0);
	ck_assert_int_eq(bm_cbt_close(cbt), 0);
	bm_image_close(img);
	table = first_table();
	read_header(&h);
	put_file_be64(table, 0x3fe);
	f = fopen(path, "r+b");
	ck_assert_ptr_nonnull(f);
	ck_assert_int_eq(fseek(f, (long)h.bitmaps_dir_offset + 8, SEEK_SET),
			 0);
	bm_put_be32(e, (uint32_t)bm_qcow2_bitmap_table_size(DISK, 9, CB));
	ck_assert_uint_eq(fwrite(e, 1, 4, f), 4);
	ck_assert_int_eq(fseek(f, (long)h.bitmaps_dir_offset + 17, SEEK_SET),
			 0);
	ck_assert_int_eq(fputc(9, f), 9);
	fclose(f);
	bm_qcow2_header_free(&h);
	img = image_open();
	r = bm_cbt_open_image(loop, img, DISK, 0, &cbt);
	ck_assert_msg(r == -ENOTSUP, "%d %s", r, blockmirror_last_error());
	ck_assert_msg_has("granularity of 2^9 bytes");
	bm_image_close(img);
	teardown();
}
END_TEST

/*
 * A checkpoint creation whose writes (and syncs) start failing after k
 * of them, for every k until it succeeds.  A failure before the header
 * switch leaves nothing behind: the new clusters go back, qemu-img
 * check finds no leak.  A failure during the switch says the bitmaps
 * are in an unknown state, refuses further changes, and after the next
 * guest write every checkpoint reads back untrusted (leaks allowed).
 */
START_TEST(test_commit_failures)
{
	static struct bm_fault_rules rules;
	static uint8_t byte[512];
	struct bm_io io = { .offset = 0, .length = sizeof byte, .buf = byte };
	unsigned clean = 0, lost = 0;
	bool done = false;

	setup();
	for (uint64_t k = 0; !done && k < 64; k++) {
		struct bm_image *img;
		struct bm_cbt *cbt;
		bool unknown;
		int r;

		unlink(path);
		cbt = new_tracked(&img);

		ck_assert_int_eq(bm_cbt_create(cbt, "c1"), 0);
		ck_assert_int_eq(bm_cbt_close(cbt), 0);
		bm_image_close(img);

		memset(&rules, 0, sizeof rules);
		ck_assert_int_eq(bm_fault_register(path, &rules), 0);
		img = image_open();
		cbt = track(img);
		rules.write_err_after = rules.writes + k;
		rules.write_err_count = -1;
		rules.fail_flush = true;
		rules.write_errno = EIO;
		r = bm_cbt_create(cbt, "c2");
		rules.write_errno = 0;
		done = r == 0;
		unknown = r < 0 && strstr(blockmirror_last_error(),
					  "unknown state");
		if (unknown) {
			/* No more changes; a guest write unkeeps them. */
			ck_assert_int_lt(bm_cbt_create(cbt, "c3"), 0);
			ck_assert_msg_has("unknown state");
			ck_assert_int_eq(bm_image_sync(img, bm_image_write,
						       &io), 0);
		}
		bm_cbt_close(cbt);
		bm_image_close(img);
		bm_fault_unregister(path);

		if (have_qemu_img) {
			int rc = run_qemu_img("check -q");

			ck_assert_msg(rc == 0 || (unknown && rc == 3),
				      "k %" PRIu64 ": qemu-img check exit %d",
				      k, rc);
		}
		img = image_open();
		cbt = track(img);
		ck_assert_uint_eq(bm_cbt_count(cbt), done ? 2 :
				  unknown ? bm_cbt_count(cbt) : 1);
		for (size_t i = 0; unknown && i < bm_cbt_count(cbt); i++) {
			struct bm_cbt_info info;

			ck_assert_int_eq(bm_cbt_get(cbt, i, &info), 0);
			ck_assert_ptr_nonnull(info.untrusted);
		}
		bm_cbt_close(cbt);
		bm_image_close(img);
		clean += !done && !unknown;
		lost += unknown;
	}
	ck_assert(done);
	ck_assert_uint_gt(clean, 0);
	ck_assert_uint_gt(lost, 0);
	teardown();
}
END_TEST

/* ---- a backing file changed before the first checkpoint --------------- */

static void
set_backing_op(struct bm_image *img, struct bm_io *io)
{
	bm_image_set_backing(img, bm_container_of(io,
						  struct bm_backing_change,
						  io));
}

/* A sparse raw base of the disk's size: 0x5a in its first and its
 * last 64 KiB. */
static void
write_base(const char *name)
{
	static uint8_t buf[65536];
	int fd = open(name, O_CREAT | O_TRUNC | O_WRONLY, 0644);

	ck_assert_int_ge(fd, 0);
	memset(buf, 0x5a, sizeof buf);
	ck_assert_int_eq(ftruncate(fd, (off_t)DISK), 0);
	ck_assert_int_eq(pwrite(fd, buf, sizeof buf, 0), (ssize_t)sizeof buf);
	ck_assert_int_eq(pwrite(fd, buf, sizeof buf,
				(off_t)(DISK - sizeof buf)),
			 (ssize_t)sizeof buf);
	close(fd);
}

/*
 * set_backing, then the first checkpoint (which adds the bitmaps
 * extension, moving the backing file name out of its way when needed):
 * the name the image records is the new one, whole, the bitmap is
 * there, qemu-img check is clean and the data reads through the new
 * backing file.  A shorter and a longer name than the old one.
 */
START_TEST(test_set_backing_then_checkpoint)
{
	static const char *const names[] = { "b", "a-much-longer-name-for-"
					     "the-new-backing-file.raw" };
	char old[PATH_MAX + 16], neu[PATH_MAX + 64], opts[PATH_MAX + 64];
	static uint8_t buf[65536];

	setup();
	snprintf(old, sizeof old, "%s/base.raw", dir);
	write_base(old);
	for (size_t k = 0; k < BM_ARRAY_SIZE(names); k++) {
		struct bm_backing_change bc = { 0 };
		struct bm_qcow2_header h;
		struct bm_image *img;
		struct bm_cbt *cbt;
		struct bm_io io = { .length = sizeof buf, .buf = buf };

		snprintf(neu, sizeof neu, "%s/%s", dir, names[k]);
		write_base(neu);
		snprintf(opts, sizeof opts, "backing_file=%s,backing_fmt=raw",
			 old);
		ck_assert_int_eq(bm_image_create(loop, path,
						 BLOCKMIRROR_FORMAT_QCOW2,
						 DISK, opts, true,
						 BM_IMAGE_WRITE, &img), 0);
		bc.name = neu;
		ck_assert_int_eq(bm_image_open(loop, neu,
					       BLOCKMIRROR_FORMAT_RAW, 0,
					       &bc.backing), 0);
		ck_assert_msg(bm_image_sync(img, set_backing_op, &bc.io) == 0,
			      "set_backing: %s", blockmirror_last_error());
		cbt = track(img);
		ck_assert_int_eq(bm_cbt_create(cbt, "c1"), 0);
		ck_assert_int_eq(bm_cbt_create(cbt, "c2"), 0);
		ck_assert_int_eq(bm_cbt_close(cbt), 0);
		bm_image_close(img);

		read_header(&h);
		ck_assert_ptr_nonnull(h.backing_name);
		ck_assert_str_eq(h.backing_name, neu);
		ck_assert(h.has_bitmaps);
		ck_assert_uint_eq(h.bitmaps_nb, 2);
		bm_qcow2_header_free(&h);
		if (have_qemu_img)
			ck_assert_int_eq(run_qemu_img("check -q"), 0);

		img = image_open();
		for (int end = 0; end < 2; end++) {
			io.offset = end ? DISK - sizeof buf : 0;
			ck_assert_int_eq(bm_image_sync(img, bm_image_read,
						       &io), 0);
			for (size_t i = 0; i < sizeof buf; i++)
				ck_assert_uint_eq(buf[i], 0x5a);
		}
		track_count_close(img, 2);
	}
	teardown();
}
END_TEST

/* ---- crashes ---------------------------------------------------------- */

#define CRASH_MARKS 48

static struct {
	struct mark m[CRASH_MARKS];
	size_t n;
	uint64_t create_start, created, remove_start, removed;
	unsigned qemu_checks;
} C;

static bool
has(struct bm_cbt *cbt, const char *name)
{
	struct bm_cbt_info info;

	for (size_t i = 0; bm_cbt_get(cbt, i, &info) == 0; i++)
		if (!strcmp(info.name, name))
			return true;
	return false;
}

static void
check_crash(uint64_t k, int variant)
{
	struct bm_image *img;
	struct bm_cbt *cbt;
	struct bm_bitmap since1, since2 = { 0 };
	uint64_t bytes;
	bool c0, c2;
	int r = bm_image_open(loop, path, BLOCKMIRROR_FORMAT_QCOW2,
			      BM_IMAGE_WRITE, &img);

	ck_assert_msg(r == 0, "crash before %" PRIu64 " (%s), variant %d: "
		      "open: %s", k, rec_describe(k), variant,
		      blockmirror_last_error());
	r = bm_cbt_open_image(loop, img, DISK, 0, &cbt);
	ck_assert_msg(r == 0, "crash before %" PRIu64 " (%s), variant %d: "
		      "track: %s", k, rec_describe(k), variant,
		      blockmirror_last_error());
	c0 = has(cbt, "c0");
	c2 = has(cbt, "c2");
	ck_assert(has(cbt, "c1"));
	ck_assert_uint_eq(bm_cbt_count(cbt), 1u + c0 + c2);
	if (k <= C.create_start)
		ck_assert(!c2);
	if (k > C.created)
		ck_assert(c2);
	if (k <= C.remove_start)
		ck_assert(c0);
	if (k > C.removed)
		ck_assert(!c0);
	ck_assert(bm_cbt_trusted(cbt));
	ck_assert_int_eq(bm_cbt_changed_since(cbt, "c1", &since1, &bytes), 0);
	if (c2)
		ck_assert_int_eq(bm_cbt_changed_since(cbt, "c2", &since2,
						      &bytes), 0);
	for (size_t i = 0; i < C.n; i++) {
		const struct mark *m = &C.m[i];

		if (!m->done || m->ack >= k)
			continue;
		for (uint64_t off = m->off; off < m->off + m->len;
		     off = bm_round_down(off, GRAN) + GRAN)
			if (!bm_bitmap_test(&since1, off) ||
			    (m->ack > C.created &&
			     !bm_bitmap_test(&since2, off)))
				ck_abort_msg("crash before %" PRIu64 " (%s), "
					     "variant %d: mark %zu acked at %"
					     PRIu64 ", offset %" PRIu64
					     " clear", k, rec_describe(k),
					     variant, i, m->ack, off);
	}
	bm_bitmap_free(&since1);
	bm_bitmap_free(&since2);
	ck_assert_int_eq(bm_cbt_close(cbt), 0);
	bm_image_close(img);
	/* Leaks (exit 3) are allowed, corruption (2) never: at the crash
	 * points around the structural changes, and a few more. */
	if (have_qemu_img && variant != REC_DURABLE_ONLY &&
	    ((k >= C.create_start && k <= C.created + 1) ||
	     (k >= C.remove_start && k <= C.removed + 1) || k % 25 == 0)) {
		r = run_qemu_img("check");
		ck_assert_msg(r == 0 || r == 3, "crash before %" PRIu64
			      " (%s), variant %d: qemu-img check exit %d",
			      k, rec_describe(k), variant, r);
		C.qemu_checks++;
	}
}

/*
 * A checkpoint made right after the newest carries the newest's blocks
 * in the image (cbt.c): closed, the image's newest bitmap holds only what
 * was written since it, for us and for qemu-img.
 */
START_TEST(test_carry_close_exact)
{
	struct bm_image *img;
	struct bm_cbt *cbt;
	struct bm_bitmap since;
	struct mark m;
	uint64_t bytes;

	setup();
	bm_cbt_carry_window = 3600; /* however slow the machine */
	cbt = new_tracked(&img);
	ck_assert_int_eq(bm_cbt_create(cbt, "c1"), 0);
	mark_now(cbt, &m, 3 * GRAN, 10);
	ck_assert_int_eq(bm_cbt_create(cbt, "c2"), 0);
	/* Carried: durable at once. */
	ck_assert_int_eq(bm_cbt_mark(cbt, 3 * GRAN, 10, NULL), 0);
	mark_now(cbt, &m, 9 * GRAN, 10);
	ck_assert_int_eq(bm_cbt_create(cbt, "c3"), 0);
	ck_assert_int_eq(bm_cbt_close(cbt), 0);
	bm_image_close(img);

	img = image_open();
	cbt = track(img);
	ck_assert_int_eq(bm_cbt_changed_since(cbt, "c3", &since, &bytes), 0);
	ck_assert_uint_eq(bm_bitmap_count(&since), 0);
	bm_bitmap_free(&since);
	ck_assert_int_eq(bm_cbt_changed_since(cbt, "c2", &since, &bytes), 0);
	ck_assert_uint_eq(bm_bitmap_count(&since), 2);
	bm_bitmap_free(&since);
	ck_assert_int_eq(bm_cbt_close(cbt), 0);
	bm_image_close(img);
	ck_assert_int_eq(run_qemu_img("check -q"), 0);
	bm_cbt_carry_window = 10;
	teardown();
}
END_TEST

/* The image keeps no creation times (its checkpoints load as created at
 * 0): on this clock c2, made after the reopen, counts as soon after c1
 * and carries its blocks. */
static uint64_t
clock_at_5(void)
{
	return 5;
}

START_TEST(test_crash)
{
	uint64_t (*wall)(void) = bm_cbt_clock;
	uint64_t rng = seed() ^ 0xc4a5, crng = 3, total, checked = 0;
	struct bm_image *img;
	struct bm_cbt *cbt;
	struct mark pre;

	setup();
	memset(&C, 0, sizeof C);
	/* Before the recording: c0 and c1, a mark in each. */
	cbt = new_tracked(&img);
	ck_assert_int_eq(bm_cbt_create(cbt, "c0"), 0);
	mark_now(cbt, &pre, 7 * GRAN, 10);
	ck_assert_int_eq(bm_cbt_create(cbt, "c1"), 0);
	mark_now(cbt, &pre, 5 * GRAN, 10);
	ck_assert_int_eq(bm_cbt_close(cbt), 0);
	bm_image_close(img);

	ck_assert_int_eq(rec_start(dir), 0);
	recording = true;
	bm_cbt_clock = clock_at_5;
	img = image_open();
	cbt = track(img);
	rec_event("opened");
	while (C.n < CRASH_MARKS) {
		uint64_t off, len;

		random_range(&rng, &off, &len);
		mark_now(cbt, &C.m[C.n++], off, len);
		if (C.n == CRASH_MARKS / 3) {
			C.create_start = rec_event("create c2");
			ck_assert_int_eq(bm_cbt_create(cbt, "c2"), 0);
			C.created = rec_event("created c2");
			/* A block of the first page written back, then one
			 * carried from c1 in the same page: acknowledged at
			 * once, it must still be in c2 after a crash. */
			mark_now(cbt, &C.m[C.n++], 9 * GRAN, 10);
			mark_now(cbt, &C.m[C.n++], 5 * GRAN, 10);
		}
		if (C.n == 2 * CRASH_MARKS / 3) {
			C.remove_start = rec_event("remove c0");
			ck_assert_int_eq(bm_cbt_remove(cbt, "c0"), 0);
			C.removed = rec_event("removed c0");
		}
	}
	rec_event("close");
	ck_assert_int_eq(bm_cbt_close(cbt), 0);
	bm_image_close(img);
	rec_event("closed");
	bm_cbt_clock = wall;
	stop_recording(C.m, C.n);
	total = rec_now();
	checked = replay_crash_points(check_crash, &crng);
	printf("test-qcow2-bitmap: %" PRIu64 " crash points over %" PRIu64
	       " events, %u qemu-img checks\n", checked, total,
	       C.qemu_checks);
	rec_free();
	teardown();
}
END_TEST

int
main(void)
{
	Suite *s = suite_create("qcow2-bitmap");
	TCase *tc = tcase_create("qcow2-bitmap");

	tcase_set_timeout(tc, 240);
	tcase_add_test(tc, test_dir_roundtrip);
	tcase_add_test(tc, test_dir_malformed);
	tcase_add_test(tc, test_dir_many);
	tcase_add_test(tc, test_dir_flips);
	tcase_add_test(tc, test_table_entry);
	tcase_add_test(tc, test_track_model);
	tcase_add_test(tc, test_bad_tables);
	tcase_add_test(tc, test_limits_first);
	tcase_add_test(tc, test_commit_failures);
	tcase_add_test(tc, test_set_backing_then_checkpoint);
	tcase_add_test(tc, test_carry_close_exact);
	tcase_add_test(tc, test_crash);
	suite_add_tcase(s, tc);
	return run_suite(s) ? EXIT_FAILURE : EXIT_SUCCESS;
}
