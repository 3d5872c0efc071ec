/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Change tracking of a disk (the public half; the record itself is
 * cbt.c, its file docs/cbt.md).
 *
 * The record's place: an explicit sidecar; else, for a writable qcow2
 * image, the image's own persistent bitmaps (cbt-image.c); else the
 * sidecar IMAGE.bmirror-cbt.  blockmirror_disk_track opens a sidecar on
 * a private loop and hands it to the disk's loop; a record in the image
 * is opened on the disk's loop itself (its structural changes run the
 * image's request queue).  Either happens with the disk quiesced and
 * drained, so every write
 * either completed before or is marked; from then on bm_disk_submit
 * marks every guest write, write-zeroes and discard before it reaches
 * the top of the disk's stack, whatever filters stand there (a move's, a
 * snapshot's), so the record holds what any writer changed.  Writes the
 * disk served before tracking are in no bitmap: if there were any
 * (disk->writes_seen), a sidecar that holds checkpoints already is
 * refused, since they would miss them.
 *
 * Tracking on, checkpoints created or removed and snapshots taken or
 * released are the disk's control call, one at a time: the others wait
 * in its FIFO (bm_disk_control_begin) rather than fail.
 *
 * Creating or removing a checkpoint changes which bitmap takes marks: it
 * happens with the disk quiesced and nothing in flight, so no write is
 * counted on the wrong side of it, and so no write-back is in flight and
 * the tracker's synchronous rewrite never has to turn the loop.  A
 * snapshot that creates a checkpoint does it in the same quiesced moment
 * as its own instant (snapshot.c calls bm_checkpoint_at_instant).
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cbt.h"
#include "checkpoint.h"
#include "disk.h"
#include "errors.h"
#include "format.h"
#include "internal.h"
#include "nbd.h"

/* ---- turning tracking on -------------------------------------------- */

/* The control call ends: the next one may start. */
static void
control_done(struct blockmirror_disk *disk, struct bm_call *call, int r)
{
	bm_disk_control_end(disk);
	bm_waiter_signal(&call->w, r);
}

/*
 * Nothing in flight: every write so far completed unmarked, every later
 * one is marked.  Checkpoints already in the sidecar would miss the
 * unmarked ones, if the disk served any since it was opened.
 */
static void
track_drained(struct blockmirror_disk *disk)
{
	struct bm_call *call = disk->control_call;
	struct bm_cbt *cbt = call->arg2;
	int r = 0;

	/* In the image: opened here, as it runs the image's queue. */
	if (!cbt) {
		r = bm_cbt_open_image(disk->loop, bm_disk_base(disk),
				      bm_disk_base(disk)->size,
				      (uint32_t)call->u64, &cbt);
		if (r < 0) {
			bm_disk_unquiesce(disk);
			control_done(disk, call, r);
			return;
		}
	}
	if (disk->writes_seen && bm_cbt_count(cbt))
		r = bm_error(-ESTALE, "%s: the disk has served %" PRIu64
			     " writes since it was opened, which the %s's "
			     "%zu checkpoints miss; start tracking before the "
			     "first write (or remove %s, and with it the "
			     "checkpoints)", bm_disk_base(disk)->name,
			     disk->writes_seen, bm_cbt_in_image(cbt) ? "image"
			     : "sidecar", bm_cbt_count(cbt),
			     bm_cbt_in_image(cbt) ? "its bitmaps (qemu-img "
			     "bitmap --remove)" : "the sidecar");
	else if (disk->cbt)
		r = bm_error(-EBUSY, "the disk is tracking changes already");
	if (r == 0) {
		bm_cbt_set_loop(cbt, disk->loop);
		disk->cbt = cbt;
		disk->cbt_failed = false;
	} else if (!call->arg2) {
		bm_cbt_close(cbt);
	}
	bm_disk_unquiesce(disk);
	control_done(disk, call, r);
}

/* Would the record go into the image?  A writable qcow2 one whose
 * clusters hold whole 4 KiB pages of a bitmap (cbt-image.c). */
