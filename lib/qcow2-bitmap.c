/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * qcow2 persistent dirty bitmaps, the on-disk part (qcow2.h, the
 * "Bitmaps" sections of the qcow2 specification, docs/qcow2.md): the
 * bitmap directory and bitmap table entries as pure buffer functions.
 *
 * The invariant the parser protects: a directory is used only if every
 * entry checks out and the entries fill it exactly; it is never
 * repaired.  An entry's table must have exactly the size the disk and
 * the granularity give (QEMU refuses any other), be cluster-aligned and
 * lie clear of cluster 0, the directory and every other table, and
 * names are unique (checked sorted: n log n for up to 65535 entries), so
 * the driver may size and read what the directory names without further
 * checks on its arithmetic.  That alone does not make freeing it safe:
 * the parser sees no other structure of the image.  Before the driver
 * reads data or frees anything it checks the whole list against the
 * image itself (qcow2-bitmap-io.c, check_uses).  Entries we could read
 * but not write back faithfully (extra data, unknown flags or types) are
 * refused with -ENOTSUP: rewriting the directory would drop what they
 * hold.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "errors.h"
#include "internal.h"
#include "qcow2.h"

/* An entry, at an 8-byte aligned offset in the directory. */
#define D_TABLE_OFFSET 0
#define D_TABLE_SIZE 8
#define D_FLAGS 12
#define D_TYPE 16
#define D_GRANULARITY 17
#define D_NAME_SIZE 18
#define D_EXTRA_SIZE 20

#define KNOWN_FLAGS (BM_QCOW2_BME_IN_USE | BM_QCOW2_BME_AUTO | \
		     BM_QCOW2_BME_EXTRA_COMPAT)
/* Bitmap table entries: bits 1-8 and 56-63 are reserved. */
#define ENTRY_RESERVED (UINT64_C(0xff000000000001fe))
#define ENTRY_ONES UINT64_C(1)

uint64_t
bm_qcow2_bitmap_table_size(uint64_t size, uint32_t granularity_bits,
			   uint32_t cluster_bits)
{
	uint64_t bits, bytes, n;

	if (granularity_bits > 63 || cluster_bits > 63)
		return 0;
	bits = (size >> granularity_bits) +
	       ((size & ((UINT64_C(1) << granularity_bits) - 1)) != 0);
	bytes = bits / 8 + (bits % 8 != 0);
	n = (bytes >> cluster_bits) +
	    ((bytes & ((UINT64_C(1) << cluster_bits) - 1)) != 0);
	return n > UINT32_MAX ? 0 : n;
}

static uint64_t
entry_size(size_t name_len)
{
	return bm_round_up(BM_QCOW2_BITMAP_ENTRY_FIXED + (uint64_t)name_len,
			   8);
}

uint64_t
bm_qcow2_bitmap_dir_size(const struct bm_qcow2_bitmap *b, uint32_t n)
{
	uint64_t total = 0;

	for (uint32_t i = 0; i < n; i++)
		total += entry_size(strlen(b[i].name));
	return total;
}

void
bm_qcow2_bitmaps_free(struct bm_qcow2_bitmap *b, uint32_t n)
{
	if (!b)
		return;
	for (uint32_t i = 0; i < n; i++)
		free(b[i].name);
	free(b);
}

int
bm_qcow2_bitmap_entry(const char *img, uint64_t e, uint32_t cluster_bits,
		      uint64_t *host, bool *ones)
{
	*host = e & BM_QCOW2_OFFSET_MASK;
	*ones = false;
	if (e & ENTRY_RESERVED)
		return bm_error(-EINVAL, "%s: qcow2 bitmap table entry 0x%016"
				PRIx64 " has reserved bits set", img, e);
	if (*host & ((UINT64_C(1) << cluster_bits) - 1))
		return bm_error(-EINVAL, "%s: qcow2 bitmap data cluster 0x%"
				PRIx64 " is not cluster-aligned", img, *host);
	if (*host && (e & ENTRY_ONES))
		return bm_error(-EINVAL, "%s: qcow2 bitmap table entry 0x%016"
				PRIx64 " has both an offset and the all-ones "
				"bit", img, e);
	*ones = !*host && (e & ENTRY_ONES);
	return 0;
}

void
bm_qcow2_bitmap_ext_encode(uint32_t nb, uint64_t dir_size, uint64_t dir_offset,
			   uint8_t out[24])
{
	bm_put_be32(out, nb);
	bm_put_be32(out + 4, 0);
	bm_put_be64(out + 8, dir_size);
	bm_put_be64(out + 16, dir_offset);
}

static bool
overlaps(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
	return a < b + blen && b < a + alen;
}

