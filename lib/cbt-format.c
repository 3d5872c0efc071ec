/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The on-disk format of a changed-block tracker's sidecar (docs/cbt.md):
 * buffers in, structs out, no I/O.
 *
 * A sidecar is a header (the fixed part and the checkpoint list, whole
 * pages) followed by one bitmap per checkpoint, each a whole number of
 * pages.  The header is only ever written as part of a whole new file
 * renamed into place, so its checksum holds unless the medium is damaged;
 * the invariant the parser protects is that a header is trusted only if
 * every field checks out, and is never repaired.
 *
 * The bitmaps have no checksum, on purpose: the newest one is written in
 * place, page by page, while the tracker runs, and between two rewrites
 * of the file its bits only go from 0 to 1.  A torn page write can then
 * only lose bits that were being set, and no guest write that needed
 * them was let through before the page was durable.  A checksum would
 * turn that harmless tear into a bitmap refused after every power loss.
 *
 * Integers are big-endian (as in the mirror's state file); the checksum
 * is XXH3-64.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include <xxhash.h>

#include "cbt.h"
#include "errors.h"
#include "internal.h"

static const uint8_t magic[8] = { 'B', 'M', 'C', 'B', 'T', 'R', 'K', 0 };
#define CBT_VERSION 1u

/* The fixed part. */
#define H_VERSION 8
#define H_FLAGS 12
#define H_DISK_SIZE 16
#define H_GRANULARITY 24
#define H_COUNT 28
#define H_NEXT_ID 32
#define H_BITMAP_SIZE 40
#define H_HEADER_SIZE 48
#define H_RESERVED 52
#define H_HASH 56

/* A checkpoint entry, at 64 + 128 * i. */
#define E_ID 0
#define E_CREATED 8
#define E_FLAGS 16
#define E_NAME_LEN 20
#define E_RESERVED 21
#define E_NAME 24
#define E_TAIL (E_NAME + BM_CBT_NAME_MAX) /* reserved to the end */

#define BITS_PER_PAGE (BM_CBT_PAGE * 8u)
#define WORDS_PER_PAGE (BM_CBT_PAGE / 8u)

bool
bm_cbt_name_ok(const char *name)
{
	size_t n = name ? strlen(name) : 0;

	if (n == 0 || n > BM_CBT_NAME_MAX)
		return false;
	for (size_t i = 0; i < n; i++) {
		char c = name[i];

		if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
		      (c >= '0' && c <= '9') || c == '.' || c == '_' ||
		      c == '-'))
			return false;
	}
	return true;
}

uint64_t
bm_cbt_blocks(uint64_t disk_size, uint32_t granularity)
{
	return disk_size / granularity + (disk_size % granularity != 0);
}

uint64_t
bm_cbt_bitmap_size(uint64_t disk_size, uint32_t granularity)
{
	return bm_round_up((bm_cbt_blocks(disk_size, granularity) + 7) / 8,
			   BM_CBT_PAGE);
}

size_t
bm_cbt_header_size(uint32_t count)
{
	return (size_t)bm_round_up(BM_CBT_HEADER_FIXED +
				   (uint64_t)count * BM_CBT_ENTRY_SIZE,
				   BM_CBT_PAGE);
}

/* Geometry that makes sense: shared by encode and decode. */
static const char *
geometry_problem(uint64_t disk_size, uint32_t granularity)
{
	if (!disk_size)
		return "the disk size is 0";
	if (!bm_is_power_of_2(granularity) ||
	    granularity < BM_CBT_MIN_GRANULARITY ||
	    granularity > BM_CBT_MAX_GRANULARITY)
		return "the granularity is not a power of two from 4 KiB to "
		       "64 MiB";
	/* A bitmap must fit in memory and in a size_t: 1 GiB at most. */
	if (disk_size / granularity > (UINT64_C(1) << 33))
		return "too many blocks (more than 2^33)";
	return NULL;
}

