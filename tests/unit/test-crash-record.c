/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Crash consistency, not only SIGKILL (DESIGN.md rule 10, docs/state.md).
 *
 * A guest writes through a disk opened on a symlink `link` while a job
 * with a state directory moves it (active or background mode) and then
 * pivots or is cancelled; one scenario first leaves a half-done move
 * behind (a process that dies mid-copy) and records its resumption.  The
 * crash recorder (recorder.h) logs every write, zero, discard, flush and
 * FUA the engine issues to the source, the destination and the state
 * file, and every name operation and fsync of lib/durable.c.
 *
 * Then, for a few thousand crash points (every flush point and random
 * events, each with only the durable writes, all of them, or a random
 * torn subset; name operations not covered by a directory fsync may be
 * lost), the files a crash may have left are rebuilt in the same
 * directory and the library recovers them as a hypervisor would:
 * blockmirror_recover on the link and, for RESUME and RESTART,
 * blockmirror_job_start_recovered and a pivot.  What must hold:
 *
 *  - recovery succeeds, and the image the link names holds every guest
 *    write that was durable at the crash: acknowledged with FUA, or
 *    acknowledged before a guest flush that was acknowledged;
 *  - a resumed (or restarted) move completes, and the image the link then
 *    names holds them too: a state is either valid or rejected, never one
 *    that makes a resumed move skip a durable write.
 *
 * Each sector the guest writes carries its write's id, so a sector read
 * back says which write it holds; the allowed contents of a sector are
 * the newest durable write to it and anything written after.
 *
 * BM_CRASH_POINTS sets how many crash points in all (default 2000),
 * BM_CRASH_SEED the seed (printed with every failure; the engine's
 * timing still varies between runs, so a seed replays the workload and
 * the crash choices, not the exact interleaving), BM_CRASH_KEEP=1 keeps
 * the files of the first failing crash points (their path is printed).
 */

#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <blockmirror/blockmirror.h>

#include "fault.h"
#include "helpers.h"
#include "recorder.h"

#define SECT 4096u
#define SIZE (8u << 20)            /* two 4 MiB state regions */
#define NSECT (SIZE / SECT)
#define GRANULARITY 65536u
#define MAX_OPS 60000
#define QD 4
#define MAGIC 0xb10c000000000000ull
#define CHILD_GID 1000000u         /* ids of the writes before a resume */
#define NEVER UINT64_MAX
#define MAX_FAILURES 8

/* ---- scenarios --------------------------------------------------------- */

enum ending { END_PIVOT, END_CANCEL_READY, END_CANCEL_EARLY };

static const struct scenario {
	const char *name;
	enum blockmirror_mode mode;
	enum ending end;
	bool resume;                   /* take up a move a crash left */
	bool serve_order;              /* the guest writes before the move
					  is taken up (bmirror serve's
					  order); BM_CRASH_SERVE_ORDER=1 */
} scenarios[] = {
	{ "background-pivot", BLOCKMIRROR_MODE_BACKGROUND, END_PIVOT, false },
	{ "active-pivot", BLOCKMIRROR_MODE_ACTIVE, END_PIVOT, false },
	{ "background-cancel", BLOCKMIRROR_MODE_BACKGROUND, END_CANCEL_READY,
	  false },
	{ "active-cancel-early", BLOCKMIRROR_MODE_ACTIVE, END_CANCEL_EARLY,
	  false },
	{ "background-resume-pivot", BLOCKMIRROR_MODE_BACKGROUND, END_PIVOT,
	  true },
	{ "active-resume-pivot", BLOCKMIRROR_MODE_ACTIVE, END_PIVOT, true },
	{ "background-resume-serve-order", BLOCKMIRROR_MODE_BACKGROUND,
	  END_PIVOT, true, true },
};
#define SCENARIOS (int)(sizeof scenarios / sizeof scenarios[0])

/* ---- the guest's model ------------------------------------------------- */

enum gkind { G_WRITE, G_ZERO, G_FLUSH };

struct gop {
	enum gkind kind;
	uint32_t gid;
	uint64_t sect, nsect;
	bool fua;
	uint64_t submit, ack;  /* recorder sequence numbers */
	int err;
	uint64_t durable;      /* from which crash point it must survive */
	uint8_t *buf;
};

