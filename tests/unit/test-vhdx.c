/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * VHDX (lib/vhdx-parse.c, lib/vhdx-log.c, lib/vhdx.c, lib/crc32c.c).
 *
 * Three layers.  The pure parsers get hand-made buffers, good and bad.
 * The log is searched and replayed over an in-memory file, with entries
 * built by the same encoder the driver uses and then damaged on purpose.
 * The driver runs under the real engine: images are created, written,
 * reopened and compared with a byte model; every corruption case of
 * formats.md 3.2 is patched into a fresh image and must fail with a
 * message naming the problem (or open, where the spec says so); a crash
 * between the log write and its application is injected with the fault
 * store; and a child writer is SIGKILLed at random moments, after which
 * the image must open, replay and hold every write acknowledged before
 * its last completed flush.
 */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "crc32c.h"
#include "errors.h"
#include "extent.h"
#include "fault.h"
#include "format.h"
#include "helpers.h"
#include "image.h"
#include "internal.h"
#include "vhdx.h"

#define MiB (1024u * 1024u)

static char dir[64];
static char path[128], path2[128];
static struct bm_loop *loop;

static void
setup(void)
{
	strcpy(dir, "/tmp/test-vhdx.XXXXXX");
	ck_assert_ptr_nonnull(mkdtemp(dir));
	snprintf(path, sizeof path, "%s/a.vhdx", dir);
	snprintf(path2, sizeof path2, "%s/b.vhdx", dir);
	ck_assert_int_eq(bm_loop_new(32, &loop), 0);
}

static void
teardown(void)
{
	bm_loop_free(loop);
	remove_tree(dir);
}

/* ---- helpers ---------------------------------------------------------- */

static int
io(struct bm_image *img, void (*op)(struct bm_image *, struct bm_io *),
   uint64_t off, uint64_t len, void *buf)
{
	struct bm_io x = { .offset = off, .length = len, .buf = buf };

	return bm_image_sync(img, op, &x);
}

static void
pattern(uint8_t *b, size_t n, uint64_t off, unsigned seed)
{
	for (size_t i = 0; i < n; i++)
		b[i] = (uint8_t)((off + i) * 7 + seed * 13 + 1 +
				 ((off + i) >> 9));
}

static void
patch(const char *p, uint64_t off, const void *buf, size_t len)
{
	int fd = open(p, O_WRONLY);

	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(pwrite(fd, buf, len, (off_t)off), (ssize_t)len);
	close(fd);
}

static void
peek(const char *p, uint64_t off, void *buf, size_t len)
{
	int fd = open(p, O_RDONLY);

	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(pread(fd, buf, len, (off_t)off), (ssize_t)len);
	close(fd);
}

static void
patch32(const char *p, uint64_t off, uint32_t v)
{
	uint8_t b[4];

	vhdx_put_le32(b, v);
	patch(p, off, b, 4);
}

static void
patch64(const char *p, uint64_t off, uint64_t v)
{
	uint8_t b[8];

	vhdx_put_le64(b, v);
	patch(p, off, b, 8);
}

/* Recompute the checksum of the structure of `len` bytes at off. */
static void
fix_crc(const char *p, uint64_t off, size_t len)
{
	uint8_t *b = malloc(len);

	peek(p, off, b, len);
	memset(b + 4, 0, 4);
	vhdx_put_le32(b + 4, bm_crc32c(0, b, len));
	patch(p, off, b, len);
	free(b);
}

static void
read_header(const char *p, int slot, struct vhdx_header *h)
{
	uint8_t b[4096];
	const char *why;

	peek(p, slot ? VHDX_HEADER2_OFFSET : VHDX_HEADER1_OFFSET, b, 4096);
	ck_assert_int_eq(vhdx_header_decode(b, h, &why), 0);
}

static void
write_header(const char *p, int slot, const struct vhdx_header *h)
{
	uint8_t b[4096];

	vhdx_header_encode(h, b);
	patch(p, slot ? VHDX_HEADER2_OFFSET : VHDX_HEADER1_OFFSET, b, 4096);
}

static void
regions_of(const char *p, struct vhdx_regions *r)
{
	uint8_t *b = malloc(VHDX_REGION_SIZE);

	peek(p, VHDX_REGION1_OFFSET, b, VHDX_REGION_SIZE);
	ck_assert_int_eq(vhdx_region_table_decode(p, b, r), 0);
	free(b);
}

static int
create(const char *p, uint64_t size, const char *opts)
{
	struct bm_image *img;
	int r = bm_image_create(loop, p, BLOCKMIRROR_FORMAT_VHDX, size, opts,
				true, BM_IMAGE_WRITE, &img);

	if (r == 0)
		bm_image_close(img);
	else
		printf("create %s (%s): %s\n", p, opts ? opts : "",
		       blockmirror_last_error());
	return r;
}

static int
open_img(const char *p, unsigned flags, struct bm_image **img)
{
	return bm_image_open(loop, p, BLOCKMIRROR_FORMAT_VHDX, flags, img);
}

/* The whole guest disk equals model? */
static void
check_model(struct bm_image *img, const uint8_t *model, uint64_t size)
{
	uint8_t *b = malloc(size);

	ck_assert_int_eq(io(img, bm_image_read, 0, size, b), 0);
	for (uint64_t i = 0; i < size; i++)
		if (b[i] != model[i])
			ck_abort_msg("byte %llu: %u, model %u",
				     (unsigned long long)i, b[i], model[i]);
	free(b);
}

/* Extent flags at off (the first extent from a status call there). */
static uint32_t
status_at(struct bm_image *img, uint64_t off, uint64_t len)
{
	struct bm_extent_list l = { 0 };
	struct bm_io x = { .offset = off, .length = len, .extents = &l };
	uint32_t f;

	ck_assert_int_eq(bm_image_sync(img, bm_image_block_status, &x), 0);
	ck_assert_uint_ge(l.len, 1);
	ck_assert_uint_eq(l.v[0].offset, off);
	f = l.v[0].flags;
	bm_extent_list_free(&l);
	return f;
}

/* ---- pure parsers ----------------------------------------------------- */

START_TEST(test_crc32c)
{
	const char *v = "123456789";

	ck_assert_uint_eq(bm_crc32c(0, v, 9), 0xe3069283u);
	ck_assert_uint_eq(bm_crc32c(bm_crc32c(0, v, 4), v + 4, 5),
			  0xe3069283u);
	ck_assert_uint_eq(bm_crc32c(0, v + 1, 7),
			  bm_crc32c(bm_crc32c(0, v + 1, 3), v + 4, 4));
}
END_TEST

START_TEST(test_guid)
{
	uint8_t g[16], h[16];
	char s[39];

	ck_assert_int_eq(vhdx_guid_parse("2DC27766-F623-4200-9D64-115E9BFD4A08",
					 g), 0);
	ck_assert_mem_eq(g, vhdx_guid_bat, 16);
	vhdx_guid_format(vhdx_guid_metadata, s);
	ck_assert_str_eq(s, "{8b7ca206-4790-4b9a-b8fe-575f050f886e}");
	ck_assert_int_eq(vhdx_guid_parse(s, h), 0);
	ck_assert_mem_eq(h, vhdx_guid_metadata, 16);
	ck_assert_int_eq(vhdx_guid_parse("{8b7ca206-4790}", h), -EINVAL);
	ck_assert_int_eq(vhdx_guid_parse("zb7ca206-4790-4b9a-b8fe-575f050f886e",
					 h), -EINVAL);
	vhdx_guid_generate(g);
	vhdx_guid_generate(h);
	ck_assert(memcmp(g, h, 16) != 0);
	ck_assert(!vhdx_guid_is_zero(g));
	ck_assert_uint_eq(g[7] >> 4, 4);        /* version 4, data3 LE */
}
END_TEST

static void
make_header(struct vhdx_header *h, uint64_t seq)
{
	*h = (struct vhdx_header){ .seq = seq, .version = 1,
				   .log_length = MiB, .log_offset = MiB };
	vhdx_guid_generate(h->file_write_guid);
}

START_TEST(test_header)
{
	uint8_t a[4096], b[4096];
	struct vhdx_header h, cur;
	int slot;

	make_header(&h, 5);
	vhdx_header_encode(&h, a);
	make_header(&h, 6);
	vhdx_header_encode(&h, b);
	ck_assert_int_eq(vhdx_header_choose("x", a, b, &cur, &slot), 0);
	ck_assert_int_eq(slot, 1);
	ck_assert_uint_eq(cur.seq, 6);
	b[100] ^= 1;            /* checksum now wrong: header 1 wins */
	ck_assert_int_eq(vhdx_header_choose("x", a, b, &cur, &slot), 0);
	ck_assert_int_eq(slot, 0);
	a[100] ^= 1;
	ck_assert_int_eq(vhdx_header_choose("x", a, b, &cur, &slot), -EINVAL);
	ck_assert_ptr_nonnull(strstr(blockmirror_last_error(),
				     "no valid VHDX header"));
	/* Same sequence number, different contents. */
	make_header(&h, 7);
	vhdx_header_encode(&h, a);
	make_header(&h, 7);
	vhdx_header_encode(&h, b);
	ck_assert_int_eq(vhdx_header_choose("x", a, b, &cur, &slot), -EINVAL);
	ck_assert_int_eq(vhdx_header_choose("x", a, a, &cur, &slot), 0);
	/* Version 2 is not a valid header. */
	h.version = 2;
	vhdx_header_encode(&h, b);
	ck_assert_int_eq(vhdx_header_choose("x", b, b, &cur, &slot), -EINVAL);
	h.version = 1;
	h.log_offset = MiB + 4096;
	vhdx_header_encode(&h, b);
	ck_assert_int_eq(vhdx_header_choose("x", b, b, &cur, &slot), -EINVAL);
	ck_assert_ptr_nonnull(strstr(blockmirror_last_error(), "log offset"));
	h.log_offset = MiB;
	h.log_version = 1;
	vhdx_header_encode(&h, b);
	ck_assert_int_eq(vhdx_header_choose("x", b, b, &cur, &slot), -ENOTSUP);
	h.log_version = 0;
	h.log_length = 0;
	vhdx_header_encode(&h, b);
	ck_assert_int_eq(vhdx_header_choose("x", b, b, &cur, &slot), -EINVAL);
}
END_TEST

