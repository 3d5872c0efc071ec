/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Replication end to end in one process (lib/replicate.c over
 * lib/replica-serve.c and lib/replica.c, on Unix sockets): a tracked disk
 * replicates to a replica directory while writers write, and
 *   - every point equals the disk as it was when it was asked for (the
 *     writers paused, replication_sync), and a cycle sends only what
 *     changed: the 4 KiB blocks written, by the record's fine bitmap
 *     (whole granules once after replication starts again);
 *   - with writers running through every cycle, every point is the
 *     instant its sync asked for, block by block;
 *   - a seed copy already on the replica costs only what differs
 *     (digests; in granules larger than a send slot too);
 *   - online verify finds a point damaged behind replication's back, and
 *     the next cycle repairs it;
 *   - a replica of another disk is refused, unless told to resync;
 *   - a promoted replica fences its old primary: replication stops with
 *     FENCED and never writes into it again;
 *   - a replica server stopped and started again mid-stream: replication
 *     resumes from the point it holds, and the writers never saw an error.
 */
#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdatomic.h>
#include <sys/stat.h>

#include "fault.h"
#include "helpers.h"
#include "repl-channel.h"

#define DISK_SIZE (UINT64_C(8) << 20)
#define BLOCK 4096u

static char dir[64], image[128], rdir[128], rsock[160], rctl[160];
static uint8_t *model;

static void
setup(void)
{
	char cmd[512];

	snprintf(dir, sizeof dir, "/var/tmp/bm-repl-XXXXXX");
	ck_assert(mkdtemp(dir));
	snprintf(image, sizeof image, "%s/disk.raw", dir);
	snprintf(rdir, sizeof rdir, "%s/replica", dir);
	snprintf(rsock, sizeof rsock, "unix:%s/repl.sock", dir);
	snprintf(rctl, sizeof rctl, "%s/ctl.sock", dir);
	snprintf(cmd, sizeof cmd, "head -c %" PRIu64 " /dev/urandom > %s && "
		 "truncate -s %" PRIu64 " %s", DISK_SIZE / 2, image, DISK_SIZE,
		 image);
	ck_assert_int_eq(system(cmd), 0);
	model = malloc(DISK_SIZE);
	ck_assert_ptr_nonnull(model);
}

static void
teardown(void)
{
	free(model);
	remove_tree(dir);
}

/* Tracked in `granularity` chunks (0: the default). */
static struct blockmirror_disk *
open_tracked_by(const char *path, uint32_t granularity)
{
	struct blockmirror_disk *d = blockmirror_disk_open(path,
		BLOCKMIRROR_FORMAT_RAW, 0);

	ck_assert_msg(d, "%s", blockmirror_last_error());
	ck_assert_int_eq(blockmirror_disk_start_thread(d), 0);
	ck_assert_int_eq(blockmirror_disk_track(d, NULL, granularity, NULL),
			 0);
	return d;
}

static struct blockmirror_disk *
open_tracked(const char *path)
{
	return open_tracked_by(path, 0);
}

/* The replica's granule for start_replica to create (0: its default). */
static uint32_t replica_granularity;

static struct blockmirror_replica_server *
start_replica(bool create, const char *base)
{
	struct blockmirror_replica_server_options o = {
		.size = sizeof o, .dir = rdir, .listen = rsock,
		.control = rctl, .create = create,
		.disk_size = base ? 0 : DISK_SIZE, .base = base,
		.granularity = replica_granularity,
	};
	struct blockmirror_replica_server *s = NULL;
	int r = blockmirror_replica_server_start(&o, &s);

	ck_assert_msg(r == 0, "replica server: %s", blockmirror_last_error());
	return s;
}

static uint32_t interval_ms = 1000;

static struct blockmirror_replication *
start_replication(struct blockmirror_disk *d, unsigned flags, int *err)
{
	struct blockmirror_replication_options o = {
		.size = sizeof o, .replica = rsock, .interval_ms = interval_ms,
		.flags = flags,
	};
	struct blockmirror_replication *r = NULL;

	*err = blockmirror_replication_start(d, &o, &r);
	return r;
}

/* A control-socket request to the replica server; the result object. */
static json_t *
replica_call(const char *op, uint64_t point, int *err)
{
	char addr[200];
	struct bm_chan *c = NULL;
	json_t *req = json_pack("{s:s, s:I}", "op", op, "point",
				(json_int_t)point), *res = NULL;

	snprintf(addr, sizeof addr, "unix:%s", rctl);
	*err = bm_chan_connect(addr, NULL, NULL, 5000, &c);
	if (*err == 0)
		*err = bm_chan_call(c, req, &res, 60000);
	bm_chan_close(c);
	json_decref(req);
	return res;
}

/* The latest point's image as the replica lists it. */
static char *
latest_image(void)
{
	int err;
	json_t *res = replica_call("points", 0, &err), *p;
	char *img = NULL;
	size_t i;

	ck_assert_msg(err == 0, "points: %s", blockmirror_last_error());
	json_array_foreach(json_object_get(res, "points"), i, p)
		if (json_is_true(json_object_get(p, "latest")))
			img = strdup(json_string_value(json_object_get(p,
								      "image")));
	json_decref(res);
	ck_assert_ptr_nonnull(img);
	return img;
}

static void
check_image_is_model(const char *img)
{
	struct blockmirror_disk *d = blockmirror_disk_open(img,
		BLOCKMIRROR_FORMAT_AUTO, BLOCKMIRROR_DISK_READONLY);
	uint8_t *buf = malloc(1 << 20);

	ck_assert_msg(d, "%s: %s", img, blockmirror_last_error());
	ck_assert_uint_eq(blockmirror_disk_get_size(d), DISK_SIZE);
	for (uint64_t off = 0; off < DISK_SIZE; off += 1 << 20) {
		uint64_t i = 0;

		ck_assert_int_eq(blockmirror_disk_read(d, buf, 1 << 20, off), 0);
		/* One assertion per MiB: each costs Check a message. */
		if (memcmp(buf, model + off, 1 << 20))
			while (buf[i] == model[off + i])
				i++;
		ck_assert_msg(!memcmp(buf, model + off, 1 << 20), "%s differs "
			      "from the disk at %" PRIu64, img, off + i);
	}
	free(buf);
	blockmirror_disk_close(d);
}

