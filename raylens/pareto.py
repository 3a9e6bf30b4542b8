"""The two-objective Pareto math of a sweep, pure: rows are dicts with ``forget_acc`` (lower is
better: the hazardous knowledge left), ``retain_acc`` (higher is better: the general knowledge
kept) and ``feasible`` (not collapsed below the retain floor, not failed)."""

from __future__ import annotations


def dominates(a: dict, b: dict) -> bool:
    """Whether ``a`` is at least as good as ``b`` on both objectives and better on one."""
    return (a["forget_acc"] <= b["forget_acc"] and a["retain_acc"] >= b["retain_acc"]
            and (a["forget_acc"] < b["forget_acc"] or a["retain_acc"] > b["retain_acc"]))


def beaten_by(base: dict, rows: list[dict]) -> list[dict]:
    """The feasible rows other than ``base`` that dominate it."""
    return [r for r in rows if r is not base and r["feasible"] and r["forget_acc"] is not None
            and dominates(r, base)]


def pareto_front(rows: list[dict]) -> list[dict]:
    """The feasible rows no other feasible row dominates, sorted by ``forget_acc``."""
    feasible = [r for r in rows if r["feasible"]]
    front = (r for r in feasible if not any(dominates(o, r) for o in feasible))
    return sorted(front, key=lambda r: (r["forget_acc"], -r["retain_acc"]))


def pareto_levels(rows: list[dict]) -> list[int | None]:
    """Non-dominated sorting: each row's front number (1 = the Pareto front, 2 = the front once
    the first is removed, ...); None for infeasible rows."""
    levels: dict[int, int] = {}
    left = [r for r in rows if r["feasible"]]
    level = 1
    while left:
        for r in pareto_front(left):
            levels[id(r)] = level
        left = [r for r in left if id(r) not in levels]
        level += 1
    return [levels.get(id(r)) for r in rows]
