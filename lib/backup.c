/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Backups of a running disk into a directory of points (docs/backup.md).
 *
 * A point is three files: NNNN.qcow2 (the data: the whole disk for a full
 * point, only what changed for an incremental one, whose backing file is
 * the previous point), NNNN.digests (XXH128 of every granule of the disk
 * as the point holds it, 16 bytes each) and NNNN.json (the manifest: what
 * the point is, and the digest of NNNN.digests).  The manifest is written
 * last, durably: a point without one does not exist, so a backup that
 * dies half way leaves nothing a restore could take for a point.
 *
 * A backup takes a snapshot (snapshot.c) and reads its view, never the
 * moving disk: the point is the disk at the snapshot's instant.  With
 * change tracking on (checkpoint.c), the snapshot creates checkpoint
 * "bm-backup-NNNN" at that instant, and an incremental point copies
 * exactly the granules the record says changed since the previous
 * point's checkpoint.  After a successful point the previous checkpoint
 * is removed (its record merges into the one before); after a failed one
 * the new checkpoint is, so that the next incremental still covers
 * everything since the last point that exists.
 *
 * Everything here runs on the caller's thread and uses the disk only
 * through the public calls, which post to its loop.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "durable.h"
#include "extent.h"
#include "errors.h"
#include "hash.h"
#include "checkpoint.h"
#include "disk.h"
#include "internal.h"
#include "snapshot.h"

#define COPY_BYTES (1024 * BM_KiB)
#define FULL_GRANULARITY (64 * BM_KiB)
#define MAX_POINTS 9999

/* What a manifest says. */
struct point {
	unsigned number;
	bool incremental;
	int64_t instant;
	uint64_t disk_size;
	uint64_t granularity;
	char checkpoint[80];
	char chain[17];            /* the chain's id, in its checkpoints' names */
	bool application;          /* freeze succeeded at the instant */
	struct bm_digest digests_digest;
};

static void
point_file(char *out, size_t len, const char *dir, unsigned n,
	   const char *ext)
{
	snprintf(out, len, "%s/%04u.%s", dir, n, ext);
}

/* ---- manifests ------------------------------------------------------- */

static int
manifest_read(const char *dir, unsigned n, struct point *p)
{
	char path[PATH_MAX], hex[33];
	json_error_t jerr;
	json_t *m, *v;
	const char *s;
	int r = 0;

	point_file(path, sizeof path, dir, n, "json");
	m = json_load_file(path, 0, &jerr);
	if (!m)
		return bm_error(-EBADMSG, "%s: not a backup manifest: %s", path,
				jerr.text);
	memset(p, 0, sizeof *p);
	p->number = n;
	p->incremental = json_is_true(json_object_get(m, "incremental"));
	s = json_string_value(json_object_get(m, "consistency"));
	p->application = s && !strcmp(s, "application");
	p->instant = json_integer_value(json_object_get(m, "instant"));
	p->disk_size = json_integer_value(json_object_get(m, "disk_size"));
	p->granularity = json_integer_value(json_object_get(m, "granularity"));
	v = json_object_get(m, "checkpoint");
	if (json_is_string(v))
		snprintf(p->checkpoint, sizeof p->checkpoint, "%s",
			 json_string_value(v));
	v = json_object_get(m, "chain");
	if (json_is_string(v))
		snprintf(p->chain, sizeof p->chain, "%s", json_string_value(v));
	s = json_string_value(json_object_get(m, "digests_xxh128"));
	if (json_integer_value(json_object_get(m, "version")) != 1 ||
	    !p->disk_size || !p->granularity ||
	    p->granularity & (p->granularity - 1) || !s || strlen(s) != 32)
		r = bm_error(-EBADMSG, "%s: a field is missing or wrong", path);
	for (int i = 0; r == 0 && i < 16; i++) {
		unsigned b;

		if (sscanf(s + 2 * i, "%2x", &b) != 1)
			r = bm_error(-EBADMSG, "%s: digests_xxh128 is not hex",
				     path);
		p->digests_digest.bytes[i] = (uint8_t)b;
	}
	(void)hex;
	json_decref(m);
	return r;
}

static int
manifest_write(const char *dir, const struct point *p, const char *backing)
{
	char path[PATH_MAX], hex[33], *text;
	json_t *m;
	int r;

	bm_digest_hex(&p->digests_digest, hex);
	m = json_pack("{s:i, s:i, s:s, s:b, s:I, s:I, s:I, s:s?, s:s?, s:s, "
		      "s:s}",
		      "version", 1, "point", (int)p->number, "chain", p->chain,
		      "incremental", p->incremental,
		      "instant", (json_int_t)p->instant,
		      "disk_size", (json_int_t)p->disk_size,
		      "granularity", (json_int_t)p->granularity,
		      "checkpoint", p->checkpoint[0] ? p->checkpoint : NULL,
		      "backing", backing,
		      "consistency", p->application ? "application" : "crash",
		      "digests_xxh128", hex);
	text = m ? json_dumps(m, JSON_INDENT(2)) : NULL;
	json_decref(m);
	if (!text)
		return bm_error(-ENOMEM, "out of memory");
	point_file(path, sizeof path, dir, p->number, "json");
	r = bm_durable_write_file(path, text, strlen(text), 0644);
	free(text);
	return r;
}