static struct {
	char root[256], src[PATH_MAX], link[PATH_MAX];
	char dstdir[PATH_MAX], dst[PATH_MAX], state_dir[512];
	char state_file[PATH_MAX];
	uint8_t *initial;              /* the source before the recording */
	struct gop *ops;
	atomic_size_t nops;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	int inflight;
	size_t inflight_ops[QD];
	atomic_bool stop;
	struct blockmirror_disk *disk;
	uint64_t rng;
	uint32_t gid_base;
	/* per sector: the guest ops touching it, in submission order */
	uint32_t *sect_ops, *sect_start, *sect_len;
} G = { .lock = PTHREAD_MUTEX_INITIALIZER, .cond = PTHREAD_COND_INITIALIZER };

static uint64_t
pattern_word(uint32_t gid, uint64_t sect, unsigned i)
{
	return rec_pattern_word(MAGIC, gid, sect, i);
}

static void
fill(uint8_t *buf, uint32_t gid, uint64_t sect, uint64_t nsect)
{
	for (uint64_t s = 0; s < nsect; s++) {
		uint64_t *w = (uint64_t *)(buf + s * SECT);

		for (unsigned i = 0; i < SECT / 8; i++)
			w[i] = pattern_word(gid, sect + s, i);
	}
}

/* The write id a sector holds, or -1 if it holds no whole pattern. */
static int64_t
sector_gid(const uint8_t *p, uint64_t sect)
{
	const uint64_t *w = (const uint64_t *)p;
	uint64_t x = w[0] ^ MAGIC;
	uint32_t gid = (uint32_t)(x >> 24);

	if ((x & 0xffffff) != sect || (w[0] & 0xffff000000000000ull) != MAGIC)
		return -1;
	for (unsigned i = 1; i < SECT / 8; i++)
		if (w[i] != pattern_word(gid, sect, i))
			return -1;
	return gid;
}

static bool
all_zero(const uint8_t *p, size_t n)
{
	static const uint8_t z[SECT];

	return memcmp(p, z, n) == 0;
}

static void
guest_done(void *data, int err)
{
	size_t i = (size_t)(uintptr_t)data;
	struct gop *op = &G.ops[i];

	op->ack = rec_event("guest ack %s g%u%s (%d)",
			    op->kind == G_FLUSH ? "flush"
			    : op->kind == G_ZERO ? "zero" : "write",
			    op->gid, op->fua ? " FUA" : "", err);
	op->err = err;
	pthread_mutex_lock(&G.lock);
	for (int j = 0; j < G.inflight; j++)
		if (G.inflight_ops[j] == i) {
			G.inflight_ops[j] = G.inflight_ops[--G.inflight];
			break;
		}
	pthread_cond_broadcast(&G.cond);
	pthread_mutex_unlock(&G.lock);
}

static bool
overlaps_inflight(uint64_t sect, uint64_t n)
{
	for (int j = 0; j < G.inflight; j++) {
		struct gop *o = &G.ops[G.inflight_ops[j]];

		if (o->kind != G_FLUSH && sect < o->sect + o->nsect &&
		    o->sect < sect + n)
			return true;
	}
	return false;
}

/* Issue one guest request; false when out of room. */
static bool
guest_issue(enum gkind kind)
{
	size_t i = atomic_load(&G.nops);
	struct gop *op;
	int r;

	if (i >= MAX_OPS)
		return false;
	op = &G.ops[i];
	memset(op, 0, sizeof *op);
	op->kind = kind;
	op->gid = G.gid_base + (uint32_t)i;
	op->ack = op->durable = NEVER;
	pthread_mutex_lock(&G.lock);
	while (G.inflight >= QD)
		pthread_cond_wait(&G.cond, &G.lock);
	if (kind != G_FLUSH) {
		/* Overlapping requests never fly together: each sector's
		 * writes are then ordered. */
		do {
			op->nsect = 1 + rec_rand(&G.rng) % 8;
			op->sect = rec_rand(&G.rng) % (NSECT - op->nsect);
		} while (overlaps_inflight(op->sect, op->nsect));
		op->fua = rec_rand(&G.rng) % 10 < 3;
	}
	G.inflight_ops[G.inflight++] = i;
	pthread_mutex_unlock(&G.lock);
	atomic_store(&G.nops, i + 1);

	if (kind == G_WRITE) {
		op->buf = malloc(op->nsect * SECT);
		fill(op->buf, op->gid, op->sect, op->nsect);
	}
	op->submit = rec_event("guest submit %s g%u [%" PRIu64 ", +%" PRIu64
			       ")%s", kind == G_FLUSH ? "flush"
			       : kind == G_ZERO ? "zero" : "write", op->gid,
			       op->sect, op->nsect, op->fua ? " FUA" : "");
	unsigned fl = op->fua ? BLOCKMIRROR_REQ_FUA : 0;
	void *ud = (void *)(uintptr_t)i;

	switch (kind) {
	case G_WRITE:
		r = blockmirror_disk_aio_write(G.disk, op->buf,
					       op->nsect * SECT,
					       op->sect * SECT, fl,
					       guest_done, ud);
		break;
	case G_ZERO:
		if (rec_rand(&G.rng) % 2)
			fl |= BLOCKMIRROR_REQ_MAY_TRIM;
		r = blockmirror_disk_aio_write_zeroes(G.disk,
						      op->nsect * SECT,
						      op->sect * SECT, fl,
						      guest_done, ud);
		break;
	default:
		r = blockmirror_disk_aio_flush(G.disk, guest_done, ud);
		break;
	}
	if (r < 0)
		guest_done(ud, r); /* never acknowledged as a success */
	return true;
}

