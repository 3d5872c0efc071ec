/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The crash-resumable state (lib/state.c, lib/state-io.c).
 *
 * Format: a record and its slots round-trip; every single-byte corruption
 * of a record or of a slot's checked bytes is refused; a bad newest slot
 * falls back to the older one; truncation, stray bits and a slot of
 * another move are refused.
 *
 * Marking: once the job has cleared the persisted regions, a guest write
 * into a clean region must wait for its region to be durably dirty: when
 * the slot that marks it becomes durable the source has not seen the
 * write, and when the guest is told, the file on disk marks the region.
 */
#include <check.h>
#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <blockmirror/blockmirror.h>

#include "fault.h"
#include "helpers.h"
#include "mirror.h"
#include "state.h"

static struct bm_state_record
sample_record(void)
{
	struct bm_state_record r = {
		.disk_size = (UINT64_C(100) << 20) + 512,
		.granularity = 65536,
		.region_size = UINT64_C(4) << 20,
		.mode = 1,
		.src_format = 1,
		.dst_format = 2,
		.source = (char *)"/vm/src.qcow2",
		.destination = (char *)"nbd+unix:///x?socket=/run/d.sock",
	};

	return r;
}

/* A whole file: record, slot 0 with seq 1 (all dirty), slot 1 with
 * seq 2 (every third region dirty). */
static uint8_t *
sample_file(size_t *len, uint64_t *regions)
{
	struct bm_state_record r = sample_record();
	uint64_t n = bm_state_regions(r.disk_size, r.region_size), hash;
	size_t slot = bm_state_slot_size(n);
	uint64_t words[2] = { 0, 0 }, all[2] = { ~0ull, ~0ull };
	uint8_t *buf;

	*len = BM_STATE_RECORD_SIZE + 2 * slot;
	*regions = n;
	buf = calloc(1, *len);
	ck_assert_ptr_nonnull(buf);
	ck_assert_int_eq(bm_state_record_encode(&r, buf, &hash), 0);
	for (uint64_t i = 0; i < n; i += 3)
		words[i / 64] |= 1ull << (i % 64);
	bm_state_slot_encode(buf + BM_STATE_RECORD_SIZE, 1,
			     BM_STATE_PHASE_COPYING, hash, r.region_size, n,
			     all);
	bm_state_slot_encode(buf + BM_STATE_RECORD_SIZE + slot, 2,
			     BM_STATE_PHASE_COPYING, hash, r.region_size, n,
			     words);
	return buf;
}

START_TEST(test_round_trip)
{
	struct bm_state st;
	uint64_t n;
	size_t len;
	uint8_t *buf = sample_file(&len, &n);

	ck_assert_uint_eq(n, 26);
	ck_assert_int_eq(bm_state_parse(buf, len, &st), 0);
	ck_assert_uint_eq(st.rec.disk_size, (UINT64_C(100) << 20) + 512);
	ck_assert_uint_eq(st.rec.granularity, 65536);
	ck_assert_uint_eq(st.rec.region_size, UINT64_C(4) << 20);
	ck_assert_uint_eq(st.rec.mode, 1);
	ck_assert_uint_eq(st.rec.src_format, 1);
	ck_assert_uint_eq(st.rec.dst_format, 2);
	ck_assert_str_eq(st.rec.source, "/vm/src.qcow2");
	ck_assert_str_eq(st.rec.destination,
			 "nbd+unix:///x?socket=/run/d.sock");
	ck_assert_uint_eq(st.regions, 26);
	ck_assert_uint_eq(st.seq, 2);
	ck_assert_uint_eq(st.phase, BM_STATE_PHASE_COPYING);
	ck_assert_uint_eq(st.regions_dirty, 9); /* 0, 3, ..., 24 */
	for (uint64_t i = 0; i < n; i++)
		ck_assert_int_eq((int)(st.words[0] >> i & 1), i % 3 == 0);
	bm_state_free(&st);
	free(buf);
}
END_TEST