static void
read_model(struct blockmirror_disk *d)
{
	for (uint64_t off = 0; off < DISK_SIZE; off += 1 << 20)
		ck_assert_int_eq(blockmirror_disk_read(d, model + off, 1 << 20,
						       off), 0);
}

/* The replica's latest point reads as the disk now. */
static void
check_latest_is(struct blockmirror_disk *d)
{
	char *img = latest_image();

	read_model(d);
	check_image_is_model(img);
	free(img);
}

/* The bytes of 4 KiB blocks the last scribble touched. */
static uint64_t scribbled_blocks;

/* Random writes: data, zeroes, the disk's last block.  Returns the
 * bytes of 64 KiB granules touched (scribbled_blocks: of 4 KiB
 * blocks). */
static uint64_t
scribble(struct blockmirror_disk *d, uint64_t *rng, unsigned n)
{
	static bool touched[DISK_SIZE / 65536], btouched[DISK_SIZE / BLOCK];
	uint8_t buf[4 * BLOCK];
	uint64_t bytes = 0;

	memset(touched, 0, sizeof touched);
	memset(btouched, 0, sizeof btouched);
	scribbled_blocks = 0;
	for (unsigned i = 0; i < n; i++) {
		uint64_t len = BLOCK * (1 + rnd_range(rng, 4));
		uint64_t off = i == 0 ? DISK_SIZE - BLOCK :
			       BLOCK * rnd_range(rng, (DISK_SIZE - len) / BLOCK);

		if (i == 0)
			len = BLOCK;
		if (rnd_range(rng, 4) == 0) {
			ck_assert_int_eq(blockmirror_disk_write_zeroes(d, len,
								       off, 0),
					 0);
		} else {
			for (size_t k = 0; k < len; k++)
				buf[k] = (uint8_t)rnd(rng);
			ck_assert_int_eq(blockmirror_disk_write(d, buf, len,
								off, 0), 0);
		}
		for (uint64_t g = off / 65536; g <= (off + len - 1) / 65536;
		     g++)
			if (!touched[g]) {
				touched[g] = true;
				bytes += 65536;
			}
		for (uint64_t b = off / BLOCK; b < (off + len) / BLOCK; b++)
			if (!btouched[b]) {
				btouched[b] = true;
				scribbled_blocks += BLOCK;
			}
	}
	return bytes;
}

START_TEST(test_cycles_are_instants)
{
	struct blockmirror_replica_server *rs = start_replica(true, NULL);
	struct blockmirror_disk *d = open_tracked(image);
	struct blockmirror_replication_info info = { .size = sizeof info };
	struct blockmirror_replication *r;
	uint64_t rng = 17, point = 0, prev = 0;
	int err;

	r = start_replication(d, 0, &err);
	ck_assert_msg(err == 0, "%s", blockmirror_last_error());
	ck_assert_int_eq(blockmirror_replication_sync(r, 30000, &point), 0);
	check_latest_is(d);
	for (int round = 0; round < 6; round++) {
		uint64_t touched = scribble(d, &rng, 40);

		prev = point;
		ck_assert_int_eq(blockmirror_replication_sync(r, 30000,
							      &point), 0);
		ck_assert_uint_gt(point, prev);
		check_latest_is(d);
		ck_assert_int_eq(blockmirror_replication_query(r, &info), 0);
		ck_assert_msg(info.last_cycle_bytes <= touched,
			      "cycle sent %" PRIu64 " bytes for %" PRIu64
			      " bytes of granules written",
			      info.last_cycle_bytes, touched);
	}
	ck_assert_uint_eq(info.cycles_failed, 0);
	blockmirror_replication_stop(r);
	blockmirror_disk_close(d);
	blockmirror_replica_server_stop(rs);
}
END_TEST

START_TEST(test_seed_sends_differences)
{
	char seed[192], cmd[512];
	struct blockmirror_replica_server *rs;
	struct blockmirror_disk *d;
	struct blockmirror_replication_info info = { .size = sizeof info };
	struct blockmirror_replication *r;
	uint64_t rng = 5, touched;
	int err;

	/* The seed: a copy of the disk in the replica's directory; then the
	 * disk moves on. */
	snprintf(seed, sizeof seed, "%s/seed.raw", rdir);
	snprintf(cmd, sizeof cmd, "mkdir -p %s && cp --sparse=always %s %s",
		 rdir, image, seed);
	ck_assert_int_eq(system(cmd), 0);
	d = open_tracked(image);
	/* _i = 1: granules of 1 MiB, larger than a send slot: each digest
	 * is taken in pieces, and what differs goes as whole granules (at
	 * most 3 written, of 8). */
	touched = scribble(d, &rng, _i ? 3 : 20);
	replica_granularity = _i ? 1u << 20 : 0;
	rs = start_replica(true, seed);
	replica_granularity = 0;
	r = start_replication(d, 0, &err);
	ck_assert_msg(err == 0, "%s", blockmirror_last_error());
	ck_assert_int_eq(blockmirror_replication_sync(r, 30000, NULL), 0);
	ck_assert_int_eq(blockmirror_replication_query(r, &info), 0);
	if (_i)
		ck_assert_msg(info.bytes_sent > 0 &&
			      info.bytes_sent < DISK_SIZE &&
			      info.bytes_sent % (1u << 20) == 0,
			      "seeding in 1 MiB granules sent %" PRIu64
			      " bytes", info.bytes_sent);
	else
		ck_assert_msg(info.bytes_sent <= touched, "seeding sent %"
			      PRIu64 " bytes for %" PRIu64 " bytes of "
			      "granules written", info.bytes_sent, touched);
	check_latest_is(d);
	blockmirror_replication_stop(r);
	blockmirror_disk_close(d);
	blockmirror_replica_server_stop(rs);
}
END_TEST

