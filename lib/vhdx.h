/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * VHDX on-disk structures ([MS-VHDX]) as pure buffer functions: decode
 * and validate, or encode, one structure held in memory.  Nothing here
 * does I/O, so the driver (vhdx.c), the log (vhdx-log.c), the unit test
 * and the fuzzer share the same checks.
 *
 * Every integer is little-endian.  GUIDs are kept as the 16 bytes the
 * file holds (Microsoft layout: data1 u32 LE, data2 and data3 u16 LE,
 * data4 as is).  Decoders treat their input as hostile: every offset,
 * length and count is range-checked, and a failure sets the thread's
 * error (bm_error) naming the image and the field, and returns -EINVAL
 * (-ENOTSUP for well-formed features this driver does not implement).
 */
#ifndef BM_VHDX_H
#define BM_VHDX_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define VHDX_KiB 1024u
#define VHDX_MiB (1024u * 1024u)

/* File layout: the fixed part of the first MiB. */
#define VHDX_FILE_ID_OFFSET 0
#define VHDX_HEADER1_OFFSET (64 * VHDX_KiB)
#define VHDX_HEADER2_OFFSET (128 * VHDX_KiB)
#define VHDX_REGION1_OFFSET (192 * VHDX_KiB)
#define VHDX_REGION2_OFFSET (256 * VHDX_KiB)
#define VHDX_HEADER_SIZE 4096u
#define VHDX_REGION_SIZE (64 * VHDX_KiB)
#define VHDX_METADATA_TABLE_SIZE (64 * VHDX_KiB)
#define VHDX_LOG_SECTOR 4096u
#define VHDX_MIN_BLOCK VHDX_MiB
#define VHDX_MAX_BLOCK (256 * VHDX_MiB)
#define VHDX_MAX_SIZE (UINT64_C(64) << 40)
#define VHDX_MAX_ENTRIES 2047u

/* Payload BAT entry states. */
enum {
	VHDX_BAT_NOT_PRESENT = 0,
	VHDX_BAT_UNDEFINED = 1,
	VHDX_BAT_ZERO = 2,
	VHDX_BAT_UNMAPPED = 3,
	VHDX_BAT_UNMAPPED_V095 = 5, /* UNMAPPED before spec 1.00 */
	VHDX_BAT_FULLY_PRESENT = 6,
	VHDX_BAT_PARTIALLY_PRESENT = 7,
};
/* Sector bitmap BAT entry states. */
enum {
	VHDX_SB_NOT_PRESENT = 0,
	VHDX_SB_PRESENT = 6,
};

/* ---- little-endian access -------------------------------------------- */

static inline uint16_t
vhdx_le16(const uint8_t *p)
{
	return (uint16_t)(p[0] | p[1] << 8);
}

static inline uint32_t
vhdx_le32(const uint8_t *p)
{
	return (uint32_t)vhdx_le16(p) | (uint32_t)vhdx_le16(p + 2) << 16;
}

static inline uint64_t
vhdx_le64(const uint8_t *p)
{
	return (uint64_t)vhdx_le32(p) | (uint64_t)vhdx_le32(p + 4) << 32;
}

static inline void
vhdx_put_le16(uint8_t *p, uint16_t v)
{
	p[0] = (uint8_t)v;
	p[1] = (uint8_t)(v >> 8);
}

static inline void
vhdx_put_le32(uint8_t *p, uint32_t v)
{
	vhdx_put_le16(p, (uint16_t)v);
	vhdx_put_le16(p + 2, (uint16_t)(v >> 16));
}

static inline void
vhdx_put_le64(uint8_t *p, uint64_t v)
{
	vhdx_put_le32(p, (uint32_t)v);
	vhdx_put_le32(p + 4, (uint32_t)(v >> 32));
}

/* ---- GUIDs ------------------------------------------------------------ */

extern const uint8_t vhdx_guid_bat[16];
extern const uint8_t vhdx_guid_metadata[16];
extern const uint8_t vhdx_guid_file_parameters[16];
extern const uint8_t vhdx_guid_virtual_disk_size[16];
extern const uint8_t vhdx_guid_page83[16];
extern const uint8_t vhdx_guid_logical_sector[16];
extern const uint8_t vhdx_guid_physical_sector[16];
extern const uint8_t vhdx_guid_parent_locator[16];
extern const uint8_t vhdx_guid_locator_type[16];

bool vhdx_guid_is_zero(const uint8_t g[16]);
/* A fresh random (version 4) GUID, in file layout. */
void vhdx_guid_generate(uint8_t g[16]);
/* "{xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx}", lowercase, 39 bytes with NUL. */
void vhdx_guid_format(const uint8_t g[16], char out[39]);
/* Parse the text form, braces optional, any case.  0 or -EINVAL. */
int vhdx_guid_parse(const char *s, uint8_t g[16]);

/* ---- headers ---------------------------------------------------------- */

struct vhdx_header {
	uint64_t seq;
	uint8_t file_write_guid[16];
	uint8_t data_write_guid[16];
	uint8_t log_guid[16];
	uint16_t log_version;
	uint16_t version;
	uint32_t log_length;
	uint64_t log_offset;
};

