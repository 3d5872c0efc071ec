/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The local file store: a regular file or a block device, read and
 * written through the loop's io_uring ring.
 *
 * - Short reads and writes are resubmitted for the remainder (io->progress
 *   counts what is done); done sees the whole length or an error.  A read
 *   that hits end of file early (the file shrank under us) is -EIO.
 * - Zeroing tries, in order: punch a hole (if the caller allows
 *   deallocation), FALLOC_FL_ZERO_RANGE, then writing zeroes from a shared
 *   buffer.  A method that fails with EOPNOTSUPP is remembered and not
 *   tried again.  With BM_IO_FAST_ZERO the last, slow step is refused.
 * - Extents come from SEEK_DATA/SEEK_HOLE (synchronous lseek, cheap) and
 *   are delivered through bm_loop_defer like any other completion.
 * - Only regular files and block devices are opened: the type is checked
 *   before the open (a FIFO would block it) and again on the descriptor,
 *   which is opened with O_NONBLOCK for that moment.
 * - O_DIRECT (BM_OPEN_DIRECT) is a second descriptor on the same file,
 *   opened through /proc/self/fd: a read or write whose offset, length and
 *   buffer are all multiples of the page size and the device's logical
 *   block size goes through it, anything else (a qcow2 table entry, the
 *   tail of a file whose size is not a multiple) through the page cache.
 *   With BM_OPEN_DIRECT_BULK only bulk copy writes (BM_IO_WRITEBACK) may
 *   go through it: a move's destination, whose guest writes stay
 *   cached.
 *   The store so takes any request (align stays 1), and a direct request
 *   never shares a page with a cached one unless their byte ranges
 *   overlap.  The kernel keeps the two coherent: a direct write drops the
 *   cached pages of its range, a direct read writes dirty ones back first.
 * - BM_IO_ASYNC sends a read or write straight to io_uring's workers:
 *   otherwise the kernel copies cached data inline, on the loop thread,
 *   in the submit call, and a burst of bulk copies holds up every other
 *   request of the loop meanwhile.
 * - A bulk write through the page cache (BM_IO_WRITEBACK, not direct)
 *   starts its writeback; with BM_IO_EVICT it is written back and its
 *   pages dropped before it completes, so a copy keeps the cache it uses
 *   to what is in flight.
 */
#include <errno.h>
#include <linux/openat2.h>
#include <sys/syscall.h>
#include <inttypes.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "errors.h"
#include "internal.h"
#include "store.h"

#define ZERO_BUF_SIZE (1u << 20)

struct file_store {
	struct bm_store s;
	int fd;
	int dfd;         /* O_DIRECT descriptor, or -1 */
	bool bulk_only;  /* dfd only for bulk writes (BM_OPEN_DIRECT_BULK) */
	uint32_t dalign; /* what a request needs to go through dfd */
	dev_t dev;
	ino_t ino;
	bool can_punch;
	bool can_zero_range;
	void *zero_buf; /* lazily allocated, aligned */
	uint64_t datasyncs; /* fdatasyncs issued: flushes, FUA writes, zeroes */
};

static inline struct file_store *
to_file(struct bm_store *s)
{
	return bm_container_of(s, struct file_store, s);
}

static inline struct bm_io *
op_to_io(struct bm_op *op)
{
	return bm_container_of(op, struct bm_io, op);
}

static void
io_fail(struct bm_io *io, int err)
{
	io->done(io, err);
}

/* Complete with err on the next turn of the loop. */
static void deferred_done(struct bm_op *op, int res);

static void
io_defer(struct bm_store *s, struct bm_io *io, int err)
{
	bm_loop_defer(s->loop, &io->op, deferred_done, err);
}

static void
deferred_done(struct bm_op *op, int res)
{
	struct bm_io *io = op_to_io(op);

	io->done(io, res);
}

