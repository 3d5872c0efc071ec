/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The NBD server's private parts, shared by server.c (sockets,
 * connections, transmission, start and stop), server-options.c (option
 * haggling) and server-tls.c (GnuTLS).  See server.c for the design.
 */
#ifndef BM_SERVER_INT_H
#define BM_SERVER_INT_H

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#include <gnutls/gnutls.h>

#include "disk.h"
#include "errors.h"
#include "internal.h"
#include "loop.h"
#include "server.h"

/* ---- the protocol's numbers ------------------------------------------- */

#define NBD_MAGIC UINT64_C(0x4e42444d41474943)
#define NBD_IHAVEOPT UINT64_C(0x49484156454F5054)
#define NBD_REP_MAGIC UINT64_C(0x3e889045565a9)
#define NBD_REQUEST_MAGIC UINT32_C(0x25609513)
#define NBD_SIMPLE_REPLY_MAGIC UINT32_C(0x67446698)
#define NBD_STRUCTURED_REPLY_MAGIC UINT32_C(0x668e33ef)

#define NBD_FLAG_FIXED_NEWSTYLE 1u
#define NBD_FLAG_NO_ZEROES 2u
#define NBD_FLAG_C_FIXED_NEWSTYLE 1u
#define NBD_FLAG_C_NO_ZEROES 2u

enum {
	NBD_OPT_EXPORT_NAME = 1,
	NBD_OPT_ABORT = 2,
	NBD_OPT_LIST = 3,
	NBD_OPT_STARTTLS = 5,
	NBD_OPT_INFO = 6,
	NBD_OPT_GO = 7,
	NBD_OPT_STRUCTURED_REPLY = 8,
	NBD_OPT_LIST_META_CONTEXT = 9,
	NBD_OPT_SET_META_CONTEXT = 10,
};

#define NBD_REP_ERR(n) (UINT32_C(0x80000000) + (n))
enum {
	NBD_REP_ACK = 1,
	NBD_REP_SERVER = 2,
	NBD_REP_INFO = 3,
	NBD_REP_META_CONTEXT = 4,
};
#define NBD_REP_ERR_UNSUP NBD_REP_ERR(1)
#define NBD_REP_ERR_POLICY NBD_REP_ERR(2)
#define NBD_REP_ERR_INVALID NBD_REP_ERR(3)
#define NBD_REP_ERR_TLS_REQD NBD_REP_ERR(5)
#define NBD_REP_ERR_UNKNOWN NBD_REP_ERR(6)
#define NBD_REP_ERR_TOO_BIG NBD_REP_ERR(9)

enum {
	NBD_INFO_EXPORT = 0,
	NBD_INFO_NAME = 1,
	NBD_INFO_DESCRIPTION = 2,
	NBD_INFO_BLOCK_SIZE = 3,
};

enum {
	NBD_REPLY_TYPE_NONE = 0,
	NBD_REPLY_TYPE_OFFSET_DATA = 1,
	NBD_REPLY_TYPE_BLOCK_STATUS = 5,
	NBD_REPLY_TYPE_ERROR = 32769,
};
#define NBD_REPLY_FLAG_DONE 1u

#define BASE_ALLOCATION "base:allocation"
#define BASE_ALLOCATION_ID 1u   /* our context id for it */
#define DIRTY_BITMAP_PREFIX "qemu:dirty-bitmap:"
#define DIRTY_BITMAP_ID 2u      /* a snapshot export's dirty bitmap */
#define DIRTY_BITMAP_DIRTY 1u   /* its flag: the granule changed */

/* ---- limits ----------------------------------------------------------- */

#define DEFAULT_MAX_CLIENTS 16
#define DEFAULT_HANDSHAKE_TIMEOUT 10          /* seconds */
#define MAX_HANDSHAKING 32                    /* connections before GO */
#define MAX_HANDSHAKING_PER_PEER 4            /* of them, from one address
						 (IPv6: one /64) */
#define MAX_INFLIGHT 64                       /* requests per connection */
#define MAX_INFLIGHT_BYTES (64u << 20)        /* buffers per connection */
#define MAX_NAME 4096                         /* NBD strings */
#define MAX_EXPORTS 64                        /* snapshot exports */
#define MAX_OPT_QUEUED (64u << 10)            /* unsent option replies
						 before reading stops */
#define SEND_IOV 64                           /* iovecs per sendmsg */
#define SCRATCH_SIZE (64u << 10)              /* for dropped payloads */
#define TLS_IN_SIZE (64u << 10)               /* ciphertext read at once */
#define TLS_WIRE_MAX (256u << 10)             /* ciphertext queued at once */
#define STOP_GRACE_NS (2 * UINT64_C(1000000000)) /* stop: then hard close */
#define ACCEPT_BACKOFF_NS (100 * UINT64_C(1000000))
/* BLOCK_STATUS: a reply covers at most BS_MAX_LENGTH bytes and
 * BS_MAX_DESCRIPTORS extents (a prefix of the range: clients ask again).
 * The disk is asked in steps of BS_STEP_MIN..BS_STEP_MAX bytes, one step
 * at a time for the whole server (see server.c), and each request is
 * charged BS_CHARGE bytes in the connection's in-flight bound. */