static void
guest_drain(void)
{
	pthread_mutex_lock(&G.lock);
	while (G.inflight)
		pthread_cond_wait(&G.cond, &G.lock);
	pthread_mutex_unlock(&G.lock);
}

static void *
guest_thread(void *arg)
{
	(void)arg;
	while (!atomic_load(&G.stop)) {
		unsigned x = rec_rand(&G.rng) % 100;
		enum gkind k = x < 12 ? G_FLUSH : x < 27 ? G_ZERO : G_WRITE;

		if (!guest_issue(k))
			break;
		/* Bursts and idle gaps: regions go clean, then are written
		 * again while the state saves their clearing. */
		if (rec_rand(&G.rng) % 16 == 0)
			usleep(5000 + rec_rand(&G.rng) % 30000);
		else
			usleep(rec_rand(&G.rng) % 1500);
	}
	guest_drain();
	return NULL;
}

/* From which crash point each guest write must survive. */
static void
compute_durability(void)
{
	size_t n = atomic_load(&G.nops);
	uint64_t *fsub = NULL, *fack = NULL;
	size_t nf = 0;

	fsub = malloc(n * sizeof *fsub);
	fack = malloc(n * sizeof *fack);
	/* Flushes in submission order (the guest thread submits in order). */
	for (size_t i = 0; i < n; i++)
		if (G.ops[i].kind == G_FLUSH && G.ops[i].err == 0 &&
		    G.ops[i].ack != NEVER) {
			fsub[nf] = G.ops[i].submit;
			fack[nf++] = G.ops[i].ack;
		}
	/* suffix minimum of the acknowledgements */
	for (size_t j = nf; j-- > 1;)
		if (fack[j] < fack[j - 1])
			fack[j - 1] = fack[j];
	for (size_t i = 0; i < n; i++) {
		struct gop *op = &G.ops[i];

		if (op->kind == G_FLUSH || op->err || op->ack == NEVER)
			continue;
		if (op->fua) {
			op->durable = op->ack + 1;
			continue;
		}
		for (size_t j = 0; j < nf; j++)
			if (fsub[j] > op->ack) {
				op->durable = fack[j] + 1;
				break;
			}
	}
	free(fsub);
	free(fack);

	/* Per sector lists. */
	free(G.sect_ops);
	free(G.sect_start);
	free(G.sect_len);
	G.sect_start = calloc(NSECT + 1, sizeof *G.sect_start);
	G.sect_len = calloc(NSECT, sizeof *G.sect_len);
	for (size_t i = 0; i < n; i++)
		if (G.ops[i].kind != G_FLUSH)
			for (uint64_t s = 0; s < G.ops[i].nsect; s++)
				G.sect_start[G.ops[i].sect + s + 1]++;
	for (uint64_t s = 0; s < NSECT; s++)
		G.sect_start[s + 1] += G.sect_start[s];
	G.sect_ops = malloc((G.sect_start[NSECT] + 1) * sizeof *G.sect_ops);
	for (size_t i = 0; i < n; i++)
		if (G.ops[i].kind != G_FLUSH)
			for (uint64_t s = 0; s < G.ops[i].nsect; s++) {
				uint64_t x = G.ops[i].sect + s;

				G.sect_ops[G.sect_start[x] + G.sect_len[x]++] =
					(uint32_t)i;
			}
}