/* The list's rules: names valid and unique, ids increasing. */
static const char *
list_problem(const struct bm_cbt_header *h)
{
	if (h->count > BM_CBT_MAX_CHECKPOINTS)
		return "too many checkpoints";
	for (uint32_t i = 0; i < h->count; i++) {
		const struct bm_cbt_entry *e = &h->cp[i];

		if (!bm_cbt_name_ok(e->name))
			return "a checkpoint name is not 1 to 64 bytes of "
			       "[A-Za-z0-9._-]";
		if (e->id >= h->next_id || (i && e->id <= h->cp[i - 1].id))
			return "checkpoint ids out of order";
		if (e->flags & ~(uint32_t)(BM_CBT_LOST | BM_CBT_DAMAGED))
			return "unknown checkpoint flags";
		for (uint32_t j = 0; j < i; j++)
			if (strcmp(h->cp[j].name, e->name) == 0)
				return "two checkpoints with one name";
	}
	return NULL;
}

static uint64_t
header_hash(const uint8_t *buf, size_t size)
{
	return XXH3_64bits_withSeed(buf + BM_CBT_HEADER_FIXED,
				    size - BM_CBT_HEADER_FIXED,
				    XXH3_64bits(buf, H_HASH));
}

int
bm_cbt_header_encode(const struct bm_cbt_header *h, uint8_t *buf)
{
	size_t size = bm_cbt_header_size(h->count);
	const char *why = geometry_problem(h->disk_size, h->granularity);

	if (!why)
		why = list_problem(h);
	if (!why && (h->flags & ~BM_CBT_IN_USE))
		why = "unknown flags";
	if (why)
		return bm_error(-EINVAL, "tracker header: %s", why);
	memset(buf, 0, size);
	memcpy(buf, magic, sizeof magic);
	bm_put_be32(buf + H_VERSION, CBT_VERSION);
	bm_put_be32(buf + H_FLAGS, h->flags);
	bm_put_be64(buf + H_DISK_SIZE, h->disk_size);
	bm_put_be32(buf + H_GRANULARITY, h->granularity);
	bm_put_be32(buf + H_COUNT, h->count);
	bm_put_be64(buf + H_NEXT_ID, h->next_id);
	bm_put_be64(buf + H_BITMAP_SIZE,
		    bm_cbt_bitmap_size(h->disk_size, h->granularity));
	bm_put_be32(buf + H_HEADER_SIZE, (uint32_t)size);
	for (uint32_t i = 0; i < h->count; i++) {
		uint8_t *e = buf + BM_CBT_HEADER_FIXED + i * BM_CBT_ENTRY_SIZE;
		size_t n = strlen(h->cp[i].name);

		bm_put_be64(e + E_ID, h->cp[i].id);
		bm_put_be64(e + E_CREATED, h->cp[i].created);
		bm_put_be32(e + E_FLAGS, h->cp[i].flags);
		e[E_NAME_LEN] = (uint8_t)n;
		memcpy(e + E_NAME, h->cp[i].name, n);
	}
	bm_put_be64(buf + H_HASH, header_hash(buf, size));
	return 0;
}

static int
bad(const char *what)
{
	return bm_error(-EBADMSG, "tracker header: %s", what);
}

int
bm_cbt_header_peek(const uint8_t *buf, size_t len, size_t *size)
{
	uint32_t count;

	if (len < BM_CBT_HEADER_FIXED)
		return bad("truncated");
	if (memcmp(buf, magic, sizeof magic) != 0)
		return bad("bad magic (not a changed-block tracker)");
	if (bm_get_be32(buf + H_VERSION) != CBT_VERSION)
		return bad("unknown version");
	count = bm_get_be32(buf + H_COUNT);
	if (count > BM_CBT_MAX_CHECKPOINTS)
		return bad("too many checkpoints");
	*size = bm_cbt_header_size(count);
	if (bm_get_be32(buf + H_HEADER_SIZE) != *size)
		return bad("header size does not match the checkpoint count");
	return 0;
}

static bool
all_zero(const uint8_t *p, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (p[i])
			return false;
	return true;
}

static int
decode_entry(const uint8_t *e, struct bm_cbt_entry *out)
{
	size_t n = e[E_NAME_LEN];

	if (!all_zero(e + E_RESERVED, E_NAME - E_RESERVED) ||
	    !all_zero(e + E_TAIL, BM_CBT_ENTRY_SIZE - E_TAIL))
		return bad("reserved checkpoint field set");
	if (n == 0 || n > BM_CBT_NAME_MAX ||
	    !all_zero(e + E_NAME + n, BM_CBT_NAME_MAX - n))
		return bad("bad checkpoint name length");
	out->id = bm_get_be64(e + E_ID);
	out->created = bm_get_be64(e + E_CREATED);
	out->flags = bm_get_be32(e + E_FLAGS);
	memcpy(out->name, e + E_NAME, n);
	out->name[n] = '\0';
	return 0;
}

