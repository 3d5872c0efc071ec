/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * qcow2 on-disk structures as pure buffer functions (qcow2-parse.c):
 * the header and its extensions, L1/L2 and refcount entries, compressed
 * cluster descriptors and their decompression.  Nothing here does I/O,
 * so the unit tests and the fuzzer call these directly; the driver
 * (qcow2.c) reads the bytes and hands them over.
 *
 * Every value taken from a buffer is untrusted.  The parser checks each
 * field before it is stored in struct bm_qcow2_header, and errors are
 * set with bm_error naming the image and the field, so a caller that
 * got 0 back may use every offset and count without further checks on
 * their arithmetic (table ends do not overflow, the L1 table covers the
 * virtual size).
 */
#ifndef BM_QCOW2_H
#define BM_QCOW2_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define BM_QCOW2_MAGIC 0x514649fbu

/* Header field offsets that the driver rewrites in place. */
#define BM_QCOW2_OFF_L1 36               /* l1_size + l1_table_offset */
#define BM_QCOW2_OFF_REFTABLE 48         /* offset + clusters (12 bytes) */
#define BM_QCOW2_OFF_INCOMPAT 72
#define BM_QCOW2_OFF_AUTOCLEAR 88

/* Feature bits. */
#define BM_QCOW2_INCOMPAT_DIRTY (UINT64_C(1) << 0)
#define BM_QCOW2_INCOMPAT_CORRUPT (UINT64_C(1) << 1)
#define BM_QCOW2_INCOMPAT_DATA_FILE (UINT64_C(1) << 2)
#define BM_QCOW2_INCOMPAT_COMPRESSION (UINT64_C(1) << 3)
#define BM_QCOW2_INCOMPAT_EXTL2 (UINT64_C(1) << 4)
#define BM_QCOW2_COMPAT_LAZY_REFCOUNTS (UINT64_C(1) << 0)
#define BM_QCOW2_AUTOCLEAR_BITMAPS (UINT64_C(1) << 0)

/* Header extension types. */
#define BM_QCOW2_EXT_END 0u
#define BM_QCOW2_EXT_BACKING_FORMAT 0xe2792acau
#define BM_QCOW2_EXT_FEATURE_NAMES 0x6803f857u
#define BM_QCOW2_EXT_BITMAPS 0x23852875u
#define BM_QCOW2_EXT_CRYPTO 0x0537be77u
#define BM_QCOW2_EXT_DATA_FILE 0x44415441u

#define BM_QCOW2_MIN_CLUSTER_BITS 9
#define BM_QCOW2_MAX_CLUSTER_BITS 21
#define BM_QCOW2_MAX_BACKING_NAME 1023
#define BM_QCOW2_MAX_L1_BYTES (32 * 1024 * 1024)
#define BM_QCOW2_MAX_REFTABLE_BYTES (8 * 1024 * 1024)
#define BM_QCOW2_MAX_SNAPSHOTS 65536

/* Entry bits. */
#define BM_QCOW2_FLAG_COPIED (UINT64_C(1) << 63)
#define BM_QCOW2_FLAG_COMPRESSED (UINT64_C(1) << 62)
#define BM_QCOW2_FLAG_ZERO (UINT64_C(1) << 0)
#define BM_QCOW2_OFFSET_MASK UINT64_C(0x00fffffffffffe00)
#define BM_QCOW2_REFTABLE_MASK UINT64_C(0xfffffffffffffe00)

enum bm_qcow2_compression {
	BM_QCOW2_ZLIB = 0,
	BM_QCOW2_ZSTD = 1,
};

struct bm_qcow2_header {
	uint32_t version;
	uint32_t cluster_bits;
	uint64_t size;
	uint32_t crypt_method;
	uint32_t l1_size;
	uint64_t l1_table_offset;
	uint64_t refcount_table_offset;
	uint32_t refcount_table_clusters;
	uint32_t nb_snapshots;
	uint64_t snapshots_offset;
	uint64_t incompatible;
	uint64_t compatible;
	uint64_t autoclear;
	uint32_t refcount_order;
	uint32_t header_length;
	uint8_t compression_type;

