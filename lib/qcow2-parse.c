/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * qcow2 structures as pure functions over buffers (see qcow2.h).
 *
 * The invariant this file holds for the driver: a header that parses
 * has every offset cluster aligned, every table end computable without
 * overflow and within the limits QEMU applies (L1 at most 32 MiB, the
 * refcount table at most 8 MiB), an L1 table that covers the virtual
 * size, and no feature we cannot honour.  Anything else is an error
 * naming the field; "unsupported" (-ENOTSUP) is kept apart from
 * "broken" (-EINVAL) so that callers and users can tell them apart.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <zlib.h>
#include <zstd.h>

#include "errors.h"
#include "internal.h"
#include "qcow2.h"

#define V2_HEADER_LEN 72
#define V3_HEADER_MIN 104
#define V3_HEADER_LEN 112

static int
check_fixed(const char *name, struct bm_qcow2_header *h)
{
	uint64_t cs = UINT64_C(1) << h->cluster_bits;
	uint64_t need, end;

	if (h->crypt_method)
		return bm_error(-ENOTSUP, "%s: encrypted qcow2 images are "
				"not supported (crypt_method %" PRIu32 ")",
				name, h->crypt_method);
	if (h->refcount_order > 6)
		return bm_error(-EINVAL, "%s: qcow2 refcount_order %" PRIu32
				" too large: refcount entries may not exceed "
				"64 bits", name, h->refcount_order);
	if (h->refcount_table_clusters == 0)
		return bm_error(-EINVAL, "%s: qcow2 image has no refcount "
				"table (refcount_table_clusters is 0)", name);
	if ((uint64_t)h->refcount_table_clusters * cs >
	    BM_QCOW2_MAX_REFTABLE_BYTES)
		return bm_error(-EINVAL, "%s: qcow2 refcount table too large "
				"(%" PRIu32 " clusters)", name,
				h->refcount_table_clusters);
	if (h->refcount_table_offset & (cs - 1) ||
	    h->refcount_table_offset == 0 ||
	    bm_add_overflow(h->refcount_table_offset,
			    (uint64_t)h->refcount_table_clusters * cs, &end))
		return bm_error(-EINVAL, "%s: qcow2 refcount table offset "
				"0x%" PRIx64 " invalid", name,
				h->refcount_table_offset);
	if (h->nb_snapshots > BM_QCOW2_MAX_SNAPSHOTS)
		return bm_error(-EINVAL, "%s: qcow2 snapshot table too large "
				"(%" PRIu32 " snapshots)", name,
				h->nb_snapshots);
	if (h->nb_snapshots && (h->snapshots_offset & (cs - 1) ||
				h->snapshots_offset == 0 ||
				h->snapshots_offset > (UINT64_C(1) << 56)))
		return bm_error(-EINVAL, "%s: qcow2 snapshot table offset "
				"0x%" PRIx64 " invalid", name,
				h->snapshots_offset);
	if (!bm_qcow2_l1_entries(h->size, h->cluster_bits, &need))
		return bm_error(-EINVAL, "%s: qcow2 virtual size %" PRIu64
				" too large", name, h->size);
	if ((uint64_t)h->l1_size * 8 > BM_QCOW2_MAX_L1_BYTES ||
	    need * 8 > BM_QCOW2_MAX_L1_BYTES)
		return bm_error(-EINVAL, "%s: qcow2 L1 table too large "
				"(%" PRIu32 " entries for size %" PRIu64 ")",
				name, h->l1_size, h->size);
	if (h->l1_size < need)
		return bm_error(-EINVAL, "%s: qcow2 L1 table is too small "
				"(%" PRIu32 " entries, size %" PRIu64
				" needs %" PRIu64 ")", name, h->l1_size,
				h->size, need);
	if (h->l1_table_offset & (cs - 1) ||
	    (h->l1_size && h->l1_table_offset == 0) ||
	    bm_add_overflow(h->l1_table_offset, (uint64_t)h->l1_size * 8,
			    &end) || end > (UINT64_C(1) << 56))
		return bm_error(-EINVAL, "%s: qcow2 L1 table offset 0x%" PRIx64
				" invalid", name, h->l1_table_offset);
	return 0;
}

