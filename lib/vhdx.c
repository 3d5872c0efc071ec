/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The VHDX format driver (see format.h for the engine contract and
 * vhdx.h for the structures).
 *
 * State.  The whole BAT lives in memory (host order) with a dirty flag
 * per 4 KiB page; differencing disks cache their sector bitmaps per
 * chunk.  One mutex guards everything: the loop's nowait map takes it
 * with trylock and answers only from memory.
 *
 * Opening.  Pick the current header, replay the log if LogGuid is set
 * (into the file for a writable open, as an overlay on our metadata
 * reads for a read-only one), then read region table 1 (table 2 if 1 is
 * damaged), the metadata and the BAT, checking every field and every
 * block's placement before anything is used.
 *
 * Writing.  New payload blocks are appended at the 1 MiB-aligned end of
 * the file (or reuse blocks freed before the last flush).  The part of
 * the block the request does not cover is filled before the engine
 * writes the data: with zeroes (free for a block past the old end of the
 * file), or with the parent's data for a differencing disk.  A write to
 * a PARTIALLY_PRESENT block first copies the parent's sectors its bitmap
 * lacks and turns it FULLY_PRESENT.  The BAT change stays in memory.
 *
 * Crash safety of BAT updates.  flush (1) syncs the file: every payload
 * write (and fill) mapped before the flush is durable, and so is the
 * BAT as applied by the previous flush; (2) writes the dirty BAT pages
 * as one log entry (its Tail is itself, so it replays alone) and syncs;
 * (3) writes the same pages in place, without a sync.  A crash before
 * (2) completes leaves the old BAT, whose blocks all hold durable data
 * (new blocks are unreferenced space past the old end); a crash after
 * it leaves a valid log entry that open replays, giving the new BAT,
 * whose every block was made durable in (1).  Torn BAT pages from (3)
 * are repaired by that replay, because the entry is the newest one in
 * the log until the next flush, which starts with the sync that makes
 * (3) durable.  A block freed by a zero or discard is handed out again
 * only after the flush that made its new state durable, so no durable
 * BAT entry ever points at space that is being rewritten.
 *
 * GUIDs and headers.  Before the first change of a writable open the
 * header gets a new FileWriteGuid (and a new DataWriteGuid before the
 * first guest-visible change); before the first log entry of the
 * session, a new LogGuid.  close syncs and sets LogGuid back to zero, so
 * a cleanly closed image has an empty log.  Every header update writes
 * the non-current slot with sequence + 1, syncs, then the other slot:
 * at any instant one valid header describes a consistent file.
 *
 * Not done: PARTIALLY_PRESENT blocks are never created (writes copy the
 * parent's block instead), and freed space is reused but the file never
 * shrinks.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <libgen.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "backing.h"
#include "errors.h"
#include "format.h"
#include "internal.h"
#include "vhdx.h"

#define BAT_PAGE 4096u
#define ENTRIES_PER_PAGE (BAT_PAGE / 8)
#define DEFAULT_BLOCK (32 * VHDX_MiB)
#define DEFAULT_LOG VHDX_MiB
#define META_READ_MAX (32 * VHDX_MiB)
#define FILL_CHUNK VHDX_MiB

struct vhdx {
	struct bm_fmt *f;
	const char *name;
	pthread_mutex_t lock;
	struct vhdx_header hdr;
	int slot;                       /* current header slot, 0 or 1 */
	struct vhdx_regions reg;
	struct vhdx_meta meta;
	struct vhdx_geom geom;
	bool fixed;                     /* LeaveBlockAllocated, no parent */
	uint64_t *bat;
	uint64_t bat_pages;             /* pages of the BAT on disk */
	uint8_t *dirty;                 /* per page */
	uint64_t ndirty;
	uint8_t **bitmaps;              /* per chunk, differencing only */
	struct vhdx_log_seq *overlay;   /* read-only replay */
	struct vhdx_log_writer logw;
	bool fwg_done, dwg_done, log_active;
	uint64_t eof;                   /* next fresh block */
	uint64_t *free_blocks, *pending;
	size_t nfree, npending, cap_free, cap_pending;
	uint64_t allocated;             /* blocks holding data, bytes */
	/* A last block the file does not wholly hold (QEMU's fixed disks):
	 * its host bytes from short_end on read as zeroes.  0 if none. */
	uint64_t short_end;
	struct vhdx_log_io io;
};

/* ---- file I/O --------------------------------------------------------- */

static int
io_pread(void *o, void *buf, size_t len, uint64_t off)
{
	return bm_fmt_pread(o, buf, len, off);
}

static int
io_pwrite(void *o, const void *buf, size_t len, uint64_t off)
{
	return bm_fmt_pwrite(o, buf, len, off);
}

static int
io_zero(void *o, uint64_t off, uint64_t len)
{
	return bm_fmt_zero_file(o, off, len);
}

static int
io_truncate(void *o, uint64_t size)
{
	return bm_fmt_truncate(o, size);
}

static int
io_sync(void *o)
{
	return bm_fmt_sync(o);
}

static uint64_t
io_size(void *o)
{
	return bm_fmt_file_size(o);
}

/* Read metadata, with the pending log laid over it (read-only opens). */
static int
meta_read(struct vhdx *d, void *buf, size_t len, uint64_t off)
{
	int r = bm_fmt_pread(d->f, buf, len, off);

	if (r == 0 && d->overlay)
		vhdx_log_overlay(d->overlay, buf, len, off);
	return r;
}

/* ---- headers ---------------------------------------------------------- */

/* Make d->hdr current in both slots, one slot at a time. */
static int
header_update(struct vhdx *d)
{
	uint8_t buf[VHDX_HEADER_SIZE];

	for (int i = 0; i < 2; i++) {
		int slot = !d->slot, r;

		if (d->hdr.seq >= UINT64_MAX - 1)
			return bm_error(-EOVERFLOW, "%s: VHDX header sequence "
					"number exhausted", d->name);
		d->hdr.seq++;
		vhdx_header_encode(&d->hdr, buf);
		r = bm_fmt_pwrite(d->f, buf, sizeof buf, slot ?
				  VHDX_HEADER2_OFFSET : VHDX_HEADER1_OFFSET);
		if (r == 0)
			r = bm_fmt_sync(d->f);
		if (r < 0)
			return r;
		d->slot = slot;
	}
	return 0;
}

/*
 * Before changing the file: a new FileWriteGuid once per open, and a new
 * DataWriteGuid once before the first guest-visible change.  A LogGuid
 * left behind without a replayable log is cleared at the same time.
 */
static int
begin_change(struct vhdx *d, bool guest_visible)
{
	if (d->fwg_done && (d->dwg_done || !guest_visible))
		return 0;
	if (!d->fwg_done)
		vhdx_guid_generate(d->hdr.file_write_guid);
	if (guest_visible)
		vhdx_guid_generate(d->hdr.data_write_guid);
	if (!d->log_active)
		memset(d->hdr.log_guid, 0, 16);
	d->fwg_done = true;
	d->dwg_done |= guest_visible;
	return header_update(d);
}

/* ---- opening ---------------------------------------------------------- */

static int
read_headers(struct vhdx *d)
{
	uint8_t *buf = malloc(2 * VHDX_HEADER_SIZE);
	int r;

	if (!buf)
		return bm_error(-ENOMEM, "%s: out of memory", d->name);
	if (bm_fmt_file_size(d->f) < VHDX_REGION2_OFFSET + VHDX_REGION_SIZE) {
		r = bm_error(-EINVAL, "%s: too small for a VHDX image (%"
			     PRIu64 " bytes)", d->name,
			     bm_fmt_file_size(d->f));
		goto out;
	}
	r = bm_fmt_pread(d->f, buf, 8, 0);
	if (r < 0)
		goto out;
	if (memcmp(buf, "vhdxfile", 8) != 0) {
		r = bm_error(-EINVAL, "%s: not a VHDX image (no \"vhdxfile\" "
			     "signature)", d->name);
		goto out;
	}
	r = bm_fmt_pread(d->f, buf, VHDX_HEADER_SIZE, VHDX_HEADER1_OFFSET);
	if (r == 0)
		r = bm_fmt_pread(d->f, buf + VHDX_HEADER_SIZE,
				 VHDX_HEADER_SIZE, VHDX_HEADER2_OFFSET);
	if (r == 0)
		r = vhdx_header_choose(d->name, buf, buf + VHDX_HEADER_SIZE,
				       &d->hdr, &d->slot);
out:
	free(buf);
	return r;
}

static int
open_log(struct vhdx *d)
{
	struct vhdx_log_seq *seq;
	int r = vhdx_log_find(&d->io, &d->hdr, &seq);

	if (r < 0 || !seq)
		return r;
	if (!bm_fmt_writable(d->f)) {
		d->overlay = seq;
		return 0;
	}
	/* The log stays named in the header until it has been applied. */
	vhdx_guid_generate(d->hdr.file_write_guid);
	d->fwg_done = true;
	r = header_update(d);
	if (r == 0)
		r = vhdx_log_apply(&d->io, seq);
	vhdx_log_seq_free(seq);
	if (r < 0)
		return r;
	memset(d->hdr.log_guid, 0, 16);
	return header_update(d);
}

static bool
overlaps(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
	return a < b + blen && b < a + alen;
}

static int
read_regions(struct vhdx *d)
{
	uint8_t *buf = malloc(VHDX_REGION_SIZE);
	uint64_t size = bm_fmt_file_size(d->f);
	int r;

	if (!buf)
		return bm_error(-ENOMEM, "%s: out of memory", d->name);
	r = meta_read(d, buf, VHDX_REGION_SIZE, VHDX_REGION1_OFFSET);
	if (r == 0 && vhdx_region_table_decode(d->name, buf, &d->reg) < 0) {
		/* Table 2 is an identical copy kept for this case. */
		r = meta_read(d, buf, VHDX_REGION_SIZE, VHDX_REGION2_OFFSET);
		if (r == 0 && vhdx_region_table_decode(d->name, buf,
						       &d->reg) == 0) {
			bm_warn("%s: VHDX region table 1 is damaged; using "
				"table 2", d->name);
		} else if (r == 0) {
			meta_read(d, buf, VHDX_REGION_SIZE,
				  VHDX_REGION1_OFFSET);
			r = vhdx_region_table_decode(d->name, buf, &d->reg);
		}
	}
	free(buf);
	if (r < 0)
		return r;
	if (!bm_range_ok(d->reg.bat_offset, d->reg.bat_length, size) ||
	    !bm_range_ok(d->reg.meta_offset, d->reg.meta_length, size))
		return bm_error(-EINVAL, "%s: VHDX %s region lies past the end "
				"of the file", d->name,
				bm_range_ok(d->reg.bat_offset,
					    d->reg.bat_length, size) ?
				"metadata" : "BAT");
	if (overlaps(d->reg.bat_offset, d->reg.bat_length, d->hdr.log_offset,
		     d->hdr.log_length) ||
	    overlaps(d->reg.meta_offset, d->reg.meta_length,
		     d->hdr.log_offset, d->hdr.log_length))
		return bm_error(-EINVAL, "%s: VHDX %s region overlaps the log",
				d->name,
				overlaps(d->reg.bat_offset, d->reg.bat_length,
					 d->hdr.log_offset,
					 d->hdr.log_length) ?
				"BAT" : "metadata");
	return 0;
}

static int
read_metadata(struct vhdx *d)
{
	size_t len = BM_MIN(d->reg.meta_length, META_READ_MAX);
	uint8_t *buf = malloc(len);
	int r;

	if (!buf)
		return bm_error(-ENOMEM, "%s: out of memory", d->name);
	r = meta_read(d, buf, len, d->reg.meta_offset);
	if (r == 0)
		r = vhdx_metadata_decode(d->name, buf, len,
					 d->reg.meta_length, &d->meta);
	free(buf);
	if (r == 0)
		r = vhdx_geometry(d->name, &d->meta, &d->geom);
	if (r == 0 && d->geom.bat_entries * 8 > d->reg.bat_length)
		r = bm_error(-EINVAL, "%s: VHDX BAT region of %" PRIu32
			     " bytes cannot hold %" PRIu64 " entries",
			     d->name, d->reg.bat_length,
			     d->geom.bat_entries);
	d->fixed = d->meta.leave_allocated && !d->meta.has_parent;
	return r;
}

static int
read_bat(struct vhdx *d)
{
	const struct vhdx_geom *g = &d->geom;
	uint64_t mem = g->bitmap_blocks * (g->chunk_ratio + 1);
	uint64_t bytes = bm_round_up(g->bat_entries * 8, BAT_PAGE);
	uint64_t size = bm_fmt_file_size(d->f), end;
	struct vhdx_range fixed[] = {
		{ 0, VHDX_MiB, "file header area" },
		{ d->hdr.log_offset, d->hdr.log_length, "log" },
		{ d->reg.bat_offset, d->reg.bat_length, "BAT region" },
		{ d->reg.meta_offset, d->reg.meta_length, "metadata region" },
	};
	int r;

	d->bat_pages = bytes / BAT_PAGE;
	d->bat = calloc(1, BM_MAX(bm_round_up(mem * 8, BAT_PAGE), bytes) + 8);
	d->dirty = calloc(d->bat_pages + 1, 1);
	if (d->meta.has_parent)
		d->bitmaps = calloc(g->bitmap_blocks + 1, sizeof *d->bitmaps);
	if (!d->bat || !d->dirty || (d->meta.has_parent && !d->bitmaps))
		return bm_error(-ENOMEM, "%s: out of memory for the BAT",
				d->name);
	r = meta_read(d, d->bat, bytes, d->reg.bat_offset);
	if (r < 0)
		return r;
	for (uint64_t i = 0; i < bytes / 8; i++)
		d->bat[i] = vhdx_le64((const uint8_t *)&d->bat[i]);
	r = vhdx_bat_check(d->name, d->bat, g, &d->meta, fixed,
			   BM_ARRAY_SIZE(fixed), size);
	if (r < 0)
		return r;
	end = size;
	for (size_t i = 1; i < BM_ARRAY_SIZE(fixed); i++)
		end = BM_MAX(end, fixed[i].offset + fixed[i].length);
	for (uint64_t b = 0; b < g->data_blocks; b++) {
		unsigned st = vhdx_bat_state(d->bat[vhdx_bat_index(g, b)]);

		if (st == VHDX_BAT_FULLY_PRESENT ||
		    st == VHDX_BAT_PARTIALLY_PRESENT)
			d->allocated += d->meta.block_size;
	}
	if (g->data_blocks) {
		uint64_t e = d->bat[vhdx_bat_index(g, g->data_blocks - 1)];

		if (vhdx_bat_state(e) == VHDX_BAT_FULLY_PRESENT &&
		    vhdx_bat_offset(e) + d->meta.block_size > size)
			d->short_end = size;
	}
	d->eof = bm_round_up(BM_MAX(end, d->short_end ? size +
				    d->meta.block_size : 0), VHDX_MiB);
	return 0;
}

/* A read-only replay can only be laid over what we read ourselves. */
static int
check_overlay(struct vhdx *d)
{
	struct vhdx_range ok[] = {
		{ VHDX_REGION1_OFFSET, 2 * VHDX_REGION_SIZE, "" },
		{ d->reg.bat_offset, d->reg.bat_length, "" },
		{ d->reg.meta_offset, d->reg.meta_length, "" },
	};
	uint64_t bad;

	if (!d->overlay || vhdx_log_within(d->overlay, ok, 3, &bad))
		return 0;
	return bm_error(-EROFS, "%s: VHDX log must be replayed and changes "
			"data at %" PRIu64 "; open the image read-write once",
			d->name, bad);
}

/* A parent is read only if it is a regular file or a block device. */
static int
parent_type_check(const char *path, const struct stat *st)
{
	if (S_ISREG(st->st_mode) || S_ISBLK(st->st_mode))
		return 0;
	return bm_error(-EINVAL, "%s: the parent is not a regular file or "
			"block device (%s)", path,
			S_ISDIR(st->st_mode) ? "a directory" :
			S_ISFIFO(st->st_mode) ? "a FIFO" :
			S_ISCHR(st->st_mode) ? "a character device" :
			S_ISSOCK(st->st_mode) ? "a socket" : "something else");
}

/*
 * Open a parent for reading, as bm_file_open does: the type is checked
 * before the open (opening a FIFO blocks until a writer comes, opening
 * some character devices does things) and again on the descriptor,
 * opened with O_NONBLOCK in case the two looks saw different files.
 */
static int
open_parent(const char *path)
{
	struct stat st;
	int fd, r;

	if (stat(path, &st) == 0 && (r = parent_type_check(path, &st)) < 0)
		return r;
	fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
	if (fd < 0)
		return bm_error(-errno, "%s: cannot open the parent: %s", path,
				strerror(errno));
	if (fstat(fd, &st) < 0)
		r = bm_error(-errno, "%s: cannot open the parent: %s", path,
			     strerror(errno));
	else
		r = parent_type_check(path, &st);
	if (r == 0 && fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK) < 0)
		r = bm_error(-errno, "%s: cannot open the parent: %s", path,
			     strerror(errno));
	if (r < 0) {
		close(fd);
		return r;
	}
	return fd;
}

