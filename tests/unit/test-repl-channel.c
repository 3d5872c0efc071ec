/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The replication control channel (lib/repl-channel.c), over each
 * transport: a Unix socket, TCP on 127.0.0.1 and on [::1] (TLS 1.3 with
 * a PSK).  A test server runs here on threads, one per connection, the
 * way the replica daemon will: "echo" answers with what it got, "fail"
 * with an error reply, "raw" sends bytes as they are (a bad peer) and may
 * hang up after them.  What it could not authenticate goes to its log,
 * which the tests read.
 *
 * What comes back is compared with what was sent (the model): messages
 * of a few bytes and of 3 MiB, base64 members; then the line limit at its
 * boundary, garbage, a peer that hangs up, a silent one, a client that
 * never does its handshake while another is served, wrong keys, unsafe
 * or missing key files, the Unix socket file's life, error replies.
 */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <blockmirror/blockmirror.h>

#include "helpers.h"
#include "internal.h"
#include "repl-channel.h"

#define MAX_LINE BM_CHAN_MAX_LINE
#define KEY_A "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
#define KEY_B "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210"

enum transport { UNIX, TCP4, TCP6, N_TRANSPORTS };
static const char *const transport_names[] = { "unix", "tcp4", "tcp6" };

static char dir[256];
static char keys[300];	   /* primary1 and primary2, mode 0600 */

static void
write_file(const char *path, const char *text, mode_t mode)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);

	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(write(fd, text, strlen(text)), (ssize_t)strlen(text));
	ck_assert_int_eq(fchmod(fd, mode), 0);
	close(fd);
}

static void
setup(void)
{
	snprintf(dir, sizeof dir, "/tmp/bm-test-rchan.XXXXXX");
	ck_assert_ptr_nonnull(mkdtemp(dir));
	snprintf(keys, sizeof keys, "%s/keys.psk", dir);
	write_file(keys, "primary1:" KEY_A "\nprimary2:" KEY_B "\n", 0600);
}

static void
teardown(void)
{
	remove_tree(dir);
}

/* ---- the test server -------------------------------------------------- */

#define MAX_CONNS 16

struct server {
	struct bm_chan_listener *l;
	pthread_t thread, conns[MAX_CONNS];
	int n_conns;
	int handshake_ms;
	atomic_bool stop;
	pthread_mutex_t lock;
	char log[MAX_CONNS][600];
	int n_log;
};

struct conn {
	struct server *s;
	struct bm_chan *c;
};

static void
server_log(struct server *s, const char *msg)
{
	pthread_mutex_lock(&s->lock);
	if (s->n_log < MAX_CONNS)
		snprintf(s->log[s->n_log++], sizeof s->log[0], "%s", msg);
	pthread_mutex_unlock(&s->lock);
}

/* Wait up to ms for a log line containing `what`. */
static bool
server_logged(struct server *s, const char *what, unsigned ms)
{
	uint64_t end = now_ms() + ms;

	do {
		bool found = false;

		pthread_mutex_lock(&s->lock);
		for (int i = 0; i < s->n_log; i++)
			found = found || strstr(s->log[i], what);
		pthread_mutex_unlock(&s->lock);
		if (found)
			return true;
		sleep_ms(10);
	} while (now_ms() < end);
	for (int i = 0; i < s->n_log; i++)
		fprintf(stderr, "server log: %s\n", s->log[i]);
	return false;
}

/* Bytes for "raw": data + fill times 'x' + then. */
static void
send_raw(struct bm_chan *c, json_t *req)
{
	void *data = NULL, *then = NULL;
	size_t dlen = 0, tlen = 0, fill;
	char *buf;

	bm_chan_b64_get(req, "data", &data, &dlen, MAX_LINE);
	bm_chan_b64_get(req, "then", &then, &tlen, MAX_LINE);
	fill = (size_t)json_integer_value(json_object_get(req, "fill"));
	buf = malloc(dlen + fill + tlen + 1);
	memcpy(buf, data, dlen);
	memset(buf + dlen, 'x', fill);
	memcpy(buf + dlen + fill, then, tlen);
	bm_chan_send_bytes(c, buf, dlen + fill + tlen, 10000);
	free(buf);
	free(data);
	free(then);
}

