/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Fuzz target for qcow2: the input is an image file.  The pure parsers
 * of qcow2-parse.c see it directly (the header and extensions, every
 * 8-byte word as an L2 entry, the first bytes as a compressed stream
 * and as refcount blocks of each width); then it is opened read-only
 * through the engine from a memfd, a prefix of its guest range is read
 * and block-statused in chunks, and it is closed.  Nothing may crash,
 * hang, leak or read out of bounds; errors are expected.
 *
 * Tables past the end of the input read as zeroes, so the seeds
 * (fuzz/make-corpus-qcow2.sh) are small images truncated after their
 * last metadata cluster.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "errors.h"
#include "extent.h"
#include "format.h"
#include "image.h"
#include "internal.h"
#include "loop.h"
#include "qcow2.h"

#define CHUNK (1u << 20)
#define READ_LIMIT (16u << 20)

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
	bm_qcow2_decompress(BM_QCOW2_ZSTD, data, size, out, 4096);
	for (uint32_t order = 0; order <= 6 && size >= 8; order++)
		bm_qcow2_refcount_get(data, order, (size * 8 >> order) - 1);
}

static void
open_and_read(const char *path)
{
	static struct bm_loop *loop;
	struct bm_image *img;
	uint8_t *buf;

	if (!loop && bm_loop_new(32, &loop) < 0)
		abort();
	if (bm_image_open(loop, path, BLOCKMIRROR_FORMAT_QCOW2, 0, &img) < 0)
		return;
	buf = malloc(CHUNK);
	for (uint64_t off = 0; buf && off < img->size && off < READ_LIMIT;
	     off += CHUNK) {
		uint64_t n = BM_MIN(img->size - off, (uint64_t)CHUNK);
		struct bm_extent_list l = { 0 };
		struct bm_io r = { .offset = off, .length = n, .buf = buf };
		struct bm_io s = { .offset = off, .length = n, .extents = &l };

		bm_image_sync(img, bm_image_block_status, &s);
		bm_extent_list_free(&l);
		if (bm_image_sync(img, bm_image_read, &r) < 0)
			break;
	}
	free(buf);
	bm_image_data_bytes(img);
	bm_image_close(img);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char path[64];
	int fd;

	parse_direct(data, size);
	fd = memfd_create("fuzz-qcow2", 0);
	if (fd < 0)
		return 0;
	if (write(fd, data, size) == (ssize_t)size) {
		snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
		open_and_read(path);
	}
	close(fd);
	bm_error_clear();
	return 0;
}