/* Read the identity of a VHDX parent with plain I/O. */
static int
read_parent(const char *path, uint8_t dwg[16], uint64_t *size, uint32_t *lss)
{
	/* The headers and the region table first; the metadata region,
	 * sized by the table (at most META_READ_MAX), once it is known. */
	uint8_t *buf = malloc(2 * VHDX_HEADER_SIZE + VHDX_REGION_SIZE);
	struct vhdx_header h;
	struct vhdx_regions reg;
	struct vhdx_meta m;
	int fd, slot, r = -EIO;
	size_t len;

	if (!buf)
		return bm_error(-ENOMEM, "%s: out of memory", path);
	fd = open_parent(path);
	if (fd < 0) {
		r = fd;
		goto out;
	}
	if (pread(fd, buf, VHDX_HEADER_SIZE, VHDX_HEADER1_OFFSET) !=
	    VHDX_HEADER_SIZE ||
	    pread(fd, buf + VHDX_HEADER_SIZE, VHDX_HEADER_SIZE,
		  VHDX_HEADER2_OFFSET) != VHDX_HEADER_SIZE ||
	    pread(fd, buf + 2 * VHDX_HEADER_SIZE, VHDX_REGION_SIZE,
		  VHDX_REGION1_OFFSET) != VHDX_REGION_SIZE ||
	    memcmp(buf + 2 * VHDX_HEADER_SIZE, "regi", 4) != 0) {
		r = bm_error(-EINVAL, "%s: parent is not a VHDX image", path);
		goto out;
	}
	r = 0;
	if (r == 0)
		r = vhdx_header_choose(path, buf, buf + VHDX_HEADER_SIZE, &h,
				       &slot);
	if (r == 0 && !vhdx_guid_is_zero(h.log_guid))
		r = bm_error(-EBUSY, "%s: parent has a log to replay; open "
			     "it read-write once first", path);
	if (r == 0)
		r = vhdx_region_table_decode(path, buf + 2 * VHDX_HEADER_SIZE,
					     &reg);
	if (r < 0)
		goto out;
	len = BM_MIN(reg.meta_length, META_READ_MAX);
	if (len > 2 * VHDX_HEADER_SIZE + VHDX_REGION_SIZE) {
		uint8_t *bigger = realloc(buf, len);

		if (!bigger) {
			r = bm_error(-ENOMEM, "%s: out of memory", path);
			goto out;
		}
		buf = bigger;
	}
	if (pread(fd, buf, len, (off_t)reg.meta_offset) != (ssize_t)len) {
		r = bm_error(-EINVAL, "%s: parent metadata unreadable", path);
		goto out;
	}
	r = vhdx_metadata_decode(path, buf, len, reg.meta_length, &m);
	if (r == 0) {
		memcpy(dwg, h.data_write_guid, 16);
		*size = m.virtual_size;
		*lss = m.logical_sector;
	}
	vhdx_meta_free(&m);
out:
	if (fd >= 0)
		close(fd);
	free(buf);
	return r;
}

