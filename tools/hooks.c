/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The operator's freeze and thaw commands (bmirror backup --freeze-cmd,
 * bmirror replicate --freeze-cmd): run with sh -c, bounded in time.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "bmirror.h"
#include "hooks.h"

/* Run `cmd` with sh -c, at most timeout_s seconds (then it is killed,
 * with its process group): 0 if it exited 0. */
int
run_hook(const char *what, const char *cmd, unsigned timeout_s)
{
	struct timespec t0, now, nap = { 0, 10 * 1000 * 1000 };
	int status;
	pid_t pid;

	fflush(NULL);
	pid = fork();
	if (pid < 0) {
		tool_error("%s command: fork: %s", what, strerror(errno));
		return -1;
	}
	if (pid == 0) {
		setpgid(0, 0);
		execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
		_exit(127);
	}
	setpgid(pid, pid);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (;;) {
		pid_t r = waitpid(pid, &status, WNOHANG);

		if (r == pid)
			break;
		clock_gettime(CLOCK_MONOTONIC, &now);
		if (now.tv_sec - t0.tv_sec >= (time_t)timeout_s) {
			kill(-pid, SIGKILL);
			waitpid(pid, &status, 0);
			tool_error("%s command did not finish in %u s; killed",
				   what, timeout_s);
			return -1;
		}
		nanosleep(&nap, NULL);
	}
	if (!WIFEXITED(status) || WEXITSTATUS(status)) {
		tool_error("%s command failed (%s %d)", what,
			   WIFEXITED(status) ? "exit status" : "signal",
			   WIFEXITED(status) ? WEXITSTATUS(status)
					     : WTERMSIG(status));
		return -1;
	}
	return 0;
}

