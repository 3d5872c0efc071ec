/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * TLS for the NBD server (GnuTLS, PSK): records go through memory
 * buffers fed by the connection's io_uring reads and drained into its
 * send queue, so TLS connections keep the same one-loop design.  The PSK
 * file is read again at each handshake.
 */
#include "server-int.h"

/* ---- TLS -------------------------------------------------------------- */

static ssize_t
tls_push(gnutls_transport_ptr_t ptr, const void *data, size_t len)
{
	struct srv_conn *c = ptr;
	struct srv_msg *m = malloc(sizeof *m + len);

	if (!m) {
		gnutls_transport_set_errno(c->tls, ENOMEM);
		return -1;
	}
	memcpy(m + 1, data, len);
	m->release = bm_srv_msg_free;
	m->iov[0].iov_base = m + 1;
	m->iov[0].iov_len = len;
	m->niov = 1;
	m->len = len;
	bm_srv_queue_push(&c->wire, m);
	return (ssize_t)len;
}

static ssize_t
tls_pull(gnutls_transport_ptr_t ptr, void *data, size_t len)
{
	struct srv_conn *c = ptr;
	size_t avail = c->tls_in_end - c->tls_in_start;

	if (!avail) {
		if (c->tls_eof)
			return 0;
		gnutls_transport_set_errno(c->tls, EAGAIN);
		return -1;
	}
	len = BM_MIN(len, avail);
	memcpy(data, c->tls_in + c->tls_in_start, len);
	c->tls_in_start += len;
	return (ssize_t)len;
}

static int
tls_pull_timeout(gnutls_transport_ptr_t ptr, unsigned int ms)
{
	struct srv_conn *c = ptr;

	return c->tls_in_end > c->tls_in_start || c->tls_eof;
}

/* gnutls wants ciphertext: read more of it from the socket. */
static void
tls_want_input(struct srv_conn *c)
{
	c->tls_in_start = c->tls_in_end = 0;
	bm_srv_issue_recv(c, c->tls_in, TLS_IN_SIZE);
}

void
bm_srv_tls_handshake_step(struct srv_conn *c)
{
	int r = gnutls_handshake(c->tls);

	if (r == GNUTLS_E_SUCCESS) {
		c->tls_handshaking = false;
		c->tls_ready = true;
		bm_debug("nbd server %s: TLS session established",
			 c->server->address);
		bm_srv_read_option(c);
	} else if ((r == GNUTLS_E_AGAIN || r == GNUTLS_E_INTERRUPTED) &&
		   !c->tls_eof) {
		tls_want_input(c);
	} else {
		bm_debug("nbd server %s: TLS handshake: %s",
			 c->server->address, gnutls_strerror(r));
		/* Let the alert gnutls queued go out first. */
		c->closing = true;
	}
}

void
bm_srv_tls_read_step(struct srv_conn *c)
{
	for (;;) {
		ssize_t r = gnutls_record_recv(c->tls, c->rd_buf + c->rd_got,
					       c->rd_len - c->rd_got);

		if (r > 0) {
			c->rd_got += (size_t)r;
			if (c->rd_got < c->rd_len)
				continue;
			/* Never run the continuation inside the call that
			 * asked for the read: pipelined requests would
			 * recurse. */
			bm_loop_defer(c->server->loop, &c->rd_op,
				      bm_srv_read_deferred, 0);
			c->rd_busy = true;
			c->ops++;
			return;
		}
		if (r == GNUTLS_E_INTERRUPTED)
			continue;
		if (r == GNUTLS_E_AGAIN && !c->tls_eof) {
			tls_want_input(c);
			return;
		}
		if (r != 0 && r != GNUTLS_E_PREMATURE_TERMINATION &&
		    r != GNUTLS_E_AGAIN)
			bm_debug("nbd server %s: TLS receive: %s",
				 c->server->address, gnutls_strerror((int)r));
		c->closing = true;
		return;
	}
}

/* After the STARTTLS ACK has gone out in clear. */
void
bm_srv_tls_start(struct srv_conn *c)
{
	struct blockmirror_server *s = c->server;
	int r;

	r = gnutls_init(&c->tls, GNUTLS_SERVER | GNUTLS_NONBLOCK);
	if (r < 0) {
		c->tls = NULL;
		goto fail;
	}
	r = gnutls_priority_set(c->tls, s->prio);
	if (r >= 0)
		r = gnutls_credentials_set(c->tls, GNUTLS_CRD_PSK, s->psk);
	if (r < 0)
		goto fail;
	c->tls_in = malloc(TLS_IN_SIZE);
	if (!c->tls_in)
		goto fail;
	gnutls_transport_set_ptr(c->tls, c);
	gnutls_transport_set_push_function(c->tls, tls_push);
	gnutls_transport_set_pull_function(c->tls, tls_pull);
	gnutls_transport_set_pull_timeout_function(c->tls, tls_pull_timeout);
	c->tls_handshaking = true;
	bm_srv_tls_handshake_step(c);
	return;
fail:
	bm_debug("nbd server %s: cannot start TLS: %s", s->address,
		 r < 0 ? gnutls_strerror(r) : "out of memory");
	bm_srv_conn_kill(c);
}

/* ---- TLS credentials ---------------------------------------------------- */

/* The psktool format: "username:hexkey" lines.  At least one must be. */
static int
check_psk_file(const char *path)
{
	FILE *f = fopen(path, "re");
	char line[1024];
	int keys = 0;

	if (!f)
		return bm_error(-errno, "%s: %s", path, strerror(errno));
	while (fgets(line, sizeof line, f)) {
		char *colon = strchr(line, ':');
		size_t n = 0;

		if (!colon || colon == line)
			continue;
		for (char *p = colon + 1; *p && *p != '\n' && *p != '\r'; p++)
			n = isxdigit((unsigned char)*p) ? n + 1 : SIZE_MAX / 2;
		if (n && n % 2 == 0 && n < SIZE_MAX / 2)
			keys++;
	}
	fclose(f);
	if (!keys)
		return bm_error(-EINVAL, "%s: no \"username:hexkey\" line",
				path);
	return 0;
}

int
bm_srv_tls_setup(struct blockmirror_server *s, const char *path)
{
	int r;

	r = check_psk_file(path);
	if (r < 0)
		return r;
	r = gnutls_psk_allocate_server_credentials(&s->psk);
	if (r < 0) {
		s->psk = NULL;
		goto fail;
	}
	r = gnutls_psk_set_server_credentials_file(s->psk, path);
	if (r < 0)
		goto fail;
	r = gnutls_psk_set_server_known_dh_params(s->psk,
						  GNUTLS_SEC_PARAM_MEDIUM);
	if (r < 0)
		goto fail;
	r = gnutls_priority_init(&s->prio, TLS_PRIORITY, NULL);
	if (r < 0) {
		s->prio = NULL;
		goto fail;
	}
	return 0;
fail:
	return bm_error(-EINVAL, "%s: %s", path, gnutls_strerror(r));
}