static int
check_features(const char *name, const struct bm_qcow2_header *h)
{
	uint64_t unknown = h->incompatible & ~(uint64_t)0x1f;
	char list[256] = "";
	size_t n = 0;

	if (h->incompatible & BM_QCOW2_INCOMPAT_DATA_FILE)
		return bm_error(-ENOTSUP, "%s: qcow2 external data files are "
				"not supported", name);
	if (h->incompatible & BM_QCOW2_INCOMPAT_EXTL2)
		return bm_error(-ENOTSUP, "%s: qcow2 extended L2 entries "
				"(subclusters) are not supported", name);
	if ((h->incompatible & BM_QCOW2_INCOMPAT_COMPRESSION) &&
	    h->compression_type == BM_QCOW2_ZLIB)
		return bm_error(-EINVAL, "%s: qcow2 compression type "
				"incompatible bit set with the zlib (default) "
				"compression type", name);
	if (!(h->incompatible & BM_QCOW2_INCOMPAT_COMPRESSION) &&
	    h->compression_type != BM_QCOW2_ZLIB)
		return bm_error(-EINVAL, "%s: qcow2 compression type %u "
				"without the compression type incompatible "
				"bit", name, h->compression_type);
	if (h->compression_type > BM_QCOW2_ZSTD)
		return bm_error(-ENOTSUP, "%s: unknown qcow2 compression "
				"type %u", name, h->compression_type);
	if (!unknown)
		return 0;
	for (unsigned bit = 5; bit < 64 && n < sizeof list - 64; bit++) {
		if (!(unknown & (UINT64_C(1) << bit)))
			continue;
		if (h->feature_names[0][bit][0])
			n += (size_t)snprintf(list + n, sizeof list - n,
					      "%s%s", n ? ", " : "",
					      h->feature_names[0][bit]);
		else
			n += (size_t)snprintf(list + n, sizeof list - n,
					      "%sunknown incompatible bit %u",
					      n ? ", " : "", bit);
	}
	return bm_error(-ENOTSUP, "%s: unsupported qcow2 feature(s): %s",
			name, list);
}

static int
keep_ext(const char *name, struct bm_qcow2_header *h, const uint8_t *p,
	 uint32_t total)
{
	uint8_t *n = realloc(h->kept_exts, (size_t)h->kept_exts_len + total);

	if (!n)
		return bm_error(-ENOMEM, "%s: out of memory", name);
	memcpy(n + h->kept_exts_len, p, total);
	h->kept_exts = n;
	h->kept_exts_len += total;
	return 0;
}

