/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The offline operations of the public API: image info, create, copy.
 * Each runs a private event loop on the calling thread.  The copy itself
 * is offline-copy.c's; blockmirror_copy() opens, runs and closes it here,
 * and the copy handle (copy-job.c) runs the same copy on a thread of its
 * own.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "durable.h"
#include "errors.h"
#include "image.h"
#include "internal.h"
#include "loop.h"
#include "nbd.h"
#include "offline-copy.h"

/* ---- info ------------------------------------------------------------ */

BM_EXPORT int
blockmirror_image_info(const char *name, enum blockmirror_format format,
		       struct blockmirror_image_info *info)
{
	struct bm_loop *loop = NULL;
	struct bm_image *img = NULL;
	int r;

	bm_error_clear();
	if (!name || !BM_SIZE_COVERS(info, struct blockmirror_image_info,
				     block_device)) {
		r = bm_error(-EINVAL, "bad arguments");
		goto out;
	}
	r = bm_loop_new(8, &loop);
	if (r < 0)
		goto out;
	r = bm_image_open(loop, name, format, 0, &img);
	if (r < 0)
		goto out;
	info->format = img->format;
	info->virtual_size = img->size;
	info->allocated_bytes = img->store->allocated;
	info->cluster_size = img->cluster_size;
	info->block_device = img->store->block_device;
	if (BM_SIZE_COVERS(info, struct blockmirror_image_info, identity)) {
		struct bm_image_facts facts;

		bm_image_facts(img, &facts);
		info->data_bytes = img->format == BLOCKMIRROR_FORMAT_RAW ?
				   info->allocated_bytes :
				   bm_image_data_bytes(img);
		snprintf(info->backing_file, sizeof info->backing_file, "%s",
			 facts.backing_name ? facts.backing_name : "");
		snprintf(info->backing_path, sizeof info->backing_path, "%s",
			 facts.backing_path ? facts.backing_path : "");
		info->backing_format = facts.backing_path ?
				       facts.backing_format :
				       BLOCKMIRROR_FORMAT_AUTO;
		info->has_identity = facts.has_identity;
		memcpy(info->identity, facts.identity, 16);
	}
out:
	bm_image_close(img);
	bm_loop_free(loop);
	return r < 0 ? bm_api_fail("blockmirror_image_info", r) : 0;
}

/* ---- create ---------------------------------------------------------- */

BM_EXPORT int
blockmirror_image_create(const char *name, enum blockmirror_format format,
			 uint64_t virtual_size, const char *options,
			 bool overwrite)
{
	struct bm_loop *loop = NULL;
	struct bm_image *img = NULL;
	struct bm_io io = { 0 };
	int r;

	bm_error_clear();
	if (!name) {
		r = bm_error(-EINVAL, "no image name");
		goto out;
	}
	r = bm_loop_new(8, &loop);
	if (r < 0)
		goto out;
	r = bm_image_create(loop, name, format, virtual_size, options,
			    overwrite, 0, &img);
	if (r < 0)
		goto out;
	r = bm_image_sync(img, bm_image_flush, &io);
	if (r == 0 && !bm_nbd_is_uri(name))
		r = bm_durable_sync_parent(name);
out:
	bm_image_close(img);
	bm_loop_free(loop);
	return r < 0 ? bm_api_fail("blockmirror_image_create", r) : 0;
}

/* ---- copy ------------------------------------------------------------ */

BM_EXPORT int
blockmirror_copy(const char *src, const char *dst,
		 const struct blockmirror_copy_options *options,
		 struct blockmirror_copy_stats *stats)
{
	struct bm_offline_copy oc = { 0 };
	int r;

	bm_error_clear();
	if (stats && !BM_SIZE_COVERS(stats, struct blockmirror_copy_stats,
				     elapsed_us)) {
		r = bm_error(-EINVAL, "stats: bad size");
		goto out;
	}
	r = bm_offline_copy_open(&oc, src, dst, options);
	if (r == 0)
		r = bm_offline_copy_run(&oc);
	if (r == 0 && stats)
		bm_offline_copy_stats(&oc, BLOCKMIRROR_COPY_DONE, 0, stats);
out:
	bm_offline_copy_close(&oc, r);
	return r < 0 ? bm_api_fail("blockmirror_copy", r) : 0;
}