static void *
conn_main(void *arg)
{
	struct conn *cn = arg;
	struct bm_chan *c = cn->c;
	json_t *m;

	if (bm_chan_handshake(c, cn->s->handshake_ms) < 0) {
		server_log(cn->s, blockmirror_last_error());
		goto out;
	}
	server_log(cn->s, bm_chan_peer(c));
	while (bm_chan_recv(c, &m, 10000) == 0) {
		const char *op = json_string_value(json_object_get(m, "op"));
		bool close = json_is_true(json_object_get(m, "close"));
		json_t *echo = json_pack("{s:O}", "echo", m);

		if (op && strcmp(op, "fail") == 0) {
			bm_chan_reply(c, NULL, -ENOSPC, "replica disk full",
				      10000);
		} else if (op && strcmp(op, "raw") == 0) {
			send_raw(c, m);
		} else {
			ck_assert_int_eq(bm_chan_reply(c, echo, 0, NULL, 10000),
					 0);
		}
		json_decref(echo);
		json_decref(m);
		if (close)
			break;
	}
out:
	bm_chan_close(c);
	free(cn);
	return NULL;
}

static void *
server_main(void *arg)
{
	struct server *s = arg;

	while (!atomic_load(&s->stop)) {
		struct conn *cn;
		struct bm_chan *c;

		if (bm_chan_accept(s->l, 50, &c) < 0)
			continue;
		ck_assert_int_lt(s->n_conns, MAX_CONNS);
		cn = malloc(sizeof *cn);
		cn->s = s;
		cn->c = c;
		ck_assert_int_eq(pthread_create(&s->conns[s->n_conns++], NULL,
						conn_main, cn), 0);
	}
	return NULL;
}

static const char *
listen_address(enum transport t, char *buf, size_t size)
{
	if (t == UNIX)
		snprintf(buf, size, "unix:%s/repl.sock", dir);
	else
		snprintf(buf, size, t == TCP4 ? "tcp::0" : "tcp:[::1]:0");
	return buf;
}

static struct server *
server_start(enum transport t, int handshake_ms)
{
	struct server *s = calloc(1, sizeof *s);
	char addr[300];
	int r;

	pthread_mutex_init(&s->lock, NULL);
	s->handshake_ms = handshake_ms;
	r = bm_chan_listen(listen_address(t, addr, sizeof addr),
			   t == UNIX ? NULL : keys, &s->l);
	ck_assert_msg(r == 0, "listen %s: %s", addr, blockmirror_last_error());
	ck_assert_int_eq(pthread_create(&s->thread, NULL, server_main, s), 0);
	return s;
}

static void
server_stop(struct server *s)
{
	atomic_store(&s->stop, true);
	pthread_join(s->thread, NULL);
	for (int i = 0; i < s->n_conns; i++)
		pthread_join(s->conns[i], NULL);
	bm_chan_listener_close(s->l);
	pthread_mutex_destroy(&s->lock);
	free(s);
}

static struct bm_chan *
client(struct server *s, enum transport t)
{
	const char *addr = bm_chan_listener_address(s->l);
	struct bm_chan *c;
	int r;

	r = bm_chan_connect(addr, t == UNIX ? NULL : keys, NULL, 5000, &c);
	ck_assert_msg(r == 0, "connect %s: %s", addr, blockmirror_last_error());
	return c;
}

/* A server on transport t, and a client of it. */
static struct bm_chan *
open_pair(int t, struct server **s)
{
	*s = server_start((enum transport)t, 5000);
	return client(*s, (enum transport)t);
}

static void
close_pair(struct server *s, struct bm_chan *c)
{
	bm_chan_close(c);
	server_stop(s);
}

/* Ask the server to send data + fill 'x' + then, and maybe hang up. */
static void
ask_raw(struct bm_chan *c, const char *data, size_t fill, const char *then,
	bool close)
{
	json_t *req = json_pack("{s:s, s:I, s:b}", "op", "raw", "fill",
				(json_int_t)fill, "close", close);

	ck_assert_int_eq(bm_chan_b64_put(req, "data", data, strlen(data)), 0);
	ck_assert_int_eq(bm_chan_b64_put(req, "then", then, strlen(then)), 0);
	ck_assert_int_eq(bm_chan_send(c, req, 5000), 0);
	json_decref(req);
}

static void
expect_recv_error(struct bm_chan *c, int err, const char *what)
{
	json_t *m = NULL;
	int r = bm_chan_recv(c, &m, 10000);

	ck_assert_msg(r == err, "recv: %d (%s), expected %d", r,
		      blockmirror_last_error(), err);
	ck_assert_ptr_null(m);
	ck_assert_msg(strstr(blockmirror_last_error(), what),
		      "\"%s\" does not say \"%s\"", blockmirror_last_error(),
		      what);
}

