"""Suite-wide pytest options.

``--fuzz-full`` runs the whole fuzz suite (tests/fuzz); without it each fuzz area runs its fast,
seeded subset, which is what the README's test command (and so CI) runs.
"""
from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fuzz-full",
        action="store_true",
        default=False,
        help="run every fuzz case of tests/fuzz (default: the fast seeded subset)",
    )


@pytest.fixture(scope="session")
def fuzz_full(request: pytest.FixtureRequest) -> bool:
    """True when the full fuzz run was asked for with --fuzz-full."""
    return bool(request.config.getoption("--fuzz-full"))