/*
 * Decode one 4 KiB header.  Returns 0 if signature, checksum and version
 * make it a valid header, else -EINVAL with *why saying which (no error
 * is recorded: one bad header is not an error).
 */
int vhdx_header_decode(const uint8_t *buf, struct vhdx_header *h,
		       const char **why);
/* Encode into 4 KiB (reserved bytes zero, checksum set). */
void vhdx_header_encode(const struct vhdx_header *h, uint8_t *buf);
/*
 * Pick the current header from the two 4 KiB slots and range-check its
 * fields.  *slot is 0 or 1.  0 or -EINVAL naming the problem.
 */
int vhdx_header_choose(const char *name, const uint8_t *h1,
		       const uint8_t *h2, struct vhdx_header *cur, int *slot);

/* ---- region table ----------------------------------------------------- */

struct vhdx_regions {
	uint64_t bat_offset;
	uint32_t bat_length;
	uint64_t meta_offset;
	uint32_t meta_length;
};

/* Decode and validate a 64 KiB region table.  0, -EINVAL or -ENOTSUP. */
int vhdx_region_table_decode(const char *name, const uint8_t *buf,
			     struct vhdx_regions *r);
void vhdx_region_table_encode(const struct vhdx_regions *r, uint8_t *buf);

/* ---- metadata --------------------------------------------------------- */

struct vhdx_meta {
	uint32_t block_size;
	bool leave_allocated;
	bool has_parent;
	uint64_t virtual_size;
	uint8_t page83[16];
	uint32_t logical_sector;
	uint32_t physical_sector;
	/* Parent locator (has_parent only): UTF-8, malloc'd, NULL if absent. */
	char *parent_linkage;
	char *parent_linkage2;
	char *relative_path;
	char *volume_path;
	char *absolute_win32_path;
};

/*
 * Decode the metadata region held in buf[0, len) (len may be less than
 * the region's length `region_length`, if the caller read only a
 * prefix).  Fills *m (free with vhdx_meta_free, also after an error).
 */
int vhdx_metadata_decode(const char *name, const uint8_t *buf, size_t len,
			 uint64_t region_length, struct vhdx_meta *m);
void vhdx_meta_free(struct vhdx_meta *m);
/*
 * Encode the metadata region for *m into buf (len bytes, zeroed by the
 * caller, at least 128 KiB).  The parent locator is written when
 * m->has_parent, from parent_linkage and the path fields.  0 or -EINVAL
 * (strings too long).
 */
int vhdx_metadata_encode(const struct vhdx_meta *m, uint8_t *buf, size_t len);

/* Pick the parent's path from the locator (relative_path, then
 * absolute_win32_path, then volume_path), with '\' turned into '/'.
 * malloc'd, or NULL with errno set. */
char *vhdx_parent_path(const struct vhdx_meta *m);

/* ---- BAT -------------------------------------------------------------- */

struct vhdx_geom {
	uint64_t chunk_ratio;       /* payload blocks per sector bitmap */
	uint64_t data_blocks;
	uint64_t bitmap_blocks;
	uint64_t bat_entries;       /* entries the BAT must hold */
	uint32_t sectors_per_block;
};

/* Derive and check the BAT geometry from the metadata.  0 or -EINVAL. */
int vhdx_geometry(const char *name, const struct vhdx_meta *m,
		  struct vhdx_geom *g);

static inline uint64_t
vhdx_bat_index(const struct vhdx_geom *g, uint64_t block)
{
	return block + block / g->chunk_ratio;
}

static inline uint64_t
vhdx_bitmap_index(const struct vhdx_geom *g, uint64_t chunk)
{
	return chunk * (g->chunk_ratio + 1) + g->chunk_ratio;
}

static inline unsigned
vhdx_bat_state(uint64_t e)
{
	return (unsigned)(e & 7);
}

static inline uint64_t
vhdx_bat_offset(uint64_t e)
{
	return e >> 20 << 20;
}

static inline uint64_t
vhdx_bat_entry(unsigned state, uint64_t offset)
{
	return (offset >> 20 << 20) | state;
}

/* A range of the file (for overlap checks). */
struct vhdx_range {
	uint64_t offset;
	uint64_t length;
	const char *what;
};

/*
 * Check every BAT entry: known state for its kind (payload or sector
 * bitmap, differencing or not), blocks 1 MiB-aligned, inside the file,
 * clear of `fixed` (the first MiB, log, BAT, metadata) and of each other.
 * `bat` holds g->bat_entries host-order entries.
 */
int vhdx_bat_check(const char *name, const uint64_t *bat,
		   const struct vhdx_geom *g, const struct vhdx_meta *m,
		   const struct vhdx_range *fixed, size_t nfixed,
		   uint64_t file_size);

/* ---- log -------------------------------------------------------------- */

struct vhdx_log_entry {
	uint32_t entry_length;
	uint32_t tail;
	uint64_t seq;
	uint32_t desc_count;
	uint8_t log_guid[16];
	uint64_t flushed_file_offset;
	uint64_t last_file_offset;
};

