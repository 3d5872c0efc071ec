/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * VHDX structures in memory: decode-and-validate and encode for the
 * headers, region table, metadata (with the parent locator), the BAT
 * and log entries.  See vhdx.h.
 *
 * The rule for every decoder: a value read from the file is used only
 * after it has been checked against the bounds of what holds it, and
 * the first violation ends the decode with a message that names the
 * image, the structure and the field.  Nothing here allocates except
 * the parent locator strings and the BAT check's scratch array.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <uuid/uuid.h>

#include "crc32c.h"
#include "errors.h"
#include "internal.h"
#include "vhdx.h"

#define SIG_HEAD 0x64616568u     /* "head" */
#define SIG_REGI 0x69676572u     /* "regi" */
#define SIG_LOGE 0x65676f6cu     /* "loge" */
#define SIG_ZERO 0x6f72657au     /* "zero" */
#define SIG_DESC 0x63736564u     /* "desc" */
#define SIG_DATA 0x61746164u     /* "data" */

/* A GUID written as in its text form, laid out as the file holds it. */
#define GUID(d1, d2, d3, a, b, c, d, e, f, g, h) { \
	(d1) & 0xff, (d1) >> 8 & 0xff, (d1) >> 16 & 0xff, (d1) >> 24 & 0xff, \
	(d2) & 0xff, (d2) >> 8 & 0xff, (d3) & 0xff, (d3) >> 8 & 0xff, \
	a, b, c, d, e, f, g, h }

const uint8_t vhdx_guid_bat[16] = GUID(0x2dc27766, 0xf623, 0x4200,
	0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08);
const uint8_t vhdx_guid_metadata[16] = GUID(0x8b7ca206, 0x4790, 0x4b9a,
	0xb8, 0xfe, 0x57, 0x5f, 0x05, 0x0f, 0x88, 0x6e);
const uint8_t vhdx_guid_file_parameters[16] = GUID(0xcaa16737, 0xfa36,
	0x4d43, 0xb3, 0xb6, 0x33, 0xf0, 0xaa, 0x44, 0xe7, 0x6b);
const uint8_t vhdx_guid_virtual_disk_size[16] = GUID(0x2fa54224, 0xcd1b,
	0x4876, 0xb2, 0x11, 0x5d, 0xbe, 0xd8, 0x3b, 0xf4, 0xb8);
const uint8_t vhdx_guid_page83[16] = GUID(0xbeca12ab, 0xb2e6, 0x4523,
	0x93, 0xef, 0xc3, 0x09, 0xe0, 0x00, 0xc7, 0x46);
const uint8_t vhdx_guid_logical_sector[16] = GUID(0x8141bf1d, 0xa96f,
	0x4709, 0xba, 0x47, 0xf2, 0x33, 0xa8, 0xfa, 0xab, 0x5f);
const uint8_t vhdx_guid_physical_sector[16] = GUID(0xcda348c7, 0x445d,
	0x4471, 0x9c, 0xc9, 0xe9, 0x88, 0x52, 0x51, 0xc5, 0x56);
const uint8_t vhdx_guid_parent_locator[16] = GUID(0xa8d35f2d, 0xb30b,
	0x454d, 0xab, 0xf7, 0xd3, 0xd8, 0x48, 0x34, 0xab, 0x0c);
const uint8_t vhdx_guid_locator_type[16] = GUID(0xb04aefb7, 0xd19e,
	0x4a81, 0xb7, 0x89, 0x25, 0xb8, 0xe9, 0x44, 0x59, 0x13);

/* ---- GUIDs ------------------------------------------------------------ */

bool
vhdx_guid_is_zero(const uint8_t g[16])
{
	for (int i = 0; i < 16; i++)
		if (g[i])
			return false;
	return true;
}

/* Text order (RFC 4122, big-endian fields) <-> file order: swap the
 * first three fields.  The operation is its own inverse. */
static void
guid_swap(const uint8_t in[16], uint8_t out[16])
{
	static const int map[16] = { 3, 2, 1, 0, 5, 4, 7, 6,
				     8, 9, 10, 11, 12, 13, 14, 15 };

	for (int i = 0; i < 16; i++)
		out[i] = in[map[i]];
}

void
vhdx_guid_generate(uint8_t g[16])
{
	uuid_t u;

	uuid_generate_random(u);
	guid_swap(u, g);
}

void
vhdx_guid_format(const uint8_t g[16], char out[39])
{
	uuid_t u;

	guid_swap(g, u);
	out[0] = '{';
	uuid_unparse_lower(u, out + 1);
	out[37] = '}';
	out[38] = '\0';
}

int
vhdx_guid_parse(const char *s, uint8_t g[16])
{
	char buf[37];
	size_t n = strlen(s);
	uuid_t u;

	if (n == 38 && s[0] == '{' && s[37] == '}') {
		s++;
		n = 36;
	}
	if (n != 36)
		return -EINVAL;
	memcpy(buf, s, 36);
	buf[36] = '\0';
	if (uuid_parse(buf, u) < 0)
		return -EINVAL;
	guid_swap(u, g);
	return 0;
}

/* ---- checksums -------------------------------------------------------- */

/* CRC-32C of buf[0, len) with the 4-byte field at csum_off taken as 0. */
static uint32_t
crc_with_hole(const uint8_t *buf, size_t len, size_t csum_off)
{
	static const uint8_t zero[4];
	uint32_t c;

	c = bm_crc32c(0, buf, csum_off);
	c = bm_crc32c(c, zero, 4);
	return bm_crc32c(c, buf + csum_off + 4, len - csum_off - 4);
}