/* `rel` resolved against the directory of `image`: malloc'd. */
static char *
resolve(const char *image, const char *rel)
{
	char *copy, *out = NULL;

	if (rel[0] == '/')
		return strdup(rel);
	copy = strdup(image);
	if (copy && asprintf(&out, "%s/%s", dirname(copy), rel) < 0)
		out = NULL;
	free(copy);
	return out;
}

/*
 * A child is valid only over the parent it was made from: the parent's
 * DataWriteGuid must be the recorded linkage.  The locator comes from an
 * untrusted image, so the parent is read only where the backing file
 * policy (backing.h) lets the engine open it, and at the path the policy
 * resolved: otherwise a child could have us open a FIFO (and hang) or
 * tell, in the message below, the identity of any VHDX it names.  A
 * parent refused or unreadable here is left for the engine to report
 * (bm_backing_open refuses it with the same words).
 */
static int
check_linkage(struct vhdx *d, const char *parent)
{
	char *path = NULL, g[39];
	uint8_t dwg[16];
	uint64_t size;
	uint32_t lss;
	int r;

	r = bm_backing_check_in_chain(d->name, parent, &path);
	if (r == 0)
		r = read_parent(path, dwg, &size, &lss);
	free(path);
	if (r == -ENOMEM)
		return r;
	if (r < 0) {
		bm_error_clear();
		return 0;
	}
	vhdx_guid_format(dwg, g);
	if (strcasecmp(g, d->meta.parent_linkage) != 0 &&
	    (!d->meta.parent_linkage2 ||
	     strcasecmp(g, d->meta.parent_linkage2) != 0))
		return bm_error(-EINVAL, "%s: VHDX parent '%s' has "
				"DataWriteGuid %s, not the linkage %s: it "
				"changed since the child was made", d->name,
				parent, g, d->meta.parent_linkage);
	return 0;
}

