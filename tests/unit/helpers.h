/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Small helpers shared by the unit tests: time (sleep_ms, now_ms, now_s),
 * a deterministic PRNG (rnd, rnd_range), settings from the environment
 * (env_u64), a log that drops everything, running a Check suite, removing
 * a test directory, tools on PATH and servers started for a test
 * (nbdkit), and for the mirror job: an event counter (struct events,
 * on_event) and a blocking job call run on a thread with a deadline
 * (struct bg_call).
 *
 * Everything is static inline: each test uses what it needs.
 */
#ifndef BM_TESTS_UNIT_HELPERS_H
#define BM_TESTS_UNIT_HELPERS_H

#include <check.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <blockmirror/blockmirror.h>

/* ---- time ------------------------------------------------------------- */

static inline void
sleep_ms(unsigned ms)
{
	struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000L };

	nanosleep(&ts, NULL);
}

/* The monotonic clock, in milliseconds and in seconds. */
static inline uint64_t
now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static inline double
now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* ---- a small deterministic PRNG (splitmix64) -------------------------- */

static inline uint64_t
rnd(uint64_t *s)
{
	uint64_t z = (*s += 0x9e3779b97f4a7c15ull);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

/* 0 to n - 1 (0 when n is 0). */
static inline uint64_t
rnd_range(uint64_t *s, uint64_t n)
{
	return n ? rnd(s) % n : 0;
}

/* An environment variable as a number (0x... too), or def if unset. */
static inline uint64_t
env_u64(const char *name, uint64_t def)
{
	const char *v = getenv(name);

	return v && *v ? strtoull(v, NULL, 0) : def;
}

/* A run's seed: from the environment variable `name`, else the time (the
 * test prints it, for a failure to be replayed). */
static inline uint64_t
env_seed(const char *name)
{
	uint64_t seed = env_u64(name, 0);

	return seed ? seed : (uint64_t)time(NULL);
}

/* A log callback that drops everything (blockmirror_set_log): for tests
 * that make the library warn thousands of times on purpose. */
static inline void
log_silent(void *data, enum blockmirror_log_level level, const char *msg)
{
	(void)data;
	(void)level;
	(void)msg;
}

/* ---- Check ------------------------------------------------------------ */

/* Run every test of `s` (CK_NORMAL output); the number that failed. */
static inline int
run_suite(Suite *s)
{
	SRunner *sr = srunner_create(s);
	int failed;

	srunner_run_all(sr, CK_NORMAL);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed;
}

/* rm -rf a test's directory. */
static inline void
remove_tree(const char *dir)
{
	char cmd[4200];

	snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
	ck_assert_int_eq(system(cmd), 0);
}

/* ---- tools and servers ------------------------------------------------ */

/* Is `tool` an executable in PATH? */
static inline bool
have_tool(const char *tool)
{
	const char *path = getenv("PATH");
	char buf[512];

	for (const char *p = path ? path : "/usr/bin:/bin"; *p;) {
		const char *e = strchr(p, ':');
		size_t n = e ? (size_t)(e - p) : strlen(p);

		snprintf(buf, sizeof buf, "%.*s/%s", (int)n, p, tool);
		if (access(buf, X_OK) == 0)
			return true;
		p += n + (e != NULL);
	}
	return false;
}

/* 0 when `tool` is in PATH; otherwise what main returns: 77 (skip), or 1
 * when CI=true, which does not allow skipping. */
static inline int
missing_tool_status(const char *tool)
{
	const char *ci = getenv("CI");

	if (have_tool(tool))
		return 0;
	if (ci && strcmp(ci, "true") == 0) {
		fprintf(stderr, "%s not found, and CI=true does not allow "
			"skipping\n", tool);
		return 1;
	}
	fprintf(stderr, "SKIP: %s not found\n", tool);
	return 77;
}

/* Start argv[0] with stdin and stdout on /dev/null; it dies with the
 * test process in any case. */
static inline pid_t
spawn_quiet(char *const argv[])
{
	pid_t pid = fork();

	ck_assert_int_ge(pid, 0);
	if (pid == 0) {
		int fd = open("/dev/null", O_RDWR);

		prctl(PR_SET_PDEATHSIG, SIGKILL);
		dup2(fd, 0);
		dup2(fd, 1);
		execvp(argv[0], argv);
		_exit(127);
	}
	return pid;
}

/* Is a socket listening on `path`?  (/proc/net/unix: flag 00010000 is
 * __SO_ACCEPTCON; probing with connect() would upset the server.) */
static inline bool
listening(const char *path)
{
	FILE *f = fopen("/proc/net/unix", "r");
	char line[512];
	size_t n = strlen(path);
	bool found = false;

	if (!f)
		return access(path, F_OK) == 0;
	while (!found && fgets(line, sizeof line, f)) {
		size_t len = strcspn(line, "\n");

		found = len > n && strncmp(line + len - n, path, n) == 0 &&
			line[len - n - 1] == ' ' &&
			strstr(line, " 00010000 ") != NULL;
	}
	fclose(f);
	return found;
}

/* Wait (up to 10 s) until the server `pid` listens on `path`. */
static inline void
wait_socket(const char *path, pid_t pid)
{
	for (int i = 0; i < 1000; i++) {
		if (listening(path))
			return;
		if (waitpid(pid, NULL, WNOHANG) == pid)
			ck_abort_msg("the server exited before listening on %s",
				     path);
		usleep(10000);
	}
	ck_abort_msg("the server did not listen on %s", path);
}

/* nbdkit -f --exit-with-parent -U SOCK ARGS... (NULL-terminated), started
 * and listening. */
static inline pid_t
nbdkit_start_va(const char *sock, const char *first, va_list ap)
{
	char *argv[32] = { "nbdkit", "-f", "--exit-with-parent", "-U",
			   (char *)sock };
	int argc = 5;
	pid_t pid;

	for (const char *a = first; a; a = va_arg(ap, const char *)) {
		ck_assert_int_lt(argc, 31);
		argv[argc++] = (char *)a;
	}
	argv[argc] = NULL;
	pid = spawn_quiet(argv);
	wait_socket(sock, pid);
	return pid;
}

static inline pid_t
nbdkit_start(const char *sock, const char *first, ...)
{
	va_list ap;
	pid_t pid;

	va_start(ap, first);
	pid = nbdkit_start_va(sock, first, ap);
	va_end(ap);
	return pid;
}

/* ---- the mirror job's events ------------------------------------------ */

struct events {
	atomic_int ready;
	atomic_int completed;
	atomic_int pivoted;   /* COMPLETED events with pivoted = true */
	atomic_int unpivoted; /* COMPLETED events with pivoted = false */
	atomic_int cancelled;
	atomic_int failed;
	atomic_int errors;
	atomic_int src_errors, dst_errors; /* ERROR events by side */
	atomic_int paused;
	atomic_int resumed;
	atomic_int mode_changed; /* MODE_CHANGED to active */
	char message[256];       /* the first FAILED or ERROR message */
};

/* A job's on_event: counts into the struct events at `data`. */
static inline void
on_event(void *data, const struct blockmirror_event *ev)
{
	struct events *e = data;

	switch (ev->type) {
	case BLOCKMIRROR_EVENT_READY:
		e->ready++;
		break;
	case BLOCKMIRROR_EVENT_COMPLETED:
		e->completed++;
		if (ev->pivoted)
			e->pivoted++;
		else
			e->unpivoted++;
		break;
	case BLOCKMIRROR_EVENT_CANCELLED:
		e->cancelled++;
		break;
	case BLOCKMIRROR_EVENT_FAILED:
	case BLOCKMIRROR_EVENT_ERROR:
		if (ev->type == BLOCKMIRROR_EVENT_FAILED) {
			e->failed++;
		} else {
			e->errors++;
			if (ev->on_source)
				e->src_errors++;
			else
				e->dst_errors++;
		}
		if (!e->message[0])
			snprintf(e->message, sizeof e->message, "%s",
				 ev->message ? ev->message : "?");
		break;
	case BLOCKMIRROR_EVENT_PAUSED:
		e->paused++;
		break;
	case BLOCKMIRROR_EVENT_RESUMED:
		e->resumed++;
		break;
	case BLOCKMIRROR_EVENT_MODE_CHANGED:
		if (ev->mode == BLOCKMIRROR_MODE_ACTIVE)
			e->mode_changed++;
		break;
	default:
		break;
	}
}

/* ---- a blocking job call on a helper thread --------------------------- */

/* So that a hang shows as a time-out of the test instead of a stuck
 * test. */
enum bg_kind { BG_COMPLETE, BG_CANCEL, BG_FORCE };

struct bg_call {
	pthread_t thread;
	struct blockmirror_job *job;
	enum bg_kind kind;
	atomic_bool done;
	bool joined;
	int result;
	double t_start, t_end;
};

static inline void *
bg_main(void *arg)
{
	struct bg_call *c = arg;

	c->result = c->kind == BG_COMPLETE ? blockmirror_job_complete(c->job)
		  : blockmirror_job_cancel(c->job, c->kind == BG_FORCE);
	c->t_end = now_s();
	atomic_store(&c->done, true);
	return NULL;
}

/* complete(), cancel() or a forced cancel of `job`, on a thread. */
static inline void
bg_start(struct bg_call *c, struct blockmirror_job *job, enum bg_kind kind)
{
	memset(c, 0, sizeof *c);
	c->job = job;
	c->kind = kind;
	c->t_start = now_s();
	ck_assert_int_eq(pthread_create(&c->thread, NULL, bg_main, c), 0);
}

/* Wait up to ms for the call to return; false if it has not. */
static inline bool
bg_wait(struct bg_call *c, unsigned ms)
{
	double end = now_s() + ms / 1000.0;

	while (!atomic_load(&c->done) && now_s() < end)
		sleep_ms(2);
	if (!atomic_load(&c->done))
		return false;
	if (!c->joined)
		pthread_join(c->thread, NULL);
	c->joined = true;
	return true;
}

#endif /* BM_TESTS_UNIT_HELPERS_H */
