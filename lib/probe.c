/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Format probing: signatures only, no parsing.  A truncated header that
 * carries a signature is still that format, so that opening it fails in
 * the format's driver with a message about the broken header rather than
 * silently exposing it as raw data.
 */
#include <string.h>

#include "probe.h"

static const unsigned char qcow2_magic[4] = { 'Q', 'F', 'I', 0xfb };
static const char vhdx_magic[8] = { 'v', 'h', 'd', 'x', 'f', 'i', 'l', 'e' };

enum blockmirror_format
bm_probe(const void *buf, size_t len)
{
	if (len >= sizeof qcow2_magic &&
	    memcmp(buf, qcow2_magic, sizeof qcow2_magic) == 0)
		return BLOCKMIRROR_FORMAT_QCOW2;
	if (len >= sizeof vhdx_magic &&
	    memcmp(buf, vhdx_magic, sizeof vhdx_magic) == 0)
		return BLOCKMIRROR_FORMAT_VHDX;
	return BLOCKMIRROR_FORMAT_RAW;
}
