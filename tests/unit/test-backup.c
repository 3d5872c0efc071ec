/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Backups of a running disk (lib/backup.c): every point reads back as the
 * disk was at its instant while writers keep writing, increments copy only
 * what changed, the chain survives kill -9 of the writer between points,
 * and verification names damage and a change record that missed writes.
 * Each step is an event, in order, for a full, an incremental, a failed
 * and a cancelled point.
 *
 * The model: writers pause, the test reads the disk (the instant's
 * content), and the backup's first progress report (made after its
 * snapshot is taken) lets the writers go on while the point is copied.
 */
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stddef.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include "helpers.h"

#define BLOCK 4096u
#define DISK_SIZE (UINT64_C(16) << 20)
#define NBLOCKS (DISK_SIZE / BLOCK)
#define NWRITERS 3

static char dir[64], image[128], bdir[160];

static void
setup(void)
{
	char cmd[512];

	snprintf(dir, sizeof dir, "/var/tmp/bm-backup-XXXXXX");
	ck_assert(mkdtemp(dir));
	snprintf(image, sizeof image, "%s/disk.raw", dir);
	snprintf(bdir, sizeof bdir, "%s/backups", dir);
	/* Half data, half hole. */
	snprintf(cmd, sizeof cmd, "head -c %" PRIu64 " /dev/urandom > %s && "
		 "truncate -s %" PRIu64 " %s", DISK_SIZE / 2, image, DISK_SIZE,
		 image);
	ck_assert_int_eq(system(cmd), 0);
}

static void
teardown(void)
{
	remove_tree(dir);
}

struct writers {
	struct blockmirror_disk *disk;
	pthread_t t[NWRITERS];
	atomic_bool stop;
	atomic_bool paused;
	atomic_uint busy;              /* writers inside a write */
	atomic_uint done;              /* writes acknowledged */
	atomic_bool touched[NBLOCKS];  /* written since cleared */
	uint64_t blocks;               /* write below this block (0: all) */
};

static struct writers W;

static void *
writer_main(void *arg)
{
	uint64_t rng = (uint64_t)(uintptr_t)arg;
	uint8_t *buf = aligned_alloc(BLOCK, 4 * BLOCK);

	while (!atomic_load(&W.stop)) {
		uint64_t b = rnd_range(&rng, (W.blocks ? W.blocks : NBLOCKS) - 4);
		uint64_t n = 1 + rnd_range(&rng, 4);

		if (atomic_load(&W.paused)) {
			sleep_ms(1);
			continue;
		}
		atomic_fetch_add(&W.busy, 1);
		if (atomic_load(&W.paused)) {
			atomic_fetch_sub(&W.busy, 1);
			continue;
		}
		memset(buf, (int)rnd(&rng), 4 * BLOCK);
		for (uint64_t i = 0; i < n; i++)
			atomic_store(&W.touched[b + i], true);
		if (rnd_range(&rng, 10) == 0)
			blockmirror_disk_write_zeroes(W.disk, n * BLOCK,
						      b * BLOCK, 0);
		else
			blockmirror_disk_write(W.disk, buf, n * BLOCK,
					       b * BLOCK, 0);
		atomic_fetch_add(&W.done, 1);
		atomic_fetch_sub(&W.busy, 1);
	}
	free(buf);
	return NULL;
}

/* Writers over the first `blocks` blocks (0: the whole disk). */
static void
writers_start(struct blockmirror_disk *disk, uint64_t blocks)
{
	memset(&W, 0, sizeof W);
	W.disk = disk;
	W.blocks = blocks;
	for (uintptr_t i = 0; i < NWRITERS; i++)
		ck_assert_int_eq(pthread_create(&W.t[i], NULL, writer_main,
						(void *)(i + 1)), 0);
}

static void
writers_pause(void)
{
	atomic_store(&W.paused, true);
	while (atomic_load(&W.busy))
		sleep_ms(1);
}

static void
writers_stop(void)
{
	if (atomic_exchange(&W.stop, true))
		return;                 /* stopped already */
	for (int i = 0; i < NWRITERS; i++)
		pthread_join(W.t[i], NULL);
}

static void
resume_on_progress(void *user_data, uint64_t done, uint64_t total)
{
	atomic_store(&W.paused, false);
}

static struct blockmirror_disk *
open_disk(void)
{
	struct blockmirror_disk *disk =
		blockmirror_disk_open(image, BLOCKMIRROR_FORMAT_RAW, 0);

	ck_assert_msg(disk, "%s", blockmirror_last_error());
	ck_assert_int_eq(blockmirror_disk_start_thread(disk), 0);
	return disk;
}

/* A point read back through its chain equals `want`. */
static void
check_point(unsigned n, const uint8_t *want)
{
	char path[256], raw[256], cmd[1024];
	struct blockmirror_disk *img;
	uint8_t *buf = aligned_alloc(BLOCK, DISK_SIZE);
	int fd;

	snprintf(path, sizeof path, "%s/%04u.qcow2", bdir, n);
	img = blockmirror_disk_open(path, BLOCKMIRROR_FORMAT_QCOW2,
				    BLOCKMIRROR_DISK_READONLY);
	ck_assert_msg(img, "%s", blockmirror_last_error());
	ck_assert_int_eq(blockmirror_disk_read(img, buf, DISK_SIZE, 0), 0);
	for (uint64_t off = 0; off < DISK_SIZE; off += BLOCK)
		ck_assert_msg(!memcmp(buf + off, want + off, BLOCK),
			      "point %u differs from the instant at %" PRIu64,
			      n, off);
	blockmirror_disk_close(img);
	/* And to qemu-img: a sound qcow2 chain with the same content. */
	snprintf(raw, sizeof raw, "%s/instant.raw", dir);
	fd = open(raw, O_CREAT | O_TRUNC | O_WRONLY, 0600);
	ck_assert_int_eq(pwrite(fd, want, DISK_SIZE, 0), (ssize_t)DISK_SIZE);
	close(fd);
	snprintf(cmd, sizeof cmd, "qemu-img check -q %s && qemu-img compare "
		 "-q -f qcow2 -F raw %s %s", path, path, raw);
	ck_assert_msg(system(cmd) == 0, "qemu-img: %s", cmd);
	free(buf);
}