/* ---- headers ---------------------------------------------------------- */

int
vhdx_header_decode(const uint8_t *buf, struct vhdx_header *h,
		   const char **why)
{
	if (vhdx_le32(buf) != SIG_HEAD) {
		*why = "bad signature";
		return -EINVAL;
	}
	if (vhdx_le32(buf + 4) != crc_with_hole(buf, VHDX_HEADER_SIZE, 4)) {
		*why = "bad checksum";
		return -EINVAL;
	}
	h->seq = vhdx_le64(buf + 8);
	memcpy(h->file_write_guid, buf + 16, 16);
	memcpy(h->data_write_guid, buf + 32, 16);
	memcpy(h->log_guid, buf + 48, 16);
	h->log_version = vhdx_le16(buf + 64);
	h->version = vhdx_le16(buf + 66);
	h->log_length = vhdx_le32(buf + 68);
	h->log_offset = vhdx_le64(buf + 72);
	if (h->version != 1) {
		*why = "unsupported version";
		return -EINVAL;
	}
	*why = NULL;
	return 0;
}

void
vhdx_header_encode(const struct vhdx_header *h, uint8_t *buf)
{
	memset(buf, 0, VHDX_HEADER_SIZE);
	vhdx_put_le32(buf, SIG_HEAD);
	vhdx_put_le64(buf + 8, h->seq);
	memcpy(buf + 16, h->file_write_guid, 16);
	memcpy(buf + 32, h->data_write_guid, 16);
	memcpy(buf + 48, h->log_guid, 16);
	vhdx_put_le16(buf + 64, h->log_version);
	vhdx_put_le16(buf + 66, h->version);
	vhdx_put_le32(buf + 68, h->log_length);
	vhdx_put_le64(buf + 72, h->log_offset);
	vhdx_put_le32(buf + 4, crc_with_hole(buf, VHDX_HEADER_SIZE, 4));
}

int
vhdx_header_choose(const char *name, const uint8_t *h1, const uint8_t *h2,
		   struct vhdx_header *cur, int *slot)
{
	struct vhdx_header a, b;
	const char *why1, *why2;
	bool ok1 = vhdx_header_decode(h1, &a, &why1) == 0;
	bool ok2 = vhdx_header_decode(h2, &b, &why2) == 0;
	uint64_t end;

	if (!ok1 && !ok2)
		return bm_error(-EINVAL, "%s: no valid VHDX header "
				"(header 1: %s, header 2: %s)", name, why1,
				why2);
	if (ok1 && ok2 && a.seq == b.seq &&
	    memcmp(h1, h2, VHDX_HEADER_SIZE) != 0)
		return bm_error(-EINVAL, "%s: no valid VHDX header: both "
				"headers have sequence number %" PRIu64
				" but differ", name, a.seq);
	*slot = ok1 && (!ok2 || a.seq >= b.seq) ? 0 : 1;
	*cur = *slot == 0 ? a : b;
	if (cur->log_version != 0)
		return bm_error(-ENOTSUP, "%s: VHDX header: unsupported log "
				"version %u", name, cur->log_version);
	if (cur->log_length == 0 || cur->log_length % VHDX_MiB)
		return bm_error(-EINVAL, "%s: VHDX header: log length %" PRIu32
				" is not a non-zero multiple of 1 MiB", name,
				cur->log_length);
	if (cur->log_offset < VHDX_MiB || cur->log_offset % VHDX_MiB ||
	    bm_add_overflow(cur->log_offset, cur->log_length, &end))
		return bm_error(-EINVAL, "%s: VHDX header: log offset %" PRIu64
				" is not a multiple of 1 MiB past the first "
				"MiB", name, cur->log_offset);
	return 0;
}

/* ---- region table ----------------------------------------------------- */

static bool
overlap(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
	return a < b + blen && b < a + alen;
}

int
vhdx_region_table_decode(const char *name, const uint8_t *buf,
			 struct vhdx_regions *r)
{
	uint32_t count;
	bool have_bat = false, have_meta = false;

	if (vhdx_le32(buf) != SIG_REGI)
		return bm_error(-EINVAL, "%s: VHDX region table: bad "
				"signature", name);
	if (vhdx_le32(buf + 4) != crc_with_hole(buf, VHDX_REGION_SIZE, 4))
		return bm_error(-EINVAL, "%s: VHDX region table: bad "
				"checksum", name);
	count = vhdx_le32(buf + 8);
	if (count > VHDX_MAX_ENTRIES)
		return bm_error(-EINVAL, "%s: VHDX region table: %" PRIu32
				" entries (at most %u)", name, count,
				VHDX_MAX_ENTRIES);
	for (uint32_t i = 0; i < count; i++) {
		const uint8_t *e = buf + 16 + 32 * (size_t)i;
		uint64_t off = vhdx_le64(e + 16);
		uint32_t len = vhdx_le32(e + 24);
		uint32_t required = vhdx_le32(e + 28);
		char g[39];

		vhdx_guid_format(e, g);
		if (off < VHDX_MiB || off % VHDX_MiB || len == 0 ||
		    len % VHDX_MiB || off > VHDX_MAX_SIZE * 2)
			return bm_error(-EINVAL, "%s: VHDX region %s: offset "
					"%" PRIu64 " length %" PRIu32 " not "
					"1 MiB-aligned past the first MiB",
					name, g, off, len);
		for (uint32_t j = 0; j < i; j++) {
			const uint8_t *o = buf + 16 + 32 * (size_t)j;

			if (overlap(off, len, vhdx_le64(o + 16),
				    vhdx_le32(o + 24)))
				return bm_error(-EINVAL, "%s: VHDX regions %"
						PRIu32 " and %" PRIu32
						" overlap", name, j, i);
		}
		if (memcmp(e, vhdx_guid_bat, 16) == 0) {
			if (have_bat)
				return bm_error(-EINVAL, "%s: VHDX region "
						"table lists the BAT twice",
						name);
			have_bat = true;
			r->bat_offset = off;
			r->bat_length = len;
		} else if (memcmp(e, vhdx_guid_metadata, 16) == 0) {
			if (have_meta)
				return bm_error(-EINVAL, "%s: VHDX region "
						"table lists the metadata "
						"region twice", name);
			have_meta = true;
			r->meta_offset = off;
			r->meta_length = len;
		} else if (required & 1) {
			return bm_error(-ENOTSUP, "%s: VHDX region %s is "
					"required but unknown", name, g);
		}
	}
	if (!have_bat || !have_meta)
		return bm_error(-EINVAL, "%s: VHDX region table has no %s "
				"region", name, have_bat ? "metadata" : "BAT");
	return 0;
}