static int
parse_ext(const char *name, struct bm_qcow2_header *h, uint32_t type,
	  const uint8_t *data, uint32_t len, const uint8_t *whole,
	  uint32_t total)
{
	uint64_t cs = UINT64_C(1) << h->cluster_bits;

	switch (type) {
	case BM_QCOW2_EXT_BACKING_FORMAT:
		if (len >= sizeof h->backing_format)
			return bm_error(-EINVAL, "%s: qcow2 backing format "
					"name too long (%" PRIu32 " bytes)",
					name, len);
		memcpy(h->backing_format, data, len);
		h->backing_format[len] = 0;
		if (strlen(h->backing_format) != len)
			return bm_error(-EINVAL, "%s: qcow2 backing format "
					"name holds a NUL byte", name);
		return 0;
	case BM_QCOW2_EXT_FEATURE_NAMES:
		h->has_feature_names = true;
		for (uint32_t i = 0; i + 48 <= len; i += 48) {
			uint8_t t = data[i], bit = data[i + 1];

			if (t < 3 && bit < 64) {
				memcpy(h->feature_names[t][bit], data + i + 2,
				       46);
				h->feature_names[t][bit][46] = 0;
			}
		}
		return 0;
	case BM_QCOW2_EXT_BITMAPS: {
		uint64_t dir_off, dir_size;
		uint32_t nb;

		if (len != 24)
			return bm_error(-EINVAL, "%s: qcow2 bitmaps extension "
					"of %" PRIu32 " bytes, not 24", name,
					len);
		nb = bm_get_be32(data);
		if (nb == 0)
			return bm_error(-EINVAL, "%s: qcow2 bitmaps extension "
					"with zero bitmaps", name);
		if (nb > BM_QCOW2_MAX_BITMAPS)
			return bm_error(-EINVAL, "%s: qcow2 bitmaps extension "
					"with %" PRIu32 " bitmaps (at most "
					"65535)", name, nb);
		dir_off = bm_get_be64(data + 16);
		if (dir_off & (cs - 1) || dir_off == 0 ||
		    dir_off > BM_QCOW2_OFFSET_MASK)
			return bm_error(-EINVAL, "%s: qcow2 bitmaps extension: "
					"invalid bitmap directory offset "
					"0x%" PRIx64, name, dir_off);
		if (bm_get_be32(data + 4))
			return bm_error(-EINVAL, "%s: qcow2 bitmaps extension: "
					"reserved field set", name);
		dir_size = bm_get_be64(data + 8);
		if (dir_size < (uint64_t)nb * BM_QCOW2_BITMAP_ENTRY_FIXED ||
		    dir_size > BM_QCOW2_MAX_BITMAP_DIR)
			return bm_error(-EINVAL, "%s: qcow2 bitmaps extension: "
					"bitmap directory of %" PRIu64 " bytes "
					"for %" PRIu32 " bitmaps", name,
					dir_size, nb);
		h->has_bitmaps = true;
		h->bitmaps_nb = nb;
		h->bitmaps_dir_size = dir_size;
		h->bitmaps_dir_offset = dir_off;
		return keep_ext(name, h, whole, total);
	}
	case BM_QCOW2_EXT_CRYPTO:
		return bm_error(-ENOTSUP, "%s: encrypted qcow2 images are not "
				"supported (encryption header extension)",
				name);
	case BM_QCOW2_EXT_DATA_FILE:
		return bm_error(-ENOTSUP, "%s: qcow2 external data files are "
				"not supported", name);
	default:
		return keep_ext(name, h, whole, total);
	}
}

/* Walk the extension list in buf[start, end). */
static int
parse_exts(const char *name, struct bm_qcow2_header *h, const uint8_t *buf,
	   uint64_t start, uint64_t end)
{
	uint32_t seen[32];
	unsigned nseen = 0;
	uint64_t pos = start;

	for (;;) {
		uint32_t type, len, total;
		int err;

		if (pos + 8 > end)
			return bm_error(-EINVAL, "%s: qcow2 header extensions "
					"run past the end of the header area "
					"(0x%" PRIx64 ")", name, end);
		type = bm_get_be32(buf + pos);
		len = bm_get_be32(buf + pos + 4);
		if (type == BM_QCOW2_EXT_END) {
			h->ext_end_pos = (uint32_t)pos;
			return 0;
		}
		if (len > end - pos - 8)
			return bm_error(-EINVAL, "%s: qcow2 header extension "
					"0x%08" PRIx32 " too large (%" PRIu32
					" bytes)", name, type, len);
		total = (uint32_t)BM_MIN(bm_round_up((uint64_t)len + 8, 8),
					 end - pos);
		for (unsigned i = 0; i < nseen; i++)
			if (seen[i] == type)
				return bm_error(-EINVAL, "%s: qcow2 header "
						"extension 0x%08" PRIx32
						" appears twice", name, type);
		if (nseen == BM_ARRAY_SIZE(seen))
			return bm_error(-EINVAL, "%s: too many qcow2 header "
					"extensions", name);
		seen[nseen++] = type;
		err = parse_ext(name, h, type, buf + pos + 8, len, buf + pos,
				total);
		if (err)
			return err;
		if (type == BM_QCOW2_EXT_BITMAPS)
			h->bitmaps_ext_pos = (uint32_t)pos;
		pos += total;
	}
}