START_TEST(test_verify_repairs)
{
	struct blockmirror_replica_server *rs = start_replica(true, NULL);
	struct blockmirror_disk *d = open_tracked(image), *p;
	struct blockmirror_replication_check c = { .size = sizeof c };
	struct blockmirror_replication *r;
	uint8_t junk[BLOCK];
	char *img;
	int err;

	r = start_replication(d, 0, &err);
	ck_assert_msg(err == 0, "%s", blockmirror_last_error());
	ck_assert_int_eq(blockmirror_replication_sync(r, 30000, NULL), 0);
	ck_assert_int_eq(blockmirror_replication_verify(r, 30000, &c), 0);
	ck_assert_uint_eq(c.mismatches, 0);
	ck_assert_uint_gt(c.granules, 0);
	/* Damage the latest point behind replication's back. */
	img = latest_image();
	p = blockmirror_disk_open(img, BLOCKMIRROR_FORMAT_AUTO, 0);
	ck_assert_ptr_nonnull(p);
	memset(junk, 0xa5, sizeof junk);
	ck_assert_int_eq(blockmirror_disk_write(p, junk, BLOCK, 3 * 65536, 0),
			 0);
	blockmirror_disk_close(p);
	ck_assert_int_eq(blockmirror_replication_verify(r, 30000, &c), 0);
	ck_assert_uint_eq(c.mismatches, 1);
	ck_assert_uint_eq(c.first_mismatch, 3 * 65536);
	free(img);
	ck_assert_int_eq(blockmirror_replication_sync(r, 30000, NULL), 0);
	check_latest_is(d);
	ck_assert_int_eq(blockmirror_replication_verify(r, 30000, &c), 0);
	ck_assert_uint_eq(c.mismatches, 0);
	blockmirror_replication_stop(r);
	blockmirror_disk_close(d);
	blockmirror_replica_server_stop(rs);
}
END_TEST

START_TEST(test_other_disk_refused)
{
	struct blockmirror_replica_server *rs = start_replica(true, NULL);
	struct blockmirror_disk *d = open_tracked(image), *d2;
	struct blockmirror_replication *r;
	char other[192], cmd[512];
	int err;

	r = start_replication(d, 0, &err);
	ck_assert_int_eq(err, 0);
	ck_assert_int_eq(blockmirror_replication_sync(r, 30000, NULL), 0);
	blockmirror_replication_stop(r);

	snprintf(other, sizeof other, "%s/other.raw", dir);
	snprintf(cmd, sizeof cmd, "head -c %" PRIu64 " /dev/urandom > %s",
		 DISK_SIZE, other);
	ck_assert_int_eq(system(cmd), 0);
	d2 = open_tracked(other);
	/* Paired with the first disk: no other, whatever it asks. */
	r = start_replication(d2, BLOCKMIRROR_REPLICATION_RESYNC_OK |
			      BLOCKMIRROR_REPLICATION_DISCARD_DIVERGENT, &err);
	ck_assert_int_eq(err, -EEXIST);
	ck_assert_ptr_null(r);
	ck_assert_msg(strstr(blockmirror_last_error(), "paired with another"),
		      "%s", blockmirror_last_error());
	/* Released by its operator: still not without resync. */
	json_decref(replica_call("unpair", 0, &err));
	ck_assert_int_eq(err, 0);
	r = start_replication(d2, 0, &err);
	ck_assert_int_eq(err, -ESTALE);
	ck_assert_ptr_null(r);
	ck_assert_msg(strstr(blockmirror_last_error(), "another disk"), "%s",
		      blockmirror_last_error());
	r = start_replication(d2, BLOCKMIRROR_REPLICATION_RESYNC_OK, &err);
	ck_assert_msg(err == 0, "%s", blockmirror_last_error());
	ck_assert_int_eq(blockmirror_replication_sync(r, 30000, NULL), 0);
	check_latest_is(d2);
	blockmirror_replication_stop(r);
	blockmirror_disk_close(d2);
	blockmirror_disk_close(d);
	blockmirror_replica_server_stop(rs);
}
END_TEST

START_TEST(test_promotion_fences)
{
	struct blockmirror_replica_server *rs = start_replica(true, NULL);
	struct blockmirror_disk *d = open_tracked(image);
	struct blockmirror_replication_info info = { .size = sizeof info };
	struct blockmirror_replication *r;
	uint64_t rng = 9;
	json_t *res;
	int err;

	r = start_replication(d, 0, &err);
	ck_assert_int_eq(err, 0);
	ck_assert_int_eq(blockmirror_replication_sync(r, 30000, NULL), 0);
	res = replica_call("promote", 0, &err);
	ck_assert_msg(err == 0, "promote: %s", blockmirror_last_error());
	json_decref(res);
	scribble(d, &rng, 10);
	err = blockmirror_replication_sync(r, 10000, NULL);
	ck_assert_int_lt(err, 0);
	ck_assert_int_eq(blockmirror_replication_query(r, &info), 0);
	ck_assert_int_eq(info.state, BLOCKMIRROR_REPLICATION_FENCED);
	ck_assert_msg(strstr(info.message, "promoted"), "%s", info.message);
	blockmirror_replication_stop(r);
	blockmirror_disk_close(d);
	blockmirror_replica_server_stop(rs);
}
END_TEST

START_TEST(test_replica_restarts)
{
	struct blockmirror_replica_server *rs = start_replica(true, NULL);
	struct blockmirror_disk *d = open_tracked(image);
	struct blockmirror_replication *r;
	uint64_t rng = 3, point = 0, before;
	int err;

	r = start_replication(d, 0, &err);
	ck_assert_int_eq(err, 0);
	ck_assert_int_eq(blockmirror_replication_sync(r, 30000, &point), 0);
	blockmirror_replica_server_stop(rs);
	/* The guest goes on while the replica is away. */
	scribble(d, &rng, 30);
	sleep_ms(1500);
	rs = start_replica(false, NULL);
	before = point;
	ck_assert_int_eq(blockmirror_replication_sync(r, 30000, &point), 0);
	ck_assert_uint_gt(point, before);
	check_latest_is(d);
	blockmirror_replication_stop(r);
	blockmirror_disk_close(d);
	blockmirror_replica_server_stop(rs);
}
END_TEST

/* The primary died after a cycle's snapshot made checkpoint repl-N and
 * before the replica committed N: the next run numbers its cycle N again
 * and must neither trip over the leftover nor lose what it covered. */
