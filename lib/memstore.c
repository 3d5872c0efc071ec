/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The memory store (memstore.h): a sparse file kept as a sorted array of
 * 4 KiB pages, found by binary search; a page never written reads as
 * zeroes.  Images under test are mostly holes (VHDX regions are 1 MiB
 * apart, qcow2 tables past the end read as zeroes), so a few pages hold
 * a file of any size.
 *
 * Each request is done at once and completes through bm_loop_defer, so
 * io->done never runs inside the call that started it (store.h).
 *
 * A fuzz target opens thousands of stores a second, each writing a few
 * pages: the pages of closed stores wait in a small pool for the next
 * store, which spares the allocator (and, under AddressSanitizer, whose
 * quarantine hands out fresh memory, a page fault per page).
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "errors.h"
#include "extent.h"
#include "internal.h"
#include "memstore.h"

#define PAGE_SHIFT 12
#define PAGE_SIZE (UINT64_C(1) << PAGE_SHIFT)

struct mem_page {
	uint64_t index;
	uint8_t *data;
};

struct mem_store {
	struct bm_store s;
	struct mem_page *pages;     /* sorted by index */
	size_t npages, cap;
	uint64_t max_size, max_pages;
};

static const struct bm_store_ops mem_ops;

/* Pages freed by any store, kept for reuse: at most POOL_PAGES. */
#define POOL_PAGES 4096
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static uint8_t *pool[POOL_PAGES];
static size_t pool_n;

/* A page of zeroes, or NULL. */
static uint8_t *
page_alloc(void)
{
	uint8_t *p = NULL;

	pthread_mutex_lock(&pool_lock);
	if (pool_n)
		p = pool[--pool_n];
	pthread_mutex_unlock(&pool_lock);
	if (!p)
		return calloc(1, PAGE_SIZE);
	memset(p, 0, PAGE_SIZE);
	return p;
}

static void
page_free(uint8_t *p)
{
	pthread_mutex_lock(&pool_lock);
	if (pool_n < POOL_PAGES) {
		pool[pool_n++] = p;
		p = NULL;
	}
	pthread_mutex_unlock(&pool_lock);
	free(p);
}

static struct mem_store *
to_mem(struct bm_store *s)
{
	return bm_container_of(s, struct mem_store, s);
}

/* Index in m->pages of page `index`, or where it would go. */
static size_t
page_find(const struct mem_store *m, uint64_t index)
{
	size_t lo = 0, hi = m->npages;

	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;

		if (m->pages[mid].index < index)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo;
}

static uint8_t *
page_get(const struct mem_store *m, uint64_t index)
{
	size_t i = page_find(m, index);

	return i < m->npages && m->pages[i].index == index ? m->pages[i].data :
							      NULL;
}

static int
page_add(struct mem_store *m, uint64_t index, uint8_t **out)
{
	size_t i = page_find(m, index);

	if (i < m->npages && m->pages[i].index == index) {
		*out = m->pages[i].data;
		return 0;
	}
	if (m->npages >= m->max_pages)
		return bm_error(-ENOSPC, "%s: memory store full (%zu pages)",
				m->s.name, m->npages);
	if (m->npages == m->cap) {
		size_t cap = m->cap ? 2 * m->cap : 16;
		struct mem_page *p = realloc(m->pages, cap * sizeof *p);

		if (!p)
			return bm_error(-ENOMEM, "%s: out of memory", m->s.name);
		m->pages = p;
		m->cap = cap;
	}
	*out = page_alloc();
	if (!*out)
		return bm_error(-ENOMEM, "%s: out of memory", m->s.name);
	memmove(m->pages + i + 1, m->pages + i,
		(m->npages - i) * sizeof *m->pages);
	m->pages[i].index = index;
	m->pages[i].data = *out;
	m->npages++;
	return 0;
}

/* Forget everything from byte `size` on: a file that shrinks and grows
 * again reads as zeroes there. */
static void
pages_cut(struct mem_store *m, uint64_t size)
{
	uint64_t index = size >> PAGE_SHIFT;
	size_t i = page_find(m, index);

	if (size % PAGE_SIZE && i < m->npages && m->pages[i].index == index) {
		memset(m->pages[i].data + size % PAGE_SIZE, 0,
		       PAGE_SIZE - size % PAGE_SIZE);
		i++;
	}
	for (size_t j = i; j < m->npages; j++)
		page_free(m->pages[j].data);
	m->npages = i;
}

/* Copy in (buf) or zero (buf NULL) [off, off + len).  0 or -errno. */
static int
mem_put(struct mem_store *m, const uint8_t *buf, uint64_t len, uint64_t off)
{
	uint64_t end;

	if (bm_add_overflow(off, len, &end) || end > m->max_size)
		return bm_error(-ENOSPC, "%s: write at %" PRIu64 "+%" PRIu64
				" past the memory store's limit", m->s.name,
				off, len);
	while (len > 0) {
		uint64_t in = off % PAGE_SIZE, n = BM_MIN(len, PAGE_SIZE - in);
		uint8_t *p = page_get(m, off >> PAGE_SHIFT);
		int r;

		if (buf) {
			if (!p && (r = page_add(m, off >> PAGE_SHIFT, &p)) < 0)
				return r;
			memcpy(p + in, buf, n);
			buf += n;
		} else if (p) {
			memset(p + in, 0, n);
		}
		off += n;
		len -= n;
	}
	if (end > m->s.size)
		m->s.size = end;
	return 0;
}