static void
vhdx_free(struct vhdx *d)
{
	if (!d)
		return;
	if (d->bitmaps)
		for (uint64_t i = 0; i <= d->geom.bitmap_blocks; i++)
			free(d->bitmaps[i]);
	free(d->bitmaps);
	vhdx_log_seq_free(d->overlay);
	vhdx_meta_free(&d->meta);
	free(d->bat);
	free(d->dirty);
	free(d->free_blocks);
	free(d->pending);
	pthread_mutex_destroy(&d->lock);
	free(d);
}

static struct vhdx *
vhdx_new(struct bm_fmt *f)
{
	struct vhdx *d = calloc(1, sizeof *d);

	if (!d)
		return NULL;
	pthread_mutex_init(&d->lock, NULL);
	d->f = f;
	d->name = bm_fmt_name(f);
	d->io = (struct vhdx_log_io){
		.name = d->name, .opaque = f, .pread = io_pread,
		.pwrite = io_pwrite, .zero = io_zero,
		.truncate = io_truncate, .sync = io_sync, .size = io_size,
	};
	return d;
}

static int
vhdx_open(struct bm_fmt *f, unsigned flags, struct bm_fmt_info *info,
	  void **drv)
{
	struct vhdx *d = vhdx_new(f);
	int r;

	(void)flags;
	if (!d)
		return bm_error(-ENOMEM, "%s: out of memory", bm_fmt_name(f));
	r = read_headers(d);
	if (r == 0)
		r = open_log(d);
	if (r == 0)
		r = read_regions(d);
	if (r == 0)
		r = read_metadata(d);
	if (r == 0)
		r = read_bat(d);
	if (r == 0)
		r = check_overlay(d);
	if (r == 0 && d->meta.has_parent) {
		info->backing_name = vhdx_parent_path(&d->meta);
		if (!info->backing_name)
			r = bm_error(-ENOMEM, "%s: out of memory", d->name);
		else
			r = check_linkage(d, info->backing_name);
		info->backing_format = BLOCKMIRROR_FORMAT_VHDX;
	}
	if (r < 0) {
		free(info->backing_name);
		info->backing_name = NULL;
		vhdx_free(d);
		return r;
	}
	info->virtual_size = d->meta.virtual_size;
	info->cluster_size = d->meta.block_size;
	info->align = d->meta.logical_sector;
	info->allocated = d->allocated;
	info->has_identity = true;
	memcpy(info->identity, d->meta.page83, 16);
	*drv = d;
	return 0;
}

/* ---- allocation ------------------------------------------------------- */

static int
push(struct vhdx *d, uint64_t **v, size_t *n, size_t *cap, uint64_t x)
{
	if (*n == *cap) {
		size_t c = *cap ? *cap * 2 : 16;
		uint64_t *p = realloc(*v, c * sizeof *p);

		if (!p)
			return bm_error(-ENOMEM, "%s: out of memory", d->name);
		*v = p;
		*cap = c;
	}
	(*v)[(*n)++] = x;
	return 0;
}

static void
set_entry(struct vhdx *d, uint64_t idx, uint64_t e)
{
	d->bat[idx] = e;
	if (!d->dirty[idx / ENTRIES_PER_PAGE]) {
		d->dirty[idx / ENTRIES_PER_PAGE] = 1;
		d->ndirty++;
	}
}

/* Give block `blk` a payload-less state; its space waits for a flush. */
static int
set_state(struct vhdx *d, uint64_t blk, unsigned st)
{
	uint64_t idx = vhdx_bat_index(&d->geom, blk), e = d->bat[idx];
	unsigned old = vhdx_bat_state(e);

	if (old == VHDX_BAT_FULLY_PRESENT ||
	    old == VHDX_BAT_PARTIALLY_PRESENT) {
		int r = push(d, &d->pending, &d->npending, &d->cap_pending,
			     vhdx_bat_offset(e));

		if (r < 0)
			return r;
		d->allocated -= d->meta.block_size;
	}
	set_entry(d, idx, vhdx_bat_entry(st, 0));
	return 0;
}

static int
load_bitmap(struct vhdx *d, uint64_t chunk, bool nowait)
{
	uint64_t e;
	int r;

	if (d->bitmaps[chunk])
		return 0;
	if (nowait)
		return -EAGAIN;
	e = d->bat[vhdx_bitmap_index(&d->geom, chunk)];
	d->bitmaps[chunk] = malloc(VHDX_MiB);
	if (!d->bitmaps[chunk])
		return bm_error(-ENOMEM, "%s: out of memory", d->name);
	r = meta_read(d, d->bitmaps[chunk], VHDX_MiB, vhdx_bat_offset(e));
	if (r < 0) {
		free(d->bitmaps[chunk]);
		d->bitmaps[chunk] = NULL;
	}
	return r;
}

/* Is sector s of block blk present in this layer (bitmap bit set)? */
static bool
sector_present(struct vhdx *d, uint64_t blk, uint64_t s)
{
	const uint8_t *bm = d->bitmaps[blk / d->geom.chunk_ratio];
	uint64_t bit = (blk % d->geom.chunk_ratio) *
		       d->geom.sectors_per_block + s;

	return bm[bit / 8] >> (bit % 8) & 1;
}

/* Copy the parent's guest bytes [a, b) of block blk to host + a. */
static int
fill_parent(struct vhdx *d, uint64_t blk, uint64_t host, uint64_t a,
	    uint64_t b, uint8_t **buf)
{
	uint64_t base = blk * d->meta.block_size;

	if (a >= b)
		return 0;
	if (!*buf && !(*buf = malloc(FILL_CHUNK)))
		return bm_error(-ENOMEM, "%s: out of memory", d->name);
	while (a < b) {
		size_t n = BM_MIN(b - a, FILL_CHUNK);
		int r = bm_fmt_backing_read(d->f, *buf, n, base + a);

		if (r == 0)
			r = bm_fmt_pwrite(d->f, *buf, n, host + a);
		if (r < 0)
			return r;
		a += n;
	}
	return 0;
}

/* Turn a PARTIALLY_PRESENT block FULLY_PRESENT: copy in the parent's
 * sectors its bitmap lacks, except those [a, b) is about to write. */
static int
complete_partial(struct vhdx *d, uint64_t blk, uint64_t host, uint64_t a,
		 uint64_t b)
{
	uint64_t lss = d->meta.logical_sector;
	uint8_t *buf = NULL;
	int r = load_bitmap(d, blk / d->geom.chunk_ratio, false);

	for (uint64_t s = 0; r == 0 && s < d->geom.sectors_per_block;) {
		uint64_t e = s;

		while (e < d->geom.sectors_per_block &&
		       !sector_present(d, blk, e) &&
		       !(e * lss >= a && (e + 1) * lss <= b))
			e++;
		if (e > s)
			r = fill_parent(d, blk, host, s * lss, e * lss, &buf);
		s = e + 1;
	}
	free(buf);
	return r;
}

/*
 * Make block blk FULLY_PRESENT for a write of [a, b) within it and
 * return its file offset: everything outside [a, b) already reads as
 * the block read before.
 */