static bool
check_request(struct bm_store *s, struct bm_io *io, bool write)
{
	io->store = s;
	io->progress = 0;
	io->stage = 0;
	if (!bm_range_ok(io->offset, io->length,
			 s->growable ? (uint64_t)INT64_MAX : s->size)) {
		io_defer(s, io, bm_error(-EINVAL,
			 "%s: request at %" PRIu64 "+%" PRIu64
			 " beyond the end (%" PRIu64 ")",
			 s->name, io->offset, io->length, s->size));
		return false;
	}
	if (write && s->readonly) {
		io_defer(s, io, bm_error(-EROFS, "%s: opened read-only",
					 s->name));
		return false;
	}
	return true;
}

/* ---- read / write ---------------------------------------------------- */

static void rw_done(struct bm_op *op, int res);

static void
hints_done(struct bm_op *op, int res)
{
	struct bm_io *io = op_to_io(op);

	io->done(io, 0);
}

/* The pages of a bulk write are on disk: drop them from the cache. */
static void
written_back(struct bm_op *op, int res)
{
	struct bm_io *io = op_to_io(op);
	struct file_store *f = to_file(io->store);
	struct io_uring_sqe *sqe;

	sqe = bm_loop_sqe(f->s.loop, &io->op, hints_done);
	io_uring_prep_fadvise(sqe, f->fd, io->offset, (off_t)io->length,
			      POSIX_FADV_DONTNEED);
}

/* The fdatasync of a flush, or of a FUA write, is done. */
static void
flush_done(struct bm_op *op, int res)
{
	struct bm_io *io = op_to_io(op);

	if (res < 0)
		res = bm_error(res, "%s: fdatasync: %s", io->store->name,
			       strerror(-res));
	io->done(io, res);
}

/* io->stage of a read or write: its direction, and whether its last
 * submission went through the O_DIRECT descriptor. */
#define RW_WRITE 1
#define RW_DIRECT 2

static void
rw_submit(struct file_store *f, struct bm_io *io, bool write)
{
	struct io_uring_sqe *sqe;
	char *buf = (char *)io->buf + io->progress;
	uint64_t off = io->offset + io->progress;
	size_t n = io->length - io->progress;
	bool direct = f->dfd >= 0 && off % f->dalign == 0 &&
		      n % f->dalign == 0 && (uintptr_t)buf % f->dalign == 0 &&
		      (!f->bulk_only || (write && (io->flags & BM_IO_WRITEBACK)));
	int fd = direct ? f->dfd : f->fd;

	sqe = bm_loop_sqe(f->s.loop, &io->op, rw_done);
	if (write)
		io_uring_prep_write(sqe, fd, buf, n, off);
	else
		io_uring_prep_read(sqe, fd, buf, n, off);
	if (io->flags & BM_IO_ASYNC)
		io_uring_sqe_set_flags(sqe, IOSQE_ASYNC);
	/* stage remembers the direction across resubmissions */
	io->stage = (write ? RW_WRITE : 0) | (direct ? RW_DIRECT : 0);
}

