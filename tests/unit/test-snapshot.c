/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Snapshots of a running disk (lib/snapshot.c, lib/snapshot-view.c): the
 * view holds what the disk held at the instant while guest writers keep
 * writing, through a move and its pivot, and a snapshot in trouble
 * breaks rather than fail or stall the guest.
 *
 * The model: every 4 KiB block carries a stamp (its block number and a
 * version) in every word.  Writer w owns the blocks of every w-th group
 * of four, so a block's versions only grow, and a 64 KiB chunk is shared
 * by four writers (copy-before-write races between them).  Each writer
 * writes 1 to 4 blocks of one group at a time.  Before the snapshot is
 * taken the test notes, per block, the newest version acknowledged (lo);
 * after it returns, the newest version started (hi).  The view must hold
 * a whole stamp with lo <= version <= hi in every block, and every later
 * read of the view must return the same bytes.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdatomic.h>
#include <sys/stat.h>

#include "fault.h"
#include "helpers.h"

#define BLOCK 4096u
#define NBLOCKS 2048u                 /* 8 MiB */
#define DISK_SIZE ((uint64_t)BLOCK * NBLOCKS)
#define NWRITERS 4

static char dir[64];
static char image[128];

struct model {
	struct blockmirror_disk *disk;
	_Atomic uint64_t acked[NBLOCKS];
	_Atomic uint64_t started[NBLOCKS];
	atomic_bool stop;
	atomic_uint writes;
	uint64_t seed;
	bool zeroes;                  /* writers also write-zeroes */
	unsigned span;                /* groups per writer, 0 for all */
};

struct writer {
	struct model *m;
	unsigned id;
	uint64_t rng;
	int err;
	atomic_uint done;             /* its writes acknowledged */
};

static void
stamp(uint8_t *buf, uint64_t block, uint64_t version)
{
	uint64_t v = (block << 32) | version;

	for (unsigned i = 0; i < BLOCK / 8; i++)
		memcpy(buf + i * 8, &v, 8);
}

/* The version a block holds, or -1 if it is not one whole stamp (zeroes
 * read as version 0 of any block: write-zeroes). */
static int64_t
version_of(const uint8_t *buf, uint64_t block)
{
	uint64_t v;

	memcpy(&v, buf, 8);
	for (unsigned i = 1; i < BLOCK / 8; i++)
		if (memcmp(buf + i * 8, &v, 8))
			return -1;
	if (v == 0)
		return 0;
	if (v >> 32 != block)
		return -1;
	return (int64_t)(v & 0xffffffffu);
}

static void
setup(void)
{
	uint8_t *buf = malloc(DISK_SIZE);
	int fd;

	snprintf(dir, sizeof dir, "/var/tmp/bm-snap-XXXXXX");
	ck_assert(mkdtemp(dir));
	snprintf(image, sizeof image, "%s/disk.raw", dir);
	for (uint64_t b = 0; b < NBLOCKS; b++)
		stamp(buf + b * BLOCK, b, 1);
	fd = open(image, O_CREAT | O_WRONLY | O_TRUNC, 0600);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(pwrite(fd, buf, DISK_SIZE, 0), (ssize_t)DISK_SIZE);
	close(fd);
	free(buf);
}

static void
teardown(void)
{
	remove_tree(dir);
}

static void
model_init(struct model *m, struct blockmirror_disk *disk, bool zeroes)
{
	memset(m, 0, sizeof *m);
	m->disk = disk;
	m->zeroes = zeroes;
	for (unsigned b = 0; b < NBLOCKS; b++) {
		atomic_store(&m->acked[b], 1);
		atomic_store(&m->started[b], 1);
	}
}

static void *
writer_main(void *arg)
{
	struct writer *w = arg;
	struct model *m = w->m;
	uint8_t *buf = aligned_alloc(BLOCK, 4 * BLOCK);
	unsigned groups = m->span ? m->span : NBLOCKS / 4 / NWRITERS;

	while (!atomic_load(&m->stop)) {
		uint64_t g = rnd_range(&w->rng, groups) * NWRITERS + w->id;
		uint64_t first = g * 4 + rnd_range(&w->rng, 4);
		uint64_t n = 1 + rnd_range(&w->rng, 4 - first % 4);
		bool zero = m->zeroes && rnd_range(&w->rng, 8) == 0;
		uint64_t v[4];
		int r;

		for (uint64_t i = 0; i < n; i++) {
			v[i] = atomic_load(&m->started[first + i]) + 1;
			stamp(buf + i * BLOCK, first + i, v[i]);
			atomic_store(&m->started[first + i], v[i]);
		}
		if (zero)
			r = blockmirror_disk_write_zeroes(m->disk, n * BLOCK,
							  first * BLOCK, 0);
		else
			r = blockmirror_disk_write(m->disk, buf, n * BLOCK,
						   first * BLOCK, 0);
		if (r < 0) {
			w->err = r;
			break;
		}
		/* A zeroed block holds "version 0": the model knows it as
		 * its version, since any later write is newer. */
		for (uint64_t i = 0; i < n; i++)
			atomic_store(&m->acked[first + i], v[i]);
		atomic_fetch_add(&m->writes, 1);
		atomic_fetch_add(&w->done, 1);
	}
	free(buf);
	return NULL;
}

static void
start_writers(struct model *m, struct writer *w, pthread_t *t)
{
	for (unsigned i = 0; i < NWRITERS; i++) {
		w[i] = (struct writer){ .m = m, .id = i,
					.rng = m->seed * 131 + i };
		ck_assert_int_eq(pthread_create(&t[i], NULL, writer_main,
						&w[i]), 0);
	}
}

static void
stop_writers(struct model *m, struct writer *w, pthread_t *t)
{
	atomic_store(&m->stop, true);
	for (unsigned i = 0; i < NWRITERS; i++) {
		pthread_join(t[i], NULL);
		ck_assert_msg(w[i].err == 0, "writer %u: %s", i,
			      strerror(-w[i].err));
	}
}

/* Take a snapshot with the writers running; lo/hi as at the top. */
static struct blockmirror_snapshot *
take(struct model *m, const struct blockmirror_snapshot_options *o,
     uint64_t *lo, uint64_t *hi)
{
	struct blockmirror_snapshot *snap;

	for (unsigned b = 0; b < NBLOCKS; b++)
		lo[b] = atomic_load(&m->acked[b]);
	ck_assert_msg(blockmirror_snapshot_take(&m->disk, 1, o, &snap) == 0,
		      "take: %s", blockmirror_last_error());
	for (unsigned b = 0; b < NBLOCKS; b++)
		hi[b] = atomic_load(&m->started[b]);
	return snap;
}

/* Read the whole view and check every block against [lo, hi]. */
static uint8_t *
read_view(struct blockmirror_snapshot *snap, const uint64_t *lo,
	  const uint64_t *hi)
{
	uint8_t *buf = aligned_alloc(BLOCK, DISK_SIZE);

	/* In pieces that cross chunks, as a backup would read. */
	for (uint64_t off = 0; off < DISK_SIZE; off += 192 * 1024) {
		uint64_t n = (DISK_SIZE - off < 192 * 1024 ? DISK_SIZE - off : 192 * 1024);

		ck_assert_msg(blockmirror_snapshot_read(snap, buf + off, n,
							off) == 0,
			      "view read at %" PRIu64 ": %s", off,
			      blockmirror_last_error());
	}
	for (uint64_t b = 0; b < NBLOCKS; b++) {
		int64_t v = version_of(buf + b * BLOCK, b);

		ck_assert_msg(v >= 0, "block %" PRIu64 ": not a whole stamp",
			      b);
		/* Zeroes stand for any version the writer zeroed. */
		if (v == 0)
			continue;
		ck_assert_msg((uint64_t)v >= lo[b] && (uint64_t)v <= hi[b],
			      "block %" PRIu64 ": version %" PRId64 " outside "
			      "[%" PRIu64 ", %" PRIu64 "]", b, v, lo[b],
			      hi[b]);
	}
	return buf;
}