static int
make_present(struct vhdx *d, uint64_t blk, uint64_t a, uint64_t b,
	     uint64_t *hostp)
{
	uint64_t idx = vhdx_bat_index(&d->geom, blk), e = d->bat[idx];
	uint64_t bs = d->meta.block_size, host;
	unsigned st = vhdx_bat_state(e);
	bool reused = d->nfree > 0;
	uint8_t *buf = NULL;
	int r = 0;

	if (st == VHDX_BAT_PARTIALLY_PRESENT) {
		host = vhdx_bat_offset(e);
		r = complete_partial(d, blk, host, a, b);
		goto done;
	}
	if (reused) {
		host = d->free_blocks[--d->nfree];
	} else {
		if (d->eof > VHDX_MAX_SIZE * 2)
			return bm_error(-EFBIG, "%s: VHDX file too large",
					d->name);
		host = d->eof;
		d->eof += bs;
		if (bm_fmt_file_size(d->f) < host + bs)
			r = bm_fmt_truncate(d->f, host + bs);
	}
	if (r == 0 && d->meta.has_parent && st == VHDX_BAT_NOT_PRESENT &&
	    bm_fmt_has_backing(d->f)) {
		r = fill_parent(d, blk, host, 0, a, &buf);
		if (r == 0)
			r = fill_parent(d, blk, host, b, bs, &buf);
	} else if (r == 0 && reused) {
		if (a > 0)
			r = bm_fmt_zero_file(d->f, host, a);
		if (r == 0 && b < bs)
			r = bm_fmt_zero_file(d->f, host + b, bs - b);
	}
	free(buf);
	if (r < 0) {
		/* The space is unreferenced: keep it for the next try
		 * (lost only if memory is short too). */
		int err = bm_error(r, "%s: block allocation failed: %s",
				   d->name, blockmirror_last_error());

		push(d, &d->free_blocks, &d->nfree, &d->cap_free, host);
		return err;
	}
	d->allocated += bs;
done:
	if (r < 0)
		return r;
	set_entry(d, idx, vhdx_bat_entry(VHDX_BAT_FULLY_PRESENT, host));
	*hostp = host;
	return 0;
}

/* ---- map -------------------------------------------------------------- */


/* Bytes mapped for one block (0: segment array full), or -errno. */
static int64_t
one(struct bm_map_req *r, enum bm_seg_kind kind, uint64_t host, uint64_t n)
{
	return bm_map_add(r, kind, n, host) ? (int64_t)n : 0;
}

/* Read or status of a PARTIALLY_PRESENT block: runs of sectors. */
static int64_t
map_partial(struct vhdx *d, struct bm_map_req *r, uint64_t blk, uint64_t host,
	    uint64_t inb, uint64_t n)
{
	uint64_t lss = d->meta.logical_sector, pos = inb, end = inb + n;
	int err = load_bitmap(d, blk / d->geom.chunk_ratio, r->nowait);

	if (err < 0)
		return err;
	while (pos < end) {
		bool here = sector_present(d, blk, pos / lss);
		uint64_t e = BM_MIN(end, (pos / lss + 1) * lss);

		while (e < end && sector_present(d, blk, e / lss) == here)
			e = BM_MIN(end, (e / lss + 1) * lss);
		if (!bm_map_add(r, here ? BM_SEG_DATA : BM_SEG_BACKING,
				e - pos, host + pos))
			break;
		pos = e;
	}
	return (int64_t)(pos - inb);
}

static int64_t
map_read(struct vhdx *d, struct bm_map_req *r, uint64_t blk, uint64_t e,
	 uint64_t inb, uint64_t n)
{
	bool diff = d->meta.has_parent;

	switch (vhdx_bat_state(e)) {
	case VHDX_BAT_FULLY_PRESENT: {
		uint64_t host = vhdx_bat_offset(e) + inb;

		if (d->short_end && host + n > d->short_end) {
			uint64_t in = host < d->short_end ?
				      d->short_end - host : 0;

			if (in && !bm_map_add(r, BM_SEG_DATA, in, host))
				return 0;
			return bm_map_add(r, BM_SEG_ZERO, n - in, 0) ?
			       (int64_t)n : (int64_t)in;
		}
		return one(r, BM_SEG_DATA, host, n);
	}
	case VHDX_BAT_PARTIALLY_PRESENT:
		return map_partial(d, r, blk, vhdx_bat_offset(e), inb, n);
	case VHDX_BAT_ZERO:
		return one(r, BM_SEG_ZERO, 0, n);
	case VHDX_BAT_NOT_PRESENT:
		return one(r, diff ? BM_SEG_BACKING : BM_SEG_HOLE, 0, n);
	default:
		/* UNDEFINED and UNMAPPED read as zeroes here; in a
		 * differencing disk they hide the parent. */
		return one(r, diff ? BM_SEG_ZERO : BM_SEG_HOLE, 0, n);
	}
}

/* Does a block in state st read as zeroes without a payload? */
static bool
reads_zero(const struct vhdx *d, unsigned st)
{
	if (st == VHDX_BAT_FULLY_PRESENT || st == VHDX_BAT_PARTIALLY_PRESENT)
		return false;
	return !(d->meta.has_parent && st == VHDX_BAT_NOT_PRESENT);
}

static int64_t
map_write(struct vhdx *d, struct bm_map_req *r, uint64_t blk, uint64_t e,
	  uint64_t inb, uint64_t n)
{
	uint64_t host = 0;
	int err;

	if (vhdx_bat_state(e) == VHDX_BAT_FULLY_PRESENT && d->dwg_done &&
	    !(d->short_end && vhdx_bat_offset(e) + d->meta.block_size >
			       d->short_end))
		return one(r, BM_SEG_DATA, vhdx_bat_offset(e) + inb, n);
	if (r->nowait)
		return -EAGAIN;
	err = begin_change(d, true);
	if (err == 0 && d->short_end &&
	    vhdx_bat_state(e) == VHDX_BAT_FULLY_PRESENT &&
	    vhdx_bat_offset(e) + d->meta.block_size > d->short_end) {
		/* Make the short block whole before writing into it. */
		err = bm_fmt_truncate(d->f, BM_MAX(bm_fmt_file_size(d->f),
						   vhdx_bat_offset(e) +
						   d->meta.block_size));
		d->short_end = 0;
	}
	if (err == 0 && vhdx_bat_state(e) == VHDX_BAT_FULLY_PRESENT)
		return one(r, BM_SEG_DATA, vhdx_bat_offset(e) + inb, n);
	if (err == 0)
		err = make_present(d, blk, inb, inb + n, &host);
	if (err < 0)
		return err;
	return one(r, BM_SEG_DATA, host + inb, n);
}

/* Does [inb, inb+n) cover all of block blk (the last one may be short)? */
static bool
whole_block(const struct vhdx *d, uint64_t blk, uint64_t inb, uint64_t n)
{
	uint64_t bs = d->meta.block_size;

	return inb == 0 && (n == bs ||
			    blk * bs + n >= d->meta.virtual_size);
}

