/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Changed-block tracking (lib/cbt.c, lib/cbt-format.c, docs/cbt.md).
 *
 * Format: a header round-trips, and every single-byte change to it is
 * refused.  Input: a missing, damaged, truncated or foreign sidecar, bad
 * and duplicate names and missing checkpoints fail with a message naming
 * the file.  Marking: random marks, checkpoint creations, removals and
 * reopenings against a model (BM_CBT_SEED replays a seed; it is printed),
 * and the same with the in-memory fine record switched on and off;
 * a burst of marks shares syncs; a durable range costs no I/O, and so
 * does one carried into a checkpoint made soon after the last, which a
 * crash must still find marked (and a close must not); a failed
 * write-back fails every waiting and later mark and untrusts the
 * checkpoints, on disk too, until a rewrite.
 *
 * Crash: the crash recorder (recorder.h) logs a run of marks, each
 * acknowledged (rec_event) once its waiter runs, with a checkpoint
 * created in the middle and a close at the end.  At every event, for
 * each variant (durable writes only, all of them, a random torn subset),
 * the sidecar a crash may have left must open, list the old or the new
 * checkpoints (never anything else), and mark every block of every mark
 * acknowledged before the crash.
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
#include <unistd.h>

#include "cbt.h"
#include "cbt-marks.h"
#include "fault.h"
#include "helpers.h"
#include "internal.h"
#include "recorder.h"

#define GRAN 4096u
/* Three pages of bits, the last one partial, and a partial last block. */
#define DISK ((UINT64_C(300) << 20) + 1000)

static struct bm_loop *loop;
static char dir[PATH_MAX], path[PATH_MAX + 16];

static void
setup(void)
{
	const char *base = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";

	snprintf(dir, sizeof dir, "%s/test-cbt-XXXXXX", base);
	ck_assert_ptr_nonnull(mkdtemp(dir));
	snprintf(path, sizeof path, "%s/disk.cbt", dir);
	ck_assert_int_eq(bm_loop_new(64, &loop), 0);
}

static void
teardown(void)
{
	bm_loop_free(loop);
	remove_tree(dir);
}

static bool
msg_has(const char *s)
{
	const char *m = blockmirror_last_error();

	return m && strstr(m, s);
}

#define ck_assert_msg_has(s) \
	ck_assert_msg(msg_has(s), "message \"%s\" lacks \"%s\"", \
		      blockmirror_last_error(), (s))

static struct bm_cbt *
open_ok(bool create)
{
	struct bm_cbt *cbt;
	int r = bm_cbt_open(loop, path, DISK, GRAN, create, &cbt);

	ck_assert_msg(r == 0, "open: %s", blockmirror_last_error());
	return cbt;
}

static void
random_range(uint64_t *rng, uint64_t *off, uint64_t *len)
{
	/* Mostly small writes; some cross blocks and pages. */
	*off = rnd_range(rng, DISK);
	*len = 1 + (rnd_range(rng, 8) ? rnd_range(rng, 3 * GRAN)
				      : rnd_range(rng, 300u << 20));
	if (*len > DISK - *off)
		*len = DISK - *off;
}

/* ---- format ----------------------------------------------------------- */

START_TEST(test_format)
{
	struct bm_cbt_entry e[3] = {
		{ .id = 1, .created = 1700000000, .name = "daily.1" },
		{ .id = 4, .created = 1700086400, .flags = BM_CBT_LOST,
		  .name = "daily-2" },
		{ .id = 9, .created = 1700172800, .name = "A_b.9" },
	};
	struct bm_cbt_header h = {
		.flags = BM_CBT_IN_USE, .disk_size = DISK, .granularity = GRAN,
		.next_id = 10, .count = 3, .cp = e,
	}, d;
	size_t size = bm_cbt_header_size(3), peek;
	uint8_t *buf = malloc(size);
	char long_name[BM_CBT_NAME_MAX + 2];

	ck_assert_uint_eq(size, 4096);
	ck_assert_uint_eq(bm_cbt_header_size(31), 4096);
	ck_assert_uint_eq(bm_cbt_header_size(32), 8192);
	ck_assert_uint_eq(bm_cbt_bitmap_size(DISK, GRAN), 3 * 4096);
	ck_assert_uint_eq(bm_cbt_blocks(DISK, GRAN), 76801);
	ck_assert_int_eq(bm_cbt_header_encode(&h, buf), 0);
	ck_assert_int_eq(bm_cbt_header_peek(buf, size, &peek), 0);
	ck_assert_uint_eq(peek, size);
	ck_assert_int_eq(bm_cbt_header_decode(buf, size, &d), 0);
	ck_assert_uint_eq(d.flags, BM_CBT_IN_USE);
	ck_assert_uint_eq(d.disk_size, DISK);
	ck_assert_uint_eq(d.granularity, GRAN);
	ck_assert_uint_eq(d.next_id, 10);
	ck_assert_uint_eq(d.count, 3);
	for (int i = 0; i < 3; i++) {
		ck_assert_str_eq(d.cp[i].name, e[i].name);
		ck_assert_uint_eq(d.cp[i].id, e[i].id);
		ck_assert_uint_eq(d.cp[i].created, e[i].created);
		ck_assert_uint_eq(d.cp[i].flags, e[i].flags);
	}
	free(d.cp);

	/* Every byte counts: the checksum covers the padding too. */
	for (size_t i = 0; i < size; i++) {
		buf[i] ^= 0x20;
		ck_assert_int_eq(bm_cbt_header_decode(buf, size, &d), -EBADMSG);
		ck_assert_ptr_null(d.cp);
		buf[i] ^= 0x20;
	}
	ck_assert_int_eq(bm_cbt_header_decode(buf, size - 1, &d), -EBADMSG);

	/* What cannot be read back is not written. */
	e[2].id = 4;
	ck_assert_int_eq(bm_cbt_header_encode(&h, buf), -EINVAL);
	e[2].id = 9;
	snprintf(e[2].name, sizeof e[2].name, "daily.1");
	ck_assert_int_eq(bm_cbt_header_encode(&h, buf), -EINVAL);
	ck_assert_msg_has("two checkpoints with one name");
	snprintf(e[2].name, sizeof e[2].name, "x");
	h.granularity = 3000;
	ck_assert_int_eq(bm_cbt_header_encode(&h, buf), -EINVAL);

	ck_assert(bm_cbt_name_ok("a"));
	ck_assert(bm_cbt_name_ok("Backup-2024.01_01"));
	ck_assert(!bm_cbt_name_ok(""));
	ck_assert(!bm_cbt_name_ok(NULL));
	ck_assert(!bm_cbt_name_ok("a/b"));
	ck_assert(!bm_cbt_name_ok("a b"));
	ck_assert(!bm_cbt_name_ok("\xc3\xa9t\xc3\xa9"));
	memset(long_name, 'n', sizeof long_name);
	long_name[BM_CBT_NAME_MAX] = '\0';
	ck_assert(bm_cbt_name_ok(long_name));
	long_name[BM_CBT_NAME_MAX] = 'n';
	long_name[BM_CBT_NAME_MAX + 1] = '\0';
	ck_assert(!bm_cbt_name_ok(long_name));
	free(buf);
}
END_TEST