static void
rw_done(struct bm_op *op, int res)
{
	struct bm_io *io = op_to_io(op);
	struct file_store *f = to_file(io->store);
	bool write = io->stage & RW_WRITE;

	if (res == -EAGAIN || res == -EINTR) {
		rw_submit(f, io, write);
		return;
	}
	if (res < 0) {
		io_fail(io, bm_error(res, "%s: %s at offset %" PRIu64 ": %s",
				     f->s.name, write ? "write" : "read",
				     io->offset + io->progress,
				     strerror(-res)));
		return;
	}
	if (res == 0 && !write && f->s.growable) {
		/* Past the end of a growable file: zeroes. */
		memset((char *)io->buf + io->progress, 0,
		       io->length - io->progress);
		res = (int)BM_MIN(io->length - io->progress, (uint64_t)INT_MAX);
	}
	if (res == 0) {
		io_fail(io, bm_error(-EIO, "%s: unexpected end of file at "
				     "offset %" PRIu64, f->s.name,
				     io->offset + io->progress));
		return;
	}
	io->progress += (uint64_t)res;
	if (io->progress < io->length) {
		rw_submit(f, io, write);
		return;
	}
	if (write && (io->flags & BM_IO_WRITEBACK) && !f->s.block_device &&
	    !(io->stage & RW_DIRECT)) {
		/* What a bulk copy wrote through the page cache starts its
		 * writeback now, so the disk works while we copy and the
		 * final flush finds little left to do.  With BM_IO_EVICT
		 * (an offline copy) it is also waited for and dropped from
		 * the cache, as nbdcopy does: the copy reuses a few MiB of
		 * pages instead of filling the cache with the whole image,
		 * which a single kernel worker would then write out
		 * serially.  (A move does not wait: its guest shares the
		 * disk.)  Only hints: their results are ignored; the flush
		 * reports what failed.  (A direct write has no cached
		 * pages.) */
		struct io_uring_sqe *sqe;

		bool evict = io->flags & BM_IO_EVICT;

		sqe = bm_loop_sqe(f->s.loop, &io->op,
				  evict ? written_back : hints_done);
		io_uring_prep_sync_file_range(sqe, f->fd, (unsigned)io->length,
					      io->offset, evict ?
					      SYNC_FILE_RANGE_WAIT_BEFORE |
					      SYNC_FILE_RANGE_WRITE |
					      SYNC_FILE_RANGE_WAIT_AFTER :
					      SYNC_FILE_RANGE_WRITE);
		return;
	}
	if (write && (io->flags & BM_IO_FUA)) {
		/* A data sync of the whole file is the only way a file
		 * offers to make one write durable. */
		struct io_uring_sqe *sqe;

		f->datasyncs++;
		sqe = bm_loop_sqe(f->s.loop, &io->op, flush_done);
		io_uring_prep_fsync(sqe, f->fd, IORING_FSYNC_DATASYNC);
		return;
	}
	io->done(io, 0);
}

static bool
request_too_big(struct bm_store *s, struct bm_io *io)
{
	if (io->length > (1u << 30)) {
		io_defer(s, io, bm_error(-EINVAL, "%s: request of %" PRIu64
					 " bytes is too large", s->name,
					 io->length));
		return true;
	}
	return false;
}

static void
file_read(struct bm_store *s, struct bm_io *io)
{
	if (!check_request(s, io, false) || request_too_big(s, io))
		return;
	if (io->length == 0) {
		io_defer(s, io, 0);
		return;
	}
	rw_submit(to_file(s), io, false);
}

static void
file_write(struct bm_store *s, struct bm_io *io)
{
	if (!check_request(s, io, true) || request_too_big(s, io))
		return;
	if (io->length == 0) {
		io_defer(s, io, 0);
		return;
	}
	rw_submit(to_file(s), io, true);
}

/* ---- zero / discard -------------------------------------------------- */

enum zero_stage {
	ZERO_PUNCH,      /* FALLOC_FL_PUNCH_HOLE */
	ZERO_RANGE,      /* FALLOC_FL_ZERO_RANGE */
	ZERO_WRITE,      /* write zeroes */
	DISCARD_PUNCH,   /* discard: punch, and ignore if unsupported */
};

static void zero_step(struct file_store *f, struct bm_io *io);

