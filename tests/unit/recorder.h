/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * A crash recorder for tests, in the spirit of dm-log-writes and
 * CrashMonkey.
 *
 * Recording: every store the library opens under a root directory (the
 * images and a job's state file, through bm_store_wrap_hook) is wrapped
 * by a store that logs each write (offset, data), write-zeroes, discard
 * and flush, with FUA, in submission and completion order; every step of
 * lib/durable.c (bm_durable_hook) logs the name operations (create,
 * symlink, rename, unlink, mkdir, rmdir) and file and directory fsyncs.
 * The test adds its own events (guest acknowledgements) to the same
 * sequence, so that "before" means the same thing for all of them.
 *
 * The model of durability (POSIX, strict):
 *  - a write is durable once it completed with FUA (from a file store,
 *    only if an fdatasync was issued for it: bm_file_datasyncs), or once
 *    a flush or fsync of its file completed that was issued after the
 *    write completed;
 *  - a write not yet durable at the crash (completed or still in flight)
 *    may be persisted, not persisted, or torn (a subset of its 4 KiB
 *    blocks);
 *  - a name operation is durable once its directory was fsynced after
 *    it; the name operations of a directory not yet durable are persisted
 *    as a prefix (none, some, or all, in order).  A file created without
 *    a hook event (O_CREAT) shows up as a create when it is first opened.
 *
 * Replaying: rec_materialize() wipes the root and writes there the files,
 * directories and symlinks a crash right before event `k` may have left,
 * for a variant: only what is durable, everything that happened (what a
 * SIGKILL leaves), or a random choice.  Paths are recorded absolute, so
 * the replay happens at the root's own path.
 *
 * One recording at a time (the hooks are global).  Not thread-safe for
 * the replay side; the recording side takes a mutex.
 */
#ifndef BM_TEST_RECORDER_H
#define BM_TEST_RECORDER_H

#include <stdbool.h>
#include <stdint.h>

enum rec_variant {
	REC_DURABLE_ONLY = 0, /* nothing that was not durable */
	REC_ALL = 1,          /* everything issued (a SIGKILL) */
	REC_RANDOM = 2,       /* a random subset, torn writes */
	REC_VARIANTS = 3,
};

/* Scan `root` (an absolute path) as the durable initial state and install
 * the hooks.  0 or -errno. */
int rec_start(const char *root);

/* Uninstall the hooks; the recording stays for replaying. */
void rec_stop(void);

/* Free the recording. */
void rec_free(void);

/* Log a test event (a guest acknowledgement...); returns its sequence
 * number.  Any thread. */
uint64_t rec_event(const char *fmt, ...)
	__attribute__((format(printf, 1, 2)));

/* The next sequence number (== the number of events so far). */
uint64_t rec_now(void);

/* Is event `seq` a flush point (a flush or fsync done, a name op)? */
bool rec_is_flush_point(uint64_t seq);

/* A one-line description of event `seq`. */
const char *rec_describe(uint64_t seq);

/* Counters of what was recorded, for the report. */
void rec_stats(uint64_t *writes, uint64_t *flushes, uint64_t *names,
	       uint64_t *bytes, uint64_t *fua_dropped);

/*
 * Rebuild under the root what a crash right before event `k` may have
 * left (events 0..k-1 happened), for `variant`, drawing choices from
 * *rng.  Crash points must come in increasing k between rec_start and
 * the next rec_rewind.  0 or -errno.
 */
int rec_materialize(uint64_t k, enum rec_variant variant, uint64_t *rng);

/* Allow rec_materialize from k = 0 again. */
void rec_rewind(void);

/* A splitmix64 step: the tests' random numbers. */
uint64_t rec_rand(uint64_t *state);

/*
 * Word i of what a test writes as write `id` into unit `unit` (a sector
 * or a block) under its own `magic`: read back, a unit says which write
 * it holds (the id sits above bit 24, the unit below).
 */
static inline uint64_t
rec_pattern_word(uint64_t magic, uint64_t id, uint64_t unit, unsigned i)
{
	return (magic ^ (id << 24) ^ unit) + (uint64_t)i * 0x9e3779b97f4a7c15ull;
}

#endif /* BM_TEST_RECORDER_H */
