/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * bmirror serve's replication commands (serve-replicate.c).
 */
#ifndef BMIRROR_SERVE_REPLICATE_H
#define BMIRROR_SERVE_REPLICATE_H

#include <jansson.h>
#include <stdbool.h>

#include <blockmirror/blockmirror.h>

/* `wake` wakes the control thread (any thread may call it). */
void serve_repl_init(void (*wake)(void));

/* Does `cmd` belong here ("replicate", "replicate-...")? */
bool serve_repl_is_command(const char *cmd);

/* The answer to send now, or NULL when it comes later (through
 * serve_repl_deliver, for `client` whose connection is `gen`). */
json_t *serve_repl_command(const char *cmd, json_t *req,
			   struct blockmirror_disk *disk, int client,
			   unsigned gen);

/* On the control thread, once woken: send the queued events (client -1:
 * every client) and answers. */
void serve_repl_deliver(void (*send)(int client, unsigned gen, json_t *obj));

/* What query shows, or NULL when the disk does not replicate. */
json_t *serve_repl_status(void);

/* Stop replicating (quit; before the disk closes). */
void serve_repl_stop(void);

#endif /* BMIRROR_SERVE_REPLICATE_H */