static void
zero_done(struct bm_op *op, int res)
{
	struct bm_io *io = op_to_io(op);
	struct file_store *f = to_file(io->store);

	if (res == -EINTR || res == -EAGAIN) {
		zero_step(f, io);
		return;
	}
	switch (io->stage) {
	case DISCARD_PUNCH:
		if (res == -EOPNOTSUPP || res == -EINVAL) {
			/* Discard is a hint; a store that cannot free
			 * space keeps the data. */
			f->can_punch = false;
			res = 0;
		}
		break;
	case ZERO_PUNCH:
		if (res == -EOPNOTSUPP || res == -EINVAL) {
			f->can_punch = false;
			io->stage = ZERO_RANGE;
			zero_step(f, io);
			return;
		}
		break;
	case ZERO_RANGE:
		if (res == -EOPNOTSUPP || res == -EINVAL) {
			f->can_zero_range = false;
			io->stage = ZERO_WRITE;
			zero_step(f, io);
			return;
		}
		break;
	case ZERO_WRITE:
		if (res > 0) {
			io->progress += (uint64_t)res;
			if (io->progress < io->length) {
				zero_step(f, io);
				return;
			}
			res = 0;
		} else if (res == 0) {
			res = -EIO;
		}
		break;
	}
	if (res < 0)
		res = bm_error(res, "%s: %s at offset %" PRIu64 "+%" PRIu64
			       ": %s", f->s.name,
			       io->stage == DISCARD_PUNCH ? "discard" : "zero",
			       io->offset, io->length, strerror(-res));
	if (res == 0 && io->stage != DISCARD_PUNCH &&
	    (io->flags & BM_IO_FUA)) {
		/* As for a FUA write: zeroes are data too. */
		struct io_uring_sqe *sqe;

		f->datasyncs++;
		sqe = bm_loop_sqe(f->s.loop, &io->op, flush_done);
		io_uring_prep_fsync(sqe, f->fd, IORING_FSYNC_DATASYNC);
		return;
	}
	io->done(io, res);
}

static void
zero_step(struct file_store *f, struct bm_io *io)
{
	struct io_uring_sqe *sqe;

	/* Skip methods known not to work here. */
	if (io->stage == ZERO_PUNCH && !f->can_punch)
		io->stage = ZERO_RANGE;
	if (io->stage == ZERO_RANGE && !f->can_zero_range)
		io->stage = ZERO_WRITE;
	if (io->stage == DISCARD_PUNCH && !f->can_punch) {
		io_defer(&f->s, io, 0);
		return;
	}
	if (io->stage == ZERO_WRITE) {
		size_t n;

		if (io->flags & BM_IO_FAST_ZERO) {
			io_defer(&f->s, io, -ENOTSUP);
			return;
		}
		if (!f->zero_buf) {
			if (posix_memalign(&f->zero_buf, 4096, ZERO_BUF_SIZE)) {
				io_defer(&f->s, io, bm_error(-ENOMEM,
					 "%s: out of memory", f->s.name));
				return;
			}
			memset(f->zero_buf, 0, ZERO_BUF_SIZE);
		}
		n = BM_MIN(io->length - io->progress, ZERO_BUF_SIZE);
		sqe = bm_loop_sqe(f->s.loop, &io->op, zero_done);
		io_uring_prep_write(sqe, f->fd, f->zero_buf, n,
				    io->offset + io->progress);
		return;
	}
	sqe = bm_loop_sqe(f->s.loop, &io->op, zero_done);
	io_uring_prep_fallocate(sqe, f->fd,
				(io->stage == ZERO_RANGE ? FALLOC_FL_ZERO_RANGE
							 : FALLOC_FL_PUNCH_HOLE) |
				FALLOC_FL_KEEP_SIZE,
				io->offset, io->length);
}

static void
file_zero(struct bm_store *s, struct bm_io *io)
{
	if (!check_request(s, io, true))
		return;
	if (io->length == 0) {
		io_defer(s, io, 0);
		return;
	}
	io->stage = (io->flags & BM_IO_MAY_TRIM) ? ZERO_PUNCH : ZERO_RANGE;
	zero_step(to_file(s), io);
}

static void
file_discard(struct bm_store *s, struct bm_io *io)
{
	if (!check_request(s, io, true))
		return;
	if (io->length == 0) {
		io_defer(s, io, 0);
		return;
	}
	io->stage = DISCARD_PUNCH;
	zero_step(to_file(s), io);
}

/* ---- flush ----------------------------------------------------------- */

