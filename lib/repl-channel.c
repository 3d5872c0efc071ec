/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The replication control channel, moving lines (repl-channel.h; the
 * wire format is docs/replication-channel.md).  Making and
 * authenticating channels is repl-channel-auth.c.
 *
 * Invariants:
 *  - Nothing a peer sends is held beyond one line: the receive buffer
 *    grows to BM_CHAN_MAX_LINE + 1 bytes at most, and a line that does
 *    not end by then is a protocol error, after which the channel is
 *    never read again (c->err is set and every later call returns it).
 *  - Every wait is a poll() on a non-blocking socket bounded by the
 *    call's deadline; GnuTLS runs over that socket in non-blocking mode
 *    and its GNUTLS_E_AGAIN is turned into such a poll, so a silent or
 *    half-open peer costs its caller the deadline, never a hang.
 *  - Nothing is sent or received before the channel is authenticated
 *    (c->ready).
 */
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "disk.h"
#include "errors.h"
#include "internal.h"
#include "repl-channel-int.h"

#define READ_CHUNK (64u << 10)

/* ---- time and waiting ------------------------------------------------- */

/* Milliseconds of the monotonic clock (disk.c's). */
static int64_t
chan_now_ms(void)
{
	return (int64_t)(bm_now_ns() / 1000000);
}

/* -1: no deadline. */
int64_t
bm_chan_deadline(int timeout_ms)
{
	return timeout_ms < 0 ? -1 : chan_now_ms() + timeout_ms;
}

/* Wait for events on fd until the deadline: 0, -ETIMEDOUT or -errno. */
int
bm_chan_wait_fd(int fd, short events, int64_t deadline)
{
	for (;;) {
		struct pollfd p = { .fd = fd, .events = events };
		int64_t left = deadline < 0 ? -1 : deadline - chan_now_ms();
		int r;

		if (deadline >= 0 && left < 0)
			left = 0;
		r = poll(&p, 1, (int)BM_MIN(left, INT32_MAX));
		if (r > 0)
			return 0;
		if (r == 0)
			return -ETIMEDOUT;
		if (errno != EINTR)
			return -errno;
	}
}

/* ---- channels: state and errors --------------------------------------- */

/* Record an error that breaks the channel: later calls return it too. */
int
bm_chan_break(struct bm_chan *c, int err, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(c->err_msg, sizeof c->err_msg, fmt, ap);
	va_end(ap);
	c->err = err;
	return bm_error(err, "%s", c->err_msg);
}

static int
chan_usable(struct bm_chan *c)
{
	if (c->err)
		return bm_error(c->err, "%s", c->err_msg);
	if (!c->ready)
		return bm_error(-EINVAL, "%s: the channel is not "
				"authenticated yet (bm_chan_handshake)",
				c->peer);
	return 0;
}

struct bm_chan *
bm_chan_new(int fd, bool tcp, bool server)
{
	struct bm_chan *c = calloc(1, sizeof *c);

	if (!c) {
		close(fd);
		return NULL;
	}
	c->fd = fd;
	c->tcp = tcp;
	c->server = server;
	return c;
}

void
bm_chan_close(struct bm_chan *c)
{
	if (!c)
		return;
	if (c->tls) {
		/* A close_notify if the socket takes it now; never wait. */
		if (c->ready && !c->err)
			gnutls_bye(c->tls, GNUTLS_SHUT_WR);
		gnutls_deinit(c->tls);
	}
	if (c->client_cred)
		gnutls_psk_free_client_credentials(c->client_cred);
	bm_chan_tls_unref(c->server_tls);
	if (c->fd >= 0)
		close(c->fd);
	json_decref(c->last_op);
	json_decref(c->last_id);
	free(c->buf);
	free(c);
}

const char *
bm_chan_peer(struct bm_chan *c)
{
	return c->peer;
}

/* Printable form of bytes a peer chose (an identity) for messages. */
void
bm_chan_printable(const void *data, size_t len, char *out, size_t size)
{
	const unsigned char *p = data;
	size_t o = 0;

	for (size_t i = 0; i < len && o + 5 < size; i++) {
		if (p[i] >= 0x20 && p[i] < 0x7f && p[i] != '\\')
			out[o++] = (char)p[i];
		else
			o += (size_t)snprintf(out + o, size - o, "\\x%02x",
					      p[i]);
	}
	out[o] = '\0';
}