START_TEST(test_leftover_checkpoint)
{
	struct blockmirror_replica_server *rs = start_replica(true, NULL);
	struct blockmirror_disk *d = open_tracked(image);
	struct blockmirror_replication *r;
	uint64_t rng = 11, point = 0;
	int err;

	interval_ms = 3600 * 1000; /* cycles only when asked */
	r = start_replication(d, 0, &err);
	ck_assert_int_eq(err, 0);
	ck_assert_int_eq(blockmirror_replication_sync(r, 30000, &point), 0);
	blockmirror_replication_stop(r);
	scribble(d, &rng, 10);
	{
		char cp[64];

		snprintf(cp, sizeof cp, "repl-%" PRIu64, point + 1);
		ck_assert_int_eq(blockmirror_checkpoint_create(d, cp), 0);
	}
	scribble(d, &rng, 10);
	r = start_replication(d, 0, &err);
	ck_assert_msg(err == 0, "%s", blockmirror_last_error());
	ck_assert_msg(blockmirror_replication_sync(r, 30000, NULL) == 0, "%s",
		      blockmirror_last_error());
	check_latest_is(d);
	blockmirror_replication_stop(r);
	blockmirror_disk_close(d);
	blockmirror_replica_server_stop(rs);
	interval_ms = 1000;
}
END_TEST

/* A peer that holds the key but not the fencing token: a hello that
 * claims to descend from the paired primary at the latest point is
 * refused (it could promote the replica otherwise), and the replica's
 * status and points are not its to read. */
START_TEST(test_forged_successor_refused)
{
	struct blockmirror_replica_server *rs = start_replica(true, NULL);
	struct blockmirror_disk *d = open_tracked(image);
	struct blockmirror_replication_info info = { .size = sizeof info };
	struct blockmirror_replication *r;
	struct bm_chan *c = NULL;
	json_t *req, *res = NULL;
	uint64_t point = 0;
	int err;

	r = start_replication(d, 0, &err);
	ck_assert_int_eq(err, 0);
	ck_assert_int_eq(blockmirror_replication_sync(r, 30000, &point), 0);
	ck_assert_int_eq(blockmirror_replication_query(r, &info), 0);
	ck_assert_int_eq(bm_chan_connect(rsock, NULL, NULL, 5000, &c), 0);
	req = json_pack("{s:s, s:i, s:I, s:s, s:[{s:s, s:I}], s:I}",
			"op", "hello", "version", 1, "size",
			(json_int_t)DISK_SIZE, "gen",
			"00000000-1111-2222-3333-444444444444", "history",
			"gen", info.generation, "point", (json_int_t)point,
			"committed", (json_int_t)0);
	err = bm_chan_call(c, req, &res, 10000);
	json_decref(req);
	ck_assert_int_eq(err, -EEXIST);
	ck_assert_ptr_null(res);
	req = json_pack("{s:s}", "op", "status");
	err = bm_chan_call(c, req, &res, 10000);
	json_decref(req);
	ck_assert_int_eq(err, -EINVAL);
	bm_chan_close(c);
	/* The real primary goes on. */
	ck_assert_int_eq(blockmirror_replication_sync(r, 30000, NULL), 0);
	blockmirror_replication_stop(r);
	blockmirror_disk_close(d);
	blockmirror_replica_server_stop(rs);
}
END_TEST

/* A call over the channel as a primary makes it (req consumed): the
 * answer, or NULL with *err. */
static json_t *
primary_call(struct bm_chan *c, json_t *req, int *err)
{
	json_t *res = NULL;

	*err = bm_chan_call(c, req, &res, 10000);
	json_decref(req);
	return res;
}

/*
 * A commit names the stage its cycle began: a commit late from a
 * connection the primary gave up on, arriving after the next begin of
 * the same point, is refused instead of committing that cycle's stage
 * half written.
 */
START_TEST(test_stale_commit_refused)
{
	struct blockmirror_replica_server *rs = start_replica(true, NULL);
	struct blockmirror_disk *d = open_tracked(image);
	struct blockmirror_replication *r;
	struct bm_chan *c = NULL;
	char state[200], first[64];
	const char *gen, *token;
	uint64_t point = 0;
	json_t *st, *res;
	int err;

	r = start_replication(d, 0, &err);
	ck_assert_int_eq(err, 0);
	ck_assert_int_eq(blockmirror_replication_sync(r, 30000, &point), 0);
	blockmirror_replication_stop(r);
	snprintf(state, sizeof state, "%s.bmirror-repl", image);
	st = json_load_file(state, 0, NULL);
	ck_assert_ptr_nonnull(st);
	gen = json_string_value(json_object_get(st, "gen"));
	token = json_string_value(json_object_get(st, "token"));
	ck_assert(gen && token);
	ck_assert_int_eq(bm_chan_connect(rsock, NULL, NULL, 5000, &c), 0);
	res = primary_call(c, json_pack("{s:s,s:i,s:I,s:s,s:[],s:I,s:s}",
					"op", "hello", "version", 1, "size",
					(json_int_t)DISK_SIZE, "gen", gen,
					"history", "committed",
					(json_int_t)point, "token", token),
			   &err);
	ck_assert_msg(err == 0, "hello: %s", blockmirror_last_error());
	json_decref(res);
	res = primary_call(c, json_pack("{s:s,s:I,s:s,s:s}", "op", "begin",
					"point", (json_int_t)point + 1, "gen",
					gen, "token", token), &err);
	ck_assert_msg(err == 0, "begin: %s", blockmirror_last_error());
	snprintf(first, sizeof first, "%s",
		 json_string_value(json_object_get(res, "export")));
	json_decref(res);
	/* The primary gave up and began the point again. */
	res = primary_call(c, json_pack("{s:s,s:I,s:s,s:s}", "op", "begin",
					"point", (json_int_t)point + 1, "gen",
					gen, "token", token), &err);
	ck_assert_int_eq(err, 0);
	ck_assert_str_ne(first, json_string_value(json_object_get(res,
								  "export")));
	json_decref(res);
	res = primary_call(c, json_pack("{s:s,s:I,s:s,s:s,s:I,s:I}", "op",
					"commit", "point",
					(json_int_t)point + 1, "token", token,
					"export", first, "instant_ns",
					(json_int_t)1, "bytes", (json_int_t)0),
			   &err);
	ck_assert_int_eq(err, -ENOENT);
	ck_assert_ptr_null(res);
	bm_chan_close(c);
	json_decref(st);
	/* The primary goes on from its point. */
	r = start_replication(d, 0, &err);
	ck_assert_int_eq(err, 0);
	ck_assert_int_eq(blockmirror_replication_sync(r, 30000, NULL), 0);
	check_latest_is(d);
	blockmirror_replication_stop(r);
	blockmirror_disk_close(d);
	blockmirror_replica_server_stop(rs);
}
END_TEST

