/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * NBD option haggling (fixed newstyle): the client's flags, then options
 * until GO, EXPORT_NAME or ABORT.  Every option's length is bounded and
 * its data always consumed; options we do not implement are answered
 * ERR_UNSUP and negotiation goes on.  Replies a client leaves unread
 * stop the reading of options at MAX_OPT_QUEUED.  With TLS required,
 * everything but STARTTLS and ABORT is answered ERR_TLS_REQD until TLS
 * is up.
 */
#include "server-int.h"

/* ---- option haggling ------------------------------------------------- */

/* Queue an option reply with `len` bytes of data to fill, or NULL. */
static uint8_t *
opt_reply(struct srv_conn *c, uint32_t type, uint32_t len)
{
	uint8_t *p = bm_srv_msg_alloc(c, 20 + (size_t)len);

	if (!p)
		return NULL;
	bm_put_be64(p, NBD_REP_MAGIC);
	bm_put_be32(p + 8, c->opt);
	bm_put_be32(p + 12, type);
	bm_put_be32(p + 16, len);
	return p + 20;
}

static void
opt_ack(struct srv_conn *c)
{
	opt_reply(c, NBD_REP_ACK, 0);
}

static void
opt_error(struct srv_conn *c, uint32_t type, const char *message)
{
	size_t len = strlen(message);
	uint8_t *p = opt_reply(c, type, (uint32_t)len);

	if (p)
		memcpy(p, message, len);
	bm_debug("nbd server %s: option %" PRIu32 ": %s", c->server->address,
		 c->opt, message);
}

/* A reply of a big-endian tag of tlen bytes (2 or 4), then a string. */
static void
tagged_string(struct srv_conn *c, uint32_t type, uint32_t tag, size_t tlen,
	      const char *str)
{
	size_t len = strlen(str);
	uint8_t *p = opt_reply(c, type, (uint32_t)(tlen + len));

	if (!p)
		return;
	if (tlen == 2)
		bm_put_be16(p, (uint16_t)tag);
	else
		bm_put_be32(p, tag);
	memcpy(p + tlen, str, len);
}

static void
info_string(struct srv_conn *c, uint16_t info, const char *str)
{
	tagged_string(c, NBD_REP_INFO, info, 2, str);
}

static void
opt_info(struct srv_conn *c, bool go)
{
	struct blockmirror_server *s = c->server;
	struct bm_server_info_request ir;
	struct srv_export *e;
	bool want_name = false, want_desc = false;
	uint8_t *p;

	if (bm_server_parse_info_request(c->opt_data, c->opt_len, &ir) < 0) {
		opt_error(c, NBD_REP_ERR_INVALID, "malformed request");
		return;
	}
	if (!bm_srv_find_export(s, ir.name, ir.name_len, &e)) {
		opt_error(c, NBD_REP_ERR_UNKNOWN, "no such export");
		return;
	}
	if (go && !bm_srv_can_serve(c)) {
		/* Others finished their handshakes first. */
		opt_error(c, NBD_REP_ERR_POLICY, "too many clients");
		return;
	}
	for (uint16_t i = 0; i < ir.ninfos; i++) {
		uint16_t info = bm_get_be16(ir.infos + 2 * i);

		if (info == NBD_INFO_NAME)
			want_name = true;
		else if (info == NBD_INFO_DESCRIPTION)
			want_desc = true;
	}
	p = opt_reply(c, NBD_REP_INFO, 12);
	if (p) {
		bm_put_be16(p, NBD_INFO_EXPORT);
		bm_put_be64(p + 2, bm_srv_export_size(s, e));
		bm_put_be16(p + 10, bm_server_tx_flags(
			bm_srv_export_readonly(s, e), c->structured));
	}
	if (want_name)
		info_string(c, NBD_INFO_NAME, e ? e->name : s->export_name);
	if (want_desc && !e && s->description)
		info_string(c, NBD_INFO_DESCRIPTION, s->description);
	/* Sent whether asked or not: with a minimum of 1 it constrains
	 * nothing, and it tells clients the preferred and largest sizes. */
	p = opt_reply(c, NBD_REP_INFO, 14);
	if (p) {
		bm_put_be16(p, NBD_INFO_BLOCK_SIZE);
		bm_put_be32(p + 2, 1);
		bm_put_be32(p + 6, BM_SERVER_PREFERRED_BLOCK);
		bm_put_be32(p + 10, BM_SERVER_MAX_PAYLOAD);
	}
	opt_ack(c);
	if (go && !c->oom) {
		c->export = e;
		if (e)
			e->nconns++;
		bm_srv_meta_check(c);
		bm_srv_start_transmission(c);
	}
}

/* One NBD_REP_META_CONTEXT: id (0 in a LIST) and name. */
static void
meta_reply(struct srv_conn *c, uint32_t id, const char *name)
{
	tagged_string(c, NBD_REP_META_CONTEXT, id, 4, name);
}

/* Forget the meta contexts selected. */
void
bm_srv_meta_reset(struct srv_conn *c)
{
	c->base_allocation = false;
	c->dirty_bitmap = false;
	free(c->dirty_sel);
	c->dirty_sel = NULL;
}