/* The digests of a point, checked against its manifest. */
static int
digests_read(const char *dir, const struct point *p, struct bm_digest **out,
	     uint64_t *count)
{
	uint64_t n = (p->disk_size + p->granularity - 1) / p->granularity;
	char path[PATH_MAX];
	struct bm_digest d, *v;
	ssize_t got;
	int fd, r = 0;

	point_file(path, sizeof path, dir, p->number, "digests");
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return bm_error(-errno, "%s: %s", path, strerror(errno));
	v = malloc(n * sizeof *v);
	if (!v) {
		close(fd);
		return bm_error(-ENOMEM, "out of memory");
	}
	got = pread(fd, v, n * sizeof *v, 0);
	close(fd);
	if (got != (ssize_t)(n * sizeof *v)) {
		r = bm_error(-EBADMSG, "%s: holds %zd bytes, not %" PRIu64,
			     path, got, n * sizeof *v);
	} else {
		bm_hash_buffer(v, n * sizeof *v, &d);
		if (memcmp(&d, &p->digests_digest, sizeof d))
			r = bm_error(-EBADMSG, "%s: does not match the digest "
				     "in its manifest (damaged)", path);
	}
	if (r < 0) {
		free(v);
		return r;
	}
	*out = v;
	*count = n;
	return 0;
}

/*
 * The points of `dir`: first..last (0..0: none), refusing a gap.  Pruning
 * removes the oldest points, so a chain may start above 1.
 */
static int
chain_range(const char *dir, unsigned *first, unsigned *last)
{
	unsigned lo = MAX_POINTS + 1, hi = 0, count = 0;
	struct dirent *e;
	DIR *d = opendir(dir);

	if (!d) {
		if (errno == ENOENT) {
			*first = *last = 0;
			return 0;
		}
		return bm_error(-errno, "%s: %s", dir, strerror(errno));
	}
	while ((e = readdir(d))) {
		unsigned n;
		char tail[8];

		if (strlen(e->d_name) != 9 ||
		    sscanf(e->d_name, "%4u.%4s", &n, tail) != 2 ||
		    strcmp(tail, "json") || !n || n > MAX_POINTS)
			continue;
		lo = BM_MIN(lo, n);
		hi = BM_MAX(hi, n);
		count++;
	}
	closedir(d);
	if (!count) {
		*first = *last = 0;
		return 0;
	}
	if (hi - lo + 1 != count)
		return bm_error(-EBADMSG, "%s: points %04u to %04u, but %u of "
				"them are missing; the chain is broken", dir,
				lo, hi, hi - lo + 1 - count);
	*first = lo;
	*last = hi;
	return 0;
}

static int
newest_point(const char *dir, unsigned *out)
{
	unsigned first;

	return chain_range(dir, &first, out);
}

/* ---- taking a point -------------------------------------------------- */

static void
extents_done(void *user_data, int err)
{
	bm_waiter_signal(user_data, err);
}

/* What the view holds in [off, off + len): appended to `l`. */
static int
view_extents(struct blockmirror_disk *disk, struct blockmirror_snapshot *snap,
	     uint64_t off, uint64_t len, struct bm_extent_list *l)
{
	struct bm_waiter w;
	int r;

	bm_waiter_init(&w);
	r = bm_disk_aio_to(disk, bm_snapshot_view(snap), BM_REQ_BLOCK_STATUS,
			   l, len, off, extents_done, &w);
	if (r == 0)
		r = bm_disk_wait(disk, &w);
	bm_waiter_destroy(&w);
	return r;
}

struct run {
	struct blockmirror_disk *disk;     /* the served one */
	struct blockmirror_disk *target;   /* the new point's image */
	struct blockmirror_snapshot *snap;
	const struct blockmirror_backup_options *o;
	struct bm_digest *digests;
	struct bm_digest zero_digest;      /* of a granule of zeroes */
	struct bm_digest zero_tail;        /* of the last one, if shorter */
	uint64_t g, size, done, total;
	uint8_t *buf;
	bool incremental;
	bool heal;                         /* write only what differs from
					      the previous point's digests */
	struct blockmirror_backup_point *res;
};

/* The digest of granule k all zeroes (the last one may be short). */
static const struct bm_digest *
zero_of(const struct run *run, uint64_t k)
{
	return (k + 1) * run->g > run->size ? &run->zero_tail
					    : &run->zero_digest;
}

