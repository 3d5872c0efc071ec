/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The progress bar: one line redrawn with \r on stdout, only when asked
 * for (a terminal, or --progress).  Redraws at most ten times a second;
 * the rate is measured over the whole run so far.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bmirror.h"

#define BAR_WIDTH 30

struct progress {
	const char *label;
	double start;
	double last_draw;
	bool drawn;
};

static double
now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

struct progress *
progress_new(const char *label, bool enabled)
{
	struct progress *p;

	if (!enabled || !(p = calloc(1, sizeof *p)))
		return NULL;
	p->label = label;
	p->start = now();
	return p;
}

void
progress_update(void *opaque, uint64_t done, uint64_t total)
{
	struct progress *p = opaque;
	char bar[BAR_WIDTH + 1], a[32], b[32], r[32];
	double t, frac, rate;
	int fill;

	if (!p)
		return;
	t = now();
	if (done < total && t - p->last_draw < 0.1)
		return;
	p->last_draw = t;
	frac = total ? (double)done / (double)total : 1.0;
	fill = (int)(frac * BAR_WIDTH);
	memset(bar, '#', (size_t)fill);
	memset(bar + fill, '.', (size_t)(BAR_WIDTH - fill));
	bar[BAR_WIDTH] = '\0';
	rate = t > p->start ? (double)done / (t - p->start) : 0;
	printf("\r%s [%s] %3d%% %s / %s  %s/s ", p->label, bar,
	       (int)(frac * 100), human_size(done, a, sizeof a),
	       human_size(total, b, sizeof b),
	       human_size((uint64_t)rate, r, sizeof r));
	fflush(stdout);
	p->drawn = true;
}

void
progress_end(struct progress *p)
{
	if (!p)
		return;
	if (p->drawn)
		putchar('\n');
	fflush(stdout);
	free(p);
}
