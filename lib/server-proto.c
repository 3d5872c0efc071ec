/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The NBD server's pure protocol helpers (declared in server.h): they
 * take bytes and numbers and return decisions, with no sockets and no
 * disk, so the unit tests and fuzzers call them directly.
 */
#include "server-int.h"

/* ---- pure protocol helpers (server.h) --------------------------------- */

int
bm_server_parse_address(const char *address, struct bm_server_address *out)
{
	const char *rest, *colon;
	size_t hlen;
	unsigned long port = 0;

	memset(out, 0, sizeof *out);
	if (!address)
		return bm_error(-EINVAL, "no address");
	if (strncmp(address, "unix:", 5) == 0) {
		rest = address + 5;
		if (!*rest)
			return bm_error(-EINVAL, "%s: empty socket path",
					address);
		if (strlen(rest) >= sizeof out->path)
			return bm_error(-EINVAL, "%s: socket path longer than "
					"%zu bytes", address,
					sizeof out->path - 1);
		out->unix_socket = true;
		strcpy(out->path, rest);
		return 0;
	}
	if (strncmp(address, "tcp:", 4) != 0)
		return bm_error(-EINVAL, "%s: expected unix:PATH or "
				"tcp:HOST:PORT", address);
	rest = address + 4;
	colon = strrchr(rest, ':');
	if (!colon)
		return bm_error(-EINVAL, "%s: no port (tcp:HOST:PORT)",
				address);
	hlen = (size_t)(colon - rest);
	if (hlen >= 2 && rest[0] == '[' && rest[hlen - 1] == ']') {
		rest++;
		hlen -= 2;
	} else if (memchr(rest, ':', hlen)) {
		return bm_error(-EINVAL, "%s: write an IPv6 address in "
				"brackets, tcp:[ADDR]:PORT", address);
	}
	if (hlen >= sizeof out->host)
		return bm_error(-EINVAL, "%s: host name too long", address);
	if (colon[1] == '\0' || strlen(colon + 1) > 5)
		return bm_error(-EINVAL, "%s: bad port", address);
	for (const char *p = colon + 1; *p; p++) {
		if (*p < '0' || *p > '9')
			return bm_error(-EINVAL, "%s: bad port", address);
		port = port * 10 + (unsigned long)(*p - '0');
	}
	if (port > 65535)
		return bm_error(-EINVAL, "%s: port out of range", address);
	if (hlen)
		memcpy(out->host, rest, hlen);
	else
		strcpy(out->host, "127.0.0.1");
	snprintf(out->port, sizeof out->port, "%lu", port);
	return 0;
}

int
bm_server_decode_request(const uint8_t *hdr, struct bm_server_request *req)
{
	if (bm_get_be32(hdr) != NBD_REQUEST_MAGIC)
		return -EBADMSG;
	req->flags = bm_get_be16(hdr + 4);
	req->type = bm_get_be16(hdr + 6);
	req->cookie = bm_get_be64(hdr + 8);
	req->offset = bm_get_be64(hdr + 16);
	req->length = bm_get_be32(hdr + 24);
	return 0;
}

uint32_t
bm_server_check_request(const struct bm_server_export_state *e,
			const struct bm_server_request *req)
{
	/* FUA may come with any command once SEND_FUA is advertised. */
	uint16_t allowed = BM_NBD_CMD_FLAG_FUA;
	bool writes = false;

	switch (req->type) {
	case BM_NBD_CMD_DISC:
		return 0;
	case BM_NBD_CMD_READ:
		if (e->structured)
			allowed |= BM_NBD_CMD_FLAG_DF;
		break;
	case BM_NBD_CMD_WRITE:
	case BM_NBD_CMD_TRIM:
		writes = true;
		break;
	case BM_NBD_CMD_WRITE_ZEROES:
		allowed |= BM_NBD_CMD_FLAG_NO_HOLE | BM_NBD_CMD_FLAG_FAST_ZERO;
		writes = true;
		break;
	case BM_NBD_CMD_BLOCK_STATUS:
		allowed |= BM_NBD_CMD_FLAG_REQ_ONE;
		break;
	case BM_NBD_CMD_FLUSH:
	case BM_NBD_CMD_CACHE:
		break;
	default:
		return BM_NBD_EINVAL;
	}
	if (req->flags & ~allowed)
		return BM_NBD_EINVAL;
	if (req->type == BM_NBD_CMD_FLUSH)
		return req->offset || req->length ? BM_NBD_EINVAL : 0;
	if (req->length == 0)
		return BM_NBD_EINVAL;
	if ((req->type == BM_NBD_CMD_READ || req->type == BM_NBD_CMD_WRITE) &&
	    req->length > BM_SERVER_MAX_PAYLOAD)
		return BM_NBD_EINVAL;
	if (writes && e->readonly)
		return BM_NBD_EPERM;
	if (!bm_range_ok(req->offset, req->length, e->size))
		return req->type == BM_NBD_CMD_WRITE ||
		       req->type == BM_NBD_CMD_WRITE_ZEROES ?
		       BM_NBD_ENOSPC : BM_NBD_EINVAL;
	if (req->type == BM_NBD_CMD_BLOCK_STATUS && !e->base_allocation &&
	    !e->dirty_bitmap)
		return BM_NBD_EINVAL;
	/* Zeroing is no faster than writing as far as we can promise. */
	if (req->type == BM_NBD_CMD_WRITE_ZEROES &&
	    (req->flags & BM_NBD_CMD_FLAG_FAST_ZERO))
		return BM_NBD_ENOTSUP;
	return 0;
}