static void
fix_mem_crc(uint8_t *b, size_t len)
{
	memset(b + 4, 0, 4);
	vhdx_put_le32(b + 4, bm_crc32c(0, b, len));
}

START_TEST(test_region_table)
{
	static uint8_t b[VHDX_REGION_SIZE];
	struct vhdx_regions r = { 3 * MiB, MiB, 4 * MiB, MiB }, o;

	vhdx_region_table_encode(&r, b);
	ck_assert_int_eq(vhdx_region_table_decode("x", b, &o), 0);
	ck_assert_uint_eq(o.bat_offset, r.bat_offset);
	ck_assert_uint_eq(o.bat_length, r.bat_length);
	ck_assert_uint_eq(o.meta_offset, r.meta_offset);
	ck_assert_uint_eq(o.meta_length, r.meta_length);
	b[1000] = 1;
	ck_assert_int_eq(vhdx_region_table_decode("x", b, &o), -EINVAL);
	ck_assert_ptr_nonnull(strstr(blockmirror_last_error(), "checksum"));
	vhdx_region_table_encode(&r, b);
	vhdx_put_le32(b + 8, 2048);
	fix_mem_crc(b, sizeof b);
	ck_assert_int_eq(vhdx_region_table_decode("x", b, &o), -EINVAL);
	/* Metadata listed where the BAT was: the BAT is missing... */
	vhdx_region_table_encode(&r, b);
	memcpy(b + 16, vhdx_guid_metadata, 16);
	fix_mem_crc(b, sizeof b);
	ck_assert_int_eq(vhdx_region_table_decode("x", b, &o), -EINVAL);
	ck_assert_ptr_nonnull(strstr(blockmirror_last_error(), "twice"));
	vhdx_put_le32(b + 8, 1);
	fix_mem_crc(b, sizeof b);
	ck_assert_int_eq(vhdx_region_table_decode("x", b, &o), -EINVAL);
	ck_assert_ptr_nonnull(strstr(blockmirror_last_error(), "no BAT"));
	/* Overlap, misalignment. */
	vhdx_region_table_encode(&r, b);
	vhdx_put_le64(b + 64, 3 * MiB);
	fix_mem_crc(b, sizeof b);
	ck_assert_int_eq(vhdx_region_table_decode("x", b, &o), -EINVAL);
	ck_assert_ptr_nonnull(strstr(blockmirror_last_error(), "overlap"));
	vhdx_put_le64(b + 64, 4 * MiB + 4096);
	fix_mem_crc(b, sizeof b);
	ck_assert_int_eq(vhdx_region_table_decode("x", b, &o), -EINVAL);
	/* A third, unknown region: fine unless required. */
	vhdx_region_table_encode(&r, b);
	vhdx_put_le32(b + 8, 3);
	vhdx_guid_generate(b + 80);
	vhdx_put_le64(b + 96, 8 * MiB);
	vhdx_put_le32(b + 104, MiB);
	fix_mem_crc(b, sizeof b);
	ck_assert_int_eq(vhdx_region_table_decode("x", b, &o), 0);
	vhdx_put_le32(b + 108, 1);
	fix_mem_crc(b, sizeof b);
	ck_assert_int_eq(vhdx_region_table_decode("x", b, &o), -ENOTSUP);
	ck_assert_ptr_nonnull(strstr(blockmirror_last_error(),
				     "required but unknown"));
}
END_TEST

static void
base_meta(struct vhdx_meta *m)
{
	*m = (struct vhdx_meta){ .block_size = 2 * MiB,
				 .virtual_size = 100 * MiB,
				 .logical_sector = 512,
				 .physical_sector = 4096 };
	vhdx_guid_generate(m->page83);
}

static int
meta_roundtrip(const struct vhdx_meta *m, uint8_t *b, struct vhdx_meta *o)
{
	memset(b, 0, MiB);
	ck_assert_int_eq(vhdx_metadata_encode(m, b, MiB), 0);
	return vhdx_metadata_decode("x", b, MiB, MiB, o);
}

START_TEST(test_metadata)
{
	uint8_t *b = malloc(MiB);
	struct vhdx_meta m, o;
	char *p;

	base_meta(&m);
	ck_assert_int_eq(meta_roundtrip(&m, b, &o), 0);
	ck_assert_uint_eq(o.block_size, 2 * MiB);
	ck_assert_uint_eq(o.virtual_size, 100 * MiB);
	ck_assert_uint_eq(o.physical_sector, 4096);
	ck_assert_mem_eq(o.page83, m.page83, 16);
	ck_assert(!o.has_parent);
	vhdx_meta_free(&o);
	/* With a parent locator (UTF-8 beyond ASCII too). */
	m.has_parent = true;
	m.parent_linkage = "{8b7ca206-4790-4b9a-b8fe-575f050f886e}";
	m.relative_path = "..\\base d\xc3\xa9j\xc3\xa0.vhdx";
	ck_assert_int_eq(meta_roundtrip(&m, b, &o), 0);
	ck_assert(o.has_parent);
	ck_assert_str_eq(o.parent_linkage, m.parent_linkage);
	p = vhdx_parent_path(&o);
	ck_assert_str_eq(p, "../base d\xc3\xa9j\xc3\xa0.vhdx");
	free(p);
	vhdx_meta_free(&o);
	m.relative_path = NULL;
	ck_assert_int_eq(meta_roundtrip(&m, b, &o), -EINVAL);
	ck_assert_ptr_nonnull(strstr(blockmirror_last_error(), "path"));
	vhdx_meta_free(&o);
	m.has_parent = false;
	/* Bad block sizes, sector sizes, disk size. */
	for (uint32_t bs = 512 * 1024; bs; bs = bs == 512 * 1024 ? 3 * MiB :
	     bs == 3 * MiB ? 512 * MiB : 0) {
		m.block_size = bs;
		ck_assert_int_eq(meta_roundtrip(&m, b, &o), -EINVAL);
		ck_assert_ptr_nonnull(strstr(blockmirror_last_error(),
					     "block size"));
	}
	m.block_size = MiB;
	m.logical_sector = 1024;
	ck_assert_int_eq(meta_roundtrip(&m, b, &o), -EINVAL);
	ck_assert_ptr_nonnull(strstr(blockmirror_last_error(),
				     "logical sector size"));
	m.logical_sector = 4096;
	m.virtual_size = 4096 * 3 + 512;
	ck_assert_int_eq(meta_roundtrip(&m, b, &o), -EINVAL);
	ck_assert_ptr_nonnull(strstr(blockmirror_last_error(), "multiple"));
	/* Missing, duplicate and unknown required items. */
	base_meta(&m);
	ck_assert_int_eq(vhdx_metadata_encode(&m, b, MiB), 0);
	vhdx_put_le16(b + 10, 4);       /* drop Physical Sector Size */
	ck_assert_int_eq(vhdx_metadata_decode("x", b, MiB, MiB, &o), -EINVAL);
	ck_assert_ptr_nonnull(strstr(blockmirror_last_error(), "has no "
				     "Physical Sector Size"));
	memcpy(b + 32 + 3 * 32, vhdx_guid_page83, 16);
	vhdx_put_le16(b + 10, 5);
	ck_assert_int_eq(vhdx_metadata_decode("x", b, MiB, MiB, &o), -EINVAL);
	ck_assert_ptr_nonnull(strstr(blockmirror_last_error(), "twice"));
	vhdx_guid_generate(b + 32 + 3 * 32);
	ck_assert_int_eq(vhdx_metadata_decode("x", b, MiB, MiB, &o), -ENOTSUP);
	ck_assert_ptr_nonnull(strstr(blockmirror_last_error(),
				     "required but unknown"));
	ck_assert_int_eq(vhdx_metadata_encode(&m, b, MiB), 0);
	memcpy(b, "metadatX", 8);
	ck_assert_int_eq(vhdx_metadata_decode("x", b, MiB, MiB, &o), -EINVAL);
	/* HasParent without a locator. */
	ck_assert_int_eq(vhdx_metadata_encode(&m, b, MiB), 0);
	vhdx_put_le32(b + 64 * 1024 + 4, 2);
	ck_assert_int_eq(vhdx_metadata_decode("x", b, MiB, MiB, &o), -EINVAL);
	ck_assert_ptr_nonnull(strstr(blockmirror_last_error(),
				     "parent locator"));
	/* Item offsets inside the table, items overlapping. */
	ck_assert_int_eq(vhdx_metadata_encode(&m, b, MiB), 0);
	vhdx_put_le32(b + 32 + 16, 4096);
	ck_assert_int_eq(vhdx_metadata_decode("x", b, MiB, MiB, &o), -EINVAL);
	vhdx_put_le32(b + 32 + 16, 64 * 1024 + 8);
	ck_assert_int_eq(vhdx_metadata_decode("x", b, MiB, MiB, &o), -EINVAL);
	ck_assert_ptr_nonnull(strstr(blockmirror_last_error(), "overlap"));
	free(b);
}
END_TEST

