/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The replication control channel, making and authenticating channels
 * (repl-channel.h, docs/replication-channel.md): PSK files, listening,
 * accepting, connecting, the Unix peer's uid and the TLS handshake.
 *
 * Invariants:
 *  - A TCP channel becomes ready (c->ready) only after a TLS 1.3 PSK
 *    handshake, a Unix one only after its peer's uid is checked.
 *  - A key file is used only if it is a regular file private to its
 *    owner; the server reads it once at bm_chan_listen, and its keys are
 *    shared by the handshakes of every connection through a reference
 *    count, so that handshakes run on the connections' threads and may
 *    outlive the listener.
 *  - Accepting never reads from a connection: a client that says nothing
 *    holds up only the thread that runs its handshake, until the
 *    handshake's deadline.
 */
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "errors.h"
#include "internal.h"
#include "listen.h"
#include "repl-channel-int.h"
#include "server.h"

/* TLS 1.3 only; a PSK with or without (EC)DHE (forward secrecy when the
 * peer offers it, which GnuTLS does). */
#define CHAN_TLS_PRIORITY \
	"NORMAL:-VERS-ALL:+VERS-TLS1.3:+ECDHE-PSK:+DHE-PSK:+PSK"

/* ---- keys ------------------------------------------------------------- */

void
bm_chan_tls_unref(struct chan_tls_server *t)
{
	if (!t || atomic_fetch_sub(&t->refs, 1) != 1)
		return;
	if (t->cred)
		gnutls_psk_free_server_credentials(t->cred);
	if (t->prio)
		gnutls_priority_deinit(t->prio);
	if (t->keys)
		explicit_bzero(t->keys, t->n_keys * sizeof *t->keys);
	free(t->keys);
	free(t);
}

static int
hex_digit(int ch)
{
	if (ch >= '0' && ch <= '9')
		return ch - '0';
	ch = tolower(ch);
	return ch >= 'a' && ch <= 'f' ? ch - 'a' + 10 : -1;
}

/* One "identity:hexkey" line (without its newline) into *k. */
static int
parse_psk_line(const char *path, unsigned lineno, const char *line,
	       struct psk_key *k)
{
	const char *colon = strchr(line, ':'), *hex;
	size_t id_len, hex_len;

	if (!colon || colon == line)
		return bm_error(-EINVAL, "%s: line %u: expected "
				"identity:hexkey", path, lineno);
	id_len = (size_t)(colon - line);
	hex = colon + 1;
	hex_len = strlen(hex);
	if (id_len > MAX_IDENTITY)
		return bm_error(-EINVAL, "%s: line %u: identity longer than "
				"%u bytes", path, lineno, MAX_IDENTITY);
	if (!hex_len || hex_len % 2 || hex_len / 2 > MAX_KEY)
		return bm_error(-EINVAL, "%s: line %u: the key must be an even "
				"number of hex digits, 2 to %u", path, lineno,
				MAX_KEY * 2);
	for (size_t i = 0; i < hex_len; i += 2) {
		int hi = hex_digit(hex[i]), lo = hex_digit(hex[i + 1]);

		if (hi < 0 || lo < 0)
			return bm_error(-EINVAL, "%s: line %u: the key is not "
					"hexadecimal", path, lineno);
		k->key[i / 2] = (unsigned char)(hi << 4 | lo);
	}
	memcpy(k->identity, line, id_len);
	k->identity[id_len] = '\0';
	k->key_len = hex_len / 2;
	return 0;
}

/*
 * Read a psktool file: a regular file that group and others cannot
 * touch (like ssh with its keys), one or more "identity:hexkey" lines,
 * blank lines allowed, no identity twice.
 */
