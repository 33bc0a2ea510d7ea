"""Fixtures the unit tests share."""

import pytest


@pytest.fixture
def soft_guest():
    """Builds test guests (``tests/guests/harness.py``) on the soft CPU, closed afterwards."""
    from ops.nvmm import nvmm_init
    from tests.guests.harness import Guest
    made = []

    def make(**kw):
        g = Guest(nvmm_init("soft"), **kw)
        made.append(g)
        return g
    yield make
    for g in made:
        g.close()