/*
 * Does the image at `path` hold, in every sector, the newest write that
 * was durable before crash point k, or something written after it?
 * 0, or -1 with the reason in msg.
 */
static int
check_image(const char *path, uint64_t k, char *msg, size_t msz)
{
	int fd = open(path, O_RDONLY), r = 0;
	uint8_t *img = MAP_FAILED;
	struct stat st;

	if (fd < 0 || fstat(fd, &st) < 0) {
		snprintf(msg, msz, "%s: %s", path, strerror(errno));
		r = -1;
		goto out;
	}
	if (st.st_size != SIZE) {
		snprintf(msg, msz, "%s: %lld bytes, not %u", path,
			 (long long)st.st_size, SIZE);
		r = -1;
		goto out;
	}
	img = mmap(NULL, SIZE, PROT_READ, MAP_SHARED | MAP_POPULATE, fd, 0);
	if (img == MAP_FAILED) {
		snprintf(msg, msz, "%s: mmap: %s", path, strerror(errno));
		r = -1;
		goto out;
	}
	for (uint64_t s = 0; s < NSECT && r == 0; s++) {
		const uint8_t *p = img + s * SECT;
		uint32_t *L = G.sect_ops + G.sect_start[s];
		uint32_t n = G.sect_len[s];
		int64_t d = -1, gid;
		bool ok = false, zero = all_zero(p, SECT);

		for (uint32_t j = 0; j < n; j++)
			if (G.ops[L[j]].durable <= k)
				d = j;
		if (d < 0 && memcmp(p, G.initial + s * SECT, SECT) == 0)
			continue;
		gid = zero ? -1 : sector_gid(p, s);
		for (uint32_t j = d < 0 ? 0 : (uint32_t)d; j < n && !ok; j++) {
			struct gop *o = &G.ops[L[j]];

			if (j != (uint32_t)d && o->submit >= k)
				break;
			if (o->kind == G_ZERO ? zero : gid == o->gid)
				ok = true;
		}
		if (!ok) {
			struct gop *o = d >= 0 ? &G.ops[L[d]] : NULL;
			char found[32];

			if (zero)
				snprintf(found, sizeof found, "zeroes");
			else if (gid < 0)
				snprintf(found, sizeof found, "garbage");
			else
				snprintf(found, sizeof found, "g%" PRId64, gid);
			snprintf(msg, msz, "%s: sector %" PRIu64 " (offset %"
				 PRIu64 ") holds %s; the durable content is "
				 "%s g%u (acked at event %" PRIu64 "%s, "
				 "durable from %" PRIu64 ")", path, s,
				 s * SECT, found,
				 !o ? "the initial" : o->kind == G_ZERO ?
				 "zero" : "write", o ? o->gid : 0,
				 o ? o->ack : 0, o && o->fua ? ", FUA" : "",
				 o ? o->durable : 0);
			r = -1;
		}
	}
out:
	if (fd >= 0)
		close(fd);
	if (img != MAP_FAILED)
		munmap(img, SIZE);
	return r;
}

/* ---- setting up ------------------------------------------------------- */

static void
fsync_path(const char *p)
{
	int fd = open(p, O_RDONLY);

	if (fd >= 0) {
		fsync(fd);
		close(fd);
	}
}

static void
setup_paths(void)
{
	const char *base = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";

	snprintf(G.root, sizeof G.root, "%s/test-crash-record.XXXXXX", base);
	ck_assert_ptr_nonnull(mkdtemp(G.root));
	snprintf(G.src, sizeof G.src, "%s/src", G.root);
	snprintf(G.link, sizeof G.link, "%s/link", G.root);
	snprintf(G.dstdir, sizeof G.dstdir, "%s/new", G.root);
	snprintf(G.dst, sizeof G.dst, "%s/new/dst", G.root);
	snprintf(G.state_dir, sizeof G.state_dir, "%s/link.bmirror-state",
		 G.root);
	snprintf(G.state_file, sizeof G.state_file, "%s/state", G.state_dir);
}

/* The source (data in even MiBs, zeroes in odd), the link, the
 * destination's directory: all durable before anything is recorded. */
