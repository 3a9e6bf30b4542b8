"""Acceptance bounds: absolute or relative to the world's own baseline, with signed margins."""

import pytest

from raylens.acceptance import CHECKS, Bound


def test_bounds_hold_and_measure_their_margin_against_the_worlds_baseline():
    base = {"toy_wmdp": 0.98, "toy_mmlu": 0.90}
    below = Bound("toy_wmdp", "<=", 0.35)
    assert below.holds({"toy_wmdp": 0.35}, base) and below.margin({"toy_wmdp": 0.30}, base) == \
        pytest.approx(0.05)
    assert not below.holds({"toy_wmdp": 0.36}, base) and below.margin({"toy_wmdp": 0.36}, base) < 0
    kept = Bound("toy_mmlu", ">=", 0.9, relative=True)  # 0.9 x 0.90 = 0.81
    assert kept.holds({"toy_mmlu": 0.81}, base) and not kept.holds({"toy_mmlu": 0.80}, base)
    assert kept.margin({"toy_mmlu": 0.85}, base) == pytest.approx(0.04)
    strict = Bound("toy_mmlu", "<", 0.6, relative=True)
    assert not strict.holds({"toy_mmlu": 0.54}, base) and strict.holds({"toy_mmlu": 0.53}, base)
    assert str(kept) == "toy_mmlu >= 0.9 x baseline"


def test_every_check_names_a_recipe_and_bounds_a_toy_task():
    from raylens.recipes import recipe

    assert len({c.name for c in CHECKS}) == len(CHECKS) == 5
    for item in CHECKS:
        recipe(item.recipe, item.overrides)  # valid settings, before any compute
        assert item.bounds and all(b.metric in ("toy_wmdp", "toy_mmlu") for b in item.bounds)
