/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Fuzz target for the changed-block tracker's sidecar header
 * (lib/cbt-format.c, docs/cbt.md).  Two ways in:
 *  - the input as a header, straight into bm_cbt_header_decode, and its
 *    first page as a bitmap page into bm_cbt_bits_decode;
 *  - the input as a recipe: a valid header with three checkpoints is
 *    built with the encoder, the input (three bytes at a time: a 16-bit
 *    position, a mask) flips bits in it, and the checksum is computed
 *    again, so the checks behind it are reached.
 * A header that decodes must encode again and decode to the same thing
 * (abort otherwise).  Errors are expected; crashes, leaks and
 * out-of-bounds reads are not.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <xxhash.h>

#include "cbt.h"
#include "errors.h"
#include "internal.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void
same(const struct bm_cbt_header *a, const struct bm_cbt_header *b)
{
	if (a->flags != b->flags || a->disk_size != b->disk_size ||
	    a->granularity != b->granularity || a->next_id != b->next_id ||
	    a->count != b->count)
		abort();
	for (uint32_t i = 0; i < a->count; i++)
		if (a->cp[i].id != b->cp[i].id ||
		    a->cp[i].created != b->cp[i].created ||
		    a->cp[i].flags != b->cp[i].flags ||
		    strcmp(a->cp[i].name, b->cp[i].name) != 0)
			abort();
}

static void
parse(const uint8_t *buf, size_t len)
{
	struct bm_cbt_header h, h2;
	uint8_t *again;

	if (bm_cbt_header_decode(buf, len, &h) < 0)
		return;
	again = malloc(bm_cbt_header_size(h.count));
	if (again) {
		if (bm_cbt_header_encode(&h, again) < 0 ||
		    bm_cbt_header_decode(again, bm_cbt_header_size(h.count),
					 &h2) < 0)
			abort();
		same(&h, &h2);
		free(h2.cp);
	}
	free(again);
	free(h.cp);
}

static void
recipe(const uint8_t *data, size_t size)
{
	struct bm_cbt_entry e[3] = {
		{ .id = 3, .created = 1700000000, .name = "a" },
		{ .id = 5, .created = 1700000001, .flags = BM_CBT_LOST,
		  .name = "daily.2024-01-02" },
		{ .id = 6, .created = 1700000002, .name = "x_Y-9" },
	};
	struct bm_cbt_header h = {
		.flags = BM_CBT_IN_USE,
		.disk_size = (UINT64_C(1) << 20) * (1 + data[0] % 200) + 512,
		.granularity = 65536,
		.next_id = 7,
		.count = 3,
		.cp = e,
	};
	size_t len = bm_cbt_header_size(3);
	uint8_t *buf = malloc(len);
	uint64_t hash;

	if (!buf || bm_cbt_header_encode(&h, buf) < 0)
		goto out;
	for (size_t i = 1; i + 3 <= size; i += 3)
		buf[((size_t)data[i] << 8 | data[i + 1]) % len] ^= data[i + 2];
	hash = XXH3_64bits_withSeed(buf + BM_CBT_HEADER_FIXED,
				    len - BM_CBT_HEADER_FIXED,
				    XXH3_64bits(buf, 56));
	bm_put_be64(buf + 56, hash);
	parse(buf, len);
	parse(buf, len / 2); /* cut short */
out:
	free(buf);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	uint64_t words[BM_CBT_PAGE / 8];

	if (size == 0)
		return 0;
	parse(data, size);
	if (size >= BM_CBT_PAGE) {
		memset(words, 0, sizeof words);
		bm_cbt_bits_decode(data, 1 + data[0] * 128u, 0, 1, words);
	}
	if (size < 512)
		recipe(data, size);
	bm_error_clear();
	return 0;
}
