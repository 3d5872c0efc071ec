/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The crash recorder (recorder.h).
 *
 * The recording is a sequence of events (a global counter under a mutex);
 * writes, name operations and inodes refer to it by sequence number.
 * A write keeps `submit` (issued), `done` (completed) and `durable` (the
 * first event from which a crash keeps it for sure), all set while
 * recording, so that a crash point k is pure arithmetic on them.
 *
 * Replaying goes forward in k: each inode keeps a base image with every
 * write durable before k applied, and a stamp per 4 KiB block naming the
 * newest write (by completion) applied there, so that a durable write
 * applied late never overwrites a newer one, and a chosen pending write
 * only lands where no newer durable write already is.
 */

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <libgen.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "durable.h"
#include "fault.h"
#include "internal.h"
#include "store.h"

#include "recorder.h"

#define BLK 4096u
#define NEVER UINT64_MAX

enum ent_type { ENT_FILE, ENT_DIR, ENT_LINK };

struct ent {
	char *path;
	enum ent_type type;
	int ino;        /* ENT_FILE */
	char *target;   /* ENT_LINK */
};

struct ns {
	struct ent *v;
	size_t len, cap;
};

struct inode {
	uint64_t size;      /* initial or created size */
	uint64_t cap;       /* bytes the buffers hold */
	uint8_t *base;      /* durable content at the current k */
	uint64_t base_size;
	uint64_t *stamp;    /* per block: completion seq of the write there */
	uint8_t *work;
	uint64_t work_size;
	uint8_t *initial;   /* scanned content, or NULL (zeroes) */
};

struct wr {
	int ino;
	uint64_t off, len;
	uint8_t *data;      /* NULL: zeroes (write-zeroes, discard) */
	bool fua;
	int err;
	uint64_t submit, done, durable;
	bool applied;       /* in the base */
};

enum name_kind { N_CREATE, N_SYMLINK, N_RENAME, N_UNLINK, N_MKDIR, N_RMDIR };

struct name_op {
	enum name_kind kind;
	char *path, *path2; /* rename: from, to; symlink: link, target */
	char *dir;          /* the directory whose fsync makes it durable */
	int ino;            /* create */
	uint64_t seq, durable;
};

struct event {
	char what[96];
	bool flush_point;
};

static struct recording {
	pthread_mutex_t lock;
	char root[PATH_MAX];
	size_t root_len;
	bool on;
	uint64_t seq;
	struct event *ev;
	size_t ev_cap;
	struct ns initial, live;
	struct inode *ino;
	size_t nino, ino_cap;
	struct wr *w;
	size_t nw, w_cap;
	struct name_op *n;
	size_t nn, n_cap;
	uint64_t bytes, flushes, fua_dropped;
	uint64_t last_k;
	/* replay scratch */
	size_t *pend;
	size_t pend_cap;
} R = { .lock = PTHREAD_MUTEX_INITIALIZER };

static void *
grow(void *p, size_t *cap, size_t need, size_t elem)
{
	if (need <= *cap)
		return p;
	size_t n = *cap ? *cap : 64;

	while (n < need)
		n *= 2;
	p = realloc(p, n * elem);
	if (!p)
		abort(); /* a test: out of memory is fatal */
	memset((char *)p + *cap * elem, 0, (n - *cap) * elem);
	*cap = n;
	return p;
}