static int
read_psk_file(const char *path, struct psk_key **keys, size_t *n_keys)
{
	struct psk_key *v = NULL;
	size_t n = 0;
	unsigned lineno = 0;
	char line[MAX_IDENTITY + 2 * MAX_KEY + 8];
	struct stat st;
	FILE *f;
	int r = 0;

	*keys = NULL;
	*n_keys = 0;
	f = fopen(path, "re");
	if (!f)
		return bm_error(-errno, "%s: %s", path, strerror(errno));
	if (fstat(fileno(f), &st) < 0 || !S_ISREG(st.st_mode)) {
		fclose(f);
		return bm_error(-EINVAL, "%s: not a regular file", path);
	}
	if (st.st_mode & 077) {
		fclose(f);
		return bm_error(-EPERM, "%s: the PSK file is accessible by "
				"group or others (mode %04o); it must be "
				"private to its owner: chmod 600 %s", path,
				(unsigned)(st.st_mode & 07777), path);
	}
	while (fgets(line, sizeof line, f)) {
		size_t len = strlen(line);
		struct psk_key *nv;

		lineno++;
		if (len && line[len - 1] == '\n')
			line[--len] = '\0';
		else if (!feof(f)) {
			r = bm_error(-EINVAL, "%s: line %u is too long", path,
				     lineno);
			break;
		}
		if (len && line[len - 1] == '\r')
			line[--len] = '\0';
		if (!len)
			continue;
		nv = realloc(v, (n + 1) * sizeof *v);
		if (!nv) {
			r = bm_error(-ENOMEM, "out of memory");
			break;
		}
		v = nv;
		r = parse_psk_line(path, lineno, line, &v[n]);
		if (r < 0)
			break;
		for (size_t i = 0; i < n && r == 0; i++)
			if (strcmp(v[i].identity, v[n].identity) == 0)
				r = bm_error(-EINVAL, "%s: line %u: identity "
					     "%s is there twice", path, lineno,
					     v[n].identity);
		if (r < 0)
			break;
		n++;
	}
	explicit_bzero(line, sizeof line);
	fclose(f);
	if (r == 0 && !n)
		r = bm_error(-EINVAL, "%s: no \"identity:hexkey\" line (make "
			     "one with psktool)", path);
	if (r < 0) {
		if (v)
			explicit_bzero(v, (n + 1) * sizeof *v);
		free(v);
		return r;
	}
	*keys = v;
	*n_keys = n;
	return 0;
}

/* ---- TLS -------------------------------------------------------------- */

/* The server's key lookup: remembers what the client offered. */
static int
server_psk_lookup(gnutls_session_t session, const gnutls_datum_t *username,
		  gnutls_datum_t *key)
{
	struct bm_chan *c = gnutls_session_get_ptr(session);
	struct chan_tls_server *t = c->server_tls;

	bm_chan_printable(username->data, username->size, c->offered,
		  sizeof c->offered);
	for (size_t i = 0; i < t->n_keys; i++) {
		struct psk_key *k = &t->keys[i];

		if (strlen(k->identity) != username->size ||
		    memcmp(k->identity, username->data, username->size))
			continue;
		key->data = gnutls_malloc(k->key_len);
		if (!key->data)
			return -1;
		memcpy(key->data, k->key, k->key_len);
		key->size = (unsigned)k->key_len;
		c->offered_known = true;
		return 0;
	}
	c->offered_known = false;
	return -1;
}

/* Run the handshake to its end or the deadline: 0, -ETIMEDOUT, -errno,
 * or a GnuTLS error in *tls_err (then returns -EPROTO). */
static int
run_handshake(struct bm_chan *c, int64_t deadline, int *tls_err)
{
	*tls_err = 0;
	for (;;) {
		int r = gnutls_handshake(c->tls), w;

		if (r == GNUTLS_E_SUCCESS)
			break;
		if (r != GNUTLS_E_AGAIN && r != GNUTLS_E_INTERRUPTED &&
		    (r < 0 && gnutls_error_is_fatal(r))) {
			*tls_err = r;
			return -EPROTO;
		}
		w = bm_chan_wait_fd(c->fd, gnutls_record_get_direction(c->tls) ?
					   POLLOUT : POLLIN, deadline);
		if (w < 0)
			return w;
	}
	if (gnutls_protocol_get_version(c->tls) != GNUTLS_TLS1_3) {
		*tls_err = GNUTLS_E_UNSUPPORTED_VERSION_PACKET;
		return -EPROTO;
	}
	return 0;
}

static int
tls_session_new(struct bm_chan *c, unsigned flags, gnutls_priority_t prio)
{
	/* No session tickets: every connection shows its key afresh. */
	int r = gnutls_init(&c->tls, flags | GNUTLS_NONBLOCK |
					     GNUTLS_NO_SIGNAL |
					     GNUTLS_NO_TICKETS);

	if (r < 0) {
		c->tls = NULL;
		return bm_error(-ENOMEM, "tls: %s", gnutls_strerror(r));
	}
	if (prio)
		r = gnutls_priority_set(c->tls, prio);
	else
		r = gnutls_priority_set_direct(c->tls, CHAN_TLS_PRIORITY,
					       NULL);
	if (r < 0)
		return bm_error(-EINVAL, "tls: %s", gnutls_strerror(r));
	gnutls_session_set_ptr(c->tls, c);
	gnutls_transport_set_int(c->tls, c->fd);
	return 0;
}