static uint64_t
touched_bytes(uint64_t gran)
{
	uint64_t n = 0;

	for (uint64_t g = 0; g < DISK_SIZE / gran; g++) {
		bool t = false;

		for (uint64_t b = g * gran / BLOCK;
		     b < (g + 1) * gran / BLOCK; b++)
			t |= atomic_exchange(&W.touched[b], false);
		n += t ? gran : 0;
	}
	return n;
}

/* Pause, note the instant, back up with the writers let go at once. */
static void
point(struct blockmirror_disk *disk, bool incremental, uint8_t *instant,
      struct blockmirror_backup_point *res)
{
	struct blockmirror_backup_options o = { .size = sizeof o };

	writers_pause();
	ck_assert_int_eq(blockmirror_disk_read(disk, instant, DISK_SIZE, 0), 0);
	o.dir = bdir;
	o.incremental = incremental;
	o.progress = resume_on_progress;
	ck_assert_msg(blockmirror_backup(disk, &o, res) == 0, "%s",
		      blockmirror_last_error());
	atomic_store(&W.paused, false);
}

START_TEST(test_points_are_instants)
{
	struct blockmirror_disk *disk = open_disk();
	struct blockmirror_backup_point res;
	struct blockmirror_backup_check chk;
	uint8_t *inst[4];

	ck_assert_int_eq(blockmirror_disk_track(disk, NULL, 0, NULL), 0);
	for (int i = 0; i < 4; i++)
		inst[i] = aligned_alloc(BLOCK, DISK_SIZE);
	point(disk, false, inst[0], &res);
	writers_start(disk, 0);
	ck_assert_uint_eq(res.number, 1);
	ck_assert(!res.incremental);
	/* Sparse: the hole half is not read. */
	ck_assert_uint_le(res.bytes_read, DISK_SIZE / 2 + (4 << 20));
	for (unsigned k = 2; k <= 4; k++) {
		unsigned done = atomic_load(&W.done);
		uint64_t touched;

		/* Writes since the last point's instant (the writers were
		 * let go after it), however slowly they come here. */
		for (uint64_t end = now_ms() + 30000;
		     atomic_load(&W.done) - done < 20 && now_ms() < end;)
			sleep_ms(5);
		ck_assert_msg(atomic_load(&W.done) - done >= 20, "the writers "
			      "had %u writes acknowledged in 30 s",
			      atomic_load(&W.done) - done);
		/* The last point with the writers gone for good: the live
		 * check below then has the whole disk to compare (writers
		 * let go during it could dirty every granule on a slow
		 * machine, leaving it nothing). */
		if (k == 4)
			writers_stop();
		writers_pause();
		touched = touched_bytes(65536);
		point(disk, true, inst[k - 1], &res);
		ck_assert_uint_eq(res.number, k);
		ck_assert(res.incremental);
		/* Only what changed: the record's granules, all of them
		 * touched by a writer since the last point. */
		ck_assert_uint_eq(res.bytes_read, res.bytes_changed);
		ck_assert_msg(res.bytes_changed <= touched,
			      "point %u read %" PRIu64 " bytes, writers touched "
			      "%" PRIu64, k, res.bytes_changed, touched);
		ck_assert_uint_gt(res.bytes_changed, 0);
	}
	writers_stop();
	for (unsigned k = 1; k <= 4; k++)
		check_point(k, inst[k - 1]);
	ck_assert_msg(blockmirror_backup_verify(bdir, disk, &chk) == 0, "%s",
		      blockmirror_last_error());
	ck_assert_uint_eq(chk.points, 4);
	ck_assert_uint_gt(chk.live_bytes_read, 0);
	ck_assert_int_eq(blockmirror_disk_close(disk), 0);

	/* Keep two: point 3 becomes full, from the backup alone (the disk
	 * is closed), and every kept point still reads as its instant. */
	{
		struct blockmirror_backup_prune_result pr;

		ck_assert_msg(blockmirror_backup_prune(bdir, 2, &pr) == 0,
			      "%s", blockmirror_last_error());
		ck_assert_uint_eq(pr.first, 3);
		ck_assert_uint_eq(pr.removed, 2);
		ck_assert(pr.merged);
		check_point(3, inst[2]);
		check_point(4, inst[3]);
		ck_assert_int_eq(blockmirror_backup_verify(bdir, NULL, &chk), 0);
		ck_assert_uint_eq(chk.points, 2);
		ck_assert_int_eq(blockmirror_backup_prune(bdir, 2, &pr), 0);
		ck_assert_uint_eq(pr.removed, 0);
	}
	for (int i = 0; i < 4; i++)
		free(inst[i]);
}
END_TEST

/*
 * The writer is killed between two points; the next process finds the
 * record and takes an incremental point that holds every write.
 */
