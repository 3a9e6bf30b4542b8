"""The Pareto math of a sweep, pure: rows are dicts with ``forget_acc`` (lower is better: the
hazardous knowledge left), ``retain_acc`` (higher is better: the general knowledge kept),
optionally ``attack_acc`` (lower is better: the forget accuracy after the sweep's worst
fine-tuning attack) and ``feasible`` (not collapsed below the retain floor, not failed).
``keys`` names the objectives a sweep optimises (``SweepConfig.objectives``); every objective
but ``retain_acc`` is minimised."""

from __future__ import annotations

OBJECTIVES = ("forget_acc", "retain_acc")
"""The default objectives: forget accuracy (minimised) and retain accuracy (maximised)."""

MAXIMISED = frozenset({"retain_acc"})


def _better(key: str, a: float, b: float) -> bool:
    return a > b if key in MAXIMISED else a < b


def dominates(a: dict, b: dict, keys: tuple[str, ...] = OBJECTIVES) -> bool:
    """Whether ``a`` is at least as good as ``b`` on every objective and better on one."""
    return (not any(_better(k, b[k], a[k]) for k in keys)
            and any(_better(k, a[k], b[k]) for k in keys))


def scored(row: dict, keys: tuple[str, ...] = OBJECTIVES) -> bool:
    """Whether the row has a value for every objective."""
    return all(row.get(k) is not None for k in keys)


def beaten_by(base: dict, rows: list[dict], keys: tuple[str, ...] = OBJECTIVES) -> list[dict]:
    """The feasible rows other than ``base`` that dominate it."""
    return [r for r in rows if r is not base and r["feasible"] and scored(r, keys)
            and dominates(r, base, keys)]


def pareto_front(rows: list[dict], keys: tuple[str, ...] = OBJECTIVES) -> list[dict]:
    """The feasible rows no other feasible row dominates, sorted by the first objective."""
    feasible = [r for r in rows if r["feasible"] and scored(r, keys)]
    front = (r for r in feasible if not any(dominates(o, r, keys) for o in feasible))
    return sorted(front, key=lambda r: tuple(-r[k] if k in MAXIMISED else r[k] for k in keys))


def pareto_levels(rows: list[dict], keys: tuple[str, ...] = OBJECTIVES) -> list[int | None]:
    """Non-dominated sorting: each row's front number (1 = the Pareto front, 2 = the front once
    the first is removed, ...); None for infeasible rows."""
    levels: dict[int, int] = {}
    left = [r for r in rows if r["feasible"] and scored(r, keys)]
    level = 1
    while left:
        for r in pareto_front(left, keys):
            levels[id(r)] = level
        left = [r for r in left if id(r) not in levels]
        level += 1
    return [levels.get(id(r)) for r in rows]
