/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The on-disk format of a job's crash-resumable state (docs/state.md):
 * buffers in, structs out, no I/O.
 *
 * A state file is a 4 KiB move record followed by two bitmap slots.  The
 * record is written once, before the move starts.  The slots are written
 * alternately, each with a sequence number one higher than the last; a
 * slot's checksum covers its header and its bitmap, and its header repeats
 * the record's checksum, so a slot from another move never passes.
 *
 * The invariant the parser protects: a state is trusted only if every
 * field checks out.  A torn slot write leaves the other slot, which was
 * complete and durable before the torn one began, so the newest valid
 * slot is always a superset of what must be copied again.  Anything else
 * that does not check out is reported, never repaired.
 *
 * Integers are big-endian; checksums are XXH3-64 (stored big-endian).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <xxhash.h>

#include "errors.h"
#include "internal.h"
#include "state.h"

static const uint8_t record_magic[8] = { 'B', 'M', 'S', 'T', 'A', 'T', 'E', 0 };
static const uint8_t slot_magic[8] = { 'B', 'M', 'D', 'I', 'R', 'T', 'Y', 0 };
#define STATE_VERSION 1u

/* Record layout. */
#define R_VERSION 8
#define R_DISK_SIZE 16
#define R_GRANULARITY 24
#define R_REGION 32
#define R_MODE 40
#define R_SRC_FMT 44
#define R_DST_FMT 48
#define R_SRC_LEN 52
#define R_DST_LEN 54
#define R_RESERVED 56
#define R_NAMES 64
#define R_HASH (BM_STATE_RECORD_SIZE - 8)

/* Slot header layout. */
#define S_VERSION 8
#define S_PHASE 12
#define S_SEQ 16
#define S_RECORD 24
#define S_REGION 32
#define S_REGIONS 40
#define S_RESERVED 48
#define S_HASH 56

/* The last enum values the record may hold (blockmirror.h). */
#define MAX_MODE 2u
#define MAX_FORMAT 16u

uint64_t
bm_state_regions(uint64_t disk_size, uint64_t region_size)
{
	return disk_size / region_size + (disk_size % region_size != 0);
}

static uint64_t
bitmap_bytes(uint64_t regions)
{
	return (regions + 7) / 8;
}

size_t
bm_state_slot_size(uint64_t regions)
{
	return (size_t)bm_round_up(BM_STATE_SLOT_HEADER + bitmap_bytes(regions),
				   4096);
}

static bool
name_ok(const char *s)
{
	size_t n = s ? strlen(s) : 0;

	return n > 0 && n <= BM_STATE_MAX_NAME;
}

/* The checks shared by encode and decode: geometry that makes sense. */
static const char *
record_problem(const struct bm_state_record *r)
{
	if (!r->disk_size)
		return "the disk size is 0";
	if (!bm_is_power_of_2(r->granularity) || r->granularity < 4096 ||
	    r->granularity > (UINT64_C(64) << 20))
		return "the granularity is not a power of two from 4 KiB "
		       "to 64 MiB";
	if (!bm_is_power_of_2(r->region_size) ||
	    r->region_size < BM_STATE_MIN_REGION ||
	    r->region_size < r->granularity)
		return "the region size is not a power of two of at least "
		       "4 MiB and the granularity";
	if (bm_state_regions(r->disk_size, r->region_size) >
	    BM_STATE_MAX_REGIONS)
		return "too many regions";
	if (r->mode > MAX_MODE)
		return "unknown mode";
	if (r->src_format > MAX_FORMAT || r->dst_format > MAX_FORMAT)
		return "unknown format";
	return NULL;
}

int
bm_state_record_encode(const struct bm_state_record *r, uint8_t *buf,
		       uint64_t *hash)
{
	size_t sl, dl;
	const char *why = record_problem(r);

	if (why)
		return bm_error(-EINVAL, "state record: %s", why);
	if (!name_ok(r->source) || !name_ok(r->destination))
		return bm_error(-EINVAL, "state record: names must be 1 to %u "
				"bytes", BM_STATE_MAX_NAME);
	sl = strlen(r->source);
	dl = strlen(r->destination);
	memset(buf, 0, BM_STATE_RECORD_SIZE);
	memcpy(buf, record_magic, 8);
	bm_put_be32(buf + R_VERSION, STATE_VERSION);
	bm_put_be64(buf + R_DISK_SIZE, r->disk_size);
	bm_put_be64(buf + R_GRANULARITY, r->granularity);
	bm_put_be64(buf + R_REGION, r->region_size);
	bm_put_be32(buf + R_MODE, r->mode);
	bm_put_be32(buf + R_SRC_FMT, r->src_format);
	bm_put_be32(buf + R_DST_FMT, r->dst_format);
	bm_put_be16(buf + R_SRC_LEN, (uint16_t)sl);
	bm_put_be16(buf + R_DST_LEN, (uint16_t)dl);
	memcpy(buf + R_NAMES, r->source, sl);
	memcpy(buf + R_NAMES + sl, r->destination, dl);
	*hash = XXH3_64bits(buf, R_HASH);
	bm_put_be64(buf + R_HASH, *hash);
	return 0;
}

