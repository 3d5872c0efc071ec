/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The qcow2 driver: the pure parsers of qcow2-parse.c (header round
 * trip with kept extensions, each refusal, L2 entry decoding, refcount
 * widths, compression) and the driver through the engine (create,
 * partial writes, zeroes, discard, block status, reopen), a freed
 * cluster that must not be reused under a write still in flight, writes
 * that go on while a flush waits for a sync, and flushes under a load of
 * writes, discards and evictions.
 */
#include <check.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "errors.h"
#include "extent.h"
#include "fault.h"
#include "format.h"
#include "helpers.h"
#include "image.h"
#include "internal.h"
#include "loop.h"
#include "qcow2.h"

/* Reference the driver so that the static library's object is linked. */
static const struct bm_fmt_driver *const force_qcow2 __attribute__((used)) =
	&bm_qcow2_driver;

#define CS 65536

static uint8_t *
sample_header(struct bm_qcow2_header *h)
{
	uint8_t *buf = calloc(1, CS);

	memset(h, 0, sizeof *h);
	h->version = 3;
	h->cluster_bits = 16;
	h->size = 64 * BM_MiB;
	h->l1_size = 1;
	h->l1_table_offset = 3 * CS;
	h->refcount_table_offset = CS;
	h->refcount_table_clusters = 1;
	h->refcount_order = 4;
	h->header_length = 112;
	ck_assert_ptr_nonnull(buf);
	return buf;
}

START_TEST(test_header_roundtrip)
{
	struct bm_qcow2_header h, p;
	uint8_t unknown[16] = { 0x12, 0x34, 0x56, 0x78, 0, 0, 0, 5, 'h', 'e',
				'l', 'l', 'o' };
	uint8_t extra[7] = { 1, 2, 3, 4, 5, 6, 7 };
	uint8_t *buf = sample_header(&h);

	h.backing_name = (char *)"base.qcow2";
	strcpy(h.backing_format, "qcow2");
	h.kept_exts = unknown;
	h.kept_exts_len = sizeof unknown;
	h.header_length = 112;
	h.extra_fields = extra;
	h.extra_fields_len = sizeof extra;
	h.compatible = 1;
	ck_assert_int_eq(bm_qcow2_header_serialize(&h, buf, CS, true), 0);
	ck_assert_int_eq(bm_qcow2_header_parse("t", buf, CS, &p), 0);
	ck_assert_uint_eq(p.version, 3);
	ck_assert_uint_eq(p.size, 64 * BM_MiB);
	ck_assert_str_eq(p.backing_name, "base.qcow2");
	ck_assert_str_eq(p.backing_format, "qcow2");
	ck_assert_uint_eq(p.kept_exts_len, sizeof unknown);
	ck_assert_mem_eq(p.kept_exts, unknown, sizeof unknown);
	ck_assert_uint_eq(p.extra_fields_len, sizeof extra);
	ck_assert_mem_eq(p.extra_fields, extra, sizeof extra);
	ck_assert(p.has_feature_names);
	ck_assert_str_eq(p.feature_names[0][0], "dirty bit");
	ck_assert_uint_eq(p.compatible, 1);
	bm_qcow2_header_free(&p);
	free(buf);
}
END_TEST

/* Serialize the sample, patch one field, expect err and a message. */
static void
expect_bad(size_t off, int width, uint64_t value, int err, const char *msg)
{
	struct bm_qcow2_header h, p;
	uint8_t *buf = sample_header(&h);

	ck_assert_int_eq(bm_qcow2_header_serialize(&h, buf, CS, true), 0);
	if (width == 4)
		bm_put_be32(buf + off, (uint32_t)value);
	else
		bm_put_be64(buf + off, value);
	ck_assert_int_eq(bm_qcow2_header_parse("img", buf, CS, &p), err);
	ck_assert_msg(strstr(blockmirror_last_error(), msg),
		      "message '%s' lacks '%s'", blockmirror_last_error(), msg);
	free(buf);
}