START_TEST(test_geometry)
{
	static const struct { uint32_t bs, lss; uint64_t ratio; } t[] = {
		{ MiB, 512, 4096 }, { 2 * MiB, 512, 2048 },
		{ 32 * MiB, 512, 128 }, { 256 * MiB, 512, 16 },
		{ MiB, 4096, 32768 }, { 256 * MiB, 4096, 128 },
	};
	struct vhdx_meta m;
	struct vhdx_geom g;

	for (size_t i = 0; i < BM_ARRAY_SIZE(t); i++) {
		base_meta(&m);
		m.block_size = t[i].bs;
		m.logical_sector = t[i].lss;
		ck_assert_int_eq(vhdx_geometry("x", &m, &g), 0);
		ck_assert_uint_eq(g.chunk_ratio, t[i].ratio);
	}
	base_meta(&m);
	m.block_size = MiB;
	m.virtual_size = 4097ull * MiB;
	ck_assert_int_eq(vhdx_geometry("x", &m, &g), 0);
	ck_assert_uint_eq(g.data_blocks, 4097);
	ck_assert_uint_eq(g.bat_entries, 4098);
	ck_assert_uint_eq(vhdx_bat_index(&g, 4096), 4097);
	ck_assert_uint_eq(vhdx_bitmap_index(&g, 0), 4096);
	m.has_parent = true;
	ck_assert_int_eq(vhdx_geometry("x", &m, &g), 0);
	ck_assert_uint_eq(g.bat_entries, 2 * 4097);
}
END_TEST

START_TEST(test_bat_check)
{
	struct vhdx_meta m;
	struct vhdx_geom g;
	uint64_t bat[8] = { 0 };
	struct vhdx_range fixed[] = { { 0, MiB, "file header area" },
				      { MiB, MiB, "log" } };
	const uint64_t size = 16 * MiB;

	base_meta(&m);
	m.block_size = MiB;
	m.virtual_size = 8 * MiB;
	ck_assert_int_eq(vhdx_geometry("x", &m, &g), 0);
	bat[0] = vhdx_bat_entry(VHDX_BAT_FULLY_PRESENT, 4 * MiB);
	bat[1] = vhdx_bat_entry(VHDX_BAT_ZERO, 0);
	bat[2] = vhdx_bat_entry(VHDX_BAT_UNMAPPED_V095, 0);
	bat[3] = vhdx_bat_entry(VHDX_BAT_FULLY_PRESENT, 5 * MiB) | 0xf8;
	ck_assert_int_eq(vhdx_bat_check("x", bat, &g, &m, fixed, 2, size), 0);
	bat[4] = vhdx_bat_entry(VHDX_BAT_FULLY_PRESENT, 4 * MiB);
	ck_assert_int_eq(vhdx_bat_check("x", bat, &g, &m, fixed, 2, size),
			 -EINVAL);
	ck_assert_ptr_nonnull(strstr(blockmirror_last_error(), "share"));
	bat[4] = vhdx_bat_entry(VHDX_BAT_FULLY_PRESENT, 16 * MiB);
	ck_assert_int_eq(vhdx_bat_check("x", bat, &g, &m, fixed, 2, size),
			 -EINVAL);
	ck_assert_ptr_nonnull(strstr(blockmirror_last_error(), "end of the "
				     "file"));
	bat[4] = vhdx_bat_entry(VHDX_BAT_FULLY_PRESENT, MiB);
	ck_assert_int_eq(vhdx_bat_check("x", bat, &g, &m, fixed, 2, size),
			 -EINVAL);
	ck_assert_ptr_nonnull(strstr(blockmirror_last_error(), "the log"));
	bat[4] = vhdx_bat_entry(VHDX_BAT_FULLY_PRESENT, 0);
	ck_assert_int_eq(vhdx_bat_check("x", bat, &g, &m, fixed, 2, size),
			 -EINVAL);
	ck_assert_ptr_nonnull(strstr(blockmirror_last_error(), "first MiB"));
	bat[4] = 4;
	ck_assert_int_eq(vhdx_bat_check("x", bat, &g, &m, fixed, 2, size),
			 -EINVAL);
	ck_assert_ptr_nonnull(strstr(blockmirror_last_error(), "reserved"));
	bat[4] = vhdx_bat_entry(VHDX_BAT_PARTIALLY_PRESENT, 8 * MiB);
	ck_assert_int_eq(vhdx_bat_check("x", bat, &g, &m, fixed, 2, size),
			 -EINVAL);
	ck_assert_ptr_nonnull(strstr(blockmirror_last_error(),
				     "PARTIALLY_PRESENT"));
}
END_TEST

/* ---- log over an in-memory file --------------------------------------- */

struct memfile {
	uint8_t *b;
	uint64_t size;
	int syncs;
};

static int
m_pread(void *o, void *buf, size_t len, uint64_t off)
{
	struct memfile *m = o;

	if (off + len > m->size)
		return bm_error(-EIO, "read past end");
	memcpy(buf, m->b + off, len);
	return 0;
}

static int
m_truncate(void *o, uint64_t size)
{
	struct memfile *m = o;

	m->b = realloc(m->b, size);
	if (size > m->size)
		memset(m->b + m->size, 0, size - m->size);
	m->size = size;
	return 0;
}

static int
m_pwrite(void *o, const void *buf, size_t len, uint64_t off)
{
	struct memfile *m = o;

	if (off + len > m->size)
		m_truncate(o, off + len);
	memcpy(m->b + off, buf, len);
	return 0;
}

static int
m_zero(void *o, uint64_t off, uint64_t len)
{
	struct memfile *m = o;

	if (off + len > m->size)
		m_truncate(o, off + len);
	memset(m->b + off, 0, len);
	return 0;
}

static int
m_sync(void *o)
{
	((struct memfile *)o)->syncs++;
	return 0;
}

static uint64_t
m_size(void *o)
{
	return ((struct memfile *)o)->size;
}

static struct memfile mf;
static const struct vhdx_log_io mio = {
	.name = "mem", .opaque = &mf, .pread = m_pread, .pwrite = m_pwrite,
	.zero = m_zero, .truncate = m_truncate, .sync = m_sync,
	.size = m_size,
};

/* An 8 MiB file with a 1 MiB log at 1 MiB; header h with a LogGuid. */
static void
log_setup(struct vhdx_header *h)
{
	free(mf.b);
	mf = (struct memfile){ calloc(1, 8 * MiB), 8 * MiB, 0 };
	make_header(h, 10);
	vhdx_guid_generate(h->log_guid);
}

/* Put an entry (seq, tail) with one data sector for file offset
 * `target` filled with byte v, at log position pos (wrapping). */
static void
put_entry(const struct vhdx_header *h, uint32_t pos, uint64_t seq,
	  uint32_t tail, uint64_t target, uint8_t v)
{
	uint8_t sector[4096], buf[8192];
	struct vhdx_log_desc d = { .file_offset = target, .data = sector };
	struct vhdx_log_entry e = { .seq = seq, .tail = tail,
				    .flushed_file_offset = mf.size,
				    .last_file_offset = mf.size };

	memset(sector, v, sizeof sector);
	memcpy(e.log_guid, h->log_guid, 16);
	ck_assert_uint_eq(vhdx_log_entry_size(1, 0), 8192);
	vhdx_log_entry_encode(&e, &d, 1, buf);
	for (int i = 0; i < 2; i++)
		memcpy(mf.b + h->log_offset + (pos + i * 4096u) % h->log_length,
		       buf + i * 4096, 4096);
}

static void
replay(const struct vhdx_header *h, int expect)
{
	struct vhdx_log_seq *s;

	ck_assert_int_eq(vhdx_log_find(&mio, h, &s), expect);
	if (expect == 0 && s) {
		ck_assert_int_eq(vhdx_log_apply(&mio, s), 0);
		vhdx_log_seq_free(s);
	}
}