/* Bits on disk: block b is bit b % 8 of byte b / 8; stray bits refused. */
START_TEST(test_bits)
{
	uint64_t blocks = 70, words[2] = { 0, 0 }, back[2] = { 0, 0 };
	uint8_t page[BM_CBT_PAGE];

	words[0] = UINT64_C(1) << 0 | UINT64_C(1) << 9;
	words[1] = UINT64_C(1) << 5; /* block 69, the last */
	bm_cbt_bits_encode(words, NULL, blocks, 0, 1, page);
	ck_assert_uint_eq(page[0], 0x01);
	ck_assert_uint_eq(page[1], 0x02);
	ck_assert_uint_eq(page[8], 0x20);
	ck_assert_uint_eq(bm_cbt_bits_decode(page, blocks, 0, 1, back), 3);
	ck_assert_uint_eq(back[0], words[0]);
	ck_assert_uint_eq(back[1], words[1]);
	page[8] |= 0x40; /* block 70: past the end */
	ck_assert_uint_eq(bm_cbt_bits_decode(page, blocks, 0, 1, back),
			  UINT64_MAX);
	page[8] &= ~0x40;
	page[100] = 1;
	ck_assert_uint_eq(bm_cbt_bits_decode(page, blocks, 0, 1, back),
			  UINT64_MAX);
}
END_TEST

/* ---- bad input -------------------------------------------------------- */

static void
flip_byte(off_t off)
{
	int fd = open(path, O_RDWR);
	uint8_t b;

	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(pread(fd, &b, 1, off), 1);
	b ^= 0x04;
	ck_assert_int_eq(pwrite(fd, &b, 1, off), 1);
	close(fd);
}

START_TEST(test_bad_input)
{
	struct bm_cbt *cbt;
	struct bm_bitmap bm;
	uint64_t bytes;
	char sizes[64];

	setup();
	ck_assert_int_eq(bm_cbt_open(loop, path, DISK, GRAN, false, &cbt),
			 -ENOENT);
	ck_assert_msg_has(path);
	ck_assert_int_eq(bm_cbt_open(loop, path, DISK, 3000, true, &cbt),
			 -EINVAL);
	ck_assert_int_eq(bm_cbt_open(loop, path, 0, GRAN, true, &cbt),
			 -EINVAL);

	cbt = open_ok(true);
	ck_assert(!bm_cbt_crashed(cbt));
	ck_assert_uint_eq(bm_cbt_granularity(cbt), GRAN);
	ck_assert_int_eq(bm_cbt_create(cbt, ""), -EINVAL);
	ck_assert_msg_has(path);
	ck_assert_int_eq(bm_cbt_create(cbt, "a/b"), -EINVAL);
	ck_assert_int_eq(bm_cbt_create(cbt, "x\ny"), -EINVAL);
	ck_assert_int_eq(bm_cbt_create(cbt, "c1"), 0);
	ck_assert_int_eq(bm_cbt_create(cbt, "c1"), -EEXIST);
	ck_assert_msg_has("c1");
	ck_assert_int_eq(bm_cbt_remove(cbt, "nope"), -ENOENT);
	ck_assert_msg_has(path);
	ck_assert_msg_has("nope");
	ck_assert_int_eq(bm_cbt_changed_since(cbt, "nope", &bm, &bytes),
			 -ENOENT);
	ck_assert_int_eq(bm_cbt_mark(cbt, DISK - 1, 2, NULL), -EINVAL);
	ck_assert_int_eq(bm_cbt_mark(cbt, 0, 1, NULL), -EINVAL);
	ck_assert_uint_eq(bm_cbt_count(cbt), 1);
	ck_assert_int_eq(bm_cbt_close(cbt), 0);
	/* A new file with granularity 0 takes the default. */
	strcat(path, "2");
	ck_assert_int_eq(bm_cbt_open(loop, path, DISK, 0, true, &cbt), 0);
	ck_assert_uint_eq(bm_cbt_granularity(cbt), BM_CBT_DEFAULT_GRANULARITY);
	ck_assert_int_eq(bm_cbt_close(cbt), 0);
	path[strlen(path) - 1] = '\0';

	/* Another disk, another granularity: refused, naming both. */
	ck_assert_int_eq(bm_cbt_open(loop, path, DISK + 4096, GRAN, false,
				     &cbt), -ESTALE);
	snprintf(sizes, sizeof sizes, "%" PRIu64, DISK);
	ck_assert_msg_has(sizes);
	snprintf(sizes, sizeof sizes, "%" PRIu64, DISK + 4096);
	ck_assert_msg_has(sizes);
	ck_assert_msg_has(path);
	ck_assert_int_eq(bm_cbt_open(loop, path, DISK, 2 * GRAN, false, &cbt),
			 -ESTALE);
	ck_assert_msg_has(path);
	/* 0 takes the file's granularity. */
	ck_assert_int_eq(bm_cbt_open(loop, path, DISK, 0, false, &cbt), 0);
	ck_assert_uint_eq(bm_cbt_granularity(cbt), GRAN);
	ck_assert_int_eq(bm_cbt_close(cbt), 0);

	/* A damaged header or list is refused, never replaced. */
	for (off_t off = 0; off < 4096; off += 173) {
		flip_byte(off);
		ck_assert_int_eq(bm_cbt_open(loop, path, DISK, GRAN, true,
					     &cbt), -EBADMSG);
		ck_assert_msg_has(path);
		flip_byte(off);
	}
	flip_byte(64 + 30); /* in c1's name */
	ck_assert_int_eq(bm_cbt_open(loop, path, DISK, GRAN, true, &cbt),
			 -EBADMSG);
	ck_assert_msg_has("checksum mismatch");
	flip_byte(64 + 30);
	ck_assert_int_eq(truncate(path, 4096 + 4096), 0);
	ck_assert_int_eq(bm_cbt_open(loop, path, DISK, GRAN, true, &cbt),
			 -EBADMSG);
	ck_assert_msg_has(path);
	ck_assert_int_eq(truncate(path, 10), 0);
	ck_assert_int_eq(bm_cbt_open(loop, path, DISK, GRAN, true, &cbt),
			 -EBADMSG);
	ck_assert_msg_has("truncated");
	teardown();
}
END_TEST

