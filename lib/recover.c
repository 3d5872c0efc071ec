/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Recovery after a crash: what a program that serves a disk does with the
 * state directory a move left behind (docs/state.md).
 *
 * The rule is the one the pivot keeps (lib/pivot.c): until the switch is
 * durable the source is authoritative and complete, after it the
 * destination.  The switch is the link naming the destination, so the
 * link decides:
 *
 *   the link names the recorded destination  -> SWITCHED: serve it, the
 *                                               state goes
 *   the link names the recorded source       -> RESUME (or RESTART when
 *                                               the bitmap is damaged)
 *   anything else, or no readable record      -> DISCARDED: the state goes
 *   no state file at all                      -> nothing to do; a directory
 *                                               a move was killed in before
 *                                               its file was in place goes
 *
 * A damaged state is never trusted: at most its record (which move it
 * was) is used, to start that move again from a full copy.
 */
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "errors.h"
#include "internal.h"
#include "state.h"

/* The image the caller would serve, as a state records it. */
static char *
current_image(const char *link, const char *image)
{
	char buf[PATH_MAX];
	ssize_t n;

	if (link) {
		n = readlink(link, buf, sizeof buf - 1);
		if (n <= 0)
			return NULL;
		buf[n] = '\0';
		return strdup(buf);
	}
	return realpath(image, NULL);
}

static int
discard(struct blockmirror_recovery *out, unsigned flags)
{
	out->action = BLOCKMIRROR_RECOVER_DISCARDED;
	if (flags & BLOCKMIRROR_RECOVER_KEEP)
		return 0;
	return bm_state_remove(out->state_dir);
}

static int
recover(const char *link, const char *image, const char *state_dir,
	unsigned flags, struct blockmirror_recovery *out)
{
	struct blockmirror_state_info *si = &out->state;
	const char *what;
	char *cur;
	int r;

	if (state_dir)
		out->state_dir = strdup(state_dir);
	else if (link && asprintf(&out->state_dir, "%s.bmirror-state",
				  link) < 0)
		out->state_dir = NULL;
	if ((state_dir || link) && !out->state_dir)
		return bm_error(-ENOMEM, "out of memory");
	out->image = link ? current_image(link, NULL) : strdup(image);
	if (!out->image)
		return link ? bm_error(-errno, "%s: %s", link,
				       strerror(errno))
			    : bm_error(-ENOMEM, "out of memory");
	if (!out->state_dir)
		return 0;

	si->size = sizeof *si;
	r = blockmirror_state_read(out->state_dir, si);
	if (r == -ENOENT) {
		/* No move, or one killed before its state was in place:
		 * the source is whole, nothing to take up. */
		bm_error_clear();
		return (flags & BLOCKMIRROR_RECOVER_KEEP) ? 0 :
		       bm_state_remove_unborn(out->state_dir);
	}
	if (r < 0 && r != -EBADMSG)
		return r; /* could not even read it: decide nothing */
	if (r < 0 && !si->destination) {
		snprintf(out->message, sizeof out->message,
			 "%s: invalid state, not trusted and removed: %s",
			 out->state_dir, blockmirror_last_error());
		return discard(out, flags);
	}
	what = r < 0 ? blockmirror_last_error() : NULL;
	cur = current_image(link, out->image);
	if (cur && strcmp(cur, si->destination) == 0) {
		free(cur);
		snprintf(out->message, sizeof out->message,
			 "%s: the switch to %s was durable; the move is "
			 "over", out->state_dir, si->destination);
		out->action = BLOCKMIRROR_RECOVER_SWITCHED;
		return (flags & BLOCKMIRROR_RECOVER_KEEP) ? 0 :
		       bm_state_remove(out->state_dir);
	}
	if (!cur || strcmp(cur, si->source) != 0) {
		snprintf(out->message, sizeof out->message,
			 "%s: the state records a move of %s, not of %s; "
			 "removed", out->state_dir, si->source,
			 cur ? cur : out->image);
		free(cur);
		return discard(out, flags);
	}
	free(cur);
	if (what) {
		snprintf(out->message, sizeof out->message,
			 "%s: invalid state, not trusted: %s; the move to %s "
			 "starts again from a full copy", out->state_dir, what,
			 si->destination);
		out->action = BLOCKMIRROR_RECOVER_RESTART;
		return 0;
	}
	snprintf(out->message, sizeof out->message,
		 "%s: resuming the move to %s: %" PRIu64 " of %" PRIu64
		 " regions to copy again", out->state_dir, si->destination,
		 si->regions_dirty, si->regions);
	out->action = BLOCKMIRROR_RECOVER_RESUME;
	return 0;
}

BM_EXPORT int
blockmirror_recover(const char *link, const char *image,
		    const char *state_dir, unsigned flags,
		    struct blockmirror_recovery *out)
{
	int r;

	bm_error_clear();
	if (!out || out->size < sizeof *out || (!link && !image) ||
	    (flags & ~BLOCKMIRROR_RECOVER_KEEP))
		return bm_api_fail("blockmirror_recover",
				   bm_error(-EINVAL, "bad arguments"));
	memset((char *)out + sizeof out->size, 0,
	       sizeof *out - sizeof out->size);
	r = recover(link, image, state_dir, flags, out);
	if (r < 0) {
		blockmirror_recovery_free(out);
		return bm_api_fail("blockmirror_recover", r);
	}
	return 0;
}

BM_EXPORT void
blockmirror_recovery_free(struct blockmirror_recovery *r)
{
	if (!r)
		return;
	free(r->image);
	free(r->state_dir);
	free(r->state.source);
	free(r->state.destination);
	r->image = r->state_dir = NULL;
	r->state.source = r->state.destination = NULL;
}

BM_EXPORT struct blockmirror_job *
blockmirror_job_start_recovered(struct blockmirror_disk *disk,
				const struct blockmirror_recovery *rec,
				const struct blockmirror_job_options *options)
{
	struct blockmirror_job_options o = { .size = sizeof o };

	bm_error_clear();
	if (!rec || !options || options->size > sizeof o ||
	    (rec->action != BLOCKMIRROR_RECOVER_RESUME &&
	     rec->action != BLOCKMIRROR_RECOVER_RESTART) ||
	    !rec->state.destination) {
		bm_api_fail("blockmirror_job_start_recovered",
			    bm_error(-EINVAL, "no move to take up"));
		errno = EINVAL;
		return NULL;
	}
	memcpy(&o, options, options->size);
	o.size = sizeof o;
	o.format = rec->state.format;
	o.mode = rec->state.mode;
	o.granularity = rec->state.granularity;
	o.flags = (o.flags & ~(BLOCKMIRROR_JOB_CREATE |
			       BLOCKMIRROR_JOB_RESUME)) |
		  (rec->action == BLOCKMIRROR_RECOVER_RESUME ?
		   BLOCKMIRROR_JOB_RESUME : 0);
	o.state_dir = rec->state_dir;
	return blockmirror_job_start(disk, rec->state.destination, &o);
}
