/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * What the two halves of the replication channel share: the channel's
 * and the listener's state, and the helpers both use.  repl-channel.c
 * moves lines (framing, deadlines, requests and replies, base64);
 * repl-channel-auth.c makes channels and authenticates them (key files,
 * TLS, listening, accepting, connecting).  Nothing outside those two
 * files includes this header.
 */
#ifndef BM_REPL_CHANNEL_INT_H
#define BM_REPL_CHANNEL_INT_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include <gnutls/gnutls.h>

#include "repl-channel.h"

#define MAX_IDENTITY 128u	/* bytes of a PSK identity */
#define MAX_KEY 512u		/* bytes of a PSK key */

struct psk_key {
	char identity[MAX_IDENTITY + 1];
	unsigned char key[MAX_KEY];
	size_t key_len;
};

/* The server's keys and TLS settings, shared by its connections. */
struct chan_tls_server {
	atomic_int refs;
	struct psk_key *keys;
	size_t n_keys;
	gnutls_psk_server_credentials_t cred;
	gnutls_priority_t prio;
};

struct bm_chan_listener {
	int fd;
	char *address;
	char *unix_path; /* the socket file we made, to remove */
	dev_t dev;
	ino_t ino;
	struct chan_tls_server *tls;
};

struct bm_chan {
	int fd;
	bool tcp, server, ready;
	gnutls_session_t tls;
	gnutls_psk_client_credentials_t client_cred;
	struct chan_tls_server *server_tls;
	/* What the server's key lookup saw, to say why a handshake failed. */
	char offered[MAX_IDENTITY * 4 + 1];
	bool offered_known;
	char address[300];	/* "tcp:HOST:PORT", "unix:PATH", "unix" */
	char peer[1024];
	/* Received bytes: [start, end) of buf; scanned: no '\n' before it. */
	char *buf;
	size_t cap, start, end, scanned;
	uint64_t lines;
	json_t *last_op, *last_id; /* of the last message received */
	int err;		   /* broken: every call returns this */
	char err_msg[512];
};

/* The monotonic deadline timeout_ms from now; -1 (none) for < 0. */
int64_t bm_chan_deadline(int timeout_ms);

/* Wait for events on fd until the deadline: 0, -ETIMEDOUT or -errno. */
int bm_chan_wait_fd(int fd, short events, int64_t deadline);

/* A channel over fd (consumed, also on failure: NULL). */
struct bm_chan *bm_chan_new(int fd, bool tcp, bool server);

/* Record an error that breaks the channel: later calls return it too.
 * Returns err, with the thread's message set. */
int bm_chan_break(struct bm_chan *c, int err, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

/* Bytes a peer chose (an identity, a parser's message), printable. */
void bm_chan_printable(const void *data, size_t len, char *out,
		       size_t size);

/* Drop a reference to the server's keys (frees them with the last). */
void bm_chan_tls_unref(struct chan_tls_server *t);

#endif /* BM_REPL_CHANNEL_INT_H */
