"""Live cross-framework conformance: the real frameworks against bnref on the same inputs.

Each module ``pytest.importorskip``s its framework and marks its tests ``frameworks``; the
results feed ``docs/conformance.md`` (``scripts/make_conformance.py``).
"""