/* An address, and a PSK file where (and only where) it needs one. */
static int
parse_endpoint(const char *address, const char *psk_file,
	       struct bm_server_address *a)
{
	int r = bm_server_parse_address(address, a);

	if (r < 0)
		return r;
	if (a->unix_socket && psk_file)
		return bm_error(-EINVAL, "%s: a PSK file is for TCP; a Unix "
				"socket is guarded by its mode", address);
	if (!a->unix_socket && !psk_file)
		return bm_error(-EINVAL, "%s: TCP needs a PSK file "
				"(psk_file, --tls-psk-file)", address);
	return 0;
}

/* ---- listening -------------------------------------------------------- */

static int
listen_unix(struct bm_chan_listener *l, const char *path)
{
	struct stat st;
	int r;

	/* Names first: once the file exists, close must find it. */
	l->unix_path = strdup(path);
	if (asprintf(&l->address, "unix:%s", path) < 0)
		l->address = NULL;
	if (!l->unix_path || !l->address)
		return bm_error(-ENOMEM, "out of memory");
	r = bm_listen_unix(path, SOCK_NONBLOCK, &l->fd, &st);
	if (r < 0)
		return r;
	l->dev = st.st_dev;
	l->ino = st.st_ino;
	return 0;
}

static int
tls_server_new(const char *psk_file, struct chan_tls_server **out)
{
	struct chan_tls_server *t = calloc(1, sizeof *t);
	int r;

	if (!t)
		return bm_error(-ENOMEM, "out of memory");
	atomic_init(&t->refs, 1);
	*out = t;
	r = read_psk_file(psk_file, &t->keys, &t->n_keys);
	if (r < 0)
		return r;
	r = gnutls_psk_allocate_server_credentials(&t->cred);
	if (r < 0) {
		t->cred = NULL;
		return bm_error(-ENOMEM, "tls: %s", gnutls_strerror(r));
	}
	gnutls_psk_set_server_credentials_function2(t->cred,
						    server_psk_lookup);
	r = gnutls_psk_set_server_known_dh_params(t->cred,
						  GNUTLS_SEC_PARAM_MEDIUM);
	if (r >= 0)
		r = gnutls_priority_init(&t->prio, CHAN_TLS_PRIORITY, NULL);
	if (r < 0) {
		t->prio = NULL;
		return bm_error(-EINVAL, "tls: %s", gnutls_strerror(r));
	}
	return 0;
}

int
bm_chan_listen(const char *address, const char *psk_file,
	       struct bm_chan_listener **out)
{
	struct bm_server_address a;
	struct bm_chan_listener *l;
	int r;

	*out = NULL;
	r = parse_endpoint(address, psk_file, &a);
	if (r < 0)
		return r;
	l = calloc(1, sizeof *l);
	if (!l)
		return bm_error(-ENOMEM, "out of memory");
	l->fd = -1;
	if (a.unix_socket)
		r = listen_unix(l, a.path);
	else if ((r = tls_server_new(psk_file, &l->tls)) == 0)
		r = bm_listen_tcp(a.host, a.port, SOCK_NONBLOCK, &l->fd,
				  &l->address);
	if (r < 0) {
		bm_chan_listener_close(l);
		return r;
	}
	*out = l;
	return 0;
}

const char *
bm_chan_listener_address(struct bm_chan_listener *l)
{
	return l->address;
}

int
bm_chan_listener_fd(struct bm_chan_listener *l)
{
	return l->fd;
}

void
bm_chan_listener_close(struct bm_chan_listener *l)
{
	struct stat st;

	if (!l)
		return;
	/* Remove the file only while it is still ours. */
	if (l->unix_path && l->ino && lstat(l->unix_path, &st) == 0 &&
	    st.st_dev == l->dev && st.st_ino == l->ino)
		unlink(l->unix_path);
	if (l->fd >= 0)
		close(l->fd);
	bm_chan_tls_unref(l->tls);
	free(l->unix_path);
	free(l->address);
	free(l);
}