static void
make_initial(void)
{
	uint8_t *img = calloc(1, SIZE);
	int fd;

	for (uint64_t s = 0; s < NSECT; s++)
		if ((s * SECT >> 20) % 2 == 0)
			fill(img + s * SECT, 0, s, 1);
	fd = open(G.src, O_CREAT | O_WRONLY | O_TRUNC, 0644);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(pwrite(fd, img, SIZE, 0), SIZE);
	fsync(fd);
	close(fd);
	ck_assert_int_eq(symlink(G.src, G.link), 0);
	ck_assert_int_eq(mkdir(G.dstdir, 0755), 0);
	fsync_path(G.dstdir);
	fsync_path(G.root);
	free(img);
}

static void
job_options(struct blockmirror_job_options *o, const struct scenario *sc)
{
	memset(o, 0, sizeof *o);
	o->size = sizeof *o;
	o->flags = BLOCKMIRROR_JOB_CREATE;
	o->mode = sc->mode;
	o->granularity = GRANULARITY;
	o->link = G.link;
	o->state_dir = G.state_dir;
	/* Slow only where the copy must still run when the job ends. */
	o->speed = sc->end == END_CANCEL_EARLY ? (4u << 20) : 0;
}

/* A process that starts the move and dies in the middle of it, leaving
 * what a SIGKILL leaves (every completed write, nothing flushed more). */
static void
leave_half_done_move(const struct scenario *sc)
{
	pid_t pid = fork();
	int status;

	ck_assert_int_ge(pid, 0);
	if (pid == 0) {
		struct blockmirror_job_options o;
		struct blockmirror_state_info si = { .size = sizeof si };
		struct blockmirror_disk *disk;
		struct blockmirror_job *job;
		uint8_t buf[SECT];
		uint64_t t0;

		disk = blockmirror_disk_open(G.link, BLOCKMIRROR_FORMAT_RAW, 0);
		if (!disk || blockmirror_disk_start_thread(disk) < 0)
			_exit(2);
		job_options(&o, sc);
		o.speed = 3u << 20;
		job = blockmirror_job_start(disk, G.dst, &o);
		if (!job)
			_exit(3);
		/* Wait until a region has been cleared on disk, writing to
		 * the last one only, so that the others can go clean. */
		t0 = now_ms();
		for (int i = 0; now_ms() - t0 < 8000; i++) {
			uint64_t s = NSECT - 1 - rec_rand(&G.rng) % (NSECT / 3);

			fill(buf, CHILD_GID + (uint32_t)i, s, 1);
			if (blockmirror_disk_write(disk, buf, SECT, s * SECT,
						   0) < 0)
				_exit(4);
			usleep(5000);
			if (i % 20 == 0 &&
			    blockmirror_state_read(G.state_dir, &si) == 0) {
				bool cleared = si.regions_dirty < si.regions;

				free(si.source);
				free(si.destination);
				if (cleared && now_ms() - t0 > 1500)
					_exit(0);
			}
		}
		_exit(5);
	}
	ck_assert_int_eq(waitpid(pid, &status, 0), pid);
	ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0,
		      "the half-done move did not get far (status 0x%x)",
		      status);
}

static void
read_initial(void)
{
	int fd = open(G.src, O_RDONLY);

	ck_assert_int_ge(fd, 0);
	G.initial = malloc(SIZE);
	ck_assert_int_eq(pread(fd, G.initial, SIZE, 0), SIZE);
	close(fd);
}

/* ---- recording --------------------------------------------------------- */

static void
record(const struct scenario *sc)
{
	struct blockmirror_job_options o;
	struct blockmirror_recovery rec = { .size = sizeof rec };
	struct bm_fault_rules rules = { 0 };
	struct blockmirror_job *job;
	pthread_t thr;
	int r;

	/* A slow state file: the window in which a slot write is on its way
	 * is long enough for guest writes to arrive in it. */
	rules.write_delay_ns = 20 * 1000000ull;
	ck_assert_int_eq(bm_fault_register(G.state_file, &rules), 0);
	ck_assert_int_eq(rec_start(G.root), 0);

	G.disk = blockmirror_disk_open(G.link, BLOCKMIRROR_FORMAT_RAW, 0);
	ck_assert_ptr_nonnull(G.disk);
	ck_assert_int_eq(blockmirror_disk_start_thread(G.disk), 0);
	atomic_store(&G.stop, false);
	if (!sc->resume || sc->serve_order) {
		ck_assert_int_eq(pthread_create(&thr, NULL, guest_thread,
						NULL), 0);
		sleep_ms(50);
	}

