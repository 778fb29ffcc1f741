"""Shared pytest configuration: hypothesis profiles.

``ci`` (used when CI is set): no deadline (shared, noisy machines), reproduction blobs printed.
``dev``: the default locally, fewer examples. ``fuzz``: many examples, for ``make fuzz``.
Select with HYPOTHESIS_PROFILE=...
"""

import os

from hypothesis import HealthCheck, settings

#: The reference environments' worker fixtures, one per session for every directory.
pytest_plugins = ["tests.conformance.workers"]

settings.register_profile(
    "ci",
    deadline=None,
    print_blob=True,
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, print_blob=True, max_examples=40)
settings.register_profile(
    "fuzz",
    deadline=None,
    print_blob=True,
    max_examples=1000,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def pytest_collection_modifyitems(config, items):
    """Under BNREF_REQUIRE_FRAMEWORKS=1 (make test-all, CI) a skipped framework is an error."""
    if os.environ.get("BNREF_REQUIRE_FRAMEWORKS") != "1":
        return
    import importlib.util

    missing = [
        m
        for m in ("torch", "jax", "flax", "keras", "fvcore")
        if importlib.util.find_spec(m) is None
    ]
    if missing:
        raise RuntimeError(
            f"BNREF_REQUIRE_FRAMEWORKS=1 but these frameworks are not installed: {missing}"
        )