START_TEST(test_log_search)
{
	struct vhdx_header h;
	struct vhdx_log_seq *s;
	uint8_t *x;

	/* One entry: replayed. */
	log_setup(&h);
	put_entry(&h, 0, 1, 0, 5 * MiB, 0xaa);
	replay(&h, 0);
	ck_assert_uint_eq(mf.b[5 * MiB + 100], 0xaa);
	ck_assert_int_ge(mf.syncs, 1);
	/* A zero LogGuid: nothing at all. */
	log_setup(&h);
	put_entry(&h, 0, 1, 0, 5 * MiB, 0xaa);
	memset(h.log_guid, 0, 16);
	replay(&h, 0);
	ck_assert_uint_eq(mf.b[5 * MiB], 0);
	/* Checksum wrong, LogGuid mismatch, sequence 0: ignored. */
	log_setup(&h);
	put_entry(&h, 0, 1, 0, 5 * MiB, 0xaa);
	mf.b[MiB + 5000] ^= 1;
	replay(&h, 0);
	ck_assert_uint_eq(mf.b[5 * MiB], 0);
	log_setup(&h);
	put_entry(&h, 0, 1, 0, 5 * MiB, 0xaa);
	vhdx_guid_generate(h.log_guid);
	replay(&h, 0);
	ck_assert_uint_eq(mf.b[5 * MiB], 0);
	log_setup(&h);
	put_entry(&h, 0, 0, 0, 5 * MiB, 0xaa);
	replay(&h, 0);
	ck_assert_uint_eq(mf.b[5 * MiB], 0);
	/* A sequence of three; the head's tail names the second. */
	log_setup(&h);
	put_entry(&h, 0, 7, 0, 5 * MiB, 1);
	put_entry(&h, 8192, 8, 0, 5 * MiB + 4096, 2);
	put_entry(&h, 16384, 9, 8192, 5 * MiB + 8192, 3);
	replay(&h, 0);
	ck_assert_uint_eq(mf.b[5 * MiB], 0);    /* before the tail */
	ck_assert_uint_eq(mf.b[5 * MiB + 4096], 2);
	ck_assert_uint_eq(mf.b[5 * MiB + 8192], 3);
	/* The head's tail outside its sequence: that sequence does not
	 * count, the older valid one does. */
	log_setup(&h);
	put_entry(&h, 0, 7, 0, 5 * MiB, 1);
	put_entry(&h, 65536, 9, 32768, 5 * MiB + 4096, 2);
	replay(&h, 0);
	ck_assert_uint_eq(mf.b[5 * MiB], 1);
	ck_assert_uint_eq(mf.b[5 * MiB + 4096], 0);
	/* Two sequences: the higher head wins. */
	log_setup(&h);
	put_entry(&h, 65536, 20, 65536, 5 * MiB, 20);
	put_entry(&h, 0, 30, 0, 5 * MiB, 30);
	replay(&h, 0);
	ck_assert_uint_eq(mf.b[5 * MiB], 30);
	/* An entry wrapping around the end of the log. */
	log_setup(&h);
	put_entry(&h, MiB - 4096, 3, MiB - 4096, 6 * MiB, 0x5a);
	replay(&h, 0);
	ck_assert_uint_eq(mf.b[6 * MiB + 4095], 0x5a);
	/* A complete entry with a bad descriptor: refused. */
	log_setup(&h);
	put_entry(&h, 0, 1, 0, 5 * MiB, 0xaa);
	x = mf.b + MiB;
	x[64] = 'X';
	fix_mem_crc(x, 8192);
	replay(&h, -EINVAL);
	ck_assert_ptr_nonnull(strstr(blockmirror_last_error(), "descriptor"));
	/* A data sector whose sequence halves disagree. */
	log_setup(&h);
	put_entry(&h, 0, 1, 0, 5 * MiB, 0xaa);
	x = mf.b + MiB; /* log_setup reallocated the file */
	x[4096 + 4092] ^= 1;
	fix_mem_crc(x, 8192);
	replay(&h, -EINVAL);
	/* More descriptors than the entry holds. */
	log_setup(&h);
	put_entry(&h, 0, 1, 0, 5 * MiB, 0xaa);
	x = mf.b + MiB; /* log_setup reallocated the file */
	vhdx_put_le32(x + 24, 1000);
	fix_mem_crc(x, 8192);
	replay(&h, -EINVAL);
	/* The head says more was durable than the file holds. */
	log_setup(&h);
	put_entry(&h, 0, 1, 0, 5 * MiB, 0xaa);
	x = mf.b + MiB; /* log_setup reallocated the file */
	vhdx_put_le64(x + 48, 9 * MiB);
	fix_mem_crc(x, 8192);
	replay(&h, -EINVAL);
	ck_assert_ptr_nonnull(strstr(blockmirror_last_error(), "truncated"));
	/* Writes into the headers, or past LastFileOffset. */
	log_setup(&h);
	put_entry(&h, 0, 1, 0, 64 * 1024, 0xaa);
	replay(&h, -EINVAL);
	ck_assert_ptr_nonnull(strstr(blockmirror_last_error(), "headers"));
	log_setup(&h);
	put_entry(&h, 0, 1, 0, 9 * MiB, 0xaa);
	replay(&h, -EINVAL);
	/* LastFileOffset grows the file. */
	log_setup(&h);
	put_entry(&h, 0, 1, 0, 5 * MiB, 0xaa);
	x = mf.b + MiB; /* log_setup reallocated the file */
	vhdx_put_le64(x + 56, 10 * MiB);
	fix_mem_crc(x, 8192);
	replay(&h, 0);
	ck_assert_uint_eq(mf.size, 10 * MiB);
	/* The log itself past the end of the file. */
	log_setup(&h);
	h.log_offset = 8 * MiB;
	ck_assert_int_eq(vhdx_log_find(&mio, &h, &s), -EINVAL);
	free(mf.b);
	mf.b = NULL;
}
END_TEST

START_TEST(test_log_writer)
{
	struct vhdx_header h;
	struct vhdx_log_writer w = { 0 };
	struct vhdx_log_seq *s;
	uint8_t sec[4096], got[4096];
	struct vhdx_log_desc d[2] = {
		{ .file_offset = 4 * MiB, .data = sec },
		{ .file_offset = 6 * MiB, .zero_length = 8192 },
	};
	size_t max = vhdx_log_max_data(MiB);

	ck_assert_uint_gt(max, 200);
	ck_assert_uint_le(vhdx_log_entry_size(max, 0), MiB);
	ck_assert_uint_gt(vhdx_log_entry_size(max + 1, 0), MiB);
	log_setup(&h);
	memset(mf.b + 6 * MiB, 0x77, 3 * 4096);
	/* Many entries, wrapping the log several times: the last one is
	 * what a replay gives, over a file where nothing was applied. */
	for (int i = 0; i < 300; i++) {
		memset(sec, i, sizeof sec);
		sec[0] = 0xfe;
		sec[4095] = 0xef;
		ck_assert_int_eq(vhdx_log_write(&mio, &h, &w, d, 2), 0);
	}
	ck_assert_int_eq(vhdx_log_find(&mio, &h, &s), 0);
	ck_assert_ptr_nonnull(s);
	ck_assert_uint_eq(s->head_seq, 300);
	ck_assert_uint_eq(s->count, 1);
	/* Read-only replay: the overlay. */
	memset(got, 0x11, sizeof got);
	vhdx_log_overlay(s, got, 4096, 4 * MiB);
	ck_assert_mem_eq(got, sec, 4096);
	{
		struct vhdx_range ok = { 4 * MiB, MiB, "" };
		uint64_t bad = 0;

		ck_assert(!vhdx_log_within(s, &ok, 1, &bad));
		ck_assert_uint_eq(bad, 6 * MiB);
	}
	ck_assert_int_eq(vhdx_log_apply(&mio, s), 0);
	vhdx_log_seq_free(s);
	ck_assert_mem_eq(mf.b + 4 * MiB, sec, 4096);
	ck_assert_uint_eq(mf.b[6 * MiB + 8191], 0);
	ck_assert_uint_eq(mf.b[6 * MiB + 8192], 0x77);
	free(mf.b);
	mf.b = NULL;
}
END_TEST

/* ---- the driver under the engine -------------------------------------- */

/* Create, write a model, reopen, compare; sector size and subformat from
 * the options. */
static void
roundtrip(const char *opts, uint32_t bs, uint32_t lss, bool fixed)
{
	const uint64_t size = 12ull * bs + 5 * lss;
	uint8_t *model = calloc(1, size), *b = malloc(3 * bs);
	struct bm_image *img;
	struct {
		uint64_t off, len;
		int op;         /* 0 write, 1 zero, 2 discard */
	} ops[] = {
		{ 0, lss, 0 },
		{ bs - lss, 2 * lss, 0 },                 /* spans 0|1 */
		{ 3 * (uint64_t)bs, bs, 0 },              /* whole block */
		{ 5 * (uint64_t)bs + 7 * lss, 2 * bs, 0 },  /* 5..7 */
		{ 3 * (uint64_t)bs + lss, lss, 1 },       /* partial zero */
		{ 6 * (uint64_t)bs, bs, 1 },              /* whole zero */
		{ 9 * (uint64_t)bs, bs, 0 },
		{ 9 * (uint64_t)bs, bs, 2 },              /* whole discard */
		{ 12 * (uint64_t)bs, 5 * lss, 0 },        /* short last */
		{ 10 * (uint64_t)bs, bs, 1 },             /* zero a hole */
		{ 2 * (uint64_t)bs, 3 * lss, 2 },         /* partial discard */
	};

	ck_assert_int_eq(create(path, size, opts), 0);
	ck_assert_int_eq(open_img(path, BM_IMAGE_WRITE, &img), 0);
	ck_assert_uint_eq(img->size, size);
	ck_assert_uint_eq(img->cluster_size, bs);
	ck_assert_uint_ge(img->align, lss);
	for (size_t i = 0; i < BM_ARRAY_SIZE(ops); i++) {
		uint64_t o = ops[i].off, l = ops[i].len;

		if (ops[i].op == 0) {
			pattern(b, l, o, (unsigned)i);
			memcpy(model + o, b, l);
			ck_assert_int_eq(io(img, bm_image_write, o, l, b), 0);
		} else if (ops[i].op == 1) {
			memset(model + o, 0, l);
			ck_assert_int_eq(io(img, bm_image_zero, o, l, NULL),
					 0);
		} else {
			if (l == bs && !fixed)
				memset(model + o, 0, l);
			ck_assert_int_eq(io(img, bm_image_discard, o, l,
					    NULL), 0);
		}
		if (i == 5)
			ck_assert_int_eq(io(img, bm_image_flush, 0, 0, NULL),
					 0);
	}
	check_model(img, model, size);
	bm_image_close(img);
	ck_assert_int_eq(open_img(path, 0, &img), 0);
	check_model(img, model, size);
	if (!fixed) {
		ck_assert_uint_eq(status_at(img, 11ull * bs, bs),
				  BM_EXTENT_HOLE | BM_EXTENT_ZERO);
		ck_assert_uint_eq(status_at(img, 6ull * bs, bs) &
				  BM_EXTENT_ZERO, BM_EXTENT_ZERO);
		ck_assert_uint_eq(status_at(img, 10ull * bs, bs) &
				  BM_EXTENT_ZERO, BM_EXTENT_ZERO);
		ck_assert_uint_eq(status_at(img, 9ull * bs, bs) &
				  BM_EXTENT_ZERO, BM_EXTENT_ZERO);
	}
	ck_assert_uint_eq(status_at(img, 5ull * bs, lss), 0);
	bm_image_close(img);
	free(model);
	free(b);
}

START_TEST(test_roundtrip_dynamic)
{
	roundtrip("block_size=1M", MiB, 512, false);
}
END_TEST

START_TEST(test_roundtrip_fixed)
{
	roundtrip("subformat=fixed,block_size=2M", 2 * MiB, 512, true);
}
END_TEST

START_TEST(test_roundtrip_4k)
{
	roundtrip("block_size=1M,logical_sector_size=4096", MiB, 4096, false);
	roundtrip("subformat=fixed,block_size=1M,logical_sector_size=4096,"
		  "physical_sector_size=4096", MiB, 4096, true);
}
END_TEST