#define BS_MAX_LENGTH (1u << 30)
#define BS_MAX_DESCRIPTORS 4096u
#define BS_STEP_MIN (1u << 20)
#define BS_STEP_MAX (16u << 20)
#define BS_CHARGE (8u * BS_MAX_DESCRIPTORS + 1024u) /* per context */
/* The server picks the cipher, AES-GCM first: with AES-NI it costs a
 * quarter of the CPU of ChaCha20-Poly1305, which this machine's GnuTLS
 * otherwise negotiated with libnbd (23% of all CPU time while replicating
 * over TLS, against 6%). */
#define TLS_PRIORITY "NORMAL:%SERVER_PRECEDENCE:-CIPHER-ALL:+AES-128-GCM:" \
	"+AES-256-GCM:+CHACHA20-POLY1305:+AES-256-CBC:+AES-128-CBC:" \
	"+ECDHE-PSK:+DHE-PSK:+PSK"


/* ---- the server's state ---------------------------------------------- */

/* A whole message for the socket: one to four buffers sent back to back
 * (BLOCK_STATUS: a header and descriptors per context). */
struct srv_msg {
	struct srv_msg *next;
	void (*release)(struct srv_msg *m); /* after it is sent or dropped */
	struct iovec iov[4];
	unsigned niov;
	size_t len;                         /* sum of the iov lengths */
};

struct srv_queue {
	struct srv_msg *head;
	struct srv_msg **tail;
	size_t off;                         /* of head, already sent */
	size_t bytes;                       /* not yet sent */
};

struct srv_conn;

/*
 * A snapshot's export, beside the disk's own (blockmirror_server_
 * export_snapshot): read-only, served from the snapshot's view.  On the
 * loop thread only.  Once `removing`, it is off the server's list (no new
 * client finds it) and freed when its last connection is.
 */
struct srv_export {
	struct srv_export *next;
	char *name;
	struct blockmirror_snapshot *snap;
	unsigned nconns;                    /* connections that chose it */
	bool removing;
	struct bm_call *unexport_call;      /* waiting for nconns to reach 0 */
	struct bm_timer grace;              /* then close the rest hard */
	/* A snapshot taken `since` a checkpoint: what changed, copied at
	 * export time and served as the context dirty_ctx
	 * ("qemu:dirty-bitmap:SINCE"); NULL: none.  dirty_nbits granules of
	 * 2^dirty_shift bytes cover the disk exactly. */
	char *dirty_ctx;
	uint64_t *dirty_words;
	uint64_t dirty_nbits;
	unsigned dirty_shift;
};

/* One transmission request, from its header to its reply being sent. */
struct srv_req {
	struct srv_msg msg;                 /* the reply */
	struct srv_conn *conn;
	struct bm_server_request r;
	void *buf;                          /* READ/WRITE payload */
	uint64_t charged;                   /* in inflight_bytes */
	uint32_t err;                       /* NBD error to answer with */
	bool flush_after;                   /* TRIM + FUA */
	/* BLOCK_STATUS: descriptors in buf, built step by step */
	struct srv_req *bs_next;            /* in server->bs_head */
	uint64_t bs_pos;                    /* next offset to ask about */
	uint64_t bs_end;                    /* the (clamped) end */
	uint64_t bs_step;                   /* bytes asked in the next step */
	size_t bs_n;                        /* descriptors so far */
	size_t bs_max;
	bool bs_base;                       /* base:allocation asked */
	uint8_t *bs_dirty;                  /* dirty bitmap descriptors, or
					       NULL: not asked */
	size_t bs_dirty_n;
	uint8_t hdr[32];
	uint8_t hdr2[24];                   /* the second context's chunk */
};

struct srv_conn {
	struct blockmirror_server *server;
	struct srv_conn *prev, *next;
	int fd;
	unsigned ops;                       /* see the top of the file */
	unsigned disk_ops;
	bool dead;
	bool closing;
	bool oom;                           /* a reply could not be built */

	/* until transmission: counted in server->nhandshaking */
	struct bm_timer hs_timer;           /* the handshake deadline */
	bool hs_cancelled;
	uint8_t peer[17];                   /* family, address (IPv6: /64) */
	uint8_t peer_len;                   /* 0: not TCP */

	/* negotiation */
	struct srv_export *export;          /* NULL: the disk; set at GO or
					       EXPORT_NAME, counted in
					       export->nconns */
	bool transmission;
	bool no_zeroes;
	bool structured;
	bool base_allocation;
	bool dirty_bitmap;                  /* export->dirty_ctx selected */
	char *dirty_sel;                    /* the dirty bitmap context SET
					       selected (GO checks it) */
	uint8_t flags_buf[4];
	uint8_t opt_hdr[16];
	uint32_t opt;
	uint32_t opt_len;
	uint8_t *opt_data;