START_TEST(test_header_bad)
{
	expect_bad(0, 4, 0x12345678, -EINVAL, "bad magic");
	expect_bad(4, 4, 4, -ENOTSUP, "version 4");
	expect_bad(20, 4, 8, -EINVAL, "cluster size 2^8");
	expect_bad(20, 4, 22, -EINVAL, "cluster size 2^22");
	expect_bad(100, 4, 100, -EINVAL, "header too short");
	expect_bad(100, 4, 0x20000, -EINVAL, "exceeds cluster size");
	expect_bad(8, 8, 0x20000, -EINVAL, "backing file offset");
	expect_bad(32, 4, 2, -ENOTSUP, "encrypted");
	expect_bad(72, 8, 4, -ENOTSUP, "external data file");
	expect_bad(72, 8, 16, -ENOTSUP, "extended L2");
	expect_bad(72, 8, 8, -EINVAL, "compression type");
	expect_bad(72, 8, 1u << 6, -ENOTSUP, "incompatible bit 6");
	expect_bad(96, 4, 7, -EINVAL, "refcount_order 7");
	expect_bad(56, 4, 0, -EINVAL, "no refcount table");
	expect_bad(36, 4, 0, -EINVAL, "L1 table is too small");
	expect_bad(40, 8, 3 * CS + 512, -EINVAL, "L1 table offset");
	expect_bad(48, 8, CS + 8, -EINVAL, "refcount table offset");
	expect_bad(60, 4, 0x7fffffff, -EINVAL, "snapshot table too large");
	/* The feature table's length field. */
	expect_bad(116, 4, 0x100000, -EINVAL, "too large");
}
END_TEST

START_TEST(test_header_short)
{
	struct bm_qcow2_header h, p;
	uint8_t *buf = sample_header(&h);

	ck_assert_int_eq(bm_qcow2_header_serialize(&h, buf, CS, false), 0);
	for (size_t len = 0; len < 128; len++)
		if (bm_qcow2_header_parse("t", buf, len, &p) == 0)
			bm_qcow2_header_free(&p);
	ck_assert_int_ne(bm_qcow2_header_parse("t", buf, 50, &p), 0);
	free(buf);
}
END_TEST

START_TEST(test_l2_decode)
{
	struct bm_qcow2_l2 e;
	uint64_t first, count;

	ck_assert_int_eq(bm_qcow2_l2_decode("t", 0, 16, 3, &e, 0, 0), 0);
	ck_assert_int_eq(e.kind, BM_QCOW2_UNALLOCATED);
	ck_assert_int_eq(bm_qcow2_l2_decode("t", 1, 16, 3, &e, 0, 0), 0);
	ck_assert_int_eq(e.kind, BM_QCOW2_ZERO_PLAIN);
	ck_assert_int_eq(bm_qcow2_l2_decode("t", 0x50001, 16, 3, &e, 0, 0), 0);
	ck_assert_int_eq(e.kind, BM_QCOW2_ZERO_ALLOC);
	ck_assert_int_eq(bm_qcow2_l2_decode("t", 0x50000 | BM_QCOW2_FLAG_COPIED,
					    16, 3, &e, 0, 0), 0);
	ck_assert_int_eq(e.kind, BM_QCOW2_NORMAL);
	ck_assert(e.copied);
	ck_assert_uint_eq(e.host, 0x50000);
	ck_assert_int_eq(bm_qcow2_l2_decode("t", 0x50200, 16, 3, &e, 0x40000,
					    7), -EIO);
	ck_assert_ptr_nonnull(strstr(blockmirror_last_error(), "unaligned"));
	ck_assert_int_eq(bm_qcow2_l2_decode("t", 1, 16, 2, &e, 0, 0), -EIO);
	/* Compressed, 64 KiB clusters: 8 bits of sector count at bit 54. */
	ck_assert_int_eq(bm_qcow2_l2_decode("t", BM_QCOW2_FLAG_COMPRESSED |
					    (UINT64_C(3) << 54) | 0x1ff00,
					    16, 3, &e, 0, 0), 0);
	ck_assert_int_eq(e.kind, BM_QCOW2_COMPRESSED);
	ck_assert_uint_eq(e.host, 0x1ff00);
	ck_assert_uint_eq(e.csize, 4 * 512 - 0x100);
	bm_qcow2_compressed_span(&e, 16, &first, &count);
	ck_assert_uint_eq(first, 1);
	ck_assert_uint_eq(count, 2);
}
END_TEST