START_TEST(test_incremental_after_kill)
{
	struct blockmirror_backup_options o = { .size = sizeof o };
	struct blockmirror_backup_point res;
	struct blockmirror_disk *disk = open_disk();
	uint8_t *want = aligned_alloc(BLOCK, DISK_SIZE);
	bool crashed = false;
	struct pollfd pfd = { .events = POLLIN };
	int fds[2];
	char c = 0;
	pid_t pid;

	o.dir = bdir;
	ck_assert_int_eq(blockmirror_disk_track(disk, NULL, 0, NULL), 0);
	ck_assert_int_eq(blockmirror_backup(disk, &o, &res), 0);
	ck_assert_int_eq(blockmirror_disk_close(disk), 0);
	ck_assert_int_eq(pipe(fds), 0);
	pid = fork();
	ck_assert_int_ge(pid, 0);
	if (pid == 0) {
		close(fds[0]);
		disk = open_disk();
		if (blockmirror_disk_track(disk, NULL, 0, NULL) < 0)
			_exit(3);
		writers_start(disk, NBLOCKS / 4);
		/* Killed only once writes were acknowledged, on any
		 * machine. */
		while (atomic_load(&W.done) < 20)
			sleep_ms(5);
		if (write(fds[1], "w", 1) != 1)
			_exit(4);
		for (;;)
			pause();
	}
	close(fds[1]);
	pfd.fd = fds[0];
	ck_assert_msg(poll(&pfd, 1, 30000) == 1 && read(fds[0], &c, 1) == 1,
		      "the writers acknowledged no 20 writes in 30 s");
	close(fds[0]);
	sleep_ms(50);
	kill(pid, SIGKILL);
	waitpid(pid, NULL, 0);
	disk = open_disk();
	ck_assert_int_eq(blockmirror_disk_track(disk, NULL, 0, &crashed), 0);
	ck_assert(crashed);
	ck_assert_int_eq(blockmirror_disk_read(disk, want, DISK_SIZE, 0), 0);
	o.incremental = true;
	ck_assert_msg(blockmirror_backup(disk, &o, &res) == 0, "%s",
		      blockmirror_last_error());
	ck_assert(res.incremental);
	ck_assert_uint_gt(res.bytes_changed, 0);
	ck_assert_uint_le(res.bytes_changed, DISK_SIZE / 4);
	check_point(2, want);
	ck_assert_int_eq(blockmirror_disk_close(disk), 0);
	free(want);
}
END_TEST

/*
 * Incremental points without a record to trust heal by digests: without
 * tracking, and after the point's checkpoint is gone.  They read the
 * disk's data but write only the granules that differ.
 */
START_TEST(test_heal_by_digests)
{
	struct blockmirror_backup_options o = { .size = sizeof o };
	struct blockmirror_backup_point res;
	struct blockmirror_backup_check chk;
	struct blockmirror_disk *disk = open_disk();
	uint8_t *want = aligned_alloc(BLOCK, DISK_SIZE);
	uint8_t *buf = aligned_alloc(BLOCK, 3 * 65536);

	o.dir = bdir;
	ck_assert_int_eq(blockmirror_backup(disk, &o, &res), 0);
	/* Three granules of data, and one of the data half zeroed. */
	memset(buf, 0x17, 3 * 65536);
	ck_assert_int_eq(blockmirror_disk_write(disk, buf, 3 * 65536,
						12 << 20, 0), 0);
	ck_assert_int_eq(blockmirror_disk_write_zeroes(disk, 65536, 1 << 20,
						       0), 0);
	o.incremental = true;
	ck_assert_msg(blockmirror_backup(disk, &o, &res) == 0, "%s",
		      blockmirror_last_error());
	ck_assert(res.healed);
	ck_assert_uint_eq(res.bytes_changed, 4 * 65536);
	ck_assert_uint_eq(res.bytes_written, 3 * 65536);
	ck_assert_int_eq(blockmirror_disk_read(disk, want, DISK_SIZE, 0), 0);
	check_point(2, want);

	/* Tracking from now on; the next point is still healed (point 2
	 * has no checkpoint), the one after goes by the record. */
	ck_assert_int_eq(blockmirror_disk_track(disk, NULL, 0, NULL), 0);
	ck_assert_int_eq(blockmirror_disk_write(disk, buf, 65536, 5 << 20, 0),
			 0);
	ck_assert_int_eq(blockmirror_backup(disk, &o, &res), 0);
	ck_assert(res.healed);
	ck_assert_uint_eq(res.bytes_changed, 65536);
	ck_assert_int_eq(blockmirror_disk_write(disk, buf, 65536, 6 << 20, 0),
			 0);
	ck_assert_int_eq(blockmirror_backup(disk, &o, &res), 0);
	ck_assert(!res.healed);
	ck_assert_uint_eq(res.bytes_changed, 65536);
	/* The record since point 4 is lost (the checkpoint removed). */
	ck_assert_int_eq(blockmirror_checkpoint_remove(disk, res.checkpoint),
			 0);
	ck_assert_int_eq(blockmirror_disk_write(disk, buf, 65536, 7 << 20, 0),
			 0);
	ck_assert_int_eq(blockmirror_backup(disk, &o, &res), 0);
	ck_assert(res.healed);
	ck_assert_uint_eq(res.bytes_changed, 65536);
	ck_assert_int_eq(blockmirror_disk_read(disk, want, DISK_SIZE, 0), 0);
	check_point(5, want);
	ck_assert_msg(blockmirror_backup_verify(bdir, disk, &chk) == 0, "%s",
		      blockmirror_last_error());
	ck_assert_uint_eq(chk.points, 5);
	ck_assert_int_eq(blockmirror_disk_close(disk), 0);
	free(want);
	free(buf);
}
END_TEST

/* Two chains of one disk in two directories keep apart: each
 * incremental point holds what changed since its own chain's point. */