static int
parse_v3_fields(const char *name, struct bm_qcow2_header *h,
		const uint8_t *buf, uint64_t cs, size_t len)
{
	h->incompatible = bm_get_be64(buf + 72);
	h->compatible = bm_get_be64(buf + 80);
	h->autoclear = bm_get_be64(buf + 88);
	h->refcount_order = bm_get_be32(buf + 96);
	h->header_length = bm_get_be32(buf + 100);
	if (h->header_length < V3_HEADER_MIN)
		return bm_error(-EINVAL, "%s: qcow2 header too short "
				"(header_length %" PRIu32 ")", name,
				h->header_length);
	if (h->header_length > cs)
		return bm_error(-EINVAL, "%s: qcow2 header exceeds cluster "
				"size (header_length %" PRIu32 ")", name,
				h->header_length);
	if (h->header_length % 8)
		return bm_error(-EINVAL, "%s: qcow2 header_length %" PRIu32
				" is not a multiple of 8", name,
				h->header_length);
	if (h->header_length > len)
		return bm_error(-EINVAL, "%s: qcow2 header truncated", name);
	if (h->header_length > V3_HEADER_MIN)
		h->compression_type = buf[V3_HEADER_MIN];
	if (h->header_length > V3_HEADER_MIN + 1) {
		h->extra_fields_len = h->header_length - V3_HEADER_MIN - 1;
		h->extra_fields = malloc(h->extra_fields_len);
		if (!h->extra_fields)
			return bm_error(-ENOMEM, "%s: out of memory", name);
		memcpy(h->extra_fields, buf + V3_HEADER_MIN + 1,
		       h->extra_fields_len);
	}
	return 0;
}

static int
parse_backing(const char *name, struct bm_qcow2_header *h, const uint8_t *buf,
	      uint64_t off, uint32_t size, uint64_t limit)
{
	if (size > BM_QCOW2_MAX_BACKING_NAME)
		return bm_error(-EINVAL, "%s: qcow2 backing file name too "
				"long (%" PRIu32 " bytes)", name, size);
	if (off < h->header_length || off + size > limit)
		return bm_error(-EINVAL, "%s: invalid qcow2 backing file "
				"offset 0x%" PRIx64 " (size %" PRIu32 ")",
				name, off, size);
	if (size == 0)
		return bm_error(-EINVAL, "%s: qcow2 backing file name is "
				"empty", name);
	h->backing_name = malloc((size_t)size + 1);
	if (!h->backing_name)
		return bm_error(-ENOMEM, "%s: out of memory", name);
	memcpy(h->backing_name, buf + off, size);
	h->backing_name[size] = 0;
	if (strlen(h->backing_name) != size)
		return bm_error(-EINVAL, "%s: qcow2 backing file name holds a "
				"NUL byte", name);
	return 0;
}

static int
parse_header(const char *name, const uint8_t *buf, size_t len,
	     struct bm_qcow2_header *h)
{
	uint64_t cs, limit, backing_off, ext_end;
	uint32_t backing_size;
	int err;

	if (len < V2_HEADER_LEN)
		return bm_error(-EINVAL, "%s: too short for a qcow2 image "
				"(%zu bytes)", name, len);
	if (bm_get_be32(buf) != BM_QCOW2_MAGIC)
		return bm_error(-EINVAL, "%s: not a qcow2 image (bad magic)",
				name);
	h->version = bm_get_be32(buf + 4);
	if (h->version != 2 && h->version != 3)
		return bm_error(-ENOTSUP, "%s: unsupported qcow2 version %"
				PRIu32, name, h->version);
	h->cluster_bits = bm_get_be32(buf + 20);
	if (h->cluster_bits < BM_QCOW2_MIN_CLUSTER_BITS ||
	    h->cluster_bits > BM_QCOW2_MAX_CLUSTER_BITS)
		return bm_error(-EINVAL, "%s: unsupported qcow2 cluster size "
				"2^%" PRIu32, name, h->cluster_bits);
	cs = UINT64_C(1) << h->cluster_bits;
	limit = BM_MIN((uint64_t)len, cs);
	backing_off = bm_get_be64(buf + 8);
	backing_size = bm_get_be32(buf + 16);
	h->size = bm_get_be64(buf + 24);
	h->crypt_method = bm_get_be32(buf + 32);
	h->l1_size = bm_get_be32(buf + 36);
	h->l1_table_offset = bm_get_be64(buf + 40);
	h->refcount_table_offset = bm_get_be64(buf + 48);
	h->refcount_table_clusters = bm_get_be32(buf + 56);
	h->nb_snapshots = bm_get_be32(buf + 60);
	h->snapshots_offset = bm_get_be64(buf + 64);
	if (h->version == 2) {
		h->refcount_order = 4;
		h->header_length = V2_HEADER_LEN;
	} else {
		if (len < V3_HEADER_MIN)
			return bm_error(-EINVAL, "%s: qcow2 header truncated",
					name);
		err = parse_v3_fields(name, h, buf, cs, len);
		if (err)
			return err;
	}
	if (h->header_length > limit)
		return bm_error(-EINVAL, "%s: qcow2 header truncated", name);
	if (backing_off > cs)
		return bm_error(-EINVAL, "%s: invalid qcow2 backing file "
				"offset 0x%" PRIx64, name, backing_off);
	err = check_fixed(name, h);
	if (err)
		return err;
	/* Version 2 images may have extensions too (QEMU writes them). */
	/* The extensions end where the backing name starts, and never
	 * past the bytes we were given. */
	ext_end = backing_off ? BM_MIN(backing_off, limit) : limit;
	if (h->header_length + 8 <= ext_end) {
		err = parse_exts(name, h, buf, h->header_length, ext_end);
		if (err)
			return err;
	}
	err = check_features(name, h);
	if (err)
		return err;
	h->backing_offset = backing_off;
	h->backing_size = backing_off ? backing_size : 0;
	if (backing_off)
		return parse_backing(name, h, buf, backing_off, backing_size,
				     limit);
	return 0;
}

