/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Pivot durability (DESIGN.md rule 10): a child process serves a disk
 * through a symbolic link, writes to it, moves it with a job that
 * re-points the link at the pivot, and is killed with SIGKILL at one step
 * of the pivot (lib/pivot.c's hook, and lib/durable.h's for the steps of
 * re-pointing the link).  Whatever the step, the link must
 * afterwards name a complete image: one that holds every write the child
 * saw acknowledged.  Before the rename that is the source, after it the
 * destination; a stray temporary link may remain, never a broken LINK.
 *
 * Each child's writes come from a seed, so the parent rebuilds the same
 * model without talking to it.
 */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <blockmirror/blockmirror.h>

#include "durable.h"
#include "helpers.h"
#include "mirror.h"

#define SIZE (6u << 20)
#define WRITES 200

/*
 * The kill points: the pivot's own steps (lib/mirror.h) and, between
 * FLUSHED and DURABLE, each step of re-pointing the link once done.
 */
static const struct kill_point {
	enum bm_pivot_step pivot;      /* or 0 */
	enum bm_durable_step durable;  /* when pivot is 0 */
	bool link_renamed;             /* the link names the destination */
} points[] = {
	{ BM_PIVOT_DRAINED, 0, false },
	{ BM_PIVOT_FLUSHED, 0, false },
	{ 0, BM_DURABLE_SYMLINK, false },
	{ 0, BM_DURABLE_RENAME, true },
	{ 0, BM_DURABLE_FSYNC_DIR, true },
	{ BM_PIVOT_DURABLE, 0, true },
	{ BM_PIVOT_SWAPPED, 0, true },
};
#define POINTS (int)(sizeof points / sizeof points[0])

static const struct kill_point *kill_at;
static bool pivoting;

static void
kill_hook(enum bm_pivot_step step)
{
	pivoting = true;
	if (kill_at->pivot && step == kill_at->pivot)
		raise(SIGKILL);
}

static int
durable_hook(const struct bm_durable_event *ev)
{
	if (pivoting && !kill_at->pivot && ev->done && ev->result == 0 &&
	    ev->step == kill_at->durable)
		raise(SIGKILL);
	return 0;
}

/* The initial image, from a seed: data in even MiBs, zeroes in odd. */
static void
initial_image(uint64_t seed, unsigned char *img)
{
	for (unsigned i = 0; i < SIZE; i++)
		img[i] = (i / (1u << 20)) % 2 ? 0 : (unsigned char)rnd(&seed);
}

/* The next write of the sequence for a seed. */
static size_t
next_write(uint64_t *stream, uint64_t *off, unsigned char *buf, size_t max)
{
	size_t len = 1 + rnd(stream) % max;

	*off = rnd(stream) % (SIZE - len);
	for (size_t i = 0; i < len; i++)
		buf[i] = (unsigned char)rnd(stream);
	return len;
}

static void
write_some(struct blockmirror_disk *disk, uint64_t *stream, int n)
{
	static unsigned char buf[65536];

	for (int w = 0; w < n; w++) {
		uint64_t off;
		size_t len = next_write(stream, &off, buf, sizeof buf);

		if (blockmirror_disk_write(disk, buf, len, off, 0) != 0)
			_exit(3);
	}
}

