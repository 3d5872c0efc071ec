/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Power loss during and between backups (issue 17; lib/backup.c,
 * docs/backup.md, docs/cbt.md).
 *
 * The crash recorder (recorder.h) logs everything the library writes
 * under one directory, which holds a tracked disk (raw with its sidecar,
 * then qcow2 with its record in the image's bitmaps) and the backup
 * directory, while a guest writer writes the disk
 * and the test takes a full point and two incremental ones, with a
 * backup cancelled half way between points 2 and 3.  Every guest
 * write carries its id in each 4 KiB block; its submission and its
 * acknowledgement are recorder events, and so are the start and end of
 * each backup.  The writer is paused around each point's instant (it
 * goes on at the backup's first progress report; for point 1 only once
 * the backup returned), so each point's content is the model's disk
 * after every write acknowledged before.  The last write before each
 * instant is not flushed, so that the point holds a write a power loss
 * may take from the disk.
 *
 * Then, at crash points spread over the recording (inside every step of
 * each backup and between them), for each variant the recorder rebuilds
 * the directory a power loss (or a SIGKILL) may have left, and the test
 * does what a user would do, checking what the user relies on:
 *
 *  - the disk reopens with tracking, `crashed` set when the tracker was
 *    open at the crash (a sidecar says so; a qcow2 image's bitmaps need
 *    no in-use flag and do not) and clear after a clean close;
 *  - every guest write that was durable at the crash (FUA, or before an
 *    acknowledged flush) is on the disk, and every block holds that write
 *    or one submitted after it;
 *  - the backup directory lists whole points only: every backup that
 *    returned before the crash, perhaps the one running, no other;
 *    blockmirror_backup_verify passes, with the live disk too (the record
 *    has every write since the newest point), and each point restores to
 *    exactly its instant;
 *  - a new backup succeeds, incremental when a point exists, and not
 *    healed: a power loss does not cost the chain.  It restores to the
 *    disk as it is, and only its own checkpoint is left of its chain.
 *
 * Fixed cases (durable writes only) keep the crash points that showed
 * defects: right after each backup returned, and right after an
 * incremental point's manifest became durable.
 *
 * And the cases where the record is rightly refused: a sidecar replaced
 * by an older copy (it lacks the newest point's checkpoint), a qcow2
 * image written and closed by an open without tracking, and writes
 * made by a process that opened the disk without tracking (tracking is
 * then refused).  A trusting backup would miss a write there; the next
 * backup heals by digests and holds it.
 *
 * BM_CRASH_POINTS: crash points in all (default 360, half per disk
 * format); BM_CRASH_SEED: the seed (printed); BM_CRASH_KEEP=1 keeps the
 * directory of the first failing crash point.
 */
#include <errno.h>
#include <inttypes.h>
#include <sys/stat.h>

#include "helpers.h"
#include "recorder.h"

#define BLOCK 4096u
#define DISK_SIZE (UINT64_C(4) << 20)
#define NBLOCKS (DISK_SIZE / BLOCK)
#define GRAN 65536u                    /* the sidecar's default */
/* The last two granules are the test's own: the writer never writes
 * there. */
#define RESERVED (2 * GRAN / BLOCK)
#define UNFLUSHED_BLK (NBLOCKS - RESERVED)  /* + n: before point n */
#define SENTINEL_BLK (NBLOCKS - GRAN / BLOCK + 3)
#define MAX_WRITES 8192
#define POINTS 3
#define WRITES_BETWEEN 48              /* guest requests between points */
#define MAGIC 0xbac0000000000000ull
#define MAX_FAILURES 6
#define NEVER UINT64_MAX

enum gkind { G_WRITE, G_ZERO, G_FLUSH };

struct gop {
	enum gkind kind;
	uint64_t blk, n;               /* blocks */
	bool fua;
	int err;
	uint64_t submit, ack;          /* recorder events */
	uint64_t durable;              /* from which crash point it stays */
};

static const struct scenario {
	const char *name;
	const char *file;
	enum blockmirror_format format;
} scenarios[] = {
	{ "raw", "disk.raw", BLOCKMIRROR_FORMAT_RAW },
	{ "qcow2", "disk.qcow2", BLOCKMIRROR_FORMAT_QCOW2 },
};
#define SCENARIOS (int)(sizeof scenarios / sizeof scenarios[0])

static struct {
	const struct scenario *sc;
	char root[64], image[128], side[160], bdir[128], out[96];
	uint8_t *initial;
	struct gop *ops;
	size_t nops;                   /* under lock */
	uint8_t *instant[POINTS + 1];
	uint64_t bstart[POINTS + 1], bdone[POINTS + 1];
	uint64_t tracking, close_start, closed;
	uint64_t cstart, cdone;        /* the cancelled backup */
	uint64_t sentinel;             /* the op index of the test's write */
	/* the writer */
	struct blockmirror_disk *disk;
	pthread_t thread;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	bool paused, busy, stop;
	uint64_t rng;
	/* per block: the ops that write it, in order */
	uint32_t *bops, *bstart_of, *blen;
} G = { .lock = PTHREAD_MUTEX_INITIALIZER, .cond = PTHREAD_COND_INITIALIZER };

/* ---- the guest's content ---------------------------------------------- */

/* What block `blk` holds after op i (SIZE_MAX: the initial content). */
static void
content(size_t i, uint64_t blk, uint8_t *out)
{
	uint64_t *w = (uint64_t *)out;

	if (i == SIZE_MAX) {
		memcpy(out, G.initial + blk * BLOCK, BLOCK);
		return;
	}
	if (G.ops[i].kind == G_ZERO) {
		memset(out, 0, BLOCK);
		return;
	}
	for (unsigned k = 0; k < BLOCK / 8; k++)
		w[k] = rec_pattern_word(MAGIC, i, blk, k);
}

/* The model's disk after ops [0, n). */
static void
model_disk(size_t n, uint8_t *out)
{
	memcpy(out, G.initial, DISK_SIZE);
	for (size_t i = 0; i < n; i++)
		if (G.ops[i].kind != G_FLUSH && !G.ops[i].err)
			for (uint64_t b = 0; b < G.ops[i].n; b++)
				content(i, G.ops[i].blk + b,
					out + (G.ops[i].blk + b) * BLOCK);
}

/* ---- the writer --------------------------------------------------------- */

/* One guest request, waited for; its events are logged around it. */
static void
guest_op(enum gkind kind, uint64_t blk, uint64_t n, bool fua)
{
	static uint8_t buf[4 * BLOCK] __attribute__((aligned(4096)));
	unsigned fl = fua ? BLOCKMIRROR_REQ_FUA : 0;
	struct gop *op;
	size_t i;

	pthread_mutex_lock(&G.lock);
	i = G.nops;
	pthread_mutex_unlock(&G.lock);
	ck_assert_uint_lt(i, MAX_WRITES);
	op = &G.ops[i];
	memset(op, 0, sizeof *op);
	op->kind = kind;
	op->blk = blk;
	op->n = n;
	op->fua = fua && kind != G_FLUSH;
	op->durable = NEVER;
	for (uint64_t b = 0; kind == G_WRITE && b < n; b++)
		content(i, blk + b, buf + b * BLOCK);
	op->submit = rec_event("guest submit %s #%zu [%" PRIu64 ", +%" PRIu64
			       ")%s", kind == G_FLUSH ? "flush" : kind == G_ZERO
			       ? "zero" : "write", i, blk, n,
			       op->fua ? " FUA" : "");
	switch (kind) {
	case G_WRITE:
		op->err = blockmirror_disk_write(G.disk, buf, n * BLOCK,
						 blk * BLOCK, fl);
		break;
	case G_ZERO:
		op->err = blockmirror_disk_write_zeroes(G.disk, n * BLOCK,
							blk * BLOCK, fl);
		break;
	case G_FLUSH:
		op->err = blockmirror_disk_flush(G.disk);
		break;
	}
	op->ack = rec_event("guest ack #%zu (%d)", i, op->err);
	pthread_mutex_lock(&G.lock);
	G.nops = i + 1;
	pthread_cond_broadcast(&G.cond);
	pthread_mutex_unlock(&G.lock);
}

static void *
writer(void *arg)
{
	(void)arg;
	for (;;) {
		unsigned x = (unsigned)rnd_range(&G.rng, 100);
		uint64_t n = 1 + rnd_range(&G.rng, 4);
		uint64_t blk = rnd_range(&G.rng, NBLOCKS - RESERVED - n);

		pthread_mutex_lock(&G.lock);
		while (G.paused && !G.stop)
			pthread_cond_wait(&G.cond, &G.lock);
		if (G.stop) {
			pthread_mutex_unlock(&G.lock);
			break;
		}
		G.busy = true;
		pthread_mutex_unlock(&G.lock);
		guest_op(x < 10 ? G_FLUSH : x < 22 ? G_ZERO : G_WRITE, blk, n,
			 rnd_range(&G.rng, 2));
		pthread_mutex_lock(&G.lock);
		G.busy = false;
		pthread_cond_broadcast(&G.cond);
		pthread_mutex_unlock(&G.lock);
		/* Pacing, so that backups see writes during their copy. */
		usleep(100 + (useconds_t)rnd_range(&G.rng, 400));
	}
	return NULL;
}

static void
writer_pause(void)
{
	pthread_mutex_lock(&G.lock);
	G.paused = true;
	while (G.busy)
		pthread_cond_wait(&G.cond, &G.lock);
	pthread_mutex_unlock(&G.lock);
}

static void
writer_go(void)
{
	pthread_mutex_lock(&G.lock);
	G.paused = false;
	pthread_cond_broadcast(&G.cond);
	pthread_mutex_unlock(&G.lock);
}

/* The first progress report comes after the snapshot's instant. */
static void
go_on_progress(void *user_data, uint64_t done, uint64_t total)
{
	(void)user_data;
	(void)done;
	(void)total;
	writer_go();
}

/* Wait (20 s at most) until the guest has made `n` requests in all. */
static void
wait_ops(size_t n)
{
	struct timespec dl;

	clock_gettime(CLOCK_REALTIME, &dl);
	dl.tv_sec += 20;
	pthread_mutex_lock(&G.lock);
	while (G.nops < n)
		if (pthread_cond_timedwait(&G.cond, &G.lock, &dl) == ETIMEDOUT)
			break;
	n = G.nops < n ? n - G.nops : 0;
	pthread_mutex_unlock(&G.lock);
	ck_assert_msg(n == 0, "the guest writer stalled (%zu requests short)",
		      n);
}

/* ---- recording ---------------------------------------------------------- */

static void
setup(const struct scenario *sc)
{
	struct blockmirror_disk *disk;
	uint64_t rng = 7;
	char cmd[256];

	G.sc = sc;
	snprintf(G.root, sizeof G.root, "/var/tmp/bm-bcrash-XXXXXX");
	ck_assert(mkdtemp(G.root));
	snprintf(G.image, sizeof G.image, "%s/%s", G.root, sc->file);
	snprintf(G.side, sizeof G.side, "%s.bmirror-cbt", G.image);
	snprintf(G.bdir, sizeof G.bdir, "%s/backups", G.root);
	snprintf(G.out, sizeof G.out, "%s.out", G.root);
	ck_assert_int_eq(mkdir(G.out, 0700), 0);
	/* The disk: data in its first half, zeroes after. */
	G.initial = aligned_alloc(BLOCK, DISK_SIZE);
	memset(G.initial, 0, DISK_SIZE);
	for (uint64_t i = 0; i < DISK_SIZE / 2 / 8; i++)
		((uint64_t *)G.initial)[i] = rnd(&rng);
	ck_assert_int_eq(blockmirror_image_create(G.image, sc->format,
						  DISK_SIZE, NULL, false), 0);
	disk = blockmirror_disk_open(G.image, sc->format, 0);
	ck_assert_msg(disk, "%s", blockmirror_last_error());
	ck_assert_int_eq(blockmirror_disk_write(disk, G.initial, DISK_SIZE / 2,
						0, 0), 0);
	ck_assert_int_eq(blockmirror_disk_close(disk), 0);
	snprintf(cmd, sizeof cmd, "sync -f %s", G.image);
	ck_assert_int_eq(system(cmd), 0);
	G.ops = calloc(MAX_WRITES, sizeof *G.ops);
	G.nops = 0;
	G.paused = G.busy = G.stop = false;
}

static void
teardown(bool keep)
{
	if (!keep)
		remove_tree(G.root);
	remove_tree(G.out);
	for (int n = 0; n <= POINTS; n++)
		free(G.instant[n]);
	free(G.initial);
	free(G.ops);
	free(G.bops);
	free(G.bstart_of);
	free(G.blen);
	memset(G.instant, 0, sizeof G.instant);
	G.bops = G.bstart_of = G.blen = NULL;
}

/* Cancels a backup at its second question: after its first chunk, or
 * right before its manifest. */
static bool
cancel_second(void *user_data)
{
	unsigned *asked = user_data;

	return ++*asked >= 2;
}

/* A backup that dies between points 2 and 3 (cancelled half way): it
 * leaves nothing the next one, or a crash, could take for a point. */
static void
cancelled_backup(void)
{
	struct blockmirror_backup_options o = { .size = sizeof o };
	struct blockmirror_backup_point res;
	unsigned asked = 0;

	o.dir = G.bdir;
	o.incremental = true;
	o.progress = go_on_progress;
	o.cancelled = cancel_second;
	o.user_data = &asked;
	writer_pause();
	G.cstart = rec_event("backup cancelled");
	ck_assert_int_eq(blockmirror_backup(G.disk, &o, &res), -ECANCELED);
	G.cdone = rec_event("backup cancelled done");
	writer_go();
	wait_ops(G.nops + WRITES_BETWEEN);
}

static void
record(void)
{
	struct blockmirror_backup_options o = { .size = sizeof o };
	struct blockmirror_backup_point res;
	uint8_t *now = aligned_alloc(BLOCK, DISK_SIZE);
	bool crashed = true;

	ck_assert_int_eq(rec_start(G.root), 0);
	G.disk = blockmirror_disk_open(G.image, G.sc->format, 0);
	ck_assert_msg(G.disk, "%s", blockmirror_last_error());
	ck_assert_int_eq(blockmirror_disk_start_thread(G.disk), 0);
	ck_assert_int_eq(blockmirror_disk_track(G.disk, NULL, 0, &crashed), 0);
	ck_assert(!crashed);
	G.tracking = rec_event("tracking");
	ck_assert_int_eq(pthread_create(&G.thread, NULL, writer, NULL), 0);
	wait_ops(WRITES_BETWEEN);
	o.dir = G.bdir;
	for (unsigned n = 1; n <= POINTS; n++) {
		writer_pause();
		/* The last write before the instant, not flushed: the point
		 * holds it, a power loss may take it from the disk. */
		guest_op(G_WRITE, UNFLUSHED_BLK + n, 1, false);
		if (n == POINTS) {
			/* A durable write in a granule of its own: the
			 * rejection cases look for it. */
			G.sentinel = G.nops;
			guest_op(G_WRITE, SENTINEL_BLK, 2, true);
		}
		G.instant[n] = aligned_alloc(BLOCK, DISK_SIZE);
		model_disk(G.nops, G.instant[n]);
		ck_assert_int_eq(blockmirror_disk_read(G.disk, now, DISK_SIZE,
						       0), 0);
		ck_assert_msg(!memcmp(now, G.instant[n], DISK_SIZE),
			      "the model is not the disk before point %u", n);
		o.incremental = n > 1;
		/* Point 1 is taken with the writer paused throughout: no
		 * guest flush makes the write above durable before the
		 * backup returns. */
		o.progress = n > 1 ? go_on_progress : NULL;
		G.bstart[n] = rec_event("backup %u", n);
		ck_assert_msg(blockmirror_backup(G.disk, &o, &res) == 0, "%s",
			      blockmirror_last_error());
		G.bdone[n] = rec_event("backup %u done", n);
		ck_assert_uint_eq(res.number, n);
		ck_assert(!res.healed);
		writer_go();
		wait_ops(G.nops + WRITES_BETWEEN);
		if (n == 2)
			cancelled_backup();
	}
	pthread_mutex_lock(&G.lock);
	G.stop = true;
	pthread_cond_broadcast(&G.cond);
	pthread_mutex_unlock(&G.lock);
	pthread_join(G.thread, NULL);
	G.close_start = rec_event("close");
	ck_assert_int_eq(blockmirror_disk_close(G.disk), 0);
	G.closed = rec_event("closed");
	rec_stop();
	for (size_t i = 0; i < G.nops; i++)
		ck_assert_msg(G.ops[i].err == 0, "guest request %zu: %d", i,
			      G.ops[i].err);
	free(now);
}

/* From which crash point each write must be on the disk, and per block
 * the ops writing it. */
static void
compute_durability(void)
{
	uint64_t flush_ack = NEVER;

	/* One request at a time: the first flush submitted after a write's
	 * acknowledgement makes it durable. */
	for (size_t i = G.nops; i-- > 0;) {
		struct gop *op = &G.ops[i];

		if (op->kind == G_FLUSH)
			flush_ack = op->ack;
		else
			op->durable = op->fua ? op->ack + 1
				    : flush_ack == NEVER ? NEVER
				    : flush_ack + 1;
	}
	G.bstart_of = calloc(NBLOCKS + 1, sizeof *G.bstart_of);
	G.blen = calloc(NBLOCKS, sizeof *G.blen);
	for (size_t i = 0; i < G.nops; i++)
		for (uint64_t b = 0; G.ops[i].kind != G_FLUSH &&
		     b < G.ops[i].n; b++)
			G.bstart_of[G.ops[i].blk + b + 1]++;
	for (uint64_t b = 0; b < NBLOCKS; b++)
		G.bstart_of[b + 1] += G.bstart_of[b];
	G.bops = malloc((G.bstart_of[NBLOCKS] + 1) * sizeof *G.bops);
	for (size_t i = 0; i < G.nops; i++)
		for (uint64_t b = 0; G.ops[i].kind != G_FLUSH &&
		     b < G.ops[i].n; b++) {
			uint64_t x = G.ops[i].blk + b;

			G.bops[G.bstart_of[x] + G.blen[x]++] = (uint32_t)i;
		}
}

/* ---- checking a crash point ------------------------------------------- */

struct crash {
	uint64_t k;
	enum rec_variant variant;
	uint64_t rng;
	unsigned index;
};

static const char *const variant_names[] = { "durable-only", "all",
					     "random" };

/* The event that makes point n's manifest durable: the sync of the
 * backup directory after its rename. */
static uint64_t
manifest_durable(unsigned n)
{
	char name[32];
	uint64_t e = G.bstart[n];

	snprintf(name, sizeof name, "/%04u.json.tmp -> ", n);
	while (e < G.bdone[n] && !strstr(rec_describe(e), name))
		e++;
	while (e < G.bdone[n] && strncmp(rec_describe(e), "fsync dir", 9))
		e++;
	ck_assert_msg(e < G.bdone[n], "no manifest of point %u recorded", n);
	return e;
}

/* The first event of [from, to) whose description holds `what`. */
static uint64_t
find_event(uint64_t from, uint64_t to, const char *what)
{
	while (from < to && !strstr(rec_describe(from), what))
		from++;
	return from;
}

/* The steps of a backup, by the event that ends each. */
enum { S_SNAPSHOT, S_COPY, S_DIGESTS, S_MANIFEST, S_END, STEPS };
static const char *const step_names[] = {
	"snapshot and checkpoint", "copy and flush", "digests", "manifest",
	"checkpoint removal",
};

/* The last event of each step of backup n. */
static void
steps_of(unsigned n, uint64_t *end)
{
	char data[32];

	/* The point's image is made right after the instant (whichever
	 * place the record's checkpoint went to: a sidecar, or a raw
	 * disk's or the qcow2 image itself). */
	snprintf(data, sizeof data, "/%04u.qcow2", n);
	end[S_SNAPSHOT] = find_event(G.bstart[n], G.bdone[n], data);
	end[S_COPY] = find_event(end[S_SNAPSHOT], G.bdone[n], ".digests.tmp");
	end[S_DIGESTS] = find_event(end[S_COPY], G.bdone[n], ".json.tmp");
	end[S_MANIFEST] = manifest_durable(n);
	end[S_END] = G.bdone[n];
}

/* Which step of backup n a crash before event k (inside it) cuts. */
static unsigned
step_of(unsigned n, uint64_t k)
{
	uint64_t end[STEPS];

	steps_of(n, end);
	for (unsigned s = 0; s < STEPS; s++)
		if (k <= end[s])
			return s;
	return S_END;
}

struct tally {
	unsigned failures, replayed[REC_VARIANTS], with_points[POINTS + 2];
	unsigned crashed_seen;
	unsigned in_backup[POINTS + 1], between, in_cancelled, steps[STEPS];
	bool kept;
};

static uint64_t seed;

static void __attribute__((format(printf, 3, 4)))
fail_at(struct tally *t, const struct crash *c, const char *fmt, ...)
{
	char msg[1024];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	t->failures++;
	fprintf(stderr, "FAIL BM_CRASH_SEED=%" PRIu64 " %s crash point #%u: "
		"k=%" PRIu64 " (after event %" PRIu64 ": %s), variant %s: "
		"%s\n", seed, G.sc->name, c->index, c->k, c->k - 1,
		rec_describe(c->k - 1), variant_names[c->variant], msg);
	if (getenv("BM_CRASH_KEEP") && !t->kept) {
		char cmd[512];

		snprintf(cmd, sizeof cmd, "cp -a %s %s.fail", G.root, G.root);
		if (system(cmd) == 0)
			fprintf(stderr, "  kept in %s.fail\n", G.root);
		t->kept = true;
	}
}

/* Every block holds the newest write durable at k, or one submitted
 * after it.  0, or -1 with the reason in msg. */
static int
check_disk(uint64_t k, const uint8_t *disk, char *msg, size_t len)
{
	uint8_t want[BLOCK];

	for (uint64_t b = 0; b < NBLOCKS; b++) {
		const uint32_t *L = G.bops + G.bstart_of[b];
		size_t n = G.blen[b], d = SIZE_MAX, first = 0;
		bool ok = false;

		for (size_t j = 0; j < n; j++)
			if (G.ops[L[j]].durable <= k) {
				d = L[j];
				first = j + 1;
			}
		content(d, b, want);
		ok = !memcmp(want, disk + b * BLOCK, BLOCK);
		for (size_t j = first; !ok && j < n && G.ops[L[j]].submit < k;
		     j++) {
			content(L[j], b, want);
			ok = !memcmp(want, disk + b * BLOCK, BLOCK);
		}
		if (!ok) {
			snprintf(msg, len, "block %" PRIu64 " holds neither the "
				 "durable write %s%zd nor a later one", b,
				 d == SIZE_MAX ? "(initial) " : "#",
				 d == SIZE_MAX ? (ssize_t)-1 : (ssize_t)d);
			return -1;
		}
	}
	return 0;
}

/* Restore point n and compare it with `want`: 0, or -1 with msg. */
static int
check_restore(unsigned n, const uint8_t *want, uint8_t *buf, char *msg,
	      size_t len)
{
	char path[160];
	int fd, r = 0;

	snprintf(path, sizeof path, "%s/restore.raw", G.out);
	unlink(path);
	if (blockmirror_backup_restore(G.bdir, n, path,
				       BLOCKMIRROR_FORMAT_RAW, NULL, NULL,
				       NULL) < 0) {
		snprintf(msg, len, "restoring point %u: %s", n,
			 blockmirror_last_error());
		return -1;
	}
	fd = open(path, O_RDONLY);
	if (fd < 0 || pread(fd, buf, DISK_SIZE, 0) != (ssize_t)DISK_SIZE) {
		snprintf(msg, len, "reading the restored point %u", n);
		r = -1;
	}
	for (uint64_t off = 0; r == 0 && off < DISK_SIZE; off += BLOCK)
		if (memcmp(buf + off, want + off, BLOCK)) {
			snprintf(msg, len, "point %u restores with %" PRIu64
				 " differing from its instant", n, off);
			r = -1;
		}
	if (fd >= 0)
		close(fd);
	unlink(path);
	return r;
}

/* Open the disk the crash left, with tracking. */
static struct blockmirror_disk *
reopen(bool *crashed, bool *in_image)
{
	struct blockmirror_disk *disk =
		blockmirror_disk_open(G.image, G.sc->format, 0);
	char *where = NULL;

	if (!disk)
		return NULL;
	if (blockmirror_disk_start_thread(disk) < 0 ||
	    blockmirror_disk_track(disk, NULL, 0, crashed) < 0 ||
	    blockmirror_disk_track_record(disk, &where, in_image) < 0) {
		char msg[512];

		snprintf(msg, sizeof msg, "%s", blockmirror_last_error());
		blockmirror_disk_close(disk);
		fprintf(stderr, "%s\n", msg);
		return NULL;
	}
	free(where);
	return disk;
}

static void
replay(struct crash *c, struct tally *t, uint8_t *cur, uint8_t *buf)
{
	struct blockmirror_backup_options o = { .size = sizeof o };
	struct blockmirror_backup_point res, *list = NULL;
	struct blockmirror_backup_check chk;
	struct blockmirror_checkpoint *cps = NULL;
	struct blockmirror_disk *disk;
	unsigned done = 0, started = 0;
	size_t count = 0, ncp = 0;
	bool crashed = false, in_image = false;
	char msg[1024];
	int r;

	r = rec_materialize(c->k, c->variant, &c->rng);
	ck_assert_msg(r == 0, "rebuilding crash point %u: %s", c->index,
		      strerror(-r));
	t->replayed[c->variant]++;
	for (unsigned n = 1; n <= POINTS; n++) {
		done += G.bdone[n] < c->k;
		started += G.bstart[n] < c->k;
	}
	if (c->k > G.cstart && c->k <= G.cdone) {
		t->in_cancelled++;
	} else if (started > done) {
		t->in_backup[started]++;
		t->steps[step_of(started, c->k)]++;
	} else {
		t->between++;
	}

	disk = reopen(&crashed, &in_image);
	if (!disk) {
		fail_at(t, c, "the disk does not reopen with tracking: %s",
			blockmirror_last_error());
		return;
	}
	t->crashed_seen += crashed;
	/* A qcow2 image's record in its bitmaps does not say (docs/cbt.md:
	 * it needs no in-use flag); a sidecar does. */
	if (c->k > G.tracking && c->k <= G.close_start && !crashed &&
	    !in_image) {
		fail_at(t, c, "the tracker was open at the crash, and the "
			"sidecar does not say so");
		goto out;
	}
	if (c->k > G.closed && crashed) {
		fail_at(t, c, "crashed after a clean close");
		goto out;
	}
	if (blockmirror_disk_read(disk, cur, DISK_SIZE, 0) < 0) {
		fail_at(t, c, "reading the disk: %s", blockmirror_last_error());
		goto out;
	}
	if (check_disk(c->k, cur, msg, sizeof msg) < 0) {
		fail_at(t, c, "the disk: %s", msg);
		goto out;
	}

	/* Whole points only: all that were done, maybe the running one. */
	if (blockmirror_backup_list(G.bdir, &list, &count) < 0) {
		fail_at(t, c, "listing: %s", blockmirror_last_error());
		goto out;
	}
	t->with_points[count]++;
	if (count < done || count > started) {
		fail_at(t, c, "%zu points listed; %u backups were done and %u "
			"started", count, done, started);
		goto out;
	}
	for (size_t i = 0; i < count; i++)
		if (list[i].number != i + 1 || list[i].incremental != (i > 0)) {
			fail_at(t, c, "point %zu is listed as %u (%s)", i + 1,
				list[i].number, list[i].incremental ?
				"incremental" : "full");
			goto out;
		}
	if (count && (blockmirror_backup_verify(G.bdir, disk, &chk) < 0 ||
		      chk.points != count)) {
		fail_at(t, c, "verify (with the live disk): %s",
			blockmirror_last_error());
		goto out;
	}
	for (unsigned n = 1; n <= count; n++)
		if (check_restore(n, G.instant[n], buf, msg, sizeof msg) < 0) {
			fail_at(t, c, "%s", msg);
			goto out;
		}

	/* The next backup: the chain goes on, by the record. */
	o.dir = G.bdir;
	o.incremental = count > 0;
	if (blockmirror_backup(disk, &o, &res) < 0) {
		fail_at(t, c, "the next backup: %s", blockmirror_last_error());
		goto out;
	}
	if (res.number != count + 1 || res.incremental != (count > 0) ||
	    res.healed) {
		fail_at(t, c, "the next backup is point %u, %s%s", res.number,
			res.incremental ? "incremental" : "full",
			res.healed ? ", healed: the record was not trusted" :
			"");
		goto out;
	}
	if (check_restore(res.number, cur, buf, msg, sizeof msg) < 0) {
		fail_at(t, c, "the next backup: %s", msg);
		goto out;
	}
	if (blockmirror_backup_verify(G.bdir, disk, &chk) < 0 ||
	    chk.points != count + 1) {
		fail_at(t, c, "verify after the next backup: %s",
			blockmirror_last_error());
		goto out;
	}
	/* Only the new point's checkpoint is left: of its chain, and of a
	 * full backup that died after its instant (a new chain no manifest
	 * names; the mark it left before its instant names it). */
	if (blockmirror_checkpoint_list(disk, &cps, &ncp) < 0) {
		fail_at(t, c, "listing checkpoints: %s",
			blockmirror_last_error());
		goto out;
	}
	for (size_t i = 0; i < ncp; i++) {
		if (strcmp(cps[i].name, res.checkpoint)) {
			fail_at(t, c, "checkpoint %s is left beside %s",
				cps[i].name, res.checkpoint);
			goto out;
		}
	}
out:
	free(list);
	free(cps);
	blockmirror_disk_close(disk);
}

/* ---- the record rightly refused ------------------------------------------ */

static void
copy_file(const char *from, const char *to)
{
	char cmd[512];

	snprintf(cmd, sizeof cmd, "cp %s %s", from, to);
	ck_assert_int_eq(system(cmd), 0);
}

/*
 * The disk as a crash left it before point 3 (2 points, the sentinel
 * write made since point 2) must heal: point 3 holds the sentinel.
 */
static void
check_healed(struct blockmirror_disk *disk, const char *why, uint8_t *cur,
	     uint8_t *buf)
{
	struct blockmirror_backup_options o = { .size = sizeof o };
	struct blockmirror_backup_point res;
	uint8_t want[BLOCK];
	char msg[512];

	ck_assert_int_eq(blockmirror_disk_read(disk, cur, DISK_SIZE, 0), 0);
	/* A change the record since point 2 would have had to hold. */
	content(G.sentinel, SENTINEL_BLK, want);
	ck_assert_msg(!memcmp(cur + SENTINEL_BLK * BLOCK, want, BLOCK) &&
		      memcmp(G.instant[2] + SENTINEL_BLK * BLOCK, want, BLOCK),
		      "%s: the sentinel write is not a change since point 2",
		      why);
	o.dir = G.bdir;
	o.incremental = true;
	ck_assert_msg(blockmirror_backup(disk, &o, &res) == 0, "%s: %s", why,
		      blockmirror_last_error());
	ck_assert_msg(res.number == 3 && res.incremental && res.healed,
		      "%s: point %u, %s, %s", why, res.number,
		      res.incremental ? "incremental" : "full",
		      res.healed ? "healed" : "by the record");
	ck_assert_uint_ge(res.bytes_changed, BLOCK);
	ck_assert_msg(check_restore(3, cur, buf, msg, sizeof msg) == 0,
		      "%s: %s", why, msg);
	fprintf(stderr, "%s: %s: refused, point 3 healed (%" PRIu64 " bytes "
		"differed from point 2) and equals the disk\n", G.sc->name,
		why, res.bytes_changed);
}

/*
 * Crash states where trusting the record would lose a change, and the
 * design refuses it:
 *  - a raw disk's sidecar replaced by an older copy (from before point
 *    2's checkpoint): the newest point's checkpoint is not in it;
 *  - a qcow2 disk's record is in the image: a process that opens it
 *    without tracking, writes and closes clears the bitmaps' autoclear
 *    bit, and the record is untrusted when tracking comes back;
 *  - after the crash, a process opens the disk without tracking and
 *    writes: turning tracking on is refused (-ESTALE), since no bitmap
 *    holds that write.
 * In both, the next incremental point heals by digests and is complete.
 */
static void
rightly_refused(uint8_t *cur, uint8_t *buf)
{
	struct blockmirror_disk *disk;
	uint64_t rng = 3;
	uint8_t data[BLOCK];
	char old[160];
	bool crashed, in_image;

	memset(data, 0x5a, sizeof data);
	if (G.sc->format == BLOCKMIRROR_FORMAT_QCOW2) {
		rec_rewind();
		ck_assert_int_eq(rec_materialize(G.bstart[3], REC_DURABLE_ONLY,
						 &rng), 0);
		disk = blockmirror_disk_open(G.image, G.sc->format, 0);
		ck_assert_msg(disk, "%s", blockmirror_last_error());
		ck_assert_int_eq(blockmirror_disk_write(disk, data, BLOCK,
							(SENTINEL_BLK + 5) *
							BLOCK, 0), 0);
		ck_assert_int_eq(blockmirror_disk_close(disk), 0);
		disk = reopen(&crashed, &in_image);
		ck_assert_msg(disk && in_image, "written without tracking: %s",
			      blockmirror_last_error());
		check_healed(disk, "written without tracking, closed", cur,
			     buf);
		ck_assert_msg(!memcmp(cur + (SENTINEL_BLK + 5) * BLOCK, data,
				      BLOCK),
			      "the untracked write is not on the disk");
		ck_assert_int_eq(blockmirror_disk_close(disk), 0);
	} else {
		snprintf(old, sizeof old, "%s/old-sidecar", G.out);
		rec_rewind();
		ck_assert_int_eq(rec_materialize(G.bstart[2], REC_ALL, &rng),
				 0);
		copy_file(G.side, old);
		ck_assert_int_eq(rec_materialize(G.bstart[3], REC_DURABLE_ONLY,
						 &rng), 0);
		copy_file(old, G.side);
		disk = reopen(&crashed, &in_image);
		ck_assert_msg(disk, "an older sidecar: %s",
			      blockmirror_last_error());
		check_healed(disk, "an older sidecar", cur, buf);
		ck_assert_int_eq(blockmirror_disk_close(disk), 0);
	}

	rec_rewind();
	ck_assert_int_eq(rec_materialize(G.bstart[3], REC_DURABLE_ONLY, &rng),
			 0);
	disk = blockmirror_disk_open(G.image, G.sc->format, 0);
	ck_assert_msg(disk, "%s", blockmirror_last_error());
	ck_assert_int_eq(blockmirror_disk_start_thread(disk), 0);
	ck_assert_int_eq(blockmirror_disk_write(disk, data, BLOCK,
						(SENTINEL_BLK + 5) * BLOCK,
						0), 0);
	ck_assert_int_eq(blockmirror_disk_track(disk, NULL, 0, &crashed),
			 -ESTALE);
	check_healed(disk, "writes without tracking", cur, buf);
	ck_assert_msg(!memcmp(cur + (SENTINEL_BLK + 5) * BLOCK, data, BLOCK),
		      "the untracked write is not on the disk");
	ck_assert_int_eq(blockmirror_disk_close(disk), 0);
}

static int
cmp_crash(const void *a, const void *b)
{
	const struct crash *x = a, *y = b;

	return x->k < y->k ? -1 : x->k > y->k;
}

#define FIXED (2 * POINTS - 1)


/*
 * Crash points: a third right after flush points (evenly through them),
 * a third inside the backups (each step of each one in turn, and the
 * cancelled one), a third
 * anywhere; the variants take turns within each third.  Then the
 * fixed cases (FIXED of them).
 */
static struct crash *
choose(unsigned points, uint64_t *rng, unsigned *out)
{
	uint64_t nev = rec_now(), *fps = malloc(nev * sizeof *fps), nfp = 0;
	struct crash *cs = calloc(points + FIXED, sizeof *cs);

	for (uint64_t s = 0; s < nev; s++)
		if (rec_is_flush_point(s))
			fps[nfp++] = s + 1;
	for (unsigned i = 0; i < points; i++) {
		struct crash *c = &cs[i];
		unsigned third = i % 3, j = i / 3, per = (points + 2) / 3;

		c->index = i;
		c->rng = rec_rand(rng);
		c->variant = (enum rec_variant)(j % REC_VARIANTS);
		if (third == 0 && nfp) {
			c->k = fps[(uint64_t)j * nfp / per];
		} else if (third == 1 && j % (POINTS + 1) == POINTS) {
			c->k = G.cstart + 1 + rec_rand(rng) % (G.cdone -
							       G.cstart);
		} else if (third == 1) {
			/* Each step of each backup in turn, anywhere in it;
			 * and the cancelled backup. */
			unsigned n = 1 + j % (POINTS + 1);
			unsigned st = j / (POINTS + 1) % STEPS;
			uint64_t end[STEPS], from;

			steps_of(n, end);
			from = st ? end[st - 1] : G.bstart[n];
			c->k = from + 1 + rec_rand(rng) % (end[st] - from);
		} else {
			c->k = 1 + rec_rand(rng) % nev;
		}
	}
	/* Fixed cases, only what was durable: a crash right after each
	 * backup returned (the point is there); a crash right after an
	 * incremental point's manifest, before the previous checkpoint is
	 * removed (the next backup removes it). */
	for (unsigned f = 0; f < FIXED; f++) {
		struct crash *c = &cs[points + f];

		c->index = points + f;
		c->k = f < POINTS ? G.bdone[f + 1] + 1
			: manifest_durable(f - POINTS + 2) + 1;
		c->variant = REC_DURABLE_ONLY;
	}
	free(fps);
	qsort(cs, points + FIXED, sizeof *cs, cmp_crash);
	*out = points + FIXED;
	return cs;
}

START_TEST(test_power_loss)
{
	unsigned points = (unsigned)((env_u64("BM_CRASH_POINTS", 360) +
				      SCENARIOS - 1) / SCENARIOS), n;
	uint64_t rng = seed ^ (0x5bd1e995ull * (uint64_t)(_i + 1));
	uint64_t t0 = now_ms(), t1, w, f, nn, bytes, nofua;
	uint8_t *cur = aligned_alloc(BLOCK, DISK_SIZE);
	uint8_t *buf = aligned_alloc(BLOCK, DISK_SIZE);
	struct tally t = { 0 };
	struct crash *cs;

	blockmirror_set_log(log_silent, NULL, BLOCKMIRROR_LOG_ERROR);
	setup(&scenarios[_i]);
	G.rng = rec_rand(&rng);
	record();
	compute_durability();
	t1 = now_ms();
	cs = choose(points, &rng, &n);
	for (unsigned i = 0; i < n && t.failures < MAX_FAILURES; i++)
		replay(&cs[i], &t, cur, buf);
	if (!t.failures)
		rightly_refused(cur, buf);
	rec_stats(&w, &f, &nn, &bytes, &nofua);
	fprintf(stderr, "%s: seed %" PRIu64 ", recorded %" PRIu64 " events "
		"(%" PRIu64 " writes, %" PRIu64 " flushes, %" PRIu64 " name "
		"ops, %zu guest requests) in %.1f s; replayed %u crash points "
		"in %.1f s: durable-only %u, all %u, random %u; between "
		"backups %u, in backup 1/2/3 %u/%u/%u, in the cancelled one %u; with 0/1/2/3 points "
		"%u/%u/%u/%u; crashed %u; %u failures\n", G.sc->name, seed, rec_now(), w, f,
		nn, G.nops, (double)(t1 - t0) / 1000, n,
		(double)(now_ms() - t1) / 1000, t.replayed[0], t.replayed[1],
		t.replayed[2], t.between, t.in_backup[1], t.in_backup[2],
		t.in_backup[3], t.in_cancelled, t.with_points[0], t.with_points[1],
		t.with_points[2], t.with_points[3], t.crashed_seen,
		t.failures);
	for (unsigned s = 0; s < STEPS; s++)
		fprintf(stderr, "%s:   %u crash points in the step \"%s\"\n",
			G.sc->name, t.steps[s], step_names[s]);
	rec_free();
	free(cs);
	free(cur);
	free(buf);
	teardown(t.failures && getenv("BM_CRASH_KEEP"));
	ck_assert_msg(t.failures == 0, "%s: %u crash points failed (seed %"
		      PRIu64 ", see above)", scenarios[_i].name, t.failures,
		      seed);
}
END_TEST

int
main(void)
{
	Suite *s = suite_create("backup-crash");
	TCase *tc = tcase_create("power-loss");

	seed = env_seed("BM_CRASH_SEED");
	/* Under AddressSanitizer a run takes a few times longer. */
	tcase_set_timeout(tc, 540);
	tcase_add_loop_test(tc, test_power_loss, 0, SCENARIOS);
	suite_add_tcase(s, tc);
	return run_suite(s) ? EXIT_FAILURE : EXIT_SUCCESS;
}