int
bm_qcow2_header_parse(const char *name, const uint8_t *buf, size_t len,
		      struct bm_qcow2_header *h)
{
	int err;

	memset(h, 0, sizeof *h);
	err = parse_header(name, buf, len, h);
	if (err)
		bm_qcow2_header_free(h);
	return err;
}

void
bm_qcow2_header_free(struct bm_qcow2_header *h)
{
	free(h->extra_fields);
	free(h->backing_name);
	free(h->kept_exts);
	h->extra_fields = NULL;
	h->backing_name = NULL;
	h->kept_exts = NULL;
	h->extra_fields_len = h->kept_exts_len = 0;
}

/* ---- writing -------------------------------------------------------- */

static const struct {
	uint8_t type, bit;
	const char *name;
} our_features[] = {
	{ 0, 0, "dirty bit" },
	{ 0, 1, "corrupt bit" },
	{ 0, 2, "external data file" },
	{ 0, 3, "compression type" },
	{ 0, 4, "extended L2 entries" },
	{ 1, 0, "lazy refcounts" },
	{ 2, 0, "bitmaps" },
	{ 2, 1, "raw external data" },
};

static size_t
put_ext(uint8_t *p, uint32_t type, const void *data, uint32_t len)
{
	bm_put_be32(p, type);
	bm_put_be32(p + 4, len);
	memcpy(p + 8, data, len);
	return (size_t)bm_round_up((uint64_t)len + 8, 8);
}