START_TEST(test_two_chains)
{
	struct blockmirror_backup_options o = { .size = sizeof o };
	struct blockmirror_backup_point res;
	struct blockmirror_disk *disk = open_disk();
	uint8_t *want = aligned_alloc(BLOCK, DISK_SIZE);
	uint8_t *buf = aligned_alloc(BLOCK, 65536);
	char other[160], saved[160];

	snprintf(other, sizeof other, "%s/other", dir);
	snprintf(saved, sizeof saved, "%s", bdir);
	ck_assert_int_eq(blockmirror_disk_track(disk, NULL, 0, NULL), 0);
	o.dir = bdir;
	ck_assert_int_eq(blockmirror_backup(disk, &o, &res), 0);
	memset(buf, 0x21, 65536);
	ck_assert_int_eq(blockmirror_disk_write(disk, buf, 65536, 2 << 20, 0),
			 0);
	o.dir = other;
	ck_assert_int_eq(blockmirror_backup(disk, &o, &res), 0);
	memset(buf, 0x22, 65536);
	ck_assert_int_eq(blockmirror_disk_write(disk, buf, 65536, 4 << 20, 0),
			 0);
	o.incremental = true;
	o.dir = bdir;
	ck_assert_msg(blockmirror_backup(disk, &o, &res) == 0, "%s",
		      blockmirror_last_error());
	ck_assert(!res.healed);
	ck_assert_uint_eq(res.bytes_changed, 2 * 65536);
	o.dir = other;
	ck_assert_int_eq(blockmirror_backup(disk, &o, &res), 0);
	ck_assert(!res.healed);
	ck_assert_uint_eq(res.bytes_changed, 65536);
	ck_assert_int_eq(blockmirror_disk_read(disk, want, DISK_SIZE, 0), 0);
	check_point(2, want);
	snprintf(bdir, sizeof bdir, "%s", other);
	check_point(2, want);
	snprintf(bdir, sizeof bdir, "%s", saved);
	ck_assert_int_eq(blockmirror_disk_close(disk), 0);
	free(want);
	free(buf);
}
END_TEST

/* A disk whose size is not a whole number of granules: its short last
 * granule is backed up, healed and verified like the others. */
START_TEST(test_odd_size)
{
	struct blockmirror_backup_options o = { .size = sizeof o };
	struct blockmirror_backup_point res;
	struct blockmirror_backup_check chk;
	struct blockmirror_disk *disk;
	uint64_t size = DISK_SIZE + 12288;
	uint8_t *buf = aligned_alloc(BLOCK, BLOCK);
	char side[200];

	ck_assert_int_eq(truncate(image, (off_t)size), 0);
	disk = open_disk();
	o.dir = bdir;
	memset(buf, 0x9a, BLOCK);
	ck_assert_int_eq(blockmirror_disk_write(disk, buf, BLOCK, size - BLOCK,
						0), 0);
	ck_assert_int_eq(blockmirror_backup(disk, &o, &res), 0);
	ck_assert_int_eq(blockmirror_backup_verify(bdir, disk, &chk), 0);
	/* No record: heal.  The tail becomes zeroes. */
	ck_assert_int_eq(blockmirror_disk_write_zeroes(disk, 12288,
						       size - 12288, 0), 0);
	o.incremental = true;
	ck_assert_int_eq(blockmirror_backup(disk, &o, &res), 0);
	ck_assert(res.healed);
	ck_assert_uint_eq(res.bytes_changed, 12288);
	ck_assert_msg(blockmirror_backup_verify(bdir, disk, &chk) == 0, "%s",
		      blockmirror_last_error());
	/* With a record: the tail written again. */
	ck_assert_int_eq(blockmirror_disk_track(disk, NULL, 0, NULL), 0);
	o.incremental = false;
	ck_assert_int_eq(blockmirror_backup(disk, &o, &res), 0);
	ck_assert_int_eq(blockmirror_disk_write(disk, buf, BLOCK, size - BLOCK,
						0), 0);
	o.incremental = true;
	ck_assert_int_eq(blockmirror_backup(disk, &o, &res), 0);
	ck_assert(!res.healed);
	ck_assert_uint_eq(res.bytes_changed, 12288);
	ck_assert_msg(blockmirror_backup_verify(bdir, disk, &chk) == 0, "%s",
		      blockmirror_last_error());
	ck_assert_uint_eq(chk.points, 4);
	ck_assert_int_eq(blockmirror_disk_close(disk), 0);
	snprintf(side, sizeof side, "%s.bmirror-cbt", image);
	unlink(side);
	free(buf);
}
END_TEST

/* Granularities far from the 1 MiB reads: 4 KiB and 4 MiB records. */
static void
granularity_case(uint32_t g)
{
	struct blockmirror_backup_options o = { .size = sizeof o };
	struct blockmirror_backup_point res;
	struct blockmirror_backup_check chk;
	struct blockmirror_disk *disk = open_disk();
	uint8_t *want = aligned_alloc(BLOCK, DISK_SIZE);
	uint8_t *buf = aligned_alloc(BLOCK, BLOCK);
	char side[200];

	ck_assert_int_eq(blockmirror_disk_track(disk, NULL, g, NULL), 0);
	o.dir = bdir;
	ck_assert_msg(blockmirror_backup(disk, &o, &res) == 0, "%s",
		      blockmirror_last_error());
	memset(buf, 0x3c, BLOCK);
	ck_assert_int_eq(blockmirror_disk_write(disk, buf, BLOCK, 5 << 20, 0),
			 0);
	o.incremental = true;
	ck_assert_msg(blockmirror_backup(disk, &o, &res) == 0, "%s",
		      blockmirror_last_error());
	ck_assert(!res.healed);
	ck_assert_uint_eq(res.bytes_changed, g);
	ck_assert_uint_eq(res.bytes_read, g);
	ck_assert_int_eq(blockmirror_disk_read(disk, want, DISK_SIZE, 0), 0);
	check_point(2, want);
	ck_assert_msg(blockmirror_backup_verify(bdir, disk, &chk) == 0, "%s",
		      blockmirror_last_error());
	ck_assert_int_eq(blockmirror_disk_close(disk), 0);
	snprintf(side, sizeof side, "%s.bmirror-cbt", image);
	unlink(side);
	free(want);
	free(buf);
}

START_TEST(test_granularities)
{
	granularity_case(_i ? 4u << 20 : 4096);
}
END_TEST

/*
 * A backup that died half way (its checkpoint made, its image begun, no
 * manifest) leaves nothing that stops the next one: it is still
 * incremental by the record, and holds what changed since the last point
 * that exists.  A second backup into a directory being backed up into is
 * refused.
 */