/* Copy [off, off + len) (granule-aligned, at most COPY_BYTES) from the
 * view to the point, digesting every granule. */
static int
copy_range(struct run *run, uint64_t off, uint64_t len)
{
	int r = blockmirror_snapshot_read(run->snap, run->buf, len, off);

	if (r < 0)
		return r;
	run->res->bytes_read += len;
	for (uint64_t p = 0; p < len; p += run->g) {
		uint64_t n = BM_MIN(run->g, len - p);
		uint64_t k = (off + p) / run->g;

		if (run->heal) {
			struct bm_digest d;

			bm_hash_buffer(run->buf + p, n, &d);
			if (!memcmp(&d, &run->digests[k], sizeof d))
				continue; /* the previous point has it */
			run->res->bytes_changed += n;
		}
		if (bm_is_zero(run->buf + p, n)) {
			run->digests[k] = *zero_of(run, k);
			/* Over a backing point, zeroes must be said. */
			if (run->incremental)
				r = blockmirror_disk_write_zeroes(run->target,
								  n, off + p,
								  0);
		} else {
			bm_hash_buffer(run->buf + p, n, &run->digests[k]);
			r = blockmirror_disk_write(run->target, run->buf + p,
						   n, off + p, 0);
			run->res->bytes_written += n;
		}
		if (r < 0)
			return r;
	}
	run->done += len;
	if (run->o->progress)
		run->o->progress(run->o->user_data, run->done, run->total);
	return 0;
}

/* Healing: a granule that is a hole now but not in the previous point
 * is written as zeroes. */
static int
heal_hole(struct run *run, uint64_t off, uint64_t end)
{
	int r = 0;

	/* Whole granules of the hole, and the disk's short last one. */
	for (off = bm_round_up(off, run->g);
	     r == 0 && off < end && (off + run->g <= end || end == run->size);
	     off += run->g) {
		uint64_t k = off / run->g, n = BM_MIN(run->g, run->size - off);

		if (!memcmp(&run->digests[k], zero_of(run, k),
			    sizeof run->zero_digest))
			continue;
		run->digests[k] = *zero_of(run, k);
		run->res->bytes_changed += n;
		r = blockmirror_disk_write_zeroes(run->target, n, off, 0);
	}
	return r;
}

/*
 * A full point: every granule the view holds data in.  Healing (an
 * incremental point without a change record to trust): the same reads,
 * but only granules whose digest differs from the previous point's are
 * written.
 */
static int
copy_full(struct run *run)
{
	struct bm_extent_list l = { 0 };
	uint64_t copied = 0;
	int r = 0;

	run->total = run->size;
	for (uint64_t k = 0; !run->heal && k * run->g < run->size; k++)
		run->digests[k] = *zero_of(run, k);
	for (uint64_t pos = 0; r == 0 && pos < run->size;) {
		uint64_t step = BM_MIN(run->size - pos, 1024 * COPY_BYTES);

		bm_extent_list_reset(&l);
		r = view_extents(run->disk, run->snap, pos, step, &l);
		for (size_t i = 0; r == 0 && i < l.len; i++) {
			/* Granules already copied for an earlier extent
			 * that ended inside them are not read again. */
			uint64_t s = BM_MAX(bm_round_down(l.v[i].offset,
							  run->g), copied);
			uint64_t e = BM_MIN(bm_round_up(l.v[i].offset +
							l.v[i].length, run->g),
					    run->size);

			if (l.v[i].flags & (BM_EXTENT_HOLE | BM_EXTENT_ZERO)) {
				run->done += l.v[i].length;
				if (run->heal)
					r = heal_hole(run, BM_MAX(l.v[i].offset,
								  copied),
						      l.v[i].offset +
						      l.v[i].length);
				continue;
			}
			for (; r == 0 && s < e; s += COPY_BYTES)
				r = copy_range(run, s, BM_MIN(COPY_BYTES,
							      e - s));
			copied = BM_MAX(copied, e);
		}
		if (r == 0 && !l.len)
			r = bm_error(-EIO, "the snapshot reported nothing at "
				     "%" PRIu64, pos);
		if (r == 0)
			pos = BM_MAX(bm_extent_list_end(&l), pos + 1);
	}
	bm_extent_list_free(&l);
	return r;
}

/* An incremental point: the granules changed since the previous one. */
static int
copy_changed(struct run *run, const uint64_t *words, uint64_t nbits,
	     uint64_t changed_bytes)
{
	uint64_t per = COPY_BYTES / run->g;
	int r = 0;

	run->total = changed_bytes;
	for (uint64_t b = 0; r == 0 && b < nbits;) {
		uint64_t e;

		if (!(words[b / 64] >> (b % 64) & 1)) {
			b++;
			continue;
		}
		for (e = b; e < nbits && e - b < per &&
			    words[e / 64] >> (e % 64) & 1; e++)
			;
		r = copy_range(run, b * run->g,
			       BM_MIN(e * run->g, run->size) - b * run->g);
		b = e;
	}
	return r;
}