START_TEST(test_refcounts)
{
	uint8_t block[512];

	for (uint32_t order = 0; order <= 6; order++) {
		uint64_t max = order == 6 ? UINT64_MAX :
					    (UINT64_C(1) << (1u << order)) - 1;
		uint64_t n = sizeof block * 8 >> order;

		memset(block, 0, sizeof block);
		for (uint64_t i = 0; i < n; i++)
			bm_qcow2_refcount_set(block, order, i, (i * 7) & max);
		for (uint64_t i = 0; i < n; i++)
			ck_assert_uint_eq(bm_qcow2_refcount_get(block, order, i),
					  (i * 7) & max);
	}
}
END_TEST

START_TEST(test_compression)
{
	uint8_t in[CS], out[CS], comp[2 * CS];

	for (size_t i = 0; i < sizeof in; i++)
		in[i] = (uint8_t)(i % 251 ^ i / 4096);
	for (int t = BM_QCOW2_ZLIB; t <= BM_QCOW2_ZSTD; t++) {
		long n = bm_qcow2_compress(t, in, CS, comp, sizeof comp);

		ck_assert_int_gt(n, 0);
		/* Sector padding after the stream is allowed. */
		memset(comp + n, 0xee, 512);
		ck_assert_int_eq(bm_qcow2_decompress(t, comp, (size_t)n + 512,
						     out, CS), 0);
		ck_assert_mem_eq(in, out, CS);
		ck_assert_int_eq(bm_qcow2_decompress(t, in, 1024, out, CS),
				 -EIO);
		ck_assert_int_eq(bm_qcow2_decompress(t, comp, (size_t)n / 2,
						     out, CS), -EIO);
	}
}
END_TEST

/* ---- through the engine ---------------------------------------------- */

static char path[64];
static struct bm_loop *loop;

static void
setup(void)
{
	int fd;

	strcpy(path, "/tmp/test-qcow2.XXXXXX");
	fd = mkstemp(path);
	ck_assert_int_ge(fd, 0);
	close(fd);
	ck_assert_int_eq(bm_loop_new(32, &loop), 0);
}

static void
teardown(void)
{
	unlink(path);
	bm_loop_free(loop);
}

static int
io(struct bm_image *img, void (*op)(struct bm_image *, struct bm_io *),
   uint64_t off, uint64_t len, void *buf, unsigned flags)
{
	struct bm_io b = { .offset = off, .length = len, .buf = buf,
			   .flags = flags };

	return bm_image_sync(img, op, &b);
}

START_TEST(test_driver)
{
	struct bm_extent_list ext = { 0 };
	struct bm_image *img;
	uint8_t *buf = malloc(3 * 4096), *rd = malloc(3 * 4096);

	ck_assert_int_eq(bm_image_create(loop, path, BLOCKMIRROR_FORMAT_QCOW2,
					 8 * BM_MiB, "cluster_size=4K", true,
					 0, &img), 0);
	ck_assert_uint_eq(img->cluster_size, 4096);
	memset(buf, 0xab, 3 * 4096);
	/* Unaligned, across three clusters. */
	ck_assert_int_eq(io(img, bm_image_write, 1000, 9000, buf, 0), 0);
	ck_assert_int_eq(io(img, bm_image_zero, 2 * 4096, 4096, NULL,
			    BM_IO_MAY_TRIM), 0);
	ck_assert_int_eq(io(img, bm_image_flush, 0, 0, NULL, 0), 0);
	bm_image_close(img);

	ck_assert_int_eq(bm_image_open(loop, path, BLOCKMIRROR_FORMAT_QCOW2, 0,
				       &img), 0);
	ck_assert_int_eq(io(img, bm_image_read, 0, 3 * 4096, rd, 0), 0);
	for (size_t i = 0; i < 3 * 4096; i++)
		ck_assert_uint_eq(rd[i], i >= 1000 && i < 2 * 4096 ? 0xab : 0);
	{
		struct bm_io b = { .offset = 0, .length = 8 * BM_MiB,
				   .extents = &ext };

		ck_assert_int_eq(bm_image_sync(img, bm_image_block_status,
					       &b), 0);
	}
	ck_assert_uint_ge(ext.len, 2);
	ck_assert_uint_eq(ext.v[0].offset, 0);
	ck_assert_uint_eq(ext.v[0].length, 2 * 4096);
	ck_assert_uint_eq(ext.v[0].flags, 0);
	ck_assert(ext.v[1].flags & BM_EXTENT_ZERO);
	/* Read-only: writes are refused. */
	ck_assert_int_lt(io(img, bm_image_write, 0, 512, buf, 0), 0);
	bm_extent_list_free(&ext);
	bm_image_close(img);
	free(buf);
	free(rd);
}
END_TEST

