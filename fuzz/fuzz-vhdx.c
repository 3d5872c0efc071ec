/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Fuzz target for VHDX: the input is a whole image file.  The pure
 * parsers see the fixed structures straight from the input (headers,
 * region tables, a metadata region, log entries at every sector); then
 * the image is opened read-only through the engine (so a pending log is
 * searched and laid over the reads), its whole guest range is read and
 * block-statused in chunks, and it is closed.  Nothing may crash, leak
 * or read out of bounds; errors are fine.
 *
 * A VHDX file is mostly zeroes (every region is 1 MiB-aligned), so an
 * input that starts with "VHDXSP01" is a sparse image: a u64 file size,
 * then records (u64 offset, u32 length, bytes), all little-endian.  The
 * seeds use it (fuzz/make-corpus-vhdx.sh); any other input is the file.
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
#include "loop.h"
#include "vhdx.h"

#define CHUNK (4u << 20)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void
parse_direct(const uint8_t *data, size_t size)
{
	static uint8_t big[VHDX_REGION_SIZE], meta[2 * VHDX_REGION_SIZE];
	struct vhdx_header h;
	struct vhdx_regions reg;
	struct vhdx_meta m;
	struct vhdx_log_entry e;
	const char *why;
	int slot;

	if (size >= VHDX_HEADER2_OFFSET + VHDX_HEADER_SIZE) {
		vhdx_header_decode(data + VHDX_HEADER1_OFFSET, &h, &why);
		vhdx_header_choose("f", data + VHDX_HEADER1_OFFSET,
				   data + VHDX_HEADER2_OFFSET, &h, &slot);
	}
	/* Short inputs are laid out as one structure each, zero-padded. */
	memset(big, 0, sizeof big);
	memcpy(big, data, size < sizeof big ? size : sizeof big);
	vhdx_region_table_decode("f", big, &reg);
	memset(meta, 0, sizeof meta);
	memcpy(meta, data, size < sizeof meta ? size : sizeof meta);
	if (vhdx_metadata_decode("f", meta, sizeof meta, sizeof meta, &m) == 0) {
		struct vhdx_geom g;
		char *p = vhdx_parent_path(&m);

		free(p);
		vhdx_geometry("f", &m, &g);
	}
	vhdx_meta_free(&m);
	for (size_t off = 0; off + VHDX_LOG_SECTOR <= size && off < (1u << 20);
	     off += VHDX_LOG_SECTOR) {
		uint8_t zero[16] = { 0 };

		if (vhdx_log_entry_check("f", data + off, size - off,
					 data + off + 32, off, &e) == 1)
			vhdx_log_entry_check("f", data + off, size - off, zero,
					     off, &e);
	}
}

static void
open_and_read(const char *path)
{
	static struct bm_loop *loop;
	struct bm_image *img;
	uint8_t *buf;

	if (!loop && bm_loop_new(32, &loop) < 0)
		abort();
	if (bm_image_open(loop, path, BLOCKMIRROR_FORMAT_VHDX, 0, &img) < 0)
		return;
	buf = malloc(CHUNK);
	for (uint64_t off = 0; buf && off < img->size; off += CHUNK) {
		uint64_t n = img->size - off < CHUNK ? img->size - off : CHUNK;
		struct bm_extent_list l = { 0 };
		struct bm_io r = { .offset = off, .length = n, .buf = buf };
		struct bm_io s = { .offset = off, .length = n, .extents = &l };

		if (bm_image_sync(img, bm_image_read, &r) < 0)
			break;
		bm_image_sync(img, bm_image_block_status, &s);
		bm_extent_list_free(&l);
		if (off >= (256u << 20))
			break;  /* huge virtual sizes: a prefix is enough */
	}
	free(buf);
	bm_image_close(img);
}

/* Write the image an input describes into fd.  0 or -1. */
static int
materialize(int fd, const uint8_t *data, size_t size)
{
	uint64_t fsize;
	size_t p = 16;

	if (size < 16 || memcmp(data, "VHDXSP01", 8) != 0)
		return write(fd, data, size) == (ssize_t)size ? 0 : -1;
	fsize = vhdx_le64(data + 8);
	if (fsize > (1ull << 30) || ftruncate(fd, (off_t)fsize) < 0)
		return -1;
	while (p + 12 <= size) {
		uint64_t off = vhdx_le64(data + p);
		uint32_t len = vhdx_le32(data + p + 8);

		p += 12;
		if (len > size - p)
			len = (uint32_t)(size - p);
		if (off > fsize || len > fsize - off)
			return -1;
		if (pwrite(fd, data + p, len, (off_t)off) != (ssize_t)len)
			return -1;
		p += len;
	}
	return 0;
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char path[64];
	int fd;

	parse_direct(data, size);
	fd = memfd_create("fuzz-vhdx", 0);
	if (fd < 0)
		return 0;
	if (materialize(fd, data, size) == 0) {
		snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
		open_and_read(path);
	}
	close(fd);
	bm_error_clear();
	return 0;
}