/* ---- bytes in and out ------------------------------------------------- */

/* Up to len bytes: > 0, 0 at the peer's end, or a negative errno (the
 * message not yet set). */
static ssize_t
chan_read(struct bm_chan *c, void *buf, size_t len, int64_t deadline,
	  const char **why)
{
	*why = NULL;
	for (;;) {
		ssize_t n;
		int r;

		if (c->tls) {
			n = gnutls_record_recv(c->tls, buf, len);
			if (n >= 0)
				return n;
			if (n == GNUTLS_E_PREMATURE_TERMINATION)
				return 0;
			if (n != GNUTLS_E_AGAIN && n != GNUTLS_E_INTERRUPTED &&
			    gnutls_error_is_fatal((int)n)) {
				*why = gnutls_strerror((int)n);
				return -EPROTO;
			}
			if (n != GNUTLS_E_AGAIN)
				continue; /* a warning alert, a key update */
		} else {
			n = recv(c->fd, buf, len, MSG_DONTWAIT);
			if (n >= 0)
				return n;
			if (errno == ECONNRESET)
				return 0;
			if (errno != EAGAIN && errno != EINTR)
				return -errno;
		}
		r = bm_chan_wait_fd(c->fd, POLLIN, deadline);
		if (r < 0)
			return r;
	}
}

static int
chan_write(struct bm_chan *c, const char *buf, size_t len, int64_t deadline)
{
	size_t done = 0;

	while (done < len) {
		ssize_t n;
		int r;

		if (c->tls) {
			n = gnutls_record_send(c->tls, buf + done, len - done);
			if (n < 0 && n != GNUTLS_E_AGAIN &&
			    n != GNUTLS_E_INTERRUPTED)
				return bm_chan_break(
					c, -ECONNRESET, "%s: send: %s",
					c->peer, gnutls_strerror((int)n));
		} else {
			n = send(c->fd, buf + done, len - done,
				 MSG_DONTWAIT | MSG_NOSIGNAL);
			if (n < 0 && errno != EAGAIN && errno != EINTR)
				return bm_chan_break(
					c, errno == EPIPE ? -ECONNRESET
							  : -errno,
					"%s: send: %s", c->peer,
					strerror(errno));
		}
		if (n > 0) {
			done += (size_t)n;
			continue;
		}
		r = bm_chan_wait_fd(c->fd, POLLOUT, deadline);
		if (r == -ETIMEDOUT && done == 0)
			return bm_error(r, "%s: the peer took nothing within "
					"the deadline", c->peer);
		/* Part of a line is out: the stream cannot go on. */
		if (r < 0)
			return bm_chan_break(c, r, "%s: send: %s after %zu of "
					     "%zu bytes", c->peer, strerror(-r),
					     done, len);
	}
	return 0;
}

int
bm_chan_send_bytes(struct bm_chan *c, const void *buf, size_t len,
		   int timeout_ms)
{
	int r = chan_usable(c);

	if (r < 0)
		return r;
	return chan_write(c, buf, len, bm_chan_deadline(timeout_ms));
}

static int
send_deadline(struct bm_chan *c, json_t *msg, int64_t deadline)
{
	size_t len;
	char *s;
	int r;

	r = chan_usable(c);
	if (r < 0)
		return r;
	if (!json_is_object(msg))
		return bm_error(-EINVAL, "%s: a message is a JSON object",
				c->peer);
	/* Compact: no newline outside strings, and strings escape theirs. */
	s = json_dumps(msg, JSON_COMPACT);
	if (!s)
		return bm_error(-ENOMEM, "out of memory");
	len = strlen(s);
	if (len > BM_CHAN_MAX_LINE) {
		free(s);
		return bm_error(-EMSGSIZE, "%s: a message of %zu bytes is over "
				"the line limit of %u bytes", c->peer, len,
				BM_CHAN_MAX_LINE);
	}
	s[len] = '\n';
	r = chan_write(c, s, len + 1, deadline);
	free(s);
	return r;
}