static void
check_view_same(struct blockmirror_snapshot *snap, const uint8_t *first,
		uint64_t *rng)
{
	uint8_t *buf = aligned_alloc(BLOCK, 1024 * 1024);

	for (int i = 0; i < 64; i++) {
		uint64_t off = rnd_range(rng, NBLOCKS) * BLOCK;
		uint64_t n = (1 + rnd_range(rng, 64)) * BLOCK;

		if (off + n > DISK_SIZE)
			n = DISK_SIZE - off;
		ck_assert_msg(blockmirror_snapshot_read(snap, buf, n, off) == 0,
			      "%s", blockmirror_last_error());
		ck_assert_msg(!memcmp(buf, first + off, n),
			      "the view changed at %" PRIu64 "+%" PRIu64,
			      off, n);
	}
	free(buf);
}

/* The disk itself holds the newest acknowledged version everywhere. */
static void
check_disk(struct model *m)
{
	uint8_t *buf = aligned_alloc(BLOCK, DISK_SIZE);

	ck_assert_int_eq(blockmirror_disk_read(m->disk, buf, DISK_SIZE, 0), 0);
	for (uint64_t b = 0; b < NBLOCKS; b++) {
		int64_t v = version_of(buf + b * BLOCK, b);

		ck_assert_msg(v == 0 || (uint64_t)v == atomic_load(&m->acked[b]),
			      "disk block %" PRIu64 ": version %" PRId64
			      ", acknowledged %" PRIu64, b, v,
			      (uint64_t)atomic_load(&m->acked[b]));
	}
	free(buf);
}

static struct blockmirror_disk *
open_disk(const char *name)
{
	struct blockmirror_disk *disk =
		blockmirror_disk_open(name, BLOCKMIRROR_FORMAT_RAW, 0);

	ck_assert_msg(disk, "%s", blockmirror_last_error());
	ck_assert_int_eq(blockmirror_disk_start_thread(disk), 0);
	return disk;
}

static void
wait_writes(struct model *m, unsigned n)
{
	unsigned start = atomic_load(&m->writes);
	uint64_t deadline = now_ms() + 20000;

	while (atomic_load(&m->writes) - start < n && now_ms() < deadline)
		sleep_ms(5);
	ck_assert_msg(atomic_load(&m->writes) - start >= n,
		      "the writers stalled");
}

/* Until every writer has had n more writes acknowledged: each has one
 * write at a time, so whatever any of them had started before is done. */
static void
wait_each_writer(struct writer *w, unsigned n)
{
	unsigned start[NWRITERS];
	uint64_t deadline = now_ms() + 20000;

	for (unsigned i = 0; i < NWRITERS; i++)
		start[i] = atomic_load(&w[i].done);
	for (unsigned i = 0; i < NWRITERS; i++) {
		while (atomic_load(&w[i].done) - start[i] < n &&
		       now_ms() < deadline)
			sleep_ms(5);
		ck_assert_msg(atomic_load(&w[i].done) - start[i] >= n,
			      "writer %u stalled", i);
	}
}

/*
 * Writers run; a snapshot is taken among them; while they go on, the
 * view reads the instant, again and again; released, its scratch is
 * gone; the disk holds every acknowledged write.
 */
static void
snapshot_under_writers(uint64_t seed, bool zeroes, bool move,
		       bool move_first)
{
	struct blockmirror_snapshot_options o = { .size = sizeof o };
	struct blockmirror_snapshot_info info;
	struct blockmirror_job_options jo = { .size = sizeof jo };
	struct blockmirror_job *job = NULL;
	static struct model m;
	static uint64_t lo[NBLOCKS], hi[NBLOCKS];
	struct writer w[NWRITERS];
	pthread_t t[NWRITERS];
	uint64_t rng = seed;
	char dest[160], scratch[160];
	struct stat st;
	uint8_t *first;

	snprintf(dest, sizeof dest, "%s/dest.raw", dir);
	snprintf(scratch, sizeof scratch, "%s/scratch.raw", dir);
	model_init(&m, open_disk(image), zeroes);
	m.seed = seed;
	o.scratch = scratch;
	o.flags = BLOCKMIRROR_SNAPSHOT_CREATE;
	o.timeout_ms = 30000; /* a loaded test machine must not break it */
	jo.mode = BLOCKMIRROR_MODE_ACTIVE;
	jo.flags = BLOCKMIRROR_JOB_CREATE;
	jo.format = BLOCKMIRROR_FORMAT_RAW;
	jo.speed = 16 << 20; /* the move spans the writers' time */

	start_writers(&m, w, t);
	wait_writes(&m, 200);
	if (move && move_first) {
		job = blockmirror_job_start(m.disk, dest, &jo);
		ck_assert_msg(job, "%s", blockmirror_last_error());
	}
	struct blockmirror_snapshot *snap = take(&m, &o, lo, hi);

	if (move && !move_first) {
		job = blockmirror_job_start(m.disk, dest, &jo);
		ck_assert_msg(job, "%s", blockmirror_last_error());
	}
	wait_writes(&m, 300);
	first = read_view(snap, lo, hi);
	wait_writes(&m, 300);
	check_view_same(snap, first, &rng);
	if (job) {
		/* The pivot happens under the snapshot's filter. */
		ck_assert_int_eq(blockmirror_job_wait(job,
			BLOCKMIRROR_JOB_READY, 60000), BLOCKMIRROR_JOB_READY);
		ck_assert_msg(blockmirror_job_complete(job) == 0, "%s",
			      blockmirror_last_error());
		blockmirror_job_free(job);
		wait_writes(&m, 300);
		check_view_same(snap, first, &rng);
		free(blockmirror_disk_get_image(m.disk));
	}
	ck_assert_int_eq(blockmirror_snapshot_query(snap, &info), 0);
	ck_assert_int_eq(info.state, BLOCKMIRROR_SNAPSHOT_ACTIVE);
	ck_assert_uint_gt(info.cbw_count, 0);
	ck_assert_uint_gt(info.bytes_saved, 0);
	stop_writers(&m, w, t);
	check_view_same(snap, first, &rng);
	ck_assert_int_eq(blockmirror_snapshot_release(snap), 0);
	ck_assert_msg(stat(scratch, &st) < 0 && errno == ENOENT,
		      "the scratch image is still there");
	check_disk(&m);
	if (move) {
		char *now = blockmirror_disk_get_image(m.disk);

		ck_assert_str_eq(now, dest);
		free(now);
	}
	ck_assert_int_eq(blockmirror_disk_close(m.disk), 0);
	free(first);
}

START_TEST(test_view_is_the_instant)
{
	snapshot_under_writers(1 + (uint64_t)_i, _i % 2, false, false);
}
END_TEST

START_TEST(test_move_under_snapshot)
{
	snapshot_under_writers(11 + (uint64_t)_i, true, true, false);
}
END_TEST

START_TEST(test_snapshot_during_move)
{
	snapshot_under_writers(21 + (uint64_t)_i, true, true, true);
}
END_TEST

struct pending_read {
	atomic_bool done;
	int err;
};

static void
pending_read_done(void *user_data, int err)
{
	struct pending_read *p = user_data;

	p->err = err;
	atomic_store(&p->done, true);
}

/*
 * Rule 3: a view read of the disk's own image (a chunk not yet saved)
 * that is slow holds back a guest write to its range, even once the
 * chunk's old data is saved; the read returns the old data.
 */
