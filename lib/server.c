/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The NBD server: exports a blockmirror_disk over a Unix or TCP socket,
 * and snapshots of it as further read-only exports; a snapshot taken
 * `since` a checkpoint also serves what changed since then as the meta
 * context qemu:dirty-bitmap:SINCE (pull-mode incremental backups).
 * This file holds sockets, connections, the send queue, transmission, and
 * start/stop; option haggling is in server-options.c, TLS in
 * server-tls.c, the pure protocol helpers in server-proto.c, and what they
 * share in server-int.h.
 *
 * Everything after blockmirror_server_start has bound the listener runs on
 * the disk's loop thread; socket I/O is io_uring accept, recv and sendmsg
 * on that loop, and guest I/O goes through the public blockmirror_disk_aio_*
 * calls, which on the loop thread submit directly.  So a running mirror job
 * sees the server's writes like any other guest's, and a pivot is followed
 * without the client noticing.  No thread, no lock.
 *
 * A connection is a chain of continuations: at most one read is pending
 * (conn_read: fill a buffer, then call `then`), and the next read is only
 * issued by the continuation of the previous one.  The handshake and the
 * option haggling are strictly sequential; in transmission a request header
 * is parsed, its payload (WRITE) read into the request's own buffer, the
 * request handed to the disk, and the next header read at once: requests
 * run concurrently and are answered in the order they finish.
 *
 * Invariants:
 *  - Sends never interleave: every message (option reply, reply header plus
 *    its payload) is queued whole on `out`, and one sendmsg at a time sends
 *    from the head of the queue.  With TLS, whole messages are encrypted
 *    into records queued on `wire`, and the sendmsg sends from there.
 *  - A WRITE's payload is always read off the socket, even when the request
 *    is refused (it is read and dropped), so the stream never loses step;
 *    only a payload too large to be worth reading ends the connection.
 *  - A connection holds at most MAX_INFLIGHT requests and about
 *    MAX_INFLIGHT_BYTES of buffers between reading a request and sending
 *    its reply; at the bound it stops reading.
 *  - `ops` counts everything that will call back into the connection: the
 *    recv, the sendmsg, cancels, deferred reads and disk requests.  A
 *    connection is freed only once it is `dead` (socket shut down, nothing
 *    more will be started) and `ops` is zero, and only by conn_check, which
 *    every callback calls as its very last step.
 *  - `closing` is the graceful way out (DISC, EOF, server stop, ABORT):
 *    read nothing more, let the disk finish what it has, send the replies,
 *    then die.  `dead` is the hard way (protocol violation, socket error).
 *  - Every number from the network is checked (bm_range_ok, the limits in
 *    server.h) before it sizes a buffer or reaches the disk.
 *  - Until transmission a connection is counted in `nhandshaking`, not
 *    against max_clients, and holds a deadline timer (an op like any
 *    other): silent or trickling clients are closed at the deadline and
 *    can never take a served client's slot.
 *  - BLOCK_STATUS never asks the disk about a whole range: steps of all
 *    requests take turns, one with the disk at a time (see "block
 *    status" below), so an extent walk on the loop thread is short.
 *  - A snapshot's export (see "snapshot exports") is read-only, and
 *    reaches its snapshot only through bm_disk_aio_to on the view, as a
 *    disk request of a connection that chose it: so once its last
 *    connection is freed, which blockmirror_server_unexport waits for,
 *    nothing of the server touches the snapshot again.
 *  - A snapshot export's dirty bitmap is the export's own copy, taken
 *    and checked (its bits cover the disk exactly) before the export is
 *    listed, freed with the export, and never asked of the disk: a
 *    BLOCK_STATUS builds its descriptors at once from at most
 *    BS_MAX_LENGTH of it (see "dirty bitmap" below).  A reply carries one
 *    chunk per selected context, the last one DONE.
 */
#include "listen.h"
#include "server-int.h"
#include "snapshot.h"

static void conn_check(struct srv_conn *c);
static void read_request(struct srv_conn *c);
static void server_check(struct blockmirror_server *s);

/* ---- the send queue -------------------------------------------------- */

static void
queue_init(struct srv_queue *q)
{
	q->head = NULL;
	q->tail = &q->head;
	q->off = 0;
	q->bytes = 0;
}

void
bm_srv_queue_push(struct srv_queue *q, struct srv_msg *m)
{
	m->next = NULL;
	*q->tail = m;
	q->tail = &m->next;
	q->bytes += m->len;
}

/* Pop the head, which has been sent (or is being dropped). */
static void
queue_pop(struct srv_queue *q)
{
	struct srv_msg *m = q->head;

	q->bytes -= m->len - q->off;
	q->off = 0;
	q->head = m->next;
	if (!q->head)
		q->tail = &q->head;
	m->release(m);
}

static void
queue_consume(struct srv_queue *q, size_t n)
{
	while (n && q->head) {
		size_t left = q->head->len - q->off;

		if (n < left) {
			q->off += n;
			q->bytes -= n;
			return;
		}
		n -= left;
		queue_pop(q);
	}
}

static void
queue_clear(struct srv_queue *q)
{
	while (q->head)
		queue_pop(q);
}

static unsigned
queue_iov(const struct srv_queue *q, struct iovec *iov, unsigned max)
{
	size_t off = q->off;
	unsigned n = 0;

	for (struct srv_msg *m = q->head; m && n < max; m = m->next) {
		for (unsigned i = 0; i < m->niov && n < max; i++) {
			size_t len = m->iov[i].iov_len;

			if (off >= len) {
				off -= len;
				continue;
			}
			iov[n].iov_base = (char *)m->iov[i].iov_base + off;
			iov[n].iov_len = len - off;
			off = 0;
			n++;
		}
	}
	return n;
}

void
bm_srv_msg_free(struct srv_msg *m)
{
	free(m);
}

/* A message with `len` bytes of its own, or NULL (c->oom is then set). */
uint8_t *
bm_srv_msg_alloc(struct srv_conn *c, size_t len)
{
	struct srv_msg *m = malloc(sizeof *m + len);

	if (!m) {
		c->oom = true;
		return NULL;
	}
	m->release = bm_srv_msg_free;
	m->iov[0].iov_base = m + 1;
	m->iov[0].iov_len = len;
	m->niov = 1;
	m->len = len;
	bm_srv_queue_push(&c->out, m);
	return (uint8_t *)(m + 1);
}

/* ---- connection teardown -------------------------------------------- */

static void
cancel_rd_done(struct bm_op *op, int res)
{
	struct srv_conn *c = bm_container_of(op, struct srv_conn,
					     cancel_rd_op);

	c->ops--;
	conn_check(c);
}

static void
cancel_send_done(struct bm_op *op, int res)
{
	struct srv_conn *c = bm_container_of(op, struct srv_conn,
					     cancel_send_op);

	c->ops--;
	conn_check(c);
}

static void
hs_timer_stop(struct srv_conn *c)
{
	if (c->hs_timer.armed && !c->hs_cancelled) {
		c->hs_cancelled = true;
		bm_loop_timer_cancel(c->server->loop, &c->hs_timer);
	}
}

/*
 * The hard way out: shut the socket down and cancel what the ring holds
 * for it.  Disk requests still finish; their replies are dropped.
 */
void
bm_srv_conn_kill(struct srv_conn *c)
{
	struct bm_loop *loop = c->server->loop;
	struct io_uring_sqe *sqe;

	if (c->dead)
		return;
	c->dead = true;
	shutdown(c->fd, SHUT_RDWR);
	hs_timer_stop(c);
	if (c->rd_busy) {
		sqe = bm_loop_sqe(loop, &c->cancel_rd_op, cancel_rd_done);
		io_uring_prep_cancel(sqe, &c->rd_op, 0);
		c->ops++;
	}
	if (c->send_busy) {
		sqe = bm_loop_sqe(loop, &c->cancel_send_op, cancel_send_done);
		io_uring_prep_cancel(sqe, &c->send_op, 0);
		c->ops++;
	}
}

static void req_release(struct srv_req *req);

static void export_check(struct blockmirror_server *s,
			 struct srv_export *e);

static void
conn_free(struct srv_conn *c)
{
	struct blockmirror_server *s = c->server;
	struct srv_export *e;

	queue_clear(&c->out);
	queue_clear(&c->wire);
	if (c->cur)
		req_release(c->cur);
	if (c->tls)
		gnutls_deinit(c->tls);
	free(c->tls_in);
	free(c->opt_data);
	free(c->scratch);
	free(c->dirty_sel);
	close(c->fd);
	if (c->prev)
		c->prev->next = c->next;
	else
		s->conns = c->next;
	if (c->next)
		c->next->prev = c->prev;
	s->nclients--;
	if (!c->transmission)
		s->nhandshaking--;
	bm_debug("nbd server %s: connection closed (%u left)", s->address,
		 s->nclients);
	e = c->export;
	free(c);
	if (e) {
		e->nconns--;
		export_check(s, e);
	}
	if (s->stopping && !s->nclients && s->stop_timer.armed)
		bm_loop_timer_cancel(s->loop, &s->stop_timer);
	server_check(s);
}

/* ---- the sender ------------------------------------------------------ */

static void
send_done(struct bm_op *op, int res)
{
	struct srv_conn *c = bm_container_of(op, struct srv_conn, send_op);

	c->ops--;
	c->send_busy = false;
	if (!c->dead) {
		if (res > 0)
			queue_consume(c->send_wire ? &c->wire : &c->out,
				      (size_t)res);
		else if (res != -EINTR && res != -EAGAIN)
			bm_srv_conn_kill(c); /* the peer is gone */
	}
	conn_check(c);
}

/* Encrypt queued messages into TLS records on `wire`.  false: TLS failed. */
static bool
tls_encrypt(struct srv_conn *c)
{
	while (c->out.head && c->wire.bytes < TLS_WIRE_MAX) {
		struct srv_msg *m = c->out.head;

		for (unsigned i = 0; i < m->niov; i++) {
			const uint8_t *p = m->iov[i].iov_base;
			size_t n = m->iov[i].iov_len;

			while (n) {
				ssize_t r = gnutls_record_send(c->tls, p, n);

				if (r <= 0) {
					bm_debug("nbd server: TLS send: %s",
						 gnutls_strerror((int)r));
					return false;
				}
				p += r;
				n -= (size_t)r;
			}
		}
		queue_pop(&c->out);
	}
	return true;
}

static void
send_kick(struct srv_conn *c)
{
	struct srv_queue *q = &c->out;
	struct io_uring_sqe *sqe;
	unsigned n;

	if (c->send_busy || c->dead)
		return;
	if (c->tls) {
		/* Nothing is queued on `out` while the handshake runs. */
		if (c->tls_ready && !tls_encrypt(c)) {
			bm_srv_conn_kill(c);
			return;
		}
		q = &c->wire;
	}
	if (!q->head)
		return;
	n = queue_iov(q, c->send_iov, SEND_IOV);
	memset(&c->mh, 0, sizeof c->mh);
	c->mh.msg_iov = c->send_iov;
	c->mh.msg_iovlen = n;
	sqe = bm_loop_sqe(c->server->loop, &c->send_op, send_done);
	io_uring_prep_sendmsg(sqe, c->fd, &c->mh, MSG_NOSIGNAL);
	c->send_busy = true;
	c->send_wire = q == &c->wire;
	c->ops++;
}

static bool
nothing_to_send(const struct srv_conn *c)
{
	return !c->send_busy && !c->out.head && !c->wire.head;
}

/* ---- the reader ------------------------------------------------------- */

static void read_step(struct srv_conn *c);

static void
recv_done(struct bm_op *op, int res)
{
	struct srv_conn *c = bm_container_of(op, struct srv_conn, rd_op);

	c->ops--;
	c->rd_busy = false;
	if (c->dead || c->closing)
		goto out;
	if (res == -EINTR || res == -EAGAIN) {
		read_step(c);
		goto out;
	}
	if (res < 0) {
		bm_debug("nbd server: recv: %s", strerror(-res));
		bm_srv_conn_kill(c);
		goto out;
	}
	if (c->tls) {
		c->tls_in_start = 0;
		c->tls_in_end = (size_t)res;
		if (res == 0)
			c->tls_eof = true;
		if (c->tls_handshaking)
			bm_srv_tls_handshake_step(c);
		else
			bm_srv_tls_read_step(c);
		goto out;
	}
	if (res == 0) {
		/* EOF: mid-message it is the client's loss; either way
		 * finish what was started and go. */
		c->closing = true;
		goto out;
	}
	c->rd_got += (size_t)res;
	if (c->rd_got < c->rd_len)
		read_step(c);
	else
		c->rd_then(c);
out:
	conn_check(c);
}

void
bm_srv_read_deferred(struct bm_op *op, int res)
{
	struct srv_conn *c = bm_container_of(op, struct srv_conn, rd_op);

	c->ops--;
	c->rd_busy = false;
	if (!c->dead && !c->closing)
		c->rd_then(c);
	conn_check(c);
}

void
bm_srv_issue_recv(struct srv_conn *c, void *buf, size_t len)
{
	struct io_uring_sqe *sqe;

	sqe = bm_loop_sqe(c->server->loop, &c->rd_op, recv_done);
	io_uring_prep_recv(sqe, c->fd, buf, len, 0);
	c->rd_busy = true;
	c->ops++;
}

static void
read_step(struct srv_conn *c)
{
	if (c->tls)
		bm_srv_tls_read_step(c);
	else
		bm_srv_issue_recv(c, c->rd_buf + c->rd_got, c->rd_len - c->rd_got);
}

/* Fill buf[0, len) (len > 0) from the socket, then call then(c). */
void
bm_srv_conn_read(struct srv_conn *c, void *buf, size_t len,
	  void (*then)(struct srv_conn *c))
{
	c->rd_buf = buf;
	c->rd_len = len;
	c->rd_got = 0;
	c->rd_then = then;
	read_step(c);
}

static void
drop_step(struct srv_conn *c)
{
	size_t n;

	if (c->rd_buf == c->scratch)
		c->drop_left -= c->rd_len;
	if (!c->drop_left) {
		c->drop_then(c);
		return;
	}
	n = (size_t)BM_MIN(c->drop_left, SCRATCH_SIZE);
	bm_srv_conn_read(c, c->scratch, n, drop_step);
}

/* Read and throw away `len` bytes, then call then(c). */
void
bm_srv_conn_drop(struct srv_conn *c, uint64_t len, void (*then)(struct srv_conn *c))
{
	if (!c->scratch && !(c->scratch = malloc(SCRATCH_SIZE))) {
		bm_srv_conn_kill(c);
		return;
	}
	c->drop_left = len;
	c->drop_then = then;
	c->rd_buf = NULL;
	drop_step(c);
}

/* ---- checking a connection after every event ---------------------------- */

/* What a BLOCK_STATUS request is charged: its descriptors, per context. */
static uint64_t
bs_charge(const struct srv_conn *c)
{
	return BS_CHARGE * (c->dirty_bitmap ? 2u : 1u);
}

static bool
can_admit(const struct srv_conn *c)
{
	uint64_t need = 0;

	if (c->inflight >= MAX_INFLIGHT)
		return false;
	if (c->hdr_pending && (c->req.type == BM_NBD_CMD_READ ||
			       c->req.type == BM_NBD_CMD_WRITE))
		need = c->req.length;
	else if (c->hdr_pending && c->req.type == BM_NBD_CMD_BLOCK_STATUS)
		need = bs_charge(c);
	return !c->inflight || c->inflight_bytes + need <= MAX_INFLIGHT_BYTES;
}

/*
 * The end of every callback: resume reading below the bound, send what
 * is queued, close a closing connection once it is done, free a dead one
 * once nothing can call back into it.  May free c.
 */
static void
conn_check(struct srv_conn *c)
{
	if (!c->dead && c->paused && !c->closing && can_admit(c)) {
		c->paused = false;
		read_request(c);
	}
	send_kick(c);
	if (!c->dead && nothing_to_send(c) && c->drained) {
		void (*fn)(struct srv_conn *c) = c->drained;

		c->drained = NULL;
		fn(c);
		send_kick(c);
	}
	if (!c->dead && c->closing && !c->disk_ops && nothing_to_send(c)) {
		if (c->tls_ready && !c->tls_bye) {
			/* close_notify, then go. */
			c->tls_bye = true;
			gnutls_bye(c->tls, GNUTLS_SHUT_WR);
			send_kick(c);
		}
		if (nothing_to_send(c))
			bm_srv_conn_kill(c);
	}
	if (c->dead && !c->ops)
		conn_free(c);
}

/* ---- transmission ---------------------------------------------------- */

static void
req_release(struct srv_req *req)
{
	struct srv_conn *c = req->conn;

	c->inflight--;
	c->inflight_bytes -= req->charged;
	free(req->buf);
	free(req->bs_dirty);
	free(req);
}

static void
req_msg_release(struct srv_msg *m)
{
	req_release(bm_container_of(m, struct srv_req, msg));
}

static struct srv_req *
req_new(struct srv_conn *c, bool with_buf)
{
	struct srv_req *req = calloc(1, sizeof *req);

	if (!req)
		return NULL;
	req->conn = c;
	req->r = c->req;
	if (with_buf) {
		/* Aligned: the disk may run with O_DIRECT. */
		if (posix_memalign(&req->buf, 4096, c->req.length)) {
			free(req);
			return NULL;
		}
		req->charged = c->req.length;
	} else if (c->req.type == BM_NBD_CMD_BLOCK_STATUS) {
		req->charged = bs_charge(c); /* its descriptors */
	}
	c->inflight++;
	c->inflight_bytes += req->charged;
	return req;
}

/* Add a BLOCK_STATUS chunk of context `id` with n descriptors at d. */
static void
bs_chunk(struct srv_req *req, uint8_t *h, uint32_t id, uint8_t *d, size_t n,
	 bool last)
{
	struct srv_msg *m = &req->msg;

	bm_put_be32(h, NBD_STRUCTURED_REPLY_MAGIC);
	bm_put_be16(h + 4, last ? NBD_REPLY_FLAG_DONE : 0);
	bm_put_be16(h + 6, NBD_REPLY_TYPE_BLOCK_STATUS);
	bm_put_be64(h + 8, req->r.cookie);
	bm_put_be32(h + 16, (uint32_t)(4 + 8 * n));
	bm_put_be32(h + 20, id);
	m->iov[m->niov].iov_base = h;
	m->iov[m->niov++].iov_len = 24;
	m->iov[m->niov].iov_base = d;
	m->iov[m->niov++].iov_len = 8 * n;
	m->len += 24 + 8 * n;
}

/* A BLOCK_STATUS reply: one chunk per context selected, the last one
 * DONE; false (nothing queued) if a context has no descriptor. */
static bool
bs_reply(struct srv_req *req)
{
	struct srv_msg *m = &req->msg;

	if ((req->bs_base && !req->bs_n) ||
	    (req->bs_dirty && !req->bs_dirty_n))
		return false;
	m->niov = 0;
	m->len = 0;
	if (req->bs_base)
		bs_chunk(req, req->hdr, BASE_ALLOCATION_ID, req->buf,
			 req->bs_n, !req->bs_dirty);
	if (req->bs_dirty)
		bs_chunk(req, req->bs_base ? req->hdr2 : req->hdr,
			 DIRTY_BITMAP_ID, req->bs_dirty, req->bs_dirty_n, true);
	bm_srv_queue_push(&req->conn->out, m);
	return true;
}

/* Queue the reply for req: its error, or its result. */
static void
req_reply(struct srv_req *req, uint32_t err)
{
	struct srv_conn *c = req->conn;
	struct srv_msg *m = &req->msg;
	uint8_t *h = req->hdr;
	size_t hlen;
	bool data = !err && req->r.type == BM_NBD_CMD_READ;

	m->release = req_msg_release;
	if (!c->structured) {
		bm_put_be32(h, NBD_SIMPLE_REPLY_MAGIC);
		bm_put_be32(h + 4, err);
		bm_put_be64(h + 8, req->r.cookie);
		hlen = 16;
	} else {
		bm_put_be32(h, NBD_STRUCTURED_REPLY_MAGIC);
		bm_put_be16(h + 4, NBD_REPLY_FLAG_DONE);
		bm_put_be64(h + 8, req->r.cookie);
		if (err) {
			/* u32 error, u16 message length (no message). */
			bm_put_be16(h + 6, NBD_REPLY_TYPE_ERROR);
			bm_put_be32(h + 16, 6);
			bm_put_be32(h + 20, err);
			bm_put_be16(h + 24, 0);
			hlen = 26;
		} else if (data) {
			bm_put_be16(h + 6, NBD_REPLY_TYPE_OFFSET_DATA);
			bm_put_be32(h + 16, 8 + req->r.length);
			bm_put_be64(h + 20, req->r.offset);
			hlen = 28;
		} else if (req->r.type == BM_NBD_CMD_BLOCK_STATUS) {
			if (bs_reply(req))
				return;
			bm_put_be16(h + 6, NBD_REPLY_TYPE_ERROR);
			bm_put_be32(h + 16, 6);
			bm_put_be32(h + 20, BM_NBD_ENOMEM);
			bm_put_be16(h + 24, 0);
			hlen = 26;
		} else {
			bm_put_be16(h + 6, NBD_REPLY_TYPE_NONE);
			bm_put_be32(h + 16, 0);
			hlen = 20;
		}
	}
	m->iov[0].iov_base = h;
	m->iov[0].iov_len = hlen;
	m->niov = 1;
	m->len = hlen;
	if (data) {
		m->iov[1].iov_base = req->buf;
		m->iov[1].iov_len = req->r.length;
		m->niov = 2;
		m->len += req->r.length;
	}
	bm_srv_queue_push(&c->out, m);
}

static void
req_disk_done(void *opaque, int err)
{
	struct srv_req *req = opaque;
	struct srv_conn *c = req->conn;
	struct blockmirror_disk *disk = c->server->disk;

	c->disk_ops--;
	c->ops--;
	if (c->dead) {
		req_release(req);
		goto out;
	}
	if (!err && req->flush_after) {
		req->flush_after = false;
		err = blockmirror_disk_aio_flush(disk, req_disk_done, req);
		if (!err) {
			c->disk_ops++;
			c->ops++;
			goto out;
		}
	}
	req_reply(req, bm_server_nbd_error(err));
out:
	conn_check(c);
}

/* ---- block status --------------------------------------------------- */

/*
 * The disk's extent walk may run on the loop thread (lseek for files), and
 * its cost grows with the extents in the range it is asked about.  So a
 * BLOCK_STATUS request never asks the disk about its whole range: it asks
 * in steps of at most BS_STEP_MAX bytes, and the steps of every request
 * of every connection take turns, one with the disk at a time, so guest
 * I/O on the loop runs between any two.  A step grows while it finds few
 * extents and shrinks when it finds many.  The reply describes a prefix
 * of the range, at most BS_MAX_LENGTH bytes in BS_MAX_DESCRIPTORS
 * descriptors (the protocol allows it; clients ask again from where it
 * ended); extents with the same flags on both sides of a step boundary
 * merge.  A request holds a disk op of its connection from its start to
 * its reply.
 */

#define BS_DESC_MAX (UINT32_MAX & ~UINT32_C(511))

static void
bs_push(struct blockmirror_server *s, struct srv_req *req)
{
	req->bs_next = NULL;
	*s->bs_tail = req;
	s->bs_tail = &req->bs_next;
}

/* Done with the disk: reply with what is known, or drop it.  May free the
 * connection. */
static void
bs_finish(struct srv_req *req, int err)
{
	struct srv_conn *c = req->conn;

	c->disk_ops--;
	c->ops--;
	if (c->dead)
		req_release(req);
	else if (req->bs_n)
		req_reply(req, 0);
	else
		req_reply(req, bm_server_nbd_error(err < 0 ? err : -EIO));
	conn_check(c);
}

/* Add a step's extents, from bs_pos on, as descriptors; how many were
 * used. */
static size_t
bs_add(struct srv_req *req, const struct bm_extent_list *l)
{
	uint8_t *d = req->buf;
	size_t used = 0;

	for (size_t i = 0; i < l->len && req->bs_pos < req->bs_end; i++) {
		const struct bm_extent *e = &l->v[i];
		uint32_t flags = e->flags & (BM_EXTENT_HOLE | BM_EXTENT_ZERO);
		uint64_t e_end = BM_MIN(e->offset + e->length, req->bs_end);
		uint8_t *last = d + 8 * (req->bs_n ? req->bs_n - 1 : 0);
		uint64_t len;

		if (e->offset > req->bs_pos)
			break; /* a gap: nothing to say about it */
		if (e_end <= req->bs_pos)
			continue;
		len = e_end - req->bs_pos;
		if (req->bs_n && bm_get_be32(last + 4) == flags &&
		    bm_get_be32(last) + len <= BS_DESC_MAX) {
			bm_put_be32(last, (uint32_t)(bm_get_be32(last) + len));
		} else {
			if (req->bs_n == req->bs_max)
				break;
			len = BM_MIN(len, BS_DESC_MAX);
			bm_put_be32(d + 8 * req->bs_n, (uint32_t)len);
			bm_put_be32(d + 8 * req->bs_n + 4, flags);
			req->bs_n++;
		}
		req->bs_pos += len;
		used++;
	}
	return used;
}

static void bs_kick(struct blockmirror_server *s);

static void
bs_step_done(void *opaque, int err)
{
	struct srv_req *req = opaque;
	struct srv_conn *c = req->conn;
	struct blockmirror_server *s = c->server;
	uint64_t before = req->bs_pos;
	size_t used;

	s->ops++; /* s outlives what follows */
	s->bs_busy = false;
	if (c->dead || err < 0) {
		bs_finish(req, err);
		goto out;
	}
	used = bs_add(req, &s->bs_ext);
	if (req->bs_pos == before || req->bs_pos >= req->bs_end ||
	    req->bs_n == req->bs_max || c->closing) {
		bs_finish(req, 0);
		goto out;
	}
	if (used < 64)
		req->bs_step = BM_MIN(req->bs_step * 2, BS_STEP_MAX);
	else if (used > 1024)
		req->bs_step = BM_MAX(req->bs_step / 2, BS_STEP_MIN);
	bs_push(s, req);
out:
	bs_kick(s);
	s->ops--;
	server_check(s);
}

/* Give the disk the next step, unless one is with it.  Only from a
 * callback's context: it may reply, and free connections. */
static void
bs_kick(struct blockmirror_server *s)
{
	while (!s->bs_busy && s->bs_head) {
		struct srv_req *req = s->bs_head;
		struct blockmirror_disk *disk;
		uint64_t len;
		int err;

		s->bs_head = req->bs_next;
		if (!s->bs_head)
			s->bs_tail = &s->bs_head;
		if (req->conn->dead) {
			bs_finish(req, -ECONNRESET);
			continue;
		}
		bm_extent_list_reset(&s->bs_ext);
		s->bs_busy = true;
		len = BM_MIN(req->bs_step, req->bs_end - req->bs_pos);
		if (!req->conn->export)
			err = bm_disk_aio_block_status(s->disk, len,
						       req->bs_pos, &s->bs_ext,
						       bs_step_done, req);
		else if ((disk = bm_snapshot_disk(req->conn->export->snap)))
			err = bm_disk_aio_to(disk, bm_snapshot_view(
						     req->conn->export->snap),
					     BM_REQ_BLOCK_STATUS, &s->bs_ext,
					     len, req->bs_pos, bs_step_done,
					     req);
		else
			err = -ESHUTDOWN;
		if (err < 0) {
			s->bs_busy = false;
			bs_finish(req, err);
		}
	}
	if (!s->bs_busy)
		bm_extent_list_free(&s->bs_ext); /* one step's worth */
}

static void
bs_kick_done(struct bm_op *op, int res)
{
	struct blockmirror_server *s =
		bm_container_of(op, struct blockmirror_server, bs_kick_op);

	s->bs_kick_armed = false;
	bs_kick(s);
	s->ops--;
	server_check(s);
}

/*
 * The dirty bitmap of a snapshot's export needs no disk: it is in memory
 * (e->dirty_words), and a request's range is at most BS_MAX_LENGTH, so
 * its descriptors are made at once, a word of granules at a time, in
 * bounded work.  Runs of granules with the same bit merge; boundaries
 * fall on granules, the first descriptor starts at the offset and the
 * last ends at the (clamped) end of the request.
 */

static bool
dirty_test(const struct srv_export *e, uint64_t g)
{
	return g < e->dirty_nbits && ((e->dirty_words[g >> 6] >> (g & 63)) & 1);
}

/* The first granule from g on, before lim, whose bit is not `set`; lim
 * if there is none. */
static uint64_t
dirty_run_end(const struct srv_export *e, uint64_t g, uint64_t lim, bool set)
{
	while (g < lim) {
		uint64_t w = e->dirty_words[g >> 6];

		if (set)
			w = ~w;
		w >>= g & 63;
		if (w)
			return BM_MIN(g + (uint64_t)__builtin_ctzll(w), lim);
		g = (g | 63) + 1;
	}
	return lim;
}

/* Descriptors of [pos, end) into d, at most max; how many. */
static size_t
dirty_extents(const struct srv_export *e, uint64_t pos, uint64_t end,
	      uint8_t *d, size_t max)
{
	unsigned shift = e->dirty_shift;
	uint64_t lim = ((end - 1) >> shift) + 1; /* <= dirty_nbits */
	size_t n = 0;

	while (pos < end && n < max) {
		uint64_t g = pos >> shift;
		bool set = dirty_test(e, g);
		uint64_t stop = dirty_run_end(e, g + 1, lim, set);
		/* stop < lim: its offset is below end, no overflow. */
		uint64_t run_end = stop < lim ? stop << shift : end;

		bm_put_be32(d + 8 * n, (uint32_t)(run_end - pos));
		bm_put_be32(d + 8 * n + 4, set ? DIRTY_BITMAP_DIRTY : 0);
		n++;
		pos = run_end;
	}
	return n;
}

/* Queue a checked BLOCK_STATUS request for its first step; a request
 * for the dirty bitmap alone is answered at once. */
static void
bs_start(struct srv_req *req)
{
	struct srv_conn *c = req->conn;
	struct blockmirror_server *s = c->server;
	const struct bm_server_request *r = &req->r;

	req->bs_max = (r->flags & BM_NBD_CMD_FLAG_REQ_ONE) ? 1
							    : BS_MAX_DESCRIPTORS;
	req->bs_pos = r->offset;
	req->bs_end = r->offset + BM_MIN(r->length, BS_MAX_LENGTH);
	req->bs_base = c->base_allocation;
	if (c->dirty_bitmap && c->export && c->export->dirty_ctx) {
		req->bs_dirty = malloc(8 * req->bs_max);
		if (!req->bs_dirty) {
			req_reply(req, BM_NBD_ENOMEM);
			return;
		}
		req->bs_dirty_n = dirty_extents(c->export, req->bs_pos,
						req->bs_end, req->bs_dirty,
						req->bs_max);
	}
	if (!req->bs_base) {
		req_reply(req, 0);
		return;
	}
	req->buf = malloc(8 * req->bs_max);
	if (!req->buf) {
		req_reply(req, BM_NBD_ENOMEM);
		return;
	}
	req->bs_step = BS_STEP_MIN;
	c->disk_ops++;
	c->ops++;
	bs_push(s, req);
	if (!s->bs_busy && !s->bs_kick_armed) {
		/* Deferred: the caller goes on using the connection. */
		s->bs_kick_armed = true;
		s->ops++;
		bm_loop_defer(s->loop, &s->bs_kick_op, bs_kick_done, 0);
	}
}

/* A request was handed to the disk (err 0): it calls back, so the
 * connection counts it; or it was refused, and is answered now. */
static void
req_handed(struct srv_req *req, int err)
{
	if (err < 0) {
		req_reply(req, bm_server_nbd_error(err));
		return;
	}
	req->conn->disk_ops++;
	req->conn->ops++;
}

/* A request to a snapshot's export (checked read-only): the view, read
 * through the disk (bm_disk_aio_to) so that it counts and queues like
 * the guest's requests and no swap happens under it. */
static void
snapshot_submit(struct srv_req *req)
{
	struct srv_conn *c = req->conn;
	struct blockmirror_snapshot *snap = c->export->snap;
	struct blockmirror_disk *disk = bm_snapshot_disk(snap);
	const struct bm_server_request *r = &req->r;
	int err;

	switch (r->type) {
	case BM_NBD_CMD_READ:
		err = disk ? bm_disk_aio_to(disk, bm_snapshot_view(snap),
					    BM_REQ_READ, req->buf, r->length,
					    r->offset, req_disk_done, req)
			   : -ESHUTDOWN;
		break;
	case BM_NBD_CMD_BLOCK_STATUS:
		bs_start(req);
		return;
	default:
		/* FLUSH, CACHE: nothing was written, nothing to do. */
		req_reply(req, 0);
		return;
	}
	req_handed(req, err);
}

static void
req_submit(struct srv_req *req)
{
	struct srv_conn *c = req->conn;
	struct blockmirror_disk *disk = c->server->disk;
	const struct bm_server_request *r = &req->r;
	unsigned flags = 0;
	int err;

	if (c->export) {
		snapshot_submit(req);
		return;
	}
	if (r->flags & BM_NBD_CMD_FLAG_FUA)
		flags |= BLOCKMIRROR_REQ_FUA;
	switch (r->type) {
	case BM_NBD_CMD_READ:
		err = blockmirror_disk_aio_read(disk, req->buf, r->length,
						r->offset, req_disk_done, req);
		break;
	case BM_NBD_CMD_WRITE:
		err = blockmirror_disk_aio_write(disk, req->buf, r->length,
						 r->offset, flags,
						 req_disk_done, req);
		break;
	case BM_NBD_CMD_FLUSH:
		err = blockmirror_disk_aio_flush(disk, req_disk_done, req);
		break;
	case BM_NBD_CMD_TRIM:
		/* FUA on a trim: make it durable with a flush after it. */
		req->flush_after = flags & BLOCKMIRROR_REQ_FUA;
		err = blockmirror_disk_aio_discard(disk, r->length, r->offset,
						   req_disk_done, req);
		break;
	case BM_NBD_CMD_WRITE_ZEROES:
		if (!(r->flags & BM_NBD_CMD_FLAG_NO_HOLE))
			flags |= BLOCKMIRROR_REQ_MAY_TRIM;
		err = blockmirror_disk_aio_write_zeroes(disk, r->length,
							r->offset, flags,
							req_disk_done, req);
		break;
	case BM_NBD_CMD_BLOCK_STATUS:
		bs_start(req);
		return;
	default:
		/* CACHE: a hint we may ignore. */
		req_reply(req, 0);
		return;
	}
	req_handed(req, err);
}

static void
write_payload_read(struct srv_conn *c)
{
	struct srv_req *req = c->cur;

	c->cur = NULL;
	req_submit(req);
	read_request(c);
}

static void
refused_payload_dropped(struct srv_conn *c)
{
	struct srv_req *req = c->cur;

	c->cur = NULL;
	req_reply(req, req->err);
	read_request(c);
}

/* A request header is in c->req and the bound admits it. */
static void
handle_request(struct srv_conn *c)
{
	struct blockmirror_server *s = c->server;
	const struct bm_server_request *r = &c->req;
	struct bm_server_export_state e = {
		.size = bm_srv_export_size(s, c->export),
		.readonly = bm_srv_export_readonly(s, c->export),
		.structured = c->structured,
		.base_allocation = c->base_allocation,
		.dirty_bitmap = c->dirty_bitmap && c->export &&
				c->export->dirty_ctx,
	};
	struct srv_req *req;
	uint32_t err;
	bool payload = r->type == BM_NBD_CMD_WRITE;

	c->hdr_pending = false;
	if (r->type == BM_NBD_CMD_DISC) {
		bm_debug("nbd server %s: client disconnects", s->address);
		c->closing = true;
		return;
	}
	if (payload && r->length > BM_SERVER_MAX_DROP) {
		bm_debug("nbd server %s: WRITE of %" PRIu32 " bytes: "
			 "disconnecting", s->address, r->length);
		bm_srv_conn_kill(c);
		return;
	}
	err = bm_server_check_request(&e, r);
	req = req_new(c, !err && (payload || r->type == BM_NBD_CMD_READ));
	if (!req && !err) {
		err = BM_NBD_ENOMEM;
		req = req_new(c, false);
	}
	if (!req) {
		bm_srv_conn_kill(c);
		return;
	}
	req->err = err;
	if (payload) {
		c->cur = req;
		if (err)
			bm_srv_conn_drop(c, r->length, refused_payload_dropped);
		else
			bm_srv_conn_read(c, req->buf, r->length, write_payload_read);
		return;
	}
	if (err)
		req_reply(req, err);
	else
		req_submit(req);
	read_request(c);
}

static void
got_request(struct srv_conn *c)
{
	if (bm_server_decode_request(c->req_hdr, &c->req) < 0) {
		bm_debug("nbd server %s: bad request magic: disconnecting",
			 c->server->address);
		bm_srv_conn_kill(c);
		return;
	}
	c->hdr_pending = true;
	read_request(c);
}

/* Handle the parsed header or read the next one, unless at the bound. */
static void
read_request(struct srv_conn *c)
{
	if (c->dead || c->closing)
		return;
	if (!can_admit(c)) {
		c->paused = true;
		return;
	}
	if (c->hdr_pending)
		handle_request(c);
	else
		bm_srv_conn_read(c, c->req_hdr, sizeof c->req_hdr, got_request);
}

/* Is there a slot for one more client in transmission? */
bool
bm_srv_can_serve(const struct srv_conn *c)
{
	const struct blockmirror_server *s = c->server;

	return s->nclients - s->nhandshaking < s->max_clients;
}

void
bm_srv_start_transmission(struct srv_conn *c)
{
	struct blockmirror_server *s = c->server;

	if (!bm_srv_can_serve(c)) {
		/* Only EXPORT_NAME gets here (GO is refused before): it has
		 * no way to say no but hanging up. */
		bm_debug("nbd server %s: %u clients already: closing one "
			 "after its handshake", s->address, s->max_clients);
		bm_srv_conn_kill(c);
		return;
	}
	c->transmission = true;
	s->nhandshaking--;
	hs_timer_stop(c);
	bm_debug("nbd server %s: transmission (%s replies)",
		 c->server->address, c->structured ? "structured" : "simple");
	read_request(c);
}

/* ---- accepting -------------------------------------------------------- */

/*
 * Who is on the other end, as far as limits go: the family and the
 * address, only the /64 prefix for IPv6 (one host has them all), the
 * IPv4 address for an IPv4-mapped one.  0 bytes if not TCP or unknown.
 */
static uint8_t
peer_key(int fd, uint8_t key[17])
{
	struct sockaddr_storage ss;
	socklen_t sl = sizeof ss;

	if (getpeername(fd, (struct sockaddr *)&ss, &sl) < 0)
		return 0;
	if (ss.ss_family == AF_INET) {
		key[0] = 4;
		memcpy(key + 1, &((struct sockaddr_in *)&ss)->sin_addr, 4);
		return 5;
	}
	if (ss.ss_family == AF_INET6) {
		const struct in6_addr *a =
			&((struct sockaddr_in6 *)&ss)->sin6_addr;

		if (IN6_IS_ADDR_V4MAPPED(a)) {
			key[0] = 4;
			memcpy(key + 1, a->s6_addr + 12, 4);
			return 5;
		}
		key[0] = 6;
		memcpy(key + 1, a->s6_addr, 8);
		return 9;
	}
	return 0;
}

/* Connections from that peer still in the handshake. */
static unsigned
peer_handshaking(const struct blockmirror_server *s, const uint8_t *key,
		 uint8_t len)
{
	unsigned n = 0;

	for (const struct srv_conn *c = s->conns; c; c = c->next)
		if (!c->transmission && c->peer_len == len &&
		    !memcmp(c->peer, key, len))
			n++;
	return n;
}

/* The handshake took too long: a silent or trickling client (or one
 * that never finishes TLS) must not hold its slot. */
static void
hs_timer_done(struct bm_op *op, int res)
{
	struct srv_conn *c = bm_container_of(op, struct srv_conn,
					     hs_timer.op);

	c->hs_timer.armed = false;
	c->ops--;
	if (res == -ETIME && !c->transmission && !c->dead) {
		bm_debug("nbd server %s: no handshake within %" PRIu64
			 " s: closing the connection", c->server->address,
			 c->server->handshake_ns / 1000000000u);
		bm_srv_conn_kill(c);
	}
	conn_check(c);
}

static void
conn_new(struct blockmirror_server *s, int fd)
{
	struct srv_conn *c;
	uint8_t *p, key[17], key_len = 0;
	int one = 1;

	/* Handshaking clients have slots of their own, and a few per
	 * address: a flood that never authenticates cannot take the
	 * slots of clients being served, nor all the handshake slots
	 * from one address. */
	if (s->nclients - s->nhandshaking >= s->max_clients) {
		bm_debug("nbd server %s: %u clients already: refusing one",
			 s->address, s->max_clients);
		close(fd);
		return;
	}
	if (s->nhandshaking >= MAX_HANDSHAKING) {
		bm_debug("nbd server %s: %u clients in the handshake "
			 "already: refusing one", s->address,
			 s->nhandshaking);
		close(fd);
		return;
	}
	if (s->tcp)
		key_len = peer_key(fd, key);
	if (key_len && peer_handshaking(s, key, key_len) >=
		       MAX_HANDSHAKING_PER_PEER) {
		bm_debug("nbd server %s: %u clients from one address in the "
			 "handshake already: refusing one", s->address,
			 MAX_HANDSHAKING_PER_PEER);
		close(fd);
		return;
	}
	c = calloc(1, sizeof *c);
	if (!c) {
		close(fd);
		return;
	}
	if (s->tcp)
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
	c->server = s;
	c->fd = fd;
	memcpy(c->peer, key, key_len);
	c->peer_len = key_len;
	queue_init(&c->out);
	queue_init(&c->wire);
	c->next = s->conns;
	if (s->conns)
		s->conns->prev = c;
	s->conns = c;
	s->nclients++;
	s->nhandshaking++;
	bm_debug("nbd server %s: new connection (%u)", s->address,
		 s->nclients);
	c->ops++;
	bm_loop_timer_start(s->loop, &c->hs_timer, s->handshake_ns,
			    hs_timer_done);
	p = bm_srv_msg_alloc(c, 18);
	if (p) {
		bm_put_be64(p, NBD_MAGIC);
		bm_put_be64(p + 8, NBD_IHAVEOPT);
		bm_put_be16(p + 16, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
		bm_srv_conn_read(c, c->flags_buf, sizeof c->flags_buf,
			  bm_srv_got_client_flags);
	} else {
		bm_srv_conn_kill(c);
	}
	conn_check(c);
}

static void accept_arm(struct blockmirror_server *s);

static void
backoff_done(struct bm_op *op, int res)
{
	struct blockmirror_server *s =
		bm_container_of(op, struct blockmirror_server, backoff.op);

	s->backoff.armed = false;
	if (!s->stopping)
		accept_arm(s);
	s->ops--;
	server_check(s);
}

static void
accept_done(struct bm_op *op, int res)
{
	struct blockmirror_server *s =
		bm_container_of(op, struct blockmirror_server, accept_op);

	s->accept_armed = false;
	if (s->stopping) {
		if (res >= 0)
			close(res);
	} else if (res >= 0) {
		conn_new(s, res);
		accept_arm(s);
	} else if (res == -EINTR || res == -EAGAIN || res == -ECONNABORTED ||
		   res == -EPROTO) {
		accept_arm(s);
	} else {
		/* Out of descriptors or memory, or worse: do not spin. */
		bm_warn("nbd server %s: accept: %s", s->address,
			strerror(-res));
		s->ops++;
		bm_loop_timer_start(s->loop, &s->backoff, ACCEPT_BACKOFF_NS,
				    backoff_done);
	}
	s->ops--;
	server_check(s);
}

static void
accept_arm(struct blockmirror_server *s)
{
	struct io_uring_sqe *sqe;

	sqe = bm_loop_sqe(s->loop, &s->accept_op, accept_done);
	io_uring_prep_accept(sqe, s->fd, NULL, NULL, SOCK_CLOEXEC);
	s->accept_armed = true;
	s->ops++;
}

/* ---- start and stop, on the loop ---------------------------------------- */

/* Stopping is over once nothing is left: tell the waiting caller. */
static void
server_check(struct blockmirror_server *s)
{
	struct bm_call *call = s->stop_call;

	if (!call || s->ops || s->nclients)
		return;
	s->stop_call = NULL;
	bm_waiter_signal(&call->w, 0); /* s may be freed from here on */
}

static void
call_start(struct bm_call *call)
{
	struct blockmirror_server *s = call->arg;

	s->loop = s->disk->loop;
	accept_arm(s);
	bm_waiter_signal(&call->w, 0);
}

static void
server_cancel_done(struct bm_op *op, int res)
{
	struct blockmirror_server *s =
		bm_container_of(op, struct blockmirror_server, cancel_op);

	s->ops--;
	server_check(s);
}

static void
stop_timer_done(struct bm_op *op, int res)
{
	struct blockmirror_server *s =
		bm_container_of(op, struct blockmirror_server, stop_timer.op);
	struct srv_conn *c, *next;

	s->stop_timer.armed = false;
	if (res == -ETIME) {
		/* The grace period is over: close whoever is left. */
		for (c = s->conns; c; c = next) {
			next = c->next;
			bm_srv_conn_kill(c);
			conn_check(c);
		}
	}
	s->ops--;
	server_check(s);
}

static void
call_stop(struct bm_call *call)
{
	struct blockmirror_server *s = call->arg;
	struct srv_conn *c, *next;
	struct io_uring_sqe *sqe;

	s->stopping = true;
	s->stop_call = call;
	s->ops++; /* hold server_check off until the end */
	if (s->accept_armed) {
		sqe = bm_loop_sqe(s->loop, &s->cancel_op, server_cancel_done);
		io_uring_prep_cancel(sqe, &s->accept_op, 0);
		s->ops++;
	}
	if (s->backoff.armed)
		bm_loop_timer_cancel(s->loop, &s->backoff);
	for (c = s->conns; c; c = next) {
		next = c->next;
		c->closing = true;
		conn_check(c);
	}
	if (s->nclients) {
		s->ops++;
		bm_loop_timer_start(s->loop, &s->stop_timer, STOP_GRACE_NS,
				    stop_timer_done);
	}
	s->ops--;
	server_check(s);
}

/* ---- snapshot exports, on the loop -------------------------------------- */

/*
 * A snapshot's export lives on s->exports until unexported; then it is
 * off the list, its connections close the graceful way (their requests
 * finish and are answered), and once the last one is freed, the export
 * is, and the waiting caller is told: no request of it can reach the
 * snapshot after that, so the caller may release it.  Clients that do
 * not read their replies are closed hard after STOP_GRACE_NS.
 */

bool
bm_srv_find_export(struct blockmirror_server *s, const uint8_t *name,
		   uint32_t len, struct srv_export **out)
{
	*out = NULL;
	/* "" is the default export, whatever ours is called. */
	if (len == 0 || (len == strlen(s->export_name) &&
			 !memcmp(name, s->export_name, len)))
		return true;
	for (struct srv_export *e = s->exports; e; e = e->next) {
		if (len == strlen(e->name) && !memcmp(name, e->name, len)) {
			*out = e;
			return true;
		}
	}
	return false;
}

uint64_t
bm_srv_export_size(const struct blockmirror_server *s,
		   const struct srv_export *e)
{
	(void)e; /* a snapshot is of the whole disk */
	return s->disk->size;
}

bool
bm_srv_export_readonly(const struct blockmirror_server *s,
		       const struct srv_export *e)
{
	return e || s->readonly;
}

static void
export_free(struct srv_export *e)
{
	free(e->name);
	free(e->dirty_ctx);
	free(e->dirty_words);
	free(e);
}

/* Free a removed export once nothing refers to it, and tell the caller. */
static void
export_check(struct blockmirror_server *s, struct srv_export *e)
{
	struct bm_call *call = e->unexport_call;

	if (!e->removing || e->nconns)
		return;
	if (e->grace.armed) {
		bm_loop_timer_cancel(s->loop, &e->grace);
		return; /* grace_done comes back here */
	}
	export_free(e);
	bm_waiter_signal(&call->w, 0);
}

static void
grace_done(struct bm_op *op, int res)
{
	struct srv_export *e = bm_container_of(op, struct srv_export,
					       grace.op);
	struct blockmirror_server *s = e->unexport_call->arg;
	struct srv_conn *c, *next;

	e->grace.armed = false;
	e->nconns++; /* e outlives the loop */
	if (res == -ETIME) {
		for (c = s->conns; c; c = next) {
			next = c->next;
			if (c->export != e)
				continue;
			bm_srv_conn_kill(c);
			conn_check(c);
		}
	}
	e->nconns--;
	s->ops--;
	export_check(s, e);
	server_check(s);
}

static void
call_export(struct bm_call *call)
{
	struct blockmirror_server *s = call->arg;
	struct srv_export *e = call->arg2, *x;
	unsigned n = 0;

	if (s->stopping) {
		bm_waiter_signal(&call->w, -ESHUTDOWN);
		return;
	}
	if (bm_snapshot_disk(e->snap) != s->disk) {
		bm_waiter_signal(&call->w, -EXDEV);
		return;
	}
	for (x = s->exports; x; x = x->next, n++) {
		if (strcmp(x->name, e->name) == 0) {
			bm_waiter_signal(&call->w, -EEXIST);
			return;
		}
	}
	if (n >= MAX_EXPORTS) {
		bm_waiter_signal(&call->w, -EMFILE);
		return;
	}
	e->next = s->exports;
	s->exports = e;
	bm_waiter_signal(&call->w, 0);
}

static void
call_unexport(struct bm_call *call)
{
	struct blockmirror_server *s = call->arg;
	const char *name = call->arg2;
	struct srv_export *e, **pp;
	struct srv_conn *c, *next;

	for (pp = &s->exports; *pp; pp = &(*pp)->next)
		if (strcmp((*pp)->name, name) == 0)
			break;
	if (!(e = *pp)) {
		bm_waiter_signal(&call->w, -ENOENT);
		return;
	}
	*pp = e->next;
	e->next = NULL;
	e->removing = true;
	e->unexport_call = call;
	e->nconns++; /* e outlives the loop */
	for (c = s->conns; c; c = next) {
		next = c->next;
		if (c->export != e)
			continue;
		c->closing = true;
		conn_check(c);
	}
	e->nconns--;
	if (e->nconns) {
		s->ops++;
		bm_loop_timer_start(s->loop, &e->grace, STOP_GRACE_NS,
				    grace_done);
	}
	export_check(s, e);
}

/* ---- listening --------------------------------------------------------- */

static int
listen_unix(struct blockmirror_server *s, const char *path)
{
	int fd, r = bm_listen_unix(path, 0, &fd, NULL);

	if (r < 0)
		return r;
	s->unix_path = strdup(path);
	if (asprintf(&s->address, "unix:%s", path) < 0)
		s->address = NULL;
	if (!s->unix_path || !s->address) {
		unlink(path);
		close(fd);
		return bm_error(-ENOMEM, "out of memory");
	}
	s->fd = fd;
	return 0;
}

static int
listen_tcp(struct blockmirror_server *s, const struct bm_server_address *a)
{
	int r = bm_listen_tcp(a->host, a->port, 0, &s->fd, &s->address);

	if (r < 0)
		return r;
	s->tcp = true;
	return 0;
}

/* ---- the public calls ------------------------------------------------- */

static void
server_free(struct blockmirror_server *s)
{
	if (!s)
		return;
	bm_server_unregister(s);
	if (s->fd >= 0)
		close(s->fd);
	if (s->unix_path)
		unlink(s->unix_path);
	if (s->prio)
		gnutls_priority_deinit(s->prio);
	if (s->psk)
		gnutls_psk_free_server_credentials(s->psk);
	while (s->exports) {
		struct srv_export *e = s->exports;

		s->exports = e->next;
		export_free(e);
	}
	bm_extent_list_free(&s->bs_ext);
	free(s->unix_path);
	free(s->address);
	free(s->export_name);
	free(s->description);
	free(s);
}

static int
server_start(struct blockmirror_disk *disk, const char *address,
	     const struct blockmirror_server_options *options,
	     struct blockmirror_server **out)
{
	struct blockmirror_server_options o = { .size = sizeof o };
	struct bm_server_address a;
	struct blockmirror_server *s;
	struct bm_call call = { .fn = call_start };
	int r;

	if (!disk || !address)
		return bm_error(-EINVAL, "no disk or no address");
	if (options) {
		if (!BM_SIZE_COVERS(options,
				    struct blockmirror_server_options,
				    max_clients))
			return bm_error(-EINVAL, "options: bad size");
		memcpy(&o, options, BM_MIN(options->size, sizeof o));
	}
	if (bm_disk_on_loop(disk))
		return bm_error(-EDEADLK, "called from the disk's loop thread");
	if (o.export_name && strlen(o.export_name) > MAX_NAME)
		return bm_error(-EINVAL, "export name longer than %d bytes",
				MAX_NAME);
	if (o.description && strlen(o.description) > MAX_NAME)
		return bm_error(-EINVAL, "description longer than %d bytes",
				MAX_NAME);
	if (o.max_clients > 65536)
		return bm_error(-EINVAL, "max_clients %u is too many",
				o.max_clients);
	if (o.handshake_timeout > 24 * 3600)
		return bm_error(-EINVAL, "handshake_timeout %u s is too long",
				o.handshake_timeout);
	r = bm_server_parse_address(address, &a);
	if (r < 0)
		return r;
	if (o.tls_psk_file && a.unix_socket)
		return bm_error(-EINVAL, "%s: TLS is for TCP addresses only",
				address);

	s = calloc(1, sizeof *s);
	if (!s)
		return bm_error(-ENOMEM, "out of memory");
	s->fd = -1;
	s->disk = disk;
	s->bs_tail = &s->bs_head;
	s->readonly = o.readonly || disk->readonly;
	s->max_clients = o.max_clients ? o.max_clients : DEFAULT_MAX_CLIENTS;
	s->handshake_ns = (uint64_t)(o.handshake_timeout ?
				     o.handshake_timeout :
				     DEFAULT_HANDSHAKE_TIMEOUT) * 1000000000u;
	s->export_name = strdup(o.export_name ? o.export_name : "");
	s->description = o.description ? strdup(o.description) : NULL;
	if (!s->export_name || (o.description && !s->description)) {
		r = bm_error(-ENOMEM, "out of memory");
		goto fail;
	}
	if (o.tls_psk_file) {
		r = bm_srv_tls_setup(s, o.tls_psk_file);
		if (r < 0)
			goto fail;
	}
	r = a.unix_socket ? listen_unix(s, a.path) : listen_tcp(s, &a);
	if (r < 0)
		goto fail;
	call.arg = s;
	r = bm_disk_call(disk, &call);
	if (r < 0)
		goto fail;
	bm_debug("nbd server %s: listening%s", s->address,
		 s->psk ? " (TLS required)" : "");
	bm_server_register(s);
	*out = s;
	return 0;
fail:
	server_free(s);
	return r;
}

BM_EXPORT struct blockmirror_server *
blockmirror_server_start(struct blockmirror_disk *disk, const char *address,
			 const struct blockmirror_server_options *options)
{
	struct blockmirror_server *s = NULL;
	int r;

	bm_error_clear();
	r = server_start(disk, address, options, &s);
	if (r < 0) {
		bm_api_fail("blockmirror_server_start", r);
		errno = -r;
		return NULL;
	}
	return s;
}

BM_EXPORT void
blockmirror_server_stop(struct blockmirror_server *s)
{
	struct bm_call call = { .fn = call_stop };
	int r;

	bm_error_clear();
	if (!s)
		return;
	call.arg = s;
	r = bm_disk_call(s->disk, &call);
	if (r < 0) {
		/* Called from the loop thread: freeing now would pull the
		 * server out from under its own callbacks. */
		bm_api_fail("blockmirror_server_stop", r);
		return;
	}
	bm_debug("nbd server %s: stopped", s->address);
	server_free(s);
}

/*
 * A snapshot taken `since` a checkpoint: its changed blocks, once, as
 * the export's qemu:dirty-bitmap:SINCE context.  The bitmap is the
 * library's own, but checked as if it were not: a power-of-two
 * granularity and exactly the bits that cover the disk, so that
 * dirty_extents never reads past it.
 */
static int
export_dirty_bitmap(struct blockmirror_server *s, struct srv_export *e)
{
	const char *since = bm_snapshot_since(e->snap);
	uint64_t gran, nbits, bytes, size = s->disk->size;
	size_t len;
	int r;

	if (!since)
		return 0;
	r = blockmirror_snapshot_changed(e->snap, &gran, &e->dirty_words,
					 &nbits, &bytes);
	if (r < 0)
		return r;
	if (gran < 512 || gran > (UINT64_C(1) << 40) || (gran & (gran - 1)) ||
	    nbits != size / gran + (size % gran != 0))
		return bm_error(-EINVAL, "the snapshot's changed blocks do "
				"not cover the disk (%" PRIu64 " bits of %"
				PRIu64 " bytes)", nbits, gran);
	e->dirty_nbits = nbits;
	e->dirty_shift = (unsigned)__builtin_ctzll(gran);
	len = strlen(DIRTY_BITMAP_PREFIX) + strlen(since) + 1;
	e->dirty_ctx = malloc(len);
	if (!e->dirty_ctx)
		return bm_error(-ENOMEM, "out of memory");
	snprintf(e->dirty_ctx, len, "%s%s", DIRTY_BITMAP_PREFIX, since);
	return 0;
}

BM_EXPORT int
blockmirror_server_export_snapshot(struct blockmirror_server *s,
				   const char *export_name,
				   struct blockmirror_snapshot *snap)
{
	struct bm_call call = { .fn = call_export };
	struct srv_export *e;
	int r;

	bm_error_clear();
	if (!s || !export_name || !snap)
		r = bm_error(-EINVAL, "bad arguments");
	else if (!*export_name)
		r = bm_error(-EINVAL, "an empty export name is the disk's own");
	else if (strlen(export_name) > MAX_NAME)
		r = bm_error(-EINVAL, "export name longer than %d bytes",
			     MAX_NAME);
	else if (strcmp(export_name, s->export_name) == 0)
		r = bm_error(-EEXIST, "%s: the disk's own export is called "
			     "that", export_name);
	else
		r = 0;
	if (r < 0)
		return bm_api_fail("blockmirror_server_export_snapshot", r);
	e = calloc(1, sizeof *e);
	if (!e || !(e->name = strdup(export_name))) {
		free(e);
		return bm_api_fail("blockmirror_server_export_snapshot",
				   bm_error(-ENOMEM, "out of memory"));
	}
	e->snap = snap;
	r = export_dirty_bitmap(s, e);
	if (r < 0) {
		export_free(e);
		return bm_api_fail("blockmirror_server_export_snapshot", r);
	}
	call.arg = s;
	call.arg2 = e;
	r = bm_disk_call(s->disk, &call);
	if (r < 0) {
		export_free(e);
		if (r == -EEXIST)
			bm_error(r, "%s: an export of that name exists",
				 export_name);
		else if (r == -EXDEV)
			bm_error(r, "the snapshot is not of the served disk");
		else if (r == -EMFILE)
			bm_error(r, "%d snapshot exports already",
				 MAX_EXPORTS);
		else if (r == -ESHUTDOWN)
			bm_error(r, "the server is stopping");
		return bm_api_fail("blockmirror_server_export_snapshot", r);
	}
	bm_debug("nbd server %s: exporting %s", s->address, export_name);
	return 0;
}

BM_EXPORT int
blockmirror_server_unexport(struct blockmirror_server *s,
			    const char *export_name)
{
	struct bm_call call = { .fn = call_unexport };
	int r;

	bm_error_clear();
	if (!s || !export_name)
		return bm_api_fail("blockmirror_server_unexport",
				   bm_error(-EINVAL, "bad arguments"));
	call.arg = s;
	call.arg2 = (void *)export_name;
	r = bm_disk_call(s->disk, &call);
	if (r == -ENOENT)
		bm_error(r, "%s: no such export", export_name);
	if (r < 0)
		return bm_api_fail("blockmirror_server_unexport", r);
	bm_debug("nbd server %s: %s unexported", s->address, export_name);
	return 0;
}

BM_EXPORT const char *
blockmirror_server_address(struct blockmirror_server *s)
{
	return s ? s->address : NULL;
}