START_TEST(test_after_a_dead_backup)
{
	struct blockmirror_backup_options o = { .size = sizeof o };
	struct blockmirror_backup_point res;
	struct blockmirror_snapshot_options so = { .size = sizeof so };
	struct blockmirror_snapshot *snap;
	struct blockmirror_disk *disk = open_disk();
	uint8_t *want = aligned_alloc(BLOCK, DISK_SIZE);
	uint8_t *buf = aligned_alloc(BLOCK, 65536);
	char cp[80], path[256];
	int fd;

	ck_assert_int_eq(blockmirror_disk_track(disk, NULL, 0, NULL), 0);
	o.dir = bdir;
	ck_assert_int_eq(blockmirror_backup(disk, &o, &res), 0);
	memset(buf, 0x44, 65536);
	ck_assert_int_eq(blockmirror_disk_write(disk, buf, 65536, 1 << 20, 0),
			 0);
	/* What point 2's backup left when it died: its checkpoint (made
	 * at its instant), a begun image, and no manifest. */
	snprintf(cp, sizeof cp, "bm-%.12s-0002", res.checkpoint + 3);
	so.since = res.checkpoint;
	so.checkpoint = cp;
	ck_assert_int_eq(blockmirror_snapshot_take(&disk, 1, &so, &snap), 0);
	ck_assert_int_eq(blockmirror_snapshot_release(snap), 0);
	snprintf(path, sizeof path, "%s/0002.qcow2", bdir);
	fd = open(path, O_CREAT | O_WRONLY, 0644);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(write(fd, "junk", 4), 4);
	close(fd);
	memset(buf, 0x45, 65536);
	ck_assert_int_eq(blockmirror_disk_write(disk, buf, 65536, 3 << 20, 0),
			 0);
	o.incremental = true;
	ck_assert_msg(blockmirror_backup(disk, &o, &res) == 0, "%s",
		      blockmirror_last_error());
	ck_assert_uint_eq(res.number, 2);
	ck_assert(!res.healed);
	ck_assert_uint_eq(res.bytes_changed, 2 * 65536);
	ck_assert_int_eq(blockmirror_disk_read(disk, want, DISK_SIZE, 0), 0);
	check_point(2, want);

	/* Someone backs up into the directory: the lock says so. */
	snprintf(path, sizeof path, "%s/.bmirror-backup.lock", bdir);
	fd = open(path, O_RDWR);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(flock(fd, LOCK_EX), 0);
	ck_assert_int_eq(blockmirror_backup(disk, &o, &res), -EBUSY);
	ck_assert_msg(strstr(blockmirror_last_error(), "another backup"), "%s",
		      blockmirror_last_error());
	close(fd);
	ck_assert_int_eq(blockmirror_disk_close(disk), 0);
	free(want);
	free(buf);
}
END_TEST

/* What the freeze and thaw hooks of the next test do. */
struct hooks {
	struct blockmirror_disk *disk;
	int freeze_result;
	int calls;                     /* freeze 1, thaw 2: in order */
};

static int
hook_freeze(void *user_data)
{
	struct hooks *h = user_data;
	uint8_t *b = aligned_alloc(BLOCK, BLOCK);

	/* The last write before the instant: in the point. */
	memset(b, 0xf1, BLOCK);
	ck_assert_int_eq(blockmirror_disk_write(h->disk, b, BLOCK, 0, 0), 0);
	free(b);
	h->calls = h->calls * 10 + 1;
	return h->freeze_result;
}

static void
hook_thaw(void *user_data)
{
	struct hooks *h = user_data;
	uint8_t *b = aligned_alloc(BLOCK, BLOCK);

	/* The first write after it: not in the point. */
	memset(b, 0xf2, BLOCK);
	ck_assert_int_eq(blockmirror_disk_write(h->disk, b, BLOCK, BLOCK, 0),
			 0);
	free(b);
	h->calls = h->calls * 10 + 2;
}

/* The instant lies between freeze and thaw; the point says whether the
 * freeze held. */
START_TEST(test_freeze_hooks)
{
	struct blockmirror_backup_options o = { .size = sizeof o };
	struct blockmirror_backup_point res, *list;
	struct blockmirror_disk *disk = open_disk();
	struct hooks h = { .disk = disk };
	size_t n;

	o.dir = bdir;
	o.freeze = hook_freeze;
	o.thaw = hook_thaw;
	o.user_data = &h;
	ck_assert_int_eq(blockmirror_backup(disk, &o, &res), 0);
	ck_assert_int_eq(h.calls, 12);
	ck_assert(res.application_consistent);
	/* A refused freeze: crash-consistent, and the backup goes on. */
	h.freeze_result = -1;
	h.calls = 0;
	o.incremental = true;
	ck_assert_int_eq(blockmirror_backup(disk, &o, &res), 0);
	ck_assert_int_eq(h.calls, 12);
	ck_assert(!res.application_consistent);
	ck_assert_int_eq(blockmirror_backup_list(bdir, &list, &n), 0);
	ck_assert_uint_eq(n, 2);
	ck_assert(list[0].application_consistent);
	ck_assert(!list[1].application_consistent);
	free(list);
	{
		/* Point 1 holds the freeze's write, not the thaw's. */
		char path[256];
		struct blockmirror_disk *img;
		uint8_t *b = aligned_alloc(BLOCK, 2 * BLOCK);

		snprintf(path, sizeof path, "%s/0001.qcow2", bdir);
		img = blockmirror_disk_open(path, BLOCKMIRROR_FORMAT_QCOW2,
					    BLOCKMIRROR_DISK_READONLY);
		ck_assert_ptr_nonnull(img);
		ck_assert_int_eq(blockmirror_disk_read(img, b, 2 * BLOCK, 0), 0);
		uint8_t f2[BLOCK];

		memset(f2, 0xf2, BLOCK);
		ck_assert_int_eq(b[0], 0xf1);
		ck_assert_msg(memcmp(b + BLOCK, f2, BLOCK) != 0,
			      "the thaw's write is in the point");
		blockmirror_disk_close(img);
		free(b);
	}
	ck_assert_int_eq(blockmirror_disk_close(disk), 0);
}
END_TEST