static void
call_in_image(struct bm_call *call)
{
	struct bm_image *base = bm_disk_base(call->arg);

	call->u64 = bm_image_has_driver(base, &bm_qcow2_driver) &&
		    !base->readonly && base->cluster_size >= BM_CBT_PAGE;
	bm_waiter_signal(&call->w, 0);
}

static void
call_track(struct bm_call *call)
{
	struct blockmirror_disk *disk = call->arg;
	int r;

	if (!bm_disk_control_begin(disk, call))
		return; /* its turn comes, or the disk closes */
	r = bm_disk_quiesce(disk, track_drained);
	if (r < 0)
		control_done(disk, call, r);
}

BM_EXPORT int
blockmirror_disk_track(struct blockmirror_disk *disk, const char *sidecar,
		       uint32_t granularity, bool *crashed)
{
	struct bm_call call = { .fn = call_track, .arg = disk };
	struct bm_loop *tmp = NULL;
	struct bm_cbt *cbt = NULL;
	char *image = NULL, *path = NULL;
	int r;

	bm_error_clear();
	if (!disk)
		return bm_api_fail("blockmirror_disk_track",
				   bm_error(-EINVAL, "no disk"));
	{
		/* Before opening: opening rewrites the file, which would
		 * cut a running tracker off from it. */
		struct blockmirror_checkpoint *l;
		size_t n;

		if (blockmirror_checkpoint_list(disk, &l, &n) == 0) {
			free(l);
			return bm_api_fail("blockmirror_disk_track",
					   bm_error(-EBUSY, "the disk is "
						    "tracking changes already"));
		}
		bm_error_clear();
	}
	if (!sidecar) {
		struct bm_call where = { .fn = call_in_image, .arg = disk };

		r = bm_disk_call(disk, &where);
		if (r < 0)
			return bm_api_fail("blockmirror_disk_track", r);
		if (where.u64) {
			call.u64 = granularity;
			if (crashed)
				*crashed = false;
			r = bm_disk_call(disk, &call);
			return r < 0 ? bm_api_fail("blockmirror_disk_track", r)
				     : 0;
		}
		image = blockmirror_disk_get_image(disk);
		if (!image)
			return bm_api_fail("blockmirror_disk_track", -errno);
		if (bm_nbd_is_uri(image)) {
			r = bm_error(-EINVAL, "%s: an NBD image needs a sidecar "
				     "path for its change tracking", image);
			goto out;
		}
		if (asprintf(&path, "%s.bmirror-cbt", image) < 0) {
			path = NULL;
			r = bm_error(-ENOMEM, "out of memory");
			goto out;
		}
		sidecar = path;
	}
	r = bm_loop_new(8, &tmp);
	if (r == 0)
		r = bm_cbt_open(tmp, sidecar, blockmirror_disk_get_size(disk),
				granularity, true, &cbt);
	if (r < 0)
		goto out;
	if (crashed)
		*crashed = bm_cbt_crashed(cbt);
	call.arg2 = cbt;
	r = bm_disk_call(disk, &call);
	if (r < 0) {
		bm_cbt_set_loop(cbt, tmp);
		bm_cbt_close(cbt);
	}
out:
	bm_loop_free(tmp);
	free(image);
	free(path);
	return r < 0 ? bm_api_fail("blockmirror_disk_track", r) : 0;
}

static void
call_record(struct bm_call *call)
{
	struct blockmirror_disk *disk = call->arg;
	char *path;

	if (!disk->cbt) {
		bm_waiter_signal(&call->w, bm_error(-EINVAL, "the disk does "
				 "not track changes (blockmirror_disk_track)"));
		return;
	}
	path = strdup(bm_cbt_path(disk->cbt));
	call->arg2 = path;
	call->u64 = bm_cbt_in_image(disk->cbt);
	bm_waiter_signal(&call->w, path ? 0 : bm_error(-ENOMEM, "out of "
						       "memory"));
}

