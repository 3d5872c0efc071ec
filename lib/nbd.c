/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The NBD client store: an NBD export reached through libnbd and driven
 * from the loop.  libnbd speaks the protocol and does the socket I/O; the
 * ring only tells it when a socket is ready: per connection, one one-shot
 * POLL_ADD for the direction libnbd asks for, then
 * nbd_aio_notify_read/write.
 *
 * Connections: one libnbd handle per connection (struct nbd_conn).  A
 * store has one, or, opened for a bulk copy (BM_OPEN_MULTI_CONN) on a
 * server that advertises multi-conn, up to MAX_CONNS, all made in
 * bm_nbd_open (the extra ones in parallel, bounded in time; those the
 * server refuses or leaves waiting are given up).  Multi-conn is the
 * server's promise that every connection sees the same data and that a
 * flush on any of them covers the writes answered on all of them.
 *
 * A request (the caller's bm_io, wrapped in a struct nbd_req) becomes one
 * or more libnbd commands (struct nbd_cmd): reads and writes are split at
 * the largest payload the server takes (at most 32 MiB), zeroing and
 * trimming at 1 GiB; block status is asked again from where the previous
 * reply ended until the range is covered; a FUA write to a server without
 * FUA is followed by a flush once all its parts are done, and so is one
 * in every WRITEBACK_BYTES of an offline copy's writes (BM_IO_WRITEBACK |
 * BM_IO_EVICT): NBD has no writeback hint, and a server writing through
 * its page cache would otherwise write the whole copy back at the final
 * flush, after the copy instead of during it.  Each command goes to the
 * connection with the fewest payload bytes (then commands) out, so the
 * parts of one request may travel on different connections.  At most
 * MAX_CMDS commands and MAX_BYTES of payload are handed to libnbd at a
 * time, over all connections; the rest waits in `queue`, oldest first.
 *
 * Order: the store keeps none between requests in flight, on one
 * connection or several (a server runs the commands it holds in any
 * order).  Callers never have overlapping requests in flight: the
 * copier's ranges are disjoint and the runs of one range go one after
 * another; the mirror holds back a write that overlaps one in flight.
 * A flush covers only writes the server has answered, so with several
 * connections it goes out once every write, zero and trim command out,
 * on any connection, is answered, and the requests behind it wait with
 * it; a FUA write's own flush waits for its parts, wherever they went.
 *
 * Invariants:
 *  - libnbd runs its callbacks with the handle locked, so they only
 *    record: they call neither libnbd nor the caller.  A command is
 *    accounted for exactly once, in its .free callback, which libnbd calls
 *    exactly once for every command, including commands it rejects and
 *    commands dropped by nbd_close.
 *  - Completions reach the caller only from this store's own loop
 *    callbacks (poll, timer, kick), never inside a store call; results
 *    known at once go to `ready`, and a deferred kick delivers them.
 *  - When the caller has nothing outstanding, nothing of the store is
 *    armed on any loop (no poll on any connection, no timer, no kick):
 *    the completion that would leave the store idle is held back until
 *    the watchdog timer's cancellation and every poll's removal have come
 *    back.  That is what lets the owner move the store to another loop
 *    between requests, free a loop right after the last completion, and
 *    close the store without callbacks left behind.
 *  - A request is delivered only once none of its commands is left in
 *    any handle, so libnbd never touches a buffer the caller has got
 *    back.  A dead or hung server is dealt with by closing every handle
 *    (nbd_close drops every command), never by abandoning commands still
 *    in one.
 *  - The connections are all open or all closed: losing one is losing
 *    the server.
 *
 * Failure: commands out on a connection and nothing heard on it for
 * `timeout` seconds (bm_nbd_timeout) makes the server dead: every
 * connection is closed, outstanding requests fail with -ETIMEDOUT
 * (-ECANCELED for the cancel op), later ones with -EIO ("server is
 * gone").  A server that drops a connection fails every request
 * outstanding with -EIO, the message naming the connection when there
 * are several, and the store is dead as above.
 *
 * Not done: extended headers (not in libnbd 1.14), reconnecting, adding
 * connections after open.
 */
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include <libnbd.h>

#include "errors.h"
#include "internal.h"
#include "nbd.h"

#define MAX_CONNS 4                 /* connections, with multi-conn */
#define MAX_CMDS 64                 /* commands handed to libnbd */
#define MAX_BYTES (64 * BM_MiB)     /* payload bytes handed to libnbd */
#define MAX_PAYLOAD (32 * BM_MiB)   /* qemu-nbd drops larger writes */
#define MAX_ZERO BM_GiB             /* per zero or trim command */
#define ZERO_CHUNK BM_MiB           /* zeroing by writing, per command */
#define DEFAULT_TIMEOUT 30
/* Extra connections: at least this long for their handshakes. */
#define EXTRA_WAIT_NS (1000 * 1000000ull)
#define MSG_SIZE 256
/* What a bulk copy asks of an NBD server per request, unless it prefers
 * larger: servers map and unmap a buffer per request, which for 1 MiB
 * (qemu-nbd) costs more in page faults than the copy itself. */
#define COPY_SIZE (256 * BM_KiB)
/* An offline copy's writes (BM_IO_WRITEBACK | BM_IO_EVICT): after this
 * many bytes of them, one also waits for a flush. */
#define WRITEBACK_BYTES (64 * BM_MiB)

enum req_kind { K_READ, K_WRITE, K_ZERO, K_TRIM, K_FLUSH, K_EXTENTS };

static const char *const kind_names[] = {
	[K_READ] = "read",
	[K_WRITE] = "write",
	[K_ZERO] = "zero",
	[K_TRIM] = "trim",
	[K_FLUSH] = "flush",
	[K_EXTENTS] = "block status",
};

struct nbd_store;

/* One connection to the server. */
struct nbd_conn {
	struct nbd_store *n;
	struct nbd_handle *h;      /* NULL once the store has lost it */
	unsigned index;            /* for messages */
	unsigned cmds_out;
	uint64_t bytes_out;
	uint64_t last_activity;    /* ns: last sign of life while busy */
	struct bm_op poll_op;
	struct bm_op unpoll_op;
	unsigned poll_mask;
	bool poll_armed;
	bool unpolling;
};

struct nbd_req {
	struct nbd_store *n;
	struct bm_io *io;
	enum req_kind kind;
	uint32_t cmd_flags;        /* LIBNBD_CMD_FLAG_* for every part */
	bool zero_by_write;        /* zero: the server cannot, write zeroes */
	bool fua_flush;            /* write: flush after the parts (no FUA) */
	bool flush_sent;           /* flush, or the FUA flush, is out */
	uint64_t issued;           /* bytes handed to libnbd */
	uint64_t mapped;           /* extents: bytes described so far */
	unsigned cmds;             /* commands not yet accounted for */
	int err;                   /* first error; msg says what */
	bool queued;
	bool ready;
	struct nbd_req *qnext;     /* queue or ready list */
	struct nbd_req *prev;      /* live list: every undelivered request */
	struct nbd_req *next;
	char msg[MSG_SIZE];
};

struct nbd_cmd {
	struct nbd_req *q;
	struct nbd_conn *c;        /* the connection it went out on */
	enum req_kind type;
	uint64_t offset;
	uint64_t length;
	uint64_t bytes;            /* payload counted against MAX_BYTES */
	uint64_t mapped_before;    /* extents: q->mapped when issued */
	uint64_t covered;          /* read: bytes the server's chunks held */
	bool completed;            /* the completion callback ran */
	int err;                   /* its errno */
};

/* The next command of a request. */
struct cmd_spec {
	enum req_kind type;
	uint64_t offset;
	uint64_t length;
	uint64_t bytes;
	uint32_t flags;
	void *buf;
};

struct nbd_store {
	struct bm_store s;
	struct nbd_conn conn[MAX_CONNS]; /* all connected, or none */
	unsigned nconns;
	unsigned timeout;          /* seconds */
	uint64_t max_payload;
	uint64_t max_zero;
	uint64_t max_status;
	bool can_zero, can_fast_zero, can_trim, can_flush, can_fua, can_meta;
	bool structured;           /* structured replies negotiated */
	void *zero_buf;            /* ZERO_CHUNK zeroes, for !can_zero */

	struct nbd_req *live;
	struct nbd_req *queue, *queue_tail;
	struct nbd_req *ready, *ready_tail;
	unsigned active;           /* accepted, not yet delivered */
	unsigned nready;
	unsigned cmds_out;         /* on all connections */
	uint64_t bytes_out;
	unsigned writes_out;       /* write, zero and trim commands out */
	uint64_t unflushed;        /* bulk bytes written since the last
				      writeback flush */

	/* A command whose .free runs inside the call that issues it is
	 * accounted for by the issuer, after the call. */
	struct nbd_cmd *issuing;
	bool issue_freed;

	struct bm_timer timer;     /* the watchdog, for every connection */
	bool timer_cancelling;
	struct bm_op kick_op;
	bool kick_armed;

	unsigned depth;            /* inside our loop callbacks */
	bool closed;               /* freed when nothing is armed */
	bool dead;
	char dead_msg[MSG_SIZE];
	char note[MSG_SIZE];       /* libnbd's word when notify failed */
};

static inline struct nbd_store *
to_nbd(struct bm_store *s)
{
	return bm_container_of(s, struct nbd_store, s);
}

static uint64_t
now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* A whole number from 1 to max in the environment variable `name`, or
 * `dflt` when it is unset or anything else. */
static unsigned
env_uint(const char *name, unsigned long max, unsigned dflt)
{
	const char *env = getenv(name);
	unsigned long v;
	char *end;

	if (!env || !*env)
		return dflt;
	errno = 0;
	v = strtoul(env, &end, 10);
	if (errno || *end || v == 0 || v > max)
		return dflt;
	return (unsigned)v;
}

unsigned
bm_nbd_timeout(void)
{
	return env_uint("BLOCKMIRROR_NBD_TIMEOUT", 7 * 24 * 3600,
			DEFAULT_TIMEOUT);
}

bool
bm_nbd_is_uri(const char *name)
{
	static const char *const schemes[] = {
		"nbd:", "nbds:", "nbd+unix:", "nbds+unix:",
	};

	if (!name)
		return false;
	for (size_t i = 0; i < BM_ARRAY_SIZE(schemes); i++)
		if (strncmp(name, schemes[i], strlen(schemes[i])) == 0)
			return true;
	return false;
}

BM_EXPORT bool
blockmirror_nbd_is_uri(const char *name)
{
	return bm_nbd_is_uri(name);
}

/* ---- request bookkeeping -------------------------------------------- */

/* Record the request's first error; the message is prefixed with the URI
 * and handed to bm_error when the request is delivered. */
static void __attribute__((format(printf, 3, 4)))
req_fail(struct nbd_req *q, int err, const char *fmt, ...)
{
	va_list ap;
	int len;

	if (q->err)
		return;
	q->err = err;
	len = snprintf(q->msg, sizeof q->msg, "%s: ", q->n->s.name);
	if (len < 0 || (size_t)len >= sizeof q->msg)
		return;
	va_start(ap, fmt);
	vsnprintf(q->msg + len, sizeof q->msg - (size_t)len, fmt, ap);
	va_end(ap);
}

static void
live_add(struct nbd_store *n, struct nbd_req *q)
{
	q->prev = NULL;
	q->next = n->live;
	if (n->live)
		n->live->prev = q;
	n->live = q;
	n->active++;
}

static void
live_remove(struct nbd_store *n, struct nbd_req *q)
{
	if (q->prev)
		q->prev->next = q->next;
	else
		n->live = q->next;
	if (q->next)
		q->next->prev = q->prev;
	n->active--;
}

static void
queue_back(struct nbd_store *n, struct nbd_req *q)
{
	q->qnext = NULL;
	if (n->queue_tail)
		n->queue_tail->qnext = q;
	else
		n->queue = q;
	n->queue_tail = q;
	q->queued = true;
}

static void
queue_front(struct nbd_store *n, struct nbd_req *q)
{
	q->qnext = n->queue;
	n->queue = q;
	if (!n->queue_tail)
		n->queue_tail = q;
	q->queued = true;
}

static void
queue_remove(struct nbd_store *n, struct nbd_req *q)
{
	struct nbd_req *prev = NULL;

	for (struct nbd_req *p = n->queue; p; prev = p, p = p->qnext) {
		if (p != q)
			continue;
		if (prev)
			prev->qnext = q->qnext;
		else
			n->queue = q->qnext;
		if (n->queue_tail == q)
			n->queue_tail = prev;
		break;
	}
	q->queued = false;
}

static void
make_ready(struct nbd_store *n, struct nbd_req *q)
{
	if (q->queued)
		queue_remove(n, q);
	q->ready = true;
	q->qnext = NULL;
	if (n->ready_tail)
		n->ready_tail->qnext = q;
	else
		n->ready = q;
	n->ready_tail = q;
	n->nready++;
}

static bool
req_has_more(const struct nbd_req *q)
{
	switch (q->kind) {
	case K_FLUSH:
		return !q->flush_sent;
	case K_EXTENTS:
		return q->mapped < q->io->length;
	default:
		return q->issued < q->io->length ||
		       (q->fua_flush && !q->flush_sent);
	}
}

/* After a change: finish the request, or put it back in line for its
 * next command (a FUA flush, more block status). */
static void
req_check(struct nbd_store *n, struct nbd_req *q)
{
	if (q->ready || q->cmds)
		return;
	if (q->err || !req_has_more(q))
		make_ready(n, q);
	else if (!q->queued)
		queue_front(n, q);
}

enum next_step {
	NEXT_NONE,   /* nothing to issue until a command of it comes back */
	NEXT_ISSUE,  /* *c may be issued now */
	NEXT_WAIT,   /* *c must wait for other requests' commands */
};

/* The request's next command, and whether it may be issued now. */
static enum next_step
req_next(struct nbd_store *n, struct nbd_req *q, struct cmd_spec *c)
{
	struct bm_io *io = q->io;
	uint64_t left;

	memset(c, 0, sizeof *c);
	if (q->err)
		return NEXT_NONE;
	switch (q->kind) {
	case K_FLUSH:
		if (q->flush_sent)
			return NEXT_NONE;
		c->type = K_FLUSH;
		/* A flush covers the writes the server has answered, on
		 * every connection (multi-conn): with several, let every
		 * write out be answered first, wherever it went. */
		return n->nconns > 1 && n->writes_out ? NEXT_WAIT
						      : NEXT_ISSUE;
	case K_EXTENTS:
		/* One at a time: the next starts where the reply ended. */
		if (q->cmds || q->mapped >= io->length)
			return NEXT_NONE;
		c->type = K_EXTENTS;
		c->offset = io->offset + q->mapped;
		c->length = BM_MIN(io->length - q->mapped, n->max_status);
		return NEXT_ISSUE;
	default:
		break;
	}
	left = io->length - q->issued;
	if (left == 0) {
		/* The flush must cover every part, on whichever connection
		 * it went: wait for them. */
		if (!q->fua_flush || q->flush_sent || q->cmds)
			return NEXT_NONE;
		c->type = K_FLUSH;
		return NEXT_ISSUE;
	}
	c->offset = io->offset + q->issued;
	switch (q->kind) {
	case K_READ:
	case K_WRITE:
		c->type = q->kind;
		c->length = BM_MIN(left, n->max_payload);
		c->bytes = c->length;
		c->buf = (char *)io->buf + q->issued;
		c->flags = q->cmd_flags;
		break;
	case K_ZERO:
		if (q->zero_by_write) {
			c->type = K_WRITE;
			c->length = BM_MIN(left, BM_MIN(ZERO_CHUNK,
							n->max_payload));
			c->bytes = c->length;
			c->buf = n->zero_buf;
			c->flags = q->cmd_flags & LIBNBD_CMD_FLAG_FUA;
		} else {
			c->type = K_ZERO;
			c->length = BM_MIN(left, n->max_zero);
			c->flags = q->cmd_flags;
		}
		break;
	default: /* K_TRIM */
		c->type = K_TRIM;
		c->length = BM_MIN(left, n->max_zero);
		break;
	}
	return NEXT_ISSUE;
}

/* ---- libnbd callbacks: record only ---------------------------------- */

static int
cmd_done(void *opaque, int *error)
{
	struct nbd_cmd *cmd = opaque;

	cmd->completed = true;
	cmd->err = *error;
	cmd->c->last_activity = now_ns();
	return 1; /* retire the command: we never ask for it again */
}

/* A structured read's data or hole chunk (libnbd checks it lies within
 * the command's range, not that the chunks cover all of it). */
static int
read_chunk_cb(void *opaque, const void *subbuf, size_t count,
	      uint64_t offset, unsigned status, int *error)
{
	struct nbd_cmd *cmd = opaque;

	if (status == LIBNBD_READ_DATA || status == LIBNBD_READ_HOLE)
		cmd->covered += count;
	return 0;
}

static int
extent_cb(void *opaque, const char *metacontext, uint64_t offset,
	  uint32_t *entries, size_t nr_entries, int *error)
{
	struct nbd_cmd *cmd = opaque;
	struct nbd_req *q = cmd->q;
	struct bm_io *io = q->io;
	uint64_t pos = io->offset + q->mapped;
	uint64_t end = cmd->offset + cmd->length;
	int r;

	if (strcmp(metacontext, LIBNBD_CONTEXT_BASE_ALLOCATION) != 0 ||
	    *error || q->err)
		return 0;
	if (offset != cmd->offset || pos != cmd->offset) {
		req_fail(q, -EPROTO, "block status at offset %" PRIu64
			 ": the server described offset %" PRIu64,
			 cmd->offset, offset);
		return 0;
	}
	for (size_t i = 0; i + 1 < nr_entries && pos < end; i += 2) {
		uint64_t len = BM_MIN((uint64_t)entries[i], end - pos);
		uint32_t flags = 0;

		if (entries[i + 1] & LIBNBD_STATE_HOLE)
			flags |= BM_EXTENT_HOLE;
		if (entries[i + 1] & LIBNBD_STATE_ZERO)
			flags |= BM_EXTENT_ZERO;
		r = bm_extent_list_append(io->extents, pos, len, flags);
		if (r < 0) {
			req_fail(q, r, "block status at offset %" PRIu64
				 ": %s", pos, r == -ENOMEM ? "out of memory"
				 : "extents do not follow the list");
			return 0;
		}
		pos += len;
	}
	q->mapped = pos - io->offset;
	return 0;
}

static bool
is_write_kind(enum req_kind kind)
{
	return kind == K_WRITE || kind == K_ZERO || kind == K_TRIM;
}

/* " (connection 2 of 4)" when the store has several, else "". */
static const char *
conn_name(const struct nbd_store *n, const struct nbd_conn *c, char *buf,
	  size_t size)
{
	buf[0] = '\0';
	if (n->nconns > 1)
		snprintf(buf, size, " (connection %u of %u)", c->index + 1,
			 n->nconns);
	return buf;
}

/* Account for a command libnbd is done with. */
static void
retire(struct nbd_store *n, struct nbd_cmd *cmd)
{
	struct nbd_req *q = cmd->q;
	const char *what = kind_names[cmd->type];
	int e = cmd->err;
	char which[48];

	cmd->c->cmds_out--;
	cmd->c->bytes_out -= cmd->bytes;
	n->cmds_out--;
	n->bytes_out -= cmd->bytes;
	if (is_write_kind(cmd->type))
		n->writes_out--;
	q->cmds--;
	if (!cmd->completed) {
		req_fail(q, -EIO, "%s at offset %" PRIu64 ": dropped by "
			 "libnbd", what, cmd->offset);
	} else if (e == ENOTCONN || e == ECONNRESET || e == EPIPE) {
		req_fail(q, -EIO, "%s at offset %" PRIu64 ": the connection "
			 "to the server was lost%s", what, cmd->offset,
			 conn_name(n, cmd->c, which, sizeof which));
	} else if (e == ESHUTDOWN) {
		req_fail(q, -EIO, "%s at offset %" PRIu64 ": the server is "
			 "shutting down", what, cmd->offset);
	} else if (e) {
		req_fail(q, -e, "%s at offset %" PRIu64 "+%" PRIu64 ": %s",
			 what, cmd->offset, cmd->length, strerror(e));
	} else if (cmd->type == K_READ && n->structured &&
		   cmd->covered != cmd->length) {
		/* A server that says DONE before sending every byte would
		 * leave part of the buffer unread: never pass that on as
		 * data. */
		req_fail(q, -EPROTO, "read at offset %" PRIu64 "+%" PRIu64
			 ": the server sent %" PRIu64 " bytes of it", cmd->offset,
			 cmd->length, cmd->covered);
	} else if (cmd->type == K_EXTENTS && q->mapped == cmd->mapped_before) {
		/* Asking again would loop forever. */
		req_fail(q, -EPROTO, "block status at offset %" PRIu64
			 ": the server described nothing", cmd->offset);
	}
	req_check(n, q);
}

static void
cmd_free(void *opaque)
{
	struct nbd_cmd *cmd = opaque;
	struct nbd_store *n = cmd->q->n;

	if (cmd == n->issuing) {
		n->issue_freed = true;
		return;
	}
	retire(n, cmd);
	free(cmd);
}

/* ---- issuing ---------------------------------------------------------- */

static void
issue(struct nbd_store *n, struct nbd_conn *conn, struct nbd_req *q,
      const struct cmd_spec *c)
{
	struct nbd_cmd *cmd = calloc(1, sizeof *cmd);
	struct nbd_handle *h = conn->h;
	nbd_completion_callback done;
	int64_t r = -1;

	if (!cmd) {
		req_fail(q, -ENOMEM, "%s: out of memory", kind_names[c->type]);
		return;
	}
	cmd->q = q;
	cmd->c = conn;
	cmd->type = c->type;
	cmd->offset = c->offset;
	cmd->length = c->length;
	cmd->bytes = c->bytes;
	cmd->mapped_before = q->mapped;
	if (c->type == K_FLUSH)
		q->flush_sent = true;
	else if (c->type != K_EXTENTS)
		q->issued += c->length;
	if (conn->cmds_out == 0)
		conn->last_activity = now_ns(); /* a busy period starts */
	q->cmds++;
	conn->cmds_out++;
	conn->bytes_out += c->bytes;
	n->cmds_out++;
	n->bytes_out += c->bytes;
	if (is_write_kind(c->type))
		n->writes_out++;

	done = (nbd_completion_callback){ .callback = cmd_done,
					  .user_data = cmd,
					  .free = cmd_free };
	n->issuing = cmd;
	n->issue_freed = false;
	switch (c->type) {
	case K_READ:
		r = nbd_aio_pread_structured(h, c->buf, c->length,
			c->offset, (nbd_chunk_callback){
				.callback = read_chunk_cb, .user_data = cmd },
			done, 0);
		break;
	case K_WRITE:
		r = nbd_aio_pwrite(h, c->buf, c->length, c->offset, done,
				   c->flags);
		break;
	case K_ZERO:
		r = nbd_aio_zero(h, c->length, c->offset, done, c->flags);
		break;
	case K_TRIM:
		r = nbd_aio_trim(h, c->length, c->offset, done, 0);
		break;
	case K_FLUSH:
		r = nbd_aio_flush(h, done, 0);
		break;
	case K_EXTENTS:
		r = nbd_aio_block_status(h, c->length, c->offset,
			(nbd_extent_callback){ .callback = extent_cb,
					       .user_data = cmd },
			done, 0);
		break;
	}
	n->issuing = NULL;
	if (r == -1) {
		int e = nbd_get_errno();
		const char *m = nbd_get_error();

		req_fail(q, e ? -e : -EIO, "%s at offset %" PRIu64 ": %s",
			 kind_names[c->type], c->offset,
			 m ? m : "refused by libnbd");
	}
	if (n->issue_freed) {
		retire(n, cmd);
		free(cmd);
	}
}

static bool
connected(const struct nbd_store *n)
{
	return n->conn[0].h != NULL;
}

static bool
handle_gone(const struct nbd_conn *c)
{
	return nbd_aio_is_dead(c->h) == 1 || nbd_aio_is_closed(c->h) == 1;
}

/* The connection with the fewest bytes (then commands) out. */
static struct nbd_conn *
pick_conn(struct nbd_store *n)
{
	struct nbd_conn *best = &n->conn[0];

	for (unsigned i = 1; i < n->nconns; i++) {
		struct nbd_conn *c = &n->conn[i];

		if (c->bytes_out < best->bytes_out ||
		    (c->bytes_out == best->bytes_out &&
		     c->cmds_out < best->cmds_out))
			best = c;
	}
	return best;
}

static void connection_lost(struct nbd_store *n, struct nbd_conn *c);

/* Hand queued commands to libnbd while the budget allows, oldest request
 * first; a request that must wait holds back those behind it. */
static void
pump(struct nbd_store *n)
{
	struct nbd_conn *conn;
	struct nbd_req *q;
	struct cmd_spec c;
	enum next_step step;

	while (connected(n) && (q = n->queue)) {
		step = req_next(n, q, &c);
		if (step == NEXT_WAIT)
			break;
		if (step == NEXT_NONE) {
			n->queue = q->qnext;
			if (!n->queue)
				n->queue_tail = NULL;
			q->queued = false;
			req_check(n, q);
			continue;
		}
		if (n->cmds_out && (n->cmds_out >= MAX_CMDS ||
				    n->bytes_out + c.bytes > MAX_BYTES))
			break;
		conn = pick_conn(n);
		issue(n, conn, q, &c);
		if (handle_gone(conn)) {
			connection_lost(n, conn);
			break;
		}
	}
}

/* ---- killing the connection ----------------------------------------- */

/* Close every handle: libnbd drops every command (calling .free for
 * each) and will touch no buffer of ours again.  A poll armed on a socket
 * is woken by the shutdown, so that it comes back.  All handles are let go
 * before the first close, whose .free callbacks may look. */
static void
drop_handles(struct nbd_store *n)
{
	struct nbd_handle *h[MAX_CONNS];

	for (unsigned i = 0; i < n->nconns; i++) {
		struct nbd_conn *c = &n->conn[i];

		h[i] = c->h;
		c->h = NULL;
		if (h[i] && c->poll_armed) {
			int fd = nbd_aio_get_fd(h[i]);

			if (fd >= 0)
				shutdown(fd, SHUT_RDWR);
		}
	}
	for (unsigned i = 0; i < n->nconns; i++)
		if (h[i])
			nbd_close(h[i]);
}

static void __attribute__((format(printf, 3, 4)))
kill_connection(struct nbd_store *n, int err, const char *fmt, ...)
{
	va_list ap;

	if (n->dead)
		return;
	n->dead = true;
	va_start(ap, fmt);
	vsnprintf(n->dead_msg, sizeof n->dead_msg, fmt, ap);
	va_end(ap);
	for (struct nbd_req *q = n->live; q; q = q->next) {
		if (!q->ready)
			req_fail(q, err, "%s", n->dead_msg);
		q->queued = false;
	}
	n->queue = n->queue_tail = NULL;
	drop_handles(n);
	for (struct nbd_req *q = n->live; q; q = q->next)
		req_check(n, q);
}

/* One connection lost makes the store dead, as a lone connection lost
 * always did: the others are closed and every request waiting fails. */
static void
connection_lost(struct nbd_store *n, struct nbd_conn *c)
{
	char which[48];

	conn_name(n, c, which, sizeof which);
	if (n->note[0])
		kill_connection(n, -EIO, "the connection to the server was "
				"lost%s (%s)", which, n->note);
	else
		kill_connection(n, -EIO, "the connection to the server was "
				"lost%s", which);
}

/* ---- the loop side: poll, watchdog, kick, delivery ------------------- */

static void poll_done(struct bm_op *op, int res);
static void unpoll_done(struct bm_op *op, int res);
static void timer_done(struct bm_op *op, int res);

static bool
armed(const struct nbd_store *n)
{
	for (unsigned i = 0; i < n->nconns; i++)
		if (n->conn[i].poll_armed || n->conn[i].unpolling)
			return true;
	return n->timer.armed || n->kick_armed;
}

static void
destroy(struct nbd_store *n)
{
	free(n->zero_buf);
	free(n->s.name);
	free(n);
}

/* Wait for the connection's socket as libnbd wants.  False if the
 * connection turned out to be gone (the store is dead then). */
static bool
arm_conn(struct nbd_store *n, struct nbd_conn *c)
{
	struct io_uring_sqe *sqe;
	unsigned dir, mask = 0;
	int fd;

	dir = nbd_aio_get_direction(c->h);
	if (!c->cmds_out && !(dir & LIBNBD_AIO_DIRECTION_WRITE))
		return true;
	if (dir & LIBNBD_AIO_DIRECTION_READ)
		mask |= POLLIN;
	if (dir & LIBNBD_AIO_DIRECTION_WRITE)
		mask |= POLLOUT;
	if (!mask)
		mask = POLLIN;
	fd = nbd_aio_get_fd(c->h);
	if (fd < 0) {
		snprintf(n->note, sizeof n->note, "%s", nbd_get_error());
		connection_lost(n, c);
		return false;
	}
	if (!c->poll_armed) {
		sqe = bm_loop_sqe(n->s.loop, &c->poll_op, poll_done);
		io_uring_prep_poll_add(sqe, fd, mask);
		c->poll_armed = true;
		c->poll_mask = mask;
	} else if ((mask & ~c->poll_mask) && !c->unpolling) {
		/* libnbd now also wants to write: take the poll back; it
		 * is armed again with the new mask. */
		sqe = bm_loop_sqe(n->s.loop, &c->unpoll_op, unpoll_done);
		io_uring_prep_poll_remove(sqe, (__u64)(uintptr_t)&c->poll_op);
		c->unpolling = true;
	}
	return true;
}

/* Wait for the sockets as libnbd wants, and watch the server's answers:
 * the watchdog goes off when the first busy connection could have been
 * silent for `timeout`. */
static void
arm(struct nbd_store *n)
{
	uint64_t now, deadline = UINT64_MAX, timeout_ns;

	for (unsigned i = 0; i < n->nconns && connected(n); i++)
		if (!arm_conn(n, &n->conn[i]))
			return;
	if (!connected(n) || !n->cmds_out || n->timer.armed)
		return;
	timeout_ns = (uint64_t)n->timeout * 1000000000u;
	for (unsigned i = 0; i < n->nconns; i++)
		if (n->conn[i].cmds_out)
			deadline = BM_MIN(deadline,
					  n->conn[i].last_activity +
					  timeout_ns);
	now = now_ns();
	bm_loop_timer_start(n->s.loop, &n->timer,
			    deadline > now + 1000000 ? deadline - now
						     : 1000000,
			    timer_done);
}

/* Take back what is armed, so that the store can go idle. */
static void
disarm(struct nbd_store *n)
{
	if (n->timer.armed && !n->timer_cancelling) {
		n->timer_cancelling = true;
		bm_loop_timer_cancel(n->s.loop, &n->timer);
	}
	for (unsigned i = 0; i < n->nconns; i++) {
		struct nbd_conn *c = &n->conn[i];
		struct io_uring_sqe *sqe;

		if (!c->poll_armed || c->unpolling || c->cmds_out)
			continue;
		sqe = bm_loop_sqe(n->s.loop, &c->unpoll_op, unpoll_done);
		io_uring_prep_poll_remove(sqe, (__u64)(uintptr_t)&c->poll_op);
		c->unpolling = true;
	}
}

static void
deliver(struct nbd_req *q)
{
	struct bm_io *io = q->io;
	int err = q->err;

	if (err)
		bm_error(err, "%s", q->msg);
	else
		io->progress = io->length;
	free(q);
	io->done(io, err);
}

/* Deliver what is ready; the last one only once nothing is armed. */
static void
settle(struct nbd_store *n)
{
	struct nbd_req *q;

	while ((q = n->ready) && !n->closed) {
		if (n->active == n->nready && armed(n)) {
			disarm(n);
			return;
		}
		n->ready = q->qnext;
		if (!n->ready)
			n->ready_tail = NULL;
		n->nready--;
		live_remove(n, q);
		deliver(q);
	}
}

static void
kick_done(struct bm_op *op, int res);

/* Deliver on the next turn (for results found inside a store call). */
static void
kick(struct nbd_store *n)
{
	if (n->kick_armed)
		return;
	n->kick_armed = true;
	bm_loop_defer(n->s.loop, &n->kick_op, kick_done, 0);
}

/* Notice a dead connection, issue what the budget allows, watch. */
static void
progress(struct nbd_store *n)
{
	for (unsigned i = 0; i < n->nconns && connected(n); i++)
		if (handle_gone(&n->conn[i]))
			connection_lost(n, &n->conn[i]);
	pump(n);
	arm(n);
}

/* After anything happened: progress and deliver.  Runs at the end of
 * each of our loop callbacks (`depth` keeps a close inside a completion
 * from freeing the store under us). */
static void
leave(struct nbd_store *n)
{
	if (!n->closed) {
		progress(n);
		settle(n);
	}
	if (--n->depth == 0 && n->closed && !armed(n))
		destroy(n);
}

static void
poll_done(struct bm_op *op, int res)
{
	struct nbd_conn *c = bm_container_of(op, struct nbd_conn, poll_op);
	struct nbd_store *n = c->n;
	int r = 0;

	n->depth++;
	c->poll_armed = false;
	if (c->h && !n->closed) {
		if (res > 0) {
			c->last_activity = now_ns();
			if (res & (POLLIN | POLLERR | POLLHUP | POLLRDHUP))
				r = nbd_aio_notify_read(c->h);
			else if (res & POLLOUT)
				r = nbd_aio_notify_write(c->h);
			if (r == -1) {
				snprintf(n->note, sizeof n->note, "%s",
					 nbd_get_error());
				connection_lost(n, c);
			}
		} else if (res < 0 && res != -ECANCELED) {
			snprintf(n->note, sizeof n->note, "poll: %s",
				 strerror(-res));
			connection_lost(n, c);
		}
	}
	leave(n);
}

static void
unpoll_done(struct bm_op *op, int res)
{
	struct nbd_conn *c = bm_container_of(op, struct nbd_conn, unpoll_op);
	struct nbd_store *n = c->n;

	n->depth++;
	c->unpolling = false;
	leave(n);
}

static void
timer_done(struct bm_op *op, int res)
{
	struct nbd_store *n = bm_container_of(op, struct nbd_store, timer.op);
	uint64_t timeout_ns = (uint64_t)n->timeout * 1000000000u;
	uint64_t now = now_ns();
	char which[48];

	n->depth++;
	n->timer.armed = false;
	n->timer_cancelling = false;
	for (unsigned i = 0; i < n->nconns; i++) {
		struct nbd_conn *c = &n->conn[i];

		if (!c->h || n->closed || !c->cmds_out ||
		    now - c->last_activity < timeout_ns)
			continue;
		conn_name(n, c, which, sizeof which);
		bm_warn("%s: no reply from the server for %u seconds%s; "
			"giving up on it", n->s.name, n->timeout, which);
		kill_connection(n, -ETIMEDOUT, "no reply from the server for "
				"%u seconds%s", n->timeout, which);
		break;
	}
	leave(n);
}

static void
kick_done(struct bm_op *op, int res)
{
	struct nbd_store *n = bm_container_of(op, struct nbd_store, kick_op);

	n->depth++;
	n->kick_armed = false;
	leave(n);
}

/* ---- the store operations ------------------------------------------- */

static void
nomem_done(struct bm_op *op, int res)
{
	struct bm_io *io = bm_container_of(op, struct bm_io, op);

	bm_error(res, "%s: out of memory", io->store->name);
	io->done(io, res);
}

/* Set the request up; false if it is finished already (made ready). */
static bool
prepare(struct nbd_store *n, struct nbd_req *q)
{
	struct bm_io *io = q->io;

	if (n->dead) {
		req_fail(q, -EIO, "the server is gone (%s)", n->dead_msg);
		return false;
	}
	if (q->kind != K_FLUSH &&
	    !bm_range_ok(io->offset, io->length, n->s.size)) {
		req_fail(q, -EINVAL, "request at %" PRIu64 "+%" PRIu64
			 " beyond the end (%" PRIu64 ")", io->offset,
			 io->length, n->s.size);
		return false;
	}
	if (is_write_kind(q->kind) && n->s.readonly) {
		req_fail(q, -EROFS, "opened read-only");
		return false;
	}
	if (q->kind != K_FLUSH && io->length == 0)
		return false;
	/* FUA: the server's flag on every part, or a flush after them. */
	if ((q->kind == K_WRITE || q->kind == K_ZERO) &&
	    (io->flags & BM_IO_FUA)) {
		if (n->can_fua)
			q->cmd_flags = LIBNBD_CMD_FLAG_FUA;
		else
			q->fua_flush = n->can_flush;
	}
	/* NBD has no "start writing back": a bulk write the caller waits
	 * to see written back is followed by a flush now and then, so that
	 * a server writing through its page cache writes back during the
	 * copy rather than all at the last flush. */
	if (q->kind == K_WRITE && n->can_flush && !(io->flags & BM_IO_FUA) &&
	    (io->flags & (BM_IO_WRITEBACK | BM_IO_EVICT)) ==
	    (BM_IO_WRITEBACK | BM_IO_EVICT)) {
		n->unflushed += io->length;
		if (n->unflushed >= WRITEBACK_BYTES) {
			n->unflushed = 0;
			q->fua_flush = true;
		}
	}
	switch (q->kind) {
	case K_WRITE:
		break;
	case K_ZERO:
		if (io->flags & BM_IO_FAST_ZERO) {
			if (!n->can_zero || !n->can_fast_zero) {
				req_fail(q, -ENOTSUP, "the server cannot "
					 "zero quickly");
				return false;
			}
			q->cmd_flags |= LIBNBD_CMD_FLAG_FAST_ZERO;
		}
		if (!n->can_zero) {
			if (!n->zero_buf &&
			    !(n->zero_buf = calloc(1, ZERO_CHUNK))) {
				req_fail(q, -ENOMEM, "out of memory");
				return false;
			}
			q->zero_by_write = true;
		} else if (!(io->flags & BM_IO_MAY_TRIM)) {
			q->cmd_flags |= LIBNBD_CMD_FLAG_NO_HOLE;
		}
		break;
	case K_TRIM:
		/* A hint: a server that cannot trim keeps the data. */
		return n->can_trim;
	case K_FLUSH:
		return n->can_flush && !n->s.readonly;
	case K_EXTENTS:
		if (!n->can_meta) {
			int r = bm_extent_list_append(io->extents, io->offset,
						      io->length, 0);

			if (r < 0)
				req_fail(q, r, "block status: %s",
					 strerror(-r));
			return false;
		}
		break;
	default:
		break;
	}
	return true;
}

static void
submit(struct bm_store *s, struct bm_io *io, enum req_kind kind)
{
	struct nbd_store *n = to_nbd(s);
	struct nbd_req *q;

	io->store = s;
	io->progress = 0;
	io->stage = 0;
	q = calloc(1, sizeof *q);
	if (!q) {
		bm_loop_defer(s->loop, &io->op, nomem_done, -ENOMEM);
		return;
	}
	q->n = n;
	q->io = io;
	q->kind = kind;
	live_add(n, q);
	if (prepare(n, q))
		queue_back(n, q);
	else
		make_ready(n, q);
	progress(n);
	if (n->ready)
		kick(n);
}

static void
store_read(struct bm_store *s, struct bm_io *io)
{
	submit(s, io, K_READ);
}

static void
store_write(struct bm_store *s, struct bm_io *io)
{
	submit(s, io, K_WRITE);
}

static void
store_zero(struct bm_store *s, struct bm_io *io)
{
	submit(s, io, K_ZERO);
}

static void
store_discard(struct bm_store *s, struct bm_io *io)
{
	submit(s, io, K_TRIM);
}

static void
store_flush(struct bm_store *s, struct bm_io *io)
{
	submit(s, io, K_FLUSH);
}

static void
store_extents(struct bm_store *s, struct bm_io *io)
{
	submit(s, io, K_EXTENTS);
}

static void
store_cancel(struct bm_store *s)
{
	struct nbd_store *n = to_nbd(s);

	/* Only requests still waiting on the server are cancelled; the
	 * connection is the price (a hung server is why we are here). */
	if (n->dead || n->active == n->nready)
		return;
	bm_info("%s: cancelling %u requests; closing the connection",
		s->name, n->active - n->nready);
	kill_connection(n, -ECANCELED, "request cancelled");
	if (n->ready)
		kick(n);
}

/*
 * Requests still outstanding at close are dropped without their done
 * callback.  The store is freed at once unless something is still armed
 * on the loop (only then: it goes when that comes back).
 */
static void
store_close(struct bm_store *s)
{
	struct nbd_store *n = to_nbd(s);
	struct nbd_req *q;

	if (n->active > n->nready) {
		kill_connection(n, -ECANCELED, "store closed");
	} else if (connected(n)) {
		/* Polite: tell the server, without waiting for it. */
		for (unsigned i = 0; i < n->nconns; i++)
			nbd_aio_disconnect(n->conn[i].h, 0);
		drop_handles(n);
	}
	n->closed = true;
	while ((q = n->live)) {
		live_remove(n, q);
		free(q);
	}
	n->ready = n->ready_tail = NULL;
	n->queue = n->queue_tail = NULL;
	n->nready = 0;
	if (armed(n))
		disarm(n);
	if (n->depth == 0 && !armed(n))
		destroy(n);
}

static const struct bm_store_ops nbd_ops = {
	.name = "nbd",
	.read = store_read,
	.write = store_write,
	.zero = store_zero,
	.discard = store_discard,
	.flush = store_flush,
	.extents = store_extents,
	.cancel = store_cancel,
	.close = store_close,
};

/* ---- open ------------------------------------------------------------ */

/* libnbd's error, copied at once; `def` if it gives no errno. */
static int
libnbd_error(const char *uri, int def)
{
	int e = nbd_get_errno();
	const char *m = nbd_get_error();

	return bm_error(e ? -e : def, "%s: %s", uri,
			m ? m : strerror(e ? e : -def));
}

/* A handle set up as every connection of a store is (the TLS settings
 * come with the URI). */
static int
new_handle(const char *uri, struct nbd_handle **out)
{
	struct nbd_handle *h = nbd_create();
	int r;

	if (!h)
		return libnbd_error(uri, -ENOMEM);
	if (nbd_set_uri_allow_local_file(h, true) == -1 ||
	    nbd_set_uri_allow_transports(h, LIBNBD_ALLOW_TRANSPORT_TCP |
					 LIBNBD_ALLOW_TRANSPORT_UNIX) == -1 ||
	    nbd_add_meta_context(h, LIBNBD_CONTEXT_BASE_ALLOCATION) == -1 ||
	    nbd_set_request_structured_replies(h, true) == -1) {
		r = libnbd_error(uri, -EINVAL);
		nbd_close(h);
		return r;
	}
	*out = h;
	return 0;
}

/* nbd_connect_uri, but giving up after `timeout` seconds: a server that
 * accepts the connection and says nothing must not hang the caller. */
static int
connect_bounded(struct nbd_handle *h, const char *uri, unsigned timeout)
{
	uint64_t deadline = now_ns() + (uint64_t)timeout * 1000000000u;

	if (nbd_aio_connect_uri(h, uri) == -1)
		return libnbd_error(uri, -EINVAL);
	while (nbd_aio_is_ready(h) != 1) {
		uint64_t now = now_ns();

		if (nbd_aio_is_dead(h) == 1 || nbd_aio_is_closed(h) == 1)
			return bm_error(-ECONNRESET, "%s: the server closed "
					"the connection", uri);
		if (now >= deadline)
			return bm_error(-ETIMEDOUT, "%s: no answer from the "
					"server within %u seconds", uri,
					timeout);
		if (nbd_poll(h, (int)((deadline - now + 999999) / 1000000)) ==
		    -1)
			return libnbd_error(uri, -EPROTO);
	}
	return 0;
}

/* Connections a bulk copy opens to a multi-conn server. */
static unsigned
conns_wanted(void)
{
	return env_uint("BLOCKMIRROR_NBD_CONNECTIONS", MAX_CONNS, MAX_CONNS);
}

/* What the connections of one store must agree on. */
#define SIG_LEN 13

static void
export_sig(struct nbd_handle *h, int64_t sig[SIG_LEN])
{
	sig[0] = nbd_get_size(h);
	sig[1] = nbd_is_read_only(h);
	sig[2] = nbd_can_zero(h);
	sig[3] = nbd_can_fast_zero(h);
	sig[4] = nbd_can_trim(h);
	sig[5] = nbd_can_flush(h);
	sig[6] = nbd_can_fua(h);
	sig[7] = nbd_can_multi_conn(h);
	sig[8] = nbd_get_structured_replies_negotiated(h);
	sig[9] = nbd_can_meta_context(h, LIBNBD_CONTEXT_BASE_ALLOCATION);
	sig[10] = nbd_get_block_size(h, LIBNBD_SIZE_MINIMUM);
	sig[11] = nbd_get_block_size(h, LIBNBD_SIZE_PREFERRED);
	sig[12] = nbd_get_block_size(h, LIBNBD_SIZE_MAXIMUM);
}

/*
 * Open `want` more connections to `uri` at once and keep those whose
 * handshake is over by `deadline` and that see the export `first` sees.
 * A server may close extra clients at once (nbdkit's limit filter) or
 * leave them unaccepted (qemu-nbd past --shared): the store goes on with
 * the connections it got.  Returns how many handles are in `out`.
 */
static unsigned
connect_more(const char *uri, struct nbd_handle *first, unsigned want,
	     uint64_t deadline, struct nbd_handle **out)
{
	struct nbd_handle *h[MAX_CONNS];
	struct pollfd pfd[MAX_CONNS];
	unsigned at[MAX_CONNS], nfds, got = 0;
	int64_t sig[SIG_LEN], sig_first[SIG_LEN];

	for (unsigned i = 0; i < want; i++) {
		h[i] = NULL;
		if (new_handle(uri, &h[i]) < 0) {
			bm_error_clear();
			continue;
		}
		if (nbd_aio_connect_uri(h[i], uri) == -1) {
			nbd_close(h[i]);
			h[i] = NULL;
		}
	}
	for (;;) {
		uint64_t now;

		nfds = 0;
		for (unsigned i = 0; i < want; i++) {
			unsigned dir;
			int fd;

			if (!h[i] || nbd_aio_is_ready(h[i]) == 1)
				continue;
			fd = nbd_aio_get_fd(h[i]);
			if (fd < 0 || nbd_aio_is_dead(h[i]) == 1 ||
			    nbd_aio_is_closed(h[i]) == 1) {
				bm_debug("%s: the server closed connection %u "
					 "during the handshake", uri, i + 2);
				nbd_close(h[i]);
				h[i] = NULL;
				continue;
			}
			dir = nbd_aio_get_direction(h[i]);
			pfd[nfds].fd = fd;
			pfd[nfds].events =
				(dir & LIBNBD_AIO_DIRECTION_READ ? POLLIN : 0) |
				(dir & LIBNBD_AIO_DIRECTION_WRITE ? POLLOUT
								  : 0);
			if (!pfd[nfds].events)
				pfd[nfds].events = POLLIN;
			pfd[nfds].revents = 0;
			at[nfds++] = i;
		}
		now = now_ns();
		if (nfds == 0 || now >= deadline)
			break;
		if (poll(pfd, nfds, (int)((deadline - now + 999999) /
					  1000000)) < 0 && errno != EINTR)
			break;
		for (unsigned j = 0; j < nfds; j++) {
			unsigned i = at[j];
			int r = 0;

			if (pfd[j].revents & (POLLIN | POLLERR | POLLHUP))
				r = nbd_aio_notify_read(h[i]);
			else if (pfd[j].revents & POLLOUT)
				r = nbd_aio_notify_write(h[i]);
			if (r == -1) {
				bm_debug("%s: connection %u: %s", uri, i + 2,
					 nbd_get_error());
				nbd_close(h[i]);
				h[i] = NULL;
			}
		}
	}
	export_sig(first, sig_first);
	for (unsigned i = 0; i < want; i++) {
		if (!h[i])
			continue;
		if (nbd_aio_is_ready(h[i]) != 1) {
			bm_debug("%s: connection %u still in its handshake; "
				 "going on without it", uri, i + 2);
			nbd_close(h[i]);
			continue;
		}
		export_sig(h[i], sig);
		if (memcmp(sig, sig_first, sizeof sig) != 0) {
			bm_debug("%s: connection %u sees another export; going "
				 "on without it", uri, i + 2);
			nbd_aio_disconnect(h[i], 0);
			nbd_close(h[i]);
			continue;
		}
		out[got++] = h[i];
	}
	return got;
}

int
bm_nbd_open(struct bm_loop *loop, const char *uri, unsigned flags,
	    struct bm_store **out)
{
	struct nbd_store *n = NULL;
	struct nbd_handle *hs[MAX_CONNS], *h;
	unsigned nh = 0, want;
	int64_t size, minimum, preferred, maximum;
	unsigned timeout = bm_nbd_timeout();
	uint64_t t0 = now_ns(), wait_ns;
	int r;

	r = new_handle(uri, &h);
	if (r < 0)
		return r;
	hs[nh++] = h;
	r = connect_bounded(h, uri, timeout);
	if (r < 0)
		goto fail;

	size = nbd_get_size(h);
	if (size < 0) {
		r = bm_error(-EPROTO, "%s: the server gave no valid size", uri);
		goto fail;
	}
	if ((flags & BM_OPEN_WRITE) && nbd_is_read_only(h) == 1) {
		r = bm_error(-EROFS, "%s: the export is read-only", uri);
		goto fail;
	}
	minimum = nbd_get_block_size(h, LIBNBD_SIZE_MINIMUM);
	preferred = nbd_get_block_size(h, LIBNBD_SIZE_PREFERRED);
	maximum = nbd_get_block_size(h, LIBNBD_SIZE_MAXIMUM);
	if (minimum <= 0)
		minimum = 1;
	if (!bm_is_power_of_2((uint64_t)minimum) || minimum > 64 * 1024) {
		r = bm_error(-EPROTO, "%s: unusable minimum block size %"
			     PRId64, uri, minimum);
		goto fail;
	}
	if ((uint64_t)size % (uint64_t)minimum) {
		/* Its last bytes could never be read or written. */
		r = bm_error(-EPROTO, "%s: the export's size %" PRId64 " is "
			     "not a multiple of its minimum block size %"
			     PRId64, uri, size, minimum);
		goto fail;
	}
	if (maximum <= 0 || (uint64_t)maximum > MAX_PAYLOAD)
		maximum = MAX_PAYLOAD;
	maximum = (int64_t)bm_round_down((uint64_t)maximum,
					 (uint64_t)minimum);
	if (maximum == 0)
		maximum = minimum;

	/* Multi-conn: the server promises that every connection sees the
	 * same data and that a flush on one covers what the others have
	 * answered.  Extra connections get as long as the first took, a
	 * few times over, but at least EXTRA_WAIT_NS. */
	want = conns_wanted();
	if ((flags & BM_OPEN_MULTI_CONN) && want > 1 &&
	    nbd_can_multi_conn(h) == 1) {
		wait_ns = BM_MAX(EXTRA_WAIT_NS, 4 * (now_ns() - t0));
		wait_ns = BM_MIN(wait_ns, (uint64_t)timeout * 1000000000u);
		nh += connect_more(uri, h, want - 1, now_ns() + wait_ns,
				   hs + 1);
	}

	n = calloc(1, sizeof *n);
	if (!n || !(n->s.name = strdup(uri))) {
		free(n);
		n = NULL;
		r = bm_error(-ENOMEM, "%s: out of memory", uri);
		goto fail;
	}
	for (unsigned i = 0; i < nh; i++) {
		n->conn[i].n = n;
		n->conn[i].h = hs[i];
		n->conn[i].index = i;
	}
	n->nconns = nh;
	n->timeout = timeout;
	n->max_payload = (uint64_t)maximum;
	n->max_zero = bm_round_down(MAX_ZERO, (uint64_t)minimum);
	n->max_status = bm_round_down(UINT32_MAX, (uint64_t)minimum);
	n->can_zero = nbd_can_zero(h) == 1;
	n->can_fast_zero = n->can_zero && nbd_can_fast_zero(h) == 1;
	n->can_trim = nbd_can_trim(h) == 1;
	n->can_flush = nbd_can_flush(h) == 1;
	n->can_fua = nbd_can_fua(h) == 1;
	n->structured = nbd_get_structured_replies_negotiated(h) == 1;
	n->can_meta = nbd_can_meta_context(h,
				LIBNBD_CONTEXT_BASE_ALLOCATION) == 1;
	n->s.ops = &nbd_ops;
	n->s.loop = loop;
	n->s.size = (uint64_t)size;
	n->s.align = (uint32_t)minimum;
	n->s.preferred = preferred > 0 && preferred <= maximum
			 ? (uint32_t)preferred : 0;
	n->s.copy_size = (uint32_t)BM_MIN((uint64_t)maximum,
		bm_round_up(BM_MAX((uint64_t)n->s.preferred, COPY_SIZE),
			    (uint64_t)minimum));
	n->s.readonly = !(flags & BM_OPEN_WRITE);
	n->s.block_device = false;
	n->s.allocated = UINT64_MAX;
	bm_debug("%s: %" PRIu64 " bytes, block sizes %" PRId64 "/%" PRId64
		 "/%" PRId64 ", zero %d fast-zero %d trim %d flush %d fua %d "
		 "base:allocation %d multi-conn %d, %u connection%s", uri,
		 n->s.size, minimum, preferred, maximum, n->can_zero,
		 n->can_fast_zero, n->can_trim, n->can_flush, n->can_fua,
		 n->can_meta, nbd_can_multi_conn(h) == 1, nh,
		 nh == 1 ? "" : "s");
	*out = &n->s;
	return 0;

fail:
	for (unsigned i = 0; i < nh; i++)
		nbd_close(hs[i]);
	return r;
}

unsigned
bm_nbd_connections(struct bm_store *s)
{
	return s->ops == &nbd_ops ? to_nbd(s)->nconns : 0;
}
