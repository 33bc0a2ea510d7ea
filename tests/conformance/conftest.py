"""Fixtures of the VM-level conformance tests."""

import pytest

from ops.nvmm_ops import VmmOpsNvmm
from vmmshim.vm import VM, VmConfig


@pytest.fixture
def make_vm(provider):
    """Builds VMs (``VmConfig`` keywords; 16 MiB by default) on the provider under test, closed afterwards."""
    made = []

    def make(**kw):
        vm = VM(VmmOpsNvmm(provider), VmConfig(**{"memsize": 16 << 20, **kw}), log=lambda m: None)
        made.append(vm)
        return vm
    yield make
    for vm in made:
        vm.timers.close()
        vm.close()