void
vhdx_region_table_encode(const struct vhdx_regions *r, uint8_t *buf)
{
	memset(buf, 0, VHDX_REGION_SIZE);
	vhdx_put_le32(buf, SIG_REGI);
	vhdx_put_le32(buf + 8, 2);
	memcpy(buf + 16, vhdx_guid_bat, 16);
	vhdx_put_le64(buf + 32, r->bat_offset);
	vhdx_put_le32(buf + 40, r->bat_length);
	vhdx_put_le32(buf + 44, 1);
	memcpy(buf + 48, vhdx_guid_metadata, 16);
	vhdx_put_le64(buf + 64, r->meta_offset);
	vhdx_put_le32(buf + 72, r->meta_length);
	vhdx_put_le32(buf + 76, 1);
	vhdx_put_le32(buf + 4, crc_with_hole(buf, VHDX_REGION_SIZE, 4));
}

/* ---- metadata --------------------------------------------------------- */

#define META_IS_USER 1u
#define META_IS_VIRTUAL_DISK 2u
#define META_IS_REQUIRED 4u

enum { ITEM_FILE_PARAMS, ITEM_SIZE, ITEM_PAGE83, ITEM_LSS, ITEM_PSS,
       ITEM_LOCATOR, NITEMS };

static const struct {
	const uint8_t *guid;
	const char *what;
	uint32_t min_len;
} items[NITEMS] = {
	{ vhdx_guid_file_parameters, "File Parameters", 8 },
	{ vhdx_guid_virtual_disk_size, "Virtual Disk Size", 8 },
	{ vhdx_guid_page83, "Page 83 Data", 16 },
	{ vhdx_guid_logical_sector, "Logical Sector Size", 4 },
	{ vhdx_guid_physical_sector, "Physical Sector Size", 4 },
	{ vhdx_guid_parent_locator, "Parent Locator", 20 },
};

/* UTF-16LE (n bytes) to a malloc'd UTF-8 string; NULL if invalid. */
static char *
utf16_to_utf8(const uint8_t *p, size_t n)
{
	char *s = malloc(n / 2 * 3 + 1), *o = s;

	if (!s || n % 2)
		goto bad;
	for (size_t i = 0; i < n; i += 2) {
		uint32_t c = vhdx_le16(p + i);

		if (c >= 0xd800 && c < 0xdc00) {
			uint32_t lo;

			if (i + 4 > n)
				goto bad;
			lo = vhdx_le16(p + i + 2);
			if (lo < 0xdc00 || lo >= 0xe000)
				goto bad;
			c = 0x10000 + ((c - 0xd800) << 10) + (lo - 0xdc00);
			i += 2;
		} else if ((c >= 0xdc00 && c < 0xe000) || c == 0) {
			goto bad;
		}
		if (c < 0x80) {
			*o++ = (char)c;
		} else if (c < 0x800) {
			*o++ = (char)(0xc0 | c >> 6);
			*o++ = (char)(0x80 | (c & 0x3f));
		} else if (c < 0x10000) {
			*o++ = (char)(0xe0 | c >> 12);
			*o++ = (char)(0x80 | (c >> 6 & 0x3f));
			*o++ = (char)(0x80 | (c & 0x3f));
		} else {
			/* 4 bytes of UTF-8 for 4 bytes of UTF-16: fits. */
			*o++ = (char)(0xf0 | c >> 18);
			*o++ = (char)(0x80 | (c >> 12 & 0x3f));
			*o++ = (char)(0x80 | (c >> 6 & 0x3f));
			*o++ = (char)(0x80 | (c & 0x3f));
		}
	}
	*o = '\0';
	return s;
bad:
	free(s);
	return NULL;
}

static const char *const locator_keys[] = {
	"parent_linkage", "parent_linkage2", "relative_path", "volume_path",
	"absolute_win32_path",
};

static char **
locator_slot(struct vhdx_meta *m, size_t k)
{
	char **slots[] = { &m->parent_linkage, &m->parent_linkage2,
			   &m->relative_path, &m->volume_path,
			   &m->absolute_win32_path };

	return slots[k];
}

static int
decode_locator(const char *name, const uint8_t *p, uint32_t len,
	       struct vhdx_meta *m)
{
	uint16_t count;