int
bm_qcow2_header_serialize(const struct bm_qcow2_header *h, uint8_t *buf,
			  size_t len, bool feature_table)
{
	uint32_t hlen = BM_MAX(h->header_length, (uint32_t)V3_HEADER_LEN);
	size_t fmt_len = strlen(h->backing_format);
	size_t name_len = h->backing_name ? strlen(h->backing_name) : 0;
	size_t need = hlen + (fmt_len ? 8 + bm_round_up(fmt_len, 8) : 0) +
		      (feature_table ? 8 + 48 * BM_ARRAY_SIZE(our_features) :
				       0) +
		      h->kept_exts_len + 8 + name_len;
	size_t pos;

	if (need > len || name_len > BM_QCOW2_MAX_BACKING_NAME)
		return -ENOSPC;
	memset(buf, 0, len);
	bm_put_be32(buf, BM_QCOW2_MAGIC);
	bm_put_be32(buf + 4, 3);
	bm_put_be32(buf + 20, h->cluster_bits);
	bm_put_be64(buf + 24, h->size);
	bm_put_be32(buf + 32, h->crypt_method);
	bm_put_be32(buf + 36, h->l1_size);
	bm_put_be64(buf + 40, h->l1_table_offset);
	bm_put_be64(buf + 48, h->refcount_table_offset);
	bm_put_be32(buf + 56, h->refcount_table_clusters);
	bm_put_be32(buf + 60, h->nb_snapshots);
	bm_put_be64(buf + 64, h->snapshots_offset);
	bm_put_be64(buf + 72, h->incompatible);
	bm_put_be64(buf + 80, h->compatible);
	bm_put_be64(buf + 88, h->autoclear);
	bm_put_be32(buf + 96, h->refcount_order);
	bm_put_be32(buf + 100, hlen);
	buf[V3_HEADER_MIN] = h->compression_type;
	if (h->extra_fields_len)
		memcpy(buf + V3_HEADER_MIN + 1, h->extra_fields,
		       BM_MIN(h->extra_fields_len, hlen - V3_HEADER_MIN - 1));
	pos = hlen;
	if (fmt_len)
		pos += put_ext(buf + pos, BM_QCOW2_EXT_BACKING_FORMAT,
			       h->backing_format, (uint32_t)fmt_len);
	if (feature_table) {
		uint8_t *p = buf + pos + 8;

		bm_put_be32(buf + pos, BM_QCOW2_EXT_FEATURE_NAMES);
		bm_put_be32(buf + pos + 4,
			    (uint32_t)(48 * BM_ARRAY_SIZE(our_features)));
		for (size_t i = 0; i < BM_ARRAY_SIZE(our_features); i++) {
			p[48 * i] = our_features[i].type;
			p[48 * i + 1] = our_features[i].bit;
			memcpy(p + 48 * i + 2, our_features[i].name,
			       strlen(our_features[i].name));
		}
		pos += 8 + 48 * BM_ARRAY_SIZE(our_features);
	}
	if (h->kept_exts_len)
		memcpy(buf + pos, h->kept_exts, h->kept_exts_len);
	pos += h->kept_exts_len;
	pos += 8; /* end marker: zeroes */
	if (name_len) {
		memcpy(buf + pos, h->backing_name, name_len);
		bm_put_be64(buf + 8, pos);
		bm_put_be32(buf + 16, (uint32_t)name_len);
	}
	return 0;
}

bool
bm_qcow2_l1_entries(uint64_t size, uint32_t cluster_bits, uint64_t *out)
{
	uint64_t cs = UINT64_C(1) << cluster_bits;
	uint64_t per_l2 = cs / 8, clusters;

	if (size > (UINT64_C(1) << 62))
		return false;
	clusters = (size + cs - 1) >> cluster_bits;
	*out = (clusters + per_l2 - 1) / per_l2;
	return true;
}

/* ---- entries -------------------------------------------------------- */

int
bm_qcow2_l2_decode(const char *name, uint64_t entry, uint32_t cluster_bits,
		   uint32_t version, struct bm_qcow2_l2 *out,
		   uint64_t l2_offset, uint64_t index)
{
	uint64_t cs = UINT64_C(1) << cluster_bits;

	memset(out, 0, sizeof *out);
	if (entry & BM_QCOW2_FLAG_COMPRESSED) {
		unsigned shift = 62 - (cluster_bits - 8);
		uint64_t sectors = ((entry >> shift) &
				    ((UINT64_C(1) << (cluster_bits - 8)) - 1)) +
				   1;

		out->kind = BM_QCOW2_COMPRESSED;
		out->host = entry & ((UINT64_C(1) << shift) - 1);
		out->csize = sectors * 512 - (out->host & 511);
		return 0;
	}
	out->copied = !!(entry & BM_QCOW2_FLAG_COPIED);
	out->host = entry & BM_QCOW2_OFFSET_MASK;
	if (out->host & (cs - 1))
		return bm_error(-EIO, "%s: corrupt qcow2 image: data cluster "
				"offset 0x%" PRIx64 " unaligned (L2 table "
				"0x%" PRIx64 ", index %" PRIu64 ")", name,
				out->host, l2_offset, index);
	if (entry & BM_QCOW2_FLAG_ZERO) {
		if (version < 3)
			return bm_error(-EIO, "%s: corrupt qcow2 image: zero "
					"cluster entry in a version 2 image "
					"(L2 table 0x%" PRIx64 ", index %"
					PRIu64 ")", name, l2_offset, index);
		out->kind = out->host ? BM_QCOW2_ZERO_ALLOC
				      : BM_QCOW2_ZERO_PLAIN;
	} else {
		out->kind = out->host ? BM_QCOW2_NORMAL : BM_QCOW2_UNALLOCATED;
	}
	return 0;
}