BM_EXPORT int
blockmirror_disk_track_record(struct blockmirror_disk *disk, char **path,
			      bool *in_image)
{
	struct bm_call call = { .fn = call_record, .arg = disk };
	int r;

	bm_error_clear();
	if (!disk || !path || !in_image)
		return bm_api_fail("blockmirror_disk_track_record",
				   bm_error(-EINVAL, "bad arguments"));
	r = bm_disk_call(disk, &call);
	if (r < 0)
		return bm_api_fail("blockmirror_disk_track_record", r);
	*path = call.arg2;
	*in_image = call.u64 != 0;
	return 0;
}

/* ---- checkpoints ----------------------------------------------------- */

struct cp_call {
	const char *name;
	bool remove;
	int result;
};

static void
cp_drained(struct blockmirror_disk *disk)
{
	struct bm_call *call = disk->control_call;
	struct cp_call *c = call->arg2;

	c->result = c->remove ? bm_cbt_remove(disk->cbt, c->name)
			      : bm_cbt_create(disk->cbt, c->name);
	if (c->result == 0)
		disk->cbt_failed = false; /* a rewrite mends the tracker */
	bm_disk_unquiesce(disk);
	control_done(disk, call, c->result);
}

static void
call_checkpoint(struct bm_call *call)
{
	struct blockmirror_disk *disk = call->arg;
	int r;

	if (!bm_disk_control_begin(disk, call))
		return; /* its turn comes, or the disk closes */
	if (!disk->cbt) {
		control_done(disk, call, bm_error(-EINVAL, "the disk does not "
				 "track changes (blockmirror_disk_track)"));
		return;
	}
	r = bm_disk_quiesce(disk, cp_drained);
	if (r < 0)
		control_done(disk, call, r);
}

static int
checkpoint_op(struct blockmirror_disk *disk, const char *name, bool remove,
	      const char *fn)
{
	struct cp_call c = { .name = name, .remove = remove };
	struct bm_call call = { .fn = call_checkpoint, .arg = disk,
				.arg2 = &c };
	int r;

	bm_error_clear();
	if (!disk || !name)
		return bm_api_fail(fn, bm_error(-EINVAL, "bad arguments"));
	if (!bm_cbt_name_ok(name))
		return bm_api_fail(fn, bm_error(-EINVAL, "bad checkpoint name "
				   "\"%.80s\": a name is 1 to 64 of A-Z a-z "
				   "0-9 . _ -", name));
	r = bm_disk_call(disk, &call);
	return r < 0 ? bm_api_fail(fn, r) : 0;
}

BM_EXPORT int
blockmirror_checkpoint_create(struct blockmirror_disk *disk, const char *name)
{
	return checkpoint_op(disk, name, false,
			     "blockmirror_checkpoint_create");
}

BM_EXPORT int
blockmirror_checkpoint_remove(struct blockmirror_disk *disk, const char *name)
{
	return checkpoint_op(disk, name, true,
			     "blockmirror_checkpoint_remove");
}

static void
call_list(struct bm_call *call)
{
	struct blockmirror_disk *disk = call->arg;
	struct blockmirror_checkpoint *v;
	size_t n;

	if (!disk->cbt) {
		bm_waiter_signal(&call->w, bm_error(-EINVAL, "the disk does "
				 "not track changes (blockmirror_disk_track)"));
		return;
	}
	n = bm_cbt_count(disk->cbt);
	v = calloc(n ? n : 1, sizeof *v);
	if (!v) {
		bm_waiter_signal(&call->w, bm_error(-ENOMEM, "out of memory"));
		return;
	}
	for (size_t i = 0; i < n; i++) {
		struct bm_cbt_info info;

		bm_cbt_get(disk->cbt, i, &info);
		snprintf(v[i].name, sizeof v[i].name, "%s", info.name);
		v[i].id = info.id;
		v[i].created = (int64_t)info.created;
		v[i].changed_bytes = info.blocks *
				     bm_cbt_granularity(disk->cbt);
		v[i].trusted = !info.untrusted && bm_cbt_trusted(disk->cbt);
		snprintf(v[i].reason, sizeof v[i].reason, "%s",
			 info.untrusted ? info.untrusted
			 : v[i].trusted ? "" : "change tracking failed");
	}
	call->arg2 = v;
	call->u64 = n;
	bm_waiter_signal(&call->w, 0);
}

