/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Replay a fuzz target's corpus without libFuzzer: every file named on
 * the command line, or found in a directory named there, goes through
 * LLVMFuzzerTestOneInput once.  A crash or a sanitizer report fails the
 * test; an empty corpus fails too, so a missing corpus cannot pass.
 */
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int
replay_file(const char *path)
{
	FILE *fp = fopen(path, "rb");
	uint8_t *buf = NULL;
	size_t len = 0, cap = 0, n;

	if (!fp) {
		perror(path);
		return -1;
	}
	do {
		if (len == cap) {
			cap = cap ? cap * 2 : 65536;
			buf = realloc(buf, cap);
			if (!buf) {
				fclose(fp);
				fprintf(stderr, "%s: out of memory\n", path);
				return -1;
			}
		}
		n = fread(buf + len, 1, cap - len, fp);
		len += n;
	} while (n > 0);
	fclose(fp);
	LLVMFuzzerTestOneInput(buf, len);
	free(buf);
	return 0;
}

static int
replay(const char *path, unsigned *count)
{
	struct stat st;
	struct dirent **list;
	int n, r = 0;

	if (stat(path, &st) < 0) {
		perror(path);
		return -1;
	}
	if (!S_ISDIR(st.st_mode)) {
		(*count)++;
		return replay_file(path);
	}
	n = scandir(path, &list, NULL, alphasort);
	if (n < 0) {
		perror(path);
		return -1;
	}
	for (int i = 0; i < n; i++) {
		char *child;

		if (list[i]->d_name[0] != '.' &&
		    asprintf(&child, "%s/%s", path, list[i]->d_name) >= 0) {
			if (replay(child, count) < 0)
				r = -1;
			free(child);
		}
		free(list[i]);
	}
	free(list);
	return r;
}

int
main(int argc, char **argv)
{
	unsigned count = 0;
	int r = 0;

	for (int i = 1; i < argc; i++)
		if (replay(argv[i], &count) < 0)
			r = 1;
	printf("replayed %u inputs\n", count);
	if (count == 0) {
		fprintf(stderr, "no inputs to replay\n");
		return 1;
	}
	return r;
}