static void
file_flush(struct bm_store *s, struct bm_io *io)
{
	struct io_uring_sqe *sqe;

	io->store = s;
	if (s->readonly) {
		io_defer(s, io, 0);
		return;
	}
	sqe = bm_loop_sqe(s->loop, &io->op, flush_done);
	to_file(s)->datasyncs++;
	io_uring_prep_fsync(sqe, to_file(s)->fd, IORING_FSYNC_DATASYNC);
}

/* ---- extents --------------------------------------------------------- */

static int
file_map(struct file_store *f, uint64_t offset, uint64_t length,
	 struct bm_extent_list *l)
{
	uint64_t end = offset + length;
	int r;

	if (f->s.block_device)
		return bm_extent_list_append(l, offset, length, 0);
	while (offset < end) {
		off_t data, hole;

		data = lseek(f->fd, (off_t)offset, SEEK_DATA);
		if (data < 0) {
			if (errno == ENXIO) /* nothing but a hole to EOF */
				return bm_extent_list_append(l, offset,
					end - offset,
					BM_EXTENT_HOLE | BM_EXTENT_ZERO);
			if (errno == EINVAL || errno == EOPNOTSUPP)
				return bm_extent_list_append(l, offset,
							     end - offset, 0);
			return -errno;
		}
		if ((uint64_t)data > offset) {
			r = bm_extent_list_append(l, offset,
				BM_MIN((uint64_t)data, end) - offset,
				BM_EXTENT_HOLE | BM_EXTENT_ZERO);
			if (r < 0)
				return r;
			offset = BM_MIN((uint64_t)data, end);
			if (offset >= end)
				break;
		}
		hole = lseek(f->fd, (off_t)offset, SEEK_HOLE);
		if (hole < 0)
			return -errno;
		if ((uint64_t)hole <= offset) /* raced with a truncate */
			hole = (off_t)end;
		r = bm_extent_list_append(l, offset,
					  BM_MIN((uint64_t)hole, end) - offset,
					  0);
		if (r < 0)
			return r;
		offset = BM_MIN((uint64_t)hole, end);
	}
	return 0;
}

static void
file_extents(struct bm_store *s, struct bm_io *io)
{
	int r;

	if (!check_request(s, io, false))
		return;
	r = file_map(to_file(s), io->offset, io->length, io->extents);
	if (r < 0)
		r = bm_error(r, "%s: mapping extents: %s", s->name,
			     strerror(-r));
	io_defer(s, io, r);
}

/* ---- cancel ---------------------------------------------------------- */

static void
cancel_done(struct bm_op *op, int res)
{
	free(op);
}

static void
file_cancel(struct bm_store *s)
{
	struct bm_op *op = calloc(1, sizeof *op);
	struct io_uring_sqe *sqe;

	if (!op)
		return;
	sqe = bm_loop_sqe(s->loop, op, cancel_done);
	io_uring_prep_cancel_fd(sqe, to_file(s)->fd, IORING_ASYNC_CANCEL_ALL);
	if (to_file(s)->dfd < 0 || !(op = calloc(1, sizeof *op)))
		return;
	sqe = bm_loop_sqe(s->loop, op, cancel_done);
	io_uring_prep_cancel_fd(sqe, to_file(s)->dfd, IORING_ASYNC_CANCEL_ALL);
}

static int
file_truncate(struct bm_store *s, uint64_t size)
{
	struct file_store *f = to_file(s);

	if (s->block_device || size > INT64_MAX)
		return bm_error(-EINVAL, "%s: cannot resize to %" PRIu64,
				s->name, size);
	if (ftruncate(f->fd, (off_t)size) < 0)
		return bm_error(-errno, "%s: ftruncate: %s", s->name,
				strerror(errno));
	s->size = size;
	return 0;
}

/* ---- open / close ---------------------------------------------------- */

