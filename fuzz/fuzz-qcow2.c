/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Fuzz target for qcow2: the input is an image file.  The pure parsers
 * of qcow2-parse.c see it directly (the header and extensions, every
 * 8-byte word as an L2 entry, the first bytes as a compressed stream
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
		bm_qcow2_header_free(&h);
	}
	for (size_t i = 0; i + 8 <= size && i < 4096; i += 8) {
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

static const struct fuzz_target target = {
	.name = "fuzz-qcow2",
	.drv = &bm_qcow2_driver,
	.format = BLOCKMIRROR_FORMAT_QCOW2,
	.layout = layout,
};

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	parse_direct(data, size);
	fuzz_image(&target, data, size);
	return 0;
}
