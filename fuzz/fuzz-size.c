/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Fuzz target for sizes and counts on the command line (tools/size.c):
 * the input, as a string, goes through parse_size and parse_uint, and
 * what parses is printed back with human_size.  The parsers must never
 * read past the string, accept a value they cannot represent, or give a
 * size above INT64_MAX.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "size.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static const uint64_t maxes[] = { 1, 64, 65536, UINT32_MAX,
					  UINT64_MAX };
	char *s = malloc(size + 1);
	char buf[32];
	uint64_t v;

	if (!s)
		return 0;
	memcpy(s, data, size);
	s[size] = '\0';
	if (parse_size(s, &v) == 0) {
		if (v > INT64_MAX)
			abort();
		human_size(v, buf, sizeof buf);
	}
	for (size_t i = 0; i < sizeof maxes / sizeof maxes[0]; i++)
		if (parse_uint(s, maxes[i], &v) && (v == 0 || v > maxes[i]))
			abort();
	free(s);
	return 0;
}