/* ---- round trips ------------------------------------------------------- */

START_TEST(test_round_trip)
{
	struct server *s;
	struct bm_chan *c = open_pair(_i, &s);
	size_t big_len = (size_t)9 << 18; /* 2.25 MiB: 3 MiB of base64 */
	unsigned char *big = malloc(big_len);
	uint64_t seed = 18;
	json_t *req, *res;
	void *back;
	size_t back_len;

	fprintf(stderr, "round trip over %s: %s\n", transport_names[_i],
		bm_chan_peer(c));
	if (_i == UNIX) {
		char want[64];

		snprintf(want, sizeof want, "unix (uid %u)",
			 (unsigned)geteuid());
		ck_assert_str_eq(bm_chan_peer(c), want);
	} else
		ck_assert_ptr_nonnull(strstr(bm_chan_peer(c),
					     "(identity primary1)"));

	/* A small request with an id: the reply echoes op and id. */
	req = json_pack("{s:s, s:i, s:s}", "op", "hello", "id", 7, "gen",
			"d1a5\xc3\xa9");
	ck_assert_int_eq(bm_chan_call(c, req, &res, 5000), 0);
	ck_assert(json_equal(json_object_get(res, "echo"), req));
	json_decref(res);
	json_decref(req);

	/* 3 MiB of base64 each way, compared byte for byte. */
	for (size_t i = 0; i < big_len; i++)
		big[i] = (unsigned char)rnd(&seed);
	req = json_pack("{s:s, s:i}", "op", "digests", "id", 8);
	ck_assert_int_eq(bm_chan_b64_put(req, "digests", big, big_len), 0);
	ck_assert_uint_eq(json_string_length(json_object_get(req, "digests")),
			  3u << 20);
	ck_assert_int_eq(bm_chan_call(c, req, &res, 10000), 0);
	ck_assert_int_eq(bm_chan_b64_get(json_object_get(res, "echo"),
					 "digests", &back, &back_len, big_len),
			 0);
	ck_assert_uint_eq(back_len, big_len);
	ck_assert(memcmp(back, big, big_len) == 0);
	free(back);
	json_decref(res);
	json_decref(req);

	/* An error reply: -errno and the peer's message. */
	req = json_pack("{s:s, s:i}", "op", "fail", "id", 9);
	ck_assert_int_eq(bm_chan_call(c, req, &res, 5000), -ENOSPC);
	ck_assert_ptr_null(res);
	ck_assert_ptr_nonnull(strstr(blockmirror_last_error(),
				     "replica disk full"));
	json_decref(req);

	/* Still usable after an error reply. */
	req = json_pack("{s:s}", "op", "status");
	ck_assert_int_eq(bm_chan_call(c, req, &res, 5000), 0);
	ck_assert(json_equal(json_object_get(res, "echo"), req));
	json_decref(res);
	json_decref(req);

	close_pair(s, c);
	free(big);
}
END_TEST

/* ---- the line limit ---------------------------------------------------- */

START_TEST(test_line_limit)
{
	struct server *s;
	struct bm_chan *c = open_pair(_i, &s);
	const char *head = "{\"p\":\"", *tail = "\"}\n";
	size_t frame = strlen(head) + strlen(tail) - 1;
	json_t *m, *big;
	char *pad;

	/* A line of exactly 4 MiB is taken... */
	ask_raw(c, head, MAX_LINE - frame, tail, false);
	ck_assert_int_eq(bm_chan_recv(c, &m, 10000), 0);
	ck_assert_uint_eq(json_string_length(json_object_get(m, "p")),
			  MAX_LINE - frame);
	json_decref(m);

	/* ...and so is one the sender must refuse to make longer. */
	pad = malloc(MAX_LINE);
	memset(pad, 'y', MAX_LINE - 1);
	pad[MAX_LINE - 1] = '\0';
	big = json_pack("{s:s}", "p", pad);
	ck_assert_int_eq(bm_chan_send(c, big, 5000), -EMSGSIZE);
	json_decref(big);
	free(pad);

	/* 5 MiB without a newline, then a good line: refused, and the good
	 * line is never read. */
	ask_raw(c, head, 5u << 20, "\"}\n{\"op\":\"later\"}\n", false);
	expect_recv_error(c, -EPROTO, "4 MiB");
	expect_recv_error(c, -EPROTO, "4 MiB");

	close_pair(s, c);
}
END_TEST

