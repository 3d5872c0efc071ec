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
 * dies half way leaves nothing a restore could take for a point.  (A
 * directory the backup creates is made durably first, or a power loss
 * could take it, and every point in it, along.)  The disk is flushed
 * before the manifest too: what the point holds of it must not be lost
 * from the disk once the point exists, since the record since the
 * point's checkpoint would not say so.
 *
 * A backup takes a snapshot (snapshot.c) and reads its view, never the
 * moving disk: the point is the disk at the snapshot's instant.  With
 * change tracking on (checkpoint.c), the snapshot creates checkpoint
 * "bm-CHAIN-NNNN" at that instant (CHAIN: the chain's id, drawn at its
 * full point), and an incremental point copies exactly the granules the
 * record says changed since the previous point's checkpoint.  Without a
 * record to trust, an incremental point heals: it reads the snapshot's
 * data and writes the granules whose digests differ from the previous
 * point's.  After a successful point the previous checkpoint is removed
 * (its record merges into the one before), and any older one of the
 * chain a crash left before that removal; after a failed one the new
 * checkpoint is, and a backup that died is cleaned up by the next (its
 * files without a manifest, its checkpoint, which DIR/NNNN.checkpoint
 * names from before the instant until the point exists), so the next
 * incremental still covers everything since the last point that exists.
 *
 * With an NBD target the point's data goes into an export instead of
 * NNNN.qcow2, and DIR holds only the catalogue (manifests, digests): a
 * full point writes the whole disk there (zeroes where the export does
 * not already read as zeroes), an incremental one exactly the granules
 * that changed, so the export holds the newest point and an older NBD
 * point's data is superseded.  An incremental point first reads a
 * sample of granules from the export and checks them against the
 * previous point's digests: any URI may name the same storage, and one
 * that does not hold the previous point is refused before a write.
 * Everything else (numbering, the manifest last, checkpoints, leftovers)
 * is as for a directory, but for one mark: DIR/NNNN.writing is made
 * before point NNNN's first write into an export when point NNNN-1 is in
 * an export, and removed once the point exists.  Left behind, it says
 * that a point that failed wrote part of itself over the newest point
 * there, so list, verify and restore say so, and a backup that heals by
 * digests (which trusts the export to hold the previous point) writes
 * every granule instead.
 *
 * Each step is reported to the caller's event callback, from the
 * caller's thread; a backup that began (STARTED) ends with exactly one
 * of COMPLETED, FAILED, CANCELLED; one refused before it began sends
 * FAILED alone.
 *
 * One backup or prune at a time per directory (a lock file in it).
 * Everything here runs on the caller's thread and uses the disk only
 * through the public calls, which post to its loop.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <limits.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
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
#include "nbd.h"
#include "snapshot.h"

#define COPY_BYTES (1024 * BM_KiB)
#define FULL_GRANULARITY (64 * BM_KiB)
#define MIN_GRANULARITY (4 * BM_KiB)
#define MAX_GRANULARITY (64 * 1024 * BM_KiB)
#define MAX_POINTS 99999999u
#define LOCK_FILE ".bmirror-backup.lock"

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
	char target[4096];         /* the NBD URI holding the data, or "" */
};

static void
point_file(char *out, size_t len, const char *dir, unsigned n,
	   const char *ext)
{
	snprintf(out, len, "%s/%04u.%s", dir, n, ext);
}

/* Where a point's data is: its export, or DIR/NNNN.qcow2. */
static void
point_data(char *out, size_t len, const char *dir, const struct point *p)
{
	if (p->target[0])
		snprintf(out, len, "%s", p->target);
	else
		point_file(out, len, dir, p->number, "qcow2");
}

static enum blockmirror_format
point_format(const struct point *p)
{
	return p->target[0] ? BLOCKMIRROR_FORMAT_RAW : BLOCKMIRROR_FORMAT_QCOW2;
}

/* ---- events ---------------------------------------------------------- */

static const char *const event_names[] = {
	[BLOCKMIRROR_BACKUP_STARTED] = "BACKUP_STARTED",
	[BLOCKMIRROR_BACKUP_LEFTOVERS_CLEANED] = "LEFTOVERS_CLEANED",
	[BLOCKMIRROR_BACKUP_FREEZE_BEGUN] = "FREEZE_BEGUN",
	[BLOCKMIRROR_BACKUP_FROZEN] = "FROZEN",
	[BLOCKMIRROR_BACKUP_FREEZE_FAILED] = "FREEZE_FAILED",
	[BLOCKMIRROR_BACKUP_SNAPSHOT_TAKEN] = "SNAPSHOT_TAKEN",
	[BLOCKMIRROR_BACKUP_THAWED] = "THAWED",
	[BLOCKMIRROR_BACKUP_CHECKPOINT_CREATED] = "CHECKPOINT_CREATED",
	[BLOCKMIRROR_BACKUP_PROGRESS] = "BACKUP_PROGRESS",
	[BLOCKMIRROR_BACKUP_DATA_FLUSHED] = "DATA_FLUSHED",
	[BLOCKMIRROR_BACKUP_DIGESTS_WRITTEN] = "DIGESTS_WRITTEN",
	[BLOCKMIRROR_BACKUP_POINT_COMMITTED] = "POINT_COMMITTED",
	[BLOCKMIRROR_BACKUP_CHECKPOINT_REMOVED] = "CHECKPOINT_REMOVED",
	[BLOCKMIRROR_BACKUP_COMPLETED] = "BACKUP_COMPLETED",
	[BLOCKMIRROR_BACKUP_FAILED] = "BACKUP_FAILED",
	[BLOCKMIRROR_BACKUP_CANCELLED] = "BACKUP_CANCELLED",
	[BLOCKMIRROR_BACKUP_POINT_VERIFIED] = "POINT_VERIFIED",
	[BLOCKMIRROR_BACKUP_POINT_SUPERSEDED] = "POINT_SUPERSEDED",
	[BLOCKMIRROR_BACKUP_LIVE_VERIFIED] = "LIVE_VERIFIED",
	[BLOCKMIRROR_BACKUP_POINT_RESTORED] = "POINT_RESTORED",
	[BLOCKMIRROR_BACKUP_POINT_MERGED] = "POINT_MERGED",
	[BLOCKMIRROR_BACKUP_POINT_REMOVED] = "POINT_REMOVED",
};

BM_EXPORT const char *
blockmirror_backup_event_name(enum blockmirror_backup_event_type type)
{
	const char *name = BM_NAME_OF(event_names, type);

	return name ? name : "UNKNOWN";
}

/* Where events go: the callback and its data (fn may be NULL). */
struct events {
	blockmirror_backup_event_fn fn;
	void *data;
};

/* Send `ev`; the callback may make public calls, which clear this
 * thread's error message: it is kept across. */
static void
event_send(const struct events *e, const struct blockmirror_backup_event *ev)
{
	char msg[1024];
	int err = blockmirror_last_errno(), saved = errno;

	if (!e->fn)
		return;
	snprintf(msg, sizeof msg, "%s", blockmirror_last_error() ?
		 blockmirror_last_error() : "");
	e->fn(e->data, ev);
	if (msg[0])
		bm_error(-err, "%s", msg);
	else
		bm_error_clear();
	errno = saved;
}

/* A step with no field but the point and a name. */
static void
event_step(const struct events *e, enum blockmirror_backup_event_type type,
	   unsigned point, const char *name)
{
	struct blockmirror_backup_event ev = {
		.type = type, .point = point, .name = name,
	};

	event_send(e, &ev);
}

/* The last error without the name of the public call that raised it:
 * this file's messages wrap those of the calls it makes. */
static const char *
inner_error(void)
{
	const char *m = blockmirror_last_error(), *c;

	if (!m)
		return "";
	if (!strncmp(m, "blockmirror_", 12) && (c = strstr(m, ": ")) &&
	    !memchr(m, ' ', (size_t)(c - m)))
		return c + 2;
	return m;
}