	if (memcmp(p, vhdx_guid_locator_type, 16) != 0)
		return bm_error(-ENOTSUP, "%s: VHDX parent locator: unknown "
				"locator type", name);
	count = vhdx_le16(p + 18);
	if (20 + (uint64_t)count * 12 > len)
		return bm_error(-EINVAL, "%s: VHDX parent locator: %u entries "
				"do not fit its %" PRIu32 " bytes", name, count,
				len);
	for (uint16_t i = 0; i < count; i++) {
		const uint8_t *e = p + 20 + 12 * (size_t)i;
		uint32_t ko = vhdx_le32(e), vo = vhdx_le32(e + 4);
		uint16_t kl = vhdx_le16(e + 8), vl = vhdx_le16(e + 10);
		char *key, *val;
		size_t k;

		if (!bm_range_ok(ko, kl, len) || !bm_range_ok(vo, vl, len) ||
		    kl == 0 || vl == 0)
			return bm_error(-EINVAL, "%s: VHDX parent locator "
					"entry %u lies outside the locator",
					name, i);
		key = utf16_to_utf8(p + ko, kl);
		val = utf16_to_utf8(p + vo, vl);
		if (!key || !val) {
			free(key);
			free(val);
			return bm_error(-EINVAL, "%s: VHDX parent locator "
					"entry %u is not valid UTF-16", name,
					i);
		}
		for (k = 0; k < BM_ARRAY_SIZE(locator_keys); k++)
			if (strcmp(key, locator_keys[k]) == 0)
				break;
		free(key);
		if (k == BM_ARRAY_SIZE(locator_keys)) {
			free(val);      /* unknown keys are allowed */
			continue;
		}
		if (*locator_slot(m, k)) {
			free(val);
			return bm_error(-EINVAL, "%s: VHDX parent locator "
					"has key %s twice", name,
					locator_keys[k]);
		}
		*locator_slot(m, k) = val;
	}
	if (!m->parent_linkage)
		return bm_error(-EINVAL, "%s: VHDX parent locator has no "
				"parent_linkage", name);
	if (!m->relative_path && !m->volume_path && !m->absolute_win32_path)
		return bm_error(-EINVAL, "%s: VHDX parent locator names no "
				"parent path", name);
	return 0;
}

static int
decode_item(const char *name, int which, const uint8_t *p, uint32_t len,
	    struct vhdx_meta *m)
{
	uint32_t flags;

	switch (which) {
	case ITEM_FILE_PARAMS:
		m->block_size = vhdx_le32(p);
		flags = vhdx_le32(p + 4);
		if (!bm_is_power_of_2(m->block_size) ||
		    m->block_size < VHDX_MIN_BLOCK ||
		    m->block_size > VHDX_MAX_BLOCK)
			return bm_error(-EINVAL, "%s: VHDX block size %" PRIu32
					" is not a power of two from 1 MiB "
					"to 256 MiB", name, m->block_size);
		if (flags & ~3u)
			return bm_error(-ENOTSUP, "%s: VHDX file parameters: "
					"unknown flags 0x%" PRIx32, name,
					flags);
		m->leave_allocated = flags & 1;
		m->has_parent = flags & 2;
		return 0;
	case ITEM_SIZE:
		m->virtual_size = vhdx_le64(p);
		if (m->virtual_size > VHDX_MAX_SIZE)
			return bm_error(-EINVAL, "%s: VHDX virtual disk size %"
					PRIu64 " exceeds 64 TiB", name,
					m->virtual_size);
		return 0;
	case ITEM_PAGE83:
		memcpy(m->page83, p, 16);
		return 0;
	case ITEM_LSS:
	case ITEM_PSS: {
		uint32_t v = vhdx_le32(p);

		if (v != 512 && v != 4096)
			return bm_error(-EINVAL, "%s: VHDX %s %" PRIu32
					" is neither 512 nor 4096", name,
					which == ITEM_LSS ?
					"logical sector size" :
					"physical sector size", v);
		*(which == ITEM_LSS ? &m->logical_sector :
		  &m->physical_sector) = v;
		return 0;
	}
	default:
		return decode_locator(name, p, len, m);
	}
}

