/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * XXH3-128 over guest data.  Digests are compared and stored in xxHash's
 * canonical (big-endian) byte order, so that a digest written by one host
 * reads the same on another.
 */
#ifndef BM_HASH_H
#define BM_HASH_H

#include <stddef.h>
#include <stdint.h>

struct bm_digest {
	uint8_t bytes[16]; /* canonical XXH128 */
};

/* Digest of one buffer. */
void bm_hash_buffer(const void *buf, size_t len, struct bm_digest *out);

/*
 * Streaming digest of a sequence of digests (the whole-image digest that
 * `verify` prints is the digest of its chunk digests, in order).
 */
struct bm_hash_stream;
struct bm_hash_stream *bm_hash_stream_new(void);
void bm_hash_stream_add(struct bm_hash_stream *s, const void *buf, size_t len);
void bm_hash_stream_end(struct bm_hash_stream *s, struct bm_digest *out);
void bm_hash_stream_free(struct bm_hash_stream *s);

/* Lower-case hex, NUL-terminated: out must hold 33 bytes. */
void bm_digest_hex(const struct bm_digest *d, char out[33]);

#endif /* BM_HASH_H */
