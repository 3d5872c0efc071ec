/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Fuzz target for the control protocol as `bmirror serve` reads it
 * (tools/control.c, docs/control.md): the input is what a client sends.
 * It is read back line by line through the server's line reader (from a
 * memfd, as from the socket), every JSON object goes through
 * control_parse_request, and its answer-sized echo through the server's
 * output queue (struct line_out) over a socket pair that takes only part
 * of it at a time.
 *
 * A "to" goes through the destination rules (control_check_destination)
 * as a path and as a URI (the caller's classification; the library's rule
 * is fuzzed by the uri target), unconfined and confined, both as given
 * and below a fixed tree made once in $TMPDIR/bmirror-fuzz-control.PID:
 *
 *   ok/            the allowed directory
 *   ok/x:/         a directory named like a URI scheme
 *   ok/file.raw    a file; ok/hl.raw a second name of other/victim.raw
 *   ok/sub ->      ../other;  ok/link.raw -> ../other/t.raw (dangling)
 *   ok/fifo        a FIFO
 *   other/         outside
 *
 * with --allow-nbd entries for unix:ok/nbd.sock, 127.0.0.1, [::1] and
 * nbd.example.  "@OK@" in a "to" stands for the tree's ok/ (so that
 * seeds can name the allowed socket).  What is accepted must hold up when checked another way:
 * a confined path resolves (realpath of its directory) into ok/, and is
 * not a symbolic link, a FIFO or a file with another hard link; a
 * confined URI has no percent-escape, fragment or user information, and
 * no query unless it is a Unix socket's.  Nothing may be created in the
 * tree.  Crashes, leaks and a reader that loops are bugs too.
 */
#include <dirent.h>
#include <errno.h>
#include <ftw.h>
#include <limits.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "control.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static struct line_reader rd;
static char root[1024], ok[1100], sock_entry[1200];
static char *allow_dirs[1];
static char *allow_nbd[4];
static int n_entries_at_start;
static unsigned calls;

static int count_entries(void);

static void
remove_tree_at(const char *dir)
{
	static const char *const names[] = {
		"ok/x:", "ok/file.raw", "ok/hl.raw", "ok/sub", "ok/link.raw",
		"ok/fifo", "other/victim.raw", "ok", "other",
	};
	char p[PATH_MAX + 32];

	for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
		snprintf(p, sizeof p, "%s/%s", dir, names[i]);
		if (unlink(p) < 0)
			rmdir(p);
	}
	rmdir(dir);
}

/* libFuzzer ends without atexit handlers: trees of fuzzers that are gone
 * are removed by the next one. */
static void
remove_stale_trees(const char *tmp)
{
	char p[PATH_MAX];
	struct dirent *e;
	DIR *d = opendir(tmp);

	if (!d)
		return;
	while ((e = readdir(d))) {
		char *end;
		long pid;

		if (strncmp(e->d_name, "bmirror-fuzz-control.", 21) != 0)
			continue;
		pid = strtol(e->d_name + 21, &end, 10);
		if (*end || pid <= 0 || kill((pid_t)pid, 0) == 0 ||
		    errno != ESRCH)
			continue;
		snprintf(p, sizeof p, "%s/%s", tmp, e->d_name);
		remove_tree_at(p);
	}
	closedir(d);
}

static void
remove_tree(void)
{
	if (count_entries() != n_entries_at_start)
		abort(); /* a check created something */
	remove_tree_at(root);
}

static int n_seen;

static int
count_one(const char *path, const struct stat *st, int flag, struct FTW *f)
{
	n_seen++;
	return 0;
}

/* Entries in the tree: the fuzzer's own check that nothing appeared. */
static int
count_entries(void)
{
	n_seen = 0;
	if (nftw(root, count_one, 8, FTW_PHYS) < 0)
		return -1;
	return n_seen;
}

