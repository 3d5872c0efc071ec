/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The replication control channel (docs/replication-channel.md): one
 * JSON object per line between the primary and the replica, over a Unix
 * socket (the socket file's 0600 mode and the peer's uid are the
 * authentication) or TCP with TLS 1.3 and a pre-shared key (psktool
 * file).  Library-internal: the replication daemons are its callers.
 *
 * Every int call returns 0 or a negative errno with the thread's error
 * message set (it names the peer or the address and the problem).  Every
 * call that may wait takes a deadline in milliseconds (-1: none, 0: do
 * not wait) and returns -ETIMEDOUT when it passes.
 *
 * Threads: one struct bm_chan is used by one thread at a time; channels
 * and the listener are independent of each other (the listener may be
 * closed while channels it accepted live on).  The replica runs
 * bm_chan_handshake and everything after it on a thread per connection,
 * so a client that says nothing holds up only its own thread.
 */
#ifndef BM_REPL_CHANNEL_H
#define BM_REPL_CHANNEL_H

#include <stddef.h>

#include <jansson.h>

/* The longest line, '\n' not counted (docs/replication-channel.md). */
#define BM_CHAN_MAX_LINE (4u << 20)

struct bm_chan;
struct bm_chan_listener;

/*
 * Listen on "unix:PATH" or "tcp:HOST:PORT" (HOST empty: 127.0.0.1; PORT
 * 0: any; IPv6 as [ADDR]).  TCP needs psk_file (-EINVAL without it; the
 * file is checked like bm_chan_connect's and its keys read once, here);
 * Unix takes none.  A Unix socket file is created mode 0600; a stale
 * socket there is replaced, a live one (-EADDRINUSE) or anything that
 * is not a socket (-EEXIST) is not.  Does not block.
 */
int bm_chan_listen(const char *address, const char *psk_file,
		   struct bm_chan_listener **out);

/* The address as bound ("tcp:127.0.0.1:40123", "unix:/run/x.sock");
 * borrowed, valid until bm_chan_listener_close. */
const char *bm_chan_listener_address(struct bm_chan_listener *l);

/* The listening descriptor, to poll for POLLIN (borrowed). */
int bm_chan_listener_fd(struct bm_chan_listener *l);

/*
 * Take one connection, waiting up to timeout_ms for one.  It comes back
 * at once, before anything is read from it: the caller runs
 * bm_chan_handshake on it (on the connection's own thread) before any
 * other call.  The listener may be used from one thread at a time.
 */
int bm_chan_accept(struct bm_chan_listener *l, int timeout_ms,
		   struct bm_chan **out);

/*
 * Server side: authenticate the peer.  Unix: its uid (SO_PEERCRED) must
 * be ours or root's (-EPERM).  TCP: the TLS 1.3 PSK handshake, within
 * timeout_ms (a client that says nothing is dropped: -ETIMEDOUT); an
 * unknown identity or a wrong key is -EACCES with a message saying
 * which.  On failure the caller closes the channel.
 */
int bm_chan_handshake(struct bm_chan *c, int timeout_ms);

/* Stop listening; removes the Unix socket file it created (if it is
 * still that one).  Accepts NULL. */
void bm_chan_listener_close(struct bm_chan_listener *l);

/*
 * Connect to a listener and authenticate, all within timeout_ms.  TCP
 * needs psk_file (-EINVAL without it) and uses its line for identity
 * (NULL: the first line); the file must be a regular file that group
 * and others cannot access (-EPERM), with "identity:hexkey" lines
 * (-EINVAL).  A replica that refuses the key is -EACCES.  Unix: the
 * socket's owner process must run as our uid or root (-EPERM).
 */
int bm_chan_connect(const char *address, const char *psk_file,
		    const char *identity, int timeout_ms,
		    struct bm_chan **out);

/*
 * A Unix channel over a connected stream socket the caller made
 * (socketpair); consumes fd (also on failure).  No peer check: whoever
 * made the pair vouches for the other end.  Tests and the fuzzer use it.
 */
int bm_chan_from_fd(int fd, struct bm_chan **out);

/*
 * Send msg (a JSON object; not consumed) as one line.  -EMSGSIZE if it
 * is longer than BM_CHAN_MAX_LINE.  A deadline that passes in the
 * middle of a line leaves the channel broken (later calls fail).
 */
int bm_chan_send(struct bm_chan *c, json_t *msg, int timeout_ms);

/* Raw bytes as they are, for tests that play a broken peer. */
int bm_chan_send_bytes(struct bm_chan *c, const void *buf, size_t len,
		       int timeout_ms);

/*
 * Receive one line into *msg (the caller's reference).  -ETIMEDOUT
 * (the channel stays usable: what arrived of a line is kept),
 * -ECONNRESET (the peer closed, between lines or in the middle of one),
 * -EPROTO (a line longer than BM_CHAN_MAX_LINE, not JSON, not UTF-8, not
 * an object; the message says which and where).  After any error but
 * -ETIMEDOUT the channel is not read again: every later call fails.
 * Remembers the message's "op" and "id" for bm_chan_reply.
 */
int bm_chan_recv(struct bm_chan *c, json_t **msg, int timeout_ms);

/*
 * Send req, then receive one reply within timeout_ms (both together).
 * {"return": {...}} gives *result (the caller's reference);
 * {"error": {"errno": N, "message": "..."}} gives -N with "PEER: message"
 * as the last error.  A reply whose "id" or "op" differs from the
 * request's, or that is neither, is -EPROTO.
 */
int bm_chan_call(struct bm_chan *c, json_t *req, json_t **result,
		 int timeout_ms);

/*
 * Reply to the message last received: with err == 0, {"return":
 * result_or_null} (NULL: {}; not consumed); else {"error": {"errno":
 * -err, "message": message}}.  Echoes the request's "op" and "id".
 */
int bm_chan_reply(struct bm_chan *c, json_t *result_or_null, int err,
		  const char *message, int timeout_ms);

/*
 * What bm_chan_call makes of a reply to req (pure: no I/O): 0 with
 * *result, -N with the peer's message (prefixed with `peer`), -EPROTO.
 */
int bm_chan_parse_reply(json_t *req, json_t *reply, const char *peer,
			json_t **result);

/* "tcp:10.0.0.2:51234 (identity primary1)", "unix (uid 0)": for logs;
 * borrowed, valid until bm_chan_close. */
const char *bm_chan_peer(struct bm_chan *c);

/* Accepts NULL. */
void bm_chan_close(struct bm_chan *c);

/*
 * obj[key] = base64 (RFC 4648, with padding) of buf[0..len).  -ENOMEM,
 * or -EMSGSIZE when it could not fit in a line.
 */
int bm_chan_b64_put(json_t *obj, const char *key, const void *buf,
		    size_t len);

/*
 * Decode obj[key] into *buf (malloc'd, the caller's; not NULL even when
 * *len is 0).  -ENOENT: no such member; -EPROTO: not a string, not
 * canonical base64; -EMSGSIZE: more than max bytes (checked before
 * anything is decoded).
 */
int bm_chan_b64_get(json_t *obj, const char *key, void **buf, size_t *len,
		    size_t max);

#endif /* BM_REPL_CHANNEL_H */