/* One byte over: refused, over every transport. */
START_TEST(test_line_limit_plus_one)
{
	struct server *s;
	struct bm_chan *c = open_pair(_i, &s);

	ask_raw(c, "{\"p\":\"", MAX_LINE - 7, "\"}\n", false);
	expect_recv_error(c, -EPROTO, "limit of 4194304 bytes");
	close_pair(s, c);
}
END_TEST

/* ---- bad lines ---------------------------------------------------------- */

static const struct {
	const char *bytes, *says;
	int err;
} bad_lines[] = {
	{ "hello\n", "not JSON", -EPROTO },
	{ "{\"a\":\"\xff\xfe\"}\n", "UTF-8", -EPROTO },
	{ "{\"a\":\"\xc3\"}\n", "UTF-8", -EPROTO },
	{ "[1,2]\n", "an array, not a JSON object", -EPROTO },
	{ "\"s\"\n", "a string, not a JSON object", -EPROTO },
	{ "\n", "not JSON", -EPROTO },
	{ "{\"a\":1}{\"b\":2}\n", "not JSON", -EPROTO },
	{ "{\"a\":1,\"a\":2}\n", "duplicate", -EPROTO },
	{ "{\"op\":5}\n", "\"op\" is not a string", -EPROTO },
	{ "{\"id\":\"x\"}\n", "\"id\" is not", -EPROTO },
	{ "{\"a\":\"\\u0000\"}\n", "not JSON", -EPROTO },
	{ "{\"a\":", "middle of a line (5 bytes", -ECONNRESET },
	{ "", "closed the connection", -ECONNRESET },
};

START_TEST(test_bad_lines)
{
	struct server *s = server_start((enum transport)(_i % N_TRANSPORTS),
					5000);

	for (size_t i = 0; i < BM_ARRAY_SIZE(bad_lines); i++) {
		struct bm_chan *c = client(s, (enum transport)(_i %
							       N_TRANSPORTS));
		bool hang_up = bad_lines[i].err == -ECONNRESET;
		json_t *m;

		/* A good line first: the bad one comes second. */
		ask_raw(c, "{\"op\":\"good\"}\n", 0, bad_lines[i].bytes,
			hang_up);
		ck_assert_int_eq(bm_chan_recv(c, &m, 5000), 0);
		ck_assert_str_eq(json_string_value(json_object_get(m, "op")),
				 "good");
		json_decref(m);
		expect_recv_error(c, bad_lines[i].err, bad_lines[i].says);
		ck_assert_ptr_nonnull(strstr(blockmirror_last_error(),
					     hang_up ? "" : "line 2"));
		/* Broken for good: a send fails too. */
		m = json_pack("{s:s}", "op", "x");
		ck_assert_int_eq(bm_chan_send(c, m, 1000), bad_lines[i].err);
		json_decref(m);
		bm_chan_close(c);
	}
	server_stop(s);
}
END_TEST

/* ---- deadlines ---------------------------------------------------------- */

START_TEST(test_silent_peer)
{
	struct server *s;
	struct bm_chan *c = open_pair(_i, &s);
	uint64_t t0 = now_ms(), dt;
	json_t *m = NULL;

	ck_assert_int_eq(bm_chan_recv(c, &m, 300), -ETIMEDOUT);
	dt = now_ms() - t0;
	/* The upper bound leaves room for a loaded machine and TSan. */
	ck_assert_msg(dt >= 290 && dt <= 3000, "timed out after %llu ms",
		      (unsigned long long)dt);
	ck_assert_ptr_null(m);

	/* Half a line, then silence: a timeout too, and what came is kept
	 * for the next call. */
	ask_raw(c, "{\"op\":\"ha", 0, "", false);
	t0 = now_ms();
	ck_assert_int_eq(bm_chan_recv(c, &m, 300), -ETIMEDOUT);
	ck_assert_uint_le(now_ms() - t0, 3000);
	ask_raw(c, "lf\"}\n", 0, "", false);
	ck_assert_int_eq(bm_chan_recv(c, &m, 5000), 0);
	ck_assert_str_eq(json_string_value(json_object_get(m, "op")), "half");
	json_decref(m);
	close_pair(s, c);
}
END_TEST

/* A client that connects and says nothing holds up only its own
 * handshake; it is dropped after the deadline. */
