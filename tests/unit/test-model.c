/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The mirror job's model test, second generation (issue 14).
 *
 * Writer threads keep up to 32 asynchronous requests each in flight
 * against a disk of several GiB while a job moves it: writes (some FUA),
 * write-zeroes (some MAY_TRIM, some FUA), discards, flushes and reads, of
 * random sizes and alignments (bytes, sectors, pages, chunks, across
 * chunk edges), OVERLAPPING each other freely.  The requests cluster in a
 * few hot regions plus scattered spots, so the test never writes GiBs.
 * The source is a sparse raw file, or a qcow2 or VHDX image (where a
 * discard may be ignored).  A controller switches modes both ways, pauses,
 * resumes and changes the speed at random moments; it ends the job with a
 * pivot (under load or with the writers stopped, in either mode), a
 * cancel before READY, a cancel after READY, or a forced cancel after
 * READY, and a second thread may switch modes while that call runs.  The
 * destination is created by the job (raw, qcow2, VHDX), exists already
 * (created here in each format and littered with garbage the job must
 * overwrite), or is an nbdkit memory export.  Every choice comes from the
 * seed; timing does not, so a seed replays the same scenario, not the
 * same interleaving.
 *
 * Guests send byte-granular requests, except when an image is VHDX: a
 * VHDX disk refuses anything finer than a sector, and a mirrored one
 * fails the job (BM_MODEL_BYTES=1 sends them anyway).
 *
 * What is checked after the job ends: every guest read; the source; the
 * destination after a pivot and after a cancel after READY (DESIGN.md
 * rule 8: a consistent, flushed point-in-time copy; lib/pivot.c quiesces
 * the disk for it as for a pivot).  A forced cancel or a cancel before
 * READY abandons the destination: only the source is checked, and the
 * disk must still run on it.  qemu-img check must pass on every qcow2
 * image the job wrote.  Background mode under load, and active mode while
 * unmirrored discards keep dirtying chunks, may never converge: after a
 * few seconds the controller forces active mode, then slows the writers
 * down step by step until READY (the summary line says so).

 * THE MODEL'S RULE
 *
 * Every request gets two stamps from one global counter: `submit`, taken
 * just before it is handed to the library, and `complete`, taken in its
 * completion callback.  A request A certainly lands before B iff
 * A.complete < B.submit; requests whose stamps overlap may land in either
 * order, and the test accepts any.  Each write fills its bytes with a tag:
 * the 8-byte word at every 8-aligned guest offset p is made of the write's
 * id and p, so every byte tells which write put it there.  The source's
 * initial data are writes too (stamped 0); everything else starts as zero.
 *
 * For a byte b, and the requests S covering b that are CERTAIN (have
 * landed on the image checked) or POSSIBLE (may have), b may hold:
 *
 *   - zero, if no write or write-zeroes of S is certain (the initial
 *     hole, or holes and discards only);
 *   - the value of each X in S that no certain write or write-zeroes Y in
 *     S certainly follows (X.complete < Y.submit): a write's tag, zero for
 *     a write-zeroes, and zero for a discard.  A discard is only a hint:
 *     it zeroes or does nothing, so it never hides an older value.
 *
 * Which requests are certain or possible depends on what is checked:
 *
 *   FINAL   the source after a cancel: every request is certain.
 *   CUT     an image frozen at an instant P between T0 and T1 (the calls
 *           that quiesce the disk: the pivot, the cancel after READY), and
 *           a guest read between its own stamps: certain = completed
 *           before T0, possible = submitted before T1.  The source after
 *           a pivot and the destination after a cancel after READY.
 *   SNAP    the image that kept running after P: it equalled the other
 *           image at P, then received what came after.  S = { the other
 *           image's byte, as a write stamped [T0, T1] } + every request
 *           that completed after T0, all certain.  The destination after
 *           a pivot against the source (and the source after a cancel
 *           after READY against the destination): wherever nothing was
 *           written near the pivot this is "equal byte for byte".
 *
 * A failure prints the seed, the image and offset, the word found there
 * (decoded into the write that wrote it) and the candidates the model
 * allowed.
 *
 * Environment: BM_MODEL_SEEDS=N runs N seeds (default 8, about a minute
 * here; scale it for slower builds) from BM_MODEL_FIRST (default 0);
 * BM_MODEL_SEED=S runs seed S only.  To tell defects apart: BM_MODEL_NO_DISCARD=1 turns discards into
 * write-zeroes; BM_MODEL_SRC=raw|qcow2|vhdx, BM_MODEL_DEST=raw|qcow2|
 * vhdx|nbd|new|old and BM_MODEL_MODE=active|background force those
 * choices; BM_MODEL_DEBUG=1 prints the job's progress while waiting for
 * READY; BM_MODEL_KEEP=1 keeps the images (a failure keeps them too).  nbdkit missing: skip (77), or
 * fail with CI=true.
 */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <blockmirror/blockmirror.h>

#include "helpers.h"

#define KiB (UINT64_C(1) << 10)
#define MiB (UINT64_C(1) << 20)
#define GiB (UINT64_C(1) << 30)
#define MAX_WRITERS 6
#define MAX_DEPTH 32
#define MAX_OPS (1u << 19)        /* requests logged per seed */
#define MAX_REGIONS 64
#define READ_KEEP (48 * MiB)      /* read data kept for checking */
#define GARBAGE_ID 0xffffffu      /* tag of garbage on old destinations */
#define DEFAULT_SEEDS 8

/* ---- arithmetic ---------------------------------------------------- */

static uint64_t
align_down(uint64_t x, uint64_t a)
{
	return x / a * a;
}

static uint64_t
u64min(uint64_t a, uint64_t b)
{
	return a < b ? a : b;
}

static uint64_t
u64max(uint64_t a, uint64_t b)
{
	return a > b ? a : b;
}

/* ---- tags ------------------------------------------------------------ */

/*
 * The word at 8-aligned offset p written by write `id`: the high half is
 * the id scrambled by an odd constant (so it is never mostly zero bytes),
 * the low half p/8 mixed with it.  decode_word() inverts it.
 */
#define TAG_MUL 0x9e3779b1u
#define TAG_INV 0x0e8b2f51u /* TAG_MUL * TAG_INV == 1 mod 2^32 */

static uint64_t
tag_word(uint32_t id, uint64_t p)
{
	uint32_t hi = id * TAG_MUL;
	uint32_t lo = (uint32_t)(p >> 3) ^ hi ^ 0x5bd1e995u;

	return (uint64_t)hi << 32 | lo;
}

static void
decode_word(uint64_t w, uint32_t *id, uint64_t *p)
{
	uint32_t hi = (uint32_t)(w >> 32), lo = (uint32_t)w;

	*id = hi * TAG_INV;
	*p = (uint64_t)(lo ^ hi ^ 0x5bd1e995u) << 3;
}

static void
put_le64(unsigned char *b, uint64_t w)
{
	for (int k = 0; k < 8; k++)
		b[k] = (unsigned char)(w >> (8 * k));
}

static uint64_t
get_le64(const unsigned char *b)
{
	uint64_t w = 0;

	for (int k = 7; k >= 0; k--)
		w = w << 8 | b[k];
	return w;
}

/* The bytes write `id` puts at guest offsets [off, off + len). */
static void
fill_tag(unsigned char *buf, uint32_t id, uint64_t off, uint64_t len)
{
	uint64_t i = 0;

	while (i < len && ((off + i) & 7)) { /* the head, up to a word */
		uint64_t p = off + i;

		buf[i++] = (unsigned char)(tag_word(id, p & ~UINT64_C(7)) >>
					   (8 * (p & 7)));
	}
	for (; i + 8 <= len; i += 8)
		put_le64(buf + i, tag_word(id, off + i));
	for (; i < len; i++) { /* the tail */
		uint64_t p = off + i;

		buf[i] = (unsigned char)(tag_word(id, p & ~UINT64_C(7)) >>
					 (8 * (p & 7)));
	}
}

/* ---- the request log ------------------------------------------------- */

enum op_kind {
	OP_VOID,    /* refused at submission: never landed */
	OP_INIT,    /* the source's initial data, stamped 0 */
	OP_WRITE,
	OP_ZERO,
	OP_DISCARD,
	OP_FLUSH,
	OP_READ,
};

static const char *const kind_names[] = { "void", "init", "write", "zero",
					  "discard", "flush", "read" };

struct writer;

struct op {
	uint64_t off, len;
	uint64_t submit, complete;   /* stamps; complete 0: not done */
	unsigned char *buf;          /* write data until done; kept reads */
	struct writer *w;
	int err;
	uint8_t kind;
	uint8_t flags;               /* BLOCKMIRROR_REQ_* */
};

static atomic_uint_fast64_t clock_;

static uint64_t
stamp(void)
{
	return atomic_fetch_add(&clock_, 1) + 1;
}

/* ---- one seed's run -------------------------------------------------- */

struct region {
	uint64_t off, len;
};

enum dest_kind {
	DEST_NEW_RAW, DEST_NEW_QCOW2, DEST_NEW_VHDX,
	DEST_OLD_RAW, DEST_OLD_QCOW2, DEST_OLD_VHDX,
	DEST_NBD, DEST_COUNT
};

static const char *const dest_names[] = { "new raw", "new qcow2", "new vhdx",
					  "old raw", "old qcow2", "old vhdx",
					  "nbd" };

enum ending {
	END_PIVOT, END_CANCEL_EARLY, END_CANCEL_READY, END_FORCE_READY
};

static const char *const ending_names[] = { "pivot", "cancel early",
					    "cancel after ready",
					    "force cancel after ready" };

enum { MIX_WRITE, MIX_FUA, MIX_ZERO, MIX_TRIM, MIX_DISCARD, MIX_FLUSH,
       MIX_READ, MIX_COUNT };

struct run {
	int seed;
	uint64_t size;
	uint64_t granularity;
	struct blockmirror_disk *disk;

	/* where requests go: hot regions first, then spots */
	struct region regions[MAX_REGIONS];
	unsigned nhot, nregions;
	unsigned mix[MIX_COUNT];     /* weights */
	unsigned think_us;           /* writers pause this much at most */
	uint64_t sector;             /* requests are multiples of this: 1
					or 512 (a VHDX disk refuses less) */

	struct op *ops;
	atomic_uint nops;
	atomic_bool stop;
	atomic_uint_fast64_t read_kept;
	atomic_uint throttle_us;     /* set while waiting for convergence */

	/* garbage put on an old destination before the job */
	struct region garbage[64];
	unsigned ngarbage;

	char params[512];
};

struct writer {
	pthread_t thread;
	int id;
	uint64_t seed;
	struct run *run;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	unsigned inflight, depth;
	char failure[256];
	unsigned long ops;
};

static struct op *
new_op(struct run *run)
{
	unsigned i = atomic_fetch_add(&run->nops, 1);

	if (i >= MAX_OPS) {
		atomic_store(&run->nops, MAX_OPS);
		return NULL;
	}
	return &run->ops[i];
}

static uint32_t
op_id(const struct run *run, const struct op *op)
{
	return (uint32_t)(op - run->ops) + 1;
}

/* ---- writers --------------------------------------------------------- */

static void
op_done(void *data, int err)
{
	struct op *op = data;
	struct writer *w = op->w;
	struct run *run = w->run;

	op->err = err;
	/* Atomic only for the stall report, which reads it while running. */
	__atomic_store_n(&op->complete, stamp(), __ATOMIC_RELEASE);
	if (op->kind == OP_READ && err == 0 &&
	    atomic_fetch_add(&run->read_kept, op->len) + op->len <= READ_KEEP) {
		/* keep op->buf: checked at the end */
	} else {
		free(op->buf);
		op->buf = NULL;
	}
	pthread_mutex_lock(&w->lock);
	if (err && !w->failure[0])
		snprintf(w->failure, sizeof w->failure, "%s %" PRIu64 "+%"
			 PRIu64 " failed: %s", kind_names[op->kind], op->off,
			 op->len, strerror(-err));
	w->inflight--;
	pthread_cond_signal(&w->cond);
	pthread_mutex_unlock(&w->lock);
}

static uint64_t
pick_length(uint64_t *s, const struct run *run, bool data)
{
	switch (rnd_range(s, 6)) {
	case 0:
		return 1 + rnd_range(s, 4096);                 /* tiny, odd */
	case 1:
		return 512 * (1 + rnd_range(s, 128));          /* sectors */
	case 2:
		return 4096 * (1 + rnd_range(s, 64));          /* pages */
	case 3:                                            /* a chunk or so */
		return run->granularity * (1 + rnd_range(s, 2)) +
		       (rnd_range(s, 2) ? 0 : rnd_range(s, 8192));
	case 4:                                            /* big */
		return 1 + rnd_range(s, data ? 2 * MiB : 8 * MiB);
	default:
		return 1 + rnd_range(s, 256 * KiB);
	}
}

/* Somewhere in a hot region (mostly) or a spot, with a random alignment. */
static uint64_t
pick_offset(uint64_t *s, const struct run *run, uint64_t len)
{
	static const uint64_t aligns[] = { 1, 1, 512, 4096, 65536 };
	unsigned r = rnd_range(s, 4) ? (unsigned)rnd_range(s, run->nhot)
				     : (unsigned)rnd_range(s, run->nregions);
	const struct region *g = &run->regions[r];
	uint64_t a = rnd_range(s, 6) == 5 ? run->granularity
					  : aligns[rnd_range(s, 5)];
	uint64_t off = g->off + rnd_range(s, g->len);

	/* Start a little before the region now and then: edges matter. */
	if (rnd_range(s, 8) == 0)
		off = off > len / 2 ? off - len / 2 : 0;
	off = align_down(off, a);
	if (off + len > run->size)
		off = run->size - len;
	return off;
}

static void *
writer_main(void *arg)
{
	struct writer *w = arg;
	struct run *run = w->run;
	uint64_t s = w->seed;
	unsigned total = 0;

	for (unsigned i = 0; i < MIX_COUNT; i++)
		total += run->mix[i];
	while (!atomic_load(&run->stop)) {
		unsigned pick = (unsigned)rnd_range(&s, total), kind = 0;
		struct op *op;
		bool failed;
		int r;

		pthread_mutex_lock(&w->lock);
		while (w->inflight >= w->depth)
			pthread_cond_wait(&w->cond, &w->lock);
		failed = w->failure[0] != 0;
		pthread_mutex_unlock(&w->lock);
		if (failed || !(op = new_op(run)))
			break;
		while (pick >= run->mix[kind])
			pick -= run->mix[kind++];
		op->w = w;
		if (kind == MIX_FLUSH) {
			op->kind = OP_FLUSH;
		} else {
			bool data = kind == MIX_WRITE || kind == MIX_FUA ||
				    kind == MIX_READ;

			op->len = pick_length(&s, run, data);
			op->len = u64min(align_down(op->len + run->sector - 1,
						    run->sector),
					 run->size);
			op->off = align_down(pick_offset(&s, run, op->len),
					     run->sector);
		}
		switch (kind) {
		case MIX_WRITE:
		case MIX_FUA:
			op->kind = OP_WRITE;
			op->flags = kind == MIX_FUA ? BLOCKMIRROR_REQ_FUA : 0;
			op->buf = malloc(op->len);
			ck_assert_ptr_nonnull(op->buf);
			fill_tag(op->buf, op_id(run, op), op->off, op->len);
			break;
		case MIX_ZERO:
		case MIX_TRIM:
			op->kind = OP_ZERO;
			op->flags = (kind == MIX_TRIM ? BLOCKMIRROR_REQ_MAY_TRIM
						      : 0) |
				    (rnd_range(&s, 4) ? 0 : BLOCKMIRROR_REQ_FUA);
			break;
		case MIX_DISCARD:
			op->kind = OP_DISCARD;
			break;
		case MIX_READ:
			op->kind = OP_READ;
			op->buf = malloc(op->len);
			ck_assert_ptr_nonnull(op->buf);
			break;
		default:
			break;
		}
		pthread_mutex_lock(&w->lock);
		w->inflight++;
		pthread_mutex_unlock(&w->lock);
		op->submit = stamp();
		switch (op->kind) {
		case OP_WRITE:
			r = blockmirror_disk_aio_write(run->disk, op->buf,
						       op->len, op->off,
						       op->flags, op_done, op);
			break;
		case OP_ZERO:
			r = blockmirror_disk_aio_write_zeroes(run->disk,
							      op->len, op->off,
							      op->flags,
							      op_done, op);
			break;
		case OP_DISCARD:
			r = blockmirror_disk_aio_discard(run->disk, op->len,
							 op->off, op_done, op);
			break;
		case OP_READ:
			r = blockmirror_disk_aio_read(run->disk, op->buf,
						      op->len, op->off,
						      op_done, op);
			break;
		default:
			r = blockmirror_disk_aio_flush(run->disk, op_done, op);
			break;
		}
		if (r < 0) {
			pthread_mutex_lock(&w->lock);
			w->inflight--;
			snprintf(w->failure, sizeof w->failure,
				 "submitting %s %" PRIu64 "+%" PRIu64
				 " failed: %s", kind_names[op->kind], op->off,
				 op->len, strerror(-r));
			pthread_mutex_unlock(&w->lock);
			op->kind = OP_VOID;
			free(op->buf);
			op->buf = NULL;
			break;
		}
		w->ops++;
		if (run->think_us && w->ops % 4 == 0)
			usleep((useconds_t)rnd_range(&s, run->think_us));
		if (atomic_load(&run->throttle_us))
			usleep((useconds_t)rnd_range(&s,
					atomic_load(&run->throttle_us)));
	}
	/* Everything this writer started must be done before it returns. */
	pthread_mutex_lock(&w->lock);
	while (w->inflight)
		pthread_cond_wait(&w->cond, &w->lock);
	pthread_mutex_unlock(&w->lock);
	return NULL;
}

/* ---- the model ------------------------------------------------------- */

enum role { R_OUT, R_CERTAIN, R_POSSIBLE };

/* Which image state a check is about; see the rule at the top. */
struct view {
	const char *what;
	enum { V_FINAL, V_CUT, V_SNAP } kind;
	uint64_t t0, t1;
	const unsigned char *snap; /* V_SNAP: the other image, at `off` */
};

static enum role
role_of(const struct view *v, const struct op *op)
{
	switch (v->kind) {
	case V_FINAL:
		return op->err ? R_POSSIBLE : R_CERTAIN;
	case V_CUT:
		if (op->complete < v->t0 && !op->err)
			return R_CERTAIN;
		return op->submit < v->t1 ? R_POSSIBLE : R_OUT;
	default: /* V_SNAP: what may have come after the instant */
		if (op->complete <= v->t0)
			return R_OUT;
		return op->err ? R_POSSIBLE : R_CERTAIN;
	}
}

struct act {
	const struct op *op;
	enum role role;
};

enum { C_ZERO, C_OP, C_SNAP };

struct cands {
	struct {
		int type;
		const struct op *op;
	} v[32];
	unsigned n;
	bool any;        /* too many to list: accept anything */
};

static void
cand_add(struct cands *c, int type, const struct op *op)
{
	for (unsigned i = 0; i < c->n; i++)
		if (c->v[i].type == type && c->v[i].op == op)
			return;
	if (c->n == sizeof c->v / sizeof c->v[0]) {
		c->any = true;
		return;
	}
	c->v[c->n].type = type;
	c->v[c->n].op = op;
	c->n++;
}

/*
 * The values a byte covered by a[0..n) may hold (the rule at the top).
 * A discard either zeroes or does nothing, so it never hides an older
 * value: only certain writes, write-zeroes and the SNAP pseudo-write
 * (stamped [t0, t1]) do, when they certainly come after it.
 */
static void
collect(const struct act *a, unsigned n, const struct view *v,
	struct cands *c)
{
	uint64_t maxsub = 0;
	bool certain = false, snap = v->kind == V_SNAP;

	for (unsigned i = 0; i < n; i++) {
		if (a[i].role != R_CERTAIN || a[i].op->kind == OP_DISCARD)
			continue;
		certain = true;
		maxsub = u64max(maxsub, a[i].op->submit);
	}
	if (snap) {
		certain = true;
		maxsub = u64max(maxsub, v->t0);
	}
	if (!certain)
		cand_add(c, C_ZERO, NULL); /* the hole it started as */
	if (snap && v->t1 >= maxsub)
		cand_add(c, C_SNAP, NULL);
	for (unsigned i = 0; i < n; i++) {
		const struct op *x = a[i].op;

		if (certain && x->complete < maxsub)
			continue; /* certainly overwritten */
		if (x->kind == OP_INIT || x->kind == OP_WRITE)
			cand_add(c, C_OP, x);
		else
			cand_add(c, C_ZERO, NULL); /* zero, discard */
	}
}

struct mismatch {
	uint64_t count, first, last;
	char text[4096];
};

static int
describe_op(char *buf, size_t size, const struct run *run, const struct op *op)
{
	if (!op)
		return snprintf(buf, size, "?");
	return snprintf(buf, size, "#%u %s%s%s %" PRIu64 "+%" PRIu64
			" [%" PRIu64 "..%" PRIu64 "]%s", op_id(run, op),
			kind_names[op->kind],
			op->flags & BLOCKMIRROR_REQ_FUA ? "+fua" : "",
			op->flags & BLOCKMIRROR_REQ_MAY_TRIM ? "+trim" : "",
			op->off, op->len, op->submit, op->complete,
			op->err ? " FAILED" : "");
}

/* Sorted by offset: the requests that change data. */
static const struct op **by_off;
static size_t nby_off;
static uint64_t max_len;

static int
cmp_off(const void *a, const void *b)
{
	const struct op *x = *(const struct op *const *)a;
	const struct op *y = *(const struct op *const *)b;

	return x->off < y->off ? -1 : x->off > y->off;
}

static int
cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

static void
index_ops(struct run *run)
{
	unsigned n = atomic_load(&run->nops);

	free(by_off);
	by_off = malloc(sizeof *by_off * (n + 1));
	nby_off = 0;
	max_len = 0;
	for (unsigned i = 0; i < n; i++) {
		const struct op *op = &run->ops[i];

		if (op->kind != OP_INIT && op->kind != OP_WRITE &&
		    op->kind != OP_ZERO && op->kind != OP_DISCARD)
			continue;
		by_off[nby_off++] = op;
		max_len = u64max(max_len, op->len);
	}
	qsort(by_off, nby_off, sizeof *by_off, cmp_off);
}

/*
 * What a byte found at p is: the requests whose tag has that byte there
 * (a word may mix two writes, so decode the byte, not the word), or
 * garbage, or zero.  by_off[lo] is the first request that could cover p.
 */
static int
describe_found(char *buf, size_t size, const struct run *run,
	       const unsigned char *got, uint64_t off, uint64_t len,
	       size_t lo, uint64_t p)
{
	unsigned char g = got[p - off];
	uint64_t w0 = p & ~UINT64_C(7), at;
	unsigned matches = 0;
	uint32_t id;
	int n = 0;

	if (g == 0)
		return snprintf(buf, size, "zero");
	if (w0 >= off && w0 + 8 <= off + len) {
		decode_word(get_le64(got + (w0 - off)), &id, &at);
		if (id == GARBAGE_ID && at == w0)
			return snprintf(buf, size, "garbage the destination "
					"held before the job");
	}
	n += snprintf(buf + n, size - (size_t)n, "byte %02x", g);
	for (size_t i = lo; i < nby_off && by_off[i]->off <= p &&
			    (size_t)n + 200 < size; i++) {
		const struct op *op = by_off[i];
		uint64_t w;

		if (op->off + op->len <= p || op->kind == OP_ZERO ||
		    op->kind == OP_DISCARD)
			continue;
		w = tag_word(op_id(run, op), w0);
		if ((unsigned char)(w >> (8 * (p & 7))) != g)
			continue;
		n += snprintf(buf + n, size - (size_t)n, "%s", matches++
			      ? " or " : ", the tag of ");
		n += describe_op(buf + n, size - (size_t)n, run, op);
	}
	if (!matches && w0 >= off && w0 + 8 <= off + len) {
		/* Misplaced data?  The word says whose and where. */
		decode_word(get_le64(got + (w0 - off)), &id, &at);
		if (id >= 1 && id <= atomic_load(&run->nops)) {
			n += snprintf(buf + n, size - (size_t)n, ", no request's"
				      " here: the word is the tag of ");
			n += describe_op(buf + n, size - (size_t)n, run,
					 &run->ops[id - 1]);
			n += snprintf(buf + n, size - (size_t)n, " for offset "
				      "%" PRIu64, at);
			return n;
		}
	}
	if (!matches)
		n += snprintf(buf + n, size - (size_t)n, ", no request's");
	return n;
}

/* The last requests that touched byte p, and what the view made of
 * them.  by_off[lo] is the first that could. */
static size_t
describe_cover(char *buf, size_t size, const struct run *run,
	       const struct view *v, size_t lo, uint64_t p)
{
	static const char *const roles[] = { "not counted", "certain",
					     "possible" };
	const struct op *last[12];
	size_t n = 0, nlast = 0, total = 0;

	/* Keep the 12 that completed last. */
	for (size_t i = lo; i < nby_off && by_off[i]->off <= p; i++) {
		const struct op *op = by_off[i];
		size_t k;

		if (op->off + op->len <= p)
			continue;
		total++;
		if (nlast < 12) {
			last[nlast++] = op;
			continue;
		}
		for (k = 0; k < nlast; k++)
			if (last[k]->complete < op->complete)
				break;
		if (k < nlast) {
			size_t min = 0;

			for (k = 1; k < nlast; k++)
				if (last[k]->complete < last[min]->complete)
					min = k;
			last[min] = op;
		}
	}
	for (size_t i = 1; i < nlast; i++) /* by completion */
		for (size_t k = i; k > 0 &&
				   last[k - 1]->complete > last[k]->complete;
		     k--) {
			const struct op *t = last[k];

			last[k] = last[k - 1];
			last[k - 1] = t;
		}
	if (v->kind != V_FINAL)
		n += (size_t)snprintf(buf + n, size - n, "\n  the instant "
				      "checked lies in [%" PRIu64 "..%" PRIu64
				      "]", v->t0, v->t1);
	n += (size_t)snprintf(buf + n, size - n, "\n  requests that touched "
			      "it: %zu, the last ones:", total);
	for (size_t k = 0; k < nlast && n + 200 < size; k++) {
		n += (size_t)snprintf(buf + n, size - n, "\n    %-11s ",
				      roles[role_of(v, last[k])]);
		n += (size_t)describe_op(buf + n, size - n, run, last[k]);
	}
	return n;
}

static unsigned char *scratch; /* SCRATCH bytes */
static uint64_t gave_up;        /* bytes with too many candidates to check */
#define SCRATCH (4 * MiB)

/* The fast path: does the whole segment hold one candidate's bytes? */
static bool
segment_matches(const struct run *run, const struct view *v,
		const struct cands *c, const unsigned char *got, uint64_t at,
		uint64_t p, uint64_t len)
{
	if (len > SCRATCH)
		return false;
	for (unsigned k = 0; k < c->n; k++) {
		switch (c->v[k].type) {
		case C_ZERO:
			if (got[0] == 0 && !memcmp(got, got + 1, len - 1))
				return true;
			break;
		case C_SNAP:
			if (!memcmp(got, v->snap + at, len))
				return true;
			break;
		default:
			fill_tag(scratch, op_id(run, c->v[k].op), p, len);
			if (!memcmp(got, scratch, len))
				return true;
			break;
		}
	}
	return false;
}

/*
 * Check got[0..len), the bytes at guest offset `off` of the image `v`
 * describes, against the model.  Returns the number of bytes the model
 * does not allow; the first one is described in mm->text.
 */
static uint64_t
check_range(const struct run *run, const struct view *v,
	    const unsigned char *got, uint64_t off, uint64_t len,
	    struct mismatch *mm)
{
	uint64_t end = off + len, from = off > max_len ? off - max_len : 0;
	size_t lo = 0, hi = nby_off, ncov = 0, nb = 0, nact = 0, j = 0;
	const struct op **cov;
	uint64_t *bound, bad = 0;
	struct act *act;

	while (lo < hi) { /* first request starting at or after `from` */
		size_t mid = (lo + hi) / 2;

		if (by_off[mid]->off < from)
			lo = mid + 1;
		else
			hi = mid;
	}
	cov = malloc(sizeof *cov * (nby_off - lo + 1));
	for (size_t i = lo; i < nby_off && by_off[i]->off < end; i++)
		if (by_off[i]->off + by_off[i]->len > off &&
		    role_of(v, by_off[i]) != R_OUT)
			cov[ncov++] = by_off[i];
	bound = malloc(sizeof *bound * (2 * ncov + 2));
	act = malloc(sizeof *act * (ncov + 1));
	bound[nb++] = off;
	bound[nb++] = end;
	for (size_t i = 0; i < ncov; i++) {
		if (cov[i]->off > off)
			bound[nb++] = cov[i]->off;
		if (cov[i]->off + cov[i]->len < end)
			bound[nb++] = cov[i]->off + cov[i]->len;
	}
	qsort(bound, nb, sizeof *bound, cmp_u64);

	/* Sweep the segments between boundaries; in each, the same
	 * requests cover every byte. */
	for (size_t b = 0; b + 1 < nb; b++) {
		uint64_t s = bound[b], e = bound[b + 1];
		struct cands c = { .n = 0 };
		uint64_t words[32], word_at = UINT64_MAX;

		if (s == e)
			continue;
		for (size_t i = 0; i < nact;) {
			if (act[i].op->off + act[i].op->len <= s)
				act[i] = act[--nact];
			else
				i++;
		}
		for (; j < ncov && cov[j]->off <= s; j++)
			if (cov[j]->off + cov[j]->len > s)
				act[nact++] = (struct act){
					cov[j], role_of(v, cov[j]) };
		collect(act, (unsigned)nact, v, &c);
		if (c.any)
			gave_up += e - s;
		if (c.any || segment_matches(run, v, &c, got + (s - off),
					     s - off, s, e - s))
			continue;
		for (uint64_t p = s; p < e; p++) {
			unsigned char g = got[p - off];
			bool ok = false;

			if ((p & ~UINT64_C(7)) != word_at) {
				word_at = p & ~UINT64_C(7);
				for (unsigned k = 0; k < c.n; k++)
					if (c.v[k].type == C_OP)
						words[k] = tag_word(
							op_id(run, c.v[k].op),
							word_at);
			}
			for (unsigned k = 0; k < c.n && !ok; k++) {
				switch (c.v[k].type) {
				case C_ZERO:
					ok = g == 0;
					break;
				case C_SNAP:
					ok = g == v->snap[p - off];
					break;
				default:
					ok = g == (unsigned char)(words[k] >>
								  (8 * (p & 7)));
					break;
				}
			}
			if (ok)
				continue;
			bad++;
			mm->last = p;
			if (mm->count++ == 0) {
				size_t n = 0, sz = sizeof mm->text;

				mm->first = p;
				n += (size_t)snprintf(mm->text + n, sz - n,
					"%s: byte %" PRIu64 " holds ", v->what,
					p);
				n += (size_t)describe_found(mm->text + n,
					sz - n, run, got, off, len, lo, p);
				n += (size_t)snprintf(mm->text + n, sz - n,
					"; the model allows:");
				for (unsigned k = 0; k < c.n && n < sz - 200;
				     k++) {
					n += (size_t)snprintf(mm->text + n,
						sz - n, "\n    ");
					if (c.v[k].type == C_ZERO)
						n += (size_t)snprintf(
							mm->text + n, sz - n,
							"zero");
					else if (c.v[k].type == C_SNAP) {
						n += (size_t)snprintf(
							mm->text + n, sz - n,
							"what the other image "
							"holds: ");
						n += (size_t)describe_found(
							mm->text + n, sz - n,
							run, v->snap, off, len,
							lo, p);
					}
					else
						n += (size_t)describe_op(
							mm->text + n, sz - n,
							run, c.v[k].op);
				}
				n += describe_cover(mm->text + n, sz - n, run,
						    v, lo, p);
			}
		}
	}
	free(cov);
	free(bound);
	free(act);
	return bad;
}

/* ---- images: reading them back --------------------------------------- */

/* A raw file is read with pread; other formats and NBD through the
 * library, on a read-only disk of their own. */
struct reader {
	int fd;
	struct blockmirror_disk *disk;
};

static void
reader_open(struct reader *rd, const char *name, enum blockmirror_format fmt)
{
	rd->fd = -1;
	rd->disk = NULL;
	if (fmt == BLOCKMIRROR_FORMAT_RAW && name[0] == '/') {
		rd->fd = open(name, O_RDONLY);
		ck_assert_msg(rd->fd >= 0, "%s: %s", name, strerror(errno));
		return;
	}
	rd->disk = blockmirror_disk_open(name, fmt, BLOCKMIRROR_DISK_READONLY);
	ck_assert_msg(rd->disk != NULL, "open %s: %s", name,
		      blockmirror_last_error());
	ck_assert_int_eq(blockmirror_disk_start_thread(rd->disk), 0);
}

static void
reader_read(struct reader *rd, unsigned char *buf, uint64_t len,
	    uint64_t off)
{
	if (rd->fd >= 0) {
		ck_assert_int_eq(pread(rd->fd, buf, len, (off_t)off),
				 (ssize_t)len);
		return;
	}
	ck_assert_msg(blockmirror_disk_read(rd->disk, buf, len, off) == 0,
		      "read: %s", blockmirror_last_error());
}

static void
reader_close(struct reader *rd)
{
	if (rd->fd >= 0)
		close(rd->fd);
	if (rd->disk)
		ck_assert_int_eq(blockmirror_disk_close(rd->disk), 0);
}

/* ---- nbdkit ---------------------------------------------------------- */

/* nbdkit -f --exit-with-parent -U SOCK memory SIZE */
static pid_t
start_nbdkit(const char *sock, uint64_t size)
{
	char sz[32];

	snprintf(sz, sizeof sz, "%" PRIu64, size);
	return nbdkit_start(sock, "memory", sz, NULL);
}

/* ---- the library's log ----------------------------------------------- */

static void
on_log(void *data, enum blockmirror_log_level level, const char *message)
{
	(void)data;
	fprintf(stderr, "  [blockmirror %s] %s\n",
		level == BLOCKMIRROR_LOG_ERROR ? "error" : "warning", message);
}

/* ---- the controller -------------------------------------------------- */

struct ctl {
	struct run *run;
	struct blockmirror_job *job;
	uint64_t s;
	bool forced_active;   /* background did not converge in time */
	unsigned throttled;   /* neither did active mode: writers slowed */
	unsigned switches;    /* set_mode calls */
	struct events *ev;    /* for the job's own failure message */
};

static int
job_state(struct ctl *c)
{
	struct blockmirror_job_info info = { .size = sizeof info };

	ck_assert_msg(blockmirror_job_query(c->job, &info) == 0,
		      "seed %d: query: %s", c->run->seed,
		      blockmirror_last_error());
	return info.state;
}

static bool
ended(int st)
{
	return st == BLOCKMIRROR_JOB_COMPLETED ||
	       st == BLOCKMIRROR_JOB_CANCELLED || st == BLOCKMIRROR_JOB_FAILED;
}

/* One random interference: a mode switch (either way), a pause and
 * resume, a speed change. */
static void
fiddle(struct ctl *c)
{
	int r = 0;

	switch (rnd_range(&c->s, 10)) {
	case 0:
	case 1:
		r = blockmirror_job_set_mode(c->job, BLOCKMIRROR_MODE_ACTIVE);
		c->switches++;
		break;
	case 2:
	case 3:
		r = blockmirror_job_set_mode(c->job,
					     BLOCKMIRROR_MODE_BACKGROUND);
		c->switches++;
		break;
	case 4:
		r = blockmirror_job_pause(c->job);
		if (r == -EBUSY) { /* still mapping */
			r = 0;
			break;
		}
		if (r == 0) {
			sleep_ms((unsigned)rnd_range(&c->s, 20));
			r = blockmirror_job_resume(c->job);
		}
		break;
	case 5:
		r = blockmirror_job_set_speed(c->job, rnd_range(&c->s, 2)
						       ? 0 : 256 * MiB);
		break;
	case 6:
		/* A storm of switches: background leaves DIRTY chunks under
		 * writes in flight, active then mirrors next to them. */
		for (int i = 0, n = 5 + (int)rnd_range(&c->s, 30);
		     i < n && r == 0; i++) {
			r = blockmirror_job_set_mode(c->job, i % 2
					? BLOCKMIRROR_MODE_ACTIVE
					: BLOCKMIRROR_MODE_BACKGROUND);
			c->switches++;
			usleep((useconds_t)rnd_range(&c->s, 5000));
		}
		break;
	default:
		break;
	}
	ck_assert_msg(r == 0, "seed %d (%s): controller: %s (the job: %s)",
		      c->run->seed, c->run->params, blockmirror_last_error(),
		      c->ev->message);
}

/* Not READY for minutes: list the guest requests still in flight. */
static void
report_stall(struct run *run)
{
	unsigned n = atomic_load(&run->nops), inflight = 0;
	char text[200];

	for (unsigned i = 0; i < n; i++) {
		struct op *op = &run->ops[i];

		if (op->kind == OP_INIT || op->kind == OP_VOID || !op->submit ||
		    __atomic_load_n(&op->complete, __ATOMIC_ACQUIRE))
			continue;
		if (inflight++ < 10) {
			describe_op(text, sizeof text, run, op);
			fprintf(stderr, "  still in flight: %s (now %" PRIu64
				")\n", text, (uint64_t)atomic_load(&clock_));
		}
	}
	fprintf(stderr, "  %u guest requests in flight\n", inflight);
}

/* Sleep about `ms`, interfering now and then. */
static void
busy_sleep(struct ctl *c, unsigned ms, bool interfere)
{
	uint64_t until = now_ms() + ms;

	while (now_ms() < until) {
		if (interfere && rnd_range(&c->s, 5) == 0)
			fiddle(c);
		sleep_ms(1 + (unsigned)rnd_range(&c->s, 20));
	}
}

/*
 * Wait for READY (or an end), interfering.  Background mode under load
 * may not converge: after `patience_ms` switch to active for good (and
 * count it: the pivot may still happen in background mode, see below).
 * Neither does active mode while discards (never mirrored) keep dirtying
 * chunks: every 2 s after that the writers slow down a step.  The load
 * comes back at READY.
 */
static int
wait_ready(struct ctl *c, unsigned patience_ms)
{
	uint64_t start = now_ms(), last = 0;

	for (;;) {
		int st = job_state(c);
		uint64_t t = now_ms() - start;

		if (st == BLOCKMIRROR_JOB_READY || ended(st)) {
			atomic_store(&c->run->throttle_us, 0);
			return st;
		}
		if (c->forced_active &&
		    t > patience_ms + 2000 * (c->throttled + 1) &&
		    c->throttled < 4) {
			static const unsigned steps[] = { 1000, 5000, 20000,
							  100000 };

			atomic_store(&c->run->throttle_us,
				     steps[c->throttled++]);
		}
		if (t > patience_ms && !c->forced_active) {
			ck_assert_int_eq(blockmirror_job_set_speed(c->job, 0),
					 0);
			ck_assert_int_eq(blockmirror_job_set_mode(c->job,
					 BLOCKMIRROR_MODE_ACTIVE), 0);
			c->forced_active = true;
		}
		if (t > 180000) {
			report_stall(c->run);
			return -ETIMEDOUT;
		}
		if ((getenv("BM_MODEL_DEBUG") || t > 20000) &&
		    t / 1000 != last / 1000) {
			struct blockmirror_job_info i = { .size = sizeof i };

			blockmirror_job_query(c->job, &i);
			fprintf(stderr, "  %.1f s: %s %s remaining %" PRIu64
				" dirty %" PRIu64 " copied %" PRIu64
				" mirrored %" PRIu64 "\n", (double)t / 1000,
				blockmirror_job_state_name(i.state),
				blockmirror_mode_name(i.mode),
				i.bytes_remaining, i.dirty_bytes,
				i.bytes_copied, i.bytes_mirrored);
		}
		last = t;
		if (!c->forced_active && rnd_range(&c->s, 6) == 0)
			fiddle(c);
		sleep_ms(2 + (unsigned)rnd_range(&c->s, 25));
	}
}

/* Switches modes from another thread while the controller's ending call
 * (pivot, cancel) runs: whatever moment it hits must be safe. */
struct meddler {
	pthread_t thread;
	struct blockmirror_job *job;
	atomic_bool done;
	uint64_t s;
	unsigned calls;
	char failure[256];
};

static void *
meddler_main(void *arg)
{
	struct meddler *m = arg;

	while (!atomic_load(&m->done)) {
		int r;

		usleep((useconds_t)rnd_range(&m->s, 5000));
		r = blockmirror_job_set_mode(m->job, rnd_range(&m->s, 2)
				? BLOCKMIRROR_MODE_ACTIVE
				: BLOCKMIRROR_MODE_BACKGROUND);
		m->calls++;
		/* EBUSY while pivoting, EINVAL once ended: the table. */
		if (r < 0 && r != -EBUSY && r != -EINVAL && !m->failure[0])
			snprintf(m->failure, sizeof m->failure, "set_mode "
				 "during the ending: %s",
				 blockmirror_last_error());
	}
	return NULL;
}

static void
meddler_start(struct meddler *m, struct blockmirror_job *job, uint64_t seed)
{
	m->job = job;
	m->s = seed;
	atomic_store(&m->done, false);
	ck_assert_int_eq(pthread_create(&m->thread, NULL, meddler_main, m),
			 0);
}

static void
meddler_stop(struct meddler *m)
{
	atomic_store(&m->done, true);
	pthread_join(m->thread, NULL);
}

static void
stop_writers(struct run *run, struct writer *w, unsigned nw, bool *stopped)
{
	if (*stopped)
		return;
	atomic_store(&run->stop, true);
	for (unsigned i = 0; i < nw; i++)
		pthread_join(w[i].thread, NULL);
	*stopped = true;
}

/* ---- building the seed's world --------------------------------------- */

static bool
place_region(struct run *run, uint64_t *s, uint64_t len, int where)
{
	if (len > run->size / 4)
		len = run->size / 4;
	for (int tries = 0; tries < 1000; tries++) {
		uint64_t off = where == 1 ? 0
			       : where == 2 ? run->size - len
			       : align_down(rnd_range(s, run->size - len),
					    rnd_range(s, 2) ? 4096 : 512);
		bool clash = false;

		for (unsigned i = 0; i < run->nregions; i++)
			clash |= off < run->regions[i].off +
					       run->regions[i].len + 2 * MiB &&
				 run->regions[i].off < off + len + 2 * MiB;
		if (clash)
			continue;
		run->regions[run->nregions++] = (struct region){ off, len };
		return true;
	}
	return false;
}

/*
 * The source: a sparse raw file, or a qcow2 or VHDX image (where a discard
 * may be ignored: the hint case of rule 5), with the initial data in some
 * regions.
 */
static void
make_source(struct run *run, uint64_t *s, const char *path,
	    enum blockmirror_format fmt, const char *opts)
{
	struct blockmirror_disk *d = NULL;
	int fd = -1;

	if (fmt == BLOCKMIRROR_FORMAT_RAW) {
		fd = open(path, O_CREAT | O_TRUNC | O_WRONLY, 0644);
		ck_assert_int_ge(fd, 0);
		ck_assert_int_eq(ftruncate(fd, (off_t)run->size), 0);
	} else {
		ck_assert_msg(blockmirror_image_create(path, fmt, run->size,
						       opts, false) == 0,
			      "create %s: %s", path, blockmirror_last_error());
		d = blockmirror_disk_open(path, fmt, 0);
		ck_assert_msg(d != NULL, "%s", blockmirror_last_error());
		ck_assert_int_eq(blockmirror_disk_start_thread(d), 0);
	}
	for (unsigned i = 0; i < run->nregions; i++) {
		const struct region *g = &run->regions[i];
		struct op *op;
		uint64_t o, l;
		unsigned char *buf;

		if (rnd_range(s, 2))
			continue;
		o = g->off + rnd_range(s, g->len);
		l = 1 + rnd_range(s, g->off + g->len - o);
		o = align_down(o, run->sector);
		l = u64min(align_down(l + run->sector - 1, run->sector),
			   run->size - o);
		op = new_op(run);
		*op = (struct op){ .off = o, .len = l, .kind = OP_INIT };
		buf = malloc(l);
		fill_tag(buf, op_id(run, op), o, l);
		if (d)
			ck_assert_msg(blockmirror_disk_write(d, buf, l, o, 0) ==
					      0,
				      "%s", blockmirror_last_error());
		else
			ck_assert_int_eq(pwrite(fd, buf, l, (off_t)o),
					 (ssize_t)l);
		free(buf);
	}
	if (d)
		ck_assert_int_eq(blockmirror_disk_close(d), 0);
	else
		close(fd);
}

/* Litter an existing destination with garbage the job must replace. */
static void
litter(struct run *run, uint64_t *s, const char *name,
       enum blockmirror_format fmt)
{
	struct blockmirror_disk *d = blockmirror_disk_open(name, fmt, 0);
	unsigned n = 4 + (unsigned)rnd_range(s, 12);

	ck_assert_msg(d != NULL, "open %s: %s", name, blockmirror_last_error());
	ck_assert_int_eq(blockmirror_disk_start_thread(d), 0);
	for (unsigned i = 0; i < n; i++) {
		/* Sectors: a VHDX disk takes nothing finer. */
		uint64_t len = 512 * (1 + rnd_range(s, 2048)), off;
		unsigned char *buf = malloc(len);

		if (rnd_range(s, 2)) {
			const struct region *g =
				&run->regions[rnd_range(s, run->nregions)];

			off = g->off + rnd_range(s, g->len);
		} else {
			off = rnd_range(s, run->size);
		}
		off = align_down(off, 512);
		if (off + len > run->size)
			off = run->size - len;
		fill_tag(buf, GARBAGE_ID, off, len);
		ck_assert_msg(blockmirror_disk_write(d, buf, len, off, 0) == 0,
			      "litter: %s", blockmirror_last_error());
		run->garbage[run->ngarbage++] = (struct region){ off, len };
		free(buf);
	}
	ck_assert_int_eq(blockmirror_disk_close(d), 0);
}

/* What to compare: around everything touched, plus samples elsewhere. */
static struct region *
compare_spans(struct run *run, uint64_t *s, size_t *count)
{
	unsigned nops = atomic_load(&run->nops);
	size_t cap = nops + run->nregions + run->ngarbage + 16, n = 0, m = 0;
	struct region *v = malloc(sizeof *v * cap);

	for (unsigned i = 0; i < nops; i++)
		if (run->ops[i].len && run->ops[i].kind != OP_VOID)
			v[n++] = (struct region){ run->ops[i].off,
						  run->ops[i].len };
	for (unsigned i = 0; i < run->nregions; i++)
		v[n++] = run->regions[i];
	for (unsigned i = 0; i < run->ngarbage; i++)
		v[n++] = run->garbage[i];
	v[n++] = (struct region){ 0, 1 };
	v[n++] = (struct region){ run->size - 1, 1 };
	for (int i = 0; i < 8; i++)
		v[n++] = (struct region){ rnd_range(s, run->size), 1 };
	/* Widen to whole MiBs and a MiB either side: the chunks around a
	 * request are where a copy or a mirror could go wrong. */
	for (size_t i = 0; i < n; i++) {
		uint64_t a = align_down(v[i].off, MiB);
		uint64_t b = align_down(v[i].off + v[i].len + MiB - 1, MiB);

		a = a >= MiB ? a - MiB : 0;
		b = u64min(b + MiB, run->size);
		v[i] = (struct region){ a, b - a };
	}
	qsort(v, n, sizeof *v, cmp_u64); /* by .off, the first field */
	for (size_t i = 0; i < n; i++) {
		if (m && v[i].off <= v[m - 1].off + v[m - 1].len) {
			uint64_t end = u64max(v[m - 1].off + v[m - 1].len,
					      v[i].off + v[i].len);

			v[m - 1].len = end - v[m - 1].off;
		} else {
			v[m++] = v[i];
		}
	}
	*count = m;
	return v;
}

/* ---- checking the images --------------------------------------------- */

struct verdict {
	struct mismatch mm[4];
	const char *name[4];
};

static void
check_one(struct verdict *vd, int k, const struct run *run,
	  const struct view *v, const unsigned char *got, uint64_t off,
	  uint64_t len)
{
	vd->name[k] = v->what;
	check_range(run, v, got, off, len, &vd->mm[k]);
}

/*
 * Compare what the images hold with the model (see the top of the
 * file).  `t0`, `t1`: the stamps around the call that ended the job.
 */
static void
verify(struct run *run, uint64_t *s, const char *src,
       enum blockmirror_format src_fmt, const char *dst,
       enum blockmirror_format dst_fmt, bool pivoted, bool synced,
       uint64_t t0, uint64_t t1)
{
	struct verdict *vd = calloc(1, sizeof *vd);
	unsigned char *a = malloc(4 * MiB), *b = malloc(4 * MiB);
	struct reader rs, rd;
	struct region *spans;
	size_t nspans;
	uint64_t compared = 0;
	unsigned nops = atomic_load(&run->nops);
	bool bad = false;

	index_ops(run);
	gave_up = 0;
	if (!scratch)
		scratch = malloc(SCRATCH);

	/* The guest's reads, each between its own stamps. */
	for (unsigned i = 0; i < nops; i++) {
		struct op *op = &run->ops[i];
		struct view v = { "a guest read", V_CUT, op->submit,
				  op->complete, NULL };

		if (op->kind != OP_READ || !op->buf)
			continue;
		check_one(vd, 3, run, &v, op->buf, op->off, op->len);
		free(op->buf);
		op->buf = NULL;
	}

	spans = compare_spans(run, s, &nspans);
	reader_open(&rs, src, src_fmt);
	if (pivoted || synced)
		reader_open(&rd, dst, dst_fmt);
	for (size_t i = 0; i < nspans; i++) {
		for (uint64_t off = spans[i].off;
		     off < spans[i].off + spans[i].len; off += 4 * MiB) {
			uint64_t len = u64min(4 * MiB, spans[i].off +
							       spans[i].len -
							       off);

			reader_read(&rs, a, len, off);
			compared += len;
			if (pivoted) {
				struct view frozen = {
					"the source (frozen at the pivot)",
					V_CUT, t0, t1, NULL };
				struct view after = {
					"the destination against the source",
					V_SNAP, t0, t1, a };
				struct view all = { "the destination",
						    V_FINAL, 0, 0, NULL };

				reader_read(&rd, b, len, off);
				check_one(vd, 0, run, &frozen, a, off, len);
				check_one(vd, 1, run, &after, b, off, len);
				check_one(vd, 2, run, &all, b, off, len);
			} else if (synced) {
				struct view all = { "the source", V_FINAL, 0,
						    0, NULL };
				struct view copy = {
					"the destination (point-in-time copy)",
					V_CUT, t0, t1, NULL };
				struct view after = {
					"the source against the destination",
					V_SNAP, t0, t1, b };

				reader_read(&rd, b, len, off);
				check_one(vd, 0, run, &all, a, off, len);
				check_one(vd, 1, run, &copy, b, off, len);
				check_one(vd, 2, run, &after, a, off, len);
			} else {
				struct view all = { "the source", V_FINAL, 0,
						    0, NULL };

				check_one(vd, 0, run, &all, a, off, len);
			}
		}
	}
	reader_close(&rs);
	if (pivoted || synced)
		reader_close(&rd);

	for (int k = 0; k < 4; k++) {
		if (!vd->mm[k].count)
			continue;
		bad = true;
		fprintf(stderr, "seed %d FAILED (%s)\n  %" PRIu64
			" bytes of %s differ from the model, first %" PRIu64
			" last %" PRIu64 "\n  %s\n", run->seed, run->params,
			vd->mm[k].count, vd->name[k], vd->mm[k].first,
			vd->mm[k].last, vd->mm[k].text);
	}
	fflush(stderr);
	for (int k = 0; k < 4 && bad; k++)
		if (vd->mm[k].count)
			ck_abort_msg("seed %d: %" PRIu64 " bytes of %s differ "
				     "from the model, first at %" PRIu64
				     " (details on stderr; replay with "
				     "BM_MODEL_SEED=%d)", run->seed,
				     vd->mm[k].count, vd->name[k],
				     vd->mm[k].first, run->seed);
	fprintf(stderr, "  seed %d: compared %" PRIu64 " MiB in %zu spans; "
		"%" PRIu64 " bytes had too many candidates to check\n",
		run->seed, compared / MiB, nspans, gave_up);
	free(spans);
	free(a);
	free(b);
	free(vd);
}

static void
qcow2_check(const struct run *run, const char *path, const char *what)
{
	char cmd[256];
	int r;

	if (!have_tool("qemu-img"))
		return;
	snprintf(cmd, sizeof cmd, "qemu-img check -q -f qcow2 '%s' >&2",
		 path);
	r = system(cmd);
	ck_assert_msg(r == 0, "seed %d (%s): qemu-img check of the %s: "
		      "exit %d", run->seed, run->params, what,
		      WIFEXITED(r) ? WEXITSTATUS(r) : -1);
}

/* ---- one seed -------------------------------------------------------- */

/* Each seed works in base_dir/seed-N; main removes base_dir at the end
 * unless a seed failed (its files stay for a look). */
static char base_dir[] = "/tmp/test-model.XXXXXX";

static const char *
env_or(const char *name, const char *dflt)
{
	const char *v = getenv(name);

	return v && *v ? v : dflt;
}

static void
run_seed(int seed)
{
	static const uint64_t grans[] = { 64 * KiB, 128 * KiB, 256 * KiB,
					  512 * KiB, MiB };
	static const enum blockmirror_format fmts[] = {
		BLOCKMIRROR_FORMAT_RAW, BLOCKMIRROR_FORMAT_QCOW2,
		BLOCKMIRROR_FORMAT_VHDX };
	static const char *const exts[] = { "raw", "qcow2", "vhdx" };
	uint64_t s = UINT64_C(0x6d6f64656c) ^ ((uint64_t)seed * 0x9e3779b97f4a7c15ull);
	struct run *run = calloc(1, sizeof *run);
	struct writer w[MAX_WRITERS];
	struct blockmirror_job_options o = { .size = sizeof o };
	struct blockmirror_job_info info = { .size = sizeof info };
	struct events ev = { 0 };
	struct ctl c = { .run = run, .ev = &ev };
	struct meddler med = { .calls = 0 };
	bool meddle;
	char dir[256], src[300], dst[320], sock[300];
	enum blockmirror_format dst_fmt, src_fmt;
	const char *src_opts = NULL;
	enum blockmirror_mode mode, end_mode = BLOCKMIRROR_MODE_AUTO;
	enum dest_kind dest;
	enum ending ending;
	unsigned nw, mode_pick;
	bool quiet, stopped = false, pivoted, synced, no_discard;
	uint64_t t0 = 0, t1 = 0, t_start = now_ms(), t_end, t_job = 0,
		 t_ready = 0, t_call = 0, t_ret = 0;
	pid_t nbdkit = -1;
	char *img;
	int r, st;

	ck_assert_ptr_nonnull(run);
	run->seed = seed;
	run->ops = calloc(MAX_OPS, sizeof *run->ops);
	ck_assert_ptr_nonnull(run->ops);
	atomic_store(&clock_, 0);

	/* Every choice, from the seed. */
	run->size = (1 + rnd_range(&s, 6)) * GiB +
		    (rnd_range(&s, 3) ? 0 : 512 * (1 + rnd_range(&s, 8192)));
	run->granularity = grans[rnd_range(&s, 5)];
	dest = (enum dest_kind)rnd_range(&s, DEST_COUNT);
	mode_pick = (unsigned)rnd_range(&s, 5);
	mode = mode_pick < 2 ? BLOCKMIRROR_MODE_ACTIVE
	       : mode_pick < 4 ? BLOCKMIRROR_MODE_BACKGROUND
			       : BLOCKMIRROR_MODE_AUTO;
	r = (int)rnd_range(&s, 20);
	ending = r < 9 ? END_PIVOT : r < 12 ? END_CANCEL_EARLY
		 : r < 16 ? END_CANCEL_READY : END_FORCE_READY;
	quiet = ending != END_CANCEL_EARLY && rnd_range(&s, 4) == 0;
	meddle = rnd_range(&s, 2);
	nw = 1 + (unsigned)rnd_range(&s, MAX_WRITERS);
	run->mix[MIX_WRITE] = 20 + (unsigned)rnd_range(&s, 40);
	run->mix[MIX_FUA] = (unsigned)rnd_range(&s, 10);
	run->mix[MIX_ZERO] = (unsigned)rnd_range(&s, 15);
	run->mix[MIX_TRIM] = (unsigned)rnd_range(&s, 10);
	run->mix[MIX_DISCARD] = (unsigned)rnd_range(&s, 15);
	run->mix[MIX_FLUSH] = (unsigned)rnd_range(&s, 4);
	run->mix[MIX_READ] = (unsigned)rnd_range(&s, 20);
	run->think_us = rnd_range(&s, 3) ? 0 : (unsigned)rnd_range(&s, 2000);
	o.buf_size = rnd_range(&s, 3) ? 0 : (uint32_t)(64 * KiB << rnd_range(&s, 4));
	o.requests = rnd_range(&s, 3) ? 0 : 1 + (uint32_t)rnd_range(&s, 8);
	o.speed = rnd_range(&s, 5) ? 0 : 256 * MiB;
	run->nhot = 2 + (unsigned)rnd_range(&s, 4);
	for (unsigned i = 0; i < run->nhot; i++) {
		int where = i == 0 && rnd_range(&s, 3) == 0   ? 1
			    : i == 1 && rnd_range(&s, 3) == 0 ? 2
							      : 0;

		/* Now and then a tight one: more overlap in flight. */
		uint64_t len = rnd_range(&s, 3) ? (1 + rnd_range(&s, 16)) * MiB
						: 64 * KiB + rnd_range(&s, 2 * MiB);

		ck_assert(place_region(run, &s, len - rnd_range(&s, 4096),
				       where));
	}
	for (unsigned i = 0, n = 8 + (unsigned)rnd_range(&s, 40); i < n; i++)
		place_region(run, &s, 4096 + rnd_range(&s, MiB), 0);

	/*
	 * Guests send byte-granular requests, except to a VHDX destination:
	 * the disk refuses anything finer than a sector there after the
	 * pivot, and a mirrored one fails the job (BM_MODEL_BYTES=1 sends
	 * them anyway).
	 */
	run->sector = rnd_range(&s, 4) ? 1 : 512;

	r = (int)rnd_range(&s, 10);
	src_fmt = r < 5 ? BLOCKMIRROR_FORMAT_RAW
		  : r < 8 ? BLOCKMIRROR_FORMAT_QCOW2 : BLOCKMIRROR_FORMAT_VHDX;
	if (src_fmt == BLOCKMIRROR_FORMAT_QCOW2)
		src_opts = (const char *[]){ NULL, "cluster_size=4096",
			"cluster_size=65536", "cluster_size=1048576" }
			[rnd_range(&s, 4)];
	if (getenv("BM_MODEL_SRC") &&
	    blockmirror_format_from_name(getenv("BM_MODEL_SRC")) > 0)
		src_fmt = (enum blockmirror_format)blockmirror_format_from_name(
			getenv("BM_MODEL_SRC"));
	if (src_fmt != BLOCKMIRROR_FORMAT_QCOW2)
		src_opts = NULL;

	/* Overrides, for telling defects apart. */
	no_discard = getenv("BM_MODEL_NO_DISCARD") != NULL;
	if (no_discard) {
		run->mix[MIX_ZERO] += run->mix[MIX_DISCARD];
		run->mix[MIX_DISCARD] = 0;
	}
	if (!strcmp(env_or("BM_MODEL_MODE", ""), "active"))
		mode = BLOCKMIRROR_MODE_ACTIVE;
	else if (!strcmp(env_or("BM_MODEL_MODE", ""), "background"))
		mode = BLOCKMIRROR_MODE_BACKGROUND;
	for (int k = 0; k < DEST_COUNT; k++)
		if (getenv("BM_MODEL_DEST") &&
		    strstr(dest_names[k], getenv("BM_MODEL_DEST")) &&
		    strstr(dest_names[dest], getenv("BM_MODEL_DEST")) == NULL)
			dest = (enum dest_kind)k;

	if ((dest == DEST_NEW_VHDX || dest == DEST_OLD_VHDX ||
	     src_fmt == BLOCKMIRROR_FORMAT_VHDX) && !getenv("BM_MODEL_BYTES"))
		run->sector = 512;

	/* The files. */
	snprintf(dir, sizeof dir, "%s/seed-%d", base_dir, seed);
	ck_assert_int_eq(mkdir(dir, 0700), 0);
	snprintf(src, sizeof src, "%s/src.%s", dir,
		 blockmirror_format_name(src_fmt));
	snprintf(sock, sizeof sock, "%s/nbd.sock", dir);
	make_source(run, &s, src, src_fmt, src_opts);
	dst_fmt = dest == DEST_NBD ? BLOCKMIRROR_FORMAT_RAW
				   : fmts[dest % 3];
	if (dest == DEST_NBD) {
		snprintf(dst, sizeof dst, "nbd+unix:///?socket=%s", sock);
		nbdkit = start_nbdkit(sock, run->size);
		o.flags = rnd_range(&s, 2) ? BLOCKMIRROR_JOB_CREATE : 0;
		if (rnd_range(&s, 2))
			litter(run, &s, dst, dst_fmt);
	} else {
		snprintf(dst, sizeof dst, "%s/dst.%s", dir, exts[dest % 3]);
		o.flags = dest < DEST_OLD_RAW ? BLOCKMIRROR_JOB_CREATE : 0;
	}
	snprintf(run->params, sizeof run->params,
		 "size %" PRIu64 " gran %" PRIu64 "K src %s%s%s dest %s mode %s ending "
		 "%s%s%s writers %u buf %u req %u speed %" PRIu64 " think %u "
		 "sector %" PRIu64 " regions %u+%u mix w%u f%u z%u t%u d%u fl%u r%u%s", run->size,
		 run->granularity / KiB, blockmirror_format_name(src_fmt),
		 src_opts ? " " : "", src_opts ? src_opts : "",
		 dest_names[dest],
		 blockmirror_mode_name(mode), ending_names[ending],
		 quiet ? " (writers stopped first)" : "",
		 meddle ? " (set_mode meddling)" : "", nw, o.buf_size,
		 o.requests, o.speed, run->think_us, run->sector, run->nhot,
		 run->nregions - run->nhot, run->mix[0], run->mix[1],
		 run->mix[2], run->mix[3], run->mix[4], run->mix[5],
		 run->mix[6], no_discard ? " NO-DISCARD" : "");

	fprintf(stderr, "seed %d: %s\n", seed, run->params);
	if (dest >= DEST_OLD_RAW && dest <= DEST_OLD_VHDX) {
		static const char *const qopts[] = { NULL, "cluster_size=32768",
			"cluster_size=262144", "cluster_size=1048576" };
		static const char *const vopts[] = { NULL,
			"block_size=1048576", "block_size=8388608" };
		const char *opts = dest == DEST_OLD_QCOW2
				   ? qopts[rnd_range(&s, 4)]
				   : dest == DEST_OLD_VHDX
				   ? vopts[rnd_range(&s, 3)] : NULL;

		r = blockmirror_image_create(dst, dst_fmt, run->size, opts,
					     false);
		ck_assert_msg(r == 0, "seed %d: create %s: %s", seed, dst,
			      blockmirror_last_error());
		litter(run, &s, dst, dst_fmt);
	}

	/* The disk and its guests. */
	run->disk = blockmirror_disk_open(src, src_fmt, 0);
	ck_assert_msg(run->disk != NULL, "%s", blockmirror_last_error());
	ck_assert_int_eq(blockmirror_disk_start_thread(run->disk), 0);
	for (unsigned i = 0; i < nw; i++) {
		w[i] = (struct writer){ .id = (int)i, .run = run,
					.seed = rnd(&s),
					.depth = 1 + (unsigned)rnd_range(&s,
								MAX_DEPTH) };
		if (i == 0 && rnd_range(&s, 2))
			w[i].depth = MAX_DEPTH;
		pthread_mutex_init(&w[i].lock, NULL);
		pthread_cond_init(&w[i].cond, NULL);
		ck_assert_int_eq(pthread_create(&w[i].thread, NULL,
						writer_main, &w[i]), 0);
	}
	sleep_ms((unsigned)rnd_range(&s, 100));

	/* The job. */
	o.format = dst_fmt;
	o.mode = mode;
	o.granularity = run->granularity;
	o.on_event = on_event;
	o.event_data = &ev;
	c.job = blockmirror_job_start(run->disk, dst, &o);
	ck_assert_msg(c.job != NULL, "seed %d: start: %s", seed,
		      blockmirror_last_error());
	c.s = rnd(&s);
	t_job = now_ms();

	if (ending == END_CANCEL_EARLY) {
		busy_sleep(&c, (unsigned)rnd_range(&s, 400), true);
		t_call = now_ms();
		if (meddle)
			meddler_start(&med, c.job, rnd(&s));
		t0 = stamp();
		r = blockmirror_job_cancel(c.job, false);
		t1 = stamp();
		ck_assert_msg(r == 0, "seed %d (%s): cancel: %s (%s)", seed,
			      run->params, blockmirror_last_error(),
			      ev.message);
	} else {
		st = wait_ready(&c, 1500 + (unsigned)rnd_range(&s, 2000));
		ck_assert_msg(st == BLOCKMIRROR_JOB_READY, "seed %d (%s): "
			      "not READY but %s: %s", seed, run->params,
			      st < 0 ? "timed out"
				     : blockmirror_job_state_name(st),
			      ev.message);
		t_ready = now_ms();
		/* Pivot or cancel in either mode, whatever it took to get
		 * READY. */
		if (rnd_range(&s, 2))
			ck_assert_int_eq(blockmirror_job_set_mode(c.job,
				rnd_range(&s, 2) ? BLOCKMIRROR_MODE_ACTIVE
						 : BLOCKMIRROR_MODE_BACKGROUND),
				0);
		busy_sleep(&c, (unsigned)rnd_range(&s, 200), true);
		if (quiet)
			stop_writers(run, w, nw, &stopped);
		ck_assert_int_eq(blockmirror_job_query(c.job, &info), 0);
		end_mode = info.mode;
		t_call = now_ms();
		if (meddle)
			meddler_start(&med, c.job, rnd(&s));
		if (ending == END_PIVOT) {
			for (int attempt = 0;; attempt++) {
				t0 = stamp();
				r = blockmirror_job_complete(c.job);
				t1 = stamp();
				if (r != -EBUSY || attempt == 20)
					break;
				wait_ready(&c, 0);
			}
			ck_assert_msg(r == 0, "seed %d (%s): pivot: %s", seed,
				      run->params, blockmirror_last_error());
		} else {
			t0 = stamp();
			r = blockmirror_job_cancel(c.job,
						   ending == END_FORCE_READY);
			t1 = stamp();
			ck_assert_msg(r == 0, "seed %d: cancel: %s", seed,
				      blockmirror_last_error());
		}
	}

	t_ret = now_ms();
	if (meddle) {
		meddler_stop(&med);
		ck_assert_msg(!med.failure[0], "seed %d (%s): %s", seed,
			      run->params, med.failure);
	}
	/* The guests go on for a while on whatever image they now run on. */
	if (!stopped)
		sleep_ms((unsigned)rnd_range(&s, 200));
	stop_writers(run, w, nw, &stopped);
	for (unsigned i = 0; i < nw; i++)
		ck_assert_msg(!w[i].failure[0], "seed %d (%s): writer %u: %s",
			      seed, run->params, i, w[i].failure);
	ck_assert_int_eq(blockmirror_job_query(c.job, &info), 0);
	ck_assert_msg(ev.failed == 0 && ev.errors == 0, "seed %d (%s): the "
		      "job reported errors: %s", seed, run->params,
		      ev.message);
	pivoted = info.state == BLOCKMIRROR_JOB_COMPLETED && ev.pivoted;
	synced = info.state == BLOCKMIRROR_JOB_COMPLETED && !ev.pivoted;
	switch (ending) {
	case END_PIVOT:
		ck_assert_msg(pivoted, "seed %d: not pivoted (%s)", seed,
			      blockmirror_job_state_name(info.state));
		break;
	case END_CANCEL_READY:
		ck_assert_msg(synced, "seed %d: cancel after READY ended %s",
			      seed, blockmirror_job_state_name(info.state));
		break;
	default:
		ck_assert_msg(info.state == BLOCKMIRROR_JOB_CANCELLED ||
			      (ending == END_CANCEL_EARLY && synced),
			      "seed %d: cancel ended %s", seed,
			      blockmirror_job_state_name(info.state));
		break;
	}
	blockmirror_job_free(c.job);
	img = blockmirror_disk_get_image(run->disk);
	ck_assert_msg(img && !strcmp(img, pivoted ? dst : src),
		      "seed %d: the disk runs on %s", seed, img);
	free(img);
	ck_assert_int_eq(blockmirror_disk_close(run->disk), 0);
	t_end = now_ms();

	verify(run, &s, src, src_fmt, dst, dst_fmt, pivoted, synced, t0, t1);
	/* qcow2 images the job wrote must also be sound to qemu-img
	 * (DESIGN.md, Formats).  Nothing crashed, so even a leak counts. */
	if (dst_fmt == BLOCKMIRROR_FORMAT_QCOW2 && (pivoted || synced))
		qcow2_check(run, dst, "destination");
	if (src_fmt == BLOCKMIRROR_FORMAT_QCOW2)
		qcow2_check(run, src, "source");
	{
		unsigned long total = 0;

		for (unsigned i = 0; i < nw; i++)
			total += w[i].ops;
		fprintf(stderr, "seed %d ok: %s\n  %s%s%s%s, %lu requests, "
			"%u mode switches%s%s\n  setup %.1f s, ready after "
			"%.1f s, ending call %.1f s, run %.1f s, check %.1f "
			"s\n",
			seed, run->params,
			pivoted ? "pivoted" : synced ? "cancelled after READY"
						     : "cancelled",
			ending == END_CANCEL_EARLY && synced ? " (was READY)"
							     : "",
			end_mode != BLOCKMIRROR_MODE_AUTO ? " in mode " : "",
			end_mode != BLOCKMIRROR_MODE_AUTO
				? blockmirror_mode_name(end_mode) : "",
			total, c.switches,
			c.forced_active ? ", forced active" : "",
			c.throttled ? ", writers slowed to converge" : "",
			(double)(t_job - t_start) / 1000,
			t_ready ? (double)(t_ready - t_job) / 1000 : -1.0,
			(double)(t_ret - t_call) / 1000,
			(double)(t_end - t_start) / 1000,
			(double)(now_ms() - t_end) / 1000);
	}

	if (nbdkit > 0) {
		kill(nbdkit, SIGTERM);
		waitpid(nbdkit, NULL, 0);
	}
	if (!getenv("BM_MODEL_KEEP")) {
		unlink(src);
		if (dst[0] == '/')
			unlink(dst);
		unlink(sock);
		rmdir(dir);
	}
	for (unsigned i = 0; i < nw; i++) {
		pthread_mutex_destroy(&w[i].lock);
		pthread_cond_destroy(&w[i].cond);
	}
	free(run->ops);
	free(run);
}

static int
remove_entry(const char *path, const struct stat *st, int flag,
	     struct FTW *ftw)
{
	(void)st;
	(void)flag;
	(void)ftw;
	remove(path); /* best effort */
	return 0;
}

START_TEST(test_model)
{
	run_seed(_i);
}
END_TEST

int
main(void)
{
	int first = 0, last = DEFAULT_SEEDS;
	Suite *s = suite_create("model");
	TCase *tc = tcase_create("model");
	int missing = missing_tool_status("nbdkit");
	int failed;

	if (missing)
		return missing;
	if (getenv("BM_MODEL_FIRST"))
		first = atoi(getenv("BM_MODEL_FIRST"));
	last = first + DEFAULT_SEEDS;
	if (getenv("BM_MODEL_SEEDS") && atoi(getenv("BM_MODEL_SEEDS")) > 0)
		last = first + atoi(getenv("BM_MODEL_SEEDS"));
	if (getenv("BM_MODEL_SEED")) {
		first = atoi(getenv("BM_MODEL_SEED"));
		last = first + 1;
	}
	blockmirror_set_log(on_log, NULL, BLOCKMIRROR_LOG_WARNING);
	if (!mkdtemp(base_dir)) {
		perror("mkdtemp");
		return 1;
	}
	tcase_set_timeout(tc, 900);
	tcase_add_loop_test(tc, test_model, first, last);
	suite_add_tcase(s, tc);
	failed = run_suite(s);
	if (getenv("BM_MODEL_KEEP") || failed)
		fprintf(stderr, "images kept in %s (remove it when done)\n",
			base_dir);
	else
		nftw(base_dir, remove_entry, 8, FTW_DEPTH | FTW_PHYS);
	return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
