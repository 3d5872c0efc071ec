/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The fault store (fault.h).  Each request gets a small wrapper that
 * carries the caller's bm_io, its own bm_io for the inner store, and a
 * timer for delays and for polling a hang; the caller's io completes when
 * the inner one does, or with the injected error.  Cancelling (the
 * store's cancel op) completes held requests with -ECANCELED.
 */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "errors.h"
#include "fault.h"
#include "internal.h"

#define HANG_POLL_NS (10 * 1000000ull)

struct fault_entry {
	char *name;
	struct bm_fault_rules *rules;
	struct fault_entry *next;
};

static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static struct fault_entry *registry;

int
bm_fault_register(const char *name, struct bm_fault_rules *rules)
{
	struct fault_entry *e = calloc(1, sizeof *e);

	if (!e || !(e->name = strdup(name))) {
		free(e);
		return -ENOMEM;
	}
	e->rules = rules;
	pthread_mutex_lock(&registry_lock);
	e->next = registry;
	registry = e;
	pthread_mutex_unlock(&registry_lock);
	return 0;
}

void
bm_fault_unregister(const char *name)
{
	pthread_mutex_lock(&registry_lock);
	for (struct fault_entry **pp = &registry; *pp; pp = &(*pp)->next) {
		if (strcmp((*pp)->name, name) == 0) {
			struct fault_entry *e = *pp;

			*pp = e->next;
			free(e->name);
			free(e);
			break;
		}
	}
	pthread_mutex_unlock(&registry_lock);
}

struct fault_store {
	struct bm_store s;
	struct bm_store *inner;
	struct bm_fault_rules *rules;
	struct fault_req *held; /* hanging requests, for cancel */
	bool cancelled;         /* after cancel, nothing goes through */
};

enum fault_kind { F_READ, F_WRITE, F_ZERO, F_DISCARD, F_FLUSH, F_EXTENTS };

struct fault_req {
	struct fault_store *f;
	struct bm_io *outer;
	struct bm_io inner;
	struct bm_timer timer;
	enum fault_kind kind;
	struct fault_req *next_held;
	bool in_held;
};

static void
held_remove(struct fault_req *q)
{
	if (!q->in_held)
		return;
	for (struct fault_req **pp = &q->f->held; *pp; pp = &(*pp)->next_held)
		if (*pp == q) {
			*pp = q->next_held;
			break;
		}
	q->in_held = false;
}

static void
finish(struct fault_req *q, int err)
{
	struct bm_io *outer = q->outer;

	held_remove(q);
	free(q);
	outer->done(outer, err);
}

static void
inner_done(struct bm_io *io, int err)
{
	finish(io->opaque, err);
}

static bool
is_write(enum fault_kind k)
{
	return k == F_WRITE || k == F_ZERO || k == F_DISCARD;
}

/* Decide whether this request fails; 0 if it goes through. */
static int
injected_error(struct fault_req *q)
{
	struct bm_fault_rules *r = q->f->rules;
	struct bm_io *io = q->outer;

	if (q->kind == F_READ && r->read_errno) {
		uint64_t o = r->read_err_offset, l = r->read_err_length;

		if (r->read_err_count != 0 && io->offset < o + l &&
		    o < io->offset + io->length) {
			if (r->read_err_count > 0)
				r->read_err_count--;
			r->failures++;
			return -r->read_errno;
		}
	}
	if (q->kind == F_FLUSH && r->flush_errno && r->flush_err_count != 0) {
		if (r->flush_err_count > 0)
			r->flush_err_count--;
		r->failures++;
		return -r->flush_errno;
	}
	if (q->kind == F_EXTENTS && r->extents_errno &&
	    r->extents_err_count != 0) {
		if (r->extents_err_count > 0)
			r->extents_err_count--;
		r->failures++;
		return -r->extents_errno;
	}
	if ((is_write(q->kind) || (q->kind == F_FLUSH && r->fail_flush)) &&
	    r->write_errno && r->write_err_count != 0) {
		if (r->writes >= r->write_err_after) {
			if (r->write_err_count > 0)
				r->write_err_count--;
			r->failures++;
			return -r->write_errno;
		}
	}
	return 0;
}

static void
forward(struct fault_req *q)
{
	struct bm_store *in = q->f->inner;
	int err = injected_error(q);

	if (err) {
		bm_error(err, "%s: injected %s error", q->f->s.name,
			 q->kind == F_READ ? "read" : q->kind == F_FLUSH ?
			 "flush" : q->kind == F_EXTENTS ? "block status" :
			 "write");
		finish(q, err);
		return;
	}
	if (q->kind == F_READ)
		q->f->rules->reads++;
	else if (is_write(q->kind))
		q->f->rules->writes++;
	else if (q->kind == F_FLUSH)
		q->f->rules->flushes++;
	in->loop = q->f->s.loop; /* follows the outer store's loop */
	in->growable = q->f->s.growable;
	q->inner = *q->outer;
	q->inner.done = inner_done;
	q->inner.opaque = q;
	switch (q->kind) {
	case F_READ:
		in->ops->read(in, &q->inner);
		break;
	case F_WRITE:
		in->ops->write(in, &q->inner);
		break;
	case F_ZERO:
		in->ops->zero(in, &q->inner);
		break;
	case F_DISCARD:
		in->ops->discard(in, &q->inner);
		break;
	case F_FLUSH:
		in->ops->flush(in, &q->inner);
		break;
	case F_EXTENTS:
		in->ops->extents(in, &q->inner);
		break;
	}
}

/* Take one of the flushes allowed through a hang_flush, if any is left. */
static bool
pass_flush(struct bm_fault_rules *r)
{
	int n = atomic_load(&r->pass_flushes);

	while (n > 0)
		if (atomic_compare_exchange_weak(&r->pass_flushes, &n, n - 1))
			return true;
	return false;
}

static void
timer_done(struct bm_op *op, int res)
{
	struct fault_req *q = bm_container_of(op, struct fault_req, timer.op);

	q->timer.armed = false;
	if ((res == -ECANCELED && !q->in_held) || q->f->cancelled) {
		held_remove(q);
		finish(q, -ECANCELED);
		return;
	}
	if (q->f->rules->hang ||
	    (q->kind == F_FLUSH && q->f->rules->hang_flush &&
	     (q->in_held || !pass_flush(q->f->rules)))) {
		if (!q->in_held) {
			q->next_held = q->f->held;
			q->f->held = q;
			q->in_held = true;
		}
		bm_loop_timer_start(q->f->s.loop, &q->timer, HANG_POLL_NS,
				    timer_done);
		return;
	}
	held_remove(q);
	forward(q);
}

static void
alloc_failed(struct bm_op *op, int res)
{
	struct bm_io *io = bm_container_of(op, struct bm_io, op);

	io->done(io, res);
}

static void
submit(struct bm_store *s, struct bm_io *io, enum fault_kind kind)
{
	struct fault_store *f = bm_container_of(s, struct fault_store, s);
	struct fault_req *q = calloc(1, sizeof *q);
	uint64_t delay;

	io->store = s;
	if (!q) {
		bm_loop_defer(s->loop, &io->op, alloc_failed, -ENOMEM);
		return;
	}
	q->f = f;
	q->outer = io;
	q->kind = kind;
	f->rules->submitted++;
	delay = kind == F_READ ? f->rules->read_delay_ns
	      : is_write(kind) ? f->rules->write_delay_ns : 0;
	if (is_write(kind) && f->rules->next_write_delay_ns)
		delay += atomic_exchange(&f->rules->next_write_delay_ns, 0);
	if (kind == F_READ && f->rules->next_read_delay_ns)
		delay += atomic_exchange(&f->rules->next_read_delay_ns, 0);
	/* Always through a timer, so completions are never inline. */
	bm_loop_timer_start(s->loop, &q->timer, delay ? delay : 1,
			    timer_done);
}

static void fault_read(struct bm_store *s, struct bm_io *io) { submit(s, io, F_READ); }
static void fault_write(struct bm_store *s, struct bm_io *io) { submit(s, io, F_WRITE); }
static void fault_zero(struct bm_store *s, struct bm_io *io) { submit(s, io, F_ZERO); }
static void fault_discard(struct bm_store *s, struct bm_io *io) { submit(s, io, F_DISCARD); }
static void fault_flush(struct bm_store *s, struct bm_io *io) { submit(s, io, F_FLUSH); }
static void fault_extents(struct bm_store *s, struct bm_io *io) { submit(s, io, F_EXTENTS); }

static void
fault_cancel(struct bm_store *s)
{
	struct fault_store *f = bm_container_of(s, struct fault_store, s);

	/* Held requests finish when their poll timer fires: make it fire
	 * now, with -ECANCELED.  Requests still waiting for their first
	 * timer see `cancelled` when it fires. */
	f->cancelled = true;
	for (struct fault_req *q = f->held; q; q = q->next_held) {
		q->in_held = false;
		bm_loop_timer_cancel(s->loop, &q->timer);
	}
	f->held = NULL;
}

static int
fault_truncate(struct bm_store *s, uint64_t size)
{
	struct fault_store *f = bm_container_of(s, struct fault_store, s);
	int r = -ENOTSUP;

	if (f->inner->ops->truncate)
		r = f->inner->ops->truncate(f->inner, size);
	if (r == 0)
		s->size = size;
	return r;
}

static void
fault_close(struct bm_store *s)
{
	struct fault_store *f = bm_container_of(s, struct fault_store, s);

	f->inner->loop = s->loop;
	bm_store_close(f->inner);
	free(s->name);
	free(f);
}

static const struct bm_store_ops fault_ops = {
	.name = "fault",
	.read = fault_read,
	.write = fault_write,
	.zero = fault_zero,
	.discard = fault_discard,
	.flush = fault_flush,
	.extents = fault_extents,
	.cancel = fault_cancel,
	.truncate = fault_truncate,
	.close = fault_close,
};

int
bm_fault_maybe_wrap(const char *name, struct bm_store **store)
{
	struct bm_fault_rules *rules = NULL;
	struct fault_store *f;

	pthread_mutex_lock(&registry_lock);
	for (struct fault_entry *e = registry; e; e = e->next)
		if (strcmp(e->name, name) == 0)
			rules = e->rules;
	pthread_mutex_unlock(&registry_lock);
	if (!rules)
		return 0;
	f = calloc(1, sizeof *f);
	if (!f)
		return bm_error(-ENOMEM, "out of memory");
	f->s = **store;
	f->s.name = strdup((*store)->name);
	if (!f->s.name) {
		free(f);
		return bm_error(-ENOMEM, "out of memory");
	}
	f->s.ops = &fault_ops;
	f->inner = *store;
	f->rules = rules;
	*store = &f->s;
	return 0;
}

int (*bm_store_wrap_hook)(const char *name, struct bm_store **store);

int
bm_store_wrap(const char *name, struct bm_store **store)
{
	int r = 0;

	if (bm_store_wrap_hook)
		r = bm_store_wrap_hook(name, store);
	return r < 0 ? r : bm_fault_maybe_wrap(name, store);
}
