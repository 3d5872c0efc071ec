/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Fault injection for tests: a store that wraps another and delays,
 * fails or holds its requests by rules the test sets.  A test registers
 * rules under an image name; opening that name (bm_image_open or
 * bm_image_create) then wraps its store.  Nothing is registered outside
 * tests, so the lookup costs one comparison under a mutex at open time
 * and nothing on the I/O path of real images.
 *
 * Rules are read on the loop thread and written by the test: the fields
 * are atomics.
 */
#ifndef BM_FAULT_H
#define BM_FAULT_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "store.h"

struct bm_fault_rules {
	/* Every read / write (and zero, discard) waits this long first. */
	_Atomic uint64_t read_delay_ns;
	_Atomic uint64_t write_delay_ns;
	/* The next write (or zero, discard) alone waits this long; the
	 * next read likewise. */
	_Atomic uint64_t next_write_delay_ns;
	_Atomic uint64_t next_read_delay_ns;
	/* Reads overlapping [read_err_offset, +read_err_length) fail with
	 * read_errno, read_err_count times (-1: always). */
	_Atomic int read_errno;
	_Atomic uint64_t read_err_offset;
	_Atomic uint64_t read_err_length;
	_Atomic int read_err_count;
	/* After write_err_after successful writes, writes fail with
	 * write_errno, write_err_count times (-1: always).  Flushes too
	 * when fail_flush. */
	_Atomic int write_errno;
	_Atomic uint64_t write_err_after;
	_Atomic int write_err_count;
	_Atomic bool fail_flush;
	/* Flushes alone fail with flush_errno, flush_err_count times (-1:
	 * always), and block status requests with extents_errno likewise. */
	_Atomic int flush_errno;
	_Atomic int flush_err_count;
	_Atomic int extents_errno;
	_Atomic int extents_err_count;
	/* Hold every request until cleared (a hung server or disk); with
	 * hang_flush only flushes, except that the next pass_flushes
	 * flushes still go through (each one that does counts it down). */
	_Atomic bool hang;
	_Atomic bool hang_flush;
	_Atomic int pass_flushes;
	/* Counters. */
	_Atomic uint64_t reads;
	_Atomic uint64_t writes;
	_Atomic uint64_t failures;
	_Atomic uint64_t flushes;
	_Atomic uint64_t submitted;     /* requests of any kind received */
};

/* Register rules for an image name (until unregistered).  0 or -ENOMEM. */
int bm_fault_register(const char *name, struct bm_fault_rules *rules);
void bm_fault_unregister(const char *name);

/* If `name` is registered, wrap *store (consumed) in a fault store. */
int bm_fault_maybe_wrap(const char *name, struct bm_store **store);

/*
 * The one place where test wrappers get at a store: called wherever an
 * image's store or a job's state file is opened, with the name it was
 * opened by.  First the hook a test may install (the crash recorder,
 * which must see what reaches the real store), then the fault store.
 */
extern int (*bm_store_wrap_hook)(const char *name, struct bm_store **store);
int bm_store_wrap(const char *name, struct bm_store **store);

#endif /* BM_FAULT_H */