/* A planned failover the replica refuses (a point is exported) leaves
 * the disk writable; one that succeeds fences it, and later calls say
 * so at once. */
START_TEST(test_failover_fence)
{
	struct blockmirror_replica_server *rs = start_replica(true, NULL);
	struct blockmirror_disk *d = open_tracked(image);
	struct blockmirror_replication *r;
	uint8_t buf[BLOCK] = { 1 };
	uint64_t point = 0, t0;
	int err;

	r = start_replication(d, 0, &err);
	ck_assert_int_eq(err, 0);
	ck_assert_int_eq(blockmirror_replication_sync(r, 30000, NULL), 0);
	json_decref(replica_call("export", 0, &err));
	ck_assert_int_eq(err, 0);
	err = blockmirror_replication_failover(r, 60000, &point);
	ck_assert_int_eq(err, -EBUSY);
	ck_assert_int_eq(blockmirror_disk_write(d, buf, BLOCK, 0, 0), 0);
	{
		json_t *res = replica_call("points", 0, &err);
		json_t *p0 = json_array_get(json_object_get(res, "points"), 0);

		ck_assert_int_eq(err, 0);
		json_decref(replica_call("unexport", (uint64_t)json_integer_value(
			json_object_get(p0, "point")), &err));
		ck_assert_int_eq(err, 0);
		json_decref(res);
	}
	ck_assert_int_eq(blockmirror_replication_failover(r, 60000, &point), 0);
	ck_assert_int_eq(blockmirror_disk_write(d, buf, BLOCK, 0, 0), -EROFS);
	t0 = now_ms();
	ck_assert_int_eq(blockmirror_replication_sync(r, 60000, NULL),
			 -EALREADY);
	ck_assert_uint_lt(now_ms() - t0, 2000);
	blockmirror_replication_stop(r);
	blockmirror_disk_close(d);
	blockmirror_replica_server_stop(rs);
}
END_TEST

struct waiting {
	struct blockmirror_replication *r;
	int err;
	uint64_t ms;
};

static void *
sync_main(void *arg)
{
	struct waiting *w = arg;
	uint64_t t0 = now_ms();

	w->err = blockmirror_replication_sync(w->r, 60000, NULL);
	w->ms = now_ms() - t0;
	return NULL;
}

/* A call waiting on replication returns when it is halted, and the
 * handle stays valid for it until stop. */
START_TEST(test_halt_releases_waiters)
{
	struct blockmirror_replica_server *rs = start_replica(true, NULL);
	struct blockmirror_disk *d = open_tracked(image);
	struct waiting w = { 0 };
	pthread_t t;
	int err;

	w.r = start_replication(d, 0, &err);
	ck_assert_int_eq(err, 0);
	ck_assert_int_eq(blockmirror_replication_sync(w.r, 30000, NULL), 0);
	blockmirror_replica_server_stop(rs); /* cycles fail from now on */
	ck_assert_int_eq(pthread_create(&t, NULL, sync_main, &w), 0);
	sleep_ms(300);
	blockmirror_replication_halt(w.r);
	pthread_join(t, NULL);
	ck_assert_int_lt(w.err, 0);
	ck_assert_uint_lt(w.ms, 10000);
	/* A call after the halt returns at once. */
	ck_assert_int_lt(blockmirror_replication_sync(w.r, 60000, NULL), 0);
	blockmirror_replication_stop(w.r);
	blockmirror_disk_close(d);
}
END_TEST

/* An unplanned failover: the replica promoted at `point` (newimg: the
 * new primary's disk), its server stopped. */
static void
promote_and_stop(struct blockmirror_replica_server *rs, uint64_t point,
		 char *newimg, size_t len)
{
	int err;
	json_t *res = replica_call("promote", point, &err);

	ck_assert_msg(err == 0, "promote: %s", blockmirror_last_error());
	snprintf(newimg, len, "%s",
		 json_string_value(json_object_get(res, "image")));
	json_decref(res);
	blockmirror_replica_server_stop(rs);
}

/* The primary died after the replica committed point P and before its
 * own state file said so; the replica was promoted at P; the old disk
 * comes back as its replica: it holds P (its checkpoint repl-P says so,
 * with nothing written since), so replication goes on without a split
 * brain and sends nothing. */
START_TEST(test_adopt_newer_than_state)
{
	struct blockmirror_replica_server *rs = start_replica(true, NULL);
	struct blockmirror_disk *d = open_tracked(image), *nd;
	struct blockmirror_replication_info info = { .size = sizeof info };
	struct blockmirror_replication *r;
	struct blockmirror_replica_server_options o2;
	struct blockmirror_replica_server *rs2 = NULL;
	char state[200], newimg[4096], sock2[200], ctl2[200];
	uint64_t rng = 21, point = 0;
	json_t *st;
	int err;

	interval_ms = 3600 * 1000;
	r = start_replication(d, 0, &err);
	ck_assert_int_eq(err, 0);
	ck_assert_int_eq(blockmirror_replication_sync(r, 30000, NULL), 0);
	scribble(d, &rng, 10);
	ck_assert_int_eq(blockmirror_replication_sync(r, 30000, &point), 0);
	blockmirror_replication_stop(r);
	blockmirror_disk_close(d);
	/* The state file one point behind, as if the write had been lost. */
	snprintf(state, sizeof state, "%s.bmirror-repl", image);
	st = json_load_file(state, 0, NULL);
	ck_assert_ptr_nonnull(st);
	json_object_set_new(st, "committed", json_integer(
				    (json_int_t)point - 1));
	ck_assert_int_eq(json_dump_file(st, state, 0), 0);
	json_decref(st);
	promote_and_stop(rs, point, newimg, sizeof newimg);

	/* The old disk, in its own directory, as the new one's replica. */
	snprintf(sock2, sizeof sock2, "unix:%s/repl2.sock", dir);
	snprintf(ctl2, sizeof ctl2, "%s/ctl2.sock", dir);
	o2 = (struct blockmirror_replica_server_options){
		.size = sizeof o2, .dir = dir, .listen = sock2,
		.control = ctl2, .create = true, .base = image,
	};
	ck_assert_msg(blockmirror_replica_server_start(&o2, &rs2) == 0, "%s",
		      blockmirror_last_error());
	nd = open_tracked(newimg);
	{
		struct blockmirror_replication_options o = {
			.size = sizeof o, .replica = sock2,
			.interval_ms = 3600 * 1000,
		};

		err = blockmirror_replication_start(nd, &o, &r);
		ck_assert_msg(err == 0, "%s", blockmirror_last_error());
	}
	ck_assert_int_eq(blockmirror_replication_sync(r, 30000, NULL), 0);
	ck_assert_int_eq(blockmirror_replication_query(r, &info), 0);
	ck_assert_uint_eq(info.bytes_sent, 0);
	blockmirror_replication_stop(r);
	blockmirror_disk_close(nd);
	blockmirror_replica_server_stop(rs2);
	interval_ms = 1000;
}
END_TEST

