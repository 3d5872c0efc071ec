/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), the checksum of
 * every VHDX structure: initial value 0xFFFFFFFF, final xor 0xFFFFFFFF.
 */
#ifndef BM_CRC32C_H
#define BM_CRC32C_H

#include <stddef.h>
#include <stdint.h>

/*
 * Continue a CRC-32C over buf.  Start with crc = 0; the result of one
 * call can be passed to the next to checksum discontiguous pieces.
 * Thread-safe; no setup needed.
 */
uint32_t bm_crc32c(uint32_t crc, const void *buf, size_t len);

#endif /* BM_CRC32C_H */