	job_options(&o, sc);
	if (sc->resume) {
		r = blockmirror_recover(G.link, NULL, NULL, 0, &rec);
		ck_assert_msg(r == 0, "recover: %s", blockmirror_last_error());
		ck_assert_msg(rec.action == BLOCKMIRROR_RECOVER_RESUME,
			      "recovery of the half-done move: %s",
			      rec.message);
		job = blockmirror_job_start_recovered(G.disk, &rec, &o);
		blockmirror_recovery_free(&rec);
	} else {
		job = blockmirror_job_start(G.disk, G.dst, &o);
	}
	ck_assert_msg(job != NULL, "job: %s", blockmirror_last_error());
	if (sc->resume && !sc->serve_order)
		ck_assert_int_eq(pthread_create(&thr, NULL, guest_thread,
						NULL), 0);

	if (sc->end == END_CANCEL_EARLY) {
		sleep_ms(1300);
		ck_assert_int_eq(blockmirror_job_cancel(job, false), 0);
	} else {
		ck_assert_int_eq(blockmirror_job_wait(job,
						      BLOCKMIRROR_JOB_READY,
						      30000),
				 BLOCKMIRROR_JOB_READY);
		/* Long enough for clearing passes under guest writes. */
		sleep_ms(2100);
		if (sc->end == END_PIVOT)
			r = blockmirror_job_complete(job);
		else
			r = blockmirror_job_cancel(job, false);
		ck_assert_msg(r == 0, "ending the job: %s",
			      blockmirror_last_error());
	}
	/* The guest goes on, on whichever image it now runs. */
	sleep_ms(300);
	atomic_store(&G.stop, true);
	pthread_join(thr, NULL);
	guest_issue(G_FLUSH);
	guest_drain();
	blockmirror_job_free(job);
	ck_assert_int_eq(blockmirror_disk_close(G.disk), 0);
	G.disk = NULL;
	rec_stop();
	bm_fault_unregister(G.state_file);
}

/* ---- replaying --------------------------------------------------------- */

struct crash {
	uint64_t k;
	enum rec_variant variant;
	uint64_t rng;
	unsigned index;
};

static int
cmp_crash(const void *a, const void *b)
{
	const struct crash *x = a, *y = b;

	return x->k < y->k ? -1 : x->k > y->k ? 1 :
	       x->index < y->index ? -1 : x->index > y->index;
}

static const char *const variant_names[] = { "durable-only", "all",
					     "random" };
static const char *const action_names[] = { "none", "resume", "restart",
					    "switched", "discarded" };

struct tally {
	unsigned actions[5];
	unsigned resumed;
	unsigned failures;
	unsigned kept;
	uint64_t ms_build, ms_recover, ms_move; /* where the time goes */
};

static void __attribute__((format(printf, 5, 6)))
fail_at(struct tally *t, const struct scenario *sc, uint64_t seed,
	const struct crash *c, const char *fmt, ...)
{
	char msg[1024];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	t->failures++;
	fprintf(stderr, "FAIL BM_CRASH_SEED=%" PRIu64 " scenario %s crash "
		"point #%u: k=%" PRIu64 " (after event %" PRIu64 ": %s), "
		"variant %s: %s\n", seed, sc->name, c->index, c->k, c->k - 1,
		rec_describe(c->k - 1), variant_names[c->variant], msg);
	if (getenv("BM_CRASH_KEEP") && t->kept < 3) {
		char cmd[3 * PATH_MAX];

		snprintf(cmd, sizeof cmd, "cp -a %s %s.fail-%u", G.root,
			 G.root, c->index);
		if (system(cmd) == 0)
			fprintf(stderr, "  kept in %s.fail-%u\n", G.root,
				c->index);
		snprintf(cmd, sizeof cmd, "%s.fail-%u.events", G.root,
			 c->index);
		FILE *f = fopen(cmd, "w");

		for (uint64_t e = 0; f && e < rec_now(); e++)
			fprintf(f, "%" PRIu64 "%s %s\n", e,
				e == c->k ? " <-- crash" : "",
				rec_describe(e));
		if (f)
			fclose(f);
		t->kept++;
	}
}

