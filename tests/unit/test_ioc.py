"""``ops/ioc.py``, the one Linux ``_IOC`` encoder: the numbers the kernel headers give, for KVM and the tap."""

import pytest

from ops import ioc
from ops.nvmm.kvm import ioctls as K
from vmmshim.backends import net as NB


def test_known_numbers():
    # <linux/if_tun.h>: _IOW('T', 202, int), _IOW('T', 208, unsigned int), _IOW('T', 216, int)
    assert NB.TUNSETIFF == ioc._IOW(ord("T"), 202, 4) == 0x400454CA
    assert NB.TUNSETOFFLOAD == 0x400454D0 and NB.TUNSETVNETHDRSZ == 0x400454D8
    # <linux/kvm.h>: _IO(KVMIO, 0x80), _IOWR(KVMIO, 0x05, struct kvm_cpuid2)
    assert ioc._IO(0xAE, 0x80) == K.KVM_RUN == 0xAE80
    assert ioc._IOWR(0xAE, 0x05, 8) == K.KVM_GET_SUPPORTED_CPUID == 0xC008AE05
    assert ioc._IOR(0xAE, 0x81, 0x90) == K.KVM_GET_REGS == 0x8090AE81


def test_a_layout_gives_its_size():
    class Layout:
        @staticmethod
        def sizeof():
            return 0x20
    assert ioc._IOW(0xAE, 0x46, Layout) == ioc._IOW(0xAE, 0x46, 0x20) == 0x4020AE46


def test_out_of_range_fields_are_refused():
    with pytest.raises(ValueError):
        ioc._IOW(0xAE, 0x46, 1 << ioc._IOC_SIZEBITS)
    with pytest.raises(ValueError):
        ioc._IO(0x100, 0)
    with pytest.raises(ValueError):
        ioc._IO(0xAE, 0x100)