void
bm_qcow2_compressed_span(const struct bm_qcow2_l2 *e, uint32_t cluster_bits,
			 uint64_t *first, uint64_t *count)
{
	uint64_t start = e->host & ~(uint64_t)511;
	uint64_t end = e->host + e->csize - 1;

	*first = start >> cluster_bits;
	*count = (end >> cluster_bits) - *first + 1;
}

static int
inflate_zlib(const uint8_t *in, size_t in_len, uint8_t *out, size_t cs)
{
	z_stream s;
	int ret;

	memset(&s, 0, sizeof s);
	if (inflateInit2(&s, -12) != Z_OK)
		return -EIO;
	s.next_in = (Bytef *)(uintptr_t)in;
	s.avail_in = (uInt)in_len;
	s.next_out = out;
	s.avail_out = (uInt)cs;
	ret = inflate(&s, Z_FINISH);
	inflateEnd(&s);
	if ((ret == Z_STREAM_END || ret == Z_BUF_ERROR) && s.avail_out == 0)
		return 0;
	return -EIO;
}

static int
inflate_zstd(const uint8_t *in, size_t in_len, uint8_t *out, size_t cs)
{
	ZSTD_DCtx *d = ZSTD_createDCtx();
	ZSTD_inBuffer ib = { in, in_len, 0 };
	ZSTD_outBuffer ob = { out, cs, 0 };
	int err = -EIO;

	if (!d)
		return -ENOMEM;
	while (ob.pos < ob.size && ib.pos < ib.size) {
		size_t r = ZSTD_decompressStream(d, &ob, &ib);

		if (ZSTD_isError(r))
			goto out;
		if (r == 0)
			break;
	}
	if (ob.pos == ob.size)
		err = 0;
out:
	ZSTD_freeDCtx(d);
	return err;
}

int
bm_qcow2_decompress(enum bm_qcow2_compression type, const uint8_t *in,
		    size_t in_len, uint8_t *out, size_t cluster_size)
{
	if (type == BM_QCOW2_ZSTD)
		return inflate_zstd(in, in_len, out, cluster_size);
	return inflate_zlib(in, in_len, out, cluster_size);
}

long
bm_qcow2_compress(enum bm_qcow2_compression type, const uint8_t *in,
		  size_t len, uint8_t *out, size_t out_len)
{
	if (type == BM_QCOW2_ZSTD) {
		size_t r = ZSTD_compress(out, out_len, in, len, 1);

		return ZSTD_isError(r) ? -EIO : (long)r;
	}
	z_stream s;
	long n;

	memset(&s, 0, sizeof s);
	if (deflateInit2(&s, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9,
			 Z_DEFAULT_STRATEGY) != Z_OK)
		return -EIO;
	s.next_in = (Bytef *)(uintptr_t)in;
	s.avail_in = (uInt)len;
	s.next_out = out;
	s.avail_out = (uInt)out_len;
	n = deflate(&s, Z_FINISH) == Z_STREAM_END ? (long)s.total_out : -EIO;
	deflateEnd(&s);
	return n;
}

/* ---- refcounts ------------------------------------------------------ */

uint64_t
bm_qcow2_refcount_get(const uint8_t *block, uint32_t order, uint64_t i)
{
	unsigned bits = 1u << order;

	if (bits < 8) {
		unsigned shift = (unsigned)(i * bits) & 7;

		return (block[i * bits / 8] >> shift) & ((1u << bits) - 1);
	}
	switch (bits) {
	case 8:
		return block[i];
	case 16:
		return bm_get_be16(block + i * 2);
	case 32:
		return bm_get_be32(block + i * 4);
	default:
		return bm_get_be64(block + i * 8);
	}
}