/* A bit past the end of the disk in a bitmap: that checkpoint and the
 * ones before it are untrusted, the others not. */
START_TEST(test_damaged_bitmap)
{
	struct bm_cbt *cbt;
	struct bm_cbt_info info;
	struct bm_bitmap bm;
	uint64_t bytes;

	setup();
	cbt = open_ok(true);
	ck_assert_int_eq(bm_cbt_create(cbt, "c1"), 0);
	ck_assert_int_eq(bm_cbt_create(cbt, "c2"), 0);
	ck_assert_int_eq(bm_cbt_create(cbt, "c3"), 0);
	ck_assert_int_eq(bm_cbt_close(cbt), 0);
	/* c2's bitmap, last page, past block 76800. */
	flip_byte(4096 + 3 * 4096 + 2 * 4096 + 2000);
	cbt = open_ok(false);
	ck_assert_int_eq(bm_cbt_get(cbt, 0, &info), 0);
	ck_assert_ptr_nonnull(info.untrusted);
	ck_assert_int_eq(bm_cbt_get(cbt, 1, &info), 0);
	ck_assert_ptr_nonnull(info.untrusted);
	ck_assert_int_eq(bm_cbt_get(cbt, 2, &info), 0);
	ck_assert_ptr_null(info.untrusted);
	ck_assert_int_eq(bm_cbt_changed_since(cbt, "c1", &bm, &bytes),
			 -ESTALE);
	ck_assert_msg_has("damaged");
	ck_assert_int_eq(bm_cbt_changed_since(cbt, "c3", &bm, &bytes), 0);
	bm_bitmap_free(&bm);
	ck_assert_int_eq(bm_cbt_close(cbt), 0);
	/* The flag stays on disk. */
	cbt = open_ok(false);
	ck_assert_int_eq(bm_cbt_get(cbt, 1, &info), 0);
	ck_assert_ptr_nonnull(info.untrusted);
	ck_assert_int_eq(bm_cbt_close(cbt), 0);
	teardown();
}
END_TEST

/* ---- the model -------------------------------------------------------- */

#define MAX_CP 6
#define BLOCKS 76801

static struct {
	size_t n;
	char name[MAX_CP][16];
	uint8_t *bits[MAX_CP];
} M;

static void
model_mark(uint64_t off, uint64_t len)
{
	if (!M.n)
		return;
	for (uint64_t b = off / GRAN; b <= (off + len - 1) / GRAN; b++)
		M.bits[M.n - 1][b] = 1;
}

static void
check_model(struct bm_cbt *cbt)
{
	ck_assert_uint_eq(bm_cbt_count(cbt), M.n);
	for (size_t k = 0; k < M.n; k++) {
		struct bm_cbt_info info;
		struct bm_bitmap bm;
		uint64_t bytes, own = 0, since = 0;

		ck_assert_int_eq(bm_cbt_get(cbt, k, &info), 0);
		ck_assert_str_eq(info.name, M.name[k]);
		ck_assert_ptr_null(info.untrusted);
		ck_assert_int_eq(bm_cbt_changed_since(cbt, M.name[k], &bm,
						      &bytes), 0);
		for (uint64_t b = 0; b < BLOCKS; b++) {
			bool want = false;

			for (size_t j = k; j < M.n; j++)
				want |= M.bits[j][b];
			own += M.bits[k][b];
			since += want;
			if (bm_bitmap_test(&bm, b * GRAN) != want)
				ck_abort_msg("checkpoint %s, block %" PRIu64
					     ": %d, the model says %d",
					     M.name[k], b, !want, want);
		}
		ck_assert_uint_eq(info.blocks, own);
		ck_assert_uint_eq(bm_bitmap_count(&bm), since);
		ck_assert_uint_eq(bytes, bm_bitmap_dirty_bytes(&bm));
		bm_bitmap_free(&bm);
	}
}