static int64_t
map_zero(struct vhdx *d, struct bm_map_req *r, uint64_t blk, uint64_t e,
	 uint64_t inb, uint64_t n)
{
	unsigned st = vhdx_bat_state(e);
	bool keep = d->fixed && st == VHDX_BAT_FULLY_PRESENT;
	int err;

	if (r->op == BM_MAP_ZERO && st == VHDX_BAT_ZERO)
		return one(r, BM_SEG_DONE, 0, n);
	if (whole_block(d, blk, inb, n) && !keep) {
		unsigned target = r->op == BM_MAP_ZERO || d->meta.has_parent ?
				  VHDX_BAT_ZERO : VHDX_BAT_UNMAPPED;

		if (reads_zero(d, st) &&
		    (r->op == BM_MAP_DISCARD || st == target))
			return one(r, BM_SEG_DONE, 0, n);
		if (r->nowait)
			return -EAGAIN;
		err = begin_change(d, true);
		if (err == 0)
			err = set_state(d, blk, target);
		return err < 0 ? err : one(r, BM_SEG_DONE, 0, n);
	}
	/* Part of a block: discard is advisory; zeroing writes zeroes
	 * unless the block reads as zeroes already. */
	if (r->op == BM_MAP_DISCARD || reads_zero(d, st))
		return one(r, BM_SEG_DONE, 0, n);
	return map_write(d, r, blk, e, inb, n);
}

static int
map_locked(struct vhdx *d, struct bm_map_req *r)
{
	uint64_t bs = d->meta.block_size, off = r->offset, left = r->length;

	if (!bm_range_ok(off, left, d->meta.virtual_size))
		return bm_error(-EINVAL, "%s: request %" PRIu64 "+%" PRIu64
				" beyond the disk", d->name, off, left);
	while (left) {
		uint64_t blk = off / bs, inb = off % bs;
		uint64_t n = BM_MIN(left, bs - inb);
		uint64_t e = d->bat[vhdx_bat_index(&d->geom, blk)];
		int64_t got;

		switch (r->op) {
		case BM_MAP_READ:
		case BM_MAP_STATUS:
			got = map_read(d, r, blk, e, inb, n);
			break;
		case BM_MAP_WRITE:
			got = map_write(d, r, blk, e, inb, n);
			break;
		default:
			got = map_zero(d, r, blk, e, inb, n);
			break;
		}
		if (got < 0)
			return (int)got;
		if (got == 0)
			break;
		off += (uint64_t)got;
		left -= (uint64_t)got;
	}
	return 0;
}

static int
vhdx_map(void *drv, struct bm_map_req *r)
{
	struct vhdx *d = drv;
	int err;

	if (r->nowait) {
		if (pthread_mutex_trylock(&d->lock))
			return -EAGAIN;
	} else {
		pthread_mutex_lock(&d->lock);
	}
	r->nseg = 0;
	err = map_locked(d, r);
	pthread_mutex_unlock(&d->lock);
	/* A prefix answered from memory is still an answer. */
	if (err == -EAGAIN && r->nseg)
		err = 0;
	return err;
}

/* ---- flush ------------------------------------------------------------ */

/* Log then write BAT pages [first page index list). */
static int
write_pages(struct vhdx *d, const uint64_t *pages, size_t n, uint8_t *buf)
{
	struct vhdx_log_desc *desc = calloc(n, sizeof *desc);
	int r;

	if (!desc)
		return bm_error(-ENOMEM, "%s: out of memory", d->name);
	for (size_t i = 0; i < n; i++) {
		uint8_t *p = buf + i * BAT_PAGE;
		const uint64_t *src = d->bat + pages[i] * ENTRIES_PER_PAGE;

		for (unsigned k = 0; k < ENTRIES_PER_PAGE; k++)
			vhdx_put_le64(p + 8 * k, src[k]);
		desc[i].file_offset = d->reg.bat_offset + pages[i] * BAT_PAGE;
		desc[i].data = p;
	}
	r = vhdx_log_write(&d->io, &d->hdr, &d->logw, desc, n);
	for (size_t i = 0; r == 0 && i < n; i++)
		r = bm_fmt_pwrite(d->f, buf + i * BAT_PAGE, BAT_PAGE,
				  desc[i].file_offset);
	free(desc);
	return r;
}

static int
flush_bat(struct vhdx *d)
{
	size_t max = vhdx_log_max_data(d->hdr.log_length), n = 0;
	uint64_t *pages = malloc(max * sizeof *pages);
	uint8_t *buf = malloc((size_t)max * BAT_PAGE);
	int r = 0;

	if (!pages || !buf || !max) {
		free(pages);
		free(buf);
		return bm_error(-ENOMEM, "%s: out of memory", d->name);
	}
	if (!d->log_active) {
		vhdx_guid_generate(d->hdr.log_guid);
		d->logw = (struct vhdx_log_writer){ 0 };
		d->log_active = true;
		r = header_update(d);
	}
	for (uint64_t p = 0; r == 0 && p < d->bat_pages; p++) {
		if (!d->dirty[p])
			continue;
		pages[n++] = p;
		if (n == max) {
			r = write_pages(d, pages, n, buf);
			/* The next entry may only replace this one in the
			 * log once what it describes is durable. */
			if (r == 0)
				r = bm_fmt_sync(d->f);
			n = 0;
		}
	}
	if (r == 0 && n)
		r = write_pages(d, pages, n, buf);
	if (r == 0) {
		memset(d->dirty, 0, d->bat_pages);
		d->ndirty = 0;
	}
	free(pages);
	free(buf);
	return r;
}

static int
vhdx_flush(void *drv)
{
	struct vhdx *d = drv;
	int r;

	pthread_mutex_lock(&d->lock);
	/* Blocks handed out since the last flush hold their data before
	 * the BAT that points at them is logged. */
	bm_fmt_wait_data(d->f);
	r = bm_fmt_sync(d->f);
	if (r == 0 && d->ndirty)
		r = flush_bat(d);
	/* The new states are durable (logged): freed blocks are free. */
	while (r == 0 && d->npending)
		r = push(d, &d->free_blocks, &d->nfree, &d->cap_free,
			 d->pending[--d->npending]);
	pthread_mutex_unlock(&d->lock);
	return r;
}

static uint64_t
vhdx_allocated(void *drv)
{
	struct vhdx *d = drv;
	uint64_t a;

	pthread_mutex_lock(&d->lock);
	a = d->allocated;
	pthread_mutex_unlock(&d->lock);
	return a;
}

static void
vhdx_close(void *drv)
{
	struct vhdx *d = drv;

	if (d && d->log_active && d->ndirty == 0) {
		memset(d->hdr.log_guid, 0, 16);
		if (bm_fmt_sync(d->f) < 0 || header_update(d) < 0)
			bm_warn("%s: cannot retire the VHDX log: %s", d->name,
				blockmirror_last_error());
	}
	vhdx_free(d);
}

/* ---- create ----------------------------------------------------------- */

struct create_opts {
	bool fixed;
	uint64_t block_size;
	uint64_t lss, pss;
	uint64_t log_size;
	uint8_t page83[16];
	char parent[4096];
	uint8_t parent_dwg[16];
	uint64_t parent_size;
	uint32_t parent_lss;
};

static int
parse_opts(struct bm_fmt *f, uint64_t *size, const char *options,
	   struct create_opts *o)
{
	static const char *const known[] = {
		"subformat", "block_size", "logical_sector_size",
		"physical_sector_size", "log_size", "page83", "parent", NULL,
	};
	const char *name = bm_fmt_name(f);
	char val[64];
	int r;