/* Every byte of the record is covered: flipping any one is refused. */
START_TEST(test_record_corruption)
{
	struct bm_state_record r;
	uint64_t n, hash;
	size_t len;
	uint8_t *buf = sample_file(&len, &n);

	for (size_t i = 0; i < BM_STATE_RECORD_SIZE; i++) {
		buf[i] ^= 0x40;
		ck_assert_int_eq(bm_state_record_decode(buf, len, &r, &hash),
				 -EBADMSG);
		ck_assert_ptr_null(r.source);
		buf[i] ^= 0x40;
	}
	ck_assert_int_eq(bm_state_record_decode(buf, BM_STATE_RECORD_SIZE - 1,
						&r, &hash), -EBADMSG);
	ck_assert_int_eq(bm_state_record_decode(buf, len, &r, &hash), 0);
	bm_state_record_free(&r);
	free(buf);
}
END_TEST

/* A slot's header and bitmap are covered: a flip in the newest slot
 * falls back to the older one, a flip in both leaves nothing to trust. */
START_TEST(test_slot_corruption)
{
	struct bm_state st;
	uint64_t n;
	size_t len;
	uint8_t *buf = sample_file(&len, &n);
	size_t slot = bm_state_slot_size(n);
	size_t checked = BM_STATE_SLOT_HEADER + (n + 7) / 8;
	uint8_t *s0 = buf + BM_STATE_RECORD_SIZE, *s1 = s0 + slot;

	for (size_t i = 0; i < checked; i++) {
		s1[i] ^= 0x01;
		ck_assert_int_eq(bm_state_parse(buf, len, &st), 0);
		ck_assert_uint_eq(st.seq, 1); /* the older slot, all dirty */
		ck_assert_uint_eq(st.regions_dirty, n);
		bm_state_free(&st);
		s0[i] ^= 0x80;
		ck_assert_int_eq(bm_state_parse(buf, len, &st), -EUCLEAN);
		ck_assert_ptr_nonnull(st.rec.source); /* the record is fine */
		ck_assert_ptr_null(st.words);
		bm_state_free(&st);
		s0[i] ^= 0x80;
		s1[i] ^= 0x01;
	}
	/* Truncated in the newest slot's checked bytes: the older one.
	 * (The padding after the bitmap is not read.) */
	ck_assert_int_eq(bm_state_parse(buf, len - slot + checked - 1, &st),
			 0);
	ck_assert_uint_eq(st.seq, 1);
	bm_state_free(&st);
	/* No slot at all. */
	ck_assert_int_eq(bm_state_parse(buf, BM_STATE_RECORD_SIZE, &st),
			 -EUCLEAN);
	bm_state_free(&st);
	ck_assert_int_eq(bm_state_parse(buf, 100, &st), -EBADMSG);
	bm_state_free(&st);
	free(buf);
}
END_TEST

/* Well-checksummed slots that still do not fit are refused. */
START_TEST(test_slot_semantics)
{
	struct bm_state_record r = sample_record();
	uint64_t n = bm_state_regions(r.disk_size, r.region_size), hash;
	uint64_t all[2] = { ~0ull, ~0ull }, words[2], seq;
	size_t slot = bm_state_slot_size(n);
	uint8_t *buf = calloc(1, slot), rec[BM_STATE_RECORD_SIZE];
	uint32_t phase;

	ck_assert_int_eq(bm_state_record_encode(&r, rec, &hash), 0);
	bm_state_slot_encode(buf, 7, BM_STATE_PHASE_COPYING, hash,
			     r.region_size, n, all);
	/* Bits past the last region are masked on encode. */
	ck_assert_int_eq(bm_state_slot_decode(buf, slot, hash, r.region_size,
					      n, &seq, &phase, words), 0);
	ck_assert_uint_eq(seq, 7);
	ck_assert_uint_eq(words[0], (1ull << n) - 1);
	/* Another move's slot, other geometry. */
	ck_assert_int_eq(bm_state_slot_decode(buf, slot, hash + 1,
					      r.region_size, n, &seq, &phase,
					      words), -EBADMSG);
	ck_assert_int_eq(bm_state_slot_decode(buf, slot, hash,
					      r.region_size * 2, n, &seq,
					      &phase, words), -EBADMSG);
	ck_assert_int_eq(bm_state_slot_decode(buf, slot, hash, r.region_size,
					      n - 1, &seq, &phase, words),
			 -EBADMSG);
	/* Unknown phase. */
	bm_state_slot_encode(buf, 7, 9, hash, r.region_size, n, all);
	ck_assert_int_eq(bm_state_slot_decode(buf, slot, hash, r.region_size,
					      n, &seq, &phase, words),
			 -EBADMSG);
	/* Records that would not read back are not written. */
	r.granularity = 3000;
	ck_assert_int_eq(bm_state_record_encode(&r, rec, &hash), -EINVAL);
	r = sample_record();
	r.region_size = 1 << 20;
	ck_assert_int_eq(bm_state_record_encode(&r, rec, &hash), -EINVAL);
	r = sample_record();
	r.source = (char *)"";
	ck_assert_int_eq(bm_state_record_encode(&r, rec, &hash), -EINVAL);
	free(buf);
}
END_TEST