static int
bad(const char *what)
{
	return bm_error(-EBADMSG, "%s", what);
}

static char *
dup_name(const uint8_t *p, size_t len)
{
	char *s = malloc(len + 1);

	if (s) {
		memcpy(s, p, len);
		s[len] = '\0';
	}
	return s;
}

int
bm_state_record_decode(const uint8_t *buf, size_t len,
		       struct bm_state_record *r, uint64_t *hash)
{
	size_t sl, dl;
	const char *why;
	uint64_t h;

	memset(r, 0, sizeof *r);
	if (len < BM_STATE_RECORD_SIZE)
		return bad("state record: truncated");
	if (memcmp(buf, record_magic, 8) != 0)
		return bad("state record: bad magic");
	h = XXH3_64bits(buf, R_HASH);
	if (bm_get_be64(buf + R_HASH) != h)
		return bad("state record: checksum mismatch");
	if (bm_get_be32(buf + R_VERSION) != STATE_VERSION)
		return bad("state record: unknown version");
	if (bm_get_be64(buf + R_RESERVED) != 0)
		return bad("state record: reserved field set");
	r->disk_size = bm_get_be64(buf + R_DISK_SIZE);
	r->granularity = bm_get_be64(buf + R_GRANULARITY);
	r->region_size = bm_get_be64(buf + R_REGION);
	r->mode = bm_get_be32(buf + R_MODE);
	r->src_format = bm_get_be32(buf + R_SRC_FMT);
	r->dst_format = bm_get_be32(buf + R_DST_FMT);
	why = record_problem(r);
	if (why)
		return bm_error(-EBADMSG, "state record: %s", why);
	sl = bm_get_be16(buf + R_SRC_LEN);
	dl = bm_get_be16(buf + R_DST_LEN);
	if (!sl || !dl || sl > BM_STATE_MAX_NAME || dl > BM_STATE_MAX_NAME ||
	    R_NAMES + sl + dl > R_HASH)
		return bad("state record: bad name lengths");
	if (memchr(buf + R_NAMES, '\0', sl + dl))
		return bad("state record: NUL in a name");
	for (size_t i = R_NAMES + sl + dl; i < R_HASH; i++)
		if (buf[i])
			return bad("state record: padding not zero");
	r->source = dup_name(buf + R_NAMES, sl);
	r->destination = dup_name(buf + R_NAMES + sl, dl);
	if (!r->source || !r->destination) {
		bm_state_record_free(r);
		return bm_error(-ENOMEM, "out of memory");
	}
	*hash = h;
	return 0;
}

void
bm_state_record_free(struct bm_state_record *r)
{
	free(r->source);
	free(r->destination);
	r->source = r->destination = NULL;
}

static uint64_t
slot_hash(const uint8_t *buf, uint64_t regions)
{
	return XXH3_64bits_withSeed(buf + BM_STATE_SLOT_HEADER,
				    bitmap_bytes(regions),
				    XXH3_64bits(buf, S_HASH));
}

void
bm_state_slot_encode(uint8_t *buf, uint64_t seq, uint32_t phase,
		     uint64_t record_hash, uint64_t region_size,
		     uint64_t regions, const uint64_t *words)
{
	uint64_t n = bitmap_bytes(regions);

	memset(buf, 0, bm_state_slot_size(regions));
	memcpy(buf, slot_magic, 8);
	bm_put_be32(buf + S_VERSION, STATE_VERSION);
	bm_put_be32(buf + S_PHASE, phase);
	bm_put_be64(buf + S_SEQ, seq);
	bm_put_be64(buf + S_RECORD, record_hash);
	bm_put_be64(buf + S_REGION, region_size);
	bm_put_be64(buf + S_REGIONS, regions);
	/* Bit r of the bitmap is bit r % 8 of byte r / 8. */
	for (uint64_t i = 0; i < n; i++)
		buf[BM_STATE_SLOT_HEADER + i] =
			(uint8_t)(words[i / 8] >> (8 * (i % 8)));
	if (regions % 8)
		buf[BM_STATE_SLOT_HEADER + n - 1] &=
			(uint8_t)((1u << (regions % 8)) - 1);
	bm_put_be64(buf + S_HASH, slot_hash(buf, regions));
}

