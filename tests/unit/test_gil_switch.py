"""``-o vmmshim.gil_switch_ms``: the interval Python's GIL hands over at (``vmmshim/runner.py``'s ``gil_switch``)."""

import sys

import pytest

from vmmshim.runner import gil_switch
from vmmshim.config import Config, ConfigError


@pytest.fixture
def restore_interval():
    before = sys.getswitchinterval()
    yield
    sys.setswitchinterval(before)


def test_default_is_50_ms_with_a_hypervisor(restore_interval):
    assert gil_switch(Config()) == 0.05
    assert sys.getswitchinterval() == pytest.approx(0.05)


def test_the_soft_cpu_keeps_pythons_interval(restore_interval):
    cfg = Config()
    cfg.set_option("vmmshim.provider=soft")
    sys.setswitchinterval(0.005)
    assert gil_switch(cfg) == pytest.approx(0.005)
    assert sys.getswitchinterval() == pytest.approx(0.005)


def test_set_by_option(restore_interval):
    cfg = Config()
    cfg.set_option("vmmshim.gil_switch_ms=5")
    assert gil_switch(cfg) == 0.005
    assert sys.getswitchinterval() == pytest.approx(0.005)


@pytest.mark.parametrize("value", ["0", "-3", "fast", "100000"])
def test_bad_values_are_refused(restore_interval, value):
    cfg = Config()
    cfg.set_option(f"vmmshim.gil_switch_ms={value}")
    before = sys.getswitchinterval()
    with pytest.raises(ConfigError):
        gil_switch(cfg)
    assert sys.getswitchinterval() == before