/* FUA on write-zeroes reaches the file as a flush, as it does for a
 * write (the format engine turns either into a flush of the driver). */
START_TEST(test_zero_fua)
{
	static struct bm_fault_rules rules;
	struct bm_image *img;
	uint8_t buf[4096];
	uint64_t n;

	memset(&rules, 0, sizeof rules);
	ck_assert_int_eq(bm_fault_register(path, &rules), 0);
	ck_assert_int_eq(bm_image_create(loop, path, BLOCKMIRROR_FORMAT_QCOW2,
					 8 * BM_MiB, "cluster_size=4K", true,
					 0, &img), 0);
	memset(buf, 0xcd, sizeof buf);
	ck_assert_int_eq(io(img, bm_image_write, 0, sizeof buf, buf, 0), 0);
	n = rules.flushes;
	ck_assert_int_eq(io(img, bm_image_zero, 0, 4096, NULL, 0), 0);
	ck_assert_uint_eq(rules.flushes, n);
	ck_assert_int_eq(io(img, bm_image_zero, 0, 4096, NULL, BM_IO_FUA), 0);
	ck_assert_uint_gt(rules.flushes, n);
	bm_image_close(img);
	bm_fault_unregister(path);
}
END_TEST

/* ---- a flush does not hold up the writes behind it ------------------- */

static void
async_done(struct bm_io *io, int err)
{
	*(int *)io->opaque = err < 0 ? err : 1;
}

/* Turn the loop until *flag is set or about ms have passed. */
static void
turn_until(const int *flag, unsigned ms)
{
	for (unsigned i = 0; !*flag && i < ms / 10; i++)
		bm_loop_run_once(loop, 10);
}

/*
 * Hold the image's flushes but the first `pass` (hang_flush), start a
 * flush, then a write that needs a new cluster at 4 MiB, which must
 * complete while the flush is held; then let the flush finish.  The
 * image is consistent and holds both writes afterwards.
 */