static void
file_close(struct bm_store *s)
{
	struct file_store *f = to_file(s);

	close(f->fd);
	if (f->dfd >= 0)
		close(f->dfd);
	free(f->zero_buf);
	free(s->name);
	free(f);
}

static const struct bm_store_ops file_ops = {
	.name = "file",
	.read = file_read,
	.write = file_write,
	.zero = file_zero,
	.discard = file_discard,
	.flush = file_flush,
	.extents = file_extents,
	.cancel = file_cancel,
	.truncate = file_truncate,
	.close = file_close,
};

static int
open_error(const char *path, int err)
{
	return bm_error(err, "%s: %s", path, strerror(-err));
}

/* Only regular files and block devices hold images. */
static int
type_check(const char *path, const struct stat *st)
{
	if (S_ISDIR(st->st_mode))
		return bm_error(-EISDIR, "%s: is a directory", path);
	if (!S_ISREG(st->st_mode) && !S_ISBLK(st->st_mode))
		return bm_error(-EINVAL, "%s: not a regular file or block "
				"device (%s)", path,
				S_ISFIFO(st->st_mode) ? "a FIFO" :
				S_ISCHR(st->st_mode) ? "a character device" :
				S_ISSOCK(st->st_mode) ? "a socket" :
				"something else");
	return 0;
}

/*
 * open(2), or with BM_OPEN_NOFOLLOW openat2(2) refusing a symbolic link in
 * any part of the path: a name a caller checked (resolved, inside an
 * allowed directory) cannot be swapped for a link between the check and
 * the open.  A kernel without openat2 gets O_NOFOLLOW (the last part).
 */
static int
open_path(const char *path, int oflags, unsigned flags)
{
	if (flags & BM_OPEN_NOFOLLOW) {
#ifdef SYS_openat2
		struct open_how how = {
			.flags = (uint64_t)oflags,
			.mode = (oflags & O_CREAT) ? 0644 : 0,
			.resolve = RESOLVE_NO_SYMLINKS,
		};
		long fd = syscall(SYS_openat2, AT_FDCWD, path, &how,
				  sizeof how);

		if (fd >= 0 || errno != ENOSYS)
			return (int)fd;
#endif
		oflags |= O_NOFOLLOW;
	}
	return open(path, oflags, 0644);
}

/*
 * The O_DIRECT descriptor: the same open file, reopened through its
 * /proc/self/fd link (the path could name another file by now).  Where
 * the file system refuses O_DIRECT, or /proc is missing, the store stays
 * cached and says so.
 */
static void
open_direct(struct file_store *f, int oflags)
{
	char link[64];
	struct stat st;
	int fd;

	oflags &= ~(O_CREAT | O_EXCL | O_NONBLOCK | O_TRUNC);
	snprintf(link, sizeof link, "/proc/self/fd/%d", f->fd);
	fd = open(link, oflags | O_DIRECT);
	if (fd >= 0 && fstat(fd, &st) == 0 && st.st_dev == f->dev &&
	    st.st_ino == f->ino) {
		f->dfd = fd;
		return;
	}
	bm_info("%s: O_DIRECT not available here (%s), using the page cache",
		f->s.name, fd < 0 ? strerror(errno) : "reopened another file");
	if (fd >= 0)
		close(fd);
}