static void
child(const char *dir, uint64_t seed, enum blockmirror_mode mode)
{
	char src[PATH_MAX], dst[PATH_MAX], link[PATH_MAX];
	unsigned char *img = malloc(SIZE);
	struct blockmirror_job_options o = { .size = sizeof o };
	struct blockmirror_disk *disk;
	struct blockmirror_job *job;
	uint64_t stream = seed * 3 + 1;
	int fd;

	snprintf(src, sizeof src, "%s/src", dir);
	snprintf(dst, sizeof dst, "%s/dst", dir);
	snprintf(link, sizeof link, "%s/disk", dir);
	initial_image(seed, img);
	fd = open(src, O_CREAT | O_WRONLY | O_TRUNC, 0644);
	if (fd < 0 || pwrite(fd, img, SIZE, 0) != SIZE)
		_exit(2);
	close(fd);
	if (symlink(src, link) < 0)
		_exit(2);

	disk = blockmirror_disk_open(link, BLOCKMIRROR_FORMAT_RAW, 0);
	if (!disk || blockmirror_disk_start_thread(disk) < 0)
		_exit(2);
	o.flags = BLOCKMIRROR_JOB_CREATE;
	o.mode = mode;
	o.link = link;
	o.granularity = 65536;
	/* Half the writes before the job, half while it runs. */
	write_some(disk, &stream, WRITES / 2);
	job = blockmirror_job_start(disk, dst, &o);
	if (!job)
		_exit(2);
	write_some(disk, &stream, WRITES - WRITES / 2);
	if (blockmirror_job_wait(job, BLOCKMIRROR_JOB_READY, 30000) !=
	    BLOCKMIRROR_JOB_READY)
		_exit(4);
	bm_pivot_hook = kill_hook;
	bm_durable_hook = durable_hook;
	blockmirror_job_complete(job);
	_exit(0); /* not reached when the hook kills */
}

START_TEST(test_kill_during_pivot)
{
	int step = _i % POINTS;
	enum blockmirror_mode mode = (_i / POINTS) % 2
				     ? BLOCKMIRROR_MODE_ACTIVE
				     : BLOCKMIRROR_MODE_BACKGROUND;
	uint64_t seed = 1000 + (uint64_t)_i;
	char dir[] = "/tmp/test-pivot-crash.XXXXXX", link[PATH_MAX];
	char target[PATH_MAX], path[PATH_MAX];
	unsigned char *model = malloc(SIZE), *got = malloc(SIZE);
	static unsigned char buf[65536];
	uint64_t stream = seed * 3 + 1, off;
	int status, fd;
	ssize_t n;
	pid_t pid;

	ck_assert_ptr_nonnull(mkdtemp(dir));
	kill_at = &points[step];
	pid = fork();
	ck_assert_int_ge(pid, 0);
	if (pid == 0)
		child(dir, seed, mode);
	ck_assert_int_eq(waitpid(pid, &status, 0), pid);
	ck_assert_msg(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL,
		      "step %d: the child was not killed (status 0x%x)", step,
		      status);

	/* The model: the initial image and every write, in order. */
	initial_image(seed, model);
	for (int w = 0; w < WRITES; w++) {
		size_t len = next_write(&stream, &off, buf, sizeof buf);

		memcpy(model + off, buf, len);
	}

	/* The link names the source before the rename, the destination
	 * after, and that image is complete. */
	snprintf(link, sizeof link, "%s/disk", dir);
	n = readlink(link, target, sizeof target - 1);
	ck_assert_msg(n > 0, "step %d: the link is gone: %s", step,
		      strerror(errno));
	target[n] = '\0';
	snprintf(path, sizeof path, "%s/%s", dir,
		 points[step].link_renamed ? "dst" : "src");
	ck_assert_str_eq(target, path);
	fd = open(link, O_RDONLY);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(pread(fd, got, SIZE, 0), SIZE);
	close(fd);
	for (unsigned i = 0; i < SIZE; i++)
		if (got[i] != model[i])
			ck_abort_msg("step %d: %s differs from the model at %u",
				     step, target, i);
	free(model);
	free(got);
	remove_tree(dir);
}
END_TEST

int
main(void)
{
	Suite *s = suite_create("pivot-crash");
	TCase *tc = tcase_create("kill");

	tcase_set_timeout(tc, 60);
	/* Every step, in background and in active mode. */
	tcase_add_loop_test(tc, test_kill_during_pivot, 0, 2 * POINTS);
	suite_add_tcase(s, tc);
	return run_suite(s) ? EXIT_FAILURE : EXIT_SUCCESS;
}