int
bm_chan_send(struct bm_chan *c, json_t *msg, int timeout_ms)
{
	return send_deadline(c, msg, bm_chan_deadline(timeout_ms));
}

/* Check a line's "op" and "id" and keep them for bm_chan_reply. */
static int
note_op_id(struct bm_chan *c, json_t *j)
{
	json_t *op = json_object_get(j, "op"), *id = json_object_get(j, "id");

	if (op && !json_is_string(op))
		return bm_chan_break(c, -EPROTO, "%s: line %" PRIu64 ": \"op\" "
				     "is not a string", c->peer, c->lines);
	if (id && (!json_is_integer(id) || json_integer_value(id) < 0))
		return bm_chan_break(c, -EPROTO, "%s: line %" PRIu64 ": \"id\" "
				     "is not a non-negative integer", c->peer,
				     c->lines);
	json_decref(c->last_op);
	json_decref(c->last_id);
	c->last_op = json_incref(op);
	c->last_id = json_incref(id);
	return 0;
}

static const char *
json_kind(json_t *j)
{
	switch (json_typeof(j)) {
	case JSON_ARRAY: return "an array";
	case JSON_STRING: return "a string";
	case JSON_INTEGER:
	case JSON_REAL: return "a number";
	case JSON_TRUE:
	case JSON_FALSE: return "a boolean";
	case JSON_NULL: return "null";
	default: return "an object";
	}
}

/* Parse the line [start, nl) and consume it with its newline. */
static int
take_line(struct bm_chan *c, char *nl, json_t **msg)
{
	char *line = c->buf + c->start;
	size_t len = (size_t)(nl - line);
	json_error_t jerr;
	json_t *j;
	char text[sizeof jerr.text * 4];

	c->lines++;
	c->start += len + 1;
	c->scanned = c->start;
	j = json_loadb(line, len, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY,
		       &jerr);
	if (!j) {
		bm_chan_printable(jerr.text,
				  strnlen(jerr.text, sizeof jerr.text), text,
				  sizeof text);
		return bm_chan_break(c, -EPROTO, "%s: line %" PRIu64 " is not "
				     "JSON in UTF-8: %s (byte %d)", c->peer,
				     c->lines, text, jerr.position);
	}
	if (!json_is_object(j)) {
		const char *kind = json_kind(j);

		json_decref(j);
		return bm_chan_break(c, -EPROTO, "%s: line %" PRIu64 " is %s, "
				     "not a JSON object", c->peer, c->lines,
				     kind);
	}
	if (note_op_id(c, j) < 0) {
		json_decref(j);
		return c->err;
	}
	*msg = j;
	return 0;
}

static int
recv_deadline(struct bm_chan *c, json_t **msg, int64_t deadline)
{
	int r;

	*msg = NULL;
	r = chan_usable(c);
	if (r < 0)
		return r;
	for (;;) {
		char *nl = c->buf ? memchr(c->buf + c->scanned, '\n',
					   c->end - c->scanned) : NULL;
		const char *why;
		ssize_t n;

		if (nl)
			return take_line(c, nl, msg);
		c->scanned = c->end;
		if (c->end - c->start > BM_CHAN_MAX_LINE)
			return bm_chan_break(c, -EPROTO, "%s: a line longer "
					     "than the limit of %u bytes "
					     "(4 MiB)", c->peer,
					     BM_CHAN_MAX_LINE);
		/* Room for one more chunk, never past limit + newline. */
		if (c->start && c->start == c->end)
			c->start = c->end = c->scanned = 0;
		if (c->cap - c->end < READ_CHUNK && c->start) {
			memmove(c->buf, c->buf + c->start, c->end - c->start);
			c->end -= c->start;
			c->scanned = c->end;
			c->start = 0;
		}
		if (c->cap - c->end < READ_CHUNK &&
		    c->cap < BM_CHAN_MAX_LINE + 1) {
			size_t cap = BM_MIN(BM_MAX((size_t)c->cap * 2,
						   (size_t)READ_CHUNK),
					    (size_t)BM_CHAN_MAX_LINE + 1);
			char *b = realloc(c->buf, cap);

			if (!b)
				return bm_error(-ENOMEM, "out of memory");
			c->buf = b;
			c->cap = cap;
		}
		n = chan_read(c, c->buf + c->end,
			      BM_MIN(c->cap - c->end, (size_t)READ_CHUNK),
			      deadline, &why);
		if (n == -ETIMEDOUT)
			return bm_error(-ETIMEDOUT, "%s: nothing received "
					"within the deadline", c->peer);
		if (n < 0)
			return bm_chan_break(c, (int)n, "%s: receive: %s",
					     c->peer,
					     why ? why : strerror((int)-n));
		if (n == 0 && c->end > c->start)
			return bm_chan_break(c, -ECONNRESET, "%s: the peer "
					     "closed the connection in the "
					     "middle of a line (%zu bytes of "
					     "it came)", c->peer,
					     c->end - c->start);
		if (n == 0)
			return bm_chan_break(c, -ECONNRESET, "%s: the peer "
					     "closed the connection", c->peer);
		c->end += (size_t)n;
	}
}