START_TEST(test_slow_view_read_holds_write)
{
	struct blockmirror_snapshot_options o = { .size = sizeof o };
	static struct bm_fault_rules rules;
	struct blockmirror_snapshot *snap;
	struct blockmirror_disk *disk;
	struct pending_read p = { 0 };
	uint8_t *old = aligned_alloc(BLOCK, BLOCK);
	uint8_t *view = aligned_alloc(BLOCK, BLOCK);
	uint8_t *buf = aligned_alloc(BLOCK, BLOCK);

	memset(&rules, 0, sizeof rules);
	ck_assert_int_eq(bm_fault_register(image, &rules), 0);
	disk = open_disk(image);
	ck_assert_int_eq(blockmirror_disk_read(disk, old, BLOCK, 0), 0);
	ck_assert_int_eq(blockmirror_snapshot_take(&disk, 1, &o, &snap), 0);
	atomic_store(&rules.next_read_delay_ns, 400 * 1000000ull);
	ck_assert_int_eq(blockmirror_snapshot_aio_read(snap, view, BLOCK, 0,
						       pending_read_done, &p),
			 0);
	sleep_ms(50);
	memset(buf, 0x77, BLOCK);
	ck_assert_int_eq(blockmirror_disk_write(disk, buf, BLOCK, 0, 0), 0);
	ck_assert_msg(atomic_load(&p.done), "a guest write completed while "
		      "a view read of its range was reading the disk");
	ck_assert_int_eq(p.err, 0);
	ck_assert_msg(!memcmp(view, old, BLOCK), "the view read new data");
	ck_assert_int_eq(blockmirror_snapshot_read(snap, view, BLOCK, 0), 0);
	ck_assert_msg(!memcmp(view, old, BLOCK), "the view changed");
	ck_assert_int_eq(blockmirror_snapshot_release(snap), 0);
	ck_assert_int_eq(blockmirror_disk_close(disk), 0);
	bm_fault_unregister(image);
	free(old);
	free(view);
	free(buf);
}
END_TEST

/* What on_event heard (on the disk's loop thread). */
struct heard {
	atomic_int events;
	int type, err;
	char message[256];
};

static void
hear(void *user_data, const struct blockmirror_event *ev)
{
	struct heard *h = user_data;

	h->type = ev->type;
	h->err = ev->err;
	snprintf(h->message, sizeof h->message, "%s", ev->message);
	atomic_fetch_add(&h->events, 1);
}

/* A scratch that fills up breaks the snapshot; the guest never sees it.
 * The caller is told once, with why. */
START_TEST(test_full_scratch_breaks_not_guest)
{
	struct heard heard = { 0 };
	struct blockmirror_snapshot_options o = {
		.size = sizeof o, .on_event = hear, .event_data = &heard,
	};
	struct blockmirror_snapshot_info info;
	struct blockmirror_snapshot *snap;
	struct blockmirror_disk *disk = open_disk(image);
	uint8_t *buf = aligned_alloc(BLOCK, 1 << 20);
	uint8_t *view = aligned_alloc(BLOCK, BLOCK);

	o.max_scratch = 256 * 1024;
	ck_assert_int_eq(blockmirror_snapshot_take(&disk, 1, &o, &snap), 0);
	memset(buf, 0xab, 1 << 20);
	/* 4 MiB of guest writes: more than the scratch may hold. */
	for (uint64_t off = 0; off < 4 << 20; off += 1 << 20)
		ck_assert_msg(blockmirror_disk_write(disk, buf, 1 << 20, off,
						     0) == 0,
			      "the guest saw the snapshot's trouble: %s",
			      blockmirror_last_error());
	ck_assert_int_eq(blockmirror_snapshot_query(snap, &info), 0);
	ck_assert_int_eq(info.state, BLOCKMIRROR_SNAPSHOT_BROKEN);
	ck_assert_int_eq(info.error, ENOSPC);
	ck_assert_msg(strstr(info.reason, "full"), "reason: %s", info.reason);
	ck_assert_int_eq(atomic_load(&heard.events), 1);
	ck_assert_int_eq(heard.type, BLOCKMIRROR_EVENT_SNAPSHOT_BROKEN);
	ck_assert_int_eq(heard.err, ENOSPC);
	ck_assert_str_eq(heard.message, info.reason);
	ck_assert_int_eq(blockmirror_snapshot_read(snap, view, BLOCK, 0),
			 -EIO);
	ck_assert_msg(strstr(blockmirror_last_error(), "full"), "%s",
		      blockmirror_last_error());
	ck_assert_int_eq(blockmirror_disk_read(disk, view, BLOCK, 0), 0);
	ck_assert_int_eq(view[0], 0xab);
	ck_assert_int_eq(blockmirror_snapshot_release(snap), 0);
	ck_assert_int_eq(blockmirror_disk_close(disk), 0);
	free(buf);
	free(view);
}
END_TEST

/*
 * A scratch that hangs (an NBD server that stops answering) holds a
 * guest write at most timeout_ms; then the snapshot breaks and the write
 * completes.
 */
START_TEST(test_hung_scratch_times_out)
{
	struct blockmirror_snapshot_options o = { .size = sizeof o };
	struct blockmirror_snapshot_info info;
	struct blockmirror_snapshot *snap;
	struct blockmirror_disk *disk;
	char sock[160], uri[200], pidfile[160];
	uint8_t *buf = aligned_alloc(BLOCK, BLOCK);
	uint64_t t0;
	pid_t pid;

	snprintf(sock, sizeof sock, "%s/scratch.sock", dir);
	snprintf(pidfile, sizeof pidfile, "%s/nbdkit.pid", dir);
	snprintf(uri, sizeof uri, "nbd+unix:///?socket=%s", sock);
	/* Writes to the scratch take 60 s: a hung destination. */
	char *argv[] = { "nbdkit", "-f", "-U", sock, "-P", pidfile,
			 "--filter=delay", "memory", "16M", "wdelay=60",
			 NULL };
	pid = spawn_quiet(argv);
	wait_socket(sock, pid);
	disk = open_disk(image);
	o.scratch = uri;
	o.timeout_ms = 300;
	ck_assert_msg(blockmirror_snapshot_take(&disk, 1, &o, &snap) == 0,
		      "%s", blockmirror_last_error());
	memset(buf, 0x5a, BLOCK);
	/* Bounds far from the scratch's 60 s, not from the 300 ms: a
	 * loaded machine may be slow to do the rest. */
	t0 = now_ms();
	ck_assert_int_eq(blockmirror_disk_write(disk, buf, BLOCK, 0, 0), 0);
	ck_assert_msg(now_ms() - t0 < 20000, "the guest waited %" PRIu64
		      " ms", now_ms() - t0);
	ck_assert_int_eq(blockmirror_snapshot_query(snap, &info), 0);
	ck_assert_int_eq(info.state, BLOCKMIRROR_SNAPSHOT_BROKEN);
	ck_assert_int_eq(info.error, ETIMEDOUT);
	ck_assert_msg(strstr(info.reason, "300 ms"), "%s", info.reason);
	/* The copy still hangs there: the release cancels it. */
	t0 = now_ms();
	ck_assert_int_eq(blockmirror_snapshot_release(snap), 0);
	ck_assert_msg(now_ms() - t0 < 20000, "the release waited %" PRIu64
		      " ms for a hung scratch", now_ms() - t0);
	kill(pid, SIGKILL);
	waitpid(pid, NULL, 0);
	ck_assert_int_eq(blockmirror_disk_close(disk), 0);
	free(buf);
}
END_TEST

/* A "log, then data" writer: version v to disk A's block 0, and once
 * that is acknowledged, version v to disk B's block 0. */