START_TEST(test_model)
{
	uint64_t rng = seed_from_env("BM_CBT_SEED", "test-cbt"), id = 0;
	struct bm_cbt *cbt;
	static struct mark m[16];

	setup();
	memset(&M, 0, sizeof M);
	cbt = open_ok(true);
	for (int step = 0; step < 400; step++) {
		unsigned op = (unsigned)rnd_range(&rng, 100);

		if (op < 70) {
			int n = 1 + (int)rnd_range(&rng, 16);

			for (int i = 0; i < n; i++) {
				uint64_t off, len;

				random_range(&rng, &off, &len);
				ck_assert_int_ge(issue(cbt, &m[i], off, len),
						 0);
				model_mark(off, len);
			}
			wait_marks(loop);
			for (int i = 0; i < n; i++)
				ck_assert_int_eq(m[i].err, 0);
		} else if (op < 80 && M.n < MAX_CP) {
			snprintf(M.name[M.n], sizeof M.name[0], "cp%" PRIu64,
				 id++);
			M.bits[M.n] = calloc(BLOCKS, 1);
			ck_assert_int_eq(bm_cbt_create(cbt, M.name[M.n]), 0);
			M.n++;
		} else if (op < 88 && M.n) {
			size_t k = (size_t)rnd_range(&rng, M.n);

			ck_assert_int_eq(bm_cbt_remove(cbt, M.name[k]), 0);
			if (k > 0)
				for (uint64_t b = 0; b < BLOCKS; b++)
					M.bits[k - 1][b] |= M.bits[k][b];
			free(M.bits[k]);
			memmove(&M.bits[k], &M.bits[k + 1],
				(M.n - k - 1) * sizeof M.bits[0]);
			memmove(&M.name[k], &M.name[k + 1],
				(M.n - k - 1) * sizeof M.name[0]);
			M.n--;
		} else if (op < 95) {
			ck_assert_int_eq(bm_cbt_close(cbt), 0);
			cbt = open_ok(false);
			ck_assert(!bm_cbt_crashed(cbt));
			check_model(cbt);
		} else {
			check_model(cbt);
		}
	}
	check_model(cbt);
	ck_assert_int_eq(bm_cbt_close(cbt), 0);
	cbt = open_ok(false);
	check_model(cbt);
	ck_assert_int_eq(bm_cbt_close(cbt), 0);
	for (size_t k = 0; k < M.n; k++)
		free(M.bits[k]);
	teardown();
}
END_TEST

/* ---- the fine record ---------------------------------------------------- */

#define FGRAN 65536u
#define FDISK ((UINT64_C(64) << 20) + 1000)
#define FBLOCKS ((FDISK + GRAN - 1) / GRAN)

static struct {
	size_t n;
	char name[MAX_CP][16];
	uint8_t *bits[MAX_CP];      /* 4 KiB blocks written since */
	bool fine[MAX_CP];          /* kept since it was created */
} F;

static void
fine_check(struct bm_cbt *cbt)
{
	ck_assert_uint_eq(bm_cbt_count(cbt), F.n);
	for (size_t k = 0; k < F.n; k++) {
		struct bm_bitmap fb, cb;
		uint64_t bytes, fbytes, g;
		bool fine = true;

		for (size_t j = k; j < F.n; j++)
			fine &= F.fine[j];
		ck_assert_int_eq(bm_cbt_changed_since(cbt, F.name[k], &cb,
						      &bytes), 0);
		ck_assert_int_eq(bm_cbt_changed_since_fine(cbt, F.name[k], &fb,
							   &fbytes), 0);
		ck_assert_uint_eq(bm_bitmap_granularity(&cb), FGRAN);
		g = bm_bitmap_granularity(&fb);
		ck_assert_msg(g == (fine ? GRAN : FGRAN), "checkpoint %s: "
			      "changed since at %" PRIu64 ", the model says "
			      "%u", F.name[k], g, fine ? GRAN : FGRAN);
		for (uint64_t c = 0; c < FBLOCKS; c += FGRAN / GRAN) {
			uint64_t e = BM_MIN(c + FGRAN / GRAN, FBLOCKS);
			bool cwant = false;

			for (uint64_t b = c; b < e; b++)
				for (size_t j = k; j < F.n; j++)
					cwant |= F.bits[j][b];
			for (uint64_t b = c; b < e; b++) {
				bool want = false;

				for (size_t j = k; j < F.n; j++)
					want |= F.bits[j][b];
				if (bm_bitmap_test(&cb, b * GRAN) != cwant ||
				    bm_bitmap_test(&fb, b * GRAN) !=
				    (fine ? want : cwant))
					ck_abort_msg("checkpoint %s, 4 KiB "
						     "block %" PRIu64 ": "
						     "coarse %d fine %d, the "
						     "model says %d, %d",
						     F.name[k], b,
						     bm_bitmap_test(&cb,
								    b * GRAN),
						     bm_bitmap_test(&fb,
								    b * GRAN),
						     cwant,
						     fine ? want : cwant);
			}
		}
		ck_assert_uint_eq(fbytes, bm_bitmap_dirty_bytes(&fb));
		ck_assert_uint_le(fbytes, bytes);
		bm_bitmap_free(&fb);
		bm_bitmap_free(&cb);
	}
}

/*
 * Random marks, creations, removals, reopenings and the fine record
 * taken and let go by its users, against a model at 4 KiB: a checkpoint created
 * while it is kept tells what changed since it in 4 KiB blocks exactly
 * as long as every checkpoint after it has been kept too (a removal
 * merges the two records, or leaves the older one without), and in the
 * record's 64 KiB granules otherwise; a reopened tracker has none.
 */
