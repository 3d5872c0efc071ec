/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The io_uring file store (lib/file.c): data round trips, bounds and
 * read-only checks, zeroing with and without deallocation, discard,
 * extents against what the file system says, the rule that a
 * completion never runs inside the call that started it, O_DIRECT beside
 * the page cache (aligned requests direct, the rest cached, both seeing
 * each other's data), and bulk writes that leave no pages cached.
 */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "extent.h"
#include "helpers.h"
#include "store.h"

static char path[64];
static struct bm_loop *loop;

static void
setup(void)
{
	int fd;

	strcpy(path, "/tmp/test-file.XXXXXX");
	fd = mkstemp(path);
	ck_assert_int_ge(fd, 0);
	close(fd);
	unlink(path);
	ck_assert_int_eq(bm_loop_new(32, &loop), 0);
}

static void
teardown(void)
{
	unlink(path);
	bm_loop_free(loop);
}

static int
do_io(struct bm_store *s, void (*op)(struct bm_store *, struct bm_io *),
      uint64_t off, uint64_t len, void *buf, unsigned flags)
{
	struct bm_io io = { .offset = off, .length = len, .buf = buf,
			    .flags = flags };

	return bm_store_sync(s, op, &io);
}

static void
fill(unsigned char *b, size_t n, unsigned seed)
{
	for (size_t i = 0; i < n; i++)
		b[i] = (unsigned char)(seed * 31 + i * 7 + 1);
}

START_TEST(test_roundtrip)
{
	static unsigned char w[3 << 20], r[3 << 20];
	static const size_t lens[] = { 1, 511, 4096, 65537, 1 << 20, 3 << 20 };
	struct bm_store *s;

	ck_assert_int_eq(bm_file_open(loop, path, BM_OPEN_CREATE, 8 << 20,
				      &s), 0);
	ck_assert_uint_eq(s->size, 8 << 20);
	for (size_t i = 0; i < sizeof lens / sizeof lens[0]; i++) {
		uint64_t off = (i * 1234567) % ((8 << 20) - lens[i]);

		fill(w, lens[i], (unsigned)i);
		ck_assert_int_eq(do_io(s, s->ops->write, off, lens[i], w, 0),
				 0);
		memset(r, 0xee, lens[i]);
		ck_assert_int_eq(do_io(s, s->ops->read, off, lens[i], r, 0), 0);
		ck_assert_mem_eq(w, r, lens[i]);
	}
	ck_assert_int_eq(do_io(s, s->ops->write, 0, 4096, w, BM_IO_FUA), 0);
	ck_assert_int_eq(do_io(s, s->ops->flush, 0, 0, NULL, 0), 0);
	bm_store_close(s);
}
END_TEST

/* How many of the file's pages in [off, off + len) the page cache holds. */
static size_t
cached_pages(uint64_t off, uint64_t len)
{
	size_t n = len / 4096, count = 0;
	unsigned char *vec = calloc(n, 1);
	int fd = open(path, O_RDONLY);
	void *m;

	ck_assert_ptr_nonnull(vec);
	ck_assert_int_ge(fd, 0);
	m = mmap(NULL, len, PROT_READ, MAP_SHARED, fd, (off_t)off);
	ck_assert_ptr_ne(m, MAP_FAILED);
	ck_assert_int_eq(mincore(m, len, vec), 0);
	for (size_t i = 0; i < n; i++)
		count += vec[i] & 1;
	munmap(m, len);
	close(fd);
	free(vec);
	return count;
}

START_TEST(test_direct_beside_cache)
{
	const size_t mib = 1 << 20;
	unsigned char *w, *r;
	struct bm_store *s;

	ck_assert_int_eq(posix_memalign((void **)&w, 4096, 2 * mib), 0);
	ck_assert_int_eq(posix_memalign((void **)&r, 4096, 2 * mib), 0);
	ck_assert_int_eq(bm_file_open(loop, path,
				      BM_OPEN_CREATE | BM_OPEN_DIRECT,
				      8 * mib + 1000, &s), 0);
	/* The store takes any request, whatever the file system does. */
	ck_assert_uint_eq(s->align, 1);

	/* Aligned (direct where the file system allows it), then an
	 * unaligned write inside it (through the cache), then the tail of
	 * a file whose size is no multiple of the page. */
	fill(w, mib, 1);
	ck_assert_int_eq(do_io(s, s->ops->write, mib, mib, w, 0), 0);
	fill(w + mib + 1, 1000, 2);
	ck_assert_int_eq(do_io(s, s->ops->write, mib + 8192 + 100, 1000,
			       w + mib + 1, 0), 0);
	memcpy(w + 8192 + 100, w + mib + 1, 1000);
	fill(w + mib, 1000, 3);
	ck_assert_int_eq(do_io(s, s->ops->write, 8 * mib, 1000, w + mib, 0),
			 0);
	/* An aligned read sees the cached write (the kernel writes dirty
	 * pages back before a direct read), an unaligned one the direct
	 * write. */
	ck_assert_int_eq(do_io(s, s->ops->read, mib, mib, r, 0), 0);
	ck_assert_mem_eq(r, w, mib);
	ck_assert_int_eq(do_io(s, s->ops->read, mib + 7, 5000, r + 1, 0), 0);
	ck_assert_mem_eq(r + 1, w + 7, 5000);
	ck_assert_int_eq(do_io(s, s->ops->read, 8 * mib, 1000, r, 0), 0);
	ck_assert_mem_eq(r, w + mib, 1000);
	/* An aligned write over the cached page replaces it. */
	fill(w, mib, 4);
	ck_assert_int_eq(do_io(s, s->ops->write, mib, mib, w, 0), 0);
	ck_assert_int_eq(do_io(s, s->ops->read, mib + 8192, 4096, r + 1, 0),
			 0);
	ck_assert_mem_eq(r + 1, w + 8192, 4096);

	if (bm_file_direct(s)) {
		/* A direct write leaves nothing in the page cache. */
		fill(w, mib, 5);
		ck_assert_int_eq(do_io(s, s->ops->write, 4 * mib, mib, w, 0),
				 0);
		ck_assert_uint_eq(cached_pages(4 * mib, mib), 0);
	} else {
		fprintf(stderr, "test-file: no O_DIRECT on this file system; "
			"the cached path was tested\n");
	}
	ck_assert_int_eq(do_io(s, s->ops->flush, 0, 0, NULL, 0), 0);
	bm_store_close(s);
	free(w);
	free(r);
}
END_TEST

/* A bulk write with BM_IO_EVICT through the page cache is written back
 * and dropped from the cache before it completes; another write stays. */
START_TEST(test_bulk_write_leaves_no_cache)
{
	const size_t mib = 1 << 20;
	unsigned char *w;
	struct bm_store *s;

	ck_assert_int_eq(posix_memalign((void **)&w, 4096, mib), 0);
	fill(w, mib, 6);
	ck_assert_int_eq(bm_file_open(loop, path, BM_OPEN_CREATE, 8 * mib,
				      &s), 0);
	ck_assert_int_eq(do_io(s, s->ops->write, 0, mib, w, 0), 0);
	ck_assert_int_eq(do_io(s, s->ops->write, 2 * mib, mib, w,
			       BM_IO_WRITEBACK | BM_IO_EVICT), 0);
	ck_assert_uint_gt(cached_pages(0, mib), 0);
	ck_assert_uint_eq(cached_pages(2 * mib, mib), 0);
	/* And the data is there. */
	memset(w, 0, mib);
	ck_assert_int_eq(do_io(s, s->ops->read, 2 * mib, mib, w, 0), 0);
	for (size_t i = 0; i < mib; i++)
		ck_assert_uint_eq(w[i], (unsigned char)(6 * 31 + i * 7 + 1));
	bm_store_close(s);
	free(w);
}
END_TEST

/* BM_OPEN_DIRECT_BULK (a move's destination): a bulk copy write goes
 * past the page cache, a guest's write of the same shape stays in it, and
 * each sees the other's data. */
START_TEST(test_direct_for_bulk_only)
{
	const size_t mib = 1 << 20;
	unsigned char *w, *r;
	struct bm_store *s;

	ck_assert_int_eq(posix_memalign((void **)&w, 4096, mib), 0);
	ck_assert_int_eq(posix_memalign((void **)&r, 4096, mib), 0);
	ck_assert_int_eq(bm_file_open(loop, path, BM_OPEN_CREATE |
				      BM_OPEN_DIRECT_BULK, 8 * mib, &s), 0);
	if (!bm_file_direct(s)) {
		bm_store_close(s);
		free(w);
		free(r);
		fprintf(stderr, "test-file: no O_DIRECT on this file system\n");
		return;
	}
	fill(w, mib, 7);
	ck_assert_int_eq(do_io(s, s->ops->write, 0, mib, w,
			       BM_IO_WRITEBACK | BM_IO_ASYNC), 0);
	ck_assert_uint_eq(cached_pages(0, mib), 0);
	/* Aligned, but not a bulk write: cached. */
	ck_assert_int_eq(do_io(s, s->ops->write, 2 * mib, mib, w, 0), 0);
	ck_assert_uint_eq(cached_pages(2 * mib, mib), mib / 4096);
	/* A guest write into the bulk range, then a bulk write over a
	 * cached page: both read back as the newer data. */
	fill(w, 4096, 8);
	ck_assert_int_eq(do_io(s, s->ops->write, 8192, 4096, w, 0), 0);
	ck_assert_int_eq(do_io(s, s->ops->read, 8192, 4096, r, 0), 0);
	ck_assert_mem_eq(r, w, 4096);
	fill(w, mib, 9);
	ck_assert_int_eq(do_io(s, s->ops->write, 2 * mib, mib, w,
			       BM_IO_WRITEBACK), 0);
	ck_assert_int_eq(do_io(s, s->ops->read, 2 * mib, mib, r, 0), 0);
	ck_assert_mem_eq(r, w, mib);
	ck_assert_int_eq(do_io(s, s->ops->flush, 0, 0, NULL, 0), 0);
	bm_store_close(s);
	free(w);
	free(r);
}
END_TEST

START_TEST(test_new_file_reads_zero)
{
	static unsigned char r[1 << 20], zero[1 << 20];
	struct bm_store *s;
	int fd;

	fd = open(path, O_CREAT | O_WRONLY, 0644);
	ck_assert_int_ge(fd, 0);
	memset(r, 0x55, sizeof r);
	ck_assert_int_eq(write(fd, r, sizeof r), (ssize_t)sizeof r);
	close(fd);
	/* CREATE refuses an existing file; TRUNCATE empties it. */
	ck_assert_int_eq(bm_file_open(loop, path, BM_OPEN_CREATE, 1 << 20,
				      &s), -EEXIST);
	ck_assert_int_eq(bm_file_open(loop, path, BM_OPEN_TRUNCATE, 1 << 20,
				      &s), 0);
	ck_assert_int_eq(do_io(s, s->ops->read, 0, sizeof r, r, 0), 0);
	ck_assert_mem_eq(r, zero, sizeof r);
	bm_store_close(s);
}
END_TEST

START_TEST(test_bounds_and_readonly)
{
	unsigned char b[8192] = { 0 };
	struct bm_store *s;

	ck_assert_int_eq(bm_file_open(loop, path, BM_OPEN_CREATE, 8192, &s),
			 0);
	ck_assert_int_eq(do_io(s, s->ops->read, 4096, 4097, b, 0), -EINVAL);
	ck_assert_int_eq(do_io(s, s->ops->write, 8192, 1, b, 0), -EINVAL);
	ck_assert_int_eq(do_io(s, s->ops->write, UINT64_MAX, 2, b, 0),
			 -EINVAL);
	ck_assert_int_eq(do_io(s, s->ops->zero, 1, 8192, NULL, 0), -EINVAL);
	ck_assert_int_eq(do_io(s, s->ops->read, 8192, 0, b, 0), 0);
	bm_store_close(s);

	ck_assert_int_eq(bm_file_open(loop, path, 0, 0, &s), 0);
	ck_assert(s->readonly);
	ck_assert_int_eq(do_io(s, s->ops->write, 0, 1, b, 0), -EROFS);
	ck_assert_int_eq(do_io(s, s->ops->zero, 0, 1, NULL, 0), -EROFS);
	ck_assert_int_eq(do_io(s, s->ops->read, 0, 8192, b, 0), 0);
	bm_store_close(s);
}
END_TEST

START_TEST(test_open_errors)
{
	struct bm_store *s;

	ck_assert_int_eq(bm_file_open(loop, "/nonexistent/x", 0, 0, &s),
			 -ENOENT);
	ck_assert_int_eq(bm_file_open(loop, "/tmp", 0, 0, &s), -EISDIR);
	ck_assert_int_eq(bm_file_open(loop, "/dev/null", 0, 0, &s), -EINVAL);
}
END_TEST

static void
check_extents(struct bm_store *s, uint64_t off, uint64_t len,
	      const struct bm_extent *want, size_t n)
{
	struct bm_extent_list l = { 0 };
	struct bm_io io = { .offset = off, .length = len, .extents = &l };

	ck_assert_int_eq(bm_store_sync(s, s->ops->extents, &io), 0);
	ck_assert_uint_eq(l.len, n);
	for (size_t i = 0; i < n; i++) {
		ck_assert_uint_eq(l.v[i].offset, want[i].offset);
		ck_assert_uint_eq(l.v[i].length, want[i].length);
		ck_assert_uint_eq(l.v[i].flags, want[i].flags);
	}
	bm_extent_list_free(&l);
}

/* FUA makes a zeroed range durable as it does a written one: an
 * fdatasync follows, and none follows a plain zero or a discard. */
START_TEST(test_zero_fua)
{
	struct bm_store *s;
	uint64_t n;

	ck_assert_int_eq(bm_file_open(loop, path, BM_OPEN_CREATE, 1 << 20,
				      &s), 0);
	n = bm_file_datasyncs(s);
	ck_assert_int_eq(do_io(s, s->ops->zero, 0, 8192, NULL, 0), 0);
	ck_assert_int_eq(do_io(s, s->ops->discard, 0, 4096, NULL, 0), 0);
	ck_assert_uint_eq(bm_file_datasyncs(s), n);
	ck_assert_int_eq(do_io(s, s->ops->zero, 4096, 4096, NULL, BM_IO_FUA),
			 0);
	ck_assert_uint_eq(bm_file_datasyncs(s), n + 1);
	ck_assert_int_eq(do_io(s, s->ops->zero, 0, 4096, NULL,
			       BM_IO_FUA | BM_IO_MAY_TRIM), 0);
	ck_assert_uint_eq(bm_file_datasyncs(s), n + 2);
	bm_store_close(s);
}
END_TEST

/* BM_OPEN_NOFOLLOW: a symbolic link anywhere in the path is refused
 * (-ELOOP) and nothing is created behind it; without the flag the same
 * name opens. */
START_TEST(test_nofollow)
{
	char dir[64], real[96], link[96], name[128], lname[128];
	struct bm_store *s;

	strcpy(dir, "/tmp/test-file-nf.XXXXXX");
	ck_assert_ptr_nonnull(mkdtemp(dir));
	snprintf(real, sizeof real, "%s/real", dir);
	snprintf(link, sizeof link, "%s/link", dir);
	ck_assert_int_eq(mkdir(real, 0700), 0);
	ck_assert_int_eq(symlink(real, link), 0);
	snprintf(name, sizeof name, "%s/new.raw", link);
	ck_assert_int_eq(bm_file_open(loop, name, BM_OPEN_CREATE |
				      BM_OPEN_NOFOLLOW, 4096, &s), -ELOOP);
	snprintf(lname, sizeof lname, "%s/new.raw", real);
	ck_assert_int_eq(access(lname, F_OK), -1);
	/* An existing file behind a linked directory, and a link itself. */
	ck_assert_int_eq(bm_file_open(loop, lname, BM_OPEN_CREATE, 4096, &s),
			 0);
	bm_store_close(s);
	ck_assert_int_eq(bm_file_open(loop, name, BM_OPEN_WRITE |
				      BM_OPEN_NOFOLLOW, 0, &s), -ELOOP);
	ck_assert_int_eq(bm_file_open(loop, name, BM_OPEN_WRITE, 0, &s), 0);
	bm_store_close(s);
	ck_assert_int_eq(bm_file_open(loop, lname, BM_OPEN_WRITE |
				      BM_OPEN_NOFOLLOW, 0, &s), 0);
	bm_store_close(s);
	unlink(lname);
	unlink(link);
	rmdir(real);
	rmdir(dir);
}
END_TEST

START_TEST(test_zero_discard_extents)
{
	static unsigned char b[1 << 20], zero[1 << 20];
	const uint32_t H = BM_EXTENT_HOLE | BM_EXTENT_ZERO;
	const uint64_t M = 1 << 20;
	struct bm_store *s;

	ck_assert_int_eq(bm_file_open(loop, path, BM_OPEN_CREATE, 8 * M, &s),
			 0);
	{
		const struct bm_extent e[] = { { 0, 8 * M, H } };

		check_extents(s, 0, 8 * M, e, 1);
	}
	memset(b, 0xab, sizeof b);
	ck_assert_int_eq(do_io(s, s->ops->write, 2 * M, M, b, 0), 0);
	ck_assert_int_eq(do_io(s, s->ops->write, 5 * M, M, b, 0), 0);
	{
		const struct bm_extent e[] = {
			{ 0, 2 * M, H }, { 2 * M, M, 0 }, { 3 * M, 2 * M, H },
			{ 5 * M, M, 0 }, { 6 * M, 2 * M, H },
		};

		check_extents(s, 0, 8 * M, e, 5);
	}
	/* A window in the middle of things. */
	{
		const struct bm_extent e[] = {
			{ 2 * M + 5, M - 5, 0 }, { 3 * M, M, H },
		};

		check_extents(s, 2 * M + 5, 2 * M - 5, e, 2);
	}
	/* Zero with MAY_TRIM punches a hole. */
	ck_assert_int_eq(do_io(s, s->ops->zero, 2 * M, M, NULL,
			       BM_IO_MAY_TRIM), 0);
	/* Zero without it keeps the blocks but reads zero. */
	ck_assert_int_eq(do_io(s, s->ops->zero, 5 * M + 4096, 8192, NULL, 0),
			 0);
	ck_assert_int_eq(do_io(s, s->ops->read, 2 * M, M, b, 0), 0);
	ck_assert_mem_eq(b, zero, M);
	ck_assert_int_eq(do_io(s, s->ops->read, 5 * M, M, b, 0), 0);
	ck_assert_mem_eq(b + 4096, zero, 8192);
	ck_assert_uint_eq(b[0], 0xab);
	ck_assert_uint_eq(b[4096 + 8192], 0xab);
	{
		const struct bm_extent e[] = {
			{ 0, 5 * M, H }, { 5 * M, M, 0 }, { 6 * M, 2 * M, H },
		};

		check_extents(s, 0, 8 * M, e, 3);
	}
	/* Discard frees it. */
	ck_assert_int_eq(do_io(s, s->ops->discard, 5 * M, M, NULL, 0), 0);
	{
		const struct bm_extent e[] = { { 0, 8 * M, H } };

		check_extents(s, 0, 8 * M, e, 1);
	}
	bm_store_close(s);
}
END_TEST

struct inline_check {
	bool returned;
	bool ran_inline;
	bool done;
};

static void
inline_done(struct bm_io *io, int err)
{
	struct inline_check *c = io->opaque;

	if (!c->returned)
		c->ran_inline = true;
	c->done = true;
}

START_TEST(test_never_inline)
{
	struct bm_extent_list l = { 0 };
	unsigned char b[16];
	void (*ops[4])(struct bm_store *, struct bm_io *);
	struct bm_store *s;

	ck_assert_int_eq(bm_file_open(loop, path, BM_OPEN_CREATE, 4096, &s),
			 0);
	ops[0] = s->ops->read;
	ops[1] = s->ops->extents;
	ops[2] = s->ops->flush;
	ops[3] = s->ops->write;
	for (int i = 0; i < 4; i++) {
		struct inline_check c = { 0 };
		/* Out of bounds for write: completes with an error, and
		 * still not inline. */
		struct bm_io io = { .offset = i == 3 ? 9999 : 0, .length = 16,
				    .buf = b, .extents = &l,
				    .done = inline_done, .opaque = &c };

		ops[i](s, &io);
		c.returned = true;
		ck_assert(!c.ran_inline);
		ck_assert_int_eq(bm_loop_run_until(loop, &c.done), 0);
	}
	bm_extent_list_free(&l);
	bm_store_close(s);
}
END_TEST

START_TEST(test_same_file)
{
	struct bm_store *s;
	char link[80];

	ck_assert_int_eq(bm_file_open(loop, path, BM_OPEN_CREATE, 4096, &s),
			 0);
	snprintf(link, sizeof link, "%s.lnk", path);
	ck_assert_int_eq(symlink(path, link), 0);
	ck_assert(bm_file_same(s, path));
	ck_assert(bm_file_same(s, link));
	ck_assert(!bm_file_same(s, "/tmp"));
	unlink(link);
	bm_store_close(s);
}
END_TEST

int
main(void)
{
	Suite *s = suite_create("file");
	TCase *tc = tcase_create("file");

	tcase_add_checked_fixture(tc, setup, teardown);
	/* A deadline against hangs, not a timing: write-back waits for the
	 * device, which a loaded machine makes take seconds. */
	tcase_set_timeout(tc, 60);
	tcase_add_test(tc, test_roundtrip);
	tcase_add_test(tc, test_new_file_reads_zero);
	tcase_add_test(tc, test_bounds_and_readonly);
	tcase_add_test(tc, test_open_errors);
	tcase_add_test(tc, test_zero_discard_extents);
	tcase_add_test(tc, test_zero_fua);
	tcase_add_test(tc, test_nofollow);
	tcase_add_test(tc, test_never_inline);
	tcase_add_test(tc, test_same_file);
	tcase_add_test(tc, test_direct_beside_cache);
	tcase_add_test(tc, test_bulk_write_leaves_no_cache);
	tcase_add_test(tc, test_direct_for_bulk_only);
	suite_add_tcase(s, tc);
	return run_suite(s) ? EXIT_FAILURE : EXIT_SUCCESS;
}