struct log_writer {
	struct blockmirror_disk **disks;
	atomic_bool stop;
	_Atomic uint64_t n;
};

static void *
log_writer_main(void *arg)
{
	struct log_writer *q = arg;
	uint8_t *b = aligned_alloc(BLOCK, BLOCK);

	for (uint64_t v = 2; !atomic_load(&q->stop); v++) {
		stamp(b, 0, v);
		if (blockmirror_disk_write(q->disks[0], b, BLOCK, 0, 0) ||
		    blockmirror_disk_write(q->disks[1], b, BLOCK, 0, 0))
			break;
		atomic_store(&q->n, v);
	}
	free(b);
	return NULL;
}

/* Both disks at once, by the one-process group take. */
static int
take_group(struct blockmirror_disk **disks, struct blockmirror_snapshot **out)
{
	struct blockmirror_snapshot_options o = { .size = sizeof o };

	return blockmirror_snapshot_take(disks, 2, &o, out);
}

/* Both disks held, then each taken: what bmirror serve does for a group
 * across processes (snapshot-hold, snapshot-take). */
static int
take_held(struct blockmirror_disk **disks, struct blockmirror_snapshot **out)
{
	struct blockmirror_snapshot_options o = { .size = sizeof o };
	struct blockmirror_snapshot_hold *h[2] = { NULL, NULL };
	int r = blockmirror_snapshot_hold(disks[0], &o, 5000, &h[0]);

	if (r == 0)
		r = blockmirror_snapshot_hold(disks[1], &o, 5000, &h[1]);
	/* A write to disk A now would wait: the writer stands still. */
	for (int i = 0; r == 0 && i < 2; i++)
		r = blockmirror_snapshot_hold_take(h[i], &out[i]);
	blockmirror_snapshot_hold_free(h[0]);
	blockmirror_snapshot_hold_free(h[1]);
	return r;
}

/* Two disks, one instant: a write to disk B that follows an acknowledged
 * write to disk A is never in B's snapshot unless A's is in A's. */
static void
group_rounds(int (*take_fn)(struct blockmirror_disk **disks,
			    struct blockmirror_snapshot **out))
{
	struct blockmirror_snapshot *snaps[2];
	struct blockmirror_disk *disks[2];
	char second[160];
	uint8_t *buf = aligned_alloc(BLOCK, BLOCK), *a = aligned_alloc(BLOCK,
								      BLOCK);
	struct log_writer s = { .disks = disks };
	char cmd[400];
	pthread_t t;

	snprintf(second, sizeof second, "%s/disk2.raw", dir);
	snprintf(cmd, sizeof cmd, "cp %s %s", image, second);
	ck_assert_int_eq(system(cmd), 0);
	disks[0] = open_disk(image);
	disks[1] = open_disk(second);
	ck_assert_int_eq(pthread_create(&t, NULL, log_writer_main, &s), 0);
	for (int round = 0; round < 20; round++) {
		int64_t va, vb;

		while (atomic_load(&s.n) < (uint64_t)(round + 1) * 20)
			sleep_ms(1);
		ck_assert_msg(take_fn(disks, snaps) == 0, "%s",
			      blockmirror_last_error());
		ck_assert_int_eq(blockmirror_snapshot_read(snaps[0], a, BLOCK,
							   0), 0);
		ck_assert_int_eq(blockmirror_snapshot_read(snaps[1], buf, BLOCK,
							   0), 0);
		va = version_of(a, 0);
		vb = version_of(buf, 0);
		/* B never ahead of A; A at most one ahead of B. */
		ck_assert_msg(vb <= va && va <= vb + 1,
			      "round %d: A at %" PRId64 ", B at %" PRId64,
			      round, va, vb);
		ck_assert_int_eq(blockmirror_snapshot_release(snaps[0]), 0);
		ck_assert_int_eq(blockmirror_snapshot_release(snaps[1]), 0);
	}
	atomic_store(&s.stop, true);
	pthread_join(t, NULL);
	ck_assert_int_eq(blockmirror_disk_close(disks[0]), 0);
	ck_assert_int_eq(blockmirror_disk_close(disks[1]), 0);
	free(buf);
	free(a);
}

START_TEST(test_group_one_instant)
{
	group_rounds(take_group);
}
END_TEST

START_TEST(test_hold_group_one_instant)
{
	group_rounds(take_held);
}
END_TEST

/* A guest write, from a thread of its own, and when it ended. */
struct timed_write {
	struct blockmirror_disk *disk;
	uint8_t *buf;
	pthread_t t;
	double end;                   /* now_s() once it returned */
	atomic_bool done;
	int r;
};

static void *
timed_write_main(void *arg)
{
	struct timed_write *w = arg;

	w->r = blockmirror_disk_write(w->disk, w->buf, BLOCK, 0, 0);
	w->end = now_s();
	atomic_store(&w->done, true);
	return NULL;
}

static void
timed_write_start(struct timed_write *w, uint64_t version)
{
	stamp(w->buf, 0, version);
	atomic_store(&w->done, false);
	ck_assert_int_eq(pthread_create(&w->t, NULL, timed_write_main, w), 0);
}

/* Wait up to `ms` for the write to return (then it is joined). */
static bool
timed_write_wait(struct timed_write *w, unsigned ms)
{
	for (uint64_t end = now_ms() + ms;
	     !atomic_load(&w->done) && now_ms() < end;)
		sleep_ms(1);
	if (!atomic_load(&w->done))
		return false;
	pthread_join(w->t, NULL);
	return true;
}

/* Until a guest request waits in the queue of the held disk: true, and
 * *at a time after it queued; false if the hold ended first. */
static bool
wait_queued(struct blockmirror_snapshot_hold *h, double *at)
{
	struct blockmirror_snapshot_hold_info hi = { .size = sizeof hi };

	for (;;) {
		ck_assert_int_eq(blockmirror_snapshot_hold_query(h, &hi), 0);
		*at = now_s();
		if (!hi.held)
			return false;
		if (hi.queued_us > 0)
			return true;
		sleep_ms(1);
	}
}

/*
 * The lease: a hold nobody takes lets the guest go on by itself after
 * lease_ms (a write held meanwhile completes then), the take fails naming
 * the lease, and the disk takes the next hold.  A hold let go early
 * frees the guest at once.  Times are counted from the hold call, as the
 * lease is, and from when the write was seen queued: not from when a
 * thread got to run.
 */
