/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * What crosses from the primary to the replica (replicate-int.h): a
 * cycle's data, written into the replica's staging export over NBD
 * (all-zero ranges as write-zeroes): the blocks the change record says
 * were written, every data extent for a first copy onto zeroes, or,
 * without a record to trust, the granules whose XXH3-64 differs from the
 * replica's (only digests come back).  The online verify compares
 * digests the same way, without sending.
 *
 * SLOTS slots, each a buffer: a slot reads its range of the snapshot
 * (aio: the completion, on the disk's loop, only marks it ready), then
 * the sender thread writes it to the replica and the slot is free again
 * once that write ends.  The sender thread does all submitting; the
 * completions only change slot state under s->lock and broadcast.
 */
#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <xxhash.h>

#include "disk.h"
#include "errors.h"
#include "extent.h"
#include "internal.h"
#include "repl-channel.h"
#include "replicate-int.h"
#include "snapshot.h"

/* Drop what is read only once this far behind: a drop is a call on
 * the disk's loop, and a chunk read but not yet dropped costs the guest
 * at most one copy-before-write of it. */
#define DROP_STEP (4 * BM_MiB)

/* Under s->lock: the first error is the sender's. */
static void
set_error(struct bm_repl_sender *s, int err, const char *m)
{
	if (err < 0 && !s->err) {
		s->err = err;
		snprintf(s->msg, sizeof s->msg, "%s", m ? m : strerror(-err));
	}
}

/* A write ended (the target's loop thread), or a slot is given back. */
static void
slot_done(void *user_data, int err)
{
	struct bm_repl_slot *sl = user_data;
	struct bm_repl_sender *s = sl->s;
	const char *m = err < 0 ? blockmirror_last_error() : NULL;

	pthread_mutex_lock(&s->lock);
	set_error(s, err, m);
	sl->busy = false;
	s->busy--;
	pthread_cond_broadcast(&s->cond);
	pthread_mutex_unlock(&s->lock);
}

/* A snapshot read ended (the disk's loop thread): the sender thread
 * writes the slot out. */
static void
read_done(void *user_data, int err)
{
	struct bm_repl_slot *sl = user_data;
	struct bm_repl_sender *s = sl->s;

	pthread_mutex_lock(&s->lock);
	sl->rerr = err;
	sl->reading = false;
	sl->ready = true;
	pthread_cond_broadcast(&s->cond);
	pthread_mutex_unlock(&s->lock);
}

/* Write `len` bytes of `sl`'s buffer at `off`: zeroes as such.  A
 * failure to submit ends the slot with the error. */
static void
slot_write(struct bm_repl_sender *s, struct bm_repl_slot *sl, uint64_t len,
	   uint64_t off)
{
	int r;

	if (bm_is_zero(sl->buf, len))
		r = blockmirror_disk_aio_write_zeroes(s->target, len, off, 0,
						      slot_done, sl);
	else
		r = blockmirror_disk_aio_write(s->target, sl->buf, len, off,
					       0, slot_done, sl);
	if (r < 0)
		slot_done(sl, r);
	else
		s->sent += len;
}

/* Under s->lock, on the sender thread: write out the slots whose read
 * is done, or end them on an error.  true if the lock was let go (to
 * submit a write): what the caller waits for may have happened. */
static bool
write_ready(struct bm_repl_sender *s)
{
	bool unlocked = false;

	for (unsigned i = 0; i < SLOTS; i++) {
		struct bm_repl_slot *sl = &s->slots[i];
		char m[200];

		if (!sl->ready)
			continue;
		sl->ready = false;
		if (sl->rerr < 0 || s->err) {
			if (sl->rerr < 0) {
				snprintf(m, sizeof m, "reading the snapshot "
					 "at %" PRIu64 ": %s", sl->off,
					 strerror(-sl->rerr));
				set_error(s, sl->rerr, m);
			}
			sl->busy = false;
			s->busy--;
			continue;
		}
		pthread_mutex_unlock(&s->lock);
		slot_write(s, sl, sl->len, sl->off);
		pthread_mutex_lock(&s->lock);
		unlocked = true;
	}
	return unlocked;
}

/*
 * Under s->lock: wait for a read or a write to end.  Reads complete on
 * the disk's loop: without a thread of its own, the loop is turned here
 * (as the blocking calls do), the lock let go meanwhile.
 */
static void
sender_wait(struct bm_repl_sender *s)
{
	if (bm_disk_has_thread(s->r->disk)) {
		pthread_cond_wait(&s->cond, &s->lock);
		return;
	}
	pthread_mutex_unlock(&s->lock);
	if (bm_disk_turn(s->r->disk, 10) != 1)
		usleep(1000); /* another caller turns it */
	pthread_mutex_lock(&s->lock);
}

/* A free slot, or NULL once something failed (s->err). */
static struct bm_repl_slot *
slot_get(struct bm_repl_sender *s)
{
	struct bm_repl_slot *got = NULL;

	pthread_mutex_lock(&s->lock);
	for (;;) {
		if (write_ready(s))
			continue;
		if (s->err || s->busy < SLOTS)
			break;
		sender_wait(s);
	}
	for (unsigned i = 0; !s->err && i < SLOTS; i++)
		if (!s->slots[i].busy) {
			got = &s->slots[i];
			got->busy = true;
			s->busy++;
			break;
		}
	pthread_mutex_unlock(&s->lock);
	return got;
}

int
bm_repl_drain(struct bm_repl_sender *s)
{
	int err;

	pthread_mutex_lock(&s->lock);
	for (;;) {
		if (write_ready(s))
			continue;
		if (!s->busy)
			break;
		sender_wait(s);
	}
	err = s->err;
	pthread_mutex_unlock(&s->lock);
	if (err < 0)
		return bm_error(err, "%s: %s", s->uri, s->msg);
	return 0;
}

/* CHANGED_ONLY: let go of what every read asked so far has read (reads
 * are asked in ascending order; one still running holds its place). */
static int
drop_read(struct bm_repl_sender *s)
{
	uint64_t to = s->read_to;

	pthread_mutex_lock(&s->lock);
	for (unsigned i = 0; i < SLOTS; i++)
		if (s->slots[i].reading)
			to = BM_MIN(to, s->slots[i].off);
	pthread_mutex_unlock(&s->lock);
	if (to < s->dropped_to + DROP_STEP)
		return 0;
	return bm_snapshot_drop_behind(s->snap, &s->dropped_to, to);
}

/* Send [off, off + len) of the snapshot, at most SLOT_BYTES a slot: each
 * slot reads, then writes, SLOTS of them in flight. */
static int
send_range(struct bm_repl_sender *s, uint64_t off, uint64_t len)
{
	while (len) {
		uint64_t n = BM_MIN(len, SLOT_BYTES);
		struct bm_repl_slot *sl = slot_get(s);
		int r;

		if (bm_repl_stopping(s->r)) {
			if (sl)
				slot_done(sl, 0);
			bm_repl_drain(s);
			return bm_error(-ECANCELED, "replication was stopped");
		}
		if (!sl)
			return bm_repl_drain(s);
		pthread_mutex_lock(&s->lock);
		sl->off = off;
		sl->len = n;
		sl->rerr = 0;
		sl->reading = true;
		pthread_mutex_unlock(&s->lock);
		r = blockmirror_snapshot_aio_read(s->snap, sl->buf, n, off,
						  read_done, sl);
		if (r < 0) {
			pthread_mutex_lock(&s->lock);
			sl->reading = false;
			pthread_mutex_unlock(&s->lock);
			slot_done(sl, r);
			return bm_repl_drain(s);
		}
		s->read_to = off + n;
		/* Read once: the guest's next writes there need no copy. */
		if (s->drop && (r = drop_read(s)) < 0) {
			bm_repl_drain(s);
			return r;
		}
		off += n;
		len -= n;
	}
	return 0;
}

/* Granules of [start, end) that r->resend need not send again. */
static void
resend_clear(struct blockmirror_replication *r, uint64_t start, uint64_t end)
{
	uint64_t g = r->granule;
	uint64_t k1 = end >= r->size ? r->nresend : end / g;

	for (uint64_t k = (start + g - 1) / g; k < k1; k++)
		r->resend[k / 64] &= ~(UINT64_C(1) << (k % 64));
}

/* The granules the snapshot says changed since the cycle's checkpoint
 * (and no more from r->resend). */
int
bm_repl_send_changed(struct bm_repl_sender *s)
{
	uint64_t g, *words = NULL, nbits, bytes, size = s->r->size;
	int r = blockmirror_snapshot_changed(s->snap, &g, &words, &nbits,
					     &bytes);

	for (uint64_t b = 0; r == 0 && b < nbits;) {
		uint64_t e;

		if (!(words[b / 64] >> (b % 64) & 1)) {
			b++;
			continue;
		}
		for (e = b; e < nbits && words[e / 64] >> (e % 64) & 1; e++)
			;
		r = send_range(s, b * g, BM_MIN(e * g, size) - b * g);
		if (s->r->resend)
			resend_clear(s->r, b * g, BM_MIN(e * g, size));
		b = e;
	}
	free(words);
	return r;
}

/* Every data extent of the snapshot (the replica's disk reads as zeroes
 * elsewhere). */
int
bm_repl_send_full(struct bm_repl_sender *s)
{
	struct bm_extent_list l = { 0 };
	uint64_t size = s->r->size;
	int r = 0;

	for (uint64_t pos = 0; r == 0 && pos < size;) {
		bm_extent_list_reset(&l);
		r = bm_snapshot_extents(s->r->disk, s->snap, pos,
					BM_MIN(size - pos, BM_GiB), &l);
		for (size_t i = 0; r == 0 && i < l.len; i++)
			if (!(l.v[i].flags & (BM_EXTENT_HOLE | BM_EXTENT_ZERO)))
				r = send_range(s, l.v[i].offset,
					       BM_MIN(l.v[i].length,
						      size - l.v[i].offset));
		if (r == 0 && !l.len)
			r = bm_error(-EIO, "the snapshot reported nothing at "
				     "%" PRIu64, pos);
		if (r == 0)
			pos = BM_MAX(bm_extent_list_end(&l), pos + 1);
	}
	bm_extent_list_free(&l);
	return r;
}

/* The replica's digests of granules [first, first + n). */
static int
fetch_digests(struct bm_repl_sender *s, uint64_t point, uint64_t first, uint64_t n)
{
	struct blockmirror_replication *r = s->r;
	json_t *req, *res = NULL;
	void *buf = NULL;
	size_t len = 0;
	int ret;

	req = json_pack("{s:s,s:I,s:I,s:I,s:s}", "op", "digests",
			"offset", (json_int_t)(first * r->granule),
			"count", (json_int_t)n, "point", (json_int_t)point,
			"token", r->st.token);
	ret = bm_repl_call(r, req, &res, CALL_MS);
	json_decref(req);
	if (ret == 0)
		ret = bm_chan_b64_get(res, "digests", &buf, &len, n * 8);
	json_decref(res);
	if (ret < 0)
		return ret;
	if (len != n * 8) {
		free(buf);
		return bm_error(-EPROTO, "the replica at %s sent %zu bytes of "
				"digests for %" PRIu64 " granules", r->replica,
				len, n);
	}
	for (uint64_t i = 0; i < n; i++) {
		uint8_t *p = (uint8_t *)buf + i * 8;
		uint64_t d = 0;

		for (int b = 7; b >= 0; b--)
			d = d << 8 | p[b];
		s->theirs[i] = d;
	}
	free(buf);
	s->theirs_first = first;
	s->theirs_n = n;
	return 0;
}

/* Pages of the replica's divergence bits, ORed into r->resend. */
int
bm_repl_fetch_divergent(struct blockmirror_replication *r)
{
	uint64_t ngran = (r->size + r->granule - 1) / r->granule;
	uint64_t page = UINT64_C(1) << 20; /* granules, a multiple of 64 */
	int ret = 0;

	if (r->resend && r->nresend != ngran) {
		free(r->resend);
		r->resend = NULL;
	}
	if (!r->resend) {
		r->resend = calloc((ngran + 63) / 64, sizeof *r->resend);
		if (!r->resend)
			return bm_error(-ENOMEM, "out of memory");
		r->nresend = ngran;
	}
	for (uint64_t first = 0; ret == 0 && first < ngran; first += page) {
		uint64_t n = BM_MIN(page, ngran - first);
		json_t *req, *res = NULL;
		uint8_t *bits = NULL;
		size_t len = 0;

		req = json_pack("{s:s,s:I,s:I,s:s}", "op", "divergent",
				"offset", (json_int_t)(first * r->granule),
				"count", (json_int_t)n, "token", r->st.token);
		ret = bm_repl_call(r, req, &res, CALL_MS);
		json_decref(req);
		if (ret == 0)
			ret = bm_chan_b64_get(res, "bits", (void **)&bits,
					      &len, (n + 7) / 8);
		json_decref(res);
		if (ret == 0 && len != (n + 7) / 8)
			ret = bm_error(-EPROTO, "the replica at %s sent %zu "
				       "bytes of divergence for %" PRIu64
				       " granules", r->replica, len, n);
		for (uint64_t k = 0; ret == 0 && k < n; k++)
			if (bits[k / 8] >> (k % 8) & 1)
				r->resend[(first + k) / 64] |=
					UINT64_C(1) << ((first + k) % 64);
		free(bits);
	}
	return ret;
}

/* The granules a verify found different, or the replica's disk diverged
 * in (replica granularity). */
int
bm_repl_send_resend(struct bm_repl_sender *s)
{
	struct blockmirror_replication *r = s->r;
	int ret = 0;

	for (uint64_t k = 0; ret == 0 && k < r->nresend; k++)
		if (r->resend[k / 64] >> (k % 64) & 1)
			ret = send_range(s, k * r->granule,
					 BM_MIN(r->granule,
						r->size - k * r->granule));
	return ret;
}

/* has[k - first]: granule k of [first, first + n) holds data in the
 * snapshot (a data extent touches it); the others read as zeroes. */
static int
granules_with_data(struct bm_repl_sender *s, uint64_t first, uint64_t n,
		   uint8_t *has)
{
	struct blockmirror_replication *r = s->r;
	uint64_t g = r->granule, end = BM_MIN((first + n) * g, r->size);
	struct bm_extent_list l = { 0 };
	int ret = 0;

	memset(has, 0, n);
	for (uint64_t pos = first * g; ret == 0 && pos < end;) {
		bm_extent_list_reset(&l);
		ret = bm_snapshot_extents(r->disk, s->snap, pos, end - pos, &l);
		if (ret == 0 && !l.len)
			ret = bm_error(-EIO, "the snapshot reported nothing at "
				       "%" PRIu64, pos);
		for (size_t i = 0; ret == 0 && i < l.len; i++) {
			uint64_t a = BM_MAX(l.v[i].offset, first * g);
			uint64_t b = BM_MIN(l.v[i].offset + l.v[i].length, end);

			if (l.v[i].flags & (BM_EXTENT_HOLE | BM_EXTENT_ZERO) ||
			    a >= b)
				continue;
			for (uint64_t k = a / g; k <= (b - 1) / g; k++)
				has[k - first] = 1;
		}
		if (ret == 0)
			pos = BM_MAX(bm_extent_list_end(&l), pos + 1);
	}
	bm_extent_list_free(&l);
	return ret;
}

/* A granule larger than a slot: its digest in pieces, then sent as a
 * range if it differs. */
static int
send_big_if_differs(struct bm_repl_sender *s, bool data, uint64_t ks,
		    uint64_t ke, uint64_t theirs, uint64_t *differ)
{
	XXH3_state_t *st = data ? XXH3_createState() : NULL;
	struct bm_repl_slot *sl = NULL;
	uint64_t d = 0;
	int ret = 0;

	if (data && !st)
		return bm_error(-ENOMEM, "out of memory");
	if (data) {
		sl = slot_get(s);
		if (!sl) {
			XXH3_freeState(st);
			return bm_repl_drain(s);
		}
		XXH3_64bits_reset(st);
		for (uint64_t pos = ks; ret == 0 && pos < ke;
		     pos += SLOT_BYTES) {
			uint64_t n = BM_MIN(SLOT_BYTES, ke - pos);

			ret = blockmirror_snapshot_read(s->snap, sl->buf, n,
							pos);
			if (ret == 0)
				XXH3_64bits_update(st, sl->buf, n);
		}
		d = XXH3_64bits_digest(st);
		XXH3_freeState(st);
		slot_done(sl, 0);
		if (ret < 0 || d == theirs)
			return ret;
	}
	/* A hole reads as zeroes: the range sends write-zeroes. */
	*differ += ke - ks;
	return send_range(s, ks, ke - ks);
}

/* Granule [ks, ke) against the replica's digest `theirs`: sent if it
 * differs (*differ counts it). */
static int
send_if_differs(struct bm_repl_sender *s, bool data, uint64_t ks, uint64_t ke,
		uint64_t theirs, uint64_t *differ)
{
	uint64_t zd = ke - ks < s->r->granule ? s->zero_tail : s->zero_digest;
	struct bm_repl_slot *sl;
	int ret;

	if (!data && theirs == zd)
		return 0;
	if (ke - ks > SLOT_BYTES)
		return send_big_if_differs(s, data, ks, ke, theirs, differ);
	sl = slot_get(s);
	if (!sl)
		return bm_repl_drain(s);
	if (data) {
		ret = blockmirror_snapshot_read(s->snap, sl->buf, ke - ks, ks);
		if (ret < 0) {
			slot_done(sl, 0);
			return ret;
		}
		if (XXH3_64bits(sl->buf, ke - ks) == theirs) {
			slot_done(sl, 0);
			return 0;
		}
	} else {
		memset(sl->buf, 0, ke - ks);
	}
	*differ += ke - ks;
	slot_write(s, sl, ke - ks, ks);
	return 0;
}

static void
zero_digests(struct bm_repl_sender *s, const uint8_t *zero)
{
	uint64_t g = s->r->granule, size = s->r->size;

	s->zero_digest = XXH3_64bits(zero, g);
	s->zero_tail = XXH3_64bits(zero, size % g ? size % g : g);
}

/*
 * Digests mode: read the whole snapshot (holes cost nothing: their
 * digest is known), compare each granule's XXH3-64 with the replica's,
 * send those that differ.  *differ: their bytes.
 */
int
bm_repl_send_differing(struct bm_repl_sender *s, uint64_t *differ)
{
	struct blockmirror_replication *r = s->r;
	uint64_t g = r->granule, size = r->size;
	uint64_t ngran = (size + g - 1) / g;
	uint8_t *zero = calloc(1, g), *has = malloc(DIGEST_BATCH);
	int ret = 0;

	s->theirs = malloc(DIGEST_BATCH * sizeof *s->theirs);
	if (!zero || !has || !s->theirs) {
		free(zero);
		free(has);
		return bm_error(-ENOMEM, "out of memory");
	}
	zero_digests(s, zero);
	free(zero);
	*differ = 0;
	for (uint64_t first = 0; ret == 0 && first < ngran;
	     first += DIGEST_BATCH) {
		uint64_t n = BM_MIN(DIGEST_BATCH, ngran - first);

		ret = fetch_digests(s, 0, first, n);
		if (ret == 0)
			ret = granules_with_data(s, first, n, has);
		for (uint64_t k = first; ret == 0 && k < first + n; k++)
			ret = send_if_differs(s, has[k - first], k * g,
					      BM_MIN(k * g + g, size),
					      s->theirs[k - first], differ);
		if (ret == 0)
			ret = bm_repl_drain(s);
	}
	free(has);
	free(s->theirs);
	s->theirs = NULL;
	return ret;
}

/* "tcp:HOST:PORT" or "unix:PATH" and an export name as an NBD URI, TLS
 * when TCP. */
char *
bm_repl_nbd_uri(struct blockmirror_replication *r, const char *addr,
	const char *export)
{
	char *uri = NULL;
	int n = -1;

	if (strncmp(addr, "unix:", 5) == 0)
		n = asprintf(&uri, "nbd+unix:///%s?socket=%s", export,
			     addr + 5);
	else if (strncmp(addr, "tcp:", 4) == 0 && r->psk && r->identity) {
		const char *port = strrchr(addr, ':');
		size_t hl = (size_t)(port - addr - 4);
		const char *rport = strrchr(r->replica, ':');
		int rl = (int)(rport - r->replica - 4);

		/* A server on every address (0.0.0.0, [::]) is reached the
		 * way the channel reached the replica. */
		if ((hl == 7 && !strncmp(addr + 4, "0.0.0.0", 7)) ||
		    (hl == 4 && !strncmp(addr + 4, "[::]", 4)) || hl == 0)
			n = asprintf(&uri, "nbds://%s@%.*s%s/%s?tls-psk-file=%s",
				     r->identity, rl, r->replica + 4, port,
				     export, r->psk);
		else
			n = asprintf(&uri, "nbds://%s@%s/%s?tls-psk-file=%s",
				     r->identity, addr + 4, export, r->psk);
	}
	if (n < 0)
		return NULL;
	return uri;
}

int
bm_repl_sender_open(struct bm_repl_sender *s, struct blockmirror_replication *r,
	    struct blockmirror_snapshot *snap, const char *uri)
{
	memset(s, 0, sizeof *s);
	s->r = r;
	s->snap = snap;
	s->uri = uri;
	pthread_mutex_init(&s->lock, NULL);
	pthread_cond_init(&s->cond, NULL);
	s->bufs = aligned_alloc(4096, (size_t)SLOTS * SLOT_BYTES);
	if (!s->bufs)
		return bm_error(-ENOMEM, "out of memory");
	for (unsigned i = 0; i < SLOTS; i++) {
		s->slots[i].s = s;
		s->slots[i].buf = s->bufs + (size_t)i * SLOT_BYTES;
	}
	s->target = blockmirror_disk_open(uri, BLOCKMIRROR_FORMAT_RAW, 0);
	if (!s->target)
		return -errno;
	if (blockmirror_disk_get_size(s->target) != r->size)
		return bm_error(-ESTALE, "%s: the replica's staging export has "
				"%" PRIu64 " bytes, the disk %" PRIu64, uri,
				blockmirror_disk_get_size(s->target), r->size);
	return blockmirror_disk_start_thread(s->target);
}

int
bm_repl_sender_close(struct bm_repl_sender *s, int r)
{
	if (s->target) {
		int c;

		bm_repl_drain(s);
		c = blockmirror_disk_close(s->target);
		if (r == 0 && c < 0)
			r = bm_error(c, "%s: flushing the replica's staging "
				     "export: %s", s->uri,
				     blockmirror_last_error() ?
				     blockmirror_last_error() : strerror(-c));
	}
	free(s->bufs);
	free(s->theirs);
	pthread_mutex_destroy(&s->lock);
	pthread_cond_destroy(&s->cond);
	return r;
}

/* ---- online verify ------------------------------------------------------------ */

/* Was any part of [off, off + len) written since the snapshot's
 * checkpoint (bitmap of granularity gt)? */
static bool
written_since(const uint64_t *words, uint64_t nbits, uint64_t gt,
	      uint64_t off, uint64_t len)
{
	for (uint64_t b = off / gt; b <= (off + len - 1) / gt && b < nbits; b++)
		if (words[b / 64] >> (b % 64) & 1)
			return true;
	return false;
}

/*
 * The replica's latest point against a snapshot of the disk now: every
 * granule not written since that point's checkpoint must have the
 * replica's digest.  Those that do not go into r->resend.
 */
int
bm_repl_verify(struct blockmirror_replication *r,
       struct blockmirror_replication_check *c)
{
	struct blockmirror_snapshot_options so = { .size = sizeof so };
	struct bm_repl_sender s = { 0 };
	uint64_t gt, *words = NULL, nbits = 0, bytes, g = r->granule;
	uint64_t ngran = (r->size + g - 1) / g, point;
	uint8_t *has = NULL, *buf = NULL, *zero = NULL;
	char msg[512];
	int ret;

	memset(c, 0, sizeof *c);
	c->size = sizeof *c;
	pthread_mutex_lock(&r->lock);
	point = r->st.committed;
	pthread_mutex_unlock(&r->lock);
	if (!point || !r->since[0] || r->resync ||
	    bm_repl_checkpoint_point(r->since) != point)
		return bm_error(-EAGAIN, "no committed point of this disk's "
				"line to verify yet: wait for a cycle");
	c->point = point;
	so.since = r->since;
	s.r = r;
	ret = blockmirror_snapshot_take(&r->disk, 1, &so, &s.snap);
	if (ret == 0)
		ret = blockmirror_snapshot_changed(s.snap, &gt, &words, &nbits,
						   &bytes);
	has = malloc(DIGEST_BATCH);
	buf = malloc(g);
	zero = calloc(1, g);
	s.theirs = malloc(DIGEST_BATCH * sizeof *s.theirs);
	free(r->resend);
	r->resend = calloc((ngran + 63) / 64, sizeof *r->resend);
	r->nresend = ngran;
	if (ret == 0 && (!has || !buf || !zero || !s.theirs || !r->resend))
		ret = bm_error(-ENOMEM, "out of memory");
	if (ret == 0)
		zero_digests(&s, zero);
	for (uint64_t first = 0; ret == 0 && first < ngran;
	     first += DIGEST_BATCH) {
		uint64_t n = BM_MIN(DIGEST_BATCH, ngran - first);

		ret = fetch_digests(&s, point, first, n);
		if (ret == 0)
			ret = granules_with_data(&s, first, n, has);
		for (uint64_t k = first; ret == 0 && k < first + n; k++) {
			uint64_t off = k * g, len = BM_MIN(g, r->size - off);
			uint64_t d = len < g ? s.zero_tail : s.zero_digest;

			if (written_since(words, nbits, gt, off, len)) {
				c->skipped++;
				continue;
			}
			if (has[k - first]) {
				ret = blockmirror_snapshot_read(s.snap, buf,
								len, off);
				d = XXH3_64bits(buf, len);
			}
			c->granules++;
			if (ret == 0 && d != s.theirs[k - first]) {
				if (!c->mismatches)
					c->first_mismatch = off;
				c->mismatches++;
				r->resend[k / 64] |= UINT64_C(1) << (k % 64);
			}
		}
	}
	if (ret < 0 || !c->mismatches) {
		free(r->resend);
		r->resend = NULL;
		r->nresend = 0;
	}
	if (ret < 0)
		snprintf(msg, sizeof msg, "%s", blockmirror_last_error() ?
			 blockmirror_last_error() : strerror(-ret));
	free(words);
	free(has);
	free(buf);
	free(zero);
	free(s.theirs);
	if (s.snap)
		blockmirror_snapshot_release(s.snap);
	if (ret < 0)
		return bm_error(ret, "%s", msg);
	return ret;
}