START_TEST(test_create_options)
{
	struct bm_image *img;
	struct bm_image_facts facts;
	struct vhdx_header h1, h2;
	uint8_t g[16];

	ck_assert_int_eq(create(path, 64 * MiB, "page83=12345678-9abc-def0-"
				"1122-334455667788"), 0);
	ck_assert_int_eq(open_img(path, 0, &img), 0);
	bm_image_facts(img, &facts);
	ck_assert(facts.has_identity);
	vhdx_guid_parse("12345678-9abc-def0-1122-334455667788", g);
	ck_assert_mem_eq(facts.identity, g, 16);
	ck_assert_uint_eq(img->cluster_size, 32 * MiB);
	bm_image_close(img);
	read_header(path, 0, &h1);
	read_header(path, 1, &h2);
	ck_assert_uint_ne(h1.seq, h2.seq);
	ck_assert(vhdx_guid_is_zero(h1.log_guid));
	ck_assert_int_eq(create(path, MiB, "cluster_size=64K"), -EINVAL);
	ck_assert_int_eq(create(path, MiB, "block_size=3M"), -EINVAL);
	ck_assert_int_eq(create(path, MiB, "block_size=512K"), -EINVAL);
	ck_assert_int_eq(create(path, MiB, "logical_sector_size=1024"),
			 -EINVAL);
	ck_assert_int_eq(create(path, MiB, "subformat=differencing"),
			 -EINVAL);
	ck_assert_int_eq(create(path, MiB, "page83=nonsense"), -EINVAL);
	ck_assert_int_eq(create(path, MiB, "parent=nonexistent.vhdx"),
			 -ENOENT);
	ck_assert_int_eq(create(path, 65ull << 40, NULL), -EFBIG);
}
END_TEST

/* A write changes the GUIDs once, in both headers, through an update
 * that keeps the sequence numbers distinct and increasing. */
START_TEST(test_guids)
{
	struct vhdx_header a1, a2, b1, b2, c1;
	struct bm_image *img;
	uint8_t buf[4096] = { 1 };

	ck_assert_int_eq(create(path, 8 * MiB, "block_size=1M"), 0);
	read_header(path, 0, &a1);
	read_header(path, 1, &a2);
	/* A read-write open that changes nothing writes nothing. */
	ck_assert_int_eq(open_img(path, BM_IMAGE_WRITE, &img), 0);
	{
		uint8_t *z = calloc(1, 8 * MiB);

		check_model(img, z, 8 * MiB);
		free(z);
	}
	bm_image_close(img);
	read_header(path, 0, &b1);
	ck_assert_mem_eq(&a1, &b1, sizeof a1);
	ck_assert_int_eq(open_img(path, BM_IMAGE_WRITE, &img), 0);
	ck_assert_int_eq(io(img, bm_image_write, 0, 4096, buf), 0);
	ck_assert_int_eq(io(img, bm_image_write, MiB, 4096, buf), 0);
	ck_assert_int_eq(io(img, bm_image_flush, 0, 0, NULL), 0);
	bm_image_close(img);
	read_header(path, 0, &b1);
	read_header(path, 1, &b2);
	ck_assert(memcmp(b1.file_write_guid, a1.file_write_guid, 16) != 0);
	ck_assert(memcmp(b1.data_write_guid, a1.data_write_guid, 16) != 0);
	ck_assert_mem_eq(b1.data_write_guid, b2.data_write_guid, 16);
	ck_assert_mem_eq(b1.file_write_guid, b2.file_write_guid, 16);
	ck_assert(vhdx_guid_is_zero(b1.log_guid));
	ck_assert(vhdx_guid_is_zero(b2.log_guid));
	ck_assert_uint_gt(BM_MIN(b1.seq, b2.seq), BM_MAX(a1.seq, a2.seq));
	/* Header sequence number at its end: refuse rather than wrap. */
	c1 = b1;
	c1.seq = UINT64_MAX - 1;
	write_header(path, 0, &c1);
	ck_assert_int_eq(open_img(path, BM_IMAGE_WRITE, &img), 0);
	ck_assert_int_eq(io(img, bm_image_write, 0, 4096, buf), -EOVERFLOW);
	bm_image_close(img);
}
END_TEST

/* Differencing: a parent and a child made by our writer. */
START_TEST(test_differencing)
{
	const uint64_t size = 6 * MiB;
	uint8_t *model = calloc(1, size), *b = malloc(2 * MiB);
	struct bm_image *img;
	struct bm_image_facts facts;
	char opts[256];

	ck_assert_int_eq(create(path, size, "block_size=1M"), 0);
	ck_assert_int_eq(open_img(path, BM_IMAGE_WRITE, &img), 0);
	pattern(b, 2 * MiB, 0, 1);
	memcpy(model + MiB / 2, b, 2 * MiB);
	ck_assert_int_eq(io(img, bm_image_write, MiB / 2, 2 * MiB, b), 0);
	memset(model + 4 * MiB, 0, 4096);
	bm_image_close(img);
	snprintf(opts, sizeof opts, "parent=a.vhdx,block_size=1M");
	ck_assert_int_eq(create(path2, 0, opts), 0);
	ck_assert_int_eq(open_img(path2, BM_IMAGE_WRITE, &img), 0);
	ck_assert_uint_eq(img->size, size);
	bm_image_facts(img, &facts);
	ck_assert_str_eq(facts.backing_name, "a.vhdx");
	ck_assert_int_eq(facts.backing_format, BLOCKMIRROR_FORMAT_VHDX);
	check_model(img, model, size);
	ck_assert_uint_eq(status_at(img, MiB, 4096), 0);        /* parent */
	ck_assert_uint_eq(status_at(img, 5 * MiB, 4096),
			  BM_EXTENT_HOLE | BM_EXTENT_ZERO);
	/* Child writes: a partial block over parent data (the rest of the
	 * block is copied from the parent), a whole-block zero that hides
	 * the parent, a write where the parent has nothing. */
	pattern(b, 8192, 0, 2);
	memcpy(model + MiB + 4096, b, 8192);
	ck_assert_int_eq(io(img, bm_image_write, MiB + 4096, 8192, b), 0);
	memset(model + 2 * MiB, 0, MiB);
	ck_assert_int_eq(io(img, bm_image_zero, 2 * MiB, MiB, NULL), 0);
	memcpy(model + 5 * MiB, b, 8192);
	ck_assert_int_eq(io(img, bm_image_write, 5 * MiB, 8192, b), 0);
	check_model(img, model, size);
	bm_image_close(img);
	ck_assert_int_eq(open_img(path2, 0, &img), 0);
	check_model(img, model, size);
	bm_image_close(img);
	/* The parent changes: the child refuses to open over it. */
	ck_assert_int_eq(open_img(path, BM_IMAGE_WRITE, &img), 0);
	ck_assert_int_eq(io(img, bm_image_write, 0, 4096, b), 0);
	bm_image_close(img);
	ck_assert_int_eq(open_img(path2, 0, &img), -EINVAL);
	ck_assert_ptr_nonnull(strstr(blockmirror_last_error(), "linkage"));
	free(model);
	free(b);
}
END_TEST

/* A PARTIALLY_PRESENT block (which our writer never makes) built by
 * hand: sectors with their bitmap bit come from the child, the others
 * from the parent; a write completes it. */
START_TEST(test_partially_present)
{
	const uint64_t size = 4 * MiB;
	uint8_t *model = malloc(size), *b = malloc(MiB), *bm = calloc(1, MiB);
	struct vhdx_regions reg;
	struct bm_image *img;
	struct stat st;
	uint64_t payload, bitmap;

	ck_assert_int_eq(create(path, size, "block_size=1M"), 0);
	ck_assert_int_eq(open_img(path, BM_IMAGE_WRITE, &img), 0);
	pattern(model, size, 0, 3);
	ck_assert_int_eq(io(img, bm_image_write, 0, size, model), 0);
	bm_image_close(img);
	ck_assert_int_eq(create(path2, 0, "parent=a.vhdx,block_size=1M"), 0);
	regions_of(path2, &reg);
	ck_assert_int_eq(stat(path2, &st), 0);
	payload = bm_round_up((uint64_t)st.st_size, MiB);
	bitmap = payload + MiB;
	/* Block 1: sectors 0-7 and 100-199 here, holding pattern 4. */
	pattern(b, MiB, MiB, 4);
	patch(path2, payload, b, MiB);
	memcpy(model + MiB, b, 8 * 512);
	memcpy(model + MiB + 100 * 512, b + 100 * 512, 100 * 512);
	bm[(2048 + 0) / 8] = 0xff;
	for (int s = 100; s < 200; s++)
		bm[(2048 + s) / 8] |= (uint8_t)(1 << (s % 8));
	patch(path2, bitmap, bm, MiB);
	patch64(path2, reg.bat_offset + 8,
		vhdx_bat_entry(VHDX_BAT_PARTIALLY_PRESENT, payload));
	patch64(path2, reg.bat_offset + 8 * 4096,
		vhdx_bat_entry(VHDX_SB_PRESENT, bitmap));
	ck_assert_int_eq(open_img(path2, 0, &img), 0);
	check_model(img, model, size);
	ck_assert_uint_eq(status_at(img, MiB, 512), 0);
	bm_image_close(img);
	ck_assert_int_eq(open_img(path2, BM_IMAGE_WRITE, &img), 0);
	pattern(b, 1024, 7, 5);
	memcpy(model + MiB + 50 * 512, b, 1024);
	ck_assert_int_eq(io(img, bm_image_write, MiB + 50 * 512, 1024, b), 0);
	check_model(img, model, size);
	bm_image_close(img);
	ck_assert_int_eq(open_img(path2, 0, &img), 0);
	check_model(img, model, size);
	bm_image_close(img);
	/* A PARTIALLY_PRESENT block without its sector bitmap. */
	patch64(path2, reg.bat_offset + 8 * 4096, 0);
	patch64(path2, reg.bat_offset + 8,
		vhdx_bat_entry(VHDX_BAT_PARTIALLY_PRESENT, payload));
	ck_assert_int_eq(open_img(path2, 0, &img), -EINVAL);
	ck_assert_ptr_nonnull(strstr(blockmirror_last_error(),
				     "sector bitmap"));
	free(model);
	free(b);
	free(bm);
}
END_TEST

