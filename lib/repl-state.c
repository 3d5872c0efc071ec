/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The primary's replication state file (repl-state.h).
 */
#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uuid/uuid.h>

#include "durable.h"
#include "errors.h"
#include "repl-state.h"

void
bm_repl_new_uuid(char out[37])
{
	uuid_t u;

	uuid_generate_random(u);
	uuid_unparse_lower(u, out);
}

static int
copy_str(char *dst, size_t size, json_t *v, const char *path,
	 const char *key)
{
	const char *s = json_string_value(v);

	if (!s || strlen(s) >= size)
		return bm_error(-EINVAL, "%s: \"%s\" is missing or too long",
				path, key);
	strcpy(dst, s);
	return 0;
}

int
bm_repl_state_load(const char *path, struct bm_repl_state *st)
{
	json_error_t jerr;
	json_t *j = json_load_file(path, 0, &jerr), *h, *e;
	size_t i;
	int r;

	memset(st, 0, sizeof *st);
	if (!j) {
		FILE *f = fopen(path, "r");

		if (!f && errno == ENOENT)
			return -ENOENT;
		if (f)
			fclose(f);
		return bm_error(-EINVAL, "%s: not a replication state file "
				"(%s at line %d)", path, jerr.text, jerr.line);
	}
	r = copy_str(st->gen, sizeof st->gen, json_object_get(j, "gen"),
		     path, "gen");
	if (r == 0 && json_is_string(json_object_get(j, "token")))
		r = copy_str(st->token, sizeof st->token,
			     json_object_get(j, "token"), path, "token");
	if (r == 0 && json_is_string(json_object_get(j, "fenced_by")))
		r = copy_str(st->fenced_by, sizeof st->fenced_by,
			     json_object_get(j, "fenced_by"), path,
			     "fenced_by");
	st->committed = json_integer_value(json_object_get(j, "committed"));
	st->committed_instant_ns = json_integer_value(
		json_object_get(j, "committed_instant_ns"));
	h = json_object_get(j, "history");
	json_array_foreach(h, i, e) {
		if (r < 0 || st->nhistory == BM_REPL_MAX_HISTORY)
			break;
		r = copy_str(st->history[st->nhistory].gen, 37,
			     json_object_get(e, "gen"), path, "history.gen");
		st->history[st->nhistory++].point =
			json_integer_value(json_object_get(e, "point"));
	}
	json_decref(j);
	return r;
}

int
bm_repl_state_save(const char *path, const struct bm_repl_state *st)
{
	json_t *j = json_object(), *h = json_array();
	char *text;
	int r;

	for (unsigned i = 0; i < st->nhistory; i++)
		json_array_append_new(h, json_pack("{s:s,s:I}",
			"gen", st->history[i].gen,
			"point", (json_int_t)st->history[i].point));
	json_object_set_new(j, "version", json_integer(1));
	json_object_set_new(j, "gen", json_string(st->gen));
	json_object_set_new(j, "history", h);
	if (st->token[0])
		json_object_set_new(j, "token", json_string(st->token));
	json_object_set_new(j, "committed",
			    json_integer((json_int_t)st->committed));
	json_object_set_new(j, "committed_instant_ns",
			    json_integer(st->committed_instant_ns));
	if (st->fenced_by[0])
		json_object_set_new(j, "fenced_by",
				    json_string(st->fenced_by));
	text = json_dumps(j, JSON_INDENT(1));
	json_decref(j);
	if (!text)
		return bm_error(-ENOMEM, "%s: out of memory", path);
	r = bm_durable_write_file(path, text, strlen(text), 0600);
	free(text);
	return r;
}

