/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* The version this library was built as (it may differ from the header a
 * program was compiled against). */
#include <blockmirror/blockmirror.h>

#include "internal.h"

BM_EXPORT const char *
blockmirror_version(void)
{
	return BLOCKMIRROR_VERSION_STRING;
}