START_TEST(test_hold_lease)
{
	struct blockmirror_snapshot_options o = { .size = sizeof o };
	struct blockmirror_snapshot_hold_info hi = { .size = sizeof hi };
	struct blockmirror_snapshot_hold *h;
	struct blockmirror_snapshot *snap;
	struct blockmirror_disk *disk = open_disk(image);
	uint8_t *buf = aligned_alloc(BLOCK, BLOCK);
	struct timed_write w = { .disk = disk, .buf = buf };
	double t0 = 0, t1 = 0, tq = 0, lease = 0;
	bool queued = false;

	ck_assert_int_eq(blockmirror_snapshot_hold(disk, &o, 0, &h), -EINVAL);
	/* A write that queues behind the hold.  On a machine so slow that
	 * it only came once the lease had run out, again with a longer
	 * lease. */
	for (uint32_t lease_ms = 300; !queued && lease_ms <= 30000;
	     lease_ms *= 10) {
		lease = lease_ms / 1000.0;
		t0 = now_s();
		ck_assert_int_eq(blockmirror_snapshot_hold(disk, &o, lease_ms,
							   &h), 0);
		t1 = now_s();
		timed_write_start(&w, 7);
		queued = wait_queued(h, &tq);
		ck_assert_msg(timed_write_wait(&w, lease_ms + 20000), "the "
			      "held write still waits %.1f s after a lease "
			      "of %.1f s", now_s() - t0, lease);
		if (!queued)
			blockmirror_snapshot_hold_free(h);
	}
	ck_assert_msg(queued, "the write never queued behind a hold");
	ck_assert_int_eq(w.r, 0);
	/* It waited until the lease ran out, counted from the call (5 ms:
	 * timers may round). */
	ck_assert_msg(w.end - t0 >= lease - 0.005, "the held write returned "
		      "%.3f s after the hold call, the lease is %.1f s",
		      w.end - t0, lease);
	ck_assert_int_eq(blockmirror_snapshot_hold_query(h, &hi), 0);
	ck_assert(!hi.held && hi.expired);
	/* Held from within the call to the end of the lease; the write
	 * queued from before it was seen queued. */
	ck_assert_msg(hi.held_us + 5000 >= (t0 + lease - t1) * 1e6, "held "
		      "%" PRIu64 " us", hi.held_us);
	ck_assert_msg(hi.queued_us > 0 &&
		      hi.queued_us + 5000 >= (t0 + lease - tq) * 1e6,
		      "queued %" PRIu64 " us, seen queued %.3f s after the "
		      "hold call", hi.queued_us, tq - t0);
	ck_assert_int_eq(blockmirror_snapshot_hold_take(h, &snap), -ETIMEDOUT);
	ck_assert_msg(strstr(blockmirror_last_error(), "lease"), "%s",
		      blockmirror_last_error());
	blockmirror_snapshot_hold_free(h);

	/* Let go before the take: the guest goes on at once, long before
	 * the lease would let it. */
	t0 = now_s();
	ck_assert_int_eq(blockmirror_snapshot_hold(disk, &o, 60000, &h), 0);
	ck_assert_int_eq(blockmirror_snapshot_hold_query(h, &hi), 0);
	ck_assert(hi.held && !hi.expired);
	timed_write_start(&w, 8);
	ck_assert_msg(wait_queued(h, &tq), "the write never queued");
	blockmirror_snapshot_hold_free(h);
	ck_assert_msg(timed_write_wait(&w, 30000), "the write still waits "
		      "30 s after its hold was let go");
	ck_assert_int_eq(w.r, 0);
	ck_assert_msg(w.end - t0 < 60, "the write waited for the lease");

	/* The next hold is taken, at its instant: the write queued behind
	 * it is not in the snapshot. */
	ck_assert_int_eq(blockmirror_snapshot_hold(disk, &o, 30000, &h), 0);
	timed_write_start(&w, 9);
	ck_assert_msg(wait_queued(h, &tq), "the write never queued");
	sleep_ms(50);
	ck_assert_int_eq(blockmirror_snapshot_hold_take(h, &snap), 0);
	ck_assert_msg(timed_write_wait(&w, 30000), "the write still waits "
		      "30 s after the take");
	ck_assert_int_eq(w.r, 0);
	ck_assert_int_eq(blockmirror_snapshot_hold_query(h, &hi), 0);
	ck_assert(!hi.held && !hi.expired && hi.held_us >= 40000);
	blockmirror_snapshot_hold_free(h);
	ck_assert_int_eq(blockmirror_snapshot_read(snap, buf, BLOCK, 0), 0);
	ck_assert_int_eq(version_of(buf, 0), 8);
	ck_assert_int_eq(blockmirror_disk_read(disk, buf, BLOCK, 0), 0);
	ck_assert_int_eq(version_of(buf, 0), 9);
	ck_assert_int_eq(blockmirror_snapshot_release(snap), 0);
	ck_assert_int_eq(blockmirror_disk_close(disk), 0);
	free(buf);
}
END_TEST

/* Someone else's snapshot or checkpoint operation under way on the disk:
 * a take queues behind it instead of failing with -EBUSY. */
struct bg_release {
	struct blockmirror_snapshot *snap;
	int r;
};

static void *
bg_release_main(void *arg)
{
	struct bg_release *b = arg;

	b->r = blockmirror_snapshot_release(b->snap);
	return NULL;
}

START_TEST(test_operations_queue)
{
	struct blockmirror_snapshot_options o = { .size = sizeof o };
	static struct bm_fault_rules rules;
	struct blockmirror_snapshot *s1, *s2;
	struct blockmirror_disk *disk;
	struct pending_read p = { 0 };
	struct bg_release b = { 0 };
	uint8_t *buf = aligned_alloc(BLOCK, BLOCK);
	pthread_t t;

	memset(&rules, 0, sizeof rules);
	ck_assert_int_eq(bm_fault_register(image, &rules), 0);
	disk = open_disk(image);
	ck_assert_int_eq(blockmirror_snapshot_take(&disk, 1, &o, &s1), 0);
	/* A guest write in flight for 500 ms keeps the release draining. */
	atomic_store(&rules.next_write_delay_ns, 500 * 1000000ull);
	memset(buf, 0x42, BLOCK);
	ck_assert_int_eq(blockmirror_disk_aio_write(disk, buf, BLOCK,
						    BLOCK * 100, 0,
						    pending_read_done, &p), 0);
	sleep_ms(50);
	b.snap = s1;
	ck_assert_int_eq(pthread_create(&t, NULL, bg_release_main, &b), 0);
	sleep_ms(100);
	ck_assert_msg(blockmirror_snapshot_take(&disk, 1, &o, &s2) == 0,
		      "a take beside a release: %s", blockmirror_last_error());
	pthread_join(t, NULL);
	ck_assert_int_eq(b.r, 0);
	ck_assert(atomic_load(&p.done));
	ck_assert_int_eq(p.err, 0);
	ck_assert_int_eq(blockmirror_snapshot_release(s2), 0);
	ck_assert_int_eq(blockmirror_disk_close(disk), 0);
	bm_fault_unregister(image);
	free(buf);
}
END_TEST

/*
 * A guest fstrim (a large discard) over chunks not yet saved neither
 * copies them nor waits: the discard leaves them as they were, the
 * snapshot stays active even with a slow scratch and a short timeout,
 * and the view still reads the instant.
 */
START_TEST(test_large_discard_does_not_copy)
{
	struct blockmirror_snapshot_options o = { .size = sizeof o };
	static struct bm_fault_rules rules;
	struct blockmirror_snapshot_info info;
	struct blockmirror_snapshot *snap;
	struct blockmirror_disk *disk = open_disk(image);
	uint8_t *old = aligned_alloc(BLOCK, DISK_SIZE);
	uint8_t *view = aligned_alloc(BLOCK, DISK_SIZE);
	char scratch[160];
	uint64_t t0, sub;

	snprintf(scratch, sizeof scratch, "%s/slow-scratch.raw", dir);
	memset(&rules, 0, sizeof rules);
	atomic_store(&rules.write_delay_ns, 200 * 1000000ull);
	ck_assert_int_eq(bm_fault_register(scratch, &rules), 0);
	ck_assert_int_eq(blockmirror_disk_read(disk, old, DISK_SIZE, 0), 0);
	o.scratch = scratch;
	o.flags = BLOCKMIRROR_SNAPSHOT_CREATE;
	o.timeout_ms = 100;
	ck_assert_msg(blockmirror_snapshot_take(&disk, 1, &o, &snap) == 0,
		      "%s", blockmirror_last_error());
	/* Copying 6 MiB to this scratch (200 ms a write) would break the
	 * snapshot after 100 ms.  Not a request reaches the scratch; the
	 * time only has to be far from such copies'. */
	sub = atomic_load(&rules.submitted);
	t0 = now_ms();
	ck_assert_int_eq(blockmirror_disk_discard(disk, 6 << 20, 1 << 20), 0);
	ck_assert_msg(now_ms() - t0 < 10000, "the discard took %" PRIu64
		      " ms", now_ms() - t0);
	ck_assert_msg(atomic_load(&rules.submitted) == sub, "the discard "
		      "sent %" PRIu64 " requests to the scratch",
		      (uint64_t)(atomic_load(&rules.submitted) - sub));
	ck_assert_int_eq(blockmirror_snapshot_query(snap, &info), 0);
	ck_assert_msg(info.state == BLOCKMIRROR_SNAPSHOT_ACTIVE, "%s",
		      info.reason);
	ck_assert_int_eq(blockmirror_snapshot_read(snap, view, DISK_SIZE, 0),
			 0);
	ck_assert_msg(!memcmp(view, old, DISK_SIZE), "the view changed");
	ck_assert_int_eq(blockmirror_snapshot_release(snap), 0);
	ck_assert_int_eq(blockmirror_disk_close(disk), 0);
	bm_fault_unregister(scratch);
	free(old);
	free(view);
}
END_TEST

