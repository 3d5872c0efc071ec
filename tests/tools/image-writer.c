/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * image-writer: a format-agnostic random writer for testing image
 * drivers (qcow2, VHDX, raw) against an in-memory model.
 *
 *   image-writer --format FMT [--create SIZE] [-o OPTS] [--seed N]
 *                [--ops N] [--max-len N] [--align N] [--flush-every N]
 *                [--discard-pct N] [--init RAW] [--model FILE]
 *                [--log FILE] IMAGE
 *   image-writer --format FMT --verify-log FILE IMAGE
 *
 * The first form opens (or creates) IMAGE for writing and issues --ops
 * random requests (write 70%, zero 15%, discard 15%: --discard-pct
 * moves the discards' share to zeroes), one at a time,
 * flushing every few of them; 0 ops means run until killed.  Written
 * bytes are a function of (sequence number, offset), so a request can
 * be described by its kind, sequence number and range.  The model
 * knows what every byte must read as; discarded bytes are "unknown"
 * (a format may keep or zero them).  --init RAW says what an existing
 * image reads as before the run (otherwise only --create images are
 * known to read as zeroes).  At the end the image is flushed,
 * read back and compared with the model (unknown bytes skipped); with
 * --model the model is also written to FILE as a raw image (discarded
 * bytes as zeroes) for qemu-img compare.
 *
 * Crash mode (--log FILE): every request is appended to FILE before it
 * is issued, and a flush marker after each flush completes, and the
 * log is fsync'd there.  After the writer is killed (SIGKILL at any
 * moment), --verify-log rebuilds the model: requests before the last
 * flush marker must be in the image; bytes touched by a request after
 * it may hold either state, so they are skipped.
 *
 * Exit status: 0 good, 1 mismatch or I/O error, 2 usage.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <blockmirror/blockmirror.h>

#include "errors.h"
#include "image.h"
#include "loop.h"

struct model {
	uint64_t size;
	uint8_t *data;
	uint8_t *known;        /* 1: data[] is what the image must hold */
};

enum op_kind { OP_WRITE = 'W', OP_ZERO = 'Z', OP_DISCARD = 'D' };

static struct bm_loop *loop;
static struct bm_image *img;

static void __attribute__((format(printf, 1, 2), noreturn))
die(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	fprintf(stderr, "image-writer: ");
	vfprintf(stderr, fmt, ap);
	fprintf(stderr, "\n");
	va_end(ap);
	exit(1);
}