int
bm_chan_recv(struct bm_chan *c, json_t **msg, int timeout_ms)
{
	return recv_deadline(c, msg, bm_chan_deadline(timeout_ms));
}

/* ---- requests and replies --------------------------------------------- */

int
bm_chan_parse_reply(json_t *req, json_t *reply, const char *peer,
		    json_t **result)
{
	json_t *ret = json_object_get(reply, "return");
	json_t *error = json_object_get(reply, "error");
	json_t *e_no, *e_msg;
	const char *members[] = { "op", "id" };

	*result = NULL;
	for (size_t i = 0; i < BM_ARRAY_SIZE(members); i++) {
		json_t *want = json_object_get(req, members[i]);
		json_t *got = json_object_get(reply, members[i]);

		if ((want || got) && !json_equal(want, got))
			return bm_error(-EPROTO, "%s: a reply whose \"%s\" is "
					"not the request's", peer,
					members[i]);
	}
	if (!ret == !error)
		return bm_error(-EPROTO, "%s: a reply with %s \"return\" and "
				"\"error\"", peer, ret ? "both" : "neither");
	if (ret) {
		if (!json_is_object(ret))
			return bm_error(-EPROTO, "%s: \"return\" is %s, not an "
					"object", peer, json_kind(ret));
		*result = json_incref(ret);
		return 0;
	}
	e_no = json_object_get(error, "errno");
	e_msg = json_object_get(error, "message");
	if (!json_is_integer(e_no) || json_integer_value(e_no) <= 0 ||
	    json_integer_value(e_no) > 4095 || !json_is_string(e_msg))
		return bm_error(-EPROTO, "%s: \"error\" needs \"errno\" (1 to "
				"4095) and \"message\" (a string)", peer);
	return bm_error(-(int)json_integer_value(e_no), "%s: %s", peer,
			json_string_value(e_msg));
}

int
bm_chan_call(struct bm_chan *c, json_t *req, json_t **result,
	     int timeout_ms)
{
	int64_t deadline = bm_chan_deadline(timeout_ms);
	json_t *reply;
	int r;

	*result = NULL;
	r = send_deadline(c, req, deadline);
	if (r == 0)
		r = recv_deadline(c, &reply, deadline);
	if (r < 0)
		return r;
	r = bm_chan_parse_reply(req, reply, c->peer, result);
	json_decref(reply);
	return r;
}

int
bm_chan_reply(struct bm_chan *c, json_t *result_or_null, int err,
	      const char *message, int timeout_ms)
{
	json_t *reply = json_object(), *body;
	int r = -ENOMEM;

	if (!reply)
		return bm_error(-ENOMEM, "out of memory");
	if (err) {
		int e = err < 0 ? -err : err;

		body = json_pack("{s:i, s:s}", "errno", e, "message",
				 message ? message : strerror(e));
		if (body && json_object_set_new(reply, "error", body) < 0)
			goto out;
	} else {
		body = result_or_null ? json_incref(result_or_null) :
					json_object();
		if (body && json_object_set_new(reply, "return", body) < 0)
			goto out;
	}
	if (!body ||
	    (c->last_op && json_object_set(reply, "op", c->last_op) < 0) ||
	    (c->last_id && json_object_set(reply, "id", c->last_id) < 0))
		goto out;
	r = bm_chan_send(c, reply, timeout_ms);
out:
	json_decref(reply);
	return r == -ENOMEM ? bm_error(r, "out of memory") : r;
}