BM_EXPORT int
blockmirror_checkpoint_list(struct blockmirror_disk *disk,
			    struct blockmirror_checkpoint **list, size_t *n)
{
	struct bm_call call = { .fn = call_list, .arg = disk };
	int r;

	bm_error_clear();
	if (!disk || !list || !n)
		return bm_api_fail("blockmirror_checkpoint_list",
				   bm_error(-EINVAL, "bad arguments"));
	r = bm_disk_call(disk, &call);
	if (r < 0)
		return bm_api_fail("blockmirror_checkpoint_list", r);
	*list = call.arg2;
	*n = call.u64;
	return 0;
}

/* ---- at a snapshot's instant ----------------------------------------- */

int
bm_checkpoint_at_instant(struct blockmirror_disk *disk, const char *since,
			 const char *create, uint64_t g,
			 struct bm_bitmap *changed, uint64_t *bytes)
{
	int r;

	if (!disk->cbt)
		return bm_error(-EINVAL, "the disk does not track changes "
				"(blockmirror_disk_track)");
	if (since) {
		r = g && g == bm_cbt_fine_granularity(disk->cbt)
			? bm_cbt_changed_since_fine(disk->cbt, since, changed,
						    bytes)
			: bm_cbt_changed_since(disk->cbt, since, changed,
					       bytes);
		if (r < 0)
			return r;
	}
	if (create) {
		r = bm_cbt_create(disk->cbt, create);
		if (r < 0) {
			bm_bitmap_free(changed);
			return r;
		}
		disk->cbt_failed = false;
	}
	return 0;
}

struct changed_args {
	const char *since;
	struct bm_bitmap *out;
};

static void
call_changed(struct bm_call *call)
{
	struct blockmirror_disk *disk = call->arg;
	struct changed_args *a = call->arg2;

	if (!disk->cbt) {
		bm_waiter_signal(&call->w, bm_error(-EINVAL, "the disk does "
						    "not track changes"));
		return;
	}
	bm_waiter_signal(&call->w, bm_cbt_changed_since(disk->cbt, a->since,
							a->out, &call->u64));
}

int
bm_checkpoint_changed(struct blockmirror_disk *disk, const char *since,
		      struct bm_bitmap *changed, uint64_t *bytes)
{
	struct changed_args a = { since, changed };
	struct bm_call call = { .fn = call_changed, .arg = disk, .arg2 = &a };
	int r = bm_disk_call(disk, &call);

	*bytes = call.u64;
	return r;
}

/* A control call: never between a checkpoint's steps. */
static void
call_keep_fine(struct bm_call *call)
{
	struct blockmirror_disk *disk = call->arg;

	if (!bm_disk_control_begin(disk, call))
		return; /* its turn comes, or the disk closes */
	control_done(disk, call, disk->cbt ?
		     bm_cbt_keep_fine(disk->cbt, (uint32_t)call->u64) :
		     bm_error(-EINVAL, "the disk does not track changes"));
}

int
bm_checkpoint_keep_fine(struct blockmirror_disk *disk, uint64_t granularity)
{
	struct bm_call call = { .fn = call_keep_fine, .arg = disk,
				.u64 = granularity };

	return bm_disk_call(disk, &call);
}

static void
call_granularity(struct bm_call *call)
{
	struct blockmirror_disk *disk = call->arg;

	call->u64 = disk->cbt ? bm_cbt_granularity(disk->cbt) : 0;
	bm_waiter_signal(&call->w, 0);
}

uint64_t
bm_checkpoint_granularity(struct blockmirror_disk *disk)
{
	struct bm_call call = { .fn = call_granularity, .arg = disk };

	return bm_disk_call(disk, &call) == 0 ? call.u64 : 0;
}