/*
 * Pins cost linear time: a view read of a whole 64 MiB disk saved in
 * every other 4 KiB chunk (8192 runs from below), with guest writes
 * waiting on its pins all along, costs about what the same read costs
 * with nobody waiting, and about 16 times a read of a sixteenth of the
 * disk: tens of ms with one pin per read; a pin per run and a walk of
 * every pin per completion cost a few hundred ms here, seconds at a few
 * times the size.  Measured against those reads in the same test, in
 * the process's CPU time, not against a time: the machine and build
 * (sanitizers) may be slow, and loaded by others.
 */
#define PIN_DISK (64ull << 20)
#define PIN_WRITERS 4

struct write_loop {
	struct blockmirror_disk *disk;
	atomic_bool *stop;
	unsigned id;
	int err;
	atomic_uint done;             /* its writes acknowledged */
};

static void *
write_loop_main(void *arg)
{
	struct write_loop *q = arg;
	uint8_t *b = aligned_alloc(BLOCK, BLOCK);

	memset(b, 0x11, BLOCK);
	for (uint64_t i = 0; !atomic_load(q->stop) && !q->err; i++) {
		/* Chunks near the end, which the view reads (pinned)
		 * last; round again rather than run off the start of the
		 * disk. */
		uint64_t chunk = ((i * PIN_WRITERS + q->id) * 2 + 1) %
				 (PIN_DISK / BLOCK / 2);

		q->err = blockmirror_disk_write(q->disk, b, BLOCK,
						PIN_DISK - (chunk + 1) * BLOCK,
						0);
		atomic_fetch_add(&q->done, 1);
	}
	free(b);
	return NULL;
}

/* The cheapest of `n` reads of the view's last `len` bytes, in seconds
 * of the process's CPU time (what the reads cost, not how long others
 * kept the CPUs); each must read the instant (all 0x99). */
static double
pin_view_read(struct blockmirror_snapshot *snap, uint8_t *buf, uint64_t len,
	      int n)
{
	double best = 1e9;

	for (int k = 0; k < n; k++) {
		struct timespec a, b;
		double t;

		clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &a);
		ck_assert_int_eq(blockmirror_snapshot_read(snap, buf, len,
							   PIN_DISK - len), 0);
		clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &b);
		t = (double)(b.tv_sec - a.tv_sec) +
		    (double)(b.tv_nsec - a.tv_nsec) / 1e9;
		if (t < best)
			best = t;
		for (uint64_t i = 0; i < len; i++)
			if (buf[i] != 0x99)
				ck_abort_msg("the view read new data at %"
					     PRIu64,
					     (uint64_t)(PIN_DISK - len + i));
	}
	return best;
}

START_TEST(test_pins_linear)
{
	struct blockmirror_snapshot_options o = { .size = sizeof o };
	struct write_loop q[PIN_WRITERS];
	struct blockmirror_snapshot *snap;
	struct blockmirror_disk *disk;
	uint8_t *buf = aligned_alloc(BLOCK, PIN_DISK);
	pthread_t t[PIN_WRITERS];
	atomic_bool stop = false;
	double alone, waited, part;
	char big[160];
	int fd;

	snprintf(big, sizeof big, "%s/big.raw", dir);
	memset(buf, 0x99, PIN_DISK);
	fd = open(big, O_CREAT | O_WRONLY | O_TRUNC, 0600);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(pwrite(fd, buf, PIN_DISK, 0), (ssize_t)PIN_DISK);
	close(fd);
	disk = open_disk(big);
	o.granularity = BLOCK;
	o.timeout_ms = 60000;
	ck_assert_int_eq(blockmirror_snapshot_take(&disk, 1, &o, &snap), 0);
	/* Save every other chunk. */
	for (uint64_t off = 0; off < PIN_DISK; off += 2 * BLOCK)
		ck_assert_int_eq(blockmirror_disk_write(disk, buf, BLOCK, off,
							0), 0);
	/* The read with nobody waiting on its pin. */
	alone = pin_view_read(snap, buf, PIN_DISK, 3);
	for (unsigned i = 0; i < PIN_WRITERS; i++) {
		q[i] = (struct write_loop){ .disk = disk, .stop = &stop,
					    .id = i };
		ck_assert_int_eq(pthread_create(&t[i], NULL, write_loop_main,
						&q[i]), 0);
	}
	/* Every writer under way (each then writes into the pinned range
	 * as soon as its last write is through). */
	for (uint64_t end = now_ms() + 20000; now_ms() < end;) {
		unsigned ready = 0;

		for (unsigned i = 0; i < PIN_WRITERS; i++)
			ready += atomic_load(&q[i].done) > 0;
		if (ready == PIN_WRITERS)
			break;
		sleep_ms(1);
	}
	for (unsigned i = 0; i < PIN_WRITERS; i++)
		ck_assert_msg(atomic_load(&q[i].done) > 0, "writer %u: no "
			      "write in 20 s", i);
	/* A sixteenth of the disk (the end, where they write), then the
	 * whole read, with the writers waiting on its pin. */
	part = pin_view_read(snap, buf, PIN_DISK / 16, 5);
	waited = pin_view_read(snap, buf, PIN_DISK, 3);
	atomic_store(&stop, true);
	for (unsigned i = 0; i < PIN_WRITERS; i++) {
		pthread_join(t[i], NULL);
		ck_assert_int_eq(q[i].err, 0);
	}
	/* Generous factors, against about 1 and 16 here at any speed: a
	 * cost that grows with the square of the runs passes 48 once it is
	 * a few times the linear cost. */
	ck_assert_msg(waited < 8 * alone + 0.02, "a whole view read cost "
		      "%.1f ms with writers waiting on its pins, %.1f ms "
		      "without", waited * 1e3, alone * 1e3);
	ck_assert_msg(waited < 48 * part, "a whole view read cost %.1f ms, "
		      "%.0f times a sixteenth of it (%.2f ms)", waited * 1e3,
		      waited / part, part * 1e3);
	ck_assert_int_eq(blockmirror_snapshot_release(snap), 0);
	ck_assert_int_eq(blockmirror_disk_close(disk), 0);
	free(buf);
}
END_TEST

/*
 * A group take whose second disk does not drain (a guest write hangs
 * there until the test lets it go) gives up after 10 s with -ETIMEDOUT
 * naming that disk, and lets the first disk go on.
 */