/* The rules of one entry's fields (shared by parse and encode). */
static const char *
entry_problem(const struct bm_qcow2_bitmap *b, uint32_t type,
	      const struct bm_qcow2_header *h, int *err)
{
	uint64_t cs = UINT64_C(1) << h->cluster_bits, want;

	*err = -EINVAL;
	if (b->granularity_bits < 9 || b->granularity_bits > 31)
		return "granularity out of range (2^9 to 2^31 bytes)";
	if (!b->table_offset || b->table_offset & (cs - 1) ||
	    b->table_offset > BM_QCOW2_OFFSET_MASK)
		return "bitmap table offset not a cluster's";
	want = bm_qcow2_bitmap_table_size(h->size, b->granularity_bits,
					  h->cluster_bits);
	if (!want || b->table_size != want)
		return "bitmap table size does not match the disk size and "
		       "granularity";
	if (overlaps(b->table_offset, (uint64_t)b->table_size * 8, 0, cs))
		return "bitmap table overlaps the header";
	*err = -ENOTSUP;
	if (type != BM_QCOW2_BITMAP_DIRTY_TRACKING)
		return "unknown bitmap type";
	if (b->flags & ~KNOWN_FLAGS)
		return "unknown bitmap flags";
	return NULL;
}

static int
bad_entry(const char *img, uint32_t i, const char *name, int err,
	  const char *why)
{
	return bm_error(err, "%s: qcow2 bitmap directory entry %" PRIu32
			"%s%.80s%s: %s", img, i, name ? " (" : "",
			name ? name : "", name ? ")" : "", why);
}

static int
parse_entry(const char *img, const struct bm_qcow2_header *h,
	    const uint8_t *p, uint64_t left, uint32_t i,
	    struct bm_qcow2_bitmap *b, uint64_t *used)
{
	uint32_t name_size, extra;
	const char *why;
	int err;

	if (left < BM_QCOW2_BITMAP_ENTRY_FIXED)
		return bad_entry(img, i, NULL, -EINVAL,
				 "runs past the end of the directory");
	b->table_offset = bm_get_be64(p + D_TABLE_OFFSET);
	b->table_size = bm_get_be32(p + D_TABLE_SIZE);
	b->flags = bm_get_be32(p + D_FLAGS);
	b->granularity_bits = p[D_GRANULARITY];
	name_size = bm_get_be16(p + D_NAME_SIZE);
	extra = bm_get_be32(p + D_EXTRA_SIZE);
	if (extra)
		return bad_entry(img, i, NULL, -ENOTSUP, "extra data is not "
				 "supported");
	if (name_size == 0 || name_size > BM_QCOW2_BITMAP_NAME_MAX)
		return bad_entry(img, i, NULL, -EINVAL, "name size out of "
				 "range (1 to 1023 bytes)");
	*used = entry_size(name_size);
	if (*used > left)
		return bad_entry(img, i, NULL, -EINVAL,
				 "runs past the end of the directory");
	b->name = malloc((size_t)name_size + 1);
	if (!b->name)
		return bm_error(-ENOMEM, "%s: out of memory", img);
	memcpy(b->name, p + BM_QCOW2_BITMAP_ENTRY_FIXED, name_size);
	b->name[name_size] = '\0';
	if (strlen(b->name) != name_size)
		return bad_entry(img, i, NULL, -EINVAL, "name holds a NUL "
				 "byte");
	for (uint64_t k = BM_QCOW2_BITMAP_ENTRY_FIXED + name_size; k < *used;
	     k++)
		if (p[k])
			return bad_entry(img, i, b->name, -EINVAL,
					 "padding not zero");
	why = entry_problem(b, p[D_TYPE], h, &err);
	return why ? bad_entry(img, i, b->name, err, why) : 0;
}

static int
cmp_name(const void *a, const void *b)
{
	const struct bm_qcow2_bitmap *const *pa = a, *const *pb = b;
	const struct bm_qcow2_bitmap *x = *pa, *y = *pb;
	int c = strcmp(x->name, y->name);

	return c ? c : (x > y) - (x < y);
}

static int
cmp_table(const void *a, const void *b)
{
	const struct bm_qcow2_bitmap *const *pa = a, *const *pb = b;
	const struct bm_qcow2_bitmap *x = *pa, *y = *pb;

	if (x->table_offset != y->table_offset)
		return x->table_offset < y->table_offset ? -1 : 1;
	return (x > y) - (x < y);
}

/* Of two entries in conflict, the later one in the directory. */
static uint32_t
later(const struct bm_qcow2_bitmap *b, const struct bm_qcow2_bitmap *x,
      const struct bm_qcow2_bitmap *y)
{
	return (uint32_t)((x > y ? x : y) - b);
}

/* Tables clear of the directory and of each other, names unique:
 * sorted, so that a directory of 65535 entries costs n log n, not n^2
 * (sorted by offset, two tables overlap only if neighbours do). */