int
bm_chan_accept(struct bm_chan_listener *l, int timeout_ms,
	       struct bm_chan **out)
{
	int64_t deadline = bm_chan_deadline(timeout_ms);
	struct sockaddr_storage ss;
	struct bm_chan *c;
	int fd;

	*out = NULL;
	for (;;) {
		socklen_t sl = sizeof ss;
		int r;

		fd = accept4(l->fd, (struct sockaddr *)&ss, &sl,
			     SOCK_CLOEXEC | SOCK_NONBLOCK);
		if (fd >= 0)
			break;
		if (errno == EMFILE || errno == ENFILE || errno == ENOMEM ||
		    errno == ENOBUFS || errno == EBADF || errno == EINVAL)
			return bm_error(-errno, "%s: accept: %s", l->address,
					strerror(errno));
		/* EAGAIN, or a connection that went before we took it. */
		r = bm_chan_wait_fd(l->fd, POLLIN, deadline);
		if (r == -ETIMEDOUT)
			return bm_error(r, "%s: no connection within %d ms",
					l->address, timeout_ms);
		if (r < 0)
			return bm_error(r, "%s: poll: %s", l->address,
					strerror(-r));
	}
	c = bm_chan_new(fd, l->tls != NULL, true);
	if (!c)
		return bm_error(-ENOMEM, "out of memory");
	if (c->tcp) {
		int one = 1;

		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
		bm_format_inet(&ss, c->address, sizeof c->address);
		atomic_fetch_add(&l->tls->refs, 1);
		c->server_tls = l->tls;
	} else {
		strcpy(c->address, "unix");
	}
	snprintf(c->peer, sizeof c->peer, "%s", c->address);
	*out = c;
	return 0;
}

/* The uid at the other end of a Unix socket must be ours or root's. */
static int
check_peer_uid(struct bm_chan *c, const char *role)
{
	struct ucred cred;
	socklen_t len = sizeof cred;

	if (getsockopt(c->fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0)
		return bm_error(-errno, "%s: SO_PEERCRED: %s", c->address,
				strerror(errno));
	snprintf(c->peer, sizeof c->peer, "unix (uid %u)", (unsigned)cred.uid);
	if (cred.uid != geteuid() && cred.uid != 0)
		return bm_chan_break(c, -EPERM, "%s: refused: the %s (pid %d) "
				     "runs as uid %u, neither ours (%u) nor "
				     "root", c->address, role, (int)cred.pid,
				     (unsigned)cred.uid, (unsigned)geteuid());
	return 0;
}

/*
 * Tell a client why its key was refused (GnuTLS would just hang up):
 * one try, never a wait.  The identity is no secret (it travels in
 * clear in the ClientHello); the key's bytes are never hinted at.
 */
static void
refuse(struct bm_chan *c, gnutls_alert_description_t why)
{
	gnutls_alert_send(c->tls, GNUTLS_AL_FATAL, why);
}

int
bm_chan_handshake(struct bm_chan *c, int timeout_ms)
{
	int tls_err, r;

	if (c->err)
		return bm_error(c->err, "%s", c->err_msg);
	if (c->ready || !c->server)
		return 0;
	if (!c->tcp) {
		r = check_peer_uid(c, "client");
		c->ready = r == 0;
		return r;
	}
	r = tls_session_new(c, GNUTLS_SERVER, c->server_tls->prio);
	if (r == 0)
		r = gnutls_credentials_set(c->tls, GNUTLS_CRD_PSK,
					   c->server_tls->cred) < 0 ?
			    bm_error(-ENOMEM, "tls: credentials") : 0;
	if (r < 0)
		return bm_chan_break(c, r, "%s", blockmirror_last_error());
	r = run_handshake(c, bm_chan_deadline(timeout_ms), &tls_err);
	if (r == -ETIMEDOUT)
		return bm_chan_break(c, r, "%s: no TLS handshake within %d ms",
				     c->address, timeout_ms);
	if (r < 0 && !tls_err)
		return bm_chan_break(c, r, "%s: TLS handshake: %s", c->address,
				     strerror(-r));
	if (r < 0 && c->offered[0] && !c->offered_known) {
		refuse(c, GNUTLS_A_UNKNOWN_PSK_IDENTITY);
		return bm_chan_break(c, -EACCES, "tls-psk: %s offered the "
				     "unknown identity %s", c->address,
				     c->offered);
	}
	/* GnuTLS's word for a PSK binder that does not verify. */
	if (r < 0 && c->offered_known &&
	    (tls_err == GNUTLS_E_RECEIVED_ILLEGAL_PARAMETER ||
	     tls_err == GNUTLS_E_DECRYPTION_FAILED)) {
		refuse(c, GNUTLS_A_DECRYPT_ERROR);
		return bm_chan_break(c, -EACCES, "tls-psk: %s has another key "
				     "for identity %s", c->address,
				     c->offered);
	}
	if (r < 0)
		return bm_chan_break(c, -EPROTO, "%s: TLS handshake: %s",
				     c->address, gnutls_strerror(tls_err));
	/* Resumption is off: the identity is the one the lookup saw. */
	snprintf(c->peer, sizeof c->peer, "%s (identity %s)", c->address,
		 c->offered);
	bm_debug("%s: TLS 1.3, key exchange %s", c->peer,
		 gnutls_kx_get_name(gnutls_kx_get(c->tls)));
	c->ready = true;
	return 0;
}

/* ---- connecting ------------------------------------------------------- */

static int
connect_fd(int fd, const struct sockaddr *sa, socklen_t len,
	   int64_t deadline)
{
	int err = 0;
	socklen_t el = sizeof err;

	if (connect(fd, sa, len) == 0)
		return 0;
	if (errno != EINPROGRESS && errno != EAGAIN)
		return -errno;
	err = bm_chan_wait_fd(fd, POLLOUT, deadline);
	if (err < 0)
		return err;
	if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &el) < 0)
		return -errno;
	return -err;
}