/* A crash between the log write and its application, made by our own
 * writer: the fault store fails every write after the log entry. */
START_TEST(test_log_crash)
{
	const uint64_t size = 8 * MiB;
	uint8_t *model = calloc(1, size), b[65536];
	struct bm_fault_rules rules = { 0 };
	struct bm_image *img;
	struct vhdx_header h1, h2;

	ck_assert_int_eq(create(path, size, "block_size=1M"), 0);
	ck_assert_int_eq(bm_fault_register(path, &rules), 0);
	ck_assert_int_eq(open_img(path, BM_IMAGE_WRITE, &img), 0);
	pattern(b, sizeof b, 0, 1);
	memcpy(model, b, sizeof b);
	ck_assert_int_eq(io(img, bm_image_write, 0, sizeof b, b), 0);
	ck_assert_int_eq(io(img, bm_image_flush, 0, 0, NULL), 0);
	pattern(b, sizeof b, 0, 2);
	memcpy(model + 3 * MiB, b, sizeof b);
	ck_assert_int_eq(io(img, bm_image_write, 3 * MiB, sizeof b, b), 0);
	rules.write_errno = EIO;
	rules.write_err_count = -1;
	rules.write_err_after = rules.writes + 1;
	ck_assert_int_eq(io(img, bm_image_flush, 0, 0, NULL), -EIO);
	bm_image_close(img);
	bm_fault_unregister(path);
	read_header(path, 0, &h1);
	read_header(path, 1, &h2);
	ck_assert(!vhdx_guid_is_zero(h1.log_guid));
	/* Read-only: replayed in memory, the file untouched. */
	ck_assert_int_eq(open_img(path, 0, &img), 0);
	check_model(img, model, size);
	bm_image_close(img);
	read_header(path, 0, &h2);
	ck_assert_mem_eq(&h1, &h2, sizeof h1);
	/* Read-write: replayed into the file, the log retired. */
	ck_assert_int_eq(open_img(path, BM_IMAGE_WRITE, &img), 0);
	check_model(img, model, size);
	bm_image_close(img);
	read_header(path, 0, &h1);
	read_header(path, 1, &h2);
	ck_assert(vhdx_guid_is_zero(h1.log_guid));
	ck_assert(vhdx_guid_is_zero(h2.log_guid));
	ck_assert_int_eq(open_img(path, 0, &img), 0);
	check_model(img, model, size);
	bm_image_close(img);
	free(model);
}
END_TEST

/* Point both headers at a new LogGuid and put one entry in the log
 * that rewrites BAT page 0 with `page`. */
static void
gen_log(const char *p, const uint8_t *page, uint64_t seq, uint64_t flushed)
{
	struct vhdx_header h;
	struct vhdx_regions reg;
	struct vhdx_log_entry e = { .seq = seq };
	struct vhdx_log_desc d;
	uint8_t buf[8192];
	struct stat st;
	int slot = 0;

	regions_of(p, &reg);
	read_header(p, 0, &h);
	{
		struct vhdx_header h2;

		read_header(p, 1, &h2);
		if (h2.seq > h.seq) {
			h = h2;
			slot = 1;
		}
	}
	ck_assert_int_eq(stat(p, &st), 0);
	vhdx_guid_generate(h.log_guid);
	d = (struct vhdx_log_desc){ .file_offset = reg.bat_offset,
				    .data = page };
	memcpy(e.log_guid, h.log_guid, 16);
	e.flushed_file_offset = flushed ? flushed : (uint64_t)st.st_size;
	e.last_file_offset = (uint64_t)st.st_size;
	vhdx_log_entry_encode(&e, &d, 1, buf);
	patch(p, h.log_offset + 64 * 1024, buf, sizeof buf);
	/* Tail is 0 but the entry sits at 64 KiB: fix the tail. */
	vhdx_put_le32(buf + 12, 64 * 1024);
	fix_mem_crc(buf, sizeof buf);
	patch(p, h.log_offset + 64 * 1024, buf, sizeof buf);
	h.seq++;
	write_header(p, !slot, &h);
}

START_TEST(test_log_generated)
{
	const uint64_t size = 4 * MiB;
	uint8_t *model = calloc(1, size), page[4096], b[4096];
	struct vhdx_regions reg;
	struct bm_image *img;
	struct vhdx_header h1, h2;

	ck_assert_int_eq(create(path, size, "block_size=1M"), 0);
	ck_assert_int_eq(open_img(path, BM_IMAGE_WRITE, &img), 0);
	memset(b, 0xa1, sizeof b);
	ck_assert_int_eq(io(img, bm_image_write, 0, 4096, b), 0);
	memset(b, 0xb2, sizeof b);
	ck_assert_int_eq(io(img, bm_image_write, MiB, 4096, b), 0);
	bm_image_close(img);
	/* The log swaps blocks 0 and 1 and zeroes block 2's state. */
	regions_of(path, &reg);
	peek(path, reg.bat_offset, page, sizeof page);
	memcpy(b, page, 8);
	memcpy(page, page + 8, 8);
	memcpy(page + 8, b, 8);
	vhdx_put_le64(page + 24, vhdx_bat_entry(VHDX_BAT_ZERO, 0));
	memset(model, 0xb2, 4096);
	memset(model + MiB, 0xa1, 4096);
	ck_assert_int_eq(rename(path, path2), 0);
	{
		char cmd[300];

		snprintf(cmd, sizeof cmd, "cp %s %s", path2, path);
		ck_assert_int_eq(system(cmd), 0);
	}
	gen_log(path, page, 5, 0);
	ck_assert_int_eq(open_img(path, 0, &img), 0);
	check_model(img, model, size);
	ck_assert_uint_eq(status_at(img, 3 * MiB, MiB) & BM_EXTENT_HOLE, 0);
	bm_image_close(img);
	ck_assert_int_eq(open_img(path, BM_IMAGE_WRITE, &img), 0);
	bm_image_close(img);
	read_header(path, 0, &h1);
	read_header(path, 1, &h2);
	ck_assert(vhdx_guid_is_zero(h1.log_guid));
	ck_assert(vhdx_guid_is_zero(h2.log_guid));
	ck_assert_int_eq(open_img(path, 0, &img), 0);
	check_model(img, model, size);
	bm_image_close(img);
	/* FlushedFileOffset past the end: a truncated file, refused. */
	{
		char cmd[300];

		snprintf(cmd, sizeof cmd, "cp %s %s", path2, path);
		ck_assert_int_eq(system(cmd), 0);
	}
	gen_log(path, page, 5, 1ull << 40);
	ck_assert_int_eq(open_img(path, 0, &img), -EINVAL);
	ck_assert_ptr_nonnull(strstr(blockmirror_last_error(), "truncated"));
	ck_assert_int_eq(open_img(path, BM_IMAGE_WRITE, &img), -EINVAL);
	free(model);
}
END_TEST

/* ---- formats.md 3.2: every corruption gets a named error ------------- */

struct corruption {
	const char *what;
	void (*apply)(const char *p, const struct vhdx_regions *r);
	int err;                /* 0: opens */
	const char *msg;
};

#define META_ITEMS (64 * 1024)   /* our items start here in the region */

static void c_file_sig(const char *p, const struct vhdx_regions *r)
{ (void)r; patch(p, 0, "vhdxfilX", 8); }
static void c_hdr1_crc(const char *p, const struct vhdx_regions *r)
{ (void)r; patch32(p, VHDX_HEADER1_OFFSET + 4, 1); }
static void c_both_crc(const char *p, const struct vhdx_regions *r)
{ (void)r; patch32(p, VHDX_HEADER1_OFFSET + 4, 1);
  patch32(p, VHDX_HEADER2_OFFSET + 4, 1); }
static void c_version(const char *p, const struct vhdx_regions *r)
{
	(void)r;
	for (int i = 0; i < 2; i++) {
		uint64_t o = i ? VHDX_HEADER2_OFFSET : VHDX_HEADER1_OFFSET;
		uint8_t v[2] = { 2, 0 };

		patch(p, o + 66, v, 2);
		fix_crc(p, o, 4096);
	}
}
static void c_equal_seq(const char *p, const struct vhdx_regions *r)
{
	struct vhdx_header h;

	(void)r;
	read_header(p, 0, &h);
	h.seq = 100;
	write_header(p, 0, &h);
	vhdx_guid_generate(h.file_write_guid);
	write_header(p, 1, &h);
}
static void hdr_field(const char *p, int which, uint64_t v)
{
	struct vhdx_header h;

	for (int i = 0; i < 2; i++) {
		read_header(p, i, &h);
		if (which == 0)
			h.log_version = (uint16_t)v;
		else
			h.log_offset = v;
		write_header(p, i, &h);
	}
}
static void c_log_version(const char *p, const struct vhdx_regions *r)
{ (void)r; hdr_field(p, 0, 1); }
static void c_log_offset(const char *p, const struct vhdx_regions *r)
{ (void)r; hdr_field(p, 1, MiB + 4096); }
static void c_rt1_crc(const char *p, const struct vhdx_regions *r)
{ (void)r; patch32(p, VHDX_REGION1_OFFSET + 4, 1); }
static void c_rt_both_crc(const char *p, const struct vhdx_regions *r)
{ (void)r; patch32(p, VHDX_REGION1_OFFSET + 4, 1);
  patch32(p, VHDX_REGION2_OFFSET + 4, 1); }