/*
 * LIST and SET: base:allocation on every export, and on a snapshot's
 * taken `since` a checkpoint, its dirty bitmap (e->dirty_ctx).  LIST
 * names a context for no query, its name or a namespace of it; SET
 * selects by exact name only.
 */
static void
opt_meta(struct srv_conn *c, bool set)
{
	struct bm_server_meta_request m;
	struct srv_export *e;
	bool base, dirty;

	/* SET replaces the selection even when it fails. */
	if (set)
		bm_srv_meta_reset(c);
	if (!c->structured) {
		opt_error(c, NBD_REP_ERR_INVALID, "structured replies were "
			  "not negotiated");
		return;
	}
	if (bm_server_parse_meta_request(c->opt_data, c->opt_len, NULL,
					 &m) < 0) {
		opt_error(c, NBD_REP_ERR_INVALID, "malformed request");
		return;
	}
	if (!bm_srv_find_export(c->server, m.name, m.name_len, &e)) {
		opt_error(c, NBD_REP_ERR_UNKNOWN, "no such export");
		return;
	}
	/* Again, now that the export's own context is known (the data was
	 * checked: it parses the same). */
	if (e && e->dirty_ctx)
		bm_server_parse_meta_request(c->opt_data, c->opt_len,
					     e->dirty_ctx, &m);
	if (set) {
		base = m.base_allocation;
		dirty = m.extra;
	} else {
		base = !m.queries || m.base_allocation || m.base_namespace;
		dirty = !m.queries || m.extra || m.extra_listed;
	}
	dirty = dirty && e && e->dirty_ctx;
	if (set && dirty && !(c->dirty_sel = strdup(e->dirty_ctx))) {
		c->oom = true;
		return;
	}
	c->base_allocation = set && base;
	c->dirty_bitmap = set && dirty;
	if (base)
		meta_reply(c, set ? BASE_ALLOCATION_ID : 0, BASE_ALLOCATION);
	if (dirty)
		meta_reply(c, set ? DIRTY_BITMAP_ID : 0, e->dirty_ctx);
	opt_ack(c);
}

/* At GO or EXPORT_NAME: a dirty bitmap selected for another export is
 * one this export does not have. */
void
bm_srv_meta_check(struct srv_conn *c)
{
	const struct srv_export *e = c->export;

	if (c->dirty_bitmap && !(e && e->dirty_ctx && c->dirty_sel &&
				 strcmp(e->dirty_ctx, c->dirty_sel) == 0))
		c->dirty_bitmap = false;
}

static void
opt_export_name(struct srv_conn *c)
{
	struct blockmirror_server *s = c->server;
	size_t len = c->no_zeroes ? 10 : 134;
	struct srv_export *e;
	uint8_t *p;

	if (!bm_srv_find_export(s, c->opt_data, c->opt_len, &e)) {
		/* No way to say no to EXPORT_NAME but hanging up. */
		bm_debug("nbd server %s: unknown export: disconnecting",
			 s->address);
		bm_srv_conn_kill(c);
		return;
	}
	p = bm_srv_msg_alloc(c, len);
	if (!p)
		return;
	memset(p, 0, len);
	bm_put_be64(p, bm_srv_export_size(s, e));
	bm_put_be16(p + 8, bm_server_tx_flags(bm_srv_export_readonly(s, e),
					      c->structured));
	c->export = e;
	if (e)
		e->nconns++;
	bm_srv_meta_check(c);
	bm_srv_start_transmission(c);
}

/* One NBD_REP_SERVER: the name, and a description if there is one. */
static void
list_one(struct srv_conn *c, const char *name, const char *desc)
{
	size_t len = strlen(name), dlen = desc ? strlen(desc) : 0;
	uint8_t *p = opt_reply(c, NBD_REP_SERVER, 4 + (uint32_t)(len + dlen));

	if (p) {
		bm_put_be32(p, (uint32_t)len);
		memcpy(p + 4, name, len);
		if (dlen)
			memcpy(p + 4 + len, desc, dlen);
	}
}

/* LIST: the disk's export, then every snapshot's.  Names are at most
 * MAX_NAME bytes and the server holds few exports, so the replies stay
 * far below what next_option bounds. */
static void
opt_list(struct srv_conn *c)
{
	struct blockmirror_server *s = c->server;

	list_one(c, s->export_name, s->description);
	for (struct srv_export *e = s->exports; e; e = e->next)
		list_one(c, e->name, NULL);
	opt_ack(c);
}

static void
option_resume(struct srv_conn *c)
{
	if (!c->closing)
		bm_srv_read_option(c);
}

/*
 * Read the next option; but while more than MAX_OPT_QUEUED of replies
 * wait to be sent (a client that sends options and reads no answers),
 * only once they are out, so such a client cannot make us queue without
 * bound.
 */
static void
next_option(struct srv_conn *c)
{
	if (c->out.bytes + c->wire.bytes > MAX_OPT_QUEUED)
		c->drained = option_resume;
	else
		bm_srv_read_option(c);
}