START_TEST(test_group_take_deadline)
{
	struct blockmirror_snapshot_options o = { .size = sizeof o };
	static struct bm_fault_rules rules;
	struct blockmirror_snapshot *snaps[2];
	struct blockmirror_disk *disks[2];
	struct pending_read p = { 0 }, p0 = { 0 };
	uint8_t *buf = aligned_alloc(BLOCK, BLOCK);
	char second[160], cmd[400];
	uint64_t t0, sub;

	snprintf(second, sizeof second, "%s/hang.raw", dir);
	snprintf(cmd, sizeof cmd, "cp %s %s", image, second);
	ck_assert_int_eq(system(cmd), 0);
	memset(&rules, 0, sizeof rules);
	ck_assert_int_eq(bm_fault_register(second, &rules), 0);
	disks[0] = open_disk(image);
	disks[1] = open_disk(second);
	atomic_store(&rules.hang, true);
	sub = atomic_load(&rules.submitted);
	memset(buf, 0x33, BLOCK);
	ck_assert_int_eq(blockmirror_disk_aio_write(disks[1], buf, BLOCK, 0, 0,
						    pending_read_done, &p), 0);
	/* In flight (held) before the take. */
	for (t0 = now_ms(); atomic_load(&rules.submitted) == sub &&
	     now_ms() - t0 < 20000;)
		sleep_ms(1);
	ck_assert_uint_gt(atomic_load(&rules.submitted), sub);
	t0 = now_ms();
	ck_assert_int_eq(blockmirror_snapshot_take(disks, 2, &o, snaps),
			 -ETIMEDOUT);
	ck_assert_msg(now_ms() - t0 < 13000, "took %" PRIu64 " ms",
		      now_ms() - t0);
	ck_assert_msg(strstr(blockmirror_last_error(), second), "%s",
		      blockmirror_last_error());
	/* The first disk goes on, while the second still hangs. */
	ck_assert_int_eq(blockmirror_disk_aio_write(disks[0], buf, BLOCK, 0, 0,
						    pending_read_done, &p0), 0);
	for (t0 = now_ms(); !atomic_load(&p0.done) && now_ms() - t0 < 20000;)
		sleep_ms(1);
	ck_assert_msg(atomic_load(&p0.done), "the first disk is still held");
	ck_assert_int_eq(p0.err, 0);
	ck_assert(!atomic_load(&p.done));
	atomic_store(&rules.hang, false);
	for (t0 = now_ms(); !atomic_load(&p.done) && now_ms() - t0 < 20000;)
		sleep_ms(1);
	ck_assert(atomic_load(&p.done));
	ck_assert_int_eq(p.err, 0);
	ck_assert_int_eq(blockmirror_disk_close(disks[0]), 0);
	ck_assert_int_eq(blockmirror_disk_close(disks[1]), 0);
	bm_fault_unregister(second);
	free(buf);
}
END_TEST

/* Bad options, and a disk closed under a snapshot. */
START_TEST(test_bad_options_and_close)
{
	struct blockmirror_snapshot_options o = { .size = sizeof o };
	struct blockmirror_snapshot_info info;
	struct blockmirror_snapshot *snap;
	struct blockmirror_disk *disk = open_disk(image);
	uint8_t *buf = aligned_alloc(BLOCK, BLOCK);
	char small[160];

	o.granularity = 3000;
	ck_assert_int_eq(blockmirror_snapshot_take(&disk, 1, &o, &snap),
			 -EINVAL);
	ck_assert_msg(strstr(blockmirror_last_error(), "granularity"), "%s",
		      blockmirror_last_error());
	o.granularity = 0;
	o.flags = BLOCKMIRROR_SNAPSHOT_CREATE;
	ck_assert_int_eq(blockmirror_snapshot_take(&disk, 1, &o, &snap),
			 -EINVAL);
	/* A scratch smaller than the disk. */
	snprintf(small, sizeof small, "%s/small.raw", dir);
	close(open(small, O_CREAT | O_WRONLY, 0600));
	ck_assert_int_eq(truncate(small, 1 << 20), 0);
	o.flags = 0;
	o.scratch = small;
	ck_assert_int_eq(blockmirror_snapshot_take(&disk, 1, &o, &snap),
			 -EINVAL);
	ck_assert_msg(strstr(blockmirror_last_error(), "less than"), "%s",
		      blockmirror_last_error());
	/* The disk closes under a live snapshot: detached, still freeable. */
	o.scratch = NULL;
	ck_assert_int_eq(blockmirror_snapshot_take(&disk, 1, &o, &snap), 0);
	ck_assert_int_eq(blockmirror_disk_close(disk), 0);
	ck_assert_int_eq(blockmirror_snapshot_query(snap, &info), 0);
	ck_assert_int_eq(info.state, BLOCKMIRROR_SNAPSHOT_DETACHED);
	ck_assert_int_eq(blockmirror_snapshot_read(snap, buf, BLOCK, 0),
			 -ESHUTDOWN);
	ck_assert_int_eq(blockmirror_snapshot_release(snap), 0);
	free(buf);
}
END_TEST

/* A snapshot that makes a checkpoint and is refused (its scratch is the
 * disk's own image) leaves no checkpoint behind: the refusal comes
 * before the checkpoint is made. */
START_TEST(test_refused_take_leaves_no_checkpoint)
{
	struct blockmirror_snapshot_options o = { .size = sizeof o };
	struct blockmirror_snapshot *snap = NULL;
	struct blockmirror_disk *disk = open_disk(image);
	struct blockmirror_checkpoint *list = NULL;
	char sidecar[160];
	size_t n = 99;

	snprintf(sidecar, sizeof sidecar, "%s/disk.cbt", dir);
	ck_assert_int_eq(blockmirror_disk_track(disk, sidecar, 0, NULL), 0);
	ck_assert_int_eq(blockmirror_checkpoint_create(disk, "c0"), 0);
	o.scratch = image;
	o.since = "c0";
	o.checkpoint = "c1";
	ck_assert_int_eq(blockmirror_snapshot_take(&disk, 1, &o, &snap),
			 -EINVAL);
	ck_assert_msg(strstr(blockmirror_last_error(), "image of the disk"),
		      "%s", blockmirror_last_error());
	ck_assert_ptr_null(snap);
	ck_assert_int_eq(blockmirror_checkpoint_list(disk, &list, &n), 0);
	ck_assert_uint_eq(n, 1);
	ck_assert_str_eq(list[0].name, "c0");
	free(list);
	/* And c1 may be made now: the name was not taken. */
	o.scratch = NULL;
	ck_assert_int_eq(blockmirror_snapshot_take(&disk, 1, &o, &snap), 0);
	ck_assert_int_eq(blockmirror_snapshot_release(snap), 0);
	ck_assert_int_eq(blockmirror_disk_close(disk), 0);
}
END_TEST

/*
 * CHANGED_ONLY (rule 5): a snapshot taken since checkpoint c0 among the
 * writers holds their changes at the instant and nothing else.  The
 * changed chunks read as the instant; every other chunk fails with
 * -ENODATA, and the guest's writes to them save nothing; a chunk dropped
 * while the writers go on stops costing copies and stops reading, and a
 * drop that is not chunk-aligned lets go only of the chunks wholly in it.
 * Runs with the record's granularity below, equal to and above the
 * snapshot's.
 */
static const uint32_t changed_only_track[] = { 4096, 16384, 65536, 262144 };

