"""Progress bars for waits of more than a few seconds outside the training loop (drawing
candidate views, DDIM sampling, the export), so a terminal never sits silent for minutes.

They go to stderr and show only on a terminal (tqdm's ``disable=None``): logs and captured
output stay as they were, and the training loop's own bar (``output.progress``) is not
affected. ``leave=False``: a finished bar disappears, the lines printed around it stay.
"""

from __future__ import annotations

import sys
from typing import Optional

#: None: show on a terminal only; True / False: always / never (tests set it)
FORCE: Optional[bool] = None


def bar(total: int, desc: str, unit: str = "it"):
    """A tqdm bar of ``total`` units (``with bar(...) as b: ... b.update()``)."""
    from tqdm import tqdm

    disable = None if FORCE is None else not FORCE
    return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=disable,
                file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