START_TEST(test_fine)
{
	uint64_t rng = seed_from_env("BM_CBT_SEED", "test-cbt fine"), id = 0;
	struct bm_cbt *cbt;
	static struct mark m[16];
	bool keep = true;
	unsigned users = 1;
	int r;

	setup();
	memset(&F, 0, sizeof F);
	ck_assert_int_eq(bm_cbt_open(loop, path, FDISK, FGRAN, true, &cbt), 0);
	/* A power of two from 4 KiB below the record's granularity. */
	ck_assert_int_eq(bm_cbt_keep_fine(cbt, 3000), -EINVAL);
	ck_assert_int_eq(bm_cbt_keep_fine(cbt, 2048), -EINVAL);
	ck_assert_int_eq(bm_cbt_keep_fine(cbt, FGRAN), -EINVAL);
	ck_assert_int_eq(bm_cbt_keep_fine(cbt, 2 * FGRAN), -EINVAL);
	ck_assert_msg_has("below the record's 65536");
	ck_assert_int_eq(bm_cbt_keep_fine(cbt, GRAN), 0);
	ck_assert_uint_eq(bm_cbt_fine_granularity(cbt), GRAN);
	for (int step = 0; step < 600; step++) {
		unsigned op = (unsigned)rnd_range(&rng, 100);

		if (op < 60) {
			int n = 1 + (int)rnd_range(&rng, 16);

			for (int i = 0; i < n; i++) {
				uint64_t off = rnd_range(&rng, FDISK), len;

				len = 1 + (rnd_range(&rng, 8) ?
					   rnd_range(&rng, 3 * GRAN) :
					   rnd_range(&rng, 8u << 20));
				len = BM_MIN(len, FDISK - off);
				ck_assert_int_ge(issue(cbt, &m[i], off, len),
						 0);
				for (uint64_t b = off / GRAN;
				     F.n && b <= (off + len - 1) / GRAN; b++)
					F.bits[F.n - 1][b] = 1;
			}
			wait_marks(loop);
			for (int i = 0; i < n; i++)
				ck_assert_int_eq(m[i].err, 0);
		} else if (op < 72 && F.n < MAX_CP) {
			snprintf(F.name[F.n], sizeof F.name[0], "cp%" PRIu64,
				 id++);
			F.bits[F.n] = calloc(FBLOCKS, 1);
			F.fine[F.n] = keep;
			ck_assert_int_eq(bm_cbt_create(cbt, F.name[F.n]), 0);
			F.n++;
		} else if (op < 82 && F.n) {
			size_t k = (size_t)rnd_range(&rng, F.n);

			ck_assert_int_eq(bm_cbt_remove(cbt, F.name[k]), 0);
			if (k > 0) {
				for (uint64_t b = 0; b < FBLOCKS; b++)
					F.bits[k - 1][b] |= F.bits[k][b];
				F.fine[k - 1] &= F.fine[k];
			}
			free(F.bits[k]);
			memmove(&F.bits[k], &F.bits[k + 1],
				(F.n - k - 1) * sizeof F.bits[0]);
			memmove(&F.name[k], &F.name[k + 1],
				(F.n - k - 1) * sizeof F.name[0]);
			memmove(&F.fine[k], &F.fine[k + 1],
				(F.n - k - 1) * sizeof F.fine[0]);
			F.n--;
		} else if (op < 88) {
			/* Counted: what is kept goes with the last user. */
			if (users && rnd_range(&rng, 2)) {
				ck_assert_int_eq(bm_cbt_keep_fine(cbt, 0), 0);
				if (!--users) {
					memset(F.fine, 0, sizeof F.fine);
					keep = false;
				}
			} else {
				ck_assert_int_eq(bm_cbt_keep_fine(cbt, GRAN),
						 0);
				users++;
				keep = true;
			}
			ck_assert_int_eq(bm_cbt_keep_fine(cbt, 2 * GRAN),
					 keep ? -EBUSY : 0);
			if (!keep)
				ck_assert_int_eq(bm_cbt_keep_fine(cbt, 0), 0);
		} else if (op < 92) {
			ck_assert_int_eq(bm_cbt_close(cbt), 0);
			r = bm_cbt_open(loop, path, FDISK, FGRAN, false, &cbt);
			ck_assert_int_eq(r, 0);
			memset(F.fine, 0, sizeof F.fine);
			keep = false;
			users = 0;
			ck_assert_uint_eq(bm_cbt_fine_granularity(cbt), 0);
			/* Nothing to undo: a no-op. */
			ck_assert_int_eq(bm_cbt_keep_fine(cbt, 0), 0);
		} else {
			fine_check(cbt);
		}
	}
	fine_check(cbt);
	ck_assert_int_eq(bm_cbt_close(cbt), 0);
	for (size_t k = 0; k < F.n; k++)
		free(F.bits[k]);
	teardown();
}
END_TEST

/* ---- group commit, fast path ------------------------------------------ */

static struct bm_fault_rules rules;

START_TEST(test_group_commit)
{
	enum { N = 64 };
	static struct mark m[N];
	struct bm_cbt *cbt;
	uint64_t flushes, submitted;
	int waited = 0;

	setup();
	memset(&rules, 0, sizeof rules);
	ck_assert_int_eq(bm_fault_register(path, &rules), 0);
	cbt = open_ok(true);
	/* No checkpoint: nothing to track, nothing to pay. */
	ck_assert_int_eq(bm_cbt_mark(cbt, 0, DISK, NULL), 0);
	ck_assert_int_eq(bm_cbt_create(cbt, "c1"), 0);
	ck_assert_uint_eq(rules.submitted, 0);

	/* N marks over all three pages before the loop turns: the first
	 * starts a write-back, the others share the next. */
	for (int i = 0; i < N; i++)
		waited += issue(cbt, &m[i], (uint64_t)i * (DISK / N), 100);
	ck_assert_int_eq(waited, N);
	wait_marks(loop);
	for (int i = 0; i < N; i++)
		ck_assert_int_eq(m[i].err, 0);
	ck_assert_uint_le(rules.flushes, 2);
	ck_assert_uint_ge(rules.flushes, 1);

	/* Durable now: the same ranges, and parts of them, cost nothing. */
	flushes = rules.flushes;
	submitted = rules.submitted;
	for (int i = 0; i < N; i++) {
		uint64_t off = (uint64_t)i * (DISK / N);

		ck_assert_int_eq(bm_cbt_mark(cbt, off, 100, NULL), 0);
		ck_assert_int_eq(bm_cbt_mark(cbt, bm_round_down(off, GRAN),
					     GRAN, NULL), 0);
	}
	ck_assert_uint_eq(rules.submitted, submitted);
	ck_assert_uint_eq(rules.flushes, flushes);
	/* One block more and it must wait again. */
	ck_assert_int_eq(issue(cbt, &m[0], 0, GRAN + 1), 1);
	wait_marks(loop);
	ck_assert_int_eq(m[0].err, 0);
	ck_assert_uint_eq(rules.flushes, flushes + 1);
	ck_assert_int_eq(bm_cbt_close(cbt), 0);
	bm_fault_unregister(path);
	teardown();
}
END_TEST