	/* Bytes 105..header_length of the header (fields we do not know),
	 * kept to be written back unchanged; malloc'd or NULL. */
	uint8_t *extra_fields;
	uint32_t extra_fields_len;

	char *backing_name;        /* malloc'd, NUL-terminated, or NULL */
	char backing_format[16];   /* "" if the extension is absent */

	/* Names of feature bits from the feature name table, for messages:
	 * [type][bit], "" when not given. */
	bool has_feature_names;
	char feature_names[3][64][47];

	bool has_bitmaps;          /* bitmaps extension present */
	/* Its fields, where it is in cluster 0 (its type field), and where
	 * the end-of-extensions marker is (0 if the list ran to the end). */
	uint32_t bitmaps_nb;
	uint64_t bitmaps_dir_size, bitmaps_dir_offset;
	uint32_t bitmaps_ext_pos, ext_end_pos;
	uint64_t backing_offset;   /* of the name in cluster 0, or 0 */
	uint32_t backing_size;
	/* Extensions to keep when rewriting: the bitmaps extension and
	 * unknown ones, as found (type, length, data, padding). */
	uint8_t *kept_exts;
	uint32_t kept_exts_len;
};

/*
 * Parse and validate cluster 0 (`len` bytes, at most one cluster is
 * looked at; bytes the file does not have should be passed as zeroes
 * or left out).  Unsupported features (encryption, external data files,
 * extended L2, unknown incompatible bits) fail with -ENOTSUP; broken
 * fields with -EINVAL.  On success *h holds malloc'd parts: free them
 * with bm_qcow2_header_free.  `name` is used in messages.
 */
int bm_qcow2_header_parse(const char *name, const uint8_t *buf, size_t len,
			  struct bm_qcow2_header *h);

void bm_qcow2_header_free(struct bm_qcow2_header *h);

/*
 * Write a version 3 header for *h into buf (`len` bytes, normally one
 * cluster, zeroed first): the fixed fields, the kept header fields, the
 * backing format, a feature name table (if `feature_table`), the kept
 * extensions, the end marker and the backing name.  -ENOSPC if it does
 * not fit.
 */
int bm_qcow2_header_serialize(const struct bm_qcow2_header *h, uint8_t *buf,
			      size_t len, bool feature_table);

/*
 * Plan a crash-safe change of the backing file recorded in cluster 0
 * (`buf`, `len` bytes as in the file; len is one cluster, >= 512):
 *
 *   1. write `name` (strlen bytes) at *name_off, in cluster 0 after the
 *      header extensions and clear of the old name; sync;
 *   2. write `sector` (the first BM_QCOW2_SECTOR bytes, as in buf but
 *      with the name's offset and size, bytes 8-19, and with a changed
 *      backing format extension if `format` is not NULL and differs);
 *      sync.
 *
 * Until step 2 the header names the old file; a sector write is taken
 * to be atomic, so a crash at any point leaves the old or the new name.
 * -ENOSPC if the name does not fit beside the old one; -ENOTSUP if the
 * format must change but its extension is absent, outside the first
 * sector or of another padded size; -EINVAL for a header with no end of
 * extensions marker.  `img` names the image in messages.
 */
#define BM_QCOW2_SECTOR 512
int bm_qcow2_backing_plan(const char *img, const uint8_t *buf, size_t len,
			  uint32_t header_length, const char *name,
			  const char *format, uint64_t *name_off,
			  uint8_t sector[BM_QCOW2_SECTOR]);

/* Number of L1 entries needed for `size` bytes with 2^cluster_bits
 * clusters; false on overflow. */
bool bm_qcow2_l1_entries(uint64_t size, uint32_t cluster_bits,
			 uint64_t *out);

/* ---- L2 entries ---------------------------------------------------- */

enum bm_qcow2_l2_kind {
	BM_QCOW2_UNALLOCATED,  /* this layer holds nothing */
	BM_QCOW2_ZERO_PLAIN,   /* reads as zeroes, no host cluster */
	BM_QCOW2_ZERO_ALLOC,   /* reads as zeroes, host cluster kept */
	BM_QCOW2_NORMAL,       /* data at host */
	BM_QCOW2_COMPRESSED,   /* compressed data at host (bytes) */
};