/* Keep the first error's message across the public calls that clean up
 * (each clears the message). */
static int
close_keeping_error(struct blockmirror_disk *disk, int r)
{
	char msg[512];
	int cr;

	if (!disk)
		return r;
	snprintf(msg, sizeof msg, "%s", inner_error());
	cr = blockmirror_disk_close(disk);
	if (r < 0)
		return bm_error(r, "%s", msg);
	return cr;
}

/* ---- manifests ------------------------------------------------------- */

static int
manifest_read(const char *dir, unsigned n, struct point *p)
{
	char path[PATH_MAX], want[80];
	json_error_t jerr;
	json_t *m, *v;
	const char *s;
	json_int_t size, g, num;
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
	size = json_integer_value(json_object_get(m, "disk_size"));
	g = json_integer_value(json_object_get(m, "granularity"));
	num = json_integer_value(json_object_get(m, "point"));
	v = json_object_get(m, "checkpoint");
	if (json_is_string(v))
		snprintf(p->checkpoint, sizeof p->checkpoint, "%s",
			 json_string_value(v));
	v = json_object_get(m, "chain");
	if (json_is_string(v))
		snprintf(p->chain, sizeof p->chain, "%s", json_string_value(v));
	v = json_object_get(m, "target");
	if (json_is_null(v))
		v = NULL;
	if (v && (!json_is_string(v) ||
		  strlen(json_string_value(v)) >= sizeof p->target ||
		  !bm_nbd_is_uri(json_string_value(v))))
		r = bm_error(-EBADMSG, "%s: \"target\" is not an NBD URI", path);
	else if (v)
		snprintf(p->target, sizeof p->target, "%s",
			 json_string_value(v));
	s = json_string_value(json_object_get(m, "digests_xxh128"));
	if (r == 0 && (json_integer_value(json_object_get(m, "version")) != 1 ||
	    num != (json_int_t)n || size <= 0 || g < (json_int_t)MIN_GRANULARITY ||
	    g > (json_int_t)MAX_GRANULARITY || g & (g - 1) || !s ||
	    strlen(s) != 32))
		r = bm_error(-EBADMSG, "%s: a field is missing or out of range "
			     "(version, point, disk_size, granularity, "
			     "digests_xxh128)", path);
	p->disk_size = (uint64_t)size;
	p->granularity = (uint64_t)g;
	/* Only our own checkpoint: a backup removes it later, and verify
	 * trusts the record since it. */
	snprintf(want, sizeof want, "bm-%s-%04u", p->chain, n);
	if (r == 0 && p->checkpoint[0] &&
	    (strlen(p->chain) != 12 || strcmp(p->checkpoint, want)))
		r = bm_error(-EBADMSG, "%s: names checkpoint \"%.80s\", not "
			     "its own", path, p->checkpoint);
	for (int i = 0; r == 0 && i < 16; i++) {
		unsigned b;

		if (sscanf(s + 2 * i, "%2x", &b) != 1)
			r = bm_error(-EBADMSG, "%s: digests_xxh128 is not hex",
				     path);
		p->digests_digest.bytes[i] = (uint8_t)b;
	}
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
	m = json_pack("{s:i, s:i, s:s, s:b, s:I, s:I, s:I, s:s?, s:s?, s:s?, "
		      "s:s, s:s}",
		      "version", 1, "point", (int)p->number, "chain", p->chain,
		      "incremental", p->incremental,
		      "instant", (json_int_t)p->instant,
		      "disk_size", (json_int_t)p->disk_size,
		      "granularity", (json_int_t)p->granularity,
		      "checkpoint", p->checkpoint[0] ? p->checkpoint : NULL,
		      "backing", backing,
		      "target", p->target[0] ? p->target : NULL,
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

/* Granules of a point's disk. */
static uint64_t
granules(const struct point *p)
{
	return (p->disk_size + p->granularity - 1) / p->granularity;
}

/* The digests of a point, checked against its manifest. */
static int
digests_read(const char *dir, const struct point *p, struct bm_digest **out,
	     uint64_t *count)
{
	uint64_t n = granules(p), len = n * sizeof (struct bm_digest);
	char path[PATH_MAX];
	struct bm_digest d, *v;
	struct stat st;
	uint64_t got = 0;
	int fd, r = 0;

	point_file(path, sizeof path, dir, p->number, "digests");
	fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	if (fd < 0)
		return bm_error(-errno, "%s: %s", path, strerror(errno));
	if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) ||
	    (uint64_t)st.st_size != len) {
		close(fd);
		return bm_error(-EBADMSG, "%s: is not %" PRIu64 " bytes of "
				"digests", path, len);
	}
	v = malloc(len ? len : 1);
	if (!v) {
		close(fd);
		return bm_error(-ENOMEM, "%s: out of memory for %" PRIu64
				" bytes of digests", path, len);
	}
	while (r == 0 && got < len) {
		ssize_t k = pread(fd, (char *)v + got, len - got, (off_t)got);

		if (k < 0 && errno == EINTR)
			continue;
		if (k <= 0)
			r = bm_error(k < 0 ? -errno : -EBADMSG, "%s: %s", path,
				     k < 0 ? strerror(errno) : "short");
		else
			got += (uint64_t)k;
	}
	close(fd);
	if (r == 0) {
		bm_hash_buffer(v, len, &d);
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

/* Is `name` NNNN.json (4 to 8 digits, as point_file writes it)? */
static unsigned
point_number(const char *name)
{
	size_t len = strlen(name);
	unsigned n = 0;

	if (len < 9 || len > 13 || strcmp(name + len - 5, ".json"))
		return 0;
	for (size_t i = 0; i < len - 5; i++) {
		if (name[i] < '0' || name[i] > '9')
			return 0;
		n = n * 10 + (unsigned)(name[i] - '0');
	}
	/* No leading zero beyond the four digits of %04u. */
	if (len > 9 && name[0] == '0')
		return 0;
	return n;
}

/*
 * The newest chain of `dir`: points first..last (0..0: none), numbers
 * without a gap, `first` a full point.  Points below a gap under a full
 * point are an older chain (a prune stopped half way): `older` says so,
 * and prune removes them.  A gap under an incremental point breaks the
 * chain.
 */
static int
chain_range_older(const char *dir, unsigned *first, unsigned *last,
		  unsigned *older)
{
	unsigned hi = 0, lo, count = 0, below = 0;
	struct dirent *e;
	unsigned *nums = NULL;
	size_t cap = 0;
	DIR *d = opendir(dir);
	int r = 0;

	*first = *last = 0;
	if (older)
		*older = 0;
	if (!d) {
		if (errno == ENOENT)
			return 0;
		return bm_error(-errno, "%s: %s", dir, strerror(errno));
	}
	while ((e = readdir(d))) {
		unsigned n = point_number(e->d_name);

		if (!n)
			continue;
		if (count == cap) {
			unsigned *v = realloc(nums, (cap = cap ? 2 * cap : 64) *
					      sizeof *nums);

			if (!v) {
				r = bm_error(-ENOMEM, "out of memory");
				break;
			}
			nums = v;
		}
		nums[count++] = n;
		hi = BM_MAX(hi, n);
	}
	closedir(d);
	if (r < 0 || !count) {
		free(nums);
		return r;
	}
	/* Down from the newest while the numbers run on. */
	for (lo = hi; lo > 1; lo--) {
		bool have = false;

		for (unsigned i = 0; i < count && !have; i++)
			have = nums[i] == lo - 1;
		if (!have)
			break;
	}
	for (unsigned i = 0; i < count; i++)
		below += nums[i] < lo;
	free(nums);
	if (below) {
		struct point p;

		r = manifest_read(dir, lo, &p);
		if (r == 0 && p.incremental)
			return bm_error(-EBADMSG, "%s: point %04u is missing "
					"but older points exist; the chain is "
					"broken", dir, lo - 1);
		if (r < 0)
			return r;
	}
	*first = lo;
	*last = hi;
	if (older)
		*older = below;
	return 0;
}

static int
chain_range(const char *dir, unsigned *first, unsigned *last)
{
	return chain_range_older(dir, first, last, NULL);
}

static int
newest_point(const char *dir, unsigned *out)
{
	unsigned first;

	return chain_range(dir, &first, out);
}

/*
 * One backup or prune at a time in a directory: an exclusive lock on a
 * file in it, held until the descriptor is closed.  -EBUSY names the
 * directory.
 */
static int
lock_dir(const char *dir, bool exclusive)
{
	char path[PATH_MAX];
	int fd;

	snprintf(path, sizeof path, "%s/" LOCK_FILE, dir);
	fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0644);
	if (fd < 0)
		return bm_error(-errno, "%s: %s", path, strerror(errno));
	if (flock(fd, (exclusive ? LOCK_EX : LOCK_SH) | LOCK_NB) < 0) {
		int err = errno;

		close(fd);
		return bm_error(err == EWOULDBLOCK ? -EBUSY : -err, "%s: %s",
				dir, err == EWOULDBLOCK ? "another backup or "
				"prune is running there" : strerror(err));
	}
	return fd;
}

/* Files a backup that died left for point n (no manifest: no point);
 * how many there were. */
static unsigned
clean_leftovers(const char *dir, unsigned n)
{
	static const char *const ext[] = { "qcow2", "digests", "qcow2.new" };
	char path[PATH_MAX];
	unsigned removed = 0;

	point_file(path, sizeof path, dir, n, "json");
	if (access(path, F_OK) == 0)
		return 0;
	for (size_t i = 0; i < sizeof ext / sizeof ext[0]; i++) {
		point_file(path, sizeof path, dir, n, ext[i]);
		removed += unlink(path) == 0;
	}
	return removed;
}

/*
 * DIR/NNNN.checkpoint names the checkpoint point NNNN's backup creates at
 * its instant; it is written durably before the snapshot is taken and
 * removed once the point exists or its backup has removed the checkpoint
 * again.  A backup that died in between leaves it, and the next backup
 * removes the checkpoint it names: for a full point no manifest names
 * the new chain, so nothing else could find it.  What it says is only
 * used when point NNNN has no manifest.
 */
static int
checkpoint_mark_write(const char *dir, unsigned n, const char *cp)
{
	char path[PATH_MAX];

	point_file(path, sizeof path, dir, n, "checkpoint");
	return bm_durable_write_file(path, cp, strlen(cp), 0644);
}

static void
checkpoint_mark_remove(const char *dir, unsigned n)
{
	char path[PATH_MAX];

	point_file(path, sizeof path, dir, n, "checkpoint");
	unlink(path);
}

/* The checkpoint a backup of point n that died left, from its mark:
 * removed (merging its record into the one before).  Whether one was. */
static bool
remove_dead_checkpoint(struct blockmirror_disk *disk, const char *dir,
		       unsigned n)
{
	char path[PATH_MAX], name[80] = "";
	ssize_t len;
	bool removed = false;
	int fd;

	point_file(path, sizeof path, dir, n, "json");
	if (access(path, F_OK) == 0)
		return false;
	point_file(path, sizeof path, dir, n, "checkpoint");
	fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	if (fd < 0)
		return false;
	len = read(fd, name, sizeof name - 1);
	close(fd);
	name[len > 0 ? len : 0] = '\0';
	/* Only what a backup names: a mark cannot remove others. */
	if (!strncmp(name, "bm-", 3) &&
	    blockmirror_checkpoint_remove(disk, name) == 0) {
		bm_warn("%s: removed checkpoint %s, left by a backup that did "
			"not finish", dir, name);
		removed = true;
	}
	bm_error_clear();
	unlink(path);
	return removed;
}

/*
 * Has a point numbered `next` that failed written part of itself into
 * the export of point `p` (its mark is there)?  -EBADMSG saying so.
 */
static int
check_export_whole(const char *dir, const struct point *p, unsigned next)
{
	char mark[PATH_MAX], uri[4096] = "";
	ssize_t n;
	int fd;

	point_file(mark, sizeof mark, dir, next, "writing");
	if (!p->target[0])
		return 0;
	fd = open(mark, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	if (fd < 0)
		return 0;
	/* What the failed point wrote to (the same storage, perhaps by
	 * another name). */
	n = read(fd, uri, sizeof uri - 1);
	uri[n > 0 ? n : 0] = '\0';
	close(fd);
	return bm_error(-EBADMSG, "point %04u: its export %s was partly "
			"overwritten by a backup that failed (point %04u, "
			"into %s); the next point into it makes it whole "
			"again", p->number, p->target, next,
			uri[0] ? uri : "the same export");
}

/* Remove a checkpoint the new point `p` no longer needs; one already
 * gone is fine, any other failure only a warning (the point exists). */
static void
remove_checkpoint(struct blockmirror_disk *disk, const char *dir,
		  const struct point *p, const char *name,
		  const struct events *ev)
{
	if (blockmirror_checkpoint_remove(disk, name) == 0)
		event_step(ev, BLOCKMIRROR_BACKUP_CHECKPOINT_REMOVED, p->number,
			   name);
	else if (blockmirror_last_errno() != ENOENT)
		bm_warn("%s: checkpoint %s could not be removed: %s", dir,
			name, inner_error());
}

/*
 * Point p exists: the checkpoints of its chain older than its own are of
 * no use.  The previous point's goes every time; older ones are there
 * when a crash came between a manifest and that removal.  Removing
 * merges each record into the one before, so no other checkpoint's
 * record changes.
 */
static void
remove_older_checkpoints(struct blockmirror_disk *disk, const char *dir,
			 const struct point *p, const struct events *ev)
{
	struct blockmirror_checkpoint *l = NULL;
	char prefix[32];
	size_t n = 0, len;

	len = (size_t)snprintf(prefix, sizeof prefix, "bm-%s-", p->chain);
	if (blockmirror_checkpoint_list(disk, &l, &n) < 0)
		return;
	for (size_t i = 0; i < n; i++) {
		char *end = l[i].name;
		unsigned long k = strncmp(l[i].name, prefix, len) ? 0
				  : strtoul(l[i].name + len, &end, 10);

		if (!k || k >= p->number || *end)
			continue;
		remove_checkpoint(disk, dir, p, l[i].name, ev);
	}
	free(l);
}

/* ---- taking a point -------------------------------------------------- */

static void
extents_done(void *user_data, int err)
{
	bm_waiter_signal(user_data, err);
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
	uint64_t chunk;                    /* bytes per read: whole granules */
	const char *file;                  /* the point's image, for messages */
	uint8_t *buf;                      /* chunk bytes */
	bool incremental;
	bool nbd;                          /* the target is an export */
	const struct events *ev;
	bool heal;                         /* write only what differs from
					      the previous point's digests */
	bool drop;                         /* a CHANGED_ONLY snapshot: let
					      go of what is read */
	uint64_t dropped_to;               /* bm_snapshot_drop_behind's */
	struct blockmirror_backup_point *res;
};

/* The digest of granule k all zeroes (the last one may be short). */
static const struct bm_digest *
zero_of(const struct run *run, uint64_t k)
{
	return (k + 1) * run->g > run->size ? &run->zero_tail
					    : &run->zero_digest;
}

/* Random draws for samples: seeded from the clock and the process, so
 * that each run draws others (xorshift64; never 0). */
static uint64_t
sample_seed(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return ((uint64_t)ts.tv_sec << 30 ^ (uint64_t)ts.tv_nsec ^
		(uint64_t)getpid() << 48) | 1;
}

static uint64_t
sample_next(uint64_t *rng)
{
	*rng ^= *rng << 13;
	*rng ^= *rng >> 7;
	*rng ^= *rng << 17;
	return *rng;
}

/*
 * An incremental point into an export writes only what changed: the
 * export must hold the previous point `prev` already (any URI may name
 * the same storage, so the name proves nothing).  Granules drawn at
 * random, those with data first, are read from the export and compared
 * with prev's digests (run->digests, granularity run->g): -ESTALE at the
 * first that differs, so a point is never built on another disk's data.
 */
#define EXPORT_SAMPLES 16

static int
check_export_holds(struct run *run, const struct point *prev)
{
	uint64_t n = granules(prev), rng = sample_seed(), picked = 0;

	for (unsigned tries = 0; tries < 64 * EXPORT_SAMPLES &&
	     picked < EXPORT_SAMPLES; tries++) {
		uint64_t k, off, len;
		struct bm_digest d;
		int r;

		k = sample_next(&rng) % n;
		/* Zero granules prove little against a blank export: only
		 * the last tries take them. */
		if (tries < 48 * EXPORT_SAMPLES &&
		    !memcmp(&run->digests[k], zero_of(run, k), sizeof d))
			continue;
		off = k * run->g;
		len = BM_MIN(run->g, run->size - off);
		r = blockmirror_disk_read(run->target, run->buf, len, off);
		if (r < 0)
			return bm_error(r, "%s: reading it: %s", run->file,
					inner_error());
		bm_hash_buffer(run->buf, len, &d);
		if (memcmp(&d, &run->digests[k], sizeof d))
			return bm_error(-ESTALE, "%s does not hold point %04u "
					"(at %" PRIu64 " it differs from the "
					"point's digest), and an incremental "
					"point writes only what changed since "
					"it: take a full point", run->file,
					prev->number, off);
		picked++;
	}
	return 0;
}

/* Copy [off, off + len) (granule-aligned, at most run->chunk) from the
 * view to the point, digesting every granule. */
static int
copy_range(struct run *run, uint64_t off, uint64_t len)
{
	int r;

	if (run->o->cancelled && run->o->cancelled(run->o->user_data))
		return bm_error(-ECANCELED, "the backup was cancelled");
	r = blockmirror_snapshot_read(run->snap, run->buf, len, off);
	/* Read once, in ascending order: the guest's next writes there
	 * need no copy. */
	if (r == 0 && run->drop)
		r = bm_snapshot_drop_behind(run->snap, &run->dropped_to,
					    off + len);
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
			/* Over a backing point or an export that held data,
			 * zeroes must be said. */
			if (run->incremental || run->nbd)
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
			return bm_error(r, "%s: %s", run->file, inner_error());
	}
	run->done = BM_MIN(run->done + len, run->total);
	if (run->o->progress)
		run->o->progress(run->o->user_data, run->done, run->total);
	{
		struct blockmirror_backup_event ev = {
			.type = BLOCKMIRROR_BACKUP_PROGRESS,
			.done = run->done, .total = run->total,
		};

		event_send(run->ev, &ev);
	}
	return 0;
}

/* A full point into an export: [off, end) holds no data in the view, so
 * the export must read zeroes there; written where it does not already
 * (its block status says so). */
static int
zero_target(struct run *run, uint64_t off, uint64_t end)
{
	struct bm_extent_list l = { 0 };
	struct bm_waiter w;
	int r = 0;

	while (r == 0 && off < end) {
		bm_extent_list_reset(&l);
		bm_waiter_init(&w);
		r = bm_disk_aio_block_status(run->target, end - off, off, &l,
					     extents_done, &w);
		if (r == 0)
			r = bm_disk_wait(run->target, &w);
		bm_waiter_destroy(&w);
		for (size_t i = 0; r == 0 && i < l.len && off < end; i++) {
			uint64_t n = BM_MIN(l.v[i].length, end - off);

			if (!(l.v[i].flags & BM_EXTENT_ZERO))
				r = blockmirror_disk_write_zeroes(run->target,
								  n, off, 0);
			off += n;
		}
		if (r == 0 && !l.len) {
			/* Nothing said: zero the rest. */
			r = blockmirror_disk_write_zeroes(run->target,
							  end - off, off, 0);
			off = end;
		}
	}
	bm_extent_list_free(&l);
	if (r < 0)
		return bm_error(r, "%s: %s", run->file, inner_error());
	return 0;
}

/* Healing: the granules of [off, end) hold no data now; those that held
 * data in the previous point are written as zeroes. */
static int
heal_zeroes(struct run *run, uint64_t off, uint64_t end)
{
	int r = 0;

	for (; r == 0 && off < end; off += run->g) {
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
 * A full point: every granule the view holds data in (a data extent
 * touches it).  Healing (an incremental point without a change record to
 * trust): the same reads, but only granules whose digest differs from
 * the previous point's are written, and the granules between data
 * extents, which hold no data at all, are zeroes.
 */
static int
copy_full(struct run *run)
{
	struct bm_extent_list l = { 0 };
	uint64_t copied = 0;  /* granules below are done */
	int r = 0;

	run->total = run->size;
	for (uint64_t k = 0; !run->heal && k * run->g < run->size; k++)
		run->digests[k] = *zero_of(run, k);
	for (uint64_t pos = 0; r == 0 && pos < run->size;) {
		uint64_t step = BM_MIN(run->size - pos, 1024 * COPY_BYTES);

		bm_extent_list_reset(&l);
		r = bm_snapshot_extents(run->disk, run->snap, pos, step, &l);
		for (size_t i = 0; r == 0 && i < l.len; i++) {
			uint64_t s = BM_MAX(bm_round_down(l.v[i].offset,
							  run->g), copied);
			uint64_t e = BM_MIN(bm_round_up(l.v[i].offset +
							l.v[i].length, run->g),
					    run->size);

			if (l.v[i].flags & (BM_EXTENT_HOLE | BM_EXTENT_ZERO)) {
				run->done = BM_MIN(run->done + l.v[i].length,
						   run->total);
				if (run->nbd && !run->heal)
					r = zero_target(run, BM_MAX(
						l.v[i].offset, copied),
						BM_MIN(l.v[i].offset +
						       l.v[i].length,
						       run->size));
				continue;
			}
			if (run->heal)
				r = heal_zeroes(run, copied, s);
			for (; r == 0 && s < e; s += run->chunk)
				r = copy_range(run, s, BM_MIN(run->chunk,
							      e - s));
			copied = BM_MAX(copied, e);
		}
		if (r == 0 && !l.len)
			r = bm_error(-EIO, "the snapshot reported nothing at "
				     "%" PRIu64, pos);
		if (r == 0)
			pos = BM_MAX(bm_extent_list_end(&l), pos + 1);
	}
	if (r == 0 && run->heal)
		r = heal_zeroes(run, copied, run->size);
	bm_extent_list_free(&l);
	return r;
}

/* An incremental point: the granules changed since the previous one. */
static int
copy_changed(struct run *run, const uint64_t *words, uint64_t nbits,
	     uint64_t changed_bytes)
{
	uint64_t per = run->chunk / run->g;
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

/* The caller's options into `out`, the fields its size leaves out
 * zero. */
static int
check_options(const struct blockmirror_backup_options *o,
	      struct blockmirror_backup_options *out)
{
	memset(out, 0, sizeof *out);
	if (!BM_SIZE_COVERS(o, struct blockmirror_backup_options, cancelled))
		return bm_error(-EINVAL, "no options, or options of a bad "
				"size");
	memcpy(out, o, BM_MIN(o->size, sizeof *out));
	out->size = sizeof *out;
	if (!out->dir || !*out->dir)
		return bm_error(-EINVAL, "no backup directory");
	if (out->target && !bm_nbd_is_uri(out->target))
		return bm_error(-EINVAL, "%s: a backup target must be an NBD "
				"URI (nbd://, nbds://, nbd+unix://); a "
				"directory goes in dir", out->target);
	if (out->target &&
	    strlen(out->target) >= sizeof ((struct point *)0)->target)
		return bm_error(-ENAMETOOLONG, "the target URI is too long");
	return 0;
}

/* The end of a backup that began: FAILED or CANCELLED, and its errno. */
static int
backup_end(const struct events *e, unsigned point, int r)
{
	struct blockmirror_backup_event ev = {
		.type = r == -ECANCELED ? BLOCKMIRROR_BACKUP_CANCELLED
					: BLOCKMIRROR_BACKUP_FAILED,
		.point = point, .err = -r, .message = inner_error(),
	};

	event_send(e, &ev);
	return bm_api_fail("blockmirror_backup", r);
}

BM_EXPORT int
blockmirror_backup(struct blockmirror_disk *disk,
		   const struct blockmirror_backup_options *caller,
		   struct blockmirror_backup_point *res)
{
	struct blockmirror_backup_options opts;
	const struct blockmirror_backup_options *o = &opts;
	struct events ev = { 0 };
	struct blockmirror_snapshot_options so = { .size = sizeof so };
	struct blockmirror_snapshot_info info;
	struct blockmirror_checkpoint *list = NULL;
	struct point prev = { 0 }, p = { 0 };
	struct run run = { .disk = disk, .o = o, .res = res, .ev = &ev };
	char cp[80], data[PATH_MAX] = "", dig[PATH_MAX] = "", backing[32];
	char mark[PATH_MAX];
	bool export_dirty;
	uint64_t *words = NULL, nbits = 0, changed = 0, g = 0, ndig;
	bool tracking, created = false, heal = false, frozen;
	unsigned newest;
	size_t ncp = 0;
	int r, lock = -1;

	bm_error_clear();
	if (!disk || !res)
		return bm_api_fail("blockmirror_backup",
				   bm_error(-EINVAL, "bad arguments"));
	memset(res, 0, sizeof *res);
	r = check_options(caller, &opts);
	if (r < 0)
		return bm_api_fail("blockmirror_backup", r);
	ev.fn = o->on_event;
	ev.data = o->event_data;
	/* A new directory's name must last as long as the points in it:
	 * the parent is synced (an existing one: once more, harmless). */
	r = bm_durable_mkdir(o->dir, 0755);
	if (r == 0)
		r = lock = lock_dir(o->dir, true);
	if (r >= 0)
		r = newest_point(o->dir, &newest);
	if (r == 0 && newest == MAX_POINTS)
		r = bm_error(-ENOSPC, "%s: %u points already", o->dir,
			     MAX_POINTS);
	if (r < 0) {
		if (lock >= 0)
			close(lock);
		return backup_end(&ev, 0, r);
	}
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
		/* The data it builds on is where the previous point's is:
		 * in DIR's chain, or in an export. */
		if (r == 0 && !prev.target[0] != !o->target)
			r = bm_error(-EINVAL, "%s: point %04u's data is %s; an "
				     "incremental point goes to the same kind "
				     "of target; take a full one", o->dir,
				     newest, prev.target[0] ? "in an NBD export"
				     : "in the directory");
		if (r == 0)
			r = digests_read(o->dir, &prev, &run.digests, &ndig);
	}
	free(list);
	if (r < 0) {
		close(lock);
		free(run.digests);
		return backup_end(&ev, 0, r);
	}
	{
		struct blockmirror_backup_event e = {
			.type = BLOCKMIRROR_BACKUP_STARTED,
			.point = newest + 1, .incremental = o->incremental,
			.healing = heal,
		};

		if (o->target) {
			e.name = o->target;
		} else {
			point_file(data, sizeof data, o->dir, newest + 1,
				   "qcow2");
			e.name = data;
		}
		event_send(&ev, &e);
	}
	/* A point that failed wrote into the previous point's export. */
	point_file(mark, sizeof mark, o->dir, newest + 1, "writing");
	export_dirty = prev.target[0] && access(mark, F_OK) == 0;
	/* What a backup that died left of the next point is no point. */
	if (clean_leftovers(o->dir, newest + 1))
		event_step(&ev, BLOCKMIRROR_BACKUP_LEFTOVERS_CLEANED,
			   newest + 1, NULL);
	if (tracking && remove_dead_checkpoint(disk, o->dir, newest + 1))
		event_step(&ev, BLOCKMIRROR_BACKUP_LEFTOVERS_CLEANED,
			   newest + 1, NULL);

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
	/* A backup of this point that died left its checkpoint: removing
	 * it merges its record into the previous point's, which is whole
	 * again. */
	if (tracking && blockmirror_checkpoint_remove(disk, cp) == 0) {
		bm_warn("%s: removed checkpoint %s, left by a backup that did "
			"not finish", o->dir, cp);
		event_step(&ev, BLOCKMIRROR_BACKUP_LEFTOVERS_CLEANED, p.number,
			   cp);
	}
	bm_error_clear();
	if (tracking) {
		so.checkpoint = cp;
		so.since = o->incremental && !heal ? prev.checkpoint : NULL;
		/* An increment reads only what changed (unless the record's
		 * granularity is not the previous point's: then it heals,
		 * reading everything): the snapshot holds only that. */
		if (so.since &&
		    bm_checkpoint_granularity(disk) == prev.granularity)
			so.flags |= BLOCKMIRROR_SNAPSHOT_CHANGED_ONLY;
		r = checkpoint_mark_write(o->dir, p.number, cp);
		if (r < 0)
			goto fail;
	}
	frozen = false;
	if (o->freeze) {
		event_step(&ev, BLOCKMIRROR_BACKUP_FREEZE_BEGUN, p.number, NULL);
		frozen = o->freeze(o->user_data) == 0;
		event_step(&ev, frozen ? BLOCKMIRROR_BACKUP_FROZEN
				       : BLOCKMIRROR_BACKUP_FREEZE_FAILED,
			   p.number, NULL);
	}
	r = blockmirror_snapshot_take(&disk, 1, &so, &run.snap);
	if ((r == -ENOENT || r == -ESTALE) && so.since) {
		/* The record since the point is gone or not trusted (a
		 * failing sidecar, a removed checkpoint): heal. */
		bm_warn("%s: %s; comparing digests instead", o->dir,
			inner_error());
		heal = true;
		so.since = NULL;
		so.flags &= ~BLOCKMIRROR_SNAPSHOT_CHANGED_ONLY;
		r = blockmirror_snapshot_take(&disk, 1, &so, &run.snap);
	}
	if (r == -ESTALE && so.checkpoint) {
		/* The record takes no new checkpoint (a qcow2 image's, after
		 * a move off that image: cbt.md): the point is taken without
		 * one, and the next point heals too.  Better than no point. */
		bm_warn("%s: %s; the point is taken without a checkpoint",
			o->dir, inner_error());
		checkpoint_mark_remove(o->dir, p.number);
		tracking = false;
		so.checkpoint = NULL;
		so.since = NULL;
		so.flags &= ~BLOCKMIRROR_SNAPSHOT_CHANGED_ONLY;
		heal = o->incremental;
		r = blockmirror_snapshot_take(&disk, 1, &so, &run.snap);
	}
	if (r == 0) {
		struct blockmirror_backup_event e = {
			.type = BLOCKMIRROR_BACKUP_SNAPSHOT_TAKEN,
			.point = p.number, .healing = heal,
		};

		event_send(&ev, &e);
	}
	if (o->thaw) {
		char msg[512];

		snprintf(msg, sizeof msg, "%s", inner_error());
		o->thaw(o->user_data);
		if (r < 0)
			bm_error(r, "%s", msg);
		event_step(&ev, BLOCKMIRROR_BACKUP_THAWED, p.number, NULL);
	}
	p.application = frozen;
	if (r < 0)
		goto fail;
	created = tracking;
	if (tracking) {
		snprintf(p.checkpoint, sizeof p.checkpoint, "%s", cp);
		event_step(&ev, BLOCKMIRROR_BACKUP_CHECKPOINT_CREATED, p.number,
			   cp);
	}
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
			r = bm_error(-ENOMEM, "out of memory for the digests "
				     "of %" PRIu64 " granules",
				     (run.size + g - 1) / g);
	}
	if (r < 0)
		goto fail;
	p.granularity = run.g = g;
	run.incremental = o->incremental;
	run.heal = heal;
	run.drop = !heal && (so.flags & BLOCKMIRROR_SNAPSHOT_CHANGED_ONLY);
	run.chunk = BM_MAX(COPY_BYTES, g);
	run.buf = aligned_alloc(4096, run.chunk);
	run.zero_digest = (struct bm_digest){ { 0 } };
	if (!run.buf) {
		r = bm_error(-ENOMEM, "out of memory");
		goto fail;
	}
	memset(run.buf, 0, g);
	bm_hash_buffer(run.buf, g, &run.zero_digest);
	bm_hash_buffer(run.buf, run.size % g ? run.size % g : g, &run.zero_tail);

	/* The point's image (or the export), then its data. */
	point_file(dig, sizeof dig, o->dir, p.number, "digests");
	snprintf(backing, sizeof backing, "%04u.qcow2", newest);
	run.file = data;
	run.nbd = o->target;
	if (run.nbd) {
		snprintf(p.target, sizeof p.target, "%s", o->target);
		snprintf(data, sizeof data, "%s", o->target);
		run.target = blockmirror_disk_open(data, BLOCKMIRROR_FORMAT_RAW,
						   0);
		if (!run.target)
			r = bm_error(-errno, "%s", inner_error());
		else if (blockmirror_disk_get_size(run.target) != run.size)
			r = bm_error(-EINVAL, "%s: the export holds %" PRIu64
				     " bytes, the disk %" PRIu64, data,
				     blockmirror_disk_get_size(run.target),
				     run.size);
		else if (prev.target[0] && o->incremental && !export_dirty)
			r = check_export_holds(&run, &prev);
		if (r == 0 && prev.target[0])
			/* Only an export's newest point can be written over;
			 * any URI may name the same storage as its own. */
			r = bm_durable_write_file(mark, data, strlen(data),
						  0644);
		if (r == 0 && heal && export_dirty) {
			/* The export may differ from the previous point's
			 * digests anywhere: every granule "differs". */
			bm_warn("%s: a point that failed wrote part of itself "
				"into the export; healing writes every granule",
				o->dir);
			memset(run.digests, 0, granules(&p) *
			       sizeof *run.digests);
		}
	} else {
		char copts[128];

		snprintf(copts, sizeof copts, "cluster_size=%" PRIu64 "%s%s%s",
			 BM_MIN(BM_MAX(g, 64 * BM_KiB), 2048 * BM_KiB),
			 o->incremental ? ",backing_file=" : "",
			 o->incremental ? backing : "",
			 o->incremental ? ",backing_fmt=qcow2" : "");
		point_file(data, sizeof data, o->dir, p.number, "qcow2");
		r = blockmirror_image_create(data, BLOCKMIRROR_FORMAT_QCOW2,
					     run.size, copts, false);
		if (r == 0) {
			run.target = blockmirror_disk_open(
				data, BLOCKMIRROR_FORMAT_QCOW2, 0);
			if (!run.target)
				r = -errno;
		}
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
	/* The point may hold guest writes not yet flushed: they must be
	 * durable on the disk before the point exists, or a power loss
	 * could take them from the disk while no record since the point
	 * says so, and the next increment would miss the difference. */
	if (r == 0 && (r = blockmirror_disk_flush(disk)) < 0)
		r = bm_error(r, "flushing the disk: %s", inner_error());
	if (r == 0)
		r = blockmirror_disk_flush(run.target);
	/* Every failure of the export names it. */
	if (r < 0 && run.nbd && !strstr(inner_error(), data))
		bm_error_prefix(r, "%s: ", data);
	r = close_keeping_error(run.target, r);
	run.target = NULL;
	if (r == 0 && !run.nbd)
		r = bm_durable_sync_parent(data);
	if (r == 0)
		event_step(&ev, BLOCKMIRROR_BACKUP_DATA_FLUSHED, p.number, data);
	if (r == 0) {
		uint64_t n = (run.size + g - 1) / g;

		bm_hash_buffer(run.digests, n * sizeof *run.digests,
			       &p.digests_digest);
		r = bm_durable_write_file(dig, run.digests,
					  n * sizeof *run.digests, 0644);
		if (r == 0)
			event_step(&ev, BLOCKMIRROR_BACKUP_DIGESTS_WRITTEN,
				   p.number, dig);
	}
	p.instant = info.taken_unix_ns / 1000000000;
	/* The last moment a cancel can still leave no point behind. */
	if (r == 0 && o->cancelled && o->cancelled(o->user_data))
		r = bm_error(-ECANCELED, "the backup was cancelled");
	if (r == 0)
		r = manifest_write(o->dir, &p, o->incremental && !run.nbd
						? backing : NULL);
	if (r < 0)
		goto fail;
	event_step(&ev, BLOCKMIRROR_BACKUP_POINT_COMMITTED, p.number, NULL);
	checkpoint_mark_remove(o->dir, p.number);
	/* The export holds this point alone now (or another kind of target
	 * took it: the mark says nothing any more). */
	unlink(mark);

	/* The point exists: the record before it is no longer needed. */
	blockmirror_snapshot_release(run.snap);
	if (tracking && prev.checkpoint[0])
		remove_checkpoint(disk, o->dir, &p, prev.checkpoint, &ev);
	if (tracking)
		remove_older_checkpoints(disk, o->dir, &p, &ev);
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
	close(lock);
	{
		struct blockmirror_backup_event e = {
			.type = BLOCKMIRROR_BACKUP_COMPLETED, .point = p.number,
			.incremental = p.incremental, .healing = heal,
		};

		bm_error_clear();
		event_send(&ev, &e);
	}
	return 0;

fail:
	{
		char first[512];

		snprintf(first, sizeof first, "%s", inner_error());
		if (run.target)
			blockmirror_disk_close(run.target);
		if (run.snap) {
			blockmirror_snapshot_release(run.snap);
			/* The record since the last point must stay whole. */
			if (created && blockmirror_checkpoint_remove(disk, cp) < 0)
				bm_warn("checkpoint %s could not be removed: "
					"%s", cp, inner_error());
			else
				checkpoint_mark_remove(o->dir, p.number);
			if (data[0] && !run.nbd)
				unlink(data);
			if (dig[0])
				unlink(dig);
		} else if (tracking) {
			/* No instant, no checkpoint. */
			checkpoint_mark_remove(o->dir, p.number);
		}
		bm_error(r, "%s", first);
	}
	free(words);
	free(run.digests);
	free(run.buf);
	close(lock);
	return backup_end(&ev, p.number, r);
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

	point_data(path, sizeof path, dir, p);
	img = blockmirror_disk_open(path, point_format(p),
				    BLOCKMIRROR_DISK_READONLY);
	if (!img)
		return bm_error(-errno, "point %04u: %s", p->number,
				inner_error());
	if (blockmirror_disk_get_size(img) != p->disk_size)
		r = bm_error(-EBADMSG, "point %04u: %s holds %" PRIu64 " bytes,"
			     " its manifest says %" PRIu64, p->number, path,
			     blockmirror_disk_get_size(img), p->disk_size);
	for (uint64_t off = 0; r == 0 && off < p->disk_size;
	     off += BM_MAX(COPY_BYTES, p->granularity)) {
		uint64_t len = BM_MIN(BM_MAX(COPY_BYTES, p->granularity),
				      p->disk_size - off);

		r = blockmirror_disk_read(img, buf, len, off);
		if (r < 0)
			r = bm_error(r, "point %04u: %s: %s", p->number, path,
				     inner_error());
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

		snprintf(msg, sizeof msg, "%s", inner_error());
		blockmirror_disk_close(img);
		return bm_error(r, "%s", msg);
	}
	return blockmirror_disk_close(img);
}

/* The live disk against the newest point: every granule the change
 * record says is unchanged since the point must read the same now. */
static int
verify_live(struct blockmirror_disk *live, const struct point *p,
	    const struct bm_digest *dg, uint8_t *buf, unsigned sample,
	    struct blockmirror_backup_check *res)
{
	struct blockmirror_snapshot_options so = { .size = sizeof so };
	struct blockmirror_snapshot *snap;
	uint64_t g, *words = NULL, nbits, bytes, rng;
	int r;

	bool record = p->checkpoint[0] && bm_checkpoint_granularity(live);

	if (blockmirror_disk_get_size(live) != p->disk_size)
		return bm_error(-EINVAL, "the disk holds %" PRIu64 " bytes, "
				"point %04u %" PRIu64,
				blockmirror_disk_get_size(live), p->number,
				p->disk_size);

	/* Without a change record every granule must match: the disk is
	 * expected not to have changed since (an image nobody runs). */
	so.since = record ? p->checkpoint : NULL;
	r = blockmirror_snapshot_take(&live, 1, &so, &snap);
	if (r < 0)
		return r;
	g = p->granularity;
	nbits = (p->disk_size + g - 1) / g;
	/* A sample differs from run to run, so that runs add up. */
	rng = sample_seed();
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
		if (sample % 100 && sample_next(&rng) % 100 >= sample)
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

static int
verify_chain(const char *dir, struct blockmirror_disk *live, unsigned sample,
	     struct blockmirror_backup_check *res, const struct events *e)
{
	struct bm_digest *dg = NULL;
	struct point p = { 0 };
	uint8_t *buf = NULL;
	uint64_t n, cap = 0;
	unsigned first = 0, newest = 0;
	int r, lock = -1;

	if (!dir || !res)
		return bm_error(-EINVAL, "bad arguments");
	memset(res, 0, sizeof *res);
	r = lock = lock_dir(dir, false);
	if (r >= 0)
		r = chain_range(dir, &first, &newest);
	if (r == 0 && !newest)
		r = bm_error(-ENOENT, "%s: holds no backup point", dir);
	for (unsigned k = first; r == 0 && k <= newest; k++) {
		uint64_t want;

		free(dg);
		dg = NULL;
		r = manifest_read(dir, k, &p);
		if (r == 0 && k == first && p.incremental)
			r = bm_error(-EBADMSG, "%s: point %04u is incremental, "
				     "but the chain must start with a full "
				     "point", dir, k);
		want = BM_MAX(COPY_BYTES, p.granularity);
		if (r == 0 && want > cap) {
			free(buf);
			cap = want;
			if (!(buf = aligned_alloc(4096, cap)))
				r = bm_error(-ENOMEM, "out of memory");
		}
		if (r == 0)
			r = digests_read(dir, &p, &dg, &n);
		/* An older point in an export: a newer one wrote over it. */
		if (r == 0 && p.target[0] && k < newest) {
			event_step(e, BLOCKMIRROR_BACKUP_POINT_SUPERSEDED, k,
				   p.target);
			continue;
		}
		if (r == 0)
			r = check_export_whole(dir, &p, k + 1);
		if (r == 0)
			r = verify_point(dir, &p, dg, buf, res);
		if (r < 0 && !res->bad_point)
			res->bad_point = k;
		if (r == 0) {
			char where[PATH_MAX];

			res->points++;
			point_data(where, sizeof where, dir, &p);
			event_step(e, BLOCKMIRROR_BACKUP_POINT_VERIFIED, k,
				   where);
		}
	}
	if (r == 0 && live)
		r = verify_live(live, &p, dg, buf, sample, res);
	if (r == 0 && live)
		event_step(e, BLOCKMIRROR_BACKUP_LIVE_VERIFIED, p.number, NULL);
	if (lock >= 0)
		close(lock);
	free(dg);
	free(buf);
	return r;
}

BM_EXPORT int
blockmirror_backup_verify(const char *dir, struct blockmirror_disk *live,
			  struct blockmirror_backup_check *res)
{
	return blockmirror_backup_verify_with_events(dir, live, res, NULL,
						     NULL);
}

BM_EXPORT int
blockmirror_backup_verify_with_events(const char *dir,
				      struct blockmirror_disk *live,
				      struct blockmirror_backup_check *res,
				      blockmirror_backup_event_fn on_event,
				      void *event_data)
{
	const struct blockmirror_backup_verify_options o = {
		.size = sizeof o, .live = live, .on_event = on_event,
		.event_data = event_data,
	};

	return blockmirror_backup_verify_opts(dir, &o, res);
}

BM_EXPORT int
blockmirror_backup_verify_opts(const char *dir,
			       const struct blockmirror_backup_verify_options *o,
			       struct blockmirror_backup_check *res)
{
	struct blockmirror_backup_verify_options opts = { .size = sizeof opts };
	struct events e;
	int r;

	bm_error_clear();
	if (!o || o->size < offsetof(struct blockmirror_backup_verify_options,
				     live_sample_percent) + sizeof(unsigned))
		return bm_api_fail("blockmirror_backup_verify",
				   bm_error(-EINVAL, "bad options"));
	memcpy(&opts, o, BM_MIN(o->size, sizeof opts));
	if (opts.live_sample_percent > 100)
		return bm_api_fail("blockmirror_backup_verify",
				   bm_error(-EINVAL, "a sample of %u%% of the "
					    "disk", opts.live_sample_percent));
	e = (struct events){ opts.on_event, opts.event_data };
	r = verify_chain(dir, opts.live, opts.live_sample_percent, res, &e);
	return r < 0 ? bm_api_fail("blockmirror_backup_verify", r) : 0;
}

/* ---- restoring and pruning ------------------------------------------ */

/*
 * Write point `p` (read through its chain) to a new image `target` of
 * `format`, checking every granule against the point's digests on the
 * way: a damaged chain never restores silently.  Granules of zeroes are
 * neither read nor written (the new image reads as zeroes).
 */
static int
copy_point(const char *dir, const struct point *p, const struct bm_digest *dg,
	   const char *target, enum blockmirror_format format,
	   const char *options, blockmirror_progress_fn progress,
	   void *user_data, uint64_t *bytes_read, uint64_t *bytes_written)
{
	uint64_t chunk = BM_MAX(COPY_BYTES, p->granularity), done = 0;
	char path[PATH_MAX];
	struct blockmirror_disk *src, *dst = NULL;
	struct bm_digest zero, zero_tail;
	uint8_t *buf = aligned_alloc(4096, chunk);
	bool made;
	int r;

	if (!buf)
		return bm_error(-ENOMEM, "out of memory");
	memset(buf, 0, p->granularity);
	bm_hash_buffer(buf, p->granularity, &zero);
	bm_hash_buffer(buf, p->disk_size % p->granularity ?
		       p->disk_size % p->granularity : p->granularity,
		       &zero_tail);
	point_data(path, sizeof path, dir, p);
	src = blockmirror_disk_open(path, point_format(p),
				    BLOCKMIRROR_DISK_READONLY);
	if (!src) {
		free(buf);
		return -errno;
	}
	r = blockmirror_image_create(target, format, p->disk_size, options,
				     false);
	made = r == 0;
	if (r == 0 && !(dst = blockmirror_disk_open(target, format, 0)))
		r = -errno;
	for (uint64_t off = 0; r == 0 && off < p->disk_size;
	     off += p->granularity) {
		uint64_t k = off / p->granularity;
		uint64_t len = BM_MIN(p->granularity, p->disk_size - off);
		const struct bm_digest *z = len < p->granularity ? &zero_tail
								 : &zero;
		struct bm_digest d;

		done += len;
		if (progress && (done % chunk < len || done == p->disk_size))
			progress(user_data, done, p->disk_size);
		if (!memcmp(&dg[k], z, sizeof *z))
			continue;
		r = blockmirror_disk_read(src, buf, len, off);
		if (r < 0)
			break;
		*bytes_read += len;
		bm_hash_buffer(buf, len, &d);
		if (memcmp(&d, &dg[k], sizeof d)) {
			r = bm_error(-EBADMSG, "point %04u is damaged: %" PRIu64
				     " bytes at %" PRIu64 " do not match its "
				     "manifest", p->number, len, off);
		} else if (!bm_is_zero(buf, len)) {
			r = blockmirror_disk_write(dst, buf, len, off, 0);
			*bytes_written += len;
		}
	}
	if (r == 0)
		r = blockmirror_disk_flush(dst);
	r = close_keeping_error(dst, r);
	r = close_keeping_error(src, r);
	if (r < 0 && made)
		unlink(target); /* ours: made above, never there before */
	free(buf);
	return r;
}

/* A point's number as given (0: the newest), checked: its manifest and
 * digests. */
static int
open_point(const char *dir, unsigned number, struct point *p,
	   struct bm_digest **dg)
{
	unsigned first = 0, last = 0;
	uint64_t n;
	int r = chain_range(dir, &first, &last);

	if (r == 0 && !last)
		r = bm_error(-ENOENT, "%s: holds no backup point", dir);
	if (r == 0 && number && (number < first || number > last))
		r = bm_error(-ENOENT, "%s: no point %04u (it holds %04u to "
			     "%04u)", dir, number, first, last);
	if (r == 0)
		r = manifest_read(dir, number ? number : last, p);
	if (r == 0 && p->target[0] && p->number != last)
		r = bm_error(-ESTALE, "%s: point %04u is superseded: its export "
			     "%s has since been written by point %04u", dir,
			     p->number, p->target, last);
	if (r == 0)
		r = check_export_whole(dir, p, last + 1);
	if (r == 0)
		r = digests_read(dir, p, dg, &n);
	return r;
}

BM_EXPORT int
blockmirror_backup_restore(const char *dir, unsigned number,
			   const char *target, enum blockmirror_format format,
			   blockmirror_progress_fn progress, void *user_data,
			   uint64_t *bytes_written)
{
	return blockmirror_backup_restore_with_events(dir, number, target,
						      format, progress,
						      user_data, bytes_written,
						      NULL, NULL);
}

BM_EXPORT int
blockmirror_backup_restore_with_events(const char *dir, unsigned number,
				       const char *target,
				       enum blockmirror_format format,
				       blockmirror_progress_fn progress,
				       void *user_data, uint64_t *bytes_written,
				       blockmirror_backup_event_fn on_event,
				       void *event_data)
{
	const struct events e = { on_event, event_data };
	struct bm_digest *dg = NULL;
	struct point p;
	uint64_t rd = 0, wr = 0;
	int r, lock;

	bm_error_clear();
	if (!dir || !target)
		return bm_api_fail("blockmirror_backup_restore",
				   bm_error(-EINVAL, "bad arguments"));
	if (format == BLOCKMIRROR_FORMAT_AUTO)
		format = BLOCKMIRROR_FORMAT_RAW;
	r = lock = lock_dir(dir, false);
	if (r >= 0)
		r = open_point(dir, number, &p, &dg);
	if (r >= 0)
		r = copy_point(dir, &p, dg, target, format, NULL, progress,
			       user_data, &rd, &wr);
	if (r >= 0)
		event_step(&e, BLOCKMIRROR_BACKUP_POINT_RESTORED, p.number,
			   target);
	if (lock >= 0)
		close(lock);
	free(dg);
	if (bytes_written)
		*bytes_written = wr;
	return r < 0 ? bm_api_fail("blockmirror_backup_restore", r) : 0;
}

/* Remove every point numbered below `k`, newest first: at each step the
 * points left below are a whole older chain, and those from k up start
 * with a full point. */
static unsigned
remove_below(const char *dir, unsigned k, const struct events *ev)
{
	unsigned removed = 0;

	for (;;) {
		unsigned best = 0;
		struct dirent *e;
		DIR *d = opendir(dir);
		char path[PATH_MAX];

		if (!d)
			break;
		while ((e = readdir(d))) {
			unsigned n = point_number(e->d_name);

			if (n && n < k && n > best)
				best = n;
		}
		closedir(d);
		if (!best)
			break;
		/* The manifest first: without it the rest is no point. */
		point_file(path, sizeof path, dir, best, "json");
		if (bm_durable_unlink(path) < 0)
			break;
		clean_leftovers(dir, best);
		point_file(path, sizeof path, dir, best, "writing");
		unlink(path);
		removed++;
		event_step(ev, BLOCKMIRROR_BACKUP_POINT_REMOVED, best, NULL);
	}
	return removed;
}

BM_EXPORT int
blockmirror_backup_prune(const char *dir, unsigned keep,
			 struct blockmirror_backup_prune_result *res)
{
	return blockmirror_backup_prune_with_events(dir, keep, res, NULL,
						    NULL);
}

BM_EXPORT int
blockmirror_backup_prune_with_events(const char *dir, unsigned keep,
				     struct blockmirror_backup_prune_result *res,
				     blockmirror_backup_event_fn on_event,
				     void *event_data)
{
	const struct events e = { on_event, event_data };
	struct bm_digest *dg = NULL;
	char tmp[PATH_MAX], path[PATH_MAX], opts[64];
	struct point p;
	unsigned first = 0, last = 0, older = 0, k;
	uint64_t n, wr = 0;
	int r, lock;

	bm_error_clear();
	if (!dir || !keep || !res)
		return bm_api_fail("blockmirror_backup_prune",
				   bm_error(-EINVAL, "bad arguments (keep at "
					    "least one point)"));
	memset(res, 0, sizeof *res);
	r = lock = lock_dir(dir, true);
	if (r >= 0)
		r = chain_range_older(dir, &first, &last, &older);
	if (r < 0) {
		if (lock >= 0)
			close(lock);
		return bm_api_fail("blockmirror_backup_prune", r);
	}
	k = last - first + 1 > keep ? last - keep + 1 : first;
	res->first = k;
	if (!last) {
		close(lock);
		return 0;
	}
	r = manifest_read(dir, k, &p);
	if (r == 0 && p.incremental && p.target[0]) {
		/* An export always holds a whole disk: nothing to copy. */
		p.incremental = false;
		r = manifest_write(dir, &p, NULL);
		res->merged = r == 0;
	} else if (r == 0 && p.incremental) {
		r = digests_read(dir, &p, &dg, &n);
		point_file(tmp, sizeof tmp, dir, k, "qcow2.new");
		point_file(path, sizeof path, dir, k, "qcow2");
		snprintf(opts, sizeof opts, "cluster_size=%" PRIu64,
			 BM_MIN(BM_MAX(p.granularity, 64 * BM_KiB),
				2048 * BM_KiB));
		unlink(tmp); /* a prune that died */
		if (r == 0)
			r = copy_point(dir, &p, dg, tmp,
				       BLOCKMIRROR_FORMAT_QCOW2, opts, NULL,
				       NULL, &res->bytes_read, &wr);
		if (r == 0)
			r = bm_durable_rename(tmp, path, NULL);
		/* The image reads the same with or without its backing
		 * file, so a crash here leaves a valid chain. */
		p.incremental = false;
		if (r == 0)
			r = manifest_write(dir, &p, NULL);
		res->merged = r == 0;
	}
	if (r == 0 && res->merged)
		event_step(&e, BLOCKMIRROR_BACKUP_POINT_MERGED, k, NULL);
	if (r == 0)
		res->removed = remove_below(dir, k, &e);
	else
		res->first = first;
	close(lock);
	free(dg);
	return r < 0 ? bm_api_fail("blockmirror_backup_prune", r) : 0;
}

/* ---- listing --------------------------------------------------------- */

BM_EXPORT int
blockmirror_backup_list(const char *dir, struct blockmirror_backup_point **out,
			size_t *count)
{
	struct blockmirror_backup_point *v = NULL;
	unsigned first = 0, last = 0;
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
		point_data(e->file, sizeof e->file, dir, &p);
		/* A point that failed may have written part of itself
		 * over the newest one too (its mark says so). */
		e->superseded = p.target[0] &&
				(k < last || check_export_whole(dir, &p, k + 1));
		bm_error_clear();
		if (!p.target[0] && stat(e->file, &st) == 0)
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