static void
mem_get(const struct mem_store *m, uint8_t *buf, uint64_t len, uint64_t off)
{
	while (len > 0) {
		uint64_t in = off % PAGE_SIZE, n = BM_MIN(len, PAGE_SIZE - in);
		const uint8_t *p = off < m->s.size ?
					   page_get(m, off >> PAGE_SHIFT) : NULL;

		if (p)
			memcpy(buf, p + in, n);
		else if (!bm_is_zero(buf, n))
			/* Fresh large buffers are zero already: reading them
			 * is much cheaper than dirtying their pages. */
			memset(buf, 0, n);
		buf += n;
		off += n;
		len -= n;
	}
}

static void
mem_done(struct bm_op *op, int res)
{
	struct bm_io *io = bm_container_of(op, struct bm_io, op);

	io->done(io, res);
}

static void
complete(struct bm_store *s, struct bm_io *io, int err)
{
	bm_loop_defer(s->loop, &io->op, mem_done, err);
}

static int
check(struct bm_store *s, struct bm_io *io, bool write)
{
	io->store = s;
	if (!bm_range_ok(io->offset, io->length, INT64_MAX))
		return bm_error(-EINVAL, "%s: request at %" PRIu64 "+%" PRIu64
				" out of range", s->name, io->offset,
				io->length);
	if (write && s->readonly)
		return bm_error(-EROFS, "%s: read-only", s->name);
	return 0;
}

static void
mem_read(struct bm_store *s, struct bm_io *io)
{
	int r = check(s, io, false);

	if (r == 0)
		mem_get(to_mem(s), io->buf, io->length, io->offset);
	complete(s, io, r);
}

static void
mem_write(struct bm_store *s, struct bm_io *io)
{
	int r = check(s, io, true);

	if (r == 0)
		r = mem_put(to_mem(s), io->buf, io->length, io->offset);
	complete(s, io, r);
}

static void
mem_zero(struct bm_store *s, struct bm_io *io)
{
	int r = check(s, io, true);

	if (r == 0)
		r = mem_put(to_mem(s), NULL, io->length, io->offset);
	complete(s, io, r);
}

static void
mem_flush(struct bm_store *s, struct bm_io *io)
{
	complete(s, io, 0);
}

static void
mem_extents(struct bm_store *s, struct bm_io *io)
{
	struct mem_store *m = to_mem(s);
	uint64_t off = io->offset, end;
	int r = check(s, io, false);

	end = io->offset + io->length;
	while (r == 0 && off < end) {
		uint64_t n = BM_MIN(end - off, PAGE_SIZE - off % PAGE_SIZE);
		bool data = off < s->size && page_get(m, off >> PAGE_SHIFT);

		r = bm_extent_list_append(io->extents, off, n, data ? 0 :
					  BM_EXTENT_HOLE | BM_EXTENT_ZERO);
		off += n;
	}
	complete(s, io, r);
}

static int
mem_truncate(struct bm_store *s, uint64_t size)
{
	struct mem_store *m = to_mem(s);

	if (size > m->max_size)
		return bm_error(-ENOSPC, "%s: cannot grow to %" PRIu64
				" bytes: past the memory store's limit",
				s->name, size);
	pages_cut(m, size);
	s->size = size;
	return 0;
}

static void
mem_close(struct bm_store *s)
{
	struct mem_store *m = to_mem(s);

	for (size_t i = 0; i < m->npages; i++)
		page_free(m->pages[i].data);
	free(m->pages);
	free(s->name);
	free(m);
}

static const struct bm_store_ops mem_ops = {
	.name = "memory",
	.read = mem_read,
	.write = mem_write,
	.zero = mem_zero,
	.discard = mem_zero,
	.flush = mem_flush,
	.extents = mem_extents,
	.truncate = mem_truncate,
	.close = mem_close,
};

int
bm_mem_store_new(struct bm_loop *loop, const char *name, uint64_t size,
		 uint64_t max_size, uint64_t max_mem, struct bm_store **out)
{
	struct mem_store *m = calloc(1, sizeof *m);

	if (!m || !(m->s.name = strdup(name))) {
		free(m);
		return bm_error(-ENOMEM, "%s: out of memory", name);
	}
	m->s.ops = &mem_ops;
	m->s.loop = loop;
	m->s.size = size;
	m->s.align = 1;
	m->s.growable = true;
	m->s.allocated = UINT64_MAX;
	m->max_size = BM_MAX(max_size, size);
	m->max_pages = max_mem / PAGE_SIZE;
	*out = &m->s;
	return 0;
}

int
bm_mem_store_fill(struct bm_store *s, const void *buf, size_t len,
		  uint64_t off)
{
	if (s->ops != &mem_ops)
		return bm_error(-EINVAL, "%s: not a memory store", s->name);
	return mem_put(to_mem(s), buf, len, off);
}
