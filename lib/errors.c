/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Per-thread last error and the process-wide log callback.
 *
 * The message lives in a thread-local fixed buffer, so recording an error
 * never allocates and cannot itself fail; messages longer than the buffer
 * are cut.  Every message is formatted in a buffer on the stack and then
 * copied in, so an argument may point into the current message: adding
 * context to it (bm_error_prefix, or passing blockmirror_last_error() to
 * bm_error) never formats a buffer into itself.  The log callback is read and written under a mutex so that
 * blockmirror_set_log may race with logging threads.
 */
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "errors.h"
#include "internal.h"

#define BM_ERROR_MAX 1024

static _Thread_local char error_msg[BM_ERROR_MAX];
static _Thread_local int error_errno;

static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;
static blockmirror_log_fn log_fn;
static void *log_data;
static enum blockmirror_log_level log_max = BLOCKMIRROR_LOG_WARNING;
static int log_env = -1; /* BLOCKMIRROR_DEBUG, read once */

/* Replace the message by `msg`, which may be anywhere (even in it). */
static void
set_message(int err, const char *msg)
{
	size_t n = strlen(msg);

	if (n >= sizeof error_msg)
		n = sizeof error_msg - 1;
	memmove(error_msg, msg, n);
	error_msg[n] = '\0';
	error_errno = err < 0 ? -err : err;
}

int
bm_error(int err, const char *fmt, ...)
{
	char tmp[BM_ERROR_MAX];
	va_list ap;

	/* Formatted aside: an argument may be the current message (a
	 * caller passing blockmirror_last_error() on). */
	va_start(ap, fmt);
	vsnprintf(tmp, sizeof tmp, fmt, ap);
	va_end(ap);
	set_message(err, tmp);
	bm_debug("error: %s", error_msg);
	return err;
}

int
bm_error_prefix(int err, const char *fmt, ...)
{
	char tmp[BM_ERROR_MAX];
	size_t n;
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(tmp, sizeof tmp, fmt, ap);
	va_end(ap);
	n = strlen(tmp);
	snprintf(tmp + n, sizeof tmp - n, "%s",
		 error_msg[0] ? error_msg : strerror(err < 0 ? -err : err));
	set_message(err, tmp);
	bm_debug("error: %s", error_msg);
	return err;
}

void
bm_error_clear(void)
{
	error_msg[0] = '\0';
	error_errno = 0;
}

int
bm_api_fail(const char *func, int err)
{
	char tmp[BM_ERROR_MAX + 128];

	if (error_msg[0] == '\0' || error_errno != -err)
		snprintf(tmp, sizeof tmp, "%s: %s", func, strerror(-err));
	else
		snprintf(tmp, sizeof tmp, "%s: %s", func, error_msg);
	set_message(err, tmp);
	return err;
}

BM_EXPORT const char *
blockmirror_last_error(void)
{
	return error_msg[0] ? error_msg : NULL;
}

BM_EXPORT int
blockmirror_last_errno(void)
{
	return error_errno;
}

BM_EXPORT void
blockmirror_set_log(blockmirror_log_fn fn, void *user_data,
		    enum blockmirror_log_level max_level)
{
	pthread_mutex_lock(&log_lock);
	log_fn = fn;
	log_data = user_data;
	log_max = max_level;
	pthread_mutex_unlock(&log_lock);
}

void
bm_log(enum blockmirror_log_level level, const char *fmt, ...)
{
	char msg[BM_ERROR_MAX];
	blockmirror_log_fn fn;
	void *data;
	enum blockmirror_log_level max;
	va_list ap;

	pthread_mutex_lock(&log_lock);
	if (log_env < 0) {
		const char *e = getenv("BLOCKMIRROR_DEBUG");

		log_env = e && *e && strcmp(e, "0") != 0;
	}
	fn = log_fn;
	data = log_data;
	max = log_env ? BLOCKMIRROR_LOG_DEBUG : log_max;
	pthread_mutex_unlock(&log_lock);

	if (!fn || level > max)
		return;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	fn(data, level, msg);
}
