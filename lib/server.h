/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The NBD server's protocol pieces that tests and fuzzers reach without
 * sockets: address parsing, option and request validation, error
 * mapping.  None of them allocates, keeps state or touches the loop; all
 * of them treat their input as hostile and never read past `len`.  See
 * server.c for the server itself.
 */
#ifndef BM_SERVER_H
#define BM_SERVER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct blockmirror_disk;

/*
 * Does the NBD URI `uri` name one of `disk`'s own running exports (its
 * Unix socket, or its TCP port on an address of this machine)?  A move
 * must never write there (server-self.c).  Any thread.
 */
bool bm_server_is_own_export(struct blockmirror_disk *disk, const char *uri);

/* Limits the server enforces (docs/nbd-server.md). */
#define BM_SERVER_MAX_PAYLOAD (32u << 20)   /* largest READ/WRITE served */
#define BM_SERVER_MAX_DROP (64u << 20)      /* largest WRITE payload read
					       and dropped; above: disconnect */
#define BM_SERVER_MAX_OPTION (64u << 10)    /* largest option data parsed */
#define BM_SERVER_MAX_OPTION_DROP (1u << 20) /* largest option data dropped
						(ERR_TOO_BIG); above:
						disconnect */
#define BM_SERVER_PREFERRED_BLOCK 4096u

/* Wire sizes. */
#define BM_SERVER_REQUEST_SIZE 28

/* Command types, command flags and error values (doc/proto.md). */
enum {
	BM_NBD_CMD_READ = 0,
	BM_NBD_CMD_WRITE = 1,
	BM_NBD_CMD_DISC = 2,
	BM_NBD_CMD_FLUSH = 3,
	BM_NBD_CMD_TRIM = 4,
	BM_NBD_CMD_CACHE = 5,
	BM_NBD_CMD_WRITE_ZEROES = 6,
	BM_NBD_CMD_BLOCK_STATUS = 7,
};

enum {
	BM_NBD_CMD_FLAG_FUA = 1u << 0,
	BM_NBD_CMD_FLAG_NO_HOLE = 1u << 1,
	BM_NBD_CMD_FLAG_DF = 1u << 2,
	BM_NBD_CMD_FLAG_REQ_ONE = 1u << 3,
	BM_NBD_CMD_FLAG_FAST_ZERO = 1u << 4,
};

enum {
	BM_NBD_EPERM = 1,
	BM_NBD_EIO = 5,
	BM_NBD_ENOMEM = 12,
	BM_NBD_EINVAL = 22,
	BM_NBD_ENOSPC = 28,
	BM_NBD_EOVERFLOW = 75,
	BM_NBD_ENOTSUP = 95,
	BM_NBD_ESHUTDOWN = 108,
};

/* Transmission flags. */
enum {
	BM_NBD_FLAG_HAS_FLAGS = 1u << 0,
	BM_NBD_FLAG_READ_ONLY = 1u << 1,
	BM_NBD_FLAG_SEND_FLUSH = 1u << 2,
	BM_NBD_FLAG_SEND_FUA = 1u << 3,
	BM_NBD_FLAG_SEND_TRIM = 1u << 5,
	BM_NBD_FLAG_SEND_WRITE_ZEROES = 1u << 6,
	BM_NBD_FLAG_SEND_DF = 1u << 7,
	BM_NBD_FLAG_CAN_MULTI_CONN = 1u << 8,
	BM_NBD_FLAG_SEND_CACHE = 1u << 10,
	BM_NBD_FLAG_SEND_FAST_ZERO = 1u << 11,
};

/* A parsed "unix:PATH" or "tcp:HOST:PORT". */
struct bm_server_address {
	bool unix_socket;
	char path[108];  /* unix: fits sockaddr_un.sun_path with its NUL */
	char host[256];  /* tcp: without brackets; "127.0.0.1" if empty */
	char port[8];    /* tcp: decimal, 0..65535 */
};

/* 0, or -EINVAL with the error message set. */
int bm_server_parse_address(const char *address,
			    struct bm_server_address *out);

/* One transmission request header, decoded. */
struct bm_server_request {
	uint16_t flags;
	uint16_t type;
	uint64_t cookie;
	uint64_t offset;
	uint32_t length;
};

/* Decode 28 bytes.  0, or -EBADMSG for a bad magic (disconnect). */
int bm_server_decode_request(const uint8_t *hdr,
			     struct bm_server_request *req);

/* What a request is checked against. */
struct bm_server_export_state {
	uint64_t size;
	bool readonly;
	bool structured;      /* structured replies negotiated */
	bool base_allocation; /* base:allocation selected */
	bool dirty_bitmap;    /* a snapshot's qemu:dirty-bitmap: selected */
};

/*
 * 0 if the request may run, else the NBD error to answer it with (after
 * reading and dropping a WRITE's payload).  DISC always gives 0.
 */
uint32_t bm_server_check_request(const struct bm_server_export_state *e,
				 const struct bm_server_request *req);

/* The NBD error for a negative errno from the disk (EIO if unknown). */
uint32_t bm_server_nbd_error(int err);

/* Transmission flags of the export. */
uint16_t bm_server_tx_flags(bool readonly, bool structured);

/* NBD_OPT_INFO / NBD_OPT_GO data: u32 len, name, u16 n, n x u16. */
struct bm_server_info_request {
	const uint8_t *name;
	uint32_t name_len;
	uint16_t ninfos;
	const uint8_t *infos; /* ninfos big-endian u16 */
};

/* 0, or -EINVAL if the lengths do not add up. */
int bm_server_parse_info_request(const uint8_t *data, uint32_t len,
				 struct bm_server_info_request *out);

/* NBD_OPT_{LIST,SET}_META_CONTEXT data: u32 len, name, u32 n, queries. */
struct bm_server_meta_request {
	const uint8_t *name;
	uint32_t name_len;
	uint32_t queries;
	bool base_allocation; /* "base:allocation" was asked for */
	bool base_namespace;  /* "base:" (LIST: every base context) */
	bool extra;           /* the context `extra` was asked for by name */
	bool extra_listed;    /* a query that lists it: one of its prefixes
				 ending in ':' ("qemu:", "qemu:dirty-bitmap:") */
};

/*
 * 0, or -EINVAL if the lengths do not add up.  `extra` (may be NULL) is
 * one more context the export has, such as "qemu:dirty-bitmap:NAME": the
 * queries are matched against it too.
 */
int bm_server_parse_meta_request(const uint8_t *data, uint32_t len,
				 const char *extra,
				 struct bm_server_meta_request *out);

#endif /* BM_SERVER_H */