int
bm_file_open(struct bm_loop *loop, const char *path, unsigned flags,
	     uint64_t size, struct bm_store **out)
{
	struct file_store *f;
	struct stat st;
	int oflags = O_CLOEXEC;
	int fd, r;

	if (flags & (BM_OPEN_CREATE | BM_OPEN_TRUNCATE))
		flags |= BM_OPEN_WRITE;
	oflags |= (flags & BM_OPEN_WRITE) ? O_RDWR : O_RDONLY;
	if (flags & BM_OPEN_CREATE)
		oflags |= O_CREAT | O_EXCL;
	if (flags & BM_OPEN_TRUNCATE)
		oflags |= O_CREAT;

	/* What is there decides before anything is opened: opening a FIFO
	 * blocks until a writer comes, and opening some character devices
	 * does things.  O_NONBLOCK covers a swap between the two looks; it
	 * is cleared again, as io_uring would take it for "never wait". */
	if (stat(path, &st) == 0) {
		r = type_check(path, &st);
		if (r < 0)
			return r;
	}
	oflags |= O_NONBLOCK;
	fd = open_path(path, oflags, flags);
	if (fd < 0) {
		r = -errno;
		if (r == -EISDIR)
			return bm_error(r, "%s: is a directory", path);
		if (r == -ELOOP && (flags & BM_OPEN_NOFOLLOW))
			return bm_error(r, "%s: refused: a symbolic link in "
					"the path (it was checked without one)",
					path);
		return open_error(path, r);
	}
	if (fstat(fd, &st) < 0) {
		r = open_error(path, -errno);
		goto out_close;
	}
	r = type_check(path, &st);
	if (r < 0)
		goto out_close;
	if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK) < 0) {
		r = open_error(path, -errno);
		goto out_close;
	}

	f = calloc(1, sizeof *f);
	if (!f || !(f->s.name = strdup(path))) {
		free(f);
		r = bm_error(-ENOMEM, "%s: out of memory", path);
		goto out_close;
	}
	f->fd = fd;
	f->dfd = -1;
	f->dev = st.st_dev;
	f->ino = st.st_ino;
	f->can_punch = true;
	f->can_zero_range = true;
	f->s.ops = &file_ops;
	f->s.loop = loop;
	f->s.readonly = !(flags & BM_OPEN_WRITE);
	f->s.align = 1;
	f->s.preferred = 0;

	if (S_ISBLK(st.st_mode)) {
		uint64_t bytes;
		int ssz = 512;

		if (ioctl(fd, BLKGETSIZE64, &bytes) < 0) {
			r = open_error(path, -errno);
			goto out_free;
		}
		ioctl(fd, BLKSSZGET, &ssz);
		f->s.size = bytes;
		f->s.block_device = true;
		f->s.allocated = UINT64_MAX;
		f->dalign = BM_MAX((uint32_t)ssz, 4096u);
	} else {
		if (flags & (BM_OPEN_CREATE | BM_OPEN_TRUNCATE)) {
			/* Through zero length, so that a reused file holds
			 * no old data: it must read as zeroes. */
			if (ftruncate(fd, 0) < 0 ||
			    ftruncate(fd, (off_t)size) < 0) {
				r = open_error(path, -errno);
				goto out_free;
			}
			st.st_size = (off_t)size;
			st.st_blocks = 0;
		}
		f->s.size = (uint64_t)st.st_size;
		f->s.allocated = (uint64_t)st.st_blocks * 512;
		/* A direct request must not share a page with a cached
		 * one (the kernel could not drop a dirty page under it). */
		f->dalign = (uint32_t)BM_MAX(4096L, sysconf(_SC_PAGESIZE));
	}
	if (flags & (BM_OPEN_DIRECT | BM_OPEN_DIRECT_BULK))
		open_direct(f, oflags);
	f->bulk_only = !(flags & BM_OPEN_DIRECT);
	posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
	*out = &f->s;
	return 0;

out_free:
	free(f->s.name);
	free(f);
out_close:
	close(fd);
	return r;
}

bool
bm_file_same(struct bm_store *s, const char *path)
{
	struct file_store *f;
	struct stat st;

	if (s->ops != &file_ops || stat(path, &st) < 0)
		return false;
	f = to_file(s);
	return st.st_dev == f->dev && st.st_ino == f->ino;
}

uint64_t
bm_file_datasyncs(struct bm_store *s)
{
	return s->ops == &file_ops ? to_file(s)->datasyncs : 0;
}

bool
bm_file_direct(struct bm_store *s)
{
	return s->ops == &file_ops && to_file(s)->dfd >= 0;
}
