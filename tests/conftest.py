"""Shared fixtures: the default toy world is built once (a few minutes) and then cached under
``$RAYLENS_CACHE`` (default ``~/.cache/raylens``), so later runs load it in seconds."""

import pytest

import raylens  # noqa: F401  (offline Hugging Face environment before any HF import)


@pytest.fixture(scope="session")
def world():
    from raylens import toyworld as tw

    return tw.load_or_build()