uint64_t
rec_rand(uint64_t *s)
{
	uint64_t z = (*s += 0x9e3779b97f4a7c15ull);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

/* ---- events (under the lock) ------------------------------------------ */

static uint64_t __attribute__((format(printf, 2, 0)))
event_locked(bool flush_point, const char *fmt, va_list ap)
{
	uint64_t seq = R.seq++;

	R.ev = grow(R.ev, &R.ev_cap, R.seq, sizeof *R.ev);
	vsnprintf(R.ev[seq].what, sizeof R.ev[seq].what, fmt, ap);
	R.ev[seq].flush_point = flush_point;
	return seq;
}

static uint64_t __attribute__((format(printf, 2, 3)))
ev_locked(bool flush_point, const char *fmt, ...)
{
	va_list ap;
	uint64_t seq;

	va_start(ap, fmt);
	seq = event_locked(flush_point, fmt, ap);
	va_end(ap);
	return seq;
}

uint64_t
rec_event(const char *fmt, ...)
{
	va_list ap;
	uint64_t seq;

	pthread_mutex_lock(&R.lock);
	va_start(ap, fmt);
	seq = event_locked(false, fmt, ap);
	va_end(ap);
	pthread_mutex_unlock(&R.lock);
	return seq;
}

uint64_t
rec_now(void)
{
	uint64_t s;

	pthread_mutex_lock(&R.lock);
	s = R.seq;
	pthread_mutex_unlock(&R.lock);
	return s;
}

bool
rec_is_flush_point(uint64_t seq)
{
	return seq < R.seq && R.ev[seq].flush_point;
}

const char *
rec_describe(uint64_t seq)
{
	return seq < R.seq ? R.ev[seq].what : "the end";
}

void
rec_stats(uint64_t *writes, uint64_t *flushes, uint64_t *names,
	  uint64_t *bytes, uint64_t *fua_dropped)
{
	*fua_dropped = R.fua_dropped;
	*writes = R.nw;
	*flushes = R.flushes;
	*names = R.nn;
	*bytes = R.bytes;
}

/* ---- the namespace ----------------------------------------------------- */

static struct ent *
ns_find(struct ns *ns, const char *path)
{
	for (size_t i = 0; i < ns->len; i++)
		if (strcmp(ns->v[i].path, path) == 0)
			return &ns->v[i];
	return NULL;
}

static void
ns_remove(struct ns *ns, const char *path)
{
	struct ent *e = ns_find(ns, path);

	if (!e)
		return;
	free(e->path);
	free(e->target);
	*e = ns->v[--ns->len];
}

static void
ns_put(struct ns *ns, const char *path, enum ent_type type, int ino,
       const char *target)
{
	struct ent *e;

	ns_remove(ns, path);
	ns->v = grow(ns->v, &ns->cap, ns->len + 1, sizeof *ns->v);
	e = &ns->v[ns->len++];
	e->path = strdup(path);
	e->type = type;
	e->ino = ino;
	e->target = target ? strdup(target) : NULL;
}

static void
ns_copy(struct ns *to, const struct ns *from)
{
	while (to->len)
		ns_remove(to, to->v[to->len - 1].path);
	for (size_t i = 0; i < from->len; i++)
		ns_put(to, from->v[i].path, from->v[i].type, from->v[i].ino,
		       from->v[i].target);
}

static void
ns_clear(struct ns *ns)
{
	ns_copy(ns, &(struct ns){ 0 });
	free(ns->v);
	memset(ns, 0, sizeof *ns);
}

static void
dir_of(const char *path, char *buf)
{
	char tmp[PATH_MAX];

	snprintf(tmp, sizeof tmp, "%s", path);
	snprintf(buf, PATH_MAX, "%s", dirname(tmp));
}

/* Does the parent directory of `path` exist in ns (or is it the root)? */
static bool
ns_parent_ok(struct ns *ns, const char *path)
{
	char d[PATH_MAX];
	struct ent *e;

	dir_of(path, d);
	if (strcmp(d, R.root) == 0)
		return true;
	e = ns_find(ns, d);
	return e && e->type == ENT_DIR;
}

/* Apply a name operation to a namespace. */
static void
ns_apply(struct ns *ns, const struct name_op *op)
{
	struct ent *e;

	if (!ns_parent_ok(ns, op->path))
		return;
	switch (op->kind) {
	case N_CREATE:
		ns_put(ns, op->path, ENT_FILE, op->ino, NULL);
		break;
	case N_SYMLINK:
		ns_put(ns, op->path, ENT_LINK, -1, op->path2);
		break;
	case N_MKDIR:
		if (!ns_find(ns, op->path))
			ns_put(ns, op->path, ENT_DIR, -1, NULL);
		break;
	case N_RENAME:
		e = ns_find(ns, op->path);
		if (e && ns_parent_ok(ns, op->path2)) {
			struct ent c = { .type = e->type, .ino = e->ino };
			char *target = e->target ? strdup(e->target) : NULL;

			ns_remove(ns, op->path);
			ns_put(ns, op->path2, c.type, c.ino, target);
			free(target);
		}
		break;
	case N_UNLINK:
	case N_RMDIR:
		ns_remove(ns, op->path);
		break;
	}
}

/* The inode `path` names in ns, following symlinks; -1 if none. */
static int
ns_resolve(struct ns *ns, const char *path)
{
	char cur[PATH_MAX], d[PATH_MAX];

	snprintf(cur, sizeof cur, "%s", path);
	for (int depth = 0; depth < 8; depth++) {
		struct ent *e = ns_find(ns, cur);

		if (!e)
			return -1;
		if (e->type == ENT_FILE)
			return e->ino;
		if (e->type != ENT_LINK)
			return -1;
		if (e->target[0] == '/') {
			snprintf(cur, sizeof cur, "%s", e->target);
		} else {
			dir_of(cur, d);
			if (snprintf(cur, sizeof cur, "%s/%s", d, e->target) >=
			    (int)sizeof cur)
				return -1;
		}
	}
	return -1;
}

static bool
under_root(const char *path)
{
	return strncmp(path, R.root, R.root_len) == 0 &&
	       path[R.root_len] == '/';
}

/* ---- inodes and writes (under the lock) ------------------------------- */

static int
new_inode(uint64_t size)
{
	R.ino = grow(R.ino, &R.ino_cap, R.nino + 1, sizeof *R.ino);
	R.ino[R.nino].size = size;
	return (int)R.nino++;
}

static uint64_t
name_op_locked(enum name_kind kind, const char *path, const char *path2,
	       int ino)
{
	struct name_op *op;
	char d[PATH_MAX];
	static const char *names[] = { "create", "symlink", "rename",
				       "unlink", "mkdir", "rmdir" };

	R.n = grow(R.n, &R.n_cap, R.nn + 1, sizeof *R.n);
	op = &R.n[R.nn++];
	op->kind = kind;
	op->path = strdup(path);
	op->path2 = path2 ? strdup(path2) : NULL;
	/* A rename is durable with the directory of its new name. */
	dir_of(kind == N_RENAME && path2 ? path2 : path, d);
	op->dir = strdup(d);
	op->ino = ino;
	op->durable = NEVER;
	op->seq = ev_locked(true, "%s %s%s%s", names[kind],
			    path + R.root_len, path2 ? " -> " : "",
			    path2 ? (under_root(path2) ? path2 + R.root_len
						       : path2) : "");
	ns_apply(&R.live, op);
	return op->seq;
}

/* The inode for `path`, creating it (a create event) if it is new. */
static int
inode_for_locked(const char *path, uint64_t size)
{
	int ino = ns_resolve(&R.live, path);

	if (ino >= 0)
		return ino;
	ino = new_inode(size);
	name_op_locked(N_CREATE, path, NULL, ino);
	return ino;
}

static size_t
write_locked(int ino, uint64_t off, uint64_t len, const void *data,
	     bool fua, const char *kind)
{
	struct wr *w;

	R.w = grow(R.w, &R.w_cap, R.nw + 1, sizeof *R.w);
	w = &R.w[R.nw];
	w->ino = ino;
	w->off = off;
	w->len = len;
	w->fua = fua;
	w->done = w->durable = NEVER;
	if (data) {
		w->data = malloc(len ? len : 1);
		if (!w->data)
			abort();
		memcpy(w->data, data, len);
		R.bytes += len;
	}
	w->submit = ev_locked(false, "submit %s #%zu ino %d [%llu, +%llu)%s",
			      kind, R.nw, ino, (unsigned long long)off,
			      (unsigned long long)len, fua ? " FUA" : "");
	return R.nw++;
}

static void
write_done_locked(size_t i, int err)
{
	struct wr *w = &R.w[i];

	w->err = err;
	w->done = ev_locked(false, "done write #%zu ino %d%s (%d)", i, w->ino,
			    w->fua ? " FUA" : "", err);
	if (err == 0 && w->fua)
		w->durable = w->done;
}

/* What a flush issued now covers: completed writes not yet durable. */
static size_t *
flush_cover_locked(int ino, size_t *n)
{
	size_t *v = NULL, cap = 0;

	*n = 0;
	for (size_t i = 0; i < R.nw; i++) {
		struct wr *w = &R.w[i];

		if (w->ino == ino && w->done != NEVER && w->err == 0 &&
		    w->durable == NEVER) {
			v = grow(v, &cap, *n + 1, sizeof *v);
			v[(*n)++] = i;
		}
	}
	return v;
}

static void
flush_done_locked(size_t *cover, size_t n, uint64_t seq)
{
	for (size_t i = 0; i < n; i++)
		if (R.w[cover[i]].durable == NEVER)
			R.w[cover[i]].durable = seq;
}

/* ---- the recording store ---------------------------------------------- */

struct rec_store {
	struct bm_store s;
	struct bm_store *inner;
	int ino;
	bool file;          /* inner is a file store: its fdatasyncs count */
};

/*
 * A FUA request is only as durable as the store makes it.  For a file
 * store, lib/file.c counts the fdatasyncs it issues; a FUA write or zero
 * that completes without one was not made durable, whatever its flag
 * said.  Weak: a library without the counter is trusted.
 */
uint64_t bm_file_datasyncs(struct bm_store *s) __attribute__((weak));

enum rkind { K_READ, K_WRITE, K_ZERO, K_DISCARD, K_FLUSH, K_EXTENTS };

struct rec_req {
	struct rec_store *rs;
	struct bm_io *outer;
	struct bm_io inner;
	enum rkind kind;
	size_t widx;
	size_t *cover, ncover;
	uint64_t syncs;     /* the inner store's fdatasyncs at submission */
	bool fua;
};

static void
req_done(struct bm_io *io, int err)
{
	struct rec_req *q = io->opaque;
	struct bm_io *outer = q->outer;

	if (q->kind == K_WRITE || q->kind == K_ZERO || q->kind == K_DISCARD) {
		bool honoured = true;

		if (q->rs->file && bm_file_datasyncs &&
		    q->fua && err == 0)
			honoured = bm_file_datasyncs(q->rs->inner) != q->syncs;
		pthread_mutex_lock(&R.lock);
		if (!honoured) {
			R.w[q->widx].fua = false;
			R.fua_dropped++;
			ev_locked(false, "FUA of write #%zu not honoured: no "
				  "fdatasync", q->widx);
		}
		write_done_locked(q->widx, err);
		pthread_mutex_unlock(&R.lock);
	} else if (q->kind == K_FLUSH) {
		pthread_mutex_lock(&R.lock);
		uint64_t seq = ev_locked(err == 0, "done flush ino %d (%d), "
					 "%zu writes durable", q->rs->ino,
					 err, err ? 0 : q->ncover);

		if (err == 0)
			flush_done_locked(q->cover, q->ncover, seq);
		R.flushes++;
		pthread_mutex_unlock(&R.lock);
		free(q->cover);
	}
	free(q);
	outer->done(outer, err);
}

static void
submit(struct bm_store *s, struct bm_io *io, enum rkind kind)
{
	struct rec_store *rs = bm_container_of(s, struct rec_store, s);
	struct bm_store *in = rs->inner;
	struct rec_req *q = calloc(1, sizeof *q);

	if (!q)
		abort();
	io->store = s;
	q->rs = rs;
	q->outer = io;
	q->kind = kind;
	q->fua = (io->flags & BM_IO_FUA) != 0;
	if (kind == K_WRITE || kind == K_ZERO || kind == K_DISCARD) {
		pthread_mutex_lock(&R.lock);
		q->widx = write_locked(rs->ino, io->offset, io->length,
				       kind == K_WRITE ? io->buf : NULL,
				       (io->flags & BM_IO_FUA) != 0,
				       kind == K_WRITE ? "write"
				       : kind == K_ZERO ? "zero" : "discard");
		pthread_mutex_unlock(&R.lock);
	} else if (kind == K_FLUSH) {
		pthread_mutex_lock(&R.lock);
		q->cover = flush_cover_locked(rs->ino, &q->ncover);
		ev_locked(false, "submit flush ino %d covering %zu", rs->ino,
			  q->ncover);
		pthread_mutex_unlock(&R.lock);
	}
	if (rs->file && bm_file_datasyncs)
		q->syncs = bm_file_datasyncs(in);
	in->loop = s->loop; /* follows the outer store's loop */
	in->growable = s->growable;
	q->inner = *io;
	q->inner.done = req_done;
	q->inner.opaque = q;
	switch (kind) {
	case K_READ:
		in->ops->read(in, &q->inner);
		break;
	case K_WRITE:
		in->ops->write(in, &q->inner);
		break;
	case K_ZERO:
		in->ops->zero(in, &q->inner);
		break;
	case K_DISCARD:
		in->ops->discard(in, &q->inner);
		break;
	case K_FLUSH:
		in->ops->flush(in, &q->inner);
		break;
	case K_EXTENTS:
		in->ops->extents(in, &q->inner);
		break;
	}
}

static void rs_read(struct bm_store *s, struct bm_io *io) { submit(s, io, K_READ); }
static void rs_write(struct bm_store *s, struct bm_io *io) { submit(s, io, K_WRITE); }
static void rs_zero(struct bm_store *s, struct bm_io *io) { submit(s, io, K_ZERO); }
static void rs_discard(struct bm_store *s, struct bm_io *io) { submit(s, io, K_DISCARD); }
static void rs_flush(struct bm_store *s, struct bm_io *io) { submit(s, io, K_FLUSH); }
static void rs_extents(struct bm_store *s, struct bm_io *io) { submit(s, io, K_EXTENTS); }

static void
rs_cancel(struct bm_store *s)
{
	struct rec_store *rs = bm_container_of(s, struct rec_store, s);

	if (rs->inner->ops->cancel) {
		rs->inner->loop = s->loop;
		rs->inner->ops->cancel(rs->inner);
	}
}

static int
rs_truncate(struct bm_store *s, uint64_t size)
{
	struct rec_store *rs = bm_container_of(s, struct rec_store, s);
	int r = -ENOTSUP;

	if (rs->inner->ops->truncate)
		r = rs->inner->ops->truncate(rs->inner, size);
	if (r == 0)
		s->size = size;
	return r;
}

static void
rs_close(struct bm_store *s)
{
	struct rec_store *rs = bm_container_of(s, struct rec_store, s);

	rs->inner->loop = s->loop;
	bm_store_close(rs->inner);
	free(s->name);
	free(rs);
}

static const struct bm_store_ops rec_ops = {
	.name = "recorder",
	.read = rs_read,
	.write = rs_write,
	.zero = rs_zero,
	.discard = rs_discard,
	.flush = rs_flush,
	.extents = rs_extents,
	.cancel = rs_cancel,
	.truncate = rs_truncate,
	.close = rs_close,
};

static int
wrap_hook(const char *name, struct bm_store **store)
{
	struct rec_store *rs;
	char abs[PATH_MAX];

	if (name[0] == '/')
		snprintf(abs, sizeof abs, "%s", name);
	else if (getcwd(abs, sizeof abs))
		snprintf(abs + strlen(abs), sizeof abs - strlen(abs), "/%s",
			 name);
	pthread_mutex_lock(&R.lock);
	if (!R.on || !under_root(abs)) {
		pthread_mutex_unlock(&R.lock);
		return 0;
	}
	rs = calloc(1, sizeof *rs);
	if (!rs)
		abort();
	rs->s = **store;
	rs->s.name = strdup((*store)->name);
	rs->s.ops = &rec_ops;
	rs->inner = *store;
	rs->file = strcmp((*store)->ops->name, "file") == 0;
	rs->ino = inode_for_locked(abs, (*store)->size);
	ev_locked(false, "open %s as ino %d", abs + R.root_len, rs->ino);
	pthread_mutex_unlock(&R.lock);
	*store = &rs->s;
	return 0;
}

/* ---- the durable hook -------------------------------------------------- */

static int
durable_hook(const struct bm_durable_event *ev)
{
	int ino;

	if (!ev->done || ev->result != 0)
		return 0;
	pthread_mutex_lock(&R.lock);
	if (!R.on || (!under_root(ev->path) && strcmp(ev->path, R.root))) {
		pthread_mutex_unlock(&R.lock);
		return 0;
	}
	switch (ev->step) {
	case BM_DURABLE_WRITE: {
		size_t i;

		ino = inode_for_locked(ev->path, 0);
		i = write_locked(ino, 0, ev->len, ev->buf, false, "file write");
		write_done_locked(i, 0);
		break;
	}
	case BM_DURABLE_FSYNC: {
		size_t n, *cover;

		ino = inode_for_locked(ev->path, 0);
		cover = flush_cover_locked(ino, &n);
		flush_done_locked(cover, n,
				  ev_locked(true, "fsync %s: %zu writes durable",
					    ev->path + R.root_len, n));
		free(cover);
		R.flushes++;
		break;
	}
	case BM_DURABLE_SYMLINK:
		name_op_locked(N_SYMLINK, ev->path, ev->path2, -1);
		break;
	case BM_DURABLE_RENAME:
		name_op_locked(N_RENAME, ev->path, ev->path2, -1);
		break;
	case BM_DURABLE_UNLINK:
		name_op_locked(N_UNLINK, ev->path, NULL, -1);
		break;
	case BM_DURABLE_MKDIR:
		name_op_locked(N_MKDIR, ev->path, NULL, -1);
		break;
	case BM_DURABLE_RMDIR:
		name_op_locked(N_RMDIR, ev->path, NULL, -1);
		break;
	case BM_DURABLE_FSYNC_DIR: {
		uint64_t seq = ev_locked(true, "fsync dir %s",
					 strcmp(ev->path, R.root) == 0
					 ? "(root)" : ev->path + R.root_len);
		unsigned n = 0;

		for (size_t i = 0; i < R.nn; i++)
			if (R.n[i].durable == NEVER &&
			    strcmp(R.n[i].dir, ev->path) == 0) {
				R.n[i].durable = seq;
				n++;
			}
		snprintf(R.ev[seq].what + strlen(R.ev[seq].what),
			 sizeof R.ev[seq].what - strlen(R.ev[seq].what),
			 ": %u names durable", n);
		break;
	}
	}
	pthread_mutex_unlock(&R.lock);
	return 0;
}

/* ---- start, stop ------------------------------------------------------- */

static int
scan(const char *dir)
{
	DIR *d = opendir(dir);
	struct dirent *de;
	int r = 0;

	if (!d)
		return -errno;
	while (r == 0 && (de = readdir(d))) {
		char p[PATH_MAX], t[PATH_MAX];
		struct stat st;

		if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
			continue;
		snprintf(p, sizeof p, "%s/%s", dir, de->d_name);
		if (lstat(p, &st) < 0) {
			r = -errno;
			break;
		}
		if (S_ISDIR(st.st_mode)) {
			ns_put(&R.initial, p, ENT_DIR, -1, NULL);
			r = scan(p);
		} else if (S_ISLNK(st.st_mode)) {
			ssize_t n = readlink(p, t, sizeof t - 1);

			if (n < 0) {
				r = -errno;
				break;
			}
			t[n] = '\0';
			ns_put(&R.initial, p, ENT_LINK, -1, t);
		} else if (S_ISREG(st.st_mode)) {
			int ino = new_inode((uint64_t)st.st_size);
			int fd = open(p, O_RDONLY);

			R.ino[ino].initial = malloc(st.st_size ? st.st_size : 1);
			if (fd < 0 || !R.ino[ino].initial ||
			    pread(fd, R.ino[ino].initial, st.st_size, 0) !=
			    st.st_size)
				r = -EIO;
			if (fd >= 0)
				close(fd);
			ns_put(&R.initial, p, ENT_FILE, ino, NULL);
		}
	}
	closedir(d);
	return r;
}

int
rec_start(const char *root)
{
	int r;

	rec_free();
	snprintf(R.root, sizeof R.root, "%s", root);
	R.root_len = strlen(R.root);
	r = scan(root);
	if (r < 0)
		return r;
	ns_copy(&R.live, &R.initial);
	R.on = true;
	bm_store_wrap_hook = wrap_hook;
	bm_durable_hook = durable_hook;
	return 0;
}

void
rec_stop(void)
{
	pthread_mutex_lock(&R.lock);
	R.on = false;
	bm_store_wrap_hook = NULL;
	bm_durable_hook = NULL;
	pthread_mutex_unlock(&R.lock);
}

void
rec_free(void)
{
	rec_stop();
	for (size_t i = 0; i < R.nino; i++) {
		free(R.ino[i].base);
		free(R.ino[i].stamp);
		free(R.ino[i].work);
		free(R.ino[i].initial);
	}
	for (size_t i = 0; i < R.nw; i++)
		free(R.w[i].data);
	for (size_t i = 0; i < R.nn; i++) {
		free(R.n[i].path);
		free(R.n[i].path2);
		free(R.n[i].dir);
	}
	free(R.ino);
	free(R.w);
	free(R.n);
	free(R.ev);
	free(R.pend);
	ns_clear(&R.initial);
	ns_clear(&R.live);
	R.ino = NULL;
	R.w = NULL;
	R.n = NULL;
	R.ev = NULL;
	R.pend = NULL;
	R.nino = R.ino_cap = R.nw = R.w_cap = R.nn = R.n_cap = 0;
	R.ev_cap = R.pend_cap = 0;
	R.seq = R.bytes = R.flushes = R.fua_dropped = R.last_k = 0;
}

/* ---- replay ------------------------------------------------------------ */

static void
inode_setup(struct inode *in, int idx)
{
	uint64_t cap = in->size;

	for (size_t i = 0; i < R.nw; i++)
		if (R.w[i].ino == idx)
			cap = BM_MAX(cap, R.w[i].off + R.w[i].len);
	cap = (cap + BLK - 1) / BLK * BLK;
	if (!cap)
		cap = BLK;
	in->cap = cap;
	in->base = calloc(1, cap);
	in->work = malloc(cap);
	in->stamp = calloc(cap / BLK, sizeof *in->stamp);
	if (!in->base || !in->work || !in->stamp)
		abort();
	if (in->initial)
		memcpy(in->base, in->initial, in->size);
	in->base_size = in->size;
}

void
rec_rewind(void)
{
	for (size_t i = 0; i < R.nino; i++) {
		free(R.ino[i].base);
		free(R.ino[i].work);
		free(R.ino[i].stamp);
		R.ino[i].base = R.ino[i].work = NULL;
		R.ino[i].stamp = NULL;
	}
	for (size_t i = 0; i < R.nw; i++)
		R.w[i].applied = false;
	R.last_k = 0;
}

/* The order in which a write reached the media: its completion, or after
 * everything completed when it was still in flight at the crash. */
static uint64_t
media_order(const struct wr *w, uint64_t k)
{
	return w->done < k ? w->done : (NEVER / 2) + w->submit;
}

/* Apply the blocks of w (those `keep` says) where nothing newer is. */
static void
apply(uint8_t *buf, const uint64_t *stamp, uint64_t *set_stamp,
      const struct wr *w, uint64_t order, const uint8_t *keep,
      uint64_t *size)
{
	uint64_t end = w->off + w->len;

	for (uint64_t b = w->off / BLK; b * BLK < end; b++) {
		uint64_t s = BM_MAX(w->off, b * BLK);
		uint64_t e = BM_MIN(end, (b + 1) * BLK);

		if (keep && !keep[b - w->off / BLK])
			continue;
		if (stamp[b] > order)
			continue;
		if (w->data)
			memcpy(buf + s, w->data + (s - w->off), e - s);
		else
			memset(buf + s, 0, e - s);
		if (set_stamp)
			set_stamp[b] = order;
		if (e > *size)
			*size = e;
	}
}

/* The inode's working copy for this crash point. */
static struct inode *
work_of(int ino)
{
	struct inode *in = &R.ino[ino];

	if (in->work_size == UINT64_MAX) {
		memcpy(in->work, in->base, in->cap);
		in->work_size = in->base_size;
	}
	return in;
}

static int
cmp_order(const void *a, const void *b, void *k)
{
	uint64_t oa = media_order(&R.w[*(const size_t *)a], *(uint64_t *)k);
	uint64_t ob = media_order(&R.w[*(const size_t *)b], *(uint64_t *)k);

	return oa < ob ? -1 : oa > ob;
}

static struct ns *wipe_keep;

/* Remove what the next state does not have in the same form. */
static int
wipe_one(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
	struct ent *e;

	(void)flag;
	if (ftw->level == 0)
		return 0;
	e = ns_find(wipe_keep, p);
	if (e && ((e->type == ENT_DIR && S_ISDIR(sb->st_mode)) ||
		  (e->type == ENT_FILE && S_ISREG(sb->st_mode))))
		return 0;
	return remove(p) < 0 ? -1 : 0;
}

/*
 * Make the file at `path` hold `size` bytes of buf.  A file already there
 * (the previous crash point's, maybe changed by its recovery) is compared
 * through a mapping and only the blocks that differ are written: the next
 * crash point is usually a few writes away.
 */
static int
write_file(const char *path, const uint8_t *buf, uint64_t size)
{
	static const uint8_t zero[BLK];
	uint8_t *old = MAP_FAILED;
	struct stat st;
	int fd, r = 0;

	fd = open(path, O_RDWR | O_CREAT, 0644);
	if (fd < 0 || fstat(fd, &st) < 0) {
		r = -errno;
		goto out;
	}
	if ((uint64_t)st.st_size != size) {
		/* Start from zeroes: a hole costs nothing. */
		if (ftruncate(fd, 0) < 0 || ftruncate(fd, (off_t)size) < 0) {
			r = -errno;
			goto out;
		}
	} else if (size) {
		old = mmap(NULL, size, PROT_READ, MAP_SHARED, fd, 0);
		if (old == MAP_FAILED) {
			r = -errno;
			goto out;
		}
	}
	for (uint64_t off = 0; r == 0 && off < size; off += BLK) {
		uint64_t n = BM_MIN(BLK, size - off);

		if (memcmp(buf + off, old != MAP_FAILED ? old + off : zero,
			   n) == 0)
			continue;
		if (pwrite(fd, buf + off, n, (off_t)off) != (ssize_t)n)
			r = -EIO;
	}
out:
	if (old != MAP_FAILED)
		munmap(old, size);
	if (fd >= 0)
		close(fd);
	return r;
}

static int
cmp_depth(const void *a, const void *b)
{
	const struct ent *x = a, *y = b;
	size_t dx = 0, dy = 0;

	for (const char *p = x->path; *p; p++)
		dx += *p == '/';
	for (const char *p = y->path; *p; p++)
		dy += *p == '/';
	return dx < dy ? -1 : dx > dy;
}

int
rec_materialize(uint64_t k, enum rec_variant variant, uint64_t *rng)
{
	struct ns ns = { 0 };
	size_t np = 0;
	int r = 0;

	if (k < R.last_k)
		rec_rewind();
	R.last_k = k;
	for (size_t i = 0; i < R.nino; i++)
		if (!R.ino[i].base)
			inode_setup(&R.ino[i], (int)i);

	/* The base: every write durable before k. */
	for (size_t i = 0; i < R.nw; i++) {
		struct wr *w = &R.w[i];

		if (w->applied || w->durable >= k)
			continue;
		w->applied = true;
		apply(R.ino[w->ino].base, R.ino[w->ino].stamp,
		      R.ino[w->ino].stamp, w, w->done, NULL,
		      &R.ino[w->ino].base_size);
	}
	/* Pending writes land on a copy of the base (taken at first use). */
	for (size_t i = 0; i < R.nino; i++)
		R.ino[i].work_size = UINT64_MAX;

	/* The writes issued but not durable: some of them, in media order. */
	for (size_t i = 0; i < R.nw; i++) {
		struct wr *w = &R.w[i];
		bool take;

		if (w->durable < k || w->submit >= k)
			continue;
		take = variant == REC_ALL ||
		       (variant == REC_RANDOM && rec_rand(rng) % 2);
		if (!take)
			continue;
		R.pend = grow(R.pend, &R.pend_cap, np + 1, sizeof *R.pend);
		R.pend[np++] = i;
	}
	if (np)
		qsort_r(R.pend, np, sizeof *R.pend, cmp_order, &k);
	for (size_t j = 0; j < np; j++) {
		struct wr *w = &R.w[R.pend[j]];
		struct inode *in = work_of(w->ino);
		uint8_t *keep = NULL;
		uint64_t nb = (w->off + w->len + BLK - 1) / BLK - w->off / BLK;

		if (variant == REC_RANDOM && rec_rand(rng) % 4 == 0) {
			/* Torn: some of its blocks. */
			keep = malloc(nb);
			for (uint64_t b = 0; b < nb; b++)
				keep[b] = rec_rand(rng) % 2;
		}
		apply(in->work, in->stamp, NULL, w, media_order(w, k), keep,
		      &in->work_size);
		free(keep);
	}

	/* The names: durable ones, and per directory a prefix of the rest. */
	ns_copy(&ns, &R.initial);
	{
		char **dirs = NULL;
		uint64_t *keep_n = NULL;
		size_t nd = 0, dcap = 0, kcap = 0;

		for (size_t i = 0; i < R.nn && R.n[i].seq < k; i++) {
			struct name_op *op = &R.n[i];
			size_t d;

			if (op->durable < k)
				continue;
			for (d = 0; d < nd; d++)
				if (strcmp(dirs[d], op->dir) == 0)
					break;
			if (d == nd) {
				dirs = grow(dirs, &dcap, nd + 1, sizeof *dirs);
				keep_n = grow(keep_n, &kcap, nd + 1,
					      sizeof *keep_n);
				dirs[nd] = op->dir;
				keep_n[nd] = 0;
				nd++;
			}
			keep_n[d]++;
		}
		/* keep_n: how many not-durable ones each directory has; draw
		 * how many of them survive. */
		for (size_t d = 0; d < nd; d++)
			keep_n[d] = variant == REC_ALL ? keep_n[d]
				  : variant == REC_DURABLE_ONLY ? 0
				  : rec_rand(rng) % (keep_n[d] + 1);
		for (size_t i = 0; i < R.nn && R.n[i].seq < k; i++) {
			struct name_op *op = &R.n[i];
			size_t d;

			if (op->durable >= k) {
				for (d = 0; d < nd; d++)
					if (strcmp(dirs[d], op->dir) == 0)
						break;
				if (keep_n[d] == 0)
					continue;
				keep_n[d]--;
			}
			ns_apply(&ns, op);
		}
		free(dirs);
		free(keep_n);
	}

	/* Out onto the file system, parents first. */
	wipe_keep = &ns;
	if (nftw(R.root, wipe_one, 16, FTW_DEPTH | FTW_PHYS) < 0)
		r = -errno;
	if (ns.len)
		qsort(ns.v, ns.len, sizeof *ns.v, cmp_depth);
	for (size_t i = 0; r == 0 && i < ns.len; i++) {
		struct ent *e = &ns.v[i];

		if (!ns_parent_ok(&ns, e->path))
			continue;
		switch (e->type) {
		case ENT_DIR:
			if (mkdir(e->path, 0700) < 0 && errno != EEXIST)
				r = -errno;
			break;
		case ENT_LINK:
			if (symlink(e->target, e->path) < 0)
				r = -errno;
			break;
		case ENT_FILE: {
			struct inode *in = work_of(e->ino);

			r = write_file(e->path, in->work,
				       BM_MAX(in->work_size, in->size));
			break;
		}
		}
	}
	ns_clear(&ns);
	return r;
}
