/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Shared by the bmirror subcommands: exit codes, error printing, option
 * parsing helpers, the progress bar and JSON output.
 */
#ifndef BMIRROR_H
#define BMIRROR_H

#include <stdbool.h>
#include <stdint.h>

#include <jansson.h>

#include <blockmirror/blockmirror.h>

#include "size.h"

/* Exit status of every subcommand (DESIGN.md, Command line). */
enum {
	EXIT_OK = 0,
	EXIT_FAILED = 1,
	EXIT_USAGE = 2,
};

/* The subcommand being run, for messages ("bmirror copy"). */
extern const char *bm_cmd;

/* Print "bmirror CMD: message" on stderr. */
void tool_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Print the library's last error (without its function-name prefix). */
void tool_lib_error(void);

/* Usage error: message, a hint to --help, and EXIT_USAGE. */
int tool_usage_error(const char *fmt, ...)
	__attribute__((format(printf, 1, 2)));

/* A getopt_long error (c is '?' or ':'): one usage line, EXIT_USAGE. */
int tool_bad_option(int c, int argc, char **argv);

/* Parse a format name for -f/-O; prints a usage error on failure. */
bool parse_format(const char *s, enum blockmirror_format *out);

/* Progress bar on stdout (a terminal) or nothing. */
struct progress;
struct progress *progress_new(const char *label, bool enabled);
void progress_update(void *progress, uint64_t done, uint64_t total);
void progress_end(struct progress *p);

/* Print a JSON object as one line on stdout and free it. */
void json_print(json_t *obj);

/* A backup's, verify's, restore's or prune's event as one JSON object,
 * {"event": NAME, "point": N, ...} with its type's fields
 * (docs/backup.md): what `bmirror backup --json` prints and what
 * `bmirror serve` sends to a "backup" client (cmd-backup.c). */
json_t *backup_event_json(const struct blockmirror_backup_event *ev);

int cmd_copy(int argc, char **argv);
int cmd_create(int argc, char **argv);
int cmd_info(int argc, char **argv);
int cmd_verify(int argc, char **argv);
int cmd_serve(int argc, char **argv);
int cmd_move(int argc, char **argv);
int cmd_client(int argc, char **argv);
int cmd_snapshot(int argc, char **argv);
int cmd_backup(int argc, char **argv);
int cmd_checkpoint(int argc, char **argv);
int cmd_replicate(int argc, char **argv);
int cmd_replica(int argc, char **argv);

#endif /* BMIRROR_H */
