/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * CRC-32C.  Two implementations of the same function: the SSE4.2 crc32
 * instruction where the CPU has it (8 bytes per step), and a portable
 * byte-at-a-time table otherwise.  The choice is made once, on the first
 * call (pthread_once); both give identical results (the unit test checks the standard
 * test vector "123456789" -> 0xE3069283 through the public entry).
 *
 * The pre- and post-inversion live in bm_crc32c so that chaining calls
 * (crc = bm_crc32c(crc, ...)) composes like one call over the
 * concatenated buffers.
 */
#include <pthread.h>
#include <stdbool.h>
#include <string.h>

#include "crc32c.h"

#define CRC32C_POLY 0x82F63B78u

static uint32_t table[256];
static int state;               /* 1 table, 2 sse4.2 */
static pthread_once_t once = PTHREAD_ONCE_INIT;

static void
make_table(void)
{
	for (uint32_t i = 0; i < 256; i++) {
		uint32_t c = i;

		for (int k = 0; k < 8; k++)
			c = c & 1 ? (c >> 1) ^ CRC32C_POLY : c >> 1;
		table[i] = c;
	}
}

static uint32_t
crc_table(uint32_t crc, const uint8_t *p, size_t len)
{
	while (len--)
		crc = table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
	return crc;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2"))) static uint32_t
crc_sse42(uint32_t crc, const uint8_t *p, size_t len)
{
	uint64_t c;

	while (len && ((uintptr_t)p & 7)) {
		crc = __builtin_ia32_crc32qi(crc, *p++);
		len--;
	}
	c = crc;
	while (len >= 8) {
		uint64_t v;

		memcpy(&v, p, 8);
		c = __builtin_ia32_crc32di(c, v);
		p += 8;
		len -= 8;
	}
	crc = (uint32_t)c;
	while (len--)
		crc = __builtin_ia32_crc32qi(crc, *p++);
	return crc;
}
#endif

static void
choose(void)
{
	make_table();
	state = 1;
#if defined(__x86_64__)
	__builtin_cpu_init();
	if (__builtin_cpu_supports("sse4.2"))
		state = 2;
#endif
}

uint32_t
bm_crc32c(uint32_t crc, const void *buf, size_t len)
{
	pthread_once(&once, choose);
	crc = ~crc;
#if defined(__x86_64__)
	if (state == 2)
		return ~crc_sse42(crc, buf, len);
#endif
	return ~crc_table(crc, buf, len);
}
