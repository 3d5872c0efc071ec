/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The VHDX log: finding the active sequence, replaying it (into the file,
 * or over reads for a read-only open), and writing entries.
 *
 * Search ([MS-VHDX] 2.3.3).  The log is a circular buffer of 4 KiB
 * sectors.  An entry is valid when its checksum covers it, its LogGuid
 * is the header's and its sequence number is non-zero; anything else at
 * a position is a torn, stale or foreign write and is skipped silently.
 * Valid entries whose sequence numbers go up by one and which follow
 * each other in the buffer form a sequence; a sequence counts only if
 * the Tail of its last entry (the head) names one of its own entries
 * (QEMU skips this test; DiscUtils and the spec do not).  The active
 * sequence is the counting one with the highest head sequence number,
 * and replay applies its entries from the tail to the head.  Every
 * position is examined once: the chains are walked from the entries
 * that have no predecessor, so the search is linear in the log size.
 *
 * Safety of replay.  Replay is a file modification (the caller renews
 * FileWriteGuid first).  Entries are idempotent (whole sectors and zero
 * ranges), so a crash during replay just replays again.  A log whose
 * head says more of the file was durable than the file holds
 * (FlushedFileOffset > size) belongs to a truncated file and is refused,
 * as are entries that would write the headers (which locate the log) or
 * beyond the head's LastFileOffset.
 *
 * Writing.  The driver logs BAT pages only.  Each entry is a sequence of
 * its own (its Tail is itself) and is applied and synced before the
 * next is written, so an entry never depends on an older one; entries
 * do not wrap around the end of the buffer (the next one starts at 0).
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "errors.h"
#include "internal.h"
#include "vhdx.h"

/* Bigger logs than this are refused rather than read into memory. */
#define LOG_MAX_LENGTH (128 * VHDX_MiB)

struct pos_info {
	struct vhdx_log_entry e;
	uint32_t next;          /* position (sector) after the entry */
	int32_t chain_index;    /* index in the chain being walked, -1 */
	bool valid;
	bool has_pred;
};

static const uint8_t *
entry_at(const struct vhdx_log_seq *s, uint32_t pos)
{
	return s->log + pos;
}

/* Walk every entry of the sequence; stop at the first callback error. */
static int
for_each_desc(const struct vhdx_log_seq *s,
	      int (*fn)(void *opaque, const struct vhdx_log_desc *d),
	      void *opaque)
{
	uint8_t sector[VHDX_LOG_SECTOR];
	uint32_t pos = s->tail;

	for (uint32_t i = 0; i < s->count; i++) {
		const uint8_t *b = entry_at(s, pos);
		uint32_t n = vhdx_le32(b + 24);
		uint64_t k = 0;

		for (uint32_t j = 0; j < n; j++) {
			struct vhdx_log_desc d;
			int r;

			vhdx_log_entry_desc(b, j, &k, sector, &d);
			r = fn(opaque, &d);
			if (r)
				return r;
		}
		pos = (uint32_t)((pos + vhdx_le32(b + 8)) % s->length);
	}
	return 0;
}

static uint64_t
desc_length(const struct vhdx_log_desc *d)
{
	return d->data ? VHDX_LOG_SECTOR : d->zero_length;
}

struct target_check {
	const char *name;
	uint64_t limit;
};

static int
check_target(void *opaque, const struct vhdx_log_desc *d)
{
	struct target_check *t = opaque;
	uint64_t len = desc_length(d);

	if (d->file_offset < VHDX_REGION1_OFFSET)
		return bm_error(-EINVAL, "%s: VHDX log writes into the "
				"headers (offset %" PRIu64 ")", t->name,
				d->file_offset);
	if (!bm_range_ok(d->file_offset, len, t->limit))
		return bm_error(-EINVAL, "%s: VHDX log writes %" PRIu64
				"-%" PRIu64 ", past the end of the file (%"
				PRIu64 ")", t->name, d->file_offset,
				d->file_offset + len, t->limit);
	return 0;
}

