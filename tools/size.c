/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Numbers on the command line.  Sizes are parsed strictly: "1.5G", "-1",
 * "10X" and values that overflow are errors, never silently truncated.
 */
#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "size.h"

int
parse_size(const char *s, uint64_t *out)
{
	static const char units[] = "KMGTPE";
	uint64_t v = 0, mul = 1;
	const char *p = s;
	const char *u;

	if (!s || !isdigit((unsigned char)*p))
		return -EINVAL;
	for (; isdigit((unsigned char)*p); p++) {
		if (__builtin_mul_overflow(v, 10, &v) ||
		    __builtin_add_overflow(v, (uint64_t)(*p - '0'), &v))
			return -ERANGE;
	}
	if (*p && (u = strchr(units, toupper((unsigned char)*p)))) {
		for (int i = 0; i <= u - units; i++)
			mul <<= 10;
		p++;
		if (strcasecmp(p, "iB") == 0 || strcasecmp(p, "B") == 0)
			p += strlen(p);
	} else if (strcasecmp(p, "B") == 0) {
		p++;
	}
	if (*p)
		return -EINVAL;
	if (__builtin_mul_overflow(v, mul, &v) || v > INT64_MAX)
		return -ERANGE;
	*out = v;
	return 0;
}

bool
parse_uint(const char *s, uint64_t max, uint64_t *out)
{
	char *end;
	unsigned long long v;

	if (!isdigit((unsigned char)*s))
		return false;
	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno || *end || v == 0 || v > max)
		return false;
	*out = v;
	return true;
}

const char *
human_size(uint64_t bytes, char *buf, size_t len)
{
	static const char *const unit[] = { "B", "KiB", "MiB", "GiB", "TiB",
					    "PiB", "EiB" };
	double v = (double)bytes;
	int i = 0;

	while (v >= 1024 && i < 6) {
		v /= 1024;
		i++;
	}
	if (i == 0)
		snprintf(buf, len, "%" PRIu64 " B", bytes);
	else
		snprintf(buf, len, "%.1f %s", v, unit[i]);
	return buf;
}

