/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Parsing and printing sizes and counts for the command line. */
#ifndef BMIRROR_SIZE_H
#define BMIRROR_SIZE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/*
 * Parse a size: digits with an optional suffix K, M, G, T, P or E (powers
 * of 1024, case-insensitive, optionally followed by "iB" or "B"), or "B"
 * for bytes.  At most INT64_MAX.  Returns 0 and stores the value, or
 * -EINVAL (not a size) / -ERANGE (too large).
 */
int parse_size(const char *s, uint64_t *out);

/* Parse a decimal integer from 1 to max. */
bool parse_uint(const char *s, uint64_t max, uint64_t *out);

/* "1.5 GiB" into buf. */
const char *human_size(uint64_t bytes, char *buf, size_t len);

#endif /* BMIRROR_SIZE_H */