/* The option in c->opt with its c->opt_len bytes of c->opt_data. */
static void
process_option(struct srv_conn *c)
{
	struct blockmirror_server *s = c->server;
	bool next = true;

	if (s->psk && !c->tls_ready && c->opt != NBD_OPT_STARTTLS &&
	    c->opt != NBD_OPT_ABORT) {
		if (c->opt == NBD_OPT_EXPORT_NAME) {
			bm_srv_conn_kill(c);
			next = false;
		} else {
			opt_error(c, NBD_REP_ERR_TLS_REQD, "TLS is required");
		}
		goto out;
	}
	switch (c->opt) {
	case NBD_OPT_EXPORT_NAME:
		opt_export_name(c);
		next = false;
		break;
	case NBD_OPT_ABORT:
		opt_ack(c);
		c->closing = true;
		next = false;
		break;
	case NBD_OPT_LIST:
		if (c->opt_len) {
			opt_error(c, NBD_REP_ERR_INVALID, "LIST takes no data");
		} else {
			opt_list(c);
		}
		break;
	case NBD_OPT_STARTTLS:
		if (!s->psk) {
			opt_error(c, NBD_REP_ERR_UNSUP, "TLS is not enabled");
		} else if (c->tls) {
			opt_error(c, NBD_REP_ERR_INVALID, "TLS is already "
				  "active");
		} else if (c->opt_len) {
			opt_error(c, NBD_REP_ERR_INVALID, "STARTTLS takes no "
				  "data");
		} else {
			opt_ack(c);
			/* Whatever was negotiated in clear is forgotten. */
			c->structured = false;
			bm_srv_meta_reset(c);
			c->drained = bm_srv_tls_start;
			next = false;
		}
		break;
	case NBD_OPT_INFO:
	case NBD_OPT_GO:
		opt_info(c, c->opt == NBD_OPT_GO);
		next = !c->transmission;
		break;
	case NBD_OPT_STRUCTURED_REPLY:
		if (c->opt_len) {
			opt_error(c, NBD_REP_ERR_INVALID, "STRUCTURED_REPLY "
				  "takes no data");
		} else {
			c->structured = true;
			opt_ack(c);
		}
		break;
	case NBD_OPT_LIST_META_CONTEXT:
	case NBD_OPT_SET_META_CONTEXT:
		opt_meta(c, c->opt == NBD_OPT_SET_META_CONTEXT);
		break;
	default:
		opt_error(c, NBD_REP_ERR_UNSUP, "unsupported option");
		break;
	}
out:
	free(c->opt_data);
	c->opt_data = NULL;
	if (c->oom)
		bm_srv_conn_kill(c);
	else if (next && !c->dead && !c->closing)
		next_option(c);
}

static void
option_too_big_dropped(struct srv_conn *c)
{
	opt_error(c, NBD_REP_ERR_TOO_BIG, "option data too large");
	if (c->oom)
		bm_srv_conn_kill(c);
	else
		next_option(c);
}

static void
got_option(struct srv_conn *c)
{
	const struct blockmirror_server *s = c->server;

	if (bm_get_be64(c->opt_hdr) != NBD_IHAVEOPT) {
		bm_debug("nbd server %s: bad option magic: disconnecting",
			 s->address);
		bm_srv_conn_kill(c);
		return;
	}
	c->opt = bm_get_be32(c->opt_hdr + 8);
	c->opt_len = bm_get_be32(c->opt_hdr + 12);
	if (c->opt_len > BM_SERVER_MAX_OPTION) {
		if (c->opt_len > BM_SERVER_MAX_OPTION_DROP ||
		    c->opt == NBD_OPT_EXPORT_NAME) {
			bm_debug("nbd server %s: option of %" PRIu32 " bytes:"
				 " disconnecting", s->address, c->opt_len);
			bm_srv_conn_kill(c);
		} else {
			bm_srv_conn_drop(c, c->opt_len, option_too_big_dropped);
		}
		return;
	}
	if (!c->opt_len) {
		process_option(c);
		return;
	}
	c->opt_data = malloc(c->opt_len);
	if (!c->opt_data) {
		bm_srv_conn_kill(c);
		return;
	}
	bm_srv_conn_read(c, c->opt_data, c->opt_len, process_option);
}

void
bm_srv_read_option(struct srv_conn *c)
{
	bm_srv_conn_read(c, c->opt_hdr, sizeof c->opt_hdr, got_option);
}

void
bm_srv_got_client_flags(struct srv_conn *c)
{
	uint32_t flags = bm_get_be32(c->flags_buf);

	/* Fixed newstyle only; any bit we did not offer ends it. */
	if (!(flags & NBD_FLAG_C_FIXED_NEWSTYLE) ||
	    (flags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES))) {
		bm_debug("nbd server %s: client flags 0x%" PRIx32 ": "
			 "disconnecting", c->server->address, flags);
		bm_srv_conn_kill(c);
		return;
	}
	c->no_zeroes = flags & NBD_FLAG_C_NO_ZEROES;
	bm_srv_read_option(c);
}