int
vhdx_metadata_decode(const char *name, const uint8_t *buf, size_t len,
		     uint64_t region_length, struct vhdx_meta *m)
{
	static const char sig[8] = "metadata";
	uint32_t found[NITEMS] = { 0 };
	uint16_t count;
	int r;

	memset(m, 0, sizeof *m);
	if (len < VHDX_METADATA_TABLE_SIZE || memcmp(buf, sig, 8) != 0)
		return bm_error(-EINVAL, "%s: VHDX metadata table: bad "
				"signature", name);
	count = vhdx_le16(buf + 10);
	if (count > VHDX_MAX_ENTRIES)
		return bm_error(-EINVAL, "%s: VHDX metadata table: %u entries "
				"(at most %u)", name, count, VHDX_MAX_ENTRIES);
	for (uint16_t i = 0; i < count; i++) {
		const uint8_t *e = buf + 32 + 32 * (size_t)i;
		uint32_t off = vhdx_le32(e + 16), ilen = vhdx_le32(e + 20);
		uint32_t flags = vhdx_le32(e + 24);
		int which = -1;
		char g[39];

		vhdx_guid_format(e, g);
		if (ilen > VHDX_MiB ||
		    (ilen == 0 && off != 0) ||
		    (ilen && (off < VHDX_METADATA_TABLE_SIZE ||
			      !bm_range_ok(off, ilen, region_length))))
			return bm_error(-EINVAL, "%s: VHDX metadata item %s: "
					"offset %" PRIu32 " length %" PRIu32
					" out of range", name, g, off, ilen);
		for (uint16_t j = 0; j < i; j++) {
			const uint8_t *o = buf + 32 + 32 * (size_t)j;

			if (memcmp(o, e, 16) == 0 &&
			    ((vhdx_le32(o + 24) ^ flags) & META_IS_USER) == 0)
				return bm_error(-EINVAL, "%s: VHDX metadata "
						"item %s appears twice", name,
						g);
			if (ilen && overlap(off, ilen, vhdx_le32(o + 16),
					    vhdx_le32(o + 20)))
				return bm_error(-EINVAL, "%s: VHDX metadata "
						"items %u and %u overlap",
						name, j, i);
		}
		if (flags & META_IS_USER)
			continue;
		for (int k = 0; k < NITEMS; k++)
			if (memcmp(e, items[k].guid, 16) == 0)
				which = k;
		if (which < 0) {
			if (flags & META_IS_REQUIRED)
				return bm_error(-ENOTSUP, "%s: VHDX metadata "
						"item %s is required but "
						"unknown", name, g);
			continue;
		}
		if (ilen < items[which].min_len)
			return bm_error(-EINVAL, "%s: VHDX metadata item %s "
					"is %" PRIu32 " bytes long", name,
					items[which].what, ilen);
		if (!bm_range_ok(off, ilen, len))
			return bm_error(-ENOTSUP, "%s: VHDX metadata item %s "
					"lies too far into the region", name,
					items[which].what);
		found[which] = i + 1;
	}
	for (int k = 0; k < ITEM_LOCATOR; k++) {
		const uint8_t *e;

		if (!found[k])
			return bm_error(-EINVAL, "%s: VHDX metadata has no %s "
					"item", name, items[k].what);
		e = buf + 32 + 32 * (size_t)(found[k] - 1);
		r = decode_item(name, k, buf + vhdx_le32(e + 16),
				vhdx_le32(e + 20), m);
		if (r < 0)
			return r;
	}
	if (m->virtual_size % m->logical_sector)
		return bm_error(-EINVAL, "%s: VHDX virtual disk size %" PRIu64
				" is not a multiple of the logical sector "
				"size %" PRIu32, name, m->virtual_size,
				m->logical_sector);
	if (m->has_parent) {
		const uint8_t *e;

		if (!found[ITEM_LOCATOR])
			return bm_error(-EINVAL, "%s: VHDX differencing disk "
					"without a parent locator", name);
		e = buf + 32 + 32 * (size_t)(found[ITEM_LOCATOR] - 1);
		return decode_item(name, ITEM_LOCATOR,
				   buf + vhdx_le32(e + 16), vhdx_le32(e + 20),
				   m);
	}
	return 0;
}

void
vhdx_meta_free(struct vhdx_meta *m)
{
	for (size_t k = 0; k < BM_ARRAY_SIZE(locator_keys); k++) {
		free(*locator_slot(m, k));
		*locator_slot(m, k) = NULL;
	}
}

/* Append UTF-8 s as UTF-16LE at buf[*pos]; the string must be ASCII
 * or well-formed UTF-8.  Returns bytes written or -EINVAL. */
static int
put_utf16(uint8_t *buf, size_t len, size_t pos, const char *s)
{
	size_t start = pos;
	const unsigned char *u = (const unsigned char *)s;

	while (*u) {
		uint32_t c;
		int extra;

		if (*u < 0x80) {
			c = *u;
			extra = 0;
		} else if ((*u & 0xe0) == 0xc0) {
			c = *u & 0x1f;
			extra = 1;
		} else if ((*u & 0xf0) == 0xe0) {
			c = *u & 0x0f;
			extra = 2;
		} else if ((*u & 0xf8) == 0xf0) {
			c = *u & 0x07;
			extra = 3;
		} else {
			return -EINVAL;
		}
		u++;
		for (int i = 0; i < extra; i++, u++) {
			if ((*u & 0xc0) != 0x80)
				return -EINVAL;
			c = c << 6 | (*u & 0x3f);
		}
		if (pos + 4 > len)
			return -EINVAL;
		if (c >= 0x10000) {
			c -= 0x10000;
			vhdx_put_le16(buf + pos, (uint16_t)(0xd800 + (c >> 10)));
			vhdx_put_le16(buf + pos + 2,
				      (uint16_t)(0xdc00 + (c & 0x3ff)));
			pos += 4;
		} else {
			vhdx_put_le16(buf + pos, (uint16_t)c);
			pos += 2;
		}
	}
	if (pos - start > UINT16_MAX)
		return -EINVAL;
	return (int)(pos - start);
}

/* The parent locator item at p (room bytes); returns its length. */
static int
encode_locator(const struct vhdx_meta *m, uint8_t *p, size_t room)
{
	struct vhdx_meta *mm = (struct vhdx_meta *)m;
	size_t n = 0, pos;

	for (size_t k = 0; k < BM_ARRAY_SIZE(locator_keys); k++)
		n += *locator_slot(mm, k) != NULL;
	memcpy(p, vhdx_guid_locator_type, 16);
	vhdx_put_le16(p + 18, (uint16_t)n);
	pos = 20 + 12 * n;
	n = 0;
	for (size_t k = 0; k < BM_ARRAY_SIZE(locator_keys); k++) {
		const char *v = *locator_slot(mm, k);
		uint8_t *e = p + 20 + 12 * n;
		int kl, vl;

		if (!v)
			continue;
		kl = put_utf16(p, room, pos, locator_keys[k]);
		if (kl < 0)
			return kl;
		vl = put_utf16(p, room, pos + (size_t)kl, v);
		if (vl <= 0)
			return -EINVAL;
		vhdx_put_le32(e, (uint32_t)pos);
		vhdx_put_le32(e + 4, (uint32_t)(pos + (size_t)kl));
		vhdx_put_le16(e + 8, (uint16_t)kl);
		vhdx_put_le16(e + 10, (uint16_t)vl);
		pos += (size_t)(kl + vl);
		n++;
	}
	return (int)pos;
}