static void
make_tree(void)
{
	const char *tmp = getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
	char p[PATH_MAX + 32], q[PATH_MAX + 32], *real;
	FILE *f;

	remove_stale_trees(tmp);
	snprintf(root, sizeof root, "%s/bmirror-fuzz-control.%d", tmp,
		 (int)getpid());
	remove_tree_at(root); /* a dead process's, with our pid */
	if (mkdir(root, 0700) < 0)
		abort();
	real = realpath(root, NULL);
	if (!real)
		abort();
	if (strlen(real) >= sizeof root)
		abort();
	memcpy(root, real, strlen(real) + 1);
	free(real);
	snprintf(ok, sizeof ok, "%s/ok", root);
	snprintf(p, sizeof p, "%s/other", root);
	if (mkdir(ok, 0700) < 0 || mkdir(p, 0700) < 0)
		abort();
	snprintf(p, sizeof p, "%s/ok/x:", root);
	if (mkdir(p, 0700) < 0)
		abort();
	snprintf(p, sizeof p, "%s/ok/file.raw", root);
	f = fopen(p, "w");
	if (!f)
		abort();
	fclose(f);
	snprintf(q, sizeof q, "%s/other/victim.raw", root);
	f = fopen(q, "w");
	if (!f)
		abort();
	fclose(f);
	snprintf(p, sizeof p, "%s/ok/hl.raw", root);
	if (link(q, p) < 0)
		abort();
	snprintf(p, sizeof p, "%s/ok/sub", root);
	if (symlink("../other", p) < 0)
		abort();
	snprintf(p, sizeof p, "%s/ok/link.raw", root);
	if (symlink("../other/t.raw", p) < 0)
		abort();
	snprintf(p, sizeof p, "%s/ok/fifo", root);
	if (mkfifo(p, 0600) < 0)
		abort();
	allow_dirs[0] = ok;
	snprintf(sock_entry, sizeof sock_entry, "unix:%s/nbd.sock", ok);
	allow_nbd[0] = sock_entry;
	allow_nbd[1] = (char *)"127.0.0.1";
	allow_nbd[2] = (char *)"[::1]";
	allow_nbd[3] = (char *)"nbd.example";
	n_entries_at_start = count_entries();
	atexit(remove_tree);
}

/* An accepted confined path, checked another way. */
static void
check_accepted_path(const char *out)
{
	char dir[PATH_MAX], real[PATH_MAX];
	const char *slash = strrchr(out, '/');
	size_t oklen = strlen(ok);
	struct stat st;

	if (!slash || (size_t)(slash - out) >= sizeof dir)
		abort();
	memcpy(dir, out, (size_t)(slash - out));
	dir[slash - out] = '\0';
	/* Canonical already, and inside ok/. */
	if (!realpath(dir, real) || strcmp(real, dir) != 0)
		abort();
	if (strncmp(real, ok, oklen) != 0 ||
	    (real[oklen] != '\0' && real[oklen] != '/'))
		abort();
	if (!slash[1] || strcmp(slash + 1, ".") == 0 ||
	    strcmp(slash + 1, "..") == 0)
		abort();
	if (lstat(out, &st) == 0 &&
	    (S_ISLNK(st.st_mode) || S_ISFIFO(st.st_mode) ||
	     (S_ISREG(st.st_mode) && st.st_nlink > 1)))
		abort();
}

static void
check_accepted_uri(const char *to, const char *out)
{
	const char *q = strchr(out, '?'), *colon = strchr(to, ':');
	bool is_unix = colon && colon - to >= 5 &&
		       strncmp(colon - 5, "+unix", 5) == 0;

	if (strpbrk(to, "%#") || strpbrk(out, "%#"))
		abort();
	if (!is_unix) {
		if (q || strcmp(out, to) != 0)
			abort();
		return;
	}
	/* The one query, naming the allowed socket exactly. */
	if (!q || strncmp(q, "?socket=", 8) != 0 ||
	    strcmp(q + 8, sock_entry + 5) != 0)
		abort();
}