static int
check_options(const struct blockmirror_backup_options *o)
{
	if (!o || o->size < sizeof *o)
		return bm_error(-EINVAL, "no options, or options of an older "
				"size");
	if (!o->dir || !*o->dir)
		return bm_error(-EINVAL, "no backup directory");
	return 0;
}

BM_EXPORT int
blockmirror_backup(struct blockmirror_disk *disk,
		   const struct blockmirror_backup_options *o,
		   struct blockmirror_backup_point *res)
{
	struct blockmirror_snapshot_options so = { .size = sizeof so };
	struct blockmirror_snapshot_info info;
	struct blockmirror_checkpoint *list = NULL;
	struct point prev = { 0 }, p = { 0 };
	struct run run = { .disk = disk, .o = o, .res = res };
	char cp[80], data[PATH_MAX] = "", dig[PATH_MAX] = "", backing[32];
	uint64_t *words = NULL, nbits = 0, changed = 0, g = 0, ndig;
	bool tracking, created = false, heal = false, frozen;
	unsigned newest;
	size_t ncp = 0;
	int r;

	bm_error_clear();
	if (!disk || !res)
		return bm_api_fail("blockmirror_backup",
				   bm_error(-EINVAL, "bad arguments"));
	memset(res, 0, sizeof *res);
	r = check_options(o);
	if (r == 0 && mkdir(o->dir, 0755) < 0 && errno != EEXIST)
		r = bm_error(-errno, "%s: %s", o->dir, strerror(errno));
	if (r == 0)
		r = newest_point(o->dir, &newest);
	if (r == 0 && newest == MAX_POINTS)
		r = bm_error(-ENOSPC, "%s: %u points already; prune it",
			     o->dir, MAX_POINTS);
	if (r < 0)
		return bm_api_fail("blockmirror_backup", r);
	tracking = blockmirror_checkpoint_list(disk, &list, &ncp) == 0;
	bm_error_clear();
	if (o->incremental && !newest)
		r = bm_error(-ENOENT, "%s: no point to build an incremental "
			     "backup on; take a full one", o->dir);
	/* A full point too: the previous point's checkpoint goes after it. */
	if (r == 0 && newest)
		r = manifest_read(o->dir, newest, &prev);
	if (o->incremental) {
		/* No record to go by: heal by digests instead. */
		heal = r == 0 && (!tracking || !prev.checkpoint[0]);
		if (r == 0 && prev.disk_size != blockmirror_disk_get_size(disk))
			r = bm_error(-ESTALE, "%s: point %04u is of a disk of "
				     "%" PRIu64 " bytes, this one has %" PRIu64,
				     o->dir, newest, prev.disk_size,
				     blockmirror_disk_get_size(disk));
		if (r == 0)
			r = digests_read(o->dir, &prev, &run.digests, &ndig);
	}
	free(list);
	if (r < 0)
		return bm_api_fail("blockmirror_backup", r);

