/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Fuzz target for the backing file policy (lib/backing.c, backing.h): the
 * names a hostile image records as its backing file.
 *
 * The input is NUL-separated fields: a mode byte, then the name, then
 * for the pure check the referencing image's directory and the allowed
 * directories.
 *
 * - Every input: bm_backing_name_check with those directories, against a
 *   reference (a stack of components) written differently: the folded
 *   path must match it, be absolute and hold no ".", ".." or empty
 *   components; a relative name is accepted only inside a directory; a
 *   name with control bytes or a URI never is.
 * - Odd mode bytes: the whole policy, with I/O, on a fixed directory tree
 *   made once under $TMPDIR (an image, a file, a subdirectory, symbolic
 *   links in and out, a FIFO, a file outside): whatever bm_backing_check
 *   accepts must be a regular file inside the tree once resolved.
 */
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "backing.h"
#include "errors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define MAX_FIELDS 8

/* The reference fold: components on a stack. */
static int
reference_fold(const char *dir, const char *name, char *out, size_t size)
{
	size_t blen = strlen(dir) + strlen(name) + 2, n = 0, len = 0;
	char *buf = malloc(blen), **comp = malloc(blen * sizeof *comp);
	char *save = NULL, *tok;
	int r = 0;

	if (!buf || !comp) {
		free(buf);
		free(comp);
		return -1;
	}
	if (name[0] == '/')
		snprintf(buf, blen, "%s", name);
	else
		snprintf(buf, blen, "%s/%s", dir, name);
	for (tok = strtok_r(buf, "/", &save); tok;
	     tok = strtok_r(NULL, "/", &save)) {
		if (strcmp(tok, ".") == 0)
			continue;
		if (strcmp(tok, "..") == 0) {
			if (n)
				n--;
			continue;
		}
		comp[n++] = tok;
	}
	for (size_t i = 0; i < n && r == 0; i++) {
		size_t c = strlen(comp[i]);

		if (len + 1 + c >= size) {
			r = -1;
			break;
		}
		out[len++] = '/';
		memcpy(out + len, comp[i], c);
		len += c;
	}
	if (len == 0)
		out[len++] = '/';
	out[len] = '\0';
	free(buf);
	free(comp);
	return r;
}

static void
check_folded(const char *p)
{
	size_t len = strlen(p);

	if (p[0] != '/' || strstr(p, "//") || strstr(p, "/./") ||
	    strstr(p, "/../"))
		abort();
	if (len > 1 && (p[len - 1] == '/' ||
			(len >= 2 && strcmp(p + len - 2, "/.") == 0) ||
			(len >= 3 && strcmp(p + len - 3, "/..") == 0)))
		abort();
}

static void
pure_check(char **field, size_t nf)
{
	struct bm_backing_dir dirs[MAX_FIELDS];
	char out[PATH_MAX], ref[PATH_MAX];
	const char *name = field[0], *dir = nf > 1 ? field[1] : "/", *why;
	size_t n = 0;
	bool ctl = false;
	int r;

	for (size_t i = 2; i < nf; i++)
		if (field[i][0] == '/')
			dirs[n++] = (struct bm_backing_dir){ .path = field[i] };
	for (const char *c = name; *c; c++)
		ctl |= (unsigned char)*c < 0x20 || *c == 0x7f;

	r = bm_backing_name_check(dirs, n, dir, name, out, sizeof out, &why);
	if (r < 0) {
		if (!why)
			abort();
		return;
	}
	if (r > 1 || ctl || !name[0] || strstr(name, "://") ||
	    strncmp(name, "json:", 5) == 0 || (dir[0] != '/' && name[0] != '/'))
		abort();
	check_folded(out);
	if (reference_fold(dir, name, ref, sizeof ref) == 0 &&
	    strcmp(ref, out) != 0)
		abort();
	if ((r == 0) != (bm_backing_dir_find(dirs, n, out, false) >= 0))
		abort();
	if (r == 1 && name[0] != '/')
		abort();
}