struct bm_qcow2_l2 {
	enum bm_qcow2_l2_kind kind;
	bool copied;
	uint64_t host;         /* cluster offset, or compressed byte offset */
	uint64_t csize;        /* compressed: bytes that may hold the data */
};

/*
 * Decode an L2 entry of a `version` image.  -EINVAL with a message
 * (naming the L2 table offset and index) if the data offset is not
 * cluster aligned, or a v2 image uses the zero flag.
 */
int bm_qcow2_l2_decode(const char *name, uint64_t entry, uint32_t cluster_bits,
		       uint32_t version, struct bm_qcow2_l2 *out,
		       uint64_t l2_offset, uint64_t index);

/* The clusters a compressed descriptor's bytes touch. */
void bm_qcow2_compressed_span(const struct bm_qcow2_l2 *e,
			      uint32_t cluster_bits, uint64_t *first,
			      uint64_t *count);

/*
 * Inflate one compressed cluster (`in`, `in_len` bytes, possibly with
 * padding after the stream) into `out` (`cluster_size` bytes, all of
 * which must be produced).  0 or -EIO.
 */
int bm_qcow2_decompress(enum bm_qcow2_compression type, const uint8_t *in,
			size_t in_len, uint8_t *out, size_t cluster_size);

/* Compress one cluster (tests only).  Returns the length or -errno. */
long bm_qcow2_compress(enum bm_qcow2_compression type, const uint8_t *in,
		       size_t len, uint8_t *out, size_t out_len);

/* ---- refcounts ----------------------------------------------------- */

/* Entry `i` of a refcount block with 2^order bit entries. */
uint64_t bm_qcow2_refcount_get(const uint8_t *block, uint32_t order,
			       uint64_t i);
void bm_qcow2_refcount_set(uint8_t *block, uint32_t order, uint64_t i,
			   uint64_t value);

/* ---- persistent bitmaps (qcow2-bitmap.c) ------------------------- */

#define BM_QCOW2_BME_IN_USE (1u << 0)          /* may be stale */
#define BM_QCOW2_BME_AUTO (1u << 1)            /* writers must mark it */
#define BM_QCOW2_BME_EXTRA_COMPAT (1u << 2)
#define BM_QCOW2_BITMAP_DIRTY_TRACKING 1u      /* the only type */
#define BM_QCOW2_MAX_BITMAPS 65535u
#define BM_QCOW2_BITMAP_NAME_MAX 1023u
#define BM_QCOW2_MAX_BITMAP_DIR (UINT64_C(64) << 20)
#define BM_QCOW2_BITMAP_ENTRY_FIXED 24u

/* One entry of the bitmap directory. */
struct bm_qcow2_bitmap {
	char *name;                /* malloc'd, NUL-terminated */
	uint32_t flags;            /* BM_QCOW2_BME_* */
	uint32_t granularity_bits;
	uint64_t table_offset;
	uint32_t table_size;       /* entries */
};

/* Entries of the bitmap table of a disk of `size` bytes (0 if that would
 * not fit in 32 bits).  QEMU requires exactly this many. */
uint64_t bm_qcow2_bitmap_table_size(uint64_t size, uint32_t granularity_bits,
				    uint32_t cluster_bits);

/* Bytes of a directory holding `n` entries (8-byte aligned entries). */
uint64_t bm_qcow2_bitmap_dir_size(const struct bm_qcow2_bitmap *b,
				  uint32_t n);

/*
 * Parse the directory of image `h` (`len` bytes, h->bitmaps_dir_size)
 * strictly: h->bitmaps_nb entries filling it exactly, each with known
 * flags, the dirty-tracking type, granularity 2^9..2^31, a name of 1 to
 * 1023 bytes without NUL, unique, no extra data, a cluster-aligned table
 * of exactly bm_qcow2_bitmap_table_size entries that overlaps neither
 * cluster 0, the directory nor another table.  -EINVAL (-ENOTSUP for
 * what is valid but not ours to keep: extra data, unknown types or
 * flags) with a message naming the image and the entry.  On success *out
 * is malloc'd: free it with bm_qcow2_bitmaps_free.
 */