/* ---- base64 ----------------------------------------------------------- */

static const char b64_alphabet[] =
	"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

int
bm_chan_b64_put(json_t *obj, const char *key, const void *buf, size_t len)
{
	const unsigned char *p = buf;
	size_t out_len, o = 0;
	char *s;
	int r;

	if (len > BM_CHAN_MAX_LINE / 4 * 3)
		return bm_error(-EMSGSIZE, "%s: %zu bytes do not fit in a line "
				"as base64", key, len);
	out_len = (len + 2) / 3 * 4;
	s = malloc(out_len + 1);
	if (!s)
		return bm_error(-ENOMEM, "out of memory");
	for (size_t i = 0; i < len; i += 3) {
		uint32_t v = (uint32_t)p[i] << 16;
		size_t left = len - i;

		if (left > 1)
			v |= (uint32_t)p[i + 1] << 8;
		if (left > 2)
			v |= p[i + 2];
		s[o++] = b64_alphabet[v >> 18 & 63];
		s[o++] = b64_alphabet[v >> 12 & 63];
		s[o++] = left > 1 ? b64_alphabet[v >> 6 & 63] : '=';
		s[o++] = left > 2 ? b64_alphabet[v & 63] : '=';
	}
	s[o] = '\0';
	r = json_object_set_new(obj, key, json_stringn_nocheck(s, o));
	free(s);
	return r < 0 ? bm_error(-ENOMEM, "out of memory") : 0;
}

static int
b64_value(char ch)
{
	const char *p = ch ? strchr(b64_alphabet, ch) : NULL;

	return p ? (int)(p - b64_alphabet) : -1;
}

int
bm_chan_b64_get(json_t *obj, const char *key, void **buf, size_t *len,
		size_t max)
{
	json_t *j = json_object_get(obj, key);
	const char *s;
	size_t n, pad = 0, out_len;
	unsigned char *out;

	*buf = NULL;
	*len = 0;
	if (!j)
		return bm_error(-ENOENT, "no \"%s\"", key);
	if (!json_is_string(j))
		return bm_error(-EPROTO, "\"%s\" is %s, not a base64 string",
				key, json_kind(j));
	s = json_string_value(j);
	n = json_string_length(j);
	if (n % 4)
		return bm_error(-EPROTO, "\"%s\": base64 of %zu characters, "
				"not a multiple of 4", key, n);
	if (n && s[n - 1] == '=')
		pad = n >= 2 && s[n - 2] == '=' ? 2 : 1;
	out_len = n / 4 * 3 - pad;
	if (out_len > max)
		return bm_error(-EMSGSIZE, "\"%s\": %zu bytes, more than the "
				"%zu allowed", key, out_len, max);
	out = malloc(out_len ? out_len : 1);
	if (!out)
		return bm_error(-ENOMEM, "out of memory");
	for (size_t i = 0, o = 0; i < n; i += 4) {
		bool last = i + 4 == n;
		int v[4];
		uint32_t w = 0;

		for (int k = 0; k < 4; k++) {
			v[k] = b64_value(s[i + k]);
			/* '=' only as the padding of the last group. */
			if (v[k] < 0 && !(last && s[i + k] == '=' &&
					  k >= 4 - (int)pad))
				goto bad;
			w = w << 6 | (uint32_t)(v[k] < 0 ? 0 : v[k]);
		}
		/* Canonical: the bits padding drops are zero. */
		if ((pad == 1 && last && (w & 0xff)) ||
		    (pad == 2 && last && (w & 0xffff)))
			goto bad;
		for (int k = 0; k < 3 && o < out_len; k++)
			out[o++] = (unsigned char)(w >> (16 - 8 * k));
	}
	*buf = out;
	*len = out_len;
	return 0;
bad:
	free(out);
	return bm_error(-EPROTO, "\"%s\" is not canonical base64", key);
}