/* Examine every position; fill info[]. */
static int
scan(const char *name, const struct vhdx_log_seq *s, const uint8_t guid[16],
     struct pos_info *info, uint32_t n)
{
	for (uint32_t p = 0; p < n; p++) {
		struct pos_info *pi = &info[p];
		int r;

		pi->chain_index = -1;
		r = vhdx_log_entry_check(name, s->log + (size_t)p *
					 VHDX_LOG_SECTOR, s->length, guid,
					 (uint64_t)p * VHDX_LOG_SECTOR, &pi->e);
		if (r < 0)
			return r;
		pi->valid = r == 1;
		if (pi->valid)
			pi->next = (p + pi->e.entry_length / VHDX_LOG_SECTOR) %
				   n;
	}
	for (uint32_t p = 0; p < n; p++) {
		struct pos_info *pi = &info[p];

		if (pi->valid && info[pi->next].valid &&
		    info[pi->next].e.seq == pi->e.seq + 1)
			info[pi->next].has_pred = true;
	}
	return 0;
}

/* Walk the chain from start; update the best (head seq, tail, count). */
static void
walk(struct pos_info *info, uint32_t n, uint32_t start, uint32_t *chain,
     struct vhdx_log_seq *best)
{
	uint32_t len = 0, p = start;

	for (;;) {
		uint32_t t = info[p].e.tail / VHDX_LOG_SECTOR;

		info[p].chain_index = (int32_t)len;
		chain[len++] = p;
		if (t < n && info[t].chain_index >= 0 &&
		    (!best->count || info[p].e.seq > best->head_seq)) {
			best->head_seq = info[p].e.seq;
			best->tail = t * VHDX_LOG_SECTOR;
			best->count = len - (uint32_t)info[t].chain_index;
			best->flushed_file_offset =
				info[p].e.flushed_file_offset;
			best->last_file_offset = info[p].e.last_file_offset;
		}
		if (len == n || !info[info[p].next].valid ||
		    info[info[p].next].e.seq != info[p].e.seq + 1 ||
		    info[info[p].next].chain_index >= 0)
			break;
		p = info[p].next;
	}
	for (uint32_t i = 0; i < len; i++)
		info[chain[i]].chain_index = -1;
}

static int
find_active(const char *name, struct vhdx_log_seq *s, const uint8_t guid[16])
{
	uint32_t n = s->length / VHDX_LOG_SECTOR;
	struct pos_info *info = calloc(n, sizeof *info);
	uint32_t *chain = calloc(n, sizeof *chain);
	int r = -ENOMEM;

	if (!info || !chain) {
		bm_error(r, "%s: out of memory", name);
		goto out;
	}
	r = scan(name, s, guid, info, n);
	if (r < 0)
		goto out;
	for (uint32_t p = 0; p < n; p++)
		if (info[p].valid && !info[p].has_pred)
			walk(info, n, p, chain, s);
out:
	free(info);
	free(chain);
	return r;
}

int
vhdx_log_find(const struct vhdx_log_io *io, const struct vhdx_header *h,
	      struct vhdx_log_seq **out)
{
	uint64_t size = io->size(io->opaque);
	struct vhdx_log_seq *s;
	struct target_check t = { io->name, 0 };
	int r;

	*out = NULL;
	if (vhdx_guid_is_zero(h->log_guid))
		return 0;
	if (!bm_range_ok(h->log_offset, h->log_length, size))
		return bm_error(-EINVAL, "%s: VHDX log %" PRIu64 "+%" PRIu32
				" lies past the end of the file (%" PRIu64 ")",
				io->name, h->log_offset, h->log_length, size);
	if (h->log_length > LOG_MAX_LENGTH)
		return bm_error(-ENOTSUP, "%s: VHDX log of %" PRIu32 " bytes "
				"is too large to replay", io->name,
				h->log_length);
	s = calloc(1, sizeof *s);
	if (!s || !(s->log = malloc(2 * (size_t)h->log_length))) {
		free(s);
		return bm_error(-ENOMEM, "%s: out of memory", io->name);
	}
	s->length = h->log_length;
	r = io->pread(io->opaque, s->log, s->length, h->log_offset);
	if (r < 0)
		goto fail;
	memcpy(s->log + s->length, s->log, s->length);
	r = find_active(io->name, s, h->log_guid);
	if (r < 0)
		goto fail;
	if (!s->count) {
		vhdx_log_seq_free(s);
		return 0;
	}
	if (s->flushed_file_offset > size) {
		r = bm_error(-EINVAL, "%s: VHDX log says %" PRIu64 " bytes "
			     "were durable but the file has %" PRIu64
			     ": truncated", io->name, s->flushed_file_offset,
			     size);
		goto fail;
	}
	t.limit = BM_MAX(size, s->last_file_offset);
	r = for_each_desc(s, check_target, &t);
	if (r < 0)
		goto fail;
	*out = s;
	return 0;
fail:
	vhdx_log_seq_free(s);
	return r;
}