static void rt(const char *p, uint64_t off, const void *v, size_t len)
{
	for (int i = 0; i < 2; i++) {
		uint64_t o = i ? VHDX_REGION2_OFFSET : VHDX_REGION1_OFFSET;

		patch(p, o + off, v, len);
		fix_crc(p, o, VHDX_REGION_SIZE);
	}
}
static void rt32(const char *p, uint64_t off, uint32_t v)
{ uint8_t b[4]; vhdx_put_le32(b, v); rt(p, off, b, 4); }
static void rt64(const char *p, uint64_t off, uint64_t v)
{ uint8_t b[8]; vhdx_put_le64(b, v); rt(p, off, b, 8); }
static void c_rt_count(const char *p, const struct vhdx_regions *r)
{ (void)r; rt32(p, 8, 2048); }
static void c_rt_no_bat(const char *p, const struct vhdx_regions *r)
{ (void)r; uint8_t g[16]; vhdx_guid_generate(g); rt(p, 16, g, 16);
  rt32(p, 44, 0); }
static void c_rt_bat_twice(const char *p, const struct vhdx_regions *r)
{ (void)r; rt(p, 48, vhdx_guid_bat, 16); }
static void c_rt_bat_small(const char *p, const struct vhdx_regions *r)
{
	/* A 16 TiB disk of 1 MiB blocks needs a 128 MiB BAT. */
	patch64(p, r->meta_offset + META_ITEMS + 8, 16ull << 40);
}
static void c_rt_overlap(const char *p, const struct vhdx_regions *r)
{ rt64(p, 64, r->bat_offset); }
static void c_rt_log(const char *p, const struct vhdx_regions *r)
{ (void)r; rt64(p, 32, MiB); }
static void rt_unknown(const char *p, uint32_t required)
{
	uint8_t g[16];

	vhdx_guid_generate(g);
	rt32(p, 8, 3);
	rt(p, 80, g, 16);
	rt64(p, 96, 64 * MiB);
	rt32(p, 104, MiB);
	rt32(p, 108, required);
}
static void c_rt_unknown_req(const char *p, const struct vhdx_regions *r)
{ (void)r; rt_unknown(p, 1); }
static void c_rt_unknown_opt(const char *p, const struct vhdx_regions *r)
{ (void)r; rt_unknown(p, 0); }
static void c_md_sig(const char *p, const struct vhdx_regions *r)
{ patch(p, r->meta_offset, "metadatX", 8); }
static void c_md_dup(const char *p, const struct vhdx_regions *r)
{ patch(p, r->meta_offset + 32 + 32, vhdx_guid_file_parameters, 16); }
static void c_md_missing(const char *p, const struct vhdx_regions *r)
{ uint8_t n[2] = { 4, 0 }; patch(p, r->meta_offset + 10, n, 2); }
static void c_md_unknown_req(const char *p, const struct vhdx_regions *r)
{ uint8_t g[16]; vhdx_guid_generate(g);
  patch(p, r->meta_offset + 32 + 4 * 32, g, 16); }
static void c_bs_3m(const char *p, const struct vhdx_regions *r)
{ patch32(p, r->meta_offset + META_ITEMS, 3 * MiB); }
static void c_bs_512k(const char *p, const struct vhdx_regions *r)
{ patch32(p, r->meta_offset + META_ITEMS, 512 * 1024); }
static void c_bs_512m(const char *p, const struct vhdx_regions *r)
{ patch32(p, r->meta_offset + META_ITEMS, 512 * MiB); }
static void c_lss_1024(const char *p, const struct vhdx_regions *r)
{ patch32(p, r->meta_offset + META_ITEMS + 32, 1024); }
static void c_pss_1024(const char *p, const struct vhdx_regions *r)
{ patch32(p, r->meta_offset + META_ITEMS + 40, 1024); }
static void c_has_parent(const char *p, const struct vhdx_regions *r)
{ patch32(p, r->meta_offset + META_ITEMS + 4, 2); }
static void c_size_odd(const char *p, const struct vhdx_regions *r)
{ patch64(p, r->meta_offset + META_ITEMS + 8, 16 * MiB - 100); }
static void c_bat_eof(const char *p, const struct vhdx_regions *r)
{ patch64(p, r->bat_offset, vhdx_bat_entry(6, 1ull << 30)); }
static void c_truncated(const char *p, const struct vhdx_regions *r)
{
	struct stat st;

	(void)r;
	ck_assert_int_eq(stat(p, &st), 0);
	ck_assert_int_eq(truncate(p, st.st_size - 4096), 0);
}
static void c_bat_log(const char *p, const struct vhdx_regions *r)
{ patch64(p, r->bat_offset, vhdx_bat_entry(6, MiB)); }
static void c_bat_meta(const char *p, const struct vhdx_regions *r)
{ patch64(p, r->bat_offset, vhdx_bat_entry(6, r->meta_offset)); }
static void c_bat_zero_off(const char *p, const struct vhdx_regions *r)
{ patch64(p, r->bat_offset, vhdx_bat_entry(6, 0)); }
static void c_bat_state7(const char *p, const struct vhdx_regions *r)
{ uint8_t b[8]; peek(p, r->bat_offset, b, 8); b[0] = (b[0] & ~7) | 7;
  patch(p, r->bat_offset, b, 8); }
static void c_bat_state4(const char *p, const struct vhdx_regions *r)
{ patch64(p, r->bat_offset + 8, 4); }
static void c_bat_state5(const char *p, const struct vhdx_regions *r)
{ patch64(p, r->bat_offset + 8, 5); patch64(p, r->bat_offset + 16, 1); }
static void c_bat_alias(const char *p, const struct vhdx_regions *r)
{ uint8_t b[8]; peek(p, r->bat_offset, b, 8);
  patch(p, r->bat_offset + 8, b, 8); }
static void c_bat_reserved(const char *p, const struct vhdx_regions *r)
{ uint8_t b[8]; peek(p, r->bat_offset, b, 8); b[1] |= 0x80;
  patch(p, r->bat_offset, b, 8); }
static void c_log_crc(const char *p, const struct vhdx_regions *r)
{
	uint8_t page[4096];

	peek(p, r->bat_offset, page, sizeof page);
	gen_log(p, page, 3, 0);
	patch32(p, MiB + 64 * 1024 + 4, 1);
}
static void c_log_desc(const char *p, const struct vhdx_regions *r)
{
	uint8_t page[4096];

	peek(p, r->bat_offset, page, sizeof page);
	gen_log(p, page, 3, 0);
	patch(p, MiB + 64 * 1024 + 64, "XXXX", 4);
	fix_crc(p, MiB + 64 * 1024, 8192);
}
static void c_log_flushed(const char *p, const struct vhdx_regions *r)
{
	uint8_t page[4096];

	peek(p, r->bat_offset, page, sizeof page);
	gen_log(p, page, 3, 1ull << 40);
}
static void c_log_tail(const char *p, const struct vhdx_regions *r)
{
	uint8_t page[4096];

	peek(p, r->bat_offset, page, sizeof page);
	vhdx_put_le64(page, 0);         /* would unmap block 0 */
	gen_log(p, page, 3, 0);
	patch32(p, MiB + 64 * 1024 + 12, 128 * 1024);
	fix_crc(p, MiB + 64 * 1024, 8192);
}

static const struct corruption corruptions[] = {
	{ "file signature", c_file_sig, -EINVAL, "not a vhdx image" },
	{ "header 1 checksum", c_hdr1_crc, 0, NULL },
	{ "both header checksums", c_both_crc, -EINVAL, "no valid VHDX header" },
	{ "header version 2", c_version, -EINVAL, "no valid VHDX header" },
	{ "equal sequence", c_equal_seq, -EINVAL, "sequence number" },
	{ "log version", c_log_version, -ENOTSUP, "log version" },
	{ "log offset", c_log_offset, -EINVAL, "log offset" },
	{ "region table 1 checksum", c_rt1_crc, 0, NULL },
	{ "both region table checksums", c_rt_both_crc, -EINVAL, "checksum" },
	{ "region count 2048", c_rt_count, -EINVAL, "2048 entries" },
	{ "no BAT region", c_rt_no_bat, -EINVAL, "no BAT" },
	{ "BAT region twice", c_rt_bat_twice, -EINVAL, "twice" },
	{ "BAT region too small", c_rt_bat_small, -EINVAL, "cannot hold" },
	{ "regions overlap", c_rt_overlap, -EINVAL, "overlap" },
	{ "region over the log", c_rt_log, -EINVAL, "overlaps the log" },
	{ "unknown required region", c_rt_unknown_req, -ENOTSUP,
	  "required but unknown" },
	{ "unknown optional region", c_rt_unknown_opt, 0, NULL },
	{ "metadata signature", c_md_sig, -EINVAL, "metadata table" },
	{ "duplicate metadata item", c_md_dup, -EINVAL, "twice" },
	{ "missing metadata item", c_md_missing, -EINVAL, "has no" },
	{ "unknown required item", c_md_unknown_req, -ENOTSUP,
	  "required but unknown" },
	{ "block size 3M", c_bs_3m, -EINVAL, "block size" },
	{ "block size 512K", c_bs_512k, -EINVAL, "block size" },
	{ "block size 512M", c_bs_512m, -EINVAL, "block size" },
	{ "logical sector 1024", c_lss_1024, -EINVAL, "logical sector size" },
	{ "physical sector 1024", c_pss_1024, -EINVAL,
	  "physical sector size" },
	{ "HasParent without locator", c_has_parent, -EINVAL,
	  "parent locator" },
	{ "size not a sector multiple", c_size_odd, -EINVAL, "multiple" },
	{ "BAT entry past EOF", c_bat_eof, -EINVAL, "end of the file" },
	{ "file truncated in a block", c_truncated, -EINVAL,
	  "end of the file" },
	{ "BAT entry on the log", c_bat_log, -EINVAL, "overlaps the log" },
	{ "BAT entry on the metadata", c_bat_meta, -EINVAL,
	  "metadata region" },
	{ "BAT entry at offset 0", c_bat_zero_off, -EINVAL, "first MiB" },
	{ "BAT state 7", c_bat_state7, -EINVAL, "PARTIALLY_PRESENT" },
	{ "BAT state 4", c_bat_state4, -EINVAL, "reserved state" },
	{ "BAT states 5 and 1", c_bat_state5, 0, NULL },
	{ "two entries, one block", c_bat_alias, -EINVAL, "share" },
	{ "BAT reserved bits", c_bat_reserved, 0, NULL },
	{ "log entry checksum", c_log_crc, 0, NULL },
	{ "log descriptor signature", c_log_desc, -EINVAL, "signature" },
	{ "log FlushedFileOffset", c_log_flushed, -EINVAL, "truncated" },
	{ "log tail outside", c_log_tail, 0, NULL },
};