/* ---- carrying ---------------------------------------------------------- */

/* Blocks changed since `name`, and how many. */
static uint64_t
since_count(struct bm_cbt *cbt, const char *name, uint64_t off)
{
	struct bm_bitmap bm;
	uint64_t bytes, n;
	bool set;

	ck_assert_int_eq(bm_cbt_changed_since(cbt, name, &bm, &bytes), 0);
	n = bm_bitmap_count(&bm);
	set = bm_bitmap_test(&bm, off);
	bm_bitmap_free(&bm);
	return n * 2 + set;
}

/*
 * A checkpoint made right after the newest carries its durable blocks on
 * disk: a write into one of them goes on without a sync, yet Bn in
 * memory stays exact (and so does the file after a close); only a crash
 * shows the carried block, as part of "changed since".  With the window
 * at 0 the new bitmap starts empty and the same write waits.
 */
START_TEST(test_carry)
{
	static struct mark m[2];
	struct bm_cbt *cbt, *after;
	uint64_t a = 7 * GRAN, b = 2 * GRAN, submitted, flushes;

	setup();
	/* However slow this machine: every creation here is "soon". */
	bm_cbt_carry_window = 3600;
	memset(&rules, 0, sizeof rules);
	ck_assert_int_eq(bm_fault_register(path, &rules), 0);
	cbt = open_ok(true);
	ck_assert_int_eq(bm_cbt_create(cbt, "c1"), 0);
	ck_assert_int_eq(issue(cbt, &m[0], a, 10), 1);
	wait_marks(loop);
	ck_assert_int_eq(bm_cbt_create(cbt, "c2"), 0);
	ck_assert_uint_eq(since_count(cbt, "c2", a), 0 * 2 + 0);
	/* A new block waits; its page (a's too) is written without
	 * clearing the carried bit of a. */
	ck_assert_int_eq(issue(cbt, &m[1], b, 10), 1);
	wait_marks(loop);
	ck_assert_int_eq(m[1].err, 0);
	ck_assert_uint_eq(since_count(cbt, "c2", b), 1 * 2 + 1);
	/* Carried: no I/O, and Bn in memory has it all the same. */
	submitted = rules.submitted;
	flushes = rules.flushes;
	ck_assert_int_eq(bm_cbt_mark(cbt, a, 10, NULL), 0);
	ck_assert_uint_eq(rules.submitted, submitted);
	ck_assert_uint_eq(rules.flushes, flushes);
	ck_assert_uint_eq(since_count(cbt, "c2", a), 2 * 2 + 1);

	/* A crash now: c2 on disk holds a (acknowledged without a sync)
	 * and b. */
	ck_assert_int_eq(bm_cbt_open(loop, path, DISK, GRAN, false, &after),
			 0);
	ck_assert(bm_cbt_crashed(after));
	ck_assert_uint_eq(since_count(after, "c2", a), 2 * 2 + 1);
	ck_assert_int_eq(bm_cbt_close(after), 0);
	ck_assert_int_eq(bm_cbt_close(cbt), 0);

	/* Closed cleanly, c2 holds only what was written since it: the
	 * block written before it and again after, and b. */
	cbt = open_ok(false);
	ck_assert(!bm_cbt_crashed(cbt));
	ck_assert_uint_eq(since_count(cbt, "c2", a), 2 * 2 + 1);
	ck_assert_uint_eq(since_count(cbt, "c1", a), 2 * 2 + 1);

	/* A carried block not written again is not in c3 after a close,
	 * and a removal keeps the carried blocks durable. */
	ck_assert_int_eq(bm_cbt_create(cbt, "c3"), 0);
	ck_assert_int_eq(bm_cbt_create(cbt, "c4"), 0);
	ck_assert_int_eq(bm_cbt_remove(cbt, "c1"), 0);
	submitted = rules.submitted;
	ck_assert_int_eq(bm_cbt_mark(cbt, b, 10, NULL), 0);
	ck_assert_uint_eq(rules.submitted, submitted);
	ck_assert_int_eq(bm_cbt_open(loop, path, DISK, GRAN, false, &after),
			 0);
	ck_assert_uint_eq(since_count(after, "c4", b) & 1, 1);
	ck_assert_int_eq(bm_cbt_close(after), 0);
	ck_assert_int_eq(bm_cbt_close(cbt), 0);
	cbt = open_ok(false);
	ck_assert_uint_eq(since_count(cbt, "c3", a), 1 * 2 + 0);
	ck_assert_uint_eq(since_count(cbt, "c4", b), 1 * 2 + 1);
	ck_assert_int_eq(bm_cbt_close(cbt), 0);

	/* Opened after a crash, Bn may carry blocks of unknown age: the
	 * next checkpoint starts empty (c4 held b after the crash). */
	cbt = open_ok(false);
	ck_assert_int_eq(bm_cbt_open(loop, path, DISK, GRAN, false, &after),
			 0);
	ck_assert(bm_cbt_crashed(after));
	ck_assert_int_eq(bm_cbt_close(cbt), 0);
	ck_assert_int_eq(bm_cbt_create(after, "c6"), 0);
	ck_assert_int_eq(issue(after, &m[0], b, 10), 1);
	wait_marks(loop);
	ck_assert_int_eq(bm_cbt_remove(after, "c6"), 0);
	ck_assert_int_eq(bm_cbt_close(after), 0);
	cbt = open_ok(false);

	/* No window: the new bitmap starts empty, the write waits. */
	bm_cbt_carry_window = 0;
	ck_assert_int_eq(bm_cbt_create(cbt, "c5"), 0);
	ck_assert_int_eq(issue(cbt, &m[0], a, 10), 1);
	wait_marks(loop);
	bm_cbt_carry_window = 10;
	ck_assert_int_eq(bm_cbt_close(cbt), 0);
	bm_fault_unregister(path);
	teardown();
}
END_TEST

