/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Changed-block tracking with crash-safe checkpoints (format:
 * cbt-format.c, docs/cbt.md).
 *
 * The invariant: a guest write is never let through while a block it
 * touches is clear in the newest bitmap Bn on disk.  So after a crash at
 * any instant (kill -9 or a power loss), every block the guest may have
 * written since Cn was created is set in the file, and "changed since"
 * any checkpoint is a superset of what changed.  An unclean shutdown
 * therefore costs nothing: the next open reports it (bm_cbt_crashed) and
 * the bitmaps stay trusted.
 *
 * For Bn the tracker keeps three sets:
 *
 *   want      (the checkpoint's own bitmap) every block a mark asked for
 *   durable   blocks whose page write and fdatasync have completed
 *   pending   pages of Bn that hold bits set since their last write
 *
 * Marking (bm_cbt_mark) mirrors the mirror's state file (state-io.c): a
 * range set in `durable` goes on at once for the price of one bitmap
 * test.  Otherwise its bits go into `want`, its pages into `pending`,
 * and its waiter into a FIFO.  One write-back at a time takes the
 * pending pages (they become `inflight`), writes them in place, then
 * fdatasyncs; when that completes the pages' snapshot is ORed into
 * `durable` and every waiter whose range is now durable is called.
 * Marks made meanwhile ride the next write-back, so a burst of writes
 * shares one sync.
 *
 * Writing pages in place is safe because between two rewrites of the
 * whole file the bits of Bn only go from 0 to 1: a torn page (each
 * sector old or new) can only lose bits whose writers are still waiting.
 *
 * Carrying: Bn on disk may hold more than Bn.  A checkpoint created soon
 * after the previous one (replication makes one a second) starts its
 * bitmap on disk with the blocks already durable, not empty
 * (cbt-checkpoint.c), so writes to blocks written just before it do not
 * wait for a sync again.  Memory keeps Bn exact (`want`); `durable` is
 * then no subset of it, a write-back writes want | durable, and only a
 * crash shows the extra blocks, as "changed since Cn" a little too large
 * (a superset still).  A close writes Bn exact.  Everything else (the
 * checkpoint list, frozen bitmaps, the in-use flag) changes only by a
 * structural rewrite: the whole file from memory to a temporary file,
 * fsynced and renamed over (bm_durable_write_file), so a crash leaves
 * the old file or the new one.  After a rewrite the store is reopened on
 * the new file.
 *
 * The fine record (bm_cbt_keep_fine): beside each bitmap, a checkpoint
 * created while it is on keeps, in memory only, the same marks at a
 * finer granularity, so that what changed since it can be told in small
 * blocks (replication sends 4 KiB writes as such, not whole 64 KiB
 * granules) while the file, and every sync a guest write waits for,
 * stays coarse.  A crash loses it, and with it nothing that matters: a
 * checkpoint read from the file has none, and "changed since" is then
 * told by the coarse bitmaps.
 *
 * A failed write-back breaks the tracker: its waiters and every later
 * mark fail with that error.  The disk lets those guest writes through
 * unrecorded (bm_disk_tracking_failed: the guest comes first), so every
 * checkpoint existing then is flagged BM_CBT_LOST (in memory at once, on
 * disk at the next rewrite, close included).  The next structural rewrite mends the tracker.
 *
 * A record kept in a qcow2 image (cbt-image.c) is the same tracker: the
 * pages of Bn are written in place in the image's file, at the offsets
 * of its bitmap's clusters, and a structural rewrite is a commit of a new
 * bitmap list by the qcow2 driver instead of a new file; the store is
 * the tracker's own handle on the image file and is never reopened.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cbt-int.h"
#include "durable.h"
#include "errors.h"
#include "fault.h"
#include "image.h"
#include "internal.h"
#include "store.h"

static struct checkpoint *
newest(struct bm_cbt *cbt)
{
	return &cbt->cp[cbt->count - 1];
}

void
bm_cbt_or_into(struct bm_bitmap *dst, const struct bm_bitmap *src)
{
	dst->count = 0;
	for (uint64_t i = 0; i < (dst->nbits + 63) / 64; i++) {
		dst->words[i] |= src->words[i];
		dst->count += (uint64_t)__builtin_popcountll(dst->words[i]);
	}
}

/* ---- write-back ------------------------------------------------------ */

static void start_writeback(struct bm_cbt *cbt);

/* Call the waiters whose range is durable, or all of them with err. */
static void
release(struct bm_cbt *cbt, int err)
{
	struct bm_cbt_waiter *list = cbt->waiters, *ready = NULL;
	struct bm_cbt_waiter **rtail = &ready;

	cbt->waiters = NULL;
	cbt->wtail = &cbt->waiters;
	while (list) {
		struct bm_cbt_waiter *w = list;

		list = w->next;
		w->next = NULL;
		if (err || bm_bitmap_test_all(&cbt->durable, w->offset,
					      w->length)) {
			*rtail = w;
			rtail = &w->next;
		} else {
			*cbt->wtail = w;
			cbt->wtail = &w->next;
		}
	}
	/* Collected first: a callback may mark again. */
	while (ready) {
		struct bm_cbt_waiter *w = ready;

		ready = w->next;
		w->next = NULL;
		w->fn(w, err);
	}
}

static void
lose_tracking(struct bm_cbt *cbt)
{
	for (size_t i = 0; i < cbt->count; i++)
		cbt->cp[i].e.flags |= BM_CBT_LOST;
}

static void
fail(struct bm_cbt *cbt, int err)
{
	char *msg = NULL;

	bm_error(err, "%s: writing the changed-block bitmap failed: %s",
		 cbt->path, strerror(-err));
	bm_warn("%s", blockmirror_last_error());
	if (!cbt->err) {
		msg = strdup(blockmirror_last_error());
		cbt->err = err;
		free(cbt->errmsg);
		cbt->errmsg = msg;
	}
	lose_tracking(cbt);
	cbt->writing = cbt->flushing = false;
	bm_bitmap_clear_all(&cbt->inflight);
	bm_bitmap_clear_all(&cbt->pending);
	release(cbt, cbt->err);
}

static int
broken(const struct bm_cbt *cbt)
{
	return bm_error(cbt->err, "%s", cbt->errmsg ? cbt->errmsg
			: "changed-block tracking failed");
}

static uint64_t
bitmap_offset(const struct bm_cbt *cbt, size_t i)
{
	return bm_cbt_header_size((uint32_t)cbt->count) +
	       (uint64_t)i * cbt->bitmap_size;
}

static void writeback_done(struct bm_io *io, int err);

/* Write the next run of inflight pages, or flush once all are written. */
static void
next_step(struct bm_cbt *cbt)
{
	uint64_t page, n;

	memset(&cbt->io, 0, sizeof cbt->io);
	cbt->io.done = writeback_done;
	cbt->io.opaque = cbt;
	if (bm_bitmap_next_dirty(&cbt->inflight, cbt->cursor, 0, &page, &n)) {
		if (cbt->image) {
			/* In an image, only a cluster's pages are
			 * contiguous. */
			uint64_t per = cbt->cluster_size / BM_CBT_PAGE;

			n = BM_MIN(n, per - page % per);
			cbt->io.offset = bm_cbt_image_page(cbt, page);
		} else {
			cbt->io.offset = bitmap_offset(cbt, cbt->count - 1) +
					 page * BM_CBT_PAGE;
		}
		cbt->cursor = page + n;
		cbt->io.length = n * BM_CBT_PAGE;
		cbt->io.buf = cbt->wbuf + page * BM_CBT_PAGE;
		cbt->store->ops->write(cbt->store, &cbt->io);
		return;
	}
	cbt->flushing = true;
	cbt->store->ops->flush(cbt->store, &cbt->io);
}

static void
writeback_done(struct bm_io *io, int err)
{
	struct bm_cbt *cbt = io->opaque;
	uint64_t page = 0, n;

	if (err < 0) {
		fail(cbt, err);
		return;
	}
	if (!cbt->flushing) {
		next_step(cbt);
		return;
	}
	/* Durable: what the pages said at the snapshot is on disk. */
	while (bm_bitmap_next_dirty(&cbt->inflight, page, 0, &page, &n)) {
		cbt->durable.count += bm_cbt_bits_decode(
			cbt->wbuf + page * BM_CBT_PAGE, cbt->blocks, page, n,
			cbt->durable.words);
		page += n;
	}
	bm_bitmap_clear_all(&cbt->inflight);
	cbt->writing = cbt->flushing = false;
	release(cbt, 0);
	start_writeback(cbt);
}

static void
start_writeback(struct bm_cbt *cbt)
{
	struct bm_bitmap t;
	uint64_t page = 0, n;

	if (cbt->writing || cbt->err || !cbt->count || !cbt->pending.count)
		return;
	/* The pending pages go; marks from now on gather anew. */
	t = cbt->inflight;
	cbt->inflight = cbt->pending;
	cbt->pending = t;
	while (bm_bitmap_next_dirty(&cbt->inflight, page, 0, &page, &n)) {
		/* Never clear a durable bit: the carried ones are not in
		 * want. */
		bm_cbt_bits_encode(newest(cbt)->bits.words,
				   cbt->carrying ? cbt->durable.words : NULL,
				   cbt->blocks, page, n,
				   cbt->wbuf + page * BM_CBT_PAGE);
		page += n;
	}
	cbt->writing = true;
	cbt->cursor = 0;
	next_step(cbt);
}

int
bm_cbt_mark(struct bm_cbt *cbt, uint64_t offset, uint64_t length,
	    struct bm_cbt_waiter *w)
{
	struct bm_bitmap *want;
	uint64_t before, first, last;

	if (!cbt->count || !length)
		return 0;
	if (cbt->err)
		return broken(cbt);
	if (!bm_range_ok(offset, length, cbt->disk_size))
		return bm_error(-EINVAL, "%s: mark of %" PRIu64 " bytes at %"
				PRIu64 " is beyond the disk (%" PRIu64
				" bytes)", cbt->path, length, offset,
				cbt->disk_size);
	if (newest(cbt)->fine.words)
		bm_bitmap_set_range(&newest(cbt)->fine, offset, length);
	if (bm_bitmap_test_all(&cbt->durable, offset, length)) {
		/* Carried: durable, but Bn in memory does not have it. */
		if (cbt->carrying)
			bm_bitmap_set_range(&newest(cbt)->bits, offset, length);
		return 0;
	}
	if (!w || !w->fn)
		return bm_error(-EINVAL, "%s: a mark that must wait needs a "
				"waiter", cbt->path);
	want = &newest(cbt)->bits;
	before = want->count;
	bm_bitmap_set_range(want, offset, length);
	if (want->count != before) {
		first = (offset / cbt->granularity) / (BM_CBT_PAGE * 8);
		last = ((offset + length - 1) / cbt->granularity) /
		       (BM_CBT_PAGE * 8);
		bm_bitmap_set_range(&cbt->pending, first, last - first + 1);
	}
	w->offset = offset;
	w->length = length;
	w->next = NULL;
	*cbt->wtail = w;
	cbt->wtail = &w->next;
	start_writeback(cbt);
	return 1;
}

int
bm_cbt_flush(struct bm_cbt *cbt)
{
	while (!cbt->err && (cbt->writing || cbt->pending.count)) {
		int r;

		start_writeback(cbt);
		if (!cbt->writing)
			break;
		r = bm_loop_run_once(cbt->loop, -1);
		if (r < 0)
			return bm_error(r, "%s: running the loop: %s",
					cbt->path, strerror(-r));
	}
	return cbt->err ? broken(cbt) : 0;
}

/* ---- the file -------------------------------------------------------- */

int
bm_cbt_write_file(struct bm_cbt *cbt, const struct bm_cbt_entry *ents,
		  struct bm_bitmap *const *bits, size_t count, bool in_use)
{
	struct bm_cbt_header h = {
		.flags = in_use ? BM_CBT_IN_USE : 0,
		.disk_size = cbt->disk_size,
		.granularity = cbt->granularity,
		.next_id = cbt->next_id,
		.count = (uint32_t)count,
		.cp = (struct bm_cbt_entry *)ents,
	};
	size_t hsize = bm_cbt_header_size(h.count);
	size_t len = hsize + count * (size_t)cbt->bitmap_size;
	uint8_t *buf;
	int r;

	if (cbt->image)
		return bm_cbt_image_write(cbt, ents, bits, count);
	buf = malloc(len);
	if (!buf)
		return bm_error(-ENOMEM, "%s: out of memory", cbt->path);
	r = bm_cbt_header_encode(&h, buf);
	if (r < 0) {
		bm_error_prefix(r, "%s: ", cbt->path);
		goto out;
	}
	for (size_t i = 0; i < count; i++)
		bm_cbt_bits_encode(bits[i]->words, NULL, cbt->blocks, 0,
				   cbt->npages,
				   buf + hsize + i * cbt->bitmap_size);
	r = bm_durable_write_file(cbt->path, buf, len, 0600);
out:
	free(buf);
	return r;
}

/* The file as the checkpoints in memory say. */
static int
write_current(struct bm_cbt *cbt, bool in_use)
{
	struct bm_cbt_entry *ents = calloc(cbt->count + 1, sizeof *ents);
	struct bm_bitmap **bits = calloc(cbt->count + 1, sizeof *bits);
	int r;

	if (!ents || !bits) {
		r = bm_error(-ENOMEM, "%s: out of memory", cbt->path);
		goto out;
	}
	for (size_t i = 0; i < cbt->count; i++) {
		ents[i] = cbt->cp[i].e;
		bits[i] = &cbt->cp[i].bits;
	}
	r = bm_cbt_write_file(cbt, ents, bits, cbt->count, in_use);
out:
	free(ents);
	free(bits);
	return r;
}

/* The file holds every bit of memory now; a failure to reopen the
 * store breaks the tracker. */
void
bm_cbt_rewritten(struct bm_cbt *cbt, const struct bm_bitmap *carried)
{
	struct bm_store *s = NULL;
	int r;

	bm_bitmap_clear_all(&cbt->pending);
	bm_bitmap_clear_all(&cbt->durable);
	if (cbt->count)
		bm_cbt_or_into(&cbt->durable, &newest(cbt)->bits);
	cbt->carrying = cbt->count && carried &&
			bm_bitmap_count(carried) != 0;
	if (cbt->carrying)
		bm_cbt_or_into(&cbt->durable, carried);
	cbt->err = 0;
	free(cbt->errmsg);
	cbt->errmsg = NULL;
	if (cbt->image) {
		/* Same file; Bn's clusters moved. */
		free(cbt->last);
		cbt->last = cbt->new_last;
		cbt->new_last = NULL;
		release(cbt, 0);
		return;
	}
	bm_store_close(cbt->store);
	cbt->store = NULL;
	r = bm_file_open(cbt->loop, cbt->path, BM_OPEN_WRITE, 0, &s);
	if (r == 0)
		r = bm_store_wrap(cbt->path, &s);
	if (r < 0) {
		bm_store_close(s); /* NULL, or not consumed by the wrap */
		fail(cbt, r);
		return;
	}
	cbt->store = s;
	release(cbt, 0);
}

static int
read_full(int fd, uint8_t *buf, size_t len, uint64_t off)
{
	size_t done = 0;

	while (done < len) {
		ssize_t n = pread(fd, buf + done, len - done,
				  (off_t)(off + done));

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		if (n == 0)
			return -EBADMSG;
		done += (size_t)n;
	}
	return 0;
}

static int
read_bitmaps(struct bm_cbt *cbt, int fd, size_t hsize)
{
	uint8_t *buf = malloc(cbt->bitmap_size);
	int r = 0;

	if (!buf)
		return bm_error(-ENOMEM, "%s: out of memory", cbt->path);
	for (size_t i = 0; i < cbt->count && r == 0; i++) {
		struct checkpoint *c = &cbt->cp[i];
		uint64_t added;

		r = read_full(fd, buf, cbt->bitmap_size,
			      hsize + i * cbt->bitmap_size);
		if (r < 0) {
			r = bm_error(r, "%s: reading the bitmap of %s: %s",
				     cbt->path, c->e.name, strerror(-r));
			break;
		}
		added = bm_cbt_bits_decode(buf, cbt->blocks, 0, cbt->npages,
					   c->bits.words);
		if (added == UINT64_MAX) {
			c->e.flags |= BM_CBT_DAMAGED;
			bm_warn("%s: the bitmap of checkpoint %s marks blocks "
				"past the end of the disk: not trusted",
				cbt->path, c->e.name);
		} else {
			c->bits.count = added;
		}
	}
	free(buf);
	return r;
}

static int
parse(struct bm_cbt *cbt, int fd, uint64_t disk_size, uint32_t granularity)
{
	struct bm_cbt_header h = { 0 };
	uint8_t fixed[BM_CBT_HEADER_FIXED], *buf = NULL;
	uint64_t bsize, want;
	struct stat sb;
	size_t hsize;
	int r;

	if (fstat(fd, &sb) < 0)
		return bm_error(-errno, "%s: %s", cbt->path, strerror(errno));
	r = read_full(fd, fixed, sizeof fixed, 0);
	if (r == 0)
		r = bm_cbt_header_peek(fixed, sizeof fixed, &hsize);
	else
		r = bm_error(r, "tracker header: %s", r == -EBADMSG
			     ? "truncated" : strerror(-r));
	if (r == 0 && !(buf = malloc(hsize)))
		r = bm_error(-ENOMEM, "out of memory");
	if (r == 0 && read_full(fd, buf, hsize, 0) < 0)
		r = bm_error(-EBADMSG, "tracker header: truncated");
	if (r == 0)
		r = bm_cbt_header_decode(buf, hsize, &h);
	free(buf);
	if (r < 0)
		return bm_error_prefix(r, "%s: ", cbt->path);
	if (h.disk_size != disk_size) {
		r = bm_error(-ESTALE, "%s: tracks a disk of %" PRIu64 " bytes, "
			     "not %" PRIu64, cbt->path, h.disk_size,
			     disk_size);
		goto out;
	}
	if (granularity && h.granularity != granularity) {
		r = bm_error(-ESTALE, "%s: has a granularity of %" PRIu32
			     " bytes, not %" PRIu32, cbt->path, h.granularity,
			     granularity);
		goto out;
	}
	bsize = bm_cbt_bitmap_size(h.disk_size, h.granularity);
	want = hsize + h.count * bsize;
	if ((uint64_t)sb.st_size != want) {
		r = bm_error(-EBADMSG, "%s: is %" PRIu64 " bytes, its header "
			     "says %" PRIu64, cbt->path,
			     (uint64_t)sb.st_size, want);
		goto out;
	}
	cbt->granularity = h.granularity;
	cbt->next_id = h.next_id;
	cbt->crashed = h.flags & BM_CBT_IN_USE;
	for (uint32_t i = 0; i < h.count; i++) {
		cbt->cp[i].e = h.cp[i];
		if (bm_bitmap_init(&cbt->cp[i].bits, disk_size,
				   h.granularity) < 0) {
			r = bm_error(-ENOMEM, "%s: out of memory", cbt->path);
			goto out;
		}
		cbt->count = i + 1;
	}
	cbt->bitmap_size = bsize;
	cbt->npages = bsize / BM_CBT_PAGE;
	cbt->blocks = bm_cbt_blocks(disk_size, h.granularity);
	r = read_bitmaps(cbt, fd, hsize);
out:
	free(h.cp);
	return r;
}

/* Read the file, or set up a new tracker if there is none. */
static int
load(struct bm_cbt *cbt, uint64_t disk_size, uint32_t granularity,
     bool create)
{
	int fd = open(cbt->path, O_RDONLY | O_CLOEXEC), r;

	if (fd >= 0) {
		r = parse(cbt, fd, disk_size, granularity);
		close(fd);
		return r;
	}
	r = -errno;
	if (r != -ENOENT || !create)
		return bm_error(r, "%s: %s", cbt->path, strerror(-r));
	cbt->granularity = granularity ? granularity
				       : BM_CBT_DEFAULT_GRANULARITY;
	cbt->next_id = 1;
	cbt->blocks = bm_cbt_blocks(disk_size, cbt->granularity);
	cbt->bitmap_size = bm_cbt_bitmap_size(disk_size, cbt->granularity);
	cbt->npages = cbt->bitmap_size / BM_CBT_PAGE;
	return 0;
}

/* ---- open and close -------------------------------------------------- */

static void
free_tracker(struct bm_cbt *cbt)
{
	bm_store_close(cbt->store);
	for (size_t i = 0; i < cbt->count; i++) {
		bm_bitmap_free(&cbt->cp[i].bits);
		bm_bitmap_free(&cbt->cp[i].fine);
	}
	bm_bitmap_free(&cbt->durable);
	bm_bitmap_free(&cbt->pending);
	bm_bitmap_free(&cbt->inflight);
	free(cbt->wbuf);
	free(cbt->errmsg);
	free(cbt->path);
	free(cbt->last);
	free(cbt->new_last);
	free(cbt);
}

/* The sets marking needs, once the geometry is known. */
static int
setup_marking(struct bm_cbt *cbt)
{
	if (bm_cbt_blocks(cbt->disk_size, cbt->granularity) >
	    (UINT64_C(1) << 33))
		return bm_error(-EINVAL, "%s: too many blocks", cbt->path);
	if (bm_bitmap_init(&cbt->durable, cbt->disk_size,
			   cbt->granularity) < 0 ||
	    bm_bitmap_init(&cbt->pending, cbt->npages, 1) < 0 ||
	    bm_bitmap_init(&cbt->inflight, cbt->npages, 1) < 0 ||
	    posix_memalign((void **)&cbt->wbuf, BM_CBT_PAGE,
			   cbt->bitmap_size)) {
		cbt->wbuf = NULL;
		return bm_error(-ENOMEM, "%s: out of memory", cbt->path);
	}
	return 0;
}

int
bm_cbt_open(struct bm_loop *loop, const char *path, uint64_t disk_size,
	    uint32_t granularity, bool create, struct bm_cbt **out)
{
	struct bm_cbt *cbt;
	int r;

	*out = NULL;
	if (!disk_size)
		return bm_error(-EINVAL, "%s: the disk size is 0", path);
	if (granularity && (!bm_is_power_of_2(granularity) ||
			    granularity < BM_CBT_MIN_GRANULARITY ||
			    granularity > BM_CBT_MAX_GRANULARITY))
		return bm_error(-EINVAL, "%s: the granularity %" PRIu32 " is "
				"not a power of two from 4 KiB to 64 MiB",
				path, granularity);
	cbt = calloc(1, sizeof *cbt);
	if (!cbt || !(cbt->path = strdup(path))) {
		free(cbt);
		return bm_error(-ENOMEM, "out of memory");
	}
	cbt->loop = loop;
	cbt->disk_size = disk_size;
	cbt->wtail = &cbt->waiters;
	r = load(cbt, disk_size, granularity, create);
	if (r == 0)
		r = setup_marking(cbt);
	if (r < 0)
		goto fail;
	/* In use from now on: a crash shows at the next open. */
	r = write_current(cbt, true);
	if (r < 0)
		goto fail;
	bm_cbt_rewritten(cbt, NULL);
	if (cbt->err) {
		r = broken(cbt);
		goto fail;
	}
	if (cbt->crashed)
		bm_info("%s: the previous tracker did not close; its marks "
			"were written ahead and stay valid", path);
	cbt->carried_unknown = cbt->crashed;
	*out = cbt;
	return 0;
fail:
	free_tracker(cbt);
	return r;
}

int
bm_cbt_open_image(struct bm_loop *loop, struct bm_image *image,
		  uint64_t disk_size, uint32_t granularity,
		  struct bm_cbt **out)
{
	struct bm_store *s = NULL;
	struct bm_cbt *cbt;
	bool loaded;
	int r;

	*out = NULL;
	cbt = calloc(1, sizeof *cbt);
	if (!cbt || !(cbt->path = strdup(image->name))) {
		free(cbt);
		return bm_error(-ENOMEM, "out of memory");
	}
	cbt->loop = loop;
	cbt->image = image;
	cbt->disk_size = disk_size;
	cbt->wtail = &cbt->waiters;
	r = bm_cbt_image_load(cbt, granularity);
	loaded = r >= 0;
	if (r >= 0) {
		int r2 = setup_marking(cbt);

		r = r2 < 0 ? r2 : r;
	}
	if (r == 1 && (r = write_current(cbt, true)) == 0)
		bm_cbt_rewritten(cbt, NULL);
	if (r < 0)
		goto fail;
	/* The tracker's own handle: marks are written beside the driver's
	 * I/O, into clusters only the tracker writes. */
	r = bm_file_open(loop, image->name, BM_OPEN_WRITE, 0, &s);
	if (r == 0) {
		s->growable = true; /* commits allocate past its end */
		r = bm_store_wrap(image->name, &s);
	}
	if (r < 0) {
		bm_store_close(s);
		goto fail;
	}
	cbt->store = s;
	bm_bitmap_clear_all(&cbt->durable);
	if (cbt->count)
		bm_cbt_or_into(&cbt->durable, &newest(cbt)->bits);
	*out = cbt;
	return 0;
fail:
	if (loaded) {
		/* Keep the first error's message. */
		char *msg = strdup(blockmirror_last_error());

		bm_cbt_image_release(cbt);
		bm_error(r, "%s", msg ? msg : "");
		free(msg);
	}
	free_tracker(cbt);
	return r;
}

bool
bm_cbt_in_image(const struct bm_cbt *cbt)
{
	return cbt->image != NULL;
}

const char *
bm_cbt_path(const struct bm_cbt *cbt)
{
	return cbt->path;
}

/* Lost checkpoints are flagged in memory: say so in the image too (as
 * in_use), and write Bn exact if it carried blocks; then stop keeping
 * its bitmaps. */
static int
close_image(struct bm_cbt *cbt)
{
	bool lost = false;
	int r = 0, r2;

	for (size_t i = 0; i < cbt->count; i++)
		lost |= (cbt->cp[i].e.flags & BM_CBT_LOST) != 0;
	/* Carried blocks go too: the image's Bn is exact once closed. */
	if ((lost || cbt->carrying) && !cbt->image_gone)
		r = write_current(cbt, false);
	r2 = bm_cbt_image_release(cbt);
	return r < 0 ? r : r2;
}

int
bm_cbt_close(struct bm_cbt *cbt)
{
	int r, r2;

	if (!cbt)
		return 0;
	r = bm_cbt_flush(cbt);
	if (cbt->image) {
		r2 = close_image(cbt);
		free_tracker(cbt);
		return r < 0 ? r : r2;
	}
	/* Lost checkpoints are flagged in memory: say so on disk too. */
	r2 = write_current(cbt, false);
	free_tracker(cbt);
	return r < 0 ? r : r2;
}

/* ---- state ----------------------------------------------------------- */

bool
bm_cbt_crashed(const struct bm_cbt *cbt)
{
	return cbt->crashed;
}

bool
bm_cbt_trusted(const struct bm_cbt *cbt)
{
	return cbt->err == 0;
}

uint32_t
bm_cbt_granularity(const struct bm_cbt *cbt)
{
	return cbt->granularity;
}

void
bm_cbt_set_loop(struct bm_cbt *cbt, struct bm_loop *loop)
{
	cbt->loop = loop;
	if (cbt->store)
		cbt->store->loop = loop;
}
