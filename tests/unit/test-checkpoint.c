/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Change tracking of a running disk (lib/checkpoint.c over lib/cbt.c):
 * every write is on record before it happens, checkpoints split the
 * record at a snapshot's instant, and the record survives kill -9.  A
 * qcow2 disk keeps it in the image (lib/cbt-image.c).
 */
#include <errno.h>
#include <inttypes.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include "fault.h"
#include "helpers.h"

#define BLOCK 4096u
#define NBLOCKS 4096u                 /* 16 MiB */
#define DISK_SIZE ((uint64_t)BLOCK * NBLOCKS)
#define GRAN 65536u
#define NWRITERS 3

static char dir[64];
static char image[128];

static void
setup(void)
{
	char cmd[256];

	snprintf(dir, sizeof dir, "/var/tmp/bm-cp-XXXXXX");
	ck_assert(mkdtemp(dir));
	snprintf(image, sizeof image, "%s/disk.raw", dir);
	snprintf(cmd, sizeof cmd, "head -c %" PRIu64 " /dev/urandom > %s",
		 DISK_SIZE, image);
	ck_assert_int_eq(system(cmd), 0);
}

static void
teardown(void)
{
	remove_tree(dir);
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

/* Writers of random small writes; each notes the blocks it started and
 * the blocks it had acknowledged (shared memory: it may be a child). */
struct shared {
	atomic_bool stop;
	atomic_bool started[NBLOCKS];
	atomic_bool acked[NBLOCKS];
};

struct writer {
	struct blockmirror_disk *disk;
	struct shared *sh;
	uint64_t rng;
};

static void *
writer_main(void *arg)
{
	struct writer *w = arg;
	uint8_t *buf = aligned_alloc(BLOCK, 8 * BLOCK);

	memset(buf, 0xc3, 8 * BLOCK);
	while (!atomic_load(&w->sh->stop)) {
		uint64_t first = rnd_range(&w->rng, NBLOCKS / 2) * 2;
		uint64_t n = 1 + rnd_range(&w->rng, 8);

		if (first + n > NBLOCKS)
			n = NBLOCKS - first;
		buf[0] = (uint8_t)rnd(&w->rng);
		for (uint64_t b = first; b < first + n; b++)
			atomic_store(&w->sh->started[b], true);
		if (blockmirror_disk_write(w->disk, buf, n * BLOCK,
					   first * BLOCK, 0) < 0)
			break;
		for (uint64_t b = first; b < first + n; b++)
			atomic_store(&w->sh->acked[b], true);
	}
	free(buf);
	return NULL;
}

static void
read_all(struct blockmirror_snapshot *snap, uint8_t *buf)
{
	for (uint64_t off = 0; off < DISK_SIZE; off += 1 << 20)
		ck_assert_msg(blockmirror_snapshot_read(snap, buf + off, 1 << 20,
							off) == 0,
			      "%s", blockmirror_last_error());
}

/* Wait until n granules hold an acknowledged block; false after ms. */
static bool
wait_acked_granules(struct shared *sh, unsigned n, unsigned ms)
{
	for (unsigned waited = 0; waited < ms; waited += 10) {
		unsigned count = 0;

		for (uint64_t g = 0; g < DISK_SIZE / GRAN; g++) {
			bool any = false;

			for (uint64_t b = g * GRAN / BLOCK;
			     !any && b < (g + 1) * GRAN / BLOCK; b++)
				any = atomic_load(&sh->acked[b]);
			count += any;
		}
		if (count >= n)
			return true;
		sleep_ms(10);
	}
	return false;
}

static bool
bit(const uint64_t *words, uint64_t b)
{
	return words[b / 64] >> (b % 64) & 1;
}

/*
 * S1 at checkpoint c1; writers; S2 at c2, noting what changed since c1.
 * Every granule whose content differs between the two views is marked,
 * and every marked granule was written (started) since c1.
 */
START_TEST(test_changed_between_instants)
{
	struct blockmirror_snapshot_options o = { .size = sizeof o };
	struct blockmirror_snapshot *s1, *s2;
	struct blockmirror_checkpoint *list;
	struct blockmirror_disk *disk = open_disk();
	static struct shared sh;
	struct writer w[NWRITERS];
	pthread_t t[NWRITERS];
	uint8_t *v1 = aligned_alloc(BLOCK, DISK_SIZE);
	uint8_t *v2 = aligned_alloc(BLOCK, DISK_SIZE);
	uint64_t gran, *words, nbits, bytes, marked = 0, differ = 0;
	bool crashed = true;
	size_t n;

	memset(&sh, 0, sizeof sh);
	ck_assert_msg(blockmirror_disk_track(disk, NULL, GRAN, &crashed) == 0,
		      "%s", blockmirror_last_error());
	ck_assert(!crashed);
	o.checkpoint = "c1";
	ck_assert_int_eq(blockmirror_snapshot_take(&disk, 1, &o, &s1), 0);
	read_all(s1, v1);
	for (int i = 0; i < NWRITERS; i++) {
		w[i] = (struct writer){ disk, &sh, 77 + i };
		ck_assert_int_eq(pthread_create(&t[i], NULL, writer_main,
						&w[i]), 0);
	}
	/* Enough changed granules for the check below, however slow the
	 * record's syncs are here. */
	ck_assert_msg(wait_acked_granules(&sh, 20, 20000), "the writers "
		      "changed fewer than 20 granules in 20 s");
	o.since = "c1";
	o.checkpoint = "c2";
	ck_assert_msg(blockmirror_snapshot_take(&disk, 1, &o, &s2) == 0, "%s",
		      blockmirror_last_error());
	sleep_ms(100);
	atomic_store(&sh.stop, true);
	for (int i = 0; i < NWRITERS; i++)
		pthread_join(t[i], NULL);
	read_all(s2, v2);
	ck_assert_int_eq(blockmirror_snapshot_changed(s2, &gran, &words,
						      &nbits, &bytes), 0);
	ck_assert_uint_eq(gran, GRAN);
	ck_assert_uint_eq(nbits, DISK_SIZE / GRAN);
	for (uint64_t g = 0; g < nbits; g++) {
		bool diff = memcmp(v1 + g * GRAN, v2 + g * GRAN, GRAN) != 0;
		bool touched = false;

		for (uint64_t b = g * GRAN / BLOCK;
		     b < (g + 1) * GRAN / BLOCK; b++)
			touched |= atomic_load(&sh.started[b]);
		ck_assert_msg(!diff || bit(words, g), "granule %" PRIu64
			      " changed between the instants but is not "
			      "marked", g);
		ck_assert_msg(!bit(words, g) || touched, "granule %" PRIu64
			      " marked but never written", g);
		marked += bit(words, g);
		differ += diff;
	}
	ck_assert_uint_gt(differ, 10);
	ck_assert_uint_eq(bytes, marked * GRAN);
	free(words);
	/* The list: c1 holds what the writers did until c2. */
	ck_assert_int_eq(blockmirror_checkpoint_list(disk, &list, &n), 0);
	ck_assert_uint_eq(n, 2);
	ck_assert_str_eq(list[0].name, "c1");
	ck_assert_str_eq(list[1].name, "c2");
	ck_assert(list[0].trusted && list[1].trusted);
	ck_assert_uint_eq(list[0].changed_bytes, bytes);
	free(list);
	ck_assert_int_eq(blockmirror_snapshot_release(s1), 0);
	ck_assert_int_eq(blockmirror_snapshot_release(s2), 0);
	/* Removing c1 merges its record: nothing to compare with. */
	ck_assert_int_eq(blockmirror_checkpoint_remove(disk, "c1"), 0);
	ck_assert_int_eq(blockmirror_checkpoint_remove(disk, "c1"), -ENOENT);
	ck_assert_int_eq(blockmirror_disk_close(disk), 0);
	free(v1);
	free(v2);
}
END_TEST

/*
 * kill -9 in the middle of writing: the next process finds the record
 * (crashed), trusts it, and every acknowledged write is marked.
 */
START_TEST(test_survives_kill)
{
	struct shared *sh = mmap(NULL, sizeof *sh, PROT_READ | PROT_WRITE,
				 MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	struct blockmirror_snapshot_options o = { .size = sizeof o };
	struct blockmirror_snapshot *snap;
	struct blockmirror_checkpoint *list;
	struct blockmirror_disk *disk;
	uint64_t gran, *words, nbits, bytes, acked = 0;
	bool crashed = false;
	size_t n;
	pid_t pid;

	ck_assert(sh != MAP_FAILED);
	pid = fork();
	ck_assert_int_ge(pid, 0);
	if (pid == 0) {
		struct writer w[NWRITERS];
		pthread_t t[NWRITERS];

		disk = open_disk();
		if (blockmirror_disk_track(disk, NULL, GRAN, NULL) < 0 ||
		    blockmirror_checkpoint_create(disk, "before") < 0)
			_exit(3);
		for (int i = 0; i < NWRITERS; i++) {
			w[i] = (struct writer){ disk, sh, 5 + i };
			pthread_create(&t[i], NULL, writer_main, &w[i]);
		}
		for (;;)
			pause();
	}
	/* Let it write a while (acknowledged writes mean that it tracks
	 * and made its checkpoint: the writers start after), however slow
	 * its syncs are here; then kill it mid-write. */
	for (uint64_t end = now_ms() + 30000;;) {
		int count = 0, st = 0;

		for (unsigned b = 0; b < NBLOCKS; b++)
			count += atomic_load(&sh->acked[b]);
		if (count > (int)NBLOCKS / 8)
			break;
		ck_assert_msg(waitpid(pid, &st, WNOHANG) == 0, "the tracker "
			      "exited before the kill (status 0x%x)", st);
		ck_assert_msg(now_ms() < end, "the tracker had %d blocks "
			      "acknowledged in 30 s", count);
		sleep_ms(10);
	}
	kill(pid, SIGKILL);
	waitpid(pid, NULL, 0);

	disk = open_disk();
	ck_assert_msg(blockmirror_disk_track(disk, NULL, 0, &crashed) == 0,
		      "%s", blockmirror_last_error());
	ck_assert_msg(crashed, "the killed tracker was not noticed");
	ck_assert_int_eq(blockmirror_checkpoint_list(disk, &list, &n), 0);
	ck_assert_uint_eq(n, 1);
	ck_assert_msg(list[0].trusted, "%s", list[0].reason);
	free(list);
	o.since = "before";
	o.checkpoint = "after";
	ck_assert_msg(blockmirror_snapshot_take(&disk, 1, &o, &snap) == 0, "%s",
		      blockmirror_last_error());
	ck_assert_int_eq(blockmirror_snapshot_changed(snap, &gran, &words,
						      &nbits, &bytes), 0);
	for (uint64_t b = 0; b < NBLOCKS; b++) {
		if (!atomic_load(&sh->acked[b]))
			continue;
		acked++;
		ck_assert_msg(bit(words, b * BLOCK / gran), "block %" PRIu64
			      " was acknowledged before the kill but is not "
			      "on record", b);
	}
	ck_assert_uint_gt(acked, 0);
	free(words);
	ck_assert_int_eq(blockmirror_snapshot_release(snap), 0);
	ck_assert_int_eq(blockmirror_disk_close(disk), 0);
	munmap(sh, sizeof *sh);
}
END_TEST

START_TEST(test_bad_input)
{
	struct blockmirror_snapshot_options o = { .size = sizeof o };
	struct blockmirror_snapshot *snap;
	struct blockmirror_disk *disk = open_disk();
	char side[160];

	/* No tracking: checkpoints are refused by name. */
	ck_assert_int_eq(blockmirror_checkpoint_create(disk, "a"), -EINVAL);
	ck_assert_msg(strstr(blockmirror_last_error(), "track"), "%s",
		      blockmirror_last_error());
	o.since = "a";
	ck_assert_int_eq(blockmirror_snapshot_take(&disk, 1, &o, &snap),
			 -EINVAL);
	/* A bad name is refused before the disk stops for it. */
	o.since = "no/such";
	ck_assert_int_eq(blockmirror_snapshot_take(&disk, 1, &o, &snap),
			 -EINVAL);
	ck_assert_msg(strstr(blockmirror_last_error(), "checkpoint name"),
		      "%s", blockmirror_last_error());
	o.since = "a";
	ck_assert_int_eq(blockmirror_disk_track(disk, NULL, 0, NULL), 0);
	ck_assert_int_eq(blockmirror_disk_track(disk, NULL, 0, NULL), -EBUSY);
	/* A missing checkpoint: the snapshot is not taken. */
	ck_assert_int_eq(blockmirror_snapshot_take(&disk, 1, &o, &snap),
			 -ENOENT);
	ck_assert_msg(strstr(blockmirror_last_error(), "a"), "%s",
		      blockmirror_last_error());
	ck_assert_int_eq(blockmirror_checkpoint_create(disk, "bad/name"),
			 -EINVAL);
	ck_assert_int_eq(blockmirror_checkpoint_create(disk, "a"), 0);
	ck_assert_int_eq(blockmirror_checkpoint_create(disk, "a"), -EEXIST);
	ck_assert_int_eq(blockmirror_disk_close(disk), 0);
	/* The sidecar of another disk size is refused, naming both. */
	snprintf(side, sizeof side, "%s.bmirror-cbt", image);
	ck_assert_int_eq(truncate(image, DISK_SIZE * 2), 0);
	disk = open_disk();
	ck_assert_int_eq(blockmirror_disk_track(disk, NULL, 0, NULL), -ESTALE);
	ck_assert_msg(strstr(blockmirror_last_error(), "bmirror-cbt"), "%s",
		      blockmirror_last_error());
	ck_assert_int_eq(blockmirror_disk_close(disk), 0);
	unlink(side);
}
END_TEST

struct pending {
	atomic_bool done;
	int err;
};

static void
pending_done(void *user_data, int err)
{
	struct pending *p = user_data;

	p->err = err;
	atomic_store(&p->done, true);
}

/*
 * Tracking starts with the disk drained: a write in flight when
 * blockmirror_disk_track is called has completed when it returns.  A
 * disk that served writes before tracking started refuses a sidecar
 * that holds checkpoints (they would miss those writes), and takes one
 * that holds none.
 */
START_TEST(test_writes_before_tracking)
{
	static struct bm_fault_rules rules;
	struct blockmirror_checkpoint *list;
	struct blockmirror_disk *disk;
	struct pending p = { 0 };
	uint8_t *buf = aligned_alloc(BLOCK, BLOCK);
	char side[160];
	size_t n;

	memset(&rules, 0, sizeof rules);
	ck_assert_int_eq(bm_fault_register(image, &rules), 0);
	memset(buf, 0x5c, BLOCK);
	/* A write in flight: done before tracking starts. */
	disk = open_disk();
	atomic_store(&rules.next_write_delay_ns, 300 * 1000000ull);
	ck_assert_int_eq(blockmirror_disk_aio_write(disk, buf, BLOCK, 0, 0,
						    pending_done, &p), 0);
	sleep_ms(30);
	/* No checkpoint in a new sidecar: nothing can have missed it. */
	ck_assert_msg(blockmirror_disk_track(disk, NULL, GRAN, NULL) == 0,
		      "%s", blockmirror_last_error());
	ck_assert_msg(atomic_load(&p.done), "tracking started with a write "
		      "in flight");
	ck_assert_int_eq(p.err, 0);
	ck_assert_int_eq(blockmirror_checkpoint_create(disk, "c1"), 0);
	ck_assert_int_eq(blockmirror_disk_close(disk), 0);
	/* A write before tracking: c1 would miss it. */
	disk = open_disk();
	ck_assert_int_eq(blockmirror_disk_write(disk, buf, BLOCK, BLOCK, 0), 0);
	ck_assert_int_eq(blockmirror_disk_track(disk, NULL, GRAN, NULL),
			 -ESTALE);
	ck_assert_msg(strstr(blockmirror_last_error(), "before the first "
			     "write"), "%s", blockmirror_last_error());
	ck_assert_int_eq(blockmirror_disk_close(disk), 0);
	/* Tracking before the first write: c1 holds. */
	disk = open_disk();
	ck_assert_int_eq(blockmirror_disk_track(disk, NULL, GRAN, NULL), 0);
	ck_assert_int_eq(blockmirror_disk_write(disk, buf, BLOCK, BLOCK, 0), 0);
	ck_assert_int_eq(blockmirror_checkpoint_list(disk, &list, &n), 0);
	ck_assert_uint_eq(n, 1);
	ck_assert(list[0].trusted);
	free(list);
	ck_assert_int_eq(blockmirror_disk_close(disk), 0);
	/* A sidecar without checkpoints: written disks may start. */
	snprintf(side, sizeof side, "%s.bmirror-cbt", image);
	unlink(side);
	disk = open_disk();
	ck_assert_int_eq(blockmirror_disk_write(disk, buf, BLOCK, BLOCK, 0), 0);
	ck_assert_int_eq(blockmirror_disk_track(disk, NULL, GRAN, NULL), 0);
	ck_assert_int_eq(blockmirror_disk_close(disk), 0);
	bm_fault_unregister(image);
	unlink(side);
	free(buf);
}
END_TEST

/* The list of a disk: names, trusted flags and reasons in one string. */
static void
list_is(struct blockmirror_disk *disk, const char *want)
{
	struct blockmirror_checkpoint *l;
	char got[512] = "";
	size_t n;

	ck_assert_int_eq(blockmirror_checkpoint_list(disk, &l, &n), 0);
	for (size_t i = 0; i < n; i++)
		snprintf(got + strlen(got), sizeof got - strlen(got),
			 "%s%s:%" PRIu64 ":%s", i ? " " : "", l[i].name,
			 l[i].changed_bytes, l[i].trusted ? "trusted"
			 : l[i].reason);
	free(l);
	ck_assert_msg(strstr(got, want) == got, "list \"%s\", want \"%s\"",
		      got, want);
}

/*
 * A qcow2 disk keeps its record in the image (no sidecar), says so, and
 * finds it again; writes served before tracking starts clear autoclear
 * bit 0, so the next tracker finds the checkpoints untrusted.
 */
START_TEST(test_qcow2_in_image)
{
	char qimg[160], cmd[512], side[200], *where = NULL;
	struct blockmirror_disk *disk;
	bool in_image = false, crashed = true;
	static char buf[65536];

	snprintf(qimg, sizeof qimg, "%s/disk.qcow2", dir);
	snprintf(side, sizeof side, "%s.bmirror-cbt", qimg);
	snprintf(cmd, sizeof cmd, "qemu-img convert -O qcow2 %s %s", image,
		 qimg);
	ck_assert_int_eq(system(cmd), 0);
	disk = blockmirror_disk_open(qimg, BLOCKMIRROR_FORMAT_QCOW2, 0);
	ck_assert_msg(disk, "%s", blockmirror_last_error());
	ck_assert_int_eq(blockmirror_disk_start_thread(disk), 0);
	ck_assert_int_eq(blockmirror_disk_track_record(disk, &where, &in_image),
			 -EINVAL);
	ck_assert_int_eq(blockmirror_disk_track(disk, NULL, 0, &crashed), 0);
	ck_assert(!crashed);
	ck_assert_int_eq(blockmirror_disk_track_record(disk, &where, &in_image),
			 0);
	ck_assert(in_image);
	ck_assert_str_eq(where, qimg);
	free(where);
	ck_assert_int_eq(blockmirror_checkpoint_create(disk, "c1"), 0);
	ck_assert_int_eq(blockmirror_disk_write(disk, buf, sizeof buf,
						1 << 20, 0), 0);
	list_is(disk, "c1:65536:trusted");
	ck_assert_int_eq(blockmirror_disk_close(disk), 0);
	ck_assert_int_eq(access(side, F_OK), -1);

	/* Found again. */
	disk = blockmirror_disk_open(qimg, BLOCKMIRROR_FORMAT_QCOW2, 0);
	ck_assert_int_eq(blockmirror_disk_start_thread(disk), 0);
	ck_assert_int_eq(blockmirror_disk_track(disk, NULL, 0, NULL), 0);
	list_is(disk, "c1:65536:trusted");
	ck_assert_int_eq(blockmirror_disk_close(disk), 0);

	/* A write before tracking: refused as for a sidecar, and the image
	 * says its bitmaps no longer hold every write (autoclear bit 0
	 * clear; the refused tracker wrote that down as in_use). */
	disk = blockmirror_disk_open(qimg, BLOCKMIRROR_FORMAT_QCOW2, 0);
	ck_assert_int_eq(blockmirror_disk_start_thread(disk), 0);
	ck_assert_int_eq(blockmirror_disk_write(disk, buf, sizeof buf,
						2 << 20, 0), 0);
	ck_assert_int_eq(blockmirror_disk_track(disk, NULL, 0, NULL), -ESTALE);
	ck_assert_msg(strstr(blockmirror_last_error(), "the image's 1 "
			     "checkpoints miss"), "%s", blockmirror_last_error());
	ck_assert_int_eq(blockmirror_disk_close(disk), 0);
	disk = blockmirror_disk_open(qimg, BLOCKMIRROR_FORMAT_QCOW2, 0);
	ck_assert_int_eq(blockmirror_disk_start_thread(disk), 0);
	ck_assert_int_eq(blockmirror_disk_track(disk, NULL, 0, NULL), 0);
	list_is(disk, "c1:65536:the image marks a bitmap since it was created "
		"in use");
	ck_assert_int_eq(blockmirror_disk_close(disk), 0);
	snprintf(cmd, sizeof cmd, "qemu-img check -q %s", qimg);
	ck_assert_int_eq(system(cmd), 0);
}
END_TEST

int
main(void)
{
	Suite *s = suite_create("checkpoint");
	TCase *tc = tcase_create("checkpoint");

	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_set_timeout(tc, 120);
	tcase_add_test(tc, test_changed_between_instants);
	tcase_add_test(tc, test_survives_kill);
	tcase_add_test(tc, test_bad_input);
	tcase_add_test(tc, test_writes_before_tracking);
	tcase_add_test(tc, test_qcow2_in_image);
	suite_add_tcase(s, tc);
	return run_suite(s) ? EXIT_FAILURE : EXIT_SUCCESS;
}