static int
connect_unix(struct bm_chan *c, const char *path, int64_t deadline)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int r;

	strcpy(sa.sun_path, path);
	c->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (c->fd < 0)
		return bm_error(-errno, "socket: %s", strerror(errno));
	r = connect_fd(c->fd, (struct sockaddr *)&sa, sizeof sa, deadline);
	if (r < 0)
		return bm_error(r, "%s: connect: %s", c->address,
				strerror(-r));
	r = check_peer_uid(c, "server");
	c->ready = r == 0;
	return r;
}

static int
connect_tcp(struct bm_chan *c, const struct bm_server_address *a,
	    int64_t deadline)
{
	struct addrinfo hints = {
		.ai_family = AF_UNSPEC,
		.ai_socktype = SOCK_STREAM,
		.ai_flags = AI_NUMERICSERV,
	};
	struct addrinfo *res;
	int r, one = 1;

	r = getaddrinfo(a->host, a->port, &hints, &res);
	if (r)
		return bm_error(-EHOSTUNREACH, "%s: %s", c->address,
				gai_strerror(r));
	r = -EHOSTUNREACH;
	for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
		c->fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC |
						      SOCK_NONBLOCK,
			       ai->ai_protocol);
		if (c->fd < 0) {
			r = -errno;
			continue;
		}
		r = connect_fd(c->fd, ai->ai_addr, ai->ai_addrlen, deadline);
		if (r == 0 || r == -ETIMEDOUT)
			break;
		close(c->fd);
		c->fd = -1;
	}
	freeaddrinfo(res);
	if (r < 0)
		return bm_error(r, "%s: connect: %s", c->address,
				strerror(-r));
	setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
	return 0;
}

/* The key for identity (NULL: the first) from the psktool file. */
static int
client_credentials(struct bm_chan *c, const char *psk_file,
		   const char *identity, char *chosen, size_t size)
{
	struct psk_key *keys, *k = NULL;
	size_t n;
	gnutls_datum_t key;
	int r;

	r = read_psk_file(psk_file, &keys, &n);
	if (r < 0)
		return r;
	for (size_t i = 0; i < n && !k; i++)
		if (!identity || strcmp(keys[i].identity, identity) == 0)
			k = &keys[i];
	if (!k) {
		r = bm_error(-ENOENT, "%s: no key for identity %s", psk_file,
			     identity);
		goto out;
	}
	snprintf(chosen, size, "%s", k->identity);
	r = gnutls_psk_allocate_client_credentials(&c->client_cred);
	if (r < 0) {
		c->client_cred = NULL;
		r = bm_error(-ENOMEM, "tls: %s", gnutls_strerror(r));
		goto out;
	}
	key.data = k->key;
	key.size = (unsigned)k->key_len;
	r = gnutls_psk_set_client_credentials(c->client_cred, k->identity,
					      &key, GNUTLS_PSK_KEY_RAW);
	r = r < 0 ? bm_error(-EINVAL, "tls: %s", gnutls_strerror(r)) : 0;
out:
	explicit_bzero(keys, n * sizeof *keys); /* n >= 1 */
	free(keys);
	return r;
}