	p.number = newest + 1;
	p.incremental = o->incremental;
	p.disk_size = run.size = blockmirror_disk_get_size(disk);
	/* Checkpoint names hold the chain's id, so that chains in other
	 * directories (or an earlier chain here) never share one. */
	if (o->incremental && prev.chain[0]) {
		snprintf(p.chain, sizeof p.chain, "%s", prev.chain);
	} else {
		struct timespec ts;
		struct bm_digest d;
		char seed[PATH_MAX + 64], hex[33];

		clock_gettime(CLOCK_REALTIME, &ts);
		snprintf(seed, sizeof seed, "%s %lld.%09ld %d", o->dir,
			 (long long)ts.tv_sec, ts.tv_nsec, (int)getpid());
		bm_hash_buffer(seed, strlen(seed), &d);
		bm_digest_hex(&d, hex);
		snprintf(p.chain, sizeof p.chain, "%.12s", hex);
	}
	snprintf(cp, sizeof cp, "bm-%s-%04u", p.chain, p.number);
	if (tracking) {
		so.checkpoint = cp;
		so.since = o->incremental && !heal ? prev.checkpoint : NULL;
	}
	frozen = o->freeze && o->freeze(o->user_data) == 0;
	r = blockmirror_snapshot_take(&disk, 1, &so, &run.snap);
	if ((r == -ENOENT || r == -ESTALE) && so.since) {
		/* The record since the point is gone or not trusted (a
		 * failing sidecar, a removed checkpoint): heal. */
		bm_warn("%s: %s; comparing digests instead", o->dir,
			blockmirror_last_error());
		heal = true;
		so.since = NULL;
		r = blockmirror_snapshot_take(&disk, 1, &so, &run.snap);
	}
	if (o->thaw) {
		char msg[512];

		snprintf(msg, sizeof msg, "%s", blockmirror_last_error());
		o->thaw(o->user_data);
		if (r < 0)
			bm_error(r, "%s", msg);
	}
	p.application = frozen;
	if (r < 0)
		goto fail;
	created = tracking;
	if (tracking)
		snprintf(p.checkpoint, sizeof p.checkpoint, "%s", cp);
	if (o->incremental && !heal) {
		r = blockmirror_snapshot_changed(run.snap, &g, &words, &nbits,
						 &changed);
		if (r == 0 && g != prev.granularity) {
			bm_warn("%s: the change record's granularity (%" PRIu64
				") is not point %04u's (%" PRIu64 "); comparing "
				"digests instead", o->dir, g, newest,
				prev.granularity);
			heal = true;
		}
	}
	if (heal) {
		g = prev.granularity;
	} else if (!o->incremental) {
		/* Digests per granule of the change record, so that an
		 * increment replaces them one for one. */
		g = tracking ? bm_checkpoint_granularity(disk)
			     : FULL_GRANULARITY;
		run.digests = calloc((run.size + g - 1) / g,
				     sizeof *run.digests);
		if (!run.digests)
			r = bm_error(-ENOMEM, "out of memory");
	}
	if (r < 0)
		goto fail;
	p.granularity = run.g = g;
	run.incremental = o->incremental;
	run.heal = heal;
	run.buf = aligned_alloc(4096, COPY_BYTES);
	run.zero_digest = (struct bm_digest){ { 0 } };
	if (!run.buf) {
		r = bm_error(-ENOMEM, "out of memory");
		goto fail;
	}
	memset(run.buf, 0, g);
	bm_hash_buffer(run.buf, g, &run.zero_digest);
	bm_hash_buffer(run.buf, run.size % g ? run.size % g : g, &run.zero_tail);

	/* The point's image, then its data. */
	point_file(data, sizeof data, o->dir, p.number, "qcow2");
	point_file(dig, sizeof dig, o->dir, p.number, "digests");
	snprintf(backing, sizeof backing, "%04u.qcow2", newest);
	{
		char opts[128];

		snprintf(opts, sizeof opts, "cluster_size=%" PRIu64 "%s%s%s",
			 BM_MIN(BM_MAX(g, 64 * BM_KiB), 2048 * BM_KiB),
			 o->incremental ? ",backing_file=" : "",
			 o->incremental ? backing : "",
			 o->incremental ? ",backing_fmt=qcow2" : "");
		r = blockmirror_image_create(data, BLOCKMIRROR_FORMAT_QCOW2,
					     run.size, opts, false);
	}
	if (r == 0) {
		run.target = blockmirror_disk_open(data,
						   BLOCKMIRROR_FORMAT_QCOW2, 0);
		if (!run.target)
			r = -errno;
	}
	if (r == 0)
		r = o->incremental && !heal
		    ? copy_changed(&run, words, nbits, changed)
		    : copy_full(&run);
	if (r == 0)
		r = blockmirror_snapshot_query(run.snap, &info);
	if (r == 0 && info.state != BLOCKMIRROR_SNAPSHOT_ACTIVE)
		r = bm_error(-EIO, "the snapshot broke during the backup: %s",
			     info.reason);
	if (r == 0)
		r = blockmirror_disk_flush(run.target);
	if (run.target) {
		int cr = blockmirror_disk_close(run.target);

		run.target = NULL;
		if (r == 0)
			r = cr;
	}
	if (r == 0)
		r = bm_durable_sync_parent(data);
	if (r == 0) {
		uint64_t n = (run.size + g - 1) / g;

		bm_hash_buffer(run.digests, n * sizeof *run.digests,
			       &p.digests_digest);
		r = bm_durable_write_file(dig, run.digests,
					  n * sizeof *run.digests, 0644);
	}
	p.instant = info.taken_unix_ns / 1000000000;
	if (r == 0)
		r = manifest_write(o->dir, &p, o->incremental ? backing : NULL);
	if (r < 0)
		goto fail;

