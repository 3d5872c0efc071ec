/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Format probing from the first bytes of an image.  Pure: takes a buffer.
 *
 * qcow2 starts with "QFI\xfb"; VHDX with the file type identifier
 * "vhdxfile".  Anything else is raw.  Probing only ever reads: an image
 * whose content merely looks like a format is never written as raw unless
 * the caller named raw (see image.c).
 */
#ifndef BM_PROBE_H
#define BM_PROBE_H

#include <stddef.h>

#include <blockmirror/blockmirror.h>

/* How many leading bytes probing looks at. */
#define BM_PROBE_SIZE 512

enum blockmirror_format bm_probe(const void *buf, size_t len);

#endif /* BM_PROBE_H */