int
vhdx_metadata_encode(const struct vhdx_meta *m, uint8_t *buf, size_t len)
{
	uint32_t off = VHDX_METADATA_TABLE_SIZE;
	uint16_t n = 0;

	if (len < 2 * VHDX_METADATA_TABLE_SIZE)
		return -EINVAL;
	memcpy(buf, "metadata", 8);
	for (int k = 0; k < NITEMS; k++) {
		uint8_t *e = buf + 32 + 32 * (size_t)n;
		uint8_t *p = buf + off;
		uint32_t ilen, flags = META_IS_REQUIRED;

		switch (k) {
		case ITEM_FILE_PARAMS:
			vhdx_put_le32(p, m->block_size);
			vhdx_put_le32(p + 4, (uint32_t)m->leave_allocated |
				      (uint32_t)m->has_parent << 1);
			ilen = 8;
			break;
		case ITEM_SIZE:
			vhdx_put_le64(p, m->virtual_size);
			ilen = 8;
			break;
		case ITEM_PAGE83:
			memcpy(p, m->page83, 16);
			ilen = 16;
			break;
		case ITEM_LSS:
		case ITEM_PSS:
			vhdx_put_le32(p, k == ITEM_LSS ? m->logical_sector :
				      m->physical_sector);
			ilen = 4;
			break;
		default: {
			int l;

			if (!m->has_parent)
				continue;
			l = encode_locator(m, p, len - off);
			if (l < 0)
				return l;
			ilen = (uint32_t)l;
			break;
		}
		}
		if (k != ITEM_FILE_PARAMS && k != ITEM_LOCATOR)
			flags |= META_IS_VIRTUAL_DISK;
		memcpy(e, items[k].guid, 16);
		vhdx_put_le32(e + 16, off);
		vhdx_put_le32(e + 20, ilen);
		vhdx_put_le32(e + 24, flags);
		off += (ilen + 7) & ~7u;
		n++;
	}
	vhdx_put_le16(buf + 10, n);
	return 0;
}

char *
vhdx_parent_path(const struct vhdx_meta *m)
{
	const char *p = m->relative_path ? m->relative_path :
			m->absolute_win32_path ? m->absolute_win32_path :
			m->volume_path;
	char *s;

	if (!p) {
		errno = ENOENT;
		return NULL;
	}
	s = strdup(p);
	if (!s)
		return NULL;
	for (char *c = s; *c; c++)
		if (*c == '\\')
			*c = '/';
	return s;
}

/* ---- BAT -------------------------------------------------------------- */

int
vhdx_geometry(const char *name, const struct vhdx_meta *m,
	      struct vhdx_geom *g)
{
	uint64_t bs = m->block_size;

	g->sectors_per_block = (uint32_t)(bs / m->logical_sector);
	g->chunk_ratio = (UINT64_C(1) << 23) * m->logical_sector / bs;
	if (g->chunk_ratio == 0)
		return bm_error(-EINVAL, "%s: VHDX block size %" PRIu64
				" too large for its sector size", name, bs);
	g->data_blocks = (m->virtual_size + bs - 1) / bs;
	g->bitmap_blocks = (g->data_blocks + g->chunk_ratio - 1) /
			   g->chunk_ratio;
	if (m->has_parent)
		g->bat_entries = g->bitmap_blocks * (g->chunk_ratio + 1);
	else if (g->data_blocks)
		g->bat_entries = g->data_blocks +
				 (g->data_blocks - 1) / g->chunk_ratio;
	else
		g->bat_entries = 0;
	return 0;
}

struct used {
	uint64_t offset;
	uint64_t index;
	uint64_t length;
};

static int
cmp_used(const void *a, const void *b)
{
	const struct used *x = a, *y = b;

	return x->offset < y->offset ? -1 : x->offset > y->offset;
}

static int
check_block(const char *name, uint64_t i, uint64_t off, uint64_t len,
	    const struct vhdx_range *fixed, size_t nfixed, uint64_t file_size)
{
	if (off < VHDX_MiB)
		return bm_error(-EINVAL, "%s: VHDX BAT entry %" PRIu64
				" points into the first MiB (offset %" PRIu64
				")", name, i, off);
	if (!bm_range_ok(off, len, file_size))
		return bm_error(-EINVAL, "%s: VHDX BAT entry %" PRIu64
				" block %" PRIu64 "-%" PRIu64 " points after "
				"the end of the file (%" PRIu64 "); truncated?",
				name, i, off, off + len, file_size);
	for (size_t k = 0; k < nfixed; k++)
		if (overlap(off, len, fixed[k].offset, fixed[k].length))
			return bm_error(-EINVAL, "%s: VHDX BAT entry %" PRIu64
					" block at %" PRIu64 " overlaps the %s",
					name, i, off, fixed[k].what);
	return 0;
}

/* Is BAT entry i the payload entry of the disk's last block? */
static bool
last_payload(const struct vhdx_geom *g, uint64_t i)
{
	uint64_t last = g->data_blocks - 1;

	return g->data_blocks && i == vhdx_bat_index(g, last);
}

