/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Fuzz target for qcow2: the input is an image file.  The pure parsers
 * of qcow2-parse.c and qcow2-bitmap.c see it directly (the header and
 * extensions, the bitmap directory it names, each
 * 8-byte word of the first sector as an L2 entry (the driver decodes
 * the real tables), the first bytes as a compressed stream
 * and as refcount blocks of each width); then the driver opens it from
 * memory and maps it, read-only or (last byte 'W') writable, or the
 * full engine opens it (last byte 'E'): see fuzz-image.h.  Nothing may
 * crash, hang, leak or read out of bounds; errors are expected.
 *
 * Tables past the end of the input read as zeroes, so the seeds
 * (fuzz/make-corpus-qcow2.sh) are small images truncated after their
 * last metadata cluster.
 */
#include <stdint.h>

#include "fuzz-image.h"
#include "qcow2.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void
parse_direct(const uint8_t *data, size_t size)
{
	static uint8_t out[1u << 16];
	struct bm_qcow2_header h;
	struct bm_qcow2_l2 e;
	uint32_t cb = 16;

	if (bm_qcow2_header_parse("f", data, size, &h) == 0) {
		cb = h.cluster_bits;
		/* The bitmap directory where the header says (or at 0), as
		 * much of it as the input holds. */
		if (h.has_bitmaps) {
			uint64_t off = h.bitmaps_dir_offset < size ?
				       h.bitmaps_dir_offset : 0;
			struct bm_qcow2_bitmap *b;

			h.bitmaps_dir_size = BM_MIN(h.bitmaps_dir_size,
						    size - off);
			if (bm_qcow2_bitmap_dir_parse("f", &h, data + off,
						      h.bitmaps_dir_size,
						      &b) == 0)
				bm_qcow2_bitmaps_free(b, h.bitmaps_nb);
		}
		bm_qcow2_header_free(&h);
	}
	for (size_t i = 0; i + 8 <= size && i < 512; i += 8) {
		uint64_t first, count;

		if (bm_qcow2_l2_decode("f", bm_get_be64(data + i), cb, 3, &e, 0,
				       i / 8) == 0 &&
		    e.kind == BM_QCOW2_COMPRESSED)
			bm_qcow2_compressed_span(&e, cb, &first, &count);
	}
	bm_qcow2_decompress(BM_QCOW2_ZLIB, data, size, out, 4096);
	/* A zstd frame starts with its magic, and the decompression
	 * context costs more than the rest of an input: only frames. */
	if (size >= 4 && bm_get_be32(data) == 0x28b52ffd)
		bm_qcow2_decompress(BM_QCOW2_ZSTD, data, size, out, 4096);
	for (uint32_t order = 0; order <= 6 && size >= 8; order++)
		bm_qcow2_refcount_get(data, order, (size * 8 >> order) - 1);
}

static int
layout(const uint8_t *data, size_t size, struct fuzz_sink *k)
{
	return k->put(k, data, size, 0);
}

/*
 * What the harness lets an input cost (fuzz-image.h).  The driver reads
 * cluster 0 and the L1 and refcount tables whole at open, and every
 * table it loads is a cluster (up to 2 MiB); a writable image copies
 * and flushes whole clusters; allocated() reads every L2 table of the
 * guest range.  Images past these limits are rare but cost milliseconds
 * each: big tables only go through the parsers, big clusters reach the
 * driver read-only and for one input in BIG_ONE_IN (by checksum, so
 * always the same inputs).
 */
#define MAX_TABLE_BYTES (UINT64_C(1) << 20)
#define MAX_CLUSTER_BITS 16
#define BIG_ONE_IN 8
#define MAX_WALK_ENTRIES 4096

static unsigned
limits(const uint8_t *data, size_t size)
{
	uint8_t h[72] = { 0 };
	uint64_t vsize, cs, per_l2, clusters, tables;
	uint32_t cb;
	unsigned r = 0;

	/* The file reads as zeroes past the input. */
	memcpy(h, data, BM_MIN(size, sizeof h));
	cb = bm_get_be32(h + 20);
	/* Anything else fails the driver's first checks at once. */
	if (bm_get_be32(h) != BM_QCOW2_MAGIC ||
	    cb < BM_QCOW2_MIN_CLUSTER_BITS || cb > BM_QCOW2_MAX_CLUSTER_BITS)
		return 0;
	cs = UINT64_C(1) << cb;
	tables = (uint64_t)bm_get_be32(h + 36) * 8 +
		 ((uint64_t)bm_get_be32(h + 56) << cb);
	if (tables > MAX_TABLE_BYTES)
		return FUZZ_SKIP;
	if (cb > MAX_CLUSTER_BITS) {
		if (bm_crc32c(0, data, size) % BIG_ONE_IN)
			return FUZZ_SKIP;
		r |= FUZZ_NO_WRITE;
	}
	/* Every L2 table that may be walked has cs / 8 entries. */
	vsize = bm_get_be64(h + 24);
	per_l2 = cs / 8;
	clusters = vsize / cs + 1;
	if (clusters > MAX_WALK_ENTRIES ||
	    (clusters + per_l2 - 1) / per_l2 * per_l2 > MAX_WALK_ENTRIES)
		r |= FUZZ_NO_WALK;
	return r;
}

static const struct fuzz_target target = {
	.name = "fuzz-qcow2",
	.drv = &bm_qcow2_driver,
	.format = BLOCKMIRROR_FORMAT_QCOW2,
	.layout = layout,
	.limits = limits,
};

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	parse_direct(data, size);
	fuzz_image(&target, data, size);
	return 0;
}
