/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The crash-resumable state of a mirror job (docs/state.md).
 *
 * Two halves.  The format half (state.c) is pure: it turns a buffer into a
 * struct and back and checks every field and checksum, with no I/O, so the
 * unit tests and a fuzzer call it directly.  The job half (state-io.c)
 * keeps the file up to date while a job runs: it marks regions dirty on
 * disk before guest writes reach them and clears them once both images
 * hold them durably.
 */
#ifndef BM_STATE_H
#define BM_STATE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define BM_STATE_FILE "state"
#define BM_STATE_RECORD_SIZE 4096u     /* the move record, at offset 0 */
#define BM_STATE_SLOT_HEADER 64u
#define BM_STATE_MAX_NAME 1024u
#define BM_STATE_MIN_REGION (UINT64_C(4) << 20)
#define BM_STATE_MAX_REGIONS (UINT64_C(1) << 27) /* 16 MiB of bitmap */

enum bm_state_phase {
	BM_STATE_PHASE_COPYING = 1, /* the source is authoritative */
};

/* What the move is: written once when it starts. */
struct bm_state_record {
	uint64_t disk_size;
	uint64_t granularity;      /* the job's chunk size */
	uint64_t region_size;      /* one bit of the persisted bitmap */
	uint32_t mode;             /* enum blockmirror_mode */
	uint32_t src_format;       /* enum blockmirror_format */
	uint32_t dst_format;
	char *source;              /* owned; NUL-terminated */
	char *destination;
};

/* A whole state file, parsed. */
struct bm_state {
	struct bm_state_record rec;
	uint64_t record_hash;      /* binds the bitmap slots to the record */
	uint64_t regions;
	uint64_t seq;              /* of the slot in force */
	uint32_t phase;
	uint64_t *words;           /* owned; bit r: region r is dirty */
	uint64_t regions_dirty;
};

/* Bytes of one bitmap slot for `regions` regions (a multiple of 4096). */
size_t bm_state_slot_size(uint64_t regions);

/* Regions of `region_size` bytes in a disk of `disk_size` bytes. */
uint64_t bm_state_regions(uint64_t disk_size, uint64_t region_size);

/*
 * Encode the record into buf (BM_STATE_RECORD_SIZE bytes).  0, or -EINVAL
 * for a record that could not be read back (names too long, sizes out of
 * range).  *hash gets the record's checksum, which every slot repeats.
 */
int bm_state_record_encode(const struct bm_state_record *r, uint8_t *buf,
			   uint64_t *hash);

/* Parse and check a record.  0 or -EBADMSG (bm_error says why).  On
 * success r->source and r->destination are the caller's. */
int bm_state_record_decode(const uint8_t *buf, size_t len,
			   struct bm_state_record *r, uint64_t *hash);

void bm_state_record_free(struct bm_state_record *r);

/* Encode a slot: header, then the bitmap `words` (regions bits). */
void bm_state_slot_encode(uint8_t *buf, uint64_t seq, uint32_t phase,
			  uint64_t record_hash, uint64_t region_size,
			  uint64_t regions, const uint64_t *words);

/*
 * Parse and check one slot against its record.  0 and *seq, *phase and
 * words (regions bits, the caller's array) filled; -EBADMSG otherwise.
 */
int bm_state_slot_decode(const uint8_t *buf, size_t len,
			 uint64_t record_hash, uint64_t region_size,
			 uint64_t regions, uint64_t *seq, uint32_t *phase,
			 uint64_t *words);

/*
 * Parse a whole state file: the record, then the valid slot with the
 * higher sequence number.  0 with *st filled (free with bm_state_free);
 * -EBADMSG if the record is bad (st->rec empty), -EUCLEAN if the record is
 * good but no slot is (st->rec filled, st->words NULL).
 */
int bm_state_parse(const uint8_t *buf, size_t len, struct bm_state *st);

void bm_state_free(struct bm_state *st);

/* ---- I/O (state-io.c) ------------------------------------------------ */

/* Read and parse DIR/state: as bm_state_parse, or -ENOENT. */
int bm_state_load(const char *dir, struct bm_state *st);

/* Remove DIR/state and DIR, durably.  0 if there was nothing. */
int bm_state_remove(const char *dir);
/* A directory a move was killed in before its state file was in place
 * (empty, or holding only the file's temporary): remove it.  0 when
 * there is none, or when it holds anything else (left alone). */
int bm_state_remove_unborn(const char *dir);

struct bm_job;
struct bm_mirror_write;

/* job.c, on the loop before the job begins: create (or, with
 * BLOCKMIRROR_JOB_RESUME, take over) the state in opt.state_dir. */
int bm_state_job_start(struct bm_job *job);
/* job.c: the job has ended; the state goes (a crash is the only way to
 * leave it behind). */
void bm_state_job_end(struct bm_job *job);
/* job.c: free what bm_state_job_start made. */
void bm_state_job_free(struct bm_job *job);

/* mirror.c: hold a guest write until every region it touches is dirty on
 * disk; true if held (it re-enters bm_mirror_guest_write later). */
bool bm_state_hold_write(struct bm_job *job, struct bm_mirror_write *req);
/* mirror.c, after a map window is applied: a resumed job leaves clean
 * what the state says the destination holds. */
void bm_state_clip_map(struct bm_job *job);
/* mirror.c, every tick: clear regions both images hold durably. */
void bm_state_tick(struct bm_job *job);
/* pivot.c: state I/O in flight; the ending waits for it. */
/* A forced cancel gave up waiting: cancel the state file's requests
 * (they fail, and persistence is given up). */
void bm_state_cancel(struct bm_job *job);
bool bm_state_busy(struct bm_job *job);

/* Tests: called on the loop when slot `seq` has become durable, before
 * the writes that waited for it go on. */
extern void (*bm_state_hook)(struct bm_job *job, uint64_t seq);

#endif /* BM_STATE_H */