	/* reading: at most one read at a time */
	struct bm_op rd_op;
	bool rd_busy;
	uint8_t *rd_buf;
	size_t rd_len;
	size_t rd_got;
	void (*rd_then)(struct srv_conn *c);
	uint64_t drop_left;
	void (*drop_then)(struct srv_conn *c);
	uint8_t *scratch;

	/* transmission */
	uint8_t req_hdr[BM_SERVER_REQUEST_SIZE];
	struct bm_server_request req;
	bool hdr_pending;                   /* req parsed, not yet handled */
	bool paused;                        /* at the in-flight bound */
	struct srv_req *cur;                /* its payload is being read */
	unsigned inflight;
	uint64_t inflight_bytes;

	/* writing */
	struct srv_queue out;
	struct srv_queue wire;              /* TLS records */
	struct bm_op send_op;
	bool send_busy;
	bool send_wire;                     /* the sendmsg is from `wire` */
	struct msghdr mh;
	struct iovec send_iov[SEND_IOV];
	void (*drained)(struct srv_conn *c); /* once nothing is left to send */

	struct bm_op cancel_rd_op;
	struct bm_op cancel_send_op;

	/* TLS */
	gnutls_session_t tls;
	bool tls_handshaking;
	bool tls_ready;
	bool tls_bye;
	bool tls_eof;
	uint8_t *tls_in;
	size_t tls_in_start;
	size_t tls_in_end;
};

struct blockmirror_server {
	struct blockmirror_disk *disk;
	struct bm_loop *loop;
	int fd;
	bool tcp;
	char *unix_path;                    /* to unlink when stopping */
	char *address;
	char *export_name;
	char *description;
	bool readonly;
	unsigned max_clients;               /* in transmission */
	uint64_t handshake_ns;

	gnutls_psk_server_credentials_t psk; /* NULL: no TLS */
	gnutls_priority_t prio;

	/* loop thread only */
	struct srv_export *exports;         /* snapshots, newest first */
	struct srv_conn *conns;
	unsigned nclients;                  /* every connection */
	unsigned nhandshaking;              /* of them, before transmission */
	unsigned ops;                       /* accept, cancels, timers */
	struct bm_op accept_op;
	bool accept_armed;
	struct bm_op cancel_op;
	struct bm_timer backoff;
	struct bm_timer stop_timer;
	bool stopping;
	struct bm_call *stop_call;

	/* BLOCK_STATUS requests waiting for their next step, oldest first;
	 * at most one step is with the disk at a time, into bs_ext. */
	struct srv_req *bs_head;
	struct srv_req **bs_tail;
	bool bs_busy;
	struct bm_extent_list bs_ext;
	struct bm_op bs_kick_op;            /* deferred: start the next step */
	bool bs_kick_armed;
};



/* Shared between the server's files (definitions say where). */
/* server-self.c: the list of running servers, for bm_server_is_own_export */
void bm_server_register(struct blockmirror_server *s);
void bm_server_unregister(struct blockmirror_server *s);
/* server.c: the export a client asked for by name.  true and *out (NULL:
 * the disk's own), or false: no such export. */
bool bm_srv_find_export(struct blockmirror_server *s, const uint8_t *name,
			uint32_t len, struct srv_export **out);
/* Its size and whether it takes writes. */
uint64_t bm_srv_export_size(const struct blockmirror_server *s,
			    const struct srv_export *e);
bool bm_srv_export_readonly(const struct blockmirror_server *s,
			    const struct srv_export *e);
void bm_srv_conn_drop(struct srv_conn *c, uint64_t len, void (*then)(struct srv_conn *c));
void bm_srv_conn_kill(struct srv_conn *c);
void bm_srv_conn_read(struct srv_conn *c, void *buf, size_t len, void (*then)(struct srv_conn *c));
uint8_t * bm_srv_msg_alloc(struct srv_conn *c, size_t len);
void bm_srv_msg_free(struct srv_msg *m);
void bm_srv_queue_push(struct srv_queue *q, struct srv_msg *m);
void bm_srv_issue_recv(struct srv_conn *c, void *buf, size_t len);
void bm_srv_read_deferred(struct bm_op *op, int res);
void bm_srv_start_transmission(struct srv_conn *c);
bool bm_srv_can_serve(const struct srv_conn *c);
void bm_srv_got_client_flags(struct srv_conn *c);
void bm_srv_read_option(struct srv_conn *c);
/* server-options.c: forget the meta contexts selected; at GO, drop a
 * selection the chosen export does not have. */
void bm_srv_meta_reset(struct srv_conn *c);
void bm_srv_meta_check(struct srv_conn *c);
void bm_srv_tls_start(struct srv_conn *c);
void bm_srv_tls_handshake_step(struct srv_conn *c);
void bm_srv_tls_read_step(struct srv_conn *c);
int bm_srv_tls_setup(struct blockmirror_server *s, const char *path);

#endif /* BM_SERVER_INT_H */