	/* The point exists: the record before it is no longer needed. */
	blockmirror_snapshot_release(run.snap);
	if (tracking && prev.checkpoint[0] &&
	    blockmirror_checkpoint_remove(disk, prev.checkpoint) < 0 &&
	    blockmirror_last_errno() != ENOENT)
		bm_warn("%s: checkpoint %s could not be removed: %s", o->dir,
			prev.checkpoint, blockmirror_last_error());
	res->number = p.number;
	res->incremental = p.incremental;
	res->instant = p.instant;
	res->healed = heal;
	res->application_consistent = frozen;
	if (o->incremental && !heal)
		res->bytes_changed = changed;
	else if (!heal)
		res->bytes_changed = res->bytes_written;
	snprintf(res->file, sizeof res->file, "%s", data);
	snprintf(res->checkpoint, sizeof res->checkpoint, "%s", p.checkpoint);
	free(words);
	free(run.digests);
	free(run.buf);
	return 0;

fail:
	{
		char first[512];

		snprintf(first, sizeof first, "%s", blockmirror_last_error());
		if (run.target)
			blockmirror_disk_close(run.target);
		if (run.snap) {
			blockmirror_snapshot_release(run.snap);
			/* The record since the last point must stay whole. */
			if (created && blockmirror_checkpoint_remove(disk, cp) < 0)
				bm_warn("checkpoint %s could not be removed: "
					"%s", cp, blockmirror_last_error());
			if (data[0])
				unlink(data);
			if (dig[0])
				unlink(dig);
		}
		bm_error(r, "%s", first);
	}
	free(words);
	free(run.digests);
	free(run.buf);
	return bm_api_fail("blockmirror_backup", r);
}

/* ---- verifying a chain ----------------------------------------------- */

/* Read the point's image through its chain and compare every granule
 * with the point's digests. */
static int
verify_point(const char *dir, const struct point *p,
	     const struct bm_digest *dg, uint8_t *buf,
	     struct blockmirror_backup_check *res)
{
	char path[PATH_MAX];
	struct blockmirror_disk *img;
	int r = 0;

	point_file(path, sizeof path, dir, p->number, "qcow2");
	img = blockmirror_disk_open(path, BLOCKMIRROR_FORMAT_QCOW2,
				    BLOCKMIRROR_DISK_READONLY);
	if (!img)
		return bm_error(-errno, "point %04u: %s", p->number,
				blockmirror_last_error());
	if (blockmirror_disk_get_size(img) != p->disk_size)
		r = bm_error(-EBADMSG, "point %04u: %s holds %" PRIu64 " bytes,"
			     " its manifest says %" PRIu64, p->number, path,
			     blockmirror_disk_get_size(img), p->disk_size);
	for (uint64_t off = 0; r == 0 && off < p->disk_size;
	     off += COPY_BYTES) {
		uint64_t len = BM_MIN(COPY_BYTES, p->disk_size - off);

		r = blockmirror_disk_read(img, buf, len, off);
		res->bytes_read += r == 0 ? len : 0;
		for (uint64_t q = 0; r == 0 && q < len; q += p->granularity) {
			struct bm_digest d;
			uint64_t k = (off + q) / p->granularity;

			bm_hash_buffer(buf + q, BM_MIN(p->granularity, len - q),
				       &d);
			if (memcmp(&d, &dg[k], sizeof d))
				r = bm_error(-EBADMSG, "point %04u is damaged: "
					     "%" PRIu64 " bytes at %" PRIu64
					     " do not match its manifest",
					     p->number, p->granularity, off + q);
		}
	}
	if (r < 0 && !res->bad_point)
		res->bad_point = p->number;
	if (r < 0) {
		/* The close is a public call: it clears the message. */
		char msg[512];

		snprintf(msg, sizeof msg, "%s", blockmirror_last_error());
		blockmirror_disk_close(img);
		return bm_error(r, "%s", msg);
	}
	return blockmirror_disk_close(img);
}

/* The live disk against the newest point: every granule the change
 * record says is unchanged since the point must read the same now. */
static int
verify_live(struct blockmirror_disk *live, const struct point *p,
	    const struct bm_digest *dg, uint8_t *buf,
	    struct blockmirror_backup_check *res)
{
	struct blockmirror_snapshot_options so = { .size = sizeof so };
	struct blockmirror_snapshot *snap;
	uint64_t g, *words = NULL, nbits, bytes;
	int r;

	bool record = p->checkpoint[0] && bm_checkpoint_granularity(live);

