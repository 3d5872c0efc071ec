/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * blockmirror_verify: compare two images' guest data by XXH3-128 digests
 * of CHUNK-byte chunks.
 *
 * SLOTS chunks are in flight at once; chunk i lives in slot i % SLOTS and
 * results are consumed strictly in chunk order, so the whole-image digest
 * (the digest of the chunk digests) is deterministic and the first
 * difference found is the first in the image.  A chunk whose digests
 * differ is compared byte by byte to report the exact offset.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "errors.h"
#include "hash.h"
#include "image.h"
#include "internal.h"
#include "loop.h"

#define CHUNK (UINT64_C(1) << 20)
#define SLOTS 8
#define PROGRESS_EVERY 64 /* chunks */

struct verify;

struct verify_slot {
	struct verify *v;
	struct bm_io io[2];
	void *buf[2];
	uint64_t chunk;
	unsigned pending; /* reads outstanding */
	bool busy;
	bool ready;
};

struct verify {
	struct bm_image *img[2];
	struct bm_loop *loop;
	struct verify_slot slots[SLOTS];
	struct bm_hash_stream *stream[2];
	uint64_t size;        /* bytes compared: the smaller size */
	uint64_t nchunks;
	uint64_t next_issue;
	uint64_t next_consume;
	unsigned inflight;
	int err;
	bool differ;
	uint64_t first_difference;
	bool done;
	blockmirror_progress_fn progress;
	void *progress_data;
};

static void issue(struct verify *v);

static void
consume(struct verify *v)
{
	while (v->next_consume < v->nchunks) {
		struct verify_slot *s = &v->slots[v->next_consume % SLOTS];
		struct bm_digest d[2];
		size_t len;

		if (!s->busy || !s->ready || s->chunk != v->next_consume)
			break;
		len = (size_t)s->io[0].length;
		for (int i = 0; i < 2; i++) {
			bm_hash_buffer(s->buf[i], len, &d[i]);
			bm_hash_stream_add(v->stream[i], d[i].bytes,
					   sizeof d[i].bytes);
		}
		if (!v->differ && memcmp(&d[0], &d[1], sizeof d[0]) != 0) {
			const unsigned char *a = s->buf[0], *b = s->buf[1];
			size_t i = 0;

			while (i < len && a[i] == b[i])
				i++;
			v->differ = true;
			v->first_difference = s->io[0].offset + i;
		}
		s->busy = s->ready = false;
		v->next_consume++;
		if (v->progress && v->next_consume % PROGRESS_EVERY == 0)
			v->progress(v->progress_data,
				    BM_MIN(v->next_consume * CHUNK, v->size),
				    v->size);
	}
}

static void
read_done(struct bm_io *io, int err)
{
	struct verify_slot *s = io->opaque;
	struct verify *v = s->v;

	v->inflight--;
	if (err < 0 && !v->err)
		v->err = err;
	if (--s->pending == 0)
		s->ready = true;
	if (!v->err) {
		consume(v);
		issue(v);
	}
	if (v->inflight == 0 && (v->err || v->next_consume == v->nchunks))
		v->done = true;
}

static void
issue(struct verify *v)
{
	while (!v->err && v->next_issue < v->nchunks) {
		struct verify_slot *s = &v->slots[v->next_issue % SLOTS];
		uint64_t off = v->next_issue * CHUNK;

		if (s->busy)
			return;
		s->busy = true;
		s->ready = false;
		s->chunk = v->next_issue++;
		s->pending = 2;
		for (int i = 0; i < 2; i++) {
			struct bm_io *io = &s->io[i];

			io->offset = off;
			io->length = BM_MIN(CHUNK, v->size - off);
			io->buf = s->buf[i];
			io->flags = 0;
			io->done = read_done;
			io->opaque = s;
			v->inflight++;
			bm_image_read(v->img[i], io);
		}
	}
}

BM_EXPORT int
blockmirror_verify(const char *a, enum blockmirror_format format_a,
		   const char *b, enum blockmirror_format format_b,
		   blockmirror_progress_fn progress, void *progress_data,
		   struct blockmirror_verify_result *result)
{
	struct verify v = { 0 };
	struct bm_digest d;
	int r;

	bm_error_clear();
	if (!a || !b ||
	    !BM_SIZE_COVERS(result, struct blockmirror_verify_result,
			    digest_b)) {
		r = bm_error(-EINVAL, "bad arguments");
		goto out;
	}
	r = bm_loop_new(64, &v.loop);
	if (r < 0)
		goto out;
	r = bm_image_open(v.loop, a, format_a, 0, &v.img[0]);
	if (r < 0)
		goto out;
	r = bm_image_open(v.loop, b, format_b, 0, &v.img[1]);
	if (r < 0)
		goto out;
	for (int i = 0; i < 2; i++) {
		v.stream[i] = bm_hash_stream_new();
		if (!v.stream[i]) {
			r = bm_error(-ENOMEM, "out of memory");
			goto out;
		}
	}
	for (int s = 0; s < SLOTS; s++) {
		v.slots[s].v = &v;
		for (int i = 0; i < 2; i++)
			if (posix_memalign(&v.slots[s].buf[i], 4096, CHUNK)) {
				r = bm_error(-ENOMEM, "out of memory");
				goto out;
			}
	}
	v.size = BM_MIN(v.img[0]->size, v.img[1]->size);
	v.nchunks = (v.size + CHUNK - 1) / CHUNK;
	v.progress = progress;
	v.progress_data = progress_data;
	if (v.nchunks) {
		issue(&v);
		r = bm_loop_run_until(v.loop, &v.done);
		if (r == 0)
			r = v.err;
		if (r < 0)
			goto out;
	}
	result->size_differs = v.img[0]->size != v.img[1]->size;
	result->identical = !v.differ && !result->size_differs;
	result->first_difference = v.differ ? v.first_difference
			       : result->size_differs ? v.size : 0;
	result->bytes_compared = v.size;
	bm_hash_stream_end(v.stream[0], &d);
	memcpy(result->digest_a, d.bytes, sizeof d.bytes);
	bm_hash_stream_end(v.stream[1], &d);
	memcpy(result->digest_b, d.bytes, sizeof d.bytes);
	if (progress)
		progress(progress_data, v.size, v.size);
out:
	for (int s = 0; s < SLOTS; s++)
		for (int i = 0; i < 2; i++)
			free(v.slots[s].buf[i]);
	for (int i = 0; i < 2; i++) {
		bm_hash_stream_free(v.stream[i]);
		bm_image_close(v.img[i]);
	}
	bm_loop_free(v.loop);
	return r < 0 ? bm_api_fail("blockmirror_verify", r) : 0;
}