static uint64_t fake_now;

static uint64_t
fake_clock(void)
{
	return fake_now;
}

/* Create checkpoint `name` at fake time t; then whether a write to
 * block a had to wait. */
static int
create_at(struct bm_cbt *cbt, const char *name, uint64_t t, uint64_t a)
{
	static struct mark m;
	int r;

	fake_now = t;
	ck_assert_int_eq(bm_cbt_create(cbt, name), 0);
	r = issue(cbt, &m, a, 10);
	wait_marks(loop);
	ck_assert_int_eq(m.err, 0);
	return r;
}

/*
 * The limits of carrying, on a fake clock: a checkpoint 9 s after the
 * newest carries, one 10 s after does not; carried blocks that go back
 * 60 s or more are dropped (a chain of checkpoints 9 s apart carries
 * until then, and starts empty at 63 s); a clock gone backwards carries
 * nothing.
 */
START_TEST(test_carry_limits)
{
	uint64_t (*wall)(void) = bm_cbt_clock;
	struct bm_cbt *cbt;
	uint64_t a = 7 * GRAN;
	char name[16];

	setup();
	bm_cbt_clock = fake_clock;
	cbt = open_ok(true);
	ck_assert_int_eq(create_at(cbt, "c0", 1000, a), 1);
	for (unsigned i = 1; i <= 6; i++) {
		snprintf(name, sizeof name, "c%u", i);
		ck_assert_msg(create_at(cbt, name, 1000 + 9 * i, a) == 0,
			      "c%u, %u s after the chain began, did not "
			      "carry", i, 9 * i);
	}
	ck_assert_int_eq(create_at(cbt, "c7", 1063, a), 1);
	ck_assert_int_eq(create_at(cbt, "c8", 1073, a), 1);
	ck_assert_int_eq(create_at(cbt, "c9", 1082, a), 0);
	ck_assert_int_eq(create_at(cbt, "c10", 500, a), 1);
	ck_assert_int_eq(bm_cbt_close(cbt), 0);
	bm_cbt_clock = wall;
	teardown();
}
END_TEST

/* ---- write-back errors ------------------------------------------------ */

START_TEST(test_writeback_error)
{
	static struct mark m[8];
	struct bm_cbt *cbt;
	struct bm_cbt_info info;
	struct bm_bitmap bm;
	uint64_t bytes;

	setup();
	memset(&rules, 0, sizeof rules);
	ck_assert_int_eq(bm_fault_register(path, &rules), 0);
	cbt = open_ok(true);
	ck_assert_int_eq(bm_cbt_create(cbt, "c1"), 0);
	ck_assert_int_eq(issue(cbt, &m[0], 0, 10), 1);
	wait_marks(loop);
	ck_assert_int_eq(m[0].err, 0);

	/* The next sync fails: its waiters and the ones queued behind it. */
	rules.flush_errno = EIO;
	rules.flush_err_count = 1;
	for (int i = 0; i < 8; i++)
		ck_assert_int_eq(issue(cbt, &m[i], (uint64_t)(i + 1) << 20,
				       10), 1);
	wait_marks(loop);
	for (int i = 0; i < 8; i++)
		ck_assert_int_eq(m[i].err, -EIO);
	ck_assert(!bm_cbt_trusted(cbt));
	/* Every later mark fails, even one durable before. */
	ck_assert_int_eq(bm_cbt_mark(cbt, 0, 10, NULL), -EIO);
	ck_assert_msg_has(path);
	ck_assert_int_eq(bm_cbt_mark(cbt, 50 << 20, 10, &m[0].w), -EIO);
	ck_assert_int_eq(bm_cbt_get(cbt, 0, &info), 0);
	ck_assert_ptr_nonnull(info.untrusted);
	ck_assert_int_eq(bm_cbt_changed_since(cbt, "c1", &bm, &bytes),
			 -ESTALE);
	ck_assert_msg_has("failed");
	ck_assert_int_eq(bm_cbt_flush(cbt), -EIO);

	/* A rewrite mends the tracker; c1 stays untrusted. */
	ck_assert_int_eq(bm_cbt_create(cbt, "c2"), 0);
	ck_assert(bm_cbt_trusted(cbt));
	ck_assert_int_eq(issue(cbt, &m[0], 7 << 20, 10), 1);
	wait_marks(loop);
	ck_assert_int_eq(m[0].err, 0);
	ck_assert_int_eq(bm_cbt_changed_since(cbt, "c2", &bm, &bytes), 0);
	ck_assert_uint_eq(bytes, GRAN);
	bm_bitmap_free(&bm);
	ck_assert_int_eq(bm_cbt_close(cbt), 0);

	cbt = open_ok(false);
	ck_assert(!bm_cbt_crashed(cbt));
	ck_assert(bm_cbt_trusted(cbt));
	ck_assert_int_eq(bm_cbt_get(cbt, 0, &info), 0);
	ck_assert_ptr_nonnull(info.untrusted);
	ck_assert_int_eq(bm_cbt_get(cbt, 1, &info), 0);
	ck_assert_ptr_null(info.untrusted);
	/* Removing c2 merges it into c1, which stays untrusted. */
	ck_assert_int_eq(bm_cbt_remove(cbt, "c2"), 0);
	ck_assert_int_eq(bm_cbt_get(cbt, 0, &info), 0);
	ck_assert_ptr_nonnull(info.untrusted);

	/* A failed write (not a flush) breaks it as well, and close says
	 * so but still writes the flags. */
	ck_assert_int_eq(bm_cbt_create(cbt, "c3"), 0);
	rules.write_errno = ENOSPC;
	rules.write_err_count = 1;
	ck_assert_int_eq(issue(cbt, &m[0], 9 << 20, 10), 1);
	ck_assert_int_eq(bm_cbt_close(cbt), -ENOSPC);
	cbt = open_ok(false);
	ck_assert_int_eq(bm_cbt_get(cbt, 1, &info), 0);
	ck_assert_str_eq(info.name, "c3");
	ck_assert_ptr_nonnull(info.untrusted);
	ck_assert_int_eq(bm_cbt_close(cbt), 0);
	ck_assert(m[0].done);
	ck_assert_int_eq(m[0].err, -ENOSPC);
	bm_fault_unregister(path);
	teardown();
}
END_TEST