/* Run one crash point; counts failures in t. */
static void
replay(const struct scenario *sc, uint64_t seed, struct crash *c,
       struct tally *t)
{
	struct blockmirror_recovery rec = { .size = sizeof rec };
	struct blockmirror_job_options o = { .size = sizeof o };
	struct blockmirror_disk *disk;
	struct blockmirror_job *job;
	char msg[1024], target[PATH_MAX];
	ssize_t n;
	int r;

	uint64_t t0 = now_ms(), t1;

	r = rec_materialize(c->k, c->variant, &c->rng);
	ck_assert_msg(r == 0, "rebuilding crash point %u: %s", c->index,
		      strerror(-r));
	t1 = now_ms();
	t->ms_build += t1 - t0;
	r = blockmirror_recover(G.link, NULL, NULL, 0, &rec);
	if (r < 0) {
		fail_at(t, sc, seed, c, "blockmirror_recover: %s",
			blockmirror_last_error());
		return;
	}
	t->actions[rec.action]++;
	if (check_image(rec.image, c->k, msg, sizeof msg) < 0) {
		fail_at(t, sc, seed, c, "after recovery (%s: %s): %s",
			action_names[rec.action], rec.message, msg);
		goto out;
	}
	t->ms_recover += now_ms() - t1;
	t1 = now_ms();
	if (rec.action != BLOCKMIRROR_RECOVER_RESUME &&
	    rec.action != BLOCKMIRROR_RECOVER_RESTART)
		goto out;

	/* Take the move up and finish it, as a hypervisor would. */
	disk = blockmirror_disk_open(rec.image, BLOCKMIRROR_FORMAT_RAW, 0);
	if (!disk || blockmirror_disk_start_thread(disk) < 0) {
		fail_at(t, sc, seed, c, "opening %s: %s", rec.image,
			blockmirror_last_error());
		blockmirror_disk_close(disk);
		goto out;
	}
	o.link = G.link;
	job = blockmirror_job_start_recovered(disk, &rec, &o);
	if (!job) {
		fail_at(t, sc, seed, c, "%s (%s): taking the move up "
			"failed: %s", action_names[rec.action], rec.message,
			blockmirror_last_error());
		blockmirror_disk_close(disk);
		goto out;
	}
	if (blockmirror_job_wait(job, BLOCKMIRROR_JOB_READY, 20000) !=
	    BLOCKMIRROR_JOB_READY) {
		fail_at(t, sc, seed, c, "%s: the resumed move never got "
			"ready", action_names[rec.action]);
	} else if ((r = blockmirror_job_complete(job)) < 0) {
		fail_at(t, sc, seed, c, "%s: the resumed move did not "
			"pivot: %s", action_names[rec.action],
			blockmirror_last_error());
	}
	blockmirror_job_free(job);
	blockmirror_disk_close(disk);
	if (r < 0)
		goto out;
	t->resumed++;
	n = readlink(G.link, target, sizeof target - 1);
	if (n <= 0) {
		fail_at(t, sc, seed, c, "the link is gone after the "
			"resumed move");
		goto out;
	}
	target[n] = '\0';
	if (check_image(target, c->k, msg, sizeof msg) < 0)
		fail_at(t, sc, seed, c, "after the %s move (%s): %s",
			action_names[rec.action], rec.message, msg);
out:
	t->ms_move += now_ms() - t1;
	blockmirror_recovery_free(&rec);
}

/* One seed for the whole run (set before the tests fork). */
static uint64_t run_seed;