int
vhdx_bat_check(const char *name, const uint64_t *bat,
	       const struct vhdx_geom *g, const struct vhdx_meta *m,
	       const struct vhdx_range *fixed, size_t nfixed,
	       uint64_t file_size)
{
	struct used *u = NULL;
	size_t nu = 0;
	int r = 0;

	if (g->bat_entries) {
		u = malloc(g->bat_entries * sizeof *u);
		if (!u)
			return bm_error(-ENOMEM, "%s: out of memory", name);
	}
	for (uint64_t i = 0; i < g->bat_entries && r == 0; i++) {
		unsigned st = vhdx_bat_state(bat[i]);
		uint64_t off = vhdx_bat_offset(bat[i]), len = m->block_size;

		if (i % (g->chunk_ratio + 1) == g->chunk_ratio) {
			/* Sector bitmaps matter to differencing disks
			 * only; others must leave them NOT_PRESENT, and
			 * we never read them there. */
			if (!m->has_parent || st == VHDX_SB_NOT_PRESENT)
				continue;
			if (st != VHDX_SB_PRESENT) {
				r = bm_error(-EINVAL, "%s: VHDX BAT entry %"
					     PRIu64 ": invalid sector bitmap "
					     "state %u", name, i, st);
				break;
			}
			len = VHDX_MiB;
		} else if (st == VHDX_BAT_PARTIALLY_PRESENT) {
			uint64_t sb = i - i % (g->chunk_ratio + 1) +
				      g->chunk_ratio;

			if (!m->has_parent) {
				r = bm_error(-EINVAL, "%s: VHDX BAT entry %"
					     PRIu64 " is PARTIALLY_PRESENT in "
					     "a disk without a parent", name,
					     i);
				break;
			}
			if (sb >= g->bat_entries || vhdx_bat_state(bat[sb]) !=
			    VHDX_SB_PRESENT) {
				r = bm_error(-EINVAL, "%s: VHDX BAT entry %"
					     PRIu64 " is PARTIALLY_PRESENT but "
					     "its sector bitmap is not present",
					     name, i);
				break;
			}
		} else if (st == 4 || st > 7) {
			r = bm_error(-EINVAL, "%s: VHDX BAT entry %" PRIu64
				     ": reserved state %u", name, i, st);
			break;
		} else if (st != VHDX_BAT_FULLY_PRESENT) {
			continue;
		}
		/* QEMU writes fixed disks whose last block the file does
		 * not wholly hold: the missing tail reads as zeroes. */
		r = check_block(name, i, off, len, fixed, nfixed,
				last_payload(g, i) && off < file_size ?
				BM_MAX(file_size, off + len) : file_size);
		u[nu++] = (struct used){ off, i, len };
	}
	if (r == 0 && nu) {
		qsort(u, nu, sizeof *u, cmp_used);
		for (size_t k = 1; k < nu; k++)
			if (u[k].offset < u[k - 1].offset + u[k - 1].length) {
				r = bm_error(-EINVAL, "%s: VHDX BAT entries %"
					     PRIu64 " and %" PRIu64 " share "
					     "file space at %" PRIu64, name,
					     u[k - 1].index, u[k].index,
					     u[k].offset);
				break;
			}
	}
	free(u);
	return r;
}

/* ---- log entries ------------------------------------------------------ */

static uint64_t
desc_sectors(size_t n)
{
	return (64 + 32 * (uint64_t)n + VHDX_LOG_SECTOR - 1) / VHDX_LOG_SECTOR;
}

uint64_t
vhdx_log_entry_size(size_t ndata, size_t nzero)
{
	return (desc_sectors(ndata + nzero) + ndata) * VHDX_LOG_SECTOR;
}

void
vhdx_log_entry_encode(const struct vhdx_log_entry *e,
		      const struct vhdx_log_desc *d, size_t n, uint8_t *buf)
{
	size_t ndata = 0;
	uint64_t len, ds = desc_sectors(n);

	for (size_t i = 0; i < n; i++)
		ndata += d[i].data != NULL;
	len = vhdx_log_entry_size(ndata, n - ndata);
	memset(buf, 0, len);
	vhdx_put_le32(buf, SIG_LOGE);
	vhdx_put_le32(buf + 8, (uint32_t)len);
	vhdx_put_le32(buf + 12, e->tail);
	vhdx_put_le64(buf + 16, e->seq);
	vhdx_put_le32(buf + 24, (uint32_t)n);
	memcpy(buf + 32, e->log_guid, 16);
	vhdx_put_le64(buf + 48, e->flushed_file_offset);
	vhdx_put_le64(buf + 56, e->last_file_offset);
	ndata = 0;
	for (size_t i = 0; i < n; i++) {
		uint8_t *p = buf + 64 + 32 * i;

		vhdx_put_le64(p + 16, d[i].file_offset);
		vhdx_put_le64(p + 24, e->seq);
		if (d[i].data) {
			uint8_t *s = buf + (ds + ndata++) * VHDX_LOG_SECTOR;

			vhdx_put_le32(p, SIG_DESC);
			vhdx_put_le32(p + 4, vhdx_le32(d[i].data + 4092));
			vhdx_put_le64(p + 8, vhdx_le64(d[i].data));
			vhdx_put_le32(s, SIG_DATA);
			vhdx_put_le32(s + 4, (uint32_t)(e->seq >> 32));
			memcpy(s + 8, d[i].data + 8, 4084);
			vhdx_put_le32(s + 4092, (uint32_t)e->seq);
		} else {
			vhdx_put_le32(p, SIG_ZERO);
			vhdx_put_le64(p + 8, d[i].zero_length);
		}
	}
	vhdx_put_le32(buf + 4, crc_with_hole(buf, len, 4));
}