START_TEST(test_handshake_deadline)
{
	struct server *s = server_start(TCP4, 3000);
	const char *addr = bm_chan_listener_address(s->l);
	int port = atoi(strrchr(addr, ':') + 1);
	struct sockaddr_in sa = { .sin_family = AF_INET,
				  .sin_port = htons((uint16_t)port),
				  .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	int silent = socket(AF_INET, SOCK_STREAM, 0);
	uint64_t t0 = now_ms();
	struct bm_chan *c;
	json_t *req, *res;
	char buf[1];

	ck_assert_int_eq(connect(silent, (struct sockaddr *)&sa, sizeof sa), 0);
	c = client(s, TCP4);
	req = json_pack("{s:s}", "op", "hello");
	ck_assert_int_eq(bm_chan_call(c, req, &res, 5000), 0);
	json_decref(res);
	json_decref(req);
	/* Well before the silent one's deadline, on a loaded machine too. */
	ck_assert_msg(now_ms() - t0 < 2500, "the second client waited");

	ck_assert(server_logged(s, "no TLS handshake within 3000 ms", 6000));
	ck_assert_uint_le(now_ms() - t0, 6000);
	/* The server hung up on it. */
	ck_assert_int_eq(read(silent, buf, 1), 0);
	close(silent);

	/* A client that speaks without TLS is refused, not read. */
	silent = socket(AF_INET, SOCK_STREAM, 0);
	ck_assert_int_eq(connect(silent, (struct sockaddr *)&sa, sizeof sa), 0);
	ck_assert_int_eq(write(silent, "{\"op\":\"hello\"}\n", 15), 15);
	ck_assert(server_logged(s, "TLS handshake: ", 3000));
	close(silent);
	close_pair(s, c);
}
END_TEST

/* ---- keys ---------------------------------------------------------------- */

static void
expect_refused(struct server *s, const char *psk_text, const char *identity,
	       const char *client_says, const char *server_says)
{
	char path[300], want[400];
	const char *addr = bm_chan_listener_address(s->l);
	struct bm_chan *c = NULL;
	uint64_t t0 = now_ms();
	int r;

	snprintf(path, sizeof path, "%s/other.psk", dir);
	write_file(path, psk_text, 0600);
	r = bm_chan_connect(addr, path, identity, 5000, &c);
	ck_assert_msg(r == -EACCES, "connect: %d %s", r,
		      blockmirror_last_error());
	ck_assert_ptr_null(c);
	snprintf(want, sizeof want, "tls-psk: the replica at %s refused the "
		 "key for identity %s", addr, client_says);
	ck_assert_msg(strstr(blockmirror_last_error(), want), "%s",
		      blockmirror_last_error());
	fprintf(stderr, "client: %s\n", blockmirror_last_error());
	ck_assert_uint_lt(now_ms() - t0, 2000);
	ck_assert(server_logged(s, server_says, 3000));
	pthread_mutex_lock(&s->lock);
	fprintf(stderr, "server: %s\n", s->log[s->n_log - 1]);
	pthread_mutex_unlock(&s->lock);
}

START_TEST(test_wrong_key)
{
	struct server *s = server_start((enum transport)_i, 5000);

	expect_refused(s, "primary1:" KEY_B "\n", NULL,
		       "primary1 (it has another key for that identity)",
		       "has another key for identity primary1");
	expect_refused(s, "primary1:" KEY_A "\nprimary2:" KEY_A "\n",
		       "primary2", "primary2 (it has another key",
		       "has another key for identity primary2");
	expect_refused(s, "stranger:" KEY_A "\n", NULL,
		       "stranger (it has no key for that identity)",
		       "offered the unknown identity stranger");
	server_stop(s);
}
END_TEST

START_TEST(test_psk_files)
{
	struct bm_chan_listener *l = NULL;
	struct bm_chan *c = NULL;
	char path[300];
	static const struct {
		const char *text;
		mode_t mode;
		int err;
		const char *says;
	} cases[] = {
		{ "primary1:" KEY_A "\n", 0644, -EPERM, "group or others" },
		{ "primary1:" KEY_A "\n", 0640, -EPERM, "mode 0640" },
		{ "", 0600, -EINVAL, "no \"identity:hexkey\" line" },
		{ "\n\n", 0600, -EINVAL, "no \"identity:hexkey\" line" },
		{ "primary1\n", 0600, -EINVAL, "line 1: expected" },
		{ "a:" KEY_A "\nb:12z4\n", 0600, -EINVAL, "line 2: the key is not" },
		{ "a:123\n", 0600, -EINVAL, "even number" },
		{ "a:" KEY_A "\na:" KEY_B "\n", 0600, -EINVAL, "twice" },
	};

	snprintf(path, sizeof path, "%s/bad.psk", dir);
	for (size_t i = 0; i < BM_ARRAY_SIZE(cases); i++) {
		write_file(path, cases[i].text, cases[i].mode);
		ck_assert_int_eq(bm_chan_listen("tcp::0", path, &l),
				 cases[i].err);
		ck_assert_ptr_null(l);
		ck_assert_msg(strstr(blockmirror_last_error(), cases[i].says),
			      "case %zu: %s", i, blockmirror_last_error());
		ck_assert_ptr_nonnull(strstr(blockmirror_last_error(), path));
		ck_assert_int_eq(bm_chan_connect("tcp::1", path, NULL, 1000,
						 &c), cases[i].err);
		ck_assert_ptr_null(c);
	}

	/* Missing, and not given. */
	snprintf(path, sizeof path, "%s/missing.psk", dir);
	ck_assert_int_eq(bm_chan_listen("tcp::0", path, &l), -ENOENT);
	ck_assert_ptr_nonnull(strstr(blockmirror_last_error(), path));
	ck_assert_int_eq(bm_chan_connect("tcp::1", path, NULL, 1000, &c),
			 -ENOENT);
	ck_assert_int_eq(bm_chan_listen("tcp::0", NULL, &l), -EINVAL);
	ck_assert_ptr_nonnull(strstr(blockmirror_last_error(), "PSK file"));
	ck_assert_int_eq(bm_chan_connect("tcp::1", NULL, NULL, 1000, &c),
			 -EINVAL);
	ck_assert_ptr_nonnull(strstr(blockmirror_last_error(), "PSK file"));
	/* An identity the file does not have. */
	ck_assert_int_eq(bm_chan_connect("tcp::1", keys, "nobody", 1000, &c),
			 -ENOENT);
	ck_assert_ptr_nonnull(strstr(blockmirror_last_error(), "nobody"));
	/* Nobody there: refused at once, not after the deadline. */
	ck_assert_int_eq(bm_chan_connect("unix:/nonexistent/x.sock", NULL,
					 NULL, 5000, &c), -ENOENT);
	ck_assert_ptr_nonnull(strstr(blockmirror_last_error(),
				     "unix:/nonexistent/x.sock"));
	/* Bad addresses. */
	ck_assert_int_eq(bm_chan_listen("udp:x", NULL, &l), -EINVAL);
	ck_assert_int_eq(bm_chan_listen("tcp:::1:0", keys, &l), -EINVAL);
}
END_TEST

/* ---- the Unix socket file ------------------------------------------------- */

START_TEST(test_unix_socket_file)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	struct bm_chan_listener *l = NULL, *l2 = NULL;
	char addr[320], path[300], buf[16];
	struct stat st;
	int fd;

	snprintf(path, sizeof path, "%s/repl.sock", dir);
	snprintf(addr, sizeof addr, "unix:%s", path);
	/* A stale socket (nobody listens) is replaced. */
	strcpy(sa.sun_path, path);
	fd = socket(AF_UNIX, SOCK_STREAM, 0);
	ck_assert_int_eq(bind(fd, (struct sockaddr *)&sa, sizeof sa), 0);
	close(fd);
	ck_assert_int_eq(chmod(path, 0666), 0);
	ck_assert_int_eq(bm_chan_listen(addr, NULL, &l), 0);
	ck_assert_str_eq(bm_chan_listener_address(l), addr);
	ck_assert_int_eq(lstat(path, &st), 0);
	ck_assert(S_ISSOCK(st.st_mode));
	ck_assert_uint_eq(st.st_mode & 0777, 0600);
	/* A live one is not. */
	ck_assert_int_eq(bm_chan_listen(addr, NULL, &l2), -EADDRINUSE);
	ck_assert_ptr_null(l2);
	/* Closing removes the file. */
	bm_chan_listener_close(l);
	ck_assert_int_eq(lstat(path, &st), -1);

	/* A regular file there is never replaced. */
	write_file(path, "precious", 0600);
	ck_assert_int_eq(bm_chan_listen(addr, NULL, &l), -EEXIST);
	ck_assert_ptr_nonnull(strstr(blockmirror_last_error(),
				     "not a socket"));
	fd = open(path, O_RDONLY);
	ck_assert_int_eq(read(fd, buf, sizeof buf), 8);
	ck_assert(memcmp(buf, "precious", 8) == 0);
	close(fd);
	/* Nor is a PSK file accepted for a Unix socket. */
	ck_assert_int_eq(bm_chan_listen(addr, keys, &l), -EINVAL);
}
END_TEST