START_TEST(test_changed_only)
{
	struct blockmirror_snapshot_options o = { .size = sizeof o };
	struct blockmirror_snapshot_info info;
	static struct model m;
	static uint64_t lo[NBLOCKS], hi[NBLOCKS];
	struct writer w[NWRITERS];
	pthread_t t[NWRITERS];
	uint64_t gt, *words = NULL, nbits, bytes, saved, cbw;
	uint64_t held = 0, unheld = 0, g = 16384;
	uint8_t *first = aligned_alloc(BLOCK, DISK_SIZE);
	uint8_t *buf = aligned_alloc(BLOCK, DISK_SIZE);
	char sidecar[160];
	struct blockmirror_snapshot *snap;

	memset(first, 0, DISK_SIZE);
	snprintf(sidecar, sizeof sidecar, "%s/disk.cbt", dir);
	model_init(&m, open_disk(image), false);
	m.seed = 11 + (uint64_t)_i;
	/* The writers keep to the first three quarters of the disk, so the
	 * last quarter is unchanged however many writes come before the
	 * instant: some chunks are held and some are not on any machine. */
	m.span = NBLOCKS / 4 / NWRITERS * 3 / 4;
	ck_assert_int_eq(blockmirror_disk_track(m.disk, sidecar,
						changed_only_track[_i], NULL),
			 0);
	ck_assert_int_eq(blockmirror_checkpoint_create(m.disk, "c0"), 0);
	o.flags = BLOCKMIRROR_SNAPSHOT_CHANGED_ONLY;
	ck_assert_int_eq(blockmirror_snapshot_take(&m.disk, 1, &o, &snap),
			 -EINVAL);
	o.since = "c0";
	o.granularity = g;
	o.timeout_ms = 30000;
	start_writers(&m, w, t);
	wait_writes(&m, 20);
	snap = take(&m, &o, lo, hi);
	ck_assert_int_eq(blockmirror_snapshot_changed(snap, &gt, &words,
						      &nbits, &bytes), 0);
	ck_assert_uint_eq(gt, changed_only_track[_i]);
	wait_writes(&m, 200);

	/* Each chunk of the snapshot: held if the record marks any of it. */
	for (uint64_t c = 0; c < DISK_SIZE / g; c++) {
		bool marked = false;

		for (uint64_t off = c * g; off < (c + 1) * g; off += BLOCK)
			marked |= words[off / gt / 64] >> (off / gt % 64) & 1;
		/* Whatever was acknowledged before the instant is marked. */
		for (uint64_t b = c * g / BLOCK; !marked &&
		     b < (c + 1) * g / BLOCK; b++)
			ck_assert_msg(lo[b] == 1, "block %" PRIu64 " was "
				      "written before the instant but is not "
				      "in the record", b);
		if (!marked) {
			ck_assert_int_eq(blockmirror_snapshot_read(snap, buf,
					 BLOCK, c * g + BLOCK), -ENODATA);
			unheld++;
			continue;
		}
		held++;
		ck_assert_msg(blockmirror_snapshot_read(snap, first + c * g, g,
							c * g) == 0,
			      "%s", blockmirror_last_error());
		for (uint64_t b = c * g / BLOCK; b < (c + 1) * g / BLOCK; b++) {
			int64_t v = version_of(first + b * BLOCK, b);

			ck_assert_msg(v >= 1 && (uint64_t)v >= lo[b] &&
				      (uint64_t)v <= hi[b], "block %" PRIu64
				      ": version %" PRId64 " outside [%" PRIu64
				      ", %" PRIu64 "]", b, v, lo[b], hi[b]);
		}
	}
	ck_assert_msg(held && unheld, "%" PRIu64 " chunks held, %" PRIu64
		      " not: the test wants both", held, unheld);
	/* Only held chunks were ever saved. */
	ck_assert_int_eq(blockmirror_snapshot_query(snap, &info), 0);
	ck_assert_uint_le(info.bytes_saved, held * g);
	/* A read across a held and an unheld chunk fails whole. */
	ck_assert_int_eq(blockmirror_snapshot_read(snap, buf, DISK_SIZE, 0),
			 -ENODATA);

	/* A drop from the middle of chunk 0 to the middle of chunk 2 lets
	 * go of chunk 1 only. */
	ck_assert_int_eq(blockmirror_snapshot_drop(snap, g / 2, 2 * g), 0);
	for (uint64_t c = 0; c < 3; c++) {
		int r = blockmirror_snapshot_read(snap, buf, g, c * g);

		if (c == 1 || version_of(first + c * g, c * g / BLOCK) <= 0) {
			ck_assert_int_eq(r, -ENODATA);
			continue;
		}
		ck_assert_int_eq(r, 0);
		ck_assert_msg(!memcmp(buf, first + c * g, g),
			      "chunk %" PRIu64 " changed", c);
	}
	/* Drop the first half of the disk, as a sender would after reading
	 * it; the second half still reads as the instant. */
	ck_assert_int_eq(blockmirror_snapshot_drop(snap, DISK_SIZE - 1, 2),
			 -EINVAL);
	ck_assert_int_eq(blockmirror_snapshot_drop(snap, 0, DISK_SIZE / 2), 0);
	wait_writes(&m, 200);
	for (uint64_t c = 0; c < DISK_SIZE / g; c++) {
		int r = blockmirror_snapshot_read(snap, buf, g, c * g);
		bool was = version_of(first + c * g, c * g / BLOCK) > 0;

		if (c < DISK_SIZE / g / 2 || !was) {
			ck_assert_int_eq(r, -ENODATA);
			continue;
		}
		ck_assert_int_eq(r, 0);
		ck_assert_msg(!memcmp(buf, first + c * g, g),
			      "held chunk %" PRIu64 " changed", c);
	}
	/* With everything dropped, the writers cost no more copies (once
	 * those whose read and write had both begun are done). */
	ck_assert_int_eq(blockmirror_snapshot_drop(snap, 0, DISK_SIZE), 0);
	wait_each_writer(w, 2);
	ck_assert_int_eq(blockmirror_snapshot_query(snap, &info), 0);
	saved = info.bytes_saved;
	cbw = info.cbw_count;
	wait_writes(&m, 300);
	ck_assert_int_eq(blockmirror_snapshot_query(snap, &info), 0);
	ck_assert_uint_eq(info.cbw_count, cbw);
	ck_assert_uint_eq(info.bytes_saved, saved);
	ck_assert_int_eq(info.state, BLOCKMIRROR_SNAPSHOT_ACTIVE);
	stop_writers(&m, w, t);
	ck_assert_int_eq(blockmirror_snapshot_release(snap), 0);
	check_disk(&m);
	ck_assert_int_eq(blockmirror_disk_close(m.disk), 0);
	free(words);
	free(first);
	free(buf);
}
END_TEST

int
main(void)
{
	int missing = missing_tool_status("nbdkit");
	Suite *s = suite_create("snapshot");
	TCase *tc = tcase_create("snapshot");

	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_set_timeout(tc, 300);
	tcase_add_loop_test(tc, test_view_is_the_instant, 0, 4);
	tcase_add_loop_test(tc, test_move_under_snapshot, 0, 2);
	tcase_add_loop_test(tc, test_snapshot_during_move, 0, 2);
	tcase_add_test(tc, test_slow_view_read_holds_write);
	tcase_add_test(tc, test_full_scratch_breaks_not_guest);
	if (!missing)
		tcase_add_test(tc, test_hung_scratch_times_out);
	else if (missing != 77)
		return missing;
	tcase_add_test(tc, test_group_one_instant);
	tcase_add_test(tc, test_hold_group_one_instant);
	tcase_add_test(tc, test_hold_lease);
	tcase_add_test(tc, test_bad_options_and_close);
	tcase_add_test(tc, test_refused_take_leaves_no_checkpoint);
	tcase_add_loop_test(tc, test_changed_only, 0, 4);
	suite_add_tcase(s, tc);
	/* From the review of the filter and the view (CK_RUN_CASE=review). */
	tc = tcase_create("review");
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_set_timeout(tc, 120);
	tcase_add_test(tc, test_operations_queue);
	tcase_add_test(tc, test_large_discard_does_not_copy);
	tcase_add_test(tc, test_pins_linear);
	tcase_add_test(tc, test_group_take_deadline);
	suite_add_tcase(s, tc);
	return run_suite(s) ? EXIT_FAILURE : EXIT_SUCCESS;
}