static void
flip_byte(const char *path, off_t off)
{
	int fd = open(path, O_RDWR);
	uint8_t b;

	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(pread(fd, &b, 1, off), 1);
	b ^= 0x55;
	ck_assert_int_eq(pwrite(fd, &b, 1, off), 1);
	close(fd);
}

/* Damage, a missing middle, a record that missed a write, bad input. */
START_TEST(test_verify_names_damage)
{
	struct blockmirror_backup_options o = { .size = sizeof o };
	struct blockmirror_backup_point res;
	struct blockmirror_backup_check chk;
	struct blockmirror_disk *disk = open_disk();
	uint8_t *buf = aligned_alloc(BLOCK, 65536);
	char path[256], moved[256];
	int fd;

	o.dir = bdir;
	o.incremental = true;
	/* Incremental with nothing to build on; without tracking. */
	ck_assert_int_eq(blockmirror_backup(disk, &o, &res), -ENOENT);
	remove_tree(bdir);
	ck_assert_int_eq(blockmirror_disk_track(disk, NULL, 0, NULL), 0);
	o.incremental = false;
	ck_assert_int_eq(blockmirror_backup(disk, &o, &res), 0);
	memset(buf, 0x42, 65536);
	ck_assert_int_eq(blockmirror_disk_write(disk, buf, 65536, 1 << 20, 0),
			 0);
	o.incremental = true;
	ck_assert_int_eq(blockmirror_backup(disk, &o, &res), 0);
	ck_assert_uint_eq(res.bytes_changed, 65536);
	ck_assert_int_eq(blockmirror_backup(disk, &o, &res), 0);
	ck_assert_uint_eq(res.bytes_changed, 0);
	ck_assert_msg(blockmirror_backup_verify(bdir, disk, &chk) == 0, "%s",
		      blockmirror_last_error());
	ck_assert_uint_eq(chk.points, 3);

	/* A write that bypasses the disk (and so the record). */
	snprintf(path, sizeof path, "%s", image);
	fd = open(path, O_WRONLY);
	ck_assert_int_eq(pwrite(fd, "oops", 4, 3 << 20), 4);
	close(fd);
	ck_assert_int_eq(blockmirror_backup_verify(bdir, disk, &chk), -EBADMSG);
	ck_assert_uint_eq(chk.live_mismatches, 1);
	ck_assert_uint_eq(chk.live_first_mismatch, 3 << 20);
	ck_assert_msg(strstr(blockmirror_last_error(), "missed"), "%s",
		      blockmirror_last_error());

	/* A sample: each run checks about a quarter of the granules, a
	 * different quarter each time, so the bypassing write is found by
	 * some runs and not by others (40 runs: both by far). */
	{
		struct blockmirror_backup_verify_options vo = {
			.size = sizeof vo, .live = disk,
			.live_sample_percent = 25,
		};
		uint64_t all = chk.live_bytes_read;
		unsigned found = 0;

		for (int i = 0; i < 40; i++) {
			int r = blockmirror_backup_verify_opts(bdir, &vo, &chk);

			ck_assert_msg(r == 0 || r == -EBADMSG, "%s",
				      blockmirror_last_error());
			ck_assert_uint_eq(chk.live_mismatches, r < 0);
			ck_assert_uint_ge(chk.live_bytes_read, all / 20);
			ck_assert_uint_le(chk.live_bytes_read, all / 2);
			found += r < 0;
		}
		ck_assert_uint_gt(found, 0);
		ck_assert_uint_lt(found, 40);
		vo.live_sample_percent = 100;
		ck_assert_int_eq(blockmirror_backup_verify_opts(bdir, &vo, &chk),
				 -EBADMSG);
		ck_assert_uint_eq(chk.live_bytes_read, all);
		vo.live_sample_percent = 101;
		ck_assert_int_eq(blockmirror_backup_verify_opts(bdir, &vo, &chk),
				 -EINVAL);
	}

	/* The data of point 2 damaged: the last cluster of its file. */
	snprintf(path, sizeof path, "%s/0002.qcow2", bdir);
	{
		struct stat st;

		ck_assert_int_eq(stat(path, &st), 0);
		flip_byte(path, st.st_size - 100);
	}
	ck_assert_int_eq(blockmirror_backup_verify(bdir, NULL, &chk), -EBADMSG);
	ck_assert_uint_eq(chk.bad_point, 2);
	ck_assert_msg(strstr(blockmirror_last_error(), "point 0002"), "%s",
		      blockmirror_last_error());

	/* A digests file damaged. */
	snprintf(path, sizeof path, "%s/0001.digests", bdir);
	flip_byte(path, 10);
	ck_assert_int_eq(blockmirror_backup_verify(bdir, NULL, &chk), -EBADMSG);
	ck_assert_uint_eq(chk.bad_point, 1);
	ck_assert_msg(strstr(blockmirror_last_error(), "damaged"), "%s",
		      blockmirror_last_error());
	flip_byte(path, 10);

	/* The middle point missing. */
	snprintf(path, sizeof path, "%s/0002.json", bdir);
	snprintf(moved, sizeof moved, "%s/moved.json", dir);
	ck_assert_int_eq(rename(path, moved), 0);
	ck_assert_int_eq(blockmirror_backup_verify(bdir, NULL, &chk), -EBADMSG);
	ck_assert_msg(strstr(blockmirror_last_error(), "missing"), "%s",
		      blockmirror_last_error());
	ck_assert_int_eq(blockmirror_backup(disk, &o, &res), -EBADMSG);
	ck_assert_int_eq(blockmirror_disk_close(disk), 0);
	free(buf);
}
END_TEST

/* ---- events ------------------------------------------------------------ */

struct seen {
	enum blockmirror_backup_event_type type;
	unsigned point;
	bool incremental, healing;
	uint64_t done, total;
	char name[256];
	int err;
	char message[512];
};

static struct {
	struct seen v[4096];
	size_t n;
	bool cancel_on_progress;
} E;