static void
write_past_held_flush(int pass, const char *what)
{
	static struct bm_fault_rules rules;
	static uint8_t buf[4096], rd[4096];
	struct bm_io flush = { .done = async_done };
	struct bm_io write = { .offset = 4 * BM_MiB, .length = sizeof buf,
			       .buf = buf, .done = async_done };
	struct bm_image *img;
	int flushed = 0, written = 0;
	char cmd[256];

	memset(&rules, 0, sizeof rules);
	ck_assert_int_eq(bm_fault_register(path, &rules), 0);
	ck_assert_int_eq(bm_image_create(loop, path, BLOCKMIRROR_FORMAT_QCOW2,
					 8 * BM_MiB, "", true, 0, &img), 0);
	memset(buf, 0x66, sizeof buf);
	ck_assert_int_eq(io(img, bm_image_write, 0, sizeof buf, buf, 0), 0);
	atomic_store(&rules.pass_flushes, pass);
	atomic_store(&rules.hang_flush, true);
	flush.opaque = &flushed;
	bm_image_flush(img, &flush);
	turn_until(&flushed, 300);
	ck_assert_int_eq(flushed, 0);
	ck_assert_int_eq(atomic_load(&rules.pass_flushes), 0);
	memset(buf, 0x99, sizeof buf);
	write.opaque = &written;
	bm_image_write(img, &write);
	turn_until(&written, 3000);
	atomic_store(&rules.hang_flush, false);
	ck_assert_msg(written == 1, "a write waited for %s (%d)", what,
		      written);
	turn_until(&flushed, 5000);
	ck_assert_int_eq(flushed, 1);
	ck_assert_int_eq(io(img, bm_image_flush, 0, 0, NULL, 0), 0);
	bm_image_close(img);
	bm_fault_unregister(path);

	ck_assert_int_eq(bm_image_open(loop, path, BLOCKMIRROR_FORMAT_QCOW2,
				       0, &img), 0);
	ck_assert_int_eq(io(img, bm_image_read, 0, sizeof rd, rd, 0), 0);
	for (size_t i = 0; i < sizeof rd; i++)
		ck_assert_uint_eq(rd[i], 0x66);
	ck_assert_int_eq(io(img, bm_image_read, 4 * BM_MiB, sizeof rd, rd, 0),
			 0);
	for (size_t i = 0; i < sizeof rd; i++)
		ck_assert_uint_eq(rd[i], 0x99);
	bm_image_close(img);
	if (system("qemu-img --version >/dev/null 2>&1") == 0) {
		snprintf(cmd, sizeof cmd, "qemu-img check -q '%s'", path);
		ck_assert_msg(system(cmd) == 0, "%s", cmd);
	}
}

/*
 * While a flush waits for the file's data sync (hung here), a write that
 * needs a new cluster completes: the engine syncs the data before handing
 * the flush to the driver.  (It used to be the driver's own first step: a
 * flush after a large copy held every allocating write for the whole
 * writeback, over half a second at the end of a qcow2 move.)
 */
START_TEST(test_flush_lets_writes_by)
{
	write_past_held_flush(0, "a flush's data sync");
}
END_TEST

/*
 * While the driver's flush waits for a metadata sync (by _i the
 * refcount, L2 or L1 step; the first two flushes, the engine's data sync
 * and the driver's own, go through), a write that needs a new cluster
 * completes: the driver flushes on its own thread and holds its lock
 * only to copy what it writes, never across a sync.  (It used to hold it
 * through the whole flush: about 100 ms of stalled guest writes at the
 * end of a qcow2 move.)
 */
START_TEST(test_metadata_sync_lets_writes_by)
{
	const char *step[] = { "the refcount sync", "the L2 sync",
			       "the L1 sync" };

	write_past_held_flush(2 + _i, step[_i]);
}
END_TEST

/*
 * Writes and discards all over an image with small clusters, 16 at a
 * time, while flushes run back to back: maps allocate, evict L2 tables
 * (256 of them cover 512 MiB here) and free clusters during flushes.
 * Afterwards the image reads as the model says and qemu-img check finds
 * no error.
 */
struct load_slot {
	struct bm_io io;
	int done;
	uint64_t cluster;
	uint8_t fill;
	uint8_t buf[4096];
};

