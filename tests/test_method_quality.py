"""The method works on the toy world, and its trade-off is real (slow: ~7 minutes on 2 cores).

Run with ``make test-slow``. The runs and their bounds are ``raylens.acceptance.CHECKS`` (one
definition, shared with ``scripts/toyworld_spread.py``, which measures how far each result sits
from its bound on worlds built with other seeds and thread counts). Bounds are absolute or
relative to this world's own baseline, never a figure of one machine's build.
"""

import pytest

from raylens.acceptance import CHECKS, run_check

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("item", CHECKS, ids=lambda c: c.name)
def test_acceptance_run_meets_its_bounds(world, item):
    accs = run_check(item, world.root)
    base = world.baseline["main"]
    print(item.name, item.overrides, accs, "baseline", base)
    for bound in item.bounds:
        assert bound.holds(accs, base), f"{item.name}: {bound} fails with {accs} (baseline {base})"
