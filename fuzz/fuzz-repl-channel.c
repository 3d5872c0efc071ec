/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Fuzz target for the replication control channel (lib/repl-channel.c,
 * docs/replication-channel.md): the input is what a peer sent.  It goes
 * into one end of a socket pair, whose other end is a Unix channel
 * (bm_chan_from_fd); bm_chan_recv runs until it fails, which it must
 * (the input ends, then the peer's end closes).  Each message received
 * is also read as a reply to {"op":"status","id":7} (bm_chan_parse_reply)
 * and its "digests" member as base64 of at most 64 KiB.
 *
 * What must hold: every call returns 0 or a negative errno with a
 * message, recv ends with -EPROTO or -ECONNRESET (never a timeout: all
 * the input is there), and a channel broken once stays broken.  Inputs
 * larger than the socket buffer are written from a thread.
 */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <blockmirror/blockmirror.h>

#include "repl-channel.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

struct feed {
	int fd;
	const uint8_t *data;
	size_t size;
};

/* Write it all, then close: the channel sees the peer's end. */
static void *
feed_main(void *arg)
{
	struct feed *f = arg;
	size_t off = 0;

	while (off < f->size) {
		ssize_t n = write(f->fd, f->data + off, f->size - off);

		if (n <= 0)
			break; /* the channel stopped reading */
		off += (size_t)n;
	}
	close(f->fd);
	return NULL;
}

static void
check_message(json_t *m)
{
	json_t *req = json_pack("{s:s, s:i}", "op", "status", "id", 7);
	json_t *result = NULL;
	void *buf = NULL;
	size_t len = 0;
	int r;

	r = bm_chan_parse_reply(req, m, "fuzz", &result);
	if (r == 0 && !json_is_object(result))
		abort();
	if (r < 0 && (result || !blockmirror_last_error()))
		abort();
	json_decref(result);
	r = bm_chan_b64_get(m, "digests", &buf, &len, 64u << 10);
	if ((r == 0) != (buf != NULL) || len > (64u << 10))
		abort();
	free(buf);
	json_decref(req);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct feed f = { .data = data, .size = size };
	struct bm_chan *c;
	pthread_t feeder;
	bool threaded = size > (32u << 10);
	json_t *m;
	int sv[2], r;

	signal(SIGPIPE, SIG_IGN);
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
		abort();
	f.fd = sv[1];
	if (bm_chan_from_fd(sv[0], &c) < 0)
		abort();
	if (threaded) {
		if (pthread_create(&feeder, NULL, feed_main, &f))
			abort();
	} else {
		feed_main(&f);
	}
	while ((r = bm_chan_recv(c, &m, 10000)) == 0) {
		if (!json_is_object(m))
			abort();
		check_message(m);
		json_decref(m);
	}
	if ((r != -EPROTO && r != -ECONNRESET && r != -ENOMEM) ||
	    !blockmirror_last_error())
		abort();
	/* Broken for good. */
	if (bm_chan_recv(c, &m, 0) != r || m)
		abort();
	bm_chan_close(c);
	if (threaded)
		pthread_join(feeder, NULL);
	return 0;
}