/* ---- marking, on a real job ------------------------------------------ */

#define DISK (UINT64_C(16) << 20)
#define REGION (UINT64_C(4) << 20)

static char dir[64], src[96], dst[96], sdir[96];
static struct bm_fault_rules rules;
/* The destination's: its flushes are held to hold off the state's
 * clears, which begin with one. */
static struct bm_fault_rules drules;
static _Atomic uint64_t writes_at_durable;
static _Atomic int durable_calls;
static _Atomic bool hook_armed;

/* Set before the loop thread starts; armed by the test thread later. */
static void
hook(struct bm_job *job, uint64_t seq)
{
	(void)job;
	(void)seq;
	if (!atomic_load(&hook_armed))
		return;
	atomic_store(&writes_at_durable, atomic_load(&rules.writes));
	atomic_fetch_add(&durable_calls, 1);
}

static uint64_t
dirty_regions_on_disk(uint64_t *words)
{
	struct bm_state st;
	uint64_t n;

	ck_assert_int_eq(bm_state_load(sdir, &st), 0);
	n = st.regions_dirty;
	*words = st.words[0];
	bm_state_free(&st);
	return n;
}

static void
make_file(const char *path, uint64_t size)
{
	FILE *f = fopen(path, "w");

	ck_assert_ptr_nonnull(f);
	ck_assert_int_eq(ftruncate(fileno(f), (off_t)size), 0);
	fclose(f);
}

