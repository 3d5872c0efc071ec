/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Creating a qcow2 image (the driver's create op, see qcow2.c).
 *
 * The layout is QEMU's: the header in cluster 0, then the refcount
 * table, the refcount blocks that count all of these clusters, then the
 * L1 table, sized once for the virtual size (nothing resizes it).
 * Everything but the header is written and synced first; the header,
 * written last and synced, is what makes the file a qcow2 image.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "errors.h"
#include "format.h"
#include "internal.h"
#include "qcow2.h"

static void *
alloc_buf(uint64_t len)
{
	void *p;

	if (posix_memalign(&p, 4096, len))
		return NULL;
	memset(p, 0, len);
	return p;
}

struct create_opts {
	uint64_t cluster_size;
	uint32_t refcount_order;
	char backing_file[BM_QCOW2_MAX_BACKING_NAME + 1];
	char backing_fmt[16];
};

static int
parse_create_opts(struct bm_fmt *f, const char *options,
		  struct create_opts *o)
{
	static const char *const known[] = {
		"cluster_size", "backing_file", "backing_fmt", "compat",
		"refcount_bits", NULL
	};
	const char *name = bm_fmt_name(f);
	char val[32];
	uint64_t bits = 16;
	int r;

	memset(o, 0, sizeof *o);
	o->cluster_size = 65536;
	if (!options)
		options = "";
	r = bm_fmt_options_check(f, options, known);
	if (r)
		return r;
	r = bm_fmt_option_size(f, options, "cluster_size", &o->cluster_size);
	if (r < 0)
		return r;
	if (!bm_is_power_of_2(o->cluster_size) || o->cluster_size < 512 ||
	    o->cluster_size > 2 * BM_MiB)
		return bm_error(-EINVAL, "%s: qcow2 cluster_size must be a "
				"power of two between 512 and 2M", name);
	r = bm_fmt_option(options, "compat", val, sizeof val);
	if (r > 0 && !strcmp(val, "0.10"))
		return bm_error(-ENOTSUP, "%s: creating qcow2 version 2 "
				"(compat=0.10) images is not supported", name);
	if (r < 0 || (r > 0 && strcmp(val, "1.1") && strcmp(val, "v3")))
		return bm_error(-EINVAL, "%s: invalid qcow2 compat value "
				"(use 1.1)", name);
	r = bm_fmt_option(options, "refcount_bits", val, sizeof val);
	if (r > 0) {
		char *end;

		bits = strtoull(val, &end, 10);
		if (*end || !bm_is_power_of_2(bits) || bits > 64)
			return bm_error(-EINVAL, "%s: qcow2 refcount_bits must "
					"be a power of two up to 64", name);
	}
	o->refcount_order = (uint32_t)__builtin_ctzll(bits);
	r = bm_fmt_option(options, "backing_file", o->backing_file,
			  sizeof o->backing_file);
	if (r < 0)
		return bm_error(-EINVAL, "%s: qcow2 backing file name too "
				"long", name);
	r = bm_fmt_option(options, "backing_fmt", o->backing_fmt,
			  sizeof o->backing_fmt);
	if (r < 0 || (r > 0 && strcmp(o->backing_fmt, "raw") &&
		      strcmp(o->backing_fmt, "qcow2") &&
		      strcmp(o->backing_fmt, "vhdx")))
		return bm_error(-EINVAL, "%s: invalid qcow2 backing_fmt (use "
				"raw, qcow2 or vhdx)", name);
	if (r > 0 && !o->backing_file[0])
		return bm_error(-EINVAL, "%s: backing_fmt given without "
				"backing_file", name);
	return 0;
}

static int
write_create(struct bm_fmt *f, struct bm_qcow2_header *h, uint64_t total,
	     uint64_t nrb, uint64_t rpb)
{
	uint64_t cs = UINT64_C(1) << h->cluster_bits;
	uint64_t rt_len = (uint64_t)h->refcount_table_clusters * cs;
	uint64_t rb0 = h->refcount_table_offset + rt_len;
	uint8_t *buf = alloc_buf(BM_MAX(cs, rt_len));
	int err;

	if (!buf)
		return bm_error(-ENOMEM, "%s: out of memory", bm_fmt_name(f));
	err = bm_fmt_truncate(f, total * cs);
	for (uint64_t k = 0; !err && k < nrb; k++) {
		memset(buf, 0, cs);
		for (uint64_t c = k * rpb; c < total && c < (k + 1) * rpb; c++)
			bm_qcow2_refcount_set(buf, h->refcount_order, c - k * rpb,
					      1);
		err = bm_fmt_pwrite(f, buf, cs, rb0 + k * cs);
	}
	if (!err) {
		memset(buf, 0, rt_len);
		for (uint64_t k = 0; k < nrb; k++)
			bm_put_be64(buf + k * 8, rb0 + k * cs);
		err = bm_fmt_pwrite(f, buf, rt_len, h->refcount_table_offset);
	}
	if (!err)
		err = bm_fmt_sync(f);
	if (!err && bm_qcow2_header_serialize(h, buf, cs, cs > 4096) &&
	    bm_qcow2_header_serialize(h, buf, cs, false))
		err = bm_error(-EINVAL, "%s: the qcow2 backing file name does "
			       "not fit in a %" PRIu64 "-byte cluster",
			       bm_fmt_name(f), cs);
	if (!err)
		err = bm_fmt_pwrite(f, buf, cs, 0);
	if (!err)
		err = bm_fmt_sync(f);
	free(buf);
	return err;
}

int
bm_qcow2_create(struct bm_fmt *f, uint64_t size, const char *options)
{
	struct bm_qcow2_header h;
	struct create_opts o;
	uint64_t l1n, l1c, rtc = 1, nrb = 1, total, rpb, cs;
	int err = parse_create_opts(f, options, &o);

	if (err)
		return err;
	if (size % 512)
		return bm_error(-EINVAL, "%s: qcow2 image size must be a "
				"multiple of 512 bytes", bm_fmt_name(f));
	memset(&h, 0, sizeof h);
	cs = o.cluster_size;
	h.version = 3;
	h.cluster_bits = (uint32_t)__builtin_ctzll(cs);
	h.size = size;
	h.refcount_order = o.refcount_order;
	h.header_length = 112;
	if (!bm_qcow2_l1_entries(size, h.cluster_bits, &l1n) ||
	    l1n * 8 > BM_QCOW2_MAX_L1_BYTES)
		return bm_error(-EFBIG, "%s: size %" PRIu64 " too large for "
				"qcow2 with %" PRIu64 "-byte clusters",
				bm_fmt_name(f), size, cs);
	l1c = BM_MAX((l1n * 8 + cs - 1) / cs, UINT64_C(1));
	rpb = (cs * 8) >> o.refcount_order;
	for (;;) {
		uint64_t nrb2, rtc2;

		total = 1 + rtc + nrb + l1c;
		nrb2 = (total + rpb - 1) / rpb;
		rtc2 = (nrb2 * 8 + cs - 1) / cs;
		if (nrb2 == nrb && rtc2 == rtc)
			break;
		nrb = nrb2;
		rtc = rtc2;
	}
	if (rtc * cs > BM_QCOW2_MAX_REFTABLE_BYTES)
		return bm_error(-EFBIG, "%s: size %" PRIu64 " too large for "
				"qcow2 with %" PRIu64 "-byte clusters",
				bm_fmt_name(f), size, cs);
	h.refcount_table_offset = cs;
	h.refcount_table_clusters = (uint32_t)rtc;
	h.l1_table_offset = (1 + rtc + nrb) * cs;
	h.l1_size = (uint32_t)l1n;
	h.backing_name = o.backing_file[0] ? o.backing_file : NULL;
	memcpy(h.backing_format, o.backing_fmt, sizeof h.backing_format);
	return write_create(f, &h, total, nrb, rpb);
}