	*o = (struct create_opts){ .block_size = DEFAULT_BLOCK, .lss = 512,
				   .log_size = DEFAULT_LOG };
	if (!options)
		options = "";
	r = bm_fmt_options_check(f, options, known);
	if (r < 0)
		return r;
	r = bm_fmt_option(options, "subformat", val, sizeof val);
	if (r > 0 && strcmp(val, "fixed") == 0)
		o->fixed = true;
	else if (r > 0 && strcmp(val, "dynamic") != 0)
		return bm_error(-EINVAL, "%s: subformat must be dynamic or "
				"fixed, not '%s'", name, val);
	else if (r < 0)
		return bm_error(r, "%s: bad subformat", name);
	r = bm_fmt_option(options, "parent", o->parent, sizeof o->parent);
	if (r < 0)
		return bm_error(r, "%s: parent path too long", name);
	if (r > 0) {
		char *path = resolve(name, o->parent);

		if (!path)
			return bm_error(-ENOMEM, "%s: out of memory", name);
		r = read_parent(path, o->parent_dwg, &o->parent_size,
				&o->parent_lss);
		free(path);
		if (r < 0)
			return r;
		o->lss = o->parent_lss;
		if (*size == 0)
			*size = o->parent_size;
		if (o->fixed)
			return bm_error(-EINVAL, "%s: a differencing VHDX "
					"cannot be fixed", name);
	}
	if ((r = bm_fmt_option_size(f, options, "block_size",
				    &o->block_size)) < 0 ||
	    (r = bm_fmt_option_size(f, options, "logical_sector_size",
				    &o->lss)) < 0 ||
	    (r = bm_fmt_option_size(f, options, "log_size",
				    &o->log_size)) < 0)
		return r;
	o->pss = o->lss;
	if ((r = bm_fmt_option_size(f, options, "physical_sector_size",
				    &o->pss)) < 0)
		return r;
	if (!bm_is_power_of_2(o->block_size) ||
	    o->block_size < VHDX_MIN_BLOCK || o->block_size > VHDX_MAX_BLOCK)
		return bm_error(-EINVAL, "%s: block_size must be a power of "
				"two from 1M to 256M", name);
	if ((o->lss != 512 && o->lss != 4096) ||
	    (o->pss != 512 && o->pss != 4096))
		return bm_error(-EINVAL, "%s: sector sizes must be 512 or "
				"4096", name);
	if (o->parent[0] && o->lss != o->parent_lss)
		return bm_error(-EINVAL, "%s: logical sector size differs from "
				"the parent's (%" PRIu32 ")", name,
				o->parent_lss);
	if (o->log_size < VHDX_MiB || o->log_size % VHDX_MiB ||
	    o->log_size > 64 * VHDX_MiB)
		return bm_error(-EINVAL, "%s: log_size must be a multiple of "
				"1M from 1M to 64M", name);
	r = bm_fmt_option(options, "page83", val, sizeof val);
	if (r > 0 && vhdx_guid_parse(val, o->page83) < 0)
		return bm_error(-EINVAL, "%s: page83 '%s' is not a GUID",
				name, val);
	if (r <= 0)
		vhdx_guid_generate(o->page83);
	*size = bm_round_up(*size, o->lss);
	if (*size > VHDX_MAX_SIZE)
		return bm_error(-EFBIG, "%s: a VHDX disk holds at most 64 TiB",
				name);
	return 0;
}

/* Backslashes for the locator, as Windows writes them. */
static char *
windows_path(const char *p)
{
	char *s = strdup(p);

	for (char *c = s; c && *c; c++)
		if (*c == '/')
			*c = '\\';
	return s;
}

static int
write_metadata(struct bm_fmt *f, const struct create_opts *o, uint64_t size,
	       uint64_t off)
{
	struct vhdx_meta m = {
		.block_size = (uint32_t)o->block_size,
		.leave_allocated = o->fixed,
		.has_parent = o->parent[0] != 0,
		.virtual_size = size,
		.logical_sector = (uint32_t)o->lss,
		.physical_sector = (uint32_t)o->pss,
	};
	uint8_t *buf = calloc(1, 2 * VHDX_METADATA_TABLE_SIZE);
	char g[39];
	int r = -ENOMEM;

	memcpy(m.page83, o->page83, 16);
	if (m.has_parent) {
		vhdx_guid_format(o->parent_dwg, g);
		m.parent_linkage = strdup(g);
		*(o->parent[0] == '/' ? &m.absolute_win32_path :
		  &m.relative_path) = windows_path(o->parent);
		if (!m.parent_linkage ||
		    !(m.absolute_win32_path || m.relative_path))
			goto out;
	}
	if (!buf)
		goto out;
	r = vhdx_metadata_encode(&m, buf, 2 * VHDX_METADATA_TABLE_SIZE);
	if (r < 0) {
		r = bm_error(r, "%s: parent path cannot be stored",
			     bm_fmt_name(f));
		goto out;
	}
	r = bm_fmt_pwrite(f, buf, 2 * VHDX_METADATA_TABLE_SIZE, off);
out:
	if (r == -ENOMEM)
		bm_error(r, "%s: out of memory", bm_fmt_name(f));
	vhdx_meta_free(&m);
	free(buf);
	return r;
}

/* A fixed disk's BAT: every payload block present, in order. */
static int
write_fixed_bat(struct bm_fmt *f, const struct vhdx_geom *g, uint64_t bat,
		uint64_t payload, uint64_t bs)
{
	const size_t per = VHDX_MiB / 8;
	uint64_t *buf = malloc(VHDX_MiB);
	int r = 0;

	if (!buf)
		return bm_error(-ENOMEM, "%s: out of memory", bm_fmt_name(f));
	for (uint64_t i = 0; r == 0 && i < g->bat_entries; i += per) {
		size_t n = (size_t)BM_MIN(per, g->bat_entries - i);

		for (size_t k = 0; k < n; k++) {
			uint64_t idx = i + k, e = 0;

			if (idx % (g->chunk_ratio + 1) != g->chunk_ratio) {
				uint64_t blk = idx - idx / (g->chunk_ratio + 1);

				e = vhdx_bat_entry(VHDX_BAT_FULLY_PRESENT,
						   payload + blk * bs);
			}
			vhdx_put_le64((uint8_t *)&buf[k], e);
		}
		r = bm_fmt_pwrite(f, buf, n * 8, bat + i * 8);
	}
	free(buf);
	return r;
}