uint32_t
bm_server_nbd_error(int err)
{
	switch (err < 0 ? -err : err) {
	case 0:
		return 0;
	case EPERM:
	case EROFS:
	case EACCES:
		return BM_NBD_EPERM;
	case ENOMEM:
		return BM_NBD_ENOMEM;
	case EINVAL:
		return BM_NBD_EINVAL;
	case ENOSPC:
	case EDQUOT:
	case EFBIG:
		return BM_NBD_ENOSPC;
	case EOVERFLOW:
		return BM_NBD_EOVERFLOW;
	case ENOTSUP:
		return BM_NBD_ENOTSUP;
	case ESHUTDOWN:
		return BM_NBD_ESHUTDOWN;
	default:
		return BM_NBD_EIO;
	}
}

uint16_t
bm_server_tx_flags(bool readonly, bool structured)
{
	/* Every connection shares the disk, and a flush of the disk covers
	 * every write it has completed: multi-conn is safe. */
	uint16_t f = BM_NBD_FLAG_HAS_FLAGS | BM_NBD_FLAG_SEND_FLUSH |
		     BM_NBD_FLAG_SEND_CACHE | BM_NBD_FLAG_CAN_MULTI_CONN;

	if (readonly)
		f |= BM_NBD_FLAG_READ_ONLY;
	else
		f |= BM_NBD_FLAG_SEND_FUA | BM_NBD_FLAG_SEND_TRIM |
		     BM_NBD_FLAG_SEND_WRITE_ZEROES |
		     BM_NBD_FLAG_SEND_FAST_ZERO;
	if (structured)
		f |= BM_NBD_FLAG_SEND_DF;
	return f;
}

int
bm_server_parse_info_request(const uint8_t *data, uint32_t len,
			     struct bm_server_info_request *out)
{
	uint32_t nlen;

	memset(out, 0, sizeof *out);
	if (len < 6)
		return -EINVAL;
	nlen = bm_get_be32(data);
	if (nlen > len - 6)
		return -EINVAL;
	out->name = data + 4;
	out->name_len = nlen;
	out->ninfos = bm_get_be16(data + 4 + nlen);
	if ((uint64_t)len != 6 + (uint64_t)nlen + 2 * (uint64_t)out->ninfos)
		return -EINVAL;
	out->infos = data + 6 + nlen;
	return 0;
}

/* Is the query q (qlen bytes) `extra` itself (2), or a namespace
 * prefix of it that lists it (1), or neither (0)? */
static int
meta_match(const uint8_t *q, uint32_t qlen, const char *extra)
{
	size_t elen;

	if (!extra)
		return 0;
	elen = strlen(extra);
	if (qlen == elen && !memcmp(q, extra, qlen))
		return 2;
	if (qlen && qlen < elen && q[qlen - 1] == ':' &&
	    !memcmp(q, extra, qlen))
		return 1;
	return 0;
}

int
bm_server_parse_meta_request(const uint8_t *data, uint32_t len,
			     const char *extra,
			     struct bm_server_meta_request *out)
{
	static const char ba[] = BASE_ALLOCATION;
	uint32_t nlen, pos;

	memset(out, 0, sizeof *out);
	if (len < 8)
		return -EINVAL;
	nlen = bm_get_be32(data);
	if (nlen > len - 8)
		return -EINVAL;
	out->name = data + 4;
	out->name_len = nlen;
	pos = 4 + nlen;
	out->queries = bm_get_be32(data + pos);
	pos += 4;
	for (uint32_t i = 0; i < out->queries; i++) {
		uint32_t qlen;

		if (len - pos < 4)
			return -EINVAL;
		qlen = bm_get_be32(data + pos);
		pos += 4;
		if (qlen > len - pos)
			return -EINVAL;
		if (qlen == sizeof ba - 1 && !memcmp(data + pos, ba, qlen))
			out->base_allocation = true;
		if (qlen == 5 && !memcmp(data + pos, "base:", 5))
			out->base_namespace = true;
		switch (meta_match(data + pos, qlen, extra)) {
		case 2:
			out->extra = true;
			break;
		case 1:
			out->extra_listed = true;
			break;
		}
		pos += qlen;
	}
	return pos == len ? 0 : -EINVAL;
}