static int
apply_one(void *opaque, const struct vhdx_log_desc *d)
{
	const struct vhdx_log_io *io = opaque;

	if (d->data)
		return io->pwrite(io->opaque, d->data, VHDX_LOG_SECTOR,
				  d->file_offset);
	return io->zero(io->opaque, d->file_offset, d->zero_length);
}

int
vhdx_log_apply(const struct vhdx_log_io *io, const struct vhdx_log_seq *s)
{
	int r = for_each_desc(s, apply_one, (void *)io);

	if (r < 0)
		return r;
	if (io->size(io->opaque) < s->last_file_offset) {
		r = io->truncate(io->opaque, s->last_file_offset);
		if (r < 0)
			return r;
	}
	return io->sync(io->opaque);
}

struct overlay {
	uint8_t *buf;
	size_t len;
	uint64_t off;
};

static int
overlay_one(void *opaque, const struct vhdx_log_desc *d)
{
	struct overlay *o = opaque;
	uint64_t a = BM_MAX(o->off, d->file_offset);
	uint64_t b = BM_MIN(o->off + o->len, d->file_offset + desc_length(d));

	if (a >= b)
		return 0;
	if (d->data)
		memcpy(o->buf + (a - o->off), d->data + (a - d->file_offset),
		       b - a);
	else
		memset(o->buf + (a - o->off), 0, b - a);
	return 0;
}

void
vhdx_log_overlay(const struct vhdx_log_seq *s, void *buf, size_t len,
		 uint64_t off)
{
	struct overlay o = { buf, len, off };

	for_each_desc(s, overlay_one, &o);
}

struct within {
	const struct vhdx_range *ok;
	size_t nok;
	uint64_t bad;
};

static int
within_one(void *opaque, const struct vhdx_log_desc *d)
{
	struct within *w = opaque;
	uint64_t len = desc_length(d);

	for (size_t i = 0; i < w->nok; i++)
		if (d->file_offset >= w->ok[i].offset &&
		    d->file_offset + len <= w->ok[i].offset + w->ok[i].length)
			return 0;
	w->bad = d->file_offset;
	return 1;
}

bool
vhdx_log_within(const struct vhdx_log_seq *s, const struct vhdx_range *ok,
		size_t nok, uint64_t *bad)
{
	struct within w = { ok, nok, 0 };

	if (for_each_desc(s, within_one, &w) == 0)
		return true;
	*bad = w.bad;
	return false;
}

void
vhdx_log_seq_free(struct vhdx_log_seq *s)
{
	if (s) {
		free(s->log);
		free(s);
	}
}

size_t
vhdx_log_max_data(uint32_t length)
{
	size_t n = length / VHDX_LOG_SECTOR;

	/* Each data sector costs one sector plus 32 bytes of descriptor. */
	while (n && vhdx_log_entry_size(n, 0) > length)
		n--;
	return n;
}

int
vhdx_log_write(const struct vhdx_log_io *io, const struct vhdx_header *h,
	       struct vhdx_log_writer *w, const struct vhdx_log_desc *d,
	       size_t n)
{
	size_t ndata = 0;
	uint64_t len;
	struct vhdx_log_entry e = { 0 };
	uint8_t *buf;
	int r;

	for (size_t i = 0; i < n; i++)
		ndata += d[i].data != NULL;
	len = vhdx_log_entry_size(ndata, n - ndata);
	if (len > h->log_length)
		return bm_error(-ENOSPC, "%s: VHDX log entry of %" PRIu64
				" bytes does not fit the log", io->name, len);
	if (w->pos + len > h->log_length)
		w->pos = 0;
	buf = malloc(len);
	if (!buf)
		return bm_error(-ENOMEM, "%s: out of memory", io->name);
	e.tail = w->pos;
	e.seq = ++w->seq;
	memcpy(e.log_guid, h->log_guid, 16);
	e.flushed_file_offset = io->size(io->opaque);
	e.last_file_offset = e.flushed_file_offset;
	vhdx_log_entry_encode(&e, d, n, buf);
	r = io->pwrite(io->opaque, buf, len, h->log_offset + w->pos);
	free(buf);
	if (r < 0)
		return r;
	w->pos = (uint32_t)((w->pos + len) % h->log_length);
	return io->sync(io->opaque);
}
