/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Small helpers every lib/ file may use: export marking, container_of,
 * names of enum values, the size check of public structures,
 * overflow-checked offset
 * arithmetic, big-endian accessors.
 * Every offset and length that comes from a file or the network goes
 * through the checked helpers before it is used.
 */
#ifndef BM_INTERNAL_H
#define BM_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define BM_EXPORT __attribute__((visibility("default")))

#define bm_container_of(ptr, type, member) \
	((type *)(void *)((char *)(ptr) - offsetof(type, member)))

#define BM_ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

/* table[i] of a table of names indexed by an enum; NULL out of range. */
#define BM_NAME_OF(table, i) \
	((unsigned)(i) < BM_ARRAY_SIZE(table) ? (table)[i] : NULL)

/* Does the caller's structure at p (size set by the caller) reach member?
 * (The public option and result structures grow at the end.) */
#define BM_SIZE_COVERS(p, type, member) \
	((p) && (p)->size >= offsetof(type, member) + sizeof((p)->member))

#define BM_MIN(a, b) ((a) < (b) ? (a) : (b))
#define BM_MAX(a, b) ((a) > (b) ? (a) : (b))

#define BM_KiB (UINT64_C(1) << 10)
#define BM_MiB (UINT64_C(1) << 20)
#define BM_GiB (UINT64_C(1) << 30)

/* a + b into *r; true if it overflowed. */
static inline bool
bm_add_overflow(uint64_t a, uint64_t b, uint64_t *r)
{
	return __builtin_add_overflow(a, b, r);
}

static inline bool
bm_mul_overflow(uint64_t a, uint64_t b, uint64_t *r)
{
	return __builtin_mul_overflow(a, b, r);
}

/* Does [offset, offset + length) lie within [0, size)? */
static inline bool
bm_range_ok(uint64_t offset, uint64_t length, uint64_t size)
{
	uint64_t end;

	return !bm_add_overflow(offset, length, &end) && end <= size;
}

static inline bool
bm_is_power_of_2(uint64_t v)
{
	return v && !(v & (v - 1));
}

static inline uint64_t
bm_round_up(uint64_t v, uint64_t align)
{
	return (v + align - 1) & ~(align - 1);
}

static inline uint64_t
bm_round_down(uint64_t v, uint64_t align)
{
	return v & ~(align - 1);
}

/* Big-endian (network and on-disk) byte order. */
static inline void
bm_put_be16(uint8_t *p, uint16_t v)
{
	p[0] = (uint8_t)(v >> 8);
	p[1] = (uint8_t)v;
}

static inline void
bm_put_be32(uint8_t *p, uint32_t v)
{
	bm_put_be16(p, (uint16_t)(v >> 16));
	bm_put_be16(p + 2, (uint16_t)v);
}

static inline void
bm_put_be64(uint8_t *p, uint64_t v)
{
	bm_put_be32(p, (uint32_t)(v >> 32));
	bm_put_be32(p + 4, (uint32_t)v);
}

static inline uint16_t
bm_get_be16(const uint8_t *p)
{
	return (uint16_t)(p[0] << 8 | p[1]);
}

static inline uint32_t
bm_get_be32(const uint8_t *p)
{
	return (uint32_t)bm_get_be16(p) << 16 | bm_get_be16(p + 2);
}

static inline uint64_t
bm_get_be64(const uint8_t *p)
{
	return (uint64_t)bm_get_be32(p) << 32 | bm_get_be32(p + 4);
}

#endif /* BM_INTERNAL_H */