/* The peer's uid is checked even when the file's mode lets anyone in
 * (only root can play another user here). */
START_TEST(test_unix_peer_uid)
{
	struct server *s;
	char path[300];
	pid_t pid;
	int status;

	if (geteuid() != 0)
		return;
	s = server_start(UNIX, 5000);
	snprintf(path, sizeof path, "%s/repl.sock", dir);
	ck_assert_int_eq(chmod(dir, 0755), 0);
	ck_assert_int_eq(chmod(path, 0666), 0);
	pid = fork();
	if (pid == 0) {
		struct bm_chan *c;
		json_t *req = json_pack("{s:s}", "op", "hello"), *res;

		if (setgid(65534) < 0 || setuid(65534) < 0)
			_exit(2);
		/* Our own check of the server refuses root?  No: root is
		 * allowed; the server refuses us. */
		if (bm_chan_connect(bm_chan_listener_address(s->l), NULL, NULL,
				    5000, &c) < 0)
			_exit(3);
		_exit(bm_chan_call(c, req, &res, 5000) == -ECONNRESET ? 0 : 4);
	}
	ck_assert_int_eq(waitpid(pid, &status, 0), pid);
	ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0,
		      "child: %d", status);
	ck_assert(server_logged(s, "runs as uid 65534, neither ours (0) nor "
				   "root", 3000));
	server_stop(s);
}
END_TEST