/*
 * A split brain: the disk replicated to a point P, then written by `n`
 * writes no cycle sends (*divergent: their granules' bytes); the replica
 * promoted at P (newimg: the new primary's disk) and stopped.
 */
static void
split_brain(uint64_t *rng, unsigned n, uint64_t *divergent, char *newimg,
	    size_t len)
{
	struct blockmirror_replica_server *rs = start_replica(true, NULL);
	struct blockmirror_disk *d = open_tracked(image);
	struct blockmirror_replication *r;
	uint64_t point = 0;
	int err;

	r = start_replication(d, 0, &err);
	ck_assert_int_eq(err, 0);
	scribble(d, rng, 10);
	ck_assert_int_eq(blockmirror_replication_sync(r, 30000, &point), 0);
	blockmirror_replication_stop(r);
	*divergent = scribble(d, rng, n);
	blockmirror_disk_close(d);
	promote_and_stop(rs, point, newimg, len);
}

/* Replication of the new primary allowed to discard the divergence, and
 * its first point committed. */
static struct blockmirror_replication *
resync_discarding(struct blockmirror_disk *nd)
{
	struct blockmirror_replication *r;
	int err;

	r = start_replication(nd, BLOCKMIRROR_REPLICATION_DISCARD_DIVERGENT,
			      &err);
	ck_assert_msg(err == 0, "%s", blockmirror_last_error());
	ck_assert_msg(blockmirror_replication_sync(r, 60000, NULL) == 0, "%s",
		      blockmirror_last_error());
	return r;
}

/* After the resync: the replica's latest point is the new primary's
 * disk; everything stopped. */
static void
resynced(struct blockmirror_replication *r, struct blockmirror_disk *nd,
	 struct blockmirror_replica_server *rs2)
{
	check_latest_is(nd);
	blockmirror_replication_stop(r);
	blockmirror_disk_close(nd);
	blockmirror_replica_server_stop(rs2);
	interval_ms = 1000;
}

/* A cycle's bytes, with the point it committed. */
static uint64_t
cycle_bytes(struct blockmirror_replication *r)
{
	struct blockmirror_replication_info info = { .size = sizeof info };

	ck_assert_int_eq(blockmirror_replication_sync(r, 30000, NULL), 0);
	ck_assert_int_eq(blockmirror_replication_query(r, &info), 0);
	return info.last_cycle_bytes;
}

/*
 * The disk's record keeps a fine, in-memory bitmap for replication: a
 * cycle sends the 4 KiB blocks written since the last point, not their
 * 64 KiB granules.  Replication started again (the fine record starts
 * with it) sends at most whole granules once, then blocks again; every
 * point equals the disk.
 */
START_TEST(test_sends_blocks)
{
	struct blockmirror_replica_server *rs = start_replica(true, NULL);
	struct blockmirror_disk *d = open_tracked(image);
	struct blockmirror_replication_info info = { .size = sizeof info };
	struct blockmirror_replication *r;
	uint64_t rng = 19, granules, got;
	int err;

	interval_ms = 3600 * 1000; /* the syncs' cycles only */
	r = start_replication(d, 0, &err);
	ck_assert_msg(err == 0, "%s", blockmirror_last_error());
	ck_assert_int_eq(blockmirror_replication_sync(r, 30000, NULL), 0);
	for (int round = 0; round < 3; round++) {
		granules = scribble(d, &rng, 30);
		got = cycle_bytes(r);
		ck_assert_msg(got == scribbled_blocks, "round %d: sent %"
			      PRIu64 " bytes for %" PRIu64 " bytes of 4 KiB "
			      "blocks written (%" PRIu64 " of granules)",
			      round, got, scribbled_blocks, granules);
		ck_assert_uint_lt(got, granules);
		check_latest_is(d);
	}
	blockmirror_replication_stop(r);
	granules = scribble(d, &rng, 30);
	r = start_replication(d, 0, &err);
	ck_assert_msg(err == 0, "%s", blockmirror_last_error());
	/* Its first cycle starts at once, the sync's may be another. */
	cycle_bytes(r);
	ck_assert_int_eq(blockmirror_replication_query(r, &info), 0);
	ck_assert_uint_ge(info.bytes_sent, scribbled_blocks);
	ck_assert_uint_le(info.bytes_sent, granules);
	check_latest_is(d);
	scribble(d, &rng, 30);
	ck_assert_uint_eq(cycle_bytes(r), scribbled_blocks);
	resynced(r, d, rs);
}
END_TEST

/* The old disk, in the test's directory, as the new primary's replica,
 * on the first replica's sockets. */
static struct blockmirror_replica_server *
start_old_as_replica(void)
{
	struct blockmirror_replica_server_options o = {
		.size = sizeof o, .dir = dir, .listen = rsock,
		.control = rctl, .create = true, .base = image,
	};
	struct blockmirror_replica_server *s = NULL;

	ck_assert_msg(blockmirror_replica_server_start(&o, &s) == 0, "%s",
		      blockmirror_last_error());
	return s;
}