/* ---- crashes ---------------------------------------------------------- */

#define CRASH_MARKS 160

static struct {
	struct mark m[CRASH_MARKS];
	size_t n;
	uint64_t opened, create_start, created, close_start;
} C;

/* What a crash before event k must leave. */
static void
check_crash(uint64_t k, int variant)
{
	struct bm_cbt *cbt;
	struct bm_bitmap since1, since2 = { 0 };
	uint64_t bytes;
	size_t n;
	int r = bm_cbt_open(loop, path, DISK, GRAN, false, &cbt);

	ck_assert_msg(r == 0, "crash before %" PRIu64 " (%s), variant %d: "
		      "%s", k, rec_describe(k), variant,
		      blockmirror_last_error());
	n = bm_cbt_count(cbt);
	ck_assert_msg(n == 1 || n == 2, "crash at %" PRIu64 ": %zu "
		      "checkpoints", k, n);
	if (k <= C.create_start)
		ck_assert_uint_eq(n, 1);
	if (k > C.created)
		ck_assert_uint_eq(n, 2);
	if (k > C.opened && k <= C.close_start)
		ck_assert_msg(bm_cbt_crashed(cbt), "crash at %" PRIu64
			      ": not reported", k);
	ck_assert(bm_cbt_trusted(cbt));
	ck_assert_int_eq(bm_cbt_changed_since(cbt, "c1", &since1, &bytes), 0);
	if (n == 2) {
		struct bm_cbt_info info;

		ck_assert_int_eq(bm_cbt_get(cbt, 1, &info), 0);
		ck_assert_str_eq(info.name, "c2");
		ck_assert_int_eq(bm_cbt_changed_since(cbt, "c2", &since2,
						      &bytes), 0);
	}
	for (size_t i = 0; i < C.n; i++) {
		const struct mark *m = &C.m[i];

		if (!m->done || m->ack >= k)
			continue;
		/* One assertion a mark: Check logs every one it passes. */
		for (uint64_t off = m->off; off < m->off + m->len;
		     off = bm_round_down(off, GRAN) + GRAN) {
			if (!bm_bitmap_test(&since1, off) ||
			    (m->ack > C.created &&
			     !bm_bitmap_test(&since2, off)))
				ck_abort_msg("crash before %" PRIu64 " (%s), "
					     "variant %d: mark %zu acked at %"
					     PRIu64 ", offset %" PRIu64
					     " clear", k, rec_describe(k),
					     variant, i, m->ack, off);
		}
	}
	bm_bitmap_free(&since1);
	bm_bitmap_free(&since2);
	ck_assert_int_eq(bm_cbt_close(cbt), 0);
}

START_TEST(test_crash)
{
	uint64_t rng = seed_from_env("BM_CBT_SEED", "test-cbt") ^ 0xc8a54, crng = 1, total, checked = 0;
	struct bm_cbt *cbt;
	struct mark pre;

	setup();
	memset(&C, 0, sizeof C);
	/* c2 carries c1's blocks however long the recording takes. */
	bm_cbt_carry_window = 3600;
	/* Before the recording: c1 with a mark, closed. */
	cbt = open_ok(true);
	ck_assert_int_eq(bm_cbt_create(cbt, "c1"), 0);
	ck_assert_int_eq(issue(cbt, &pre, 5 * GRAN, 10), 1);
	wait_marks(loop);
	ck_assert_int_eq(bm_cbt_close(cbt), 0);

	ck_assert_int_eq(rec_start(dir), 0);
	recording = true;
	cbt = open_ok(false);
	C.opened = rec_event("opened");
	while (C.n < CRASH_MARKS) {
		size_t batch = 1 + (size_t)rnd_range(&rng, 6);

		for (size_t i = 0; i < batch && C.n < CRASH_MARKS; i++) {
			uint64_t off, len;

			random_range(&rng, &off, &len);
			ck_assert_int_ge(issue(cbt, &C.m[C.n++], off, len),
					 0);
		}
		wait_marks(loop);
		if (C.n >= CRASH_MARKS / 2 && !C.create_start) {
			C.create_start = rec_event("create c2");
			ck_assert_int_eq(bm_cbt_create(cbt, "c2"), 0);
			C.created = rec_event("created c2");
		}
	}
	C.close_start = rec_event("close");
	ck_assert_int_eq(bm_cbt_close(cbt), 0);
	rec_event("closed");
	stop_recording(C.m, C.n);
	total = rec_now();
	checked = replay_crash_points(check_crash, &crng);
	printf("test-cbt: %" PRIu64 " crash points over %" PRIu64
	       " events\n", checked, total);
	bm_cbt_carry_window = 10;
	rec_free();
	teardown();
}
END_TEST

int
main(void)
{
	Suite *s = suite_create("cbt");
	TCase *tc = tcase_create("cbt");

	tcase_set_timeout(tc, 120);
	tcase_add_test(tc, test_format);
	tcase_add_test(tc, test_bits);
	tcase_add_test(tc, test_bad_input);
	tcase_add_test(tc, test_damaged_bitmap);
	tcase_add_test(tc, test_model);
	tcase_add_test(tc, test_fine);
	tcase_add_test(tc, test_group_commit);
	tcase_add_test(tc, test_carry);
	tcase_add_test(tc, test_carry_limits);
	tcase_add_test(tc, test_writeback_error);
	tcase_add_test(tc, test_crash);
	suite_add_tcase(s, tc);
	return run_suite(s) ? EXIT_FAILURE : EXIT_SUCCESS;
}