/* ---- replies and base64, without sockets ----------------------------------- */

START_TEST(test_parse_reply)
{
	json_t *req = json_pack("{s:s, s:i}", "op", "commit", "id", 4);
	static const struct {
		const char *reply;
		int err;
		const char *says;
	} cases[] = {
		{ "{\"op\":\"commit\",\"id\":4,\"return\":{\"n\":1}}", 0, NULL },
		{ "{\"op\":\"commit\",\"id\":4,\"error\":{\"errno\":28,"
		  "\"message\":\"full\"}}", -ENOSPC, "peer: full" },
		{ "{\"op\":\"commit\",\"id\":5,\"return\":{}}", -EPROTO,
		  "\"id\" is not the request's" },
		{ "{\"op\":\"commit\",\"return\":{}}", -EPROTO, "\"id\"" },
		{ "{\"op\":\"begin\",\"id\":4,\"return\":{}}", -EPROTO,
		  "\"op\"" },
		{ "{\"op\":\"commit\",\"id\":4}", -EPROTO, "neither" },
		{ "{\"op\":\"commit\",\"id\":4,\"return\":{},\"error\":{}}",
		  -EPROTO, "both" },
		{ "{\"op\":\"commit\",\"id\":4,\"return\":[]}", -EPROTO,
		  "an array" },
		{ "{\"op\":\"commit\",\"id\":4,\"error\":{\"errno\":0,"
		  "\"message\":\"x\"}}", -EPROTO, "errno" },
		{ "{\"op\":\"commit\",\"id\":4,\"error\":{\"errno\":-5,"
		  "\"message\":\"x\"}}", -EPROTO, "errno" },
		{ "{\"op\":\"commit\",\"id\":4,\"error\":{\"errno\":5}}",
		  -EPROTO, "message" },
	};

	for (size_t i = 0; i < BM_ARRAY_SIZE(cases); i++) {
		json_t *reply = json_loads(cases[i].reply, 0, NULL), *res;
		int r = bm_chan_parse_reply(req, reply, "peer", &res);

		ck_assert_msg(r == cases[i].err, "case %zu: %d", i, r);
		if (r == 0) {
			ck_assert_int_eq(json_integer_value(
						 json_object_get(res, "n")), 1);
			json_decref(res);
		} else {
			ck_assert_ptr_null(res);
			ck_assert_msg(strstr(blockmirror_last_error(),
					     cases[i].says),
				      "case %zu: %s", i,
				      blockmirror_last_error());
		}
		json_decref(reply);
	}
	json_decref(req);
}
END_TEST