	/* Without a change record every granule must match: the disk is
	 * expected not to have changed since (an image nobody runs). */
	so.since = record ? p->checkpoint : NULL;
	r = blockmirror_snapshot_take(&live, 1, &so, &snap);
	if (r < 0)
		return r;
	g = p->granularity;
	nbits = (p->disk_size + g - 1) / g;
	if (record) {
		r = blockmirror_snapshot_changed(snap, &g, &words, &nbits,
						 &bytes);
		if (r == 0 && g != p->granularity)
			r = bm_error(-ESTALE, "the change record's granularity "
				     "is not point %04u's", p->number);
	}
	for (uint64_t b = 0; r == 0 && b < nbits; b++) {
		uint64_t off = b * g, len = BM_MIN(g, p->disk_size - off);
		struct bm_digest d;

		if (words && words[b / 64] >> (b % 64) & 1)
			continue;
		r = blockmirror_snapshot_read(snap, buf, len, off);
		if (r < 0)
			break;
		res->live_bytes_read += len;
		bm_hash_buffer(buf, len, &d);
		if (memcmp(&d, &dg[b], sizeof d)) {
			res->live_mismatches++;
			if (!res->live_first_mismatch_set) {
				res->live_first_mismatch = off;
				res->live_first_mismatch_set = true;
			}
		}
	}
	free(words);
	blockmirror_snapshot_release(snap);
	if (r == 0 && res->live_mismatches && record)
		r = bm_error(-EBADMSG, "the live disk differs from point %04u "
			     "in %" PRIu64 " granules the change record says "
			     "did not change (first at %" PRIu64 "): the record "
			     "missed writes", p->number, res->live_mismatches,
			     res->live_first_mismatch);
	else if (r == 0 && res->live_mismatches)
		r = bm_error(-EBADMSG, "the disk differs from point %04u in %"
			     PRIu64 " granules (first at %" PRIu64 "), and no "
			     "change record says why", p->number,
			     res->live_mismatches, res->live_first_mismatch);
	return r;
}

BM_EXPORT int
blockmirror_backup_verify(const char *dir, struct blockmirror_disk *live,
			  struct blockmirror_backup_check *res)
{
	struct bm_digest *dg = NULL;
	struct point p = { 0 };
	uint8_t *buf = NULL;
	unsigned first, newest;
	uint64_t n;
	int r;

	bm_error_clear();
	if (!dir || !res)
		return bm_api_fail("blockmirror_backup_verify",
				   bm_error(-EINVAL, "bad arguments"));
	memset(res, 0, sizeof *res);
	r = chain_range(dir, &first, &newest);
	if (r == 0 && !newest)
		r = bm_error(-ENOENT, "%s: holds no backup point", dir);
	if (r == 0 && !(buf = aligned_alloc(4096, COPY_BYTES)))
		r = bm_error(-ENOMEM, "out of memory");
	for (unsigned k = first; r == 0 && k <= newest; k++) {
		free(dg);
		dg = NULL;
		r = manifest_read(dir, k, &p);
		if (r == 0 && k == first && p.incremental)
			r = bm_error(-EBADMSG, "%s: point %04u is incremental, "
				     "but the chain must start with a full "
				     "point", dir, k);
		if (r == 0)
			r = digests_read(dir, &p, &dg, &n);
		if (r == 0)
			r = verify_point(dir, &p, dg, buf, res);
		if (r < 0 && !res->bad_point)
			res->bad_point = k;
		if (r == 0)
			res->points++;
	}
	if (r == 0 && live)
		r = verify_live(live, &p, dg, buf, res);
	free(dg);
	free(buf);
	return r < 0 ? bm_api_fail("blockmirror_backup_verify", r) : 0;
}

/* ---- pruning: a synthetic full point --------------------------------- */

/* Write point `p` (read through its chain) as a standalone image at
 * `tmp`, checking every granule against its digests on the way. */
static int
flatten(const char *dir, const struct point *p, const struct bm_digest *dg,
	const char *tmp, struct blockmirror_backup_prune_result *res)
{
	char path[PATH_MAX], opts[64];
	struct blockmirror_disk *src, *dst = NULL;
	struct bm_digest zero;
	uint8_t *buf = aligned_alloc(4096, COPY_BYTES);
	int r;

	if (!buf)
		return bm_error(-ENOMEM, "out of memory");
	memset(buf, 0, p->granularity);
	bm_hash_buffer(buf, p->granularity, &zero);
	point_file(path, sizeof path, dir, p->number, "qcow2");
	src = blockmirror_disk_open(path, BLOCKMIRROR_FORMAT_QCOW2,
				    BLOCKMIRROR_DISK_READONLY);
	if (!src) {
		free(buf);
		return -errno;
	}
	snprintf(opts, sizeof opts, "cluster_size=%" PRIu64,
		 BM_MIN(BM_MAX(p->granularity, 64 * BM_KiB), 2048 * BM_KiB));
	r = blockmirror_image_create(tmp, BLOCKMIRROR_FORMAT_QCOW2,
				     p->disk_size, opts, true);
	if (r == 0 && !(dst = blockmirror_disk_open(tmp,
						    BLOCKMIRROR_FORMAT_QCOW2,
						    0)))
		r = -errno;
	for (uint64_t off = 0; r == 0 && off < p->disk_size;
	     off += p->granularity) {
		uint64_t k = off / p->granularity;
		uint64_t len = BM_MIN(p->granularity, p->disk_size - off);
		struct bm_digest d;

		/* Zero granules stay holes and need no reading. */
		if (!memcmp(&dg[k], &zero, sizeof zero) &&
		    len == p->granularity)
			continue;
		r = blockmirror_disk_read(src, buf, len, off);
		if (r < 0)
			break;
		res->bytes_read += len;
		bm_hash_buffer(buf, len, &d);
		if (memcmp(&d, &dg[k], sizeof d))
			r = bm_error(-EBADMSG, "point %04u is damaged at %"
				     PRIu64 "; not pruning", p->number, off);
		else if (!bm_is_zero(buf, len))
			r = blockmirror_disk_write(dst, buf, len, off, 0);
	}
	if (r == 0)
		r = blockmirror_disk_flush(dst);
	if (dst) {
		char msg[512];
		int cr;

		snprintf(msg, sizeof msg, "%s", blockmirror_last_error());
		cr = blockmirror_disk_close(dst);
		if (r == 0)
			r = cr;
		else
			bm_error(r, "%s", msg);
	}
	{
		char msg[512];

		snprintf(msg, sizeof msg, "%s", blockmirror_last_error());
		blockmirror_disk_close(src);
		if (r < 0)
			bm_error(r, "%s", msg);
	}
	free(buf);
	return r;
}