/*
 * A split brain: the old primary wrote after its last committed point P
 * and comes back as the replica of the disk promoted at P.  With
 * DISCARD_DIVERGENT its writes are overwritten, and that holds when the
 * first resync cycle fails: the next one, after a new hello, must still
 * resync (the replica's point P is the old disk, divergent writes
 * included), not go on incrementally from P as if nothing differed.
 */
START_TEST(test_split_brain_retry)
{
	struct blockmirror_replica_server *rs2;
	struct blockmirror_replication *r;
	struct blockmirror_disk *nd;
	static struct bm_fault_rules rules;
	char newimg[4096], layer[200];
	uint64_t rng = 33, divergent;

	interval_ms = 3600 * 1000;
	split_brain(&rng, 10, &divergent, newimg, sizeof newimg);
	/* The old disk as the new one's replica; the first write into its
	 * staging layer fails.  _i = 0: what the old disk's record said
	 * is lost, the resync compares digests; 1: it goes by the records. */
	rs2 = start_old_as_replica();
	if (_i == 0) {
		snprintf(layer, sizeof layer, "%s/divergent.bits", dir);
		ck_assert_int_eq(unlink(layer), 0);
	}
	snprintf(layer, sizeof layer, "%s/layer-00000001.qcow2", dir);
	memset(&rules, 0, sizeof rules);
	rules.write_errno = EIO;
	rules.write_err_count = 1;
	ck_assert_int_eq(bm_fault_register(layer, &rules), 0);
	nd = open_tracked(newimg);
	/* A failed cycle is retried within the sync's time. */
	r = resync_discarding(nd);
	ck_assert_uint_gt(atomic_load(&rules.failures), 0);
	bm_fault_unregister(layer);
	resynced(r, nd, rs2);
}
END_TEST

/*
 * The replica crashed while it was made from the old disk, after the
 * adopted point and before its pairing file: reopened, it does not know
 * how the disk diverged, so the new primary is refused as a split brain
 * and, allowed to discard, resyncs; never an incremental cycle over the
 * divergent disk.
 */
START_TEST(test_split_brain_pairing_lost)
{
	struct blockmirror_replica_server_options o = {
		.size = sizeof o, .dir = dir, .listen = rsock, .control = rctl,
	};
	struct blockmirror_replica_server *rs2;
	struct blockmirror_replication *r;
	struct blockmirror_disk *nd;
	char newimg[4096], path[200];
	uint64_t rng = 55, divergent;
	int err;

	interval_ms = 3600 * 1000;
	split_brain(&rng, 6, &divergent, newimg, sizeof newimg);
	rs2 = start_old_as_replica();
	blockmirror_replica_server_stop(rs2);
	snprintf(path, sizeof path, "%s/pairing.json", dir);
	ck_assert_int_eq(unlink(path), 0);
	ck_assert_msg(blockmirror_replica_server_start(&o, &rs2) == 0, "%s",
		      blockmirror_last_error());
	nd = open_tracked(newimg);
	r = start_replication(nd, 0, &err);
	ck_assert_int_eq(err, -EEXIST);
	r = resync_discarding(nd);
	resynced(r, nd, rs2);
}
END_TEST

/*
 * A split brain resynced by the records: the old primary wrote after its
 * last committed point P, the replica was promoted at P, and the new
 * primary wrote too.  The old disk, back as the replica, kept what its
 * record says it wrote since P; the resync sends the union of that and
 * the new primary's changes, reads nothing of the old disk (no digests
 * over it), sends no more than the two sets, and leaves the replica equal
 * to the new primary.
 */
START_TEST(test_split_brain_by_record)
{
	struct blockmirror_replication_info info = { .size = sizeof info };
	struct blockmirror_replica_server *rs2;
	struct blockmirror_replication *r;
	struct blockmirror_disk *nd;
	static struct bm_fault_rules base;
	char newimg[4096];
	uint64_t rng = 44, theirs, ours, reads;
	int err;

	interval_ms = 3600 * 1000;
	split_brain(&rng, 6, &theirs, newimg, sizeof newimg);
	memset(&base, 0, sizeof base);
	ck_assert_int_eq(bm_fault_register(image, &base), 0);
	rs2 = start_old_as_replica();
	reads = atomic_load(&base.reads);
	nd = open_tracked(newimg);
	ours = scribble(nd, &rng, 6);
	r = start_replication(nd, 0, &err);
	ck_assert_int_eq(err, -EEXIST); /* a split brain, refused */
	r = resync_discarding(nd);
	ck_assert_int_eq(blockmirror_replication_query(r, &info), 0);
	ck_assert_msg(atomic_load(&base.reads) == reads, "the resync read "
		      "the old disk (%" PRIu64 " reads): digests, not the "
		      "records", atomic_load(&base.reads) - reads);
	ck_assert_msg(info.bytes_sent > 0 && info.bytes_sent <= theirs + ours,
		      "sent %" PRIu64 " bytes for %" PRIu64 " + %" PRIu64
		      " changed", info.bytes_sent, theirs, ours);
	bm_fault_unregister(image);
	resynced(r, nd, rs2);
}
END_TEST

/*
 * Points taken while writers write (the cycle's snapshot holds only what
 * changed and lets go of each range as it is sent, while the writers'
 * copy-before-writes race with it).  Writer w owns every other group of
 * four 4 KiB blocks and stamps a block with its number and a version in
 * every word, so versions only grow.  Before a sync the test notes the
 * newest version acknowledged per block (lo), after it the newest started
 * (hi): every block of the point must be one whole stamp with lo <=
 * version <= hi, or, never written before the sync returned, the block
 * as it was at the start.  Tracked at 64 KiB (the snapshot's chunk) and
 * at 4 KiB (chunks the sender reads in pieces).
 */
#define NB (DISK_SIZE / BLOCK)
#define PW 2

struct point_writer {
	struct blockmirror_disk *d;
	unsigned id;
	atomic_bool *stop;
	_Atomic uint64_t *acked, *started;
	int err;
};

