/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The error model: every public call that fails records a message for the
 * calling thread (blockmirror_last_error), starting with the public
 * function's name, and returns a negative errno.  Internal code builds the
 * message with bm_error(), which also returns the negative errno so that
 * `return bm_error(-ENOENT, "%s: ...", name);` reads as one step.
 *
 * Internal functions record the detail (which file, which offset); the
 * public entry point prefixes its own name when it returns (bm_api_fail).
 *
 * Logging goes to the callback set with blockmirror_set_log, never to
 * stdout or stderr.
 */
#ifndef BM_ERRORS_H
#define BM_ERRORS_H

#include <blockmirror/blockmirror.h>

/*
 * Set this thread's error message (printf format) and errno.  err is a
 * negative errno; returns err.  The message should name the object (file,
 * URI) and the problem; strerror(-err) is not appended automatically.
 * The arguments may point into the current message (it is formatted
 * aside first), but to add to a message use bm_error_prefix.
 */
int bm_error(int err, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

/*
 * Put a printf-formatted prefix before this thread's message (strerror(-err)
 * if there is none), set errno to err and return err:
 * `return bm_error_prefix(r, "%s: backing file: ", name);`.  Where the
 * whole does not fit, the end of the message is cut.
 */
int bm_error_prefix(int err, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

/* Clear this thread's error (at the start of a public call). */
void bm_error_clear(void);

/*
 * Prefix "func: " to this thread's message (or set "func: strerror" if no
 * message was recorded) and return err.  Called by public functions on
 * their way out.
 */
int bm_api_fail(const char *func, int err);

void bm_log(enum blockmirror_log_level level, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

#define bm_debug(...) bm_log(BLOCKMIRROR_LOG_DEBUG, __VA_ARGS__)
#define bm_info(...) bm_log(BLOCKMIRROR_LOG_INFO, __VA_ARGS__)
#define bm_warn(...) bm_log(BLOCKMIRROR_LOG_WARNING, __VA_ARGS__)

#endif /* BM_ERRORS_H */