static void
remove_point(const char *dir, unsigned n)
{
	char path[PATH_MAX];

	/* The manifest first: without it the rest is no point. */
	point_file(path, sizeof path, dir, n, "json");
	bm_durable_unlink(path);
	point_file(path, sizeof path, dir, n, "qcow2");
	unlink(path);
	point_file(path, sizeof path, dir, n, "digests");
	unlink(path);
}

BM_EXPORT int
blockmirror_backup_prune(const char *dir, unsigned keep,
			 struct blockmirror_backup_prune_result *res)
{
	struct bm_digest *dg = NULL;
	char tmp[PATH_MAX], path[PATH_MAX];
	struct point p;
	unsigned first, last, k;
	uint64_t n;
	int r;

	bm_error_clear();
	if (!dir || !keep || !res)
		return bm_api_fail("blockmirror_backup_prune",
				   bm_error(-EINVAL, "bad arguments (keep at "
					    "least one point)"));
	memset(res, 0, sizeof *res);
	r = chain_range(dir, &first, &last);
	if (r < 0 || last - first + 1 <= keep || !last) {
		res->first = first;
		return r < 0 ? bm_api_fail("blockmirror_backup_prune", r) : 0;
	}
	k = last - keep + 1;
	r = manifest_read(dir, k, &p);
	if (r == 0 && p.incremental) {
		r = digests_read(dir, &p, &dg, &n);
		point_file(tmp, sizeof tmp, dir, k, "qcow2.new");
		point_file(path, sizeof path, dir, k, "qcow2");
		if (r == 0)
			r = flatten(dir, &p, dg, tmp, res);
		if (r == 0)
			r = bm_durable_rename(tmp, path, NULL);
		/* The image reads the same with or without its backing
		 * file, so a crash here leaves a valid chain. */
		p.incremental = false;
		if (r == 0)
			r = manifest_write(dir, &p, NULL);
		if (r < 0)
			unlink(tmp);
		res->merged = r == 0;
	}
	for (unsigned j = first; r == 0 && j < k; j++) {
		remove_point(dir, j);
		res->removed++;
	}
	res->first = r == 0 ? k : first;
	free(dg);
	return r < 0 ? bm_api_fail("blockmirror_backup_prune", r) : 0;
}

/* ---- listing --------------------------------------------------------- */

BM_EXPORT int
blockmirror_backup_list(const char *dir, struct blockmirror_backup_point **out,
			size_t *count)
{
	struct blockmirror_backup_point *v = NULL;
	unsigned first, last;
	int r;

	bm_error_clear();
	if (!dir || !out || !count)
		return bm_api_fail("blockmirror_backup_list",
				   bm_error(-EINVAL, "bad arguments"));
	r = chain_range(dir, &first, &last);
	if (r == 0 && last && !(v = calloc(last - first + 1, sizeof *v)))
		r = bm_error(-ENOMEM, "out of memory");
	for (unsigned k = first; r == 0 && last && k <= last; k++) {
		struct blockmirror_backup_point *e = &v[k - first];
		struct point p;
		struct stat st;

		r = manifest_read(dir, k, &p);
		if (r < 0)
			break;
		e->number = k;
		e->incremental = p.incremental;
		e->application_consistent = p.application;
		e->instant = p.instant;
		point_file(e->file, sizeof e->file, dir, k, "qcow2");
		if (stat(e->file, &st) == 0)
			e->bytes_written = (uint64_t)st.st_blocks * 512;
		snprintf(e->checkpoint, sizeof e->checkpoint, "%s",
			 p.checkpoint);
	}
	if (r < 0) {
		free(v);
		return bm_api_fail("blockmirror_backup_list", r);
	}
	*out = v;
	*count = last ? last - first + 1 : 0;
	return 0;
}
