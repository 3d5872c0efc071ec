/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Live changes to a disk's backing chain (docs/chains.md).
 *
 * Moving the base image under a running overlay: the caller copies the
 * base (it is read-only while the overlay is in use, so a plain copy and
 * a verify do), then blockmirror_disk_set_backing makes the overlay name
 * the copy.  That is the pivot of a base move, and the only step that
 * changes anything the guest depends on:
 *
 *   - the new backing image is opened read-only on a private loop and
 *     handed to the disk's loop;
 *   - the image engine orders the change like a flush (every earlier
 *     request completed), flushes the overlay, and has the driver
 *     record the new name crash-safely (qcow2: the name is written
 *     beside the old one, then one sector flips the header to it);
 *   - reads go to the new backing image from then on; the old one stays
 *     open until the overlay closes, for reads mapped before the change.
 *
 * Before any of that, the name is checked as the overlay's next open
 * will check it (the backing file policy, image.h): a name it would
 * refuse, such as an NBD URI, would leave an overlay that cannot be
 * opened again, so it is refused up front.
 *
 * Invariant: the old and the new backing image read the same.  Then a
 * crash at any moment leaves an overlay that names one of them and reads
 * right, and the guest never sees the switch, so it need not stop.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "disk.h"
#include "errors.h"
#include "image.h"
#include "internal.h"
#include "nbd.h"
#include "waiter.h"

struct set_backing_call {
	struct bm_backing_change bc;
	struct bm_call *call;
};

static void
set_backing_done(struct bm_io *io, int err)
{
	struct set_backing_call *s =
		bm_container_of(io, struct set_backing_call, bc.io);

	/* On failure the new image is still ours; close it here, on the
	 * loop it now belongs to (it is idle). */
	bm_image_close(s->bc.backing);
	s->bc.backing = NULL;
	bm_waiter_signal(&s->call->w, err);
}

static void
call_set_backing(struct bm_call *call)
{
	struct blockmirror_disk *disk = call->arg;
	struct set_backing_call *s = call->arg2;
	int r = 0;

	if (disk->job)
		r = bm_error(-EBUSY, "the disk has a running job");
	else if (!bm_image_backing(bm_disk_base(disk)))
		r = bm_error(-EINVAL, "%s: has no backing file",
			     bm_disk_base(disk)->name);
	if (r < 0) {
		bm_waiter_signal(&call->w, r);
		return;
	}
	bm_image_set_loop(s->bc.backing, disk->loop);
	s->call = call;
	s->bc.io.done = set_backing_done;
	bm_image_set_backing(bm_disk_base(disk), &s->bc);
}

/*
 * Would the overlay open again over `backing`?  An image's backing file
 * must be a local file that the backing file policy (image.h,
 * bm_backing_check) lets its next open use, and the name recorded must
 * lead from the overlay's directory to the file opened here.  Checked
 * before anything is opened or changed.
 */
static int
check_name(struct blockmirror_disk *disk, const char *backing)
{
	char *image, *real = NULL, *here;
	int r;

	if (bm_nbd_is_uri(backing) || strstr(backing, "://"))
		return bm_error(-ENOTSUP, "%s: an NBD export cannot be a "
				"backing file: the overlay could not be opened "
				"again (copy the base to a local file)",
				backing);
	image = blockmirror_disk_get_image(disk);
	if (!image)
		return -errno;
	if (bm_nbd_is_uri(image)) {
		/* Raw by definition: refused below as having no backing. */
		free(image);
		return 0;
	}
	r = bm_backing_check(image, backing, &real);
	if (r < 0) {
		free(image);
		return bm_error_prefix(r, "the overlay would not open again "
				       "over it: ");
	}
	here = realpath(backing, NULL);
	if (!here || strcmp(here, real) != 0)
		r = bm_error(-EINVAL, "%s: recorded in %s, the name would lead "
			     "to %s, not to %s (give an absolute path)",
			     backing, image, real, here ? here : backing);
	free(here);
	free(real);
	free(image);
	return r;
}

BM_EXPORT int
blockmirror_disk_set_backing(struct blockmirror_disk *disk,
			     const char *backing,
			     enum blockmirror_format format)
{
	struct set_backing_call s = { 0 };
	struct bm_call call = { .fn = call_set_backing };
	struct bm_loop *tmp = NULL;
	int r;

	bm_error_clear();
	if (!disk || !backing || !*backing)
		return bm_api_fail("blockmirror_disk_set_backing",
				   bm_error(-EINVAL, "bad arguments"));
	r = check_name(disk, backing);
	if (r < 0)
		return bm_api_fail("blockmirror_disk_set_backing", r);
	r = bm_loop_new(8, &tmp);
	if (r == 0)
		r = bm_image_open(tmp, backing, format,
				  disk->open_flags & ~BM_IMAGE_WRITE,
				  &s.bc.backing);
	if (r == 0) {
		s.bc.name = backing;
		call.arg = disk;
		call.arg2 = &s;
		r = bm_disk_call(disk, &call);
		/* Refused before the loop took it: still on `tmp`. */
		bm_image_close(s.bc.backing);
	}
	bm_loop_free(tmp);
	return r < 0 ? bm_api_fail("blockmirror_disk_set_backing", r) : 0;
}