static const char *
refusal_reason(struct bm_chan *c, int tls_err)
{
	if (tls_err != GNUTLS_E_FATAL_ALERT_RECEIVED)
		return "it hung up during the handshake";
	switch (gnutls_alert_get(c->tls)) {
	case GNUTLS_A_UNKNOWN_PSK_IDENTITY:
		return "it has no key for that identity";
	case GNUTLS_A_DECRYPT_ERROR:
		return "it has another key for that identity";
	default:
		return gnutls_alert_get_name(gnutls_alert_get(c->tls));
	}
}

static int
client_tls(struct bm_chan *c, const char *id, int64_t deadline,
	   int timeout_ms)
{
	int tls_err, r;

	r = tls_session_new(c, GNUTLS_CLIENT, NULL);
	if (r == 0 && gnutls_credentials_set(c->tls, GNUTLS_CRD_PSK,
					     c->client_cred) < 0)
		r = bm_error(-ENOMEM, "tls: credentials");
	if (r < 0)
		return r;
	r = run_handshake(c, deadline, &tls_err);
	if (r == -ETIMEDOUT)
		return bm_error(r, "%s: no TLS handshake within %d ms",
				c->address, timeout_ms);
	if (r < 0 && !tls_err)
		return bm_error(r, "%s: TLS handshake: %s", c->address,
				strerror(-r));
	/*
	 * A TLS 1.3 server that does not take our PSK answers with an
	 * alert (ours say whether the identity or the key was wrong) or
	 * hangs up without a word.
	 */
	if (r < 0 && (tls_err == GNUTLS_E_FATAL_ALERT_RECEIVED ||
		      tls_err == GNUTLS_E_PREMATURE_TERMINATION ||
		      tls_err == GNUTLS_E_PUSH_ERROR ||
		      tls_err == GNUTLS_E_PULL_ERROR ||
		      tls_err == GNUTLS_E_DECRYPTION_FAILED))
		return bm_error(-EACCES, "tls-psk: the replica at %s refused "
				"the key for identity %s (%s)", c->address,
				id, refusal_reason(c, tls_err));
	if (r < 0)
		return bm_error(-EPROTO, "%s: TLS handshake: %s", c->address,
				gnutls_strerror(tls_err));
	snprintf(c->peer, sizeof c->peer, "%s (identity %s)", c->address, id);
	c->ready = true;
	return 0;
}

int
bm_chan_connect(const char *address, const char *psk_file,
		const char *identity, int timeout_ms, struct bm_chan **out)
{
	int64_t deadline = bm_chan_deadline(timeout_ms);
	struct bm_server_address a;
	char id[MAX_IDENTITY + 1];
	struct bm_chan *c;
	int r;

	*out = NULL;
	r = parse_endpoint(address, psk_file, &a);
	if (r < 0)
		return r;
	c = bm_chan_new(-1, !a.unix_socket, false);
	if (!c)
		return bm_error(-ENOMEM, "out of memory");
	snprintf(c->address, sizeof c->address, "%s", address);
	snprintf(c->peer, sizeof c->peer, "%s", address);
	/* The key file first: a bad one is refused before any traffic. */
	if (a.unix_socket)
		r = connect_unix(c, a.path, deadline);
	else if ((r = client_credentials(c, psk_file, identity, id,
					 sizeof id)) == 0 &&
		 (r = connect_tcp(c, &a, deadline)) == 0)
		r = client_tls(c, id, deadline, timeout_ms);
	if (r < 0) {
		bm_chan_close(c);
		return r;
	}
	*out = c;
	return 0;
}

int
bm_chan_from_fd(int fd, struct bm_chan **out)
{
	struct bm_chan *c;
	int fl = fcntl(fd, F_GETFL);

	*out = NULL;
	if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) {
		int r = -errno;

		close(fd);
		return bm_error(r, "fd %d: %s", fd, strerror(-r));
	}
	c = bm_chan_new(fd, false, false);
	if (!c)
		return bm_error(-ENOMEM, "out of memory");
	strcpy(c->address, "unix");
	strcpy(c->peer, "unix (socket pair)");
	c->ready = true;
	*out = c;
	return 0;
}