START_TEST(test_corruptions)
{
	const struct corruption *c = &corruptions[_i];
	uint8_t *b = malloc(MiB), *z = calloc(1, MiB);
	struct vhdx_regions reg;
	struct bm_image *img;
	int r;

	ck_assert_int_eq(create(path, 16 * MiB, "block_size=1M"), 0);
	ck_assert_int_eq(open_img(path, BM_IMAGE_WRITE, &img), 0);
	memset(b, 0x3c, MiB);
	ck_assert_int_eq(io(img, bm_image_write, 0, MiB, b), 0);
	ck_assert_int_eq(io(img, bm_image_write, 3 * MiB, MiB, b), 0);
	bm_image_close(img);
	regions_of(path, &reg);
	c->apply(path, &reg);
	r = open_img(path, 0, &img);
	if (r != c->err)
		ck_abort_msg("%s: open gave %d (%s), expected %d", c->what, r,
			     r ? blockmirror_last_error() : "", c->err);
	if (c->msg && !strstr(blockmirror_last_error(), c->msg))
		ck_abort_msg("%s: message '%s' lacks '%s'", c->what,
			     blockmirror_last_error(), c->msg);
	if (r == 0) {
		/* What opens reads its data: block 0 stays, the states
		 * that read as zeroes do. */
		ck_assert_int_eq(io(img, bm_image_read, 0, MiB, z), 0);
		ck_assert_mem_eq(z, b, MiB);
		ck_assert_int_eq(io(img, bm_image_read, MiB, MiB, z), 0);
		ck_assert(bm_is_zero(z, MiB));
		bm_image_close(img);
	}
	free(b);
	free(z);
}
END_TEST

/* ---- SIGKILL at random moments ---------------------------------------- */

#define CR_SIZE (12u * MiB)
#define CR_PAGE 4096u
#define CR_PAGES (CR_SIZE / CR_PAGE)

struct crash_model {
	uint32_t cur[CR_PAGES];         /* seeds as last written */
	uint32_t durable[CR_PAGES];     /* as of the last completed flush */
	uint8_t dirty[CR_PAGES];        /* written since that flush */
	uint32_t flushes;
};

/* Page content for a seed (0: zeroes); the seed is its first word. */
static void
crash_page(uint8_t *b, uint32_t page, uint32_t seed)
{
	if (!seed) {
		memset(b, 0, CR_PAGE);
		return;
	}
	pattern(b, CR_PAGE, (uint64_t)page * CR_PAGE, seed);
	vhdx_put_le32(b, seed);
}

static void
crash_child(struct crash_model *m, unsigned seed)
{
	struct bm_loop *l;
	struct bm_image *img;
	uint8_t *b = malloc(64 * CR_PAGE);
	uint32_t next = seed * 1000003u + 1;

	srand(seed);
	if (bm_loop_new(32, &l) < 0 ||
	    bm_image_open(l, path, BLOCKMIRROR_FORMAT_VHDX, BM_IMAGE_WRITE,
			  &img) < 0)
		_exit(2);
	for (;;) {
		int op = rand() % 10;
		uint32_t p = (uint32_t)rand() % CR_PAGES;
		uint32_t n = 1 + (uint32_t)rand() % 64;
		struct bm_io x = { .offset = (uint64_t)p * CR_PAGE };

		if (op == 0) {
			if (bm_image_sync(img, bm_image_flush, &x) < 0)
				_exit(3);
			for (uint32_t i = 0; i < CR_PAGES; i++)
				if (m->dirty[i]) {
					m->durable[i] = m->cur[i];
					m->dirty[i] = 0;
				}
			m->flushes++;
			continue;
		}
		n = BM_MIN(n, CR_PAGES - p);
		x.length = (uint64_t)n * CR_PAGE;
		for (uint32_t i = 0; i < n; i++) {
			uint32_t s = op == 1 ? 0 : next++;

			m->dirty[p + i] = 1;
			m->cur[p + i] = s;
			crash_page(b + i * CR_PAGE, p + i, s);
		}
		x.buf = b;
		if (bm_image_sync(img, op == 1 ? bm_image_zero :
				  bm_image_write, &x) < 0)
			_exit(4);
	}
}

/* After the crash: every page not written since the last completed
 * flush holds what it held then.  Returns the seeds found. */
static void
crash_check(struct crash_model *m, unsigned flags, int iter)
{
	struct bm_image *img;
	uint8_t *b = malloc(CR_SIZE), want[CR_PAGE];
	int r = open_img(path, flags, &img);

	if (r < 0)
		ck_abort_msg("iteration %d: open failed: %s", iter,
			     blockmirror_last_error());
	ck_assert_int_eq(io(img, bm_image_read, 0, CR_SIZE, b), 0);
	for (uint32_t i = 0; i < CR_PAGES; i++) {
		uint8_t *got = b + (size_t)i * CR_PAGE;

		if (m->dirty[i])
			continue;
		crash_page(want, i, m->durable[i]);
		if (memcmp(got, want, CR_PAGE) != 0)
			ck_abort_msg("iteration %d: page %u lost its flushed "
				     "content (seed %u)", iter, i,
				     m->durable[i]);
	}
	/* Adopt what is there as the next iteration's starting point:
	 * undecidable pages are rewritten. */
	if (flags & BM_IMAGE_WRITE) {
		for (uint32_t i = 0; i < CR_PAGES; i++) {
			uint8_t *got = b + (size_t)i * CR_PAGE;
			uint32_t s = vhdx_le32(got);

			crash_page(want, i, s);
			if (memcmp(got, want, CR_PAGE) != 0) {
				s = 0;
				ck_assert_int_eq(io(img, bm_image_zero,
						    (uint64_t)i * CR_PAGE,
						    CR_PAGE, NULL), 0);
			}
			m->cur[i] = m->durable[i] = s;
			m->dirty[i] = 0;
		}
		ck_assert_int_eq(io(img, bm_image_flush, 0, 0, NULL), 0);
	}
	bm_image_close(img);
	free(b);
}

START_TEST(test_sigkill)
{
	struct crash_model *m = mmap(NULL, sizeof *m, PROT_READ | PROT_WRITE,
				     MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	unsigned seed = (unsigned)time(NULL);
	int iters = getenv("VHDX_CRASH_ITERATIONS") ?
		    atoi(getenv("VHDX_CRASH_ITERATIONS")) : 60;
	uint32_t flushes = 0;

	ck_assert_ptr_ne(m, MAP_FAILED);
	memset(m, 0, sizeof *m);
	printf("test_sigkill: seed %u\n", seed);
	srand(seed);
	ck_assert_int_eq(create(path, CR_SIZE, "block_size=1M"), 0);
	for (int it = 0; it < iters; it++) {
		unsigned cs = (unsigned)rand();
		struct timespec ts = { 0, (5 + rand() % 120) * 1000000L };
		pid_t pid = fork();
		int status;

		ck_assert_int_ge(pid, 0);
		if (pid == 0)
			crash_child(m, cs);
		nanosleep(&ts, NULL);
		kill(pid, SIGKILL);
		ck_assert_int_eq(waitpid(pid, &status, 0), pid);
		if (!WIFSIGNALED(status))
			ck_abort_msg("iteration %d: writer exited %d", it,
				     WEXITSTATUS(status));
		flushes += m->flushes;
		m->flushes = 0;
		crash_check(m, 0, it);
		crash_check(m, BM_IMAGE_WRITE, it);
	}
	ck_assert_uint_gt(flushes, 0);
	munmap(m, sizeof *m);
}
END_TEST

static Suite *
vhdx_suite(void)
{
	Suite *s = suite_create("vhdx");
	TCase *t = tcase_create("parse");

	tcase_add_test(t, test_crc32c);
	tcase_add_test(t, test_guid);
	tcase_add_test(t, test_header);
	tcase_add_test(t, test_region_table);
	tcase_add_test(t, test_metadata);
	tcase_add_test(t, test_geometry);
	tcase_add_test(t, test_bat_check);
	tcase_add_test(t, test_log_search);
	tcase_add_test(t, test_log_writer);
	suite_add_tcase(s, t);

	t = tcase_create("driver");
	tcase_add_checked_fixture(t, setup, teardown);
	tcase_set_timeout(t, 120);
	tcase_add_test(t, test_roundtrip_dynamic);
	tcase_add_test(t, test_roundtrip_fixed);
	tcase_add_test(t, test_roundtrip_4k);
	tcase_add_test(t, test_create_options);
	tcase_add_test(t, test_guids);
	tcase_add_test(t, test_differencing);
	tcase_add_test(t, test_partially_present);
	tcase_add_test(t, test_log_crash);
	tcase_add_test(t, test_log_generated);
	tcase_add_loop_test(t, test_corruptions, 0,
			    (int)BM_ARRAY_SIZE(corruptions));
	tcase_add_test(t, test_sigkill);
	suite_add_tcase(s, t);
	return s;
}

int
main(void)
{
	return run_suite(vhdx_suite()) ? EXIT_FAILURE : EXIT_SUCCESS;
}
