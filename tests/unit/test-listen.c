/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Listening sockets (lib/listen.c), below the servers that use them:
 * the Unix socket file's mode (0600 even under umask 0), what is and is not
 * replaced at its path (a stale socket; never a live one, a regular file
 * or a symbolic link, whose target stays as it was), and the TCP
 * address read back after binding port 0, checked against the kernel's
 * own (getsockname) by connecting to it.  The replication channel's
 * test (test-repl-channel.c) covers the same through bm_chan_listen.
 */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <blockmirror/blockmirror.h>

#include "helpers.h"
#include "listen.h"

static char dir[256], path[300];

static void
setup(void)
{
	snprintf(dir, sizeof dir, "/tmp/bm-test-listen.XXXXXX");
	ck_assert_ptr_nonnull(mkdtemp(dir));
	snprintf(path, sizeof path, "%s/s.sock", dir);
}

static void
teardown(void)
{
	remove_tree(dir);
}

START_TEST(test_unix)
{
	char target[320], buf[8];
	struct stat st, made;
	int fd, fd2, tfd;

	/* Even with a umask that would open it to everyone. */
	umask(0);
	ck_assert_int_eq(bm_listen_unix(path, SOCK_NONBLOCK, &fd, &made), 0);
	ck_assert_int_eq(lstat(path, &st), 0);
	ck_assert(S_ISSOCK(st.st_mode));
	ck_assert_uint_eq(st.st_mode & 0777, 0600);
	ck_assert_uint_eq(st.st_ino, made.st_ino);
	ck_assert(fcntl(fd, F_GETFL) & O_NONBLOCK);

	/* Live: left alone. */
	ck_assert_int_eq(bm_listen_unix(path, 0, &fd2, NULL), -EADDRINUSE);
	ck_assert_int_eq(fd2, -1);
	/* Stale once the listener is gone: replaced, and a client gets
	 * through to the new one. */
	close(fd);
	ck_assert_int_eq(bm_listen_unix(path, 0, &fd2, &st), 0);
	ck_assert_uint_eq(st.st_mode & 0777, 0600);
	{
		struct sockaddr_un sa = { .sun_family = AF_UNIX };
		int c = socket(AF_UNIX, SOCK_STREAM, 0);

		strcpy(sa.sun_path, path);
		ck_assert_int_eq(connect(c, (struct sockaddr *)&sa, sizeof sa),
				 0);
		close(c);
	}
	close(fd2);

	/* A symbolic link there: neither it nor its target is touched. */
	snprintf(target, sizeof target, "%s/target", dir);
	tfd = open(target, O_WRONLY | O_CREAT, 0644);
	ck_assert_int_eq(write(tfd, "keep", 4), 4);
	close(tfd);
	ck_assert_int_eq(unlink(path), 0);
	ck_assert_int_eq(symlink(target, path), 0);
	ck_assert_int_eq(bm_listen_unix(path, 0, &fd, NULL), -EEXIST);
	ck_assert_int_eq(lstat(path, &st), 0);
	ck_assert(S_ISLNK(st.st_mode));
	tfd = open(target, O_RDONLY);
	ck_assert_int_eq(read(tfd, buf, sizeof buf), 4);
	ck_assert(memcmp(buf, "keep", 4) == 0);
	close(tfd);
	ck_assert_int_eq(stat(target, &st), 0);
	ck_assert_uint_eq(st.st_mode & 0777, 0644);
}
END_TEST

START_TEST(test_unix_path_too_long)
{
	char longer[200];
	int fd;

	memset(longer, 'a', sizeof longer - 1);
	longer[sizeof longer - 1] = '\0';
	ck_assert_int_eq(bm_listen_unix(longer, 0, &fd, NULL), -ENAMETOOLONG);
	ck_assert_ptr_nonnull(strstr(blockmirror_last_error(), "longer"));
}
END_TEST

/* Port 0 on 127.0.0.1 and ::1: the address read back is where a client
 * gets through. */
START_TEST(test_tcp)
{
	const char *host = _i ? "::1" : "127.0.0.1";
	struct sockaddr_storage ss;
	socklen_t sl = sizeof ss;
	char *address, want[80];
	int fd, c;

	ck_assert_int_eq(bm_listen_tcp(host, "0", SOCK_NONBLOCK, &fd,
				       &address), 0);
	ck_assert_int_eq(getsockname(fd, (struct sockaddr *)&ss, &sl), 0);
	if (_i) {
		struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&ss;

		snprintf(want, sizeof want, "tcp:[::1]:%u",
			 (unsigned)ntohs(s6->sin6_port));
	} else {
		struct sockaddr_in *s4 = (struct sockaddr_in *)&ss;

		snprintf(want, sizeof want, "tcp:127.0.0.1:%u",
			 (unsigned)ntohs(s4->sin_port));
	}
	ck_assert_str_eq(address, want);
	ck_assert_str_ne(strrchr(address, ':'), ":0");
	c = socket(ss.ss_family, SOCK_STREAM, 0);
	ck_assert_int_eq(connect(c, (struct sockaddr *)&ss, sl), 0);
	close(c);
	close(fd);
	free(address);
}
END_TEST

static Suite *
listen_suite(void)
{
	Suite *s = suite_create("listen");
	TCase *t = tcase_create("listen");

	tcase_add_checked_fixture(t, setup, teardown);
	tcase_set_timeout(t, 30);
	tcase_add_test(t, test_unix);
	tcase_add_test(t, test_unix_path_too_long);
	tcase_add_loop_test(t, test_tcp, 0, 2);
	suite_add_tcase(s, t);
	return s;
}

int
main(void)
{
	return run_suite(listen_suite()) ? EXIT_FAILURE : EXIT_SUCCESS;
}