int
bm_cbt_header_decode(const uint8_t *buf, size_t len, struct bm_cbt_header *h)
{
	const char *why;
	size_t size;
	int r;

	memset(h, 0, sizeof *h);
	r = bm_cbt_header_peek(buf, len, &size);
	if (r < 0)
		return r;
	if (len < size)
		return bad("truncated");
	if (bm_get_be64(buf + H_HASH) != header_hash(buf, size))
		return bad("checksum mismatch");
	h->flags = bm_get_be32(buf + H_FLAGS);
	h->disk_size = bm_get_be64(buf + H_DISK_SIZE);
	h->granularity = bm_get_be32(buf + H_GRANULARITY);
	h->count = bm_get_be32(buf + H_COUNT);
	h->next_id = bm_get_be64(buf + H_NEXT_ID);
	if (h->flags & ~BM_CBT_IN_USE)
		return bad("unknown flags");
	if (bm_get_be32(buf + H_RESERVED) != 0)
		return bad("reserved field set");
	why = geometry_problem(h->disk_size, h->granularity);
	if (why)
		return bad(why);
	if (bm_get_be64(buf + H_BITMAP_SIZE) !=
	    bm_cbt_bitmap_size(h->disk_size, h->granularity))
		return bad("bitmap size does not match the geometry");
	if (!all_zero(buf + BM_CBT_HEADER_FIXED + h->count * BM_CBT_ENTRY_SIZE,
		      size - BM_CBT_HEADER_FIXED -
		      h->count * BM_CBT_ENTRY_SIZE))
		return bad("padding not zero");
	h->cp = calloc(h->count ? h->count : 1, sizeof *h->cp);
	if (!h->cp)
		return bm_error(-ENOMEM, "out of memory");
	for (uint32_t i = 0; i < h->count && r == 0; i++)
		r = decode_entry(buf + BM_CBT_HEADER_FIXED +
				 i * BM_CBT_ENTRY_SIZE, &h->cp[i]);
	if (r == 0 && (why = list_problem(h)) != NULL)
		r = bad(why);
	if (r < 0) {
		free(h->cp);
		h->cp = NULL;
	}
	return r;
}

void
bm_cbt_bits_encode(const uint64_t *words, const uint64_t *also,
		   uint64_t blocks, uint64_t page, uint64_t npages,
		   uint8_t *buf)
{
	uint64_t nwords = (blocks + 63) / 64;

	for (uint64_t i = 0; i < npages * WORDS_PER_PAGE; i++) {
		uint64_t wi = page * WORDS_PER_PAGE + i;
		uint64_t w = wi < nwords ? words[wi] | (also ? also[wi] : 0)
					 : 0;

		/* Little-endian bytes: block b is bit b % 8 of byte b / 8. */
		bm_put_be64(buf + 8 * i, __builtin_bswap64(w));
	}
}

uint64_t
bm_cbt_bits_decode(const uint8_t *buf, uint64_t blocks, uint64_t page,
		   uint64_t npages, uint64_t *words)
{
	uint64_t nwords = (blocks + 63) / 64, added = 0;
	uint64_t last = blocks % 64 ? (UINT64_C(1) << (blocks % 64)) - 1
				    : ~UINT64_C(0);

	/* Check first: a damaged page changes nothing. */
	for (uint64_t i = 0; i < npages * WORDS_PER_PAGE; i++) {
		uint64_t wi = page * WORDS_PER_PAGE + i;
		uint64_t w = __builtin_bswap64(bm_get_be64(buf + 8 * i));

		if (w && (wi >= nwords || (wi == nwords - 1 && (w & ~last))))
			return UINT64_MAX;
	}
	for (uint64_t i = 0; i < npages * WORDS_PER_PAGE; i++) {
		uint64_t wi = page * WORDS_PER_PAGE + i;
		uint64_t w = __builtin_bswap64(bm_get_be64(buf + 8 * i));

		if (wi >= nwords)
			break;
		added += (uint64_t)__builtin_popcountll(w & ~words[wi]);
		words[wi] |= w;
	}
	return added;
}
