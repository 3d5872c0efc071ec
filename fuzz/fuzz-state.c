/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Fuzz target for the persisted state of a crash-resumable move
 * (lib/state.c, docs/state.md).  Two ways in:
 *  - the input as a state file, straight into bm_state_parse (and the
 *    record alone into bm_state_record_decode);
 *  - the input as a recipe: its first byte picks a disk size, and a valid
 *    state file (a record and two bitmap slots, with their checksums) is
 *    built with the encoders, then the rest of the input, taken three
 *    bytes at a time (a 16-bit position, a mask), flips bits in it before
 *    it is parsed.  So the checks behind the checksums are reached too.
 * Errors are expected; crashes, leaks and out-of-bounds reads are not.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "errors.h"
#include "state.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void
parse(const uint8_t *buf, size_t len)
{
	struct bm_state st;
	struct bm_state_record r;
	uint64_t hash;

	if (bm_state_parse(buf, len, &st) == 0 ||
	    st.rec.source || st.rec.destination)
		bm_state_free(&st);
	if (bm_state_record_decode(buf, len, &r, &hash) == 0)
		bm_state_record_free(&r);
}

static void
recipe(const uint8_t *data, size_t size)
{
	struct bm_state_record r = {
		.disk_size = (UINT64_C(1) << 20) * (1 + data[0] % 200),
		.granularity = 65536,
		.region_size = BM_STATE_MIN_REGION,
		.mode = 1,
		.src_format = 1,
		.dst_format = 2,
		.source = (char *)"/vm/disk.raw",
		.destination = (char *)"/new/disk.qcow2",
	};
	uint64_t regions = bm_state_regions(r.disk_size, r.region_size);
	size_t slot = bm_state_slot_size(regions);
	size_t len = BM_STATE_RECORD_SIZE + 2 * slot;
	uint64_t *words = calloc((size_t)(regions + 63) / 64 + 1, 8);
	uint8_t *buf = calloc(1, len);
	uint64_t hash;

	if (!words || !buf ||
	    bm_state_record_encode(&r, buf, &hash) < 0)
		goto out;
	words[0] = UINT64_C(0x5555555555555555) &
		   ((regions >= 64) ? UINT64_MAX
				    : (UINT64_C(1) << regions) - 1);
	bm_state_slot_encode(buf + BM_STATE_RECORD_SIZE, 7,
			     BM_STATE_PHASE_COPYING, hash, r.region_size,
			     regions, words);
	bm_state_slot_encode(buf + BM_STATE_RECORD_SIZE + slot, 8,
			     BM_STATE_PHASE_COPYING, hash, r.region_size,
			     regions, words);
	for (size_t i = 1; i + 3 <= size; i += 3)
		buf[((size_t)data[i] << 8 | data[i + 1]) % len] ^= data[i + 2];
	parse(buf, len);
	parse(buf, len / 2); /* a file cut short */
out:
	free(words);
	free(buf);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size == 0)
		return 0;
	parse(data, size);
	if (size < 512)
		recipe(data, size);
	bm_error_clear();
	return 0;
}