START_TEST(test_flush_under_load)
{
	enum { SLOTS = 16, OPS = 6000, CL = 4096, MIN_FLUSHES = 12 };
	const uint64_t size = BM_GiB, clusters = size / CL;
	static struct load_slot slot[SLOTS];
	static uint8_t rd[CL];
	struct bm_io flush = { .done = async_done };
	uint8_t *model = calloc(clusters, 1);
	uint64_t rng = 0x9e3779b97f4a7c15u;
	unsigned issued = 0, flushes = 0;
	int flushed = 1;
	struct bm_image *img;
	char cmd[256];

	ck_assert_ptr_nonnull(model);
	ck_assert_int_eq(bm_image_create(loop, path, BLOCKMIRROR_FORMAT_QCOW2,
					 size, "cluster_size=4K", true, 0,
					 &img), 0);
	for (unsigned k = 0; k < SLOTS; k++)
		slot[k].done = 1;
	/* Load until both enough requests and enough flushes went in: on
	 * a slow machine the flushes take longer, so the load goes on. */
	while (issued < OPS || flushes < MIN_FLUSHES || !flushed) {
		bool busy = false;

		for (unsigned k = 0; k < SLOTS; k++) {
			struct load_slot *l = &slot[k];

			if (!l->done) {
				busy = true;
				continue;
			}
			if (l->done == 1 && l->io.done) {
				model[l->cluster] = l->fill;
				l->io.done = NULL;
			}
			ck_assert_int_eq(l->done, 1);
			if (issued >= OPS && flushes >= MIN_FLUSHES)
				continue;
			rng = rng * 6364136223846793005u + 1442695040888963407u;
			/* Slot k owns the clusters == k mod SLOTS: no two
			 * requests in flight overlap. */
			l->cluster = (rng >> 20) % (clusters / SLOTS) * SLOTS + k;
			l->fill = (rng >> 8) % 8 ? (uint8_t)(issued | 1) : 0;
			memset(&l->io, 0, sizeof l->io);
			l->io.offset = l->cluster * CL;
			l->io.length = CL;
			l->io.done = async_done;
			l->io.opaque = &l->done;
			l->done = 0;
			busy = true;
			issued++;
			if (l->fill) {
				memset(l->buf, l->fill, CL);
				l->io.buf = l->buf;
				bm_image_write(img, &l->io);
			} else {
				bm_image_discard(img, &l->io);
			}
		}
		if (flushed) {
			ck_assert_int_eq(flushed, 1);
			if (issued < OPS || flushes < MIN_FLUSHES) {
				flushed = 0;
				flush.opaque = &flushed;
				bm_image_flush(img, &flush);
				flushes++;
			}
		}
		if (busy || !flushed)
			bm_loop_run_once(loop, 10);
	}
	for (unsigned k = 0; k < SLOTS; k++) {
		turn_until(&slot[k].done, 5000);
		ck_assert_int_eq(slot[k].done, 1);
		if (slot[k].io.done)
			model[slot[k].cluster] = slot[k].fill;
	}
	ck_assert_int_eq(io(img, bm_image_flush, 0, 0, NULL, 0), 0);
	bm_image_close(img);

	ck_assert_int_eq(bm_image_open(loop, path, BLOCKMIRROR_FORMAT_QCOW2,
				       0, &img), 0);
	for (uint64_t c = 0; c < clusters; c++) {
		if (!model[c])
			continue;
		ck_assert_int_eq(io(img, bm_image_read, c * CL, CL, rd, 0), 0);
		ck_assert_msg(rd[0] == model[c] && rd[CL - 1] == model[c],
			      "cluster %llu reads %u, not %u",
			      (unsigned long long)c, rd[0], model[c]);
	}
	bm_image_close(img);
	if (system("qemu-img --version >/dev/null 2>&1") == 0) {
		snprintf(cmd, sizeof cmd, "qemu-img check -q '%s'", path);
		ck_assert_msg(system(cmd) == 0, "%s", cmd);
	}
	free(model);
}
END_TEST

/* ---- growing the file, and writing back new tables ------------------- */

/* The file grows in steps while the image is open and ends where the
 * metadata says once flushed; new L2 tables evicted from the cache share
 * data syncs instead of costing one each (a copy into a sparse image
 * fills a table per 512 MiB). */
