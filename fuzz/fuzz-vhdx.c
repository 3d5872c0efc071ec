/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Fuzz target for VHDX: the input is a whole image file.  The pure
 * parsers see the fixed structures straight from the input (headers,
 * region tables, a metadata region, log entries at every sector); then
 * the driver opens the image from memory and maps it: read-only (a
 * pending log is searched and laid over the reads), writable with last
 * byte 'W' (the log is replayed, blocks allocated), or through the full
 * engine with last byte 'E' (fuzz-image.h).  Nothing may crash, leak or
 * read out of bounds; errors are fine.
 *
 * A VHDX file is mostly zeroes (every region is 1 MiB-aligned), so an
 * input that starts with "VHDXSP01" is a sparse image: a u64 file size,
 * then records (u64 offset, u32 length, bytes), all little-endian.  The
 * seeds use it (fuzz/make-corpus-vhdx.sh); any other input is the file.
 */
#include <stdint.h>

#include "fuzz-image.h"
#include "vhdx.h"

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

/* Lay out the image an input describes.  0 or -1. */
static int
layout(const uint8_t *data, size_t size, struct fuzz_sink *k)
{
	uint64_t fsize;
	size_t p = 16;

	if (size < 16 || memcmp(data, "VHDXSP01", 8) != 0)
		return k->put(k, data, size, 0);
	fsize = vhdx_le64(data + 8);
	if (fsize > (1ull << 30) || k->resize(k, fsize) < 0)
		return -1;
	while (p + 12 <= size) {
		uint64_t off = vhdx_le64(data + p);
		uint32_t len = vhdx_le32(data + p + 8);

		p += 12;
		if (len > size - p)
			len = (uint32_t)(size - p);
		if (off > fsize || len > fsize - off)
			return -1;
		if (k->put(k, data + p, len, off) < 0)
			return -1;
		p += len;
	}
	return 0;
}

static const struct fuzz_target target = {
	.name = "fuzz-vhdx",
	.drv = &bm_vhdx_driver,
	.format = BLOCKMIRROR_FORMAT_VHDX,
	.layout = layout,
	.backing_is_read = true,
};

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	parse_direct(data, size);
	fuzz_image(&target, data, size);
	return 0;
}
