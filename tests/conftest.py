"""Shared fixtures: the default toy world is built once (a few minutes) and then cached under
``$RAYLENS_CACHE`` (default ``~/.cache/raylens``), so later runs load it in seconds.

Every test that uses the default world (the ``world`` fixture) is marked ``toyworld``:
``make test-fresh-world`` runs those against a world built anew with another thread count, the
check that no test pins one build's rounding. Tests marked ``any_world`` use the world but
assert only what holds for any build (statuses, counts, concurrency, two runs in one world
bit-identical), so they are not rerun; the others do not read the world and run once."""

import pytest

import raylens  # noqa: F401  (offline Hugging Face environment before any HF import)


@pytest.fixture(scope="session")
def world():
    from raylens import toyworld as tw

    return tw.load_or_build()


def pytest_collection_modifyitems(items):
    for item in items:
        if "world" in item.fixturenames and not item.get_closest_marker("any_world"):
            item.add_marker(pytest.mark.toyworld)