static void
pw_stamp(uint8_t *buf, uint64_t block, uint64_t version)
{
	uint64_t v = block << 32 | version;

	for (unsigned i = 0; i < BLOCK / 8; i++)
		memcpy(buf + i * 8, &v, 8);
}

static void *
pw_main(void *arg)
{
	struct point_writer *w = arg;
	uint8_t *buf = aligned_alloc(BLOCK, 4 * BLOCK);
	uint64_t rng = 1000 + w->id;

	while (!atomic_load(w->stop) && !w->err) {
		uint64_t g = rnd_range(&rng, NB / 4 / PW) * PW + w->id;
		uint64_t first = g * 4 + rnd_range(&rng, 4);
		uint64_t n = 1 + rnd_range(&rng, 4 - first % 4), v[4];

		for (uint64_t i = 0; i < n; i++) {
			v[i] = atomic_load(&w->started[first + i]) + 1;
			pw_stamp(buf + i * BLOCK, first + i, v[i]);
			atomic_store(&w->started[first + i], v[i]);
		}
		w->err = blockmirror_disk_write(w->d, buf, n * BLOCK,
						first * BLOCK, 0);
		for (uint64_t i = 0; !w->err && i < n; i++)
			atomic_store(&w->acked[first + i], v[i]);
		sleep_ms(1);
	}
	free(buf);
	return NULL;
}

START_TEST(test_points_under_writers)
{
	static _Atomic uint64_t acked[NB], started[NB];
	static uint64_t lo[NB], hi[NB];
	struct blockmirror_replica_server *rs = start_replica(true, NULL);
	struct blockmirror_disk *d = open_tracked_by(image, _i ? 4096 : 0), *p;
	struct blockmirror_replication_info info = { .size = sizeof info };
	struct blockmirror_replication *r;
	struct point_writer w[PW];
	pthread_t t[PW];
	atomic_bool stop = false;
	uint8_t *buf = malloc(DISK_SIZE);
	uint64_t point = 0;
	int err;

	read_model(d);
	interval_ms = 3600 * 1000; /* cycles only when asked */
	r = start_replication(d, 0, &err);
	interval_ms = 1000;
	ck_assert_msg(err == 0, "%s", blockmirror_last_error());
	ck_assert_int_eq(blockmirror_replication_sync(r, 30000, &point), 0);
	for (unsigned i = 0; i < PW; i++) {
		w[i] = (struct point_writer){ .d = d, .id = i, .stop = &stop,
					      .acked = acked,
					      .started = started };
		ck_assert_int_eq(pthread_create(&t[i], NULL, pw_main, &w[i]),
				 0);
	}
	for (int round = 0; round < 8; round++) {
		char *img;

		sleep_ms(50);
		for (uint64_t b = 0; b < NB; b++)
			lo[b] = atomic_load(&acked[b]);
		ck_assert_msg(blockmirror_replication_sync(r, 30000,
							   &point) == 0,
			      "%s", blockmirror_last_error());
		for (uint64_t b = 0; b < NB; b++)
			hi[b] = atomic_load(&started[b]);
		img = latest_image();
		p = blockmirror_disk_open(img, BLOCKMIRROR_FORMAT_AUTO,
					  BLOCKMIRROR_DISK_READONLY);
		ck_assert_msg(p, "%s: %s", img, blockmirror_last_error());
		ck_assert_int_eq(blockmirror_disk_read(p, buf, DISK_SIZE, 0),
				 0);
		blockmirror_disk_close(p);
		for (uint64_t b = 0; b < NB; b++) {
			const uint8_t *blk = buf + b * BLOCK;
			uint64_t v, k;

			memcpy(&v, blk, 8);
			for (k = 8; k < BLOCK && !memcmp(blk + k, &v, 8); k += 8)
				;
			if (lo[b] == 0 &&
			    !memcmp(blk, model + b * BLOCK, BLOCK))
				continue;
			ck_assert_msg(k == BLOCK && v >> 32 == b &&
				      (v & 0xffffffffu) >= lo[b] &&
				      (v & 0xffffffffu) <= hi[b],
				      "point %" PRIu64 ", block %" PRIu64
				      ": not the instant (version %" PRIu64
				      ", acknowledged %" PRIu64 ", started %"
				      PRIu64 ")", point, b,
				      k == BLOCK && v >> 32 == b
				      ? v & 0xffffffffu : UINT64_MAX,
				      lo[b], hi[b]);
		}
		free(img);
	}
	atomic_store(&stop, true);
	for (unsigned i = 0; i < PW; i++) {
		pthread_join(t[i], NULL);
		ck_assert_msg(w[i].err == 0, "writer %u: %s", i,
			      strerror(-w[i].err));
	}
	ck_assert_int_eq(blockmirror_replication_query(r, &info), 0);
	ck_assert_uint_eq(info.cycles_failed, 0);
	blockmirror_replication_stop(r);
	blockmirror_disk_close(d);
	blockmirror_replica_server_stop(rs);
	free(buf);
}
END_TEST

int
main(void)
{
	Suite *s = suite_create("replication");
	TCase *tc = tcase_create("replication");

	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_set_timeout(tc, 120);
	tcase_add_test(tc, test_cycles_are_instants);
	tcase_add_test(tc, test_sends_blocks);
	tcase_add_loop_test(tc, test_points_under_writers, 0, 2);
	tcase_add_loop_test(tc, test_seed_sends_differences, 0, 2);
	tcase_add_test(tc, test_verify_repairs);
	tcase_add_test(tc, test_other_disk_refused);
	tcase_add_test(tc, test_promotion_fences);
	tcase_add_test(tc, test_replica_restarts);
	tcase_add_test(tc, test_leftover_checkpoint);
	tcase_add_test(tc, test_forged_successor_refused);
	tcase_add_test(tc, test_stale_commit_refused);
	tcase_add_test(tc, test_failover_fence);
	tcase_add_test(tc, test_halt_releases_waiters);
	tcase_add_test(tc, test_adopt_newer_than_state);
	tcase_add_loop_test(tc, test_split_brain_retry, 0, 2);
	tcase_add_test(tc, test_split_brain_by_record);
	tcase_add_test(tc, test_split_brain_pairing_lost);
	suite_add_tcase(s, tc);
	return run_suite(s) ? EXIT_FAILURE : EXIT_SUCCESS;
}