START_TEST(test_grow_and_evict)
{
	static struct bm_fault_rules rules;
	const uint64_t cs = 64 * BM_KiB, per_table = cs / 8 * cs;
	const unsigned tables = 300;
	struct bm_image *img;
	struct stat st;
	uint8_t *buf = malloc(cs);
	uint64_t flushes;
	char cmd[256];

	memset(&rules, 0, sizeof rules);
	ck_assert_int_eq(bm_fault_register(path, &rules), 0);
	ck_assert_int_eq(bm_image_create(loop, path, BLOCKMIRROR_FORMAT_QCOW2,
					 tables * per_table, "", true, 0,
					 &img), 0);
	memset(buf, 0x5e, cs);
	flushes = rules.flushes;
	for (unsigned i = 0; i < tables; i++)
		ck_assert_int_eq(io(img, bm_image_write, i * per_table, cs,
				    buf, 0), 0);
	/* 300 new tables through a cache of 64: a sync per eviction would
	 * be over 200. */
	ck_assert_uint_lt(rules.flushes - flushes, 30);
	ck_assert_int_eq(stat(path, &st), 0);
	ck_assert_uint_eq((uint64_t)st.st_size % (32 * BM_MiB), 0);
	ck_assert_int_eq(io(img, bm_image_flush, 0, 0, NULL, 0), 0);
	ck_assert_int_eq(stat(path, &st), 0);
	/* Header, L1, refcounts, 300 tables and 300 data clusters, not
	 * the next step. */
	ck_assert_uint_le((uint64_t)st.st_size, 2 * tables * cs + BM_MiB);
	ck_assert_uint_eq((uint64_t)st.st_size % cs, 0);
	bm_image_close(img);
	bm_fault_unregister(path);

	if (system("qemu-img --version >/dev/null 2>&1") == 0) {
		snprintf(cmd, sizeof cmd, "qemu-img check -q '%s' && "
			 "qemu-img check --output=json '%s' | "
			 "grep -q '\"image-end-offset\": %jd,'", path, path,
			 (intmax_t)st.st_size);
		ck_assert_msg(system(cmd) == 0, "%s", cmd);
	}
	free(buf);
}
END_TEST

/* ---- a freed cluster reused under a data write still in flight ------- */

struct pending {
	struct bm_io io;
	bool done;
	int err;
};

static void
pending_done(struct bm_io *b, int err)
{
	struct pending *p = bm_container_of(b, struct pending, io);

	p->done = true;
	p->err = err;
}

static void
start(struct bm_image *img, void (*op)(struct bm_image *, struct bm_io *),
      struct pending *p, uint64_t off, uint64_t len, void *buf,
      unsigned flags)
{
	memset(p, 0, sizeof *p);
	p->io.offset = off;
	p->io.length = len;
	p->io.buf = buf;
	p->io.flags = flags;
	p->io.done = pending_done;
	op(img, &p->io);
}

/* Start a write whose data reaches the file `ns` late: the rule is
 * consumed by the next write any store of the image sends, so turn the
 * loop (the worker is idle) until this one has taken it. */
static void
start_slow_write(struct bm_image *img, struct bm_fault_rules *rules,
		 struct pending *p, uint64_t off, uint64_t len, void *buf,
		 uint64_t ns)
{
	rules->next_write_delay_ns = ns;
	start(img, bm_image_write, p, off, len, buf, 0);
	while (rules->next_write_delay_ns)
		ck_assert_int_ge(bm_loop_run_once(loop, 10), 0);
}

/*
 * A write mapped on the loop (its cluster allocated, its L2 table
 * cached) holds no busy range, so a discard (or a trimming zero) of the
 * same cluster is mapped while the write's data is still on its way and
 * frees the host cluster.  A flush started before the write (it waited
 * for an older request) must not make that cluster reusable before the
 * write has landed: a partial write into a new guest cluster gets it
 * next, is filled with zeroes, and the late data would then show
 * through in a guest cluster nobody wrote it to.
 */
