/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Fuzz target for rebalance plans (tools/plan.c): the input is the plan
 * file.  bm_plan_parse sees it; a plan that parses gets its "resolved"
 * fields filled in deterministically from the input (the disks' sizes
 * and pools, the capacities the caller would take from statvfs), and is
 * then planned with bm_plan_usage and bm_plan_compute, and every pool's
 * URI is expanded for every disk.  Errors are expected; crashes, leaks
 * and moves that name a disk or pool out of range are not.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "plan.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct bm_plan plan;
	struct bm_plan_move *moves = NULL;
	size_t n_moves = 0;
	uint64_t seed = 1469598103934665603u;
	uint64_t *used;
	char err[256];

	if (bm_plan_parse((const char *)data, size, &plan, err, sizeof err))
		return 0;
	for (size_t i = 0; i < size; i++)
		seed = (seed ^ data[i]) * 1099511628211u;
	for (size_t i = 0; i < plan.n_pools; i++)
		if (!plan.pools[i].capacity)
			plan.pools[i].capacity = (seed >> (i % 32)) & 0xffffffffffu;
	for (size_t d = 0; d < plan.n_disks; d++) {
		plan.disks[d].size = ((seed >> (d % 40)) & 0xffffff) << 12;
		plan.disks[d].pool = plan.n_pools ?
			(int)((seed >> (d % 61)) % plan.n_pools) : -1;
	}
	used = calloc(plan.n_pools + 1, sizeof *used);
	if (used)
		bm_plan_usage(&plan, used);
	free(used);
	if (bm_plan_compute(&plan, &moves, &n_moves, err, sizeof err) == 0) {
		for (size_t i = 0; i < n_moves; i++)
			if (moves[i].disk < 0 ||
			    (size_t)moves[i].disk >= plan.n_disks ||
			    moves[i].to < 0 ||
			    (size_t)moves[i].to >= plan.n_pools)
				abort();
		free(moves);
	}
	for (size_t i = 0; i < plan.n_pools && i < 8; i++)
		for (size_t d = 0; plan.pools[i].uri && d < plan.n_disks &&
					d < 8; d++)
			free(bm_plan_pool_uri(&plan.pools[i],
					      plan.disks[d].name));
	bm_plan_free(&plan);
	return 0;
}