/* One change carried by a log entry. */
struct vhdx_log_desc {
	uint64_t file_offset;       /* 4 KiB-aligned */
	uint64_t zero_length;       /* zero descriptor: bytes to zero */
	const uint8_t *data;        /* data descriptor: the 4 KiB sector;
				     * NULL for a zero descriptor */
};

/* Bytes an entry with n data descriptors and z zero descriptors takes. */
uint64_t vhdx_log_entry_size(size_t ndata, size_t nzero);

/*
 * Build an entry into buf (vhdx_log_entry_size bytes): e gives seq,
 * tail, guid and file offsets (entry_length and desc_count are
 * computed).  Checksum set.
 */
void vhdx_log_entry_encode(const struct vhdx_log_entry *e,
			   const struct vhdx_log_desc *d, size_t n,
			   uint8_t *buf);

/*
 * Is there a valid entry of log `guid` at buf (avail contiguous bytes)?
 * 1 yes (*e filled), 0 no (a torn, stale or foreign entry: not an
 * error), -EINVAL if the entry is complete (checksum and GUID right) but
 * malformed inside, naming the problem with `where` (log position).
 */
int vhdx_log_entry_check(const char *name, const uint8_t *buf, size_t avail,
			 const uint8_t guid[16], uint64_t where,
			 struct vhdx_log_entry *e);

/*
 * Descriptor i of a checked entry: fills *d (data points at the
 * reassembled sector in `sector`, 4 KiB, for data descriptors).  *k
 * counts the data descriptors seen so far: start at 0 and walk i up.
 */
void vhdx_log_entry_desc(const uint8_t *buf, uint32_t i, uint64_t *k,
			 uint8_t *sector, struct vhdx_log_desc *d);

/* ---- log search, replay and writing (vhdx-log.c) --------------------- */

/* The file under the log code: the driver's bm_fmt_* calls, or a plain
 * file descriptor in tests.  Each returns 0 or -errno (error set). */
struct vhdx_log_io {
	const char *name;
	void *opaque;
	int (*pread)(void *opaque, void *buf, size_t len, uint64_t off);
	int (*pwrite)(void *opaque, const void *buf, size_t len, uint64_t off);
	int (*zero)(void *opaque, uint64_t off, uint64_t len);
	int (*truncate)(void *opaque, uint64_t size);
	int (*sync)(void *opaque);
	uint64_t (*size)(void *opaque);
};

/* The active sequence of a log, ready to replay. */
struct vhdx_log_seq {
	uint8_t *log;           /* the log region, twice over */
	uint32_t length;
	uint32_t tail;          /* log position of the first entry */
	uint32_t count;         /* entries from tail to head */
	uint64_t head_seq;
	uint64_t flushed_file_offset;
	uint64_t last_file_offset;
};

/*
 * Read the log that header h describes and find its active sequence.
 * 0 with *out NULL if there is nothing to replay, 0 with *out set, or
 * -errno: the log lies outside the file, a complete entry is malformed,
 * the file is shorter than the head's FlushedFileOffset, or an entry
 * writes where a log may not (the headers, past LastFileOffset).
 */
int vhdx_log_find(const struct vhdx_log_io *io, const struct vhdx_header *h,
		  struct vhdx_log_seq **out);
/* Write every entry of the sequence into the file, grow the file to
 * LastFileOffset, sync. */
int vhdx_log_apply(const struct vhdx_log_io *io, const struct vhdx_log_seq *s);
/* Patch buf (len bytes read at file offset off) with what the sequence
 * would write there: the read-only replay. */
void vhdx_log_overlay(const struct vhdx_log_seq *s, void *buf, size_t len,
		      uint64_t off);
/* Does every change of the sequence lie inside one of `ok`?  If not,
 * *bad is the first offending file offset. */
bool vhdx_log_within(const struct vhdx_log_seq *s,
		     const struct vhdx_range *ok, size_t nok, uint64_t *bad);
void vhdx_log_seq_free(struct vhdx_log_seq *s);

/* Where the next entry goes and its sequence number; zero it for a new
 * LogGuid. */
struct vhdx_log_writer {
	uint32_t pos;
	uint64_t seq;
};

/* The most data descriptors one entry can carry in a log of `length`. */
size_t vhdx_log_max_data(uint32_t length);
/*
 * Write one entry holding d[0, n) into the log of header h (whose
 * log_guid must be set), as a sequence of its own, and sync.  It is not
 * applied: the caller writes the same changes into the file next.
 * -ENOSPC if it cannot fit the log (split with vhdx_log_max_data).
 */
int vhdx_log_write(const struct vhdx_log_io *io, const struct vhdx_header *h,
		   struct vhdx_log_writer *w, const struct vhdx_log_desc *d,
		   size_t n);

/* ---- creation --------------------------------------------------------- */

/* The fixed first 64 KiB: "vhdxfile" and the creator string. */
void vhdx_file_id_encode(uint8_t *buf);

#endif /* BM_VHDX_H */