static int
check_list(const char *img, const struct bm_qcow2_header *h,
	   const struct bm_qcow2_bitmap *b, uint32_t n)
{
	uint64_t cs = UINT64_C(1) << h->cluster_bits;
	uint64_t dlen = bm_round_up(h->bitmaps_dir_size, cs);
	const struct bm_qcow2_bitmap **p;
	const char *why = NULL;
	uint32_t bad = 0;

	for (uint32_t i = 0; i < n; i++)
		if (overlaps(b[i].table_offset,
			     bm_round_up((uint64_t)b[i].table_size * 8, cs),
			     h->bitmaps_dir_offset, dlen))
			return bad_entry(img, i, b[i].name, -EINVAL, "bitmap "
					 "table overlaps the directory");
	p = malloc((n ? n : 1) * sizeof *p);
	if (!p)
		return bm_error(-ENOMEM, "%s: out of memory", img);
	for (uint32_t i = 0; i < n; i++)
		p[i] = &b[i];
	qsort(p, n, sizeof *p, cmp_name);
	for (uint32_t i = 1; !why && i < n; i++)
		if (!strcmp(p[i - 1]->name, p[i]->name)) {
			why = "two bitmaps with one name";
			bad = later(b, p[i - 1], p[i]);
		}
	qsort(p, n, sizeof *p, cmp_table);
	for (uint32_t i = 1; !why && i < n; i++)
		if (overlaps(p[i - 1]->table_offset,
			     bm_round_up((uint64_t)p[i - 1]->table_size * 8,
					 cs),
			     p[i]->table_offset, 1)) {
			why = "bitmap table overlaps the table of another "
			      "bitmap";
			bad = later(b, p[i - 1], p[i]);
		}
	free(p);
	return why ? bad_entry(img, bad, b[bad].name, -EINVAL, why) : 0;
}

int
bm_qcow2_bitmap_dir_parse(const char *img, const struct bm_qcow2_header *h,
			  const uint8_t *buf, size_t len,
			  struct bm_qcow2_bitmap **out)
{
	struct bm_qcow2_bitmap *b;
	uint64_t pos = 0;
	uint32_t n = h->bitmaps_nb;
	int err = 0;

	*out = NULL;
	if (!h->has_bitmaps || n == 0 || n > BM_QCOW2_MAX_BITMAPS ||
	    len != h->bitmaps_dir_size)
		return bm_error(-EINVAL, "%s: qcow2 bitmap directory of %zu "
				"bytes does not match the bitmaps extension",
				img, len);
	b = calloc(n, sizeof *b);
	if (!b)
		return bm_error(-ENOMEM, "%s: out of memory", img);
	for (uint32_t i = 0; i < n && !err; i++) {
		uint64_t used = 0;

		err = parse_entry(img, h, buf + pos, len - pos, i, &b[i],
				  &used);
		pos += used;
	}
	if (!err && pos != len)
		err = bm_error(-EINVAL, "%s: qcow2 bitmap directory holds %"
			       PRIu64 " bytes after its %" PRIu32 " entries",
			       img, (uint64_t)len - pos, n);
	if (!err)
		err = check_list(img, h, b, n);
	if (err) {
		bm_qcow2_bitmaps_free(b, n);
		return err;
	}
	*out = b;
	return 0;
}

int
bm_qcow2_bitmap_dir_encode(const struct bm_qcow2_bitmap *b, uint32_t n,
			   uint8_t *buf, size_t len)
{
	uint64_t pos = 0;

	if (bm_qcow2_bitmap_dir_size(b, n) > len)
		return bm_error(-EINVAL, "qcow2 bitmap directory: %zu bytes "
				"are too few", len);
	memset(buf, 0, len);
	for (uint32_t i = 0; i < n; i++) {
		size_t nl = strlen(b[i].name);
		uint8_t *p = buf + pos;

		if (nl == 0 || nl > BM_QCOW2_BITMAP_NAME_MAX ||
		    b[i].granularity_bits < 9 || b[i].granularity_bits > 31 ||
		    (b[i].flags & ~KNOWN_FLAGS))
			return bm_error(-EINVAL, "qcow2 bitmap directory: "
					"entry %" PRIu32 " would not parse",
					i);
		bm_put_be64(p + D_TABLE_OFFSET, b[i].table_offset);
		bm_put_be32(p + D_TABLE_SIZE, b[i].table_size);
		bm_put_be32(p + D_FLAGS, b[i].flags);
		p[D_TYPE] = BM_QCOW2_BITMAP_DIRTY_TRACKING;
		p[D_GRANULARITY] = (uint8_t)b[i].granularity_bits;
		bm_put_be16(p + D_NAME_SIZE, (uint16_t)nl);
		memcpy(p + BM_QCOW2_BITMAP_ENTRY_FIXED, b[i].name, nl);
		pos += entry_size(nl);
	}
	return 0;
}