void
bm_qcow2_refcount_set(uint8_t *block, uint32_t order, uint64_t i,
		      uint64_t value)
{
	unsigned bits = 1u << order;

	if (bits < 8) {
		unsigned shift = (unsigned)(i * bits) & 7;
		unsigned mask = ((1u << bits) - 1) << shift;
		uint8_t *b = &block[i * bits / 8];

		*b = (uint8_t)((*b & ~mask) | (((unsigned)value << shift) & mask));
		return;
	}
	switch (bits) {
	case 8:
		block[i] = (uint8_t)value;
		break;
	case 16:
		bm_put_be16(block + i * 2, (uint16_t)value);
		break;
	case 32:
		bm_put_be32(block + i * 4, (uint32_t)value);
		break;
	default:
		bm_put_be64(block + i * 8, value);
		break;
	}
}

/* ---- changing the backing file name (docs/chains.md) ----------------- */

int
bm_qcow2_backing_plan(const char *img, const uint8_t *buf, size_t len,
		      uint32_t header_length, const char *name,
		      const char *format, uint64_t *name_off,
		      uint8_t sector[BM_QCOW2_SECTOR])
{
	uint64_t old_off = bm_get_be64(buf + 8);
	uint32_t old_len = bm_get_be32(buf + 16);
	uint64_t limit = old_off ? BM_MIN(old_off, (uint64_t)len) : len;
	uint64_t pos = header_length;
	uint64_t ext_end = 0, fmt_pos = 0, new_len = strlen(name);
	uint32_t fmt_len = 0;

	if (len < BM_QCOW2_SECTOR || old_off > len ||
	    old_len > len - old_off || new_len == 0 ||
	    new_len > BM_QCOW2_MAX_BACKING_NAME)
		return bm_error(-EINVAL, "%s: cannot change the qcow2 backing "
				"file name (bad header or name)", img);
	while (pos + 8 <= limit) {
		uint32_t type = bm_get_be32(buf + pos);
		uint32_t elen = bm_get_be32(buf + pos + 4);

		if (type == BM_QCOW2_EXT_END) {
			ext_end = pos + 8;
			break;
		}
		if (type == BM_QCOW2_EXT_BACKING_FORMAT) {
			fmt_pos = pos;
			fmt_len = elen;
		}
		if (elen > limit - pos - 8)
			break;
		pos += bm_round_up((uint64_t)elen + 8, 8);
	}
	if (!ext_end)
		return bm_error(-EINVAL, "%s: qcow2 header extensions have no "
				"end marker", img);

	/* Step 1's place: right after the extensions if the old name is not
	 * in the way, else right after the old name. */
	if (!old_off || ext_end + new_len <= old_off)
		*name_off = ext_end;
	else if (old_off + old_len + new_len <= len)
		*name_off = old_off + old_len;
	else
		return bm_error(-ENOSPC, "%s: no room in the qcow2 header for "
				"the backing file name '%s' beside the old one",
				img, name);

	memcpy(sector, buf, BM_QCOW2_SECTOR);
	bm_put_be64(sector + 8, *name_off);
	bm_put_be32(sector + 16, (uint32_t)new_len);
	if (*name_off < BM_QCOW2_SECTOR)
		memcpy(sector + *name_off, name,
		       BM_MIN(new_len, BM_QCOW2_SECTOR - *name_off));
	if (format && *format &&
	    !(fmt_pos && fmt_len == strlen(format) &&
	      memcmp(buf + fmt_pos + 8, format, fmt_len) == 0)) {
		size_t flen = strlen(format);
		uint64_t slot = bm_round_up((uint64_t)fmt_len, 8);

		if (!fmt_pos || flen >= 16 || bm_round_up(flen, 8) != slot ||
		    fmt_pos + 8 + slot > BM_QCOW2_SECTOR)
			return bm_error(-ENOTSUP, "%s: cannot record backing "
					"format '%s' in place (the image's "
					"backing format extension does not "
					"fit)", img, format);
		bm_put_be32(sector + fmt_pos + 4, (uint32_t)flen);
		memset(sector + fmt_pos + 8, 0, slot);
		memcpy(sector + fmt_pos + 8, format, flen);
	}
	return 0;
}