START_TEST(test_base64)
{
	static const struct {
		const char *text, *b64;
	} vectors[] = { /* RFC 4648, section 10 */
		{ "", "" }, { "f", "Zg==" }, { "fo", "Zm8=" },
		{ "foo", "Zm9v" }, { "foob", "Zm9vYg==" },
		{ "fooba", "Zm9vYmE=" }, { "foobar", "Zm9vYmFy" },
	};
	static const char *const bad[] = {
		"Zg=", "Zh==", "Zm9=", "Z===", "====", "Zm9v=Zm9", "Zm 9",
		"Zm9\n", "Zm9v\0AAA", "Zm-_", "Zg==Zg==",
	};
	uint64_t seed = 4648;
	json_t *o = json_object();
	void *buf;
	size_t len;

	for (size_t i = 0; i < BM_ARRAY_SIZE(vectors); i++) {
		size_t n = strlen(vectors[i].text);

		ck_assert_int_eq(bm_chan_b64_put(o, "d", vectors[i].text, n),
				 0);
		ck_assert_str_eq(json_string_value(json_object_get(o, "d")),
				 vectors[i].b64);
		ck_assert_int_eq(bm_chan_b64_get(o, "d", &buf, &len, n), 0);
		ck_assert_uint_eq(len, n);
		ck_assert(memcmp(buf, vectors[i].text, n) == 0);
		free(buf);
		if (n) {
			/* One byte over the maximum: refused before
			 * decoding. */
			ck_assert_int_eq(bm_chan_b64_get(o, "d", &buf, &len,
							 n - 1), -EMSGSIZE);
			ck_assert_ptr_null(buf);
		}
	}
	for (size_t n = 0; n < 300; n++) {
		unsigned char data[300];

		for (size_t i = 0; i < n; i++)
			data[i] = (unsigned char)rnd(&seed);
		ck_assert_int_eq(bm_chan_b64_put(o, "d", data, n), 0);
		ck_assert_int_eq(bm_chan_b64_get(o, "d", &buf, &len, n), 0);
		ck_assert_uint_eq(len, n);
		ck_assert(memcmp(buf, data, n) == 0);
		free(buf);
	}
	for (size_t i = 0; i < BM_ARRAY_SIZE(bad); i++) {
		size_t n = i == 8 ? 8 : strlen(bad[i]);

		json_object_set_new(o, "d", json_stringn(bad[i], n));
		ck_assert_msg(bm_chan_b64_get(o, "d", &buf, &len, 100) ==
				      -EPROTO, "\"%s\" accepted", bad[i]);
		ck_assert_ptr_null(buf);
	}
	json_object_set_new(o, "d", json_integer(5));
	ck_assert_int_eq(bm_chan_b64_get(o, "d", &buf, &len, 100), -EPROTO);
	ck_assert_int_eq(bm_chan_b64_get(o, "missing", &buf, &len, 100),
			 -ENOENT);
	ck_assert_int_eq(bm_chan_b64_put(o, "d", "", (size_t)MAX_LINE), -EMSGSIZE);
	json_decref(o);
}
END_TEST

static Suite *
repl_channel_suite(void)
{
	Suite *s = suite_create("repl-channel");
	TCase *t = tcase_create("transports");
	TCase *p = tcase_create("pure");

	tcase_add_checked_fixture(t, setup, teardown);
	tcase_set_timeout(t, 60);
	tcase_add_loop_test(t, test_round_trip, 0, N_TRANSPORTS);
	tcase_add_loop_test(t, test_line_limit, 0, N_TRANSPORTS);
	tcase_add_loop_test(t, test_line_limit_plus_one, UNIX, TCP6);
	tcase_add_loop_test(t, test_bad_lines, UNIX, TCP6);
	tcase_add_loop_test(t, test_silent_peer, UNIX, TCP6);
	tcase_add_test(t, test_handshake_deadline);
	tcase_add_loop_test(t, test_wrong_key, TCP4, N_TRANSPORTS);
	tcase_add_test(t, test_psk_files);
	tcase_add_test(t, test_unix_socket_file);
	tcase_add_test(t, test_unix_peer_uid);
	suite_add_tcase(s, t);
	tcase_add_test(p, test_parse_reply);
	tcase_add_test(p, test_base64);
	suite_add_tcase(s, p);
	return s;
}

int
main(void)
{
	signal(SIGPIPE, SIG_IGN);
	return run_suite(repl_channel_suite()) ? EXIT_FAILURE : EXIT_SUCCESS;
}