START_TEST(test_reuse_under_write)
{
	static struct bm_fault_rules rules;
	struct pending x, fl, w, d;
	struct bm_image *img;
	uint8_t *a = malloc(CS), *b = malloc(CS), *rd = malloc(CS);
	char cmd[256];

	memset(&rules, 0, sizeof rules);
	ck_assert_int_eq(bm_fault_register(path, &rules), 0);
	ck_assert_int_eq(bm_image_create(loop, path, BLOCKMIRROR_FORMAT_QCOW2,
					 64 * BM_MiB, "cluster_size=64K", true,
					 0, &img), 0);
	/* Guest clusters 0 and 1 allocated, their table cached. */
	memset(a, 0x11, CS);
	ck_assert_int_eq(io(img, bm_image_write, 0, CS, a, 0), 0);
	memset(b, 0x22, CS);
	ck_assert_int_eq(io(img, bm_image_write, CS, CS, b, 0), 0);
	ck_assert_int_eq(io(img, bm_image_flush, 0, 0, NULL, 0), 0);

	/* X: slow; the flush queues behind it. */
	memset(b, 0x55, 4096);
	start_slow_write(img, &rules, &x, CS, 4096, b, 300 * 1000000ull);
	start(img, bm_image_flush, &fl, 0, 0, NULL, 0);
	/* W: slower still, into guest cluster 0. */
	memset(a, 0x33, CS);
	start_slow_write(img, &rules, &w, 0, CS / 2, a, 1500 * 1000000ull);
	/* D: frees guest cluster 0's host cluster while W is in flight. */
	if (_i == 0)
		start(img, bm_image_discard, &d, 0, CS, NULL, 0);
	else
		start(img, bm_image_zero, &d, 0, CS, NULL, BM_IO_MAY_TRIM);
	ck_assert_int_eq(bm_loop_run_until(loop, &d.done), 0);
	ck_assert_int_eq(d.err, 0);
	ck_assert_msg(!w.done, "the slow write landed too early");
	ck_assert_int_eq(bm_loop_run_until(loop, &fl.done), 0);
	ck_assert_int_eq(fl.err, 0);
	ck_assert(x.done);
	/* A: part of a new guest cluster, after the flush. */
	memset(b, 0x44, 4096);
	ck_assert_int_eq(io(img, bm_image_write, 5 * CS, 4096, b, 0), 0);
	ck_assert_int_eq(bm_loop_run_until(loop, &w.done), 0);
	ck_assert_int_eq(w.err, 0);

	ck_assert_int_eq(io(img, bm_image_read, 5 * CS, CS, rd, 0), 0);
	for (size_t i = 0; i < CS; i++)
		ck_assert_msg(rd[i] == (i < 4096 ? 0x44 : 0),
			      "guest cluster 5, byte %zu: 0x%02x", i, rd[i]);
	ck_assert_int_eq(io(img, bm_image_read, CS, CS, rd, 0), 0);
	for (size_t i = 0; i < CS; i++)
		ck_assert_uint_eq(rd[i], i < 4096 ? 0x55 : 0x22);
	/* Guest cluster 0: W and D overlapped, either order is fine. */
	ck_assert_int_eq(io(img, bm_image_read, 0, CS, rd, 0), 0);
	for (size_t i = 0; i < CS; i++)
		ck_assert(rd[i] == 0 || (rd[i] == 0x33 && i < CS / 2));
	ck_assert_int_eq(io(img, bm_image_flush, 0, 0, NULL, 0), 0);
	bm_image_close(img);
	bm_fault_unregister(path);

	if (system("qemu-img --version >/dev/null 2>&1") == 0) {
		snprintf(cmd, sizeof cmd, "qemu-img check -q '%s'", path);
		ck_assert_msg(system(cmd) == 0, "%s", cmd);
	}
	free(a);
	free(b);
	free(rd);
}
END_TEST

static Suite *
qcow2_suite(void)
{
	Suite *s = suite_create("qcow2");
	TCase *tc = tcase_create("parse");

	tcase_add_test(tc, test_header_roundtrip);
	tcase_add_test(tc, test_header_bad);
	tcase_add_test(tc, test_header_short);
	tcase_add_test(tc, test_l2_decode);
	tcase_add_test(tc, test_refcounts);
	tcase_add_test(tc, test_compression);
	suite_add_tcase(s, tc);
	tc = tcase_create("driver");
	tcase_set_timeout(tc, 60);
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_add_test(tc, test_driver);
	tcase_add_test(tc, test_zero_fua);
	tcase_add_test(tc, test_grow_and_evict);
	tcase_add_test(tc, test_flush_lets_writes_by);
	tcase_add_loop_test(tc, test_metadata_sync_lets_writes_by, 0, 3);
	tcase_add_test(tc, test_flush_under_load);
	suite_add_tcase(s, tc);
	tc = tcase_create("race");
	tcase_set_timeout(tc, 60);
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_add_loop_test(tc, test_reuse_under_write, 0, 2);
	suite_add_tcase(s, tc);
	return s;
}

int
main(void)
{
	return run_suite(qcow2_suite()) ? EXIT_FAILURE : EXIT_SUCCESS;
}