START_TEST(test_write_waits_for_mark)
{
	struct blockmirror_job_options o = { .size = sizeof o };
	struct blockmirror_disk *disk;
	struct blockmirror_job *job;
	static unsigned char buf[8192];
	uint64_t words = 0, before;
	int i;

	snprintf(dir, sizeof dir, "/tmp/test-state.XXXXXX");
	ck_assert_ptr_nonnull(mkdtemp(dir));
	snprintf(src, sizeof src, "%s/src.raw", dir);
	snprintf(dst, sizeof dst, "%s/dst.raw", dir);
	snprintf(sdir, sizeof sdir, "%s/state", dir);
	make_file(src, DISK);
	make_file(dst, DISK);
	memset(&rules, 0, sizeof rules);
	memset(&drules, 0, sizeof drules);
	ck_assert_int_eq(bm_fault_register(src, &rules), 0);
	ck_assert_int_eq(bm_fault_register(dst, &drules), 0);
	bm_state_hook = hook;
	disk = blockmirror_disk_open(src, BLOCKMIRROR_FORMAT_RAW, 0);
	ck_assert_ptr_nonnull(disk);
	ck_assert_int_eq(blockmirror_disk_start_thread(disk), 0);
	memset(buf, 0xa5, sizeof buf);
	for (uint64_t off = 0; off < DISK; off += REGION)
		ck_assert_int_eq(blockmirror_disk_write(disk, buf, sizeof buf,
							off, 0), 0);

	o.mode = BLOCKMIRROR_MODE_ACTIVE;
	o.format = BLOCKMIRROR_FORMAT_RAW;
	o.state_dir = sdir;
	/* No clear (it begins with a destination flush) before the check
	 * below, however long this thread waits to make it. */
	atomic_store(&drules.hang_flush, true);
	job = blockmirror_job_start(disk, dst, &o);
	ck_assert_ptr_nonnull(job);
	/* At first every region is dirty on disk. */
	ck_assert_uint_eq(dirty_regions_on_disk(&words), DISK / REGION);
	atomic_store(&drules.hang_flush, false);
	ck_assert_int_eq(blockmirror_job_wait(job, BLOCKMIRROR_JOB_READY,
					      20000), BLOCKMIRROR_JOB_READY);
	/* The once-a-second clear empties it once both images hold it. */
	for (i = 0; i < 400 && dirty_regions_on_disk(&words); i++)
		usleep(50000);
	ck_assert_uint_eq(dirty_regions_on_disk(&words), 0);

	/*
	 * From here on no clear gets past its destination flush, so none
	 * writes a slot while the rounds below run: every slot that
	 * becomes durable is a round's mark, however slow the syncs are.
	 * (The state on disk is all clean, so no clear is under way: the
	 * last one wrote that.)
	 */
	atomic_store(&drules.hang_flush, true);
	atomic_store(&hook_armed, true);
	for (int round = 0; round < 3; round++) {
		uint64_t off = (uint64_t)round * REGION + 4096 * 3;

		before = atomic_load(&rules.writes);
		atomic_store(&durable_calls, 0);
		ck_assert_int_eq(blockmirror_disk_write(disk, buf, sizeof buf,
							off, 0), 0);
		/* The slot that marks it was durable before the source saw
		 * the write; the guest was told after. */
		ck_assert_int_ge(atomic_load(&durable_calls), 1);
		ck_assert_uint_eq(atomic_load(&writes_at_durable), before);
		ck_assert_uint_eq(atomic_load(&rules.writes), before + 1);
		dirty_regions_on_disk(&words);
		ck_assert(words >> round & 1);
		/* A second write to a region dirty on disk needs no mark. */
		atomic_store(&durable_calls, 0);
		ck_assert_int_eq(blockmirror_disk_write(disk, buf, 512,
							off + 65536, 0), 0);
		ck_assert_int_eq(atomic_load(&durable_calls), 0);
	}
	atomic_store(&hook_armed, false);
	/* What the rounds marked is still dirty on disk: no clear took
	 * it meanwhile. */
	dirty_regions_on_disk(&words);
	ck_assert_uint_eq(words & 7, 7);
	atomic_store(&drules.hang_flush, false);

	/* A pivot-less ending removes the state. */
	ck_assert_int_eq(blockmirror_job_cancel(job, true), 0);
	blockmirror_job_free(job);
	ck_assert_int_eq(access(sdir, F_OK), -1);
	ck_assert_int_eq(blockmirror_disk_close(disk), 0);
	bm_state_hook = NULL;
	bm_fault_unregister(src);
	bm_fault_unregister(dst);
	unlink(src);
	unlink(dst);
	rmdir(dir);
}
END_TEST

static Suite *
state_suite(void)
{
	Suite *s = suite_create("state");
	TCase *f = tcase_create("format");
	TCase *m = tcase_create("marking");

	tcase_add_test(f, test_round_trip);
	tcase_add_test(f, test_record_corruption);
	tcase_add_test(f, test_slot_corruption);
	tcase_add_test(f, test_slot_semantics);
	suite_add_tcase(s, f);
	tcase_set_timeout(m, 60);
	tcase_add_test(m, test_write_waits_for_mark);
	suite_add_tcase(s, m);
	return s;
}

int
main(void)
{
	return run_suite(state_suite()) ? EXIT_FAILURE : EXIT_SUCCESS;
}