/* ---- the whole policy on a directory tree ------------------------------ */

static char tree[PATH_MAX], top[PATH_MAX + 32], outside[PATH_MAX + 32];

static void
remove_tree(void)
{
	char cmd[PATH_MAX + 32];

	if (tree[0]) {
		snprintf(cmd, sizeof cmd, "rm -rf '%s'", tree);
		if (system(cmd) != 0)
			fprintf(stderr, "cannot remove %s\n", tree);
	}
}

static bool
make_tree(void)
{
	const char *tmp = getenv("TMPDIR");
	char p[PATH_MAX + 64], *real;
	FILE *f;

	snprintf(p, sizeof p, "%s/fuzz-backing.XXXXXX", tmp ? tmp : "/tmp");
	if (!mkdtemp(p) || !(real = realpath(p, NULL)))
		return false;
	snprintf(tree, sizeof tree, "%s", real);
	free(real);
	atexit(remove_tree);
	snprintf(outside, sizeof outside, "%s/outside", tree);
	snprintf(p, sizeof p, "%s/vm", tree);
	if (mkdir(outside, 0700) < 0 || mkdir(p, 0700) < 0)
		return false;
	snprintf(top, sizeof top, "%s/vm/top.qcow2", tree);
	const char *files[] = { "vm/top.qcow2", "vm/in.raw", "outside/secret" };
	for (size_t i = 0; i < 3; i++) {
		snprintf(p, sizeof p, "%s/%s", tree, files[i]);
		if (!(f = fopen(p, "w")))
			return false;
		fputs("x", f);
		fclose(f);
	}
	snprintf(p, sizeof p, "%s/vm/sub", tree);
	if (mkdir(p, 0700) < 0)
		return false;
	snprintf(p, sizeof p, "%s/vm/fifo", tree);
	if (mkfifo(p, 0600) < 0)
		return false;
	snprintf(p, sizeof p, "%s/vm/link-in", tree);
	if (symlink("in.raw", p) < 0)
		return false;
	snprintf(p, sizeof p, "%s/vm/link-out", tree);
	if (symlink("../outside/secret", p) < 0)
		return false;
	snprintf(p, sizeof p, "%s/vm/sub/up", tree);
	if (symlink("../..", p) < 0)
		return false;
	return true;
}

static void
tree_check(const char *name)
{
	static int made = -1;
	char vm[PATH_MAX + 8], *real = NULL;
	struct stat st;
	size_t len;

	if (made < 0) {
		/* The operator's allow lists would widen the tree. */
		unsetenv("BLOCKMIRROR_ALLOW_BACKING_DIRS");
		unsetenv("BLOCKMIRROR_ALLOW_BACKING_DEVICES");
		made = make_tree();
	}
	if (!made)
		return;
	if (bm_backing_check(top, name, &real) < 0) {
		if (real || !blockmirror_last_error())
			abort();
		return;
	}
	snprintf(vm, sizeof vm, "%s/vm/", tree);
	len = strlen(vm);
	if (!real || strncmp(real, vm, len) != 0 || stat(real, &st) < 0 ||
	    !S_ISREG(st.st_mode))
		abort();
	free(real);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char *s, *field[MAX_FIELDS];
	size_t nf = 0;
	uint8_t mode;

	if (size < 1 || size > 3 * PATH_MAX)
		return 0;
	mode = data[0];
	s = malloc(size);
	if (!s)
		return 0;
	memcpy(s, data + 1, size - 1);
	s[size - 1] = '\0';
	/* NUL-separated fields of the rest. */
	field[nf++] = s;
	for (size_t i = 0; i + 1 < size && nf < MAX_FIELDS; i++)
		if (s[i] == '\0' && i + 1 < size - 1)
			field[nf++] = s + i + 1;
	pure_check(field, nf);
	if (mode & 1)
		tree_check(field[0]);
	free(s);
	bm_error_clear();
	return 0;
}