static void
check_destination(const char *to)
{
	const struct control_allow confined = {
		.dirs = allow_dirs, .n_dirs = 1,
		.nbd = allow_nbd, .n_nbd = 4,
	};
	const struct control_allow dirs_only = { .dirs = allow_dirs,
						 .n_dirs = 1 };
	char out[PATH_MAX], tiny[16], err[256];

	for (int u = 0; u < 2; u++) {
		bool is_uri = u;

		for (int c = 0; c < 2; c++) {
			if (control_check_destination(to, is_uri, c, NULL, out,
						      sizeof out, err,
						      sizeof err) == 0 &&
			    strcmp(out, to) != 0)
				abort();
			if (control_check_destination(to, is_uri, c,
						      &confined, out,
						      sizeof out, err,
						      sizeof err) == 0) {
				if (is_uri)
					check_accepted_uri(to, out);
				else
					check_accepted_path(out);
			}
			if (control_check_destination(to, is_uri, c,
						      &dirs_only, out,
						      sizeof out, err,
						      sizeof err) == 0) {
				if (is_uri)
					abort(); /* NBD needs --allow-nbd */
				check_accepted_path(out);
			}
			control_check_destination(to, is_uri, c, &confined,
						  tiny, sizeof tiny, NULL, 0);
		}
	}
}

/* The line as the server would queue it, sent through a socket pair that
 * takes it in small pieces, must come out whole and in order. */
static void
echo_through_queue(json_t *j)
{
	struct line_out o = { 0 };
	char *want = json_dumps(j, JSON_COMPACT | JSON_PRESERVE_ORDER);
	static int sv[2] = { -1, -1 };
	char got[8192];
	size_t len, have = 0;
	int sz = 4096;

	if (!want)
		return;
	len = strlen(want);
	if (sv[0] < 0) {
		if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0,
			       sv) < 0)
			abort();
		setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &sz, sizeof sz);
	}
	if (len + 1 > sizeof got) {
		free(want);
		return;
	}
	if (line_out_add(&o, json_incref(j)) < 0)
		abort();
	while (o.len) {
		ssize_t n;

		if (line_out_flush(&o, sv[0]) < 0)
			abort();
		n = read(sv[1], got + have, sizeof got - have);
		if (n <= 0)
			abort(); /* the queue held bytes the socket never got */
		have += (size_t)n;
	}
	if (have != len + 1 || memcmp(got, want, len) != 0 ||
	    got[len] != '\n')
		abort();
	line_out_free(&o);
	free(want);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct control_request req;
	const char *msg;
	char below[PATH_MAX + 64];
	json_t *j;
	int fd, r, lines = 0;

	if (!root[0])
		make_tree();
	fd = memfd_create("fuzz-control", 0);
	if (fd < 0)
		return 0;
	if (write(fd, data, size) != (ssize_t)size ||
	    lseek(fd, 0, SEEK_SET) != 0) {
		close(fd);
		return 0;
	}
	rd.fd = fd;
	rd.len = 0;
	while ((r = line_read(&rd, &j)) == 1 || r == -EPROTO) {
		if (!j)
			continue;
		/* The costly checks for the first lines only: an input of
		 * thousands of lines would fuzz slowly, not better. */
		if (++lines > 32) {
			control_parse_request(j, &req, &msg);
			json_decref(j);
			continue;
		}
		if (control_parse_request(j, &req, &msg) == 0) {
			if (!req.cmd)
				abort();
			if (req.to) {
				const char *at = strstr(req.to, "@OK@");

				check_destination(req.to);
				/* @OK@ stands for the tree's ok/. */
				if (at && strlen(req.to) + strlen(ok) <
				    sizeof below) {
					size_t pre = (size_t)(at - req.to);

					memcpy(below, req.to, pre);
					strcpy(below + pre, ok);
					strcat(below, at + 4);
					check_destination(below);
				}
				size_t ol = strlen(ok), tl = strlen(req.to);

				if (ol + 1 + tl < sizeof below) {
					memcpy(below, ok, ol);
					below[ol] = '/';
					memcpy(below + ol + 1, req.to, tl + 1);
					check_destination(below);
				}
			}
		} else if (!msg) {
			abort();
		}
		echo_through_queue(j);
		json_decref(j);
	}
	close(fd);
	/* Nothing created: checked now and then, and at exit. */
	if ((++calls & 4095) == 0 && count_entries() != n_entries_at_start)
		abort();
	return 0;
}