START_TEST(test_crash_points)
{
	const struct scenario *sc = &scenarios[_i];
	uint64_t seed = run_seed;
	uint64_t total = env_u64("BM_CRASH_POINTS", 2000);
	/* The serve-order scenario is opt-in: not counted. */
	unsigned points = (unsigned)((total + SCENARIOS - 2) /
				     (SCENARIOS - 1));
	uint64_t rng = seed ^ (0x1234567ull * (uint64_t)(_i + 1));
	uint64_t nev, *fps, nfp = 0, pivot_ev = 0, t0 = now_ms(), t1;
	uint64_t w, f, nn, bytes, nofua;
	struct crash *cs;
	struct tally t = { 0 };

	if (sc->serve_order && !env_u64("BM_CRASH_SERVE_ORDER", 0))
		return;
	if (getenv("BM_CRASH_SCENARIO") &&
	    strcmp(getenv("BM_CRASH_SCENARIO"), sc->name) != 0)
		return;
	cs = calloc(points, sizeof *cs);
	blockmirror_set_log(log_silent, NULL, BLOCKMIRROR_LOG_ERROR);
	G.rng = rec_rand(&rng);
	G.ops = calloc(MAX_OPS, sizeof *G.ops);
	atomic_store(&G.nops, 0);
	G.gid_base = 1;
	setup_paths();
	make_initial();
	if (sc->resume) {
		leave_half_done_move(sc);
		fsync_path(G.root); /* the start is all durable */
	}
	read_initial();
	record(sc);
	compute_durability();
	t1 = now_ms();
	{
		/* Without a crash, the image the link names holds it all. */
		char target[PATH_MAX], msg[1024];
		ssize_t n = readlink(G.link, target, sizeof target - 1);

		ck_assert_int_gt(n, 0);
		target[n] = '\0';
		ck_assert_msg(check_image(target, rec_now(), msg,
					  sizeof msg) == 0,
			      "%s, seed %" PRIu64 ", no crash: %s", sc->name,
			      seed, msg);
	}

	/* Crash points: every other one right after a flush point (evenly
	 * through them), the rest anywhere. */
	nev = rec_now();
	fps = malloc(nev * sizeof *fps);
	for (uint64_t s = 0; s < nev; s++)
		if (rec_is_flush_point(s))
			fps[nfp++] = s + 1;
	/* The pivot's re-pointing of the link and what follows it are a
	 * small part of the recording: one point in eight goes there. */
	for (uint64_t s = 0; s < nev; s++)
		if (strncmp(rec_describe(s), "symlink ", 8) == 0) {
			pivot_ev = s;
			break;
		}
	for (unsigned i = 0; i < points; i++) {
		struct crash *c = &cs[i];

		c->index = i;
		c->rng = rec_rand(&rng);
		c->variant = (enum rec_variant)(i % REC_VARIANTS);
		if (i % 2 == 0 && nfp)
			c->k = fps[(uint64_t)(i / 2) * nfp /
				   ((points + 1) / 2)];
		else if (i % 8 == 7 && pivot_ev)
			c->k = pivot_ev + 1 + rec_rand(&rng) % (nev - pivot_ev);
		else
			c->k = 1 + rec_rand(&rng) % nev;
	}
	qsort(cs, points, sizeof *cs, cmp_crash);
	for (unsigned i = 0; i < points && t.failures < MAX_FAILURES; i++)
		replay(sc, seed, &cs[i], &t);

	rec_stats(&w, &f, &nn, &bytes, &nofua);
	fprintf(stderr, "%s: seed %" PRIu64 ", recorded %" PRIu64 " events "
		"(%" PRIu64 " writes, %" PRIu64 " MiB, %" PRIu64 " flushes, %"
		PRIu64 " name ops, %zu guest requests, %" PRIu64 " FUA not "
		"honoured) in %.1f s; replayed %u crash points (%" PRIu64
		" flush points) in %.1f s: none %u, resume %u, restart %u, "
		"switched %u, discarded %u, %u moves finished (build %.1f s, "
		"recover %.1f s, move %.1f s); %u failures\n", sc->name, seed,
		nev, w, bytes >> 20, f, nn, atomic_load(&G.nops), nofua,
		(double)(t1 - t0) / 1000, points, nfp,
		(double)(now_ms() - t1) / 1000, t.actions[0], t.actions[1],
		t.actions[2], t.actions[3], t.actions[4], t.resumed,
		(double)t.ms_build / 1000, (double)t.ms_recover / 1000,
		(double)t.ms_move / 1000, t.failures);
	rec_free();
	free(fps);
	free(cs);
	for (size_t i = 0; i < atomic_load(&G.nops); i++)
		free(G.ops[i].buf);
	free(G.ops);
	free(G.initial);
	if (!t.failures)
		remove_tree(G.root);
	ck_assert_msg(t.failures == 0, "%s: %u crash points failed (seed %"
		      PRIu64 ", see above)", sc->name, t.failures, seed);
}
END_TEST

int
main(void)
{
	Suite *s = suite_create("crash-record");
	TCase *tc = tcase_create("replay");

	run_seed = env_seed("BM_CRASH_SEED");
	tcase_set_timeout(tc, 300);
	tcase_add_loop_test(tc, test_crash_points, 0, SCENARIOS);
	suite_add_tcase(s, tc);
	return run_suite(s) ? EXIT_FAILURE : EXIT_SUCCESS;
}