static int
vhdx_create(struct bm_fmt *f, uint64_t size, const char *options)
{
	struct create_opts o;
	struct vhdx_meta m = { 0 };
	struct vhdx_geom g;
	struct vhdx_regions reg;
	struct vhdx_header h = { .version = 1 };
	uint64_t payload, end;
	uint8_t *buf;
	int r;

	r = parse_opts(f, &size, options, &o);
	if (r < 0)
		return r;
	m.block_size = (uint32_t)o.block_size;
	m.logical_sector = (uint32_t)o.lss;
	m.virtual_size = size;
	m.has_parent = o.parent[0] != 0;
	vhdx_geometry(bm_fmt_name(f), &m, &g);
	reg.bat_offset = VHDX_MiB + o.log_size;
	reg.bat_length = (uint32_t)bm_round_up(BM_MAX(g.bitmap_blocks *
						      (g.chunk_ratio + 1) * 8,
						      1), VHDX_MiB);
	reg.meta_offset = reg.bat_offset + reg.bat_length;
	reg.meta_length = VHDX_MiB;
	payload = reg.meta_offset + reg.meta_length;
	end = payload + (o.fixed ? g.data_blocks * o.block_size : 0);

	buf = malloc(VHDX_REGION_SIZE);
	if (!buf)
		return bm_error(-ENOMEM, "%s: out of memory", bm_fmt_name(f));
	r = bm_fmt_truncate(f, end);
	if (r == 0) {
		vhdx_file_id_encode(buf);
		r = bm_fmt_pwrite(f, buf, VHDX_REGION_SIZE, 0);
	}
	if (r == 0) {
		vhdx_region_table_encode(&reg, buf);
		r = bm_fmt_pwrite(f, buf, VHDX_REGION_SIZE,
				  VHDX_REGION1_OFFSET);
	}
	if (r == 0)
		r = bm_fmt_pwrite(f, buf, VHDX_REGION_SIZE,
				  VHDX_REGION2_OFFSET);
	if (r == 0)
		r = write_metadata(f, &o, size, reg.meta_offset);
	if (r == 0 && o.fixed)
		r = write_fixed_bat(f, &g, reg.bat_offset, payload,
				    o.block_size);
	/* The headers last: until they are in place this is no image. */
	if (r == 0)
		r = bm_fmt_sync(f);
	vhdx_guid_generate(h.file_write_guid);
	vhdx_guid_generate(h.data_write_guid);
	h.log_offset = VHDX_MiB;
	h.log_length = (uint32_t)o.log_size;
	for (int i = 0; r == 0 && i < 2; i++) {
		h.seq = (uint64_t)i + 1;
		vhdx_header_encode(&h, buf);
		r = bm_fmt_pwrite(f, buf, VHDX_HEADER_SIZE,
				  i ? VHDX_HEADER2_OFFSET :
				  VHDX_HEADER1_OFFSET);
	}
	if (r == 0)
		r = bm_fmt_sync(f);
	free(buf);
	return r;
}

/* ---- changing the parent (docs/chains.md) ----------------------------- */

/*
 * Point the parent locator at `name`: the linkage becomes the new
 * parent's DataWriteGuid (it must have our size and sector size), the
 * path the new name.  The re-encoded metadata region's changed pages go
 * through the log like BAT pages: one log entry (synced), then the pages
 * in place (synced).  A crash before the entry is durable leaves the old
 * locator; after it, replay at the next open writes the new one.  Other
 * metadata items are re-encoded from what was parsed: items this driver
 * does not know are not kept.
 */
static int
vhdx_set_backing(void *drv, const char *name, enum blockmirror_format format)
{
	struct vhdx *d = drv;
	size_t len = 2 * VHDX_METADATA_TABLE_SIZE, n = 0;
	size_t pages = len / VHDX_LOG_SECTOR;
	struct vhdx_log_desc *desc = calloc(pages, sizeof *desc);
	uint8_t *cur = malloc(len), *next = calloc(1, len), dwg[16];
	struct vhdx_meta m;
	char *path = resolve(d->name, name), g[39];
	uint64_t size = 0;
	uint32_t lss = 0;
	int r = 0;

	if (!desc || !cur || !next || !path) {
		r = bm_error(-ENOMEM, "%s: out of memory", d->name);
		goto out;
	}
	if (format != BLOCKMIRROR_FORMAT_AUTO &&
	    format != BLOCKMIRROR_FORMAT_VHDX) {
		r = bm_error(-ENOTSUP, "%s: a VHDX parent must be VHDX",
			     d->name);
		goto out;
	}
	if (!d->meta.has_parent || len > d->reg.meta_length) {
		r = bm_error(-EINVAL, "%s: not a differencing VHDX", d->name);
		goto out;
	}
	r = read_parent(path, dwg, &size, &lss);
	if (r == 0 && (size != d->meta.virtual_size ||
		       lss != d->meta.logical_sector))
		r = bm_error(-EINVAL, "%s: new parent %s differs in size or "
			     "sector size", d->name, name);
	if (r < 0)
		goto out;

	pthread_mutex_lock(&d->lock);
	m = d->meta;
	vhdx_guid_format(dwg, g);
	m.parent_linkage = g;
	m.parent_linkage2 = NULL;
	m.volume_path = NULL;
	m.relative_path = NULL;
	m.absolute_win32_path = windows_path(name);
	if (name[0] != '/') {
		m.relative_path = m.absolute_win32_path;
		m.absolute_win32_path = NULL;
	}
	if (!m.relative_path && !m.absolute_win32_path)
		r = bm_error(-ENOMEM, "%s: out of memory", d->name);
	if (r == 0 && vhdx_metadata_encode(&m, next, len) < 0)
		r = bm_error(-EINVAL, "%s: parent path cannot be stored",
			     d->name);
	if (r == 0)
		r = meta_read(d, cur, len, d->reg.meta_offset);
	for (size_t i = 0; r == 0 && i < pages; i++) {
		size_t o = i * VHDX_LOG_SECTOR;

		if (memcmp(cur + o, next + o, VHDX_LOG_SECTOR) == 0)
			continue;
		desc[n].file_offset = d->reg.meta_offset + o;
		desc[n++].data = next + o;
	}
	if (r == 0 && n > vhdx_log_max_data(d->hdr.log_length))
		r = bm_error(-ENOSPC, "%s: the new parent locator does not fit "
			     "one log entry", d->name);
	if (r == 0)
		r = begin_change(d, false);
	if (r == 0 && !d->log_active) {
		vhdx_guid_generate(d->hdr.log_guid);
		d->logw = (struct vhdx_log_writer){ 0 };
		d->log_active = true;
		r = header_update(d);
	}
	/* Whatever was flushed before stays durable: the log entry may
	 * only follow it. */
	if (r == 0)
		r = bm_fmt_sync(d->f);
	if (r == 0 && n)
		r = vhdx_log_write(&d->io, &d->hdr, &d->logw, desc, n);
	for (size_t i = 0; r == 0 && i < n; i++)
		r = bm_fmt_pwrite(d->f, desc[i].data, VHDX_LOG_SECTOR,
				  desc[i].file_offset);
	if (r == 0)
		r = bm_fmt_sync(d->f);
	if (r == 0) {
		char *lk = strdup(g);

		if (!lk) {
			r = bm_error(-ENOMEM, "%s: out of memory", d->name);
		} else {
			free(d->meta.parent_linkage);
			free(d->meta.parent_linkage2);
			free(d->meta.volume_path);
			free(d->meta.relative_path);
			free(d->meta.absolute_win32_path);
			d->meta.parent_linkage = lk;
			d->meta.parent_linkage2 = NULL;
			d->meta.volume_path = NULL;
			d->meta.relative_path = m.relative_path;
			d->meta.absolute_win32_path = m.absolute_win32_path;
			m.relative_path = m.absolute_win32_path = NULL;
		}
	}
	pthread_mutex_unlock(&d->lock);
	free(m.relative_path);
	free(m.absolute_win32_path);
out:
	free(desc);
	free(cur);
	free(next);
	free(path);
	return r;
}

const struct bm_fmt_driver bm_vhdx_driver = {
	.name = "vhdx",
	.format = BLOCKMIRROR_FORMAT_VHDX,
	.open = vhdx_open,
	.create = vhdx_create,
	.map = vhdx_map,
	.flush = vhdx_flush,
	.allocated = vhdx_allocated,
	.close = vhdx_close,
	.set_backing = vhdx_set_backing,
};