int
bm_state_slot_decode(const uint8_t *buf, size_t len, uint64_t record_hash,
		     uint64_t region_size, uint64_t regions, uint64_t *seq,
		     uint32_t *phase, uint64_t *words)
{
	uint64_t n = bitmap_bytes(regions);

	if (len < BM_STATE_SLOT_HEADER || len - BM_STATE_SLOT_HEADER < n)
		return bad("state bitmap: truncated");
	if (memcmp(buf, slot_magic, 8) != 0)
		return bad("state bitmap: bad magic");
	if (bm_get_be64(buf + S_HASH) != slot_hash(buf, regions))
		return bad("state bitmap: checksum mismatch");
	if (bm_get_be32(buf + S_VERSION) != STATE_VERSION)
		return bad("state bitmap: unknown version");
	if (bm_get_be64(buf + S_RECORD) != record_hash)
		return bad("state bitmap: belongs to another move");
	if (bm_get_be64(buf + S_REGION) != region_size ||
	    bm_get_be64(buf + S_REGIONS) != regions)
		return bad("state bitmap: geometry differs from the record");
	if (bm_get_be64(buf + S_RESERVED) != 0)
		return bad("state bitmap: reserved field set");
	*phase = bm_get_be32(buf + S_PHASE);
	if (*phase != BM_STATE_PHASE_COPYING)
		return bad("state bitmap: unknown phase");
	if (regions % 8 &&
	    buf[BM_STATE_SLOT_HEADER + n - 1] >> (regions % 8))
		return bad("state bitmap: bits set past the last region");
	*seq = bm_get_be64(buf + S_SEQ);
	memset(words, 0, (regions + 63) / 64 * 8);
	for (uint64_t i = 0; i < n; i++)
		words[i / 8] |= (uint64_t)buf[BM_STATE_SLOT_HEADER + i]
				<< (8 * (i % 8));
	return 0;
}

static uint64_t
count_bits(const uint64_t *words, uint64_t regions)
{
	uint64_t c = 0;

	for (uint64_t i = 0; i < (regions + 63) / 64; i++)
		c += (uint64_t)__builtin_popcountll(words[i]);
	return c;
}

int
bm_state_parse(const uint8_t *buf, size_t len, struct bm_state *st)
{
	uint64_t *w[2] = { NULL, NULL };
	uint64_t seq[2] = { 0, 0 };
	uint32_t phase[2] = { 0, 0 };
	int ok[2] = { -1, -1 };
	size_t slot, nwords;
	int r, best;

	memset(st, 0, sizeof *st);
	r = bm_state_record_decode(buf, len, &st->rec, &st->record_hash);
	if (r < 0)
		return r;
	st->regions = bm_state_regions(st->rec.disk_size, st->rec.region_size);
	slot = bm_state_slot_size(st->regions);
	nwords = (size_t)(st->regions + 63) / 64;
	for (int i = 0; i < 2; i++) {
		size_t off = BM_STATE_RECORD_SIZE + (size_t)i * slot;

		w[i] = calloc(nwords, sizeof(uint64_t));
		if (!w[i]) {
			r = bm_error(-ENOMEM, "out of memory");
			goto fail;
		}
		if (len < off)
			continue;
		ok[i] = bm_state_slot_decode(buf + off, BM_MIN(len - off, slot),
					     st->record_hash,
					     st->rec.region_size, st->regions,
					     &seq[i], &phase[i], w[i]);
	}
	if (ok[0] < 0 && ok[1] < 0) {
		char why[256];
		const char *m = blockmirror_last_error();

		/* Say why the second one failed (the first is alike). */
		snprintf(why, sizeof why, "%s", m ? m : "");
		r = bm_error(-EUCLEAN, "no valid slot (%s)", why);
		goto fail;
	}
	if (ok[0] == 0 && ok[1] == 0 && seq[0] == seq[1]) {
		r = bm_error(-EUCLEAN, "state bitmap: two slots with one "
			     "sequence number");
		goto fail;
	}
	best = ok[1] < 0 || (ok[0] == 0 && seq[0] > seq[1]) ? 0 : 1;
	st->words = w[best];
	free(w[!best]);
	st->seq = seq[best];
	st->phase = phase[best];
	st->regions_dirty = count_bits(st->words, st->regions);
	return 0;
fail:
	free(w[0]);
	free(w[1]);
	return r;
}

void
bm_state_free(struct bm_state *st)
{
	bm_state_record_free(&st->rec);
	free(st->words);
	st->words = NULL;
}
