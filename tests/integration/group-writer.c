/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The "log, then data" guest of test-snapshot-group.sh, over NBD
 * (libnbd), and the check of a group's snapshots.
 *
 *   group-writer write URI_A URI_B PROGRESS STOP
 *     writes record k (k = 1, 2, ...) to disk A ("log"), waits for its
 *     acknowledgement, then writes record k to disk B ("data"), until
 *     the file STOP exists.  After each pair it stores k in the file
 *     PROGRESS (decimal, at offset 0), so a test can see the guest move.
 *   group-writer check URI_A URI_B
 *     reads both exports (a group's snapshots) and checks each against
 *     the model: record k sits in slot (k - 1) % SLOTS, so a disk whose
 *     newest record is m holds, in every slot, the newest record up to m
 *     that belongs there (zeroes where none was written yet).  Then the
 *     group's order: B never holds a record A does not (mB <= mA), and A
 *     is at most one ahead (mA <= mB + 1).  Prints "A=mA B=mB"; exit 1
 *     with the reason if anything is off.
 *
 * A record is a 512-byte sector: a magic, k, and k again in every other
 * word, so a torn or stray sector is seen.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <libnbd.h>

#define SECTOR 512u
#define SLOTS 2048u                   /* 1 MiB of records */
#define MAGIC UINT64_C(0x314f52474d4d42) /* "BMMGRO1" */

static struct nbd_handle *
open_uri(const char *uri)
{
	struct nbd_handle *h = nbd_create();

	if (!h || nbd_connect_uri(h, uri) < 0) {
		fprintf(stderr, "group-writer: %s: %s\n", uri, nbd_get_error());
		exit(1);
	}
	return h;
}

static void
fill(uint64_t *rec, uint64_t k)
{
	rec[0] = MAGIC;
	for (unsigned i = 1; i < SECTOR / 8; i++)
		rec[i] = k;
}

/* The record a sector holds: 0 for zeroes, -1 if it is not a record. */
static int64_t
record_of(const uint64_t *rec)
{
	uint64_t k = rec[1];

	if (rec[0] == 0) {
		for (unsigned i = 1; i < SECTOR / 8; i++)
			if (rec[i])
				return -1;
		return 0;
	}
	if (rec[0] != MAGIC || k == 0)
		return -1;
	for (unsigned i = 2; i < SECTOR / 8; i++)
		if (rec[i] != k)
			return -1;
	return (int64_t)k;
}

static int
do_write(const char *a, const char *b, const char *progress, const char *stop)
{
	struct nbd_handle *ha = open_uri(a), *hb = open_uri(b);
	uint64_t rec[SECTOR / 8];
	int fd = open(progress, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	char line[32];

	if (fd < 0) {
		perror(progress);
		return 1;
	}
	for (uint64_t k = 1;; k++) {
		uint64_t off = (k - 1) % SLOTS * SECTOR;
		int n;

		if (k % 16 == 0 && access(stop, F_OK) == 0)
			break;
		fill(rec, k);
		if (nbd_pwrite(ha, rec, SECTOR, off, 0) < 0 ||
		    nbd_pwrite(hb, rec, SECTOR, off, 0) < 0) {
			fprintf(stderr, "group-writer: record %" PRIu64 ": %s\n",
				k, nbd_get_error());
			return 1;
		}
		n = snprintf(line, sizeof line, "%-20" PRIu64 "\n", k);
		if (pwrite(fd, line, (size_t)n, 0) != n) {
			perror(progress);
			return 1;
		}
	}
	close(fd);
	nbd_shutdown(ha, 0);
	nbd_shutdown(hb, 0);
	nbd_close(ha);
	nbd_close(hb);
	return 0;
}

/* Read `uri` and check it against the model; its newest record, or -1
 * (said on stderr). */
static int64_t
check_disk(const char *what, const char *uri)
{
	struct nbd_handle *h = open_uri(uri);
	uint64_t *buf = malloc(SLOTS * SECTOR);
	int64_t newest = 0;

	if (!buf || nbd_pread(h, buf, SLOTS * SECTOR, 0, 0) < 0) {
		fprintf(stderr, "group-writer: %s: read: %s\n", uri,
			nbd_get_error());
		exit(1);
	}
	for (unsigned s = 0; s < SLOTS; s++) {
		int64_t k = record_of(buf + s * (SECTOR / 8));

		if (k < 0) {
			fprintf(stderr, "disk %s: slot %u holds no record\n",
				what, s);
			return -1;
		}
		if (k > newest)
			newest = k;
	}
	for (unsigned s = 0; s < SLOTS; s++) {
		int64_t k = record_of(buf + s * (SECTOR / 8));
		int64_t want = newest < (int64_t)s + 1 ? 0 :
			newest - (newest - 1 - (int64_t)s) % SLOTS;

		if (k != want) {
			fprintf(stderr, "disk %s: slot %u holds record %" PRId64
				", the model says %" PRId64 " (newest %" PRId64
				")\n", what, s, k, want, newest);
			return -1;
		}
	}
	nbd_shutdown(h, 0);
	nbd_close(h);
	free(buf);
	return newest;
}

static int
do_check(const char *a, const char *b)
{
	int64_t ma = check_disk("A", a), mb = check_disk("B", b);

	if (ma < 0 || mb < 0)
		return 1;
	printf("A=%" PRId64 " B=%" PRId64 "\n", ma, mb);
	if (mb > ma) {
		fprintf(stderr, "disk B's snapshot holds record %" PRId64
			" but disk A's only up to %" PRId64 ": not one "
			"instant\n", mb, ma);
		return 1;
	}
	if (ma > mb + 1) {
		fprintf(stderr, "disk A's snapshot is %" PRId64 " records "
			"ahead of disk B's (%" PRId64 " > %" PRId64 " + 1)\n",
			ma - mb, ma, mb);
		return 1;
	}
	return 0;
}

int
main(int argc, char **argv)
{
	if (argc == 6 && strcmp(argv[1], "write") == 0)
		return do_write(argv[2], argv[3], argv[4], argv[5]);
	if (argc == 4 && strcmp(argv[1], "check") == 0)
		return do_check(argv[2], argv[3]);
	fprintf(stderr, "usage: group-writer write URI_A URI_B PROGRESS STOP\n"
		"       group-writer check URI_A URI_B\n");
	return 2;
}