static void
record_event(void *user_data, const struct blockmirror_backup_event *ev)
{
	struct seen *s;

	ck_assert_ptr_eq(user_data, &E);
	if (ev->type == BLOCKMIRROR_BACKUP_PROGRESS && E.n &&
	    E.v[E.n - 1].type == BLOCKMIRROR_BACKUP_PROGRESS) {
		/* One entry for a run of progress; done only grows. */
		ck_assert_uint_ge(ev->done, E.v[E.n - 1].done);
		E.v[E.n - 1].done = ev->done;
		return;
	}
	ck_assert_uint_lt(E.n, sizeof E.v / sizeof E.v[0]);
	s = &E.v[E.n++];
	memset(s, 0, sizeof *s);
	s->type = ev->type;
	s->point = ev->point;
	s->incremental = ev->incremental;
	s->healing = ev->healing;
	s->done = ev->done;
	s->total = ev->total;
	s->err = ev->err;
	snprintf(s->name, sizeof s->name, "%s", ev->name ? ev->name : "");
	snprintf(s->message, sizeof s->message, "%s",
		 ev->message ? ev->message : "");
	if (ev->type == BLOCKMIRROR_BACKUP_FAILED) {
		struct blockmirror_backup_point *v;
		size_t n;

		/* A public call from the callback clears this thread's
		 * message: the backup's own must survive it. */
		ck_assert_int_eq(blockmirror_backup_list(bdir, &v, &n), 0);
		free(v);
	}
}

static bool
cancel_after_progress(void *user_data)
{
	return E.cancel_on_progress && E.n &&
	       E.v[E.n - 1].type == BLOCKMIRROR_BACKUP_PROGRESS;
}

static int
quiet_freeze(void *user_data)
{
	return 0;
}

static void
quiet_thaw(void *user_data)
{
}

/* The events seen are `want`, in order. */
static void
expect_events(const enum blockmirror_backup_event_type *want, size_t n)
{
	char got[2048] = "";

	for (size_t i = 0; i < E.n; i++)
		snprintf(got + strlen(got), sizeof got - strlen(got), " %s",
			 blockmirror_backup_event_name(E.v[i].type));
	ck_assert_msg(E.n == n, "%zu events, want %zu:%s", E.n, n, got);
	for (size_t i = 0; i < n; i++)
		ck_assert_msg(E.v[i].type == want[i], "event %zu is %s, want "
			      "%s:%s", i, blockmirror_backup_event_name(
				      E.v[i].type),
			      blockmirror_backup_event_name(want[i]), got);
}

#define EXPECT_EVENTS(...)                                                  \
	do {                                                                \
		static const enum blockmirror_backup_event_type w_[] = {    \
			__VA_ARGS__ };                                      \
		expect_events(w_, sizeof w_ / sizeof w_[0]);                \
	} while (0)

