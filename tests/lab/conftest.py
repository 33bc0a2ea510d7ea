"""Nested-lab tests: ``pytest -m lab tests/lab``.  Each module boots L1 once and asserts on what it ran."""

import os

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "lab: boots the nested lab (QEMU TCG L1 with nested KVM); minutes")


@pytest.fixture(scope="session")
def lab_ready():
    """Skip when the lab is not built, except in CI (or with VMMSHIM_LAB_REQUIRED=1), where it is a failure."""
    from vmmshim.lab import lab_available

    ok, why = lab_available()
    if ok:
        return
    if os.environ.get("CI") or os.environ.get("VMMSHIM_LAB_REQUIRED"):
        pytest.fail(f"nested lab unavailable: {why}")
    pytest.skip(f"nested lab unavailable: {why}")