int bm_qcow2_bitmap_dir_parse(const char *img, const struct bm_qcow2_header *h,
			      const uint8_t *buf, size_t len,
			      struct bm_qcow2_bitmap **out);

/* Encode `n` entries into buf (bm_qcow2_bitmap_dir_size bytes, zeroed
 * first).  -EINVAL for an entry that would not parse back. */
int bm_qcow2_bitmap_dir_encode(const struct bm_qcow2_bitmap *b, uint32_t n,
			       uint8_t *buf, size_t len);

void bm_qcow2_bitmaps_free(struct bm_qcow2_bitmap *b, uint32_t n);

/*
 * A bitmap table entry: *host the data cluster (0: none), *ones for a
 * cluster that reads as all ones.  -EINVAL for reserved bits or an
 * unaligned offset.
 */
int bm_qcow2_bitmap_entry(const char *img, uint64_t e, uint32_t cluster_bits,
			  uint64_t *host, bool *ones);

/* The bitmaps extension's 24 bytes. */
void bm_qcow2_bitmap_ext_encode(uint32_t nb, uint64_t dir_size,
				uint64_t dir_offset, uint8_t out[24]);

/*
 * The driver's bitmap entry points (qcow2-bitmap-io.c), run through
 * bm_image_driver_call(img, &bm_qcow2_driver, fn, set, io) on a
 * writable version 3 image.
 *
 * load: read the directory, the tables and the data of every bitmap
 *   into *set (n, b, data, allocated, consistent, cluster_bits, and in
 *   last the data clusters of the last bitmap, 0 for none; free
 *   with bm_qcow2_bitmap_set_free) and keep autoclear bit 0 from then
 *   on: the caller keeps the bitmaps up to date.  set->check, if set,
 *   sees the directory first.  -EINVAL, naming the bitmap, if a cluster
 *   of the list is not the list's alone (refcount not 1, named twice,
 *   or image metadata or guest data): a commit would free it.
 * commit: make the image's bitmaps set->b[0..n) (name, flags,
 *   granularity_bits) with data set->data[i], crash-safely: new clusters
 *   for every data cluster that is not all zeroes (every one of the last
 *   bitmap's with alloc_last), the tables and the directory, refcounts
 *   first, all synced before the header extension switches to them;
 *   then the old ones are freed.  A crash leaves the old list or the
 *   new one, at worst with leaked clusters.  set->last gets the host
 *   offset of each data cluster of the last bitmap (malloc'd).  A
 *   failure before the switch leaves the old list; one during it says
 *   the bitmaps are in an unknown state, and later commits fail -EIO.
 * release: the caller stops keeping the bitmaps: autoclear bit 0 is
 *   cleared before the next change of the image.
 */
struct bm_qcow2_bitmap_set {
	uint32_t n;
	struct bm_qcow2_bitmap *b;
	uint8_t **data;            /* n buffers of table_size clusters */
	bool *allocated;           /* load: every data cluster allocated */
	bool consistent;           /* load: autoclear bit 0 set, or none */
	uint32_t cluster_bits;     /* load */
	bool alloc_last;           /* commit */
	uint64_t *last;            /* the last bitmap's data clusters */
	/* load, in: the caller's limits, run on the directory (n, b,
	 * cluster_bits) before anything its sizes ask is allocated; an
	 * error refuses the load.  NULL: none. */
	int (*check)(void *opaque, const struct bm_qcow2_bitmap_set *set);
	void *opaque;
};

int bm_qcow2_bitmaps_load(void *drv, void *set);
int bm_qcow2_bitmaps_commit(void *drv, void *set);
int bm_qcow2_bitmaps_release(void *drv, void *set);
void bm_qcow2_bitmap_set_free(struct bm_qcow2_bitmap_set *set);

/* The driver's create op (qcow2-create.c). */
struct bm_fmt;
int bm_qcow2_create(struct bm_fmt *f, uint64_t size, const char *options);

#endif /* BM_QCOW2_H */