START_TEST(test_events)
{
	struct blockmirror_backup_options o = { .size = sizeof o };
	struct blockmirror_backup_point res;
	struct blockmirror_checkpoint *cps;
	struct blockmirror_disk *disk = open_disk();
	uint8_t *buf = aligned_alloc(BLOCK, 65536);
	char path[256], first_cp[80], second_cp[80];
	size_t ncp;
	int fd;

	ck_assert_int_eq(blockmirror_disk_track(disk, NULL, 0, NULL), 0);
	o.dir = bdir;
	o.on_event = record_event;
	o.event_data = &E;
	o.cancelled = cancel_after_progress;

	/* A full point. */
	memset(&E, 0, sizeof E);
	ck_assert_int_eq(blockmirror_backup(disk, &o, &res), 0);
	EXPECT_EVENTS(BLOCKMIRROR_BACKUP_STARTED,
		      BLOCKMIRROR_BACKUP_SNAPSHOT_TAKEN,
		      BLOCKMIRROR_BACKUP_CHECKPOINT_CREATED,
		      BLOCKMIRROR_BACKUP_PROGRESS,
		      BLOCKMIRROR_BACKUP_DATA_FLUSHED,
		      BLOCKMIRROR_BACKUP_DIGESTS_WRITTEN,
		      BLOCKMIRROR_BACKUP_POINT_COMMITTED,
		      BLOCKMIRROR_BACKUP_COMPLETED);
	for (size_t i = 0; i < E.n; i++)
		ck_assert_uint_eq(E.v[i].point,
				  E.v[i].type == BLOCKMIRROR_BACKUP_PROGRESS
				  ? 0 : 1);
	ck_assert(!E.v[0].incremental && !E.v[0].healing);
	snprintf(path, sizeof path, "%s/0001.qcow2", bdir);
	ck_assert_str_eq(E.v[0].name, path);
	ck_assert_str_eq(E.v[4].name, path);
	ck_assert_str_eq(E.v[2].name, res.checkpoint);
	ck_assert_uint_eq(E.v[3].total, DISK_SIZE);
	/* Half the disk is data: progress went at least that far. */
	ck_assert_uint_ge(E.v[3].done, DISK_SIZE / 2);
	snprintf(path, sizeof path, "%s/0001.digests", bdir);
	ck_assert_str_eq(E.v[5].name, path);
	ck_assert(!E.v[7].incremental && !E.v[7].healing);
	snprintf(first_cp, sizeof first_cp, "%s", res.checkpoint);

	/* An incremental one, frozen, after a backup that died. */
	memset(buf, 0x51, 65536);
	ck_assert_int_eq(blockmirror_disk_write(disk, buf, 65536, 1 << 20, 0),
			 0);
	snprintf(path, sizeof path, "%s/0002.digests", bdir);
	fd = open(path, O_CREAT | O_WRONLY, 0644);
	ck_assert_int_ge(fd, 0);
	close(fd);
	o.incremental = true;
	o.freeze = quiet_freeze;
	o.thaw = quiet_thaw;
	memset(&E, 0, sizeof E);
	ck_assert_int_eq(blockmirror_backup(disk, &o, &res), 0);
	EXPECT_EVENTS(BLOCKMIRROR_BACKUP_STARTED,
		      BLOCKMIRROR_BACKUP_LEFTOVERS_CLEANED,
		      BLOCKMIRROR_BACKUP_FREEZE_BEGUN,
		      BLOCKMIRROR_BACKUP_FROZEN,
		      BLOCKMIRROR_BACKUP_SNAPSHOT_TAKEN,
		      BLOCKMIRROR_BACKUP_THAWED,
		      BLOCKMIRROR_BACKUP_CHECKPOINT_CREATED,
		      BLOCKMIRROR_BACKUP_PROGRESS,
		      BLOCKMIRROR_BACKUP_DATA_FLUSHED,
		      BLOCKMIRROR_BACKUP_DIGESTS_WRITTEN,
		      BLOCKMIRROR_BACKUP_POINT_COMMITTED,
		      BLOCKMIRROR_BACKUP_CHECKPOINT_REMOVED,
		      BLOCKMIRROR_BACKUP_COMPLETED);
	ck_assert(E.v[0].incremental && !E.v[0].healing);
	ck_assert_uint_eq(E.v[0].point, 2);
	ck_assert_str_eq(E.v[1].name, "");   /* files only */
	ck_assert_str_eq(E.v[6].name, res.checkpoint);
	ck_assert_uint_eq(E.v[7].done, 65536);
	ck_assert_uint_eq(E.v[7].total, 65536);
	ck_assert_str_eq(E.v[11].name, first_cp);
	ck_assert(E.v[12].incremental && !E.v[12].healing);
	ck_assert_uint_eq(E.v[12].point, 2);
	snprintf(second_cp, sizeof second_cp, "%s", res.checkpoint);

	/* A dead target: the point fails, leaves nothing, and its
	 * checkpoint goes. */
	o.freeze = NULL;
	o.thaw = NULL;
	o.incremental = false;
	o.target = "nbd+unix:///?socket=/nonexistent/bm-dead.sock";
	memset(&E, 0, sizeof E);
	ck_assert_int_lt(blockmirror_backup(disk, &o, &res), 0);
	ck_assert_msg(strstr(blockmirror_last_error(), "bm-dead.sock"), "%s",
		      blockmirror_last_error());
	EXPECT_EVENTS(BLOCKMIRROR_BACKUP_STARTED,
		      BLOCKMIRROR_BACKUP_SNAPSHOT_TAKEN,
		      BLOCKMIRROR_BACKUP_CHECKPOINT_CREATED,
		      BLOCKMIRROR_BACKUP_FAILED);
	ck_assert_str_eq(E.v[0].name, o.target);
	ck_assert_uint_eq(E.v[3].point, 3);
	ck_assert_int_gt(E.v[3].err, 0);
	ck_assert_msg(strstr(E.v[3].message, "bm-dead.sock"), "%s",
		      E.v[3].message);
	snprintf(path, sizeof path, "%s/0003.json", bdir);
	ck_assert_int_ne(access(path, F_OK), 0);
	ck_assert_int_eq(blockmirror_checkpoint_list(disk, &cps, &ncp), 0);
	ck_assert_uint_eq(ncp, 1);
	ck_assert_str_eq(cps[0].name, second_cp);
	free(cps);

	/* Cancelled once it has copied something: CANCELLED, no point. */
	o.target = NULL;
	E.n = 0;
	E.cancel_on_progress = true;
	ck_assert_int_eq(blockmirror_backup(disk, &o, &res), -ECANCELED);
	EXPECT_EVENTS(BLOCKMIRROR_BACKUP_STARTED,
		      BLOCKMIRROR_BACKUP_SNAPSHOT_TAKEN,
		      BLOCKMIRROR_BACKUP_CHECKPOINT_CREATED,
		      BLOCKMIRROR_BACKUP_PROGRESS,
		      BLOCKMIRROR_BACKUP_CANCELLED);
	ck_assert_int_eq(E.v[4].err, ECANCELED);
	ck_assert_uint_eq(E.v[4].point, 3);
	ck_assert_int_ne(access(path, F_OK), 0);

	/* Refused before it began (a busy directory): only FAILED. */
	E.n = 0;
	E.cancel_on_progress = false;
	snprintf(path, sizeof path, "%s/.bmirror-backup.lock", bdir);
	fd = open(path, O_RDWR);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(flock(fd, LOCK_EX), 0);
	ck_assert_int_eq(blockmirror_backup(disk, &o, &res), -EBUSY);
	EXPECT_EVENTS(BLOCKMIRROR_BACKUP_FAILED);
	ck_assert_int_eq(E.v[0].err, EBUSY);
	close(fd);

	/* An older caller's options (without the appended fields) still
	 * work, and send nothing. */
	o.size = offsetof(struct blockmirror_backup_options, on_event);
	E.n = 0;
	ck_assert_int_eq(blockmirror_backup(disk, &o, &res), 0);
	ck_assert_uint_eq(E.n, 0);
	ck_assert_uint_eq(res.number, 3);
	ck_assert_int_eq(blockmirror_disk_close(disk), 0);
	free(buf);
}
END_TEST

int
main(void)
{
	int missing = missing_tool_status("qemu-img");
	Suite *s = suite_create("backup");
	TCase *tc = tcase_create("backup");

	if (missing)
		return missing;
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_set_timeout(tc, 300);
	tcase_add_test(tc, test_points_are_instants);
	tcase_add_test(tc, test_incremental_after_kill);
	tcase_add_test(tc, test_verify_names_damage);
	tcase_add_test(tc, test_heal_by_digests);
	tcase_add_test(tc, test_freeze_hooks);
	tcase_add_test(tc, test_two_chains);
	tcase_add_test(tc, test_odd_size);
	tcase_add_loop_test(tc, test_granularities, 0, 2);
	tcase_add_test(tc, test_after_a_dead_backup);
	tcase_add_test(tc, test_events);
	suite_add_tcase(s, tc);
	return run_suite(s) ? EXIT_FAILURE : EXIT_SUCCESS;
}
