/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Freeze and thaw commands (hooks.c).
 */
#ifndef BMIRROR_HOOKS_H
#define BMIRROR_HOOKS_H

/* Run `cmd` with sh -c, at most timeout_s seconds (then it is killed,
 * with its process group): 0 if it exited 0; otherwise -1, with one line
 * on stderr naming `what` and why.  Safe from any thread (fork, then
 * only exec in the child). */
int run_hook(const char *what, const char *cmd, unsigned timeout_s);

#endif /* BMIRROR_HOOKS_H */