int
vhdx_log_entry_check(const char *name, const uint8_t *buf, size_t avail,
		     const uint8_t guid[16], uint64_t where,
		     struct vhdx_log_entry *e)
{
	uint64_t ds, ndata = 0;

	if (avail < VHDX_LOG_SECTOR || vhdx_le32(buf) != SIG_LOGE)
		return 0;
	e->entry_length = vhdx_le32(buf + 8);
	e->tail = vhdx_le32(buf + 12);
	e->seq = vhdx_le64(buf + 16);
	e->desc_count = vhdx_le32(buf + 24);
	memcpy(e->log_guid, buf + 32, 16);
	e->flushed_file_offset = vhdx_le64(buf + 48);
	e->last_file_offset = vhdx_le64(buf + 56);
	if (e->entry_length == 0 || e->entry_length % VHDX_LOG_SECTOR ||
	    e->entry_length > avail)
		return 0;
	if (vhdx_le32(buf + 4) != crc_with_hole(buf, e->entry_length, 4) ||
	    memcmp(e->log_guid, guid, 16) != 0 || e->seq == 0)
		return 0;
	/* Complete and ours: from here on, nonsense is corruption. */
	ds = desc_sectors(e->desc_count);
	if (ds * VHDX_LOG_SECTOR > e->entry_length)
		return bm_error(-EINVAL, "%s: VHDX log entry at %" PRIu64
				": %" PRIu32 " descriptors do not fit its %"
				PRIu32 " bytes", name, where, e->desc_count,
				e->entry_length);
	if (e->tail % VHDX_LOG_SECTOR)
		return bm_error(-EINVAL, "%s: VHDX log entry at %" PRIu64
				": tail %" PRIu32 " not sector-aligned", name,
				where, e->tail);
	for (uint32_t i = 0; i < e->desc_count; i++) {
		const uint8_t *p = buf + 64 + 32 * (size_t)i;
		uint32_t sig = vhdx_le32(p);
		uint64_t off = vhdx_le64(p + 16), end;

		if (sig != SIG_DESC && sig != SIG_ZERO)
			return bm_error(-EINVAL, "%s: VHDX log entry at %"
					PRIu64 ": descriptor %" PRIu32 " has "
					"an invalid signature", name, where,
					i);
		if (vhdx_le64(p + 24) != e->seq)
			return bm_error(-EINVAL, "%s: VHDX log entry at %"
					PRIu64 ": descriptor %" PRIu32 " has "
					"the wrong sequence number", name,
					where, i);
		if (sig == SIG_ZERO) {
			uint64_t zl = vhdx_le64(p + 8);

			if (zl == 0 || zl % VHDX_LOG_SECTOR ||
			    off % VHDX_LOG_SECTOR ||
			    bm_add_overflow(off, zl, &end))
				return bm_error(-EINVAL, "%s: VHDX log entry "
						"at %" PRIu64 ": zero "
						"descriptor %" PRIu32 " range "
						"invalid", name, where, i);
			continue;
		}
		if (off % VHDX_LOG_SECTOR)
			return bm_error(-EINVAL, "%s: VHDX log entry at %"
					PRIu64 ": descriptor %" PRIu32
					" offset not sector-aligned", name,
					where, i);
		if ((ds + ndata + 1) * VHDX_LOG_SECTOR > e->entry_length)
			return bm_error(-EINVAL, "%s: VHDX log entry at %"
					PRIu64 ": more data descriptors than "
					"data sectors", name, where);
		p = buf + (ds + ndata++) * VHDX_LOG_SECTOR;
		if (vhdx_le32(p) != SIG_DATA ||
		    ((uint64_t)vhdx_le32(p + 4) << 32 |
		     vhdx_le32(p + 4092)) != e->seq)
			return bm_error(-EINVAL, "%s: VHDX log entry at %"
					PRIu64 ": data sector %" PRIu64
					" invalid", name, where, ndata - 1);
	}
	return 1;
}

void
vhdx_log_entry_desc(const uint8_t *buf, uint32_t i, uint64_t *k,
		    uint8_t *sector, struct vhdx_log_desc *d)
{
	const uint8_t *p = buf + 64 + 32 * (size_t)i;
	uint64_t ds = desc_sectors(vhdx_le32(buf + 24));

	d->file_offset = vhdx_le64(p + 16);
	if (vhdx_le32(p) == SIG_ZERO) {
		d->zero_length = vhdx_le64(p + 8);
		d->data = NULL;
		return;
	}
	p = buf + (ds + (*k)++) * VHDX_LOG_SECTOR;
	vhdx_put_le64(sector, vhdx_le64(buf + 64 + 32 * (size_t)i + 8));
	memcpy(sector + 8, p + 8, 4084);
	vhdx_put_le32(sector + 4092, vhdx_le32(buf + 64 + 32 * (size_t)i + 4));
	d->zero_length = 0;
	d->data = sector;
}

/* ---- creation --------------------------------------------------------- */

void
vhdx_file_id_encode(uint8_t *buf)
{
	memset(buf, 0, VHDX_REGION_SIZE);
	memcpy(buf, "vhdxfile", 8);
	put_utf16(buf + 8, 512, 0, "blockmirror");
}
