/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Thin layer over libxxhash's XXH3-128 so the rest of the library sees one
 * digest type in canonical byte order and never xxHash's host-order
 * structs.
 */
#include <xxhash.h>

#include "hash.h"

_Static_assert(sizeof(XXH128_canonical_t) == sizeof(struct bm_digest),
	       "digest size");

void
bm_hash_buffer(const void *buf, size_t len, struct bm_digest *out)
{
	XXH128_hash_t h = XXH3_128bits(buf, len);

	XXH128_canonicalFromHash((XXH128_canonical_t *)out->bytes, h);
}

struct bm_hash_stream *
bm_hash_stream_new(void)
{
	XXH3_state_t *st = XXH3_createState();

	if (st)
		XXH3_128bits_reset(st);
	return (struct bm_hash_stream *)st;
}

void
bm_hash_stream_add(struct bm_hash_stream *s, const void *buf, size_t len)
{
	XXH3_128bits_update((XXH3_state_t *)s, buf, len);
}

void
bm_hash_stream_end(struct bm_hash_stream *s, struct bm_digest *out)
{
	XXH128_hash_t h = XXH3_128bits_digest((XXH3_state_t *)s);

	XXH128_canonicalFromHash((XXH128_canonical_t *)out->bytes, h);
}

void
bm_hash_stream_free(struct bm_hash_stream *s)
{
	if (s)
		XXH3_freeState((XXH3_state_t *)s);
}

void
bm_digest_hex(const struct bm_digest *d, char out[33])
{
	static const char hex[] = "0123456789abcdef";

	for (int i = 0; i < 16; i++) {
		out[2 * i] = hex[d->bytes[i] >> 4];
		out[2 * i + 1] = hex[d->bytes[i] & 15];
	}
	out[32] = '\0';
}