static uint64_t
rng_next(uint64_t *s)
{
	/* splitmix64 */
	uint64_t z = (*s += UINT64_C(0x9e3779b97f4a7c15));

	z = (z ^ (z >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
	z = (z ^ (z >> 27)) * UINT64_C(0x94d049bb133111eb);
	return z ^ (z >> 31);
}

static uint8_t
pattern(uint64_t seq, uint64_t off)
{
	uint64_t x = seq * UINT64_C(0x100000001b3) ^ (off >> 3);

	x ^= x >> 29;
	x *= UINT64_C(0xbf58476d1ce4e5b9);
	return (uint8_t)((x >> 32) + (off & 7) * 37);
}

static void
fill(uint8_t *buf, uint64_t seq, uint64_t off, uint64_t len)
{
	for (uint64_t i = 0; i < len; i++)
		buf[i] = pattern(seq, off + i);
}

static void
model_apply(struct model *m, int kind, uint64_t seq, uint64_t off,
	    uint64_t len, bool certain)
{
	if (off > m->size || len > m->size - off)
		die("log entry out of range");
	if (kind == OP_WRITE)
		fill(m->data + off, seq, off, len);
	else
		memset(m->data + off, 0, len);
	memset(m->known + off, certain && kind != OP_DISCARD, len);
}

static int
do_io(void (*op)(struct bm_image *, struct bm_io *), uint64_t off,
      uint64_t len, void *buf, unsigned flags)
{
	struct bm_io io = { .offset = off, .length = len, .buf = buf,
			    .flags = flags };

	return bm_image_sync(img, op, &io);
}

static int
compare(const struct model *m)
{
	size_t chunk = 1024 * 1024;
	uint8_t *buf = malloc(chunk);
	int bad = 0;

	if (!buf)
		die("out of memory");
	for (uint64_t off = 0; off < m->size && bad < 10; off += chunk) {
		uint64_t n = m->size - off < chunk ? m->size - off : chunk;

		if (do_io(bm_image_read, off, n, buf, 0) < 0)
			die("read at %" PRIu64 ": %s", off,
			    blockmirror_last_error());
		for (uint64_t i = 0; i < n && bad < 10; i++)
			if (m->known[off + i] && buf[i] != m->data[off + i]) {
				fprintf(stderr, "image-writer: mismatch at %"
					PRIu64 ": image 0x%02x, expected "
					"0x%02x\n", off + i, buf[i],
					m->data[off + i]);
				bad++;
			}
	}
	free(buf);
	return bad ? 1 : 0;
}

static void __attribute__((format(printf, 2, 3)))
log_line(int fd, const char *fmt, ...)
{
	char line[128];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(line, sizeof line, fmt, ap);
	va_end(ap);
	if (n < 0 || write(fd, line, (size_t)n) != n)
		die("log write failed: %s", strerror(errno));
}

struct opts {
	const char *format_name;
	enum blockmirror_format format;
	uint64_t create_size;
	const char *options;
	uint64_t seed, ops, max_len, align, flush_every, discard_pct;
	const char *model_path, *log_path, *verify_path, *init_path;
};

static void
run(const struct opts *o, struct model *m)
{
	uint64_t rng = o->seed * 2 + 1, since_flush = 0;
	uint64_t units = m->size / o->align, max_units = o->max_len / o->align;
	uint8_t *buf = malloc(o->max_len);
	int log = -1;

	if (!buf)
		die("out of memory");
	if (o->log_path) {
		log = open(o->log_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
		if (log < 0)
			die("%s: %s", o->log_path, strerror(errno));
		log_line(log, "S %" PRIu64 "\n", m->size);
		fsync(log);
	}
	for (uint64_t seq = 1; o->ops == 0 || seq <= o->ops; seq++) {
		uint64_t r = rng_next(&rng) % 100;
		uint64_t n = 1 + rng_next(&rng) % (max_units ? max_units : 1);
		uint64_t off, len;
		int kind = r < 70 ? OP_WRITE :
			   r < 100 - o->discard_pct ? OP_ZERO : OP_DISCARD;
		unsigned flags = (rng_next(&rng) & 1) ? BM_IO_MAY_TRIM : 0;
		int err;

		if (n > units)
			n = units;
		off = (rng_next(&rng) % (units - n + 1)) * o->align;
		len = n * o->align;
		if (log >= 0)
			log_line(log, "%c %" PRIu64 " %" PRIu64 " %" PRIu64 "\n",
				 kind, seq, off, len);
		if (kind == OP_WRITE) {
			fill(buf, seq, off, len);
			err = do_io(bm_image_write, off, len, buf, 0);
		} else if (kind == OP_ZERO) {
			err = do_io(bm_image_zero, off, len, NULL, flags);
		} else {
			err = do_io(bm_image_discard, off, len, NULL, 0);
		}
		if (err < 0)
			die("%c at %" PRIu64 "+%" PRIu64 ": %s", kind, off, len,
			    blockmirror_last_error());
		model_apply(m, kind, seq, off, len, true);
		if (++since_flush >= o->flush_every ||
		    rng_next(&rng) % (o->flush_every * 2) == 0) {
			if (do_io(bm_image_flush, 0, 0, NULL, 0) < 0)
				die("flush: %s", blockmirror_last_error());
			since_flush = 0;
			if (log >= 0) {
				log_line(log, "F %" PRIu64 "\n", seq);
				if (fsync(log) < 0)
					die("log fsync: %s", strerror(errno));
			}
		}
	}
	if (do_io(bm_image_flush, 0, 0, NULL, 0) < 0)
		die("flush: %s", blockmirror_last_error());
	if (log >= 0)
		close(log);
	free(buf);
}

/* Rebuild the model from a crash log: see the top comment. */
static void
model_from_log(const char *path, struct model *m)
{
	FILE *fp = fopen(path, "r");
	char kind;
	uint64_t seq, off, len, size;
	long last_flush = 0, pos;

	if (!fp)
		die("%s: %s", path, strerror(errno));
	if (fscanf(fp, "S %" SCNu64 "\n", &size) != 1 || size != m->size)
		die("%s: bad log header (or size differs from the image)", path);
	pos = ftell(fp);
	/* First pass: where is the last complete flush marker? */
	while (fscanf(fp, " %c", &kind) == 1) {
		char line[128];

		if (!fgets(line, sizeof line, fp) || !strchr(line, '\n'))
			break; /* a torn last line */
		if (kind == 'F')
			last_flush = ftell(fp);
	}
	fseek(fp, pos, SEEK_SET);
	while (fscanf(fp, " %c", &kind) == 1) {
		long here;
		char line[128];

		if (!fgets(line, sizeof line, fp) || !strchr(line, '\n'))
			break;
		here = ftell(fp);
		if (kind == 'F')
			continue;
		if (sscanf(line, "%" SCNu64 " %" SCNu64 " %" SCNu64, &seq,
			   &off, &len) != 3)
			die("%s: bad line", path);
		model_apply(m, kind, seq, off, len, here <= last_flush);
	}
	fclose(fp);
}

static void
usage(void)
{
	fprintf(stderr, "usage: image-writer --format FMT [--create SIZE] "
		"[-o OPTS] [--seed N] [--ops N] [--max-len N] [--align N] "
		"[--flush-every N] [--discard-pct N] [--init RAW] [--model FILE] [--log FILE] IMAGE\n"
		"       image-writer --format FMT --verify-log FILE IMAGE\n");
	exit(2);
}

static uint64_t
num(const char *s)
{
	char *end;
	unsigned long long v = strtoull(s, &end, 0);

	if (*end == 'K' || *end == 'k')
		v <<= 10, end++;
	else if (*end == 'M' || *end == 'm')
		v <<= 20, end++;
	else if (*end == 'G' || *end == 'g')
		v <<= 30, end++;
	if (*end || end == s)
		usage();
	return v;
}

static void
parse_args(int argc, char **argv, struct opts *o)
{
	static const struct option lo[] = {
		{ "format", required_argument, NULL, 'f' },
		{ "create", required_argument, NULL, 'c' },
		{ "seed", required_argument, NULL, 's' },
		{ "ops", required_argument, NULL, 'n' },
		{ "max-len", required_argument, NULL, 'l' },
		{ "align", required_argument, NULL, 'a' },
		{ "flush-every", required_argument, NULL, 'F' },
		{ "model", required_argument, NULL, 'm' },
		{ "log", required_argument, NULL, 'L' },
		{ "verify-log", required_argument, NULL, 'V' },
		{ "discard-pct", required_argument, NULL, 'd' },
		{ "init", required_argument, NULL, 'i' },
		{ NULL, 0, NULL, 0 },
	};
	int c, fmt;

	memset(o, 0, sizeof *o);
	o->ops = 1000;
	o->max_len = 256 * 1024;
	o->align = 512;
	o->flush_every = 16;
	o->discard_pct = 15;
	while ((c = getopt_long(argc, argv, "f:o:", lo, NULL)) != -1) {
		switch (c) {
		case 'f': o->format_name = optarg; break;
		case 'c': o->create_size = num(optarg); break;
		case 'o': o->options = optarg; break;
		case 's': o->seed = num(optarg); break;
		case 'n': o->ops = num(optarg); break;
		case 'l': o->max_len = num(optarg); break;
		case 'a': o->align = num(optarg); break;
		case 'F': o->flush_every = num(optarg); break;
		case 'm': o->model_path = optarg; break;
		case 'L': o->log_path = optarg; break;
		case 'V': o->verify_path = optarg; break;
		case 'd': o->discard_pct = num(optarg); break;
		case 'i': o->init_path = optarg; break;
		default: usage();
		}
	}
	if (optind != argc - 1 || !o->format_name || !o->align ||
	    o->max_len < o->align || !o->flush_every ||
	    o->discard_pct > 30)
		usage();
	fmt = blockmirror_format_from_name(o->format_name);
	if (fmt < 0)
		usage();
	o->format = (enum blockmirror_format)fmt;
}

static void
write_model(const char *path, const struct model *m)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	uint64_t off = 0;

	if (fd < 0)
		die("%s: %s", path, strerror(errno));
	while (off < m->size) {
		ssize_t n = pwrite(fd, m->data + off, m->size - off,
				   (off_t)off);

		if (n <= 0)
			die("%s: %s", path, strerror(errno));
		off += (uint64_t)n;
	}
	close(fd);
}

static void
read_init(const char *path, struct model *m)
{
	int fd = open(path, O_RDONLY);
	uint64_t off = 0;

	if (fd < 0)
		die("%s: %s", path, strerror(errno));
	while (off < m->size) {
		ssize_t n = pread(fd, m->data + off, m->size - off, (off_t)off);

		if (n < 0)
			die("%s: %s", path, strerror(errno));
		if (n == 0)
			break; /* shorter: the rest reads as zeroes */
		off += (uint64_t)n;
	}
	close(fd);
	memset(m->known, 1, m->size);
}

int
main(int argc, char **argv)
{
	struct opts o;
	struct model m;
	const char *path;
	int err, rc;

	parse_args(argc, argv, &o);
	path = argv[optind];
	if (bm_loop_new(64, &loop) < 0)
		die("cannot create a loop");
	if (o.create_size)
		err = bm_image_create(loop, path, o.format, o.create_size,
				      o.options, true, 0, &img);
	else
		err = bm_image_open(loop, path, o.format,
				    o.verify_path ? 0 : BM_IMAGE_WRITE, &img);
	if (err < 0)
		die("%s: %s", path, blockmirror_last_error());
	m.size = img->size;
	m.data = calloc(1, m.size ? m.size : 1);
	/* Without --create and without a log nothing is known yet. */
	m.known = calloc(1, m.size ? m.size : 1);
	if (!m.data || !m.known)
		die("out of memory");
	if (o.create_size)
		memset(m.known, 1, m.size);
	if (o.init_path)
		read_init(o.init_path, &m);
	if (o.verify_path)
		model_from_log(o.verify_path, &m);
	else
		run(&o, &m);
	rc = compare(&m);
	if (o.model_path)
		write_model(o.model_path, &m);
	bm_image_close(img);
	bm_loop_free(loop);
	free(m.data);
	free(m.known);
	return rc;
}
