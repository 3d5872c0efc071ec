/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Change tracking of a disk: what the rest of the library asks of it
 * (checkpoint.c).
 */
#ifndef BM_CHECKPOINT_H
#define BM_CHECKPOINT_H

#include <stdint.h>

struct blockmirror_disk;

/* The record's granularity, 0 if the disk does not track changes. */
uint64_t bm_checkpoint_granularity(struct blockmirror_disk *disk);

#endif /* BM_CHECKPOINT_H */
